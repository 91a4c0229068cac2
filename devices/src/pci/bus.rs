//! PCI segment 0, bus 0: a host bridge in slot 0 and up to 31 devices (function 0 each),
//! reached through configuration mechanism #1 (ports 0xCF8/0xCFC, PCI 3.0 §3.2.2.3.2)
//! or ECAM (PCIe 4.0 §7.2.2, advertised in the ACPI MCFG table).

use std::sync::{Arc, Mutex};

use super::configuration::{PciIdentity, NUM_CONFIGURATION_REGISTERS};
use super::{BarMove, BarRelocation, PciConfiguration, PciDevice};
use crate::bus::BusDevice;

/// Slots on the bus.
pub const PCI_SLOTS: usize = 32;
/// Bytes of ECAM space one bus takes (32 devices x 8 functions x 4 KiB).
pub const ECAM_BUS_BYTES: u64 = 1 << 20;
/// First configuration port; the address register is here, data at +4.
pub const PCI_CONFIG_IO_PORT: u16 = 0xcf8;
/// Ports 0xCF8..=0xCFF.
pub const PCI_CONFIG_IO_LEN: u16 = 8;

/// Errors of bus set-up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("the PCI bus is full: at most {} devices", PCI_SLOTS - 1)]
    BusFull,
}

/// The host bridge: identity only.
struct HostBridge {
    config: PciConfiguration,
}

impl PciDevice for HostBridge {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove> {
        self.config.write_reg(reg, offset, data)
    }

    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// Bus 0 and its devices.
pub struct PciBus {
    slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>>,
    /// Follows BARs the guest moves; without it a move is only logged.
    relocation: Option<Arc<dyn BarRelocation>>,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// A bus with the host bridge in slot 0.
    pub fn new() -> Self {
        let bridge = HostBridge {
            config: PciConfiguration::new(PciIdentity {
                // Red Hat's "QEMU PCIe host bridge" id: guests know it needs no driver.
                vendor_id: 0x1b36,
                device_id: 0x0008,
                class_code: 0x06,
                subclass: 0x00,
                prog_if: 0,
                revision: 0,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            }),
        };
        let mut slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>> = vec![None; PCI_SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(bridge)));
        Self {
            slots,
            relocation: None,
        }
    }

    /// Who follows the BARs the guest moves.
    pub fn set_bar_relocation(&mut self, relocation: Arc<dyn BarRelocation>) {
        self.relocation = Some(relocation);
    }

    /// Puts `device` in the first free slot; returns the slot.
    pub fn add_device(&mut self, device: Arc<Mutex<dyn PciDevice>>) -> Result<u8, PciError> {
        let slot = self.next_slot().ok_or(PciError::BusFull)?;
        self.slots[usize::from(slot)] = Some(device);
        Ok(slot)
    }

    /// The slot the next [`Self::add_device`] will use, if the bus has room.
    pub fn next_slot(&self) -> Option<u8> {
        let slot = self.slots.iter().position(Option::is_none)?;
        u8::try_from(slot).ok()
    }

    fn device(&self, bus: u8, slot: u8, function: u8) -> Option<&Arc<Mutex<dyn PciDevice>>> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots.get(usize::from(slot))?.as_ref()
    }

    /// Runs `f` on the function at bus/slot/function, locked, if there is one.
    fn with_device<R>(
        &self,
        (bus, slot, function): (u8, u8, u8),
        f: impl FnOnce(&mut dyn PciDevice) -> R,
    ) -> Option<R> {
        let device = self.device(bus, slot, function)?;
        let mut device = device.lock().unwrap_or_else(|e| e.into_inner());
        Some(f(&mut *device))
    }

    /// Reads configuration register `reg` of bus/slot/function (64 and up: extended
    /// configuration space); nothing there reads as all ones, which is how the guest
    /// learns a slot is empty.
    pub fn read_config(&self, bus: u8, slot: u8, function: u8, reg: usize) -> u32 {
        self.with_device((bus, slot, function), |d| {
            if reg >= NUM_CONFIGURATION_REGISTERS {
                d.read_extended_config_register(reg)
            } else {
                d.read_config_register(reg)
            }
        })
        .unwrap_or(0xffff_ffff)
    }

    /// Writes configuration space (64 and up: extended configuration space).
    pub fn write_config(
        &self,
        bus: u8,
        slot: u8,
        function: u8,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) {
        // The device's lock is released before the move: following it takes the MMIO
        // bus's write lock, and another vCPU may be in this device's BAR meanwhile.
        let moved = self.with_device((bus, slot, function), |d| {
            if reg >= NUM_CONFIGURATION_REGISTERS {
                // No BAR lives in extended configuration space.
                d.write_extended_config_register(reg, offset, data);
                None
            } else {
                d.write_config_register(reg, offset, data)
            }
        });
        let Some(moved) = moved.flatten() else { return };
        match &self.relocation {
            Some(relocation) => relocation.move_bar(slot, &moved),
            None => tracing::warn!(
                "guest moved BAR {} of PCI device {slot:02x} from {:#x} to {:#x}: not followed, the device will not respond there",
                moved.bar, moved.old, moved.new
            ),
        }
    }
}

fn read_dword_part(value: u32, offset: u64, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    let start = usize::try_from(offset).unwrap_or(4).min(4);
    let end = (start + data.len()).min(4);
    data.fill(0xff);
    data[..end - start].copy_from_slice(&bytes[start..end]);
}

/// Configuration mechanism #1 at ports 0xCF8 (address) and 0xCFC (data).
pub struct PciConfigIo {
    bus: Arc<PciBus>,
    address: u32,
}

impl PciConfigIo {
    pub fn new(bus: Arc<PciBus>) -> Self {
        Self { bus, address: 0 }
    }

    /// (bus, slot, function, register) selected, if the enable bit is set.
    fn target(&self) -> Option<(u8, u8, u8, usize)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (self.address >> 16) as u8;
        let slot = ((self.address >> 11) & 0x1f) as u8;
        let function = ((self.address >> 8) & 0x7) as u8;
        let reg = ((self.address >> 2) & 0x3f) as usize;
        Some((bus, slot, function, reg))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0..=3 => read_dword_part(self.address, offset, data),
            4..=7 => {
                let value = self
                    .target()
                    .map_or(0xffff_ffff, |(bus, slot, function, reg)| {
                        self.bus.read_config(bus, slot, function, reg)
                    });
                read_dword_part(value, offset - 4, data);
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                let mut bytes = [0u8; 4];
                bytes.copy_from_slice(data);
                self.address = u32::from_le_bytes(bytes);
            }
            4..=7 => {
                if let Some((bus, slot, function, reg)) = self.target() {
                    self.bus
                        .write_config(bus, slot, function, reg, offset - 4, data);
                }
            }
            _ => {}
        }
    }
}

/// ECAM: configuration space memory-mapped, 4 KiB per function.
pub struct PciConfigMmio {
    bus: Arc<PciBus>,
}

impl PciConfigMmio {
    pub fn new(bus: Arc<PciBus>) -> Self {
        Self { bus }
    }

    fn decode(offset: u64) -> (u8, u8, u8, usize, u64) {
        let bus = ((offset >> 20) & 0xff) as u8;
        let slot = ((offset >> 15) & 0x1f) as u8;
        let function = ((offset >> 12) & 0x7) as u8;
        let register_offset = offset & 0xfff;
        (
            bus,
            slot,
            function,
            (register_offset / 4) as usize,
            register_offset % 4,
        )
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (bus, slot, function, reg, within) = Self::decode(offset);
        let value = self.bus.read_config(bus, slot, function, reg);
        read_dword_part(value, within, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (bus, slot, function, reg, within) = Self::decode(offset);
        if within as usize + data.len() <= 4 {
            self.bus
                .write_config(bus, slot, function, reg, within, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io() -> PciConfigIo {
        PciConfigIo::new(Arc::new(PciBus::new()))
    }

    fn select(io: &mut PciConfigIo, slot: u32, reg: u32) {
        io.write(0, &(0x8000_0000 | slot << 11 | reg << 2).to_le_bytes());
    }

    #[test]
    fn host_bridge_answers_in_slot_zero() {
        let mut io = io();
        select(&mut io, 0, 0);
        let mut data = [0u8; 4];
        io.read(4, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x0008_1b36);
    }

    #[test]
    fn empty_slot_reads_all_ones() {
        let mut io = io();
        select(&mut io, 5, 0);
        let mut data = [0u8; 4];
        io.read(4, &mut data);
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn address_register_reads_back() {
        let mut io = io();
        select(&mut io, 3, 4);
        let mut data = [0u8; 4];
        io.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x8000_1810);
    }

    #[test]
    fn disabled_address_reads_all_ones() {
        let mut io = io();
        io.write(0, &0u32.to_le_bytes());
        let mut data = [0u8; 2];
        io.read(6, &mut data);
        assert_eq!(data, [0xff; 2]);
    }

    #[test]
    fn ecam_decodes_slot_and_register() {
        let mut mmio = PciConfigMmio::new(Arc::new(PciBus::new()));
        let mut data = [0u8; 2];
        mmio.read(2, &mut data);
        assert_eq!(u16::from_le_bytes(data), 0x0008);
        mmio.read(1 << 15, &mut data);
        assert_eq!(data, [0xff; 2]);
    }

    /// A function with one extended register (0x100) that records what is written there.
    struct ExtendedDevice {
        value: u32,
    }

    impl PciDevice for ExtendedDevice {
        fn read_config_register(&mut self, _reg: usize) -> u32 {
            0
        }

        fn write_config_register(&mut self, _: usize, _: u64, _: &[u8]) -> Option<BarMove> {
            None
        }

        fn read_extended_config_register(&mut self, reg: usize) -> u32 {
            if reg == 64 {
                self.value
            } else {
                0
            }
        }

        fn write_extended_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
            if reg == 64 && offset == 0 && data.len() == 4 {
                self.value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
        }

        fn read_bar(&mut self, _: usize, _: u64, data: &mut [u8]) {
            data.fill(0);
        }

        fn write_bar(&mut self, _: usize, _: u64, _: &[u8]) {}
    }

    #[test]
    fn ecam_reaches_extended_configuration_space() {
        let mut bus = PciBus::new();
        let slot = bus
            .add_device(Arc::new(Mutex::new(ExtendedDevice { value: 0x1234 })))
            .unwrap();
        let mut mmio = PciConfigMmio::new(Arc::new(bus));
        let at = u64::from(slot) << 15 | 0x100;
        let mut data = [0u8; 4];
        mmio.read(at, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x1234);
        mmio.write(at, &0xabcdu32.to_le_bytes());
        mmio.read(at, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0xabcd);
        // Devices without extended capabilities read zero there; empty slots all ones.
        mmio.read(0x100, &mut data);
        assert_eq!(data, [0; 4]);
        mmio.read(5 << 15 | 0x100, &mut data);
        assert_eq!(data, [0xff; 4]);
    }

    /// Configuration space of a plain function with device id `device_id`.
    fn dummy_config(device_id: u16) -> PciConfiguration {
        PciConfiguration::new(PciIdentity {
            vendor_id: 1,
            device_id,
            class_code: 0,
            subclass: 0,
            prog_if: 0,
            revision: 0,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
        })
    }

    fn dummy_device() -> Arc<Mutex<dyn PciDevice>> {
        Arc::new(Mutex::new(HostBridge {
            config: dummy_config(1),
        }))
    }

    #[test]
    fn bus_fills_up() {
        let mut bus = PciBus::new();
        for _ in 1..PCI_SLOTS {
            bus.add_device(dummy_device()).unwrap();
        }
        assert_eq!(bus.add_device(dummy_device()), Err(PciError::BusFull));
    }

    /// Records the moves the bus reports.
    #[derive(Default)]
    struct RecordingRelocation {
        moves: Mutex<Vec<(u8, BarMove)>>,
    }

    impl BarRelocation for RecordingRelocation {
        fn move_bar(&self, slot: u8, moved: &BarMove) {
            self.moves.lock().unwrap().push((slot, *moved));
        }
    }

    #[test]
    fn bar_moves_reach_the_relocation_with_the_slot_and_sizing_does_not() {
        let mut config = dummy_config(2);
        config
            .add_bar(super::super::BarRegion {
                index: 0,
                addr: 0xc000_0000,
                size: 0x1_0000,
                is_64bit: false,
                prefetchable: false,
            })
            .unwrap();
        let mut bus = PciBus::new();
        let slot = bus
            .add_device(Arc::new(Mutex::new(HostBridge { config })))
            .unwrap();
        let relocation = Arc::new(RecordingRelocation::default());
        bus.set_bar_relocation(relocation.clone());
        let mut io = PciConfigIo::new(Arc::new(bus));
        select(&mut io, u32::from(slot), 4);
        // Sizing: all ones, read the mask, restore.
        io.write(4, &[0xff; 4]);
        let mut size = [0u8; 4];
        io.read(4, &mut size);
        assert_eq!(u32::from_le_bytes(size), 0xffff_0000);
        io.write(4, &0xc000_0000u32.to_le_bytes());
        assert!(relocation.moves.lock().unwrap().is_empty());
        // A move.
        io.write(4, &0xd000_0000u32.to_le_bytes());
        let moves = relocation.moves.lock().unwrap();
        assert_eq!(
            moves.as_slice(),
            &[(
                slot,
                BarMove {
                    bar: 0,
                    old: 0xc000_0000,
                    new: 0xd000_0000,
                    size: 0x1_0000
                }
            )]
        );
    }
}
