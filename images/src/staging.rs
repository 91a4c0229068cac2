//! Staging directories under the store's `tmp/`: private (0700), on the store's
//! filesystem so a finished file is renamed into place, removed on drop.
//!
//! Ownership is an exclusive `flock` on the staging directory itself, held for the
//! Staging's life. A kill -9 drops the lock with the process; the next [`clean_stale`]
//! (at every `Store::open`) removes every directory whose lock it can take. Creating a
//! directory and locking it are two steps, so creators hold `tmp.lock` shared across
//! them and the cleaner holds it exclusive: it never sees a new, not yet locked one.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::fs::{FlockOperation, Mode, OFlags};

/// A private directory in the store's `tmp/`, removed (with its contents) on drop.
pub struct Staging {
    path: PathBuf,
    _lock: OwnedFd,
}

impl Staging {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // std's remove_dir_all does not follow symlinks (it works from directory fds).
        let _ = fs::remove_dir_all(&self.path);
    }
}

fn open_lock_file(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::RDWR | OFlags::CREATE | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?)
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Creates a staging directory in `tmp` (guarded by the lock file `tmp_lock`).
pub fn create(tmp: &Path, tmp_lock: &Path) -> io::Result<Staging> {
    let guard = open_lock_file(tmp_lock)?;
    rustix::fs::flock(&guard, FlockOperation::LockShared)?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = format!(
        "{}-{}-{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let path = tmp.join(name);
    rustix::fs::mkdir(&path, Mode::from_raw_mode(0o700))?;
    let lock = open_dir(&path)?;
    rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive)?;
    drop(guard);
    Ok(Staging { path, _lock: lock })
}

/// Removes the staging directories in `tmp` whose owner is gone. Returns how many.
pub fn clean_stale(tmp: &Path, tmp_lock: &Path) -> io::Result<usize> {
    let guard = open_lock_file(tmp_lock)?;
    rustix::fs::flock(&guard, FlockOperation::LockExclusive)?;
    let mut removed = 0;
    for entry in fs::read_dir(tmp)? {
        let entry = entry?;
        let path = entry.path();
        if !entry.file_type()?.is_dir() {
            fs::remove_file(&path)?;
            removed += 1;
            continue;
        }
        let Ok(dir) = open_dir(&path) else { continue };
        if rustix::fs::flock(&dir, FlockOperation::NonBlockingLockExclusive).is_ok() {
            fs::remove_dir_all(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_stale_live_staging_is_kept() {
        let root = tempfile::tempdir().unwrap();
        let (tmp, lock) = (root.path().join("tmp"), root.path().join("tmp.lock"));
        fs::create_dir(&tmp).unwrap();
        let staging = create(&tmp, &lock).unwrap();

        let removed = clean_stale(&tmp, &lock).unwrap();

        assert_eq!(removed, 0);
        assert!(staging.path().exists());
    }

    #[test]
    fn clean_stale_unlocked_dir_is_removed() {
        let root = tempfile::tempdir().unwrap();
        let (tmp, lock) = (root.path().join("tmp"), root.path().join("tmp.lock"));
        fs::create_dir_all(tmp.join("123-dead/tree")).unwrap();

        let removed = clean_stale(&tmp, &lock).unwrap();

        assert_eq!(removed, 1);
        assert!(!tmp.join("123-dead").exists());
    }

    #[test]
    fn staging_drop_removes_dir() {
        let root = tempfile::tempdir().unwrap();
        let staging = create(root.path(), &root.path().join("tmp.lock")).unwrap();
        let path = staging.path().to_path_buf();
        fs::write(path.join("f"), b"x").unwrap();

        drop(staging);

        assert!(!path.exists());
    }
}
