//! [`Rng`]: the virtio-rng device's features (only the transport's), its empty
//! configuration space (virtio 1.2 §5.4.4: none), activation and reset. Queue work runs on
//! the device's own thread (`worker.rs`).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::worker::{HostEntropy, RngWorker, WorkerEvents};
use super::{RngMetrics, QUEUE_SIZE};
use crate::rate_limiter::{RateLimitConfig, RateLimiter};
use crate::virtio::{
    run_worker_setup, ActivateError, ActivatedQueue, GuestMemoryMmap, VirtioDevice,
    VirtioInterrupt, WorkerSetup,
};

/// The entropy device as the user describes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RngConfig {
    /// Limits on the bytes and requests the guest takes.
    pub rate_limit: RateLimitConfig,
}

struct WorkerHandle {
    kill: EventFd,
    thread: JoinHandle<()>,
}

/// A virtio-rng device fed by the host's getrandom.
pub struct Rng {
    config: RngConfig,
    avail_features: u64,
    acked_features: u64,
    queue_sizes: [u16; 1],
    metrics: Arc<RngMetrics>,
    worker: Option<WorkerHandle>,
    worker_setup: Option<WorkerSetup>,
}

impl Rng {
    /// A device with `config`'s limits; checks them (the error names the bucket field).
    pub fn new(config: RngConfig) -> Result<Self, crate::rate_limiter::RateLimiterError> {
        config.rate_limit.validate()?;
        Ok(Self {
            config,
            avail_features: (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_RING_F_EVENT_IDX),
            acked_features: 0,
            queue_sizes: [QUEUE_SIZE],
            metrics: Arc::new(RngMetrics::default()),
            worker: None,
            worker_setup: None,
        })
    }

    /// Runs `setup` first in the worker thread (the VMM's seccomp filter).
    pub fn with_worker_setup(mut self, setup: WorkerSetup) -> Self {
        self.worker_setup = Some(setup);
        self
    }

    /// The device's counters, shared with its worker.
    pub fn metrics(&self) -> Arc<RngMetrics> {
        self.metrics.clone()
    }

    /// Stops the worker and waits for it: afterwards no thread touches guest memory.
    fn stop_worker(&mut self) {
        let Some(worker) = self.worker.take() else {
            return;
        };
        if let Err(e) = worker.kill.write(1) {
            tracing::error!(error = %e, "cannot signal the rng worker to stop");
        }
        if worker.thread.join().is_err() {
            tracing::error!("rng worker panicked");
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No configuration space.
        data.fill(0);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        self.stop_worker();
        let got = queues.len();
        let Some(ActivatedQueue {
            index,
            mut queue,
            kick,
        }) = queues.into_iter().next()
        else {
            return Err(ActivateError::QueueCount { got, needed: 1 });
        };
        if index != 0 || !queue.is_valid(&mem) {
            return Err(ActivateError::InvalidQueue(index));
        }
        queue.set_event_idx(self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        let limiter = RateLimiter::new(self.config.rate_limit)
            .map_err(|e| ActivateError::Worker(std::io::Error::other(e)))?;
        let kill = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let events = WorkerEvents {
            kick,
            kill: kill.try_clone().map_err(ActivateError::Worker)?,
        };
        let worker = RngWorker::new(
            mem,
            queue,
            interrupt.clone(),
            Box::new(HostEntropy),
            limiter,
            self.metrics.clone(),
        );
        let setup = self.worker_setup.clone();
        let thread = std::thread::Builder::new()
            .name("rng0".into())
            .spawn(move || {
                if !run_worker_setup(setup.as_ref(), "rng worker") {
                    interrupt.set_needs_reset();
                    return;
                }
                match std::panic::catch_unwind(AssertUnwindSafe(|| worker.run(&events))) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "rng worker stopped; the device needs a reset");
                        interrupt.set_needs_reset();
                    }
                    Err(_) => {
                        tracing::error!("rng worker panicked; the device needs a reset");
                        interrupt.set_needs_reset();
                    }
                }
            })
            .map_err(ActivateError::Worker)?;
        self.worker = Some(WorkerHandle { kill, thread });
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        self.acked_features = 0;
    }
}

impl Drop for Rng {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;

    use super::*;
    use crate::virtio::block::test_utils::{
        guest_memory, used_entries, wait_for, ChainBuilder, RecordingInterrupt, DATA_ADDR,
        QUEUE_SIZE as TEST_QUEUE_SIZE,
    };

    #[test]
    fn device_is_entropy_with_one_queue() {
        let dev = Rng::new(RngConfig::default()).unwrap();

        assert_eq!(
            (dev.device_type(), dev.queue_max_sizes()),
            (4, &[QUEUE_SIZE][..])
        );
    }

    #[test]
    fn rate_limit_with_zero_refill_is_refused() {
        let config = RngConfig {
            rate_limit: RateLimitConfig {
                bandwidth: Some(crate::rate_limiter::TokenBucketConfig {
                    size: 1,
                    one_time_burst: 0,
                    refill_time_ms: 0,
                }),
                ops: None,
            },
        };

        assert!(Rng::new(config).is_err());
    }

    #[test]
    fn activate_without_queue_is_refused() {
        let mut dev = Rng::new(RngConfig::default()).unwrap();

        let err = dev
            .activate(guest_memory(), RecordingInterrupt::new(), Vec::new())
            .unwrap_err();

        assert!(matches!(
            err,
            ActivateError::QueueCount { got: 0, needed: 1 }
        ));
    }

    #[test]
    fn activated_device_fills_a_posted_buffer() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, TEST_QUEUE_SIZE);
        ChainBuilder::new().desc(DATA_ADDR, 32, true).add_to(&vq, 0);
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = Rng::new(RngConfig::default()).unwrap();
        dev.set_acked_features(dev.device_features());

        dev.activate(
            mem.clone(),
            RecordingInterrupt::new(),
            vec![ActivatedQueue {
                index: 0,
                queue: vq.create_queue().unwrap(),
                kick: kick.try_clone().unwrap(),
            }],
        )
        .unwrap();

        assert!(wait_for(|| used_entries(&vq) == vec![(0, 32)]));
        dev.reset();
        let data: [u8; 32] = mem.read_obj(DATA_ADDR).unwrap();
        assert_ne!(data, [0; 32]);
    }
}
