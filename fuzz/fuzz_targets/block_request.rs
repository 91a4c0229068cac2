//! Fuzzes virtio-blk's guest surface: chains in a split queue, parsed and executed by a queue
//! worker with the synchronous engine against a small disk image.
//!
//! Inputs are structured and mostly valid (header, data, status in the usual places, sizes
//! in sectors) so the fuzzer reaches the request paths; each descriptor can be replaced by a
//! raw one (any address, length, flags, next) to hit the rejection paths. Invariant checked
//! on every input: the device either returns every available chain to the used ring, or
//! reports the queue broken; it never panics.

#![no_main]

use std::fs::{File, OpenOptions};
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use devices::virtio::block::fuzzing::run_queue;
use devices::virtio::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Guest memory: 256 KiB.
const MEM_BYTES: usize = 0x4_0000;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
/// Headers, 16 bytes apart; statuses, 1 byte apart; segments for discard, 16 apart.
const HEADERS: u64 = 0x3000;
const STATUSES: u64 = 0x3800;
const SEGMENTS: u64 = 0x3c00;
/// Data buffers: the rest of memory.
const DATA: u64 = 0x1_0000;
/// The disk: 64 KiB (128 sectors).
const DISK_BYTES: u64 = 0x1_0000;
const DISK_SECTORS: u64 = DISK_BYTES / 512;

#[derive(Arbitrary, Debug)]
enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Discard { sector: u8, sectors: u8, flags: u8 },
    WriteZeroes { sector: u8, sectors: u8, flags: u8 },
    Raw(u32),
}

#[derive(Arbitrary, Debug)]
enum Desc {
    /// A data buffer of `sectors` sectors (0 allowed) at data slot `slot`.
    Data {
        slot: u8,
        sectors: u8,
        extra_bytes: u8,
    },
    /// Anything at all.
    Raw {
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    },
}

#[derive(Arbitrary, Debug)]
struct Chain {
    kind: Kind,
    /// In sectors; wraps around a little past the disk's end to hit the range check.
    sector: u16,
    /// Overrides the computed sector with an arbitrary one.
    raw_sector: Option<u64>,
    data: Vec<Desc>,
    /// Replaces the header or status descriptor with a raw one.
    raw_header: Option<Desc>,
    raw_status: Option<Desc>,
    /// Flips the direction of the data descriptors.
    flip_data: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Queue size is 4 << (this % 4): 4 to 32.
    size_shift: u8,
    event_idx: bool,
    readonly: bool,
    chains: Vec<Chain>,
    /// Extra available-ring entries pointing anywhere.
    stray_heads: Vec<u16>,
}

fn disk() -> Arc<File> {
    static DISK: OnceLock<Arc<File>> = OnceLock::new();
    DISK.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("crib-fuzz-disk-{}.img", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("temp disk");
        file.set_len(DISK_BYTES).expect("temp disk size");
        // Unlinked at once: the descriptor keeps it alive until the process exits.
        let _ = std::fs::remove_file(&path);
        Arc::new(file)
    })
    .clone()
}

fn raw(addr: u64, len: u32, flags: u16, next: u16) -> (u64, u32, u16, u16) {
    (addr, len, flags, next)
}

fn data_desc(desc: &Desc, write: bool) -> (u64, u32, u16, u16) {
    match *desc {
        Desc::Data {
            slot,
            sectors,
            extra_bytes,
        } => {
            let len = u32::from(sectors % 16) * 512 + u32::from(extra_bytes % 4);
            let addr = DATA + u64::from(slot % 32) * 0x1000;
            let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            raw(addr, len, flags, 0)
        }
        Desc::Raw {
            addr,
            len,
            flags,
            next,
        } => raw(addr, len, flags, next),
    }
}

fn request_type(kind: &Kind) -> u32 {
    match kind {
        Kind::In => VIRTIO_BLK_T_IN,
        Kind::Out => VIRTIO_BLK_T_OUT,
        Kind::Flush => VIRTIO_BLK_T_FLUSH,
        Kind::GetId => VIRTIO_BLK_T_GET_ID,
        Kind::Discard { .. } => VIRTIO_BLK_T_DISCARD,
        Kind::WriteZeroes { .. } => VIRTIO_BLK_T_WRITE_ZEROES,
        Kind::Raw(t) => *t,
    }
}

fuzz_target!(|input: Input| {
    let size: u16 = 4 << (input.size_shift % 4);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).expect("guest memory");
    let mut next_desc: u16 = 0;
    let mut heads = Vec::new();

    for (i, chain) in input.chains.iter().take(usize::from(size)).enumerate() {
        let i = i as u64;
        let header_addr = HEADERS + 16 * i;
        let status_addr = STATUSES + i;
        let segment_addr = SEGMENTS + 16 * i;
        let sector = chain
            .raw_sector
            .unwrap_or(u64::from(chain.sector) % (DISK_SECTORS + 8));
        let _ = mem.write_obj(request_type(&chain.kind).to_le(), GuestAddress(header_addr));
        let _ = mem.write_obj(0u32, GuestAddress(header_addr + 4));
        let _ = mem.write_obj(sector.to_le(), GuestAddress(header_addr + 8));

        let mut descs = vec![match &chain.raw_header {
            Some(d) => data_desc(d, false),
            None => raw(header_addr, 16, 0, 0),
        }];
        let device_writes = matches!(chain.kind, Kind::In | Kind::GetId) != chain.flip_data;
        match chain.kind {
            Kind::Discard {
                sector,
                sectors,
                flags,
            }
            | Kind::WriteZeroes {
                sector,
                sectors,
                flags,
            } => {
                let _ = mem.write_obj(u64::from(sector).to_le(), GuestAddress(segment_addr));
                let _ = mem.write_obj(u32::from(sectors).to_le(), GuestAddress(segment_addr + 8));
                let _ = mem.write_obj(
                    u32::from(flags % 4).to_le(),
                    GuestAddress(segment_addr + 12),
                );
                let flags = if chain.flip_data {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                descs.push(raw(segment_addr, 16, flags, 0));
            }
            _ => {}
        }
        descs.extend(
            chain
                .data
                .iter()
                .take(8)
                .map(|d| data_desc(d, device_writes)),
        );
        descs.push(match &chain.raw_status {
            Some(d) => data_desc(d, true),
            None => raw(status_addr, 1, VRING_DESC_F_WRITE as u16, 0),
        });

        if usize::from(next_desc) + descs.len() > usize::from(size) {
            break;
        }
        heads.push(next_desc);
        let last = descs.len() - 1;
        for (j, (addr, len, flags, next)) in descs.into_iter().enumerate() {
            let index = next_desc;
            next_desc += 1;
            let raw_desc = matches!(flags & (VRING_DESC_F_INDIRECT as u16), 0) && next == 0;
            // Structured descriptors are linked in order; raw ones keep their own links.
            let (flags, next) = if raw_desc && j < last {
                (flags | VRING_DESC_F_NEXT as u16, next_desc)
            } else if raw_desc {
                (flags & !(VRING_DESC_F_NEXT as u16), 0)
            } else {
                (flags, next)
            };
            let desc = Descriptor::new(addr, len, flags, next);
            let _ = mem.write_obj(desc, GuestAddress(DESC_TABLE + 16 * u64::from(index)));
        }
    }
    heads.extend(input.stray_heads.iter().copied().take(4));

    for (i, head) in heads.iter().enumerate() {
        let slot = (i % usize::from(size)) as u64;
        let _ = mem.write_obj(head.to_le(), GuestAddress(AVAIL_RING + 4 + 2 * slot));
    }
    let avail_idx = heads.len() as u16;
    let _ = mem.write_obj(avail_idx.to_le(), GuestAddress(AVAIL_RING + 2));

    let mut queue = Queue::new(size).expect("queue");
    queue.set_size(size);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_event_idx(input.event_idx);
    queue.set_ready(true);

    let out = run_queue(&mem, queue, disk(), input.readonly);
    assert!(
        out.broken || out.used == out.available,
        "chains lost: {out:?}"
    );
});
