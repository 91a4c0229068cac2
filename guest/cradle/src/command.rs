//! The test hook: run the command the kernel passed to init, wait for it
//! and report how it ended.
//!
//! Everything after `--` on the kernel command line arrives as init's
//! argv[1..]. The child inherits the console as stdio. It is started
//! through the [`Reaper`], which also reaps every orphan meanwhile (cradle
//! is PID 1, the parent of all of them).

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus};
use std::sync::mpsc;

use thiserror::Error;

use crate::reaper::Reaper;

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

/// Runs `argv` (program first) with the console as stdio and waits for it.
pub fn run(
    program: &OsString,
    args: &[OsString],
    reaper: &Reaper,
) -> Result<Outcome, CommandError> {
    let name = program.to_string_lossy().into_owned();
    let mut command = Command::new(program);
    command.args(args);
    if std::env::var_os("PATH").is_none() {
        command.env("PATH", DEFAULT_PATH);
    }
    let (tx, rx) = mpsc::channel();
    reaper
        .spawn(&mut command, move |status| {
            let _ = tx.send(status);
        })
        .map_err(|source| CommandError::Spawn {
            program: name.clone(),
            source,
        })?;
    // The reaper drops the callback unsent only if the child was reaped
    // elsewhere, which nothing does while the command runs.
    let status = rx.recv().map_err(|_| CommandError::Wait {
        program: name,
        source: io::Error::from(io::ErrorKind::BrokenPipe),
    })?;
    Ok(Outcome::from_wait_status(status))
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
        let reaper = Reaper::new(crate::reaper::ReapMode::Own);

        let outcome = run(&OsString::from("true"), &[], &reaper).unwrap();

        assert_eq!(outcome, Outcome::Exited(0));
    }

    #[test]
    fn run_missing_program_is_a_spawn_error() {
        let reaper = Reaper::new(crate::reaper::ReapMode::Own);

        let error = run(&OsString::from("/nonexistent/cradle-test"), &[], &reaper).unwrap_err();

        assert!(matches!(error, CommandError::Spawn { .. }));
    }
}
