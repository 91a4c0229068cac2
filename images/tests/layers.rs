//! Converted layers as overlayfs sees them (whiteouts, opaque directories, metadata), and
//! hostile layer tars: nothing is ever written outside the staging directory. Needs root
//! (conversion, mounts); skips otherwise.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use common::{image, mount_erofs, mount_overlay, root_or_skip, Env};
use images::fixtures::{Entry, Image, Layer};
use images::unpack::UnpackError;
use images::{convert::ConvertError, StoreError};

fn mount_layers(env: &Env, reference: &str) -> (Vec<common::Mount>, common::Mount) {
    let resolved = env.store.resolve(reference).unwrap();
    let mut mounts = Vec::new();
    let mut dirs: Vec<PathBuf> = Vec::new();
    for (i, layer) in resolved.layers.iter().enumerate() {
        let mount = mount_erofs(&layer.path, &env.path(&format!("layer{i}")));
        dirs.push(mount.path.clone());
        mounts.push(mount);
    }
    let overlay = mount_overlay(&dirs, &env.path("rootfs"));
    (mounts, overlay)
}

#[test]
fn whiteouts_and_opaque_dirs_show_right_tree_in_overlay() {
    if !root_or_skip("whiteouts_and_opaque_dirs_show_right_tree_in_overlay") {
        return;
    }
    let env = Env::new();
    let image = Image {
        layers: vec![
            Layer::new(vec![
                Entry::dir("etc"),
                Entry::file("etc/keep", "keep"),
                Entry::file("etc/gone", "gone"),
                Entry::dir("var/cache"),
                Entry::file("var/cache/old1", "1"),
                Entry::file("var/cache/old2", "2"),
                Entry::dir("opt/tree/sub"),
                Entry::file("opt/tree/sub/f", "f"),
            ]),
            Layer::new(vec![
                Entry::whiteout("etc/gone"),
                Entry::opaque("var/cache"),
                Entry::file("var/cache/new", "new"),
                Entry::whiteout("opt/tree"),
                Entry::file("usr/bin/tool", "#!/bin/sh\n")
                    .mode(0o4755)
                    .owner(1000, 1001)
                    .mtime(1_234_567_890)
                    .xattr("user.note", "hello"),
                Entry::hardlink("usr/bin/tool2", "usr/bin/tool"),
                Entry::symlink("usr/bin/abs", "/etc/keep"),
            ]),
        ],
        ..Image::default()
    };
    let (dir, _) = env.layout("oci", &image);
    env.import(&dir, Some("layers")).unwrap();

    let (_layers, overlay) = mount_layers(&env, "layers");

    let root = &overlay.path;
    assert_eq!(fs::read_to_string(root.join("etc/keep")).unwrap(), "keep");
    assert!(!root.join("etc/gone").exists());
    let mut cache: Vec<_> = fs::read_dir(root.join("var/cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    cache.sort();
    assert_eq!(cache, vec![std::ffi::OsString::from("new")]);
    assert!(!root.join("opt/tree").exists());
    let tool = fs::metadata(root.join("usr/bin/tool")).unwrap();
    assert_eq!(tool.mode() & 0o7777, 0o4755);
    assert_eq!((tool.uid(), tool.gid()), (1000, 1001));
    assert_eq!(tool.mtime(), 1_234_567_890);
    assert_eq!(tool.nlink(), 2);
    assert_eq!(
        fs::metadata(root.join("usr/bin/tool2")).unwrap().ino(),
        tool.ino()
    );
    assert_eq!(
        fs::read_link(root.join("usr/bin/abs")).unwrap(),
        Path::new("/etc/keep")
    );
    let note = xattr_of(&root.join("usr/bin/tool"), "user.note");
    assert_eq!(note.as_deref(), Some(&b"hello"[..]));
}

fn xattr_of(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    let n = rustix::fs::getxattr(path, name, &mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// A directory outside the store that hostile layers aim at; must stay empty.
fn canary(env: &Env) -> PathBuf {
    let path = env.path("canary");
    fs::create_dir_all(&path).unwrap();
    path
}

fn assert_canary_empty(canary: &Path) {
    assert_eq!(
        fs::read_dir(canary).unwrap().count(),
        0,
        "something escaped into the canary"
    );
}

#[test]
fn hostile_symlinks_resolve_inside_the_layer() {
    if !root_or_skip("hostile_symlinks_resolve_inside_the_layer") {
        return;
    }
    let env = Env::new();
    let canary = canary(&env);
    let abs = canary.to_str().unwrap().to_string();
    let image = image(vec![
        // An absolute symlink, then a file written "through" it.
        Entry::symlink("evil", &abs),
        Entry::file("evil/pwned", "x"),
        // A relative symlink climbing out, then a directory and file through it.
        Entry::symlink("up", "../../../../../../../../.."),
        Entry::file(format!("up{abs}/pwned2"), "x"),
        // A parent replaced by a symlink after being a directory.
        Entry::dir("d"),
        Entry::symlink("d", &abs),
        Entry::file("d/pwned3", "x"),
        // An absolute entry name.
        Entry::file(format!("{abs}/pwned4"), "x"),
    ]);
    let (dir, _) = env.layout("oci", &image);

    env.import(&dir, Some("hostile")).unwrap();

    assert_canary_empty(&canary);
    let resolved = env.store.resolve("hostile").unwrap();
    let mount = mount_erofs(&resolved.layers[0].path, &env.path("mnt"));
    let inside = mount.path.join(abs.trim_start_matches('/'));
    let mut names: Vec<_> = fs::read_dir(&inside)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["pwned", "pwned2", "pwned3", "pwned4"]);
    assert_eq!(
        fs::read_link(mount.path.join("evil")).unwrap(),
        Path::new(&abs)
    );
}

fn import_err(entries: Vec<Entry>) -> (Env, PathBuf, StoreError) {
    let env = Env::new();
    let canary = canary(&env);
    let (dir, _) = env.layout("oci", &image(entries));
    let err = env.import(&dir, Some("hostile")).unwrap_err();
    (env, canary, err)
}

fn unpack_error(err: &StoreError) -> &UnpackError {
    match err {
        StoreError::Convert(ConvertError::Unpack { source, .. }) => source,
        other => panic!("expected an unpack error, got {other}"),
    }
}

#[test]
fn hostile_dotdot_traversal_is_refused() {
    if !root_or_skip("hostile_dotdot_traversal_is_refused") {
        return;
    }
    let (env, canary, err) = import_err(vec![Entry::file("a/../../canary/pwned", "x")]);

    assert!(
        matches!(unpack_error(&err), UnpackError::Escapes { .. }),
        "{err}"
    );
    assert_canary_empty(&canary);
    env.assert_empty();
}

#[test]
fn hostile_hardlink_escape_is_refused() {
    if !root_or_skip("hostile_hardlink_escape_is_refused") {
        return;
    }
    let (env, canary, err) = import_err(vec![Entry::hardlink("h", "../../../../etc/passwd")]);

    assert!(
        matches!(unpack_error(&err), UnpackError::Escapes { .. }),
        "{err}"
    );
    assert_canary_empty(&canary);
    env.assert_empty();
}

#[test]
fn hostile_hardlink_to_host_file_is_refused() {
    if !root_or_skip("hostile_hardlink_to_host_file_is_refused") {
        return;
    }
    // /etc/passwd exists on the host but not in the layer; through a symlink too.
    let (env, _, err) = import_err(vec![
        Entry::symlink("s", "/etc"),
        Entry::hardlink("h", "s/passwd"),
    ]);

    assert!(
        matches!(unpack_error(&err), UnpackError::LinkTarget { .. }),
        "{err}"
    );
    env.assert_empty();
}

#[test]
fn hostile_truncated_entry_is_a_read_error() {
    if !root_or_skip("hostile_truncated_entry_is_a_read_error") {
        return;
    }
    let (env, _, err) = import_err(vec![Entry::file("big", "short").claim_size(1 << 40)]);

    assert!(matches!(unpack_error(&err), UnpackError::Read(_)), "{err}");
    env.assert_empty();
}

#[test]
fn device_nodes_fifos_and_replacements_are_kept_in_the_image() {
    if !root_or_skip("device_nodes_fifos_and_replacements_are_kept_in_the_image") {
        return;
    }
    let env = Env::new();
    let image = image(vec![
        Entry::dir("./").mode(0o700).mtime(1),
        Entry::dir(".").mode(0o755),
        Entry::char_dev("dev/null", 1, 3),
        Entry::block_dev("dev/sda", 8, 0),
        Entry::fifo("run/fifo"),
        // Duplicates: the later entry wins.
        Entry::file("dup", "first"),
        Entry::file("dup", "second"),
        // A file replacing a directory tree, a directory replacing a file.
        Entry::dir("x/y"),
        Entry::file("x/y/z", "deep"),
        Entry::file("x", "now a file"),
        Entry::file("w", "was a file"),
        Entry::dir("w").mode(0o750),
        // Whiteout of something absent is still a whiteout.
        Entry::whiteout("absent"),
    ]);
    let (dir, _) = env.layout("oci", &image);

    env.import(&dir, Some("nodes")).unwrap();

    let resolved = env.store.resolve("nodes").unwrap();
    let mount = mount_erofs(&resolved.layers[0].path, &env.path("mnt"));
    let root = &mount.path;
    assert_eq!(fs::metadata(root).unwrap().mode() & 0o7777, 0o755);
    let null = fs::symlink_metadata(root.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
    assert!(fs::symlink_metadata(root.join("dev/sda"))
        .unwrap()
        .file_type()
        .is_block_device());
    assert!(fs::symlink_metadata(root.join("run/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(fs::read_to_string(root.join("dup")).unwrap(), "second");
    assert_eq!(fs::read_to_string(root.join("x")).unwrap(), "now a file");
    let w = fs::metadata(root.join("w")).unwrap();
    assert!(w.is_dir());
    assert_eq!(w.mode() & 0o7777, 0o750);
    let absent = fs::symlink_metadata(root.join("absent")).unwrap();
    assert!(absent.file_type().is_char_device());
    assert_eq!(absent.rdev(), 0);
}
