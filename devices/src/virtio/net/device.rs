//! The virtio-net device (virtio 1.2 §5.1): what the user gives ([`NetConfig`]), what the
//! driver reads (features, MAC, link status, queue pairs), and the life cycle. The tap is
//! attached when the device is built, so a bad `tap=` fails at start-up; `activate` sets
//! the tap's offloads from the driver's features and starts one
//! [`NetWorker`](super::worker::NetWorker) thread per queue pair; `reset` stops them.

use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::metrics::NetMetrics;
use super::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
use super::worker::{NetWorker, PairQueues, WorkerParams, WorkerQueue};
use super::{NetError, QUEUE_SIZE};
use crate::rate_limiter::RateLimitConfig;
use crate::virtio::{
    run_worker_setup, ActivateError, ActivatedQueue, GuestMemoryMmap, VirtioDevice,
    VirtioInterrupt, WorkerSetup,
};

/// Bytes of the configuration space the device serves: `mac`, `status`,
/// `max_virtqueue_pairs`.
const CONFIG_SPACE_BYTES: usize = 10;

/// A net device as the user describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The tap interface.
    pub tap: String,
    /// Create the tap if it does not exist (needs CAP_NET_ADMIN); else it must exist.
    pub create: bool,
    /// The guest's MAC; a random locally administered one if `None`.
    pub mac: Option<[u8; 6]>,
    /// Queue pairs, 1 to [`super::MAX_QUEUE_PAIRS`].
    pub queues: u16,
    pub rate_limit: RateLimitConfig,
}

struct WorkerHandle {
    kill: EventFd,
    thread: JoinHandle<()>,
}

/// A virtio-net device on a tap.
pub struct Net {
    config: NetConfig,
    tap: Tap,
    mac: [u8; 6],
    avail_features: u64,
    acked_features: u64,
    queue_sizes: Vec<u16>,
    metrics: Arc<NetMetrics>,
    workers: Vec<WorkerHandle>,
    worker_setup: Option<WorkerSetup>,
}

/// A random unicast, locally administered MAC.
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most `mac.len()` bytes into `mac`, valid for the call.
    let got = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if got != mac.len() as isize {
        // Unique enough for one host without entropy: the pid and the time.
        let seed = u64::from(std::process::id())
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
        mac.copy_from_slice(&seed.to_le_bytes()[..6]);
    }
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

impl Net {
    /// Attaches to the tap and builds the device. Errors name the option and the fix.
    pub fn new(config: NetConfig) -> Result<Self, NetError> {
        let tap = Tap::open(&config.tap, config.queues, config.create)?;
        Self::with_tap(config, tap)
    }

    /// Builds the device over an attached tap (or a stand-in in tests).
    pub fn with_tap(config: NetConfig, tap: Tap) -> Result<Self, NetError> {
        if !(1..=super::MAX_QUEUE_PAIRS).contains(&config.queues)
            || tap.queue_count() != usize::from(config.queues)
        {
            return Err(NetError::Queues(config.queues));
        }
        config
            .rate_limit
            .validate()
            .map_err(|source| NetError::RateLimiter {
                name: config.tap.clone(),
                source,
            })?;
        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_NET_F_MAC)
            | (1u64 << VIRTIO_NET_F_STATUS)
            | (1u64 << VIRTIO_NET_F_MRG_RXBUF)
            | (1u64 << VIRTIO_NET_F_CSUM)
            | (1u64 << VIRTIO_NET_F_HOST_TSO4)
            | (1u64 << VIRTIO_NET_F_HOST_TSO6)
            | (1u64 << VIRTIO_NET_F_GUEST_CSUM)
            | (1u64 << VIRTIO_NET_F_GUEST_TSO4)
            | (1u64 << VIRTIO_NET_F_GUEST_TSO6);
        let mut queue_count = 2 * usize::from(config.queues);
        if config.queues > 1 {
            avail_features |= (1u64 << VIRTIO_NET_F_CTRL_VQ) | (1u64 << VIRTIO_NET_F_MQ);
            queue_count += 1;
        }
        Ok(Self {
            mac: config.mac.unwrap_or_else(random_mac),
            config,
            tap,
            avail_features,
            acked_features: 0,
            queue_sizes: vec![QUEUE_SIZE; queue_count],
            metrics: Arc::new(NetMetrics::default()),
            workers: Vec::new(),
            worker_setup: None,
        })
    }

    /// The configuration the device was built from.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// The guest's MAC.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Runs `setup` first in every queue-pair worker thread (the VMM's seccomp filter).
    pub fn with_worker_setup(mut self, setup: WorkerSetup) -> Self {
        self.worker_setup = Some(setup);
        self
    }

    /// The device's counters, shared with its workers.
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1u64 << bit) != 0
    }

    /// Stops every worker and waits for them: afterwards no thread touches guest memory.
    fn stop_workers(&mut self) {
        for worker in self.workers.drain(..) {
            if let Err(e) = worker.kill.write(1) {
                tracing::error!(tap = %self.config.tap, error = %e, "cannot signal net worker to stop");
            }
            if worker.thread.join().is_err() {
                tracing::error!(tap = %self.config.tap, "net worker panicked");
            }
        }
    }

    /// The `TUN_F_*` offloads matching the driver's receive features.
    fn tap_offloads(&self) -> u32 {
        let mut flags = 0;
        if self.acked(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= TUN_F_CSUM;
            if self.acked(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= TUN_F_TSO4;
            }
            if self.acked(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= TUN_F_TSO6;
            }
        }
        flags
    }

    fn start_workers(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        let event_idx = self.acked(VIRTIO_RING_F_EVENT_IDX);
        let pairs = self.config.queues;
        let ctrl_index = 2 * pairs;
        let mut slots: Vec<Option<WorkerQueue>> = (0..=ctrl_index).map(|_| None).collect();
        let got = queues.len();
        for q in queues {
            let ActivatedQueue {
                index,
                mut queue,
                kick,
            } = q;
            queue.set_event_idx(event_idx);
            let slot = slots
                .get_mut(usize::from(index))
                .filter(|_| index < ctrl_index || self.acked(VIRTIO_NET_F_CTRL_VQ))
                .ok_or(ActivateError::InvalidQueue(index))?;
            *slot = Some(WorkerQueue { index, queue, kick });
        }
        let mut ctrl = slots.pop().flatten();
        let mut pairs_found = Vec::new();
        let mut iter = slots.into_iter();
        while let (Some(rx), Some(tx)) = (iter.next(), iter.next()) {
            match (rx, tx) {
                (Some(rx), Some(tx)) => pairs_found.push((rx, tx)),
                _ => break,
            }
        }
        if pairs_found.is_empty() {
            return Err(ActivateError::QueueCount { got, needed: 2 });
        }
        if let Err(e) = self.tap.set_offload(self.tap_offloads()) {
            tracing::warn!(tap = %self.config.tap, error = %e, "cannot set the tap's offloads; the guest gets plain frames");
        }
        for (pair, (rx, tx)) in pairs_found.into_iter().enumerate() {
            let kill = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?;
            let tap = self.tap.queue(pair).map_err(ActivateError::Worker)?;
            let params = WorkerParams {
                name: self.config.tap.clone(),
                mergeable: self.acked(VIRTIO_NET_F_MRG_RXBUF),
                max_pairs: pairs,
                rate_limit: self.config.rate_limit,
                metrics: self.metrics.clone(),
            };
            let worker = NetWorker::new(
                params,
                mem.clone(),
                interrupt.clone(),
                tap,
                PairQueues {
                    rx,
                    tx,
                    ctrl: if pair == 0 { ctrl.take() } else { None },
                },
                kill.try_clone().map_err(ActivateError::Worker)?,
            )
            .map_err(|e| ActivateError::Worker(io::Error::other(e)))?;
            let interrupt = interrupt.clone();
            let name = self.config.tap.clone();
            let setup = self.worker_setup.clone();
            let thread = std::thread::Builder::new()
                .name(format!("netq{pair}"))
                .spawn(move || {
                    if !run_worker_setup(setup.as_ref(), &format!("{name} queue pair {pair}")) {
                        interrupt.set_needs_reset();
                        return;
                    }
                    let run = std::panic::catch_unwind(AssertUnwindSafe(|| worker.run()));
                    if run.is_err() {
                        tracing::error!(tap = %name, pair, "net worker panicked; the device needs a reset");
                        interrupt.set_needs_reset();
                    }
                })
                .map_err(ActivateError::Worker)?;
            self.workers.push(WorkerHandle { kill, thread });
        }
        Ok(())
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
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
        let mut space = [0u8; CONFIG_SPACE_BYTES];
        space[..6].copy_from_slice(&self.mac);
        // The link is up as long as the device exists.
        space[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        space[8..10].copy_from_slice(&self.config.queues.to_le_bytes());
        data.fill(0);
        let Some(src) = usize::try_from(offset).ok().and_then(|o| space.get(o..)) else {
            return;
        };
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR's legacy cousin; ignored.
        tracing::debug!(tap = %self.config.tap, offset, len = data.len(), "ignored net config space write");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        self.stop_workers();
        for q in &queues {
            if !q.queue.is_valid(&mem) {
                return Err(ActivateError::InvalidQueue(q.index));
            }
        }
        let result = self.start_workers(mem, interrupt, queues);
        if result.is_err() {
            self.stop_workers();
        }
        result
    }

    fn reset(&mut self) {
        self.stop_workers();
        self.acked_features = 0;
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;

    use vm_memory::GuestAddress;

    use super::*;
    use crate::virtio::net::VNET_HDR_BYTES;
    use crate::virtio::vsock::test_utils::{guest_memory, wait_for, RecordingInterrupt, Ring};

    fn config(queues: u16) -> NetConfig {
        NetConfig {
            tap: "test0".into(),
            create: false,
            mac: Some([0x52, 0x54, 0, 1, 2, 3]),
            queues,
            rate_limit: RateLimitConfig::default(),
        }
    }

    /// A device over datagram sockets standing in for the tap; the host ends.
    fn device(queues: u16) -> (Net, Vec<UnixDatagram>) {
        let mut fds = Vec::new();
        let mut hosts = Vec::new();
        for _ in 0..queues {
            let (host, dev) = UnixDatagram::pair().unwrap();
            dev.set_nonblocking(true).unwrap();
            host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            fds.push(OwnedFd::from(dev));
            hosts.push(host);
        }
        let net = Net::with_tap(config(queues), Tap::from_fds("test0", fds)).unwrap();
        (net, hosts)
    }

    #[test]
    fn config_space_has_mac_link_up_and_pairs() {
        let (net, _hosts) = device(2);
        let mut data = [0u8; 10];
        net.read_config(0, &mut data);
        assert_eq!(&data[..6], &[0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(u16::from_le_bytes([data[6], data[7]]), 1);
        assert_eq!(u16::from_le_bytes([data[8], data[9]]), 2);
        // Two pairs and a control queue.
        assert_eq!(net.queue_max_sizes().len(), 5);
        assert_ne!(net.device_features() & (1 << VIRTIO_NET_F_MQ), 0);
        let (single, _hosts) = device(1);
        assert_eq!(single.queue_max_sizes().len(), 2);
        assert_eq!(single.device_features() & (1 << VIRTIO_NET_F_MQ), 0);
    }

    #[test]
    fn random_mac_is_unicast_and_local() {
        let mac = random_mac();
        assert_eq!(mac[0] & 0x03, 0x02);
    }

    #[test]
    fn activate_runs_a_worker_and_reset_stops_it() {
        let mem = guest_memory();
        let (mut net, hosts) = device(1);
        net.set_acked_features(net.device_features());
        let rx = Ring::new(&mem, 0, GuestAddress(0x1_0000), 0x1000);
        let mut tx = Ring::new(&mem, 1, GuestAddress(0x10_0000), 0x1000);
        let interrupt = RecordingInterrupt::new();
        let queue = |index, ring: &Ring<'_>| ActivatedQueue {
            index,
            queue: ring.queue(),
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        let tx_kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut tx_queue = queue(1, &tx);
        tx_queue.kick = tx_kick.try_clone().unwrap();
        net.activate(
            mem.clone(),
            interrupt.clone(),
            vec![queue(0, &rx), tx_queue],
        )
        .unwrap();

        let slot = tx.take_slot();
        let buf = tx.buffer(slot);
        vm_memory::Bytes::write_slice(&mem, &[0u8; VNET_HDR_BYTES + 60], buf).unwrap();
        tx.post(slot, &[(buf, (VNET_HDR_BYTES + 60) as u32, false)]);
        tx_kick.write(1).unwrap();
        let mut frame = [0u8; 2048];
        assert_eq!(hosts[0].recv(&mut frame).unwrap(), VNET_HDR_BYTES + 60);
        assert!(wait_for(|| tx.used_idx() == 1));

        net.reset();
        assert!(net.workers.is_empty());
        assert_eq!(net.metrics().snapshot().tx_frames, 1);
    }

    #[test]
    fn activate_without_a_pair_is_refused() {
        let mem = guest_memory();
        let (mut net, _hosts) = device(1);
        let rx = Ring::new(&mem, 0, GuestAddress(0x1_0000), 0x1000);
        let only_rx = vec![ActivatedQueue {
            index: 0,
            queue: rx.queue(),
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
        }];
        let err = net.activate(mem.clone(), RecordingInterrupt::new(), only_rx);
        assert!(matches!(err, Err(ActivateError::QueueCount { .. })));
    }
}
