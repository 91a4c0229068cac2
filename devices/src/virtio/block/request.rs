//! A descriptor chain to a typed block request (virtio 1.2 §5.2.6). Pure: it reads the
//! header and discard segments from guest memory once, into locals, and does no I/O.
//!
//! Layout (module doc of `block`): header (16 bytes, device-readable), data, status
//! (device-writable, at least one byte) last. Every rule the driver can break is a
//! [`RequestError`] with the status the device answers; the status byte is written whenever
//! the chain ends in a usable status descriptor, so a [`Rejection`] carries its address.
//! - "A device MUST set the status byte to VIRTIO_BLK_S_IOERR for a write request if the
//!   VIRTIO_BLK_F_RO feature if offered, and MUST NOT write any data." (§5.2.6.2)
//! - "The device MUST set the status byte to VIRTIO_BLK_S_UNSUPP for discard and write
//!   zeroes commands if any unknown flag is set. Furthermore, the device MUST set the status
//!   byte to VIRTIO_BLK_S_UNSUPP for discard commands if the unmap flag is set." (§5.2.6.2)
//!
//! A chain whose last descriptor still has NEXT set did not end: virtio-queue stops a walk
//! after `queue size` descriptors (a loop), at a `next` past the table or at a table it
//! cannot read. There is no trustworthy status descriptor then, so none is written.

use std::ops::{Deref, Range};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory, Le32, Le64};

use super::{SECTOR_SHIFT, SECTOR_SIZE};

/// `struct virtio_blk_req`'s header (§5.2.6).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RequestHeader {
    pub request_type: Le32,
    pub reserved: Le32,
    pub sector: Le64,
}

// SAFETY: `repr(C)` of plain little-endian integers (4 + 4 + 8 bytes, no padding); every
// bit pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}

/// Bytes of [`RequestHeader`].
pub(crate) const HEADER_BYTES: u32 = 16;
const _: () = assert!(std::mem::size_of::<RequestHeader>() == HEADER_BYTES as usize);

/// `struct virtio_blk_discard_write_zeroes` (§5.2.6).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DiscardSegment {
    pub sector: Le64,
    pub num_sectors: Le32,
    pub flags: Le32,
}

// SAFETY: `repr(C)` of plain little-endian integers (8 + 4 + 4 bytes, no padding); every
// bit pattern is a valid value.
unsafe impl ByteValued for DiscardSegment {}

/// Bytes of [`DiscardSegment`].
pub(crate) const DISCARD_SEGMENT_BYTES: u64 = 16;
const _: () = assert!(std::mem::size_of::<DiscardSegment>() == DISCARD_SEGMENT_BYTES as usize);

/// One descriptor of a chain, as read (once) by virtio-queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ChainDescriptor {
    pub addr: GuestAddress,
    pub len: u32,
    pub write_only: bool,
}

/// What the parser needs to know about the disk.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DiskLimits {
    pub capacity_sectors: u64,
    pub readonly: bool,
    /// DISCARD offered.
    pub discard: bool,
    /// WRITE_ZEROES offered.
    pub write_zeroes: bool,
    /// Most data descriptors in a request (config `seg_max`).
    pub seg_max: u32,
    /// Largest data descriptor (config `size_max`).
    pub size_max: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
}

impl DiskLimits {
    /// Most descriptors in a chain: header, `seg_max` data and status.
    pub fn max_descriptors(&self) -> usize {
        usize::try_from(self.seg_max)
            .unwrap_or(usize::MAX)
            .saturating_add(2)
    }
}

/// A request, typed; offsets in sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RequestKind {
    Read {
        sector: u64,
    },
    Write {
        sector: u64,
    },
    Flush,
    GetId,
    Discard {
        sector: u64,
        num_sectors: u32,
    },
    WriteZeroes {
        sector: u64,
        num_sectors: u32,
        unmap: bool,
    },
}

/// A valid request. `data` indexes the descriptors the parser collected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Request {
    pub head: u16,
    pub kind: RequestKind,
    pub data: Range<usize>,
    /// Total bytes of the data descriptors (reads, writes, GET_ID).
    pub data_len: u32,
    pub status: GuestAddress,
}

/// Everything a driver can get wrong in one chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RequestError {
    #[error("the chain has no descriptors")]
    EmptyChain,
    #[error("the chain does not end (a descriptor loop, a next index past the table or an unreadable table)")]
    Unterminated,
    #[error("the chain has {count} descriptors or more; the limit is {max}")]
    TooManyDescriptors { count: usize, max: usize },
    #[error("the chain has no status descriptor")]
    MissingStatus,
    #[error("the status descriptor is not write-only")]
    StatusNotWritable,
    #[error("the status descriptor is empty")]
    StatusEmpty,
    #[error("the header descriptor is write-only")]
    HeaderWriteOnly,
    #[error("the header descriptor is {len} bytes, shorter than 16")]
    HeaderTooShort { len: u32 },
    #[error("the header is outside guest memory")]
    HeaderUnreadable,
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    #[error("a data descriptor has the wrong direction for the request type")]
    DataDirection,
    #[error("the request type carries no data, but the chain has data descriptors")]
    UnexpectedData,
    #[error("a data descriptor is {len} bytes, over size_max")]
    SegmentTooLarge { len: u32 },
    #[error("data length {len} is not a multiple of 512")]
    UnalignedLength { len: u64 },
    #[error("sectors {sector}+{sectors} are past the end of the disk ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("discard/write-zeroes payload of {len} bytes is not whole 16-byte segments")]
    BadSegmentPayload { len: u64 },
    #[error("discard/write-zeroes with {count} segments; the limit is 1")]
    TooManySegments { count: u64 },
    #[error("discard/write-zeroes segment is outside guest memory")]
    SegmentUnreadable,
    #[error("discard/write-zeroes flags {flags:#x} are not supported")]
    UnsupportedFlags { flags: u32 },
    #[error("discard/write-zeroes of {sectors} sectors is over the limit of {max}")]
    TooManySectors { sectors: u32, max: u32 },
}

impl RequestError {
    /// The status the device answers (§5.2.6).
    pub fn status(&self) -> u8 {
        let status = match self {
            Self::UnsupportedType(_)
            | Self::UnsupportedFlags { .. }
            | Self::TooManySegments { .. } => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        };
        // The status constants are 0..=2.
        u8::try_from(status).unwrap_or(u8::MAX)
    }

    /// A small number per variant, so a worker logs each kind once.
    pub fn kind_index(&self) -> u32 {
        match self {
            Self::EmptyChain => 0,
            Self::Unterminated => 1,
            Self::TooManyDescriptors { .. } => 2,
            Self::MissingStatus => 3,
            Self::StatusNotWritable => 4,
            Self::StatusEmpty => 5,
            Self::HeaderWriteOnly => 6,
            Self::HeaderTooShort { .. } => 7,
            Self::HeaderUnreadable => 8,
            Self::UnsupportedType(_) => 9,
            Self::DataDirection => 10,
            Self::UnexpectedData => 11,
            Self::SegmentTooLarge { .. } => 12,
            Self::UnalignedLength { .. } => 13,
            Self::OutOfRange { .. } => 14,
            Self::ReadOnly => 15,
            Self::BadSegmentPayload { .. } => 16,
            Self::TooManySegments { .. } => 17,
            Self::SegmentUnreadable => 18,
            Self::UnsupportedFlags { .. } => 19,
            Self::TooManySectors { .. } => 20,
        }
    }
}

/// A chain the device refuses: complete it with `error.status()` at `status`, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub head: u16,
    pub error: RequestError,
    pub status: Option<GuestAddress>,
}

/// Parses `chain`. `descs` is scratch space, reused across calls (no allocation once it
/// has grown to the largest chain); on success `Request::data` indexes into it.
pub(crate) fn parse<M>(
    mut chain: DescriptorChain<M>,
    limits: &DiskLimits,
    descs: &mut Vec<ChainDescriptor>,
) -> Result<Request, Rejection>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    let max = limits.max_descriptors();
    descs.clear();
    let mut count = 0usize;
    let mut last = None;
    for desc in chain.by_ref() {
        let d = ChainDescriptor {
            addr: desc.addr(),
            len: desc.len(),
            write_only: desc.is_write_only(),
        };
        if descs.len() < max {
            descs.push(d);
        }
        count += 1;
        last = Some((d, desc.has_next()));
    }
    let reject = |error, status| Rejection {
        head,
        error,
        status,
    };

    let Some((last, last_has_next)) = last else {
        return Err(reject(RequestError::EmptyChain, None));
    };
    if last_has_next {
        return Err(reject(RequestError::Unterminated, None));
    }
    let status = (count >= 2 && last.write_only && last.len >= 1).then_some(last.addr);
    if count > max {
        return Err(reject(
            RequestError::TooManyDescriptors { count, max },
            status,
        ));
    }
    if count < 2 {
        return Err(reject(RequestError::MissingStatus, None));
    }
    let Some(status) = status else {
        let error = if last.write_only {
            RequestError::StatusEmpty
        } else {
            RequestError::StatusNotWritable
        };
        return Err(reject(error, None));
    };
    let reject = |error| Rejection {
        head,
        error,
        status: Some(status),
    };

    let header_desc = descs[0];
    if header_desc.write_only {
        return Err(reject(RequestError::HeaderWriteOnly));
    }
    if header_desc.len < HEADER_BYTES {
        return Err(reject(RequestError::HeaderTooShort {
            len: header_desc.len,
        }));
    }
    let mem = chain.memory();
    // The one read of the header: the guest may rewrite it, we use this copy.
    let header: RequestHeader = mem
        .read_obj(header_desc.addr)
        .map_err(|_| reject(RequestError::HeaderUnreadable))?;

    let data = 1..count - 1;
    let segments = &descs[data.clone()];
    let request_type = header.request_type.to_native();
    let sector = header.sector.to_native();
    let request = |kind, data_len| Request {
        head,
        kind,
        data: data.clone(),
        data_len,
        status,
    };

    match request_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write = request_type == VIRTIO_BLK_T_OUT;
            let len = data_length(segments, !write, limits).map_err(reject)?;
            if write && limits.readonly {
                return Err(reject(RequestError::ReadOnly));
            }
            if len % SECTOR_SIZE != 0 {
                return Err(reject(RequestError::UnalignedLength { len }));
            }
            check_range(sector, len >> SECTOR_SHIFT, limits).map_err(reject)?;
            // virtio-queue ends a chain at 4 GiB, so a length past u32 cannot get here.
            let len =
                u32::try_from(len).map_err(|_| reject(RequestError::UnalignedLength { len }))?;
            let kind = if write {
                RequestKind::Write { sector }
            } else {
                RequestKind::Read { sector }
            };
            Ok(request(kind, len))
        }
        VIRTIO_BLK_T_FLUSH => {
            if !segments.is_empty() {
                return Err(reject(RequestError::UnexpectedData));
            }
            Ok(request(RequestKind::Flush, 0))
        }
        VIRTIO_BLK_T_GET_ID => {
            let len = data_length(segments, true, limits).map_err(reject)?;
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            Ok(request(RequestKind::GetId, len))
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let zeroes = request_type == VIRTIO_BLK_T_WRITE_ZEROES;
            let offered = if zeroes {
                limits.write_zeroes
            } else {
                limits.discard
            };
            if !offered {
                return Err(reject(RequestError::UnsupportedType(request_type)));
            }
            let len = data_length(segments, false, limits).map_err(reject)?;
            if len == 0 || len % DISCARD_SEGMENT_BYTES != 0 {
                return Err(reject(RequestError::BadSegmentPayload { len }));
            }
            let count = len / DISCARD_SEGMENT_BYTES;
            if count > 1 {
                return Err(reject(RequestError::TooManySegments { count }));
            }
            let segment = read_segment(mem, segments).map_err(reject)?;
            let flags = segment.flags.to_native();
            let allowed = if zeroes {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            if flags & !allowed != 0 {
                return Err(reject(RequestError::UnsupportedFlags { flags }));
            }
            let num_sectors = segment.num_sectors.to_native();
            let max = if zeroes {
                limits.max_write_zeroes_sectors
            } else {
                limits.max_discard_sectors
            };
            if num_sectors > max {
                return Err(reject(RequestError::TooManySectors {
                    sectors: num_sectors,
                    max,
                }));
            }
            let sector = segment.sector.to_native();
            check_range(sector, u64::from(num_sectors), limits).map_err(reject)?;
            let kind = if zeroes {
                RequestKind::WriteZeroes {
                    sector,
                    num_sectors,
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                }
            } else {
                RequestKind::Discard {
                    sector,
                    num_sectors,
                }
            };
            Ok(request(kind, 0))
        }
        other => Err(reject(RequestError::UnsupportedType(other))),
    }
}

/// Sums the data descriptors, checking each has direction `write_only` and fits size_max.
fn data_length(
    segments: &[ChainDescriptor],
    write_only: bool,
    limits: &DiskLimits,
) -> Result<u64, RequestError> {
    let mut total = 0u64;
    for seg in segments {
        if seg.write_only != write_only {
            return Err(RequestError::DataDirection);
        }
        if seg.len > limits.size_max {
            return Err(RequestError::SegmentTooLarge { len: seg.len });
        }
        total += u64::from(seg.len);
    }
    Ok(total)
}

/// Checks sectors `sector..sector + sectors` are on the disk, with checked math.
fn check_range(sector: u64, sectors: u64, limits: &DiskLimits) -> Result<(), RequestError> {
    let capacity = limits.capacity_sectors;
    let fits = sector
        .checked_add(sectors)
        .is_some_and(|end| end <= capacity)
        && sector.checked_mul(SECTOR_SIZE).is_some();
    if fits {
        Ok(())
    } else {
        Err(RequestError::OutOfRange {
            sector,
            sectors,
            capacity,
        })
    }
}

/// Reads the one 16-byte segment, which may span descriptors, once.
fn read_segment<T: GuestMemory + ?Sized>(
    mem: &T,
    segments: &[ChainDescriptor],
) -> Result<DiscardSegment, RequestError> {
    let mut segment = DiscardSegment::default();
    let bytes = segment.as_mut_slice();
    let mut filled = 0usize;
    for seg in segments {
        let Some(rest) = bytes.get_mut(filled..) else {
            break;
        };
        let take = rest
            .len()
            .min(usize::try_from(seg.len).unwrap_or(usize::MAX));
        let dst = &mut rest[..take];
        mem.read_slice(dst, seg.addr)
            .map_err(|_| RequestError::SegmentUnreadable)?;
        filled += take;
    }
    Ok(segment)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::Address;

    use super::*;
    use crate::virtio::block::test_utils::{
        guest_memory, header, limits, ChainBuilder, DATA_ADDR, HEADER_ADDR, QUEUE_SIZE, STATUS_ADDR,
    };
    use crate::virtio::GuestMemoryMmap;

    /// Parses the first chain of a queue holding `builder`'s descriptors.
    fn parse_built(
        mem: &GuestMemoryMmap,
        builder: &ChainBuilder,
        limits: &DiskLimits,
    ) -> Result<Request, Rejection> {
        let vq = MockSplitQueue::new(mem, QUEUE_SIZE);
        builder.add_to(&vq, 0);
        let mut queue: Queue = vq.create_queue().unwrap();
        let chain = queue.iter(mem).unwrap().next().unwrap();
        parse(chain, limits, &mut Vec::new())
    }

    fn rejection(error: RequestError) -> Result<Request, Rejection> {
        Err(Rejection {
            head: 0,
            error,
            status: Some(STATUS_ADDR),
        })
    }

    #[test]
    fn parse_read_gives_sector_and_length() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_IN, 8);
        let chain = ChainBuilder::request(&[(DATA_ADDR, 4096, true)]);
        let req = parse_built(&mem, &chain, &limits()).unwrap();
        assert_eq!(
            (req.kind, req.data_len, req.data, req.status),
            (RequestKind::Read { sector: 8 }, 4096, 1..2, STATUS_ADDR)
        );
    }

    #[test]
    fn parse_write_over_two_segments_sums_length() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        let chain = ChainBuilder::request(&[
            (DATA_ADDR, 512, false),
            (DATA_ADDR.unchecked_add(512), 1024, false),
        ]);
        let req = parse_built(&mem, &chain, &limits()).unwrap();
        assert_eq!(
            (req.kind, req.data_len),
            (RequestKind::Write { sector: 0 }, 1536)
        );
    }

    #[test]
    fn parse_flush_has_no_data() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let req = parse_built(&mem, &ChainBuilder::request(&[]), &limits()).unwrap();
        assert_eq!(req.kind, RequestKind::Flush);
    }

    #[test]
    fn parse_get_id_takes_writable_data() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        let req = parse_built(
            &mem,
            &ChainBuilder::request(&[(DATA_ADDR, 20, true)]),
            &limits(),
        )
        .unwrap();
        assert_eq!((req.kind, req.data_len), (RequestKind::GetId, 20));
    }

    #[test]
    fn parse_discard_reads_segment() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        segment(&mem, 16, 8, 0);
        let req = parse_built(
            &mem,
            &ChainBuilder::request(&[(DATA_ADDR, 16, false)]),
            &limits(),
        )
        .unwrap();
        assert_eq!(
            req.kind,
            RequestKind::Discard {
                sector: 16,
                num_sectors: 8
            }
        );
    }

    #[test]
    fn parse_write_zeroes_with_unmap_flag_keeps_it() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        segment(&mem, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        let req = parse_built(
            &mem,
            &ChainBuilder::request(&[(DATA_ADDR, 16, false)]),
            &limits(),
        )
        .unwrap();
        assert_eq!(
            req.kind,
            RequestKind::WriteZeroes {
                sector: 0,
                num_sectors: 8,
                unmap: true
            }
        );
    }

    #[test]
    fn parse_segment_split_over_descriptors_is_read_whole() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        segment(&mem, 24, 8, 0);
        let chain = ChainBuilder::request(&[
            (DATA_ADDR, 10, false),
            (DATA_ADDR.unchecked_add(10), 6, false),
        ]);
        let req = parse_built(&mem, &chain, &limits()).unwrap();
        assert_eq!(
            req.kind,
            RequestKind::Discard {
                sector: 24,
                num_sectors: 8
            }
        );
    }

    #[test]
    fn parse_header_shorter_than_16_bytes_is_ioerr() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let chain = ChainBuilder::new()
            .desc(HEADER_ADDR, 15, false)
            .desc(DATA_ADDR, 512, true)
            .desc(STATUS_ADDR, 1, true);
        let got = parse_built(&mem, &chain, &limits());
        assert_eq!(got, rejection(RequestError::HeaderTooShort { len: 15 }));
        assert_eq!(
            RequestError::HeaderTooShort { len: 15 }.status(),
            VIRTIO_BLK_S_IOERR as u8
        );
    }

    #[test]
    fn parse_header_in_write_only_descriptor_is_rejected() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let chain = ChainBuilder::new()
            .desc(HEADER_ADDR, 16, true)
            .desc(DATA_ADDR, 512, true)
            .desc(STATUS_ADDR, 1, true);
        let got = parse_built(&mem, &chain, &limits());
        assert_eq!(got, rejection(RequestError::HeaderWriteOnly));
    }

    #[test]
    fn parse_header_outside_memory_is_rejected() {
        let mem = guest_memory();
        let chain = ChainBuilder::new()
            .desc(GuestAddress(0xffff_0000), 16, false)
            .desc(STATUS_ADDR, 1, true);
        let got = parse_built(&mem, &chain, &limits());
        assert_eq!(got, rejection(RequestError::HeaderUnreadable));
    }

    #[test]
    fn parse_read_into_readable_descriptor_is_wrong_direction() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let got = parse_built(
            &mem,
            &ChainBuilder::request(&[(DATA_ADDR, 512, false)]),
            &limits(),
        );
        assert_eq!(got, rejection(RequestError::DataDirection));
    }

    #[test]
    fn parse_write_from_writable_descriptor_is_wrong_direction() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        let got = parse_built(
            &mem,
            &ChainBuilder::request(&[(DATA_ADDR, 512, true)]),
            &limits(),
        );
        assert_eq!(got, rejection(RequestError::DataDirection));
    }

    #[test]
    fn parse_discard_from_writable_descriptor_is_wrong_direction() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        let got = parse_built(
            &mem,
            &ChainBuilder::request(&[(DATA_ADDR, 16, true)]),
            &limits(),
        );
        assert_eq!(got, rejection(RequestError::DataDirection));
    }

    #[test]
    fn parse_flush_with_data_is_rejected() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let got = parse_built(
            &mem,
            &ChainBuilder::request(&[(DATA_ADDR, 512, false)]),
            &limits(),
        );
        assert_eq!(got, rejection(RequestError::UnexpectedData));
    }

    #[test]
    fn parse_single_descriptor_misses_status() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let chain = ChainBuilder::new().desc(HEADER_ADDR, 16, false);
        let got = parse_built(&mem, &chain, &limits());
        assert_eq!(
            got.unwrap_err(),
            Rejection {
                head: 0,
                error: RequestError::MissingStatus,
                status: None
            }
        );
    }

    #[test]
    fn parse_status_not_write_only_is_not_written() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let chain = ChainBuilder::new()
            .desc(HEADER_ADDR, 16, false)
            .desc(STATUS_ADDR, 1, false);
        let got = parse_built(&mem, &chain, &limits()).unwrap_err();
        assert_eq!(
            (got.error, got.status),
            (RequestError::StatusNotWritable, None)
        );
    }

    #[test]
    fn parse_empty_status_is_not_written() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let chain = ChainBuilder::new()
            .desc(HEADER_ADDR, 16, false)
            .desc(STATUS_ADDR, 0, true);
        let got = parse_built(&mem, &chain, &limits()).unwrap_err();
        assert_eq!((got.error, got.status), (RequestError::StatusEmpty, None));
    }

    #[test]
    fn parse_read_past_capacity_is_out_of_range() {
        let mem = guest_memory();
        // The test disk has 2048 sectors; 2047 + 2 ends one past it.
        header(&mem, VIRTIO_BLK_T_IN, 2047);
        let got = parse_built(
            &mem,
            &ChainBuilder::request(&[(DATA_ADDR, 1024, true)]),
            &limits(),
        );
        assert_eq!(
            got,
            rejection(RequestError::OutOfRange {
                sector: 2047,
                sectors: 2,
                capacity: 2048
            })
        );
    }

    #[test]
    fn parse_sector_overflowing_u64_is_out_of_range() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_IN, u64::MAX);
        let got = parse_built(
            &mem,
            &ChainBuilder::request(&[(DATA_ADDR, 512, true)]),
            &limits(),
        );
        assert_eq!(
            got.unwrap_err().error,
            RequestError::OutOfRange {
                sector: u64::MAX,
                sectors: 1,
                capacity: 2048
            }
        );
    }

    #[test]
    fn parse_sector_times_512_overflowing_is_out_of_range() {
        let mem = guest_memory();
        // sector * 512 overflows u64 even though sector + 0 does not.
        let huge = limits_with_capacity(u64::MAX);
        header(&mem, VIRTIO_BLK_T_IN, u64::MAX / 256);
        let got = parse_built(&mem, &ChainBuilder::request(&[]), &huge);
        assert!(matches!(
            got.unwrap_err().error,
            RequestError::OutOfRange { .. }
        ));
    }

    #[test]
    fn parse_length_not_multiple_of_512_is_rejected() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let got = parse_built(
            &mem,
            &ChainBuilder::request(&[(DATA_ADDR, 100, true)]),
            &limits(),
        );
        assert_eq!(got, rejection(RequestError::UnalignedLength { len: 100 }));
    }

    #[test]
    fn parse_segment_over_size_max_is_rejected() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let small = DiskLimits {
            size_max: 512,
            ..limits()
        };
        let got = parse_built(
            &mem,
            &ChainBuilder::request(&[(DATA_ADDR, 1024, true)]),
            &small,
        );
        assert_eq!(got, rejection(RequestError::SegmentTooLarge { len: 1024 }));
    }

    #[test]
    fn parse_write_to_readonly_disk_is_ioerr() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        let ro = DiskLimits {
            readonly: true,
            ..limits()
        };
        let got = parse_built(
            &mem,
            &ChainBuilder::request(&[(DATA_ADDR, 512, false)]),
            &ro,
        );
        assert_eq!(got, rejection(RequestError::ReadOnly));
    }

    #[test]
    fn parse_unknown_type_is_unsupp() {
        let mem = guest_memory();
        header(&mem, 0x55, 0);
        let got = parse_built(&mem, &ChainBuilder::request(&[]), &limits());
        assert_eq!(got, rejection(RequestError::UnsupportedType(0x55)));
        assert_eq!(
            RequestError::UnsupportedType(0x55).status(),
            VIRTIO_BLK_S_UNSUPP as u8
        );
    }

    #[test]
    fn parse_discard_not_offered_is_unsupp() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        segment(&mem, 0, 8, 0);
        let no_discard = DiskLimits {
            discard: false,
            ..limits()
        };
        let got = parse_built(
            &mem,
            &ChainBuilder::request(&[(DATA_ADDR, 16, false)]),
            &no_discard,
        );
        assert_eq!(
            got,
            rejection(RequestError::UnsupportedType(VIRTIO_BLK_T_DISCARD))
        );
    }

    #[test]
    fn parse_discard_with_unmap_flag_is_unsupp() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        segment(&mem, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        let got = parse_built(
            &mem,
            &ChainBuilder::request(&[(DATA_ADDR, 16, false)]),
            &limits(),
        );
        assert_eq!(got, rejection(RequestError::UnsupportedFlags { flags: 1 }));
    }

    #[test]
    fn parse_write_zeroes_with_unknown_flag_is_unsupp() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        segment(&mem, 0, 8, 0x4);
        let got = parse_built(
            &mem,
            &ChainBuilder::request(&[(DATA_ADDR, 16, false)]),
            &limits(),
        );
        assert_eq!(got, rejection(RequestError::UnsupportedFlags { flags: 4 }));
    }

    #[test]
    fn parse_discard_two_segments_is_unsupp() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        let got = parse_built(
            &mem,
            &ChainBuilder::request(&[(DATA_ADDR, 32, false)]),
            &limits(),
        );
        assert_eq!(got, rejection(RequestError::TooManySegments { count: 2 }));
    }

    #[test]
    fn parse_discard_partial_segment_is_ioerr() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        let got = parse_built(
            &mem,
            &ChainBuilder::request(&[(DATA_ADDR, 12, false)]),
            &limits(),
        );
        assert_eq!(got, rejection(RequestError::BadSegmentPayload { len: 12 }));
    }

    #[test]
    fn parse_discard_over_max_sectors_is_ioerr() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        segment(&mem, 0, 100, 0);
        let small = DiskLimits {
            max_discard_sectors: 64,
            ..limits()
        };
        let got = parse_built(
            &mem,
            &ChainBuilder::request(&[(DATA_ADDR, 16, false)]),
            &small,
        );
        assert_eq!(
            got,
            rejection(RequestError::TooManySectors {
                sectors: 100,
                max: 64
            })
        );
    }

    #[test]
    fn parse_discard_past_capacity_is_out_of_range() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        segment(&mem, 2040, 16, 0);
        let got = parse_built(
            &mem,
            &ChainBuilder::request(&[(DATA_ADDR, 16, false)]),
            &limits(),
        );
        assert!(matches!(
            got.unwrap_err().error,
            RequestError::OutOfRange { .. }
        ));
    }

    #[test]
    fn parse_discard_segment_outside_memory_is_rejected() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        let chain = ChainBuilder::request(&[(GuestAddress(0xffff_0000), 16, false)]);
        let got = parse_built(&mem, &chain, &limits());
        assert_eq!(got, rejection(RequestError::SegmentUnreadable));
    }

    #[test]
    fn parse_chain_longer_than_seg_max_is_rejected_with_status() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let few = DiskLimits {
            seg_max: 2,
            ..limits()
        };
        let data: Vec<_> = (0..3u64)
            .map(|i| (DATA_ADDR.unchecked_add(i * 512), 512, true))
            .collect();
        let got = parse_built(&mem, &ChainBuilder::request(&data), &few);
        assert_eq!(
            got,
            rejection(RequestError::TooManyDescriptors { count: 5, max: 4 })
        );
    }

    #[test]
    fn parse_descriptor_loop_is_unterminated_without_status() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        // Descriptor 0 -> 1 -> 0 -> ...: virtio-queue stops after QUEUE_SIZE steps.
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(
                HEADER_ADDR.0,
                16,
                VRING_DESC_F_NEXT as u16,
                1,
            )),
            RawDescriptor::from(SplitDescriptor::new(
                DATA_ADDR.0,
                512,
                (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
                0,
            )),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        let got = parse(chain, &limits(), &mut Vec::new()).unwrap_err();
        assert_eq!((got.error, got.status), (RequestError::Unterminated, None));
    }

    #[test]
    fn parse_next_index_past_table_is_unterminated() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let descs = [RawDescriptor::from(SplitDescriptor::new(
            HEADER_ADDR.0,
            16,
            VRING_DESC_F_NEXT as u16,
            QUEUE_SIZE + 5,
        ))];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        let got = parse(chain, &limits(), &mut Vec::new()).unwrap_err();
        assert_eq!(got.error, RequestError::Unterminated);
    }

    #[test]
    fn parse_head_past_table_is_empty_chain() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        vq.avail().ring().ref_at(0).unwrap().store(QUEUE_SIZE + 1);
        vq.avail().idx().store(1);
        let mut queue: Queue = vq.create_queue().unwrap();
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        let got = parse(chain, &limits(), &mut Vec::new()).unwrap_err();
        assert_eq!((got.error, got.status), (RequestError::EmptyChain, None));
    }

    #[test]
    fn parse_reuses_scratch_without_growing() {
        let mem = guest_memory();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let mut scratch = Vec::with_capacity(8);
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        ChainBuilder::request(&[(DATA_ADDR, 512, true)]).add_to(&vq, 0);
        let mut queue: Queue = vq.create_queue().unwrap();
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        parse(chain, &limits(), &mut scratch).unwrap();
        assert_eq!((scratch.len(), scratch.capacity()), (3, 8));
    }

    fn segment(mem: &GuestMemoryMmap, sector: u64, num_sectors: u32, flags: u32) {
        let seg = DiscardSegment {
            sector: sector.into(),
            num_sectors: num_sectors.into(),
            flags: flags.into(),
        };
        mem.write_obj(seg, DATA_ADDR).unwrap();
    }

    fn limits_with_capacity(capacity_sectors: u64) -> DiskLimits {
        DiskLimits {
            capacity_sectors,
            ..limits()
        }
    }

    /// One random descriptor: address (in or out of memory), length, flags, next.
    fn arb_descriptor() -> impl Strategy<Value = (u64, u32, u16, u16)> {
        (
            prop_oneof![0x1000u64..0x2_0000, Just(0xffff_0000u64), any::<u64>()],
            prop_oneof![0u32..64, Just(512), Just(4096), any::<u32>()],
            0u16..8,
            0u16..(QUEUE_SIZE + 2),
        )
    }

    proptest! {
        /// Any chain parses to a request or a rejection; a rejection carries a status address
        /// only when the chain ended in a writable, non-empty descriptor.
        #[test]
        fn parse_random_chain_never_panics(
            descs in proptest::collection::vec(arb_descriptor(), 1..usize::from(QUEUE_SIZE / 2)),
            request_type in prop_oneof![0u32..16, any::<u32>()],
            sector in prop_oneof![0u64..4096, any::<u64>()],
        ) {
            let mem = guest_memory();
            header(&mem, request_type, sector);
            let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
            let raw: Vec<_> = descs
                .iter()
                .map(|&(addr, len, flags, next)| RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next)))
                .collect();
            vq.add_desc_chains(&raw, 0).unwrap();
            let mut queue: Queue = vq.create_queue().unwrap();
            let mut iter = queue.iter(&mem).unwrap();
            let chain = iter.next().unwrap();
            match parse(chain, &limits(), &mut Vec::new()) {
                Ok(req) => prop_assert!(req.data.end < usize::from(QUEUE_SIZE)),
                Err(rej) => prop_assert!(rej.error.status() <= 2),
            }
        }
    }
}
