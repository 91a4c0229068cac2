//! vCPUs: architectural set-up from `boot`, then one thread each running `KVM_RUN` and
//! serving the port-I/O and MMIO exits that no ioeventfd or in-kernel device took.
//!
//! Pausing ([`VcpuPause`]): the VMM sets a flag and kicks every vCPU thread out of
//! `KVM_RUN` with [`kick_signal`] (KVM returns `EINTR`); each thread checks the flag
//! before every `KVM_RUN` and parks on a condition variable until resumed. A kick that
//! lands just before a thread enters `KVM_RUN` is lost, so the VMM repeats the kick every
//! millisecond until all threads have parked (bounded): no `immediate_exit` bookkeeping
//! in a signal handler.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::{Bus, ExitReason, VmExit};
use kvm_bindings::{
    CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::vm::Vm;

/// Errors while setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot {what} of vCPU {index}")]
    Setup {
        index: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted {set} of {wanted} boot MSRs of vCPU {index}")]
    Msrs {
        index: u8,
        set: usize,
        wanted: usize,
    },
    #[error("cannot build the MSR list")]
    MsrList,
    #[error("cannot start the thread of vCPU {index}")]
    Spawn {
        index: u8,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install the vCPU kick signal handler")]
    KickHandler(#[source] vmm_sys_util::errno::Error),
}

/// Why the vCPUs could not be paused.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("{parked} of {total} vCPUs stopped within {timeout_ms} ms; the VM was resumed")]
    Timeout {
        parked: usize,
        total: usize,
        timeout_ms: u128,
    },
}

/// The real-time signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal's only job is to make KVM_RUN return EINTR.
}

/// Installs the (empty) handler of [`kick_signal`]; once per process, before any kick.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::KickHandler)
}

#[derive(Debug, Default)]
struct PauseState {
    paused: bool,
    parked: usize,
}

/// Pauses and resumes all vCPU threads (see the module doc).
#[derive(Debug, Default)]
pub struct VcpuPause {
    /// Fast path for the vCPU threads: checked before every `KVM_RUN` without a lock.
    requested: AtomicBool,
    state: Mutex<PauseState>,
    changed: Condvar,
}

impl VcpuPause {
    /// How often a pausing VMM re-kicks vCPUs that have not parked yet.
    const KICK_INTERVAL: Duration = Duration::from_millis(1);

    /// Stops all `threads` (the vCPU threads) before their next guest instruction and
    /// waits until every one has parked, at most `timeout`; on time-out the VM is resumed.
    pub fn pause(&self, threads: &[JoinHandle<()>], timeout: Duration) -> Result<(), PauseError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        state.paused = true;
        self.requested.store(true, Ordering::SeqCst);
        while state.parked < threads.len() {
            if Instant::now() >= deadline {
                let parked = state.parked;
                drop(state);
                self.resume();
                return Err(PauseError::Timeout {
                    parked,
                    total: threads.len(),
                    timeout_ms: timeout.as_millis(),
                });
            }
            for thread in threads {
                // A thread that already parked takes the signal in its condvar wait,
                // which goes on waiting; one that exited makes pthread_kill fail.
                let _ = thread.kill(kick_signal());
            }
            state = self
                .changed
                .wait_timeout(state, Self::KICK_INTERVAL)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(())
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        let mut state = self.lock();
        state.paused = false;
        self.requested.store(false, Ordering::SeqCst);
        drop(state);
        self.changed.notify_all();
    }

    /// True while a pause is in force.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Called by a vCPU thread before each `KVM_RUN`: parks while paused.
    fn park_if_paused(&self) {
        if !self.requested.load(Ordering::SeqCst) {
            return;
        }
        let mut state = self.lock();
        if !state.paused {
            return;
        }
        state.parked += 1;
        self.changed.notify_all();
        while state.paused {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.parked -= 1;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// vCPU exits that reached crib, by kind, summed over all vCPUs. Exits KVM serves in the
/// kernel (LAPIC, IO-APIC, PIT, ioeventfds) never get here: every count here is a round
/// trip to user space that a faster boot would avoid.
#[derive(Debug, Default)]
pub struct ExitCounters {
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    pub other: AtomicU64,
}

impl ExitCounters {
    /// One line for the log, e.g. `io_in 3, io_out 26, mmio_read 0, mmio_write 0, other 0`.
    pub fn summary(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "io_in {}, io_out {}, mmio_read {}, mmio_write {}, other {}",
            get(&self.io_in),
            get(&self.io_out),
            get(&self.mmio_read),
            get(&self.mmio_write),
            get(&self.other)
        )
    }
}

/// The buses a vCPU thread dispatches exits to, and where it counts them.
#[derive(Clone)]
pub struct VcpuBuses {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exits: Arc<ExitCounters>,
}

/// A configured vCPU, not yet running.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

/// KVM's supported CPUID, read once and patched per vCPU.
pub fn supported_cpuid(vm: &Vm) -> Result<CpuId, VcpuError> {
    vm.kvm()
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| VcpuError::Setup {
            index: 0,
            what: "read KVM's supported CPUID",
            source,
        })
}

/// The guest's physical-address width: CPUID leaf 0x8000_0008 EAX[7:0] as KVM reports
/// it (crib passes it through), or the x86-64 minimum when the leaf is missing.
pub fn guest_phys_bits(cpuid: &CpuId) -> u8 {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map_or(boot::memory_map::DEFAULT_PHYS_BITS, |e| e.eax as u8)
}

impl Vcpu {
    /// Creates vCPU `index` of `count`; the boot vCPU (0) starts at `entry` in long mode
    /// with CR3 `pml4`, the others wait for INIT/SIPI from the guest.
    pub fn new(
        vm: &Vm,
        cpuid: &CpuId,
        index: u8,
        count: u8,
        entry: u64,
        pml4: u64,
    ) -> Result<Self, VcpuError> {
        let err = |what| {
            move |source| VcpuError::Setup {
                index,
                what,
                source,
            }
        };
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(err("create"))?;
        let mut cpuid = cpuid.clone();
        boot::cpu::patch_cpuid(&mut cpuid, index, count);
        fd.set_cpuid2(&cpuid).map_err(err("set the CPUID"))?;
        let entries = boot::cpu::boot_msrs();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::MsrList)?;
        let set = fd.set_msrs(&msrs).map_err(err("set the MSRs"))?;
        if set != entries.len() {
            return Err(VcpuError::Msrs {
                index,
                set,
                wanted: entries.len(),
            });
        }
        let mut lapic = fd.get_lapic().map_err(err("read the LAPIC"))?;
        boot::cpu::set_lapic_lints(&mut lapic);
        fd.set_lapic(&lapic).map_err(err("set the LAPIC"))?;
        if index == 0 {
            fd.set_regs(&boot::cpu::boot_regs(entry))
                .map_err(err("set the registers"))?;
            let sregs = fd.get_sregs().map_err(err("read the special registers"))?;
            fd.set_sregs(&boot::cpu::boot_sregs(sregs, pml4))
                .map_err(err("set the special registers"))?;
            fd.set_fpu(&boot::cpu::boot_fpu())
                .map_err(err("set the FPU"))?;
        }
        Ok(Self { index, fd })
    }

    /// Runs the vCPU on its own thread until the VM ends; the thread first applies the
    /// vCPU seccomp filter, if `seccomp`.
    pub fn spawn(
        self,
        buses: VcpuBuses,
        exit: Arc<VmExit>,
        pause: Arc<VcpuPause>,
        seccomp: Option<crate::seccomp::Filter>,
    ) -> Result<JoinHandle<()>, VcpuError> {
        let index = self.index;
        std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                if let Some(filter) = seccomp {
                    if let Err(e) = filter.apply() {
                        tracing::error!("vCPU {index}: {e}");
                        exit.request(ExitReason::VcpuError);
                        return;
                    }
                }
                self.run(&buses, &exit, &pause)
            })
            .map_err(|source| VcpuError::Spawn { index, source })
    }

    fn run(mut self, buses: &VcpuBuses, exit: &VmExit, pause: &VcpuPause) {
        loop {
            pause.park_if_paused();
            if let Some(reason) = self.run_once(buses) {
                exit.request(reason);
            }
            if exit.reason().is_some() {
                return;
            }
        }
    }

    /// The registers that say where and how a guest died, for the log line of a fatal exit.
    fn describe_state(&self) -> String {
        let regs = match self.fd.get_regs() {
            Ok(r) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x}",
                r.rip, r.rsp, r.rflags, r.rax
            ),
            Err(e) => format!("registers unreadable ({e})"),
        };
        let sregs = match self.fd.get_sregs() {
            Ok(s) => format!(
                "cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} idt={:#x}+{:#x} gdt={:#x}+{:#x}",
                s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer,
                s.idt.base, s.idt.limit, s.gdt.base, s.gdt.limit
            ),
            Err(e) => format!("special registers unreadable ({e})"),
        };
        format!("{regs} {sregs}")
    }

    /// One `KVM_RUN`; returns why the VM must end, if it must.
    fn run_once(&mut self, buses: &VcpuBuses) -> Option<ExitReason> {
        let index = self.index;
        let result = self.fd.run();
        let counter = match &result {
            Ok(VcpuExit::IoIn(..)) => &buses.exits.io_in,
            Ok(VcpuExit::IoOut(..)) => &buses.exits.io_out,
            Ok(VcpuExit::MmioRead(..)) => &buses.exits.mmio_read,
            Ok(VcpuExit::MmioWrite(..)) => &buses.exits.mmio_write,
            _ => &buses.exits.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !buses.pio.read(u64::from(port), data) {
                    // Nothing there: an ISA bus reads all ones.
                    data.fill(0xff);
                    tracing::trace!("vCPU {index}: unclaimed port read {port:#x}");
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !buses.pio.write(u64::from(port), data) {
                    tracing::trace!("vCPU {index}: unclaimed port write {port:#x} {data:x?}");
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !buses.mmio.read(addr, data) {
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                buses.mmio.write(addr, data);
                None
            }
            Ok(VcpuExit::Shutdown) => {
                tracing::error!(
                    "vCPU {index}: guest triple fault (KVM shutdown exit); {}",
                    self.describe_state()
                );
                Some(ExitReason::TripleFault)
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Some(ExitReason::Poweroff),
                KVM_SYSTEM_EVENT_RESET => Some(ExitReason::Reset),
                KVM_SYSTEM_EVENT_CRASH => Some(ExitReason::Panic),
                other => {
                    tracing::warn!("vCPU {index}: ignoring KVM system event {other}");
                    None
                }
            },
            Ok(VcpuExit::InternalError) => {
                // SAFETY: on KVM_EXIT_INTERNAL_ERROR, `internal` is the union member KVM filled.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                tracing::error!(
                    "vCPU {index}: KVM internal error (suberror {suberror}{}); {}",
                    if suberror == 1 {
                        ": instruction emulation failed"
                    } else {
                        ""
                    },
                    self.describe_state()
                );
                Some(ExitReason::VcpuError)
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                tracing::error!("vCPU {index}: KVM failed to enter the guest (reason {reason:#x}, host CPU {cpu})");
                Some(ExitReason::VcpuError)
            }
            Ok(VcpuExit::Hlt) => {
                // The in-kernel LAPIC handles HLT; seeing it means no interrupt can wake us.
                tracing::error!("vCPU {index}: halted with interrupts off");
                Some(ExitReason::VcpuError)
            }
            Ok(other) => {
                tracing::error!("vCPU {index}: unexpected KVM exit {other:?}");
                Some(ExitReason::VcpuError)
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => {
                tracing::error!("vCPU {index}: KVM_RUN failed: {e}");
                Some(ExitReason::VcpuError)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in vCPU thread: parks whenever asked, counts its loop turns.
    fn fake_vcpu(pause: Arc<VcpuPause>, turns: Arc<AtomicU64>) -> JoinHandle<()> {
        std::thread::spawn(move || loop {
            pause.park_if_paused();
            turns.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_micros(100));
        })
    }

    #[test]
    fn pause_parks_every_thread_and_resume_releases_them() {
        install_kick_handler().unwrap();
        let pause = Arc::new(VcpuPause::default());
        let turns = Arc::new(AtomicU64::new(0));
        let threads = vec![
            fake_vcpu(pause.clone(), turns.clone()),
            fake_vcpu(pause.clone(), turns.clone()),
        ];

        pause.pause(&threads, Duration::from_secs(5)).unwrap();
        let frozen = turns.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        let still = turns.load(Ordering::SeqCst);
        pause.resume();
        std::thread::sleep(Duration::from_millis(20));

        assert_eq!(frozen, still);
        assert!(turns.load(Ordering::SeqCst) > still);
        assert!(!pause.is_paused());
    }

    #[test]
    fn pause_times_out_and_resumes_when_a_thread_never_parks() {
        install_kick_handler().unwrap();
        let pause = VcpuPause::default();
        let stuck = std::thread::spawn(|| std::thread::sleep(Duration::from_millis(200)));

        let err = pause
            .pause(std::slice::from_ref(&stuck), Duration::from_millis(20))
            .unwrap_err();

        assert!(err.to_string().contains("0 of 1 vCPUs stopped"), "{err}");
        assert!(!pause.is_paused());
    }

    #[test]
    fn exit_summary_lists_every_kind() {
        let counters = ExitCounters::default();
        counters.io_out.fetch_add(26, Ordering::Relaxed);
        counters.mmio_read.fetch_add(2, Ordering::Relaxed);
        assert_eq!(
            counters.summary(),
            "io_in 0, io_out 26, mmio_read 2, mmio_write 0, other 0"
        );
    }
}
