//! Converts a layer blob into a read-only erofs image: decompress (by magic bytes; the
//! media type only says which compressions are allowed), hash the uncompressed stream
//! (the diffID, image-spec `config.md` `rootfs.diff_ids`), unpack it into a private
//! staging tree (src/unpack.rs), then `mkfs.erofs IMAGE TREE`. erofs-utils 1.5 (Debian
//! 12) has no `--tar` mode, hence the staging tree.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::digest::{Digest, HashingReader};
use crate::progress::Progress;
use crate::unpack::{self, UnpackError, UnpackMode, UnpackStats};

/// The erofs compressor passed to mkfs.erofs, or None for an uncompressed image.
///
/// Uncompressed. Measured with erofs-utils 1.5 on this project's 2-core host
/// (docs/IMAGES.md, "Conversion"): the busybox layer (2.0 MiB tree) builds in 0.03 s into
/// 1.92 MiB uncompressed, 0.09 s into 1.38 MiB with `-zlz4hc`; a 145 MiB tree of text
/// (/usr/share/doc) in 1.1 s into 131 MiB uncompressed, 14.3 s into 92.5 MiB with lz4hc.
/// lz4hc saves about 30% of disk but makes conversion ~12x slower on real layers (it is
/// on the import path a user waits for), and every guest then pays lz4 decompression on
/// each page-cache miss against the 100 ms start budget. Disk is the cheaper resource;
/// uncompressed erofs also keeps the door open to DAX mapping of layers.
pub const EROFS_COMPRESSOR: Option<&str> = None;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("Converting layer {digest} needs root (mknod, chown and trusted.* xattrs in the staging tree): run crib image as root")]
    NotRoot { digest: Digest },
    #[error("Layer {digest} has media type {media_type:?}, which crib cannot unpack (supported: OCI/Docker layer tar, tar+gzip, tar+zstd; not encrypted layers)")]
    MediaType { digest: Digest, media_type: String },
    #[error("Reading layer blob {path} failed")]
    ReadBlob {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Layer {digest}: the uncompressed tar's digest is {actual}, but the image config's rootfs.diff_ids says {expected}: the image is corrupt or tampered with")]
    DiffIdMismatch {
        digest: Digest,
        expected: Digest,
        actual: Digest,
    },
    #[error("Layer {digest}: unpacking failed")]
    Unpack {
        digest: Digest,
        #[source]
        source: UnpackError,
    },
    #[error("Running mkfs.erofs failed (install erofs-utils: scripts/install-deps.sh)")]
    MkfsSpawn(#[source] io::Error),
    #[error("mkfs.erofs failed writing {path} (disk full?): {stderr}")]
    Mkfs { path: PathBuf, stderr: String },
    #[error("Syncing {path} failed (disk full?)")]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The compression of a layer stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// Whether crib can unpack layers of this media type. An empty media type (a docker-save
/// archive's layer, which has none) is sniffed.
pub fn media_type_supported(media_type: &str) -> bool {
    matches!(
        media_type,
        "" | "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    )
}

/// The compression a stream starts with (its magic bytes); anything else is a plain tar.
pub fn sniff(head: &[u8]) -> LayerCompression {
    if head.starts_with(GZIP_MAGIC) {
        LayerCompression::Gzip
    } else if head.starts_with(ZSTD_MAGIC) {
        LayerCompression::Zstd
    } else {
        LayerCompression::None
    }
}

/// A decompressing reader over `reader`, chosen by its magic bytes.
pub fn decompress<'a, R: Read + 'a>(reader: R) -> io::Result<Box<dyn Read + 'a>> {
    let mut reader = BufReader::new(reader);
    let compression = sniff(reader.fill_buf()?);
    Ok(match compression {
        LayerCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
        LayerCompression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(reader)?),
        LayerCompression::None => Box::new(reader),
    })
}

/// A reader that reports the bytes read to a [`Progress`].
struct ProgressReader<'a, R> {
    inner: R,
    digest: String,
    progress: &'a dyn Progress,
}

impl<R: Read> Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.layer_advanced(&self.digest, n as u64);
        Ok(n)
    }
}

/// A converted layer.
#[derive(Clone, Debug)]
pub struct ConvertedLayer {
    pub diff_id: Digest,
    pub uncompressed_bytes: u64,
    pub erofs_bytes: u64,
    pub stats: UnpackStats,
    pub unpack_ms: u128,
    pub mkfs_ms: u128,
}

/// Converts the verified blob `blob` (digest `digest`) into the erofs image `out`,
/// unpacking into `tree` (an empty private directory; the caller removes it). Fails
/// without an image if the uncompressed stream is not `expected_diff_id`.
pub fn convert_layer(
    blob: &Path,
    digest: &Digest,
    media_type: &str,
    expected_diff_id: &Digest,
    tree: &Path,
    out: &Path,
    progress: &dyn Progress,
) -> Result<ConvertedLayer, ConvertError> {
    if !media_type_supported(media_type) {
        return Err(ConvertError::MediaType {
            digest: digest.clone(),
            media_type: media_type.to_string(),
        });
    }
    if !rustix::process::geteuid().is_root() {
        return Err(ConvertError::NotRoot {
            digest: digest.clone(),
        });
    }
    let read_err = |source| ConvertError::ReadBlob {
        path: blob.to_path_buf(),
        source,
    };
    let file = File::open(blob).map_err(read_err)?;
    let total = file.metadata().map_err(read_err)?.len();
    progress.layer_started(&digest.to_string(), total);
    let reader = ProgressReader {
        inner: file,
        digest: digest.to_string(),
        progress,
    };
    let started = Instant::now();
    let hashing = HashingReader::new(decompress(reader).map_err(read_err)?);
    let (hashing, stats) = unpack::unpack(hashing, tree, UnpackMode::Layer).map_err(|source| {
        ConvertError::Unpack {
            digest: digest.clone(),
            source,
        }
    })?;
    let (diff_id, uncompressed_bytes) = hashing.finish().map_err(read_err)?;
    if &diff_id != expected_diff_id {
        return Err(ConvertError::DiffIdMismatch {
            digest: digest.clone(),
            expected: expected_diff_id.clone(),
            actual: diff_id,
        });
    }
    let unpack_ms = started.elapsed().as_millis();
    let started = Instant::now();
    mkfs_erofs(tree, out, &diff_id)?;
    let mkfs_ms = started.elapsed().as_millis();
    let sync_err = |source| ConvertError::Sync {
        path: out.to_path_buf(),
        source,
    };
    let image = File::open(out).map_err(sync_err)?;
    image.sync_all().map_err(sync_err)?;
    let erofs_bytes = image.metadata().map_err(sync_err)?.len();
    Ok(ConvertedLayer {
        diff_id,
        uncompressed_bytes,
        erofs_bytes,
        stats,
        unpack_ms,
        mkfs_ms,
    })
}

/// A filesystem UUID derived from the diffID: the same layer gets the same UUID.
fn uuid_for(diff_id: &Digest) -> String {
    let h = diff_id.hex();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// `mkfs.erofs [-zCOMPRESSOR] -U<uuid> --preserve-mtime OUT TREE`.
///
/// Not `-T0`: in erofs-utils 1.5 `-T` (and SOURCE_DATE_EPOCH) set every inode's mtime,
/// losing the layer's. So the superblock's build time differs between two conversions
/// of one layer; nothing keys on the image's bytes (layers are keyed by diffID).
pub fn mkfs_erofs(tree: &Path, out: &Path, diff_id: &Digest) -> Result<(), ConvertError> {
    let mut command = Command::new("mkfs.erofs");
    command.arg("--quiet").arg("--preserve-mtime");
    command.arg(format!("-U{}", uuid_for(diff_id)));
    if let Some(compressor) = EROFS_COMPRESSOR {
        command.arg(format!("-z{compressor}"));
    }
    let output = command
        .arg(out)
        .arg(tree)
        .output()
        .map_err(ConvertError::MkfsSpawn)?;
    if !output.status.success() {
        let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        if stderr.is_empty() {
            stderr = format!("{}", output.status);
        }
        return Err(ConvertError::Mkfs {
            path: out.to_path_buf(),
            stderr,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniff_zstd_magic_is_zstd() {
        assert_eq!(sniff(&[0x28, 0xb5, 0x2f, 0xfd, 0]), LayerCompression::Zstd);
    }

    #[test]
    fn sniff_tar_is_none() {
        assert_eq!(sniff(b"etc/passwd\0"), LayerCompression::None);
    }

    #[test]
    fn media_type_encrypted_is_unsupported() {
        assert!(!media_type_supported(
            "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"
        ));
    }

    #[test]
    fn uuid_for_has_uuid_shape() {
        let uuid = uuid_for(&Digest::of(b"x"));

        assert_eq!(uuid.len(), 36);
    }
}
