//! Containers: pod processes that name an image run in that image's root filesystem, in
//! mount, PID, UTS and IPC namespaces of their own, sharing the VM's network
//! (docs/CONTAINERS.md).
//!
//! - [`layers`]: at boot, each layer of the pod's layer disk (the spec's `resolved.layers`)
//!   gets a read-only loop device over its bytes ([`loopdev`]) and is mounted as erofs.
//! - [`plan`]: per image process, what its container is: its layers (top first), its
//!   writable directory, and its argv, env, cwd and user after Docker's rules.
//! - [`stage`]: the container's set-up, run in a fresh cradle process (`/init
//!   --container-init PLAN`): unshare, fork the container's PID 1 (overlay root, /proc,
//!   /sys, /dev, pivot_root, user, exec) and stay as its shim, forwarding signals and
//!   exiting as it does.
//! - [`user`]: the image's /etc/passwd and /etc/group.
//! - [`cgroup`]: a cgroup v2 per container, with the limits of `cpus` and `memory`;
//!   [`stats`] reads its counters.
//!
//! The core is not tied to boot: [`Containers::create`] makes a container from a process
//! spec and the pod's resolved images at any time (vdocker's `POST /crib/v1/containers`
//! does, for a running pod), [`Containers::remove`] undoes it, and [`command`] gives the
//! command that starts it, which the registry (vdocker) spawns, restarts and signals like
//! any process.

pub mod cgroup;
pub mod layers;
pub mod loopdev;
pub mod plan;
pub mod stage;
pub mod stats;
pub mod user;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock, PoisonError};

use initramfs::containers::ContainerSpecError;
use initramfs::podspec::{PodSpec, ProcessSpec};
use thiserror::Error;

pub use plan::ContainerPlan;

use crate::console::say;
use crate::disks::DiskError;

/// Where cradle keeps layer mounts and containers' directories.
pub const RUN_DIR: &str = "/run/cradle";
/// The first argument that makes cradle the container set-up stage.
pub const STAGE_ARG: &str = "--container-init";
/// The first argument that makes cradle run a `docker exec` in a container.
pub const EXEC_ARG: &str = "--container-exec";

/// Errors of setting up the pod's layers and containers.
#[derive(Debug, Error)]
pub enum ContainerError {
    #[error("the pod's layer disk (serial crib-layers) did not appear")]
    LayerDisk(#[source] DiskError),
    #[error("cannot open the layer disk {}", path.display())]
    OpenLayerDisk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {diff_id}: cannot attach a loop device at offset {offset} ({size} bytes)")]
    Loop {
        diff_id: String,
        offset: u64,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {diff_id}: cannot mount {} as erofs on {}; is the layer file an erofs image of crib's image store?", device.display(), path.display())]
    MountLayer {
        diff_id: String,
        device: PathBuf,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the cgroup {}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Spec(#[from] ContainerSpecError),
    #[error("processes[{index}]: image {image:?} is not among the images the host resolved")]
    Unresolved { index: usize, image: String },
    #[error("processes[{index}]: rootfs {tag:?} is not one of the pod's filesystems")]
    UnknownRootfs { index: usize, tag: String },
    #[error("processes[{index}].rootfs: {} is not a directory cradle can use as the container's root; create it in the shared directory first", path.display())]
    RootfsDir {
        index: usize,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("processes[{index}].rootfs: {} resolves to {}, outside the filesystem's mount {}; name a directory of the share, not a symlink out of it", path.display(), resolved.display(), mount.display())]
    RootfsOutside {
        index: usize,
        path: PathBuf,
        resolved: PathBuf,
        mount: PathBuf,
    },
}

/// The pod's containers by process name: what the registry and vdocker look up.
#[derive(Debug, Default)]
pub struct Containers {
    plans: Mutex<HashMap<String, ContainerPlan>>,
    layers: layers::Layers,
}

static CONTAINERS: OnceLock<Containers> = OnceLock::new();

impl Containers {
    /// Mounts the pod's layers and makes a container for each process with an image.
    /// Nothing to do (and no layer disk wanted) for a pod without images.
    /// Without any, it still installs an empty set: containers can be added later.
    pub fn set_up(spec: &PodSpec) -> Result<(), ContainerError> {
        let any_rootfs = spec.processes.iter().any(|p| p.rootfs.is_some());
        if spec.resolved.layers.is_empty() && !any_rootfs {
            let _ = CONTAINERS.set(Containers::default());
            return Ok(());
        }
        let layers = if spec.resolved.layers.is_empty() {
            layers::Layers::default()
        } else {
            let layers = layers::Layers::mount_all(&spec.resolved.layers)?;
            say!("layers: {} mounted", spec.resolved.layers.len());
            layers
        };
        let containers = Containers {
            plans: Mutex::new(HashMap::new()),
            layers,
        };
        for (index, process) in spec.processes.iter().enumerate() {
            if process.image.is_some() || process.rootfs.is_some() {
                containers.create(index, process, spec)?;
            }
        }
        // Set once per boot; a second call has nothing new to install.
        let _ = CONTAINERS.set(containers);
        Ok(())
    }

    /// Makes (or replaces) the container of process `index` of `spec`.
    pub fn create(
        &self,
        index: usize,
        process: &ProcessSpec,
        spec: &PodSpec,
    ) -> Result<(), ContainerError> {
        let mut plan = match process.rootfs.as_deref() {
            Some(rootfs) => {
                let root = rootfs_dir(index, spec, rootfs)?;
                ContainerPlan::with_root_dir(process, &root)
            }
            None => ContainerPlan::new(index, process, &spec.resolved, &self.layers)?,
        };
        plan.make_dirs()?;
        plan.cgroup = Some(cgroup::create(&process.name, process.cpus, process.memory)?);
        // Validated: every source is a volume with a path or a filesystem.
        plan.mounts = process
            .mounts
            .iter()
            .filter_map(|m| {
                let source = spec.mount_source(&m.source)?;
                Some((PathBuf::from(source), m.path.clone(), m.readonly))
            })
            .collect();
        self.plans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(process.name.clone(), plan);
        Ok(())
    }

    /// Undoes [`Self::create`] for the container `name`, whose processes have all
    /// exited: forgets its plan, removes its cgroup and its directory (the writable
    /// layer of an image container). Never follows a mount: a rootfs share is mounted
    /// in the container's own mount namespace only, and anything found mounted in
    /// cradle's is left alone. Best effort: what cannot be removed is a warning.
    pub fn remove(&self, name: &str) {
        let plan = self
            .plans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        let Some(plan) = plan else {
            return;
        };
        if let Some(dir) = &plan.cgroup {
            if let Err(error) = cgroup::remove(dir) {
                say!(
                    "warning: container {name}: cannot remove its cgroup {}: {error}",
                    dir.display()
                );
            }
        }
        if let Err(error) = remove_dir(&plan) {
            say!(
                "warning: container {name}: cannot remove {}: {error}",
                plan.dir.display()
            );
        }
    }

    /// The container of process `name`.
    pub fn plan(&self, name: &str) -> Option<ContainerPlan> {
        self.plans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }
}

/// The directory of a validated `rootfs` in cradle: it must be a directory inside its
/// filesystem's mount once symlinks are resolved (the share's content is the host's, and
/// a container writing into a share could plant a symlink out of it).
fn rootfs_dir(index: usize, spec: &PodSpec, rootfs: &str) -> Result<PathBuf, ContainerError> {
    let (tag, _) = spec.split_rootfs(rootfs);
    let unknown = || ContainerError::UnknownRootfs {
        index,
        tag: tag.to_owned(),
    };
    let mount = PathBuf::from(spec.rootfs_mount(rootfs).ok_or_else(unknown)?);
    let path = spec.rootfs_path(rootfs).ok_or_else(unknown)?;
    if path == mount {
        return Ok(path);
    }
    let dir_error = |source| ContainerError::RootfsDir {
        index,
        path: path.clone(),
        source,
    };
    let resolved = std::fs::canonicalize(&path).map_err(dir_error)?;
    let mount_resolved = std::fs::canonicalize(&mount).unwrap_or_else(|_| mount.clone());
    if !resolved.starts_with(&mount_resolved) {
        return Err(ContainerError::RootfsOutside {
            index,
            path,
            resolved,
            mount,
        });
    }
    if !resolved.is_dir() {
        return Err(dir_error(std::io::ErrorKind::NotADirectory.into()));
    }
    Ok(resolved)
}

/// Removes the container directory of `plan` (`upper/`, `work/`, `root/`, `pid`) without
/// crossing into anything mounted there.
fn remove_dir(plan: &ContainerPlan) -> std::io::Result<()> {
    let dev = match std::fs::symlink_metadata(&plan.dir) {
        Ok(meta) => meta.dev(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    let same_fs = |path: &Path| {
        std::fs::symlink_metadata(path)
            .map(|meta| meta.dev() == dev)
            .unwrap_or(false)
    };
    let _ = std::fs::remove_file(plan.pid_file());
    for dir in [plan.upper(), plan.work()] {
        if same_fs(&dir) {
            std::fs::remove_dir_all(&dir)?;
        }
    }
    // The mount point of the root: empty in cradle's mount namespace, removed only so.
    let root = plan.root();
    if same_fs(&root) {
        std::fs::remove_dir(&root)?;
    }
    std::fs::remove_dir(&plan.dir)
}

/// The pod's containers, once [`Containers::set_up`] made them.
pub fn get() -> Option<&'static Containers> {
    CONTAINERS.get()
}

/// The command that starts the container of `spec` (an image process): cradle itself as
/// the set-up stage. `None` if the process has no container.
pub fn command(spec: &ProcessSpec) -> Option<Command> {
    let plan = get()?.plan(&spec.name)?;
    let json = serde_json::to_string(&plan).ok()?;
    let mut command = Command::new("/proc/self/exe");
    command.arg(STAGE_ARG).arg(json).env_clear();
    Some(command)
}

/// The command that runs `argv` in the running container of `plan` (`docker exec`): with
/// the container's env plus `env`, in `cwd` (else the container's), as `user` (else the
/// container's).
pub fn exec_command(
    plan: &ContainerPlan,
    argv: &[String],
    env: &[String],
    cwd: Option<&str>,
    user: Option<&str>,
) -> Option<Command> {
    let exec = stage::ExecPlan {
        name: plan.name.clone(),
        pid_file: plan.pid_file(),
        cgroup: plan.cgroup.clone(),
        argv: argv.to_vec(),
        env: initramfs::containers::merge_env(&plan.env, env),
        cwd: cwd
            .filter(|d| !d.is_empty())
            .unwrap_or(&plan.cwd)
            .to_owned(),
        user: user
            .filter(|u| !u.is_empty())
            .unwrap_or(&plan.user)
            .to_owned(),
    };
    let json = serde_json::to_string(&exec).ok()?;
    let mut command = Command::new("/proc/self/exe");
    command.arg(EXEC_ARG).arg(json).env_clear();
    Some(command)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

    fn plan_in(dir: &Path) -> ContainerPlan {
        let process = ProcessSpec {
            name: "c1".into(),
            rootfs: Some("share/c1".into()),
            argv: vec!["sh".into()],
            ..ProcessSpec::default()
        };
        ContainerPlan {
            dir: dir.join("c1"),
            ..ContainerPlan::with_root_dir(&process, Path::new("/run/share/c1"))
        }
    }

    #[test]
    fn remove_dir_removes_the_writable_layer_and_the_empty_root() {
        let temp = TempDir::new("containers-remove");
        let plan = plan_in(temp.path());
        plan.make_dirs().unwrap();
        std::fs::write(plan.upper().join("file"), "x").unwrap();
        std::fs::write(plan.pid_file(), "42").unwrap();

        remove_dir(&plan).unwrap();

        assert!(!plan.dir.exists());
    }

    #[test]
    fn remove_dir_never_empties_a_root_that_holds_files() {
        // What a root still bound to a host share would look like: its files stay.
        let temp = TempDir::new("containers-remove-root");
        let plan = plan_in(temp.path());
        plan.make_dirs().unwrap();
        std::fs::write(plan.root().join("host-file"), "keep").unwrap();

        assert!(remove_dir(&plan).is_err());

        assert_eq!(
            std::fs::read_to_string(plan.root().join("host-file")).unwrap(),
            "keep"
        );
    }

    #[test]
    fn rootfs_dir_refuses_a_symlink_out_of_the_share() {
        let temp = TempDir::new("containers-rootfs-escape");
        let share = temp.path().join("share");
        std::fs::create_dir_all(share.join("c1")).unwrap();
        std::os::unix::fs::symlink(temp.path(), share.join("out")).unwrap();
        let spec = PodSpec::from_json(
            format!(
                r#"{{"name": "p", "filesystems": [{{"tag": "share", "path": "{}"}}]}}"#,
                share.display()
            )
            .as_bytes(),
        )
        .unwrap();

        let inside = rootfs_dir(0, &spec, "share/c1").unwrap();
        let outside = rootfs_dir(0, &spec, "share/out").unwrap_err();
        let missing = rootfs_dir(0, &spec, "share/none").unwrap_err();

        assert_eq!(inside, std::fs::canonicalize(share.join("c1")).unwrap());
        assert!(
            matches!(outside, ContainerError::RootfsOutside { .. }),
            "{outside}"
        );
        assert!(
            matches!(missing, ContainerError::RootfsDir { .. }),
            "{missing}"
        );
    }

    /// Found by the container_create fuzz target: a volume named as the share's tag made
    /// the volume's mount the bound, so a symlink from the share into the rest of the
    /// volume was taken.
    #[test]
    fn rootfs_dir_is_bound_by_the_share_when_a_volume_has_its_tag_as_name() {
        let temp = TempDir::new("containers-rootfs-volume");
        let volume = temp.path().join("data");
        let share = volume.join("share");
        std::fs::create_dir_all(share.join("c1")).unwrap();
        std::fs::create_dir_all(volume.join("secret")).unwrap();
        std::os::unix::fs::symlink(volume.join("secret"), share.join("out")).unwrap();
        let spec = PodSpec::from_json(
            format!(
                r#"{{"name": "p", "volumes": [{{"name": "data", "path": "{}"}}],
                    "filesystems": [{{"tag": "data", "path": "{}"}}]}}"#,
                volume.display(),
                share.display()
            )
            .as_bytes(),
        )
        .unwrap();

        let inside = rootfs_dir(0, &spec, "data/c1").unwrap();
        let outside = rootfs_dir(0, &spec, "data/out").unwrap_err();

        assert_eq!(inside, std::fs::canonicalize(share.join("c1")).unwrap());
        assert!(
            matches!(outside, ContainerError::RootfsOutside { .. }),
            "{outside}"
        );
    }
}
