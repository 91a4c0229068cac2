//! virtio-rng, the entropy device (virtio 1.2 §5.4): the driver posts device-writable
//! buffers on its one queue and the device fills them with random bytes from the host's
//! `getrandom`, behind a token-bucket rate limit (bytes and requests), so one guest cannot
//! drain the host's pool or spin a host core.
//!
//! - `device.rs`: [`Rng`], its features (no device-specific ones, no configuration
//!   space), activate/reset and the worker thread's lifetime.
//! - `worker.rs`: `RngWorker`: one chain to one filled buffer ([`RngWorker::process_queue`],
//!   testable with plain memory and a fake [`EntropySource`]) and the thread's poll loop
//!   over the queue kick, the limiter's timer and the kill eventfd.
//! - `metrics.rs`: [`RngMetrics`], counters shared with the VMM.
//!
//! Choices where the spec leaves room:
//! - A chain's driver-readable descriptors are skipped ("The driver MUST NOT place
//!   driver-readable buffers into the queue"); a chain with no writable byte completes
//!   with length 0 and counts as a bad chain.
//! - A request gets at most [`MAX_REQUEST_BYTES`]; the used length says how many bytes
//!   were written, which the spec lets be fewer than offered.

pub mod device;
pub mod metrics;
mod worker;

pub use device::{Rng, RngConfig};
pub use metrics::{RngMetrics, RngMetricsSnapshot};
pub use worker::{EntropySource, HostEntropy};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes one request gets (Linux's hw_random core asks for at most a page or so).
pub const MAX_REQUEST_BYTES: u32 = 64 << 10;
/// Default rate limit of a VM's entropy device: enough for any boot (the kernel reads a
/// few hundred bytes) while one guest cannot take more than this from the host's pool.
pub const DEFAULT_BYTES_PER_SEC: u64 = 1 << 20;

/// Why the worker stopped serving the queue (a host fault; the device then needs a reset).
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("request queue")]
    Queue(#[source] virtio_queue::Error),
    #[error("the host's getrandom failed")]
    Entropy(#[source] std::io::Error),
    #[error("rate limiter")]
    RateLimiter(#[source] crate::rate_limiter::RateLimiterError),
    #[error("cannot wait for the queue's events")]
    Poll(#[source] std::io::Error),
}
