//! Claiming a Unix socket path before binding it: a stale socket file (its server gone) is
//! replaced, but a socket a live process serves is never unlinked, and a path that is not a
//! socket is never touched. Every socket crib serves (API, Docker API, vsock) goes through
//! here, so a second crib given a live path refuses to start instead of taking it over.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use crate::virtio::vsock::unix::connect_nonblocking;

/// Why a socket path cannot be claimed.
#[derive(Debug, thiserror::Error)]
pub enum SocketPathError {
    #[error("{path} exists and is not a socket: remove it or choose another path")]
    NotASocket { path: PathBuf },
    #[error(
        "{path} is served by a running process (another crib?): stop it or choose another path"
    )]
    InUse { path: PathBuf },
    #[error("cannot check {path}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the stale socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Makes `path` free to bind: nothing there, or a stale socket file that is removed.
pub fn claim(path: &Path) -> Result<(), SocketPathError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A listener answers (or is too busy to: a full backlog); a stale file refuses.
            let live = match connect_nonblocking(path) {
                Ok(_) => true,
                Err(e) => e.kind() == io::ErrorKind::WouldBlock,
            };
            if live {
                return Err(SocketPathError::InUse {
                    path: path.to_path_buf(),
                });
            }
            std::fs::remove_file(path).map_err(|source| SocketPathError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })
        }
        Ok(_) => Err(SocketPathError::NotASocket {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SocketPathError::Inspect {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("crib-claim-{name}-{}", std::process::id()))
    }

    #[test]
    fn claim_of_a_live_socket_is_refused_and_keeps_it() {
        let path = temp("live");
        let _ = std::fs::remove_file(&path);
        let _listener = UnixListener::bind(&path).unwrap();

        let err = claim(&path).unwrap_err();

        assert!(matches!(err, SocketPathError::InUse { .. }), "{err}");
        assert!(path.exists());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn claim_of_a_stale_socket_removes_it() {
        let path = temp("stale");
        let _ = std::fs::remove_file(&path);
        drop(UnixListener::bind(&path).unwrap());

        claim(&path).unwrap();

        assert!(!path.exists());
    }

    #[test]
    fn claim_of_a_regular_file_is_refused_and_keeps_it() {
        let path = temp("file");
        std::fs::write(&path, b"data").unwrap();

        let err = claim(&path).unwrap_err();

        assert!(matches!(err, SocketPathError::NotASocket { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn claim_of_a_missing_path_is_free() {
        claim(&temp("missing")).unwrap();
    }
}
