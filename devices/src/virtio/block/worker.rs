//! The queue worker: one thread per virtio-blk queue (`blk{N}-q{Q}`), owning its [`Queue`],
//! its I/O engine and an in-flight table sized to the queue.
//!
//! Woken by epoll on the queue's kick eventfd, the engine's completion eventfd, the rate
//! limiter's timerfd, a control eventfd (rate-limit updates arrive on a channel) and a kill
//! eventfd. The queue loop follows virtio-queue's "Notification suppression": disable
//! notifications, take available chains (at most the queue size per pass), parse, queue,
//! submit them all at once, enable notifications, and go again if the driver added more
//! meanwhile. Completions write the status byte and `add_used`; each batch ends with one
//! `needs_notification` check and at most one interrupt.
//!
//! A chain the limiter holds back, or that finds no free in-flight slot, is put back
//! (`go_to_previous_position`) and taken again when the timer fires or a slot frees up:
//! nothing is dropped. A guest mistake completes its chain with an error status; a broken
//! ring or a failed engine stops the worker and marks the device as needing a reset.
//!
//! Before it sleeps, the worker polls for [`POLL_US`]: new chains on the available ring and
//! finished I/O on the engine's completion ring, both read from shared memory. A driver that
//! posts its next batch within that time, or I/O that finishes that fast, is then served
//! without a wake-up of this thread (the cross-CPU wake-up per batch was what kept one
//! queue at half of raw io_uring). Each idle turn yields the CPU, so polling workers do not
//! starve the threads that feed them on a small host.
//!
//! The `handle_*` methods are how the worker is woken; tests call them directly, without
//! threads or epoll.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::engine::{BlockEngine, Completion, EngineError, IoOp, QueueError};
use super::metrics::{add, inc, BlockMetrics};
use super::request::{self, ChainDescriptor, DiskLimits, Rejection, Request, RequestKind};
use super::{ID_BYTES, SECTOR_SHIFT};
use crate::rate_limiter::{RateLimitConfig, RateLimiter, RateLimiterError, TokenType};
use crate::virtio::{GuestMemoryMmap, VirtioInterrupt, VirtioInterruptType};

const EVENT_KICK: u64 = 0;
const EVENT_COMPLETION: u64 = 1;
const EVENT_TIMER: u64 = 2;
const EVENT_CONTROL: u64 = 3;
const EVENT_KILL: u64 = 4;

/// How long the worker polls for more work after its last piece of work, in microseconds;
/// `CRIB_BLOCK_POLL_US` overrides it (0: never poll), for measurements.
pub(crate) const POLL_US: u64 = 100;

/// The polling window: [`POLL_US`] or `CRIB_BLOCK_POLL_US`, read once.
fn poll_window() -> Duration {
    static WINDOW: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *WINDOW.get_or_init(|| {
        let us = std::env::var("CRIB_BLOCK_POLL_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(POLL_US);
        Duration::from_micros(us)
    })
}

/// How many kinds of host error (errnos) a queue logs; later kinds are only counted.
const LOGGED_ERRNOS_MAX: usize = 8;

const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Why a worker stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WorkerError {
    #[error("the queue is broken (a ring outside guest memory, a bad available index or head)")]
    Queue(#[source] virtio_queue::Error),
    #[error("the I/O engine failed")]
    Engine(#[source] EngineError),
    #[error("epoll failed")]
    Epoll(#[source] io::Error),
}

/// What kind of request an in-flight slot holds, for the used length and the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Class {
    #[default]
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

/// One entry of the in-flight table.
#[derive(Clone, Copy, Debug, Default)]
struct InFlight {
    head: u16,
    status: GuestAddress,
    class: Class,
    data_len: u32,
}

/// Whether the queue loop goes on after a chain.
enum Flow {
    Continue,
    /// The chain must go back to the ring and wait (limiter or no free slot).
    PutBack,
}

/// What a worker needs besides its queue, memory, interrupt and engine.
#[derive(Clone, Debug)]
pub(crate) struct WorkerParams {
    /// The device index the VMM gave (`blk{N}`).
    pub device: u32,
    /// The disk's id, for logs.
    pub id: Arc<str>,
    pub queue_index: u16,
    pub limits: DiskLimits,
    /// The GET_ID answer, zero-padded.
    pub serial: [u8; ID_BYTES],
    pub metrics: Arc<BlockMetrics>,
    pub rate_limit: RateLimitConfig,
}

/// The eventfds and channel a running worker watches besides its own.
pub(crate) struct WorkerEvents {
    pub kick: EventFd,
    pub kill: EventFd,
    pub control: EventFd,
    pub updates: Receiver<RateLimitConfig>,
}

/// Processes one queue.
pub(crate) struct BlockWorker {
    params: WorkerParams,
    queue: Queue,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    engine: Box<dyn BlockEngine>,
    limiter: RateLimiter,
    slots: Vec<InFlight>,
    free: Vec<u16>,
    scratch: Vec<ChainDescriptor>,
    done: Vec<Completion>,
    /// A chain waits for a free slot.
    stalled: bool,
    /// Used entries were added since the last notification check.
    used_pending: bool,
    /// Request error kinds already logged (bit per `RequestError::kind_index`).
    logged_kinds: u32,
    /// Host errnos already logged, the first [`LOGGED_ERRNOS_MAX`] kinds (EIO, ENOSPC, ...).
    logged_errnos: Vec<i32>,
    logged_interrupt_error: bool,
}

impl BlockWorker {
    pub fn new(
        params: WorkerParams,
        queue: Queue,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        engine: Box<dyn BlockEngine>,
    ) -> Result<Self, RateLimiterError> {
        let size = queue.size();
        let limiter = RateLimiter::new(params.rate_limit)?;
        Ok(Self {
            params,
            queue,
            mem,
            interrupt,
            engine,
            limiter,
            slots: vec![InFlight::default(); usize::from(size)],
            free: (0..size).rev().collect(),
            scratch: Vec::with_capacity(usize::from(size).min(256)),
            done: Vec::with_capacity(usize::from(size)),
            stalled: false,
            used_pending: false,
            logged_kinds: 0,
            logged_errnos: Vec::with_capacity(LOGGED_ERRNOS_MAX),
            logged_interrupt_error: false,
        })
    }

    /// The driver notified the queue.
    pub fn handle_kick(&mut self) -> Result<(), WorkerError> {
        self.process_queue()?;
        self.signal()
    }

    /// The engine has completions.
    pub fn handle_completions(&mut self) -> Result<(), WorkerError> {
        self.complete_done()?;
        if self.stalled && !self.free.is_empty() {
            self.stalled = false;
            self.process_queue()?;
        }
        self.signal()
    }

    /// The rate limiter's timer fired.
    pub fn handle_timer(&mut self) -> Result<(), WorkerError> {
        if let Err(e) = self.limiter.event_handler() {
            tracing::warn!(disk = %self.params.id, queue = self.params.queue_index, error = %e, "rate limiter timer");
        }
        self.process_queue()?;
        self.signal()
    }

    /// New limits arrived from the VMM.
    pub fn handle_rate_limit_update(&mut self, config: RateLimitConfig) -> Result<(), WorkerError> {
        if let Err(e) = self.limiter.update(config) {
            tracing::warn!(disk = %self.params.id, queue = self.params.queue_index, error = %e, "rejected rate limit update");
        }
        self.process_queue()?;
        self.signal()
    }

    /// Runs the epoll loop until killed or broken, then waits for all I/O in flight.
    pub fn run(mut self, events: WorkerEvents) {
        if let Err(e) = self.run_loop(&events) {
            tracing::error!(
                disk = %self.params.id,
                queue = self.params.queue_index,
                error = %e,
                source = ?std::error::Error::source(&e),
                "block queue stopped; the device needs a reset"
            );
            self.interrupt.set_needs_reset();
        }
        self.shutdown();
    }

    /// Waits for every operation in flight, without touching guest memory (the driver is
    /// resetting the device, or it is broken).
    pub fn shutdown(&mut self) {
        self.done.clear();
        if self.engine.in_flight() == 0 {
            return;
        }
        if let Err(e) = self.engine.drain(&mut self.done) {
            tracing::error!(disk = %self.params.id, queue = self.params.queue_index, error = %e, "cannot drain block I/O");
        }
        self.done.clear();
    }

    fn run_loop(&mut self, ev: &WorkerEvents) -> Result<(), WorkerError> {
        let epoll = Epoll::new().map_err(WorkerError::Epoll)?;
        let watch = |fd: RawFd, data: u64| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, data),
                )
                .map_err(WorkerError::Epoll)
        };
        watch(ev.kick.as_raw_fd(), EVENT_KICK)?;
        watch(ev.kill.as_raw_fd(), EVENT_KILL)?;
        watch(ev.control.as_raw_fd(), EVENT_CONTROL)?;
        watch(self.limiter.as_raw_fd(), EVENT_TIMER)?;
        if let Some(fd) = self.engine.completion_fd() {
            watch(fd, EVENT_COMPLETION)?;
        }
        tracing::debug!(disk = %self.params.id, queue = self.params.queue_index, engine = self.engine.name(), "block queue started");
        // The driver may have made chains available before the worker started.
        self.handle_kick()?;
        let mut events = [EpollEvent::default(); 8];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(WorkerError::Epoll(e)),
            };
            let ready = &events[..n];
            if ready.iter().any(|e| e.data() == EVENT_KILL) {
                return Ok(());
            }
            for event in ready {
                match event.data() {
                    EVENT_KICK => {
                        // Clears the level-triggered readiness; a failure only means a spurious wake.
                        let _ = ev.kick.read();
                        self.handle_kick()?;
                    }
                    EVENT_COMPLETION => self.handle_completions()?,
                    EVENT_TIMER => self.handle_timer()?,
                    EVENT_CONTROL => {
                        let _ = ev.control.read();
                        // Only the newest limits matter.
                        if let Some(config) = ev.updates.try_iter().last() {
                            self.handle_rate_limit_update(config)?;
                        }
                    }
                    _ => {}
                }
            }
            self.poll_briefly()?;
        }
    }

    /// Whether the driver made chains available that the worker has not taken.
    fn has_available(&self) -> Result<bool, WorkerError> {
        let avail = self
            .queue
            .avail_idx(&self.mem, Ordering::Acquire)
            .map_err(WorkerError::Queue)?;
        Ok(avail.0 != self.queue.next_avail())
    }

    /// Serves chains and completions as they come, until none came for [`POLL_US`].
    fn poll_briefly(&mut self) -> Result<(), WorkerError> {
        let window = poll_window();
        if window.is_zero() {
            return Ok(());
        }
        let mut deadline = Instant::now() + window;
        loop {
            let mut worked = false;
            if self.engine.completions_ready() {
                self.handle_completions()?;
                worked = true;
            }
            if !self.limiter.is_blocked() && !self.stalled && self.has_available()? {
                self.handle_kick()?;
                worked = true;
            }
            let now = Instant::now();
            if worked {
                deadline = now + window;
            } else if now >= deadline {
                return Ok(());
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Takes available chains until the ring is empty, the limiter blocks or slots run out.
    fn process_queue(&mut self) -> Result<(), WorkerError> {
        if self.limiter.is_blocked() {
            return Ok(());
        }
        let cap = usize::from(self.queue.size());
        loop {
            self.queue
                .disable_notification(&self.mem)
                .map_err(WorkerError::Queue)?;
            let mut taken = 0usize;
            let mut put_back = false;
            while taken < cap {
                let parsed = {
                    let mut iter = self.queue.iter(&self.mem).map_err(WorkerError::Queue)?;
                    let Some(chain) = iter.next() else { break };
                    request::parse(chain, &self.params.limits, &mut self.scratch)
                };
                taken += 1;
                if let Flow::PutBack = self.start(parsed)? {
                    self.queue.go_to_previous_position();
                    put_back = true;
                    break;
                }
            }
            self.engine.submit().map_err(WorkerError::Engine)?;
            if self.engine.completion_fd().is_none() {
                self.complete_done()?;
            }
            if put_back {
                if self.stalled && !self.free.is_empty() {
                    // Completions freed slots meanwhile (the sync engine): go on.
                    self.stalled = false;
                    continue;
                }
                return Ok(());
            }
            let more = self
                .queue
                .enable_notification(&self.mem)
                .map_err(WorkerError::Queue)?;
            if !more {
                return Ok(());
            }
        }
    }

    /// Starts one parsed chain: completes it at once, queues its I/O, or asks to put it back.
    fn start(&mut self, parsed: Result<Request, Rejection>) -> Result<Flow, WorkerError> {
        let req = match parsed {
            Ok(req) => req,
            Err(rejection) => {
                self.reject(rejection)?;
                return Ok(Flow::Continue);
            }
        };
        let (class, op_bytes) = match req.kind {
            RequestKind::GetId => {
                self.complete_get_id(&req)?;
                return Ok(Flow::Continue);
            }
            RequestKind::Read { .. } | RequestKind::Write { .. } if req.data_len == 0 => {
                self.finish_now(req.head, Some(req.status), STATUS_OK, 1)?;
                return Ok(Flow::Continue);
            }
            RequestKind::Read { .. } => (Class::Read, u64::from(req.data_len)),
            RequestKind::Write { .. } => (Class::Write, u64::from(req.data_len)),
            RequestKind::Flush => (Class::Flush, 0),
            RequestKind::Discard { .. } => (Class::Discard, 0),
            RequestKind::WriteZeroes { .. } => (Class::WriteZeroes, 0),
        };

        if !self.limiter.consume(1, TokenType::Ops) {
            inc(&self.params.metrics.rate_limited);
            return Ok(Flow::PutBack);
        }
        if op_bytes > 0 && !self.limiter.consume(op_bytes, TokenType::Bytes) {
            self.limiter.manual_replenish(1, TokenType::Ops);
            inc(&self.params.metrics.rate_limited);
            return Ok(Flow::PutBack);
        }
        let give_back = |limiter: &mut RateLimiter| {
            limiter.manual_replenish(1, TokenType::Ops);
            limiter.manual_replenish(op_bytes, TokenType::Bytes);
        };
        let Some(slot) = self.free.pop() else {
            give_back(&mut self.limiter);
            self.stalled = true;
            return Ok(Flow::PutBack);
        };

        let segments = &self.scratch[req.data.clone()];
        let byte_offset = |sector: u64| sector << SECTOR_SHIFT;
        let bytes = |sectors: u32| u64::from(sectors) << SECTOR_SHIFT;
        let op = match req.kind {
            RequestKind::Read { sector } => IoOp::Read {
                offset: byte_offset(sector),
                segments,
            },
            RequestKind::Write { sector } => IoOp::Write {
                offset: byte_offset(sector),
                segments,
            },
            RequestKind::Discard {
                sector,
                num_sectors,
            } => IoOp::Discard {
                offset: byte_offset(sector),
                len: bytes(num_sectors),
            },
            RequestKind::WriteZeroes {
                sector,
                num_sectors,
                unmap,
            } => IoOp::WriteZeroes {
                offset: byte_offset(sector),
                len: bytes(num_sectors),
                unmap,
            },
            RequestKind::Flush | RequestKind::GetId => IoOp::Flush,
        };
        match self.engine.queue(slot, &op) {
            Ok(()) => {
                self.slots[usize::from(slot)] = InFlight {
                    head: req.head,
                    status: req.status,
                    class,
                    data_len: req.data_len,
                };
                Ok(Flow::Continue)
            }
            Err(QueueError::Full) => {
                self.free.push(slot);
                give_back(&mut self.limiter);
                self.stalled = true;
                Ok(Flow::PutBack)
            }
            Err(e) => {
                // Data buffers outside guest memory, or more vectors than the host takes.
                self.free.push(slot);
                give_back(&mut self.limiter);
                inc(&self.params.metrics.invalid_requests);
                self.log_guest_error(u32::MAX, &e);
                self.finish_now(req.head, Some(req.status), STATUS_IOERR, 1)?;
                Ok(Flow::Continue)
            }
        }
    }

    /// Completes a refused chain with its error status.
    fn reject(&mut self, rejection: Rejection) -> Result<(), WorkerError> {
        inc(&self.params.metrics.invalid_requests);
        self.log_guest_error(rejection.error.kind_index(), &rejection.error);
        self.finish_now(
            rejection.head,
            rejection.status,
            rejection.error.status(),
            1,
        )
    }

    /// Answers GET_ID from the serial, in as many data bytes as the driver gave (up to 20).
    fn complete_get_id(&mut self, req: &Request) -> Result<(), WorkerError> {
        inc(&self.params.metrics.get_ids);
        let mut written = 0usize;
        let mut status = STATUS_OK;
        for seg in &self.scratch[req.data.clone()] {
            let Some(rest) = self.params.serial.get(written..) else {
                break;
            };
            let n = rest
                .len()
                .min(usize::try_from(seg.len).unwrap_or(usize::MAX));
            if self.mem.write_slice(&rest[..n], seg.addr).is_err() {
                status = STATUS_IOERR;
                break;
            }
            written += n;
        }
        let used = if status == STATUS_OK {
            // written <= 20
            u32::try_from(written).unwrap_or(0) + 1
        } else {
            1
        };
        self.finish_now(req.head, Some(req.status), status, used)
    }

    /// Reaps the engine and completes each finished request.
    fn complete_done(&mut self) -> Result<(), WorkerError> {
        self.engine
            .reap(&mut self.done)
            .map_err(WorkerError::Engine)?;
        let mut done = std::mem::take(&mut self.done);
        let result = done.drain(..).try_for_each(|c| self.finish(c));
        self.done = done;
        result
    }

    fn finish(&mut self, completion: Completion) -> Result<(), WorkerError> {
        let Some(entry) = self.slots.get(usize::from(completion.slot)).copied() else {
            return Ok(());
        };
        self.free.push(completion.slot);
        let m = &self.params.metrics;
        let ok = completion.result.is_ok();
        if let Err(errno) = completion.result {
            inc(&m.io_errors);
            if !self.logged_errnos.contains(&errno) && self.logged_errnos.len() < LOGGED_ERRNOS_MAX
            {
                self.logged_errnos.push(errno);
                tracing::warn!(
                    disk = %self.params.id,
                    queue = self.params.queue_index,
                    error = %io::Error::from_raw_os_error(errno),
                    "host I/O error; the guest gets IOERR (logged once per queue and error kind)"
                );
            }
        }
        let data = u64::from(entry.data_len);
        match entry.class {
            Class::Read => {
                inc(&m.reads);
                if ok {
                    add(&m.bytes_read, data);
                }
            }
            Class::Write => {
                inc(&m.writes);
                if ok {
                    add(&m.bytes_written, data);
                }
            }
            Class::Flush => inc(&m.flushes),
            Class::Discard => inc(&m.discards),
            Class::WriteZeroes => inc(&m.write_zeroes),
        }
        let (status, used) = match (ok, entry.class) {
            (true, Class::Read) => (STATUS_OK, entry.data_len.saturating_add(1)),
            (true, _) => (STATUS_OK, 1),
            (false, _) => (STATUS_IOERR, 1),
        };
        self.finish_now(entry.head, Some(entry.status), status, used)
    }

    /// Writes the status byte (when there is somewhere to write it) and adds the used entry.
    fn finish_now(
        &mut self,
        head: u16,
        status_addr: Option<GuestAddress>,
        status: u8,
        used_len: u32,
    ) -> Result<(), WorkerError> {
        let m = &self.params.metrics;
        let written = status_addr.is_some_and(|addr| self.mem.write_obj(status, addr).is_ok());
        let used_len = if written {
            match status {
                STATUS_OK => inc(&m.status_ok),
                STATUS_UNSUPP => inc(&m.status_unsupp),
                _ => inc(&m.status_ioerr),
            }
            used_len
        } else {
            inc(&m.status_unwritten);
            0
        };
        self.queue
            .add_used(&self.mem, head, used_len)
            .map_err(WorkerError::Queue)?;
        self.used_pending = true;
        Ok(())
    }

    /// One notification check, and at most one interrupt, per batch.
    fn signal(&mut self) -> Result<(), WorkerError> {
        if !self.used_pending {
            return Ok(());
        }
        self.used_pending = false;
        let needed = self
            .queue
            .needs_notification(&self.mem)
            .map_err(WorkerError::Queue)?;
        if needed {
            let kind = VirtioInterruptType::Queue(self.params.queue_index);
            if let Err(e) = self.interrupt.trigger(kind) {
                if !self.logged_interrupt_error {
                    self.logged_interrupt_error = true;
                    tracing::warn!(disk = %self.params.id, queue = self.params.queue_index, error = %e, "cannot raise the queue interrupt");
                }
            }
        }
        Ok(())
    }

    fn log_guest_error(&mut self, kind: u32, error: &dyn std::fmt::Display) {
        let bit = 1u32.checked_shl(kind).unwrap_or(1 << 31);
        if self.logged_kinds & bit == 0 {
            self.logged_kinds |= bit;
            tracing::warn!(
                disk = %self.params.id,
                queue = self.params.queue_index,
                device = self.params.device,
                %error,
                "bad request from the guest (logged once per kind)"
            );
        }
    }

    /// The guest address of the used ring (the fuzz target reads its index).
    #[cfg(feature = "fuzzing")]
    pub fn used_ring(&self) -> u64 {
        self.queue.used_ring()
    }

    /// Chains waiting for a free slot (tests).
    #[cfg(test)]
    fn is_stalled(&self) -> bool {
        self.stalled
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use proptest::prelude::*;
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Address;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;
    use crate::rate_limiter::TokenBucketConfig;
    use crate::virtio::block::engine::sync::SyncEngine;
    use crate::virtio::block::engine::uring::UringEngine;
    use crate::virtio::block::request::DiscardSegment;
    use crate::virtio::block::test_utils::{
        guest_memory, header, header_at, limits, post, relocate_used_ring, status_byte,
        used_entries, used_entries_at, wait_for, ChainBuilder, RecordingInterrupt, TempDisk,
        DATA_ADDR, DISK_SECTORS, HEADER_ADDR, QUEUE_SIZE, SPARE_USED_ADDR, STATUS_ADDR,
    };

    const DISK_BYTES: u64 = DISK_SECTORS * 512;
    /// A status value no request produces, to see whether the device wrote one.
    const UNTOUCHED: u8 = 0xee;

    struct Harness<'a> {
        vq: MockSplitQueue<'a, GuestMemoryMmap>,
        worker: BlockWorker,
        interrupt: Arc<RecordingInterrupt>,
        metrics: Arc<BlockMetrics>,
    }

    fn params(rate_limit: RateLimitConfig, metrics: &Arc<BlockMetrics>) -> WorkerParams {
        let mut serial = [0u8; ID_BYTES];
        serial[..6].copy_from_slice(b"disk-0");
        WorkerParams {
            device: 0,
            id: Arc::from("disk-0"),
            queue_index: 0,
            limits: limits(),
            serial,
            metrics: metrics.clone(),
            rate_limit,
        }
    }

    fn harness_with<'a>(
        mem: &'a GuestMemoryMmap,
        disk: &TempDisk,
        rate_limit: RateLimitConfig,
        engine: Option<Box<dyn BlockEngine>>,
    ) -> Harness<'a> {
        mem.write_obj(UNTOUCHED, STATUS_ADDR).unwrap();
        let vq = MockSplitQueue::new(mem, QUEUE_SIZE);
        let mut queue: Queue = vq.create_queue().unwrap();
        queue.set_event_idx(true);
        let engine = engine.unwrap_or_else(|| {
            Box::new(SyncEngine::new(
                Arc::new(disk.open()),
                mem.clone(),
                QUEUE_SIZE,
            ))
        });
        let metrics = Arc::new(BlockMetrics::default());
        let interrupt = RecordingInterrupt::new();
        let worker = BlockWorker::new(
            params(rate_limit, &metrics),
            queue,
            mem.clone(),
            interrupt.clone(),
            engine,
        )
        .unwrap();
        Harness {
            vq,
            worker,
            interrupt,
            metrics,
        }
    }

    fn harness<'a>(mem: &'a GuestMemoryMmap, disk: &TempDisk) -> Harness<'a> {
        harness_with(mem, disk, RateLimitConfig::default(), None)
    }

    fn write_segment(mem: &GuestMemoryMmap, sector: u64, num_sectors: u32, flags: u32) {
        let seg = DiscardSegment {
            sector: sector.into(),
            num_sectors: num_sectors.into(),
            flags: flags.into(),
        };
        mem.write_obj(seg, DATA_ADDR).unwrap();
    }

    #[test]
    fn read_copies_disk_into_guest_and_reports_length() {
        let mem = guest_memory();
        let disk = TempDisk::new(DISK_BYTES);
        let mut h = harness(&mem, &disk);
        header(&mem, VIRTIO_BLK_T_IN, 4);
        ChainBuilder::request(&[(DATA_ADDR, 1024, true)]).add_to(&h.vq, 0);

        h.worker.handle_kick().unwrap();

        let mut buf = [0u8; 1024];
        mem.read_slice(&mut buf, DATA_ADDR).unwrap();
        assert_eq!(used_entries(&h.vq), vec![(0, 1025)]);
        assert_eq!(status_byte(&mem), STATUS_OK);
        assert_eq!(buf[0], TempDisk::pattern(2048));
        assert_eq!(buf[1023], TempDisk::pattern(2048 + 1023));
    }

    #[test]
    fn read_counts_metrics() {
        let mem = guest_memory();
        let disk = TempDisk::new(DISK_BYTES);
        let mut h = harness(&mem, &disk);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        ChainBuilder::request(&[(DATA_ADDR, 4096, true)]).add_to(&h.vq, 0);

        h.worker.handle_kick().unwrap();

        let snap = h.metrics.snapshot();
        assert_eq!((snap.reads, snap.bytes_read, snap.status_ok), (1, 4096, 1));
    }

    #[test]
    fn write_stores_guest_data_on_disk() {
        let mem = guest_memory();
        let disk = TempDisk::new(DISK_BYTES);
        let mut h = harness(&mem, &disk);
        header(&mem, VIRTIO_BLK_T_OUT, 1);
        mem.write_slice(&[0xc3; 512], DATA_ADDR).unwrap();
        ChainBuilder::request(&[(DATA_ADDR, 512, false)]).add_to(&h.vq, 0);

        h.worker.handle_kick().unwrap();

        assert_eq!(used_entries(&h.vq), vec![(0, 1)]);
        assert_eq!(status_byte(&mem), STATUS_OK);
        assert_eq!(disk.read_at(512, 512), vec![0xc3; 512]);
    }

    #[test]
    fn flush_completes_ok() {
        let mem = guest_memory();
        let disk = TempDisk::new(DISK_BYTES);
        let mut h = harness(&mem, &disk);
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        ChainBuilder::request(&[]).add_to(&h.vq, 0);

        h.worker.handle_kick().unwrap();

        assert_eq!(used_entries(&h.vq), vec![(0, 1)]);
        assert_eq!(status_byte(&mem), STATUS_OK);
        assert_eq!(h.metrics.snapshot().flushes, 1);
    }

    #[test]
    fn get_id_writes_zero_padded_serial() {
        let mem = guest_memory();
        let disk = TempDisk::new(DISK_BYTES);
        let mut h = harness(&mem, &disk);
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        mem.write_slice(&[0xff; 20], DATA_ADDR).unwrap();
        ChainBuilder::request(&[(DATA_ADDR, 20, true)]).add_to(&h.vq, 0);

        h.worker.handle_kick().unwrap();

        let mut id = [0u8; 20];
        mem.read_slice(&mut id, DATA_ADDR).unwrap();
        assert_eq!(&id, b"disk-0\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
        assert_eq!(used_entries(&h.vq), vec![(0, 21)]);
    }

    #[test]
    fn get_id_into_short_buffer_writes_prefix() {
        let mem = guest_memory();
        let disk = TempDisk::new(DISK_BYTES);
        let mut h = harness(&mem, &disk);
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        ChainBuilder::request(&[(DATA_ADDR, 4, true)]).add_to(&h.vq, 0);

        h.worker.handle_kick().unwrap();

        let mut id = [0u8; 4];
        mem.read_slice(&mut id, DATA_ADDR).unwrap();
        assert_eq!((&id, used_entries(&h.vq)), (b"disk", vec![(0, 5)]));
    }

    #[test]
    fn discard_completes_ok_and_keeps_size() {
        let mem = guest_memory();
        let disk = TempDisk::new(DISK_BYTES);
        let mut h = harness(&mem, &disk);
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        write_segment(&mem, 8, 8, 0);
        ChainBuilder::request(&[(DATA_ADDR, 16, false)]).add_to(&h.vq, 0);

        h.worker.handle_kick().unwrap();

        assert_eq!(status_byte(&mem), STATUS_OK);
        assert_eq!(std::fs::metadata(&disk.path).unwrap().len(), DISK_BYTES);
        assert_eq!(h.metrics.snapshot().discards, 1);
    }

    #[test]
    fn write_zeroes_zeroes_the_range() {
        let mem = guest_memory();
        let disk = TempDisk::new(DISK_BYTES);
        let mut h = harness(&mem, &disk);
        header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        write_segment(&mem, 8, 8, 0);
        ChainBuilder::request(&[(DATA_ADDR, 16, false)]).add_to(&h.vq, 0);

        h.worker.handle_kick().unwrap();

        assert_eq!(status_byte(&mem), STATUS_OK);
        assert_eq!(disk.read_at(4096, 4096), vec![0; 4096]);
        assert_eq!(disk.read_at(4096 + 4096, 1), vec![TempDisk::pattern(8192)]);
    }

    #[test]
    fn write_zeroes_with_unmap_zeroes_the_range() {
        let mem = guest_memory();
        let disk = TempDisk::new(DISK_BYTES);
        let mut h = harness(&mem, &disk);
        header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        write_segment(&mem, 0, 8, 1);
        ChainBuilder::request(&[(DATA_ADDR, 16, false)]).add_to(&h.vq, 0);

        h.worker.handle_kick().unwrap();

        assert_eq!(status_byte(&mem), STATUS_OK);
        assert_eq!(disk.read_at(0, 4096), vec![0; 4096]);
    }

    #[test]
    fn unsupported_type_completes_unsupp() {
        let mem = guest_memory();
        let disk = TempDisk::new(DISK_BYTES);
        let mut h = harness(&mem, &disk);
        header(&mem, 0x77, 0);
        ChainBuilder::request(&[]).add_to(&h.vq, 0);

        h.worker.handle_kick().unwrap();

        assert_eq!(used_entries(&h.vq), vec![(0, 1)]);
        assert_eq!(status_byte(&mem), STATUS_UNSUPP);
        assert_eq!(h.metrics.snapshot().invalid_requests, 1);
    }

    #[test]
    fn read_past_capacity_completes_ioerr_and_worker_goes_on() {
        let mem = guest_memory();
        let disk = TempDisk::new(DISK_BYTES);
        let mut h = harness(&mem, &disk);
        header(&mem, VIRTIO_BLK_T_IN, DISK_SECTORS);
        ChainBuilder::request(&[(DATA_ADDR, 512, true)]).add_to(&h.vq, 0);
        h.worker.handle_kick().unwrap();
        assert_eq!(status_byte(&mem), STATUS_IOERR);

        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        ChainBuilder::request(&[]).add_to(&h.vq, 4);
        h.worker.handle_kick().unwrap();

        assert_eq!(used_entries(&h.vq), vec![(0, 1), (4, 1)]);
        assert_eq!(status_byte(&mem), STATUS_OK);
    }

    #[test]
    fn host_io_error_completes_ioerr_and_counts() {
        let mem = guest_memory();
        // The file holds one sector while the limits say 2048: reading sector 4 hits EOF.
        let disk = TempDisk::new(512);
        let mut h = harness(&mem, &disk);
        header(&mem, VIRTIO_BLK_T_IN, 4);
        ChainBuilder::request(&[(DATA_ADDR, 512, true)]).add_to(&h.vq, 0);

        h.worker.handle_kick().unwrap();

        assert_eq!(used_entries(&h.vq), vec![(0, 1)]);
        assert_eq!(status_byte(&mem), STATUS_IOERR);
        assert_eq!(h.metrics.snapshot().io_errors, 1);
    }

    /// An engine whose submission always fails.
    struct FailingEngine;

    impl BlockEngine for FailingEngine {
        fn queue(&mut self, _slot: u16, _op: &IoOp<'_>) -> Result<(), QueueError> {
            Ok(())
        }
        fn submit(&mut self) -> Result<(), EngineError> {
            Err(EngineError::Submit(io::Error::from_raw_os_error(
                libc::EBADF,
            )))
        }
        fn reap(&mut self, _done: &mut Vec<Completion>) -> Result<(), EngineError> {
            Ok(())
        }
        fn drain(&mut self, _done: &mut Vec<Completion>) -> Result<(), EngineError> {
            Ok(())
        }
        fn completion_fd(&self) -> Option<RawFd> {
            None
        }
        fn in_flight(&self) -> usize {
            0
        }
        fn name(&self) -> &'static str {
            "failing"
        }
    }

    #[test]
    fn engine_failure_sets_needs_reset_and_stops_worker() {
        let mem = guest_memory();
        let disk = TempDisk::new(DISK_BYTES);
        let h = harness_with(
            &mem,
            &disk,
            RateLimitConfig::default(),
            Some(Box::new(FailingEngine)),
        );
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        ChainBuilder::request(&[]).add_to(&h.vq, 0);
        let (_updates, receiver) = std::sync::mpsc::channel();
        let events = WorkerEvents {
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            kill: EventFd::new(EFD_NONBLOCK).unwrap(),
            control: EventFd::new(EFD_NONBLOCK).unwrap(),
            updates: receiver,
        };
        let worker = h.worker;

        // The worker takes the posted chain as it starts, fails to submit, and returns.
        std::thread::spawn(move || worker.run(events))
            .join()
            .unwrap();

        assert!(h.interrupt.needs_reset.load(Ordering::SeqCst));
    }

    #[test]
    fn data_outside_guest_memory_completes_ioerr() {
        let mem = guest_memory();
        let disk = TempDisk::new(DISK_BYTES);
        let mut h = harness(&mem, &disk);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        ChainBuilder::request(&[(GuestAddress(0x7fff_0000), 512, true)]).add_to(&h.vq, 0);

        h.worker.handle_kick().unwrap();

        assert_eq!(used_entries(&h.vq), vec![(0, 1)]);
        assert_eq!(status_byte(&mem), STATUS_IOERR);
    }

    #[test]
    fn status_outside_guest_memory_is_used_with_zero_length() {
        let mem = guest_memory();
        let disk = TempDisk::new(DISK_BYTES);
        let mut h = harness(&mem, &disk);
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let chain = ChainBuilder::new().desc(HEADER_ADDR, 16, false).desc(
            GuestAddress(0x7fff_0000),
            1,
            true,
        );
        chain.add_to(&h.vq, 0);

        h.worker.handle_kick().unwrap();

        assert_eq!(used_entries(&h.vq), vec![(0, 0)]);
        assert_eq!(h.metrics.snapshot().status_unwritten, 1);
    }

    #[test]
    fn missing_status_is_used_with_zero_length() {
        let mem = guest_memory();
        let disk = TempDisk::new(DISK_BYTES);
        let mut h = harness(&mem, &disk);
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        ChainBuilder::new()
            .desc(HEADER_ADDR, 16, false)
            .add_to(&h.vq, 0);

        h.worker.handle_kick().unwrap();

        assert_eq!(used_entries(&h.vq), vec![(0, 0)]);
        assert_eq!(status_byte(&mem), UNTOUCHED);
    }

    #[test]
    fn descriptor_loop_is_used_and_worker_survives() {
        let mem = guest_memory();
        let disk = TempDisk::new(DISK_BYTES);
        let mut h = harness(&mem, &disk);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        // 0 -> 1 -> 0 -> ...
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(HEADER_ADDR.0, 16, 1, 1)),
            RawDescriptor::from(SplitDescriptor::new(DATA_ADDR.0, 512, 3, 0)),
        ];
        h.vq.add_desc_chains(&descs, 0).unwrap();
        h.worker.handle_kick().unwrap();

        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        ChainBuilder::request(&[]).add_to(&h.vq, 4);
        h.worker.handle_kick().unwrap();

        assert_eq!(used_entries(&h.vq), vec![(0, 0), (4, 1)]);
        assert_eq!(status_byte(&mem), STATUS_OK);
    }

    #[test]
    fn head_index_past_queue_breaks_the_queue() {
        let mem = guest_memory();
        let disk = TempDisk::new(DISK_BYTES);
        let mut h = harness(&mem, &disk);
        h.vq.avail().ring().ref_at(0).unwrap().store(QUEUE_SIZE + 3);
        h.vq.avail().idx().store(1);

        let result = h.worker.handle_kick();

        assert!(matches!(result, Err(WorkerError::Queue(_))));
    }

    #[test]
    fn avail_index_far_ahead_breaks_the_queue() {
        let mem = guest_memory();
        let disk = TempDisk::new(DISK_BYTES);
        let mut h = harness(&mem, &disk);
        h.vq.avail().idx().store(QUEUE_SIZE + 1);

        let result = h.worker.handle_kick();

        assert!(matches!(result, Err(WorkerError::Queue(_))));
    }

    #[test]
    fn batch_of_chains_raises_one_interrupt() {
        let mem = guest_memory();
        let disk = TempDisk::new(DISK_BYTES);
        let mut h = harness(&mem, &disk);
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        ChainBuilder::request(&[]).add_to(&h.vq, 0);
        ChainBuilder::request(&[]).add_to(&h.vq, 2);
        ChainBuilder::request(&[]).add_to(&h.vq, 4);

        h.worker.handle_kick().unwrap();

        assert_eq!(used_entries(&h.vq).len(), 3);
        assert_eq!(h.interrupt.triggered(), vec![VirtioInterruptType::Queue(0)]);
    }

    #[test]
    fn used_event_in_the_future_suppresses_interrupt() {
        let mem = guest_memory();
        let disk = TempDisk::new(DISK_BYTES);
        let mut h = harness(&mem, &disk);
        // used_event (after the avail ring) = 5: the driver wants a call at the 6th entry.
        let used_event =
            h.vq.avail_addr()
                .unchecked_add(4 + 2 * u64::from(QUEUE_SIZE));
        mem.write_obj(5u16, used_event).unwrap();
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        ChainBuilder::request(&[]).add_to(&h.vq, 0);

        h.worker.handle_kick().unwrap();

        assert_eq!(used_entries(&h.vq).len(), 1);
        assert!(h.interrupt.triggered().is_empty());
    }

    #[test]
    fn rate_limited_chain_is_put_back_not_dropped() {
        let mem = guest_memory();
        let disk = TempDisk::new(DISK_BYTES);
        let one_op_per_minute = RateLimitConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 1,
                one_time_burst: 0,
                refill_time_ms: 60_000,
            }),
        };
        let mut h = harness_with(&mem, &disk, one_op_per_minute, None);
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        ChainBuilder::request(&[]).add_to(&h.vq, 0);
        ChainBuilder::request(&[]).add_to(&h.vq, 2);

        h.worker.handle_kick().unwrap();
        assert_eq!(used_entries(&h.vq), vec![(0, 1)]);
        assert_eq!(h.metrics.snapshot().rate_limited, 1);

        h.worker
            .handle_rate_limit_update(RateLimitConfig::default())
            .unwrap();
        assert_eq!(used_entries(&h.vq), vec![(0, 1), (2, 1)]);
    }

    #[test]
    fn rate_limited_chain_runs_when_timer_fires() {
        let mem = guest_memory();
        let disk = TempDisk::new(DISK_BYTES);
        // One 512-byte read per 10 ms.
        let limit = RateLimitConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 512,
                one_time_burst: 0,
                refill_time_ms: 10,
            }),
            ops: None,
        };
        let mut h = harness_with(&mem, &disk, limit, None);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        ChainBuilder::request(&[(DATA_ADDR, 512, true)]).add_to(&h.vq, 0);
        ChainBuilder::request(&[(DATA_ADDR, 512, true)]).add_to(&h.vq, 3);
        h.worker.handle_kick().unwrap();
        assert_eq!(used_entries(&h.vq).len(), 1);

        std::thread::sleep(std::time::Duration::from_millis(30));
        h.worker.handle_timer().unwrap();

        assert_eq!(used_entries(&h.vq).len(), 2);
    }

    /// An engine that holds every operation until `release` is set, to fill the table.
    struct HoldingEngine {
        held: Vec<Completion>,
        release: Arc<AtomicBool>,
    }

    impl BlockEngine for HoldingEngine {
        fn queue(&mut self, slot: u16, _op: &IoOp<'_>) -> Result<(), QueueError> {
            self.held.push(Completion {
                slot,
                result: Ok(()),
            });
            Ok(())
        }
        fn submit(&mut self) -> Result<(), EngineError> {
            Ok(())
        }
        fn reap(&mut self, done: &mut Vec<Completion>) -> Result<(), EngineError> {
            if self.release.load(Ordering::SeqCst) {
                done.append(&mut self.held);
            }
            Ok(())
        }
        fn drain(&mut self, done: &mut Vec<Completion>) -> Result<(), EngineError> {
            done.append(&mut self.held);
            Ok(())
        }
        fn completion_fd(&self) -> Option<RawFd> {
            Some(0)
        }
        fn in_flight(&self) -> usize {
            self.held.len()
        }
        fn name(&self) -> &'static str {
            "holding"
        }
    }

    /// A worker over a HoldingEngine whose used ring sits at `SPARE_USED_ADDR`, after a
    /// kick that filled its in-flight table with `QUEUE_SIZE` flushes, and one more flush
    /// posted.
    fn overfilled_worker<'a>(
        mem: &'a GuestMemoryMmap,
        release: &Arc<AtomicBool>,
    ) -> (MockSplitQueue<'a, GuestMemoryMmap>, BlockWorker) {
        let vq = MockSplitQueue::new(mem, QUEUE_SIZE);
        let mut queue: Queue = vq.create_queue().unwrap();
        relocate_used_ring(&mut queue);
        header(mem, VIRTIO_BLK_T_FLUSH, 0);
        ChainBuilder::request(&[]).add_to(&vq, 0);
        // A hostile driver re-posts the same chain without waiting for it to complete.
        for _ in 1..QUEUE_SIZE {
            post(&vq, 0);
        }
        let engine = Box::new(HoldingEngine {
            held: Vec::new(),
            release: release.clone(),
        });
        let metrics = Arc::new(BlockMetrics::default());
        let params = params(RateLimitConfig::default(), &metrics);
        let mut worker = BlockWorker::new(
            params,
            queue,
            mem.clone(),
            RecordingInterrupt::new(),
            engine,
        )
        .unwrap();
        worker.handle_kick().unwrap();
        post(&vq, 0);
        (vq, worker)
    }

    #[test]
    fn full_in_flight_table_puts_chain_back() {
        let mem = guest_memory();
        let release = Arc::new(AtomicBool::new(false));
        let (_vq, mut worker) = overfilled_worker(&mem, &release);

        worker.handle_kick().unwrap();

        assert!(worker.is_stalled());
        assert_eq!(worker.queue.next_avail(), QUEUE_SIZE);
        assert!(used_entries_at(&mem, SPARE_USED_ADDR).is_empty());
    }

    #[test]
    fn full_in_flight_table_resumes_after_completions() {
        let mem = guest_memory();
        let release = Arc::new(AtomicBool::new(false));
        let (_vq, mut worker) = overfilled_worker(&mem, &release);
        worker.handle_kick().unwrap();
        release.store(true, Ordering::SeqCst);

        worker.handle_completions().unwrap();

        assert!(!worker.is_stalled());
        assert_eq!(worker.queue.next_avail(), QUEUE_SIZE + 1);
        assert_eq!(
            used_entries_at(&mem, SPARE_USED_ADDR).len(),
            usize::from(QUEUE_SIZE)
        );
    }

    #[test]
    fn uring_read_write_flush_through_worker() {
        let mem = guest_memory();
        let disk = TempDisk::new(DISK_BYTES);
        let engine = match UringEngine::new(Arc::new(disk.open()), mem.clone(), QUEUE_SIZE) {
            Ok(e) => Box::new(e),
            Err(e) => {
                println!("skipping: io_uring unavailable on this host: {e}");
                return;
            }
        };
        let mut h = harness_with(&mem, &disk, RateLimitConfig::default(), Some(engine));
        let (write_hdr, flush_hdr, read_hdr) = (
            GuestAddress(0x5000),
            GuestAddress(0x5100),
            GuestAddress(0x5200),
        );
        let statuses = [
            GuestAddress(0x6100),
            GuestAddress(0x6200),
            GuestAddress(0x6300),
        ];
        let read_buf = GuestAddress(0x9000);
        header_at(&mem, write_hdr, VIRTIO_BLK_T_OUT, 2);
        header_at(&mem, flush_hdr, VIRTIO_BLK_T_FLUSH, 0);
        header_at(&mem, read_hdr, VIRTIO_BLK_T_IN, 2);
        mem.write_slice(&[0x42; 512], DATA_ADDR).unwrap();
        ChainBuilder::new()
            .desc(write_hdr, 16, false)
            .desc(DATA_ADDR, 512, false)
            .desc(statuses[0], 1, true)
            .add_to(&h.vq, 0);
        ChainBuilder::new()
            .desc(flush_hdr, 16, false)
            .desc(statuses[1], 1, true)
            .add_to(&h.vq, 3);
        h.worker.handle_kick().unwrap();
        assert!(wait_for(|| {
            h.worker.handle_completions().unwrap();
            used_entries(&h.vq).len() == 2
        }));
        ChainBuilder::new()
            .desc(read_hdr, 16, false)
            .desc(read_buf, 512, true)
            .desc(statuses[2], 1, true)
            .add_to(&h.vq, 5);

        h.worker.handle_kick().unwrap();
        assert!(wait_for(|| {
            h.worker.handle_completions().unwrap();
            used_entries(&h.vq).len() == 3
        }));

        let mut back = [0u8; 512];
        mem.read_slice(&mut back, read_buf).unwrap();
        let got: Vec<u8> = statuses.iter().map(|&a| mem.read_obj(a).unwrap()).collect();
        assert_eq!(got, vec![STATUS_OK; 3]);
        assert_eq!(back, [0x42; 512]);
        assert_eq!(disk.read_at(1024, 512), vec![0x42; 512]);
    }

    /// One random descriptor: mostly plausible addresses and lengths.
    fn arb_descriptor() -> impl Strategy<Value = (u64, u32, u16, u16)> {
        (
            prop_oneof![
                Just(HEADER_ADDR.0),
                Just(STATUS_ADDR.0),
                (0u64..8).prop_map(|i| DATA_ADDR.0 + i * 512),
                Just(0x7fff_0000u64),
                any::<u64>(),
            ],
            prop_oneof![
                Just(16u32),
                Just(1),
                Just(512),
                Just(4096),
                0u32..64,
                any::<u32>()
            ],
            prop_oneof![Just(0u16), Just(1), Just(2), Just(3), 0u16..8],
            0u16..(QUEUE_SIZE + 2),
        )
    }

    /// Follows `next` from descriptor 0 like virtio-queue does (no indirect tables); the last
    /// descriptor if the walk ends.
    fn walk_chain(descs: &[(u64, u32, u16, u16)]) -> Option<(u64, u32, u16, u16)> {
        let mut index = 0u16;
        for _ in 0..QUEUE_SIZE {
            let d = *descs.get(usize::from(index))?;
            if d.2 & 4 != 0 {
                return None;
            }
            if d.2 & 1 == 0 {
                return Some(d);
            }
            index = d.3;
        }
        None
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// A random chain never panics the worker: it is used, with a valid status byte when
        /// the used length says one was written, or the queue reports itself broken.
        #[test]
        fn random_chain_is_used_with_valid_status_or_breaks_the_queue(
            descs in proptest::collection::vec(arb_descriptor(), 1..(QUEUE_SIZE as usize)),
            request_type in prop_oneof![
                Just(VIRTIO_BLK_T_IN), Just(VIRTIO_BLK_T_OUT), Just(VIRTIO_BLK_T_FLUSH),
                Just(VIRTIO_BLK_T_GET_ID), Just(VIRTIO_BLK_T_DISCARD),
                Just(VIRTIO_BLK_T_WRITE_ZEROES), any::<u32>()
            ],
            sector in prop_oneof![0u64..DISK_SECTORS, any::<u64>()],
            segment in (0u64..DISK_SECTORS + 4, 0u32..64, 0u32..4),
        ) {
            let mem = guest_memory();
            let disk = TempDisk::new(DISK_BYTES);
            let mut h = harness(&mem, &disk);
            header(&mem, request_type, sector);
            write_segment(&mem, segment.0, segment.1, segment.2);
            for (i, &(a, l, f, n)) in descs.iter().enumerate() {
                let raw = RawDescriptor::from(SplitDescriptor::new(a, l, f, n));
                h.vq.desc_table().store(i as u16, raw).unwrap();
            }
            // One available chain, headed by descriptor 0.
            h.vq.avail().ring().ref_at(0).unwrap().store(0);
            h.vq.avail().idx().store(1);

            let result = h.worker.handle_kick();

            match result {
                Ok(()) => {
                    let used = used_entries(&h.vq);
                    prop_assert_eq!(used.len(), 1);
                    prop_assert_eq!(used[0].0, 0);
                    if let (true, Some(last)) = (used[0].1 >= 1, walk_chain(&descs)) {
                        let status: u8 = mem.read_obj(GuestAddress(last.0)).unwrap();
                        prop_assert!(status <= STATUS_UNSUPP, "status {}", status);
                    }
                }
                Err(WorkerError::Queue(_)) => {}
                Err(e) => prop_assert!(false, "unexpected error {}", e),
            }
        }
    }
}
