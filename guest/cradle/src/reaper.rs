//! The one place cradle reaps its children.
//!
//! As PID 1, cradle inherits every orphan in the guest and must reap them,
//! but a plain `waitpid(-1)` loop would also steal the status of children
//! whose owner waits for them: `Command::spawn` itself waits for a child
//! whose exec failed, vdocker waits for its exec sessions, the registry for
//! the pod's processes. So every child cradle starts goes through
//! [`Reaper::spawn`], which registers a callback for its pid, and one
//! thread reaps:
//!
//! - [`ReapMode::All`] (PID 1): peeks at the next zombie with
//!   `waitid(P_ALL, WEXITED | WNOWAIT)`, which does not reap, and reaps it
//!   only once no spawn is in progress (so `Command::spawn`'s internal wait
//!   always finds its child); a registered pid gets its callback, any other
//!   (an orphan) is just reaped.
//! - [`ReapMode::Own`] (tests, or cradle not running as PID 1): one small
//!   thread per child waits for that pid only, so other code in the process
//!   (a test harness running `docker`) keeps its own children.
//!
//! Callbacks run on the reaper's thread: they must be quick and must not
//! spawn through the reaper.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::console::{self, say};

/// How long the reaper pauses after an unexpected `waitid` error.
const RETRY_MS: u64 = 100;

/// Called once with the raw `waitpid` status when the child has ended.
pub type ExitCallback = Box<dyn FnOnce(i32) + Send>;

/// Which children the reaper reaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReapMode {
    /// Every child of the process, orphans included (PID 1).
    All,
    /// Only the children started through [`Reaper::spawn`].
    Own,
}

/// Spawns children and reports their end. Cheap to clone.
#[derive(Clone)]
pub struct Reaper {
    shared: Arc<Shared>,
}

struct Shared {
    mode: ReapMode,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// Callbacks of live children, by pid.
    waiters: HashMap<libc::pid_t, ExitCallback>,
    /// Spawns in progress: their children must not be reaped yet.
    spawning: usize,
    /// Spawns finished so far, to notice new children after ECHILD.
    spawned: u64,
    /// Whether the `All` thread runs.
    thread_started: bool,
}

impl Reaper {
    /// A reaper in `mode`; its thread starts with the first spawn.
    pub fn new(mode: ReapMode) -> Self {
        Self {
            shared: Arc::new(Shared {
                mode,
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
            }),
        }
    }

    /// `All` when this process is PID 1, `Own` otherwise.
    pub fn for_this_process() -> Self {
        if std::process::id() == 1 {
            Self::new(ReapMode::All)
        } else {
            Self::new(ReapMode::Own)
        }
    }

    /// Spawns `command` and calls `on_exit` with the raw wait status once it
    /// has ended. Never wait for the returned [`Child`] through std.
    pub fn spawn(
        &self,
        command: &mut Command,
        on_exit: impl FnOnce(i32) + Send + 'static,
    ) -> io::Result<Child> {
        self.lock().spawning += 1;
        let result = command.spawn();
        let mut state = self.lock();
        state.spawning = state.spawning.saturating_sub(1);
        state.spawned = state.spawned.wrapping_add(1);
        let pid = match &result {
            Ok(child) => match libc::pid_t::try_from(child.id()) {
                Ok(pid) => Some(pid),
                Err(_) => {
                    drop(state);
                    self.shared.changed.notify_all();
                    return Err(io::ErrorKind::InvalidData.into());
                }
            },
            Err(_) => None,
        };
        if let Some(pid) = pid {
            match self.shared.mode {
                ReapMode::All => {
                    state.waiters.insert(pid, Box::new(on_exit));
                    if !state.thread_started {
                        state.thread_started = self.start_all_thread();
                    }
                }
                ReapMode::Own => wait_own(pid, Box::new(on_exit)),
            }
        }
        drop(state);
        self.shared.changed.notify_all();
        result
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.shared.state)
    }

    /// Starts the `All` thread; false (and a warning) if it cannot start.
    fn start_all_thread(&self) -> bool {
        let shared = Arc::clone(&self.shared);
        match std::thread::Builder::new()
            .name("cradle-reaper".to_owned())
            .spawn(move || reap_all(&shared))
        {
            Ok(_) => true,
            Err(error) => {
                say!("warning: cannot start the reaper thread: {error}");
                false
            }
        }
    }
}

/// A poisoned lock only means a callback panicked; the map is still sound.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The `All` loop: forever peek, then reap when no spawn is in progress.
fn reap_all(shared: &Shared) {
    loop {
        let spawned_before = lock(&shared.state).spawned;
        match peek_zombie() {
            Ok(Some(pid)) => {
                let mut state = lock(&shared.state);
                while state.spawning > 0 {
                    state = shared
                        .changed
                        .wait(state)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
                // No spawn in progress: `pid` cannot be reused meanwhile.
                let status = reap_now(pid);
                let waiter = state.waiters.remove(&pid);
                drop(state);
                if let (Some(status), Some(waiter)) = (status, waiter) {
                    waiter(status);
                }
            }
            Ok(None) => {}
            Err(error) if error.raw_os_error() == Some(libc::ECHILD) => {
                // No children at all, so no orphans either: sleep until
                // cradle starts another one.
                let mut state = lock(&shared.state);
                while state.spawned == spawned_before && state.spawning == 0 {
                    state = shared
                        .changed
                        .wait(state)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => {
                console::log_warning(&error);
                std::thread::sleep(Duration::from_millis(RETRY_MS));
            }
        }
    }
}

/// The pid of a child that has ended, without reaping it; blocks.
fn peek_zombie() -> io::Result<Option<libc::pid_t>> {
    // SAFETY: siginfo_t is plain data for which all-zero is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes one siginfo_t through the pointer, which refers
    // to a live local; WNOWAIT leaves the child a zombie.
    let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid succeeded with WEXITED, so the kernel filled the
    // SIGCHLD fields that si_pid reads.
    let pid = unsafe { info.si_pid() };
    Ok((pid > 0).then_some(pid))
}

/// Reaps `pid` if it is (still) a zombie; its raw status.
fn reap_now(pid: libc::pid_t) -> Option<i32> {
    let mut status: libc::c_int = 0;
    // SAFETY: waitpid writes one int through the pointer, which refers to a
    // live local; WNOHANG never blocks.
    let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    (rc == pid).then_some(status)
}

/// `Own` mode: a thread that waits for `pid` only.
fn wait_own(pid: libc::pid_t, on_exit: ExitCallback) {
    let spawned = std::thread::Builder::new()
        .name("cradle-wait".to_owned())
        .spawn(move || loop {
            let mut status: libc::c_int = 0;
            // SAFETY: as in reap_now, blocking for this one pid.
            let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
            if rc == pid {
                on_exit(status);
                return;
            }
            if rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return;
            }
        });
    if let Err(error) = spawned {
        say!("warning: cannot wait for process {pid}: {error}");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use crate::command::Outcome;

    #[test]
    fn spawn_own_reports_the_exit_status() {
        let reaper = Reaper::new(ReapMode::Own);
        let (tx, rx) = mpsc::channel();

        // Reaped by the reaper, which is what is tested.
        #[allow(clippy::zombie_processes)]
        reaper
            .spawn(Command::new("sh").args(["-c", "exit 5"]), move |status| {
                let _ = tx.send(status);
            })
            .unwrap();

        let status = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(Outcome::from_wait_status(status), Outcome::Exited(5));
    }

    #[test]
    fn spawn_missing_program_is_an_error_and_no_callback() {
        let reaper = Reaper::new(ReapMode::Own);

        let error = reaper
            .spawn(&mut Command::new("/nonexistent/cradle-test"), |_| {
                panic!("must not be called")
            })
            .unwrap_err();

        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }
}
