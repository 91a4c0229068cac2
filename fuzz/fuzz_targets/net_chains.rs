//! Fuzzes virtio-net's queues: TX chains (a vnet header and frame data the guest sends to
//! the tap), RX chains (buffers for frames from the tap, mergeable or not) and control
//! queue commands, run through one queue pair's worker against frames waiting on a stand-in
//! tap (`devices::virtio::net::fuzzing::run_pair`).
//!
//! Inputs are structured and mostly valid (descriptors in the usual places with usual sizes,
//! headers where they belong); each descriptor can be raw (any address, length, flags,
//! next) and stray heads can be made available, to hit the rejection paths. Invariants: no
//! input panics; the worker either reports a queue broken or, without a rate limit, returns
//! every TX chain, with used length 0; used entries name heads inside the ring; an RX used
//! length never exceeds a frame and its header; nothing longer than the largest frame
//! reaches the tap.

#![no_main]

use arbitrary::Arbitrary;
use crib_fuzz::ring::{RawDesc, Ring, RING_AREA_BYTES};
use devices::virtio::net::fuzzing::{run_pair, NetSetup};
use devices::virtio::net::{MAX_FRAME_BYTES, VNET_HDR_BYTES};
use devices::virtio::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_net::{VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::{Bytes, GuestAddress};

/// Guest memory: 2 MiB.
const MEM_BYTES: usize = 0x20_0000;
/// Buffers: 64 slots of 16 KiB from here; the last slots run past the end of memory when
/// long.
const BUFFERS: u64 = 0x10_0000;
const SLOT_BYTES: u64 = 0x4000;
/// Buffer lengths a driver uses: a header, an MTU frame, a page, a whole GSO frame.
const LENGTHS: &[u32] = &[
    VNET_HDR_BYTES as u32,
    1526,
    4096,
    0x4000,
    (MAX_FRAME_BYTES + 8) as u32,
    0,
    1,
    11,
];

#[derive(Arbitrary, Debug)]
enum Desc {
    Buffer { slot: u8, len: u8, write: bool },
    Raw(u64, u32, u16, u16),
}

impl Desc {
    fn raw(&self, write_default: bool) -> (RawDesc, bool) {
        match *self {
            Desc::Buffer { slot, len, write } => {
                let addr = BUFFERS + u64::from(slot % 64) * SLOT_BYTES;
                let len = LENGTHS[usize::from(len) % LENGTHS.len()];
                let flags = if write == write_default {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                ((addr, len, flags, 0), false)
            }
            Desc::Raw(addr, len, flags, next) => {
                let addr = addr % (MEM_BYTES as u64 + 0x1000);
                ((addr, len, flags, next), true)
            }
        }
    }
}

#[derive(Arbitrary, Debug)]
struct TxChain {
    /// The vnet header (flags, gso type, lengths...).
    header: [u8; VNET_HDR_BYTES],
    data: Vec<u8>,
    /// Header and data in one descriptor (as Linux does) or two.
    split: bool,
    extra: Vec<Desc>,
}

#[derive(Arbitrary, Debug)]
enum Ctrl {
    PairsSet(u16),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    size_shift: u8,
    event_idx: bool,
    mergeable: bool,
    rate_limited: bool,
    turns: u8,
    tx: Vec<TxChain>,
    rx: Vec<Vec<Desc>>,
    ctrl: Option<Vec<Ctrl>>,
    frames: Vec<(u16, u8)>,
    stray_heads: Vec<(u8, u16)>,
    used_event: Option<u16>,
}

fn post(ring: &mut Ring, mem: &GuestMemoryMmap, descs: &[(RawDesc, bool)]) {
    let _ = ring.post(mem, descs);
}

fuzz_target!(|input: Input| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).expect("memory");
    let size: u16 = 4 << (input.size_shift % 5);
    let mut rx = Ring::new(&mem, 0, size);
    let mut tx = Ring::new(&mem, RING_AREA_BYTES, size);
    let mut ctrl = input
        .ctrl
        .as_ref()
        .map(|_| Ring::new(&mem, 2 * RING_AREA_BYTES, size));

    // TX: each chain's bytes at its own slot.
    for (i, chain) in input.tx.iter().enumerate().take(usize::from(size)) {
        let addr = BUFFERS + (i as u64 % 64) * SLOT_BYTES;
        let data = &chain.data[..chain.data.len().min(0x3000)];
        let _ = mem.write_slice(&chain.header, GuestAddress(addr));
        let _ = mem.write_slice(data, GuestAddress(addr + VNET_HDR_BYTES as u64));
        let hdr = VNET_HDR_BYTES as u32;
        let mut descs = if chain.split {
            vec![
                ((addr, hdr, 0, 0), false),
                ((addr + u64::from(hdr), data.len() as u32, 0, 0), false),
            ]
        } else {
            vec![((addr, hdr + data.len() as u32, 0, 0), false)]
        };
        descs.extend(chain.extra.iter().take(4).map(|d| d.raw(false)));
        post(&mut tx, &mem, &descs);
    }
    // RX: buffers, mostly device-writable.
    for chain in input.rx.iter().take(usize::from(size)) {
        let descs: Vec<_> = chain.iter().take(4).map(|d| d.raw(true)).collect();
        post(&mut rx, &mem, &descs);
    }
    // Control: the command (class, command, data), then the ack byte.
    if let (Some(ring), Some(commands)) = (ctrl.as_mut(), &input.ctrl) {
        for (i, command) in commands.iter().enumerate().take(usize::from(size / 2)) {
            let addr = BUFFERS + 63 * SLOT_BYTES + 64 * i as u64;
            let bytes = match command {
                Ctrl::PairsSet(pairs) => {
                    let mut b = vec![
                        VIRTIO_NET_CTRL_MQ as u8,
                        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
                    ];
                    b.extend_from_slice(&pairs.to_le_bytes());
                    b
                }
                Ctrl::Raw(b) => b[..b.len().min(48)].to_vec(),
            };
            let _ = mem.write_slice(&bytes, GuestAddress(addr));
            post(
                ring,
                &mem,
                &[
                    ((addr, bytes.len() as u32, 0, 0), false),
                    ((addr + 60, 1, VRING_DESC_F_WRITE as u16, 0), false),
                ],
            );
        }
    }
    for &(which, head) in input.stray_heads.iter().take(2) {
        match which % 3 {
            0 => rx.post_head(&mem, head),
            1 => tx.post_head(&mem, head),
            _ => {
                if let Some(ring) = ctrl.as_mut() {
                    ring.post_head(&mem, head);
                }
            }
        }
    }
    if let Some(event) = input.used_event {
        rx.set_used_event(&mem, event);
        tx.set_used_event(&mem, event);
    }
    // Frames from the tap: a length and a fill byte (contents matter little to the device).
    let frames: Vec<Vec<u8>> = input
        .frames
        .iter()
        .take(8)
        .map(|&(len, fill)| vec![fill; usize::from(len) % (MAX_FRAME_BYTES + 16)])
        .collect();

    let setup = NetSetup {
        mergeable: input.mergeable,
        rate_limited: input.rate_limited,
        turns: input.turns % 4,
    };
    let out = run_pair(
        &mem,
        rx.queue(input.event_idx),
        tx.queue(input.event_idx),
        ctrl.as_ref().map(|r| r.queue(input.event_idx)),
        &frames,
        setup,
    );

    let tx_used = tx.take_used(&mem);
    for &(head, len) in &tx_used {
        assert!(head < u32::from(size), "TX used head {head}");
        assert_eq!(len, 0, "TX used length");
    }
    if !out.broken && !input.rate_limited {
        assert_eq!(tx_used.len(), usize::from(tx.available()), "TX chains lost");
    }
    for (head, len) in rx.take_used(&mem) {
        assert!(head < u32::from(size), "RX used head {head}");
        assert!(
            len as usize <= MAX_FRAME_BYTES + VNET_HDR_BYTES,
            "RX used length {len}"
        );
    }
    for len in out.tap_frames {
        assert!(len <= MAX_FRAME_BYTES, "a {len}-byte frame reached the tap");
    }
});
