//! The host side of the serial console: stdin to the guest's UART (an event-manager
//! subscriber on the VMM thread) and the terminal's raw mode while the guest owns it.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use devices::legacy::Serial;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

/// Largest chunk moved from stdin per wake-up; the UART FIFO is 64 bytes anyway.
const INPUT_CHUNK_BYTES: usize = 64;

/// Feeds stdin to the serial device.
pub struct ConsoleInput {
    serial: Arc<Mutex<Serial>>,
    stdin: std::io::Stdin,
}

impl ConsoleInput {
    pub fn new(serial: Arc<Mutex<Serial>>) -> Self {
        Self {
            serial,
            stdin: std::io::stdin(),
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        // epoll refuses regular files and /dev/null as stdin: then there is no input to
        // forward, which is fine (CI runs with no stdin).
        if let Err(e) = ops.add(Events::new(&self.stdin, EventSet::IN)) {
            tracing::debug!("console input disabled: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; INPUT_CHUNK_BYTES];
        let read = if events.event_set().contains(EventSet::IN) {
            self.stdin.lock().read(&mut buf)
        } else {
            Ok(0)
        };
        match read {
            Ok(0) | Err(_) => {
                // EOF, hang-up or error: stop watching stdin; the guest keeps running.
                let _ = ops.remove(Events::new(&self.stdin, EventSet::IN));
            }
            Ok(n) => {
                let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                let queued = serial.enqueue_input(&buf[..n]);
                if queued < n {
                    tracing::debug!(
                        "console input: guest FIFO full, dropped {} bytes",
                        n - queued
                    );
                }
            }
        }
    }
}

/// Puts the terminal on stdin in raw mode (so keys such as Ctrl-C reach the guest) and
/// restores it when dropped. Does nothing when stdin is not a terminal.
pub struct RawTerminal {
    saved: Option<libc::termios>,
}

impl RawTerminal {
    pub fn enable() -> Self {
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(fd) } != 1 {
            return Self { saved: None };
        }
        // SAFETY: termios is plain data; all-zero is a valid value to be overwritten.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a terminal and `saved` is a valid termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Self { saved: None };
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios; cfmakeraw only edits its fields.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so the host's own log lines stay readable.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: fd is a terminal and `raw` a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Self { saved: None };
        }
        Self { saved: Some(saved) }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = self.saved {
            // SAFETY: restores the attributes read from the same fd in `enable`.
            unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, &saved) };
        }
    }
}
