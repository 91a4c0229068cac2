//! The shim: containerd's `start`/`delete` subcommands ([`Shim`]) and the task service
//! ([`Task`]) for one container in one crib VM.
//!
//! - Create: reads the bundle's config.json, mounts the rootfs containerd gives (an
//!   overlay snapshot) at the bundle's root directory and writes crib's launch file.
//! - Start: boots the VM (`crib pod run`); cradle runs the process chrooted into the
//!   rootfs, which reaches the guest over virtio-fs. A thread streams the container's
//!   output from the pod's Docker API into containerd's FIFOs, waits for the exit code
//!   and publishes the exit.
//! - Exec and Start(exec) run a process in the container through the Docker API's exec
//!   (with or without a TTY), its stdio bridged to the exec's FIFOs; the main process's
//!   stdin goes through an attach. CloseIO ends a process's stdin.
//! - Kill sends the signal through the Docker API; Delete shuts the VM down, unmounts
//!   the rootfs and removes the shim's state directory; Shutdown ends the shim.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use containerd_shim::api;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{EnumOrUnknown, MessageField};
use containerd_shim::protos::topics::{
    TASK_CREATE_EVENT_TOPIC, TASK_DELETE_EVENT_TOPIC, TASK_EXEC_ADDED_EVENT_TOPIC,
    TASK_EXEC_STARTED_EVENT_TOPIC, TASK_EXIT_EVENT_TOPIC, TASK_START_EVENT_TOPIC,
};
use containerd_shim::protos::ttrpc::{get_status, Code};
use containerd_shim::protos::types::task::{ProcessInfo, Status};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{
    Config, Context, DeleteResponse, ExitSignal, Flags, StartOpts, TtrpcContext, TtrpcResult,
};
use thiserror::Error;

use crate::docker::{self, DockerClient, DockerError};
use crate::spec::{self, ExecProcess, OciSpec, SpecError};
use crate::stdio;
use crate::vm::{self, Vm, VmError};

/// The container's name in the pod's Docker API.
const CONTAINER: &str = spec::PROCESS_NAME;
/// How long the VM may take to boot to cradle's Docker API.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// SIGKILL after this long once the pod is asked to shut down.
const STOP_GRACE: Duration = Duration::from_secs(1);
/// crib is killed if it has not exited this long after the shutdown call.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the container may stay "created" in the guest after boot.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// The exit status of a task whose VM did not boot (as for a process that could not be
/// started).
const START_FAILED_STATUS: u32 = 255;
/// The exit status containerd shows for a task whose shim died (runc's shim does the same).
const KILLED_STATUS: u32 = 128 + 9;
/// How long an exec's exit code may take to show in the Docker API after its stream
/// ended.
const EXEC_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the task service; each becomes a ttrpc status containerd shows.
#[derive(Debug, Error)]
pub enum ShimError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("runtime options of type {type_url:?} are not supported by crib: remove the runtime's options (containerd config.toml, or ctr's --runc-* and --runtime-config-path flags)")]
    UnknownOptions { type_url: String },
    #[error("a checkpoint was given: crib cannot restore checkpoints")]
    Checkpoint,
    #[error("the container's root filesystem {} is missing or empty: the image's snapshot was not mounted", path.display())]
    MissingRootfs { path: PathBuf },
    #[error("cannot mount the rootfs ({kind} {source_path}) on {}", target.display())]
    Mount {
        kind: String,
        source_path: String,
        target: PathBuf,
        #[source]
        source: crate::mount::MountError,
    },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no container {id:?} in this shim (it runs {ours:?})")]
    UnknownTask { id: String, ours: String },
    #[error("container {id:?} was created already")]
    Exists { id: String },
    #[error("container {id:?} has no exec process {exec_id:?}; ctr task exec --exec-id names it")]
    UnknownExec { id: String, exec_id: String },
    #[error("container {id:?} has an exec process {exec_id:?} already: give another --exec-id")]
    ExecExists { id: String, exec_id: String },
    #[error("container {id:?}: the exec request has no process spec: containerd sends one with every exec")]
    NoExecSpec { id: String },
    #[error("container {id:?}: the Docker API's answer to {what} has no {field}")]
    Answer {
        id: String,
        what: &'static str,
        field: &'static str,
    },
    #[error("container {id:?} is {state}; {fix}")]
    State {
        id: String,
        state: &'static str,
        fix: &'static str,
    },
}

impl ShimError {
    fn code(&self) -> Code {
        match self {
            Self::UnknownOptions { .. } | Self::Checkpoint | Self::Spec(_) => {
                Code::INVALID_ARGUMENT
            }
            Self::MissingRootfs { .. } => Code::FAILED_PRECONDITION,
            Self::UnknownTask { .. } | Self::UnknownExec { .. } => Code::NOT_FOUND,
            Self::Exists { .. } | Self::ExecExists { .. } => Code::ALREADY_EXISTS,
            Self::NoExecSpec { .. } => Code::INVALID_ARGUMENT,
            Self::State { .. } => Code::FAILED_PRECONDITION,
            _ => Code::INTERNAL,
        }
    }
}

impl From<ShimError> for containerd_shim::protos::ttrpc::Error {
    fn from(error: ShimError) -> Self {
        // The whole chain, once: containerd prints the message to the user.
        let mut message = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        log::error!("{message}");
        Self::RpcStatus(get_status(error.code(), message))
    }
}

/// Runtime options (`CreateTaskRequest.options`): crib takes none yet, so only an empty
/// message is accepted; anything else is named rather than ignored.
pub fn check_options(type_url: &str, value: &[u8]) -> Result<(), ShimError> {
    if type_url.is_empty() && value.is_empty() {
        return Ok(());
    }
    // containerd's CRI plugin sends runc's options type with every field empty when a
    // runtime has no options table; an empty runc Options asks for nothing.
    if type_url.ends_with("containerd.runc.v1.Options") && value.is_empty() {
        return Ok(());
    }
    Err(ShimError::UnknownOptions {
        type_url: type_url.to_owned(),
    })
}

/// Where the shim keeps a container's state: `$CRIB_SHIM_STATE_DIR/<pod name>`, else
/// under `/run/crib-shim`. Short on purpose: crib's Unix sockets live inside it.
pub fn state_dir(namespace: &str, id: &str) -> PathBuf {
    let root = std::env::var_os("CRIB_SHIM_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/crib-shim"));
    root.join(spec::pod_name(namespace, id))
}

/// How the task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
    Stopped,
}

/// The one container of this shim.
struct Container {
    id: String,
    bundle: PathBuf,
    rootfs: PathBuf,
    /// The shim mounted `rootfs` (and unmounts it at delete).
    mounted: bool,
    stdin: String,
    stdout: String,
    stderr: String,
    /// Set by CloseIO: the stdin pump ends once what was written is sent.
    stdin_closed: Arc<AtomicBool>,
    execs: HashMap<String, ExecProc>,
    state: PathBuf,
    launch: PathBuf,
    vm: Option<Vm>,
    pid: u32,
    phase: Phase,
    exit: Option<(u32, Timestamp)>,
}

/// An exec process of the container (`ctr task exec`).
struct ExecProc {
    process: ExecProcess,
    stdin: String,
    stdout: String,
    stderr: String,
    stdin_closed: Arc<AtomicBool>,
    phase: Phase,
    /// Its pid in the guest once started (crib's before).
    pid: u32,
    exit: Option<(u32, Timestamp)>,
    /// Its id in the pod's Docker API, once started.
    docker_id: Option<String>,
    /// `[height, width]` of its terminal.
    size: Option<[u16; 2]>,
}

fn status_of(phase: Phase) -> Status {
    match phase {
        Phase::Created => Status::CREATED,
        Phase::Running => Status::RUNNING,
        Phase::Stopped => Status::STOPPED,
    }
}

impl Container {
    fn run_dir(&self) -> PathBuf {
        self.state.join("run")
    }

    fn status(&self) -> Status {
        status_of(self.phase)
    }

    fn exec(&self, exec_id: &str) -> Result<&ExecProc, ShimError> {
        self.execs
            .get(exec_id)
            .ok_or_else(|| ShimError::UnknownExec {
                id: self.id.clone(),
                exec_id: exec_id.to_owned(),
            })
    }

    fn exec_mut(&mut self, exec_id: &str) -> Result<&mut ExecProc, ShimError> {
        let id = self.id.clone();
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| ShimError::UnknownExec {
                id,
                exec_id: exec_id.to_owned(),
            })
    }

    /// The pod's Docker API, while the VM runs.
    fn running_docker(&self) -> Result<DockerClient, ShimError> {
        match (self.phase, self.vm.as_ref()) {
            (Phase::Running, Some(vm)) => Ok(vm.docker()),
            (Phase::Created, _) => Err(ShimError::State {
                id: self.id.clone(),
                state: "created, not started",
                fix: "start it first (ctr task start)",
            }),
            _ => Err(ShimError::State {
                id: self.id.clone(),
                state: "stopped",
                fix: "exec runs only in a running container",
            }),
        }
    }

    /// Stops the VM, unmounts the rootfs and removes the state directory.
    fn tear_down(&mut self) {
        if let Some(mut vm) = self.vm.take() {
            if let Err(error) = vm.stop(STOP_GRACE, STOP_TIMEOUT) {
                log::warn!("container {}: shutdown call failed: {error}", self.id);
            }
        }
        if self.mounted {
            match unmount(&self.rootfs) {
                Ok(()) => self.mounted = false,
                Err(error) => log::warn!(
                    "container {}: cannot unmount {}: {error}",
                    self.id,
                    self.rootfs.display()
                ),
            }
        }
        if let Err(error) = std::fs::remove_dir_all(&self.state) {
            if error.kind() != std::io::ErrorKind::NotFound {
                log::warn!(
                    "container {}: cannot remove {}: {error}",
                    self.id,
                    self.state.display()
                );
            }
        }
    }
}

/// Unmounts `path` (lazily if it is busy).
fn unmount(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `c_path` is a NUL-terminated string that lives across the call; umount2
    // reads it and touches no other memory.
    let done = unsafe { libc::umount2(c_path.as_ptr(), 0) };
    if done == 0 {
        return Ok(());
    }
    // SAFETY: as above; MNT_DETACH only changes when the kernel frees the mount.
    let done = unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// What the service threads share.
struct Shared {
    container: Mutex<Option<Container>>,
    changed: Condvar,
    namespace: String,
    publisher: Option<RemotePublisher>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Option<Container>> {
        self.container
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self, topic: &str, event: Box<dyn containerd_shim::protos::protobuf::MessageDyn>) {
        if let Some(publisher) = &self.publisher {
            if let Err(error) = publisher.publish(Context::default(), topic, &self.namespace, event)
            {
                log::warn!("cannot publish {topic}: {error}");
            }
        }
    }
}

/// The shim and its task service.
#[derive(Clone)]
pub struct Service {
    id: String,
    namespace: String,
    exit: Arc<ExitSignal>,
    shared: Arc<Shared>,
}

impl containerd_shim::Shim for Service {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Service {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            exit: Arc::new(ExitSignal::default()),
            shared: Arc::new(Shared {
                container: Mutex::new(None),
                changed: Condvar::new(),
                namespace: args.namespace.clone(),
                publisher: None,
            }),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        // One shim (and one VM) per container for now: group by the container's id.
        let grouping = opts.id.clone();
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        Ok(address)
    }

    /// `delete`: containerd's clean-up after a shim died. Kills a crib left running,
    /// unmounts the rootfs and removes the state directory.
    fn delete_shim(&mut self) -> Result<DeleteResponse, containerd_shim::Error> {
        let state = state_dir(&self.namespace, &self.id);
        if let Ok(pid) = std::fs::read_to_string(state.join("crib.pid")) {
            if let Ok(pid) = pid.trim().parse::<libc::pid_t>() {
                // SAFETY: kill takes no memory. The pid is the crib this shim started
                // (its file is removed with the state directory at a clean delete).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if let Ok(bundle) = std::env::current_dir() {
            let rootfs = OciSpec::load(&bundle)
                .map(|s| s.root_dir(&bundle))
                .unwrap_or_else(|_| bundle.join("rootfs"));
            let _ = unmount(&rootfs);
        }
        let _ = std::fs::remove_dir_all(&state);
        let mut response = DeleteResponse::new();
        response.exit_status = KILLED_STATUS;
        response.exited_at = MessageField::some(Timestamp::now());
        Ok(response)
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let mut service = self.clone();
        service.shared = Arc::new(Shared {
            container: Mutex::new(None),
            changed: Condvar::new(),
            namespace: self.namespace.clone(),
            publisher: Some(publisher),
        });
        service
    }
}

impl Service {
    fn check_id(&self, container: &Option<Container>, id: &str) -> Result<(), ShimError> {
        match container {
            Some(c) if c.id == id => Ok(()),
            Some(c) => Err(ShimError::UnknownTask {
                id: id.to_owned(),
                ours: c.id.clone(),
            }),
            None => Err(ShimError::UnknownTask {
                id: id.to_owned(),
                ours: String::new(),
            }),
        }
    }

    fn create_container(&self, req: &api::CreateTaskRequest) -> Result<u32, ShimError> {
        let mut guard = self.shared.lock();
        if guard.is_some() {
            return Err(ShimError::Exists { id: req.id.clone() });
        }
        if let Some(options) = req.options.as_ref() {
            check_options(&options.type_url, &options.value)?;
        }
        if !req.checkpoint.is_empty() {
            return Err(ShimError::Checkpoint);
        }
        let bundle = PathBuf::from(&req.bundle);
        let oci = OciSpec::load(&bundle)?;
        let process = oci.container_process()?;
        let rootfs = oci.root_dir(&bundle);
        let mut mounted = false;
        for mount in &req.rootfs {
            std::fs::create_dir_all(&rootfs).map_err(|source| ShimError::Write {
                path: rootfs.clone(),
                source,
            })?;
            let mounted_now =
                crate::mount::mount(&mount.type_, &mount.source, &mount.options, &rootfs);
            if let Err(source) = mounted_now {
                if mounted {
                    let _ = unmount(&rootfs);
                }
                return Err(ShimError::Mount {
                    kind: mount.type_.clone(),
                    source_path: mount.source.clone(),
                    target: rootfs.clone(),
                    source,
                });
            }
            mounted = true;
        }
        let empty = std::fs::read_dir(&rootfs).map_or(true, |mut d| d.next().is_none());
        if empty {
            if mounted {
                let _ = unmount(&rootfs);
            }
            return Err(ShimError::MissingRootfs { path: rootfs });
        }
        let state = state_dir(&self.namespace, &req.id);
        let prepared = (|| {
            std::fs::create_dir_all(&state)?;
            let launch = state.join("launch.json");
            let pod = spec::pod_name(&self.namespace, &req.id);
            let json = spec::launch_file(
                &pod,
                &process,
                &rootfs,
                oci.root_readonly(),
                &state.join("run"),
            );
            std::fs::write(&launch, serde_json::to_vec_pretty(&json)?)?;
            Ok::<_, std::io::Error>(launch)
        })();
        let launch = match prepared {
            Ok(launch) => launch,
            Err(source) => {
                if mounted {
                    let _ = unmount(&rootfs);
                }
                return Err(ShimError::Write {
                    path: state,
                    source,
                });
            }
        };
        let pid = std::process::id();
        *guard = Some(Container {
            id: req.id.clone(),
            bundle,
            rootfs,
            mounted,
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            stdin_closed: Arc::new(AtomicBool::new(false)),
            execs: HashMap::new(),
            state,
            launch,
            vm: None,
            pid,
            phase: Phase::Created,
            exit: None,
        });
        drop(guard);
        let mut event = TaskCreate::new();
        event.container_id = req.id.clone();
        event.bundle = req.bundle.clone();
        event.rootfs = req.rootfs.clone();
        let mut io = TaskIO::new();
        io.stdin = req.stdin.clone();
        io.stdout = req.stdout.clone();
        io.stderr = req.stderr.clone();
        io.terminal = req.terminal;
        event.io = MessageField::some(io);
        event.checkpoint = req.checkpoint.clone();
        event.pid = pid;
        self.shared
            .publish(TASK_CREATE_EVENT_TOPIC, Box::new(event));
        Ok(pid)
    }

    fn start_container(&self, id: &str) -> Result<u32, ShimError> {
        let mut guard = self.shared.lock();
        self.check_id(&guard, id)?;
        let Some(container) = guard.as_mut() else {
            return Err(ShimError::UnknownTask {
                id: id.to_owned(),
                ours: String::new(),
            });
        };
        if container.phase != Phase::Created {
            return Err(ShimError::State {
                id: id.to_owned(),
                state: "started already",
                fix: "create a new task to run it again",
            });
        }
        let log = container.state.join("crib.log");
        let launched = Vm::launch(
            &vm::crib_binary(),
            &container.launch,
            &container.run_dir(),
            &log,
            BOOT_TIMEOUT,
        );
        let vm = match launched {
            Ok(vm) => vm,
            Err(error) => {
                // The task ends here, so containerd can delete it (it refuses a task that
                // is still "created").
                container.phase = Phase::Stopped;
                container.exit = Some((START_FAILED_STATUS, Timestamp::now()));
                self.shared.changed.notify_all();
                return Err(error.into());
            }
        };
        let pid = vm.pid();
        let _ = std::fs::write(container.state.join("crib.pid"), pid.to_string());
        let docker = vm.docker();
        container.vm = Some(vm);
        container.pid = pid;
        container.phase = Phase::Running;
        let io = Io {
            stdin: container.stdin.clone(),
            stdout: container.stdout.clone(),
            stderr: container.stderr.clone(),
            stdin_closed: Arc::clone(&container.stdin_closed),
        };
        let shared = Arc::clone(&self.shared);
        let id = id.to_owned();
        std::thread::Builder::new()
            .name("io-wait".into())
            .spawn(move || follow(shared, docker, id, pid, io))
            .map_err(|source| ShimError::Write {
                path: PathBuf::from("(thread)"),
                source,
            })?;
        let mut event = TaskStart::new();
        event.container_id = container.id.clone();
        event.pid = pid;
        drop(guard);
        self.shared.publish(TASK_START_EVENT_TOPIC, Box::new(event));
        Ok(pid)
    }

    fn kill_container(&self, req: &api::KillRequest) -> Result<(), ShimError> {
        let mut guard = self.shared.lock();
        self.check_id(&guard, &req.id)?;
        let Some(container) = guard.as_mut() else {
            return Ok(());
        };
        if !req.exec_id.is_empty() {
            return self.kill_exec(container, &req.exec_id, req.signal);
        }
        match (container.phase, container.vm.as_ref()) {
            (Phase::Running, Some(vm)) => {
                let path = format!("/containers/{CONTAINER}/kill?signal={}", req.signal);
                match vm.docker().call("POST", &path) {
                    Ok(_) => Ok(()),
                    // 409: the process has exited already; the exit is on its way.
                    Err(DockerError::Status { status: 409, .. }) => Ok(()),
                    Err(error) => Err(error.into()),
                }
            }
            (Phase::Created, _) => {
                // Never started: it ends as if killed.
                container.phase = Phase::Stopped;
                container.exit = Some((128 + req.signal, Timestamp::now()));
                self.shared.changed.notify_all();
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn delete_container(&self, id: &str) -> Result<api::DeleteResponse, ShimError> {
        let mut guard = self.shared.lock();
        self.check_id(&guard, id)?;
        let Some(mut container) = guard.take() else {
            return Err(ShimError::UnknownTask {
                id: id.to_owned(),
                ours: String::new(),
            });
        };
        if container.phase == Phase::Running {
            *guard = Some(container);
            return Err(ShimError::State {
                id: id.to_owned(),
                state: "running",
                fix: "kill it first (ctr task kill)",
            });
        }
        container.tear_down();
        let mut response = api::DeleteResponse::new();
        response.pid = container.pid;
        if let Some((status, at)) = &container.exit {
            response.exit_status = *status;
            response.exited_at = MessageField::some(at.clone());
        }
        // Wake waiters: the task is gone.
        self.shared.changed.notify_all();
        drop(guard);
        // As runc's shim: the task's container, pid and exit (no `id`).
        let mut event = TaskDelete::new();
        event.container_id = id.to_owned();
        event.pid = response.pid;
        event.exit_status = response.exit_status;
        event.exited_at = response.exited_at.clone();
        self.shared
            .publish(TASK_DELETE_EVENT_TOPIC, Box::new(event));
        Ok(response)
    }

    /// Exec: records the process (it runs at Start) and publishes exec-added.
    fn add_exec(&self, req: &api::ExecProcessRequest) -> Result<(), ShimError> {
        let mut guard = self.shared.lock();
        self.check_id(&guard, &req.id)?;
        let Some(container) = guard.as_mut() else {
            return Ok(());
        };
        container.running_docker()?;
        if container.execs.contains_key(&req.exec_id) {
            return Err(ShimError::ExecExists {
                id: req.id.clone(),
                exec_id: req.exec_id.clone(),
            });
        }
        let spec = req
            .spec
            .as_ref()
            .ok_or_else(|| ShimError::NoExecSpec { id: req.id.clone() })?;
        let process = spec::exec_process(&spec.value)?;
        let size = process.console_size;
        container.execs.insert(
            req.exec_id.clone(),
            ExecProc {
                process,
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                stdin_closed: Arc::new(AtomicBool::new(false)),
                phase: Phase::Created,
                pid: container.pid,
                exit: None,
                docker_id: None,
                size,
            },
        );
        drop(guard);
        let mut event = TaskExecAdded::new();
        event.container_id = req.id.clone();
        event.exec_id = req.exec_id.clone();
        self.shared
            .publish(TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(event));
        Ok(())
    }

    /// Start(exec): creates and starts the exec in the pod's Docker API (the container's
    /// root and namespaces), bridges its stdio and publishes exec-started; a thread
    /// records its exit.
    fn start_exec(&self, id: &str, exec_id: &str) -> Result<u32, ShimError> {
        let mut guard = self.shared.lock();
        self.check_id(&guard, id)?;
        let Some(container) = guard.as_mut() else {
            return Err(ShimError::UnknownTask {
                id: id.to_owned(),
                ours: String::new(),
            });
        };
        let docker = container.running_docker()?;
        let exec = container.exec(exec_id)?;
        if exec.phase != Phase::Created {
            return Err(ShimError::State {
                id: format!("{id}/{exec_id}"),
                state: "started already",
                fix: "exec a new process (another --exec-id)",
            });
        }
        let tty = exec.process.terminal;
        let create = serde_json::json!({
            "Cmd": exec.process.argv,
            "Env": exec.process.env,
            "WorkingDir": exec.process.cwd,
            "User": exec.process.user,
            "Tty": tty,
            "AttachStdin": !exec.stdin.is_empty(),
            "AttachStdout": !exec.stdout.is_empty(),
            "AttachStderr": !exec.stderr.is_empty() && !tty,
            "ConsoleSize": exec.size,
        });
        let answer = docker.call_json("POST", &format!("/containers/{CONTAINER}/exec"), &create)?;
        let docker_id = serde_json::from_str::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v["Id"].as_str().map(str::to_owned))
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric()))
            .ok_or_else(|| ShimError::Answer {
                id: id.to_owned(),
                what: "exec create",
                field: "Id",
            })?;
        let start = serde_json::json!({ "Detach": false, "Tty": tty, "ConsoleSize": exec.size });
        let session = docker.hijack(&format!("/exec/{docker_id}/start"), &start)?;
        let pid = exec_info(&docker, &docker_id)
            .and_then(|v| v["Pid"].as_u64())
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p > 0)
            .unwrap_or(container.pid);
        let io = Io {
            stdin: exec.stdin.clone(),
            stdout: exec.stdout.clone(),
            stderr: exec.stderr.clone(),
            stdin_closed: Arc::clone(&exec.stdin_closed),
        };
        let exec = container.exec_mut(exec_id)?;
        exec.phase = Phase::Running;
        exec.pid = pid;
        exec.docker_id = Some(docker_id.clone());
        if !io.stdin.is_empty() {
            let input = session
                .input
                .try_clone()
                .map_err(|source| ShimError::Write {
                    path: PathBuf::from(&io.stdin),
                    source,
                })?;
            let (path, closed) = (io.stdin.clone(), Arc::clone(&io.stdin_closed));
            spawn("exec-stdin", move || {
                stdio::pump_stdin(&path, input, &closed)
            })?;
        }
        let shared = Arc::clone(&self.shared);
        let (container_id, exec_name) = (id.to_owned(), exec_id.to_owned());
        spawn("exec-io", move || {
            stdio::copy_output(session.output, tty, &io.stdout, &io.stderr);
            let status = exec_exit(&docker, &docker_id);
            exec_exited(&shared, &container_id, &exec_name, pid, status);
        })?;
        drop(guard);
        let mut event = TaskExecStarted::new();
        event.container_id = id.to_owned();
        event.exec_id = exec_id.to_owned();
        event.pid = pid;
        self.shared
            .publish(TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(event));
        Ok(pid)
    }

    fn kill_exec(
        &self,
        container: &mut Container,
        exec_id: &str,
        signal: u32,
    ) -> Result<(), ShimError> {
        let docker = container.vm.as_ref().map(Vm::docker);
        let exec = container.exec_mut(exec_id)?;
        match (exec.phase, exec.docker_id.as_deref(), docker) {
            (Phase::Running, Some(docker_id), Some(docker)) => {
                let path = format!("/exec/{docker_id}/kill?signal={signal}");
                match docker.call("POST", &path) {
                    Ok(_) => Ok(()),
                    // 409: it has exited already; the exit is on its way.
                    Err(DockerError::Status { status: 409, .. }) => Ok(()),
                    Err(error) => Err(error.into()),
                }
            }
            (Phase::Created, _, _) => {
                exec.phase = Phase::Stopped;
                exec.exit = Some((128 + signal, Timestamp::now()));
                self.shared.changed.notify_all();
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn delete_exec(&self, id: &str, exec_id: &str) -> Result<api::DeleteResponse, ShimError> {
        let mut guard = self.shared.lock();
        self.check_id(&guard, id)?;
        let Some(container) = guard.as_mut() else {
            return Err(ShimError::UnknownTask {
                id: id.to_owned(),
                ours: String::new(),
            });
        };
        if container.exec(exec_id)?.phase == Phase::Running {
            return Err(ShimError::State {
                id: format!("{id}/{exec_id}"),
                state: "running",
                fix: "kill it first (ctr task kill --exec-id)",
            });
        }
        let exec = container.execs.remove(exec_id);
        let mut response = api::DeleteResponse::new();
        if let Some(exec) = exec {
            response.pid = exec.pid;
            if let Some((status, at)) = exec.exit {
                response.exit_status = status;
                response.exited_at = MessageField::some(at);
            }
        }
        self.shared.changed.notify_all();
        Ok(response)
    }

    fn close_stdin(&self, req: &api::CloseIORequest) -> Result<(), ShimError> {
        let guard = self.shared.lock();
        self.check_id(&guard, &req.id)?;
        let Some(container) = guard.as_ref() else {
            return Ok(());
        };
        let flag = if req.exec_id.is_empty() {
            &container.stdin_closed
        } else {
            &container.exec(&req.exec_id)?.stdin_closed
        };
        if req.stdin {
            flag.store(true, Ordering::Release);
        }
        Ok(())
    }

    fn resize_terminal(&self, req: &api::ResizePtyRequest) -> Result<(), ShimError> {
        let mut guard = self.shared.lock();
        self.check_id(&guard, &req.id)?;
        let Some(container) = guard.as_mut() else {
            return Ok(());
        };
        // The main process has no TTY (Create refuses one): nothing to resize, as runc's
        // shim does for a process without a console.
        if req.exec_id.is_empty() {
            return Ok(());
        }
        let docker = container.vm.as_ref().map(Vm::docker);
        let exec = container.exec_mut(&req.exec_id)?;
        let size = [
            u16::try_from(req.height).unwrap_or(u16::MAX),
            u16::try_from(req.width).unwrap_or(u16::MAX),
        ];
        exec.size = Some(size);
        if let (Phase::Running, true, Some(docker_id), Some(docker)) = (
            exec.phase,
            exec.process.terminal,
            exec.docker_id.as_deref(),
            docker,
        ) {
            let path = format!("/exec/{docker_id}/resize?h={}&w={}", size[0], size[1]);
            match docker.call("POST", &path) {
                Ok(_) | Err(DockerError::Status { status: 409, .. }) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }
}

/// A process's FIFOs and its CloseIO flag.
struct Io {
    stdin: String,
    stdout: String,
    stderr: String,
    stdin_closed: Arc<AtomicBool>,
}

/// Starts a named thread.
fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> Result<(), ShimError> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(body)
        .map(drop)
        .map_err(|source| ShimError::Write {
            path: PathBuf::from("(thread)"),
            source,
        })
}

/// `GET /exec/{id}/json`.
fn exec_info(docker: &DockerClient, docker_id: &str) -> Option<serde_json::Value> {
    let body = docker
        .call("GET", &format!("/exec/{docker_id}/json"))
        .ok()?;
    serde_json::from_str(&body).ok()
}

/// The exec's exit code once the Docker API has it (255 if it never shows).
fn exec_exit(docker: &DockerClient, docker_id: &str) -> u32 {
    let start = Instant::now();
    while start.elapsed() < EXEC_EXIT_TIMEOUT {
        match exec_info(docker, docker_id) {
            Some(info) => {
                if let Some(code) = info["ExitCode"].as_i64() {
                    return u32::try_from(code).unwrap_or(255);
                }
            }
            // The VM is gone (the container was deleted or ended).
            None => break,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    log::warn!("exec {docker_id}: no exit code from the pod's Docker API; reporting 255");
    255
}

/// Records an exec's exit and publishes it.
fn exec_exited(shared: &Shared, id: &str, exec_id: &str, pid: u32, status: u32) {
    let at = Timestamp::now();
    {
        let mut guard = shared.lock();
        if let Some(exec) = guard.as_mut().and_then(|c| c.execs.get_mut(exec_id)) {
            exec.phase = Phase::Stopped;
            exec.exit = Some((status, at.clone()));
        }
        shared.changed.notify_all();
    }
    let mut event = TaskExit::new();
    event.container_id = id.to_owned();
    event.id = exec_id.to_owned();
    event.pid = pid;
    event.exit_status = status;
    event.exited_at = MessageField::some(at);
    shared.publish(TASK_EXIT_EVENT_TOPIC, Box::new(event));
}

/// The container's output into containerd's FIFOs, then its exit: runs on its own thread
/// from Start until the process has exited.
fn follow(shared: Arc<Shared>, docker: DockerClient, id: String, pid: u32, io: Io) {
    let status = match stream_and_wait(&docker, &io) {
        Ok(code) => u32::try_from(code).unwrap_or(255),
        Err(error) => {
            log::error!("container {id}: {error}");
            255
        }
    };
    let at = Timestamp::now();
    {
        let mut guard = shared.lock();
        if let Some(container) = guard.as_mut() {
            container.phase = Phase::Stopped;
            container.exit = Some((status, at.clone()));
        }
        shared.changed.notify_all();
    }
    let mut event = TaskExit::new();
    event.container_id = id.clone();
    event.id = id;
    event.pid = pid;
    event.exit_status = status;
    event.exited_at = MessageField::some(at);
    shared.publish(TASK_EXIT_EVENT_TOPIC, Box::new(event));
}

/// Waits until the container has left "created" in the guest, feeds its stdin (an
/// attach), streams its logs from the start into the FIFOs until it has exited and its
/// output is drained, then returns its exit code.
fn stream_and_wait(docker: &DockerClient, io: &Io) -> Result<i64, ShimError> {
    // Before the process runs, a follow would end at once: wait for it to start (or end).
    let start = Instant::now();
    loop {
        let body = docker.call("GET", &format!("/containers/{CONTAINER}/json"))?;
        let value: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let state = value["State"]["Status"].as_str().unwrap_or("created");
        if state != "created" || start.elapsed() > RUN_TIMEOUT {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !io.stdin.is_empty() {
        // cradle's own closeStdin: the process's stdin closes when this input ends.
        let path = format!("/containers/{CONTAINER}/attach?stream=1&stdin=1&closeStdin=1");
        match docker.hijack(&path, &serde_json::Value::Null) {
            Ok(session) => {
                let (fifo, closed) = (io.stdin.clone(), Arc::clone(&io.stdin_closed));
                let input = session.input;
                spawn("stdin", move || stdio::pump_stdin(&fifo, input, &closed))?;
            }
            Err(error) => log::warn!("the container gets no stdin: {error}"),
        }
    }
    let response = docker.send(
        "GET",
        &format!("/containers/{CONTAINER}/logs?follow=1&stdout=1&stderr=1"),
    )?;
    if response.status == 200 {
        stdio::copy_output(response.body, false, &io.stdout, &io.stderr);
    }
    let body = docker.call("POST", &format!("/containers/{CONTAINER}/wait"))?;
    Ok(docker::wait_status(&body).unwrap_or(255))
}

fn now_or(at: &Option<(u32, Timestamp)>) -> (u32, MessageField<Timestamp>) {
    match at {
        Some((status, at)) => (*status, MessageField::some(at.clone())),
        None => (0, MessageField::none()),
    }
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let pid = self.create_container(&req)?;
        let mut response = api::CreateTaskResponse::new();
        response.pid = pid;
        Ok(response)
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = if req.exec_id.is_empty() {
            self.start_container(&req.id)?
        } else {
            self.start_exec(&req.id, &req.exec_id)?
        };
        let mut response = api::StartResponse::new();
        response.pid = pid;
        Ok(response)
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let guard = self.shared.lock();
        self.check_id(&guard, &req.id)?;
        let mut response = api::StateResponse::new();
        if let (Some(c), false) = (guard.as_ref(), req.exec_id.is_empty()) {
            let exec = c.exec(&req.exec_id)?;
            response.id = req.exec_id.clone();
            response.exec_id = req.exec_id.clone();
            response.bundle = c.bundle.display().to_string();
            response.pid = exec.pid;
            response.status = EnumOrUnknown::new(status_of(exec.phase));
            response.stdin = exec.stdin.clone();
            response.stdout = exec.stdout.clone();
            response.stderr = exec.stderr.clone();
            response.terminal = exec.process.terminal;
            let (status, at) = now_or(&exec.exit);
            response.exit_status = status;
            response.exited_at = at;
        } else if let Some(c) = guard.as_ref() {
            response.id = c.id.clone();
            response.stdin = c.stdin.clone();
            response.bundle = c.bundle.display().to_string();
            response.pid = c.pid;
            response.status = EnumOrUnknown::new(c.status());
            response.stdout = c.stdout.clone();
            response.stderr = c.stderr.clone();
            let (status, at) = now_or(&c.exit);
            response.exit_status = status;
            response.exited_at = at;
        }
        Ok(response)
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let mut guard = self.shared.lock();
        self.check_id(&guard, &req.id)?;
        if let Some(c) = guard.as_ref().filter(|_| !req.exec_id.is_empty()) {
            c.exec(&req.exec_id)?;
        }
        loop {
            if !req.exec_id.is_empty() {
                let exec = guard.as_ref().and_then(|c| c.execs.get(&req.exec_id));
                if let Some(None) = exec.map(|e| e.exit.as_ref()) {
                    guard = self
                        .shared
                        .changed
                        .wait(guard)
                        .unwrap_or_else(PoisonError::into_inner);
                    continue;
                }
                // Exited, or deleted (with its container) while waiting.
                let mut response = api::WaitResponse::new();
                let (status, at) = now_or(&exec.and_then(|e| e.exit.clone()));
                response.exit_status = status;
                response.exited_at = at;
                return Ok(response);
            }
            match guard.as_ref() {
                Some(c) if c.exit.is_none() => {}
                // Deleted while waiting, or exited.
                other => {
                    let mut response = api::WaitResponse::new();
                    let (status, at) = now_or(&other.and_then(|c| c.exit.clone()));
                    response.exit_status = status;
                    response.exited_at = at;
                    return Ok(response);
                }
            }
            guard = self
                .shared
                .changed
                .wait(guard)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        self.kill_container(&req)?;
        Ok(api::Empty::new())
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        if !req.exec_id.is_empty() {
            return Ok(self.delete_exec(&req.id, &req.exec_id)?);
        }
        Ok(self.delete_container(&req.id)?)
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let guard = self.shared.lock();
        self.check_id(&guard, &req.id)?;
        let mut response = api::PidsResponse::new();
        if let Some(c) = guard.as_ref().filter(|c| c.phase == Phase::Running) {
            let mut info = ProcessInfo::new();
            info.pid = c.pid;
            response.processes.push(info);
            // Running execs, by their pid in the guest.
            for exec in c.execs.values().filter(|e| e.phase == Phase::Running) {
                let mut info = ProcessInfo::new();
                info.pid = exec.pid;
                response.processes.push(info);
            }
        }
        Ok(response)
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let guard = self.shared.lock();
        let mut response = api::ConnectResponse::new();
        response.shim_pid = std::process::id();
        response.task_pid = guard.as_ref().map_or(0, |c| c.pid);
        response.version = env!("CARGO_PKG_VERSION").to_owned();
        Ok(response)
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        self.add_exec(&req)?;
        Ok(api::Empty::new())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        self.resize_terminal(&req)?;
        Ok(api::Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        self.close_stdin(&req)?;
        Ok(api::Empty::new())
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        // containerd calls it once the task is deleted; a task still here is torn down.
        if let Some(mut container) = self.shared.lock().take() {
            container.tear_down();
        }
        self.exit.signal();
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_options_are_accepted() {
        assert!(check_options("", &[]).is_ok());
    }

    #[test]
    fn empty_runc_options_are_accepted() {
        assert!(check_options("containerd.runc.v1.Options", &[]).is_ok());
    }

    #[test]
    fn unknown_options_are_named() {
        let err = check_options("type.example/acme.Options", &[1, 2]).unwrap_err();
        assert!(err.to_string().contains("acme.Options"), "{err}");
        assert_eq!(err.code(), Code::INVALID_ARGUMENT);
    }

    #[test]
    fn runc_options_with_settings_are_refused() {
        let err = check_options("containerd.runc.v1.Options", &[0x10, 1]).unwrap_err();
        assert!(matches!(err, ShimError::UnknownOptions { .. }), "{err}");
    }

    #[test]
    fn state_dir_is_short_and_per_container() {
        let a = state_dir("default", "web");
        assert_ne!(a, state_dir("default", "db"));
        assert!(a.as_os_str().len() < 60, "{}", a.display());
    }
}
