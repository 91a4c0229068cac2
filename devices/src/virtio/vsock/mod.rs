//! virtio-vsock (virtio 1.2 §5.10): stream sockets between the guest and host processes,
//! with the "hybrid" Unix-socket backend of Firecracker and Cloud Hypervisor.
//!
//! - `device.rs`: [`Vsock`], its features and configuration space (`guest_cid`),
//!   activate/reset, and the Unix listener it owns.
//! - `packet.rs`: the packet header, its checks, and a TX chain to a typed packet; pure.
//! - `connection.rs`: one connection's state machine and credit accounting.
//! - `muxer.rs`: the host side: the listener, the `CONNECT` handshake, the connections by
//!   port pair, and what goes to the guest next.
//! - `worker.rs`: `VsockWorker`, the device's one thread: epoll over the queue kicks, the
//!   listener and every host socket; TX and RX queue processing.
//! - `unix.rs`: the two socket calls std lacks (non-blocking connect, send without SIGPIPE).
//! - `metrics.rs`: [`VsockMetrics`], counters shared with the VMM.
//!
//! The host protocol. crib listens on the `socket=` path. A host process connects and
//! writes `CONNECT <port>\n`; crib asks the guest for a connection to that port from an
//! ephemeral host port and, when the guest accepts, answers `OK <host port>\n`; then the
//! socket carries the stream both ways. If the guest refuses (RST) the socket is closed. A
//! guest connection to host port `P` connects to the Unix socket `<socket>_P`; the guest
//! gets RST when nothing listens there.
//!
//! Choices where the spec leaves room:
//! - **Streams only.** `VIRTIO_VSOCK_F_SEQPACKET` is not offered; a SEQPACKET packet is
//!   refused with RST like any other malformed packet.
//! - **A malformed packet** (bad chain, foreign source CID, destination other than the host,
//!   unknown type or op, `len` over [`MAX_PKT_DATA_BYTES`], data beyond the credit we gave,
//!   data on an unknown connection) is dropped, its chain completed, and answered with RST
//!   for its port pair when its header could be read; never with RST to a RST. The
//!   connection the pair named, if any, is closed.
//! - **Half-close.** A host socket at EOF becomes SHUTDOWN(SEND) once its data reached the
//!   guest; a fully closed one (EPOLLHUP) becomes SHUTDOWN(SEND|RCV), then RST when the
//!   guest answers or after [`CLOSE_TIMEOUT_MS`].
//! - **No event queue traffic.** Its buffers are accepted and kept: the device never sends
//!   `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (a device reset closes every connection anyway).

pub mod device;
pub mod metrics;

mod connection;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod muxer;
mod packet;
#[cfg(test)]
pub(crate) mod test_utils;
pub(crate) mod unix;
mod worker;

use std::io;
use std::path::PathBuf;

pub use device::{Vsock, VsockConfig};
pub use metrics::{VsockMetrics, VsockMetricsSnapshot};

/// The host's CID (`VMADDR_CID_HOST`): the destination of every guest packet.
pub const HOST_CID: u64 = 2;
/// Smallest CID a guest may have: 0, 1 and 2 are the hypervisor, local and host.
pub const MIN_GUEST_CID: u64 = 3;
/// Largest CID a guest may have: `u32::MAX` is `VMADDR_CID_ANY`.
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// Index of the receive queue (device to driver).
pub const RX_QUEUE: u16 = 0;
/// Index of the transmit queue (driver to device).
pub const TX_QUEUE: u16 = 1;
/// Index of the event queue.
pub const EVENT_QUEUE: u16 = 2;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// Largest payload of one packet either way (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_DATA_BYTES: u32 = 64 << 10;
/// Bytes of guest data the device buffers per connection for its host socket: the credit
/// (`buf_alloc`) it advertises.
pub const CONN_BUF_BYTES: u32 = 256 << 10;
/// Bytes of host data the device reads ahead per connection; at this much it stops reading
/// the host socket until the guest takes some.
pub const HOST_READ_AHEAD_BYTES: usize = 64 << 10;
/// Most connections (and host sockets still in the `CONNECT` handshake) at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most RSTs for unknown or closed connections waiting for a receive buffer; beyond this a
/// guest flooding bad packets without receive buffers gets no more answers.
pub const MAX_PENDING_RESETS: usize = 1024;
/// How long a host socket has to send its `CONNECT` line.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 2_000;
/// How long the guest has to answer a host-initiated REQUEST.
pub const CONNECT_TIMEOUT_MS: u64 = 2_000;
/// How long a closing connection waits for the guest's RST (or to flush) before RST.
pub const CLOSE_TIMEOUT_MS: u64 = 2_000;

/// `type` of a stream socket (§5.10.6).
pub const TYPE_STREAM: u16 = 1;

/// `op` values (§5.10.6).
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flags: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both SHUTDOWN flags: the sender closed its socket.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Errors of the vsock device's set-up.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("cid={cid} is reserved: use a guest CID from {MIN_GUEST_CID} to {MAX_GUEST_CID}")]
    Cid { cid: u64 },
    #[error("vsock socket {path} exists and is not a socket: remove it or choose another socket=")]
    NotASocket { path: PathBuf },
    #[error(
        "vsock socket {path} is in use by a running process: stop it or choose another socket="
    )]
    InUse { path: PathBuf },
    #[error("cannot check vsock socket {path}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the stale vsock socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot listen on vsock socket {path}: check that its directory exists and is writable"
    )]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}
