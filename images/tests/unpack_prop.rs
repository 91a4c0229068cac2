//! Random layers built from hostile pieces (traversal, absolute and climbing symlinks,
//! hard links, whiteouts, nodes, replacements) never write outside the unpack root and
//! never panic: each either unpacks or fails with an error. Needs root; skips otherwise.

mod common;

use std::fs;
use std::path::Path;

use images::fixtures::{layer_tar, Entry};
use images::unpack::{unpack, UnpackMode};
use proptest::prelude::*;

/// Names that collide with each other, climb, or go through symlinks.
fn name(canary: &str) -> impl Strategy<Value = String> {
    let canary = canary.to_string();
    prop_oneof![
        Just("a".to_string()),
        Just("a/b".to_string()),
        Just("a/b/c".to_string()),
        Just("l".to_string()),
        Just("l/x".to_string()),
        Just("l/y/z".to_string()),
        Just("../a".to_string()),
        Just("a/../../x".to_string()),
        Just("/abs/x".to_string()),
        Just("./a/./b".to_string()),
        Just(format!("{canary}/x")),
        Just(format!("l{canary}/y")),
    ]
}

fn entry(canary: &str) -> impl Strategy<Value = Entry> {
    let canary_target = canary.to_string();
    (name(canary), 0..9u8, name(canary)).prop_map(move |(path, kind, other)| match kind {
        0 => Entry::file(&path, "data"),
        1 => Entry::dir(&path),
        2 => Entry::symlink(&path, &canary_target),
        3 => Entry::symlink(&path, "../../../.."),
        4 => Entry::hardlink(&path, &other),
        5 => Entry::whiteout(&path),
        6 => Entry::opaque(&path),
        7 => Entry::char_dev(&path, 1, 3),
        _ => Entry::symlink(&path, &other),
    })
}

fn assert_empty(dir: &Path) {
    assert_eq!(
        fs::read_dir(dir).unwrap().count(),
        0,
        "wrote into {}",
        dir.display()
    );
}

#[test]
fn random_hostile_layers_stay_inside_the_root() {
    if !common::root_or_skip("random_hostile_layers_stay_inside_the_root") {
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let canary = base.path().join("canary");
    fs::create_dir(&canary).unwrap();
    let canary_str = canary.to_str().unwrap().to_string();
    let config = ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(entries in proptest::collection::vec(entry(&canary_str), 1..12))| {
        let tar = layer_tar(&entries).unwrap();
        let root = tempfile::tempdir_in(base.path()).unwrap();
        let tree = root.path().join("tree");
        fs::create_dir(&tree).unwrap();
        let _ = unpack(tar.as_slice(), &tree, UnpackMode::Layer);
        assert_empty(&canary);
        // Nothing beside the tree either.
        prop_assert_eq!(fs::read_dir(root.path()).unwrap().count(), 1);
    });
}
