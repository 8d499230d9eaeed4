//! A tmpfs for the cases that write files (`--dump-dir`, `--pcap`):
//! mounted for one case and unmounted after it, so that they measure the
//! mirror rather than a disk and leave nothing behind.

use std::{
    ffi::CString,
    fs,
    os::unix::{ffi::OsStrExt as _, fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use tempfile::TempDir;

/// Mount points not unmounted yet, for [`unmount_all`].
static MOUNTED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A tmpfs of `size_mib` owned by `uid` (mode 0700) on a scratch directory.
pub struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    pub fn mount(size_mib: u64, uid: u32) -> Self {
        let dir = mirror_tests::bed::scratch_dir();
        let target = c_path(dir.path());
        let options = CString::new(format!("size={size_mib}m,mode=0700,uid={uid},gid={uid}"))
            .expect("no NUL");
        // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
        let result = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                options.as_ptr().cast(),
            )
        };
        assert_eq!(
            result,
            0,
            "cannot mount a tmpfs on {}: {}",
            dir.path().display(),
            std::io::Error::last_os_error()
        );
        MOUNTED
            .lock()
            .expect("mounts")
            .push(dir.path().to_path_buf());
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        unmount(self.dir.path());
        MOUNTED
            .lock()
            .expect("mounts")
            .retain(|path| path != self.dir.path());
        // The scratch directory goes after it (TempDir's own drop).
    }
}

/// Detaches every tmpfs still mounted: for a run interrupted by a signal,
/// before the scratch directories are removed.
pub fn unmount_all() {
    let mounted = MOUNTED.try_lock().map(|m| m.clone()).unwrap_or_default();
    for path in mounted {
        unmount(&path);
    }
}

fn unmount(path: &Path) {
    // Detached: a mirror killed a moment ago may still hold a file open;
    // the memory goes with its last descriptor.
    // SAFETY: umount2(2) with a NUL-terminated path.
    unsafe { libc::umount2(c_path(path).as_ptr(), libc::MNT_DETACH) };
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("a path without NUL")
}

/// Empties the stream files in a dump directory every 100 ms (the
/// sidecars stay): a bulk case writes gigabytes, which a tmpfs would hold
/// in memory. The mirror appends, so it goes on writing at the new end;
/// what it wrote is in each sidecar's byte count.
pub struct Emptier {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Emptier {
    pub fn start(dir: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, dir) = (Arc::clone(&stop), dir.to_path_buf());
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let path = entry.path();
                    if path.extension().is_some_and(|e| e == "meta") {
                        continue;
                    }
                    // Never through a link: the directory belongs to the
                    // mirror's user, this thread runs as root.
                    if let Ok(file) = fs::OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                        .open(&path)
                        && file.metadata().is_ok_and(|m| m.is_file())
                    {
                        let _ = file.set_len(0);
                    }
                }
                thread::sleep(Duration::from_millis(100));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Emptier {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
