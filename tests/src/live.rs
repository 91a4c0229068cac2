//! A crib that runs while a test talks to it: its console (stdout) and log (stderr) are
//! collected as they come, partial lines included (a shell prompt ends without a newline),
//! so a test can wait for text, and its stdin can be the guest's serial console input.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::crib_bin;

/// A crib whose stdout (the guest's console) is read as it comes.
pub struct LiveCrib {
    child: Child,
    /// The guest's serial console input (crib's stdin), when asked for.
    stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// The threads that read stdout and stderr; each ends at its pipe's EOF.
    readers: Vec<JoinHandle<()>>,
}

/// How long, after crib exits, its pipes may take to deliver their last bytes. Only a
/// process that inherited them (none that crib starts) could hold them open longer.
const PIPE_DRAIN_WAIT: Duration = Duration::from_secs(10);

/// `bytes` as text, without the carriage returns of a serial console's line ends.
fn text_of(bytes: &Mutex<Vec<u8>>) -> String {
    bytes
        .lock()
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default()
}

impl LiveCrib {
    /// Starts crib with `args` and no stdin.
    pub fn spawn<S: AsRef<OsStr>>(args: &[S]) -> Result<Self> {
        Self::start(args, false)
    }

    /// Starts crib with `args` and its stdin on a pipe: with the default console (stdout),
    /// [`Self::type_text`] types on the guest's serial console.
    pub fn spawn_with_console_input<S: AsRef<OsStr>>(args: &[S]) -> Result<Self> {
        Self::start(args, true)
    }

    fn start<S: AsRef<OsStr>>(args: &[S], console_input: bool) -> Result<Self> {
        let bin = crib_bin();
        let mut child = Command::new(&bin)
            .args(args)
            .stdin(if console_input {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let follow = |pipe: Box<dyn Read + Send>| {
            let bytes = Arc::new(Mutex::new(Vec::new()));
            let sink = Arc::clone(&bytes);
            let reader = std::thread::spawn(move || {
                let mut pipe = pipe;
                let mut chunk = [0u8; 4096];
                loop {
                    match pipe.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => {
                            if let Ok(mut bytes) = sink.lock() {
                                bytes.extend_from_slice(&chunk[..n]);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            });
            (bytes, reader)
        };
        let (stdout, out_reader) = follow(Box::new(child.stdout.take().context("no stdout pipe")?));
        let (stderr, err_reader) = follow(Box::new(child.stderr.take().context("no stderr pipe")?));
        let stdin = child.stdin.take();
        Ok(Self {
            child,
            stdin,
            stdout,
            stderr,
            readers: vec![out_reader, err_reader],
        })
    }

    /// crib's exit status, if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Types `text` on the guest's serial console.
    pub fn type_text(&mut self, text: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .context("crib was started without console input")?;
        stdin.write_all(text.as_bytes())?;
        stdin.flush()?;
        Ok(())
    }

    /// The console so far.
    pub fn stdout(&self) -> String {
        text_of(&self.stdout)
    }

    /// Both streams, for failure messages.
    pub fn output(&self) -> String {
        format!(
            "--- stdout:\n{}\n--- stderr:\n{}",
            self.stdout(),
            text_of(&self.stderr)
        )
    }

    /// Waits until `pick` finds something in stdout so far (a partial last line included).
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        wait: Duration,
        pick: impl Fn(&str) -> Option<T>,
    ) -> Result<T> {
        let start = Instant::now();
        loop {
            if let Some(found) = pick(&self.stdout()) {
                return Ok(found);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("crib exited ({status}) before {what}\n{}", self.output());
            }
            if start.elapsed() > wait {
                bail!("no {what} within {wait:?}\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// crib's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs crib (it gets no chance to clean up or flush anything), then waits for it
    /// and for its pipes' last bytes.
    pub fn kill(&mut self) -> Result<std::process::ExitStatus> {
        self.child.kill().context("cannot SIGKILL crib")?;
        let status = self.child.wait()?;
        self.drain_pipes();
        Ok(status)
    }

    /// Waits for crib to exit; its exit code.
    pub fn wait_exit(&mut self, wait: Duration) -> Result<Option<i32>> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.drain_pipes();
                return Ok(status.code());
            }
            if start.elapsed() > wait {
                bail!("crib did not exit within {wait:?}\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl LiveCrib {
    /// Once crib has exited: waits until the readers have taken everything crib wrote
    /// (the console's last lines come just before the exit; a loaded lab can take far
    /// longer than a fixed pause to hand them over).
    fn drain_pipes(&mut self) {
        let start = Instant::now();
        while self.readers.iter().any(|r| !r.is_finished()) && start.elapsed() < PIPE_DRAIN_WAIT {
            std::thread::sleep(Duration::from_millis(20));
        }
        for reader in std::mem::take(&mut self.readers) {
            if reader.is_finished() {
                let _ = reader.join();
            }
        }
    }
}

impl Drop for LiveCrib {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
