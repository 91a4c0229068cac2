//! Reads an OCI image layout (image-spec `image-layout.md`): `index.json`, then the
//! linux/amd64 manifest (through nested indexes / Docker manifest lists), then the
//! config. Every blob read is checked against its descriptor's digest and size. Files
//! are opened relative to the layout's directory fd with `RESOLVE_IN_ROOT`, so a symlink
//! in an unpacked archive cannot make crib read outside it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use oci_spec::image::{Arch, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, Os};
use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
use serde::de::DeserializeOwned;

use crate::digest::{Digest, DigestError, HashingReader};

/// Largest index or manifest read (containerd's limit).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Largest image config read.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// Deepest chain of nested indexes followed.
const MAX_INDEX_DEPTH: usize = 4;

const INDEX_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("Reading {path} failed (is it an OCI image layout with index.json and blobs/?)")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a regular file")]
    NotFile { path: PathBuf },
    #[error("{path} is larger than {limit} bytes")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{path}: malformed JSON at field {field:?}")]
    Malformed {
        path: PathBuf,
        field: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: field {field:?} holds an unusable digest")]
    BadDigest {
        path: PathBuf,
        field: String,
        #[source]
        source: DigestError,
    },
    #[error("Blob {digest} in {path} does not match its digest (got {actual}, {bytes} bytes; descriptor says {size} bytes): the image is corrupt or tampered with")]
    DigestMismatch {
        path: PathBuf,
        digest: Digest,
        actual: Digest,
        bytes: u64,
        size: u64,
    },
    #[error("{path} lists no linux/amd64 image (platforms: {platforms}): import an amd64 image")]
    NoPlatform { path: PathBuf, platforms: String },
    #[error("{path} nests image indexes deeper than {MAX_INDEX_DEPTH}")]
    TooDeep { path: PathBuf },
    #[error("{path}: the config's rootfs.diff_ids has {diff_ids} entries but the manifest has {layers} layers")]
    LayerCount {
        path: PathBuf,
        diff_ids: usize,
        layers: usize,
    },
}

/// An open OCI image layout directory.
pub struct Layout {
    path: PathBuf,
    dir: OwnedFd,
}

/// The image a layout holds, parsed and verified (blobs other than layers).
#[derive(Clone, Debug)]
pub struct LayoutImage {
    pub manifest_digest: Digest,
    pub manifest_bytes: Vec<u8>,
    pub manifest: ImageManifest,
    pub config_digest: Digest,
    pub config_bytes: Vec<u8>,
    pub config: ImageConfiguration,
    /// Layers lowest first: (blob digest, media type, size, diffID).
    pub layers: Vec<LayoutLayer>,
    /// Annotations of the index entry that led to the manifest.
    pub annotations: HashMap<String, String>,
}

/// One layer of a [`LayoutImage`].
#[derive(Clone, Debug)]
pub struct LayoutLayer {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub diff_id: Digest,
}

/// Parses JSON, naming the failing field.
pub fn parse_json<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, LayoutError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| LayoutError::Malformed {
        path: path.to_path_buf(),
        field: e.path().to_string(),
        source: e.into_inner(),
    })
}

fn descriptor_digest(path: &Path, field: &str, d: &Descriptor) -> Result<Digest, LayoutError> {
    Digest::parse(d.digest().as_ref()).map_err(|source| LayoutError::BadDigest {
        path: path.to_path_buf(),
        field: field.to_string(),
        source,
    })
}

impl Layout {
    /// Opens the layout at `path`.
    pub fn open(path: &Path) -> Result<Layout, LayoutError> {
        let dir = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| LayoutError::Read {
            path: path.to_path_buf(),
            source: e.into(),
        })?;
        Ok(Layout {
            path: path.to_path_buf(),
            dir,
        })
    }

    /// The layout's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `rel` exists in the layout.
    pub fn has(&self, rel: &str) -> bool {
        self.open_file(rel).is_ok()
    }

    /// Opens the regular file `rel`, resolved inside the layout.
    pub fn open_file(&self, rel: &str) -> Result<File, LayoutError> {
        let path = self.path.join(rel);
        let fd = rustix::fs::openat2(
            &self.dir,
            rel,
            // NONBLOCK: opening a FIFO must not hang; it is refused below.
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| LayoutError::Read {
            path: path.clone(),
            source: e.into(),
        })?;
        let stat = rustix::fs::fstat(&fd).map_err(|e| LayoutError::Read {
            path: path.clone(),
            source: e.into(),
        })?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Err(LayoutError::NotFile { path });
        }
        Ok(File::from(fd))
    }

    /// Reads the small file `rel` (at most `limit` bytes).
    pub fn read_small(&self, rel: &str, limit: u64) -> Result<Vec<u8>, LayoutError> {
        let path = self.path.join(rel);
        let mut bytes = Vec::new();
        self.open_file(rel)?
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| LayoutError::Read {
                path: path.clone(),
                source,
            })?;
        if bytes.len() as u64 > limit {
            return Err(LayoutError::TooLarge { path, limit });
        }
        Ok(bytes)
    }

    /// The path of a blob, relative to the layout.
    pub fn blob_rel(digest: &Digest) -> String {
        format!("blobs/sha256/{}", digest.hex())
    }

    /// Reads and verifies a small blob.
    pub fn read_blob(
        &self,
        digest: &Digest,
        size: u64,
        limit: u64,
    ) -> Result<Vec<u8>, LayoutError> {
        let rel = Layout::blob_rel(digest);
        let bytes = self.read_small(&rel, limit)?;
        let actual = Digest::of(&bytes);
        if &actual != digest || bytes.len() as u64 != size {
            return Err(LayoutError::DigestMismatch {
                path: self.path.join(rel),
                digest: digest.clone(),
                actual,
                bytes: bytes.len() as u64,
                size,
            });
        }
        Ok(bytes)
    }

    /// Copies a blob into `dest` (a new file), verifying digest and size on the way.
    pub fn copy_blob(&self, digest: &Digest, size: u64, dest: &Path) -> Result<(), CopyError> {
        let rel = Layout::blob_rel(digest);
        let source = self.open_file(&rel)?;
        let mut reader = HashingReader::new(source);
        let mut out = File::create_new(dest).map_err(|source| CopyError::Write {
            path: dest.to_path_buf(),
            source,
        })?;
        io::copy(&mut reader, &mut out).map_err(|source| CopyError::Write {
            path: dest.to_path_buf(),
            source,
        })?;
        out.sync_all().map_err(|source| CopyError::Write {
            path: dest.to_path_buf(),
            source,
        })?;
        let (actual, bytes) = reader.finish().map_err(|source| LayoutError::Read {
            path: self.path.join(&rel),
            source,
        })?;
        if &actual != digest || bytes != size {
            return Err(LayoutError::DigestMismatch {
                path: self.path.join(rel),
                digest: digest.clone(),
                actual,
                bytes,
                size,
            }
            .into());
        }
        Ok(())
    }

    /// Verifies a blob in place (no copy); returns its path for a rename.
    pub fn verify_blob(&self, digest: &Digest, size: u64) -> Result<PathBuf, LayoutError> {
        let rel = Layout::blob_rel(digest);
        let path = self.path.join(&rel);
        let reader = HashingReader::new(self.open_file(&rel)?);
        let (actual, bytes) = reader.finish().map_err(|source| LayoutError::Read {
            path: path.clone(),
            source,
        })?;
        if &actual != digest || bytes != size {
            return Err(LayoutError::DigestMismatch {
                path,
                digest: digest.clone(),
                actual,
                bytes,
                size,
            });
        }
        Ok(path)
    }

    /// Finds the linux/amd64 image of the layout and reads its manifest and config.
    pub fn image(&self) -> Result<LayoutImage, LayoutError> {
        let index_path = self.path.join("index.json");
        let index: ImageIndex = parse_json(
            &index_path,
            &self.read_small("index.json", MAX_MANIFEST_BYTES)?,
        )?;
        let (descriptor, manifest_bytes) = self.pick(&index_path, &index, 0)?;
        let manifest_digest = descriptor_digest(&index_path, "manifests[].digest", &descriptor)?;
        let manifest_path = self.path.join(Layout::blob_rel(&manifest_digest));
        let manifest: ImageManifest = parse_json(&manifest_path, &manifest_bytes)?;
        let config_digest = descriptor_digest(&manifest_path, "config.digest", manifest.config())?;
        let config_bytes =
            self.read_blob(&config_digest, manifest.config().size(), MAX_CONFIG_BYTES)?;
        let config_path = self.path.join(Layout::blob_rel(&config_digest));
        let config: ImageConfiguration = parse_json(&config_path, &config_bytes)?;
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != manifest.layers().len() {
            return Err(LayoutError::LayerCount {
                path: config_path,
                diff_ids: diff_ids.len(),
                layers: manifest.layers().len(),
            });
        }
        let mut layers = Vec::new();
        for (i, (layer, diff_id)) in manifest.layers().iter().zip(diff_ids).enumerate() {
            let digest = descriptor_digest(&manifest_path, &format!("layers[{i}].digest"), layer)?;
            let diff_id = Digest::parse(diff_id).map_err(|source| LayoutError::BadDigest {
                path: config_path.clone(),
                field: format!("rootfs.diff_ids[{i}]"),
                source,
            })?;
            layers.push(LayoutLayer {
                digest,
                media_type: layer.media_type().to_string(),
                size: layer.size(),
                diff_id,
            });
        }
        Ok(LayoutImage {
            manifest_digest,
            manifest_bytes,
            manifest,
            config_digest,
            config_bytes,
            config,
            layers,
            annotations: descriptor.annotations().clone().unwrap_or_default(),
        })
    }

    /// The manifest descriptor (and manifest bytes) for linux/amd64 in `index`,
    /// following nested indexes.
    fn pick(
        &self,
        path: &Path,
        index: &ImageIndex,
        depth: usize,
    ) -> Result<(Descriptor, Vec<u8>), LayoutError> {
        if depth > MAX_INDEX_DEPTH {
            return Err(LayoutError::TooDeep {
                path: path.to_path_buf(),
            });
        }
        let amd64 = |d: &&Descriptor| match d.platform() {
            Some(p) => *p.architecture() == Arch::Amd64 && *p.os() == Os::Linux,
            None => true,
        };
        let Some(descriptor) = index.manifests().iter().find(amd64) else {
            let platforms = index
                .manifests()
                .iter()
                .filter_map(|d| d.platform().as_ref())
                .map(|p| format!("{}/{}", p.os(), p.architecture()))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(LayoutError::NoPlatform {
                path: path.to_path_buf(),
                platforms,
            });
        };
        let digest = descriptor_digest(path, "manifests[].digest", descriptor)?;
        let bytes = self.read_blob(&digest, descriptor.size(), MAX_MANIFEST_BYTES)?;
        let media_type = descriptor.media_type().to_string();
        if INDEX_MEDIA_TYPES.contains(&media_type.as_str()) {
            let nested_path = self.path.join(Layout::blob_rel(&digest));
            let nested: ImageIndex = parse_json(&nested_path, &bytes)?;
            let (mut found, bytes) = self.pick(&nested_path, &nested, depth + 1)?;
            // The outer entry's annotations (the image's name) describe the image too.
            if found.annotations().is_none() {
                found.set_annotations(descriptor.annotations().clone());
            }
            return Ok((found, bytes));
        }
        Ok((descriptor.clone(), bytes))
    }
}

/// Errors of [`Layout::copy_blob`].
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("Writing {path} failed (disk full? free space in the store's filesystem)")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}
