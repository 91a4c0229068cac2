//! A type-0 PCI configuration space (PCI Local Bus 3.0 §6): header registers with their
//! write masks, memory BARs (sizing by writing all ones, relocation), and a capability
//! list in the device-specific area.

use super::BarMove;

/// Registers (dwords) in the 256-byte configuration space.
pub const NUM_CONFIGURATION_REGISTERS: usize = 64;
const STATUS_COMMAND_REG: usize = 1;
const CLASS_REVISION_REG: usize = 2;
const HEADER_TYPE_REG: usize = 3;
const BAR0_REG: usize = 4;
const NUM_BARS: usize = 6;
const SUBSYSTEM_REG: usize = 11;
const CAPABILITY_POINTER_REG: usize = 13;
const INTERRUPT_LINE_REG: usize = 15;
/// Status register bit: the function has a capability list.
const STATUS_CAPABILITIES_LIST: u32 = 1 << 20;
/// Command register bits the guest may change: I/O, memory, bus master, INTx disable.
const COMMAND_WRITABLE: u32 = 0x0407;
/// First byte of the capability area.
const FIRST_CAPABILITY_OFFSET: usize = 0x40;
const BAR_MEM_64BIT: u32 = 0x4;
const BAR_PREFETCHABLE: u32 = 0x8;

/// One memory BAR the device exposes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRegion {
    /// BAR index (0..6); a 64-bit BAR also uses index + 1.
    pub index: usize,
    /// Guest-physical address the VMM placed it at.
    pub addr: u64,
    /// Size in bytes, a power of two of at least 4 KiB.
    pub size: u64,
    pub is_64bit: bool,
    pub prefetchable: bool,
}

/// Errors building a configuration space.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigurationError {
    #[error("BAR {index} size {size:#x} must be a power of two of at least 4 KiB")]
    BarSize { index: usize, size: u64 },
    #[error("BAR {index} at {addr:#x} is not aligned to its size")]
    BarAlignment { index: usize, addr: u64 },
    #[error("BAR {index} is already in use or out of range")]
    BarInUse { index: usize },
    #[error("capability of {len} bytes does not fit in configuration space")]
    CapabilitySpace { len: usize },
}

/// The configuration space of one function.
#[derive(Clone, Debug)]
pub struct PciConfiguration {
    registers: [u32; NUM_CONFIGURATION_REGISTERS],
    writable: [u32; NUM_CONFIGURATION_REGISTERS],
    bars: [Option<BarRegion>; NUM_BARS],
    /// Set while the guest sizes a BAR (wrote all ones to it).
    next_capability: usize,
    last_capability: Option<usize>,
}

/// Identity of a function.
#[derive(Clone, Copy, Debug)]
pub struct PciIdentity {
    pub vendor_id: u16,
    pub device_id: u16,
    pub class_code: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub revision: u8,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

impl PciConfiguration {
    /// A function with `identity` and no BARs or capabilities yet.
    pub fn new(identity: PciIdentity) -> Self {
        let mut registers = [0u32; NUM_CONFIGURATION_REGISTERS];
        let mut writable = [0u32; NUM_CONFIGURATION_REGISTERS];
        registers[0] = u32::from(identity.device_id) << 16 | u32::from(identity.vendor_id);
        registers[CLASS_REVISION_REG] = u32::from(identity.class_code) << 24
            | u32::from(identity.subclass) << 16
            | u32::from(identity.prog_if) << 8
            | u32::from(identity.revision);
        registers[SUBSYSTEM_REG] =
            u32::from(identity.subsystem_id) << 16 | u32::from(identity.subsystem_vendor_id);
        writable[STATUS_COMMAND_REG] = COMMAND_WRITABLE;
        // Interrupt line is scratch space for the OS.
        writable[INTERRUPT_LINE_REG] = 0xff;
        Self {
            registers,
            writable,
            bars: [None; NUM_BARS],
            next_capability: FIRST_CAPABILITY_OFFSET,
            last_capability: None,
        }
    }

    /// Marks the function as a PCI-to-host bridge's header or a plain device (type 0).
    pub fn set_header_type(&mut self, header_type: u8) {
        self.registers[HEADER_TYPE_REG] =
            (self.registers[HEADER_TYPE_REG] & !0x00ff_0000) | u32::from(header_type) << 16;
    }

    /// Adds a memory BAR at its VMM-chosen address.
    pub fn add_bar(&mut self, bar: BarRegion) -> Result<(), ConfigurationError> {
        let BarRegion {
            index, addr, size, ..
        } = bar;
        if size < 0x1000 || !size.is_power_of_two() {
            return Err(ConfigurationError::BarSize { index, size });
        }
        if addr & (size - 1) != 0 {
            return Err(ConfigurationError::BarAlignment { index, addr });
        }
        let last = if bar.is_64bit { index + 1 } else { index };
        if last >= NUM_BARS
            || self.bars[index].is_some()
            || (bar.is_64bit && self.bars[last].is_some())
        {
            return Err(ConfigurationError::BarInUse { index });
        }
        let mut low_flags = 0;
        if bar.is_64bit {
            low_flags |= BAR_MEM_64BIT;
        }
        if bar.prefetchable {
            low_flags |= BAR_PREFETCHABLE;
        }
        let mask = !(size - 1);
        self.registers[BAR0_REG + index] = (addr as u32 & !0xf) | low_flags;
        self.writable[BAR0_REG + index] = mask as u32 & !0xf;
        if bar.is_64bit {
            self.registers[BAR0_REG + index + 1] = (addr >> 32) as u32;
            self.writable[BAR0_REG + index + 1] = (mask >> 32) as u32;
        }
        self.bars[index] = Some(bar);
        Ok(())
    }

    /// The BARs as currently programmed by the guest.
    pub fn bars(&self) -> impl Iterator<Item = BarRegion> + '_ {
        self.bars.iter().flatten().copied()
    }

    /// Which BAR (index, offset within it) contains `addr`, if any.
    pub fn bar_at(&self, addr: u64) -> Option<(usize, u64)> {
        self.bars()
            .find(|b| addr >= b.addr && addr - b.addr < b.size)
            .map(|b| (b.index, addr - b.addr))
    }

    /// Appends a capability: `body` starts with the capability id, and its next pointer
    /// (the second byte) is filled here. Returns the capability's offset in configuration
    /// space. `writable` gives per-byte write masks for the body (same length), or none.
    pub fn add_capability(
        &mut self,
        body: &[u8],
        writable: Option<&[u8]>,
    ) -> Result<usize, ConfigurationError> {
        let len = body.len();
        let offset = self.next_capability;
        let end = offset + len;
        if len < 2 || end > NUM_CONFIGURATION_REGISTERS * 4 {
            return Err(ConfigurationError::CapabilitySpace { len });
        }
        for (i, byte) in body.iter().enumerate() {
            let value = if i == 1 { 0 } else { *byte };
            self.set_byte(offset + i, value);
            if let Some(mask) = writable.and_then(|w| w.get(i)) {
                self.set_writable_byte(offset + i, *mask);
            }
        }
        match self.last_capability {
            Some(last) => self.set_byte(last + 1, offset as u8),
            None => {
                self.registers[CAPABILITY_POINTER_REG] = offset as u32;
                self.registers[STATUS_COMMAND_REG] |= STATUS_CAPABILITIES_LIST;
            }
        }
        self.last_capability = Some(offset);
        // Capabilities are dword aligned.
        self.next_capability = (end + 3) & !3;
        Ok(offset)
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = (offset % 4) * 8;
        let reg = &mut self.registers[offset / 4];
        *reg = (*reg & !(0xff << shift)) | u32::from(value) << shift;
    }

    fn set_writable_byte(&mut self, offset: usize, mask: u8) {
        let shift = (offset % 4) * 8;
        let reg = &mut self.writable[offset / 4];
        *reg = (*reg & !(0xff << shift)) | u32::from(mask) << shift;
    }

    /// Reads register `reg`; out of range reads as all ones.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.registers.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    /// The command register (memory space enable is bit 1, bus master bit 2).
    pub fn command(&self) -> u16 {
        self.registers[STATUS_COMMAND_REG] as u16
    }

    /// Writes `data` (1, 2 or 4 bytes) at `offset` within register `reg`, honouring the
    /// write masks. Returns a BAR move when the write completed a relocation.
    pub fn write_reg(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove> {
        let offset = usize::try_from(offset).ok()?;
        if reg >= NUM_CONFIGURATION_REGISTERS || offset + data.len() > 4 || data.is_empty() {
            return None;
        }
        let mut value_bytes = self.registers[reg].to_le_bytes();
        let mask_bytes = self.writable[reg].to_le_bytes();
        for (i, byte) in data.iter().enumerate() {
            let at = offset + i;
            value_bytes[at] = (value_bytes[at] & !mask_bytes[at]) | (byte & mask_bytes[at]);
        }
        self.registers[reg] = u32::from_le_bytes(value_bytes);
        // Writing all ones is BAR sizing (the guest then restores the old value).
        if (BAR0_REG..BAR0_REG + NUM_BARS).contains(&reg) && !data.iter().all(|b| *b == 0xff) {
            return self.detect_bar_move(reg - BAR0_REG);
        }
        None
    }

    /// After a BAR register write: if the BAR now holds a new, complete address (not the
    /// all-ones sizing pattern), record and report the move.
    fn detect_bar_move(&mut self, reg_index: usize) -> Option<BarMove> {
        // The write may be to the high half of a 64-bit BAR.
        let index = match self.bars[reg_index] {
            Some(_) => reg_index,
            None => reg_index
                .checked_sub(1)
                .filter(|i| self.bars[*i].is_some_and(|b| b.is_64bit))?,
        };
        let mut bar = self.bars[index]?;
        let low = u64::from(self.registers[BAR0_REG + index] & !0xf);
        let high = if bar.is_64bit {
            u64::from(self.registers[BAR0_REG + index + 1])
        } else {
            0
        };
        let new = high << 32 | low;
        // Mid-sizing (the other half still holds its size mask): not an address yet.
        let mask = !(bar.size - 1);
        let sizing = low == mask & 0xffff_fff0
            || (bar.is_64bit && high == mask >> 32 && high != bar.addr >> 32);
        if sizing || new == bar.addr || new == 0 {
            return None;
        }
        let old = bar.addr;
        bar.addr = new;
        self.bars[index] = Some(bar);
        Some(BarMove {
            bar: index,
            old,
            new,
            size: bar.size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> PciIdentity {
        PciIdentity {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            class_code: 0x01,
            subclass: 0x80,
            prog_if: 0,
            revision: 1,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        }
    }

    fn config_with_bar() -> PciConfiguration {
        let mut config = PciConfiguration::new(identity());
        config
            .add_bar(BarRegion {
                index: 0,
                addr: 0xc000_0000,
                size: 0x1_0000,
                is_64bit: true,
                prefetchable: false,
            })
            .unwrap();
        config
    }

    #[test]
    fn ids_and_class_are_readable() {
        let config = PciConfiguration::new(identity());
        assert_eq!(config.read_reg(0), 0x1042_1af4);
        assert_eq!(config.read_reg(2), 0x0180_0001);
    }

    #[test]
    fn vendor_id_is_read_only() {
        let mut config = PciConfiguration::new(identity());
        config.write_reg(0, 0, &[0xff, 0xff]);
        assert_eq!(config.read_reg(0), 0x1042_1af4);
    }

    #[test]
    fn bar_sizing_reads_back_size_mask() {
        let mut config = config_with_bar();
        assert_eq!(config.write_reg(4, 0, &[0xff; 4]), None);
        assert_eq!(config.write_reg(5, 0, &[0xff; 4]), None);
        assert_eq!(config.read_reg(4), 0xffff_0004);
        assert_eq!(config.read_reg(5), 0xffff_ffff);
    }

    #[test]
    fn bar_restore_after_sizing_is_not_a_move() {
        let mut config = config_with_bar();
        config.write_reg(4, 0, &[0xff; 4]);
        config.write_reg(4, 0, &0xc000_0000u32.to_le_bytes());
        config.write_reg(5, 0, &[0xff; 4]);
        assert_eq!(config.write_reg(5, 0, &0u32.to_le_bytes()), None);
        assert_eq!(config.bars().next().unwrap().addr, 0xc000_0000);
    }

    #[test]
    fn bar_relocation_is_reported() {
        let mut config = config_with_bar();
        let moved = config.write_reg(4, 0, &0xd000_0000u32.to_le_bytes());
        assert_eq!(
            moved,
            Some(BarMove {
                bar: 0,
                old: 0xc000_0000,
                new: 0xd000_0000,
                size: 0x1_0000
            })
        );
        assert_eq!(config.bar_at(0xd000_0010), Some((0, 0x10)));
    }

    #[test]
    fn misaligned_bar_is_refused() {
        let mut config = PciConfiguration::new(identity());
        let bar = BarRegion {
            index: 0,
            addr: 0xc000_1000,
            size: 0x1_0000,
            is_64bit: false,
            prefetchable: false,
        };
        assert_eq!(
            config.add_bar(bar),
            Err(ConfigurationError::BarAlignment {
                index: 0,
                addr: 0xc000_1000
            })
        );
    }

    #[test]
    fn sixty_four_bit_bar_in_last_slot_is_refused() {
        let mut config = PciConfiguration::new(identity());
        let bar = BarRegion {
            index: 5,
            addr: 0xc000_0000,
            size: 0x1000,
            is_64bit: true,
            prefetchable: false,
        };
        assert_eq!(
            config.add_bar(bar),
            Err(ConfigurationError::BarInUse { index: 5 })
        );
    }

    #[test]
    fn capabilities_are_chained() {
        let mut config = PciConfiguration::new(identity());
        let first = config.add_capability(&[0x09, 0, 4, 0], None).unwrap();
        let second = config
            .add_capability(&[0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], None)
            .unwrap();
        assert_eq!((first, second), (0x40, 0x44));
        assert_eq!(config.read_reg(13), 0x40);
        assert_eq!(config.read_reg(0x40 / 4) >> 8 & 0xff, 0x44);
        assert_ne!(config.read_reg(1) & STATUS_CAPABILITIES_LIST, 0);
    }

    #[test]
    fn out_of_range_access_is_harmless() {
        let mut config = PciConfiguration::new(identity());
        assert_eq!(config.read_reg(64), 0xffff_ffff);
        assert_eq!(config.write_reg(64, 0, &[1]), None);
        assert_eq!(config.write_reg(1, 3, &[1, 2]), None);
    }

    #[test]
    fn command_register_keeps_only_writable_bits() {
        let mut config = PciConfiguration::new(identity());
        config.write_reg(1, 0, &[0xff, 0xff]);
        assert_eq!(config.command(), 0x0407);
    }
}
