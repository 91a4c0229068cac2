//! The virtio-fs device: features, configuration space, and the vhost-user set-up at
//! activation and reset. No queue work (the backend does it; [`super::failover`] when the
//! backend is gone).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use libc::EFD_NONBLOCK;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::failover::{self, FailedQueue};
use super::{FsError, CONFIG_SPACE_BYTES, MAX_REQUEST_QUEUES, TAG_BYTES, TYPE_FS};
use crate::virtio::{
    ActivateError, ActivatedQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt,
    VirtioInterruptType,
};

/// Features crib passes from the backend to the driver; anything else the backend offers
/// (packed rings, IOMMU, ...) crib's transport does not support.
const PASSED_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_RING_F_EVENT_IDX
    | 1 << VIRTIO_RING_F_INDIRECT_DESC
    | 1 << VIRTIO_F_NOTIFY_ON_EMPTY;

/// What the VMM asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsConfig {
    /// The name the guest mounts (`mount -t virtiofs TAG /mnt`), 1 to 36 bytes.
    pub tag: String,
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
    /// Request queues (the high-priority queue comes on top).
    pub request_queues: u16,
    /// Descriptors per queue.
    pub queue_size: u16,
}

impl FsConfig {
    /// Checks what the device needs of the tag and queue count.
    pub fn check(&self) -> Result<(), FsError> {
        check_tag(&self.tag)
    }
}

/// Checks a tag: non-empty and within [`TAG_BYTES`].
pub fn check_tag(tag: &str) -> Result<(), FsError> {
    if tag.is_empty() {
        return Err(FsError::EmptyTag);
    }
    if tag.len() > TAG_BYTES {
        return Err(FsError::TagTooLong {
            tag: tag.to_string(),
            len: tag.len(),
        });
    }
    Ok(())
}

/// The configuration space: `tag[36]`, `num_request_queues` (virtio 1.2 §5.11.4).
fn config_space(tag: &str, request_queues: u16) -> [u8; CONFIG_SPACE_BYTES] {
    let mut space = [0u8; CONFIG_SPACE_BYTES];
    let n = tag.len().min(TAG_BYTES);
    space[..n].copy_from_slice(&tag.as_bytes()[..n]);
    space[TAG_BYTES..].copy_from_slice(&u32::from(request_queues).to_le_bytes());
    space
}

/// What the monitor and the device share.
struct Shared {
    tag: String,
    socket: String,
    /// The backend hung up (or failed a request): nothing more is sent to it.
    lost: AtomicBool,
    /// The current activation, if the driver started the device.
    run: Mutex<Option<Running>>,
}

/// One activation: what the failover needs to take the rings back.
struct Running {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<(u16, Option<Queue>, EventFd)>,
    /// Forwards the call fd of queues without an MSI-X vector: (stop, thread).
    forwarders: Vec<(EventFd, JoinHandle<()>)>,
    failover: Option<(EventFd, JoinHandle<()>)>,
}

impl Running {
    /// Takes the rings back from a dead backend and answers them with `ENOTCONN`.
    fn start_failover(&mut self, tag: &str) {
        if self.failover.is_some() {
            return;
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, queue, kick) in &mut self.queues {
            let Some(queue) = queue.take() else {
                continue;
            };
            match kick.try_clone() {
                Ok(kick) => queues.push(FailedQueue {
                    index: *index,
                    queue,
                    kick,
                }),
                Err(e) => tracing::error!("virtio-fs {tag}: cannot clone kick fd: {e}"),
            }
        }
        let started = EventFd::new(EFD_NONBLOCK).and_then(|stop| {
            let thread = failover::spawn(
                tag,
                self.mem.clone(),
                self.interrupt.clone(),
                queues,
                stop.try_clone()?,
            )?;
            Ok((stop, thread))
        });
        match started {
            Ok(f) => self.failover = Some(f),
            Err(e) => {
                tracing::error!("virtio-fs {tag}: cannot answer the guest's requests: {e}");
                self.interrupt.set_needs_reset();
            }
        }
    }

    fn stop(self) {
        for (stop, thread) in self.forwarders.into_iter().chain(self.failover) {
            let _ = stop.write(1);
            let _ = thread.join();
        }
    }
}

impl Shared {
    /// Marks the backend gone (once) and moves a running device to the failover.
    fn backend_lost(&self, why: &str) {
        if !self.lost.swap(true, Ordering::AcqRel) {
            tracing::error!(
                "virtio-fs {}: lost the vhost-user backend at {} ({why}); requests on the \
                 mount now fail with ENOTCONN, the VM keeps running",
                self.tag,
                self.socket
            );
        }
        let mut run = self.run.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(run) = run.as_mut() {
            run.start_failover(&self.tag);
        }
    }
}

/// A virtio-fs device backed by a vhost-user-fs daemon.
pub struct Fs {
    config: FsConfig,
    frontend: Frontend,
    /// What the backend offers, including `VHOST_USER_F_PROTOCOL_FEATURES`.
    backend_features: u64,
    acked: u64,
    queue_sizes: Vec<u16>,
    config_space: [u8; CONFIG_SPACE_BYTES],
    shared: Arc<Shared>,
    /// The connection's watch end, until the first activation starts the monitor on it.
    watch: Option<UnixStream>,
    monitor: Option<(EventFd, JoinHandle<()>)>,
}

impl Fs {
    /// Connects to the backend at `config.socket` and negotiates what can be before the
    /// driver comes (owner, protocol features, queue count). A missing or refusing socket
    /// is an error here, at VM set-up, not when the guest mounts.
    pub fn new(config: FsConfig) -> Result<Self, FsError> {
        config.check()?;
        let socket = config.socket.display().to_string();
        let queues = u64::from(config.request_queues.clamp(1, MAX_REQUEST_QUEUES)) + 1;
        let stream = UnixStream::connect(&config.socket).map_err(|e| FsError::Connect {
            socket: socket.clone(),
            source: vhost::vhost_user::Error::SocketConnect(e),
        })?;
        let watch = stream.try_clone().map_err(|e| FsError::Connect {
            socket: socket.clone(),
            source: vhost::vhost_user::Error::SocketConnect(e),
        })?;
        let mut frontend = Frontend::from_stream(stream, queues);
        let proto = |step| protocol_error(&socket, step);
        frontend.set_owner().map_err(proto("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(proto("GET_FEATURES"))?;
        if backend_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(FsError::NoVersion1 { socket });
        }
        let mut protocol = VhostUserProtocolFeatures::empty();
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(proto("GET_PROTOCOL_FEATURES"))?;
            protocol =
                offered & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK);
            frontend
                .set_protocol_features(protocol)
                .map_err(proto("SET_PROTOCOL_FEATURES"))?;
        }
        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            let max = frontend.get_queue_num().map_err(proto("GET_QUEUE_NUM"))?;
            if queues > max {
                return Err(FsError::TooManyQueues {
                    socket,
                    wanted: queues,
                    max,
                });
            }
        } else if queues > 2 {
            return Err(FsError::TooManyQueues {
                socket,
                wanted: queues,
                max: 2,
            });
        }
        let shared = Arc::new(Shared {
            tag: config.tag.clone(),
            socket: socket.clone(),
            lost: AtomicBool::new(false),
            run: Mutex::new(None),
        });
        let request_queues = (queues - 1) as u16;
        Ok(Self {
            queue_sizes: vec![config.queue_size; queues as usize],
            config_space: config_space(&config.tag, request_queues),
            config,
            frontend,
            backend_features,
            acked: 0,
            shared,
            watch: Some(watch),
            monitor: None,
        })
    }

    /// Starts the thread that watches the backend's socket, once. It starts at the first
    /// activation rather than in [`Fs::new`]: a jailed VMM sets its devices up with one
    /// thread and confines itself before any starts (docs/JAIL.md). A hang-up before
    /// then still shows: the monitor polls for it level-triggered, and the set-up of
    /// the rings fails on a closed socket anyway.
    fn start_monitor(&mut self) -> Result<(), ActivateError> {
        if let Some(watch) = self.watch.take() {
            let monitor =
                spawn_monitor(self.shared.clone(), watch).map_err(ActivateError::Worker)?;
            self.monitor = Some(monitor);
        }
        Ok(())
    }

    /// The device's settings.
    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    /// Whether the backend is gone.
    pub fn backend_lost(&self) -> bool {
        self.shared.lost.load(Ordering::Acquire)
    }

    /// Hands guest memory and the rings to the backend.
    fn setup_backend(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &Arc<dyn VirtioInterrupt>,
        queues: &[ActivatedQueue],
        forwarders: &mut Vec<(EventFd, JoinHandle<()>)>,
    ) -> Result<(), String> {
        let step = |step: &'static str| move |e: vhost::Error| format!("{step}: {e}");
        let protocol_bit =
            self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features(self.acked | protocol_bit)
            .map_err(step("SET_FEATURES"))?;
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(step("guest RAM is not file-backed"))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(step("SET_MEM_TABLE"))?;
        for q in queues {
            let index = usize::from(q.index);
            let host = |gpa: u64| {
                mem.get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|e| format!("queue {index} ring at {gpa:#x}: {e}"))
            };
            let ring = VringConfigData {
                queue_max_size: self.queue_sizes.get(index).copied().unwrap_or(0),
                queue_size: q.queue.size(),
                flags: 0,
                desc_table_addr: host(q.queue.desc_table())?,
                used_ring_addr: host(q.queue.used_ring())?,
                avail_ring_addr: host(q.queue.avail_ring())?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(index, q.queue.size())
                .map_err(step("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(index, &ring)
                .map_err(step("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(index, q.queue.next_avail())
                .map_err(step("SET_VRING_BASE"))?;
            let call = match interrupt.notifier(VirtioInterruptType::Queue(q.index)) {
                Some(irqfd) => irqfd,
                None => {
                    let (call, forwarder) =
                        spawn_forwarder(&self.config.tag, interrupt.clone(), q.index)
                            .map_err(|e| format!("call forwarder of queue {index}: {e}"))?;
                    forwarders.push(forwarder);
                    call
                }
            };
            self.frontend
                .set_vring_call(index, &call)
                .map_err(step("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(index, &q.kick)
                .map_err(step("SET_VRING_KICK"))?;
            if protocol_bit != 0 {
                self.frontend
                    .set_vring_enable(index, true)
                    .map_err(step("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Takes the rings back from the backend (GET_VRING_BASE stops each one).
    fn stop_backend(&mut self, queues: &[(u16, Option<Queue>, EventFd)]) {
        if self.backend_lost() {
            return;
        }
        let protocol =
            self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        for (index, _, _) in queues {
            let index = usize::from(*index);
            let result = if protocol {
                self.frontend.set_vring_enable(index, false)
            } else {
                Ok(())
            }
            .and_then(|()| self.frontend.get_vring_base(index).map(|_| ()));
            if let Err(e) = result {
                self.shared
                    .backend_lost(&format!("stopping queue {index}: {e}"));
                return;
            }
        }
    }
}

/// Maps an error of vhost-user `step` to [`FsError::Protocol`].
fn protocol_error<E>(socket: &str, step: &'static str) -> impl FnOnce(E) -> FsError
where
    E: std::error::Error + Send + Sync + 'static,
{
    let socket = socket.to_string();
    move |source| FsError::Protocol {
        socket,
        step,
        source: Box::new(source),
    }
}

/// Watches the backend's socket for a hang-up; `POLLRDHUP` only, so it never steals a
/// reply from the frontend.
fn spawn_monitor(
    shared: Arc<Shared>,
    watch: UnixStream,
) -> std::io::Result<(EventFd, JoinHandle<()>)> {
    let stop = EventFd::new(EFD_NONBLOCK)?;
    let stop_thread = stop.try_clone()?;
    let thread = std::thread::Builder::new()
        .name(format!("fs-{}-monitor", shared.tag))
        .spawn(move || loop {
            let mut fds = [
                libc::pollfd {
                    fd: watch.as_raw_fd(),
                    events: libc::POLLRDHUP,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop_thread.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of 2 pollfds that outlives the call.
            let ret = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if ret < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            if fds[0].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                shared.backend_lost("the daemon closed its socket");
                return;
            }
        })?;
    Ok((stop, thread))
}

/// A call eventfd for a queue without an MSI-X vector, forwarded to `trigger`.
fn spawn_forwarder(
    tag: &str,
    interrupt: Arc<dyn VirtioInterrupt>,
    queue: u16,
) -> std::io::Result<(EventFd, (EventFd, JoinHandle<()>))> {
    let call = EventFd::new(EFD_NONBLOCK)?;
    let stop = EventFd::new(EFD_NONBLOCK)?;
    let (call_thread, stop_thread) = (call.try_clone()?, stop.try_clone()?);
    let thread = std::thread::Builder::new()
        .name(format!("fs-{tag}-call{queue}"))
        .spawn(move || loop {
            let mut fds =
                [call_thread.as_raw_fd(), stop_thread.as_raw_fd()].map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            // SAFETY: `fds` is a valid array of 2 pollfds that outlives the call.
            let ret = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if ret < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
            {
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            if fds[0].revents != 0 && call_thread.read().is_ok() {
                let _ = interrupt.trigger(VirtioInterruptType::Queue(queue));
            }
        })?;
    Ok((call, (stop, thread)))
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.backend_features & PASSED_FEATURES
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked = features & self.device_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(src) = usize::try_from(offset)
            .ok()
            .and_then(|o| self.config_space.get(o..))
        else {
            return;
        };
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(tag = %self.config.tag, offset, len = data.len(), "virtio-fs: ignoring a config write");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        if queues.is_empty() {
            return Err(ActivateError::QueueCount { got: 0, needed: 1 });
        }
        self.start_monitor()?;
        let mut forwarders = Vec::new();
        let mut failed = None;
        if !self.backend_lost() {
            if let Err(e) = self.setup_backend(&mem, &interrupt, &queues, &mut forwarders) {
                failed = Some(e);
            }
        }
        let mut kept = Vec::with_capacity(queues.len());
        for q in queues {
            kept.push((q.index, Some(q.queue), q.kick));
        }
        let mut run = Running {
            mem,
            interrupt,
            queues: kept,
            forwarders,
            failover: None,
        };
        if self.backend_lost() {
            run.start_failover(&self.config.tag);
        }
        *self.shared.run.lock().unwrap_or_else(|e| e.into_inner()) = Some(run);
        if let Some(e) = failed {
            // A backend that refuses the set-up is as good as gone for this VM.
            self.shared.backend_lost(&e);
        }
        Ok(())
    }

    fn reset(&mut self) {
        let run = self
            .shared
            .run
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(run) = run {
            self.stop_backend(&run.queues);
            run.stop();
        }
        self.acked = 0;
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.monitor.take() {
            let _ = stop.write(1);
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_holds_tag_and_request_queues() {
        let space = config_space("gfs", 2);
        assert_eq!(&space[..3], b"gfs");
        assert!(space[3..TAG_BYTES].iter().all(|&b| b == 0));
        assert_eq!(&space[TAG_BYTES..], &2u32.to_le_bytes());
    }

    #[test]
    fn a_full_length_tag_has_no_terminator() {
        let tag = "t".repeat(TAG_BYTES);
        let space = config_space(&tag, 1);
        assert_eq!(&space[..TAG_BYTES], tag.as_bytes());
    }

    #[test]
    fn tags_must_fit_the_config_space() {
        assert!(check_tag("gfs").is_ok());
        assert!(check_tag(&"x".repeat(TAG_BYTES)).is_ok());
        let err = check_tag(&"x".repeat(TAG_BYTES + 1))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("37 bytes") && err.contains("at most 36"),
            "{err}"
        );
        assert!(matches!(check_tag(""), Err(FsError::EmptyTag)));
    }

    #[test]
    fn a_missing_socket_is_a_connect_error_naming_it() {
        let err = Fs::new(FsConfig {
            tag: "gfs".into(),
            socket: "/nonexistent/crib-fs.sock".into(),
            request_queues: 1,
            queue_size: 128,
        })
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("/nonexistent/crib-fs.sock") && err.contains("virtiofsd"),
            "{err}"
        );
    }
}
