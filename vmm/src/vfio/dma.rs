//! Guest RAM's DMA map for the VFIO container, made on a thread of its own while the guest
//! boots. VFIO pins every page it maps, which costs seconds for a large guest (2 s for
//! 512 MiB in the lab); the guest needs none of it before it lets a passed-through device
//! master the bus, so crib holds that one configuration write (see
//! [`devices::vfio::DmaReadiness`]) instead of delaying the whole boot.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use devices::vfio::DmaReadiness;
use devices::{ExitReason, VmExit};
use vfio_ioctls::VfioContainer;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::VfioError;
use crate::memory::GuestMemory;
use crate::seccomp::Filter;

/// CAP_IPC_LOCK: lets a process lock memory past RLIMIT_MEMLOCK.
const CAP_IPC_LOCK: u32 = 14;

/// Where the map is: not done, done, or failed.
#[derive(Debug, Default)]
pub struct DmaMap {
    state: Mutex<Option<bool>>,
    done: Condvar,
}

impl DmaMap {
    fn finish(&self, mapped: bool) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(mapped);
        self.done.notify_all();
    }
}

impl DmaReadiness for DmaMap {
    fn wait_mapped(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(mapped) = *state {
                return mapped;
            }
            state = self.done.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Whether this process may lock `bytes` more of memory: what VFIO's type-1 IOMMU driver
/// checks when it pins pages.
fn check_memlock(bytes: u64) -> Result<(), VfioError> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given, which lives on this stack frame.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        return Ok(()); // Unknown: let VFIO decide.
    }
    if memlock_allows(limit.rlim_cur, bytes, has_ipc_lock) {
        return Ok(());
    }
    Err(VfioError::MemlockLimit {
        limit: limit.rlim_cur,
        needed: bytes,
    })
}

/// Whether a soft limit of `limit` lets the process pin `bytes` (`has_ipc_lock` is asked
/// only when the limit is too small).
fn memlock_allows(limit: libc::rlim_t, bytes: u64, has_ipc_lock: impl Fn() -> bool) -> bool {
    limit == libc::RLIM_INFINITY || limit >= bytes || has_ipc_lock()
}

/// CAP_IPC_LOCK in the effective set, from /proc/self/status.
fn has_ipc_lock() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Starts mapping all of `memory` (IOVA = guest-physical address) into `container` on a
/// thread with `filter`. A failure is logged and ends the VM through `exit`; the guest's
/// bus-master enable stays held until then.
pub fn start(
    container: Arc<VfioContainer>,
    memory: GuestMemory,
    map: Arc<DmaMap>,
    filter: Option<Filter>,
    exit: Arc<VmExit>,
) -> Result<(), VfioError> {
    let bytes = memory.iter().map(|r| r.len()).sum::<u64>();
    check_memlock(bytes)?;
    let fail = {
        let map = map.clone();
        move |e: &dyn std::fmt::Display| {
            tracing::error!("{e}");
            map.finish(false);
            exit.request(ExitReason::DeviceFailed);
        }
    };
    std::thread::Builder::new()
        .name("vfio-dma".into())
        .spawn(move || {
            if let Some(filter) = filter {
                if let Err(e) = filter.apply() {
                    return fail(&e);
                }
            }
            let start = Instant::now();
            // SAFETY: guest RAM is a shared mapping owned by the VM for its whole life;
            // crib touches it only through vm-memory's volatile accessors, never through
            // Rust references, so device DMA into it breaks no aliasing rule.
            match unsafe { container.vfio_map_guest_memory(&memory) } {
                Ok(()) => {
                    tracing::info!(
                        "vfio: guest RAM ({} MiB) DMA-mapped in {} ms",
                        bytes >> 20,
                        start.elapsed().as_millis()
                    );
                    map.finish(true);
                }
                Err(e) => {
                    let error = VfioError::DmaMap(e);
                    let source = std::error::Error::source(&error)
                        .map(|s| format!(": {s}"))
                        .unwrap_or_default();
                    fail(&format!("{error}{source}"));
                }
            }
        })
        .map(|_| ())
        .map_err(VfioError::DmaThread)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_see_the_outcome() {
        let map = Arc::new(DmaMap::default());
        let waiter = {
            let map = map.clone();
            std::thread::spawn(move || map.wait_mapped())
        };
        map.finish(true);
        assert!(waiter.join().unwrap());
        // Later waits return at once.
        assert!(map.wait_mapped());
        let failed = DmaMap::default();
        failed.finish(false);
        assert!(!failed.wait_mapped());
    }

    #[test]
    fn memlock_limit_must_cover_guest_ram_without_cap_ipc_lock() {
        const GUEST: u64 = 512 << 20;
        assert!(memlock_allows(libc::RLIM_INFINITY, GUEST, || false));
        assert!(memlock_allows(GUEST, GUEST, || false));
        assert!(!memlock_allows(8 << 20, GUEST, || false));
        assert!(memlock_allows(8 << 20, GUEST, || true));
        assert!(check_memlock(0).is_ok());
        let message = VfioError::MemlockLimit {
            limit: 8 << 20,
            needed: GUEST,
        }
        .to_string();
        assert!(message.contains("ulimit -l unlimited") && message.contains("CAP_IPC_LOCK"));
    }
}
