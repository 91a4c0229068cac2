//! Counters of one block device, shared by its queue workers and read by the VMM.
//!
//! Owned by the device (no global registry, so tests stay isolated); each worker bumps
//! them with relaxed atomics, and [`BlockMetrics::snapshot`] copies them out.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters; clone the `Arc` from [`super::Block::metrics`].
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Read requests completed (any status).
    pub reads: AtomicU64,
    /// Write requests completed (any status).
    pub writes: AtomicU64,
    /// Flush requests completed (any status).
    pub flushes: AtomicU64,
    /// Discard requests completed (any status).
    pub discards: AtomicU64,
    /// Write-zeroes requests completed (any status).
    pub write_zeroes: AtomicU64,
    /// GET_ID requests completed (any status).
    pub get_ids: AtomicU64,
    /// Bytes read into guest memory by successful reads.
    pub bytes_read: AtomicU64,
    /// Bytes written to the disk by successful writes.
    pub bytes_written: AtomicU64,
    /// Host I/O failures (EIO, ENOSPC, ...) reported to the guest as IOERR.
    pub io_errors: AtomicU64,
    /// Malformed or unsupported requests from the guest.
    pub invalid_requests: AtomicU64,
    /// Times a request was held back by the rate limiter.
    pub rate_limited: AtomicU64,
    /// Requests completed with `VIRTIO_BLK_S_OK`.
    pub status_ok: AtomicU64,
    /// Requests completed with `VIRTIO_BLK_S_IOERR`.
    pub status_ioerr: AtomicU64,
    /// Requests completed with `VIRTIO_BLK_S_UNSUPP`.
    pub status_unsupp: AtomicU64,
    /// Chains returned without a status byte (no writable status descriptor).
    pub status_unwritten: AtomicU64,
    /// Queues started with the io_uring engine.
    pub io_uring_queues: AtomicU64,
    /// Queues started with the synchronous engine (chosen, or io_uring unavailable).
    pub sync_queues: AtomicU64,
}

/// A copy of [`BlockMetrics`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockMetricsSnapshot {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub get_ids: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub io_errors: u64,
    pub invalid_requests: u64,
    pub rate_limited: u64,
    pub status_ok: u64,
    pub status_ioerr: u64,
    pub status_unsupp: u64,
    pub status_unwritten: u64,
    pub io_uring_queues: u64,
    pub sync_queues: u64,
}

impl BlockMetrics {
    /// Copies every counter (each read is atomic; the set is not one transaction).
    pub fn snapshot(&self) -> BlockMetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockMetricsSnapshot {
            reads: get(&self.reads),
            writes: get(&self.writes),
            flushes: get(&self.flushes),
            discards: get(&self.discards),
            write_zeroes: get(&self.write_zeroes),
            get_ids: get(&self.get_ids),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            io_errors: get(&self.io_errors),
            invalid_requests: get(&self.invalid_requests),
            rate_limited: get(&self.rate_limited),
            status_ok: get(&self.status_ok),
            status_ioerr: get(&self.status_ioerr),
            status_unsupp: get(&self.status_unsupp),
            status_unwritten: get(&self.status_unwritten),
            io_uring_queues: get(&self.io_uring_queues),
            sync_queues: get(&self.sync_queues),
        }
    }
}

/// Adds `n` to a counter.
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Adds one to a counter.
pub(crate) fn inc(counter: &AtomicU64) {
    add(counter, 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_copies_counters() {
        let metrics = BlockMetrics::default();
        inc(&metrics.reads);
        add(&metrics.bytes_read, 4096);
        let snap = metrics.snapshot();
        assert_eq!((snap.reads, snap.bytes_read), (1, 4096));
    }
}
