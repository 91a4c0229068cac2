//! virtio-vsock against a real guest: host-to-guest connections through the hybrid Unix
//! socket (`CONNECT <port>`), guest-to-host connections to `<socket>_<port>`, many at once.
//! The guest side is Debian's socat, chrooted from a tools disk, on crib's pod kernel.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use crib_tests::{run_crib_while, tool_image, vsock_connect, GuestArtifacts, RunOutput};

use crate::TestFn;

const DEADLINE: Duration = Duration::from_secs(240);
/// How long the guest may take to boot and start listening.
const LISTEN_WAIT: Duration = Duration::from_secs(120);
const GUEST_CID: u32 = 3;
const SOCAT: &str = "/usr/bin/socat";

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![
        (
            "linux_vsock_echo_many_connections_both_ways",
            echo_many_connections_both_ways,
        ),
        (
            "linux_vsock_guest_device_reset_closes_host_connections",
            guest_device_reset_closes_host_connections,
        ),
    ]
}

fn scratch(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("crib-vsock-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Sends `data`, half-closes, and returns everything the peer sends back.
fn round_trip(mut stream: UnixStream, data: &[u8]) -> Result<Vec<u8>> {
    let mut writer = stream.try_clone()?;
    let data = data.to_vec();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&data)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut back = Vec::new();
    stream.read_to_end(&mut back)?;
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender thread panicked"))??;
    Ok(back)
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ seed.wrapping_mul(7919)) as u8)
        .collect()
}

/// Boots the pod kernel with a vsock device and socat on a tools disk; `command` runs in
/// the guest with the tools chroot at /t.
fn boot_with_vsock(
    dir: &Path,
    socket: &Path,
    command: &str,
    extra: &[String],
    during: impl FnOnce() -> Result<()>,
) -> Result<RunOutput> {
    let pod = GuestArtifacts::pod()?;
    let tools = tool_image(dir, "socat", &[SOCAT])?;
    let spec = dir.join("pod.json");
    std::fs::write(
        &spec,
        r#"{"name": "vsock", "volumes": [{"name": "tools", "path": "/t", "readonly": true}]}"#,
    )?;
    let mut args: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        pod.vmlinux.display().to_string(),
        "--initrd".into(),
        pod.initramfs.display().to_string(),
        "--cpus".into(),
        "2".into(),
        "--memory".into(),
        "512M".into(),
        "--pod".into(),
        spec.display().to_string(),
        "--disk".into(),
        format!("path={},id=tools,readonly=on", tools.display()),
        "--vsock".into(),
        format!("cid={GUEST_CID},socket={}", socket.display()),
        "--cmdline".into(),
        format!(
            "console=ttyS0 panic=-1 quiet -- /bin/sh -c \"mount --bind /dev /t/dev; {command}\""
        ),
    ];
    args.extend(extra.iter().cloned());
    run_crib_while(&args, DEADLINE, during)
}

fn echo_many_connections_both_ways() -> Result<()> {
    let dir = scratch("echo")?;
    let socket = dir.join("vsock.sock");
    // Guest to host: the guest's socat connects to host port 6000, i.e. <socket>_6000.
    let host_port = UnixListener::bind(format!("{}_6000", socket.display()))?;
    let host_side = std::thread::spawn(move || -> Result<()> {
        let (mut stream, _) = host_port.accept()?;
        let mut line = String::new();
        BufReader::new(stream.try_clone()?).read_line(&mut line)?;
        stream.write_all(format!("pong:{}", line.to_uppercase()).as_bytes())?;
        Ok(())
    });
    let command = format!(
        "chroot /t {SOCAT} VSOCK-LISTEN:5000,fork,reuseaddr PIPE & \
         echo ping-from-guest | chroot /t {SOCAT} -t 5 - VSOCK-CONNECT:2:6000; \
         chroot /t {SOCAT} -u VSOCK-LISTEN:5001 STDOUT"
    );
    let sock = socket.clone();
    let out = boot_with_vsock(&dir, &socket, &command, &[], move || {
        // One connection first: the guest is up and listening.
        let first = vsock_connect(&sock, 5000, LISTEN_WAIT)?;
        anyhow::ensure!(round_trip(first, b"hello")? == b"hello", "first echo");
        // 50 at once, each with its own 64 KiB pattern, so a mix-up would show.
        let workers: Vec<_> = (0..50)
            .map(|i| {
                let sock = sock.clone();
                std::thread::spawn(move || -> Result<()> {
                    let data = pattern(i, 64 * 1024);
                    let stream = vsock_connect(&sock, 5000, Duration::from_secs(30))?;
                    let back = round_trip(stream, &data)?;
                    anyhow::ensure!(
                        back == data,
                        "connection {i}: {} bytes back, not the {} sent",
                        back.len(),
                        data.len()
                    );
                    Ok(())
                })
            })
            .collect();
        for (i, worker) in workers.into_iter().enumerate() {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("connection {i} panicked"))??;
        }
        // 8 MiB through one connection: flow control over many credit windows.
        let big = pattern(99, 8 << 20);
        let stream = vsock_connect(&sock, 5000, Duration::from_secs(30))?;
        anyhow::ensure!(round_trip(stream, &big)? == big, "8 MiB echo differs");
        // Let the guest command end: it powers the VM off.
        let mut done = vsock_connect(&sock, 5001, Duration::from_secs(30))?;
        done.write_all(b"host-says-done\n")?;
        Ok(())
    })?;
    let guest_to_host = host_side
        .join()
        .map_err(|_| anyhow::anyhow!("host listener panicked"))?;
    std::fs::remove_dir_all(&dir)?;
    out.check(
        guest_to_host.is_ok(),
        "the guest connected to host port 6000",
    )?;
    out.check(
        out.stdout.contains("pong:PING-FROM-GUEST"),
        "the guest read the host's reply",
    )?;
    out.check(
        out.stdout.contains("host-says-done"),
        "the guest read the host's last message",
    )?;
    out.check(
        out.stdout.contains("cradle: command exited with status 0"),
        "the guest command succeeded",
    )?;
    out.check(out.code == Some(0), "crib exits 0")
        .context("vsock echo")
}

/// The guest unbinds and rebinds the vsock device's driver (a device reset): a host
/// connection open across it ends with EOF, and new connections work afterwards.
fn guest_device_reset_closes_host_connections() -> Result<()> {
    let dir = scratch("reset")?;
    let socket = dir.join("vsock.sock");
    // 0x1053: modern virtio-pci device id of vsock (0x1040 + 19).
    let command = format!(
        "chroot /t {SOCAT} VSOCK-LISTEN:5000,fork,reuseaddr PIPE & \
         chroot /t {SOCAT} -u VSOCK-LISTEN:5001 STDOUT; \
         for d in /sys/bus/pci/devices/*; do [ $(cat $d/device) = 0x1053 ] && bdf=${{d##*/}}; done; \
         echo unbinding $bdf; echo $bdf > /sys/bus/pci/drivers/virtio-pci/unbind; \
         echo $bdf > /sys/bus/pci/drivers/virtio-pci/bind && echo rebound; \
         chroot /t {SOCAT} -u VSOCK-LISTEN:5002 STDOUT"
    );
    let sock = socket.clone();
    let out = boot_with_vsock(&dir, &socket, &command, &[], move || {
        let mut open = vsock_connect(&sock, 5000, LISTEN_WAIT)?;
        open.write_all(b"before-reset")?;
        let mut echo = [0u8; 12];
        open.read_exact(&mut echo)?;
        anyhow::ensure!(&echo == b"before-reset", "echo before the reset");
        let mut go = vsock_connect(&sock, 5001, Duration::from_secs(30))?;
        go.write_all(b"host-says-reset\n")?;
        drop(go);
        // The reset must end the open connection: EOF (or a reset), never a hang.
        open.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut rest = Vec::new();
        match open.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => return Err(e).context("the open connection did not end at the reset"),
        }
        // After the rebind the guest listener answers again.
        let again = vsock_connect(&sock, 5000, Duration::from_secs(60))?;
        anyhow::ensure!(
            round_trip(again, b"after")? == b"after",
            "echo after the reset"
        );
        let mut done = vsock_connect(&sock, 5002, Duration::from_secs(30))?;
        done.write_all(b"host-says-done\n")?;
        Ok(())
    })?;
    std::fs::remove_dir_all(&dir)?;
    out.check(
        out.stdout.contains("rebound"),
        "the guest rebound the driver",
    )?;
    out.check(
        out.stdout.contains("cradle: command exited with status 0"),
        "the guest command succeeded",
    )?;
    out.check(out.code == Some(0), "crib exits 0")
}
