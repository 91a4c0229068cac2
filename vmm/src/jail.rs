//! The jail of `crib pod run` on multi-tenant hosts (docs/JAIL.md): the launch file's
//! `"jail": {"uid": N, "gid": N}` runs the pod's VMM as that uid and gid, PID 1 of its own
//! PID namespace, in new mount and IPC namespaces whose root is a tmpfs holding only the
//! pod's run directory and `/dev/null`, under a cgroup v2 with the VM's CPU and memory
//! limits, with no capabilities left and `no_new_privs` set before the guest runs.
//!
//! The steps, in the order `crib pod run` takes them (root throughout until the last):
//! 1. [`Cgroup::create`] (the supervisor, outside): removes a stale cgroup of the pod,
//!    makes `/sys/fs/cgroup/crib/<pod>` with `cpu.max`, `memory.max` and `pids.max`.
//! 2. [`supervise`]: `unshare(CLONE_NEWPID)`, `fork`; the supervisor forwards SIGTERM and
//!    SIGINT to the child and returns its exit code.
//! 3. [`enter`] (the child, PID 1, single-threaded): joins the cgroup, `unshare`s the
//!    mount and IPC namespaces, makes every mount private.
//! 4. [`confine`] (the child, from inside `vmm::run` once the kernel, initrd, disks,
//!    taps, `/dev/kvm` and every socket are open and before any thread starts): builds
//!    the jail root, `pivot_root`s into it, leaves the host's network namespace, drops
//!    capabilities and switches uid and gid.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use rustix::mount::{
    mount, mount_bind, mount_change, mount_remount, unmount, MountFlags, MountPropagationFlags,
    UnmountFlags,
};
use rustix::thread::{CapabilitySet, CapabilitySets};
use serde::Deserialize;

use crate::config::VmConfig;

/// Where cgroup v2 is expected.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The parent of every pod's cgroup, under [`CGROUP_ROOT`].
pub const CGROUP_PARENT: &str = "crib";
/// What the VMM needs beside guest RAM, counted in `memory.max`: its own heap and stacks,
/// the page tables and KVM structures of the guest, io_uring rings, the jail's tmpfs.
pub const VMM_OVERHEAD_BYTES: u64 = 192 << 20;
/// The `cpu.max` period, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;
/// The cgroup v2 controllers a pod's cgroup needs, enabled in its parents.
pub const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];
/// `pids.max`'s part for the threads a VM has whatever its devices: the main thread (event
/// loop), the API's listener and its blocking pool (a handler and a reply per connection,
/// `2 × api::server::MAX_CONNECTIONS`), the docker proxy's listener and two threads per connection
/// for [`DOCKER_CONNECTIONS`] connections, the graceful shutdown's thread, KVM's
/// `kvm-nx-lpage-recovery-<pid>` kernel thread (KVM puts it in the cgroup of the process
/// that made the VM), and a spare 16.
pub const PIDS_FIXED: u64 = 1
    + (1 + 2 * crate::api::server::MAX_CONNECTIONS as u64)
    + (1 + 2 * DOCKER_CONNECTIONS)
    + 1
    + 1
    + 16;
/// Docker API connections open at once that [`PIDS_FIXED`] leaves room for (the proxy
/// runs two threads per connection; a connection past the limit is closed, logged).
pub const DOCKER_CONNECTIONS: u64 = 32;
/// Kernel io-wq workers counted per disk queue: io_uring hands flushes and, on some file
/// systems, buffered writes to worker threads of the submitting thread, and these count
/// in the cgroup's `pids.current`. When the cgroup is full io-wq queues work on the
/// workers it has; only a queue whose first worker cannot start sees I/O errors.
pub const IO_WQ_WORKERS_PER_QUEUE: u64 = 4;
/// The directory in the run directory the jail's tmpfs is mounted on (in the child's own
/// mount namespace; on the host it stays an empty directory, removed when the pod ends).
pub const JAIL_DIR: &str = ".jail";

/// The launch file's `jail` field: `"auto"` (ids from [`AUTO_IDS`], see [`lease_ids`]) or
/// `{"uid": N, "gid": N}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JailSpec {
    Auto,
    Ids(JailIds),
}

/// `jail`'s object form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailIds {
    /// The uid the VMM runs as: not 0, not the overflow uid 65534, below 2^32 - 1.
    pub uid: u64,
    /// The gid the VMM runs as, under the same rules.
    pub gid: u64,
}

/// What `jail` asks for once checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JailRequest {
    /// A uid = gid no other pod holds, from [`AUTO_IDS`].
    Auto,
    /// These ids.
    Fixed(Jail),
}

impl<'de> Deserialize<'de> for JailSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JailSpecVisitor)
    }
}

/// Takes `"auto"` or the object. (An untagged enum would lose the field path that
/// `jail.gid: invalid value` needs.)
struct JailSpecVisitor;

impl<'de> serde::de::Visitor<'de> for JailSpecVisitor {
    type Value = JailSpec;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(r#""auto" or {"uid": N, "gid": N}"#)
    }

    fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<JailSpec, E> {
        if value == "auto" {
            Ok(JailSpec::Auto)
        } else {
            Err(E::invalid_value(serde::de::Unexpected::Str(value), &self))
        }
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<JailSpec, A::Error> {
        JailIds::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(JailSpec::Ids)
    }
}

/// A checked [`JailSpec`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Jail {
    pub uid: u32,
    pub gid: u32,
}

/// The largest id the kernel takes: `(uid_t)-1` means "unchanged" to `setresuid`.
const MAX_ID: u64 = u32::MAX as u64 - 1;
/// The kernel's overflow id ("nobody"): files of unmapped ids show as it, and many hosts
/// run other daemons as it.
const OVERFLOW_ID: u64 = 65534;

impl JailSpec {
    /// Checks the ids, if given; the error is `(field, problem)` with the fix in it.
    pub fn check(self) -> Result<JailRequest, (&'static str, String)> {
        match self {
            Self::Auto => Ok(JailRequest::Auto),
            Self::Ids(ids) => ids.check().map(JailRequest::Fixed),
        }
    }
}

impl JailIds {
    /// Checks both ids; the error is `(field, problem)` with the fix in the problem.
    pub fn check(self) -> Result<Jail, (&'static str, String)> {
        let id = |field: &'static str, value: u64| {
            match value {
            0 => Err((
                field,
                "is 0 (root): a jail needs an unprivileged id; pick one no other process or file on the host uses, e.g. 100000 + a number per pod".to_string(),
            )),
            OVERFLOW_ID => Err((
                field,
                "is 65534 (nobody), which other daemons share: pick an id of the pod's own, e.g. 100000 + a number per pod".to_string(),
            )),
            v if v > MAX_ID => Err((
                field,
                format!("is {v}: ids go from 1 to {MAX_ID}"),
            )),
            v => Ok(v as u32),
        }
        };
        Ok(Jail {
            uid: id("jail.uid", self.uid)?,
            gid: id("jail.gid", self.gid)?,
        })
    }
}

/// Errors of the jail; each names what failed and, where one exists, the fix.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(
        "the jail needs root: run `crib pod run` as root, or remove \"jail\" from the launch file"
    )]
    NotRoot,
    #[error("the jail needs cgroup v2 at {CGROUP_ROOT} (no {path}): mount it (`mount -t cgroup2 none {CGROUP_ROOT}`) or boot with systemd.unified_cgroup_hierarchy=1")]
    NoCgroup2 { path: PathBuf },
    #[error("cgroup v2 at {CGROUP_ROOT} lacks the {controller} controller (it offers: {available}): enable it in the kernel or free it from cgroup v1")]
    MissingController {
        controller: &'static str,
        available: String,
    },
    #[error("cannot write {path}")]
    CgroupWrite {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove the stale cgroup {path} (its processes did not end)")]
    StaleCgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{step} failed")]
    Syscall {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{step} {path} failed")]
    Path {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Ids(#[from] crate::jail_ids::JailIdError),
    #[error("the jail must be set up while crib has one thread, and it has {threads}")]
    Threaded { threads: usize },
    #[error("the jail does not support {what} yet: remove \"jail\" or {what} from the launch file (docs/JAIL.md)")]
    Unsupported { what: &'static str },
    #[error("after dropping privileges crib still has uid {uid}, gid {gid}, effective capabilities {effective:#x}, permitted {permitted:#x}")]
    NotDropped {
        uid: u32,
        gid: u32,
        effective: u64,
        permitted: u64,
    },
}

fn last_os_error(step: &'static str) -> JailError {
    JailError::Syscall {
        step,
        source: std::io::Error::last_os_error(),
    }
}

fn path_error(step: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JailError {
    let path = path.to_path_buf();
    move |source| JailError::Path { step, path, source }
}

/// `cpu.max` for `cpus` vCPUs: each may use one host CPU.
pub fn cpu_max(cpus: u8) -> String {
    format!("{} {CPU_PERIOD_US}", u64::from(cpus) * CPU_PERIOD_US)
}

/// `memory.max` for guest RAM of `memory_bytes`.
pub fn memory_max(memory_bytes: u64) -> u64 {
    memory_bytes.saturating_add(VMM_OVERHEAD_BYTES)
}

/// `pids.max` for `config`: every thread the VMM may start (vCPUs, a worker per disk queue
/// with its io-wq workers, per net queue pair, vsock, rng, [`PIDS_FIXED`]) and those of
/// each share's virtiofsd, which runs in the pod's cgroup ([`pids_per_share`]). Generous
/// on purpose: it stops a thread or fork bomb from an escaped guest, not a VMM at work.
pub fn pids_max(config: &VmConfig) -> u64 {
    let disk_queues: u64 = config.disks.iter().map(|d| u64::from(d.queues)).sum();
    let net_pairs: u64 = config.net.iter().map(|n| u64::from(n.queues)).sum();
    let singles = u64::from(config.vsock.is_some()) + u64::from(config.rng.is_some());
    let shares: u64 = config.fs.iter().map(|f| pids_per_share(f.queues)).sum();
    PIDS_FIXED
        + u64::from(config.cpus)
        + disk_queues * (1 + IO_WQ_WORKERS_PER_QUEUE)
        + net_pairs
        + singles
        + shares
}

/// Threads and processes of a virtio-fs share with `request_queues`: crib's log
/// forwarder, waiter, monitor and failover threads, virtiofsd's two processes (its
/// namespace sandbox forks) and 2 spare; per queue (the request queues and the
/// high-priority one) crib's call forwarder and virtiofsd's queue thread (its thread
/// pool is off by default).
pub fn pids_per_share(request_queues: u16) -> u64 {
    8 + 2 * (u64::from(request_queues) + 1)
}

/// What each share's virtiofsd adds to `memory.max`: its heap, stacks and file handles
/// (guest RAM, which it maps too, is already counted).
pub const VIRTIOFSD_OVERHEAD_BYTES: u64 = 64 << 20;

/// The limits of a VM's cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupLimits {
    /// `cpu.max`: [`cpu_max`].
    pub cpu_max: String,
    /// `memory.max`: [`memory_max`].
    pub memory_max: u64,
    /// `pids.max`: [`pids_max`].
    pub pids_max: u64,
}

impl CgroupLimits {
    pub fn for_vm(config: &VmConfig) -> Self {
        Self {
            cpu_max: cpu_max(config.cpus),
            memory_max: memory_max(config.memory_bytes)
                .saturating_add(VIRTIOFSD_OVERHEAD_BYTES * config.fs.len() as u64),
            pids_max: pids_max(config),
        }
    }
}

/// The cgroup of pod `name`.
pub fn cgroup_path(name: &str) -> PathBuf {
    Path::new(CGROUP_ROOT).join(CGROUP_PARENT).join(name)
}

/// The controllers missing from a `cgroup.controllers` line.
pub fn missing_controllers(available: &str) -> Vec<&'static str> {
    CONTROLLERS
        .into_iter()
        .filter(|c| !available.split_whitespace().any(|a| a == *c))
        .collect()
}

fn write_file(path: &Path, value: &str) -> Result<(), JailError> {
    std::fs::write(path, value).map_err(|source| JailError::CgroupWrite {
        path: path.to_path_buf(),
        source,
    })
}

/// Checks that cgroup v2 is at [`CGROUP_ROOT`] with every one of [`CONTROLLERS`].
pub fn check_cgroup() -> Result<(), JailError> {
    let controllers = Path::new(CGROUP_ROOT).join("cgroup.controllers");
    let available = std::fs::read_to_string(&controllers)
        .map_err(|_| JailError::NoCgroup2 { path: controllers })?;
    match missing_controllers(&available).first() {
        Some(controller) => Err(JailError::MissingController {
            controller,
            available: available.trim().to_string(),
        }),
        None => Ok(()),
    }
}

/// A pod's cgroup; removed by [`Cgroup::remove`].
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Makes the cgroup of pod `name` with its limits, removing a stale one first (a crib
    /// killed with -9 leaves it; the run directory's lock says no live pod owns it).
    pub fn create(name: &str, limits: &CgroupLimits) -> Result<Self, JailError> {
        check_cgroup()?;
        let root = Path::new(CGROUP_ROOT);
        let parent = root.join(CGROUP_PARENT);
        let enable = CONTROLLERS.map(|c| format!("+{c}")).join(" ");
        write_file(&root.join("cgroup.subtree_control"), &enable)?;
        std::fs::create_dir_all(&parent).map_err(path_error("mkdir", &parent))?;
        write_file(&parent.join("cgroup.subtree_control"), &enable)?;
        let path = cgroup_path(name);
        if path.exists() {
            tracing::warn!("removing the stale cgroup {}", path.display());
            remove_cgroup(&path).map_err(|source| JailError::StaleCgroup {
                path: path.clone(),
                source,
            })?;
        }
        std::fs::create_dir(&path).map_err(path_error("mkdir", &path))?;
        let cgroup = Self { path };
        write_file(&cgroup.path.join("cpu.max"), &limits.cpu_max)?;
        write_file(
            &cgroup.path.join("memory.max"),
            &limits.memory_max.to_string(),
        )?;
        write_file(&cgroup.path.join("pids.max"), &limits.pids_max.to_string())?;
        tracing::info!(
            "cgroup {}: cpu.max {}, memory.max {}, pids.max {}",
            cgroup.path.display(),
            limits.cpu_max,
            limits.memory_max,
            limits.pids_max
        );
        Ok(cgroup)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Kills what is left in the cgroup and removes it (best effort, logged).
    pub fn remove(self) {
        if let Err(e) = remove_cgroup(&self.path) {
            tracing::warn!("cannot remove the cgroup {}: {e}", self.path.display());
        }
    }
}

/// Kills the processes of the cgroup at `path` and removes it, waiting up to 2 s for them
/// to end.
fn remove_cgroup(path: &Path) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        // cgroup.kill (Linux 5.14) kills everything at once; else each listed process.
        if std::fs::write(path.join("cgroup.kill"), "1").is_err() {
            for pid in std::fs::read_to_string(path.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
            {
                // SAFETY: kill takes no memory; the pid is one the cgroup listed.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Refuses what the jail cannot hold yet, a crib that is not root and a host without
/// cgroup v2 or one of its controllers: before the pod's run directory, network or ids
/// are set up, so a refused start leaves nothing behind.
pub fn check_supported(has_vfio: bool) -> Result<(), JailError> {
    if has_vfio {
        return Err(JailError::Unsupported { what: "vfio" });
    }
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::NotRoot);
    }
    check_cgroup()
}

/// How many threads this process has (from /proc).
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count)
}

/// The child's pid, for the supervisor's signal handler; 0 before the fork.
static CHILD_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(signal: libc::c_int) {
    let pid = CHILD_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe and takes no memory.
        unsafe { libc::kill(pid, signal) };
    }
}

/// Runs `child` as PID 1 of a new PID namespace in a forked process and returns its exit
/// code once it ended. Until then SIGTERM and SIGINT sent to this process go to the child
/// (which is in its own process group, so a terminal's Ctrl-C reaches it once). Must be
/// called while crib has one thread.
pub fn supervise(child: impl FnOnce() -> u8) -> Result<u8, JailError> {
    let threads = thread_count();
    if threads != 1 {
        return Err(JailError::Threaded { threads });
    }
    // SAFETY: unshare takes no memory; CLONE_NEWPID changes only where this process's
    // next child goes.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(last_os_error("unshare(CLONE_NEWPID)"));
    }
    let mut blocked = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    let mut previous = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset/sigaddset fill the set they are given; sigprocmask reads
    // `blocked` and writes `previous`, both live sigset_t buffers. SIGTERM and SIGINT are
    // blocked across the fork so neither process dies of one before it is ready.
    unsafe {
        libc::sigemptyset(blocked.as_mut_ptr());
        libc::sigaddset(blocked.as_mut_ptr(), libc::SIGTERM);
        libc::sigaddset(blocked.as_mut_ptr(), libc::SIGINT);
        libc::sigprocmask(libc::SIG_BLOCK, blocked.as_ptr(), previous.as_mut_ptr());
    }
    // SAFETY: crib has one thread (checked above), so the child's copy of every lock and
    // allocator state is consistent.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last_os_error("fork"));
    }
    if pid == 0 {
        // SAFETY: prctl with integer arguments: the VM dies with its supervisor (killed
        // with -9, it can no longer remove the cgroup, the network or the sockets; the
        // next start of the pod does).
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
        // (getppid cannot tell whether the supervisor died before the prctl: from inside
        // the new PID namespace every parent is 0. That window is a few instructions.)
        // SAFETY: setpgid on this process takes no memory; sigprocmask reads `previous`,
        // initialized by the call above; close_range closes the descriptors past stdio
        // (the run directory's lock, the network keeper's): the jail keeps only what the
        // VM opens itself, and no object of this process uses them again (it never
        // returns from here).
        unsafe {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            libc::setpgid(0, 0);
            libc::sigprocmask(libc::SIG_SETMASK, previous.as_ptr(), std::ptr::null_mut());
        }
        let code = child();
        let _ = std::io::Write::flush(&mut std::io::stdout());
        std::process::exit(i32::from(code));
    }
    CHILD_PID.store(pid, Ordering::SeqCst);
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: forward_signal only calls kill(2), which is async-signal-safe.
        unsafe {
            libc::signal(
                signal,
                forward_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
    // SAFETY: sigprocmask reads `previous`, initialized above.
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, previous.as_ptr(), std::ptr::null_mut()) };
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status to `status`, a live c_int.
        let ret = unsafe { libc::waitpid(pid, &mut status, 0) };
        if ret == pid {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(JailError::Syscall {
                step: "waitpid",
                source: err,
            });
        }
    }
    Ok(if libc::WIFEXITED(status) {
        u8::try_from(libc::WEXITSTATUS(status)).unwrap_or(1)
    } else {
        tracing::error!("the jailed crib died of signal {}", libc::WTERMSIG(status));
        1
    })
}

/// The child's first step: into `cgroup`, new mount and IPC namespaces, every mount
/// private (nothing it mounts reaches the host).
pub fn enter(cgroup: &Path) -> Result<(), JailError> {
    write_file(&cgroup.join("cgroup.procs"), "0")?;
    // SAFETY: unshare takes no memory; the process has one thread (the fork's child).
    if unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC) } != 0 {
        return Err(last_os_error("unshare(CLONE_NEWNS | CLONE_NEWIPC)"));
    }
    mounted(
        Path::new("/"),
        mount_change(
            "/",
            MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
        ),
    )
}

/// A mount step's result, with the path it was about.
fn mounted(target: &Path, result: rustix::io::Result<()>) -> Result<(), JailError> {
    result.map_err(|errno| JailError::Path {
        step: "mount",
        path: target.to_path_buf(),
        source: errno.into(),
    })
}

/// Bind-mounts `path` (a file or a directory) at the same path under `root`.
fn bind_same_path(root: &Path, path: &Path, read_only: bool) -> Result<(), JailError> {
    let relative = path.strip_prefix("/").unwrap_or(path);
    let target = root.join(relative);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(path_error("mkdir", parent))?;
    }
    if path.is_dir() {
        std::fs::create_dir_all(&target).map_err(path_error("mkdir", &target))?;
    } else {
        std::fs::File::create(&target).map_err(path_error("create", &target))?;
    }
    mounted(&target, mount_bind(path, &target))?;
    if read_only {
        let flags = MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID;
        mounted(&target, mount_remount(&target, flags, ""))?;
    }
    Ok(())
}

/// (effective, permitted) of this thread.
fn capabilities() -> Result<(u64, u64), JailError> {
    let sets = rustix::thread::capabilities(None).map_err(|errno| JailError::Syscall {
        step: "capget",
        source: errno.into(),
    })?;
    Ok((sets.effective.bits(), sets.permitted.bits()))
}

/// Clears every capability set of this thread (dropping needs no privilege).
fn clear_capabilities() -> Result<(), JailError> {
    let none = CapabilitySets {
        effective: CapabilitySet::empty(),
        permitted: CapabilitySet::empty(),
        inheritable: CapabilitySet::empty(),
    };
    rustix::thread::set_capabilities(None, none).map_err(|errno| JailError::Syscall {
        step: "capset",
        source: errno.into(),
    })
}

/// Moves this process into a new, empty network namespace (only a loopback, down). What
/// crib opened before stays usable: a tap descriptor stays bound to its interface in the
/// host's namespace, and the Unix sockets crib binds or connects to are named by
/// filesystem paths, which no network namespace scopes. Nothing it opens afterwards can
/// reach a host interface, address or abstract Unix socket, or talk netlink to the host.
fn leave_host_network() -> Result<(), JailError> {
    // SAFETY: unshare takes no memory; the process has one thread (checked by `confine`).
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(last_os_error("unshare(CLONE_NEWNET)"));
    }
    Ok(())
}

/// What [`confine`] needs.
#[derive(Clone, Debug)]
pub struct Confinement {
    pub jail: Jail,
    pub run_dir: PathBuf,
    /// Sockets crib made in the run directory, handed to the jail's uid: crib connects
    /// to its own vsock socket (the docker proxy), and root's clients still can.
    pub sockets: Vec<PathBuf>,
}

/// Moves the process into its jail: a tmpfs root holding the run directory (at its host
/// path) and `/dev/null`, a network namespace of its own, then no capabilities (bounding set too), the jail's gid (no
/// supplementary groups) and uid, `no_new_privs`. Called with one thread, every file the
/// VM needs already open.
pub fn confine(c: &Confinement) -> Result<(), JailError> {
    let threads = thread_count();
    if threads != 1 {
        return Err(JailError::Threaded { threads });
    }
    let Jail { uid, gid } = c.jail;
    // The run directory: the jail's group may enter it (sockets, vsock_<port>) but not
    // write in it; the sockets are the jail's.
    let chown = |path: &Path, uid: u32, gid: u32| -> Result<(), JailError> {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(path_error("chown", path))
    };
    chown(&c.run_dir, 0, gid)?;
    std::fs::set_permissions(&c.run_dir, std::fs::Permissions::from_mode(0o710))
        .map_err(path_error("chmod", &c.run_dir))?;
    for socket in &c.sockets {
        chown(socket, uid, gid)?;
    }
    let cap_last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<libc::c_ulong>().ok())
        .unwrap_or(63);

    let root = c.run_dir.join(JAIL_DIR);
    std::fs::create_dir_all(&root).map_err(path_error("mkdir", &root))?;
    let hidden = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    mounted(&root, mount("tmpfs", &root, "tmpfs", hidden, None))?;
    bind_same_path(&root, &c.run_dir, false)?;
    bind_same_path(&root, Path::new("/dev/null"), false)?;
    // The tmpfs itself: read-only once filled (the binds keep their own flags).
    mounted(&root, mount_remount(&root, hidden | MountFlags::RDONLY, ""))?;
    // pivot_root(".", ".") stacks the old root on the new one, unmounted next.
    let step = |step: &'static str| {
        move |errno: rustix::io::Errno| JailError::Syscall {
            step,
            source: errno.into(),
        }
    };
    rustix::process::chdir(&root).map_err(step("chdir to the jail root"))?;
    rustix::process::pivot_root(".", ".").map_err(step("pivot_root"))?;
    unmount(".", UnmountFlags::DETACH).map_err(step("unmount the old root"))?;
    rustix::process::chdir("/").map_err(step("chdir /"))?;
    leave_host_network()?;

    for cap in 0..=cap_last {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            let err = std::io::Error::last_os_error();
            // EINVAL: a capability this kernel does not know (past cap_last_cap).
            if err.raw_os_error() != Some(libc::EINVAL) {
                return Err(JailError::Syscall {
                    step: "prctl(PR_CAPBSET_DROP)",
                    source: err,
                });
            }
        }
    }
    // SAFETY: prctl, setgroups, setresgid and setresuid take integers (setgroups a null
    // list of length 0); with one thread glibc's set*id broadcast reaches only this one.
    unsafe {
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ) != 0
        {
            return Err(last_os_error("prctl(PR_CAP_AMBIENT_CLEAR_ALL)"));
        }
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(last_os_error("setgroups([])"));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(last_os_error("setresgid"));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(last_os_error("setresuid"));
        }
    }
    clear_capabilities()?;
    // SAFETY: prctl with integer arguments only.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(last_os_error("prctl(PR_SET_NO_NEW_PRIVS)"));
        }
        // The uid change cleared the parent-death signal [`supervise`] set: set it again,
        // or a supervisor killed with -9 would leave the VM running, unsupervised.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            return Err(last_os_error("prctl(PR_SET_PDEATHSIG)"));
        }
    }
    let (effective, permitted) = capabilities()?;
    // SAFETY: getuid/getgid cannot fail and touch no memory.
    let (now_uid, now_gid) = unsafe { (libc::getuid(), libc::getgid()) };
    if effective != 0 || permitted != 0 || now_uid != uid || now_gid != gid {
        return Err(JailError::NotDropped {
            uid: now_uid,
            gid: now_gid,
            effective,
            permitted,
        });
    }
    tracing::info!(
        "jailed: uid {uid}, gid {gid}, root = tmpfs with {} and /dev/null, own network namespace, no capabilities",
        c.run_dir.display()
    );
    Ok(())
}

/// The supervisor's clean-up once the child ended: the run directory back to root alone,
/// the jail's mount point gone.
pub fn restore_run_dir(run_dir: &Path) {
    let _ = std::fs::remove_dir(run_dir.join(JAIL_DIR));
    // virtiofsd's sockets and pid files: the jailed VMM could not remove them.
    crate::fs::remove_run_dir_sockets(run_dir);
    let _ = std::os::unix::fs::chown(run_dir, Some(0), Some(0));
    let _ = std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o700));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_accepts_unprivileged_ids() {
        let spec = JailIds {
            uid: 100_000,
            gid: 100_001,
        };

        assert_eq!(
            spec.check(),
            Ok(Jail {
                uid: 100_000,
                gid: 100_001
            })
        );
    }

    #[test]
    fn check_refuses_uid_zero_naming_the_field() {
        let spec = JailIds { uid: 0, gid: 1000 };

        let (field, problem) = spec.check().unwrap_err();

        assert_eq!(field, "jail.uid");
        assert!(problem.contains("root"), "{problem}");
    }

    #[test]
    fn check_refuses_gid_zero_naming_the_field() {
        let spec = JailIds { uid: 1000, gid: 0 };

        assert_eq!(spec.check().unwrap_err().0, "jail.gid");
    }

    #[test]
    fn check_refuses_the_overflow_id() {
        let spec = JailIds {
            uid: 65534,
            gid: 1000,
        };

        assert!(spec.check().unwrap_err().1.contains("nobody"));
    }

    #[test]
    fn check_refuses_minus_one_as_out_of_range() {
        // (uid_t)-1 tells setresuid "leave unchanged": it must never be a jail's uid.
        let spec = JailIds {
            uid: 1000,
            gid: u64::from(u32::MAX),
        };

        let (field, problem) = spec.check().unwrap_err();

        assert_eq!(field, "jail.gid");
        assert!(problem.contains("4294967294"), "{problem}");
    }

    #[test]
    fn cpu_max_gives_one_host_cpu_per_vcpu() {
        assert_eq!(cpu_max(2), "200000 100000");
    }

    #[test]
    fn memory_max_adds_the_vmm_overhead() {
        assert_eq!(memory_max(512 << 20), (512 << 20) + VMM_OVERHEAD_BYTES);
    }

    #[test]
    fn memory_max_saturates() {
        assert_eq!(memory_max(u64::MAX), u64::MAX);
    }

    #[test]
    fn missing_controllers_names_each_absent_one() {
        assert_eq!(missing_controllers("cpuset io pids memory\n"), ["cpu"]);
    }

    #[test]
    fn missing_controllers_is_empty_when_all_are_there() {
        assert!(missing_controllers("cpuset cpu io memory hugetlb pids").is_empty());
    }

    #[test]
    fn missing_controllers_names_pids() {
        assert_eq!(missing_controllers("cpu memory io"), ["pids"]);
    }

    #[test]
    fn missing_controller_error_names_it_and_the_fix() {
        let error = JailError::MissingController {
            controller: "pids",
            available: "cpu memory".into(),
        };

        let text = error.to_string();

        assert!(text.contains("lacks the pids controller"), "{text}");
        assert!(text.contains("enable it"), "{text}");
    }

    /// A VM with `cpus` vCPUs and nothing else.
    fn bare_vm(cpus: u8) -> VmConfig {
        let mut config = VmConfig::new("/k");
        config.cpus = cpus;
        config.vsock = None;
        config.rng = None;
        config
    }

    #[test]
    fn pids_max_of_a_bare_vm_is_the_fixed_part_and_its_vcpus() {
        assert_eq!(pids_max(&bare_vm(4)), PIDS_FIXED + 4);
    }

    #[test]
    fn pids_max_counts_each_disk_queue_with_its_io_wq_workers() {
        let mut config = bare_vm(1);
        let disk: crate::config::DiskConfig =
            serde_json::from_value(serde_json::json!({"path": "/d", "id": "d", "queues": 3}))
                .unwrap();
        config.disks = vec![disk];

        // 3 queues × (a worker + 4 io-wq workers).
        assert_eq!(pids_max(&config), PIDS_FIXED + 1 + 15);
    }

    #[test]
    fn pids_max_counts_net_pairs_vsock_and_rng() {
        let mut config = bare_vm(2);
        let net: crate::config::NetConfig =
            serde_json::from_value(serde_json::json!({"tap": "t0", "queues": 2})).unwrap();
        config.net = vec![net];
        config.vsock = Some(crate::config::VsockConfig {
            cid: 3,
            socket: "/v".into(),
        });
        config.rng = Some(Default::default());

        assert_eq!(pids_max(&config), PIDS_FIXED + 2 + 2 + 1 + 1);
    }

    #[test]
    fn pids_fixed_is_the_value_docs_jail_md_quotes() {
        // main 1 + API 1 + 2 × 32 + docker 1 + 2 × 32 + shutdown 1 + KVM's 1 + spare 16.
        assert_eq!(PIDS_FIXED, 149);
    }

    #[test]
    fn pids_max_counts_each_share_with_its_virtiofsd() {
        let mut config = bare_vm(1);
        config.fs = vec![crate::config::parse_fs("tag=gfs,dir=/s,queues=2").unwrap()];

        // 8 + 2 × (2 request queues + the high-priority one).
        assert_eq!(pids_max(&config), PIDS_FIXED + 1 + 14);
    }

    #[test]
    fn memory_max_adds_each_virtiofsd() {
        let mut config = bare_vm(1);
        config.memory_bytes = 256 << 20;
        config.fs = vec![crate::config::parse_fs("tag=gfs,dir=/s").unwrap()];

        let limits = CgroupLimits::for_vm(&config);

        assert_eq!(
            limits.memory_max,
            (256 << 20) + VMM_OVERHEAD_BYTES + VIRTIOFSD_OVERHEAD_BYTES
        );
    }

    #[test]
    fn limits_for_a_vm_fill_all_three_files() {
        let mut config = bare_vm(2);
        config.memory_bytes = 256 << 20;

        let limits = CgroupLimits::for_vm(&config);

        assert_eq!(
            limits,
            CgroupLimits {
                cpu_max: "200000 100000".into(),
                memory_max: (256 << 20) + VMM_OVERHEAD_BYTES,
                pids_max: PIDS_FIXED + 2,
            }
        );
    }

    #[test]
    fn cgroup_path_is_under_crib() {
        assert_eq!(
            cgroup_path("web"),
            Path::new("/sys/fs/cgroup/crib/web").to_path_buf()
        );
    }
}
