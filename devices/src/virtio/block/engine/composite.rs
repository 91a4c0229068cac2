//! The engine of a composite disk ([`CompositeDisk`]): reads run when queued, as in the
//! synchronous engine, each split at part boundaries into a `preadv` of the part's file or
//! zeroes for the gaps. The disk is read-only: writes, discards and write-zeroes fail with
//! EROFS (the device offers `VIRTIO_BLK_F_RO`, so a driver sends none); flush has nothing
//! to do.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vm_memory::{Address, Bytes};

use super::{
    advance_iovecs, build_iovecs, BlockEngine, Completion, EngineError, IoOp, IoVecs, QueueError,
};
use crate::virtio::block::composite::{CompositeDisk, Source};
use crate::virtio::block::request::ChainDescriptor;
use crate::virtio::GuestMemoryMmap;

/// Zeroes written into guest buffers for gaps, in chunks of this.
const ZEROES: [u8; 4096] = [0; 4096];

/// Runs reads of a composite disk inline.
pub(crate) struct CompositeEngine {
    disk: Arc<CompositeDisk>,
    mem: GuestMemoryMmap,
    iovecs: IoVecs,
    sub: Vec<ChainDescriptor>,
    done: Vec<Completion>,
    slots: usize,
}

impl CompositeEngine {
    pub fn new(disk: Arc<CompositeDisk>, mem: GuestMemoryMmap, slots: u16) -> Self {
        Self {
            disk,
            mem,
            iovecs: IoVecs::with_capacity(64),
            sub: Vec::with_capacity(64),
            done: Vec::with_capacity(usize::from(slots)),
            slots: usize::from(slots),
        }
    }

    fn read(
        &mut self,
        offset: u64,
        segments: &[ChainDescriptor],
    ) -> Result<Result<(), i32>, QueueError> {
        let total: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
        let Some(pieces) = self.disk.map(offset, total) else {
            return Ok(Err(libc::EIO));
        };
        for piece in pieces {
            sub_segments(segments, piece.skip, piece.len, &mut self.sub);
            let result = match piece.source {
                Source::Zero => self.zero_fill(),
                Source::Part { index, offset } => {
                    let Some(file) = self.disk.file(index) else {
                        return Ok(Err(libc::EIO));
                    };
                    let fd = file.as_raw_fd();
                    let sub = std::mem::take(&mut self.sub);
                    let result = self.read_file(fd, offset, &sub);
                    self.sub = sub;
                    result?
                }
            };
            if result.is_err() {
                return Ok(result);
            }
        }
        Ok(Ok(()))
    }

    /// Writes zeroes into the guest buffers of `self.sub`.
    fn zero_fill(&self) -> Result<(), i32> {
        for seg in &self.sub {
            let mut done = 0u64;
            let len = u64::from(seg.len);
            while done < len {
                let n = (len - done).min(ZEROES.len() as u64);
                let addr = seg.addr.checked_add(done).ok_or(libc::EFAULT)?;
                let bytes = ZEROES.get(..usize::try_from(n).unwrap_or(0)).unwrap_or(&[]);
                self.mem
                    .write_slice(bytes, addr)
                    .map_err(|_| libc::EFAULT)?;
                done += n;
            }
        }
        Ok(())
    }

    /// `preadv` of the whole of `segments` from `fd` at `offset`.
    fn read_file(
        &mut self,
        fd: RawFd,
        offset: u64,
        segments: &[ChainDescriptor],
    ) -> Result<Result<(), i32>, QueueError> {
        let total = build_iovecs(&self.mem, segments, &mut self.iovecs)?;
        let mut first = 0usize;
        let mut offset = offset;
        let mut remaining = total;
        while remaining > 0 {
            let iov = self.iovecs.0.get(first..).unwrap_or(&[]);
            let count = libc::c_int::try_from(iov.len()).unwrap_or(libc::c_int::MAX);
            let Ok(off) = libc::off_t::try_from(offset) else {
                return Ok(Err(libc::EINVAL));
            };
            // SAFETY: `iov` holds `count` vectors built by `build_iovecs` from this request's
            // device-writable descriptors; they point into guest memory kept mapped by
            // `self.mem` for the whole call, and the kernel writes only within them. `fd` is
            // a part's file, kept open by `self.disk`.
            let ret = unsafe { libc::preadv(fd, iov.as_ptr(), count, off) };
            if ret < 0 {
                let errno = std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO);
                if errno == libc::EINTR {
                    continue;
                }
                return Ok(Err(errno));
            }
            if ret == 0 {
                // The part shrank under us.
                return Ok(Err(libc::EIO));
            }
            let n = usize::try_from(ret).unwrap_or(0);
            advance_iovecs(&mut self.iovecs.0, &mut first, n);
            offset += n as u64;
            remaining = remaining.saturating_sub(n as u64);
        }
        Ok(Ok(()))
    }
}

/// Replaces `out` with the descriptors covering bytes `skip..skip + len` of `segments`.
pub(crate) fn sub_segments(
    segments: &[ChainDescriptor],
    skip: u64,
    len: u64,
    out: &mut Vec<ChainDescriptor>,
) {
    out.clear();
    let mut skip = skip;
    let mut left = len;
    for seg in segments {
        if left == 0 {
            break;
        }
        let seg_len = u64::from(seg.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let take = (seg_len - skip).min(left);
        let (Some(addr), Ok(take32)) = (seg.addr.checked_add(skip), u32::try_from(take)) else {
            return;
        };
        out.push(ChainDescriptor {
            addr,
            len: take32,
            write_only: seg.write_only,
        });
        skip = 0;
        left -= take;
    }
}

impl BlockEngine for CompositeEngine {
    fn queue(&mut self, slot: u16, op: &IoOp<'_>) -> Result<(), QueueError> {
        if self.done.len() >= self.slots {
            return Err(QueueError::Full);
        }
        let result = match *op {
            IoOp::Read { offset, segments } => self.read(offset, segments)?,
            IoOp::Flush => Ok(()),
            IoOp::Write { .. } | IoOp::Discard { .. } | IoOp::WriteZeroes { .. } => {
                Err(libc::EROFS)
            }
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
        "composite"
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Address, GuestAddress};

    use super::*;
    use crate::virtio::block::composite::CompositePart;
    use crate::virtio::block::test_utils::{guest_memory, DATA_ADDR};

    fn seg(addr: GuestAddress, len: u32) -> ChainDescriptor {
        ChainDescriptor {
            addr,
            len,
            write_only: true,
        }
    }

    #[test]
    fn sub_segments_cut_across_descriptors() {
        let segs = [
            seg(GuestAddress(0x1000), 100),
            seg(GuestAddress(0x2000), 100),
        ];
        let mut out = Vec::new();
        sub_segments(&segs, 50, 100, &mut out);
        assert_eq!(
            out,
            [seg(GuestAddress(0x1032), 50), seg(GuestAddress(0x2000), 50)]
        );
        sub_segments(&segs, 150, 10, &mut out);
        assert_eq!(out, [seg(GuestAddress(0x2032), 10)]);
    }

    #[test]
    fn read_across_parts_and_gap_gets_each_file_and_zeroes() {
        let dir = std::env::temp_dir();
        let a = dir.join(format!("crib-composite-eng-{}-a", std::process::id()));
        let b = dir.join(format!("crib-composite-eng-{}-b", std::process::id()));
        std::fs::write(&a, vec![0xaa; 5000]).unwrap();
        std::fs::write(&b, vec![0xbb; 4096]).unwrap();
        let disk = CompositeDisk::open(&[
            CompositePart {
                path: a.clone(),
                offset: 0,
                size: 5000,
            },
            CompositePart {
                path: b.clone(),
                offset: 8192,
                size: 4096,
            },
        ])
        .unwrap();
        let mem = guest_memory();
        mem.write_slice(&[0x55; 8192], DATA_ADDR).unwrap();
        let mut eng = CompositeEngine::new(Arc::new(disk), mem.clone(), 4);
        let segs = [
            seg(DATA_ADDR, 4096),
            seg(DATA_ADDR.unchecked_add(4096), 4096),
        ];
        eng.queue(
            1,
            &IoOp::Read {
                offset: 4096,
                segments: &segs,
            },
        )
        .unwrap();
        let write = [seg(DATA_ADDR, 512)];
        eng.queue(
            2,
            &IoOp::Write {
                offset: 0,
                segments: &write,
            },
        )
        .unwrap();
        let mut done = Vec::new();
        eng.reap(&mut done).unwrap();
        assert_eq!(
            done,
            [
                Completion {
                    slot: 1,
                    result: Ok(())
                },
                Completion {
                    slot: 2,
                    result: Err(libc::EROFS)
                }
            ]
        );
        let mut buf = vec![0u8; 8192];
        mem.read_slice(&mut buf, DATA_ADDR).unwrap();
        assert!(buf[..904].iter().all(|b| *b == 0xaa));
        assert!(buf[904..4096].iter().all(|b| *b == 0));
        assert!(buf[4096..].iter().all(|b| *b == 0xbb));

        let past_end = [seg(DATA_ADDR, 512)];
        eng.queue(
            3,
            &IoOp::Read {
                offset: 12288,
                segments: &past_end,
            },
        )
        .unwrap();
        eng.reap(&mut done).unwrap();
        assert_eq!(
            done.last(),
            Some(&Completion {
                slot: 3,
                result: Err(libc::EIO)
            })
        );
        std::fs::remove_file(a).unwrap();
        std::fs::remove_file(b).unwrap();
    }
}
