//! Soak: many pods started and stopped with `crib pod run` / `crib pod stop`, one after
//! another and then many at once, leave nothing behind: no crib process, no socket in a run
//! directory, no extra run directory, mount, network link or open file, and L1's available
//! memory back where it was. `CRIB_SOAK_CYCLES` (default 10) and `CRIB_SOAK_PODS` (default
//! 5) set the sizes; docs/BENCHMARKS.md ("Soak") has a run with the issue's 200 and 20.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crib_tests::fleet::{run_with_timeout, Fleet};
use crib_tests::{api_request, crib_bin, GuestArtifacts};

use crate::TestFn;

/// How long one pod may take to boot to cradle's ready marker.
const BOOT_WAIT: Duration = Duration::from_secs(150);
/// `crib pod stop --timeout` (graceful shutdown, seconds).
const STOP_TIMEOUT_S: u32 = 30;
/// Host-wide open files may move by this much for reasons of their own (L1's init, the
/// kernel's deferred closes, the percpu counter's slack); a leak per pod exceeds it.
const HOST_FILES_SLACK: i64 = 64;
/// MemAvailable may move by this much (slab, page cache); each pod's guest alone touches
/// about 40 MiB, so leaking even two pods' memory exceeds it.
const MEM_SLACK_KIB: i64 = 64 * 1024;

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![(
        "linux_soak_pods_started_and_stopped_leave_nothing_behind",
        pods_started_and_stopped_leave_nothing_behind,
    )]
}

fn env_count(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .with_context(|| format!("{name} takes a whole number, not {value:?}")),
        Err(_) => Ok(default),
    }
}

/// What a pod could leave behind on the host, at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Footprint {
    /// Processes running the crib binary (zombies included).
    crib_processes: usize,
    /// Open descriptors summed over those processes.
    crib_fds: usize,
    /// This test process's open descriptors.
    own_fds: usize,
    /// Allocated file handles host-wide (`/proc/sys/fs/file-nr`, first field).
    host_files: i64,
    /// Lines of `/proc/self/mountinfo`.
    mounts: usize,
    /// Lines of `ip -o link`.
    links: usize,
    /// Chains in nftables' `inet crib` table (one per pod with a network, plus the base).
    nft_chains: usize,
    /// Address leases in the pod network's IPAM (`/run/crib/.net/leases`).
    leases: usize,
    /// Directories under the run roots, and sockets left in them.
    run_dirs: usize,
    sockets: usize,
    mem_available_kib: i64,
}

fn count_dir(path: &Path) -> usize {
    std::fs::read_dir(path).map_or(0, |d| d.count())
}

/// Processes whose executable is `exe`, with their descriptor counts.
fn processes_of(exe: &Path) -> Vec<(u32, usize)> {
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let exe = std::fs::canonicalize(exe).unwrap_or_else(|_| exe.to_path_buf());
    proc.filter_map(|entry| {
        let entry = entry.ok()?;
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let dir = entry.path();
        // A zombie has no exe link; its cmdline is empty too, so look at comm as well.
        let running = std::fs::read_link(dir.join("exe")).is_ok_and(|p| p == exe);
        let zombie =
            std::fs::read_to_string(dir.join("stat")).is_ok_and(|s| s.contains("(crib) Z"));
        (running || zombie).then(|| (pid, count_dir(&dir.join("fd"))))
    })
    .collect()
}

/// Directories right under each run root, and socket files anywhere below them.
fn run_dirs_and_sockets(roots: &[PathBuf]) -> (usize, usize) {
    use std::os::unix::fs::FileTypeExt;
    let mut dirs = 0;
    let mut sockets = 0;
    for root in roots {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            dirs += 1;
            sockets += std::fs::read_dir(entry.path()).map_or(0, |files| {
                files
                    .flatten()
                    .filter(|f| f.file_type().is_ok_and(|t| t.is_socket()))
                    .count()
            });
        }
    }
    (dirs, sockets)
}

fn footprint(roots: &[PathBuf]) -> Result<Footprint> {
    let crib = processes_of(&crib_bin());
    let host_files = std::fs::read_to_string("/proc/sys/fs/file-nr")?
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("cannot read /proc/sys/fs/file-nr")?;
    let mem_available_kib = std::fs::read_to_string("/proc/meminfo")?
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no MemAvailable in /proc/meminfo")?;
    let links = run_with_timeout(
        Command::new("ip").args(["-o", "link"]),
        Duration::from_secs(30),
    )
    .context("cannot run ip -o link")?;
    let (run_dirs, sockets) = run_dirs_and_sockets(roots);
    // No table yet (no pod had a network) counts as none.
    let nft = run_with_timeout(
        Command::new("nft").args(["list", "table", "inet", "crib"]),
        Duration::from_secs(30),
    )
    .context("cannot run nft (scripts/install-deps.sh installs nftables)")?;
    let nft_chains = String::from_utf8_lossy(&nft.stdout)
        .lines()
        .filter(|l| l.trim_start().starts_with("chain "))
        .count();
    // podnet's default IPAM directory, as root (the lab runs as root).
    let leases = count_dir(Path::new("/run/crib/.net/leases"));
    Ok(Footprint {
        crib_processes: crib.len(),
        crib_fds: crib.iter().map(|(_, fds)| fds).sum(),
        own_fds: count_dir(Path::new("/proc/self/fd")),
        host_files,
        mounts: std::fs::read_to_string("/proc/self/mountinfo")?
            .lines()
            .count(),
        links: String::from_utf8_lossy(&links.stdout).lines().count(),
        nft_chains,
        leases,
        run_dirs,
        sockets,
        mem_available_kib,
    })
}

/// Fails unless `after` is as flat as `before` (exactly, except host files and memory,
/// which move within their slack), with `run_dirs` directories expected in the run roots.
fn check_flat(phase: &str, before: &Footprint, after: &Footprint, run_dirs: usize) -> Result<()> {
    println!("soak: {phase}: before {before:?}");
    println!("soak: {phase}: after  {after:?}");
    let mut problems = Vec::new();
    if after.crib_processes != 0 || after.crib_fds != 0 {
        problems.push(format!(
            "{} crib processes with {} descriptors are left",
            after.crib_processes, after.crib_fds
        ));
    }
    for (what, b, a) in [
        ("the test's open descriptors", before.own_fds, after.own_fds),
        ("mounts", before.mounts, after.mounts),
        ("network links", before.links, after.links),
        ("nftables chains", before.nft_chains, after.nft_chains),
        ("address leases", before.leases, after.leases),
    ] {
        if a != b {
            problems.push(format!("{what}: {b} before, {a} after"));
        }
    }
    if after.run_dirs != run_dirs || after.sockets != 0 {
        problems.push(format!(
            "run roots hold {} directories (expected {run_dirs}) and {} sockets",
            after.run_dirs, after.sockets
        ));
    }
    if after.host_files > before.host_files + HOST_FILES_SLACK {
        problems.push(format!(
            "host-wide open files grew from {} to {}",
            before.host_files, after.host_files
        ));
    }
    if before.mem_available_kib - after.mem_available_kib > MEM_SLACK_KIB {
        problems.push(format!(
            "MemAvailable fell from {} to {} KiB",
            before.mem_available_kib, after.mem_available_kib
        ));
    }
    if !problems.is_empty() {
        bail!("{phase} left things behind: {}", problems.join("; "));
    }
    Ok(())
}

/// Waits until the pod's docker socket lists its process `app` (what `docker ps` asks,
/// without the CLI). cradle's ready marker comes earlier, before its API and its power
/// button handler are up: a stop sent then is lost (the pod is force-stopped, exit 6).
fn wait_ready(run_dir: &Path, wait: Duration, child: &mut Child) -> Result<()> {
    let socket = run_dir.join("docker.sock");
    let start = Instant::now();
    loop {
        if let Ok((200, body)) = api_request(&socket, "GET", "/v1.47/containers/json", "") {
            if body.contains("app") {
                return Ok(());
            }
        }
        if let Some(status) = child.try_wait()? {
            bail!("crib pod run ended before the pod was ready: {status}");
        }
        if start.elapsed() > wait {
            bail!("the pod did not report ready within {wait:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `crib pod stop NAME`; fails unless it reports crib's exit code 0.
fn stop_pod(crib: &Path, name: &str, root: &Path) -> Result<()> {
    let out = run_with_timeout(
        Command::new(crib)
            .args([
                "pod",
                "stop",
                name,
                "--timeout",
                &STOP_TIMEOUT_S.to_string(),
            ])
            .arg("--run-root")
            .arg(root),
        Duration::from_secs(u64::from(STOP_TIMEOUT_S) + 60),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !(out.status.success() && stdout.contains("stopped (crib exited 0)")) {
        bail!(
            "crib pod stop {name}: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// One `crib pod run` of `launch` until ready, then `crib pod stop`; crib must exit 0.
fn cycle(crib: &Path, launch: &Path, root: &Path, logs: &Path) -> Result<()> {
    let mut child = Command::new(crib)
        .args(["pod", "run"])
        .arg(launch)
        .arg("--run-root")
        .arg(root)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(logs.join("crib.stdout"))?)
        .stderr(std::fs::File::create(logs.join("crib.stderr"))?)
        .spawn()
        .with_context(|| format!("cannot start {}", crib.display()))?;
    let result = (|| -> Result<()> {
        wait_ready(&root.join("soak"), BOOT_WAIT, &mut child)?;
        stop_pod(crib, "soak", root)?;
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("crib pod run still runs 60 s after crib pod stop returned");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        anyhow::ensure!(status.success(), "crib pod run exited with {status}");
        Ok(())
    })();
    if result.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    result.map_err(|e| {
        let read = |p: PathBuf| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .replace('\r', "")
        };
        e.context(format!(
            "--- crib stderr:\n{}\n--- console:\n{}",
            read(logs.join("crib.stderr")),
            read(root.join("soak/console.log"))
        ))
    })
}

/// Sequential cycles of one pod (same name and run root), then many pods at once; each
/// phase compared with the footprint before it. A first cycle warms the caches first.
fn pods_started_and_stopped_leave_nothing_behind() -> Result<()> {
    let cycles = env_count("CRIB_SOAK_CYCLES", 10)?;
    let pods = env_count("CRIB_SOAK_PODS", 5)?;
    let pod = GuestArtifacts::pod()?;
    let crib = crib_bin();
    let dir = std::env::temp_dir().join(format!("crib-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let root = dir.join("run");
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let launch = dir.join("soak.json");
    std::fs::write(
        &launch,
        format!(
            r#"{{"pod": {{"name": "soak", "lifetime": "until-shutdown",
                 "processes": [{{"name": "app", "argv": ["/bin/sh", "-c", "echo started; while true; do sleep 1; done"]}}]}},
               "kernel": "{}", "initrd": "{}", "cpus": 1, "memory": "128M"}}"#,
            pod.vmlinux.display(),
            pod.initramfs.display()
        ),
    )?;
    let roots = [root.clone()];

    cycle(&crib, &launch, &root, &logs).context("warm-up cycle")?;
    let before = footprint(&roots)?;
    let started = Instant::now();
    for i in 1..=cycles {
        cycle(&crib, &launch, &root, &logs).with_context(|| format!("cycle {i} of {cycles}"))?;
        if i % 25 == 0 {
            let now = footprint(&roots)?;
            println!(
                "soak: cycle {i}/{cycles} at {:.0} s: {now:?}",
                started.elapsed().as_secs_f64()
            );
        }
    }
    let sequential = started.elapsed();
    let after = footprint(&roots)?;
    println!(
        "soak: {cycles} sequential pod run/stop cycles in {:.1} s ({:.2} s each)",
        sequential.as_secs_f64(),
        sequential.as_secs_f64() / cycles.max(1) as f64
    );
    check_flat("sequential cycles", &before, &after, 1)?;

    let fleet_dir = dir.join("fleet");
    let fleet_roots: Vec<PathBuf> = (0..pods)
        .map(|i| fleet_dir.join(format!("soakc-{i}")))
        .collect();
    let before = footprint(&fleet_roots)?;
    let started = Instant::now();
    let mut fleet = Fleet::launch(&crib, &fleet_dir, "soakc", pods, "128M")?;
    for i in 0..fleet.pods.len() {
        let run_dir = fleet.pods[i].run_dir();
        let ready = wait_ready(&run_dir, BOOT_WAIT * 2, &mut fleet.pods[i].child);
        if let Err(e) = ready {
            return Err(e.context(fleet.pods[i].logs()));
        }
    }
    let up = started.elapsed();
    let all_up = footprint(&fleet_roots)?;
    fleet.stop_all(&crib, STOP_TIMEOUT_S, Duration::from_secs(120))?;
    let concurrent = started.elapsed();
    drop(fleet);
    let after = footprint(&fleet_roots)?;
    println!(
        "soak: {pods} pods at once: all ready {:.1} s after launch, all stopped {:.1} s after \
         launch; with all up: {} crib processes, {} descriptors, MemAvailable {} KiB",
        up.as_secs_f64(),
        concurrent.as_secs_f64(),
        all_up.crib_processes,
        all_up.crib_fds,
        all_up.mem_available_kib
    );
    check_flat("concurrent pods", &before, &after, pods)?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
