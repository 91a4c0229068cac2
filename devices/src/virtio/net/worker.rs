//! One queue pair's thread (`net0-q0`, ...): it owns the pair's RX and TX queues, its tap
//! queue and two rate limiters (one per direction), and epoll-waits on the tap (edge
//! triggered), the two kicks, the limiters' timers, a kill eventfd and, for pair 0 of a
//! multiqueue device, the control queue's kick.
//!
//! Each turn: drain the TX queue to the tap (at most one queue size per turn, virtio-queue's
//! "Notification suppression" loop), then read frames from the tap into RX buffers until
//! the tap is empty, the guest has no buffers, or the limiter says wait; then at most one
//! interrupt per queue. A frame read from the tap and not yet delivered is kept; RX chains
//! taken for a frame that does not fit yet are kept too, so nothing is handed back.
//!
//! A broken ring (an available index or head out of range, a ring outside guest memory)
//! stops the worker and marks the device as needing a reset. [`NetWorker::turn`] is how the
//! worker is woken; tests call it directly, without a thread.

use std::collections::VecDeque;
use std::io;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::metrics::{add, NetMetrics};
use super::{MAX_FRAME_BYTES, VNET_HDR_BYTES};
use crate::rate_limiter::{RateLimitConfig, RateLimiter, TokenType};
use crate::virtio::{GuestMemoryMmap, VirtioInterrupt, VirtioInterruptType};

const RX_KICK: u64 = 0;
const TX_KICK: u64 = 1;
const TAP: u64 = 2;
const RX_TIMER: u64 = 3;
const TX_TIMER: u64 = 4;
const KILL: u64 = 5;
const CTRL_KICK: u64 = 6;

const EVENTS_PER_WAIT: usize = 16;
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Largest control command the device reads (class, command and a few data bytes).
const MAX_CTRL_BYTES: usize = 64;

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
    #[error("cannot set up the rate limiter")]
    RateLimiter(#[source] crate::rate_limiter::RateLimiterError),
}

/// What a worker needs besides its queues, memory and interrupt.
pub(crate) struct WorkerParams {
    /// The tap's name, for log lines.
    pub name: String,
    /// `VIRTIO_NET_F_MRG_RXBUF` was negotiated.
    pub mergeable: bool,
    /// Queue pairs of the device, for the control queue's `VQ_PAIRS_SET`.
    pub max_pairs: u16,
    pub rate_limit: RateLimitConfig,
    pub metrics: Arc<NetMetrics>,
}

/// A queue with its index in the device and its kick.
pub(crate) struct WorkerQueue {
    pub index: u16,
    pub queue: Queue,
    pub kick: EventFd,
}

/// A queue pair, and the control queue for pair 0 of a multiqueue device.
pub(crate) struct PairQueues {
    pub rx: WorkerQueue,
    pub tx: WorkerQueue,
    pub ctrl: Option<WorkerQueue>,
}

/// An RX chain checked and taken for the next frame(s).
struct RxChain {
    head: u16,
    buffers: Vec<(GuestAddress, usize)>,
    capacity: usize,
}

enum Delivery {
    /// In RX buffers, or dropped: either way the next frame can be read.
    Done,
    /// Not enough RX buffers yet; the frame waits.
    NoBuffers,
}

/// One queue pair's worker.
pub(crate) struct NetWorker {
    params: WorkerParams,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    tap: OwnedFd,
    rx: WorkerQueue,
    tx: WorkerQueue,
    ctrl: Option<WorkerQueue>,
    /// Watched by `epoll`; kept open for as long as the worker runs.
    _kill: EventFd,
    epoll: Epoll,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    /// The frame read from the tap (vnet header first); `rx_len` bytes are valid.
    rx_frame: Vec<u8>,
    rx_len: Option<usize>,
    /// The pending RX frame has passed the rate limiter.
    rx_admitted: bool,
    rx_chains: VecDeque<RxChain>,
    /// The used elements of the frame being delivered (kept to reuse its allocation).
    rx_batch: Vec<(u16, u32)>,
    /// The RX used index when the worker last decided whether to interrupt.
    rx_signalled: Wrapping<u16>,
    /// The TX frame gathered from a chain, waiting for the limiter: (head, length).
    tx_frame: Vec<u8>,
    tx_pending: Option<(u16, usize)>,
    /// More TX chains may wait (the last turn stopped at its cap).
    tx_more: bool,
    rx_used: bool,
    tx_used: bool,
    ctrl_used: bool,
    logged_tap_error: bool,
    logged_interrupt: bool,
}

fn queue_error(queue: u16) -> impl Fn(virtio_queue::Error) -> WorkerError {
    move |source| WorkerError::Queue { queue, source }
}

/// Takes `len` bytes and one operation from `limiter`, or neither.
fn admit(limiter: &mut RateLimiter, len: usize) -> bool {
    let bytes = len as u64;
    if !limiter.consume(bytes, TokenType::Bytes) {
        return false;
    }
    if !limiter.consume(1, TokenType::Ops) {
        limiter.manual_replenish(bytes, TokenType::Bytes);
        return false;
    }
    true
}

impl NetWorker {
    pub fn new(
        params: WorkerParams,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        tap: OwnedFd,
        queues: PairQueues,
        kill: EventFd,
    ) -> Result<Self, WorkerError> {
        let PairQueues { rx, tx, ctrl } = queues;
        let rx_next_used = rx.queue.next_used();
        let rx_limiter = RateLimiter::new(params.rate_limit).map_err(WorkerError::RateLimiter)?;
        let tx_limiter = RateLimiter::new(params.rate_limit).map_err(WorkerError::RateLimiter)?;
        let epoll = Epoll::new().map_err(WorkerError::Epoll)?;
        let mut watch = vec![
            (rx.kick.as_raw_fd(), RX_KICK, EventSet::IN),
            (tx.kick.as_raw_fd(), TX_KICK, EventSet::IN),
            (
                tap.as_raw_fd(),
                TAP,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ),
            (rx_limiter.as_raw_fd(), RX_TIMER, EventSet::IN),
            (tx_limiter.as_raw_fd(), TX_TIMER, EventSet::IN),
            (kill.as_raw_fd(), KILL, EventSet::IN),
        ];
        if let Some(ctrl) = &ctrl {
            watch.push((ctrl.kick.as_raw_fd(), CTRL_KICK, EventSet::IN));
        }
        for (fd, token, events) in watch {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
                .map_err(WorkerError::Epoll)?;
        }
        Ok(Self {
            params,
            mem,
            interrupt,
            tap,
            rx,
            tx,
            ctrl,
            _kill: kill,
            epoll,
            rx_limiter,
            tx_limiter,
            rx_frame: vec![0; MAX_FRAME_BYTES],
            rx_len: None,
            rx_admitted: false,
            rx_chains: VecDeque::new(),
            rx_batch: Vec::new(),
            rx_signalled: Wrapping(rx_next_used),
            tx_frame: vec![0; MAX_FRAME_BYTES],
            tx_pending: None,
            tx_more: false,
            rx_used: false,
            tx_used: false,
            ctrl_used: false,
            logged_tap_error: false,
            logged_interrupt: false,
        })
    }

    /// Runs until killed or broken.
    pub fn run(mut self) {
        let result = self.start().and_then(|()| loop {
            if !self.turn(None)? {
                return Ok(());
            }
        });
        if let Err(e) = result {
            tracing::error!(
                tap = %self.params.name,
                pair = self.rx.index / 2,
                error = %crate::virtio::block::error_chain(&e),
                "net worker stopped; the device needs a reset"
            );
            self.interrupt.set_needs_reset();
        }
    }

    /// Serves what the driver queued before the worker started.
    pub fn start(&mut self) -> Result<(), WorkerError> {
        self.process_ctrl()?;
        self.process_tx()?;
        self.process_rx()?;
        self.signal()
    }

    /// Waits for events, at most `max_wait`, and handles them. `false` once killed.
    pub fn turn(&mut self, max_wait: Option<Duration>) -> Result<bool, WorkerError> {
        let timeout_ms = if self.tx_more {
            0
        } else {
            max_wait.map_or(-1, |d| i32::try_from(d.as_millis()).unwrap_or(i32::MAX))
        };
        let mut ready = [EpollEvent::default(); EVENTS_PER_WAIT];
        let n = match self.epoll.wait(timeout_ms, &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(WorkerError::Epoll(e)),
        };
        let mut ctrl_kicked = false;
        for event in &ready[..n] {
            // Reads clear level-triggered readiness; a failure only means a spurious wake.
            match event.data() {
                KILL => return Ok(false),
                RX_KICK => {
                    let _ = self.rx.kick.read();
                }
                TX_KICK => {
                    let _ = self.tx.kick.read();
                }
                CTRL_KICK => {
                    if let Some(ctrl) = &self.ctrl {
                        let _ = ctrl.kick.read();
                    }
                    ctrl_kicked = true;
                }
                RX_TIMER => {
                    if let Err(e) = self.rx_limiter.event_handler() {
                        tracing::warn!(tap = %self.params.name, error = %e, "net: rate limiter timer");
                    }
                }
                TX_TIMER => {
                    if let Err(e) = self.tx_limiter.event_handler() {
                        tracing::warn!(tap = %self.params.name, error = %e, "net: rate limiter timer");
                    }
                }
                // The tap is edge triggered: process_rx reads it until EAGAIN.
                _ => {}
            }
        }
        if ctrl_kicked {
            self.process_ctrl()?;
        }
        self.process_tx()?;
        self.process_rx()?;
        self.signal()?;
        Ok(true)
    }

    /// Sends TX chains to the tap, at most one queue size per turn.
    fn process_tx(&mut self) -> Result<(), WorkerError> {
        self.tx_more = false;
        if let Some((head, len)) = self.tx_pending {
            if !admit(&mut self.tx_limiter, len) {
                return Ok(());
            }
            self.tx_pending = None;
            self.write_tap(len);
            self.complete_tx(head)?;
        }
        let err = queue_error(self.tx.index);
        let cap = usize::from(self.tx.queue.size());
        let mut taken = 0usize;
        loop {
            self.tx
                .queue
                .disable_notification(&self.mem)
                .map_err(&err)?;
            while taken < cap {
                let chain = {
                    let mut iter = self.tx.queue.iter(&self.mem).map_err(&err)?;
                    iter.next()
                };
                let Some(chain) = chain else { break };
                taken += 1;
                let head = chain.head_index();
                match gather_tx(&self.mem, chain, &mut self.tx_frame) {
                    Some(len) => {
                        if !admit(&mut self.tx_limiter, len) {
                            // The limiter's timer wakes the worker; notifications stay off.
                            add(&self.params.metrics.rate_limited, 1);
                            self.tx_pending = Some((head, len));
                            return Ok(());
                        }
                        self.write_tap(len);
                    }
                    None => add(&self.params.metrics.tx_malformed, 1),
                }
                self.complete_tx(head)?;
            }
            if taken >= cap {
                self.tx_more = true;
                return Ok(());
            }
            if !self.tx.queue.enable_notification(&self.mem).map_err(&err)? {
                return Ok(());
            }
        }
    }

    fn complete_tx(&mut self, head: u16) -> Result<(), WorkerError> {
        self.tx
            .queue
            .add_used(&self.mem, head, 0)
            .map_err(queue_error(self.tx.index))?;
        self.tx_used = true;
        Ok(())
    }

    /// Writes the first `len` bytes of the TX frame to the tap.
    fn write_tap(&mut self, len: usize) {
        let frame = &self.tx_frame[..len];
        // SAFETY: write reads `len` bytes from `frame`, valid for the call; the fd is the
        // worker's own tap queue.
        let ret = unsafe { libc::write(self.tap.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if ret >= 0 {
            add(&self.params.metrics.tx_frames, 1);
            add(&self.params.metrics.tx_bytes, (len - VNET_HDR_BYTES) as u64);
            return;
        }
        let e = io::Error::last_os_error();
        add(&self.params.metrics.tx_errors, 1);
        if !self.logged_tap_error {
            self.logged_tap_error = true;
            tracing::warn!(tap = %self.params.name, error = %e, "net: the tap refused a frame (logged once)");
        }
    }

    /// Reads frames from the tap into RX buffers until the tap is empty, the guest has no
    /// buffers or the limiter says wait.
    fn process_rx(&mut self) -> Result<(), WorkerError> {
        loop {
            let len = match self.rx_len {
                Some(len) => len,
                None => match self.read_tap() {
                    Some(len) => len,
                    None => return Ok(()),
                },
            };
            if !self.rx_admitted {
                if !admit(&mut self.rx_limiter, len) {
                    add(&self.params.metrics.rate_limited, 1);
                    return Ok(());
                }
                self.rx_admitted = true;
            }
            match self.deliver(len)? {
                Delivery::Done => {
                    self.rx_len = None;
                    self.rx_admitted = false;
                }
                Delivery::NoBuffers => return Ok(()),
            }
        }
    }

    /// Reads one frame from the tap; `None` when there is none (or the tap failed).
    fn read_tap(&mut self) -> Option<usize> {
        loop {
            // SAFETY: read writes at most `rx_frame.len()` bytes into `rx_frame`, valid for
            // the call; the fd is the worker's own tap queue.
            let ret = unsafe {
                libc::read(
                    self.tap.as_raw_fd(),
                    self.rx_frame.as_mut_ptr().cast(),
                    self.rx_frame.len(),
                )
            };
            if ret < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return None,
                    _ => {
                        if !self.logged_tap_error {
                            self.logged_tap_error = true;
                            tracing::warn!(tap = %self.params.name, error = %e, "net: cannot read the tap (logged once)");
                        }
                        return None;
                    }
                }
            }
            // ret >= 0 and at most rx_frame.len().
            let len = ret as usize;
            if len < VNET_HDR_BYTES {
                add(&self.params.metrics.rx_dropped, 1);
                continue;
            }
            self.rx_len = Some(len);
            return Some(len);
        }
    }

    /// Puts the frame of `len` bytes in RX buffers, or drops it if it can never fit.
    fn deliver(&mut self, len: usize) -> Result<Delivery, WorkerError> {
        // How many chains the frame takes.
        let count = if self.params.mergeable {
            let mut have = 0usize;
            let mut count = 0usize;
            loop {
                if let Some(chain) = self.rx_chains.get(count) {
                    have += chain.capacity;
                    count += 1;
                    if have >= len {
                        break count;
                    }
                    continue;
                }
                if count >= usize::from(self.rx.queue.size()) {
                    // Every buffer the ring can hold would not do.
                    add(&self.params.metrics.rx_dropped, 1);
                    return Ok(Delivery::Done);
                }
                match self.take_rx_chain()? {
                    Some(chain) => self.rx_chains.push_back(chain),
                    None => return Ok(Delivery::NoBuffers),
                }
            }
        } else {
            if self.rx_chains.is_empty() {
                match self.take_rx_chain()? {
                    Some(chain) => self.rx_chains.push_back(chain),
                    None => return Ok(Delivery::NoBuffers),
                }
            }
            if self.rx_chains.front().is_some_and(|c| c.capacity < len) {
                add(&self.params.metrics.rx_dropped, 1);
                return Ok(Delivery::Done);
            }
            1
        };
        // count <= queue size, a u16.
        let num_buffers = u16::try_from(count).unwrap_or(u16::MAX);
        self.rx_frame[NUM_BUFFERS_OFFSET..VNET_HDR_BYTES]
            .copy_from_slice(&num_buffers.to_le_bytes());
        let mut offset = 0usize;
        let mut used = std::mem::take(&mut self.rx_batch);
        used.clear();
        for _ in 0..count {
            let Some(chain) = self.rx_chains.pop_front() else {
                break;
            };
            let start = offset;
            for &(addr, size) in &chain.buffers {
                if offset >= len {
                    break;
                }
                let n = size.min(len - offset);
                if self
                    .mem
                    .write_slice(&self.rx_frame[offset..offset + n], addr)
                    .is_err()
                {
                    // Checked when taken; memory does not shrink under a running guest.
                    break;
                }
                offset += n;
            }
            used.push((chain.head, u32::try_from(offset - start).unwrap_or(0)));
        }
        // All of the frame's chains become visible to the driver at once: it reads
        // `num_buffers` in the first and expects the rest to be there already.
        let published = publish_used(&mut self.rx.queue, &self.mem, &used);
        self.rx_batch = used;
        published.map_err(queue_error(self.rx.index))?;
        self.rx_used = true;
        add(&self.params.metrics.rx_frames, 1);
        add(&self.params.metrics.rx_bytes, (len - VNET_HDR_BYTES) as u64);
        Ok(Delivery::Done)
    }

    /// Takes the next usable RX chain; unusable ones are completed empty on the way.
    fn take_rx_chain(&mut self) -> Result<Option<RxChain>, WorkerError> {
        let err = queue_error(self.rx.index);
        loop {
            let chain = {
                let mut iter = self.rx.queue.iter(&self.mem).map_err(&err)?;
                iter.next()
            };
            let Some(chain) = chain else {
                // Ask for a kick when buffers come; if some came meanwhile, look again.
                if self.rx.queue.enable_notification(&self.mem).map_err(&err)? {
                    continue;
                }
                return Ok(None);
            };
            let head = chain.head_index();
            let mut buffers = Vec::new();
            let mut capacity = 0usize;
            let mut usable = true;
            for desc in chain {
                let size = desc.len() as usize;
                if !desc.is_write_only()
                    || !self.mem.check_range(desc.addr(), size, Permissions::Write)
                {
                    usable = false;
                    break;
                }
                if size > 0 {
                    buffers.push((desc.addr(), size));
                    capacity += size;
                }
            }
            if usable && capacity >= VNET_HDR_BYTES {
                return Ok(Some(RxChain {
                    head,
                    buffers,
                    capacity,
                }));
            }
            add(&self.params.metrics.rx_bad_buffers, 1);
            self.rx.queue.add_used(&self.mem, head, 0).map_err(&err)?;
            self.rx_used = true;
        }
    }

    /// Answers control commands: `VQ_PAIRS_SET` within range is acknowledged, anything
    /// else refused (no other control feature is offered).
    fn process_ctrl(&mut self) -> Result<(), WorkerError> {
        let Some(ctrl) = self.ctrl.as_mut() else {
            return Ok(());
        };
        let err = queue_error(ctrl.index);
        loop {
            let chain = {
                let mut iter = ctrl.queue.iter(&self.mem).map_err(&err)?;
                iter.next()
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let mut command = [0u8; MAX_CTRL_BYTES];
            let mut got = 0usize;
            let mut ack = None;
            for desc in chain {
                if desc.is_write_only() {
                    ack.get_or_insert(desc.addr());
                    continue;
                }
                let n = (desc.len() as usize).min(MAX_CTRL_BYTES - got);
                if self
                    .mem
                    .read_slice(&mut command[got..got + n], desc.addr())
                    .is_ok()
                {
                    got += n;
                }
            }
            let pairs = u16::from_le_bytes([command[2], command[3]]);
            let ok = got >= 4
                && u32::from(command[0]) == VIRTIO_NET_CTRL_MQ
                && u32::from(command[1]) == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
                && (1..=self.params.max_pairs).contains(&pairs);
            let status = if ok { VIRTIO_NET_OK } else { VIRTIO_NET_ERR } as u8;
            let used = match ack {
                Some(addr) if self.mem.write_obj(status, addr).is_ok() => 1,
                _ => 0,
            };
            ctrl.queue.add_used(&self.mem, head, used).map_err(&err)?;
            self.ctrl_used = true;
        }
        Ok(())
    }

    /// At most one interrupt per queue and turn.
    fn signal(&mut self) -> Result<(), WorkerError> {
        let mut due = Vec::with_capacity(3);
        if std::mem::take(&mut self.rx_used) {
            // RX frames are published with `publish_used`, which virtio-queue's
            // notification count does not see: the RX decision is made here.
            let used = Wrapping(self.rx.queue.next_used());
            let since = std::mem::replace(&mut self.rx_signalled, used);
            if needs_interrupt(&self.rx.queue, &self.mem, since)
                .map_err(queue_error(self.rx.index))?
            {
                due.push(self.rx.index);
            }
        }
        let mut others = vec![(&mut self.tx, std::mem::take(&mut self.tx_used))];
        if let Some(ctrl) = self.ctrl.as_mut() {
            others.push((ctrl, std::mem::take(&mut self.ctrl_used)));
        }
        for (q, used) in others {
            if used
                && q.queue
                    .needs_notification(&self.mem)
                    .map_err(queue_error(q.index))?
            {
                due.push(q.index);
            }
        }
        for index in due {
            if let Err(e) = self.interrupt.trigger(VirtioInterruptType::Queue(index)) {
                if !self.logged_interrupt {
                    self.logged_interrupt = true;
                    tracing::error!(tap = %self.params.name, queue = index, error = %e, "net: cannot raise interrupt (logged once)");
                }
            }
        }
        Ok(())
    }
}

/// Puts `elems` (head, length) on `queue`'s used ring and only then moves the used index,
/// once: the driver sees all of them or none. Hand-written because virtio-queue's
/// `add_used` publishes the index with every element, and a mergeable RX frame spread over
/// several chains must not be seen in part (Linux drops it as "buffers missing" and then
/// reads the rest as frames of their own). Firecracker batches its used ring the same way.
fn publish_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    elems: &[(u16, u32)],
) -> Result<(), virtio_queue::Error> {
    use virtio_queue::Error;
    const USED_RING_HEADER_BYTES: u64 = 4;
    const USED_ELEMENT_BYTES: u64 = 8;
    let size = queue.size();
    let ring = GuestAddress(queue.used_ring());
    let mut next = Wrapping(queue.next_used());
    for &(head, len) in elems {
        if head >= size {
            return Err(Error::InvalidDescriptorIndex);
        }
        let offset = USED_RING_HEADER_BYTES + u64::from(next.0 % size) * USED_ELEMENT_BYTES;
        let addr = ring.checked_add(offset).ok_or(Error::AddressOverflow)?;
        // struct virtq_used_elem: le32 id, le32 len.
        let mut elem = [0u8; USED_ELEMENT_BYTES as usize];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, addr).map_err(Error::GuestMemory)?;
        next += Wrapping(1);
    }
    queue.set_next_used(next.0);
    let idx = ring.checked_add(2).ok_or(Error::AddressOverflow)?;
    // Release: the elements and the buffers' contents are visible before the index.
    mem.store(next.0.to_le(), idx, Ordering::Release)
        .map_err(Error::GuestMemory)
}

/// Whether the used entries added since the used index was `since` call for an interrupt
/// (virtio 1.2 §2.7.10: with EVENT_IDX, when they pass the driver's `used_event`).
fn needs_interrupt(
    queue: &Queue,
    mem: &GuestMemoryMmap,
    since: Wrapping<u16>,
) -> Result<bool, virtio_queue::Error> {
    if !queue.event_idx_enabled() {
        return Ok(true);
    }
    // The used index is written before `used_event` is read.
    std::sync::atomic::fence(Ordering::SeqCst);
    let used = Wrapping(queue.next_used());
    // `used_event` follows the available ring's `size` entries.
    let offset = 4 + u64::from(queue.size()) * 2;
    let addr = GuestAddress(queue.avail_ring())
        .checked_add(offset)
        .ok_or(virtio_queue::Error::AddressOverflow)?;
    let used_event = Wrapping(u16::from_le(
        mem.load(addr, Ordering::Relaxed)
            .map_err(virtio_queue::Error::GuestMemory)?,
    ));
    Ok(used - used_event - Wrapping(1) < used - since)
}

/// Copies a TX chain into `frame`; its length, or `None` for a malformed chain (a
/// device-writable descriptor, outside guest memory, shorter than a vnet header, longer
/// than [`MAX_FRAME_BYTES`]).
fn gather_tx<I>(mem: &GuestMemoryMmap, chain: I, frame: &mut [u8]) -> Option<usize>
where
    I: IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
{
    let mut len = 0usize;
    for desc in chain {
        if desc.is_write_only() {
            return None;
        }
        let size = desc.len() as usize;
        let end = len.checked_add(size).filter(|&e| e <= MAX_FRAME_BYTES)?;
        mem.read_slice(frame.get_mut(len..end)?, desc.addr()).ok()?;
        len = end;
    }
    (len >= VNET_HDR_BYTES).then_some(len)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;
    use std::time::Instant;

    use vm_memory::Address;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;
    use crate::rate_limiter::TokenBucketConfig;
    use crate::virtio::vsock::test_utils::{
        guest_memory, RecordingInterrupt, Ring, MEM_BYTES, TEST_QUEUE_SIZE,
    };

    const RX_BASE: u64 = 0x1_0000;
    const RX_STRIDE: u64 = 0x1000;
    const TX_BASE: u64 = 0x10_0000;
    const TX_STRIDE: u64 = 0x1_1000;

    /// A worker over plain memory, with a datagram socket standing in for the tap.
    struct Harness<'a> {
        mem: &'a GuestMemoryMmap,
        rx: Ring<'a>,
        tx: Ring<'a>,
        worker: NetWorker,
        host: UnixDatagram,
        metrics: Arc<NetMetrics>,
        interrupt: Arc<RecordingInterrupt>,
    }

    fn harness(mem: &GuestMemoryMmap, mergeable: bool, rate_limit: RateLimitConfig) -> Harness<'_> {
        harness_with(mem, mergeable, rate_limit, false)
    }

    fn harness_with(
        mem: &GuestMemoryMmap,
        mergeable: bool,
        rate_limit: RateLimitConfig,
        event_idx: bool,
    ) -> Harness<'_> {
        let rx = Ring::new(mem, 0, GuestAddress(RX_BASE), RX_STRIDE);
        let tx = Ring::new(mem, 1, GuestAddress(TX_BASE), TX_STRIDE);
        let (host, device) = UnixDatagram::pair().unwrap();
        device.set_nonblocking(true).unwrap();
        host.set_nonblocking(true).unwrap();
        let metrics = Arc::new(NetMetrics::default());
        let interrupt = RecordingInterrupt::new();
        let params = WorkerParams {
            name: "test0".into(),
            mergeable,
            max_pairs: 1,
            rate_limit,
            metrics: metrics.clone(),
        };
        let wq = |index, queue| WorkerQueue {
            index,
            queue,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        let worker = NetWorker::new(
            params,
            mem.clone(),
            interrupt.clone(),
            OwnedFd::from(device),
            PairQueues {
                rx: wq(0, with_event_idx(rx.queue(), event_idx)),
                tx: wq(1, with_event_idx(tx.queue(), event_idx)),
                ctrl: None,
            },
            EventFd::new(EFD_NONBLOCK).unwrap(),
        )
        .unwrap();
        Harness {
            mem,
            rx,
            tx,
            worker,
            host,
            metrics,
            interrupt,
        }
    }

    fn with_event_idx(mut queue: Queue, on: bool) -> Queue {
        queue.set_event_idx(on);
        queue
    }

    fn header(gso_type: u8) -> [u8; VNET_HDR_BYTES] {
        let mut h = [0u8; VNET_HDR_BYTES];
        h[1] = gso_type;
        h
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 3) as u8).collect()
    }

    impl Harness<'_> {
        /// Posts a TX chain of (bytes, device-writable) descriptors in one slot's area.
        fn send(&mut self, parts: &[(&[u8], bool)]) -> u16 {
            let slot = self.tx.take_slot();
            let mut addr = self.tx.buffer(slot);
            let mut descs = Vec::new();
            for (bytes, writable) in parts {
                self.mem.write_slice(bytes, addr).unwrap();
                descs.push((addr, bytes.len() as u32, *writable));
                addr = addr.unchecked_add(bytes.len() as u64);
            }
            self.tx.post(slot, &descs);
            slot * 2
        }

        /// Posts `n` RX chains of one writable descriptor of `size` bytes.
        fn fill_rx(&mut self, n: usize, size: u32) {
            for _ in 0..n {
                let slot = self.rx.take_slot();
                let buf = self.rx.buffer(slot);
                self.rx.post(slot, &[(buf, size, true)]);
            }
        }

        fn turn(&mut self) {
            assert!(self.worker.turn(Some(Duration::from_millis(10))).unwrap());
        }

        fn host_frames(&self) -> Vec<Vec<u8>> {
            let mut out = Vec::new();
            let mut buf = vec![0u8; MAX_FRAME_BYTES + 100];
            while let Ok(n) = self.host.recv(&mut buf) {
                out.push(buf[..n].to_vec());
            }
            out
        }

        fn rx_bytes(&self, head: u16, len: usize) -> Vec<u8> {
            let mut out = vec![0u8; len];
            self.mem
                .read_slice(&mut out, self.rx.buffer(head / 2))
                .unwrap();
            out
        }
    }

    #[test]
    fn tx_frame_reaches_the_tap_with_its_vnet_header() {
        let mem = guest_memory();
        let mut h = harness(&mem, true, RateLimitConfig::default());
        let data = pattern(1500);
        let head = h.send(&[(&header(0), false), (&data, false)]);

        h.turn();

        let frames = h.host_frames();
        assert_eq!(frames.len(), 1);
        // The tap takes the 12-byte header (IFF_VNET_HDR) and strips it itself.
        assert_eq!(&frames[0][..VNET_HDR_BYTES], &header(0));
        assert_eq!(&frames[0][VNET_HDR_BYTES..], &data[..]);
        assert_eq!(h.tx.take_used(), vec![(head, 0)]);
        let m = h.metrics.snapshot();
        assert_eq!((m.tx_frames, m.tx_bytes, m.tx_malformed), (1, 1500, 0));
        assert!(h
            .interrupt
            .triggered()
            .contains(&VirtioInterruptType::Queue(1)));
    }

    #[test]
    fn rx_frame_arrives_with_a_header_and_num_buffers() {
        let mem = guest_memory();
        let mut h = harness(&mem, true, RateLimitConfig::default());
        h.fill_rx(4, 4096);
        let mut frame = header(0).to_vec();
        frame.extend(pattern(100));
        h.host.send(&frame).unwrap();

        h.turn();

        let used = h.rx.take_used();
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].1, 112);
        let got = h.rx_bytes(used[0].0, 112);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
        assert_eq!(&got[VNET_HDR_BYTES..], &frame[VNET_HDR_BYTES..]);
        let m = h.metrics.snapshot();
        assert_eq!((m.rx_frames, m.rx_bytes), (1, 100));
        assert!(h
            .interrupt
            .triggered()
            .contains(&VirtioInterruptType::Queue(0)));
    }

    #[test]
    fn rx_big_frame_spans_mergeable_buffers() {
        let mem = guest_memory();
        let mut h = harness(&mem, true, RateLimitConfig::default());
        h.fill_rx(2, 4096);
        let mut frame = header(0).to_vec();
        frame.extend(pattern(10_000));
        h.host.send(&frame).unwrap();

        // Two buffers are not enough: the frame waits, nothing is used.
        h.turn();
        assert!(h.rx.take_used().is_empty());

        h.fill_rx(2, 4096);
        h.turn();
        let used = h.rx.take_used();
        let lens: Vec<u32> = used.iter().map(|u| u.1).collect();
        assert_eq!(lens, vec![4096, 4096, 10_012 - 8192]);
        let mut got = Vec::new();
        for (head, len) in &used {
            got.extend(h.rx_bytes(*head, *len as usize));
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
        assert_eq!(&got[VNET_HDR_BYTES..], &frame[VNET_HDR_BYTES..]);
        assert_eq!(h.metrics.snapshot().rx_frames, 1);
    }

    /// With EVENT_IDX, the RX interrupt comes when the used index passes the driver's
    /// `used_event`, counting every chain of a mergeable frame (published together).
    #[test]
    fn rx_interrupts_follow_used_event_across_mergeable_frames() {
        let mem = guest_memory();
        let mut h = harness_with(&mem, true, RateLimitConfig::default(), true);
        let rx_interrupts = |h: &Harness| {
            h.interrupt
                .triggered()
                .iter()
                .filter(|t| **t == VirtioInterruptType::Queue(0))
                .count()
        };
        let frame = |len: usize| {
            let mut f = header(0).to_vec();
            f.extend(pattern(len));
            f
        };
        h.fill_rx(8, 1024);
        // used_event 2: the driver wants an interrupt once entry 2 is used (index 3).
        h.rx.set_used_event(2);

        // Two chains (index 0 -> 2): not yet.
        h.host.send(&frame(1500)).unwrap();
        h.turn();
        assert_eq!(h.rx.used_idx(), 2);
        assert_eq!(rx_interrupts(&h), 0);

        // Three more (2 -> 5) pass entry 2: one interrupt.
        h.host.send(&frame(2500)).unwrap();
        h.turn();
        assert_eq!(h.rx.used_idx(), 5);
        assert_eq!(rx_interrupts(&h), 1);

        // The driver has not moved used_event: nothing more is due (5 -> 6).
        h.host.send(&frame(100)).unwrap();
        h.turn();
        assert_eq!(h.rx.used_idx(), 6);
        assert_eq!(rx_interrupts(&h), 1);
        let lens: Vec<u32> = h.rx.take_used().iter().map(|u| u.1).collect();
        assert_eq!(lens, vec![1024, 488, 1024, 1024, 464, 112]);
    }

    #[test]
    fn rx_frame_too_big_for_a_buffer_without_mergeable_is_dropped() {
        let mem = guest_memory();
        let mut h = harness(&mem, false, RateLimitConfig::default());
        h.fill_rx(1, 2048);
        let mut big = header(0).to_vec();
        big.extend(pattern(3000));
        let mut small = header(0).to_vec();
        small.extend(pattern(60));
        h.host.send(&big).unwrap();
        h.host.send(&small).unwrap();

        h.turn();

        let used = h.rx.take_used();
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].1, 72);
        let m = h.metrics.snapshot();
        assert_eq!((m.rx_dropped, m.rx_frames), (1, 1));
    }

    #[test]
    fn rx_short_frame_and_bad_chains_are_dropped_and_counted() {
        let mem = guest_memory();
        let mut h = harness(&mem, true, RateLimitConfig::default());
        // A device-readable RX chain, one outside guest memory, one too small for a header.
        let slot = h.rx.take_slot();
        let buf = h.rx.buffer(slot);
        h.rx.post(slot, &[(buf, 4096, false)]);
        let slot = h.rx.take_slot();
        h.rx.post(slot, &[(GuestAddress(0x7f_f000), 0x2000, true)]);
        let slot = h.rx.take_slot();
        let buf = h.rx.buffer(slot);
        h.rx.post(slot, &[(buf, 8, true)]);
        h.fill_rx(1, 4096);
        h.host.send(&[1, 2, 3]).unwrap();
        let mut frame = header(0).to_vec();
        frame.extend(pattern(64));
        h.host.send(&frame).unwrap();

        h.turn();

        let lens: Vec<u32> = h.rx.take_used().iter().map(|u| u.1).collect();
        assert_eq!(lens, vec![0, 0, 0, 76]);
        let m = h.metrics.snapshot();
        assert_eq!((m.rx_bad_buffers, m.rx_dropped, m.rx_frames), (3, 1, 1));
    }

    #[test]
    fn malformed_tx_chains_are_completed_dropped_and_counted() {
        let mem = guest_memory();
        let mut h = harness(&mem, true, RateLimitConfig::default());
        let data = pattern(100);
        // A write-only descriptor.
        h.send(&[(&header(0), false), (&data, true)]);
        // Shorter than a vnet header.
        h.send(&[(&[0u8; 8], false)]);
        // Over 64 KiB + header: 65536 + 100 bytes.
        let big = pattern(65_536);
        h.send(&[(&big, false), (&data, false)]);
        // A buffer outside guest memory.
        let slot = h.tx.take_slot();
        h.tx.post(slot, &[(GuestAddress(0x7f_f000), 0x2000, false)]);
        // Then a good one.
        h.send(&[(&header(0), false), (&data, false)]);

        h.turn();

        let used = h.tx.take_used();
        assert_eq!(used.len(), 5);
        assert!(used.iter().all(|u| u.1 == 0));
        let frames = h.host_frames();
        assert_eq!(frames.len(), 1);
        assert_eq!(&frames[0][VNET_HDR_BYTES..], &data[..]);
        let m = h.metrics.snapshot();
        assert_eq!((m.tx_malformed, m.tx_frames), (4, 1));
    }

    #[test]
    fn rate_limiter_defers_tx_until_its_timer() {
        let mem = guest_memory();
        let limit = RateLimitConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 1000,
                one_time_burst: 0,
                refill_time_ms: 100,
            }),
            ops: None,
        };
        let mut h = harness(&mem, true, limit);
        let data = pattern(800);
        h.send(&[(&header(0), false), (&data, false)]);
        h.send(&[(&header(0), false), (&data, false)]);

        assert!(h.worker.turn(Some(Duration::ZERO)).unwrap());
        assert_eq!(h.host_frames().len(), 1);
        assert_eq!(h.tx.take_used().len(), 1);
        assert_eq!(h.metrics.snapshot().rate_limited, 1);

        let start = Instant::now();
        let mut frames = Vec::new();
        while frames.is_empty() && start.elapsed() < Duration::from_secs(5) {
            h.turn();
            frames = h.host_frames();
        }
        assert_eq!(frames.len(), 1, "the deferred frame never went out");
        assert_eq!(h.tx.take_used().len(), 1);
        assert_eq!(h.metrics.snapshot().tx_frames, 2);
    }

    #[test]
    fn rate_limiter_defers_rx_without_dropping() {
        let mem = guest_memory();
        let limit = RateLimitConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 1,
                one_time_burst: 0,
                refill_time_ms: 50,
            }),
        };
        let mut h = harness(&mem, true, limit);
        h.fill_rx(4, 4096);
        let mut frame = header(0).to_vec();
        frame.extend(pattern(64));
        h.host.send(&frame).unwrap();
        h.host.send(&frame).unwrap();

        assert!(h.worker.turn(Some(Duration::ZERO)).unwrap());
        assert_eq!(h.rx.take_used().len(), 1);
        let start = Instant::now();
        let mut used = Vec::new();
        while used.is_empty() && start.elapsed() < Duration::from_secs(5) {
            h.turn();
            used = h.rx.take_used();
        }
        assert_eq!(used.len(), 1);
        let m = h.metrics.snapshot();
        assert_eq!((m.rx_frames, m.rx_dropped), (2, 0));
    }

    /// One random descriptor: mostly inside the test's buffer areas, sometimes anywhere.
    fn arb_descriptor() -> impl Strategy<Value = (u64, u32, u16, u16)> {
        (
            prop_oneof![
                (0u64..64).prop_map(|i| RX_BASE + i * 0x800),
                (0u64..64).prop_map(|i| TX_BASE + i * 0x800),
                Just(MEM_BYTES as u64 - 8),
                Just(0x7f_f000u64),
                any::<u64>(),
            ],
            prop_oneof![
                Just(VNET_HDR_BYTES as u32),
                Just(4096),
                Just(65_548),
                0u32..64,
                any::<u32>()
            ],
            prop_oneof![Just(0u16), Just(1), Just(2), Just(3), Just(4), 0u16..8],
            0u16..(TEST_QUEUE_SIZE + 2),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        /// Random descriptor tables on both rings, random heads made available and random
        /// frames from the tap: the worker never panics, completes TX chains with no bytes
        /// written, and never claims more than a frame and its header on RX; or it reports
        /// the queue broken.
        #[test]
        fn random_chains_and_frames_never_panic_the_worker(
            tx in vec(arb_descriptor(), 1..32),
            rx in vec(arb_descriptor(), 1..32),
            heads in vec((0u16..(TEST_QUEUE_SIZE + 4), any::<bool>()), 1..8),
            frames in vec(vec(any::<u8>(), 0..2000), 0..4),
            mergeable in any::<bool>(),
        ) {
            let mem = guest_memory();
            let mut h = harness(&mem, mergeable, RateLimitConfig::default());
            for (i, d) in tx.iter().enumerate() {
                h.tx.store_raw(i as u16, *d);
            }
            for (i, d) in rx.iter().enumerate() {
                h.rx.store_raw(i as u16, *d);
            }
            for (head, is_tx) in &heads {
                if *is_tx {
                    h.tx.post_head(*head);
                } else {
                    h.rx.post_head(*head);
                }
            }
            for frame in &frames {
                let _ = h.host.send(frame);
            }
            for _ in 0..3 {
                match h.worker.turn(Some(Duration::ZERO)) {
                    Ok(_) => {}
                    Err(WorkerError::Queue { .. }) => break,
                    Err(e) => prop_assert!(false, "unexpected error {}", e),
                }
            }
            for (head, len) in h.tx.take_used() {
                prop_assert!(head < TEST_QUEUE_SIZE);
                prop_assert_eq!(len, 0);
            }
            for (head, len) in h.rx.take_used() {
                prop_assert!(head < TEST_QUEUE_SIZE);
                prop_assert!(len as usize <= MAX_FRAME_BYTES + VNET_HDR_BYTES);
            }
        }
    }
}
