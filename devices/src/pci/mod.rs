//! PCI: configuration space with BARs and capabilities, MSI-X, a root bus with a host
//! bridge, and the two ways a guest reaches configuration space (ports 0xCF8/0xCFC and
//! ECAM). Hand-written: rust-vmm has no maintained PCI crate (Cloud Hypervisor's `pci`
//! crate is not published), and crib needs only this much.

pub mod bus;
pub mod configuration;
pub mod msix;

pub use bus::{PciBus, PciConfigIo, PciConfigMmio, PciError};
pub use configuration::{BarRegion, PciConfiguration, PciIdentity};
pub use msix::{MsiRouting, MsixConfig, MsixVectors};

/// What a PCI function looks like to the bus.
pub trait PciDevice: Send {
    /// Reads the 32-bit configuration register `reg` (dword index).
    fn read_config_register(&mut self, reg: usize) -> u32;

    /// Writes `data` at byte `offset` within configuration register `reg`. Returns the BAR
    /// that moved, if the write relocated one, so the VMM can move its mappings.
    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove>;

    /// Reads register `reg` (64..1024) of PCI Express extended configuration space,
    /// reached through ECAM only. Zero, the default, means no extended capabilities
    /// (PCIe 4.0 §7.9.1).
    fn read_extended_config_register(&mut self, _reg: usize) -> u32 {
        0
    }

    /// Writes `data` at byte `offset` within extended configuration register `reg`;
    /// ignored by default.
    fn write_extended_config_register(&mut self, _reg: usize, _offset: u64, _data: &[u8]) {}

    /// Reads from BAR `bar` at `offset`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);

    /// Writes to BAR `bar` at `offset`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// Follows a BAR the guest moved: the VMM moves the BAR's MMIO range and whatever else it
/// registered at the BAR's address (doorbell ioeventfds, KVM memory slots of a passed-through
/// BAR). Called after the device's lock is released.
pub trait BarRelocation: Send + Sync {
    /// BAR `moved.bar` of the function in `slot` now decodes at `moved.new`.
    fn move_bar(&self, slot: u8, moved: &BarMove);
}

/// A BAR the guest moved to a new address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMove {
    pub bar: usize,
    pub old: u64,
    pub new: u64,
    pub size: u64,
}
