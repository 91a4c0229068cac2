//! What one container is, as PID 1 decides it and the set-up stage reads it (passed as
//! JSON on the stage's command line): its layers, its directory (writable layer and root
//! mount point) and its process after Docker's rules. User names are resolved later, by
//! the stage, in the image's own /etc/passwd.

use std::path::{Path, PathBuf};

use initramfs::containers::{
    effective_command, merge_env, Overrides, ResolvedImages, DEFAULT_IMAGE_PATH,
};
use initramfs::podspec::ProcessSpec;
use serde::{Deserialize, Serialize};

use super::layers::Layers;
use super::{ContainerError, RUN_DIR};

/// One container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerPlan {
    /// The process's name; also the container's hostname.
    pub name: String,
    /// The image reference and its manifest digest.
    pub image: String,
    pub digest: String,
    /// Mounted layers, top first (overlayfs's lowerdir order).
    pub lower: Vec<PathBuf>,
    /// Holds `upper/`, `work/`, `root/` (the overlay) and `pid` (the container's PID 1).
    pub dir: PathBuf,
    pub argv: Vec<String>,
    /// How argv came about, for `docker inspect`.
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: String,
    /// The container's cgroup (`Containers::create` always makes one).
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// Bind mounts: cradle's directory, the path in the container, read-only.
    #[serde(default)]
    pub mounts: Vec<(PathBuf, String, bool)>,
    /// A root bound from this directory of cradle's (a virtio-fs share, the process's
    /// `rootfs`) instead of an overlay of layers.
    #[serde(default)]
    pub root_bind: Option<PathBuf>,
}

impl ContainerPlan {
    /// The container of process `index` (`process`), whose image is in `resolved` and
    /// whose layers are mounted in `layers`.
    pub fn new(
        index: usize,
        process: &ProcessSpec,
        resolved: &ResolvedImages,
        layers: &Layers,
    ) -> Result<Self, ContainerError> {
        let reference = process.image.clone().unwrap_or_default();
        let unresolved = || ContainerError::Unresolved {
            index,
            image: reference.clone(),
        };
        let image = resolved.images.get(&reference).ok_or_else(unresolved)?;
        let lower = image
            .layers
            .iter()
            .rev()
            .map(|diff_id| layers.path(diff_id).map(Path::to_path_buf))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(unresolved)?;
        let effective = effective_command(
            &format!("processes[{index}]"),
            &image.config,
            Overrides {
                argv: &process.argv,
                entrypoint: process.entrypoint.as_deref(),
                env: &process.env,
                cwd: process.cwd.as_deref(),
                user: process.user.as_deref(),
            },
        )?;
        Ok(Self {
            name: process.name.clone(),
            image: reference.clone(),
            digest: image.digest.clone(),
            lower,
            dir: Path::new(RUN_DIR).join("c").join(&process.name),
            argv: effective.argv,
            entrypoint: effective.entrypoint,
            cmd: effective.cmd,
            env: effective.env,
            cwd: effective.cwd,
            user: effective.user,
            cgroup: None,
            mounts: Vec::new(),
            root_bind: None,
        })
    }

    /// The container of `process`, whose `rootfs` filesystem is mounted
    /// at `root` in cradle: its root is that directory as it is, its argv, env, cwd and
    /// user are the spec's (no image config gives defaults; PATH defaults to Docker's).
    pub fn with_root_dir(process: &ProcessSpec, root: &Path) -> Self {
        let tag = process.rootfs.clone().unwrap_or_default();
        let env = merge_env(&[format!("PATH={DEFAULT_IMAGE_PATH}")], &process.env);
        Self {
            name: process.name.clone(),
            image: format!("rootfs:{tag}"),
            digest: String::new(),
            lower: Vec::new(),
            dir: Path::new(RUN_DIR).join("c").join(&process.name),
            argv: process.argv.clone(),
            entrypoint: Vec::new(),
            cmd: process.argv.clone(),
            env,
            cwd: process.cwd.clone().unwrap_or_else(|| "/".to_owned()),
            user: process.user.clone().unwrap_or_else(|| "0".to_owned()),
            cgroup: None,
            mounts: Vec::new(),
            root_bind: Some(root.to_path_buf()),
        }
    }

    pub fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }

    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }

    /// The overlay's mount point: the container's root.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// Where the stage writes the container's PID 1 (as cradle sees it).
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("pid")
    }

    /// overlayfs's options.
    pub fn overlay_options(&self) -> String {
        let lower: Vec<String> = self.lower.iter().map(|p| p.display().to_string()).collect();
        format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            self.upper().display(),
            self.work().display()
        )
    }

    /// Creates the writable layer's directories and the mount point.
    pub fn make_dirs(&self) -> Result<(), ContainerError> {
        for dir in [self.upper(), self.work(), self.root()] {
            std::fs::create_dir_all(&dir)
                .map_err(|source| ContainerError::Dir { path: dir, source })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use initramfs::containers::{ImageConfig, ImageSpec, LayerSpec};

    use super::*;

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn plan_stacks_layers_top_first_and_applies_the_image_config() {
        let resolved = ResolvedImages {
            layers: vec![
                LayerSpec {
                    diff_id: digest('a'),
                    offset: 0,
                    size: 4096,
                },
                LayerSpec {
                    diff_id: digest('b'),
                    offset: 4096,
                    size: 4096,
                },
            ],
            images: BTreeMap::from([(
                "img".to_owned(),
                ImageSpec {
                    digest: digest('c'),
                    layers: vec![digest('a'), digest('b')],
                    config: ImageConfig {
                        cmd: Some(vec!["/bin/sh".into()]),
                        user: Some("app".into()),
                        ..ImageConfig::default()
                    },
                },
            )]),
        };
        let layers = Layers::fake(&[
            (&digest('a'), "/run/cradle/l/0"),
            (&digest('b'), "/run/cradle/l/1"),
        ]);
        let process = ProcessSpec {
            name: "web".into(),
            image: Some("img".into()),
            ..ProcessSpec::default()
        };
        let plan = ContainerPlan::new(0, &process, &resolved, &layers).unwrap();
        assert_eq!(plan.argv, ["/bin/sh"]);
        assert_eq!(plan.user, "app");
        assert_eq!(
            plan.overlay_options(),
            "lowerdir=/run/cradle/l/1:/run/cradle/l/0,upperdir=/run/cradle/c/web/upper,workdir=/run/cradle/c/web/work"
        );

        let other = ProcessSpec {
            image: Some("missing".into()),
            ..process
        };
        let err = ContainerPlan::new(3, &other, &resolved, &layers).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("processes[3]: image \"missing\""),
            "{err}"
        );
    }

    #[test]
    fn rootfs_plan_binds_the_share_and_takes_the_spec_as_it_is() {
        let process = ProcessSpec {
            name: "ctr".into(),
            rootfs: Some("root".into()),
            argv: vec!["uname".into(), "-r".into()],
            env: vec!["A=b".into()],
            user: Some("1000:1000".into()),
            ..ProcessSpec::default()
        };
        let plan = ContainerPlan::with_root_dir(&process, Path::new("/run/rootfs"));
        assert_eq!(plan.root_bind.as_deref(), Some(Path::new("/run/rootfs")));
        assert_eq!(plan.argv, ["uname", "-r"]);
        assert_eq!(
            plan.env,
            [format!("PATH={DEFAULT_IMAGE_PATH}"), "A=b".into()]
        );
        assert_eq!((plan.cwd.as_str(), plan.user.as_str()), ("/", "1000:1000"));
    }
}
