//! The pod's shared filesystems: virtio-fs tags the host attached with
//! `crib run --fs tag=TAG,...`, each mounted at its spec path after the
//! volumes (`mount(TAG, PATH, "virtiofs", MS_RDONLY if readonly, NULL)`).
//! They are unmounted at shutdown with the volumes, last mounted first.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use initramfs::podspec::FsSpec;
use thiserror::Error;

use crate::console::say;
use crate::volumes::{self, Volumes};

/// The kernel's name for virtio-fs (`mount -t virtiofs`).
pub const FS_TYPE: &str = "virtiofs";
/// Mode of mount points cradle creates.
const MOUNT_POINT_MODE: u32 = 0o755;

/// Errors of mounting a filesystem. Each names the tag and the fix.
#[derive(Debug, Error)]
pub enum FsMountError {
    #[error("filesystem {tag}: cannot create the mount point {}", path.display())]
    MountPoint {
        tag: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Linux answers EINVAL when no virtio-fs device has the tag.
    #[error("filesystem {tag}: no virtio-fs device has the tag {tag:?}; attach one with crib run --fs tag={tag},dir=HOSTDIR (or --fs tag={tag},socket=PATH for a running virtiofsd)")]
    NoSuchTag { tag: String },
    #[error("filesystem {tag}: the kernel has no virtiofs driver; boot a kernel with CONFIG_VIRTIO_FS (crib's pod kernel has it built in)")]
    NoDriver { tag: String },
    #[error("filesystem {tag}: cannot mount it on {} (virtiofs)", path.display())]
    Mount {
        tag: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One mount to make: what the spec asks, as mount(2) arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsMount {
    pub tag: String,
    pub path: PathBuf,
    pub flags: libc::c_ulong,
}

impl FsMount {
    /// Whether the mount is read-only.
    pub fn readonly(&self) -> bool {
        self.flags & libc::MS_RDONLY != 0
    }

    /// The console line once mounted, without the `cradle: ` prefix.
    pub fn describe(&self) -> String {
        format!(
            "filesystem {} -> {} ({FS_TYPE}, {})",
            self.tag,
            self.path.display(),
            if self.readonly() { "ro" } else { "rw" }
        )
    }

    /// The error for a failed mount(2) (pure).
    pub fn error(&self, source: io::Error) -> FsMountError {
        match source.raw_os_error() {
            Some(libc::EINVAL) => FsMountError::NoSuchTag {
                tag: self.tag.clone(),
            },
            Some(libc::ENODEV) => FsMountError::NoDriver {
                tag: self.tag.clone(),
            },
            _ => FsMountError::Mount {
                tag: self.tag.clone(),
                path: self.path.clone(),
                source,
            },
        }
    }
}

/// The mounts of the spec's filesystems, in order (pure).
pub fn plan(specs: &[FsSpec]) -> Vec<FsMount> {
    specs
        .iter()
        .map(|spec| FsMount {
            tag: spec.tag.clone(),
            path: PathBuf::from(&spec.path),
            flags: if spec.readonly { libc::MS_RDONLY } else { 0 },
        })
        .collect()
}

/// Mounts every filesystem in spec order, printing one line each; each
/// mounted one is recorded in `volumes` so it is unmounted at shutdown.
pub fn mount_all(specs: &[FsSpec], volumes: &mut Volumes) -> Result<(), FsMountError> {
    for mount in plan(specs) {
        mount_one(&mount)?;
        say!("{}", mount.describe());
        volumes.record_mount(mount.path);
    }
    Ok(())
}

/// Creates the mount point and mounts the tag there.
fn mount_one(mount: &FsMount) -> Result<(), FsMountError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(MOUNT_POINT_MODE)
        .create(&mount.path)
        .map_err(|source| FsMountError::MountPoint {
            tag: mount.tag.clone(),
            path: mount.path.clone(),
            source,
        })?;
    volumes::mount_raw(Path::new(&mount.tag), &mount.path, FS_TYPE, mount.flags)
        .map_err(|source| mount.error(source))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(tag: &str, path: &str, readonly: bool) -> FsSpec {
        FsSpec {
            tag: tag.to_owned(),
            path: path.to_owned(),
            readonly,
        }
    }

    #[test]
    fn plan_keeps_the_spec_order_and_maps_readonly_to_ms_rdonly() {
        let mounts = plan(&[spec("gfs", "/shared", false), spec("ro", "/ro", true)]);

        assert_eq!(
            mounts,
            [
                FsMount {
                    tag: "gfs".to_owned(),
                    path: PathBuf::from("/shared"),
                    flags: 0,
                },
                FsMount {
                    tag: "ro".to_owned(),
                    path: PathBuf::from("/ro"),
                    flags: libc::MS_RDONLY,
                },
            ]
        );
    }

    #[test]
    fn plan_of_no_filesystems_is_empty() {
        assert!(plan(&[]).is_empty());
    }

    #[test]
    fn describe_read_write_says_rw() {
        let mounts = plan(&[spec("gfs", "/shared", false)]);

        assert_eq!(
            mounts[0].describe(),
            "filesystem gfs -> /shared (virtiofs, rw)"
        );
    }

    #[test]
    fn describe_readonly_says_ro() {
        let mounts = plan(&[spec("gfs", "/shared", true)]);

        assert_eq!(
            mounts[0].describe(),
            "filesystem gfs -> /shared (virtiofs, ro)"
        );
    }

    #[test]
    fn error_einval_is_no_such_tag_naming_the_fix() {
        let mounts = plan(&[spec("gfs", "/shared", false)]);

        let error = mounts[0].error(io::Error::from_raw_os_error(libc::EINVAL));

        assert!(matches!(&error, FsMountError::NoSuchTag { tag } if tag == "gfs"));
        let text = error.to_string();
        assert!(text.contains("--fs tag=gfs,dir="), "{text}");
    }

    #[test]
    fn error_enodev_is_no_driver() {
        let mounts = plan(&[spec("gfs", "/shared", false)]);

        let error = mounts[0].error(io::Error::from_raw_os_error(libc::ENODEV));

        assert!(matches!(error, FsMountError::NoDriver { .. }));
    }

    #[test]
    fn error_other_keeps_the_cause() {
        let mounts = plan(&[spec("gfs", "/shared", false)]);

        let error = mounts[0].error(io::Error::from_raw_os_error(libc::EACCES));

        let chain = crate::console::error_chain(&error);
        assert!(
            chain.contains("filesystem gfs: cannot mount it on /shared"),
            "{chain}"
        );
        assert!(chain.contains("ermission denied"), "{chain}");
    }

    #[test]
    fn mount_one_unwritable_mount_point_is_a_mount_point_error() {
        // A path below a regular file cannot be created.
        let dir = crate::testing::TempDir::new("fs-mount-point");
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let mount = FsMount {
            tag: "gfs".to_owned(),
            path: file.join("shared"),
            flags: 0,
        };

        let error = mount_one(&mount).unwrap_err();

        assert!(matches!(error, FsMountError::MountPoint { .. }));
    }

    #[test]
    fn mount_all_of_no_filesystems_records_nothing() {
        let mut volumes = Volumes::default();

        mount_all(&[], &mut volumes).unwrap();

        assert!(volumes.is_empty());
    }
}
