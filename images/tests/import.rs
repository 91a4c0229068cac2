//! Import of OCI layouts (dir, tar), docker save archives, verification, sharing, rm and
//! prune. Needs root (layer conversion); skips otherwise.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::Instant;

use common::{image, mount_erofs, root_or_skip, Env};
use images::fixtures::{self, Compression, Entry, Image, Layer, Written};
use images::layout::LayoutError;
use images::progress::NoProgress;
use images::{convert::ConvertError, StoreError};

#[test]
fn import_busybox_layout_dir_resolves_runnable_image() {
    if !root_or_skip("import_busybox_layout_dir_resolves_runnable_image") {
        return;
    }
    let env = Env::new();
    let (dir, written) = env.layout("oci", &fixtures::busybox_image("latest").unwrap());

    let started = Instant::now();
    let record = env.import(&dir, Some("busybox")).unwrap();
    eprintln!(
        "busybox layer imported in {} ms, erofs {} bytes",
        started.elapsed().as_millis(),
        record.size()
    );

    assert_eq!(record.digest.to_string(), written.manifest_digest);
    assert_eq!(record.names, vec!["busybox:latest".to_string()]);
    let resolved = env.store.resolve("busybox").unwrap();
    let config = resolved.config.config().clone().unwrap();
    assert_eq!(config.cmd().clone().unwrap(), vec!["/bin/sh".to_string()]);
    assert_eq!(resolved.layers.len(), 1);
    assert_eq!(resolved.layers[0].diff_id.to_string(), written.diff_ids[0]);
    let mount = mount_erofs(&resolved.layers[0].path, &env.path("mnt"));
    let output = Command::new(mount.path.join("bin/busybox"))
        .arg("true")
        .status()
        .unwrap();
    assert!(output.success());
    assert_eq!(
        fs::read_link(mount.path.join("bin/sh")).unwrap().to_str(),
        Some("busybox")
    );
    let tmp = fs::symlink_metadata(mount.path.join("tmp")).unwrap();
    assert_eq!(tmp.mode() & 0o7777, 0o1777);
    assert_eq!(env.files("tmp"), Vec::<String>::new());
}

#[test]
fn import_oci_tar_with_zstd_and_plain_layers() {
    if !root_or_skip("import_oci_tar_with_zstd_and_plain_layers") {
        return;
    }
    let env = Env::new();
    let image = Image {
        layers: vec![
            Layer::new(vec![Entry::file("a", "zstd")]).compressed(Compression::Zstd),
            Layer::new(vec![Entry::file("b", "plain")]).compressed(Compression::None),
        ],
        tag: Some("example.com/two:1".into()),
        ..Image::default()
    };
    let (dir, _) = env.layout("oci", &image);
    let tar = env.path("oci.tar");
    fixtures::tar_directory(&dir, &tar).unwrap();

    let records = env.store.import_path(&tar, None, &NoProgress).unwrap();

    assert_eq!(records.len(), 1);
    assert_eq!(records[0].names, vec!["example.com/two:1".to_string()]);
    assert_eq!(
        env.store.resolve("example.com/two:1").unwrap().layers.len(),
        2
    );
    assert_eq!(env.files("tmp"), Vec::<String>::new());
}

#[test]
fn import_docker_archive_from_skopeo() {
    if !root_or_skip("import_docker_archive_from_skopeo") {
        return;
    }
    let env = Env::new();
    let mut image = fixtures::busybox_image("v1").unwrap();
    image
        .layers
        .push(Layer::new(vec![Entry::file("etc/motd", "hi\n")]));
    let (dir, written) = env.layout("oci", &image);
    let archive = env.path("docker.tar");
    let status = Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(format!("oci:{}:v1", dir.display()))
        .arg(format!(
            "docker-archive:{}:example/bb:v1",
            archive.display()
        ))
        .status()
        .expect("skopeo (scripts/install-deps.sh)");
    assert!(status.success());

    let records = env.store.import_path(&archive, None, &NoProgress).unwrap();

    // skopeo writes the RepoTag fully qualified; the short name still resolves.
    assert_eq!(
        records[0].names,
        vec!["docker.io/example/bb:v1".to_string()]
    );
    let resolved = env.store.resolve("example/bb:v1").unwrap();
    let diff_ids: Vec<String> = resolved
        .layers
        .iter()
        .map(|l| l.diff_id.to_string())
        .collect();
    assert_eq!(diff_ids, written.diff_ids);
}

#[test]
fn import_multi_platform_index_picks_amd64() {
    if !root_or_skip("import_multi_platform_index_picks_amd64") {
        return;
    }
    let env = Env::new();
    let image = Image {
        multi_platform: true,
        ..image(vec![Entry::file("f", "x")])
    };
    let (dir, written) = env.layout("oci", &image);

    let record = env.import(&dir, Some("multi")).unwrap();

    assert_eq!(record.digest.to_string(), written.manifest_digest);
}

#[test]
fn two_images_sharing_a_layer_store_it_once() {
    if !root_or_skip("two_images_sharing_a_layer_store_it_once") {
        return;
    }
    let env = Env::new();
    let base = Layer::new(vec![Entry::file("base", "shared")]);
    let one = Image {
        layers: vec![base.clone(), Layer::new(vec![Entry::file("one", "1")])],
        ..Image::default()
    };
    let two = Image {
        layers: vec![base, Layer::new(vec![Entry::file("two", "2")])],
        ..Image::default()
    };
    let (dir_one, _) = env.layout("one", &one);
    let (dir_two, _) = env.layout("two", &two);

    env.import(&dir_one, Some("one")).unwrap();
    env.import(&dir_two, Some("two")).unwrap();

    let a = env.store.resolve("one").unwrap();
    let b = env.store.resolve("two").unwrap();
    assert_eq!(a.layers[0].path, b.layers[0].path);
    let ino = |p: &std::path::Path| fs::metadata(p).unwrap().ino();
    assert_eq!(ino(&a.layers[0].path), ino(&b.layers[0].path));
    assert_eq!(env.files("layers/sha256").len(), 3);
}

#[test]
fn concurrent_imports_of_one_image_both_succeed() {
    if !root_or_skip("concurrent_imports_of_one_image_both_succeed") {
        return;
    }
    let env = Env::new();
    let (dir, _) = env.layout("oci", &image(vec![Entry::file("f", "x")]));

    std::thread::scope(|s| {
        let a = s.spawn(|| env.import(&dir, Some("a")).map(|r| r.digest));
        let b = s.spawn(|| env.import(&dir, Some("b")).map(|r| r.digest));
        assert_eq!(a.join().unwrap().unwrap(), b.join().unwrap().unwrap());
    });

    assert_eq!(env.files("layers/sha256").len(), 1);
    assert_eq!(env.files("images").len(), 1);
}

#[test]
fn corrupted_layer_blob_keeps_nothing() {
    if !root_or_skip("corrupted_layer_blob_keeps_nothing") {
        return;
    }
    let env = Env::new();
    let (dir, written) = env.layout("oci", &image(vec![Entry::file("f", "x")]));
    let blob = Written::blob_path(&dir, &written.layer_digests[0]);
    let mut bytes = fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&blob, bytes).unwrap();

    let err = env.import(&dir, Some("bad")).unwrap_err();

    assert!(
        matches!(err, StoreError::Layout(LayoutError::DigestMismatch { .. })),
        "{err}"
    );
    env.assert_empty();
}

#[test]
fn wrong_diff_id_keeps_nothing() {
    if !root_or_skip("wrong_diff_id_keeps_nothing") {
        return;
    }
    let env = Env::new();
    let image = Image {
        diff_ids_override: Some(vec![fixtures::sha256_digest(b"not the layer")]),
        ..image(vec![Entry::file("f", "x")])
    };
    let (dir, _) = env.layout("oci", &image);

    let err = env.import(&dir, Some("bad")).unwrap_err();

    assert!(
        matches!(
            err,
            StoreError::Convert(ConvertError::DiffIdMismatch { .. })
        ),
        "{err}"
    );
    env.assert_empty();
}

/// Writes `bytes` as a blob of the layout and points index.json at it as the manifest.
fn point_index_at(dir: &std::path::Path, manifest: &[u8]) {
    let digest = fixtures::sha256_digest(manifest);
    fs::write(Written::blob_path(dir, &digest), manifest).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": manifest.len(),
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

#[test]
fn malformed_manifest_names_file_and_field() {
    let env = Env::new();
    let (dir, _) = env.layout("oci", &image(vec![]));
    point_index_at(&dir, br#"{"schemaVersion": 2, "config": {"mediaType": "x", "digest": "sha256:00", "size": 1}, "layers": 7}"#);

    let err = env.import(&dir, None).unwrap_err();

    let StoreError::Layout(LayoutError::Malformed { path, field, .. }) = &err else {
        panic!("unexpected error: {err}");
    };
    assert!(path.starts_with(dir.join("blobs/sha256")));
    assert!(
        field.starts_with("config") || field.starts_with("layers"),
        "{field}"
    );
    env.assert_empty();
}

#[test]
fn malformed_config_names_field() {
    let env = Env::new();
    let (dir, _) = env.layout("oci", &image(vec![]));
    let config =
        br#"{"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": 5}}"#;
    let config_digest = fixtures::sha256_digest(config);
    fs::write(Written::blob_path(&dir, &config_digest), config).unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [],
    });
    point_index_at(&dir, &serde_json::to_vec(&manifest).unwrap());

    let err = env.import(&dir, None).unwrap_err();

    let StoreError::Layout(LayoutError::Malformed { field, .. }) = &err else {
        panic!("unexpected error: {err}");
    };
    assert_eq!(field, "rootfs.diff_ids");
}

#[test]
fn malformed_index_json_is_refused() {
    let env = Env::new();
    let (dir, _) = env.layout("oci", &image(vec![]));
    fs::write(dir.join("index.json"), b"{not json").unwrap();

    let err = env.import(&dir, None).unwrap_err();

    assert!(
        matches!(err, StoreError::Layout(LayoutError::Malformed { .. })),
        "{err}"
    );
}

#[test]
fn sha512_layer_digest_is_refused() {
    let env = Env::new();
    let (dir, _) = env.layout("oci", &image(vec![]));
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha512:{}", "a".repeat(128)), "size": 1},
        "layers": [],
    });
    point_index_at(&dir, &serde_json::to_vec(&manifest).unwrap());

    let err = env.import(&dir, None).unwrap_err();

    assert!(err.to_string().contains("config.digest"), "{err}");
    assert!(
        format!("{:?}", err).contains("UnsupportedAlgorithm"),
        "{err:?}"
    );
}

#[test]
fn resolve_unknown_image_says_how_to_get_it() {
    let env = Env::new();

    let err = env.store.resolve("nosuch:1").unwrap_err();

    assert!(matches!(err, StoreError::NotFound { .. }));
    assert!(
        err.to_string().contains("crib image pull nosuch:1"),
        "{err}"
    );
}

#[test]
fn rm_keeps_layers_until_prune() {
    if !root_or_skip("rm_keeps_layers_until_prune") {
        return;
    }
    let env = Env::new();
    let shared = Layer::new(vec![Entry::file("s", "shared")]);
    let keep = Image {
        layers: vec![shared.clone()],
        ..Image::default()
    };
    let gone = Image {
        layers: vec![shared, Layer::new(vec![Entry::file("g", "gone")])],
        ..Image::default()
    };
    let (dir_keep, _) = env.layout("keep", &keep);
    let (dir_gone, _) = env.layout("gone", &gone);
    env.import(&dir_keep, Some("keep")).unwrap();
    let removed = env.import(&dir_gone, Some("gone")).unwrap();

    env.store.remove("gone").unwrap();

    assert!(matches!(
        env.store.resolve("gone"),
        Err(StoreError::NotFound { .. })
    ));
    assert!(env.store.root().join(&removed.layers[1].erofs).exists());
    let stats = env.store.prune().unwrap();
    assert_eq!(stats.layers, 1);
    assert_eq!(stats.blobs, 3); // its manifest, config and second layer blob
    assert!(!env.store.root().join(&removed.layers[1].erofs).exists());
    assert_eq!(env.store.resolve("keep").unwrap().layers.len(), 1);
}

#[test]
fn lookup_by_digest_prefix() {
    if !root_or_skip("lookup_by_digest_prefix") {
        return;
    }
    let env = Env::new();
    let (dir, written) = env.layout("oci", &image(vec![Entry::file("f", "x")]));
    env.import(&dir, None).unwrap();

    let record = env.store.record(&written.manifest_digest[7..19]).unwrap();

    assert_eq!(record.digest.to_string(), written.manifest_digest);
    assert!(record.names.is_empty());
}

#[test]
fn import_legacy_docker_archive_with_linked_layer_gzipped() {
    if !root_or_skip("import_legacy_docker_archive_with_linked_layer_gzipped") {
        return;
    }
    let env = Env::new();
    // Old `docker save`: <id>/layer.tar, a repeated layer as a symlink to the first.
    let layer = fixtures::layer_tar(&[Entry::file("hello", "world")]).unwrap();
    let diff_id = fixtures::sha256_digest(&layer);
    let config = serde_json::to_vec(&fixtures::config_json(
        &fixtures::Config::default(),
        &[diff_id.clone(), diff_id.clone()],
    ))
    .unwrap();
    let manifest = serde_json::json!([{
        "Config": "cfg.json",
        "RepoTags": ["legacy:1"],
        "Layers": ["l1/layer.tar", "l2/layer.tar"],
    }]);
    let archive = fixtures::layer_tar(&[
        Entry::file("manifest.json", serde_json::to_vec(&manifest).unwrap()),
        Entry::file("cfg.json", config),
        Entry::dir("l1"),
        Entry::file("l1/layer.tar", &layer),
        Entry::dir("l2"),
        Entry::symlink("l2/layer.tar", "../l1/layer.tar"),
    ])
    .unwrap();
    let path = env.path("legacy.tar.gz");
    fs::write(
        &path,
        fixtures::compress(&archive, Compression::Gzip).unwrap(),
    )
    .unwrap();

    let records = env.store.import_path(&path, None, &NoProgress).unwrap();

    assert_eq!(records[0].names, vec!["legacy:1".to_string()]);
    let resolved = env.store.resolve("legacy:1").unwrap();
    assert_eq!(resolved.layers.len(), 2);
    assert_eq!(resolved.layers[0].path, resolved.layers[1].path);
    assert_eq!(env.files("tmp"), Vec::<String>::new());
}

#[test]
fn import_docker25_archive_uses_its_oci_index() {
    if !root_or_skip("import_docker25_archive_uses_its_oci_index") {
        return;
    }
    let env = Env::new();
    let (dir, written) = env.layout("oci", &image(vec![Entry::file("f", "x")]));
    // Docker 25+: the OCI layout plus a legacy manifest.json pointing into blobs/, and the
    // name in index.json's containerd annotation.
    let mut index: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["annotations"] = serde_json::json!({
        "io.containerd.image.name": "docker.io/library/modern:2",
        "org.opencontainers.image.ref.name": "2",
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    let hex = |d: &str| d.trim_start_matches("sha256:").to_string();
    let manifest = serde_json::json!([{
        "Config": format!("blobs/sha256/{}", hex(&written.config_digest)),
        "RepoTags": ["modern:2"],
        "Layers": [format!("blobs/sha256/{}", hex(&written.layer_digests[0]))],
    }]);
    fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let tar = env.path("docker25.tar");
    fixtures::tar_directory(&dir, &tar).unwrap();

    let records = env.store.import_path(&tar, None, &NoProgress).unwrap();

    assert_eq!(records[0].digest.to_string(), written.manifest_digest);
    assert_eq!(
        records[0].names,
        vec!["docker.io/library/modern:2".to_string()]
    );
    assert!(env.store.resolve("modern:2").is_ok());
}

#[test]
fn archive_symlink_to_host_file_is_not_read() {
    let env = Env::new();
    let manifest = serde_json::json!([{"Config": "cfg.json", "RepoTags": [], "Layers": []}]);
    let archive = fixtures::layer_tar(&[
        Entry::file("manifest.json", serde_json::to_vec(&manifest).unwrap()),
        Entry::symlink("cfg.json", "/etc/passwd"),
    ])
    .unwrap();
    let path = env.path("evil.tar");
    fs::write(&path, archive).unwrap();

    let err = env.store.import_path(&path, None, &NoProgress).unwrap_err();

    // Resolved inside the archive, /etc/passwd does not exist.
    assert!(
        matches!(err, StoreError::Layout(LayoutError::Read { .. })),
        "{err}"
    );
}

#[test]
fn import_from_store_staging_moves_blobs() {
    if !root_or_skip("import_from_store_staging_moves_blobs") {
        return;
    }
    let env = Env::new();
    // What the registry pull does: write the layout in a staging dir, then import it.
    let staging = env.store.staging_dir().unwrap();
    let dir = staging.path().join("oci");
    let written =
        fixtures::write_oci_layout(&dir, &image(vec![Entry::file("pulled", "yes")])).unwrap();

    env.import(&dir, Some("pulled")).unwrap();

    assert!(
        !Written::blob_path(&dir, &written.layer_digests[0]).exists(),
        "renamed, not copied"
    );
    assert!(env.store.resolve("pulled").is_ok());
    drop(staging);
    assert_eq!(env.files("tmp"), Vec::<String>::new());
}
