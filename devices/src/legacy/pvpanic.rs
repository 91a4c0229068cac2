//! pvpanic (QEMU's `docs/specs/pvpanic.txt`): a one-byte I/O port. Reading returns the
//! events the device supports; the guest writes bit 0 when its kernel panics. Linux's
//! `pvpanic-mmio` driver finds it through the DSDT (`_HID` "QEMU0001").

use std::sync::Arc;

use crate::bus::{read_byte_register, BusDevice};
use crate::vm_exit::{ExitReason, VmExit};

/// The port QEMU uses too, so guest configuration carries over.
pub const PVPANIC_PORT: u16 = 0x505;
/// Event bit: the guest panicked.
const PVPANIC_PANICKED: u8 = 1 << 0;
/// Event bit: a crash kernel was loaded (reported, not acted on).
const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// The pvpanic device.
pub struct PvPanic {
    exit: Arc<VmExit>,
}

impl PvPanic {
    pub fn new(exit: Arc<VmExit>) -> Self {
        Self { exit }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        read_byte_register(data, PVPANIC_PANICKED | PVPANIC_CRASH_LOADED);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first().is_some_and(|v| v & PVPANIC_PANICKED != 0) {
            tracing::error!("guest kernel reported a panic through pvpanic");
            self.exit.request(ExitReason::Panic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panicked_bit_requests_panic_exit() {
        let exit = Arc::new(VmExit::new().unwrap());
        PvPanic::new(exit.clone()).write(0, &[PVPANIC_PANICKED]);
        assert_eq!(exit.reason(), Some(ExitReason::Panic));
    }

    #[test]
    fn crash_loaded_alone_does_not_exit() {
        let exit = Arc::new(VmExit::new().unwrap());
        PvPanic::new(exit.clone()).write(0, &[PVPANIC_CRASH_LOADED]);
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn read_reports_supported_events() {
        let exit = Arc::new(VmExit::new().unwrap());
        let mut data = [0u8; 1];
        PvPanic::new(exit).read(0, &mut data);
        assert_eq!(data, [0x3]);
    }
}
