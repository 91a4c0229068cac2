//! virtio-net against a real guest: a tap in L1 (10.0.0.1/24) and crib's pod kernel
//! (10.0.0.2/24, configured by busybox `ip`). Both sides ping each other, the host reads a
//! line the guest serves with busybox `nc`, and bulk TCP both ways measures throughput
//! (printed, not asserted). Runs as root in the lab; the tap is created in L1's root
//! network namespace and deleted at the end.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crib_tests::{api_request, host_tool, run_crib_while, GuestArtifacts};

use crate::TestFn;

const DEADLINE: Duration = Duration::from_secs(300);
/// How long the guest may take to boot, configure eth0 and listen.
const LISTEN_WAIT: Duration = Duration::from_secs(120);
const TAP: &str = "crtap0";
const HOST_IP: &str = "10.0.0.1";
const GUEST_IP: &str = "10.0.0.2";
/// Bytes of each bulk transfer: enough for TSO, GRO, mergeable buffers and a full TX
/// ring. The guest side is busybox `nc` (small writes, so guest->host is slow here);
/// throughput is `crib-bench net`'s job, with iperf3.
const BULK_BYTES: usize = 16 << 20;

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![(
        "linux_net_tap_ping_tcp_and_throughput",
        tap_ping_tcp_and_throughput,
    )]
}

/// The tap, deleted when dropped.
struct TapGuard;

impl TapGuard {
    fn create() -> Result<Self> {
        let _ = host_tool("ip", &["link", "del", TAP]);
        host_tool("ip", &["tuntap", "add", "dev", TAP, "mode", "tap"])
            .context("creating the tap (needs root and /dev/net/tun)")?;
        let guard = Self;
        host_tool("ip", &["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP])?;
        host_tool("ip", &["link", "set", TAP, "up"])?;
        Ok(guard)
    }
}

impl Drop for TapGuard {
    fn drop(&mut self) {
        let _ = host_tool("ip", &["link", "del", TAP]);
    }
}

/// Connects to the guest's `port`, retrying until `wait` has passed.
fn connect(port: u16, wait: Duration) -> Result<TcpStream> {
    let addr: SocketAddr = format!("{GUEST_IP}:{port}").parse()?;
    let start = Instant::now();
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(60)))?;
                return Ok(s);
            }
            Err(e) if start.elapsed() > wait => {
                return Err(e).with_context(|| format!("cannot connect to {addr}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Counter `key` in the `nets` part of a metrics answer (from [`tap_ping_tcp_and_throughput`]'s
/// `net_counters`, which starts there).
fn net_counter(nets: &str, key: &str) -> Option<u64> {
    let compact: String = nets.chars().filter(|c| !c.is_whitespace()).collect();
    let rest = &compact[compact.find(&format!("\"{key}\":"))? + key.len() + 3..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn mb_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64().max(1e-9)
}

fn tap_ping_tcp_and_throughput() -> Result<()> {
    let pod = GuestArtifacts::pod()?;
    let _tap = TapGuard::create()?;
    let api = std::env::temp_dir().join(format!("crib-net-api-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&api);
    // What crib's device counted, for a transfer that stalls.
    let net_counters = || match api_request(&api, "GET", "/api/v1/metrics", "") {
        Ok((_, body)) => body
            .find("\"nets\"")
            .map_or(body.clone(), |at| body[at..].to_string()),
        Err(e) => format!("(no metrics: {e:#})"),
    };
    // The guest sends its bulk data here once the host's bulk data has arrived.
    let sink = TcpListener::bind(format!("{HOST_IP}:5002"))?;
    let blocks = BULK_BYTES / 65536;
    // One echo reply proves the path: the first request may be lost while eth0 and ARP
    // come up (busybox ping then exits 1 with "33% packet loss").
    let command = format!(
        "ip addr add {GUEST_IP}/24 dev eth0; ip link set eth0 up; \
         ping -c 3 -w 30 {HOST_IP} | grep -q 'bytes from' && echo guest-ping-ok; \
         echo hello-from-guest | nc -l -p 8080; \
         nc -l -p 5001 > /dev/null; echo guest-sink-done; \
         dd if=/dev/zero bs=65536 count={blocks} 2>/dev/null | nc {HOST_IP} 5002; \
         echo guest-source-done; \
         nc -l -p 5003"
    );
    let args: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        pod.vmlinux.display().to_string(),
        "--initrd".into(),
        pod.initramfs.display().to_string(),
        "--cpus".into(),
        "2".into(),
        "--memory".into(),
        "512M".into(),
        "--net".into(),
        format!("tap={TAP},mac=52:54:00:12:34:56"),
        "--api-socket".into(),
        api.display().to_string(),
        "--cmdline".into(),
        format!("console=ttyS0 panic=-1 quiet -- /bin/sh -c \"{command}\""),
    ];
    let mut figures = Vec::new();
    let out = run_crib_while(&args, DEADLINE, || {
        let mut hello = connect(8080, LISTEN_WAIT)?;
        let mut line = String::new();
        hello.read_to_string(&mut line)?;
        // busybox nc waits for the host to close too.
        drop(hello);
        anyhow::ensure!(
            line.trim() == "hello-from-guest",
            "the guest served {line:?}"
        );
        let ping = host_tool("busybox", &["ping", "-c", "3", "-w", "20", GUEST_IP])?;
        anyhow::ensure!(ping.contains("3 packets received"), "host ping: {ping}");

        // Host to guest.
        let mut to_guest = connect(5001, Duration::from_secs(30))?;
        let block = vec![0u8; 1 << 20];
        let start = Instant::now();
        for sent in 0..BULK_BYTES / block.len() {
            to_guest.write_all(&block).with_context(|| {
                format!(
                    "host->guest stalled after {sent} MiB; crib's counters: {}",
                    net_counters()
                )
            })?;
        }
        to_guest.shutdown(Shutdown::Write)?;
        let mut rest = Vec::new();
        let _ = to_guest.read_to_end(&mut rest);
        figures.push(format!(
            "host->guest {:.1} MB/s",
            mb_per_s(BULK_BYTES, start.elapsed())
        ));

        // Guest to host.
        let (mut from_guest, _) = sink.accept()?;
        from_guest.set_read_timeout(Some(Duration::from_secs(60)))?;
        let start = Instant::now();
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = from_guest.read(&mut buf).with_context(|| {
                format!(
                    "guest->host stalled after {got} bytes; crib's counters: {}",
                    net_counters()
                )
            })?;
            if n == 0 {
                break;
            }
            got += n;
        }
        let elapsed = start.elapsed();
        drop(from_guest);
        figures.push(format!("guest->host {:.1} MB/s", mb_per_s(got, elapsed)));
        anyhow::ensure!(
            got == BULK_BYTES,
            "the guest sent {got} of {BULK_BYTES} bytes"
        );

        // crib's counters saw both transfers (frames include headers and ACKs: at least).
        let counters = net_counters();
        for key in ["rx_bytes", "tx_bytes"] {
            let value = net_counter(&counters, key);
            anyhow::ensure!(
                value.is_some_and(|v| v >= BULK_BYTES as u64),
                "metrics nets.{TAP}.{key} is {value:?}, below the {BULK_BYTES} bytes moved: {counters}"
            );
        }

        // Let the guest command end: it powers the VM off.
        let done = connect(5003, Duration::from_secs(30))?;
        done.shutdown(Shutdown::Write)?;
        Ok(())
    })?;
    eprintln!("net throughput over {TAP}: {}", figures.join(", "));
    out.check(
        out.stdout.contains("guest-ping-ok"),
        "the guest pinged the host",
    )?;
    out.check(
        out.stdout.contains("guest-sink-done") && out.stdout.contains("guest-source-done"),
        "both bulk transfers ended in the guest",
    )?;
    out.check(
        out.stdout.contains("cradle: command exited with status 0"),
        "the guest command succeeded",
    )?;
    out.check(out.code == Some(0), "crib exits 0")
}
