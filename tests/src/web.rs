//! nginx as a test web server: every request answered `200 ok`, its
//! length and request line logged, all files in a directory of the test's
//! own.

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use crate::netns::{KillOnDrop, in_ns, spawn, wait_listening};

pub struct Nginx {
    process: Option<KillOnDrop>,
    ns: String,
    conf: PathBuf,
    access_log: PathBuf,
}

impl Nginx {
    /// Starts nginx in `ns`, listening on `ip:80`, with its files in `dir`.
    pub fn start(ns: &str, ip: &str, dir: &Path) -> Self {
        Self::start_with(ns, ip, dir, "")
    }

    /// [`Self::start`] with `locations` (nginx `location` blocks) before
    /// the one that answers everything else; `dir/www` is created for
    /// them.
    pub fn start_with(ns: &str, ip: &str, dir: &Path, locations: &str) -> Self {
        for sub in ["tmp", "www"] {
            fs::create_dir_all(dir.join(sub)).expect("mkdir");
        }
        let d = dir.display();
        let conf = dir.join("nginx.conf");
        fs::write(
            &conf,
            format!(
                "user root;
master_process off;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
    log_format request '$request_length $request';
    access_log {d}/access.log request;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    keepalive_requests 100000;
    server {{
        listen {ip}:80;
        {locations}
        location / {{ return 200 \"ok\\n\"; }}
    }}
}}
"
            ),
        )
        .expect("nginx.conf");
        let mut nginx = Self {
            process: None,
            ns: ns.to_owned(),
            conf,
            access_log: dir.join("access.log"),
        };
        nginx.restart();
        nginx
    }

    /// Starts it again after [`Self::stop`].
    pub fn restart(&mut self) {
        let conf = self.conf.display().to_string();
        self.process = Some(spawn(in_ns(&self.ns, "nginx").args(["-c", &conf])));
        wait_listening(&self.ns, 80);
    }

    /// Stops it; nothing listens on port 80 afterwards.
    pub fn stop(&mut self) {
        drop(self.process.take());
    }

    /// The request lines logged so far (`GET /path HTTP/1.1`).
    pub fn requests(&self) -> Vec<String> {
        fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .map(|line| line.split_once(' ').map_or(line, |(_, request)| request))
            .map(str::to_owned)
            .collect()
    }

    /// Bytes of the requests logged since the last call (request line,
    /// headers and body: what the server received), forgetting them.
    pub fn take_request_bytes(&self) -> u64 {
        let log = fs::read_to_string(&self.access_log).unwrap_or_default();
        // nginx appends (O_APPEND): its next line goes to the new end.
        fs::write(&self.access_log, "").expect("truncate the access log");
        log.lines()
            .filter_map(|line| line.split_once(' ')?.0.parse::<u64>().ok())
            .sum()
    }

    /// Waits until at least `count` requests are logged (10 s at most).
    pub fn wait_for(&self, count: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let requests = self.requests();
            if requests.len() >= count || Instant::now() > deadline {
                return requests;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}
