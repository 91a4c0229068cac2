//! The contract between a virtio device model and its transport (virtio 1.2 §2-§4).
//!
//! A device knows its features, its configuration space and how to process its queues;
//! the transport (virtio-pci) owns feature negotiation, queue set-up, notifications and
//! interrupts. Neither knows KVM: queue kicks arrive as eventfds (ioeventfds in the VMM)
//! and interrupts leave through [`VirtioInterrupt`] (MSI-X irqfds in the VMM).

pub mod block;
pub mod fs;
pub mod net;
pub mod rng;
pub mod transport;
pub mod vsock;

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as devices see it: the one alias of the crate.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap;

/// What a device worker thread runs first, before it touches a queue: the VMM narrows the
/// thread's seccomp filter there. A failure stops the worker (the device needs a reset).
pub type WorkerSetup = Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>;

/// Runs `setup`, if any, in a worker thread; false (logged) if the worker must not run.
pub(crate) fn run_worker_setup(setup: Option<&WorkerSetup>, worker: &str) -> bool {
    match setup.map(|setup| setup()) {
        Some(Err(e)) => {
            tracing::error!(
                "{worker}: cannot set up the worker thread, the device needs a reset: {e}"
            );
            false
        }
        _ => true,
    }
}

/// The interrupt a device raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioInterruptType {
    /// The configuration space changed (or the device needs a reset).
    Config,
    /// Queue `n` has new used buffers.
    Queue(u16),
}

/// How a device reaches the driver; implemented by the transport.
pub trait VirtioInterrupt: Send + Sync {
    /// Raises `kind`; an error means the host could not signal (a full eventfd, say).
    fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()>;

    /// Marks the device broken for the driver (status DEVICE_NEEDS_RESET, virtio 1.2
    /// §2.1.2) and raises a configuration interrupt. For host faults, never for guest
    /// mistakes, which complete their request with an error status instead.
    fn set_needs_reset(&self);

    /// The eventfd that raises `kind` with no help from the host: a clone of the irqfd of
    /// the MSI-X vector the driver chose, for devices whose queues another process serves
    /// (vhost-user's call fd). `None` when there is no such fd (no vector assigned, or a
    /// transport without irqfds): the device must then call [`Self::trigger`] itself.
    /// Valid until the driver reprograms vectors, i.e. for one activation.
    fn notifier(&self, _kind: VirtioInterruptType) -> Option<EventFd> {
        None
    }
}

/// A queue the driver enabled, handed to the device at activation.
pub struct ActivatedQueue {
    /// The queue's index in the device.
    pub index: u16,
    /// The queue, set up by the driver (addresses, size, ready).
    pub queue: Queue,
    /// Becomes readable when the driver notifies the queue (a clone of the transport's).
    pub kick: EventFd,
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not valid: bad size or ring addresses outside guest memory")]
    InvalidQueue(u16),
    #[error("the driver enabled {got} queues; the device needs at least {needed}")]
    QueueCount { got: usize, needed: usize },
    #[error("cannot start the device's worker")]
    Worker(#[source] std::io::Error),
    #[error("the device's backend refused the set-up: {0}")]
    Backend(String),
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// The virtio device id (virtio 1.2 §5), e.g. 2 for block.
    fn device_type(&self) -> u32;

    /// The largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Features the device offers, including the transport bits it supports
    /// (`VIRTIO_F_VERSION_1`, `VIRTIO_RING_F_EVENT_IDX`, ...).
    fn device_features(&self) -> u64;

    /// The features the driver accepted (a subset of [`Self::device_features`]).
    fn set_acked_features(&mut self, features: u64);

    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device-specific configuration space; most devices ignore writes.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// Starts processing `queues` (the driver set DRIVER_OK). Runs on a vCPU thread: move
    /// the work to the device's own thread(s) and return.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError>;

    /// Stops all queue processing (the driver wrote status 0) and forgets the negotiated
    /// state; in-flight requests are completed or drained first, so no I/O touches guest
    /// memory after this returns. The kick eventfds were clones: the transport keeps its own.
    fn reset(&mut self);
}
