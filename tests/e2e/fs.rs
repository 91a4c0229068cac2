//! virtio-fs against the real virtiofsd on crib's pod kernel (virtiofs built in): the
//! guest mounts the tag, reads a host file and writes one the host then sees; killing the
//! daemon mid-run gives the guest errors while crib keeps running and exits normally.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crib_tests::{run_crib, run_crib_while, target_dir, GuestArtifacts, RunOutput};

use crate::TestFn;

const DEADLINE: Duration = Duration::from_secs(240);
const TAG: &str = "gfs";

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![
        ("linux_fs_dir_share_both_ways", dir_share_both_ways),
        (
            "linux_fs_killed_virtiofsd_gives_guest_errors_crib_survives",
            killed_virtiofsd_gives_guest_errors_crib_survives,
        ),
    ]
}

fn scratch(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("crib-fs-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("share"))?;
    Ok(dir)
}

fn virtiofsd() -> PathBuf {
    std::env::var_os("CRIB_VIRTIOFSD")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("tools/bin/virtiofsd"))
}

/// The pod kernel running `command` (sh) with `fs` as the --fs option.
fn args(fs: &str, command: &str) -> Result<Vec<String>> {
    let pod = GuestArtifacts::pod()?;
    Ok(vec![
        "run".into(),
        "--kernel".into(),
        pod.vmlinux.display().to_string(),
        "--initrd".into(),
        pod.initramfs.display().to_string(),
        "--memory".into(),
        "512M".into(),
        "--fs".into(),
        fs.into(),
        "--cmdline".into(),
        format!(
            "console=ttyS0 panic=-1 quiet -- /bin/sh -c \"mkdir -p /mnt/{TAG} && \
             mount -t virtiofs {TAG} /mnt/{TAG} && echo mounted && {command}\""
        ),
    ])
}

fn dir_share_both_ways() -> Result<()> {
    let dir = scratch("both")?;
    let share = dir.join("share");
    std::fs::write(share.join("from-host.txt"), "hello-from-host\n")?;
    let command = format!(
        "cat /mnt/{TAG}/from-host.txt && echo hello-from-guest > /mnt/{TAG}/from-guest.txt && \
         mkdir /mnt/{TAG}/d && mv /mnt/{TAG}/from-guest.txt /mnt/{TAG}/d/renamed.txt && \
         umount /mnt/{TAG} && echo guest-done"
    );
    // The lab runs as root: virtiofsd's namespace sandbox needs nothing more.
    let out = run_crib(
        &args(&format!("tag={TAG},dir={}", share.display()), &command)?,
        DEADLINE,
    )?;
    let written = std::fs::read_to_string(share.join("d/renamed.txt")).unwrap_or_default();
    std::fs::remove_dir_all(&dir)?;
    out.check(out.stdout.contains("mounted"), "the guest mounted the tag")?;
    out.check(
        out.stdout.contains("hello-from-host"),
        "the guest read the host's file",
    )?;
    out.check(
        out.stdout.contains("guest-done"),
        "the guest's commands succeeded",
    )?;
    out.check(
        written == "hello-from-guest\n",
        "the host sees the guest's file, renamed",
    )?;
    out.check(out.code == Some(0), "crib exits 0")
        .context("virtio-fs share both ways")
}

fn wait_for(path: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn killed_virtiofsd_gives_guest_errors_crib_survives() -> Result<()> {
    let dir = scratch("kill")?;
    let share = dir.join("share");
    let socket = dir.join("fs.sock");
    std::fs::write(share.join("probe"), "probe\n")?;
    let mut daemon = Command::new(virtiofsd())
        .arg(format!("--socket-path={}", socket.display()))
        .arg(format!("--shared-dir={}", share.display()))
        .arg("--sandbox=none")
        .arg("--cache=never")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start virtiofsd (scripts/install-virtiofsd.sh)")?;
    wait_for(&socket, Duration::from_secs(10))?;
    // The guest reads until the mount fails, then reports and powers off.
    let command = format!(
        "touch /mnt/{TAG}/ready && \
         while cat /mnt/{TAG}/probe > /dev/null; do sleep 0.2; done; echo fs-error-seen"
    );
    let ready = share.join("ready");
    let mut daemon_for_kill = None;
    let out: RunOutput = run_crib_while(
        &args(&format!("tag={TAG},socket={}", socket.display()), &command)?,
        DEADLINE,
        || {
            wait_for(&ready, Duration::from_secs(150))?;
            daemon.kill()?;
            daemon_for_kill = Some(daemon.wait()?);
            Ok(())
        },
    )?;
    std::fs::remove_dir_all(&dir)?;
    out.check(daemon_for_kill.is_some(), "virtiofsd was killed mid-run")?;
    out.check(
        out.stdout.contains("fs-error-seen"),
        "the guest saw errors on the mount",
    )?;
    out.check(
        out.stderr.contains("lost the vhost-user backend"),
        "crib logged the backend loss",
    )?;
    out.check(out.code == Some(0), "crib survived and exits 0")
        .context("virtio-fs backend loss")
}
