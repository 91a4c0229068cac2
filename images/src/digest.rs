//! Content digests (image-spec `descriptor.md`, "Digests"): `sha256:<64 lowercase hex>`.
//! Only sha256 is accepted; the spec's other registered algorithm (sha512) and anything
//! else is refused with an error that says so.

use std::fmt;
use std::io::{self, Read, Write};

use sha2::{Digest as _, Sha256};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("Digest {digest:?} uses algorithm {algorithm:?}: crib stores only sha256 content (re-push the image with sha256 digests)")]
    UnsupportedAlgorithm { digest: String, algorithm: String },
    #[error("Digest {digest:?} is malformed: expected sha256:<64 lowercase hex digits>")]
    Malformed { digest: String },
}

/// A sha256 content digest.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// Parses `sha256:<hex>`.
    pub fn parse(digest: &str) -> Result<Digest, DigestError> {
        let Some((algorithm, hex)) = digest.split_once(':') else {
            return Err(DigestError::Malformed {
                digest: digest.to_string(),
            });
        };
        if algorithm != "sha256" {
            return Err(DigestError::UnsupportedAlgorithm {
                digest: digest.to_string(),
                algorithm: algorithm.to_string(),
            });
        }
        Digest::from_hex(hex).ok_or_else(|| DigestError::Malformed {
            digest: digest.to_string(),
        })
    }

    /// A digest from its 64 lowercase hex digits, or None.
    pub fn from_hex(hex: &str) -> Option<Digest> {
        let valid = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        valid.then(|| Digest {
            hex: hex.to_string(),
        })
    }

    /// The digest of some bytes.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest {
            hex: format!("{:x}", Sha256::digest(bytes)),
        }
    }

    /// The 64 hex digits (a file name in the store).
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The first 12 hex digits, as `crib image ls` shows them.
    pub fn short(&self) -> &str {
        &self.hex[..12]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let text = String::deserialize(d)?;
        Digest::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A reader that hashes what passes through it and counts the bytes.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// Reads the rest of the stream (tar padding after the end-of-archive blocks is part
    /// of a diffID) and returns the digest and the byte count.
    pub fn finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        let hex = format!("{:x}", self.hasher.finalize());
        Ok((Digest { hex }, self.bytes))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// A writer that hashes what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
        }
    }

    /// The digest of everything written, and the inner writer.
    pub fn finish(self) -> (Digest, W) {
        let hex = format!("{:x}", self.hasher.finalize());
        (Digest { hex }, self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_sha512_is_unsupported() {
        let err = Digest::parse(&format!("sha512:{}", "a".repeat(128))).unwrap_err();

        assert!(matches!(err, DigestError::UnsupportedAlgorithm { .. }));
    }

    #[test]
    fn parse_uppercase_hex_is_malformed() {
        let err = Digest::parse(&format!("sha256:{}", "A".repeat(64))).unwrap_err();

        assert!(matches!(err, DigestError::Malformed { .. }));
    }

    #[test]
    fn parse_path_traversal_is_malformed() {
        let err = Digest::parse("sha256:../../etc/passwd").unwrap_err();

        assert!(matches!(err, DigestError::Malformed { .. }));
    }

    #[test]
    fn hashing_reader_matches_digest_of() {
        let reader = HashingReader::new(&b"hello"[..]);

        let (digest, bytes) = reader.finish().unwrap();

        assert_eq!(digest, Digest::of(b"hello"));
        assert_eq!(bytes, 5);
    }
}
