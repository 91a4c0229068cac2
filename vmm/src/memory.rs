//! Guest RAM: one memfd, mapped shared, so a vhost-user backend can map the same pages
//! later. Regions follow the boot layout (below the MMIO hole, then above 4 GiB).

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// The guest memory type of the whole VMM.
pub type GuestMemory = GuestMemoryMmap;

/// Errors while creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the guest RAM memfd")]
    Memfd(#[source] std::io::Error),
    #[error("cannot size the guest RAM memfd to {bytes} bytes")]
    Truncate {
        bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map {bytes} bytes of guest RAM at {addr:#x}")]
    Map {
        addr: u64,
        bytes: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("guest RAM region at {addr:#x} is invalid")]
    Region { addr: u64 },
    #[error("guest RAM regions overlap")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
}

/// Asks for transparent huge pages on guest RAM. With 4 KiB host pages every first touch
/// of guest memory is a second-level page fault, very costly when nested, and TLB reach
/// is 512 times smaller. For a memfd this takes effect only where the host allows shmem
/// huge pages (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` = `advise`): a VM host
/// should (docs/HOST.md). Best effort.
fn advise_huge_pages(mapping: &MmapRegion) {
    // SAFETY: the range is exactly the live mapping; MADV_HUGEPAGE changes only how the
    // kernel backs it, never its contents.
    let ret =
        unsafe { libc::madvise(mapping.as_ptr().cast(), mapping.size(), libc::MADV_HUGEPAGE) };
    if ret != 0 {
        tracing::debug!(
            "MADV_HUGEPAGE on guest RAM: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn create_memfd(bytes: u64) -> Result<File, MemoryError> {
    const NAME: &CStr = c"crib-guest-ram";
    // SAFETY: NAME is a valid NUL-terminated string; memfd_create has no other inputs and
    // returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(NAME.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by memfd_create, is valid and owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(bytes)
        .map_err(|source| MemoryError::Truncate { bytes, source })?;
    Ok(file)
}

/// Creates guest RAM for `ranges`, backed by one memfd at consecutive offsets.
pub fn create_guest_memory(ranges: &[(GuestAddress, u64)]) -> Result<GuestMemory, MemoryError> {
    let total: u64 = ranges.iter().map(|(_, len)| len).sum();
    let file = create_memfd(total)?;
    let mut offset = 0u64;
    let mut regions = Vec::with_capacity(ranges.len());
    for &(addr, bytes) in ranges {
        let len = usize::try_from(bytes).map_err(|_| MemoryError::Region { addr: addr.0 })?;
        let file_offset = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, offset);
        let mapping = MmapRegion::build(
            Some(file_offset),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            // NORESERVE: the guest touches what it uses; the rest costs nothing.
            libc::MAP_SHARED | libc::MAP_NORESERVE,
        )
        .map_err(|source| MemoryError::Map {
            addr: addr.0,
            bytes,
            source,
        })?;
        advise_huge_pages(&mapping);
        regions
            .push(GuestRegionMmap::new(mapping, addr).ok_or(MemoryError::Region { addr: addr.0 })?);
        offset += bytes;
    }
    GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Regions)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    use super::*;

    #[test]
    fn regions_follow_ranges_and_are_shared_file_mappings() {
        let mem = create_guest_memory(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x1000_0000), 0x2000),
        ])
        .unwrap();
        assert_eq!(mem.num_regions(), 2);
        let high = mem.find_region(GuestAddress(0x1000_0000)).unwrap();
        assert_eq!(high.len(), 0x2000);
        assert_eq!(high.file_offset().unwrap().start(), 0x10_0000);
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000_0ff0))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000_0ff0)).unwrap(),
            0xdead_beef
        );
    }
}
