//! Debian's cloud kernel booting cradle: the foundation's end-to-end path. These run on a
//! host with VT-x/AMD-V or inside the lab (see main.rs).

use std::time::Duration;

use anyhow::Result;
use crib_tests::{run_crib, GuestArtifacts, RunOutput};

use crate::TestFn;

/// Generous: an L2 boot takes seconds in the lab, and the lab's speed varies by 15%+.
const DEADLINE: Duration = Duration::from_secs(180);
const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![
        (
            "linux_elf_boots_to_cradle_and_runs_command",
            elf_boots_to_cradle_and_runs_command,
        ),
        ("linux_bzimage_boots_to_cradle", bzimage_boots_to_cradle),
        ("linux_two_cpus_are_online", two_cpus_are_online),
        (
            "linux_command_exit_status_is_reported",
            command_exit_status_is_reported,
        ),
        ("linux_guest_reboot_exits_zero", guest_reboot_exits_zero),
        (
            "linux_kernel_panic_exits_with_panic_code",
            kernel_panic_exits_with_panic_code,
        ),
        (
            "linux_panic_before_init_is_reported",
            panic_before_init_is_reported,
        ),
        (
            "linux_pod_kernel_boots_with_everything_built_in",
            pod_kernel_boots_with_everything_built_in,
        ),
        ("linux_pod_kernel_bzimage_boots", pod_kernel_bzimage_boots),
        (
            "linux_pod_kernel_panic_exits_with_panic_code",
            pod_kernel_panic_exits_with_panic_code,
        ),
    ]
}

/// Boots `kernel` (Debian's) with its initramfs, running `command` through cradle's test
/// hook.
fn boot(kernel: &std::path::Path, cpus: u32, command: &str) -> Result<RunOutput> {
    boot_with(&GuestArtifacts::find()?, kernel, cpus, command)
}

/// Boots `kernel` with `artifacts`' initramfs, running `command` through the test hook.
fn boot_with(
    artifacts: &GuestArtifacts,
    kernel: &std::path::Path,
    cpus: u32,
    command: &str,
) -> Result<RunOutput> {
    let cmdline = format!("{BASE_CMDLINE} -- /bin/sh -c \"{command}\"");
    let cpus = cpus.to_string();
    let args = [
        "run".as_ref(),
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--initrd".as_ref(),
        artifacts.initramfs.as_os_str(),
        "--cpus".as_ref(),
        cpus.as_ref(),
        "--memory".as_ref(),
        "512M".as_ref(),
        "--cmdline".as_ref(),
        cmdline.as_ref(),
    ];
    run_crib(&args, DEADLINE)
}

fn vmlinux() -> Result<std::path::PathBuf> {
    Ok(GuestArtifacts::find()?.vmlinux)
}

/// The guest reached cradle, ran the command, reported its status and powered off.
fn expect_clean_run(out: &RunOutput, status: i32) -> Result<()> {
    out.check(
        out.stdout.contains("cradle: ready"),
        "cradle printed its ready line",
    )?;
    out.check(
        out.stdout
            .contains(&format!("cradle: command exited with status {status}")),
        &format!("cradle reported status {status}"),
    )?;
    out.check(
        out.code == Some(0),
        "crib exit code 0 after the guest powered off",
    )?;
    out.check(
        out.stderr.contains("guest powered off"),
        "crib logged the poweroff",
    )?;
    out.check(
        out.stderr.contains("guest boot to init: "),
        "crib timed the boot to init",
    )
}

fn elf_boots_to_cradle_and_runs_command() -> Result<()> {
    let out = boot(&vmlinux()?, 1, "echo hello-from-the-guest; uname -r")?;
    out.check(
        out.stdout.contains("hello-from-the-guest"),
        "the command's output",
    )?;
    out.check(
        out.stdout.contains("cloud-amd64"),
        "uname -r names the Debian cloud kernel",
    )?;
    expect_clean_run(&out, 0)
}

fn bzimage_boots_to_cradle() -> Result<()> {
    let out = boot(
        &GuestArtifacts::find()?.bzimage,
        1,
        "echo booted-from-bzimage",
    )?;
    out.check(
        out.stdout.contains("booted-from-bzimage"),
        "the command's output",
    )?;
    expect_clean_run(&out, 0)
}

fn two_cpus_are_online() -> Result<()> {
    let out = boot(
        &vmlinux()?,
        2,
        "echo cpus=$(grep -c ^processor /proc/cpuinfo)",
    )?;
    out.check(out.stdout.contains("cpus=2"), "/proc/cpuinfo lists 2 CPUs")?;
    expect_clean_run(&out, 0)
}

fn command_exit_status_is_reported() -> Result<()> {
    let out = boot(&vmlinux()?, 1, "exit 3")?;
    expect_clean_run(&out, 3)
}

fn guest_reboot_exits_zero() -> Result<()> {
    let out = boot(&vmlinux()?, 1, "reboot -f")?;
    out.check(out.code == Some(0), "crib exit code 0")?;
    out.check(
        out.stderr.contains("guest rebooted"),
        "crib logged the reboot",
    )
}

fn kernel_panic_exits_with_panic_code() -> Result<()> {
    let out = boot(&vmlinux()?, 1, "echo c > /proc/sysrq-trigger")?;
    out.check(out.code == Some(3), "crib exit code 3 (guest panic)")?;
    out.check(
        out.stderr.contains("guest kernel panicked"),
        "crib says the kernel panicked",
    )
}

fn panic_before_init_is_reported() -> Result<()> {
    // No initramfs and no root device: the kernel panics before any init runs. The pod
    // kernel has pvpanic built in, so its panic notifier tells crib (the console's text
    // does not count: a pod process could print it).
    let kernel = GuestArtifacts::pod()?.vmlinux;
    let args = [
        "run".as_ref(),
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--cmdline".as_ref(),
        BASE_CMDLINE.as_ref(),
    ];
    let out = run_crib(&args, DEADLINE)?;
    out.check(out.code == Some(3), "crib exit code 3 (guest panic)")?;
    out.check(
        out.stdout.contains("Kernel panic"),
        "the panic is on the console",
    )
}

/// What a pod needs, checked from inside a guest of crib's pod kernel: the drivers of every
/// crib device bound without modules, the filesystems, cgroup v2 and namespaces.
fn pod_kernel_boots_with_everything_built_in() -> Result<()> {
    let pod = GuestArtifacts::pod()?;
    let command = "echo kernel=$(uname -r); echo cpus=$(grep -c ^processor /proc/cpuinfo); \
        echo drivers: $(ls /sys/bus/virtio/drivers /sys/bus/pci/drivers | sort | tr '\\n' ' ') .; \
        echo fs: $(cut -f2 /proc/filesystems | sort | tr '\\n' ' ') .; \
        ls /lib/modules 2>/dev/null || echo no-modules-dir; \
        ls /proc/self/ns | tr '\\n' ' '; echo; \
        mkdir -p /tmp/cg && mount -t cgroup2 none /tmp/cg && echo cgroup2: $(cat /tmp/cg/cgroup.controllers)";
    let out = boot_with(&pod, &pod.vmlinux, 2, command)?;
    out.check(
        !out.stdout.contains("cloud-amd64") && out.stdout.contains("kernel="),
        "uname -r names the pod kernel, not Debian's",
    )?;
    out.check(out.stdout.contains("cpus=2"), "2 CPUs online")?;
    out.check(out.stdout.contains("no-modules-dir"), "no modules shipped")?;
    for driver in [
        "virtio_blk",
        "virtio_net",
        "vmw_vsock_virtio_transport",
        "virtiofs",
        "virtio-pci",
        "nvme",
        "virtio_rng",
    ] {
        out.check(
            out.stdout.contains(&format!(" {driver} ")),
            &format!("driver {driver} is built in"),
        )?;
    }
    for fs in [
        "ext4", "xfs", "overlay", "fuse", "virtiofs", "cgroup2", "tmpfs",
    ] {
        out.check(
            out.stdout.contains(&format!(" {fs} ")),
            &format!("filesystem {fs} is built in"),
        )?;
    }
    for ns in ["ipc", "mnt", "net", "pid", "user", "uts"] {
        out.check(
            out.stdout.contains(&format!("{ns} ")),
            &format!("namespace {ns}"),
        )?;
    }
    out.check(
        out.stdout.contains("cgroup2: ") && out.stdout.contains("memory"),
        "cgroup v2 with the memory controller",
    )?;
    expect_clean_run(&out, 0)
}

fn pod_kernel_bzimage_boots() -> Result<()> {
    let pod = GuestArtifacts::pod()?;
    let out = boot_with(&pod, &pod.bzimage, 1, "echo booted-from-bzimage")?;
    out.check(
        out.stdout.contains("booted-from-bzimage"),
        "the command's output",
    )?;
    expect_clean_run(&out, 0)
}

fn pod_kernel_panic_exits_with_panic_code() -> Result<()> {
    let pod = GuestArtifacts::pod()?;
    let out = boot_with(&pod, &pod.vmlinux, 1, "echo c > /proc/sysrq-trigger")?;
    out.check(out.code == Some(3), "crib exit code 3 (guest panic)")?;
    out.check(
        out.stderr.contains("guest kernel panicked"),
        "crib says the kernel panicked",
    )
}
