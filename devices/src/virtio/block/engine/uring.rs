//! The io_uring engine: one ring per queue, sized to the queue, completions signalled on an
//! eventfd registered with the ring (`register_eventfd`).
//!
//! Reads and writes are `readv`/`writev` over vectors into guest memory, held in the slot of
//! the in-flight table until the completion is reaped. A short transfer is resubmitted for
//! the rest. FLUSH carries `IOSQE_IO_DRAIN`: it starts only after every operation submitted
//! before it has completed, so it covers every earlier write of the queue. Dropping the
//! engine waits for everything in flight, so no I/O lands in guest memory afterwards.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    advance_iovecs, build_iovecs, BlockEngine, Completion, EngineError, IoOp, IoVecs, QueueError,
    FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE,
};
use crate::virtio::GuestMemoryMmap;

/// How often a busy ring (EAGAIN/EBUSY from `io_uring_enter`) is retried before giving up.
const SUBMIT_RETRIES: u32 = 100;
const SUBMIT_RETRY_DELAY: Duration = Duration::from_millis(1);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum SlotOp {
    #[default]
    Read,
    Write,
    Flush,
    Discard,
    /// `mode` is the fallocate mode in use; `fallback` the one to try on EOPNOTSUPP.
    WriteZeroes {
        mode: i32,
        fallback: Option<i32>,
    },
}

/// One entry of the in-flight table.
#[derive(Debug, Default)]
struct Slot {
    busy: bool,
    op: SlotOp,
    iovecs: IoVecs,
    /// First vector not yet transferred (after short transfers).
    first: usize,
    offset: u64,
    /// Bytes left to transfer (reads, writes) or the range length (fallocate).
    remaining: u64,
}

enum Outcome {
    Done(Result<(), i32>),
    Again,
}

/// io_uring host I/O for one queue.
pub(crate) struct UringEngine {
    ring: IoUring,
    file: Arc<File>,
    mem: GuestMemoryMmap,
    slots: Vec<Slot>,
    in_flight: usize,
    queued: usize,
    eventfd: EventFd,
}

impl UringEngine {
    /// A ring of `entries` (the queue size, a power of two) for `file`.
    pub fn new(file: Arc<File>, mem: GuestMemoryMmap, entries: u16) -> Result<Self, EngineError> {
        let entries = u32::from(entries);
        let ring =
            IoUring::new(entries).map_err(|source| EngineError::Setup { entries, source })?;
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(EngineError::EventFd)?;
        ring.submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(EngineError::RegisterEventFd)?;
        let slots = (0..entries).map(|_| Slot::default()).collect();
        Ok(Self {
            ring,
            file,
            mem,
            slots,
            in_flight: 0,
            queued: 0,
            eventfd,
        })
    }

    /// Pushes the submission for `slot` as its state describes it.
    fn push(&mut self, index: u16) -> Result<(), QueueError> {
        let fd = types::Fd(self.file.as_raw_fd());
        let slot = &self.slots[usize::from(index)];
        let iov = slot.iovecs.0.get(slot.first..).unwrap_or_default();
        // At most IOV_MAX vectors (build_iovecs).
        let iov_count = u32::try_from(iov.len()).unwrap_or(u32::MAX);
        let entry = match slot.op {
            SlotOp::Read => opcode::Readv::new(fd, iov.as_ptr(), iov_count)
                .offset(slot.offset)
                .build(),
            SlotOp::Write => opcode::Writev::new(fd, iov.as_ptr(), iov_count)
                .offset(slot.offset)
                .build(),
            SlotOp::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
            SlotOp::Discard => opcode::Fallocate::new(fd, slot.remaining)
                .offset(slot.offset)
                .mode(FALLOC_PUNCH_HOLE)
                .build(),
            SlotOp::WriteZeroes { mode, .. } => opcode::Fallocate::new(fd, slot.remaining)
                .offset(slot.offset)
                .mode(mode)
                .build(),
        }
        .user_data(u64::from(index));
        // SAFETY: the entry's pointers are the slot's vector array and the guest buffers it
        // describes. The array is not touched until the completion carrying this slot's
        // index is reaped (the slot stays `busy`, and `queue` refuses busy slots); the guest
        // buffers are in regions kept mapped by `self.mem`, which lives as long as the ring;
        // `Drop` waits for every operation in flight before either is released.
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| QueueError::Full)
    }

    /// What a completion means for `slot`; updates it for a resubmission.
    fn complete(slot: &mut Slot, res: i32) -> Outcome {
        match slot.op {
            SlotOp::Read | SlotOp::Write => {
                if res < 0 {
                    return Outcome::Done(Err(-res));
                }
                let n = u64::from(res.unsigned_abs());
                if n >= slot.remaining {
                    return Outcome::Done(Ok(()));
                }
                if n == 0 {
                    // End of file before the end of the disk: the image shrank.
                    return Outcome::Done(Err(libc::EIO));
                }
                advance_iovecs(&mut slot.iovecs.0, &mut slot.first, n as usize);
                slot.offset += n;
                slot.remaining -= n;
                Outcome::Again
            }
            SlotOp::Flush => Outcome::Done(if res < 0 { Err(-res) } else { Ok(()) }),
            // Discard is a hint: a host that cannot deallocate has done its part.
            SlotOp::Discard if res == -libc::EOPNOTSUPP => Outcome::Done(Ok(())),
            SlotOp::Discard => Outcome::Done(if res < 0 { Err(-res) } else { Ok(()) }),
            SlotOp::WriteZeroes {
                fallback: Some(next),
                ..
            } if res == -libc::EOPNOTSUPP => {
                slot.op = SlotOp::WriteZeroes {
                    mode: next,
                    fallback: None,
                };
                Outcome::Again
            }
            SlotOp::WriteZeroes { .. } => Outcome::Done(if res < 0 { Err(-res) } else { Ok(()) }),
        }
    }
}

impl BlockEngine for UringEngine {
    fn queue(&mut self, index: u16, op: &IoOp<'_>) -> Result<(), QueueError> {
        let Some(slot) = self.slots.get_mut(usize::from(index)) else {
            return Err(QueueError::Full);
        };
        if slot.busy {
            return Err(QueueError::Full);
        }
        slot.first = 0;
        match *op {
            IoOp::Read { offset, segments } | IoOp::Write { offset, segments } => {
                slot.remaining = build_iovecs(&self.mem, segments, &mut slot.iovecs)?;
                slot.offset = offset;
                slot.op = if matches!(op, IoOp::Read { .. }) {
                    SlotOp::Read
                } else {
                    SlotOp::Write
                };
            }
            IoOp::Flush => {
                slot.op = SlotOp::Flush;
                slot.offset = 0;
                slot.remaining = 0;
            }
            IoOp::Discard { offset, len } => {
                slot.op = SlotOp::Discard;
                slot.offset = offset;
                slot.remaining = len;
            }
            IoOp::WriteZeroes { offset, len, unmap } => {
                let (mode, fallback) = if unmap {
                    (FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE)
                } else {
                    (FALLOC_ZERO_RANGE, FALLOC_PUNCH_HOLE)
                };
                slot.op = SlotOp::WriteZeroes {
                    mode,
                    fallback: Some(fallback),
                };
                slot.offset = offset;
                slot.remaining = len;
            }
        }
        self.push(index)?;
        self.slots[usize::from(index)].busy = true;
        self.in_flight += 1;
        self.queued += 1;
        Ok(())
    }

    fn submit(&mut self) -> Result<(), EngineError> {
        if self.queued == 0 {
            return Ok(());
        }
        let mut retries = 0;
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    self.queued = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY))
                        && retries < SUBMIT_RETRIES =>
                {
                    retries += 1;
                    std::thread::sleep(SUBMIT_RETRY_DELAY);
                }
                Err(e) => return Err(EngineError::Submit(e)),
            }
        }
    }

    fn reap(&mut self, done: &mut Vec<Completion>) -> Result<(), EngineError> {
        // Clear the eventfd first: a completion posted after this read makes it readable again.
        if let Err(e) = self.eventfd.read() {
            if e.kind() != io::ErrorKind::WouldBlock {
                tracing::warn!(error = %e, "cannot read the io_uring completion eventfd");
            }
        }
        let mut again = 0usize;
        loop {
            let Some(cqe) = self.ring.completion().next() else {
                break;
            };
            let user_data = cqe.user_data();
            let index = u16::try_from(user_data)
                .ok()
                .filter(|&i| self.slots.get(usize::from(i)).is_some_and(|s| s.busy))
                .ok_or(EngineError::UnknownSlot(user_data))?;
            match Self::complete(&mut self.slots[usize::from(index)], cqe.result()) {
                Outcome::Done(result) => {
                    self.slots[usize::from(index)].busy = false;
                    self.in_flight -= 1;
                    done.push(Completion {
                        slot: index,
                        result,
                    });
                }
                Outcome::Again => {
                    if self.push(index).is_err() {
                        // Cannot happen (one entry per busy slot fits the ring); fail the request.
                        self.slots[usize::from(index)].busy = false;
                        self.in_flight -= 1;
                        done.push(Completion {
                            slot: index,
                            result: Err(libc::EAGAIN),
                        });
                    } else {
                        self.queued += 1;
                        again += 1;
                    }
                }
            }
        }
        if again > 0 {
            self.submit()?;
        }
        Ok(())
    }

    fn drain(&mut self, done: &mut Vec<Completion>) -> Result<(), EngineError> {
        self.submit()?;
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(EngineError::Submit(e)),
            }
            self.queued = 0;
            self.reap(done)?;
        }
        Ok(())
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.eventfd.as_raw_fd())
    }

    fn completions_ready(&mut self) -> bool {
        // The completion ring's tail, read from shared memory.
        !self.ring.completion().is_empty()
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        if self.in_flight == 0 {
            return;
        }
        let mut sink = Vec::with_capacity(self.in_flight);
        if let Err(e) = self.drain(&mut sink) {
            // The kernel may still write into guest memory: keep the mappings forever rather
            // than let it write into whatever reuses the addresses.
            tracing::error!(error = %e, in_flight = self.in_flight, "cannot drain io_uring; leaking guest memory mappings");
            std::mem::forget(self.mem.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Address, Bytes, GuestAddress};

    use super::*;
    use crate::virtio::block::request::ChainDescriptor;
    use crate::virtio::block::test_utils::{guest_memory, TempDisk, DATA_ADDR};

    /// The engine, or `None` (with a note) where the host refuses io_uring.
    fn engine(disk: &TempDisk, mem: &GuestMemoryMmap) -> Option<UringEngine> {
        match UringEngine::new(Arc::new(disk.open()), mem.clone(), 8) {
            Ok(e) => Some(e),
            Err(e) => {
                println!("skipping: io_uring unavailable on this host: {e}");
                None
            }
        }
    }

    fn seg(addr: GuestAddress, len: u32, write_only: bool) -> ChainDescriptor {
        ChainDescriptor {
            addr,
            len,
            write_only,
        }
    }

    fn wait_all(eng: &mut UringEngine) -> Vec<Completion> {
        let mut done = Vec::new();
        eng.drain(&mut done).unwrap();
        done
    }

    #[test]
    fn uring_read_fills_guest_buffer() {
        let disk = TempDisk::new(8192);
        let mem = guest_memory();
        let Some(mut eng) = engine(&disk, &mem) else {
            return;
        };
        let segs = [
            seg(DATA_ADDR, 512, true),
            seg(DATA_ADDR.unchecked_add(4096), 512, true),
        ];
        eng.queue(
            5,
            &IoOp::Read {
                offset: 2048,
                segments: &segs,
            },
        )
        .unwrap();
        eng.submit().unwrap();
        let done = wait_all(&mut eng);
        let mut second = [0u8; 1];
        mem.read_slice(&mut second, DATA_ADDR.unchecked_add(4096))
            .unwrap();
        assert_eq!(
            done,
            vec![Completion {
                slot: 5,
                result: Ok(())
            }]
        );
        assert_eq!(second[0], TempDisk::pattern(2048 + 512));
    }

    #[test]
    fn uring_write_then_flush_reaches_file() {
        let disk = TempDisk::new(8192);
        let mem = guest_memory();
        let Some(mut eng) = engine(&disk, &mem) else {
            return;
        };
        mem.write_slice(&[0x5a; 1024], DATA_ADDR).unwrap();
        let segs = [seg(DATA_ADDR, 1024, false)];
        eng.queue(
            0,
            &IoOp::Write {
                offset: 0,
                segments: &segs,
            },
        )
        .unwrap();
        eng.queue(1, &IoOp::Flush).unwrap();
        eng.submit().unwrap();
        let done = wait_all(&mut eng);
        assert_eq!(done.len(), 2);
        assert!(done.iter().all(|c| c.result.is_ok()));
        assert_eq!(disk.read_at(0, 1024), vec![0x5a; 1024]);
    }

    #[test]
    fn uring_busy_slot_is_full() {
        let disk = TempDisk::new(8192);
        let mem = guest_memory();
        let Some(mut eng) = engine(&disk, &mem) else {
            return;
        };
        eng.queue(2, &IoOp::Flush).unwrap();
        assert!(matches!(eng.queue(2, &IoOp::Flush), Err(QueueError::Full)));
    }

    #[test]
    fn uring_read_past_end_of_file_is_eio() {
        let disk = TempDisk::new(512);
        let mem = guest_memory();
        let Some(mut eng) = engine(&disk, &mem) else {
            return;
        };
        let segs = [seg(DATA_ADDR, 512, true)];
        eng.queue(
            0,
            &IoOp::Read {
                offset: 512,
                segments: &segs,
            },
        )
        .unwrap();
        eng.submit().unwrap();
        assert_eq!(wait_all(&mut eng)[0].result, Err(libc::EIO));
    }

    #[test]
    fn uring_completion_signals_eventfd() {
        let disk = TempDisk::new(8192);
        let mem = guest_memory();
        let Some(mut eng) = engine(&disk, &mem) else {
            return;
        };
        eng.queue(0, &IoOp::Flush).unwrap();
        eng.submit().unwrap();
        let fd = eng.completion_fd().unwrap();
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack; a 5 s timeout.
        let ready = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(ready, 1);
    }
}
