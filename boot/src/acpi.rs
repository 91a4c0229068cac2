//! ACPI tables (ACPI 6.5): RSDP -> XSDT -> {FADT -> DSDT, MADT}.
//!
//! The platform is "hardware-reduced" (FADT flag HW_REDUCED_ACPI): no PM1 blocks, no SCI,
//! no legacy PIC or PIT set-up; sleep (poweroff) goes through the FADT sleep control
//! register and reboot through the reset register, both plain I/O ports that crib traps.
//! The boot flags say there is no 8042 and no CMOS RTC, so the guest does not probe them:
//! every such probe is a VM exit during boot. The MADT lists one LAPIC per vCPU and KVM's
//! IO-APIC, which Debian's kernel needs (it has no MP-table support).

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{ACPI_END, ACPI_START, APIC_START, IOAPIC_START};

const OEM_ID: [u8; 6] = *b"CRIB  ";
const OEM_TABLE_ID: [u8; 8] = *b"CRIBVMM ";
const OEM_REVISION: u32 = 1;
/// IA-PC boot architecture flags: VGA not present (bit 2), CMOS RTC not present (bit 5).
/// Bit 1 (8042 present) is clear on purpose.
const IAPC_BOOT_ARCH_NO_VGA_NO_CMOS: u16 = (1 << 2) | (1 << 5);
/// SLP_TYP value of S5 (soft off) in `\_S5_`.
pub const SLEEP_TYPE_S5: u8 = 5;

/// What the tables describe.
#[derive(Clone, Copy, Debug)]
pub struct AcpiConfig {
    /// Number of vCPUs (LAPIC IDs 0..cpus).
    pub cpus: u8,
    /// I/O port of the FADT sleep control register.
    pub sleep_control_port: u16,
    /// I/O port of the FADT sleep status register.
    pub sleep_status_port: u16,
    /// I/O port of the FADT reset register, and the value that resets.
    pub reset_port: u16,
    pub reset_value: u8,
    /// I/O port of a pvpanic device (ACPI id QEMU0001), if there is one.
    pub pvpanic_port: Option<u16>,
    /// A 16550 UART (PNP0501): base port and IO-APIC pin, if there is one.
    pub serial: Option<(u16, u32)>,
    /// The PCI host bridge, if the VM has PCI.
    pub pci: Option<PciHostBridge>,
    /// A Generic Event Device with a power button, if there is one.
    pub ged: Option<GenericEventDevice>,
}

/// An ACPI Generic Event Device (ACPI0013) that delivers power button presses: on its
/// interrupt `_EVT` reads the one-byte event register and, when bit 0 is set, notifies
/// `\_SB_.PWRB` (PNP0C0C) with 0x80 (button pressed).
#[derive(Clone, Copy, Debug)]
pub struct GenericEventDevice {
    /// I/O port of the event register (reading it clears the events).
    pub event_port: u16,
    /// IO-APIC pin of its interrupt (edge-triggered, active high).
    pub irq: u32,
}

/// Event register bit of a power button press.
pub const GED_POWER_BUTTON_EVENT: u8 = 1 << 0;

/// What the guest needs to find PCI bus 0.
#[derive(Clone, Copy, Debug)]
pub struct PciHostBridge {
    /// ECAM base of bus 0 (MCFG).
    pub ecam_start: u64,
    /// The memory window BARs live in: `[start, start + size)`.
    pub mmio_start: u64,
    pub mmio_size: u64,
    /// The window above 4 GiB for 64-bit BARs, `(start, size)`, if there is one.
    pub mmio64: Option<(u64, u64)>,
}

/// Errors while writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables need {needed} bytes but the area at 0xe0000 holds {available}")]
    TooLarge { needed: u64, available: u64 },
    #[error("cannot write the ACPI tables into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// The DSDT: `\_S5_` for poweroff, the serial port and the pvpanic device.
///
/// The UART must be described: on a hardware-reduced platform Linux has no legacy PIC and
/// maps no ISA IRQ by default, so without the `_CRS` interrupt the 8250 driver cannot
/// request IRQ 4 and the console's tty never transmits (printk, which polls, still works).
fn dsdt(config: &AcpiConfig) -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&SLEEP_TYPE_S5]));
    s5.to_aml_bytes(&mut dsdt);
    if let Some((port, irq)) = config.serial {
        let io = aml::IO::new(port, port, 1, 8);
        // Edge-triggered, active high, exclusive: an ISA interrupt.
        let interrupt = aml::Interrupt::new(true, true, false, false, irq);
        let crs = aml::ResourceTemplate::new(vec![&io, &interrupt]);
        let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
        let uid = aml::Name::new("_UID".into(), &aml::ZERO);
        let resources = aml::Name::new("_CRS".into(), &crs);
        aml::Device::new("_SB_.COM1".into(), vec![&hid, &uid, &resources]).to_aml_bytes(&mut dsdt);
    }
    if let Some(pci) = config.pci {
        dsdt.append_slice(&pci_host_bridge(&pci));
    }
    if let Some(ged) = config.ged {
        dsdt.append_slice(&generic_event_device(&ged));
    }
    if let Some(port) = config.pvpanic_port {
        let io = aml::IO::new(port, port, 1, 1);
        let crs = aml::ResourceTemplate::new(vec![&io]);
        let hid = aml::Name::new("_HID".into(), &"QEMU0001");
        let resources = aml::Name::new("_CRS".into(), &crs);
        aml::Device::new("_SB_.PVPN".into(), vec![&hid, &resources]).to_aml_bytes(&mut dsdt);
    }
    dsdt.update_checksum();
    dsdt
}

/// `\_SB_.PWRB`, a control-method power button, and `\_SB_.GED_`, the Generic Event
/// Device that notifies it. Linux's acpi-ged (drivers/acpi/evged.c) requests every
/// interrupt of the GED's `_CRS` and calls `_EVT` (with the GSI as argument) on each.
fn generic_event_device(ged: &GenericEventDevice) -> Vec<u8> {
    let mut bytes = Vec::new();
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    aml::Device::new("_SB_.PWRB".into(), vec![&hid, &uid]).to_aml_bytes(&mut bytes);

    let hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    // Edge-triggered, active high, exclusive: an irqfd pulses the IO-APIC pin.
    let interrupt = aml::Interrupt::new(true, true, false, false, ged.irq);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&interrupt]));
    let port = usize::from(ged.event_port);
    let region = aml::OpRegion::new("GDST".into(), aml::OpRegionSpace::SystemIO, &port, &1usize);
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
    );
    // Local0 = GDAT (reading clears the device's events)
    // If ((Local0 & 1) == 1) { Notify (\_SB_.PWRB, 0x80) }
    let gdat = aml::Path::new("GDAT");
    let read_events = aml::Store::new(&aml::Local(0), &gdat);
    let power_bit = GED_POWER_BUTTON_EVENT;
    let masked = aml::And::new(&aml::Local(1), &aml::Local(0), &power_bit);
    let pressed = aml::Equal::new(&masked, &power_bit);
    let button = aml::Path::new("\\_SB_.PWRB");
    let notify = aml::Notify::new(&button, &0x80u8);
    let if_pressed = aml::If::new(&pressed, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&read_events, &if_pressed]);
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![&hid, &uid, &crs, &region, &field, &evt],
    )
    .to_aml_bytes(&mut bytes);
    bytes
}

/// First GSI of the four IO-APIC pins PCI INTx lines share (16..19: above the ISA range).
pub const PCI_INTX_FIRST_GSI: u32 = 16;
/// Slots the `_PRT` describes (0 is the host bridge).
const PCI_SLOTS: u8 = 32;

/// The GSI of INTx pin `pin` (1 = INTA .. 4 = INTD) of the function in `slot`: the usual
/// swizzle over four shared, level-triggered IO-APIC pins, as the `_PRT` says.
pub fn pci_intx_gsi(slot: u8, pin: u8) -> u32 {
    PCI_INTX_FIRST_GSI + (u32::from(slot) + u32::from(pin.saturating_sub(1))) % 4
}

/// `_PRT` entries: every slot's INTA..INTD straight to its GSI (no link devices,
/// source 0), as (address, pin from 0, GSI).
fn pci_routing_entries() -> Vec<(u32, u8, u32)> {
    (1..PCI_SLOTS)
        .flat_map(|slot| {
            (1..=4u8).map(move |pin| {
                (
                    u32::from(slot) << 16 | 0xffff,
                    pin - 1,
                    pci_intx_gsi(slot, pin),
                )
            })
        })
        .collect()
}

/// `\_SB_.PCI0`: a PCI Express root bridge (PNP0A08) for bus 0 with the config ports
/// and the BAR windows as resources, and a `_PRT` for the INTx of passed-through
/// functions (virtio devices use MSI-X only).
fn pci_host_bridge(pci: &PciHostBridge) -> Vec<u8> {
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let config_ports = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let window_end = pci.mmio_start + pci.mmio_size - 1;
    let (start, end) = (
        u32::try_from(pci.mmio_start).unwrap_or(0),
        u32::try_from(window_end).unwrap_or(0),
    );
    let memory = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        start,
        end,
        None,
    );
    let memory64 = pci.mmio64.map(|(start, size)| {
        aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            start,
            start + size - 1,
            None,
        )
    });
    let mut resources: Vec<&dyn Aml> = vec![&bus, &config_ports, &memory];
    if let Some(memory64) = &memory64 {
        resources.push(memory64);
    }
    let crs = aml::ResourceTemplate::new(resources);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
    let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let resources = aml::Name::new("_CRS".into(), &crs);
    let entries = pci_routing_entries();
    let packages: Vec<aml::Package> = entries
        .iter()
        .map(|(address, pin, gsi)| aml::Package::new(vec![address, pin, &aml::ZERO, gsi]))
        .collect();
    let routes: Vec<&dyn Aml> = packages.iter().map(|p| p as &dyn Aml).collect();
    let prt = aml::Name::new("_PRT".into(), &aml::Package::new(routes));
    bytes_of(&aml::Device::new(
        "_SB_.PCI0".into(),
        vec![&hid, &cid, &adr, &seg, &uid, &bbn, &resources, &prt],
    ))
}

fn mcfg(pci: &PciHostBridge) -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(pci.ecam_start, 0, 0, 0);
    bytes_of(&mcfg)
}

fn fadt(config: &AcpiConfig, dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_NO_VGA_NO_CMOS.into();
    fadt.sleep_control_reg = io_register(config.sleep_control_port);
    fadt.sleep_status_reg = io_register(config.sleep_status_port);
    fadt.reset_reg = io_register(config.reset_port);
    fadt.reset_value = config.reset_value;
    bytes_of(&fadt.finalize())
}

fn madt(config: &AcpiConfig) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for id in 0..config.cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    bytes_of(&madt)
}

/// Lays the tables out from [`ACPI_START`] and writes them; returns the RSDP address.
pub fn write_tables<M: GuestMemoryBackend>(
    mem: &M,
    config: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    // Place tables one after the other, 8-byte aligned, after the RSDP.
    let align = |addr: u64| (addr + 7) & !7;
    let rsdp_addr = ACPI_START.0;
    let dsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let dsdt = dsdt(config);
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(config, dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(config);
    let mcfg_addr = align(madt_addr + madt.len() as u64);
    let mcfg = config.pci.map(|pci| mcfg(&pci)).unwrap_or_default();
    let xsdt_addr = align(mcfg_addr + mcfg.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    if !mcfg.is_empty() {
        xsdt.add_entry(mcfg_addr);
    }
    let xsdt = bytes_of(&xsdt);
    let end = xsdt_addr + xsdt.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge {
            needed: end - ACPI_START.0,
            available: ACPI_END - ACPI_START.0,
        });
    }
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));
    for (addr, bytes) in [
        (rsdp_addr, rsdp.as_slice()),
        (dsdt_addr, dsdt.as_slice()),
        (fadt_addr, fadt.as_slice()),
        (madt_addr, madt.as_slice()),
        (mcfg_addr, mcfg.as_slice()),
        (xsdt_addr, xsdt.as_slice()),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(AcpiError::Write)?;
    }
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    fn config(cpus: u8) -> AcpiConfig {
        AcpiConfig {
            cpus,
            sleep_control_port: 0x600,
            sleep_status_port: 0x601,
            reset_port: 0x602,
            reset_value: 1,
            pvpanic_port: Some(0x505),
            serial: Some((0x3f8, 4)),
            pci: Some(PciHostBridge {
                ecam_start: 0xe000_0000,
                mmio_start: 0xc000_0000,
                mmio_size: 0x2000_0000,
                mmio64: Some((0x1_0000_0000, 0xff_0000_0000)),
            }),
            ged: Some(GenericEventDevice {
                event_port: 0x604,
                irq: 5,
            }),
        }
    }

    fn written(cpus: u8) -> (GuestMemoryMmap, u64) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let rsdp = write_tables(&mem, &config(cpus)).unwrap();
        (mem, rsdp.0)
    }

    fn read_table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut bytes = vec![0u8; len as usize];
        mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes
    }

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
    }

    /// Follows RSDP -> XSDT and returns each table by signature.
    fn tables(mem: &GuestMemoryMmap, rsdp: u64) -> Vec<Vec<u8>> {
        let xsdt_addr: u64 = mem.read_obj(GuestAddress(rsdp + 24)).unwrap();
        let xsdt = read_table(mem, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        xsdt[36..]
            .chunks(8)
            .map(|c| read_table(mem, u64::from_le_bytes(c.try_into().unwrap())))
            .collect()
    }

    #[test]
    fn rsdp_is_at_0xe0000_with_valid_checksums() {
        let (mem, rsdp) = written(1);
        assert_eq!(rsdp, 0xe0000);
        let mut bytes = [0u8; 36];
        mem.read_slice(&mut bytes, GuestAddress(rsdp)).unwrap();
        assert_eq!(&bytes[..8], b"RSD PTR ");
        assert!(checksum_ok(&bytes[..20]) && checksum_ok(&bytes));
    }

    #[test]
    fn every_table_checksums_to_zero() {
        let (mem, rsdp) = written(2);
        for table in tables(&mem, rsdp) {
            assert!(checksum_ok(&table), "{:?}", &table[..4]);
        }
    }

    #[test]
    fn madt_lists_one_lapic_per_cpu_and_the_ioapic() {
        let (mem, rsdp) = written(3);
        let madt = tables(&mem, rsdp)
            .into_iter()
            .find(|t| &t[..4] == b"APIC")
            .unwrap();
        let mut types = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            types.push(madt[off]);
            off += madt[off + 1] as usize;
        }
        assert_eq!(types, vec![0, 0, 0, 1]);
    }

    #[test]
    fn fadt_is_hw_reduced_with_sleep_and_reset_ports() {
        let (mem, rsdp) = written(1);
        let fadt = tables(&mem, rsdp)
            .into_iter()
            .find(|t| &t[..4] == b"FACP")
            .unwrap();
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // Reset register GAS at 116: I/O space, address 0x602; value at 128.
        assert_eq!((fadt[116], fadt[120], fadt[128]), (1, 0x02, 1));
        // Sleep control register GAS at 244.
        assert_eq!(
            (fadt[244], u16::from_le_bytes([fadt[248], fadt[249]])),
            (1, 0x600)
        );
        // IAPC boot flags at 109: no 8042 (bit 1), no VGA, no CMOS.
        assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]), 0x24);
    }

    #[test]
    fn dsdt_has_s5_and_pvpanic() {
        let (mem, rsdp) = written(1);
        let fadt = tables(&mem, rsdp)
            .into_iter()
            .find(|t| &t[..4] == b"FACP")
            .unwrap();
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = read_table(&mem, dsdt_addr);
        assert!(checksum_ok(&dsdt));
        let find = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"_S5_") && find(b"QEMU0001") && find(b"COM1") && find(b"PCI0"));
        // The COM1 _CRS carries an extended IRQ descriptor for pin 4.
        assert!(find(&[0x89, 6, 0, 0x03, 1, 4, 0, 0, 0]));
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn dsdt_has_a_ged_that_notifies_the_power_button() {
        let dsdt = bytes_of(&dsdt(&config(1)));
        let pnp0c0c = bytes_of(&aml::EISAName::new("PNP0C0C"));
        // Names: the power button (PNP0C0C), the GED (ACPI0013) and its event method.
        assert!(contains(&dsdt, b"PWRB") && contains(&dsdt, &pnp0c0c));
        assert!(contains(&dsdt, b"GED_") && contains(&dsdt, b"ACPI0013\0"));
        // Method (_EVT, 1, Serialized): flags = 1 argument | serialized (0x08).
        let evt = dsdt.windows(4).position(|w| w == b"_EVT").unwrap();
        assert_eq!(dsdt[evt + 4], 0x09);
        // Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { 5 }.
        assert!(contains(&dsdt, &[0x89, 6, 0, 0x03, 1, 5, 0, 0, 0]));
        // OperationRegion (GDST, SystemIO, 0x604, 1).
        assert!(contains(
            &dsdt,
            &[0x5b, 0x80, b'G', b'D', b'S', b'T', 0x01, 0x0b, 0x04, 0x06, 0x01]
        ));
        // Notify (\_SB.PWRB, 0x80).
        let mut notify = vec![0x86, b'\\', 0x2e];
        notify.extend_from_slice(b"_SB_PWRB");
        notify.extend_from_slice(&[0x0a, 0x80]);
        assert!(contains(&dsdt, &notify));
    }

    #[test]
    fn dsdt_without_ged_has_no_power_button() {
        let dsdt = bytes_of(&dsdt(&AcpiConfig {
            ged: None,
            ..config(1)
        }));
        assert!(!contains(&dsdt, b"ACPI0013") && !contains(&dsdt, b"PWRB"));
    }

    /// ACPICA's disassembler (acpica-tools, scripts/install-deps.sh) reads the DSDT back
    /// without errors and finds the GED's method; skipped where `iasl` is missing.
    #[test]
    fn iasl_disassembles_the_dsdt() {
        let dir = std::env::temp_dir().join(format!("crib-dsdt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let aml = dir.join("dsdt.aml");
        std::fs::write(&aml, bytes_of(&dsdt(&config(2)))).unwrap();
        let out = match std::process::Command::new("iasl")
            .arg("-d")
            .arg(&aml)
            .output()
        {
            Ok(out) => out,
            Err(e) => {
                eprintln!("skipped: cannot run iasl ({e})");
                let _ = std::fs::remove_dir_all(&dir);
                return;
            }
        };
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for needle in [
            "Device (_SB.GED)",
            "Name (_HID, \"ACPI0013\"",
            "Method (_EVT, 1, Serialized)",
            "Notify (\\_SB.PWRB, 0x80)",
            "Name (_HID, EisaId (\"PNP0C0C\")",
            "OperationRegion (GDST, SystemIO, 0x0604, One)",
            "QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,",
            "0x0000000100000000, // Range Minimum",
            "0x000000FFFFFFFFFF, // Range Maximum",
            "Name (_PRT, Package (0x7C)",
            // Slot 1, INTB: GSI 16 + (1 + 1) % 4.
            "0x0001FFFF,",
        ] {
            assert!(dsl.contains(needle), "{needle} missing from:\n{dsl}");
        }
    }

    /// The QWord memory descriptor (tag 0x8a) of the 64-bit window: granularity, min,
    /// max, translation and length follow the 6 bytes of tag, length and flags.
    fn qword_window(dsdt: &[u8]) -> Option<(u64, u64, u64)> {
        let at = dsdt
            .windows(4)
            .position(|w| w[0] == 0x8a && w[1] == 43 && w[2] == 0 && w[3] == 0)?;
        let field = |i: usize| {
            let start = at + 6 + 8 * i;
            u64::from_le_bytes(dsdt[start..start + 8].try_into().unwrap())
        };
        Some((field(1), field(2), field(4)))
    }

    #[test]
    fn pci_host_bridge_offers_the_64bit_window() {
        let with = bytes_of(&dsdt(&config(1)));
        assert_eq!(
            qword_window(&with),
            Some((0x1_0000_0000, 0xff_ffff_ffff, 0xff_0000_0000))
        );
        let mut without = config(1);
        without.pci = without.pci.map(|pci| PciHostBridge {
            mmio64: None,
            ..pci
        });
        assert_eq!(qword_window(&bytes_of(&dsdt(&without))), None);
    }

    #[test]
    fn intx_swizzle_covers_four_gsis() {
        assert_eq!(pci_intx_gsi(1, 1), 17);
        assert_eq!(pci_intx_gsi(1, 2), 18);
        assert_eq!(pci_intx_gsi(3, 1), 19);
        assert_eq!(pci_intx_gsi(4, 1), 16);
        assert_eq!(pci_intx_gsi(31, 4), 18);
        // A function without a pin (0) is treated as INTA: the register said none anyway.
        assert_eq!(pci_intx_gsi(1, 0), 17);
    }

    #[test]
    fn mcfg_points_at_ecam_for_bus_zero() {
        let (mem, rsdp) = written(1);
        let mcfg = tables(&mem, rsdp)
            .into_iter()
            .find(|t| &t[..4] == b"MCFG")
            .unwrap();
        assert!(checksum_ok(&mcfg));
        // Allocation entry after the 44-byte header: base, segment, start bus, end bus.
        assert_eq!(
            u64::from_le_bytes(mcfg[44..52].try_into().unwrap()),
            0xe000_0000
        );
        assert_eq!((mcfg[54], mcfg[55]), (0, 0));
    }

    #[test]
    fn too_many_cpus_do_not_overflow_the_area() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        assert!(write_tables(&mem, &config(255)).is_ok());
    }
}
