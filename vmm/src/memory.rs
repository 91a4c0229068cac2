//! Guest RAM, in one of two backings:
//!
//! - **Private anonymous memory** (`MAP_PRIVATE | MAP_ANONYMOUS`, 2 MiB aligned,
//!   `MADV_HUGEPAGE`) when nothing outside crib maps guest RAM. A stock host (Debian:
//!   THP `enabled` = `madvise`) gives it transparent huge pages, as it does QEMU's and
//!   Cloud Hypervisor's default RAM. VFIO pins and DMA-maps it like any other memory.
//! - **Shared memory** when a vhost-user daemon (virtiofsd) must map the same pages: a
//!   memfd where the host allows shmem THP (`shmem_enabled` = `advise`); otherwise (Debian's
//!   default is `never`) a file on a tmpfs of crib's own mounted with `huge=always`, which
//!   gets huge pages whatever `shmem_enabled` says (see [`huge_tmpfs_file`]). That needs
//!   CAP_SYS_ADMIN; without it crib falls back to the memfd and logs one warning naming
//!   the fix.
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
/// Overrides the backing, for benchmarks (see [`RamBacking::for_vm`]).
const RAM_BACKING_ENV: &str = "CRIB_RAM_BACKING";

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
    /// A file on crib's own `huge=always` tmpfs, mapped shared, for vhost-user daemons.
    SharedHugeTmpfs,
}

impl RamBacking {
    /// The backing a VM needs: shared when a vhost-user device must map guest RAM.
    /// [`create_guest_memory`] picks the shared kind. For benchmarks,
    /// `CRIB_RAM_BACKING=shared` forces shared memory, `memfd` the plain memfd.
    pub fn for_vm(vhost_user_devices: usize) -> Self {
        match std::env::var(RAM_BACKING_ENV).as_deref() {
            Ok("memfd") => Self::SharedMemfd,
            Ok("shared") => Self::SharedHugeTmpfs,
            _ if vhost_user_devices > 0 => Self::SharedHugeTmpfs,
            _ => Self::Anonymous,
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
        RamBacking::SharedHugeTmpfs => return Ok("THP (crib's huge=always tmpfs)".into()),
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
                " (shared RAM is needed only while a virtio-fs share is attached; run crib as \
                 root, or with CAP_SYS_ADMIN, and it uses a huge-page tmpfs of its own instead)"
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

/// A file of `bytes` on a tmpfs of crib's own, mounted with `huge=always,size=bytes`.
///
/// Why: `shmem_enabled` (Debian: `never`) governs memfds and the kernel's internal shm
/// mount, not tmpfs mounts, whose `huge=` option only `deny`/`force` override. The tmpfs
/// is made with the new mount API (rustix's `fsopen`/`fsmount`) and never attached: it has
/// no path, appears in no mount table, and goes away with the file, so nothing is left
/// behind, whatever ends crib. Needs CAP_SYS_ADMIN (fails with EPERM otherwise).
fn huge_tmpfs_file(bytes: u64) -> std::io::Result<File> {
    use rustix::fs::{Mode, OFlags};
    use rustix::mount::{
        fsconfig_create, fsconfig_set_string, fsmount, fsopen, FsMountFlags, FsOpenFlags,
        MountAttrFlags,
    };
    let fs = fsopen("tmpfs", FsOpenFlags::FSOPEN_CLOEXEC)?;
    fsconfig_set_string(&fs, "huge", "always")?;
    fsconfig_set_string(&fs, "size", bytes.to_string().as_str())?;
    fsconfig_set_string(&fs, "mode", "0700")?;
    fsconfig_create(&fs)?;
    let mount = fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_NOSUID
            | MountAttrFlags::MOUNT_ATTR_NODEV
            | MountAttrFlags::MOUNT_ATTR_NOEXEC,
    )?;
    let fd = rustix::fs::openat(
        &mount,
        ".",
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    let file = File::from(fd);
    file.set_len(bytes)?;
    Ok(file)
}

/// The shared file for `wanted`, and the backing it really is: crib's huge tmpfs unless
/// the host gives memfds huge pages anyway (or the tmpfs cannot be made), else the memfd.
fn create_shared_file(bytes: u64, wanted: RamBacking) -> Result<(File, RamBacking), MemoryError> {
    let memfd_gets_thp = check_huge_pages(RamBacking::SharedMemfd).is_ok_and(|p| p != "unknown");
    if wanted == RamBacking::SharedHugeTmpfs && !memfd_gets_thp {
        match huge_tmpfs_file(bytes) {
            Ok(file) => return Ok((file, RamBacking::SharedHugeTmpfs)),
            Err(e) => tracing::debug!("guest RAM: no huge-page tmpfs ({e}); using a memfd"),
        }
    }
    Ok((create_memfd(bytes)?, RamBacking::SharedMemfd))
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

/// Creates guest RAM for `ranges` with `backing`: for the shared kinds one file at
/// consecutive offsets. Returns the backing it got (a shared one may fall back to the
/// memfd).
pub fn create_guest_memory(
    ranges: &[(GuestAddress, u64)],
    backing: RamBacking,
) -> Result<(GuestMemory, RamBacking), MemoryError> {
    let total: u64 = ranges.iter().map(|(_, len)| len).sum();
    let (file, backing) = match backing {
        RamBacking::Anonymous => (None, backing),
        shared => {
            let (file, got) = create_shared_file(total, shared)?;
            (Some(file), got)
        }
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
    let memory = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Regions)?;
    Ok((memory, backing))
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    use super::*;

    #[test]
    fn regions_follow_ranges_and_are_shared_file_mappings() {
        for wanted in [RamBacking::SharedMemfd, RamBacking::SharedHugeTmpfs] {
            shared_regions_follow_ranges(wanted);
        }
    }

    fn shared_regions_follow_ranges(wanted: RamBacking) {
        let (mem, got) = create_guest_memory(
            &[
                (GuestAddress(0), 0x10_0000),
                (GuestAddress(0x1000_0000), 0x2000),
            ],
            wanted,
        )
        .unwrap();
        assert_ne!(got, RamBacking::Anonymous);
        if wanted == RamBacking::SharedMemfd {
            assert_eq!(got, RamBacking::SharedMemfd);
        }
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
        let (mem, got) = create_guest_memory(
            &[
                (GuestAddress(0), 0x40_0000),
                (GuestAddress(0x1000_0000), 0x2000),
            ],
            RamBacking::Anonymous,
        )
        .unwrap();
        assert_eq!(got, RamBacking::Anonymous);
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
        assert_eq!(RamBacking::for_vm(1), RamBacking::SharedHugeTmpfs);
    }

    /// As root: a file on a tmpfs that is mounted nowhere, sized, readable and writable.
    #[test]
    fn huge_tmpfs_file_is_on_a_tmpfs_attached_nowhere() {
        if rustix::process::geteuid().as_raw() != 0 {
            eprintln!("skipped: needs CAP_SYS_ADMIN");
            return;
        }
        let mounts = || std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let before = mounts();
        let file = huge_tmpfs_file(4 << 20).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 4 << 20);
        let fs = rustix::fs::fstatfs(&file).unwrap();
        assert_eq!(fs.f_type as u64, 0x0102_1994, "TMPFS_MAGIC");
        assert_eq!(mounts(), before, "the tmpfs is attached nowhere");
        use std::os::unix::fs::FileExt;
        file.write_all_at(b"crib", (4 << 20) - 4).unwrap();
        let mut back = [0u8; 4];
        file.read_exact_at(&mut back, (4 << 20) - 4).unwrap();
        assert_eq!(&back, b"crib");
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
