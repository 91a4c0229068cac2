//! `crib pod`: one pod end to end from one JSON launch file (`crib pod run FILE`), and the
//! commands that find running pods by name (`crib pod ls`, `stop`, `logs`).
//!
//! A launch file holds the guest's pod spec (docs/POD_SPEC.md, passed through to cradle as
//! `--pod` does) and what the host attaches for it: a disk per volume, virtio-fs shares,
//! vCPUs and memory. [`Launch::prepare`] turns it into the [`VmConfig`] `crib run`
//! would use, with every socket in the pod's run directory:
//!
//! ```text
//! <run root>/<pod name>/
//!   api.sock      crib's HTTP API (docs/api.yaml)
//!   docker.sock   the pod's Docker API (cradle's vdocker, through vsock port 1)
//!   vsock.sock    the hybrid vsock socket (`CONNECT <port>`)
//!   console.log   the serial console
//!   spec.json     the pod spec handed to cradle (with the `resolved` images, if any)
//!   info.json     who runs the pod: pid, start time, the paths above, image digests
//!   exit.json     crib's exit code once the pod has ended, empty until then (`crib pod
//!                 stop` reports it)
//!   lock          held (flock) by the `crib pod run` of this pod
//! ```
//!
//! A pod is running when its API socket answers; `crib pod ls` lists those.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use initramfs::podspec::{PodSpec, PodSpecError};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::{self, ConsoleConfig, DiskConfig, FsConfig, Origin, VmConfig, VsockConfig};
use crate::pod_images::{self, PodImageError, PodImages};

/// The guest CID of every pod: with hybrid vsock each VM has its own Unix socket, so the
/// CID only has to be valid, not unique.
pub const POD_VSOCK_CID: u32 = 3;
/// Where the pod kernel and initramfs are looked for when the launch file names none.
pub const GUEST_DIR_ENV: &str = "CRIB_GUEST_DIR";
/// Overrides the run root (the directory holding one run directory per pod).
pub const RUN_ROOT_ENV: &str = "CRIB_RUN_ROOT";
/// The pod kernel, relative to the guest directory.
pub const DEFAULT_KERNEL: &str = "pod-kernel/vmlinux";
/// The pod initramfs (cradle), relative to the guest directory.
pub const DEFAULT_INITRD: &str = "initramfs-pod.cpio";
/// crib's API socket in a run directory.
pub const API_SOCKET: &str = "api.sock";
/// The Docker API socket in a run directory.
pub const DOCKER_SOCKET: &str = "docker.sock";
/// The vsock socket in a run directory.
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// The console log in a run directory.
pub const CONSOLE_LOG: &str = "console.log";
/// The pod spec cradle gets, in a run directory.
pub const SPEC_FILE: &str = "spec.json";
/// The state file of a run directory.
pub const INFO_FILE: &str = "info.json";
/// The lock file `crib pod run` holds while the pod runs.
pub const LOCK_FILE: &str = "lock";
/// Where `crib pod run` leaves crib's exit code when the pod ends.
pub const EXIT_FILE: &str = "exit.json";
/// How long `crib pod stop` waits for the exit code after the API went away.
const EXIT_FILE_WAIT: Duration = Duration::from_secs(2);
/// How long a client waits for crib's API to answer one call.
pub const API_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH_BYTES: usize = 107;

/// A host disk backing one pod volume: `--disk` settings without `id`, which is the
/// volume's name (the key in `disks`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodDisk {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub direct: bool,
    #[serde(default = "config::default_queues")]
    pub queues: u16,
    #[serde(default = "config::default_queue_size")]
    pub queue_size: u16,
    #[serde(default, deserialize_with = "config::de_optional_size")]
    pub iops: Option<u64>,
    #[serde(default, deserialize_with = "config::de_optional_size")]
    pub bandwidth: Option<u64>,
    #[serde(default, deserialize_with = "config::de_optional_size")]
    pub burst: Option<u64>,
    #[serde(default, deserialize_with = "config::de_optional_size")]
    pub iops_burst: Option<u64>,
}

/// A virtio-fs share: `--fs` settings without `tag`, which is the key in `shares`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodShare {
    /// A host directory crib serves with a virtiofsd of its own.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Or a running virtiofsd's vhost-user socket.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    #[serde(default = "config::default_queues")]
    pub queues: u16,
    #[serde(default = "config::default_queue_size")]
    pub queue_size: u16,
}

/// `crib pod run FILE`: the pod spec and what the host gives it.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchFile {
    /// The guest's pod spec (docs/POD_SPEC.md), handed to cradle unchanged.
    pub pod: Value,
    /// Default: `<guest dir>/pod-kernel/vmlinux`.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Default: `<guest dir>/initramfs-pod.cpio`.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default = "config::default_cpus", deserialize_with = "config::de_cpus")]
    pub cpus: u8,
    #[serde(
        rename = "memory",
        default = "config::default_memory",
        deserialize_with = "config::de_memory"
    )]
    pub memory_bytes: u64,
    /// Default: `file=<run dir>/console.log`.
    #[serde(default, deserialize_with = "de_some_console")]
    pub console: Option<ConsoleConfig>,
    /// One disk per pod volume, keyed by the volume's name; a volume with
    /// `nvme_serial` has none: its NVMe controller is given in `vfio`.
    #[serde(default)]
    pub disks: BTreeMap<String, PodDisk>,
    /// Host PCI functions passed through, as `--vfio` (NVMe volumes' controllers).
    #[serde(default)]
    pub vfio: Vec<crate::vfio::Bdf>,
    /// virtio-fs shares, keyed by tag.
    #[serde(default)]
    pub shares: BTreeMap<String, PodShare>,
    /// Default: `<run root>/<pod name>`.
    #[serde(default)]
    pub run_dir: Option<PathBuf>,
    /// The pod's network (docs/NETWORK.md): `"none"`, or bridge, subnets, addresses,
    /// ports, MTU, DNS; absent: every default; or `{"attach": "eth0"}`: the VM takes
    /// over an interface in crib's network namespace (CNI's).
    #[serde(default)]
    pub network: Option<Value>,
    /// The image store processes' `image` references are resolved in; default: crib's
    /// (`CRIB_STATE_DIR`, else /var/lib/crib for root, else ~/.local/share/crib).
    #[serde(default)]
    pub image_store: Option<PathBuf>,
    /// Whether images the store lacks are pulled: `"missing"` (default) or `"never"`.
    #[serde(default)]
    pub pull: pod_images::PullMode,
    /// Size of the pod's scratch disk (`"1G"`), where its containers' writable layers
    /// live; none: they are on tmpfs in guest RAM.
    #[serde(default, deserialize_with = "config::de_optional_size")]
    pub scratch: Option<u64>,
    /// Run the VMM jailed (docs/JAIL.md): `"auto"` or `{"uid": N, "gid": N}`; needs root.
    #[serde(default)]
    pub jail: Option<crate::jail::JailSpec>,
}

fn de_some_console<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<ConsoleConfig>, D::Error> {
    config::de_console(deserializer).map(Some)
}

/// A launch file checked and parsed, with relative paths resolved against its directory.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub file: PathBuf,
    pub spec: PodSpec,
    /// The spec exactly as given (fields this crib does not know are cradle's business).
    pub spec_json: Value,
    pub launch: LaunchFile,
    /// The checked `network`; `None` for `"none"`.
    pub network: Option<podnet::NetworkPlan>,
    /// The checked `jail`.
    pub jail: Option<crate::jail::JailRequest>,
}

/// What a pod run uses: the VM and the run directory's paths.
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedPod {
    pub name: String,
    pub run_dir: PathBuf,
    pub config: VmConfig,
    /// The processes' images, resolved (docs/CONTAINERS.md).
    pub images: PodImages,
}

/// Errors of `crib pod`, each naming the file or field and the fix.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("launch file {path}: cannot prepare the pod's images")]
    Images {
        path: PathBuf,
        #[source]
        source: Box<PodImageError>,
    },
    #[error("cannot read launch file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("launch file {path} is larger than 1 MiB: is it the right file?")]
    FileTooLarge { path: PathBuf },
    #[error("launch file {path}: {}", where_in_json(field))]
    Json {
        path: PathBuf,
        field: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("launch file {path}: field pod is not a valid pod spec (docs/POD_SPEC.md)")]
    Spec {
        path: PathBuf,
        #[source]
        source: PodSpecError,
    },
    #[error(
        "launch file {path}: pod.volumes[{index}] '{volume}' has no disk: add \"disks\": {{\"{volume}\": {{\"path\": \"IMAGE\"}}}}"
    )]
    VolumeWithoutDisk {
        path: PathBuf,
        index: usize,
        volume: String,
    },
    #[error(
        "launch file {path}: disks.{disk} is not a volume of the pod: add {{\"name\": \"{disk}\"}} to pod.volumes or remove the disk"
    )]
    DiskWithoutVolume { path: PathBuf, disk: String },
    #[error(
        "launch file {path}: disks.{disk} is for pod.volumes[{index}], an NVMe volume (nvme_serial), which is its controller's namespace: remove the disk and pass the controller in \"vfio\""
    )]
    DiskForNvmeVolume {
        path: PathBuf,
        index: usize,
        disk: String,
    },
    #[error(
        "launch file {path}: pod.filesystems[{index}] '{tag}' has no share: add \"shares\": {{\"{tag}\": {{\"dir\": \"HOSTDIR\"}}}}"
    )]
    FilesystemWithoutShare {
        path: PathBuf,
        index: usize,
        tag: String,
    },
    #[error(
        "launch file {path}: shares.{tag} is not a filesystem of the pod: add {{\"tag\": \"{tag}\", \"path\": \"/mnt/{tag}\"}} to pod.filesystems or remove the share"
    )]
    ShareWithoutFilesystem { path: PathBuf, tag: String },
    #[error("launch file {path}: field {field}: {problem}")]
    Field {
        path: PathBuf,
        field: String,
        problem: String,
    },
    #[error("launch file {path} is not valid")]
    Config {
        path: PathBuf,
        #[source]
        source: config::ConfigError,
    },
    #[error(
        "{what} {path} does not exist: name it with \"{field}\" in the launch file, set ${GUEST_DIR_ENV} to the directory holding {default}, or run scripts/prepare.sh"
    )]
    MissingGuestFile {
        what: &'static str,
        field: &'static str,
        default: &'static str,
        path: PathBuf,
    },
    #[error(
        "run directory {0} is too long for a Unix socket path ({MAX_SOCKET_PATH_BYTES} bytes with the socket name): set \"run_dir\" or --run-root to a shorter directory"
    )]
    RunDirTooLong(PathBuf),
    #[error("cannot create run directory {path}: set --run-root or ${RUN_ROOT_ENV} to a directory you can write")]
    CreateRunDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("run root {path} belongs to uid {owner}, not to you (uid {uid}): set --run-root or ${RUN_ROOT_ENV} to a directory of your own")]
    RunRootNotOurs { path: PathBuf, owner: u32, uid: u32 },
    #[error("run directory {0} exists, is not empty and was not made by crib: crib would delete files in it; set \"run_dir\" to a new or empty directory")]
    RunDirNotOurs(PathBuf),
    #[error("pod {name} is already running (its API answers on {socket}): stop it with `crib pod stop {name}` or pick another pod name")]
    AlreadyRunning { name: String, socket: PathBuf },
    #[error("cannot write {path}")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pod {name} is not running: nothing answers on {socket} (`crib pod ls` lists the running pods)")]
    NotRunning {
        name: String,
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("crib's API on {socket} answered {status}: {message}")]
    Api {
        socket: PathBuf,
        status: u16,
        message: String,
    },
    #[error("crib's API on {socket} sent a reply that is not HTTP/JSON: {what}")]
    BadReply { socket: PathBuf, what: String },
    #[error("cannot read the run root {path}")]
    ReadRunRoot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pod {name} has no console log at {path} (its launch file sends the console elsewhere, or it never ran)")]
    NoConsoleLog {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the console log {path}")]
    ReadLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pod {name} did not stop within {waited:?} (its API still answers): try `crib pod stop {name} --force`")]
    StillRunning { name: String, waited: Duration },
    #[error("launch file {path}: {source}")]
    NetworkField {
        path: PathBuf,
        source: podnet::PodNetError,
    },
    #[error("launch file {path}: pod.network is cradle's, filled in by crib from the launch file's network: move the settings to the top-level \"network\" (docs/NETWORK.md)")]
    SpecNetwork { path: PathBuf },
    #[error("pod {name}: cannot jail it (docs/JAIL.md)")]
    Jail {
        name: String,
        #[source]
        source: crate::jail::JailError,
    },
    #[error("pod {name}: cannot set up its network")]
    Network {
        name: String,
        #[source]
        source: podnet::PodNetError,
    },
}

fn where_in_json(field: &str) -> String {
    if field.is_empty() {
        "not a pod launch file (README.md, \"Pods: crib pod\")".into()
    } else {
        format!("field {field} is invalid")
    }
}

impl LaunchFile {
    /// Reads and checks the launch file at `path`.
    pub fn load(path: &Path) -> Result<Launch, PodError> {
        let read_err = |source| PodError::ReadFile {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut bytes = Vec::new();
        file.take(config::MAX_CONFIG_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > config::MAX_CONFIG_FILE_BYTES {
            return Err(PodError::FileTooLarge {
                path: path.to_path_buf(),
            });
        }
        Self::from_json(&bytes, path)
    }

    /// Parses and checks a launch file's contents; `path` names it in errors and its
    /// directory is where relative paths start.
    pub fn from_json(bytes: &[u8], path: &Path) -> Result<Launch, PodError> {
        let file = path.to_path_buf();
        let json_err = |field: String, source| PodError::Json {
            path: file.clone(),
            field: if field == "." { String::new() } else { field },
            source,
        };
        let mut json = serde_json::Deserializer::from_slice(bytes);
        let mut launch: Self = serde_path_to_error::deserialize(&mut json)
            .map_err(|e| json_err(e.path().to_string(), e.into_inner()))?;
        json.end().map_err(|e| json_err(String::new(), e))?;

        if launch.pod.get("resolved").is_some() {
            // The host's part: crib pod run fills it from the image store.
            return Err(PodError::Field {
                path: file.clone(),
                field: "pod.resolved".into(),
                problem: "is filled by crib pod run from the image store; remove it and name images in processes[].image".into(),
            });
        }
        let spec_bytes = serde_json::to_vec(&launch.pod).map_err(|e| json_err("pod".into(), e))?;
        let spec = PodSpec::from_json(&spec_bytes).map_err(|source| PodError::Spec {
            path: file.clone(),
            source,
        })?;
        for (index, volume) in spec.volumes.iter().enumerate() {
            let has_disk = launch.disks.contains_key(&volume.name);
            if volume.nvme_serial.is_some() {
                if has_disk {
                    return Err(PodError::DiskForNvmeVolume {
                        path: file.clone(),
                        index,
                        disk: volume.name.clone(),
                    });
                }
            } else if !has_disk {
                return Err(PodError::VolumeWithoutDisk {
                    path: file.clone(),
                    index,
                    volume: volume.name.clone(),
                });
            }
        }
        if let Some(disk) = launch
            .disks
            .keys()
            .find(|d| !spec.volumes.iter().any(|v| &v.name == *d))
        {
            return Err(PodError::DiskWithoutVolume {
                path: file.clone(),
                disk: disk.clone(),
            });
        }
        // Read from the JSON rather than the typed spec: the shares only need the tags.
        let fs_tags: Vec<&str> = launch
            .pod
            .get("filesystems")
            .and_then(Value::as_array)
            .map(|all| {
                all.iter()
                    .filter_map(|fs| fs.get("tag").and_then(Value::as_str))
                    .collect()
            })
            .unwrap_or_default();
        for (index, tag) in fs_tags.iter().enumerate() {
            if !launch.shares.contains_key(*tag) {
                return Err(PodError::FilesystemWithoutShare {
                    path: file.clone(),
                    index,
                    tag: tag.to_string(),
                });
            }
        }
        if let Some(share) = launch
            .shares
            .keys()
            .find(|s| !fs_tags.contains(&s.as_str()))
        {
            return Err(PodError::ShareWithoutFilesystem {
                path: file.clone(),
                tag: share.clone(),
            });
        }
        let field_err = |field: String, problem: String| PodError::Field {
            path: file.clone(),
            field,
            problem,
        };
        for (name, disk) in &launch.disks {
            let checked = disk_config(name, disk);
            config::check_disk(&checked).map_err(|p| {
                field_err(
                    format!("disks.{name}.{}", p.key),
                    format!("{}: {}", p.value, p.fix),
                )
            })?;
        }
        for (tag, share) in &launch.shares {
            config::check_fs(&fs_config(tag, share))
                .map_err(|problem| field_err(format!("shares.{tag}"), problem))?;
        }
        let jail = launch
            .jail
            .map(crate::jail::JailSpec::check)
            .transpose()
            .map_err(|(field, problem)| field_err(field.into(), problem))?;
        if jail.is_some() && !launch.vfio.is_empty() {
            return Err(field_err(
                "jail".into(),
                "cannot hold vfio yet (it needs /dev/vfio and sysfs at run time): remove \"jail\" or \"vfio\" (docs/JAIL.md)".into(),
            ));
        }

        let network =
            podnet::NetworkPlan::from_json(launch.network.as_ref()).map_err(|source| {
                PodError::NetworkField {
                    path: file.clone(),
                    source,
                }
            })?;
        if network.is_some() && launch.pod.get("network").is_some() {
            return Err(PodError::SpecNetwork { path: file.clone() });
        }

        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        for p in [
            &mut launch.kernel,
            &mut launch.initrd,
            &mut launch.run_dir,
            &mut launch.image_store,
        ]
        .into_iter()
        .flatten()
        {
            resolve(p);
        }
        if let Some(ConsoleConfig::File(p)) = &mut launch.console {
            resolve(p);
        }
        for disk in launch.disks.values_mut() {
            resolve(&mut disk.path);
        }
        for share in launch.shares.values_mut() {
            for p in [&mut share.dir, &mut share.socket].into_iter().flatten() {
                resolve(p);
            }
        }
        Ok(Launch {
            file,
            spec,
            spec_json: launch.pod.clone(),
            launch,
            network,
            jail,
        })
    }
}

fn disk_config(name: &str, disk: &PodDisk) -> DiskConfig {
    DiskConfig {
        path: disk.path.clone(),
        id: name.to_string(),
        readonly: disk.readonly,
        direct: disk.direct,
        queues: disk.queues,
        queue_size: disk.queue_size,
        iops: disk.iops,
        bandwidth: disk.bandwidth,
        burst: disk.burst,
        iops_burst: disk.iops_burst,
        composite: Vec::new(),
    }
}

fn fs_config(tag: &str, share: &PodShare) -> FsConfig {
    FsConfig {
        tag: tag.to_string(),
        socket: share.socket.clone(),
        dir: share.dir.clone(),
        queues: share.queues,
        queue_size: share.queue_size,
    }
}

/// The run root: `explicit` (`--run-root`), else `$CRIB_RUN_ROOT`, else [`default_run_root`].
pub fn run_root(explicit: Option<&Path>) -> PathBuf {
    if let Some(root) = explicit {
        return root.to_path_buf();
    }
    match std::env::var_os(RUN_ROOT_ENV) {
        Some(root) if !root.is_empty() => PathBuf::from(root),
        _ => {
            // SAFETY: getuid cannot fail and touches no memory.
            let uid = unsafe { libc::getuid() };
            default_run_root(uid, std::env::var_os("XDG_RUNTIME_DIR").as_deref())
        }
    }
}

/// `/run/crib` for root, else `$XDG_RUNTIME_DIR/crib`, else `/tmp/crib-<uid>`.
pub fn default_run_root(uid: u32, xdg_runtime_dir: Option<&OsStr>) -> PathBuf {
    if uid == 0 {
        return PathBuf::from("/run/crib");
    }
    match xdg_runtime_dir {
        Some(dir) if !dir.is_empty() && Path::new(dir).is_absolute() => Path::new(dir).join("crib"),
        _ => PathBuf::from(format!("/tmp/crib-{uid}")),
    }
}

/// The directory of the pod kernel and initramfs: `$CRIB_GUEST_DIR`, else `guest/` next to
/// the directory of the crib binary (`target/debug/crib` finds `target/guest/`).
pub fn guest_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(GUEST_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(|p| p.join("guest")))
        .unwrap_or_else(|| PathBuf::from("guest"))
}

/// The run directory of pod `name` (or the directory `name` names, if it has a `/`).
pub fn pod_dir(root: &Path, name: &str) -> PathBuf {
    if name.contains('/') {
        PathBuf::from(name)
    } else {
        root.join(name)
    }
}

impl Launch {
    /// The VM of this pod, its sockets in `run_dir` (the launch file's, else `<root>/<pod
    /// name>`), kernel and initramfs defaulting to those in `guest_dir`. Checks, creates
    /// nothing.
    pub fn prepare(&self, root: &Path, guest_dir: &Path) -> Result<PreparedPod, PodError> {
        let name = self.spec.name.clone();
        let run_dir = self
            .launch
            .run_dir
            .clone()
            .unwrap_or_else(|| root.join(&name));
        let longest = run_dir.join(DOCKER_SOCKET);
        if longest.as_os_str().len() > MAX_SOCKET_PATH_BYTES {
            return Err(PodError::RunDirTooLong(run_dir));
        }
        let kernel = self
            .launch
            .kernel
            .clone()
            .unwrap_or_else(|| guest_dir.join(DEFAULT_KERNEL));
        let initrd = self
            .launch
            .initrd
            .clone()
            .unwrap_or_else(|| guest_dir.join(DEFAULT_INITRD));
        let mut config = VmConfig::new(kernel);
        config.id = Some(name.clone());
        config.initrd = Some(initrd);
        config.cpus = self.launch.cpus;
        config.memory_bytes = self.launch.memory_bytes;
        config.console = self
            .launch
            .console
            .clone()
            .unwrap_or_else(|| ConsoleConfig::File(run_dir.join(CONSOLE_LOG)));
        config.disks = self
            .launch
            .disks
            .iter()
            .map(|(name, disk)| disk_config(name, disk))
            .collect();
        config.vfio = self.launch.vfio.clone();
        config.fs = self
            .launch
            .shares
            .iter()
            .map(|(tag, share)| fs_config(tag, share))
            .collect();
        config.vsock = Some(VsockConfig {
            cid: POD_VSOCK_CID,
            socket: run_dir.join(VSOCK_SOCKET),
        });
        config.docker_socket = Some(run_dir.join(DOCKER_SOCKET));
        config.api_socket = Some(run_dir.join(API_SOCKET));
        config.pod = Some(run_dir.join(SPEC_FILE));
        let images = PodImages::resolve(
            &self.spec,
            self.launch.image_store.as_deref(),
            self.launch.pull,
        )
        .map_err(|source| PodError::Images {
            path: self.file.clone(),
            source: Box::new(source),
        })?;
        config.disks.extend(images.layer_disk(&run_dir));
        if self.launch.scratch.is_some() {
            config.disks.push(pod_images::scratch_disk(&run_dir));
        }
        let config = config
            .validate(Origin::File)
            .map_err(|source| PodError::Config {
                path: self.file.clone(),
                source,
            })?;
        Ok(PreparedPod {
            name,
            run_dir,
            config,
            images,
        })
    }
}

/// Creates `dir` (and its parents) with mode 0700.
fn create_private_dir(dir: &Path) -> Result<(), PodError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PodError::CreateRunDir {
            path: dir.to_path_buf(),
            source,
        })
}

/// The file that marks a run directory as crib's: crib deletes files only in directories
/// that have it, so a `run_dir` naming someone else's directory loses nothing.
pub const OWNER_MARK: &str = ".crib-run-dir";

/// Creates `dir` as a run directory, or takes over one crib made before (it has
/// [`OWNER_MARK`]) or an empty one. A directory with other files in it and no mark is
/// refused: crib would delete files in it.
fn claim_run_dir(dir: &Path) -> Result<(), PodError> {
    let mark = dir.join(OWNER_MARK);
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if !mark.exists() && entries.next().is_some() {
                return Err(PodError::RunDirNotOurs(dir.to_path_buf()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_private_dir(dir)?,
        Err(source) => {
            return Err(PodError::CreateRunDir {
                path: dir.to_path_buf(),
                source,
            })
        }
    }
    std::fs::write(
        &mark,
        b"a crib pod's run directory: crib may delete files here\n",
    )
    .map_err(|source| PodError::WriteFile {
        path: mark.clone(),
        source,
    })
}

/// A held `flock` on a run directory's lock file: released when crib exits.
#[derive(Debug)]
pub struct RunLock {
    file: std::fs::File,
}

impl RunLock {
    /// The lock's descriptor (the network keeper inherits it).
    pub fn raw_fd(&self) -> std::os::unix::io::RawFd {
        self.file.as_raw_fd()
    }
}

/// How long `crib pod run` waits for the lock that the pod's last network keeper
/// holds while it removes the last run's network.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Takes `file`'s flock, waiting up to `wait`; false if someone else holds it.
fn try_lock(file: &std::fs::File, wait: Duration) -> bool {
    let start = std::time::Instant::now();
    loop {
        // SAFETY: flock on a descriptor `file` owns; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return true;
        }
        if start.elapsed() >= wait {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl PreparedPod {
    /// Makes the run directory ready: refuses a live pod of the same name, takes the
    /// lock, clears the last run's console log and sockets, writes the spec and the
    /// state file. `root` is checked to belong to this user.
    pub fn create_run_dir(
        &self,
        root: &Path,
        launch: &Launch,
        guest_dir_note: &Path,
    ) -> Result<RunLock, PodError> {
        let api = self.run_dir.join(API_SOCKET);
        if api_call(&api, "GET", "/api/v1/vm", None).is_ok() {
            return Err(PodError::AlreadyRunning {
                name: self.name.clone(),
                socket: api,
            });
        }
        if self.run_dir.starts_with(root) {
            create_private_dir(root)?;
            let meta = std::fs::metadata(root).map_err(|source| PodError::CreateRunDir {
                path: root.to_path_buf(),
                source,
            })?;
            // SAFETY: getuid cannot fail and touches no memory.
            let uid = unsafe { libc::getuid() };
            if meta.uid() != uid {
                return Err(PodError::RunRootNotOurs {
                    path: root.to_path_buf(),
                    owner: meta.uid(),
                    uid,
                });
            }
        }
        claim_run_dir(&self.run_dir)?;
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PodError::WriteFile { path, source }
        };
        let lock_path = self.run_dir.join(LOCK_FILE);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(write_err(&lock_path))?;
        if !try_lock(&lock, LOCK_WAIT) {
            // Another `crib pod run` of this pod holds it (still starting up), or its
            // network keeper is stuck.
            return Err(PodError::AlreadyRunning {
                name: self.name.clone(),
                socket: api,
            });
        }
        for stale in [
            API_SOCKET,
            DOCKER_SOCKET,
            VSOCK_SOCKET,
            CONSOLE_LOG,
            INFO_FILE,
            EXIT_FILE,
        ] {
            let path = self.run_dir.join(stale);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(write_err(&path)(e)),
            }
        }
        // A jailed pod's virtiofsd sockets, left if its supervisor was killed with -9.
        crate::fs::remove_run_dir_sockets(&self.run_dir);
        let spec_path = self.run_dir.join(SPEC_FILE);
        let mut spec_json = launch.spec_json.clone();
        self.images.add_to_spec(&mut spec_json);
        if let Some(bytes) = launch.launch.scratch {
            pod_images::add_scratch_volume(&mut spec_json);
            pod_images::create_scratch(&self.run_dir, bytes)
                .map_err(write_err(&self.run_dir.join(pod_images::SCRATCH_FILE)))?;
        }
        let spec = serde_json::to_vec_pretty(&spec_json).unwrap_or_default();
        std::fs::write(&spec_path, spec).map_err(write_err(&spec_path))?;
        let info_path = self.run_dir.join(INFO_FILE);
        let info = self.info(launch, guest_dir_note);
        std::fs::write(&info_path, format!("{info:#}\n")).map_err(write_err(&info_path))?;
        Ok(RunLock { file: lock })
    }

    /// Adds `entries` (key, value) to the state file `info.json` (the jail's ids, the
    /// network).
    pub fn add_to_info<'a>(
        &self,
        entries: impl IntoIterator<Item = (&'a str, Value)>,
    ) -> Result<(), PodError> {
        let path = self.run_dir.join(INFO_FILE);
        let mut info: Value = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(|| json!({}));
        for (key, value) in entries {
            info[key] = value;
        }
        std::fs::write(&path, format!("{info:#}\n"))
            .map_err(|source| PodError::WriteFile { path, source })
    }

    /// The state file's contents.
    fn info(&self, launch: &Launch, guest_dir: &Path) -> Value {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        json!({
            "name": self.name,
            "pid": std::process::id(),
            "started_unix_s": started,
            "launch_file": launch.file.display().to_string(),
            "run_dir": self.run_dir.display().to_string(),
            "guest_dir": guest_dir.display().to_string(),
            "api_socket": path(&self.config.api_socket),
            "docker_socket": path(&self.config.docker_socket),
            "vsock_socket": self.config.vsock.as_ref().map(|v| v.socket.display().to_string()),
            "console": self.config.console.to_string(),
            "images": self.images.digests(),
            "config": serde_json::to_value(&self.config).unwrap_or(Value::Null),
        })
    }

    /// The lines `crib pod run` prints: where each socket is and how to use it.
    pub fn socket_lines(&self) -> Vec<String> {
        let show = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        };
        let mut lines = vec![
            format!("pod {}: run dir {}", self.name, self.run_dir.display()),
            format!(
                "docker: docker -H unix://{} ps",
                show(&self.config.docker_socket)
            ),
            format!(
                "api: curl --unix-socket {} http://crib/api/v1/vm",
                show(&self.config.api_socket)
            ),
        ];
        if let Some(vsock) = &self.config.vsock {
            lines.push(format!(
                "vsock: {} (write CONNECT <port>)",
                vsock.socket.display()
            ));
        }
        match &self.config.console {
            ConsoleConfig::File(path) => lines.push(format!(
                "console: {} (crib pod logs {})",
                path.display(),
                self.name
            )),
            other => lines.push(format!("console: {other}")),
        }
        lines.push(format!("stop: crib pod stop {}", self.name));
        lines
    }

    /// Removes the sockets after the VM ended (best effort: `crib pod ls` skips dead
    /// sockets anyway).
    /// Creates the (empty) exit file now, while files may still be opened: once the VM
    /// runs, the main thread's seccomp filter refuses `open`, so the code is written to
    /// this descriptor when the pod ends. `None` (logged) if it cannot be created.
    pub fn exit_recorder(&self) -> Option<ExitRecorder> {
        let path = self.run_dir.join(EXIT_FILE);
        match std::fs::File::create(&path) {
            Ok(file) => Some(ExitRecorder { file }),
            Err(e) => {
                tracing::warn!(
                    "cannot create {}: the pod's exit code will not be recorded: {e}",
                    path.display()
                );
                None
            }
        }
    }

    pub fn remove_sockets(&self) {
        // The scratch disk goes with the pod.
        let _ = std::fs::remove_file(self.run_dir.join(pod_images::SCRATCH_FILE));
        for socket in [API_SOCKET, DOCKER_SOCKET, VSOCK_SOCKET] {
            let _ = std::fs::remove_file(self.run_dir.join(socket));
        }
    }
}

/// The run directory's exit file, open for the exit code (see
/// [`PreparedPod::exit_recorder`]).
pub struct ExitRecorder {
    file: std::fs::File,
}

impl ExitRecorder {
    /// Writes crib's exit `code` in one `write`: call it before the sockets go, so that a
    /// `crib pod stop` that sees the API gone finds it. A reader that catches the file
    /// empty or half written retries.
    pub fn record(mut self, code: u8) {
        let body = format!("{:#}\n", json!({ "code": code }));
        if let Err(e) = self.file.write_all(body.as_bytes()) {
            tracing::warn!("cannot record the pod's exit code: {e}");
        }
    }
}

/// One HTTP/1.1 call to crib's API on `socket`: the status and the JSON body. 4xx and 5xx
/// answers are [`PodError::Api`] with crib's message.
pub fn api_call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, PodError> {
    let not_running = |source| PodError::NotRunning {
        name: socket
            .parent()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        socket: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(not_running)?;
    stream
        .set_read_timeout(Some(API_TIMEOUT))
        .map_err(not_running)?;
    stream
        .set_write_timeout(Some(API_TIMEOUT))
        .map_err(not_running)?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: crib\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).map_err(not_running)?;
    let mut reply = Vec::new();
    stream
        .take(1 << 20)
        .read_to_end(&mut reply)
        .map_err(not_running)?;
    parse_reply(socket, &reply)
}

fn parse_reply(socket: &Path, reply: &[u8]) -> Result<Value, PodError> {
    let bad = |what: &str| PodError::BadReply {
        socket: socket.to_path_buf(),
        what: what.to_string(),
    };
    let text = String::from_utf8_lossy(reply);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let value: Value = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body.trim()).map_err(|_| bad("the body is not JSON"))?
    };
    if status >= 400 {
        let message = value
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        return Err(PodError::Api {
            socket: socket.to_path_buf(),
            status,
            message,
        });
    }
    Ok(value)
}

/// A running pod as `crib pod ls` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodStatus {
    pub name: String,
    pub state: String,
    pub uptime_ms: u64,
    pub run_dir: PathBuf,
    /// The pod's addresses (`10.88.0.2 fd63:7269:6200::2`), if it has a network.
    pub addresses: Option<String>,
}

/// The addresses `info.json` in run directory `dir` records, space-separated.
pub fn addresses(dir: &Path) -> Option<String> {
    let info: Value = serde_json::from_slice(&std::fs::read(dir.join(INFO_FILE)).ok()?).ok()?;
    let net = info.get("network")?;
    let mut out = net.get("address")?.as_str()?.to_string();
    if let Some(a6) = net.get("address6").and_then(Value::as_str) {
        out.push(' ');
        out.push_str(a6);
    }
    Some(out)
}

/// The pods under `root` whose API answers, by name.
pub fn list(root: &Path) -> Result<Vec<PodStatus>, PodError> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PodError::ReadRunRoot {
                path: root.to_path_buf(),
                source,
            })
        }
    };
    let mut pods = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        let socket = dir.join(API_SOCKET);
        if !socket.exists() {
            continue;
        }
        let Ok(info) = api_call(&socket, "GET", "/api/v1/vm", None) else {
            continue;
        };
        pods.push(PodStatus {
            name: entry.file_name().to_string_lossy().into_owned(),
            state: info
                .get("state")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string(),
            uptime_ms: info.get("uptime_ms").and_then(Value::as_u64).unwrap_or(0),
            addresses: addresses(&dir),
            run_dir: dir,
        });
    }
    pods.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(pods)
}

/// `1h02m03s`, `4m05s`, `6s`.
pub fn format_uptime(ms: u64) -> String {
    let s = ms / 1000;
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// The `crib pod ls` table.
pub fn format_list(pods: &[PodStatus]) -> String {
    let mut out = format!(
        "{:<24} {:<14} {:>10}  {:<40} {}\n",
        "NAME", "STATE", "UPTIME", "ADDRESSES", "RUN DIR"
    );
    for pod in pods {
        out.push_str(&format!(
            "{:<24} {:<14} {:>10}  {:<40} {}\n",
            pod.name,
            pod.state,
            format_uptime(pod.uptime_ms),
            pod.addresses.as_deref().unwrap_or("-"),
            pod.run_dir.display()
        ));
    }
    out
}

/// crib's exit code left in run directory `dir` by the pod's `crib pod run`, waiting up
/// to `wait` for it; `None` if it never came (crib was killed, or the pod is older).
pub fn exit_code(dir: &Path, wait: Duration) -> Option<u8> {
    let start = std::time::Instant::now();
    loop {
        let code = std::fs::read_to_string(dir.join(EXIT_FILE))
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .and_then(|value| value.get("code")?.as_u64())
            .and_then(|code| u8::try_from(code).ok());
        if code.is_some() || start.elapsed() >= wait {
            return code;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `crib pod stop`: a graceful shutdown (cradle stops the processes and powers off;
/// forced after `timeout`), or with `force` a forced stop; then waits until the pod's
/// API is gone. Returns crib's exit code if `crib pod run` recorded it.
pub fn stop(
    dir: &Path,
    name: &str,
    timeout: Duration,
    force: bool,
) -> Result<Option<u8>, PodError> {
    let socket = dir.join(API_SOCKET);
    let not_running = |e: PodError| match e {
        PodError::NotRunning { socket, source, .. } => PodError::NotRunning {
            name: name.to_string(),
            socket,
            source,
        },
        other => other,
    };
    if force {
        api_call(&socket, "PUT", "/api/v1/vm/stop", None).map_err(not_running)?;
    } else {
        let body = json!({ "timeout_s": timeout.as_secs().max(1) });
        api_call(&socket, "PUT", "/api/v1/vm/shutdown", Some(&body)).map_err(not_running)?;
    }
    // crib stops the guest itself after `timeout`; allow it that and some more.
    let waited = timeout + Duration::from_secs(10);
    let start = std::time::Instant::now();
    while start.elapsed() < waited {
        if UnixStream::connect(&socket).is_err() {
            let code = exit_code(dir, EXIT_FILE_WAIT);
            // The network keeper holds the lock until the pod's network is gone.
            if let Ok(lock) = std::fs::File::open(dir.join(LOCK_FILE)) {
                try_lock(&lock, EXIT_FILE_WAIT);
            }
            return Ok(code);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(PodError::StillRunning {
        name: name.to_string(),
        waited,
    })
}

/// `crib pod logs`: writes the console log to `out`; with `follow`, keeps writing what
/// is appended until the pod's API is gone.
pub fn logs(dir: &Path, name: &str, follow: bool, out: &mut dyn Write) -> Result<(), PodError> {
    let path = dir.join(CONSOLE_LOG);
    let mut file = std::fs::File::open(&path).map_err(|source| PodError::NoConsoleLog {
        name: name.to_string(),
        path: path.clone(),
        source,
    })?;
    let read_err = |source| PodError::ReadLog {
        path: path.clone(),
        source,
    };
    let socket = dir.join(API_SOCKET);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(read_err)?;
        if n > 0 {
            // A closed stdout (`crib pod logs -f | head`) ends the command quietly.
            if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                return Ok(());
            }
            continue;
        }
        if !follow {
            return Ok(());
        }
        if UnixStream::connect(&socket).is_err() {
            // The pod ended: print what it wrote last, then stop following.
            loop {
                let n = file.read(&mut buf).map_err(read_err)?;
                if n == 0 || out.write_all(&buf[..n]).is_err() {
                    return Ok(());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = r#"{"name": "web", "volumes": [{"name": "data", "path": "/data"}],
        "processes": [{"name": "app", "argv": ["/bin/true"]}], "lifetime": "until-shutdown"}"#;

    fn parse(text: &str) -> Result<Launch, PodError> {
        LaunchFile::from_json(text.as_bytes(), Path::new("/etc/pods/web.json"))
    }

    fn chain(error: &PodError) -> String {
        let mut text = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            text.push_str(" | ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }

    fn with_disk(extra: &str) -> String {
        format!(r#"{{"pod": {POD}, "disks": {{"data": {{"path": "data.img"{extra}}}}}}}"#)
    }

    #[test]
    fn minimal_launch_file_gets_every_default() {
        let launch = parse(&with_disk("")).unwrap();
        assert_eq!(launch.spec.name, "web");
        assert_eq!(launch.launch.cpus, 1);
        assert_eq!(launch.launch.memory_bytes, config::DEFAULT_MEMORY_BYTES);
        assert_eq!(launch.launch.kernel, None);
        // Relative paths start at the launch file's directory.
        assert_eq!(
            launch.launch.disks["data"].path,
            PathBuf::from("/etc/pods/data.img")
        );

        let pod = launch
            .prepare(Path::new("/run/crib"), Path::new("/opt/guest"))
            .unwrap();
        let c = &pod.config;
        assert_eq!(pod.run_dir, PathBuf::from("/run/crib/web"));
        assert_eq!(c.id.as_deref(), Some("web"));
        assert_eq!(c.kernel, PathBuf::from("/opt/guest/pod-kernel/vmlinux"));
        assert_eq!(
            c.initrd,
            Some(PathBuf::from("/opt/guest/initramfs-pod.cpio"))
        );
        assert_eq!(
            c.console,
            ConsoleConfig::File("/run/crib/web/console.log".into())
        );
        assert_eq!(c.disks.len(), 1);
        assert_eq!((c.disks[0].id.as_str(), c.disks[0].queues), ("data", 1));
        assert_eq!(
            c.vsock,
            Some(VsockConfig {
                cid: POD_VSOCK_CID,
                socket: "/run/crib/web/vsock.sock".into()
            })
        );
        assert_eq!(c.docker_socket, Some("/run/crib/web/docker.sock".into()));
        assert_eq!(c.api_socket, Some("/run/crib/web/api.sock".into()));
        assert_eq!(c.pod, Some("/run/crib/web/spec.json".into()));
        assert!(c.seccomp);
    }

    #[test]
    fn jail_field_is_checked_into_ids() {
        let launch = parse(&with_disk("").replace(
            r#""disks""#,
            r#""jail": {"uid": 100000, "gid": 100001}, "disks""#,
        ))
        .unwrap();

        assert_eq!(
            launch.jail,
            Some(crate::jail::JailRequest::Fixed(crate::jail::Jail {
                uid: 100_000,
                gid: 100_001
            }))
        );
    }

    #[test]
    fn jail_auto_asks_for_automatic_ids() {
        let launch =
            parse(&with_disk("").replace(r#""disks""#, r#""jail": "auto", "disks""#)).unwrap();

        assert_eq!(launch.jail, Some(crate::jail::JailRequest::Auto));
    }

    #[test]
    fn jail_with_another_string_names_the_field_and_both_forms() {
        let error =
            parse(&with_disk("").replace(r#""disks""#, r#""jail": "yes", "disks""#)).unwrap_err();

        let text = chain(&error);
        assert!(text.contains("jail"), "{text}");
        assert!(text.contains(r#""auto" or {"uid": N, "gid": N}"#), "{text}");
    }

    #[test]
    fn no_jail_field_means_no_jail() {
        assert_eq!(parse(&with_disk("")).unwrap().jail, None);
    }

    #[test]
    fn jail_with_uid_zero_names_the_field_and_the_fix() {
        let error = parse(&with_disk("").replace(
            r#""disks""#,
            r#""jail": {"uid": 0, "gid": 100001}, "disks""#,
        ))
        .unwrap_err();

        let text = chain(&error);
        assert!(text.contains("field jail.uid"), "{text}");
        assert!(text.contains("100000"), "{text}");
    }

    #[test]
    fn jail_with_a_negative_gid_names_the_field() {
        let error = parse(&with_disk("").replace(
            r#""disks""#,
            r#""jail": {"uid": 100000, "gid": -1}, "disks""#,
        ))
        .unwrap_err();

        assert!(chain(&error).contains("jail.gid"), "{}", chain(&error));
    }

    #[test]
    fn jail_with_an_unknown_key_is_refused() {
        let error = parse(&with_disk("").replace(
            r#""disks""#,
            r#""jail": {"uid": 100000, "gid": 100000, "root": true}, "disks""#,
        ))
        .unwrap_err();

        assert!(chain(&error).contains("jail"), "{}", chain(&error));
    }

    #[test]
    fn jail_with_vfio_is_refused_naming_both_fields() {
        let error = parse(&with_disk("").replace(
            r#""disks""#,
            r#""jail": {"uid": 100000, "gid": 100000}, "vfio": ["0000:00:04.0"], "disks""#,
        ))
        .unwrap_err();

        let text = chain(&error);
        assert!(
            text.contains("field jail") && text.contains("\"vfio\""),
            "{text}"
        );
    }

    #[test]
    fn jail_with_a_share_is_accepted() {
        let launch = parse(
            &format!(
                r#"{{"pod": {POD}, "jail": "auto", "shares": {{"src": {{"dir": "/s"}}}},
                    "disks": {{"data": {{"path": "/d"}}}}}}"#
            )
            .replace(
                r#""lifetime""#,
                r#""filesystems": [{"tag": "src", "path": "/src"}], "lifetime""#,
            ),
        )
        .unwrap();

        assert_eq!(launch.jail, Some(crate::jail::JailRequest::Auto));
    }

    #[test]
    fn every_field_parses() {
        let launch = parse(
            &format!(
                r#"{{"pod": {POD}, "kernel": "/k", "initrd": "i.cpio", "cpus": 2, "memory": "1G",
                "console": "off", "run_dir": "/tmp/p",
                "disks": {{"data": {{"path": "/d", "readonly": true, "iops": 100, "bandwidth": "1M",
                                    "queues": 2, "queue_size": 128}}}},
                "shares": {{"src": {{"dir": "src"}}}}}}"#
            )
            .replace(
                r#""lifetime""#,
                r#""filesystems": [{"tag": "src", "path": "/src"}], "lifetime""#,
            ),
        )
        .unwrap();
        let pod = launch.prepare(Path::new("/r"), Path::new("/g")).unwrap();
        let c = &pod.config;
        assert_eq!(pod.run_dir, PathBuf::from("/tmp/p"));
        assert_eq!(c.kernel, PathBuf::from("/k"));
        assert_eq!(c.initrd, Some(PathBuf::from("/etc/pods/i.cpio")));
        assert_eq!((c.cpus, c.memory_bytes), (2, 1 << 30));
        assert_eq!(c.console, ConsoleConfig::Off);
        assert_eq!(c.disks[0].bandwidth, Some(1 << 20));
        assert!(c.disks[0].readonly);
        assert_eq!(c.fs[0].tag, "src");
        assert_eq!(c.fs[0].dir, Some(PathBuf::from("/etc/pods/src")));
    }

    #[test]
    fn spec_is_passed_through_unchanged() {
        let launch = parse(&with_disk("")).unwrap();
        let original: Value = serde_json::from_str(POD).unwrap();
        assert_eq!(launch.spec_json, original);
    }

    #[test]
    fn volume_without_disk_says_how_to_add_one() {
        let err = parse(&format!(r#"{{"pod": {POD}}}"#)).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"launch file /etc/pods/web.json: pod.volumes[0] 'data' has no disk: add "disks": {"data": {"path": "IMAGE"}}"#
        );
    }

    /// A pod with an NVMe volume `lv` and a virtio volume `data`.
    const NVME_POD: &str = r#"{"name": "db", "volumes": [{"name": "data", "path": "/data"},
        {"name": "lv", "path": "/lv", "nvme_serial": "crib-nvme0"}]}"#;

    #[test]
    fn nvme_volume_needs_no_disk_and_its_controller_is_passed_through() {
        let launch = parse(&format!(
            r#"{{"pod": {NVME_POD}, "disks": {{"data": {{"path": "/d"}}}}, "vfio": ["0000:00:04.0"]}}"#
        ))
        .unwrap();
        let pod = launch.prepare(Path::new("/r"), Path::new("/g")).unwrap();
        assert_eq!(pod.config.disks.len(), 1);
        assert_eq!(pod.config.vfio.len(), 1);
        assert_eq!(pod.config.vfio[0].to_string(), "0000:00:04.0");
    }

    #[test]
    fn disk_for_an_nvme_volume_is_refused() {
        let err = parse(&format!(
            r#"{{"pod": {NVME_POD}, "disks": {{"data": {{"path": "/d"}}, "lv": {{"path": "/l"}}}}}}"#
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains(
                "disks.lv is for pod.volumes[1], an NVMe volume (nvme_serial), which is its controller's namespace: remove the disk"
            ),
            "{err}"
        );
    }

    #[test]
    fn bad_vfio_address_names_the_field() {
        let err = parse(&format!(
            r#"{{"pod": {NVME_POD}, "disks": {{"data": {{"path": "/d"}}}}, "vfio": ["00:04"]}}"#
        ))
        .unwrap_err();
        assert!(chain(&err).contains("vfio"), "{}", chain(&err));
    }

    #[test]
    fn disk_without_volume_is_refused() {
        let err = parse(&format!(
            r#"{{"pod": {POD}, "disks": {{"data": {{"path": "/a"}}, "logs": {{"path": "/b"}}}}}}"#
        ))
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("disks.logs is not a volume of the pod: add {\"name\": \"logs\"}"),
            "{err}"
        );
    }

    #[test]
    fn unknown_field_is_named_with_its_path() {
        let err = parse(&with_disk(r#", "speed": 1"#)).unwrap_err();
        let text = chain(&err);
        assert!(text.contains("field disks.data.speed is invalid"), "{text}");
        assert!(text.contains("unknown field `speed`"), "{text}");

        let err = parse(&format!(r#"{{"pod": {POD}, "cpu": 2}}"#)).unwrap_err();
        assert!(
            chain(&err).contains("field cpu is invalid"),
            "{}",
            chain(&err)
        );
    }

    #[test]
    fn bad_pod_spec_names_the_field_inside_pod() {
        let err = parse(r#"{"pod": {"name": "web", "volume": []}}"#).unwrap_err();
        let text = chain(&err);
        assert!(text.contains("field pod is not a valid pod spec"), "{text}");
        assert!(text.contains("volume"), "{text}");
        let err = parse(r#"{"pod": {"name": "Web!"}}"#).unwrap_err();
        assert!(chain(&err).contains("not a valid name"), "{}", chain(&err));
    }

    #[test]
    fn missing_pod_is_named() {
        let err = parse(r#"{"cpus": 1}"#).unwrap_err();
        assert!(
            chain(&err).contains("missing field `pod`"),
            "{}",
            chain(&err)
        );
    }

    #[test]
    fn bad_disk_setting_names_the_disk() {
        let err = parse(&with_disk(r#", "queue_size": 100"#)).unwrap_err();
        assert!(
            err.to_string()
                .contains("field disks.data.queue_size: 100: use a power of two"),
            "{err}"
        );
        let err = parse(&with_disk(r#", "iops": "lots""#)).unwrap_err();
        assert!(
            chain(&err).contains("field disks.data.iops is invalid"),
            "{}",
            chain(&err)
        );
    }

    #[test]
    fn share_needs_dir_or_socket() {
        let err = parse(
            r#"{"pod": {"name": "p", "filesystems": [{"tag": "src", "path": "/src"}]},
                "shares": {"src": {}}}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("field shares.src: socket=PATH"),
            "{err}"
        );
    }

    #[test]
    fn filesystems_and_shares_must_match() {
        let err = parse(r#"{"pod": {"name": "p", "filesystems": [{"tag": "gfs", "path": "/g"}]}}"#)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"launch file /etc/pods/web.json: pod.filesystems[0] 'gfs' has no share: add "shares": {"gfs": {"dir": "HOSTDIR"}}"#
        );
        let err = parse(r#"{"pod": {"name": "p"}, "shares": {"gfs": {"dir": "/g"}}}"#).unwrap_err();
        assert!(
            err.to_string()
                .contains("shares.gfs is not a filesystem of the pod: add {\"tag\": \"gfs\""),
            "{err}"
        );
    }

    #[test]
    fn bad_sizes_name_the_field() {
        let err = parse(r#"{"pod": {"name": "p"}, "memory": "1M"}"#).unwrap_err();
        assert!(
            chain(&err).contains("field memory is invalid"),
            "{}",
            chain(&err)
        );
        let err = parse(r#"{"pod": {"name": "p"}, "cpus": 0}"#).unwrap_err();
        assert!(
            chain(&err).contains("field cpus is invalid"),
            "{}",
            chain(&err)
        );
    }

    #[test]
    fn network_defaults_on_and_none_turns_it_off() {
        let launch = parse(r#"{"pod": {"name": "p"}}"#).unwrap();
        let Some(podnet::NetworkPlan::Bridge(plan)) = launch.network else {
            panic!("not bridge mode: {:?}", launch.network);
        };
        assert_eq!((plan.bridge.as_str(), plan.mtu), ("crib0", 1500));
        let launch = parse(r#"{"pod": {"name": "p"}, "network": "none"}"#).unwrap();
        assert_eq!(launch.network, None);
    }

    #[test]
    fn bad_network_names_the_field() {
        let err =
            parse(r#"{"pod": {"name": "p"}, "network": {"subnet": "10.0.0.0/33"}}"#).unwrap_err();
        assert!(err.to_string().contains("network.subnet"), "{err}");
        let err = parse(r#"{"pod": {"name": "p"}, "network": {"ports": ["http"]}}"#).unwrap_err();
        assert!(err.to_string().contains("network.ports[0]"), "{err}");
    }

    #[test]
    fn network_attach_is_parsed_and_bridge_fields_with_it_refused() {
        let launch = parse(r#"{"pod": {"name": "p"}, "network": {"attach": "eth0"}}"#).unwrap();
        assert!(
            matches!(&launch.network, Some(podnet::NetworkPlan::Attach(a)) if a.interface == "eth0"),
            "{:?}",
            launch.network
        );
        let err =
            parse(r#"{"pod": {"name": "p"}, "network": {"attach": "eth0", "ports": ["80"]}}"#)
                .unwrap_err();
        assert!(
            chain(&err).contains("network.ports cannot be combined with network.attach"),
            "{}",
            chain(&err)
        );
    }

    #[test]
    fn spec_network_with_host_networking_is_refused() {
        let err =
            parse(r#"{"pod": {"name": "p", "network": {"address": "10.0.0.2/8"}}}"#).unwrap_err();
        assert!(matches!(err, PodError::SpecNetwork { .. }), "{err}");
        // With "none" the spec's own network is the caller's business (a tap of its own).
        assert!(parse(
            r#"{"pod": {"name": "p", "network": {"address": "10.0.0.2/8"}}, "network": "none"}"#
        )
        .is_ok());
    }

    #[test]
    fn long_run_dir_is_refused() {
        let launch = parse(r#"{"pod": {"name": "p"}}"#).unwrap();
        let root = PathBuf::from(format!("/{}", "r".repeat(100)));
        let err = launch.prepare(&root, Path::new("/g")).unwrap_err();
        assert!(matches!(err, PodError::RunDirTooLong(_)), "{err}");
    }

    #[test]
    fn run_root_depends_on_the_user() {
        assert_eq!(default_run_root(0, None), PathBuf::from("/run/crib"));
        assert_eq!(
            default_run_root(0, Some(OsStr::new("/run/user/0"))),
            PathBuf::from("/run/crib")
        );
        assert_eq!(
            default_run_root(1000, Some(OsStr::new("/run/user/1000"))),
            PathBuf::from("/run/user/1000/crib")
        );
        assert_eq!(
            default_run_root(1000, None),
            PathBuf::from("/tmp/crib-1000")
        );
        assert_eq!(
            default_run_root(1000, Some(OsStr::new(""))),
            PathBuf::from("/tmp/crib-1000")
        );
        assert_eq!(run_root(Some(Path::new("/x"))), PathBuf::from("/x"));
    }

    #[test]
    fn pod_dir_takes_a_name_or_a_path() {
        let root = Path::new("/run/crib");
        assert_eq!(pod_dir(root, "web"), PathBuf::from("/run/crib/web"));
        assert_eq!(pod_dir(root, "/tmp/p"), PathBuf::from("/tmp/p"));
    }

    #[test]
    fn uptime_is_short() {
        assert_eq!(format_uptime(6_400), "6s");
        assert_eq!(format_uptime(245_000), "4m05s");
        assert_eq!(format_uptime(3_723_000), "1h02m03s");
    }

    #[test]
    fn api_reply_parses_status_and_errors() {
        let socket = Path::new("/s");
        let ok = parse_reply(
            socket,
            b"HTTP/1.1 200 OK\r\ncontent-length: 17\r\n\r\n{\"state\":\"running\"}\n",
        )
        .unwrap();
        assert_eq!(ok["state"], "running");
        let err = parse_reply(
            socket,
            b"HTTP/1.1 409 Conflict\r\n\r\n{\"error\":\"already shutting down\"}",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "crib's API on /s answered 409: already shutting down"
        );
        assert!(parse_reply(socket, b"garbage").is_err());
    }

    #[test]
    fn run_dir_is_created_and_a_live_pod_refused() {
        let root = std::env::temp_dir().join(format!("crib-pod-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let launch = parse(r#"{"pod": {"name": "p"}}"#).unwrap();
        let pod = launch.prepare(&root, Path::new("/g")).unwrap();
        let lock = pod.create_run_dir(&root, &launch, Path::new("/g")).unwrap();
        let spec = std::fs::read_to_string(root.join("p/spec.json")).unwrap();
        assert!(spec.contains("\"name\": \"p\""), "{spec}");
        let info: Value =
            serde_json::from_str(&std::fs::read_to_string(root.join("p/info.json")).unwrap())
                .unwrap();
        assert_eq!(info["pid"], std::process::id());
        // The lock is held: a second run of the same pod is refused.
        let err = pod
            .create_run_dir(&root, &launch, Path::new("/g"))
            .unwrap_err();
        assert!(matches!(err, PodError::AlreadyRunning { .. }), "{err}");
        drop(lock);
        assert!(pod.create_run_dir(&root, &launch, Path::new("/g")).is_ok());
        assert!(list(&root).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn exit_code_is_recorded_read_back_and_cleared_by_the_next_run() {
        let root = std::env::temp_dir().join(format!("crib-pod-exit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let launch = parse(r#"{"pod": {"name": "p"}}"#).unwrap();
        let pod = launch.prepare(&root, Path::new("/g")).unwrap();
        let dir = root.join("p");
        let lock = pod.create_run_dir(&root, &launch, Path::new("/g")).unwrap();
        assert_eq!(exit_code(&dir, Duration::ZERO), None);
        let recorder = pod.exit_recorder().unwrap();
        // Empty while the pod runs: no code yet.
        assert_eq!(exit_code(&dir, Duration::ZERO), None);
        recorder.record(3);
        assert_eq!(exit_code(&dir, Duration::ZERO), Some(3));
        // A new run of the pod starts without the old code.
        drop(lock);
        let _lock = pod.create_run_dir(&root, &launch, Path::new("/g")).unwrap();
        assert_eq!(exit_code(&dir, Duration::from_millis(60)), None);
        // Garbage is no code.
        std::fs::write(dir.join(EXIT_FILE), "{\"code\": 300}").unwrap();
        assert_eq!(exit_code(&dir, Duration::ZERO), None);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn run_dir_of_someone_else_is_refused_and_kept() {
        let root = std::env::temp_dir().join(format!("crib-pod-foreign-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let foreign = root.join("home");
        std::fs::create_dir_all(&foreign).unwrap();
        std::fs::write(foreign.join(CONSOLE_LOG), "precious").unwrap();
        let launch = parse(&format!(
            r#"{{"pod": {{"name": "p"}}, "run_dir": "{}"}}"#,
            foreign.display()
        ))
        .unwrap();
        let pod = launch.prepare(&root, Path::new("/g")).unwrap();

        let err = pod
            .create_run_dir(&root, &launch, Path::new("/g"))
            .unwrap_err();

        assert!(matches!(err, PodError::RunDirNotOurs(_)), "{err}");
        assert_eq!(
            std::fs::read_to_string(foreign.join(CONSOLE_LOG)).unwrap(),
            "precious"
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn resolved_images_written_by_hand_are_refused() {
        let err = parse(r#"{"pod": {"name": "p", "resolved": {}}}"#).unwrap_err();
        assert!(chain(&err).contains("pod.resolved"), "{}", chain(&err));
    }
}
