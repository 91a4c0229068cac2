//! The console: cradle's log lines, and making sure fds 0, 1 and 2 are open.
//!
//! The kernel opens `/dev/console` for init as fds 0-2 before running it; if
//! the initramfs had no `/dev/console` that failed ("unable to open an
//! initial console") and the fds are closed until devtmpfs is mounted.
//! Every line goes out in one `write` to stderr, which is unbuffered and
//! never panics (unlike `println!`).

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;

/// Where the console device is once devtmpfs is mounted.
const CONSOLE_PATH: &str = "/dev/console";

/// Errors of the console module.
#[derive(Debug, Error)]
pub enum ConsoleError {
    #[error("cannot open {CONSOLE_PATH}")]
    Open {
        #[source]
        source: io::Error,
    },
    #[error("cannot duplicate the console onto fd {fd}")]
    Dup {
        fd: i32,
        #[source]
        source: io::Error,
    },
}

/// Writes `cradle: <message>` and a newline to the console, ignoring errors
/// (there is nowhere else to report them).
pub fn log(message: &str) {
    let line = format!("cradle: {message}\n");
    let _ = io::stderr().lock().write_all(line.as_bytes());
}

/// Copies a line of a pod process's output to cradle's stderr (`to_stderr`)
/// or stdout, both the console, in one write; errors are ignored.
pub fn echo(to_stderr: bool, bytes: &[u8]) {
    if to_stderr {
        let _ = io::stderr().lock().write_all(bytes);
    } else {
        let mut stdout = io::stdout().lock();
        let _ = stdout.write_all(bytes);
        let _ = stdout.flush();
    }
}

/// Logs `format!`-style arguments with the `cradle: ` prefix.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::console::log(&format!($($arg)*))
    };
}
pub(crate) use say;

/// Logs a fatal error and its chain of causes on one line:
/// `cradle: error: <error>: <cause>: <cause>`. Reserved for errors that end
/// the boot, so a harness can tell them from warnings.
pub fn log_error(error: &dyn std::error::Error) {
    log_chain("error", error);
}

/// Logs a problem the boot works around: `cradle: warning: <error>: <cause>`.
pub fn log_warning(error: &dyn std::error::Error) {
    log_chain("warning", error);
}

fn log_chain(level: &str, error: &dyn std::error::Error) {
    log(&format!("{level}: {}", error_chain(error)));
}

/// `<error>: <cause>: <cause>` on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    line
}

/// Opens `/dev/console` onto whichever of fds 0, 1 and 2 are closed.
pub fn ensure_stdio() -> Result<(), ConsoleError> {
    let closed: Vec<i32> = (0..=2).filter(|&fd| !is_open(fd)).collect();
    if closed.is_empty() {
        return Ok(());
    }
    let console = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(CONSOLE_PATH)
        .map_err(|source| ConsoleError::Open { source })?;
    // open(2) returns the lowest free fd, so it may already be one of 0-2.
    let console_fd = console.as_raw_fd();
    for fd in closed {
        if fd == console_fd {
            continue;
        }
        // SAFETY: dup2 takes two plain fd numbers; console_fd is open (owned
        // by `console`) and fd is a closed standard descriptor, so nothing
        // owned elsewhere is replaced.
        let rc = unsafe { libc::dup2(console_fd, fd) };
        if rc < 0 {
            return Err(ConsoleError::Dup {
                fd,
                source: io::Error::last_os_error(),
            });
        }
    }
    if console_fd <= 2 {
        // It now is a standard descriptor: keep it open for good.
        let _ = console.into_raw_fd();
    }
    Ok(())
}

/// Waits until everything written to the console has left the UART, so the
/// last lines are not lost when the VM powers off.
pub fn drain() {
    for fd in [1, 2] {
        // SAFETY: tcdrain takes a plain fd number and no memory; on a closed
        // fd or a non-tty it just fails, which is fine here.
        let _ = unsafe { libc::tcdrain(fd) };
    }
}

fn is_open(fd: i32) -> bool {
    // SAFETY: F_GETFD takes no argument and only reads the fd table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}
