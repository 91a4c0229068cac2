//! Guest RAM ranges and the e820 map the kernel reads from the zero page.

use vm_memory::GuestAddress;

use crate::layout::{
    ACPI_END, EBDA_START, HIGH_RAM_START, MMIO_HOLE_START, PAGE_SIZE, PCI_ECAM_SIZE,
    PCI_ECAM_START, RAM_ABOVE_4G_START,
};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The guest-physical RAM ranges for `mem_bytes` of RAM: everything below the 32-bit
/// MMIO hole first, the rest above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    let low = mem_bytes.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if mem_bytes > MMIO_HOLE_START {
        ranges.push((
            GuestAddress(RAM_ABOVE_4G_START),
            mem_bytes - MMIO_HOLE_START,
        ));
    }
    ranges
}

/// The end (exclusive) of RAM below the MMIO hole.
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_HOLE_START)
}

/// The e820 map: low RAM up to the EBDA, the reserved BIOS area (ACPI tables live there),
/// RAM from 1 MiB to the MMIO hole, the PCI ECAM area as reserved (Linux uses ECAM only if
/// firmware reserved it), and RAM above 4 GiB.
pub fn e820_entries(mem_bytes: u64) -> Vec<E820Entry> {
    let low_end = low_ram_end(mem_bytes);
    let mut entries = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: ACPI_END - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    if low_end > HIGH_RAM_START.0 {
        entries.push(E820Entry {
            addr: HIGH_RAM_START.0,
            size: low_end - HIGH_RAM_START.0,
            kind: E820_RAM,
        });
    }
    entries.push(E820Entry {
        addr: PCI_ECAM_START,
        size: PCI_ECAM_SIZE,
        kind: E820_RESERVED,
    });
    if mem_bytes > MMIO_HOLE_START {
        entries.push(E820Entry {
            addr: RAM_ABOVE_4G_START,
            size: mem_bytes - MMIO_HOLE_START,
            kind: E820_RAM,
        });
    }
    entries
}

/// Where the AMD HyperTransport range starts (1012 GiB); it is reserved up to 1 TiB on
/// AMD hosts, so guest BARs must stay below it.
const AMD_HT_RESERVED_START: u64 = 0xfd_0000_0000;
/// The 64-bit BAR window starts on this boundary.
const PCI_MMIO64_ALIGN: u64 = 1 << 30;
/// The physical-address width every x86-64 CPU has (CPUID leaf 0x8000_0008 may say more).
pub const DEFAULT_PHYS_BITS: u8 = 36;

/// The 64-bit PCI MMIO window `(start, size)` for a guest with `mem_bytes` of RAM and
/// `phys_bits` of physical address: from the first 1 GiB boundary above RAM (and above
/// 4 GiB) to the end of the guest's physical address space, stopping short of AMD's
/// HyperTransport hole. `None` when the address space leaves no room.
pub fn pci_mmio64_window(mem_bytes: u64, phys_bits: u8) -> Option<(u64, u64)> {
    let ram_end = RAM_ABOVE_4G_START + mem_bytes.saturating_sub(MMIO_HOLE_START);
    let start = ram_end.checked_next_multiple_of(PCI_MMIO64_ALIGN)?;
    let bits = u32::from(phys_bits.clamp(DEFAULT_PHYS_BITS, 52));
    let end = (1u64 << bits).min(AMD_HT_RESERVED_START);
    (end > start).then(|| (start, end - start))
}

/// Round `value` down to a page boundary.
pub fn page_align_down(value: u64) -> u64 {
    value & !(PAGE_SIZE - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn mmio64_window_starts_above_4g_for_small_vms() {
        assert_eq!(
            pci_mmio64_window(512 * MIB, 39),
            Some((4 * GIB, (1 << 39) - 4 * GIB))
        );
    }

    #[test]
    fn mmio64_window_starts_above_ram_on_a_gib_boundary() {
        // 8.5 GiB of RAM: 3 GiB below the hole, 5.5 GiB from 4 GiB, so RAM ends at 9.5 GiB.
        let (start, size) = pci_mmio64_window(8 * GIB + 512 * MIB, 39).unwrap();
        assert_eq!(start, 10 * GIB);
        assert_eq!(start + size, 1 << 39);
    }

    #[test]
    fn mmio64_window_stops_below_the_amd_hypertransport_hole() {
        for bits in [40, 48] {
            let (start, size) = pci_mmio64_window(GIB, bits).unwrap();
            assert_eq!(start + size, 0xfd_0000_0000);
        }
    }

    #[test]
    fn mmio64_window_absent_when_ram_fills_the_address_space() {
        assert_eq!(pci_mmio64_window(64 * GIB, 36), None);
        // A CPU claiming fewer bits than any x86-64 has gets the architectural minimum.
        assert!(pci_mmio64_window(GIB, 0).is_some());
    }

    #[test]
    fn ram_ranges_small_vm_is_one_range() {
        assert_eq!(ram_ranges(512 * MIB), vec![(GuestAddress(0), 512 * MIB)]);
    }

    #[test]
    fn ram_ranges_above_hole_continue_at_4g() {
        assert_eq!(
            ram_ranges(4 * GIB),
            vec![(GuestAddress(0), 3 * GIB), (GuestAddress(4 * GIB), GIB)]
        );
    }

    #[test]
    fn e820_small_vm_has_low_reserved_and_high_ram() {
        let map = e820_entries(512 * MIB);
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x100000 - 0x9fc00,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: MIB,
                    size: 511 * MIB,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0xe000_0000,
                    size: MIB,
                    kind: E820_RESERVED
                },
            ]
        );
    }

    #[test]
    fn e820_large_vm_skips_mmio_hole() {
        let map = e820_entries(6 * GIB);
        assert_eq!(
            map[2],
            E820Entry {
                addr: MIB,
                size: 3 * GIB - MIB,
                kind: E820_RAM
            }
        );
        assert_eq!(
            map[4],
            E820Entry {
                addr: 4 * GIB,
                size: 3 * GIB,
                kind: E820_RAM
            }
        );
    }
}
