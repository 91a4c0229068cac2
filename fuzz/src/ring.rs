//! The driver's side of one split virtqueue in guest memory, for the queue targets: a
//! descriptor table, an available ring and a used ring in one 16 KiB area, descriptors
//! written as given, heads made available in order.

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Bytes of one ring's area: descriptor table, then available ring, then used ring.
pub const RING_AREA_BYTES: u64 = 0x4000;
/// Largest queue the area holds (16 bytes a descriptor in the first 4 KiB).
pub const MAX_RING_SIZE: u16 = 256;
const AVAIL_OFFSET: u64 = 0x1000;
const USED_OFFSET: u64 = 0x2000;

/// One descriptor as (address, length, flags, next).
pub type RawDesc = (u64, u32, u16, u16);

/// A split ring at `base`, of `size` entries.
pub struct Ring {
    base: u64,
    size: u16,
    next_desc: u16,
    next_avail: u16,
    used_seen: u16,
}

impl Ring {
    /// A ring of `size` (a power of two, at most [`MAX_RING_SIZE`]) at `base`, with its
    /// indices zeroed in `mem`.
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Self {
        assert!(size.is_power_of_two() && size <= MAX_RING_SIZE);
        let _ = mem.write_slice(&[0u8; 4], GuestAddress(base + AVAIL_OFFSET));
        let _ = mem.write_slice(&[0u8; 4], GuestAddress(base + USED_OFFSET));
        Self {
            base,
            size,
            next_desc: 0,
            next_avail: 0,
            used_seen: 0,
        }
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Descriptors not yet written.
    pub fn free_descriptors(&self) -> u16 {
        self.size - self.next_desc
    }

    /// The device's view, with `event_idx` as negotiated.
    pub fn queue(&self, event_idx: bool) -> Queue {
        let mut queue = Queue::new(self.size).expect("a valid queue size");
        queue.set_size(self.size);
        queue.set_desc_table_address(Some(self.base as u32), Some((self.base >> 32) as u32));
        let avail = self.base + AVAIL_OFFSET;
        queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        let used = self.base + USED_OFFSET;
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        queue
    }

    /// Writes `descs` as one chain in the next free descriptors: each is linked to the
    /// next with `VRING_DESC_F_NEXT` unless it is indirect or `raw` asks to keep its own
    /// flags and `next`. Makes the head available and returns it; `None` when the table
    /// is full (nothing is written then).
    pub fn post(&mut self, mem: &GuestMemoryMmap, descs: &[(RawDesc, bool)]) -> Option<u16> {
        if descs.is_empty() || usize::from(self.free_descriptors()) < descs.len() {
            return None;
        }
        let head = self.next_desc;
        let last = descs.len() - 1;
        for (i, &((addr, len, flags, next), raw)) in descs.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc += 1;
            let linked = !raw && flags & VRING_DESC_F_INDIRECT as u16 == 0;
            let (flags, next) = match (linked, i < last) {
                (true, true) => (flags | VRING_DESC_F_NEXT as u16, index + 1),
                (true, false) => (flags & !(VRING_DESC_F_NEXT as u16), 0),
                (false, _) => (flags, next),
            };
            self.store(mem, index, (addr, len, flags, next));
        }
        self.post_head(mem, head);
        Some(head)
    }

    /// Writes descriptor `index` (modulo the size) as given.
    pub fn store(&self, mem: &GuestMemoryMmap, index: u16, (addr, len, flags, next): RawDesc) {
        let at = self.base + 16 * u64::from(index % self.size);
        let _ = mem.write_obj(Descriptor::new(addr, len, flags, next), GuestAddress(at));
    }

    /// Makes `head` (any value: out of range is the device's problem) available.
    pub fn post_head(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.next_avail % self.size);
        let _ = mem.write_obj(head, GuestAddress(self.base + AVAIL_OFFSET + 4 + 2 * slot));
        self.next_avail = self.next_avail.wrapping_add(1);
        let _ = mem.write_obj(self.next_avail, GuestAddress(self.base + AVAIL_OFFSET + 2));
    }

    /// Sets `used_event` (after the available ring).
    pub fn set_used_event(&self, mem: &GuestMemoryMmap, value: u16) {
        let at = self.base + AVAIL_OFFSET + 4 + 2 * u64::from(self.size);
        let _ = mem.write_obj(value, GuestAddress(at));
    }

    /// Chains made available so far.
    pub fn available(&self) -> u16 {
        self.next_avail
    }

    /// The used index the device published.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.base + USED_OFFSET + 2))
            .unwrap_or(0)
    }

    /// Used entries (head id, length) published since the last call.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx = self.used_idx(mem);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.size);
            let at = self.base + USED_OFFSET + 4 + 8 * slot;
            let elem: [u32; 2] = mem.read_obj(GuestAddress(at)).unwrap_or([0; 2]);
            out.push((elem[0], elem[1]));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Descriptor `index` as the device would read it.
    pub fn descriptor(&self, mem: &GuestMemoryMmap, index: u16) -> Descriptor {
        let at = self.base + 16 * u64::from(index % self.size);
        mem.read_obj(GuestAddress(at))
            .unwrap_or(Descriptor::new(0, 0, 0, 0))
    }
}
