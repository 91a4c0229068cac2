//! The entry point of the `net_chains` fuzz target (feature `fuzzing`): one queue pair's
//! worker over queues a fuzzer set up, with a datagram socket standing in for the tap, run
//! for a few turns on the calling thread as kicks would.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::metrics::NetMetrics;
use super::worker::{NetWorker, PairQueues, WorkerParams, WorkerQueue};
use super::MAX_FRAME_BYTES;
use crate::rate_limiter::{RateLimitConfig, TokenBucketConfig};
use crate::virtio::{GuestMemoryMmap, VirtioInterrupt, VirtioInterruptType};

/// Queue pairs the fuzzed device claims (for the control queue's `VQ_PAIRS_SET`).
pub const MAX_PAIRS: u16 = 2;

/// How the worker is set up.
#[derive(Clone, Copy, Debug)]
pub struct NetSetup {
    /// `VIRTIO_NET_F_MRG_RXBUF` negotiated.
    pub mergeable: bool,
    /// A small bandwidth limit both ways, so frames wait for the limiter.
    pub rate_limited: bool,
    /// Worker turns after the first (each as if both queues were kicked).
    pub turns: u8,
}

/// What one run did.
#[derive(Debug)]
pub struct NetOutcome {
    /// The worker found a queue broken (it would set DEVICE_NEEDS_RESET).
    pub broken: bool,
    /// Lengths of the frames the guest sent to the tap.
    pub tap_frames: Vec<usize>,
}

#[derive(Default)]
struct NoInterrupt {
    needs_reset: AtomicBool,
}

impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _kind: VirtioInterruptType) -> std::io::Result<()> {
        Ok(())
    }

    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::Relaxed);
    }
}

/// Writes `frames` to the tap, then runs a worker on `rx`, `tx` and `ctrl` (set up by the
/// caller over `mem`) for `setup.turns + 1` turns; returns what reached the tap.
pub fn run_pair(
    mem: &GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    ctrl: Option<Queue>,
    frames: &[Vec<u8>],
    setup: NetSetup,
) -> NetOutcome {
    let (host, device) = UnixDatagram::pair().expect("socketpair");
    let _ = device.set_nonblocking(true);
    let _ = host.set_nonblocking(true);
    for frame in frames {
        let _ = host.send(frame);
    }
    let bucket = TokenBucketConfig {
        size: 4096,
        one_time_burst: 0,
        refill_time_ms: 1000,
    };
    let rate_limit = RateLimitConfig {
        bandwidth: setup.rate_limited.then_some(bucket),
        ops: None,
    };
    let params = WorkerParams {
        name: "fuzz0".into(),
        mergeable: setup.mergeable,
        max_pairs: MAX_PAIRS,
        rate_limit,
        metrics: Arc::new(NetMetrics::default()),
    };
    let kick = || EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let (rx_kick, tx_kick, ctrl_kick) = (kick(), kick(), kick());
    let clone = |fd: &EventFd| fd.try_clone().expect("eventfd");
    let queues = PairQueues {
        rx: WorkerQueue {
            index: 0,
            queue: rx,
            kick: clone(&rx_kick),
        },
        tx: WorkerQueue {
            index: 1,
            queue: tx,
            kick: clone(&tx_kick),
        },
        ctrl: ctrl.map(|queue| WorkerQueue {
            index: 2 * MAX_PAIRS,
            queue,
            kick: clone(&ctrl_kick),
        }),
    };
    let interrupt = Arc::new(NoInterrupt::default());
    let broken = match NetWorker::new(
        params,
        mem.clone(),
        interrupt,
        OwnedFd::from(device),
        queues,
        kick(),
    ) {
        Ok(mut worker) => {
            let mut result = worker.start();
            for _ in 0..setup.turns {
                if result.is_err() {
                    break;
                }
                for fd in [&rx_kick, &tx_kick, &ctrl_kick] {
                    let _ = fd.write(1);
                }
                result = worker.turn(Some(Duration::ZERO)).map(|_| ());
            }
            result.is_err()
        }
        Err(_) => true,
    };
    let mut tap_frames = Vec::new();
    let mut buf = vec![0u8; MAX_FRAME_BYTES + 64];
    while let Ok(n) = host.recv(&mut buf) {
        tap_frames.push(n);
    }
    NetOutcome { broken, tap_frames }
}
