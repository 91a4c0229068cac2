//! Fuzzes PCI configuration space as the guest reaches it: ports 0xCF8/0xCFC and ECAM, on a
//! root bus with the host bridge and a passed-through (VFIO) device whose configuration
//! space, capability list and BAR sizes come from the fuzzer, plus that device's BARs and
//! MSI-X table through the MMIO trap the VMM puts on them.
//!
//! The device's configuration space is mostly plausible (a capability list with MSI-X, a
//! table and PBA in a BAR) so the fuzzer reaches the MSI-X emulation; accesses go mostly
//! to the registers that matter (command, BARs, MSI-X message control, the table). The
//! device is `devices::vfio::fuzzing::FuzzDevice`, over VFIO regions that panic on any
//! access outside them. Invariants: no access panics or leaves a VFIO region; an empty
//! slot reads all ones; a BAR the guest moves lands on a multiple of its (power-of-two)
//! size; no MSI-X vector is connected unless MSI-X is enabled, the function unmasked and
//! the vector unmasked; INTx is connected exactly while MSI-X is off.

#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use devices::pci::{BarMove, BarRelocation, PciBus, PciConfigIo, PciConfigMmio, PciDevice};
use devices::vfio::fuzzing::FuzzDevice;
use devices::vfio::{VfioBarTrap, NUM_BARS};
use devices::{Bus, BusDevice};
use libfuzzer_sys::fuzz_target;

const ECAM_SIZE: u64 = 0x1000_0000;
const MSIX_CAPABILITY_ID: u8 = 0x11;
/// BAR sizes the fuzzer picks from (0: no BAR).
const BAR_SIZES: &[u64] = &[0, 0x20, 0x1000, 0x3000, 0x4000, 0x1_0000];
/// Where the MSI-X capability may sit (the last ones run off the end of 256 bytes).
const MSIX_AT: &[usize] = &[0x40, 0x50, 0x80, 0xc0, 0xf4, 0xf8, 0xfc];
/// MSI-X table and PBA offsets (BIR in the low bits).
const TABLE_AT: &[u32] = &[0x0, 0x2000, 0x3ff8, 0x8000, 0x2001, 0x2005];

#[derive(Arbitrary, Debug)]
struct Plausible {
    msix_at: u8,
    table: u8,
    pba: u8,
    /// Table size field (vectors - 1).
    table_size: u16,
    /// Another capability in front of MSI-X.
    chained: bool,
    bar0: u32,
}

#[derive(Arbitrary, Debug)]
struct Device {
    /// Configuration space: 256 bytes, or 4096 (PCI Express).
    express: bool,
    bytes: Vec<u8>,
    plausible: Option<Plausible>,
    bar_sizes: [u8; NUM_BARS],
    intx: bool,
}

/// A register the guest cares about, or any.
#[derive(Arbitrary, Debug)]
enum Reg {
    Command,
    Bar(u8),
    Rom,
    Interrupt,
    MsixControl,
    Capability(u8),
    Extended(u16),
    Any(u8),
}

#[derive(Arbitrary, Debug)]
enum Access {
    /// Through 0xCF8/0xCFC: select (slot, reg), then read or write `size` bytes at `offset`.
    Io {
        slot: u8,
        reg: Reg,
        offset: u8,
        size: u8,
        write: Option<u32>,
    },
    /// Through ECAM.
    Ecam {
        slot: u8,
        function: u8,
        reg: Reg,
        offset: u8,
        size: u8,
        write: Option<u32>,
    },
    /// The PCI ports themselves, any offset.
    Port {
        offset: u8,
        size: u8,
        write: Option<u32>,
    },
    /// BAR sizing: all ones to BAR `n`, read back, restore.
    Size(u8),
    /// Move BAR `n` to `slot` pages up.
    Move(u8, u16),
    /// MSI-X table entry `n`, word `w`, through the device's trap.
    Table {
        entry: u8,
        word: u8,
        size: u8,
        write: Option<u32>,
    },
    /// BAR `n` at `offset` through the trap.
    Trap {
        bar: u8,
        offset: u32,
        size: u8,
        write: Option<u64>,
    },
}

struct Relocations;

impl BarRelocation for Relocations {
    fn move_bar(&self, _slot: u8, moved: &BarMove) {
        assert!(moved.size.is_power_of_two(), "{moved:?}");
        assert_eq!(
            moved.new % moved.size,
            0,
            "a BAR moved off its alignment: {moved:?}"
        );
        assert_ne!(moved.new, moved.old, "{moved:?}");
    }
}

fn size(s: u8) -> usize {
    [1, 2, 4][usize::from(s % 3)]
}

fn config_space(d: &Device) -> Vec<u8> {
    let len = if d.express { 4096 } else { 256 };
    let mut config: Vec<u8> = d.bytes.iter().copied().cycle().take(len).collect();
    config.resize(len, 0);
    if let Some(p) = &d.plausible {
        config[0..4].copy_from_slice(&0x0010_1b36u32.to_le_bytes());
        config[6] |= 0x10;
        config[0x10..0x14].copy_from_slice(&(p.bar0 & 0xf | 0x4).to_le_bytes());
        let msix = MSIX_AT[usize::from(p.msix_at) % MSIX_AT.len()];
        if p.chained {
            config[0x34] = 0x48;
            config[0x48] = 0x01;
            config[0x49] = msix as u8;
        } else {
            config[0x34] = msix as u8;
        }
        config[msix] = MSIX_CAPABILITY_ID;
        if msix + 12 <= 256 {
            config[msix + 1] = 0;
            config[msix + 2..msix + 4].copy_from_slice(&(p.table_size & 0x7ff).to_le_bytes());
            let table = TABLE_AT[usize::from(p.table) % TABLE_AT.len()];
            let pba = TABLE_AT[usize::from(p.pba) % TABLE_AT.len()] + 0x1000;
            config[msix + 4..msix + 8].copy_from_slice(&table.to_le_bytes());
            config[msix + 8..msix + 12].copy_from_slice(&pba.to_le_bytes());
        }
    }
    config
}

/// (register index, its byte offset of the MSI-X capability if any).
fn register(reg: &Reg, msix_reg: Option<usize>) -> usize {
    match *reg {
        Reg::Command => 1,
        Reg::Bar(n) => 4 + usize::from(n % 6),
        Reg::Rom => 12,
        Reg::Interrupt => 15,
        Reg::MsixControl => msix_reg.unwrap_or(0x20),
        Reg::Capability(n) => 16 + usize::from(n % 48),
        Reg::Extended(n) => 64 + usize::from(n % 960),
        Reg::Any(n) => usize::from(n % 64),
    }
}

fuzz_target!(|input: (Device, Vec<Access>)| {
    let (device, accesses) = input;
    let config = config_space(&device);
    let msix_reg = config
        .get(0x34)
        .map(|p| usize::from(*p) & 0xfc)
        .filter(|&p| config.get(p) == Some(&MSIX_CAPABILITY_ID))
        .map(|p| p / 4);
    let sizes = device
        .bar_sizes
        .map(|s| BAR_SIZES[usize::from(s) % BAR_SIZES.len()]);
    let Some(fuzz) = FuzzDevice::build(config, sizes, device.intx) else {
        return;
    };
    let mut pci = PciBus::new();
    pci.set_bar_relocation(Arc::new(Relocations));
    let slot = pci
        .add_device(fuzz.device.clone() as Arc<Mutex<dyn PciDevice>>)
        .expect("a free slot");
    let pci = Arc::new(pci);
    let mut io = PciConfigIo::new(pci.clone());
    let mut ecam = PciConfigMmio::new(pci);
    let mmio = Bus::new();
    for &(bar, addr, size) in &fuzz.bars {
        let trap = Arc::new(Mutex::new(VfioBarTrap::new(fuzz.device.clone(), bar)));
        mmio.insert(trap, addr, size).expect("BARs do not overlap");
    }
    let table = fuzz.bars.first().map(|&(_, addr, _)| addr);

    for access in accesses.iter().take(200) {
        match access {
            Access::Io {
                slot: s,
                reg,
                offset,
                size: n,
                write,
            } => {
                let target = u32::from(*s % 4);
                let reg = register(reg, msix_reg) % 64;
                let address = 0x8000_0000 | target << 11 | (reg as u32) << 2;
                io.write(0, &address.to_le_bytes());
                let offset = 4 + u64::from(offset % 4);
                let len = size(*n);
                match write {
                    Some(value) => io.write(offset, &value.to_le_bytes()[..len]),
                    None => {
                        let mut data = [0u8; 4];
                        io.read(offset, &mut data[..len]);
                        if target != 0 && target != u32::from(slot) {
                            assert!(data[..len].iter().all(|b| *b == 0xff), "empty slot");
                        }
                    }
                }
            }
            Access::Ecam {
                slot: s,
                function,
                reg,
                offset,
                size: n,
                write,
            } => {
                let target = u64::from(*s % 4);
                let function = u64::from(*function % 2);
                let reg = register(reg, msix_reg) as u64;
                let at = target << 15 | function << 12 | reg << 2 | u64::from(offset % 4);
                let len = size(*n);
                assert!(at < ECAM_SIZE);
                match write {
                    Some(value) => ecam.write(at, &value.to_le_bytes()[..len]),
                    None => {
                        let mut data = [0u8; 4];
                        ecam.read(at, &mut data[..len]);
                    }
                }
            }
            Access::Port {
                offset,
                size: n,
                write,
            } => {
                let len = size(*n);
                let offset = u64::from(offset % 8);
                match write {
                    Some(value) => io.write(offset, &value.to_le_bytes()[..len]),
                    None => io.read(offset, &mut [0u8; 4][..len]),
                }
            }
            Access::Size(n) => {
                let reg = (4 + usize::from(n % 6)) as u64;
                let at = u64::from(slot) << 15 | reg << 2;
                let mut old = [0u8; 4];
                ecam.read(at, &mut old);
                ecam.write(at, &[0xff; 4]);
                ecam.read(at, &mut [0u8; 4]);
                ecam.write(at, &old);
            }
            Access::Move(n, pages) => {
                let reg = (4 + usize::from(n % 6)) as u64;
                let at = u64::from(slot) << 15 | reg << 2;
                let addr = 0xd000_0000u32.wrapping_add(u32::from(*pages) << 12);
                ecam.write(at, &addr.to_le_bytes());
            }
            Access::Table {
                entry,
                word,
                size: n,
                write,
            } => {
                let Some(base) = table else { continue };
                let len = size(*n);
                let at = base + 0x2000 + 16 * u64::from(entry % 8) + 4 * u64::from(word % 4);
                match write {
                    Some(value) => {
                        mmio.write(at, &value.to_le_bytes()[..len]);
                    }
                    None => {
                        mmio.read(at, &mut [0u8; 4][..len]);
                    }
                }
            }
            Access::Trap {
                bar,
                offset,
                size: n,
                write,
            } => {
                let Some(&(_, addr, bar_size)) =
                    fuzz.bars.get(usize::from(*bar) % fuzz.bars.len().max(1))
                else {
                    continue;
                };
                let len = [1, 2, 4, 8][usize::from(n % 4)];
                let at = addr + u64::from(*offset) % bar_size;
                match write {
                    Some(value) => {
                        mmio.write(at, &value.to_le_bytes()[..len]);
                    }
                    None => {
                        mmio.read(at, &mut [0u8; 8][..len]);
                    }
                }
            }
        }
        fuzz.check();
    }
});
