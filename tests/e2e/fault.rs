//! Faults around a real guest (crib's pod kernel and cradle): crib SIGKILLed at random
//! moments while the guest writes and flushes (every write the guest saw acknowledged is in
//! the host file afterwards), and host I/O errors (a device-mapper range that fails, a full
//! host filesystem) reaching the guest as I/O errors, counted in the metrics, while crib and
//! the rest of the disk go on working.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use crib_tests::{api_request, host_tool, json_u64_after, strip_ansi, GuestArtifacts, LiveCrib};

use crate::TestFn;

/// How long a guest may take to boot and print its first lines.
const BOOT_WAIT: Duration = Duration::from_secs(150);
const MIB: u64 = 1 << 20;

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![
        (
            "linux_fault_kill9_keeps_every_acknowledged_write",
            kill9_keeps_every_acknowledged_write,
        ),
        (
            "linux_fault_host_io_errors_reach_the_guest_and_crib_lives",
            host_io_errors_reach_the_guest_and_crib_lives,
        ),
    ]
}

fn scratch(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("crib-fault-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// crib's arguments for the pod kernel running `command` with `disks` and an API socket.
fn run_args(pod: &GuestArtifacts, api: &Path, disks: &[String], command: &str) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        pod.vmlinux.display().to_string(),
        "--initrd".into(),
        pod.initramfs.display().to_string(),
        "--memory".into(),
        "256M".into(),
        "--api-socket".into(),
        api.display().to_string(),
        "--cmdline".into(),
        format!("console=ttyS0 panic=-1 quiet -- /bin/sh -c \"{command}\""),
    ];
    for disk in disks {
        args.extend(["--disk".into(), disk.clone()]);
    }
    args
}

/// A small PRNG (SplitMix64): the kill moments come from a seed the test prints, so a
/// failing sequence can be replayed with `CRIB_CRASH_SEED`.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }
}

/// How many times the test boots a guest and SIGKILLs crib.
const KILLS: u64 = 20;
/// The kill comes this long at most after the guest's first acknowledged record.
const KILL_WINDOW_MS: u64 = 2500;
/// One record per 4 KiB block, record N in block N (block 0 is never written).
const RECORD_BYTES: usize = 4096;
/// The crash disk: 64 MiB, room for 16383 records; the guest stops at 16000.
const CRASH_DISK_BYTES: u64 = 64 * MIB;
const MAX_RECORDS: u32 = 16_000;

/// Record `n`'s header line in run `kill` of the sequence `seed`; zeroes fill the block.
fn record_header(seed: u64, kill: u64, n: u32) -> String {
    format!("crib-crash seed {seed} kill {kill} record {n}\n")
}

/// The guest's loop: record after record, each an O_DIRECT write of one block followed by
/// an fsync of the disk (a virtio-blk FLUSH), then `ack N` on the console.
fn writer_command(seed: u64, kill: u64) -> String {
    format!(
        "echo write-cache $(cat /sys/block/vda/queue/write_cache); i=0; \
         while [ $i -lt {MAX_RECORDS} ]; do i=$((i+1)); \
         echo crib-crash seed {seed} kill {kill} record $i | \
         dd of=/dev/vda bs={RECORD_BYTES} seek=$i count=1 conv=sync,notrunc,fsync oflag=direct \
         2>/dev/null || {{ echo write-failed $i; break; }}; echo ack $i; done; sleep 600"
    )
}

/// The highest `ack N` among the complete console lines.
fn last_ack(console: &str) -> u32 {
    let complete = &console[..console.rfind('\n').map_or(0, |end| end + 1)];
    complete
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ack ")?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// The records `1..=acked` of run `kill` that are not intact in `file`.
fn damaged_records(file: &Path, seed: u64, kill: u64, acked: u32) -> Result<Vec<u32>> {
    let mut bytes = Vec::new();
    std::fs::File::open(file)?.read_to_end(&mut bytes)?;
    let mut damaged = Vec::new();
    for n in 1..=acked {
        let start = usize::try_from(n)? * RECORD_BYTES;
        let block = bytes.get(start..start + RECORD_BYTES).unwrap_or_default();
        let header = record_header(seed, kill, n);
        let intact = block.len() == RECORD_BYTES
            && block.starts_with(header.as_bytes())
            && block[header.len()..].iter().all(|&b| b == 0);
        if !intact {
            damaged.push(n);
        }
    }
    Ok(damaged)
}

/// How crib reaches the backing file in one boot.
#[derive(Clone, Copy, Debug)]
enum Backing {
    /// The file itself, through the host page cache: the kill alone cannot lose a write
    /// crib completed, flushed or not.
    File,
    /// A loop device over the file, which the test keeps open too, so crib's exit does not
    /// write the device's page cache back: a record reaches the file only through crib's
    /// `fdatasync` (or the kernel's writeback, seconds later).
    Loop,
    /// The loop device opened with O_DIRECT (`direct=on`).
    LoopDirect,
}

/// A loop device over a file, detached on drop.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(file: &Path) -> Result<Self> {
        let device = host_tool(
            "losetup",
            &["--find", "--show", &file.display().to_string()],
        )?;
        Ok(Self(device.trim().to_string()))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// One boot of the sequence: waits for the first ack, waits a random moment, reads the
/// flush count, SIGKILLs crib, checks the file. Returns (ms waited, acks, flushes).
fn kill_once(
    pod: &GuestArtifacts,
    dir: &Path,
    file: &Path,
    rng: &mut SplitMix64,
    seed: u64,
    kill: u64,
    backing: Backing,
) -> Result<(u64, u32, u64)> {
    let api = dir.join("api.sock");
    let loop_device = match backing {
        Backing::File => None,
        Backing::Loop | Backing::LoopDirect => Some(LoopDevice::attach(file)?),
    };
    // Held open until the check: crib's close is then not the device's last one.
    let _held = match &loop_device {
        Some(device) => Some(std::fs::File::open(&device.0)?),
        None => None,
    };
    let disk = match (&loop_device, backing) {
        (Some(device), Backing::LoopDirect) => format!("path={},id=crash,direct=on", device.0),
        (Some(device), _) => format!("path={},id=crash", device.0),
        (None, _) => format!("path={},id=crash", file.display()),
    };
    let mut crib = LiveCrib::spawn(&run_args(pod, &api, &[disk], &writer_command(seed, kill)))?;
    let delay_ms = rng.below(KILL_WINDOW_MS);
    let result = (|| -> Result<(u64, u32, u64)> {
        crib.wait_for("ack 1", BOOT_WAIT, |out| (last_ack(out) >= 1).then_some(()))?;
        let cache = crib.stdout();
        anyhow::ensure!(
            cache.contains("write-cache write back"),
            "the guest sees a write-back cache, so its fsync sends FLUSH"
        );
        std::thread::sleep(Duration::from_millis(delay_ms));
        let acked_before = last_ack(&crib.stdout());
        let (status, body) = api_request(&api, "GET", "/api/v1/metrics", "")?;
        anyhow::ensure!(status == 200, "GET /api/v1/metrics: {status} {body}");
        let flushes = json_u64_after(&body, "\"crash\":{", "flushes")
            .with_context(|| format!("no flushes for disk crash in {body}"))?;
        // Every ack follows a FLUSH that crib completed, and crib counts a flush before it
        // completes it.
        anyhow::ensure!(
            flushes >= u64::from(acked_before),
            "{acked_before} records acknowledged but only {flushes} flushes completed"
        );
        let status = crib.kill()?;
        anyhow::ensure!(
            status.code().is_none(),
            "crib was still running when it was killed, not exited ({status})"
        );
        let console = crib.stdout();
        anyhow::ensure!(
            !console.contains("write-failed"),
            "a guest write failed before the kill"
        );
        let acked = last_ack(&console);
        let damaged = damaged_records(file, seed, kill, acked)?;
        if !damaged.is_empty() {
            bail!(
                "after SIGKILL {} of {acked} acknowledged records are not intact in {}: {:?}",
                damaged.len(),
                file.display(),
                &damaged[..damaged.len().min(20)]
            );
        }
        Ok((delay_ms, acked, flushes))
    })();
    result.map_err(|e| {
        let _ = crib.kill();
        e.context(format!(
            "kill {kill} (seed {seed}, {backing:?})\n{}",
            crib.output()
        ))
    })
}

/// Twenty boots against one backing file: each guest writes records, each record flushed
/// before the guest prints `ack N`, and crib is SIGKILLed at a random moment. After each
/// kill, every record whose ack reached the console is intact in the host file. The boots
/// take turns at reaching the file directly, through a loop device (only a flush brings a
/// record into the file then) and through the loop device with O_DIRECT; L1's /tmp is a
/// tmpfs, which refuses O_DIRECT itself.
fn kill9_keeps_every_acknowledged_write() -> Result<()> {
    let pod = GuestArtifacts::pod()?;
    let dir = scratch("kill9")?;
    let file = dir.join("crash.img");
    std::fs::File::create(&file)?.set_len(CRASH_DISK_BYTES)?;
    let seed = match std::env::var("CRIB_CRASH_SEED") {
        Ok(seed) => seed.parse().context("CRIB_CRASH_SEED takes a number")?,
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| (d.as_secs() << 30) ^ u64::from(d.subsec_nanos()))
            .unwrap_or(1),
    };
    println!("kill9: seed {seed} (replay with CRIB_CRASH_SEED={seed})");
    let mut rng = SplitMix64(seed);
    let started = Instant::now();
    let mut total_acks = 0u64;
    for kill in 1..=KILLS {
        let backing = match kill % 3 {
            0 => Backing::File,
            1 => Backing::Loop,
            _ => Backing::LoopDirect,
        };
        let (delay_ms, acked, flushes) =
            kill_once(&pod, &dir, &file, &mut rng, seed, kill, backing)?;
        total_acks += u64::from(acked);
        println!(
            "kill9: boot {kill}/{KILLS} ({backing:?}): SIGKILL {delay_ms} ms after the \
             first ack; {acked} acknowledged records intact ({flushes} flushes counted just before)"
        );
    }
    println!(
        "kill9: {KILLS} kills, {total_acks} acknowledged records checked, {:.0} s",
        started.elapsed().as_secs_f64()
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A device-mapper device over a loop device over a file: blocks `[0, 16 MiB)` and
/// `[32 MiB, 64 MiB)` map to the file, `[16 MiB, 32 MiB)` to the `error` target, so every
/// read or write there fails with EIO. Removed (with its loop device) on drop.
struct FailingDevice {
    name: String,
    loop_device: String,
}

const DM_DISK_BYTES: u64 = 64 * MIB;

impl FailingDevice {
    fn create(dir: &Path, name: &str) -> Result<Self> {
        // device-mapper is a module in Debian's kernel; the lab binds L1's module tree.
        let _ = Command::new("modprobe").arg("dm_mod").status();
        anyhow::ensure!(
            Path::new("/dev/mapper/control").exists(),
            "no device-mapper (/dev/mapper/control): modprobe dm_mod failed"
        );
        let file = dir.join(format!("{name}.backing"));
        std::fs::File::create(&file)?.set_len(DM_DISK_BYTES)?;
        let loop_device = host_tool(
            "losetup",
            &["--find", "--show", &file.display().to_string()],
        )?
        .trim()
        .to_string();
        let sector = |bytes: u64| bytes / 512;
        let table = format!(
            "0 {good} linear {loop_device} 0\n{good} {bad} error\n{rest_start} {rest} linear {loop_device} {rest_start}\n",
            good = sector(16 * MIB),
            bad = sector(16 * MIB),
            rest_start = sector(32 * MIB),
            rest = sector(32 * MIB),
        );
        let table_file = dir.join(format!("{name}.table"));
        std::fs::write(&table_file, table)?;
        let device = Self {
            name: name.into(),
            loop_device,
        };
        host_tool(
            "dmsetup",
            &["create", name, &table_file.display().to_string()],
        )?;
        Ok(device)
    }

    /// The device node: `/dev/mapper/NAME` (dmsetup makes it when no udev runs, as in the
    /// lab), else the `/dev/dm-N` devtmpfs made.
    fn path(&self) -> Result<String> {
        let mapper = format!("/dev/mapper/{}", self.name);
        if Path::new(&mapper).exists() {
            return Ok(mapper);
        }
        let minor = host_tool(
            "dmsetup",
            &["info", "-c", "--noheadings", "-o", "minor", &self.name],
        )?;
        Ok(format!("/dev/dm-{}", minor.trim()))
    }
}

impl Drop for FailingDevice {
    fn drop(&mut self) {
        let _ = Command::new("dmsetup")
            .args(["remove", &self.name])
            .status();
        let _ = Command::new("losetup")
            .args(["-d", &self.loop_device])
            .status();
    }
}

/// A small tmpfs mounted on a directory; unmounted on drop.
struct SmallTmpfs(PathBuf);

impl SmallTmpfs {
    fn mount(dir: PathBuf, size: &str) -> Result<Self> {
        std::fs::create_dir_all(&dir)?;
        host_tool(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                &dir.display().to_string(),
            ],
        )
        .context("mounting a tmpfs needs root (the lab runs tests as root)")?;
        Ok(Self(dir))
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The guest's side: for each disk, found by its serial, writes and reads that must work
/// and ones that must fail, each line saying which. `bad` and `badc` are the failing
/// device-mapper devices (crib opens `bad` with O_DIRECT, `badc` through the host's page
/// cache, where a write fails only at the flush); `full` is a sparse 64 MiB image on a
/// 4 MiB tmpfs. In 4 KiB blocks, the failing range is blocks 4096..8192.
const FAULT_COMMAND: &str = "dev() { for d in /sys/block/vd*; do grep -qx $1 $d/serial && echo /dev/${d##*/}; done; }; \
    w() { echo $3 | dd of=$1 bs=4096 seek=$2 count=1 conv=sync,notrunc,fsync oflag=direct 2>&1; }; \
    r() { dd if=$1 bs=4096 skip=$2 count=1 iflag=direct 2>/dev/null | head -n 1; }; \
    B=$(dev bad); C=$(dev badc); F=$(dev full); echo disks bad=$B badc=$C full=$F; \
    w $B 1 good-low && echo bad-good-low-write-ok; \
    w $B 9000 good-high && echo bad-good-high-write-ok; \
    w $B 4096 x && echo bad-range-write-ok || echo bad-range-write-failed; \
    dd if=$B of=/dev/null bs=4096 skip=4100 count=1 iflag=direct 2>&1 && echo bad-range-read-ok || echo bad-range-read-failed; \
    echo bad-read-low $(r $B 1) bad-read-high $(r $B 9000); \
    w $C 1 cached-low && echo badc-good-write-ok; \
    w $C 4200 y && echo badc-range-write-ok || echo badc-range-write-failed; \
    echo badc-read-low $(r $C 1); \
    w $F 0 full-first && echo full-first-write-ok; \
    dd if=/dev/zero of=$F bs=1M seek=1 count=16 oflag=direct 2>&1 && echo full-fill-ok || echo full-fill-failed; \
    w $F 0 full-again && echo full-rewrite-ok; echo full-read $(r $F 0); \
    echo faults-done; sleep 600";

/// Host I/O errors: a device-mapper range that fails and a full host filesystem. The guest
/// gets EIO for what fails and nothing else; the rest of each disk works on; crib counts
/// the errors per disk in `GET /api/v1/metrics`, logs one line per disk and queue, keeps
/// running, and shuts down cleanly afterwards.
fn host_io_errors_reach_the_guest_and_crib_lives() -> Result<()> {
    let pod = GuestArtifacts::pod()?;
    let dir = scratch("hostio")?;
    let tag = std::process::id();
    let bad = FailingDevice::create(&dir, &format!("crib-bad-{tag}"))?;
    let badc = FailingDevice::create(&dir, &format!("crib-badc-{tag}"))?;
    let tmpfs = SmallTmpfs::mount(dir.join("small"), "4M")?;
    let full = tmpfs.0.join("full.img");
    std::fs::File::create(&full)?.set_len(64 * MIB)?;
    let api = dir.join("api.sock");
    let disks = [
        format!("path={},id=bad,direct=on", bad.path()?),
        format!("path={},id=badc", badc.path()?),
        format!("path={},id=full", full.display()),
    ];
    let mut crib = LiveCrib::spawn(&run_args(&pod, &api, &disks, FAULT_COMMAND))?;
    let result = (|| -> Result<()> {
        crib.wait_for("faults-done", BOOT_WAIT, |out| {
            out.contains("faults-done").then_some(())
        })?;
        let console = crib.stdout();
        for line in [
            "bad-good-low-write-ok",
            "bad-good-high-write-ok",
            "bad-range-write-failed",
            "bad-range-read-failed",
            "bad-read-low good-low bad-read-high good-high",
            "badc-good-write-ok",
            "badc-range-write-failed",
            "badc-read-low cached-low",
            "full-first-write-ok",
            "full-fill-failed",
            "full-rewrite-ok",
            "full-read full-again",
        ] {
            anyhow::ensure!(console.contains(line), "the guest printed `{line}`");
        }
        anyhow::ensure!(
            console.contains("Input/output error") || console.contains("I/O error"),
            "busybox dd reports an I/O error"
        );
        let (status, body) = api_request(&api, "GET", "/api/v1/metrics", "")?;
        anyhow::ensure!(status == 200, "GET /api/v1/metrics: {status} {body}");
        println!("host faults: metrics {body}");
        for (disk, at_least) in [("bad", 2), ("badc", 1), ("full", 1)] {
            let from = format!("\"{disk}\":{{");
            let errors = json_u64_after(&body, &from, "io_errors");
            let ioerr = json_u64_after(&body, &from, "status_ioerr");
            anyhow::ensure!(
                errors.is_some_and(|n| n >= at_least) && ioerr.is_some_and(|n| n >= at_least),
                "disk {disk} counts at least {at_least} host I/O errors answered with IOERR \
                 (io_errors {errors:?}, status_ioerr {ioerr:?})"
            );
        }
        let (status, vm) = api_request(&api, "GET", "/api/v1/vm", "")?;
        anyhow::ensure!(
            status == 200 && vm.contains("running"),
            "crib still runs the VM: {status} {vm}"
        );
        let (status, body) = api_request(&api, "PUT", "/api/v1/vm/shutdown", "")?;
        anyhow::ensure!(
            status / 100 == 2,
            "PUT /api/v1/vm/shutdown: {status} {body}"
        );
        let code = crib.wait_exit(Duration::from_secs(60))?;
        anyhow::ensure!(
            code == Some(0),
            "crib exits 0 after the shutdown, not {code:?}"
        );
        // tracing colours field names (`disk=`) even into a pipe.
        let log = strip_ansi(&crib.output());
        for disk in ["bad", "badc", "full"] {
            let lines = log
                .lines()
                .filter(|l| l.contains("host I/O error") && l.contains(&format!("disk={disk} ")))
                .count();
            anyhow::ensure!(
                lines == 1,
                "crib logs disk {disk}'s host errors once, not {lines} times"
            );
        }
        anyhow::ensure!(
            !log.contains("needs a reset"),
            "no queue stopped for a host I/O error"
        );
        Ok(())
    })();
    let output = crib.output();
    drop(crib);
    drop(tmpfs);
    drop(badc);
    drop(bad);
    result.map_err(|e| e.context(output))?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
