//! Each process of the pod spec is a container (id: a stable 64-hex hash
//! of its name; name: its name), supervised here; the pod's set of them is
//! the [`Registry`](super::registry::Registry).
//!
//! A run of a container is one spawn of its process, in a process group of
//! its own, with three pipes: stdin (kept open for `docker attach`, which
//! writes to it), stdout and stderr. One thread per output pipe reads it,
//! hands each chunk to live attach sessions (a broadcast channel), splits
//! it into lines for the [`LogStore`] and echoes the lines to the console
//! (the pod's output still shows there as before). The exit status comes
//! from the [`Reaper`]; the console line `process <name> exited with status
//! N` is printed as before ([`processes::report_exit`]).
//!
//! Signals: `kill`/`stop` signal the process itself, as Docker signals a
//! container's init, except SIGKILL, which goes to the whole process group
//! (Docker's SIGKILL ends the container's every process). The pod-level
//! `Registry::stop_all` signals whole groups.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use hyper::body::Bytes;
use initramfs::podspec::ProcessSpec;
use tokio::sync::{broadcast, watch};

use super::errors::VdockerError;
use super::exec;
use super::frames::StreamKind;
use super::logs::{LineSplitter, LogStore};
use super::registry::{container_id, Lifecycle, RegistryOptions};
use crate::command::Outcome;
use crate::console;
use crate::containers::cgroup;
use crate::processes::{self, ProcessError};
use crate::reaper::Reaper;

/// Default log cap per container: the newest ~4 MiB of output.
pub const LOG_CAP_BYTES: usize = 4 * 1024 * 1024;
/// Chunks of output (16 KiB at most each) a slow attach session may fall
/// behind by before it misses some; bounds what it can hold in memory.
const OUTPUT_CHANNEL_CHUNKS: usize = 256;
/// Delay before a restart when the spec gives none (Docker's first back-off step).
const RESTART_DELAY_MS: u64 = 100;
/// Read size of the output pipes.
const PUMP_BUFFER_BYTES: usize = 16 * 1024;
/// After a process has exited, how long its output may take to drain
/// before attach, `logs -f` and exec sessions end anyway (an orphaned
/// grandchild can hold the pipe open for ever).
pub const OUTPUT_GRACE_MS: u64 = 500;
/// Exit code of a process whose program was not found (as Docker).
const EXIT_NOT_FOUND: i32 = 127;
/// Exit code of a process that could not be started otherwise.
const EXIT_CANNOT_RUN: i32 = 126;

/// A chunk of a container's output, for attach sessions.
#[derive(Debug, Clone)]
pub struct OutputChunk {
    pub stream: StreamKind,
    pub bytes: Bytes,
}

/// One of the pod's processes as a container.
pub struct Container {
    pub id: String,
    pub name: String,
    pub spec: ProcessSpec,
    pub created: SystemTime,
    pub logs: LogStore,
    /// Its cgroup (v2), where its stats come from; `None` if it has none.
    pub cgroup: Option<PathBuf>,
    output: broadcast::Sender<OutputChunk>,
    state: Mutex<ContainerState>,
    /// Bumped whenever the state changes (start, exit, output drained).
    changes: watch::Sender<()>,
    echo: bool,
    reaper: Reaper,
    lifecycle: Arc<Lifecycle>,
}

#[derive(Default)]
struct ContainerState {
    /// Runs started so far.
    runs: u64,
    run: Option<Run>,
    /// Stopped or killed through the API (or the shutdown): not restarted.
    held: bool,
    /// Restarts by the restart policy so far.
    restarts: u32,
    /// A restart is waiting for its delay.
    restart_pending: bool,
    /// Removed from the registry (`docker rm`): never started again.
    removed: bool,
}

/// One spawn of a container's process.
#[derive(Debug, Clone)]
pub struct Run {
    /// 1 for the first run, then counting.
    pub number: u64,
    /// None if the process could not be started.
    pub pid: Option<libc::pid_t>,
    pub started_at: SystemTime,
    pub finished_at: Option<SystemTime>,
    pub outcome: Option<Outcome>,
    /// Why it could not be started.
    pub error: Option<String>,
    /// Output pipes not at end of file yet.
    open_outputs: u8,
    /// The write end of the process's stdin, while it runs (with a TTY: the
    /// pty master).
    stdin: Option<Arc<OwnedFd>>,
    /// With a TTY: the pty master, for resize, while it runs.
    pty: Option<Arc<OwnedFd>>,
}

/// The container's side of a run's stdio.
enum Stdio3 {
    /// stdin (write end), stdout and stderr (read ends).
    Pipes(OwnedFd, OwnedFd, OwnedFd),
    /// The pty master: input and the one output stream.
    Pty(OwnedFd),
}

impl Run {
    pub fn is_running(&self) -> bool {
        self.pid.is_some() && self.outcome.is_none()
    }

    /// Docker's exit code: the status, or 128 + the signal.
    pub fn exit_code(&self) -> i32 {
        match self.outcome {
            Some(outcome) => docker_exit_code(outcome),
            None => 0,
        }
    }
}

/// Docker's exit code for an outcome: 128 + signal when killed.
pub fn docker_exit_code(outcome: Outcome) -> i32 {
    match outcome {
        Outcome::Exited(code) => code,
        Outcome::Killed(signal) => 128_i32.saturating_add(signal),
    }
}

/// Docker's exit code for a spawn that failed with `error`.
pub fn spawn_exit_code(error: &io::Error) -> i32 {
    if error.kind() == io::ErrorKind::NotFound {
        EXIT_NOT_FOUND
    } else {
        EXIT_CANNOT_RUN
    }
}

/// Sends `signal` to the process group `pgid`, or to the process itself if
/// it has left the group.
pub fn signal_group(pgid: libc::pid_t, signal: i32) -> io::Result<()> {
    // SAFETY: kill takes two plain integers and touches no memory; a
    // negative pid addresses the group.
    if unsafe { libc::kill(-pgid, signal) } == 0 {
        return Ok(());
    }
    signal_process(pgid, signal)
}

/// Sends `signal` to the process `pid`.
pub fn signal_process(pid: libc::pid_t, signal: i32) -> io::Result<()> {
    // SAFETY: as above, for one process.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Container {
    pub(super) fn new(
        spec: ProcessSpec,
        options: RegistryOptions,
        reaper: Reaper,
        lifecycle: Arc<Lifecycle>,
        cgroup: Option<PathBuf>,
    ) -> Self {
        let (output, _) = broadcast::channel(OUTPUT_CHANNEL_CHUNKS);
        Self {
            id: container_id(&spec.name),
            name: spec.name.clone(),
            spec,
            created: SystemTime::now(),
            logs: LogStore::new(options.log_cap_bytes),
            cgroup,
            output,
            state: Mutex::new(ContainerState::default()),
            changes: watch::Sender::new(()),
            echo: options.echo,
            reaper,
            lifecycle,
        }
    }

    fn lock(&self) -> MutexGuard<'_, ContainerState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The latest run, if the container was ever started.
    pub fn snapshot(&self) -> Option<Run> {
        self.lock().run.clone()
    }

    /// The number of the run in progress, if one is.
    pub fn running_run(&self) -> Option<u64> {
        self.lock()
            .run
            .as_ref()
            .filter(|run| run.is_running())
            .map(|run| run.number)
    }

    /// Running, or about to be restarted by its restart policy.
    pub fn is_active(&self) -> bool {
        let state = self.lock();
        state.restart_pending || state.run.as_ref().is_some_and(Run::is_running)
    }

    /// Restarts by the restart policy so far, and whether one is pending.
    pub fn restarts(&self) -> (u32, bool) {
        let state = self.lock();
        (state.restarts, state.restart_pending)
    }

    /// Live output from now on.
    pub fn subscribe_output(&self) -> broadcast::Receiver<OutputChunk> {
        self.output.subscribe()
    }

    /// The write end of the running process's stdin.
    pub fn stdin(&self) -> Option<Arc<OwnedFd>> {
        self.lock()
            .run
            .as_ref()
            .filter(|run| run.is_running())
            .and_then(|run| run.stdin.clone())
    }

    /// Closes run `number`'s stdin (the process reads end of file once no
    /// attach holds a duplicate any more).
    pub fn close_stdin(&self, number: u64) {
        if let Some(run) = self.lock().run.as_mut().filter(|run| run.number == number) {
            run.stdin = None;
        }
    }

    /// Starts a new run; `NotModified` if one is in progress. A process that
    /// cannot be started is a warning on the console and a run that has
    /// ended with 127 (not found) or 126, as Docker reports it.
    pub fn start(self: &Arc<Self>) -> Result<(), VdockerError> {
        let mut state = self.lock();
        if state.removed {
            return Err(VdockerError::NoSuchContainer(self.name.clone()));
        }
        if state.run.as_ref().is_some_and(Run::is_running) {
            return Err(VdockerError::NotModified(self.name.clone()));
        }
        state.held = false;
        state.restart_pending = false;
        state.runs = state.runs.wrapping_add(1);
        let number = state.runs;
        let started_at = SystemTime::now();
        let spawned = self.spawn(number);
        let (run, outputs) = match spawned {
            Ok((pid, Stdio3::Pipes(stdin, stdout, stderr))) => {
                let run = Run {
                    number,
                    pid: Some(pid),
                    started_at,
                    finished_at: None,
                    outcome: None,
                    error: None,
                    open_outputs: 2,
                    stdin: Some(Arc::new(stdin)),
                    pty: None,
                };
                (
                    run,
                    vec![(StreamKind::Stdout, stdout), (StreamKind::Stderr, stderr)],
                )
            }
            Ok((pid, Stdio3::Pty(master))) => {
                let master = Arc::new(master);
                let output = match master.try_clone() {
                    Ok(output) => vec![(StreamKind::Stdout, output)],
                    Err(error) => {
                        console::say!(
                            "warning: process {}: cannot read its terminal: {error}",
                            self.name
                        );
                        Vec::new()
                    }
                };
                let run = Run {
                    number,
                    pid: Some(pid),
                    started_at,
                    finished_at: None,
                    outcome: None,
                    error: None,
                    open_outputs: u8::try_from(output.len()).unwrap_or(1),
                    stdin: Some(Arc::clone(&master)),
                    pty: Some(master),
                };
                (run, output)
            }
            Err(error) => {
                console::log_warning(&error);
                let code = match &error {
                    ProcessError::Spawn { source, .. } => spawn_exit_code(source),
                };
                let run = Run {
                    number,
                    pid: None,
                    started_at,
                    finished_at: Some(started_at),
                    outcome: Some(Outcome::Exited(code)),
                    error: Some(console::error_chain(&error)),
                    open_outputs: 0,
                    stdin: None,
                    pty: None,
                };
                (run, Vec::new())
            }
        };
        state.run = Some(run);
        drop(state);
        for (stream, output) in outputs {
            self.start_pump(number, stream, output);
        }
        self.changes.send_replace(());
        self.lifecycle.notify();
        Ok(())
    }

    /// Spawns run `number`: its pid and its stdio (pipes, or with `tty` a pty).
    fn spawn(self: &Arc<Self>, number: u64) -> Result<(libc::pid_t, Stdio3), ProcessError> {
        let spawn_error = |source| ProcessError::Spawn {
            name: self.name.clone(),
            program: self.spec.argv.first().cloned().unwrap_or_default(),
            source,
        };
        let mut command = processes::build_command(&self.spec)
            .ok_or_else(|| spawn_error(io::ErrorKind::InvalidInput.into()))?;
        let master = if self.spec.tty {
            // A session of its own (so a group of its own too), the pty its terminal.
            let (master, slave) = exec::open_pty().map_err(spawn_error)?;
            if let Some([rows, columns]) = self.spec.console_size {
                exec::set_window_size(master.as_fd(), rows, columns).map_err(spawn_error)?;
            }
            exec::use_as_terminal(&mut command, slave).map_err(spawn_error)?;
            Some(master)
        } else {
            command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0);
            None
        };
        if let Some(dir) = &self.cgroup {
            // Into its cgroup before exec, so the program is counted from its first
            // instruction (a container's stage then finds itself there already).
            let procs = cgroup::open_procs(dir).map_err(spawn_error)?;
            // SAFETY: the hook runs in the forked child before exec and only calls
            // join_in_child, which makes one write(2) from a static buffer to a
            // descriptor the closure owns: async-signal-safe, no allocation, no lock.
            unsafe {
                command.pre_exec(move || cgroup::join_in_child(&procs));
            }
        }
        let container = Arc::clone(self);
        let mut child = self
            .reaper
            .spawn(&mut command, move |status| container.exited(number, status))
            .map_err(spawn_error)?;
        // The parent's copies of the pty slave close here: the master reads the end
        // once the process (and its children) are done with the terminal.
        drop(command);
        let pid = libc::pid_t::try_from(child.id())
            .map_err(|_| spawn_error(io::ErrorKind::InvalidData.into()))?;
        if let Some(master) = master {
            return Ok((pid, Stdio3::Pty(master)));
        }
        match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
            (Some(stdin), Some(stdout), Some(stderr)) => Ok((
                pid,
                Stdio3::Pipes(stdin.into(), stdout.into(), stderr.into()),
            )),
            // Stdio::piped() always gives the three; kill rather than leak.
            _ => {
                let _ = signal_group(pid, libc::SIGKILL);
                Err(spawn_error(io::ErrorKind::BrokenPipe.into()))
            }
        }
    }

    /// The reaper's callback for run `number`: records the exit and applies the restart
    /// policy.
    fn exited(self: &Arc<Self>, number: u64, status: i32) {
        let outcome = Outcome::from_wait_status(status);
        let restart = {
            let mut state = self.lock();
            if let Some(run) = state.run.as_mut().filter(|run| run.number == number) {
                run.outcome = Some(outcome);
                run.finished_at = Some(SystemTime::now());
                run.stdin = None;
                run.pty = None;
            }
            let restart = !state.held
                && self
                    .spec
                    .restart
                    .restarts(docker_exit_code(outcome), state.restarts);
            if restart {
                state.restart_pending = true;
                state.restarts = state.restarts.saturating_add(1);
            }
            restart
        };
        processes::report_exit(&self.name, outcome);
        if restart {
            self.restart_later();
        }
        self.changes.send_replace(());
        self.lifecycle.notify();
    }

    /// Starts the container again after the spec's delay, unless it was held meanwhile.
    fn restart_later(self: &Arc<Self>) {
        let container = Arc::clone(self);
        let delay = Duration::from_millis(self.spec.restart_delay_ms.unwrap_or(RESTART_DELAY_MS));
        let spawned = std::thread::Builder::new()
            .name("restart".into())
            .spawn(move || {
                std::thread::sleep(delay);
                let go = {
                    let mut state = container.lock();
                    let go = state.restart_pending && !state.held;
                    state.restart_pending = false;
                    go
                };
                if go {
                    console::log(&format!("restarting process {}", container.name));
                    let _ = container.start();
                }
                container.changes.send_replace(());
                container.lifecycle.notify();
            });
        if spawned.is_err() {
            self.lock().restart_pending = false;
        }
    }

    /// Marks the container removed (it can never start again); `RemoveRunning` if it
    /// is running or about to restart.
    pub fn mark_removed(&self) -> Result<(), VdockerError> {
        let mut state = self.lock();
        if state.restart_pending || state.run.as_ref().is_some_and(Run::is_running) {
            return Err(VdockerError::RemoveRunning(self.id.clone()));
        }
        state.removed = true;
        state.held = true;
        drop(state);
        self.changes.send_replace(());
        Ok(())
    }

    /// No restart from now until the next start (Docker's "manually stopped").
    pub fn hold(&self) {
        let mut state = self.lock();
        state.held = true;
        state.restart_pending = false;
        drop(state);
        self.lifecycle.notify();
    }

    fn start_pump(self: &Arc<Self>, number: u64, stream: StreamKind, pipe: OwnedFd) {
        let container = Arc::clone(self);
        let started = std::thread::Builder::new()
            .name("cradle-output".to_owned())
            .spawn(move || container.pump(number, stream, File::from(pipe)));
        if let Err(error) = started {
            console::say!(
                "warning: process {}: cannot read its output: {error}",
                self.name
            );
            self.output_closed(number);
        }
    }

    /// Reads one output pipe to its end (a pump thread).
    fn pump(&self, number: u64, stream: StreamKind, mut pipe: File) {
        let mut splitter = LineSplitter::default();
        let mut buffer = vec![0u8; PUMP_BUFFER_BYTES];
        loop {
            let read = match pipe.read(&mut buffer) {
                Ok(0) => break,
                Ok(read) => read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                // A pty master shares its file status flags with the duplicate an
                // attach makes non-blocking for its input: wait for data instead.
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    if wait_readable(pipe.as_fd()).is_err() {
                        break;
                    }
                    continue;
                }
                Err(_) => break,
            };
            let Some(chunk) = buffer.get(..read) else {
                break;
            };
            // No attach session listening is fine.
            let _ = self.output.send(OutputChunk {
                stream,
                bytes: Bytes::copy_from_slice(chunk),
            });
            let now = SystemTime::now();
            for line in splitter.push(chunk) {
                self.store_line(stream, line, now);
            }
        }
        if let Some(rest) = splitter.finish() {
            self.store_line(stream, rest, SystemTime::now());
        }
        self.output_closed(number);
    }

    fn store_line(&self, stream: StreamKind, line: Vec<u8>, time: SystemTime) {
        if self.echo {
            console::echo(stream == StreamKind::Stderr, &line);
        }
        self.logs.push(stream, line, time);
    }

    fn output_closed(&self, number: u64) {
        {
            let mut state = self.lock();
            if let Some(run) = state.run.as_mut().filter(|run| run.number == number) {
                run.open_outputs = run.open_outputs.saturating_sub(1);
            }
        }
        self.changes.send_replace(());
    }

    /// `POST /containers/{id}/resize?h=&w=`: sets the terminal's size. Without a TTY
    /// there is nothing to resize and it succeeds, as Docker's (runc's) does; with one,
    /// `NotRunning` unless a run is in progress.
    pub fn resize(&self, height: u16, width: u16) -> Result<(), VdockerError> {
        if !self.spec.tty {
            return Ok(());
        }
        let pty = self
            .lock()
            .run
            .as_ref()
            .filter(|run| run.is_running())
            .and_then(|run| run.pty.clone())
            .ok_or_else(|| VdockerError::NotRunning(self.name.clone()))?;
        exec::set_window_size(pty.as_fd(), height, width).map_err(|source| VdockerError::Resize {
            name: self.name.clone(),
            source,
        })
    }

    /// Sends `signal` to the running process (SIGKILL: to its group).
    pub fn signal(&self, signal: i32) -> Result<(), VdockerError> {
        self.hold();
        let pid = self.running_pid()?;
        let result = if signal == libc::SIGKILL {
            signal_group(pid, signal)
        } else {
            signal_process(pid, signal)
        };
        result.map_err(|source| VdockerError::Signal {
            name: self.name.clone(),
            source,
        })
    }

    /// Sends `signal` to the running process's group.
    pub fn signal_group(&self, signal: i32) -> Result<(), VdockerError> {
        self.hold();
        let pid = self.running_pid()?;
        signal_group(pid, signal).map_err(|source| VdockerError::Signal {
            name: self.name.clone(),
            source,
        })
    }

    pub fn running_pid(&self) -> Result<libc::pid_t, VdockerError> {
        self.lock()
            .run
            .as_ref()
            .filter(|run| run.is_running())
            .and_then(|run| run.pid)
            .ok_or_else(|| VdockerError::NotRunning(self.name.clone()))
    }

    /// Waits until `check` returns something, re-checking on every change.
    async fn wait_for<T>(&self, mut check: impl FnMut(&ContainerState) -> Option<T>) -> T {
        let mut changes = self.changes.subscribe();
        loop {
            let found = check(&self.lock());
            if let Some(value) = found {
                return value;
            }
            if changes.changed().await.is_err() {
                // The sender lives as long as self: cannot happen.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits until no run is in progress; the last run's exit code.
    pub async fn wait_not_running(&self) -> i32 {
        self.wait_for(|state| match &state.run {
            Some(run) if run.is_running() => None,
            Some(run) => Some(run.exit_code()),
            None => Some(0),
        })
        .await
    }

    /// Waits for the end of the run in progress, or if there is none, of
    /// the next one started; its exit code.
    pub async fn wait_next_exit(&self) -> i32 {
        let target = {
            let state = self.lock();
            match &state.run {
                Some(run) if run.is_running() => run.number,
                _ => state.runs.wrapping_add(1),
            }
        };
        self.wait_for(|state| {
            state
                .run
                .as_ref()
                .filter(|run| run.number >= target && !run.is_running())
                .map(Run::exit_code)
        })
        .await
    }

    /// Waits until run `number` has exited.
    pub async fn wait_run_exit(&self, number: u64) {
        self.wait_for(|state| {
            state
                .run
                .as_ref()
                .is_none_or(|run| run.number != number || !run.is_running())
                .then_some(())
        })
        .await;
    }

    /// Waits until run `number` has exited and its output has been read to
    /// the end (or [`OUTPUT_GRACE_MS`] after its exit, whichever is first).
    pub async fn wait_output_done(&self, number: u64) {
        self.wait_run_exit(number).await;
        let drained = self.wait_for(|state| {
            state
                .run
                .as_ref()
                .is_none_or(|run| run.number != number || run.open_outputs == 0)
                .then_some(())
        });
        let _ = tokio::time::timeout(Duration::from_millis(OUTPUT_GRACE_MS), drained).await;
    }

    /// Docker's stop: `signal`, up to `timeout` for the process to exit,
    /// then SIGKILL to its group. `NotModified` if it is not running.
    pub async fn stop(&self, signal: i32, timeout: Duration) -> Result<(), VdockerError> {
        let Some(number) = self.running_run() else {
            return Err(VdockerError::NotModified(self.name.clone()));
        };
        if let Err(error) = self.signal(signal) {
            // It ended meanwhile: stopped all the same.
            return match error {
                VdockerError::NotRunning(_) => Ok(()),
                other => Err(other),
            };
        }
        if tokio::time::timeout(timeout, self.wait_run_exit(number))
            .await
            .is_err()
        {
            let _ = self.signal_group(libc::SIGKILL);
            self.wait_run_exit(number).await;
        }
        Ok(())
    }
}

/// Blocks until `fd` is readable or hung up (a read then says which).
fn wait_readable(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut poll_fd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: poll reads and writes the one pollfd behind the pointer, a live
        // local, for the count of 1 given; fd is open (borrowed).
        let rc = unsafe { libc::poll(&mut poll_fd, 1, -1) };
        if rc >= 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// The command to exec `argv` in `container` with extra `env` and `cwd`:
/// the container's environment and directory unless overridden. `user`
/// applies to containers of images only (others run as root).
pub fn exec_command(
    container: &Container,
    argv: &[String],
    env: &[String],
    cwd: Option<&str>,
    user: Option<&str>,
) -> Option<Command> {
    if let Some(plan) = crate::containers::get().and_then(|c| c.plan(&container.name)) {
        // An image process: the command runs inside its container.
        return crate::containers::exec_command(&plan, argv, env, cwd, user);
    }
    let spec = ProcessSpec {
        name: container.name.clone(),
        argv: argv.to_vec(),
        env: container.spec.env.iter().chain(env).cloned().collect(),
        cwd: cwd
            .filter(|dir| !dir.is_empty())
            .map(str::to_owned)
            .or_else(|| container.spec.cwd.clone()),
        ..ProcessSpec::default()
    };
    processes::build_command(&spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vdocker::registry::testing::{block_on, registry, spec};

    #[test]
    fn docker_exit_code_of_sigkill_is_137() {
        assert_eq!(docker_exit_code(Outcome::Killed(9)), 137);
    }

    #[test]
    fn registry_runs_a_process_and_logs_both_streams() {
        let registry = registry(&[spec("a", "echo out; echo err >&2; exit 4")]);
        registry.start_all();
        let container = registry.find("a").unwrap();

        let code = block_on(async {
            let code = container.wait_not_running().await;
            container.wait_output_done(1).await;
            code
        });

        assert_eq!(code, 4);
        let (lines, _) = container.logs.select(&crate::vdocker::logs::LogQuery {
            stdout: true,
            stderr: true,
            since: None,
            until: None,
            tail: None,
            timestamps: false,
            follow: false,
        });
        let mut got: Vec<(StreamKind, Vec<u8>)> =
            lines.into_iter().map(|l| (l.stream, l.bytes)).collect();
        got.sort_by_key(|(stream, _)| stream.code());
        assert_eq!(
            got,
            [
                (StreamKind::Stdout, b"out\n".to_vec()),
                (StreamKind::Stderr, b"err\n".to_vec())
            ]
        );
    }

    #[test]
    fn start_missing_program_is_exited_127() {
        let registry = registry(&[ProcessSpec {
            name: "ghost".to_owned(),
            argv: vec!["/nonexistent/cradle-test".to_owned()],
            env: Vec::new(),
            cwd: None,
            ..ProcessSpec::default()
        }]);

        registry.start_all();

        let run = registry.find("ghost").unwrap().snapshot().unwrap();
        assert!(!run.is_running());
        assert_eq!(run.exit_code(), 127);
    }

    /// A registry's container of `script` with a TTY of `rows` x `columns`.
    fn tty_spec(script: &str, rows: u16, columns: u16) -> ProcessSpec {
        ProcessSpec {
            tty: true,
            console_size: Some([rows, columns]),
            ..spec("t", script)
        }
    }

    fn all_logs(container: &Container) -> Vec<(StreamKind, Vec<u8>)> {
        let (lines, _) = container.logs.select(&crate::vdocker::logs::LogQuery {
            stdout: true,
            stderr: true,
            since: None,
            until: None,
            tail: None,
            timestamps: false,
            follow: false,
        });
        lines.into_iter().map(|l| (l.stream, l.bytes)).collect()
    }

    #[test]
    fn tty_process_has_the_pty_as_controlling_terminal_on_stdout() {
        // /dev/tty opens only for a process with a controlling terminal.
        let registry = registry(&[tty_spec(
            "[ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo both; stty size; \
             : </dev/tty && echo ctty; echo err >&2; exit 6",
            30,
            100,
        )]);
        registry.start_all();
        let container = registry.find("t").unwrap();

        let code = block_on(async {
            let code = container.wait_not_running().await;
            container.wait_output_done(1).await;
            code
        });

        assert_eq!(code, 6);
        assert_eq!(
            all_logs(&container),
            [
                (StreamKind::Stdout, b"both\r\n".to_vec()),
                (StreamKind::Stdout, b"30 100\r\n".to_vec()),
                (StreamKind::Stdout, b"ctty\r\n".to_vec()),
                (StreamKind::Stdout, b"err\r\n".to_vec()),
            ]
        );
    }

    #[test]
    fn resize_sets_the_size_of_a_running_tty_process() {
        let registry = registry(&[tty_spec("read line; stty size", 30, 100)]);
        registry.start_all();
        let container = registry.find("t").unwrap();

        container.resize(40, 120).unwrap();
        let stdin = container.stdin().unwrap();
        rustix::io::write(&*stdin, b"go\n").unwrap();
        block_on(async {
            container.wait_not_running().await;
            container.wait_output_done(1).await;
        });

        let logs = all_logs(&container);
        assert_eq!(
            logs.last(),
            Some(&(StreamKind::Stdout, b"40 120\r\n".to_vec()))
        );
    }

    #[test]
    fn resize_of_a_process_without_tty_does_nothing() {
        let registry = registry(&[spec("p", "exit 0")]);

        assert!(registry.find("p").unwrap().resize(40, 120).is_ok());
    }

    #[test]
    fn resize_of_a_stopped_tty_process_is_not_running() {
        let registry = registry(&[tty_spec("exit 0", 30, 100)]);

        let err = registry.find("t").unwrap().resize(40, 120).unwrap_err();

        assert!(matches!(err, VdockerError::NotRunning(_)), "{err}");
    }

    #[test]
    fn tty_output_is_read_after_an_attach_made_the_master_non_blocking() {
        let registry = registry(&[tty_spec("sleep 0.3; echo late", 30, 100)]);
        registry.start_all();
        let container = registry.find("t").unwrap();
        // As an attach's input does: a duplicate of the master, made non-blocking.
        let master = container.stdin().unwrap().try_clone().unwrap();
        crate::vdocker::fdio::set_nonblocking(master.as_fd()).unwrap();

        block_on(async {
            container.wait_not_running().await;
            container.wait_output_done(1).await;
        });

        assert_eq!(
            all_logs(&container),
            [(StreamKind::Stdout, b"late\r\n".to_vec())]
        );
    }
}
