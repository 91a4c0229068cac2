//! The pod's registry: its containers (one per process of the spec, plus those added
//! while it runs with `POST /crib/v1/containers`, see [`super::containers`]) and exec
//! sessions, looked up by id, id prefix or name, and the pod's lifecycle:
//! [`Registry::wait_for_end`] blocks the main thread until the processes have all exited
//! or the shutdown call came, and [`Registry::stop_all`] stops everything at the end.
//!
//! The set of containers changes at run time ([`Registry::create`],
//! [`Registry::remove`]): it is a list of `Arc`s under a lock, and every reader takes a
//! snapshot (or one lookup) and lets the lock go before it touches a container. Lock
//! order: the lifecycle's state, then the list, then a container's state; the list's lock
//! is never held while the lifecycle is notified.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use initramfs::podspec::{PodLifetime, PodSpec, ProcessSpec};

use super::containers::{Container, LOG_CAP_BYTES};
use super::errors::VdockerError;
use super::exec::ExecTable;
use crate::console::{self, say};
use crate::containers::cgroup;
use crate::reaper::Reaper;

/// After SIGKILL, how long stop_all waits for the processes to go.
const KILL_WAIT_MS: u64 = 1000;

/// How a registry treats its containers' output.
#[derive(Debug, Clone, Copy)]
pub struct RegistryOptions {
    /// Copy each output line to cradle's stdout/stderr (the console).
    pub echo: bool,
    /// Log store cap per container.
    pub log_cap_bytes: usize,
    /// Give every container a cgroup of its own under /sys/fs/cgroup (the guest; never
    /// in unit tests, which must not touch the host's cgroups).
    pub cgroups: bool,
}

impl RegistryOptions {
    /// What cradle uses in the guest.
    pub fn guest() -> Self {
        Self {
            echo: true,
            log_cap_bytes: LOG_CAP_BYTES,
            cgroups: true,
        }
    }
}

/// Why the pod ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodEnd {
    /// Every process has exited (lifetime `processes`).
    AllExited,
    /// `POST /crib/v1/shutdown`; stop the processes with this grace.
    Shutdown(Duration),
}

/// The pod's containers and exec sessions. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<RegistryInner>,
}

struct RegistryInner {
    /// The pod's spec as it booted: what an added container is validated against.
    pod: Arc<PodSpec>,
    containers: Mutex<Vec<Arc<Container>>>,
    /// Held across a create or a remove: a name is checked and taken in one step.
    changing: Mutex<()>,
    options: RegistryOptions,
    /// The init processes are running: the others have not started yet.
    starting: AtomicBool,
    execs: ExecTable,
    lifecycle: Arc<Lifecycle>,
    reaper: Reaper,
}

/// Wakes the main thread when a process ends or shutdown is asked for.
#[derive(Default)]
pub struct Lifecycle {
    state: Mutex<LifecycleState>,
    changed: Condvar,
}

#[derive(Debug, Default, Clone, Copy)]
struct LifecycleState {
    /// The grace of the first shutdown request.
    shutdown: Option<Duration>,
    /// The API could not start: nothing can ask for a shutdown.
    api_down: bool,
}

impl Lifecycle {
    /// Something ended: re-check.
    pub fn notify(&self) {
        // Taking the lock orders this after a waiter's check.
        let _shutdown = self.lock();
        self.changed.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, LifecycleState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Blocks until `done` (called with the state) is true, or `deadline`
    /// passes (then false).
    fn wait_until(
        &self,
        deadline: Option<Instant>,
        mut done: impl FnMut(LifecycleState) -> bool,
    ) -> bool {
        let mut state = self.lock();
        loop {
            if done(*state) {
                return true;
            }
            state = match deadline {
                None => self
                    .changed
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    self.changed
                        .wait_timeout(state, left)
                        .map(|(guard, _)| guard)
                        .unwrap_or_else(|poisoned| poisoned.into_inner().0)
                }
            };
        }
    }
}

impl Registry {
    /// A container per process; none is started yet. A pod with nothing but these
    /// processes (no volumes or filesystems): for tests.
    #[cfg(test)]
    pub fn new(specs: &[ProcessSpec], reaper: Reaper, options: RegistryOptions) -> Self {
        let pod = PodSpec {
            name: "pod".to_owned(),
            volumes: Vec::new(),
            filesystems: Vec::new(),
            processes: specs.to_vec(),
            lifetime: PodLifetime::default(),
            resolved: Default::default(),
            network: None,
        };
        Self::for_pod(pod, reaper, options)
    }

    /// A container per process of `pod`; none is started yet.
    pub fn for_pod(pod: PodSpec, reaper: Reaper, options: RegistryOptions) -> Self {
        let lifecycle = Arc::new(Lifecycle::default());
        let containers = pod
            .processes
            .iter()
            .map(|spec| {
                Arc::new(Container::new(
                    spec.clone(),
                    options,
                    reaper.clone(),
                    Arc::clone(&lifecycle),
                    container_cgroup(spec, options),
                ))
            })
            .collect();
        Self {
            inner: Arc::new(RegistryInner {
                pod: Arc::new(pod),
                containers: Mutex::new(containers),
                changing: Mutex::new(()),
                options,
                starting: AtomicBool::new(false),
                execs: ExecTable::default(),
                lifecycle,
                reaper,
            }),
        }
    }

    fn list(&self) -> MutexGuard<'_, Vec<Arc<Container>>> {
        self.inner
            .containers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The index an added container gets in error messages (`processes[N]`).
    pub fn next_index(&self) -> usize {
        self.list().len()
    }

    /// Adds a container for `process` (cradle's `POST /crib/v1/containers`), not started:
    /// validated as at boot against the pod's spec; a name in use is a conflict; an
    /// image process is refused (its layers are resolved by the host before boot).
    pub fn create(&self, process: ProcessSpec) -> Result<Arc<Container>, VdockerError> {
        let _changing = self
            .inner
            .changing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let index = self.next_index();
        if process.image.is_some() {
            return Err(VdockerError::ImageProcess {
                field: format!("processes[{index}].image"),
            });
        }
        self.inner
            .pod
            .validate_process(index, &process)
            .map_err(|source| VdockerError::InvalidProcess { source })?;
        if let Ok(existing) = self.find_name(&process.name) {
            return Err(VdockerError::NameInUse {
                name: process.name.clone(),
                id: existing.id.clone(),
            });
        }
        let cgroup = if process.rootfs.is_some() {
            let containers = crate::containers::get().ok_or(VdockerError::NoContainerSupport)?;
            containers
                .create(index, &process, &self.inner.pod)
                .map_err(|source| VdockerError::CreateContainer {
                    name: process.name.clone(),
                    source,
                })?;
            containers.plan(&process.name).and_then(|plan| plan.cgroup)
        } else {
            container_cgroup(&process, self.inner.options)
        };
        let container = Arc::new(Container::new(
            process,
            self.inner.options,
            self.inner.reaper.clone(),
            Arc::clone(&self.inner.lifecycle),
            cgroup,
        ));
        self.list().push(Arc::clone(&container));
        Ok(container)
    }

    /// Removes `container`, which must not be running (Docker's `docker rm`; the caller
    /// kills it first for `force`): out of the list, its exec sessions killed and
    /// forgotten, its cgroup and what `Containers::create` made removed. Blocking (it
    /// waits for the cgroup to empty): not on the API's thread.
    pub fn remove(&self, container: &Arc<Container>) -> Result<(), VdockerError> {
        let _changing = self
            .inner
            .changing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        container.mark_removed()?;
        self.list().retain(|c| !Arc::ptr_eq(c, container));
        self.inner.execs.forget(container);
        let has_plan =
            crate::containers::get().is_some_and(|all| all.plan(&container.name).is_some());
        if has_plan {
            if let Some(all) = crate::containers::get() {
                all.remove(&container.name);
            }
        } else if let Some(dir) = &container.cgroup {
            if let Err(error) = cgroup::remove(dir) {
                say!(
                    "warning: container {}: cannot remove its cgroup {}: {error}",
                    container.name,
                    dir.display()
                );
            }
        }
        self.inner.lifecycle.notify();
        Ok(())
    }

    /// Starts every container; one that cannot start is a warning. With init processes
    /// (`init` in the spec), a thread runs them one after the other, each to a zero exit
    /// (restarts included), then starts the others; an init process that fails, or a
    /// shutdown meanwhile, starts nothing more (the pod then ends as its lifetime says).
    pub fn start_all(&self) {
        let (init, rest): (Vec<_>, Vec<_>) =
            self.containers().into_iter().partition(|c| c.spec.init);
        if init.is_empty() {
            for container in &rest {
                // Only "already running" can fail here, which none is.
                let _ = container.start();
            }
            return;
        }
        self.inner.starting.store(true, Ordering::SeqCst);
        let registry = self.clone();
        let spawned = std::thread::Builder::new()
            .name("init-procs".into())
            .spawn(move || {
                if registry.run_init(&init) {
                    for container in &rest {
                        let _ = container.start();
                    }
                }
                registry.inner.starting.store(false, Ordering::SeqCst);
                registry.inner.lifecycle.notify();
            });
        if spawned.is_err() {
            say!("error: cannot start the init processes' thread");
            self.inner.starting.store(false, Ordering::SeqCst);
        }
    }

    /// Runs the init processes in order; true if each ended with 0.
    fn run_init(&self, init: &[Arc<Container>]) -> bool {
        for container in init {
            let _ = container.start();
            let mut shutdown = false;
            self.inner.lifecycle.wait_until(None, |state| {
                shutdown = state.shutdown.is_some();
                shutdown || !container.is_active()
            });
            if shutdown {
                return false;
            }
            let code = container.snapshot().map_or(-1, |run| run.exit_code());
            if code != 0 {
                say!(
                    "init process {} failed (exit code {code}); the pod's other processes are not started",
                    container.name
                );
                return false;
            }
        }
        true
    }

    /// The containers now, in the order they were made.
    pub fn containers(&self) -> Vec<Arc<Container>> {
        self.list().clone()
    }

    pub fn execs(&self) -> &ExecTable {
        &self.inner.execs
    }

    pub fn reaper(&self) -> &Reaper {
        &self.inner.reaper
    }

    pub fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.inner.lifecycle
    }

    /// The container `key` names: its id, its name (with or without `/`),
    /// or a prefix of exactly one id.
    pub fn find(&self, key: &str) -> Result<Arc<Container>, VdockerError> {
        let list = self.list();
        let entries = list.iter().map(|c| (c.id.as_str(), c.name.as_str()));
        match lookup(entries, key) {
            Lookup::Found(index) => list
                .get(index)
                .cloned()
                .ok_or_else(|| VdockerError::NoSuchContainer(key.to_owned())),
            Lookup::Missing => Err(VdockerError::NoSuchContainer(key.to_owned())),
            Lookup::Ambiguous => Err(VdockerError::AmbiguousContainer(key.to_owned())),
        }
    }

    /// The container named exactly `name`.
    fn find_name(&self, name: &str) -> Result<Arc<Container>, VdockerError> {
        self.list()
            .iter()
            .find(|c| c.name == name)
            .cloned()
            .ok_or_else(|| VdockerError::NoSuchContainer(name.to_owned()))
    }

    /// Asks the main thread to end the pod; the first request's grace wins.
    pub fn request_shutdown(&self, grace: Duration) {
        let mut state = self.inner.lifecycle.lock();
        state.shutdown.get_or_insert(grace);
        self.inner.lifecycle.changed.notify_all();
    }

    /// The grace of a shutdown request, if there was one.
    pub fn shutdown_requested(&self) -> Option<Duration> {
        self.inner.lifecycle.lock().shutdown
    }

    /// Notes that the Docker API cannot be served (no vsock device): then
    /// nothing can send the shutdown call, and a pod whose lifetime is
    /// `until-shutdown` ends with its processes instead of never.
    pub fn api_unavailable(&self) {
        self.inner.lifecycle.lock().api_down = true;
        self.inner.lifecycle.changed.notify_all();
    }

    /// Blocks until the pod ends: on a shutdown request, or (lifetime
    /// `processes`, or no API) once no container is running.
    pub fn wait_for_end(&self, lifetime: PodLifetime) -> PodEnd {
        let mut end = PodEnd::AllExited;
        self.inner.lifecycle.wait_until(None, |state| {
            if let Some(grace) = state.shutdown {
                end = PodEnd::Shutdown(grace);
                return true;
            }
            (lifetime == PodLifetime::Processes || state.api_down)
                && !self.inner.starting.load(Ordering::SeqCst)
                && !self.any_container_running()
        });
        end
    }

    fn any_container_running(&self) -> bool {
        self.list().iter().any(|c| c.is_active())
    }

    fn anything_running(&self) -> bool {
        self.any_container_running() || self.inner.execs.any_running()
    }

    /// Stops every container and exec session: SIGTERM to their process
    /// groups, up to `grace` for them to exit, then SIGKILL. Blocking; for
    /// the main thread at shutdown.
    pub fn stop_all(&self, grace: Duration) {
        if !self.anything_running() {
            return;
        }
        self.signal_all(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        if self
            .inner
            .lifecycle
            .wait_until(Some(deadline), |_| !self.anything_running())
        {
            return;
        }
        self.signal_all(libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_millis(KILL_WAIT_MS);
        self.inner
            .lifecycle
            .wait_until(Some(deadline), |_| !self.anything_running());
    }

    fn signal_all(&self, signal: i32) {
        for container in self.containers() {
            let _ = container.signal_group(signal);
        }
        self.inner.execs.signal_all(signal);
    }
}

/// The cgroup of the container of `spec`: its container plan's (image and rootfs
/// processes, made by `Containers::create`), else one of its own when `options` say so.
/// One that cannot be made is a warning: the process runs, without stats.
fn container_cgroup(spec: &ProcessSpec, options: RegistryOptions) -> Option<PathBuf> {
    if let Some(plan) = crate::containers::get().and_then(|all| all.plan(&spec.name)) {
        return plan.cgroup;
    }
    if !options.cgroups {
        return None;
    }
    match cgroup::create(&spec.name, None, None) {
        Ok(dir) => Some(dir),
        Err(error) => {
            console::log_warning(&error);
            None
        }
    }
}

/// Result of looking a key up among (id, name) pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Found(usize),
    Missing,
    Ambiguous,
}

/// Docker's order: exact id, then exact name (a leading `/` allowed), then
/// an id prefix matching exactly one.
pub fn lookup<'a>(entries: impl Iterator<Item = (&'a str, &'a str)> + Clone, key: &str) -> Lookup {
    if key.is_empty() {
        return Lookup::Missing;
    }
    if let Some(index) = entries.clone().position(|(id, _)| id == key) {
        return Lookup::Found(index);
    }
    let name = key.strip_prefix('/').unwrap_or(key);
    if let Some(index) = entries.clone().position(|(_, n)| n == name) {
        return Lookup::Found(index);
    }
    let mut matches = entries
        .enumerate()
        .filter(|(_, (id, _))| id.starts_with(key))
        .map(|(index, _)| index);
    match (matches.next(), matches.next()) {
        (Some(index), None) => Lookup::Found(index),
        (Some(_), Some(_)) => Lookup::Ambiguous,
        (None, _) => Lookup::Missing,
    }
}

/// A container's id: 64 hex digits that depend only on `name`, so they
/// are the same at every boot.
pub fn container_id(name: &str) -> String {
    (0..4u64)
        .map(|round| format!("{:016x}", hash64(round, name.as_bytes())))
        .collect()
}

/// FNV-1a seeded per round, then splitmix64's finalizer.
fn hash64(seed: u64, bytes: &[u8]) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = FNV_OFFSET ^ mix64(seed);
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    mix64(hash)
}

/// splitmix64's output function: spreads every input bit over the output.
pub fn mix64(value: u64) -> u64 {
    let mut z = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
pub mod testing {
    //! Registries of real processes for tests.

    use super::*;
    use crate::reaper::ReapMode;

    pub fn spec(name: &str, script: &str) -> ProcessSpec {
        ProcessSpec {
            name: name.to_owned(),
            argv: vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()],
            env: Vec::new(),
            cwd: None,
            ..ProcessSpec::default()
        }
    }

    pub fn registry(specs: &[ProcessSpec]) -> Registry {
        let options = RegistryOptions {
            echo: false,
            log_cap_bytes: LOG_CAP_BYTES,
            cgroups: false,
        };
        Registry::new(specs, Reaper::new(ReapMode::Own), options)
    }

    pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(future)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{registry, spec};
    use super::*;

    const IDS: [(&str, &str); 3] = [("abc111", "web"), ("abc222", "db"), ("def333", "abc222x")];

    fn find(key: &str) -> Lookup {
        lookup(IDS.iter().copied(), key)
    }

    #[test]
    fn lookup_exact_id_wins() {
        assert_eq!(find("abc222"), Lookup::Found(1));
    }

    #[test]
    fn lookup_name_with_or_without_slash() {
        assert_eq!(find("db"), Lookup::Found(1));
        assert_eq!(find("/web"), Lookup::Found(0));
    }

    #[test]
    fn lookup_unique_prefix_finds_it() {
        assert_eq!(find("de"), Lookup::Found(2));
    }

    #[test]
    fn lookup_shared_prefix_is_ambiguous() {
        assert_eq!(find("abc"), Lookup::Ambiguous);
    }

    #[test]
    fn lookup_unknown_and_empty_are_missing() {
        assert_eq!(find("zzz"), Lookup::Missing);
        assert_eq!(find(""), Lookup::Missing);
    }

    #[test]
    fn container_id_is_64_hex_and_stable() {
        let id = container_id("web");

        assert_eq!(id.len(), 64);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(id, container_id("web"));
        assert_ne!(id, container_id("db"));
    }

    #[test]
    fn create_adds_a_container_that_is_not_started() {
        let registry = registry(&[spec("a", "exit 0")]);

        let added = registry.create(spec("b", "exit 0")).unwrap();

        assert_eq!(registry.containers().len(), 2);
        assert!(Arc::ptr_eq(&registry.find("b").unwrap(), &added));
        assert!(added.snapshot().is_none());
    }

    #[test]
    fn create_with_a_name_in_use_is_409() {
        let registry = registry(&[spec("a", "exit 0")]);

        let error = registry.create(spec("a", "exit 1")).err().unwrap();

        assert_eq!(error.status(), hyper::StatusCode::CONFLICT);
        assert!(
            error.to_string().contains("\"/a\" is already in use"),
            "{error}"
        );
    }

    #[test]
    fn create_of_an_invalid_process_is_400_naming_the_field() {
        let registry = registry(&[spec("a", "exit 0")]);
        let bad = ProcessSpec {
            cwd: Some("relative".into()),
            ..spec("b", "exit 0")
        };

        let error = registry.create(bad).err().unwrap();

        assert_eq!(error.status(), hyper::StatusCode::BAD_REQUEST);
        assert!(
            console::error_chain(&error).contains("processes[1].cwd"),
            "{}",
            console::error_chain(&error)
        );
    }

    #[test]
    fn create_of_an_image_process_is_refused() {
        let registry = registry(&[]);
        let image = ProcessSpec {
            image: Some("busybox".into()),
            ..spec("b", "exit 0")
        };

        let error = registry.create(image).err().unwrap();

        assert_eq!(error.status(), hyper::StatusCode::BAD_REQUEST);
        assert!(error.to_string().contains("processes[0].image"), "{error}");
    }

    #[test]
    fn create_of_a_rootfs_on_an_unknown_filesystem_is_400() {
        let registry = registry(&[]);
        let rootfs = ProcessSpec {
            rootfs: Some("share/c1".into()),
            ..spec("c1", "exit 0")
        };

        let error = registry.create(rootfs).err().unwrap();

        assert_eq!(error.status(), hyper::StatusCode::BAD_REQUEST);
        assert!(
            console::error_chain(&error).contains("processes[0].rootfs"),
            "{}",
            console::error_chain(&error)
        );
    }

    #[test]
    fn remove_of_a_running_container_is_refused_then_works_once_it_exited() {
        let registry = registry(&[spec("a", "exec sleep 30")]);
        registry.start_all();
        let container = registry.find("a").unwrap();

        let error = registry.remove(&container).unwrap_err();
        assert_eq!(error.status(), hyper::StatusCode::CONFLICT);
        assert!(error
            .to_string()
            .starts_with("You cannot remove a running container "));

        container.signal_group(libc::SIGKILL).unwrap();
        testing::block_on(container.wait_not_running());
        registry.remove(&container).unwrap();

        assert!(registry.find("a").is_err());
        assert!(registry.containers().is_empty());
        assert!(matches!(
            container.start(),
            Err(VdockerError::NoSuchContainer(_))
        ));
    }

    #[test]
    fn a_removed_name_can_be_created_again() {
        let registry = registry(&[spec("a", "exit 0")]);
        let first = registry.find("a").unwrap();
        registry.remove(&first).unwrap();

        let again = registry.create(spec("a", "exit 3")).unwrap();
        again.start().unwrap();

        assert_eq!(testing::block_on(again.wait_not_running()), 3);
        assert!(!Arc::ptr_eq(&first, &again));
    }

    #[test]
    fn wait_for_end_counts_an_added_container() {
        let registry = registry(&[spec("a", "exit 0")]);
        registry.start_all();
        let added = registry.create(spec("late", "sleep 0.3")).unwrap();
        added.start().unwrap();

        assert_eq!(
            registry.wait_for_end(PodLifetime::Processes),
            PodEnd::AllExited
        );

        assert!(added.snapshot().is_some_and(|run| !run.is_running()));
    }

    #[test]
    fn stop_all_stops_an_added_container() {
        let registry = registry(&[]);
        let added = registry
            .create(spec("late", "trap '' TERM; sleep 30"))
            .unwrap();
        added.start().unwrap();

        registry.stop_all(Duration::from_millis(200));

        assert!(added.running_run().is_none());
    }

    #[test]
    fn wait_for_end_with_lifetime_processes_returns_when_all_exited() {
        let registry = registry(&[spec("a", "exit 0"), spec("b", "exit 1")]);
        registry.start_all();

        assert_eq!(
            registry.wait_for_end(PodLifetime::Processes),
            PodEnd::AllExited
        );
    }

    #[test]
    fn wait_for_end_until_shutdown_returns_on_the_request() {
        let registry = registry(&[]);
        registry.request_shutdown(Duration::from_secs(3));

        assert_eq!(
            registry.wait_for_end(PodLifetime::UntilShutdown),
            PodEnd::Shutdown(Duration::from_secs(3))
        );
    }

    #[test]
    fn wait_for_end_until_shutdown_without_api_ends_with_the_processes() {
        let registry = registry(&[spec("a", "exit 0")]);
        registry.start_all();

        registry.api_unavailable();

        assert_eq!(
            registry.wait_for_end(PodLifetime::UntilShutdown),
            PodEnd::AllExited
        );
    }

    #[test]
    fn stop_all_kills_a_process_that_ignores_sigterm() {
        let registry = registry(&[spec("stubborn", "trap '' TERM; sleep 30")]);
        registry.start_all();
        let container = registry.find("stubborn").unwrap();

        registry.stop_all(Duration::from_millis(200));

        assert!(container.running_run().is_none());
    }

    #[test]
    fn on_failure_restarts_up_to_its_limit_and_the_pod_waits_for_them() {
        let failing = ProcessSpec {
            restart: initramfs::containers::RestartPolicy::OnFailure { max: Some(2) },
            restart_delay_ms: Some(1),
            ..spec("flaky", "exit 3")
        };
        let registry = registry(&[failing]);
        registry.start_all();

        assert_eq!(
            registry.wait_for_end(PodLifetime::Processes),
            PodEnd::AllExited
        );
        let container = &registry.containers()[0];
        assert_eq!(container.restarts(), (2, false));
        let run = container.snapshot().unwrap();
        assert_eq!((run.number, run.exit_code()), (3, 3));
    }

    #[test]
    fn init_processes_run_first_and_a_failing_one_starts_nothing_more() {
        let dir = crate::testing::TempDir::new("init-order");
        let flag = dir.path().join("flag");
        let init = ProcessSpec {
            init: true,
            ..spec("prepare", &format!("echo ok > {}", flag.display()))
        };
        let main = spec("main", &format!("test -f {}", flag.display()));
        let registry = registry(&[main.clone(), init]);
        registry.start_all();
        assert_eq!(
            registry.wait_for_end(PodLifetime::Processes),
            PodEnd::AllExited
        );
        assert_eq!(registry.containers()[0].snapshot().unwrap().exit_code(), 0);

        let failing = ProcessSpec {
            init: true,
            ..spec("broken", "exit 1")
        };
        let registry = super::testing::registry(&[failing, main]);
        registry.start_all();
        assert_eq!(
            registry.wait_for_end(PodLifetime::Processes),
            PodEnd::AllExited
        );
        assert!(registry.containers()[1].snapshot().is_none());
    }
}
