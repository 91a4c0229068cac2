//! Helpers shared by the image store's integration tests.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use images::fixtures::{self, Entry, Image, Layer, Written};
use images::progress::NoProgress;
use images::{ImageRecord, Store};

/// True when running as root; otherwise prints why the test is skipped.
pub fn root_or_skip(test: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    eprintln!("{test}: skipped: converting layers needs root (mknod, chown, trusted.* xattrs)");
    false
}

/// A temporary directory with a store and room for layouts.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: Store,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        Env { dir, store }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `image` as an OCI layout in `name`.
    pub fn layout(&self, name: &str, image: &Image) -> (PathBuf, Written) {
        let path = self.path(name);
        let written = fixtures::write_oci_layout(&path, image).unwrap();
        (path, written)
    }

    pub fn import(
        &self,
        dir: &Path,
        name: Option<&str>,
    ) -> Result<ImageRecord, images::StoreError> {
        self.store.import_oci_layout(dir, name, &NoProgress)
    }

    /// Names of the files in a store subdirectory.
    pub fn files(&self, sub: &str) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.store.root().join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Asserts the store holds no image, blob, layer or staging leftover.
    pub fn assert_empty(&self) {
        for sub in ["blobs/sha256", "layers/sha256", "images", "tmp"] {
            assert_eq!(self.files(sub), Vec::<String>::new(), "{sub} is not empty");
        }
    }
}

/// An image of one layer of these entries.
pub fn image(entries: Vec<Entry>) -> Image {
    Image {
        layers: vec![Layer::new(entries)],
        ..Image::default()
    }
}

/// A mount, unmounted on drop.
pub struct Mount {
    pub path: PathBuf,
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

fn mount(args: &[&str], target: &Path) -> Mount {
    fs::create_dir_all(target).unwrap();
    let status = Command::new("mount")
        .args(args)
        .arg(target)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "mount {args:?} {} failed",
        target.display()
    );
    Mount {
        path: target.to_path_buf(),
    }
}

/// Mounts an erofs image read-only through a loop device.
pub fn mount_erofs(image: &Path, target: &Path) -> Mount {
    mount(
        &["-t", "erofs", "-o", "loop,ro", image.to_str().unwrap()],
        target,
    )
}

/// Mounts a read-only overlay of `lower` (lowest first, as ResolvedImage orders them).
pub fn mount_overlay(lower: &[PathBuf], target: &Path) -> Mount {
    let dirs: Vec<String> = lower
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    let options = format!("lowerdir={}", dirs.join(":"));
    mount(&["-t", "overlay", "overlay", "-o", &options], target)
}
