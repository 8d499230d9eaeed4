//! The privileged helper: a small process that `mirror run` starts before
//! it gives up root, and the only part of the mirror that keeps a
//! capability afterwards — CAP_NET_ADMIN, nothing else, no other work.
//!
//! It does what still needs that capability once the mirror runs as an
//! ordinary user:
//! - enlarges a new local client's socket send buffer past
//!   `net.core.wmem_max` (SO_SNDBUFFORCE: a `mirror tail` on the same CPUs
//!   as the traffic needs megabytes of slack, see `server`);
//! - removes the mirror's clsact filter (the TC fallback on kernels
//!   without TCX: a filter outlives its process, a TCX link does not);
//! - removes the subscriber socket files, which live in directories only
//!   root may write.
//!
//! The helper is the mirror binary itself, started again with a hidden
//! subcommand (a fork of a multi-threaded process could not safely run
//! this code), and talks over a `SOCK_SEQPACKET` socket pair. When the
//! mirror ends — however it ends, SIGKILL included — the helper sees the
//! socket close, removes the filter and the socket files, and exits. It
//! ignores the terminal's and the service manager's stop signals, so that
//! the mirror, which receives them too, can detach in order first.

use std::{
    io::{self, IoSlice, IoSliceMut},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
        unix::{fs::FileTypeExt as _, fs::MetadataExt as _, process::CommandExt as _},
    },
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::Duration,
};

use nix::{
    cmsg_space,
    sys::{
        signal::{SigHandler, Signal, signal},
        socket::{
            AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
            recvmsg, sendmsg, setsockopt, socketpair, sockopt,
        },
    },
};
use serde::{Deserialize, Serialize};

use crate::{attach::clsact, server::UNIX_SEND_BUFFER};

/// The hidden subcommand that runs the helper.
pub const SUBCOMMAND: &str = "privileged-helper";
/// The helper's end of the socket pair, in the helper.
const HELPER_FD: RawFd = 3;
/// How long the mirror waits for an answer from the helper.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest message: the plan.
const MAX_MESSAGE: usize = 64 << 10;

/// The clsact filter the mirror attached (priority and handle identify it
/// among the interface's filters; the program id tells whether it is still
/// the mirror's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClsactFilter {
    pub ifindex: u32,
    pub priority: u16,
    pub handle: u32,
    pub program_id: u32,
}

/// A socket file the mirror bound: removed only while it is still that
/// inode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketFile {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
}

impl SocketFile {
    /// Removes the file if it is still the socket that was bound.
    pub fn remove(&self) -> io::Result<()> {
        let meta = std::fs::symlink_metadata(&self.path)?;
        if meta.file_type().is_socket() && meta.dev() == self.dev && meta.ino() == self.ino {
            std::fs::remove_file(&self.path)
        } else {
            Ok(())
        }
    }
}

/// What the helper cleans up when the mirror ends.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Plan {
    pub clsact: Option<ClsactFilter>,
    pub sockets: Vec<SocketFile>,
}

/// Requests, one byte each (a send-buffer request carries the socket as
/// SCM_RIGHTS and the size as 8 bytes).
const FORCE_SEND_BUFFER: u8 = b'B';
const DETACH: u8 = b'D';
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
        let plan = serde_json::to_vec(plan).map_err(io::Error::other)?;
        helper.ask(&plan, None)?;
        Ok(helper)
    }

    /// Sets `socket`'s send buffer to `bytes`, past the system's limit.
    pub fn force_send_buffer(&self, socket: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
        let mut message = vec![FORCE_SEND_BUFFER];
        message.extend_from_slice(&(bytes as u64).to_le_bytes());
        self.ask(&message, Some(socket))
    }

    /// Removes the clsact filter of the plan now (the mirror stops).
    pub fn detach_clsact(&self) -> io::Result<()> {
        self.ask(&[DETACH], None)
    }

    /// One request, one answer.
    fn ask(&self, message: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let socket = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        let fds: Vec<RawFd> = fd.iter().map(AsRawFd::as_raw_fd).collect();
        let control: Vec<ControlMessage<'_>> = if fds.is_empty() {
            Vec::new()
        } else {
            vec![ControlMessage::ScmRights(&fds)]
        };
        sendmsg::<()>(
            socket.as_raw_fd(),
            &[IoSlice::new(message)],
            &control,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
        let mut answer = [0u8; 512];
        let mut iov = [IoSliceMut::new(&mut answer)];
        let got = recvmsg::<()>(socket.as_raw_fd(), &mut iov, None, MsgFlags::empty())?.bytes;
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
        let socket = self.socket.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = nix::sys::socket::shutdown(socket.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
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
    keep_only_net_admin()?;
    serve_on(&socket)
}

/// Serves the mirror on `socket` until it goes away, then cleans up. Once
/// the plan is known the cleanup runs however the mirror ends, even when it
/// dies between a request and its answer (the answer then fails).
fn serve_on(socket: &OwnedFd) -> io::Result<()> {
    let mut buffer = vec![0u8; MAX_MESSAGE];
    let (plan_bytes, _) = receive(socket, &mut buffer)?;
    let mut plan: Plan = serde_json::from_slice(&buffer[..plan_bytes]).map_err(io::Error::other)?;
    if answer(socket, Ok(())).is_ok() {
        loop {
            let (len, fd) = match receive(socket, &mut buffer) {
                Ok((0, _)) | Err(_) => break,
                Ok(received) => received,
            };
            let result = handle(&buffer[..len], fd, &mut plan);
            if answer(socket, result).is_err() {
                break;
            }
        }
    }
    // The mirror ended (or closed the socket): clean up what is left.
    if let Some(filter) = plan.clsact.take() {
        match clsact::remove(filter) {
            Ok(()) => tracing::info!("removed the mirror's TC filter (the mirror has ended)"),
            Err(error) => tracing::debug!("the mirror's TC filter is gone already: {error}"),
        }
    }
    for file in &plan.sockets {
        if let Err(error) = file.remove()
            && error.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!("cannot remove {}: {error}", file.path.display());
        }
    }
    Ok(())
}

/// One request of the (unprivileged, so untrusted) mirror.
fn handle(message: &[u8], fd: Option<OwnedFd>, plan: &mut Plan) -> io::Result<()> {
    match (message, fd) {
        ([FORCE_SEND_BUFFER, size @ ..], Some(socket)) if size.len() == 8 => {
            let bytes = u64::from_le_bytes(size.try_into().expect("8 bytes"));
            force_send_buffer(&socket, bytes)
        }
        ([DETACH], None) => plan.clsact.take().map_or(Ok(()), clsact::remove),
        _ => Err(io::Error::other("unknown request")),
    }
}

/// SO_SNDBUFFORCE for what the mirror needs it for only: a local client's
/// stream socket, at most the size the server asks for. Any socket at any
/// size would let a compromised mirror pin kernel memory past every
/// limit.
fn force_send_buffer(socket: &OwnedFd, bytes: u64) -> io::Result<()> {
    if bytes > UNIX_SEND_BUFFER as u64 {
        return Err(io::Error::other(format!(
            "a send buffer of {bytes} bytes is more than the {UNIX_SEND_BUFFER} a client gets"
        )));
    }
    let sock = socket2::SockRef::from(socket);
    if sock.domain()? != socket2::Domain::UNIX || sock.r#type()? != socket2::Type::STREAM {
        return Err(io::Error::other("only a local client's socket is enlarged"));
    }
    setsockopt(socket, sockopt::SndBufForce, &(bytes as usize)).map_err(io::Error::from)
}

fn receive(socket: &OwnedFd, buffer: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = [IoSliceMut::new(buffer)];
    let mut space = cmsg_space!([RawFd; 1]);
    let message = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fd = None;
    for control in message.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = control {
            for raw in fds {
                // SAFETY: the kernel just installed this descriptor for us.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                fd.get_or_insert(owned);
            }
        }
    }
    Ok((message.bytes, fd))
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

/// Drops every capability but CAP_NET_ADMIN (when the helper has it), for
/// good: no capability can come back, even through an exec.
fn keep_only_net_admin() -> io::Result<()> {
    use caps::{CapSet, Capability};
    let error = |e: caps::errors::CapsError| io::Error::other(e.to_string());
    let mut keep = caps::CapsHashSet::new();
    if caps::has_cap(None, CapSet::Permitted, Capability::CAP_NET_ADMIN).map_err(error)? {
        keep.insert(Capability::CAP_NET_ADMIN);
    }
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).map_err(error)? {
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
    use super::*;

    fn send(socket: &OwnedFd, message: &[u8], fd: Option<RawFd>) {
        let fds: Vec<RawFd> = fd.into_iter().collect();
        let control: Vec<ControlMessage<'_>> = if fds.is_empty() {
            Vec::new()
        } else {
            vec![ControlMessage::ScmRights(&fds)]
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

    fn bound_socket(dir: &std::path::Path) -> (std::os::unix::net::UnixListener, SocketFile) {
        let path = dir.join("m.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let file = SocketFile {
            path,
            dev: meta.dev(),
            ino: meta.ino(),
        };
        (listener, file)
    }

    #[test]
    fn a_mirror_killed_mid_request_is_still_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        let (_listener, file) = bound_socket(dir.path());
        let client = std::os::unix::net::UnixStream::connect(&file.path).unwrap();
        let (mirror, helper) = pair();
        let plan = Plan {
            clsact: None,
            sockets: vec![file.clone()],
        };
        // The plan and a request, then the mirror is gone before any answer.
        send(&mirror, &serde_json::to_vec(&plan).unwrap(), None);
        let mut request = vec![FORCE_SEND_BUFFER];
        request.extend_from_slice(&(1u64 << 20).to_le_bytes());
        send(&mirror, &request, Some(client.as_raw_fd()));
        drop(mirror);
        serve_on(&helper).unwrap();
        assert!(!file.path.exists(), "the socket file is removed");
    }

    #[test]
    fn send_buffers_are_forced_only_for_local_clients_and_up_to_the_server_size() {
        let dir = tempfile::tempdir().unwrap();
        let (_listener, file) = bound_socket(dir.path());
        let client = std::os::unix::net::UnixStream::connect(&file.path).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut plan = Plan::default();
        let ask = |fd: BorrowedFd<'_>, bytes: u64, plan: &mut Plan| {
            let mut message = vec![FORCE_SEND_BUFFER];
            message.extend_from_slice(&bytes.to_le_bytes());
            handle(&message, Some(fd.try_clone_to_owned().unwrap()), plan)
        };
        ask(client.as_fd(), UNIX_SEND_BUFFER as u64, &mut plan).unwrap();
        assert!(socket2::SockRef::from(&client).send_buffer_size().unwrap() >= UNIX_SEND_BUFFER);
        assert!(
            ask(client.as_fd(), 1 << 30, &mut plan).is_err(),
            "larger than asked"
        );
        assert!(
            ask(tcp.as_fd(), 1 << 20, &mut plan).is_err(),
            "not a local client"
        );
        assert!(handle(&[DETACH, 0], None, &mut plan).is_err());
        assert!(handle(&[], None, &mut plan).is_err());
    }

    #[test]
    fn socket_files_are_removed_only_while_they_are_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let file = SocketFile {
            path: path.clone(),
            dev: meta.dev(),
            ino: meta.ino(),
        };
        drop(listener);
        // Replaced by a regular file: left alone.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"not a socket").unwrap();
        file.remove().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
        std::fs::remove_file(&path).unwrap();
        // Still ours: removed.
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let file = SocketFile {
            path: path.clone(),
            dev: meta.dev(),
            ino: meta.ino(),
        };
        file.remove().unwrap();
        assert!(!path.exists());
        drop(listener);
    }
}
