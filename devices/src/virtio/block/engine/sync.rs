//! The synchronous engine: each operation runs when it is queued, with `preadv`, `pwritev`,
//! `fdatasync` and `fallocate`, and its completion is ready at once. The fallback when the
//! host has no io_uring, and the engine of the fuzz target.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use super::{
    advance_iovecs, build_iovecs, BlockEngine, Completion, EngineError, IoOp, IoVecs, QueueError,
    FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE,
};
use crate::virtio::block::request::ChainDescriptor;
use crate::virtio::GuestMemoryMmap;

/// Runs operations inline.
pub(crate) struct SyncEngine {
    file: Arc<File>,
    mem: GuestMemoryMmap,
    iovecs: IoVecs,
    done: Vec<Completion>,
    slots: usize,
}

impl SyncEngine {
    /// An engine for a queue with `slots` in-flight entries.
    pub fn new(file: Arc<File>, mem: GuestMemoryMmap, slots: u16) -> Self {
        Self {
            file,
            mem,
            iovecs: IoVecs::with_capacity(64),
            done: Vec::with_capacity(usize::from(slots)),
            slots: usize::from(slots),
        }
    }

    fn transfer(
        &mut self,
        write: bool,
        offset: u64,
        segments: &[ChainDescriptor],
    ) -> Result<Result<(), i32>, QueueError> {
        let total = build_iovecs(&self.mem, segments, &mut self.iovecs)?;
        let fd = self.file.as_raw_fd();
        let mut first = 0usize;
        let mut offset = offset;
        let mut remaining = total;
        while remaining > 0 {
            let iov = &self.iovecs.0[first..];
            let count = libc::c_int::try_from(iov.len()).unwrap_or(libc::c_int::MAX);
            let Ok(off) = libc::off_t::try_from(offset) else {
                return Ok(Err(libc::EINVAL));
            };
            let ret = if write {
                // SAFETY: `iov` holds `count` vectors built by `build_iovecs` from this
                // request's descriptors; they point into guest memory kept mapped by
                // `self.mem` for the whole call. `fd` is the open disk, owned by `self.file`.
                unsafe { libc::pwritev(fd, iov.as_ptr(), count, off) }
            } else {
                // SAFETY: as for `pwritev`; the kernel writes only within the vectors, which
                // cover device-writable guest buffers.
                unsafe { libc::preadv(fd, iov.as_ptr(), count, off) }
            };
            if ret < 0 {
                let errno = last_errno();
                if errno == libc::EINTR {
                    continue;
                }
                return Ok(Err(errno));
            }
            if ret == 0 {
                // The disk ended early (the file shrank under us).
                return Ok(Err(libc::EIO));
            }
            let n = usize::try_from(ret).unwrap_or(0);
            advance_iovecs(&mut self.iovecs.0, &mut first, n);
            offset += n as u64;
            remaining = remaining.saturating_sub(n as u64);
        }
        Ok(Ok(()))
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> Result<(), i32> {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(libc::EINVAL);
        };
        loop {
            // SAFETY: fallocate on the disk's descriptor (owned by `self.file`); it takes no
            // pointers and only changes the file's allocation.
            let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
            if ret == 0 {
                return Ok(());
            }
            let errno = last_errno();
            if errno != libc::EINTR {
                return Err(errno);
            }
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), i32> {
        let (preferred, fallback) = if unmap {
            (FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE)
        } else {
            (FALLOC_ZERO_RANGE, FALLOC_PUNCH_HOLE)
        };
        match self.fallocate(preferred, offset, len) {
            Err(libc::EOPNOTSUPP) => self.fallocate(fallback, offset, len),
            other => other,
        }
    }
}

impl BlockEngine for SyncEngine {
    fn queue(&mut self, slot: u16, op: &IoOp<'_>) -> Result<(), QueueError> {
        if self.done.len() >= self.slots {
            return Err(QueueError::Full);
        }
        let result = match *op {
            IoOp::Read { offset, segments } => self.transfer(false, offset, segments)?,
            IoOp::Write { offset, segments } => self.transfer(true, offset, segments)?,
            IoOp::Flush => self.file.sync_data().map_err(|e| errno_of(&e)),
            IoOp::Discard { offset, len } => match self.fallocate(FALLOC_PUNCH_HOLE, offset, len) {
                // Discard is a hint: a host that cannot deallocate has done its part.
                Err(libc::EOPNOTSUPP) => Ok(()),
                other => other,
            },
            IoOp::WriteZeroes { offset, len, unmap } => self.write_zeroes(offset, len, unmap),
        };
        self.done.push(Completion { slot, result });
        Ok(())
    }

    fn submit(&mut self) -> Result<(), EngineError> {
        Ok(())
    }

    fn reap(&mut self, done: &mut Vec<Completion>) -> Result<(), EngineError> {
        done.append(&mut self.done);
        Ok(())
    }

    fn drain(&mut self, done: &mut Vec<Completion>) -> Result<(), EngineError> {
        self.reap(done)
    }

    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn name(&self) -> &'static str {
        "sync"
    }
}

fn last_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::block::test_utils::{guest_memory, TempDisk, DATA_ADDR};

    fn engine(disk: &TempDisk) -> (SyncEngine, GuestMemoryMmap) {
        let mem = guest_memory();
        (SyncEngine::new(Arc::new(disk.open()), mem.clone(), 4), mem)
    }

    fn seg(addr: GuestAddress, len: u32) -> ChainDescriptor {
        ChainDescriptor {
            addr,
            len,
            write_only: true,
        }
    }

    #[test]
    fn sync_read_fills_guest_buffer() {
        let disk = TempDisk::new(8192);
        let (mut eng, mem) = engine(&disk);
        let segs = [seg(DATA_ADDR, 512)];
        eng.queue(
            3,
            &IoOp::Read {
                offset: 1024,
                segments: &segs,
            },
        )
        .unwrap();
        let mut done = Vec::new();
        eng.reap(&mut done).unwrap();
        let mut buf = [0u8; 512];
        mem.read_slice(&mut buf, DATA_ADDR).unwrap();
        assert_eq!(
            done,
            vec![Completion {
                slot: 3,
                result: Ok(())
            }]
        );
        assert_eq!(buf[0], TempDisk::pattern(1024));
    }

    #[test]
    fn sync_write_reaches_file() {
        let disk = TempDisk::new(8192);
        let (mut eng, mem) = engine(&disk);
        mem.write_slice(&[0xab; 512], DATA_ADDR).unwrap();
        let segs = [seg(DATA_ADDR, 512)];
        eng.queue(
            0,
            &IoOp::Write {
                offset: 512,
                segments: &segs,
            },
        )
        .unwrap();
        assert_eq!(disk.read_at(512, 512), vec![0xab; 512]);
    }

    #[test]
    fn sync_read_past_end_of_file_is_eio() {
        let disk = TempDisk::new(512);
        let (mut eng, _mem) = engine(&disk);
        let segs = [seg(DATA_ADDR, 512)];
        eng.queue(
            0,
            &IoOp::Read {
                offset: 512,
                segments: &segs,
            },
        )
        .unwrap();
        let mut done = Vec::new();
        eng.reap(&mut done).unwrap();
        assert_eq!(done[0].result, Err(libc::EIO));
    }

    #[test]
    fn sync_write_zeroes_reads_back_zeroes() {
        let disk = TempDisk::new(8192);
        let (mut eng, _mem) = engine(&disk);
        eng.queue(
            0,
            &IoOp::WriteZeroes {
                offset: 4096,
                len: 4096,
                unmap: false,
            },
        )
        .unwrap();
        assert_eq!(disk.read_at(4096, 4096), vec![0; 4096]);
    }

    #[test]
    fn sync_queue_beyond_slots_is_full() {
        let disk = TempDisk::new(8192);
        let mem = guest_memory();
        let mut eng = SyncEngine::new(Arc::new(disk.open()), mem, 1);
        eng.queue(0, &IoOp::Flush).unwrap();
        assert!(matches!(eng.queue(1, &IoOp::Flush), Err(QueueError::Full)));
    }
}
