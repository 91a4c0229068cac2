//! Identity-mapped page tables for the 64-bit entry: the first 4 GiB with 2 MiB pages.
//! Linux replaces them early; they only need to cover the kernel, the zero page and the
//! command line, but mapping all of low memory costs four pages and removes a constraint.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{PAGE_SIZE, PML4_START};

/// Number of page directories (each maps 1 GiB).
const PD_COUNT: u64 = 4;
const PRESENT_WRITABLE: u64 = 0x3;
const HUGE_PAGE: u64 = 0x80;
const TWO_MIB: u64 = 2 << 20;

/// Errors while writing the page tables.
#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    #[error("guest memory too small for the boot page tables at {addr:#x}")]
    Write {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Writes PML4 -> PDPT -> 4 PDs at [`PML4_START`] and returns the CR3 value.
pub fn write_identity_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<u64, PagingError> {
    let pml4 = PML4_START.0;
    let pdpt = pml4 + PAGE_SIZE;
    let pd_base = pdpt + PAGE_SIZE;
    let write = |addr: u64, value: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(|source| PagingError::Write { addr, source })
    };
    write(pml4, pdpt | PRESENT_WRITABLE)?;
    for pd_index in 0..PD_COUNT {
        let pd = pd_base + pd_index * PAGE_SIZE;
        write(pdpt + pd_index * 8, pd | PRESENT_WRITABLE)?;
        for entry in 0..512u64 {
            let phys = (pd_index * 512 + entry) * TWO_MIB;
            write(pd + entry * 8, phys | PRESENT_WRITABLE | HUGE_PAGE)?;
        }
    }
    Ok(pml4)
}

/// First guest address past the page tables.
pub fn page_tables_end() -> u64 {
    PML4_START.0 + (2 + PD_COUNT) * PAGE_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    #[test]
    fn pml4_points_to_pdpt() {
        let mem = mem();
        let cr3 = write_identity_page_tables(&mem).unwrap();
        let pml4e: u64 = mem.read_obj(GuestAddress(cr3)).unwrap();
        assert_eq!(pml4e, 0xa003);
    }

    #[test]
    fn pd_entries_map_2mib_pages_identity() {
        let mem = mem();
        write_identity_page_tables(&mem).unwrap();
        // Second PD (1 GiB..2 GiB), entry 3: 1 GiB + 6 MiB.
        let pde: u64 = mem.read_obj(GuestAddress(0xc000 + 3 * 8)).unwrap();
        assert_eq!(pde, (1 << 30) + 3 * TWO_MIB + 0x83);
    }

    #[test]
    fn tables_end_before_command_line() {
        assert!(page_tables_end() <= crate::layout::CMDLINE_START.0);
    }

    #[test]
    fn too_small_memory_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x9000)]).unwrap();
        assert!(write_identity_page_tables(&mem).is_err());
    }
}
