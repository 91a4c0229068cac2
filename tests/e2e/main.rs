//! crib's end-to-end tests (a libtest-compatible harness, `harness = false`).
//!
//! - `cli_*`: bad input; no KVM needed.
//! - `micro_*`: hand-assembled micro guests on /dev/kvm; fast even on an emulating KVM.
//! - `linux_*`: Debian's cloud kernel booting cradle. They need a KVM that runs guests at
//!   speed: on a host without VT-x/AMD-V this binary re-runs itself inside the lab
//!   (tests/lab/lab.sh), in a few groups of a few minutes each (see [`LAB_GROUPS`]).
//! - `linux_vfio_*`: NVMe passthrough; a second lab boot, with an emulated NVMe behind an
//!   emulated IOMMU (`lab.sh --nvme`), runs only these.

mod api;
mod cli;
mod containers;
mod cri;
mod disk;
mod docker;
mod fault;
mod fs;
mod linux;
mod marketplace;
mod micro;
mod net;
mod pod;
mod podnet;
mod shim;
mod soak;
mod vfio;
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

/// Tests named so run in their own lab boot, with an NVMe (see vfio.rs).
const VFIO_PREFIX: &str = "linux_vfio_";

/// The `linux_*` tests without a filter run in one lab boot per group (and one for the
/// rest): QEMU-TCG's emulated SVM sometimes freezes or kills L1 under nested load, and
/// lab.sh then reruns the whole boot; short boots make that rarer and cheaper.
const LAB_GROUPS: &[&str] = &[
    "linux_disk_",
    "linux_fs_",
    "linux_api_",
    "linux_net_",
    "linux_marketplace_",
    "linux_fault_",
    "linux_soak_",
    "linux_shim_",
];

/// Which lab boot: the common one (with a filter and the prefixes to skip), or the one
/// with an NVMe image for `linux_vfio_*`.
enum Lab<'a> {
    Common { filter: String, skip: Vec<String> },
    Nvme(&'a Path),
}

/// The common lab boots for `args`: the caller's filter in one boot, else one per group.
fn common_labs(args: &Arguments) -> Vec<Lab<'static>> {
    let vfio = String::from(VFIO_PREFIX);
    if let Some(filter) = &args.filter {
        return vec![Lab::Common {
            filter: filter.clone(),
            skip: vec![vfio],
        }];
    }
    let mut labs: Vec<Lab> = LAB_GROUPS
        .iter()
        .map(|group| Lab::Common {
            filter: (*group).into(),
            skip: vec![vfio.clone()],
        })
        .collect();
    let mut rest_skip: Vec<String> = LAB_GROUPS.iter().map(|g| (*g).into()).collect();
    rest_skip.push(vfio);
    labs.push(Lab::Common {
        filter: "linux_".into(),
        skip: rest_skip,
    });
    labs
}

/// Runs the `linux_*` tests of this binary inside the lab; returns its exit code.
fn run_in_lab(args: &Arguments, lab_kind: Lab) -> i32 {
    let lab = repo_root().join("tests/lab/lab.sh");
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("e2e: cannot find this test binary: {e}");
            return 1;
        }
    };
    let mut inner = match (&lab_kind, &args.filter) {
        (Lab::Common { filter, skip }, _) => {
            let mut inner = vec![filter.clone()];
            for prefix in skip {
                inner.extend(["--skip".into(), prefix.clone()]);
            }
            inner
        }
        (Lab::Nvme(_), Some(filter)) if filter.starts_with(VFIO_PREFIX) => vec![filter.clone()],
        (Lab::Nvme(_), _) => vec![String::from(VFIO_PREFIX)],
    };
    if args.exact {
        inner.push("--exact".into());
    }
    inner.extend(["--test-threads".into(), "1".into()]);
    if args.nocapture {
        inner.push("--nocapture".into());
    }
    let which = match &lab_kind {
        Lab::Common { filter, .. } => format!("{filter}*"),
        Lab::Nvme(_) => format!("{VFIO_PREFIX}*"),
    };
    println!("\nrunning the {which} tests inside the lab (no VT-x/AMD-V on this host)");
    let mut lab_args: Vec<String> = Vec::new();
    // A crib binary chosen by the caller must be the one tested inside the lab too.
    if std::env::var_os("CRIB_BIN").is_some() {
        lab_args.extend(["--env".into(), "CRIB_BIN".into()]);
    }
    if let Lab::Nvme(image) = lab_kind {
        lab_args.extend([
            "--nvme".into(),
            image.display().to_string(),
            // One SR-IOV virtual function for linux_vfio_nvme_virtual_function_*.
            "--nvme-vfs".into(),
            "1".into(),
            "--env".into(),
            format!("{}=1", vfio::LAB_NVME_ENV),
        ]);
    }
    let start = std::time::Instant::now();
    let status = Command::new("bash")
        .arg(lab)
        .args(lab_args)
        .arg("--")
        .arg(exe)
        .args(inner)
        .env("CRIB_IN_LAB", "1")
        .status();
    // Where CI's minutes go: each lab boot's wall time, its L1 boot and reruns included.
    println!(
        "e2e: the {which} lab boot took {} s",
        start.elapsed().as_secs()
    );
    match status {
        Ok(status) => status.code().unwrap_or(1),
        Err(e) => {
            eprintln!("e2e: cannot start the lab: {e}");
            1
        }
    }
}

/// The lab boot for `linux_vfio_*`: a fresh NVMe image, then, after the lab, the host
/// side's check that the guest's write reached the image.
fn run_vfio_lab(args: &Arguments) -> i32 {
    let image = std::env::temp_dir().join(format!("crib-vfio-nvme-{}.img", std::process::id()));
    let created = std::fs::File::create(&image).and_then(|f| f.set_len(vfio::NVME_IMAGE_BYTES));
    if let Err(e) = created {
        eprintln!("e2e: cannot create the NVMe image {}: {e}", image.display());
        return 1;
    }
    println!("\nrunning the {VFIO_PREFIX}* tests in a lab with an NVMe behind an IOMMU");
    let mut code = run_in_lab(args, Lab::Nvme(&image));
    if code == 0 {
        let mut head = vec![0u8; vfio::PATTERN.len()];
        let read = std::fs::File::open(&image).and_then(|mut f| {
            use std::io::Read;
            f.read_exact(&mut head)
        });
        if read.is_err() || head != vfio::PATTERN.as_bytes() {
            eprintln!(
                "e2e: the NVMe image does not start with the guest's pattern '{}'",
                vfio::PATTERN
            );
            code = 1;
        }
    }
    let _ = std::fs::remove_file(&image);
    code
}

/// Builds the crib binary under test and containerd-shim-crib-v2 (next to it, for the
/// `linux_shim_*` tests), as `cargo test` does not build other packages' binaries. Inside
/// the lab the caller has built them already (and cargo may be absent).
fn build_crib() -> Result<(), String> {
    if in_lab() || std::env::var_os("CRIB_BIN").is_some() {
        return Ok(());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "vmm",
            "-p",
            "crib-shim",
            // Every binary of both (crib, containerd-shim-crib-v2): `--bin crib` would
            // leave the shim's binary out.
            "--bins",
        ])
        .current_dir(repo_root())
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("cargo build -p vmm -p crib-shim failed: {status}"))
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
    let mut trials: Vec<Trial> = cli::tests()
        .into_iter()
        .chain(vfio::cli_tests())
        .chain(containers::cli_tests())
        .map(|(n, f)| trial(n, f))
        .collect();
    trials.extend(
        micro::tests()
            .into_iter()
            .chain(vfio::micro_tests())
            .map(|(n, f)| trial(n, f).with_ignored_flag(!kvm_available())),
    );
    let linux: Vec<Trial> = linux::tests()
        .into_iter()
        .chain(disk::tests())
        .chain(disk::pod_tests())
        .chain(disk::fio_tests())
        .chain(vsock::tests())
        .chain(net::tests())
        .chain(marketplace::tests())
        .chain(docker::tests())
        .chain(fs::tests())
        .chain(pod::tests())
        .chain(podnet::tests())
        .chain(containers::tests())
        .chain(api::tests())
        .chain(fault::tests())
        .chain(soak::tests())
        .chain(shim::tests())
        .chain(cri::tests())
        .map(|(n, f)| trial(n, f))
        .collect();
    let linux_selected = linux
        .iter()
        .any(|t| args.filter.as_deref().is_none_or(|f| t.name().contains(f)));
    // Passthrough tests unbind a disk from its driver: only in a lab with its own NVMe.
    let vfio_tests: Vec<Trial> = vfio::lab_tests()
        .into_iter()
        .map(|(n, f)| trial(n, f).with_ignored_flag(!vfio::lab_has_nvme()))
        .collect();
    let vfio_selected = vfio_tests
        .iter()
        .any(|t| args.filter.as_deref().is_none_or(|f| t.name().contains(f)));
    if direct {
        trials.extend(linux);
        if in_lab() {
            trials.extend(vfio_tests);
        }
    } else if args.list {
        trials.extend(linux.into_iter().map(|t| t.with_ignored_flag(true)));
        trials.extend(vfio_tests.into_iter().map(|t| t.with_ignored_flag(true)));
    }
    if in_lab() {
        // One L2 guest at a time: L1 has two emulated CPUs.
        args.test_threads = Some(1);
    }
    let conclusion = libtest_mimic::run(&args, trials);
    let mut code = i32::from(conclusion.has_failed());
    if !direct && !args.list && linux_selected {
        for lab in common_labs(&args) {
            let lab_code = run_in_lab(&args, lab);
            if code == 0 {
                code = lab_code;
            }
        }
    }
    if !direct && !args.list && vfio_selected {
        let lab_code = run_vfio_lab(&args);
        if code == 0 {
            code = lab_code;
        }
    }
    std::process::exit(code);
}
