//! An ACPI Generic Event Device (GED, `_HID` ACPI0013; ACPI 6.5 §5.6.9): how a
//! hardware-reduced platform, which has no SCI and no fixed power button, delivers events.
//!
//! The DSDT (boot/src/acpi.rs) gives the GED one interrupt, [`GED_IRQ`], and an `_EVT`
//! method. Linux's acpi-ged driver (drivers/acpi/evged.c) requests that interrupt and, on
//! each one, runs `_EVT`; the method reads this device's one-byte event register at
//! [`GED_PORT`] and, when [`GED_EVENT_POWER_BUTTON`] is set, does
//! `Notify (\_SB.PWRB, 0x80)` on the power button device (PNP0C0C). Linux's button driver
//! turns that into a KEY_POWER input event, which systemd-logind (or acpid) acts on.
//!
//! Reading the register returns the pending events and clears them; writes are ignored.
//! The VMM presses the button through [`GedEvents`] from any thread: set the bit, then
//! raise the interrupt (an irqfd on the IO-APIC pin, a pulse: the pin is edge-triggered).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::{read_byte_register, BusDevice};

/// The event register's I/O port (after the ACPI sleep/reset registers at 0x600..0x603).
pub const GED_PORT: u16 = 0x604;
/// The IO-APIC pin of the GED interrupt: free (COM1 is 4; PCI devices use MSI-X only).
pub const GED_IRQ: u32 = 5;
/// Event bit: the power button was pressed.
pub const GED_EVENT_POWER_BUTTON: u8 = 1 << 0;

/// The pending events and the interrupt, shared by the device and whoever raises events.
pub struct GedEvents {
    pending: AtomicU8,
    irq: EventFd,
}

impl GedEvents {
    /// `irq` is the eventfd registered as an irqfd for [`GED_IRQ`].
    pub fn new(irq: EventFd) -> Self {
        Self {
            pending: AtomicU8::new(0),
            irq,
        }
    }

    /// Latches `events` and interrupts the guest.
    pub fn raise(&self, events: u8) -> std::io::Result<()> {
        self.pending.fetch_or(events, Ordering::SeqCst);
        self.irq.write(1)
    }

    /// Presses the ACPI power button.
    pub fn press_power_button(&self) -> std::io::Result<()> {
        self.raise(GED_EVENT_POWER_BUTTON)
    }

    /// The pending events, cleared.
    fn take(&self) -> u8 {
        self.pending.swap(0, Ordering::SeqCst)
    }
}

/// The GED's event register on the port-I/O bus.
pub struct Ged {
    events: Arc<GedEvents>,
}

impl Ged {
    pub fn new(events: Arc<GedEvents>) -> Self {
        Self { events }
    }
}

impl BusDevice for Ged {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Only the byte access the DSDT's field uses consumes events.
        if data.len() == 1 {
            read_byte_register(data, self.events.take());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (Ged, Arc<GedEvents>) {
        let events = Arc::new(GedEvents::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        (Ged::new(events.clone()), events)
    }

    fn read(dev: &mut Ged) -> u8 {
        let mut data = [0xffu8; 1];
        dev.read(0, &mut data);
        data[0]
    }

    #[test]
    fn no_event_reads_zero() {
        let (mut dev, _) = device();
        assert_eq!(read(&mut dev), 0);
    }

    #[test]
    fn power_button_sets_the_bit_and_raises_the_interrupt() {
        let (mut dev, events) = device();
        events.press_power_button().unwrap();
        assert_eq!(events.irq.read().unwrap(), 1);
        assert_eq!(read(&mut dev), GED_EVENT_POWER_BUTTON);
    }

    #[test]
    fn reading_clears_the_events() {
        let (mut dev, events) = device();
        events.press_power_button().unwrap();
        read(&mut dev);
        assert_eq!(read(&mut dev), 0);
    }

    #[test]
    fn presses_before_a_read_latch_once() {
        let (mut dev, events) = device();
        events.press_power_button().unwrap();
        events.press_power_button().unwrap();
        assert_eq!(events.irq.read().unwrap(), 2);
        assert_eq!(read(&mut dev), GED_EVENT_POWER_BUTTON);
        assert_eq!(read(&mut dev), 0);
    }

    #[test]
    fn writes_and_wide_reads_do_not_consume_events() {
        let (mut dev, events) = device();
        events.press_power_button().unwrap();
        dev.write(0, &[0]);
        let mut wide = [0xffu8; 2];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0, 0]);
        assert_eq!(read(&mut dev), GED_EVENT_POWER_BUTTON);
    }
}
