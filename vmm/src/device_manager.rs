//! Builds the VM's devices: the legacy port devices, the PCI bus and its config access
//! (0xCF8 ports and ECAM), and virtio-pci devices with their BAR (see [`BarSpace`]), queue
//! ioeventfds, MSI-X irqfds and routes.

use std::sync::{Arc, Mutex};

use boot::layout::{PCI_ECAM_SIZE, PCI_ECAM_START};
use devices::pci::bus::{PCI_CONFIG_IO_LEN, PCI_CONFIG_IO_PORT};
use devices::pci::{MsixConfig, MsixVectors, PciBus, PciConfigIo, PciConfigMmio, PciError};
use devices::virtio::transport::{VirtioPciDevice, VIRTIO_PCI_BAR_SIZE};
use devices::virtio::VirtioDevice;
use devices::{Bus, BusError};
use kvm_ioctls::{IoEventAddress, NoDatamatch};
use vmm_sys_util::eventfd::EventFd;

use crate::bar_relocation::{BarHook, BarRelocator};
use crate::bar_space::BarSpace;
use crate::interrupts::{GsiRouter, InterruptError};
use crate::vm::Vm;

/// Errors while adding devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("no room left in the PCI MMIO windows for device {name}")]
    BarSpace {
        name: String,
        #[source]
        source: vm_allocator::Error,
    },
    #[error("cannot create an eventfd for device {name}")]
    EventFd {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot register a KVM {what} for device {name}")]
    Kvm {
        name: String,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("no interrupt vectors left for device {name}")]
    Interrupts {
        name: String,
        #[source]
        source: InterruptError,
    },
    #[error("cannot build the virtio-pci transport of device {name}")]
    Transport {
        name: String,
        #[source]
        source: devices::virtio::transport::pci::VirtioPciError,
    },
    #[error("cannot add device {name} to the PCI bus")]
    PciBus {
        name: String,
        #[source]
        source: PciError,
    },
    #[error("cannot place device {name} on the bus")]
    Bus {
        name: String,
        #[source]
        source: BusError,
    },
    #[error("cannot pass through PCI device {bdf}")]
    Vfio {
        bdf: crate::vfio::Bdf,
        #[source]
        source: crate::vfio::VfioError,
    },
}

/// Devices being assembled; [`DeviceManager::finish`] returns the buses.
pub struct DeviceManager {
    pci: PciBus,
    mmio: Arc<Bus>,
    /// Follows the BARs the guest moves.
    relocator: Arc<BarRelocator>,
    bar_space: BarSpace,
    router: Arc<GsiRouter>,
}

impl DeviceManager {
    /// Devices for `vm`; `mmio64` is the 64-bit BAR window the guest was told about.
    pub fn new(vm: &Vm, mmio64: Option<(u64, u64)>) -> Result<Self, DeviceError> {
        let bar_space = BarSpace::new(mmio64).map_err(|source| DeviceError::BarSpace {
            name: "pci".into(),
            source,
        })?;
        let mmio = Arc::new(Bus::new());
        let relocator = Arc::new(BarRelocator::new(Arc::downgrade(&mmio)));
        let mut pci = PciBus::new();
        pci.set_bar_relocation(relocator.clone());
        Ok(Self {
            pci,
            mmio,
            relocator,
            bar_space,
            router: Arc::new(GsiRouter::new(vm.fd().clone())),
        })
    }

    /// Adds `device` as a virtio-pci function named `name` (for messages).
    pub fn add_virtio_pci(
        &mut self,
        vm: &Vm,
        name: &str,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(), DeviceError> {
        let queues = device.queue_max_sizes().len();
        let bar = self
            .bar_space
            .allocate(VIRTIO_PCI_BAR_SIZE, false)
            .map_err(|source| DeviceError::BarSpace {
                name: name.into(),
                source,
            })?;
        let eventfd = || {
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DeviceError::EventFd {
                name: name.into(),
                source,
            })
        };
        let kvm_err = |what| {
            move |source| DeviceError::Kvm {
                name: name.into(),
                what,
                source,
            }
        };

        let mut kicks = Vec::with_capacity(queues);
        let mut doorbells = Vec::with_capacity(queues);
        for queue in 0..queues {
            let kick = eventfd()?;
            let addr = VirtioPciDevice::notify_address(bar, queue as u16);
            vm.fd()
                .register_ioevent(&kick, &IoEventAddress::Mmio(addr.0), NoDatamatch)
                .map_err(kvm_err("ioeventfd"))?;
            doorbells.push(kick.try_clone().map_err(|source| DeviceError::EventFd {
                name: name.into(),
                source,
            })?);
            kicks.push(kick);
        }

        let vectors = VirtioPciDevice::vectors_for(queues);
        let gsis =
            self.router
                .allocate(vectors as u32)
                .map_err(|source| DeviceError::Interrupts {
                    name: name.into(),
                    source,
                })?;
        let mut irqfds = Vec::with_capacity(vectors);
        for gsi in &gsis {
            let irqfd = eventfd()?;
            vm.fd()
                .register_irqfd(&irqfd, *gsi)
                .map_err(kvm_err("irqfd"))?;
            irqfds.push(irqfd);
        }
        let msix = MsixConfig::new(
            Arc::new(MsixVectors::new(irqfds)),
            gsis,
            self.router.clone(),
        );

        let pci_device = VirtioPciDevice::new(device, vm.memory().clone(), bar, msix, kicks)
            .map_err(|source| DeviceError::Transport {
                name: name.into(),
                source,
            })?;
        let pci_device = Arc::new(Mutex::new(pci_device));
        let slot =
            self.pci
                .add_device(pci_device.clone())
                .map_err(|source| DeviceError::PciBus {
                    name: name.into(),
                    source,
                })?;
        self.mmio
            .insert(pci_device, bar, VIRTIO_PCI_BAR_SIZE)
            .map_err(|source| DeviceError::Bus {
                name: name.into(),
                source,
            })?;
        self.relocator.register(
            slot,
            0,
            bar,
            Some(move_doorbells(vm.fd().clone(), doorbells)),
        );
        tracing::debug!("{name}: PCI 00:{slot:02x}.0, BAR0 {bar:#x}, {queues} queues");
        Ok(())
    }

    /// Adds host PCI function `bdf`, passed through with VFIO in `host`'s container.
    pub fn add_vfio(
        &mut self,
        host: &mut crate::vfio::VfioHost,
        bdf: &crate::vfio::Bdf,
    ) -> Result<(), DeviceError> {
        let name = format!("vfio {bdf}");
        let bus_full = |name: &str| DeviceError::PciBus {
            name: name.into(),
            source: PciError::BusFull,
        };
        // The slot decides the INTx line's GSI (the DSDT's _PRT), so it is known first.
        let slot = self.pci.next_slot().ok_or_else(|| bus_full(&name))?;
        let parts = host
            .open(bdf, slot, &mut self.bar_space, &self.router)
            .map_err(|source| DeviceError::Vfio { bdf: *bdf, source })?;
        let added = self
            .pci
            .add_device(parts.pci)
            .map_err(|source| DeviceError::PciBus {
                name: name.clone(),
                source,
            })?;
        debug_assert_eq!(added, slot);
        for trap in parts.traps {
            self.mmio
                .insert(trap.device, trap.addr, trap.size)
                .map_err(|source| DeviceError::Bus {
                    name: name.clone(),
                    source,
                })?;
            self.relocator
                .register(slot, trap.bar, trap.addr, Some(trap.on_move));
        }
        tracing::debug!("{name}: PCI 00:{slot:02x}.0");
        Ok(())
    }

    /// Puts PCI configuration access on the buses and returns the MMIO bus.
    pub fn finish(self, pio: &mut Bus) -> Result<Arc<Bus>, DeviceError> {
        let DeviceManager { pci, mmio, .. } = self;
        let pci = Arc::new(pci);
        let bus_err = |source| DeviceError::Bus {
            name: "pci".into(),
            source,
        };
        pio.insert(
            Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))),
            u64::from(PCI_CONFIG_IO_PORT),
            u64::from(PCI_CONFIG_IO_LEN),
        )
        .map_err(bus_err)?;
        mmio.insert(
            Arc::new(Mutex::new(PciConfigMmio::new(pci))),
            PCI_ECAM_START,
            PCI_ECAM_SIZE,
        )
        .map_err(bus_err)?;
        Ok(mmio)
    }
}

/// Moves a virtio device's doorbell ioeventfds (one per queue, in queue order) with its
/// BAR 0. Should KVM refuse, a doorbell write reaches the device through the bus, which
/// kicks the same eventfd: slower, still correct.
fn move_doorbells(vm: Arc<kvm_ioctls::VmFd>, doorbells: Vec<EventFd>) -> BarHook {
    Box::new(move |old, new| {
        for (queue, kick) in (0u16..).zip(&doorbells) {
            let at = |base| IoEventAddress::Mmio(VirtioPciDevice::notify_address(base, queue).0);
            vm.unregister_ioevent(kick, &at(old), NoDatamatch)
                .map_err(|e| format!("cannot remove queue {queue}'s doorbell ioeventfd: {e}"))?;
            vm.register_ioevent(kick, &at(new), NoDatamatch)
                .map_err(|e| format!("cannot add queue {queue}'s doorbell ioeventfd: {e}"))?;
        }
        Ok(())
    })
}
