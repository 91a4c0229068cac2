//! An address-range bus that routes port I/O or MMIO accesses to devices.
//!
//! Hand-written rather than rust-vmm's vm-device: its bus wants its own device traits and
//! shared-reference mutation model; crib's needs are a sorted range map and a mutex per
//! device, which this is, in a few lines with tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the base the device was inserted at.
pub trait BusDevice: Send {
    /// Fill `data` from the register at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handle a write of `data` to the register at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Answers a read of an 8-bit register: `value` in the first byte, zeros above (a wider
/// access to a byte-wide legacy port reads the neighbours as zero).
pub fn read_byte_register(data: &mut [u8], value: u8) {
    data.fill(0);
    if let Some(first) = data.first_mut() {
        *first = value;
    }
}

/// Errors of bus set-up.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
}

struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping ranges, each served by one device.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let overlapping = self
            .ranges
            .range(..end)
            .next_back()
            .filter(|(other, entry)| **other + entry.len > base);
        if let Some((other, _)) = overlapping {
            return Err(BusError::Overlap {
                base,
                len,
                other: *other,
            });
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Entry)> {
        let (base, entry) = self.ranges.range(..=addr).next_back()?;
        (addr - base < entry.len).then_some((*base, entry))
    }

    /// Routes a read; returns false if nothing lives at `addr` (the caller decides what an
    /// unclaimed access reads as).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((base, entry)) = self.find(addr) else {
            return false;
        };
        // A poisoned lock means a device panicked on another vCPU: keep serving; the device
        // state is plain registers, still usable.
        let mut device = entry.device.lock().unwrap_or_else(|e| e.into_inner());
        device.read(addr - base, data);
        true
    }

    /// Routes a write; returns false if nothing lives at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((base, entry)) = self.find(addr) else {
            return false;
        };
        let mut device = entry.device.lock().unwrap_or_else(|e| e.into_inner());
        device.write(addr - base, data);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access and reads back the offset.
    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn bus_with_recorder(base: u64, len: u64) -> (Bus, Arc<Mutex<Recorder>>) {
        let device = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(device.clone(), base, len).unwrap();
        (bus, device)
    }

    #[test]
    fn read_inside_range_gets_offset() {
        let (bus, _) = bus_with_recorder(0x3f8, 8);
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
    }

    #[test]
    fn write_inside_range_reaches_device() {
        let (bus, device) = bus_with_recorder(0x3f8, 8);
        assert!(bus.write(0x3f8, &[0x41]));
        assert_eq!(device.lock().unwrap().last_write, Some((0, vec![0x41])));
    }

    #[test]
    fn access_past_range_is_unclaimed() {
        let (bus, _) = bus_with_recorder(0x3f8, 8);
        assert!(!bus.read(0x400, &mut [0u8; 1]));
        assert!(!bus.write(0x3f7, &[0]));
    }

    #[test]
    fn overlapping_insert_is_refused() {
        let (mut bus, _) = bus_with_recorder(0x3f8, 8);
        let other = Arc::new(Mutex::new(Recorder::default()));
        let err = bus.insert(other, 0x3f0, 9).unwrap_err();
        assert!(matches!(err, BusError::Overlap { other: 0x3f8, .. }));
    }

    #[test]
    fn adjacent_insert_is_accepted() {
        let (mut bus, _) = bus_with_recorder(0x3f8, 8);
        let other = Arc::new(Mutex::new(Recorder::default()));
        assert!(bus.insert(other, 0x3f0, 8).is_ok());
    }

    #[test]
    fn wrapping_range_is_refused() {
        let mut bus = Bus::new();
        let device = Arc::new(Mutex::new(Recorder::default()));
        assert!(matches!(
            bus.insert(device, u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
    }
}
