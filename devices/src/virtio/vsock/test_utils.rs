//! Helpers of the vsock unit tests: a guest driver over plain memory (RX, TX and event
//! rings with their buffers), a worker harness pumped from the test thread, temporary
//! socket paths, and a recording interrupt.
//!
//! The rings use `MockSplitQueue` for the descriptor table and available ring, with the
//! used ring moved past the available ring: virtio-queue 0.18's mock starts the used ring
//! `len` bytes after the available ring instead of `4 + 2 * len`, and these tests post
//! many more chains than half a ring.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use crate::virtio::block::test_utils::{wait_for, RecordingInterrupt};

use super::metrics::VsockMetrics;
use super::muxer::Muxer;
use super::packet::{Header, HEADER_BYTES};
use super::worker::{VsockWorker, WorkerError, WorkerEvents, WorkerParams};
use super::{HOST_CID, TYPE_STREAM};
use crate::virtio::GuestMemoryMmap;

/// The guest CID of the tests.
pub const GUEST_CID: u64 = 42;
/// The `buf_alloc` the test guest advertises.
pub const GUEST_BUF_ALLOC: u32 = 256 << 10;
/// Size of each test queue.
pub const TEST_QUEUE_SIZE: u16 = 128;
/// Guest memory of the tests: 8 MiB from address 0.
pub const MEM_BYTES: usize = 8 << 20;
/// Data bytes of each RX buffer (Linux posts 4 KiB).
pub const RX_DATA_BYTES: u32 = 4096;
/// Data bytes of each TX buffer: one full packet.
pub const TX_DATA_BYTES: u32 = 64 << 10;

/// Where each ring's descriptor table, available and used rings go (8 KiB apiece).
const RINGS_BASE: u64 = 0;
const RING_AREA_BYTES: u64 = 0x2000;
/// The used ring's offset in its area, past the available ring.
const USED_RING_OFFSET: u64 = 0x1800;
/// Where the buffers start.
const BUFFERS_BASE: u64 = 0x1_0000;

/// 8 MiB of guest memory at address 0.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).unwrap()
}

/// A header as the test guest sends it: from `src_port` of the guest to `dst_port` of the
/// host, a stream, with the test guest's credit.
pub fn guest_header(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF_ALLOC,
        fwd_cnt: 0,
    }
}

/// A socket path under the temp directory, unique per process and call.
pub fn temp_socket_path(name: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("crib-vsock-{name}-{}-{n}.sock", std::process::id()))
}

/// One descriptor as (address, length, device-writable).
pub type Desc = (GuestAddress, u32, bool);

/// The driver side of one split ring. Chain slot `k` uses descriptors `2k` and `2k + 1`
/// and the buffer area at `buffers + k * stride`.
pub struct Ring<'a> {
    mem: &'a GuestMemoryMmap,
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    used_addr: GuestAddress,
    used_seen: u16,
    next_avail: u16,
    buffers: GuestAddress,
    stride: u64,
    free: Vec<u16>,
}

impl<'a> Ring<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, index: u64, buffers: GuestAddress, stride: u64) -> Self {
        let start = GuestAddress(RINGS_BASE + index * RING_AREA_BYTES);
        let vq = MockSplitQueue::create(mem, start, TEST_QUEUE_SIZE);
        let used_addr = start.unchecked_add(USED_RING_OFFSET);
        mem.write_slice(&[0u8; 4], used_addr).unwrap();
        Self {
            mem,
            vq,
            used_addr,
            used_seen: 0,
            next_avail: 0,
            buffers,
            stride,
            free: (0..TEST_QUEUE_SIZE / 2).rev().collect(),
        }
    }

    /// The device's view of the ring.
    pub fn queue(&self) -> Queue {
        let mut q: Queue = self.vq.create_queue().unwrap();
        q.set_used_ring_address(Some(self.used_addr.0 as u32), Some(0));
        q
    }

    /// The buffer area of chain slot `slot`.
    pub fn buffer(&self, slot: u16) -> GuestAddress {
        self.buffers.unchecked_add(u64::from(slot) * self.stride)
    }

    /// Takes a free chain slot.
    pub fn take_slot(&mut self) -> u16 {
        self.free.pop().expect("test ring out of chain slots")
    }

    /// Writes `descs` (one or two) as the chain of `slot` and makes it available.
    pub fn post(&mut self, slot: u16, descs: &[Desc]) {
        assert!((1..=2).contains(&descs.len()));
        let head = slot * 2;
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let mut flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let index = head + i as u16;
            self.store_raw(index, (addr.0, len, flags, index + 1));
        }
        self.post_head(head);
    }

    /// Writes descriptor `index` as given, for tests that build hostile tables.
    pub fn store_raw(&self, index: u16, (addr, len, flags, next): (u64, u32, u16, u16)) {
        let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        self.vq.desc_table().store(index, raw).unwrap();
    }

    /// Makes the chain at descriptor `head` available once more.
    pub fn post_head(&mut self, head: u16) {
        let slot = usize::from(self.next_avail % TEST_QUEUE_SIZE);
        self.vq.avail().ring().ref_at(slot).unwrap().store(head);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.vq.avail().idx().store(self.next_avail);
    }

    /// New used entries as (head, len), their slots freed.
    pub fn take_used(&mut self) -> Vec<(u16, u32)> {
        let idx: u16 = self.mem.read_obj(self.used_addr.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self
                .used_addr
                .unchecked_add(4 + 8 * u64::from(self.used_seen % TEST_QUEUE_SIZE));
            let elem: [u32; 2] = self.mem.read_obj(at).unwrap();
            let head = u16::try_from(elem[0]).unwrap();
            out.push((head, elem[1]));
            self.free.push(head / 2);
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// All used entries the device ever added.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(self.used_addr.unchecked_add(2)).unwrap()
    }

    /// Sets `used_event` (after the available ring): the driver wants an interrupt only
    /// once the used index passes it.
    pub fn set_used_event(&self, value: u16) {
        let addr = self
            .vq
            .avail_addr()
            .unchecked_add(4 + 2 * u64::from(TEST_QUEUE_SIZE));
        self.mem.write_obj(value, addr).unwrap();
    }

    /// `avail_event` (after the used ring): where the device wants the next kick.
    pub fn avail_event(&self) -> u16 {
        let addr = self
            .used_addr
            .unchecked_add(4 + 8 * u64::from(TEST_QUEUE_SIZE));
        self.mem.read_obj(addr).unwrap()
    }

    /// Chains made available that the device has not used yet.
    pub fn outstanding(&self) -> u16 {
        self.next_avail.wrapping_sub(self.used_idx())
    }
}

/// The guest's vsock driver, in plain memory.
pub struct GuestDriver<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub rx: Ring<'a>,
    pub tx: Ring<'a>,
    pub event: Ring<'a>,
}

impl<'a> GuestDriver<'a> {
    pub fn new(mem: &'a GuestMemoryMmap) -> Self {
        let half = u64::from(TEST_QUEUE_SIZE / 2);
        let rx_stride = u64::from(HEADER_BYTES as u32 + RX_DATA_BYTES).next_multiple_of(64);
        let tx_stride = u64::from(TX_DATA_BYTES) + 64;
        let rx_base = GuestAddress(BUFFERS_BASE);
        let tx_base = rx_base.unchecked_add(half * rx_stride);
        let event_base = tx_base.unchecked_add(half * tx_stride);
        assert!(event_base.0 + half * 64 <= MEM_BYTES as u64);
        Self {
            mem,
            rx: Ring::new(mem, 0, rx_base, rx_stride),
            tx: Ring::new(mem, 1, tx_base, tx_stride),
            event: Ring::new(mem, 2, event_base, 64),
        }
    }

    /// Posts an RX chain (header descriptor, data descriptor) in every free slot.
    pub fn fill_rx(&mut self) {
        while let Some(slot) = self.rx.free.pop() {
            let buf = self.rx.buffer(slot);
            self.rx.post(
                slot,
                &[
                    (buf, HEADER_BYTES as u32, true),
                    (buf.unchecked_add(HEADER_BYTES as u64), RX_DATA_BYTES, true),
                ],
            );
        }
    }

    /// Sends a packet in a well-formed TX chain (header, then data if any); `header.len`
    /// is set to the data's length.
    pub fn send(&mut self, mut header: Header, data: &[u8]) {
        header.len = u32::try_from(data.len()).unwrap();
        self.send_raw_header(header, data);
    }

    /// Sends `header` as is (its `len` may lie) with `data` in the data descriptor.
    pub fn send_raw_header(&mut self, header: Header, data: &[u8]) {
        let slot = self.tx.take_slot();
        let buf = self.tx.buffer(slot);
        self.mem.write_slice(&header.to_bytes(), buf).unwrap();
        let data_addr = buf.unchecked_add(64);
        self.mem.write_slice(data, data_addr).unwrap();
        if data.is_empty() {
            self.tx.post(slot, &[(buf, HEADER_BYTES as u32, false)]);
        } else {
            let len = u32::try_from(data.len()).unwrap();
            self.tx.post(
                slot,
                &[(buf, HEADER_BYTES as u32, false), (data_addr, len, false)],
            );
        }
    }

    /// Sends a custom TX chain; returns its head.
    pub fn send_chain(&mut self, descs: &[Desc]) -> u16 {
        let slot = self.tx.take_slot();
        self.tx.post(slot, descs);
        slot * 2
    }

    /// The TX slot buffer a custom chain may use.
    pub fn tx_buffer(&mut self) -> (u16, GuestAddress) {
        let slot = self.tx.take_slot();
        (slot, self.tx.buffer(slot))
    }

    /// Packets the device put in RX buffers since the last call, their slots freed.
    pub fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.rx
            .take_used()
            .into_iter()
            .filter(|&(_, len)| len as usize >= HEADER_BYTES)
            .map(|(head, len)| {
                let buf = self.rx.buffer(head / 2);
                let mut bytes = [0u8; HEADER_BYTES];
                self.mem.read_slice(&mut bytes, buf).unwrap();
                let header = Header::from_bytes(&bytes);
                let mut data = vec![0u8; len as usize - HEADER_BYTES];
                self.mem
                    .read_slice(&mut data, buf.unchecked_add(HEADER_BYTES as u64))
                    .unwrap();
                assert_eq!(
                    header.len as usize,
                    data.len(),
                    "used length matches header"
                );
                (header, data)
            })
            .collect()
    }
}

/// A worker on a test driver's queues, pumped from the test thread, with its listener at
/// `socket` (removed on drop).
pub struct Harness<'a> {
    pub driver: GuestDriver<'a>,
    pub worker: VsockWorker,
    pub socket: PathBuf,
    pub interrupt: Arc<RecordingInterrupt>,
    pub metrics: Arc<VsockMetrics>,
    rx_kick: EventFd,
    tx_kick: EventFd,
    /// Packets received but not yet looked at by the test.
    pub inbox: Vec<(Header, Vec<u8>)>,
}

impl<'a> Harness<'a> {
    pub fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self::build(mem, false)
    }

    /// A harness whose queues negotiated `VIRTIO_RING_F_EVENT_IDX`.
    pub fn with_event_idx(mem: &'a GuestMemoryMmap) -> Self {
        Self::build(mem, true)
    }

    fn build(mem: &'a GuestMemoryMmap, event_idx: bool) -> Self {
        let driver = GuestDriver::new(mem);
        let socket = temp_socket_path("harness");
        let listener = UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let metrics = Arc::new(VsockMetrics::default());
        let muxer = Muxer::new(GUEST_CID, socket.clone(), listener, metrics.clone());
        let rx_kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let tx_kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let events = WorkerEvents {
            rx_kick: rx_kick.try_clone().unwrap(),
            tx_kick: tx_kick.try_clone().unwrap(),
            event_kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            kill: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        let interrupt = RecordingInterrupt::new();
        let (mut rx, mut tx) = (driver.rx.queue(), driver.tx.queue());
        rx.set_event_idx(event_idx);
        tx.set_event_idx(event_idx);
        let params = WorkerParams {
            guest_cid: GUEST_CID,
            metrics: metrics.clone(),
        };
        let mut worker = VsockWorker::new(
            params,
            mem.clone(),
            interrupt.clone(),
            rx,
            tx,
            muxer,
            events,
        )
        .unwrap();
        worker.start().unwrap();
        Self {
            driver,
            worker,
            socket,
            interrupt,
            metrics,
            rx_kick,
            tx_kick,
            inbox: Vec::new(),
        }
    }

    /// Sends a packet from the guest and kicks the TX queue.
    pub fn send(&mut self, header: Header, data: &[u8]) {
        self.driver.send(header, data);
        self.tx_kick.write(1).unwrap();
    }

    /// Kicks the TX queue (after custom chains).
    pub fn kick_tx(&mut self) {
        self.tx_kick.write(1).unwrap();
    }

    /// Refills RX buffers, kicks, and runs one worker turn of at most 5 ms; collects
    /// what the guest received into `inbox` and reclaims used TX chains.
    pub fn pump(&mut self) {
        assert!(self.try_pump().unwrap());
    }

    /// [`Self::pump`], returning what the worker's turn returned.
    pub fn try_pump(&mut self) -> Result<bool, WorkerError> {
        self.driver.fill_rx();
        self.rx_kick.write(1).unwrap();
        let turned = self.worker.turn(Some(Duration::from_millis(5)))?;
        let got = self.driver.received();
        self.inbox.extend(got);
        self.driver.tx.take_used();
        Ok(turned)
    }

    /// Pumps until `cond` holds (up to five seconds); `false` if it never did.
    pub fn pump_until(&mut self, mut cond: impl FnMut(&mut Self) -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            self.pump();
            if cond(self) {
                return true;
            }
        }
        false
    }

    /// Pumps until a packet matching `pred` arrives; removes and returns it.
    pub fn expect_packet(&mut self, mut pred: impl FnMut(&Header) -> bool) -> (Header, Vec<u8>) {
        let found = self.pump_until(|h| h.inbox.iter().any(|(p, _)| pred(p)));
        assert!(found, "no matching packet; got {:?}", self.inbox);
        let i = self.inbox.iter().position(|(p, _)| pred(p)).unwrap();
        self.inbox.remove(i)
    }
}

impl Drop for Harness<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}
