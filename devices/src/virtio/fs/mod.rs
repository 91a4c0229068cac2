//! virtio-fs (virtio 1.2 §5.11) as a vhost-user frontend: `virtiofsd` (or any vhost-user-fs
//! backend) serves the queues straight from guest RAM, which crib shares with it as a
//! memfd. Kicks reach the daemon through the queues' ioeventfds and its completions raise
//! the MSI-X irqfds directly, so requests never cross crib's threads.
//!
//! crib itself only negotiates, hands over the rings, and watches the connection: when
//! the daemon goes away, [`failover`] takes the rings back and answers every request
//! with `ENOTCONN`, so the guest sees errors on the mount and crib keeps running.

mod device;
pub mod failover;

pub use device::{check_tag, Fs, FsConfig};

/// virtio device id of a file system device.
pub const TYPE_FS: u32 = 26;
/// Longest tag: the `tag` field of the configuration space (no NUL needed when full).
pub const TAG_BYTES: usize = 36;
/// Bytes of configuration space: the tag, then `num_request_queues` (le32).
pub const CONFIG_SPACE_BYTES: usize = TAG_BYTES + 4;
/// Most request queues crib gives one device (plus the high-priority queue).
pub const MAX_REQUEST_QUEUES: u16 = 64;

/// Errors connecting to or setting up the vhost-user backend.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs tag '{tag}' is {len} bytes; at most {TAG_BYTES} fit the config space")]
    TagTooLong { tag: String, len: usize },
    #[error("virtio-fs tag is empty: the guest mounts the file system by its tag")]
    EmptyTag,
    #[error(
        "cannot connect to the vhost-user-fs backend at {socket}: is virtiofsd running \
         with --socket-path={socket}?"
    )]
    Connect {
        socket: String,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("vhost-user-fs backend at {socket}: {step} failed")]
    Protocol {
        socket: String,
        step: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "vhost-user-fs backend at {socket} serves at most {max} queues; {wanted} were asked \
         for (queues=N counts request queues, plus one high-priority queue)"
    )]
    TooManyQueues {
        socket: String,
        wanted: u64,
        max: u64,
    },
    #[error("vhost-user-fs backend at {socket} does not offer VIRTIO_F_VERSION_1")]
    NoVersion1 { socket: String },
}
