//! Fuzzes the image store's layer unpacker (`images::unpack::unpack`): tar streams from an
//! image, unpacked into a private directory as a layer (whiteouts, ownership, device nodes,
//! xattrs; as root) or as an image archive (files, directories, symlinks).
//!
//! Inputs are either a raw tar stream (first byte even) or, mostly, a structured layer
//! built with `images::fixtures::layer_tar` from hostile pieces: names that collide,
//! climb (`../a`, `a/../../x`), are absolute or go through symlinks; symlinks to the
//! canary directory and out of the root; hard links, whiteouts, opaque directories,
//! device nodes, odd modes, owners, xattrs and claimed sizes. Invariant: no input panics,
//! and nothing is ever written outside the unpack root: the canary directory beside it
//! stays empty and the root's parent holds only the root.

#![no_main]

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use images::fixtures::{layer_tar, Entry};
use images::unpack::{unpack, UnpackMode};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Kind {
    File,
    Dir,
    SymlinkToCanary,
    SymlinkOut,
    Symlink,
    Hardlink,
    Whiteout,
    Opaque,
    CharDev,
    Fifo,
}

#[derive(Arbitrary, Debug)]
struct Piece {
    name: u8,
    kind: Kind,
    other: u8,
    mode: Option<u16>,
    owner: Option<(u16, u16)>,
    xattr: Option<(bool, Vec<u8>)>,
    claim_size: Option<u16>,
}

struct Base {
    dir: PathBuf,
    canary: PathBuf,
    layer_mode: bool,
}

/// A temporary directory with an empty canary directory, made once per process.
fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("crib-fuzz-layer-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let canary = dir.join("canary");
        fs::create_dir_all(&canary).expect("canary directory");
        // Layer mode chowns and makes nodes: root only, as in the store.
        let layer_mode = fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        Base {
            dir,
            canary,
            layer_mode,
        }
    })
}

/// Names that collide with each other, climb, are absolute or go through symlinks.
fn name(i: u8, canary: &str) -> String {
    match i % 12 {
        0 => "a".into(),
        1 => "a/b".into(),
        2 => "a/b/c".into(),
        3 => "l".into(),
        4 => "l/x".into(),
        5 => "l/y/z".into(),
        6 => "../a".into(),
        7 => "a/../../x".into(),
        8 => "/abs/x".into(),
        9 => "./a/./b".into(),
        10 => format!("{canary}/x"),
        _ => format!("l{canary}/y"),
    }
}

fn entry(p: &Piece, canary: &str) -> Entry {
    let path = name(p.name, canary);
    let other = name(p.other, canary);
    let mut e = match p.kind {
        Kind::File => Entry::file(&path, "data"),
        Kind::Dir => Entry::dir(&path),
        Kind::SymlinkToCanary => Entry::symlink(&path, canary),
        Kind::SymlinkOut => Entry::symlink(&path, "../../../.."),
        Kind::Symlink => Entry::symlink(&path, &other),
        Kind::Hardlink => Entry::hardlink(&path, &other),
        Kind::Whiteout => Entry::whiteout(&path),
        Kind::Opaque => Entry::opaque(&path),
        Kind::CharDev => Entry::char_dev(&path, 1, 3),
        Kind::Fifo => Entry::fifo(&path),
    };
    if let Some(mode) = p.mode {
        e = e.mode(u32::from(mode) & 0o7777);
    }
    if let Some((uid, gid)) = p.owner {
        e = e.owner(u64::from(uid), u64::from(gid));
    }
    if let Some((user, value)) = &p.xattr {
        let key = if *user { "user.fuzz" } else { "trusted.fuzz" };
        e = e.xattr(key, &value[..value.len().min(64)]);
    }
    if let Some(size) = p.claim_size {
        e = e.claim_size(u64::from(size));
    }
    e
}

fn assert_empty(dir: &Path) {
    let count = fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(count, 0, "wrote into {}", dir.display());
}

fuzz_target!(|data: &[u8]| {
    let base = base();
    let canary = base.canary.to_str().expect("a UTF-8 temp dir").to_string();
    let (tar, archive_mode) = match data.split_first() {
        Some((mode, rest)) if mode % 2 == 0 => (rest.to_vec(), mode % 4 == 2),
        Some((mode, rest)) => {
            let Ok(pieces) = Vec::<Piece>::arbitrary_take_rest(Unstructured::new(rest)) else {
                return;
            };
            let entries: Vec<Entry> = pieces.iter().take(16).map(|p| entry(p, &canary)).collect();
            let Ok(tar) = layer_tar(&entries) else { return };
            (tar, mode % 4 == 3)
        }
        None => return,
    };
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let parent = base
        .dir
        .join(format!("run-{}", NEXT.fetch_add(1, Ordering::Relaxed)));
    let tree = parent.join("tree");
    fs::create_dir_all(&tree).expect("unpack root");
    let mode = if base.layer_mode && !archive_mode {
        UnpackMode::Layer
    } else {
        UnpackMode::Archive
    };
    let _ = unpack(tar.as_slice(), &tree, mode);
    assert_empty(&base.canary);
    let beside = fs::read_dir(&parent).map(|d| d.count()).unwrap_or(0);
    assert_eq!(beside, 1, "wrote beside the unpack root");
    if fs::remove_dir_all(&parent).is_err() {
        // A tree with read-only directories (as a non-root user): make them writable.
        let _ = std::process::Command::new("chmod")
            .args(["-R", "u+rwx"])
            .arg(&parent)
            .status();
        let _ = fs::remove_dir_all(&parent);
    }
});
