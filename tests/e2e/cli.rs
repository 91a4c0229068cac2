//! Bad input: each a clear error naming the problem, a non-zero exit, no panic.

use std::time::Duration;

use anyhow::Result;
use crib_tests::micro::{elf, halt_forever};
use crib_tests::{run_crib, RunOutput};

use crate::TestFn;

const DEADLINE: Duration = Duration::from_secs(30);

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![
        ("cli_missing_kernel_is_an_error", missing_kernel_is_an_error),
        (
            "cli_non_kernel_file_is_an_error",
            non_kernel_file_is_an_error,
        ),
        (
            "cli_memory_too_small_for_initrd_is_an_error",
            memory_too_small_for_initrd_is_an_error,
        ),
        (
            "cli_cmdline_too_long_is_an_error",
            cmdline_too_long_is_an_error,
        ),
        ("cli_zero_cpus_is_an_error", zero_cpus_is_an_error),
        (
            "cli_bad_memory_size_is_an_error",
            bad_memory_size_is_an_error,
        ),
        (
            "cli_config_file_with_flags_is_refused",
            config_file_with_flags_is_refused,
        ),
        (
            "cli_config_file_unknown_field_is_named",
            config_file_unknown_field_is_named,
        ),
        ("cli_config_print_round_trips", config_print_round_trips),
        (
            "cli_fs_missing_socket_is_an_error",
            fs_missing_socket_is_an_error,
        ),
        (
            "cli_fs_tag_longer_than_36_bytes_is_an_error",
            fs_tag_longer_than_36_bytes_is_an_error,
        ),
        (
            "cli_pod_volume_without_disk_is_refused",
            pod_volume_without_disk_is_refused,
        ),
        (
            "cli_pod_bad_network_names_the_field",
            pod_bad_network_names_the_field,
        ),
        (
            "cli_pod_launch_file_unknown_field_is_named",
            pod_launch_file_unknown_field_is_named,
        ),
        (
            "cli_pod_missing_kernel_says_where_it_looked",
            pod_missing_kernel_says_where_it_looked,
        ),
        (
            "cli_pod_ls_stop_logs_without_pods",
            pod_ls_stop_logs_without_pods,
        ),
    ]
}

fn temp_file(name: &str, bytes: &[u8]) -> Result<std::path::PathBuf> {
    let path = std::env::temp_dir().join(format!("crib-e2e-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes)?;
    Ok(path)
}

/// Exit code 1, the expected text on stderr, and no Rust panic.
fn expect_error(out: &RunOutput, text: &str) -> Result<()> {
    out.check(out.code == Some(1), "crib should exit with 1")?;
    out.check(
        out.stderr.contains(text),
        &format!("stderr should say '{text}'"),
    )?;
    out.check(!out.stderr.contains("panicked"), "crib must not panic")
}

fn missing_kernel_is_an_error() -> Result<()> {
    let out = run_crib(&["run", "--kernel", "/nonexistent/vmlinux"], DEADLINE)?;
    expect_error(&out, "cannot open kernel /nonexistent/vmlinux")
}

fn non_kernel_file_is_an_error() -> Result<()> {
    let path = temp_file("notakernel", &[0x42; 8192])?;
    let out = run_crib(
        &["run".as_ref(), "--kernel".as_ref(), path.as_os_str()],
        DEADLINE,
    )?;
    std::fs::remove_file(&path)?;
    expect_error(&out, "not a kernel")
}

fn memory_too_small_for_initrd_is_an_error() -> Result<()> {
    let kernel = temp_file(
        "tiny-kernel",
        &crib_tests::micro::elf(&crib_tests::micro::halt_forever()),
    )?;
    let initrd = temp_file("big-initrd", &vec![0u8; 20 << 20])?;
    let out = run_crib(
        &[
            "run".as_ref(),
            "--kernel".as_ref(),
            kernel.as_os_str(),
            "--initrd".as_ref(),
            initrd.as_os_str(),
            "--memory".as_ref(),
            "16M".as_ref(),
        ],
        DEADLINE,
    )?;
    std::fs::remove_file(&kernel)?;
    std::fs::remove_file(&initrd)?;
    expect_error(&out, "guest memory too small")?;
    expect_error(&out, "raise --memory")
}

fn cmdline_too_long_is_an_error() -> Result<()> {
    let kernel = temp_file(
        "tiny-kernel2",
        &crib_tests::micro::elf(&crib_tests::micro::halt_forever()),
    )?;
    let long = "a".repeat(4096);
    let out = run_crib(
        &[
            "run".as_ref(),
            "--kernel".as_ref(),
            kernel.as_os_str(),
            "--cmdline".as_ref(),
            long.as_ref(),
        ],
        DEADLINE,
    )?;
    std::fs::remove_file(&kernel)?;
    expect_error(&out, "shorten --cmdline")
}

fn zero_cpus_is_an_error() -> Result<()> {
    let out = run_crib(&["run", "--kernel", "/dev/null", "--cpus", "0"], DEADLINE)?;
    expect_error(&out, "--cpus must be between 1 and")
}

fn bad_memory_size_is_an_error() -> Result<()> {
    let out = run_crib(
        &["run", "--kernel", "/dev/null", "--memory", "lots"],
        DEADLINE,
    )?;
    expect_error(&out, "--memory 'lots' is not a size")
}

fn config_file_with_flags_is_refused() -> Result<()> {
    let out = run_crib(
        &["run", "--config", "/nonexistent.json", "--cpus", "2"],
        DEADLINE,
    )?;
    out.check(out.code == Some(2), "a usage error exits with 2")?;
    out.check(
        out.stderr
            .contains("'--config <FILE>' cannot be used with '--cpus <N>'"),
        "says the flags conflict",
    )
}

fn config_file_unknown_field_is_named() -> Result<()> {
    let path = temp_file(
        "unknown.json",
        br#"{"kernel": "/k", "disks": [{"path": "/d", "id": "a", "iops": "lots"}]}"#,
    )?;
    let out = run_crib(
        &["run".as_ref(), "--config".as_ref(), path.as_os_str()],
        DEADLINE,
    )?;
    std::fs::remove_file(&path)?;
    expect_error(&out, "field disks[0].iops is invalid")?;
    expect_error(&out, "'lots' is not a size")
}

fn config_print_round_trips() -> Result<()> {
    let first = run_crib(
        &[
            "config",
            "--print",
            "--kernel",
            "/k",
            "--disk",
            "path=/d,id=data,iops=100,bandwidth=1M",
            "--vsock",
            "cid=3,socket=/v",
            "--memory",
            "1G",
        ],
        DEADLINE,
    )?;
    first.check(first.code == Some(0), "config --print exits 0")?;
    let path = temp_file("printed.json", first.stdout.as_bytes())?;
    let second = run_crib(
        &[
            "config".as_ref(),
            "--print".as_ref(),
            "--config".as_ref(),
            path.as_os_str(),
        ],
        DEADLINE,
    )?;
    std::fs::remove_file(&path)?;
    second.check(second.code == Some(0), "the printed config is accepted")?;
    second.check(
        second.stdout == first.stdout,
        "printing it again gives the same JSON",
    )
}

/// A valid kernel (a micro guest that never runs: the share fails first) and a socket
/// path nothing listens on.
fn fs_missing_socket_is_an_error() -> Result<()> {
    let kernel = temp_file("fs-kernel.elf", &elf(&halt_forever()))?;
    let socket = std::env::temp_dir().join(format!("crib-e2e-{}-absent.sock", std::process::id()));
    let out = run_crib(
        &[
            "run".as_ref(),
            "--kernel".as_ref(),
            kernel.as_os_str(),
            "--fs".as_ref(),
            format!("tag=gfs,socket={}", socket.display()).as_ref(),
        ],
        DEADLINE,
    )?;
    std::fs::remove_file(&kernel)?;
    expect_error(&out, "--fs tag=gfs")?;
    expect_error(
        &out,
        &format!(
            "cannot connect to the vhost-user-fs backend at {}: is virtiofsd running with --socket-path=",
            socket.display()
        ),
    )
}

/// Refused while parsing the options, before any file is opened.
fn fs_tag_longer_than_36_bytes_is_an_error() -> Result<()> {
    let tag = "t".repeat(37);
    let out = run_crib(
        &[
            "run",
            "--kernel",
            "/nonexistent/vmlinux",
            "--fs",
            &format!("tag={tag},socket=/nonexistent/fs.sock"),
        ],
        DEADLINE,
    )?;
    expect_error(
        &out,
        &format!("--fs 'tag={tag},socket=/nonexistent/fs.sock': tag:"),
    )?;
    expect_error(&out, "is 37 bytes; at most 36")
}

/// `crib pod run` with `launch` in a temp file, its run root a temp directory.
fn pod_run(name: &str, launch: &str) -> Result<RunOutput> {
    let path = temp_file(name, launch.as_bytes())?;
    let root = std::env::temp_dir().join(format!("crib-e2e-{}-root-{name}", std::process::id()));
    let out = run_crib(
        &[
            "pod".as_ref(),
            "run".as_ref(),
            path.as_os_str(),
            "--run-root".as_ref(),
            root.as_os_str(),
        ],
        DEADLINE,
    )?;
    std::fs::remove_file(&path)?;
    let _ = std::fs::remove_dir_all(&root);
    Ok(out)
}

fn pod_volume_without_disk_is_refused() -> Result<()> {
    let out = pod_run(
        "pod-no-disk.json",
        r#"{"pod": {"name": "web", "volumes": [{"name": "data", "path": "/data"}]}}"#,
    )?;
    expect_error(
        &out,
        r#"pod.volumes[0] 'data' has no disk: add "disks": {"data": {"path": "IMAGE"}}"#,
    )
}

/// Bad network settings are refused before anything is set up (no root needed).
fn pod_bad_network_names_the_field() -> Result<()> {
    for (launch, message) in [
        (
            r#"{"pod": {"name": "web"}, "network": {"subnet": "10.88.0.0/33"}}"#,
            "network.subnet",
        ),
        (
            r#"{"pod": {"name": "web"}, "network": {"address": "192.0.2.9"}}"#,
            "pick a host address of network.subnet 10.88.0.0/16",
        ),
        (
            r#"{"pod": {"name": "web"}, "network": {"ports": ["8080:80/sctp"]}}"#,
            "network.ports[0]",
        ),
        (
            r#"{"pod": {"name": "web"}, "network": {"bridge": "a/b"}}"#,
            "network.bridge",
        ),
    ] {
        let out = pod_run("pod-bad-network.json", launch)?;
        expect_error(&out, message)?;
    }
    Ok(())
}

fn pod_launch_file_unknown_field_is_named() -> Result<()> {
    let out = pod_run(
        "pod-unknown.json",
        r#"{"pod": {"name": "web"}, "disks": {}, "shares": {"src": {"dir": "/s", "cache": "always"}}}"#,
    )?;
    expect_error(&out, "field shares.src.cache is invalid")?;
    expect_error(&out, "unknown field `cache`")?;
    let out = pod_run(
        "pod-bad-spec.json",
        r#"{"pod": {"name": "web", "processes": [{"name": "a", "argv": []}]}}"#,
    )?;
    expect_error(&out, "field pod is not a valid pod spec")?;
    expect_error(&out, "processes[0].argv is empty")
}

fn pod_missing_kernel_says_where_it_looked() -> Result<()> {
    let out = pod_run(
        "pod-no-kernel.json",
        r#"{"pod": {"name": "web"}, "kernel": "/nonexistent/vmlinux"}"#,
    )?;
    expect_error(&out, "kernel /nonexistent/vmlinux does not exist")?;
    expect_error(&out, "CRIB_GUEST_DIR")
}

fn pod_ls_stop_logs_without_pods() -> Result<()> {
    let root = std::env::temp_dir().join(format!("crib-e2e-{}-empty-root", std::process::id()));
    std::fs::create_dir_all(root.join("gone"))?;
    let root_arg = root.display().to_string();
    let ls = run_crib(&["pod", "ls", "--run-root", &root_arg], DEADLINE)?;
    ls.check(ls.code == Some(0), "pod ls exits 0")?;
    ls.check(
        ls.stdout.starts_with("NAME") && ls.stdout.lines().count() == 1,
        "pod ls shows only its header",
    )?;
    let stop = run_crib(&["pod", "stop", "gone", "--run-root", &root_arg], DEADLINE)?;
    expect_error(&stop, "pod gone is not running")?;
    let logs = run_crib(&["pod", "logs", "gone", "--run-root", &root_arg], DEADLINE)?;
    std::fs::remove_dir_all(&root)?;
    expect_error(&logs, "pod gone has no console log")
}
