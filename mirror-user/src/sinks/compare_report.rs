//! `--compare-report FILE`: one JSON line per compared connection, written
//! by a thread of its own behind a bounded queue, so a slow or hung disk
//! (or a FIFO nobody reads) drops report lines (counted by the target that
//! made them) and never holds up a forwarder, nor the mirror's exit: the
//! thread is not the runtime's, which would wait for it.

use std::{
    fs::File,
    io::{self, BufWriter, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, SyncSender, sync_channel},
    },
};

use serde_json::{Map, Value};

use crate::{
    files::{OutputDir, OutputDirError, Owner, Special},
    flow::model::ConnId,
    sinks::compare::{Outcome, Verdict},
};

/// Lines queued for the writer; one line is at most about 600 bytes (two
/// escaped 32-byte snippets, addresses), so the queue holds a few MiB.
const REPORT_QUEUE: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum ReportOpenError {
    #[error(transparent)]
    Dir(#[from] OutputDirError),
    #[error(
        "{} exists: the comparison report is never written over a file; give a new name",
        .0.display()
    )]
    Exists(PathBuf),
    #[error(
        "{} belongs to another user (uid {uid}), who could read the report: remove it or give another name",
        .path.display()
    )]
    OtherOwner { path: PathBuf, uid: u32 },
    #[error("cannot create the comparison report {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Creates the report file as the capture files are created (through its
/// directory, `O_EXCL|O_NOFOLLOW`, mode 0600, given to `owner`); an
/// existing device or FIFO of root or this user (`/dev/null`, a pipe) is
/// written as it is.
pub fn open_report(path: &Path, owner: Option<Owner>) -> Result<File, ReportOpenError> {
    let io_error = |source| ReportOpenError::Io {
        path: path.to_path_buf(),
        source,
    };
    let (dir, name) = OutputDir::of_file(path)?;
    match dir.create_new(&name) {
        Ok((file, _)) => {
            OutputDir::give(&file, owner).map_err(io_error)?;
            Ok(file)
        }
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
            match dir.open_special(&name).map_err(io_error)? {
                Special::Open(file) => Ok(file),
                Special::OtherOwner(uid) => Err(ReportOpenError::OtherOwner {
                    path: path.to_path_buf(),
                    uid,
                }),
                Special::NotSpecial => Err(ReportOpenError::Exists(path.to_path_buf())),
            }
        }
        Err(error) => Err(io_error(error)),
    }
}

/// Where forwarders send their report lines; cloned for each.
#[derive(Debug, Clone)]
pub struct ReportSink {
    lines: SyncSender<Vec<u8>>,
    /// Set once writing failed: later lines are dropped here, counted.
    failed: Arc<AtomicBool>,
}

impl ReportSink {
    /// Queues one line; `false` (the line is dropped) when the queue is
    /// full or the writer has stopped or failed.
    pub fn send(&self, line: Vec<u8>) -> bool {
        !self.failed.load(Ordering::Relaxed) && self.lines.try_send(line).is_ok()
    }
}

/// Starts the writer; it ends once every [`ReportSink`] is dropped and the
/// lines queued before are written.
pub fn start(file: File) -> io::Result<(ReportSink, tokio::sync::oneshot::Receiver<()>)> {
    let (sender, lines) = sync_channel(REPORT_QUEUE);
    let failed = Arc::new(AtomicBool::new(false));
    let sink = ReportSink {
        lines: sender,
        failed: Arc::clone(&failed),
    };
    let (done_tx, done) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("mirror-report".into())
        .spawn(move || {
            write_lines(file, &lines, &failed);
            let _ = done_tx.send(());
        })?;
    Ok((sink, done))
}

fn write_lines(file: File, lines: &Receiver<Vec<u8>>, failed: &AtomicBool) {
    let mut out = BufWriter::new(file);
    while let Ok(first) = lines.recv() {
        if failed.load(Ordering::Relaxed) {
            continue;
        }
        // Whatever else is queued goes out with it; flushed once the queue
        // is empty, so a reader of the file sees each line soon after its
        // connection ended.
        let written = std::iter::once(first)
            .chain(std::iter::from_fn(|| lines.try_recv().ok()))
            .try_for_each(|line| out.write_all(&line))
            .and_then(|()| out.flush());
        if let Err(error) = written {
            tracing::warn!(
                "the comparison report stopped: {error}; its lines are dropped from now on"
            );
            failed.store(true, Ordering::Relaxed);
        }
    }
}

/// A compared connection's report line (ending in a newline).
pub fn line(
    conn: ConnId,
    src: SocketAddr,
    dst: SocketAddr,
    target: &str,
    outcome: &Outcome,
) -> Vec<u8> {
    let mut fields = Map::new();
    fields.insert("conn".into(), conn.into());
    fields.insert("src".into(), src.to_string().into());
    fields.insert("dst".into(), dst.to_string().into());
    fields.insert("target".into(), target.into());
    fields.insert("result".into(), outcome.verdict.result().into());
    if let Verdict::Differs { offset, .. } = &outcome.verdict {
        fields.insert("offset".into(), (*offset).into());
    }
    fields.insert("production_bytes".into(), outcome.production_bytes.into());
    fields.insert("shadow_bytes".into(), outcome.shadow_bytes.into());
    match &outcome.verdict {
        Verdict::Differs {
            production, shadow, ..
        } => {
            fields.insert("production".into(), escaped(production).into());
            fields.insert("shadow".into(), escaped(shadow).into());
        }
        Verdict::Incomplete(reason) => {
            fields.insert("reason".into(), reason.as_str().into());
        }
        Verdict::Same => {}
    }
    let mut line = serde_json::to_vec(&Value::Object(fields)).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Bytes as printable ASCII: `\r`, `\n`, `\t`, `\\`, `\'`, `\"` and `\xNN`
/// for the rest (Rust's `escape_ascii`).
pub fn escaped(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::compare::Incomplete;

    fn outcome(verdict: Verdict) -> Outcome {
        Outcome {
            verdict,
            production_bytes: 10,
            shadow_bytes: 12,
        }
    }

    fn parse(line: &[u8]) -> Value {
        assert_eq!(line.last(), Some(&b'\n'));
        serde_json::from_slice(line).unwrap()
    }

    #[test]
    fn lines_carry_what_each_result_needs() {
        let src: SocketAddr = "198.18.0.1:40000".parse().unwrap();
        let dst: SocketAddr = "198.18.0.2:6379".parse().unwrap();
        let same = parse(&line(
            3,
            src,
            dst,
            "198.18.1.2:6379",
            &outcome(Verdict::Same),
        ));
        assert_eq!(
            same,
            serde_json::json!({"conn": 3, "src": "198.18.0.1:40000", "dst": "198.18.0.2:6379",
                "target": "198.18.1.2:6379", "result": "same",
                "production_bytes": 10, "shadow_bytes": 12})
        );
        let differs = parse(&line(
            4,
            src,
            dst,
            "t",
            &outcome(Verdict::Differs {
                offset: 4,
                production: b"alpha\r\n".to_vec(),
                shadow: b"\x00\xff\"".to_vec(),
            }),
        ));
        assert_eq!(differs["result"], "differs");
        assert_eq!(differs["offset"], 4);
        assert_eq!(differs["production"], "alpha\\r\\n");
        assert_eq!(differs["shadow"], "\\x00\\xff\\\"");
        assert!(differs.get("reason").is_none());
        let incomplete = parse(&line(
            5,
            src,
            dst,
            "t",
            &outcome(Verdict::Incomplete(Incomplete::Budget)),
        ));
        assert_eq!(incomplete["result"], "incomplete");
        assert_eq!(incomplete["reason"], "budget");
        assert!(incomplete.get("offset").is_none());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_writer_writes_every_line_and_ends_with_its_sinks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.jsonl");
        let file = open_report(&path, None).unwrap();
        assert!(
            matches!(open_report(&path, None), Err(ReportOpenError::Exists(_))),
            "never over an existing file"
        );
        let (sink, writer) = start(file).unwrap();
        let other = sink.clone();
        assert!(sink.send(b"{\"a\":1}\n".to_vec()));
        assert!(other.send(b"{\"a\":2}\n".to_vec()));
        drop((sink, other));
        writer.await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"a\":2}\n"
        );
    }

    #[test]
    fn a_full_queue_drops_lines_instead_of_waiting() {
        let (sender, lines) = sync_channel(2);
        let failed = Arc::new(AtomicBool::new(false));
        let sink = ReportSink {
            lines: sender,
            failed: Arc::clone(&failed),
        };
        assert!(sink.send(vec![1]));
        assert!(sink.send(vec![2]));
        assert!(!sink.send(vec![3]), "full: dropped");
        let _ = lines.recv();
        failed.store(true, Ordering::Relaxed);
        assert!(!sink.send(vec![4]), "writing failed: dropped");
        failed.store(false, Ordering::Relaxed);
        drop(lines);
        assert!(!sink.send(vec![5]), "the writer stopped: dropped");
    }
}
