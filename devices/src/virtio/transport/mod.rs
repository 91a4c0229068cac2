//! virtio transports. crib uses PCI only (virtio 1.2 §4.1): no 32-device MMIO limit, and
//! MSI-X gives each queue its own interrupt.

pub mod pci;

pub use pci::{
    VirtioPciDevice, VIRTIO_PCI_BAR_SIZE, VIRTIO_PCI_NOTIFY_MULTIPLIER, VIRTIO_PCI_NOTIFY_OFFSET,
};
