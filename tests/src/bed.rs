//! The test bed of one test: a client and a server in network namespaces,
//! and a scratch directory. Everything goes when it is dropped, also when
//! the test panics; processes the test started are stopped first, by
//! their own guards (declared after the bed, so dropped before it).

use std::{
    fmt::Display,
    fs,
    path::{Path, PathBuf},
};

use serde_json::Value;
use tempfile::TempDir;

use crate::{
    mirror_process::MirrorProcess,
    netns::{KillOnDrop, TestNet, attached_programs, shows_attachment},
    traffic::{
        SentFile, dumped, finish_sending, random_files, send_all, start_sending, start_server,
    },
};

/// Prefix of every scratch directory of the tests (in the system's
/// temporary directory, `mirror-test-<pid>-<random>`), so that anything
/// left behind is easy to find.
pub const SCRATCH_PREFIX: &str = "mirror-test-";

pub struct TestBed {
    /// Where the clients run.
    pub client: String,
    /// Where the servers and the mirror run.
    pub server: String,
    /// The server's interface, which the mirror watches.
    pub iface: &'static str,
    /// The client's address, as the server sees it.
    pub client_ip: &'static str,
    /// The server's address, as the client reaches it.
    pub server_ip: &'static str,
    dir: TempDir,
    net: TestNet,
}

impl TestBed {
    pub const CLIENT_IP: &'static str = "198.18.0.1";
    pub const SERVER_IP: &'static str = "198.18.0.2";
    /// The host [`Self::add_shadow`] adds behind the server.
    pub const SHADOW_IP: &'static str = "198.18.1.2";

    /// A client (`cli0`, 198.18.0.1/24) and a server (`srv0`,
    /// 198.18.0.2/24) namespace joined by a veth pair, default offloads on.
    pub fn new() -> Self {
        let mut net = TestNet::new();
        let client = net.namespace("cli");
        let server = net.namespace("srv");
        net.veth(
            (&client, "cli0", "198.18.0.1/24"),
            (&server, "srv0", "198.18.0.2/24"),
        );
        Self {
            client,
            server,
            iface: "srv0",
            client_ip: Self::CLIENT_IP,
            server_ip: Self::SERVER_IP,
            dir: scratch_dir(),
            net,
        }
    }

    /// Client and server in one namespace, over its loopback.
    pub fn loopback() -> Self {
        let mut net = TestNet::new();
        let host = net.namespace("host");
        Self {
            client: host.clone(),
            server: host,
            iface: "lo",
            client_ip: "127.0.0.1",
            server_ip: "127.0.0.1",
            dir: scratch_dir(),
            net,
        }
    }

    /// A third namespace behind the server, joined to it by a second veth
    /// pair (`srv1`, 198.18.1.1/24, and `sha0`, [`Self::SHADOW_IP`]/24): a
    /// staging copy of the server's service. Returns its name.
    pub fn add_shadow(&mut self) -> String {
        let shadow = self.net.namespace("sha");
        self.net.veth(
            (&self.server, "srv1", "198.18.1.1/24"),
            (&shadow, "sha0", "198.18.1.2/24"),
        );
        shadow
    }

    /// The scratch directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A directory for the test's own files, created.
    pub fn path(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        path
    }

    /// A path for the mirror to create, left alone: a dump directory (the
    /// mirror creates it for the user it runs as), a socket, a capture.
    pub fn new_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `count` files of random bytes to send from client ports
    /// `first_port`, `first_port + 1`, ..., sizes spread from `min` to
    /// `max` ([`random_files`]).
    pub fn random_files(
        &self,
        first_port: u16,
        count: usize,
        min: usize,
        max: usize,
    ) -> Vec<SentFile> {
        random_files(&self.path("send"), first_port, count, min, max)
    }

    /// A socat server on `port` of the server, which `files` are to be sent
    /// to from the client, each on a connection of its own.
    pub fn transfer(&self, port: u16, files: Vec<SentFile>) -> Transfer {
        let received = self.path(&format!("received-{port}"));
        let server = start_server(&self.server, port, &received);
        Transfer {
            files,
            received,
            client: self.client.clone(),
            server_ip: self.server_ip,
            port,
            _server: server,
        }
    }

    /// Starts `mirror run --iface IFACE --port PORT EXTRA` on the server
    /// with `start` ([`MirrorProcess::start`], [`MirrorProcess::start_quiet`],
    /// or a closure around [`MirrorProcess::start_with`]).
    pub fn mirror(
        &self,
        port: u16,
        extra: &[&str],
        start: impl FnOnce(&str, &[&str]) -> MirrorProcess,
    ) -> MirrorProcess {
        let port = port.to_string();
        let mut args = vec!["--iface", self.iface, "--port", &port];
        args.extend(extra);
        start(&self.server, &args)
    }

    /// Asserts that no program is attached to the server's interface
    /// (`when`: after what).
    pub fn assert_nothing_attached(&self, when: &str) {
        let report = attached_programs(&self.server, self.iface);
        assert!(!shows_attachment(&report), "attached {when}:\n{report}");
    }

    /// A path in the scratch directory for a subscriber socket, and the
    /// `unix:PATH` address that names it.
    pub fn socket(&self) -> (PathBuf, String) {
        let path = self.path("sock").join("m.sock");
        let endpoint = format!("unix:{}", path.display());
        (path, endpoint)
    }

    /// The parts `dump` holds of the connection that sent `file` to `port`
    /// on the server (see [`dumped`]).
    pub fn dumped(&self, dump: &Path, file: &SentFile, port: u16) -> Vec<(Vec<u8>, Value)> {
        dumped(
            dump,
            &format!("{}:{}", self.client_ip, file.client_port),
            &format!("{}:{port}", self.server_ip),
        )
    }

    /// Asserts that `dump` holds each connection that sent one of `files`
    /// to `port` whole: in one file, every byte sent, ended by FIN. Returns
    /// their sidecars; `context` (the mirror's output, a client's name)
    /// goes into the messages.
    pub fn assert_dumped_whole(
        &self,
        dump: &Path,
        files: &[SentFile],
        port: u16,
        context: impl Display,
    ) -> Vec<Value> {
        files
            .iter()
            .map(|file| {
                let connection = file.client_port;
                let mut parts = self.dumped(dump, file, port);
                assert_eq!(
                    parts.len(),
                    1,
                    "connection {connection}: one file in {}\n{context}",
                    dump.display()
                );
                let (stream, meta) = parts.remove(0);
                let sent = file.bytes();
                assert!(
                    stream == sent,
                    "connection {connection}: the dump holds {} of the {} bytes sent ({meta})\n{context}",
                    stream.len(),
                    sent.len()
                );
                assert_eq!(
                    meta["reason"], "fin",
                    "connection {connection}: {meta}\n{context}"
                );
                meta
            })
            .collect()
    }

    /// Asserts that every part `dump` holds of the connections that sent
    /// `files` to `port` is a prefix of what was sent (a consumer that lost
    /// them got whole streams up to its loss, nothing wrong after). Returns
    /// the parts' sidecars; `context` goes into the messages.
    pub fn assert_dumped_prefixes(
        &self,
        dump: &Path,
        files: &[SentFile],
        port: u16,
        context: &str,
    ) -> Vec<Value> {
        let mut metas = Vec::new();
        for file in files {
            let sent = file.bytes();
            for (stream, meta) in self.dumped(dump, file, port) {
                assert!(sent.starts_with(&stream), "{context}: a prefix ({meta})");
                metas.push(meta);
            }
        }
        metas
    }
}

/// Files sent from a bed's client to a socat server on its server
/// ([`TestBed::transfer`]); the server stops when this is dropped.
pub struct Transfer {
    pub files: Vec<SentFile>,
    /// Where the server keeps each connection's bytes, by client port.
    pub received: PathBuf,
    client: String,
    server_ip: &'static str,
    port: u16,
    _server: KillOnDrop,
}

impl Transfer {
    /// Sends every file at once and waits until the server holds them all.
    pub fn send_all(&self) {
        self.send(&self.files);
    }

    /// Sends `files` (its own or others) to the same server, all at once,
    /// and waits until it holds them.
    pub fn send(&self, files: &[SentFile]) {
        send_all(
            &self.client,
            self.server_ip,
            self.port,
            files,
            &self.received,
        );
    }

    /// Starts sending every file at once; see [`Self::finish_sending`].
    pub fn start_sending(&self) -> Vec<KillOnDrop> {
        start_sending(&self.client, self.server_ip, self.port, &self.files)
    }

    /// Waits for `senders`, then until the server holds every file.
    pub fn finish_sending(&self, senders: Vec<KillOnDrop>) {
        finish_sending(
            &self.client,
            self.port,
            senders,
            &self.files,
            &self.received,
        );
    }

    /// Bytes of all the files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|file| file.len as u64).sum()
    }
}

impl Default for TestBed {
    fn default() -> Self {
        Self::new()
    }
}

/// A new scratch directory, named with [`SCRATCH_PREFIX`] and this
/// process's id.
pub fn scratch_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix(&own_scratch_prefix())
        .tempdir()
        .expect("a scratch directory")
}

fn own_scratch_prefix() -> String {
    format!("{SCRATCH_PREFIX}{}-", std::process::id())
}

/// Deletes this process's namespaces (killing what runs in them) and
/// scratch directories: for a run interrupted by a signal, which gives no
/// destructor a chance.
pub fn remove_own_leftovers() {
    crate::netns::remove_own_namespaces();
    let prefix = own_scratch_prefix();
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}
