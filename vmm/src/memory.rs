//! Guest RAM, in one of two backings:
//!
//! - **Private anonymous memory** (`MAP_PRIVATE | MAP_ANONYMOUS`, 2 MiB aligned,
//!   `MADV_HUGEPAGE`) when nothing outside crib maps guest RAM. A stock host (Debian:
//!   THP `enabled` = `madvise`) gives it transparent huge pages, as it does QEMU's and
//!   Cloud Hypervisor's default RAM. VFIO pins and DMA-maps it like any other memory.
//! - **A shared memfd** when a vhost-user daemon (virtiofsd) must map the same pages. It
//!   gets huge pages only where the host allows shmem THP (`shmem_enabled` = `advise`);
//!   Debian's default is `never`, and crib then logs one warning naming the fix.
//!
//! Regions follow the boot layout (below the MMIO hole, then above 4 GiB).

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// The guest memory type of the whole VMM.
pub type GuestMemory = GuestMemoryMmap;

/// Huge-page size guest RAM is aligned to, so that KVM can map 2 MiB pages: a host huge
/// page backs a guest huge page only if host and guest addresses agree modulo 2 MiB.
const HUGE_PAGE_BYTES: usize = 2 << 20;
const THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";
const THP_SHMEM_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

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
    #[error("cannot reserve {bytes} bytes of address space for guest RAM at {addr:#x}")]
    Reserve {
        addr: u64,
        bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("guest RAM region at {addr:#x} is invalid")]
    Region { addr: u64 },
    #[error("guest RAM regions overlap")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
}

/// What backs guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RamBacking {
    /// Private anonymous memory: crib alone maps it.
    Anonymous,
    /// A memfd mapped shared, for vhost-user daemons.
    SharedMemfd,
}

impl RamBacking {
    /// The backing a VM needs: shared when a vhost-user device must map guest RAM.
    /// `CRIB_RAM_BACKING=shared` forces the memfd (to compare the two in benchmarks).
    pub fn for_vm(vhost_user_devices: usize) -> Self {
        let forced = std::env::var("CRIB_RAM_BACKING").is_ok_and(|v| v == "shared");
        if vhost_user_devices > 0 || forced {
            Self::SharedMemfd
        } else {
            Self::Anonymous
        }
    }
}

/// The host's transparent huge page policy for one kind of memory: the bracketed word of
/// a sysfs THP file (`always [madvise] never`).
fn thp_policy(text: &str) -> Option<&str> {
    let start = text.find('[')? + 1;
    let len = text[start..].find(']')?;
    Some(&text[start..start + len])
}

/// Whether `MADV_HUGEPAGE` gets huge pages under `policy` (`enabled` or `shmem_enabled`).
fn policy_allows_madvise(policy: &str) -> bool {
    matches!(
        policy,
        "always" | "madvise" | "advise" | "within_size" | "force"
    )
}

/// Says whether `backing` will get huge pages on this host, and if not, why and how to
/// fix it (`Err`). Unknown (no sysfs file) counts as allowed: nothing to tell the user.
pub fn check_huge_pages(backing: RamBacking) -> Result<String, String> {
    let (path, fix) = match backing {
        RamBacking::Anonymous => (THP_ENABLED, "madvise"),
        RamBacking::SharedMemfd => (THP_SHMEM_ENABLED, "advise"),
    };
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok("unknown".into());
    };
    match thp_policy(&text) {
        Some(policy) if policy_allows_madvise(policy) => Ok(format!("THP {policy}")),
        Some(policy) => Err(format!(
            "{path} is '{policy}', so guest RAM ({backing:?}) gets 4 KiB pages and every \
             first touch of a guest page is a second-level fault; fix: echo {fix} > {path}{}",
            if backing == RamBacking::SharedMemfd {
                " (shared RAM is needed only while a virtio-fs share is attached)"
            } else {
                ""
            }
        )),
        None => Ok("unknown".into()),
    }
}

/// Asks for transparent huge pages on guest RAM. With 4 KiB host pages every first touch
/// of guest memory is a second-level page fault, very costly when nested, and TLB reach
/// is 512 times smaller. Best effort: [`check_huge_pages`] tells the user when the host
/// refuses.
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

/// Maps `len` bytes of private anonymous memory at a 2 MiB-aligned address.
///
/// Linux before 6.7 places a large anonymous mapping only page-aligned, and then neither
/// can the first and last partial 2 MiB get huge pages nor can KVM map any of it with 2 MiB
/// pages (host and guest addresses must agree modulo 2 MiB). So: reserve `len` + 2 MiB,
/// and give back the unaligned head and the tail. The mapping lives until crib exits (the
/// region does not own it: one VM per process).
fn map_anonymous_aligned(addr: GuestAddress, len: usize) -> Result<MmapRegion, MemoryError> {
    let bytes = len as u64;
    let reserve_err = |source| MemoryError::Reserve {
        addr: addr.0,
        bytes,
        source,
    };
    let reserve = len
        .checked_add(HUGE_PAGE_BYTES)
        .ok_or_else(|| reserve_err(std::io::Error::from_raw_os_error(libc::ENOMEM)))?;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    // NORESERVE: the guest touches what it uses; the rest costs nothing.
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a new anonymous mapping at an address the kernel picks; nothing else in the
    // process is affected, and the result is checked.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), reserve, prot, flags, -1, 0) };
    if base == libc::MAP_FAILED {
        return Err(reserve_err(std::io::Error::last_os_error()));
    }
    let base_addr = base as usize;
    let aligned = base_addr.next_multiple_of(HUGE_PAGE_BYTES);
    let head = aligned - base_addr;
    let tail = reserve - head - len;
    if head > 0 {
        // SAFETY: [base, aligned) is the start of the mapping made above, which nothing
        // else references yet.
        unsafe { libc::munmap(base, head) };
    }
    if tail > 0 {
        // SAFETY: [aligned + len, base + reserve) is the end of the same mapping, unused.
        unsafe { libc::munmap((aligned + len) as *mut libc::c_void, tail) };
    }
    // Children (virtiofsd, helpers) never get guest RAM: a fork would otherwise make the
    // pages copy-on-write, and a write after it would move a page away from a VFIO pin.
    // SAFETY: the range is the live mapping made above; MADV_DONTFORK changes only fork.
    if unsafe { libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_DONTFORK) } != 0 {
        tracing::debug!(
            "MADV_DONTFORK on guest RAM: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: [aligned, aligned + len) is a live private anonymous read-write mapping made
    // above with exactly these prot and flags, never unmapped while crib runs.
    unsafe { MmapRegion::build_raw(aligned as *mut u8, len, prot, flags) }.map_err(|source| {
        MemoryError::Map {
            addr: addr.0,
            bytes,
            source,
        }
    })
}

/// Creates guest RAM for `ranges` with `backing`: for [`RamBacking::SharedMemfd`] one
/// memfd at consecutive offsets.
pub fn create_guest_memory(
    ranges: &[(GuestAddress, u64)],
    backing: RamBacking,
) -> Result<GuestMemory, MemoryError> {
    let total: u64 = ranges.iter().map(|(_, len)| len).sum();
    let file = match backing {
        RamBacking::SharedMemfd => Some(create_memfd(total)?),
        RamBacking::Anonymous => None,
    };
    let mut offset = 0u64;
    let mut regions = Vec::with_capacity(ranges.len());
    for &(addr, bytes) in ranges {
        let len = usize::try_from(bytes).map_err(|_| MemoryError::Region { addr: addr.0 })?;
        let mapping = match &file {
            Some(file) => {
                let file_offset =
                    FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, offset);
                MmapRegion::build(
                    Some(file_offset),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_NORESERVE,
                )
                .map_err(|source| MemoryError::Map {
                    addr: addr.0,
                    bytes,
                    source,
                })?
            }
            None => map_anonymous_aligned(addr, len)?,
        };
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
        let mem = create_guest_memory(
            &[
                (GuestAddress(0), 0x10_0000),
                (GuestAddress(0x1000_0000), 0x2000),
            ],
            RamBacking::SharedMemfd,
        )
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

    #[test]
    fn anonymous_backing_is_huge_page_aligned_and_has_no_file() {
        let mem = create_guest_memory(
            &[
                (GuestAddress(0), 0x40_0000),
                (GuestAddress(0x1000_0000), 0x2000),
            ],
            RamBacking::Anonymous,
        )
        .unwrap();
        let low = mem.find_region(GuestAddress(0)).unwrap();
        assert!(low.file_offset().is_none());
        assert_eq!(
            mem.get_host_address(GuestAddress(0)).unwrap() as usize % HUGE_PAGE_BYTES,
            0
        );
        mem.write_obj(0x1234_5678u32, GuestAddress(0x3f_fffc))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x3f_fffc)).unwrap(),
            0x1234_5678
        );
    }

    #[test]
    fn backing_with_vhost_user_device_is_shared() {
        assert_eq!(RamBacking::for_vm(1), RamBacking::SharedMemfd);
    }

    #[test]
    fn backing_without_vhost_user_device_is_anonymous() {
        assert_eq!(RamBacking::for_vm(0), RamBacking::Anonymous);
    }

    #[test]
    fn thp_policy_is_the_bracketed_word() {
        assert_eq!(
            thp_policy("always within_size advise [never] deny force"),
            Some("never")
        );
    }

    #[test]
    fn thp_never_does_not_allow_madvise() {
        assert!(!policy_allows_madvise("never"));
    }

    #[test]
    fn thp_shmem_advise_allows_madvise() {
        assert!(policy_allows_madvise("advise"));
    }
}
