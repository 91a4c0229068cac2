//! The content-addressed store (docs/IMAGES.md, "Store layout"):
//!
//! ```text
//! <root>/blobs/sha256/<hex>            manifests, configs, compressed layer blobs
//! <root>/layers/sha256/<diffid>.erofs  converted layers, one per distinct diffID
//! <root>/images/<manifest hex>.json    image records (ImageRecord)
//! <root>/refs.json                     name -> manifest digest
//! <root>/tmp/                          staging directories (src/staging.rs)
//! <root>/lock, <root>/tmp.lock         flock files
//! ```
//!
//! Everything appears by rename from `tmp/` (same filesystem) after an fsync, followed
//! by an fsync of the directory: a crash leaves either the old or the new state, plus
//! staging leftovers that the next open removes. Writers (import, rm, prune) hold
//! `lock` exclusive; readers need no lock.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use oci_spec::image::ImageConfiguration;
use rustix::fs::{FlockOperation, Mode, OFlags};
use serde::{Deserialize, Serialize};

use crate::convert::{self, ConvertError};
use crate::digest::{Digest, DigestError};
use crate::layout::{self, CopyError, Layout, LayoutError};
use crate::progress::Progress;
use crate::reference;
use crate::staging::{self, Staging};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Store {path}: {what} failed (check its permissions and free space, or pick another with --state-dir / CRIB_STATE_DIR)")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("No image {reference:?} in the store {root}: get it with `crib image pull {reference}` or `crib image import FILE|DIR --name {reference}`")]
    NotFound { reference: String, root: PathBuf },
    #[error(
        "{reference:?} matches more than one image ({matches}): give more digest digits or a name"
    )]
    Ambiguous { reference: String, matches: String },
    #[error("Image record {path} is malformed (remove it with `crib image rm` and import the image again)")]
    BadRecord {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("Image {digest}: layer file {path} is missing (import the image again)")]
    MissingLayer { digest: Digest, path: PathBuf },
    #[error("Name {name:?} is not a valid image name (expected NAME[:TAG], e.g. busybox:latest)")]
    BadName { name: String },
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Convert(#[from] ConvertError),
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error(transparent)]
    Archive(#[from] crate::archive::ArchiveError),
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// One layer of an image record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// The compressed blob's digest.
    pub digest: Digest,
    pub media_type: String,
    /// The compressed blob's size.
    pub size: u64,
    /// The uncompressed tar's digest (the erofs file's key).
    pub diff_id: Digest,
    /// The erofs image, relative to the store root.
    pub erofs: PathBuf,
    pub erofs_size: u64,
}

/// What the store knows of an image: `images/<manifest hex>.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The manifest's digest: the image's identity.
    pub digest: Digest,
    pub config_digest: Digest,
    /// Lowest first.
    pub layers: Vec<LayerRecord>,
    /// Names pointing at the image (from refs.json when read).
    #[serde(default)]
    pub names: Vec<String>,
    /// The config's `created`, if any.
    #[serde(default)]
    pub created: Option<String>,
    /// When the image was imported (seconds since the epoch).
    pub imported_at: u64,
}

impl ImageRecord {
    /// The total size of the image's erofs layers.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.erofs_size).sum()
    }
}

/// A layer as the pod launcher attaches it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedLayer {
    pub diff_id: Digest,
    /// Absolute path of the erofs image.
    pub path: PathBuf,
    pub size: u64,
}

/// An image ready to run: config and layer files, lowest layer first.
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    pub digest: Digest,
    pub config: ImageConfiguration,
    pub layers: Vec<ResolvedLayer>,
}

/// What prune removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneStats {
    pub blobs: usize,
    pub layers: usize,
    pub bytes: u64,
}

/// The exclusive store lock; released on drop.
pub struct StoreLock {
    _fd: OwnedFd,
}

/// The image store at a root directory.
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// The state directory: `CRIB_STATE_DIR` if set, else `/var/lib/crib` for root,
    /// else `$XDG_DATA_HOME/crib` or `~/.local/share/crib`.
    pub fn default_root() -> PathBuf {
        if let Some(dir) = std::env::var_os("CRIB_STATE_DIR").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir);
        }
        if rustix::process::geteuid().is_root() {
            return PathBuf::from("/var/lib/crib");
        }
        if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir).join("crib");
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/".into());
        PathBuf::from(home).join(".local/share/crib")
    }

    /// Opens (creating) the store at `root` and removes staging leftovers of dead
    /// processes.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        let store = Store {
            root: root.to_path_buf(),
        };
        for dir in ["blobs/sha256", "layers/sha256", "images", "tmp"] {
            let path = root.join(dir);
            fs::create_dir_all(&path).map_err(io_err(&path, "creating a directory"))?;
        }
        let tmp = store.tmp_dir();
        staging::clean_stale(&tmp, &root.join("tmp.lock"))
            .map_err(io_err(&tmp, "removing stale staging directories"))?;
        Ok(store)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// The path of a blob.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// The erofs file of a layer, relative to the root.
    pub fn layer_rel(diff_id: &Digest) -> PathBuf {
        PathBuf::from(format!("layers/sha256/{}.erofs", diff_id.hex()))
    }

    fn record_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("images")
            .join(format!("{}.json", digest.hex()))
    }

    fn refs_path(&self) -> PathBuf {
        self.root.join("refs.json")
    }

    /// A private directory in the store's `tmp/` (same filesystem), removed on drop.
    pub fn staging_dir(&self) -> Result<Staging, StoreError> {
        let tmp = self.tmp_dir();
        staging::create(&tmp, &self.root.join("tmp.lock"))
            .map_err(io_err(&tmp, "creating a staging directory"))
    }

    /// Takes the store-wide writer lock (blocks until free).
    pub fn lock(&self) -> Result<StoreLock, StoreError> {
        self.lock_reporting(&crate::progress::NoProgress)
    }

    /// [`Store::lock`], saying so on `progress` when another writer holds it.
    pub fn lock_reporting(&self, progress: &dyn Progress) -> Result<StoreLock, StoreError> {
        let path = self.root.join("lock");
        let fd = rustix::fs::open(
            &path,
            OFlags::RDWR | OFlags::CREATE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| io_err(&path, "opening the lock")(e.into()))?;
        if rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive).is_err() {
            progress.message(&format!(
                "waiting for another import, rm or prune to release {}",
                path.display()
            ));
            rustix::fs::flock(&fd, FlockOperation::LockExclusive)
                .map_err(|e| io_err(&path, "locking")(e.into()))?;
        }
        Ok(StoreLock { _fd: fd })
    }

    /// Writes `bytes` to `dest` atomically: a file in a staging dir, fsync, rename, fsync
    /// of the directory.
    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let staging = self.staging_dir()?;
        let tmp = staging.path().join("file");
        let mut file = File::create_new(&tmp).map_err(io_err(dest, "writing"))?;
        file.write_all(bytes).map_err(io_err(dest, "writing"))?;
        file.sync_all().map_err(io_err(dest, "syncing"))?;
        self.rename_in(&tmp, dest)
    }

    /// Renames `from` (in tmp/) to `dest` and syncs `dest`'s directory.
    fn rename_in(&self, from: &Path, dest: &Path) -> Result<(), StoreError> {
        fs::rename(from, dest).map_err(io_err(dest, "renaming into place"))?;
        sync_parent(dest)
    }

    /// The name -> manifest digest map.
    pub fn refs(&self) -> Result<BTreeMap<String, Digest>, StoreError> {
        let path = self.refs_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| StoreError::BadRecord { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(io_err(&path, "reading")(e)),
        }
    }

    fn write_refs(&self, refs: &BTreeMap<String, Digest>) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(refs).unwrap_or_default();
        self.write_atomic(&self.refs_path(), &bytes)
    }

    fn read_record(
        &self,
        digest: &Digest,
        refs: &BTreeMap<String, Digest>,
    ) -> Result<ImageRecord, StoreError> {
        let path = self.record_path(digest);
        let bytes = fs::read(&path).map_err(io_err(&path, "reading an image record"))?;
        let mut record: ImageRecord = serde_json::from_slice(&bytes)
            .map_err(|source| StoreError::BadRecord { path, source })?;
        record.names = refs
            .iter()
            .filter(|(_, d)| *d == digest)
            .map(|(n, _)| n.clone())
            .collect();
        Ok(record)
    }

    /// All images, newest import first.
    pub fn list(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let refs = self.refs()?;
        let dir = self.root.join("images");
        let mut records = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir, "listing images"))? {
            let entry = entry.map_err(io_err(&dir, "listing images"))?;
            let name = entry.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            let Some(digest) = Digest::from_hex(hex) else {
                continue;
            };
            records.push(self.read_record(&digest, &refs)?);
        }
        records.sort_by(|a, b| {
            b.imported_at
                .cmp(&a.imported_at)
                .then(a.digest.cmp(&b.digest))
        });
        Ok(records)
    }

    /// The manifest digest `reference` names: a name (`busybox`, `busybox:1.36`,
    /// `docker.io/library/busybox:latest`), a digest (`sha256:...`) or a unique prefix of
    /// at least 4 hex digits.
    pub fn lookup(&self, reference: &str) -> Result<Digest, StoreError> {
        let refs = self.refs()?;
        if let Some(digest) = reference::find(&refs, reference) {
            return Ok(digest.clone());
        }
        let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
        if hex.len() >= 4 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let matches: Vec<Digest> = self
                .list()?
                .into_iter()
                .map(|r| r.digest)
                .filter(|d| d.hex().starts_with(&hex.to_ascii_lowercase()))
                .collect();
            match matches.len() {
                0 => {}
                1 => return Ok(matches[0].clone()),
                _ => {
                    return Err(StoreError::Ambiguous {
                        reference: reference.to_string(),
                        matches: matches
                            .iter()
                            .map(|d| d.short())
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
                }
            }
        }
        Err(StoreError::NotFound {
            reference: reference.to_string(),
            root: self.root.clone(),
        })
    }

    /// The record of the image `reference` names.
    pub fn record(&self, reference: &str) -> Result<ImageRecord, StoreError> {
        let digest = self.lookup(reference)?;
        self.read_record(&digest, &self.refs()?)
    }

    /// The image `reference` names, ready to run: its config and layer files.
    pub fn resolve(&self, reference: &str) -> Result<ResolvedImage, StoreError> {
        let record = self.record(reference)?;
        let config_path = self.blob_path(&record.config_digest);
        let bytes =
            fs::read(&config_path).map_err(io_err(&config_path, "reading an image config"))?;
        let config = layout::parse_json(&config_path, &bytes)?;
        let mut layers = Vec::new();
        for layer in &record.layers {
            let path = self.root.join(&layer.erofs);
            if !path.is_file() {
                return Err(StoreError::MissingLayer {
                    digest: record.digest.clone(),
                    path,
                });
            }
            layers.push(ResolvedLayer {
                diff_id: layer.diff_id.clone(),
                path,
                size: layer.erofs_size,
            });
        }
        Ok(ResolvedImage {
            digest: record.digest,
            config,
            layers,
        })
    }

    /// Removes the image `reference` names: its record and all its names. Blobs and
    /// layers stay until [`Store::prune`].
    pub fn remove(&self, reference: &str) -> Result<ImageRecord, StoreError> {
        let _lock = self.lock()?;
        let record = self.record(reference)?;
        let mut refs = self.refs()?;
        refs.retain(|_, d| *d != record.digest);
        self.write_refs(&refs)?;
        let path = self.record_path(&record.digest);
        fs::remove_file(&path).map_err(io_err(&path, "removing an image record"))?;
        sync_parent(&path)?;
        Ok(record)
    }

    /// Deletes blobs and layer files no image record uses. Takes the store lock, so a
    /// concurrent import either committed its record first or has not renamed anything
    /// into place yet.
    pub fn prune(&self) -> Result<PruneStats, StoreError> {
        let _lock = self.lock()?;
        let mut blobs = BTreeSet::new();
        let mut layers = BTreeSet::new();
        for record in self.list()? {
            blobs.insert(record.digest.hex().to_string());
            blobs.insert(record.config_digest.hex().to_string());
            for layer in &record.layers {
                blobs.insert(layer.digest.hex().to_string());
                layers.insert(format!("{}.erofs", layer.diff_id.hex()));
            }
        }
        let mut stats = PruneStats::default();
        for (dir, keep, count) in [
            ("blobs/sha256", &blobs, &mut stats.blobs),
            ("layers/sha256", &layers, &mut stats.layers),
        ] {
            let dir = self.root.join(dir);
            for entry in fs::read_dir(&dir).map_err(io_err(&dir, "listing"))? {
                let entry = entry.map_err(io_err(&dir, "listing"))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if keep.contains(&name) {
                    continue;
                }
                stats.bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(entry.path()).map_err(io_err(&entry.path(), "removing"))?;
                *count += 1;
            }
            sync_dir(&dir)?;
        }
        Ok(stats)
    }

    /// Imports the OCI image layout at `dir`: verifies every blob, converts the layers
    /// not yet converted, then commits blobs, layers, the image record and `name`.
    /// Blobs are renamed in when `dir` is inside the store's `tmp/` (a pull's staging
    /// directory), else copied. On any error nothing new is visible in the store.
    pub fn import_oci_layout(
        &self,
        dir: &Path,
        name: Option<&str>,
        progress: &dyn Progress,
    ) -> Result<ImageRecord, StoreError> {
        let names = match name {
            Some(name) => vec![reference::normalize(name)?],
            None => Vec::new(),
        };
        self.import_layout_named(dir, names, progress)
    }

    /// [`Store::import_oci_layout`] with several names (or the layout's own if none).
    pub(crate) fn import_layout_named(
        &self,
        dir: &Path,
        mut names: Vec<String>,
        progress: &dyn Progress,
    ) -> Result<ImageRecord, StoreError> {
        let layout = Layout::open(dir)?;
        let image = layout.image()?;
        if names.is_empty() {
            names.extend(reference::from_annotations(&image.annotations));
        }
        let movable = dir.canonicalize().is_ok_and(|d| {
            self.tmp_dir()
                .canonicalize()
                .is_ok_and(|t| d.starts_with(t))
        });

        let _lock = self.lock_reporting(progress)?;
        let staging = self.staging_dir()?;
        // (staged file, destination) pairs renamed in at commit.
        let mut commit: Vec<(PathBuf, PathBuf)> = Vec::new();
        let mut layer_records = Vec::new();
        for (i, layer) in image.layers.iter().enumerate() {
            let shown = layer.digest.to_string();
            let blob_dest = self.blob_path(&layer.digest);
            let layer_rel = Store::layer_rel(&layer.diff_id);
            let layer_dest = self.root.join(&layer_rel);
            let staged_blob = if blob_dest.is_file() {
                blob_dest.clone()
            } else if movable {
                let path = layout.verify_blob(&layer.digest, layer.size)?;
                // Its writer may not have synced it; it must be durable before the rename.
                File::open(&path)
                    .and_then(|f| f.sync_all())
                    .map_err(io_err(&path, "syncing a blob"))?;
                commit.push((path.clone(), blob_dest.clone()));
                path
            } else {
                let path = staging.path().join(format!("blob-{i}"));
                layout
                    .copy_blob(&layer.digest, layer.size, &path)
                    .map_err(|e| match e {
                        CopyError::Layout(e) => StoreError::Layout(e),
                        CopyError::Write { path, source } => StoreError::Io {
                            path,
                            what: "copying a blob",
                            source,
                        },
                    })?;
                commit.push((path.clone(), blob_dest.clone()));
                path
            };
            let erofs_size = if let Ok(meta) = fs::metadata(&layer_dest) {
                progress.layer_done(&shown, "already converted");
                meta.len()
            } else if let Some((_, staged)) = commit_find(&commit, &layer_dest) {
                // The same layer twice in one image.
                fs::metadata(staged).map(|m| m.len()).unwrap_or(0)
            } else {
                let tree = staging.path().join(format!("tree-{i}"));
                rustix::fs::mkdir(&tree, Mode::from_raw_mode(0o700))
                    .map_err(|e| io_err(&tree, "creating a staging tree")(e.into()))?;
                let out = staging.path().join(format!("layer-{i}.erofs"));
                let converted = convert::convert_layer(
                    &staged_blob,
                    &layer.digest,
                    &layer.media_type,
                    &layer.diff_id,
                    &tree,
                    &out,
                    progress,
                );
                // Free the tree's space before anything else.
                let _ = fs::remove_dir_all(&tree);
                let converted = converted?;
                progress.layer_done(
                    &shown,
                    &format!(
                        "converted: {} entries, {} KiB erofs (unpack {} ms, mkfs {} ms)",
                        converted.stats.entries,
                        converted.erofs_bytes / 1024,
                        converted.unpack_ms,
                        converted.mkfs_ms
                    ),
                );
                commit.push((out, layer_dest.clone()));
                converted.erofs_bytes
            };
            layer_records.push(LayerRecord {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
                size: layer.size,
                diff_id: layer.diff_id.clone(),
                erofs: layer_rel,
                erofs_size,
            });
        }
        for (bytes, digest, what) in [
            (&image.manifest_bytes, &image.manifest_digest, "manifest"),
            (&image.config_bytes, &image.config_digest, "config"),
        ] {
            let dest = self.blob_path(digest);
            if !dest.is_file() {
                let path = staging.path().join(what);
                let mut file = File::create_new(&path).map_err(io_err(&path, "writing"))?;
                file.write_all(bytes).map_err(io_err(&path, "writing"))?;
                file.sync_all().map_err(io_err(&path, "syncing"))?;
                commit.push((path, dest));
            }
        }

        // Commit: content first, then the record, then the names.
        let mut dirs = BTreeSet::new();
        for (from, dest) in &commit {
            if !dest.exists() {
                fs::rename(from, dest).map_err(io_err(dest, "renaming into place"))?;
                if let Some(parent) = dest.parent() {
                    dirs.insert(parent.to_path_buf());
                }
            }
        }
        for dir in dirs {
            sync_dir(&dir)?;
        }
        let record = ImageRecord {
            digest: image.manifest_digest.clone(),
            config_digest: image.config_digest.clone(),
            layers: layer_records,
            names: names.clone(),
            created: image.config.created().clone(),
            imported_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let bytes = serde_json::to_vec_pretty(&record).unwrap_or_default();
        self.write_atomic(&self.record_path(&record.digest), &bytes)?;
        if !names.is_empty() {
            let mut refs = self.refs()?;
            for name in &names {
                refs.insert(name.clone(), record.digest.clone());
            }
            self.write_refs(&refs)?;
        }
        progress.message(&format!("imported {} {}", record.digest, names.join(" ")));
        self.read_record(&record.digest, &self.refs()?)
    }
}

fn commit_find<'a>(
    commit: &'a [(PathBuf, PathBuf)],
    dest: &Path,
) -> Option<(&'a PathBuf, &'a PathBuf)> {
    commit.iter().find(|(_, d)| d == dest).map(|(f, d)| (d, f))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir, "syncing a directory"))
}

fn sync_parent(path: &Path) -> Result<(), StoreError> {
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}
