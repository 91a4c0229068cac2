//! The KVM VM: in-kernel irqchip (LAPICs, IO-APIC, PIC) and PIT, guest RAM registered as
//! memory slots, irqfds for legacy interrupts.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use std::sync::Arc;

use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

/// KVM's TSS needs three pages of guest-physical space no RAM uses (Intel only, harmless
/// elsewhere): just below the IO-APIC, inside the MMIO hole.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors while creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: is KVM available and may this user open it (group kvm)?")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("this host's KVM lacks {0}, which crib needs")]
    MissingCapability(&'static str),
    #[error("cannot create the KVM VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("cannot set up the VM's {what}")]
    Setup {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot register guest RAM slot {slot} at {addr:#x} with KVM")]
    MemorySlot {
        slot: u32,
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The VM and what it needs to keep alive.
pub struct Vm {
    // Field order matters: the VM fd must close before the RAM it maps is unmapped. Other
    // holders of the fd (interrupt routing) live no longer than the VM's threads, which
    // the process ends together with this.
    fd: Arc<VmFd>,
    kvm: Kvm,
    memory: GuestMemory,
}

impl Vm {
    /// Opens KVM, creates the VM with its irqchip and PIT and registers `memory`.
    pub fn new(memory: GuestMemory) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for (cap, name) in [
            (Cap::Irqchip, "the in-kernel irqchip"),
            (Cap::Irqfd, "irqfd"),
            (Cap::Ioeventfd, "ioeventfd"),
            (Cap::UserMemory, "user memory slots"),
            (Cap::Pit2, "the in-kernel PIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCapability(name));
            }
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let setup = |what| move |source| VmError::Setup { what, source };
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(setup("TSS address"))?;
        fd.create_irq_chip().map_err(setup("irqchip"))?;
        // The dummy speaker makes port 0x61 an in-kernel access instead of an exit.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(setup("PIT"))?;
        let vm = Self {
            fd: Arc::new(fd),
            kvm,
            memory,
        };
        vm.register_memory()?;
        Ok(vm)
    }

    fn register_memory(&self) -> Result<(), VmError> {
        for (slot, region) in self.memory.iter().enumerate() {
            let slot = u32::try_from(slot)
                .map_err(|_| VmError::MissingCapability("enough memory slots"))?;
            let region_desc = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes owned by
            // `self.memory`, which outlives `self.fd` (field order), so KVM never sees a
            // dangling host address.
            unsafe { self.fd.set_user_memory_region(region_desc) }.map_err(|source| {
                VmError::MemorySlot {
                    slot,
                    addr: region.start_addr().0,
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// Routes writes to `evt` to the IO-APIC pin `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Setup {
                what: "irqfd",
                source,
            })
    }

    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }
}
