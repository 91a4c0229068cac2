//! The shim: containerd's `start`/`delete` subcommands ([`Shim`]) and the task service
//! ([`Task`]) for the containers of one crib VM: a lone container (`ctr run`), or a CRI
//! pod sandbox and its containers (one shim per sandbox, grouped by the CRI's
//! annotations).
//!
//! - Create: reads the bundle's config.json, mounts the rootfs containerd gives (an
//!   overlay snapshot) at the bundle's root directory and binds it into the VM's share
//!   directory (shared with the guest over virtio-fs); the VM's owner (the lone
//!   container, or the sandbox) also writes crib's launch file.
//! - Start: the owner boots the VM (`crib pod run`, in the sandbox's CNI network
//!   namespace); another container of the sandbox is added to the running VM through
//!   cradle's `POST /crib/v1/containers`. cradle runs each process chrooted into its
//!   root. A thread streams the container's output from the pod's Docker API into
//!   containerd's FIFOs, waits for the exit code and publishes the exit.
//! - Exec and Start(exec) run a process in the container through the Docker API's exec
//!   (with or without a TTY), its stdio bridged to the exec's FIFOs; the main process's
//!   stdin goes through an attach. CloseIO ends a process's stdin.
//! - Kill sends the signal through the Docker API; Delete removes a container from the
//!   VM, or (the owner) shuts the VM down, unmounts the roots and removes the state
//!   directory; Shutdown ends the shim once its last container is deleted.

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
use crate::mount;
use crate::spec::{self, ContainerProcess, ExecProcess, OciSpec, SpecError};
use crate::stats;
use crate::stdio;
use crate::vm::{self, Vm, VmError};

/// The name, in the pod's Docker API, of the container that owns the VM.
const CONTAINER: &str = spec::PROCESS_NAME;
/// The state directory's subdirectory shared with the guest: every container's root.
const SHARE_DIR: &str = "share";
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
    #[error("container {id:?} belongs to sandbox {sandbox:?}, which this shim does not run: create the sandbox's task first (CRI: RunPodSandbox)")]
    NoSandbox { id: String, sandbox: String },
    #[error("container {id:?} has no sandbox annotations but this shim runs pod {owner:?} already: give the container a task of its own")]
    OwnedAlready { id: String, owner: String },
    #[error("container {id:?}: its sandbox's VM is not running: start the sandbox first, or create it again")]
    SandboxDown { id: String },
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
            Self::State { .. } | Self::NoSandbox { .. } | Self::SandboxDown { .. } => {
                Code::FAILED_PRECONDITION
            }
            Self::OwnedAlready { .. } => Code::ALREADY_EXISTS,
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

/// A container of this shim: a lone container (`ctr run`) or a CRI sandbox, whose Start
/// boots the VM, or a container of that sandbox, added to the running VM.
struct Container {
    id: String,
    /// Its process name in the pod's Docker API: [`CONTAINER`] for the VM's owner, else
    /// one derived from its id.
    name: String,
    /// Its Start boots the VM and its Delete ends it.
    owns_vm: bool,
    bundle: PathBuf,
    rootfs: PathBuf,
    /// The shim mounted `rootfs` (and unmounts it at delete).
    mounted: bool,
    /// Its root's bind mount in the pod's share directory.
    shared_root: Option<PathBuf>,
    process: ContainerProcess,
    stdin: String,
    stdout: String,
    stderr: String,
    /// Set by CloseIO: the stdin pump ends once what was written is sent.
    stdin_closed: Arc<AtomicBool>,
    execs: HashMap<String, ExecProc>,
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

    /// Unmounts its root from the share and the bundle.
    fn unmount_roots(&mut self) {
        if let Some(shared) = self.shared_root.take() {
            if let Err(error) = mount::unmount(&shared) {
                log::warn!(
                    "container {}: cannot unmount {}: {error}",
                    self.id,
                    shared.display()
                );
            }
            let _ = std::fs::remove_dir(&shared);
        }
        if self.mounted {
            match mount::unmount(&self.rootfs) {
                Ok(()) => self.mounted = false,
                Err(error) => log::warn!(
                    "container {}: cannot unmount {}: {error}",
                    self.id,
                    self.rootfs.display()
                ),
            }
        }
    }

    /// Ends a process the VM took with it.
    fn vm_ended(&mut self) {
        if self.phase != Phase::Stopped {
            self.phase = Phase::Stopped;
            self.exit = Some((KILLED_STATUS, Timestamp::now()));
        }
        for exec in self.execs.values_mut() {
            if exec.phase != Phase::Stopped {
                exec.phase = Phase::Stopped;
                exec.exit = Some((KILLED_STATUS, Timestamp::now()));
            }
        }
    }
}

/// The VM's side of the shim: its state directory, launch file and, once started, crib.
struct PodVm {
    /// The container whose Start boots it.
    owner: String,
    state: PathBuf,
    launch: PathBuf,
    /// The CRI sandbox's network namespace, which crib joins.
    netns: Option<PathBuf>,
    vm: Option<Vm>,
}

impl PodVm {
    fn run_dir(&self) -> PathBuf {
        self.state.join("run")
    }

    fn share(&self) -> PathBuf {
        self.state.join(SHARE_DIR)
    }

    /// Stops crib, unmounts everything below the state directory and removes it.
    fn tear_down(&mut self) {
        if let Some(mut vm) = self.vm.take() {
            if let Err(error) = vm.stop(STOP_GRACE, STOP_TIMEOUT) {
                log::warn!("pod {}: shutdown call failed: {error}", self.owner);
            }
        }
        for stuck in mount::unmount_under(&self.state) {
            log::warn!("pod {}: cannot unmount {}", self.owner, stuck.display());
        }
        if let Err(error) = std::fs::remove_dir_all(&self.state) {
            if error.kind() != std::io::ErrorKind::NotFound {
                log::warn!(
                    "pod {}: cannot remove {}: {error}",
                    self.owner,
                    self.state.display()
                );
            }
        }
    }
}

/// This shim's containers and their VM: one container (`ctr run`), or a CRI sandbox
/// and the containers created in it.
#[derive(Default)]
struct Pod {
    containers: HashMap<String, Container>,
    vm: Option<PodVm>,
}

impl Pod {
    fn get(&self, id: &str) -> Result<&Container, ShimError> {
        self.containers.get(id).ok_or_else(|| self.unknown(id))
    }

    fn get_mut(&mut self, id: &str) -> Result<&mut Container, ShimError> {
        if !self.containers.contains_key(id) {
            return Err(self.unknown(id));
        }
        self.containers
            .get_mut(id)
            .ok_or_else(|| ShimError::UnknownTask {
                id: id.to_owned(),
                ours: String::new(),
            })
    }

    fn unknown(&self, id: &str) -> ShimError {
        let mut ours: Vec<&str> = self.containers.keys().map(String::as_str).collect();
        ours.sort_unstable();
        ShimError::UnknownTask {
            id: id.to_owned(),
            ours: ours.join(", "),
        }
    }

    /// crib's Docker API, while the VM runs.
    fn vm_docker(&self) -> Option<DockerClient> {
        self.vm.as_ref()?.vm.as_ref().map(Vm::docker)
    }

    /// crib's pid once the VM runs, else the shim's.
    fn vm_pid(&self) -> u32 {
        self.vm
            .as_ref()
            .and_then(|p| p.vm.as_ref())
            .map_or_else(std::process::id, Vm::pid)
    }

    /// The pod's Docker API for a process of container `id`, which must be running.
    fn running_docker(&self, id: &str) -> Result<DockerClient, ShimError> {
        let container = self.get(id)?;
        match (container.phase, self.vm_docker()) {
            (Phase::Running, Some(docker)) => Ok(docker),
            (Phase::Created, _) => Err(ShimError::State {
                id: id.to_owned(),
                state: "created, not started",
                fix: "start it first (ctr task start)",
            }),
            _ => Err(ShimError::State {
                id: id.to_owned(),
                state: "stopped",
                fix: "exec runs only in a running container",
            }),
        }
    }
}

/// What the service threads share.
struct Shared {
    pod: Mutex<Pod>,
    changed: Condvar,
    namespace: String,
    publisher: Option<RemotePublisher>,
}

impl Shared {
    fn new(namespace: &str, publisher: Option<RemotePublisher>) -> Self {
        Shared {
            pod: Mutex::new(Pod::default()),
            changed: Condvar::new(),
            namespace: namespace.to_owned(),
            publisher,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pod> {
        self.pod.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self, topic: &str, event: Box<dyn containerd_shim::protos::protobuf::MessageDyn>) {
        if let Some(publisher) = &self.publisher {
            if let Err(error) = publisher.publish(Context::default(), topic, &self.namespace, event)
            {
                log::warn!("cannot publish {topic}: {error}");
            }
        }
    }

    /// Records the exit of container `id`'s main process and publishes it.
    fn exited(&self, id: &str, pid: u32, status: u32) {
        let at = Timestamp::now();
        {
            let mut pod = self.lock();
            if let Some(container) = pod.containers.get_mut(id) {
                container.phase = Phase::Stopped;
                container.exit = Some((status, at.clone()));
            }
            self.changed.notify_all();
        }
        let mut event = TaskExit::new();
        event.container_id = id.to_owned();
        event.id = id.to_owned();
        event.pid = pid;
        event.exit_status = status;
        event.exited_at = MessageField::some(at);
        self.publish(TASK_EXIT_EVENT_TOPIC, Box::new(event));
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
            shared: Arc::new(Shared::new(&args.namespace, None)),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        // One shim (and one VM) per CRI sandbox: a container of a sandbox is served by
        // the sandbox's shim (the library returns its address when it runs already); a
        // container without the CRI's annotations gets a shim of its own. containerd
        // runs `start` in the container's bundle.
        let bundle = std::env::current_dir().unwrap_or_default();
        let grouping = match OciSpec::load(&bundle) {
            Ok(oci) => oci.grouping(&opts.id).to_owned(),
            Err(_) => opts.id.clone(),
        };
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        Ok(address)
    }

    /// `delete`: containerd's clean-up after a shim died. Kills a crib left running,
    /// unmounts the container's roots and removes the state directory of a VM it owned.
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
            let _ = mount::unmount_under(&rootfs);
        }
        let _ = mount::unmount_under(&state);
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
        service.shared = Arc::new(Shared::new(&self.namespace, Some(publisher)));
        service
    }
}

/// Mounts containerd's rootfs mounts on `rootfs` (nothing to do when there are none:
/// the bundle's directory is the root). Returns whether it mounted.
fn mount_rootfs(req: &api::CreateTaskRequest, rootfs: &Path) -> Result<bool, ShimError> {
    let mut mounted = false;
    for m in &req.rootfs {
        std::fs::create_dir_all(rootfs).map_err(|source| ShimError::Write {
            path: rootfs.to_path_buf(),
            source,
        })?;
        if let Err(source) = mount::mount(&m.type_, &m.source, &m.options, rootfs) {
            if mounted {
                let _ = mount::unmount_under(rootfs);
            }
            return Err(ShimError::Mount {
                kind: m.type_.clone(),
                source_path: m.source.clone(),
                target: rootfs.to_path_buf(),
                source,
            });
        }
        mounted = true;
    }
    let empty = std::fs::read_dir(rootfs).map_or(true, |mut d| d.next().is_none());
    if empty {
        if mounted {
            let _ = mount::unmount_under(rootfs);
        }
        return Err(ShimError::MissingRootfs {
            path: rootfs.to_path_buf(),
        });
    }
    Ok(mounted)
}

/// Binds the container's root into the pod's share as `share/name`.
fn share_root(share: &Path, name: &str, rootfs: &Path) -> Result<PathBuf, ShimError> {
    let target = share.join(name);
    std::fs::create_dir_all(&target).map_err(|source| ShimError::Write {
        path: target.clone(),
        source,
    })?;
    mount::bind(rootfs, &target, false).map_err(|source| ShimError::Mount {
        kind: "bind".to_owned(),
        source_path: rootfs.display().to_string(),
        target: target.clone(),
        source,
    })?;
    Ok(target)
}

/// Makes the VM's state directory: the share directory (a shared mount, so roots bound
/// below it later reach virtiofsd) and the launch file.
fn prepare_vm(
    namespace: &str,
    id: &str,
    process: &ContainerProcess,
    netns: Option<PathBuf>,
) -> Result<PodVm, ShimError> {
    let state = state_dir(namespace, id);
    let write_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ShimError::Write { path, source }
    };
    // A state directory left by a killed shim of the same id: its mounts go first.
    mount::unmount_under(&state);
    let share = state.join(SHARE_DIR);
    std::fs::create_dir_all(&share).map_err(write_error(&share))?;
    let pod_vm = PodVm {
        owner: id.to_owned(),
        launch: state.join("launch.json"),
        state,
        netns,
        vm: None,
    };
    let made = (|| {
        mount::make_shared(&share).map_err(|source| ShimError::Mount {
            kind: "bind".to_owned(),
            source_path: share.display().to_string(),
            target: share.clone(),
            source,
        })?;
        let pod = spec::pod_name(namespace, id);
        let json = spec::launch_file(
            &pod,
            process,
            &share,
            pod_vm.netns.as_deref(),
            &pod_vm.run_dir(),
        );
        let bytes = serde_json::to_vec_pretty(&json).map_err(|e| ShimError::Write {
            path: pod_vm.launch.clone(),
            source: e.into(),
        })?;
        std::fs::write(&pod_vm.launch, bytes).map_err(write_error(&pod_vm.launch))
    })();
    match made {
        Ok(()) => Ok(pod_vm),
        Err(error) => {
            let mut pod_vm = pod_vm;
            pod_vm.tear_down();
            Err(error)
        }
    }
}

impl Service {
    fn create_container(&self, req: &api::CreateTaskRequest) -> Result<u32, ShimError> {
        let mut pod = self.shared.lock();
        if pod.containers.contains_key(&req.id) {
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
        let owns_vm = match (oci.sandbox(), pod.vm.as_ref()) {
            (None, None) => true,
            (Some(sandbox), Some(vm)) if sandbox == vm.owner => false,
            (Some(sandbox), _) => {
                return Err(ShimError::NoSandbox {
                    id: req.id.clone(),
                    sandbox: sandbox.to_owned(),
                })
            }
            (None, Some(vm)) => {
                return Err(ShimError::OwnedAlready {
                    id: req.id.clone(),
                    owner: vm.owner.clone(),
                })
            }
        };
        log::info!(
            "create {}: {}",
            req.id,
            match oci.sandbox() {
                Some(sandbox) => format!("a container of sandbox {sandbox}, added to its VM"),
                None => "boots a VM of its own".to_owned(),
            }
        );
        let rootfs = oci.root_dir(&bundle);
        let mounted = mount_rootfs(req, &rootfs)?;
        let undo_rootfs = |error: ShimError| {
            if mounted {
                let _ = mount::unmount_under(&rootfs);
            }
            error
        };
        if owns_vm {
            let pod_vm = prepare_vm(&self.namespace, &req.id, &process, oci.network_namespace())
                .map_err(undo_rootfs)?;
            pod.vm = Some(pod_vm);
        }
        let name = if owns_vm {
            CONTAINER.to_owned()
        } else {
            spec::pod_name(&self.namespace, &req.id)
        };
        let share = pod.vm.as_ref().map(PodVm::share).unwrap_or_default();
        // Writable even when `root.readonly` asks otherwise (CRI asks it of every
        // sandbox): cradle writes the container's /etc/hostname, hosts and resolv.conf
        // and its mount points into the root before the process starts, as runc does
        // before its read-only remount, which crib does not make yet (docs/SHIM.md).
        if oci.root_readonly() {
            log::info!("container {}: root.readonly is not enforced yet", req.id);
        }
        let shared_root = match share_root(&share, &name, &rootfs) {
            Ok(path) => path,
            Err(error) => {
                if owns_vm {
                    if let Some(mut vm) = pod.vm.take() {
                        vm.tear_down();
                    }
                }
                return Err(undo_rootfs(error));
            }
        };
        let pid = pod.vm_pid();
        pod.containers.insert(
            req.id.clone(),
            Container {
                id: req.id.clone(),
                name,
                owns_vm,
                bundle,
                rootfs,
                mounted,
                shared_root: Some(shared_root),
                process,
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                stdin_closed: Arc::new(AtomicBool::new(false)),
                execs: HashMap::new(),
                pid,
                phase: Phase::Created,
                exit: None,
            },
        );
        drop(pod);
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

    /// Start: the VM's owner boots it; another container is added to the running VM
    /// (cradle's `POST /crib/v1/containers`) and started there.
    fn start_container(&self, id: &str) -> Result<u32, ShimError> {
        let mut pod = self.shared.lock();
        let container = pod.get(id)?;
        if container.phase != Phase::Created {
            return Err(ShimError::State {
                id: id.to_owned(),
                state: "started already",
                fix: "create a new task to run it again",
            });
        }
        let (owns_vm, name) = (container.owns_vm, container.name.clone());
        let started = if owns_vm {
            self.boot(&mut pod)
        } else {
            Self::add_to_vm(&pod, container)
        };
        let Pod { containers, vm } = &mut *pod;
        let Some(container) = containers.get_mut(id) else {
            return Err(ShimError::UnknownTask {
                id: id.to_owned(),
                ours: String::new(),
            });
        };
        let docker = match started {
            Ok(docker) => docker,
            Err(error) => {
                // The task ends here, so containerd can delete it (it refuses a task that
                // is still "created").
                container.phase = Phase::Stopped;
                container.exit = Some((START_FAILED_STATUS, Timestamp::now()));
                self.shared.changed.notify_all();
                return Err(error);
            }
        };
        let pid = vm
            .as_ref()
            .and_then(|p| p.vm.as_ref())
            .map_or(container.pid, Vm::pid);
        container.pid = pid;
        container.phase = Phase::Running;
        let io = Io {
            stdin: container.stdin.clone(),
            stdout: container.stdout.clone(),
            stderr: container.stderr.clone(),
            stdin_closed: Arc::clone(&container.stdin_closed),
            tty: container.process.terminal,
        };
        let shared = Arc::clone(&self.shared);
        let task_id = id.to_owned();
        let console = vm.as_ref().map(|p| p.run_dir().join("console.log"));
        spawn("io-wait", move || {
            follow(&shared, &docker, &task_id, &name, pid, &io, console)
        })?;
        drop(pod);
        let mut event = TaskStart::new();
        event.container_id = id.to_owned();
        event.pid = pid;
        self.shared.publish(TASK_START_EVENT_TOPIC, Box::new(event));
        Ok(pid)
    }

    /// Boots the VM (`crib pod run`, in the sandbox's network namespace if it has one).
    fn boot(&self, pod: &mut Pod) -> Result<DockerClient, ShimError> {
        let pod_vm = pod.vm.as_mut().ok_or_else(|| ShimError::State {
            id: self.id.clone(),
            state: "without a VM",
            fix: "create the task again",
        })?;
        let log = pod_vm.state.join("crib.log");
        let vm = Vm::launch(
            &vm::crib_binary(),
            &pod_vm.launch,
            pod_vm.netns.as_deref(),
            &pod_vm.run_dir(),
            &log,
            BOOT_TIMEOUT,
        )?;
        let _ = std::fs::write(pod_vm.state.join("crib.pid"), vm.pid().to_string());
        let docker = vm.docker();
        pod_vm.vm = Some(vm);
        Ok(docker)
    }

    /// Adds `container` to the running VM and starts it.
    fn add_to_vm(pod: &Pod, container: &Container) -> Result<DockerClient, ShimError> {
        let docker = pod.vm_docker().ok_or_else(|| ShimError::SandboxDown {
            id: container.id.clone(),
        })?;
        let body = spec::pod_process(&container.name, &container.process);
        match docker.call_json("POST", "/crib/v1/containers", &body) {
            Ok(_) => {}
            // A shim restarted by containerd after a Start that got this far.
            Err(DockerError::Status { status: 409, .. }) => {}
            Err(error) => return Err(error.into()),
        }
        docker.call("POST", &format!("/containers/{}/start", container.name))?;
        Ok(docker)
    }

    fn kill_container(&self, req: &api::KillRequest) -> Result<(), ShimError> {
        let mut pod = self.shared.lock();
        let docker = pod.vm_docker();
        let container = pod.get_mut(&req.id)?;
        if !req.exec_id.is_empty() {
            return self.kill_exec(docker, container, &req.exec_id, req.signal);
        }
        match (container.phase, docker) {
            (Phase::Running, Some(docker)) => {
                let path = format!("/containers/{}/kill?signal={}", container.name, req.signal);
                match docker.call("POST", &path) {
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
        log::info!("delete {id}");
        let mut pod = self.shared.lock();
        if pod.get(id)?.phase == Phase::Running {
            return Err(ShimError::State {
                id: id.to_owned(),
                state: "running",
                fix: "kill it first (ctr task kill)",
            });
        }
        let docker = pod.vm_docker();
        let Some(mut container) = pod.containers.remove(id) else {
            return Err(pod.unknown(id));
        };
        if container.owns_vm {
            // The VM ends with its owner; containers still in it end with it.
            for other in pod.containers.values_mut() {
                other.vm_ended();
                other.shared_root = None;
            }
            container.unmount_roots();
            if let Some(mut pod_vm) = pod.vm.take() {
                pod_vm.tear_down();
            }
        } else {
            if let Some(docker) = docker {
                let path = format!("/containers/{}?force=1", container.name);
                match docker.send("DELETE", &path) {
                    Ok(answer) if answer.status < 300 || answer.status == 404 => {}
                    Ok(answer) => log::warn!(
                        "container {id}: the pod's Docker API answered {} to its removal",
                        answer.status
                    ),
                    Err(error) => {
                        log::warn!("container {id}: cannot remove it from the VM: {error}")
                    }
                }
            }
            container.unmount_roots();
        }
        let mut response = api::DeleteResponse::new();
        response.pid = container.pid;
        if let Some((status, at)) = &container.exit {
            response.exit_status = *status;
            response.exited_at = MessageField::some(at.clone());
        }
        // Wake waiters: the task is gone.
        self.shared.changed.notify_all();
        drop(pod);
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
        let mut pod = self.shared.lock();
        pod.running_docker(&req.id)?;
        let container = pod.get_mut(&req.id)?;
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
        let pid = container.pid;
        container.execs.insert(
            req.exec_id.clone(),
            ExecProc {
                process,
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                stdin_closed: Arc::new(AtomicBool::new(false)),
                phase: Phase::Created,
                pid,
                exit: None,
                docker_id: None,
                size,
            },
        );
        drop(pod);
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
        let mut pod = self.shared.lock();
        let docker = pod.running_docker(id)?;
        let container = pod.get_mut(id)?;
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
        let path = format!("/containers/{}/exec", container.name);
        let answer = docker.call_json("POST", &path, &create)?;
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
            tty,
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
        drop(pod);
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
        docker: Option<DockerClient>,
        container: &mut Container,
        exec_id: &str,
        signal: u32,
    ) -> Result<(), ShimError> {
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
        let mut pod = self.shared.lock();
        let container = pod.get_mut(id)?;
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
        let pod = self.shared.lock();
        let container = pod.get(&req.id)?;
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
        let mut pod = self.shared.lock();
        let docker = pod.vm_docker();
        let container = pod.get_mut(&req.id)?;
        let size = [
            u16::try_from(req.height).unwrap_or(u16::MAX),
            u16::try_from(req.width).unwrap_or(u16::MAX),
        ];
        if req.exec_id.is_empty() {
            // Without a TTY there is nothing to resize, as runc's shim does for a
            // process without a console.
            if !container.process.terminal || size.contains(&0) {
                return Ok(());
            }
            if container.phase == Phase::Created {
                // Before the start: the size the terminal starts with.
                container.process.console_size = Some(size);
                if container.owns_vm {
                    if let Some(pod_vm) = pod.vm.as_ref() {
                        set_launch_console_size(&pod_vm.launch, size)?;
                    }
                }
                return Ok(());
            }
            if let (Phase::Running, Some(docker)) = (container.phase, docker) {
                let path = format!(
                    "/containers/{}/resize?h={}&w={}",
                    container.name, size[0], size[1]
                );
                match docker.call("POST", &path) {
                    // It has just exited: nothing left to resize.
                    Ok(_) | Err(DockerError::Status { status: 409, .. }) => {}
                    Err(error) => return Err(error.into()),
                }
            }
            return Ok(());
        }
        let exec = container.exec_mut(&req.exec_id)?;
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

/// Sets the size the VM's process's terminal starts with in the launch file `launch`
/// (written at Create, read at Start).
fn set_launch_console_size(launch: &Path, size: [u16; 2]) -> Result<(), ShimError> {
    let write_error = |source| ShimError::Write {
        path: launch.to_path_buf(),
        source,
    };
    let bytes = std::fs::read(launch).map_err(write_error)?;
    let mut json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| write_error(e.into()))?;
    if let Some(process) = json.pointer_mut("/pod/processes/0") {
        process["console_size"] = serde_json::json!(size);
    }
    let bytes = serde_json::to_vec_pretty(&json).map_err(|e| write_error(e.into()))?;
    std::fs::write(launch, bytes).map_err(write_error)
}

/// A process's FIFOs and its CloseIO flag.
struct Io {
    stdin: String,
    stdout: String,
    stderr: String,
    stdin_closed: Arc<AtomicBool>,
    /// A TTY's output is one raw stream (no multiplexed frames), all to stdout.
    tty: bool,
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
        let mut pod = shared.lock();
        if let Some(exec) = pod
            .containers
            .get_mut(id)
            .and_then(|c| c.execs.get_mut(exec_id))
        {
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
fn follow(
    shared: &Shared,
    docker: &DockerClient,
    id: &str,
    name: &str,
    pid: u32,
    io: &Io,
    console: Option<PathBuf>,
) {
    let status = match stream_and_wait(docker, name, io) {
        Ok(code) => u32::try_from(code).unwrap_or(255),
        Err(error) => {
            log::error!("container {id}: {error}");
            255
        }
    };
    log::info!("container {id} ({name} in the VM) exited with status {status}");
    if let (true, Some(console)) = (status != 0, console) {
        // What cradle said about it (a process that could not start says why there).
        log::warn!(
            "container {id} failed; the guest's console ends with:\n{}",
            vm::log_tail(&console)
        );
    }
    shared.exited(id, pid, status);
}

/// Waits until the container `name` has left "created" in the guest, feeds its stdin
/// (an attach), streams its logs from the start into the FIFOs until it has exited and
/// its output is drained, then returns its exit code.
fn stream_and_wait(docker: &DockerClient, name: &str, io: &Io) -> Result<i64, ShimError> {
    // Before the process runs, a follow would end at once: wait for it to start (or end).
    let start = Instant::now();
    loop {
        let body = docker.call("GET", &format!("/containers/{name}/json"))?;
        let value: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let state = value["State"]["Status"].as_str().unwrap_or("created");
        if state != "created" || start.elapsed() > RUN_TIMEOUT {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !io.stdin.is_empty() {
        // cradle's own closeStdin: the process's stdin closes when this input ends.
        let path = format!("/containers/{name}/attach?stream=1&stdin=1&closeStdin=1");
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
        &format!("/containers/{name}/logs?follow=1&stdout=1&stderr=1"),
    )?;
    if response.status == 200 {
        stdio::copy_output(response.body, io.tty, &io.stdout, &io.stderr);
    }
    let body = docker.call("POST", &format!("/containers/{name}/wait"))?;
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
        let pod = self.shared.lock();
        let c = pod.get(&req.id)?;
        let mut response = api::StateResponse::new();
        response.bundle = c.bundle.display().to_string();
        if req.exec_id.is_empty() {
            response.id = c.id.clone();
            response.pid = c.pid;
            response.status = EnumOrUnknown::new(c.status());
            response.stdin = c.stdin.clone();
            response.stdout = c.stdout.clone();
            response.stderr = c.stderr.clone();
            let (status, at) = now_or(&c.exit);
            response.exit_status = status;
            response.exited_at = at;
        } else {
            let exec = c.exec(&req.exec_id)?;
            response.id = req.exec_id.clone();
            response.exec_id = req.exec_id.clone();
            response.pid = exec.pid;
            response.status = EnumOrUnknown::new(status_of(exec.phase));
            response.stdin = exec.stdin.clone();
            response.stdout = exec.stdout.clone();
            response.stderr = exec.stderr.clone();
            response.terminal = exec.process.terminal;
            let (status, at) = now_or(&exec.exit);
            response.exit_status = status;
            response.exited_at = at;
        }
        Ok(response)
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let mut pod = self.shared.lock();
        let container = pod.get(&req.id)?;
        if !req.exec_id.is_empty() {
            container.exec(&req.exec_id)?;
        }
        loop {
            let container = pod.containers.get(&req.id);
            // Exited, or deleted while waiting.
            let exit = if req.exec_id.is_empty() {
                container.map(|c| c.exit.clone())
            } else {
                container
                    .and_then(|c| c.execs.get(&req.exec_id))
                    .map(|e| e.exit.clone())
            };
            if let Some(None) = exit {
                pod = self
                    .shared
                    .changed
                    .wait(pod)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let mut response = api::WaitResponse::new();
            let (status, at) = now_or(&exit.flatten());
            response.exit_status = status;
            response.exited_at = at;
            return Ok(response);
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
        let pod = self.shared.lock();
        let c = pod.get(&req.id)?;
        let mut response = api::PidsResponse::new();
        if c.phase == Phase::Running {
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
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let pod = self.shared.lock();
        let mut response = api::ConnectResponse::new();
        response.shim_pid = std::process::id();
        response.task_pid = pod.containers.get(&req.id).map_or(0, |c| c.pid);
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

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let (docker, name) = {
            let pod = self.shared.lock();
            let docker = pod.running_docker(&req.id)?;
            (docker, pod.get(&req.id)?.name.clone())
        };
        let body = docker
            .call("GET", &format!("/containers/{name}/stats?stream=false"))
            .map_err(ShimError::from)?;
        let value: serde_json::Value =
            serde_json::from_str(&body).map_err(|_| ShimError::Answer {
                id: req.id.clone(),
                what: "stats",
                field: "JSON",
            })?;
        let metrics = stats::metrics(&value);
        let any = stats::packed(&metrics).map_err(|_| ShimError::Answer {
            id: req.id.clone(),
            what: "stats",
            field: "metrics",
        })?;
        let mut response = api::StatsResponse::new();
        response.stats = MessageField::some(any);
        Ok(response)
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        // containerd calls it after every task's Delete: the shim ends with its last
        // container (as runc's shim), tearing down a VM still there.
        let mut pod = self.shared.lock();
        if !pod.containers.is_empty() {
            return Ok(api::Empty::new());
        }
        if let Some(mut pod_vm) = pod.vm.take() {
            pod_vm.tear_down();
        }
        drop(pod);
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
