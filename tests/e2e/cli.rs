//! Bad input: each a clear error naming the problem, a non-zero exit, no panic.

use std::time::Duration;

use anyhow::Result;
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
