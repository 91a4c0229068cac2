//! Fuzzes virtio-vsock's queues: TX chains carrying packets from the guest (a 44-byte
//! header and data), RX buffers the device fills with packets for the guest, and host
//! sockets that connect to the device's socket and write `CONNECT <port>` lines, data or
//! garbage; all run through the device's worker and muxer
//! (`devices::virtio::vsock::fuzzing::run`).
//!
//! Packets are structured and mostly valid (the guest's and host's CIDs, known ops, stream
//! type, ports from two small sets so a REQUEST, the data after it and the SHUTDOWN meet one
//! connection, a length matching the data), queued before the device starts or in answer
//! to what it sent, between turns; any field can be anything, and descriptors can be raw,
//! to hit the rejection paths. Invariants: no input panics; the worker either
//! reports a queue broken or returns every TX chain; every packet the device writes to an
//! RX buffer goes to this guest's CID, comes from the host's CID unless it is an RST, and
//! has a used length of its header and exactly `len` bytes of data; the device's packet
//! counters match the used rings.

#![no_main]

use arbitrary::Arbitrary;
use crib_fuzz::ring::{RawDesc, Ring, RING_AREA_BYTES};
use devices::virtio::vsock::fuzzing::{run, FIRST_HOST_PORT, GUEST_CID, LISTENING_PORT};
use devices::virtio::vsock::{
    HOST_CID, MAX_PKT_DATA_BYTES, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
    OP_RST, OP_RW, OP_SHUTDOWN, TYPE_STREAM,
};
use devices::virtio::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

/// Guest memory: 2 MiB.
const MEM_BYTES: usize = 0x20_0000;
const HEADER_BYTES: usize = 44;
/// TX packets: 32 slots of 16 KiB from here; RX buffers: 64 slots of 4 KiB + header after.
const TX_BUFFERS: u64 = 0x1_0000;
const TX_SLOT: u64 = 0x4000;
const RX_BUFFERS: u64 = 0x10_0000;
const RX_SLOT: u64 = 0x1100;
const RX_DATA_BYTES: u32 = 4096;
/// Guest ports: an ephemeral one and the one a host `CONNECT` asks for.
const GUEST_PORTS: &[u32] = &[49152, 5000];
/// Host ports: the listening one, another with no listener, the first a host-initiated
/// connection gets.
const HOST_PORTS: &[u32] = &[LISTENING_PORT, 6000, FIRST_HOST_PORT];

#[derive(Arbitrary, Debug)]
enum Op {
    Request,
    Response,
    Rst,
    Shutdown,
    Rw,
    CreditUpdate,
    CreditRequest,
}

/// The fields a well-behaved driver gets right, anything.
#[derive(Arbitrary, Debug)]
struct Weird {
    src_cid: Option<u64>,
    dst_cid: Option<u64>,
    ports: Option<(u32, u32)>,
    len: Option<u32>,
    type_: Option<u16>,
    op: Option<u16>,
    raw_header: Option<RawParts>,
    /// Header and data in one descriptor (virtio-vsock 0.12 wants two).
    one_descriptor: bool,
}

#[derive(Arbitrary, Debug)]
struct Packet {
    op: Op,
    guest_port: u8,
    host_port: u8,
    flags: u8,
    /// The guest's credit; `None`: 256 KiB.
    buf_alloc: Option<u32>,
    fwd_cnt: u32,
    data: Vec<u8>,
    /// Queued before the device starts (0), or before turn 1 or 2, answering it.
    batch: u8,
    weird: Option<Weird>,
}

#[derive(Arbitrary, Debug)]
struct RawParts {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[derive(Arbitrary, Debug)]
enum RxChain {
    /// Header descriptor, then a 4 KiB data descriptor.
    Split,
    /// Header and data in one descriptor.
    Whole,
    /// Only a header.
    HeaderOnly,
    Raw(Vec<RawParts>),
}

#[derive(Arbitrary, Debug)]
enum HostWrite {
    Connect(u8),
    ConnectThen(u8, Vec<u8>),
    Bytes(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    size_shift: u8,
    event_idx: bool,
    packets: Vec<Packet>,
    rx: Vec<RxChain>,
    host: Vec<HostWrite>,
    stray_heads: Vec<(bool, u16)>,
    turns: u8,
}

fn raw(p: &RawParts) -> (RawDesc, bool) {
    let addr = p.addr % (MEM_BYTES as u64 + 0x1000);
    ((addr, p.len, p.flags, p.next), true)
}

fn header(p: &Packet) -> [u8; HEADER_BYTES] {
    let none = Weird {
        src_cid: None,
        dst_cid: None,
        ports: None,
        len: None,
        type_: None,
        op: None,
        raw_header: None,
        one_descriptor: false,
    };
    let w = p.weird.as_ref().unwrap_or(&none);
    let (src_port, dst_port) = w.ports.unwrap_or((
        GUEST_PORTS[usize::from(p.guest_port) % GUEST_PORTS.len()],
        HOST_PORTS[usize::from(p.host_port) % HOST_PORTS.len()],
    ));
    let op = match p.op {
        Op::Request => OP_REQUEST,
        Op::Response => OP_RESPONSE,
        Op::Rst => OP_RST,
        Op::Shutdown => OP_SHUTDOWN,
        Op::Rw => OP_RW,
        Op::CreditUpdate => OP_CREDIT_UPDATE,
        Op::CreditRequest => OP_CREDIT_REQUEST,
    };
    // Only RW carries data.
    let data_len = if op == OP_RW { p.data.len() as u32 } else { 0 };
    let mut h = [0u8; HEADER_BYTES];
    h[0..8].copy_from_slice(&w.src_cid.unwrap_or(GUEST_CID).to_le_bytes());
    h[8..16].copy_from_slice(&w.dst_cid.unwrap_or(HOST_CID).to_le_bytes());
    h[16..20].copy_from_slice(&src_port.to_le_bytes());
    h[20..24].copy_from_slice(&dst_port.to_le_bytes());
    h[24..28].copy_from_slice(&w.len.unwrap_or(data_len).to_le_bytes());
    h[28..30].copy_from_slice(&w.type_.unwrap_or(TYPE_STREAM).to_le_bytes());
    h[30..32].copy_from_slice(&w.op.unwrap_or(op).to_le_bytes());
    h[32..36].copy_from_slice(&u32::from(p.flags % 4).to_le_bytes());
    h[36..40].copy_from_slice(&p.buf_alloc.unwrap_or(256 << 10).to_le_bytes());
    h[40..44].copy_from_slice(&p.fwd_cnt.to_le_bytes());
    h
}

/// Queues packet `i` of `p` as a TX chain.
fn send(mem: &GuestMemoryMmap, tx: &mut Ring, i: usize, p: &Packet) {
    let addr = TX_BUFFERS + i as u64 * TX_SLOT;
    let data = if matches!(p.op, Op::Rw) || p.weird.is_some() {
        &p.data[..p.data.len().min((TX_SLOT as usize) - 64)]
    } else {
        &[]
    };
    let one_descriptor = p.weird.as_ref().is_some_and(|w| w.one_descriptor);
    let _ = mem.write_slice(&header(p), GuestAddress(addr));
    let data_addr = addr
        + if one_descriptor {
            HEADER_BYTES as u64
        } else {
            64
        };
    let _ = mem.write_slice(data, GuestAddress(data_addr));
    let head = match p.weird.as_ref().and_then(|w| w.raw_header.as_ref()) {
        Some(r) => raw(r),
        None if one_descriptor => ((addr, (HEADER_BYTES + data.len()) as u32, 0, 0), false),
        None => ((addr, HEADER_BYTES as u32, 0, 0), false),
    };
    let mut descs = vec![head];
    if !one_descriptor && !data.is_empty() {
        descs.push(((data_addr, data.len() as u32, 0, 0), false));
    }
    let _ = tx.post(mem, &descs);
}

fuzz_target!(|input: Input| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).expect("memory");
    let size: u16 = 4 << (input.size_shift % 5);
    let mut rx = Ring::new(&mem, 0, size);
    let mut tx = Ring::new(&mem, RING_AREA_BYTES, size);

    let packets: Vec<&Packet> = input.packets.iter().take(32).collect();
    for (i, p) in packets.iter().enumerate() {
        if p.batch % 3 == 0 {
            send(&mem, &mut tx, i, p);
        }
    }
    let write = VRING_DESC_F_WRITE as u16;
    for (i, chain) in input.rx.iter().enumerate().take(64) {
        let addr = RX_BUFFERS + i as u64 * RX_SLOT;
        let h = HEADER_BYTES as u32;
        let descs = match chain {
            RxChain::Split => vec![
                ((addr, h, write, 0), false),
                ((addr + 64, RX_DATA_BYTES, write, 0), false),
            ],
            RxChain::Whole => vec![((addr, h + RX_DATA_BYTES, write, 0), false)],
            RxChain::HeaderOnly => vec![((addr, h, write, 0), false)],
            RxChain::Raw(parts) => parts.iter().take(3).map(raw).collect(),
        };
        let _ = rx.post(&mem, &descs);
    }
    for &(is_tx, head) in input.stray_heads.iter().take(2) {
        if is_tx {
            tx.post_head(&mem, head);
        } else {
            rx.post_head(&mem, head);
        }
    }
    let host: Vec<Vec<u8>> = input
        .host
        .iter()
        .take(4)
        .map(|w| match w {
            HostWrite::Connect(port) => format!(
                "CONNECT {}\n",
                GUEST_PORTS[usize::from(*port) % GUEST_PORTS.len()]
            )
            .into_bytes(),
            HostWrite::ConnectThen(port, data) => {
                let mut b = format!(
                    "CONNECT {}\n",
                    GUEST_PORTS[usize::from(*port) % GUEST_PORTS.len()]
                )
                .into_bytes();
                b.extend_from_slice(&data[..data.len().min(4096)]);
                b
            }
            HostWrite::Bytes(b) => b[..b.len().min(256)].to_vec(),
        })
        .collect();

    let rx_queue = rx.queue(input.event_idx);
    let tx_queue = tx.queue(input.event_idx);
    let out = run(
        &mem,
        rx_queue,
        tx_queue,
        &host,
        3 + input.turns % 3,
        &mut |turn| {
            for (i, p) in packets.iter().enumerate() {
                if turn > 0 && p.batch % 3 == turn {
                    send(&mem, &mut tx, i, p);
                }
            }
        },
    );

    let tx_used = tx.take_used(&mem);
    if !out.broken {
        assert_eq!(tx_used.len(), usize::from(tx.available()), "TX chains lost");
    }
    let rx_used = rx.take_used(&mem);
    if !out.broken {
        let delivered = rx_used.iter().filter(|(_, len)| *len > 0).count();
        assert_eq!(
            tx_used.len() as u64,
            out.metrics.tx_packets,
            "TX chains not counted"
        );
        assert_eq!(
            delivered as u64, out.metrics.rx_packets,
            "RX packets not counted"
        );
    }
    for (head, len) in rx_used {
        assert!(head < u32::from(size), "RX used head {head}");
        if (len as usize) < HEADER_BYTES {
            continue;
        }
        // Only for chains of the structured kinds: the header is where the head says.
        let desc = rx.descriptor(&mem, head as u16);
        if desc.flags() & VRING_DESC_F_INDIRECT as u16 != 0 || (desc.len() as usize) < HEADER_BYTES
        {
            continue;
        }
        let mut h = [0u8; HEADER_BYTES];
        if mem.read_slice(&mut h, desc.addr()).is_err() {
            continue;
        }
        let word = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().expect("8 bytes"));
        let (src_cid, dst_cid) = (word(0), word(8));
        let pkt_len = u32::from_le_bytes(h[24..28].try_into().expect("4 bytes"));
        let op = u16::from_le_bytes([h[30], h[31]]);
        assert_eq!(dst_cid, GUEST_CID, "a packet for another guest");
        assert!(src_cid == HOST_CID || op == OP_RST, "src {src_cid} op {op}");
        assert!(pkt_len <= MAX_PKT_DATA_BYTES);
        assert_eq!(len as usize, HEADER_BYTES + pkt_len as usize, "used length");
    }
});
