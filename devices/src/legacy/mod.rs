//! Legacy port-I/O devices: the 16550 serial console, the i8042 (reset only), the ACPI
//! sleep/reset registers, the ACPI Generic Event Device (power button), pvpanic and crib's
//! boot-marker port.

pub mod acpi_power;
pub mod boot_marker;
pub mod ged;
pub mod i8042;
pub mod pvpanic;
pub mod serial;

pub use acpi_power::AcpiPower;
pub use boot_marker::BootMarker;
pub use ged::{Ged, GedEvents};
pub use i8042::I8042;
pub use pvpanic::PvPanic;
pub use serial::{ConsoleOutput, ConsoleSink, Serial};

use std::sync::Arc;

use crate::vm_exit::{ExitReason, VmExit};

/// A vm-superio trigger that ends the VM with a fixed reason.
pub struct ExitTrigger {
    exit: Arc<VmExit>,
    reason: ExitReason,
}

impl ExitTrigger {
    pub fn new(exit: Arc<VmExit>, reason: ExitReason) -> Self {
        Self { exit, reason }
    }
}

impl vm_superio::Trigger for ExitTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.exit.request(self.reason);
        Ok(())
    }
}
