//! Helpers shared by the block module's unit tests: small guest memory, a builder that puts
//! chains into a `MockSplitQueue`, a temporary disk file, and a recording interrupt.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::request::{DiskLimits, RequestHeader};
use crate::virtio::{GuestMemoryMmap, VirtioInterrupt, VirtioInterruptType};

/// Queue size of the tests: small, so rings stay below `HEADER_ADDR`.
pub const QUEUE_SIZE: u16 = 16;
/// Where tests put the request header.
pub const HEADER_ADDR: GuestAddress = GuestAddress(0x4000);
/// Where tests put the status byte.
pub const STATUS_ADDR: GuestAddress = GuestAddress(0x6000);
/// Where tests put data buffers.
pub const DATA_ADDR: GuestAddress = GuestAddress(0x8000);
/// Guest memory of the tests: 1 MiB from address 0.
pub const MEM_BYTES: usize = 0x10_0000;
/// The test disk: 1 MiB.
pub const DISK_SECTORS: u64 = 2048;

/// 1 MiB of guest memory at address 0.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).unwrap()
}

/// Writes a request header at [`HEADER_ADDR`].
pub fn header(mem: &GuestMemoryMmap, request_type: u32, sector: u64) {
    header_at(mem, HEADER_ADDR, request_type, sector);
}

/// Writes a request header at `addr`.
pub fn header_at(mem: &GuestMemoryMmap, addr: GuestAddress, request_type: u32, sector: u64) {
    let hdr = RequestHeader {
        request_type: request_type.into(),
        reserved: 0u32.into(),
        sector: sector.into(),
    };
    mem.write_obj(hdr, addr).unwrap();
}

/// Limits of a writable [`DISK_SECTORS`] disk with every feature.
pub fn limits() -> DiskLimits {
    DiskLimits {
        capacity_sectors: DISK_SECTORS,
        readonly: false,
        discard: true,
        write_zeroes: true,
        seg_max: u32::from(QUEUE_SIZE - 2),
        size_max: u32::MAX,
        max_discard_sectors: u32::MAX,
        max_write_zeroes_sectors: u32::MAX,
    }
}

/// A chain as (address, length, device-writable) triples.
#[derive(Clone, Debug, Default)]
pub struct ChainBuilder {
    descs: Vec<(GuestAddress, u32, bool)>,
}

impl ChainBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a descriptor.
    pub fn desc(mut self, addr: GuestAddress, len: u32, write_only: bool) -> Self {
        self.descs.push((addr, len, write_only));
        self
    }

    /// A well-formed request: header, `data`, status.
    pub fn request(data: &[(GuestAddress, u32, bool)]) -> Self {
        let mut b = Self::new().desc(HEADER_ADDR, 16, false);
        for &(addr, len, w) in data {
            b = b.desc(addr, len, w);
        }
        b.desc(STATUS_ADDR, 1, true)
    }

    /// Writes the chain at descriptor index `first` and makes it available.
    pub fn add_to(&self, vq: &MockSplitQueue<'_, GuestMemoryMmap>, first: u16) {
        let count = self.descs.len();
        let raw: Vec<_> = self
            .descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                let next = first + i as u16 + 1;
                if i + 1 < count {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(SplitDescriptor::new(addr.0, len, flags, next))
            })
            .collect();
        vq.add_desc_chains(&raw, first).unwrap();
    }
}

/// Where [`relocate_used_ring`] puts the used ring (below [`HEADER_ADDR`]).
///
/// virtio-queue 0.18's `MockSplitQueue` starts the used ring `len` bytes after the avail
/// ring instead of `4 + 2 * len`: avail entries from `len / 2` on overlap the used ring.
/// Tests that post more than that many chains move the used ring here.
pub const SPARE_USED_ADDR: GuestAddress = GuestAddress(0x3000);

/// Points `queue`'s used ring at [`SPARE_USED_ADDR`].
pub fn relocate_used_ring(queue: &mut Queue) {
    queue.set_used_ring_address(Some(SPARE_USED_ADDR.0 as u32), Some(0));
}

/// Makes the chain headed by `head` available once more (wrapping around the ring).
pub fn post(vq: &MockSplitQueue<'_, GuestMemoryMmap>, head: u16) {
    let idx = vq.avail().idx().load();
    let slot = usize::from(idx % QUEUE_SIZE);
    vq.avail().ring().ref_at(slot).unwrap().store(head);
    vq.avail().idx().store(idx.wrapping_add(1));
}

/// The entries of a used ring at `addr` of a [`QUEUE_SIZE`] queue, as (head, len).
pub fn used_entries_at(mem: &GuestMemoryMmap, addr: GuestAddress) -> Vec<(u32, u32)> {
    let idx: u16 = mem.read_obj(addr.unchecked_add(2)).unwrap();
    (0..idx)
        .map(|i| {
            let at = addr.unchecked_add(4 + 8 * u64::from(i % QUEUE_SIZE));
            let elem: [u32; 2] = mem.read_obj(at).unwrap();
            (elem[0], elem[1])
        })
        .collect()
}

/// The used ring's entries as (head, len).
pub fn used_entries(vq: &MockSplitQueue<'_, GuestMemoryMmap>) -> Vec<(u32, u32)> {
    let idx = vq.used().idx().load();
    (0..idx)
        .map(|i| {
            let e = vq.used().ring().ref_at(usize::from(i)).unwrap().load();
            (e.id(), e.len())
        })
        .collect()
}

/// The status byte at [`STATUS_ADDR`].
pub fn status_byte(mem: &GuestMemoryMmap) -> u8 {
    mem.read_obj(STATUS_ADDR).unwrap()
}

/// Polls `cond` every millisecond for up to five seconds.
pub fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cond()
}

/// An interrupt that remembers what it was asked to do.
#[derive(Debug, Default)]
pub struct RecordingInterrupt {
    pub triggers: Mutex<Vec<VirtioInterruptType>>,
    pub needs_reset: AtomicBool,
}

impl RecordingInterrupt {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn triggered(&self) -> Vec<VirtioInterruptType> {
        self.triggers.lock().unwrap().clone()
    }
}

impl VirtioInterrupt for RecordingInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()> {
        self.triggers.lock().unwrap().push(kind);
        Ok(())
    }

    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
    }
}

/// A disk image under the temp directory, removed on drop.
#[derive(Debug)]
pub struct TempDisk {
    pub path: PathBuf,
}

impl TempDisk {
    /// A file of `bytes` bytes where byte `i` holds `i % 251` (so offsets are recognisable).
    pub fn new(bytes: u64) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("crib-blk-test-{}-{n}.img", std::process::id()));
        let pattern: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, pattern).unwrap();
        Self { path }
    }

    /// The expected byte at `offset` of a fresh disk.
    pub fn pattern(offset: u64) -> u8 {
        (offset % 251) as u8
    }

    pub fn open(&self) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .unwrap()
    }

    /// Reads `len` bytes at `offset` from the file.
    pub fn read_at(&self, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        self.open().read_exact_at(&mut buf, offset).unwrap();
        buf
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
