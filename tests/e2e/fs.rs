//! virtio-fs against the real virtiofsd on crib's pod kernel (virtiofs built in): the
//! guest mounts the tag, reads a host file and writes one the host then sees; killing the
//! daemon mid-run gives the guest errors while crib keeps running and exits normally.
//! Pods mount their tags through the pod spec's `filesystems` (cradle): two pods at once
//! share one host directory, a 100 MiB file round-trips, file operations show on the
//! host, a read-only mount refuses writes, and a tag no device has is a clear error.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crib_tests::{host_tool, run_crib, run_crib_while, target_dir, GuestArtifacts, RunOutput};

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
        (
            "linux_fs_two_pods_share_a_dir_100mib_round_trip_and_file_ops",
            two_pods_share_a_dir_100mib_round_trip_and_file_ops,
        ),
        (
            "linux_fs_pod_readonly_mount_refuses_writes",
            pod_readonly_mount_refuses_writes,
        ),
        (
            "linux_fs_pod_missing_tag_is_a_clear_error",
            pod_missing_tag_is_a_clear_error,
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

/// Size of the round-tripped file.
const BIG_BYTES: usize = 100 << 20;

/// The pod kernel with pod spec `spec` (written to `<dir>/<name>.json`), `--fs` option
/// `fs` and `command` (sh) as the test hook.
fn pod_args(dir: &Path, name: &str, spec: &str, fs: &str, command: &str) -> Result<Vec<String>> {
    let pod = GuestArtifacts::pod()?;
    let spec_path = dir.join(format!("{name}.json"));
    std::fs::write(&spec_path, spec)?;
    Ok(vec![
        "run".into(),
        "--kernel".into(),
        pod.vmlinux.display().to_string(),
        "--initrd".into(),
        pod.initramfs.display().to_string(),
        "--memory".into(),
        "512M".into(),
        "--pod".into(),
        spec_path.display().to_string(),
        "--fs".into(),
        fs.into(),
        "--cmdline".into(),
        format!("console=ttyS0 panic=-1 quiet -- /bin/sh -c \"{command}\""),
    ])
}

/// A pod spec mounting tag gfs at /shared.
fn shared_spec(name: &str) -> String {
    format!(r#"{{"name": "{name}", "filesystems": [{{"tag": "{TAG}", "path": "/shared"}}]}}"#)
}

/// Pseudo-random bytes (xorshift), so a misplaced block changes the hash.
fn noise(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

fn sha256(path: &Path) -> Result<String> {
    let out = host_tool("sha256sum", &[&path.display().to_string()])?;
    out.split_whitespace()
        .next()
        .map(str::to_owned)
        .context("sha256sum printed nothing")
}

/// Waits (in the guest) up to 150 s for `file` to appear.
fn guest_wait(file: &str) -> String {
    format!(
        "i=0; while [ ! -e {file} ]; do i=$((i+1)); \
         if [ $i -gt 1500 ]; then echo never-appeared: {file}; exit 1; fi; sleep 0.1; done"
    )
}

/// Pod A writes a file, waits for pod B's answer (both running at once, each with its own
/// crib and virtiofsd on the same host directory), then copies a 100 MiB host file into
/// guest RAM and back, and does mkdir/rename/unlink/symlink/chmod, all checked on the host.
fn two_pods_share_a_dir_100mib_round_trip_and_file_ops() -> Result<()> {
    let dir = scratch("two-pods")?;
    let share = dir.join("share");
    let big = share.join("big.bin");
    std::fs::write(&big, noise(BIG_BYTES))?;
    let big_sha = sha256(&big)?;
    // Scripts in the share keep the kernel command line short. Files appear by rename,
    // so the other pod never reads a half-written one.
    let script_a = [
        "set -e".to_string(),
        "echo from-pod-a > /shared/a.tmp && mv /shared/a.tmp /shared/a.txt".into(),
        guest_wait("/shared/b.txt"),
        "echo a-read-b: $(cat /shared/b.txt)".into(),
        "cp /shared/big.bin /tmp/big.bin".into(),
        "echo guest-sha256: $(sha256sum /tmp/big.bin)".into(),
        "cp /tmp/big.bin /shared/back.bin && rm /tmp/big.bin".into(),
        "mkdir /shared/ops /shared/ops/dir".into(),
        "echo content > /shared/ops/f".into(),
        "mv /shared/ops/f /shared/ops/dir/g".into(),
        "ln -s dir/g /shared/ops/link".into(),
        "chmod 640 /shared/ops/dir/g".into(),
        "echo doomed > /shared/ops/gone && rm /shared/ops/gone".into(),
        "mkdir /shared/ops/empty && rmdir /shared/ops/empty".into(),
        "echo via-link: $(cat /shared/ops/link)".into(),
        "echo pod-a-done".into(),
    ]
    .join("\n");
    let script_b = [
        "set -e".to_string(),
        guest_wait("/shared/a.txt"),
        "echo b-read-a: $(cat /shared/a.txt)".into(),
        "echo from-pod-b-after-$(cat /shared/a.txt) > /shared/b.tmp && mv /shared/b.tmp /shared/b.txt"
            .into(),
        "echo pod-b-done".into(),
    ]
    .join("\n");
    std::fs::write(share.join("a.sh"), script_a + "\n")?;
    std::fs::write(share.join("b.sh"), script_b + "\n")?;
    let fs = format!("tag={TAG},dir={}", share.display());
    let args_a = pod_args(&dir, "pod-a", &shared_spec("pod-a"), &fs, "sh /shared/a.sh")?;
    let args_b = pod_args(&dir, "pod-b", &shared_spec("pod-b"), &fs, "sh /shared/b.sh")?;

    let mut out_b = None;
    let out_a = run_crib_while(&args_a, DEADLINE, || {
        out_b = Some(run_crib(&args_b, DEADLINE)?);
        Ok(())
    })?;
    let out_b = out_b.context("pod B did not run")?;

    let host_a = std::fs::read_to_string(share.join("a.txt")).unwrap_or_default();
    let host_b = std::fs::read_to_string(share.join("b.txt")).unwrap_or_default();
    let back_sha = sha256(&share.join("back.bin")).unwrap_or_default();
    let ops = share.join("ops");
    let g = std::fs::read_to_string(ops.join("dir/g")).unwrap_or_default();
    let g_mode = std::fs::metadata(ops.join("dir/g"))
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap_or(0);
    let link = std::fs::read_link(ops.join("link")).unwrap_or_default();
    let gone = ops.join("gone").exists() || ops.join("f").exists() || ops.join("empty").exists();
    std::fs::remove_dir_all(&dir)?;

    for (out, pod) in [(&out_a, "pod-a"), (&out_b, "pod-b")] {
        out.check(
            out.stdout
                .contains("cradle: filesystem gfs -> /shared (virtiofs, rw)"),
            &format!("{pod}: cradle mounted the tag from the pod spec"),
        )?;
        out.check(out.code == Some(0), &format!("{pod}: crib exits 0"))?;
    }
    out_b.check(
        out_b.stdout.contains("b-read-a: from-pod-a"),
        "pod B read pod A's file",
    )?;
    out_b.check(out_b.stdout.contains("pod-b-done"), "pod B finished")?;
    out_a.check(
        out_a
            .stdout
            .contains("a-read-b: from-pod-b-after-from-pod-a"),
        "pod A read pod B's answer",
    )?;
    out_a.check(
        host_a == "from-pod-a\n" && host_b == "from-pod-b-after-from-pod-a\n",
        "the host sees both pods' files",
    )?;
    out_a.check(
        out_a.stdout.contains(&format!("guest-sha256: {big_sha}")),
        "the guest's copy of the 100 MiB file has the host's sha256",
    )?;
    out_a.check(
        back_sha == big_sha,
        "the 100 MiB file copied back to the host has the same sha256",
    )?;
    out_a.check(
        out_a.stdout.contains("via-link: content"),
        "the guest reads through its symlink",
    )?;
    out_a.check(g == "content\n", "the host sees the renamed file")?;
    out_a.check(
        g_mode == 0o640,
        &format!("the host sees chmod 640 (mode {g_mode:o})"),
    )?;
    out_a.check(
        link == Path::new("dir/g"),
        &format!("the host sees the symlink to dir/g ({})", link.display()),
    )?;
    out_a.check(
        !gone,
        "the unlinked file, the rename's source and the removed directory are gone",
    )?;
    out_a
        .check(out_a.stdout.contains("pod-a-done"), "pod A finished")
        .context("two pods on one virtio-fs directory")
}

/// `"readonly": true`: the guest reads the share but every write fails with EROFS.
fn pod_readonly_mount_refuses_writes() -> Result<()> {
    let dir = scratch("readonly")?;
    let share = dir.join("share");
    std::fs::write(share.join("ro.txt"), "read-only-content\n")?;
    let spec = format!(
        r#"{{"name": "ro", "filesystems": [{{"tag": "{TAG}", "path": "/ro", "readonly": true}}]}}"#
    );
    let command = "cat /ro/ro.txt; \
         if echo x > /ro/new.txt; then echo create-succeeded; fi; \
         if echo x >> /ro/ro.txt; then echo append-succeeded; fi; \
         if mkdir /ro/d; then echo mkdir-succeeded; fi; \
         if rm -f /ro/ro.txt; then echo unlink-succeeded; fi; echo ro-done";
    let args = pod_args(
        &dir,
        "ro",
        &spec,
        &format!("tag={TAG},dir={}", share.display()),
        command,
    )?;
    let out = run_crib(&args, DEADLINE)?;
    let content = std::fs::read_to_string(share.join("ro.txt")).unwrap_or_default();
    let created = share.join("new.txt").exists() || share.join("d").exists();
    std::fs::remove_dir_all(&dir)?;
    out.check(
        out.stdout
            .contains("cradle: filesystem gfs -> /ro (virtiofs, ro)"),
        "cradle mounted the tag read-only",
    )?;
    out.check(
        out.stdout.contains("read-only-content"),
        "the guest reads the share",
    )?;
    out.check(
        out.stdout.contains("Read-only file system"),
        "the guest's writes fail with EROFS",
    )?;
    out.check(
        !out.stdout.contains("-succeeded"),
        "no write succeeded in the guest",
    )?;
    out.check(out.stdout.contains("ro-done"), "the guest finished")?;
    out.check(
        content == "read-only-content\n" && !created,
        "the host directory is unchanged",
    )?;
    out.check(out.code == Some(0), "crib exits 0")
        .context("read-only virtio-fs mount")
}

/// A spec naming a tag no `--fs` gave: cradle says which tag and how to attach it, and
/// the pod does not start.
fn pod_missing_tag_is_a_clear_error() -> Result<()> {
    let dir = scratch("missing-tag")?;
    let share = dir.join("share");
    let spec = r#"{"name": "missing", "filesystems": [{"tag": "nosuch", "path": "/x"}]}"#;
    let args = pod_args(
        &dir,
        "missing",
        spec,
        &format!("tag={TAG},dir={}", share.display()),
        "echo hook-ran",
    )?;
    let out = run_crib(&args, DEADLINE)?;
    std::fs::remove_dir_all(&dir)?;
    out.check(
        out.stdout.contains(
            "cradle: error: cannot mount the pod's filesystems: filesystem nosuch: \
             no virtio-fs device has the tag \"nosuch\"; attach one with crib run \
             --fs tag=nosuch,dir=HOSTDIR",
        ),
        "cradle names the missing tag and the fix",
    )?;
    out.check(
        !out.stdout.contains("hook-ran"),
        "nothing runs after the failed mount",
    )
    .context("missing virtio-fs tag")
}
