//! Failures mid-import: a full disk during conversion, and a kill -9 of an importing
//! process. Either way nothing half-made is visible and the next import succeeds. Needs
//! root (conversion, tmpfs mount); skips otherwise.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use common::{image, root_or_skip, Env, Mount};
use images::fixtures::{self, Entry};
use images::progress::{NoProgress, Progress};
use images::unpack::UnpackError;
use images::{convert::ConvertError, Store, StoreError};

#[test]
fn full_disk_during_conversion_leaves_nothing() {
    if !root_or_skip("full_disk_during_conversion_leaves_nothing") {
        return;
    }
    let env = Env::new();
    let small = env.path("small");
    std::fs::create_dir_all(&small).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(status.success());
    let _mount = Mount {
        path: small.clone(),
    };
    let store = Store::open(&small).unwrap();
    // 8 MiB of zeros: a tiny gzip blob that fills the 2 MiB disk once unpacked.
    let (dir, _) = env.layout(
        "oci",
        &image(vec![Entry::file("zeros", vec![0u8; 8 << 20])]),
    );

    let err = store
        .import_oci_layout(&dir, Some("big"), &NoProgress)
        .unwrap_err();

    let StoreError::Convert(ConvertError::Unpack {
        source: UnpackError::Write { path, .. },
        ..
    }) = &err
    else {
        panic!("expected a write error, got {err}");
    };
    assert!(path.ends_with("zeros"), "{}", path.display());
    let mut chain = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        chain += &format!(": {cause}");
        source = cause.source();
    }
    eprintln!("full disk: {chain}");
    assert!(
        chain.contains("disk full") && chain.contains("No space left"),
        "{chain}"
    );
    for sub in ["tmp", "layers/sha256", "images", "blobs/sha256"] {
        assert_eq!(
            std::fs::read_dir(small.join(sub)).unwrap().count(),
            0,
            "{sub}"
        );
    }
}

/// Environment variables that turn `child_import_blocks_mid_conversion` into the child.
const CHILD_STORE: &str = "CRIB_TEST_CHILD_STORE";
const CHILD_LAYOUT: &str = "CRIB_TEST_CHILD_LAYOUT";
const CONVERTING: &str = "child: converting";

/// Prints a marker once conversion has read some of a layer, then hangs.
struct BlockMidConversion;

impl Progress for BlockMidConversion {
    fn layer_started(&self, _: &str, _: u64) {}
    fn layer_advanced(&self, _: &str, _: u64) {
        println!("{CONVERTING}");
        loop {
            std::thread::park();
        }
    }
    fn layer_done(&self, _: &str, _: &str) {}
    fn message(&self, _: &str) {}
}

/// The child of `kill_9_mid_conversion_then_import_succeeds`: a no-op unless the parent set
/// the environment.
#[test]
fn child_import_blocks_mid_conversion() {
    let (Some(store), Some(layout)) = (
        std::env::var_os(CHILD_STORE),
        std::env::var_os(CHILD_LAYOUT),
    ) else {
        return;
    };
    let store = Store::open(Path::new(&store)).unwrap();
    let _ = store.import_oci_layout(Path::new(&layout), Some("victim"), &BlockMidConversion);
}

#[test]
fn kill_9_mid_conversion_then_import_succeeds() {
    if !root_or_skip("kill_9_mid_conversion_then_import_succeeds") {
        return;
    }
    let env = Env::new();
    let (dir, _) = env.layout("oci", &fixtures::busybox_image("latest").unwrap());
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_import_blocks_mid_conversion",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_STORE, env.store.root())
        .env(CHILD_LAYOUT, &dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reached = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|line| line.contains(CONVERTING));
    assert!(reached, "the child never started converting");
    assert_eq!(env.files("tmp").len(), 1, "the child's staging directory");

    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    assert_eq!(env.files("tmp").len(), 1, "leftover until the next open");
    let store = Store::open(env.store.root()).unwrap();
    assert_eq!(env.files("tmp"), Vec::<String>::new());
    assert_eq!(env.files("layers/sha256"), Vec::<String>::new());
    assert_eq!(env.files("images"), Vec::<String>::new());
    let record = store
        .import_oci_layout(&dir, Some("victim"), &NoProgress)
        .unwrap();
    assert_eq!(store.resolve("victim").unwrap().digest, record.digest);
}
