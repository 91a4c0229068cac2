//! Leaving the VM: sync, then power off, then reset as the fallback.
//!
//! `reboot(RB_POWER_OFF)` needs a power-off handler: ACPI S5 (crib's DSDT
//! must have `\_S5`). Without ACPI the kernel turns power-off into halt, which
//! never returns, so cradle resets right away when there is no ACPI at all;
//! crib treats a guest reset as exit too. PID 1 must never return.

use std::path::Path;

use crate::console::{self, say};

/// Present when the kernel found ACPI tables.
const ACPI_SYSFS: &str = "/sys/firmware/acpi";

/// Flushes filesystems and the console, then powers the VM off. Never returns.
pub fn power_off() -> ! {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    console::drain();
    if Path::new(ACPI_SYSFS).exists() {
        // SAFETY: reboot takes a command constant; PID 1 has CAP_SYS_BOOT. On
        // success it does not return.
        unsafe { libc::reboot(libc::RB_POWER_OFF) };
        say!(
            "error: power-off failed: {}; resetting",
            std::io::Error::last_os_error()
        );
        console::drain();
    }
    // SAFETY: as above, with the restart command.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    say!(
        "error: reset failed: {}; halting here",
        std::io::Error::last_os_error()
    );
    loop {
        // SAFETY: pause takes no arguments; it only sleeps until a signal.
        unsafe { libc::pause() };
    }
}
