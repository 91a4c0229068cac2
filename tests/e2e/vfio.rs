//! `--vfio`: an NVMe controller passed through to the guest. `linux_vfio_*` need an L1 with
//! an emulated NVMe behind an emulated IOMMU: main.rs starts a second lab for them with
//! `--nvme` and sets CRIB_LAB_NVME; anywhere else they are ignored (they unbind the
//! device from its driver, which must never happen to a real host's disk).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use crib_tests::lab_nvme::{
    bind, bind_vfio, find_lab_nvme, wait_for, VirtualFunction, L1_NAMESPACE,
};
use crib_tests::micro::{elf, halt_forever};
use crib_tests::{host_tool, run_crib, GuestArtifacts, RunOutput};

use crate::TestFn;

const DEADLINE: Duration = Duration::from_secs(240);
/// Size of the lab's NVMe image (main.rs creates it).
pub const NVME_IMAGE_BYTES: u64 = 256 << 20;
/// What the guest writes at the start of the namespace.
pub const PATTERN: &str = "crib-vfio-pattern";
/// The serial of the lab's NVMe controller (tests/lab/lab.sh).
const LAB_NVME_SERIAL: &str = "crib-nvme0";
/// What cradle reads to decide a disk is blank (guest/cradle/src/probe.rs).
const BLANK_HEAD_BYTES: usize = 128 * 1024;
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
        (
            "linux_vfio_nvme_works_after_the_guest_moves_its_bar",
            nvme_works_after_the_guest_moves_its_bar,
        ),
        (
            "linux_vfio_nvme_works_on_intx_without_msi",
            nvme_works_on_intx_without_msi,
        ),
        (
            "linux_vfio_pod_nvme_volume_formatted_and_mounted",
            pod_nvme_volume_formatted_and_mounted,
        ),
        (
            "linux_vfio_nvme_virtual_function_write_reaches_l1",
            nvme_virtual_function_write_reaches_l1,
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
    let _ = std::fs::remove_file(&kernel);
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
    let _ = std::fs::remove_file(&kernel);
    out.check(out.code != Some(0), "crib fails")?;
    out.check(
        out.stderr
            .contains("PCI device 0000:fe:1f.7 does not exist")
            && out.stderr.contains("lspci -D"),
        "the error names the device and how to find a valid one",
    )
}

fn boot_with_vfio(bdf: &str, command: &str, extra: &[String]) -> Result<RunOutput> {
    boot_with_vfio_on(&GuestArtifacts::pod()?, bdf, "", command, extra)
}

/// The same with another kernel and initramfs, and `params` before the init's arguments.
fn boot_with_vfio_on(
    artifacts: &GuestArtifacts,
    bdf: &str,
    params: &str,
    command: &str,
    extra: &[String],
) -> Result<RunOutput> {
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
        format!("console=ttyS0 panic=-1 quiet {params} -- /bin/sh -c \"{command}\""),
    ];
    args.extend_from_slice(extra);
    run_crib(&args, DEADLINE)
}

/// Boots with `bdf` passed through, gives the device back to L1's nvme driver whatever
/// happened, and checks that the guest command and crib succeeded.
fn boot_and_give_back(
    artifacts: &GuestArtifacts,
    bdf: &str,
    params: &str,
    command: &str,
) -> Result<RunOutput> {
    let run = boot_with_vfio_on(artifacts, bdf, params, command, &[]);
    let rebound = bind(bdf, "nvme");
    let out = run?;
    rebound?;
    out.check(
        out.stdout.contains("cradle: command exited with status 0") && out.code == Some(0),
        "the guest command succeeds and crib exits 0",
    )?;
    Ok(out)
}

/// Binds L1's NVMe to vfio-pci; returns its BDF.
fn nvme_to_vfio() -> Result<String> {
    if !lab_has_nvme() {
        bail!("needs the lab's NVMe ({LAB_NVME_ENV}): run through tests/e2e's lab runner");
    }
    let bdf = find_lab_nvme()?;
    bind_vfio(&bdf)?;
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
        "cat /sys/block/nvme0n1/size; cd /sys/bus/pci/devices/0000:00:01.0; \
         echo bar0 $(head -c 18 resource) config $(stat -c %s config) sriov $(cat sriov_totalvfs 2>/dev/null || echo none); \
         echo {PATTERN} | dd of=/dev/nvme0n1 bs=4096 count=1 conv=sync oflag=direct && echo vfio-write-done"
    );
    // The lab's NVMe offers SR-IOV (lab.sh --nvme-vfs), which the guest must not see.
    let host_has_sriov = Path::new(&format!("/sys/bus/pci/devices/{bdf}/sriov_totalvfs")).exists();
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
        out.stdout.contains("bar0 0x0000000100000000"),
        "the NVMe's 64-bit BAR 0 sits at the start of the window above 4 GiB",
    )?;
    out.check(
        out.stderr
            .contains("vfio: guest RAM (512 MiB) DMA-mapped in"),
        "crib DMA-maps guest RAM (in the background) and says so",
    )?;
    out.check(
        out.stdout.contains("config 4096 sriov none"),
        "the guest reads extended configuration space, without the SR-IOV capability",
    )?;
    out.check(
        host_has_sriov,
        "L1's NVMe has the SR-IOV capability crib hides",
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

/// The guest moves the passed-through NVMe's 64-bit BAR 0 from above 4 GiB into the
/// 32-bit window (driver unbound, high dword then low dword written through sysfs) and
/// reads the controller's version register there through /dev/mem: crib must have moved
/// the BAR's KVM slots. Then it removes the device and rescans, so
/// Linux places the BAR again (a second move); the nvme driver comes back wherever that
/// is, with its MSI-X table trap moved along, and its O_DIRECT write reaches L1.
fn nvme_works_after_the_guest_moves_its_bar() -> Result<()> {
    const MOVED_BAR: u32 = 0xdf00_0000;
    let bdf = nvme_to_vfio()?;
    let dev = "/sys/bus/pci/devices/0000:00:01.0";
    let bytes = crib_tests::printf_le_bytes(MOVED_BAR);
    let zero = crib_tests::printf_le_bytes(0);
    // VS (the NVMe version) is at 0x8 in BAR 0; /dev/mem may read it once no driver holds
    // the BAR. The pattern goes to the second 4 KiB block. No double quotes: the command
    // sits in the kernel command line's quotes.
    let command = format!(
        "old=$(head -c 18 {dev}/resource); \
         echo 0000:00:01.0 > /sys/bus/pci/drivers/nvme/unbind && \
         echo vs-before $(devmem $((old + 8)) 32) && \
         printf '{zero}' | dd of={dev}/config bs=4 seek=5 count=1 conv=notrunc 2>/dev/null && \
         printf '{bytes}' | dd of={dev}/config bs=4 seek=4 count=1 conv=notrunc 2>/dev/null && \
         echo vs-at-new $(devmem $(({MOVED_BAR} + 8)) 32) vs-at-old $(devmem $((old + 8)) 32); \
         echo 1 > {dev}/remove && echo 1 > /sys/bus/pci/rescan; \
         for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/nvme0n1 ] && break; sleep 1; done; \
         echo bar-after $(head -c 18 {dev}/resource); \
         echo {PATTERN} | dd of=/dev/nvme0n1 bs=4096 seek=1 count=1 conv=sync oflag=direct && echo moved-write-done"
    );
    // Debian's cloud kernel: the pod kernel has no /dev/mem.
    let out = boot_and_give_back(&GuestArtifacts::find()?, &bdf, "", &command)?;
    let console = out.stdout.to_lowercase();
    let version = console
        .lines()
        .find_map(|l| l.trim().strip_prefix("vs-before 0x"))
        .map(|hex| format!("0x{hex}"))
        .unwrap_or_default();
    out.check(
        !version.is_empty()
            && version != "0xffffffff"
            && console.contains(&format!("vs-at-new {version} vs-at-old 0xffffffff")),
        "after the move the controller answers at the new address, and nothing at the old",
    )?;
    out.check(
        out.stderr.contains(&format!(
            "guest moved BAR 0 of PCI 00:01.0 from 0x100000000 to {MOVED_BAR:#x}"
        )) && !out.stderr.contains("slow path")
            && !out.stderr.contains("cannot follow"),
        "crib moved the BAR's slots and trap",
    )?;
    out.check(
        out.stdout.contains("moved-write-done"),
        "the O_DIRECT write after Linux placed the BAR again completes",
    )?;
    let disk = PathBuf::from("/dev/nvme0n1");
    wait_for(&disk, "nvme rebind")?;
    let mut block = vec![0u8; 4096 + PATTERN.len()];
    std::fs::File::open(&disk)?.read_exact(&mut block)?;
    out.check(
        &block[4096..] == PATTERN.as_bytes(),
        &format!(
            "L1 reads the pattern back, got {:?}",
            String::from_utf8_lossy(&block[4096..])
        ),
    )
}

/// A guest booted with `pci=nomsi` drives the NVMe on its INTx line: the _PRT's GSI, a
/// level-triggered IO-APIC pin raised by VFIO's irqfd and lowered at the guest's EOI
/// (resample). Its O_DIRECT write reaches L1.
fn nvme_works_on_intx_without_msi() -> Result<()> {
    const INTX_PATTERN: &str = "crib-vfio-intx-pattern";
    // Block 4: blocks 0, 1 and 3 belong to the other tests' patterns.
    const BLOCK: u64 = 4;
    let bdf = nvme_to_vfio()?;
    let command = format!(
        "echo {INTX_PATTERN} | dd of=/dev/nvme0n1 bs=4096 seek={BLOCK} count=1 conv=sync oflag=direct && \
         dd if=/dev/nvme0n1 of=/dev/null bs=4096 count=64 iflag=direct && grep nvme0q0 /proc/interrupts"
    );
    let out = boot_and_give_back(&GuestArtifacts::pod()?, &bdf, "pci=nomsi", &command)?;
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("nvme0q0"))
        .unwrap_or_default();
    let count: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    out.check(
        line.contains("IO-APIC") && line.contains("fasteoi") && count > 0,
        &format!("the NVMe's queue interrupts arrive on a level-triggered IO-APIC line: {line:?}"),
    )?;
    wait_for(Path::new(L1_NAMESPACE), "nvme rebind")?;
    let mut block = vec![0u8; INTX_PATTERN.len()];
    let mut disk = std::fs::File::open(L1_NAMESPACE)?;
    disk.seek(SeekFrom::Start(BLOCK * 4096))?;
    disk.read_exact(&mut block)?;
    out.check(
        block == INTX_PATTERN.as_bytes(),
        &format!(
            "L1 reads the pattern back, got {:?}",
            String::from_utf8_lossy(&block)
        ),
    )
}

/// Gives L1's NVMe back to the nvme driver if it is not there, and waits for the namespace.
fn nvme_in_l1() -> Result<()> {
    if !lab_has_nvme() {
        bail!("needs the lab's NVMe ({LAB_NVME_ENV}): run through tests/e2e's lab runner");
    }
    let bdf = find_lab_nvme()?;
    let driver = std::fs::read_link(format!("/sys/bus/pci/devices/{bdf}/driver")).ok();
    if driver.as_deref().and_then(Path::file_name) != Some("nvme".as_ref()) {
        bind(&bdf, "nvme")?;
    }
    wait_for(Path::new(L1_NAMESPACE), "nvme bind")
}

/// Replaces the namespace's first `head.len()` bytes with `head` (from L1, bound to
/// nvme); returns what was there.
fn swap_head(head: &[u8]) -> Result<Vec<u8>> {
    let mut disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(L1_NAMESPACE)
        .with_context(|| format!("cannot open {L1_NAMESPACE} in L1"))?;
    let mut old = vec![0u8; head.len()];
    disk.read_exact(&mut old)?;
    disk.seek(SeekFrom::Start(0))?;
    disk.write_all(head)?;
    disk.sync_all()?;
    Ok(old)
}

/// A pod whose volume `lv` is the passed-through namespace, named by the controller's
/// serial: cradle formats the blank namespace as ext4 and mounts it, the pod's process
/// writes a file, and L1 (driver rebound) finds the file in the filesystem.
fn pod_nvme_volume_formatted_and_mounted() -> Result<()> {
    nvme_in_l1()?;
    // cradle formats only a blank disk. The host checks the direct-write test's pattern
    // after the lab, so the old head goes back at the end whatever the order of tests.
    let saved = swap_head(&vec![0u8; BLANK_HEAD_BYTES])?;
    let result = pod_on_blank_namespace();
    let restored = nvme_in_l1().and_then(|()| swap_head(&saved));
    let out = result?;
    restored?;
    out
}

fn pod_on_blank_namespace() -> Result<Result<()>> {
    let dir = std::env::temp_dir().join(format!("crib-vfio-pod-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let spec = dir.join("pod.json");
    std::fs::write(
        &spec,
        format!(
            r#"{{"name": "lv-pod",
                "volumes": [{{"name": "lv", "path": "/lv", "nvme_serial": "{LAB_NVME_SERIAL}"}}],
                "processes": [{{"name": "writer", "argv": ["/bin/sh", "-c", "echo vfio-lv-data > /lv/hello && sync"]}}]}}"#
        ),
    )?;
    let bdf = nvme_to_vfio()?;
    let command = "cat /lv/hello; readlink /dev/volumes/lv; grep -c nvme0n1 /proc/mounts";
    let run = boot_with_vfio(&bdf, command, &["--pod".into(), spec.display().to_string()]);
    let rebound = bind(&bdf, "nvme");
    let out = run?;
    rebound?;
    wait_for(Path::new(L1_NAMESPACE), "nvme rebind")?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(check_pod_console(&out))
}

fn check_pod_console(out: &RunOutput) -> Result<()> {
    out.check(
        out.stdout
            .contains("cradle: volume lv: formatting /dev/nvme0n1 as ext4"),
        "cradle formats the blank namespace",
    )?;
    out.check(
        out.stdout
            .contains("cradle: volume lv: /dev/nvme0n1 -> /lv (ext4, rw)"),
        "cradle mounts the namespace at /lv",
    )?;
    out.check(
        out.stdout
            .contains("cradle: process writer exited with status 0"),
        "the pod's process writes its file",
    )?;
    out.check(
        out.stdout.contains("vfio-lv-data") && out.stdout.contains("/dev/nvme0n1"),
        "the file is on the volume and /dev/volumes/lv links the namespace",
    )?;
    out.check(
        out.stdout.contains("cradle: command exited with status 0"),
        "the guest command succeeds",
    )?;
    out.check(out.code == Some(0), "crib exits 0")?;
    let on_disk = host_tool("debugfs", &["-R", "cat /hello", L1_NAMESPACE])?;
    out.check(
        on_disk.contains("vfio-lv-data"),
        "L1 finds the pod's file in the namespace's ext4",
    )
}

/// The guest drives an SR-IOV virtual function of the NVMe (its own PCI function, IOMMU
/// group and BAR, which vfio-pci presents with the IDs and BAR types a VF's raw config
/// space lacks) while L1 keeps the PF bound to nvme: the guest's O_DIRECT write is on
/// the shared namespace when L1 reads it through the PF.
fn nvme_virtual_function_write_reaches_l1() -> Result<()> {
    const VF_PATTERN: &str = "crib-vfio-vf-pattern";
    // Block 3: blocks 0 and 1 belong to the PF tests' patterns.
    const BLOCK: u64 = 3;
    if !lab_has_nvme() {
        bail!("needs the lab's NVMe ({LAB_NVME_ENV}): run through tests/e2e's lab runner");
    }
    let vf = VirtualFunction::enable()?;
    let command = format!(
        "cat /sys/block/nvme0n1/size /sys/class/nvme/nvme0/serial; \
         echo {VF_PATTERN} | dd of=/dev/nvme0n1 bs=4096 seek={BLOCK} count=1 conv=sync oflag=direct && echo vf-write-done"
    );
    let out = boot_with_vfio(&vf.bdf, &command, &[])?;
    out.check(
        out.stdout.contains("cradle: command exited with status 0") && out.code == Some(0),
        "the guest command succeeds and crib exits 0",
    )?;
    out.check(
        out.stdout.contains(&(NVME_IMAGE_BYTES / 512).to_string())
            && out.stdout.contains(LAB_NVME_SERIAL),
        "the guest sees the VF's nvme0n1 with the namespace's size and the serial",
    )?;
    out.check(
        out.stdout.contains("vf-write-done"),
        "the O_DIRECT write completes",
    )?;
    drop(vf);
    // The PF stayed bound to nvme all along: read the block past L1's page cache.
    let skip = BLOCK.to_string();
    let block = host_tool(
        "dd",
        &[
            &format!("if={L1_NAMESPACE}"),
            "bs=4096",
            &format!("skip={skip}"),
            "count=1",
            "iflag=direct",
            "status=none",
        ],
    )?;
    out.check(
        block.starts_with(VF_PATTERN),
        &format!(
            "L1 reads the VF's write through the PF, got {:?}",
            block.get(..VF_PATTERN.len()).unwrap_or(&block)
        ),
    )
}
