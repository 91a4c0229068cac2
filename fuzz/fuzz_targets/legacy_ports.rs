//! Fuzzes the legacy port-I/O devices every VM has (16550 serial, i8042, ACPI sleep and
//! reset registers, the GED, pvpanic, the boot marker) through the port-I/O bus, with the
//! layout the VMM gives them, by random sequences of port reads and writes of 1, 2 or 4
//! bytes, interleaved with host console input and power-button presses.
//!
//! Ports are mostly those of the devices (and their neighbours), sometimes any. Invariants:
//! no access panics; an access is claimed exactly when a device lives at its port; a read
//! never ends the VM nor records a boot marker; the VM's exit reason is only ever set by a
//! write to the i8042, the ACPI registers or pvpanic (never by console text, not even a
//! panic banner), and the boot times only by writes to the marker port.

#![no_main]

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arbitrary::Arbitrary;
use devices::legacy::acpi_power::{ACPI_POWER_PORT_BASE, ACPI_POWER_PORT_LEN};
use devices::legacy::boot_marker::{BootTimes, BOOT_MARKER_PORT};
use devices::legacy::ged::GED_PORT;
use devices::legacy::i8042::{I8042_PORT_BASE, I8042_PORT_LEN};
use devices::legacy::pvpanic::PVPANIC_PORT;
use devices::legacy::serial::{COM1_PORT_BASE, COM1_PORT_LEN};
use devices::legacy::{
    AcpiPower, BootMarker, ConsoleOutput, ConsoleSink, Ged, GedEvents, PvPanic, Serial, I8042,
};
use devices::{Bus, BusDevice, VmExit};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The devices' ranges as the VMM lays them out (vmm/src/lib.rs `add_legacy_devices`).
const RANGES: &[(u16, u16)] = &[
    (COM1_PORT_BASE, COM1_PORT_LEN),
    (I8042_PORT_BASE, I8042_PORT_LEN),
    (ACPI_POWER_PORT_BASE, ACPI_POWER_PORT_LEN),
    (GED_PORT, 1),
    (PVPANIC_PORT, 1),
    (BOOT_MARKER_PORT, 1),
];

/// Ports whose writes may end the VM (console text is data: the serial never does).
fn may_exit(port: u16) -> bool {
    let inside = |base: u16, len: u16| (base..base + len).contains(&port);
    inside(I8042_PORT_BASE, I8042_PORT_LEN)
        || inside(ACPI_POWER_PORT_BASE, ACPI_POWER_PORT_LEN)
        || port == PVPANIC_PORT
}

#[derive(Arbitrary, Debug)]
enum Port {
    /// Register `offset` of device `device` (offsets past a device reach its neighbours).
    Device {
        device: u8,
        offset: u8,
    },
    Any(u16),
}

impl Port {
    fn get(&self) -> u16 {
        match *self {
            Port::Device { device, offset } => {
                let (base, _) = RANGES[usize::from(device) % RANGES.len()];
                base.wrapping_add(u16::from(offset % 10)).wrapping_sub(1)
            }
            Port::Any(port) => port,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Access {
    Read {
        port: Port,
        size: u8,
    },
    Write {
        port: Port,
        size: u8,
        value: u32,
    },
    /// Text the guest prints: many writes to the data register.
    Print(Vec<u8>),
    /// Host console input (crib's stdin).
    Input(Vec<u8>),
    PowerButton,
}

fn size(s: u8) -> usize {
    [1, 2, 4][usize::from(s % 3)]
}

fn claimed(port: u16) -> bool {
    RANGES
        .iter()
        .any(|&(base, len)| (base..base + len).contains(&port))
}

fuzz_target!(|accesses: Vec<Access>| {
    let exit = Arc::new(VmExit::new().expect("eventfd"));
    let serial = Arc::new(Mutex::new(Serial::new(
        EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        ConsoleOutput::new(ConsoleSink::Off),
    )));
    let ged = Arc::new(GedEvents::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
    let times = Arc::new(BootTimes::default());
    let devices: [Arc<Mutex<dyn BusDevice>>; 6] = [
        serial.clone(),
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        Arc::new(Mutex::new(AcpiPower::new(exit.clone()))),
        Arc::new(Mutex::new(Ged::new(ged.clone()))),
        Arc::new(Mutex::new(PvPanic::new(exit.clone()))),
        Arc::new(Mutex::new(BootMarker::new(Instant::now(), times.clone()))),
    ];
    let bus = Bus::new();
    for (device, &(base, len)) in devices.into_iter().zip(RANGES) {
        bus.insert(device, u64::from(base), u64::from(len))
            .expect("legacy ranges do not overlap");
    }
    let boot_times = || {
        (
            times.init_started_us.load(Ordering::SeqCst),
            times.ready_us.load(Ordering::SeqCst),
        )
    };

    for access in accesses.iter().take(256) {
        let (reason, marks) = (exit.reason(), boot_times());
        match access {
            Access::Read { port, size: s } => {
                let port = port.get();
                let mut data = [0xa5u8; 4];
                let was = bus.read(u64::from(port), &mut data[..size(*s)]);
                assert_eq!(was, claimed(port), "read of port {port:#x}");
                assert_eq!(exit.reason(), reason, "a read of {port:#x} ended the VM");
                assert_eq!(boot_times(), marks, "a read of {port:#x} set a boot time");
            }
            Access::Write {
                port,
                size: s,
                value,
            } => {
                let port = port.get();
                let bytes = value.to_le_bytes();
                let was = bus.write(u64::from(port), &bytes[..size(*s)]);
                assert_eq!(was, claimed(port), "write of port {port:#x}");
                if !may_exit(port) {
                    assert_eq!(exit.reason(), reason, "a write of {port:#x} ended the VM");
                }
                if port != BOOT_MARKER_PORT {
                    assert_eq!(boot_times(), marks, "a write of {port:#x} set a boot time");
                }
            }
            Access::Print(text) => {
                for &b in text.iter().take(256) {
                    assert!(bus.write(u64::from(COM1_PORT_BASE), &[b]));
                }
                assert_eq!(exit.reason(), reason, "console text ended the VM");
            }
            Access::Input(bytes) => {
                let mut serial = serial.lock().unwrap_or_else(|e| e.into_inner());
                let room = serial.input_room();
                let taken = serial.enqueue_input(bytes);
                assert!(taken <= room && taken <= bytes.len());
            }
            Access::PowerButton => {
                let _ = ged.press_power_button();
                assert_eq!(exit.reason(), reason, "the power button ended the VM");
            }
        }
    }
});
