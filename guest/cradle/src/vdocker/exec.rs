//! `docker exec`: `POST /containers/{id}/exec` creates an exec instance,
//! `POST /exec/{id}/start` runs it (hijacking the connection unless
//! detached), `GET /exec/{id}/json` reports it, `POST /exec/{id}/resize`
//! sets its terminal size.
//!
//! Without a TTY the process gets pipes: stdout and stderr go to the client
//! as multiplexed frames, the client's bytes go to stdin, and the client's
//! half-close (end of its stdin) closes the process's stdin, so
//! `echo x | docker exec -i c cat` ends. With a TTY the process gets a
//! fresh pty as its controlling terminal (new session) and the stream is
//! raw both ways. The stream ends once the process has exited and its
//! output is drained (or half a second after the exit, if a background
//! child keeps the output open), after its exit code is recorded: the CLI
//! asks for it right after.

use std::collections::VecDeque;
use std::ffi::CStr;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::upgrade::OnUpgrade;
use hyper::{Response, StatusCode};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf};
use tokio::sync::watch;

use super::containers::{
    docker_exit_code, exec_command, signal_group, signal_process, spawn_exit_code, Container,
    OUTPUT_GRACE_MS,
};
use super::errors::VdockerError;
use super::fdio::FdStream;
use super::frames::{self, StreamKind};
use super::registry::{mix64, Lifecycle, Registry};
use super::server::{self, BoxIo, ResponseBody, MULTIPLEXED_STREAM, RAW_STREAM};
use crate::command::Outcome;

/// Exec instances kept; past this the oldest finished ones are forgotten.
const MAX_EXECS: usize = 256;
/// Read size of the process's output.
const OUTPUT_BUFFER_BYTES: usize = 32 * 1024;
/// Room for a pty's path (`/dev/pts/N`).
const PTY_NAME_BYTES: usize = 128;

/// The body of `POST /containers/{id}/exec` (Docker's `ExecOptions`).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ExecCreateBody {
    pub cmd: Option<Vec<String>>,
    pub env: Option<Vec<String>>,
    pub working_dir: Option<String>,
    pub tty: bool,
    pub attach_stdin: bool,
    pub attach_stdout: bool,
    pub attach_stderr: bool,
    /// `[height, width]` of the terminal.
    pub console_size: Option<[u16; 2]>,
    /// The user in a container of an image; ignored for other processes (root).
    pub user: Option<String>,
}

/// The body of `POST /exec/{id}/start`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ExecStartBody {
    pub detach: bool,
    pub tty: bool,
    pub console_size: Option<[u16; 2]>,
}

/// One exec instance.
pub struct Exec {
    pub id: String,
    pub container: Arc<Container>,
    argv: Vec<String>,
    config: ExecCreateBody,
    state: Mutex<ExecState>,
    changes: watch::Sender<()>,
}

#[derive(Default)]
struct ExecState {
    started: bool,
    pid: Option<libc::pid_t>,
    exit_code: Option<i32>,
    /// The pty master, for resize.
    pty: Option<Arc<OwnedFd>>,
}

/// All exec instances, newest last.
#[derive(Default)]
pub struct ExecTable {
    execs: Mutex<VecDeque<Arc<Exec>>>,
    created: AtomicU64,
}

impl ExecTable {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Arc<Exec>>> {
        self.execs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A new exec of `body` in `container`; `BadRequest` without a command.
    pub fn create(
        &self,
        container: Arc<Container>,
        body: ExecCreateBody,
    ) -> Result<Arc<Exec>, VdockerError> {
        let argv = body
            .cmd
            .clone()
            .filter(|cmd| cmd.first().is_some_and(|program| !program.is_empty()))
            .ok_or(VdockerError::BadRequest(
                "no exec command specified; give Cmd, like [\"sh\", \"-c\", \"...\"]",
            ))?;
        let number = self.created.fetch_add(1, Ordering::Relaxed);
        let exec = Arc::new(Exec {
            id: exec_id(number),
            container,
            argv,
            config: body,
            state: Mutex::new(ExecState::default()),
            changes: watch::Sender::new(()),
        });
        let mut execs = self.lock();
        if execs.len() >= MAX_EXECS {
            if let Some(index) = execs.iter().position(|e| !e.is_running()) {
                execs.remove(index);
            }
        }
        execs.push_back(Arc::clone(&exec));
        Ok(exec)
    }

    /// The exec with this id, or a prefix of exactly one id.
    pub fn find(&self, key: &str) -> Result<Arc<Exec>, VdockerError> {
        let execs = self.lock();
        if let Some(exec) = execs.iter().find(|e| e.id == key) {
            return Ok(Arc::clone(exec));
        }
        let mut matches = execs
            .iter()
            .filter(|e| !key.is_empty() && e.id.starts_with(key));
        match (matches.next(), matches.next()) {
            (Some(exec), None) => Ok(Arc::clone(exec)),
            _ => Err(VdockerError::NoSuchExec(key.to_owned())),
        }
    }

    pub fn any_running(&self) -> bool {
        self.lock().iter().any(|e| e.is_running())
    }

    /// For a removed container: SIGKILL to its running execs' groups, and its execs
    /// out of the table (a running one's session still ends as usual).
    pub fn forget(&self, container: &Arc<Container>) {
        let mut execs = self.lock();
        for exec in execs
            .iter()
            .filter(|e| Arc::ptr_eq(&e.container, container))
        {
            if let Some(pid) = exec.running_pid() {
                let _ = signal_group(pid, libc::SIGKILL);
            }
        }
        execs.retain(|e| !Arc::ptr_eq(&e.container, container));
    }

    /// Signals every running exec's process group.
    pub fn signal_all(&self, signal: i32) {
        let pids: Vec<libc::pid_t> = self.lock().iter().filter_map(|e| e.running_pid()).collect();
        for pid in pids {
            let _ = signal_group(pid, signal);
        }
    }
}

/// 64 hex digits from a counter and the clock: unique, not secret.
fn exec_id(number: u64) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    // Keeping the low 64 bits of the time is the point here.
    let seed = mix64(number) ^ (nanos as u64) ^ u64::from(std::process::id());
    (0..4u64)
        .map(|round| format!("{:016x}", mix64(seed ^ mix64(round))))
        .collect()
}

impl Exec {
    fn lock(&self) -> MutexGuard<'_, ExecState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn is_running(&self) -> bool {
        self.running_pid().is_some()
    }

    fn running_pid(&self) -> Option<libc::pid_t> {
        let state = self.lock();
        state.pid.filter(|_| state.exit_code.is_none())
    }

    /// `GET /exec/{id}/json`.
    pub fn inspect(&self) -> serde_json::Value {
        let state = self.lock();
        let (entrypoint, arguments) = self
            .argv
            .split_first()
            .map(|(program, rest)| (program.clone(), rest.to_vec()))
            .unwrap_or_default();
        serde_json::json!({
            "ID": self.id,
            "Running": state.pid.is_some() && state.exit_code.is_none(),
            "ExitCode": state.exit_code,
            "ProcessConfig": {
                "tty": self.config.tty,
                "entrypoint": entrypoint,
                "arguments": arguments,
                "privileged": false,
                "user": "",
            },
            "OpenStdin": self.config.attach_stdin,
            "OpenStderr": self.config.attach_stderr,
            "OpenStdout": self.config.attach_stdout,
            "CanRemove": false,
            "ContainerID": self.container.id,
            "DetachKeys": "",
            "Pid": state.pid.unwrap_or(0),
        })
    }

    /// `POST /exec/{id}/resize?h=&w=`: sets the pty's size (no pty: nothing
    /// to do).
    pub fn resize(&self, height: u16, width: u16) -> Result<(), VdockerError> {
        let pty = self.lock().pty.clone();
        match pty {
            Some(master) => set_window_size(master.as_fd(), height, width)
                .map_err(|source| VdockerError::ExecSetup { source }),
            None => Ok(()),
        }
    }

    /// crib's `POST /exec/{id}/kill`: `signal` to the running process
    /// (SIGKILL: to its whole group, as for a container); 409 once it has
    /// exited or before it started.
    pub fn signal(&self, signal: i32) -> Result<(), VdockerError> {
        let pid = self
            .running_pid()
            .ok_or_else(|| VdockerError::ExecNotRunning(self.id.clone()))?;
        let sent = if signal == libc::SIGKILL {
            signal_group(pid, signal)
        } else {
            signal_process(pid, signal)
        };
        sent.map_err(|source| VdockerError::ExecSignal {
            id: self.id.clone(),
            source,
        })
    }

    fn mark_started(&self) -> Result<(), VdockerError> {
        let mut state = self.lock();
        if state.started {
            return Err(VdockerError::ExecAlreadyStarted(self.id.clone()));
        }
        state.started = true;
        Ok(())
    }

    fn exited(&self, status: i32, lifecycle: &Lifecycle) {
        self.lock().exit_code = Some(docker_exit_code(Outcome::from_wait_status(status)));
        self.changes.send_replace(());
        lifecycle.notify();
    }

    fn failed(&self, code: i32) {
        self.lock().exit_code = Some(code);
        self.changes.send_replace(());
    }

    async fn wait_exit(&self) {
        let mut changes = self.changes.subscribe();
        while self.lock().exit_code.is_none() {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Spawns `command` through the reaper, recording the pid.
    fn spawn(self: &Arc<Self>, registry: &Registry, command: &mut Command) -> io::Result<Child> {
        let exec = Arc::clone(self);
        let lifecycle = Arc::clone(registry.lifecycle());
        let child = registry
            .reaper()
            .spawn(command, move |status| exec.exited(status, &lifecycle))?;
        // The exit callback sets only the exit code: this may come after it.
        self.lock().pid = libc::pid_t::try_from(child.id()).ok();
        Ok(child)
    }
}

/// What the process's side of a session is.
enum Session {
    Pipes {
        stdin: Option<FdStream>,
        stdout: Option<FdStream>,
        stderr: Option<FdStream>,
    },
    Pty {
        master: FdStream,
        forward_stdin: bool,
    },
    /// It could not be started: this is said on the stream instead.
    Failed(String),
}

/// `POST /exec/{id}/start`.
pub fn start(
    registry: &Registry,
    exec: Arc<Exec>,
    body: ExecStartBody,
    upgrade: Option<OnUpgrade>,
) -> Result<Response<ResponseBody>, VdockerError> {
    exec.mark_started()?;
    let mut command = exec_command(
        &exec.container,
        &exec.argv,
        exec.config.env.as_deref().unwrap_or_default(),
        exec.config.working_dir.as_deref(),
        exec.config.user.as_deref(),
    )
    .ok_or(VdockerError::BadRequest("no exec command specified"))?;
    let program = exec.argv.first().cloned().unwrap_or_default();

    if body.detach {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        return match exec.spawn(registry, &mut command) {
            Ok(_) => Ok(server::empty(StatusCode::OK)),
            Err(source) => {
                exec.failed(spawn_exit_code(&source));
                Err(VdockerError::ExecSpawn { program, source })
            }
        };
    }

    let tty = exec.config.tty || body.tty;
    let size = body
        .console_size
        .or(exec.config.console_size)
        .filter(|[h, w]| *h > 0 && *w > 0);
    let session = if tty {
        set_up_pty(registry, &exec, &mut command, size)
    } else {
        set_up_pipes(registry, &exec, &mut command)
    };
    // The parent's copies of the child's ends (the pty slave) close here,
    // so the master reads end of file when the process is gone.
    drop(command);
    let session = session.unwrap_or_else(|source| {
        exec.failed(spawn_exit_code(&source));
        Session::Failed(format!("cradle: exec {program}: {source}\n"))
    });

    let content_type = if tty { RAW_STREAM } else { MULTIPLEXED_STREAM };
    let (response, hijack) = server::hijack(upgrade, content_type);
    tokio::spawn(async move {
        if let Some(io) = hijack.into_io().await {
            run_session(io, session, &exec, tty).await;
        }
    });
    Ok(response)
}

fn set_up_pipes(
    registry: &Registry,
    exec: &Arc<Exec>,
    command: &mut Command,
) -> io::Result<Session> {
    let pipe_or_null = |wanted: bool| {
        if wanted {
            Stdio::piped()
        } else {
            Stdio::null()
        }
    };
    command
        .stdin(pipe_or_null(exec.config.attach_stdin))
        .stdout(pipe_or_null(exec.config.attach_stdout))
        .stderr(pipe_or_null(exec.config.attach_stderr))
        .process_group(0);
    let mut child = exec.spawn(registry, command)?;
    let stream = |fd: Option<OwnedFd>| fd.map(FdStream::new).transpose();
    Ok(Session::Pipes {
        stdin: stream(child.stdin.take().map(OwnedFd::from))?,
        stdout: stream(child.stdout.take().map(OwnedFd::from))?,
        stderr: stream(child.stderr.take().map(OwnedFd::from))?,
    })
}

fn set_up_pty(
    registry: &Registry,
    exec: &Arc<Exec>,
    command: &mut Command,
    size: Option<[u16; 2]>,
) -> io::Result<Session> {
    let (master, slave) = open_pty()?;
    if let Some([height, width]) = size {
        set_window_size(master.as_fd(), height, width)?;
    }
    use_as_terminal(command, slave)?;
    let master = Arc::new(master);
    exec.lock().pty = Some(Arc::clone(&master));
    exec.spawn(registry, command)?;
    Ok(Session::Pty {
        master: FdStream::pty_master(master.try_clone()?)?,
        forward_stdin: exec.config.attach_stdin,
    })
}

/// Runs the client side of a session until the process is done.
async fn run_session(io: BoxIo, session: Session, exec: &Exec, tty: bool) {
    let (client_in, mut client_out) = tokio::io::split(io);
    match session {
        Session::Failed(message) => {
            let bytes = if tty {
                message.into_bytes()
            } else {
                frames::encode(StreamKind::Stderr, message.as_bytes())
            };
            let _ = client_out.write_all(&bytes).await;
        }
        Session::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            let forward = stdin.map(|stdin| tokio::spawn(forward_stdin(client_in, stdin)));
            let copy = copy_outputs(stdout, stderr, &mut client_out);
            if until_exit_and_grace(exec, copy).await {
                exec.wait_exit().await;
            }
            if let Some(task) = forward {
                task.abort();
            }
        }
        Session::Pty {
            master,
            forward_stdin,
        } => {
            let (mut pty_out, pty_in) = tokio::io::split(master);
            let forward = forward_stdin.then(|| tokio::spawn(forward_input(client_in, pty_in)));
            let copy = tokio::io::copy(&mut pty_out, &mut client_out);
            if until_exit_and_grace(exec, copy).await {
                exec.wait_exit().await;
            }
            if let Some(task) = forward {
                task.abort();
            }
        }
    }
    let _ = client_out.shutdown().await;
}

/// Runs `copy` (process output to client) until it ends, or until the
/// process has exited and [`OUTPUT_GRACE_MS`] more have passed (a
/// background child of it may keep the output open). False if the client
/// went away.
async fn until_exit_and_grace<T>(
    exec: &Exec,
    copy: impl std::future::Future<Output = io::Result<T>>,
) -> bool {
    let exited_and_grace = async {
        exec.wait_exit().await;
        tokio::time::sleep(Duration::from_millis(OUTPUT_GRACE_MS)).await;
    };
    tokio::select! {
        copied = copy => copied.is_ok(),
        () = exited_and_grace => true,
    }
}

/// Client to the process's stdin pipe; at the client's end of input the
/// pipe is closed (dropped), so the process reads end of file.
async fn forward_stdin(client_in: ReadHalf<BoxIo>, stdin: FdStream) {
    forward_input(client_in, stdin).await;
}

/// Client to `to` until the client's input ends.
async fn forward_input<W: AsyncWrite + Unpin>(mut client_in: ReadHalf<BoxIo>, mut to: W) {
    let _ = tokio::io::copy(&mut client_in, &mut to).await;
}

/// Multiplexes stdout and stderr onto `out` until both end.
async fn copy_outputs<W: AsyncWrite + Unpin>(
    mut stdout: Option<FdStream>,
    mut stderr: Option<FdStream>,
    out: &mut W,
) -> io::Result<()> {
    let mut out_buffer = vec![0u8; OUTPUT_BUFFER_BYTES];
    let mut err_buffer = vec![0u8; OUTPUT_BUFFER_BYTES];
    while stdout.is_some() || stderr.is_some() {
        let (stream, read) = tokio::select! {
            read = read_some(&mut stdout, &mut out_buffer) => (StreamKind::Stdout, read),
            read = read_some(&mut stderr, &mut err_buffer) => (StreamKind::Stderr, read),
        };
        let (source, buffer) = match stream {
            StreamKind::Stdout => (&mut stdout, &out_buffer),
            StreamKind::Stderr => (&mut stderr, &err_buffer),
        };
        match read {
            Ok(0) | Err(_) => *source = None,
            Ok(read) => {
                let data = buffer.get(..read).unwrap_or_default();
                out.write_all(&frames::encode(stream, data)).await?;
            }
        }
    }
    out.flush().await
}

/// Reads from `stream` if it is still open; never completes otherwise.
async fn read_some<R: AsyncRead + Unpin>(
    stream: &mut Option<R>,
    buffer: &mut [u8],
) -> io::Result<usize> {
    match stream {
        Some(stream) => stream.read(buffer).await,
        None => std::future::pending().await,
    }
}

/// Makes `slave` (a pty's) the stdin, stdout and stderr of `command` and the
/// controlling terminal of the new session it starts (setsid; so no
/// `process_group` on the command: a group leader cannot start a session).
pub(super) fn use_as_terminal(command: &mut Command, slave: OwnedFd) -> io::Result<()> {
    command
        .stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave));
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: setsid and ioctl are, and
    // last_os_error only reads errno. Stdio is already on fds 0-2 then, so
    // fd 0 is the pty slave, which becomes the controlling terminal of the
    // new session.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// A new pty: (master, slave), both close-on-exec.
pub(super) fn open_pty() -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: posix_openpt takes flags and returns a new fd or -1.
    let raw = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a new fd that nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: grantpt takes the master fd, open above, and no memory.
    if unsafe { libc::grantpt(master.as_raw_fd()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as grantpt.
    if unsafe { libc::unlockpt(master.as_raw_fd()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut name = [0u8; PTY_NAME_BYTES];
    // SAFETY: ptsname_r writes at most name.len() bytes, NUL included, into
    // name, a live local buffer of that size.
    let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr().cast(), name.len()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    let path = CStr::from_bytes_until_nul(&name)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    let path = path
        .to_str()
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)?;
    Ok((master, OwnedFd::from(slave)))
}

/// `TIOCSWINSZ`: the terminal's rows and columns.
pub(super) fn set_window_size(fd: BorrowedFd<'_>, height: u16, width: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: height,
        ws_col: width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize through the pointer, which
    // refers to a live local; fd is open (borrowed).
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_id_is_64_hex_and_unique() {
        let a = exec_id(1);
        let b = exec_id(2);

        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn create_body_parses_the_cli_fields() {
        let body: ExecCreateBody = serde_json::from_str(
            r#"{"User":"","Privileged":false,"Tty":true,"ConsoleSize":[24,80],
                "AttachStdin":true,"AttachStderr":true,"AttachStdout":true,
                "Detach":false,"DetachKeys":"","Env":null,"WorkingDir":"","Cmd":["sh"]}"#,
        )
        .unwrap();

        assert!(body.tty && body.attach_stdin);
        assert_eq!(body.console_size, Some([24, 80]));
        assert_eq!(body.cmd, Some(vec!["sh".to_owned()]));
    }

    #[test]
    fn open_pty_gives_a_terminal_whose_size_can_be_set() {
        let (master, slave) = open_pty().unwrap();

        set_window_size(master.as_fd(), 30, 100).unwrap();

        // SAFETY: isatty takes a plain fd.
        assert_eq!(unsafe { libc::isatty(slave.as_raw_fd()) }, 1);
    }
}
