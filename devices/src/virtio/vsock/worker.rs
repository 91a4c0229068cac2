//! The device's one thread (`vsock0`): it owns the RX and TX queues and the [`Muxer`], and
//! epoll-waits on the three queue kicks, a kill eventfd, the listener and every host
//! socket, with the earliest connection timeout as its wait limit.
//!
//! Each turn: handle the ready sockets, expire timeouts, drain the TX queue (the loop of
//! virtio-queue's "Notification suppression", at most one queue size per turn so host
//! sockets are served too), fill RX buffers while the muxer has something for the guest,
//! apply epoll changes, and raise at most one interrupt per queue. When the guest gives no
//! RX buffers the worker stops filling and resumes on the next RX kick.
//!
//! A malformed TX chain is completed (used length 0) and answered by the muxer; an RX chain
//! the device cannot write is completed with length 0, which drivers drop. A broken ring
//! (an available index or head out of range, a ring outside guest memory) stops the worker
//! and marks the device as needing a reset.
//!
//! [`VsockWorker::turn`] is how the worker is woken; tests call it directly, without a
//! thread.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::metrics::{add, inc, VsockMetrics};
use super::muxer::{Muxer, LISTENER_TOKEN};
use super::packet::{self, Header, HEADER_BYTES};
use super::{OP_RW, RX_QUEUE, TX_QUEUE};
use crate::virtio::{GuestMemoryMmap, VirtioInterrupt, VirtioInterruptType};

const RX_KICK: u64 = 0;
const TX_KICK: u64 = 1;
const EVENT_KICK: u64 = 2;
const KILL: u64 = 3;

/// Epoll events handled per wait.
const EVENTS_PER_WAIT: usize = 64;

/// Why a worker stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WorkerError {
    #[error(
        "queue {queue} is broken (a ring outside guest memory, a bad available index or head)"
    )]
    Queue {
        queue: u16,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("epoll failed")]
    Epoll(#[source] io::Error),
}

fn rx_error(source: virtio_queue::Error) -> WorkerError {
    WorkerError::Queue {
        queue: RX_QUEUE,
        source,
    }
}

fn tx_error(source: virtio_queue::Error) -> WorkerError {
    WorkerError::Queue {
        queue: TX_QUEUE,
        source,
    }
}

/// What a worker needs besides its queues, memory, interrupt and muxer.
pub(crate) struct WorkerParams {
    pub guest_cid: u64,
    pub metrics: Arc<VsockMetrics>,
}

/// The eventfds a worker watches besides the host sockets.
pub(crate) struct WorkerEvents {
    pub rx_kick: EventFd,
    pub tx_kick: EventFd,
    pub event_kick: EventFd,
    pub kill: EventFd,
}

/// The device's worker; see the module documentation.
pub(crate) struct VsockWorker {
    guest_cid: u64,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    rx: Queue,
    tx: Queue,
    muxer: Muxer,
    epoll: Epoll,
    events: WorkerEvents,
    metrics: Arc<VsockMetrics>,
    tx_data: Vec<u8>,
    rx_data: Vec<u8>,
    rx_used: bool,
    tx_used: bool,
    /// The RX ring ran dry with packets owed: wait for an RX kick.
    rx_starved: bool,
    /// A TX drain stopped at its cap with chains left.
    tx_more: bool,
    logged_rx_buffer: bool,
    logged_interrupt: bool,
}

impl VsockWorker {
    pub fn new(
        params: WorkerParams,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        rx: Queue,
        tx: Queue,
        muxer: Muxer,
        events: WorkerEvents,
    ) -> Result<Self, WorkerError> {
        let WorkerParams { guest_cid, metrics } = params;
        let epoll = Epoll::new().map_err(WorkerError::Epoll)?;
        for (fd, token) in [
            (events.rx_kick.as_raw_fd(), RX_KICK),
            (events.tx_kick.as_raw_fd(), TX_KICK),
            (events.event_kick.as_raw_fd(), EVENT_KICK),
            (events.kill.as_raw_fd(), KILL),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(WorkerError::Epoll)?;
        }
        Ok(Self {
            guest_cid,
            mem,
            interrupt,
            rx,
            tx,
            muxer,
            epoll,
            events,
            metrics,
            tx_data: Vec::new(),
            rx_data: Vec::new(),
            rx_used: false,
            tx_used: false,
            rx_starved: false,
            tx_more: false,
            logged_rx_buffer: false,
            logged_interrupt: false,
        })
    }

    /// The host side, for tests.
    #[cfg(test)]
    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    /// Runs until killed or broken; host sockets close when the worker is dropped.
    pub fn run(mut self) {
        let result = self.start().and_then(|()| loop {
            if !self.turn(None)? {
                return Ok(());
            }
        });
        if let Err(e) = result {
            tracing::error!(
                cid = self.guest_cid,
                error = %crate::virtio::block::error_chain(&e),
                "vsock worker stopped; the device needs a reset"
            );
            self.interrupt.set_needs_reset();
        }
    }

    /// Serves what the driver queued before the worker started, and registers the listener.
    pub fn start(&mut self) -> Result<(), WorkerError> {
        let now = Instant::now();
        self.process_tx(now)?;
        self.process_rx(now)?;
        self.muxer.sync_epoll(&self.epoll);
        self.signal()
    }

    /// Waits for events, at most `max_wait` (else until the next connection timeout), and
    /// handles them. `false` once killed.
    pub fn turn(&mut self, max_wait: Option<Duration>) -> Result<bool, WorkerError> {
        let timeout_ms = self.wait_ms(max_wait);
        let mut ready = [EpollEvent::default(); EVENTS_PER_WAIT];
        let n = match self.epoll.wait(timeout_ms, &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(WorkerError::Epoll(e)),
        };
        let ready = &ready[..n];
        if ready.iter().any(|e| e.data() == KILL) {
            return Ok(false);
        }
        let now = Instant::now();
        let mut tx_kicked = false;
        for event in ready {
            match event.data() {
                // Reads clear the level-triggered readiness; a failure only means a spurious
                // wake.
                RX_KICK => {
                    let _ = self.events.rx_kick.read();
                    self.rx_starved = false;
                }
                TX_KICK => {
                    let _ = self.events.tx_kick.read();
                    tx_kicked = true;
                }
                // The event queue's buffers stay with the device: nothing to do.
                EVENT_KICK => {
                    let _ = self.events.event_kick.read();
                }
                LISTENER_TOKEN => self.muxer.accept(now),
                token => self.muxer.handle_event(token, event.event_set(), now),
            }
        }
        self.muxer.expire(now);
        if tx_kicked || self.tx_more {
            self.process_tx(now)?;
        }
        self.process_rx(now)?;
        self.muxer.sync_epoll(&self.epoll);
        self.signal()?;
        Ok(true)
    }

    /// The epoll timeout: the next connection timeout, capped by `max_wait`; 0 when TX
    /// chains wait.
    fn wait_ms(&self, max_wait: Option<Duration>) -> i32 {
        if self.tx_more {
            return 0;
        }
        let now = Instant::now();
        let until_deadline = self
            .muxer
            .next_deadline()
            .map(|d| d.saturating_duration_since(now));
        let wait = match (until_deadline, max_wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match wait {
            None => -1,
            // Round up: waking before the deadline would find nothing to do.
            Some(d) => i32::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX),
        }
    }

    /// Takes TX chains (at most one queue size) and hands their packets to the muxer.
    fn process_tx(&mut self, now: Instant) -> Result<(), WorkerError> {
        self.tx_more = false;
        let cap = usize::from(self.tx.size());
        let mut taken = 0usize;
        loop {
            self.tx.disable_notification(&self.mem).map_err(tx_error)?;
            while taken < cap {
                let chain = {
                    let mut iter = self.tx.iter(&self.mem).map_err(tx_error)?;
                    iter.next()
                };
                let Some(chain) = chain else { break };
                taken += 1;
                inc(&self.metrics.tx_packets);
                let head = chain.head_index();
                match packet::parse_tx(&self.mem, chain, self.guest_cid, &mut self.tx_data) {
                    Ok(header) => {
                        if header.op == OP_RW {
                            add(&self.metrics.tx_bytes, u64::from(header.len));
                        }
                        self.muxer.handle_guest_packet(&header, &self.tx_data, now);
                    }
                    Err(rejection) => self.muxer.reject(rejection),
                }
                self.tx.add_used(&self.mem, head, 0).map_err(tx_error)?;
                self.tx_used = true;
            }
            if taken >= cap {
                // Come back after serving the sockets; notifications stay off meanwhile.
                self.tx_more = true;
                return Ok(());
            }
            if !self.tx.enable_notification(&self.mem).map_err(tx_error)? {
                return Ok(());
            }
        }
    }

    /// Fills RX buffers while the muxer has packets for the guest.
    fn process_rx(&mut self, now: Instant) -> Result<(), WorkerError> {
        while !self.rx_starved && self.muxer.has_rx() {
            let chain = {
                let mut iter = self.rx.iter(&self.mem).map_err(rx_error)?;
                iter.next()
            };
            let Some(mut chain) = chain else {
                if !self.rx.enable_notification(&self.mem).map_err(rx_error)? {
                    self.rx_starved = true;
                }
                continue;
            };
            let head = chain.head_index();
            // Buffers larger than a packet are fine: the device fills at most
            // MAX_PKT_DATA_BYTES of them.
            let used = match VsockPacket::from_rx_virtq_chain(&self.mem, &mut chain, u32::MAX) {
                Ok(mut pkt) => {
                    let room = pkt.data_slice().map_or(0, |s| s.len());
                    let Some(header) = self.muxer.next_rx(room, &mut self.rx_data, now) else {
                        // Nothing fits this buffer: leave it for later.
                        self.rx.go_to_previous_position();
                        return Ok(());
                    };
                    if write_rx(&mut pkt, &header, &self.rx_data) {
                        inc(&self.metrics.rx_packets);
                        add(&self.metrics.rx_bytes, u64::from(header.len));
                        // HEADER_BYTES + at most MAX_PKT_DATA_BYTES.
                        u32::try_from(HEADER_BYTES + self.rx_data.len()).unwrap_or(0)
                    } else {
                        self.note_bad_rx_buffer("cannot write an RX buffer");
                        0
                    }
                }
                Err(e) => {
                    self.note_bad_rx_buffer(&e.to_string());
                    0
                }
            };
            self.rx.add_used(&self.mem, head, used).map_err(rx_error)?;
            self.rx_used = true;
        }
        Ok(())
    }

    fn note_bad_rx_buffer(&mut self, what: &str) {
        inc(&self.metrics.invalid_rx_buffers);
        if !self.logged_rx_buffer {
            self.logged_rx_buffer = true;
            tracing::warn!(
                cid = self.guest_cid,
                problem = what,
                "vsock: unusable RX buffer returned empty (logged once)"
            );
        }
    }

    /// One notification check, and at most one interrupt, per queue and turn.
    fn signal(&mut self) -> Result<(), WorkerError> {
        for index in [RX_QUEUE, TX_QUEUE] {
            let (queue, used) = if index == RX_QUEUE {
                (&mut self.rx, &mut self.rx_used)
            } else {
                (&mut self.tx, &mut self.tx_used)
            };
            if !std::mem::take(used) {
                continue;
            }
            let needed =
                queue
                    .needs_notification(&self.mem)
                    .map_err(|source| WorkerError::Queue {
                        queue: index,
                        source,
                    })?;
            if needed {
                if let Err(e) = self.interrupt.trigger(VirtioInterruptType::Queue(index)) {
                    if !self.logged_interrupt {
                        self.logged_interrupt = true;
                        tracing::error!(cid = self.guest_cid, queue = index, error = %e, "vsock: cannot raise interrupt (logged once)");
                    }
                }
            }
        }
        Ok(())
    }
}

/// Writes `header` and `data` into an RX buffer.
fn write_rx(pkt: &mut VsockPacket<'_, ()>, header: &Header, data: &[u8]) -> bool {
    let data_ok = data.is_empty()
        || pkt
            .data_slice()
            .is_some_and(|slice| slice.write_slice(data, 0).is_ok());
    data_ok && pkt.set_header_from_raw(&header.to_bytes()).is_ok()
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::Shutdown;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::{Path, PathBuf};

    use proptest::collection::vec;
    use proptest::prelude::*;
    use vm_memory::{Address, GuestAddress};

    use super::*;
    use crate::virtio::vsock::muxer::FIRST_EPHEMERAL_PORT;
    use crate::virtio::vsock::test_utils::{
        guest_header, guest_memory, Harness, GUEST_BUF_ALLOC, GUEST_CID, MEM_BYTES, TEST_QUEUE_SIZE,
    };
    use crate::virtio::vsock::{
        CONN_BUF_BYTES, HOST_CID, MAX_PKT_DATA_BYTES, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE,
        OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, SHUTDOWN_BOTH, SHUTDOWN_SEND, TYPE_STREAM,
    };

    /// The guest port the tests' guest listens on.
    const GUEST_PORT: u32 = 5000;
    /// A guest-side ephemeral port for guest-initiated connections.
    const GUEST_EPHEMERAL: u32 = 49152;

    fn is_rst_for(p: &Header, src_port: u32, dst_port: u32) -> bool {
        p.op == OP_RST && p.src_port == src_port && p.dst_port == dst_port
    }

    /// `<socket>_<port>`.
    fn port_path(socket: &Path, port: u32) -> PathBuf {
        PathBuf::from(format!("{}_{port}", socket.display()))
    }

    /// A host process connects and asks for `port`; the guest accepts with `buf_alloc`
    /// of credit. Returns the host socket (non-blocking) and the host port it got.
    fn connect_from_host(h: &mut Harness<'_>, port: u32, buf_alloc: u32) -> (UnixStream, u32) {
        let mut host = UnixStream::connect(&h.socket).unwrap();
        host.write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        let (req, _) = h.expect_packet(|p| p.op == OP_REQUEST && p.dst_port == port);
        let mut resp = guest_header(OP_RESPONSE, port, req.src_port);
        resp.buf_alloc = buf_alloc;
        h.send(resp, &[]);
        host.set_nonblocking(true).unwrap();
        let line = read_host(h, &mut host, format!("OK {}\n", req.src_port).len());
        assert_eq!(line, format!("OK {}\n", req.src_port).into_bytes());
        (host, req.src_port)
    }

    /// Pumps until `n` bytes came out of the (non-blocking) host socket.
    fn read_host(h: &mut Harness<'_>, host: &mut UnixStream, n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let done = h.pump_until(|_| {
            let mut buf = [0u8; 4096];
            while got.len() < n {
                match host.read(&mut buf[..(n - got.len()).min(4096)]) {
                    Ok(0) => break,
                    Ok(k) => got.extend_from_slice(&buf[..k]),
                    Err(_) => break,
                }
            }
            got.len() >= n
        });
        assert!(done, "host got {} of {n} bytes", got.len());
        got
    }

    /// Pumps until the host socket reads EOF (or a reset).
    fn host_sees_eof(h: &mut Harness<'_>, host: &mut UnixStream) -> bool {
        h.pump_until(|_| {
            let mut buf = [0u8; 256];
            loop {
                match host.read(&mut buf) {
                    Ok(0) => return true,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                    Err(_) => return true,
                }
            }
        })
    }

    /// Guest data received so far on (host port `src`, guest port `dst`), from the inbox.
    fn take_data(h: &mut Harness<'_>, src: u32, dst: u32) -> Vec<u8> {
        let mut data = Vec::new();
        h.inbox.retain(|(p, d)| {
            if p.op == OP_RW && p.src_port == src && p.dst_port == dst {
                data.extend_from_slice(d);
                false
            } else {
                true
            }
        });
        data
    }

    // --- Malformed packets ---------------------------------------------------------------

    #[test]
    fn header_descriptor_too_short_is_completed_without_reply() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let (slot, buf) = h.driver.tx_buffer();
        h.driver.tx.post(slot, &[(buf, 20, false)]);
        h.kick_tx();

        h.pump();
        h.pump();

        assert_eq!(h.driver.tx.outstanding(), 0);
        assert!(h.inbox.is_empty());
        assert_eq!(h.metrics.snapshot().invalid_packets, 1);
    }

    #[test]
    fn header_outside_guest_memory_is_completed_and_queue_goes_on() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let outside = GuestAddress(MEM_BYTES as u64 + 0x1000);
        h.driver
            .send_chain(&[(outside, HEADER_BYTES as u32, false)]);
        h.send(guest_header(OP_RW, GUEST_EPHEMERAL, 77), b"x");

        let (rst, _) = h.expect_packet(|p| p.op == OP_RST);

        assert_eq!((rst.src_port, rst.dst_port), (77, GUEST_EPHEMERAL));
        assert_eq!(h.driver.tx.outstanding(), 0);
        assert_eq!(h.metrics.snapshot().invalid_packets, 2);
    }

    #[test]
    fn write_only_tx_descriptor_is_completed_without_reply() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let (slot, buf) = h.driver.tx_buffer();
        mem.write_slice(&guest_header(OP_RW, 1, 2).to_bytes(), buf)
            .unwrap();
        h.driver.tx.post(slot, &[(buf, HEADER_BYTES as u32, true)]);
        h.kick_tx();

        h.pump();
        h.pump();

        assert_eq!(h.driver.tx.outstanding(), 0);
        assert!(h.inbox.is_empty());
    }

    #[test]
    fn len_without_data_descriptor_gets_rst() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let mut hdr = guest_header(OP_RW, GUEST_EPHEMERAL, 80);
        hdr.len = 100;
        h.driver.send_raw_header(hdr, &[]);
        h.kick_tx();

        let (rst, _) = h.expect_packet(|p| p.op == OP_RST);

        assert_eq!((rst.src_port, rst.dst_port), (80, GUEST_EPHEMERAL));
        assert_eq!(h.metrics.snapshot().invalid_packets, 1);
    }

    #[test]
    fn len_beyond_data_descriptor_gets_rst() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let mut hdr = guest_header(OP_RW, GUEST_EPHEMERAL, 80);
        hdr.len = 200;
        h.driver.send_raw_header(hdr, &[1u8; 100]);
        h.kick_tx();

        let (rst, _) = h.expect_packet(|p| p.op == OP_RST);

        assert_eq!((rst.src_port, rst.dst_port), (80, GUEST_EPHEMERAL));
    }

    #[test]
    fn len_over_64k_gets_rst() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let mut hdr = guest_header(OP_RW, GUEST_EPHEMERAL, 80);
        hdr.len = MAX_PKT_DATA_BYTES + 1;
        let data = vec![0u8; (MAX_PKT_DATA_BYTES + 1) as usize];
        let (slot, buf) = h.driver.tx_buffer();
        mem.write_slice(&hdr.to_bytes(), buf).unwrap();
        // Header and data in one descriptor, as Linux 6.2+ sends them.
        mem.write_slice(&data[..64], buf.unchecked_add(HEADER_BYTES as u64))
            .unwrap();
        h.driver
            .tx
            .post(slot, &[(buf, HEADER_BYTES as u32 + hdr.len, false)]);
        h.kick_tx();

        let (rst, _) = h.expect_packet(|p| p.op == OP_RST);

        assert_eq!((rst.src_port, rst.dst_port), (80, GUEST_EPHEMERAL));
    }

    #[test]
    fn wrong_src_cid_gets_rst_to_the_guest() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let mut hdr = guest_header(OP_REQUEST, GUEST_EPHEMERAL, 80);
        hdr.src_cid = GUEST_CID + 1;
        h.send(hdr, &[]);

        let (rst, _) = h.expect_packet(|p| p.op == OP_RST);

        assert_eq!((rst.dst_cid, rst.src_cid), (GUEST_CID, HOST_CID));
        assert_eq!((rst.src_port, rst.dst_port), (80, GUEST_EPHEMERAL));
        assert_eq!(h.worker.muxer().connection_count(), 0);
    }

    #[test]
    fn wrong_dst_cid_gets_rst_from_that_cid() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let mut hdr = guest_header(OP_REQUEST, GUEST_EPHEMERAL, 80);
        hdr.dst_cid = 7;
        h.send(hdr, &[]);

        let (rst, _) = h.expect_packet(|p| p.op == OP_RST);

        assert_eq!((rst.src_cid, rst.dst_cid), (7, GUEST_CID));
        assert_eq!(h.metrics.snapshot().invalid_packets, 1);
    }

    #[test]
    fn unknown_op_gets_rst() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        h.send(guest_header(99, GUEST_EPHEMERAL, 80), &[]);

        let (rst, _) = h.expect_packet(|p| p.op == OP_RST);

        assert_eq!((rst.src_port, rst.dst_port), (80, GUEST_EPHEMERAL));
        assert_eq!(h.metrics.snapshot().invalid_packets, 1);
    }

    #[test]
    fn seqpacket_type_gets_rst() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let mut hdr = guest_header(OP_REQUEST, GUEST_EPHEMERAL, 80);
        hdr.type_ = 2;
        h.send(hdr, &[]);

        let (rst, _) = h.expect_packet(|p| p.op == OP_RST);

        assert_eq!((rst.src_port, rst.dst_port), (80, GUEST_EPHEMERAL));
        assert_eq!(h.worker.muxer().connection_count(), 0);
    }

    #[test]
    fn rw_on_unknown_connection_gets_rst() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        h.send(guest_header(OP_RW, GUEST_EPHEMERAL, 80), b"hello");

        let (rst, _) = h.expect_packet(|p| p.op == OP_RST);

        assert_eq!((rst.src_port, rst.dst_port), (80, GUEST_EPHEMERAL));
    }

    #[test]
    fn rst_on_unknown_connection_gets_no_reply() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        h.send(guest_header(OP_RST, GUEST_EPHEMERAL, 80), &[]);

        for _ in 0..5 {
            h.pump();
        }

        assert!(h.inbox.is_empty());
        assert_eq!(h.driver.tx.outstanding(), 0);
    }

    #[test]
    fn malformed_rst_gets_no_reply() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let mut hdr = guest_header(OP_RST, GUEST_EPHEMERAL, 80);
        hdr.src_cid = 1;
        h.send(hdr, &[]);

        for _ in 0..5 {
            h.pump();
        }

        assert!(h.inbox.is_empty());
        assert_eq!(h.metrics.snapshot().invalid_packets, 1);
    }

    #[test]
    fn guest_data_beyond_credit_resets_and_closes_host_socket() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        // The host end accepts but never reads.
        let listener = UnixListener::bind(port_path(&h.socket, 6000)).unwrap();
        h.send(guest_header(OP_REQUEST, GUEST_EPHEMERAL, 6000), &[]);
        h.expect_packet(|p| p.op == OP_RESPONSE);
        let (mut host, _) = listener.accept().unwrap();
        let chunk = vec![0xabu8; MAX_PKT_DATA_BYTES as usize];

        // Far more than the socket and CONN_BUF_BYTES hold together.
        let total = 4 * (CONN_BUF_BYTES as usize) / chunk.len() + 16;
        for _ in 0..total {
            h.send(guest_header(OP_RW, GUEST_EPHEMERAL, 6000), &chunk);
            h.pump();
            if h.inbox.iter().any(|(p, _)| p.op == OP_RST) {
                break;
            }
        }

        let (rst, _) = h.expect_packet(|p| p.op == OP_RST);
        assert_eq!((rst.src_port, rst.dst_port), (6000, GUEST_EPHEMERAL));
        assert_eq!(h.worker.muxer().connection_count(), 0);
        host.set_nonblocking(true).unwrap();
        assert!(host_sees_eof(&mut h, &mut host));
        std::fs::remove_file(port_path(&h.socket, 6000)).unwrap();
    }

    #[test]
    fn second_request_for_live_pair_resets_it() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let listener = UnixListener::bind(port_path(&h.socket, 6002)).unwrap();
        h.send(guest_header(OP_REQUEST, GUEST_EPHEMERAL, 6002), &[]);
        h.expect_packet(|p| p.op == OP_RESPONSE);
        let _host = listener.accept().unwrap();

        h.send(guest_header(OP_REQUEST, GUEST_EPHEMERAL, 6002), &[]);

        h.expect_packet(|p| is_rst_for(p, 6002, GUEST_EPHEMERAL));
        assert_eq!(h.worker.muxer().connection_count(), 0);
        std::fs::remove_file(port_path(&h.socket, 6002)).unwrap();
    }

    // --- Host-initiated connections -------------------------------------------------------

    #[test]
    fn host_connect_handshake_then_data_both_ways() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let mut host = UnixStream::connect(&h.socket).unwrap();
        host.write_all(b"CONNECT 5000\n").unwrap();

        let (req, _) = h.expect_packet(|p| p.op == OP_REQUEST);
        assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, GUEST_CID));
        assert_eq!(
            (req.dst_port, req.src_port),
            (GUEST_PORT, FIRST_EPHEMERAL_PORT)
        );
        assert_eq!(req.buf_alloc, CONN_BUF_BYTES);
        h.send(guest_header(OP_RESPONSE, GUEST_PORT, req.src_port), &[]);
        host.set_nonblocking(true).unwrap();
        let ok = read_host(&mut h, &mut host, 14);
        assert_eq!(ok, b"OK 1073741824\n");

        host.write_all(b"ping").unwrap();
        let (data, payload) = h.expect_packet(|p| p.op == OP_RW);
        assert_eq!((data.src_port, data.dst_port), (req.src_port, GUEST_PORT));
        assert_eq!(payload, b"ping");

        h.send(guest_header(OP_RW, GUEST_PORT, req.src_port), b"pong");
        assert_eq!(read_host(&mut h, &mut host, 4), b"pong");
        assert_eq!(h.metrics.snapshot().connections_opened, 1);
    }

    #[test]
    fn host_connect_data_after_line_reaches_guest() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let mut host = UnixStream::connect(&h.socket).unwrap();
        host.write_all(b"CONNECT 5000\nearly").unwrap();
        let (req, _) = h.expect_packet(|p| p.op == OP_REQUEST);

        h.send(guest_header(OP_RESPONSE, GUEST_PORT, req.src_port), &[]);

        let (_, payload) = h.expect_packet(|p| p.op == OP_RW);
        assert_eq!(payload, b"early");
    }

    #[test]
    fn host_connect_refused_by_guest_closes_host_socket() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let mut host = UnixStream::connect(&h.socket).unwrap();
        host.write_all(b"CONNECT 5000\n").unwrap();
        let (req, _) = h.expect_packet(|p| p.op == OP_REQUEST);

        h.send(guest_header(OP_RST, GUEST_PORT, req.src_port), &[]);

        host.set_nonblocking(true).unwrap();
        assert!(host_sees_eof(&mut h, &mut host));
        assert_eq!(h.worker.muxer().connection_count(), 0);
    }

    #[test]
    fn host_bad_connect_line_is_closed() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let mut host = UnixStream::connect(&h.socket).unwrap();
        host.write_all(b"HELLO there\n").unwrap();
        host.set_nonblocking(true).unwrap();

        assert!(host_sees_eof(&mut h, &mut host));
        assert!(h.inbox.is_empty());
    }

    #[test]
    fn host_connections_get_distinct_ports() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let (_a, port_a) = connect_from_host(&mut h, GUEST_PORT, GUEST_BUF_ALLOC);
        let (_b, port_b) = connect_from_host(&mut h, GUEST_PORT, GUEST_BUF_ALLOC);
        assert_ne!(port_a, port_b);
        assert!(port_a >= FIRST_EPHEMERAL_PORT && port_b >= FIRST_EPHEMERAL_PORT);
    }

    #[test]
    fn host_data_beyond_guest_credit_waits_for_credit_update() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let (mut host, port) = connect_from_host(&mut h, GUEST_PORT, 100);
        host.write_all(&[9u8; 250]).unwrap();

        assert!(h.pump_until(|h| h.inbox.iter().any(|(p, _)| p.op == OP_RW)));
        for _ in 0..10 {
            h.pump();
        }
        assert_eq!(take_data(&mut h, port, GUEST_PORT).len(), 100);

        let mut update = guest_header(OP_CREDIT_UPDATE, GUEST_PORT, port);
        update.buf_alloc = 100;
        update.fwd_cnt = 100;
        h.send(update, &[]);
        assert!(h.pump_until(|h| h.inbox.iter().any(|(p, _)| p.op == OP_RW)));
        for _ in 0..10 {
            h.pump();
        }
        assert_eq!(take_data(&mut h, port, GUEST_PORT).len(), 100);

        update.fwd_cnt = 200;
        h.send(update, &[]);
        assert!(h.pump_until(|h| h.inbox.iter().any(|(p, _)| p.op == OP_RW)));
        assert_eq!(take_data(&mut h, port, GUEST_PORT), vec![9u8; 50]);
    }

    #[test]
    fn credit_request_gets_credit_update() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let (_host, port) = connect_from_host(&mut h, GUEST_PORT, GUEST_BUF_ALLOC);

        h.send(guest_header(OP_CREDIT_REQUEST, GUEST_PORT, port), &[]);

        let (update, _) = h.expect_packet(|p| p.op == OP_CREDIT_UPDATE);
        assert_eq!((update.buf_alloc, update.fwd_cnt), (CONN_BUF_BYTES, 0));
    }

    #[test]
    fn host_close_sends_full_shutdown_and_guest_rst_ends_it() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let (host, port) = connect_from_host(&mut h, GUEST_PORT, GUEST_BUF_ALLOC);

        drop(host);

        let (shut, _) = h.expect_packet(|p| p.op == OP_SHUTDOWN);
        assert_eq!((shut.flags, shut.src_port), (SHUTDOWN_BOTH, port));
        h.send(guest_header(OP_RST, GUEST_PORT, port), &[]);
        assert!(h.pump_until(|h| h.worker.muxer().connection_count() == 0));
        assert!(!h.inbox.iter().any(|(p, _)| p.op == OP_RST));
    }

    #[test]
    fn host_half_close_sends_shutdown_send_and_keeps_guest_data_flowing() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let (mut host, port) = connect_from_host(&mut h, GUEST_PORT, GUEST_BUF_ALLOC);
        host.write_all(b"last").unwrap();

        host.shutdown(Shutdown::Write).unwrap();

        let (data, payload) = h.expect_packet(|p| p.op == OP_RW);
        let (shut, _) = h.expect_packet(|p| p.op == OP_SHUTDOWN);
        assert_eq!((data.op, payload.as_slice()), (OP_RW, &b"last"[..]));
        assert_eq!(shut.flags, SHUTDOWN_SEND);
        h.send(guest_header(OP_RW, GUEST_PORT, port), b"reply");
        assert_eq!(read_host(&mut h, &mut host, 5), b"reply");
    }

    #[test]
    fn guest_full_shutdown_gets_rst_and_host_eof() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let (mut host, port) = connect_from_host(&mut h, GUEST_PORT, GUEST_BUF_ALLOC);
        h.send(guest_header(OP_RW, GUEST_PORT, port), b"bye");
        let mut shut = guest_header(OP_SHUTDOWN, GUEST_PORT, port);
        shut.flags = SHUTDOWN_BOTH;

        h.send(shut, &[]);

        h.expect_packet(|p| is_rst_for(p, port, GUEST_PORT));
        assert_eq!(read_host(&mut h, &mut host, 3), b"bye");
        assert!(host_sees_eof(&mut h, &mut host));
        assert_eq!(h.worker.muxer().connection_count(), 0);
    }

    // --- Guest-initiated connections ------------------------------------------------------

    #[test]
    fn guest_connect_reaches_port_socket_then_data_both_ways() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let path = port_path(&h.socket, 1234);
        let listener = UnixListener::bind(&path).unwrap();

        h.send(guest_header(OP_REQUEST, GUEST_EPHEMERAL, 1234), &[]);

        let (resp, _) = h.expect_packet(|p| p.op == OP_RESPONSE);
        assert_eq!((resp.src_port, resp.dst_port), (1234, GUEST_EPHEMERAL));
        assert_eq!((resp.src_cid, resp.dst_cid), (HOST_CID, GUEST_CID));
        let (mut host, _) = listener.accept().unwrap();
        host.set_nonblocking(true).unwrap();
        h.send(guest_header(OP_RW, GUEST_EPHEMERAL, 1234), b"to host");
        assert_eq!(read_host(&mut h, &mut host, 7), b"to host");
        host.write_all(b"to guest").unwrap();
        let (_, payload) = h.expect_packet(|p| p.op == OP_RW);
        assert_eq!(payload, b"to guest");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn guest_connect_with_nothing_listening_gets_rst() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);

        h.send(guest_header(OP_REQUEST, GUEST_EPHEMERAL, 1235), &[]);

        h.expect_packet(|p| is_rst_for(p, 1235, GUEST_EPHEMERAL));
        assert_eq!(h.metrics.snapshot().connections_refused, 1);
        assert_eq!(h.worker.muxer().connection_count(), 0);
    }

    // --- Many connections -----------------------------------------------------------------

    #[test]
    fn hundred_concurrent_host_connections_echo() {
        const CONNECTIONS: usize = 100;
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let mut hosts: Vec<UnixStream> = (0..CONNECTIONS)
            .map(|_| {
                let mut s = UnixStream::connect(&h.socket).unwrap();
                s.write_all(b"CONNECT 7000\n").unwrap();
                s
            })
            .collect();

        // The guest accepts every REQUEST.
        let mut accepted = 0;
        assert!(h.pump_until(|h| {
            let requests: Vec<Header> = h
                .inbox
                .iter()
                .filter(|(p, _)| p.op == OP_REQUEST)
                .map(|(p, _)| *p)
                .collect();
            h.inbox.retain(|(p, _)| p.op != OP_REQUEST);
            for req in requests {
                h.send(guest_header(OP_RESPONSE, 7000, req.src_port), &[]);
                accepted += 1;
            }
            accepted == CONNECTIONS
        }));
        let mut ports = Vec::new();
        for host in &mut hosts {
            host.set_nonblocking(true).unwrap();
            let mut line = Vec::new();
            assert!(h.pump_until(|_| {
                let mut b = [0u8; 1];
                while let Ok(1) = host.read(&mut b) {
                    line.push(b[0]);
                    if b[0] == b'\n' {
                        return true;
                    }
                }
                false
            }));
            let text = String::from_utf8(line).unwrap();
            ports.push(
                text.trim()
                    .strip_prefix("OK ")
                    .unwrap()
                    .parse::<u32>()
                    .unwrap(),
            );
        }
        let unique: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(unique.len(), CONNECTIONS);

        // Every host writes; the guest echoes whatever arrives.
        for (i, host) in hosts.iter_mut().enumerate() {
            host.write_all(format!("message {i:03}").as_bytes())
                .unwrap();
        }
        let mut echoed = 0;
        assert!(h.pump_until(|h| {
            let data: Vec<(Header, Vec<u8>)> = h
                .inbox
                .iter()
                .filter(|(p, _)| p.op == OP_RW)
                .cloned()
                .collect();
            h.inbox.retain(|(p, _)| p.op != OP_RW);
            for (p, d) in data {
                echoed += d.len();
                h.send(guest_header(OP_RW, p.dst_port, p.src_port), &d);
            }
            echoed == CONNECTIONS * 11
        }));
        for (i, host) in hosts.iter_mut().enumerate() {
            let got = read_host(&mut h, host, 11);
            assert_eq!(got, format!("message {i:03}").into_bytes());
        }
        assert_eq!(h.worker.muxer().connection_count(), CONNECTIONS);
    }

    // --- Queue handling ---------------------------------------------------------------------

    #[test]
    fn rx_without_buffers_waits_for_rx_kick() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        h.send(guest_header(OP_RW, GUEST_EPHEMERAL, 80), b"x");
        // No RX buffers: turn without pump (which would post some).
        h.worker.turn(Some(Duration::from_millis(5))).unwrap();
        assert_eq!(h.driver.rx.used_idx(), 0);

        let (rst, _) = h.expect_packet(|p| p.op == OP_RST);

        assert_eq!(rst.dst_port, GUEST_EPHEMERAL);
    }

    #[test]
    fn delivery_raises_rx_interrupt() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        h.send(guest_header(OP_RW, GUEST_EPHEMERAL, 80), b"x");

        h.expect_packet(|p| p.op == OP_RST);

        let irqs = h.interrupt.triggered();
        assert!(irqs.contains(&VirtioInterruptType::Queue(RX_QUEUE)));
        assert!(irqs.contains(&VirtioInterruptType::Queue(TX_QUEUE)));
    }

    #[test]
    fn unusable_rx_buffer_is_returned_empty() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        // A read-only RX buffer, then the normal ones from pump.
        let slot = h.driver.rx.take_slot();
        let buf = h.driver.rx.buffer(slot);
        h.driver.rx.post(slot, &[(buf, 4096, false)]);
        h.send(guest_header(OP_RW, GUEST_EPHEMERAL, 80), b"x");

        h.expect_packet(|p| p.op == OP_RST);

        assert_eq!(h.metrics.snapshot().invalid_rx_buffers, 1);
    }

    #[test]
    fn used_event_ahead_suppresses_rx_interrupt() {
        let mem = guest_memory();
        let mut h = Harness::with_event_idx(&mem);
        h.driver.rx.set_used_event(10);
        h.send(guest_header(OP_RW, GUEST_EPHEMERAL, 80), b"x");

        h.expect_packet(|p| p.op == OP_RST);

        assert!(!h
            .interrupt
            .triggered()
            .contains(&VirtioInterruptType::Queue(RX_QUEUE)));
    }

    #[test]
    fn rx_starved_with_event_idx_asks_for_a_kick_at_next_buffer() {
        let mem = guest_memory();
        let mut h = Harness::with_event_idx(&mem);
        h.send(guest_header(OP_RW, GUEST_EPHEMERAL, 80), b"x");

        h.worker.turn(Some(Duration::from_millis(5))).unwrap();

        // No RX buffer yet: the device wants a kick when buffer 0 arrives.
        assert_eq!(h.driver.rx.used_idx(), 0);
        assert_eq!(h.driver.rx.avail_event(), 0);
        h.expect_packet(|p| p.op == OP_RST);
    }

    #[test]
    fn guest_data_the_socket_cannot_take_is_flushed_when_writable() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        let path = port_path(&h.socket, 6004);
        let listener = UnixListener::bind(&path).unwrap();
        h.send(guest_header(OP_REQUEST, GUEST_EPHEMERAL, 6004), &[]);
        h.expect_packet(|p| p.op == OP_RESPONSE);
        let (mut host, _) = listener.accept().unwrap();
        // 5 x 60000 bytes: more than the socket holds, less than it plus CONN_BUF_BYTES.
        let chunks: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 60_000]).collect();
        for chunk in &chunks {
            h.send(guest_header(OP_RW, GUEST_EPHEMERAL, 6004), chunk);
            h.pump();
        }

        host.set_nonblocking(true).unwrap();
        let got = read_host(&mut h, &mut host, 300_000);

        assert_eq!(got, chunks.concat());
        let (update, _) = h.expect_packet(|p| p.op == OP_CREDIT_UPDATE);
        assert!(update.fwd_cnt >= CONN_BUF_BYTES / 4, "{update:?}");
        assert_eq!(h.worker.muxer().connection_count(), 1);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn avail_head_out_of_range_breaks_the_queue() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem);
        h.driver.tx.post_head(TEST_QUEUE_SIZE + 3);
        h.kick_tx();

        let result = h.worker.turn(Some(Duration::from_millis(5)));

        assert!(matches!(
            result,
            Err(WorkerError::Queue {
                queue: TX_QUEUE,
                ..
            })
        ));
    }

    /// A random header: mostly the guest's and host's CIDs, known ops and small lengths,
    /// sometimes anything.
    fn arb_header() -> impl Strategy<Value = Header> {
        (
            prop_oneof![Just(GUEST_CID), any::<u64>()],
            prop_oneof![Just(HOST_CID), any::<u64>()],
            (prop_oneof![Just(GUEST_EPHEMERAL), any::<u32>()], 0u32..8),
            prop_oneof![0u32..64, Just(MAX_PKT_DATA_BYTES + 1), any::<u32>()],
            (prop_oneof![Just(TYPE_STREAM), any::<u16>()], 0u16..9),
            (any::<u32>(), any::<u32>(), any::<u32>()),
        )
            .prop_map(
                |(
                    src_cid,
                    dst_cid,
                    (src_port, dst_port),
                    len,
                    (type_, op),
                    (flags, buf_alloc, fwd_cnt),
                )| {
                    Header {
                        src_cid,
                        dst_cid,
                        src_port,
                        dst_port,
                        len,
                        type_,
                        op,
                        flags,
                        buf_alloc,
                        fwd_cnt,
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        /// Random packets in well-formed chains, then random raw chains: the worker never
        /// panics, answers only this guest, and either keeps running or reports the queue
        /// broken.
        #[test]
        fn random_packets_and_chains_never_panic_the_worker(
            packets in vec((arb_header(), vec(any::<u8>(), 0..256)), 1..12),
            raw in vec((any::<u64>(), any::<u32>(), 0u16..8, 0u16..(TEST_QUEUE_SIZE + 2)), 0..6),
        ) {
            let mem = guest_memory();
            let mut h = Harness::new(&mem);
            for (header, data) in &packets {
                h.driver.send_raw_header(*header, data);
            }
            for (i, (addr, len, flags, next)) in raw.iter().enumerate() {
                let index = TEST_QUEUE_SIZE - 1 - i as u16;
                h.driver.tx.store_raw(index, (*addr % (MEM_BYTES as u64 + 0x1000), *len, *flags, *next));
                h.driver.tx.post_head(index);
            }
            h.kick_tx();
            for _ in 0..4 {
                match h.try_pump() {
                    Ok(_) => {}
                    Err(WorkerError::Queue { .. }) => break,
                    Err(e) => prop_assert!(false, "unexpected error {}", e),
                }
            }
            // Everything goes to this guest; only an RST answers for a CID the guest
            // wrongly addressed, everything else comes from the host.
            for (header, _) in &h.inbox {
                prop_assert_eq!(header.dst_cid, GUEST_CID);
                prop_assert!(header.src_cid == HOST_CID || header.op == OP_RST, "{:?}", header);
            }
        }
    }
}
