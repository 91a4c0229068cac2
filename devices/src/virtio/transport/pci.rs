//! The modern virtio-pci transport (virtio 1.2 §4.1): common, notify, ISR and device
//! configuration structures in BAR 0, MSI-X table and PBA in the same BAR, one vector per
//! queue plus one for configuration changes. Queue notifications are ioeventfds the VMM
//! registers at the notify addresses, so the data path never reaches this code.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::pci::configuration::PciIdentity;
use crate::pci::msix::MSIX_TABLE_ENTRY_BYTES;
use crate::pci::{BarMove, BarRegion, MsixConfig, MsixVectors, PciConfiguration, PciDevice};
use crate::virtio::{
    ActivatedQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
};

/// Size of BAR 0, which holds every structure below.
pub const VIRTIO_PCI_BAR_SIZE: u64 = 0x1_0000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_SIZE: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const ISR_SIZE: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_SIZE: u64 = 0x1000;
/// Where queue notifications land: queue q at `VIRTIO_PCI_NOTIFY_OFFSET + q * multiplier`.
pub const VIRTIO_PCI_NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_SIZE: u64 = 0x1000;
/// Bytes between two queues' notify addresses.
pub const VIRTIO_PCI_NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x8000;
const MSIX_PBA_OFFSET: u64 = 0x9000;
/// At most this many vectors fit the table area.
const MAX_VECTORS: usize = 0x1000 / MSIX_TABLE_ENTRY_BYTES as usize;
/// "No vector" (virtio 1.2 §4.1.5.1.2).
const NO_VECTOR: u16 = 0xffff;
const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
const PCI_CAP_ID_VENDOR: u8 = 0x09;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const ISR_QUEUE: u8 = 0x1;
const ISR_CONFIG: u8 = 0x2;
/// virtio device type of block devices; used for the PCI class.
const TYPE_BLOCK: u32 = 2;
const TYPE_NET: u32 = 1;

/// Interrupt state shared between the transport (vCPU threads) and the device's workers.
struct PciInterrupt {
    msix: Arc<MsixVectors>,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    isr: AtomicU8,
    needs_reset: AtomicBool,
}

impl VirtioInterrupt for PciInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()> {
        let (vector, isr) = match kind {
            VirtioInterruptType::Config => (self.config_vector.load(Ordering::Acquire), ISR_CONFIG),
            VirtioInterruptType::Queue(q) => match self.queue_vectors.get(usize::from(q)) {
                Some(v) => (v.load(Ordering::Acquire), ISR_QUEUE),
                None => return Ok(()),
            },
        };
        self.isr.fetch_or(isr, Ordering::AcqRel);
        if vector == NO_VECTOR {
            // crib offers no INTx: a driver without MSI-X polls or sees nothing.
            return Ok(());
        }
        self.msix.trigger(vector)
    }

    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::Release);
        if let Err(e) = self.trigger(VirtioInterruptType::Config) {
            tracing::warn!("cannot signal a device reset request: {e}");
        }
    }

    fn notifier(&self, kind: VirtioInterruptType) -> Option<EventFd> {
        let vector = match kind {
            VirtioInterruptType::Config => self.config_vector.load(Ordering::Acquire),
            VirtioInterruptType::Queue(q) => self
                .queue_vectors
                .get(usize::from(q))?
                .load(Ordering::Acquire),
        };
        if vector == NO_VECTOR {
            return None;
        }
        // The irqfd bypasses the ISR and MSI-X masking; fine for a driver using MSI-X,
        // which is the only kind crib serves (no INTx).
        self.msix.irqfd(vector)
    }
}

/// What the driver programmed for one queue.
#[derive(Clone, Copy, Debug, Default)]
struct QueueRegs {
    size: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// A virtio device on PCI.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    device: Box<dyn VirtioDevice>,
    msix: MsixConfig,
    msix_cap_reg: usize,
    interrupt: Arc<PciInterrupt>,
    queues: Vec<QueueRegs>,
    max_sizes: Vec<u16>,
    kicks: Vec<EventFd>,
    mem: GuestMemoryMmap,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    status: u8,
    config_generation: u8,
    activated: bool,
}

/// Errors building the transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("the device has {queues} queues; at most {max} fit the MSI-X table")]
    TooManyQueues { queues: usize, max: usize },
    #[error("expected {expected} MSI-X vectors, got {got}")]
    VectorCount { expected: usize, got: usize },
    #[error("expected {expected} queue notification eventfds, got {got}")]
    KickCount { expected: usize, got: usize },
    #[error("invalid PCI configuration")]
    Configuration(#[from] crate::pci::configuration::ConfigurationError),
}

impl VirtioPciDevice {
    /// Number of MSI-X vectors a device with `queues` queues uses.
    pub fn vectors_for(queues: usize) -> usize {
        queues + 1
    }

    /// Wraps `device` with its BAR 0 at `bar_addr`. `msix` must have
    /// [`Self::vectors_for`] vectors and `kicks` one eventfd per queue (the VMM registered
    /// them as ioeventfds at the notify addresses).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        bar_addr: u64,
        msix: MsixConfig,
        kicks: Vec<EventFd>,
    ) -> Result<Self, VirtioPciError> {
        let max_sizes = device.queue_max_sizes().to_vec();
        let queue_count = max_sizes.len();
        let vectors = Self::vectors_for(queue_count);
        if vectors > MAX_VECTORS {
            return Err(VirtioPciError::TooManyQueues {
                queues: queue_count,
                max: MAX_VECTORS - 1,
            });
        }
        if msix.vectors().len() != vectors {
            return Err(VirtioPciError::VectorCount {
                expected: vectors,
                got: msix.vectors().len(),
            });
        }
        if kicks.len() != queue_count {
            return Err(VirtioPciError::KickCount {
                expected: queue_count,
                got: kicks.len(),
            });
        }
        let device_type = device.device_type();
        let (class_code, subclass) = match device_type {
            TYPE_BLOCK => (0x01, 0x80),
            TYPE_NET => (0x02, 0x00),
            _ => (0xff, 0x00),
        };
        let mut config = PciConfiguration::new(PciIdentity {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE + device_type as u16,
            class_code,
            subclass,
            prog_if: 0,
            revision: 1,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: 0x40,
        });
        config.add_bar(BarRegion {
            index: 0,
            addr: bar_addr,
            size: VIRTIO_PCI_BAR_SIZE,
            is_64bit: true,
            prefetchable: false,
        })?;
        for (kind, offset, len) in [
            (CAP_COMMON, COMMON_OFFSET, COMMON_SIZE),
            (CAP_ISR, ISR_OFFSET, ISR_SIZE),
            (CAP_DEVICE, DEVICE_OFFSET, DEVICE_SIZE),
        ] {
            config.add_capability(&virtio_cap(kind, offset, len, None), None)?;
        }
        config.add_capability(
            &virtio_cap(
                CAP_NOTIFY,
                VIRTIO_PCI_NOTIFY_OFFSET,
                NOTIFY_SIZE,
                Some(VIRTIO_PCI_NOTIFY_MULTIPLIER),
            ),
            None,
        )?;
        let (msix_body, msix_writable) =
            msix.capability(0, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32);
        let msix_cap = config.add_capability(&msix_body, Some(&msix_writable))?;
        let interrupt = Arc::new(PciInterrupt {
            msix: msix.vectors(),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..queue_count)
                .map(|_| AtomicU16::new(NO_VECTOR))
                .collect(),
            isr: AtomicU8::new(0),
            needs_reset: AtomicBool::new(false),
        });
        Ok(Self {
            config,
            device,
            msix,
            msix_cap_reg: msix_cap / 4,
            interrupt,
            queues: initial_queue_regs(&max_sizes),
            max_sizes,
            kicks,
            mem,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// Where BAR 0 is now.
    pub fn bar_addr(&self) -> Option<u64> {
        self.config.bars().next().map(|b| b.addr)
    }

    fn device_features(&self) -> u64 {
        self.device.device_features() | 1 << VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let q = usize::from(self.queue_select);
        let queue = self.queues.get(q).copied();
        let value: u64 = match (offset, data.len()) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => match self.device_feature_select {
                0 => self.device_features() & 0xffff_ffff,
                1 => self.device_features() >> 32,
                _ => 0,
            },
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0c, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (0x10, 2) => u64::from(self.interrupt.config_vector.load(Ordering::Acquire)),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => {
                let needs_reset = self.interrupt.needs_reset.load(Ordering::Acquire);
                u64::from(
                    self.status
                        | if needs_reset {
                            VIRTIO_CONFIG_S_NEEDS_RESET as u8
                        } else {
                            0
                        },
                )
            }
            (0x15, 1) => u64::from(self.config_generation),
            (0x16, 2) => u64::from(self.queue_select),
            (0x18, 2) => u64::from(queue.map_or(0, |q| q.size)),
            (0x1a, 2) => u64::from(
                self.interrupt
                    .queue_vectors
                    .get(q)
                    .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire)),
            ),
            (0x1c, 2) => u64::from(queue.is_some_and(|q| q.enabled)),
            (0x1e, 2) => u64::from(self.queue_select),
            (0x20, 4) | (0x20, 8) => queue.map_or(0, |q| q.desc),
            (0x24, 4) => queue.map_or(0, |q| q.desc >> 32),
            (0x28, 4) | (0x28, 8) => queue.map_or(0, |q| q.driver),
            (0x2c, 4) => queue.map_or(0, |q| q.driver >> 32),
            (0x30, 4) | (0x30, 8) => queue.map_or(0, |q| q.device),
            (0x34, 4) => queue.map_or(0, |q| q.device >> 32),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let len = data.len().min(8);
        data[..len].copy_from_slice(&bytes[..len]);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        let len = data.len().min(8);
        bytes[..len].copy_from_slice(&data[..len]);
        let value = u64::from_le_bytes(bytes);
        let set_low = |old: u64| (old & !0xffff_ffff) | (value & 0xffff_ffff);
        let set_high = |old: u64| (old & 0xffff_ffff) | (value << 32);
        // Queue registers may only change before the driver enables the queue.
        let writable_queue = |q: &QueueRegs| !q.enabled;
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = value as u32,
            (0x08, 4) => self.driver_feature_select = value as u32,
            (0x0c, 4) => {
                if self.status & VIRTIO_CONFIG_S_FEATURES_OK as u8 == 0 {
                    match self.driver_feature_select {
                        0 => self.driver_features = set_low(self.driver_features),
                        1 => self.driver_features = set_high(self.driver_features),
                        _ => {}
                    }
                }
            }
            (0x10, 2) => self
                .interrupt
                .config_vector
                .store(self.checked_vector(value as u16), Ordering::Release),
            (0x14, 1) => self.write_status(value as u8),
            (0x16, 2) => self.queue_select = value as u16,
            (0x18, 2) => {
                let max = self
                    .max_sizes
                    .get(usize::from(self.queue_select))
                    .copied()
                    .unwrap_or(0);
                if let Some(q) = self.selected_queue().filter(|q| writable_queue(q)) {
                    // Keep the driver's value; validity (power of two, <= max) is checked
                    // when the device starts, so a bad size fails that queue, not the VMM.
                    q.size = (value as u16).min(max.max(1).next_power_of_two());
                }
            }
            (0x1a, 2) => {
                let vector = self.checked_vector(value as u16);
                if let Some(v) = self
                    .interrupt
                    .queue_vectors
                    .get(usize::from(self.queue_select))
                {
                    v.store(vector, Ordering::Release);
                }
            }
            (0x1c, 2) => {
                if let Some(q) = self.selected_queue() {
                    // virtio 1.2 §4.1.4.3.2: the driver MUST NOT write 0 to queue_enable.
                    if value == 1 {
                        q.enabled = true;
                    }
                }
            }
            (0x20, 4) | (0x20, 8) => {
                self.update_queue(|q| q.desc = if len == 8 { value } else { set_low(q.desc) })
            }
            (0x24, 4) => self.update_queue(|q| q.desc = set_high(q.desc)),
            (0x28, 4) | (0x28, 8) => {
                self.update_queue(|q| q.driver = if len == 8 { value } else { set_low(q.driver) })
            }
            (0x2c, 4) => self.update_queue(|q| q.driver = set_high(q.driver)),
            (0x30, 4) | (0x30, 8) => {
                self.update_queue(|q| q.device = if len == 8 { value } else { set_low(q.device) })
            }
            (0x34, 4) => self.update_queue(|q| q.device = set_high(q.device)),
            _ => tracing::debug!(
                "virtio-pci: ignoring common config write at {offset:#x} ({len} bytes)"
            ),
        }
    }

    fn update_queue(&mut self, update: impl FnOnce(&mut QueueRegs)) {
        if let Some(q) = self.selected_queue().filter(|q| !q.enabled) {
            update(q);
        }
    }

    /// A vector the device has, or NO_VECTOR (which tells the driver the assignment failed).
    fn checked_vector(&self, vector: u16) -> u16 {
        if usize::from(vector) < self.msix.vectors().len() {
            vector
        } else {
            NO_VECTOR
        }
    }

    fn write_status(&mut self, status: u8) {
        if status == 0 {
            self.reset();
            return;
        }
        let mut status = status;
        let newly = status & !self.status;
        if newly & VIRTIO_CONFIG_S_FEATURES_OK as u8 != 0 {
            let offered = self.device_features();
            if self.driver_features & !offered != 0
                || self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0
            {
                // virtio 1.2 §3.1.1: the device refuses by leaving FEATURES_OK clear.
                tracing::warn!(
                    "virtio-pci: driver accepted features {:#x} not offered or without VERSION_1",
                    self.driver_features
                );
                status &= !(VIRTIO_CONFIG_S_FEATURES_OK as u8);
            } else {
                self.device.set_acked_features(self.driver_features);
            }
        }
        self.status = status;
        let ready = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK;
        if !self.activated
            && u32::from(status) & ready == ready
            && status & VIRTIO_CONFIG_S_FAILED as u8 == 0
        {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::new();
        for (index, regs) in self.queues.iter().enumerate() {
            if !regs.enabled {
                continue;
            }
            let Some(queue) = self.build_queue(index, regs, event_idx) else {
                tracing::error!("virtio-pci: queue {index} is invalid; device needs reset");
                self.interrupt.set_needs_reset();
                return;
            };
            let kick = match self.kicks[index].try_clone() {
                Ok(kick) => kick,
                Err(e) => {
                    tracing::error!(
                        "virtio-pci: cannot clone the kick eventfd of queue {index}: {e}"
                    );
                    self.interrupt.set_needs_reset();
                    return;
                }
            };
            queues.push(ActivatedQueue {
                index: index as u16,
                queue,
                kick,
            });
        }
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        match self.device.activate(self.mem.clone(), interrupt, queues) {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::error!("virtio-pci: device activation failed: {e}");
                self.interrupt.set_needs_reset();
            }
        }
    }

    fn build_queue(&self, index: usize, regs: &QueueRegs, event_idx: bool) -> Option<Queue> {
        let max = *self.max_sizes.get(index)?;
        let mut queue = Queue::new(max).ok()?;
        queue.set_size(regs.size);
        queue.set_desc_table_address(Some(regs.desc as u32), Some((regs.desc >> 32) as u32));
        queue.set_avail_ring_address(Some(regs.driver as u32), Some((regs.driver >> 32) as u32));
        queue.set_used_ring_address(Some(regs.device as u32), Some((regs.device >> 32) as u32));
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        queue.is_valid(&self.mem).then_some(queue)
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.queues = initial_queue_regs(&self.max_sizes);
        self.interrupt
            .config_vector
            .store(NO_VECTOR, Ordering::Release);
        self.interrupt
            .queue_vectors
            .iter()
            .for_each(|v| v.store(NO_VECTOR, Ordering::Release));
        self.interrupt.isr.store(0, Ordering::Release);
        self.interrupt.needs_reset.store(false, Ordering::Release);
        self.config_generation = self.config_generation.wrapping_add(1);
    }

    /// Guest-physical address of queue `queue`'s notification register, given BAR 0 at
    /// `bar_addr`.
    pub fn notify_address(bar_addr: u64, queue: u16) -> GuestAddress {
        GuestAddress(
            bar_addr
                + VIRTIO_PCI_NOTIFY_OFFSET
                + u64::from(queue) * u64::from(VIRTIO_PCI_NOTIFY_MULTIPLIER),
        )
    }
}

/// Queue registers after reset: `queue_size` reads as the maximum (virtio 1.2 §4.1.4.3.2:
/// the device presents its maximum, the driver may lower it).
fn initial_queue_regs(max_sizes: &[u16]) -> Vec<QueueRegs> {
    max_sizes
        .iter()
        .map(|&size| QueueRegs {
            size,
            ..Default::default()
        })
        .collect()
}

/// A `virtio_pci_cap` (virtio 1.2 §4.1.4), with `notify_off_multiplier` for the notify cap.
fn virtio_cap(kind: u8, offset: u64, len: u64, multiplier: Option<u32>) -> Vec<u8> {
    let cap_len: u8 = if multiplier.is_some() { 20 } else { 16 };
    let mut cap = vec![PCI_CAP_ID_VENDOR, 0, cap_len, kind, 0, 0, 0, 0];
    cap.extend_from_slice(&(offset as u32).to_le_bytes());
    cap.extend_from_slice(&(len as u32).to_le_bytes());
    if let Some(m) = multiplier {
        cap.extend_from_slice(&m.to_le_bytes());
    }
    cap
}

impl PciDevice for VirtioPciDevice {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove> {
        let moved = self.config.write_reg(reg, offset, data);
        if reg == self.msix_cap_reg {
            let control = (self.config.read_reg(reg) >> 16) as u16;
            self.msix.set_message_control(control);
        }
        moved
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.read_common(o - COMMON_OFFSET, data),
            o if (ISR_OFFSET..ISR_OFFSET + ISR_SIZE).contains(&o) => {
                // Reading the ISR clears it (virtio 1.2 §4.1.4.5).
                if let Some(first) = data.first_mut() {
                    *first = self.interrupt.isr.swap(0, Ordering::AcqRel);
                }
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                self.device.read_config(o - DEVICE_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix.read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..VIRTIO_PCI_BAR_SIZE).contains(&o) => {
                self.msix.read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => {}
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.write_common(o - COMMON_OFFSET, data),
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                self.device.write_config(o - DEVICE_OFFSET, data)
            }
            o if (VIRTIO_PCI_NOTIFY_OFFSET..VIRTIO_PCI_NOTIFY_OFFSET + NOTIFY_SIZE)
                .contains(&o) =>
            {
                // Normally caught by the ioeventfd; a write that reaches here (no ioeventfd
                // support, or an odd width) is forwarded to the queue's eventfd.
                let queue =
                    (o - VIRTIO_PCI_NOTIFY_OFFSET) / u64::from(VIRTIO_PCI_NOTIFY_MULTIPLIER);
                if let Some(kick) = usize::try_from(queue).ok().and_then(|q| self.kicks.get(q)) {
                    let _ = kick.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix.write_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }
}

/// BAR 0 on the MMIO bus: the VMM inserts the same device there and on the PCI bus.
impl crate::bus::BusDevice for VirtioPciDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.read_bar(0, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.write_bar(0, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vm_memory::GuestAddress;

    use super::*;
    use crate::pci::MsiRouting;

    /// Records what the transport asked of it.
    #[derive(Default)]
    struct FakeState {
        acked: u64,
        activated_queues: Vec<u16>,
        resets: usize,
    }

    struct FakeDevice {
        state: Arc<Mutex<FakeState>>,
        sizes: Vec<u16>,
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            TYPE_BLOCK
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn device_features(&self) -> u64 {
            1 << 4
        }
        fn set_acked_features(&mut self, features: u64) {
            self.state.lock().unwrap().acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            _interrupt: Arc<dyn VirtioInterrupt>,
            queues: Vec<ActivatedQueue>,
        ) -> Result<(), crate::virtio::ActivateError> {
            self.state.lock().unwrap().activated_queues = queues.iter().map(|q| q.index).collect();
            Ok(())
        }
        fn reset(&mut self) {
            self.state.lock().unwrap().resets += 1;
        }
    }

    struct NoRouting;

    impl MsiRouting for NoRouting {
        fn set_msi_route(&self, _gsi: u32, _addr: u64, _data: u32) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn transport() -> (VirtioPciDevice, Arc<Mutex<FakeState>>) {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let device = FakeDevice {
            state: state.clone(),
            sizes: vec![64, 64],
        };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irqfds = (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let msix = MsixConfig::new(
            Arc::new(MsixVectors::new(irqfds)),
            vec![24, 25, 26],
            Arc::new(NoRouting),
        );
        let kicks = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        (
            VirtioPciDevice::new(Box::new(device), mem, 0xc000_0000, msix, kicks).unwrap(),
            state,
        )
    }

    fn read16(dev: &mut VirtioPciDevice, offset: u64) -> u16 {
        let mut data = [0u8; 2];
        dev.read_bar(0, offset, &mut data);
        u16::from_le_bytes(data)
    }

    fn write(dev: &mut VirtioPciDevice, offset: u64, data: &[u8]) {
        dev.write_bar(0, offset, data);
    }

    /// Programs queue `q` with valid rings in guest memory and enables it.
    fn setup_queue(dev: &mut VirtioPciDevice, q: u16) {
        let base = 0x1_0000 * (u64::from(q) + 1);
        write(dev, 0x16, &q.to_le_bytes());
        write(dev, 0x20, &base.to_le_bytes());
        write(dev, 0x28, &(base + 0x1000).to_le_bytes());
        write(dev, 0x30, &(base + 0x2000).to_le_bytes());
        write(dev, 0x1c, &1u16.to_le_bytes());
    }

    fn negotiate(dev: &mut VirtioPciDevice, features_hi: u32) {
        write(
            dev,
            0x14,
            &[(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER) as u8],
        );
        write(dev, 0x08, &1u32.to_le_bytes());
        write(dev, 0x0c, &features_hi.to_le_bytes());
        let status =
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        write(dev, 0x14, &[status as u8]);
    }

    fn driver_ok(dev: &mut VirtioPciDevice) {
        let ok = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK;
        write(dev, 0x14, &[ok as u8]);
    }

    #[test]
    fn queue_size_reads_maximum_after_reset() {
        let (mut dev, _) = transport();
        write(&mut dev, 0x14, &[0]);
        write(&mut dev, 0x16, &1u16.to_le_bytes());
        assert_eq!(read16(&mut dev, 0x18), 64);
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let (mut dev, state) = transport();
        negotiate(&mut dev, 0);
        let mut status = [0u8];
        dev.read_bar(0, 0x14, &mut status);
        assert_eq!(status[0] & VIRTIO_CONFIG_S_FEATURES_OK as u8, 0);
        assert_eq!(state.lock().unwrap().acked, 0);
    }

    #[test]
    fn driver_ok_activates_enabled_queues_only() {
        let (mut dev, state) = transport();
        setup_queue(&mut dev, 1);
        negotiate(&mut dev, 1 << (VIRTIO_F_VERSION_1 - 32));
        driver_ok(&mut dev);
        let state = state.lock().unwrap();
        assert_eq!(state.activated_queues, vec![1]);
        assert_eq!(state.acked, 1 << VIRTIO_F_VERSION_1);
    }

    #[test]
    fn status_zero_resets_an_active_device() {
        let (mut dev, state) = transport();
        setup_queue(&mut dev, 0);
        negotiate(&mut dev, 1 << (VIRTIO_F_VERSION_1 - 32));
        driver_ok(&mut dev);
        write(&mut dev, 0x14, &[0]);
        assert_eq!(state.lock().unwrap().resets, 1);
        assert_eq!(read16(&mut dev, 0x1c), 0, "queue disabled after reset");
    }

    #[test]
    fn queue_with_rings_outside_memory_needs_reset() {
        let (mut dev, state) = transport();
        write(&mut dev, 0x16, &0u16.to_le_bytes());
        write(&mut dev, 0x20, &0xffff_0000u64.to_le_bytes());
        write(&mut dev, 0x1c, &1u16.to_le_bytes());
        negotiate(&mut dev, 1 << (VIRTIO_F_VERSION_1 - 32));
        driver_ok(&mut dev);
        let mut status = [0u8];
        dev.read_bar(0, 0x14, &mut status);
        assert_ne!(status[0] & VIRTIO_CONFIG_S_NEEDS_RESET as u8, 0);
        assert!(state.lock().unwrap().activated_queues.is_empty());
    }

    #[test]
    fn out_of_range_msix_vector_reads_back_no_vector() {
        let (mut dev, _) = transport();
        write(&mut dev, 0x10, &200u16.to_le_bytes());
        assert_eq!(read16(&mut dev, 0x10), NO_VECTOR);
    }

    #[test]
    fn device_config_reads_reach_the_device() {
        let (mut dev, _) = transport();
        let mut data = [0u8; 1];
        dev.read_bar(0, DEVICE_OFFSET + 5, &mut data);
        assert_eq!(data, [5]);
    }
}
