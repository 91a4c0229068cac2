//! Async reads and writes on a raw file descriptor: an accepted vsock
//! connection, a pty master, a pipe end. The fd is made non-blocking and
//! registered with tokio's reactor ([`AsyncFd`]); `read(2)`/`write(2)` do
//! the I/O. tokio has this for Unix sockets and pipes but not for AF_VSOCK
//! or a pty, and one small audited wrapper is better than three.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A non-blocking fd with tokio's `AsyncRead` and `AsyncWrite`.
pub struct FdStream {
    fd: AsyncFd<OwnedFd>,
    /// A pty master reads EIO once the last slave fd is closed: that is
    /// its end of file.
    eio_is_eof: bool,
}

impl FdStream {
    /// Makes `fd` non-blocking and registers it. Needs a tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(fd.as_fd())?;
        Ok(Self {
            fd: register(fd)?,
            eio_is_eof: false,
        })
    }

    /// A pty master: EIO reads as end of file.
    pub fn pty_master(fd: OwnedFd) -> io::Result<Self> {
        let mut stream = Self::new(fd)?;
        stream.eio_is_eof = true;
        Ok(stream)
    }
}

/// Registers `fd` with the current runtime's reactor (call it only from
/// inside the runtime).
pub fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is an open fd that stays open, referring to the
    // same file description, until it is dropped, which happens only when
    // the AsyncFd that now owns it is; its as_raw_fd always returns that fd.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

/// Sets `O_NONBLOCK` on the open file description of `fd`.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument and only reads the fd's flags.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL takes an int of flags; fd is open (borrowed).
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn read_fd(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: read writes at most buf.len() bytes into buf, a live
    // exclusive slice; fd is open (borrowed).
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

fn write_fd(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: write reads at most buf.len() bytes from buf, a live slice;
    // fd is open (borrowed).
    let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| read_fd(fd.get_ref().as_fd(), unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(error)) if this.eio_is_eof && error.raw_os_error() == Some(libc::EIO) => {
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(error)) if error.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(error)) => return Poll::Ready(Err(error)),
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| write_fd(fd.get_ref().as_fd(), buf)) {
                Ok(Err(error)) if error.kind() == io::ErrorKind::Interrupted => {}
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Half-closes a socket (the peer reads end of file, and can still
    /// send); a pipe or pty has no half-close and is left as it is.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: shutdown takes a plain fd, open as long as self lives, and
        // a constant; it touches no memory.
        let rc = unsafe { libc::shutdown(self.fd.get_ref().as_raw_fd(), libc::SHUT_WR) };
        if rc < 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::ENOTSOCK) {
                return Poll::Ready(Err(error));
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn fd_stream_round_trips_and_shutdown_is_end_of_file() {
        runtime().block_on(async {
            let (a, b) = UnixStream::pair().unwrap();
            let mut a = FdStream::new(OwnedFd::from(a)).unwrap();
            let mut b = FdStream::new(OwnedFd::from(b)).unwrap();

            a.write_all(b"hello").await.unwrap();
            a.shutdown().await.unwrap();
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();

            assert_eq!(got, b"hello");
        });
    }
}
