//! Reads the pod spec the VMM put in the initramfs (a second cpio archive
//! holding `/etc/cradle/pod.json`, see `initramfs::pod_archive`). No file
//! means no pod: cradle only runs the test hook, as before pods existed.

use std::io;
use std::path::{Path, PathBuf};

use initramfs::podspec::{PodSpec, PodSpecError};
use thiserror::Error;

/// Errors of reading the pod spec.
#[derive(Debug, Error)]
pub enum PodError {
    #[error("cannot read the pod spec {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid pod spec {}", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        source: PodSpecError,
    },
}

/// Reads and validates the spec at `path`; `None` if there is no file.
pub fn read_spec(path: &Path) -> Result<Option<PodSpec>, PodError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(PodError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    PodSpec::from_json(&bytes)
        .map(Some)
        .map_err(|source| PodError::Invalid {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

    #[test]
    fn read_spec_without_file_is_no_pod() {
        let dir = TempDir::new("pod-none");

        let spec = read_spec(&dir.path().join("pod.json")).unwrap();

        assert!(spec.is_none());
    }

    #[test]
    fn read_spec_valid_file_is_the_pod() {
        let dir = TempDir::new("pod-valid");
        let path = dir.path().join("pod.json");
        std::fs::write(&path, r#"{"name": "web", "volumes": [{"name": "data"}]}"#).unwrap();

        let spec = read_spec(&path).unwrap().unwrap();

        assert_eq!(spec.name, "web");
        assert_eq!(spec.volumes.len(), 1);
    }

    #[test]
    fn read_spec_invalid_file_names_the_file_and_the_field() {
        let dir = TempDir::new("pod-invalid");
        let path = dir.path().join("pod.json");
        std::fs::write(
            &path,
            r#"{"name": "web", "volumes": [{"name": "data", "size": 1}]}"#,
        )
        .unwrap();

        let error = read_spec(&path).unwrap_err();

        let chain = crate::console::error_chain(&error);
        assert!(chain.contains("pod.json"), "{chain}");
        assert!(chain.contains("unknown field `size`"), "{chain}");
    }

    #[test]
    fn read_spec_of_a_directory_is_a_read_error() {
        let dir = TempDir::new("pod-dir");

        let error = read_spec(dir.path()).unwrap_err();

        assert!(matches!(error, PodError::Read { .. }));
    }
}
