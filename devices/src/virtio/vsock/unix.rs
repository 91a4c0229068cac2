//! The two Unix-socket calls std lacks: a connect that never blocks the worker (std's
//! waits while the listener's backlog is full) and a send that cannot raise SIGPIPE on a
//! closed peer.

use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Connects a non-blocking stream socket to `path`. A listener with a full backlog fails
/// with `WouldBlock` instead of waiting.
pub(crate) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    // sun_path needs a terminating NUL; an interior NUL would name another path.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path too long for a Unix socket or contains NUL",
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    let addr_len = offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    let addr_len = libc::socklen_t::try_from(addr_len)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;

    // SAFETY: socket() takes no pointers; the returned descriptor is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket() and nothing else owns it.
    let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    debug_assert!(usize::try_from(addr_len).is_ok_and(|l| l <= size_of::<libc::sockaddr_un>()));
    // SAFETY: `addr` is an initialised sockaddr_un on this frame, alive for the call, and
    // `addr_len` (at most its size, as the path is shorter than sun_path) covers the family
    // and the NUL-terminated path; the descriptor is open, owned by `stream`.
    let ret = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
            addr_len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

/// Sends what the socket takes of `buf` now, without SIGPIPE if the peer is gone (EPIPE
/// instead). `WouldBlock` when it takes nothing.
pub(crate) fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a live slice of `buf.len()` readable bytes for the duration of
        // the call; the descriptor is open, owned by `stream`.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                buf.as_ptr().cast::<libc::c_void>(),
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        match usize::try_from(n) {
            Ok(n) => return Ok(n),
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    use super::*;
    use crate::virtio::vsock::test_utils::temp_socket_path;

    #[test]
    fn connect_nonblocking_reaches_listener() {
        let path = temp_socket_path("unix-connect");
        let listener = UnixListener::bind(&path).unwrap();

        let stream = connect_nonblocking(&path).unwrap();

        let (mut accepted, _) = listener.accept().unwrap();
        send_nosignal(&stream, b"hi").unwrap();
        let mut buf = [0u8; 2];
        accepted.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn connect_nonblocking_without_listener_fails() {
        let path = temp_socket_path("unix-nobody");
        assert!(connect_nonblocking(&path).is_err());
    }

    #[test]
    fn connect_nonblocking_path_too_long_is_invalid_input() {
        let long = Path::new("/tmp").join("x".repeat(200));
        let err = connect_nonblocking(&long).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn send_nosignal_to_closed_peer_is_epipe() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let err = send_nosignal(&a, b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPIPE));
    }
}
