//! The container set-up stage: cradle re-executed as `/init --container-init PLAN` by the
//! registry, a fresh single-threaded process whose stdio are the container's.
//!
//! 1. `unshare` mount, UTS, IPC and PID namespaces, then `fork`: the child is PID 1 of
//!    the new PID namespace.
//! 2. The child mounts the overlay root (the image's layers and the container's writable
//!    layer), a fresh /proc, a read-only /sys, a /dev tmpfs with the standard nodes bound
//!    from cradle's, /dev/pts (a new instance), /dev/shm, writes /etc/hostname,
//!    /etc/hosts and /etc/resolv.conf, sets the hostname, moves the root over / and chroots into it (cradle runs from the
//!    initramfs, where pivot_root is refused),
//!    resolves the user in the image's /etc/passwd, drops to it and `exec`s the argv.
//! 3. The parent stays as the container's shim: it forwards every signal it gets to the
//!    child and exits as the child does (a signal death is re-raised), so the registry
//!    sees the container's own exit. The child dies with the shim (PDEATHSIG).
//!
//! Errors go to stderr (the container's log) as `cradle: container NAME: ...`; the
//! stage then exits with 126 (set-up) or 127 (program not found), as Docker does.

use std::ffi::CString;
use std::fmt::Display;
use std::fs;
use std::io::{self, IsTerminal, Write};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::{makedev, mknodat, FileType, Mode, CWD};
use rustix::mount::{
    mount, mount_bind, mount_change, mount_move, mount_remount, MountFlags, MountPropagationFlags,
};
use rustix::process::{chroot, fchdir, set_parent_process_death_signal, Signal};
use std::os::fd::{AsFd, AsRawFd};

use rustix::thread::{
    move_into_link_name_space, remove_capability_from_bounding_set, CapabilitySet,
    LinkNameSpaceType,
};
use rustix::thread::{set_thread_gid, set_thread_groups, set_thread_uid, Gid, Uid, UnshareFlags};

use super::plan::ContainerPlan;
use super::user;

/// Exit code of a container whose set-up failed (Docker's "cannot invoke").
const EXIT_SETUP: i32 = 126;
/// Exit code when the program is not in the image (Docker's "not found").
const EXIT_NOT_FOUND: i32 = 127;
/// Device nodes of the container's /dev: name, major, minor (Linux's devices.txt).
const DEV_NODES: &[(&str, u32, u32)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Runs the stage with the plan in `json`; never returns.
pub fn main(json: &str) -> ! {
    let plan: ContainerPlan = match serde_json::from_str(json) {
        Ok(plan) => plan,
        Err(error) => fail("?", EXIT_SETUP, &format!("bad container plan: {error}")),
    };
    if let Some(cgroup) = &plan.cgroup {
        // The shim and everything it starts.
        if let Err(error) = fs::write(cgroup.join("cgroup.procs"), "0") {
            fail(
                &plan.name,
                EXIT_SETUP,
                &format!("cannot enter the cgroup {}: {error}", cgroup.display()),
            );
        }
    }
    // SAFETY: no FILES flag: the descriptor table is not unshared. This process was just
    // exec'ed and has one thread.
    let unshared = unsafe {
        rustix::thread::unshare_unsafe(
            UnshareFlags::NEWNS
                | UnshareFlags::NEWUTS
                | UnshareFlags::NEWIPC
                | UnshareFlags::NEWPID
                | UnshareFlags::NEWCGROUP,
        )
    };
    if let Err(error) = unshared {
        fail(
            &plan.name,
            EXIT_SETUP,
            &format!("cannot create namespaces: {error}"),
        );
    }
    let all = block_all_signals();
    // SAFETY: the process has one thread (fresh exec, no thread started), so the child
    // may run any code, not only async-signal-safe calls.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => fail(
            &plan.name,
            EXIT_SETUP,
            &format!("cannot fork: {}", io::Error::last_os_error()),
        ),
        0 => {
            let error = container_init(&plan, &all);
            let code = if error.kind() == io::ErrorKind::NotFound {
                EXIT_NOT_FOUND
            } else {
                EXIT_SETUP
            };
            fail(&plan.name, code, &error.to_string())
        }
        child => {
            // Best effort: only `docker exec` needs it.
            let _ = fs::write(plan.pid_file(), child.to_string());
            shim(child, &all)
        }
    }
}

/// Prints the error to stderr and exits.
fn fail(name: &str, code: i32, message: &str) -> ! {
    let _ = writeln!(io::stderr(), "cradle: container {name}: {message}");
    std::process::exit(code)
}

/// Blocks every signal and returns the set (the shim waits for them; the child unblocks).
fn block_all_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigfillset initialises it fully below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both calls take pointers to the live local `set`; a null old-set pointer
    // is allowed.
    unsafe {
        libc::sigfillset(&mut set);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

/// Forwards signals to `child` until it exits, then exits as it did.
fn shim(child: libc::pid_t, set: &libc::sigset_t) -> ! {
    loop {
        // SAFETY: siginfo_t is plain data the call fills in.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` and `info` are live for the call; the kernel writes only `info`.
        let signal = unsafe { libc::sigwaitinfo(set, &mut info) };
        if signal < 0 {
            continue;
        }
        if signal != libc::SIGCHLD {
            // SAFETY: kill takes no memory; `child` is this process's child.
            unsafe { libc::kill(child, signal) };
            continue;
        }
        let mut status = 0;
        // SAFETY: waitpid writes one int into the live local `status`.
        let done = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
        if done != child {
            continue;
        }
        if libc::WIFEXITED(status) {
            std::process::exit(libc::WEXITSTATUS(status));
        }
        let signal = libc::WTERMSIG(status);
        // Die of the same signal, so the registry sees it; 128+N if it cannot kill us.
        // SAFETY: signal, sigprocmask and raise take no memory but the live `set`.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            libc::sigprocmask(libc::SIG_UNBLOCK, set, std::ptr::null_mut());
            libc::raise(signal);
        }
        std::process::exit(128 + signal);
    }
}

/// Adds what failed to an error.
fn context<T>(what: impl Display, result: io::Result<T>) -> io::Result<T> {
    result.map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))
}

fn rustix_context<T>(what: impl Display, result: rustix::io::Result<T>) -> io::Result<T> {
    context(what, result.map_err(io::Error::from))
}

/// The container's PID 1 before exec: builds the root and runs the process. Returns only
/// on failure.
fn container_init(plan: &ContainerPlan, blocked: &libc::sigset_t) -> io::Error {
    match set_up_and_exec(plan, blocked) {
        Ok(never) => match never {},
        Err(error) => error,
    }
}

fn set_up_and_exec(
    plan: &ContainerPlan,
    blocked: &libc::sigset_t,
) -> io::Result<std::convert::Infallible> {
    rustix_context(
        "cannot die with the shim",
        set_parent_process_death_signal(Some(Signal::KILL)),
    )?;
    rustix_context(
        "cannot make mounts private",
        mount_change(
            "/",
            MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
        ),
    )?;
    let root = plan.root();
    if let Some(source) = &plan.root_bind {
        // A rootfs share: the host's snapshot is the writable root already.
        rustix_context(
            format!("cannot bind the root {}", source.display()),
            mount_bind(source, &root),
        )?;
    } else {
        let options = CString::new(plan.overlay_options())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        rustix_context(
            format!("cannot mount the overlay root ({})", plan.overlay_options()),
            mount(
                "overlay",
                &root,
                "overlay",
                MountFlags::empty(),
                Some(options.as_c_str()),
            ),
        )?;
    }
    let resolv = fs::read("/etc/resolv.conf").ok();
    // Opened now, bound after the pivot through /proc/self/fd: the target path then
    // resolves inside the container, whatever symlinks the image has.
    let mut sources = Vec::with_capacity(plan.mounts.len());
    for (source, path, readonly) in &plan.mounts {
        let dir = context(
            format!("cannot open {} for {path}", source.display()),
            fs::File::open(source),
        )?;
        sources.push((dir, path.as_str(), *readonly));
    }
    // A process with a TTY (the registry's pty on stdin): its /dev/pts is cradle's, bound
    // like the mounts, so the terminal it has is in its /dev/pts (`tty` prints
    // /dev/pts/N), not in a new instance.
    let host_pts = if io::stdin().is_terminal() {
        Some(context("cannot open /dev/pts", fs::File::open("/dev/pts"))?)
    } else {
        None
    };
    // cradle runs from the initramfs (rootfs), where pivot_root is refused (EINVAL): the
    // overlay is moved over / in this mount namespace and becomes the root by chroot,
    // as runc's no-pivot mode does. CAP_SYS_CHROOT leaves the bounding set before exec,
    // so the process cannot chroot its way back out.
    context("cannot enter the root", std::env::set_current_dir(&root))?;
    rustix_context("cannot move the root over /", mount_move(".", "/"))?;
    rustix_context("cannot chroot", chroot("."))?;
    context("cannot enter /", std::env::set_current_dir("/"))?;
    // From here on every path, symlinks in the image included, resolves inside the
    // container's root.
    mount_system(Path::new("/"), host_pts.as_ref())?;
    drop(host_pts);
    if plan.cgroup.is_some() {
        // Its own cgroup as the root (cgroup namespace), read-only: limits visible.
        rustix_context(
            "cannot mount /sys/fs/cgroup",
            mount(
                "cgroup2",
                "/sys/fs/cgroup",
                "cgroup2",
                MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
                None,
            ),
        )?;
    }
    write_etc(Path::new("/"), &plan.name, resolv.as_deref())?;
    for (dir, path, readonly) in &sources {
        context(format!("cannot create {path}"), fs::create_dir_all(path))?;
        let fd = format!("/proc/self/fd/{}", dir.as_raw_fd());
        rustix_context(
            format!("cannot bind-mount onto {path}"),
            mount_bind(&fd, *path),
        )?;
        if *readonly {
            rustix_context(
                format!("cannot make {path} read-only"),
                mount_remount(*path, MountFlags::BIND | MountFlags::RDONLY, ""),
            )?;
        }
    }
    drop(sources);
    rustix_context(
        "cannot set the hostname",
        rustix::system::sethostname(plan.name.as_bytes()),
    )?;

    become_user_and_exec(
        &plan.name, &plan.argv, &plan.env, &plan.cwd, &plan.user, blocked,
    )
}

/// In the container's root: resolves `user` in its /etc/passwd and /etc/group, drops to
/// it, enters `cwd` and execs `argv` with `env` (plus HOSTNAME and HOME). Returns only on
/// failure.
fn become_user_and_exec(
    name: &str,
    argv: &[String],
    plan_env: &[String],
    cwd: &str,
    user_spec: &str,
    blocked: &libc::sigset_t,
) -> io::Result<std::convert::Infallible> {
    rustix_context(
        "cannot drop CAP_SYS_CHROOT",
        remove_capability_from_bounding_set(CapabilitySet::SYS_CHROOT),
    )?;
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = fs::read_to_string("/etc/group").unwrap_or_default();
    let who = user::resolve(user_spec, &passwd, &group)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    // Docker creates a missing WorkingDir.
    let _ = fs::create_dir_all(cwd);
    let groups: Vec<Gid> = who.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    rustix_context("cannot set the groups", set_thread_groups(&groups))?;
    rustix_context("cannot set the gid", set_thread_gid(Gid::from_raw(who.gid)))?;
    rustix_context("cannot set the uid", set_thread_uid(Uid::from_raw(who.uid)))?;
    context(
        format!("cannot enter the working directory {cwd}"),
        std::env::set_current_dir(cwd),
    )?;

    let mut env: Vec<(String, String)> = plan_env
        .iter()
        .filter_map(|e| e.split_once('=').map(|(n, v)| (n.to_owned(), v.to_owned())))
        .collect();
    for (key, value) in [("HOSTNAME", name), ("HOME", who.home.as_str())] {
        if !env.iter().any(|(n, _)| n == key) {
            env.push((key.to_owned(), value.to_owned()));
        }
    }
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty argv"))?;
    // SAFETY: the set is live; the process has one thread.
    unsafe { libc::sigprocmask(libc::SIG_UNBLOCK, blocked, std::ptr::null_mut()) };
    let error = Command::new(program)
        .args(args)
        .env_clear()
        .envs(env)
        .exec();
    Err(io::Error::new(
        error.kind(),
        format!("cannot run {program}: {error}"),
    ))
}

/// /proc, /sys (read-only), /dev with its nodes, /dev/pts (a new instance, or
/// `host_pts` bound), /dev/shm.
fn mount_system(root: &Path, host_pts: Option<&fs::File>) -> io::Result<()> {
    let dir = |name: &str| -> io::Result<PathBuf> {
        let path = root.join(name);
        context(format!("cannot create /{name}"), fs::create_dir_all(&path))?;
        Ok(path)
    };
    let proc_dir = dir("proc")?;
    rustix_context(
        "cannot mount /proc",
        mount(
            "proc",
            &proc_dir,
            "proc",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            None,
        ),
    )?;
    let sys = dir("sys")?;
    rustix_context(
        "cannot mount /sys",
        mount(
            "sysfs",
            &sys,
            "sysfs",
            MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            None,
        ),
    )?;
    let dev = dir("dev")?;
    let mode = c"mode=755";
    rustix_context(
        "cannot mount /dev",
        mount("tmpfs", &dev, "tmpfs", MountFlags::NOSUID, Some(mode)),
    )?;
    for (node, major, minor) in DEV_NODES {
        rustix_context(
            format!("cannot create /dev/{node}"),
            mknodat(
                CWD,
                dev.join(node),
                FileType::CharacterDevice,
                Mode::from_raw_mode(0o666),
                makedev(*major, *minor),
            ),
        )?;
        // The umask took bits off.
        context(
            format!("cannot chmod /dev/{node}"),
            fs::set_permissions(dev.join(node), fs::Permissions::from_mode(0o666)),
        )?;
    }
    let pts = dev.join("pts");
    context("cannot create /dev/pts", fs::create_dir_all(&pts))?;
    match host_pts {
        Some(dir) => {
            let fd = format!("/proc/self/fd/{}", dir.as_raw_fd());
            rustix_context("cannot bind-mount /dev/pts", mount_bind(&fd, &pts))?;
        }
        None => {
            let pts_options = c"newinstance,ptmxmode=0666,mode=0620";
            rustix_context(
                "cannot mount /dev/pts",
                mount(
                    "devpts",
                    &pts,
                    "devpts",
                    MountFlags::NOSUID | MountFlags::NOEXEC,
                    Some(pts_options),
                ),
            )?;
        }
    }
    let shm = dev.join("shm");
    context("cannot create /dev/shm", fs::create_dir_all(&shm))?;
    let shm_options = c"mode=1777";
    rustix_context(
        "cannot mount /dev/shm",
        mount(
            "shm",
            &shm,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            Some(shm_options),
        ),
    )?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        context(
            format!("cannot link /dev/{link}"),
            symlink(target, dev.join(link)),
        )?;
    }
    Ok(())
}

/// /etc/hostname, /etc/hosts, /etc/resolv.conf (cradle's, if it has one) in the
/// container's writable layer.
fn write_etc(root: &Path, hostname: &str, resolv: Option<&[u8]>) -> io::Result<()> {
    let etc = root.join("etc");
    context("cannot create /etc", fs::create_dir_all(&etc))?;
    let hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
    );
    for (name, contents) in [("hostname", format!("{hostname}\n")), ("hosts", hosts)] {
        let path = etc.join(name);
        // A symlink in the image (to a path outside) is replaced, not followed.
        let _ = fs::remove_file(&path);
        context(
            format!("cannot write /etc/{name}"),
            fs::write(&path, contents),
        )?;
    }
    if let Some(resolv) = resolv {
        let path = etc.join("resolv.conf");
        let _ = fs::remove_file(&path);
        context("cannot write /etc/resolv.conf", fs::write(&path, resolv))?;
    }
    Ok(())
}

/// What `docker exec` runs in a container.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ExecPlan {
    pub name: String,
    /// Holds the container's PID 1 (as cradle sees it).
    pub pid_file: PathBuf,
    pub cgroup: Option<PathBuf>,
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: String,
}

/// `docker exec` in a container: joins the container's cgroup and namespaces (`setns`,
/// mount last), forks into its PID namespace and runs the command as the container does
/// (its user, env, cwd), this process staying as the shim. Never returns.
pub fn exec_main(json: &str) -> ! {
    let plan: ExecPlan = match serde_json::from_str(json) {
        Ok(plan) => plan,
        Err(error) => fail("?", EXIT_SETUP, &format!("bad exec plan: {error}")),
    };
    if let Err(error) = enter(&plan) {
        fail(
            &plan.name,
            EXIT_SETUP,
            &format!("cannot enter the container: {error}"),
        );
    }
    let all = block_all_signals();
    // SAFETY: one thread (fresh exec): the child may run any code.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => fail(
            &plan.name,
            EXIT_SETUP,
            &format!("cannot fork: {}", io::Error::last_os_error()),
        ),
        0 => {
            let _ = set_parent_process_death_signal(Some(Signal::KILL));
            let error = match become_user_and_exec(
                &plan.name, &plan.argv, &plan.env, &plan.cwd, &plan.user, &all,
            ) {
                Ok(never) => match never {},
                Err(error) => error,
            };
            let code = if error.kind() == io::ErrorKind::NotFound {
                EXIT_NOT_FOUND
            } else {
                EXIT_SETUP
            };
            fail(&plan.name, code, &error.to_string())
        }
        child => shim(child, &all),
    }
}

/// Joins the container of `plan`: its cgroup, then its namespaces.
fn enter(plan: &ExecPlan) -> io::Result<()> {
    let pid = context(
        "the container is not running",
        fs::read_to_string(&plan.pid_file),
    )?;
    let pid = pid.trim();
    if let Some(cgroup) = &plan.cgroup {
        context(
            "cannot join its cgroup",
            fs::write(cgroup.join("cgroup.procs"), "0"),
        )?;
    }
    // Open them all first: after the mount namespace /proc is the container's.
    let root = context(
        format!("cannot open /proc/{pid}/root"),
        fs::File::open(format!("/proc/{pid}/root")),
    )?;
    let mut links = Vec::new();
    for (ns, kind) in [
        ("cgroup", LinkNameSpaceType::ControlGroup),
        ("ipc", LinkNameSpaceType::InterProcessCommunication),
        ("uts", LinkNameSpaceType::HostNameAndNISDomainName),
        ("pid", LinkNameSpaceType::ProcessID),
        ("mnt", LinkNameSpaceType::Mount),
    ] {
        let path = format!("/proc/{pid}/ns/{ns}");
        let file = context(format!("cannot open {path}"), fs::File::open(&path))?;
        links.push((file, kind, path));
    }
    for (file, kind, path) in links {
        rustix_context(
            format!("cannot join {path}"),
            move_into_link_name_space(file.as_fd(), Some(kind)),
        )?;
    }
    // setns put us at the namespace's root mount (the initramfs); the container's root is
    // the overlay its PID 1 chrooted into.
    rustix_context("cannot enter the container's root", fchdir(&root))?;
    rustix_context("cannot chroot", chroot("."))?;
    context("cannot enter /", std::env::set_current_dir("/"))?;
    Ok(())
}
