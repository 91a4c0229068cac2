//! `crib-bench pull [--runs N]` (default 3): pulls of a Debian image (debootstrap
//! --variant=minbase bookworm, one gzip layer, `benches/debian-rootfs.sh`) from a loopback
//! registry (Debian's docker-registry), cold, by crib (the library `crib image pull`
//! runs: download, verification, conversion to erofs, commit), by `docker pull` (Debian's
//! dockerd, started here with its own data root: download and extraction into overlay2)
//! and by `skopeo copy docker://... oci:DIR` (download only); then a second image that
//! shares the base layer and adds one of 8 MiB. Runs interleaved, medians; the share of
//! crib's time spent importing (verification and conversion).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use images::fixtures::{self, Compression, Entry};
use images::progress::NoProgress;
use images::registry::test_registry::{Format, Registry};
use images::registry::{pull, PullOptions};
use images::Store;
use serde_json::json;
use sha2::{Digest, Sha256};

const BASE: &str = "bench/debian:base";
const APP: &str = "bench/debian:app";

fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut file = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((format!("sha256:{:x}", hasher.finalize()), size))
}

fn write_blob(layout: &Path, bytes: &[u8]) -> Result<(String, usize)> {
    let digest = format!("sha256:{:x}", Sha256::digest(bytes));
    fs::write(
        layout.join("blobs/sha256").join(&digest["sha256:".len()..]),
        bytes,
    )?;
    Ok((digest, bytes.len()))
}

/// An OCI layout with two images: `base` (the Debian rootfs, one gzip layer) and `app`
/// (the same layer plus 8 MiB of noise). Cached under target/bench-pull/layout.
fn layout(out: &Path) -> Result<PathBuf> {
    let layout = out.join("layout");
    if layout.join("index.json").exists() {
        return Ok(layout);
    }
    let status = Command::new(crib_tests::repo_root().join("benches/debian-rootfs.sh")).status()?;
    if !status.success() {
        bail!("benches/debian-rootfs.sh failed");
    }
    let tmp = out.join("layout.tmp");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(tmp.join("blobs/sha256"))?;
    let rootfs = out.join("debian-rootfs.tar");
    let (base_diff_id, _) = sha256_file(&rootfs)?;
    let gz = tmp.join("base.tar.gz");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "gzip -6 -n -c {} > {}",
            rootfs.display(),
            gz.display()
        ))
        .status()?;
    if !status.success() {
        bail!("gzip failed");
    }
    let (base_digest, base_size) = sha256_file(&gz)?;
    fs::rename(
        &gz,
        tmp.join("blobs/sha256")
            .join(&base_digest["sha256:".len()..]),
    )?;
    let mut noise = vec![0u8; 8 << 20];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let app_tar = fixtures::layer_tar(&[
        Entry::dir("opt"),
        Entry::dir("opt/app"),
        Entry::file("opt/app/data", noise),
        Entry::file("opt/app/README", "crib-bench pull"),
    ])?;
    let app_diff_id = fixtures::sha256_digest(&app_tar);
    let (app_digest, app_size) =
        write_blob(&tmp, &fixtures::compress(&app_tar, Compression::Gzip)?)?;
    let base_layer = json!({"mediaType": Compression::Gzip.media_type(), "digest": base_digest, "size": base_size});
    let app_layer = json!({"mediaType": Compression::Gzip.media_type(), "digest": app_digest, "size": app_size});
    let mut entries = vec![];
    for (tag, diff_ids, layers) in [
        ("base", vec![base_diff_id.clone()], vec![base_layer.clone()]),
        (
            "app",
            vec![base_diff_id.clone(), app_diff_id],
            vec![base_layer, app_layer],
        ),
    ] {
        let config = fixtures::config_json(
            &fixtures::Config {
                cmd: Some(vec!["/bin/bash".into()]),
                ..fixtures::Config::default()
            },
            &diff_ids,
        );
        let (config_digest, config_size) = write_blob(&tmp, &serde_json::to_vec(&config)?)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
            "layers": layers,
        });
        let (digest, size) = write_blob(&tmp, &serde_json::to_vec(&manifest)?)?;
        entries.push(json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }));
    }
    fs::write(tmp.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    fs::write(
        tmp.join("index.json"),
        json!({"schemaVersion": 2, "manifests": entries}).to_string(),
    )?;
    fs::rename(&tmp, &layout)?;
    Ok(layout)
}

/// Debian's dockerd with its own data root and sockets; stopped on drop.
struct Dockerd {
    child: Child,
    dir: PathBuf,
    host: String,
}

impl Dockerd {
    fn start(data_root: &Path) -> Result<Dockerd> {
        let dir = PathBuf::from(format!("/tmp/crib-bench-dockerd-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let host = format!("unix://{}/docker.sock", dir.display());
        let log = fs::File::create(dir.join("dockerd.log"))?;
        let child = Command::new("dockerd")
            .arg("--data-root")
            .arg(data_root)
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .args(["-H", &host])
            // No networking: the bench only pulls. 127.0.0.0/8 is an insecure (HTTP)
            // registry by default.
            .args([
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--ip-masq=false",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start dockerd (apt-get install docker.io)")?;
        let dockerd = Dockerd { child, dir, host };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if dockerd.docker(&["version"]).is_ok() {
                return Ok(dockerd);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "dockerd did not answer; see {}/dockerd.log",
            dockerd.dir.display()
        )
    }

    fn docker(&self, args: &[&str]) -> Result<()> {
        let output = Command::new("docker")
            .args(["-H", &self.host])
            .args(args)
            .output()?;
        if !output.status.success() {
            bail!(
                "docker {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Removes every image (and so every layer).
    fn clear(&self) -> Result<()> {
        let _ = self.docker(&["image", "prune", "--all", "--force"]);
        Ok(())
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // SIGTERM: dockerd stops its containerd and unmounts before it exits.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn timed(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed().as_secs_f64())
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores ({cpu}), Linux {}", kernel.trim())
}

/// CPU seconds (user + system, reaped children included) of `pid` and, with `tree`, its
/// descendants.
fn cpu_of(pid: u32, tree: bool) -> f64 {
    let ticks = 100.0; // USER_HZ on Linux
    let mut total = 0.0;
    let mut pending = vec![pid];
    let stats: Vec<(u32, u32, f64)> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let text = fs::read_to_string(e.path().join("stat")).ok()?;
            // Fields after the command's closing parenthesis: state ppid ... utime(14)
            // stime(15) cutime(16) cstime(17), numbered from 1 over the whole line.
            let (head, rest) = text.rsplit_once(')')?;
            let pid = head.split_whitespace().next()?.parse().ok()?;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ppid = f.get(1)?.parse().ok()?;
            let cpu: f64 = f
                .get(11..15)?
                .iter()
                .filter_map(|v| v.parse::<f64>().ok())
                .sum();
            Some((pid, ppid, cpu / ticks))
        })
        .collect();
    while let Some(p) = pending.pop() {
        for (pid, ppid, cpu) in &stats {
            if *pid == p {
                total += cpu;
            }
            if tree && *ppid == p {
                pending.push(*pid);
            }
        }
    }
    total
}

/// Wall and CPU seconds of `f`, CPU counted over this process (with the children it
/// reaped: mkfs.erofs, the docker CLI, skopeo; not the registry or dockerd, which it
/// also started) and the `also` process tree (dockerd and its containerd).
fn measured(also: Option<u32>, f: impl FnOnce() -> Result<()>) -> Result<(f64, f64)> {
    let me = std::process::id();
    let cpu = || cpu_of(me, false) + also.map_or(0.0, |pid| cpu_of(pid, true));
    let before = cpu();
    let wall = timed(f)?;
    Ok((wall, cpu() - before))
}

#[derive(Default)]
struct Figures {
    crib: Vec<(f64, f64)>,
    crib_fetch: Vec<f64>,
    crib_import: Vec<f64>,
    crib_second: Vec<(f64, f64)>,
    docker: Vec<(f64, f64)>,
    docker_second: Vec<(f64, f64)>,
    skopeo: Vec<(f64, f64)>,
    skopeo_second: Vec<(f64, f64)>,
}

fn walls(v: &[(f64, f64)]) -> f64 {
    median(&v.iter().map(|x| x.0).collect::<Vec<_>>())
}

fn cpus(v: &[(f64, f64)]) -> f64 {
    median(&v.iter().map(|x| x.1).collect::<Vec<_>>())
}

/// `runs` interleaved pulls with crib's store, dockerd's data root and skopeo's OCI dir
/// all under `place`.
fn measure(runs: usize, place: &Path, base_ref: &str, app_ref: &str) -> Result<Figures> {
    fs::create_dir_all(place)?;
    let docker_root = place.join("docker");
    let _ = fs::remove_dir_all(&docker_root);
    let dockerd = Dockerd::start(&docker_root)?;
    let dockerd_pid = dockerd.child.id();
    let crib_root = place.join("crib-store");
    let skopeo_dir = place.join("skopeo-oci");
    let mut f = Figures::default();
    let options = PullOptions::default();
    for run in 0..runs {
        eprintln!(
            "crib-bench pull: {} run {}/{runs}",
            place.display(),
            run + 1
        );
        let _ = fs::remove_dir_all(&crib_root);
        let store = Store::open(&crib_root)?;
        let mut pulled = None;
        f.crib.push(measured(None, || {
            pulled = Some(pull(&store, base_ref, &options, &NoProgress)?);
            Ok(())
        })?);
        let pulled = pulled.context("no pull")?;
        f.crib_import.push(pulled.import_time.as_secs_f64());
        f.crib_fetch.push(pulled.fetch_time.as_secs_f64());
        f.crib_second.push(measured(None, || {
            pull(&store, app_ref, &options, &NoProgress)?;
            Ok(())
        })?);
        drop(store);
        let _ = fs::remove_dir_all(&crib_root);

        dockerd.clear()?;
        f.docker.push(measured(Some(dockerd_pid), || {
            dockerd.docker(&["pull", "--quiet", base_ref])
        })?);
        f.docker_second.push(measured(Some(dockerd_pid), || {
            dockerd.docker(&["pull", "--quiet", app_ref])
        })?);
        dockerd.clear()?;

        let _ = fs::remove_dir_all(&skopeo_dir);
        for (times, reference, tag) in [
            (&mut f.skopeo, base_ref, "base"),
            (&mut f.skopeo_second, app_ref, "app"),
        ] {
            times.push(measured(None, || {
                let status = Command::new("skopeo")
                    .args([
                        "--insecure-policy",
                        "copy",
                        "--quiet",
                        "--src-tls-verify=false",
                    ])
                    .arg(format!("docker://{reference}"))
                    .arg(format!("oci:{}:{tag}", skopeo_dir.display()))
                    .status()?;
                if !status.success() {
                    bail!("skopeo copy failed");
                }
                Ok(())
            })?);
        }
        let _ = fs::remove_dir_all(&skopeo_dir);
    }
    drop(dockerd);
    let _ = fs::remove_dir_all(&docker_root);
    Ok(f)
}

fn print(title: &str, f: &Figures) {
    let (c, d, s) = (walls(&f.crib), walls(&f.docker), walls(&f.skopeo));
    let (c2, d2, s2) = (
        walls(&f.crib_second),
        walls(&f.docker_second),
        walls(&f.skopeo_second),
    );
    println!("{title}\n");
    println!("| pull | wall | crib / this | CPU (user + sys) |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| `crib image pull` (download, verify, convert to erofs, commit) | {c:.2} s | 1.00 | {:.2} s |",
        cpus(&f.crib)
    );
    println!(
        "| `docker pull` (Docker 20.10, overlay2; dockerd's CPU) | {d:.2} s | {:.2} | {:.2} s |",
        c / d,
        cpus(&f.docker)
    );
    println!(
        "| `skopeo copy docker://… oci:DIR` (download only) | {s:.2} s | {:.2} | {:.2} s |",
        c / s,
        cpus(&f.skopeo)
    );
    println!(
        "| crib: of which download | {:.2} s | | |",
        median(&f.crib_fetch)
    );
    println!(
        "| crib: of which import (verify + convert + commit) | {:.2} s ({:.0} %) | | |",
        median(&f.crib_import),
        100.0 * median(&f.crib_import) / c
    );
    println!(
        "| second image (base layer already pulled): `crib image pull` | {c2:.2} s | 1.00 | {:.2} s |",
        cpus(&f.crib_second)
    );
    println!(
        "| second image: `docker pull` | {d2:.2} s | {:.2} | {:.2} s |",
        c2 / d2,
        cpus(&f.docker_second)
    );
    println!(
        "| second image: `skopeo copy` (into the same OCI dir) | {s2:.2} s | {:.2} | {:.2} s |",
        c2 / s2,
        cpus(&f.skopeo_second)
    );
    println!();
}

pub fn run(runs: usize) -> Result<()> {
    if let Some(reason) = images::registry::test_registry::unavailable() {
        bail!("cannot run: {reason}");
    }
    let out = crib_tests::target_dir().join("bench-pull");
    fs::create_dir_all(&out)?;
    let layout = layout(&out)?;
    let registry = Registry::start()?;
    registry.push(&layout, "base", BASE, Format::Oci)?;
    registry.push(&layout, "app", APP, Format::Oci)?;
    let (base_ref, app_ref) = (registry.reference(BASE), registry.reference(APP));
    let disk = measure(runs, &out.join("run"), &base_ref, &app_ref)?;
    let shm = PathBuf::from(format!("/dev/shm/crib-bench-pull-{}", std::process::id()));
    let memory = measure(runs, &shm, &base_ref, &app_ref);
    let _ = fs::remove_dir_all(&shm);
    let memory = memory?;

    let base_blob = fs::read_dir(layout.join("blobs/sha256"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0);
    let rootfs = fs::metadata(out.join("debian-rootfs.tar"))?.len();
    println!(
        "Debian bookworm minbase: {:.0} MB tar, one gzip layer of {:.0} MB; second image: + one 8 MiB layer. \
         Loopback docker-registry 2.8, {runs} runs interleaved, medians. Machine: {}.\n",
        rootfs as f64 / 1e6,
        base_blob as f64 / 1e6,
        machine()
    );
    print(
        "Stores on the disk (target/, the machine's root filesystem):",
        &disk,
    );
    print(
        "Stores on tmpfs (/dev/shm): crib's store, dockerd's data root, skopeo's OCI dir:",
        &memory,
    );
    Ok(())
}
