//! Following the guest when it moves a PCI BAR. crib places every BAR in the host bridge's
//! window and Linux normally keeps that placement, but a guest may reassign (`pci=realloc`,
//! a rescan after writing a BAR, another OS): the device must then answer at the new
//! address. This moves the BAR's range on the MMIO bus and runs the BAR's hook, which moves
//! what crib registered with KVM at the old address: a virtio device's doorbell
//! ioeventfds, a passed-through BAR's memory slots.
//!
//! A move that cannot be followed (the new range overlaps another device on the bus) is
//! logged and the BAR stays where crib had it; a later move starts from there.

use std::collections::HashMap;
use std::sync::{Mutex, Weak};

use devices::pci::{BarMove, BarRelocation};
use devices::Bus;

/// What else moves with a BAR: called with the old and new base once the bus range moved.
pub type BarHook = Box<dyn FnMut(u64, u64) -> Result<(), String> + Send>;

struct MovableBar {
    /// Where the BAR's range is on the MMIO bus now.
    base: u64,
    hook: Option<BarHook>,
}

/// The BARs crib placed, by (slot, BAR index).
pub struct BarRelocator {
    mmio: Weak<Bus>,
    bars: Mutex<HashMap<(u8, usize), MovableBar>>,
}

impl BarRelocator {
    /// Moves ranges on `mmio`; weak because the bus holds the PCI bus, which holds this.
    pub fn new(mmio: Weak<Bus>) -> Self {
        Self {
            mmio,
            bars: Mutex::new(HashMap::new()),
        }
    }

    /// BAR `bar` of the function in `slot` sits on the MMIO bus at `base`.
    pub fn register(&self, slot: u8, bar: usize, base: u64, hook: Option<BarHook>) {
        self.bars
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((slot, bar), MovableBar { base, hook });
    }
}

impl BarRelocation for BarRelocator {
    fn move_bar(&self, slot: u8, moved: &BarMove) {
        let what = format!("BAR {} of PCI 00:{slot:02x}.0", moved.bar);
        let mut bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        let Some(bar) = bars.get_mut(&(slot, moved.bar)) else {
            tracing::warn!(
                "guest moved {what} to {:#x}: crib has nothing mapped there to move",
                moved.new
            );
            return;
        };
        let Some(mmio) = self.mmio.upgrade() else {
            return;
        };
        let old = bar.base;
        if old == moved.new {
            return;
        }
        if let Err(e) = mmio.relocate(old, moved.new) {
            tracing::error!(
                "guest moved {what} to {:#x}, which crib cannot follow ({e}): the device still answers at {old:#x}",
                moved.new
            );
            return;
        }
        bar.base = moved.new;
        if let Some(hook) = bar.hook.as_mut() {
            if let Err(e) = hook(old, moved.new) {
                tracing::error!(
                    "{what} now at {:#x} (was {old:#x}) on crib's bus, but {e}: accesses take the slow path through crib",
                    moved.new
                );
                return;
            }
        }
        tracing::info!("guest moved {what} from {old:#x} to {:#x}", moved.new);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use devices::BusDevice;

    use super::*;

    struct Answer(u8);

    impl BusDevice for Answer {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(self.0);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    fn moved(bar: usize, old: u64, new: u64) -> BarMove {
        BarMove {
            bar,
            old,
            new,
            size: 0x1000,
        }
    }

    fn read(bus: &Bus, addr: u64) -> Option<u8> {
        let mut data = [0u8; 1];
        bus.read(addr, &mut data).then_some(data[0])
    }

    #[test]
    fn a_move_moves_the_range_and_runs_the_hook_with_both_bases() {
        let bus = Arc::new(Bus::new());
        bus.insert(Arc::new(Mutex::new(Answer(1))), 0xc000_0000, 0x1000)
            .unwrap();
        let relocator = BarRelocator::new(Arc::downgrade(&bus));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        relocator.register(
            3,
            0,
            0xc000_0000,
            Some(Box::new(move |old, new| {
                seen.lock().unwrap().push((old, new));
                Ok(())
            })),
        );
        relocator.move_bar(3, &moved(0, 0xc000_0000, 0xd000_0000));
        assert_eq!(read(&bus, 0xc000_0000), None);
        assert_eq!(read(&bus, 0xd000_0000), Some(1));
        assert_eq!(*calls.lock().unwrap(), vec![(0xc000_0000, 0xd000_0000)]);
    }

    #[test]
    fn a_refused_move_keeps_the_bar_and_the_next_starts_from_there() {
        let bus = Arc::new(Bus::new());
        bus.insert(Arc::new(Mutex::new(Answer(1))), 0xc000_0000, 0x1000)
            .unwrap();
        bus.insert(Arc::new(Mutex::new(Answer(2))), 0xc001_0000, 0x1000)
            .unwrap();
        let relocator = BarRelocator::new(Arc::downgrade(&bus));
        relocator.register(1, 2, 0xc000_0000, None);
        // Onto the other device: refused, nothing moves.
        relocator.move_bar(1, &moved(2, 0xc000_0000, 0xc001_0000));
        assert_eq!(read(&bus, 0xc000_0000), Some(1));
        assert_eq!(read(&bus, 0xc001_0000), Some(2));
        // The device's own record says 0xc001_0000 now; crib moves from where it is.
        relocator.move_bar(1, &moved(2, 0xc001_0000, 0xc002_0000));
        assert_eq!(read(&bus, 0xc000_0000), None);
        assert_eq!(read(&bus, 0xc002_0000), Some(1));
    }

    #[test]
    fn unknown_bars_and_failing_hooks_are_survived() {
        let bus = Arc::new(Bus::new());
        bus.insert(Arc::new(Mutex::new(Answer(1))), 0xc000_0000, 0x1000)
            .unwrap();
        let relocator = BarRelocator::new(Arc::downgrade(&bus));
        relocator.move_bar(7, &moved(0, 0xc000_0000, 0xd000_0000));
        assert_eq!(read(&bus, 0xc000_0000), Some(1));
        relocator.register(
            1,
            0,
            0xc000_0000,
            Some(Box::new(|_, _| Err("no ioeventfd".into()))),
        );
        relocator.move_bar(1, &moved(0, 0xc000_0000, 0xd000_0000));
        // The bus range moved anyway: the slow path answers there.
        assert_eq!(read(&bus, 0xd000_0000), Some(1));
    }
}
