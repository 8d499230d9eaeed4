//! Directories the mirror writes captured traffic into, and the files in
//! them, created so that nobody else's file can ever be opened, truncated or
//! appended to, whoever planted what in the directory.
//!
//! The directory is opened once (`O_DIRECTORY|O_NOFOLLOW`) and every file
//! is created through that descriptor with `O_CREAT|O_EXCL|O_NOFOLLOW` and
//! mode 0600 (captured traffic is as sensitive as the subscriber socket). A
//! name that exists already — a file, a symlink, a dangling symlink — is
//! never opened: the caller takes another name. A file opened again later
//! (a flow the open-file cache evicted) is reopened through the same
//! descriptor with `O_NOFOLLOW` and must still be the inode that was
//! created. A directory that other users may write without the sticky bit
//! is refused: they could rename our files away and plant their own.

use std::{
    ffi::{OsStr, OsString},
    fmt,
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{AtFlags, OFlag, openat},
    sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat, mkdirat},
    unistd::{AccessFlags, Gid, Uid, UnlinkatFlags, faccessat, fchown, unlinkat},
};

/// Mode of every file the mirror creates.
const FILE_MODE: u32 = 0o600;
/// Mode of a directory the mirror creates.
const DIR_MODE: u32 = 0o700;

#[derive(Debug, thiserror::Error)]
pub enum OutputDirError {
    #[error("{} is a symbolic link: give the directory it points to", .0.display())]
    Symlink(PathBuf),
    #[error("{} is not a directory: give a directory, or a name that does not exist yet", .0.display())]
    NotADirectory(PathBuf),
    #[error(
        "{} may be written by other users and has no sticky bit, so they could replace the mirror's files: use a directory only its owner may write (chmod go-w), or one with the sticky bit such as /tmp",
        .0.display()
    )]
    WritableByOthers(PathBuf),
    #[error(
        "{} is not writable by the user the mirror runs as ({user}): give that user the directory (chown), choose another, or pass --user",
        .path.display()
    )]
    NotWritable { path: PathBuf, user: String },
    #[error("cannot create the directory {}: its parent does not exist; create it first", .0.display())]
    NoParent(PathBuf),
    #[error("cannot open {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Who should own what the mirror creates before it drops root: the user
/// it will run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: Uid,
    pub gid: Gid,
}

/// Which inode a name referred to when the mirror created it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(stat: &FileStat) -> Self {
        Self {
            dev: stat.st_dev,
            ino: stat.st_ino,
        }
    }

    /// Device and inode numbers.
    pub fn dev_ino(self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    /// The identity of an open file.
    pub fn of_file(file: &impl AsFd) -> io::Result<Self> {
        Ok(Self::of(&fstat(file.as_fd())?))
    }
}

/// What [`OutputDir::open_special`] found under a name.
#[derive(Debug)]
pub enum Special {
    /// A character device or FIFO of root or of this process's user, open
    /// for writing.
    Open(File),
    /// A device or FIFO of another user (this uid): whoever made it could
    /// read what is written into it.
    OtherOwner(u32),
    /// Anything else: a regular file, a directory, a symlink, a socket.
    NotSpecial,
}

/// An open directory that captured traffic goes into.
#[derive(Debug)]
pub struct OutputDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl OutputDir {
    /// Opens `path`, creating it (mode 0700, owned by `owner`) when it does
    /// not exist; its parent must exist. Refuses a symlink and a directory
    /// that other users may write without the sticky bit.
    pub fn open_or_create(path: &Path, owner: Option<Owner>) -> Result<Self, OutputDirError> {
        let io_error = |source: io::Error| OutputDirError::Io {
            path: path.to_path_buf(),
            source,
        };
        let (parent, name) = split(path);
        let parent_fd = open_dir(&parent).map_err(|error| match error {
            Errno::ENOENT => OutputDirError::NoParent(path.to_path_buf()),
            other => io_error(other.into()),
        })?;
        // Between mkdir and open, whoever may write the parent could put
        // another directory (theirs, or one they may move) in place of the
        // new one, and the mirror would chmod and chown that: create only
        // where others cannot rename entries.
        let parent_stat = fstat(&parent_fd).map_err(|e| io_error(e.into()))?;
        if shared(parent_stat.st_mode)
            && fstatat(&parent_fd, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                == Err(Errno::ENOENT)
        {
            return Err(OutputDirError::WritableByOthers(parent));
        }
        let created = match mkdirat(
            &parent_fd,
            name.as_os_str(),
            Mode::from_bits_truncate(DIR_MODE),
        ) {
            Ok(()) => true,
            Err(Errno::EEXIST) => false,
            Err(error) => return Err(io_error(error.into())),
        };
        let fd = openat_dir(&parent_fd, &name).map_err(|error| match error {
            // O_DIRECTORY|O_NOFOLLOW on a symlink fails as "not a directory".
            Errno::ELOOP | Errno::ENOTDIR if is_symlink(&parent_fd, &name) => {
                OutputDirError::Symlink(path.to_path_buf())
            }
            Errno::ENOTDIR => OutputDirError::NotADirectory(path.to_path_buf()),
            other => io_error(other.into()),
        })?;
        if created {
            let stat = fstat(&fd).map_err(|e| io_error(e.into()))?;
            if stat.st_uid != Uid::effective().as_raw() {
                return Err(io_error(io::Error::other(
                    "it was replaced by another user's directory while the mirror created it",
                )));
            }
            // The umask may have taken bits away, never added any; the
            // owner becomes the user the mirror will run as.
            fchmod(&fd, Mode::from_bits_truncate(DIR_MODE)).map_err(|e| io_error(e.into()))?;
            if let Some(owner) = owner {
                fchown(&fd, Some(owner.uid), Some(owner.gid)).map_err(|e| io_error(e.into()))?;
            }
        }
        let dir = Self {
            fd,
            path: path.to_path_buf(),
        };
        dir.check_not_shared()?;
        Ok(dir)
    }

    /// Opens the directory that holds `file` (for a capture file named on
    /// the command line).
    pub fn of_file(file: &Path) -> Result<(Self, OsString), OutputDirError> {
        let (parent, name) = split(file);
        let fd = open_dir(&parent).map_err(|error| match error {
            Errno::ELOOP | Errno::ENOTDIR if parent.is_symlink() => {
                OutputDirError::Symlink(parent.clone())
            }
            Errno::ENOTDIR => OutputDirError::NotADirectory(parent.clone()),
            other => OutputDirError::Io {
                path: parent.clone(),
                source: other.into(),
            },
        })?;
        let dir = Self { fd, path: parent };
        dir.check_not_shared()?;
        Ok((dir, name))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` in this directory, for messages.
    pub fn display_name(&self, name: &OsStr) -> PathBuf {
        self.path.join(name)
    }

    fn check_not_shared(&self) -> Result<(), OutputDirError> {
        let stat = fstat(&self.fd).map_err(|e| OutputDirError::Io {
            path: self.path.clone(),
            source: e.into(),
        })?;
        if shared(stat.st_mode) {
            return Err(OutputDirError::WritableByOthers(self.path.clone()));
        }
        Ok(())
    }

    /// Fails unless `owner` (with its `groups`) may create files here, by
    /// the permission bits: checked while the mirror is still root, before
    /// it creates anything; [`Self::check_writable`] has the last word.
    pub fn check_writable_by(
        &self,
        owner: Owner,
        groups: &[Gid],
        user: &str,
    ) -> Result<(), OutputDirError> {
        let stat = fstat(&self.fd).map_err(|e| OutputDirError::Io {
            path: self.path.clone(),
            source: e.into(),
        })?;
        let bits = if stat.st_uid == owner.uid.as_raw() {
            stat.st_mode >> 6
        } else if stat.st_gid == owner.gid.as_raw()
            || groups.iter().any(|g| g.as_raw() == stat.st_gid)
        {
            stat.st_mode >> 3
        } else {
            stat.st_mode
        };
        if bits & 0o3 == 0o3 {
            Ok(())
        } else {
            Err(OutputDirError::NotWritable {
                path: self.path.clone(),
                user: user.to_owned(),
            })
        }
    }

    /// Fails unless the current user may create files here: checked after
    /// the mirror dropped root, with the kernel's own permission rules.
    pub fn check_writable(&self, user: &str) -> Result<(), OutputDirError> {
        faccessat(
            &self.fd,
            ".",
            AccessFlags::W_OK | AccessFlags::X_OK,
            AtFlags::AT_EACCESS,
        )
        .map_err(|_| OutputDirError::NotWritable {
            path: self.path.clone(),
            user: user.to_owned(),
        })
    }

    /// Creates `name` for writing, mode 0600; `AlreadyExists` when anything
    /// (a file, a symlink, a dangling one) has that name.
    pub fn create_new(&self, name: &OsStr) -> io::Result<(File, FileId)> {
        let fd = openat(
            &self.fd,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(FILE_MODE),
        )?;
        let id = FileId::of_file(&fd)?;
        Ok((File::from(fd), id))
    }

    /// Creates the first free name of `names` (tcpflow's `NAME`, `NAMEc1`,
    /// ...); `None` when every one is taken.
    pub fn create_first_free(
        &self,
        names: impl IntoIterator<Item = OsString>,
    ) -> io::Result<Option<(OsString, File, FileId)>> {
        for name in names {
            match self.create_new(&name) {
                Ok((file, id)) => return Ok(Some((name, file, id))),
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
                Err(error) => return Err(error),
            }
        }
        Ok(None)
    }

    /// Opens a file this directory's owner created earlier, to write again
    /// (appending, or from the start with `truncate`): never through a
    /// symlink, and only while `name` is still the inode `id`.
    pub fn reopen(&self, name: &OsStr, id: FileId, truncate: bool) -> io::Result<File> {
        // O_NONBLOCK: a FIFO put in the file's place would make a blocking
        // open wait for a reader, forever, with the dump stuck (the inode
        // check below refuses it). Regular files ignore the flag.
        let mut flags = OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
        if !truncate {
            flags |= OFlag::O_APPEND;
        }
        let fd = openat(&self.fd, name, flags, Mode::empty())?;
        if FileId::of_file(&fd)? != id {
            return Err(io::Error::other(format!(
                "{} was replaced by another file",
                self.display_name(name).display()
            )));
        }
        let file = File::from(fd);
        if truncate {
            // Only now that it is known to be ours.
            file.set_len(0)?;
        }
        Ok(file)
    }

    /// Removes `name` if it is still the inode `id` (a file the mirror
    /// created), never through a symlink.
    pub fn remove(&self, name: &OsStr, id: FileId) -> io::Result<()> {
        let stat = fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
        if FileId::of(&stat) != id {
            return Err(io::Error::other(format!(
                "{} was replaced by another file; left alone",
                self.display_name(name).display()
            )));
        }
        unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir)?;
        Ok(())
    }

    /// What `name` is, without following a symlink (`None`: nothing).
    pub fn kind_of(&self, name: &OsStr) -> io::Result<Option<(SFlag, FileId)>> {
        match fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some((
                SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()),
                FileId::of(&stat),
            ))),
            Err(Errno::ENOENT) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// Opens an existing special file (a character device such as
    /// /dev/null, or a FIFO) for writing, never through a symlink, and only
    /// one that root or this process's user owns: a pipe someone else made
    /// where the capture was to go (`/tmp/web.pcap`) would hand them every
    /// mirrored byte. Type and owner are read before anything is opened (a
    /// FIFO's open waits for a reader), and the inode checked is the one
    /// opened.
    pub fn open_special(&self, name: &OsStr) -> io::Result<Special> {
        // O_PATH opens nothing yet: no FIFO is waited on, no device's open
        // routine runs; with O_NOFOLLOW a symlink is itself the result.
        let path = openat(
            &self.fd,
            name,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let stat = fstat(&path)?;
        let kind = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits());
        if kind != SFlag::S_IFCHR && kind != SFlag::S_IFIFO {
            return Ok(Special::NotSpecial);
        }
        if stat.st_uid != 0 && stat.st_uid != Uid::effective().as_raw() {
            return Ok(Special::OtherOwner(stat.st_uid));
        }
        // Reopened through its descriptor: the name may be another file by now.
        let fd = nix::fcntl::open(
            Path::new(&format!("/proc/self/fd/{}", path.as_raw_fd())),
            OFlag::O_WRONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
            Mode::empty(),
        )?;
        Ok(Special::Open(File::from(fd)))
    }

    /// Hands a file created before the drop to the user the mirror runs as.
    pub fn give(file: &File, owner: Option<Owner>) -> io::Result<()> {
        match owner {
            Some(owner) => Ok(fchown(file, Some(owner.uid), Some(owner.gid))?),
            None => Ok(()),
        }
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl fmt::Display for OutputDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.path.display().fmt(f)
    }
}

/// Whether a directory of mode `mode` lets other users rename or remove
/// what it holds: writable by group or others, without the sticky bit.
fn shared(mode: u32) -> bool {
    mode & 0o022 != 0 && mode & libc::S_ISVTX == 0
}

/// `path` as (parent, last component); a bare name's parent is `.`.
fn split(path: &Path) -> (PathBuf, OsString) {
    let name = path
        .file_name()
        .map_or_else(|| OsString::from("."), OsStr::to_os_string);
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    (parent, name)
}

fn open_dir(path: &Path) -> Result<OwnedFd, Errno> {
    nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

fn is_symlink(parent: &OwnedFd, name: &OsStr) -> bool {
    fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .is_ok_and(|stat| stat.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFLNK.bits())
}

fn openat_dir(parent: &OwnedFd, name: &OsStr) -> Result<OwnedFd, Errno> {
    openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

#[cfg(test)]
mod tests {
    use std::{sync::mpsc, time::Duration};

    use super::*;

    #[test]
    fn directories_are_created_only_where_others_cannot_swap_them() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let shared_parent = dir.path().join("shared");
        std::fs::create_dir(&shared_parent).unwrap();
        std::fs::set_permissions(&shared_parent, std::fs::Permissions::from_mode(0o777)).unwrap();
        let refused = OutputDir::open_or_create(&shared_parent.join("flows"), None);
        assert!(
            matches!(refused, Err(OutputDirError::WritableByOthers(ref p)) if *p == shared_parent),
            "{refused:?}"
        );
        assert!(!shared_parent.join("flows").exists(), "nothing created");
        // With the sticky bit (as /tmp), others cannot rename it: created.
        std::fs::set_permissions(&shared_parent, std::fs::Permissions::from_mode(0o1777)).unwrap();
        OutputDir::open_or_create(&shared_parent.join("flows"), None).unwrap();
    }

    #[test]
    fn a_pipe_put_in_place_of_a_file_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let out = OutputDir::open_or_create(dir.path(), None).unwrap();
        let name = OsStr::new("flow");
        let (_, id) = out.create_new(name).unwrap();
        std::fs::rename(dir.path().join("flow"), dir.path().join("moved")).unwrap();
        nix::unistd::mkfifo(&dir.path().join("flow"), Mode::from_bits_truncate(0o600)).unwrap();
        let (done, result) = mpsc::channel();
        for truncate in [false, true] {
            let dir = OutputDir::open_or_create(dir.path(), None).unwrap();
            let done = done.clone();
            // A blocking open would wait for a reader that never comes.
            std::thread::spawn(move || {
                let _ = done.send(dir.reopen(OsStr::new("flow"), id, truncate).map(|_| ()));
            });
            let reopened = result
                .recv_timeout(Duration::from_secs(5))
                .expect("reopen returns without a reader on the pipe");
            assert!(reopened.is_err(), "truncate={truncate}");
        }
        // The file the mirror made is still reopened.
        std::fs::remove_file(dir.path().join("flow")).unwrap();
        std::fs::rename(dir.path().join("moved"), dir.path().join("flow")).unwrap();
        out.reopen(name, id, false).unwrap();
    }
}
