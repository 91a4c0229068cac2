//! The pod launcher with a real guest: `crib pod run FILE` boots crib's pod kernel and
//! cradle, `crib pod ls` lists the pod, the printed docker socket answers `docker ps`, and
//! `crib pod stop` (or SIGTERM to `crib pod run`) shuts the pod down gracefully through
//! cradle, after which crib exits 0.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crib_tests::{crib_bin, run_crib, run_crib_while, GuestArtifacts, RunOutput};

use crate::TestFn;

const DEADLINE: Duration = Duration::from_secs(300);
/// How long the pod may take to boot and answer `docker ps`.
const BOOT_WAIT: Duration = Duration::from_secs(150);
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![
        (
            "linux_pod_launcher_runs_lists_and_stops_a_pod",
            runs_lists_and_stops_a_pod,
        ),
        (
            "linux_pod_launcher_sigterm_shuts_the_pod_down",
            sigterm_shuts_the_pod_down,
        ),
    ]
}

/// A pod with one ticking process that stays up until it is shut down.
fn pod_spec(name: &str) -> String {
    format!(
        r#"{{"name": "{name}", "lifetime": "until-shutdown",
            "processes": [{{"name": "app", "argv": ["/bin/sh", "-c", "echo started; while true; do sleep 1; done"]}}]}}"#
    )
}

struct Scratch {
    dir: PathBuf,
    root: PathBuf,
    launch: PathBuf,
    docker_config: PathBuf,
}

impl Scratch {
    /// A temp dir with a run root and the launch file `launch_json`.
    fn new(name: &str, launch_json: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("crib-pod-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("docker-config"))?;
        let launch = dir.join("launch.json");
        std::fs::write(&launch, launch_json)?;
        Ok(Self {
            root: dir.join("run"),
            docker_config: dir.join("docker-config"),
            launch,
            dir,
        })
    }

    fn root_arg(&self) -> String {
        self.root.display().to_string()
    }

    fn run_args(&self) -> Vec<String> {
        vec![
            "pod".into(),
            "run".into(),
            self.launch.display().to_string(),
            "--run-root".into(),
            self.root_arg(),
        ]
    }

    /// Waits until `crib pod ls` lists pod `name` as running.
    fn wait_listed(&self, name: &str) -> Result<()> {
        let start = Instant::now();
        loop {
            let ls = run_crib(&["pod", "ls", "--run-root", &self.root_arg()], CALL_TIMEOUT)?;
            let listed = ls
                .stdout
                .lines()
                .any(|l| l.split_whitespace().take(2).eq([name, "running"]));
            if listed {
                return Ok(());
            }
            if start.elapsed() > BOOT_WAIT {
                bail!(
                    "crib pod ls did not list pod {name} within {BOOT_WAIT:?}:\n{}{}",
                    ls.stdout,
                    ls.stderr
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until `docker ps` on the pod's docker socket shows its process `app`.
    fn wait_docker_ps(&self, name: &str) -> Result<String> {
        let socket = self.root.join(name).join("docker.sock");
        let start = Instant::now();
        loop {
            let out = run_with_timeout(
                Command::new("docker")
                    .arg("-H")
                    .arg(format!("unix://{}", socket.display()))
                    .arg("ps")
                    .env("DOCKER_CONFIG", &self.docker_config)
                    .env_remove("DOCKER_HOST")
                    .env_remove("DOCKER_CONTEXT"),
                CALL_TIMEOUT,
            )
            .context("cannot run the docker CLI (is it installed? scripts/install-deps.sh)")?;
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            if out.status.success() && stdout.contains("app") {
                return Ok(stdout);
            }
            if start.elapsed() > BOOT_WAIT {
                bail!(
                    "docker ps did not show the pod's process within {BOOT_WAIT:?}: {stdout}{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn console(&self, name: &str) -> String {
        std::fs::read_to_string(self.root.join(name).join("console.log"))
            .unwrap_or_default()
            .replace('\r', "")
    }
}

fn run_with_timeout(command: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let start = Instant::now();
    while child.try_wait()?.is_none() {
        if start.elapsed() > timeout {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child.wait_with_output()?)
}

/// The console shows cradle's graceful shutdown.
fn check_graceful(out: &RunOutput, console: &str) -> Result<()> {
    out.check(
        console.contains("shutdown requested; stopping processes"),
        &format!("the console shows cradle stopping the processes:\n{console}"),
    )?;
    out.check(
        out.code == Some(0),
        &format!("crib exits 0 after the graceful shutdown; console:\n{console}"),
    )
}

fn runs_lists_and_stops_a_pod() -> Result<()> {
    // Kernel and initramfs are left to the default lookup (guest/ next to the binary's
    // directory: target/guest for target/debug/crib), or CRIB_GUEST_DIR.
    GuestArtifacts::pod()?;
    let scratch = Scratch::new(
        "stop",
        &format!(
            r#"{{"pod": {}, "cpus": 2, "memory": "256M"}}"#,
            pod_spec("web")
        ),
    )?;
    let root = scratch.root_arg();
    let mut follower = None;
    let out = run_crib_while(&scratch.run_args(), DEADLINE, || {
        scratch.wait_listed("web")?;
        // A second run of the same pod is refused while it runs.
        let again = run_crib(&scratch.run_args(), CALL_TIMEOUT)?;
        again.check(
            again.code == Some(1) && again.stderr.contains("pod web is already running"),
            "a second crib pod run of a running pod is refused",
        )?;
        let ps = scratch.wait_docker_ps("web")?;
        anyhow::ensure!(ps.contains("CONTAINER ID"), "docker ps output: {ps}");
        let logs = run_crib(&["pod", "logs", "web", "--run-root", &root], CALL_TIMEOUT)?;
        logs.check(
            logs.code == Some(0) && logs.stdout.contains("cradle: pod web:"),
            "crib pod logs prints the console",
        )?;
        // `logs -f` follows the console until the pod has ended.
        let root_for_logs = root.clone();
        follower = Some(std::thread::spawn(move || {
            run_with_timeout(
                Command::new(crib_bin()).args([
                    "pod",
                    "logs",
                    "-f",
                    "web",
                    "--run-root",
                    &root_for_logs,
                ]),
                Duration::from_secs(120),
            )
        }));
        let stop = run_crib(
            &["pod", "stop", "web", "--timeout", "30", "--run-root", &root],
            Duration::from_secs(90),
        )?;
        stop.check(
            stop.code == Some(0) && stop.stdout.contains("pod web stopped (crib exited 0)"),
            "crib pod stop succeeds and reports crib's exit code",
        )
    })?;
    let console = scratch.console("web");
    let docker_line = format!(
        "docker: docker -H unix://{}/web/docker.sock ps",
        scratch.root.display()
    );
    out.check(
        out.stdout.contains(&docker_line),
        &format!("crib pod run prints `{docker_line}`"),
    )?;
    check_graceful(&out, &console)?;
    let followed = follower
        .context("the test did not start crib pod logs -f")?
        .join()
        .map_err(|_| anyhow::anyhow!("the crib pod logs -f thread panicked"))??;
    let followed_out = String::from_utf8_lossy(&followed.stdout);
    out.check(
        followed.status.success()
            && followed_out.contains("shutdown requested; stopping processes"),
        &format!("crib pod logs -f follows the console to the end and exits 0:\n{followed_out}"),
    )?;
    let ls = run_crib(&["pod", "ls", "--run-root", &root], CALL_TIMEOUT)?;
    ls.check(
        ls.code == Some(0) && !ls.stdout.contains("web"),
        "crib pod ls no longer lists the stopped pod",
    )?;
    std::fs::remove_dir_all(&scratch.dir)?;
    Ok(())
}

/// The pid `crib pod run` wrote into the run directory's info.json.
fn pod_pid(run_dir: &Path) -> Result<u32> {
    let info = std::fs::read_to_string(run_dir.join("info.json"))?;
    let rest = info
        .split_once("\"pid\":")
        .map(|(_, rest)| rest.trim_start())
        .context("info.json has no pid")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Ok(digits.parse()?)
}

fn sigterm_shuts_the_pod_down() -> Result<()> {
    let pod = GuestArtifacts::pod()?;
    let scratch = Scratch::new(
        "sigterm",
        &format!(
            r#"{{"pod": {}, "kernel": "{}", "initrd": "{}", "memory": "256M"}}"#,
            pod_spec("term"),
            pod.vmlinux.display(),
            pod.initramfs.display()
        ),
    )?;
    let out = run_crib_while(&scratch.run_args(), DEADLINE, || {
        scratch.wait_listed("term")?;
        scratch.wait_docker_ps("term")?;
        let pid = pod_pid(&scratch.root.join("term"))?;
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM {pid}: {status}");
        Ok(())
    })?;
    let console = scratch.console("term");
    out.check(
        out.stderr.contains("SIGTERM/SIGINT: graceful shutdown"),
        "crib logs the graceful shutdown",
    )?;
    check_graceful(&out, &console)?;
    std::fs::remove_dir_all(&scratch.dir)?;
    Ok(())
}
