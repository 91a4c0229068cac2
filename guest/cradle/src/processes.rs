//! The pod's processes: start every one in the spec (argv, env, cwd), wait
//! for all of them, print how each ended. For now there is no restart
//! policy and no supervision: this runs once, between volume setup and the
//! test hook.
//!
//! Also the shutdown sweep: before the volumes are unmounted, every process
//! still alive (orphaned daemons, say) gets SIGTERM, then SIGKILL.

use std::io;
use std::process::Command;
use std::time::{Duration, Instant};

use initramfs::podspec::ProcessSpec;
use thiserror::Error;

use crate::command::{Outcome, DEFAULT_PATH};
use crate::console::{self, say};

/// Working directory of a process whose spec has no `cwd`.
const DEFAULT_CWD: &str = "/";
/// How long leftover processes get after SIGTERM, and then after SIGKILL.
const STOP_GRACE_MS: u64 = 1000;
/// How often the sweep checks whether they are gone.
const STOP_POLL_MS: u64 = 1;

/// Errors of running the pod's processes.
#[derive(Debug, Error)]
pub enum ProcessError {
    #[error("process {name}: cannot run {program}")]
    Spawn {
        name: String,
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot wait for the pod's processes ({} still running: {})", names.len(), names.join(", "))]
    Wait {
        names: Vec<String>,
        #[source]
        source: io::Error,
    },
}

/// A started process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub name: String,
    pub pid: libc::pid_t,
}

/// Starts every process, then waits for all, printing
/// `process <name> exited with status N` as each ends. A process that
/// cannot start is reported as a warning; the others still run.
pub fn run_all(specs: &[ProcessSpec]) {
    let mut running = Vec::new();
    for spec in specs {
        match spawn(spec) {
            Ok(process) => running.push(process),
            Err(error) => console::log_warning(&error),
        }
    }
    let result = wait_all(running, wait_any, |name, outcome| {
        say!("process {name} {}", outcome.describe());
    });
    if let Err(error) = result {
        console::log_warning(&error);
    }
}

/// The command for one process: argv, cradle's environment with a default
/// PATH, the spec's env over it, and the working directory.
pub fn build_command(spec: &ProcessSpec) -> Option<Command> {
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

fn spawn(spec: &ProcessSpec) -> Result<Running, ProcessError> {
    let program = spec.argv.first().cloned().unwrap_or_default();
    let spawn_error = |source| ProcessError::Spawn {
        name: spec.name.clone(),
        program: program.clone(),
        source,
    };
    let mut command =
        build_command(spec).ok_or_else(|| spawn_error(io::ErrorKind::InvalidInput.into()))?;
    // The child is reaped by wait_all through waitpid, never through std.
    let child = command.spawn().map_err(spawn_error)?;
    let pid = libc::pid_t::try_from(child.id())
        .map_err(|_| spawn_error(io::ErrorKind::InvalidData.into()))?;
    Ok(Running {
        name: spec.name.clone(),
        pid,
    })
}

/// Waits until every process in `running` has ended, calling `report` for
/// each in the order they end. `wait` returns the next reaped child (pid,
/// raw status); children that are not in `running` (orphans) are ignored.
pub fn wait_all(
    mut running: Vec<Running>,
    mut wait: impl FnMut() -> io::Result<(libc::pid_t, i32)>,
    mut report: impl FnMut(&str, Outcome),
) -> Result<(), ProcessError> {
    while !running.is_empty() {
        match wait() {
            Ok((pid, status)) => {
                if let Some(index) = running.iter().position(|p| p.pid == pid) {
                    let process = running.remove(index);
                    report(&process.name, Outcome::from_wait_status(status));
                }
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(ProcessError::Wait {
                    names: running.into_iter().map(|p| p.name).collect(),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// `waitpid(-1)`: the next child that ends, any child.
fn wait_any() -> io::Result<(libc::pid_t, i32)> {
    let mut status: libc::c_int = 0;
    // SAFETY: waitpid writes one int through the pointer, which refers to a
    // live local.
    let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((pid, status))
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
        }
    }

    fn running(name: &str, pid: libc::pid_t) -> Running {
        Running {
            name: name.to_owned(),
            pid,
        }
    }

    /// A `wait` that returns `events` in order, then ECHILD.
    fn scripted(
        events: Vec<io::Result<(libc::pid_t, i32)>>,
    ) -> impl FnMut() -> io::Result<(libc::pid_t, i32)> {
        let mut events = events.into_iter();
        move || {
            events
                .next()
                .unwrap_or_else(|| Err(io::Error::from_raw_os_error(libc::ECHILD)))
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
    fn wait_all_reports_each_process_as_it_ends_and_skips_orphans() {
        let processes = vec![running("a", 10), running("b", 11)];
        // b exits 3, an orphan (99) is reaped, a is killed by SIGKILL.
        let wait = scripted(vec![Ok((11, 3 << 8)), Ok((99, 0)), Ok((10, libc::SIGKILL))]);
        let mut reports = Vec::new();

        wait_all(processes, wait, |name, outcome| {
            reports.push((name.to_owned(), outcome))
        })
        .unwrap();

        assert_eq!(
            reports,
            [
                ("b".to_owned(), Outcome::Exited(3)),
                ("a".to_owned(), Outcome::Killed(9))
            ]
        );
    }

    #[test]
    fn wait_all_retries_after_eintr() {
        let wait = scripted(vec![
            Err(io::Error::from_raw_os_error(libc::EINTR)),
            Ok((10, 0)),
        ]);
        let mut count = 0;

        wait_all(vec![running("a", 10)], wait, |_, _| count += 1).unwrap();

        assert_eq!(count, 1);
    }

    #[test]
    fn wait_all_children_gone_names_the_unfinished_ones() {
        let wait = scripted(vec![Ok((10, 0))]);

        let error =
            wait_all(vec![running("a", 10), running("b", 11)], wait, |_, _| {}).unwrap_err();

        assert!(matches!(error, ProcessError::Wait { names, .. } if names == ["b"]));
    }

    #[test]
    fn wait_all_nothing_running_does_not_wait() {
        let wait = || -> io::Result<(libc::pid_t, i32)> { panic!("must not wait") };

        wait_all(Vec::new(), wait, |_, _| {}).unwrap();
    }

    #[test]
    fn process_line_matches_the_console_contract() {
        assert_eq!(Outcome::Exited(0).describe(), "exited with status 0");
    }
}
