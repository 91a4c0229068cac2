//! crib's end-to-end tests (a libtest-compatible harness, `harness = false`).
//!
//! - `cli_*`: bad input; no KVM needed.
//! - `micro_*`: hand-assembled micro guests on /dev/kvm; fast even on an emulating KVM.
//! - `linux_*`: Debian's cloud kernel booting cradle. They need a KVM that runs guests at
//!   speed: on a host without VT-x/AMD-V this binary re-runs itself inside the lab
//!   (tests/lab/lab.sh), one L1 boot for all of them.

mod api;
mod cli;
mod disk;
mod docker;
mod fs;
mod linux;
mod micro;
mod pod;
mod vsock;

use std::path::Path;
use std::process::Command;

use crib_tests::{can_boot_linux, in_lab, repo_root};
use libtest_mimic::{Arguments, Trial};

/// A test: its name and body.
pub type TestFn = fn() -> anyhow::Result<()>;

fn trial(name: &'static str, body: TestFn) -> Trial {
    Trial::test(name, move || body().map_err(|e| format!("{e:?}").into()))
}

fn kvm_available() -> bool {
    Path::new("/dev/kvm").exists()
}

/// Runs the `linux_*` tests of this binary inside the lab; returns its exit code.
fn run_in_lab(args: &Arguments) -> i32 {
    let lab = repo_root().join("tests/lab/lab.sh");
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("e2e: cannot find this test binary: {e}");
            return 1;
        }
    };
    let mut inner = vec![String::from("linux_")];
    if let Some(filter) = &args.filter {
        inner = vec![filter.clone()];
    }
    if args.exact {
        inner.push("--exact".into());
    }
    inner.extend(["--test-threads".into(), "1".into()]);
    if args.nocapture {
        inner.push("--nocapture".into());
    }
    println!("\nrunning the linux_* tests inside the lab (no VT-x/AMD-V on this host)");
    let mut lab_args: Vec<String> = Vec::new();
    // A crib binary chosen by the caller must be the one tested inside the lab too.
    if std::env::var_os("CRIB_BIN").is_some() {
        lab_args.extend(["--env".into(), "CRIB_BIN".into()]);
    }
    let status = Command::new("bash")
        .arg(lab)
        .args(lab_args)
        .arg("--")
        .arg(exe)
        .args(inner)
        .env("CRIB_IN_LAB", "1")
        .status();
    match status {
        Ok(status) => status.code().unwrap_or(1),
        Err(e) => {
            eprintln!("e2e: cannot start the lab: {e}");
            1
        }
    }
}

/// Builds the crib binary under test, as `cargo test` does not build other packages'
/// binaries. Inside the lab the caller has built it already (and cargo may be absent).
fn build_crib() -> Result<(), String> {
    if in_lab() || std::env::var_os("CRIB_BIN").is_some() {
        return Ok(());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "-p", "vmm", "--bin", "crib"])
        .current_dir(repo_root())
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("cargo build -p vmm failed: {status}"))
}

fn main() {
    let mut args = Arguments::from_args();
    if !args.list {
        if let Err(e) = build_crib() {
            eprintln!("e2e: {e}");
            std::process::exit(1);
        }
    }
    let direct = can_boot_linux();
    let mut trials: Vec<Trial> = cli::tests().into_iter().map(|(n, f)| trial(n, f)).collect();
    trials.extend(
        micro::tests()
            .into_iter()
            .map(|(n, f)| trial(n, f).with_ignored_flag(!kvm_available())),
    );
    let linux: Vec<Trial> = linux::tests()
        .into_iter()
        .chain(disk::tests())
        .chain(disk::pod_tests())
        .chain(disk::fio_tests())
        .chain(vsock::tests())
        .chain(docker::tests())
        .chain(fs::tests())
        .chain(pod::tests())
        .chain(api::tests())
        .map(|(n, f)| trial(n, f))
        .collect();
    let linux_selected = linux
        .iter()
        .any(|t| args.filter.as_deref().is_none_or(|f| t.name().contains(f)));
    if direct {
        trials.extend(linux);
    } else if args.list {
        trials.extend(linux.into_iter().map(|t| t.with_ignored_flag(true)));
    }
    if in_lab() {
        // One L2 guest at a time: L1 has two emulated CPUs.
        args.test_threads = Some(1);
    }
    let conclusion = libtest_mimic::run(&args, trials);
    let mut code = i32::from(conclusion.has_failed());
    if !direct && !args.list && linux_selected {
        let lab_code = run_in_lab(&args);
        if code == 0 {
            code = lab_code;
        }
    }
    std::process::exit(code);
}
