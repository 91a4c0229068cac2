//! crib's benchmark harness. Measures, never asserts:
//!
//! - `crib-bench host`: on the host's /dev/kvm, crib's process start to the first
//!   `KVM_RUN` (wall and CPU time, as crib logs them) and its RSS outside guest memory,
//!   with a micro guest that halts so nothing but crib itself is measured.
//! - `crib-bench boot [--runs N]`: boot to init, guest uptime at init (cradle.debug), to
//!   cradle's ready line and to a pod process's first line, crib against
//!   `qemu-system-x86_64 -M microvm,rtc=on` on the same kernel (ELF and bzImage),
//!   initramfs and pod, for crib's pod kernel and Debian's cloud kernel, on a stock host
//!   (shmem THP `never`) and a tuned one (`advise`) in the same lab boot, N runs each,
//!   interleaved, medians and ratios, crib's guest RAM backing and exits per boot. Runs inside the lab when the host has no
//!   VT-x/AMD-V, so both VMMs are measured in the same L1 boot.
//!
//! - `crib-bench io [--runs N]`: 4 KiB random reads at queue depth 32 (fio, io_uring)
//!   on one file: fio in L1 on the file itself, fio in a crib guest on a virtio-blk disk
//!   backed by it, and fio in a QEMU guest (virtio-blk-pci with an iothread, io_uring) on
//!   the same file, in the same lab boot.
//!
//! - `crib-bench vsock [--runs N]`: vsock throughput host->guest and guest->host (socat
//!   in a pod-kernel guest, 256 MiB per transfer) against L1's TCP loopback through the
//!   same socat, and the latency of `docker exec app true` through `--docker-socket`.
//!
//! - `crib-bench fs [--runs N]`: fio in a pod-kernel guest on a virtio-fs mount (crib's
//!   own virtiofsd, `--fs tag=gfs,dir=...`) against the same fio on an ext4 virtio-blk
//!   volume in the same guest: sequential write and read (1 MiB, QD8) in MB/s and 4 KiB
//!   random reads (QD32) in IOPS, all O_DIRECT through io_uring; and the same guest in
//!   QEMU (`vhost-user-fs-pci` on the same virtiofsd build, virtio-blk-pci) in the same
//!   lab boot.
//!
//! - `crib-bench vfio [--runs N]`: 4 KiB random reads (fio, io_uring, O_DIRECT) on an
//!   NVMe namespace, QD1 latency (completion latency mean and median) and QD32 IOPS: fio in
//!   a pod-kernel crib guest on the namespace passed through with `--vfio`, fio in L1 on
//!   the same device (driver nvme), and fio in a crib guest on a virtio-blk disk backed by
//!   the device (`direct=on`); then, after those runs, the same guest on an SR-IOV virtual
//!   function of the device (nvme-cli's virt-mgmt, the namespace shared with the PF).
//!   Runs in a lab started with `--nvme` (a 1 GiB raw image) and `--nvme-vfs 1`.
//!
//! - `crib-bench net [--runs N] [--no-vhost]` (default 3 runs): the marketplace VM (the Debian image of
//!   scripts/build-marketplace-image.sh, its own kernel and initrd, 2 vCPUs, 1 GiB) on a
//!   tap at 10.0.1.1/24: boot to sshd's banner and to systemd's multi-user.target line,
//!   and iperf3 TCP throughput host->guest and guest->host, for crib's virtio-net and
//!   QEMU's virtio-net-pci with vhost=on and vhost=off, interleaved, in one lab boot.
//!
//! - `crib-bench density [--pods N]`: N pods (default 10) started at once with `crib pod
//!   run` (128 MiB, crib's pod kernel, one idle process): the time until all answer
//!   `docker ps`, crib's RSS outside guest memory per VM and the guest memory it touched
//!   (the guest RAM mapping's Rss in /proc/PID/smaps), medians over the N cribs, then `crib pod stop` each.
//!
//! - `crib-bench pull [--runs N]` (default 3): `crib image pull` of a Debian image from a
//!   loopback registry against `docker pull` and `skopeo copy`, cold and for a second
//!   image sharing the base layer (`src/pull_bench.rs`). Host only, root.
//!
//! Build crib with `cargo build --release -p vmm` first; results are Markdown on stdout.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crib_tests::fleet::Fleet;
use crib_tests::lab_nvme::{bind_nvme, bind_vfio, find_lab_nvme, VirtualFunction, L1_NAMESPACE};
use crib_tests::{
    can_boot_linux, fio_image, host_tool, micro, repo_root, strip_ansi, target_dir, tool_image,
    vsock_connect, GuestArtifacts,
};

#[path = "../pull_bench.rs"]
mod pull_bench;

const READY_LINE: &str = "cradle: ready";
const BOOT_DEADLINE: Duration = Duration::from_secs(120);

fn crib_release() -> PathBuf {
    std::env::var_os("CRIB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("release/crib"))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Reads a `Key:   N kB` line of /proc/PID/status.
fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("no {key}"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("no value")?
        .parse()?)
}

fn host() -> Result<()> {
    let crib = crib_release();
    let kernel = std::env::temp_dir().join(format!("crib-bench-{}.elf", std::process::id()));
    let mut code = micro::out(0x440, 1);
    code.extend(micro::halt_forever());
    std::fs::write(&kernel, micro::elf(&code))?;
    let (mut wall, mut cpu, mut anon, mut file) = (vec![], vec![], vec![], vec![]);
    for _ in 0..10 {
        let mut child = Command::new(&crib)
            .args(["run", "--console", "off", "--memory", "512M", "--kernel"])
            .arg(&kernel)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", crib.display()))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        // "vmm ready to run: 3 ms wall, 2841 us CPU since start"
        let ready = lines.find_map(|l| l.ok().filter(|l| l.contains("vmm ready to run")));
        // The guest's marker write arrives after the first KVM_RUN: RSS is then settled.
        let _ = lines.find(|l| l.as_ref().is_ok_and(|l| l.contains("guest boot to init")));
        anon.push(status_kib(child.id(), "RssAnon:")? as f64);
        file.push(status_kib(child.id(), "RssFile:")? as f64);
        child.kill()?;
        child.wait()?;
        let ready = ready.context("crib did not log 'vmm ready to run'")?;
        let number = |after: &str, unit: &str| -> Result<f64> {
            let rest = ready.split(after).nth(1).context("format")?;
            Ok(rest.split(unit).next().context("format")?.trim().parse()?)
        };
        wall.push(number("run: ", " ms wall")?);
        cpu.push(number("wall, ", " us CPU")? / 1000.0);
    }
    std::fs::remove_file(&kernel)?;
    println!("| crib start-up on the host (10 runs, 512 MiB guest, release build) | median |");
    println!("| --- | --- |");
    println!(
        "| process start to first KVM_RUN, wall | {:.1} ms |",
        median(&mut wall)
    );
    println!(
        "| process start to first KVM_RUN, CPU | {:.2} ms |",
        median(&mut cpu)
    );
    println!(
        "| RSS outside guest memory (RssAnon + RssFile) | {:.0} KiB |",
        median(&mut anon) + median(&mut file)
    );
    println!(
        "| of which anonymous (heap, stacks) | {:.0} KiB |",
        median(&mut anon)
    );
    Ok(())
}

/// crib with the same guest as [`qemu_microvm`]: 1 vCPU, 512 MiB, ELF kernel, initramfs.
fn crib_vm(guest: &GuestArtifacts, cmdline: &str) -> Command {
    let mut crib = Command::new(crib_release());
    crib.args(["run", "--memory", "512M", "--cmdline", cmdline, "--kernel"])
        .arg(&guest.vmlinux)
        .arg("--initrd")
        .arg(&guest.initramfs);
    crib
}

/// The reference VMM as LAB.md gives it its best setup: QEMU `-M <machine>` with KVM,
/// the host CPU, the ELF kernel, 1 vCPU and 512 MiB, the same kernel, initramfs and
/// command line crib gets. Callers add devices.
fn qemu_microvm(machine: &str, guest: &GuestArtifacts, cmdline: &str) -> Command {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-M",
        machine,
        "-enable-kvm",
        "-cpu",
        "host",
        "-m",
        "512M",
        "-smp",
        "1",
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
    ])
    .args(["-append", cmdline, "-kernel"])
    .arg(&guest.vmlinux)
    .arg("-initrd")
    .arg(&guest.initramfs);
    qemu
}

/// What one boot showed: seconds from spawning the VMM to cradle's ready line and to the
/// pod process's first line, and (crib only) what crib logged on stderr.
struct BootRun {
    ready: f64,
    process: f64,
    stdout: String,
    stderr: String,
}

/// The pod every boot benchmark runs: one process that prints [`POD_LINE`] and exits, so
/// cradle then powers the VM off.
const POD_SPEC: &str = r#"{"name": "bench", "processes": [{"name": "hello", "argv": ["/bin/echo", "pod-process-started"]}]}"#;
const POD_LINE: &str = "pod-process-started";

/// Spawns `cmd` and times cradle's ready line and the pod process's line on its stdout;
/// then waits for the VMM to exit (the guest powers off) and keeps its stderr.
fn time_boot(cmd: &mut Command) -> Result<BootRun> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("no stdout")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut ready, mut process) = (None, None);
        let mut text = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if ready.is_none() && line.contains(READY_LINE) {
                ready = Some(start.elapsed());
            }
            if process.is_none() && line.contains(POD_LINE) {
                process = Some(start.elapsed());
            }
            text.push_str(&line);
            text.push('\n');
        }
        let _ = tx.send((ready, process, text));
    });
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut text);
        text
    });
    let times = rx.recv_timeout(BOOT_DEADLINE);
    let _ = child.kill();
    let _ = child.wait();
    let stderr = err_reader.join().unwrap_or_default();
    let (ready, process, stdout) = times.context("the VMM did not exit before the deadline")?;
    Ok(BootRun {
        stdout,
        ready: ready.context("no ready line")?.as_secs_f64(),
        process: process
            .context("no line from the pod process")?
            .as_secs_f64(),
        stderr,
    })
}

/// Re-runs this command inside the lab; true if it did (the caller is done then).
fn in_lab_instead(command: &str, runs: usize) -> Result<bool> {
    in_lab_with(&[command, "--runs", &runs.to_string()])
}

/// Re-runs this binary with `args` inside the lab; true if it did.
fn in_lab_with(args: &[&str]) -> Result<bool> {
    in_lab_with_options(&[], args)
}

/// Re-runs this binary with `args` inside the lab started with `lab_options`; true if
/// it did.
fn in_lab_with_options(lab_options: &[&str], args: &[&str]) -> Result<bool> {
    if can_boot_linux() {
        return Ok(false);
    }
    let lab = repo_root().join("tests/lab/lab.sh");
    let exe = std::env::current_exe()?;
    let status = Command::new("bash")
        .arg(lab)
        .args(lab_options)
        .arg("--")
        .arg(exe)
        .args(args)
        .env("CRIB_IN_LAB", "1")
        .status()?;
    if !status.success() {
        bail!("the lab run failed: {status}");
    }
    Ok(true)
}

/// The first number after `key` in `text` (crib's log lines).
fn logged_number(text: &str, key: &str) -> Option<f64> {
    let rest = &text[text.find(key)? + key.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The host's shmem THP policy file: the one knob that tells a stock host from a tuned one.
const SHMEM_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// Seconds of guest uptime at init, from cradle's `debug: init started X ms after boot`.
fn uptime_at_init(console: &str) -> Option<f64> {
    logged_number(console, "debug: init started").map(|ms| ms / 1000.0)
}

/// Seconds cradle spent from its start to its ready line: the `debug: <step> X ms` lines up
/// to and including `modules` (cradle prints them with `cradle.debug`).
fn cradle_to_ready(console: &str) -> Option<f64> {
    let mut total = 0.0;
    for step in ["mounts", "cmdline", "modules"] {
        let key = format!("debug: {step} ");
        let rest = &console[console.find(&key)? + key.len()..];
        let number: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        total += number.parse::<f64>().ok()?;
    }
    Some(total / 1000.0)
}

/// One VMM's runs of one kernel form on one host setting.
#[derive(Default)]
struct BootSeries {
    /// Boot to init: crib's marker; for QEMU (no marker) the ready line minus cradle's
    /// own time to ready.
    init: Vec<f64>,
    uptime: Vec<f64>,
    ready: Vec<f64>,
    process: Vec<f64>,
    backing: String,
}

impl BootSeries {
    fn add(&mut self, run: &BootRun, crib: bool) {
        let uptime = uptime_at_init(&run.stdout);
        let init = if crib {
            logged_number(&run.stderr, "guest boot to init:").map(|ms| ms / 1000.0)
        } else {
            cradle_to_ready(&run.stdout).map(|c| run.ready - c)
        };
        self.init.extend(init);
        self.uptime.extend(uptime);
        self.ready.push(run.ready);
        self.process.push(run.process);
        if crib && self.backing.is_empty() {
            self.backing = run
                .stderr
                .lines()
                .find_map(|l| {
                    l.split_once("guest RAM: ")
                        .map(|(_, b)| b.trim().to_owned())
                })
                .unwrap_or_else(|| "?".into());
        }
    }

    fn medians(&mut self) -> [f64; 4] {
        [
            median(&mut self.init),
            median(&mut self.uptime),
            median(&mut self.ready),
            median(&mut self.process),
        ]
    }
}

fn boot(runs: usize) -> Result<()> {
    if in_lab_instead("boot", runs)? {
        return Ok(());
    }
    // cradle.debug: cradle prints its uptime at init and its step times.
    let cmdline = "console=ttyS0 panic=-1 quiet cradle.debug";
    // The arguments crib adds for speed (boot::cmdline), given to QEMU as a second
    // reference on the stock host: the VMMs compared with the same guest kernel arguments.
    let qemu_args_cmdline = format!(
        "{cmdline} {} {}",
        boot::cmdline::DEFAULT_UARTS_ARG,
        boot::cmdline::ONE_CPU_ARG
    );
    let dir = std::env::temp_dir().join(format!("crib-bench-boot-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let spec = dir.join("pod.json");
    std::fs::write(&spec, POD_SPEC)?;
    let original_policy = std::fs::read_to_string(SHMEM_ENABLED).ok();
    // stock: Debian's default; tuned: shmem THP on madvise. Skipped if not writable.
    let hosts: Vec<(&str, &str)> = [("stock", "never"), ("tuned", "advise")]
        .into_iter()
        .filter(|(_, policy)| std::fs::write(SHMEM_ENABLED, policy).is_ok())
        .collect();
    let hosts = if hosts.is_empty() {
        vec![("as is", "")]
    } else {
        hosts
    };
    println!(
        "| kernel | form | host (shmem THP) | VMM | guest RAM | boot to init | guest uptime at init | VMM's share | boot to cradle ready | boot to pod process |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut summary = Vec::new();
    let ms = |v: f64| format!("{:.0} ms", v * 1000.0);
    for (label, guest) in [
        ("pod kernel", GuestArtifacts::pod()?),
        ("Debian cloud", GuestArtifacts::find()?),
    ] {
        // QEMU gets the same pod the way crib ships it: a second cpio after the initramfs.
        let mut initrd = std::fs::read(&guest.initramfs)?;
        initrd.resize(initrd.len().next_multiple_of(4), 0);
        initrd.extend(initramfs::pod_archive(POD_SPEC.as_bytes())?);
        let qemu_initrd = dir.join(format!("initrd-{}", label.replace(' ', "-")));
        std::fs::write(&qemu_initrd, initrd)?;
        for (form, kernel) in [("ELF", &guest.vmlinux), ("bzImage", &guest.bzimage)] {
            let crib_guest = GuestArtifacts {
                vmlinux: kernel.clone(),
                ..guest.clone()
            };
            let qemu_guest = GuestArtifacts {
                vmlinux: kernel.clone(),
                initramfs: qemu_initrd.clone(),
                ..guest.clone()
            };
            for &(host, policy) in &hosts {
                if !policy.is_empty() {
                    std::fs::write(SHMEM_ENABLED, policy)?;
                }
                let (mut crib, mut qemu) = (BootSeries::default(), BootSeries::default());
                let mut qemu_args = BootSeries::default();
                let with_args = host == hosts[0].0;
                let mut exits = String::from("?");
                for _ in 0..runs {
                    let mut vm = crib_vm(&crib_guest, cmdline);
                    vm.arg("--pod").arg(&spec);
                    let run = time_boot(&mut vm)?;
                    crib.add(&run, true);
                    if let Some(line) = run
                        .stderr
                        .lines()
                        .find(|l| l.contains("vCPU exits to crib"))
                    {
                        exits = line
                            .split("vCPU exits to crib:")
                            .nth(1)
                            .unwrap_or("?")
                            .trim()
                            .into();
                    }
                    let run = time_boot(&mut qemu_microvm("microvm,rtc=on", &qemu_guest, cmdline))?;
                    qemu.add(&run, false);
                    if with_args {
                        let run = time_boot(&mut qemu_microvm(
                            "microvm,rtc=on",
                            &qemu_guest,
                            &qemu_args_cmdline,
                        ))?;
                        qemu_args.add(&run, false);
                    }
                }
                let c = crib.medians();
                let q = qemu.medians();
                let qa = with_args.then(|| qemu_args.medians());
                let qemu_args_row = qa.map(|m| {
                    (
                        "QEMU `-M microvm,rtc=on`, crib's boot arguments",
                        m,
                        "anonymous, THP",
                    )
                });
                for (vmm, m, backing) in [
                    ("crib", c, crib.backing.as_str()),
                    ("QEMU `-M microvm,rtc=on`", q, "anonymous, THP"),
                ]
                .into_iter()
                .chain(qemu_args_row)
                {
                    println!(
                        "| {label} | {form} | {host} | {vmm} | {backing} | {} | {} | {} | {} | {} |",
                        ms(m[0]),
                        ms(m[1]),
                        ms(m[0] - m[1]),
                        ms(m[2]),
                        ms(m[3])
                    );
                }
                summary.push(format!(
                    "{label}, {form}, {host}: crib/QEMU to init {:.2}, to ready {:.2}, to pod process {:.2}; \
                     uptime at init crib/QEMU {:.2}; crib's share {} vs QEMU's {}; crib exits: {exits}; \
                     runs (init, s): crib {:.3?}, qemu {:.3?}",
                    c[0] / q[0],
                    c[2] / q[2],
                    c[3] / q[3],
                    c[1] / q[1],
                    ms(c[0] - c[1]),
                    ms(q[0] - q[1]),
                    crib.init,
                    qemu.init,
                ));
                if let Some(qa) = qa {
                    summary.push(format!(
                        "{label}, {form}, {host}: crib/QEMU with crib's boot arguments ({} {}): \
                         to init {:.2}, to pod process {:.2}; uptime at init {:.2}; runs (init, s): {:.3?}",
                        boot::cmdline::DEFAULT_UARTS_ARG,
                        boot::cmdline::ONE_CPU_ARG,
                        c[0] / qa[0],
                        c[3] / qa[3],
                        c[1] / qa[1],
                        qemu_args.init,
                    ));
                }
            }
        }
    }
    if let Some(policy) = original_policy.as_deref().and_then(|t| {
        let start = t.find('[')? + 1;
        Some(&t[start..start + t[start..].find(']')?])
    }) {
        let _ = std::fs::write(SHMEM_ENABLED, policy);
    }
    println!();
    println!(
        "QEMU's boot to init is its ready line minus cradle's own steps to ready (no marker); \
         the VMM's share is boot to init minus guest uptime at init."
    );
    println!();
    for line in summary {
        println!("- {line}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

const FIO_SECONDS: u32 = 5;

/// Read IOPS from fio's terse v3 line (field 8), found in `text`.
fn terse_read_iops(text: &str) -> Result<f64> {
    let line = text
        .lines()
        .find_map(|l| l.find("3;fio-").map(|at| &l[at..]))
        .context("no fio terse line in the output")?;
    Ok(line
        .split(';')
        .nth(7)
        .context("short terse line")?
        .trim()
        .parse()?)
}

/// The guest command: mount the fio image by serial, run fio on the `target` disk.
fn guest_fio_command() -> String {
    format!(
        "mkdir -p /t; for d in /sys/block/vd*; do s=$(cat $d/serial); [ $s = tools ] && mount -o ro /dev/${{d##*/}} /t; \
         [ $s = target ] && ln -sf /dev/${{d##*/}} /dev/target; done; mount --bind /dev /t/dev && \
         chroot /t /usr/bin/fio --name=g --filename=/dev/target --ioengine=io_uring --direct=1 --rw=randread \
         --bs=4k --iodepth=32 --runtime={FIO_SECONDS} --time_based --output-format=terse --terse-version=3"
    )
}

fn run_capture(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).replace('\r', ""))
}

fn io(runs: usize) -> Result<()> {
    if in_lab_instead("io", runs)? {
        return Ok(());
    }
    let guest = GuestArtifacts::find()?;
    let dir = std::env::temp_dir().join(format!("crib-bench-io-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let tools = fio_image(&dir)?;
    let target = dir.join("target.img");
    let target_arg = target.display().to_string();
    host_tool(
        "fio",
        &[
            "--name=fill",
            &format!("--filename={target_arg}"),
            "--rw=write",
            "--bs=1M",
            "--size=256M",
        ],
    )?;
    let cmdline = format!(
        "console=ttyS0 panic=-1 quiet -- /bin/sh -c \"{}\"",
        guest_fio_command()
    );
    let (mut raw, mut crib, mut qemu) = (vec![], vec![], vec![]);
    for _ in 0..runs {
        let reference = host_tool(
            "fio",
            &[
                "--name=ref",
                &format!("--filename={target_arg}"),
                "--ioengine=io_uring",
                "--rw=randread",
                "--bs=4k",
                "--iodepth=32",
                &format!("--runtime={FIO_SECONDS}"),
                "--time_based",
                "--invalidate=0",
                "--output-format=terse",
                "--terse-version=3",
            ],
        )?;
        raw.push(terse_read_iops(&reference)?);
        let out = run_capture(
            crib_vm(&guest, &cmdline)
                .arg("--disk")
                .arg(format!("path={},id=tools,readonly=on", tools.display()))
                .arg("--disk")
                .arg(format!("path={target_arg},id=target")),
        )?;
        crib.push(terse_read_iops(&out).with_context(|| format!("crib guest output:\n{out}"))?);
        let out = run_capture(
            qemu_microvm("microvm,rtc=on,pcie=on", &guest, &cmdline)
                .args(["-object", "iothread,id=io1"])
                .arg("-drive")
                .arg(format!(
                    "file={},if=none,id=t,format=raw,readonly=on",
                    tools.display()
                ))
                .args(["-device", "virtio-blk-pci,drive=t,serial=tools"])
                .arg("-drive")
                .arg(format!(
                    "file={target_arg},if=none,id=g,format=raw,aio=io_uring"
                ))
                .args([
                    "-device",
                    "virtio-blk-pci,drive=g,serial=target,iothread=io1",
                ]),
        )?;
        qemu.push(terse_read_iops(&out).with_context(|| format!("QEMU guest output:\n{out}"))?);
    }
    std::fs::remove_dir_all(&dir)?;
    let (r, c, q) = (median(&mut raw), median(&mut crib), median(&mut qemu));
    println!("| 4 KiB randread QD32, io_uring, {FIO_SECONDS} s, {runs} runs (lab, 1 vCPU guest) | IOPS (median) | vs fio in L1 |");
    println!("| --- | --- | --- |");
    println!("| fio in L1 on the file (buffered) | {r:.0} | 1.00 |");
    println!(
        "| fio in a crib guest, virtio-blk, O_DIRECT | {c:.0} | {:.2} |",
        c / r
    );
    println!(
        "| fio in a QEMU guest, virtio-blk-pci + iothread | {q:.0} | {:.2} |",
        q / r
    );
    println!("| **crib / QEMU** | | **{:.2}** |", c / q);
    println!("\nall runs: L1 {raw:.0?}; crib {crib:.0?}; qemu {qemu:.0?}");
    Ok(())
}

/// The pod of `crib-bench vsock`: socat from the tools disk as a sink on guest port 5000
/// and a 256 MiB source on port 5001, and an idle process for `docker exec`.
const VSOCK_POD: &str = r#"{
  "name": "vsockbench",
  "lifetime": "until-shutdown",
  "volumes": [{"name": "tools", "path": "/t", "readonly": true}],
  "processes": [
    {"name": "sink", "argv": ["/bin/sh", "-c", "mount --bind /dev /t/dev 2>/dev/null; exec chroot /t /usr/bin/socat -u VSOCK-LISTEN:5000,fork,reuseaddr OPEN:/dev/null"]},
    {"name": "source", "argv": ["/bin/sh", "-c", "sleep 1; mount --bind /dev /t/dev 2>/dev/null; exec chroot /t /usr/bin/socat -U VSOCK-LISTEN:5001,fork,reuseaddr OPEN:/dev/zero,readbytes=268435456"]},
    {"name": "app", "argv": ["/bin/sh", "-c", "exec sleep 100000"]}
  ]
}"#;
const VSOCK_BYTES: usize = 256 << 20;

/// Writes `bytes` zeros to `stream`, half-closes, and waits for the peer to close.
fn send_all(mut stream: impl std::io::Read + std::io::Write, bytes: usize) -> Result<f64> {
    let start = Instant::now();
    let chunk = vec![0u8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        stream.write_all(&chunk[..n])?;
        left -= n;
    }
    stream.flush()?;
    Ok(start.elapsed().as_secs_f64())
}

fn receive_all(mut stream: impl std::io::Read) -> Result<(usize, f64)> {
    let start = Instant::now();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        match stream.read(&mut buf)? {
            0 => break,
            n => total += n,
        }
    }
    Ok((total, start.elapsed().as_secs_f64()))
}

fn vsock(runs: usize) -> Result<()> {
    use std::net::Shutdown;
    if in_lab_instead("vsock", runs)? {
        return Ok(());
    }
    let pod = GuestArtifacts::pod()?;
    let dir = std::env::temp_dir().join(format!("crib-bench-vsock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("docker-config"))?;
    let tools = tool_image(&dir, "socat", &["/usr/bin/socat"])?;
    let spec = dir.join("pod.json");
    std::fs::write(&spec, VSOCK_POD)?;
    let (vsock_sock, docker_sock) = (dir.join("vsock.sock"), dir.join("docker.sock"));
    let mut vm = Command::new(crib_release())
        .args(["run", "--cpus", "2", "--memory", "512M", "--console"])
        // The guest prints little (cradle's lines); kept for a failed run.
        .arg(format!("file={}", dir.join("console.log").display()))
        .arg("--kernel")
        .arg(&pod.vmlinux)
        .arg("--initrd")
        .arg(&pod.initramfs)
        .arg("--pod")
        .arg(&spec)
        .arg("--disk")
        .arg(format!("path={},id=tools,readonly=on", tools.display()))
        .arg("--vsock")
        .arg(format!("cid=3,socket={}", vsock_sock.display()))
        .arg("--docker-socket")
        .arg(&docker_sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("crib.log"))?)
        .spawn()?;
    let result = (|| -> Result<()> {
        let wait = Duration::from_secs(120);
        let mb = |bytes: usize, secs: f64| bytes as f64 / secs / 1e6;
        let (mut to_guest, mut from_guest, mut tcp, mut exec) = (vec![], vec![], vec![], vec![]);
        // L1's TCP loopback through the same socat, as the reference.
        let mut sink = Command::new("socat")
            .args(["-u", "TCP-LISTEN:7000,fork,reuseaddr", "OPEN:/dev/null"])
            .spawn()?;
        std::thread::sleep(Duration::from_millis(300));
        for _ in 0..runs {
            let stream = vsock_connect(&vsock_sock, 5000, wait)?;
            let secs = send_all(&stream, VSOCK_BYTES)?;
            stream.shutdown(Shutdown::Write)?;
            let (_, tail) = receive_all(&stream)?;
            to_guest.push(mb(VSOCK_BYTES, secs + tail));

            let stream = vsock_connect(&vsock_sock, 5001, wait)?;
            let (bytes, secs) = receive_all(&stream)?;
            anyhow::ensure!(bytes == VSOCK_BYTES, "guest sent {bytes} bytes");
            from_guest.push(mb(bytes, secs));

            let stream = std::net::TcpStream::connect("127.0.0.1:7000")?;
            let secs = send_all(&stream, VSOCK_BYTES)?;
            stream.shutdown(Shutdown::Write)?;
            let (_, tail) = receive_all(&stream)?;
            tcp.push(mb(VSOCK_BYTES, secs + tail));

            for _ in 0..5 {
                let start = Instant::now();
                let status = Command::new("docker")
                    .arg("-H")
                    .arg(format!("unix://{}", docker_sock.display()))
                    .args(["exec", "app", "true"])
                    .env("DOCKER_CONFIG", dir.join("docker-config"))
                    .stdout(Stdio::null())
                    .status()?;
                anyhow::ensure!(status.success(), "docker exec app true: {status}");
                exec.push(start.elapsed().as_secs_f64() * 1000.0);
            }
        }
        let _ = sink.kill();
        let _ = sink.wait();
        let (v_in, v_out, t) = (
            median(&mut to_guest),
            median(&mut from_guest),
            median(&mut tcp),
        );
        println!(
            "| vsock, pod kernel, 256 MiB per transfer, {runs} runs | MB/s | vs L1 TCP loopback |"
        );
        println!("| --- | --- | --- |");
        println!(
            "| host -> guest (socat sink in the guest) | {v_in:.0} | {:.2} |",
            v_in / t
        );
        println!(
            "| guest -> host (socat source in the guest) | {v_out:.0} | {:.2} |",
            v_out / t
        );
        println!("| L1 TCP loopback (socat sink in L1) | {t:.0} | 1.00 |");
        println!(
            "\n`docker exec app true` through --docker-socket, median of {}: {:.0} ms",
            exec.len(),
            median(&mut exec)
        );
        println!(
            "\nall runs, MB/s: to guest {to_guest:.0?}; from guest {from_guest:.0?}; tcp {tcp:.0?}"
        );
        let mut stream = std::os::unix::net::UnixStream::connect(&docker_sock)?;
        std::io::Write::write_all(
            &mut stream,
            b"POST /crib/v1/shutdown HTTP/1.1\r\nHost: d\r\nContent-Length: 0\r\n\r\n",
        )?;
        Ok(())
    })();
    let deadline = Instant::now() + Duration::from_secs(60);
    while vm.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = vm.kill();
    let _ = vm.wait();
    // A failed run says what crib logged.
    let result = result.map_err(|e| {
        let tail = |file: &str| {
            let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        e.context(format!(
            "crib's log ends:\n{}\nthe guest console ends:\n{}",
            tail("crib.log"),
            tail("console.log")
        ))
    });
    std::fs::remove_dir_all(&dir)?;
    result
}

/// The pod of `crib-bench fs`: the fio image read-write at /t (so cradle can create the
/// other mount points in it), a blank disk formatted ext4 at /t/blk and the virtio-fs
/// tag at /t/gfs, so fio chrooted into /t sees both.
const FS_POD: &str = r#"{
  "name": "fsbench",
  "volumes": [{"name": "tools", "path": "/t"}, {"name": "blk", "path": "/t/blk", "fs": "ext4"}],
  "filesystems": [{"tag": "gfs", "path": "/t/gfs"}]
}"#;
/// Size of each fio file.
const FS_FILE: &str = "256M";
/// The fio jobs: name, options.
const FS_JOBS: &[(&str, &str)] = &[
    ("write", "--rw=write --bs=1M --iodepth=8 --end_fsync=1"),
    ("read", "--rw=read --bs=1M --iodepth=8"),
    (
        "randread",
        "--rw=randread --bs=4k --iodepth=32 --runtime=5 --time_based",
    ),
];

/// The guest script (in the share, run by the test hook): each job on each mount, one
/// fio terse line each, the job named `<mount>-<job>`.
fn fs_guest_script() -> String {
    let mut script = String::from("mount --bind /dev /t/dev\n");
    for mount in ["gfs", "blk"] {
        for (job, options) in FS_JOBS {
            script.push_str(&format!(
                "chroot /t /usr/bin/fio --name={mount}-{job} --filename=/{mount}/fio.dat \
                 --size={FS_FILE} --direct=1 --ioengine=io_uring {options} \
                 --output-format=terse --terse-version=3\n"
            ));
        }
    }
    script.push_str("echo fs-bench-done\n");
    script
}

/// One guest's figures: `<mount>-<job>` -> (read KiB/s, read IOPS, write KiB/s).
type FioLines = std::collections::HashMap<String, (f64, f64, f64)>;

/// The fio terse lines in `text` by job name.
fn fio_lines(text: &str) -> Result<FioLines> {
    let mut lines = FioLines::new();
    for line in text
        .lines()
        .filter_map(|l| l.find("3;fio-").map(|at| &l[at..]))
    {
        let fields: Vec<&str> = line.split(';').collect();
        let number = |i: usize| -> Result<f64> {
            Ok(fields.get(i).context("short terse line")?.trim().parse()?)
        };
        let name = fields.get(2).context("short terse line")?;
        lines.insert((*name).to_owned(), (number(6)?, number(7)?, number(47)?));
    }
    Ok(lines)
}

/// The figures of one VMM over the runs: per mount, write MB/s, read MB/s, randread IOPS.
#[derive(Default)]
struct FsFigures {
    runs: Vec<FioLines>,
}

impl FsFigures {
    fn push(&mut self, output: &str, vmm: &str) -> Result<()> {
        let lines = fio_lines(output)?;
        for mount in ["gfs", "blk"] {
            for (job, _) in FS_JOBS {
                anyhow::ensure!(
                    lines.contains_key(&format!("{mount}-{job}")),
                    "{vmm}: no fio result for {mount}-{job}; guest output:\n{output}"
                );
            }
        }
        self.runs.push(lines);
        Ok(())
    }

    /// Median over the runs of `pick` applied to job `<mount>-<job>`.
    fn median(&self, mount: &str, job: &str, pick: fn(&(f64, f64, f64)) -> f64) -> f64 {
        let mut values: Vec<f64> = self
            .runs
            .iter()
            .filter_map(|run| run.get(&format!("{mount}-{job}")).map(pick))
            .collect();
        median(&mut values)
    }

    /// (seq write MB/s, seq read MB/s, randread IOPS) of a mount.
    fn of(&self, mount: &str) -> (f64, f64, f64) {
        let mb = 1024.0 / 1e6;
        (
            self.median(mount, "write", |l| l.2) * mb,
            self.median(mount, "read", |l| l.0) * mb,
            self.median(mount, "randread", |l| l.1),
        )
    }

    fn all(&self, mount: &str, job: &str, pick: fn(&(f64, f64, f64)) -> f64) -> Vec<f64> {
        self.runs
            .iter()
            .filter_map(|run| run.get(&format!("{mount}-{job}")).map(pick))
            .collect()
    }
}

/// virtiofsd with the options crib gives its own (`vmm/src/fs.rs`), for QEMU.
fn start_virtiofsd(socket: &std::path::Path, dir: &std::path::Path) -> Result<std::process::Child> {
    let binary = std::env::var_os("CRIB_VIRTIOFSD")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("tools/bin/virtiofsd"));
    let _ = std::fs::remove_file(socket);
    let child = Command::new(&binary)
        .arg(format!("--socket-path={}", socket.display()))
        .arg(format!("--shared-dir={}", dir.display()))
        .arg("--sandbox=namespace")
        .arg("--log-level=error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {} (scripts/install-virtiofsd.sh)",
                binary.display()
            )
        })?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "virtiofsd did not create {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

fn fs(runs: usize) -> Result<()> {
    if in_lab_instead("fs", runs)? {
        return Ok(());
    }
    let pod = GuestArtifacts::pod()?;
    let dir = std::env::temp_dir().join(format!("crib-bench-fs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let share = dir.join("share");
    std::fs::create_dir_all(&share)?;
    let tools = fio_image(&dir)?;
    let blk = dir.join("blk.img");
    std::fs::File::create(&blk)?.set_len(1 << 30)?;
    std::fs::write(share.join("bench.sh"), fs_guest_script())?;
    let spec = dir.join("pod.json");
    std::fs::write(&spec, FS_POD)?;
    // QEMU gets the pod the way crib ships it: a second cpio after the initramfs.
    let mut initrd = std::fs::read(&pod.initramfs)?;
    initrd.resize(initrd.len().next_multiple_of(4), 0);
    initrd.extend(initramfs::pod_archive(FS_POD.as_bytes())?);
    let qemu_guest = GuestArtifacts {
        initramfs: dir.join("initrd-qemu"),
        ..pod.clone()
    };
    std::fs::write(&qemu_guest.initramfs, initrd)?;
    let cmdline = "console=ttyS0 panic=-1 quiet -- /bin/sh /t/gfs/bench.sh";
    let socket = dir.join("qemu-fs.sock");
    let (mut crib, mut qemu) = (FsFigures::default(), FsFigures::default());
    let mut qemu_problem = None;
    for _ in 0..runs {
        let out = run_capture(
            crib_vm(&pod, cmdline)
                .arg("--pod")
                .arg(&spec)
                .arg("--disk")
                .arg(format!("path={},id=tools", tools.display()))
                .arg("--disk")
                .arg(format!("path={},id=blk", blk.display()))
                .arg("--fs")
                .arg(format!("tag=gfs,dir={}", share.display())),
        )?;
        crib.push(&out, "crib")?;
        if qemu_problem.is_some() {
            continue;
        }
        let mut daemon = start_virtiofsd(&socket, &share)?;
        let out = run_capture(
            qemu_microvm(
                "microvm,rtc=on,pcie=on,memory-backend=mem",
                &qemu_guest,
                cmdline,
            )
            .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
            .args(["-object", "iothread,id=io1"])
            .arg("-drive")
            .arg(format!("file={},if=none,id=t,format=raw", tools.display()))
            .args(["-device", "virtio-blk-pci,drive=t,serial=tools"])
            .arg("-drive")
            .arg(format!(
                "file={},if=none,id=b,format=raw,aio=io_uring",
                blk.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=b,serial=blk,iothread=io1"])
            .arg("-chardev")
            .arg(format!("socket,id=fs0,path={}", socket.display()))
            .args([
                "-device",
                "vhost-user-fs-pci,chardev=fs0,tag=gfs,queue-size=1024",
            ]),
        );
        let _ = daemon.kill();
        let _ = daemon.wait();
        if let Err(e) = out.and_then(|out| qemu.push(&out, "QEMU")) {
            qemu_problem = Some(format!("{e:#}"));
        }
    }
    std::fs::remove_dir_all(&dir)?;
    let (cw, cr, ci) = crib.of("gfs");
    let (bw, br, bi) = crib.of("blk");
    println!(
        "| pod kernel, 1 vCPU, 512 MiB, fio O_DIRECT io_uring, {FS_FILE} file, {runs} runs (medians) | seq write 1 MiB QD8, MB/s | seq read 1 MiB QD8, MB/s | 4 KiB randread QD32, IOPS |"
    );
    println!("| --- | --- | --- | --- |");
    println!(
        "| crib, virtio-fs (crib's virtiofsd, `--fs tag=gfs,dir=`) | {cw:.0} | {cr:.0} | {ci:.0} |"
    );
    println!("| crib, virtio-blk volume, ext4 | {bw:.0} | {br:.0} | {bi:.0} |");
    println!(
        "| **crib virtio-fs / virtio-blk** | **{:.2}** | **{:.2}** | **{:.2}** |",
        cw / bw,
        cr / br,
        ci / bi
    );
    if qemu.runs.is_empty() {
        println!(
            "\nQEMU vhost-user-fs-pci: not measured: {}",
            qemu_problem.as_deref().unwrap_or("no runs")
        );
    } else {
        let (qw, qr, qi) = qemu.of("gfs");
        let (qbw, qbr, qbi) = qemu.of("blk");
        println!("| QEMU `microvm,pcie=on`, vhost-user-fs-pci, same virtiofsd | {qw:.0} | {qr:.0} | {qi:.0} |");
        println!("| QEMU, virtio-blk-pci + iothread, ext4 | {qbw:.0} | {qbr:.0} | {qbi:.0} |");
        println!(
            "| **crib / QEMU, virtio-fs** | **{:.2}** | **{:.2}** | **{:.2}** |",
            cw / qw,
            cr / qr,
            ci / qi
        );
        if let Some(problem) = &qemu_problem {
            println!("\nQEMU failed after {} runs: {problem}", qemu.runs.len());
        }
    }
    let mb = |v: Vec<f64>| -> Vec<f64> { v.into_iter().map(|k| k * 1024.0 / 1e6).collect() };
    println!(
        "\nall runs: crib virtio-fs write {:.0?} read {:.0?} IOPS {:.0?}; crib virtio-blk write {:.0?} read {:.0?} IOPS {:.0?}; \
         QEMU virtio-fs write {:.0?} read {:.0?} IOPS {:.0?}",
        mb(crib.all("gfs", "write", |l| l.2)),
        mb(crib.all("gfs", "read", |l| l.0)),
        crib.all("gfs", "randread", |l| l.1),
        mb(crib.all("blk", "write", |l| l.2)),
        mb(crib.all("blk", "read", |l| l.0)),
        crib.all("blk", "randread", |l| l.1),
        mb(qemu.all("gfs", "write", |l| l.2)),
        mb(qemu.all("gfs", "read", |l| l.0)),
        qemu.all("gfs", "randread", |l| l.1),
    );
    Ok(())
}

/// `MemAvailable` of /proc/meminfo, in KiB.
/// Size of the lab's NVMe image for `crib-bench vfio`.
const VFIO_NVME_BYTES: u64 = 1 << 30;
/// The part of the namespace fio reads (written first, so no read hits a hole).
const VFIO_FIO_SIZE: &str = "256M";
/// fio's 4 KiB random-read job on `filename` at queue depth `depth`, named `qd<depth>`.
fn vfio_fio_args(filename: &str, depth: u32) -> Vec<String> {
    [
        format!("--name=qd{depth}"),
        format!("--filename={filename}"),
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
        "--rw=randread".into(),
        "--bs=4k".into(),
        format!("--size={VFIO_FIO_SIZE}"),
        format!("--iodepth={depth}"),
        format!("--runtime={FIO_SECONDS}"),
        "--time_based".into(),
        "--output-format=terse".into(),
        "--terse-version=3".into(),
    ]
    .into()
}

/// From the terse v3 line of job `name` in `text`: read IOPS, completion latency mean
/// and median (µs).
fn terse_latency(text: &str, name: &str) -> Result<(f64, f64, f64)> {
    let line = text
        .lines()
        .filter_map(|l| l.find("3;fio-").map(|at| &l[at..]))
        .find(|l| l.split(';').nth(2) == Some(name))
        .with_context(|| format!("no fio terse line of job {name}"))?;
    let fields: Vec<&str> = line.split(';').collect();
    let number = |index: usize| -> Result<f64> {
        Ok(fields
            .get(index)
            .with_context(|| format!("short terse line: {line}"))?
            .trim()
            .parse()?)
    };
    let p50 = fields
        .iter()
        .find_map(|f| f.strip_prefix("50.000000%="))
        .context("no clat p50 in the terse line")?
        .parse()?;
    // Fields 8 (read IOPS) and 16 (read clat mean, µs), counted from 1.
    Ok((number(7)?, number(15)?, p50))
}

/// One configuration's QD1 (mean, p50 µs) and QD32 IOPS per run.
#[derive(Default)]
struct VfioSeries {
    mean: Vec<f64>,
    p50: Vec<f64>,
    iops: Vec<f64>,
}

impl VfioSeries {
    fn push(&mut self, output: &str, what: &str) -> Result<()> {
        let context = || format!("{what} output:\n{output}");
        let (_, mean, p50) = terse_latency(output, "qd1").with_context(context)?;
        let (iops, _, _) = terse_latency(output, "qd32").with_context(context)?;
        self.mean.push(mean);
        self.p50.push(p50);
        self.iops.push(iops);
        Ok(())
    }

    fn medians(&self) -> (f64, f64, f64) {
        (
            median(&mut self.mean.clone()),
            median(&mut self.p50.clone()),
            median(&mut self.iops.clone()),
        )
    }
}

/// The guest command of `crib-bench vfio`: the fio image (the only virtio-blk disk with
/// serial `tools`) at /t, fio at QD1 then QD32 on `target`.
fn vfio_guest_command(target: &str) -> String {
    let fio = |depth| {
        format!(
            "chroot /t /usr/bin/fio {}",
            vfio_fio_args(target, depth).join(" ")
        )
    };
    format!(
        "mkdir -p /t; for d in /sys/block/vd*; do s=$(cat $d/serial); [ $s = tools ] && mount -o ro /dev/${{d##*/}} /t; \
         [ $s = target ] && ln -sf /dev/${{d##*/}} /dev/target; done; mount --bind /dev /t/dev && {} && {}",
        fio(1),
        fio(32)
    )
}

fn vfio(runs: usize) -> Result<()> {
    if !can_boot_linux() {
        let image =
            std::env::temp_dir().join(format!("crib-bench-nvme-{}.img", std::process::id()));
        std::fs::File::create(&image)?.set_len(VFIO_NVME_BYTES)?;
        let image_arg = image.display().to_string();
        let ran = in_lab_with_options(
            &["--nvme", &image_arg, "--nvme-vfs", "1"],
            &["vfio", "--runs", &runs.to_string()],
        );
        let _ = std::fs::remove_file(&image);
        ran?;
        return Ok(());
    }
    let guest = GuestArtifacts::pod()?;
    let dir = std::env::temp_dir().join(format!("crib-bench-vfio-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let tools = fio_image(&dir)?;
    let tools_disk = format!("path={},id=tools,readonly=on", tools.display());
    let bdf = find_lab_nvme()?;
    bind_nvme(&bdf)?;
    host_tool(
        "fio",
        &[
            "--name=fill",
            &format!("--filename={L1_NAMESPACE}"),
            "--rw=write",
            "--bs=1M",
            "--direct=1",
            &format!("--size={VFIO_FIO_SIZE}"),
        ],
    )?;
    let (mut l1, mut virtio, mut passthrough, mut vf) = (
        VfioSeries::default(),
        VfioSeries::default(),
        VfioSeries::default(),
        VfioSeries::default(),
    );
    let passthrough_run = |target_bdf: &str| {
        let cmdline = format!(
            "console=ttyS0 panic=-1 quiet -- /bin/sh -c \"{}\"",
            vfio_guest_command("/dev/nvme0n1")
        );
        run_capture(
            crib_vm(&guest, &cmdline)
                .arg("--disk")
                .arg(&tools_disk)
                .arg("--vfio")
                .arg(target_bdf),
        )
    };
    for _ in 0..runs {
        let mut reference = String::new();
        for depth in [1, 32] {
            let args = vfio_fio_args(L1_NAMESPACE, depth);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            reference.push_str(&host_tool("fio", &args)?);
        }
        l1.push(&reference, "fio in L1")?;

        let cmdline = format!(
            "console=ttyS0 panic=-1 quiet -- /bin/sh -c \"{}\"",
            vfio_guest_command("/dev/target")
        );
        let out = run_capture(
            crib_vm(&guest, &cmdline)
                .arg("--disk")
                .arg(&tools_disk)
                .arg("--disk")
                .arg(format!("path={L1_NAMESPACE},id=target,direct=on")),
        )?;
        virtio.push(&out, "crib guest on virtio-blk")?;

        bind_vfio(&bdf)?;
        let out = passthrough_run(&bdf);
        bind_nvme(&bdf)?;
        passthrough.push(&out?, "crib guest with --vfio")?;
    }
    // The VF last: enabling it once keeps its secondary controller's resources stable.
    {
        let function = VirtualFunction::enable()?;
        for _ in 0..runs {
            vf.push(
                &passthrough_run(&function.bdf)?,
                "crib guest with --vfio on the VF",
            )?;
        }
    }
    std::fs::remove_dir_all(&dir)?;
    let (lm, lp, li) = l1.medians();
    let (vm, vp, vi) = virtio.medians();
    let (pm, pp, pi) = passthrough.medians();
    let (fm, fp, fi) = vf.medians();
    println!(
        "| 4 KiB randread, io_uring, O_DIRECT, {FIO_SECONDS} s, {runs} runs (lab NVMe, 1 vCPU guest) | QD1 clat mean | QD1 clat p50 | QD32 IOPS | QD1 mean vs L1 | QD32 IOPS vs L1 |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    println!("| fio in L1 on /dev/nvme0n1 (driver nvme) | {lm:.0} µs | {lp:.0} µs | {li:.0} | 1.00 | 1.00 |");
    println!(
        "| fio in a crib guest, NVMe passed through (`--vfio`) | {pm:.0} µs | {pp:.0} µs | {pi:.0} | {:.2} | {:.2} |",
        pm / lm,
        pi / li
    );
    println!(
        "| fio in a crib guest, SR-IOV VF passed through (`--vfio`, after the runs above) | {fm:.0} µs | {fp:.0} µs | {fi:.0} | {:.2} | {:.2} |",
        fm / lm,
        fi / li
    );
    println!(
        "| fio in a crib guest, virtio-blk on /dev/nvme0n1 (`direct=on`) | {vm:.0} µs | {vp:.0} µs | {vi:.0} | {:.2} | {:.2} |",
        vm / lm,
        vi / li
    );
    println!(
        "| **passthrough / virtio-blk** | | | | **{:.2}** | **{:.2}** |",
        pm / vm,
        pi / vi
    );
    println!(
        "| **VF / PF passthrough** | | | | **{:.2}** | **{:.2}** |",
        fm / pm,
        fi / pi
    );
    println!(
        "\nall runs (QD1 mean µs; QD32 IOPS): L1 {:.0?}, {:.0?}; vfio {:.0?}, {:.0?}; VF {:.0?}, {:.0?}; virtio-blk {:.0?}, {:.0?}",
        l1.mean, l1.iops, passthrough.mean, passthrough.iops, vf.mean, vf.iops, virtio.mean, virtio.iops
    );
    Ok(())
}

/// `crib-bench net`: the tap both VMMs' guests use, and the addresses
/// scripts/build-marketplace-image.sh gives the image (10.0.1.2/24, gateway 10.0.1.1).
const NET_TAP: &str = "crbench0";
const NET_HOST_IP: &str = "10.0.1.1";
const NET_GUEST_IP: &str = "10.0.1.2";
/// One MAC for every VM: L1's neighbour entry for 10.0.1.2 stays right from run to run.
const NET_MAC: &str = "52:54:00:12:34:57";
const NET_SECONDS: u32 = 10;
const NET_CMDLINE: &str = "root=/dev/vda rw console=ttyS0";
/// systemd's console line (its colour codes stripped) when the boot is done.
const MULTI_USER_LINE: &str = "Reached target multi-user.target";
/// A systemd boot in the lab's nested guest is slow: minutes, not seconds.
const NET_BOOT_WAIT: Duration = Duration::from_secs(600);

/// The VMMs `crib-bench net` compares.
#[derive(Clone, Copy, PartialEq)]
enum NetVmm {
    Crib,
    QemuVhost,
    QemuUserspace,
}

impl NetVmm {
    fn label(self, qemu_machine: &str) -> String {
        match self {
            NetVmm::Crib => "crib, virtio-net (userspace tap I/O)".into(),
            NetVmm::QemuVhost => format!("QEMU `-M {qemu_machine}`, virtio-net-pci, vhost=on"),
            NetVmm::QemuUserspace => {
                format!("QEMU `-M {qemu_machine}`, virtio-net-pci, vhost=off")
            }
        }
    }
}

/// What one boot of the marketplace image showed: seconds from spawning the VMM to
/// sshd's banner and to systemd's multi-user.target line; TCP Mbit/s both ways.
#[derive(Default)]
struct NetSeries {
    ssh: Vec<f64>,
    multi_user: Vec<f64>,
    to_guest: Vec<f64>,
    from_guest: Vec<f64>,
    errors: Vec<String>,
}

/// sshd's banner on NET_GUEST_IP:22, if it answers now.
fn ssh_banner_now() -> Option<String> {
    let addr: std::net::SocketAddr = format!("{NET_GUEST_IP}:22").parse().ok()?;
    let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    line.starts_with("SSH-").then(|| line.trim().to_owned())
}

/// The receiver's rate (Mbit/s) of `iperf3 -f m -P streams` against the guest (the sum
/// of the streams), `reverse` for guest->host; retried once (the server may still be
/// starting).
fn iperf3(reverse: bool, streams: u16) -> Result<f64> {
    let (seconds, streams) = (NET_SECONDS.to_string(), streams.to_string());
    let mut args = vec![
        "60",
        "iperf3",
        "-c",
        NET_GUEST_IP,
        "-t",
        &seconds,
        "-f",
        "m",
        "-P",
        &streams,
    ];
    if reverse {
        args.push("-R");
    }
    let mut last = String::new();
    for _ in 0..2 {
        let out = Command::new("timeout")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .context("cannot run iperf3 (apt-get install iperf3)")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // With several streams the total is the `[SUM]` line, after the per-stream ones.
        let summed = text.contains("[SUM]");
        let rate = text
            .lines()
            .filter(|l| l.trim_end().ends_with("receiver") && (!summed || l.contains("[SUM]")))
            .find_map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                let at = words.iter().position(|w| *w == "Mbits/sec")?;
                words.get(at.checked_sub(1)?)?.parse::<f64>().ok()
            });
        if let Some(rate) = rate {
            return Ok(rate);
        }
        last = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_secs(3));
    }
    bail!("iperf3 gave no receiver rate: {last}")
}

/// The command that boots `image` in `vmm`: 2 vCPUs, 1 GiB, the image's kernel and
/// initrd, the root disk on virtio-blk and virtio-net with `queues` queue pairs on NET_TAP.
fn net_vm(
    vmm: NetVmm,
    qemu_machine: &str,
    queues: u16,
    files: &std::path::Path,
    image: &std::path::Path,
) -> Command {
    let (kernel, initrd) = (files.join("vmlinuz"), files.join("initrd.img"));
    if vmm == NetVmm::Crib {
        let mut crib = Command::new(crib_release());
        crib.args(["run", "--cpus", "2", "--memory", "1024M", "--kernel"])
            .arg(kernel)
            .arg("--initrd")
            .arg(initrd)
            .arg("--disk")
            .arg(format!("path={},id=root", image.display()))
            .arg("--net")
            .arg(format!("tap={NET_TAP},mac={NET_MAC},queues={queues}"))
            .args(["--cmdline", NET_CMDLINE]);
        return crib;
    }
    let vhost = if vmm == NetVmm::QemuVhost {
        "on"
    } else {
        "off"
    };
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-M", qemu_machine, "-enable-kvm", "-cpu", "host"])
        .args(["-m", "1024M", "-smp", "2"])
        .args(["-nodefaults", "-no-user-config", "-nographic"])
        .args(["-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", NET_CMDLINE])
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=root,format=raw,aio=io_uring",
            image.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=root"])
        .arg("-netdev")
        .arg(format!(
            "tap,id=n0,ifname={NET_TAP},script=no,downscript=no,vhost={vhost},queues={queues}"
        ))
        .arg("-device")
        .arg(if queues > 1 {
            // A vector per queue, plus config and control (QEMU's documented 2N+2).
            format!(
                "virtio-net-pci,netdev=n0,mac={NET_MAC},mq=on,vectors={}",
                2 * queues + 2
            )
        } else {
            format!("virtio-net-pci,netdev=n0,mac={NET_MAC}")
        });
    qemu
}

/// One boot of a fresh sparse copy of the image in `vmm`: boot times, then iperf3 both
/// ways, then the VMM is killed (its disk is thrown away). A VMM that exits on its own
/// is an error with its exit status, console tail and stderr.
fn net_run(
    vmm: NetVmm,
    qemu_machine: &str,
    queues: u16,
    files: &std::path::Path,
    dir: &std::path::Path,
    series: &mut NetSeries,
) -> Result<()> {
    let image = dir.join("vm.img");
    let _ = std::fs::remove_file(&image);
    host_tool(
        "cp",
        &[
            "--sparse=always",
            &files.join("debian.img").display().to_string(),
            &image.display().to_string(),
        ],
    )?;
    let result = net_run_on(vmm, qemu_machine, queues, files, &image, series);
    let _ = std::fs::remove_file(&image);
    result
}

fn net_run_on(
    vmm: NetVmm,
    qemu_machine: &str,
    queues: u16,
    files: &std::path::Path,
    image: &std::path::Path,
    series: &mut NetSeries,
) -> Result<()> {
    use std::sync::{Arc, Mutex};
    let start = Instant::now();
    let mut child = net_vm(vmm, qemu_machine, queues, files, image)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the VMM")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let console = Arc::new(Mutex::new(Vec::<String>::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let lines = Arc::clone(&console);
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut raw = Vec::new();
        let mut sent = false;
        while reader.read_until(b'\n', &mut raw).is_ok_and(|n| n > 0) {
            let line = strip_ansi(&String::from_utf8_lossy(&raw));
            raw.clear();
            if !sent && line.contains(MULTI_USER_LINE) {
                let _ = tx.send(start.elapsed());
                sent = true;
            }
            if let Ok(mut lines) = lines.lock() {
                lines.push(line.trim_end().to_owned());
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut text);
        text
    });
    let outcome = (|| -> Result<(f64, f64, f64, f64)> {
        let ssh = loop {
            if let Some(status) = child.try_wait()? {
                bail!("the VMM exited before sshd answered: {status}");
            }
            if ssh_banner_now().is_some() {
                break start.elapsed().as_secs_f64();
            }
            if start.elapsed() > NET_BOOT_WAIT {
                bail!("no sshd banner on {NET_GUEST_IP}:22 after {NET_BOOT_WAIT:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let multi_user = rx
            .recv_timeout(Duration::from_secs(120))
            .context("no 'Reached target multi-user.target' on the console")?
            .as_secs_f64();
        let to_guest = iperf3(false, queues)?;
        let from_guest = iperf3(true, queues)?;
        if let Some(status) = child.try_wait()? {
            bail!("the VMM exited during iperf3: {status}");
        }
        Ok((ssh, multi_user, to_guest, from_guest))
    })();
    let _ = child.kill();
    let status = child.wait();
    let stderr = err_reader.join().unwrap_or_default();
    match outcome {
        Ok((ssh, multi_user, to_guest, from_guest)) => {
            series.ssh.push(ssh);
            series.multi_user.push(multi_user);
            series.to_guest.push(to_guest);
            series.from_guest.push(from_guest);
            Ok(())
        }
        Err(e) => {
            let tail = console
                .lock()
                .map(|l| l[l.len().saturating_sub(30)..].join("\n"))
                .unwrap_or_default();
            Err(e.context(format!(
                "after {:.1} s; exit status {status:?}\nconsole (last lines):\n{tail}\nstderr:\n{stderr}",
                start.elapsed().as_secs_f64()
            )))
        }
    }
}

fn net(runs: usize, vhost: bool, queues: u16) -> Result<()> {
    if !(1..=8).contains(&queues) {
        bail!(
            "--queues takes 1 to 8 (queue pairs of the guest's NIC, one per vCPU at most useful)"
        );
    }
    let (runs_arg, queues_arg) = (runs.to_string(), queues.to_string());
    let mut lab_args = vec!["net", "--runs", &runs_arg, "--queues", &queues_arg];
    if !vhost {
        lab_args.push("--no-vhost");
    }
    if in_lab_with(&lab_args)? {
        return Ok(());
    }
    let files = target_dir().join("marketplace");
    for file in ["debian.img", "vmlinuz", "initrd.img"] {
        if !files.join(file).exists() {
            bail!(
                "{} is missing: scripts/build-marketplace-image.sh builds it",
                files.join(file).display()
            );
        }
    }
    let dir = std::env::temp_dir().join(format!("crib-bench-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut vmms = vec![NetVmm::Crib, NetVmm::QemuUserspace, NetVmm::QemuVhost];
    let mut notes = Vec::new();
    if !vhost {
        notes.push("QEMU vhost=on not measured (--no-vhost)".to_owned());
        vmms.retain(|v| *v != NetVmm::QemuVhost);
    } else if Command::new("modprobe")
        .arg("vhost_net")
        .status()
        .map_or(true, |s| !s.success())
        || !std::path::Path::new("/dev/vhost-net").exists()
    {
        notes.push(
            "no /dev/vhost-net in L1 (modprobe vhost_net failed): QEMU vhost=on not measured"
                .to_owned(),
        );
        vmms.retain(|v| *v != NetVmm::QemuVhost);
    }
    let _ = host_tool("ip", &["link", "del", NET_TAP]);
    // Several queue pairs need a multiqueue tap: one file descriptor per queue.
    let mut tuntap = vec!["tuntap", "add", "dev", NET_TAP, "mode", "tap"];
    if queues > 1 {
        tuntap.push("multi_queue");
    }
    host_tool("ip", &tuntap).context("creating the tap (needs root and /dev/net/tun)")?;
    host_tool(
        "ip",
        &["addr", "add", &format!("{NET_HOST_IP}/24"), "dev", NET_TAP],
    )?;
    host_tool("ip", &["link", "set", NET_TAP, "up"])?;
    // QEMU on microvm (PCIe through ACPI) as the other benches; q35 if the image's
    // initrd does not find its disk or NIC there.
    let mut qemu_machine = "microvm,rtc=on,pcie=on".to_owned();
    let mut qemu_ok = false;
    let mut series: Vec<NetSeries> = vmms.iter().map(|_| NetSeries::default()).collect();
    for run in 0..runs {
        for (vmm, series) in vmms.iter().zip(series.iter_mut()) {
            eprintln!(
                "crib-bench net: run {} of {runs}: {}",
                run + 1,
                vmm.label(&qemu_machine)
            );
            let mut result = net_run(*vmm, &qemu_machine, queues, &files, &dir, series);
            if result.is_err()
                && *vmm != NetVmm::Crib
                && !qemu_ok
                && qemu_machine.starts_with("microvm")
            {
                let error = result.err().map(|e| format!("{e:#}")).unwrap_or_default();
                notes.push(format!(
                    "QEMU `-M {qemu_machine}` failed, q35 used instead: {error}"
                ));
                qemu_machine = "q35".to_owned();
                result = net_run(*vmm, &qemu_machine, queues, &files, &dir, series);
            }
            qemu_ok |= result.is_ok() && *vmm != NetVmm::Crib;
            if result.is_ok() {
                // On the console as it comes: a lab that dies later keeps what was measured.
                eprintln!(
                    "crib-bench net: sshd {:.1} s, multi-user {:.1} s, host->guest {:.0} Mbit/s, guest->host {:.0} Mbit/s",
                    series.ssh.last().unwrap_or(&f64::NAN),
                    series.multi_user.last().unwrap_or(&f64::NAN),
                    series.to_guest.last().unwrap_or(&f64::NAN),
                    series.from_guest.last().unwrap_or(&f64::NAN)
                );
            }
            if let Err(e) = result {
                let error = format!("{e:#}");
                eprintln!(
                    "crib-bench net: {} failed: {error}",
                    vmm.label(&qemu_machine)
                );
                series.errors.push(error);
            }
        }
    }
    let _ = host_tool("ip", &["link", "del", NET_TAP]);
    std::fs::remove_dir_all(&dir)?;
    let medians: Vec<(f64, f64, f64, f64)> = series
        .iter()
        .map(|s| {
            (
                median(&mut s.ssh.clone()),
                median(&mut s.multi_user.clone()),
                median(&mut s.to_guest.clone()),
                median(&mut s.from_guest.clone()),
            )
        })
        .collect();
    println!(
        "| marketplace VM (Debian 12, 2 vCPUs, 1 GiB, {queues} queue pair(s), iperf3 -P {queues}), {runs} runs, medians | boot to sshd banner | boot to multi-user.target | TCP host->guest | TCP guest->host |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for ((vmm, (s, m, t, f)), series) in vmms.iter().zip(&medians).zip(&series) {
        println!(
            "| {} ({} of {runs} runs) | {s:.1} s | {m:.1} s | {t:.0} Mbit/s | {f:.0} Mbit/s |",
            vmm.label(&qemu_machine),
            series.ssh.len()
        );
    }
    let (cs, cm, ct, cf) = medians[0];
    for (vmm, (s, m, t, f)) in vmms.iter().zip(&medians).skip(1) {
        let which = if *vmm == NetVmm::QemuVhost {
            "vhost=on"
        } else {
            "vhost=off"
        };
        println!(
            "| **crib / QEMU {which}** | **{:.2}** | **{:.2}** | **{:.2}** | **{:.2}** |",
            cs / s,
            cm / m,
            ct / t,
            cf / f
        );
    }
    println!();
    for (vmm, s) in vmms.iter().zip(&series) {
        println!(
            "- all runs, {}: sshd {:.1?} s, multi-user {:.1?} s, host->guest {:.0?}, guest->host {:.0?} Mbit/s",
            vmm.label(&qemu_machine),
            s.ssh,
            s.multi_user,
            s.to_guest,
            s.from_guest
        );
    }
    for note in &notes {
        println!("- note: {note}");
    }
    for (vmm, s) in vmms.iter().zip(&series) {
        for error in &s.errors {
            println!("- error, {}: {error}", vmm.label(&qemu_machine));
        }
    }
    Ok(())
}

fn mem_available_kib() -> Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no MemAvailable in /proc/meminfo")?
        .parse()
        .context("MemAvailable is not a number")
}

/// Resident KiB of the process's guest RAM: its mappings of exactly `ram_kib`
/// (/proc/PID/smaps), anonymous or the shared memfd.
fn guest_ram_rss_kib(pid: u32, ram_kib: u64) -> Result<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let field = |line: &str, key: &str| -> Option<u64> {
        line.strip_prefix(key)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let (mut in_guest, mut total) = (false, 0);
    for line in smaps.lines() {
        if let Some(size) = field(line, "Size:") {
            in_guest = size == ram_kib;
        } else if let Some(rss) = field(line, "Rss:").filter(|_| in_guest) {
            total += rss;
        }
    }
    Ok(total)
}

fn density(pods: usize) -> Result<()> {
    if in_lab_with(&["density", "--pods", &pods.to_string()])? {
        return Ok(());
    }
    anyhow::ensure!(pods > 0, "--pods takes a number above 0");
    let crib = crib_release();
    let dir = std::env::temp_dir().join(format!("crib-bench-density-{}", std::process::id()));
    let available_before = mem_available_kib()?;
    let mut fleet = Fleet::launch(&crib, &dir, "bench", pods, "128M")?;
    let all = fleet.wait_all_ready(Duration::from_secs(1200), Duration::from_secs(60))?;
    let available_after = mem_available_kib()?;
    let (mut outside, mut anon, mut shmem, mut ready) = (vec![], vec![], vec![], vec![]);
    for pod in &fleet.pods {
        let pid = pod.child.id();
        let (a, f, s) = (
            status_kib(pid, "RssAnon:")?,
            status_kib(pid, "RssFile:")?,
            status_kib(pid, "RssShmem:")?,
        );
        // Guest RAM is anonymous (no virtio-fs) or a shared memfd: count its mapping apart.
        let guest = guest_ram_rss_kib(pid, 128 * 1024)?;
        outside.push((a + f + s).saturating_sub(guest) as f64);
        anon.push(a.saturating_sub(guest) as f64);
        shmem.push(guest as f64);
        ready.push(pod.ready_after.map_or(f64::NAN, |d| d.as_secs_f64()));
    }
    let stop_start = Instant::now();
    fleet.stop_all(&crib, 60, Duration::from_secs(180))?;
    let stop_secs = stop_start.elapsed().as_secs_f64();
    drop(fleet);
    std::fs::remove_dir_all(&dir)?;
    let (first, last) = (
        ready.iter().copied().fold(f64::INFINITY, f64::min),
        ready.iter().copied().fold(0.0, f64::max),
    );
    println!(
        "| {pods} pods started at once (`crib pod run`, 128 MiB, 1 vCPU each, release build) | |"
    );
    println!("| --- | --- |");
    println!(
        "| launch to all {pods} answering `docker ps` | {:.1} s |",
        all.as_secs_f64()
    );
    println!(
        "| first / median / last pod answering | {first:.1} / {:.1} / {last:.1} s |",
        median(&mut ready)
    );
    println!(
        "| crib RSS outside guest memory per VM (RssAnon + RssFile + RssShmem - guest RAM), median | {:.0} KiB |",
        median(&mut outside)
    );
    println!(
        "| of which anonymous (RssAnon - guest RAM), median | {:.0} KiB |",
        median(&mut anon)
    );
    println!(
        "| guest memory touched per VM (Rss of the guest RAM mapping), median | {:.0} KiB |",
        median(&mut shmem)
    );
    println!(
        "| host MemAvailable drop per pod (all {pods} up) | {:.0} KiB |",
        available_before.saturating_sub(available_after) as f64 / pods as f64
    );
    println!("| `crib pod stop` of all {pods}, one after another | {stop_secs:.1} s |");
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse())
        .transpose()
        .context("--runs takes a number")?
        .unwrap_or(5);
    match args.first().map(String::as_str) {
        Some("host") => host(),
        Some("boot") => boot(runs),
        Some("io") => io(runs),
        Some("vsock") => vsock(runs),
        Some("fs") => fs(runs),
        Some("vfio") => vfio(runs),
        Some("net") => net(
            if args.iter().any(|a| a == "--runs") {
                runs
            } else {
                3
            },
            !args.iter().any(|a| a == "--no-vhost"),
            args.iter()
                .position(|a| a == "--queues")
                .and_then(|i| args.get(i + 1))
                .map(|n| n.parse())
                .transpose()
                .context("--queues takes a number")?
                .unwrap_or(1),
        ),
        Some("pull") => pull_bench::run(if args.iter().any(|a| a == "--runs") {
            runs
        } else {
            3
        }),
        Some("density") => {
            let pods = args
                .iter()
                .position(|a| a == "--pods")
                .and_then(|i| args.get(i + 1))
                .map(|n| n.parse())
                .transpose()
                .context("--pods takes a number")?
                .unwrap_or(10);
            density(pods)
        }
        _ => bail!(
            "usage: crib-bench host | boot [--runs N] | io [--runs N] | vsock [--runs N] | fs [--runs N] | vfio [--runs N] | net [--runs N] [--no-vhost] [--queues N] | density [--pods N] | pull [--runs N]"
        ),
    }
}
