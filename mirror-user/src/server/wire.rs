//! A subscriber session's socket. Frames are read through the length
//! codec; frames are written through an outbox of byte chunks sent with
//! vectored writes, so that a data frame's payload, shared by every
//! consumer, goes from the stream buffer straight into the kernel.
//!
//! Measured on a 2-core machine mirroring a 1 GB/s bulk stream to one
//! `mirror tail`: encoding each frame into a buffer and then into the
//! codec's buffer took two copies and a third of the mirror's CPU time.

use std::{
    collections::VecDeque,
    io,
    io::IoSlice,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use bytes::{Buf as _, Bytes, BytesMut};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, DuplexStream, Interest},
    net::{TcpStream, UnixStream},
};
use tokio_stream::StreamExt as _;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::server::protocol::{ServerFrame, VERSION};

/// A client's byte stream, over either kind of socket.
pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send {
    /// The Unix socket under it, over which descriptors can pass.
    fn unix(&self) -> Option<&UnixStream> {
        None
    }
}

impl Connection for UnixStream {
    fn unix(&self) -> Option<&UnixStream> {
        Some(self)
    }
}
impl Connection for TcpStream {}
impl Connection for DuplexStream {}

/// Slices handed to one `writev`.
const MAX_SLICES: usize = 64;

pub struct SessionWire {
    framed: Framed<Box<dyn Connection>, LengthDelimitedCodec>,
    /// Where frame heads (length prefix and fields) are encoded; chunks of
    /// it are split off into `queue` before a payload and when written, so
    /// that a run of frames without payload (references, opens, closes) is
    /// one slice of the `writev`.
    heads: BytesMut,
    queue: VecDeque<Bytes>,
    queued_bytes: usize,
    /// The protocol version of the session (its stream frames).
    version: u16,
}

impl SessionWire {
    pub fn new(framed: Framed<Box<dyn Connection>, LengthDelimitedCodec>) -> Self {
        Self {
            framed,
            heads: BytesMut::with_capacity(4096),
            queue: VecDeque::new(),
            queued_bytes: 0,
            version: VERSION,
        }
    }

    /// Frames are encoded for `version` from now on (the one the client
    /// said hello with).
    pub fn set_version(&mut self, version: u16) {
        self.version = version;
    }

    /// The next frame from the client.
    pub async fn next(&mut self) -> Option<io::Result<BytesMut>> {
        self.framed.next().await
    }

    /// The largest frame the client may send from now on.
    pub fn set_max_frame_length(&mut self, max: usize) {
        self.framed.codec_mut().set_max_frame_length(max);
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes + self.heads.len()
    }

    /// Queues `frame` behind the others.
    pub fn queue(&mut self, frame: &ServerFrame) {
        let payload = frame.encode_wire(self.version, &mut self.heads);
        if let Some(payload) = payload.filter(|p| !p.is_empty()) {
            self.split_heads();
            self.queued_bytes += payload.len();
            self.queue.push_back(payload);
        }
    }

    /// Moves the heads encoded so far into the queue.
    fn split_heads(&mut self) {
        if !self.heads.is_empty() {
            let heads = self.heads.split().freeze();
            self.queued_bytes += heads.len();
            self.queue.push_back(heads);
        }
    }

    /// Ends the server's side of the connection (the client reads what is
    /// left, then the end).
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.framed.get_mut().shutdown().await
    }

    /// Whether descriptors can be passed to the client (a Unix socket).
    pub fn is_unix(&self) -> bool {
        self.framed.get_ref().unix().is_some()
    }

    /// Writes everything queued, then `frame` with `fd` attached to its
    /// first byte (`SCM_RIGHTS`).
    pub async fn send_with_fd(
        &mut self,
        frame: &ServerFrame,
        fd: BorrowedFd<'_>,
    ) -> io::Result<()> {
        self.flush().await?;
        let mut bytes = BytesMut::new();
        let payload = frame.encode_wire(self.version, &mut bytes);
        debug_assert!(
            payload.is_none(),
            "a frame with a descriptor has no payload"
        );
        let io = self.framed.get_mut();
        let socket = io.unix().ok_or(io::ErrorKind::Unsupported)?;
        let fds = [fd.as_raw_fd()];
        let sent = socket
            .async_io(Interest::WRITABLE, || {
                sendmsg::<()>(
                    socket.as_raw_fd(),
                    &[IoSlice::new(&bytes)],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            })
            .await?;
        // The descriptor went with the first byte; the rest, if any, as
        // any bytes go.
        io.write_all(&bytes[sent..]).await?;
        io.flush().await
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        self.split_heads();
        let io = self.framed.get_mut();
        while !self.queue.is_empty() {
            let slices: Vec<IoSlice<'_>> = self
                .queue
                .iter()
                .take(MAX_SLICES)
                .map(|chunk| IoSlice::new(chunk))
                .collect();
            let mut written = io.write_vectored(&slices).await?;
            drop(slices);
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.queued_bytes -= written;
            while written > 0 {
                let front = self.queue.front_mut().expect("written bytes were queued");
                if written >= front.len() {
                    written -= front.len();
                    self.queue.pop_front();
                } else {
                    front.advance(written);
                    written = 0;
                }
            }
        }
        io.flush().await
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt as _;

    use super::*;
    use crate::{
        flow::model::{CloseReason, StreamEvent},
        server::protocol::frame,
    };

    #[tokio::test]
    async fn queued_frames_arrive_whole_and_in_order() {
        let (ours, mut theirs) = tokio::io::duplex(1 << 10);
        let mut wire = SessionWire::new(frame(Box::new(ours) as Box<dyn Connection>));
        let payload = Bytes::from((0..5000u32).map(|i| i as u8).collect::<Vec<u8>>());
        let frames = [
            ServerFrame::DataRef {
                conn: 6,
                dir: Default::default(),
                peer_acked: 0,
                offset: 1,
                len: 2,
            },
            ServerFrame::DataRef {
                conn: 6,
                dir: crate::flow::model::Direction::Server,
                peer_acked: 9,
                offset: 3,
                len: 4,
            },
            ServerFrame::Event(StreamEvent::Data {
                peer_acked: 0,
                dir: Default::default(),
                conn: 7,
                bytes: payload.clone(),
            }),
            ServerFrame::Event(StreamEvent::Closed {
                conn: 7,
                reason: CloseReason::Fin,
            }),
            ServerFrame::Event(StreamEvent::Data {
                peer_acked: 0,
                dir: Default::default(),
                conn: 8,
                bytes: Bytes::new(),
            }),
        ];
        for f in &frames {
            wire.queue(f);
        }
        assert!(wire.queued_bytes() > 5000);
        // The two references and the next head are one slice, the
        // payload another, the heads after it a third.
        wire.split_heads();
        assert_eq!(wire.queue.len(), 3);
        // The duplex holds 1 KiB: the flush needs many partial writes.
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            theirs.read_to_end(&mut all).await.map(|_| all)
        });
        wire.flush().await.unwrap();
        assert_eq!(wire.queued_bytes(), 0);
        drop(wire);
        let mut all = Bytes::from(reader.await.unwrap().unwrap());
        for expected in frames {
            let len = all.get_u32() as usize;
            let body = all.split_to(len);
            assert_eq!(ServerFrame::decode_shared(body), Ok(expected));
        }
        assert!(all.is_empty());
    }
}
