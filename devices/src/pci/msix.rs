//! MSI-X (PCI Local Bus 3.0 §6.8.2): the capability, the vector table and the pending-bit
//! array, emulated. Each vector is a KVM GSI with an irqfd: the guest's table writes become
//! MSI routes (through [`MsiRouting`], implemented by the VMM), and a device raising a
//! vector writes its irqfd from its own thread, with no lock and no VMM hop. A masked
//! vector latches its pending bit and fires when unmasked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Bytes per table entry: address low/high, data, vector control.
pub const MSIX_TABLE_ENTRY_BYTES: u64 = 16;
/// Capability id of MSI-X.
pub const MSIX_CAPABILITY_ID: u8 = 0x11;
const VECTOR_CONTROL_MASK: u32 = 1;
const MSG_CTL_ENABLE: u16 = 1 << 15;
const MSG_CTL_FUNCTION_MASK: u16 = 1 << 14;

/// Programs KVM's interrupt routing; implemented by the VMM.
pub trait MsiRouting: Send + Sync {
    /// Routes `gsi` to the MSI message (`addr`, `data`).
    fn set_msi_route(&self, gsi: u32, addr: u64, data: u32) -> std::io::Result<()>;
}

/// One vector's delivery state, shared with device threads.
#[derive(Debug)]
struct Vector {
    irqfd: EventFd,
    masked: AtomicBool,
    pending: AtomicBool,
}

/// The delivery side of MSI-X: what a device thread needs to raise a vector.
#[derive(Debug)]
pub struct MsixVectors {
    vectors: Vec<Vector>,
    enabled: AtomicBool,
    function_masked: AtomicBool,
}

impl MsixVectors {
    /// Vectors backed by `irqfds` (each registered with KVM for its GSI by the VMM). All
    /// start masked, as after reset.
    pub fn new(irqfds: Vec<EventFd>) -> Self {
        let vectors = irqfds
            .into_iter()
            .map(|irqfd| Vector {
                irqfd,
                masked: AtomicBool::new(true),
                pending: AtomicBool::new(false),
            })
            .collect();
        Self {
            vectors,
            enabled: AtomicBool::new(false),
            function_masked: AtomicBool::new(false),
        }
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// Raises `vector`: fires its irqfd, or latches it pending while masked. A vector
    /// number the device does not have is ignored (the guest chose it).
    pub fn trigger(&self, vector: u16) -> std::io::Result<()> {
        let Some(v) = self.vectors.get(usize::from(vector)) else {
            return Ok(());
        };
        if !self.enabled.load(Ordering::Acquire) {
            return Ok(());
        }
        if v.masked.load(Ordering::SeqCst) || self.function_masked.load(Ordering::SeqCst) {
            // Latch, then re-check: an unmask may have run meanwhile. SeqCst on both sides
            // (here, at the unmask and in `deliver_pending`): with release/acquire the latch could still sit in
            // this CPU's store buffer when the unmasking vCPU looks at it, while this
            // re-check reads the old mask, and the interrupt would wait for the next one.
            v.pending.store(true, Ordering::SeqCst);
            if v.masked.load(Ordering::SeqCst) || self.function_masked.load(Ordering::SeqCst) {
                return Ok(());
            }
            // Unmasked meanwhile: deliver it here unless the unmasking side already did.
            if !v.pending.swap(false, Ordering::SeqCst) {
                return Ok(());
            }
        }
        v.irqfd.write(1)
    }

    /// A clone of `vector`'s irqfd, for a process that raises the vector directly (a
    /// vhost-user backend's call fd). Writes to it skip masking and the PBA.
    pub fn irqfd(&self, vector: u16) -> Option<EventFd> {
        let v = self.vectors.get(usize::from(vector))?;
        match v.irqfd.try_clone() {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!("cannot clone the irqfd of MSI-X vector {vector}: {e}");
                None
            }
        }
    }

    fn deliver_pending(&self, index: usize) {
        let Some(v) = self.vectors.get(index) else {
            return;
        };
        let deliverable = self.enabled.load(Ordering::SeqCst)
            && !self.function_masked.load(Ordering::SeqCst)
            && !v.masked.load(Ordering::SeqCst);
        if deliverable && v.pending.swap(false, Ordering::SeqCst) {
            if let Err(e) = v.irqfd.write(1) {
                tracing::warn!("cannot deliver pending MSI-X vector {index}: {e}");
            }
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct TableEntry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

/// The emulated MSI-X table, PBA and capability state of one function.
pub struct MsixConfig {
    table: Vec<TableEntry>,
    /// The route last given to KVM per vector, to skip redundant updates.
    routed: Vec<Option<(u64, u32)>>,
    gsis: Vec<u32>,
    vectors: Arc<MsixVectors>,
    router: Arc<dyn MsiRouting>,
}

impl MsixConfig {
    /// `gsis[i]` is the GSI whose irqfd backs vector i in `vectors`.
    pub fn new(vectors: Arc<MsixVectors>, gsis: Vec<u32>, router: Arc<dyn MsiRouting>) -> Self {
        let count = vectors.len();
        let table = vec![
            TableEntry {
                control: VECTOR_CONTROL_MASK,
                ..Default::default()
            };
            count
        ];
        Self {
            table,
            routed: vec![None; count],
            gsis,
            vectors,
            router,
        }
    }

    /// The shared delivery state, for device threads.
    pub fn vectors(&self) -> Arc<MsixVectors> {
        self.vectors.clone()
    }

    /// The capability body (12 bytes): id, next, message control, table and PBA
    /// offset/BIR. `table_offset` and `pba_offset` are within BAR `bir`.
    pub fn capability(&self, bir: u8, table_offset: u32, pba_offset: u32) -> ([u8; 12], [u8; 12]) {
        let table_size = u16::try_from(self.table.len().saturating_sub(1)).unwrap_or(0x7ff) & 0x7ff;
        let mut body = [0u8; 12];
        body[0] = MSIX_CAPABILITY_ID;
        body[2..4].copy_from_slice(&table_size.to_le_bytes());
        body[4..8].copy_from_slice(&(table_offset | u32::from(bir)).to_le_bytes());
        body[8..12].copy_from_slice(&(pba_offset | u32::from(bir)).to_le_bytes());
        // Only the enable and function-mask bits of message control are writable.
        let mut writable = [0u8; 12];
        writable[3] = 0xc0;
        (body, writable)
    }

    /// Applies the message control word the guest wrote to the capability.
    pub fn set_message_control(&mut self, control: u16) {
        let enabled = control & MSG_CTL_ENABLE != 0;
        let masked = control & MSG_CTL_FUNCTION_MASK != 0;
        self.vectors.enabled.store(enabled, Ordering::SeqCst);
        self.vectors.function_masked.store(masked, Ordering::SeqCst);
        if enabled && !masked {
            for index in 0..self.table.len() {
                self.vectors.deliver_pending(index);
            }
        }
    }

    /// Reads the table at `offset` (1 to 8 bytes within one entry).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((index, field)) = self.locate(offset, data.len()) else {
            return;
        };
        let entry = self.table[index];
        let words = [entry.addr_lo, entry.addr_hi, entry.data, entry.control];
        let mut bytes = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        data.copy_from_slice(&bytes[field..field + data.len()]);
    }

    /// Writes the table at `offset`; pushes the route and delivers pending interrupts as
    /// the entry becomes usable.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some((index, field)) = self.locate(offset, data.len()) else {
            return;
        };
        let entry = &mut self.table[index];
        let mut bytes = [0u8; 16];
        for (i, w) in [entry.addr_lo, entry.addr_hi, entry.data, entry.control]
            .iter()
            .enumerate()
        {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        bytes[field..field + data.len()].copy_from_slice(data);
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        *entry = TableEntry {
            addr_lo: word(0),
            addr_hi: word(4),
            data: word(8),
            control: word(12),
        };
        let entry = *entry;
        let masked = entry.control & VECTOR_CONTROL_MASK != 0;
        if !masked {
            self.update_route(index, entry);
        }
        if let Some(v) = self.vectors.vectors.get(index) {
            v.masked.store(masked, Ordering::SeqCst);
        }
        if !masked {
            self.vectors.deliver_pending(index);
        }
    }

    fn update_route(&mut self, index: usize, entry: TableEntry) {
        let route = (
            u64::from(entry.addr_hi) << 32 | u64::from(entry.addr_lo),
            entry.data,
        );
        if self.routed[index] == Some(route) {
            return;
        }
        let Some(&gsi) = self.gsis.get(index) else {
            return;
        };
        match self.router.set_msi_route(gsi, route.0, route.1) {
            Ok(()) => self.routed[index] = Some(route),
            Err(e) => tracing::error!("cannot route MSI-X vector {index} (GSI {gsi}): {e}"),
        }
    }

    /// Reads the pending-bit array.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let mut value = 0u8;
            for bit in 0..8 {
                let vector = (offset as usize + i) * 8 + bit;
                if self
                    .vectors
                    .vectors
                    .get(vector)
                    .is_some_and(|v| v.pending.load(Ordering::Acquire))
                {
                    value |= 1 << bit;
                }
            }
            *byte = value;
        }
    }

    /// Entry index and byte offset within it, for an access that stays in one entry and
    /// is 1, 2, 4 or 8 bytes wide (8 only at the entry's start or middle).
    fn locate(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        let index = usize::try_from(offset / MSIX_TABLE_ENTRY_BYTES).ok()?;
        let field = (offset % MSIX_TABLE_ENTRY_BYTES) as usize;
        let aligned =
            matches!(len, 1 | 2 | 4 | 8) && field.is_multiple_of(len.min(4)) && field + len <= 16;
        (index < self.table.len() && aligned).then_some((index, field))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records the routes the VMM would program.
    #[derive(Default)]
    struct RecordingRouter {
        routes: Mutex<Vec<(u32, u64, u32)>>,
    }

    impl MsiRouting for RecordingRouter {
        fn set_msi_route(&self, gsi: u32, addr: u64, data: u32) -> std::io::Result<()> {
            self.routes.lock().unwrap().push((gsi, addr, data));
            Ok(())
        }
    }

    fn setup(count: usize) -> (MsixConfig, Arc<RecordingRouter>, Vec<EventFd>) {
        let fds: Vec<EventFd> = (0..count)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let clones = fds.iter().map(|f| f.try_clone().unwrap()).collect();
        let router = Arc::new(RecordingRouter::default());
        let gsis = (0..count as u32).map(|i| 24 + i).collect();
        let msix = MsixConfig::new(Arc::new(MsixVectors::new(clones)), gsis, router.clone());
        (msix, router, fds)
    }

    fn program(msix: &mut MsixConfig, vector: u64, masked: bool) {
        let base = vector * 16;
        msix.write_table(base, &0xfee0_0000u32.to_le_bytes());
        msix.write_table(base + 4, &0u32.to_le_bytes());
        msix.write_table(base + 8, &(0x40 + vector as u32).to_le_bytes());
        msix.write_table(base + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn unmasked_entry_is_routed_once() {
        let (mut msix, router, _) = setup(2);
        program(&mut msix, 1, false);
        program(&mut msix, 1, false);
        assert_eq!(
            *router.routes.lock().unwrap(),
            vec![(25, 0xfee0_0000, 0x41)]
        );
    }

    #[test]
    fn trigger_fires_irqfd_when_enabled_and_unmasked() {
        let (mut msix, _, fds) = setup(1);
        program(&mut msix, 0, false);
        msix.set_message_control(MSG_CTL_ENABLE);
        msix.vectors().trigger(0).unwrap();
        assert_eq!(fds[0].read().unwrap(), 1);
    }

    #[test]
    fn masked_vector_latches_pending_and_fires_on_unmask() {
        let (mut msix, _, fds) = setup(1);
        program(&mut msix, 0, true);
        msix.set_message_control(MSG_CTL_ENABLE);
        msix.vectors().trigger(0).unwrap();
        assert!(fds[0].read().is_err(), "nothing delivered while masked");
        let mut pba = [0u8; 1];
        msix.read_pba(0, &mut pba);
        assert_eq!(pba, [1]);
        msix.write_table(12, &0u32.to_le_bytes());
        assert_eq!(fds[0].read().unwrap(), 1);
        msix.read_pba(0, &mut pba);
        assert_eq!(pba, [0]);
    }

    #[test]
    fn function_mask_holds_all_vectors() {
        let (mut msix, _, fds) = setup(1);
        program(&mut msix, 0, false);
        msix.set_message_control(MSG_CTL_ENABLE | MSG_CTL_FUNCTION_MASK);
        msix.vectors().trigger(0).unwrap();
        assert!(fds[0].read().is_err());
        msix.set_message_control(MSG_CTL_ENABLE);
        assert_eq!(fds[0].read().unwrap(), 1);
    }

    #[test]
    fn out_of_range_vector_and_table_access_are_ignored() {
        let (mut msix, router, _) = setup(1);
        msix.write_table(16, &[0xff; 4]);
        msix.write_table(3, &[0xff; 4]);
        let mut data = [0xaa; 4];
        msix.read_table(64, &mut data);
        assert_eq!(data, [0; 4]);
        assert!(msix.vectors().trigger(7).is_ok());
        assert!(router.routes.lock().unwrap().is_empty());
    }

    #[test]
    fn table_reads_back_what_was_written() {
        let (mut msix, _, _) = setup(1);
        program(&mut msix, 0, true);
        let mut data = [0u8; 8];
        msix.read_table(8, &mut data);
        assert_eq!(data, [0x40, 0, 0, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn capability_encodes_table_size_and_offsets() {
        let (msix, _, _) = setup(3);
        let (body, writable) = msix.capability(0, 0x8000, 0x9000);
        assert_eq!(body[0], 0x11);
        assert_eq!(u16::from_le_bytes([body[2], body[3]]), 2);
        assert_eq!(u32::from_le_bytes(body[4..8].try_into().unwrap()), 0x8000);
        assert_eq!(writable[3], 0xc0);
    }
}
