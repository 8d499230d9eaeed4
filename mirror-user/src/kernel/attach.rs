//! Attaching the program to an interface, and detaching it.
//!
//! Attachments are BPF links wherever the kernel has them (TCX for TC from
//! Linux 6.6, XDP links from 5.9): a link belongs to the process's file
//! descriptor, so a `mirror` killed with SIGKILL leaves nothing attached.
//! A clsact filter (the TC fallback) outlives its process instead; every
//! TC attach first removes filters left behind by an earlier mirror.
//!
//! The mirror must see what arrives and change nothing: its TC program
//! returns "no verdict", so whatever else is attached decides about each
//! packet as if the mirror were not there, and it runs first, so that no
//! other program or filter can hide packets from it by ending the chain
//! early. TCX programs run before every clsact filter: through TCX the
//! mirror attaches first in its chain; through clsact it takes priority 1
//! (see [`clsact`]) and refuses to attach behind TCX programs. With
//! `--directions both` its egress program takes the same place, under the
//! same rules, at the egress hook.

pub mod clsact;

use std::{fmt, io};

use aya::{
    programs::{
        LinkOrder, ProgramError, SchedClassifier,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions, TcHandle},
        xdp::{XdpLinkId, XdpMode},
    },
    util::KernelVersion,
};
use mirror_common::{PROG_TC, PROG_TC_EGRESS};

use crate::{
    kernel::attach::clsact::{ClsactFilter, Hook},
    kernel::loader::{LoadError, Mirror},
};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("there is no network interface named '{iface}' here (this namespace has: {available})")]
    UnknownInterface { iface: String, available: String },
    #[error(
        "{iface} already has an XDP program attached: detach it first (`ip link set dev {iface} xdp off`) or use --attach tc"
    )]
    XdpBusy { iface: String },
    #[error(
        "the driver of {iface} has no native XDP support: use --attach xdp-skb, or --attach tc"
    )]
    XdpDriverUnsupported { iface: String },
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("cannot attach to {iface} at {point}: {source}")]
    Attach {
        iface: String,
        point: AttachPoint,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("cannot add the clsact qdisc to {iface}: {source}")]
    Clsact {
        iface: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot remove the mirror's tc filter from {iface} ({source}): `tc filter show dev {iface} {hook}` shows it as {program}; remove it with `tc filter del`"
    )]
    Detach {
        iface: String,
        hook: Hook,
        program: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot list the tc {hook} filters of {iface}: {source}")]
    ListFilters {
        iface: String,
        hook: Hook,
        #[source]
        source: io::Error,
    },
    #[error(
        "{iface} has {occupant} at tc {hook} priority 1, which would run before the mirror and could hide packets from it: move that filter to priority 2 or later, or attach the mirror through TCX (Linux 6.6 or newer, without --tc-netlink)"
    )]
    ClsactOccupied {
        iface: String,
        hook: Hook,
        occupant: clsact::Occupied,
    },
    #[error(
        "{iface} has TCX programs at tc {hook} ({programs}), which run before every clsact filter and could hide packets from the mirror: leave out --tc-netlink, so that the mirror attaches through TCX, first in their chain"
    )]
    TcxAhead {
        iface: String,
        hook: Hook,
        programs: String,
    },
    #[error(
        "XDP has no egress hook, so --attach {mode} captures only what the client sends: use --directions client with it, or --attach tc (or auto) for both directions"
    )]
    XdpOneDirection { mode: &'static str },
}

/// Which directions of each connection the mirror captures
/// (`--directions`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Directions {
    /// What clients send to the subscribed ports (at ingress).
    #[default]
    Client,
    /// That, and what the servers on those ports answer (at TC egress).
    Both,
}

/// What `mode` captures unless `--directions` says otherwise: both
/// directions where TC is used (its egress hook sees the answers), the
/// client's at XDP, which has no egress hook.
pub const fn default_directions(mode: AttachMode) -> Directions {
    match mode {
        AttachMode::Auto | AttachMode::Tc => Directions::Both,
        AttachMode::Xdp | AttachMode::XdpSkb | AttachMode::XdpDrv => Directions::Client,
    }
}

/// Refuses `directions` that `mode` cannot capture: XDP sees only what
/// arrives.
pub fn check_directions(mode: AttachMode, directions: Directions) -> Result<(), AttachError> {
    let name = match mode {
        AttachMode::Auto | AttachMode::Tc => return Ok(()),
        AttachMode::Xdp => "xdp",
        AttachMode::XdpSkb => "xdp-skb",
        AttachMode::XdpDrv => "xdp-drv",
    };
    match directions {
        Directions::Client => Ok(()),
        Directions::Both => Err(AttachError::XdpOneDirection { mode: name }),
    }
}

/// Where to attach the program (`--attach`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// The attach point that costs the traffic least on this interface.
    Auto,
    /// TC ingress (TCX link where the kernel has it, else a clsact filter).
    Tc,
    /// XDP, native if the driver supports it, else generic.
    Xdp,
    /// Generic (skb) XDP.
    XdpSkb,
    /// Native (driver) XDP; fails where the driver has none.
    XdpDrv,
}

/// Where a program ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachPoint {
    /// TC ingress through a TCX link.
    TcxIngress,
    /// TC ingress through a netlink clsact filter.
    ClsactIngress,
    /// TC egress through a TCX link.
    TcxEgress,
    /// TC egress through a netlink clsact filter.
    ClsactEgress,
    /// XDP in the given mode.
    Xdp(XdpKind),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpKind {
    /// The kernel's choice: native where the driver supports it.
    Default,
    Generic,
    Native,
}

impl fmt::Display for AttachPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TcxIngress => "tc ingress (TCX link)",
            Self::ClsactIngress => "tc ingress (clsact filter)",
            Self::TcxEgress => "tc egress (TCX link)",
            Self::ClsactEgress => "tc egress (clsact filter)",
            Self::Xdp(XdpKind::Default) => "xdp (native if the driver has it, else generic)",
            Self::Xdp(XdpKind::Generic) => "xdp (generic)",
            Self::Xdp(XdpKind::Native) => "xdp (native)",
        })
    }
}

/// The attached programs; detach them with [`detach`] (dropping the
/// [`Mirror`] detaches too).
#[derive(Debug)]
pub struct Attachment {
    pub iface: String,
    pub ifindex: u32,
    /// Where the ingress (client-to-server) program is.
    pub point: AttachPoint,
    link: Link,
    /// Where the egress (server-to-client) program is, with
    /// `--directions both`.
    egress: Option<(AttachPoint, Link)>,
}

impl fmt::Display for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.egress {
            Some((egress, _)) => write!(f, "{} and {egress}", self.point),
            None => write!(f, "{}", self.point),
        }
    }
}

#[derive(Debug)]
enum Link {
    Tcx(SchedClassifierLinkId),
    /// A clsact filter. aya does not own it: it would try to delete it
    /// when the program is dropped, after the mirror has given up the
    /// privilege to; the privileged helper removes it
    /// ([`clsact::remove`]).
    Clsact(ClsactFilter),
    Xdp(XdpLinkId),
}

impl Link {
    fn clsact_filter(&self) -> Option<ClsactFilter> {
        match self {
            Self::Clsact(filter) => Some(*filter),
            Self::Tcx(_) | Self::Xdp(_) => None,
        }
    }
}

impl Attachment {
    /// The clsact filters of the programs attached through one, in the
    /// order they are to be removed: egress first, so that the clsact
    /// qdisc the ingress filter added is unused when that one goes.
    pub fn clsact_filters(&self) -> Vec<ClsactFilter> {
        let egress = self
            .egress
            .as_ref()
            .and_then(|(_, link)| link.clsact_filter());
        egress
            .into_iter()
            .chain(self.link.clsact_filter())
            .collect()
    }

    /// Where the egress program is, if one is attached.
    pub fn egress_point(&self) -> Option<AttachPoint> {
        self.egress.as_ref().map(|(point, _)| *point)
    }
}

/// Why `--attach auto` picks TC (measured on a veth pair, see README):
/// native XDP on veth turns off segmentation offload on the peer and cut
/// bulk throughput several-fold; generic XDP works on every packet after the
/// stack built it and must linearize GSO packets; a TC program costs
/// nothing measurable and changes nothing about the device.
pub const AUTO_REASON: &str =
    "TC leaves the interface's offloads alone; XDP slows the watched traffic";

/// Resolves `mode` for `iface`: `auto` is TC on every interface.
pub const fn resolve(mode: AttachMode) -> AttachMode {
    match mode {
        AttachMode::Auto => AttachMode::Tc,
        other => other,
    }
}

/// Index of `iface`, or an error that lists the interfaces there are.
pub fn interface_index(iface: &str) -> Result<u32, AttachError> {
    let unknown = || AttachError::UnknownInterface {
        iface: iface.to_owned(),
        available: available_interfaces(),
    };
    nix::net::if_::if_nametoindex(iface).map_err(|_| unknown())
}

/// The interfaces of the calling thread's namespace (netlink, so that a
/// thread that entered another namespace lists that one's).
fn available_interfaces() -> String {
    let names = crate::kernel::netns::interface_names().unwrap_or_default();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

/// TC attaches through TCX links here (else through clsact filters).
pub fn uses_tcx(force_netlink: bool) -> bool {
    !force_netlink
        && KernelVersion::current().is_ok_and(|version| version >= KernelVersion::new(6, 6, 0))
}

/// Attaches the mirror's programs to `iface` at the point `mode` names:
/// the ingress one, and with [`Directions::Both`] the egress one (TC only,
/// see [`check_directions`]). `force_netlink` makes TC use clsact filters
/// even where TCX exists. On an error nothing is left attached.
pub fn attach(
    mirror: &mut Mirror,
    iface: &str,
    mode: AttachMode,
    directions: Directions,
    force_netlink: bool,
) -> Result<Attachment, AttachError> {
    check_directions(mode, directions)?;
    let ifindex = interface_index(iface)?;
    let (point, link) = match resolve(mode) {
        AttachMode::Auto | AttachMode::Tc => {
            attach_tc(mirror, iface, ifindex, Hook::Ingress, force_netlink)?
        }
        AttachMode::Xdp => attach_xdp(mirror, iface, XdpKind::Default)?,
        AttachMode::XdpSkb => attach_xdp(mirror, iface, XdpKind::Generic)?,
        AttachMode::XdpDrv => attach_xdp(mirror, iface, XdpKind::Native)?,
    };
    let mut attachment = Attachment {
        iface: iface.to_owned(),
        ifindex,
        point,
        link,
        egress: None,
    };
    if directions == Directions::Both {
        match attach_tc(mirror, iface, ifindex, Hook::Egress, force_netlink) {
            Ok(egress) => attachment.egress = Some(egress),
            Err(error) => {
                if let Err(detach) = detach(mirror, attachment) {
                    tracing::warn!("{detach}");
                }
                return Err(error);
            }
        }
    }
    Ok(attachment)
}

/// Detaches the programs (egress first); the kernel stops running them
/// before this returns.
pub fn detach(mirror: &mut Mirror, attachment: Attachment) -> Result<(), AttachError> {
    let egress = attachment
        .egress
        .map(|(point, link)| detach_link(mirror, &attachment.iface, point, link));
    let ingress = detach_link(mirror, &attachment.iface, attachment.point, attachment.link);
    egress.transpose().and(ingress)
}

fn detach_link(
    mirror: &mut Mirror,
    iface: &str,
    point: AttachPoint,
    link: Link,
) -> Result<(), AttachError> {
    let failed = |source: ProgramError| AttachError::Attach {
        iface: iface.to_owned(),
        point,
        source: Box::new(source),
    };
    match link {
        Link::Tcx(id) => match point {
            AttachPoint::TcxEgress => mirror.tc_egress()?.detach(id).map_err(failed),
            _ => mirror.tc()?.detach(id).map_err(failed),
        },
        Link::Clsact(filter) => clsact::remove(filter).map_err(|source| AttachError::Detach {
            iface: iface.to_owned(),
            hook: filter.hook,
            program: program_name(filter.hook),
            source,
        }),
        Link::Xdp(id) => mirror.xdp()?.detach(id).map_err(failed),
    }
}

/// The name of the mirror's program at `hook`.
const fn program_name(hook: Hook) -> &'static str {
    match hook {
        Hook::Ingress => PROG_TC,
        Hook::Egress => PROG_TC_EGRESS,
    }
}

/// The mirror's TC program for `hook`, loaded.
fn tc_program(
    mirror: &mut Mirror,
    hook: Hook,
) -> Result<&mut aya::programs::SchedClassifier, LoadError> {
    match hook {
        Hook::Ingress => mirror.tc(),
        Hook::Egress => mirror.tc_egress(),
    }
}

fn attach_tc(
    mirror: &mut Mirror,
    iface: &str,
    ifindex: u32,
    hook: Hook,
    force_netlink: bool,
) -> Result<(AttachPoint, Link), AttachError> {
    remove_leftover_filters(iface, ifindex, hook);
    if uses_tcx(force_netlink) {
        // First, so that a program that ends the chain (with OK or SHOT)
        // cannot hide packets from the mirror; later programs still see
        // every packet, since the mirror passes each one on.
        let point = match hook {
            Hook::Ingress => AttachPoint::TcxIngress,
            Hook::Egress => AttachPoint::TcxEgress,
        };
        let options = TcAttachOptions::TcxOrder(LinkOrder::first());
        let id = tc_program(mirror, hook)?
            .attach_with_options(iface, hook.attach_type(), options)
            .map_err(|source| AttachError::Attach {
                iface: iface.to_owned(),
                point,
                source: Box::new(source),
            })?;
        return Ok((point, Link::Tcx(id)));
    }

    refuse_behind_tcx(iface, hook)?;
    // The qdisc goes with the mirror if the mirror added it, and only then.
    let added_qdisc = match tc::qdisc_add_clsact(iface) {
        Ok(()) => true,
        // EEXIST: the interface already has one, which is all we need.
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => false,
        Err(source) => {
            return Err(AttachError::Clsact {
                iface: iface.to_owned(),
                source: io::Error::other(source),
            });
        }
    };
    let attached = attach_clsact_filter(mirror, iface, ifindex, hook, added_qdisc);
    if attached.is_err() && added_qdisc {
        clsact::remove_added_qdisc(ifindex, iface);
    }
    attached
}

/// The mirror's filter at [`clsact::PRIORITY`] of the interface's clsact
/// qdisc; on an error, nothing of it is left.
fn attach_clsact_filter(
    mirror: &mut Mirror,
    iface: &str,
    ifindex: u32,
    hook: Hook,
    added_qdisc: bool,
) -> Result<(AttachPoint, Link), AttachError> {
    let point = match hook {
        Hook::Ingress => AttachPoint::ClsactIngress,
        Hook::Egress => AttachPoint::ClsactEgress,
    };
    let failed = |source: ProgramError| AttachError::Attach {
        iface: iface.to_owned(),
        point,
        source: Box::new(source),
    };
    let filters = clsact::filters(ifindex, hook).map_err(|source| AttachError::ListFilters {
        iface: iface.to_owned(),
        hook,
        source,
    })?;
    let handle = clsact::placement(&filters).map_err(|occupant| AttachError::ClsactOccupied {
        iface: iface.to_owned(),
        hook,
        occupant,
    })?;
    let options = TcAttachOptions::Netlink(NlOptions {
        priority: clsact::PRIORITY,
        handle: TcHandle::from(handle),
        ..NlOptions::default()
    });
    let program = tc_program(mirror, hook)?;
    let id = program
        .attach_with_options(iface, hook.attach_type(), options)
        .map_err(failed)?;
    // Owned from here: dropping the link (on an error) deletes the filter.
    let link = program.take_link(id).map_err(failed)?;
    let program_id = program.info().map_err(failed)?.id();
    // aya would delete the filter when the program is dropped, after the
    // mirror has given up the privilege to: the privileged helper removes
    // it ([`clsact::remove`]).
    std::mem::forget(link);
    tracing::debug!(
        "clsact {hook} filter on {iface}: priority {}, handle {handle:#x}",
        clsact::PRIORITY
    );
    Ok((
        point,
        Link::Clsact(ClsactFilter {
            ifindex,
            hook,
            priority: clsact::PRIORITY,
            handle,
            program_id,
            added_qdisc,
        }),
    ))
}

/// TCX programs run before every clsact filter, and one that returns a
/// verdict skips them all: a clsact mirror would see only what they let
/// through.
fn refuse_behind_tcx(iface: &str, hook: Hook) -> Result<(), AttachError> {
    // An error means a kernel without TCX, where nothing can be ahead.
    let Ok((_, programs)) = SchedClassifier::query_tcx(iface, hook.attach_type()) else {
        return Ok(());
    };
    if programs.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = programs
        .iter()
        .map(|p| p.name_as_str().unwrap_or("unnamed").to_owned())
        .collect();
    Err(AttachError::TcxAhead {
        iface: iface.to_owned(),
        hook,
        programs: names.join(", "),
    })
}

/// Removes clsact filters at `hook` that mirrors killed together with their
/// privileged helper left behind: filters of a program named like ours that
/// no process holds any more. Another mirror running on the interface
/// holds its program, and its filter stays. Each is deleted by its own
/// priority and handle, so a filter of someone else that shares its
/// priority (see [`clsact`]) stays.
fn remove_leftover_filters(iface: &str, ifindex: u32, hook: Hook) {
    let filters = match clsact::filters(ifindex, hook) {
        Ok(filters) => filters,
        // No clsact qdisc: nothing was left behind.
        Err(error) => {
            tracing::debug!("no leftover TC {hook} filter on {iface}: {error}");
            return;
        }
    };
    let held = clsact::held_programs();
    for filter in clsact::leftovers(ifindex, hook, &filters, program_name(hook), &held) {
        match clsact::remove(filter) {
            Ok(()) => tracing::warn!(
                "removed a TC filter on {iface} left behind by an earlier mirror that did not exit cleanly"
            ),
            Err(error) => tracing::debug!("cannot remove a leftover TC filter on {iface}: {error}"),
        }
    }
}

fn attach_xdp(
    mirror: &mut Mirror,
    iface: &str,
    kind: XdpKind,
) -> Result<(AttachPoint, Link), AttachError> {
    let mode = match kind {
        XdpKind::Default => XdpMode::Default,
        XdpKind::Generic => XdpMode::Skb,
        XdpKind::Native => XdpMode::Driver,
    };
    let point = AttachPoint::Xdp(kind);
    let id = mirror.xdp()?.attach(iface, mode).map_err(|source| {
        let errno = match &source {
            ProgramError::SyscallError(e) => e.io_error.raw_os_error(),
            _ => None,
        };
        match errno {
            Some(libc::EBUSY | libc::EEXIST) => AttachError::XdpBusy {
                iface: iface.to_owned(),
            },
            Some(libc::EOPNOTSUPP) if kind == XdpKind::Native => {
                AttachError::XdpDriverUnsupported {
                    iface: iface.to_owned(),
                }
            }
            _ => AttachError::Attach {
                iface: iface.to_owned(),
                point,
                source: Box::new(source),
            },
        }
    })?;
    Ok((point, Link::Xdp(id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_resolves_to_tc_and_forced_modes_stay() {
        assert_eq!(resolve(AttachMode::Auto), AttachMode::Tc);
        for mode in [
            AttachMode::Tc,
            AttachMode::Xdp,
            AttachMode::XdpSkb,
            AttachMode::XdpDrv,
        ] {
            assert_eq!(resolve(mode), mode);
        }
    }

    #[test]
    fn xdp_captures_only_the_client_direction() {
        for mode in [AttachMode::Auto, AttachMode::Tc] {
            check_directions(mode, Directions::Both).unwrap();
        }
        for mode in [AttachMode::Xdp, AttachMode::XdpSkb, AttachMode::XdpDrv] {
            check_directions(mode, Directions::Client).unwrap();
            let text = check_directions(mode, Directions::Both)
                .unwrap_err()
                .to_string();
            assert!(
                text.starts_with("XDP has no egress hook") && text.contains("--directions client"),
                "{text}"
            );
        }
    }

    #[test]
    fn unknown_interface_is_a_clear_error() {
        let err = interface_index("no-such-if0").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("there is no network interface named 'no-such-if0'"),
            "{text}"
        );
        assert!(
            text.contains("lo"),
            "lists the interfaces there are: {text}"
        );
        assert!(interface_index("lo").unwrap() > 0);
    }
}
