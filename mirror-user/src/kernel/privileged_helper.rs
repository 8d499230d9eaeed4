//! The privileged helper: a small process that `mirror run` starts before
//! it gives up root, and the only part of the mirror that keeps a
//! capability afterwards — CAP_NET_ADMIN, nothing else, no other work.
//!
//! It does what still needs that capability once the mirror runs as an
//! ordinary user:
//! - enlarges a new local client's socket send buffer past
//!   `net.core.wmem_max` (SO_SNDBUFFORCE: a `mirror tail` on the same CPUs
//!   as the traffic needs megabytes of slack, see `server`);
//! - removes the mirror's clsact filters (the TC fallback on kernels
//!   without TCX: a filter outlives its process, a TCX link does not), and
//!   the clsact qdisc if the mirror added it and nothing else uses it;
//! - removes the subscriber socket files, which live in directories only
//!   root may write, through those directories, which it is given open;
//! - with `--netns`/`--pid` and no `--iface` (hot-plug), attaches the
//!   mirror's TC programs to interfaces that appear later in the watched
//!   namespace, and lets go of them when they go: for that it also keeps
//!   CAP_SYS_ADMIN (setns) and CAP_BPF (the link), and is given the
//!   namespace and the programs open with the plan. The links are the
//!   helper's: they go when it exits, with the mirror. A compromised mirror
//!   can ask for no more than it had at start: its own programs, on
//!   interfaces of the namespace it was started on.
//!
//! The helper is the mirror binary itself, started again with a hidden
//! subcommand (a fork of a multi-threaded process could not safely run
//! this code), and talks over a `SOCK_SEQPACKET` socket pair. When the
//! mirror ends — however it ends, SIGKILL included — the helper sees the
//! socket close, removes the filter and the socket files, and exits. It
//! ignores the terminal's and the service manager's stop signals, so that
//! the mirror, which receives them too, can detach in order first.

use std::{
    ffi::OsString,
    io::{self, IoSlice, IoSliceMut},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
        unix::{
            ffi::{OsStrExt as _, OsStringExt as _},
            process::CommandExt as _,
        },
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use nix::{
    cmsg_space,
    fcntl::AtFlags,
    sys::{
        signal::{SigHandler, Signal, signal},
        socket::{
            AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
            recvmsg, sendmsg, setsockopt, socketpair, sockopt,
        },
        stat::{SFlag, fstatat},
    },
    unistd::{UnlinkatFlags, unlinkat},
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::kernel::attach::clsact::{self, ClsactFilter};

/// The hidden subcommand that runs the helper.
pub const SUBCOMMAND: &str = "privileged-helper";
/// The helper's end of the socket pair, in the helper.
const HELPER_FD: RawFd = 3;
/// The largest send buffer the helper sets: what a local subscriber
/// session asks for (the server's `UNIX_SEND_BUFFER` says why so much).
pub const MAX_SEND_BUFFER: usize = 8 << 20;
/// How long the mirror waits for an answer from the helper.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest message: the plan.
const MAX_MESSAGE: usize = 64 << 10;
/// Most socket files in a plan (each sends its directory's descriptor
/// along; the kernel passes at most 253 in one message).
const MAX_SOCKETS: usize = 64;

/// A socket file the mirror bound: the directory it was bound in (open),
/// its name there, and the inode it was. Removed through that directory,
/// only while the name is still that socket: a path is looked up again each
/// time, and whoever may rename one of its directories could point it
/// elsewhere between a check and the unlink.
#[derive(Debug)]
pub struct SocketFile {
    dir: OwnedFd,
    name: OsString,
    /// For messages only.
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// The socket `name` in the open directory `dir` (`path` for messages),
    /// inode `dev`/`ino`. `name` is one path component.
    pub fn new(
        dir: OwnedFd,
        name: OsString,
        path: PathBuf,
        (dev, ino): (u64, u64),
    ) -> io::Result<Self> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.contains(&b'/') || bytes == b"." || bytes == b".." {
            return Err(io::Error::other(format!(
                "{} does not name a file in a directory",
                path.display()
            )));
        }
        Ok(Self {
            dir,
            name,
            path,
            dev,
            ino,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file if it is still the socket that was bound. The
    /// directory is one that only root may write, or sticky (see
    /// `server::bind_unix`): nobody else can swap the name between the
    /// check and the unlink.
    pub fn remove(&self) -> io::Result<()> {
        let stat = fstatat(
            &self.dir,
            self.name.as_os_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
        let is_socket =
            SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFSOCK;
        if is_socket && stat.st_dev == self.dev && stat.st_ino == self.ino {
            unlinkat(&self.dir, self.name.as_os_str(), UnlinkatFlags::NoRemoveDir)?;
        }
        Ok(())
    }
}

/// What the helper cleans up when the mirror ends.
#[derive(Debug, Default)]
pub struct Plan<'a> {
    /// In the order they are removed.
    pub clsact: Vec<ClsactFilter>,
    pub sockets: Vec<&'a SocketFile>,
    /// Hot-plug: what the helper attaches later.
    pub hotplug: Option<HotplugFds<'a>>,
}

/// The watched namespace and the TC programs (egress with
/// `--directions both`), for attaching interfaces that appear later.
#[derive(Debug, Clone, Copy)]
pub struct HotplugFds<'a> {
    pub netns: BorrowedFd<'a>,
    pub ingress: BorrowedFd<'a>,
    pub egress: Option<BorrowedFd<'a>>,
}

/// The plan as the helper receives it: the socket files' directories
/// travel alongside, as SCM_RIGHTS, in the same order. The mirror sends it
/// before it gives up root, so the helper may trust it; it never looks a
/// path up, so nothing the mirror does afterwards changes what it removes.
#[derive(Debug, Serialize, Deserialize)]
struct PlanMessage {
    clsact: Vec<ClsactFilter>,
    sockets: Vec<SocketName>,
    /// Hot-plug: the descriptors after the directories are the namespace,
    /// the ingress program and, if this is true, the egress program.
    #[serde(default)]
    hotplug: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SocketName {
    name: Vec<u8>,
    path: Vec<u8>,
    dev: u64,
    ino: u64,
}

impl Plan<'_> {
    /// The message and the descriptors that go with it.
    fn encode(&self) -> io::Result<(Vec<u8>, Vec<BorrowedFd<'_>>)> {
        if self.sockets.len() > MAX_SOCKETS {
            return Err(io::Error::other(format!(
                "the mirror listens on at most {MAX_SOCKETS} Unix sockets: give fewer --listen addresses"
            )));
        }
        let message = PlanMessage {
            clsact: self.clsact.clone(),
            sockets: self
                .sockets
                .iter()
                .map(|file| SocketName {
                    name: file.name.as_bytes().to_vec(),
                    path: file.path.as_os_str().as_bytes().to_vec(),
                    dev: file.dev,
                    ino: file.ino,
                })
                .collect(),
            hotplug: self.hotplug.map(|fds| fds.egress.is_some()),
        };
        let bytes = serde_json::to_vec(&message).map_err(io::Error::other)?;
        let mut fds: Vec<BorrowedFd<'_>> =
            self.sockets.iter().map(|file| file.dir.as_fd()).collect();
        if let Some(hotplug) = self.hotplug {
            fds.extend([hotplug.netns, hotplug.ingress]);
            fds.extend(hotplug.egress);
        }
        Ok((bytes, fds))
    }
}

/// What the helper removes: the plan it received.
#[derive(Debug, Default)]
struct Cleanup {
    clsact: Vec<ClsactFilter>,
    sockets: Vec<SocketFile>,
    hotplug: Option<Hotplug>,
}

/// What hot-plug attaches with, and the links it made, by interface index.
#[derive(Debug)]
struct Hotplug {
    netns: OwnedFd,
    ingress: OwnedFd,
    egress: Option<OwnedFd>,
    links: std::collections::HashMap<u32, Vec<OwnedFd>>,
}

/// Interfaces the helper attaches at most (an untrusted mirror must not
/// make it hold descriptors without end).
const MAX_HOTPLUG_LINKS: usize = 4096;

impl Hotplug {
    /// Attaches the programs, first in the TCX chains, to interface
    /// `ifindex` of the watched namespace (from a thread that entered it).
    fn attach(&mut self, ifindex: u32) -> io::Result<()> {
        if self.links.contains_key(&ifindex) {
            return Ok(());
        }
        if self.links.len() >= MAX_HOTPLUG_LINKS {
            return Err(io::Error::other("too many interfaces"));
        }
        let programs: Vec<(BorrowedFd<'_>, u32)> = std::iter::once((
            self.ingress.as_fd(),
            aya_obj::generated::bpf_attach_type::BPF_TCX_INGRESS as u32,
        ))
        .chain(self.egress.as_ref().map(|egress| {
            (
                egress.as_fd(),
                aya_obj::generated::bpf_attach_type::BPF_TCX_EGRESS as u32,
            )
        }))
        .collect();
        let netns = self.netns.as_fd();
        let links = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                    programs
                        .iter()
                        .map(|(program, attach_type)| tcx_link(*program, ifindex, *attach_type))
                        .collect::<io::Result<Vec<OwnedFd>>>()
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the attach thread panicked")))
        })?;
        self.links.insert(ifindex, links);
        Ok(())
    }
}

/// A TCX link of `program` at `attach_type` of `ifindex`, first in its
/// chain (BPF_F_BEFORE without a relative: before every program there),
/// as the mirror attaches at start. aya attaches only programs it loaded
/// itself; the helper has the program's descriptor only.
fn tcx_link(program: BorrowedFd<'_>, ifindex: u32, attach_type: u32) -> io::Result<OwnedFd> {
    use aya_obj::generated::{BPF_F_BEFORE, bpf_attr, bpf_cmd};
    // SAFETY: bpf_attr is plain data; all zeroes is its empty value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writes plain integers into the link_create arm of the union,
    // the one BPF_LINK_CREATE reads.
    unsafe {
        let link = &mut attr.link_create;
        link.__bindgen_anon_1.prog_fd = program.as_raw_fd() as u32;
        link.__bindgen_anon_2.target_ifindex = ifindex;
        link.attach_type = attach_type;
        link.flags = BPF_F_BEFORE;
    }
    // SAFETY: bpf(2) with a valid attr of its full size; it returns a new
    // descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_LINK_CREATE as libc::c_long,
            &raw const attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

impl Cleanup {
    fn decode(message: &[u8], mut dirs: Vec<OwnedFd>) -> io::Result<Self> {
        let plan: PlanMessage = serde_json::from_slice(message).map_err(io::Error::other)?;
        let hotplug = match plan.hotplug {
            None => None,
            Some(egress) => {
                let count = if egress { 3 } else { 2 };
                if dirs.len() < plan.sockets.len() + count {
                    return Err(io::Error::other("the hot-plug plan lacks its descriptors"));
                }
                let mut fds = dirs.split_off(plan.sockets.len()).into_iter();
                let (Some(netns), Some(ingress)) = (fds.next(), fds.next()) else {
                    return Err(io::Error::other("the hot-plug plan lacks its descriptors"));
                };
                Some(Hotplug {
                    netns,
                    ingress,
                    egress: fds.next(),
                    links: std::collections::HashMap::new(),
                })
            }
        };
        if plan.sockets.len() != dirs.len() {
            return Err(io::Error::other(format!(
                "the plan names {} socket files but comes with {} directories",
                plan.sockets.len(),
                dirs.len()
            )));
        }
        let sockets = plan
            .sockets
            .into_iter()
            .zip(dirs)
            .map(|(socket, dir)| {
                SocketFile::new(
                    dir,
                    OsString::from_vec(socket.name),
                    PathBuf::from(OsString::from_vec(socket.path)),
                    (socket.dev, socket.ino),
                )
            })
            .collect::<io::Result<_>>()?;
        Ok(Self {
            clsact: plan.clsact,
            sockets,
            hotplug,
        })
    }
}

/// Requests, one byte each (a send-buffer request carries the socket as
/// SCM_RIGHTS and the size as 8 bytes).
const FORCE_SEND_BUFFER: u8 = b'B';
const DETACH: u8 = b'D';
/// Hot-plug: attach to, or let go of, an interface (4 bytes of index).
const ATTACH_IF: u8 = b'A';
const FORGET_IF: u8 = b'F';
const OK: u8 = b'k';
const FAILED: u8 = b'e';

/// The mirror's handle on its helper.
pub struct Helper {
    socket: Mutex<OwnedFd>,
    child: Mutex<Option<Child>>,
}

impl Helper {
    /// Starts the helper (while the mirror still has its privileges) and
    /// gives it the plan.
    pub fn spawn(plan: &Plan) -> io::Result<Self> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let their_fd = theirs.as_raw_fd();
        let mut command = Command::new("/proc/self/exe");
        command
            .arg(SUBCOMMAND)
            .stdin(Stdio::null())
            // `--pcap -` writes the capture to standard output.
            .stdout(Stdio::null());
        // SAFETY: dup2 is async-signal-safe; it makes the helper's end of
        // the pair its descriptor 3 (without close-on-exec).
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(their_fd, HELPER_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn()?;
        drop(theirs);
        let timeout = nix::sys::time::TimeVal::new(ANSWER_TIMEOUT.as_secs() as i64, 0);
        setsockopt(&ours, sockopt::ReceiveTimeout, &timeout)?;
        setsockopt(&ours, sockopt::SendTimeout, &timeout)?;
        let helper = Self {
            socket: Mutex::new(ours),
            child: Mutex::new(Some(child)),
        };
        let (message, dirs) = plan.encode()?;
        helper.ask(&message, &dirs)?;
        Ok(helper)
    }

    /// Sets `socket`'s send buffer to `bytes`, past the system's limit.
    pub fn force_send_buffer(&self, socket: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
        let mut message = vec![FORCE_SEND_BUFFER];
        message.extend_from_slice(&(bytes as u64).to_le_bytes());
        self.ask(&message, &[socket])
    }

    /// Removes the clsact filters of the plan now, and the hot-plugged
    /// links (the mirror stops).
    pub fn detach_clsact(&self) -> io::Result<()> {
        self.ask(&[DETACH], &[])
    }

    /// Hot-plug: attaches the programs to interface `ifindex` of the
    /// watched namespace.
    pub fn attach_interface(&self, ifindex: u32) -> io::Result<()> {
        let mut message = vec![ATTACH_IF];
        message.extend_from_slice(&ifindex.to_le_bytes());
        self.ask(&message, &[])
    }

    /// Hot-plug: lets go of the links of interface `ifindex` (gone).
    pub fn forget_interface(&self, ifindex: u32) -> io::Result<()> {
        let mut message = vec![FORGET_IF];
        message.extend_from_slice(&ifindex.to_le_bytes());
        self.ask(&message, &[])
    }

    /// One request, one answer.
    fn ask(&self, message: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let socket = self.socket.lock();
        let fds: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let control: Vec<ControlMessage<'_>> = if fds.is_empty() {
            Vec::new()
        } else {
            vec![ControlMessage::ScmRights(&fds)]
        };
        // A helper that has exited shows as EPIPE or ECONNRESET (it left a
        // request unread): not as a broken pipe, which `main` takes for
        // the ordinary end of a command whose reader went away.
        let exited = |error: nix::errno::Errno| match error {
            nix::errno::Errno::EPIPE | nix::errno::Errno::ECONNRESET => {
                io::Error::other("the privileged helper has exited")
            }
            other => other.into(),
        };
        sendmsg::<()>(
            socket.as_raw_fd(),
            &[IoSlice::new(message)],
            &control,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(exited)?;
        let mut answer = [0u8; 512];
        let mut iov = [IoSliceMut::new(&mut answer)];
        let got = recvmsg::<()>(socket.as_raw_fd(), &mut iov, None, MsgFlags::empty())
            .map_err(exited)?
            .bytes;
        match answer.get(..got) {
            Some([OK]) => Ok(()),
            Some([FAILED, reason @ ..]) => Err(io::Error::other(format!(
                "the privileged helper could not do it: {}",
                String::from_utf8_lossy(reason)
            ))),
            Some([]) => Err(io::Error::other("the privileged helper has exited")),
            _ => Err(io::Error::other(
                "the privileged helper gave an unknown answer",
            )),
        }
    }
}

impl Drop for Helper {
    /// Closing the socket tells the helper to clean up and exit; waits a
    /// little for it, so that the socket files are gone when the mirror is.
    fn drop(&mut self) {
        let socket = self.socket.get_mut();
        let _ = nix::sys::socket::shutdown(socket.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let child = self.child.get_mut();
        if let Some(mut child) = child.take() {
            let deadline = std::time::Instant::now() + ANSWER_TIMEOUT;
            while std::time::Instant::now() < deadline {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => return,
                    Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            tracing::warn!("the privileged helper did not exit in time");
        }
    }
}

/// The helper's side: runs until the mirror closes the socket, then
/// cleans up. Called by the hidden subcommand.
pub fn serve() -> io::Result<()> {
    // SAFETY: descriptor 3 is the socket the mirror passed (see `spawn`);
    // nothing else in this process owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(HELPER_FD) };
    for stop in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        // SAFETY: installs the ignore disposition, no handler code.
        unsafe { signal(stop, SigHandler::SigIgn) }?;
    }
    // Hot-plug needs more until the plan says whether it is wanted (and
    // CAP_SETPCAP until then, to cut the bounding set down to what stays).
    keep_only(&[
        caps::Capability::CAP_NET_ADMIN,
        caps::Capability::CAP_SYS_ADMIN,
        caps::Capability::CAP_BPF,
        caps::Capability::CAP_SETPCAP,
    ])?;
    serve_on(&socket)
}

/// Serves the mirror on `socket` until it goes away, then cleans up. Once
/// the plan is known the cleanup runs however the mirror ends, even when it
/// dies between a request and its answer (the answer then fails).
fn serve_on(socket: &OwnedFd) -> io::Result<()> {
    let mut buffer = vec![0u8; MAX_MESSAGE];
    let (plan_bytes, dirs) = receive(socket, &mut buffer)?;
    let mut plan = Cleanup::decode(&buffer[..plan_bytes], dirs)?;
    keep_only(if plan.hotplug.is_some() {
        &[
            caps::Capability::CAP_NET_ADMIN,
            caps::Capability::CAP_SYS_ADMIN,
            caps::Capability::CAP_BPF,
        ]
    } else {
        &[caps::Capability::CAP_NET_ADMIN]
    })?;
    if answer(socket, Ok(())).is_ok() {
        loop {
            let (len, fds) = match receive(socket, &mut buffer) {
                Ok((0, _)) | Err(_) => break,
                Ok(received) => received,
            };
            let result = handle(&buffer[..len], fds, &mut plan);
            if answer(socket, result).is_err() {
                break;
            }
        }
    }
    // The mirror ended (or closed the socket): clean up what is left.
    for filter in std::mem::take(&mut plan.clsact) {
        match clsact::remove(filter) {
            Ok(()) => tracing::info!("removed the mirror's TC filter (the mirror has ended)"),
            Err(error) => tracing::debug!("the mirror's TC filter is gone already: {error}"),
        }
    }
    for file in &plan.sockets {
        if let Err(error) = file.remove()
            && error.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!("cannot remove {}: {error}", file.path().display());
        }
    }
    Ok(())
}

/// One request of the (unprivileged, so untrusted) mirror.
fn handle(message: &[u8], fds: Vec<OwnedFd>, plan: &mut Cleanup) -> io::Result<()> {
    match (message, fds.as_slice()) {
        ([FORCE_SEND_BUFFER, size @ ..], [socket]) if size.len() == 8 => {
            let bytes = u64::from_le_bytes(size.try_into().expect("8 bytes"));
            force_send_buffer(socket, bytes)
        }
        ([ATTACH_IF, index @ ..], []) if index.len() == 4 => {
            let ifindex = u32::from_le_bytes(index.try_into().expect("4 bytes"));
            match &mut plan.hotplug {
                Some(hotplug) => hotplug.attach(ifindex),
                None => Err(io::Error::other("no hot-plug was planned")),
            }
        }
        ([FORGET_IF, index @ ..], []) if index.len() == 4 => {
            let ifindex = u32::from_le_bytes(index.try_into().expect("4 bytes"));
            if let Some(hotplug) = &mut plan.hotplug {
                hotplug.links.remove(&ifindex);
            }
            Ok(())
        }
        ([DETACH], []) => {
            if let Some(hotplug) = &mut plan.hotplug {
                hotplug.links.clear();
            }
            // Every filter goes, whatever became of the one before.
            let mut result = Ok(());
            for filter in std::mem::take(&mut plan.clsact) {
                result = result.and(clsact::remove(filter));
            }
            result
        }
        _ => Err(io::Error::other("unknown request")),
    }
}

/// SO_SNDBUFFORCE for what the mirror needs it for only: a local client's
/// stream socket, at most the size the server asks for. Any socket at any
/// size would let a compromised mirror pin kernel memory past every
/// limit.
fn force_send_buffer(socket: &OwnedFd, bytes: u64) -> io::Result<()> {
    if bytes > MAX_SEND_BUFFER as u64 {
        return Err(io::Error::other(format!(
            "a send buffer of {bytes} bytes is more than the {MAX_SEND_BUFFER} a client gets"
        )));
    }
    let sock = socket2::SockRef::from(socket);
    if sock.domain()? != socket2::Domain::UNIX || sock.r#type()? != socket2::Type::STREAM {
        return Err(io::Error::other("only a local client's socket is enlarged"));
    }
    setsockopt(socket, sockopt::SndBufForce, &(bytes as usize)).map_err(io::Error::from)
}

/// One message and the descriptors that came with it (those are closed
/// when dropped; a message whose descriptors did not all fit is refused).
fn receive(socket: &OwnedFd, buffer: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = [IoSliceMut::new(buffer)];
    let mut space = cmsg_space!([RawFd; MAX_SOCKETS]);
    let message = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for control in message.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = control {
            // SAFETY: the kernel just installed these descriptors for us.
            fds.extend(
                received
                    .into_iter()
                    .map(|raw| unsafe { OwnedFd::from_raw_fd(raw) }),
            );
        }
    }
    if message.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::other("a message came with too many descriptors"));
    }
    Ok((message.bytes, fds))
}

fn answer(socket: &OwnedFd, result: io::Result<()>) -> io::Result<()> {
    let message = match result {
        Ok(()) => vec![OK],
        Err(error) => {
            let mut message = vec![FAILED];
            message.extend(error.to_string().bytes().take(400));
            message
        }
    };
    sendmsg::<()>(
        socket.as_fd().as_raw_fd(),
        &[IoSlice::new(&message)],
        &[],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// Drops every capability but `wanted` (those the helper has), for good:
/// no capability can come back, even through an exec.
fn keep_only(wanted: &[caps::Capability]) -> io::Result<()> {
    use caps::CapSet;
    let error = |e: caps::errors::CapsError| io::Error::other(e.to_string());
    let mut keep = caps::CapsHashSet::new();
    for cap in wanted {
        if caps::has_cap(None, CapSet::Permitted, *cap).map_err(error)? {
            keep.insert(*cap);
        }
    }
    if caps::has_cap(None, CapSet::Effective, caps::Capability::CAP_SETPCAP).map_err(error)? {
        for cap in caps::all() {
            if !keep.contains(&cap) {
                // An unknown capability of an older kernel cannot be dropped.
                let _ = caps::drop(None, CapSet::Bounding, cap);
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(error)?;
    caps::clear(None, CapSet::Inheritable).map_err(error)?;
    caps::set(None, CapSet::Effective, &keep).map_err(error)?;
    caps::set(None, CapSet::Permitted, &keep).map_err(error)?;
    nix::sys::prctl::set_no_new_privs()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    fn send(socket: &OwnedFd, message: &[u8], fds: &[RawFd]) {
        let control: Vec<ControlMessage<'_>> = if fds.is_empty() {
            Vec::new()
        } else {
            vec![ControlMessage::ScmRights(fds)]
        };
        sendmsg::<()>(
            socket.as_raw_fd(),
            &[IoSlice::new(message)],
            &control,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
    }

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    /// The file of the socket bound at `path`, as `server::bind_unix`
    /// describes it.
    fn socket_file(path: &Path) -> SocketFile {
        let meta = std::fs::symlink_metadata(path).unwrap();
        let dir = nix::fcntl::open(
            path.parent().unwrap(),
            nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        SocketFile::new(
            dir,
            path.file_name().unwrap().to_owned(),
            path.to_owned(),
            (meta.dev(), meta.ino()),
        )
        .unwrap()
    }

    fn bound_socket(dir: &Path) -> (std::os::unix::net::UnixListener, SocketFile) {
        let path = dir.join("m.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        (listener, socket_file(&path))
    }

    /// Sends `plan` as `Helper::spawn` does.
    fn send_plan(mirror: &OwnedFd, plan: &Plan<'_>) {
        let (message, dirs) = plan.encode().unwrap();
        let raw: Vec<RawFd> = dirs.iter().map(AsRawFd::as_raw_fd).collect();
        send(mirror, &message, &raw);
    }

    /// A helper that is gone is an error of its own: EPIPE would pass for
    /// a reader that went away, which `main` takes for a clean end.
    #[test]
    fn a_helper_that_exited_is_an_error_not_a_broken_pipe() {
        // Gone before the request (EPIPE), or after it, leaving it unread
        // (ECONNRESET).
        for later in [None, Some(Duration::from_millis(100))] {
            let (mirror, helper_end) = pair();
            match later {
                None => drop(helper_end),
                Some(after) => drop(std::thread::spawn(move || {
                    std::thread::sleep(after);
                    drop(helper_end);
                })),
            }
            let helper = Helper {
                socket: Mutex::new(mirror),
                child: Mutex::new(None),
            };
            let error = helper.detach_clsact().unwrap_err();
            assert_ne!(error.kind(), io::ErrorKind::BrokenPipe, "{error}");
            assert!(error.to_string().contains("has exited"), "{error}");
        }
    }

    #[test]
    fn a_mirror_killed_mid_request_is_still_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        let (_listener, file) = bound_socket(dir.path());
        let client = std::os::unix::net::UnixStream::connect(file.path()).unwrap();
        let (mirror, helper) = pair();
        let plan = Plan {
            clsact: Vec::new(),
            sockets: vec![&file],
            hotplug: None,
        };
        // The plan and a request, then the mirror is gone before any answer.
        send_plan(&mirror, &plan);
        let mut request = vec![FORCE_SEND_BUFFER];
        request.extend_from_slice(&(1u64 << 20).to_le_bytes());
        send(&mirror, &request, &[client.as_raw_fd()]);
        drop(mirror);
        serve_on(&helper).unwrap();
        assert!(!file.path().exists(), "the socket file is removed");
    }

    /// The helper removes what the plan named, through the directories
    /// that came with it: after the mirror renamed the socket's directory
    /// and made another socket at the old path (as it could, unprivileged,
    /// in a directory of its own), its socket goes, the other one stays.
    #[test]
    fn the_helper_removes_sockets_through_the_directories_it_was_given() {
        let dir = tempfile::tempdir().unwrap();
        let (run, moved) = (dir.path().join("run"), dir.path().join("moved"));
        std::fs::create_dir(&run).unwrap();
        let (_first, first) = bound_socket(&run);
        std::fs::create_dir(dir.path().join("other")).unwrap();
        let (_second, second) = bound_socket(&dir.path().join("other"));
        let (mirror, helper) = pair();
        send_plan(
            &mirror,
            &Plan {
                clsact: Vec::new(),
                sockets: vec![&first, &second],
                hotplug: None,
            },
        );
        std::fs::rename(&run, &moved).unwrap();
        std::fs::create_dir(&run).unwrap();
        let (_planted, planted) = bound_socket(&run);
        drop(mirror);
        serve_on(&helper).unwrap();
        assert!(
            !moved.join("m.sock").exists(),
            "the mirror's socket is removed"
        );
        assert!(!second.path().exists(), "the second one too");
        assert!(planted.path().exists(), "the socket at the old path stays");
    }

    #[test]
    fn a_plan_without_its_directories_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_listener, file) = bound_socket(dir.path());
        let (message, _) = Plan {
            clsact: Vec::new(),
            sockets: vec![&file],
            hotplug: None,
        }
        .encode()
        .unwrap();
        assert!(Cleanup::decode(&message, Vec::new()).is_err());
        let bad_name = SocketFile::new(
            file.dir.try_clone().unwrap(),
            OsString::from("../m.sock"),
            PathBuf::from("x"),
            (0, 0),
        );
        assert!(bad_name.is_err());
    }

    #[test]
    fn send_buffers_are_forced_only_for_local_clients_and_up_to_the_server_size() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: forcing a send buffer needs CAP_NET_ADMIN");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (_listener, file) = bound_socket(dir.path());
        let client = std::os::unix::net::UnixStream::connect(file.path()).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut plan = Cleanup::default();
        let ask = |fd: BorrowedFd<'_>, bytes: u64, plan: &mut Cleanup| {
            let mut message = vec![FORCE_SEND_BUFFER];
            message.extend_from_slice(&bytes.to_le_bytes());
            handle(&message, vec![fd.try_clone_to_owned().unwrap()], plan)
        };
        ask(client.as_fd(), MAX_SEND_BUFFER as u64, &mut plan).unwrap();
        assert!(socket2::SockRef::from(&client).send_buffer_size().unwrap() >= MAX_SEND_BUFFER);
        assert!(
            ask(client.as_fd(), 1 << 30, &mut plan).is_err(),
            "larger than asked"
        );
        assert!(
            ask(tcp.as_fd(), 1 << 20, &mut plan).is_err(),
            "not a local client"
        );
        assert!(handle(&[DETACH, 0], Vec::new(), &mut plan).is_err());
        assert!(handle(&[], Vec::new(), &mut plan).is_err());
    }

    #[test]
    fn socket_files_are_removed_only_while_they_are_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        let (listener, file) = bound_socket(dir.path());
        drop(listener);
        // Replaced by a regular file: left alone.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"not a socket").unwrap();
        file.remove().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
        std::fs::remove_file(&path).unwrap();
        // Still ours: removed.
        let (_listener, file) = bound_socket(dir.path());
        file.remove().unwrap();
        assert!(!path.exists());
    }

    /// The socket's directory renamed after the bind: the socket is still
    /// removed, in the directory it was bound in, and what now has its old
    /// path is left alone.
    #[test]
    fn socket_files_are_removed_from_their_directory_not_by_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("run")).unwrap();
        let (_listener, file) = bound_socket(&dir.path().join("run"));
        std::fs::rename(dir.path().join("run"), dir.path().join("moved")).unwrap();
        std::fs::create_dir(dir.path().join("run")).unwrap();
        let (_other, other) = bound_socket(&dir.path().join("run"));
        file.remove().unwrap();
        assert!(!dir.path().join("moved/m.sock").exists(), "ours is removed");
        assert!(other.path().exists(), "the socket at the old path stays");
    }
}
