//! Fuzzes the shim's mountinfo reader (`crib_shim::mount::mounts_under`): the mount points
//! at or below a container's directories in `/proc/self/mountinfo`, which the shim
//! unmounts before it removes them. Mount points are paths anyone who can mount in the
//! shim's mount namespace names (a privileged pod's bidirectional mounts, a user's FUSE
//! mount), written with the kernel's octal escapes.
//!
//! Inputs are either raw bytes (the file as is, the directory from a small pool) or
//! structured lines whose mount points are at, below, beside or away from the directory,
//! their components any bytes, written as the kernel writes them (space, tab, newline and
//! backslash as `\ooo`), with optional fields and root paths of varying shape. Invariants:
//! no input panics; for structured lines the reader returns exactly the mount points at or
//! below the directory (as a multiset), deepest first.

#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use arbitrary::{Arbitrary, Unstructured};
use crib_shim::mount::mounts_under;
use libfuzzer_sys::fuzz_target;

/// Directories the shim unmounts below: a container's state directory, and a bundle's
/// rootfs.
const DIRS: &[&str] = &[
    "/run/crib-shim/c-0123456789abcdef",
    "/run/containerd/io.containerd.runtime.v2.task/k8s.io/c1/rootfs",
    "/",
];

/// One path component: any bytes but `/` and NUL, never empty, `.` or `..` (the kernel
/// prints canonical paths).
#[derive(Debug)]
struct Component(Vec<u8>);

impl<'a> Arbitrary<'a> for Component {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let mut bytes: Vec<u8> = match u.choose_index(4)? {
            0 => u.arbitrary()?,
            1 => b"share".to_vec(),
            2 => b"container".to_vec(),
            _ => b"a b\\c\td\n".to_vec(),
        };
        bytes.retain(|b| *b != b'/' && *b != 0);
        if bytes.is_empty() || bytes == b"." || bytes == b".." {
            bytes = b"x".to_vec();
        }
        Ok(Component(bytes))
    }
}

#[derive(Arbitrary, Debug)]
enum Point {
    /// The directory itself.
    At,
    /// Below the directory.
    Below(Vec<Component>),
    /// A sibling sharing the directory's name as a prefix (`c-1` and `c-10`).
    Beside(Component),
    /// Anywhere (made absolute).
    Away(Vec<Component>),
}

#[derive(Arbitrary, Debug)]
struct Line {
    id: u16,
    parent: u16,
    root: Vec<Component>,
    point: Point,
    /// `shared:N`, `master:N`...: zero or more.
    optional: Vec<u8>,
    fs: u8,
}

#[derive(Arbitrary, Debug)]
struct Input {
    dir: u8,
    lines: Vec<Line>,
    trailing_newline: bool,
}

fn join(base: &[u8], components: &[Component]) -> Vec<u8> {
    let mut path = base.to_vec();
    for c in components {
        if path.last() != Some(&b'/') {
            path.push(b'/');
        }
        path.extend_from_slice(&c.0);
    }
    if path.is_empty() {
        path.push(b'/');
    }
    path
}

/// The kernel's `seq_path`/`mangle`: space, tab, newline and backslash as `\ooo`.
fn escape(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    for &b in path {
        if matches!(b, b' ' | b'\t' | b'\n' | b'\\') {
            out.extend_from_slice(format!("\\{b:03o}").as_bytes());
        } else {
            out.push(b);
        }
    }
    out
}

fn path(bytes: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(bytes))
}

fn structured(input: Input) {
    let dir = DIRS[usize::from(input.dir) % DIRS.len()];
    let mut text = Vec::new();
    let mut expected = Vec::new();
    for line in input.lines {
        let point = match &line.point {
            Point::At => dir.as_bytes().to_vec(),
            Point::Below(c) => join(dir.as_bytes(), c),
            Point::Beside(c) => {
                let mut p = dir.as_bytes().to_vec();
                p.extend_from_slice(&c.0);
                p
            }
            Point::Away(c) => join(b"/", c),
        };
        if path(&point).starts_with(dir) {
            expected.push(path(&point));
        }
        let root = join(b"/", &line.root);
        let fs = [
            "ext4 /dev/vda rw",
            "overlay overlay rw,lowerdir=/l,upperdir=/u",
            "tmpfs tmpfs rw,size=4k",
        ];
        text.extend_from_slice(format!("{} {} 0:{} ", line.id, line.parent, line.fs).as_bytes());
        text.extend_from_slice(&escape(&root));
        text.push(b' ');
        text.extend_from_slice(&escape(&point));
        text.extend_from_slice(b" rw,relatime");
        for (i, o) in line.optional.iter().take(3).enumerate() {
            let tag = ["shared", "master", "propagate_from"][usize::from(*o) % 3];
            text.extend_from_slice(format!(" {tag}:{i}").as_bytes());
        }
        text.extend_from_slice(b" - ");
        text.extend_from_slice(fs[usize::from(line.fs) % fs.len()].as_bytes());
        text.push(b'\n');
    }
    if !input.trailing_newline {
        text.pop();
    }
    let found = mounts_under(&text, Path::new(dir));
    let depths: Vec<usize> = found.iter().map(|p| p.components().count()).collect();
    assert!(
        depths.windows(2).all(|w| w[0] >= w[1]),
        "not deepest first: {found:?}"
    );
    let mut found_sorted = found.clone();
    found_sorted.sort();
    expected.sort();
    assert_eq!(
        found_sorted,
        expected,
        "the mount points below {dir} in {:?}",
        String::from_utf8_lossy(&text)
    );
}

fuzz_target!(|data: &[u8]| {
    // The first byte chooses: even, the rest is the file as is; odd, structured lines.
    match data.split_first() {
        Some((mode, rest)) if mode % 2 == 0 => {
            let dir = DIRS[usize::from(mode / 2) % DIRS.len()];
            let _ = mounts_under(rest, Path::new(dir));
        }
        Some((_, rest)) => {
            if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(rest)) {
                structured(input);
            }
        }
        None => {}
    }
});
