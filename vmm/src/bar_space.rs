//! Guest-physical space for PCI BARs: the 32-bit window below 4 GiB, and the 64-bit
//! window above RAM for BARs that can sit there.

use boot::layout::{PCI_MMIO_SIZE, PCI_MMIO_START};
use vm_allocator::{AddressAllocator, AllocPolicy};

/// The BAR windows crib advertises in the PCI host bridge's `_CRS`.
pub struct BarSpace {
    below_4g: AddressAllocator,
    above_4g: Option<AddressAllocator>,
}

impl BarSpace {
    /// The 32-bit window, plus `mmio64` (`(start, size)`) when the guest has one.
    pub fn new(mmio64: Option<(u64, u64)>) -> Result<Self, vm_allocator::Error> {
        Ok(Self {
            below_4g: AddressAllocator::new(PCI_MMIO_START, PCI_MMIO_SIZE)?,
            above_4g: mmio64
                .map(|(start, size)| AddressAllocator::new(start, size))
                .transpose()?,
        })
    }

    /// Places a BAR of `size` bytes (a power of two), aligned to its size. A 64-bit BAR
    /// goes above 4 GiB, which keeps the scarce 32-bit window for BARs that need it, and
    /// falls back below when the 64-bit window is missing or full.
    pub fn allocate(&mut self, size: u64, is_64bit: bool) -> Result<u64, vm_allocator::Error> {
        if is_64bit {
            if let Some(above) = &mut self.above_4g {
                if let Ok(range) = above.allocate(size, size, AllocPolicy::FirstMatch) {
                    return Ok(range.start());
                }
            }
        }
        self.below_4g
            .allocate(size, size, AllocPolicy::FirstMatch)
            .map(|range| range.start())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn bars_32bit_stay_below_4g() {
        let mut space = BarSpace::new(Some((4 * GIB, 64 * GIB))).unwrap();
        assert_eq!(space.allocate(0x4000, false).unwrap(), PCI_MMIO_START);
        assert_eq!(
            space.allocate(0x4000, false).unwrap(),
            PCI_MMIO_START + 0x4000
        );
    }

    #[test]
    fn bars_64bit_go_above_4g_aligned_to_their_size() {
        let mut space = BarSpace::new(Some((4 * GIB, 64 * GIB))).unwrap();
        assert_eq!(space.allocate(0x4000, true).unwrap(), 4 * GIB);
        assert_eq!(space.allocate(8 * GIB, true).unwrap(), 8 * GIB);
        assert_eq!(space.allocate(0x1000, true).unwrap(), 4 * GIB + 0x4000);
    }

    #[test]
    fn bars_64bit_fall_back_below_4g() {
        let mut space = BarSpace::new(None).unwrap();
        assert_eq!(space.allocate(0x4000, true).unwrap(), PCI_MMIO_START);
        // A full 64-bit window also falls back.
        let mut space = BarSpace::new(Some((4 * GIB, GIB))).unwrap();
        assert_eq!(space.allocate(GIB, true).unwrap(), 4 * GIB);
        assert_eq!(space.allocate(0x4000, true).unwrap(), PCI_MMIO_START);
    }

    #[test]
    fn exhausted_windows_are_an_error() {
        let mut space = BarSpace::new(None).unwrap();
        assert!(space.allocate(PCI_MMIO_SIZE, false).is_ok());
        assert!(space.allocate(0x1000, false).is_err());
        assert!(space.allocate(0x1000, true).is_err());
    }
}
