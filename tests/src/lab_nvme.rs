//! The lab's emulated NVMe (tests/lab/lab.sh `--nvme`, `--nvme-vfs`) as the VFIO tests and
//! `crib-bench vfio` drive it from L1: finding the controller, moving it between the
//! nvme and vfio-pci drivers, and enabling an SR-IOV virtual function.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::host_tool;

/// L1's view of the namespace while the controller is bound to nvme.
pub const L1_NAMESPACE: &str = "/dev/nvme0n1";
/// Queues (admin included) and interrupt vectors a VF's controller gets; lab.sh gives
/// each VF room for 4 of each.
const VF_QUEUES: u32 = 4;
const VF_VECTORS: u32 = 4;

fn pci_device(bdf: &str) -> PathBuf {
    PathBuf::from("/sys/bus/pci/devices").join(bdf)
}

/// Writes `value` to a sysfs file, naming the file on failure.
pub fn write_sysfs(path: impl AsRef<Path>, value: &str) -> Result<()> {
    let path = path.as_ref();
    std::fs::write(path, value)
        .with_context(|| format!("cannot write '{value}' to {}", path.display()))
}

/// Waits up to 20 s for `path` to exist; `what` names the step in the error.
pub fn wait_for(path: &Path, what: &str) -> Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("{what}: {} did not appear", path.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The BDF of L1's emulated NVMe controller (class 0x010802, QEMU's vendor id): the
/// physical function, never one of its SR-IOV virtual functions.
pub fn find_lab_nvme() -> Result<String> {
    for entry in std::fs::read_dir("/sys/bus/pci/devices")?.flatten() {
        let read = |f: &str| std::fs::read_to_string(entry.path().join(f)).unwrap_or_default();
        let is_vf = entry.path().join("physfn").exists();
        if read("class").trim() == "0x010802" && read("vendor").trim() == "0x1b36" && !is_vf {
            return Ok(entry.file_name().to_string_lossy().into_owned());
        }
    }
    bail!(
        "no emulated NVMe (class 0x010802, vendor 0x1b36) in L1: was the lab started with --nvme?"
    )
}

/// Rebinds `bdf` to `driver` (through driver_override and drivers_probe).
pub fn bind(bdf: &str, driver: &str) -> Result<()> {
    let dev = pci_device(bdf);
    if dev.join("driver").exists() {
        write_sysfs(dev.join("driver/unbind"), bdf)?;
    }
    // An empty override ("\n") lets the normal driver match again.
    let over = if driver == "nvme" { "\n" } else { driver };
    write_sysfs(dev.join("driver_override"), over)?;
    write_sysfs("/sys/bus/pci/drivers_probe", bdf)?;
    let bound = std::fs::read_link(dev.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    if bound.as_deref() != Some(driver) {
        bail!("{bdf} is bound to {bound:?} after binding {driver}");
    }
    Ok(())
}

/// Binds `bdf` to vfio-pci and waits for its group's node under /dev/vfio.
pub fn bind_vfio(bdf: &str) -> Result<()> {
    let _ = std::process::Command::new("modprobe")
        .arg("vfio-pci")
        .status();
    bind(bdf, "vfio-pci")?;
    let group = std::fs::read_link(pci_device(bdf).join("iommu_group")).with_context(|| {
        format!("{bdf} has no IOMMU group: is intel_iommu=on on L1's command line?")
    })?;
    let group = group
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    wait_for(&PathBuf::from("/dev/vfio").join(&group), "vfio-pci bind")
}

/// Binds the PF back to nvme and waits for L1's namespace.
pub fn bind_nvme(bdf: &str) -> Result<()> {
    bind(bdf, "nvme")?;
    wait_for(Path::new(L1_NAMESPACE), "nvme rebind")
}

/// One SR-IOV virtual function of the lab's NVMe (lab.sh `--nvme-vfs 1`), enabled the way
/// an operator does it with nvme-cli: the VF's secondary controller is given I/O queues
/// and interrupt vectors from the PF's flexible pools, the VF is created with autoprobe
/// off (the nvme driver would bind it before it is online), the secondary controller is
/// brought online, and the VF goes to vfio-pci. Dropping it unbinds and removes the VF.
pub struct VirtualFunction {
    pf: String,
    /// The VF's BDF, bound to vfio-pci.
    pub bdf: String,
}

impl VirtualFunction {
    pub fn enable() -> Result<Self> {
        let pf = find_lab_nvme()?;
        let dev = pci_device(&pf);
        let total = std::fs::read_to_string(dev.join("sriov_totalvfs")).unwrap_or_default();
        anyhow::ensure!(
            total.trim().parse::<u32>().unwrap_or(0) >= 1,
            "{pf} offers no SR-IOV virtual function (sriov_totalvfs {:?}): was the lab started with --nvme-vfs?",
            total.trim()
        );
        // The PF must be bound to nvme: the driver enables SR-IOV, and nvme-cli talks to
        // the controller through it.
        bind(&pf, "nvme")?;
        let ctrl = std::fs::read_dir(dev.join("nvme"))?
            .flatten()
            .map(|e| format!("/dev/{}", e.file_name().to_string_lossy()))
            .next()
            .with_context(|| format!("{pf} bound to nvme has no controller"))?;
        wait_for(Path::new(&ctrl), "the PF's controller node")?;
        let secondary = host_tool("nvme", &["list-secondary", &ctrl])?;
        let scid = secondary
            .lines()
            .find(|l| l.trim_start().starts_with("SCID"))
            .and_then(|l| l.rsplit(':').next())
            .and_then(|v| u32::from_str_radix(v.trim().trim_start_matches("0x"), 16).ok())
            .with_context(|| format!("no secondary controller in:\n{secondary}"))?
            .to_string();
        // nvme-cli's resource types: 0 queues, 1 interrupt vectors; actions: 8 assigns
        // to a secondary controller, 9 brings it online.
        let virt_mgmt = |resource: &str, action: &str, count: u32| {
            let count = count.to_string();
            let args = [
                "virt-mgmt",
                &ctrl,
                "-c",
                &scid,
                "-r",
                resource,
                "-a",
                action,
            ];
            host_tool("nvme", &[&args[..], &["-n", &count]].concat())
        };
        virt_mgmt("0", "8", VF_QUEUES)?;
        virt_mgmt("1", "8", VF_VECTORS)?;
        write_sysfs(dev.join("sriov_drivers_autoprobe"), "0")?;
        write_sysfs(dev.join("sriov_numvfs"), "1")?;
        let mut vf = Self {
            pf: pf.clone(),
            bdf: String::new(),
        };
        virt_mgmt("0", "9", 0)?;
        vf.bdf = std::fs::read_link(dev.join("virtfn0"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .with_context(|| format!("{pf} has no virtfn0 after sriov_numvfs=1"))?;
        bind_vfio(&vf.bdf)?;
        Ok(vf)
    }
}

impl Drop for VirtualFunction {
    fn drop(&mut self) {
        let dev = pci_device(&self.pf);
        if !self.bdf.is_empty() {
            let vf = pci_device(&self.bdf);
            let _ = std::fs::write(vf.join("driver/unbind"), &self.bdf);
            let _ = std::fs::write(vf.join("driver_override"), "\n");
        }
        let _ = std::fs::write(dev.join("sriov_numvfs"), "0");
        let _ = std::fs::write(dev.join("sriov_drivers_autoprobe"), "1");
    }
}
