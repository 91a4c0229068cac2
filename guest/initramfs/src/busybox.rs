//! Busybox for the test hook's shell: which applets to link to it.
//!
//! The applet list comes from running `busybox --list` on the host (a
//! static busybox runs anywhere); each applet becomes `/bin/<name>` ->
//! `busybox`.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

/// Applets the test hook relies on; a busybox without one is refused.
pub const REQUIRED_APPLETS: &[&str] = &[
    "sh", "cat", "echo", "ls", "grep", "mount", "dd", "sync", "sleep", "head", "wc", "mkdir", "rm",
    "test",
];

/// The fix for a missing or unusable busybox.
const INSTALL_HINT: &str = "apt-get install busybox-static";

/// Errors of the busybox module.
#[derive(Debug, Error)]
pub enum BusyboxError {
    #[error("cannot run {} --list; {INSTALL_HINT}", path.display())]
    Run {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} --list failed ({status}); {INSTALL_HINT}", path.display())]
    Failed { path: PathBuf, status: String },
    #[error("{} lacks applets {}; {INSTALL_HINT}", path.display(), missing.join(", "))]
    MissingApplets { path: PathBuf, missing: Vec<String> },
}

/// Runs `busybox --list` and returns its applets, checking the required ones.
pub fn list_applets(busybox: &Path) -> Result<Vec<String>, BusyboxError> {
    let output = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|source| BusyboxError::Run {
            path: busybox.to_path_buf(),
            source,
        })?;
    if !output.status.success() {
        return Err(BusyboxError::Failed {
            path: busybox.to_path_buf(),
            status: output.status.to_string(),
        });
    }
    let applets = parse_applets(&String::from_utf8_lossy(&output.stdout));
    let missing = missing_required(&applets);
    if !missing.is_empty() {
        return Err(BusyboxError::MissingApplets {
            path: busybox.to_path_buf(),
            missing,
        });
    }
    Ok(applets)
}

/// One applet name per line; drops `busybox` itself and anything that is not
/// a plain file name.
pub fn parse_applets(list: &str) -> Vec<String> {
    list.lines()
        .map(str::trim)
        .filter(|name| !name.is_empty() && *name != "busybox" && *name != "." && *name != "..")
        .filter(|name| !name.contains('/') && !name.contains('\0'))
        .map(str::to_owned)
        .collect()
}

/// The required applets absent from `applets`.
pub fn missing_required(applets: &[String]) -> Vec<String> {
    REQUIRED_APPLETS
        .iter()
        .filter(|required| !applets.iter().any(|a| a == *required))
        .map(|required| (*required).to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_applets_skips_busybox_blank_and_paths() {
        let applets = parse_applets("[\n[[\nbusybox\n\nsh\nbad/name\nwc\n");

        assert_eq!(applets, ["[", "[[", "sh", "wc"]);
    }

    #[test]
    fn missing_required_lists_absent_applets() {
        let applets: Vec<String> = REQUIRED_APPLETS
            .iter()
            .filter(|a| **a != "dd" && **a != "wc")
            .map(|a| (*a).to_owned())
            .collect();

        assert_eq!(missing_required(&applets), ["dd", "wc"]);
    }

    #[test]
    fn list_applets_of_missing_binary_says_how_to_install() {
        let error = list_applets(Path::new("/nonexistent/busybox")).unwrap_err();

        assert!(error.to_string().contains("busybox-static"));
    }
}
