//! Finds the disk of each volume: a virtio-blk disk by its serial, or an
//! NVMe namespace by its controller's serial and namespace ID.
//!
//! The host gives each volume's disk the volume's name as its virtio-blk
//! serial (`VIRTIO_BLK_T_GET_ID`, virtio 1.2 section 5.2.6: at most 20
//! bytes, NUL-padded when shorter); Linux shows it in
//! `/sys/block/vdX/serial`. The `vdX` names follow probe order, which cradle
//! never relies on. Disks may appear a little after the driver loads, so
//! [`wait_for_disks`] polls, bounded, until every volume has its disk and
//! its `/dev` node.
//!
//! A volume with `nvme_serial` is a namespace of an NVMe controller passed
//! through with `crib run --vfio`: Linux shows the controller's serial
//! (Identify Controller SN, space-padded) in
//! `/sys/block/nvmeXnY/device/serial` and the namespace ID in
//! `/sys/block/nvmeXnY/nsid`. `X` and `Y` are instance numbers, not the
//! PCI address or the namespace ID, so cradle relies on neither.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Name prefix of virtio-blk disks in /sys/block.
const VIRTIO_BLK_PREFIX: &str = "vd";
/// Name prefix of NVMe namespaces in /sys/block (`nvme0n1`).
const NVME_PREFIX: &str = "nvme";

/// Errors of finding the volumes' disks.
#[derive(Debug, Error)]
pub enum DiskError {
    #[error("cannot list the disks in {}", path.display())]
    List {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no disk for {} appeared within {waited_ms} ms; the host must attach each volume as a virtio-blk disk whose serial is the volume's name, or, for a volume with nvme_serial, pass its NVMe controller with crib run --vfio BDF", names.join(", "))]
    Missing { names: Vec<String>, waited_ms: u128 },
    #[error("volume {name}: disks {} all match its serial; give each disk its own serial", devices.join(", "))]
    Ambiguous { name: String, devices: Vec<String> },
}

/// What identifies a volume's disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskId<'a> {
    /// The virtio-blk disk with this serial (the volume's name).
    Virtio(&'a str),
    /// Namespace `nsid` of the NVMe controller with serial `serial`.
    Nvme { serial: &'a str, nsid: u32 },
}

/// A volume to find: its name and its disk's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted<'a> {
    pub name: &'a str,
    pub id: DiskId<'a>,
}

impl<'a> Wanted<'a> {
    /// A volume on the virtio-blk disk whose serial is its name.
    pub fn virtio(name: &'a str) -> Self {
        Self {
            name,
            id: DiskId::Virtio(name),
        }
    }

    /// How a missing volume is named in errors: `lv` or
    /// `lv (NVMe serial S, namespace 1)`.
    fn describe(&self) -> String {
        match self.id {
            DiskId::Virtio(_) => self.name.to_owned(),
            DiskId::Nvme { serial, nsid } => {
                format!("{} (NVMe serial {serial}, namespace {nsid})", self.name)
            }
        }
    }
}

/// An NVMe namespace as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Namespace {
    /// The controller's serial, trimmed.
    serial: String,
    nsid: u32,
}

/// What the scanner knows about the virtio-blk disks and NVMe namespaces,
/// updated by polling.
#[derive(Debug)]
pub struct DiskScanner {
    sys_block: PathBuf,
    /// Device name (`vdb`) -> serial, read once per disk: each read is a
    /// request to the device.
    serials: BTreeMap<String, String>,
    /// Device name (`nvme0n1`) -> its controller's serial and its nsid.
    namespaces: BTreeMap<String, Namespace>,
}

impl DiskScanner {
    /// A scanner over `sys_block` (`/sys/block` in the guest).
    pub fn new(sys_block: impl Into<PathBuf>) -> Self {
        Self {
            sys_block: sys_block.into(),
            serials: BTreeMap::new(),
            namespaces: BTreeMap::new(),
        }
    }

    /// Lists `vd*` disks and `nvmeXnY` namespaces and reads the serial of
    /// each new one.
    pub fn scan(&mut self) -> Result<(), DiskError> {
        let entries = std::fs::read_dir(&self.sys_block).map_err(|source| DiskError::List {
            path: self.sys_block.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if let Some(nsid) = nvme_namespace_index(&name) {
                if let Entry::Vacant(slot) = self.namespaces.entry(name) {
                    if let Some(namespace) = read_namespace(&entry.path(), nsid) {
                        slot.insert(namespace);
                    }
                }
                continue;
            }
            if !name.starts_with(VIRTIO_BLK_PREFIX) || self.serials.contains_key(&name) {
                continue;
            }
            // The disk's directory can show up a moment before its
            // attributes: a missing or unreadable serial is tried again.
            // (A device without GET_ID reads as empty, which is cached.)
            if let Ok(bytes) = std::fs::read(entry.path().join("serial")) {
                self.serials.insert(name, parse_serial(&bytes));
            }
        }
        Ok(())
    }

    /// The disks whose serial is `serial`, by device name.
    pub fn devices_with_serial(&self, serial: &str) -> Vec<String> {
        self.serials
            .iter()
            .filter(|(_, s)| s.as_str() == serial)
            .map(|(device, _)| device.clone())
            .collect()
    }

    /// The disks that are `id`, by device name.
    pub fn devices_for(&self, id: DiskId) -> Vec<String> {
        match id {
            DiskId::Virtio(serial) => self.devices_with_serial(serial),
            DiskId::Nvme { serial, nsid } => self
                .namespaces
                .iter()
                .filter(|(_, ns)| ns.serial == serial && ns.nsid == nsid)
                .map(|(device, _)| device.clone())
                .collect(),
        }
    }
}

/// For `nvme<X>n<Y>` (a namespace, not a partition `nvme0n1p1`, nor a
/// multipath path `nvme0c0n1`), `Y`: the namespace ID when sysfs has no
/// `nsid` attribute.
fn nvme_namespace_index(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NVME_PREFIX)?;
    let (controller, namespace) = rest.split_once('n')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(controller) || !digits(namespace) {
        return None;
    }
    namespace.parse().ok()
}

/// Reads a namespace's controller serial and nsid from its sysfs dir;
/// None while the attributes are not there yet.
fn read_namespace(dir: &Path, index: u32) -> Option<Namespace> {
    let bytes = std::fs::read(dir.join("device/serial")).ok()?;
    let serial = parse_serial(&bytes).trim().to_owned();
    let nsid = match std::fs::read_to_string(dir.join("nsid")) {
        Ok(text) => text.trim().parse().ok()?,
        // Older kernels have no nsid attribute: the name's Y is the nsid
        // on a controller that is not shared (no multipath).
        Err(_) => index,
    };
    Some(Namespace { serial, nsid })
}

/// The serial as sysfs shows it: up to 20 bytes, NUL padding and any
/// trailing newline dropped.
pub fn parse_serial(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let serial = bytes.get(..end).unwrap_or_default();
    String::from_utf8_lossy(serial).trim_end().to_owned()
}

/// Matches each wanted volume to exactly one disk, or says which are
/// missing (described as in the errors). Pure: works on what the scanner
/// has seen so far.
pub fn match_volumes(
    scanner: &DiskScanner,
    wanted: &[Wanted],
) -> Result<HashMap<String, String>, MatchOutcome> {
    let mut found = HashMap::new();
    let mut missing = Vec::new();
    for want in wanted {
        let devices = scanner.devices_for(want.id);
        match devices.as_slice() {
            [] => missing.push(want.describe()),
            [device] => {
                found.insert(want.name.to_owned(), device.clone());
            }
            _ => {
                return Err(MatchOutcome::Ambiguous {
                    name: want.name.to_owned(),
                    devices,
                })
            }
        }
    }
    if missing.is_empty() {
        Ok(found)
    } else {
        Err(MatchOutcome::Missing(missing))
    }
}

/// Why [`match_volumes`] did not match every volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MatchOutcome {
    /// No disk matches these volumes (yet).
    Missing(Vec<String>),
    /// Several disks have the serial `name`: refusing to guess.
    Ambiguous { name: String, devices: Vec<String> },
}

/// How long to wait and how often to look.
#[derive(Debug, Clone, Copy)]
pub struct Wait {
    pub timeout: Duration,
    pub poll: Duration,
}

/// Polls until every wanted volume has exactly one disk whose node exists
/// in `dev_dir`, returning volume name -> device name (`vdb`, `nvme0n1`).
pub fn wait_for_disks(
    scanner: &mut DiskScanner,
    dev_dir: &Path,
    wanted: &[Wanted],
    wait: Wait,
) -> Result<HashMap<String, String>, DiskError> {
    let start = Instant::now();
    loop {
        scanner.scan()?;
        let missing = match match_volumes(scanner, wanted) {
            Ok(found) => {
                // devtmpfs makes the node when the disk is added; check anyway.
                let nodeless: Vec<String> = found
                    .iter()
                    .filter(|(_, device)| !dev_dir.join(device).exists())
                    .map(|(name, _)| name.clone())
                    .collect();
                if nodeless.is_empty() {
                    return Ok(found);
                }
                nodeless
            }
            Err(MatchOutcome::Ambiguous { name, devices }) => {
                return Err(DiskError::Ambiguous { name, devices })
            }
            Err(MatchOutcome::Missing(missing)) => missing,
        };
        let waited = start.elapsed();
        if waited >= wait.timeout {
            let mut names = missing;
            names.sort();
            return Err(DiskError::Missing {
                names,
                waited_ms: waited.as_millis(),
            });
        }
        std::thread::sleep(wait.poll);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

    /// A fake /sys/block with `vd*` disks and their serials (None: no
    /// serial file), plus a fake /dev with a node per disk.
    struct FakeSys {
        dir: TempDir,
    }

    impl FakeSys {
        fn new(tag: &str) -> Self {
            let dir = TempDir::new(tag);
            std::fs::create_dir_all(dir.path().join("sys/block")).unwrap();
            std::fs::create_dir_all(dir.path().join("dev")).unwrap();
            Self { dir }
        }

        fn add_disk(&self, device: &str, serial: Option<&[u8]>) {
            let disk = self.sys_block().join(device);
            std::fs::create_dir_all(&disk).unwrap();
            if let Some(serial) = serial {
                std::fs::write(disk.join("serial"), serial).unwrap();
            }
            std::fs::write(self.dev().join(device), b"").unwrap();
        }

        /// An NVMe namespace `device` of a controller with `serial`
        /// (space-padded as the kernel may show it), with an `nsid` file
        /// unless None.
        fn add_namespace(&self, device: &str, serial: &str, nsid: Option<u32>) {
            let disk = self.sys_block().join(device);
            std::fs::create_dir_all(disk.join("device")).unwrap();
            std::fs::write(disk.join("device/serial"), format!("{serial:<20}\n")).unwrap();
            if let Some(nsid) = nsid {
                std::fs::write(disk.join("nsid"), format!("{nsid}\n")).unwrap();
            }
            std::fs::write(self.dev().join(device), b"").unwrap();
        }

        fn sys_block(&self) -> PathBuf {
            self.dir.path().join("sys/block")
        }

        fn dev(&self) -> PathBuf {
            self.dir.path().join("dev")
        }
    }

    fn virtio<'a>(names: &[&'a str]) -> Vec<Wanted<'a>> {
        names.iter().map(|name| Wanted::virtio(name)).collect()
    }

    fn nvme<'a>(name: &'a str, serial: &'a str, nsid: u32) -> Wanted<'a> {
        Wanted {
            name,
            id: DiskId::Nvme { serial, nsid },
        }
    }

    /// Short enough for a test that expects to time out.
    const QUICK: Wait = Wait {
        timeout: Duration::from_millis(20),
        poll: Duration::from_millis(1),
    };

    #[test]
    fn parse_serial_drops_nul_padding_and_newline() {
        assert_eq!(parse_serial(b"data\0\0\0\0"), "data");
        assert_eq!(parse_serial(b"data\n"), "data");
        assert_eq!(
            parse_serial(b"abcdefghij0123456789"),
            "abcdefghij0123456789"
        );
        assert_eq!(parse_serial(b""), "");
    }

    #[test]
    fn wait_for_disks_matches_by_serial_not_by_order() {
        let sys = FakeSys::new("disks-order");
        sys.add_disk("vda", Some(b"scratch"));
        sys.add_disk("vdb", Some(b"data"));
        let mut scanner = DiskScanner::new(sys.sys_block());

        let found = wait_for_disks(
            &mut scanner,
            &sys.dev(),
            &virtio(&["data", "scratch"]),
            QUICK,
        )
        .unwrap();

        assert_eq!(found["data"], "vdb");
        assert_eq!(found["scratch"], "vda");
    }

    #[test]
    fn wait_for_disks_ignores_non_virtio_disks() {
        // An NVMe namespace with the same "serial" is not a virtio-blk volume.
        let sys = FakeSys::new("disks-nvme");
        sys.add_disk("nvme0n1", Some(b"data"));
        let mut scanner = DiskScanner::new(sys.sys_block());

        let error =
            wait_for_disks(&mut scanner, &sys.dev(), &virtio(&["data"]), QUICK).unwrap_err();

        assert!(matches!(error, DiskError::Missing { names, .. } if names == ["data"]));
    }

    #[test]
    fn wait_for_disks_missing_volume_is_named_with_the_fix() {
        let sys = FakeSys::new("disks-missing");
        sys.add_disk("vda", Some(b"data"));
        let mut scanner = DiskScanner::new(sys.sys_block());

        let error = wait_for_disks(&mut scanner, &sys.dev(), &virtio(&["data", "logs"]), QUICK)
            .unwrap_err();

        assert!(matches!(&error, DiskError::Missing { names, .. } if names == &["logs"]));
        assert!(error.to_string().contains("serial is the volume's name"));
    }

    #[test]
    fn wait_for_disks_two_disks_with_one_serial_is_ambiguous() {
        let sys = FakeSys::new("disks-ambiguous");
        sys.add_disk("vda", Some(b"data"));
        sys.add_disk("vdb", Some(b"data\0\0"));
        let mut scanner = DiskScanner::new(sys.sys_block());

        let error =
            wait_for_disks(&mut scanner, &sys.dev(), &virtio(&["data"]), QUICK).unwrap_err();

        assert!(matches!(
            error,
            DiskError::Ambiguous { name, devices } if name == "data" && devices == ["vda", "vdb"]
        ));
    }

    #[test]
    fn wait_for_disks_disk_without_serial_file_matches_nothing() {
        let sys = FakeSys::new("disks-noserial");
        sys.add_disk("vda", None);
        let mut scanner = DiskScanner::new(sys.sys_block());

        let error =
            wait_for_disks(&mut scanner, &sys.dev(), &virtio(&["data"]), QUICK).unwrap_err();

        assert!(matches!(error, DiskError::Missing { .. }));
    }

    #[test]
    fn wait_for_disks_without_dev_node_keeps_waiting() {
        let sys = FakeSys::new("disks-nonode");
        sys.add_disk("vda", Some(b"data"));
        std::fs::remove_file(sys.dev().join("vda")).unwrap();
        let mut scanner = DiskScanner::new(sys.sys_block());

        let error =
            wait_for_disks(&mut scanner, &sys.dev(), &virtio(&["data"]), QUICK).unwrap_err();

        assert!(matches!(error, DiskError::Missing { names, .. } if names == ["data"]));
    }

    #[test]
    fn wait_for_disks_finds_a_disk_that_appears_late() {
        let sys = FakeSys::new("disks-late");
        let sys_block = sys.sys_block();
        let dev = sys.dev();
        let adder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            std::fs::create_dir_all(sys_block.join("vdc")).unwrap();
            std::fs::write(dev.join("vdc"), b"").unwrap();
            std::fs::write(sys_block.join("vdc/serial"), b"late").unwrap();
        });
        let mut scanner = DiskScanner::new(sys.sys_block());
        let wait = Wait {
            timeout: Duration::from_secs(5),
            poll: Duration::from_millis(1),
        };

        let found = wait_for_disks(&mut scanner, &sys.dev(), &virtio(&["late"]), wait).unwrap();

        adder.join().unwrap();
        assert_eq!(found["late"], "vdc");
    }

    #[test]
    fn wait_for_disks_without_sys_block_is_a_list_error() {
        let dir = TempDir::new("disks-nosys");
        let mut scanner = DiskScanner::new(dir.path().join("absent"));

        let error =
            wait_for_disks(&mut scanner, dir.path(), &virtio(&["data"]), QUICK).unwrap_err();

        assert!(matches!(error, DiskError::List { .. }));
    }

    #[test]
    fn wait_for_disks_no_volumes_returns_at_once() {
        let sys = FakeSys::new("disks-empty");
        let mut scanner = DiskScanner::new(sys.sys_block());

        let found = wait_for_disks(&mut scanner, &sys.dev(), &virtio(&[]), QUICK).unwrap();

        assert!(found.is_empty());
    }

    #[test]
    fn wait_for_disks_finds_an_nvme_namespace_by_controller_serial() {
        let sys = FakeSys::new("disks-nvme-serial");
        sys.add_disk("vda", Some(b"data"));
        sys.add_namespace("nvme0n1", "other", Some(1));
        sys.add_namespace("nvme1n1", "crib-nvme0", Some(1));
        let mut scanner = DiskScanner::new(sys.sys_block());
        let wanted = [Wanted::virtio("data"), nvme("lv", "crib-nvme0", 1)];

        let found = wait_for_disks(&mut scanner, &sys.dev(), &wanted, QUICK).unwrap();

        assert_eq!(found["lv"], "nvme1n1");
        assert_eq!(found["data"], "vda");
    }

    #[test]
    fn wait_for_disks_matches_the_nvme_namespace_id() {
        let sys = FakeSys::new("disks-nvme-nsid");
        sys.add_namespace("nvme0n1", "s", Some(1));
        sys.add_namespace("nvme0n2", "s", Some(2));
        let mut scanner = DiskScanner::new(sys.sys_block());

        let found = wait_for_disks(&mut scanner, &sys.dev(), &[nvme("b", "s", 2)], QUICK).unwrap();

        assert_eq!(found["b"], "nvme0n2");
    }

    #[test]
    fn wait_for_disks_without_nsid_file_takes_the_name_index() {
        let sys = FakeSys::new("disks-nvme-nonsid");
        sys.add_namespace("nvme0n1", "s", None);
        sys.add_namespace("nvme0n2", "s", None);
        let mut scanner = DiskScanner::new(sys.sys_block());

        let found = wait_for_disks(&mut scanner, &sys.dev(), &[nvme("a", "s", 1)], QUICK).unwrap();

        assert_eq!(found["a"], "nvme0n1");
    }

    #[test]
    fn wait_for_disks_ignores_nvme_partitions_and_paths() {
        let sys = FakeSys::new("disks-nvme-parts");
        sys.add_namespace("nvme0n1p1", "s", Some(1));
        sys.add_namespace("nvme0c0n1", "s", Some(1));
        let mut scanner = DiskScanner::new(sys.sys_block());

        let error =
            wait_for_disks(&mut scanner, &sys.dev(), &[nvme("a", "s", 1)], QUICK).unwrap_err();

        assert!(matches!(&error, DiskError::Missing { names, .. }
            if names == &["a (NVMe serial s, namespace 1)"]));
        assert!(error.to_string().contains("crib run --vfio"));
    }

    #[test]
    fn wait_for_disks_virtio_serial_does_not_match_an_nvme_volume() {
        // A virtio-blk disk whose serial is the NVMe serial is not the namespace.
        let sys = FakeSys::new("disks-nvme-virtio");
        sys.add_disk("vda", Some(b"crib-nvme0"));
        let mut scanner = DiskScanner::new(sys.sys_block());

        let error = wait_for_disks(
            &mut scanner,
            &sys.dev(),
            &[nvme("lv", "crib-nvme0", 1)],
            QUICK,
        )
        .unwrap_err();

        assert!(matches!(error, DiskError::Missing { .. }));
    }

    #[test]
    fn wait_for_disks_two_controllers_with_one_serial_are_ambiguous() {
        let sys = FakeSys::new("disks-nvme-ambiguous");
        sys.add_namespace("nvme0n1", "s", Some(1));
        sys.add_namespace("nvme1n1", "s", Some(1));
        let mut scanner = DiskScanner::new(sys.sys_block());

        let error =
            wait_for_disks(&mut scanner, &sys.dev(), &[nvme("a", "s", 1)], QUICK).unwrap_err();

        assert!(matches!(
            error,
            DiskError::Ambiguous { name, devices } if name == "a" && devices == ["nvme0n1", "nvme1n1"]
        ));
    }

    #[test]
    fn nvme_namespace_index_parses_only_namespaces() {
        assert_eq!(nvme_namespace_index("nvme0n1"), Some(1));
        assert_eq!(nvme_namespace_index("nvme12n34"), Some(34));
        assert_eq!(nvme_namespace_index("nvme0n1p2"), None);
        assert_eq!(nvme_namespace_index("nvme0c1n1"), None);
        assert_eq!(nvme_namespace_index("nvme0"), None);
        assert_eq!(nvme_namespace_index("vda"), None);
    }

    #[test]
    fn match_volumes_reports_every_missing_name() {
        let scanner = DiskScanner::new("/nonexistent");

        let outcome = match_volumes(&scanner, &virtio(&["a", "b"])).unwrap_err();

        assert_eq!(
            outcome,
            MatchOutcome::Missing(vec!["a".to_owned(), "b".to_owned()])
        );
    }
}
