//! The container's crib VM: `crib pod run LAUNCH` as a child of the shim, ready once the
//! pod's Docker API answers; stopped through cradle's shutdown call, or killed. crib
//! supervises its own virtiofsd, so once crib has exited no process of the VM is left.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::docker::{DockerClient, DockerError};

/// How often readiness and exits are polled.
const POLL: Duration = Duration::from_millis(50);
/// Bytes of crib's log quoted in an error.
const LOG_TAIL_BYTES: u64 = 2048;

/// Errors of running the container's VM.
#[derive(Debug, Error)]
pub enum VmError {
    #[error("cannot create {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start crib ({}); set CRIB_BIN to the crib binary or put it next to the shim or on PATH", crib.display())]
    Spawn {
        crib: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the container's VM ended before it was ready ({status}); crib's log {} ends with:\n{tail}\nthe guest's console ends with:\n{console}", log.display())]
    Exited {
        status: ExitStatus,
        log: PathBuf,
        tail: String,
        console: String,
    },
    #[error("the container's VM was not ready within {} s (no answer on {}); crib's log {} ends with:\n{tail}", timeout.as_secs(), socket.display(), log.display())]
    NotReady {
        timeout: Duration,
        socket: PathBuf,
        log: PathBuf,
        tail: String,
    },
    #[error("cannot wait for crib")]
    Wait(#[source] std::io::Error),
    #[error("cannot open the sandbox's network namespace {}: has CNI's namespace been removed?", path.display())]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The crib binary: `$CRIB_BIN`, else `crib` next to this executable, else `crib` on PATH.
pub fn crib_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("CRIB_BIN") {
        return PathBuf::from(bin);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("crib")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("crib"))
}

/// A running crib.
pub struct Vm {
    child: Child,
    run_dir: PathBuf,
    log: PathBuf,
}

impl Vm {
    /// Starts `crib pod run launch` (its output to `log`), inside the network namespace
    /// `netns` if given, and waits until the pod's Docker API in `run_dir` answers, at
    /// most `timeout`.
    pub fn launch(
        crib: &Path,
        launch: &Path,
        netns: Option<&Path>,
        run_dir: &Path,
        log: &Path,
        timeout: Duration,
    ) -> Result<Self, VmError> {
        let out = File::create(log).map_err(|source| VmError::Create {
            path: log.to_path_buf(),
            source,
        })?;
        let err = out.try_clone().map_err(|source| VmError::Create {
            path: log.to_path_buf(),
            source,
        })?;
        let mut command = Command::new(crib);
        command
            .arg("pod")
            .arg("run")
            .arg(launch)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // Open (close-on-exec) until the child has joined it.
        let mut _namespace = None;
        if let Some(path) = netns {
            let namespace = File::open(path).map_err(|source| VmError::Netns {
                path: path.to_path_buf(),
                source,
            })?;
            let fd = namespace.as_raw_fd();
            // SAFETY: the closure runs in the forked child before exec and only makes
            // the setns system call (async-signal-safe) on a descriptor this frame keeps
            // open across the spawn.
            unsafe {
                command.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
            _namespace = Some(namespace);
        }
        let child = command.spawn().map_err(|source| VmError::Spawn {
            crib: crib.to_path_buf(),
            source,
        })?;
        let mut vm = Self {
            child,
            run_dir: run_dir.to_path_buf(),
            log: log.to_path_buf(),
        };
        let docker = vm.docker();
        let start = Instant::now();
        loop {
            if let Some(status) = vm.child.try_wait().map_err(VmError::Wait)? {
                return Err(VmError::Exited {
                    status,
                    log: vm.log.clone(),
                    tail: log_tail(&vm.log),
                    console: log_tail(&vm.run_dir.join("console.log")),
                });
            }
            if docker.ping() {
                return Ok(vm);
            }
            if start.elapsed() > timeout {
                vm.kill();
                return Err(VmError::NotReady {
                    timeout,
                    socket: vm.docker_socket(),
                    log: vm.log.clone(),
                    tail: log_tail(&vm.log),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// crib's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn docker_socket(&self) -> PathBuf {
        self.run_dir.join("docker.sock")
    }

    pub fn docker(&self) -> DockerClient {
        DockerClient::new(&self.docker_socket())
    }

    /// Asks cradle to shut the pod down (SIGKILL to what is left after `grace`), waits
    /// for crib to exit, at most `timeout`, then kills it.
    pub fn stop(&mut self, grace: Duration, timeout: Duration) -> Result<(), DockerError> {
        let asked = self
            .docker()
            .call("POST", &format!("/crib/v1/shutdown?t={}", grace.as_secs()));
        let start = Instant::now();
        while start.elapsed() < timeout {
            if matches!(self.child.try_wait(), Ok(Some(_)) | Err(_)) {
                return asked.map(|_| ());
            }
            std::thread::sleep(POLL);
        }
        log::warn!(
            "crib {} did not end within {} s of the shutdown call; killing it",
            self.child.id(),
            timeout.as_secs()
        );
        self.kill();
        asked.map(|_| ())
    }

    /// Kills crib and reaps it (crib's virtiofsd dies with it).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// The end of crib's log, for errors.
pub fn log_tail(log: &Path) -> String {
    let Ok(mut file) = File::open(log) else {
        return String::from("(no log)");
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
    let mut tail = Vec::new();
    let _ = file.read_to_end(&mut tail);
    String::from_utf8_lossy(&tail).trim_end().to_owned()
}
