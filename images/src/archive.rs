//! `crib image import FILE|DIR`: an OCI image layout (a directory, or a tar of one), or a
//! `docker save` archive. Docker 25+ archives hold an OCI layout (index.json) beside the
//! legacy `manifest.json`, and are imported as OCI; older ones (and skopeo's
//! `docker-archive:`) have only `manifest.json` (`[{"Config", "RepoTags", "Layers"}]`)
//! and are rewritten into an OCI layout in the staging directory first.
//!
//! Archives are unpacked in archive mode (src/unpack.rs) into a staging directory:
//! regular files, directories and symlinks (legacy archives link repeated layers),
//! which are then only read through `RESOLVE_IN_ROOT` (src/layout.rs).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::json;

use crate::convert;
use crate::digest::{Digest, HashingReader};
use crate::layout::{self, Layout, LayoutError, MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES};
use crate::progress::Progress;
use crate::reference;
use crate::store::{ImageRecord, Store, StoreError};
use crate::unpack::{self, UnpackError, UnpackMode};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("Reading {path} failed")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Unpacking the archive {path} failed")]
    Unpack {
        path: PathBuf,
        #[source]
        source: UnpackError,
    },
    #[error("{path} is neither an OCI image layout (index.json) nor a docker save archive (manifest.json)")]
    Unknown { path: PathBuf },
    #[error("{path}: manifest.json lists no image")]
    Empty { path: PathBuf },
    #[error("{path}: manifest.json entry {index} names {file:?}, which is not a plain relative path in the archive")]
    BadEntryPath {
        path: PathBuf,
        index: usize,
        file: String,
    },
    #[error("Writing the converted layout {path} failed")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One image of a docker save `manifest.json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

impl Store {
    /// Imports a file (OCI archive or docker save archive, optionally gzip/zstd
    /// compressed) or a directory (OCI layout or unpacked docker save). `name` replaces
    /// the names the archive carries. Returns one record per image.
    pub fn import_path(
        &self,
        path: &Path,
        name: Option<&str>,
        progress: &dyn Progress,
    ) -> Result<Vec<ImageRecord>, StoreError> {
        let names = match name {
            Some(name) => vec![reference::normalize(name)?],
            None => Vec::new(),
        };
        let meta = fs::metadata(path).map_err(|source| ArchiveError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.is_dir() {
            return self.import_dir(path, path, names, progress);
        }
        let staging = self.staging_dir()?;
        let dir = staging.path().join("archive");
        fs::create_dir(&dir).map_err(|source| ArchiveError::Write {
            path: dir.clone(),
            source,
        })?;
        progress.message(&format!("unpacking {}", path.display()));
        let read_err = |source| ArchiveError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(read_err)?;
        let reader = convert::decompress(file).map_err(read_err)?;
        unpack::unpack(reader, &dir, UnpackMode::Archive).map_err(|source| {
            ArchiveError::Unpack {
                path: path.to_path_buf(),
                source,
            }
        })?;
        self.import_dir(path, &dir, names, progress)
    }

    fn import_dir(
        &self,
        shown: &Path,
        dir: &Path,
        names: Vec<String>,
        progress: &dyn Progress,
    ) -> Result<Vec<ImageRecord>, StoreError> {
        let layout = Layout::open(dir)?;
        if layout.has("index.json") {
            return Ok(vec![self.import_layout_named(dir, names, progress)?]);
        }
        if !layout.has("manifest.json") {
            return Err(ArchiveError::Unknown {
                path: shown.to_path_buf(),
            }
            .into());
        }
        let manifest_path = dir.join("manifest.json");
        let entries: Vec<DockerManifestEntry> = layout::parse_json(
            &manifest_path,
            &layout.read_small("manifest.json", MAX_MANIFEST_BYTES)?,
        )?;
        if entries.is_empty() {
            return Err(ArchiveError::Empty {
                path: shown.to_path_buf(),
            }
            .into());
        }
        let mut records = Vec::new();
        for (index, entry) in entries.iter().enumerate() {
            let staging = self.staging_dir()?;
            let oci = staging.path().join("oci");
            docker_to_oci(shown, &layout, index, entry, &oci)?;
            let names = if names.is_empty() {
                let tags = entry.repo_tags.clone().unwrap_or_default();
                tags.iter()
                    .filter_map(|t| reference::normalize(t).ok())
                    .collect()
            } else {
                names.clone()
            };
            records.push(self.import_layout_named(&oci, names, progress)?);
        }
        Ok(records)
    }
}

/// A relative path in the archive, as manifest.json gives it, or an error.
fn entry_rel(shown: &Path, index: usize, file: &str) -> Result<String, ArchiveError> {
    let plain = !file.is_empty()
        && !file.starts_with('/')
        && file.split('/').all(|c| !c.is_empty() && c != "..");
    if plain {
        Ok(file.to_string())
    } else {
        Err(ArchiveError::BadEntryPath {
            path: shown.to_path_buf(),
            index,
            file: file.to_string(),
        })
    }
}

/// Hashes the archive file `rel` and links (or copies) it into the OCI layout `oci`.
fn add_blob(layout: &Layout, rel: &str, oci: &Path) -> Result<(Digest, u64, String), StoreError> {
    let mut file = layout.open_file(rel)?;
    let mut head = [0u8; 4];
    let head_len = io::Read::read(&mut file, &mut head).map_err(|source| LayoutError::Read {
        path: layout.path().join(rel),
        source,
    })?;
    let media_type = match convert::sniff(&head[..head_len]) {
        convert::LayerCompression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
        convert::LayerCompression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        convert::LayerCompression::None => "application/vnd.oci.image.layer.v1.tar",
    };
    let (digest, size) = HashingReader::new(layout.open_file(rel)?)
        .finish()
        .map_err(|source| LayoutError::Read {
            path: layout.path().join(rel),
            source,
        })?;
    let dest = oci.join(Layout::blob_rel(&digest));
    if !dest.exists() {
        let write_err = |source| ArchiveError::Write {
            path: dest.clone(),
            source,
        };
        // A hard link of the file we opened through RESOLVE_IN_ROOT (AT_EMPTY_PATH needs
        // CAP_DAC_READ_SEARCH: crib image import runs as root) avoids a copy; a path-based
        // link could follow a symlink in the archive out of it. Else copy.
        let mut source = layout.open_file(rel)?;
        let dest_dir = rustix::fs::open(
            blobs_dir(oci),
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| write_err(e.into()))?;
        let linked = rustix::fs::linkat(
            &source,
            "",
            &dest_dir,
            digest.hex(),
            rustix::fs::AtFlags::EMPTY_PATH,
        );
        if linked.is_err() {
            let mut out = File::create_new(&dest).map_err(write_err)?;
            io::copy(&mut source, &mut out).map_err(write_err)?;
        }
    }
    Ok((digest, size, media_type.to_string()))
}

fn blobs_dir(oci: &Path) -> PathBuf {
    oci.join("blobs/sha256")
}

/// Writes the OCI layout of one docker save image into `oci`.
fn docker_to_oci(
    shown: &Path,
    layout: &Layout,
    index: usize,
    entry: &DockerManifestEntry,
    oci: &Path,
) -> Result<(), StoreError> {
    let blobs = blobs_dir(oci);
    fs::create_dir_all(&blobs).map_err(|source| ArchiveError::Write {
        path: blobs.clone(),
        source,
    })?;
    let config_rel = entry_rel(shown, index, &entry.config)?;
    let config = layout.read_small(&config_rel, MAX_CONFIG_BYTES)?;
    let config_digest = Digest::of(&config);
    let write = |path: PathBuf, bytes: &[u8]| {
        fs::write(&path, bytes).map_err(|source| ArchiveError::Write { path, source })
    };
    write(oci.join(Layout::blob_rel(&config_digest)), &config)?;
    let mut layers = Vec::new();
    for file in &entry.layers {
        let rel = entry_rel(shown, index, file)?;
        let (digest, size, media_type) = add_blob(layout, &rel, oci)?;
        layers.push(json!({"mediaType": media_type, "digest": digest.to_string(), "size": size}));
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest.to_string(),
            "size": config.len(),
        },
        "layers": layers,
    }))
    .unwrap_or_default();
    let manifest_digest = Digest::of(&manifest);
    write(oci.join(Layout::blob_rel(&manifest_digest)), &manifest)?;
    let index_json = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest.to_string(),
            "size": manifest.len(),
        }],
    }))
    .unwrap_or_default();
    write(oci.join("index.json"), &index_json)?;
    write(oci.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(())
}
