//! Counters of the vsock device, owned by it (no global registry, so tests stay isolated),
//! bumped by its worker with relaxed atomics and copied out by [`VsockMetrics::snapshot`].

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters; clone the `Arc` from [`super::Vsock::metrics`].
#[derive(Debug, Default)]
pub struct VsockMetrics {
    /// Packets taken from the TX queue (valid or not).
    pub tx_packets: AtomicU64,
    /// Packets put in RX buffers.
    pub rx_packets: AtomicU64,
    /// Guest data bytes written to host sockets.
    pub tx_bytes: AtomicU64,
    /// Host data bytes put in RX buffers.
    pub rx_bytes: AtomicU64,
    /// Malformed or refused guest packets (each answered with RST where possible).
    pub invalid_packets: AtomicU64,
    /// RX chains the device could not use (read-only, too short, outside guest memory).
    pub invalid_rx_buffers: AtomicU64,
    /// Connections that reached the established state.
    pub connections_opened: AtomicU64,
    /// Connections refused: nothing listening at `<socket>_<port>`, or too many connections.
    pub connections_refused: AtomicU64,
    /// RSTs sent to the guest.
    pub resets_sent: AtomicU64,
    /// RSTs dropped because too many were waiting for RX buffers.
    pub resets_dropped: AtomicU64,
}

/// A copy of [`VsockMetrics`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockMetricsSnapshot {
    pub tx_packets: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub invalid_packets: u64,
    pub invalid_rx_buffers: u64,
    pub connections_opened: u64,
    pub connections_refused: u64,
    pub resets_sent: u64,
    pub resets_dropped: u64,
}

impl VsockMetrics {
    /// Copies every counter (each read is atomic; the set is not one transaction).
    pub fn snapshot(&self) -> VsockMetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        VsockMetricsSnapshot {
            tx_packets: get(&self.tx_packets),
            rx_packets: get(&self.rx_packets),
            tx_bytes: get(&self.tx_bytes),
            rx_bytes: get(&self.rx_bytes),
            invalid_packets: get(&self.invalid_packets),
            invalid_rx_buffers: get(&self.invalid_rx_buffers),
            connections_opened: get(&self.connections_opened),
            connections_refused: get(&self.connections_refused),
            resets_sent: get(&self.resets_sent),
            resets_dropped: get(&self.resets_dropped),
        }
    }
}

/// Adds one to `counter`.
pub(crate) fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to `counter`.
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}
