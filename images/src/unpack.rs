//! Unpacks a tar stream (a layer, or an image archive) into a directory, treating every
//! entry as hostile (docs/IMAGES.md, "Security of unpacking").
//!
//! - Names are normalised lexically: a leading `/` is dropped, `.` and empty components
//!   are skipped, `..` pops a component; a `..` above the root is an error.
//! - Parents are resolved with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` from
//!   the root's directory fd: a symlink in a parent resolves as it would inside the
//!   guest (`/` is the root), so nothing outside the root is ever reached. The final
//!   component is created with `*at` calls that never follow it (`O_NOFOLLOW | O_EXCL`,
//!   `AT_SYMLINK_NOFOLLOW`, `linkat` without `AT_SYMLINK_FOLLOW`).
//! - Symlink targets are data: stored as written, never followed here.
//! - Hard link targets are resolved like names and must exist in the same tar.
//! - A later entry replaces an earlier one (as Docker does); a non-directory replacing a
//!   directory removes the directory's tree, fd-relative.
//! - Layer mode maps OCI whiteouts (image-spec `layer.md`, "Whiteouts") to overlayfs':
//!   `.wh.NAME` becomes a 0:0 character device NAME, `.wh..wh..opq` the xattr
//!   `trusted.overlay.opaque=y` on its directory. Ownership, permission bits (setuid,
//!   setgid, sticky), mtimes, device nodes and FIFOs are kept: they only exist inside
//!   the guest's view of the erofs image. Archive mode (an image archive, not a layer)
//!   keeps only directories, regular files and symlinks, with the caller's ownership.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;

/// Longest entry name accepted (Linux PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;
/// Dangling symlinks followed while creating one entry's parents (the kernel's limit).
const MAX_SYMLINK_HOPS: usize = 40;
/// Deepest directory tree removed when an entry replaces a directory.
const MAX_REMOVE_DEPTH: usize = 4096;
/// The overlayfs xattr marking an opaque directory.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Errors of this module. `path` is the entry's name as the tar has it.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("Reading the tar stream failed (truncated or corrupt archive)")]
    Read(#[source] io::Error),
    #[error("Tar entry {path:?} escapes the root with '..': the archive is malformed or hostile")]
    Escapes { path: String },
    #[error("Tar entry {path:?} is longer than {MAX_PATH_BYTES} bytes")]
    TooLong { path: String },
    #[error("Tar entry {path:?}: hard link target {target:?} does not exist earlier in this tar (or is a directory)")]
    LinkTarget { path: String, target: String },
    #[error("Tar entry {path:?}: a parent is not a directory")]
    ParentNotDir { path: String },
    #[error("Tar entry {path:?}: whiteout of {name:?} is invalid")]
    BadWhiteout { path: String, name: String },
    #[error("Tar entry {path:?}: uid/gid {id} does not fit in 32 bits")]
    BadOwner { path: String, id: u64 },
    #[error("Tar entry {path:?}: directory tree too deep to replace")]
    TooDeep { path: String },
    #[error("Writing {path} failed (disk full? free space in the store's filesystem)")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What an unpack is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnpackMode {
    /// A layer: whiteouts, ownership, device nodes, FIFOs, xattrs (needs root).
    Layer,
    /// An image archive: directories, regular files and symlinks only.
    Archive,
}

/// What was unpacked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnpackStats {
    pub entries: u64,
    pub whiteouts: u64,
    /// Entries skipped: device nodes and FIFOs in archive mode, unknown entry types,
    /// xattrs outside `user.*` and `security.capability`.
    pub skipped: u64,
}

/// Unpacks `reader` into the directory `root` (which must exist and be private).
/// Returns the reader (positioned after the end-of-archive marker) and the stats.
pub fn unpack<R: Read>(
    reader: R,
    root: &Path,
    mode: UnpackMode,
) -> Result<(R, UnpackStats), UnpackError> {
    let root_fd = open_root(root)?;
    if mode == UnpackMode::Layer {
        // The image's `/` unless the layer has a "./" entry: 0755 root:root, as Docker's.
        rustix::fs::fchmod(&root_fd, Mode::from_raw_mode(0o755)).map_err(|e| {
            UnpackError::Write {
                path: root.to_path_buf(),
                source: e.into(),
            }
        })?;
    }
    let mut unpacker = Unpacker {
        root,
        root_fd,
        mode,
        stats: UnpackStats::default(),
        dir_times: Vec::new(),
    };
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(UnpackError::Read)? {
        let mut entry = entry.map_err(UnpackError::Read)?;
        unpacker.entry(&mut entry)?;
    }
    unpacker.finish_dir_times()?;
    Ok((archive.into_inner(), unpacker.stats))
}

fn open_root(root: &Path) -> Result<OwnedFd, UnpackError> {
    rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| UnpackError::Write {
        path: root.to_path_buf(),
        source: e.into(),
    })
}

/// A normalised name: its components, none empty, `.` or `..`.
fn normalize(raw: &[u8]) -> Result<Vec<Vec<u8>>, UnpackError> {
    let shown = || String::from_utf8_lossy(raw).into_owned();
    if raw.len() > MAX_PATH_BYTES {
        return Err(UnpackError::TooLong { path: shown() });
    }
    let mut parts: Vec<Vec<u8>> = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                if parts.pop().is_none() {
                    return Err(UnpackError::Escapes { path: shown() });
                }
            }
            _ => parts.push(part.to_vec()),
        }
    }
    Ok(parts)
}

fn join(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.join(&b'/')
}

fn os(bytes: &[u8]) -> &std::ffi::OsStr {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::OsStr::from_bytes(bytes)
}

/// The outcome of one walk to a directory.
enum Walk {
    Opened(OwnedFd),
    /// `parts[index]` is a symlink to `target`, which does not exist yet.
    Dangling {
        index: usize,
        target: Vec<u8>,
    },
}

struct Unpacker<'a> {
    root: &'a Path,
    root_fd: OwnedFd,
    mode: UnpackMode,
    stats: UnpackStats,
    /// Directories whose mtime is set at the end (creating children changes it).
    dir_times: Vec<(Vec<u8>, u64)>,
}

impl Unpacker<'_> {
    fn write_err(&self, rel: &[u8], e: impl Into<io::Error>) -> UnpackError {
        UnpackError::Write {
            path: self.root.join(os(rel)),
            source: e.into(),
        }
    }

    /// Opens (creating missing components, 0755 root:root as Docker does) the directory
    /// `parts`, resolved inside the root. A dangling symlink on the way is followed by
    /// creating its target inside the root, as Docker's chrooted untar does.
    fn open_dir(&self, raw: &[u8], parts: &[Vec<u8>]) -> Result<OwnedFd, UnpackError> {
        let mut parts = parts.to_vec();
        for _ in 0..MAX_SYMLINK_HOPS {
            match self.walk(raw, &parts)? {
                Walk::Opened(fd) => return Ok(fd),
                Walk::Dangling { index, target } => {
                    let mut next = if target.starts_with(b"/") {
                        Vec::new()
                    } else {
                        parts[..index].to_vec()
                    };
                    for part in target.split(|&b| b == b'/') {
                        match part {
                            b"" | b"." => {}
                            // `..` at the root stays at the root, as RESOLVE_IN_ROOT does.
                            b".." => {
                                next.pop();
                            }
                            _ => next.push(part.to_vec()),
                        }
                    }
                    next.extend_from_slice(&parts[index + 1..]);
                    if join(&next).len() > MAX_PATH_BYTES {
                        break;
                    }
                    parts = next;
                }
            }
        }
        Err(UnpackError::ParentNotDir {
            path: String::from_utf8_lossy(raw).into_owned(),
        })
    }

    fn walk(&self, raw: &[u8], parts: &[Vec<u8>]) -> Result<Walk, UnpackError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
        let not_dir = || UnpackError::ParentNotDir {
            path: String::from_utf8_lossy(raw).into_owned(),
        };
        let full = join(parts);
        if parts.is_empty() {
            return rustix::io::dup(&self.root_fd)
                .map(Walk::Opened)
                .map_err(|e| self.write_err(b"", e));
        }
        match rustix::fs::openat2(&self.root_fd, os(&full), flags, Mode::empty(), resolve) {
            Ok(fd) => return Ok(Walk::Opened(fd)),
            Err(Errno::NOENT) => {}
            Err(Errno::NOTDIR) => return Err(not_dir()),
            Err(e) => return Err(self.write_err(&full, e)),
        }
        // Walk from the root, creating what is missing. Each step resolves the whole
        // prefix from the root so symlinks resolve as in the guest.
        let mut dir = rustix::io::dup(&self.root_fd).map_err(|e| self.write_err(b"", e))?;
        for i in 1..=parts.len() {
            let prefix = join(&parts[..i]);
            let name = os(&parts[i - 1]);
            match rustix::fs::openat2(&self.root_fd, os(&prefix), flags, Mode::empty(), resolve) {
                Ok(fd) => dir = fd,
                Err(Errno::NOENT) => {
                    match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o755)) {
                        Ok(()) => {}
                        Err(Errno::EXIST) => {
                            let stat = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
                                .map_err(|e| self.write_err(&prefix, e))?;
                            if FileType::from_raw_mode(stat.st_mode) == FileType::Symlink {
                                let target = rustix::fs::readlinkat(&dir, name, Vec::new())
                                    .map_err(|e| self.write_err(&prefix, e))?;
                                return Ok(Walk::Dangling {
                                    index: i - 1,
                                    target: target.into_bytes(),
                                });
                            }
                        }
                        Err(e) => return Err(self.write_err(&prefix, e)),
                    }
                    dir = rustix::fs::openat(&dir, name, flags | OFlags::NOFOLLOW, Mode::empty())
                        .map_err(|e| match e {
                        Errno::NOTDIR | Errno::LOOP => not_dir(),
                        e => self.write_err(&prefix, e),
                    })?;
                }
                Err(Errno::NOTDIR) => return Err(not_dir()),
                Err(e) => return Err(self.write_err(&prefix, e)),
            }
        }
        Ok(Walk::Opened(dir))
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let parts = normalize(&raw)?;
        let entry_type = entry.header().entry_type();
        self.stats.entries += 1;
        let Some((name, parent_parts)) = parts.split_last() else {
            // The root itself ("./"): a layer's sets the mode and owner of the image's root.
            if self.mode == UnpackMode::Layer && entry.header().entry_type().is_dir() {
                let header = entry.header();
                let perm = header.mode().map_err(UnpackError::Read)? & 0o7777;
                let uid = self.id(header.uid().map_err(UnpackError::Read)?, &shown)?;
                let gid = self.id(header.gid().map_err(UnpackError::Read)?, &shown)?;
                let root = rustix::io::dup(&self.root_fd).map_err(|e| self.write_err(b"", e))?;
                self.set_fd_meta(&root, b"", Some((uid, gid)), perm)?;
                self.dir_times
                    .push((Vec::new(), header.mtime().unwrap_or(0)));
            }
            return Ok(());
        };
        let parent = self.open_dir(&raw, parent_parts)?;
        let name_str = String::from_utf8_lossy(name).into_owned();
        let rel = join(&parts);

        if self.mode == UnpackMode::Layer && name.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            self.stats.whiteouts += 1;
            if name.as_slice() == OPAQUE_MARKER.as_bytes() {
                return rustix::fs::fsetxattr(&parent, OPAQUE_XATTR, b"y", XattrFlags::empty())
                    .map_err(|e| self.write_err(&join(parent_parts), e));
            }
            if name.starts_with(b".wh..wh.") {
                // Other AUFS metadata (.wh..wh.plnk, .wh..wh.aufs): not a whiteout.
                self.stats.skipped += 1;
                return Ok(());
            }
            let target = &name[WHITEOUT_PREFIX.len()..];
            if target.is_empty() || target == b"." || target == b".." {
                return Err(UnpackError::BadWhiteout {
                    path: shown,
                    name: name_str,
                });
            }
            let mut target_rel = join(parent_parts);
            target_rel.extend_from_slice(b"/");
            target_rel.extend_from_slice(target);
            self.remove_existing(&parent, target, &target_rel, &shown)?;
            return rustix::fs::mknodat(
                &parent,
                os(target),
                FileType::CharacterDevice,
                Mode::empty(),
                rustix::fs::makedev(0, 0),
            )
            .map_err(|e| self.write_err(&target_rel, e));
        }

        let header = entry.header().clone();
        let perm = header.mode().map_err(UnpackError::Read)? & 0o7777;
        let mtime = header.mtime().unwrap_or(0);
        let uid = header.uid().map_err(UnpackError::Read)?;
        let gid = header.gid().map_err(UnpackError::Read)?;
        let owner = match self.mode {
            UnpackMode::Layer => Some((self.id(uid, &shown)?, self.id(gid, &shown)?)),
            UnpackMode::Archive => None,
        };

        match entry_type {
            tar::EntryType::Directory => {
                let existing = self.stat(&parent, name);
                if !matches!(existing, Some(FileType::Directory)) {
                    if existing.is_some() {
                        self.remove_existing(&parent, name, &rel, &shown)?;
                    }
                    rustix::fs::mkdirat(&parent, os(name), Mode::from_raw_mode(0o700))
                        .map_err(|e| self.write_err(&rel, e))?;
                }
                let fd = rustix::fs::openat(
                    &parent,
                    os(name),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| self.write_err(&rel, e))?;
                self.set_fd_meta(&fd, &rel, owner, perm)?;
                self.set_xattrs(entry, &fd, &rel)?;
                self.dir_times.push((rel, mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.remove_existing(&parent, name, &rel, &shown)?;
                let fd = rustix::fs::openat(
                    &parent,
                    os(name),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| self.write_err(&rel, e))?;
                let mut file = File::from(fd);
                io::copy(entry, &mut file).map_err(|e| {
                    // A short read is the tar's fault; anything else the disk's.
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        UnpackError::Read(e)
                    } else {
                        self.write_err(&rel, e)
                    }
                })?;
                self.set_fd_meta(&file, &rel, owner, perm)?;
                self.set_xattrs(entry, &file, &rel)?;
                set_times_fd(&file, mtime).map_err(|e| self.write_err(&rel, e))?;
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                self.remove_existing(&parent, name, &rel, &shown)?;
                rustix::fs::symlinkat(os(&target), &parent, os(name))
                    .map_err(|e| self.write_err(&rel, e))?;
                self.set_at_meta(&parent, name, &rel, owner, None, mtime)?;
            }
            tar::EntryType::Link => {
                let raw_target = entry.link_name_bytes().unwrap_or_default().into_owned();
                self.hardlink(&parent, name, &rel, &shown, &raw_target)?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo
                if self.mode == UnpackMode::Layer =>
            {
                let (file_type, dev) = match entry_type {
                    tar::EntryType::Char => (FileType::CharacterDevice, self.dev(&header)?),
                    tar::EntryType::Block => (FileType::BlockDevice, self.dev(&header)?),
                    _ => (FileType::Fifo, 0),
                };
                self.remove_existing(&parent, name, &rel, &shown)?;
                rustix::fs::mknodat(&parent, os(name), file_type, Mode::empty(), dev)
                    .map_err(|e| self.write_err(&rel, e))?;
                self.set_at_meta(&parent, name, &rel, owner, Some(perm), mtime)?;
            }
            _ => self.stats.skipped += 1,
        }
        Ok(())
    }

    fn id(&self, id: u64, shown: &str) -> Result<u32, UnpackError> {
        u32::try_from(id).map_err(|_| UnpackError::BadOwner {
            path: shown.to_string(),
            id,
        })
    }

    fn dev(&self, header: &tar::Header) -> Result<rustix::fs::Dev, UnpackError> {
        let major = header
            .device_major()
            .map_err(UnpackError::Read)?
            .unwrap_or(0);
        let minor = header
            .device_minor()
            .map_err(UnpackError::Read)?
            .unwrap_or(0);
        Ok(rustix::fs::makedev(major, minor))
    }

    fn stat(&self, parent: &OwnedFd, name: &[u8]) -> Option<FileType> {
        rustix::fs::statat(parent, os(name), AtFlags::SYMLINK_NOFOLLOW)
            .ok()
            .map(|st| FileType::from_raw_mode(st.st_mode))
    }

    /// Removes whatever `parent/name` is (a whole tree for a directory), never following
    /// a symlink.
    fn remove_existing(
        &self,
        parent: &OwnedFd,
        name: &[u8],
        rel: &[u8],
        shown: &str,
    ) -> Result<(), UnpackError> {
        match self.stat(parent, name) {
            None => Ok(()),
            Some(FileType::Directory) => remove_tree(parent, name, 0).map_err(|e| match e {
                RemoveError::TooDeep => UnpackError::TooDeep {
                    path: shown.to_string(),
                },
                RemoveError::Io(e) => self.write_err(rel, e),
            }),
            Some(_) => rustix::fs::unlinkat(parent, os(name), AtFlags::empty())
                .map_err(|e| self.write_err(rel, e)),
        }
    }

    fn hardlink(
        &self,
        parent: &OwnedFd,
        name: &[u8],
        rel: &[u8],
        shown: &str,
        raw_target: &[u8],
    ) -> Result<(), UnpackError> {
        let link_err = || UnpackError::LinkTarget {
            path: shown.to_string(),
            target: String::from_utf8_lossy(raw_target).into_owned(),
        };
        let target = normalize(raw_target)?;
        let Some((target_name, target_parent)) = target.split_last() else {
            return Err(link_err());
        };
        let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
        let target_dir = rustix::fs::openat2(
            &self.root_fd,
            os(&join(target_parent)),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            resolve,
        )
        .map_err(|_| link_err())?;
        let target_stat =
            rustix::fs::statat(&target_dir, os(target_name), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|_| link_err())?;
        if FileType::from_raw_mode(target_stat.st_mode) == FileType::Directory {
            return Err(link_err());
        }
        if let Ok(existing) = rustix::fs::statat(parent, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            if existing.st_ino == target_stat.st_ino && existing.st_dev == target_stat.st_dev {
                return Ok(()); // A link to itself.
            }
        }
        self.remove_existing(parent, name, rel, shown)?;
        rustix::fs::linkat(
            &target_dir,
            os(target_name),
            parent,
            os(name),
            AtFlags::empty(),
        )
        .map_err(|e| self.write_err(rel, e))
    }

    /// Owner then permission bits (chown clears setuid/setgid) on an open file or dir.
    fn set_fd_meta(
        &self,
        fd: &impl AsFd,
        rel: &[u8],
        owner: Option<(u32, u32)>,
        perm: u32,
    ) -> Result<(), UnpackError> {
        if let Some((uid, gid)) = owner {
            rustix::fs::fchown(
                fd,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )
            .map_err(|e| self.write_err(rel, e))?;
        }
        let perm = match self.mode {
            UnpackMode::Layer => perm,
            // Archive content is only read by crib: keep it private.
            UnpackMode::Archive
                if rustix::fs::fstat(fd)
                    .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory) =>
            {
                0o700
            }
            UnpackMode::Archive => 0o600,
        };
        rustix::fs::fchmod(fd, Mode::from_raw_mode(perm)).map_err(|e| self.write_err(rel, e))
    }

    /// Owner, permission bits and mtime of a node created just now by name: a symlink
    /// (`perm` None) or a device/FIFO. The name is in a private directory and was created
    /// by us, so chmod by name reaches that node.
    fn set_at_meta(
        &self,
        parent: &OwnedFd,
        name: &[u8],
        rel: &[u8],
        owner: Option<(u32, u32)>,
        perm: Option<u32>,
        mtime: u64,
    ) -> Result<(), UnpackError> {
        if let Some((uid, gid)) = owner {
            rustix::fs::chownat(
                parent,
                os(name),
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| self.write_err(rel, e))?;
        }
        if let Some(perm) = perm {
            rustix::fs::chmodat(
                parent,
                os(name),
                Mode::from_raw_mode(perm),
                AtFlags::empty(),
            )
            .map_err(|e| self.write_err(rel, e))?;
        }
        rustix::fs::utimensat(
            parent,
            os(name),
            &timestamps(mtime),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.write_err(rel, e))
    }

    /// PAX `SCHILY.xattr.*` records, layer mode only: `user.*` and `security.capability`
    /// (file capabilities, e.g. ping's). `trusted.*` is refused: `trusted.overlay.*` would
    /// let a layer steer overlayfs (redirects, metacopy), and only the whiteout mapping
    /// sets `trusted.overlay.opaque`.
    fn set_xattrs<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        fd: &impl AsFd,
        rel: &[u8],
    ) -> Result<(), UnpackError> {
        if self.mode != UnpackMode::Layer {
            return Ok(());
        }
        let Ok(Some(extensions)) = entry.pax_extensions() else {
            return Ok(());
        };
        let mut wanted = Vec::new();
        for extension in extensions {
            let Ok(extension) = extension else { continue };
            let Ok(key) = extension.key() else { continue };
            let Some(name) = key.strip_prefix("SCHILY.xattr.") else {
                continue;
            };
            if name.starts_with("user.") || name == "security.capability" {
                wanted.push((name.to_string(), extension.value_bytes().to_vec()));
            } else {
                self.stats.skipped += 1;
            }
        }
        for (name, value) in wanted {
            rustix::fs::fsetxattr(fd, name.as_str(), &value, XattrFlags::empty())
                .map_err(|e| self.write_err(rel, e))?;
        }
        Ok(())
    }

    /// Sets the directories' mtimes, last created first. A directory an entry later
    /// replaced (by a file or a symlink) is skipped: it is reached without symlinks only.
    fn finish_dir_times(&mut self) -> Result<(), UnpackError> {
        let times = std::mem::take(&mut self.dir_times);
        for (rel, mtime) in times.iter().rev() {
            if rel.is_empty() {
                set_times_fd(&self.root_fd, *mtime).map_err(|e| self.write_err(rel, e))?;
                continue;
            }
            let Ok(fd) = rustix::fs::openat2(
                &self.root_fd,
                os(rel),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
            ) else {
                continue;
            };
            set_times_fd(&fd, *mtime).map_err(|e| self.write_err(rel, e))?;
        }
        Ok(())
    }
}

fn timestamps(mtime: u64) -> Timestamps {
    let time = Timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    Timestamps {
        last_access: time,
        last_modification: time,
    }
}

fn set_times_fd(fd: &impl AsFd, mtime: u64) -> rustix::io::Result<()> {
    rustix::fs::futimens(fd, &timestamps(mtime))
}

enum RemoveError {
    TooDeep,
    Io(Errno),
}

impl From<Errno> for RemoveError {
    fn from(e: Errno) -> Self {
        RemoveError::Io(e)
    }
}

/// Removes the directory `parent/name` and its tree through directory fds, never
/// following a symlink (std's `remove_dir_all` works from a path, not a dir fd).
fn remove_tree(parent: &OwnedFd, name: &[u8], depth: usize) -> Result<(), RemoveError> {
    if depth > MAX_REMOVE_DEPTH {
        return Err(RemoveError::TooDeep);
    }
    let dir = rustix::fs::openat(
        parent,
        os(name),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(&dir)? {
        let entry = entry?;
        let child = entry.file_name().to_bytes();
        if child != b"." && child != b".." {
            names.push((child.to_vec(), entry.file_type()));
        }
    }
    for (child, file_type) in names {
        if file_type == FileType::Directory {
            remove_tree(&dir, &child, depth + 1)?;
        } else {
            rustix::fs::unlinkat(&dir, os(&child), AtFlags::empty())?;
        }
    }
    rustix::fs::unlinkat(parent, os(name), AtFlags::REMOVEDIR)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_absolute_path_drops_root() {
        let parts = normalize(b"/etc//./passwd").unwrap();

        assert_eq!(parts, vec![b"etc".to_vec(), b"passwd".to_vec()]);
    }

    #[test]
    fn normalize_inner_dotdot_pops() {
        let parts = normalize(b"a/b/../c").unwrap();

        assert_eq!(parts, vec![b"a".to_vec(), b"c".to_vec()]);
    }

    #[test]
    fn normalize_dotdot_above_root_is_escape() {
        let err = normalize(b"a/../../etc/passwd").unwrap_err();

        assert!(matches!(err, UnpackError::Escapes { .. }));
    }

    #[test]
    fn normalize_over_path_max_is_too_long() {
        let err = normalize(&vec![b'a'; MAX_PATH_BYTES + 1]).unwrap_err();

        assert!(matches!(err, UnpackError::TooLong { .. }));
    }
}
