//! The entry point of the `fuzz/` targets (feature `fuzzing`): runs the chains a fuzzer
//! left in a queue through the request parser, a queue worker and the synchronous engine,
//! as a kick would, on the calling thread.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::device::{MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS, SIZE_MAX_BYTES};
use super::engine::sync::SyncEngine;
use super::metrics::BlockMetrics;
use super::request::DiskLimits;
use super::worker::{BlockWorker, WorkerParams};
use super::{ID_BYTES, IOV_MAX, SECTOR_SIZE};
use crate::rate_limiter::RateLimitConfig;
use crate::virtio::{GuestMemoryMmap, VirtioInterrupt, VirtioInterruptType};

/// What one run did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FuzzOutcome {
    /// Chains the driver made available.
    pub available: u16,
    /// Used entries the device added.
    pub used: u16,
    /// The worker found the queue broken (it would set DEVICE_NEEDS_RESET).
    pub broken: bool,
}

#[derive(Default)]
struct NoInterrupt {
    needs_reset: AtomicBool,
}

impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _kind: VirtioInterruptType) -> std::io::Result<()> {
        Ok(())
    }

    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::Relaxed);
    }
}

/// Processes `queue` (set up by the caller over `mem`) against `disk` until its available
/// ring is empty. `queue.size()` must be at least 4.
pub fn run_queue(
    mem: &GuestMemoryMmap,
    queue: Queue,
    disk: Arc<File>,
    readonly: bool,
) -> FuzzOutcome {
    let available = queue
        .avail_idx(mem, Ordering::Acquire)
        .map(|idx| idx.0.wrapping_sub(queue.next_avail()))
        .unwrap_or(0);
    let used_before = queue.next_used();
    let size = queue.size();
    let capacity_sectors = disk.metadata().map(|m| m.len() / SECTOR_SIZE).unwrap_or(0);
    let limits = DiskLimits {
        capacity_sectors,
        readonly,
        discard: !readonly,
        write_zeroes: !readonly,
        seg_max: u32::from(size.saturating_sub(2)).min(IOV_MAX as u32),
        size_max: SIZE_MAX_BYTES,
        max_discard_sectors: MAX_DISCARD_SECTORS,
        max_write_zeroes_sectors: MAX_WRITE_ZEROES_SECTORS,
    };
    let mut serial = [0u8; ID_BYTES];
    serial[..4].copy_from_slice(b"fuzz");
    let params = WorkerParams {
        device: 0,
        id: Arc::from("fuzz"),
        queue_index: 0,
        limits,
        serial,
        metrics: Arc::new(BlockMetrics::default()),
        rate_limit: RateLimitConfig::default(),
    };
    let interrupt = Arc::new(NoInterrupt::default());
    let engine = Box::new(SyncEngine::new(disk, mem.clone(), size));
    let Ok(mut worker) = BlockWorker::new(params, queue, mem.clone(), interrupt, engine) else {
        return FuzzOutcome {
            available,
            used: 0,
            broken: true,
        };
    };
    let broken = worker.handle_kick().is_err();
    let used_idx: u16 = worker
        .used_ring()
        .checked_add(2)
        .and_then(|a| mem.read_obj(GuestAddress(a)).ok())
        .unwrap_or(used_before);
    FuzzOutcome {
        available,
        used: used_idx.wrapping_sub(used_before),
        broken,
    }
}
