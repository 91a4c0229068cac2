//! Counters of the net device, shared by its workers (relaxed atomics) and copied out by
//! [`NetMetrics::snapshot`].

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters; clone the `Arc` from [`super::Net::metrics`].
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames written to the tap.
    pub tx_frames: AtomicU64,
    /// Bytes written to the tap, vnet headers excluded.
    pub tx_bytes: AtomicU64,
    /// TX chains dropped as malformed (write-only descriptor, outside guest memory, shorter
    /// than a vnet header, over `MAX_FRAME_BYTES`).
    pub tx_malformed: AtomicU64,
    /// Frames the tap refused (a bad GSO header, the interface gone).
    pub tx_errors: AtomicU64,
    /// Frames put in RX buffers.
    pub rx_frames: AtomicU64,
    /// Bytes put in RX buffers, vnet headers excluded.
    pub rx_bytes: AtomicU64,
    /// Frames read from the tap and dropped (shorter than a header, no RX buffer big
    /// enough without mergeable buffers).
    pub rx_dropped: AtomicU64,
    /// RX chains the device could not use, completed empty.
    pub rx_bad_buffers: AtomicU64,
    /// Times a rate limiter made a frame wait.
    pub rate_limited: AtomicU64,
}

/// A copy of [`NetMetrics`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetMetricsSnapshot {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_malformed: u64,
    pub tx_errors: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub rx_bad_buffers: u64,
    pub rate_limited: u64,
}

impl NetMetrics {
    /// Copies every counter (each read is atomic; the set is not one transaction).
    pub fn snapshot(&self) -> NetMetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetMetricsSnapshot {
            tx_frames: get(&self.tx_frames),
            tx_bytes: get(&self.tx_bytes),
            tx_malformed: get(&self.tx_malformed),
            tx_errors: get(&self.tx_errors),
            rx_frames: get(&self.rx_frames),
            rx_bytes: get(&self.rx_bytes),
            rx_dropped: get(&self.rx_dropped),
            rx_bad_buffers: get(&self.rx_bad_buffers),
            rate_limited: get(&self.rate_limited),
        }
    }
}

/// Adds `n` to `counter`.
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}
