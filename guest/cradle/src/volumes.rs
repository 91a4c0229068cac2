//! The pod's block volumes: find each one's disk by serial (a virtio-blk
//! disk, or an NVMe namespace passed through with `--vfio`), link it as
//! `/dev/volumes/<name>`, and, for a volume with a `path`, format it if it
//! is blank and mount it there. At shutdown, unmount in reverse order.
//!
//! A disk is formatted only when its first [`probe::PROBE_BYTES`] are all
//! zero: anything else that is not ext4 or xfs (a partition table, another
//! filesystem, an interrupted format) is an error, never overwritten.
//! Formatting runs `/sbin/mkfs.<fs>`, which the initramfs builder ships
//! (`crib-initramfs --mkfs`), with lazy inode-table and journal init so it
//! takes milliseconds; the kernel zeroes those tables in the background.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::ptr;
use std::time::{Duration, Instant};

use initramfs::podspec::{Filesystem, VolumeSpec};
use thiserror::Error;

use crate::console::say;
use crate::disks::{self, DiskError, DiskId, DiskScanner, Wait, Wanted};
use crate::probe::{self, Content};

/// How long the volumes' disks may take to appear after the driver loaded.
const DISK_WAIT_MS: u64 = 5000;
/// How often /sys/block is read meanwhile.
const DISK_POLL_MS: u64 = 1;
/// Directory of the `/dev/volumes/<name>` links, under the dev dir.
const VOLUME_LINK_DIR: &str = "volumes";
/// Mode of mount points cradle creates.
const MOUNT_POINT_MODE: u32 = 0o755;
/// Waiting longer than this for the kernel's random pool is worth a line.
const SLOW_RANDOM_MS: u128 = 100;

/// Errors of setting up volumes. Each names the volume and the fix.
#[derive(Debug, Error)]
pub enum VolumeError {
    #[error("cannot find the volumes' disks")]
    Disks(#[from] DiskError),
    #[error("volume {volume}: cannot create the link {}", link.display())]
    Link {
        volume: String,
        link: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("volume {volume}: cannot read {}", device.display())]
    Probe {
        volume: String,
        device: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("volume {volume}: {} has an {found} filesystem but the spec says fs {wanted}; set fs to {found} (or leave it out) or attach a blank disk", device.display())]
    FsMismatch {
        volume: String,
        device: PathBuf,
        found: Filesystem,
        wanted: Filesystem,
    },
    #[error("volume {volume}: {} holds data that is neither ext4 nor xfs; cradle formats only blank disks (the first {} KiB all zero): zero it on the host to have it formatted", device.display(), probe::PROBE_BYTES / 1024)]
    NotBlank { volume: String, device: PathBuf },
    #[error("volume {volume}: {} has no filesystem and the volume is read-only, so it cannot be formatted; attach a formatted disk or set readonly to false", device.display())]
    ReadonlyBlank { volume: String, device: PathBuf },
    #[error("volume {volume}: {} has no filesystem and there is no {} to format it as {fs}; build the initramfs with --mkfs PATH/mkfs.{fs}", device.display(), tool.display())]
    NoMkfs {
        volume: String,
        device: PathBuf,
        fs: Filesystem,
        tool: PathBuf,
    },
    #[error("volume {volume}: cannot run {}", tool.display())]
    FormatSpawn {
        volume: String,
        tool: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("volume {volume}: formatting {} as {fs} failed ({status})", device.display())]
    Format {
        volume: String,
        device: PathBuf,
        fs: Filesystem,
        status: String,
    },
    #[error("volume {volume}: cannot create the mount point {}", path.display())]
    MountPoint {
        volume: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("volume {volume}: the kernel has no {fs} driver; build the initramfs with the {fs} module (crib-initramfs --modules <defaults>,{fs})")]
    NoDriver { volume: String, fs: Filesystem },
    #[error("volume {volume}: cannot mount {} on {} ({fs})", device.display(), path.display())]
    Mount {
        volume: String,
        device: PathBuf,
        path: PathBuf,
        fs: Filesystem,
        #[source]
        source: io::Error,
    },
}

/// Where things are: the guest's real paths, or a temp dir in tests.
#[derive(Debug, Clone)]
pub struct Layout {
    /// `/sys/block`.
    pub sys_block: PathBuf,
    /// `/dev`: disk nodes, and the `volumes/` links cradle makes.
    pub dev: PathBuf,
    /// Where `mkfs.<fs>` tools are: `/sbin`.
    pub mkfs_dir: PathBuf,
    pub wait: Wait,
}

impl Layout {
    /// The paths inside the guest.
    pub fn guest() -> Self {
        Self {
            sys_block: PathBuf::from("/sys/block"),
            dev: PathBuf::from("/dev"),
            mkfs_dir: PathBuf::from("/sbin"),
            wait: Wait {
                timeout: Duration::from_millis(DISK_WAIT_MS),
                poll: Duration::from_millis(DISK_POLL_MS),
            },
        }
    }
}

/// What to do with a volume's disk before mounting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    Mount(Filesystem),
    FormatThenMount(Filesystem),
}

/// The mounted volumes, in mount order, to unmount at shutdown.
#[derive(Debug, Default)]
pub struct Volumes {
    mounted: Vec<PathBuf>,
}

impl Volumes {
    /// Whether any volume is mounted.
    pub fn is_empty(&self) -> bool {
        self.mounted.is_empty()
    }

    /// Records a mount made elsewhere (a pod filesystem), to unmount it at
    /// shutdown with the volumes.
    pub fn record_mount(&mut self, path: PathBuf) {
        self.mounted.push(path);
    }

    /// Sets up every volume, in spec order, printing one line each. On an
    /// error the volumes mounted so far stay recorded for [`Self::tear_down`].
    pub fn set_up(&mut self, specs: &[VolumeSpec], layout: &Layout) -> Result<(), VolumeError> {
        if specs.is_empty() {
            return Ok(());
        }
        let wanted: Vec<Wanted> = specs.iter().map(wanted).collect();
        let mut scanner = DiskScanner::new(&layout.sys_block);
        let devices = disks::wait_for_disks(&mut scanner, &layout.dev, &wanted, layout.wait)?;
        for spec in specs {
            // wait_for_disks returned a device for every name.
            let Some(device) = devices.get(&spec.name) else {
                continue;
            };
            let device = layout.dev.join(device);
            link(spec, &device, layout)?;
            let Some(path) = &spec.path else {
                say!("volume {}: {} (no mount)", spec.name, device.display());
                continue;
            };
            let fs = prepare(spec, &device, layout)?;
            let path = PathBuf::from(path);
            mount(spec, &device, &path, fs)?;
            say!(
                "volume {}: {} -> {} ({fs}, {})",
                spec.name,
                device.display(),
                path.display(),
                if spec.readonly { "ro" } else { "rw" }
            );
            self.mounted.push(path);
        }
        Ok(())
    }

    /// Syncs, then unmounts every volume, last mounted first. A busy one is
    /// remounted read-only instead, so its journal is clean at power-off.
    pub fn tear_down(self) {
        if self.mounted.is_empty() {
            return;
        }
        // SAFETY: sync takes no arguments and cannot fail.
        unsafe { libc::sync() };
        for path in self.mounted.iter().rev() {
            if let Err(error) = unmount(path) {
                say!(
                    "warning: cannot unmount {}: {error}; remounting it read-only",
                    path.display()
                );
                if let Err(error) = remount_read_only(path) {
                    say!(
                        "warning: cannot remount {} read-only: {error}",
                        path.display()
                    );
                }
            }
        }
    }
}

/// Which disk a volume is: its NVMe namespace, or else the virtio-blk disk
/// named after it.
fn wanted(spec: &VolumeSpec) -> Wanted<'_> {
    match spec.nvme() {
        Some((serial, nsid)) => Wanted {
            name: &spec.name,
            id: DiskId::Nvme { serial, nsid },
        },
        None => Wanted::virtio(&spec.name),
    }
}

/// `/dev/volumes/<name>` -> the disk's node, replacing a stale link.
fn link(spec: &VolumeSpec, device: &Path, layout: &Layout) -> Result<(), VolumeError> {
    let dir = layout.dev.join(VOLUME_LINK_DIR);
    let link = dir.join(&spec.name);
    let error = |source| VolumeError::Link {
        volume: spec.name.clone(),
        link: link.clone(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(error)?;
    match std::fs::remove_file(&link) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(error(e)),
    }
    std::os::unix::fs::symlink(device, &link).map_err(error)
}

/// Probes the disk and formats it if the plan says so; returns the
/// filesystem to mount.
fn prepare(spec: &VolumeSpec, device: &Path, layout: &Layout) -> Result<Filesystem, VolumeError> {
    let head = probe::read_head(device).map_err(|source| VolumeError::Probe {
        volume: spec.name.clone(),
        device: device.to_path_buf(),
        source,
    })?;
    match plan(spec, device, probe::identify(&head))? {
        Plan::Mount(fs) => Ok(fs),
        Plan::FormatThenMount(fs) => {
            say!(
                "volume {}: formatting {} as {fs}",
                spec.name,
                device.display()
            );
            format(spec, device, fs, &layout.mkfs_dir)?;
            Ok(fs)
        }
    }
}

/// Decides from what the disk holds (pure).
pub fn plan(spec: &VolumeSpec, device: &Path, content: Content) -> Result<Plan, VolumeError> {
    match content {
        Content::Filesystem(found) => match spec.fs {
            Some(wanted) if wanted != found => Err(VolumeError::FsMismatch {
                volume: spec.name.clone(),
                device: device.to_path_buf(),
                found,
                wanted,
            }),
            _ => Ok(Plan::Mount(found)),
        },
        Content::Blank if spec.readonly => Err(VolumeError::ReadonlyBlank {
            volume: spec.name.clone(),
            device: device.to_path_buf(),
        }),
        Content::Blank => Ok(Plan::FormatThenMount(spec.fs.unwrap_or_default())),
        Content::Unknown => Err(VolumeError::NotBlank {
            volume: spec.name.clone(),
            device: device.to_path_buf(),
        }),
    }
}

/// Command-line options of `mkfs.<fs>`: quiet, no questions, no discard
/// (the disk is blank; discarding a large one takes long), and for ext4
/// lazy inode-table and journal init.
pub fn mkfs_args(fs: Filesystem) -> &'static [&'static str] {
    match fs {
        Filesystem::Ext4 => &[
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
        ],
        Filesystem::Xfs => &["-q", "-f", "-K"],
    }
}

/// Runs `<mkfs_dir>/mkfs.<fs>` on the device, output to the console.
fn format(
    spec: &VolumeSpec,
    device: &Path,
    fs: Filesystem,
    mkfs_dir: &Path,
) -> Result<(), VolumeError> {
    let tool = mkfs_dir.join(format!("mkfs.{fs}"));
    if !tool.exists() {
        return Err(VolumeError::NoMkfs {
            volume: spec.name.clone(),
            device: device.to_path_buf(),
            fs,
            tool,
        });
    }
    wait_for_random(&spec.name);
    let status = Command::new(&tool)
        .args(mkfs_args(fs))
        .arg(device)
        .stdin(Stdio::null())
        .status()
        .map_err(|source| VolumeError::FormatSpawn {
            volume: spec.name.clone(),
            tool: tool.clone(),
            source,
        })?;
    if !status.success() {
        return Err(VolumeError::Format {
            volume: spec.name.clone(),
            device: device.to_path_buf(),
            fs,
            status: status.to_string(),
        });
    }
    Ok(())
}

/// Blocks until the kernel's random pool is initialized. mkfs needs random
/// UUIDs and seeds; libuuid polls a non-blocking `getrandom` 8 times 125 ms
/// per value, so with the pool not ready mke2fs takes 4 s. A blocking
/// `getrandom` makes the kernel gather jitter entropy at once (Linux 5.18+):
/// no wait when the CPU has RDRAND (the kernel then seeds at boot), about
/// 1 s without it under emulation.
fn wait_for_random(volume: &str) {
    let start = Instant::now();
    let mut byte = 0u8;
    loop {
        // SAFETY: getrandom writes at most 1 byte into the local, which
        // outlives the call.
        let rc = unsafe { libc::getrandom((&raw mut byte).cast(), 1, 0) };
        if rc >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break;
        }
    }
    let waited = start.elapsed().as_millis();
    if waited > SLOW_RANDOM_MS {
        say!(
            "warning: volume {volume}: waited {waited} ms for the kernel's random pool before \
             formatting; give the guest RDRAND (CPUID), virtio-rng or a boot-time seed"
        );
    }
}

/// Creates the mount point and mounts the device there, read-only if the
/// spec says so.
fn mount(spec: &VolumeSpec, device: &Path, path: &Path, fs: Filesystem) -> Result<(), VolumeError> {
    let mount_point_error = |source| VolumeError::MountPoint {
        volume: spec.name.clone(),
        path: path.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(MOUNT_POINT_MODE)
        .create(path)
        .map_err(mount_point_error)?;
    let flags = if spec.readonly { libc::MS_RDONLY } else { 0 };
    mount_raw(device, path, fs.as_str(), flags).map_err(|source| {
        if source.raw_os_error() == Some(libc::ENODEV) {
            VolumeError::NoDriver {
                volume: spec.name.clone(),
                fs,
            }
        } else {
            VolumeError::Mount {
                volume: spec.name.clone(),
                device: device.to_path_buf(),
                path: path.to_path_buf(),
                fs,
                source,
            }
        }
    })
}

/// A path as a C string; a NUL inside is an invalid-input error.
fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// `mount(2)` of a block device (or a virtio-fs tag) without data.
pub fn mount_raw(
    device: &Path,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
) -> io::Result<()> {
    let device = c_path(device)?;
    let target = c_path(target)?;
    let fstype = CString::new(fstype).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the three strings are NUL-terminated and live across the
    // call; the kernel only reads them. No data argument is passed.
    let rc = unsafe {
        libc::mount(
            device.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `umount2(path, 0)`.
fn unmount(path: &Path) -> io::Result<()> {
    let target = c_path(path)?;
    // SAFETY: the string is NUL-terminated and lives across the call.
    if unsafe { libc::umount2(target.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Remounts `path` read-only, which flushes and closes its journal.
fn remount_read_only(path: &Path) -> io::Result<()> {
    let target = c_path(path)?;
    // SAFETY: the target string is NUL-terminated and lives across the
    // call; a remount ignores source and type, passed as null.
    let rc = unsafe {
        libc::mount(
            ptr::null(),
            target.as_ptr(),
            ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY,
            ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{children_lock, TempDir};

    fn volume(fs: Option<Filesystem>, readonly: bool) -> VolumeSpec {
        VolumeSpec {
            name: "data".to_owned(),
            path: Some("/data".to_owned()),
            fs,
            readonly,
            nvme_serial: None,
            nvme_nsid: None,
        }
    }

    fn vdb() -> &'static Path {
        Path::new("/dev/vdb")
    }

    /// A layout in `dir` with `sys/block`, `dev` and mkfs tools from `mkfs_dir`.
    fn layout(dir: &Path, mkfs_dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("sys/block")).unwrap();
        std::fs::create_dir_all(dir.join("dev")).unwrap();
        Layout {
            sys_block: dir.join("sys/block"),
            dev: dir.join("dev"),
            mkfs_dir: mkfs_dir.to_path_buf(),
            wait: Wait {
                timeout: Duration::from_millis(20),
                poll: Duration::from_millis(1),
            },
        }
    }

    /// A fake virtio-blk disk: sysfs serial plus a sparse 16 MiB "device" file.
    fn add_disk(layout: &Layout, device: &str, serial: &str) -> PathBuf {
        let sys = layout.sys_block.join(device);
        std::fs::create_dir_all(&sys).unwrap();
        std::fs::write(sys.join("serial"), serial).unwrap();
        let node = layout.dev.join(device);
        std::fs::File::create(&node)
            .unwrap()
            .set_len(16 * 1024 * 1024)
            .unwrap();
        node
    }

    #[test]
    fn plan_blank_disk_formats_as_ext4_by_default() {
        let plan = plan(&volume(None, false), vdb(), Content::Blank).unwrap();

        assert_eq!(plan, Plan::FormatThenMount(Filesystem::Ext4));
    }

    #[test]
    fn plan_blank_disk_formats_as_the_spec_fs() {
        let plan = plan(&volume(Some(Filesystem::Xfs), false), vdb(), Content::Blank).unwrap();

        assert_eq!(plan, Plan::FormatThenMount(Filesystem::Xfs));
    }

    #[test]
    fn plan_existing_fs_without_spec_fs_mounts_what_is_there() {
        let content = Content::Filesystem(Filesystem::Xfs);

        let plan = plan(&volume(None, true), vdb(), content).unwrap();

        assert_eq!(plan, Plan::Mount(Filesystem::Xfs));
    }

    #[test]
    fn plan_existing_fs_matching_spec_mounts_it() {
        let content = Content::Filesystem(Filesystem::Ext4);

        let plan = plan(&volume(Some(Filesystem::Ext4), false), vdb(), content).unwrap();

        assert_eq!(plan, Plan::Mount(Filesystem::Ext4));
    }

    #[test]
    fn plan_existing_fs_other_than_spec_is_a_mismatch() {
        let content = Content::Filesystem(Filesystem::Xfs);

        let error = plan(&volume(Some(Filesystem::Ext4), false), vdb(), content).unwrap_err();

        assert!(matches!(
            error,
            VolumeError::FsMismatch {
                found: Filesystem::Xfs,
                wanted: Filesystem::Ext4,
                ..
            }
        ));
    }

    #[test]
    fn plan_readonly_blank_disk_cannot_be_formatted() {
        let error = plan(&volume(None, true), vdb(), Content::Blank).unwrap_err();

        assert!(matches!(error, VolumeError::ReadonlyBlank { .. }));
        assert!(error.to_string().contains("set readonly to false"));
    }

    #[test]
    fn plan_unknown_content_is_never_formatted() {
        let error = plan(&volume(None, false), vdb(), Content::Unknown).unwrap_err();

        assert!(matches!(error, VolumeError::NotBlank { .. }));
    }

    #[test]
    fn mkfs_args_ext4_are_quiet_forced_and_lazy() {
        assert_eq!(
            mkfs_args(Filesystem::Ext4),
            [
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard"
            ]
        );
    }

    #[test]
    fn set_up_volume_without_path_only_links_the_disk() {
        let dir = TempDir::new("volumes-link");
        let layout = layout(dir.path(), dir.path());
        add_disk(&layout, "vda", "other");
        let node = add_disk(&layout, "vdb", "scratch");
        let specs = [VolumeSpec {
            name: "scratch".to_owned(),
            path: None,
            fs: None,
            readonly: false,
            nvme_serial: None,
            nvme_nsid: None,
        }];
        let mut volumes = Volumes::default();

        volumes.set_up(&specs, &layout).unwrap();

        let link = layout.dev.join("volumes/scratch");
        assert_eq!(std::fs::read_link(link).unwrap(), node);
        assert!(volumes.is_empty());
    }

    #[test]
    fn set_up_nvme_volume_links_the_namespace_of_its_controller() {
        let dir = TempDir::new("volumes-nvme");
        let layout = layout(dir.path(), dir.path());
        // The virtio disk named like the volume is not it: nvme_serial wins.
        add_disk(&layout, "vda", "lv");
        let sys = layout.sys_block.join("nvme0n1");
        std::fs::create_dir_all(sys.join("device")).unwrap();
        std::fs::write(sys.join("device/serial"), "crib-nvme0          \n").unwrap();
        std::fs::write(sys.join("nsid"), "1\n").unwrap();
        let node = layout.dev.join("nvme0n1");
        std::fs::write(&node, b"").unwrap();
        let specs = [VolumeSpec {
            name: "lv".to_owned(),
            path: None,
            fs: None,
            readonly: false,
            nvme_serial: Some("crib-nvme0".to_owned()),
            nvme_nsid: None,
        }];
        let mut volumes = Volumes::default();

        volumes.set_up(&specs, &layout).unwrap();

        let link = layout.dev.join("volumes/lv");
        assert_eq!(std::fs::read_link(link).unwrap(), node);
    }

    #[test]
    fn link_replaces_a_stale_link() {
        let dir = TempDir::new("volumes-relink");
        let layout = layout(dir.path(), dir.path());
        std::fs::create_dir_all(layout.dev.join("volumes")).unwrap();
        std::os::unix::fs::symlink("/dev/vdz", layout.dev.join("volumes/data")).unwrap();

        link(&volume(None, false), &layout.dev.join("vdb"), &layout).unwrap();

        let target = std::fs::read_link(layout.dev.join("volumes/data")).unwrap();
        assert_eq!(target, layout.dev.join("vdb"));
    }

    #[test]
    fn link_when_volumes_dir_is_a_file_is_a_link_error() {
        let dir = TempDir::new("volumes-linkfail");
        let layout = layout(dir.path(), dir.path());
        std::fs::write(layout.dev.join("volumes"), b"").unwrap();

        let error = link(&volume(None, false), &layout.dev.join("vdb"), &layout).unwrap_err();

        assert!(matches!(error, VolumeError::Link { .. }));
    }

    #[test]
    fn set_up_missing_disk_is_a_disks_error() {
        let dir = TempDir::new("volumes-missing");
        let layout = layout(dir.path(), dir.path());

        let error = Volumes::default()
            .set_up(&[volume(None, false)], &layout)
            .unwrap_err();

        assert!(matches!(
            error,
            VolumeError::Disks(DiskError::Missing { .. })
        ));
    }

    #[test]
    fn prepare_blank_disk_without_mkfs_names_the_tool() {
        let dir = TempDir::new("volumes-nomkfs");
        let layout = layout(dir.path(), &dir.path().join("sbin"));
        let node = add_disk(&layout, "vdb", "data");

        let error = prepare(&volume(None, false), &node, &layout).unwrap_err();

        assert!(matches!(
            &error,
            VolumeError::NoMkfs {
                fs: Filesystem::Ext4,
                ..
            }
        ));
        assert!(error.to_string().contains("mkfs.ext4"));
    }

    #[test]
    fn prepare_disk_with_unknown_data_is_not_formatted() {
        let dir = TempDir::new("volumes-notblank");
        let layout = layout(dir.path(), Path::new("/usr/sbin"));
        let node = add_disk(&layout, "vdb", "data");
        std::fs::write(&node, b"precious data").unwrap();

        let error = prepare(&volume(None, false), &node, &layout).unwrap_err();

        assert!(matches!(error, VolumeError::NotBlank { .. }));
        assert_eq!(std::fs::read(&node).unwrap(), b"precious data");
    }

    #[test]
    fn prepare_missing_device_is_a_probe_error() {
        let dir = TempDir::new("volumes-noprobe");
        let layout = layout(dir.path(), dir.path());

        let error = prepare(&volume(None, false), &layout.dev.join("vdq"), &layout).unwrap_err();

        assert!(matches!(error, VolumeError::Probe { .. }));
    }

    #[test]
    fn prepare_blank_disk_formats_it_with_host_mkfs_ext4_then_keeps_it() {
        // Runs the real mkfs.ext4 with cradle's options on a sparse file.
        let mkfs_dir = Path::new("/usr/sbin");
        if !mkfs_dir.join("mkfs.ext4").exists() {
            eprintln!("skipped: no /usr/sbin/mkfs.ext4 (apt-get install e2fsprogs)");
            return;
        }
        let dir = TempDir::new("volumes-format");
        let layout = layout(dir.path(), mkfs_dir);
        let node = add_disk(&layout, "vdb", "data");
        let _children = children_lock();

        let fs = prepare(&volume(None, false), &node, &layout).unwrap();
        let head = probe::read_head(&node).unwrap();
        // A second boot finds the filesystem and does not format again.
        let again = plan(&volume(None, false), &node, probe::identify(&head)).unwrap();

        assert_eq!(fs, Filesystem::Ext4);
        assert_eq!(again, Plan::Mount(Filesystem::Ext4));
    }
}
