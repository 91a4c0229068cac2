//! Where a layer is unpacked before `mkfs.erofs` reads it: RAM when it has room, else the
//! store's own staging directory.
//!
//! Why RAM: the unpacked tree lives for seconds and is deleted right after `mkfs.erofs`.
//! On disk, ext4 pays for every one of its thousands of files twice (and, without a
//! journal, the next layer's inode allocation scans past all the inodes just deleted: in
//! `crib-bench pull` conversion took 3x docker pull's whole time on this project's disk
//! and was below it from tmpfs). `/dev/shm` is the tmpfs every Linux host has.
//!
//! Safety of a world-writable parent: the area is `/dev/shm/crib-unpack-<euid>`, which
//! must be a real directory (not a symlink) of this user with mode 0700, else RAM is not
//! used. Each tree in it is a staging directory (src/staging.rs): flock-owned, so a
//! kill -9 leaves one that the next store open removes.
//!
//! Room: RAM is used only when the tmpfs has at least [`RAM_FACTOR`] times the compressed
//! layer free, and at least [`RAM_RESERVE_BYTES`] left over. A layer that still fills it
//! (a tar bomb) fails there and the store converts it again on disk.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::staging::{self, Staging};

/// The tmpfs the area lives on.
const SHM: &str = "/dev/shm";
/// Turns the RAM area off when set to `0` (for measurements, or hosts short of RAM).
pub const RAM_ENV: &str = "CRIB_UNPACK_IN_RAM";
/// Free tmpfs space needed per byte of compressed layer (a layer tar usually expands
/// 2-4x; 8x leaves room for the tree's metadata).
const RAM_FACTOR: u64 = 8;
/// tmpfs space that must stay free beside the tree.
const RAM_RESERVE_BYTES: u64 = 1 << 30;

/// The RAM area's directory for this user, created if missing; `None` when it cannot be
/// used safely.
fn ram_area() -> Option<PathBuf> {
    if std::env::var(RAM_ENV).is_ok_and(|v| v == "0") {
        return None;
    }
    let euid = rustix::process::geteuid().as_raw();
    let area = Path::new(SHM).join(format!("crib-unpack-{euid}"));
    match fs::DirBuilder::new().mode(0o700).create(&area) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(_) => return None,
    }
    let meta = fs::symlink_metadata(&area).ok()?;
    let private = meta.is_dir() && meta.uid() == euid && meta.permissions().mode() & 0o077 == 0;
    private.then_some(area)
}

/// Free bytes of the filesystem holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(path).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// A tree in RAM for a layer of `compressed_bytes`, if RAM has room.
pub fn ram_tree(compressed_bytes: u64) -> Option<Staging> {
    let area = ram_area()?;
    let needed = compressed_bytes
        .saturating_mul(RAM_FACTOR)
        .saturating_add(RAM_RESERVE_BYTES);
    if free_bytes(&area)? < needed {
        return None;
    }
    staging::create(&area, &area.join(".lock")).ok()
}

/// Removes trees in the RAM area whose owner died (kill -9 mid-conversion).
pub fn clean_stale() {
    let Some(area) = ram_area() else { return };
    let _ = staging::clean_stale_except(&area, &area.join(".lock"), &[".lock"]);
}
