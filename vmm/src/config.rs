//! What the user asks for: the VM configuration and the parsing of its CLI values.
//! Every error names the option and how to fix it.

use std::path::PathBuf;

/// Smallest guest RAM crib accepts: below this a Linux kernel cannot even decompress.
pub const MIN_MEMORY_BYTES: u64 = 16 << 20;
/// Largest vCPU count: LAPIC IDs are 8-bit in the MADT entries crib writes.
pub const MAX_CPUS: u8 = 254;
/// The command line used when `--cmdline` is not given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// crib's stdout (and stdin to the guest).
    Stdout,
    /// Discarded.
    Off,
    /// Appended to a file.
    File(PathBuf),
}

/// A virtio-blk volume (`--disk`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Backing file or block device.
    pub path: PathBuf,
    /// The disk's serial (GET_ID); cradle finds volumes by it.
    pub id: String,
    pub readonly: bool,
    /// O_DIRECT: bypass the host page cache.
    pub direct: bool,
    pub queues: u16,
    pub queue_size: u16,
    /// Operations per second, if limited.
    pub iops: Option<u64>,
    /// Bytes per second, if limited.
    pub bandwidth: Option<u64>,
    /// One-time burst above `bandwidth`, in bytes.
    pub burst: Option<u64>,
    /// One-time burst above `iops`, in operations.
    pub iops_burst: Option<u64>,
}

/// The virtio-vsock device (`--vsock`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID, [`MIN_VSOCK_CID`] to [`MAX_VSOCK_CID`].
    pub cid: u32,
    /// The Unix socket host processes connect to (`CONNECT <port>\n`); guest connections
    /// to host port P go to `<socket>_P`.
    pub socket: PathBuf,
}

/// Smallest guest CID: 0, 1 and 2 are the hypervisor, local and host.
pub const MIN_VSOCK_CID: u32 = 3;
/// Largest guest CID: `u32::MAX` is `VMADDR_CID_ANY`.
pub const MAX_VSOCK_CID: u32 = u32::MAX - 1;

/// Default queues per disk.
pub const DEFAULT_DISK_QUEUES: u16 = 1;
/// Default descriptors per queue.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;

/// A whole VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    pub memory_bytes: u64,
    pub console: ConsoleConfig,
    pub disks: Vec<DiskConfig>,
    /// The vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// Where to serve the pod's Docker API (forwarded to guest vsock port 1); needs `vsock`.
    pub docker_socket: Option<PathBuf>,
    /// A pod spec (JSON) handed to cradle as `/etc/cradle/pod.json`.
    pub pod: Option<PathBuf>,
}

/// Errors in the configuration, each naming the option.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--cpus must be between 1 and {MAX_CPUS}, got {0}")]
    Cpus(u64),
    #[error(
        "--memory '{0}' is not a size: use a number with an optional K, M or G suffix, e.g. 512M"
    )]
    MemorySyntax(String),
    #[error("--memory {0} bytes is too small: give at least 16M")]
    MemoryTooSmall(u64),
    #[error("--memory {0} bytes is too large for this host's address space")]
    MemoryTooLarge(u64),
    #[error("--console '{0}' is not valid: use stdout, off or file=PATH")]
    Console(String),
    #[error(
        "--docker-socket needs a vsock device to reach the guest: add --vsock cid=N,socket=PATH"
    )]
    DockerSocketWithoutVsock,
    #[error("--disk '{disk}': {problem}")]
    Disk { disk: String, problem: String },
    #[error("--disk id={0} is used by two disks: give each disk its own id")]
    DuplicateDiskId(String),
    #[error("--vsock '{vsock}': {problem}")]
    Vsock { vsock: String, problem: String },
    #[error("--vsock is given {0} times: a VM has one vsock device, give --vsock once")]
    VsockRepeated(usize),
}

/// Parses a size such as `512M`, `1G`, `65536`, `4096K` (binary units).
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::MemorySyntax(text.to_string());
    let trimmed = text.trim();
    let (digits, shift) = match trimmed.char_indices().last() {
        Some((i, 'k' | 'K')) => (&trimmed[..i], 10),
        Some((i, 'm' | 'M')) => (&trimmed[..i], 20),
        Some((i, 'g' | 'G')) => (&trimmed[..i], 30),
        Some(_) => (trimmed, 0),
        None => return Err(err()),
    };
    let value: u64 = digits.parse().map_err(|_| err())?;
    value.checked_mul(1u64 << shift).ok_or_else(err)
}

/// Validates a memory size.
pub fn parse_memory(text: &str) -> Result<u64, ConfigError> {
    let bytes = parse_size(text)?;
    if bytes < MIN_MEMORY_BYTES {
        return Err(ConfigError::MemoryTooSmall(bytes));
    }
    // The guest's RAM must be mappable in crib's own address space (47 bits of user space);
    // leave half of it for everything else.
    if bytes > (1u64 << 46) {
        return Err(ConfigError::MemoryTooLarge(bytes));
    }
    Ok(bytes)
}

/// Validates a vCPU count.
pub fn parse_cpus(count: u64) -> Result<u8, ConfigError> {
    u8::try_from(count)
        .ok()
        .filter(|c| (1..=MAX_CPUS).contains(c))
        .ok_or(ConfigError::Cpus(count))
}

/// Parses `stdout`, `off` or `file=PATH`.
pub fn parse_console(text: &str) -> Result<ConsoleConfig, ConfigError> {
    match text {
        "stdout" => Ok(ConsoleConfig::Stdout),
        "off" => Ok(ConsoleConfig::Off),
        _ => match text.strip_prefix("file=") {
            Some(path) if !path.is_empty() => Ok(ConsoleConfig::File(PathBuf::from(path))),
            _ => Err(ConfigError::Console(text.to_string())),
        },
    }
}

/// Parses `path=FILE,id=NAME[,readonly=on][,direct=on][,queues=N][,queue_size=N]
/// [,iops=N][,bandwidth=BYTES_PER_S][,burst=BYTES][,iops_burst=N]`.
pub fn parse_disk(text: &str) -> Result<DiskConfig, ConfigError> {
    let err = |problem: String| ConfigError::Disk {
        disk: text.to_string(),
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
    };
    let on_off = |key: &str, value: &str| match value {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(err(format!("{key}={value}: use on or off"))),
    };
    let number = |key: &str, value: &str| {
        parse_size(value).map_err(|_| {
            err(format!(
                "{key}={value} is not a number (K/M/G suffixes allowed)"
            ))
        })
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
            "queues" => {
                disk.queues = u16::try_from(number(key, value)?)
                    .ok()
                    .filter(|q| (1..=64).contains(q))
                    .ok_or_else(|| err(format!("queues={value}: use 1 to 64")))?
            }
            "queue_size" => {
                disk.queue_size = u16::try_from(number(key, value)?)
                    .ok()
                    .filter(|q| q.is_power_of_two() && (2..=32768).contains(q))
                    .ok_or_else(|| err(format!("queue_size={value}: use a power of two from 2 to 32768")))?
            }
            "iops" => disk.iops = Some(number(key, value)?).filter(|v| *v > 0),
            "bandwidth" => disk.bandwidth = Some(number(key, value)?).filter(|v| *v > 0),
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
    Ok(disk)
}

/// Parses `cid=N,socket=PATH`.
pub fn parse_vsock(text: &str) -> Result<VsockConfig, ConfigError> {
    let err = |problem: String| ConfigError::Vsock {
        vsock: text.to_string(),
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
                cid = Some(
                    value
                        .parse::<u32>()
                        .ok()
                        .filter(|c| (MIN_VSOCK_CID..=MAX_VSOCK_CID).contains(c))
                        .ok_or_else(|| {
                            err(format!(
                                "cid={value}: use {MIN_VSOCK_CID} to {MAX_VSOCK_CID} (0-2 are reserved, \
                                 {} means any)",
                                u32::MAX
                            ))
                        })?,
                )
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

/// Checks what only a set of disks can get wrong.
pub fn check_disks(disks: &[DiskConfig]) -> Result<(), ConfigError> {
    for (i, disk) in disks.iter().enumerate() {
        if disks[..i].iter().any(|d| d.id == disk.id) {
            return Err(ConfigError::DuplicateDiskId(disk.id.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_suffixes_are_binary() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
    }

    #[test]
    fn size_garbage_is_a_syntax_error() {
        assert_eq!(
            parse_size("lots"),
            Err(ConfigError::MemorySyntax("lots".into()))
        );
        assert_eq!(parse_size(""), Err(ConfigError::MemorySyntax("".into())));
        assert_eq!(parse_size("M"), Err(ConfigError::MemorySyntax("M".into())));
    }

    #[test]
    fn size_overflow_is_a_syntax_error() {
        assert!(parse_size("99999999999999999G").is_err());
    }

    #[test]
    fn memory_below_minimum_is_too_small() {
        assert_eq!(
            parse_memory("1M"),
            Err(ConfigError::MemoryTooSmall(1 << 20))
        );
    }

    #[test]
    fn memory_beyond_address_space_is_too_large() {
        assert!(matches!(
            parse_memory("1000000G"),
            Err(ConfigError::MemoryTooLarge(_))
        ));
    }

    #[test]
    fn zero_cpus_is_refused() {
        assert_eq!(parse_cpus(0), Err(ConfigError::Cpus(0)));
        assert_eq!(parse_cpus(300), Err(ConfigError::Cpus(300)));
        assert_eq!(parse_cpus(2), Ok(2));
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
        assert!(err.to_string().contains("queue_size=100"), "{err}");
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
        assert_eq!(
            check_disks(&disks),
            Err(ConfigError::DuplicateDiskId("x".into()))
        );
    }

    #[test]
    fn vsock_parses_cid_and_socket() {
        assert_eq!(
            parse_vsock("cid=3,socket=/run/v.sock"),
            Ok(VsockConfig {
                cid: 3,
                socket: PathBuf::from("/run/v.sock")
            })
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
        assert_eq!(err, ConfigError::VsockRepeated(2));
        assert!(err.to_string().contains("give --vsock once"), "{err}");
    }

    #[test]
    fn vsock_absent_is_none() {
        assert_eq!(parse_vsock_option(&[]), Ok(None));
    }

    #[test]
    fn console_forms_parse() {
        assert_eq!(parse_console("off"), Ok(ConsoleConfig::Off));
        assert_eq!(
            parse_console("file=/tmp/c"),
            Ok(ConsoleConfig::File("/tmp/c".into()))
        );
        assert_eq!(
            parse_console("file="),
            Err(ConfigError::Console("file=".into()))
        );
        assert_eq!(
            parse_console("tty"),
            Err(ConfigError::Console("tty".into()))
        );
    }
}
