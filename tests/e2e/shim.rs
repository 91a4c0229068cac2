//! containerd-shim-crib-v2 (docs/SHIM.md) driven by Debian's containerd: a containerd of
//! the test's own (root, state and socket in a temp dir, the shim's directory on its
//! PATH, `io.containerd.crib.v2` registered for CRI), an image built with the image
//! store's busybox fixtures and `ctr image import`ed, then `ctr run --rm --runtime
//! io.containerd.crib.v2`: the output comes from the guest's kernel, the exit code
//! reaches ctr, stdin reaches the process, `ctr task exec` (with and without a TTY) and
//! `ctr task kill` work, and nothing is left behind (no crib, virtiofsd or shim process,
//! no mount, no state directory).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crib_tests::{crib_bin, target_dir, RunOutput};
use images::fixtures;

use crate::TestFn;

/// The image the test imports: a full reference, so `ctr image import` keeps the name.
const IMAGE: &str = "docker.io/library/crib-shim-busybox:1";
pub(crate) const RUNTIME: &str = "io.containerd.crib.v2";
/// One `ctr run` (a VM boot under the lab's nested KVM, then its shutdown).
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(60);

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![(
        "linux_shim_ctr_run_output_exit_code_and_cleanup",
        ctr_run_output_exit_code_and_cleanup,
    )]
}

/// The shim binary, built by main.rs's `build_crib` next to crib.
fn shim_dir() -> PathBuf {
    crib_bin()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| target_dir().join("debug"))
}

/// Runs `command` with no stdin, killing it after `deadline` (then `code` is `None`).
pub(crate) fn run(command: &mut Command, deadline: Duration) -> Result<RunOutput> {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {command:?}"))?;
    finish(command, child, deadline)
}

/// Runs `command` with `input` on its stdin, which is closed after it (or, with
/// `hold_open`, only once the command has exited).
fn run_with_input(
    command: &mut Command,
    input: &[u8],
    hold_open: bool,
    deadline: Duration,
) -> Result<RunOutput> {
    use std::io::Write;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {command:?}"))?;
    let mut stdin = child.stdin.take();
    if let Some(pipe) = stdin.as_mut() {
        pipe.write_all(input)?;
    }
    if !hold_open {
        drop(stdin.take());
    }
    let output = finish(command, child, deadline);
    drop(stdin);
    output
}

/// Collects the output of `child` (of `command`) until it exits or `deadline` passes.
fn finish(command: &Command, mut child: Child, deadline: Duration) -> Result<RunOutput> {
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = RunOutput {
        code: status.and_then(|s| s.code()),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    };
    if status.is_none() {
        eprintln!("{command:?} did not finish within {deadline:?}: killed");
    }
    Ok(output)
}

fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// A containerd of the test's own, killed (and its directories removed) on drop.
pub(crate) struct Containerd {
    pub(crate) dir: PathBuf,
    child: Child,
}

impl Containerd {
    /// containerd with the CRI plugin off: ctr names the runtime itself.
    fn start(dir: &Path) -> Result<Self> {
        let config = format!(
            r#"{base}
# What a host that serves Kubernetes adds (docs/SHIM.md); the CRI plugin is off here, ctr
# names the runtime itself.
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.crib]
  runtime_type = "{RUNTIME}"
"#,
            base = Self::base_config(dir, &["io.containerd.grpc.v1.cri"]),
        );
        Self::launch(dir, &config, &[], false)
    }

    /// The top of a config: the root, state and socket in `dir`; `disabled` plugins and the
    /// snapshotters that need what the lab lacks (a btrfs or zfs root, a thin pool) off.
    pub(crate) fn base_config(dir: &Path, disabled: &[&str]) -> String {
        let snapshotters = ["btrfs", "zfs", "devmapper", "aufs"]
            .map(|s| format!("io.containerd.snapshotter.v1.{s}"));
        let plugins: Vec<String> = disabled
            .iter()
            .map(|p| (*p).to_owned())
            .chain(snapshotters)
            .map(|p| format!("\"{p}\""))
            .collect();
        format!(
            r#"version = 2
root = "{dir}/root"
state = "{dir}/state"
disabled_plugins = [{plugins}]

[grpc]
  address = "{dir}/containerd.sock"
"#,
            dir = dir.display(),
            plugins = plugins.join(", "),
        )
    }

    /// Starts containerd with `config` (written to `dir/config.toml`, next to `files`,
    /// paths relative to `dir`; `dir` is emptied first) and waits until it answers. With
    /// `own_netns`, containerd runs in a network
    /// namespace of its own (only `lo`, up): the CNI bridge, the pods' host-side veths and
    /// their routes are made there, never in the caller's namespace.
    pub(crate) fn launch(
        dir: &Path,
        config: &str,
        files: &[(&str, String)],
        own_netns: bool,
    ) -> Result<Self> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config)?;
        for (path, content) in files {
            let path = dir.join(path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, content)?;
        }
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let path = format!(
            "{}:{}",
            shim_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut command = if own_netns {
            // unshare and sh exec: the child's pid is containerd's.
            let mut command = Command::new("unshare");
            command.args([
                "--net",
                "--",
                "sh",
                "-c",
                r#"ip link set lo up && exec "$@""#,
                "sh",
                "containerd",
            ]);
            command
        } else {
            Command::new("containerd")
        };
        let child = command
            .arg("--config")
            .arg(&config_path)
            .env("PATH", path)
            .env("CRIB_BIN", crib_bin())
            .env("CRIB_SHIM_STATE_DIR", dir.join("shim"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context(
                "cannot start containerd (apt-get install containerd: scripts/install-deps.sh)",
            )?;
        let mut containerd = Self {
            dir: dir.to_path_buf(),
            child,
        };
        let started = Instant::now();
        loop {
            let out = run(containerd.ctr(&["version"]).as_mut(), CALL_TIMEOUT)?;
            if out.code == Some(0) {
                return Ok(containerd);
            }
            if started.elapsed() > CALL_TIMEOUT || containerd.child.try_wait()?.is_some() {
                bail!("containerd did not answer:\n{}", containerd.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// containerd's pid (its network namespace is `/proc/<pid>/ns/net`).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    pub(crate) fn ctr(&self, args: &[&str]) -> Box<Command> {
        let mut command = Command::new("ctr");
        command.arg("--address").arg(self.socket()).args(args);
        Box::new(command)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    pub(crate) fn shim_state(&self) -> PathBuf {
        self.dir.join("shim")
    }

    /// containerd's log, then crib's log and the guest console of every container the
    /// shim still has state for.
    pub(crate) fn logs(&self) -> String {
        let mut text = format!("--- containerd's log:\n{}", self.log());
        for entry in std::fs::read_dir(self.shim_state())
            .into_iter()
            .flatten()
            .flatten()
        {
            for file in ["crib.log", "run/console.log", "launch.json"] {
                let path = entry.path().join(file);
                let content = std::fs::read_to_string(&path).unwrap_or_default();
                text.push_str(&format!("\n--- {}:\n{content}", path.display()));
            }
        }
        text
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Whatever a failed run left mounted under the root, then the directory.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let dir = self.dir.display().to_string();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| p.starts_with(&dir))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for point in points {
            let _ = Command::new("umount").arg("-l").arg(point).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Processes whose command line mentions `needle`, as `pid: cmdline`.
pub(crate) fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let me = std::process::id().to_string();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        if cmdline.contains(needle) {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}

/// Polls `done` for up to `limit`.
pub(crate) fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    done()
}

/// The pod kernel's release prefix (`6.1.192` from `linux-source-6.1 6.1.192-3 ...`).
pub(crate) fn pod_kernel_release() -> Result<String> {
    let guest = std::env::var_os("CRIB_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("guest"));
    let version = std::fs::read_to_string(guest.join("pod-kernel/VERSION"))
        .context("reading the pod kernel's VERSION (scripts/prepare.sh builds it)")?;
    let upstream = version
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.split('-').next())
        .context("pod-kernel/VERSION has no version")?;
    Ok(upstream.to_owned())
}

/// `ctr task exec` without and with a TTY, with stdin, killed with SIGKILL; `ctr task
/// kill` of the task (SIGTERM, which its shell traps) and its exit status through `ctr
/// task delete`.
fn exec_and_kill(
    containerd: &Containerd,
    fail: &dyn Fn(&str, &RunOutput) -> Result<()>,
) -> Result<()> {
    let ctr = |args: &[&str]| run(containerd.ctr(args).as_mut(), CALL_TIMEOUT);
    let id = "shim-exec";
    let out = run(
        containerd
            .ctr(&[
                "run",
                "-d",
                "--runtime",
                RUNTIME,
                IMAGE,
                id,
                "sh",
                "-c",
                // The trap runs once the current `sleep 1` ends.
                "trap 'exit 3' TERM; while true; do sleep 1; done",
            ])
            .as_mut(),
        RUN_TIMEOUT,
    )?;
    if out.code != Some(0) {
        fail("ctr run -d: wanted a running task", &out)?;
    }

    // No TTY: stdout and stderr apart, the exit code through ctr; in the container's root.
    let out = ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        id,
        "sh",
        "-c",
        "echo out; echo err >&2; test -f /tmp/f || echo fresh-root; exit 5",
    ])?;
    if out.code != Some(5)
        || out.stdout.lines().collect::<Vec<_>>() != ["out", "fresh-root"]
        || out.stderr.trim() != "err"
    {
        fail(
            "ctr task exec sh -c '... exit 5': wanted out, err apart, exit 5",
            &out,
        )?;
    }

    // stdin to an exec, ended by ctr's CloseIO.
    let out = run_with_input(
        containerd
            .ctr(&["task", "exec", "--exec-id", "e2", id, "cat"])
            .as_mut(),
        b"fed\n",
        false,
        CALL_TIMEOUT,
    )?;
    if out.code != Some(0) || out.stdout.trim() != "fed" {
        fail(
            "ctr task exec cat with stdin: wanted fed back, exit 0",
            &out,
        )?;
    }

    // A TTY (ctr -t wants one of its own: script gives it a pty).
    let address = containerd.dir.join("containerd.sock");
    let tty_command = format!(
        "ctr --address {} task exec -t --exec-id e3 {id} sh -c 'test -t 0 && test -t 1 && echo tty-yes; exit 4'",
        address.display()
    );
    let out = run_with_input(
        Command::new("script").args(["-qec", &tty_command, "/dev/null"]),
        b"",
        true,
        CALL_TIMEOUT,
    )?;
    if out.code != Some(4) || !out.stdout.contains("tty-yes") {
        fail("ctr task exec -t: wanted tty-yes, exit 4", &out)?;
    }

    // An exec killed with SIGKILL: its ctr task exec ends with 137.
    let mut sleeper = containerd.ctr(&["task", "exec", "--exec-id", "e4", id, "sleep", "1000"]);
    let sleeper = sleeper
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start ctr task exec sleep")?;
    // Once it runs, ctr task ps lists it next to the container's process.
    let listed = eventually(CALL_TIMEOUT, || {
        ctr(&["task", "ps", id]).is_ok_and(|o| o.code == Some(0) && o.stdout.lines().count() >= 3)
            && ctr(&["task", "kill", "--exec-id", "e4", "-s", "SIGKILL", id])
                .is_ok_and(|o| o.code == Some(0))
    });
    let out = finish(&Command::new("ctr"), sleeper, CALL_TIMEOUT)?;
    if !listed || out.code != Some(137) {
        fail(
            "ctr task kill --exec-id e4 -s SIGKILL: wanted exit 137",
            &out,
        )?;
    }

    // `ctr task kill` sends SIGTERM; the shell's trap exits 3. Once stopped, `ctr task
    // delete` reports its status (ctr 1.6 has no `task wait`; it warns "task ID exit with
    // non-zero exit code 3" and exits 0).
    let out = ctr(&["task", "kill", id])?;
    if out.code != Some(0) {
        fail("ctr task kill (SIGTERM)", &out)?;
    }
    let stopped = eventually(RUN_TIMEOUT, || {
        ctr(&["task", "ls"]).is_ok_and(|o| {
            o.stdout.lines().any(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                words.first() == Some(&id) && words.contains(&"STOPPED")
            })
        })
    });
    let out = ctr(&["task", "delete", id])?;
    if !stopped || !out.stderr.contains("exit code 3") {
        fail(
            "ctr task kill, then ctr task delete once stopped: wanted the trap's exit 3",
            &out,
        )?;
    }
    let out = ctr(&["container", "delete", id])?;
    if out.code != Some(0) {
        fail(&format!("ctr container delete {id}"), &out)?;
    }

    Ok(())
}

fn ctr_run_output_exit_code_and_cleanup() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("crib-shim-{}", std::process::id()));
    let containerd = Containerd::start(&dir)?;
    let fail = |what: &str, out: &RunOutput| -> Result<()> {
        out.check(false, &format!("{what}\n{}", containerd.logs()))
    };

    // An OCI archive of a busybox image, imported under its full name.
    let layout = dir.join("layout");
    fixtures::write_oci_layout(&layout, &fixtures::busybox_image(IMAGE)?)?;
    let archive = dir.join("image.tar");
    fixtures::tar_directory(&layout, &archive)?;
    let out = run(
        containerd
            .ctr(&["image", "import", &archive.display().to_string()])
            .as_mut(),
        CALL_TIMEOUT,
    )?;
    if out.code != Some(0) {
        fail("ctr image import failed", &out)?;
    }

    // The command runs in the guest: the pod kernel's release, not L1's.
    let release = pod_kernel_release()?;
    let host_release = crib_tests::host_tool("uname", &["-r"])?;
    let out = run(
        containerd
            .ctr(&[
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                IMAGE,
                "shim-uname",
                "uname",
                "-r",
            ])
            .as_mut(),
        RUN_TIMEOUT,
    )?;
    let guest_release = out.stdout.trim().to_owned();
    if out.code != Some(0)
        || !guest_release.starts_with(&release)
        || guest_release == host_release.trim()
    {
        fail(
            &format!("ctr run uname -r: wanted the pod kernel's {release}*, exit 0"),
            &out,
        )?;
    }

    // stdout and stderr apart, the exit code through ctr, the rootfs writable.
    let out = run(
        containerd
            .ctr(&[
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                IMAGE,
                "shim-exit",
                "sh",
                "-c",
                "echo hello > /tmp/f && cat /tmp/f && echo oops >&2 && exit 7",
            ])
            .as_mut(),
        RUN_TIMEOUT,
    )?;
    if out.code != Some(7) || out.stdout.trim() != "hello" || !out.stderr.contains("oops") {
        fail(
            "ctr run sh -c '... exit 7': wanted hello, oops on stderr, exit 7",
            &out,
        )?;
    }

    // stdin reaches the process, and its end (ctr's CloseIO) ends it.
    let out = run_with_input(
        containerd
            .ctr(&[
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                IMAGE,
                "shim-cat",
                "cat",
            ])
            .as_mut(),
        b"piped\n",
        false,
        RUN_TIMEOUT,
    )?;
    if out.code != Some(0) || out.stdout.trim() != "piped" {
        fail("ctr run cat with stdin: wanted piped back, exit 0", &out)?;
    }

    // A TTY for the main process (ctr -t wants one of its own: script gives it a pty, of
    // 30x100): the container's controlling terminal is in its /dev/pts, on stdin and
    // stdout; ctr's resize (ResizePty, sent after Start, as with runc) reaches it, so the
    // process waits for it; the exit code comes through as before.
    let address = containerd.dir.join("containerd.sock");
    let tty_command = format!(
        "stty rows 30 cols 100; ctr --address {} run --rm -t --runtime {RUNTIME} {IMAGE} shim-tty sh -c 'tty; [ -t 0 ] && [ -t 1 ] && echo both; i=0; until stty size 2>/dev/null; do i=$((i+1)); [ $i -gt 100 ] && break; sleep 0.1; done; exit 6'",
        address.display()
    );
    let out = run_with_input(
        Command::new("script").args(["-qec", &tty_command, "/dev/null"]),
        b"",
        true,
        RUN_TIMEOUT,
    )?;
    if out.code != Some(6)
        || !out.stdout.contains("/dev/pts/")
        || !out.stdout.contains("both")
        || !out.stdout.contains("30 100")
    {
        fail(
            "ctr run -t sh -c 'tty; ...; stty size; exit 6': wanted /dev/pts/N, both, 30 100, exit 6",
            &out,
        )?;
    }

    exec_and_kill(&containerd, &fail)?;

    let empty_root = dir.join("empty-rootfs");
    std::fs::create_dir_all(&empty_root)?;
    let empty_root = empty_root.display().to_string();
    // Bad input, each refused with the shim's message, the task gone: runtime options
    // crib does not know (ctr sends runtimeoptions.v1.Options for
    // --runtime-config-path); a root filesystem that is empty (`--rootfs` of an empty
    // directory: no snapshot, nothing mounted); a VM that cannot start (a memory limit
    // far beyond the host's RAM, so the guest's memory is too: crib's log is quoted).
    let refusals: [(&[&str], &str); 3] = [
        (
            &[
                "--runtime-config-path",
                "/etc/crib-shim.toml",
                IMAGE,
                "shim-options",
            ],
            "not supported by crib",
        ),
        (
            &["--rootfs", &empty_root, "shim-no-rootfs"],
            "is missing or empty",
        ),
        (
            &["--memory-limit", "1125899906842624", IMAGE, "shim-no-boot"],
            "ended before it was ready",
        ),
    ];
    for (args, wanted) in refusals {
        let mut command = vec!["run", "--rm", "--runtime", RUNTIME];
        command.extend_from_slice(args);
        command.push("true");
        let out = run(containerd.ctr(&command).as_mut(), RUN_TIMEOUT)?;
        if out.code == Some(0) || !out.stderr.contains(wanted) {
            fail(
                &format!(
                    "ctr {}: wanted the shim's error {wanted:?}",
                    command.join(" ")
                ),
                &out,
            )?;
        }
    }

    // Nothing left: no crib, virtiofsd or shim process, no mount, no state directory.
    let dir_text = dir.display().to_string();
    let gone = eventually(Duration::from_secs(20), || {
        processes_mentioning(&dir_text)
            .iter()
            .all(|p| p.contains("containerd --config"))
            && processes_mentioning("containerd-shim-crib-v2").is_empty()
    });
    let leftovers: Vec<String> = processes_mentioning(&dir_text)
        .into_iter()
        .chain(processes_mentioning("containerd-shim-crib-v2"))
        .filter(|p| !p.contains("containerd --config"))
        .collect();
    if !gone {
        bail!("processes left after ctr run --rm: {leftovers:#?}");
    }
    let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter(|l| l.contains(&dir_text))
        .map(str::to_owned)
        .collect();
    anyhow::ensure!(mounts.is_empty(), "mounts left: {mounts:#?}");
    let state: Vec<PathBuf> = std::fs::read_dir(containerd.shim_state())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    anyhow::ensure!(state.is_empty(), "shim state left: {state:?}");
    Ok(())
}
