//! containerd's FIFOs and the pod's Docker API connections: a process's output from a
//! (hijacked or logs) stream into the stdout and stderr FIFOs, and the stdin FIFO into a
//! hijacked connection until the FIFO ends or containerd's CloseIO asks for it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::docker::{self, Stream};

/// How long the stdin pump waits for input before it looks at the CloseIO flag, in ms.
const STDIN_POLL_MS: i32 = 100;
/// Read size of stdin and of a TTY's output.
const BUFFER_BYTES: usize = 32 * 1024;

/// Opens a FIFO (or file) containerd gave for an output; none for an empty path.
///
/// Without blocking: the client (ctr) opens its read ends before it creates the task, so
/// a FIFO without a reader means the client has gone (`ctr run -d` returns once the task
/// started). A blocking open would then wait forever, and the process's exit, read after
/// its output, would never reach containerd. Writes block as usual once it is open.
pub fn open_output(path: &str) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if path.is_empty() {
        return None;
    }
    match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => {
            // SAFETY: F_GETFL/F_SETFL on a descriptor `file` owns; no memory is passed.
            unsafe {
                let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
                if flags >= 0 {
                    libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
                }
            }
            Some(file)
        }
        Err(error) if error.raw_os_error() == Some(libc::ENXIO) => {
            log::info!("nobody reads {path} (the client detached); that output is dropped");
            None
        }
        Err(error) => {
            log::warn!("cannot open {path}: {error}; that output is dropped");
            None
        }
    }
}

/// Writes `output` into the FIFOs `stdout` and `stderr` until it ends: raw bytes to
/// stdout for a TTY, else Docker's multiplexed frames split by stream. A FIFO whose
/// reader went away drops the rest of that stream only. The FIFOs are closed on return,
/// which tells containerd's side the output is complete.
pub fn copy_output(output: impl Read, tty: bool, stdout: &str, stderr: &str) {
    let mut out = open_output(stdout);
    let mut err = open_output(stderr);
    let result = if tty {
        copy_raw(output, &mut out)
    } else {
        docker::demux(output, |stream, bytes| {
            let target = match stream {
                Stream::Stdout => &mut out,
                Stream::Stderr => &mut err,
            };
            if let Some(file) = target.as_mut() {
                if file.write_all(bytes).is_err() {
                    *target = None;
                }
            }
            Ok(())
        })
    };
    if let Err(error) = result {
        log::warn!("the process's output stream broke: {error}");
    }
}

fn copy_raw(mut output: impl Read, out: &mut Option<File>) -> io::Result<()> {
    let mut buffer = vec![0u8; BUFFER_BYTES];
    loop {
        let read = match output.read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(read) => read,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if let Some(file) = out.as_mut() {
            if file
                .write_all(buffer.get(..read).unwrap_or_default())
                .is_err()
            {
                *out = None;
            }
        }
    }
}

/// Copies the stdin FIFO `path` into `to` until the FIFO's writers are gone, `to` fails,
/// or `closed` is set (containerd's CloseIO) and no more input is waiting; then shuts
/// down `to`'s write side, so the process reads end of file. Runs on its own thread (the
/// FIFO's open blocks until containerd's side has opened it).
pub fn pump_stdin(path: &str, to: UnixStream, closed: &Arc<AtomicBool>) {
    match File::open(path) {
        Ok(fifo) => {
            if let Err(error) = pump(&fifo, &to, closed) {
                log::warn!("stdin from {path} stopped: {error}");
            }
        }
        Err(error) => log::warn!("cannot open stdin {path}: {error}; the process gets none"),
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn pump(mut fifo: &File, mut to: &UnixStream, closed: &AtomicBool) -> io::Result<()> {
    let mut buffer = vec![0u8; BUFFER_BYTES];
    loop {
        let mut poll = libc::pollfd {
            fd: fifo.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes the one pollfd it is given, a live local; the fd
        // is open (borrowed from `fifo`) for the call.
        let ready = unsafe { libc::poll(&mut poll, 1, STDIN_POLL_MS) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if ready == 0 {
            // Nothing waiting: the input written before CloseIO has been sent.
            if closed.load(Ordering::Acquire) {
                return Ok(());
            }
            continue;
        }
        let read = match fifo.read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(read) => read,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(buffer.get(..read).unwrap_or_default())?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    /// A FIFO in a fresh temporary directory.
    fn fifo(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("crib-shim-stdio-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fifo");
        let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path, live across the call.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        path
    }

    #[test]
    fn stdin_is_copied_until_the_writer_closes_then_shut_down() {
        let path = fifo("eof");
        let (ours, theirs) = UnixStream::pair().unwrap();
        let closed = Arc::new(AtomicBool::new(false));
        let writer_path = path.clone();
        let writer = std::thread::spawn(move || {
            let mut fifo = OpenOptions::new().write(true).open(writer_path).unwrap();
            fifo.write_all(b"hello\n").unwrap();
        });
        let pump_path = path.to_str().unwrap().to_owned();
        let pump = std::thread::spawn(move || pump_stdin(&pump_path, ours, &closed));
        let mut got = String::new();
        (&theirs).read_to_string(&mut got).unwrap();
        writer.join().unwrap();
        pump.join().unwrap();
        assert_eq!(got, "hello\n");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn close_io_ends_stdin_after_what_was_written() {
        let path = fifo("closeio");
        let (ours, theirs) = UnixStream::pair().unwrap();
        let closed = Arc::new(AtomicBool::new(false));
        let pump_path = path.to_str().unwrap().to_owned();
        let pump_closed = Arc::clone(&closed);
        let pump = std::thread::spawn(move || pump_stdin(&pump_path, ours, &pump_closed));
        // The writer stays open (as containerd's may): only CloseIO ends the input.
        let mut fifo = OpenOptions::new().write(true).open(&path).unwrap();
        fifo.write_all(b"abc").unwrap();
        closed.store(true, Ordering::Release);
        let mut got = String::new();
        (&theirs).read_to_string(&mut got).unwrap();
        pump.join().unwrap();
        assert_eq!(got, "abc");
        drop(fifo);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn tty_output_is_copied_raw_and_frames_are_split() {
        let dir = std::env::temp_dir().join(format!("crib-shim-out-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (out, err) = (dir.join("out"), dir.join("err"));
        std::fs::write(&out, "").unwrap();
        copy_output(&b"\x01raw"[..], true, out.to_str().unwrap(), "");
        assert_eq!(std::fs::read(&out).unwrap(), b"\x01raw");
        std::fs::write(&out, "").unwrap();
        std::fs::write(&err, "").unwrap();
        let mut frames = vec![1, 0, 0, 0, 0, 0, 0, 2];
        frames.extend(b"o\n");
        frames.extend([2, 0, 0, 0, 0, 0, 0, 2]);
        frames.extend(b"e\n");
        copy_output(
            &frames[..],
            false,
            out.to_str().unwrap(),
            err.to_str().unwrap(),
        );
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "o\n");
        assert_eq!(std::fs::read_to_string(&err).unwrap(), "e\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `ctr run -d`: the client is gone before the shim opens its output FIFO.
    #[test]
    fn an_output_fifo_without_a_reader_is_dropped_at_once() {
        let path = fifo("noreader");
        // A blocking open would hang here.
        assert!(open_output(&path.display().to_string()).is_none());
        // With a reader it opens, and writes block as usual (not O_NONBLOCK).
        let reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let file = open_output(&path.display().to_string()).unwrap();
        // SAFETY: F_GETFL on a live descriptor.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
        drop((reader, file));
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
