//! `--vfio`: an NVMe controller passed through to the guest. `linux_vfio_*` need an L1 with
//! an emulated NVMe behind an emulated IOMMU: main.rs starts a second lab for them with
//! `--nvme` and sets CRIB_LAB_NVME; anywhere else they are ignored (they unbind the
//! device from its driver, which must never happen to a real host's disk).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crib_tests::micro::{elf, halt_forever};
use crib_tests::{run_crib, GuestArtifacts, RunOutput};

use crate::TestFn;

const DEADLINE: Duration = Duration::from_secs(240);
/// Size of the lab's NVMe image (main.rs creates it).
pub const NVME_IMAGE_BYTES: u64 = 256 << 20;
/// What the guest writes at the start of the namespace.
pub const PATTERN: &str = "crib-vfio-pattern";
/// Set (by main.rs, through the lab) when L1 has the emulated NVMe to pass through.
pub const LAB_NVME_ENV: &str = "CRIB_LAB_NVME";

/// Tests that need the lab's NVMe.
pub fn lab_tests() -> Vec<(&'static str, TestFn)> {
    vec![
        (
            "linux_vfio_nvme_direct_write_reaches_l1",
            nvme_direct_write_reaches_l1,
        ),
        (
            "linux_vfio_nvme_with_virtio_blk_and_vsock",
            nvme_with_virtio_blk_and_vsock,
        ),
    ]
}

/// Error cases that need only /dev/kvm.
pub fn micro_tests() -> Vec<(&'static str, TestFn)> {
    vec![(
        "micro_vfio_missing_device_is_named",
        missing_device_is_named,
    )]
}

/// Bad addresses, refused before anything starts.
pub fn cli_tests() -> Vec<(&'static str, TestFn)> {
    vec![("cli_vfio_bad_address_is_refused", bad_address_is_refused)]
}

/// True where the lab tests may run: inside a lab started with `--nvme`.
pub fn lab_has_nvme() -> bool {
    crib_tests::in_lab() && std::env::var_os(LAB_NVME_ENV).is_some()
}

fn micro_kernel(name: &str) -> Result<PathBuf> {
    let path = std::env::temp_dir().join(format!("crib-vfio-{}-{name}.elf", std::process::id()));
    std::fs::write(&path, elf(&halt_forever()))?;
    Ok(path)
}

fn bad_address_is_refused() -> Result<()> {
    let kernel = micro_kernel("bad")?;
    let out = run_crib(
        &[
            "run",
            "--kernel",
            &kernel.display().to_string(),
            "--vfio",
            "00:04",
        ],
        Duration::from_secs(30),
    )?;
    out.check(out.code == Some(1) || out.code == Some(2), "crib fails")?;
    out.check(
        out.stderr
            .contains("--vfio '00:04' is not a PCI address: write DOMAIN:BUS:DEVICE.FUNCTION"),
        "the error names the flag and the expected form",
    )
}

fn missing_device_is_named() -> Result<()> {
    let kernel = micro_kernel("missing")?;
    let out = run_crib(
        &[
            "run",
            "--kernel",
            &kernel.display().to_string(),
            "--vfio",
            "0000:fe:1f.7",
        ],
        Duration::from_secs(30),
    )?;
    out.check(out.code != Some(0), "crib fails")?;
    out.check(
        out.stderr
            .contains("PCI device 0000:fe:1f.7 does not exist")
            && out.stderr.contains("lspci -D"),
        "the error names the device and how to find a valid one",
    )
}

fn write_sysfs(path: impl AsRef<Path>, value: &str) -> Result<()> {
    let path = path.as_ref();
    std::fs::write(path, value)
        .with_context(|| format!("cannot write '{value}' to {}", path.display()))
}

/// The BDF of L1's emulated NVMe controller (class 0x010802, QEMU's vendor id).
fn find_lab_nvme() -> Result<String> {
    for entry in std::fs::read_dir("/sys/bus/pci/devices")?.flatten() {
        let read = |f: &str| std::fs::read_to_string(entry.path().join(f)).unwrap_or_default();
        if read("class").trim() == "0x010802" && read("vendor").trim() == "0x1b36" {
            return Ok(entry.file_name().to_string_lossy().into_owned());
        }
    }
    bail!(
        "no emulated NVMe (class 0x010802, vendor 0x1b36) in L1: was the lab started with --nvme?"
    )
}

fn wait_for(path: &Path, what: &str) -> Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("{what}: {} did not appear", path.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Rebinds `bdf` to `driver` (through driver_override and drivers_probe).
fn bind(bdf: &str, driver: &str) -> Result<()> {
    let dev = PathBuf::from("/sys/bus/pci/devices").join(bdf);
    if dev.join("driver").exists() {
        write_sysfs(dev.join("driver/unbind"), bdf)?;
    }
    // An empty override ("\n") lets the normal driver match again.
    let over = if driver == "nvme" { "\n" } else { driver };
    write_sysfs(dev.join("driver_override"), over)?;
    write_sysfs("/sys/bus/pci/drivers_probe", bdf)?;
    let bound = std::fs::read_link(dev.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    if bound.as_deref() != Some(driver) {
        bail!("{bdf} is bound to {bound:?} after binding {driver}");
    }
    Ok(())
}

fn boot_with_vfio(bdf: &str, command: &str, extra: &[String]) -> Result<RunOutput> {
    let artifacts = GuestArtifacts::pod()?;
    let mut args: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        artifacts.vmlinux.display().to_string(),
        "--initrd".into(),
        artifacts.initramfs.display().to_string(),
        "--memory".into(),
        "512M".into(),
        "--vfio".into(),
        bdf.into(),
        "--cmdline".into(),
        format!("console=ttyS0 panic=-1 quiet -- /bin/sh -c \"{command}\""),
    ];
    args.extend_from_slice(extra);
    run_crib(&args, DEADLINE)
}

/// Binds L1's NVMe to vfio-pci; returns its BDF.
fn nvme_to_vfio() -> Result<String> {
    if !lab_has_nvme() {
        bail!("needs the lab's NVMe ({LAB_NVME_ENV}): run through tests/e2e's lab runner");
    }
    let _ = std::process::Command::new("modprobe")
        .arg("vfio-pci")
        .status();
    let bdf = find_lab_nvme()?;
    bind(&bdf, "vfio-pci")?;
    let group = std::fs::read_link(format!("/sys/bus/pci/devices/{bdf}/iommu_group"))
        .context("the NVMe has no IOMMU group: is intel_iommu=on on L1's command line?")?;
    let group = group
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    wait_for(&PathBuf::from("/dev/vfio").join(&group), "vfio-pci bind")?;
    Ok(bdf)
}

fn nvme_with_virtio_blk_and_vsock() -> Result<()> {
    let bdf = nvme_to_vfio()?;
    let dir = std::env::temp_dir().join(format!("crib-vfio-mixed-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let disk = dir.join("data.img");
    std::fs::File::create(&disk)?.set_len(64 << 20)?;
    let extra = vec![
        "--disk".into(),
        format!("path={},id=data", disk.display()),
        "--vsock".into(),
        format!("cid=3,socket={}", dir.join("v.sock").display()),
    ];
    // Both disks answer reads; the vsock transport bound its device.
    let command = "cat /sys/block/nvme0n1/size /sys/block/vda/size; dd if=/dev/nvme0n1 of=/dev/null bs=4096 count=16 iflag=direct && dd if=/dev/vda of=/dev/null bs=4096 count=16 && ls /sys/bus/virtio/drivers/vmw_vsock_virtio_transport | grep -c virtio";
    let run = boot_with_vfio(&bdf, command, &extra);
    let rebound = bind(&bdf, "nvme");
    let out = run?;
    rebound?;
    out.check(
        out.stdout.contains("cradle: command exited with status 0"),
        "the guest command succeeds",
    )?;
    out.check(out.code == Some(0), "crib exits 0")?;
    out.check(
        out.stdout.contains(&(NVME_IMAGE_BYTES / 512).to_string())
            && out.stdout.contains(&((64u64 << 20) / 512).to_string()),
        "the guest sees nvme0n1 and vda with their sizes",
    )
}

fn nvme_direct_write_reaches_l1() -> Result<()> {
    let bdf = nvme_to_vfio()?;

    let sectors = NVME_IMAGE_BYTES / 512;
    // No double quotes: the command sits inside the kernel command line's quotes.
    let command = format!(
        "cat /sys/block/nvme0n1/size; echo {PATTERN} | dd of=/dev/nvme0n1 bs=4096 count=1 conv=sync oflag=direct && echo vfio-write-done"
    );
    let run = boot_with_vfio(&bdf, &command, &[]);
    // Give the device back to L1 whatever happened.
    let rebound = bind(&bdf, "nvme");
    let out = run?;
    rebound?;
    out.check(
        out.stdout.contains("cradle: command exited with status 0"),
        "the guest command succeeds",
    )?;
    out.check(out.code == Some(0), "crib exits 0")?;
    out.check(
        out.stdout.contains(&sectors.to_string()),
        "the guest sees nvme0n1 with the image's size",
    )?;
    out.check(
        out.stdout.contains("vfio-write-done"),
        "the O_DIRECT write completes",
    )?;

    let disk = PathBuf::from("/dev/nvme0n1");
    wait_for(&disk, "nvme rebind")?;
    let mut head = vec![0u8; PATTERN.len()];
    std::fs::File::open(&disk)?.read_exact(&mut head)?;
    out.check(
        head == PATTERN.as_bytes(),
        &format!(
            "L1 reads the pattern back, got {:?}",
            String::from_utf8_lossy(&head)
        ),
    )
}
