//! `mirror privileged-helper` (hidden): the helper `mirror run` starts
//! for itself, see [`mirror_user::kernel::privileged_helper`].

/// Serves the mirror that started it; synchronous, it never starts a
/// runtime.
pub fn run() -> anyhow::Result<()> {
    Ok(mirror_user::kernel::privileged_helper::serve()?)
}
