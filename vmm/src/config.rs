//! What the user asks for: the VM configuration, from the command line (`crib run --kernel
//! ...`) or from a JSON document (`crib run --config vm.json`). Both end in one type,
//! [`VmConfig`], checked by the same functions; every error names the option (`--cpus`) or
//! the field (`disks[1].iops`) and how to fix it.

use std::fmt;
use std::path::{Path, PathBuf};

use devices::virtio::block::{
    ID_BYTES as DISK_ID_BYTES, MAX_QUEUES as MAX_DISK_QUEUES, MAX_QUEUE_SIZE, MIN_QUEUE_SIZE,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Smallest guest RAM crib accepts: below this a Linux kernel cannot even decompress.
pub const MIN_MEMORY_BYTES: u64 = 16 << 20;
/// Largest guest RAM: it must be mappable in crib's own 47-bit address space, with half
/// of that left for everything else.
pub const MAX_MEMORY_BYTES: u64 = 1 << 46;
/// Largest vCPU count: LAPIC IDs are 8-bit in the MADT entries crib writes.
pub const MAX_CPUS: u8 = 254;
/// The command line used when `--cmdline` is not given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";
/// Guest RAM when `--memory` is not given.
pub const DEFAULT_MEMORY_BYTES: u64 = 512 << 20;
/// Largest config file crib reads: a VM with hundreds of disks fits in far less.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;
/// Longest VM id (`--id`): it goes into every log line.
pub const MAX_ID_BYTES: usize = 64;

/// Where the guest's serial console goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// crib's stdout (and stdin to the guest).
    #[default]
    Stdout,
    /// Discarded.
    Off,
    /// Appended to a file.
    File(PathBuf),
}

impl fmt::Display for ConsoleConfig {
    /// The `--console` syntax: `stdout`, `off` or `file=PATH`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stdout => f.write_str("stdout"),
            Self::Off => f.write_str("off"),
            Self::File(path) => write!(f, "file={}", path.display()),
        }
    }
}

/// A virtio-blk volume (`--disk`, or one entry of `disks` in a config file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Backing file or block device.
    pub path: PathBuf,
    /// The disk's serial (GET_ID); cradle finds volumes by it.
    pub id: String,
    #[serde(default)]
    pub readonly: bool,
    /// O_DIRECT: bypass the host page cache.
    #[serde(default)]
    pub direct: bool,
    #[serde(default = "default_queues")]
    pub queues: u16,
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    /// Operations per second, if limited.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_optional_size"
    )]
    pub iops: Option<u64>,
    /// Bytes per second, if limited.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_optional_size"
    )]
    pub bandwidth: Option<u64>,
    /// One-time burst above `bandwidth`, in bytes.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_optional_size"
    )]
    pub burst: Option<u64>,
    /// One-time burst above `iops`, in operations.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_optional_size"
    )]
    pub iops_burst: Option<u64>,
    /// Not empty: the disk is read-only and made of these files (a pod's image layers,
    /// set by `crib pod run`, never by a user); `path` then only names it.
    #[serde(skip)]
    pub composite: Vec<devices::virtio::block::CompositePart>,
}

/// The virtio-vsock device (`--vsock`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's CID, [`MIN_VSOCK_CID`] to [`MAX_VSOCK_CID`].
    pub cid: u32,
    /// The Unix socket host processes connect to (`CONNECT <port>\n`); guest connections
    /// to host port P go to `<socket>_P`.
    pub socket: PathBuf,
}

/// A virtio-fs share (`--fs`): a vhost-user-fs backend crib connects to (`socket`), or a
/// directory crib serves with a virtiofsd of its own (`dir`). Exactly one of the two.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// What the guest mounts: `mount -t virtiofs TAG /mnt`; 1 to 36 bytes.
    pub tag: String,
    /// A running backend's vhost-user socket (`virtiofsd --socket-path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// A host directory crib shares through a virtiofsd it starts and supervises.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Request queues (plus one high-priority queue).
    #[serde(default = "default_queues")]
    pub queues: u16,
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
}

/// A virtio-net device on a tap (`--net`, or one entry of `net` in a config file):
/// `tap` (an existing interface) or `ifname` (crib creates it if missing), not both.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// An existing tap interface (`ip tuntap add dev NAME mode tap user $USER`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// A tap crib opens, or creates when missing (needs CAP_NET_ADMIN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    /// The guest's MAC (`52:54:00:12:34:56`); random, locally administered, if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Queue pairs (multiqueue tap when more than one).
    #[serde(default = "default_queues")]
    pub queues: u16,
    /// Bytes per second each way, if limited.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_optional_size"
    )]
    pub bandwidth: Option<u64>,
    /// Frames per second each way, if limited.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_optional_size"
    )]
    pub ops: Option<u64>,
    /// The guest's addresses, shown by `GET /api/v1/vm` (`crib pod run` and `--net pod`
    /// set them from the address lease); informational, the device does not use them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// On the pod network instead of a tap of the caller's (`--net pod`): crib creates
    /// the tap on the bridge, leases the address and serves it over DHCP
    /// (docs/NETWORK.md, "Marketplace VMs"). Replaced by `tap` once built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodNetRequest>,
}

/// `--net pod[,bridge=NAME][,port=HOST:GUEST[/udp]]...`: what a VM asks of the pod
/// network; the rest (subnet, MTU, nameservers) is the pods' default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodNetRequest {
    /// The bridge to join; default crib0, the pods'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// Published ports, as a launch file's `network.ports` (`2222:22/tcp`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
}

impl PodNetRequest {
    /// The checked plan: the pods' defaults, IPv4 only (the VM learns its address over
    /// DHCP, which crib serves for IPv4), this bridge and these ports.
    pub fn plan(&self) -> Result<podnet::NetPlan, podnet::PodNetError> {
        let mut field = serde_json::json!({"subnet6": null, "ports": self.ports});
        if let Some(bridge) = &self.bridge {
            field["bridge"] = serde_json::json!(bridge);
        }
        let mut plan = podnet::NetPlan::from_json(Some(&field))?.ok_or_else(|| {
            podnet::PodNetError::Field {
                field: "--net pod".into(),
                value: String::new(),
                fix: "give bridge= and port= only".into(),
            }
        })?;
        plan.dhcp = true;
        Ok(plan)
    }
}

impl NetConfig {
    /// The interface name, whichever key gave it.
    pub fn interface(&self) -> &str {
        self.tap.as_deref().or(self.ifname.as_deref()).unwrap_or("")
    }
}

/// Most virtio-net queue pairs.
pub const MAX_NET_QUEUES: u16 = devices::virtio::net::MAX_QUEUE_PAIRS;

/// Most virtio-fs request queues.
pub const MAX_FS_QUEUES: u16 = devices::virtio::fs::MAX_REQUEST_QUEUES;
/// Largest virtio-fs queue: virtiofsd's own limit.
pub const MAX_FS_QUEUE_SIZE: u16 = 1024;

/// Smallest guest CID: 0, 1 and 2 are the hypervisor, local and host.
pub const MIN_VSOCK_CID: u32 = 3;
/// Largest guest CID: `u32::MAX` is `VMADDR_CID_ANY`.
pub const MAX_VSOCK_CID: u32 = u32::MAX - 1;

/// Default queues per disk.
pub const DEFAULT_DISK_QUEUES: u16 = 1;
/// Default descriptors per queue.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;

/// A whole VM: what `crib run` flags or a `--config` file describe. Serialized, it is the
/// config file format (docs/api.yaml `VmConfig`); `crib config --print` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Names the VM in log lines and the API; crib derives one from its pid if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default = "default_cpus", deserialize_with = "de_cpus")]
    pub cpus: u8,
    #[serde(
        rename = "memory",
        default = "default_memory",
        deserialize_with = "de_memory",
        serialize_with = "ser_size"
    )]
    pub memory_bytes: u64,
    #[serde(
        default,
        deserialize_with = "de_console",
        serialize_with = "ser_display"
    )]
    pub console: ConsoleConfig,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// The vsock device, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// virtio-fs shares.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fs: Vec<FsConfig>,
    /// virtio-net devices on taps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetConfig>,
    /// Host PCI functions passed through with VFIO (`--vfio`), e.g. `0000:00:04.0`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vfio: Vec<crate::vfio::Bdf>,
    /// Where to serve the pod's Docker API (forwarded to guest vsock port 1); needs `vsock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_socket: Option<PathBuf>,
    /// A pod spec (JSON) handed to cradle as `/etc/cradle/pod.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PathBuf>,
    /// Where to serve crib's HTTP API (docs/api.yaml).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
    /// Seccomp filters per thread kind; off only for debugging.
    #[serde(default = "default_true")]
    pub seccomp: bool,
    /// The virtio-rng entropy device (`--rng`); on unless `null` (`--rng off`).
    #[serde(default = "default_rng")]
    pub rng: Option<RngOptions>,
}

/// The entropy device (`--rng`): virtio-rng fed by the host's getrandom, rate-limited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngOptions {
    /// Bytes per second the guest may take; absent: 1 MiB/s; 0: no limit.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_optional_size"
    )]
    pub bandwidth: Option<u64>,
}

fn default_rng() -> Option<RngOptions> {
    Some(RngOptions::default())
}

/// Parses `--rng on|off|bandwidth=BYTES_PER_S`.
pub fn parse_rng(text: &str) -> Result<Option<RngOptions>, ConfigError> {
    let err = |problem: String| ConfigError::Rng {
        rng: format!("--rng '{text}'"),
        problem,
    };
    match text {
        "on" => return Ok(default_rng()),
        "off" => return Ok(None),
        _ => {}
    }
    let mut rng = RngOptions::default();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some(("bandwidth", value)) => {
                rng.bandwidth = Some(parse_size(value).ok_or_else(|| {
                    err(format!(
                        "bandwidth={value} is not a number (K/M/G suffixes allowed)"
                    ))
                })?)
            }
            _ => {
                return Err(err(format!(
                    "'{part}' is not valid: use on, off or bandwidth=BYTES_PER_S"
                )))
            }
        }
    }
    Ok(Some(rng))
}

impl VmConfig {
    /// A VM of `kernel` with every default: 1 vCPU, 512 MiB, console on stdout.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            id: None,
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            cpus: 1,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            console: ConsoleConfig::Stdout,
            disks: Vec::new(),
            vsock: None,
            fs: Vec::new(),
            net: Vec::new(),
            vfio: Vec::new(),
            docker_socket: None,
            pod: None,
            api_socket: None,
            seccomp: true,
            rng: default_rng(),
        }
    }

    /// Parses a config file's contents (`path` names it in errors) and checks it.
    pub fn from_json(bytes: &[u8], path: &Path) -> Result<Self, ConfigError> {
        let json_err = |field: String, source: serde_json::Error| ConfigError::Json {
            path: path.to_path_buf(),
            // The root is ".".
            field: if field == "." { String::new() } else { field },
            source,
        };
        let mut json = serde_json::Deserializer::from_slice(bytes);
        let config: Self = serde_path_to_error::deserialize(&mut json)
            .map_err(|e| json_err(e.path().to_string(), e.into_inner()))?;
        // Nothing but whitespace may follow the object.
        json.end().map_err(|e| json_err(String::new(), e))?;
        config
            .validate(Origin::File)
            .map_err(|source| ConfigError::InFile {
                path: path.to_path_buf(),
                source: Box::new(source),
            })
    }

    /// Reads and checks the config file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let read_err = |source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut bytes = Vec::new();
        use std::io::Read;
        file.take(MAX_CONFIG_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_CONFIG_FILE_BYTES {
            return Err(ConfigError::FileTooLarge {
                path: path.to_path_buf(),
            });
        }
        Self::from_json(&bytes, path)
    }

    /// The config file form, pretty-printed (what `crib config --print` shows).
    pub fn to_json_pretty(&self) -> Result<String, ConfigError> {
        serde_json::to_string_pretty(self).map_err(ConfigError::Serialize)
    }

    /// The VM's id: the one given, else `crib-<pid>`.
    pub fn effective_id(&self) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| format!("crib-{}", std::process::id()))
    }

    /// Checks what the types do not, the same way for flags and files: errors name the
    /// value as `origin` spells it. Normalizes a zero `iops`/`bandwidth` to "no limit".
    pub fn validate(mut self, origin: Origin) -> Result<Self, ConfigError> {
        if let Some(id) = &self.id {
            check_id(origin.name("id"), id)?;
        }
        self.cpus = parse_cpus(origin.name("cpus"), u64::from(self.cpus))?;
        check_memory(origin.name("memory"), self.memory_bytes)?;
        for (index, disk) in self.disks.iter_mut().enumerate() {
            check_disk(disk).map_err(|problem| ConfigError::Disk {
                disk: origin.disk_field(index, problem.key),
                problem: problem.describe(origin),
            })?;
            normalize_disk(disk);
        }
        check_disks(origin, &self.disks)?;
        for (index, bdf) in self.vfio.iter().enumerate() {
            if self.vfio[..index].contains(bdf) {
                return Err(ConfigError::VfioRepeated(*bdf));
            }
        }
        if let Some(vsock) = &self.vsock {
            check_vsock_cid(vsock.cid).map_err(|problem| ConfigError::Vsock {
                vsock: origin.name("vsock"),
                problem,
            })?;
            if vsock.socket.as_os_str().is_empty() {
                return Err(ConfigError::Vsock {
                    vsock: origin.name("vsock"),
                    problem: "socket needs a path".into(),
                });
            }
        }
        for (index, fs) in self.fs.iter().enumerate() {
            check_fs(fs).map_err(|problem| ConfigError::Fs {
                fs: match origin {
                    Origin::Cli => format!("--fs tag={}", fs.tag),
                    Origin::File => format!("fs[{index}]"),
                },
                problem,
            })?;
            if self.fs[..index].iter().any(|f| f.tag == fs.tag) {
                return Err(ConfigError::DuplicateFsTag {
                    field: match origin {
                        Origin::Cli => "--fs tag".into(),
                        Origin::File => format!("fs[{index}].tag"),
                    },
                    tag: fs.tag.clone(),
                });
            }
        }
        for (index, net) in self.net.iter_mut().enumerate() {
            let field = match origin {
                Origin::Cli => format!("--net #{}", index + 1),
                Origin::File => format!("net[{index}]"),
            };
            check_net(net).map_err(|problem| ConfigError::Net {
                net: field.clone(),
                problem,
            })?;
            net.bandwidth = net.bandwidth.filter(|v| *v > 0);
            net.ops = net.ops.filter(|v| *v > 0);
        }
        for (index, net) in self.net.iter().enumerate() {
            let second_pod = net.pod.is_some() && self.net[..index].iter().any(|n| n.pod.is_some());
            if second_pod {
                return Err(ConfigError::Net {
                    net: match origin {
                        Origin::Cli => format!("--net #{}", index + 1),
                        Origin::File => format!("net[{index}]"),
                    },
                    problem: "a VM joins the pod network once: give one pod net device".into(),
                });
            }
            if net.pod.is_none()
                && self.net[..index]
                    .iter()
                    .any(|n| n.interface() == net.interface())
            {
                return Err(ConfigError::Net {
                    net: match origin {
                        Origin::Cli => format!("--net #{}", index + 1),
                        Origin::File => format!("net[{index}]"),
                    },
                    problem: format!(
                        "tap {} is used by two net devices: give each its own tap",
                        net.interface()
                    ),
                });
            }
        }
        if self.docker_socket.is_some() && self.vsock.is_none() {
            return Err(ConfigError::DockerSocketWithoutVsock {
                field: origin.name("docker_socket"),
                fix: match origin {
                    Origin::Cli => "--vsock cid=N,socket=PATH",
                    Origin::File => "\"vsock\": {\"cid\": N, \"socket\": \"PATH\"}",
                },
            });
        }
        Ok(self)
    }
}

/// Where a configuration came from, so errors spell names as the user wrote them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `crib run` flags: `--docker-socket`.
    Cli,
    /// A `--config` JSON document: `docker_socket`.
    File,
}

impl Origin {
    /// `key` (a field name) as this origin spells it.
    pub fn name(self, key: &str) -> String {
        match self {
            Self::Cli => format!("--{}", key.replace('_', "-")),
            Self::File => key.to_string(),
        }
    }

    /// A disk's setting: `--disk #2` (flags, checked before by [`parse_disk`] with the
    /// text) or `disks[1].queues` (file).
    fn disk_field(self, index: usize, key: &str) -> String {
        match self {
            Self::Cli => format!("--disk #{}", index + 1),
            Self::File => format!("disks[{index}].{key}"),
        }
    }
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}

pub(crate) fn default_cpus() -> u8 {
    1
}

pub(crate) fn default_memory() -> u64 {
    DEFAULT_MEMORY_BYTES
}

fn default_true() -> bool {
    true
}

pub(crate) fn default_queues() -> u16 {
    DEFAULT_DISK_QUEUES
}

pub(crate) fn default_queue_size() -> u16 {
    DEFAULT_QUEUE_SIZE
}

/// A number, or a string with an optional K/M/G suffix (`"512M"`), as text for
/// [`parse_size`].
struct SizeText(String);

impl<'de> Deserialize<'de> for SizeText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = SizeText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number or a size such as \"512M\" (K, M, G suffixes, binary)")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<SizeText, E> {
                Ok(SizeText(v.to_string()))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SizeText, E> {
                Ok(SizeText(v.to_string()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

fn de_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let SizeText(text) = SizeText::deserialize(deserializer)?;
    parse_size(&text).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "'{text}' is not a size: use a number with an optional K, M or G suffix, e.g. \"512M\""
        ))
    })
}

pub(crate) fn de_optional_size<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u64>, D::Error> {
    de_size(deserializer).map(Some)
}

pub(crate) fn de_memory<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let bytes = de_size(deserializer)?;
    check_memory("memory".into(), bytes).map_err(|e| serde::de::Error::custom(problem_of(&e)))?;
    Ok(bytes)
}

pub(crate) fn de_cpus<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u8, D::Error> {
    let count = u64::deserialize(deserializer)?;
    parse_cpus("cpus".into(), count).map_err(|e| serde::de::Error::custom(problem_of(&e)))
}

pub(crate) fn de_console<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<ConsoleConfig, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_console("console".into(), &text).map_err(|e| serde::de::Error::custom(problem_of(&e)))
}

/// An error's message without the leading field name (serde_path_to_error adds the path).
fn problem_of(error: &ConfigError) -> String {
    let text = error.to_string();
    match error.field() {
        Some(field) => text
            .strip_prefix(field)
            .map(|rest| rest.trim_start_matches([':', ' ']).to_string())
            .unwrap_or(text),
        None => text,
    }
}

fn ser_size<S: Serializer>(bytes: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format_size(*bytes))
}

fn ser_display<S: Serializer, T: fmt::Display>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// `bytes` with the largest binary suffix that divides it exactly: `512M`, `1G`, `4097`.
pub fn format_size(bytes: u64) -> String {
    for (shift, suffix) in [(30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes.trailing_zeros() >= shift {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Errors in the configuration, each naming the option or field and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{field} must be between 1 and {MAX_CPUS}, got {value}")]
    Cpus { field: String, value: u64 },
    #[error(
        "{field} '{value}' is not a size: use a number with an optional K, M or G suffix, e.g. 512M"
    )]
    MemorySyntax { field: String, value: String },
    #[error("{field} {bytes} bytes is too small: give at least 16M")]
    MemoryTooSmall { field: String, bytes: u64 },
    #[error("{field} {bytes} bytes is too large for this host's address space: give at most 64T")]
    MemoryTooLarge { field: String, bytes: u64 },
    #[error("{field} '{value}' is not valid: use stdout, off or file=PATH")]
    Console { field: String, value: String },
    #[error("{field} needs a vsock device to reach the guest: add {fix}")]
    DockerSocketWithoutVsock { field: String, fix: &'static str },
    #[error("{disk}: {problem}")]
    Disk { disk: String, problem: String },
    #[error("{field} '{id}' is used by two disks: give each disk its own id")]
    DuplicateDiskId { field: String, id: String },
    #[error("{vsock}: {problem}")]
    Vsock { vsock: String, problem: String },
    #[error("--vfio {0}")]
    Vfio(crate::vfio::BdfError),
    #[error("--vfio {0} is given twice: pass each device once")]
    VfioRepeated(crate::vfio::Bdf),
    #[error("--vsock is given {0} times: a VM has one vsock device, give --vsock once")]
    VsockRepeated(usize),
    #[error("{fs}: {problem}")]
    Fs { fs: String, problem: String },
    #[error("{net}: {problem}")]
    Net { net: String, problem: String },
    #[error("{rng}: {problem}")]
    Rng { rng: String, problem: String },
    #[error("{field} '{tag}' is used by two file systems: give each --fs its own tag")]
    DuplicateFsTag { field: String, tag: String },
    #[error(
        "{field} '{value}' is not a valid VM id: use 1 to {MAX_ID_BYTES} letters, digits, '.', '_' or '-'"
    )]
    Id { field: String, value: String },
    #[error("cannot read config file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is larger than 1 MiB: is it the right file?")]
    FileTooLarge { path: PathBuf },
    #[error("config file {path}: {}", where_in_json(field))]
    Json {
        path: PathBuf,
        /// The field's path (`disks[1].iops`), empty for the document itself.
        field: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("config file {path} is not valid")]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<ConfigError>,
    },
    #[error("cannot write the configuration as JSON (a path that is not UTF-8?)")]
    Serialize(#[source] serde_json::Error),
}

fn where_in_json(field: &str) -> String {
    if field.is_empty() {
        "not a VM configuration (docs/api.yaml, schema VmConfig)".into()
    } else {
        format!("field {field} is invalid")
    }
}

impl ConfigError {
    /// The option or field an error starts with, if it names one.
    fn field(&self) -> Option<&str> {
        match self {
            Self::Cpus { field, .. }
            | Self::MemorySyntax { field, .. }
            | Self::MemoryTooSmall { field, .. }
            | Self::MemoryTooLarge { field, .. }
            | Self::Console { field, .. }
            | Self::Id { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// Parses a size such as `512M`, `1G`, `65536`, `4096K` (binary units); `None` if it is
/// not one or overflows.
pub fn parse_size(text: &str) -> Option<u64> {
    let trimmed = text.trim();
    let (digits, shift) = match trimmed.char_indices().last() {
        Some((i, 'k' | 'K')) => (&trimmed[..i], 10),
        Some((i, 'm' | 'M')) => (&trimmed[..i], 20),
        Some((i, 'g' | 'G')) => (&trimmed[..i], 30),
        Some(_) => (trimmed, 0),
        None => return None,
    };
    let value: u64 = digits.parse().ok()?;
    value.checked_mul(1u64 << shift)
}

/// Checks a guest RAM size.
pub fn check_memory(field: String, bytes: u64) -> Result<(), ConfigError> {
    if bytes < MIN_MEMORY_BYTES {
        return Err(ConfigError::MemoryTooSmall { field, bytes });
    }
    if bytes > MAX_MEMORY_BYTES {
        return Err(ConfigError::MemoryTooLarge { field, bytes });
    }
    Ok(())
}

/// Parses and checks a memory size (`--memory`).
pub fn parse_memory(field: String, text: &str) -> Result<u64, ConfigError> {
    let Some(bytes) = parse_size(text) else {
        return Err(ConfigError::MemorySyntax {
            field,
            value: text.to_string(),
        });
    };
    check_memory(field, bytes)?;
    Ok(bytes)
}

/// Validates a vCPU count.
pub fn parse_cpus(field: String, count: u64) -> Result<u8, ConfigError> {
    u8::try_from(count)
        .ok()
        .filter(|c| (1..=MAX_CPUS).contains(c))
        .ok_or(ConfigError::Cpus {
            field,
            value: count,
        })
}

/// Parses `stdout`, `off` or `file=PATH`.
pub fn parse_console(field: String, text: &str) -> Result<ConsoleConfig, ConfigError> {
    match text {
        "stdout" => Ok(ConsoleConfig::Stdout),
        "off" => Ok(ConsoleConfig::Off),
        _ => match text.strip_prefix("file=") {
            Some(path) if !path.is_empty() => Ok(ConsoleConfig::File(PathBuf::from(path))),
            _ => Err(ConfigError::Console {
                field,
                value: text.to_string(),
            }),
        },
    }
}

/// Checks a VM id: it goes into log lines and socket names, so no spaces or slashes.
pub fn check_id(field: String, id: &str) -> Result<(), ConfigError> {
    let valid = !id.is_empty()
        && id.len() <= MAX_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(ConfigError::Id {
            field,
            value: id.to_string(),
        })
    }
}

/// What is wrong with one setting of a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskProblem {
    /// The setting (`queues`).
    pub key: &'static str,
    /// Its value as given.
    pub value: String,
    /// What to do about it.
    pub fix: String,
}

impl DiskProblem {
    fn new(key: &'static str, value: impl fmt::Display, fix: impl Into<String>) -> Self {
        Self {
            key,
            value: value.to_string(),
            fix: fix.into(),
        }
    }

    /// `queues=100: use 1 to 64` (flags) or `100: use 1 to 64` (file, after the field).
    fn describe(&self, origin: Origin) -> String {
        match origin {
            Origin::Cli => format!("{}={}: {}", self.key, self.value, self.fix),
            Origin::File => format!("{}: {}", self.value, self.fix),
        }
    }
}

fn queues_fix() -> String {
    format!("use 1 to {MAX_DISK_QUEUES}")
}

fn queue_size_fix() -> String {
    format!("use a power of two from {MIN_QUEUE_SIZE} to {MAX_QUEUE_SIZE}")
}

/// Checks one disk's settings (flags and files alike).
pub fn check_disk(disk: &DiskConfig) -> Result<(), DiskProblem> {
    if disk.path.as_os_str().is_empty() {
        return Err(DiskProblem::new("path", "''", "path is required"));
    }
    if disk.id.is_empty() {
        return Err(DiskProblem::new(
            "id",
            "''",
            "id is required: the guest finds the volume by it",
        ));
    }
    if disk.id.len() > DISK_ID_BYTES {
        return Err(DiskProblem::new(
            "id",
            &disk.id,
            format!("the virtio-blk serial holds at most {DISK_ID_BYTES} bytes, use a shorter id"),
        ));
    }
    if !(1..=MAX_DISK_QUEUES).contains(&disk.queues) {
        return Err(DiskProblem::new("queues", disk.queues, queues_fix()));
    }
    let qs = disk.queue_size;
    if !qs.is_power_of_two() || !(MIN_QUEUE_SIZE..=MAX_QUEUE_SIZE).contains(&qs) {
        return Err(DiskProblem::new("queue_size", qs, queue_size_fix()));
    }
    Ok(())
}

/// A zero `iops` or `bandwidth` means no limit, as if absent.
fn normalize_disk(disk: &mut DiskConfig) {
    disk.iops = disk.iops.filter(|v| *v > 0);
    disk.bandwidth = disk.bandwidth.filter(|v| *v > 0);
}

/// Parses `path=FILE,id=NAME[,readonly=on][,direct=on][,queues=N][,queue_size=N]
/// [,iops=N][,bandwidth=BYTES_PER_S][,burst=BYTES][,iops_burst=N]`.
pub fn parse_disk(text: &str) -> Result<DiskConfig, ConfigError> {
    let err = |problem: String| ConfigError::Disk {
        disk: format!("--disk '{text}'"),
        problem,
    };
    let mut disk = DiskConfig {
        path: PathBuf::new(),
        id: String::new(),
        readonly: false,
        direct: false,
        queues: DEFAULT_DISK_QUEUES,
        queue_size: DEFAULT_QUEUE_SIZE,
        iops: None,
        bandwidth: None,
        burst: None,
        iops_burst: None,
        composite: Vec::new(),
    };
    let on_off = |key: &str, value: &str| match value {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(err(format!("{key}={value}: use on or off"))),
    };
    let number = |key: &str, value: &str| {
        parse_size(value).ok_or_else(|| {
            err(format!(
                "{key}={value} is not a number (K/M/G suffixes allowed)"
            ))
        })
    };
    let small = |key: &str, value: &str, fix: String| {
        u16::try_from(number(key, value)?).map_err(|_| err(format!("{key}={value}: {fix}")))
    };
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| err(format!("'{part}' is not key=value")))?;
        match key {
            "path" => disk.path = PathBuf::from(value),
            "id" => disk.id = value.to_string(),
            "readonly" => disk.readonly = on_off(key, value)?,
            "direct" => disk.direct = on_off(key, value)?,
            "queues" => disk.queues = small(key, value, queues_fix())?,
            "queue_size" => disk.queue_size = small(key, value, queue_size_fix())?,
            "iops" => disk.iops = Some(number(key, value)?),
            "bandwidth" => disk.bandwidth = Some(number(key, value)?),
            "burst" => disk.burst = Some(number(key, value)?),
            "iops_burst" => disk.iops_burst = Some(number(key, value)?),
            other => {
                return Err(err(format!(
                    "unknown key '{other}': use path, id, readonly, direct, queues, queue_size, iops, bandwidth, burst, iops_burst"
                )))
            }
        }
    }
    if disk.path.as_os_str().is_empty() {
        return Err(err("path= is required".into()));
    }
    if disk.id.is_empty() {
        return Err(err(
            "id= is required: the guest finds the volume by it".into()
        ));
    }
    check_disk(&disk).map_err(|problem| err(problem.describe(Origin::Cli)))?;
    normalize_disk(&mut disk);
    Ok(disk)
}

/// Checks a guest CID; the problem names the value and the range.
fn check_vsock_cid(cid: u32) -> Result<(), String> {
    if (MIN_VSOCK_CID..=MAX_VSOCK_CID).contains(&cid) {
        Ok(())
    } else {
        Err(cid_problem(&cid.to_string()))
    }
}

fn cid_problem(value: &str) -> String {
    format!(
        "cid={value}: use {MIN_VSOCK_CID} to {MAX_VSOCK_CID} (0-2 are reserved, {} means any)",
        u32::MAX
    )
}

/// Parses `cid=N,socket=PATH`.
pub fn parse_vsock(text: &str) -> Result<VsockConfig, ConfigError> {
    let err = |problem: String| ConfigError::Vsock {
        vsock: format!("--vsock '{text}'"),
        problem,
    };
    let mut cid = None;
    let mut socket = None;
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| err(format!("'{part}' is not key=value")))?;
        match key {
            "cid" => {
                let parsed = value.parse::<u32>().map_err(|_| err(cid_problem(value)))?;
                check_vsock_cid(parsed).map_err(err)?;
                cid = Some(parsed);
            }
            "socket" if value.is_empty() => {
                return Err(err("socket= needs a path".into()));
            }
            "socket" => socket = Some(PathBuf::from(value)),
            other => {
                return Err(err(format!("unknown key '{other}': use cid, socket")));
            }
        }
    }
    let cid =
        cid.ok_or_else(|| err("cid= is required: the guest's vsock address, 3 or more".into()))?;
    let socket = socket.ok_or_else(|| {
        err("socket= is required: the Unix socket host processes connect to".into())
    })?;
    Ok(VsockConfig { cid, socket })
}

/// The vsock device of the `--vsock` values given (at most one).
pub fn parse_vsock_option(values: &[String]) -> Result<Option<VsockConfig>, ConfigError> {
    match values {
        [] => Ok(None),
        [one] => parse_vsock(one).map(Some),
        more => Err(ConfigError::VsockRepeated(more.len())),
    }
}

/// Parses a MAC such as `52:54:00:12:34:56`: six hex bytes, unicast.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let fix = "use six hex bytes separated by ':', e.g. 52:54:00:12:34:56";
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().unwrap_or("");
        if part.len() != 2 {
            return Err(format!("mac={text}: {fix}"));
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| format!("mac={text}: {fix}"))?;
    }
    if parts.next().is_some() {
        return Err(format!("mac={text}: {fix}"));
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "mac={text} is a multicast address: clear the lowest bit of the first byte"
        ));
    }
    Ok(mac)
}

/// Checks one net device; the problem names the key and the fix.
pub(crate) fn check_net(net: &NetConfig) -> Result<(), String> {
    if let Some(pod) = &net.pod {
        if net.tap.is_some() || net.ifname.is_some() {
            return Err("give pod (crib makes the tap) or tap=/ifname=, not both".into());
        }
        if net.mac.is_some() {
            return Err(
                "mac= cannot be given with pod: crib derives the MAC from the VM's \
                 --id, and its DHCP server answers that MAC"
                    .into(),
            );
        }
        if !(1..=MAX_NET_QUEUES).contains(&net.queues) {
            return Err(format!(
                "queues={}: use 1 to {MAX_NET_QUEUES} queue pairs",
                net.queues
            ));
        }
        return pod
            .plan()
            .map(drop)
            .map_err(|e| format!("pod: {}", e.to_string().replace("network.", "")));
    }
    let name = match (&net.tap, &net.ifname) {
        (Some(name), None) | (None, Some(name)) => name,
        (None, None) => {
            return Err(
                "tap=NAME (an existing tap), ifname=NAME (crib creates the tap, \
                 needs CAP_NET_ADMIN) or pod (crib puts the VM on the pod network) is required"
                    .into(),
            )
        }
        (Some(_), Some(_)) => return Err("give tap= or ifname=, not both".into()),
    };
    devices::virtio::net::tap::check_name(name).map_err(|e| e.to_string())?;
    if let Some(mac) = &net.mac {
        parse_mac(mac)?;
    }
    if !(1..=MAX_NET_QUEUES).contains(&net.queues) {
        return Err(format!(
            "queues={}: use 1 to {MAX_NET_QUEUES} queue pairs",
            net.queues
        ));
    }
    Ok(())
}

/// Parses `tap=NAME|ifname=NAME[,mac=MAC][,queues=N][,bandwidth=BYTES_PER_S][,ops=N]`,
/// or `pod[,bridge=NAME][,port=HOST:GUEST[/udp]]...` and the same queues and limits.
pub fn parse_net(text: &str) -> Result<NetConfig, ConfigError> {
    let err = |problem: String| ConfigError::Net {
        net: format!("--net '{text}'"),
        problem,
    };
    let mut net = NetConfig {
        tap: None,
        ifname: None,
        mac: None,
        queues: 1,
        bandwidth: None,
        ops: None,
        addresses: Vec::new(),
        pod: None,
    };
    let mut bridge = None;
    let mut ports = Vec::new();
    let number = |key: &str, value: &str| {
        parse_size(value).ok_or_else(|| {
            err(format!(
                "{key}={value} is not a number (K/M/G suffixes allowed)"
            ))
        })
    };
    for part in text.split(',').filter(|p| !p.is_empty()) {
        if part == "pod" {
            net.pod = Some(PodNetRequest::default());
            continue;
        }
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| err(format!("'{part}' is not key=value")))?;
        match key {
            "tap" => net.tap = Some(value.to_string()),
            "ifname" => net.ifname = Some(value.to_string()),
            "mac" => net.mac = Some(value.to_string()),
            "queues" => {
                net.queues = u16::try_from(number(key, value)?).map_err(|_| {
                    err(format!(
                        "queues={value}: use 1 to {MAX_NET_QUEUES} queue pairs"
                    ))
                })?
            }
            "bandwidth" => net.bandwidth = Some(number(key, value)?),
            "ops" => net.ops = Some(number(key, value)?),
            "bridge" => bridge = Some(value.to_string()),
            "port" => ports.push(value.to_string()),
            other => {
                return Err(err(format!(
                    "unknown key '{other}': use tap, ifname, mac, queues, bandwidth, ops, \
                     or pod with bridge and port"
                )))
            }
        }
    }
    match &mut net.pod {
        Some(pod) => {
            pod.bridge = bridge;
            pod.ports = ports;
        }
        None if bridge.is_some() || !ports.is_empty() => {
            return Err(err(
                "bridge= and port= are for the pod network: add `pod` (--net pod,port=2222:22)"
                    .into(),
            ))
        }
        None => {}
    }
    check_net(&net).map_err(err)?;
    net.bandwidth = net.bandwidth.filter(|v| *v > 0);
    net.ops = net.ops.filter(|v| *v > 0);
    Ok(net)
}

/// Checks one virtio-fs share; the problem names the field and the fix.
pub(crate) fn check_fs(fs: &FsConfig) -> Result<(), String> {
    if let Err(e) = devices::virtio::fs::check_tag(&fs.tag) {
        return Err(format!("tag: {e}"));
    }
    match (&fs.socket, &fs.dir) {
        (None, None) => {
            return Err(
                "socket=PATH (a running virtiofsd's vhost-user socket) or dir=PATH \
                 (a host directory crib serves with its own virtiofsd) is required"
                    .into(),
            )
        }
        (Some(_), Some(_)) => {
            return Err("give socket= or dir=, not both".into());
        }
        (Some(p), None) | (None, Some(p)) if p.as_os_str().is_empty() => {
            return Err("socket= and dir= need a path".into());
        }
        _ => {}
    }
    if !(1..=MAX_FS_QUEUES).contains(&fs.queues) {
        return Err(format!(
            "queues={}: use 1 to {MAX_FS_QUEUES} request queues",
            fs.queues
        ));
    }
    if !fs.queue_size.is_power_of_two()
        || !(MIN_QUEUE_SIZE..=MAX_FS_QUEUE_SIZE).contains(&fs.queue_size)
    {
        return Err(format!(
            "queue_size={}: use a power of two from {MIN_QUEUE_SIZE} to {MAX_FS_QUEUE_SIZE}",
            fs.queue_size
        ));
    }
    Ok(())
}

/// Parses `tag=TAG,socket=PATH[,queues=N][,queue_size=N]` or `tag=TAG,dir=PATH[,...]`.
pub fn parse_fs(text: &str) -> Result<FsConfig, ConfigError> {
    let err = |problem: String| ConfigError::Fs {
        fs: format!("--fs '{text}'"),
        problem,
    };
    let mut fs = FsConfig {
        tag: String::new(),
        socket: None,
        dir: None,
        queues: default_queues(),
        queue_size: default_queue_size(),
    };
    let mut tag = None;
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| err(format!("'{part}' is not key=value")))?;
        let number = |value: &str| {
            value
                .parse::<u16>()
                .map_err(|_| err(format!("{key}={value} is not a number")))
        };
        match key {
            "tag" => tag = Some(value.to_string()),
            "socket" => fs.socket = Some(PathBuf::from(value)),
            "dir" => fs.dir = Some(PathBuf::from(value)),
            "queues" => fs.queues = number(value)?,
            "queue_size" => fs.queue_size = number(value)?,
            other => {
                return Err(err(format!(
                    "unknown key '{other}': use tag, socket, dir, queues, queue_size"
                )))
            }
        }
    }
    fs.tag = tag.ok_or_else(|| err("tag= is required: the guest mounts the share by it".into()))?;
    check_fs(&fs).map_err(err)?;
    Ok(fs)
}

/// Checks what only a set of disks can get wrong.
pub fn check_disks(origin: Origin, disks: &[DiskConfig]) -> Result<(), ConfigError> {
    for (i, disk) in disks.iter().enumerate() {
        if disks[..i].iter().any(|d| d.id == disk.id) {
            return Err(ConfigError::DuplicateDiskId {
                field: match origin {
                    Origin::Cli => "--disk id".into(),
                    Origin::File => format!("disks[{i}].id"),
                },
                id: disk.id.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_json(text: &str) -> Result<VmConfig, ConfigError> {
        VmConfig::from_json(text.as_bytes(), Path::new("vm.json"))
    }

    /// The message and its causes on one line, as `crib` prints them.
    fn chain(error: &ConfigError) -> String {
        let mut text = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            text.push_str(" | ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }

    #[test]
    fn size_suffixes_are_binary() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("4096"), Some(4096));
    }

    #[test]
    fn size_garbage_is_not_a_size() {
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("M"), None);
    }

    #[test]
    fn size_overflow_is_not_a_size() {
        assert_eq!(parse_size("99999999999999999G"), None);
    }

    #[test]
    fn format_size_uses_the_largest_exact_suffix() {
        assert_eq!(format_size(512 << 20), "512M");
        assert_eq!(format_size(1 << 30), "1G");
        assert_eq!(format_size(4097), "4097");
        assert_eq!(format_size(0), "0");
    }

    #[test]
    fn memory_syntax_error_names_the_flag() {
        let err = parse_memory("--memory".into(), "lots").unwrap_err();
        assert_eq!(
            err.to_string(),
            "--memory 'lots' is not a size: use a number with an optional K, M or G suffix, e.g. 512M"
        );
    }

    #[test]
    fn memory_below_minimum_is_too_small() {
        assert!(matches!(
            parse_memory("--memory".into(), "1M"),
            Err(ConfigError::MemoryTooSmall { bytes, .. }) if bytes == 1 << 20
        ));
    }

    #[test]
    fn memory_beyond_address_space_is_too_large() {
        assert!(matches!(
            parse_memory("--memory".into(), "1000000G"),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
    }

    #[test]
    fn cpu_count_outside_range_is_refused() {
        let err = parse_cpus("--cpus".into(), 0).unwrap_err();
        assert_eq!(err.to_string(), "--cpus must be between 1 and 254, got 0");
        assert!(parse_cpus("--cpus".into(), 300).is_err());
        assert_eq!(parse_cpus("--cpus".into(), 2).unwrap(), 2);
    }

    #[test]
    fn id_with_a_slash_is_refused() {
        let err = check_id("--id".into(), "a/b").unwrap_err();
        assert!(err.to_string().contains("not a valid VM id"), "{err}");
        assert!(check_id("--id".into(), "web-1.prod_2").is_ok());
    }

    #[test]
    fn disk_with_every_option_parses() {
        let disk = parse_disk(
            "path=/v/a.img,id=data,readonly=on,direct=on,queues=4,queue_size=128,iops=1000,bandwidth=100M,burst=1G,iops_burst=500",
        )
        .unwrap();
        assert_eq!(disk.path, PathBuf::from("/v/a.img"));
        assert_eq!(
            (disk.id.as_str(), disk.readonly, disk.direct),
            ("data", true, true)
        );
        assert_eq!((disk.queues, disk.queue_size), (4, 128));
        assert_eq!((disk.iops, disk.bandwidth), (Some(1000), Some(100 << 20)));
        assert_eq!((disk.burst, disk.iops_burst), (Some(1 << 30), Some(500)));
    }

    #[test]
    fn disk_defaults_are_one_queue_of_256() {
        let disk = parse_disk("path=a,id=b").unwrap();
        assert_eq!(
            (disk.queues, disk.queue_size, disk.readonly, disk.iops),
            (1, 256, false, None)
        );
    }

    #[test]
    fn disk_zero_iops_means_unlimited() {
        assert_eq!(parse_disk("path=a,id=b,iops=0").unwrap().iops, None);
    }

    #[test]
    fn disk_without_id_is_refused() {
        let err = parse_disk("path=a").unwrap_err();
        assert!(err.to_string().contains("id= is required"), "{err}");
    }

    #[test]
    fn disk_with_unknown_key_names_it() {
        let err = parse_disk("path=a,id=b,speed=fast").unwrap_err();
        assert!(err.to_string().contains("unknown key 'speed'"), "{err}");
    }

    #[test]
    fn disk_queue_size_must_be_power_of_two() {
        let err = parse_disk("path=a,id=b,queue_size=100").unwrap_err();
        assert_eq!(
            err.to_string(),
            "--disk 'path=a,id=b,queue_size=100': queue_size=100: use a power of two from 4 to 32768"
        );
    }

    #[test]
    fn disk_queues_beyond_u16_is_refused_with_the_range() {
        let err = parse_disk("path=a,id=b,queues=70000").unwrap_err();
        assert!(
            err.to_string().contains("queues=70000: use 1 to 64"),
            "{err}"
        );
    }

    #[test]
    fn disk_bad_flag_value_is_refused() {
        assert!(parse_disk("path=a,id=b,readonly=maybe").is_err());
    }

    #[test]
    fn duplicate_disk_ids_are_refused() {
        let disks = [
            parse_disk("path=a,id=x").unwrap(),
            parse_disk("path=b,id=x").unwrap(),
        ];
        let err = check_disks(Origin::Cli, &disks).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--disk id 'x' is used by two disks: give each disk its own id"
        );
    }

    #[test]
    fn vsock_parses_cid_and_socket() {
        assert_eq!(
            parse_vsock("cid=3,socket=/run/v.sock").unwrap(),
            VsockConfig {
                cid: 3,
                socket: PathBuf::from("/run/v.sock")
            }
        );
        assert_eq!(
            parse_vsock("socket=/s,cid=4294967294").unwrap().cid,
            u32::MAX - 1
        );
    }

    #[test]
    fn vsock_reserved_cid_names_field_and_range() {
        for cid in ["0", "2", "4294967295", "4294967296", "-3", "x"] {
            let err = parse_vsock(&format!("cid={cid},socket=/s"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("cid={cid}")) && err.contains("use 3 to 4294967294"),
                "{err}"
            );
        }
    }

    #[test]
    fn vsock_without_cid_is_refused() {
        let err = parse_vsock("socket=/s").unwrap_err();
        assert!(err.to_string().contains("cid= is required"), "{err}");
    }

    #[test]
    fn vsock_without_socket_is_refused() {
        let err = parse_vsock("cid=3").unwrap_err();
        assert!(err.to_string().contains("socket= is required"), "{err}");
        let empty = parse_vsock("cid=3,socket=").unwrap_err();
        assert!(
            empty.to_string().contains("socket= needs a path"),
            "{empty}"
        );
    }

    #[test]
    fn vsock_with_unknown_key_names_it() {
        let err = parse_vsock("cid=3,socket=/s,port=1").unwrap_err();
        assert!(err.to_string().contains("unknown key 'port'"), "{err}");
    }

    #[test]
    fn vsock_given_twice_is_refused() {
        let values = ["cid=3,socket=/a".to_string(), "cid=4,socket=/b".to_string()];
        let err = parse_vsock_option(&values).unwrap_err();
        assert!(matches!(err, ConfigError::VsockRepeated(2)));
        assert!(err.to_string().contains("give --vsock once"), "{err}");
    }

    #[test]
    fn net_parses_every_key() {
        let net =
            parse_net("tap=crtap0,mac=52:54:00:12:34:56,queues=2,bandwidth=10M,ops=1000").unwrap();
        assert_eq!(net.interface(), "crtap0");
        assert_eq!(net.mac.as_deref(), Some("52:54:00:12:34:56"));
        assert_eq!(
            (net.queues, net.bandwidth, net.ops),
            (2, Some(10 << 20), Some(1000))
        );
        let created = parse_net("ifname=crib0").unwrap();
        assert_eq!(
            (created.tap, created.ifname.as_deref()),
            (None, Some("crib0"))
        );
    }

    #[test]
    fn net_pod_takes_bridge_ports_and_limits() {
        let net = parse_net("pod,bridge=br7,port=2222:22,port=5353:53/udp,queues=2").unwrap();
        let pod = net.pod.clone().unwrap();
        assert_eq!(pod.bridge.as_deref(), Some("br7"));
        assert_eq!(pod.ports, ["2222:22", "5353:53/udp"]);
        assert_eq!((net.tap, net.queues), (None, 2));
        let plan = pod.plan().unwrap();
        assert!(plan.dhcp && plan.subnet6.is_none());
        assert_eq!((plan.bridge.as_str(), plan.ports.len()), ("br7", 2));
        assert_eq!(
            parse_net("pod").unwrap().pod,
            Some(PodNetRequest::default())
        );
        // In a config file, too.
        let config =
            from_json(r#"{"kernel": "/k", "net": [{"pod": {"ports": ["80:80"]}}]}"#).unwrap();
        assert_eq!(config.net[0].pod.as_ref().unwrap().ports, ["80:80"]);
    }

    #[test]
    fn net_pod_errors_name_the_fix() {
        for (text, needle) in [
            ("pod,tap=t0", "not both"),
            ("pod,ifname=t0", "not both"),
            ("pod,mac=02:00:00:00:00:01", "derives the MAC"),
            ("port=80:80", "add `pod`"),
            ("bridge=br0", "add `pod`"),
            ("pod,port=x:80", "ports[0]"),
            ("pod,port=0:80", "ports[0]"),
            ("pod,bridge=a:b", "bridge"),
        ] {
            let err = parse_net(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        let err = from_json(r#"{"kernel": "/k", "net": [{"pod": {}}, {"pod": {}}]}"#).unwrap_err();
        assert!(
            chain(&err).contains("joins the pod network once"),
            "{}",
            chain(&err)
        );
        let err = from_json(r#"{"kernel": "/k", "net": [{"pod": {"subnet": "x"}}]}"#).unwrap_err();
        assert!(chain(&err).contains("subnet"), "{}", chain(&err));
    }

    #[test]
    fn net_errors_name_the_key_and_fix() {
        for (text, want) in [
            (
                "mac=52:54:00:12:34:56",
                "tap=NAME (an existing tap), ifname=NAME",
            ),
            ("tap=a,ifname=b", "give tap= or ifname=, not both"),
            ("tap=a,mac=52:54:00:12:34", "use six hex bytes"),
            ("tap=a,mac=01:00:5e:00:00:01", "is a multicast address"),
            ("tap=a,queues=0", "queues=0: use 1 to 16 queue pairs"),
            ("tap=a,queues=70000", "queues=70000: use 1 to 16"),
            ("tap=a/b", "is not valid"),
            ("tap=a,speed=1", "unknown key 'speed'"),
        ] {
            let err = parse_net(text).unwrap_err().to_string();
            assert!(err.starts_with(&format!("--net '{text}'")), "{err}");
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn file_net_is_checked_and_named() {
        let config =
            from_json(r#"{"kernel": "/k", "net": [{"tap": "t0", "bandwidth": "1M"}]}"#).unwrap();
        assert_eq!(config.net[0].bandwidth, Some(1 << 20));
        assert_eq!(config.net[0].queues, 1);
        let err =
            from_json(r#"{"kernel": "/k", "net": [{"tap": "t0"}, {"queues": 2}]}"#).unwrap_err();
        assert!(chain(&err).contains("net[1]: tap=NAME"), "{}", chain(&err));
        let err =
            from_json(r#"{"kernel": "/k", "net": [{"tap": "t0"}, {"ifname": "t0"}]}"#).unwrap_err();
        assert!(
            chain(&err).contains("net[1]: tap t0 is used by two"),
            "{}",
            chain(&err)
        );
    }

    #[test]
    fn vsock_absent_is_none() {
        assert_eq!(parse_vsock_option(&[]).unwrap(), None);
    }

    #[test]
    fn fs_parses_socket_and_queue_settings() {
        let fs = parse_fs("tag=gfs,socket=/run/fs.sock,queues=2,queue_size=512").unwrap();
        assert_eq!(
            fs,
            FsConfig {
                tag: "gfs".into(),
                socket: Some("/run/fs.sock".into()),
                dir: None,
                queues: 2,
                queue_size: 512,
            }
        );
        let dir = parse_fs("dir=/srv/gfs,tag=gfs").unwrap();
        assert_eq!(dir.dir, Some("/srv/gfs".into()));
        assert_eq!((dir.queues, dir.queue_size), (1, DEFAULT_QUEUE_SIZE));
    }

    #[test]
    fn fs_tag_longer_than_36_bytes_names_the_field() {
        let tag = "t".repeat(37);
        let err = parse_fs(&format!("tag={tag},socket=/s"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tag:") && err.contains("37 bytes") && err.contains("at most 36"),
            "{err}"
        );
        assert!(parse_fs(&format!("tag={},socket=/s", "t".repeat(36))).is_ok());
    }

    #[test]
    fn fs_without_socket_or_dir_says_what_to_give() {
        let err = parse_fs("tag=gfs").unwrap_err().to_string();
        assert!(
            err.contains("socket=PATH") && err.contains("dir=PATH"),
            "{err}"
        );
        let both = parse_fs("tag=gfs,socket=/s,dir=/d")
            .unwrap_err()
            .to_string();
        assert!(both.contains("not both"), "{both}");
        let empty = parse_fs("tag=gfs,socket=").unwrap_err().to_string();
        assert!(empty.contains("need a path"), "{empty}");
    }

    #[test]
    fn fs_without_tag_or_with_bad_queues_is_refused() {
        assert!(parse_fs("socket=/s")
            .unwrap_err()
            .to_string()
            .contains("tag= is required"));
        let err = parse_fs("tag=a,socket=/s,queue_size=100")
            .unwrap_err()
            .to_string();
        assert!(err.contains("queue_size=100"), "{err}");
        let err = parse_fs("tag=a,socket=/s,queues=0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("queues=0"), "{err}");
        let err = parse_fs("tag=a,socket=/s,cache=always")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key 'cache'"), "{err}");
    }

    #[test]
    fn fs_tags_must_be_unique() {
        let mut config = VmConfig::new("/k");
        config.fs = vec![
            parse_fs("tag=a,socket=/s").unwrap(),
            parse_fs("tag=a,dir=/d").unwrap(),
        ];
        let err = config.validate(Origin::Cli).unwrap_err().to_string();
        assert!(err.contains("'a' is used by two file systems"), "{err}");
    }

    #[test]
    fn file_fs_errors_name_the_entry() {
        let err = VmConfig::from_json(
            br#"{"kernel": "/k", "fs": [{"tag": "gfs"}]}"#,
            Path::new("vm.json"),
        )
        .unwrap_err();
        let mut text = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            text += &format!(": {s}");
            source = s.source();
        }
        assert!(text.contains("fs[0]: socket=PATH"), "{text}");
    }

    #[test]
    fn console_forms_parse() {
        let field = || String::from("--console");
        assert_eq!(parse_console(field(), "off").unwrap(), ConsoleConfig::Off);
        assert_eq!(
            parse_console(field(), "file=/tmp/c").unwrap(),
            ConsoleConfig::File("/tmp/c".into())
        );
        assert!(parse_console(field(), "file=").is_err());
        assert!(parse_console(field(), "tty").is_err());
    }

    #[test]
    fn minimal_file_gets_every_default() {
        let config = from_json(r#"{"kernel": "/k"}"#).unwrap();
        assert_eq!(config, VmConfig::new("/k"));
    }

    #[test]
    fn file_with_every_field_parses() {
        let config = from_json(
            r#"{
                "id": "web-1", "kernel": "/k", "initrd": "/i", "cmdline": "console=ttyS0",
                "cpus": 2, "memory": "1G", "console": "file=/tmp/c",
                "disks": [{"path": "/d", "id": "data", "readonly": true, "direct": true,
                           "queues": 2, "queue_size": 128, "iops": 1000,
                           "bandwidth": "100M", "burst": 1048576, "iops_burst": 10}],
                "vsock": {"cid": 3, "socket": "/v.sock"}, "docker_socket": "/d.sock",
                "pod": "/pod.json", "api_socket": "/api.sock", "seccomp": false
            }"#,
        )
        .unwrap();
        assert_eq!(config.id.as_deref(), Some("web-1"));
        assert_eq!((config.cpus, config.memory_bytes), (2, 1 << 30));
        assert_eq!(config.console, ConsoleConfig::File("/tmp/c".into()));
        assert_eq!(config.disks[0].bandwidth, Some(100 << 20));
        assert_eq!(config.disks[0].burst, Some(1 << 20));
        assert_eq!(config.vsock.as_ref().map(|v| v.cid), Some(3));
        assert_eq!(config.api_socket, Some(PathBuf::from("/api.sock")));
        assert!(!config.seccomp);
    }

    #[test]
    fn file_round_trips_through_json() {
        let mut config = VmConfig::new("/k");
        config.id = Some("pod-7".into());
        config.memory_bytes = 3 << 30;
        config.console = ConsoleConfig::Off;
        config.disks = vec![parse_disk("path=/d,id=data,iops=5,bandwidth=1M").unwrap()];
        config.vsock = Some(parse_vsock("cid=9,socket=/v").unwrap());
        config.docker_socket = Some("/docker.sock".into());
        config.api_socket = Some("/api.sock".into());

        let text = config.to_json_pretty().unwrap();

        assert!(text.contains(r#""memory": "3G""#), "{text}");
        assert_eq!(from_json(&text).unwrap(), config);
    }

    #[test]
    fn file_unknown_field_is_named() {
        let err = from_json(r#"{"kernel": "/k", "cpu": 2}"#).unwrap_err();
        let text = chain(&err);
        assert!(text.contains("field cpu is invalid"), "{text}");
        assert!(
            text.contains("unknown field `cpu`, expected one of"),
            "{text}"
        );
    }

    #[test]
    fn file_unknown_disk_field_names_its_path() {
        let err =
            from_json(r#"{"kernel": "/k", "disks": [{"path": "/d", "id": "a", "speed": 1}]}"#)
                .unwrap_err();
        assert!(
            chain(&err).contains("field disks[0].speed is invalid"),
            "{}",
            chain(&err)
        );
    }

    #[test]
    fn file_bad_size_names_field_and_fix() {
        let err = from_json(
            r#"{"kernel": "/k", "disks": [{"path": "/a", "id": "a"}, {"path": "/b", "id": "b", "iops": "lots"}]}"#,
        )
        .unwrap_err();
        let text = chain(&err);
        assert!(text.contains("field disks[1].iops is invalid"), "{text}");
        assert!(
            text.contains("'lots' is not a size: use a number"),
            "{text}"
        );
    }

    #[test]
    fn file_wrong_type_names_field() {
        let err = from_json(r#"{"kernel": "/k", "cpus": "two"}"#).unwrap_err();
        let text = chain(&err);
        assert!(text.contains("field cpus is invalid"), "{text}");
    }

    #[test]
    fn file_cpu_count_out_of_range_says_the_range() {
        let err = from_json(r#"{"kernel": "/k", "cpus": 300}"#).unwrap_err();
        let text = chain(&err);
        assert!(text.contains("field cpus is invalid"), "{text}");
        assert!(
            text.contains("must be between 1 and 254, got 300"),
            "{text}"
        );
    }

    #[test]
    fn file_memory_too_small_says_the_minimum() {
        let err = from_json(r#"{"kernel": "/k", "memory": "1M"}"#).unwrap_err();
        assert!(chain(&err).contains("give at least 16M"), "{}", chain(&err));
    }

    #[test]
    fn file_missing_kernel_is_named() {
        let err = from_json(r#"{"cpus": 1}"#).unwrap_err();
        assert!(
            chain(&err).contains("missing field `kernel`"),
            "{}",
            chain(&err)
        );
    }

    #[test]
    fn file_syntax_error_gives_the_position() {
        let err = from_json(r#"{"kernel": "/k",}"#).unwrap_err();
        assert!(chain(&err).contains("line 1"), "{}", chain(&err));
    }

    #[test]
    fn file_trailing_data_is_refused() {
        assert!(from_json(r#"{"kernel": "/k"} {}"#).is_err());
    }

    #[test]
    fn file_disk_queue_count_names_field_path() {
        let err =
            from_json(r#"{"kernel": "/k", "disks": [{"path": "/d", "id": "a", "queues": 100}]}"#)
                .unwrap_err();
        assert!(
            chain(&err).contains("disks[0].queues: 100: use 1 to 64"),
            "{}",
            chain(&err)
        );
    }

    #[test]
    fn file_duplicate_disk_ids_name_the_second() {
        let err = from_json(
            r#"{"kernel": "/k", "disks": [{"path": "/a", "id": "x"}, {"path": "/b", "id": "x"}]}"#,
        )
        .unwrap_err();
        assert!(
            chain(&err).contains("disks[1].id 'x' is used by two disks"),
            "{}",
            chain(&err)
        );
    }

    #[test]
    fn file_docker_socket_without_vsock_says_how_to_add_it() {
        let err = from_json(r#"{"kernel": "/k", "docker_socket": "/d"}"#).unwrap_err();
        assert!(
            chain(&err)
                .contains(r#"docker_socket needs a vsock device to reach the guest: add "vsock""#),
            "{}",
            chain(&err)
        );
    }

    #[test]
    fn file_reserved_cid_is_refused() {
        let err =
            from_json(r#"{"kernel": "/k", "vsock": {"cid": 2, "socket": "/v"}}"#).unwrap_err();
        assert!(
            chain(&err).contains("vsock: cid=2: use 3 to"),
            "{}",
            chain(&err)
        );
    }

    #[test]
    fn file_bad_id_is_refused() {
        let err = from_json(r#"{"kernel": "/k", "id": "has space"}"#).unwrap_err();
        assert!(
            chain(&err).contains("id 'has space' is not a valid VM id"),
            "{}",
            chain(&err)
        );
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = VmConfig::load(Path::new("/nonexistent/vm.json")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot read config file /nonexistent/vm.json"
        );
    }

    #[test]
    fn rng_is_on_by_default() {
        assert_eq!(VmConfig::new("/k").rng, Some(RngOptions::default()));
    }

    #[test]
    fn rng_off_has_no_device() {
        assert_eq!(parse_rng("off").unwrap(), None);
    }

    #[test]
    fn rng_bandwidth_takes_a_size() {
        assert_eq!(
            parse_rng("bandwidth=64K").unwrap(),
            Some(RngOptions {
                bandwidth: Some(64 << 10)
            })
        );
    }

    #[test]
    fn rng_unknown_key_names_the_choices() {
        let err = parse_rng("speed=1").unwrap_err().to_string();
        assert!(
            err.contains("use on, off or bandwidth=BYTES_PER_S"),
            "{err}"
        );
    }

    #[test]
    fn rng_null_in_file_is_off() {
        let config = from_json(r#"{"kernel": "/k", "rng": null}"#).unwrap();
        assert_eq!(config.rng, None);
    }
}
