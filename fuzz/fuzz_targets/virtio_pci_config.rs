//! Fuzzes the virtio-pci transport (`devices::virtio::transport::pci::VirtioPciDevice`): its
//! PCI configuration space (BAR 0, the virtio capabilities, MSI-X message control) and BAR 0's
//! regions (common configuration, ISR, device configuration, notifications, the MSI-X table
//! and PBA), by random sequences of (offset, size, value) reads and writes, interleaved with
//! a driver's usual initialization steps and with the device raising its interrupts.
//!
//! The virtio device behind the transport is a recording fake. Invariants: no access panics;
//! the device is activated only after ACKNOWLEDGE, DRIVER, FEATURES_OK and DRIVER_OK, at most
//! once until a reset, with valid queues (in guest memory, a power-of-two size up to the
//! maximum, each index once); the features it is given were offered and include VERSION_1;
//! `num_queues` reads the device's count; a vector read back is one the device has or
//! NO_VECTOR; an MSI-X irqfd fires only while MSI-X is enabled, the function unmasked and the
//! vector unmasked; MSI routes name only the device's GSIs.

#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use devices::pci::{MsiRouting, MsixConfig, MsixVectors, PciDevice};
use devices::virtio::transport::pci::VirtioPciDevice;
use devices::virtio::{
    ActivateError, ActivatedQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt,
    VirtioInterruptType,
};
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_queue::QueueT;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest memory: 1 MiB.
const MEM_BYTES: usize = 0x10_0000;
const BAR_ADDR: u64 = 0xc000_0000;
/// The fake device's queues and their maximum sizes.
const MAX_SIZES: &[u16] = &[256, 64, 1];
/// Features the fake device offers (besides VERSION_1, which the transport adds).
const DEVICE_FEATURES: u64 = 1 << 4 | 1 << 29 | 1 << 28;
const GSI_BASE: u32 = 24;
const NO_VECTOR: u16 = 0xffff;
const MSIX_TABLE: u64 = 0x8000;
const MSIX_PBA: u64 = 0x9000;
const NOTIFY: u64 = 0x3000;

#[derive(Default)]
struct State {
    /// The status the driver last wrote (tracked by the target).
    status: u8,
    active: bool,
    acked: Option<u64>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
}

struct FakeDevice {
    state: Arc<Mutex<State>>,
    mem: GuestMemoryMmap,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        // Something other than block and net, so the transport's generic class is used.
        0x1a
    }

    fn queue_max_sizes(&self) -> &[u16] {
        MAX_SIZES
    }

    fn device_features(&self) -> u64 {
        DEVICE_FEATURES
    }

    fn set_acked_features(&mut self, features: u64) {
        let offered = DEVICE_FEATURES | 1 << VIRTIO_F_VERSION_1;
        assert_eq!(features & !offered, 0, "acked features never offered");
        assert_ne!(
            features & 1 << VIRTIO_F_VERSION_1,
            0,
            "acked without VERSION_1"
        );
        self.state.lock().unwrap().acked = Some(features);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        let mut state = self.state.lock().unwrap();
        assert!(!state.active, "activated twice without a reset");
        let ready = (VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK) as u8;
        assert_eq!(state.status & ready, ready, "activated before DRIVER_OK");
        assert!(state.acked.is_some(), "activated without features");
        let mut seen = Vec::new();
        for q in &queues {
            let max = MAX_SIZES[usize::from(q.index)];
            let size = q.queue.size();
            assert!(size.is_power_of_two() && size <= max, "queue size {size}");
            assert!(q.queue.is_valid(&self.mem), "an invalid queue activated");
            assert!(!seen.contains(&q.index), "queue {} twice", q.index);
            seen.push(q.index);
        }
        state.active = true;
        state.interrupt = Some(interrupt);
        Ok(())
    }

    fn reset(&mut self) {
        let mut state = self.state.lock().unwrap();
        assert!(state.active, "reset without activation");
        state.active = false;
        state.interrupt = None;
    }
}

struct Routes;

impl MsiRouting for Routes {
    fn set_msi_route(&self, gsi: u32, _addr: u64, _data: u32) -> std::io::Result<()> {
        let vectors = VirtioPciDevice::vectors_for(MAX_SIZES.len()) as u32;
        assert!((GSI_BASE..GSI_BASE + vectors).contains(&gsi), "GSI {gsi}");
        Ok(())
    }
}

/// Where an access goes.
#[derive(Arbitrary, Debug)]
enum Target {
    /// Common configuration, offset within its 0x38 bytes (past it sometimes).
    Common(u8),
    Isr,
    DeviceConfig(u8),
    /// Queue `n`'s doorbell.
    Notify(u8),
    /// MSI-X table entry `n`, word `w`.
    MsixTable(u8, u8),
    Pba(u8),
    /// Anywhere in BAR 0, or another BAR.
    Bar(u8, u16),
    /// Configuration register `reg` (dword index), byte `offset`.
    Config(u8, u8),
}

#[derive(Arbitrary, Debug)]
enum Step {
    Read(Target, u8),
    Write(Target, u8, u64),
    /// What a driver does: reset, ACKNOWLEDGE|DRIVER, accept `features`, FEATURES_OK,
    /// program and enable queue `queue` at slot `slot` of guest memory, DRIVER_OK.
    Init {
        features_hi: u32,
        features_lo: u32,
        queues: u8,
        size_shift: u8,
        slot: u8,
    },
    /// MSI-X enable/function mask (message control's top bits).
    MsixControl(bool, bool),
    /// Program vector `n`: address, data, masked.
    Vector(u8, bool),
    /// The device raises queue `q`'s interrupt (or the config interrupt).
    Raise(Option<u8>),
}

fn size(s: u8) -> usize {
    [1, 2, 4, 8][usize::from(s % 4)]
}

struct Rig {
    dev: VirtioPciDevice,
    state: Arc<Mutex<State>>,
    irqfds: Vec<EventFd>,
    msix_reg: usize,
}

impl Rig {
    fn offset(&self, target: &Target) -> (Option<usize>, u64) {
        match *target {
            Target::Common(o) => (Some(0), u64::from(o % 0x40)),
            Target::Isr => (Some(0), 0x1000),
            Target::DeviceConfig(o) => (Some(0), 0x2000 + u64::from(o)),
            Target::Notify(q) => (Some(0), NOTIFY + 4 * u64::from(q % 8)),
            Target::MsixTable(n, w) => (
                Some(0),
                MSIX_TABLE + 16 * u64::from(n % 8) + 4 * u64::from(w % 4),
            ),
            Target::Pba(o) => (Some(0), MSIX_PBA + u64::from(o % 16)),
            Target::Bar(bar, o) => (Some(usize::from(bar % 8)), u64::from(o)),
            Target::Config(reg, o) => (None, u64::from(reg) << 8 | u64::from(o % 4)),
        }
    }

    fn read(&mut self, target: &Target, len: usize) -> u64 {
        let mut data = [0u8; 8];
        match self.offset(target) {
            (Some(bar), offset) => self.dev.read_bar(bar, offset, &mut data[..len]),
            (None, v) => {
                let value = self.dev.read_config_register((v >> 8) as usize);
                data[..4].copy_from_slice(&value.to_le_bytes());
            }
        }
        u64::from_le_bytes(data)
    }

    fn write(&mut self, target: &Target, len: usize, value: u64) {
        let bytes = value.to_le_bytes();
        match self.offset(target) {
            (Some(bar), offset) => {
                if bar == 0 && offset == 0x14 && len == 1 {
                    let mut state = self.state.lock().unwrap();
                    state.status = bytes[0];
                    if bytes[0] == 0 {
                        state.acked = None;
                    }
                }
                self.dev.write_bar(bar, offset, &bytes[..len]);
            }
            (None, v) => {
                let (reg, offset) = ((v >> 8) as usize, v & 3);
                let len = len.min(4 - offset as usize);
                let _ = self.dev.write_config_register(reg, offset, &bytes[..len]);
            }
        }
    }

    fn common(&mut self, offset: u8, len: usize, value: u64) {
        self.write(&Target::Common(offset), len, value);
    }

    /// Asserts that every irqfd that fired belongs to a deliverable vector.
    fn check_irqfds(&mut self) {
        let control = {
            let value = self.dev.read_config_register(self.msix_reg);
            (value >> 16) as u16
        };
        let enabled = control & 1 << 15 != 0;
        let function_masked = control & 1 << 14 != 0;
        for (index, fd) in self.irqfds.iter().enumerate() {
            if fd.read().is_ok() {
                let mut word = [0u8; 4];
                self.dev
                    .read_bar(0, MSIX_TABLE + 16 * index as u64 + 12, &mut word);
                let masked = u32::from_le_bytes(word) & 1 != 0;
                assert!(
                    enabled && !function_masked && !masked,
                    "vector {index} fired: enabled {enabled}, function masked \
                     {function_masked}, masked {masked}"
                );
            }
        }
    }
}

/// Finds the MSI-X capability's register by walking the capability list.
fn msix_register(dev: &mut VirtioPciDevice) -> usize {
    let mut ptr = (dev.read_config_register(0x34 / 4) & 0xff) as usize;
    for _ in 0..48 {
        let header = dev.read_config_register(ptr / 4);
        if header & 0xff == 0x11 {
            return ptr / 4;
        }
        ptr = ((header >> 8) & 0xfc) as usize;
    }
    panic!("no MSI-X capability");
}

fuzz_target!(|steps: Vec<Step>| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).expect("memory");
    let state = Arc::new(Mutex::new(State::default()));
    let vectors = VirtioPciDevice::vectors_for(MAX_SIZES.len());
    let irqfds: Vec<EventFd> = (0..vectors)
        .map(|_| EventFd::new(EFD_NONBLOCK).expect("eventfd"))
        .collect();
    let msix = MsixConfig::new(
        Arc::new(MsixVectors::new(
            irqfds
                .iter()
                .map(|fd| fd.try_clone().expect("eventfd"))
                .collect(),
        )),
        (GSI_BASE..GSI_BASE + vectors as u32).collect(),
        Arc::new(Routes),
    );
    let kicks = MAX_SIZES
        .iter()
        .map(|_| EventFd::new(EFD_NONBLOCK).expect("eventfd"))
        .collect();
    let device = FakeDevice {
        state: state.clone(),
        mem: mem.clone(),
    };
    let mut dev = VirtioPciDevice::new(Box::new(device), mem, BAR_ADDR, msix, kicks)
        .expect("a valid transport");
    let msix_reg = msix_register(&mut dev);
    let mut rig = Rig {
        dev,
        state,
        irqfds,
        msix_reg,
    };

    for step in steps.iter().take(128) {
        match step {
            Step::Read(target, s) => {
                let len = size(*s);
                let value = rig.read(target, len);
                if let (Target::Common(o), 2) = (target, len) {
                    match o % 0x40 {
                        0x12 => assert_eq!(value, MAX_SIZES.len() as u64),
                        0x10 | 0x1a => assert!(
                            value == u64::from(NO_VECTOR) || value < vectors as u64,
                            "vector {value:#x}"
                        ),
                        _ => {}
                    }
                }
            }
            Step::Write(target, s, value) => rig.write(target, size(*s), *value),
            Step::Init {
                features_hi,
                features_lo,
                queues,
                size_shift,
                slot,
            } => {
                rig.common(0x14, 1, 0);
                let ack = (VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER) as u64;
                rig.common(0x14, 1, ack);
                rig.common(0x08, 4, 0);
                rig.common(0x0c, 4, u64::from(*features_lo));
                rig.common(0x08, 4, 1);
                rig.common(0x0c, 4, u64::from(*features_hi));
                let features_ok = ack | VIRTIO_CONFIG_S_FEATURES_OK as u64;
                rig.common(0x14, 1, features_ok);
                for q in 0..MAX_SIZES.len() as u16 {
                    if queues & (1 << q) == 0 {
                        continue;
                    }
                    // Slot 0..15 of 64 KiB; the last ones straddle the end of memory.
                    let base = 0x1_0000 * u64::from((slot.wrapping_add(q as u8)) % 17);
                    rig.common(0x16, 2, u64::from(q));
                    rig.common(0x18, 2, 1 << (size_shift % 10));
                    rig.common(0x1a, 2, u64::from(q) + 1);
                    rig.common(0x20, 8, base);
                    rig.common(0x28, 8, base + 0x1000);
                    rig.common(0x30, 8, base + 0x2000);
                    rig.common(0x1c, 2, 1);
                }
                rig.common(0x10, 2, 0);
                rig.common(0x14, 1, features_ok | VIRTIO_CONFIG_S_DRIVER_OK as u64);
            }
            Step::MsixControl(enable, mask) => {
                let value = u64::from(*enable) << 7 | u64::from(*mask) << 6;
                let offset = 3;
                let target = Target::Config(rig.msix_reg as u8, offset);
                rig.write(&target, 1, value);
            }
            Step::Vector(n, masked) => {
                let base = MSIX_TABLE + 16 * u64::from(n % 8);
                rig.dev.write_bar(0, base, &0xfee0_0000u32.to_le_bytes());
                rig.dev.write_bar(0, base + 4, &0u32.to_le_bytes());
                rig.dev
                    .write_bar(0, base + 8, &(0x20 + u32::from(*n)).to_le_bytes());
                rig.dev
                    .write_bar(0, base + 12, &u32::from(*masked).to_le_bytes());
            }
            Step::Raise(queue) => {
                let interrupt = rig.state.lock().unwrap().interrupt.clone();
                if let Some(interrupt) = interrupt {
                    let kind = match queue {
                        Some(q) => VirtioInterruptType::Queue(u16::from(*q % 4)),
                        None => VirtioInterruptType::Config,
                    };
                    let _ = interrupt.trigger(kind);
                }
            }
        }
        rig.check_irqfds();
    }
});
