//! crib's API socket against a real guest (crib's pod kernel and cradle): a VM created from
//! a config file is paused and resumed (a counter the guest prints stops and goes on), disk
//! metrics grow after the guest writes, `PUT /api/v1/vm/shutdown` powers a pod off through
//! cradle; and ten pods started at once all answer `docker ps` and stop cleanly.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crib_tests::fleet::Fleet;
use crib_tests::{api_request, crib_bin, GuestArtifacts, LiveCrib};

use crate::TestFn;

/// How long a guest may take to boot and print its first lines.
const BOOT_WAIT: Duration = Duration::from_secs(150);
/// The guest's test hook: a counter and the guest's uptime every 200 ms.
const TICKER: &str =
    "i=0; while true; do i=$((i+1)); echo tick $i $(cat /proc/uptime); sleep 0.2; done";

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![
        (
            "linux_api_config_file_vm_pauses_and_resumes",
            config_file_vm_pauses_and_resumes,
        ),
        (
            "linux_api_metrics_grow_after_disk_writes",
            metrics_grow_after_disk_writes,
        ),
        (
            "linux_api_shutdown_powers_the_pod_off",
            shutdown_powers_the_pod_off,
        ),
        ("linux_api_density_ten_pods", density_ten_pods),
    ]
}

fn scratch(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("crib-api-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// An HTTP answer: status code and body.
struct Reply {
    status: u16,
    body: String,
}

impl Reply {
    /// The body without whitespace, so `"key":value` matches however it is formatted.
    fn compact(&self) -> String {
        self.body.chars().filter(|c| !c.is_whitespace()).collect()
    }

    /// The first integer after `"key":` in the compact body, from `from` on.
    fn number_after(&self, from: &str, key: &str) -> Option<u64> {
        let body = self.compact();
        let rest = &body[body.find(from)?..];
        let needle = format!("\"{key}\":");
        let rest = &rest[rest.find(&needle)? + needle.len()..];
        rest.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()
    }
}

/// One request on crib's API socket.
fn http(socket: &Path, method: &str, path: &str, body: &str) -> Result<Reply> {
    let (status, body) = api_request(socket, method, path, body)?;
    Ok(Reply { status, body })
}

/// `http`, failing unless the status is `want`.
fn expect(socket: &Path, method: &str, path: &str, body: &str, want: u16) -> Result<Reply> {
    let reply = http(socket, method, path, body)?;
    if reply.status != want {
        bail!(
            "{method} {path}: status {}, wanted {want}: {}",
            reply.status,
            reply.body
        );
    }
    Ok(reply)
}

/// The last `tick N UPTIME IDLE` line on the console: (N, uptime in seconds).
fn last_tick(console: &str) -> Option<(u64, f64)> {
    // Complete lines only: the console is read as it comes, and "tick 4 1." is not 1.0.
    let complete = &console[..console.rfind('\n').map_or(0, |end| end + 1)];
    complete.lines().rev().find_map(|line| {
        let mut words = line.strip_prefix("tick ")?.split_whitespace();
        let n = words.next()?.parse().ok()?;
        let uptime = words.next()?.parse().ok()?;
        Some((n, uptime))
    })
}

/// A JSON string literal (the paths and command line of the tests: no control characters).
fn json_str(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

fn config_file_vm_pauses_and_resumes() -> Result<()> {
    let pod = GuestArtifacts::pod()?;
    let dir = scratch("pause")?;
    let api = dir.join("api.sock");
    let config = dir.join("vm.json");
    let cmdline = format!("console=ttyS0 panic=-1 quiet -- /bin/sh -c \"{TICKER}\"");
    std::fs::write(
        &config,
        format!(
            "{{\"id\": \"api-pause\", \"kernel\": {}, \"initrd\": {}, \"cmdline\": {},\n\
             \"cpus\": 1, \"memory\": \"256M\", \"api_socket\": {}}}\n",
            json_str(&pod.vmlinux.display().to_string()),
            json_str(&pod.initramfs.display().to_string()),
            json_str(&cmdline),
            json_str(&api.display().to_string()),
        ),
    )?;
    let mut crib = LiveCrib::spawn(&[
        "run".into(),
        "--config".into(),
        config.display().to_string(),
    ])?;
    crib.wait_for("tick 3", BOOT_WAIT, |out| {
        last_tick(out).filter(|t| t.0 >= 3)
    })?;

    let vm = expect(&api, "GET", "/api/v1/vm", "", 200)?;
    let compact = vm.compact();
    anyhow::ensure!(
        compact.contains("\"id\":\"api-pause\"") && compact.contains("\"state\":\"running\""),
        "GET /api/v1/vm shows the config file's id and state running: {}",
        vm.body
    );
    anyhow::ensure!(
        compact.contains(&format!(
            "\"api_socket\":{}",
            json_str(&api.display().to_string())
        )),
        "GET /api/v1/vm shows the effective config: {}",
        vm.body
    );

    let paused = expect(&api, "PUT", "/api/v1/vm/pause", "", 200)?;
    let paused_at = Instant::now();
    anyhow::ensure!(
        paused.compact().contains("\"state\":\"paused\""),
        "pause answers state paused: {}",
        paused.body
    );
    // Lines the guest wrote before the pause may still be in the pipe.
    std::thread::sleep(Duration::from_millis(300));
    let (before, uptime_before) =
        last_tick(&crib.stdout()).context("no tick line before the pause")?;
    std::thread::sleep(Duration::from_secs(3));
    let (during, _) = last_tick(&crib.stdout()).context("no tick line during the pause")?;
    let state = expect(&api, "GET", "/api/v1/vm", "", 200)?;
    anyhow::ensure!(
        state.compact().contains("\"state\":\"paused\""),
        "GET /api/v1/vm shows paused: {}",
        state.body
    );
    anyhow::ensure!(
        during == before,
        "the guest's counter went on while paused: tick {before} at the pause, tick {during} \
         3 s later\n{}",
        crib.output()
    );

    let resumed = expect(&api, "PUT", "/api/v1/vm/resume", "", 200)?;
    let pause_secs = paused_at.elapsed().as_secs_f64();
    anyhow::ensure!(
        resumed.compact().contains("\"state\":\"running\""),
        "resume answers state running: {}",
        resumed.body
    );
    let after_tick = crib.wait_for("a tick after the resume", Duration::from_secs(60), |out| {
        last_tick(out).filter(|t| t.0 > before)
    })?;
    crib.wait_for("3 ticks after the resume", Duration::from_secs(60), |out| {
        last_tick(out).filter(|t| t.0 >= before + 3)
    })?;
    // The guest's clock stops too (crib restores kvmclock at the resume): across the
    // pause the guest's uptime moves by about one tick period, not by the pause.
    let guest_gap = after_tick.1 - uptime_before;
    anyhow::ensure!(
        guest_gap < pause_secs / 2.0,
        "the guest's clock ran on while paused: uptime {uptime_before:.2} s -> {:.2} s over a \
         {pause_secs:.1} s pause\n{}",
        after_tick.1,
        crib.output()
    );
    println!(
        "pause/resume: counter stopped at tick {before} for {pause_secs:.1} s of wall time and \
         went on with tick {}; the guest's uptime went from {uptime_before:.2} s to {:.2} s \
         across the pause ({:+.2} s)",
        after_tick.0,
        after_tick.1,
        after_tick.1 - uptime_before
    );

    let stop = expect(&api, "PUT", "/api/v1/vm/stop", "", 202)?;
    anyhow::ensure!(
        stop.compact().contains("\"state\":\"stopping\""),
        "stop answers state stopping: {}",
        stop.body
    );
    let code = crib.wait_exit(Duration::from_secs(30))?;
    anyhow::ensure!(
        code == Some(6),
        "crib exits 6 after PUT /api/v1/vm/stop, not {code:?}\n{}",
        crib.output()
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The disk `data`'s write ops and bytes in a metrics answer.
fn disk_writes(metrics: &Reply) -> Result<(u64, u64)> {
    let from = "\"data\":{";
    match (
        metrics.number_after(from, "writes"),
        metrics.number_after(from, "bytes_written"),
    ) {
        (Some(ops), Some(bytes)) => Ok((ops, bytes)),
        _ => bail!("no writes/bytes_written for disk data in {}", metrics.body),
    }
}

fn metrics_grow_after_disk_writes() -> Result<()> {
    const MIB: u64 = 1 << 20;
    let pod = GuestArtifacts::pod()?;
    let dir = scratch("metrics")?;
    let api = dir.join("api.sock");
    let image = dir.join("data.img");
    std::fs::File::create(&image)?.set_len(32 * MIB)?;
    // busybox dd has oflag=direct: every 1 MiB block reaches the disk as it is written.
    let command = "echo before-io; sleep 5; \
        dd if=/dev/zero of=/dev/vda bs=1M count=8 oflag=direct && echo dd-done; sleep 600";
    let mut crib = LiveCrib::spawn(&[
        "run".into(),
        "--kernel".into(),
        pod.vmlinux.display().to_string(),
        "--initrd".into(),
        pod.initramfs.display().to_string(),
        "--memory".into(),
        "256M".into(),
        "--disk".into(),
        format!("path={},id=data", image.display()),
        "--api-socket".into(),
        api.display().to_string(),
        "--cmdline".into(),
        format!("console=ttyS0 panic=-1 quiet -- /bin/sh -c \"{command}\""),
    ])?;
    crib.wait_for("before-io", BOOT_WAIT, |out| {
        out.contains("before-io").then_some(())
    })?;
    let before = expect(&api, "GET", "/api/v1/metrics", "", 200)?;
    let (ops_before, bytes_before) = disk_writes(&before)?;
    crib.wait_for("dd-done", Duration::from_secs(120), |out| {
        out.contains("dd-done").then_some(())
    })?;
    let after = expect(&api, "GET", "/api/v1/metrics", "", 200)?;
    let (ops_after, bytes_after) = disk_writes(&after)?;
    println!(
        "metrics: disk data writes {ops_before} -> {ops_after}, bytes_written {bytes_before} -> \
         {bytes_after}"
    );
    anyhow::ensure!(
        bytes_after >= bytes_before + 8 * MIB && ops_after > ops_before,
        "the 8 MiB the guest wrote show in the metrics: writes {ops_before} -> {ops_after}, \
         bytes_written {bytes_before} -> {bytes_after}\n{}",
        after.body
    );
    let exits = after
        .number_after("\"vcpu_exits\":{", "io_out")
        .with_context(|| format!("no vcpu_exits.io_out in {}", after.body))?;
    anyhow::ensure!(
        exits > 0,
        "the serial console's port writes are counted: {}",
        after.body
    );
    for reason in ["io_in", "mmio_read", "mmio_write", "other"] {
        anyhow::ensure!(
            after.number_after("\"vcpu_exits\":{", reason).is_some(),
            "vcpu_exits.{reason} is present: {}",
            after.body
        );
    }

    // No vsock device: crib asks through the ACPI power button. cradle sees KEY_POWER on
    // the button's evdev node, stops the command (SIGTERM to its `sleep 600`) and powers
    // off well before the timeout, so crib exits 0, not 6 (the forced stop).
    let shutdown = expect(
        &api,
        "PUT",
        "/api/v1/vm/shutdown",
        r#"{"timeout_s": 60}"#,
        202,
    )?;
    anyhow::ensure!(
        shutdown.compact().contains("\"state\":\"shutting-down\"")
            && shutdown.compact().contains("\"via\":\"acpi-power-button\""),
        "shutdown without vsock presses the power button: {}",
        shutdown.body
    );
    let code = crib.wait_exit(Duration::from_secs(90))?;
    anyhow::ensure!(
        code == Some(0) && crib.stdout().contains("cradle: power button pressed"),
        "cradle takes the power button and the guest powers off (crib exits 0), not {code:?}\n{}",
        crib.output()
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn shutdown_powers_the_pod_off() -> Result<()> {
    let pod = GuestArtifacts::pod()?;
    let dir = scratch("shutdown")?;
    let launch = dir.join("launch.json");
    std::fs::write(
        &launch,
        format!(
            r#"{{"pod": {{"name": "down", "lifetime": "until-shutdown",
                 "processes": [{{"name": "app", "argv": ["/bin/sh", "-c", "echo app-started; while true; do sleep 1; done"]}}]}},
               "kernel": {}, "initrd": {}, "memory": "256M"}}"#,
            json_str(&pod.vmlinux.display().to_string()),
            json_str(&pod.initramfs.display().to_string()),
        ),
    )?;
    let run_dir = dir.join("run/down");
    let console = || {
        std::fs::read_to_string(run_dir.join("console.log"))
            .unwrap_or_default()
            .replace('\r', "")
    };
    let mut crib = LiveCrib::spawn(&[
        "pod".into(),
        "run".into(),
        launch.display().to_string(),
        "--run-root".into(),
        dir.join("run").display().to_string(),
    ])?;
    // The process runs once cradle is up and serving its API on vsock port 1.
    let start = Instant::now();
    while !console().contains("app-started") {
        if let Some(status) = crib.try_wait()? {
            bail!(
                "crib exited ({status}) before the pod's process started\n{}",
                crib.output()
            );
        }
        if start.elapsed() > BOOT_WAIT {
            bail!(
                "the pod's process did not start within {BOOT_WAIT:?}\nconsole:\n{}",
                console()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let api = run_dir.join("api.sock");
    let bad = expect(
        &api,
        "PUT",
        "/api/v1/vm/shutdown",
        r#"{"timeout_s": "soon"}"#,
        400,
    )?;
    anyhow::ensure!(
        bad.body.contains("\"error\""),
        "a bad shutdown body is a JSON error: {}",
        bad.body
    );
    let reply = expect(
        &api,
        "PUT",
        "/api/v1/vm/shutdown",
        r#"{"timeout_s": 60}"#,
        202,
    )?;
    let compact = reply.compact();
    anyhow::ensure!(
        compact.contains("\"state\":\"shutting-down\"") && compact.contains("\"via\":\"cradle\""),
        "shutdown goes through cradle: {}",
        reply.body
    );
    let code = crib.wait_exit(Duration::from_secs(120))?;
    let console = console();
    anyhow::ensure!(
        console.contains("shutdown requested; stopping processes"),
        "the console shows cradle stopping the processes:\n{console}"
    );
    anyhow::ensure!(
        code == Some(0),
        "crib exits 0 after the graceful shutdown, not {code:?}\n{}\nconsole:\n{console}",
        crib.output()
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn density_ten_pods() -> Result<()> {
    const PODS: usize = 10;
    let crib = crib_bin();
    let dir = std::env::temp_dir().join(format!("crib-api-{}-density", std::process::id()));
    let mut fleet = Fleet::launch(&crib, &dir, "dens", PODS, "128M")?;
    // Ten nested guests under TCG on two L1 vCPUs: allow minutes.
    let all = fleet.wait_all_ready(Duration::from_secs(900), Duration::from_secs(60))?;
    let mut each: Vec<f64> = fleet
        .pods
        .iter()
        .filter_map(|p| p.ready_after)
        .map(|d| d.as_secs_f64())
        .collect();
    each.sort_by(f64::total_cmp);
    let each: Vec<String> = each.iter().map(|s| format!("{s:.0}")).collect();
    println!(
        "density: {PODS} pods answered docker ps {:.1} s after launch (each, s: {})",
        all.as_secs_f64(),
        each.join(" ")
    );
    let stop_start = Instant::now();
    fleet.stop_all(&crib, 60, Duration::from_secs(120))?;
    println!(
        "density: all {PODS} stopped, every crib exited 0, in {:.1} s",
        stop_start.elapsed().as_secs_f64()
    );
    drop(fleet);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
