//! The entropy device's counters: atomics owned by the device, shared with its worker and
//! read by the VMM's API.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one virtio-rng device.
#[derive(Debug, Default)]
pub struct RngMetrics {
    /// Requests completed.
    pub requests: AtomicU64,
    /// Random bytes written to the guest.
    pub bytes: AtomicU64,
    /// Times a request waited for the rate limiter.
    pub throttled: AtomicU64,
    /// Chains with no usable writable buffer (a driver mistake).
    pub bad_chains: AtomicU64,
}

/// A copy of [`RngMetrics`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RngMetricsSnapshot {
    pub requests: u64,
    pub bytes: u64,
    pub throttled: u64,
    pub bad_chains: u64,
}

impl RngMetrics {
    /// Reads every counter.
    pub fn snapshot(&self) -> RngMetricsSnapshot {
        RngMetricsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
            bad_chains: self.bad_chains.load(Ordering::Relaxed),
        }
    }
}
