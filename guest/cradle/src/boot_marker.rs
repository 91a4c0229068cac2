//! The boot-marker port: one byte written to an I/O port so the VMM can
//! timestamp guest milestones from its side (Firecracker's boot timer idea).
//!
//! The port and codes must match crib's `devices::legacy::boot_marker`.
//! Each write is a single `outb`, i.e. one VM exit that the VMM handles on
//! the vCPU thread.

use std::io;

use thiserror::Error;

/// I/O port the guest writes markers to. Must match crib's
/// `devices::legacy::boot_marker`.
pub const BOOT_MARKER_PORT: u16 = 0x440;
/// cradle started running as PID 1 (the first thing it does).
pub const MARKER_INIT_STARTED: u8 = 0x01;
/// Filesystems mounted and kernel modules loaded: the guest is ready.
pub const MARKER_READY: u8 = 0x02;

/// Errors of the boot-marker module.
#[derive(Debug, Error)]
pub enum BootMarkerError {
    #[error("cannot get access to I/O port {port:#x} (ioperm)")]
    Ioperm {
        port: u16,
        #[source]
        source: io::Error,
    },
    #[cfg(not(target_arch = "x86_64"))]
    #[error("boot markers are only implemented on x86_64")]
    Unsupported,
}

/// Proof that this process may write to [`BOOT_MARKER_PORT`]: only
/// [`BootMarker::open`] makes one, after `ioperm` succeeded.
#[derive(Debug)]
pub struct BootMarker {
    _private: (),
}

impl BootMarker {
    /// Asks the kernel for access to the marker port (needs CAP_SYS_RAWIO,
    /// which PID 1 has).
    #[cfg(target_arch = "x86_64")]
    pub fn open() -> Result<Self, BootMarkerError> {
        // SAFETY: ioperm only changes this thread's I/O permission bitmap for
        // one port; no memory is passed.
        let rc = unsafe { libc::ioperm(libc::c_ulong::from(BOOT_MARKER_PORT), 1, 1) };
        if rc != 0 {
            return Err(BootMarkerError::Ioperm {
                port: BOOT_MARKER_PORT,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self { _private: () })
    }

    /// Asks the kernel for access to the marker port (not on this arch).
    #[cfg(not(target_arch = "x86_64"))]
    pub fn open() -> Result<Self, BootMarkerError> {
        Err(BootMarkerError::Unsupported)
    }

    /// Writes one marker code to the port.
    #[cfg(target_arch = "x86_64")]
    pub fn write(&self, code: u8) {
        // SAFETY: `self` exists only if ioperm granted this process access to
        // BOOT_MARKER_PORT, so `out` cannot fault; it touches no memory, no
        // stack and no flags. In a crib guest the VMM handles the port; on
        // bare metal nothing decodes it.
        unsafe {
            core::arch::asm!(
                "out dx, al",
                in("dx") BOOT_MARKER_PORT,
                in("al") code,
                options(nomem, nostack, preserves_flags),
            );
        }
    }

    /// Writes one marker code to the port (not on this arch).
    #[cfg(not(target_arch = "x86_64"))]
    pub fn write(&self, _code: u8) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_match_the_vmm_contract() {
        // The VMM side (`devices::legacy::boot_marker`) decodes these values.
        assert_eq!(BOOT_MARKER_PORT, 0x440);
        assert_eq!(MARKER_INIT_STARTED, 0x01);
        assert_eq!(MARKER_READY, 0x02);
    }
}
