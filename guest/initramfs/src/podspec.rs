//! The pod spec: what a pod's microVM runs, the wire type shared by the
//! host (which validates it and ships it in the initramfs, see
//! [`crate::pod_archive`]) and cradle (which reads it from
//! [`POD_SPEC_GUEST_PATH`] at boot). The format is documented with examples
//! in `docs/POD_SPEC.md`.
//!
//! The spec is untrusted input on both sides: parsing never panics, unknown
//! fields are rejected by name, and [`PodSpec::validate`] checks what serde
//! cannot (names, paths, duplicates), naming the field and the fix.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::containers::{
    ContainerSpecError, MemoryBytes, MilliCpus, MountSpec, ResolvedImages, RestartPolicy,
};

/// Where the spec is in the guest; the pod archive puts it there.
pub const POD_SPEC_GUEST_PATH: &str = "/etc/cradle/pod.json";
/// Largest spec accepted: it is copied into guest memory and read at boot.
pub const MAX_SPEC_BYTES: usize = 1024 * 1024;
/// Longest volume name: the volume is found by its virtio-blk serial,
/// which holds at most `VIRTIO_BLK_ID_BYTES` (20) bytes (virtio 1.2, 5.2.6).
pub const MAX_VOLUME_NAME_BYTES: usize = 20;
/// Longest NVMe serial number: the SN field of Identify Controller is 20
/// ASCII bytes, space-padded (NVMe base spec 2.0, figure 275).
pub const MAX_NVME_SERIAL_BYTES: usize = 20;
/// The namespace of an NVMe volume without `nvme_nsid`.
pub const DEFAULT_NVME_NSID: u32 = 1;
/// Largest valid namespace ID; 0 and 0xFFFFFFFF are reserved.
const MAX_NVME_NSID: u32 = 0xFFFF_FFFE;
/// Longest virtio-fs tag: the device's config space holds 36 bytes
/// (virtio 1.2, 5.11.4), the same limit as `crib run --fs tag=`.
pub const MAX_FS_TAG_BYTES: usize = 36;
/// Longest pod or process name (a DNS label, so it can be a hostname).
pub const MAX_NAME_BYTES: usize = 63;
/// Directories cradle mounts itself: no volume or filesystem may be mounted
/// on or under them.
const RESERVED_DIRS: &[&str] = &["/dev", "/proc", "/sys"];

/// Errors of parsing and validating a pod spec. Each names the field
/// (`volumes[1].path`) and says how to fix it.
#[derive(Debug, Error)]
pub enum PodSpecError {
    #[error("the pod spec is {bytes} bytes; the limit is {MAX_SPEC_BYTES}")]
    TooLarge { bytes: usize },
    /// Not JSON, a missing or unknown field, or a value of the wrong type.
    /// `field` is where (`processes[0].argv`, empty at the top level); the
    /// cause says what and at which line.
    #[error(
        "{}the pod spec does not match the format of docs/POD_SPEC.md",
        field_prefix(field)
    )]
    Json {
        field: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{field}: {value:?} is not a valid name; use 1 to {max} characters from a-z, 0-9 and '-'"
    )]
    InvalidName {
        field: String,
        value: String,
        max: usize,
    },
    #[error("{field}: {value:?} is already the name of {first}; give each one its own name")]
    DuplicateName {
        field: String,
        value: String,
        first: String,
    },
    #[error("{field}: {value:?} is not an absolute path; start it with '/'")]
    RelativePath { field: String, value: String },
    #[error(
        "{field}: {value:?} has an empty, '.' or '..' component; write it plainly, like /data/db"
    )]
    UncleanPath { field: String, value: String },
    #[error("{field}: {value:?} is / or inside /dev, /proc or /sys, which cradle mounts itself; mount it elsewhere, like /data")]
    ReservedPath { field: String, value: String },
    #[error("{field}: {value:?} is also the path of {first}; mount each volume and filesystem at its own path")]
    DuplicatePath {
        field: String,
        value: String,
        first: String,
    },
    #[error("{field}: {value:?} is inside {outer:?} ({outer_field}), which is mounted later and would hide it; list {outer_field} first")]
    HiddenPath {
        field: String,
        value: String,
        outer: String,
        outer_field: String,
    },
    #[error(
        "{field}: {value:?} is not a valid virtio-fs tag; use 1 to {MAX_FS_TAG_BYTES} bytes without control characters, the tag given to crib run --fs tag=TAG"
    )]
    InvalidTag { field: String, value: String },
    #[error("{field}: {value:?} is already the tag of {first}; mount each tag once")]
    DuplicateTag {
        field: String,
        value: String,
        first: String,
    },
    #[error(
        "{field}: {value:?} is not a valid NVMe serial number; use 1 to {MAX_NVME_SERIAL_BYTES} printable ASCII characters without leading or trailing spaces, as in /sys/block/nvme0n1/device/serial"
    )]
    InvalidNvmeSerial { field: String, value: String },
    #[error("{field}: {value} is not a valid NVMe namespace ID; use 1 to {MAX_NVME_NSID} (nvme0n1 is namespace 1)")]
    InvalidNvmeNsid { field: String, value: u32 },
    #[error("{field} applies only to an NVMe volume; add nvme_serial or remove {field}")]
    NeedsNvmeSerial { field: String },
    #[error("{field}: NVMe serial {serial:?} namespace {nsid} is already the disk of {first}; give each volume its own namespace")]
    DuplicateNvme {
        field: String,
        serial: String,
        nsid: u32,
        first: String,
    },
    #[error(
        "{field} applies only to a mounted volume; add a path to the volume or remove {field}"
    )]
    NeedsPath { field: String },
    #[error(
        "{field} is empty; give at least the program to run, like [\"/bin/sh\", \"-c\", \"...\"]"
    )]
    EmptyArgv { field: String },
    #[error("{field} is empty; name the program to run")]
    EmptyProgram { field: String },
    #[error("{field} contains a NUL character, which cannot be passed to a process; remove it")]
    NulCharacter { field: String },
    #[error(
        "{field}: {value:?} is not NAME=VALUE with a non-empty NAME; write it like \"HOME=/root\""
    )]
    InvalidEnv { field: String, value: String },
    #[error("{field}: {value:?} is not valid; {fix}")]
    InvalidNetwork {
        field: String,
        value: String,
        fix: String,
    },
    #[error(
        "{field} applies only to a process with an image or a rootfs; add one or remove {field}"
    )]
    NeedsImage { field: String },
    #[error("{field} replaces an image's Entrypoint; a process with a rootfs has none: put the whole command in argv")]
    RootfsEntrypoint { field: String },
    #[error("{field}: a process has an image or a rootfs, not both; remove one")]
    ImageAndRootfs { field: String },
    #[error("{field}: {value:?} is not the tag of one of the pod's filesystems; add a filesystem with that tag (and a share for it)")]
    UnknownRootfs { field: String, value: String },
    #[error("{field}: {value:?} is not TAG or TAG/DIR with DIR a plain relative path (no empty, '.' or '..' component, no leading or trailing '/'); write it like \"rootfs\" or \"share/c1/rootfs\"")]
    InvalidRootfsDir { field: String, value: String },
    #[error("{field}: {value:?} is not an image reference; write it like \"busybox:1.36\" or \"ghcr.io/org/app@sha256:...\"")]
    InvalidImage { field: String, value: String },
    #[error("{field}: {value:?} is not a user; write a name or uid, optionally :group or :gid, like \"app\" or \"1000:1000\"")]
    InvalidUser { field: String, value: String },
    #[error("{field}: {value:?} is neither a volume with a path nor a filesystem tag of this pod; name one of them")]
    UnknownMountSource { field: String, value: String },
    #[error("{field}: an init process must end before the others start; use \"on-failure\" or \"no\", not \"always\"")]
    InitAlways { field: String },
    #[error(
        "{field} applies only to a process with a terminal; add \"tty\": true or remove {field}"
    )]
    NeedsTty { field: String },
    #[error("{field}: [{rows}, {columns}] has a zero; give [rows, columns], each 1 or more, like [24, 80]")]
    InvalidConsoleSize {
        field: String,
        rows: u16,
        columns: u16,
    },
    #[error(transparent)]
    Resolved(#[from] ContainerSpecError),
}

/// A pod: its volumes, its shared filesystems and its processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    /// The pod's name: 1 to 63 characters from `a-z`, `0-9` and `-`.
    pub name: String,
    /// Block volumes, set up in this order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeSpec>,
    /// virtio-fs shares (`crib run --fs tag=TAG,...`), mounted in this order
    /// after the volumes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filesystems: Vec<FsSpec>,
    /// Processes cradle starts once the volumes and filesystems are ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<ProcessSpec>,
    /// When the pod ends: once its processes have exited (the default) or
    /// only on the shutdown call of cradle's Docker API.
    #[serde(default, skip_serializing_if = "PodLifetime::is_default")]
    pub lifetime: PodLifetime,
    /// Filled by the host (`crib pod run`), not written by hand: the layer disk's table
    /// and the image each process's `image` resolved to (docs/CONTAINERS.md).
    #[serde(default, skip_serializing_if = "ResolvedImages::is_empty")]
    pub resolved: ResolvedImages,
    /// eth0's configuration; `crib pod run` fills it in from the launch file's
    /// `network`. Absent: only lo is brought up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkSpec>,
}

/// The pod's network as cradle configures it (docs/NETWORK.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// eth0's IPv4 address with its prefix length, like `10.88.0.2/16`.
    pub address: String,
    /// The IPv4 default gateway (the host's bridge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// eth0's IPv6 address with its prefix length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<String>,
    /// The IPv6 default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<String>,
    /// eth0's MTU; absent: the device's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// `/etc/resolv.conf`'s nameservers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// `/etc/resolv.conf`'s search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
}

/// Smallest MTU cradle accepts (IPv6's minimum link MTU).
pub const MIN_MTU: u32 = 1280;
/// Largest MTU cradle accepts.
pub const MAX_MTU: u32 = 65_535;

impl NetworkSpec {
    /// eth0's IPv4 address and prefix length.
    pub fn ipv4(&self) -> Option<(std::net::Ipv4Addr, u8)> {
        let (a, l) = self.address.split_once('/')?;
        Some((a.parse().ok()?, l.parse().ok().filter(|l| *l <= 32)?))
    }

    /// eth0's IPv6 address and prefix length, if it has one.
    pub fn ipv6(&self) -> Option<(std::net::Ipv6Addr, u8)> {
        let (a, l) = self.address6.as_deref()?.split_once('/')?;
        Some((a.parse().ok()?, l.parse().ok().filter(|l| *l <= 128)?))
    }

    fn validate(&self) -> Result<(), PodSpecError> {
        let bad = |field: &str, value: &str, fix: &str| PodSpecError::InvalidNetwork {
            field: format!("network.{field}"),
            value: value.to_string(),
            fix: fix.to_string(),
        };
        if self.ipv4().is_none() {
            return Err(bad("address", &self.address, "write it like 10.88.0.2/16"));
        }
        if let Some(gw) = &self.gateway {
            gw.parse::<std::net::Ipv4Addr>()
                .map_err(|_| bad("gateway", gw, "write an IPv4 address like 10.88.0.1"))?;
        }
        if let Some(a6) = &self.address6 {
            if self.ipv6().is_none() {
                return Err(bad("address6", a6, "write it like fd63:7269:6200::2/64"));
            }
        }
        if let Some(gw) = &self.gateway6 {
            gw.parse::<std::net::Ipv6Addr>().map_err(|_| {
                bad(
                    "gateway6",
                    gw,
                    "write an IPv6 address like fd63:7269:6200::1",
                )
            })?;
        }
        if let Some(mtu) = self.mtu {
            if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
                return Err(bad("mtu", &mtu.to_string(), "use 1280 to 65535"));
            }
        }
        for (i, ns) in self.nameservers.iter().enumerate() {
            ns.parse::<std::net::IpAddr>().map_err(|_| {
                bad(
                    &format!("nameservers[{i}]"),
                    ns,
                    "write an IP address like 192.0.2.53",
                )
            })?;
        }
        for (i, domain) in self.search.iter().enumerate() {
            let ok = !domain.is_empty()
                && domain.len() <= 253
                && domain
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !ok {
                return Err(bad(
                    &format!("search[{i}]"),
                    domain,
                    "write a domain like example.com",
                ));
            }
        }
        Ok(())
    }
}

/// When cradle powers a pod's VM off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PodLifetime {
    /// Once every process has exited (then the test hook runs, if any).
    #[default]
    Processes,
    /// Only when asked to (`POST /crib/v1/shutdown` on the Docker API), so
    /// `docker exec` and `docker cp` keep working after the processes end.
    UntilShutdown,
}

/// A block volume: a virtio-blk disk whose serial is the volume's name, or
/// (with `nvme_serial`) a namespace of an NVMe controller passed through
/// with `crib run --vfio`. Always reachable as `/dev/volumes/<name>`; with a
/// `path`, formatted on first use and mounted there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// 1 to 20 characters from `a-z`, `0-9` and `-`; the host gives the disk
    /// this serial.
    pub name: String,
    /// Absolute mount point in the guest; none: only the device link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Filesystem to format a blank disk with (default ext4) and to expect
    /// on it. Absent: whichever of ext4 and xfs the disk has is mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<Filesystem>,
    /// Mount read-only (`MS_RDONLY`); a blank disk is then an error.
    #[serde(default, skip_serializing_if = "is_false")]
    pub readonly: bool,
    /// The volume is a namespace of the NVMe controller with this serial
    /// number (Identify Controller SN, as in
    /// `/sys/block/nvmeXnY/device/serial`), not a virtio-blk disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvme_serial: Option<String>,
    /// The namespace ID on that controller; absent: 1. Only with
    /// `nvme_serial`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvme_nsid: Option<u32>,
}

impl VolumeSpec {
    /// The NVMe namespace this volume is, if it is one: (serial, nsid).
    pub fn nvme(&self) -> Option<(&str, u32)> {
        self.nvme_serial
            .as_deref()
            .map(|serial| (serial, self.nvme_nsid.unwrap_or(DEFAULT_NVME_NSID)))
    }
}

/// A virtio-fs share the host attached with `crib run --fs tag=TAG,...`,
/// mounted at `path` (like `mount -t virtiofs TAG PATH`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsSpec {
    /// The device's tag: 1 to 36 bytes, as given to `--fs tag=`.
    pub tag: String,
    /// Absolute mount point in the guest.
    pub path: String,
    /// Mount read-only (`MS_RDONLY`): writes fail with EROFS.
    #[serde(default, skip_serializing_if = "is_false")]
    pub readonly: bool,
}

/// A filesystem a volume can hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Filesystem {
    #[default]
    Ext4,
    Xfs,
}

/// A process cradle starts in the pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    /// 1 to 63 characters from `a-z`, `0-9` and `-`.
    pub name: String,
    /// Program and arguments; a program without `/` is looked up in PATH. With an
    /// `image`, the image's Cmd when empty (Docker's `docker run IMAGE ARGS...`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argv: Vec<String>,
    /// `NAME=VALUE` entries added to cradle's environment (a default PATH
    /// included), overriding it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Absolute working directory; default `/` (with an image: its WorkingDir).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Run in this image's root filesystem, in namespaces of its own (docs/CONTAINERS.md);
    /// the image config gives the defaults of argv, env, cwd and user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Run in a container whose root filesystem is the pod filesystem (virtio-fs share)
    /// with this tag, used as it is (no overlay: the share is the writable root, like the
    /// rootfs a containerd snapshot gives a runtime). Not with `image`; `argv` is required.
    /// The image-only fields (`user`, `cpus`, `memory`, `mounts`, ...) apply as with an
    /// image, without an image config to give defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<String>,
    /// Replaces the image's Entrypoint (`[]` removes it) and drops its Cmd, as `docker
    /// run --entrypoint`. Only with `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// `name`, `uid`, `name:group` or `uid:gid`, looked up in the image's /etc/passwd and
    /// /etc/group; default: the image's User, else root. Only with `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// CPU limit of the container's cgroup (`cpu.max`), in CPUs (`0.5`). Only with `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<MilliCpus>,
    /// Memory limit of the container's cgroup (`memory.max`): bytes or `"256M"`; beyond it
    /// the kernel OOM-kills inside the container. Only with `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryBytes>,
    /// The pod's volumes and filesystems bind-mounted into the container, in order. Only
    /// with `image`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MountSpec>,
    /// Start it again when it exits (Docker's `--restart`): `"no"` (default),
    /// `"on-failure"`, `"on-failure:N"`, `"always"`.
    #[serde(default, skip_serializing_if = "is_default_restart")]
    pub restart: RestartPolicy,
    /// Milliseconds between an exit and the restart; default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_delay_ms: Option<u64>,
    /// An init process: the init processes run one after the other, in spec order, each
    /// to a zero exit, before the other processes start.
    #[serde(default, skip_serializing_if = "is_false")]
    pub init: bool,
    /// A terminal (`docker run -t`): a fresh pty is the process's stdin, stdout, stderr
    /// and controlling terminal; its output is one raw stream (no stderr of its own).
    #[serde(default, skip_serializing_if = "is_false")]
    pub tty: bool,
    /// `[rows, columns]` of the terminal when the process starts, each 1 or more. Only
    /// with `tty`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_size: Option<[u16; 2]>,
}

fn is_default_restart(policy: &RestartPolicy) -> bool {
    *policy == RestartPolicy::No
}

/// `"<field>: "`, or nothing for the top level.
fn field_prefix(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    }
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl PodLifetime {
    /// The spec's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Processes => "processes",
            Self::UntilShutdown => "until-shutdown",
        }
    }

    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl fmt::Display for PodLifetime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Filesystem {
    /// The kernel's name for it (`mount -t`), also the spec's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ext4 => "ext4",
            Self::Xfs => "xfs",
        }
    }
}

impl fmt::Display for Filesystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PodSpec {
    /// Parses and validates a spec.
    pub fn from_json(bytes: &[u8]) -> Result<Self, PodSpecError> {
        if bytes.len() > MAX_SPEC_BYTES {
            return Err(PodSpecError::TooLarge { bytes: bytes.len() });
        }
        let mut json = serde_json::Deserializer::from_slice(bytes);
        let spec: Self = serde_path_to_error::deserialize(&mut json).map_err(|error| {
            let path = error.path().to_string();
            PodSpecError::Json {
                // The root is ".".
                field: if path == "." { String::new() } else { path },
                source: error.into_inner(),
            }
        })?;
        // Nothing but whitespace may follow the object.
        json.end().map_err(|source| PodSpecError::Json {
            field: String::new(),
            source,
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Parses one process object (an entry of `processes`, as cradle's `POST
    /// /crib/v1/containers` takes it), naming fields as `{at}.field`. Not validated: see
    /// [`Self::validate_process`].
    pub fn process_from_json(bytes: &[u8], at: &str) -> Result<ProcessSpec, PodSpecError> {
        if bytes.len() > MAX_SPEC_BYTES {
            return Err(PodSpecError::TooLarge { bytes: bytes.len() });
        }
        let mut json = serde_json::Deserializer::from_slice(bytes);
        let process: ProcessSpec =
            serde_path_to_error::deserialize(&mut json).map_err(|error| {
                let path = error.path().to_string();
                PodSpecError::Json {
                    field: if path == "." {
                        at.to_owned()
                    } else {
                        format!("{at}.{path}")
                    },
                    source: error.into_inner(),
                }
            })?;
        json.end().map_err(|source| PodSpecError::Json {
            field: at.to_owned(),
            source,
        })?;
        Ok(process)
    }

    /// Checks everything the JSON types cannot express; the first problem
    /// found is returned.
    pub fn validate(&self) -> Result<(), PodSpecError> {
        check_name("name", &self.name, MAX_NAME_BYTES)?;
        if let Some(network) = &self.network {
            network.validate()?;
        }

        let mut names = HashMap::new();
        let mut paths: Vec<(&str, String)> = Vec::new();
        let mut namespaces: HashMap<(&str, u32), String> = HashMap::new();
        for (index, volume) in self.volumes.iter().enumerate() {
            let at = format!("volumes[{index}]");
            let field = format!("{at}.name");
            check_name(&field, &volume.name, MAX_VOLUME_NAME_BYTES)?;
            check_unique(&mut names, &volume.name, field)?;
            check_nvme(&mut namespaces, &at, volume)?;
            match &volume.path {
                Some(path) => {
                    let field = format!("{at}.path");
                    check_mount_path(&field, path)?;
                    check_path_order(&paths, &field, path)?;
                    paths.push((path, field));
                }
                None if volume.fs.is_some() => {
                    return Err(PodSpecError::NeedsPath {
                        field: format!("{at}.fs"),
                    })
                }
                None if volume.readonly => {
                    return Err(PodSpecError::NeedsPath {
                        field: format!("{at}.readonly"),
                    })
                }
                None => {}
            }
        }

        let mut tags = HashMap::new();
        for (index, fs) in self.filesystems.iter().enumerate() {
            let at = format!("filesystems[{index}]");
            let field = format!("{at}.tag");
            check_tag(&field, &fs.tag)?;
            if let Some(first) = tags.get(fs.tag.as_str()) {
                return Err(PodSpecError::DuplicateTag {
                    field,
                    value: fs.tag.clone(),
                    first: String::clone(first),
                });
            }
            tags.insert(fs.tag.as_str(), at.clone());
            let field = format!("{at}.path");
            check_mount_path(&field, &fs.path)?;
            check_path_order(&paths, &field, &fs.path)?;
            paths.push((&fs.path, field));
        }

        let mut names = HashMap::new();
        for (index, process) in self.processes.iter().enumerate() {
            let at = format!("processes[{index}]");
            let field = format!("{at}.name");
            check_name(&field, &process.name, MAX_NAME_BYTES)?;
            check_unique(&mut names, &process.name, field)?;
            self.check_one_process(&at, process)?;
        }
        if !self.resolved.is_empty() {
            self.resolved.validate("resolved")?;
        }
        Ok(())
    }
}

impl PodSpec {
    /// Validates `process` as process `index` of this pod, added while it runs (cradle's
    /// `POST /crib/v1/containers`): every check [`Self::validate`] makes of one process,
    /// against this pod's volumes, filesystems and resolved images. Whether its name is
    /// free is the caller's to check (the pod's processes change as it runs).
    pub fn validate_process(
        &self,
        index: usize,
        process: &ProcessSpec,
    ) -> Result<(), PodSpecError> {
        let at = format!("processes[{index}]");
        check_name(&format!("{at}.name"), &process.name, MAX_NAME_BYTES)?;
        self.check_one_process(&at, process)
    }

    /// The checks of one process that do not involve the other processes.
    fn check_one_process(&self, at: &str, process: &ProcessSpec) -> Result<(), PodSpecError> {
        check_process(at, process)?;
        check_image_process(at, process, &self.resolved)?;
        if let Some(rootfs) = &process.rootfs {
            self.check_rootfs(&format!("{at}.rootfs"), rootfs)?;
        }
        self.check_mounts(at, process)
    }

    /// A `rootfs`: a filesystem's tag, or TAG/DIR with DIR a plain relative path.
    fn check_rootfs(&self, field: &str, rootfs: &str) -> Result<(), PodSpecError> {
        if rootfs.contains('\0') {
            return Err(PodSpecError::NulCharacter {
                field: field.to_owned(),
            });
        }
        let (tag, dir) = self.split_rootfs(rootfs);
        if tag.is_empty() {
            // "/x": an absolute path, not a tag.
            return Err(PodSpecError::InvalidRootfsDir {
                field: field.to_owned(),
                value: rootfs.to_owned(),
            });
        }
        if !self.filesystems.iter().any(|fs| fs.tag == tag) {
            return Err(PodSpecError::UnknownRootfs {
                field: field.to_owned(),
                value: tag.to_owned(),
            });
        }
        let plain = dir.is_none_or(|dir| {
            dir.split('/')
                .all(|part| !part.is_empty() && part != "." && part != "..")
        });
        if !plain {
            return Err(PodSpecError::InvalidRootfsDir {
                field: field.to_owned(),
                value: rootfs.to_owned(),
            });
        }
        Ok(())
    }

    /// A `rootfs` as (filesystem tag, directory inside it): the whole value when it is
    /// one of the pod's tags (a tag may hold '/'), else split at its first '/'.
    pub fn split_rootfs<'a>(&self, rootfs: &'a str) -> (&'a str, Option<&'a str>) {
        if self.filesystems.iter().any(|fs| fs.tag == rootfs) {
            return (rootfs, None);
        }
        match rootfs.split_once('/') {
            Some((tag, dir)) => (tag, Some(dir)),
            None => (rootfs, None),
        }
    }

    /// The mount point in cradle of a validated `rootfs`'s filesystem: the filesystem's
    /// even when a volume has the tag as its name (which [`Self::mount_source`] prefers).
    pub fn rootfs_mount(&self, rootfs: &str) -> Option<&str> {
        let (tag, _) = self.split_rootfs(rootfs);
        self.filesystems
            .iter()
            .find(|fs| fs.tag == tag)
            .map(|fs| fs.path.as_str())
    }

    /// Where a validated `rootfs` is in cradle: its filesystem's mount point, joined
    /// with the directory if it names one.
    pub fn rootfs_path(&self, rootfs: &str) -> Option<std::path::PathBuf> {
        let (_, dir) = self.split_rootfs(rootfs);
        let mount = std::path::Path::new(self.rootfs_mount(rootfs)?);
        Some(dir.map_or_else(|| mount.to_path_buf(), |dir| mount.join(dir)))
    }

    /// A process's `mounts`: each source a mounted volume or a filesystem, each path a
    /// clean absolute path the container does not mount itself, no path twice.
    fn check_mounts(&self, at: &str, process: &ProcessSpec) -> Result<(), PodSpecError> {
        if process.init && process.restart == RestartPolicy::Always {
            return Err(PodSpecError::InitAlways {
                field: format!("{at}.restart"),
            });
        }
        let mut seen: Vec<(&str, String)> = Vec::new();
        for (index, mount) in process.mounts.iter().enumerate() {
            let field = format!("{at}.mounts[{index}]");
            if self.mount_source(&mount.source).is_none() {
                return Err(PodSpecError::UnknownMountSource {
                    field: format!("{field}.source"),
                    value: mount.source.clone(),
                });
            }
            let path_field = format!("{field}.path");
            check_mount_path(&path_field, &mount.path)?;
            check_path_order(&seen, &path_field, &mount.path)?;
            seen.push((&mount.path, path_field));
        }
        Ok(())
    }

    /// Where the volume or filesystem `source` is mounted in cradle.
    pub fn mount_source(&self, source: &str) -> Option<&str> {
        self.volumes
            .iter()
            .find(|v| v.name == source)
            .and_then(|v| v.path.as_deref())
            .or_else(|| {
                self.filesystems
                    .iter()
                    .find(|f| f.tag == source)
                    .map(|f| f.path.as_str())
            })
    }
}

/// `image`, `entrypoint` and `user` of one process: the latter two need an image; once
/// the host has resolved images, each process's image must be among them.
fn check_image_process(
    at: &str,
    process: &ProcessSpec,
    resolved: &ResolvedImages,
) -> Result<(), PodSpecError> {
    if let Some(tag) = &process.rootfs {
        if process.image.is_some() {
            return Err(PodSpecError::ImageAndRootfs {
                field: format!("{at}.rootfs"),
            });
        }
        if process.entrypoint.is_some() {
            // No image config whose Entrypoint it could replace: argv is the program.
            return Err(PodSpecError::RootfsEntrypoint {
                field: format!("{at}.entrypoint"),
            });
        }
        if let Some(user) = &process.user {
            if user.is_empty() || user.contains(['\0', '\n']) {
                return Err(PodSpecError::InvalidUser {
                    field: format!("{at}.user"),
                    value: user.clone(),
                });
            }
        }
        // The tag itself is checked against the filesystems by the caller.
        let _ = tag;
        return Ok(());
    }
    let Some(image) = &process.image else {
        for (field, set) in [
            ("entrypoint", process.entrypoint.is_some()),
            ("user", process.user.is_some()),
            ("cpus", process.cpus.is_some()),
            ("memory", process.memory.is_some()),
            ("mounts", !process.mounts.is_empty()),
        ] {
            if set {
                return Err(PodSpecError::NeedsImage {
                    field: format!("{at}.{field}"),
                });
            }
        }
        return Ok(());
    };
    let field = format!("{at}.image");
    let valid = !image.is_empty()
        && image.len() <= 512
        && image.bytes().all(|b| b.is_ascii_graphic())
        && !image.starts_with(['-', '/']);
    if !valid {
        return Err(PodSpecError::InvalidImage {
            field,
            value: image.clone(),
        });
    }
    if !resolved.is_empty() && !resolved.images.contains_key(image) {
        return Err(ContainerSpecError::Unresolved {
            field,
            image: image.clone(),
        }
        .into());
    }
    for (index, arg) in process.entrypoint.iter().flatten().enumerate() {
        if arg.contains('\0') {
            return Err(PodSpecError::NulCharacter {
                field: format!("{at}.entrypoint[{index}]"),
            });
        }
    }
    if let Some(user) = &process.user {
        if user.is_empty() || user.contains(['\0', '\n']) {
            return Err(PodSpecError::InvalidUser {
                field: format!("{at}.user"),
                value: user.clone(),
            });
        }
    }
    Ok(())
}

/// Checks a volume's `nvme_serial` and `nvme_nsid`, and that no earlier
/// volume (in `namespaces`) is the same namespace.
fn check_nvme<'a>(
    namespaces: &mut HashMap<(&'a str, u32), String>,
    at: &str,
    volume: &'a VolumeSpec,
) -> Result<(), PodSpecError> {
    let Some(serial) = &volume.nvme_serial else {
        if volume.nvme_nsid.is_some() {
            return Err(PodSpecError::NeedsNvmeSerial {
                field: format!("{at}.nvme_nsid"),
            });
        }
        return Ok(());
    };
    let valid = !serial.is_empty()
        && serial.len() <= MAX_NVME_SERIAL_BYTES
        && serial.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        && serial.trim() == serial;
    if !valid {
        return Err(PodSpecError::InvalidNvmeSerial {
            field: format!("{at}.nvme_serial"),
            value: serial.clone(),
        });
    }
    let nsid = volume.nvme_nsid.unwrap_or(DEFAULT_NVME_NSID);
    if nsid == 0 || nsid > MAX_NVME_NSID {
        return Err(PodSpecError::InvalidNvmeNsid {
            field: format!("{at}.nvme_nsid"),
            value: nsid,
        });
    }
    if let Some(first) = namespaces.get(&(serial.as_str(), nsid)) {
        return Err(PodSpecError::DuplicateNvme {
            field: format!("{at}.nvme_serial"),
            serial: serial.clone(),
            nsid,
            first: first.clone(),
        });
    }
    namespaces.insert((serial.as_str(), nsid), at.to_owned());
    Ok(())
}

/// `[a-z0-9-]{1,max}`.
fn check_name(field: &str, value: &str, max: usize) -> Result<(), PodSpecError> {
    let valid = !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if valid {
        return Ok(());
    }
    Err(PodSpecError::InvalidName {
        field: field.to_owned(),
        value: value.to_owned(),
        max,
    })
}

/// A virtio-fs tag: 1 to [`MAX_FS_TAG_BYTES`] bytes, no control characters
/// (NUL included: the tag is passed to mount(2) as a C string).
fn check_tag(field: &str, tag: &str) -> Result<(), PodSpecError> {
    if tag.is_empty() || tag.len() > MAX_FS_TAG_BYTES || tag.chars().any(char::is_control) {
        return Err(PodSpecError::InvalidTag {
            field: field.to_owned(),
            value: tag.to_owned(),
        });
    }
    Ok(())
}

/// Records `value` under `field`, failing if an earlier field had it.
fn check_unique(
    seen: &mut HashMap<String, String>,
    value: &str,
    field: String,
) -> Result<(), PodSpecError> {
    if let Some(first) = seen.get(value) {
        return Err(PodSpecError::DuplicateName {
            field,
            value: value.to_owned(),
            first: first.trim_end_matches(".name").to_owned(),
        });
    }
    seen.insert(value.to_owned(), field);
    Ok(())
}

/// A mount point: absolute, plain, not cradle's own.
fn check_mount_path(field: &str, path: &str) -> Result<(), PodSpecError> {
    check_absolute(field, path)?;
    let reserved = path == "/"
        || RESERVED_DIRS
            .iter()
            .any(|dir| path == *dir || is_inside(path, dir));
    if reserved {
        return Err(PodSpecError::ReservedPath {
            field: field.to_owned(),
            value: path.to_owned(),
        });
    }
    Ok(())
}

/// Absolute, no NUL, no empty/`.`/`..` components (`/` itself is fine).
fn check_absolute(field: &str, path: &str) -> Result<(), PodSpecError> {
    if path.contains('\0') {
        return Err(PodSpecError::NulCharacter {
            field: field.to_owned(),
        });
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(PodSpecError::RelativePath {
            field: field.to_owned(),
            value: path.to_owned(),
        });
    };
    if !rest.is_empty()
        && rest
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(PodSpecError::UncleanPath {
            field: field.to_owned(),
            value: path.to_owned(),
        });
    }
    Ok(())
}

/// Whether `path` is strictly below the directory `dir` (both clean).
fn is_inside(path: &str, dir: &str) -> bool {
    path.strip_prefix(dir)
        .is_some_and(|rest| rest.starts_with('/'))
}

/// Mounts happen in spec order: a path equal to an earlier one, or an
/// earlier one inside this one (this mount would hide it), is refused.
fn check_path_order(
    earlier: &[(&str, String)],
    field: &str,
    path: &str,
) -> Result<(), PodSpecError> {
    for (other, other_field) in earlier {
        if *other == path {
            return Err(PodSpecError::DuplicatePath {
                field: field.to_owned(),
                value: path.to_owned(),
                first: other_field.trim_end_matches(".path").to_owned(),
            });
        }
        if is_inside(other, path) {
            return Err(PodSpecError::HiddenPath {
                field: other_field.clone(),
                value: (*other).to_owned(),
                outer: path.to_owned(),
                outer_field: field.trim_end_matches(".path").to_owned(),
            });
        }
    }
    Ok(())
}

/// argv, env and cwd of one process.
fn check_process(at: &str, process: &ProcessSpec) -> Result<(), PodSpecError> {
    match process.argv.first() {
        // With an image, the image's Entrypoint and Cmd give the program.
        None if process.image.is_some() => {}
        None => {
            return Err(PodSpecError::EmptyArgv {
                field: format!("{at}.argv"),
            })
        }
        Some(program) if program.is_empty() => {
            return Err(PodSpecError::EmptyProgram {
                field: format!("{at}.argv[0]"),
            })
        }
        Some(_) => {}
    }
    for (index, arg) in process.argv.iter().enumerate() {
        if arg.contains('\0') {
            return Err(PodSpecError::NulCharacter {
                field: format!("{at}.argv[{index}]"),
            });
        }
    }
    for (index, entry) in process.env.iter().enumerate() {
        let field = format!("{at}.env[{index}]");
        if entry.contains('\0') {
            return Err(PodSpecError::NulCharacter { field });
        }
        if entry
            .split_once('=')
            .is_none_or(|(name, _)| name.is_empty())
        {
            return Err(PodSpecError::InvalidEnv {
                field,
                value: entry.clone(),
            });
        }
    }
    if let Some(cwd) = &process.cwd {
        check_absolute(&format!("{at}.cwd"), cwd)?;
    }
    if let Some([rows, columns]) = process.console_size {
        let field = format!("{at}.console_size");
        if !process.tty {
            return Err(PodSpecError::NeedsTty { field });
        }
        if rows == 0 || columns == 0 {
            return Err(PodSpecError::InvalidConsoleSize {
                field,
                rows,
                columns,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of docs/POD_SPEC.md.
    const EXAMPLE: &str = r#"{
        "name": "web",
        "volumes": [
            {"name": "data", "path": "/data", "fs": "ext4", "readonly": false},
            {"name": "scratch"}
        ],
        "filesystems": [
            {"tag": "gfs", "path": "/shared", "readonly": false}
        ],
        "processes": [
            {"name": "main", "argv": ["/bin/sh", "-c", "echo hi"], "env": ["A=b"], "cwd": "/"}
        ],
        "lifetime": "processes"
    }"#;

    fn parse(json: &str) -> Result<PodSpec, PodSpecError> {
        PodSpec::from_json(json.as_bytes())
    }

    /// A valid spec with one volume `v` whose fields are `volume` (JSON members).
    fn with_volume(volume: &str) -> String {
        format!(r#"{{"name": "p", "volumes": [{{"name": "v", {volume}}}]}}"#)
    }

    /// A valid spec with one process `m` whose fields are `process`.
    fn with_process(process: &str) -> String {
        format!(r#"{{"name": "p", "processes": [{{"name": "m", {process}}}]}}"#)
    }

    #[test]
    fn from_json_example_parses_every_field() {
        let spec = parse(EXAMPLE).unwrap();

        assert_eq!(spec.name, "web");
        assert_eq!(
            spec.volumes,
            [
                VolumeSpec {
                    name: "data".to_owned(),
                    path: Some("/data".to_owned()),
                    fs: Some(Filesystem::Ext4),
                    readonly: false,
                    nvme_serial: None,
                    nvme_nsid: None,
                },
                VolumeSpec {
                    name: "scratch".to_owned(),
                    path: None,
                    fs: None,
                    readonly: false,
                    nvme_serial: None,
                    nvme_nsid: None,
                },
            ]
        );
        assert_eq!(
            spec.filesystems,
            [FsSpec {
                tag: "gfs".to_owned(),
                path: "/shared".to_owned(),
                readonly: false,
            }]
        );
        assert_eq!(
            spec.processes,
            [ProcessSpec {
                name: "main".to_owned(),
                argv: vec!["/bin/sh".to_owned(), "-c".to_owned(), "echo hi".to_owned()],
                env: vec!["A=b".to_owned()],
                cwd: Some("/".to_owned()),
                ..ProcessSpec::default()
            }]
        );
        assert_eq!(spec.lifetime, PodLifetime::Processes);
    }

    #[test]
    fn from_json_name_only_has_no_volumes_or_processes() {
        let spec = parse(r#"{"name": "p"}"#).unwrap();

        assert!(spec.volumes.is_empty());
        assert!(spec.processes.is_empty());
    }

    #[test]
    fn from_json_without_lifetime_ends_with_the_processes() {
        let spec = parse(r#"{"name": "p"}"#).unwrap();

        assert_eq!(spec.lifetime, PodLifetime::Processes);
    }

    #[test]
    fn from_json_lifetime_until_shutdown_parses() {
        let spec = parse(r#"{"name": "p", "lifetime": "until-shutdown"}"#).unwrap();

        assert_eq!(spec.lifetime, PodLifetime::UntilShutdown);
    }

    #[test]
    fn from_json_unknown_lifetime_lists_the_choices() {
        let error = parse(r#"{"name": "p", "lifetime": "forever"}"#).unwrap_err();

        let PodSpecError::Json { field, source } = error else {
            panic!("expected a JSON error, got {error}");
        };
        assert_eq!(field, "lifetime");
        let text = source.to_string();
        assert!(
            text.contains("`processes`") && text.contains("`until-shutdown`"),
            "{text}"
        );
    }

    #[test]
    fn serialize_default_lifetime_is_left_out() {
        let spec = parse(r#"{"name": "p"}"#).unwrap();

        let json = serde_json::to_string(&spec).unwrap();

        assert_eq!(json, r#"{"name":"p"}"#);
    }

    #[test]
    fn pod_lifetime_displays_its_spec_spelling() {
        assert_eq!(PodLifetime::UntilShutdown.to_string(), "until-shutdown");
    }

    #[test]
    fn from_json_xfs_and_readonly_parse() {
        let spec = parse(&with_volume(
            r#""path": "/d", "fs": "xfs", "readonly": true"#,
        ))
        .unwrap();

        assert_eq!(spec.volumes[0].fs, Some(Filesystem::Xfs));
        assert!(spec.volumes[0].readonly);
    }

    #[test]
    fn serialize_then_parse_round_trips() {
        let spec = parse(EXAMPLE).unwrap();

        let json = serde_json::to_vec(&spec).unwrap();

        assert_eq!(PodSpec::from_json(&json).unwrap(), spec);
    }

    #[test]
    fn from_json_over_the_limit_is_too_large() {
        let json = vec![b' '; MAX_SPEC_BYTES + 1];

        let error = PodSpec::from_json(&json).unwrap_err();

        assert!(matches!(error, PodSpecError::TooLarge { bytes } if bytes == MAX_SPEC_BYTES + 1));
    }

    #[test]
    fn from_json_not_json_is_a_json_error() {
        let error = parse("name: web").unwrap_err();

        assert!(matches!(error, PodSpecError::Json { .. }));
    }

    #[test]
    fn from_json_unknown_volume_field_is_named() {
        let error = parse(&with_volume(r#""size": 10"#)).unwrap_err();

        let PodSpecError::Json { source, .. } = error else {
            panic!("expected a JSON error, got {error}");
        };
        assert!(
            source.to_string().contains("unknown field `size`"),
            "{source}"
        );
    }

    #[test]
    fn from_json_unknown_top_level_field_is_named() {
        let error = parse(r#"{"name": "p", "volume": []}"#).unwrap_err();

        let PodSpecError::Json { source, .. } = error else {
            panic!("expected a JSON error, got {error}");
        };
        assert!(
            source.to_string().contains("unknown field `volume`"),
            "{source}"
        );
    }

    #[test]
    fn from_json_unknown_field_error_names_where() {
        let error = parse(&with_volume(r#""size": 10"#)).unwrap_err();

        assert!(
            error.to_string().starts_with("volumes[0].size: "),
            "{error}"
        );
    }

    #[test]
    fn from_json_wrong_type_names_the_field() {
        let error = parse(&with_process(r#""argv": "sh""#)).unwrap_err();

        assert!(matches!(&error, PodSpecError::Json { field, .. } if field == "processes[0].argv"));
    }

    #[test]
    fn from_json_trailing_garbage_is_a_json_error() {
        let error = parse(r#"{"name": "p"} x"#).unwrap_err();

        assert!(matches!(error, PodSpecError::Json { field, .. } if field.is_empty()));
    }

    #[test]
    fn from_json_missing_name_is_named() {
        let error = parse(r#"{"volumes": []}"#).unwrap_err();

        let PodSpecError::Json { source, .. } = error else {
            panic!("expected a JSON error, got {error}");
        };
        assert!(
            source.to_string().contains("missing field `name`"),
            "{source}"
        );
    }

    #[test]
    fn from_json_unknown_filesystem_lists_the_choices() {
        let error = parse(&with_volume(r#""path": "/d", "fs": "btrfs""#)).unwrap_err();

        let PodSpecError::Json { source, .. } = error else {
            panic!("expected a JSON error, got {error}");
        };
        let text = source.to_string();
        assert!(
            text.contains("btrfs") && text.contains("`ext4`") && text.contains("`xfs`"),
            "{text}"
        );
    }

    #[test]
    fn validate_uppercase_pod_name_is_invalid() {
        let error = parse(r#"{"name": "Web"}"#).unwrap_err();

        assert!(
            matches!(error, PodSpecError::InvalidName { field, max: 63, .. } if field == "name")
        );
    }

    #[test]
    fn validate_nvme_volume_defaults_to_namespace_1() {
        let spec = parse(&with_volume(
            r#""path": "/lv", "nvme_serial": "crib-nvme0""#,
        ))
        .unwrap();

        assert_eq!(spec.volumes[0].nvme(), Some(("crib-nvme0", 1)));
    }

    #[test]
    fn validate_nvme_volume_takes_a_namespace() {
        let spec = parse(&with_volume(r#""nvme_serial": "SN 01", "nvme_nsid": 3"#)).unwrap();

        assert_eq!(spec.volumes[0].nvme(), Some(("SN 01", 3)));
    }

    #[test]
    fn validate_virtio_volume_is_no_nvme() {
        let spec = parse(&with_volume(r#""path": "/d""#)).unwrap();

        assert_eq!(spec.volumes[0].nvme(), None);
    }

    #[test]
    fn validate_invalid_nvme_serials_are_named() {
        for serial in ["", " x", "x ", "abcdefghij0123456789x", "a\\u0007b", "é"] {
            let error = parse(&with_volume(&format!(r#""nvme_serial": "{serial}""#))).unwrap_err();

            assert!(
                matches!(&error, PodSpecError::InvalidNvmeSerial { field, .. } if field == "volumes[0].nvme_serial"),
                "{serial:?}: {error}"
            );
        }
    }

    #[test]
    fn validate_nvme_nsid_0_is_invalid() {
        let error = parse(&with_volume(r#""nvme_serial": "s", "nvme_nsid": 0"#)).unwrap_err();

        assert!(
            matches!(&error, PodSpecError::InvalidNvmeNsid { field, value: 0 } if field == "volumes[0].nvme_nsid")
        );
        assert!(error.to_string().contains("nvme0n1 is namespace 1"));
    }

    #[test]
    fn validate_nvme_nsid_without_serial_needs_one() {
        let error = parse(&with_volume(r#""nvme_nsid": 2"#)).unwrap_err();

        assert!(
            matches!(error, PodSpecError::NeedsNvmeSerial { field } if field == "volumes[0].nvme_nsid")
        );
    }

    #[test]
    fn validate_two_volumes_on_one_namespace_are_refused() {
        let json = r#"{"name": "p", "volumes": [
            {"name": "a", "nvme_serial": "s"},
            {"name": "b", "nvme_serial": "s", "nvme_nsid": 1}]}"#;

        let error = parse(json).unwrap_err();

        assert!(matches!(
            error,
            PodSpecError::DuplicateNvme { field, nsid: 1, first, .. }
                if field == "volumes[1].nvme_serial" && first == "volumes[0]"
        ));
    }

    #[test]
    fn validate_two_namespaces_of_one_controller_are_fine() {
        let json = r#"{"name": "p", "volumes": [
            {"name": "a", "nvme_serial": "s"},
            {"name": "b", "nvme_serial": "s", "nvme_nsid": 2}]}"#;

        assert!(parse(json).is_ok());
    }

    #[test]
    fn validate_volume_name_of_21_bytes_is_invalid() {
        // One more than the virtio-blk serial holds.
        let error =
            parse(r#"{"name": "p", "volumes": [{"name": "abcdefghij0123456789x"}]}"#).unwrap_err();

        assert!(
            matches!(error, PodSpecError::InvalidName { field, max: 20, .. } if field == "volumes[0].name")
        );
    }

    #[test]
    fn validate_volume_name_of_20_bytes_is_valid() {
        assert!(parse(r#"{"name": "p", "volumes": [{"name": "abcdefghij0123456789"}]}"#).is_ok());
    }

    #[test]
    fn validate_empty_volume_name_is_invalid() {
        let error = parse(r#"{"name": "p", "volumes": [{"name": ""}]}"#).unwrap_err();

        assert!(matches!(error, PodSpecError::InvalidName { .. }));
    }

    #[test]
    fn validate_duplicate_volume_name_names_the_first() {
        let error =
            parse(r#"{"name": "p", "volumes": [{"name": "a"}, {"name": "a"}]}"#).unwrap_err();

        assert!(matches!(
            &error,
            PodSpecError::DuplicateName { field, first, .. }
                if field == "volumes[1].name" && first == "volumes[0]"
        ));
        assert!(error.to_string().contains("give each one its own name"));
    }

    #[test]
    fn validate_duplicate_process_name_is_duplicate() {
        let json = r#"{"name": "p", "processes": [
            {"name": "a", "argv": ["x"]}, {"name": "a", "argv": ["y"]}]}"#;

        let error = parse(json).unwrap_err();

        assert!(
            matches!(error, PodSpecError::DuplicateName { field, .. } if field == "processes[1].name")
        );
    }

    #[test]
    fn validate_volume_and_process_may_share_a_name() {
        let json = r#"{"name": "p", "volumes": [{"name": "a"}],
            "processes": [{"name": "a", "argv": ["x"]}]}"#;

        assert!(parse(json).is_ok());
    }

    #[test]
    fn validate_relative_path_says_to_start_with_slash() {
        let error = parse(&with_volume(r#""path": "data""#)).unwrap_err();

        assert!(
            matches!(&error, PodSpecError::RelativePath { field, .. } if field == "volumes[0].path")
        );
        assert!(error.to_string().contains("start it with '/'"));
    }

    #[test]
    fn validate_dot_dot_path_is_unclean() {
        let error = parse(&with_volume(r#""path": "/data/../etc""#)).unwrap_err();

        assert!(matches!(error, PodSpecError::UncleanPath { .. }));
    }

    #[test]
    fn validate_trailing_slash_path_is_unclean() {
        let error = parse(&with_volume(r#""path": "/data/""#)).unwrap_err();

        assert!(matches!(error, PodSpecError::UncleanPath { .. }));
    }

    #[test]
    fn validate_root_path_is_reserved() {
        let error = parse(&with_volume(r#""path": "/""#)).unwrap_err();

        assert!(matches!(error, PodSpecError::ReservedPath { .. }));
    }

    #[test]
    fn validate_path_under_proc_is_reserved() {
        let error = parse(&with_volume(r#""path": "/proc/x""#)).unwrap_err();

        assert!(matches!(error, PodSpecError::ReservedPath { .. }));
    }

    #[test]
    fn validate_path_sharing_a_prefix_with_dev_is_fine() {
        assert!(parse(&with_volume(r#""path": "/devdata""#)).is_ok());
    }

    #[test]
    fn validate_nul_in_path_is_a_nul_character() {
        let error = parse(&with_volume(r#""path": "/da\u0000ta""#)).unwrap_err();

        assert!(
            matches!(error, PodSpecError::NulCharacter { field } if field == "volumes[0].path")
        );
    }

    #[test]
    fn validate_same_path_twice_is_duplicate() {
        let json = r#"{"name": "p", "volumes": [
            {"name": "a", "path": "/data"}, {"name": "b", "path": "/data"}]}"#;

        let error = parse(json).unwrap_err();

        assert!(matches!(
            error,
            PodSpecError::DuplicatePath { field, first, .. }
                if field == "volumes[1].path" && first == "volumes[0]"
        ));
    }

    #[test]
    fn validate_child_before_parent_is_hidden() {
        let json = r#"{"name": "p", "volumes": [
            {"name": "a", "path": "/data/db"}, {"name": "b", "path": "/data"}]}"#;

        let error = parse(json).unwrap_err();

        assert!(matches!(
            &error,
            PodSpecError::HiddenPath { field, outer_field, .. }
                if field == "volumes[0].path" && outer_field == "volumes[1]"
        ));
        assert!(error.to_string().contains("list volumes[1] first"));
    }

    #[test]
    fn validate_parent_before_child_is_fine() {
        let json = r#"{"name": "p", "volumes": [
            {"name": "a", "path": "/data"}, {"name": "b", "path": "/data/db"}]}"#;

        assert!(parse(json).is_ok());
    }

    #[test]
    fn validate_fs_without_path_needs_path() {
        let error = parse(&with_volume(r#""fs": "ext4""#)).unwrap_err();

        assert!(matches!(error, PodSpecError::NeedsPath { field } if field == "volumes[0].fs"));
    }

    #[test]
    fn validate_readonly_without_path_needs_path() {
        let error = parse(&with_volume(r#""readonly": true"#)).unwrap_err();

        assert!(
            matches!(error, PodSpecError::NeedsPath { field } if field == "volumes[0].readonly")
        );
    }

    #[test]
    fn validate_empty_argv_is_empty_argv() {
        let error = parse(&with_process(r#""argv": []"#)).unwrap_err();

        assert!(matches!(error, PodSpecError::EmptyArgv { field } if field == "processes[0].argv"));
    }

    #[test]
    fn validate_empty_program_is_empty_program() {
        let error = parse(&with_process(r#""argv": ["", "x"]"#)).unwrap_err();

        assert!(
            matches!(error, PodSpecError::EmptyProgram { field } if field == "processes[0].argv[0]")
        );
    }

    #[test]
    fn validate_nul_in_argument_names_the_argument() {
        let error = parse(&with_process(r#""argv": ["sh", "a\u0000b"]"#)).unwrap_err();

        assert!(
            matches!(error, PodSpecError::NulCharacter { field } if field == "processes[0].argv[1]")
        );
    }

    #[test]
    fn validate_env_without_equals_is_invalid_env() {
        let error = parse(&with_process(r#""argv": ["sh"], "env": ["A=1", "B"]"#)).unwrap_err();

        assert!(
            matches!(error, PodSpecError::InvalidEnv { field, .. } if field == "processes[0].env[1]")
        );
    }

    #[test]
    fn validate_env_with_empty_name_is_invalid_env() {
        let error = parse(&with_process(r#""argv": ["sh"], "env": ["=1"]"#)).unwrap_err();

        assert!(matches!(error, PodSpecError::InvalidEnv { .. }));
    }

    #[test]
    fn validate_env_with_empty_value_is_fine() {
        assert!(parse(&with_process(r#""argv": ["sh"], "env": ["A="]"#)).is_ok());
    }

    #[test]
    fn validate_relative_cwd_is_relative_path() {
        let error = parse(&with_process(r#""argv": ["sh"], "cwd": "tmp""#)).unwrap_err();

        assert!(
            matches!(error, PodSpecError::RelativePath { field, .. } if field == "processes[0].cwd")
        );
    }

    #[test]
    fn validate_bare_program_name_is_fine() {
        // Looked up in PATH, like the test hook's command.
        assert!(parse(&with_process(r#""argv": ["sh", "-c", "true"]"#)).is_ok());
    }

    /// A valid spec with the filesystems `filesystems` (JSON array members).
    fn with_filesystems(filesystems: &str) -> String {
        format!(r#"{{"name": "p", "filesystems": [{filesystems}]}}"#)
    }

    #[test]
    fn from_json_filesystem_readonly_defaults_to_false() {
        let spec = parse(&with_filesystems(r#"{"tag": "gfs", "path": "/shared"}"#)).unwrap();

        assert!(!spec.filesystems[0].readonly);
    }

    #[test]
    fn from_json_filesystem_readonly_parses() {
        let spec = parse(&with_filesystems(
            r#"{"tag": "gfs", "path": "/shared", "readonly": true}"#,
        ))
        .unwrap();

        assert!(spec.filesystems[0].readonly);
    }

    #[test]
    fn from_json_filesystem_without_path_is_named() {
        let error = parse(&with_filesystems(r#"{"tag": "gfs"}"#)).unwrap_err();

        let PodSpecError::Json { source, .. } = error else {
            panic!("expected a JSON error, got {error}");
        };
        assert!(
            source.to_string().contains("missing field `path`"),
            "{source}"
        );
    }

    #[test]
    fn from_json_unknown_filesystem_field_is_named() {
        let error = parse(&with_filesystems(
            r#"{"tag": "gfs", "path": "/s", "cache": "never"}"#,
        ))
        .unwrap_err();

        assert!(
            error.to_string().starts_with("filesystems[0].cache: "),
            "{error}"
        );
    }

    #[test]
    fn validate_tag_of_36_bytes_is_valid() {
        let json = with_filesystems(&format!(r#"{{"tag": "{}", "path": "/s"}}"#, "t".repeat(36)));

        assert!(parse(&json).is_ok());
    }

    #[test]
    fn validate_tag_of_37_bytes_is_invalid() {
        let json = with_filesystems(&format!(r#"{{"tag": "{}", "path": "/s"}}"#, "t".repeat(37)));

        let error = parse(&json).unwrap_err();

        assert!(
            matches!(&error, PodSpecError::InvalidTag { field, .. } if field == "filesystems[0].tag")
        );
        assert!(error.to_string().contains("1 to 36 bytes"), "{error}");
    }

    #[test]
    fn validate_empty_tag_is_invalid() {
        let error = parse(&with_filesystems(r#"{"tag": "", "path": "/s"}"#)).unwrap_err();

        assert!(matches!(error, PodSpecError::InvalidTag { .. }));
    }

    #[test]
    fn validate_nul_in_tag_is_invalid() {
        let error = parse(&with_filesystems(r#"{"tag": "g\u0000fs", "path": "/s"}"#)).unwrap_err();

        assert!(matches!(error, PodSpecError::InvalidTag { .. }));
    }

    #[test]
    fn validate_tag_may_use_uppercase_and_dots() {
        // Any tag crib run --fs accepts.
        assert!(parse(&with_filesystems(r#"{"tag": "My.Share_1", "path": "/s"}"#)).is_ok());
    }

    #[test]
    fn validate_duplicate_tag_names_the_first() {
        let error = parse(&with_filesystems(
            r#"{"tag": "gfs", "path": "/a"}, {"tag": "gfs", "path": "/b"}"#,
        ))
        .unwrap_err();

        assert!(matches!(
            &error,
            PodSpecError::DuplicateTag { field, first, .. }
                if field == "filesystems[1].tag" && first == "filesystems[0]"
        ));
    }

    #[test]
    fn validate_relative_filesystem_path_is_relative() {
        let error = parse(&with_filesystems(r#"{"tag": "gfs", "path": "shared"}"#)).unwrap_err();

        assert!(
            matches!(error, PodSpecError::RelativePath { field, .. } if field == "filesystems[0].path")
        );
    }

    #[test]
    fn validate_unclean_filesystem_path_is_unclean() {
        let error = parse(&with_filesystems(r#"{"tag": "gfs", "path": "/a/./b"}"#)).unwrap_err();

        assert!(matches!(error, PodSpecError::UncleanPath { .. }));
    }

    #[test]
    fn validate_filesystem_under_sys_is_reserved() {
        let error = parse(&with_filesystems(r#"{"tag": "gfs", "path": "/sys/fs"}"#)).unwrap_err();

        assert!(matches!(error, PodSpecError::ReservedPath { .. }));
    }

    #[test]
    fn validate_filesystem_on_a_volume_path_is_duplicate() {
        let json = r#"{"name": "p", "volumes": [{"name": "v", "path": "/data"}],
            "filesystems": [{"tag": "gfs", "path": "/data"}]}"#;

        let error = parse(json).unwrap_err();

        assert!(matches!(
            error,
            PodSpecError::DuplicatePath { field, first, .. }
                if field == "filesystems[0].path" && first == "volumes[0]"
        ));
    }

    #[test]
    fn validate_filesystem_above_a_volume_is_hidden() {
        // Filesystems are mounted after the volumes: /data would hide /data/db.
        let json = r#"{"name": "p", "volumes": [{"name": "v", "path": "/data/db"}],
            "filesystems": [{"tag": "gfs", "path": "/data"}]}"#;

        let error = parse(json).unwrap_err();

        assert!(matches!(
            error,
            PodSpecError::HiddenPath { field, outer_field, .. }
                if field == "volumes[0].path" && outer_field == "filesystems[0]"
        ));
    }

    #[test]
    fn validate_filesystem_inside_a_volume_is_fine() {
        let json = r#"{"name": "p", "volumes": [{"name": "v", "path": "/data"}],
            "filesystems": [{"tag": "gfs", "path": "/data/shared"}]}"#;

        assert!(parse(json).is_ok());
    }

    #[test]
    fn validate_two_filesystems_at_one_path_are_duplicate() {
        let error = parse(&with_filesystems(
            r#"{"tag": "a", "path": "/s"}, {"tag": "b", "path": "/s"}"#,
        ))
        .unwrap_err();

        assert!(
            matches!(error, PodSpecError::DuplicatePath { field, .. } if field == "filesystems[1].path")
        );
    }

    #[test]
    fn filesystem_default_is_ext4_and_displays_its_mount_name() {
        assert_eq!(Filesystem::default(), Filesystem::Ext4);
        assert_eq!(Filesystem::Xfs.to_string(), "xfs");
    }

    #[test]
    fn network_parses_and_gives_addresses() {
        let spec = parse(
            r#"{"name": "p", "network": {"address": "10.88.0.2/16", "gateway": "10.88.0.1",
                "address6": "fd63:7269:6200::2/64", "mtu": 1400, "nameservers": ["10.88.0.1"]}}"#,
        )
        .unwrap();
        let net = spec.network.unwrap();
        assert_eq!(net.ipv4(), Some(("10.88.0.2".parse().unwrap(), 16)));
        assert_eq!(net.ipv6().map(|(_, l)| l), Some(64));
    }

    #[test]
    fn network_bad_values_name_the_field() {
        for (json, field) in [
            (r#"{"address": "10.88.0.2"}"#, "network.address"),
            (r#"{"address": "10.88.0.2/33"}"#, "network.address"),
            (
                r#"{"address": "10.0.0.2/8", "gateway": "x"}"#,
                "network.gateway",
            ),
            (
                r#"{"address": "10.0.0.2/8", "address6": "fd00::2"}"#,
                "network.address6",
            ),
            (
                r#"{"address": "10.0.0.2/8", "gateway6": "10.0.0.1"}"#,
                "network.gateway6",
            ),
            (r#"{"address": "10.0.0.2/8", "mtu": 100}"#, "network.mtu"),
            (
                r#"{"address": "10.0.0.2/8", "nameservers": ["a"]}"#,
                "network.nameservers[0]",
            ),
            (
                r#"{"address": "10.0.0.2/8", "search": ["a b"]}"#,
                "network.search[0]",
            ),
        ] {
            let error = parse(&format!(r#"{{"name": "p", "network": {json}}}"#)).unwrap_err();
            assert!(
                matches!(&error, PodSpecError::InvalidNetwork { field: f, .. } if f == field),
                "{json}: {error}"
            );
        }
    }

    #[test]
    fn image_process_needs_no_argv_and_takes_entrypoint_and_user() {
        let spec = parse(&with_process(
            r#""image": "busybox:1.36", "entrypoint": ["/bin/sh"], "user": "1000:1000""#,
        ))
        .unwrap();
        assert_eq!(spec.processes[0].image.as_deref(), Some("busybox:1.36"));
    }

    #[test]
    fn user_without_image_is_refused() {
        let err = parse(&with_process(r#""argv": ["sh"], "user": "app""#)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "processes[0].user applies only to a process with an image or a rootfs; add one or remove processes[0].user"
        );
    }

    /// A pod whose filesystem `root` may be a process's rootfs.
    fn with_rootfs_process(process: &str) -> String {
        format!(
            r#"{{"name": "p", "filesystems": [{{"tag": "root", "path": "/run/crib-root"}}],
               "processes": [{{"name": "m", {process}}}]}}"#
        )
    }

    /// A pod with the filesystem `share` and no processes.
    fn share_pod() -> PodSpec {
        parse(r#"{"name": "p", "filesystems": [{"tag": "share", "path": "/run/share"}]}"#).unwrap()
    }

    fn rootfs_process(rootfs: &str) -> ProcessSpec {
        ProcessSpec {
            name: "c1".into(),
            rootfs: Some(rootfs.into()),
            argv: vec!["sh".into()],
            ..ProcessSpec::default()
        }
    }

    #[test]
    fn rootfs_subdirectory_of_a_filesystem_is_valid_and_joined_to_its_mount() {
        let pod = share_pod();

        pod.validate_process(1, &rootfs_process("share/c1/rootfs"))
            .unwrap();

        assert_eq!(
            pod.rootfs_path("share/c1/rootfs").unwrap(),
            std::path::Path::new("/run/share/c1/rootfs")
        );
        assert_eq!(
            pod.rootfs_path("share").unwrap(),
            std::path::Path::new("/run/share")
        );
    }

    #[test]
    fn rootfs_unclean_subdirectories_are_refused_naming_the_field() {
        let pod = share_pod();
        for bad in [
            "share/../etc",
            "share/c1/..",
            "share/./c1",
            "share/",
            "share//c1",
            "share/c1/",
            "share/c1//rootfs",
        ] {
            let err = pod.validate_process(2, &rootfs_process(bad)).unwrap_err();

            assert!(
                matches!(&err, PodSpecError::InvalidRootfsDir { field, .. } if field == "processes[2].rootfs"),
                "{bad}: {err}"
            );
            assert!(err.to_string().contains("share/c1/rootfs"), "{err}");
        }
    }

    #[test]
    fn rootfs_absolute_path_is_refused() {
        let err = share_pod()
            .validate_process(0, &rootfs_process("/run/share/c1"))
            .unwrap_err();

        assert!(
            matches!(&err, PodSpecError::InvalidRootfsDir { field, .. } if field == "processes[0].rootfs"),
            "{err}"
        );
    }

    #[test]
    fn rootfs_with_nul_is_refused() {
        let err = share_pod()
            .validate_process(0, &rootfs_process("share/c\0x"))
            .unwrap_err();

        assert!(
            matches!(&err, PodSpecError::NulCharacter { field } if field == "processes[0].rootfs"),
            "{err}"
        );
    }

    #[test]
    fn rootfs_subdirectory_of_an_unknown_tag_names_the_tag() {
        let err = share_pod()
            .validate_process(0, &rootfs_process("gfs/c1"))
            .unwrap_err();

        assert_eq!(
            err.to_string(),
            "processes[0].rootfs: \"gfs\" is not the tag of one of the pod's filesystems; add a filesystem with that tag (and a share for it)"
        );
    }

    /// Found by the container_create fuzz target: cradle checked a rootfs against
    /// `mount_source` of its tag, which is a volume's mount when a volume has that name.
    #[test]
    fn rootfs_mount_is_the_filesystems_when_a_volume_has_its_tag_as_name() {
        let pod = parse(
            r#"{"name": "p", "volumes": [{"name": "data", "path": "/data"}],
                "filesystems": [{"tag": "data", "path": "/data/share"}]}"#,
        )
        .unwrap();

        pod.validate_process(0, &rootfs_process("data/c1")).unwrap();

        assert_eq!(pod.rootfs_mount("data/c1"), Some("/data/share"));
        assert_eq!(
            pod.rootfs_path("data/c1").unwrap(),
            std::path::Path::new("/data/share/c1")
        );
    }

    #[test]
    fn rootfs_tag_holding_a_slash_is_used_whole() {
        let pod =
            parse(r#"{"name": "p", "filesystems": [{"tag": "a/b", "path": "/run/ab"}]}"#).unwrap();

        pod.validate_process(0, &rootfs_process("a/b")).unwrap();

        assert_eq!(pod.split_rootfs("a/b"), ("a/b", None));
    }

    #[test]
    fn validate_process_checks_mounts_against_the_pod() {
        let process = ProcessSpec {
            mounts: vec![MountSpec {
                source: "nope".into(),
                path: "/data".into(),
                readonly: false,
            }],
            ..rootfs_process("share/c1")
        };

        let err = share_pod().validate_process(3, &process).unwrap_err();

        assert!(
            matches!(&err, PodSpecError::UnknownMountSource { field, .. } if field == "processes[3].mounts[0].source"),
            "{err}"
        );
    }

    #[test]
    fn validate_process_checks_the_name() {
        let process = ProcessSpec {
            name: "C1".into(),
            ..rootfs_process("share")
        };

        let err = share_pod().validate_process(0, &process).unwrap_err();

        assert!(
            matches!(&err, PodSpecError::InvalidName { field, .. } if field == "processes[0].name"),
            "{err}"
        );
    }

    #[test]
    fn process_from_json_names_an_unknown_field_under_its_prefix() {
        let err = PodSpec::process_from_json(
            br#"{"name": "c", "argv": ["sh"], "rootfs": "share", "privileged": true}"#,
            "processes[1]",
        )
        .unwrap_err();

        assert!(
            matches!(&err, PodSpecError::Json { field, .. } if field == "processes[1].privileged"),
            "{err}"
        );
    }

    #[test]
    fn process_from_json_reads_tty_and_console_size() {
        let process = PodSpec::process_from_json(
            br#"{"name": "c", "argv": ["sh"], "rootfs": "share", "tty": true, "console_size": [24, 80]}"#,
            "processes[1]",
        )
        .unwrap();

        assert!(process.tty);
        assert_eq!(process.console_size, Some([24, 80]));
    }

    #[test]
    fn validate_process_refuses_console_size_without_tty() {
        let process = ProcessSpec {
            console_size: Some([24, 80]),
            ..rootfs_process("share")
        };

        let err = share_pod().validate_process(2, &process).unwrap_err();

        assert!(
            matches!(&err, PodSpecError::NeedsTty { field } if field == "processes[2].console_size"),
            "{err}"
        );
    }

    #[test]
    fn validate_process_refuses_a_zero_console_size() {
        let process = ProcessSpec {
            tty: true,
            console_size: Some([0, 80]),
            ..rootfs_process("share")
        };

        let err = share_pod().validate_process(2, &process).unwrap_err();

        assert!(
            matches!(&err, PodSpecError::InvalidConsoleSize { field, rows: 0, columns: 80 } if field == "processes[2].console_size"),
            "{err}"
        );
    }

    #[test]
    fn validate_process_accepts_a_tty_process() {
        let process = ProcessSpec {
            tty: true,
            console_size: Some([24, 80]),
            ..rootfs_process("share")
        };

        assert!(share_pod().validate_process(2, &process).is_ok());
    }

    #[test]
    fn process_from_json_reads_a_process_object() {
        let process = PodSpec::process_from_json(
            br#"{"name":"c1","rootfs":"share/c1/rootfs","argv":["sh","-c","x"],"env":["A=1"],"cwd":"/","user":"0:0","memory":"64M"}"#,
            "processes[0]",
        )
        .unwrap();

        assert_eq!(process.rootfs.as_deref(), Some("share/c1/rootfs"));
        assert!(process.memory.is_some());
    }

    #[test]
    fn rootfs_process_takes_argv_user_and_limits() {
        let spec = parse(&with_rootfs_process(
            r#""rootfs": "root", "argv": ["sh"], "user": "0:0", "memory": "64M""#,
        ))
        .unwrap();
        assert_eq!(spec.processes[0].rootfs.as_deref(), Some("root"));
    }

    #[test]
    fn rootfs_naming_no_filesystem_is_refused() {
        let err = parse(&with_rootfs_process(r#""rootfs": "nope", "argv": ["sh"]"#)).unwrap_err();
        assert!(
            matches!(&err, PodSpecError::UnknownRootfs { field, .. } if field == "processes[0].rootfs"),
            "{err}"
        );
    }

    #[test]
    fn rootfs_with_image_is_refused() {
        let err = parse(&with_rootfs_process(
            r#""rootfs": "root", "image": "busybox", "argv": ["sh"]"#,
        ))
        .unwrap_err();
        assert!(matches!(err, PodSpecError::ImageAndRootfs { .. }), "{err}");
    }

    #[test]
    fn rootfs_without_argv_is_refused() {
        let err = parse(&with_rootfs_process(r#""rootfs": "root""#)).unwrap_err();
        assert!(matches!(err, PodSpecError::EmptyArgv { .. }), "{err}");
    }

    #[test]
    fn rootfs_with_entrypoint_is_refused() {
        let err = parse(&with_rootfs_process(
            r#""rootfs": "root", "argv": ["sh"], "entrypoint": ["x"]"#,
        ))
        .unwrap_err();
        assert!(
            matches!(err, PodSpecError::RootfsEntrypoint { .. }),
            "{err}"
        );
    }

    #[test]
    fn unresolved_image_is_refused_once_the_host_resolved_images() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let json = format!(
            r#"{{"name": "p", "processes": [{{"name": "m", "image": "other"}}],
               "resolved": {{"layers": [{{"diff_id": "{digest}", "offset": 0, "size": 4096}}],
                            "images": {{"busybox": {{"digest": "{digest}", "layers": ["{digest}"]}}}}}}}}"#
        );
        let err = parse(&json).unwrap_err();
        assert!(err.to_string().contains("processes[0].image"), "{err}");
    }

    #[test]
    fn bad_image_reference_is_named() {
        let err = parse(&with_process(r#""image": "-rm""#)).unwrap_err();
        assert!(matches!(err, PodSpecError::InvalidImage { .. }), "{err}");
    }

    #[test]
    fn limits_parse_and_bad_ones_name_the_field() {
        let spec = parse(&with_process(
            r#""image": "a", "cpus": 0.5, "memory": "64M""#,
        ))
        .unwrap();
        assert_eq!(spec.processes[0].cpus, Some(MilliCpus(500)));
        assert_eq!(spec.processes[0].memory, Some(MemoryBytes(64 << 20)));
        let err = parse(&with_process(r#""image": "a", "memory": "lots""#)).unwrap_err();
        assert!(err.to_string().starts_with("processes[0].memory"), "{err}");
        let err = parse(&with_process(r#""image": "a", "cpus": 0""#)).unwrap_err();
        assert!(err.to_string().starts_with("processes[0].cpus"), "{err}");
    }

    #[test]
    fn mounts_name_a_volume_and_a_clean_path_outside_proc() {
        let ok = r#"{"name": "p", "volumes": [{"name": "data", "path": "/data"}],
            "processes": [{"name": "m", "image": "a", "mounts": [{"source": "data", "path": "/var/lib/db", "readonly": true}]}]}"#;
        parse(ok).unwrap();
        let in_proc = ok.replace("/var/lib/db", "/proc/sys");
        let err = parse(&in_proc).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "processes[0].mounts[0].path: \"/proc/sys\" is / or inside /dev, /proc or /sys"
            ),
            "{err}"
        );
        let unknown = ok.replace("\"source\": \"data\"", "\"source\": \"nope\"");
        let err = parse(&unknown).unwrap_err();
        assert!(
            err.to_string().starts_with("processes[0].mounts[0].source"),
            "{err}"
        );
    }
}
