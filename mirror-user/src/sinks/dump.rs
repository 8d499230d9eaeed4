//! `--dump-dir DIR`: each connection's client-to-server bytes in a file of
//! its own, named as tcpflow names them, with a sidecar that says how the
//! connection ended.
//!
//! A file only ever holds bytes that were delivered in order. Its sidecar
//! `NAME.meta` (JSON) gives the reason: anything but `fin` means the stream
//! in the file is a prefix of what the client sent (`gap`, `lagged`, ...).

use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    net::{IpAddr, SocketAddr},
    num::NonZeroUsize,
    path::{Path, PathBuf},
};

use lru::LruCache;
use serde::Serialize;

use crate::{
    hub::Subscription,
    stream::{CloseReason, ConnId, StreamEvent},
};

/// Files kept open at once; others are reopened to append when data comes.
const OPEN_FILES: usize = 256;

/// tcpflow's name for a flow: `198.018.000.001.40000-198.018.000.002.00080`
/// (IPv4 octets and ports zero-padded; IPv6 as eight 4-digit groups).
pub fn tcpflow_name(src: SocketAddr, dst: SocketAddr) -> String {
    fn end(addr: SocketAddr) -> String {
        let ip = match addr.ip() {
            IpAddr::V4(v4) => v4
                .octets()
                .iter()
                .map(|o| format!("{o:03}"))
                .collect::<Vec<_>>()
                .join("."),
            IpAddr::V6(v6) => v6
                .segments()
                .iter()
                .map(|s| format!("{s:04x}"))
                .collect::<Vec<_>>()
                .join(":"),
        };
        format!("{ip}.{:05}", addr.port())
    }
    format!("{}-{}", end(src), end(dst))
}

/// What the sidecar of a connection says.
#[derive(Debug, Serialize)]
struct Meta<'a> {
    conn: ConnId,
    src: String,
    dst: String,
    midstream: bool,
    bytes: u64,
    reason: &'a str,
    /// Whether the file holds the whole client stream.
    complete: bool,
}

struct Flow {
    path: PathBuf,
    src: SocketAddr,
    dst: SocketAddr,
    midstream: bool,
    bytes: u64,
}

/// Writes the events of one subscription into a directory.
pub struct DumpWriter {
    dir: PathBuf,
    flows: HashMap<ConnId, Flow>,
    open: LruCache<ConnId, File>,
}

impl DumpWriter {
    /// Creates `dir` if needed.
    pub fn new(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            flows: HashMap::new(),
            open: LruCache::new(NonZeroUsize::new(OPEN_FILES).expect("non-zero")),
        })
    }

    pub fn handle(&mut self, event: &StreamEvent) -> io::Result<()> {
        match event {
            StreamEvent::Opened {
                conn,
                src,
                dst,
                midstream,
            } => {
                let path = self.unused_path(&tcpflow_name(*src, *dst));
                let file = File::create(&path)?;
                self.open.put(*conn, file);
                self.flows.insert(
                    *conn,
                    Flow {
                        path,
                        src: *src,
                        dst: *dst,
                        midstream: *midstream,
                        bytes: 0,
                    },
                );
            }
            StreamEvent::Data { conn, bytes } => {
                let Some(flow) = self.flows.get_mut(conn) else {
                    return Ok(());
                };
                if self.open.get(conn).is_none() {
                    let file = OpenOptions::new().append(true).open(&flow.path)?;
                    self.open.put(*conn, file);
                }
                if let Some(file) = self.open.get_mut(conn) {
                    file.write_all(bytes)?;
                }
                flow.bytes += bytes.len() as u64;
            }
            StreamEvent::Closed { conn, reason } => {
                self.open.pop(conn);
                if let Some(flow) = self.flows.remove(conn) {
                    write_meta(*conn, &flow, *reason)?;
                }
            }
        }
        Ok(())
    }

    /// tcpflow's convention when a 4-tuple is reused: `NAMEc1`, `NAMEc2`, ...
    fn unused_path(&self, name: &str) -> PathBuf {
        let first = self.dir.join(name);
        if !first.exists() {
            return first;
        }
        (1..)
            .map(|n| self.dir.join(format!("{name}c{n}")))
            .find(|path| !path.exists())
            .expect("some suffix is free")
    }
}

fn write_meta(conn: ConnId, flow: &Flow, reason: CloseReason) -> io::Result<()> {
    let meta = Meta {
        conn,
        src: flow.src.to_string(),
        dst: flow.dst.to_string(),
        midstream: flow.midstream,
        bytes: flow.bytes,
        reason: reason.as_str(),
        complete: reason.is_complete() && !flow.midstream,
    };
    let mut path = flow.path.clone().into_os_string();
    path.push(".meta");
    let mut json = serde_json::to_vec(&meta).map_err(io::Error::other)?;
    json.push(b'\n');
    fs::write(path, json)
}

/// Writes every event of `subscription` into `dir` until the mirror stops.
/// A slow disk makes this consumer lag (its connections end as `lagged`);
/// it never slows the mirror.
pub async fn dump_events(mut subscription: Subscription, dir: PathBuf) -> io::Result<()> {
    let mut writer = DumpWriter::new(&dir)?;
    let mut batch = Vec::new();
    while let Some(event) = subscription.next().await {
        batch.push(event);
        while subscription.queued() > 0 {
            if let Some(event) = subscription.next().await {
                batch.push(event);
            }
        }
        // File writes block: let the runtime move other tasks elsewhere.
        tokio::task::block_in_place(|| batch.drain(..).try_for_each(|e| writer.handle(&e)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn names_follow_tcpflow() {
        assert_eq!(
            tcpflow_name(
                "198.18.0.1:40000".parse().unwrap(),
                "198.18.0.2:80".parse().unwrap()
            ),
            "198.018.000.001.40000-198.018.000.002.00080"
        );
        assert_eq!(
            tcpflow_name(
                "[2001:db8::1]:1".parse().unwrap(),
                "[::1]:80".parse().unwrap()
            ),
            "2001:0db8:0000:0000:0000:0000:0000:0001.00001-0000:0000:0000:0000:0000:0000:0000:0001.00080"
        );
    }

    #[test]
    fn writes_streams_and_sidecars() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = DumpWriter::new(dir.path()).unwrap();
        let src: SocketAddr = "198.18.0.1:40000".parse().unwrap();
        let dst: SocketAddr = "198.18.0.2:80".parse().unwrap();
        let events = [
            StreamEvent::Opened {
                conn: 1,
                src,
                dst,
                midstream: false,
            },
            StreamEvent::Data {
                conn: 1,
                bytes: Bytes::from_static(b"hello "),
            },
            StreamEvent::Opened {
                conn: 2,
                src,
                dst,
                midstream: true,
            },
            StreamEvent::Data {
                conn: 1,
                bytes: Bytes::from_static(b"world"),
            },
            StreamEvent::Data {
                conn: 2,
                bytes: Bytes::from_static(b"tail"),
            },
            StreamEvent::Closed {
                conn: 1,
                reason: CloseReason::Fin,
            },
            StreamEvent::Closed {
                conn: 2,
                reason: CloseReason::Gap,
            },
        ];
        for event in &events {
            writer.handle(event).unwrap();
        }
        let name = tcpflow_name(src, dst);
        assert_eq!(fs::read(dir.path().join(&name)).unwrap(), b"hello world");
        assert_eq!(
            fs::read(dir.path().join(format!("{name}c1"))).unwrap(),
            b"tail"
        );
        let meta: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join(format!("{name}.meta"))).unwrap())
                .unwrap();
        assert_eq!(meta["reason"], "fin");
        assert_eq!(meta["complete"], true);
        assert_eq!(meta["bytes"], 11);
        let meta: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join(format!("{name}c1.meta"))).unwrap())
                .unwrap();
        assert_eq!(meta["reason"], "gap");
        assert_eq!(meta["complete"], false);
    }

    #[test]
    fn more_connections_than_open_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = DumpWriter::new(dir.path()).unwrap();
        let dst: SocketAddr = "198.18.0.2:80".parse().unwrap();
        let count = OPEN_FILES as u64 + 10;
        for conn in 0..count {
            let src = SocketAddr::from(([198, 18, 0, 1], 10000 + conn as u16));
            writer
                .handle(&StreamEvent::Opened {
                    conn,
                    src,
                    dst,
                    midstream: false,
                })
                .unwrap();
        }
        for conn in 0..count {
            writer
                .handle(&StreamEvent::Data {
                    conn,
                    bytes: Bytes::from_static(b"ab"),
                })
                .unwrap();
            writer
                .handle(&StreamEvent::Data {
                    conn,
                    bytes: Bytes::from_static(b"cd"),
                })
                .unwrap();
        }
        let src = SocketAddr::from(([198, 18, 0, 1], 10000));
        assert_eq!(
            fs::read(dir.path().join(tcpflow_name(src, dst))).unwrap(),
            b"abcd"
        );
        assert!(writer.open.len() <= OPEN_FILES);
    }
}
