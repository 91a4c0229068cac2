//! The hardware-reduced ACPI sleep control/status and reset registers (ACPI 6.5 §4.8.3.7,
//! §4.8.3.6). Writing SLP_EN with SLP_TYP=5 (S5, per the DSDT's `\_S5_`) powers off;
//! writing the FADT's reset value to the reset register reboots.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::vm_exit::{ExitReason, VmExit};

/// Sleep control register (offset 0 of this device).
pub const ACPI_POWER_PORT_BASE: u16 = 0x600;
/// Sleep control, sleep status, reset.
pub const ACPI_POWER_PORT_LEN: u16 = 3;
/// Port offsets of the three registers.
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
pub const SLEEP_STATUS_OFFSET: u64 = 1;
pub const RESET_OFFSET: u64 = 2;
/// The value written to the reset register to reset (FADT RESET_VALUE).
pub const RESET_VALUE: u8 = 0x1;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
const SLP_TYP_S5: u8 = 5;

/// The ACPI power registers.
pub struct AcpiPower {
    exit: Arc<VmExit>,
}

impl AcpiPower {
    pub fn new(exit: Arc<VmExit>) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiPower {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: WAK_STS clear; nothing else is readable.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else { return };
        match offset {
            SLEEP_CONTROL_OFFSET
                if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == SLP_TYP_S5 =>
            {
                self.exit.request(ExitReason::Poweroff);
            }
            SLEEP_CONTROL_OFFSET => tracing::debug!("ignoring ACPI sleep request {value:#x}"),
            RESET_OFFSET if *value == RESET_VALUE => self.exit.request(ExitReason::Reset),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (AcpiPower, Arc<VmExit>) {
        let exit = Arc::new(VmExit::new().unwrap());
        (AcpiPower::new(exit.clone()), exit)
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (mut dev, exit) = device();
        dev.write(SLEEP_CONTROL_OFFSET, &[(5 << 2) | (1 << 5)]);
        assert_eq!(exit.reason(), Some(ExitReason::Poweroff));
    }

    #[test]
    fn s5_without_slp_en_is_ignored() {
        let (mut dev, exit) = device();
        dev.write(SLEEP_CONTROL_OFFSET, &[5 << 2]);
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn s3_is_ignored() {
        let (mut dev, exit) = device();
        dev.write(SLEEP_CONTROL_OFFSET, &[(3 << 2) | (1 << 5)]);
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn reset_value_resets() {
        let (mut dev, exit) = device();
        dev.write(RESET_OFFSET, &[RESET_VALUE]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn wide_write_is_ignored() {
        let (mut dev, exit) = device();
        dev.write(RESET_OFFSET, &[RESET_VALUE, 0]);
        assert_eq!(exit.reason(), None);
    }
}
