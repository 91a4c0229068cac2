//! The virtio-vsock device (virtio 1.2 §5.10): what the user gives ([`VsockConfig`]), what
//! the driver reads (features, `guest_cid`), and the life cycle. The listener is bound when
//! the device is built, so a bad `socket=` fails at start-up; `activate` starts the one
//! [`VsockWorker`](super::worker::VsockWorker) thread and returns; `reset` stops it, which
//! closes every host connection. No queue work happens here.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::metrics::VsockMetrics;
use super::muxer::Muxer;
use super::worker::{VsockWorker, WorkerEvents, WorkerParams};
use super::{
    VsockError, EVENT_QUEUE, MAX_GUEST_CID, MIN_GUEST_CID, QUEUE_SIZE, RX_QUEUE, TX_QUEUE,
};
use crate::socket_path::SocketPathError;
use crate::virtio::{
    run_worker_setup, ActivateError, ActivatedQueue, GuestMemoryMmap, VirtioDevice,
    VirtioInterrupt, WorkerSetup,
};

/// Bytes of `struct virtio_vsock_config` (one le64, `guest_cid`).
const CONFIG_SPACE_BYTES: usize = 8;

/// A vsock device as the user describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID, [`MIN_GUEST_CID`] to [`MAX_GUEST_CID`].
    pub guest_cid: u64,
    /// Where host processes connect; guest connections to port P go to `<socket>_P`.
    pub socket: PathBuf,
}

struct WorkerHandle {
    kill: EventFd,
    thread: JoinHandle<()>,
}

/// A virtio-vsock device.
pub struct Vsock {
    config: VsockConfig,
    listener: UnixListener,
    /// Device and inode of the socket file we bound, to remove only our own on drop.
    socket_id: Option<(u64, u64)>,
    avail_features: u64,
    acked_features: u64,
    queue_sizes: [u16; 3],
    metrics: Arc<VsockMetrics>,
    worker: Option<WorkerHandle>,
    worker_setup: Option<WorkerSetup>,
}

impl Vsock {
    /// Validates the CID and listens on the socket path (removing a stale socket file
    /// there). Errors name the option and how to fix it.
    pub fn new(config: VsockConfig) -> Result<Self, VsockError> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&config.guest_cid) {
            return Err(VsockError::Cid {
                cid: config.guest_cid,
            });
        }
        let listener = listen(&config.socket)?;
        let socket_id = std::fs::symlink_metadata(&config.socket)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Ok(Self {
            config,
            listener,
            socket_id,
            avail_features: (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_RING_F_EVENT_IDX),
            acked_features: 0,
            queue_sizes: [QUEUE_SIZE; 3],
            metrics: Arc::new(VsockMetrics::default()),
            worker: None,
            worker_setup: None,
        })
    }

    /// Runs `setup` first in the worker thread (the VMM's seccomp filter).
    pub fn with_worker_setup(mut self, setup: WorkerSetup) -> Self {
        self.worker_setup = Some(setup);
        self
    }

    /// The configuration the device was built from.
    pub fn config(&self) -> &VsockConfig {
        &self.config
    }

    /// The device's counters, shared with its worker.
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.metrics.clone()
    }

    /// Stops the worker and waits for it: afterwards no thread touches guest memory, and
    /// every host connection is closed (the worker owned them).
    fn stop_worker(&mut self) {
        let Some(worker) = self.worker.take() else {
            return;
        };
        if let Err(e) = worker.kill.write(1) {
            tracing::error!(cid = self.config.guest_cid, error = %e, "cannot signal vsock worker to stop");
        }
        if worker.thread.join().is_err() {
            tracing::error!(cid = self.config.guest_cid, "vsock worker panicked");
        }
    }

    fn start_worker(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut rx = None;
        let mut tx = None;
        let mut event_kick = None;
        for q in queues {
            let ActivatedQueue {
                index,
                mut queue,
                kick,
            } = q;
            queue.set_event_idx(event_idx);
            match index {
                RX_QUEUE => rx = Some((queue, kick)),
                TX_QUEUE => tx = Some((queue, kick)),
                EVENT_QUEUE => event_kick = Some(kick),
                other => return Err(ActivateError::InvalidQueue(other)),
            }
        }
        let got = usize::from(rx.is_some())
            + usize::from(tx.is_some())
            + usize::from(event_kick.is_some());
        let (Some((rx, rx_kick)), Some((tx, tx_kick)), Some(event_kick)) = (rx, tx, event_kick)
        else {
            return Err(ActivateError::QueueCount { got, needed: 3 });
        };
        let kill = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let events = WorkerEvents {
            rx_kick,
            tx_kick,
            event_kick,
            kill: kill.try_clone().map_err(ActivateError::Worker)?,
        };
        let listener = self.listener.try_clone().map_err(ActivateError::Worker)?;
        let muxer = Muxer::new(
            self.config.guest_cid,
            self.config.socket.clone(),
            listener,
            self.metrics.clone(),
        );
        let params = WorkerParams {
            guest_cid: self.config.guest_cid,
            metrics: self.metrics.clone(),
        };
        let worker = VsockWorker::new(params, mem, interrupt.clone(), rx, tx, muxer, events)
            .map_err(|e| ActivateError::Worker(io::Error::other(e)))?;
        let cid = self.config.guest_cid;
        let setup = self.worker_setup.clone();
        let thread = std::thread::Builder::new()
            .name("vsock0".into())
            .spawn(move || {
                if !run_worker_setup(setup.as_ref(), "vsock worker") {
                    interrupt.set_needs_reset();
                    return;
                }
                let run = std::panic::catch_unwind(AssertUnwindSafe(|| worker.run()));
                if run.is_err() {
                    tracing::error!(cid, "vsock worker panicked; the device needs a reset");
                    interrupt.set_needs_reset();
                }
            })
            .map_err(ActivateError::Worker)?;
        self.worker = Some(WorkerHandle { kill, thread });
        Ok(())
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let space: [u8; CONFIG_SPACE_BYTES] = self.config.guest_cid.to_le_bytes();
        data.fill(0);
        let Some(src) = usize::try_from(offset).ok().and_then(|o| space.get(o..)) else {
            return;
        };
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // guest_cid is read-only for the driver.
        tracing::debug!(
            cid = self.config.guest_cid,
            offset,
            len = data.len(),
            "ignored vsock config space write"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        self.stop_worker();
        for q in &queues {
            if !q.queue.is_valid(&mem) {
                return Err(ActivateError::InvalidQueue(q.index));
            }
        }
        self.start_worker(mem, interrupt, queues)
    }

    fn reset(&mut self) {
        self.stop_worker();
        self.acked_features = 0;
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop_worker();
        // Remove the socket file if it is still the one we bound (not a successor's).
        let ours = std::fs::symlink_metadata(&self.config.socket)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.socket_id {
            let _ = std::fs::remove_file(&self.config.socket);
        }
    }
}

/// Binds a non-blocking listener at `path`, replacing a socket file nobody listens on.
fn listen(path: &Path) -> Result<UnixListener, VsockError> {
    crate::socket_path::claim(path).map_err(|e| match e {
        SocketPathError::NotASocket { path } => VsockError::NotASocket { path },
        SocketPathError::InUse { path } => VsockError::InUse { path },
        SocketPathError::Inspect { path, source } => VsockError::Inspect { path, source },
        SocketPathError::RemoveStale { path, source } => VsockError::RemoveStale { path, source },
    })?;
    let bind_error = |source| VsockError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use virtio_queue::Queue;

    use super::*;
    use crate::virtio::vsock::packet::Header;
    use crate::virtio::vsock::test_utils::{
        guest_header, guest_memory, temp_socket_path, wait_for, GuestDriver, RecordingInterrupt,
        GUEST_CID, TEST_QUEUE_SIZE,
    };
    use crate::virtio::vsock::{OP_REQUEST, OP_RESPONSE};

    fn config(name: &str) -> VsockConfig {
        VsockConfig {
            guest_cid: GUEST_CID,
            socket: temp_socket_path(name),
        }
    }

    #[test]
    fn new_reserved_cids_are_rejected() {
        for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
            let cfg = VsockConfig {
                guest_cid: cid,
                ..config("cid")
            };
            let err = Vsock::new(cfg).err().unwrap().to_string();
            assert!(
                err.contains(&format!("cid={cid}")) && err.contains("3 to"),
                "{err}"
            );
        }
    }

    #[test]
    fn new_path_that_is_not_a_socket_is_refused_and_kept() {
        let cfg = config("regular");
        std::fs::write(&cfg.socket, b"data").unwrap();

        let err = Vsock::new(cfg.clone()).err().unwrap();

        assert!(matches!(err, VsockError::NotASocket { .. }), "{err}");
        assert!(err.to_string().contains("socket="), "{err}");
        assert_eq!(std::fs::read(&cfg.socket).unwrap(), b"data");
        std::fs::remove_file(&cfg.socket).unwrap();
    }

    #[test]
    fn new_stale_socket_is_replaced() {
        let cfg = config("stale");
        drop(UnixListener::bind(&cfg.socket).unwrap());

        let dev = Vsock::new(cfg.clone()).unwrap();

        assert!(UnixStream::connect(&cfg.socket).is_ok());
        drop(dev);
    }

    #[test]
    fn new_socket_with_a_live_listener_is_refused() {
        let cfg = config("live");
        let _other = UnixListener::bind(&cfg.socket).unwrap();

        let err = Vsock::new(cfg.clone()).err().unwrap();

        assert!(matches!(err, VsockError::InUse { .. }), "{err}");
        std::fs::remove_file(&cfg.socket).unwrap();
    }

    #[test]
    fn new_in_missing_directory_names_path() {
        let cfg = VsockConfig {
            guest_cid: GUEST_CID,
            socket: PathBuf::from("/nonexistent/crib/v.sock"),
        };
        let err = Vsock::new(cfg).err().unwrap();
        assert!(matches!(err, VsockError::Bind { .. }), "{err}");
        assert!(
            err.to_string().contains("/nonexistent/crib/v.sock"),
            "{err}"
        );
    }

    #[test]
    fn drop_removes_socket_file() {
        let cfg = config("drop");
        let dev = Vsock::new(cfg.clone()).unwrap();
        drop(dev);
        assert!(!cfg.socket.exists());
    }

    #[test]
    fn features_are_version_1_and_event_idx_without_seqpacket() {
        let cfg = config("features");
        let dev = Vsock::new(cfg).unwrap();
        let want = (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_RING_F_EVENT_IDX);
        assert_eq!(dev.device_features(), want);
        assert_eq!(dev.device_type(), 19);
        assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE; 3]);
    }

    #[test]
    fn config_space_is_le64_guest_cid() {
        let cfg = VsockConfig {
            guest_cid: 0xfedc_ba98,
            ..config("config")
        };
        let dev = Vsock::new(cfg.clone()).unwrap();
        let mut all = [0xffu8; 8];
        let mut high = [0xffu8; 4];
        dev.read_config(0, &mut all);
        dev.read_config(4, &mut high);
        assert_eq!(u64::from_le_bytes(all), cfg.guest_cid);
        assert_eq!(high, [0; 4]);
    }

    #[test]
    fn config_space_read_past_end_is_zeroes() {
        let dev = Vsock::new(config("config-end")).unwrap();
        let mut data = [0xffu8; 4];
        dev.read_config(8, &mut data);
        assert_eq!(data, [0; 4]);
    }

    /// Activates `dev` on `driver`'s rings; returns the kick eventfds (rx, tx, event).
    fn activate(dev: &mut Vsock, mem: &GuestMemoryMmap, driver: &GuestDriver<'_>) -> [EventFd; 3] {
        let kicks = [(); 3].map(|()| EventFd::new(EFD_NONBLOCK).unwrap());
        let queues = [driver.rx.queue(), driver.tx.queue(), driver.event.queue()];
        let activated = queues
            .into_iter()
            .zip(&kicks)
            .enumerate()
            .map(|(i, (queue, kick))| ActivatedQueue {
                index: u16::try_from(i).unwrap(),
                queue,
                kick: kick.try_clone().unwrap(),
            })
            .collect();
        dev.set_acked_features(dev.device_features());
        dev.activate(mem.clone(), RecordingInterrupt::new(), activated)
            .unwrap();
        kicks
    }

    /// Plays the guest until a packet matching `pred` arrives.
    fn guest_receive(
        driver: &mut GuestDriver<'_>,
        kicks: &[EventFd; 3],
        pred: impl Fn(&Header) -> bool,
    ) -> Header {
        let mut found = None;
        assert!(wait_for(|| {
            driver.fill_rx();
            kicks[0].write(1).unwrap();
            driver.tx.take_used();
            found = driver.received().into_iter().map(|(h, _)| h).find(&pred);
            found.is_some()
        }));
        found.unwrap()
    }

    #[test]
    fn activate_without_event_queue_is_rejected() {
        let mem = guest_memory();
        let driver = GuestDriver::new(&mem);
        let mut dev = Vsock::new(config("two-queues")).unwrap();
        let activated = [driver.rx.queue(), driver.tx.queue()]
            .into_iter()
            .enumerate()
            .map(|(i, queue)| ActivatedQueue {
                index: u16::try_from(i).unwrap(),
                queue,
                kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            })
            .collect();

        let err = dev.activate(mem.clone(), RecordingInterrupt::new(), activated);

        assert!(matches!(
            err,
            Err(ActivateError::QueueCount { got: 2, needed: 3 })
        ));
    }

    #[test]
    fn activate_invalid_queue_is_rejected() {
        let mem = guest_memory();
        let mut dev = Vsock::new(config("invalid-queue")).unwrap();
        let queues = (0..3)
            .map(|index| ActivatedQueue {
                index,
                queue: Queue::new(TEST_QUEUE_SIZE).unwrap(),
                kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            })
            .collect();

        let err = dev.activate(mem.clone(), RecordingInterrupt::new(), queues);

        assert!(matches!(err, Err(ActivateError::InvalidQueue(0))));
    }

    #[test]
    fn activated_device_serves_host_connect_on_its_thread() {
        let mem = guest_memory();
        let mut driver = GuestDriver::new(&mem);
        let cfg = config("thread");
        let mut dev = Vsock::new(cfg.clone()).unwrap();
        let kicks = activate(&mut dev, &mem, &driver);
        let mut host = UnixStream::connect(&cfg.socket).unwrap();

        host.write_all(b"CONNECT 5000\n").unwrap();

        let req = guest_receive(&mut driver, &kicks, |p| p.op == OP_REQUEST);
        assert_eq!(req.dst_port, 5000);
        let named = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .any(|name| name.trim() == "vsock0");
        assert!(named);
    }

    #[test]
    fn reset_closes_every_host_socket_and_stops_the_worker() {
        let mem = guest_memory();
        let mut driver = GuestDriver::new(&mem);
        let cfg = config("reset");
        let mut dev = Vsock::new(cfg.clone()).unwrap();
        let kicks = activate(&mut dev, &mem, &driver);
        let mut hosts = Vec::new();
        for _ in 0..3 {
            let mut host = UnixStream::connect(&cfg.socket).unwrap();
            host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            host.write_all(b"CONNECT 5000\n").unwrap();
            let req = guest_receive(&mut driver, &kicks, |p| p.op == OP_REQUEST);
            driver.send(guest_header(OP_RESPONSE, 5000, req.src_port), &[]);
            kicks[1].write(1).unwrap();
            let mut line = vec![0u8; format!("OK {}\n", req.src_port).len()];
            host.read_exact(&mut line).unwrap();
            hosts.push(host);
        }

        dev.reset();

        assert!(dev.worker.is_none());
        assert_eq!(dev.acked_features, 0);
        for host in &mut hosts {
            let mut buf = [0u8; 16];
            assert_eq!(host.read(&mut buf).unwrap(), 0);
        }
    }

    #[test]
    fn reactivation_after_reset_serves_again() {
        let mem = guest_memory();
        let cfg = config("reactivate");
        let mut dev = Vsock::new(cfg.clone()).unwrap();
        let first = GuestDriver::new(&mem);
        let _kicks = activate(&mut dev, &mem, &first);
        dev.reset();
        let mem2 = guest_memory();
        let mut driver = GuestDriver::new(&mem2);
        let kicks = activate(&mut dev, &mem2, &driver);
        let mut host = UnixStream::connect(&cfg.socket).unwrap();

        host.write_all(b"CONNECT 6000\n").unwrap();

        let req = guest_receive(&mut driver, &kicks, |p| p.op == OP_REQUEST);
        assert_eq!(req.dst_port, 6000);
    }
}
