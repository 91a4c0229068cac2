//! PCI Express extended configuration space (offsets 0x100..0x1000) of a passed-through
//! function: passed through as vfio-pci presents it, less the capabilities a guest must
//! not drive on a function it does not own whole. They are unlinked from the list, as
//! QEMU does.

use std::collections::HashMap;

use super::VfioRegions;

/// First byte of extended configuration space.
pub const EXTENDED_CONFIG_START: u64 = 0x100;
/// Bytes of a PCI Express function's configuration space.
pub const EXTENDED_CONFIG_END: u64 = 0x1000;

/// SR-IOV: VF Enable would create functions on the host.
const CAP_SRIOV: u16 = 0x10;
/// ARI: its next-function number names host functions the guest does not have.
const CAP_ARI: u16 = 0x0e;
/// Resizable BAR and VF Resizable BAR: a resize would not be followed by crib's mappings.
const CAP_RESIZABLE_BAR: u16 = 0x15;
const CAP_VF_RESIZABLE_BAR: u16 = 0x24;
const HIDDEN: [u16; 4] = [CAP_SRIOV, CAP_ARI, CAP_RESIZABLE_BAR, CAP_VF_RESIZABLE_BAR];

/// The guest's view of extended configuration space.
#[derive(Debug, Default)]
pub struct ExtendedConfig {
    /// Bytes of configuration space vfio-pci exposes (256 for a conventional function).
    size: u64,
    /// Capability headers rewritten to skip hidden capabilities, by dword offset.
    headers: HashMap<u64, u32>,
    /// `[start, end)` byte ranges of hidden capabilities; writes there are dropped.
    hidden: Vec<(u64, u64)>,
}

fn header_id(header: u32) -> u16 {
    header as u16
}

fn header_next(header: u32) -> u64 {
    u64::from(header >> 20) & !3
}

fn with_next(header: u32, next: u64) -> u32 {
    (header & 0x000f_ffff) | (next as u32) << 20
}

impl ExtendedConfig {
    /// Walks the device's extended capability list (`size` bytes of configuration space).
    /// A malformed list (a loop, a pointer below 0x100) ends the walk.
    pub fn probe(regions: &dyn VfioRegions, size: u64) -> Self {
        let size = size.min(EXTENDED_CONFIG_END);
        let mut config = Self {
            size,
            ..Self::default()
        };
        if size <= EXTENDED_CONFIG_START {
            return config;
        }
        let mut chain: Vec<(u64, u32)> = Vec::new();
        let mut offset = EXTENDED_CONFIG_START;
        while offset >= EXTENDED_CONFIG_START
            && offset + 4 <= size
            && !chain.iter().any(|(o, _)| *o == offset)
        {
            let mut bytes = [0u8; 4];
            regions.read_config(offset, &mut bytes);
            let header = u32::from_le_bytes(bytes);
            if header == 0 || header == u32::MAX {
                break;
            }
            chain.push((offset, header));
            offset = header_next(header);
        }

        let mut sorted: Vec<u64> = chain.iter().map(|(o, _)| *o).collect();
        sorted.sort_unstable();
        let extent = |start: u64| {
            let end = sorted.iter().find(|o| **o > start).copied().unwrap_or(size);
            (start, end)
        };
        let visible: Vec<u64> = chain
            .iter()
            .filter(|(_, h)| !HIDDEN.contains(&header_id(*h)))
            .map(|(o, _)| *o)
            .collect();
        if visible.len() == chain.len() {
            return config;
        }
        let next_visible = |after: usize| {
            chain[after + 1..]
                .iter()
                .find(|(o, _)| visible.contains(o))
                .map_or(0, |(o, _)| *o)
        };
        for (i, (offset, header)) in chain.iter().enumerate() {
            if visible.contains(offset) {
                config
                    .headers
                    .insert(*offset, with_next(*header, next_visible(i)));
            } else {
                config.hidden.push(extent(*offset));
                // The list must start at 0x100: a hidden first capability becomes an
                // empty one (ID 0, version 0) that links to the next visible one.
                let next = next_visible(i);
                let placeholder = if next == 0 { 0 } else { with_next(0, next) };
                config.headers.insert(*offset, placeholder);
            }
        }
        config
    }

    /// Reads dword `reg` (64..1024); what the device does not have reads zero.
    pub fn read(&self, regions: &dyn VfioRegions, reg: usize) -> u32 {
        let offset = reg as u64 * 4;
        if offset < EXTENDED_CONFIG_START || offset + 4 > self.size {
            return 0;
        }
        if let Some(header) = self.headers.get(&offset) {
            return *header;
        }
        let mut bytes = [0u8; 4];
        regions.read_config(offset, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    /// Writes `data` at `offset` within dword `reg`; vfio-pci filters what reaches the
    /// device. Writes to capability headers and hidden capabilities are dropped.
    pub fn write(&self, regions: &dyn VfioRegions, reg: usize, offset: u64, data: &[u8]) {
        let start = reg as u64 * 4;
        let at = start + offset;
        if start < EXTENDED_CONFIG_START
            || offset + data.len() as u64 > 4
            || at + data.len() as u64 > self.size
            || self.headers.contains_key(&start)
            || self.hidden.iter().any(|(s, e)| at >= *s && at < *e)
        {
            return;
        }
        regions.write_config(at, data);
    }
}
