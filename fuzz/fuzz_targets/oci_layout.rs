//! Fuzzes the image store's OCI layout reader (`images::layout::Layout::image`): the
//! `index.json`, manifest and config of an image to import, which the image's author
//! controls, written to a temporary layout directory for each input.
//!
//! Inputs are structured and mostly valid: documents with the fields the reader uses
//! (platforms, media types, digests, sizes, layers, `rootfs.diff_ids`), the digests and sizes
//! of the blobs they point to mostly right, an index sometimes nested, each document
//! sometimes replaced by any JSON or damaged. Invariant: no input panics; `image()` returns
//! an error, or an image whose manifest digest is its bytes' SHA-256 and whose layers match
//! both the manifest's layers and the config's `diff_ids`.

#![no_main]

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use arbitrary::Arbitrary;
use crib_fuzz::json::{AnyJson, Damage, Text};
use images::fixtures::sha256_digest;
use images::layout::Layout;
use images::Digest;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "text/plain",
];

#[derive(Arbitrary, Debug)]
enum DigestField {
    /// The SHA-256 of the blob it names.
    Right,
    /// A well-formed digest of something else.
    Other(u8),
    Any(Text),
}

#[derive(Arbitrary, Debug)]
enum Platform {
    None,
    LinuxAmd64,
    LinuxArm64,
    Any(Text, Text),
}

#[derive(Arbitrary, Debug)]
struct Layer {
    media_type: u8,
    digest: DigestField,
    size: u32,
}

#[derive(Arbitrary, Debug)]
struct Doc {
    platform: Platform,
    /// Another descriptor before the one for the image.
    other_platform: bool,
    nested_index: bool,
    manifest_digest: DigestField,
    manifest_size_off: i8,
    config_digest: DigestField,
    config_size_off: i8,
    layers: Vec<Layer>,
    /// diff_ids: one per layer, plus or minus this.
    diff_id_extra: i8,
    diff_ids_right: bool,
    annotations: Option<Vec<(Text, Text)>>,
    /// Replace a document (index, manifest, config) by any JSON.
    replace: Option<(u8, AnyJson)>,
    damage: (u8, Damage),
}

fn other_digest(n: u8) -> String {
    sha256_digest(&[n])
}

fn digest(field: &DigestField, bytes: &[u8]) -> Value {
    match field {
        DigestField::Right => sha256_digest(bytes).into(),
        DigestField::Other(n) => other_digest(*n).into(),
        DigestField::Any(t) => t.0.clone().into(),
    }
}

fn platform(p: &Platform) -> Option<Value> {
    match p {
        Platform::None => None,
        Platform::LinuxAmd64 => Some(json!({"architecture": "amd64", "os": "linux"})),
        Platform::LinuxArm64 => Some(json!({"architecture": "arm64", "os": "linux"})),
        Platform::Any(a, o) => Some(json!({"architecture": a.0, "os": o.0})),
    }
}

fn size(len: usize, off: i8) -> Value {
    (len as i64 + i64::from(off % 4)).into()
}

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn write_blob(dir: &std::path::Path, bytes: &[u8]) {
    let digest = sha256_digest(bytes);
    let hex = digest.trim_start_matches("sha256:");
    let _ = fs::write(dir.join("blobs/sha256").join(hex), bytes);
}

fuzz_target!(|doc: Doc| {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = Dir(std::env::temp_dir().join(format!(
        "crib-fuzz-oci-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )));
    let path = &dir.0;
    fs::create_dir_all(path.join("blobs/sha256")).expect("layout directory");
    let _ = fs::write(
        path.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    );

    let layers: Vec<&Layer> = doc.layers.iter().take(8).collect();
    let diff_count = (layers.len() as i64 + i64::from(doc.diff_id_extra % 2)).max(0) as usize;
    let diff_ids: Vec<Value> = (0..diff_count)
        .map(|i| {
            if doc.diff_ids_right {
                other_digest(i as u8).into()
            } else {
                format!("sha256:{i}").into()
            }
        })
        .collect();
    let mut config = json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
    });
    let damaged = |which: u8, value: &Value| -> Vec<u8> {
        if doc.damage.0 % 3 == which {
            doc.damage.1.apply(value)
        } else {
            serde_json::to_vec(value).expect("JSON")
        }
    };
    if let Some((2, any)) = doc.replace.as_ref().map(|(w, v)| (w % 3, v)) {
        config = any.0.clone();
    }
    let config_bytes = damaged(2, &config);
    write_blob(path, &config_bytes);

    let layer_values: Vec<Value> = layers
        .iter()
        .map(|l| {
            let blob = [l.media_type];
            write_blob(path, &blob);
            json!({
                "mediaType": LAYER_TYPES[usize::from(l.media_type) % LAYER_TYPES.len()],
                "digest": digest(&l.digest, &blob),
                "size": l.size,
            })
        })
        .collect();
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {
            "mediaType": CONFIG,
            "digest": digest(&doc.config_digest, &config_bytes),
            "size": size(config_bytes.len(), doc.config_size_off),
        },
        "layers": layer_values,
    });
    if let Some((1, any)) = doc.replace.as_ref().map(|(w, v)| (w % 3, v)) {
        manifest = any.0.clone();
    }
    let manifest_bytes = damaged(1, &manifest);
    write_blob(path, &manifest_bytes);

    let mut descriptor = json!({
        "mediaType": MANIFEST,
        "digest": digest(&doc.manifest_digest, &manifest_bytes),
        "size": size(manifest_bytes.len(), doc.manifest_size_off),
    });
    if let Some(p) = platform(&doc.platform) {
        descriptor["platform"] = p;
    }
    if let Some(annotations) = &doc.annotations {
        let map: serde_json::Map<String, Value> = annotations
            .iter()
            .take(4)
            .map(|(k, v)| (k.0.clone(), v.0.clone().into()))
            .collect();
        descriptor["annotations"] = Value::Object(map);
    }
    let mut manifests = Vec::new();
    if doc.other_platform {
        manifests.push(json!({
            "mediaType": MANIFEST,
            "digest": other_digest(0),
            "size": 2,
            "platform": {"architecture": "arm64", "os": "linux"},
        }));
    }
    manifests.push(descriptor);
    let mut index = json!({"schemaVersion": 2, "manifests": manifests});
    if doc.nested_index {
        let inner = serde_json::to_vec(&index).expect("JSON");
        write_blob(path, &inner);
        index = json!({"schemaVersion": 2, "manifests": [{
            "mediaType": INDEX,
            "digest": sha256_digest(&inner),
            "size": inner.len(),
        }]});
    }
    if let Some((0, any)) = doc.replace.as_ref().map(|(w, v)| (w % 3, v)) {
        index = any.0.clone();
    }
    let _ = fs::write(path.join("index.json"), damaged(0, &index));

    let Ok(layout) = Layout::open(path) else {
        return;
    };
    let Ok(image) = layout.image() else {
        return;
    };
    assert_eq!(image.manifest_digest, Digest::of(&image.manifest_bytes));
    assert_eq!(image.config_digest, Digest::of(&image.config_bytes));
    assert_eq!(image.layers.len(), image.manifest.layers().len());
    assert_eq!(image.layers.len(), image.config.rootfs().diff_ids().len());
});
