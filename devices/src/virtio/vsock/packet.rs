//! The vsock packet header (virtio 1.2 §5.10.6) and the device's checks of what the driver
//! sends: a TX descriptor chain to a [`Header`] plus its data, or a [`Rejection`]. Pure: no
//! sockets, no queue state.
//!
//! The chain layout is virtio-vsock's (`VsockPacket::from_tx_virtq_chain`): the header in
//! the head descriptor, the data after it in the same descriptor or in the next one.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{Bytes, GuestMemory};

use super::{HOST_CID, MAX_PKT_DATA_BYTES, OP_CREDIT_REQUEST, OP_REQUEST, OP_RST, TYPE_STREAM};
use crate::virtio::GuestMemoryMmap;

/// Bytes of `struct virtio_vsock_hdr`.
pub(crate) const HEADER_BYTES: usize = PKT_HEADER_SIZE;

const _: () = assert!(HEADER_BYTES == 44);

/// `struct virtio_vsock_hdr`, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// The little-endian wire form.
    pub fn to_bytes(self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Decodes the wire form.
    pub fn from_bytes(b: &[u8; HEADER_BYTES]) -> Self {
        let u64_at = |i: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(v)
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    fn from_packet(pkt: &VsockPacket<'_, ()>) -> Self {
        Self {
            src_cid: pkt.src_cid(),
            dst_cid: pkt.dst_cid(),
            src_port: pkt.src_port(),
            dst_port: pkt.dst_port(),
            len: pkt.len(),
            type_: pkt.type_(),
            op: pkt.op(),
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        }
    }

    /// The RST that answers this guest packet: from the address it was sent to, back to
    /// the guest's port. The source CID echoes the destination so a guest connecting to a
    /// CID that is not the host finds its socket and fails at once.
    pub fn reset_reply(&self, guest_cid: u64) -> Self {
        Self {
            src_cid: self.dst_cid,
            dst_cid: guest_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Self::default()
        }
    }
}

/// Why a TX packet was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PacketError {
    #[error("malformed TX descriptor chain")]
    Chain(#[source] virtio_vsock::packet::Error),
    #[error("packet from CID {cid}, not the guest's")]
    SrcCid { cid: u64 },
    #[error("packet to CID {cid}: the device only reaches the host (CID 2)")]
    DstCid { cid: u64 },
    #[error("packet of socket type {type_}: only streams (1) are offered")]
    Type { type_: u16 },
    #[error("packet with unknown op {op}")]
    Op { op: u16 },
}

impl PacketError {
    /// A small number per variant, for "log once per kind".
    pub fn kind_index(&self) -> u32 {
        match self {
            Self::Chain(_) => 0,
            Self::SrcCid { .. } => 1,
            Self::DstCid { .. } => 2,
            Self::Type { .. } => 3,
            Self::Op { .. } => 4,
        }
    }
}

/// A refused TX packet: the error, and its header when it could be read (to answer RST).
#[derive(Debug)]
pub(crate) struct Rejection {
    pub header: Option<Header>,
    pub error: PacketError,
}

/// Checks what the guest cannot legally put in a header, whatever the connection.
pub(crate) fn check(header: &Header, guest_cid: u64) -> Result<(), PacketError> {
    if header.src_cid != guest_cid {
        return Err(PacketError::SrcCid {
            cid: header.src_cid,
        });
    }
    if header.dst_cid != HOST_CID {
        return Err(PacketError::DstCid {
            cid: header.dst_cid,
        });
    }
    if header.type_ != TYPE_STREAM {
        return Err(PacketError::Type {
            type_: header.type_,
        });
    }
    if !(OP_REQUEST..=OP_CREDIT_REQUEST).contains(&header.op) {
        return Err(PacketError::Op { op: header.op });
    }
    Ok(())
}

/// Parses and checks the TX chain `chain`; on success its data (`len` bytes, at most
/// [`MAX_PKT_DATA_BYTES`]) is in `data`.
pub(crate) fn parse_tx<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    guest_cid: u64,
    data: &mut Vec<u8>,
) -> Result<Header, Rejection>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    data.clear();
    let mut walk = chain.clone();
    let header = match VsockPacket::from_tx_virtq_chain(mem, &mut walk, MAX_PKT_DATA_BYTES) {
        Ok(pkt) => {
            let header = Header::from_packet(&pkt);
            if let Some(slice) = pkt.data_slice() {
                data.resize(slice.len(), 0);
                let copied = slice.copy_to(data.as_mut_slice());
                data.truncate(copied);
            }
            header
        }
        Err(error) => {
            return Err(Rejection {
                header: peek_header(mem, chain),
                error: PacketError::Chain(error),
            })
        }
    };
    check(&header, guest_cid).map_err(|error| Rejection {
        header: Some(header),
        error,
    })?;
    Ok(header)
}

/// The header of a chain virtio-vsock refused (a data descriptor missing or too short, `len`
/// too large, ...), when the head descriptor holds one, so the guest can be answered.
fn peek_header<M>(mem: &GuestMemoryMmap, mut chain: DescriptorChain<M>) -> Option<Header>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let head = chain.next()?;
    if head.is_write_only() || usize::try_from(head.len()).ok()? < HEADER_BYTES {
        return None;
    }
    let mut bytes = [0u8; HEADER_BYTES];
    mem.read_slice(&mut bytes, head.addr()).ok()?;
    Some(Header::from_bytes(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::vsock::test_utils::{guest_header, GUEST_CID};
    use crate::virtio::vsock::{OP_RW, SHUTDOWN_BOTH};

    #[test]
    fn header_round_trips_through_wire_form() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0xdead_beef,
            dst_port: 7,
            len: 9,
            type_: 1,
            op: 4,
            flags: SHUTDOWN_BOTH,
            buf_alloc: 0x1234,
            fwd_cnt: 0x5678,
        };
        assert_eq!(Header::from_bytes(&h.to_bytes()), h);
    }

    #[test]
    fn header_wire_form_matches_spec_offsets() {
        let h = Header {
            len: 0x0a0b_0c0d,
            op: 0x0102,
            fwd_cnt: 0xaabb_ccdd,
            ..Header::default()
        };
        let b = h.to_bytes();
        // len at 24, op at 30, fwd_cnt at 40, all little-endian.
        assert_eq!((b[24], b[30], b[40]), (0x0d, 0x02, 0xdd));
    }

    #[test]
    fn check_accepts_guest_stream_packet() {
        assert!(check(&guest_header(OP_RW, 1000, 80), GUEST_CID).is_ok());
    }

    #[test]
    fn check_foreign_src_cid_is_refused() {
        let h = Header {
            src_cid: GUEST_CID + 1,
            ..guest_header(OP_RW, 1000, 80)
        };
        assert!(matches!(
            check(&h, GUEST_CID),
            Err(PacketError::SrcCid { .. })
        ));
    }

    #[test]
    fn check_dst_cid_not_host_is_refused() {
        let h = Header {
            dst_cid: 1,
            ..guest_header(OP_RW, 1000, 80)
        };
        assert!(matches!(
            check(&h, GUEST_CID),
            Err(PacketError::DstCid { cid: 1 })
        ));
    }

    #[test]
    fn check_seqpacket_type_is_refused() {
        let h = Header {
            type_: 2,
            ..guest_header(OP_RW, 1000, 80)
        };
        assert!(matches!(
            check(&h, GUEST_CID),
            Err(PacketError::Type { type_: 2 })
        ));
    }

    #[test]
    fn check_op_zero_and_eight_are_refused() {
        let zero = guest_header(0, 1000, 80);
        let eight = guest_header(8, 1000, 80);
        assert!(matches!(
            check(&zero, GUEST_CID),
            Err(PacketError::Op { op: 0 })
        ));
        assert!(matches!(
            check(&eight, GUEST_CID),
            Err(PacketError::Op { op: 8 })
        ));
    }

    #[test]
    fn reset_reply_swaps_ports_and_echoes_cid() {
        let h = Header {
            dst_cid: 9,
            ..guest_header(OP_RW, 1000, 80)
        };
        let r = h.reset_reply(GUEST_CID);
        assert_eq!(
            (r.src_cid, r.dst_cid, r.src_port, r.dst_port, r.op),
            (9, GUEST_CID, 80, 1000, OP_RST)
        );
    }
}
