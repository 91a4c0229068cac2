//! The AF_VSOCK listener vdocker serves on in the guest (any CID, port
//! [`VDOCKER_PORT`]); the host side forwards a Unix socket to it.
//!
//! A libc wrapper rather than the `tokio-vsock` crate: that one brings the
//! `vsock` and `nix` crates (build time and static-binary size) for what is
//! four syscalls here (`socket`, `bind`, `listen`, `accept4`); the accepted
//! connection is an [`FdStream`] like the pty and pipes.

use std::fs::File;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use thiserror::Error;
use tokio::io::unix::AsyncFd;

use super::fdio::{register, FdStream};

/// The guest port of the Docker API.
pub const VDOCKER_PORT: u32 = 1;
/// Pending connections the kernel queues.
const BACKLOG: libc::c_int = 128;
/// The vsock misc device; its ioctl tells the guest's CID.
const VSOCK_DEVICE: &str = "/dev/vsock";
/// `_IO(7, 0xb9)` from linux/vm_sockets.h (not in the libc crate).
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;

/// Errors of setting up the listener.
#[derive(Debug, Error)]
pub enum VsockError {
    #[error("the kernel has no AF_VSOCK sockets (is the vsock module loaded?)")]
    Socket {
        #[source]
        source: io::Error,
    },
    #[error("no vsock device (the VM has no virtio-vsock)")]
    NoDevice,
    #[error("cannot listen on vsock port {port}")]
    Listen {
        port: u32,
        #[source]
        source: io::Error,
    },
}

/// A listening AF_VSOCK stream socket.
pub struct VsockListener {
    fd: AsyncFd<OwnedFd>,
}

impl VsockListener {
    /// Listens on `port` of any CID. Needs a tokio runtime.
    pub fn bind(port: u32) -> Result<Self, VsockError> {
        // SAFETY: socket takes constants and returns a new fd or -1.
        let raw = unsafe {
            libc::socket(
                libc::AF_VSOCK,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        if raw < 0 {
            return Err(VsockError::Socket {
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: raw is a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if local_cid() == Some(libc::VMADDR_CID_ANY) {
            return Err(VsockError::NoDevice);
        }
        let listen_error = |source| VsockError::Listen { port, source };
        // SAFETY: sockaddr_vm is plain data for which all-zero is valid.
        let mut address: libc::sockaddr_vm = unsafe { mem::zeroed() };
        address.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        address.svm_port = port;
        address.svm_cid = libc::VMADDR_CID_ANY;
        let length = libc::socklen_t::try_from(mem::size_of::<libc::sockaddr_vm>())
            .map_err(|_| listen_error(io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: bind reads `length` bytes from the pointer, which refers
        // to a live sockaddr_vm of that size; fd is open.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const address).cast::<libc::sockaddr>(),
                length,
            )
        };
        if rc < 0 {
            return Err(listen_error(io::Error::last_os_error()));
        }
        // SAFETY: listen takes a plain fd and a backlog.
        if unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } < 0 {
            return Err(listen_error(io::Error::last_os_error()));
        }
        let fd = register(fd).map_err(listen_error)?;
        Ok(Self { fd })
    }

    /// The next connection, non-blocking and registered.
    pub async fn accept(&self) -> io::Result<FdStream> {
        loop {
            let mut guard = self.fd.readable().await?;
            if let Ok(result) = guard.try_io(|fd| accept_fd(fd.get_ref())) {
                return FdStream::new(result?);
            }
        }
    }
}

fn accept_fd(listener: &OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers ask accept4 not to report the peer;
    // the listener fd is open.
    let raw = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// The guest's CID from `/dev/vsock`: `VMADDR_CID_ANY` when no transport
/// (no device) is registered; `None` when it cannot be asked.
fn local_cid() -> Option<u32> {
    let device = File::open(VSOCK_DEVICE).ok()?;
    let mut cid: libc::c_uint = 0;
    // SAFETY: this ioctl writes one unsigned int through the pointer, which
    // refers to a live local; the fd is open.
    let rc = unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            IOCTL_VM_SOCKETS_GET_LOCAL_CID,
            &mut cid as *mut libc::c_uint,
        )
    };
    (rc == 0).then_some(cid)
}
