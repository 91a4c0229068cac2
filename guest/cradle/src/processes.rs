//! The pod's processes: how each is started (argv, env, cwd), the console
//! line printed when one ends, and the shutdown sweep. Starting, watching
//! and restarting them is the container registry's job
//! (`vdocker::containers`), which also serves them to `docker`.
//!
//! The shutdown sweep: before the volumes are unmounted, every process
//! still alive (orphaned daemons, say) gets SIGTERM, then SIGKILL.

use std::io;
use std::process::Command;
use std::time::{Duration, Instant};

use initramfs::podspec::ProcessSpec;
use thiserror::Error;

use crate::command::{Outcome, DEFAULT_PATH};
use crate::console::say;

/// Working directory of a process whose spec has no `cwd`.
const DEFAULT_CWD: &str = "/";
/// How long leftover processes get after SIGTERM, and then after SIGKILL.
pub const STOP_GRACE_MS: u64 = 1000;
/// How often the sweep checks whether they are gone.
const STOP_POLL_MS: u64 = 1;

/// Errors of starting a pod process.
#[derive(Debug, Error)]
pub enum ProcessError {
    #[error("process {name}: cannot run {program}")]
    Spawn {
        name: String,
        program: String,
        #[source]
        source: io::Error,
    },
}

/// The command for one process: argv, cradle's environment with a default
/// PATH, the spec's env over it, and the working directory. A process with an
/// image runs in its container (`containers::command`).
pub fn build_command(spec: &ProcessSpec) -> Option<Command> {
    if spec.image.is_some() || spec.rootfs.is_some() {
        // Its container's set-up stage, which runs the image's process.
        return crate::containers::command(spec);
    }
    let (program, args) = spec.argv.split_first()?;
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(spec.cwd.as_deref().unwrap_or(DEFAULT_CWD));
    if std::env::var_os("PATH").is_none() {
        command.env("PATH", DEFAULT_PATH);
    }
    for entry in &spec.env {
        // Validated as NAME=VALUE; anything else is skipped, not fatal.
        if let Some((name, value)) = entry.split_once('=') {
            command.env(name, value);
        }
    }
    Some(command)
}

/// Prints the console line a host test reads when a process ends:
/// `cradle: process <name> exited with status N` (or `killed by signal S`).
pub fn report_exit(name: &str, outcome: Outcome) {
    say!("process {name} {}", outcome.describe());
}

/// Stops every process left in the guest: SIGTERM, a grace period, then
/// SIGKILL. Every user process descends from PID 1, so once cradle has no
/// children left none is running. Only for PID 1 at shutdown: `kill(-1)`
/// signals every process the caller may signal.
pub fn stop_leftovers() {
    if !reap_until_no_children(Duration::ZERO) {
        say!("stopping leftover processes");
        for signal in [libc::SIGTERM, libc::SIGKILL] {
            // SAFETY: kill takes a pid and a signal number, no memory. As
            // PID 1, -1 reaches every process but cradle itself.
            unsafe { libc::kill(-1, signal) };
            if reap_until_no_children(Duration::from_millis(STOP_GRACE_MS)) {
                return;
            }
        }
        say!("warning: some processes did not stop");
    }
}

/// Asks every process but cradle to stop (SIGTERM) and forces the rest after `grace`
/// (SIGKILL), leaving the reaping to cradle's reaper (the command's waiter must see its
/// child's exit). Only for PID 1: `kill(-1)` signals every process the caller may.
pub fn terminate_all(grace: Duration) {
    say!(
        "stopping all processes (SIGKILL after {} s)",
        grace.as_secs()
    );
    // SAFETY: kill takes a pid and a signal number, no memory. As PID 1, -1 reaches every
    // process but cradle itself.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    std::thread::sleep(grace);
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
}

/// Reaps children until there are none (true) or `grace` has passed (false).
fn reap_until_no_children(grace: Duration) -> bool {
    let start = Instant::now();
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid writes one int through the pointer, which refers
        // to a live local; WNOHANG makes it return at once.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid > 0 {
            continue;
        }
        if pid < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // ECHILD: no children at all.
            return true;
        }
        if start.elapsed() >= grace {
            return false;
        }
        std::thread::sleep(Duration::from_millis(STOP_POLL_MS));
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::path::Path;

    use super::*;

    fn spec(argv: &[&str], env: &[&str], cwd: Option<&str>) -> ProcessSpec {
        ProcessSpec {
            name: "main".to_owned(),
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            env: env.iter().map(|s| (*s).to_owned()).collect(),
            cwd: cwd.map(str::to_owned),
            ..ProcessSpec::default()
        }
    }

    #[test]
    fn build_command_sets_argv_env_and_cwd() {
        let command = build_command(&spec(
            &["/bin/sh", "-c", "echo hi"],
            &["A=b=c"],
            Some("/tmp"),
        ))
        .unwrap();

        assert_eq!(command.get_program(), "/bin/sh");
        let args: Vec<&OsStr> = command.get_args().collect();
        assert_eq!(args, ["-c", "echo hi"]);
        assert_eq!(command.get_current_dir(), Some(Path::new("/tmp")));
        let a = command.get_envs().find(|(name, _)| *name == "A");
        assert_eq!(a, Some((OsStr::new("A"), Some(OsStr::new("b=c")))));
    }

    #[test]
    fn build_command_without_cwd_runs_in_root() {
        let command = build_command(&spec(&["true"], &[], None)).unwrap();

        assert_eq!(command.get_current_dir(), Some(Path::new("/")));
    }

    #[test]
    fn build_command_empty_argv_is_none() {
        assert!(build_command(&spec(&[], &[], None)).is_none());
    }

    #[test]
    fn process_line_matches_the_console_contract() {
        assert_eq!(Outcome::Exited(0).describe(), "exited with status 0");
    }
}
