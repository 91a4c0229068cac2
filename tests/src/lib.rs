//! Shared helpers of crib's end-to-end tests: where the binaries and guest artifacts are,
//! how to run crib with a deadline, whether this host can run KVM guests at full speed, and
//! tiny hand-assembled "micro guests" that exercise crib's exit paths in microseconds.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod fleet;
pub mod lab_nvme;
mod live;

pub use live::LiveCrib;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Cargo's target directory (honours CARGO_TARGET_DIR).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// The `crib` binary under test: `$CRIB_BIN`, else the debug build.
pub fn crib_bin() -> PathBuf {
    std::env::var_os("CRIB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("debug/crib"))
}

/// Guest artifacts made by `scripts/prepare.sh`.
#[derive(Clone, Debug)]
pub struct GuestArtifacts {
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub initramfs: PathBuf,
}

impl GuestArtifacts {
    /// Debian's cloud kernel and the initramfs with its modules, or says how to make them.
    pub fn find() -> Result<Self> {
        let guest = target_dir().join("guest");
        Self {
            vmlinux: guest.join("debian-cloud/vmlinux"),
            bzimage: guest.join("debian-cloud/vmlinuz"),
            initramfs: guest.join("initramfs-cloud.cpio"),
        }
        .checked()
    }

    /// crib's pod kernel (everything built in) and the initramfs without modules.
    pub fn pod() -> Result<Self> {
        let guest = target_dir().join("guest");
        Self {
            vmlinux: guest.join("pod-kernel/vmlinux"),
            bzimage: guest.join("pod-kernel/bzImage"),
            initramfs: guest.join("initramfs-pod.cpio"),
        }
        .checked()
    }

    fn checked(self) -> Result<Self> {
        for path in [&self.vmlinux, &self.bzimage, &self.initramfs] {
            if !path.exists() {
                bail!(
                    "{} is missing: run scripts/prepare.sh first",
                    path.display()
                );
            }
        }
        Ok(self)
    }
}

/// True inside the lab's L1 VM (the lab runner sets CRIB_IN_LAB).
pub fn in_lab() -> bool {
    std::env::var_os("CRIB_IN_LAB").is_some()
}

/// True when the host CPU has VT-x or AMD-V, so /dev/kvm runs guests at native speed.
pub fn host_has_hw_virt() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|info| {
            info.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

/// Linux guests boot here directly (real KVM or inside the lab).
pub fn can_boot_linux() -> bool {
    in_lab() || host_has_hw_virt()
}

/// The outcome of one crib run.
#[derive(Debug)]
pub struct RunOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl RunOutput {
    /// Fails with both streams when `cond` does not hold.
    pub fn check(&self, cond: bool, what: &str) -> Result<()> {
        if !cond {
            bail!(
                "{what}\n--- exit code: {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
                self.code,
                self.stdout,
                self.stderr
            );
        }
        Ok(())
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).replace('\r', "")
    })
}

/// Runs `crib` with `args`, no stdin, killing it after `deadline`.
pub fn run_crib<S: AsRef<std::ffi::OsStr>>(args: &[S], deadline: Duration) -> Result<RunOutput> {
    run_crib_while(args, deadline, || Ok(()))
}

/// Runs a host tool, failing with its stderr.
pub fn host_tool(program: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An ext4 image holding the host's `fio` with its shared libraries at their paths, so
/// the guest can `chroot` into it: fio needs 60-odd libraries, too many for the initramfs.
pub fn fio_image(dir: &Path) -> Result<PathBuf> {
    tool_image(dir, "fio", &["/usr/bin/fio"])
}

/// An ext4 image `<dir>/<name>.img` holding host `binaries` with their shared libraries
/// (found with ldd) at their host paths, and empty dev/proc/tmp, for `chroot` in a guest.
pub fn tool_image(dir: &Path, name: &str, binaries: &[&str]) -> Result<PathBuf> {
    let root = dir.join(format!("{name}-root"));
    let mut files = Vec::new();
    for binary in binaries {
        anyhow::ensure!(
            Path::new(binary).exists(),
            "{binary} is not installed on the host (run scripts/install-deps.sh)"
        );
        files.push(PathBuf::from(binary));
        for line in host_tool("ldd", &[binary])?.lines() {
            // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = line
                .split("=>")
                .last()
                .and_then(|s| s.split_whitespace().next());
            if let Some(path) = path.filter(|p| p.starts_with('/')) {
                files.push(PathBuf::from(path));
            }
        }
    }
    for file in &files {
        let target = root.join(file.strip_prefix("/")?);
        std::fs::create_dir_all(target.parent().context("no parent")?)?;
        std::fs::copy(file, &target).with_context(|| format!("cannot copy {}", file.display()))?;
    }
    for mount_point in ["dev", "proc", "tmp"] {
        std::fs::create_dir_all(root.join(mount_point))?;
    }
    let image = dir.join(format!("{name}.img"));
    std::fs::File::create(&image)?.set_len(256 << 20)?;
    let (root_arg, image_arg) = (root.display().to_string(), image.display().to_string());
    host_tool("mkfs.ext4", &["-q", "-F", "-d", &root_arg, &image_arg])?;
    std::fs::remove_dir_all(&root)?;
    Ok(image)
}

/// Opens a stream to guest `port` through crib's vsock socket: `CONNECT`, then `OK`.
/// Retries while the guest is not listening yet (crib closes the socket on its RST).
pub fn vsock_connect(
    socket: &Path,
    port: u32,
    wait: Duration,
) -> Result<std::os::unix::net::UnixStream> {
    let start = Instant::now();
    loop {
        match try_connect(socket, port) {
            Ok(stream) => return Ok(stream),
            Err(e) if start.elapsed() > wait => {
                return Err(e.context(format!("guest port {port} not reachable in {wait:?}")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn try_connect(socket: &Path, port: u32) -> Result<std::os::unix::net::UnixStream> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte)? == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    if !line.starts_with(b"OK ") {
        bail!("no OK from crib: {:?}", String::from_utf8_lossy(&line));
    }
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    Ok(stream)
}

/// Runs `crib` with `args` and no stdin, calls `during` while it runs (to talk to its
/// sockets), then waits for crib to exit, killing it after `deadline`. The error of
/// `during`, if any, comes with crib's output.
pub fn run_crib_while<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    deadline: Duration,
    during: impl FnOnce() -> Result<()>,
) -> Result<RunOutput> {
    let bin = crib_bin();
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {} (build it with `cargo build -p vmm`)",
                bin.display()
            )
        })?;
    let stdout = drain(child.stdout.take().context("no stdout pipe")?);
    let stderr = drain(child.stderr.take().context("no stderr pipe")?);
    let started = Instant::now();
    let during = during();
    if during.is_err() {
        // The test already failed: do not wait for a guest that may never power off.
        let _ = child.kill();
    }
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = RunOutput {
        code: status.and_then(|s| s.code()),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    if let Err(e) = during {
        output.check(false, &format!("{e:#}"))?;
    }
    if status.is_none() {
        output.check(false, &format!("crib did not finish within {deadline:?}"))?;
    }
    Ok(output)
}

/// Micro guests: a few bytes of 64-bit code that crib enters directly, each ending in one
/// of crib's exit paths. They boot in microseconds even on an emulating /dev/kvm.
pub mod micro {
    /// Assembles `out dx, al` with `dx = port`, `al = value`.
    pub fn out(port: u16, value: u8) -> Vec<u8> {
        let [lo, hi] = port.to_le_bytes();
        vec![0x66, 0xba, lo, hi, 0xb0, value, 0xee]
    }

    /// `hlt` in a loop: the guest waits to be stopped.
    pub fn halt_forever() -> Vec<u8> {
        vec![0xf4, 0xeb, 0xfd]
    }

    /// ACPI S5 through crib's sleep control register.
    pub fn poweroff() -> Vec<u8> {
        out(0x600, (5 << 2) | (1 << 5))
    }

    /// Writes `text` to COM1, byte by byte.
    pub fn print(text: &str) -> Vec<u8> {
        text.bytes().flat_map(|b| out(0x3f8, b)).collect()
    }

    /// Wraps `code` in an ELF64 executable loaded and entered at 1 MiB + 2 MiB.
    pub fn elf(code: &[u8]) -> Vec<u8> {
        const LOAD_ADDR: u64 = 0x30_0000;
        const HEADERS: u64 = 0x78;
        let mut img = vec![0u8; HEADERS as usize];
        img[0..4].copy_from_slice(b"\x7fELF");
        img[4] = 2; // ELFCLASS64
        img[5] = 1; // little endian
        img[6] = 1; // EV_CURRENT
        img[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        img[0x12..0x14].copy_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
        img[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
        img[0x18..0x20].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
        img[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes()); // e_phoff
        img[0x34..0x36].copy_from_slice(&0x40u16.to_le_bytes()); // e_ehsize
        img[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes()); // e_phentsize
        img[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = 0x40;
        img[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        img[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        img[ph + 8..ph + 16].copy_from_slice(&HEADERS.to_le_bytes()); // p_offset
        img[ph + 16..ph + 24].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
        img[ph + 24..ph + 32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
        let len = code.len() as u64;
        img[ph + 32..ph + 40].copy_from_slice(&len.to_le_bytes()); // p_filesz
        img[ph + 40..ph + 48].copy_from_slice(&len.to_le_bytes()); // p_memsz
        img.extend_from_slice(code);
        img
    }
}

/// One HTTP/1.1 request on crib's API socket (`Connection: close`, read to the end, 30 s
/// timeouts): the status and the body.
pub fn api_request(socket: &Path, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    let timeout = Some(Duration::from_secs(30));
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: crib\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("{method} {path}: no complete answer"))?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .with_context(|| format!("{method} {path}: no HTTP header in {raw:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{method} {path}: no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// The first unsigned integer after `"key":` in the JSON text `body`, searching from the
/// first `from` on (`from` = `"data":{` picks disk `data`'s counters in a metrics answer).
/// Whitespace is ignored, so it matches however the JSON is formatted.
pub fn json_u64_after(body: &str, from: &str, key: &str) -> Option<u64> {
    let body: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    let rest = &body[body.find(from)?..];
    let needle = format!("\"{key}\":");
    let rest = &rest[rest.find(&needle)? + needle.len()..];
    rest.chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

/// `text` without ANSI escape sequences (systemd colours its status lines).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `value` as little-endian bytes in octal escapes, for busybox `printf` in a guest
/// command: how a guest test writes a 32-bit register through a sysfs `config` file.
pub fn printf_le_bytes(value: u32) -> String {
    value
        .to_le_bytes()
        .iter()
        .map(|b| format!("\\{b:03o}"))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn printf_le_bytes_is_low_byte_first_in_octal() {
        assert_eq!(super::printf_le_bytes(0xdf00_0001), "\\001\\000\\000\\337");
    }

    #[test]
    fn json_u64_after_reads_the_key_of_the_named_object() {
        let body = r#"{"disks": {"a": {"flushes": 1}, "b": { "flushes" : 22 }}}"#;
        assert_eq!(super::json_u64_after(body, "\"b\":{", "flushes"), Some(22));
    }

    #[test]
    fn strip_ansi_drops_colour_codes_only() {
        assert_eq!(
            super::strip_ansi("[\u{1b}[0;32m  OK  \u{1b}[0m] Reached"),
            "[  OK  ] Reached"
        );
    }
}
