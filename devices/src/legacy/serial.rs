//! The 16550 UART at COM1 (0x3f8, IRQ 4), from vm-superio, wired to crib's console and to
//! an eventfd that the VMM registers as an irqfd.
//!
//! The console output also watches for the kernel's panic banner: a kernel that panics
//! before its pvpanic driver is loaded (say, no init found) still prints it, and crib then
//! reports a panic rather than the reboot that follows (`panic=-1`).

use std::fs::File;
use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{read_byte_register, BusDevice};
use crate::vm_exit::{ExitReason, VmExit};

/// COM1's base port.
pub const COM1_PORT_BASE: u16 = 0x3f8;
/// Eight registers.
pub const COM1_PORT_LEN: u16 = 8;
/// COM1's ISA IRQ (an IO-APIC pin).
pub const COM1_IRQ: u32 = 4;

/// What Linux prints first when it panics.
const PANIC_BANNER: &[u8] = b"Kernel panic - not syncing";

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

/// The serial's output: the console sink plus the panic-banner watch.
pub struct ConsoleOutput {
    sink: ConsoleSink,
    exit: Arc<VmExit>,
    /// How many bytes of [`PANIC_BANNER`] the recent output matched.
    matched: usize,
}

impl ConsoleOutput {
    pub fn new(sink: ConsoleSink, exit: Arc<VmExit>) -> Self {
        Self {
            sink,
            exit,
            matched: 0,
        }
    }

    fn watch(&mut self, byte: u8) {
        if byte == PANIC_BANNER[self.matched] {
            self.matched += 1;
            if self.matched == PANIC_BANNER.len() {
                self.matched = 0;
                tracing::error!("guest kernel panicked (console)");
                self.exit.request(ExitReason::Panic);
            }
        } else {
            // The banner has no repeated prefix, so restarting the match is exact.
            self.matched = usize::from(byte == PANIC_BANNER[0]);
        }
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            self.watch(b);
        }
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

    fn output(exit: &Arc<VmExit>) -> ConsoleOutput {
        ConsoleOutput::new(ConsoleSink::Off, exit.clone())
    }

    #[test]
    fn panic_banner_requests_panic_exit() {
        let exit = Arc::new(VmExit::new().unwrap());
        let mut out = output(&exit);
        out.write_all(b"[ 1.0] Kernel panic - not syncing: No working init found.")
            .unwrap();
        assert_eq!(exit.reason(), Some(ExitReason::Panic));
    }

    #[test]
    fn banner_split_across_writes_is_seen() {
        let exit = Arc::new(VmExit::new().unwrap());
        let mut out = output(&exit);
        for b in b"KKernel panic - not syncing" {
            out.write_all(&[*b]).unwrap();
        }
        assert_eq!(exit.reason(), Some(ExitReason::Panic));
    }

    #[test]
    fn ordinary_output_is_not_a_panic() {
        let exit = Arc::new(VmExit::new().unwrap());
        let mut out = output(&exit);
        out.write_all(b"Kernel panic test passed; not syncing anything")
            .unwrap();
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn transmitted_byte_raises_interrupt_when_enabled() {
        let exit = Arc::new(VmExit::new().unwrap());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(irq.try_clone().unwrap(), output(&exit));
        serial.write(1, &[0x02]); // IER: THR empty interrupt
        serial.write(0, b"x");
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn input_is_readable_by_guest() {
        let exit = Arc::new(VmExit::new().unwrap());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(irq, output(&exit));
        assert_eq!(serial.enqueue_input(b"ab"), 2);
        let mut data = [0u8; 1];
        serial.read(0, &mut data);
        assert_eq!(data, [b'a']);
    }
}
