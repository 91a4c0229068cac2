//! Host I/O for the block device behind a small trait, one engine per queue.
//!
//! A worker queues operations tagged with a slot of its in-flight table, submits them in one
//! go, and reaps completions. [`uring::UringEngine`] queues into an io_uring submission ring
//! and signals completions on an eventfd; [`sync::SyncEngine`] performs each operation when it
//! is queued and has its completion ready at once.
//!
//! Data buffers are guest memory: both engines translate the chain's data descriptors into
//! `iovec`s with [`GuestMemoryBackend::get_slices`] (a descriptor may cross regions), and keep
//! a clone of the guest memory so the mappings outlive every operation in flight.

pub(crate) mod composite;
pub(crate) mod sync;
pub(crate) mod uring;

use std::io;
use std::os::fd::RawFd;

use vm_memory::{GuestMemoryBackend, GuestMemoryError};

use super::request::ChainDescriptor;
use super::IOV_MAX;
use crate::virtio::GuestMemoryMmap;

/// One host operation; offsets and lengths in bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum IoOp<'a> {
    /// Read the disk into the (device-writable) segments.
    Read {
        offset: u64,
        segments: &'a [ChainDescriptor],
    },
    /// Write the segments to the disk.
    Write {
        offset: u64,
        segments: &'a [ChainDescriptor],
    },
    /// Make every write that completed before it durable (`fdatasync`).
    Flush,
    /// Deallocate a range (a hint; zeroes are not promised).
    Discard { offset: u64, len: u64 },
    /// Make a range read back as zeroes; `unmap` allows deallocating it.
    WriteZeroes { offset: u64, len: u64, unmap: bool },
}

/// A finished operation: `Err` holds the errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Completion {
    pub slot: u16,
    pub result: Result<(), i32>,
}

/// Why an operation could not be queued; the request, not the engine, is at fault, except
/// for `Full`, after which the worker retries later.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QueueError {
    #[error("guest buffer at {addr:#x} ({len} bytes) is not in guest memory")]
    GuestMemory {
        addr: u64,
        len: u32,
        #[source]
        source: GuestMemoryError,
    },
    #[error("the request needs more than {max} I/O vectors")]
    TooManyVectors { max: usize },
    #[error("no room for the operation until completions are reaped")]
    Full,
}

/// An engine failure that stops the queue (the device then needs a reset).
#[derive(Debug, thiserror::Error)]
pub(crate) enum EngineError {
    #[error("cannot create an io_uring of {entries} entries")]
    Setup {
        entries: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot register the io_uring completion eventfd")]
    RegisterEventFd(#[source] io::Error),
    #[error("cannot create the completion eventfd")]
    EventFd(#[source] io::Error),
    #[error("io_uring submission failed")]
    Submit(#[source] io::Error),
    #[error("io_uring completion for unknown slot {0}")]
    UnknownSlot(u64),
}

/// Host I/O for one queue.
pub(crate) trait BlockEngine: Send {
    /// Queues `op` for `slot` (not yet started for io_uring). The slot must be free: its
    /// previous operation was reaped.
    fn queue(&mut self, slot: u16, op: &IoOp<'_>) -> Result<(), QueueError>;

    /// Starts everything queued, in one system call where the engine can.
    fn submit(&mut self) -> Result<(), EngineError>;

    /// Appends finished operations to `done` without waiting.
    fn reap(&mut self, done: &mut Vec<Completion>) -> Result<(), EngineError>;

    /// Waits for every operation in flight and appends them to `done`.
    fn drain(&mut self, done: &mut Vec<Completion>) -> Result<(), EngineError>;

    /// Readable when completions are ready; `None` when they are ready right after `submit`.
    fn completion_fd(&self) -> Option<RawFd>;

    /// Whether finished operations wait to be reaped, checked without a system call (the
    /// worker polls this before it sleeps). Engines without such a view say false.
    fn completions_ready(&mut self) -> bool {
        false
    }

    /// Operations queued or running, not yet reaped.
    fn in_flight(&self) -> usize;

    /// A short name for logs.
    fn name(&self) -> &'static str;
}

/// I/O vectors pointing into guest memory, reused across requests.
#[derive(Debug, Default)]
pub(crate) struct IoVecs(pub Vec<libc::iovec>);

// SAFETY: the vectors are plain (pointer, length) pairs into guest memory mappings, which
// are shared with the guest and with other threads anyway; nothing about them is tied to
// the thread that built them. Whoever dereferences them (the kernel, through an engine)
// keeps the mappings alive (see `build_iovecs`).
unsafe impl Send for IoVecs {}

impl IoVecs {
    pub fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }
}

/// Replaces `iovecs` with the host buffers of `segments`, merging neighbours that are
/// contiguous in the host. Returns the total length.
///
/// The pointers stay valid while the regions of `mem` are mapped: callers keep a clone of
/// the memory for as long as the vectors are in use.
pub(crate) fn build_iovecs(
    mem: &GuestMemoryMmap,
    segments: &[ChainDescriptor],
    iovecs: &mut IoVecs,
) -> Result<u64, QueueError> {
    let iovecs = &mut iovecs.0;
    iovecs.clear();
    let mut total = 0u64;
    for seg in segments {
        let len = usize::try_from(seg.len).unwrap_or(usize::MAX);
        for slice in GuestMemoryBackend::get_slices(mem, seg.addr, len) {
            let slice = slice.map_err(|source| QueueError::GuestMemory {
                addr: seg.addr.0,
                len: seg.len,
                source,
            })?;
            let base = slice.ptr_guard_mut().as_ptr();
            let slen = slice.len();
            total += slen as u64;
            if let Some(last) = iovecs.last_mut() {
                if last.iov_base.cast::<u8>().wrapping_add(last.iov_len) == base {
                    last.iov_len += slen;
                    continue;
                }
            }
            if iovecs.len() == IOV_MAX {
                return Err(QueueError::TooManyVectors { max: IOV_MAX });
            }
            iovecs.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: slen,
            });
        }
    }
    Ok(total)
}

/// Drops the first `n` bytes from `iovecs[*first..]` after a short transfer.
pub(crate) fn advance_iovecs(iovecs: &mut [libc::iovec], first: &mut usize, mut n: usize) {
    while n > 0 {
        let Some(iov) = iovecs.get_mut(*first) else {
            return;
        };
        if n >= iov.iov_len {
            n -= iov.iov_len;
            *first += 1;
        } else {
            iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(n).cast();
            iov.iov_len -= n;
            n = 0;
        }
    }
}

/// `fallocate` modes (linux/falloc.h), as the kernel takes them.
pub(crate) const FALLOC_PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
pub(crate) const FALLOC_ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;

    fn desc(addr: u64, len: u32) -> ChainDescriptor {
        ChainDescriptor {
            addr: GuestAddress(addr),
            len,
            write_only: true,
        }
    }

    #[test]
    fn build_iovecs_merges_contiguous_segments() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut iovecs = IoVecs::default();
        let total =
            build_iovecs(&mem, &[desc(0x1000, 512), desc(0x1200, 512)], &mut iovecs).unwrap();
        assert_eq!(
            (total, iovecs.0.len(), iovecs.0[0].iov_len),
            (1024, 1, 1024)
        );
    }

    #[test]
    fn build_iovecs_splits_at_region_boundary() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let mut iovecs = IoVecs::default();
        let total = build_iovecs(&mem, &[desc(0x800, 0x1000)], &mut iovecs).unwrap();
        assert_eq!((total, iovecs.0.len()), (0x1000, 2));
    }

    #[test]
    fn build_iovecs_outside_memory_is_guest_error() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let err = build_iovecs(&mem, &[desc(0xf00, 0x200)], &mut IoVecs::default()).unwrap_err();
        assert!(matches!(err, QueueError::GuestMemory { addr: 0xf00, .. }));
    }

    #[test]
    fn advance_iovecs_skips_whole_and_partial_vectors() {
        let mut buf = [0u8; 64];
        let base = buf.as_mut_ptr();
        let mut iovecs = [
            libc::iovec {
                iov_base: base.cast(),
                iov_len: 16,
            },
            libc::iovec {
                iov_base: base.wrapping_add(16).cast(),
                iov_len: 48,
            },
        ];
        let mut first = 0;
        advance_iovecs(&mut iovecs, &mut first, 20);
        assert_eq!((first, iovecs[1].iov_len), (1, 44));
        assert_eq!(iovecs[1].iov_base.cast::<u8>(), base.wrapping_add(20));
    }
}
