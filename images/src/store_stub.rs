//! A stand-in for the image store (branch `images`) until it lands: the names and
//! signatures agreed for the pull (`Store::open`, `staging_dir`, `import_oci_layout`,
//! `has_blob`, `resolve`, the `Progress` trait), with just enough behaviour for the pull's
//! tests: blobs are renamed into `blobs/sha256/` and the image record is one JSON file
//! renamed into `images/`. Deleted when the store is cherry-picked.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What the store reports while it imports; the pull reports its downloads through it too.
pub trait Progress {
    /// A layer (or config) of `total_bytes` starts.
    fn layer_started(&self, digest: &str, total_bytes: u64);
    /// `bytes` more of the layer arrived.
    fn layer_advanced(&self, digest: &str, bytes: u64);
    /// The layer is complete.
    fn layer_done(&self, digest: &str);
    /// A line of its own.
    fn message(&self, text: &str);
}

/// Plain lines on stderr, for when stderr is not a terminal.
pub struct LineProgress;

impl Progress for LineProgress {
    fn layer_started(&self, digest: &str, total_bytes: u64) {
        eprintln!("{}: downloading {total_bytes} bytes", short(digest));
    }
    fn layer_advanced(&self, _digest: &str, _bytes: u64) {}
    fn layer_done(&self, digest: &str) {
        eprintln!("{}: done", short(digest));
    }
    fn message(&self, text: &str) {
        eprintln!("{text}");
    }
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.get(..12).unwrap_or(hex)
}

/// An error of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file of the store or of the layout cannot be read or written.
    #[error("cannot access {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The layout is not what an OCI image layout must be.
    #[error("invalid OCI layout {path}: {reason}")]
    Layout {
        /// The layout directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One image of the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The name it was imported under.
    pub name: Option<String>,
    /// The manifest's digest.
    pub digest: String,
    /// The layers' digests, base first.
    pub layers: Vec<String>,
}

/// What `Store::resolve` returns.
pub type ResolvedImage = ImageRecord;

/// The host image store.
pub struct Store {
    root: PathBuf,
}

/// A directory inside the store, removed on drop.
pub struct Staging {
    path: PathBuf,
}

impl Staging {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

impl Store {
    /// Opens (creating) the store at `root`.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        for dir in ["blobs/sha256", "images", "tmp"] {
            let path = root.join(dir);
            fs::create_dir_all(&path).map_err(io_error(&path))?;
        }
        Ok(Store {
            root: root.to_owned(),
        })
    }

    /// `/var/lib/crib/images`.
    pub fn default_root() -> PathBuf {
        PathBuf::from("/var/lib/crib/images")
    }

    /// A new empty staging directory.
    pub fn staging_dir(&self) -> Result<Staging, StoreError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self
            .root
            .join("tmp")
            .join(format!("staging-{}-{n}", std::process::id()));
        fs::create_dir_all(&path).map_err(io_error(&path))?;
        Ok(Staging { path })
    }

    /// Whether the store holds the blob `digest` (`sha256:<hex>`).
    pub fn has_blob(&self, digest: &str) -> bool {
        digest
            .strip_prefix("sha256:")
            .is_some_and(|hex| self.root.join("blobs/sha256").join(hex).is_file())
    }

    /// The image named `name` or whose manifest digest is `name`.
    pub fn resolve(&self, name: &str) -> Result<Option<ResolvedImage>, StoreError> {
        let dir = self.root.join("images");
        for entry in fs::read_dir(&dir).map_err(io_error(&dir))? {
            let path = entry.map_err(io_error(&dir))?.path();
            let text = fs::read(&path).map_err(io_error(&path))?;
            let Ok(record) = serde_json::from_slice::<ImageRecord>(&text) else {
                continue;
            };
            if record.name.as_deref() == Some(name) || record.digest == name {
                return Ok(Some(record));
            }
        }
        Ok(None)
    }

    /// Every image record.
    pub fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let dir = self.root.join("images");
        let mut out = vec![];
        for entry in fs::read_dir(&dir).map_err(io_error(&dir))? {
            let path = entry.map_err(io_error(&dir))?.path();
            let text = fs::read(&path).map_err(io_error(&path))?;
            if let Ok(record) = serde_json::from_slice(&text) {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Moves the layout's blobs into the store and records the image.
    pub fn import_oci_layout(
        &self,
        dir: &Path,
        name: Option<&str>,
        progress: &dyn Progress,
    ) -> Result<ImageRecord, StoreError> {
        let layout = |reason: &str| StoreError::Layout {
            path: dir.to_owned(),
            reason: reason.to_owned(),
        };
        let index_path = dir.join("index.json");
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(&index_path).map_err(io_error(&index_path))?)
                .map_err(|_| layout("index.json is not JSON"))?;
        let digest = index["manifests"][0]["digest"]
            .as_str()
            .ok_or_else(|| layout("no manifest"))?
            .to_owned();
        let blob = |digest: &str| {
            dir.join("blobs/sha256")
                .join(digest.strip_prefix("sha256:").unwrap_or(digest))
        };
        let manifest_path = blob(&digest);
        let manifest: serde_json::Value =
            serde_json::from_slice(&fs::read(&manifest_path).map_err(io_error(&manifest_path))?)
                .map_err(|_| layout("manifest is not JSON"))?;
        let mut digests = vec![digest.clone()];
        digests.extend(manifest["config"]["digest"].as_str().map(str::to_owned));
        let layers: Vec<String> = manifest["layers"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter_map(|d| d["digest"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        digests.extend(layers.iter().cloned());
        for d in &digests {
            let from = blob(d);
            let to = self
                .root
                .join("blobs/sha256")
                .join(d.strip_prefix("sha256:").unwrap_or(d));
            if from.exists() {
                fs::rename(&from, &to).map_err(io_error(&from))?;
            } else if !to.exists() {
                return Err(layout("a blob is missing"));
            }
        }
        progress.message(&format!("imported {digest}"));
        let record = ImageRecord {
            name: name.map(str::to_owned),
            digest: digest.clone(),
            layers,
        };
        let hex = digest.strip_prefix("sha256:").unwrap_or(&digest);
        let tmp = self.root.join("tmp").join(format!("{hex}.json"));
        let text = serde_json::to_vec(&record).map_err(|_| layout("record"))?;
        fs::write(&tmp, text).map_err(io_error(&tmp))?;
        let dest = self.root.join("images").join(format!("{hex}.json"));
        fs::rename(&tmp, &dest).map_err(io_error(&dest))?;
        Ok(record)
    }
}
