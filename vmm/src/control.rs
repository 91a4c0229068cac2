//! The VM's life cycle as the host daemon drives it: the state (running, paused,
//! shutting down), pause/resume of the vCPUs, graceful shutdown (asking cradle to power
//! off, forced stop after a time-out), forced stop, SIGTERM/SIGINT, live disk rate limits,
//! and the read-only views the API serves (info, metrics).
//!
//! Two halves:
//! - [`VmmControl`], the API's [`VmmHandle`]: reads shared atomics for `GET`s, and sends
//!   every change to the event loop as a message on a channel plus an eventfd write, then
//!   waits (bounded) for the reply. It runs on the API's threads only.
//! - [`Controller`], an event-manager subscriber on the VMM thread: it owns the vCPU
//!   threads' pause control, the shutdown timer and the request channel, and decides the
//!   [`RunOutcome`]. Nothing here runs on a vCPU or I/O thread.
//!
//! Graceful shutdown: with a vsock device, a short-lived `guest-shutdown` thread sends
//! cradle's `POST /crib/v1/shutdown?t=GRACE` (vdocker, guest vsock port 1) through the
//! vsock host socket; cradle stops the pod's processes (SIGTERM, SIGKILL after GRACE),
//! unmounts and powers off, and crib exits 0. Without a vsock device, or when cradle does
//! not take the call (a guest that is not a pod), crib presses the ACPI power button (the
//! GED, devices/src/legacy/ged.rs): systemd-logind or acpid powers the guest off. If the
//! guest has not powered off when the timeout passes, crib stops it (exit code 6); a VM
//! without a power button is stopped at once when cradle cannot be reached.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::legacy::boot_marker::BootTimes;
use devices::legacy::GedEvents;
use devices::virtio::block::BlockError;
use devices::virtio::net::NetMetrics;
use devices::virtio::vsock::VsockMetrics;
use devices::ExitReason;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::api::{ApiError, RateLimitBody, Reply, Request, VmmHandle, DEFAULT_SHUTDOWN_TIMEOUT};
use crate::block::{DiskHandle, DiskLimits};
use crate::config::VmConfig;
use crate::docker_proxy;
use crate::vcpu::{ExitCounters, VcpuPause};

/// How long the API waits for the event loop's reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long vCPUs get to stop on a pause.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a stop waits for the API to write its reply before crib exits anyway.
pub const REPLY_GRACE: Duration = Duration::from_secs(1);
/// How long cradle gets to answer the shutdown call.
const GUEST_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How the VM ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest ended itself.
    Guest(ExitReason),
    /// crib stopped it.
    Stopped(StopCause),
}

/// Why crib stopped the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopCause {
    /// `PUT /api/v1/vm/stop`, or a second SIGTERM/SIGINT.
    Requested,
    /// A graceful shutdown's timeout passed with the guest still running.
    ShutdownTimedOut,
    /// A graceful shutdown could not reach the guest (no vsock device, or cradle did not
    /// take the call).
    GuestUnreachable,
}

/// The VM's state as the API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum VmState {
    Running = 0,
    Paused = 1,
    ShuttingDown = 2,
}

impl VmState {
    fn from_u8(value: u8) -> Self {
        match value {
            1 => Self::Paused,
            2 => Self::ShuttingDown,
            _ => Self::Running,
        }
    }

    /// `running`, `paused` or `shutting-down`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::ShuttingDown => "shutting-down",
        }
    }
}

/// What the API reads without asking the event loop.
pub struct Shared {
    state: AtomicU8,
    config: Mutex<VmConfig>,
    boot_times: Arc<BootTimes>,
    start: Instant,
    exits: Arc<ExitCounters>,
    disks: Vec<DiskHandle>,
    vsock: Option<Arc<VsockMetrics>>,
    /// Each virtio-net device's counters, by its tap's name.
    nets: Vec<(String, Arc<NetMetrics>)>,
}

impl Shared {
    /// `start` is crib's process start (boot times and uptime count from it).
    pub fn new(
        config: VmConfig,
        start: Instant,
        boot_times: Arc<BootTimes>,
        exits: Arc<ExitCounters>,
        disks: Vec<DiskHandle>,
        vsock: Option<Arc<VsockMetrics>>,
        nets: Vec<(String, Arc<NetMetrics>)>,
    ) -> Self {
        Self {
            state: AtomicU8::new(VmState::Running as u8),
            config: Mutex::new(config),
            boot_times,
            start,
            exits,
            disks,
            vsock,
            nets,
        }
    }

    /// The current state.
    pub fn state(&self) -> VmState {
        VmState::from_u8(self.state.load(Ordering::SeqCst))
    }

    fn set_state(&self, state: VmState) {
        self.state.store(state as u8, Ordering::SeqCst);
    }

    fn config(&self) -> std::sync::MutexGuard<'_, VmConfig> {
        self.config.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `GET /api/v1/vm`.
    pub fn info(&self) -> Value {
        let us = |v: u64| (v > 0).then_some(v);
        let config = self.config().clone();
        let config_json = serde_json::to_value(&config).unwrap_or_else(
            |e| json!({ "error": format!("the configuration cannot be shown as JSON: {e}") }),
        );
        json!({
            "id": config.id,
            "state": self.state().as_str(),
            "config": config_json,
            "boot": {
                "init_us": us(self.boot_times.init_started_us.load(Ordering::SeqCst)),
                "ready_us": us(self.boot_times.ready_us.load(Ordering::SeqCst)),
            },
            "uptime_ms": u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// `GET /api/v1/metrics`.
    pub fn metrics(&self) -> Value {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let exits = &self.exits;
        let mut disks = serde_json::Map::new();
        for disk in &self.disks {
            let m = disk.metrics.snapshot();
            disks.insert(
                disk.id.clone(),
                json!({
                    "reads": m.reads,
                    "writes": m.writes,
                    "flushes": m.flushes,
                    "discards": m.discards,
                    "write_zeroes": m.write_zeroes,
                    "get_ids": m.get_ids,
                    "bytes_read": m.bytes_read,
                    "bytes_written": m.bytes_written,
                    "io_errors": m.io_errors,
                    "invalid_requests": m.invalid_requests,
                    "rate_limited": m.rate_limited,
                    "status_ok": m.status_ok,
                    "status_ioerr": m.status_ioerr,
                    "status_unsupp": m.status_unsupp,
                    "status_unwritten": m.status_unwritten,
                    "io_uring_queues": m.io_uring_queues,
                    "sync_queues": m.sync_queues,
                }),
            );
        }
        let vsock = self.vsock.as_ref().map(|v| {
            let m = v.snapshot();
            json!({
                "connections_opened": m.connections_opened,
                "connections_refused": m.connections_refused,
                "resets_sent": m.resets_sent,
                "resets_dropped": m.resets_dropped,
                "tx_packets": m.tx_packets,
                "rx_packets": m.rx_packets,
                "tx_bytes": m.tx_bytes,
                "rx_bytes": m.rx_bytes,
                "invalid_packets": m.invalid_packets,
                "invalid_rx_buffers": m.invalid_rx_buffers,
            })
        });
        let mut nets = serde_json::Map::new();
        for (tap, metrics) in &self.nets {
            let m = metrics.snapshot();
            nets.insert(
                tap.clone(),
                json!({
                    "tx_frames": m.tx_frames,
                    "tx_bytes": m.tx_bytes,
                    "tx_malformed": m.tx_malformed,
                    "tx_errors": m.tx_errors,
                    "rx_frames": m.rx_frames,
                    "rx_bytes": m.rx_bytes,
                    "rx_dropped": m.rx_dropped,
                    "rx_bad_buffers": m.rx_bad_buffers,
                    "rate_limited": m.rate_limited,
                }),
            );
        }
        json!({
            "vcpu_exits": {
                "io_in": get(&exits.io_in),
                "io_out": get(&exits.io_out),
                "mmio_read": get(&exits.mmio_read),
                "mmio_write": get(&exits.mmio_write),
                "other": get(&exits.other),
            },
            "disks": disks,
            "vsock": vsock,
            "nets": nets,
        })
    }
}

/// A message to the event loop.
enum Message {
    /// An API request and where its reply goes.
    Api(Request, SyncSender<Result<Reply, ApiError>>),
    /// The API wrote a `then_exit` reply.
    ReplySent,
    /// The guest-shutdown thread could not reach cradle.
    GuestUnreachable(String),
}

/// The API's handle on the VMM.
pub struct VmmControl {
    shared: Arc<Shared>,
    sender: Sender<Message>,
    wake: EventFd,
}

impl VmmControl {
    fn send(&self, message: Message) -> Result<(), ApiError> {
        self.sender
            .send(message)
            .map_err(|_| ApiError::Internal("the VMM event loop has ended".into()))?;
        self.wake
            .write(1)
            .map_err(|e| ApiError::Internal(format!("cannot wake the VMM event loop: {e}")))
    }
}

impl VmmHandle for VmmControl {
    fn info(&self) -> Value {
        self.shared.info()
    }

    fn metrics(&self) -> Value {
        self.shared.metrics()
    }

    fn request(&self, request: Request) -> Result<Reply, ApiError> {
        let (reply_to, reply) = mpsc::sync_channel(1);
        self.send(Message::Api(request, reply_to))?;
        reply.recv_timeout(REQUEST_TIMEOUT).map_err(|_| {
            ApiError::Internal(format!(
                "the VMM did not answer within {} s; try again",
                REQUEST_TIMEOUT.as_secs()
            ))
        })?
    }

    fn reply_sent(&self) {
        let _ = self.send(Message::ReplySent);
    }
}

/// Errors setting up control.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create the control eventfd or timer")]
    Fd(#[source] io::Error),
    #[error("cannot install the SIGTERM/SIGINT handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

/// The event loop's side; see the module doc.
pub struct Controller {
    shared: Arc<Shared>,
    sender: Sender<Message>,
    receiver: Receiver<Message>,
    wake: EventFd,
    signal: EventFd,
    timer: TimerFd,
    pause: Arc<VcpuPause>,
    vcpus: Vec<JoinHandle<()>>,
    /// The VM, to stop the guest's clock while paused (absent in unit tests).
    vm: Option<Arc<kvm_ioctls::VmFd>>,
    /// kvmclock at the pause, restored at the resume.
    paused_clock: Option<kvm_bindings::kvm_clock_data>,
    vsock_socket: Option<PathBuf>,
    /// The ACPI power button, if the VM has one.
    power_button: Option<Arc<GedEvents>>,
    /// A stop decided but waiting for the API to write its reply.
    pending_stop: Option<StopCause>,
    outcome: Option<RunOutcome>,
}

/// The eventfd the SIGTERM/SIGINT handler writes to; -1 before [`Controller::new`].
static SIGNAL_EVENT_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn handle_terminate(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = SIGNAL_EVENT_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` lives for the call and is 8 bytes,
        // what an eventfd takes. The fd stays open for the life of the process (the
        // controller's eventfd is never dropped before exit).
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

const EVENT_REQUEST: u32 = 0;
const EVENT_SIGNAL: u32 = 1;
const EVENT_TIMER: u32 = 2;

impl Controller {
    /// The controller and the API's handle on it. Requests queue until the controller is
    /// on the event loop; call [`Self::start`] once the vCPUs run.
    pub fn new(
        shared: Arc<Shared>,
        pause: Arc<VcpuPause>,
        vsock_socket: Option<PathBuf>,
        power_button: Option<Arc<GedEvents>>,
    ) -> Result<(Self, VmmControl), ControlError> {
        let fd = || EventFd::new(libc::EFD_NONBLOCK).map_err(ControlError::Fd);
        let wake = fd()?;
        let signal = fd()?;
        let timer = TimerFd::new().map_err(|e| ControlError::Fd(e.into()))?;
        let (sender, receiver) = mpsc::channel();
        let handle = VmmControl {
            shared: shared.clone(),
            sender: sender.clone(),
            wake: wake.try_clone().map_err(ControlError::Fd)?,
        };
        Ok((
            Self {
                shared,
                sender,
                receiver,
                wake,
                signal,
                timer,
                pause,
                vcpus: Vec::new(),
                vm: None,
                paused_clock: None,
                vsock_socket,
                power_button,
                pending_stop: None,
                outcome: None,
            },
            handle,
        ))
    }

    /// Takes the vCPU threads (to pause them) and turns SIGTERM and SIGINT into graceful
    /// shutdowns.
    pub fn start(&mut self, vcpus: Vec<JoinHandle<()>>) -> Result<(), ControlError> {
        self.vcpus = vcpus;
        SIGNAL_EVENT_FD.store(self.signal.as_raw_fd(), Ordering::SeqCst);
        for signal in [libc::SIGTERM, libc::SIGINT] {
            vmm_sys_util::signal::register_signal_handler(signal, handle_terminate)
                .map_err(ControlError::Signal)?;
        }
        Ok(())
    }

    /// How the VM ended, once crib decided to end it.
    pub fn outcome(&self) -> Option<RunOutcome> {
        self.outcome
    }

    fn end(&mut self, outcome: RunOutcome) {
        if self.outcome.is_none() {
            self.outcome = Some(outcome);
        }
    }

    fn arm_timer(&mut self, after: Duration) {
        if let Err(e) = self.timer.reset(after, None) {
            // Without the timer a forced stop would never come: stop now.
            tracing::error!("cannot arm the shutdown timer: {e}; stopping the guest now");
            self.end(RunOutcome::Stopped(StopCause::ShutdownTimedOut));
        }
    }

    /// Stops once the API wrote its reply, or after [`REPLY_GRACE`].
    fn stop_after_reply(&mut self, cause: StopCause) {
        self.shared.set_state(VmState::ShuttingDown);
        self.pending_stop = Some(cause);
        self.arm_timer(REPLY_GRACE);
    }

    fn handle(&mut self, request: Request) -> Result<Reply, ApiError> {
        match request {
            Request::Pause => self.pause(),
            Request::Resume => self.resume(),
            Request::Shutdown { timeout } => Ok(self.shutdown(timeout, true)),
            Request::Stop => {
                tracing::info!("api: forced stop");
                self.stop_after_reply(StopCause::Requested);
                Ok(Reply {
                    status: 202,
                    body: json!({ "state": "stopping" }),
                    then_exit: true,
                })
            }
            Request::RateLimit { id, limits } => self.rate_limit(&id, limits),
        }
    }

    /// Lets pause/resume stop the guest's clock (kvmclock) too, so the guest sees no time
    /// pass while it is paused, as a suspended machine would.
    pub fn set_vm(&mut self, vm: Arc<kvm_ioctls::VmFd>) {
        self.vm = Some(vm);
    }

    fn pause(&mut self) -> Result<Reply, ApiError> {
        match self.shared.state() {
            VmState::ShuttingDown => Err(ApiError::Conflict(
                "the VM is shutting down: it cannot be paused".into(),
            )),
            VmState::Paused => Ok(Reply::ok(json!({ "state": "paused" }))),
            VmState::Running => {
                self.pause
                    .pause(&self.vcpus, PAUSE_TIMEOUT)
                    .map_err(|e| ApiError::Internal(format!("cannot pause: {e}")))?;
                if let Some(vm) = &self.vm {
                    match vm.get_clock() {
                        Ok(clock) => self.paused_clock = Some(clock),
                        Err(e) => tracing::warn!("pause: cannot read kvmclock: {e}"),
                    }
                }
                self.shared.set_state(VmState::Paused);
                tracing::info!("vCPUs paused");
                Ok(Reply::ok(json!({ "state": "paused" })))
            }
        }
    }

    fn resume(&mut self) -> Result<Reply, ApiError> {
        match self.shared.state() {
            VmState::ShuttingDown => Err(ApiError::Conflict(
                "the VM is shutting down: there is nothing to resume".into(),
            )),
            VmState::Running => Ok(Reply::ok(json!({ "state": "running" }))),
            VmState::Paused => {
                if let (Some(vm), Some(mut clock)) = (&self.vm, self.paused_clock.take()) {
                    // Only the clock value: the flags KVM reports are not input flags.
                    clock.flags = 0;
                    if let Err(e) = vm.set_clock(&clock) {
                        tracing::warn!("resume: cannot restore kvmclock: {e}");
                    }
                }
                self.pause.resume();
                self.shared.set_state(VmState::Running);
                tracing::info!("vCPUs resumed");
                Ok(Reply::ok(json!({ "state": "running" })))
            }
        }
    }

    /// Starts a graceful shutdown (see the module doc); `from_api` when a reply will be
    /// written for it.
    fn shutdown(&mut self, timeout: Duration, from_api: bool) -> Reply {
        let timeout_s = timeout.as_secs();
        if self.shared.state() == VmState::ShuttingDown {
            return Reply {
                status: 202,
                body: json!({ "state": "shutting-down", "message": "a shutdown is already under way" }),
                then_exit: false,
            };
        }
        if self.shared.state() == VmState::Paused {
            self.pause.resume();
        }
        self.shared.set_state(VmState::ShuttingDown);
        let Some(socket) = self.vsock_socket.clone() else {
            if self.press_power_button() {
                tracing::info!(
                    "graceful shutdown: pressed the ACPI power button, forced stop after {timeout_s} s"
                );
                self.arm_timer(timeout);
                return Reply {
                    status: 202,
                    body: json!({ "state": "shutting-down", "timeout_s": timeout_s, "via": "acpi-power-button" }),
                    then_exit: false,
                };
            }
            let message = "no vsock device and no ACPI power button: crib cannot ask the guest \
                           to power off; stopping it";
            tracing::warn!("graceful shutdown: {message}");
            if from_api {
                self.stop_after_reply(StopCause::GuestUnreachable);
            } else {
                self.end(RunOutcome::Stopped(StopCause::GuestUnreachable));
            }
            return Reply {
                status: 202,
                body: json!({ "state": "stopping", "message": message }),
                then_exit: from_api,
            };
        };
        // Leave cradle time to unmount and power off after the processes' grace.
        let grace_s = (timeout_s * 3 / 4).max(1);
        tracing::info!(
            "graceful shutdown: asking cradle to power off (processes get {grace_s} s), \
             forced stop after {timeout_s} s"
        );
        self.arm_timer(timeout);
        let sender = self.sender.clone();
        let wake = self.wake.try_clone();
        let spawned = std::thread::Builder::new()
            .name("guest-shutdown".into())
            .spawn(move || {
                if let Err(e) = ask_guest_to_power_off(&socket, Duration::from_secs(grace_s)) {
                    let _ = sender.send(Message::GuestUnreachable(error_chain(&e)));
                    if let Ok(wake) = wake {
                        let _ = wake.write(1);
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("graceful shutdown: cannot start its thread: {e}; stopping the guest");
            self.end(RunOutcome::Stopped(StopCause::GuestUnreachable));
        }
        Reply {
            status: 202,
            body: json!({ "state": "shutting-down", "timeout_s": timeout_s, "via": "cradle" }),
            then_exit: false,
        }
    }

    fn rate_limit(&mut self, id: &str, limits: RateLimitBody) -> Result<Reply, ApiError> {
        let Some(disk) = self.shared.disks.iter().find(|d| d.id == id) else {
            let ids: Vec<&str> = self.shared.disks.iter().map(|d| d.id.as_str()).collect();
            return Err(ApiError::NotFound(if ids.is_empty() {
                format!("no disk '{id}': this VM has no disks")
            } else {
                format!("no disk '{id}': the disks are {}", ids.join(", "))
            }));
        };
        let limits = DiskLimits {
            iops: limits.iops.filter(|v| *v > 0),
            bandwidth: limits.bandwidth.filter(|v| *v > 0),
            burst: limits.burst,
            iops_burst: limits.iops_burst,
        };
        let result = disk
            .block
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .update_rate_limit(limits.to_rate_limit().unwrap_or_default());
        match result {
            Ok(()) => {}
            Err(e @ BlockError::RateLimit { .. }) => {
                return Err(ApiError::BadRequest(error_chain(&e)))
            }
            Err(e) => return Err(ApiError::Internal(error_chain(&e))),
        }
        if let Some(config) = self.shared.config().disks.iter_mut().find(|d| d.id == id) {
            config.iops = limits.iops;
            config.bandwidth = limits.bandwidth;
            config.burst = limits.burst;
            config.iops_burst = limits.iops_burst;
        }
        tracing::info!(disk = id, "rate limit set to {limits:?}");
        // Limits not set are left out (docs/api.yaml's RateLimitReply has no nulls).
        let mut reply = serde_json::Map::new();
        reply.insert("id".into(), json!(id));
        for (name, value) in [
            ("iops", limits.iops),
            ("bandwidth", limits.bandwidth),
            ("burst", limits.burst),
            ("iops_burst", limits.iops_burst),
        ] {
            if let Some(value) = value {
                reply.insert(name.into(), json!(value));
            }
        }
        Ok(Reply::ok(serde_json::Value::Object(reply)))
    }

    fn drain_requests(&mut self) {
        while let Ok(message) = self.receiver.try_recv() {
            match message {
                Message::Api(request, reply_to) => {
                    let reply = self.handle(request);
                    // The API may have given up waiting; nothing to do then.
                    let _ = reply_to.send(reply);
                }
                Message::ReplySent => {
                    if let Some(cause) = self.pending_stop.take() {
                        self.end(RunOutcome::Stopped(cause));
                    }
                }
                Message::GuestUnreachable(error) => {
                    // Not a pod (or cradle is gone): the power button is the other way to
                    // ask; the shutdown timer, already armed, still bounds the wait.
                    if self.outcome.is_none() && self.press_power_button() {
                        tracing::info!("graceful shutdown: cradle did not take the call ({error}); pressed the ACPI power button instead");
                    } else {
                        tracing::warn!("graceful shutdown: cradle did not take the call ({error}); stopping the guest");
                        self.end(RunOutcome::Stopped(StopCause::GuestUnreachable));
                    }
                }
            }
        }
    }

    /// Presses the ACPI power button; false when the VM has none or it cannot be pressed.
    fn press_power_button(&self) -> bool {
        let Some(button) = &self.power_button else {
            return false;
        };
        match button.press_power_button() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("cannot press the ACPI power button (its interrupt eventfd: {e})");
                false
            }
        }
    }

    /// The eventfd counts the signals that arrived since its last read: each one counts, so
    /// two in quick succession start the graceful shutdown and then stop the guest.
    fn on_signal_event(&mut self) {
        let count = self.signal.read().unwrap_or(1).max(1);
        for _ in 0..count.min(2) {
            self.on_signal();
        }
    }

    fn on_signal(&mut self) {
        if self.shared.state() == VmState::ShuttingDown {
            tracing::warn!("second SIGTERM/SIGINT: stopping the guest now");
            self.end(RunOutcome::Stopped(StopCause::Requested));
        } else {
            tracing::info!("SIGTERM/SIGINT: graceful shutdown");
            self.shutdown(DEFAULT_SHUTDOWN_TIMEOUT, false);
        }
    }

    fn on_timer(&mut self) {
        if let Some(cause) = self.pending_stop.take() {
            self.end(RunOutcome::Stopped(cause));
        } else if self.shared.state() == VmState::ShuttingDown {
            self.end(RunOutcome::Stopped(StopCause::ShutdownTimedOut));
        }
    }
}

impl MutEventSubscriber for Controller {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            (self.wake.as_raw_fd(), EVENT_REQUEST),
            (self.signal.as_raw_fd(), EVENT_SIGNAL),
            (self.timer.as_raw_fd(), EVENT_TIMER),
        ];
        for (fd, data) in fds {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                tracing::error!("cannot watch the control events: {e:?}; stopping");
                self.end(RunOutcome::Stopped(StopCause::Requested));
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            EVENT_REQUEST => {
                let _ = self.wake.read();
                self.drain_requests();
            }
            EVENT_SIGNAL => self.on_signal_event(),
            EVENT_TIMER => {
                let _ = self.timer.wait();
                self.on_timer();
            }
            other => tracing::warn!("control: unexpected event {other}"),
        }
    }
}

/// Why cradle could not be asked to power off.
#[derive(Debug, thiserror::Error)]
pub enum GuestShutdownError {
    #[error(
        "cannot reach cradle's API on vsock port {}",
        docker_proxy::VDOCKER_PORT
    )]
    Connect(#[source] docker_proxy::ForwardError),
    #[error("the shutdown call failed")]
    Call(#[source] io::Error),
    #[error("cradle refused the shutdown call: {0}")]
    Refused(String),
}

/// `POST /crib/v1/shutdown?t=GRACE` to cradle through the vsock host socket; Ok once
/// cradle accepted it (2xx).
pub fn ask_guest_to_power_off(
    vsock_socket: &Path,
    grace: Duration,
) -> Result<(), GuestShutdownError> {
    let mut stream =
        docker_proxy::connect_guest(vsock_socket).map_err(GuestShutdownError::Connect)?;
    stream
        .set_read_timeout(Some(GUEST_CALL_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(GUEST_CALL_TIMEOUT)))
        .map_err(GuestShutdownError::Call)?;
    write!(
        stream,
        "POST /crib/v1/shutdown?t={} HTTP/1.1\r\nHost: cradle\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        grace.as_secs()
    )
    .map_err(GuestShutdownError::Call)?;
    let mut status = String::new();
    BufReader::new(stream)
        .take(256)
        .read_line(&mut status)
        .map_err(GuestShutdownError::Call)?;
    let status = status.trim_end();
    let code = status.split_whitespace().nth(1).unwrap_or("");
    if status.is_empty() {
        // The request reached cradle, then the connection closed without an answer: a guest
        // that powers off resets its vsock device, which may beat cradle's 202 out. Wait
        // for the power-off; the shutdown timeout still bounds the wait.
        tracing::info!("graceful shutdown: cradle closed the call without an answer; waiting for the guest to power off");
        Ok(())
    } else if status.starts_with("HTTP/1.") && code.starts_with('2') {
        Ok(())
    } else {
        Err(GuestShutdownError::Refused(status.to_string()))
    }
}

/// `error: cause: cause...` for one log line or API message.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    /// A controller of a VM without vCPU threads (pausing zero threads succeeds at once)
    /// and without disks, with a vsock host socket at `vsock` if given.
    fn controller(vsock: Option<PathBuf>) -> Controller {
        controller_with_button(vsock, None)
    }

    #[test]
    fn metrics_list_each_net_device_by_tap() {
        let net = Arc::new(NetMetrics::default());
        net.tx_frames.store(3, Ordering::Relaxed);
        net.rx_dropped.store(1, Ordering::Relaxed);
        let shared = Shared::new(
            VmConfig::new("/k"),
            Instant::now(),
            Arc::new(BootTimes::default()),
            Arc::new(ExitCounters::default()),
            Vec::new(),
            None,
            vec![("tap7".into(), net)],
        );
        let metrics = shared.metrics();
        assert_eq!(metrics["nets"]["tap7"]["tx_frames"], 3);
        assert_eq!(metrics["nets"]["tap7"]["rx_dropped"], 1);
        assert_eq!(metrics["nets"]["tap7"]["rx_frames"], 0);
    }

    fn controller_with_button(
        vsock: Option<PathBuf>,
        button: Option<Arc<GedEvents>>,
    ) -> Controller {
        let shared = Arc::new(Shared::new(
            VmConfig::new("/k"),
            Instant::now(),
            Arc::new(BootTimes::default()),
            Arc::new(ExitCounters::default()),
            Vec::new(),
            None,
            Vec::new(),
        ));
        Controller::new(shared, Arc::new(VcpuPause::default()), vsock, button)
            .unwrap()
            .0
    }

    /// A power button and the eventfd of its interrupt.
    fn power_button() -> (Arc<GedEvents>, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let button = Arc::new(GedEvents::new(irq.try_clone().unwrap()));
        (button, irq)
    }

    #[test]
    fn shutdown_without_vsock_presses_the_power_button_then_times_out() {
        let (button, irq) = power_button();
        let mut control = controller_with_button(None, Some(button));

        let reply = control
            .handle(Request::Shutdown {
                timeout: Duration::from_secs(20),
            })
            .unwrap();
        let pressed = irq.read().unwrap();
        let before = control.outcome();
        control.on_timer();

        assert!(!reply.then_exit);
        assert_eq!(reply.body["via"], "acpi-power-button");
        assert_eq!(pressed, 1);
        assert_eq!(before, None);
        assert_eq!(control.shared.state(), VmState::ShuttingDown);
        assert_eq!(
            control.outcome(),
            Some(RunOutcome::Stopped(StopCause::ShutdownTimedOut))
        );
    }

    #[test]
    fn signal_without_vsock_presses_the_power_button() {
        let (button, irq) = power_button();
        let mut control = controller_with_button(None, Some(button));

        control.on_signal();

        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(control.outcome(), None);
        assert_eq!(control.shared.state(), VmState::ShuttingDown);
    }

    #[test]
    fn cradle_unreachable_falls_back_to_the_power_button() {
        let (button, irq) = power_button();
        let mut control = controller_with_button(Some(temp("no-cradle")), Some(button));
        control.shared.set_state(VmState::ShuttingDown);

        control
            .sender
            .send(Message::GuestUnreachable("refused".into()))
            .unwrap();
        control.drain_requests();

        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(control.outcome(), None);
    }

    #[test]
    fn cradle_unreachable_without_a_power_button_stops() {
        let mut control = controller(Some(temp("no-cradle-no-button")));

        control
            .sender
            .send(Message::GuestUnreachable("refused".into()))
            .unwrap();
        control.drain_requests();

        assert_eq!(
            control.outcome(),
            Some(RunOutcome::Stopped(StopCause::GuestUnreachable))
        );
    }

    #[test]
    fn pause_then_resume_changes_state() {
        let mut control = controller(None);

        let paused = control.handle(Request::Pause).unwrap();
        let state_paused = control.shared.state();
        let resumed = control.handle(Request::Resume).unwrap();

        assert_eq!(paused.body, json!({"state": "paused"}));
        assert_eq!(state_paused, VmState::Paused);
        assert_eq!(resumed.body, json!({"state": "running"}));
        assert_eq!(control.shared.state(), VmState::Running);
    }

    #[test]
    fn stop_ends_the_vm_once_the_reply_is_sent() {
        let mut control = controller(None);

        let reply = control.handle(Request::Stop).unwrap();
        let before = control.outcome();
        control.sender.send(Message::ReplySent).unwrap();
        control.drain_requests();

        assert!(reply.then_exit);
        assert_eq!(before, None);
        assert_eq!(
            control.outcome(),
            Some(RunOutcome::Stopped(StopCause::Requested))
        );
    }

    #[test]
    fn stop_ends_the_vm_after_the_grace_without_a_reply() {
        let mut control = controller(None);

        control.handle(Request::Stop).unwrap();
        control.on_timer();

        assert_eq!(
            control.outcome(),
            Some(RunOutcome::Stopped(StopCause::Requested))
        );
    }

    #[test]
    fn shutdown_without_vsock_stops_after_the_reply() {
        let mut control = controller(None);

        let reply = control
            .handle(Request::Shutdown {
                timeout: Duration::from_secs(20),
            })
            .unwrap();
        control.sender.send(Message::ReplySent).unwrap();
        control.drain_requests();

        assert!(reply.then_exit);
        assert!(reply.body["message"]
            .as_str()
            .unwrap()
            .contains("no vsock device and no ACPI power button"));
        assert_eq!(
            control.outcome(),
            Some(RunOutcome::Stopped(StopCause::GuestUnreachable))
        );
    }

    #[test]
    fn shutdown_asks_cradle_and_times_out_into_a_stop() {
        let path = temp("cradle-timeout");
        let cradle = fake_cradle(&path, "HTTP/1.1 202 Accepted\r\n\r\n");
        let mut control = controller(Some(path.clone()));

        let reply = control
            .handle(Request::Shutdown {
                timeout: Duration::from_secs(4),
            })
            .unwrap();
        let request_line = cradle.join().unwrap();
        let outcome_before_timer = control.outcome();
        control.on_timer();

        assert_eq!(reply.status, 202);
        assert_eq!(reply.body["via"], "cradle");
        assert_eq!(request_line, "POST /crib/v1/shutdown?t=3 HTTP/1.1\r\n");
        assert_eq!(outcome_before_timer, None);
        assert_eq!(
            control.outcome(),
            Some(RunOutcome::Stopped(StopCause::ShutdownTimedOut))
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn pause_while_shutting_down_is_a_conflict() {
        let path = temp("cradle-conflict");
        let _cradle = fake_cradle(&path, "HTTP/1.1 202 Accepted\r\n\r\n");
        let mut control = controller(Some(path.clone()));
        control
            .handle(Request::Shutdown {
                timeout: Duration::from_secs(20),
            })
            .unwrap();

        let err = control.handle(Request::Pause).unwrap_err();

        assert_eq!(err.status(), 409);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn second_signal_stops_at_once() {
        let path = temp("cradle-signal");
        let _cradle = fake_cradle(&path, "HTTP/1.1 202 Accepted\r\n\r\n");
        let mut control = controller(Some(path.clone()));

        control.on_signal();
        let after_first = control.outcome();
        control.on_signal();

        assert_eq!(after_first, None);
        assert_eq!(
            control.outcome(),
            Some(RunOutcome::Stopped(StopCause::Requested))
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn two_signals_read_at_once_stop_at_once() {
        let path = temp("cradle-two-signals");
        let _cradle = fake_cradle(&path, "HTTP/1.1 202 Accepted\r\n\r\n");
        let mut control = controller(Some(path.clone()));
        control.signal.write(1).unwrap();
        control.signal.write(1).unwrap();

        control.on_signal_event();

        assert_eq!(
            control.outcome(),
            Some(RunOutcome::Stopped(StopCause::Requested))
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn rate_limit_of_unknown_disk_is_404_listing_none() {
        let mut control = controller(None);

        let err = control
            .handle(Request::RateLimit {
                id: "data".into(),
                limits: RateLimitBody::default(),
            })
            .unwrap_err();

        assert_eq!(err.status(), 404);
        assert_eq!(err.to_string(), "no disk 'data': this VM has no disks");
    }

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("crib-control-{name}-{}", std::process::id()))
    }

    /// A fake vsock host socket with cradle behind it: answers `CONNECT 1`, reads the
    /// request and replies `status`. Returns the request line it saw.
    fn fake_cradle(path: &Path, status: &'static str) -> std::thread::JoinHandle<String> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            assert_eq!(line, "CONNECT 1\n");
            stream.write_all(b"OK 1073741824\n").unwrap();
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            let mut rest = [0u8; 512];
            let _ = reader.read(&mut rest);
            stream.write_all(status.as_bytes()).unwrap();
            request
        })
    }

    #[test]
    fn shutdown_call_closed_without_an_answer_waits_for_the_guest() {
        let path = temp("cradle-closed");
        let cradle = fake_cradle(&path, "");

        let result = ask_guest_to_power_off(&path, Duration::from_secs(3));

        cradle.join().unwrap();
        assert!(result.is_ok(), "{result:?}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn shutdown_call_reaches_cradle_with_the_grace() {
        let path = temp("cradle-ok");
        let cradle = fake_cradle(&path, "HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n");

        ask_guest_to_power_off(&path, Duration::from_secs(15)).unwrap();

        assert_eq!(
            cradle.join().unwrap(),
            "POST /crib/v1/shutdown?t=15 HTTP/1.1\r\n"
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn shutdown_call_refused_names_the_status() {
        let path = temp("cradle-500");
        let _cradle = fake_cradle(&path, "HTTP/1.1 500 Internal Server Error\r\n\r\n");

        let err = ask_guest_to_power_off(&path, Duration::from_secs(1)).unwrap_err();

        assert!(
            err.to_string().contains("500 Internal Server Error"),
            "{err}"
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn shutdown_call_without_a_vsock_listener_is_unreachable() {
        let err = ask_guest_to_power_off(&temp("none"), Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, GuestShutdownError::Connect(_)));
    }

    #[test]
    fn state_names_match_the_api_spec() {
        assert_eq!(VmState::Running.as_str(), "running");
        assert_eq!(VmState::Paused.as_str(), "paused");
        assert_eq!(VmState::ShuttingDown.as_str(), "shutting-down");
    }
}
