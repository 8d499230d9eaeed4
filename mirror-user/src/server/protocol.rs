//! The subscriber protocol (version 3, and version 2 for older clients),
//! specified in `docs/protocol.md`:
//! length-prefixed frames (a 4-byte big-endian length, then the frame),
//! each a type byte and a body of big-endian fields.
//!
//! Framing is tokio-util's `LengthDelimitedCodec`; this module encodes and
//! decodes frame bodies. Decoding never panics: any byte string is either a
//! frame or a [`ProtocolError`].
//!
//! Over TCP the hello is a mutual challenge-response on the token
//! ([`server_proof`], [`client_proof`]): the token never crosses the wire,
//! and each side proves it knows the token before the other answers.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::{
    control::ports::PortInfo,
    flow::model::{CloseReason, Direction, StreamEvent},
};

/// The protocol version this build speaks. Version 1 sent the token in
/// its `Hello`; version 2 proves it with [`client_proof`] instead; version
/// 3 carries both directions of a connection (its stream frames say which
/// direction, and where the other stood) and the interface of a
/// connection.
pub const VERSION: u16 = 3;
/// The oldest version this build still speaks, as server and client: a
/// version 2 session gets version 2's stream frames, and the client's
/// bytes only.
pub const OLDEST_VERSION: u16 = 2;

/// Whether this build speaks `version`.
pub const fn speaks(version: u16) -> bool {
    version >= OLDEST_VERSION && version <= VERSION
}
/// Largest frame (after the length prefix) either side accepts.
pub const MAX_FRAME: usize = 1 << 20;
/// Longest `str` field (client or server name) a frame may carry.
pub const MAX_NAME: usize = 1024;
/// Longest token, in bytes, on both sides: a token file holding a longer
/// one is refused (never cut: a cut token would be another secret than the
/// one the user gave).
pub const MAX_TOKEN: usize = 256;
/// Bytes of a nonce: a [`Hello`](ClientFrame::Hello)'s and a
/// [`Challenge`](ServerFrame::Challenge)'s.
pub const NONCE_LEN: usize = 32;
/// Bytes of a proof: HMAC-SHA256's output.
pub const PROOF_LEN: usize = 32;
/// Largest frame a client may send before its welcome (the longest
/// `Hello`; an `Auth` is shorter), so that a connection that has not proved
/// its token holds little memory.
pub const MAX_HELLO_FRAME: usize = 1 + 2 + (2 + MAX_NAME) + NONCE_LEN;
/// Longest client name the server keeps, in bytes; a longer one is cut at
/// a character boundary (the name is a label for people, not an identity).
pub const MAX_CLIENT_NAME: usize = 64;

/// A random value that makes one hello unlike every other.
pub type Nonce = [u8; NONCE_LEN];
/// What shows that a side knows the token.
pub type Proof = [u8; PROOF_LEN];

/// A frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// First frame of every session.
    Hello {
        version: u16,
        name: String,
        /// Fresh for each connection: the server's proof must cover it.
        nonce: Nonce,
    },
    /// Answer to a [`ServerFrame::Challenge`], once the server's proof
    /// passed: [`client_proof`].
    Auth {
        proof: Proof,
    },
    Subscribe {
        ports: Vec<u16>,
    },
    Unsubscribe {
        ports: Vec<u16>,
    },
    Stats,
    ListPorts,
    AddPort {
        port: u16,
    },
    RemovePort {
        port: u16,
    },
    /// Asks for the payload arena (Unix sockets only): answered
    /// [`ServerFrame::Arena`] with the memfd attached, or a non-fatal
    /// `ERROR(9)`, after which data keeps coming as bytes.
    MapArena,
    /// Returns the oldest `count` [`ServerFrame::DataRef`]s not yet
    /// returned: the client is done with their bytes.
    Credit {
        count: u32,
    },
}

/// A frame the server sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// Reply to a `Hello` on a TCP listener: the server's nonce and its
    /// [`server_proof`].
    Challenge { nonce: Nonce, proof: Proof },
    /// Reply to a good `Hello` (Unix socket) or `Auth` (TCP).
    Welcome { version: u16, server: String },
    /// A stream event of a subscribed port: `Opened`, `Data` and `Closed`
    /// frames on the wire.
    Event(StreamEvent),
    /// Reply to a request that succeeded (subscribe, unsubscribe, add, remove).
    Ok,
    /// Reply to `Stats`: every counter, as a JSON document.
    Stats { json: String },
    /// Reply to `ListPorts`.
    Ports { ports: Vec<PortInfo> },
    /// Reply to a request that failed; `fatal` errors end the session.
    Error {
        code: ErrorCode,
        fatal: bool,
        message: String,
    },
    /// Reply to `MapArena`: the arena's size, and how many referenced
    /// bytes the client may hold unreturned before its connections are
    /// closed as lagged; the memfd travels with the frame's first byte
    /// (`SCM_RIGHTS`).
    Arena { size: u64, share: u64 },
    /// Data of a connection, as `len` bytes at `offset` in the arena; the
    /// client returns it with a `Credit`. `dir` and `peer_acked` as in
    /// [`StreamEvent::Data`].
    DataRef {
        conn: u64,
        dir: Direction,
        peer_acked: u64,
        offset: u64,
        len: u32,
    },
}

/// Why a request or session failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The frame could not be decoded, or came out of turn.
    BadFrame,
    UnsupportedVersion,
    BadToken,
    PortNotAllowed,
    TooManyPorts,
    TooManyClients,
    /// The session stopped reading for longer than its budget.
    TooSlow,
    Internal,
    /// The arena is not offered here (a TCP listener, or a mirror without
    /// one): data comes as bytes.
    NoArena,
    /// A code this build does not know (from a newer peer).
    Other(u16),
}

impl ErrorCode {
    pub const fn to_u16(self) -> u16 {
        match self {
            Self::BadFrame => 1,
            Self::UnsupportedVersion => 2,
            Self::BadToken => 3,
            Self::PortNotAllowed => 4,
            Self::TooManyPorts => 5,
            Self::TooManyClients => 6,
            Self::TooSlow => 7,
            Self::Internal => 8,
            Self::NoArena => 9,
            Self::Other(code) => code,
        }
    }

    pub const fn from_u16(code: u16) -> Self {
        match code {
            1 => Self::BadFrame,
            2 => Self::UnsupportedVersion,
            3 => Self::BadToken,
            4 => Self::PortNotAllowed,
            5 => Self::TooManyPorts,
            6 => Self::TooManyClients,
            7 => Self::TooSlow,
            8 => Self::Internal,
            9 => Self::NoArena,
            other => Self::Other(other),
        }
    }
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("empty frame")]
    Empty,
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("frame 0x{kind:02x} ends before its {field}")]
    Truncated { kind: u8, field: &'static str },
    #[error("frame 0x{kind:02x} has {extra} bytes after its last field")]
    Trailing { kind: u8, extra: usize },
    #[error("frame 0x{kind:02x}: {field} is not UTF-8")]
    NotUtf8 { kind: u8, field: &'static str },
    #[error("frame 0x{kind:02x}: {field} is {len} bytes long, at most {max} allowed")]
    TooLong {
        kind: u8,
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("frame 0x{kind:02x}: invalid {field} {value}")]
    Invalid {
        kind: u8,
        field: &'static str,
        value: u64,
    },
}

mod kind {
    pub const HELLO: u8 = 0x01;
    pub const SUBSCRIBE: u8 = 0x02;
    pub const UNSUBSCRIBE: u8 = 0x03;
    pub const STATS: u8 = 0x04;
    pub const LIST_PORTS: u8 = 0x05;
    pub const ADD_PORT: u8 = 0x06;
    pub const REMOVE_PORT: u8 = 0x07;
    pub const AUTH: u8 = 0x08;
    pub const MAP_ARENA: u8 = 0x09;
    pub const CREDIT: u8 = 0x0a;

    pub const WELCOME: u8 = 0x81;
    /// Version 2's stream frames, without direction and interface.
    pub const OPENED_V2: u8 = 0x82;
    pub const DATA_V2: u8 = 0x83;
    pub const CLOSED: u8 = 0x84;
    pub const OK: u8 = 0x85;
    pub const STATS_REPLY: u8 = 0x86;
    pub const PORTS: u8 = 0x87;
    pub const ERROR: u8 = 0x88;
    pub const CHALLENGE: u8 = 0x89;
    pub const ARENA: u8 = 0x8a;
    pub const DATA_REF_V2: u8 = 0x8b;
    /// Version 3's: new types rather than new layouts of the old ones, so
    /// that a frame's meaning never depends on the session's version.
    pub const OPENED: u8 = 0x8c;
    pub const DATA: u8 = 0x8d;
    pub const DATA_REF: u8 = 0x8e;
}

/// Bytes of a version 3 `DATA` frame before its payload: type, `conn`,
/// `dir`, `peer_acked`.
const DATA_HEAD: usize = 1 + 8 + 1 + 8;
/// The same for version 2: type, `conn`.
const DATA_V2_HEAD: usize = 1 + 8;

const fn dir_code(dir: Direction) -> u8 {
    match dir {
        Direction::Client => 0,
        Direction::Server => 1,
    }
}

const REASON_CODES: [(CloseReason, u8); 7] = [
    (CloseReason::Fin, 0),
    (CloseReason::Rst, 1),
    (CloseReason::Idle, 2),
    (CloseReason::Gap, 3),
    (CloseReason::Lagged, 4),
    (CloseReason::Evicted, 5),
    (CloseReason::Shutdown, 6),
];

impl ClientFrame {
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Self::Hello {
                version,
                name,
                nonce,
            } => {
                out.put_u8(kind::HELLO);
                out.put_u16(*version);
                put_str(out, name);
                out.put_slice(nonce);
            }
            Self::Auth { proof } => {
                out.put_u8(kind::AUTH);
                out.put_slice(proof);
            }
            Self::Subscribe { ports } | Self::Unsubscribe { ports } => {
                let kind = if matches!(self, Self::Subscribe { .. }) {
                    kind::SUBSCRIBE
                } else {
                    kind::UNSUBSCRIBE
                };
                out.put_u8(kind);
                out.put_u16(ports.len() as u16);
                for port in ports {
                    out.put_u16(*port);
                }
            }
            Self::Stats => out.put_u8(kind::STATS),
            Self::ListPorts => out.put_u8(kind::LIST_PORTS),
            Self::AddPort { port } => {
                out.put_u8(kind::ADD_PORT);
                out.put_u16(*port);
            }
            Self::RemovePort { port } => {
                out.put_u8(kind::REMOVE_PORT);
                out.put_u16(*port);
            }
            Self::MapArena => out.put_u8(kind::MAP_ARENA),
            Self::Credit { count } => {
                out.put_u8(kind::CREDIT);
                out.put_u32(*count);
            }
        }
    }

    pub fn decode(frame: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(frame)?;
        let decoded = match r.kind {
            kind::HELLO => Self::Hello {
                version: r.u16("version")?,
                name: r.str("name")?,
                nonce: r.array("nonce")?,
            },
            kind::AUTH => Self::Auth {
                proof: r.array("proof")?,
            },
            kind::SUBSCRIBE => Self::Subscribe { ports: r.ports()? },
            kind::UNSUBSCRIBE => Self::Unsubscribe { ports: r.ports()? },
            kind::STATS => Self::Stats,
            kind::LIST_PORTS => Self::ListPorts,
            kind::ADD_PORT => Self::AddPort {
                port: r.u16("port")?,
            },
            kind::REMOVE_PORT => Self::RemovePort {
                port: r.u16("port")?,
            },
            kind::MAP_ARENA => Self::MapArena,
            kind::CREDIT => Self::Credit {
                count: r.u32("count")?,
            },
            other => return Err(ProtocolError::UnknownType(other)),
        };
        r.finish()?;
        Ok(decoded)
    }
}

impl ServerFrame {
    /// The frame as it goes on the wire to a session of `version`, length
    /// prefix included, in two parts: everything up to the payload is
    /// appended to `head`; a `Data` frame's payload is returned, to be
    /// written right after it as it is (shared with every other consumer,
    /// never copied here).
    pub fn encode_wire(&self, version: u16, head: &mut BytesMut) -> Option<Bytes> {
        if let Self::Event(StreamEvent::Data {
            conn,
            dir,
            bytes,
            peer_acked,
        }) = self
        {
            if version >= 3 {
                head.put_u32((DATA_HEAD + bytes.len()) as u32);
                head.put_u8(kind::DATA);
                head.put_u64(*conn);
                head.put_u8(dir_code(*dir));
                head.put_u64(*peer_acked);
            } else {
                head.put_u32((DATA_V2_HEAD + bytes.len()) as u32);
                head.put_u8(kind::DATA_V2);
                head.put_u64(*conn);
            }
            return Some(bytes.clone());
        }
        let start = head.len();
        head.put_u32(0);
        self.encode_for(version, head);
        let len = (head.len() - start - 4) as u32;
        head[start..start + 4].copy_from_slice(&len.to_be_bytes());
        None
    }

    /// Like [`Self::decode`], but a `Data` frame's payload is a slice of
    /// `frame`, not a copy.
    pub fn decode_shared(frame: Bytes) -> Result<Self, ProtocolError> {
        match frame.first() {
            Some(&kind::DATA) if frame.len() >= DATA_HEAD => Ok(Self::Event(StreamEvent::Data {
                conn: u64::from_be_bytes(frame[1..9].try_into().expect("8 bytes")),
                dir: decode_dir(kind::DATA, frame[9])?,
                peer_acked: u64::from_be_bytes(frame[10..18].try_into().expect("8 bytes")),
                bytes: frame.slice(DATA_HEAD..),
            })),
            Some(&kind::DATA_V2) if frame.len() >= DATA_V2_HEAD => {
                Ok(Self::Event(StreamEvent::Data {
                    peer_acked: 0,
                    conn: u64::from_be_bytes(frame[1..9].try_into().expect("8 bytes")),
                    dir: Direction::Client,
                    bytes: frame.slice(DATA_V2_HEAD..),
                }))
            }
            _ => Self::decode(&frame),
        }
    }

    /// The frame's type and body in this build's version.
    pub fn encode(&self, out: &mut BytesMut) {
        self.encode_for(VERSION, out);
    }

    /// The frame's type and body for a session of `version`: version 2
    /// has its own stream frames (a session of version 2 receives the
    /// client's bytes only).
    pub fn encode_for(&self, version: u16, out: &mut BytesMut) {
        match self {
            Self::Challenge { nonce, proof } => {
                out.put_u8(kind::CHALLENGE);
                out.put_slice(nonce);
                out.put_slice(proof);
            }
            Self::Welcome { version, server } => {
                out.put_u8(kind::WELCOME);
                out.put_u16(*version);
                put_str(out, server);
            }
            Self::Event(StreamEvent::Opened {
                iface,
                conn,
                src,
                dst,
                midstream,
            }) => {
                out.put_u8(if version >= 3 {
                    kind::OPENED
                } else {
                    kind::OPENED_V2
                });
                out.put_u64(*conn);
                put_addr(out, src);
                put_addr(out, dst);
                out.put_u8(u8::from(*midstream));
                if version >= 3 {
                    put_str(out, iface);
                }
            }
            Self::Event(StreamEvent::Data {
                conn,
                dir,
                bytes,
                peer_acked,
            }) => {
                if version >= 3 {
                    out.put_u8(kind::DATA);
                    out.put_u64(*conn);
                    out.put_u8(dir_code(*dir));
                    out.put_u64(*peer_acked);
                } else {
                    out.put_u8(kind::DATA_V2);
                    out.put_u64(*conn);
                }
                out.put_slice(bytes);
            }
            Self::Event(StreamEvent::Closed { conn, reason }) => {
                out.put_u8(kind::CLOSED);
                out.put_u64(*conn);
                out.put_u8(reason_code(*reason));
            }
            Self::Ok => out.put_u8(kind::OK),
            Self::Stats { json } => {
                out.put_u8(kind::STATS_REPLY);
                out.put_slice(json.as_bytes());
            }
            Self::Ports { ports } => {
                out.put_u8(kind::PORTS);
                out.put_u16(ports.len() as u16);
                for info in ports {
                    out.put_u16(info.port);
                    out.put_u8(u8::from(info.command_line) | (u8::from(info.added) << 1));
                    out.put_u32(info.subscribers);
                }
            }
            Self::Error {
                code,
                fatal,
                message,
            } => {
                out.put_u8(kind::ERROR);
                out.put_u16(code.to_u16());
                out.put_u8(u8::from(*fatal));
                out.put_slice(message.as_bytes());
            }
            Self::Arena { size, share } => {
                out.put_u8(kind::ARENA);
                out.put_u64(*size);
                out.put_u64(*share);
            }
            Self::DataRef {
                conn,
                dir,
                peer_acked,
                offset,
                len,
            } => {
                if version >= 3 {
                    out.put_u8(kind::DATA_REF);
                    out.put_u64(*conn);
                    out.put_u8(dir_code(*dir));
                    out.put_u64(*peer_acked);
                } else {
                    out.put_u8(kind::DATA_REF_V2);
                    out.put_u64(*conn);
                }
                out.put_u64(*offset);
                out.put_u32(*len);
            }
        }
    }

    pub fn decode(frame: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(frame)?;
        let decoded = match r.kind {
            kind::CHALLENGE => Self::Challenge {
                nonce: r.array("nonce")?,
                proof: r.array("proof")?,
            },
            kind::WELCOME => Self::Welcome {
                version: r.u16("version")?,
                server: r.str("server")?,
            },
            kind::OPENED | kind::OPENED_V2 => Self::Event(StreamEvent::Opened {
                conn: r.u64("conn")?,
                src: r.addr("src")?,
                dst: r.addr("dst")?,
                midstream: r.flag("midstream")?,
                iface: if r.kind == kind::OPENED {
                    r.str("iface")?.into()
                } else {
                    Default::default()
                },
            }),
            kind::DATA => Self::Event(StreamEvent::Data {
                conn: r.u64("conn")?,
                dir: r.dir()?,
                peer_acked: r.u64("peer_acked")?,
                bytes: Bytes::copy_from_slice(r.rest()),
            }),
            kind::DATA_V2 => Self::Event(StreamEvent::Data {
                peer_acked: 0,
                conn: r.u64("conn")?,
                dir: Direction::Client,
                bytes: Bytes::copy_from_slice(r.rest()),
            }),
            kind::CLOSED => Self::Event(StreamEvent::Closed {
                conn: r.u64("conn")?,
                reason: {
                    let code = r.u8("reason")?;
                    REASON_CODES
                        .iter()
                        .find(|(_, c)| *c == code)
                        .map(|(reason, _)| *reason)
                        .ok_or(ProtocolError::Invalid {
                            kind: kind::CLOSED,
                            field: "reason",
                            value: code.into(),
                        })?
                },
            }),
            kind::OK => Self::Ok,
            kind::STATS_REPLY => Self::Stats {
                json: r.rest_str("json")?,
            },
            kind::PORTS => {
                let count = r.u16("count")?;
                let mut ports = Vec::with_capacity(usize::from(count).min(r.remaining() / 7));
                for _ in 0..count {
                    let port = r.u16("port")?;
                    let flags = r.u8("flags")?;
                    ports.push(PortInfo {
                        port,
                        command_line: flags & 1 != 0,
                        added: flags & 2 != 0,
                        subscribers: r.u32("subscribers")?,
                    });
                }
                Self::Ports { ports }
            }
            kind::ERROR => Self::Error {
                code: ErrorCode::from_u16(r.u16("code")?),
                fatal: r.flag("fatal")?,
                message: r.rest_str("message")?,
            },
            kind::ARENA => Self::Arena {
                size: r.u64("size")?,
                share: r.u64("share")?,
            },
            kind::DATA_REF => Self::DataRef {
                conn: r.u64("conn")?,
                dir: r.dir()?,
                peer_acked: r.u64("peer_acked")?,
                offset: r.u64("offset")?,
                len: r.u32("len")?,
            },
            kind::DATA_REF_V2 => Self::DataRef {
                conn: r.u64("conn")?,
                dir: Direction::Client,
                peer_acked: 0,
                offset: r.u64("offset")?,
                len: r.u32("len")?,
            },
            other => return Err(ProtocolError::UnknownType(other)),
        };
        r.finish()?;
        Ok(decoded)
    }
}

/// The version a `Hello` frame announces, read before the rest of it: the
/// one field every version's `Hello` begins with, so that a peer of
/// another version is told so rather than that its frame is malformed.
pub fn hello_version(frame: &[u8]) -> Option<u16> {
    match frame {
        [kind::HELLO, high, low, ..] => Some(u16::from_be_bytes([*high, *low])),
        _ => None,
    }
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// What the server's proof starts with; the client's starts with
/// [`CLIENT_PROOF_LABEL`]. Distinct labels (of one length, before
/// fixed-length nonces) make a proof of one side useless as the other's: a
/// server never computes anything a client would send.
pub const SERVER_PROOF_LABEL: &[u8] = b"mirror server";
/// See [`SERVER_PROOF_LABEL`].
pub const CLIENT_PROOF_LABEL: &[u8] = b"mirror client";

fn mac(token: &[u8], label: &[u8], first: &Nonce, second: &Nonce) -> HmacSha256 {
    use hmac::{KeyInit as _, Mac as _};
    let mut mac = HmacSha256::new_from_slice(token).expect("HMAC takes keys of any length");
    mac.update(label);
    mac.update(first);
    mac.update(second);
    mac
}

/// The server's proof that it knows `token`:
/// HMAC-SHA256(token, "mirror server" || client nonce || server nonce).
pub fn server_proof(token: &[u8], client_nonce: &Nonce, server_nonce: &Nonce) -> Proof {
    use hmac::Mac as _;
    let mac = mac(token, SERVER_PROOF_LABEL, client_nonce, server_nonce);
    mac.finalize().into_bytes().into()
}

/// The client's proof that it knows `token`:
/// HMAC-SHA256(token, "mirror client" || server nonce || client nonce).
pub fn client_proof(token: &[u8], server_nonce: &Nonce, client_nonce: &Nonce) -> Proof {
    use hmac::Mac as _;
    let mac = mac(token, CLIENT_PROOF_LABEL, server_nonce, client_nonce);
    mac.finalize().into_bytes().into()
}

/// Whether `proof` is [`server_proof`], compared in constant time.
pub fn server_proof_holds(
    token: &[u8],
    client_nonce: &Nonce,
    server_nonce: &Nonce,
    proof: &Proof,
) -> bool {
    use hmac::Mac as _;
    mac(token, SERVER_PROOF_LABEL, client_nonce, server_nonce)
        .verify_slice(proof)
        .is_ok()
}

/// Whether `proof` is [`client_proof`], compared in constant time.
pub fn client_proof_holds(
    token: &[u8],
    server_nonce: &Nonce,
    client_nonce: &Nonce,
    proof: &Proof,
) -> bool {
    use hmac::Mac as _;
    mac(token, CLIENT_PROOF_LABEL, server_nonce, client_nonce)
        .verify_slice(proof)
        .is_ok()
}

/// A fresh nonce from the operating system's random source.
pub fn new_nonce() -> std::io::Result<Nonce> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(std::io::Error::other)?;
    Ok(nonce)
}

fn decode_dir(kind: u8, code: u8) -> Result<Direction, ProtocolError> {
    match code {
        0 => Ok(Direction::Client),
        1 => Ok(Direction::Server),
        other => Err(ProtocolError::Invalid {
            kind,
            field: "dir",
            value: other.into(),
        }),
    }
}

fn reason_code(reason: CloseReason) -> u8 {
    REASON_CODES
        .iter()
        .find(|(r, _)| *r == reason)
        .map_or(u8::MAX, |(_, code)| *code)
}

fn put_str(out: &mut BytesMut, text: &str) {
    // Cut at a character boundary: a cut inside one is not UTF-8, and the
    // peer would refuse the whole frame.
    let bytes = cut(text, MAX_NAME).as_bytes();
    out.put_u16(bytes.len() as u16);
    out.put_slice(bytes);
}

/// The longest prefix of `text` of at most `max` bytes that ends at a
/// character boundary.
pub fn cut(text: &str, max: usize) -> &str {
    &text[..text.floor_char_boundary(max)]
}

/// A client's name as the server keeps it: at most [`MAX_CLIENT_NAME`]
/// bytes, cut at a character boundary.
pub fn client_name(name: &str) -> &str {
    cut(name, MAX_CLIENT_NAME)
}

fn put_addr(out: &mut BytesMut, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.put_u8(4);
            out.put_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.put_u8(6);
            out.put_slice(&ip.octets());
        }
    }
    out.put_u16(addr.port());
}

/// Bounds-checked reading of a frame body.
struct Reader<'a> {
    kind: u8,
    body: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(frame: &'a [u8]) -> Result<Self, ProtocolError> {
        let (kind, body) = frame.split_first().ok_or(ProtocolError::Empty)?;
        Ok(Self { kind: *kind, body })
    }

    fn remaining(&self) -> usize {
        self.body.len()
    }

    fn take(&mut self, len: usize, field: &'static str) -> Result<&'a [u8], ProtocolError> {
        if self.body.len() < len {
            return Err(ProtocolError::Truncated {
                kind: self.kind,
                field,
            });
        }
        let (head, rest) = self.body.split_at(len);
        self.body = rest;
        Ok(head)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, ProtocolError> {
        Ok(self.take(1, field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, ProtocolError> {
        Ok(self.take(2, field)?.get_u16())
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, ProtocolError> {
        Ok(self.take(4, field)?.get_u32())
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, ProtocolError> {
        Ok(self.take(8, field)?.get_u64())
    }

    fn dir(&mut self) -> Result<Direction, ProtocolError> {
        let code = self.u8("dir")?;
        decode_dir(self.kind, code)
    }

    fn flag(&mut self, field: &'static str) -> Result<bool, ProtocolError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(ProtocolError::Invalid {
                kind: self.kind,
                field,
                value: other.into(),
            }),
        }
    }

    fn str(&mut self, field: &'static str) -> Result<String, ProtocolError> {
        let len = usize::from(self.u16(field)?);
        if len > MAX_NAME {
            return Err(ProtocolError::TooLong {
                kind: self.kind,
                field,
                len,
                max: MAX_NAME,
            });
        }
        let bytes = self.take(len, field)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| ProtocolError::NotUtf8 {
            kind: self.kind,
            field,
        })
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], ProtocolError> {
        Ok(self.take(N, field)?.try_into().expect("N bytes taken"))
    }

    fn ports(&mut self) -> Result<Vec<u16>, ProtocolError> {
        let count = usize::from(self.u16("count")?);
        let bytes = self.take(count * 2, "ports")?;
        Ok(bytes
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect())
    }

    fn addr(&mut self, field: &'static str) -> Result<SocketAddr, ProtocolError> {
        let ip = match self.u8(field)? {
            4 => {
                let b = self.take(4, field)?;
                IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            }
            6 => {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(self.take(16, field)?);
                IpAddr::V6(Ipv6Addr::from(octets))
            }
            other => {
                return Err(ProtocolError::Invalid {
                    kind: self.kind,
                    field,
                    value: other.into(),
                });
            }
        };
        Ok(SocketAddr::new(ip, self.u16(field)?))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.body)
    }

    fn rest_str(&mut self, field: &'static str) -> Result<String, ProtocolError> {
        let kind = self.kind;
        String::from_utf8(self.rest().to_vec()).map_err(|_| ProtocolError::NotUtf8 { kind, field })
    }

    fn finish(self) -> Result<(), ProtocolError> {
        if self.body.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::Trailing {
                kind: self.kind,
                extra: self.body.len(),
            })
        }
    }
}

pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .big_endian()
        .length_field_length(4)
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// Frames a client connection (the client library uses the same codec).
pub fn frame<C: AsyncRead + AsyncWrite>(connection: C) -> Framed<C, LengthDelimitedCodec> {
    // A large read buffer: a burst of 64 KiB data frames comes in in few
    // system calls.
    Framed::with_capacity(connection, codec(), FRAME_BUFFER)
}

/// The client's read buffer, and the bytes a session's queued frames may
/// gather before it writes them.
pub const FRAME_BUFFER: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{
        fanout::counters::{
            ConsumerSnapshot, HubSnapshot, MAX_LISTED_CONSUMERS, MAX_LISTED_PORTS, PastSessions,
            PortSnapshot,
        },
        telemetry::registry::{Document, Registry, Stage},
        text::printable,
    };

    fn client_round_trip(frame: ClientFrame) {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf);
        assert_eq!(ClientFrame::decode(&buf), Ok(frame));
    }

    fn server_round_trip(frame: ServerFrame) {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf);
        assert_eq!(ServerFrame::decode(&buf), Ok(frame.clone()));
        assert_eq!(
            ServerFrame::decode_shared(buf.clone().freeze()),
            Ok(frame.clone())
        );
        // On the wire: the 4-byte big-endian length, then the same bytes,
        // whether or not the payload travels apart.
        let mut wire = BytesMut::from(&b"before"[..]);
        let payload = frame.encode_wire(VERSION, &mut wire);
        wire.extend_from_slice(&payload.unwrap_or_default());
        assert_eq!(&wire[..6], b"before");
        assert_eq!(wire[6..10], (buf.len() as u32).to_be_bytes());
        assert_eq!(&wire[10..], &buf[..]);
    }

    /// `frame` as a version 2 session gets it: `expected` in its body
    /// bytes, and on the wire.
    fn version_2_bytes(frame: &ServerFrame, expected: &[u8]) -> ServerFrame {
        let mut buf = BytesMut::new();
        frame.encode_for(2, &mut buf);
        assert_eq!(&buf[..], expected, "{frame:?}");
        let mut wire = BytesMut::new();
        let payload = frame.encode_wire(2, &mut wire);
        wire.extend_from_slice(&payload.unwrap_or_default());
        assert_eq!(wire[..4], (buf.len() as u32).to_be_bytes());
        assert_eq!(&wire[4..], &buf[..]);
        let decoded = ServerFrame::decode(&buf).expect("a version 2 frame decodes");
        assert_eq!(
            ServerFrame::decode_shared(buf.freeze()),
            Ok(decoded.clone())
        );
        decoded
    }

    /// A version 2 session gets exactly the frames of version 2 (the
    /// bytes pinned here are those of the release that introduced it), and
    /// a client of this release reads them as the client's bytes.
    #[test]
    fn version_2_sessions_get_version_2_frames() {
        let conn = 0x0102_0304_0506_0708;
        let opened = ServerFrame::Event(StreamEvent::Opened {
            iface: "eth0".into(),
            conn,
            src: "127.0.0.1:40000".parse().unwrap(),
            dst: "127.0.0.1:80".parse().unwrap(),
            midstream: true,
        });
        let mut expected = vec![0x82, 1, 2, 3, 4, 5, 6, 7, 8];
        expected.extend_from_slice(&[4, 127, 0, 0, 1, 0x9c, 0x40, 4, 127, 0, 0, 1, 0, 80, 1]);
        let ServerFrame::Event(StreamEvent::Opened { iface, .. }) =
            version_2_bytes(&opened, &expected)
        else {
            panic!("an opened frame");
        };
        assert!(iface.is_empty(), "version 2 carries no interface");
        let data = ServerFrame::Event(StreamEvent::Data {
            conn,
            dir: Direction::Client,
            bytes: Bytes::from_static(b"GET /"),
            peer_acked: 77,
        });
        let mut expected = vec![0x83, 1, 2, 3, 4, 5, 6, 7, 8];
        expected.extend_from_slice(b"GET /");
        assert_eq!(
            version_2_bytes(&data, &expected),
            ServerFrame::Event(StreamEvent::Data {
                conn,
                dir: Direction::Client,
                bytes: Bytes::from_static(b"GET /"),
                peer_acked: 0,
            })
        );
        let reference = ServerFrame::DataRef {
            conn,
            dir: Direction::Client,
            peer_acked: 77,
            offset: 9,
            len: 5,
        };
        let mut expected = vec![0x8b, 1, 2, 3, 4, 5, 6, 7, 8];
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 5]);
        assert_eq!(
            version_2_bytes(&reference, &expected),
            ServerFrame::DataRef {
                conn,
                dir: Direction::Client,
                peer_acked: 0,
                offset: 9,
                len: 5,
            }
        );
        // Everything else is the same in both versions.
        let closed = ServerFrame::Event(StreamEvent::Closed {
            conn,
            reason: CloseReason::Gap,
        });
        let mut current = BytesMut::new();
        closed.encode(&mut current);
        version_2_bytes(&closed, &current);
    }

    /// Version 3's stream frames: the direction and the other direction's
    /// acknowledged offset before the payload, the interface after the
    /// addresses; a direction other than 0 or 1 is malformed.
    #[test]
    fn version_3_frames_carry_direction_and_interface() {
        let data = ServerFrame::Event(StreamEvent::Data {
            conn: 2,
            dir: Direction::Server,
            bytes: Bytes::from_static(b"ok"),
            peer_acked: 0x1122_3344_5566_7788,
        });
        let mut buf = BytesMut::new();
        data.encode(&mut buf);
        let mut expected = vec![0x8d, 0, 0, 0, 0, 0, 0, 0, 2, 1];
        expected.extend_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
        expected.extend_from_slice(b"ok");
        assert_eq!(&buf[..], &expected[..]);
        buf[9] = 2;
        let invalid = Err(ProtocolError::Invalid {
            kind: 0x8d,
            field: "dir",
            value: 2,
        });
        assert_eq!(ServerFrame::decode(&buf), invalid);
        assert_eq!(ServerFrame::decode_shared(buf.freeze()), invalid);
        let mut reference = BytesMut::new();
        ServerFrame::DataRef {
            conn: 2,
            dir: Direction::Server,
            peer_acked: 3,
            offset: 4,
            len: 5,
        }
        .encode(&mut reference);
        assert_eq!(reference[0], 0x8e);
        assert_eq!(reference[9], 1);
        assert_eq!(reference.len(), 1 + 8 + 1 + 8 + 8 + 4);
        reference[9] = 7;
        assert!(matches!(
            ServerFrame::decode(&reference),
            Err(ProtocolError::Invalid { field: "dir", .. })
        ));
        let mut opened = BytesMut::new();
        ServerFrame::Event(StreamEvent::Opened {
            iface: "ns1:veth0".into(),
            conn: 2,
            src: "127.0.0.1:40000".parse().unwrap(),
            dst: "127.0.0.1:80".parse().unwrap(),
            midstream: false,
        })
        .encode(&mut opened);
        assert_eq!(opened[0], 0x8c);
        assert!(opened.ends_with(b"\x00\x09ns1:veth0"));
        // A truncated interface is malformed, not an empty one.
        assert!(matches!(
            ServerFrame::decode(&opened[..opened.len() - 1]),
            Err(ProtocolError::Truncated { field: "iface", .. })
        ));
        assert!(speaks(2) && speaks(3) && !speaks(1) && !speaks(4));
    }

    #[test]
    fn every_client_frame_round_trips() {
        client_round_trip(ClientFrame::Hello {
            version: VERSION,
            name: "tail é".into(),
            nonce: [0xa5; NONCE_LEN],
        });
        client_round_trip(ClientFrame::Auth {
            proof: std::array::from_fn(|i| i as u8),
        });
        client_round_trip(ClientFrame::Subscribe {
            ports: vec![80, 443, 65535],
        });
        client_round_trip(ClientFrame::Unsubscribe { ports: vec![] });
        client_round_trip(ClientFrame::Stats);
        client_round_trip(ClientFrame::ListPorts);
        client_round_trip(ClientFrame::AddPort { port: 8080 });
        client_round_trip(ClientFrame::RemovePort { port: 1 });
        client_round_trip(ClientFrame::MapArena);
        client_round_trip(ClientFrame::Credit { count: u32::MAX });
    }

    #[test]
    fn every_server_frame_round_trips() {
        server_round_trip(ServerFrame::Challenge {
            nonce: std::array::from_fn(|i| i as u8),
            proof: [0xff; PROOF_LEN],
        });
        server_round_trip(ServerFrame::Welcome {
            version: VERSION,
            server: "mirror on eth0".into(),
        });
        server_round_trip(ServerFrame::Event(StreamEvent::Opened {
            iface: Default::default(),
            conn: u64::MAX,
            src: "198.18.0.1:40000".parse().unwrap(),
            dst: "[2001:db8::1]:443".parse().unwrap(),
            midstream: true,
        }));
        server_round_trip(ServerFrame::Event(StreamEvent::Opened {
            iface: "netns-a:eth0 é".into(),
            conn: 1,
            src: "198.18.0.1:40000".parse().unwrap(),
            dst: "198.18.0.2:443".parse().unwrap(),
            midstream: false,
        }));
        server_round_trip(ServerFrame::Event(StreamEvent::Data {
            peer_acked: 0,
            dir: Default::default(),
            conn: 7,
            bytes: Bytes::from_static(b"\x00GET / HTTP/1.1\r\n"),
        }));
        server_round_trip(ServerFrame::Event(StreamEvent::Data {
            peer_acked: u64::MAX,
            dir: Direction::Server,
            conn: 7,
            bytes: Bytes::from_static(b"HTTP/1.1 200 OK\r\n"),
        }));
        server_round_trip(ServerFrame::Event(StreamEvent::Data {
            peer_acked: 0,
            dir: Default::default(),
            conn: 7,
            bytes: Bytes::new(),
        }));
        for reason in CloseReason::ALL {
            server_round_trip(ServerFrame::Event(StreamEvent::Closed { conn: 3, reason }));
        }
        server_round_trip(ServerFrame::Ok);
        server_round_trip(ServerFrame::Arena {
            size: 256 << 20,
            share: 64 << 20,
        });
        server_round_trip(ServerFrame::DataRef {
            conn: 9,
            dir: Direction::Client,
            peer_acked: 0,
            offset: (1 << 20) + 5,
            len: 65_483,
        });
        server_round_trip(ServerFrame::DataRef {
            conn: 9,
            dir: Direction::Server,
            peer_acked: 12_345,
            offset: 0,
            len: 1,
        });
        server_round_trip(ServerFrame::Stats {
            json: r#"{"kind":"counters"}"#.into(),
        });
        server_round_trip(ServerFrame::Ports {
            ports: vec![
                PortInfo {
                    port: 80,
                    command_line: true,
                    added: false,
                    subscribers: 2,
                },
                PortInfo {
                    port: 81,
                    command_line: false,
                    added: true,
                    subscribers: 0,
                },
            ],
        });
        for code in [
            ErrorCode::BadFrame,
            ErrorCode::UnsupportedVersion,
            ErrorCode::BadToken,
            ErrorCode::PortNotAllowed,
            ErrorCode::TooManyPorts,
            ErrorCode::TooManyClients,
            ErrorCode::TooSlow,
            ErrorCode::Internal,
            ErrorCode::NoArena,
            ErrorCode::Other(999),
        ] {
            server_round_trip(ServerFrame::Error {
                code,
                fatal: true,
                message: "port 22 is not in --allow-ports".into(),
            });
        }
    }

    #[test]
    fn malformed_frames_are_errors() {
        assert_eq!(ClientFrame::decode(&[]), Err(ProtocolError::Empty));
        assert_eq!(
            ClientFrame::decode(&[0x7f]),
            Err(ProtocolError::UnknownType(0x7f))
        );
        assert!(matches!(
            ClientFrame::decode(&[kind::ADD_PORT, 0]),
            Err(ProtocolError::Truncated { .. })
        ));
        assert!(matches!(
            ClientFrame::decode(&[kind::STATS, 0]),
            Err(ProtocolError::Trailing { extra: 1, .. })
        ));
        assert!(matches!(
            ClientFrame::decode(&[kind::HELLO, 0, 1, 0, 1, 0xff, 0, 0]),
            Err(ProtocolError::NotUtf8 { .. })
        ));
        assert!(matches!(
            ServerFrame::decode(&[kind::CLOSED, 0, 0, 0, 0, 0, 0, 0, 1, 9]),
            Err(ProtocolError::Invalid {
                field: "reason",
                ..
            })
        ));
        // Fixed-length fields: one byte short, one byte over.
        let mut auth = vec![kind::AUTH];
        auth.extend_from_slice(&[0; PROOF_LEN - 1]);
        assert!(matches!(
            ClientFrame::decode(&auth),
            Err(ProtocolError::Truncated { field: "proof", .. })
        ));
        auth.extend_from_slice(&[0, 0]);
        assert!(matches!(
            ClientFrame::decode(&auth),
            Err(ProtocolError::Trailing { extra: 1, .. })
        ));
        assert!(matches!(
            ClientFrame::decode(&[kind::HELLO, 0, 2, 0, 1, b'n', 7, 7]),
            Err(ProtocolError::Truncated { field: "nonce", .. })
        ));
        // A count that claims more ports than the frame holds.
        assert!(matches!(
            ClientFrame::decode(&[kind::SUBSCRIBE, 0xff, 0xff, 0, 80]),
            Err(ProtocolError::Truncated { .. })
        ));
    }

    /// However many ports and sessions the mirror has seen, the counters
    /// document fits in a STATS frame, says what it left out, and keeps the
    /// in-process consumers and the busiest ports.
    #[test]
    fn the_document_is_bounded() {
        let ports: Vec<PortSnapshot> = (1..=u16::MAX)
            .map(|port| PortSnapshot {
                port,
                connections: u64::MAX,
                bytes: if port == 7 { u64::MAX } else { u64::from(port) },
                batches: u64::MAX,
            })
            .collect();
        // The worst name: 64 bytes of control characters, each escaped.
        let worst = printable(&"\u{1}".repeat(MAX_CLIENT_NAME)).into_owned();
        let snapshot = |name: String, client: Option<String>| ConsumerSnapshot {
            name,
            client,
            events: u64::MAX,
            bytes: u64::MAX,
            lags: u64::MAX,
            lagged_connections: u64::MAX,
        };
        let mut consumers = vec![snapshot("print".into(), None)];
        consumers.extend(
            (0..20_000u64)
                .map(|id| snapshot(format!("client-{}", u64::MAX - id), Some(worst.clone()))),
        );
        struct Worst(HubSnapshot);
        impl Stage for Worst {
            type Snapshot = HubSnapshot;
            fn snapshot(&self) -> HubSnapshot {
                self.0.clone()
            }
        }
        let past = PastSessions {
            sessions: 1_000_000,
            ..PastSessions::default()
        };
        let mut registry = Registry::new();
        registry.register_sections(std::sync::Arc::new(Worst(HubSnapshot::listed(
            ports, consumers, past,
        ))));
        let summary = registry.document();
        let json = summary.to_json();
        let document = json.to_string();
        assert!(document.len() < MAX_FRAME / 4, "{} bytes", document.len());
        assert_eq!(json["ports"].as_array().unwrap().len(), MAX_LISTED_PORTS);
        assert_eq!(
            json["truncated"]["ports"],
            usize::from(u16::MAX) - MAX_LISTED_PORTS
        );
        assert_eq!(
            json["consumers"].as_array().unwrap().len(),
            MAX_LISTED_CONSUMERS + 1
        );
        assert_eq!(
            json["truncated"]["consumers"],
            20_001 - MAX_LISTED_CONSUMERS
        );
        let flat = Document::from_json(&json).flatten();
        assert_eq!(flat["consumers.past_sessions.sessions"], 1_000_000);
        assert!(flat.contains_key("consumers.print.events"));
        assert!(
            flat.contains_key("ports.7.bytes"),
            "the busiest port is listed"
        );
        assert!(flat.contains_key("ports.65535.bytes"));
        assert!(!flat.contains_key("ports.1.bytes"), "the quietest is not");
        assert!(flat.keys().all(|key| key.chars().all(|c| !c.is_control())));
        let text = summary.to_string();
        assert_eq!(
            text.lines().filter(|l| l.starts_with("port ")).count(),
            MAX_LISTED_PORTS
        );
        assert!(
            text.contains("consumer past_sessions: sessions=1000000 "),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "truncated: ports={} consumers={}",
                usize::from(u16::MAX) - MAX_LISTED_PORTS,
                20_001 - MAX_LISTED_CONSUMERS,
            )),
            "{text}"
        );
    }

    /// The example in docs/protocol.md, frame by frame, length included:
    /// the hello exchange computed here from the documented token and
    /// nonces.
    #[test]
    fn the_documented_example_is_exact() {
        fn framed(body: &BytesMut) -> String {
            let mut out = format!("{:08x}", body.len());
            for byte in body.iter() {
                out.push_str(&format!("{byte:02x}"));
            }
            out
        }
        fn client(frame: ClientFrame) -> String {
            let mut buf = BytesMut::new();
            frame.encode(&mut buf);
            framed(&buf)
        }
        fn server(frame: ServerFrame) -> String {
            let mut buf = BytesMut::new();
            frame.encode(&mut buf);
            framed(&buf)
        }
        let doc = include_str!("../../../docs/protocol.md");
        let example = &doc[doc.find("## Example").expect("an example section")..];
        let blocks: Vec<&str> = example.split("```").collect();
        let (example, local) = (blocks[1], blocks[3]);
        // A frame starts at `client: ` or `server: `; a line indented as
        // deep whose next character is a hex digit continues it. Hex
        // columns run up to the description, two spaces after them.
        let hex_columns = |line: &str| line.split("  ").next().unwrap_or_default().replace(' ', "");
        let frames = |block: &str| {
            let mut documented: Vec<String> = Vec::new();
            for line in block.lines() {
                if let Some(frame) = line
                    .strip_prefix("client: ")
                    .or_else(|| line.strip_prefix("server: "))
                {
                    documented.push(hex_columns(frame));
                } else if let Some(more) = line.strip_prefix("        ")
                    && more.starts_with(|c: char| c.is_ascii_hexdigit())
                {
                    documented
                        .last_mut()
                        .expect("a continuation follows a frame")
                        .push_str(&hex_columns(more));
                }
            }
            documented
        };
        let documented = frames(example);
        let token = b"token";
        let client_nonce: Nonce = std::array::from_fn(|i| i as u8);
        let server_nonce: Nonce = std::array::from_fn(|i| 0x20 + i as u8);
        let conn = 1;
        let src: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let dst: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let expected = [
            client(ClientFrame::Hello {
                version: 3,
                name: "test".into(),
                nonce: client_nonce,
            }),
            server(ServerFrame::Challenge {
                nonce: server_nonce,
                proof: server_proof(token, &client_nonce, &server_nonce),
            }),
            client(ClientFrame::Auth {
                proof: client_proof(token, &server_nonce, &client_nonce),
            }),
            server(ServerFrame::Welcome {
                version: 3,
                server: "mirror 0.1.0 on lo".into(),
            }),
            client(ClientFrame::Subscribe { ports: vec![80] }),
            server(ServerFrame::Ok),
            server(ServerFrame::Event(StreamEvent::Opened {
                iface: "lo".into(),
                conn,
                src,
                dst,
                midstream: false,
            })),
            server(ServerFrame::Event(StreamEvent::Data {
                peer_acked: 0,
                dir: Direction::Client,
                conn,
                bytes: Bytes::from_static(b"GET /"),
            })),
            server(ServerFrame::Event(StreamEvent::Data {
                peer_acked: 5,
                dir: Direction::Server,
                conn,
                bytes: Bytes::from_static(b"HTTP/"),
            })),
            server(ServerFrame::Event(StreamEvent::Closed {
                conn,
                reason: CloseReason::Fin,
            })),
        ];
        assert_eq!(documented.len(), expected.len(), "{documented:?}");
        for (doc_hex, code_hex) in documented.iter().zip(&expected) {
            assert!(
                code_hex.starts_with(doc_hex.as_str()) && !doc_hex.is_empty(),
                "{doc_hex} vs {code_hex}"
            );
            assert_eq!(doc_hex, code_hex);
        }
        assert_eq!(VERSION, 3, "the example shows version 3");
        // The same session over a Unix socket, with the arena.
        let opened = StreamEvent::Opened {
            iface: "lo".into(),
            conn,
            src,
            dst,
            midstream: false,
        };
        let expected = [
            client(ClientFrame::MapArena),
            server(ServerFrame::Arena {
                size: 256 << 20,
                share: 64 << 20,
            }),
            client(ClientFrame::Subscribe { ports: vec![80] }),
            server(ServerFrame::Ok),
            server(ServerFrame::Event(opened)),
            server(ServerFrame::DataRef {
                conn,
                dir: Direction::Client,
                peer_acked: 0,
                offset: 0,
                len: 5,
            }),
            client(ClientFrame::Credit { count: 1 }),
            server(ServerFrame::Event(StreamEvent::Closed {
                conn,
                reason: CloseReason::Fin,
            })),
        ];
        assert_eq!(frames(local), expected, "the example with the arena");
    }

    #[test]
    fn proofs_cover_the_token_both_nonces_and_the_side() {
        let token = b"s3cret";
        let a: Nonce = [1; NONCE_LEN];
        let b: Nonce = [2; NONCE_LEN];
        let server = server_proof(token, &a, &b);
        let client = client_proof(token, &b, &a);
        assert!(server_proof_holds(token, &a, &b, &server));
        assert!(client_proof_holds(token, &b, &a, &client));
        // Another token, another connection's nonce, the nonces swapped.
        assert!(!server_proof_holds(b"s3creT", &a, &b, &server));
        assert!(!server_proof_holds(token, &[3; NONCE_LEN], &b, &server));
        assert!(!server_proof_holds(token, &a, &[3; NONCE_LEN], &server));
        assert!(!server_proof_holds(token, &b, &a, &server));
        assert!(!client_proof_holds(token, &a, &b, &client));
        // A server's proof is never a client's, even for equal nonces (a
        // client that sends the server's nonce back as its own).
        assert_ne!(server, client);
        assert!(!client_proof_holds(
            token,
            &b,
            &a,
            &server_proof(token, &a, &b)
        ));
        assert!(!client_proof_holds(
            token,
            &a,
            &a,
            &server_proof(token, &a, &a)
        ));
        assert!(!server_proof_holds(
            token,
            &a,
            &a,
            &client_proof(token, &a, &a)
        ));
        // Every bit counts.
        for byte in 0..PROOF_LEN {
            let mut flipped = client;
            flipped[byte] ^= 0x80;
            assert!(!client_proof_holds(token, &b, &a, &flipped), "{byte}");
        }
        // Nonces are fresh.
        assert_ne!(new_nonce().unwrap(), new_nonce().unwrap());
    }

    #[test]
    fn the_version_of_a_hello_is_read_before_its_body() {
        // A version 1 hello (version, token, name) is no version 2 hello,
        // but its version is still read.
        let v1 = [kind::HELLO, 0, 1, 0, 1, b't', 0, 1, b'n'];
        assert!(ClientFrame::decode(&v1).is_err());
        assert_eq!(hello_version(&v1), Some(1));
        assert_eq!(hello_version(&[kind::HELLO, 0xff, 0xfe]), Some(0xfffe));
        assert_eq!(hello_version(&[kind::HELLO, 0]), None);
        assert_eq!(hello_version(&[kind::AUTH, 0, 2]), None);
        assert_eq!(hello_version(&[]), None);
    }

    #[test]
    fn long_strings_are_cut_at_a_character_boundary() {
        // 1023 bytes of ASCII, then a two-byte character that would end
        // past MAX_NAME: cut before it, so the frame stays UTF-8.
        let name = format!("{}é", "x".repeat(MAX_NAME - 1));
        let mut buf = BytesMut::new();
        ClientFrame::Hello {
            version: VERSION,
            name: name.clone(),
            nonce: [0; NONCE_LEN],
        }
        .encode(&mut buf);
        let Ok(ClientFrame::Hello { name: sent, .. }) = ClientFrame::decode(&buf) else {
            panic!("the frame decodes");
        };
        assert_eq!(sent, name[..MAX_NAME - 1]);
        assert_eq!(client_name("short"), "short");
        let long = "é".repeat(MAX_CLIENT_NAME);
        assert_eq!(client_name(&long), "é".repeat(MAX_CLIENT_NAME / 2));
        assert_eq!(client_name(&format!("x{long}")).len(), MAX_CLIENT_NAME - 1);
    }

    proptest! {
        /// Arbitrary bytes never panic the decoders.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = ClientFrame::decode(&bytes);
            let _ = ServerFrame::decode(&bytes);
        }

        /// Valid frames with bytes flipped either decode or fail cleanly,
        /// and whatever decodes encodes back to the same bytes.
        #[test]
        fn mutated_frames_decode_or_fail(port in any::<u16>(), at in any::<usize>(), bit in 0u8..8) {
            let mut buf = BytesMut::new();
            ClientFrame::Hello { version: VERSION, name: format!("n{port}"), nonce: [at as u8; NONCE_LEN] }.encode(&mut buf);
            let i = at % buf.len();
            buf[i] ^= 1 << bit;
            if let Ok(frame) = ClientFrame::decode(&buf) {
                let mut again = BytesMut::new();
                frame.encode(&mut again);
                prop_assert_eq!(&again[..], &buf[..]);
            }
        }
    }
}
