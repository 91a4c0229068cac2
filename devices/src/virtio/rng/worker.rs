//! The entropy device's worker: drains the request queue into random bytes, and the
//! thread loop that waits for the queue kick, the rate limiter's timer and the kill
//! eventfd. Queue processing follows virtio-queue's notification-suppression loop: disable,
//! drain, enable, again if new chains came.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes};
use vmm_sys_util::eventfd::EventFd;

use super::{RngError, RngMetrics, MAX_REQUEST_BYTES};
use crate::rate_limiter::{RateLimiter, TokenType};
use crate::virtio::{GuestMemoryMmap, VirtioInterrupt, VirtioInterruptType};

/// Bytes asked of the entropy source at a time.
const CHUNK_BYTES: usize = 4096;

/// Where random bytes come from.
pub trait EntropySource: Send {
    /// Fills all of `buf`. An error is a host fault.
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()>;
}

/// The host kernel's pool, through `getrandom(2)` (never blocks once the host has booted).
#[derive(Debug, Default)]
pub struct HostEntropy;

impl EntropySource for HostEntropy {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        let mut filled = 0;
        while filled < buf.len() {
            let rest = &mut buf[filled..];
            // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes for the call.
            let ret = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            match usize::try_from(ret) {
                Ok(n) => filled += n,
                Err(_) => {
                    let err = std::io::Error::last_os_error();
                    if err.kind() != std::io::ErrorKind::Interrupted {
                        return Err(err);
                    }
                }
            }
        }
        Ok(())
    }
}

/// The eventfds the worker thread waits on.
pub struct WorkerEvents {
    pub kick: EventFd,
    pub kill: EventFd,
}

/// Serves the request queue.
pub struct RngWorker {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
    source: Box<dyn EntropySource>,
    limiter: RateLimiter,
    metrics: Arc<RngMetrics>,
    logged_interrupt: bool,
}

/// Takes `bytes` and one operation from `limiter`, or neither.
fn admit(limiter: &mut RateLimiter, bytes: u64) -> bool {
    if !limiter.consume(bytes, TokenType::Bytes) {
        return false;
    }
    if !limiter.consume(1, TokenType::Ops) {
        limiter.manual_replenish(bytes, TokenType::Bytes);
        return false;
    }
    true
}

impl RngWorker {
    pub fn new(
        mem: GuestMemoryMmap,
        queue: Queue,
        interrupt: Arc<dyn VirtioInterrupt>,
        source: Box<dyn EntropySource>,
        limiter: RateLimiter,
        metrics: Arc<RngMetrics>,
    ) -> Self {
        Self {
            mem,
            queue,
            interrupt,
            source,
            limiter,
            metrics,
            logged_interrupt: false,
        }
    }

    /// Completes every available request the limiter admits, then raises the queue's
    /// interrupt if the driver wants one. A request the limiter refuses goes back on the
    /// ring (nothing is dropped) until its timer fires.
    pub fn process_queue(&mut self) -> Result<(), RngError> {
        let mut used_any = false;
        'drain: loop {
            self.queue
                .disable_notification(&self.mem)
                .map_err(RngError::Queue)?;
            loop {
                if self.limiter.is_blocked() {
                    break 'drain;
                }
                let chain = {
                    let mut iter = self.queue.iter(&self.mem).map_err(RngError::Queue)?;
                    iter.next()
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let writable: u64 = chain
                    .clone()
                    .filter(|d| d.is_write_only())
                    .map(|d| u64::from(d.len()))
                    .sum::<u64>()
                    .min(u64::from(MAX_REQUEST_BYTES));
                if !admit(&mut self.limiter, writable.max(1)) {
                    // Put the chain back: the next pass starts with it again.
                    let back = self.queue.next_avail().wrapping_sub(1);
                    self.queue.set_next_avail(back);
                    self.metrics.throttled.fetch_add(1, Ordering::Relaxed);
                    break 'drain;
                }
                let mut budget = writable;
                let mut written = 0u32;
                let mut chunk = [0u8; CHUNK_BYTES];
                for desc in chain.filter(|d| d.is_write_only()) {
                    let mut offset = 0u64;
                    let len = u64::from(desc.len()).min(budget);
                    while offset < len {
                        let n = usize::try_from((len - offset).min(CHUNK_BYTES as u64))
                            .unwrap_or(CHUNK_BYTES);
                        self.source
                            .fill(&mut chunk[..n])
                            .map_err(RngError::Entropy)?;
                        let Some(addr) = desc.addr().checked_add(offset) else {
                            break;
                        };
                        if self.mem.write_slice(&chunk[..n], addr).is_err() {
                            break;
                        }
                        offset += n as u64;
                    }
                    // offset <= MAX_REQUEST_BYTES, a u32.
                    written = written.saturating_add(u32::try_from(offset).unwrap_or(u32::MAX));
                    budget -= offset;
                    if offset < len || budget == 0 {
                        break;
                    }
                }
                if written == 0 {
                    self.metrics.bad_chains.fetch_add(1, Ordering::Relaxed);
                }
                self.queue
                    .add_used(&self.mem, head, written)
                    .map_err(RngError::Queue)?;
                used_any = true;
                self.metrics.requests.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .bytes
                    .fetch_add(u64::from(written), Ordering::Relaxed);
            }
            if !self
                .queue
                .enable_notification(&self.mem)
                .map_err(RngError::Queue)?
            {
                break;
            }
        }
        if used_any
            && self
                .queue
                .needs_notification(&self.mem)
                .map_err(RngError::Queue)?
        {
            if let Err(e) = self.interrupt.trigger(VirtioInterruptType::Queue(0)) {
                if !self.logged_interrupt {
                    self.logged_interrupt = true;
                    tracing::error!(error = %e, "rng: cannot raise interrupt (logged once)");
                }
            }
        }
        Ok(())
    }

    /// Serves the queue until `kill` fires or a host fault stops it.
    pub fn run(mut self, events: &WorkerEvents) -> Result<(), RngError> {
        // The driver may have posted buffers before it set DRIVER_OK.
        self.process_queue()?;
        loop {
            let mut fds = [
                events.kick.as_raw_fd(),
                events.kill.as_raw_fd(),
                self.limiter.as_raw_fd(),
            ]
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
            // SAFETY: `fds` is a valid array of 3 pollfds that outlives the call.
            let ret = unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) };
            if ret < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(RngError::Poll(err));
            }
            if fds[1].revents != 0 {
                return Ok(());
            }
            if fds[2].revents != 0 {
                self.limiter
                    .event_handler()
                    .map_err(RngError::RateLimiter)?;
            }
            if fds[0].revents != 0 {
                let _ = events.kick.read();
            }
            self.process_queue()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::rate_limiter::{RateLimitConfig, TokenBucketConfig};
    use crate::virtio::block::test_utils::{
        guest_memory, used_entries, ChainBuilder, RecordingInterrupt, DATA_ADDR, QUEUE_SIZE,
    };

    /// Fills every buffer with one byte value, so tests can see what was written.
    struct Constant(u8);

    impl EntropySource for Constant {
        fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
            buf.fill(self.0);
            Ok(())
        }
    }

    /// A source whose host call always fails.
    struct Broken;

    impl EntropySource for Broken {
        fn fill(&mut self, _buf: &mut [u8]) -> std::io::Result<()> {
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        }
    }

    const FILL: u8 = 0xa5;
    /// A second buffer of the tests, away from [`DATA_ADDR`].
    const DATA2_ADDR: GuestAddress = GuestAddress(0xa000);

    fn worker(
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<'_, GuestMemoryMmap>,
        source: Box<dyn EntropySource>,
        limits: RateLimitConfig,
    ) -> (RngWorker, Arc<RecordingInterrupt>, Arc<RngMetrics>) {
        let interrupt = RecordingInterrupt::new();
        let metrics = Arc::new(RngMetrics::default());
        let worker = RngWorker::new(
            mem.clone(),
            vq.create_queue().unwrap(),
            interrupt.clone(),
            source,
            RateLimiter::new(limits).unwrap(),
            metrics.clone(),
        );
        (worker, interrupt, metrics)
    }

    #[test]
    fn writable_buffer_is_filled_and_used_with_its_length() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        ChainBuilder::new().desc(DATA_ADDR, 64, true).add_to(&vq, 0);
        let (mut w, interrupt, metrics) =
            worker(&mem, &vq, Box::new(Constant(FILL)), Default::default());

        w.process_queue().unwrap();

        let mut data = [0u8; 64];
        mem.read_slice(&mut data, DATA_ADDR).unwrap();
        assert_eq!(data, [FILL; 64]);
        assert_eq!(used_entries(&vq), vec![(0, 64)]);
        assert_eq!(interrupt.triggered(), vec![VirtioInterruptType::Queue(0)]);
        assert_eq!(metrics.snapshot().bytes, 64);
    }

    #[test]
    fn chain_of_two_buffers_fills_both() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        ChainBuilder::new()
            .desc(DATA_ADDR, 16, true)
            .desc(DATA2_ADDR, 16, true)
            .add_to(&vq, 0);
        let (mut w, _, _) = worker(&mem, &vq, Box::new(Constant(FILL)), Default::default());

        w.process_queue().unwrap();

        let second: [u8; 16] = mem.read_obj(DATA2_ADDR).unwrap();
        assert_eq!((used_entries(&vq), second), (vec![(0, 32)], [FILL; 16]));
    }

    #[test]
    fn readable_descriptor_is_skipped_and_not_written() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        ChainBuilder::new()
            .desc(DATA_ADDR, 16, false)
            .desc(DATA2_ADDR, 8, true)
            .add_to(&vq, 0);
        let (mut w, _, _) = worker(&mem, &vq, Box::new(Constant(FILL)), Default::default());

        w.process_queue().unwrap();

        let readable: [u8; 16] = mem.read_obj(DATA_ADDR).unwrap();
        assert_eq!((used_entries(&vq), readable), (vec![(0, 8)], [0; 16]));
    }

    #[test]
    fn chain_without_writable_buffer_completes_empty_and_counts() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        ChainBuilder::new()
            .desc(DATA_ADDR, 16, false)
            .add_to(&vq, 0);
        let (mut w, _, metrics) = worker(&mem, &vq, Box::new(Constant(FILL)), Default::default());

        w.process_queue().unwrap();

        assert_eq!(
            (used_entries(&vq), metrics.snapshot().bad_chains),
            (vec![(0, 0)], 1)
        );
    }

    #[test]
    fn buffer_outside_guest_memory_completes_empty() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        // Beyond the 1 MiB of test memory.
        ChainBuilder::new()
            .desc(GuestAddress(0x20_0000), 16, true)
            .add_to(&vq, 0);
        let (mut w, _, _) = worker(&mem, &vq, Box::new(Constant(FILL)), Default::default());

        w.process_queue().unwrap();

        assert_eq!(used_entries(&vq), vec![(0, 0)]);
    }

    #[test]
    fn large_buffer_gets_at_most_max_request_bytes() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        ChainBuilder::new()
            .desc(GuestAddress(0x10_0000), 0x20_0000, true)
            .add_to(&vq, 0);
        let (mut w, _, _) = worker(&mem, &vq, Box::new(Constant(FILL)), Default::default());

        w.process_queue().unwrap();

        assert_eq!(used_entries(&vq), vec![(0, MAX_REQUEST_BYTES)]);
    }

    #[test]
    fn request_beyond_rate_limit_stays_on_the_ring() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        ChainBuilder::new().desc(DATA_ADDR, 64, true).add_to(&vq, 0);
        ChainBuilder::new()
            .desc(DATA2_ADDR, 64, true)
            .add_to(&vq, 1);
        // Room for the first 64 bytes only; a refill takes far longer than the test.
        let limits = RateLimitConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 64,
                one_time_burst: 0,
                refill_time_ms: 1_000_000,
            }),
            ops: None,
        };
        let (mut w, _, metrics) = worker(&mem, &vq, Box::new(Constant(FILL)), limits);

        w.process_queue().unwrap();

        assert_eq!(
            (
                used_entries(&vq),
                w.queue.next_avail(),
                metrics.snapshot().throttled
            ),
            (vec![(0, 64)], 1, 1)
        );
    }

    #[test]
    fn host_entropy_failure_is_an_error() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        ChainBuilder::new().desc(DATA_ADDR, 16, true).add_to(&vq, 0);
        let (mut w, _, _) = worker(&mem, &vq, Box::new(Broken), Default::default());

        let result = w.process_queue();

        assert!(matches!(result, Err(RngError::Entropy(_))));
    }

    #[test]
    fn host_entropy_fills_a_buffer() {
        let mut buf = [0u8; 64];

        HostEntropy.fill(&mut buf).unwrap();

        // 64 zero bytes from a working pool: probability 2^-512.
        assert_ne!(buf, [0u8; 64]);
    }
}
