//! The kernel directory made by `guest/kernel/fetch-debian-kernel.sh`:
//! `VERSION` (the release, e.g. `6.1.0-56-cloud-amd64`) and
//! `root/lib/modules/<VERSION>/` with depmod's output.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The fix for every problem with the directory.
const FETCH_HINT: &str =
    "run guest/kernel/fetch-debian-kernel.sh cloud and pass its output directory";

/// Errors of the kernel directory.
#[derive(Debug, Error)]
pub enum KernelDirError {
    #[error("cannot read {}; {FETCH_HINT}", path.display())]
    Version {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is empty; {FETCH_HINT}", path.display())]
    EmptyVersion { path: PathBuf },
    #[error("{} is not a directory; {FETCH_HINT}", path.display())]
    NoModules { path: PathBuf },
}

/// A fetched kernel: its release and where its modules are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelDir {
    /// The kernel release (`uname -r` in the guest).
    pub version: String,
    /// `<dir>/root/lib/modules/<version>`.
    pub modules_dir: PathBuf,
}

impl KernelDir {
    /// Reads `<dir>/VERSION` and checks the modules directory exists.
    pub fn open(dir: &Path) -> Result<Self, KernelDirError> {
        let version_path = dir.join("VERSION");
        let version =
            std::fs::read_to_string(&version_path).map_err(|source| KernelDirError::Version {
                path: version_path.clone(),
                source,
            })?;
        let version = version.trim().to_owned();
        if version.is_empty() || version.contains('/') {
            return Err(KernelDirError::EmptyVersion { path: version_path });
        }
        let modules_dir = dir.join("root/lib/modules").join(&version);
        if !modules_dir.is_dir() {
            return Err(KernelDirError::NoModules { path: modules_dir });
        }
        Ok(Self {
            version,
            modules_dir,
        })
    }

    /// Where the modules go in the guest: `lib/modules/<version>`.
    pub fn guest_modules_dir(&self) -> String {
        format!("lib/modules/{}", self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("crib-kernel-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn open_fetched_layout_finds_modules() {
        let dir = temp_dir("ok");
        std::fs::write(dir.join("VERSION"), "6.1.0-56-cloud-amd64\n").unwrap();
        std::fs::create_dir_all(dir.join("root/lib/modules/6.1.0-56-cloud-amd64")).unwrap();

        let kernel = KernelDir::open(&dir).unwrap();

        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(kernel.version, "6.1.0-56-cloud-amd64");
        assert_eq!(
            kernel.guest_modules_dir(),
            "lib/modules/6.1.0-56-cloud-amd64"
        );
    }

    #[test]
    fn open_without_version_tells_how_to_fetch() {
        let error = KernelDir::open(Path::new("/nonexistent/crib")).unwrap_err();

        assert!(error.to_string().contains("fetch-debian-kernel.sh"));
    }

    #[test]
    fn open_without_modules_dir_names_it() {
        let dir = temp_dir("nomods");
        std::fs::write(dir.join("VERSION"), "6.1.0-x\n").unwrap();

        let error = KernelDir::open(&dir).unwrap_err();

        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(error, KernelDirError::NoModules { .. }));
    }

    #[test]
    fn open_empty_version_is_an_error() {
        let dir = temp_dir("empty");
        std::fs::write(dir.join("VERSION"), "\n").unwrap();

        let error = KernelDir::open(&dir).unwrap_err();

        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(error, KernelDirError::EmptyVersion { .. }));
    }
}
