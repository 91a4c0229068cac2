//! virtio-net (virtio 1.2 §5.1) on a Linux tap device.
//!
//! - `tap.rs`: [`Tap`], the `/dev/net/tun` queues with a 12-byte vnet header
//!   (`virtio_net_hdr_v1`), and the offloads the driver accepted (`TUNSETOFFLOAD`).
//! - `device.rs`: [`Net`], its features, configuration space (MAC, link up, queue pairs),
//!   activate/reset; one worker thread per queue pair.
//! - `worker.rs`: a queue pair's thread: epoll over the tap queue, the RX/TX kicks, the
//!   rate limiter timers and (pair 0 of a multiqueue device) the control queue.
//! - `metrics.rs`: [`NetMetrics`], counters shared with the VMM.
//!
//! Frames cross the tap with their vnet header: the driver's TX header goes to the tap as
//! is (the kernel applies checksum and segmentation offloads), and the tap's RX header goes
//! to the driver with `num_buffers` set by the device.
//!
//! Choices where the spec leaves room:
//! - **A malformed TX chain** (a device-writable descriptor, a buffer outside guest memory,
//!   less than a vnet header, more than [`MAX_FRAME_BYTES`]) is dropped, completed with
//!   length 0 and counted in `tx_malformed`. The tap refusing a frame (a bad GSO header)
//!   is counted in `tx_errors`.
//! - **RX.** With `VIRTIO_NET_F_MRG_RXBUF` a frame spreads over as many chains as it needs;
//!   without, it must fit one chain or is dropped (`rx_dropped`). An unusable RX chain (a
//!   device-readable descriptor, outside guest memory, no room for the header) is completed
//!   with length 0 on its own and counted in `rx_bad_buffers`.
//! - **Rate limits** apply to each direction of each queue pair separately; a limited
//!   frame waits (the tap queues behind it), nothing is dropped.

pub mod device;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod metrics;
pub mod tap;

mod worker;

use std::io;

pub use device::{Net, NetConfig};
pub use metrics::{NetMetrics, NetMetricsSnapshot};
pub use tap::Tap;

/// Bytes of `struct virtio_net_hdr_v1` (with `num_buffers`), the header of every frame.
pub const VNET_HDR_BYTES: usize = 12;
/// Largest frame either way, header included: a 64 KiB GSO frame with its Ethernet and
/// VLAN headers (Firecracker's bound).
pub const MAX_FRAME_BYTES: usize = VNET_HDR_BYTES + 65550;
/// Most queue pairs of one device.
pub const MAX_QUEUE_PAIRS: u16 = 16;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Longest tap interface name (`IFNAMSIZ` - 1).
pub const MAX_IFNAME_BYTES: usize = 15;

/// Errors of the net device's set-up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(
        "tap name '{0}' is not valid: use 1 to {MAX_IFNAME_BYTES} bytes without '/', ' ' or ','"
    )]
    Name(String),
    #[error("queues={0}: use 1 to {MAX_QUEUE_PAIRS} queue pairs")]
    Queues(u16),
    #[error(
        "tap {0} does not exist: create it (ip tuntap add dev {0} mode tap user $USER, \
         add multi_queue for queues>1) or give ifname={0} to let crib create it \
         (needs CAP_NET_ADMIN)"
    )]
    NoSuchTap(String),
    #[error("cannot open /dev/net/tun: load the tun module and check the file's permissions")]
    OpenTun(#[source] io::Error),
    #[error(
        "cannot attach to tap {name}: it must be a tap (not tun) owned by crib's user, \
         created with multi_queue when queues>1, or crib needs CAP_NET_ADMIN to create it"
    )]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("tap {name} refused the 12-byte vnet header (kernel too old?)")]
    VnetHeader {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up the rate limiter of net {name}")]
    RateLimiter {
        name: String,
        #[source]
        source: crate::rate_limiter::RateLimiterError,
    },
}
