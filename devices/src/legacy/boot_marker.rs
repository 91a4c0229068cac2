//! crib's boot-time marker (Firecracker's boot-timer idea): the guest init writes a code
//! to I/O port 0x440 and crib timestamps it against its own process start, so boot time is
//! measured from the VMM's side. Codes must match cradle's `boot_marker` module.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::bus::BusDevice;

/// The marker port.
pub const BOOT_MARKER_PORT: u16 = 0x440;
/// cradle started (first instruction of /init).
pub const MARKER_INIT_STARTED: u8 = 0x01;
/// cradle loaded its modules and mounted its filesystems.
pub const MARKER_READY: u8 = 0x02;

/// Microseconds since VMM start at which each marker arrived; 0 until it does.
#[derive(Debug, Default)]
pub struct BootTimes {
    pub init_started_us: AtomicU64,
    pub ready_us: AtomicU64,
}

/// The marker port.
pub struct BootMarker {
    start: Instant,
    times: Arc<BootTimes>,
}

impl BootMarker {
    /// Timestamps relative to `start` (the VMM's process start).
    pub fn new(start: Instant, times: Arc<BootTimes>) -> Self {
        Self { start, times }
    }

    fn record(&self, slot: &AtomicU64, what: &str) {
        let elapsed = self.start.elapsed();
        let us = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        // Only the first marker of a kind counts (a guest may reboot into cradle again).
        if slot
            .compare_exchange(0, us, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            tracing::info!("guest boot to {what}: {} ms", elapsed.as_millis());
        }
    }
}

impl BusDevice for BootMarker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        match data.first() {
            Some(&MARKER_INIT_STARTED) => self.record(&self.times.init_started_us, "init"),
            Some(&MARKER_READY) => self.record(&self.times.ready_us, "ready"),
            Some(other) => tracing::debug!("unknown boot marker {other:#x}"),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_marker_records_time_once() {
        let times = Arc::new(BootTimes::default());
        let mut marker = BootMarker::new(Instant::now(), times.clone());
        marker.write(0, &[MARKER_INIT_STARTED]);
        let first = times.init_started_us.load(Ordering::SeqCst);
        marker.write(0, &[MARKER_INIT_STARTED]);
        assert!(first > 0);
        assert_eq!(times.init_started_us.load(Ordering::SeqCst), first);
        assert_eq!(times.ready_us.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn unknown_marker_records_nothing() {
        let times = Arc::new(BootTimes::default());
        BootMarker::new(Instant::now(), times.clone()).write(0, &[0x7f]);
        assert_eq!(times.init_started_us.load(Ordering::SeqCst), 0);
    }
}
