//! The shim: containerd's `start`/`delete` subcommands ([`Shim`]) and the task service
//! ([`Task`]) for one container in one crib VM.
//!
//! - Create: reads the bundle's config.json, mounts the rootfs containerd gives (an
//!   overlay snapshot) at the bundle's root directory and writes crib's launch file.
//! - Start: boots the VM (`crib pod run`); cradle runs the process chrooted into the
//!   rootfs, which reaches the guest over virtio-fs. A thread streams the container's
//!   output from the pod's Docker API into containerd's FIFOs, waits for the exit code
//!   and publishes the exit.
//! - Kill sends the signal through the Docker API; Delete shuts the VM down, unmounts
//!   the rootfs and removes the shim's state directory; Shutdown ends the shim.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use containerd_shim::api;
use containerd_shim::protos::events::task::{TaskExit, TaskStart};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{EnumOrUnknown, MessageField};
use containerd_shim::protos::topics::{TASK_EXIT_EVENT_TOPIC, TASK_START_EVENT_TOPIC};
use containerd_shim::protos::ttrpc::{get_status, Code};
use containerd_shim::protos::types::task::{ProcessInfo, Status};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{
    Config, Context, DeleteResponse, ExitSignal, Flags, StartOpts, TtrpcContext, TtrpcResult,
};
use thiserror::Error;

use crate::docker::{self, DockerClient, DockerError, Stream};
use crate::spec::{self, OciSpec, SpecError};
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
    #[error("container {id:?}: exec processes are not supported by crib's shim yet")]
    Exec { id: String },
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
            Self::UnknownTask { .. } => Code::NOT_FOUND,
            Self::Exists { .. } => Code::ALREADY_EXISTS,
            Self::Exec { .. } => Code::UNIMPLEMENTED,
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
    stdout: String,
    stderr: String,
    state: PathBuf,
    launch: PathBuf,
    vm: Option<Vm>,
    pid: u32,
    phase: Phase,
    exit: Option<(u32, Timestamp)>,
}

impl Container {
    fn run_dir(&self) -> PathBuf {
        self.state.join("run")
    }

    fn status(&self) -> Status {
        match self.phase {
            Phase::Created => Status::CREATED,
            Phase::Running => Status::RUNNING,
            Phase::Stopped => Status::STOPPED,
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
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            state,
            launch,
            vm: None,
            pid,
            phase: Phase::Created,
            exit: None,
        });
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
        let (stdout, stderr) = (container.stdout.clone(), container.stderr.clone());
        let shared = Arc::clone(&self.shared);
        let id = id.to_owned();
        std::thread::Builder::new()
            .name("io-wait".into())
            .spawn(move || follow(shared, docker, id, pid, stdout, stderr))
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
        if !req.exec_id.is_empty() {
            return Err(ShimError::Exec { id: req.id.clone() });
        }
        let Some(container) = guard.as_mut() else {
            return Ok(());
        };
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
        Ok(response)
    }
}

/// The container's output into containerd's FIFOs, then its exit: runs on its own thread
/// from Start until the process has exited.
fn follow(
    shared: Arc<Shared>,
    docker: DockerClient,
    id: String,
    pid: u32,
    stdout: String,
    stderr: String,
) {
    let status = match stream_and_wait(&docker, &stdout, &stderr) {
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

/// Opens a FIFO (or file) containerd gave for a stream; none for an empty path.
fn open_output(path: &str) -> Option<File> {
    if path.is_empty() {
        return None;
    }
    match OpenOptions::new().write(true).open(path) {
        Ok(file) => Some(file),
        Err(error) => {
            log::warn!("cannot open {path}: {error}; that output is dropped");
            None
        }
    }
}

/// Waits until the container has left "created" in the guest, streams its logs from the
/// start into the FIFOs until it has exited and its output is drained, then returns its
/// exit code.
fn stream_and_wait(docker: &DockerClient, stdout: &str, stderr: &str) -> Result<i64, ShimError> {
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
    let mut out = open_output(stdout);
    let mut err = open_output(stderr);
    let response = docker.send(
        "GET",
        &format!("/containers/{CONTAINER}/logs?follow=1&stdout=1&stderr=1"),
    )?;
    if response.status == 200 {
        let written = docker::demux(response.body, |stream, bytes| {
            let target = match stream {
                Stream::Stdout => out.as_mut(),
                Stream::Stderr => err.as_mut(),
            };
            if let Some(file) = target {
                // A reader that went away (EPIPE) drops the rest of that stream only.
                if file.write_all(bytes).is_err() {
                    match stream {
                        Stream::Stdout => out = None,
                        Stream::Stderr => err = None,
                    }
                }
            }
            Ok(())
        });
        if let Err(error) = written {
            log::warn!("the container's output stream broke: {error}");
        }
    }
    drop((out, err));
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
        if !req.exec_id.is_empty() {
            return Err(ShimError::Exec { id: req.id }.into());
        }
        let pid = self.start_container(&req.id)?;
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
        if let Some(c) = guard.as_ref() {
            response.id = c.id.clone();
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
        if !req.exec_id.is_empty() {
            return Err(ShimError::Exec { id: req.id }.into());
        }
        let mut guard = self.shared.lock();
        self.check_id(&guard, &req.id)?;
        loop {
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
            return Err(ShimError::Exec { id: req.id }.into());
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
