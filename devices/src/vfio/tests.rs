use std::sync::{Arc, Mutex};

use super::fuzzing::FuzzDevice;
use super::*;

/// A device: 256 bytes of configuration space and a 16 KiB BAR 0 (64-bit), with MSI-X
/// (4 vectors) whose table is at 0x2000 and PBA at 0x3000 of BAR 0, as QEMU's NVMe has.
#[derive(Clone)]
struct FakeDevice {
    config: Arc<Mutex<Vec<u8>>>,
    bar0: Arc<Mutex<Vec<u8>>>,
}

impl FakeDevice {
    fn new() -> Self {
        let mut config = vec![0u8; 256];
        config[0..4].copy_from_slice(&0x0010_1b36u32.to_le_bytes());
        config[6] = 0x10; // status: capability list
        config[0x10..0x14].copy_from_slice(&0xfebf_0004u32.to_le_bytes()); // 64-bit mem
        config[0x3d] = 1; // INTA
        config[0x34] = 0x40;
        // A power-management capability, then MSI-X.
        config[0x40] = 0x01;
        config[0x41] = 0x80;
        config[0x80] = MSIX_CAPABILITY_ID;
        config[0x82..0x84].copy_from_slice(&3u16.to_le_bytes());
        config[0x84..0x88].copy_from_slice(&0x2000u32.to_le_bytes());
        config[0x88..0x8c].copy_from_slice(&0x3000u32.to_le_bytes());
        Self {
            config: Arc::new(Mutex::new(config)),
            bar0: Arc::new(Mutex::new(vec![0; 0x4000])),
        }
    }
}

impl VfioRegions for FakeDevice {
    fn config_size(&self) -> u64 {
        self.config.lock().unwrap().len() as u64
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config.lock().unwrap();
        let o = offset as usize;
        data.copy_from_slice(&config[o..o + data.len()]);
    }

    fn write_config(&self, offset: u64, data: &[u8]) {
        let mut config = self.config.lock().unwrap();
        for (i, byte) in data.iter().enumerate() {
            let at = offset as usize + i;
            // As vfio-pci: MSI-X message control is read-only to the user.
            if at != 0x82 && at != 0x83 {
                config[at] = *byte;
            }
        }
    }

    fn read_bar(&self, bar: usize, offset: u64, data: &mut [u8]) {
        assert_eq!(bar, 0);
        let mem = self.bar0.lock().unwrap();
        let o = offset as usize;
        data.copy_from_slice(&mem[o..o + data.len()]);
    }

    fn write_bar(&self, bar: usize, offset: u64, data: &[u8]) {
        assert_eq!(bar, 0);
        let mut mem = self.bar0.lock().unwrap();
        let o = offset as usize;
        mem[o..o + data.len()].copy_from_slice(data);
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Call {
    Enabled(bool),
    Route(u16, u64, u32),
    Connected(u16, bool),
    Intx(bool),
}

#[derive(Clone, Default)]
struct FakeControl {
    calls: Arc<Mutex<Vec<Call>>>,
}

impl MsixControl for FakeControl {
    fn set_enabled(&mut self, enabled: bool) -> io::Result<()> {
        self.calls.lock().unwrap().push(Call::Enabled(enabled));
        Ok(())
    }

    fn set_route(&mut self, vector: u16, addr: u64, data: u32) -> io::Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push(Call::Route(vector, addr, data));
        Ok(())
    }

    fn set_connected(&mut self, vector: u16, connected: bool) -> io::Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push(Call::Connected(vector, connected));
        Ok(())
    }
}

impl IntxControl for FakeControl {
    fn set_enabled(&mut self, enabled: bool) -> io::Result<()> {
        self.calls.lock().unwrap().push(Call::Intx(enabled));
        Ok(())
    }
}

const BAR_ADDR: u64 = 0xc000_0000;

fn setup() -> (VfioPciDevice, FakeDevice, FakeControl) {
    let fake = FakeDevice::new();
    let control = FakeControl::default();
    let (bars, io) = probe_bars(&fake, |i| if i == 0 { 0x4000 } else { 0 });
    assert!(io.is_empty());
    let cap = find_msix(&fake).unwrap();
    let table = MsixTable::new(cap.vectors, Box::new(control.clone()));
    let placed: Vec<_> = bars.iter().map(|b| (*b, BAR_ADDR)).collect();
    let device = VfioPciDevice::new(
        "test".into(),
        Box::new(fake.clone()),
        &placed,
        Some((cap, table)),
    )
    .unwrap();
    (device, fake, control)
}

#[test]
fn bars_are_probed_from_register_and_region() {
    let fake = FakeDevice::new();
    let (bars, _) = probe_bars(&fake, |i| if i == 0 { 0x3000 } else { 0 });
    assert_eq!(
        bars,
        vec![DeviceBar {
            index: 0,
            region_size: 0x3000,
            size: 0x4000,
            is_64bit: true,
            prefetchable: false,
        }]
    );
}

#[test]
fn io_bars_are_skipped() {
    let fake = FakeDevice::new();
    fake.write_config(0x18, &0xc001u32.to_le_bytes());
    let (bars, io) = probe_bars(&fake, |i| match i {
        0 => 0x4000,
        2 => 0x20,
        _ => 0,
    });
    assert_eq!(bars.len(), 1);
    assert_eq!(io, vec![2]);
}

#[test]
fn msix_capability_is_found_behind_another() {
    let fake = FakeDevice::new();
    let cap = find_msix(&fake).unwrap();
    assert_eq!(
        cap,
        MsixCapability {
            offset: 0x80,
            vectors: 4,
            table_bar: 0,
            table_offset: 0x2000,
            pba_bar: 0,
            pba_offset: 0x3000,
        }
    );
    assert_eq!(cap.trapped_pages(0, 0x1000), vec![(0x2000, 0x2000)]);
    assert!(cap.trapped_pages(1, 0x1000).is_empty());
}

#[test]
fn capability_loop_ends_the_walk() {
    let fake = FakeDevice::new();
    fake.write_config(0x41, &[0x40]);
    fake.write_config(0x34, &[0x40]);
    assert_eq!(find_msix(&fake), None);
}

#[test]
fn bar_is_virtualized_sized_and_relocated() {
    let (mut device, fake, _) = setup();
    assert_eq!(device.read_config_register(4), BAR_ADDR as u32 | 0x4);
    device.write_config_register(4, 0, &[0xff; 4]);
    device.write_config_register(5, 0, &[0xff; 4]);
    assert_eq!(device.read_config_register(4), 0xffff_c004);
    assert_eq!(device.read_config_register(5), 0xffff_ffff);
    device.write_config_register(4, 0, &(BAR_ADDR as u32).to_le_bytes());
    assert_eq!(
        device.write_config_register(5, 0, &0u32.to_le_bytes()),
        None
    );
    let moved = device.write_config_register(4, 0, &0xd000_0000u32.to_le_bytes());
    assert_eq!(moved.map(|m| (m.old, m.new)), Some((BAR_ADDR, 0xd000_0000)));
    // The device's own BAR register never sees guest addresses.
    let mut real = [0u8; 4];
    fake.read_config(0x10, &mut real);
    assert_eq!(u32::from_le_bytes(real), 0xfebf_0004);
}

#[test]
fn rom_and_intx_are_hidden_and_command_passes_through() {
    let (mut device, fake, _) = setup();
    assert_eq!(device.read_config_register(12), 0);
    assert_eq!(device.read_config_register(15) & 0xff00, 0);
    device.write_config_register(1, 0, &0x0006u16.to_le_bytes());
    let mut command = [0u8; 2];
    fake.read_config(4, &mut command);
    assert_eq!(u16::from_le_bytes(command), 6);
    assert_eq!(device.read_config_register(0), 0x0010_1b36);
}

#[test]
fn bar_accesses_outside_the_table_reach_the_device() {
    let (mut device, fake, _) = setup();
    device.write_bar(0, 0x14, &0x0046_0001u32.to_le_bytes());
    let mut data = [0u8; 4];
    fake.read_bar(0, 0x14, &mut data);
    assert_eq!(u32::from_le_bytes(data), 0x0046_0001);
    // Past the region (the guest BAR is rounded up): all ones, nothing reaches the device.
    let mut past = [0u8; 4];
    device.read_bar(0, 0x4000, &mut past);
    assert_eq!(past, [0xff; 4]);
}

fn program(device: &mut VfioPciDevice, vector: u64, masked: bool) {
    let base = 0x2000 + vector * 16;
    device.write_bar(0, base, &0xfee0_0000u32.to_le_bytes());
    device.write_bar(0, base + 4, &0u32.to_le_bytes());
    device.write_bar(0, base + 8, &(0x30 + vector as u32).to_le_bytes());
    device.write_bar(0, base + 12, &u32::from(masked).to_le_bytes());
}

fn message_control(device: &mut VfioPciDevice, value: u16) {
    device.write_config_register(0x80 / 4, 2, &value.to_le_bytes());
}

#[test]
fn msix_table_writes_become_routes_and_connected_irqfds() {
    let (mut device, fake, control) = setup();
    // Linux: enable with the function masked, program, then unmask the function.
    message_control(&mut device, MSIX_ENABLE | MSIX_FUNCTION_MASK);
    program(&mut device, 1, false);
    message_control(&mut device, MSIX_ENABLE);
    assert_eq!(
        *control.calls.lock().unwrap(),
        vec![
            Call::Enabled(true),
            Call::Route(1, 0xfee0_0000, 0x31),
            Call::Connected(1, true),
        ]
    );
    // The table is emulated: the device's own BAR memory is untouched.
    let mut data = [0u8; 4];
    fake.read_bar(0, 0x2010, &mut data);
    assert_eq!(data, [0; 4]);
    let mut back = [0u8; 4];
    device.read_bar(0, 0x2018, &mut back);
    assert_eq!(u32::from_le_bytes(back), 0x31);
}

#[test]
fn msix_control_bits_read_back_as_the_guest_wrote_them() {
    let (mut device, _, _) = setup();
    message_control(&mut device, MSIX_ENABLE | MSIX_FUNCTION_MASK);
    // Table size (3, read from the device) with the emulated enable and mask bits.
    assert_eq!(device.read_config_register(0x80 / 4) >> 16, 0xc003);
    // A byte write of the high half alone works too.
    device.write_config_register(0x80 / 4, 3, &[0x80]);
    assert_eq!(device.read_config_register(0x80 / 4) >> 16, 0x8003);
}

#[test]
fn masking_disconnects_and_unmasking_reconnects() {
    let (mut device, _, control) = setup();
    message_control(&mut device, MSIX_ENABLE);
    program(&mut device, 0, false);
    device.write_bar(0, 0x200c, &1u32.to_le_bytes());
    device.write_bar(0, 0x200c, &0u32.to_le_bytes());
    let calls = control.calls.lock().unwrap();
    assert_eq!(
        calls[calls.len() - 2..],
        [Call::Connected(0, false), Call::Connected(0, true)]
    );
    // The route was programmed once: unmasking with the same message does not redo it.
    assert_eq!(
        calls
            .iter()
            .filter(|c| matches!(c, Call::Route(..)))
            .count(),
        1
    );
}

#[test]
fn disabling_msix_disconnects_before_disabling() {
    let (mut device, _, control) = setup();
    message_control(&mut device, MSIX_ENABLE);
    program(&mut device, 2, false);
    message_control(&mut device, 0);
    let calls = control.calls.lock().unwrap();
    assert_eq!(
        calls[calls.len() - 2..],
        [Call::Connected(2, false), Call::Enabled(false)]
    );
}

#[test]
fn intx_pin_shows_and_the_line_yields_to_msix() {
    let (mut device, _, control) = setup();
    device.set_intx(Box::new(control.clone()));
    // The fake's pin is INTA.
    assert_eq!(device.read_config_register(15) >> 8 & 0xff, 1);
    message_control(&mut device, MSIX_ENABLE | MSIX_FUNCTION_MASK);
    // Masking the function keeps MSI-X on: INTx stays off.
    message_control(&mut device, MSIX_ENABLE);
    message_control(&mut device, 0);
    let calls = control.calls.lock().unwrap();
    let order: Vec<&Call> = calls
        .iter()
        .filter(|c| matches!(c, Call::Intx(_) | Call::Enabled(_)))
        .collect();
    assert_eq!(
        order,
        [
            &Call::Intx(true),
            &Call::Intx(false),
            &Call::Enabled(true),
            &Call::Enabled(false),
            &Call::Intx(true)
        ]
    );
}

#[test]
fn bad_table_accesses_are_ignored() {
    let (mut device, _, control) = setup();
    message_control(&mut device, MSIX_ENABLE);
    device.write_bar(0, 0x2003, &[0xff; 4]);
    device.write_bar(0, 0x3000, &[0xff; 4]);
    let mut data = [0xaa; 4];
    device.read_bar(0, 0x2001, &mut data);
    assert_eq!(data, [0; 4]);
    assert_eq!(*control.calls.lock().unwrap(), vec![Call::Enabled(true)]);
}

#[test]
fn msix_table_in_an_unmapped_bar_is_refused() {
    let fake = FakeDevice::new();
    let cap = MsixCapability {
        table_bar: 2,
        ..find_msix(&fake).unwrap()
    };
    let table = MsixTable::new(cap.vectors, Box::new(FakeControl::default()));
    let (bars, _) = probe_bars(&fake, |i| if i == 0 { 0x4000 } else { 0 });
    let placed: Vec<_> = bars.iter().map(|b| (*b, BAR_ADDR)).collect();
    let err = VfioPciDevice::new("t".into(), Box::new(fake), &placed, Some((cap, table)))
        .err()
        .unwrap();
    assert!(matches!(err, VfioPciError::MsixBar { bar: 2 }));
}

/// PCI Express extended capability header: `id`, version 1, `next`.
fn ext_header(id: u16, next: u64) -> u32 {
    u32::from(id) | 1 << 16 | (next as u32) << 20
}

/// The fake device grown to 4 KiB of configuration space with extended capabilities
/// `(offset, id, next)`.
fn pcie_device(caps: &[(u64, u16, u64)]) -> VfioPciDevice {
    let fake = FakeDevice::new();
    {
        let mut config = fake.config.lock().unwrap();
        config.resize(4096, 0);
        for (offset, id, next) in caps {
            let at = *offset as usize;
            config[at..at + 4].copy_from_slice(&ext_header(*id, *next).to_le_bytes());
            // A recognisable body dword.
            config[at + 4..at + 8].copy_from_slice(&(0xb0d0_0000 | *id as u32).to_le_bytes());
        }
    }
    let (bars, _) = probe_bars(&fake, |i| if i == 0 { 0x4000 } else { 0 });
    let placed: Vec<_> = bars.iter().map(|b| (*b, BAR_ADDR)).collect();
    VfioPciDevice::new("test".into(), Box::new(fake), &placed, None).unwrap()
}

/// The extended capability list as the guest walks it: (offset, id).
fn guest_ext_caps(device: &mut VfioPciDevice) -> Vec<(u64, u16)> {
    let mut caps = Vec::new();
    let mut offset = 0x100u64;
    while offset != 0 && caps.len() < 64 {
        let header = device.read_extended_config_register(offset as usize / 4);
        if header == 0 {
            break;
        }
        caps.push((offset, header as u16));
        offset = u64::from(header >> 20) & !3;
    }
    caps
}

const AER: u16 = 0x01;
const DSN: u16 = 0x03;
const ARI: u16 = 0x0e;
const SRIOV: u16 = 0x10;

#[test]
fn extended_capabilities_pass_through() {
    let mut device = pcie_device(&[(0x100, AER, 0x148), (0x148, DSN, 0)]);
    assert_eq!(
        guest_ext_caps(&mut device),
        vec![(0x100, AER), (0x148, DSN)]
    );
    assert_eq!(device.read_extended_config_register(0x104 / 4), 0xb0d0_0001);
    // Past the list: the device's own (zero) bytes; past 4 KiB: nothing.
    assert_eq!(device.read_extended_config_register(0x800 / 4), 0);
    assert_eq!(device.read_extended_config_register(1024), 0);
}

#[test]
fn sriov_and_ari_are_unlinked() {
    let mut device = pcie_device(&[
        (0x100, AER, 0x148),
        (0x148, SRIOV, 0x188),
        (0x188, ARI, 0x198),
        (0x198, DSN, 0),
    ]);
    assert_eq!(
        guest_ext_caps(&mut device),
        vec![(0x100, AER), (0x198, DSN)]
    );
}

#[test]
fn a_hidden_first_capability_leaves_an_empty_header_that_links_on() {
    let mut device = pcie_device(&[(0x100, SRIOV, 0x140), (0x140, AER, 0)]);
    assert_eq!(guest_ext_caps(&mut device), vec![(0x100, 0), (0x140, AER)]);
    // Hidden and alone: the list is empty.
    let mut device = pcie_device(&[(0x100, SRIOV, 0)]);
    assert_eq!(device.read_extended_config_register(0x100 / 4), 0);
}

#[test]
fn extended_writes_reach_visible_capabilities_only() {
    let fake = FakeDevice::new();
    {
        let mut config = fake.config.lock().unwrap();
        config.resize(4096, 0);
        config[0x100..0x104].copy_from_slice(&ext_header(AER, 0x148).to_le_bytes());
        config[0x148..0x14c].copy_from_slice(&ext_header(SRIOV, 0).to_le_bytes());
    }
    let mut device = VfioPciDevice::new("test".into(), Box::new(fake.clone()), &[], None).unwrap();
    device.write_extended_config_register(0x108 / 4, 0, &0x1111u32.to_le_bytes());
    device.write_extended_config_register(0x150 / 4, 0, &0x2222u32.to_le_bytes());
    // A header, a write across dwords and one past the end are dropped as well.
    device.write_extended_config_register(0x100 / 4, 0, &0u32.to_le_bytes());
    device.write_extended_config_register(0x10c / 4, 2, &0x3333u32.to_le_bytes());
    device.write_extended_config_register(1024, 0, &[1]);
    let config = fake.config.lock().unwrap();
    assert_eq!(&config[0x108..0x10c], &0x1111u32.to_le_bytes());
    assert_eq!(&config[0x150..0x154], &[0; 4]);
    assert_eq!(&config[0x100..0x104], &ext_header(AER, 0x148).to_le_bytes());
    assert_eq!(&config[0x10c..0x110], &[0; 4]);
}

#[test]
fn a_looping_or_short_extended_list_is_harmless() {
    let mut device = pcie_device(&[(0x100, AER, 0x140), (0x140, SRIOV, 0x100)]);
    assert_eq!(guest_ext_caps(&mut device), vec![(0x100, AER)]);
    // A conventional function (256 bytes) has no extended space.
    let fake = FakeDevice::new();
    let mut device = VfioPciDevice::new("test".into(), Box::new(fake), &[], None).unwrap();
    assert_eq!(device.read_extended_config_register(64), 0);
    device.write_extended_config_register(64, 0, &[1, 2, 3, 4]);
}

/// Records the waits and answers with `mapped`.
struct FakeDma {
    mapped: bool,
    waits: Mutex<u32>,
}

impl DmaReadiness for FakeDma {
    fn wait_mapped(&self) -> bool {
        *self.waits.lock().unwrap() += 1;
        self.mapped
    }
}

fn command(fake: &FakeDevice) -> u16 {
    let config = fake.config.lock().unwrap();
    u16::from_le_bytes([config[4], config[5]])
}

#[test]
fn bus_master_enable_waits_for_the_dma_map() {
    let (mut device, fake, _) = setup();
    let dma = Arc::new(FakeDma {
        mapped: true,
        waits: Mutex::new(0),
    });
    device.set_dma_readiness(dma.clone());
    // Memory space alone does not wait.
    device.write_config_register(1, 0, &[0x02, 0]);
    assert_eq!(*dma.waits.lock().unwrap(), 0);
    device.write_config_register(1, 0, &[0x06, 0]);
    assert_eq!(*dma.waits.lock().unwrap(), 1);
    assert_eq!(command(&fake), 0x06);
}

#[test]
fn bus_master_stays_off_when_the_dma_map_failed() {
    let (mut device, fake, _) = setup();
    device.set_dma_readiness(Arc::new(FakeDma {
        mapped: false,
        waits: Mutex::new(0),
    }));
    device.write_config_register(1, 0, &0x0000_0006u32.to_le_bytes());
    assert_eq!(command(&fake), 0x02);
}

/// xorshift64*: a fixed-seed stream, so the randomized test below is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Random configuration spaces (garbage capability lists, loops, pointers off the end) and
/// random guest accesses of every size to config space, extended space and BARs: the
/// model never panics, never steps outside a VFIO region, and never connects an MSI-X
/// vector the guest has not enabled and unmasked.
#[test]
fn random_devices_and_guest_accesses_stay_in_bounds() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut devices_built = 0;
    for _ in 0..300 {
        let config_len = rng.pick(&[256usize, 4096]);
        let mut config: Vec<u8> = (0..config_len).map(|_| rng.next() as u8).collect();
        // Often a plausible header, so that BARs and MSI-X get built.
        if rng.below(2) == 0 {
            config[6] |= 0x10;
            config[0x10..0x14].copy_from_slice(&0x0000_0004u32.to_le_bytes());
            let msix = rng.pick(&[0x40usize, 0x80, 0xf4, 0xf8, 0xfc]);
            config[0x34] = msix as u8;
            config[msix] = MSIX_CAPABILITY_ID;
            if msix + 12 <= 256 {
                let table = rng.pick(&[0x0u32, 0x2000, 0x3ff8, 0x8000]);
                config[msix + 4..msix + 8].copy_from_slice(&table.to_le_bytes());
                config[msix + 8..msix + 12].copy_from_slice(&0x3000u32.to_le_bytes());
            }
        }
        let mut sizes = [0u64; NUM_BARS];
        for size in &mut sizes {
            *size = rng.pick(&[0u64, 0x20, 0x1000, 0x3000, 0x4000, 0x10000]);
        }
        let Some(fuzz) = FuzzDevice::build(config, sizes, rng.below(2) == 0) else {
            continue;
        };
        devices_built += 1;
        for _ in 0..400 {
            let len = rng.pick(&[1usize, 2, 3, 4, 8]);
            let mut data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let offset = rng.below(8);
            let mut device = fuzz.device.lock().unwrap();
            match rng.below(5) {
                0 => {
                    device.read_config_register(rng.below(80) as usize);
                }
                1 => {
                    // Often the MSI-X control word and the command register.
                    let reg = rng.pick(&[1usize, 4, 5, 12, 15, 0x20, 0x21, 0x3f, 0x40]);
                    device.write_config_register(reg, offset, &data);
                }
                2 => {
                    let reg = 64 + rng.below(1000) as usize;
                    if rng.below(2) == 0 {
                        device.read_extended_config_register(reg);
                    } else {
                        device.write_extended_config_register(reg, offset, &data);
                    }
                }
                _ => {
                    let bar = rng.below(NUM_BARS as u64) as usize;
                    let at = rng.pick(&[0u64, 0x8, 0x2000, 0x200c, 0x3000, 0x3ffc, 0xfffc])
                        + rng.below(16);
                    if rng.below(2) == 0 {
                        device.read_bar(bar, at, &mut data);
                    } else {
                        device.write_bar(bar, at, &data);
                    }
                }
            }
        }
        fuzz.check();
    }
    assert!(devices_built > 50, "only {devices_built} devices built");
}
