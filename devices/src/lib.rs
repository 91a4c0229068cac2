//! Device models of crib. Each knows guest memory and an interrupt/notification interface,
//! nothing about KVM or the VMM's event loop, so each is testable with plain memory.

pub mod bus;
pub mod legacy;
pub mod pci;
pub mod rate_limiter;
pub mod socket_path;
pub mod vfio;
pub mod virtio;
pub mod vm_exit;

pub use bus::{Bus, BusDevice, BusError};
pub use vm_exit::{ExitReason, VmExit};
