//! virtio-blk (virtio 1.2 §5.2): a disk backed by a host file or block device.
//!
//! - `device.rs`: [`Block`], its features and configuration space, activate/reset.
//! - `request.rs`: a descriptor chain to a typed request; pure, no I/O.
//! - `worker.rs`: `BlockWorker`, one thread per queue, owning its queue and I/O engine.
//! - `engine/`: host I/O behind a small trait: io_uring (`uring.rs`) or plain syscalls
//!   (`sync.rs`), chosen when a queue starts.
//! - `composite.rs`: [`CompositeDisk`], a read-only disk made of several files (a pod's
//!   image layers), served by `engine/composite.rs`.
//! - `metrics.rs`: [`BlockMetrics`], counters shared by the device's workers.
//!
//! Choices where the spec leaves room:
//! - **Serial (GET_ID).** The disk's `id` is the serial the guest reads (20 bytes,
//!   zero-padded). An `id` longer than 20 bytes is rejected by [`Block::new`] rather than
//!   truncated: two ids sharing a 20-byte prefix would otherwise become the same
//!   `/dev/disk/by-id` name in the guest.
//! - **Framing.** Requests use the layout every driver uses: a 16-byte header in its own
//!   device-readable descriptor, data descriptors, and a device-writable status descriptor
//!   last; the status goes into that descriptor's first byte.
//! - **seg_max** is `queue_size - 2` (header and status take two descriptors), capped at
//!   [`IOV_MAX`] because the host's `preadv`/`pwritev`/io_uring refuse more vectors.
//! - **Discard** is a hint (§5.2.6.2: the device MAY deallocate): a host that cannot punch
//!   holes still answers OK. **Write zeroes** MUST read back zeroes: it uses
//!   `FALLOC_FL_ZERO_RANGE`, falls back to `FALLOC_FL_PUNCH_HOLE`, else fails with IOERR.
//! - **O_DIRECT** (`direct`) passes guest buffers straight to the host: the host needs them
//!   aligned to its logical block size; a misaligned request fails with IOERR.

pub mod composite;
pub mod device;
mod engine;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod lock;
pub mod metrics;
mod request;
#[cfg(test)]
pub(crate) mod test_utils;
mod worker;

use std::io;
use std::path::PathBuf;

pub use composite::{CompositeDisk, CompositePart};
pub use device::{Block, BlockConfig, ConfigSpace, IoEngine};
pub use metrics::{BlockMetrics, BlockMetricsSnapshot};

use crate::rate_limiter::RateLimiterError;
pub use crate::rate_limiter::{RateLimitConfig, TokenBucketConfig};

/// Bytes in a virtio-blk sector, the unit of `capacity` and request offsets.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Queues when the user does not say.
pub const DEFAULT_QUEUES: u16 = 1;
/// Most queues a disk may have (each gets a thread).
pub const MAX_QUEUES: u16 = 64;
/// Queue size when the user does not say.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Smallest queue size: header, one data descriptor and status.
pub const MIN_QUEUE_SIZE: u16 = 4;
/// Largest split-queue size (virtio 1.2 §2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Length of the serial returned by GET_ID (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;
/// Most I/O vectors one host call takes (Linux `UIO_MAXIOV`).
pub const IOV_MAX: usize = 1024;

/// Errors of the block device's set-up and control.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {hint}")]
    Open {
        path: PathBuf,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the size of disk image {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "disk image {path} is in use: another VM holds a lock that excludes {mode} access \
         ({holders}); stop it, or give both readonly=on to share the image"
    )]
    Locked {
        path: PathBuf,
        mode: &'static str,
        holders: String,
    },
    #[error("cannot lock disk image {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path} is neither a regular file nor a block device")]
    NotADisk { path: PathBuf },
    #[error(
        "disk image {path} is {size} bytes, not a multiple of 512: resize it to whole sectors \
         (truncate -s)"
    )]
    UnalignedSize { path: PathBuf, size: u64 },
    #[error("queues={value} is out of range: use 1 to {max}")]
    QueueCount { value: u16, max: u16 },
    #[error("queue_size={value} is invalid: use a power of two from {min} to {max}")]
    QueueSize { value: u16, min: u16, max: u16 },
    #[error(
        "id={id:?} is {len} bytes: the virtio-blk serial holds at most {max}, use a shorter id"
    )]
    IdTooLong { id: String, len: usize, max: usize },
    #[error("invalid rate limit for disk {id}")]
    RateLimit {
        id: String,
        #[source]
        source: RateLimiterError,
    },
    #[error("disk {id} cannot take a rate-limit update: the worker of queue {queue} has stopped")]
    WorkerGone { id: String, queue: u16 },
    #[error("composite disk part {path} is {actual} bytes, not the {expected} expected: the layer file is truncated or was replaced; re-import or re-pull the image")]
    CompositePartSize {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("composite disk part {path} at offset {offset} is not aligned to 4096 bytes or overlaps the part before it")]
    CompositeLayout { path: PathBuf, offset: u64 },
    #[error("a composite disk needs at least one part")]
    CompositeEmpty,
}

/// `error: cause: cause...` for one log line (the error types keep causes in `source`).
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
