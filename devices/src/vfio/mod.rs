//! A host PCI function passed through with VFIO, as the guest sees it: the device's own
//! configuration space with its BARs virtualized (sizes from the device, addresses chosen
//! by the VMM), the expansion ROM hidden, INTx routed while MSI-X is off, extended
//! capabilities passed through less a few (see [`ExtendedConfig`]), and the MSI-X table
//! trapped and turned into KVM MSI routes. Everything that touches the host (the VFIO
//! device fd, KVM irqfds and memory slots) sits behind [`VfioRegions`], [`MsixControl`]
//! and [`IntxControl`], implemented by the VMM, so this logic is tested against fakes.

use std::io;

use crate::pci::configuration::{BarRegion, ConfigurationError, PciConfiguration, PciIdentity};
use crate::pci::msix::{MSIX_CAPABILITY_ID, MSIX_TABLE_ENTRY_BYTES};
use crate::pci::{BarMove, PciDevice};

mod extended;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub use extended::ExtendedConfig;

/// BARs of a type-0 function.
pub const NUM_BARS: usize = 6;
const BAR0_OFFSET: u64 = 0x10;
const BAR0_REG: usize = 4;
const ROM_REG: usize = 12;
const CAPABILITY_POINTER_OFFSET: u64 = 0x34;
const INTERRUPT_REG: usize = 15;
const COMMAND_REG: usize = 1;
const COMMAND_BUS_MASTER: u8 = 1 << 2;
const BAR_IO: u32 = 0x1;
const BAR_MEM_TYPE_MASK: u32 = 0x6;
const BAR_MEM_TYPE_64: u32 = 0x4;
const BAR_PREFETCHABLE: u32 = 0x8;
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_CAPABILITY_BYTES: u64 = 12;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_CONTROL_MASK: u32 = 1;
/// Smallest BAR crib maps: one page, so KVM slots and traps never share a page.
pub const MIN_BAR_SIZE: u64 = 0x1000;

/// The device's VFIO regions: configuration space and BARs.
pub trait VfioRegions: Send {
    /// Reads configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes configuration space at `offset` (the kernel's vfio-pci filters what it must).
    fn write_config(&self, offset: u64, data: &[u8]);
    /// Bytes of configuration space the device has: 4096 for PCI Express, else 256.
    fn config_size(&self) -> u64;
    /// Reads BAR `bar` at `offset`; the caller keeps the access inside the region.
    fn read_bar(&self, bar: usize, offset: u64, data: &mut [u8]);
    /// Writes BAR `bar` at `offset`; the caller keeps the access inside the region.
    fn write_bar(&self, bar: usize, offset: u64, data: &[u8]);
}

/// MSI-X delivery for a passed-through device, implemented by the VMM: each vector is an
/// irqfd that VFIO signals directly, bound to a KVM GSI routed to the guest's message.
pub trait MsixControl: Send {
    /// Enables MSI-X on the device with every vector signalling its irqfd, or disables it.
    fn set_enabled(&mut self, enabled: bool) -> io::Result<()>;
    /// Routes `vector`'s GSI to the MSI message (`addr`, `data`).
    fn set_route(&mut self, vector: u16, addr: u64, data: u32) -> io::Result<()>;
    /// Connects `vector`'s irqfd to its GSI (unmasked), or disconnects it (masked: the
    /// eventfd keeps counting, and KVM delivers what arrived when it is connected again).
    fn set_connected(&mut self, vector: u16, connected: bool) -> io::Result<()>;
}

/// The device's INTx line, implemented by the VMM: VFIO signals an eventfd that a KVM
/// irqfd turns into a level on the line's IO-APIC pin, and the guest's EOI unmasks the
/// line again through a resample eventfd, all without crib.
pub trait IntxControl: Send {
    /// Connects the line to the guest, or disconnects it. VFIO allows INTx and MSI-X not
    /// both at once: the line is connected whenever MSI-X is off.
    fn set_enabled(&mut self, enabled: bool) -> io::Result<()>;
}

/// Whether guest RAM is DMA-mapped for passed-through devices yet: the VMM maps it while
/// the guest boots. A device cannot DMA before the guest sets Bus Master Enable (it comes
/// out of reset with it clear), so that is the one write that waits for the map.
pub trait DmaReadiness: Send + Sync {
    /// Blocks until guest RAM is mapped; false if mapping it failed.
    fn wait_mapped(&self) -> bool;
}

/// Where the device keeps its MSI-X table and PBA (PCI 3.0 §6.8.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCapability {
    /// Offset of the capability in configuration space.
    pub offset: u64,
    pub vectors: u16,
    pub table_bar: usize,
    pub table_offset: u64,
    pub pba_bar: usize,
    pub pba_offset: u64,
}

impl MsixCapability {
    /// Bytes of the table.
    pub fn table_len(&self) -> u64 {
        u64::from(self.vectors) * MSIX_TABLE_ENTRY_BYTES
    }

    /// Bytes of the PBA (one bit per vector, in qwords).
    pub fn pba_len(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }

    /// Page-aligned ranges (offset, length) of `bar` that must be trapped, not mapped.
    pub fn trapped_pages(&self, bar: usize, page: u64) -> Vec<(u64, u64)> {
        let mut ranges = Vec::new();
        for (b, offset, len) in [
            (self.table_bar, self.table_offset, self.table_len()),
            (self.pba_bar, self.pba_offset, self.pba_len()),
        ] {
            if b == bar && len > 0 {
                let start = offset & !(page - 1);
                let end = (offset + len).div_ceil(page) * page;
                ranges.push((start, end - start));
            }
        }
        ranges.sort_unstable();
        // Table and PBA often share a page: merge.
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (start, len) in ranges {
            match merged.last_mut() {
                Some((s, l)) if *s + *l >= start => *l = (*l).max(start + len - *s),
                _ => merged.push((start, len)),
            }
        }
        merged
    }
}

/// Reads a little-endian value of configuration space.
fn config_u32(regions: &dyn VfioRegions, offset: u64) -> u32 {
    let mut bytes = [0u8; 4];
    regions.read_config(offset, &mut bytes);
    u32::from_le_bytes(bytes)
}

/// The device's INTx pin (1 = INTA .. 4 = INTD), or 0 for none.
pub fn interrupt_pin(regions: &dyn VfioRegions) -> u8 {
    let pin = (config_u32(regions, 0x3c) >> 8) as u8;
    if (1..=4).contains(&pin) {
        pin
    } else {
        0
    }
}

/// Walks the device's capability list for MSI-X. A malformed list (a loop, a pointer
/// into the header) ends the walk.
pub fn find_msix(regions: &dyn VfioRegions) -> Option<MsixCapability> {
    let status = config_u32(regions, 4) >> 16;
    if status & 0x10 == 0 {
        return None;
    }
    let mut pointer = u64::from(config_u32(regions, CAPABILITY_POINTER_OFFSET) as u8) & !3;
    // At most 48 capabilities fit in 192 bytes.
    for _ in 0..48 {
        if pointer < 0x40 {
            return None;
        }
        let header = config_u32(regions, pointer);
        // The 12-byte capability must fit in the 256 bytes a conventional function has.
        if header as u8 == MSIX_CAPABILITY_ID && pointer + MSIX_CAPABILITY_BYTES <= 0x100 {
            let table = config_u32(regions, pointer + 4);
            let pba = config_u32(regions, pointer + 8);
            return Some(MsixCapability {
                offset: pointer,
                vectors: ((header >> 16) as u16 & 0x7ff) + 1,
                table_bar: (table & 7) as usize,
                table_offset: u64::from(table & !7),
                pba_bar: (pba & 7) as usize,
                pba_offset: u64::from(pba & !7),
            });
        }
        pointer = u64::from((header >> 8) as u8) & !3;
    }
    None
}

/// A memory BAR of the device, from its BAR register and VFIO region size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceBar {
    pub index: usize,
    /// The VFIO region's size (what the device decodes).
    pub region_size: u64,
    /// The size the guest sees: a power of two of at least one page.
    pub size: u64,
    pub is_64bit: bool,
    pub prefetchable: bool,
}

/// The device's memory BARs. I/O BARs are skipped (and read as zero): crib gives guests
/// no I/O space for devices. `region_size(i)` is VFIO's size of region i.
pub fn probe_bars(
    regions: &dyn VfioRegions,
    region_size: impl Fn(usize) -> u64,
) -> (Vec<DeviceBar>, Vec<usize>) {
    let mut bars = Vec::new();
    let mut skipped_io = Vec::new();
    let mut index = 0;
    while index < NUM_BARS {
        let value = config_u32(regions, BAR0_OFFSET + 4 * index as u64);
        let size = region_size(index);
        let is_64bit = value & BAR_IO == 0 && value & BAR_MEM_TYPE_MASK == BAR_MEM_TYPE_64;
        if size == 0 {
            index += 1;
            continue;
        }
        if value & BAR_IO != 0 {
            skipped_io.push(index);
            index += 1;
            continue;
        }
        bars.push(DeviceBar {
            index,
            region_size: size,
            size: size.max(MIN_BAR_SIZE).next_power_of_two(),
            is_64bit: is_64bit && index + 1 < NUM_BARS,
            prefetchable: value & BAR_PREFETCHABLE != 0,
        });
        index += if is_64bit { 2 } else { 1 };
    }
    (bars, skipped_io)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct TableEntry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

/// The guest's view of the MSI-X table, turned into calls on [`MsixControl`].
pub struct MsixTable {
    entries: Vec<TableEntry>,
    routed: Vec<Option<(u64, u32)>>,
    connected: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    control: Box<dyn MsixControl>,
}

impl MsixTable {
    /// `vectors` entries, all masked, MSI-X disabled (the state after reset).
    pub fn new(vectors: u16, control: Box<dyn MsixControl>) -> Self {
        let count = usize::from(vectors);
        Self {
            entries: vec![
                TableEntry {
                    control: VECTOR_CONTROL_MASK,
                    ..Default::default()
                };
                count
            ],
            routed: vec![None; count],
            connected: vec![false; count],
            enabled: false,
            function_masked: false,
            control,
        }
    }

    /// Applies the message control word the guest wrote.
    pub fn set_message_control(&mut self, control: u16) {
        let enabled = control & MSIX_ENABLE != 0;
        self.function_masked = control & MSIX_FUNCTION_MASK != 0;
        if enabled != self.enabled {
            if !enabled {
                // Disconnect first: nothing reaches the guest once it disabled MSI-X.
                self.enabled = false;
                self.sync_all();
            }
            match self.control.set_enabled(enabled) {
                Ok(()) => self.enabled = enabled,
                Err(e) => tracing::error!(
                    "cannot {} MSI-X on the passed-through device: {e}",
                    if enabled { "enable" } else { "disable" }
                ),
            }
        }
        self.sync_all();
    }

    fn sync_all(&mut self) {
        for index in 0..self.entries.len() {
            self.sync(index);
        }
    }

    /// Brings the route and the irqfd connection of vector `index` in line with the guest.
    fn sync(&mut self, index: usize) {
        let entry = self.entries[index];
        let deliver =
            self.enabled && !self.function_masked && entry.control & VECTOR_CONTROL_MASK == 0;
        let Ok(vector) = u16::try_from(index) else {
            return;
        };
        if deliver {
            let route = (
                u64::from(entry.addr_hi) << 32 | u64::from(entry.addr_lo),
                entry.data,
            );
            if self.routed[index] != Some(route) {
                match self.control.set_route(vector, route.0, route.1) {
                    Ok(()) => self.routed[index] = Some(route),
                    Err(e) => {
                        tracing::error!("cannot route MSI-X vector {index}: {e}");
                        return;
                    }
                }
            }
        }
        if deliver != self.connected[index] {
            match self.control.set_connected(vector, deliver) {
                Ok(()) => self.connected[index] = deliver,
                Err(e) => tracing::error!(
                    "cannot {} MSI-X vector {index}: {e}",
                    if deliver { "unmask" } else { "mask" }
                ),
            }
        }
    }

    /// Entry index and byte offset, for an aligned access of 1, 2, 4 or 8 bytes within
    /// one entry.
    fn locate(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        let index = usize::try_from(offset / MSIX_TABLE_ENTRY_BYTES).ok()?;
        let field = (offset % MSIX_TABLE_ENTRY_BYTES) as usize;
        let aligned =
            matches!(len, 1 | 2 | 4 | 8) && field.is_multiple_of(len.min(4)) && field + len <= 16;
        (index < self.entries.len() && aligned).then_some((index, field))
    }

    fn entry_bytes(entry: &TableEntry) -> [u8; 16] {
        let mut bytes = [0u8; 16];
        for (i, w) in [entry.addr_lo, entry.addr_hi, entry.data, entry.control]
            .iter()
            .enumerate()
        {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        bytes
    }

    /// Reads the table; a bad access reads zeros.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some((index, field)) = self.locate(offset, data.len()) {
            let bytes = Self::entry_bytes(&self.entries[index]);
            data.copy_from_slice(&bytes[field..field + data.len()]);
        }
    }

    /// Writes the table; a bad access is ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let Some((index, field)) = self.locate(offset, data.len()) else {
            tracing::debug!(
                "ignored MSI-X table write of {} bytes at {offset:#x}",
                data.len()
            );
            return;
        };
        let mut bytes = Self::entry_bytes(&self.entries[index]);
        bytes[field..field + data.len()].copy_from_slice(data);
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        self.entries[index] = TableEntry {
            addr_lo: word(0),
            addr_hi: word(4),
            data: word(8),
            control: word(12),
        };
        self.sync(index);
    }

    /// Whether vector `index` reaches the guest now (for tests and debugging).
    pub fn is_connected(&self, index: usize) -> bool {
        self.connected.get(index).copied().unwrap_or(false)
    }
}

/// Errors building the guest's view of a passed-through device.
#[derive(Debug, thiserror::Error)]
pub enum VfioPciError {
    #[error("BAR {index} of the device cannot be presented to the guest")]
    Bar {
        index: usize,
        #[source]
        source: ConfigurationError,
    },
    #[error("the device's MSI-X table is in BAR {bar}, which is not a memory BAR crib maps")]
    MsixBar { bar: usize },
}

/// A passed-through PCI function on crib's bus.
pub struct VfioPciDevice {
    name: String,
    regions: Box<dyn VfioRegions>,
    /// Only the BAR registers of this are used: the guest-visible addresses and sizing.
    bars: PciConfiguration,
    region_sizes: [u64; NUM_BARS],
    msix: Option<(MsixCapability, MsixTable)>,
    /// The enable and function-mask bits of MSI-X message control as the guest wrote
    /// them: vfio-pci keeps the device's own read-only (it enables MSI-X itself, through
    /// VFIO_DEVICE_SET_IRQS), so crib emulates them.
    msix_control: u16,
    extended: ExtendedConfig,
    /// Guest RAM's DMA map, waited for before bus mastering is enabled.
    dma: Option<std::sync::Arc<dyn DmaReadiness>>,
    /// The INTx line, if the device has one and the VMM routes it.
    intx: Option<Box<dyn IntxControl>>,
}

impl VfioPciDevice {
    /// `bars` with the guest addresses the VMM gave them (`addrs[i]` for `bars[i]`).
    pub fn new(
        name: String,
        regions: Box<dyn VfioRegions>,
        bars: &[(DeviceBar, u64)],
        msix: Option<(MsixCapability, MsixTable)>,
    ) -> Result<Self, VfioPciError> {
        let mut config = PciConfiguration::new(PciIdentity {
            vendor_id: 0,
            device_id: 0,
            class_code: 0,
            subclass: 0,
            prog_if: 0,
            revision: 0,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
        });
        let mut region_sizes = [0u64; NUM_BARS];
        for (bar, addr) in bars {
            config
                .add_bar(BarRegion {
                    index: bar.index,
                    addr: *addr,
                    size: bar.size,
                    is_64bit: bar.is_64bit,
                    prefetchable: bar.prefetchable,
                })
                .map_err(|source| VfioPciError::Bar {
                    index: bar.index,
                    source,
                })?;
            region_sizes[bar.index] = bar.region_size;
        }
        if let Some((cap, _)) = &msix {
            for bar in [cap.table_bar, cap.pba_bar] {
                if region_sizes.get(bar).is_none_or(|s| *s == 0) {
                    return Err(VfioPciError::MsixBar { bar });
                }
            }
        }
        let extended = ExtendedConfig::probe(regions.as_ref(), regions.config_size());
        Ok(Self {
            name,
            regions,
            bars: config,
            region_sizes,
            msix,
            msix_control: 0,
            extended,
            dma: None,
            intx: None,
        })
    }

    /// Gives the guest the device's INTx pin, connected through `intx` while MSI-X is
    /// off (from now: a device out of reset has MSI-X disabled).
    pub fn set_intx(&mut self, mut intx: Box<dyn IntxControl>) {
        match intx.set_enabled(true) {
            Ok(()) => self.intx = Some(intx),
            Err(e) => tracing::warn!("{}: INTx not routed, MSI-X only: {e}", self.name),
        }
    }

    fn set_intx_enabled(&mut self, enabled: bool) {
        if let Some(intx) = &mut self.intx {
            if let Err(e) = intx.set_enabled(enabled) {
                tracing::error!(
                    "{}: cannot {} INTx: {e}",
                    self.name,
                    if enabled { "enable" } else { "disable" }
                );
            }
        }
    }

    /// Makes the guest's Bus Master Enable wait for `dma` (and stay clear if it failed).
    pub fn set_dma_readiness(&mut self, dma: std::sync::Arc<dyn DmaReadiness>) {
        self.dma = Some(dma);
    }

    /// Whether a command-register write that sets Bus Master Enable may reach the device.
    fn bus_master_allowed(&self) -> bool {
        match &self.dma {
            Some(dma) if !dma.wait_mapped() => {
                tracing::error!(
                    "{}: guest RAM is not DMA-mapped: bus mastering stays off",
                    self.name
                );
                false
            }
            _ => true,
        }
    }

    /// The guest-visible BARs.
    pub fn bars(&self) -> Vec<BarRegion> {
        self.bars.bars().collect()
    }

    /// Folds a configuration write into the emulated MSI-X enable/mask bits; true if it
    /// touched them.
    fn write_msix_control(&mut self, reg: usize, offset: u64, data: &[u8]) -> bool {
        let Some((cap, _)) = self.msix.as_ref() else {
            return false;
        };
        let control = cap.offset + 2;
        let mut bytes = self.msix_control.to_le_bytes();
        let mut touched = false;
        for (i, byte) in data.iter().enumerate() {
            let at = reg as u64 * 4 + offset + i as u64;
            if at == control + 1 {
                bytes[1] = *byte;
                touched = true;
            } else if at == control {
                touched = true;
            }
        }
        self.msix_control = u16::from_le_bytes(bytes) & (MSIX_ENABLE | MSIX_FUNCTION_MASK);
        touched
    }
}

impl PciDevice for VfioPciDevice {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        match reg {
            BAR0_REG..=9 => self.bars.read_reg(reg),
            // No expansion ROM: crib has no firmware to run it.
            ROM_REG => 0,
            // The device's interrupt pin if its INTx is routed, else 0 (MSI-X only).
            INTERRUPT_REG => {
                let value = config_u32(self.regions.as_ref(), 0x3c);
                if self.intx.is_some() {
                    value
                } else {
                    value & !0xff00
                }
            }
            0..=63 => {
                let value = config_u32(self.regions.as_ref(), reg as u64 * 4);
                match &self.msix {
                    Some((cap, _)) if (cap.offset + 2) / 4 == reg as u64 => {
                        let shift = ((cap.offset + 2) % 4) * 8;
                        let bits = u32::from(MSIX_ENABLE | MSIX_FUNCTION_MASK) << shift;
                        (value & !bits) | (u32::from(self.msix_control) << shift)
                    }
                    _ => value,
                }
            }
            _ => 0xffff_ffff,
        }
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove> {
        match reg {
            BAR0_REG..=9 => return self.bars.write_reg(reg, offset, data),
            ROM_REG => return None,
            0..=63 if offset + data.len() as u64 <= 4 => {}
            _ => return None,
        }
        let sets_bus_master = reg == COMMAND_REG
            && offset == 0
            && data.first().is_some_and(|b| b & COMMAND_BUS_MASTER != 0);
        if sets_bus_master && !self.bus_master_allowed() {
            let mut held = data.to_vec();
            held[0] &= !COMMAND_BUS_MASTER;
            self.regions.write_config(reg as u64 * 4 + offset, &held);
            return None;
        }
        self.regions.write_config(reg as u64 * 4 + offset, data);
        let was_enabled = self.msix_control & MSIX_ENABLE != 0;
        if self.write_msix_control(reg, offset, data) {
            let control = self.msix_control;
            let enabled = control & MSIX_ENABLE != 0;
            // INTx off before MSI-X goes on, and back on after MSI-X goes off.
            if enabled && !was_enabled {
                self.set_intx_enabled(false);
            }
            if let Some((_, table)) = &mut self.msix {
                table.set_message_control(control);
            }
            if was_enabled && !enabled {
                self.set_intx_enabled(true);
            }
        }
        None
    }

    fn read_extended_config_register(&mut self, reg: usize) -> u32 {
        self.extended.read(self.regions.as_ref(), reg)
    }

    fn write_extended_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.extended
            .write(self.regions.as_ref(), reg, offset, data);
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if let Some((cap, table)) = &self.msix {
            if bar == cap.table_bar
                && offset >= cap.table_offset
                && offset < cap.table_offset + cap.table_len()
            {
                table.read(offset - cap.table_offset, data);
                return;
            }
        }
        let size = self.region_sizes.get(bar).copied().unwrap_or(0);
        if offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= size)
        {
            self.regions.read_bar(bar, offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if let Some((cap, table)) = &mut self.msix {
            if bar == cap.table_bar
                && offset >= cap.table_offset
                && offset < cap.table_offset + cap.table_len()
            {
                table.write(offset - cap.table_offset, data);
                return;
            }
            // The PBA is read-only.
            if bar == cap.pba_bar
                && offset >= cap.pba_offset
                && offset < cap.pba_offset + cap.pba_len()
            {
                return;
            }
        }
        let size = self.region_sizes.get(bar).copied().unwrap_or(0);
        if offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= size)
        {
            self.regions.write_bar(bar, offset, data);
        } else {
            tracing::debug!("{}: ignored write past BAR {bar} at {offset:#x}", self.name);
        }
    }
}

#[cfg(test)]
mod tests;

/// One BAR of a [`VfioPciDevice`] on the MMIO bus: the accesses KVM memory slots do not
/// take (the MSI-X table and PBA pages, and BARs VFIO does not let crib map).
pub struct VfioBarTrap {
    device: std::sync::Arc<std::sync::Mutex<VfioPciDevice>>,
    bar: usize,
}

impl VfioBarTrap {
    pub fn new(device: std::sync::Arc<std::sync::Mutex<VfioPciDevice>>, bar: usize) -> Self {
        Self { device, bar }
    }
}

impl crate::bus::BusDevice for VfioBarTrap {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read_bar(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_bar(self.bar, offset, data);
    }
}
