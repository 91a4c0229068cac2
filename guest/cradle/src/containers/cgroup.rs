//! A container's cgroup (v2): `/sys/fs/cgroup/<name>` with `cpu.max` and `memory.max`
//! from the spec's `cpus` and `memory`. cradle mounts the cgroup2 hierarchy and enables
//! the cpu and memory controllers for its children once, when the first container needs
//! a cgroup; the stage moves itself (and so the container) into it before it unshares.
//! Beyond `memory.max` the kernel OOM-kills inside the cgroup only: the pod goes on.

use std::path::{Path, PathBuf};

use initramfs::containers::{MemoryBytes, MilliCpus};

use super::ContainerError;
use crate::volumes;

/// Where cradle mounts the cgroup2 hierarchy.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// `cpu.max`'s period, in microseconds (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// Mounts cgroup2 (once) and enables cpu and memory for the children.
fn prepare_root() -> Result<(), ContainerError> {
    let root = Path::new(CGROUP_ROOT);
    if !root.join("cgroup.controllers").exists() {
        volumes::mount_raw(Path::new("cgroup2"), root, "cgroup2", 0).map_err(|source| {
            ContainerError::Cgroup {
                path: root.to_path_buf(),
                source,
            }
        })?;
    }
    write(&root.join("cgroup.subtree_control"), "+cpu +memory")
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

/// Creates the cgroup of container `name` with its limits; `None` when it has none.
pub fn create(
    name: &str,
    cpus: Option<MilliCpus>,
    memory: Option<MemoryBytes>,
) -> Result<Option<PathBuf>, ContainerError> {
    if cpus.is_none() && memory.is_none() {
        return Ok(None);
    }
    prepare_root()?;
    let dir = Path::new(CGROUP_ROOT).join(name);
    if !dir.exists() {
        std::fs::create_dir(&dir).map_err(|source| ContainerError::Cgroup {
            path: dir.clone(),
            source,
        })?;
    }
    if let Some(cpus) = cpus {
        write(&dir.join("cpu.max"), &cpu_max(cpus))?;
    }
    if let Some(memory) = memory {
        write(&dir.join("memory.max"), &memory.0.to_string())?;
        // No swap in a pod, but say so: the limit is the limit.
        let _ = std::fs::write(dir.join("memory.swap.max"), "0");
    }
    Ok(Some(dir))
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
}
