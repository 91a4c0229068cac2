//! Disk image locks, as QEMU and Cloud Hypervisor take them: an open file description (OFD)
//! lock over the whole file, shared for a read-only disk and exclusive for a read-write one,
//! so two VMs never write one image and nobody writes an image another VM reads. The lock
//! lives as long as the disk's file description (the worker's clones share it) and goes
//! with the process, kill -9 included.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use super::BlockError;

/// Takes the lock of `file` (opened from `path`): shared when `readonly`, else exclusive.
pub fn lock_disk(file: &File, path: &Path, readonly: bool) -> Result<(), BlockError> {
    let kind = if readonly {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    };
    // SAFETY: an all-zero `flock` is a valid value of the plain C struct.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // l_start = 0 and l_len = 0: the whole file, however it grows; l_pid must be 0 for OFD.
    // SAFETY: `file` is an open descriptor for the call; `lock` is a valid flock that the
    // kernel only reads for F_OFD_SETLK.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if rc == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    match source.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => Err(BlockError::Locked {
            path: path.to_path_buf(),
            mode: if readonly { "read" } else { "write" },
            holders: describe_holders(file),
        }),
        // A filesystem without lock support: go on without the lock, as QEMU does.
        Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::EINVAL) => {
            tracing::warn!(
                "disk {}: the filesystem does not support locks; nothing stops another VM \
                 from opening it too",
                path.display()
            );
            Ok(())
        }
        _ => Err(BlockError::Lock {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Who else has `file` open: "pid 123 (crib --id web-1)" for each process whose open files
/// include it, as far as /proc shows (all processes as root, one's own otherwise).
fn describe_holders(file: &File) -> String {
    let Ok(meta) = file.metadata() else {
        return String::from("unknown");
    };
    let me = std::process::id();
    let mut holders = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return String::from("unknown");
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me || !has_open(&entry.path(), meta.dev(), meta.ino()) {
            continue;
        }
        holders.push(format!("pid {pid} ({})", command_line(pid)));
    }
    if holders.is_empty() {
        String::from("a process this user cannot see")
    } else {
        holders.join(", ")
    }
}

fn has_open(proc_dir: &Path, dev: u64, ino: u64) -> bool {
    let Ok(fds) = std::fs::read_dir(proc_dir.join("fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::metadata(fd.path()).is_ok_and(|m| m.dev() == dev && m.ino() == ino))
}

/// The process's command and its `--id` if it has one, printable.
fn command_line(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).escape_debug().to_string())
        .collect();
    let command = args
        .first()
        .map_or("?", |c| c.rsplit('/').next().unwrap_or(c));
    match args.iter().position(|a| a == "--id") {
        Some(i) if i + 1 < args.len() => format!("{command} --id {}", args[i + 1]),
        _ => command.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;

    use super::*;

    fn image(name: &str) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("crib-lock-{name}-{}.img", std::process::id()));
        std::fs::write(&path, [0u8; 512]).unwrap();
        path
    }

    fn open(path: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn second_writer_is_refused_naming_the_holder() {
        let path = image("rw");
        let first = open(&path);
        lock_disk(&first, &path, false).unwrap();

        let err = lock_disk(&open(&path), &path, false).unwrap_err();

        // The holder is this very process, which the scan skips: the message says so.
        assert!(matches!(err, BlockError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("another VM"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn readers_share_and_exclude_a_writer() {
        let path = image("ro");
        let a = open(&path);
        let b = open(&path);
        lock_disk(&a, &path, true).unwrap();

        lock_disk(&b, &path, true).unwrap();
        let err = lock_disk(&open(&path), &path, false).unwrap_err();

        assert!(matches!(err, BlockError::Locked { mode: "write", .. }));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn lock_goes_with_the_file() {
        let path = image("drop");
        let first = open(&path);
        lock_disk(&first, &path, false).unwrap();
        drop(first);

        lock_disk(&open(&path), &path, false).unwrap();
        std::fs::remove_file(&path).unwrap();
    }
}
