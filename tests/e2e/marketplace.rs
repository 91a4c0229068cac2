//! A marketplace VM: the Debian bookworm image of scripts/build-marketplace-image.sh
//! (systemd, udev, sshd, systemd-networkd with 10.0.1.2/24) booted with its own kernel and
//! initrd from a sparse copy of the image, on a tap in a network namespace the test makes
//! (crib and the test's "host" side both run in it), with the API socket. The test waits
//! for sshd's banner over the tap, pings the guest, runs a command on the serial console
//! (root is logged in there), boots a pod beside it, then `PUT /api/v1/vm/shutdown`: crib
//! presses the ACPI power button (GED), systemd powers the guest off and crib exits 0.
//! Needs the image: scripts/prepare.sh builds it.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crib_tests::{
    api_request, host_tool, run_crib, strip_ansi, target_dir, GuestArtifacts, LiveCrib,
};

use crate::TestFn;

/// A systemd boot in the lab's nested guest is slow: give it minutes.
const BOOT_WAIT: Duration = Duration::from_secs(600);
const SHUTDOWN_TIMEOUT_S: u64 = 180;
const TAP: &str = "crmkt0";
const NETNS: &str = "crib-mkt";
const HOST_IP: &str = "10.0.1.1";
const GUEST_IP: &str = "10.0.1.2";

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![(
        "linux_marketplace_debian_boots_serves_ssh_and_powers_off",
        debian_boots_serves_ssh_and_powers_off,
    )]
}

/// A network namespace with the tap at HOST_IP, deleted (with the tap) when dropped.
struct Netns;

impl Netns {
    fn create() -> Result<Self> {
        let _ = host_tool("ip", &["netns", "del", NETNS]);
        host_tool("ip", &["netns", "add", NETNS]).context("creating a network namespace")?;
        let guard = Self;
        let ip = |args: &[&str]| {
            let mut all = vec!["-n", NETNS];
            all.extend_from_slice(args);
            host_tool("ip", &all)
        };
        ip(&["tuntap", "add", "dev", TAP, "mode", "tap"])
            .context("creating the tap (needs root and /dev/net/tun)")?;
        ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP])?;
        ip(&["link", "set", TAP, "up"])?;
        ip(&["link", "set", "lo", "up"])?;
        Ok(guard)
    }

    /// Runs `body` on a thread inside the namespace: crib started there opens the tap
    /// there, and the thread's sockets and tools (ping) see the tap's network.
    fn run<T: Send + 'static>(
        &self,
        body: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let path = format!("/run/netns/{NETNS}");
        let ns = File::open(&path).with_context(|| format!("cannot open {path}"))?;
        std::thread::spawn(move || {
            // SAFETY: setns on an fd we own, for this thread only (CLONE_NEWNET may be
            // changed per thread); the fd stays open for the call.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .context("cannot enter the network namespace");
            }
            body()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the test thread panicked"))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = host_tool("ip", &["netns", "del", NETNS]);
    }
}

/// A copy of the image the guest may write, removed when dropped.
struct ScratchImage(PathBuf);

impl ScratchImage {
    fn copy(image: &Path) -> Result<Self> {
        let path =
            std::env::temp_dir().join(format!("crib-marketplace-{}.img", std::process::id()));
        let copy = Self(path);
        // Sparse: the 2 GiB image holds a few hundred MiB of data (the lab's /tmp is RAM).
        host_tool(
            "cp",
            &[
                "--sparse=always",
                "--reflink=auto",
                &image.display().to_string(),
                &copy.0.display().to_string(),
            ],
        )
        .context("copying the marketplace image")?;
        Ok(copy)
    }
}

impl Drop for ScratchImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Reads sshd's banner on GUEST_IP:22, retrying until `wait` has passed or crib exits.
fn ssh_banner(crib: &mut LiveCrib, wait: Duration) -> Result<String> {
    let addr: SocketAddr = format!("{GUEST_IP}:22").parse()?;
    let start = Instant::now();
    loop {
        if let Some(status) = crib.try_wait()? {
            bail!(
                "crib exited ({status}) before sshd answered\n{}",
                crib.output()
            );
        }
        let attempt = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(|s| {
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            Ok(line)
        });
        match attempt {
            Ok(line) if line.starts_with("SSH-") => return Ok(line.trim().to_owned()),
            Ok(line) if start.elapsed() > wait => bail!("{addr} answered {line:?}"),
            Err(e) if start.elapsed() > wait => {
                return Err(e).with_context(|| format!("no sshd on {addr} after {wait:?}"))
            }
            _ => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

fn debian_boots_serves_ssh_and_powers_off() -> Result<()> {
    let dir = target_dir().join("marketplace");
    let image = dir.join("debian.img");
    anyhow::ensure!(
        image.exists(),
        "{} is missing: run scripts/prepare.sh (it runs scripts/build-marketplace-image.sh)",
        image.display()
    );
    let scratch = ScratchImage::copy(&image)?;
    let netns = Netns::create()?;
    let socket = std::env::temp_dir().join(format!("crib-mkt-api-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let args: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        dir.join("vmlinuz").display().to_string(),
        "--initrd".into(),
        dir.join("initrd.img").display().to_string(),
        "--cpus".into(),
        "2".into(),
        "--memory".into(),
        "1024M".into(),
        "--disk".into(),
        format!("path={},id=root", scratch.0.display()),
        "--net".into(),
        format!("tap={TAP},mac=52:54:00:12:34:57"),
        "--api-socket".into(),
        socket.display().to_string(),
        "--cmdline".into(),
        "root=/dev/vda rw console=ttyS0 panic=-1".into(),
    ];
    let api_socket = socket.clone();
    let result = netns.run(move || marketplace_vm(&args, &api_socket));
    let _ = std::fs::remove_file(&socket);
    drop(scratch);
    result
}

/// Boots the VM (inside the namespace) and checks it from boot to power-off.
fn marketplace_vm(args: &[String], socket: &Path) -> Result<()> {
    let start = Instant::now();
    let mut crib = LiveCrib::spawn_with_console_input(args)?;
    let banner = match ssh_banner(&mut crib, BOOT_WAIT) {
        Ok(banner) => banner,
        Err(e) => bail!("{e:#}\n{}", crib.output()),
    };
    eprintln!(
        "marketplace: sshd answered {:.1} s after crib started ({banner})",
        start.elapsed().as_secs_f64()
    );
    let ping = host_tool("busybox", &["ping", "-c", "3", "-w", "20", GUEST_IP])?;
    anyhow::ensure!(ping.contains("3 packets received"), "host ping: {ping}");

    // A command on the serial console, where root is logged in: the answer (42) is only
    // on the console if the shell ran it (the echo of what was typed shows $((6*7))).
    crib.wait_for("root's shell prompt on ttyS0", BOOT_WAIT, |out| {
        strip_ansi(out).contains("root@marketplace").then_some(())
    })?;
    let typed = "echo console-$((6*7)) $(systemctl is-active multi-user.target)\n";
    let answer = |out: &str| strip_ansi(out).contains("console-42 active").then_some(());
    let mut answered = false;
    // Typed again every few seconds in case the shell was not reading yet.
    for _ in 0..12 {
        crib.type_text(typed)?;
        if crib
            .wait_for(
                "the console command's answer",
                Duration::from_secs(10),
                answer,
            )
            .is_ok()
        {
            answered = true;
            break;
        }
    }
    anyhow::ensure!(
        answered,
        "the command typed on the serial console did not answer\n{}",
        crib.output()
    );

    // A pod beside it: crib's pod kernel and cradle, a command that exits.
    let pod = GuestArtifacts::pod()?;
    let pod_out = run_crib(
        &[
            "run",
            "--kernel",
            &pod.vmlinux.display().to_string(),
            "--initrd",
            &pod.initramfs.display().to_string(),
            "--memory",
            "256M",
            "--cmdline",
            "console=ttyS0 quiet -- /bin/sh -c \"echo pod-beside-marketplace-$((2*21))\"",
        ],
        Duration::from_secs(120),
    )?;
    pod_out.check(
        pod_out.stdout.contains("pod-beside-marketplace-42") && pod_out.code == Some(0),
        "a pod ran beside the marketplace VM",
    )?;
    anyhow::ensure!(
        crib.try_wait()?.is_none(),
        "the marketplace VM stopped while the pod ran\n{}",
        crib.output()
    );

    let (status, body) = api_request(
        socket,
        "PUT",
        "/api/v1/vm/shutdown",
        &format!("{{\"timeout_s\": {SHUTDOWN_TIMEOUT_S}}}"),
    )?;
    anyhow::ensure!(
        status == 202 && body.contains("acpi-power-button"),
        "shutdown answered {status} {body}"
    );
    let shutdown_at = start.elapsed();
    let code = crib.wait_exit(Duration::from_secs(SHUTDOWN_TIMEOUT_S + 30))?;
    eprintln!(
        "marketplace: shutdown requested at {:.1} s, crib exited at {:.1} s",
        shutdown_at.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    let console = strip_ansi(&crib.stdout());
    // The console lines that tell the story, for the log.
    for line in console.lines().filter(|l| {
        [
            "Power Button",
            "multi-user.target",
            "automatic login",
            "System Power Off",
            "Power down",
        ]
        .iter()
        .any(|needle| l.contains(needle))
    }) {
        eprintln!("marketplace console: {}", line.trim());
    }
    let check = |cond: bool, what: &str| -> Result<()> {
        anyhow::ensure!(cond, "{what}: no\n{}", crib.output());
        Ok(())
    };
    check(
        console.contains("Reached target multi-user.target"),
        "systemd reached multi-user.target",
    )?;
    check(
        console.contains("ACPI: button: Power Button [PWRB]"),
        "the kernel's button driver found the ACPI power button",
    )?;
    check(
        console.contains("(automatic login)"),
        "root was logged in on the serial console",
    )?;
    check(
        console.contains("Reached target poweroff.target"),
        "systemd stopped its units and reached poweroff.target",
    )?;
    check(
        console.contains("reboot: Power down"),
        "the guest powered off cleanly",
    )?;
    check(code == Some(0), "crib exits 0")
}
