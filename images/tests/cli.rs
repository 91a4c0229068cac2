//! `crib image` subcommands through `images::cli::run`, as the crib binary calls them.

mod common;

use clap::Parser;
use common::{root_or_skip, Env};
use images::cli::{self, ImageCommand};
use images::fixtures;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: ImageCommand,
}

fn run(env: &Env, args: &[&str]) -> u8 {
    let root = env.store.root().to_str().unwrap().to_string();
    let mut argv = vec!["image"];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--state-dir", &root]);
    cli::run(Cli::try_parse_from(argv).unwrap().command)
}

#[test]
fn import_ls_inspect_rm_prune_round_trip() {
    if !root_or_skip("import_ls_inspect_rm_prune_round_trip") {
        return;
    }
    let env = Env::new();
    let (dir, written) = env.layout("oci", &fixtures::busybox_image("latest").unwrap());

    assert_eq!(
        run(&env, &["import", dir.to_str().unwrap(), "--name", "bb:1"]),
        0
    );
    assert_eq!(run(&env, &["ls"]), 0);
    assert_eq!(run(&env, &["inspect", "bb:1"]), 0);
    let value = cli::inspect(&env.store, "bb:1").unwrap();
    assert_eq!(value["digest"], written.manifest_digest);
    assert!(value["layers"][0]["file"]
        .as_str()
        .unwrap()
        .ends_with(".erofs"));
    assert_eq!(run(&env, &["rm", "bb:1"]), 0);
    assert_eq!(run(&env, &["inspect", "bb:1"]), 1);
    assert_eq!(run(&env, &["prune"]), 0);
    env.assert_empty();
}

#[test]
fn import_missing_path_fails() {
    let env = Env::new();

    assert_eq!(run(&env, &["import", "/nonexistent/image.tar"]), 1);
}
