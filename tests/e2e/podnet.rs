//! Pod networking end to end (docs/NETWORK.md): `tests/e2e/scripts/podnet.sh` in L1
//! runs pods on crib's bridge and checks HTTP from L1 at the pod's address and at a
//! published port (127.0.0.1, L1's own address, another "host" namespace, IPv4 and
//! IPv6), pod to L1 and to a "remote" namespace through NAT, pod to pod, DNS against a
//! dnsmasq of its own, resolv.conf/hosts/MTU/hostname in the pod, a refused published
//! port, `kill -9` cleanup, ten pods at once with ten addresses, and that nothing (tap,
//! nft chain or map element, lease) is left afterwards. One script, so one set of pods
//! serves every check.

use std::process::Command;

use anyhow::{Context, Result};
use crib_tests::{crib_bin, repo_root, GuestArtifacts};

use crate::TestFn;

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![
        ("linux_net_pod_end_to_end", end_to_end),
        ("linux_net_pod_host_side", host_side),
        ("linux_net_attach_host_side", attach_host_side),
        ("linux_net_attach_end_to_end", attach_end_to_end),
    ]
}

fn end_to_end() -> Result<()> {
    GuestArtifacts::pod()?;
    run_script("tests/e2e/scripts/podnet.sh", &[])
}

/// Attach mode with a real pod in a namespace playing CNI's (`ip netns exec cni-test crib
/// pod run` with `"network": {"attach": "eth0"}`): tests/e2e/scripts/podnet-attach.sh.
fn attach_end_to_end() -> Result<()> {
    GuestArtifacts::pod()?;
    run_script("tests/e2e/scripts/podnet-attach.sh", &[])
}

/// The host side alone, a network namespace standing in for the pod (root):
/// tests/e2e/scripts/podnet-host.sh. The pod's VM runs a guest that only halts, so crib
/// holds the pod's network for as long as the script needs it.
fn host_side() -> Result<()> {
    with_halting_guest("tests/e2e/scripts/podnet-host.sh")
}

/// Attach mode's host side (`"network": {"attach": "eth0"}` in a namespace standing in
/// for CNI's), the guest only halting: tests/e2e/scripts/podnet-attach-host.sh.
fn attach_host_side() -> Result<()> {
    with_halting_guest("tests/e2e/scripts/podnet-attach-host.sh")
}

/// Runs `script` with `CRIB_TEST_KERNEL` a guest that only halts.
fn with_halting_guest(script: &str) -> Result<()> {
    let kernel = std::env::temp_dir().join(format!("crib-podnet-halt-{}.elf", std::process::id()));
    std::fs::write(
        &kernel,
        crib_tests::micro::elf(&crib_tests::micro::halt_forever()),
    )?;
    let result = run_script(script, &[("CRIB_TEST_KERNEL", kernel.as_os_str())]);
    let _ = std::fs::remove_file(&kernel);
    result
}

fn run_script(path: &str, env: &[(&str, &std::ffi::OsStr)]) -> Result<()> {
    let script = repo_root().join(path);
    let out = Command::new("bash")
        .arg(&script)
        .envs(env.iter().copied())
        .env("CRIB", crib_bin())
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    anyhow::ensure!(
        out.status.success() && !stdout.contains("FAIL "),
        "{} failed:\n{stdout}{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
