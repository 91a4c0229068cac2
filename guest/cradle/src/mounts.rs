//! The filesystems PID 1 mounts before anything else: /dev, /proc, /sys,
//! /run, /tmp and /dev/pts.
//!
//! /dev goes first so the console can be repaired (see `console`) before
//! anything else can fail. A mount point that is missing is created; a
//! filesystem that is already mounted there (EBUSY) is fine.

use std::ffi::{CStr, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr;

use thiserror::Error;

/// Errors of the mounts module.
#[derive(Debug, Error)]
pub enum MountError {
    #[error("cannot create mount point {path}")]
    MountPoint {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        fstype: String,
        target: String,
        #[source]
        source: io::Error,
    },
}

/// One `mount(2)` call.
pub struct Mount {
    pub fstype: &'static CStr,
    pub target: &'static CStr,
    pub flags: libc::c_ulong,
    pub options: &'static CStr,
}

const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// devtmpfs on /dev, mounted before [`MOUNTS`].
pub const DEV: Mount = Mount {
    fstype: c"devtmpfs",
    target: c"/dev",
    flags: libc::MS_NOSUID,
    options: c"mode=0755",
};

/// Everything else, in order (devpts needs /dev mounted first).
pub const MOUNTS: [Mount; 5] = [
    Mount {
        fstype: c"proc",
        target: c"/proc",
        flags: NOSUID_NODEV_NOEXEC,
        options: c"",
    },
    Mount {
        fstype: c"sysfs",
        target: c"/sys",
        flags: NOSUID_NODEV_NOEXEC,
        options: c"",
    },
    Mount {
        fstype: c"tmpfs",
        target: c"/run",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        options: c"mode=0755",
    },
    Mount {
        fstype: c"tmpfs",
        target: c"/tmp",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        options: c"mode=1777",
    },
    Mount {
        fstype: c"devpts",
        target: c"/dev/pts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        options: c"gid=5,mode=0620,ptmxmode=0666",
    },
];

/// Creates the mount point if needed and mounts `mount` there.
pub fn mount(mount: &Mount) -> Result<(), MountError> {
    let target = Path::new(OsStr::from_bytes(mount.target.to_bytes()));
    if let Err(source) = std::fs::create_dir(target) {
        if source.kind() != io::ErrorKind::AlreadyExists {
            return Err(MountError::MountPoint {
                path: target.display().to_string(),
                source,
            });
        }
    }
    // SAFETY: every pointer is a NUL-terminated 'static string; the kernel
    // only reads them during the call. The source is the fstype name, as
    // mount(8) does for virtual filesystems.
    let rc = unsafe {
        libc::mount(
            mount.fstype.as_ptr(),
            mount.target.as_ptr(),
            mount.fstype.as_ptr(),
            mount.flags,
            if mount.options.is_empty() {
                ptr::null()
            } else {
                mount.options.as_ptr().cast()
            },
        )
    };
    if rc != 0 {
        let source = io::Error::last_os_error();
        // EBUSY: already mounted there (e.g. a kernel that mounts devtmpfs).
        if source.raw_os_error() != Some(libc::EBUSY) {
            return Err(MountError::Mount {
                fstype: mount.fstype.to_string_lossy().into_owned(),
                target: target.display().to_string(),
                source,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_devpts_comes_after_dev_and_targets_are_absolute() {
        let targets: Vec<&CStr> = MOUNTS.iter().map(|m| m.target).collect();

        assert!(targets.contains(&c"/dev/pts"));
        assert!(!targets.contains(&DEV.target));
        assert!(targets.iter().all(|t| t.to_bytes().starts_with(b"/")));
    }
}
