//! Many pods at once: `crib pod run` N times concurrently, each pod with its own name and
//! run root, until every one answers `docker ps`; then `crib pod stop` each. Shared by the
//! density e2e test and `crib-bench density`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::GuestArtifacts;

/// The docker CLI (/usr/local/bin/docker in the lab; scripts/install-deps.sh installs it).
const DOCKER: &str = "docker";

/// One `crib pod run` of a fleet.
pub struct FleetPod {
    pub name: String,
    pub run_root: PathBuf,
    pub child: Child,
    /// Set once the pod answered `docker ps`.
    pub ready_after: Option<Duration>,
    /// crib's exit status, once it has ended.
    pub status: Option<ExitStatus>,
}

impl FleetPod {
    pub fn run_dir(&self) -> PathBuf {
        self.run_root.join(&self.name)
    }

    fn log(&self, file: &str) -> String {
        std::fs::read_to_string(self.run_root.join(file))
            .unwrap_or_default()
            .replace('\r', "")
    }

    /// crib's stderr (its log lines) and the pod's console, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- pod {} crib stderr:\n{}\n--- console:\n{}",
            self.name,
            self.log("crib.stderr"),
            std::fs::read_to_string(self.run_dir().join("console.log"))
                .unwrap_or_default()
                .replace('\r', "")
        )
    }
}

/// N pods launched at the same instant. Dropping the fleet kills every crib still running.
pub struct Fleet {
    pub dir: PathBuf,
    pub pods: Vec<FleetPod>,
    pub started: Instant,
    docker_config: PathBuf,
}

/// Runs `command` with no stdin, killing it after `timeout`.
pub fn run_with_timeout(command: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Read the pipes while waiting, so a chatty command cannot block on a full pipe.
    let out = child.stdout.take().context("no stdout pipe")?;
    let err = child.stderr.take().context("no stderr pipe")?;
    let read = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let (out, err) = (read(Box::new(out)), read(Box::new(err)));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

impl Fleet {
    /// Starts `count` pods named `<prefix>-<i>` with `crib` (`crib pod run`), each with
    /// `memory`, the pod kernel and one idle process, its own run root under `dir`, its
    /// stdout and stderr in files there.
    pub fn launch(
        crib: &Path,
        dir: &Path,
        prefix: &str,
        count: usize,
        memory: &str,
    ) -> Result<Self> {
        let pod = GuestArtifacts::pod()?;
        let _ = std::fs::remove_dir_all(dir);
        let docker_config = dir.join("docker-config");
        std::fs::create_dir_all(&docker_config)
            .with_context(|| format!("cannot create {}", docker_config.display()))?;
        let mut launches = Vec::new();
        for i in 0..count {
            let name = format!("{prefix}-{i}");
            let run_root = dir.join(&name);
            std::fs::create_dir_all(&run_root)?;
            let launch = run_root.join("launch.json");
            std::fs::write(
                &launch,
                format!(
                    r#"{{"pod": {{"name": "{name}", "lifetime": "until-shutdown",
                         "processes": [{{"name": "app", "argv": ["/bin/sh", "-c", "echo started; while true; do sleep 1; done"]}}]}},
                       "kernel": "{}", "initrd": "{}", "cpus": 1, "memory": "{memory}"}}"#,
                    pod.vmlinux.display(),
                    pod.initramfs.display()
                ),
            )?;
            launches.push((name, run_root, launch));
        }
        let started = Instant::now();
        let mut fleet = Self {
            dir: dir.to_path_buf(),
            pods: Vec::new(),
            started,
            docker_config,
        };
        for (name, run_root, launch) in launches {
            let stdout = std::fs::File::create(run_root.join("crib.stdout"))?;
            let stderr = std::fs::File::create(run_root.join("crib.stderr"))?;
            let child = Command::new(crib)
                .args(["pod", "run"])
                .arg(&launch)
                .arg("--run-root")
                .arg(&run_root)
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr)
                .spawn()
                .with_context(|| format!("cannot start {}", crib.display()))?;
            fleet.pods.push(FleetPod {
                name,
                run_root,
                child,
                ready_after: None,
                status: None,
            });
        }
        Ok(fleet)
    }

    /// One `docker -H unix://<run dir>/docker.sock ps`; true if it listed the pod's `app`.
    fn docker_ps(&self, pod: &FleetPod, timeout: Duration) -> Result<bool> {
        let socket = pod.run_dir().join("docker.sock");
        if !socket.exists() {
            return Ok(false);
        }
        let out = run_with_timeout(
            Command::new(DOCKER)
                .arg("-H")
                .arg(format!("unix://{}", socket.display()))
                .arg("ps")
                .env("DOCKER_CONFIG", &self.docker_config)
                .env_remove("DOCKER_HOST")
                .env_remove("DOCKER_CONTEXT"),
            timeout,
        )
        .with_context(|| {
            format!("cannot run {DOCKER} (is it installed? scripts/install-deps.sh)")
        })?;
        Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("app"))
    }

    /// Polls every pod until all answer `docker ps` (each call limited to `call_timeout`),
    /// failing after `wait` or as soon as a crib exits early.
    pub fn wait_all_ready(&mut self, wait: Duration, call_timeout: Duration) -> Result<Duration> {
        loop {
            for i in 0..self.pods.len() {
                if self.pods[i].ready_after.is_some() {
                    continue;
                }
                if let Some(status) = self.pods[i].child.try_wait()? {
                    bail!(
                        "crib pod run of {} ended before the pod answered docker ps: {status}\n{}",
                        self.pods[i].name,
                        self.pods[i].logs()
                    );
                }
                if self.docker_ps(&self.pods[i], call_timeout)? {
                    self.pods[i].ready_after = Some(self.started.elapsed());
                }
            }
            if self.pods.iter().all(|p| p.ready_after.is_some()) {
                return Ok(self.started.elapsed());
            }
            if self.started.elapsed() > wait {
                let missing: Vec<&str> = self
                    .pods
                    .iter()
                    .filter(|p| p.ready_after.is_none())
                    .map(|p| p.name.as_str())
                    .collect();
                let first = self.pods.iter().find(|p| p.ready_after.is_none());
                bail!(
                    "pods {} did not answer docker ps within {wait:?}\n{}",
                    missing.join(", "),
                    first.map(FleetPod::logs).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `crib pod stop` for every pod (graceful, `timeout` seconds each), then waits up to
    /// `wait` for every crib to exit; fails unless every stop and every crib succeeded.
    pub fn stop_all(&mut self, crib: &Path, timeout: u32, wait: Duration) -> Result<()> {
        let mut failures = Vec::new();
        for pod in &self.pods {
            let out = run_with_timeout(
                Command::new(crib)
                    .args(["pod", "stop", &pod.name, "--timeout", &timeout.to_string()])
                    .arg("--run-root")
                    .arg(&pod.run_root),
                Duration::from_secs(u64::from(timeout) + 60),
            )?;
            if !out.status.success() {
                failures.push(format!(
                    "crib pod stop {}: {}\n{}{}",
                    pod.name,
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        let start = Instant::now();
        for pod in &mut self.pods {
            let status = loop {
                if let Some(status) = pod.child.try_wait()? {
                    break Some(status);
                }
                if start.elapsed() > wait {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            pod.status = status;
            match status {
                Some(status) if status.success() => {}
                Some(status) => failures.push(format!(
                    "crib pod run of {} exited with {status}\n{}",
                    pod.name,
                    pod.logs()
                )),
                None => failures.push(format!(
                    "crib pod run of {} still runs {wait:?} after the stops\n{}",
                    pod.name,
                    pod.logs()
                )),
            }
        }
        if !failures.is_empty() {
            bail!("{}", failures.join("\n"));
        }
        Ok(())
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for pod in &mut self.pods {
            if pod.status.is_none() && matches!(pod.child.try_wait(), Ok(None)) {
                let _ = pod.child.kill();
                let _ = pod.child.wait();
            }
        }
    }
}
