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

/// Set to run `linux_marketplace_pod_net_dhcp_address_and_teardown`. It passed in three
/// lab boots, then hung in a clean-clone precheck on 2026-12-06 (L1 idle, no sshd at the
/// VM's DHCP address within 600 s; the host-side DHCP checks of `linux_net_pod_host_side`
/// passed in the same run). Until that is understood the suite leaves it out.
const POD_NET_ENV: &str = "CRIB_MARKETPLACE_POD_NET";

pub fn tests() -> Vec<(&'static str, TestFn)> {
    let mut tests: Vec<(&'static str, TestFn)> = vec![(
        "linux_marketplace_debian_boots_serves_ssh_and_powers_off",
        debian_boots_serves_ssh_and_powers_off,
    )];
    if std::env::var_os(POD_NET_ENV).is_some() {
        tests.push((
            "linux_marketplace_pod_net_dhcp_address_and_teardown",
            pod_net_dhcp_address_and_teardown,
        ));
    }
    tests
}

/// A network namespace of the test's (with the tap at HOST_IP for [`Netns::create`]),
/// deleted (with what is in it) when dropped.
struct Netns(&'static str);

impl Netns {
    fn create() -> Result<Self> {
        let guard = Self::empty(NETNS)?;
        guard
            .ip(&["tuntap", "add", "dev", TAP, "mode", "tap"])
            .context("creating the tap (needs root and /dev/net/tun)")?;
        guard.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP])?;
        guard.ip(&["link", "set", TAP, "up"])?;
        Ok(guard)
    }

    /// A namespace with only `lo`, up.
    fn empty(name: &'static str) -> Result<Self> {
        let _ = host_tool("ip", &["netns", "del", name]);
        host_tool("ip", &["netns", "add", name]).context("creating a network namespace")?;
        let guard = Self(name);
        guard.ip(&["link", "set", "lo", "up"])?;
        Ok(guard)
    }

    /// `ip -n NAME args`.
    fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.0];
        all.extend_from_slice(args);
        host_tool("ip", &all)
    }

    /// Runs `body` on a thread inside the namespace: crib started there opens the tap
    /// there, and the thread's sockets and tools (ping) see the tap's network.
    fn run<T: Send + 'static>(
        &self,
        body: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let path = format!("/run/netns/{}", self.0);
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
        let _ = host_tool("ip", &["netns", "del", self.0]);
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
    ssh_banner_at(crib, format!("{GUEST_IP}:22").parse()?, wait)
}

/// Reads sshd's banner on `addr`, retrying until `wait` has passed or crib exits.
fn ssh_banner_at(crib: &mut LiveCrib, addr: SocketAddr, wait: Duration) -> Result<String> {
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
    // systemd prints "Reached target" only when its status output is on, which with the
    // default ShowStatus=auto happens only once a unit was slow: the console's own
    // `systemctl is-active multi-user.target` answer says it either way.
    check(
        console.contains("Reached target multi-user.target")
            || strip_ansi(&console).contains("console-42 active"),
        "systemd reached multi-user.target",
    )?;
    // The kernel and systemd share the serial console and their lines can cut into each
    // other ("[  OK  CPI: button: Power Button [PWRB]" in one CI run): match the end only.
    check(
        console.contains("button: Power Button [PWRB]"),
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

const POD_NETNS: &str = "crib-mkt-pod";
const POD_VM_ID: &str = "mkt-pod";
/// The IPAM's directory (podnet's default: the test checks what crib leaves in it).
const NET_DIR: &str = "/run/crib/.net";
/// A published port: L1's 127.0.0.1:2222 reaches the VM's sshd.
const PUBLISHED: u16 = 2222;
/// The image's eth0 as a stock cloud image has it: DHCP (the test image's own is a
/// static address, for the tap test above).
const DHCP_NETWORK: &str = "[Match]\nName=eth0 en*\n\n[Network]\nDHCP=ipv4\n";

/// The string value of the first `"key": "value"` in `json`.
fn json_str<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let rest = &json[json.find(&format!("\"{key}\""))? + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('[').map_or(rest, str::trim_start);
    let rest = rest.strip_prefix('"')?;
    rest.split('"').next()
}

/// `crib run --net pod` (docs/NETWORK.md, "Marketplace VMs"): the image (its eth0 on
/// DHCP, as Debian's cloud images have it) gets the address crib leased from crib's
/// dnsmasq on the bridge; sshd answers at that address and through a published port on
/// 127.0.0.1; `GET /api/v1/vm` shows the address. After a forced stop, crib's keeper
/// leaves no tap, nft chain or port, lease, DHCP server or directory behind. crib runs
/// in a network namespace of the test's, so the bridge and the table are the test's.
fn pod_net_dhcp_address_and_teardown() -> Result<()> {
    let dir = target_dir().join("marketplace");
    let image = dir.join("debian.img");
    anyhow::ensure!(
        image.exists(),
        "{} is missing: run scripts/prepare.sh (it runs scripts/build-marketplace-image.sh)",
        image.display()
    );
    let scratch = ScratchImage::copy(&image)?;
    let pid = std::process::id();
    let unit = std::env::temp_dir().join(format!("crib-mkt-dhcp-{pid}.network"));
    let script = std::env::temp_dir().join(format!("crib-mkt-dhcp-{pid}.debugfs"));
    std::fs::write(&unit, DHCP_NETWORK)?;
    std::fs::write(
        &script,
        format!(
            "cd /etc/systemd/network\nrm 10-eth0.network\nwrite {} 10-eth0.network\n\
             sif 10-eth0.network mode 0100644\n",
            unit.display()
        ),
    )?;
    let img = scratch.0.display().to_string();
    let edit = host_tool(
        "debugfs",
        &["-w", "-f", &script.display().to_string(), &img],
    )
    .and_then(|_| {
        host_tool(
            "debugfs",
            &["-R", "cat /etc/systemd/network/10-eth0.network", &img],
        )
    });
    let _ = std::fs::remove_file(&unit);
    let _ = std::fs::remove_file(&script);
    let written = edit.context("switching the image copy's eth0 to DHCP with debugfs")?;
    anyhow::ensure!(
        written.contains("DHCP=ipv4"),
        "the image's eth0 unit is {written:?}"
    );

    let netns = Netns::empty(POD_NETNS)?;
    let socket = std::env::temp_dir().join(format!("crib-mkt-pod-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let args: Vec<String> = vec![
        "run".into(),
        "--id".into(),
        POD_VM_ID.into(),
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
        format!("pod,port={PUBLISHED}:22"),
        "--api-socket".into(),
        socket.display().to_string(),
        "--cmdline".into(),
        "root=/dev/vda rw console=ttyS0 panic=-1".into(),
    ];
    let api_socket = socket.clone();
    let result = netns.run(move || pod_net_vm(&args, &api_socket));
    let _ = std::fs::remove_file(&socket);
    drop(scratch);
    result
}

/// Inside the namespace: boots the VM, checks it, stops it, checks what is left.
fn pod_net_vm(args: &[String], socket: &Path) -> Result<()> {
    let start = Instant::now();
    let mut crib = LiveCrib::spawn(args)?;
    // The API comes up with the VM; the address is in the net device's config.
    let mut vm = String::new();
    // 60 s: the network's `ip`, `nft` and dnsmasq run first, slow in a loaded lab.
    for _ in 0..600 {
        if let Ok((200, body)) = api_request(socket, "GET", "/api/v1/vm", "") {
            vm = body;
            break;
        }
        if crib.try_wait()?.is_some() {
            bail!("crib exited before its API answered\n{}", crib.output());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let address = json_str(&vm, "addresses")
        .and_then(|a| a.split('/').next())
        .with_context(|| format!("GET /api/v1/vm shows no address: {vm}\n{}", crib.output()))?
        .to_string();
    let tap = json_str(&vm, "tap")
        .with_context(|| format!("GET /api/v1/vm shows no tap: {vm}"))?
        .to_string();
    anyhow::ensure!(
        address.starts_with("10.88."),
        "the address {address} is not on the pod subnet 10.88.0.0/16"
    );
    let banner = ssh_banner_at(&mut crib, format!("{address}:22").parse()?, BOOT_WAIT)
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", crib.output()))?;
    eprintln!(
        "marketplace --net pod: sshd at {address} (DHCP) answered {:.1} s after crib started ({banner})",
        start.elapsed().as_secs_f64()
    );
    let published = ssh_banner_at(
        &mut crib,
        format!("127.0.0.1:{PUBLISHED}").parse()?,
        Duration::from_secs(30),
    )?;
    anyhow::ensure!(
        published.starts_with("SSH-"),
        "127.0.0.1:{PUBLISHED}: {published}"
    );
    let ping = host_tool("busybox", &["ping", "-c", "2", "-w", "20", &address])?;
    anyhow::ensure!(
        ping.contains("2 packets received"),
        "ping {address}: {ping}"
    );
    let dhcp_log =
        std::fs::read_to_string(format!("{NET_DIR}/dhcp-crib0/dnsmasq.log")).unwrap_or_default();
    anyhow::ensure!(
        dhcp_log.contains(&format!("DHCPACK(crib0) {address}")),
        "crib's dnsmasq did not hand out {address}:\n{dhcp_log}"
    );
    // For the log: when the guest asked (DHCP's timeline) and what its boot said.
    for line in dhcp_log.lines().filter(|l| {
        [
            "DHCPDISCOVER",
            "DHCPOFFER",
            "DHCPREQUEST",
            "DHCPACK",
            "DHCPNAK",
        ]
        .iter()
        .any(|m| l.contains(m))
    }) {
        eprintln!("marketplace --net pod dnsmasq: {line}");
    }
    let console = strip_ansi(&crib.stdout());
    for line in console.lines().filter(|l| {
        [
            "Network Configuration",
            "multi-user.target",
            "OpenBSD Secure Shell",
        ]
        .iter()
        .any(|m| l.contains(m))
    }) {
        eprintln!("marketplace --net pod console: {}", line.trim());
    }
    eprintln!(
        "marketplace --net pod: checks done {:.1} s after crib started",
        start.elapsed().as_secs_f64()
    );

    let (status, body) = api_request(socket, "PUT", "/api/v1/vm/stop", "")?;
    anyhow::ensure!(
        (200..300).contains(&status),
        "stop answered {status} {body}"
    );
    let code = crib.wait_exit(Duration::from_secs(60))?;
    anyhow::ensure!(
        code == Some(6),
        "crib exited {code:?} after a forced stop\n{}",
        crib.output()
    );

    // The keeper tears down once crib has exited: wait for it.
    let leftovers = || -> Result<Vec<String>> {
        let mut left = Vec::new();
        let links = host_tool("ip", &["-o", "link", "show"])?;
        if links.contains(&tap) {
            left.push(format!("tap {tap}"));
        }
        let table = host_tool("nft", &["list", "table", "inet", "crib"]).unwrap_or_default();
        if table.contains(&format!("pod-{POD_VM_ID}-")) || table.contains(&PUBLISHED.to_string()) {
            left.push(format!("nft rules:\n{table}"));
        }
        for path in [
            format!("{NET_DIR}/leases/{address}.json"),
            format!("{NET_DIR}/dhcp-crib0"),
            format!("{NET_DIR}/vm-{POD_VM_ID}"),
        ] {
            if Path::new(&path).exists() {
                left.push(path);
            }
        }
        let ours = |entry: std::fs::DirEntry| {
            std::fs::read(entry.path().join("cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.starts_with("dnsmasq") && c.contains(NET_DIR)
            })
        };
        if std::fs::read_dir("/proc")?.flatten().any(ours) {
            left.push("crib's dnsmasq".into());
        }
        Ok(left)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = leftovers()?;
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "after the VM stopped, left behind: {left:?}\n{}",
                crib.output()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
