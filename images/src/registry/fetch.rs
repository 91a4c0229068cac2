//! One blob from the registry to a file: streamed (distribution-spec "Pulling blobs"),
//! hashed while it arrives, its size and digest checked against the manifest's
//! descriptor. The image-spec's descriptor rule: "the content SHOULD be verified against
//! this digest when consumed via untrusted sources"; crib treats every registry as one.

use std::path::Path;

use futures_util::StreamExt;
use oci_client::errors::DigestError;
use oci_client::manifest::OciDescriptor;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{classify, PullError};

/// The writes to the blob's file go through a buffer this large (tokio's file writes are
/// a thread hop each).
const WRITE_BUFFER_BYTES: usize = 1 << 20;

/// A blob of the manifest.
#[derive(Debug, Clone)]
pub struct Blob {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// What the download reports as it goes.
pub trait Report {
    fn advanced(&self, digest: &str, bytes: u64);
}

/// Downloads `blob` of `reference` into `path`.
pub async fn fetch(
    client: &Client,
    reference: &Reference,
    blob: &Blob,
    path: &Path,
    report: &dyn Report,
) -> Result<(), PullError> {
    let size = i64::try_from(blob.size).map_err(|_| PullError::BlobSize {
        reference: reference.whole(),
        digest: blob.digest.clone(),
        expected: blob.size,
        actual: 0,
    })?;
    // No `urls`: oci-client would follow them off the registry; foreign layers were
    // refused with the manifest.
    let descriptor = OciDescriptor {
        media_type: blob.media_type.clone(),
        digest: blob.digest.clone(),
        size,
        urls: None,
        annotations: None,
        artifact_type: None,
    };
    let mut stream = client
        .pull_blob_stream(reference, &descriptor)
        .await
        .map_err(|e| classify(reference, e))?;
    let size_error = |actual| PullError::BlobSize {
        reference: reference.whole(),
        digest: blob.digest.clone(),
        expected: blob.size,
        actual,
    };
    if let Some(length) = stream.content_length {
        if length != blob.size {
            return Err(size_error(length));
        }
    }
    let io_error = |source| PullError::Io {
        path: path.to_owned(),
        source,
    };
    let file = tokio::fs::File::create(path).await.map_err(io_error)?;
    let mut out = tokio::io::BufWriter::with_capacity(WRITE_BUFFER_BYTES, file);
    let mut hasher = Sha256::new();
    let mut received: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            // oci-client's own check at the end of the stream: ours below says the same
            // with the reference, so let it speak only when it is the digest.
            Err(e) if is_digest_error(&e) => break,
            Err(e) => {
                return Err(PullError::Transfer {
                    reference: reference.whole(),
                    digest: blob.digest.clone(),
                    source: e,
                })
            }
        };
        let len = u64::try_from(chunk.len()).unwrap_or(u64::MAX);
        received = received.saturating_add(len);
        if received > blob.size {
            return Err(size_error(received));
        }
        hasher.update(&chunk);
        out.write_all(&chunk).await.map_err(io_error)?;
        report.advanced(&blob.digest, len);
    }
    out.flush().await.map_err(io_error)?;
    if received != blob.size {
        return Err(size_error(received));
    }
    let actual = format!("sha256:{:x}", hasher.finalize());
    if actual != blob.digest {
        return Err(PullError::BlobDigest {
            reference: reference.whole(),
            digest: blob.digest.clone(),
            actual,
        });
    }
    Ok(())
}

fn is_digest_error(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<DigestError>())
}
