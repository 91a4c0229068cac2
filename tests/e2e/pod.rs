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
        ("linux_pod_jail_confines_the_vmm", jail_confines_the_vmm),
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

/// The jail's uid and gid in [`jail_confines_the_vmm`]'s first run.
const JAIL_ID: u32 = 100_000;
/// The range `"jail": "auto"` takes ids from (`vmm::jail_ids::AUTO_IDS`).
const AUTO_IDS: std::ops::RangeInclusive<u32> = 200_000..=265_535;
/// Where the jail's id leases are (`vmm::jail_ids::ID_LOCK_DIR`).
const ID_LOCK_DIR: &str = "/run/crib/jail-ids";

/// The jailed pod: a ticking process that first copies a file of its virtio-fs share, and
/// an HTTP server, to reach through the pod network.
fn jail_pod_spec(name: &str) -> String {
    format!(
        r#"{{"name": "{name}", "lifetime": "until-shutdown",
            "filesystems": [{{"tag": "share", "path": "/run/share"}}],
            "processes": [
            {{"name": "app", "argv": ["/bin/sh", "-c", "cp /run/share/from-host /run/share/from-guest; echo started; while true; do sleep 1; done"]}},
            {{"name": "web", "argv": ["/bin/sh", "-c", "mkdir -p /www && echo hello-from-jail > /www/index.html && exec httpd -f -p 80 -h /www"]}}]}}"#
    )
}

/// The `jail` ids (uid, whether automatic) `crib pod run` recorded in info.json.
fn recorded_jail(run_dir: &Path) -> Result<(u32, bool)> {
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("info.json"))?)?;
    let jail = &info["jail"];
    let uid = jail["uid"].as_u64().context("info.json has no jail.uid")?;
    anyhow::ensure!(
        jail["gid"].as_u64() == Some(uid),
        "info.json's jail: gid differs from uid: {jail}"
    );
    Ok((u32::try_from(uid)?, jail["auto"] == true))
}

/// The jailed pod's share works both ways: the guest copied the host's file back. Returns
/// the pids of virtiofsd, which with the VMM and KVM's thread for the VM
/// (`kvm-nx-lpage-recovery-<vmm>`) is all the pod's cgroup holds.
fn check_share(share: &Path, cgroup: &Path, vmm: u32) -> Result<Vec<u32>> {
    let copied = share.join("from-guest");
    let start = Instant::now();
    while std::fs::read_to_string(&copied).unwrap_or_default() != "hello-from-host\n" {
        anyhow::ensure!(
            start.elapsed() < BOOT_WAIT,
            "the jailed pod did not copy from-host to from-guest on its virtio-fs share"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs"))?;
    let kvm_thread = format!("kvm-nx-lpage-recovery-{vmm}");
    let mut virtiofsd = Vec::new();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        match comm.trim() {
            "virtiofsd" => virtiofsd.push(pid),
            _ if pid == vmm => {}
            name if name == kvm_thread => {}
            name => {
                bail!("pid {pid} ({name}) in the pod's cgroup is not the VMM, KVM's or virtiofsd")
            }
        }
    }
    anyhow::ensure!(
        !virtiofsd.is_empty(),
        "no virtiofsd in the pod's cgroup: {procs}"
    );
    eprintln!(
        "jail test: the share works both ways; virtiofsd {virtiofsd:?} is in the pod's cgroup"
    );
    Ok(virtiofsd)
}

/// Waits until none of `pids` exists.
fn wait_gone(pids: &[u32], what: &str) -> Result<()> {
    let start = Instant::now();
    while let Some(pid) = pids
        .iter()
        .find(|pid| Path::new(&format!("/proc/{pid}")).exists())
    {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(20),
            "{what} {pid} outlived the pod"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Whether some process holds the lease file of uid `id` (`flock -n` fails).
fn id_leased(id: u32) -> Result<bool> {
    let file = format!("{ID_LOCK_DIR}/uid-{id}");
    if !Path::new(&file).exists() {
        return Ok(false);
    }
    let status = Command::new("flock")
        .args(["-n", "-E", "75", &file, "true"])
        .status()
        .context("cannot run flock")?;
    Ok(status.code() == Some(75))
}

/// The pod answers HTTP at its address on the pod network, from the host's namespace.
fn check_pod_network(run_dir: &Path) -> Result<()> {
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("info.json"))?)?;
    let address = info["network"]["address"]
        .as_str()
        .context("info.json has no network.address")?
        .to_string();
    let url = format!("http://{address}/");
    let start = Instant::now();
    loop {
        let out = run_with_timeout(
            Command::new("busybox").args(["wget", "-q", "-O", "-", &url]),
            CALL_TIMEOUT,
        )?;
        let body = String::from_utf8_lossy(&out.stdout);
        if body.contains("hello-from-jail") {
            eprintln!("jail test: {url} answers through the jailed VMM's tap");
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < BOOT_WAIT,
            "the jailed pod does not answer {url}: {body}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The pid of `parent`'s child in a PID namespace of its own (the jailed VMM under `crib
/// pod run`; its other child, the network keeper, is in the host's).
fn jailed_child_of(parent: u32) -> Result<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let name = entry?.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let nested = status_field(&status, "NSpid").is_some_and(|n| n.contains(' '));
        if status_field(&status, "PPid") == Some(parent.to_string()) && nested {
            children.push(pid);
        }
    }
    match children.as_slice() {
        [pid] => Ok(*pid),
        other => bail!(
            "crib pod run (pid {parent}) has children {other:?} in a PID namespace of their own, not one"
        ),
    }
}

/// A process killed (and reaped) when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `/proc/PID/status` field's value, tabs turned into spaces.
fn status_field(status: &str, name: &str) -> Option<String> {
    status.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
    })
}

/// Every path under `dir` (relative, without descending into `skip`).
fn walk(dir: &Path, base: &Path, skip: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        let relative = path.strip_prefix(base)?.to_path_buf();
        let is_dir = std::fs::symlink_metadata(&path)?.is_dir();
        out.push(relative.clone());
        if is_dir && relative != skip {
            walk(&path, base, skip, out)?;
        }
    }
    Ok(())
}

/// The jailed VMM's checks from the host while it runs: ids and capabilities of every
/// thread, namespaces, the root's contents, the cgroup.
fn check_jailed(run_dir: &Path, cgroup: &Path, id: u32) -> Result<u32> {
    let supervisor = pod_pid(run_dir)?;
    let vmm = jailed_child_of(supervisor)?;
    let ids = format!("{id} {id} {id} {id}");
    let mut threads: u64 = 0;
    for task in std::fs::read_dir(format!("/proc/{vmm}/task"))? {
        let task = task?.path();
        let status = std::fs::read_to_string(task.join("status"))?;
        let field = |name| status_field(&status, name).unwrap_or_default();
        for (name, want) in [
            ("Uid", ids.as_str()),
            ("Gid", ids.as_str()),
            ("Groups", ""),
            ("CapInh", "0000000000000000"),
            ("CapPrm", "0000000000000000"),
            ("CapEff", "0000000000000000"),
            ("CapBnd", "0000000000000000"),
            ("CapAmb", "0000000000000000"),
            ("NoNewPrivs", "1"),
        ] {
            anyhow::ensure!(
                field(name) == want,
                "thread {} of the VMM: {name} is {:?}, not {want:?}",
                task.display(),
                field(name)
            );
        }
        threads += 1;
    }
    // vCPUs (2), the API, the docker proxy, device workers: checked them all.
    anyhow::ensure!(threads >= 4, "the VMM has only {threads} threads");
    let status = std::fs::read_to_string(format!("/proc/{vmm}/status"))?;
    let nspid = status_field(&status, "NSpid").unwrap_or_default();
    anyhow::ensure!(
        nspid == format!("{vmm} 1"),
        "the VMM is PID 1 of its own PID namespace: NSpid {nspid:?}"
    );
    for ns in ["mnt", "pid", "ipc", "net"] {
        let own = std::fs::read_link(format!("/proc/self/ns/{ns}"))?;
        let its = std::fs::read_link(format!("/proc/{vmm}/ns/{ns}"))?;
        anyhow::ensure!(own != its, "the VMM shares the {ns} namespace {own:?}");
    }
    // The root: the run directory at its host path, /dev/null, nothing else.
    let root = PathBuf::from(format!("/proc/{vmm}/root"));
    let run_relative = run_dir.strip_prefix("/")?;
    let mut paths = Vec::new();
    walk(&root, &root, run_relative, &mut paths)?;
    let unexpected: Vec<_> = paths
        .iter()
        .filter(|p| {
            !(run_relative.starts_with(p) || p.starts_with(run_relative))
                && p.as_path() != Path::new("dev")
                && p.as_path() != Path::new("dev/null")
        })
        .collect();
    anyhow::ensure!(
        unexpected.is_empty(),
        "the jail root holds more than the run directory and /dev/null: {unexpected:?} (all: {paths:?})"
    );
    anyhow::ensure!(
        root.join(run_relative).join("api.sock").exists() && root.join("dev/null").exists(),
        "the jail root lacks the run directory's api.sock or /dev/null: {paths:?}"
    );
    // The cgroup: the limits, the VMM in it.
    let read = |name: &str| std::fs::read_to_string(cgroup.join(name)).unwrap_or_default();
    anyhow::ensure!(
        read("cpu.max").trim() == "200000 100000",
        "cpu.max is {:?}",
        read("cpu.max")
    );
    // Guest RAM + crib's 192 MiB + 64 MiB for the share's virtiofsd.
    let memory_max = (256u64 << 20) + (192 << 20) + (64 << 20);
    anyhow::ensure!(
        read("memory.max").trim() == memory_max.to_string(),
        "memory.max is {:?}, not guest RAM + 192 MiB + 64 MiB",
        read("memory.max")
    );
    anyhow::ensure!(
        read("cgroup.procs")
            .lines()
            .any(|l| l.trim() == vmm.to_string()),
        "the cgroup's procs {:?} lack the VMM {vmm}",
        read("cgroup.procs")
    );
    // pids.max: its value is unit-tested (vmm::jail::pids_max); here it must be set and
    // leave the VMM's threads room.
    let pids_max: u64 = read("pids.max").trim().parse().unwrap_or(0);
    let pids_current: u64 = read("pids.current").trim().parse().unwrap_or(u64::MAX);
    // (Threads come and go, io-wq workers among them: no count is compared with another.)
    anyhow::ensure!(
        pids_max > pids_current && pids_max > threads,
        "pids.max {:?}, pids.current {:?}, the VMM's threads {threads}",
        read("pids.max"),
        read("pids.current")
    );
    eprintln!(
        "jail test: VMM {vmm}: {threads} threads, pids.current {pids_current}, pids.max {pids_max}, own net namespace"
    );
    Ok(vmm)
}

/// A jailed pod (docs/JAIL.md) boots, runs its process and answers docker; its VMM runs
/// as the jail's ids with no capabilities in every thread, PID 1 of its own PID namespace,
/// in its own mount and IPC namespaces whose root holds only the run directory and
/// /dev/null, in a cgroup with its limits (a stale cgroup of the pod is removed first);
/// it dies with `crib pod run` killed with -9, and the next run removes the cgroup left;
/// nothing is left after a pod stopped gracefully. Refused configurations say why.
fn jail_confines_the_vmm() -> Result<()> {
    GuestArtifacts::pod()?;
    let name = "jw";
    let share = std::env::temp_dir().join(format!("crib-pod-{}-jail-share", std::process::id()));
    let _ = std::fs::remove_dir_all(&share);
    std::fs::create_dir_all(&share)?;
    std::fs::write(share.join("from-host"), "hello-from-host\n")?;
    let launch = |jail: &str| {
        format!(
            r#"{{"pod": {}, "cpus": 2, "memory": "256M", "jail": {jail},
                "shares": {{"share": {{"dir": "{}"}}}}}}"#,
            jail_pod_spec(name),
            share.display()
        )
    };
    // Refused: uid 0, and a crib that is not root.
    let refused = Scratch::new("jail-refused", &launch(r#"{"uid": 0, "gid": 100000}"#))?;
    let out = run_crib(&refused.run_args(), CALL_TIMEOUT)?;
    out.check(
        out.code == Some(1) && out.stderr.contains("field jail.uid: is 0 (root)"),
        "a jail with uid 0 is refused naming the field",
    )?;
    std::fs::write(&refused.launch, launch(r#"{"uid": 100000, "gid": 100000}"#))?;
    for dir in [&refused.dir, &refused.launch] {
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let not_root = run_with_timeout(
        Command::new("setpriv")
            .args(["--reuid=100001", "--regid=100001", "--clear-groups", "--"])
            .arg(crib_bin())
            .args(["pod", "run"])
            .arg(&refused.launch)
            .args(["--run-root", "/tmp/crib-jail-not-root"]),
        CALL_TIMEOUT,
    )?;
    let stderr = String::from_utf8_lossy(&not_root.stderr);
    anyhow::ensure!(
        not_root.status.code() == Some(1) && stderr.contains("the jail needs root"),
        "a jailed pod run by a non-root crib is refused: {:?}\n{stderr}",
        not_root.status
    );
    std::fs::remove_dir_all(&refused.dir)?;
    // Refused: no cgroup v2 (a tmpfs over /sys/fs/cgroup in a mount namespace of crib's
    // own), before anything of the pod is made.
    let hidden = Scratch::new("jail-no-cgroup", &launch(r#""auto""#))?;
    let no_cgroup = run_with_timeout(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount -t tmpfs none /sys/fs/cgroup && exec "$0" "$@""#)
            .arg(crib_bin())
            .args(hidden.run_args()),
        CALL_TIMEOUT,
    )?;
    let stderr = String::from_utf8_lossy(&no_cgroup.stderr);
    anyhow::ensure!(
        no_cgroup.status.code() == Some(1)
            && stderr.contains("the jail needs cgroup v2 at /sys/fs/cgroup")
            && stderr.contains("mount -t cgroup2 none /sys/fs/cgroup"),
        "a jailed pod without cgroup v2 is refused naming /sys/fs/cgroup and the fix: {:?}\n{stderr}",
        no_cgroup.status
    );
    let left = [
        (hidden.root.join(name).exists(), "its run directory"),
        (
            Path::new("/sys/fs/cgroup/crib").join(name).exists(),
            "its cgroup",
        ),
        (id_leased(*AUTO_IDS.start())?, "a held id"),
    ];
    for (present, what) in left {
        anyhow::ensure!(
            !present,
            "a start refused for want of cgroup v2 left {what}\n{stderr}"
        );
    }
    eprintln!(
        "jail test: without cgroup v2: {}",
        stderr.lines().next().unwrap_or("")
    );
    std::fs::remove_dir_all(&hidden.dir)?;
    eprintln!("jail test: the refused configurations are refused");

    let scratch = Scratch::new("jail", &launch(r#"{"uid": 100000, "gid": 100000}"#))?;
    let run_dir = scratch.root.join(name);
    let cgroup = PathBuf::from("/sys/fs/cgroup/crib").join(name);
    // A stale cgroup of the pod with a process in it, as a crib killed with -9 leaves.
    std::fs::create_dir_all(&cgroup)?;
    let mut stale = KillOnDrop(
        Command::new("sleep")
            .arg("600")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    std::fs::write(cgroup.join("cgroup.procs"), stale.0.id().to_string())?;
    eprintln!(
        "jail test: a stale cgroup {} holds pid {}",
        cgroup.display(),
        stale.0.id()
    );
    let root = scratch.root_arg();
    // Run 1: the stale cgroup goes, the VMM is jailed, and dies with its supervisor
    // killed with -9 (the parent-death signal), leaving its cgroup behind.
    let mut vmm = 0;
    let killed = run_crib_while(&scratch.run_args(), DEADLINE, || {
        scratch.wait_listed(name)?;
        scratch.wait_docker_ps(name)?;
        eprintln!("jail test: the jailed pod answers docker ps");
        vmm = check_jailed(&run_dir, &cgroup, JAIL_ID)?;
        check_pod_network(&run_dir)?;
        anyhow::ensure!(
            recorded_jail(&run_dir)? == (JAIL_ID, false),
            "info.json records the fixed ids"
        );
        anyhow::ensure!(
            id_leased(JAIL_ID)?,
            "crib pod run holds uid {JAIL_ID}'s lease"
        );
        let virtiofsd = check_share(&share, &cgroup, vmm)?;
        eprintln!("jail test: the VMM (pid {vmm}) is jailed as expected; kill -9 crib pod run");
        let supervisor = pod_pid(&run_dir)?;
        let status = Command::new("kill")
            .args(["-KILL", &supervisor.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -KILL {supervisor}: {status}");
        let start = Instant::now();
        while Path::new(&format!("/proc/{vmm}")).exists() {
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(20),
                "the jailed VMM {vmm} outlived its supervisor killed with -9"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        wait_gone(&virtiofsd, "virtiofsd")
    })?;
    let stale_status = stale.0.try_wait()?;
    killed.check(
        stale_status.is_some() && killed.stderr.contains("removing the stale cgroup"),
        "crib pod run killed the stale cgroup's process and removed it",
    )?;
    killed.check(
        killed.stderr.contains("jailed: uid 100000, gid 100000"),
        "crib logs the jail",
    )?;
    killed.check(
        cgroup.exists(),
        "a crib killed with -9 leaves its cgroup (the next run removes it)",
    )?;
    killed.check(
        killed
            .stderr
            .contains("jail ids: uid 100000, gid 100000 (fixed"),
        "crib logs the fixed ids",
    )?;
    killed.check(
        !id_leased(JAIL_ID)?,
        "the lease of uid 100000 ended with crib pod run killed with -9",
    )?;
    eprintln!("jail test: the VMM died with its supervisor, its ids are free; run 2 with \"auto\"");

    // Run 2, with automatic ids: the cgroup run 1 left goes, the pod runs and stops
    // gracefully, nothing is left.
    std::fs::write(&scratch.launch, launch(r#""auto""#))?;
    let mut auto_id = 0;
    let mut virtiofsd = Vec::new();
    std::fs::remove_file(share.join("from-guest"))?;
    let out = run_crib_while(&scratch.run_args(), DEADLINE, || {
        scratch.wait_listed(name)?;
        scratch.wait_docker_ps(name)?;
        let (id, auto) = recorded_jail(&run_dir)?;
        auto_id = id;
        anyhow::ensure!(
            auto && AUTO_IDS.contains(&id),
            "info.json records an automatic id from {AUTO_IDS:?}: {id}, auto {auto}"
        );
        anyhow::ensure!(id_leased(id)?, "crib pod run holds uid {id}'s lease");
        vmm = check_jailed(&run_dir, &cgroup, id)?;
        check_pod_network(&run_dir)?;
        virtiofsd = check_share(&share, &cgroup, vmm)?;
        eprintln!("jail test: run 2 is jailed (VMM pid {vmm}); crib pod stop");
        let stop = run_crib(
            &["pod", "stop", name, "--timeout", "30", "--run-root", &root],
            Duration::from_secs(90),
        )?;
        stop.check(
            stop.code == Some(0) && stop.stdout.contains("crib exited 0"),
            "crib pod stop stops the jailed pod",
        )
    })?;
    out.check(
        out.stderr.contains("removing the stale cgroup"),
        "crib pod run removed the cgroup the killed run left",
    )?;
    let console = scratch.console(name);
    out.check(
        console.contains("started"),
        &format!("the jailed pod's process ran:\n{console}"),
    )?;
    check_graceful(&out, &console)?;
    out.check(
        out.stderr.contains(&format!(
            "jail ids: uid {auto_id}, gid {auto_id} (automatic"
        )),
        "crib logs the automatic ids",
    )?;
    // Nothing left: the ids' lease, the cgroup, the jail's mount point and its mounts, the
    // VMM, the sockets; the run directory is root's alone again.
    out.check(!id_leased(auto_id)?, "the lease of the automatic id ended")?;
    out.check(!cgroup.exists(), "the pod's cgroup is removed")?;
    out.check(
        !Path::new(&format!("/proc/{vmm}")).exists(),
        "the jailed VMM has ended",
    )?;
    out.check(
        virtiofsd
            .iter()
            .all(|pid| !Path::new(&format!("/proc/{pid}")).exists()),
        &format!("virtiofsd {virtiofsd:?} has ended"),
    )?;
    let fs_files: Vec<_> = std::fs::read_dir(&run_dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("fs") && n.contains(".sock"))
        .collect();
    out.check(
        fs_files.is_empty(),
        &format!("virtiofsd's socket files are removed: {fs_files:?}"),
    )?;
    out.check(
        !run_dir.join(".jail").exists(),
        "the jail's mount point is removed",
    )?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    out.check(
        !mounts.contains(&run_dir.display().to_string()),
        &format!("no mount of the run directory is left:\n{mounts}"),
    )?;
    for socket in ["api.sock", "docker.sock", "vsock.sock"] {
        out.check(
            !run_dir.join(socket).exists(),
            &format!("{socket} is removed"),
        )?;
    }
    let meta = std::fs::metadata(&run_dir)?;
    out.check(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777 == 0o700
            && std::os::unix::fs::MetadataExt::gid(&meta) == 0,
        "the run directory is root's alone again (0700)",
    )?;
    std::fs::remove_dir_all(&scratch.dir)?;
    std::fs::remove_dir_all(&share)?;
    Ok(())
}
