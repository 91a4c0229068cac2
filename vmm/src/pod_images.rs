//! The images of a pod (docs/CONTAINERS.md): each process's `image` is resolved through the
//! host's image store to a manifest digest, its config and its layer files before the VM
//! boots. The pod's distinct layers become one read-only composite disk (serial
//! [`LAYER_DISK_SERIAL`]), each layer at a 4 KiB-aligned offset; the layer table and each
//! image's digest, layers and config go to cradle in the spec's `resolved` section, and
//! the digests into the run directory's info.json.
//!
//! The store is only opened when a process names an image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use devices::virtio::block::CompositePart;
use images::{ResolvedImage, Store, StoreError};
use initramfs::containers::{
    effective_command, ContainerSpecError, ImageConfig, ImageSpec, LayerSpec, Overrides,
    ResolvedImages, LAYER_ALIGN, LAYER_DISK_SERIAL, SCRATCH_DISK_SERIAL,
};
use initramfs::podspec::PodSpec;
use serde_json::Value;

use crate::config::{self, DiskConfig};

/// Errors of resolving a pod's images.
#[derive(Debug, thiserror::Error)]
pub enum PodImageError {
    #[error("cannot open the image store {root}")]
    Store {
        root: PathBuf,
        #[source]
        source: Box<StoreError>,
    },
    #[error("processes[{index}].image: cannot resolve {reference:?}")]
    Resolve {
        index: usize,
        reference: String,
        #[source]
        source: Box<StoreError>,
    },
    #[error("processes[{index}].image: cannot pull {reference:?} (set \"pull\": \"never\" in the launch file to use only the store)")]
    Pull {
        index: usize,
        reference: String,
        #[source]
        source: Box<images::registry::PullError>,
    },
    #[error("image {reference:?} has no layers; import it again")]
    NoLayers { reference: String },
    #[error("the pod's layers do not fit a disk (offset overflow)")]
    TooLarge,
    #[error(transparent)]
    Command(#[from] ContainerSpecError),
}

/// Whether `crib pod run` pulls an image the store does not have (launch file `pull`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PullMode {
    /// Pull what the store lacks, as `docker run` does.
    #[default]
    Missing,
    /// Use only what the store has (`crib image pull` or `import` fill it).
    Never,
}

/// What a pod's images add to its VM and spec.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodImages {
    /// Goes to cradle as the spec's `resolved`.
    pub resolved: ResolvedImages,
    /// The layer disk's parts, in disk order (empty: no layer disk).
    pub parts: Vec<CompositePart>,
}

impl PodImages {
    /// Resolves every process image of `spec` in the store at `store_root` (default:
    /// [`Store::default_root`]). A pod without images never opens the store.
    pub fn resolve(
        spec: &PodSpec,
        store_root: Option<&Path>,
        pull: PullMode,
    ) -> Result<Self, PodImageError> {
        let wanted: Vec<(usize, &str)> = spec
            .processes
            .iter()
            .enumerate()
            .filter_map(|(index, p)| p.image.as_deref().map(|image| (index, image)))
            .collect();
        if wanted.is_empty() {
            return Ok(Self::default());
        }
        let root = store_root.map_or_else(Store::default_root, Path::to_path_buf);
        let store = Store::open(&root).map_err(|source| PodImageError::Store {
            root: root.clone(),
            source: Box::new(source),
        })?;
        let mut images = BTreeMap::new();
        for (index, reference) in wanted {
            if images.contains_key(reference) {
                continue;
            }
            let image = match store.resolve(reference) {
                Err(StoreError::NotFound { .. }) if pull == PullMode::Missing => {
                    // Plain lines on stderr: crib pod run's stdout carries its socket lines.
                    images::registry::ensure(
                        &store,
                        reference,
                        &images::registry::EnsureOptions::default(),
                        &images::progress::PlainProgress,
                    )
                    .map_err(|source| PodImageError::Pull {
                        index,
                        reference: reference.to_owned(),
                        source: Box::new(source),
                    })?
                }
                resolved => resolved.map_err(|source| PodImageError::Resolve {
                    index,
                    reference: reference.to_owned(),
                    source: Box::new(source),
                })?,
            };
            images.insert(reference.to_owned(), image);
        }
        let pod = Self::from_images(&images)?;
        pod.check_commands(spec)?;
        Ok(pod)
    }

    /// Applies Docker's rules to every image process now, so that one without a program
    /// (no argv, Entrypoint or Cmd) is refused before boot rather than by cradle.
    fn check_commands(&self, spec: &PodSpec) -> Result<(), PodImageError> {
        for (index, process) in spec.processes.iter().enumerate() {
            let Some(image) = process
                .image
                .as_ref()
                .and_then(|r| self.resolved.images.get(r))
            else {
                continue;
            };
            effective_command(
                &format!("processes[{index}]"),
                &image.config,
                Overrides {
                    argv: &process.argv,
                    entrypoint: process.entrypoint.as_deref(),
                    env: &process.env,
                    cwd: process.cwd.as_deref(),
                    user: process.user.as_deref(),
                },
            )?;
        }
        Ok(())
    }

    /// Lays out the layers of `images` (each distinct diffID once, in first-use order).
    pub fn from_images(images: &BTreeMap<String, ResolvedImage>) -> Result<Self, PodImageError> {
        let mut out = Self::default();
        let mut next = 0u64;
        for (reference, image) in images {
            if image.layers.is_empty() {
                return Err(PodImageError::NoLayers {
                    reference: reference.clone(),
                });
            }
            let mut layer_ids = Vec::with_capacity(image.layers.len());
            for layer in &image.layers {
                let diff_id = layer.diff_id.to_string();
                if out.resolved.layer(&diff_id).is_none() {
                    out.resolved.layers.push(LayerSpec {
                        diff_id: diff_id.clone(),
                        offset: next,
                        size: layer.size,
                    });
                    out.parts.push(CompositePart {
                        path: layer.path.clone(),
                        offset: next,
                        size: layer.size,
                    });
                    next = next
                        .checked_add(layer.size)
                        .and_then(|end| end.checked_next_multiple_of(LAYER_ALIGN))
                        .ok_or(PodImageError::TooLarge)?;
                }
                layer_ids.push(diff_id);
            }
            out.resolved.images.insert(
                reference.clone(),
                ImageSpec {
                    digest: image.digest.to_string(),
                    layers: layer_ids,
                    config: image_config(image),
                },
            );
        }
        Ok(out)
    }

    /// The read-only layer disk, if the pod has layers.
    pub fn layer_disk(&self, run_dir: &Path) -> Option<DiskConfig> {
        if self.parts.is_empty() {
            return None;
        }
        Some(DiskConfig {
            path: run_dir.join("layers"),
            id: LAYER_DISK_SERIAL.to_owned(),
            readonly: true,
            direct: false,
            queues: config::default_queues(),
            queue_size: config::default_queue_size(),
            iops: None,
            bandwidth: None,
            burst: None,
            iops_burst: None,
            composite: self.parts.clone(),
        })
    }

    /// `spec` (the spec's JSON) with the `resolved` section cradle reads.
    pub fn add_to_spec(&self, spec: &mut Value) {
        if self.resolved.is_empty() {
            return;
        }
        if let (Some(object), Ok(resolved)) =
            (spec.as_object_mut(), serde_json::to_value(&self.resolved))
        {
            object.insert("resolved".to_owned(), resolved);
        }
    }

    /// Reference -> manifest digest, for info.json.
    pub fn digests(&self) -> BTreeMap<&str, &str> {
        self.resolved
            .images
            .iter()
            .map(|(reference, image)| (reference.as_str(), image.digest.as_str()))
            .collect()
    }
}

/// The parts of the OCI config a process uses.
fn image_config(image: &ResolvedImage) -> ImageConfig {
    let Some(config) = image.config.config() else {
        return ImageConfig::default();
    };
    ImageConfig {
        entrypoint: config.entrypoint().clone(),
        cmd: config.cmd().clone(),
        env: config.env().clone().unwrap_or_default(),
        working_dir: config.working_dir().clone(),
        user: config.user().clone(),
    }
}

/// The scratch disk's file in a run directory.
pub const SCRATCH_FILE: &str = "scratch.img";
/// Where cradle mounts the scratch disk: its containers' directory (writable layers).
pub const SCRATCH_GUEST_PATH: &str = "/run/cradle/c";

/// The pod's scratch disk (launch file `scratch`): a sparse file of `bytes` in the run
/// directory, created at launch and removed when the pod ends, given to cradle as a volume
/// named [`SCRATCH_DISK_SERIAL`] mounted where the containers' writable layers live, so
/// they use host disk instead of guest RAM. cradle formats it (ext4) as any blank volume.
pub fn scratch_disk(run_dir: &Path) -> DiskConfig {
    DiskConfig {
        path: run_dir.join(SCRATCH_FILE),
        id: SCRATCH_DISK_SERIAL.to_owned(),
        readonly: false,
        direct: false,
        queues: config::default_queues(),
        queue_size: config::default_queue_size(),
        iops: None,
        bandwidth: None,
        burst: None,
        iops_burst: None,
        composite: Vec::new(),
    }
}

/// Adds the scratch volume to the spec's JSON.
pub fn add_scratch_volume(spec: &mut Value) {
    let Some(object) = spec.as_object_mut() else {
        return;
    };
    let volumes = object
        .entry("volumes")
        .or_insert_with(|| Value::Array(Vec::new()));
    if let Some(volumes) = volumes.as_array_mut() {
        volumes.push(serde_json::json!({"name": SCRATCH_DISK_SERIAL, "path": SCRATCH_GUEST_PATH}));
    }
}

/// Creates the sparse scratch file of `bytes` (replacing a dead pod's).
pub fn create_scratch(run_dir: &Path, bytes: u64) -> std::io::Result<()> {
    let path = run_dir.join(SCRATCH_FILE);
    let _ = std::fs::remove_file(&path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?
        .set_len(bytes)
}

#[cfg(test)]
mod tests {
    use images::{Digest, ResolvedLayer};

    use super::*;

    fn layer(byte: u8, size: u64) -> ResolvedLayer {
        ResolvedLayer {
            diff_id: Digest::of(&[byte]),
            path: PathBuf::from(format!("/store/layers/{byte}.erofs")),
            size,
        }
    }

    fn image(layers: Vec<ResolvedLayer>) -> ResolvedImage {
        let config = serde_json::from_str(
            r#"{"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
                "config": {"Entrypoint": ["/e"], "Env": ["A=1"], "User": "app", "WorkingDir": "/w"}}"#,
        )
        .unwrap();
        ResolvedImage {
            digest: Digest::of(b"manifest"),
            config,
            layers,
        }
    }

    #[test]
    fn shared_layers_are_placed_once_at_aligned_offsets() {
        let images = BTreeMap::from([
            ("a".to_owned(), image(vec![layer(1, 5000), layer(2, 4096)])),
            ("b".to_owned(), image(vec![layer(1, 5000), layer(3, 10)])),
        ]);
        let pod = PodImages::from_images(&images).unwrap();
        let offsets: Vec<u64> = pod.parts.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, [0, 8192, 12288]);
        assert_eq!(
            pod.resolved.images["b"].layers[0],
            pod.resolved.layers[0].diff_id
        );
        pod.resolved.validate("resolved").unwrap();
        let config = &pod.resolved.images["a"].config;
        assert_eq!(config.user.as_deref(), Some("app"));
        assert_eq!(config.entrypoint.as_deref(), Some(&["/e".to_owned()][..]));
        let disk = pod.layer_disk(Path::new("/run/p")).unwrap();
        assert!(disk.readonly && disk.composite.len() == 3);
    }

    #[test]
    fn pod_without_images_has_no_layer_disk_and_no_store() {
        let spec = PodSpec::from_json(br#"{"name": "p"}"#).unwrap();
        let pod = PodImages::resolve(
            &spec,
            Some(Path::new("/nonexistent/store")),
            PullMode::Never,
        )
        .unwrap();
        assert!(pod.layer_disk(Path::new("/r")).is_none());
        let mut json = serde_json::json!({"name": "p"});
        pod.add_to_spec(&mut json);
        assert!(json.get("resolved").is_none());
    }

    #[test]
    fn unknown_image_names_the_process_and_how_to_get_it() {
        let dir = std::env::temp_dir().join(format!("crib-pod-images-{}", std::process::id()));
        let spec = PodSpec::from_json(
            br#"{"name": "p", "processes": [{"name": "m", "argv": ["x"]}, {"name": "n", "image": "nope:1"}]}"#,
        )
        .unwrap();
        let err = PodImages::resolve(&spec, Some(&dir), PullMode::Never).unwrap_err();
        let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(
            text.starts_with("processes[1].image: cannot resolve \"nope:1\""),
            "{text}"
        );
        assert!(text.contains("crib image pull"), "{text}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn image_process_without_a_program_is_refused_before_boot() {
        let mut bare = image(vec![layer(1, 4096)]);
        bare.config = serde_json::from_str(
            r#"{"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}"#,
        )
        .unwrap();
        let pod = PodImages::from_images(&BTreeMap::from([("bare".to_owned(), bare)])).unwrap();
        let spec =
            PodSpec::from_json(br#"{"name": "p", "processes": [{"name": "m", "image": "bare"}]}"#)
                .unwrap();
        let err = pod.check_commands(&spec).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("processes[0].argv: the image sets no Entrypoint or Cmd"),
            "{err}"
        );
    }
}
