//! `crib image pull` against a loopback registry (Debian's docker-registry), images pushed
//! from OCI layouts with skopeo. Host only; each test skips with a reason when it is not
//! root or docker-registry/skopeo are missing.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use images::fixtures::{self, Compression, Entry, Image, Layer, Written};
use images::registry::{pull, Pulled};
use images::{ensure, Digest, EnsureOptions, Progress, PullError, PullOptions, Store};
use support::registry::{free_port, Format, Registry, PASSWORD, USER};

/// Records what the pull reported.
#[derive(Default)]
struct Recorder {
    lines: Mutex<Vec<String>>,
}

impl Progress for Recorder {
    fn layer_started(&self, digest: &str, total_bytes: u64) {
        self.push(format!("started {digest} {total_bytes}"));
    }
    fn layer_advanced(&self, _digest: &str, _bytes: u64) {}
    fn layer_done(&self, digest: &str, what: &str) {
        self.push(format!("done {digest} {what}"));
    }
    fn message(&self, text: &str) {
        self.push(text.to_owned());
    }
}

impl Recorder {
    fn push(&self, line: String) {
        self.lines.lock().unwrap().push(line);
    }
    fn started(&self, digest: &str) -> bool {
        let prefix = format!("started {digest} ");
        self.lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with(&prefix))
    }
}

fn layer_digests(pulled: &Pulled) -> Vec<String> {
    pulled
        .record
        .layers
        .iter()
        .map(|l| l.digest.to_string())
        .collect()
}

fn has_blob(store: &Store, digest: &str) -> bool {
    store.blob_path(&Digest::parse(digest).unwrap()).exists()
}

fn store(dir: &tempfile::TempDir) -> Store {
    Store::open(&dir.path().join("store")).unwrap()
}

/// Writes `image` as an OCI layout under `dir` and pushes it as `name_tag`.
fn push_image(
    registry: &Registry,
    dir: &Path,
    image: &Image,
    name_tag: &str,
    format: Format,
) -> Written {
    let layout = dir.join(name_tag.replace([':', '/'], "_"));
    let written = fixtures::write_oci_layout(&layout, image).unwrap();
    registry
        .push(&layout, image.tag.as_deref().unwrap(), name_tag, format)
        .unwrap();
    written
}

fn pull_quietly(store: &Store, reference: &str) -> Result<Pulled, PullError> {
    pull(
        store,
        reference,
        &PullOptions::default(),
        &Recorder::default(),
    )
}

fn layer(entries: Vec<Entry>) -> Layer {
    Layer::new(entries)
}

fn image(layers: Vec<Layer>) -> Image {
    Image {
        layers,
        tag: Some("t".into()),
        ..Image::default()
    }
}

#[test]
fn pull_busybox_stores_the_image() {
    require_registry!();
    let registry = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let written = push_image(
        &registry,
        dir.path(),
        &fixtures::busybox_image("t").unwrap(),
        "busybox:latest",
        Format::Oci,
    );
    let store = store(&dir);

    let pulled = pull_quietly(&store, &registry.reference("busybox:latest")).unwrap();

    assert_eq!(pulled.manifest_digest, written.manifest_digest);
    assert_eq!(layer_digests(&pulled), written.layer_digests);
    let name = format!("{}/busybox:latest", registry.host());
    assert!(store.resolve(&name).is_ok());
}

#[test]
fn pull_docker_v2s2_manifest_stores_the_image() {
    require_registry!();
    let registry = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let written = push_image(
        &registry,
        dir.path(),
        &image(vec![layer(vec![Entry::file("hello", "world")])]),
        "docker/app:v1",
        Format::DockerV2S2,
    );
    let store = store(&dir);

    let pulled = pull_quietly(&store, &registry.reference("docker/app:v1")).unwrap();

    // skopeo rewrote the manifest as Docker's: same layers, another manifest digest.
    assert_ne!(pulled.manifest_digest, written.manifest_digest);
    assert_eq!(layer_digests(&pulled), written.layer_digests);
}

#[test]
fn pull_two_layers_with_deleted_files_stores_both_layers() {
    require_registry!();
    let registry = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = layer(vec![
        Entry::dir("etc"),
        Entry::file("etc/gone", "x"),
        Entry::file("etc/kept", "y"),
        Entry::dir("data"),
        Entry::file("data/old", "z"),
    ]);
    let top = layer(vec![
        Entry::dir("etc"),
        Entry::whiteout("etc/gone"),
        Entry::dir("data"),
        Entry::opaque("data"),
        Entry::file("data/new", "n"),
    ])
    .compressed(Compression::Zstd);
    let written = push_image(
        &registry,
        dir.path(),
        &image(vec![base, top]),
        "two:t",
        Format::Oci,
    );
    let store = store(&dir);

    let pulled = pull_quietly(&store, &registry.reference("two:t")).unwrap();

    assert_eq!(layer_digests(&pulled), written.layer_digests);
}

#[test]
fn pull_second_image_sharing_a_base_fetches_only_its_own_layer() {
    require_registry!();
    let registry = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = layer(vec![Entry::file("base", "shared by both images")]);
    let first = push_image(
        &registry,
        dir.path(),
        &image(vec![base.clone()]),
        "first:t",
        Format::Oci,
    );
    let extra = layer(vec![Entry::file("extra", "only in the second")]);
    let second = push_image(
        &registry,
        dir.path(),
        &image(vec![base, extra]),
        "second:t",
        Format::Oci,
    );
    let store = store(&dir);
    pull_quietly(&store, &registry.reference("first:t")).unwrap();
    let progress = Recorder::default();

    let pulled = pull(
        &store,
        &registry.reference("second:t"),
        &PullOptions::default(),
        &progress,
    )
    .unwrap();

    let base_digest = &first.layer_digests[0];
    assert_eq!(&second.layer_digests[0], base_digest);
    assert_eq!(pulled.skipped, vec![base_digest.clone()]);
    assert!(!progress.started(base_digest));
    assert!(progress.started(&second.layer_digests[1]));
    assert_eq!(registry.blob_gets(base_digest), 1);
}

fn pull_index_resolves_to_linux_amd64_as(format: Format) {
    let registry = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("multi");
    let arm = fixtures::write_oci_layout(
        &layout,
        &image(vec![layer(vec![Entry::file("arch", "arm64")])]),
    )
    .unwrap();
    let amd = fixtures::write_oci_layout(
        &layout,
        &image(vec![layer(vec![Entry::file("arch", "amd64")])]),
    )
    .unwrap();
    write_index(&layout, &[(&arm, "arm64"), (&amd, "amd64")]);
    registry
        .push_index(&layout, "t", "multi:t", format)
        .unwrap();
    let store = store(&dir);

    let pulled = pull_quietly(&store, &registry.reference("multi:t")).unwrap();

    assert_eq!(layer_digests(&pulled), amd.layer_digests);
    let list_type = registry.manifest_media_type("multi:t").unwrap();
    if format == Format::Oci {
        assert_eq!(list_type, "application/vnd.oci.image.index.v1+json");
        assert_eq!(pulled.manifest_digest, amd.manifest_digest);
    } else {
        assert_eq!(
            list_type,
            "application/vnd.docker.distribution.manifest.list.v2+json"
        );
    }
}

#[test]
fn pull_oci_index_resolves_to_linux_amd64() {
    require_registry!();
    pull_index_resolves_to_linux_amd64_as(Format::Oci);
}

#[test]
fn pull_docker_manifest_list_resolves_to_linux_amd64() {
    require_registry!();
    pull_index_resolves_to_linux_amd64_as(Format::DockerV2S2);
}

/// Makes `layout`'s index.json name one image index (tagged `t`) listing `images`, each a
/// linux image of the given architecture.
fn write_index(layout: &Path, images: &[(&Written, &str)]) {
    let manifests: Vec<serde_json::Value> = images
        .iter()
        .map(|(written, arch)| {
            let path = Written::blob_path(layout, &written.manifest_digest);
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": written.manifest_digest,
                "size": std::fs::metadata(path).unwrap().len(),
                "platform": {"os": "linux", "architecture": arch},
            })
        })
        .collect();
    let inner = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }))
    .unwrap();
    let digest = fixtures::sha256_digest(&inner);
    std::fs::write(Written::blob_path(layout, &digest), &inner).unwrap();
    let outer = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": digest,
            "size": inner.len(),
            "annotations": {"org.opencontainers.image.ref.name": "t"},
        }],
    });
    std::fs::write(layout.join("index.json"), outer.to_string()).unwrap();
}

#[test]
fn pull_unknown_image_names_it_and_the_registry() {
    require_registry!();
    let registry = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let reference = registry.reference("nothing/here:v9");

    let error = pull_quietly(&store, &reference).unwrap_err();
    eprintln!("error: {error}");

    assert!(
        matches!(error, PullError::ManifestUnknown { .. }),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        format!(
            "no image {reference} in registry {}: check the name and tag",
            registry.host()
        )
    );
}

#[test]
fn pull_from_closed_port_names_host_and_port() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let port = free_port().unwrap();

    let error = pull_quietly(&store, &format!("127.0.0.1:{port}/app:v1")).unwrap_err();
    eprintln!("error: {error}");

    assert!(matches!(error, PullError::Unreachable { .. }), "{error:?}");
    assert!(
        error.to_string().contains(&format!("127.0.0.1:{port}")),
        "{error}"
    );
}

#[test]
fn pull_blob_corrupted_in_the_registry_fails_and_stores_nothing() {
    require_registry!();
    let registry = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let written = push_image(
        &registry,
        dir.path(),
        &image(vec![layer(vec![Entry::file("payload", "a".repeat(4096))])]),
        "corrupt:t",
        Format::Oci,
    );
    let layer_digest = &written.layer_digests[0];
    let data = registry.blob_data(layer_digest);
    let mut bytes = std::fs::read(&data).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();
    let store = store(&dir);

    let error = pull_quietly(&store, &registry.reference("corrupt:t")).unwrap_err();
    eprintln!("error: {error}");

    assert!(
        matches!(&error, PullError::BlobDigest { digest, .. } if digest == layer_digest),
        "{error:?}"
    );
    assert!(error.to_string().contains("corrupt"), "{error}");
    assert!(store.list().unwrap().is_empty());
    assert!(!has_blob(&store, layer_digest));
    assert!(!has_blob(&store, &written.config_digest));
}

/// A manifest as a registry could serve it: valid JSON the registry stores, with a layer
/// digest that is no digest.
fn planted_manifest(registry: &Registry, dir: &Path, layer_field: &str) -> String {
    let written = push_image(
        registry,
        dir,
        &image(vec![layer(vec![Entry::file("f", "1")])]),
        "planted:base",
        Format::Oci,
    );
    let config_size = std::fs::metadata(Written::blob_path(
        &dir.join("planted_base"),
        &written.config_digest,
    ))
    .unwrap()
    .len();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
        "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{config_size}}},
        "layers":[{layer_field}]}}"#,
        written.config_digest
    );
    registry
        .plant_manifest("planted", "bad", manifest.as_bytes())
        .unwrap();
    registry.reference("planted:bad")
}

#[test]
fn pull_malformed_manifest_names_the_field() {
    require_registry!();
    let registry = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let reference = planted_manifest(
        &registry,
        dir.path(),
        r#"{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:../../../etc/passwd","size":10}"#,
    );
    let store = store(&dir);

    let error = pull_quietly(&store, &reference).unwrap_err();
    eprintln!("error: {error}");

    assert!(
        matches!(&error, PullError::MalformedManifest { field, .. } if field == "layers[0].digest"),
        "{error:?}"
    );
    assert!(error.to_string().contains(&reference), "{error}");
}

#[test]
fn pull_foreign_layer_is_refused_by_name() {
    require_registry!();
    let registry = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let reference = planted_manifest(
        &registry,
        dir.path(),
        &format!(
            r#"{{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"{}","size":10,"urls":["https://example.invalid/layer"]}}"#,
            fixtures::sha256_digest(b"foreign")
        ),
    );
    let store = store(&dir);

    let error = pull_quietly(&store, &reference).unwrap_err();
    eprintln!("error: {error}");

    assert!(matches!(error, PullError::ForeignLayer { .. }), "{error:?}");
}

/// The child of [`pull_killed_mid_download_then_next_pull_succeeds`]: pulls
/// `CRIB_TEST_PULL_REF` into `CRIB_TEST_PULL_STORE`, slowly (each chunk's progress waits),
/// printing `advanced` on stderr per chunk. Does nothing when run as an ordinary test.
#[test]
fn child_pull_for_kill_test() {
    let (Ok(reference), Ok(root)) = (
        std::env::var("CRIB_TEST_PULL_REF"),
        std::env::var("CRIB_TEST_PULL_STORE"),
    ) else {
        return;
    };
    struct Slow;
    impl Progress for Slow {
        fn layer_started(&self, _: &str, _: u64) {}
        fn layer_advanced(&self, _: &str, _: u64) {
            eprintln!("advanced");
            std::thread::sleep(Duration::from_millis(20));
        }
        fn layer_done(&self, _: &str, _: &str) {}
        fn message(&self, _: &str) {}
    }
    let store = Store::open(Path::new(&root)).unwrap();
    let options = PullOptions {
        concurrent_downloads: 1,
        ..PullOptions::default()
    };
    pull(&store, &reference, &options, &Slow).unwrap();
}

/// Bytes that do not compress: a xorshift stream.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn pull_killed_mid_download_then_next_pull_succeeds() {
    require_registry!();
    let registry = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let big = layer(vec![Entry::file("noise", noise(8 << 20))]).compressed(Compression::None);
    push_image(
        &registry,
        dir.path(),
        &image(vec![big]),
        "big:t",
        Format::Oci,
    );
    let root = dir.path().join("store");
    let reference = registry.reference("big:t");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_pull_for_kill_test",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CRIB_TEST_PULL_REF", &reference)
        .env("CRIB_TEST_PULL_STORE", &root)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mid_download = BufReader::new(stderr)
        .lines()
        .any(|l| l.is_ok_and(|l| l == "advanced"));
    assert!(mid_download, "the child pull never downloaded");

    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let store = Store::open(&root).unwrap();
    assert!(store.list().unwrap().is_empty());
    // Store::open removed the dead pull's staging directory, half a blob with it.
    assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);
    let pulled = pull_quietly(&store, &reference).unwrap();
    assert_eq!(store.list().unwrap().len(), 1);
    assert!(store.resolve(&pulled.manifest_digest).is_ok());
}

#[test]
fn pull_same_image_twice_at_once_both_succeed() {
    require_registry!();
    let registry = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let written = push_image(
        &registry,
        dir.path(),
        &image(vec![
            layer(vec![Entry::file("a", noise(1 << 20))]),
            layer(vec![Entry::file("b", noise(1 << 19))]),
        ]),
        "twice:t",
        Format::Oci,
    );
    let root = dir.path().join("store");
    let reference = registry.reference("twice:t");

    let results: Vec<Result<Pulled, PullError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    let store = Store::open(&root).unwrap();
                    pull_quietly(&store, &reference)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    for result in results {
        assert_eq!(result.unwrap().manifest_digest, written.manifest_digest);
    }
    let store = Store::open(&root).unwrap();
    assert!(store.resolve(&written.manifest_digest).is_ok());
}

#[test]
fn ensure_pulls_once_then_answers_from_the_store() {
    require_registry!();
    let registry = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let written = push_image(
        &registry,
        dir.path(),
        &image(vec![layer(vec![Entry::file("x", "y")])]),
        "ensured:t",
        Format::Oci,
    );
    let store = store(&dir);
    let reference = registry.reference("ensured:t");
    let first = ensure(
        &store,
        &reference,
        &EnsureOptions::default(),
        &Recorder::default(),
    )
    .unwrap();
    drop(registry);

    let second = ensure(
        &store,
        &reference,
        &EnsureOptions::default(),
        &Recorder::default(),
    )
    .unwrap();

    assert_eq!(first.digest.to_string(), written.manifest_digest);
    assert_eq!(second.digest.to_string(), written.manifest_digest);
}

/// A docker config dir whose config.json has `user:password` for `registry`.
fn docker_config(
    dir: &Path,
    registry: &Registry,
    user: &str,
    password: &str,
) -> std::path::PathBuf {
    use std::io::Write;
    let config = dir.join("docker-config");
    std::fs::create_dir_all(&config).unwrap();
    // base64 of user:password, by the encoder every Debian has.
    let mut base64 = Command::new("base64")
        .arg("-w0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    write!(base64.stdin.take().unwrap(), "{user}:{password}").unwrap();
    let encoded = String::from_utf8(base64.wait_with_output().unwrap().stdout).unwrap();
    let text = serde_json::json!({"auths": {registry.host(): {"auth": encoded}}});
    std::fs::write(config.join("config.json"), text.to_string()).unwrap();
    config
}

#[test]
fn pull_with_credentials_from_docker_config_succeeds() {
    require_registry!();
    let registry = Registry::start_with_password().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let written = push_image(
        &registry,
        dir.path(),
        &image(vec![layer(vec![Entry::file("secret", "s")])]),
        "private:t",
        Format::Oci,
    );
    let options = PullOptions {
        docker_config: Some(docker_config(dir.path(), &registry, USER, PASSWORD)),
        ..PullOptions::default()
    };

    let pulled = pull(
        &store(&dir),
        &registry.reference("private:t"),
        &options,
        &Recorder::default(),
    )
    .unwrap();

    assert_eq!(pulled.manifest_digest, written.manifest_digest);
}

#[test]
fn pull_with_wrong_password_says_to_log_in() {
    require_registry!();
    let registry = Registry::start_with_password().unwrap();
    let dir = tempfile::tempdir().unwrap();
    push_image(
        &registry,
        dir.path(),
        &image(vec![layer(vec![Entry::file("secret", "s")])]),
        "private:t",
        Format::Oci,
    );
    let options = PullOptions {
        docker_config: Some(docker_config(dir.path(), &registry, USER, "wrong")),
        ..PullOptions::default()
    };

    let error = pull(
        &store(&dir),
        &registry.reference("private:t"),
        &options,
        &Recorder::default(),
    )
    .unwrap_err();
    eprintln!("error: {error}");

    assert!(matches!(error, PullError::Unauthorized { .. }), "{error:?}");
    assert!(error.to_string().contains("docker login"), "{error}");
}

/// `crib image pull` as the crib binary runs it: `images::cli::run` on parsed arguments.
fn cli_pull(args: &[&str]) -> u8 {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        command: images::cli::ImageCommand,
    }
    let mut argv = vec!["image", "pull"];
    argv.extend_from_slice(args);
    images::cli::run(<Cli as clap::Parser>::try_parse_from(argv).unwrap().command)
}

#[test]
fn cli_pull_stores_the_image_and_fails_with_1_on_an_unknown_one() {
    require_registry!();
    let registry = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let written = push_image(
        &registry,
        dir.path(),
        &image(vec![layer(vec![Entry::file("cli", "pulled")])]),
        "cli/app:v1",
        Format::Oci,
    );
    let root = dir.path().join("store");
    let root_arg = root.to_str().unwrap();

    let pulled = cli_pull(&[&registry.reference("cli/app:v1"), "--state-dir", root_arg]);
    let unknown = cli_pull(&[&registry.reference("cli/app:v2"), "--state-dir", root_arg]);

    assert_eq!(pulled, 0);
    assert_eq!(unknown, 1);
    let store = Store::open(&root).unwrap();
    let record = store.record(&registry.reference("cli/app:v1")).unwrap();
    assert_eq!(record.digest.to_string(), written.manifest_digest);
}
