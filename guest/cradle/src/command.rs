//! The test hook: run the command the kernel passed to init, reap zombies
//! while waiting for it, and report how it ended.
//!
//! Everything after `--` on the kernel command line arrives as init's
//! argv[1..]. The child inherits the console as stdio. As PID 1, cradle is
//! the parent of every orphan, so it waits for any child and throws away
//! the statuses that are not the command's.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus};

use thiserror::Error;

/// PATH for the command: the kernel gives init only HOME and TERM.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Errors of the command module.
#[derive(Debug, Error)]
pub enum CommandError {
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot wait for {program}")]
    Wait {
        program: String,
        #[source]
        source: io::Error,
    },
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Exited(i32),
    Killed(i32),
}

impl Outcome {
    /// Decodes a raw `waitpid` status. Stop/continue statuses cannot arrive
    /// (no WUNTRACED); if one did it would read as signal 0, not a panic.
    pub fn from_wait_status(status: i32) -> Self {
        let status = ExitStatus::from_raw(status);
        match (status.code(), status.signal()) {
            (Some(code), _) => Self::Exited(code),
            (None, Some(signal)) => Self::Killed(signal),
            (None, None) => Self::Killed(0),
        }
    }
}

impl Outcome {
    /// `exited with status N` or `killed by signal S`, for log lines.
    pub fn describe(&self) -> String {
        match self {
            Self::Exited(code) => format!("exited with status {code}"),
            Self::Killed(signal) => format!("killed by signal {signal}"),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "command {}", self.describe())
    }
}

/// Runs `argv` (program first) with the console as stdio and waits for it,
/// reaping every other child that exits meanwhile.
pub fn run(program: &OsString, args: &[OsString]) -> Result<Outcome, CommandError> {
    let name = program.to_string_lossy().into_owned();
    let mut command = Command::new(program);
    command.args(args);
    if std::env::var_os("PATH").is_none() {
        command.env("PATH", DEFAULT_PATH);
    }
    let child = command.spawn().map_err(|source| CommandError::Spawn {
        program: name.clone(),
        source,
    })?;
    let pid = libc::pid_t::try_from(child.id()).map_err(|_| CommandError::Wait {
        program: name.clone(),
        source: io::Error::from(io::ErrorKind::InvalidData),
    })?;
    // `child` is never waited through std: the loop below reaps it.
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid writes one int through the pointer, which refers to
        // a live local.
        let reaped = unsafe { libc::waitpid(-1, &mut status, 0) };
        if reaped == pid {
            return Ok(Outcome::from_wait_status(status));
        }
        if reaped < 0 {
            let source = io::Error::last_os_error();
            if source.kind() != io::ErrorKind::Interrupted {
                return Err(CommandError::Wait {
                    program: name,
                    source,
                });
            }
        }
        // Another process (an orphan) was reaped: keep waiting.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_exit_status_three_is_exited_three() {
        // waitpid encodes exit codes in bits 8..16.
        assert_eq!(Outcome::from_wait_status(3 << 8), Outcome::Exited(3));
    }

    #[test]
    fn outcome_sigkill_is_killed_nine() {
        assert_eq!(Outcome::from_wait_status(libc::SIGKILL), Outcome::Killed(9));
    }

    #[test]
    fn outcome_display_matches_the_console_contract() {
        assert_eq!(
            Outcome::Exited(3).to_string(),
            "command exited with status 3"
        );
        assert_eq!(Outcome::Killed(9).to_string(), "command killed by signal 9");
    }

    #[test]
    fn run_true_exits_zero() {
        let _children = crate::testing::children_lock();
        let outcome = run(&OsString::from("true"), &[]).unwrap();

        assert_eq!(outcome, Outcome::Exited(0));
    }

    #[test]
    fn run_missing_program_is_a_spawn_error() {
        let _children = crate::testing::children_lock();
        let error = run(&OsString::from("/nonexistent/cradle-test"), &[]).unwrap_err();

        assert!(matches!(error, CommandError::Spawn { .. }));
    }
}
