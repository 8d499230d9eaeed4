//! Network namespaces the mirror watches without living in them
//! (`--netns`, `--pid`, `--iface NETNS:IF`).
//!
//! The mirror's own sockets, files and metrics endpoint stay in the
//! namespace it was started in; only the work that names interfaces (their
//! lookup, the attach, the netlink dumps) runs in the watched namespace, on
//! a short-lived thread that entered it with setns(2) (a namespace is a
//! property of the thread, so the rest of the process never leaves its own).
//! aya attaches by interface name and talks netlink from the calling thread,
//! so running the whole attach on that thread is what makes it land in the
//! right namespace; TCX and XDP links then belong to the mirror's file
//! descriptors, wherever the interface is.

use std::{
    fmt,
    fs::File,
    io,
    os::{
        fd::{AsFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

/// Where `ip netns add NAME` keeps its namespaces.
pub const NAMED_DIR: &str = "/var/run/netns";

/// Why a namespace cannot be watched (each says what to do).
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error(
        "there is no network namespace '{name}' ({path} does not exist): `ip netns list` shows the named ones; give a path such as /proc/PID/ns/net for another"
    )]
    NoSuchNamespace { name: String, path: PathBuf },
    #[error(
        "there is no process {pid} whose network namespace the mirror could watch: `ps` or `pgrep` shows the running ones"
    )]
    NoSuchProcess { pid: u32 },
    #[error(
        "{path} is not a network namespace: give a name under {NAMED_DIR} or a path such as /proc/PID/ns/net"
    )]
    NotANamespace { path: PathBuf },
    #[error("cannot open the network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot enter the network namespace {label}: {source}")]
    Enter {
        label: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot list the interfaces of the network namespace {label}: {source}")]
    List {
        label: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "the network namespace {label} has no interface but lo: name one with --iface, or wait until the pod has its network"
    )]
    NoInterfaces { label: String },
    #[error("cannot read the cookie of the network namespace {label}: {source}")]
    Cookie {
        label: String,
        #[source]
        source: io::Error,
    },
}

/// A network namespace, held open (so that it stays the same namespace for
/// as long as the mirror runs, whatever happens to its name or process).
#[derive(Debug)]
pub struct Netns {
    file: File,
    /// How interfaces of it are named in the mirror's output (`NAME` of
    /// `NAME:eth0`); empty for the mirror's own namespace.
    label: String,
    /// Device and inode: equal for two handles of one namespace.
    id: (u64, u64),
}

impl PartialEq for Netns {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl fmt::Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.label.is_empty() {
            f.write_str("(the mirror's own)")
        } else {
            f.write_str(&self.label)
        }
    }
}

impl Netns {
    /// The namespace the calling thread is in.
    pub fn current() -> Result<Self, NetnsError> {
        Self::open(Path::new("/proc/thread-self/ns/net"), String::new())
    }

    /// `--netns`: a name under [`NAMED_DIR`], or a path (anything with a
    /// `/`, e.g. /proc/PID/ns/net).
    pub fn named(arg: &str) -> Result<Self, NetnsError> {
        let path = if arg.contains('/') {
            PathBuf::from(arg)
        } else {
            Path::new(NAMED_DIR).join(arg)
        };
        if !path.exists() || arg.is_empty() || arg == "." || arg == ".." {
            return Err(NetnsError::NoSuchNamespace {
                name: arg.to_owned(),
                path,
            });
        }
        let mut netns = Self::open(&path, arg.to_owned())?;
        netns.own_label_if_current()?;
        Ok(netns)
    }

    /// `--pid`: the namespace of process `pid`, labelled with its name
    /// under [`NAMED_DIR`] if it has one, else `pidPID`.
    pub fn of_pid(pid: u32) -> Result<Self, NetnsError> {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        if pid == 0 || !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(NetnsError::NoSuchProcess { pid });
        }
        let mut netns = Self::open(&path, format!("pid{pid}")).map_err(|error| match error {
            // Gone between the check and the open.
            NetnsError::Open { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                NetnsError::NoSuchProcess { pid }
            }
            other => other,
        })?;
        if let Some(name) = named_alias(netns.id) {
            netns.label = name;
        }
        netns.own_label_if_current()?;
        Ok(netns)
    }

    fn open(path: &Path, label: String) -> Result<Self, NetnsError> {
        let open_error = |source| NetnsError::Open {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(open_error)?;
        let meta = file.metadata().map_err(open_error)?;
        // A namespace file lives on nsfs; anything else (a regular file
        // someone put under /var/run/netns) would make setns fail later.
        if nix::sys::statfs::fstatfs(file.as_fd())
            .map(|fs| fs.filesystem_type() != NSFS_MAGIC)
            .unwrap_or(true)
        {
            return Err(NetnsError::NotANamespace {
                path: path.to_owned(),
            });
        }
        Ok(Self {
            file,
            label,
            id: (meta.dev(), meta.ino()),
        })
    }

    /// The mirror's own namespace keeps plain interface names.
    fn own_label_if_current(&mut self) -> Result<(), NetnsError> {
        if Self::current()?.id == self.id {
            self.label.clear();
        }
        Ok(())
    }

    /// The namespace, held open (for setns in another process).
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Is this the namespace the mirror runs in?
    pub fn is_own(&self) -> bool {
        self.label.is_empty()
    }

    /// `NAME` in `NAME:eth0`; empty for the mirror's own namespace.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// How the mirror names interface `iface` of this namespace:
    /// `iface`, or `NETNS:iface`.
    pub fn iface_label(&self, iface: &str) -> String {
        if self.is_own() {
            iface.to_owned()
        } else {
            format!("{}:{iface}", self.label)
        }
    }

    /// Runs `work` in this namespace: on the calling thread for the
    /// mirror's own, else on a thread that enters it and ends with `work`.
    pub fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        if self.is_own() {
            return Ok(work());
        }
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|errno| {
                        NetnsError::Enter {
                            label: self.label.clone(),
                            source: errno.into(),
                        }
                    })?;
                    Ok(work())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// The namespace's cookie, as the programs write it into records:
    /// `SO_NETNS_COOKIE` of a socket made in it.
    pub fn cookie(&self) -> Result<u64, NetnsError> {
        self.run(socket_netns_cookie)?
            .map_err(|source| NetnsError::Cookie {
                label: self.to_string(),
                source,
            })
    }

    /// The interfaces of this namespace that the mirror watches when none
    /// is named: all but loopback, by name, sorted.
    pub fn interfaces(&self) -> Result<Vec<String>, NetnsError> {
        let list = |source: io::Error| NetnsError::List {
            label: self.to_string(),
            source,
        };
        let names = self.run(interface_names)?.map_err(list)?;
        let names: Vec<String> = names.into_iter().filter(|name| name != "lo").collect();
        if names.is_empty() {
            return Err(NetnsError::NoInterfaces {
                label: self.to_string(),
            });
        }
        Ok(names)
    }
}

/// The end of the process whose namespace the mirror watches (`--pid`).
///
/// A pod's namespace goes with its last process; the mirror then ends as
/// on SIGINT (detaches, reports its counters), rather than serve a
/// namespace that will carry nothing more. Held as a pidfd, opened before
/// the namespace, so a pid reused after the exit cannot stand in for it.
#[derive(Debug)]
pub struct ProcessExit {
    pidfd: OwnedFd,
    pub pid: u32,
}

impl ProcessExit {
    pub fn open(pid: u32) -> Result<Self, NetnsError> {
        let Ok(raw) = libc::pid_t::try_from(pid) else {
            return Err(NetnsError::NoSuchProcess { pid });
        };
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new
        // descriptor or -1; nix 0.32 has no wrapper.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) };
        if fd < 0 {
            let source = io::Error::last_os_error();
            return Err(match source.raw_os_error() {
                Some(libc::ESRCH | libc::EINVAL) => NetnsError::NoSuchProcess { pid },
                _ => NetnsError::Open {
                    path: PathBuf::from(format!("/proc/{pid}")),
                    source,
                },
            });
        }
        // SAFETY: the kernel just returned this descriptor, owned by nobody
        // else (a descriptor number fits an i32).
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        Ok(Self { pidfd, pid })
    }

    /// Whether the process is still running: its pidfd is not readable
    /// yet. Checked once its namespace is open, so that the namespace is
    /// the process's and not a namespace of a process that took the pid
    /// in between.
    pub fn is_running(&self) -> bool {
        use std::os::fd::AsFd as _;
        let mut fds = [nix::poll::PollFd::new(
            self.pidfd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        matches!(
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO),
            Ok(0)
        )
    }

    /// Completes when the process has exited (a pidfd turns readable).
    pub async fn exited(self) -> io::Result<()> {
        let fd = crate::kernel::drain::register_readable(self.pidfd)?;
        let _ready = fd.readable().await?;
        Ok(())
    }
}

/// NSFS_MAGIC from linux/magic.h.
const NSFS_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0x6e73_6673);

/// The interfaces of the calling thread's namespace, sorted (netlink, so
/// it answers for the thread's namespace, where /sys/class/net answers for
/// the one sysfs was mounted in).
pub fn interface_names() -> io::Result<Vec<String>> {
    let mut names: Vec<String> = nix::net::if_::if_nameindex()?
        .iter()
        .map(|interface| interface.name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// The name under [`NAMED_DIR`] of the namespace `id`, if it has one.
fn named_alias(id: (u64, u64)) -> Option<String> {
    let dir = std::fs::read_dir(NAMED_DIR).ok()?;
    let mut names: Vec<String> = dir
        .filter_map(Result::ok)
        .filter(|entry| {
            std::fs::metadata(entry.path()).is_ok_and(|meta| (meta.dev(), meta.ino()) == id)
        })
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    names.sort();
    names.into_iter().next()
}

/// `--iface` as given: `IF`, or `NETNS:IF` for interface IF of the named
/// namespace NETNS (interface names cannot contain `:`, so the last one
/// splits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfaceArg {
    pub netns: Option<String>,
    pub iface: String,
}

impl std::str::FromStr for IfaceArg {
    type Err = String;

    fn from_str(arg: &str) -> Result<Self, String> {
        let (netns, iface) = match arg.rsplit_once(':') {
            Some((netns, iface)) => (Some(netns.to_owned()), iface),
            None => (None, arg),
        };
        if iface.is_empty() || netns.as_deref() == Some("") {
            return Err(format!(
                "'{arg}' names no interface: give IF (e.g. eth0) or NETNS:IF (e.g. pod1:eth0)"
            ));
        }
        Ok(Self {
            netns,
            iface: iface.to_owned(),
        })
    }
}

impl fmt::Display for IfaceArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.netns {
            Some(netns) => write!(f, "{netns}:{}", self.iface),
            None => f.write_str(&self.iface),
        }
    }
}

/// The cookie of the calling thread's network namespace.
fn socket_netns_cookie() -> io::Result<u64> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    use std::os::fd::AsRawFd as _;
    let socket = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the socket is open, and `cookie` has room for the `len`
    // bytes the kernel writes.
    let done = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if done != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watched_process_that_exited_is_not_running() {
        let mut child = std::process::Command::new("true").spawn().expect("true");
        let watched = ProcessExit::open(child.id()).expect("a pidfd of a child");
        // Not reaped yet: the pidfd turns readable at exit all the same.
        child.wait().expect("wait");
        assert!(!watched.is_running());
        let this = ProcessExit::open(std::process::id()).expect("a pidfd of this process");
        assert!(this.is_running());
    }

    #[test]
    fn iface_arguments_split_at_the_last_colon() {
        let plain: IfaceArg = "eth0".parse().unwrap();
        assert_eq!(plain.netns, None);
        assert_eq!(plain.iface, "eth0");
        let other: IfaceArg = "pod:1:eth0".parse().unwrap();
        assert_eq!(other.netns.as_deref(), Some("pod:1"));
        assert_eq!(other.iface, "eth0");
        assert_eq!(other.to_string(), "pod:1:eth0");
        for bad in ["", "pod:", ":eth0"] {
            let error = bad.parse::<IfaceArg>().unwrap_err();
            assert!(error.contains("names no interface"), "{error}");
        }
    }

    #[test]
    fn missing_namespaces_and_processes_are_one_sentence() {
        let error = Netns::named("no-such-netns-x").unwrap_err().to_string();
        assert!(
            error.starts_with("there is no network namespace 'no-such-netns-x'")
                && error.contains("ip netns list"),
            "{error}"
        );
        let error = Netns::of_pid(u32::MAX).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("there is no process {}", u32::MAX)),
            "{error}"
        );
        let error = Netns::named("/etc/hostname").unwrap_err().to_string();
        assert!(error.contains("is not a network namespace"), "{error}");
    }

    #[test]
    fn the_end_of_a_watched_process_is_seen() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let exit = ProcessExit::open(child.id()).unwrap();
        runtime.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(10), exit.exited())
                .await
                .expect("seen within 10 s")
                .unwrap();
        });
        child.wait().unwrap();
        let error = ProcessExit::open(u32::MAX).unwrap_err().to_string();
        assert!(error.starts_with("there is no process"), "{error}");
    }

    #[test]
    fn the_own_namespace_keeps_plain_names() {
        let own = Netns::of_pid(std::process::id()).unwrap();
        assert!(own.is_own());
        assert_eq!(own.iface_label("lo"), "lo");
        assert_eq!(own, Netns::current().unwrap());
        let names = own.run(interface_names).unwrap().unwrap();
        assert!(names.contains(&"lo".to_owned()), "{names:?}");
    }
}
