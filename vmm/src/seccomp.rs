//! Seccomp filters per thread kind (seccompiler), on unless `--seccomp off`.
//!
//! Each thread applies its kind's filter when it starts; filters are inherited by the
//! threads a thread creates afterwards, and stack (the most restrictive answer wins), so:
//! - **vCPU** threads activate devices and so create the device workers, which inherit
//!   the vCPU filter; it therefore also allows the vsock worker's Unix sockets.
//! - **block** and **net** queue workers, which parse what the guest puts in its rings,
//!   stack a narrower filter of their own on it when they start (the devices'
//!   `WorkerSetup` hook): their I/O and timers, no `ioctl` (so no KVM or device control),
//!   no sockets, no `open`. The **vsock** worker stacks one too: Unix sockets, and
//!   `ioctl` only as FIONBIO.
//! - the **API** thread (and the blocking threads of its runtime);
//! - the **docker proxy** listener and its per-connection threads;
//! - the **main** thread, running the VMM event loop, applies its filter last, after
//!   every other thread started; the short-lived guest-shutdown thread it may create
//!   inherits it.
//!
//! Lists are allow-lists of syscall numbers without argument checks: generous on
//! purpose (a missing syscall kills the VM), still far from the ~350 a process may call.
//! A call outside the filter raises SIGSYS; the handler writes one line naming the
//! thread and the syscall number to stderr and ends crib with [`SECCOMP_EXIT_CODE`].
//!
//! Opening files: only vCPU threads may (device activation). The other kinds get
//! `EACCES` from `open`/`openat` instead of SIGSYS, through a second filter stacked
//! under the allow-list: glibc's `strerror` looks for translated messages when crib
//! formats an I/O error, and must fail quietly rather than end the VM.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// crib's exit code when a thread made a system call its filter forbids.
pub const SECCOMP_EXIT_CODE: i32 = 7;

/// The kinds of thread with a filter of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU, and the device workers it starts (block queues, vsock).
    Vcpu,
    /// The HTTP API and its runtime's blocking threads.
    Api,
    /// The docker socket's listener and connection threads.
    DockerProxy,
    /// The main thread's event loop, and the guest-shutdown thread it starts.
    Vmm,
    /// A virtio-blk queue worker.
    BlockWorker,
    /// A virtio-net queue-pair worker.
    NetWorker,
    /// The virtio-vsock worker (guest packets to and from host Unix sockets).
    VsockWorker,
    RngWorker,
}

/// Errors building or applying a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter of {0:?} threads")]
    Build(ThreadKind, #[source] seccompiler::BackendError),
    #[error("cannot compile the seccomp filter of {0:?} threads")]
    Compile(ThreadKind, #[source] seccompiler::BackendError),
    #[error(
        "cannot apply the seccomp filter of {kind:?} threads (run with --seccomp off on a \
         kernel without seccomp)"
    )]
    Apply {
        kind: ThreadKind,
        #[source]
        source: seccompiler::Error,
    },
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] vmm_sys_util::errno::Error),
}

/// A compiled filter, ready for a thread to apply to itself.
#[derive(Clone, Debug)]
pub struct Filter {
    kind: ThreadKind,
    /// Applied in order: the `open` refusal first (the allow-list forbids `seccomp`
    /// itself), then the allow-list.
    programs: Vec<BpfProgram>,
}

/// `open`/`openat`, answered with `EACCES` for kinds that open no files.
const OPEN: &[i64] = &[libc::SYS_open, libc::SYS_openat];

/// `calls` match whatever their arguments; a call in `conditional` matches only when one
/// of its rules does (even if `calls` lists it too).
fn compile(
    kind: ThreadKind,
    calls: &[i64],
    conditional: Vec<(i64, SeccompRule)>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        calls.iter().map(|nr| (*nr, Vec::new())).collect();
    for (nr, _) in &conditional {
        rules.remove(nr);
    }
    for (nr, rule) in conditional {
        rules.entry(nr).or_default().push(rule);
    }
    SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
        .map_err(|e| SeccompError::Build(kind, e))?
        .try_into()
        .map_err(|e| SeccompError::Compile(kind, e))
}

impl Filter {
    /// Compiles the filter of `kind`.
    pub fn new(kind: ThreadKind) -> Result<Self, SeccompError> {
        let mut programs = Vec::with_capacity(2);
        let mut allowed = syscalls(kind);
        if kind != ThreadKind::Vcpu {
            programs.push(compile(
                kind,
                OPEN,
                Vec::new(),
                SeccompAction::Allow,
                SeccompAction::Errno(libc::EACCES as u32),
            )?);
            // Allowed here so that the refusal above decides (the strictest answer wins).
            allowed.extend_from_slice(OPEN);
        }
        let conditional = conditional_calls(kind).map_err(|e| SeccompError::Build(kind, e))?;
        programs.push(compile(
            kind,
            &allowed,
            conditional,
            SeccompAction::Trap,
            SeccompAction::Allow,
        )?);
        Ok(Self { kind, programs })
    }

    /// Which threads this filter is for.
    pub fn kind(&self) -> ThreadKind {
        self.kind
    }

    /// Applies the filter to the calling thread (and the threads it creates from now on).
    pub fn apply(&self) -> Result<(), SeccompError> {
        for program in &self.programs {
            seccompiler::apply_filter(program).map_err(|source| SeccompError::Apply {
                kind: self.kind,
                source,
            })?;
        }
        Ok(())
    }
}

/// The filters of every thread kind, or none when seccomp is off.
#[derive(Clone, Debug, Default)]
pub struct Filters {
    pub vcpu: Option<Filter>,
    pub api: Option<Filter>,
    pub docker_proxy: Option<Filter>,
    pub vmm: Option<Filter>,
    pub block_worker: Option<Filter>,
    pub net_worker: Option<Filter>,
    pub vsock_worker: Option<Filter>,
    pub rng_worker: Option<Filter>,
}

impl Filters {
    /// Compiles all filters and installs the SIGSYS handler when `enabled`; else warns.
    pub fn new(enabled: bool) -> Result<Self, SeccompError> {
        if !enabled {
            tracing::warn!("seccomp is off (--seccomp off): use this only to debug a filter");
            return Ok(Self::default());
        }
        vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, handle_sigsys)
            .map_err(SeccompError::Handler)?;
        Ok(Self {
            vcpu: Some(Filter::new(ThreadKind::Vcpu)?),
            api: Some(Filter::new(ThreadKind::Api)?),
            docker_proxy: Some(Filter::new(ThreadKind::DockerProxy)?),
            vmm: Some(Filter::new(ThreadKind::Vmm)?),
            block_worker: Some(Filter::new(ThreadKind::BlockWorker)?),
            net_worker: Some(Filter::new(ThreadKind::NetWorker)?),
            vsock_worker: Some(Filter::new(ThreadKind::VsockWorker)?),
            rng_worker: Some(Filter::new(ThreadKind::RngWorker)?),
        })
    }
}

/// The device hook that applies `filter` in each worker thread; none without seccomp.
pub fn worker_setup(filter: &Option<Filter>) -> Option<devices::virtio::WorkerSetup> {
    let filter = filter.clone()?;
    Some(std::sync::Arc::new(move || {
        filter.apply().map_err(std::io::Error::other)
    }))
}

/// Writes `crib: seccomp: thread <name> made system call <nr>, ...` and exits.
/// Async-signal-safe: only `prctl`, `write` and `_exit`, no allocation, no locks.
extern "C" fn handle_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // siginfo_t for SIGSYS (x86_64): the union starts at byte 16 with `_call_addr` (a
    // pointer); `_syscall` (an int) follows at byte 24.
    const SYSCALL_OFFSET: usize = 24;
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo_t (128 bytes) for an SA_SIGINFO
        // handler; for SIGSYS the int at byte 24 is the syscall number. read_unaligned
        // makes no alignment assumption.
        unsafe { std::ptr::read_unaligned(info.cast::<u8>().add(SYSCALL_OFFSET).cast::<i32>()) }
    };
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL included) into the buffer given.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let name_len = name.iter().position(|b| *b == 0).unwrap_or(name.len());

    let mut line = [0u8; 256];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(line.len() - len);
        line[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    put(b"crib: seccomp: thread ");
    put(&name[..name_len]);
    put(b" made system call ");
    let mut digits = [0u8; 12];
    put(format_decimal(nr, &mut digits));
    put(
        b", which its filter does not allow; exiting (a crib bug: please report it; \
          --seccomp off works around it)\n",
    );
    // SAFETY: writes `len` initialized bytes of `line` to stderr; `_exit` ends the process
    // without running anything that could take a lock the trapped thread holds.
    unsafe {
        libc::write(2, line.as_ptr().cast(), len);
        libc::_exit(SECCOMP_EXIT_CODE);
    }
}

/// `value` in decimal, in `buffer` (no allocation: used in a signal handler).
fn format_decimal(value: i32, buffer: &mut [u8; 12]) -> &[u8] {
    let mut n = i64::from(value).unsigned_abs();
    let mut at = buffer.len();
    loop {
        at -= 1;
        buffer[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if value < 0 {
        at -= 1;
        buffer[at] = b'-';
    }
    &buffer[at..]
}

/// What every Rust thread of crib calls: memory, threads and their signals, futexes,
/// time, logging to stderr, closing fds, eventfd and epoll plumbing.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_dup,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_pipe2,
];

/// Unix-socket clients and servers (vsock host side, docker proxy, API).
const SOCKETS: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_ioctl,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// KVM_RUN and device emulation and activation on the vCPU; with [`BLOCK_WORKER`] and
/// [`SOCKETS`], what the workers it starts need (a worker's own filter only narrows it).
const VCPU: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_io_uring_setup,
    libc::SYS_openat,
    // The block and net workers a vCPU starts stack their own, narrower filter; seccomp
    // can only add restrictions, never lift one.
    libc::SYS_seccomp,
];

/// A block queue worker: io_uring or positioned I/O, flush, discard and zeroes, and the
/// rate limiter's timer (rebuilt when the API changes the limits).
const BLOCK_WORKER: &[i64] = &[
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_sync_file_range,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
];

/// A net queue-pair worker: frames to and from the tap (read/write/readv/writev, in
/// COMMON) and the rate limiter's timer.
const NET_WORKER: &[i64] = &[
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
];

/// The entropy worker: getrandom (in COMMON), poll, eventfds and the rate limiter's timer.
const RNG_WORKER: &[i64] = &[libc::SYS_timerfd_settime, libc::SYS_timerfd_gettime];

/// Calls a kind may make only with certain arguments: the vsock worker's `ioctl` is
/// FIONBIO alone (std's `set_nonblocking` on the host connections it accepts).
fn conditional_calls(
    kind: ThreadKind,
) -> Result<Vec<(i64, SeccompRule)>, seccompiler::BackendError> {
    match kind {
        ThreadKind::VsockWorker => {
            let fionbio =
                SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::FIONBIO)?;
            Ok(vec![(libc::SYS_ioctl, SeccompRule::new(vec![fionbio])?)])
        }
        _ => Ok(Vec::new()),
    }
}

/// The event loop: terminal mode, timers, kicking vCPUs (tgkill, in COMMON).
const VMM: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
];

fn syscalls(kind: ThreadKind) -> Vec<i64> {
    let extra: &[&[i64]] = match kind {
        ThreadKind::Vcpu => &[VCPU, BLOCK_WORKER, SOCKETS],
        ThreadKind::Api => &[SOCKETS],
        ThreadKind::DockerProxy => &[SOCKETS],
        ThreadKind::Vmm => &[VMM, SOCKETS],
        ThreadKind::BlockWorker => &[BLOCK_WORKER],
        ThreadKind::NetWorker => &[NET_WORKER],
        ThreadKind::VsockWorker => &[SOCKETS],
        ThreadKind::RngWorker => &[RNG_WORKER],
    };
    let mut all: Vec<i64> = COMMON
        .iter()
        .chain(extra.iter().copied().flatten())
        .copied()
        .collect();
    all.sort_unstable();
    all.dedup();
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles() {
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::Api,
            ThreadKind::DockerProxy,
            ThreadKind::Vmm,
            ThreadKind::BlockWorker,
            ThreadKind::NetWorker,
            ThreadKind::VsockWorker,
            ThreadKind::RngWorker,
        ] {
            assert_eq!(Filter::new(kind).unwrap().kind(), kind);
        }
    }

    #[test]
    fn vcpu_filter_allows_io_uring_for_the_workers_it_starts() {
        assert!(syscalls(ThreadKind::Vcpu).contains(&libc::SYS_io_uring_enter));
    }

    #[test]
    fn ring_workers_get_no_ioctl_sockets_or_open() {
        for kind in [ThreadKind::BlockWorker, ThreadKind::NetWorker] {
            let calls = syscalls(kind);
            for forbidden in [
                libc::SYS_ioctl,
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_openat,
                libc::SYS_execve,
            ] {
                assert!(!calls.contains(&forbidden), "{kind:?} allows {forbidden}");
            }
        }
        assert!(syscalls(ThreadKind::BlockWorker).contains(&libc::SYS_io_uring_enter));
    }

    /// A worker started by a vCPU thread stacks its filter on the vCPU's: its I/O works
    /// and `open`, which the vCPU filter allows, gets EACCES.
    #[test]
    fn block_worker_filter_stacks_on_the_vcpu_filter() {
        let vcpu = Filter::new(ThreadKind::Vcpu).unwrap();
        let worker = worker_setup(&Some(Filter::new(ThreadKind::BlockWorker).unwrap())).unwrap();
        let (open, read) = std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            vcpu.apply().unwrap();
            let file = std::fs::File::open("/proc/self/status").unwrap();
            worker().unwrap();
            let open = std::fs::File::open("/proc/self/status")
                .unwrap_err()
                .raw_os_error();
            // pread64: what a queue worker does with the disk.
            let mut head = [0u8; 5];
            let read = file.read_at(&mut head, 0).map(|n| head[..n].to_vec());
            (open, read.ok())
        })
        .join()
        .unwrap();
        assert_eq!(open, Some(libc::EACCES));
        assert_eq!(read.as_deref(), Some(&b"Name:"[..]));
    }

    /// The vsock worker may make its host connections non-blocking (ioctl FIONBIO).
    #[test]
    fn vsock_worker_may_set_sockets_nonblocking() {
        let vcpu = Filter::new(ThreadKind::Vcpu).unwrap();
        let worker = Filter::new(ThreadKind::VsockWorker).unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let set = std::thread::spawn(move || {
            vcpu.apply().unwrap();
            worker.apply().unwrap();
            a.set_nonblocking(true).is_ok()
        })
        .join()
        .unwrap();
        assert!(set);
    }

    #[test]
    fn other_ioctls_in_the_vsock_worker_exit_with_the_seccomp_code() {
        forbidden_ioctl_exits(ThreadKind::VsockWorker);
    }

    #[test]
    fn forbidden_ioctl_in_a_ring_worker_exits_with_the_seccomp_code() {
        forbidden_ioctl_exits(ThreadKind::NetWorker);
    }

    /// A forked child under the vCPU filter and `kind`'s calls ioctl(FIONREAD): exit 7.
    fn forbidden_ioctl_exits(kind: ThreadKind) {
        let vcpu = Filter::new(ThreadKind::Vcpu).unwrap();
        let worker = Filter::new(kind).unwrap();
        vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, handle_sigsys).unwrap();
        // SAFETY: the child only applies prebuilt filters and makes raw system calls (no
        // allocation, no locks another thread could hold) before it exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let _ = vcpu.apply();
            let _ = worker.apply();
            // SAFETY: FIONREAD on fd -1 writes nothing; the filter traps it anyway.
            unsafe {
                libc::syscall(libc::SYS_ioctl, -1, libc::FIONREAD, std::ptr::null::<u8>());
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked; `status` is a valid out-parameter.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), SECCOMP_EXIT_CODE);
    }

    #[test]
    fn api_filter_has_no_disk_io() {
        let api = syscalls(ThreadKind::Api);
        assert!(!api.contains(&libc::SYS_pwrite64));
        assert!(!api.contains(&libc::SYS_io_uring_enter));
    }

    #[test]
    fn open_fails_with_eacces_outside_vcpu_threads() {
        let filter = Filter::new(ThreadKind::DockerProxy).unwrap();
        let error = std::thread::spawn(move || {
            filter.apply().unwrap();
            std::fs::File::open("/proc/self/status")
                .unwrap_err()
                .raw_os_error()
        })
        .join()
        .unwrap();
        assert_eq!(error, Some(libc::EACCES));
    }

    #[test]
    fn decimal_formatting_needs_no_allocation() {
        let mut buffer = [0u8; 12];
        assert_eq!(format_decimal(41, &mut buffer), b"41");
        assert_eq!(format_decimal(0, &mut buffer), b"0");
        assert_eq!(format_decimal(-1, &mut buffer), b"-1");
    }

    #[test]
    fn forbidden_call_exits_with_the_seccomp_code() {
        let filter = Filter::new(ThreadKind::Api).unwrap();
        vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, handle_sigsys).unwrap();
        // SAFETY: the child only applies the prebuilt filter and makes raw system calls
        // (no allocation, no locks another thread could hold) before it exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let _ = filter.apply();
            // SAFETY: pwrite64 on fd -1 touches no memory; the filter traps it anyway.
            unsafe {
                libc::syscall(libc::SYS_pwrite64, -1, std::ptr::null::<u8>(), 0, 0);
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked; `status` is a valid out-parameter.
        unsafe { libc::waitpid(pid, &mut status, 0) };

        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), SECCOMP_EXIT_CODE);
    }

    #[test]
    fn filter_allows_listed_calls_in_a_thread() {
        // Applies the API filter in a throw-away thread and makes allowed calls.
        let filter = Filter::new(ThreadKind::Api).unwrap();
        let done = std::thread::spawn(move || {
            filter.apply().unwrap();
            let pair = std::os::unix::net::UnixStream::pair().unwrap();
            drop(pair);
            std::thread::spawn(|| 7).join().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(done, 7);
    }
}
