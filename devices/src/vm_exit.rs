//! How a device or a vCPU asks the VMM to end the VM: the first reason wins, an eventfd wakes the
//! VMM thread.

use std::sync::atomic::{AtomicU8, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// Why the guest ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitReason {
    /// ACPI S5 (poweroff).
    Poweroff = 1,
    /// A reset through the i8042 or the ACPI reset register (reboot).
    Reset = 2,
    /// The guest kernel reported a panic (pvpanic or its console).
    Panic = 3,
    /// KVM reported a shutdown exit: the guest triple-faulted.
    TripleFault = 4,
    /// KVM could not run the vCPU (internal error, failed entry, unhandled exit).
    VcpuError = 5,
    /// A device's host side failed in a way the guest cannot recover from (logged).
    DeviceFailed = 6,
}

impl ExitReason {
    fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Poweroff),
            2 => Some(Self::Reset),
            3 => Some(Self::Panic),
            4 => Some(Self::TripleFault),
            5 => Some(Self::VcpuError),
            6 => Some(Self::DeviceFailed),
            _ => None,
        }
    }
}

/// Shared between devices (which request) and the VMM (which waits).
#[derive(Debug)]
pub struct VmExit {
    reason: AtomicU8,
    event: EventFd,
}

impl VmExit {
    /// A new, unsignalled exit.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: AtomicU8::new(0),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one was recorded before, and wakes the VMM.
    /// A panicking kernel reports the panic before it resets, so first-wins keeps the panic.
    pub fn request(&self, reason: ExitReason) {
        let _ = self
            .reason
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |current| {
                (current == 0).then_some(reason as u8)
            });
        if let Err(e) = self.event.write(1) {
            tracing::error!("cannot signal the VM exit event: {e}");
        }
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        ExitReason::from_u8(self.reason.load(Ordering::SeqCst))
    }

    /// The eventfd that becomes readable on the first request.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let exit = VmExit::new().unwrap();
        exit.request(ExitReason::Panic);
        exit.request(ExitReason::Reset);
        assert_eq!(exit.reason(), Some(ExitReason::Panic));
    }

    #[test]
    fn request_signals_event() {
        let exit = VmExit::new().unwrap();
        exit.request(ExitReason::Poweroff);
        assert_eq!(exit.event().read().unwrap(), 1);
    }

    #[test]
    fn no_request_no_reason() {
        assert_eq!(VmExit::new().unwrap().reason(), None);
    }
}
