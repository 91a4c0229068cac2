//! An address-range bus that routes port I/O or MMIO accesses to devices.
//!
//! Hand-written rather than rust-vmm's vm-device: its bus wants its own device traits and
//! shared-reference mutation model; crib's needs are a sorted range map and a mutex per
//! device, which this is, in a few lines with tests.
//!
//! The map sits behind a read-write lock because a guest may move a PCI BAR while vCPUs
//! run: accesses take the read lock only to find the device, and call it after releasing
//! it, so a device whose write moves a range (a BAR register) can take the write lock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

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
    #[error("no device at bus address {base:#x}")]
    NotFound { base: u64 },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping ranges, each served by one device.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

/// `[base, base + len)` if it is not empty and does not wrap.
fn range_end(base: u64, len: u64) -> Result<u64, BusError> {
    base.checked_add(len)
        .filter(|_| len > 0)
        .ok_or(BusError::InvalidRange { base, len })
}

/// The entry of `ranges` that overlaps `[base, end)`, if any.
fn overlapping(ranges: &BTreeMap<u64, Entry>, base: u64, end: u64) -> Option<u64> {
    ranges
        .range(..end)
        .next_back()
        .filter(|(other, entry)| **other + entry.len > base)
        .map(|(other, _)| *other)
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(
        &self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = range_end(base, len)?;
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        if let Some(other) = overlapping(&ranges, base, end) {
            return Err(BusError::Overlap { base, len, other });
        }
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Moves the device at `old_base` to `new_base`, keeping its length; on an error (no
    /// device there, the new range overlapping another device or wrapping) nothing moves.
    pub fn relocate(&self, old_base: u64, new_base: u64) -> Result<(), BusError> {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        let entry = ranges
            .remove(&old_base)
            .ok_or(BusError::NotFound { base: old_base })?;
        let len = entry.len;
        let checked =
            range_end(new_base, len).and_then(|end| match overlapping(&ranges, new_base, end) {
                Some(other) => Err(BusError::Overlap {
                    base: new_base,
                    len,
                    other,
                }),
                None => Ok(()),
            });
        match checked {
            Ok(()) => {
                ranges.insert(new_base, entry);
                Ok(())
            }
            Err(e) => {
                ranges.insert(old_base, entry);
                Err(e)
            }
        }
    }

    /// The device serving `addr` and the base it is inserted at; the lock is released
    /// before the caller touches the device.
    fn find(&self, addr: u64) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (base, entry) = ranges.range(..=addr).next_back()?;
        (addr - base < entry.len).then(|| (*base, entry.device.clone()))
    }

    /// Routes a read; returns false if nothing lives at `addr` (the caller decides what an
    /// unclaimed access reads as).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((base, device)) = self.find(addr) else {
            return false;
        };
        // A poisoned lock means a device panicked on another vCPU: keep serving; the device
        // state is plain registers, still usable.
        let mut device = device.lock().unwrap_or_else(|e| e.into_inner());
        device.read(addr - base, data);
        true
    }

    /// Routes a write; returns false if nothing lives at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((base, device)) = self.find(addr) else {
            return false;
        };
        let mut device = device.lock().unwrap_or_else(|e| e.into_inner());
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
        let bus = Bus::new();
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
        let (bus, _) = bus_with_recorder(0x3f8, 8);
        let other = Arc::new(Mutex::new(Recorder::default()));
        let err = bus.insert(other, 0x3f0, 9).unwrap_err();
        assert!(matches!(err, BusError::Overlap { other: 0x3f8, .. }));
    }

    #[test]
    fn adjacent_insert_is_accepted() {
        let (bus, _) = bus_with_recorder(0x3f8, 8);
        let other = Arc::new(Mutex::new(Recorder::default()));
        assert!(bus.insert(other, 0x3f0, 8).is_ok());
    }

    #[test]
    fn wrapping_range_is_refused() {
        let bus = Bus::new();
        let device = Arc::new(Mutex::new(Recorder::default()));
        assert!(matches!(
            bus.insert(device, u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
    }

    #[test]
    fn relocated_device_answers_at_its_new_base_only() {
        let (bus, device) = bus_with_recorder(0x1000, 0x100);
        bus.relocate(0x1000, 0x8000).unwrap();
        assert!(!bus.write(0x1010, &[1]));
        assert!(bus.write(0x8010, &[2]));
        assert_eq!(device.lock().unwrap().last_write, Some((0x10, vec![2])));
    }

    #[test]
    fn relocation_onto_another_device_leaves_both_in_place() {
        let (bus, first) = bus_with_recorder(0x1000, 0x100);
        let second = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(second.clone(), 0x2000, 0x100).unwrap();
        let err = bus.relocate(0x1000, 0x1f80).unwrap_err();
        assert!(matches!(err, BusError::Overlap { other: 0x2000, .. }));
        assert!(bus.write(0x1000, &[1]));
        assert_eq!(first.lock().unwrap().last_write, Some((0, vec![1])));
        assert!(bus.write(0x2000, &[2]));
        assert_eq!(second.lock().unwrap().last_write, Some((0, vec![2])));
    }

    #[test]
    fn relocation_of_nothing_or_past_the_end_is_refused() {
        let (bus, _) = bus_with_recorder(0x1000, 0x100);
        assert!(matches!(
            bus.relocate(0x5000, 0x6000),
            Err(BusError::NotFound { base: 0x5000 })
        ));
        assert!(matches!(
            bus.relocate(0x1000, u64::MAX - 0x10),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(bus.read(0x1000, &mut [0u8; 1]));
    }

    /// A device whose write moves itself (a BAR register): the bus lock is free by then.
    #[test]
    fn a_device_may_move_itself_from_its_own_write() {
        struct SelfMover {
            bus: std::sync::Weak<Bus>,
        }
        impl BusDevice for SelfMover {
            fn read(&mut self, _offset: u64, data: &mut [u8]) {
                data.fill(7);
            }
            fn write(&mut self, _offset: u64, _data: &[u8]) {
                if let Some(bus) = self.bus.upgrade() {
                    bus.relocate(0x1000, 0x9000).unwrap();
                }
            }
        }
        let bus = Arc::new(Bus::new());
        let device = Arc::new(Mutex::new(SelfMover {
            bus: Arc::downgrade(&bus),
        }));
        bus.insert(device, 0x1000, 0x10).unwrap();
        assert!(bus.write(0x1000, &[0]));
        let mut data = [0u8; 1];
        assert!(bus.read(0x9000, &mut data));
        assert_eq!(data, [7]);
    }
}
