//! A passed-through device over fake VFIO regions, with its invariants as assertions: the
//! entry point of the `pci_config` fuzz target (feature `fuzzing`) and of the random unit
//! test in `tests.rs`.
//!
//! [`StrictRegions`] hold the model to [`VfioRegions`]' contract (every access inside its
//! region, else a panic); [`FuzzDevice::check`] asserts that no MSI-X vector is connected
//! unless the guest enabled MSI-X, left the function unmasked and unmasked the vector, and
//! that INTx is connected exactly while MSI-X is off.

use std::io;
use std::sync::{Arc, Mutex};

use super::{
    find_msix, probe_bars, IntxControl, MsixControl, MsixTable, VfioPciDevice, VfioRegions,
    MSIX_ENABLE, MSIX_FUNCTION_MASK, NUM_BARS,
};

/// Where the BARs are placed: from here up, each aligned to its size.
const BARS_BASE: u64 = 0xc000_0000;

/// Configuration space and BARs in memory, panicking on any access outside them.
pub struct StrictRegions {
    pub config: Mutex<Vec<u8>>,
    pub bars: Vec<Mutex<Vec<u8>>>,
}

impl StrictRegions {
    fn check(what: &str, len: usize, offset: u64, data_len: usize) -> usize {
        let at = usize::try_from(offset).expect("offset fits usize");
        assert!(
            at.checked_add(data_len).is_some_and(|end| end <= len),
            "{what} access of {data_len} bytes at {offset:#x} is outside its {len} bytes"
        );
        at
    }
}

impl VfioRegions for StrictRegions {
    fn config_size(&self) -> u64 {
        self.config.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config.lock().unwrap_or_else(|e| e.into_inner());
        let at = Self::check("config", config.len(), offset, data.len());
        data.copy_from_slice(&config[at..at + data.len()]);
    }

    fn write_config(&self, offset: u64, data: &[u8]) {
        let mut config = self.config.lock().unwrap_or_else(|e| e.into_inner());
        let at = Self::check("config", config.len(), offset, data.len());
        config[at..at + data.len()].copy_from_slice(data);
    }

    fn read_bar(&self, bar: usize, offset: u64, data: &mut [u8]) {
        let mem = self.bars[bar].lock().unwrap_or_else(|e| e.into_inner());
        let at = Self::check("BAR", mem.len(), offset, data.len());
        data.copy_from_slice(&mem[at..at + data.len()]);
    }

    fn write_bar(&self, bar: usize, offset: u64, data: &[u8]) {
        let mut mem = self.bars[bar].lock().unwrap_or_else(|e| e.into_inner());
        let at = Self::check("BAR", mem.len(), offset, data.len());
        mem[at..at + data.len()].copy_from_slice(data);
    }
}

/// The last INTx state the device asked for.
#[derive(Clone, Default)]
struct IntxState(Arc<Mutex<Option<bool>>>);

impl IntxControl for IntxState {
    fn set_enabled(&mut self, enabled: bool) -> io::Result<()> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(enabled);
        Ok(())
    }
}

/// Accepts every MSI-X call.
struct NoMsix;

impl MsixControl for NoMsix {
    fn set_enabled(&mut self, _enabled: bool) -> io::Result<()> {
        Ok(())
    }

    fn set_route(&mut self, _vector: u16, _addr: u64, _data: u32) -> io::Result<()> {
        Ok(())
    }

    fn set_connected(&mut self, _vector: u16, _connected: bool) -> io::Result<()> {
        Ok(())
    }
}

/// A device built from a fuzzer's configuration space and BAR sizes.
pub struct FuzzDevice {
    pub device: Arc<Mutex<VfioPciDevice>>,
    /// The BARs as placed: (index, guest address, size the guest sees).
    pub bars: Vec<(usize, u64, u64)>,
    intx: Option<IntxState>,
}

impl FuzzDevice {
    /// Probes `config` (256 or 4096 bytes) and BARs of `bar_sizes` as the VMM would, and
    /// builds the device; `None` if the VMM would refuse it.
    pub fn build(config: Vec<u8>, bar_sizes: [u64; NUM_BARS], with_intx: bool) -> Option<Self> {
        let regions = StrictRegions {
            config: Mutex::new(config),
            bars: bar_sizes
                .iter()
                .map(|s| Mutex::new(vec![0; *s as usize]))
                .collect(),
        };
        let (bars, _) = probe_bars(&regions, |i| bar_sizes[i]);
        let cap = find_msix(&regions);
        let mut next = BARS_BASE;
        let placed: Vec<_> = bars
            .iter()
            .map(|b| {
                let addr = next.next_multiple_of(b.size);
                next = addr + b.size;
                (*b, addr)
            })
            .collect();
        let msix = cap.map(|c| (c, MsixTable::new(c.vectors, Box::new(NoMsix))));
        let mut device =
            VfioPciDevice::new("fuzz".into(), Box::new(regions), &placed, msix).ok()?;
        let intx = with_intx.then(IntxState::default);
        if let Some(intx) = &intx {
            device.set_intx(Box::new(intx.clone()));
        }
        Some(Self {
            device: Arc::new(Mutex::new(device)),
            bars: placed
                .iter()
                .map(|(b, addr)| (b.index, *addr, b.size))
                .collect(),
            intx,
        })
    }

    /// Asserts the interrupt invariants of the module documentation.
    pub fn check(&self) {
        let device = self.device.lock().unwrap_or_else(|e| e.into_inner());
        let msix_on = device.msix_control & MSIX_ENABLE != 0;
        if let Some((cap, table)) = &device.msix {
            let delivering = msix_on && device.msix_control & MSIX_FUNCTION_MASK == 0;
            for vector in 0..usize::from(cap.vectors) {
                assert!(
                    !table.is_connected(vector) || delivering,
                    "vector {vector} connected while MSI-X is off or masked"
                );
            }
        }
        if let Some(intx) = &self.intx {
            let on = *intx.0.lock().unwrap_or_else(|e| e.into_inner());
            assert_eq!(
                on,
                Some(!msix_on),
                "INTx connected while MSI-X is on, or off while MSI-X is off"
            );
        }
    }
}
