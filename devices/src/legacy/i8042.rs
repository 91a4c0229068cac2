//! The i8042 keyboard controller, only as far as Linux's `reboot=k` needs: command 0xFE on
//! port 0x64 resets the machine. vm-superio implements it; this adapts it to the bus.

use std::sync::Arc;

use vm_superio::I8042Device;

use super::ExitTrigger;
use crate::bus::{read_byte_register, BusDevice};
use crate::vm_exit::{ExitReason, VmExit};

/// First port of the controller (data); the command/status port is at +4 (0x64).
pub const I8042_PORT_BASE: u16 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_PORT_LEN: u16 = 5;

/// The i8042 on the bus.
pub struct I8042 {
    inner: I8042Device<ExitTrigger>,
}

impl I8042 {
    /// A controller whose reset command ends the VM with [`ExitReason::Reset`].
    pub fn new(exit: Arc<VmExit>) -> Self {
        Self {
            inner: I8042Device::new(ExitTrigger::new(exit, ExitReason::Reset)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset)
            .map(|o| self.inner.read(o))
            .unwrap_or(0);
        read_byte_register(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [value]) = (u8::try_from(offset), data) {
            // The trigger is infallible.
            let _ = self.inner.write(offset, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_reset() {
        let exit = Arc::new(VmExit::new().unwrap());
        let mut i8042 = I8042::new(exit.clone());
        i8042.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn other_writes_do_nothing() {
        let exit = Arc::new(VmExit::new().unwrap());
        let mut i8042 = I8042::new(exit.clone());
        i8042.write(0, &[0xfe]);
        i8042.write(4, &[0xfe, 0x00]);
        assert_eq!(exit.reason(), None);
    }
}
