//! A subscriber session's socket. Frames are read through the length
//! codec; frames are written through an outbox of byte chunks sent with
//! vectored writes, so that a data frame's payload, shared by every
//! consumer, goes from the stream buffer straight into the kernel.
//!
//! Measured on a 2-core machine mirroring a 1 GB/s bulk stream to one
//! `mirror tail`: encoding each frame into a buffer and then into the
//! codec's buffer took two copies and a third of the mirror's CPU time.

use std::{collections::VecDeque, io, io::IoSlice};

use bytes::{Buf as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio_stream::StreamExt as _;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::server::protocol::ServerFrame;

/// A client's byte stream, over either kind of socket.
pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Connection for T {}

/// Slices handed to one `writev`.
const MAX_SLICES: usize = 64;

pub struct SessionWire {
    framed: Framed<Box<dyn Connection>, LengthDelimitedCodec>,
    /// Where frame heads (length prefix and fields) are encoded; chunks of
    /// it are split off into `queue`.
    heads: BytesMut,
    queue: VecDeque<Bytes>,
    queued_bytes: usize,
}

impl SessionWire {
    pub fn new(framed: Framed<Box<dyn Connection>, LengthDelimitedCodec>) -> Self {
        Self {
            framed,
            heads: BytesMut::with_capacity(4096),
            queue: VecDeque::new(),
            queued_bytes: 0,
        }
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
        self.queued_bytes
    }

    /// Queues `frame` behind the others.
    pub fn queue(&mut self, frame: &ServerFrame) {
        let payload = frame.encode_wire(&mut self.heads);
        let head = self.heads.split().freeze();
        self.queued_bytes += head.len();
        self.queue.push_back(head);
        if let Some(payload) = payload.filter(|p| !p.is_empty()) {
            self.queued_bytes += payload.len();
            self.queue.push_back(payload);
        }
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> io::Result<()> {
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
            ServerFrame::Event(StreamEvent::Data {
                dir: Default::default(),
                conn: 7,
                bytes: payload.clone(),
            }),
            ServerFrame::Event(StreamEvent::Closed {
                conn: 7,
                reason: CloseReason::Fin,
            }),
            ServerFrame::Event(StreamEvent::Data {
                dir: Default::default(),
                conn: 8,
                bytes: Bytes::new(),
            }),
        ];
        for f in &frames {
            wire.queue(f);
        }
        assert!(wire.queued_bytes() > 5000);
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
