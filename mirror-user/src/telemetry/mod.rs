//! The one counter model and its exports. Each stage owns one counters
//! struct (most are declared with [`counters!`]: relaxed atomics, written
//! without locks on the hot path) and exposes one `Serialize` snapshot;
//! the [`registry::Registry`] walks the stages into one
//! [`registry::Document`], which the report at exit, STATS frames,
//! `mirror stats` and the Prometheus endpoint all read.

pub mod endpoint;
pub mod prometheus;
pub mod registry;

/// Declares a stage's counters: a struct of `AtomicU64`s, its snapshot (the
/// same fields as `u64`s, `Serialize`, named as in the counters document),
/// and its [`registry::Stage`].
///
/// ```ignore
/// counters! {
///     /// Userspace side of the ring stage.
///     pub struct DrainCounters => DrainSnapshot {
///         /// Records read out of the rings.
///         records,
///     }
/// }
/// ```
macro_rules! counters {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident => $snapshot:ident {
            $( $(#[$field_meta:meta])* $field:ident ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        $vis struct $name {
            $( $(#[$field_meta])* pub $field: ::std::sync::atomic::AtomicU64, )*
        }

        #[doc = concat!("[`", stringify!($name), "`] at one moment.")]
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ::serde::Serialize)]
        $vis struct $snapshot {
            $( $(#[$field_meta])* pub $field: u64, )*
        }

        impl $name {
            pub fn snapshot(&self) -> $snapshot {
                $snapshot {
                    $( $field: self.$field.load(::std::sync::atomic::Ordering::Relaxed), )*
                }
            }
        }

        impl $crate::telemetry::registry::Stage for $name {
            type Snapshot = $snapshot;

            fn snapshot(&self) -> $snapshot {
                $name::snapshot(self)
            }
        }
    };
}
pub(crate) use counters;
