//! A container's cgroup (v2): `/sys/fs/cgroup/<name>`, one per container, with
//! `cpu.max` and `memory.max` from the spec's `cpus` and `memory` (`max` without). cradle
//! mounts the cgroup2 hierarchy and enables the cpu, memory, pids and io controllers for
//! its children once, when the first container needs a cgroup; the stage moves itself
//! (and so the container) into it before it unshares, a plain process joins it between
//! fork and exec. Beyond `memory.max` the kernel OOM-kills inside the cgroup only: the
//! pod goes on. The cgroup's counters are the container's stats ([`super::stats`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use initramfs::containers::{MemoryBytes, MilliCpus};

use super::ContainerError;
use crate::volumes;

/// Where cradle mounts the cgroup2 hierarchy.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// `cpu.max`'s period, in microseconds (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;
/// The controllers a container's cgroup gets, when the kernel has them.
const CONTROLLERS: [&str; 4] = ["cpu", "memory", "pids", "io"];
/// How long removing a cgroup waits for its last processes to be gone (an exited
/// container's tasks leave the cgroup a moment after its shim was reaped).
const REMOVE_WAIT_MS: u64 = 2000;
/// Between two attempts at removing a busy cgroup.
const REMOVE_RETRY_MS: u64 = 10;

/// The controllers enabled for the containers, once the root is prepared.
static PREPARED: Mutex<Option<String>> = Mutex::new(None);

/// Mounts cgroup2 (once) and enables for the children whichever of [`CONTROLLERS`] the
/// kernel has; returns the `cgroup.subtree_control` that resulted.
fn prepare_root() -> Result<String, ContainerError> {
    let mut prepared = PREPARED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(enabled) = prepared.as_ref() {
        return Ok(enabled.clone());
    }
    let root = Path::new(CGROUP_ROOT);
    if !root.join("cgroup.controllers").exists() {
        volumes::mount_raw(Path::new("cgroup2"), root, "cgroup2", 0).map_err(|source| {
            ContainerError::Cgroup {
                path: root.to_path_buf(),
                source,
            }
        })?;
    }
    let available = read(&root.join("cgroup.controllers"))?;
    let wanted = enable_line(&available);
    if !wanted.is_empty() {
        write(&root.join("cgroup.subtree_control"), &wanted)?;
    }
    let enabled = read(&root.join("cgroup.subtree_control"))?
        .trim()
        .to_owned();
    *prepared = Some(enabled.clone());
    Ok(enabled)
}

/// What to write to `cgroup.subtree_control` for the [`CONTROLLERS`] among `available`
/// (`cgroup.controllers`' text): `"+cpu +memory"`.
pub fn enable_line(available: &str) -> String {
    let have: Vec<&str> = available.split_whitespace().collect();
    CONTROLLERS
        .iter()
        .filter(|c| have.contains(c))
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn read(path: &Path) -> Result<String, ContainerError> {
    std::fs::read_to_string(path).map_err(|source| ContainerError::Cgroup {
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, value: &str) -> Result<(), ContainerError> {
    std::fs::write(path, value).map_err(|source| ContainerError::Cgroup {
        path: path.to_path_buf(),
        source,
    })
}

/// `cpu.max` for `cpus`: "QUOTA PERIOD".
pub fn cpu_max(cpus: MilliCpus) -> String {
    let quota = u64::from(cpus.0) * CPU_PERIOD_US / 1000;
    format!("{} {CPU_PERIOD_US}", quota.max(1000))
}

/// Creates (or reuses) the cgroup of container `name` and sets its limits (`max` for
/// none, so a cgroup left by an earlier container of that name keeps no old limit).
pub fn create(
    name: &str,
    cpus: Option<MilliCpus>,
    memory: Option<MemoryBytes>,
) -> Result<PathBuf, ContainerError> {
    let enabled = prepare_root()?;
    let dir = Path::new(CGROUP_ROOT).join(name);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(ContainerError::Cgroup {
                path: dir.clone(),
                source,
            })
        }
    }
    let has = |controller: &str| enabled.split_whitespace().any(|c| c == controller);
    if cpus.is_some() || has("cpu") {
        write(
            &dir.join("cpu.max"),
            &cpus.map_or_else(|| format!("max {CPU_PERIOD_US}"), cpu_max),
        )?;
    }
    if memory.is_some() || has("memory") {
        write(
            &dir.join("memory.max"),
            &memory.map_or_else(|| "max".to_owned(), |m| m.0.to_string()),
        )?;
        if memory.is_some() {
            // No swap in a pod, but say so: the limit is the limit.
            let _ = std::fs::write(dir.join("memory.swap.max"), "0");
        }
    }
    Ok(dir)
}

/// Removes the cgroup `dir` once its last processes are gone (rmdir fails with EBUSY
/// while it has any), waiting up to [`REMOVE_WAIT_MS`].
pub fn remove(dir: &Path) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(REMOVE_WAIT_MS);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(error) if Instant::now() >= deadline => return Err(error),
            Err(_) => std::thread::sleep(Duration::from_millis(REMOVE_RETRY_MS)),
        }
    }
}

/// Opens `dir`'s `cgroup.procs` for [`join_in_child`]: opened before the fork, written
/// after it, so the child does no allocation.
pub fn open_procs(dir: &Path) -> io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `procs` ("0" is the
/// writer itself). Async-signal-safe: for a `pre_exec` hook.
pub fn join_in_child(procs: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: write(2) reads one byte from a static buffer into a descriptor the caller
    // keeps open; no memory is written and nothing is allocated.
    let written = unsafe { libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) };
    if written == 1 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_max_is_quota_over_the_default_period() {
        assert_eq!(cpu_max(MilliCpus(500)), "50000 100000");
        assert_eq!(cpu_max(MilliCpus(2000)), "200000 100000");
        // The kernel refuses quotas under 1 ms.
        assert_eq!(cpu_max(MilliCpus(1)), "1000 100000");
    }

    #[test]
    fn enable_line_keeps_the_wanted_controllers_the_kernel_has() {
        assert_eq!(
            enable_line("cpuset cpu io memory hugetlb pids rdma misc\n"),
            "+cpu +memory +pids +io"
        );
        assert_eq!(enable_line("memory pids"), "+memory +pids");
        assert_eq!(enable_line(""), "");
    }

    #[test]
    fn remove_of_a_missing_cgroup_is_fine() {
        remove(Path::new("/nonexistent/cradle-test-cgroup")).unwrap();
    }
}
