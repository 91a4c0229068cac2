//! `--vfio BDF`: host PCI functions passed through with VFIO (legacy container/group
//! API, on `vfio-ioctls`). One container holds every passed-through device's group, with
//! all guest RAM DMA-mapped once. Each device becomes a [`devices::vfio::VfioPciDevice`]
//! on crib's bus: its BARs are mmapped into the guest as KVM memory slots where VFIO
//! allows it, except the MSI-X table and PBA pages, which are trapped. Guest RAM is
//! DMA-mapped in the background while the guest boots (see `dma`). MSI-X vectors are
//! irqfds handed to VFIO_DEVICE_SET_IRQS and bound to KVM GSIs, so interrupts go from
//! the host's interrupt handler to the guest without crib.
//!
//! The checks in [`check_host`] turn the usual set-up mistakes (driver not vfio-pci, no
//! IOMMU, a shared group, a typo in the address) into messages that say the fix.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use devices::pci::MsiRouting;
use devices::vfio::{
    find_msix, interrupt_pin, probe_bars, IntxControl, MsixControl, MsixTable, VfioBarTrap,
    VfioPciDevice, VfioRegions,
};
use devices::VmExit;
use kvm_bindings::{
    kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO, kvm_userspace_memory_region,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;

use crate::bar_relocation::BarHook;
use crate::interrupts::GsiRouter;
use crate::memory::GuestMemory;
use crate::seccomp::Filter;

mod dma;
use dma::DmaMap;

/// KVM memory slots of BAR mappings start here, far above guest RAM's few slots.
const FIRST_BAR_SLOT: u32 = 64;
const PAGE_SIZE: u64 = 0x1000;

/// A PCI address: domain, bus, device, function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Bdf {
    pub domain: u16,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

/// A `--vfio` value that is not a PCI address.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("'{0}' is not a PCI address: write DOMAIN:BUS:DEVICE.FUNCTION in hex, e.g. 0000:00:04.0 (as `lspci -D` shows it)")]
pub struct BdfError(pub String);

impl FromStr for Bdf {
    type Err = BdfError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || BdfError(text.to_string());
        let hex = |s: &str, digits: usize| {
            (!s.is_empty() && s.len() <= digits && s.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u32::from_str_radix(s, 16).ok())
                .flatten()
                .ok_or_else(err)
        };
        let (head, function) = text.rsplit_once('.').ok_or_else(err)?;
        let parts: Vec<&str> = head.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [domain, bus, device] => (hex(domain, 4)?, hex(bus, 2)?, hex(device, 2)?),
            // The short form lspci prints without -D: domain 0.
            [bus, device] => (0, hex(bus, 2)?, hex(device, 2)?),
            _ => return Err(err()),
        };
        let function = hex(function, 1)?;
        if device > 0x1f || function > 7 {
            return Err(err());
        }
        Ok(Self {
            domain: domain as u16,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

impl TryFrom<String> for Bdf {
    type Error = BdfError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<Bdf> for String {
    fn from(bdf: Bdf) -> Self {
        bdf.to_string()
    }
}

/// Errors of VFIO set-up, each naming the fix.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    #[error("PCI device {bdf} does not exist (no {}): list this host's devices with `lspci -D` and give one of those addresses", path.display())]
    NoSuchDevice { bdf: Bdf, path: PathBuf },
    #[error("this host has no IOMMU ({} is empty or missing): enable VT-d or AMD-Vi in the firmware and boot Linux with intel_iommu=on iommu=pt (Intel) or amd_iommu=on (AMD)", groups.display())]
    NoIommu { groups: PathBuf },
    #[error("PCI device {bdf} is bound to {driver}, not vfio-pci: bind it with `modprobe vfio-pci; echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind; echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override; echo {bdf} > /sys/bus/pci/drivers_probe`")]
    NotVfio { bdf: Bdf, driver: String },
    #[error("IOMMU group {group} of PCI device {bdf} is not viable: {others} in the same group must also be bound to vfio-pci (or to no driver); bind them the same way, or use a device that has a group of its own")]
    GroupNotViable {
        bdf: Bdf,
        group: u32,
        others: String,
    },
    #[error("PCI device {bdf} (IOMMU group {group}) is in use: another process (a VMM) holds /dev/vfio/{group}; stop it first")]
    Busy { bdf: Bdf, group: u32 },
    #[error("cannot open the VFIO container /dev/vfio/vfio: load the modules with `modprobe vfio-pci vfio_iommu_type1`")]
    Container(#[source] vfio_ioctls::VfioError),
    #[error(
        "cannot create the KVM VFIO device: this host's KVM lacks VFIO support (CONFIG_KVM_VFIO)"
    )]
    KvmDevice(#[source] kvm_ioctls::Error),
    #[error("cannot open PCI device {bdf} through VFIO")]
    Open {
        bdf: Bdf,
        #[source]
        source: vfio_ioctls::VfioError,
    },
    #[error("cannot DMA-map guest RAM for VFIO: the locked-memory limit must cover all guest RAM (`ulimit -l unlimited`, or LimitMEMLOCK=infinity for a service)")]
    DmaMap(#[source] vfio_ioctls::VfioError),
    #[error("VFIO must lock all {needed} bytes of guest RAM but the locked-memory limit is {limit} bytes: raise it (`ulimit -l unlimited`, or LimitMEMLOCK=infinity for a service), or run crib with CAP_IPC_LOCK")]
    MemlockLimit { limit: u64, needed: u64 },
    #[error("cannot start the thread that DMA-maps guest RAM")]
    DmaThread(#[source] std::io::Error),
    #[error("PCI device {bdf}: no room for BAR {bar} ({size:#x} bytes) in the PCI MMIO windows")]
    BarSpace {
        bdf: Bdf,
        bar: usize,
        size: u64,
        #[source]
        source: vm_allocator::Error,
    },
    #[error("PCI device {bdf}: cannot map BAR {bar} into the guest")]
    MapBar {
        bdf: Bdf,
        bar: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("PCI device {bdf} cannot be presented to the guest")]
    Device {
        bdf: Bdf,
        #[source]
        source: devices::vfio::VfioPciError,
    },
    #[error("PCI device {bdf}: cannot set up its MSI-X vectors")]
    Interrupts {
        bdf: Bdf,
        #[source]
        source: std::io::Error,
    },
}

fn link_name(path: &Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// Checks that `bdf` can be passed through, against the sysfs mounted at `sysfs`:
/// the device exists, the host has an IOMMU, the device is bound to vfio-pci and every
/// other device in its group is bound to vfio-pci or to nothing. Returns the group.
pub fn check_host(sysfs: &Path, bdf: &Bdf) -> Result<u32, VfioError> {
    let device = sysfs.join("bus/pci/devices").join(bdf.to_string());
    if !device.exists() {
        return Err(VfioError::NoSuchDevice {
            bdf: *bdf,
            path: device,
        });
    }
    let groups = sysfs.join("kernel/iommu_groups");
    let has_groups = std::fs::read_dir(&groups).is_ok_and(|mut d| d.next().is_some());
    let group = link_name(&device.join("iommu_group")).and_then(|g| g.parse::<u32>().ok());
    let (true, Some(group)) = (has_groups, group) else {
        return Err(VfioError::NoIommu { groups });
    };
    let driver = link_name(&device.join("driver"));
    if driver.as_deref() != Some("vfio-pci") {
        return Err(VfioError::NotVfio {
            bdf: *bdf,
            driver: driver.unwrap_or_else(|| "no driver".into()),
        });
    }
    let mut others = Vec::new();
    if let Ok(members) = std::fs::read_dir(groups.join(group.to_string()).join("devices")) {
        for member in members.flatten() {
            let name = member.file_name().to_string_lossy().into_owned();
            if name == bdf.to_string() {
                continue;
            }
            // Bridges (pcieport) do not break viability; a bound endpoint does.
            match link_name(&member.path().join("driver")) {
                None => {}
                Some(d) if matches!(d.as_str(), "vfio-pci" | "pci-stub" | "pcieport") => {}
                Some(d) => others.push(format!("{name} (bound to {d})")),
            }
        }
    }
    if !others.is_empty() {
        others.sort();
        return Err(VfioError::GroupNotViable {
            bdf: *bdf,
            group,
            others: others.join(", "),
        });
    }
    Ok(group)
}

/// Maps a library error on opening a device to the fix, where one is known.
fn open_error(bdf: &Bdf, group: u32, source: vfio_ioctls::VfioError) -> VfioError {
    use vfio_ioctls::VfioError as E;
    match &source {
        E::OpenGroup(e, _) if e.raw_os_error() == Some(libc::EBUSY) => {
            VfioError::Busy { bdf: *bdf, group }
        }
        E::GroupGetDeviceFD(e) if e.errno() == libc::EBUSY => VfioError::Busy { bdf: *bdf, group },
        E::GroupViable => VfioError::GroupNotViable {
            bdf: *bdf,
            group,
            others: "another device".into(),
        },
        _ => VfioError::Open { bdf: *bdf, source },
    }
}

/// The VFIO container every passed-through device of the VM shares.
pub struct VfioHost {
    container: Arc<VfioContainer>,
    vm: Arc<VmFd>,
    next_slot: u32,
    sysfs: PathBuf,
    /// Per device: BAR mappings, and a reset at teardown (when this is dropped).
    guards: Vec<DeviceGuard>,
    /// Guest RAM's DMA map, which every device waits for before it masters the bus.
    dma: Arc<DmaMap>,
}

impl VfioHost {
    /// Checks every device in `bdfs` (so a wrong address or driver is reported as such,
    /// not as a missing VFIO module), then creates the KVM VFIO device and the container.
    pub fn new(vm: Arc<VmFd>, bdfs: &[Bdf]) -> Result<Self, VfioError> {
        let sysfs = PathBuf::from("/sys");
        for bdf in bdfs {
            check_host(&sysfs, bdf)?;
        }
        let mut kvm_device = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        let device = vm
            .create_device(&mut kvm_device)
            .map_err(VfioError::KvmDevice)?;
        let container = VfioContainer::new(Some(Arc::new(VfioDeviceFd::new_from_kvm(device))))
            .map_err(VfioError::Container)?;
        Ok(Self {
            container: Arc::new(container),
            vm,
            next_slot: FIRST_BAR_SLOT,
            sysfs,
            guards: Vec::new(),
            dma: Arc::new(DmaMap::default()),
        })
    }

    /// Starts DMA-mapping all of guest RAM (IOVA = guest-physical address), once, after
    /// the devices are added (the container's IOMMU is set up with its first group), on a
    /// thread with `filter`; the devices hold the guest's bus-master enable until it is
    /// done. A locked-memory limit too small for guest RAM is reported here; a later
    /// failure ends the VM through `exit`.
    pub fn map_guest_memory(
        &self,
        memory: &GuestMemory,
        filter: Option<Filter>,
        exit: Arc<VmExit>,
    ) -> Result<(), VfioError> {
        dma::start(
            self.container.clone(),
            memory.clone(),
            self.dma.clone(),
            filter,
            exit,
        )
    }

    /// Opens `bdf`, resets it and builds its PCI function: BARs placed in `bar_space`,
    /// mmapped where VFIO allows, MSI-X vectors on GSIs of `router`. Returns the device
    /// and the BAR ranges the MMIO bus must trap; the device lives until `self` drops.
    pub fn open(
        &mut self,
        bdf: &Bdf,
        slot: u8,
        bar_space: &mut crate::bar_space::BarSpace,
        router: &Arc<GsiRouter>,
    ) -> Result<VfioParts, VfioError> {
        let group = check_host(&self.sysfs, bdf)?;
        let path = self.sysfs.join("bus/pci/devices").join(bdf.to_string());
        let device = VfioDevice::new(&path, self.container.clone(), false)
            .map_err(|source| open_error(bdf, group, source))?;
        let device = Arc::new(device);
        // Start from a clean device: whatever the host's driver left behind is gone.
        device.reset();
        let regions = DeviceRegions {
            device: device.clone(),
        };
        let (bars, io_bars) = probe_bars(&regions, |i| device.get_region_size(i as u32));
        if !io_bars.is_empty() {
            tracing::warn!("vfio {bdf}: I/O BARs {io_bars:?} are not passed through");
        }
        let msix_cap = find_msix(&regions);
        let pin = interrupt_pin(&regions);

        let mut placed = Vec::with_capacity(bars.len());
        for bar in &bars {
            let addr = bar_space
                .allocate(bar.size, bar.is_64bit)
                .map_err(|source| VfioError::BarSpace {
                    bdf: *bdf,
                    bar: bar.index,
                    size: bar.size,
                    source,
                })?;
            placed.push((*bar, addr));
        }

        let msix = match msix_cap {
            Some(cap) => {
                let control = VfioMsix::new(&self.vm, router, device.clone(), cap.vectors)
                    .map_err(|source| VfioError::Interrupts { bdf: *bdf, source })?;
                Some((cap, MsixTable::new(cap.vectors, Box::new(control))))
            }
            None => {
                tracing::warn!("vfio {bdf}: no MSI-X capability; the guest gets no interrupts");
                None
            }
        };

        // Map what VFIO lets us map, less the MSI-X pages; trap the whole BAR on the bus
        // (accesses KVM slots take never exit).
        let mut mappings: Vec<BarMapping> = Vec::new();
        let mut traps = Vec::new();
        for (bar, addr) in &placed {
            traps.push((bar.index, *addr, bar.size));
            let index = bar.index as u32;
            if device.get_region_flags(index) & VFIO_REGION_INFO_FLAG_MMAP == 0 {
                continue;
            }
            let mut areas: Vec<(u64, u64)> = device
                .get_region_caps(index)
                .iter()
                .find_map(|cap| match cap {
                    VfioRegionInfoCap::SparseMmap(sparse) => {
                        Some(sparse.areas.iter().map(|a| (a.offset, a.size)).collect())
                    }
                    _ => None,
                })
                .unwrap_or_else(|| vec![(0, bar.region_size)]);
            if let Some((cap, _)) = &msix {
                for hole in cap.trapped_pages(bar.index, PAGE_SIZE) {
                    areas = subtract(&areas, hole);
                }
            }
            for (offset, len) in areas {
                let start = offset.next_multiple_of(PAGE_SIZE);
                let end = (offset + len) & !(PAGE_SIZE - 1);
                if end <= start {
                    continue;
                }
                let mapping = BarMapping::new(
                    &self.vm,
                    &device,
                    self.next_slot,
                    index,
                    start,
                    end - start,
                    *addr,
                )
                .map_err(|source| VfioError::MapBar {
                    bdf: *bdf,
                    bar: bar.index,
                    source,
                })?;
                self.next_slot += 1;
                mappings.push(mapping);
            }
        }

        let mut pci = VfioPciDevice::new(format!("vfio {bdf}"), Box::new(regions), &placed, msix)
            .map_err(|source| VfioError::Device { bdf: *bdf, source })?;
        pci.set_dma_readiness(self.dma.clone());
        let has_intx = device
            .get_irq_info(VFIO_PCI_INTX_IRQ_INDEX)
            .is_some_and(|irq| irq.count >= 1);
        if pin != 0 && has_intx {
            let gsi = boot::acpi::pci_intx_gsi(slot, pin);
            match VfioIntx::new(&self.vm, device.clone(), gsi) {
                Ok(intx) => pci.set_intx(Box::new(intx)),
                Err(e) => tracing::warn!("vfio {bdf}: INTx not routed, MSI-X only: {e}"),
            }
        }
        tracing::debug!(
            "vfio {bdf}: BARs {:?}, {} KVM slots, MSI-X {:?}",
            placed
                .iter()
                .map(|(b, a)| (b.index, *a, b.size))
                .collect::<Vec<_>>(),
            mappings.len(),
            msix_cap.map(|c| c.vectors)
        );
        let pci = Arc::new(Mutex::new(pci));
        let mappings = Arc::new(Mutex::new(mappings));
        let traps = traps
            .into_iter()
            .map(|(bar, addr, size)| {
                let device: Arc<Mutex<dyn devices::BusDevice>> =
                    Arc::new(Mutex::new(VfioBarTrap::new(pci.clone(), bar)));
                BarTrap {
                    bar,
                    device,
                    addr,
                    size,
                    on_move: move_bar_mappings(mappings.clone(), bar),
                }
            })
            .collect();
        self.guards.push(DeviceGuard { device, mappings });
        Ok(VfioParts { pci, traps })
    }
}

/// Removes `hole` (offset, length) from `areas`.
fn subtract(areas: &[(u64, u64)], hole: (u64, u64)) -> Vec<(u64, u64)> {
    let (h_start, h_end) = (hole.0, hole.0 + hole.1);
    let mut out = Vec::new();
    for &(start, len) in areas {
        let end = start + len;
        if h_end <= start || h_start >= end {
            out.push((start, len));
            continue;
        }
        if start < h_start {
            out.push((start, h_start - start));
        }
        if h_end < end {
            out.push((h_end, end - h_end));
        }
    }
    out
}

/// What the device manager puts on its buses for one passed-through device.
pub struct VfioParts {
    pub pci: Arc<Mutex<VfioPciDevice>>,
    /// One per BAR.
    pub traps: Vec<BarTrap>,
}

/// A BAR on the MMIO bus: what the KVM slots do not cover traps to `device`.
pub struct BarTrap {
    pub bar: usize,
    pub device: Arc<Mutex<dyn devices::BusDevice>>,
    pub addr: u64,
    pub size: u64,
    /// Moves the BAR's KVM slots when the guest moves the BAR.
    pub on_move: BarHook,
}

/// Moves the KVM slots of BAR `bar` to the BAR's new base. A slot KVM refuses stays
/// deleted: its accesses then trap to crib, which forwards them through VFIO.
fn move_bar_mappings(mappings: Arc<Mutex<Vec<BarMapping>>>, bar: usize) -> BarHook {
    Box::new(move |_old, new| {
        let mut mappings = mappings.lock().unwrap_or_else(|e| e.into_inner());
        for mapping in mappings.iter_mut().filter(|m| m.region as usize == bar) {
            mapping
                .move_to(new)
                .map_err(|e| format!("cannot map BAR {bar} at {new:#x}: {e}"))?;
        }
        Ok(())
    })
}

/// Resets the device and unmaps its BARs when dropped.
struct DeviceGuard {
    device: Arc<VfioDevice>,
    mappings: Arc<Mutex<Vec<BarMapping>>>,
}

impl Drop for DeviceGuard {
    fn drop(&mut self) {
        if let Err(e) = self.device.disable_msix() {
            tracing::debug!("disabling MSI-X at teardown: {e}");
        }
        if let Err(e) = self.device.disable_irq(VFIO_PCI_INTX_IRQ_INDEX) {
            tracing::debug!("disabling INTx at teardown: {e}");
        }
        self.device.reset();
        // crib leaves its vCPUs in KVM_RUN and ends the process after this: keep the BARs
        // mapped (the kernel unmaps them at exit) so a vCPU never faults on a hole.
        let mut mappings = self.mappings.lock().unwrap_or_else(|e| e.into_inner());
        for mapping in std::mem::take(&mut *mappings) {
            std::mem::forget(mapping);
        }
        // The same for the device: dropping the last VfioDevice detaches its group
        // (sysfs reads the VMM thread's seccomp filter forbids); closing the fds at exit
        // does that, and vfio-pci resets the device again then.
        std::mem::forget(self.device.clone());
    }
}

/// The device's regions through the VFIO device fd.
struct DeviceRegions {
    device: Arc<VfioDevice>,
}

impl VfioRegions for DeviceRegions {
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.device
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, data, offset);
    }

    fn write_config(&self, offset: u64, data: &[u8]) {
        self.device
            .region_write(VFIO_PCI_CONFIG_REGION_INDEX, data, offset);
    }

    fn config_size(&self) -> u64 {
        self.device.get_region_size(VFIO_PCI_CONFIG_REGION_INDEX)
    }

    fn read_bar(&self, bar: usize, offset: u64, data: &mut [u8]) {
        self.device.region_read(bar as u32, data, offset);
    }

    fn write_bar(&self, bar: usize, offset: u64, data: &[u8]) {
        self.device.region_write(bar as u32, data, offset);
    }
}

/// One mmapped piece of a BAR, registered as a KVM memory slot.
struct BarMapping {
    vm: Arc<VmFd>,
    slot: u32,
    /// The BAR (VFIO region index) and where in it the piece starts.
    region: u32,
    offset: u64,
    /// The slot's guest address; `None` while KVM holds no slot for it.
    guest_addr: Option<u64>,
    host: *mut libc::c_void,
    len: u64,
}

// SAFETY: the mapping is plain device memory owned by this value; nothing in it is
// thread-bound, and crib never dereferences it (only KVM and the device touch it).
unsafe impl Send for BarMapping {}

impl BarMapping {
    /// Maps `len` bytes at `offset` of BAR `region` into the guest, for the BAR at
    /// `bar_addr`.
    fn new(
        vm: &Arc<VmFd>,
        device: &VfioDevice,
        slot: u32,
        region: u32,
        offset: u64,
        len: u64,
        bar_addr: u64,
    ) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let size =
            usize::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let file_offset = libc::off_t::try_from(device.get_region_offset(region) + offset)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a new shared mapping of the device fd at an address the kernel picks;
        // it aliases no Rust object. The result is checked.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                device.as_raw_fd(),
                file_offset,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let mut mapping = Self {
            vm: vm.clone(),
            slot,
            region,
            offset,
            guest_addr: None,
            host,
            len,
        };
        mapping.move_to(bar_addr)?;
        Ok(mapping)
    }

    /// Puts the slot at `bar_addr` + the piece's offset (deleting it where it was).
    fn move_to(&mut self, bar_addr: u64) -> std::io::Result<()> {
        if self.guest_addr.take().is_some() {
            self.delete_slot();
        }
        let guest_addr = bar_addr
            .checked_add(self.offset)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let region = kvm_userspace_memory_region {
            slot: self.slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: self.len,
            userspace_addr: self.host as u64,
        };
        // SAFETY: `host` is a live mapping of `len` bytes owned by `self`, whose Drop
        // deletes the slot before unmapping it.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        self.guest_addr = Some(guest_addr);
        Ok(())
    }

    fn delete_slot(&self) {
        let region = kvm_userspace_memory_region {
            slot: self.slot,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: a zero-size region deletes the slot; KVM keeps no host address.
        if let Err(e) = unsafe { self.vm.set_user_memory_region(region) } {
            tracing::debug!("deleting BAR slot {}: {e}", self.slot);
        }
    }
}

impl Drop for BarMapping {
    fn drop(&mut self) {
        if self.guest_addr.take().is_some() {
            self.delete_slot();
        }
        // SAFETY: `host`/`len` are exactly the mapping made in `new`, no longer used by
        // KVM (slot deleted above) and never referenced by Rust code.
        unsafe { libc::munmap(self.host, self.len as usize) };
    }
}

fn no_vector() -> std::io::Error {
    std::io::Error::other("no such MSI-X vector")
}

/// MSI-X of a VFIO device: an irqfd per vector, given to VFIO, bound to a KVM GSI.
struct VfioMsix {
    vm: Arc<VmFd>,
    router: Arc<GsiRouter>,
    device: Arc<VfioDevice>,
    gsis: Vec<u32>,
    irqfds: Vec<EventFd>,
}

impl VfioMsix {
    fn new(
        vm: &Arc<VmFd>,
        router: &Arc<GsiRouter>,
        device: Arc<VfioDevice>,
        vectors: u16,
    ) -> std::io::Result<Self> {
        let gsis = router
            .allocate(u32::from(vectors))
            .map_err(std::io::Error::other)?;
        let irqfds = (0..vectors)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        if device
            .get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX)
            .is_none_or(|irq| irq.count < u32::from(vectors))
        {
            return Err(std::io::Error::other(
                "VFIO reports fewer MSI-X vectors than the capability",
            ));
        }
        Ok(Self {
            vm: vm.clone(),
            router: router.clone(),
            device,
            gsis,
            irqfds,
        })
    }
}

impl MsixControl for VfioMsix {
    fn set_enabled(&mut self, enabled: bool) -> std::io::Result<()> {
        let result = if enabled {
            self.device.enable_msix(self.irqfds.iter().collect())
        } else {
            self.device.disable_msix()
        };
        result.map_err(std::io::Error::other)
    }

    fn set_route(&mut self, vector: u16, addr: u64, data: u32) -> std::io::Result<()> {
        let gsi = self.gsis.get(usize::from(vector)).ok_or_else(no_vector)?;
        self.router.set_msi_route(*gsi, addr, data)
    }

    fn set_connected(&mut self, vector: u16, connected: bool) -> std::io::Result<()> {
        let index = usize::from(vector);
        let (Some(fd), Some(&gsi)) = (self.irqfds.get(index), self.gsis.get(index)) else {
            return Err(no_vector());
        };
        let result = if connected {
            self.vm.register_irqfd(fd, gsi)
        } else {
            self.vm.unregister_irqfd(fd, gsi)
        };
        result.map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// INTx through KVM: VFIO signals `trigger`, an irqfd that raises the line's GSI; the
/// guest's EOI lowers it and signals `resample`, on which VFIO unmasks the host line.
struct VfioIntx {
    vm: Arc<VmFd>,
    device: Arc<VfioDevice>,
    gsi: u32,
    trigger: EventFd,
    resample: EventFd,
    enabled: bool,
}

impl VfioIntx {
    fn new(vm: &Arc<VmFd>, device: Arc<VfioDevice>, gsi: u32) -> std::io::Result<Self> {
        Ok(Self {
            vm: vm.clone(),
            device,
            gsi,
            trigger: EventFd::new(libc::EFD_NONBLOCK)?,
            resample: EventFd::new(libc::EFD_NONBLOCK)?,
            enabled: false,
        })
    }

    fn connect(&self) -> std::io::Result<()> {
        self.vm
            .register_irqfd_with_resample(&self.trigger, &self.resample, self.gsi)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        self.device
            .enable_irq(VFIO_PCI_INTX_IRQ_INDEX, vec![&self.trigger])
            .and_then(|()| {
                self.device
                    .set_irq_resample_fd(VFIO_PCI_INTX_IRQ_INDEX, vec![&self.resample])
            })
            .map_err(std::io::Error::other)
    }

    fn disconnect(&self) -> std::io::Result<()> {
        let vfio = self.device.disable_irq(VFIO_PCI_INTX_IRQ_INDEX);
        let kvm = self.vm.unregister_irqfd(&self.trigger, self.gsi);
        vfio.map_err(std::io::Error::other)?;
        kvm.map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

impl IntxControl for VfioIntx {
    fn set_enabled(&mut self, enabled: bool) -> std::io::Result<()> {
        if enabled == self.enabled {
            return Ok(());
        }
        if enabled {
            if let Err(e) = self.connect() {
                let _ = self.disconnect();
                return Err(e);
            }
        } else {
            self.disconnect()?;
        }
        self.enabled = enabled;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
