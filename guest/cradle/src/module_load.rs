//! Loads the kernel modules shipped in the initramfs, in dependency order,
//! with `finit_module(2)`.
//!
//! The kernel reads each file itself (no copy through user space). A module
//! that is already there (EEXIST) counts as loaded; one that fails is logged
//! with its name and errno and the boot goes on: a pod without, say, the
//! vsock driver is still more useful than a kernel panic.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::console::say;
use crate::module_dep::{self, load_order};

/// `finit_module` flag: the file is compressed and the kernel must
/// decompress it (linux/module.h).
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// Outcome of loading all modules.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Modules now in the kernel (loaded or already there).
    pub loaded: usize,
    /// Modules that failed (each was logged).
    pub failed: usize,
    /// Wall time for the whole step, reading modules.dep included.
    pub elapsed: Duration,
}

/// Loads every module listed in `/lib/modules/<release>/modules.dep`.
/// No modules directory means no modules (a kernel with everything built in).
pub fn load_all(debug: bool) -> LoadReport {
    let start = Instant::now();
    let mut report = LoadReport::default();
    let dir = match kernel_release() {
        Ok(release) => Path::new("/lib/modules").join(release),
        Err(error) => {
            say!("warning: cannot get the kernel release (uname): {error}; loading no modules");
            return report;
        }
    };
    let dep_path = dir.join("modules.dep");
    let text = match std::fs::read_to_string(&dep_path) {
        Ok(text) => text,
        Err(error) => {
            if error.kind() != io::ErrorKind::NotFound {
                say!(
                    "warning: cannot read {}: {error}; loading no modules",
                    dep_path.display()
                );
            } else if debug {
                say!("debug: no {}; loading no modules", dep_path.display());
            }
            return report;
        }
    };

    let order = load_order(&text);
    for warning in &order.warnings {
        say!("warning: {warning}");
    }
    for path in order.paths {
        let module_start = Instant::now();
        let name = module_dep::module_name(path);
        match load_one(&module_path(&dir, path), module_dep::is_compressed(path)) {
            Ok(()) => report.loaded += 1,
            Err(error) => {
                report.failed += 1;
                say!("module {name}: load failed: {error}");
            }
        }
        if debug {
            say!(
                "debug: module {name} {:.2} ms",
                millis(module_start.elapsed())
            );
        }
    }
    report.elapsed = start.elapsed();
    report
}

/// A modules.dep path is relative to the modules directory unless absolute.
fn module_path(dir: &Path, path: &str) -> PathBuf {
    dir.join(path)
}

/// Opens `path` and hands it to the kernel. EEXIST counts as success.
fn load_one(path: &Path, compressed: bool) -> io::Result<()> {
    let file = File::open(path)?;
    let flags = if compressed {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    let params: &CStr = c"";
    // SAFETY: finit_module reads the open fd owned by `file`, which outlives
    // the call, and the NUL-terminated 'static parameter string.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EEXIST) {
        return Ok(());
    }
    Err(error)
}

/// `uname -r`: the directory name under /lib/modules.
fn kernel_release() -> io::Result<String> {
    let mut uts = MaybeUninit::<libc::utsname>::zeroed();
    // SAFETY: uname fills the struct the pointer refers to, which is valid
    // for writes and lives across the call.
    if unsafe { libc::uname(uts.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: utsname is plain arrays of c_char, so the zeroed value is
    // already valid, and uname succeeded and filled it.
    let uts = unsafe { uts.assume_init() };
    // c_char is i8 on x86_64: reinterpret each byte.
    let release: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&release).into_owned())
}

/// A duration in milliseconds, for log lines.
pub fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_path_relative_joins_the_modules_dir() {
        let dir = Path::new("/lib/modules/6.1.0-56-cloud-amd64");

        assert_eq!(
            module_path(dir, "kernel/fs/fuse/fuse.ko"),
            Path::new("/lib/modules/6.1.0-56-cloud-amd64/kernel/fs/fuse/fuse.ko")
        );
    }

    #[test]
    fn module_path_absolute_is_kept() {
        let dir = Path::new("/lib/modules/6.1.0-56-cloud-amd64");

        assert_eq!(module_path(dir, "/opt/m.ko"), Path::new("/opt/m.ko"));
    }

    #[test]
    fn kernel_release_is_not_empty() {
        assert!(!kernel_release().unwrap().is_empty());
    }

    #[test]
    fn millis_converts_durations() {
        assert_eq!(millis(Duration::from_micros(1500)), 1.5);
    }
}
