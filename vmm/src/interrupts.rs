//! KVM interrupt routing: the IO-APIC pins every VM has, plus one MSI route per MSI-X
//! vector, installed with KVM_SET_GSI_ROUTING (which replaces the whole table, so the
//! table is kept here).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::pci::MsiRouting;
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

/// IO-APIC pins (GSIs 0..24) KVM's in-kernel IO-APIC has.
pub const IOAPIC_PINS: u32 = 24;

/// The routing table and the next free GSI for MSI vectors.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    msi_routes: Mutex<BTreeMap<u32, kvm_irq_routing_entry>>,
    next_gsi: Mutex<u32>,
}

/// Errors of interrupt routing.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("out of GSIs for MSI-X vectors")]
    NoGsi,
}

impl GsiRouter {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            msi_routes: Mutex::new(BTreeMap::new()),
            next_gsi: Mutex::new(IOAPIC_PINS),
        }
    }

    /// Reserves `count` consecutive GSIs for MSI vectors.
    pub fn allocate(&self, count: u32) -> Result<Vec<u32>, InterruptError> {
        let mut next = self.next_gsi.lock().unwrap_or_else(|e| e.into_inner());
        let first = *next;
        // KVM's default maximum number of routes is 4096.
        let end = first
            .checked_add(count)
            .filter(|end| *end <= 4096)
            .ok_or(InterruptError::NoGsi)?;
        *next = end;
        Ok((first..end).collect())
    }

    fn ioapic_route(pin: u32) -> kvm_irq_routing_entry {
        let mut entry = kvm_irq_routing_entry {
            gsi: pin,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        entry.u.irqchip.irqchip = KVM_IRQCHIP_IOAPIC;
        entry.u.irqchip.pin = pin;
        entry
    }

    fn install(&self, msi_routes: &BTreeMap<u32, kvm_irq_routing_entry>) -> std::io::Result<()> {
        let entries: Vec<kvm_irq_routing_entry> = (0..IOAPIC_PINS)
            .map(Self::ioapic_route)
            .chain(msi_routes.values().copied())
            .collect();
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| std::io::Error::other("too many interrupt routes"))?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

impl MsiRouting for GsiRouter {
    fn set_msi_route(&self, gsi: u32, addr: u64, data: u32) -> std::io::Result<()> {
        let mut entry = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        entry.u.msi.address_lo = addr as u32;
        entry.u.msi.address_hi = (addr >> 32) as u32;
        entry.u.msi.data = data;
        let mut routes = self.msi_routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.insert(gsi, entry);
        self.install(&routes)
    }
}
