//! Turns `--fs` into virtio-fs devices. `socket=` connects to a running vhost-user-fs
//! backend; `dir=` starts a virtiofsd for the directory first and supervises it: its
//! stderr goes to crib's log, and its exit is logged (the device then answers the guest
//! with errors, see `devices::virtio::fs::failover`), never the VM's exit.
//!
//! Starting one starts no thread of crib's: the supervision ([`Daemon::supervise`]) comes
//! later, once a jailed pod's VMM has confined itself, which it must do single-threaded
//! (docs/JAIL.md).

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use devices::virtio::fs::{Fs, FsConfig as DeviceConfig, FsError};

use crate::config::FsConfig;

/// The environment variable naming the virtiofsd binary.
pub const VIRTIOFSD_ENV: &str = "CRIB_VIRTIOFSD";
/// `none` or `namespace` (virtiofsd's `--sandbox`); crib's default is `namespace` as
/// root, `none` otherwise.
pub const SANDBOX_ENV: &str = "CRIB_VIRTIOFSD_SANDBOX";
/// How long a fresh virtiofsd gets to create its socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors setting up a share.
#[derive(Debug, thiserror::Error)]
pub enum FsSetupError {
    #[error(
        "cannot find virtiofsd (looked for {looked}, and on PATH): set {VIRTIOFSD_ENV}, run \
         scripts/install-virtiofsd.sh (installs target/tools/bin/virtiofsd), or put it on PATH"
    )]
    NoVirtiofsd { looked: String },
    #[error("--fs tag={tag}: dir={dir} is not a directory")]
    NotADirectory { tag: String, dir: PathBuf },
    #[error("--fs tag={tag}: cannot start {binary}")]
    Spawn {
        tag: String,
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--fs tag={tag}: virtiofsd exited before creating its socket {socket} ({status}); see its log lines above")]
    EarlyExit {
        tag: String,
        socket: PathBuf,
        status: String,
    },
    #[error(
        "--fs tag={tag}: virtiofsd did not create its socket {socket} within {START_TIMEOUT:?}"
    )]
    Timeout { tag: String, socket: PathBuf },
    #[error("--fs tag={tag}")]
    Device {
        tag: String,
        #[source]
        source: FsError,
    },
}

/// The virtiofsd binary: `$CRIB_VIRTIOFSD`, `target/tools/bin/virtiofsd` (next to crib's
/// own target directory, or under the current directory), else `virtiofsd` on PATH.
/// Looked up once per process: a jailed pod's supervisor looks before its child enters a
/// mount namespace of its own, where `/proc/self/exe` may name crib by a path of the old
/// namespace (a chrooted crib's then starts with the chroot's directory).
pub fn find_virtiofsd() -> Option<PathBuf> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| virtiofsd_candidates().into_iter().find(|p| p.is_file()))
        .clone()
}

/// Where [`find_virtiofsd`] looks, in order: [`own_virtiofsd_candidates`], then PATH
/// (unless `$CRIB_VIRTIOFSD` names the binary).
fn virtiofsd_candidates() -> Vec<PathBuf> {
    let mut candidates = own_virtiofsd_candidates();
    if std::env::var_os(VIRTIOFSD_ENV).is_none() {
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path).map(|d| d.join("virtiofsd")));
        }
    }
    candidates
}

/// `$CRIB_VIRTIOFSD` alone when it is set, else `target/tools/bin/virtiofsd` next to
/// crib's own target directory and under the current directory.
fn own_virtiofsd_candidates() -> Vec<PathBuf> {
    if let Some(path) = std::env::var_os(VIRTIOFSD_ENV) {
        return vec![PathBuf::from(path)];
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/debug/crib (or target/debug/deps/<test>) -> target/tools/bin/virtiofsd
        candidates.extend(
            exe.ancestors()
                .skip(2)
                .take(2)
                .map(|target| target.join("tools/bin/virtiofsd")),
        );
    }
    candidates.push(PathBuf::from("target/tools/bin/virtiofsd"));
    candidates
}

/// The places [`find_virtiofsd`] looks before PATH, for an error.
fn virtiofsd_places() -> String {
    let exe = match std::env::current_exe() {
        Ok(exe) => format!("crib is {}", exe.display()),
        Err(e) => format!("crib's own path is unknown: {e}"),
    };
    let places: Vec<String> = own_virtiofsd_candidates()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    format!("{} ({exe})", places.join(", "))
}

/// A virtiofsd crib started. Closing the device's vhost-user connection ends the daemon,
/// and it gets SIGTERM if crib dies first.
pub struct Daemon {
    pub tag: String,
    pub pid: u32,
    pub socket: PathBuf,
    /// Until [`Daemon::supervise`] hands it to its threads.
    child: Option<Child>,
}

impl Daemon {
    /// Forwards virtiofsd's stderr to crib's log and logs its exit, on two threads of
    /// crib's. Until then its log lines wait in the pipe.
    pub fn supervise(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let tag = self.tag.as_str();
        let pid = self.pid;
        if let Some(stderr) = child.stderr.take() {
            let log_tag = tag.to_string();
            let spawned = std::thread::Builder::new()
                .name(format!("virtiofsd-{tag}-log"))
                .spawn(move || {
                    for line in BufReader::new(stderr).lines() {
                        match line {
                            Ok(line) => tracing::info!("virtiofsd[{log_tag}]: {line}"),
                            Err(_) => break,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!("virtiofsd[{tag}]: cannot forward its log: {e}");
            }
        }
        let supervised_tag = tag.to_string();
        let spawned = std::thread::Builder::new()
            .name(format!("virtiofsd-{tag}"))
            .spawn(move || match child.wait() {
                Ok(status) if status.success() => {
                    tracing::info!("virtiofsd[{supervised_tag}] (pid {pid}) exited")
                }
                Ok(status) => tracing::error!(
                    "virtiofsd[{supervised_tag}] (pid {pid}) ended: {status}; the guest's mount \
                     of '{supervised_tag}' now fails, the VM keeps running"
                ),
                Err(e) => tracing::error!("virtiofsd[{supervised_tag}]: cannot wait for it: {e}"),
            });
        if let Err(e) = spawned {
            tracing::warn!("virtiofsd[{tag}]: cannot supervise it: {e}");
        }
    }
}

impl Drop for Daemon {
    /// virtiofsd removes its socket when it ends, but not the `<socket>.pid` file it locks;
    /// without this every VM with a `dir=` share left one behind in the temp dir.
    fn drop(&mut self) {
        remove_socket_files(&self.socket);
    }
}

fn pid_file(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".pid");
    PathBuf::from(name)
}

fn remove_socket_files(socket: &Path) {
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_file(pid_file(socket));
}

/// The crib pid in a socket name `crib-<pid>-fs<index>-<tag>.sock[.pid]` made by [`create`].
fn owner_pid(name: &str) -> Option<libc::pid_t> {
    let rest = name.strip_prefix("crib-")?;
    let (pid, rest) = rest.split_once('-')?;
    if !rest.starts_with("fs") || !(name.ends_with(".sock") || name.ends_with(".sock.pid")) {
        return None;
    }
    pid.parse().ok().filter(|&pid| pid > 0)
}

/// Removes the socket files of cribs that died without cleaning up (kill -9): their pid is
/// gone. A live process with a reused pid keeps its files, which is only untidy.
fn sweep_stale_sockets(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(owner_pid) else {
            continue;
        };
        // SAFETY: signal 0 only checks whether the pid exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Starts virtiofsd for `dir` with its socket at `socket`; returns once the socket exists.
fn start_virtiofsd(tag: &str, dir: &Path, socket: &Path) -> Result<Daemon, FsSetupError> {
    if !dir.is_dir() {
        return Err(FsSetupError::NotADirectory {
            tag: tag.into(),
            dir: dir.into(),
        });
    }
    let binary = find_virtiofsd().ok_or_else(|| FsSetupError::NoVirtiofsd {
        looked: virtiofsd_places(),
    })?;
    let sandbox = std::env::var(SANDBOX_ENV).unwrap_or_else(|_| {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        if root { "namespace" } else { "none" }.to_string()
    });
    let _ = std::fs::remove_file(socket);
    let mut command = Command::new(&binary);
    command
        .arg(format!("--socket-path={}", socket.display()))
        .arg(format!("--shared-dir={}", dir.display()))
        .arg(format!("--sandbox={sandbox}"))
        .arg("--log-level=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the
    // parent; it makes the daemon end with crib.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|source| FsSetupError::Spawn {
        tag: tag.into(),
        binary: binary.clone(),
        source,
    })?;
    let pid = child.id();
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            log_pending_stderr(&mut child, tag);
            return Err(FsSetupError::EarlyExit {
                tag: tag.into(),
                socket: socket.into(),
                status: status.to_string(),
            });
        }
        if std::fs::metadata(socket).is_ok_and(|m| m.file_type().is_socket()) {
            break;
        }
        if Instant::now() > deadline {
            // SAFETY: pid is our child, not yet reaped (try_wait saw it running).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            let _ = child.wait();
            log_pending_stderr(&mut child, tag);
            return Err(FsSetupError::Timeout {
                tag: tag.into(),
                socket: socket.into(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Daemon {
        tag: tag.into(),
        pid,
        socket: socket.into(),
        child: Some(child),
    })
}

/// Logs what virtiofsd wrote to its stderr so far (it failed to start, before any
/// [`Daemon::supervise`]), without waiting for more: a process it forked may still hold
/// the pipe open.
fn log_pending_stderr(child: &mut Child, tag: &str) {
    let Some(mut stderr) = child.stderr.take() else {
        return;
    };
    if rustix::io::ioctl_fionbio(&stderr, true).is_err() {
        return;
    }
    let mut bytes = Vec::new();
    let _ = std::io::Read::read_to_end(&mut stderr, &mut bytes);
    for line in String::from_utf8_lossy(&bytes).lines() {
        tracing::info!("virtiofsd[{tag}]: {line}");
    }
}

/// The socket name of share `index` tagged `tag` in a run directory of a jailed pod
/// (`fs<index>-<tag>.sock`): a crib in a PID namespace of its own has pid 1, so a pid
/// cannot tell two pods' sockets apart, but their run directories do.
pub fn run_dir_socket_name(index: usize, tag: &str) -> String {
    format!("fs{index}-{}.sock", safe_tag(tag))
}

/// Whether `name` is one of [`run_dir_socket_name`]'s, or the pid file virtiofsd keeps
/// next to it.
pub fn is_run_dir_socket_name(name: &str) -> bool {
    name.starts_with("fs") && (name.ends_with(".sock") || name.ends_with(".sock.pid"))
}

/// Removes the virtiofsd sockets and pid files ([`is_run_dir_socket_name`]) in run
/// directory `dir`: a jailed VMM cannot, so its supervisor does when the pod ends, and the
/// next start does after a supervisor killed with -9.
pub fn remove_run_dir_sockets(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(is_run_dir_socket_name)
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// `tag` with everything but ASCII letters and digits replaced by `_`.
fn safe_tag(tag: &str) -> String {
    tag.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Builds the device of share `index`, starting its virtiofsd for `dir=` with its socket
/// in `socket_dir` (a jailed pod's run directory, [`run_dir_socket_name`]) or, by
/// default, the temp directory (`crib-<pid>-fs<index>-<tag>.sock`). The daemon's
/// supervision waits for [`Daemon::supervise`].
pub fn create(
    index: usize,
    fs: &FsConfig,
    socket_dir: Option<&Path>,
) -> Result<(Fs, Option<Daemon>), FsSetupError> {
    let (socket, daemon) = match (&fs.socket, &fs.dir) {
        (Some(socket), _) => (socket.clone(), None),
        (None, Some(dir)) => {
            let socket = match socket_dir {
                Some(socket_dir) => socket_dir.join(run_dir_socket_name(index, &fs.tag)),
                None => {
                    sweep_stale_sockets(&std::env::temp_dir());
                    std::env::temp_dir().join(format!(
                        "crib-{}-fs{index}-{}.sock",
                        std::process::id(),
                        safe_tag(&fs.tag)
                    ))
                }
            };
            let daemon = start_virtiofsd(&fs.tag, dir, &socket)?;
            (socket, Some(daemon))
        }
        // VmConfig::validate refused this.
        (None, None) => (PathBuf::new(), None),
    };
    let device = Fs::new(DeviceConfig {
        tag: fs.tag.clone(),
        socket,
        request_queues: fs.queues,
        queue_size: fs.queue_size,
    })
    .map_err(|source| FsSetupError::Device {
        tag: fs.tag.clone(),
        source,
    })?;
    Ok((device, daemon))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_fs;

    #[test]
    fn a_missing_socket_is_an_error_naming_it() {
        let config = parse_fs("tag=gfs,socket=/nonexistent/crib.sock").unwrap();
        let err = create(0, &config, None).err().unwrap();
        let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(text.contains("/nonexistent/crib.sock"), "{text}");
    }

    #[test]
    fn a_dir_that_is_not_a_directory_is_refused() {
        let config = parse_fs("tag=gfs,dir=/nonexistent/share").unwrap();
        let err = create(0, &config, None).err().unwrap().to_string();
        assert!(err.contains("is not a directory"), "{err}");
    }

    /// With the real virtiofsd (scripts/install-virtiofsd.sh): crib starts it, connects
    /// and negotiates. Skipped where it is not installed.
    #[test]
    fn dir_starts_virtiofsd_and_connects() {
        if find_virtiofsd().is_none() {
            eprintln!("skipped: no virtiofsd");
            return;
        }
        let dir = std::env::temp_dir().join(format!("crib-fs-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::env::set_var(SANDBOX_ENV, "none");
        let config = parse_fs(&format!("tag=gfs,dir={},queues=1", dir.display())).unwrap();
        let (device, daemon) = create(7, &config, None).unwrap();
        use devices::virtio::VirtioDevice;
        assert_eq!(device.device_type(), 26);
        assert_eq!(device.queue_max_sizes().len(), 2);
        assert_ne!(
            device.device_features() & (1 << 32),
            0,
            "VERSION_1 from virtiofsd"
        );
        let mut daemon = daemon.unwrap();
        daemon.supervise();
        drop(device);
        // Closing the connection ends virtiofsd. A generous deadline: a loaded CI host
        // may take seconds to schedule its exit (and the reaper's wait).
        let gone = (0..1500).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            // SAFETY: signal 0 only checks the pid exists.
            let alive = unsafe { libc::kill(daemon.pid as libc::pid_t, 0) } == 0;
            !alive
        });
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(gone, "virtiofsd still running after the frontend closed");
        let socket = daemon.socket.clone();
        drop(daemon);
        assert!(!socket.exists() && !pid_file(&socket).exists());
    }

    #[test]
    fn run_dir_socket_names_are_recognized_with_their_pid_files() {
        let name = run_dir_socket_name(0, "my/fs");

        assert_eq!(name, "fs0-my_fs.sock");
        assert!(is_run_dir_socket_name(&name));
        assert!(is_run_dir_socket_name(&format!("{name}.pid")));
        assert!(!is_run_dir_socket_name("api.sock"));
    }

    #[test]
    fn run_dir_sockets_are_removed_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("crib-fs-sweep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in [
            "fs0-gfs.sock",
            "fs0-gfs.sock.pid",
            "api.sock",
            "console.log",
        ] {
            std::fs::write(dir.join(name), "").unwrap();
        }

        remove_run_dir_sockets(&dir);

        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(left, ["api.sock", "console.log"]);
    }

    #[test]
    fn only_crib_socket_names_have_an_owner() {
        assert_eq!(owner_pid("crib-42-fs0-gfs.sock"), Some(42));
        assert_eq!(owner_pid("crib-42-fs7-root_fs.sock.pid"), Some(42));
        for other in [
            "crib-42-vsock.sock",
            "crib-x-fs0-gfs.sock",
            "crib-0-fs0-gfs.sock",
            "crib-42-fs0-gfs.txt",
            "other-42-fs0-gfs.sock",
        ] {
            assert_eq!(owner_pid(other), None, "{other}");
        }
    }

    #[test]
    fn the_sweep_removes_files_of_dead_cribs_only() {
        let dir = std::env::temp_dir().join(format!("crib-fs-sweep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // pid_max is at most 2^22: this pid cannot exist.
        let dead = dir.join("crib-99999999-fs0-gfs.sock.pid");
        let live = dir.join(format!("crib-{}-fs0-gfs.sock.pid", std::process::id()));
        let unrelated = dir.join("crib-99999999-notes.txt");
        for file in [&dead, &live, &unrelated] {
            std::fs::write(file, "1").unwrap();
        }
        sweep_stale_sockets(&dir);
        let (dead_left, live_left, unrelated_left) =
            (dead.exists(), live.exists(), unrelated.exists());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(!dead_left && live_left && unrelated_left);
    }
}
