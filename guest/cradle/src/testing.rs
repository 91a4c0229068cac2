//! Test helpers shared by cradle's unit tests.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// A directory under the system temp dir, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `cradle-<tag>-<pid>`, empty.
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("cradle-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Held by tests that start a child process through std. As PID 1 cradle
/// reaps any child (the `All` reaper, the shutdown sweep), which in a test
/// binary would also reap the children of tests running in parallel
/// threads; tests use `ReapMode::Own`, and one that reaped any child would
/// have to hold this too.
static CHILDREN: Mutex<()> = Mutex::new(());

/// Takes the child-process lock (a panicked holder does not matter).
pub fn children_lock() -> MutexGuard<'static, ()> {
    CHILDREN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
