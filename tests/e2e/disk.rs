//! virtio-blk volumes seen from a real guest: data reaches the host, read-only holds,
//! serials name the disks, discard frees host blocks (host errors: fault.rs).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use crib_tests::{fio_image, host_tool, run_crib, GuestArtifacts, RunOutput};

use crate::TestFn;

const DEADLINE: Duration = Duration::from_secs(240);
const MIB: u64 = 1 << 20;

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![
        ("linux_disk_write_reaches_host", disk_write_reaches_host),
        (
            "linux_disk_works_after_driver_rebind",
            disk_works_after_driver_rebind,
        ),
        (
            "linux_disk_works_after_the_guest_moves_its_bar",
            disk_works_after_the_guest_moves_its_bar,
        ),
        (
            "linux_disk_readonly_refuses_writes",
            disk_readonly_refuses_writes,
        ),
        (
            "linux_disk_eight_disks_found_by_serial",
            eight_disks_found_by_serial,
        ),
        (
            "linux_disk_discard_frees_host_blocks",
            discard_frees_host_blocks,
        ),
        (
            "linux_disk_multiqueue_block_device_backing",
            multiqueue_block_device_backing,
        ),
    ]
}

/// A scratch directory for this test's backing files.
fn scratch(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("crib-disk-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn backing_file(dir: &Path, name: &str, bytes: u64) -> Result<PathBuf> {
    let path = dir.join(name);
    let file = std::fs::File::create(&path)?;
    file.set_len(bytes)?;
    Ok(path)
}

/// Boots the test initramfs with `disks` (each a `--disk` value), running `command`.
fn boot_with_disks(disks: &[String], command: &str) -> Result<RunOutput> {
    boot_pod(1, None, disks, command)
}

/// Same, with `cpus` vCPUs (Linux uses at most one virtio-blk queue per CPU).
fn boot_with_disks_on(cpus: u8, disks: &[String], command: &str) -> Result<RunOutput> {
    boot_pod(cpus, None, disks, command)
}

/// Boots the test initramfs with `cpus` vCPUs, an optional pod spec and `disks`, then runs
/// `command` through cradle's test hook.
fn boot_pod(cpus: u8, pod: Option<&Path>, disks: &[String], command: &str) -> Result<RunOutput> {
    boot_pod_on(&GuestArtifacts::find()?, cpus, pod, disks, command)
}

/// [`boot_pod`] with the kernel and initramfs of `artifacts`.
fn boot_pod_on(
    artifacts: &GuestArtifacts,
    cpus: u8,
    pod: Option<&Path>,
    disks: &[String],
    command: &str,
) -> Result<RunOutput> {
    let mut args: Vec<String> = vec![
        "run".into(),
        "--cpus".into(),
        cpus.to_string(),
        "--kernel".into(),
        artifacts.vmlinux.display().to_string(),
        "--initrd".into(),
        artifacts.initramfs.display().to_string(),
        "--memory".into(),
        "512M".into(),
        "--cmdline".into(),
        format!("console=ttyS0 panic=-1 quiet -- /bin/sh -c \"{command}\""),
    ];
    if let Some(pod) = pod {
        args.push("--pod".into());
        args.push(pod.display().to_string());
    }
    for disk in disks {
        args.push("--disk".into());
        args.push(disk.clone());
    }
    run_crib(&args, DEADLINE)
}

fn expect_status(out: &RunOutput, status: i32) -> Result<()> {
    out.check(
        out.stdout
            .contains(&format!("cradle: command exited with status {status}")),
        &format!("guest command exits with {status}"),
    )?;
    out.check(out.code == Some(0), "crib exits 0")
}

fn disk_write_reaches_host() -> Result<()> {
    let dir = scratch("write")?;
    let file = backing_file(&dir, "data.img", 64 * MIB)?;
    let disk = format!("path={},id=data", file.display());
    let out = boot_with_disks(
        &[disk],
        "cat /sys/block/vda/serial; echo; echo crib-wrote-this | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null && sync",
    )?;
    expect_status(&out, 0)?;
    out.check(out.stdout.contains("data"), "the guest sees serial 'data'")?;
    let bytes = std::fs::read(&file)?;
    out.check(
        bytes.starts_with(b"crib-wrote-this\n"),
        "the host file holds what the guest wrote",
    )?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Unbinding the driver resets the device (status 0: workers stop); binding it again
/// negotiates and activates it afresh.
fn disk_works_after_driver_rebind() -> Result<()> {
    let dir = scratch("rebind")?;
    let file = backing_file(&dir, "rebind.img", 16 * MIB)?;
    let disk = format!("path={},id=rebind", file.display());
    let driver = "/sys/bus/pci/drivers/virtio-pci";
    let out = boot_with_disks(
        &[disk],
        &format!(
            "echo 0000:00:01.0 > {driver}/unbind && ls /sys/block; echo 0000:00:01.0 > {driver}/bind && sleep 1; \
             echo after-rebind | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null && echo rebind-ok"
        ),
    )?;
    expect_status(&out, 0)?;
    out.check(
        out.stdout.contains("rebind-ok"),
        "the disk works after the driver re-binds",
    )?;
    out.check(
        std::fs::read(&file)?.starts_with(b"after-rebind\n"),
        "the write reached the host",
    )?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Where the guest moves the disk's BAR 0: the top 64 KiB-aligned slot of crib's PCI
/// window (0xc000_0000..0xe000_0000), far from the BARs crib placed at its bottom.
const MOVED_BAR: u32 = 0xdf00_0000;

/// The guest moves the disk's BAR itself (driver unbound, a new address written into BAR
/// 0 through sysfs) and reads the device's config space there through /dev/mem: crib must
/// answer at the new address and no longer at the old one. Then it removes the device and
/// rescans, so Linux places the BAR again (a second move) and binds the driver, whose
/// doorbells and interrupts must work wherever the BAR ended up.
fn disk_works_after_the_guest_moves_its_bar() -> Result<()> {
    let dir = scratch("barmove")?;
    let file = backing_file(&dir, "barmove.img", 16 * MIB)?;
    let disk = format!("path={},id=barmove", file.display());
    let dev = "/sys/bus/pci/devices/0000:00:01.0";
    let bytes = crib_tests::printf_le_bytes(MOVED_BAR);
    // virtio-blk's capacity (sectors) opens the device config, 0x2000 into crib's BAR 0.
    let out = boot_with_disks(
        &[disk],
        &format!(
            "old=$(head -c 18 {dev}/resource); echo bar-before $old; \
             echo 0000:00:01.0 > /sys/bus/pci/drivers/virtio-pci/unbind && \
             printf '{bytes}' | dd of={dev}/config bs=4 seek=4 count=1 conv=notrunc 2>/dev/null && \
             echo capacity-at-new $(devmem $(({MOVED_BAR} + 0x2000)) 32) \
                  capacity-at-old $(devmem $((old + 0x2000)) 32); \
             echo 1 > {dev}/remove && echo 1 > /sys/bus/pci/rescan && sleep 1; \
             echo bar-after $(head -c 18 {dev}/resource); \
             echo after-bar-move | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null && \
             echo read-back: $(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -n 1)"
        ),
    )?;
    expect_status(&out, 0)?;
    let sectors = 16 * MIB / 512;
    let console = out.stdout.to_lowercase();
    out.check(
        console.contains(&format!(
            "capacity-at-new {sectors:#010x} capacity-at-old 0xffffffff"
        )),
        "after the move the device answers at the new address, and nothing at the old",
    )?;
    out.check(
        out.stdout.contains("read-back: after-bar-move"),
        "the disk works once Linux has placed the BAR again",
    )?;
    out.check(
        std::fs::read(&file)?.starts_with(b"after-bar-move\n"),
        "the write reached the host",
    )?;
    let after = out
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("bar-after 0x"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("no bar-after line")?;
    for (from, to) in [
        (0xc000_0000, u64::from(MOVED_BAR)),
        (u64::from(MOVED_BAR), after),
    ] {
        out.check(
            from == to
                || out.stderr.contains(&format!(
                    "guest moved BAR 0 of PCI 00:01.0 from {from:#x} to {to:#x}"
                )),
            &format!("crib followed the move from {from:#x} to {to:#x}"),
        )?;
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn disk_readonly_refuses_writes() -> Result<()> {
    let dir = scratch("ro")?;
    let file = backing_file(&dir, "ro.img", 16 * MIB)?;
    std::fs::write(&file, b"original")?;
    std::fs::File::options()
        .write(true)
        .open(&file)?
        .set_len(16 * MIB)?;
    let disk = format!("path={},id=ro,readonly=on", file.display());
    let out = boot_with_disks(
        &[disk],
        "cat /sys/block/vda/ro; echo x | dd of=/dev/vda bs=512 conv=sync,fsync oflag=direct 2>/dev/null && echo write-succeeded || echo write-failed; head -c 8 /dev/vda; echo",
    )?;
    expect_status(&out, 0)?;
    out.check(
        out.stdout.contains("write-failed"),
        "the write fails in the guest",
    )?;
    out.check(
        out.stdout.contains("original"),
        "the guest reads the original data",
    )?;
    out.check(
        std::fs::read(&file)?.starts_with(b"original"),
        "the host file is unchanged",
    )?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn eight_disks_found_by_serial() -> Result<()> {
    let dir = scratch("eight")?;
    let mut disks = Vec::new();
    for i in 0..8 {
        let file = backing_file(&dir, &format!("d{i}.img"), 4 * MIB)?;
        disks.push(format!("path={},id=vol{i}", file.display()));
    }
    let out = boot_with_disks(
        &disks,
        "for d in /sys/block/vd*; do echo serial=$(cat $d/serial); done",
    )?;
    expect_status(&out, 0)?;
    for i in 0..8 {
        out.check(
            out.stdout.contains(&format!("serial=vol{i}")),
            &format!("disk vol{i} is visible"),
        )?;
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn discard_frees_host_blocks() -> Result<()> {
    let dir = scratch("discard")?;
    let file = backing_file(&dir, "thin.img", 64 * MIB)?;
    let disk = format!("path={},id=thin", file.display());
    let out = boot_with_disks(
        &[disk],
        "dd if=/dev/urandom of=/dev/vda bs=1M count=16 conv=fsync 2>/dev/null; sync; blkdiscard /dev/vda && echo discarded; sync",
    )?;
    expect_status(&out, 0)?;
    out.check(
        out.stdout.contains("discarded"),
        "blkdiscard succeeds in the guest",
    )?;
    let allocated = std::fs::metadata(&file)?.blocks() * 512;
    out.check(
        allocated < 4 * MIB,
        &format!("the host file's allocation shrank (now {allocated} bytes)"),
    )?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn multiqueue_block_device_backing() -> Result<()> {
    // LV-style backing: a block device (a loop device over a file), 2 queues on 2 vCPUs.
    let dir = scratch("loop")?;
    let file = backing_file(&dir, "lv.img", 32 * MIB)?;
    let losetup = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&file)
        .output()?;
    anyhow::ensure!(
        losetup.status.success(),
        "losetup failed: {}",
        String::from_utf8_lossy(&losetup.stderr)
    );
    let device = String::from_utf8_lossy(&losetup.stdout).trim().to_string();
    let disk = format!("path={device},id=lv,queues=2");
    let out = boot_with_disks_on(
        2,
        &[disk],
        "ls /sys/block/vda/mq | wc -l; cat /sys/block/vda/size; echo lv-data | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null",
    );
    let _ = std::process::Command::new("losetup")
        .args(["-d", &device])
        .status();
    let out = out?;
    expect_status(&out, 0)?;
    out.check(
        out.stdout.lines().any(|l| l.trim() == "2"),
        "the guest sees 2 queues",
    )?;
    out.check(
        out.stdout.lines().any(|l| l.trim() == "65536"),
        "the guest sees 32 MiB (65536 sectors)",
    )?;
    out.check(
        std::fs::read(&file)?.starts_with(b"lv-data\n"),
        "the data reached the file behind the loop device",
    )?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

pub fn pod_tests() -> Vec<(&'static str, TestFn)> {
    vec![
        (
            "linux_pod_volumes_mounted_by_name",
            pod_volumes_mounted_by_name,
        ),
        (
            "linux_pod_kernel_formats_a_volume_without_waiting_for_entropy",
            pod_kernel_formats_a_volume_without_waiting_for_entropy,
        ),
    ]
}

/// What cradle says when mkfs had to wait for the kernel's random pool.
const ENTROPY_WAIT: &str = "for the kernel's random pool";

/// The pod kernel formats a blank volume at once: crib seeds the random pool at boot
/// (setup_data) and serves virtio-rng, which the kernel has built in.
fn pod_kernel_formats_a_volume_without_waiting_for_entropy() -> Result<()> {
    let dir = scratch("pod-entropy")?;
    let data = backing_file(&dir, "data.img", 64 * MIB)?;
    let spec_path = dir.join("pod.json");
    std::fs::write(
        &spec_path,
        r#"{"name": "entropy", "volumes": [{"name": "data", "path": "/data"}],
            "processes": [{"name": "writer", "argv": ["/bin/sh", "-c", "echo pod-data > /data/hello && sync"]}]}"#,
    )?;
    let command = "echo rng=$(cat /sys/class/misc/hw_random/rng_current)";
    let disks = [format!("path={},id=data", data.display())];
    let out = boot_pod_on(
        &GuestArtifacts::pod()?,
        1,
        Some(&spec_path),
        &disks,
        command,
    )?;
    expect_status(&out, 0)?;
    out.check(
        out.stdout.contains("process writer exited with status 0"),
        "the pod process wrote to the formatted volume",
    )?;
    out.check(
        !out.stdout.contains(ENTROPY_WAIT),
        "formatting did not wait for entropy",
    )?;
    out.check(
        out.stdout.contains("rng=virtio_rng"),
        "the guest's hardware RNG is crib's virtio-rng",
    )?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A pod with three volumes: a blank file (formatted, read-write), a blank block device
/// (a loop device, formatted, read-write) and an ext4 file attached read-only.
fn pod_volumes_mounted_by_name() -> Result<()> {
    let dir = scratch("pod")?;
    let data = backing_file(&dir, "data.img", 64 * MIB)?;
    let lv_file = backing_file(&dir, "lv.img", 64 * MIB)?;
    let ro = backing_file(&dir, "ro.img", 16 * MIB)?;
    let content = dir.join("content");
    std::fs::create_dir_all(&content)?;
    std::fs::write(content.join("motd"), "read-only-content\n")?;
    let (ro_arg, content_arg) = (ro.display().to_string(), content.display().to_string());
    host_tool("mkfs.ext4", &["-q", "-F", "-d", &content_arg, &ro_arg])?;
    let device = host_tool(
        "losetup",
        &["--find", "--show", &lv_file.display().to_string()],
    )?
    .trim()
    .to_string();
    let spec = serde_spec();
    let spec_path = dir.join("pod.json");
    std::fs::write(&spec_path, spec)?;

    let command = "cat /ro/motd; touch /ro/new 2>/dev/null && echo ro-write-ok || echo ro-write-failed; ls /dev/volumes; \
        echo rng=$(cat /sys/class/misc/hw_random/rng_current)";
    let disks = [
        format!("path={},id=data", data.display()),
        format!("path={device},id=lv"),
        format!("path={},id=config,readonly=on", ro.display()),
    ];
    let out = boot_pod(1, Some(&spec_path), &disks, command);
    let _ = std::process::Command::new("losetup")
        .args(["-d", &device])
        .status();
    let out = out?;
    expect_status(&out, 0)?;
    out.check(
        out.stdout.contains("process writer exited with status 0"),
        "the pod process ran",
    )?;
    out.check(
        out.stdout.contains("read-only-content"),
        "the read-only volume is mounted",
    )?;
    out.check(
        out.stdout.contains("ro-write-failed"),
        "writing the read-only volume fails",
    )?;
    out.check(
        !out.stdout.contains(ENTROPY_WAIT),
        "formatting did not wait for entropy (boot seed, virtio_rng module)",
    )?;
    out.check(
        out.stdout.contains("rng=virtio_rng"),
        "Debian's kernel uses crib's virtio-rng (module loaded by cradle)",
    )?;
    let data_arg = data.display().to_string();
    let on_data = host_tool("debugfs", &["-R", "cat /hello", &data_arg])?;
    out.check(
        on_data.contains("pod-data"),
        "the host image holds the pod's file",
    )?;
    let lv_arg = lv_file.display().to_string();
    let on_lv = host_tool("debugfs", &["-R", "cat /hello", &lv_arg])?;
    out.check(
        on_lv.contains("lv-data"),
        "the block device holds the pod's file",
    )?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn serde_spec() -> String {
    r#"{
  "name": "e2e",
  "volumes": [
    {"name": "data", "path": "/data"},
    {"name": "lv", "path": "/lv", "fs": "ext4"},
    {"name": "config", "path": "/ro", "readonly": true}
  ],
  "processes": [
    {"name": "writer", "argv": ["/bin/sh", "-c", "echo pod-data > /data/hello && echo lv-data > /lv/hello && sync"]}
  ]
}"#
    .to_string()
}

pub fn fio_tests() -> Vec<(&'static str, TestFn)> {
    vec![("linux_disk_fio_randrw_with_verify", fio_randrw_with_verify)]
}

/// fio in the guest, io_uring with O_DIRECT on a virtio-blk volume: random writes read
/// back and checked (crc32c), then random reads.
fn fio_randrw_with_verify() -> Result<()> {
    let dir = scratch("fio")?;
    let tools = fio_image(&dir)?;
    let target = backing_file(&dir, "target.img", 128 * MIB)?;
    let spec_path = dir.join("pod.json");
    std::fs::write(
        &spec_path,
        r#"{"name": "fio", "volumes": [{"name": "tools", "path": "/t", "readonly": true}, {"name": "target"}]}"#,
    )?;
    let fio = "chroot /t /usr/bin/fio --output-format=terse --terse-version=3 --minimal \
               --filename=/dev/volumes/target --ioengine=io_uring --direct=1 --bs=4k --size=32M \
               --iodepth=16";
    let command = format!(
        "mount --bind /dev /t/dev && {fio} --name=w --rw=randwrite --verify=crc32c --verify_fatal=1 && {fio} --name=r --rw=randread && echo fio-ok"
    );
    let disks = [
        format!("path={},id=tools,readonly=on", tools.display()),
        format!("path={},id=target", target.display()),
    ];
    let out = boot_pod(1, Some(&spec_path), &disks, &command)?;
    std::fs::remove_dir_all(&dir)?;
    expect_status(&out, 0)?;
    out.check(
        out.stdout.contains("fio-ok"),
        "fio wrote and verified its data",
    )
}
