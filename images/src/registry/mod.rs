//! Registry pulls: `crib image pull` and [`ensure`] for the pod launcher.
//!
//! The distribution-spec pull, through oci-client: the bearer-token flow, the manifest
//! (an index or manifest list resolved to one platform, linux/amd64 by default), the
//! config and every layer the store does not already hold, streamed a few at a time into
//! a staging directory inside the store as an OCI image layout (image-spec
//! `image-layout.md`), each blob hashed while it arrives and checked against its
//! descriptor's digest and size. Then [`Store::import_oci_layout`] moves the blobs in,
//! converts the layers and commits the record; on any error the staging directory goes
//! and the store keeps nothing.
//!
//! Plain HTTP only to loopback registries (127.0.0.0/8, ::1, localhost) or with
//! `--insecure`; HTTPS (rustls, the system's roots) everywhere else.

mod auth;
pub mod cli;
mod fetch;
pub mod manifest;
mod reference;
#[cfg(any(test, feature = "fixtures"))]
pub mod test_registry;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::stream::{self, TryStreamExt};
use oci_client::client::ClientConfig;
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::{Client, Reference, RegistryOperation};

use crate::{Digest, ImageRecord, Progress, ResolvedImage, Store, StoreError};
pub use manifest::Platform;
use manifest::{Manifest, ManifestProblem};

/// Layers downloaded at once.
pub const DEFAULT_CONCURRENT_DOWNLOADS: usize = 3;

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Plain HTTP to this registry even if it is not on loopback.
    pub insecure: bool,
    /// The platform an index resolves to.
    pub platform: Platform,
    /// Layers downloaded at once (at least 1).
    pub concurrent_downloads: usize,
    /// Where config.json with the registry credentials is; default `$DOCKER_CONFIG`,
    /// else `~/.docker`.
    pub docker_config: Option<PathBuf>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            insecure: false,
            platform: Platform::default(),
            concurrent_downloads: DEFAULT_CONCURRENT_DOWNLOADS,
            docker_config: None,
        }
    }
}

/// What a pull did.
#[derive(Debug)]
pub struct Pulled {
    /// The store's record of the image.
    pub record: ImageRecord,
    /// The image manifest's digest (the platform's, for an index).
    pub manifest_digest: String,
    /// Blobs downloaded (config and layers).
    pub downloaded: Vec<String>,
    /// Layers the store already had.
    pub skipped: Vec<String>,
    /// Wall time from the first request to the last blob on disk.
    pub fetch_time: Duration,
    /// Wall time of the store's import (verification, conversion, commit).
    pub import_time: Duration,
}

/// An error of a pull. Each names the reference and what to do.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("invalid image reference {reference:?}: give [REGISTRY/]NAME[:TAG|@sha256:DIGEST] in lowercase")]
    Reference {
        reference: String,
        #[source]
        source: oci_client::ParseError,
    },
    #[error("no image {reference} in registry {registry}: check the name and tag")]
    ManifestUnknown { reference: String, registry: String },
    #[error("cannot reach registry {address} for {reference}: check the address and that the registry is up")]
    Unreachable {
        reference: String,
        address: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("registry {registry} refused access to {reference}: log in with `docker login {registry}` (crib reads ~/.docker/config.json or $DOCKER_CONFIG) or check the name")]
    Unauthorized {
        reference: String,
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("cannot use the credentials for {registry} in {path}: {reason}; fix the file or log in again with `docker login {registry}`")]
    Credentials {
        registry: String,
        path: PathBuf,
        reason: String,
    },
    #[error("malformed manifest for {reference} from {registry}: {field}: {detail}")]
    MalformedManifest {
        reference: String,
        registry: String,
        field: String,
        detail: String,
    },
    #[error("{reference}: unsupported media type {media_type:?} at {field}: crib pulls OCI and Docker schema 2 images with tar, gzip or zstd layers")]
    UnsupportedMediaType {
        reference: String,
        field: String,
        media_type: String,
    },
    #[error("{reference}: {field} is a non-distributable (foreign) layer ({media_type}) that the registry does not serve: crib refuses such images; rebuild it with distributable layers")]
    ForeignLayer {
        reference: String,
        field: String,
        media_type: String,
    },
    #[error(
        "{reference} has no {wanted} image (the index has {available}): choose one with --platform"
    )]
    NoPlatform {
        reference: String,
        wanted: String,
        available: String,
    },
    #[error("blob {digest} of {reference} does not match its digest (its content hashes to {actual}): the registry's copy is corrupt; nothing was stored")]
    BlobDigest {
        reference: String,
        digest: String,
        actual: String,
    },
    #[error("blob {digest} of {reference} is {actual} bytes where the manifest says {expected}: the registry's copy is corrupt or the manifest is wrong; nothing was stored")]
    BlobSize {
        reference: String,
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("download of blob {digest} of {reference} failed: retry the pull")]
    Transfer {
        reference: String,
        digest: String,
        #[source]
        source: std::io::Error,
    },
    #[error("registry error for {reference}")]
    Registry {
        reference: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot store {reference}")]
    Store {
        reference: String,
        #[source]
        source: StoreError,
    },
    #[error("the registry client failed on an answer from the registry for {reference}: the registry sent something invalid; nothing was stored")]
    ClientPanic { reference: String },
    #[error("cannot start the pull's I/O runtime")]
    Runtime(#[source] std::io::Error),
}

/// Turns what oci-client says into what the user needs to read.
fn classify(reference: &Reference, error: OciDistributionError) -> PullError {
    let registry = reference.registry().to_owned();
    match &error {
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown))
            {
                return PullError::ManifestUnknown {
                    reference: reference.whole(),
                    registry,
                };
            }
            if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                return PullError::Unauthorized {
                    reference: reference.whole(),
                    registry,
                    source: error,
                };
            }
        }
        OciDistributionError::ServerError { code: 404, .. } => {
            return PullError::ManifestUnknown {
                reference: reference.whole(),
                registry,
            }
        }
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::ServerError {
            code: 401 | 403, ..
        } => {
            return PullError::Unauthorized {
                reference: reference.whole(),
                registry,
                source: error,
            }
        }
        OciDistributionError::RequestError(e) if e.is_connect() || e.is_timeout() => {
            return PullError::Unreachable {
                reference: reference.whole(),
                address: reference::address(reference, false),
                source: error,
            }
        }
        _ => {}
    }
    PullError::Registry {
        reference: reference.whole(),
        source: error,
    }
}

fn problem(reference: &Reference, problem: ManifestProblem) -> PullError {
    match problem {
        ManifestProblem::Malformed { field, detail } => PullError::MalformedManifest {
            reference: reference.whole(),
            registry: reference.registry().to_owned(),
            field,
            detail,
        },
        ManifestProblem::UnsupportedMediaType { field, media_type } => {
            PullError::UnsupportedMediaType {
                reference: reference.whole(),
                field,
                media_type,
            }
        }
        ManifestProblem::ForeignLayer { field, media_type } => PullError::ForeignLayer {
            reference: reference.whole(),
            field,
            media_type,
        },
        ManifestProblem::NoPlatform { wanted, available } => PullError::NoPlatform {
            reference: reference.whole(),
            wanted,
            available,
        },
    }
}

/// Progress from the download tasks, reported on the caller's thread.
struct Reporter<'a> {
    progress: &'a dyn Progress,
}

impl fetch::Report for Reporter<'_> {
    fn advanced(&self, digest: &str, bytes: u64) {
        self.progress.layer_advanced(digest, bytes);
    }
}

/// A client for `reference`'s registry with its credentials, logged in.
async fn connect(reference: &Reference, options: &PullOptions) -> Result<Client, PullError> {
    let client = Client::new(ClientConfig {
        protocol: reference::protocol(reference, options.insecure),
        // crib resolves indexes itself (manifest::select) to name the platforms it saw.
        platform_resolver: None,
        user_agent: concat!("crib/", env!("CARGO_PKG_VERSION")),
        ..ClientConfig::default()
    });
    let auth = match &options.docker_config {
        Some(dir) => auth::credentials_in(Some(dir), reference.registry())?,
        None => auth::credentials(reference.registry())?,
    };
    // Logging in first (GET /v2/, then the token realm if challenged) makes a refused
    // connection or bad credentials fail here, by name; oci-client would otherwise drop
    // the error and retry anonymously.
    client
        .auth(reference, &auth, RegistryOperation::Pull)
        .await
        .map_err(|e| match classify(reference, e) {
            PullError::Unreachable {
                reference: r,
                source,
                ..
            } => PullError::Unreachable {
                reference: r,
                address: reference::address(reference, options.insecure),
                source,
            },
            other => other,
        })?;
    Ok(client)
}

/// Fetches `reference`'s manifest; an index is resolved to the options' platform.
/// Returns the image manifest, its bytes, media type and digest.
async fn fetch_manifest(
    client: &Client,
    reference: &Reference,
    options: &PullOptions,
) -> Result<
    (
        oci_spec::image::ImageManifest,
        Vec<u8>,
        &'static str,
        String,
    ),
    PullError,
> {
    let (bytes, digest) = client
        .pull_manifest_raw(
            reference,
            &oci_client::secrets::RegistryAuth::Anonymous,
            manifest::ACCEPTED_MANIFEST_TYPES,
        )
        .await
        .map_err(|e| classify(reference, e))?;
    match manifest::parse(&bytes, None).map_err(|p| problem(reference, p))? {
        Manifest::Image(image) => {
            let media_type = manifest::media_type(&bytes, None);
            Ok((*image, bytes.to_vec(), media_type, digest))
        }
        Manifest::Index(index) => {
            let digest =
                manifest::select(&index, &options.platform).map_err(|p| problem(reference, p))?;
            let platform_reference = reference.clone_with_digest(digest.clone());
            let (bytes, digest) = client
                .pull_manifest_raw(
                    &platform_reference,
                    &oci_client::secrets::RegistryAuth::Anonymous,
                    manifest::ACCEPTED_MANIFEST_TYPES,
                )
                .await
                .map_err(|e| classify(reference, e))?;
            match manifest::parse(&bytes, None).map_err(|p| problem(reference, p))? {
                Manifest::Image(image) => {
                    let media_type = manifest::media_type(&bytes, None);
                    Ok((*image, bytes.to_vec(), media_type, digest))
                }
                Manifest::Index(_) => Err(problem(
                    reference,
                    ManifestProblem::Malformed {
                        field: "manifests".into(),
                        detail: format!("the entry for {} is an index itself", options.platform),
                    },
                )),
            }
        }
    }
}

/// Whether the store holds the blob: the pull then neither downloads it nor puts it in
/// the layout (the import takes the store's copy).
fn store_has_blob(store: &Store, digest: &str) -> bool {
    Digest::parse(digest).is_ok_and(|d| store.blob_path(&d).is_file())
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap_or(digest))
}

/// Writes `oci-layout` and `index.json` naming the manifest (image-spec `image-layout.md`).
fn write_layout(
    layout: &Path,
    name: &str,
    media_type: &str,
    digest: &str,
    size: usize,
) -> Result<(), PullError> {
    let io = |path: PathBuf| move |source| PullError::Io { path, source };
    let path = layout.join("oci-layout");
    std::fs::write(&path, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io(path.clone()))?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest::OCI_INDEX,
        "manifests": [{
            "mediaType": media_type,
            "digest": digest,
            "size": size,
            "annotations": { "org.opencontainers.image.ref.name": name },
        }],
    });
    let path = layout.join("index.json");
    std::fs::write(&path, index.to_string()).map_err(io(path.clone()))
}

/// Pulls `reference` into `store`, reporting to `progress`. See the module's doc.
pub fn pull(
    store: &Store,
    reference: &str,
    options: &PullOptions,
    progress: &dyn Progress,
) -> Result<Pulled, PullError> {
    let reference = reference::parse(reference)?;
    let store_error = |source| PullError::Store {
        reference: reference.whole(),
        source,
    };
    let staging = store.staging_dir().map_err(store_error)?;
    let layout = staging.path();
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(|source| PullError::Io {
        path: blobs.clone(),
        source,
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(PullError::Runtime)?;
    let fetch_start = Instant::now();
    // This future (the downloads' hashing and writes, the progress calls) runs on this
    // thread; the runtime's workers drive the connections.
    // oci-client can panic on some hostile answers (a token that is no valid header
    // value); that must fail this pull, not the process.
    let fetched = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(async {
            let client = connect(&reference, options).await?;
            let (image, bytes, media_type, digest) =
                fetch_manifest(&client, &reference, options).await?;
            let path = blob_path(layout, &digest);
            std::fs::write(&path, &bytes).map_err(|source| PullError::Io { path, source })?;
            write_layout(layout, &reference.whole(), media_type, &digest, bytes.len())?;

            let config = image.config();
            let mut wanted = vec![fetch::Blob {
                media_type: config.media_type().to_string(),
                digest: config.digest().to_string(),
                size: config.size(),
            }];
            let mut skipped = vec![];
            // A layer listed twice (or with the config's digest) is fetched once.
            let mut seen = HashSet::from([config.digest().to_string()]);
            for layer in image.layers() {
                let digest = layer.digest().to_string();
                if !seen.insert(digest.clone()) {
                    continue;
                }
                if store_has_blob(store, &digest) {
                    progress.layer_done(&digest, "already in the store");
                    skipped.push(digest);
                    continue;
                }
                wanted.push(fetch::Blob {
                    media_type: layer.media_type().to_string(),
                    digest,
                    size: layer.size(),
                });
            }
            let config_digest = &config.digest().to_string();
            let reporter = Reporter { progress };
            let reporter = &reporter;
            let client = &client;
            let reference = &reference;
            let downloaded = Mutex::new(vec![]);
            let downloaded_ref = &downloaded;
            stream::iter(wanted.into_iter().map(Ok))
                .try_for_each_concurrent(options.concurrent_downloads.max(1), |blob| async move {
                    // The config is no layer: no bar for it.
                    let is_layer = blob.digest != *config_digest;
                    if is_layer {
                        progress.layer_started(&blob.digest, blob.size);
                    }
                    fetch::fetch(
                        client,
                        reference,
                        &blob,
                        &blob_path(layout, &blob.digest),
                        reporter,
                    )
                    .await?;
                    if is_layer {
                        progress.layer_done(&blob.digest, "downloaded");
                    }
                    downloaded_ref
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .push(blob.digest);
                    Ok::<(), PullError>(())
                })
                .await?;
            let downloaded = downloaded
                .into_inner()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            Ok::<_, PullError>((digest, downloaded, skipped))
        })
    }));
    let (manifest_digest, downloaded, skipped) =
        fetched.map_err(|_| PullError::ClientPanic {
            reference: reference.whole(),
        })??;
    drop(runtime);
    let fetch_time = fetch_start.elapsed();
    let import_start = Instant::now();
    let record = store
        .import_oci_layout(layout, Some(&reference.whole()), progress)
        .map_err(store_error)?;
    Ok(Pulled {
        record,
        manifest_digest,
        downloaded,
        skipped,
        fetch_time,
        import_time: import_start.elapsed(),
    })
}

/// When [`ensure`] asks the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Use the store's image of that name if there is one; pull otherwise.
    #[default]
    IfMissing,
    /// Ask the registry for the reference's digest; pull if the store lacks it.
    Always,
}

/// How [`ensure`] pulls.
#[derive(Debug, Clone, Default)]
pub struct EnsureOptions {
    pub pull: PullOptions,
    pub policy: PullPolicy,
}

/// The pod launcher's entry: resolves `reference` to an image in `store`, pulling what
/// is missing, and returns the store's resolved image.
pub fn ensure(
    store: &Store,
    reference: &str,
    options: &EnsureOptions,
    progress: &dyn Progress,
) -> Result<ResolvedImage, PullError> {
    let parsed = reference::parse(reference)?;
    let name = parsed.whole();
    let store_error = |source| PullError::Store {
        reference: name.clone(),
        source,
    };
    if options.policy == PullPolicy::IfMissing {
        match store.resolve(&name) {
            Ok(image) => return Ok(image),
            Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(store_error(e)),
        }
    }
    let pulled = pull(store, reference, &options.pull, progress)?;
    store.resolve(&pulled.manifest_digest).map_err(store_error)
}
