//! The 16550 UART at COM1 (0x3f8, IRQ 4), from vm-superio, wired to crib's console and to
//! an eventfd that the VMM registers as an irqfd.
//!
//! What the guest prints is data: a pod process's output reaches this console too, so no
//! text on it may change crib's state or exit code. A guest kernel panic is reported only
//! by the pvpanic device (the kernel's own panic notifier); a kernel that panics before
//! its pvpanic driver is bound ends as the reboot that `panic=-1` makes.

use std::fs::File;
use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{read_byte_register, BusDevice};

/// COM1's base port.
pub const COM1_PORT_BASE: u16 = 0x3f8;
/// Eight registers.
pub const COM1_PORT_LEN: u16 = 8;
/// COM1's ISA IRQ (an IO-APIC pin).
pub const COM1_IRQ: u32 = 4;

/// Raises the serial interrupt by writing an eventfd (an irqfd in the VMM).
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's console goes.
pub enum ConsoleSink {
    Stdout,
    File(File),
    Off,
}

/// The serial's output: where the console goes.
pub struct ConsoleOutput {
    sink: ConsoleSink,
}

impl ConsoleOutput {
    pub fn new(sink: ConsoleSink) -> Self {
        Self { sink }
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.sink {
            ConsoleSink::Stdout => io::stdout().write(buf),
            ConsoleSink::File(file) => file.write(buf),
            ConsoleSink::Off => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.sink {
            ConsoleSink::Stdout => io::stdout().flush(),
            ConsoleSink::File(file) => file.flush(),
            ConsoleSink::Off => Ok(()),
        }
    }
}

/// The UART on the bus.
pub struct Serial {
    inner: vm_superio::Serial<EventFdTrigger, NoEvents, ConsoleOutput>,
}

impl Serial {
    pub fn new(irq: EventFd, out: ConsoleOutput) -> Self {
        Self {
            inner: vm_superio::Serial::new(EventFdTrigger::new(irq), out),
        }
    }

    /// Queues host input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.inner.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        match self.inner.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }

    /// Free space in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.inner.fifo_capacity()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset)
            .map(|o| self.inner.read(o))
            .unwrap_or(0);
        read_byte_register(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), [value]) = (u8::try_from(offset), data) else {
            return;
        };
        if let Err(e) = self.inner.write(offset, *value) {
            // A console that cannot be written (closed stdout, full disk) must not stop the VM.
            tracing::debug!("serial write failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output() -> ConsoleOutput {
        ConsoleOutput::new(ConsoleSink::Off)
    }

    #[test]
    fn panic_text_from_the_guest_is_only_data() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(irq, output());

        for &b in b"[ 1.0] Kernel panic - not syncing: forged by a pod process\n" {
            serial.write(0, &[b]);
        }

        // Nothing to assert on an exit: the console has no way to request one.
        assert_eq!(serial.input_room(), serial.inner.fifo_capacity());
    }

    #[test]
    fn transmitted_byte_raises_interrupt_when_enabled() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(irq.try_clone().unwrap(), output());
        serial.write(1, &[0x02]); // IER: THR empty interrupt
        serial.write(0, b"x");
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn input_is_readable_by_guest() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(irq, output());
        assert_eq!(serial.enqueue_input(b"ab"), 2);
        let mut data = [0u8; 1];
        serial.read(0, &mut data);
        assert_eq!(data, [b'a']);
    }
}
