//! What crib does with a virtio-fs device's queues once its backend is gone: it takes the
//! rings back and completes every request with a FUSE error (`ENOTCONN`), so processes
//! in the guest get an error from the mount instead of hanging.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::{GuestMemoryMmap, VirtioInterrupt, VirtioInterruptType};

/// The FUSE request header's `unique` lies 8 bytes in (`len: u32, opcode: u32, unique`).
const IN_HEADER_BYTES: usize = 40;

/// `struct fuse_out_header`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct OutHeader {
    pub len: u32,
    pub error: i32,
    pub unique: u64,
}

// SAFETY: plain integers, no padding (4 + 4 + 8 bytes), every bit pattern valid.
unsafe impl ByteValued for OutHeader {}

/// A queue taken back from the backend.
pub struct FailedQueue {
    pub index: u16,
    pub queue: Queue,
    pub kick: EventFd,
}

/// Answers the request at the head of `chain` with `-errno`; returns the bytes written
/// (0 for a request without room for a reply, such as FORGET on the high-priority queue).
pub fn fail_chain<M>(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<M>,
    errno: i32,
) -> u32
where
    M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
{
    let unique = chain
        .clone()
        .reader(mem)
        .ok()
        .filter(|r| r.available_bytes() >= IN_HEADER_BYTES)
        .and_then(|mut r| {
            let _len_opcode: u64 = r.read_obj().ok()?;
            r.read_obj::<u64>().ok()
        });
    let (Some(unique), Ok(mut writer)) = (unique, chain.writer(mem)) else {
        return 0;
    };
    let header = OutHeader {
        len: std::mem::size_of::<OutHeader>() as u32,
        error: -errno,
        unique,
    };
    if writer.available_bytes() < std::mem::size_of::<OutHeader>()
        || writer.write_obj(header).is_err()
    {
        return 0;
    }
    header.len
}

/// Puts `queue` where the backend left it: everything the guest made available after the
/// last used entry the backend published is answered by crib.
pub fn resync(mem: &GuestMemoryMmap, queue: &mut Queue) {
    // The used ring's `idx` is at offset 2 (after `flags`).
    let used_idx = GuestAddress(queue.used_ring())
        .checked_add(2)
        .and_then(|a| mem.read_obj::<u16>(a).ok())
        .unwrap_or(0);
    queue.set_next_avail(used_idx);
    queue.set_next_used(used_idx);
}

/// Completes every available request of `queue` with `-errno`; returns whether the
/// driver must be notified.
pub fn drain(mem: &GuestMemoryMmap, queue: &mut Queue, errno: i32) -> bool {
    let mut completed = false;
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            tracing::debug!("virtio-fs failover: {e}");
        }
        // Bounded: at most one queue's worth per pass.
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let len = fail_chain(mem, chain, errno);
            if queue.add_used(mem, head, len).is_err() {
                return completed;
            }
            completed = true;
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            _ => break,
        }
    }
    completed && queue.needs_notification(mem).unwrap_or(true)
}

/// Runs a thread answering `queues` with `ENOTCONN` until `stop` is written.
pub fn spawn(
    tag: &str,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    mut queues: Vec<FailedQueue>,
    stop: EventFd,
) -> io::Result<JoinHandle<()>> {
    let tag = tag.to_string();
    std::thread::Builder::new()
        .name(format!("fs-{tag}-failover"))
        .spawn(move || {
            for q in &mut queues {
                resync(&mem, &mut q.queue);
            }
            loop {
                for q in &mut queues {
                    let _ = q.kick.read();
                    if drain(&mem, &mut q.queue, libc::ENOTCONN) {
                        if let Err(e) = interrupt.trigger(VirtioInterruptType::Queue(q.index)) {
                            tracing::warn!("virtio-fs {tag}: cannot signal queue {}: {e}", q.index);
                        }
                    }
                }
                let mut fds: Vec<libc::pollfd> = queues
                    .iter()
                    .map(|q| q.kick.as_raw_fd())
                    .chain(std::iter::once(stop.as_raw_fd()))
                    .map(|fd| libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                // SAFETY: `fds` is a valid array of `fds.len()` pollfds that outlives the call.
                let ret = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
                if ret < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    tracing::error!("virtio-fs {tag}: failover poll failed: {e}");
                    return;
                }
                if fds.last().is_some_and(|p| p.revents != 0) {
                    return;
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// One request: a 40-byte FUSE header with `unique`, then a writable reply buffer.
    fn request(
        mem: &GuestMemoryMmap,
        unique: u64,
        reply_len: u32,
    ) -> (MockSplitQueue<'_, GuestMemoryMmap>, Queue) {
        let vq = MockSplitQueue::new(mem, 16);
        let mut header = [0u8; IN_HEADER_BYTES];
        header[8..16].copy_from_slice(&unique.to_le_bytes());
        mem.write_slice(&header, GuestAddress(0x8000)).unwrap();
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(
                0x8000,
                IN_HEADER_BYTES as u32,
                VRING_DESC_F_NEXT as u16,
                1,
            )),
            RawDescriptor::from(SplitDescriptor::new(
                0x9000,
                reply_len,
                VRING_DESC_F_WRITE as u16,
                0,
            )),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let queue: Queue = vq.create_queue().unwrap();
        (vq, queue)
    }

    #[test]
    fn requests_are_answered_with_the_errno_and_their_unique() {
        let mem = mem();
        let (vq, mut queue) = request(&mem, 0xfeed, 64);
        assert!(drain(&mem, &mut queue, libc::ENOTCONN));
        let reply: OutHeader = mem.read_obj(GuestAddress(0x9000)).unwrap();
        assert_eq!(
            reply,
            OutHeader {
                len: 16,
                error: -libc::ENOTCONN,
                unique: 0xfeed
            }
        );
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 16);
    }

    #[test]
    fn a_request_without_reply_room_is_returned_empty() {
        let mem = mem();
        let (vq, mut queue) = request(&mem, 7, 8);
        drain(&mem, &mut queue, libc::ENOTCONN);
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
    }

    #[test]
    fn resync_starts_after_the_backends_last_used_entry() {
        let mem = mem();
        let (vq, mut queue) = request(&mem, 1, 64);
        // The backend had completed 3 requests before it died.
        vq.used().idx().store(3);
        resync(&mem, &mut queue);
        assert_eq!(queue.next_avail(), 3);
        assert_eq!(queue.next_used(), 3);
    }
}
