//! Progress reports of long operations (layer ingest and conversion): a one-line bar per
//! layer on a terminal (indicatif), plain lines otherwise (logs, CI). The registry pull
//! reports through the same trait.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// Receives progress of an import or pull. `digest` names the layer (`sha256:...`).
/// `Send + Sync`: a pull may report from several download threads.
pub trait Progress: Send + Sync {
    /// Work on a layer starts; `total_bytes` is its blob size (0 if unknown).
    fn layer_started(&self, digest: &str, total_bytes: u64);
    /// `bytes` more of the layer have been processed.
    fn layer_advanced(&self, digest: &str, bytes: u64);
    /// The layer is finished; `what` says how ("converted, 1.2 MiB erofs", "already stored").
    fn layer_done(&self, digest: &str, what: &str);
    /// A line of its own (image-level steps, results).
    fn message(&self, line: &str);
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn layer_started(&self, _: &str, _: u64) {}
    fn layer_advanced(&self, _: &str, _: u64) {}
    fn layer_done(&self, _: &str, _: &str) {}
    fn message(&self, _: &str) {}
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.get(..12).unwrap_or(hex)
}

/// Plain lines on stderr: one when a layer starts, one when it is done.
pub struct PlainProgress;

impl Progress for PlainProgress {
    fn layer_started(&self, digest: &str, total_bytes: u64) {
        eprintln!("layer {}: {} bytes", short(digest), total_bytes);
    }
    fn layer_advanced(&self, _: &str, _: u64) {}
    fn layer_done(&self, digest: &str, what: &str) {
        eprintln!("layer {}: {what}", short(digest));
    }
    fn message(&self, line: &str) {
        eprintln!("{line}");
    }
}

/// One indicatif bar per layer on stderr.
pub struct TerminalProgress {
    bars: MultiProgress,
    layers: Mutex<HashMap<String, ProgressBar>>,
}

impl TerminalProgress {
    pub fn new() -> TerminalProgress {
        TerminalProgress {
            bars: MultiProgress::new(),
            layers: Mutex::new(HashMap::new()),
        }
    }

    fn bar(&self, digest: &str) -> Option<ProgressBar> {
        self.layers.lock().ok()?.get(digest).cloned()
    }
}

impl Default for TerminalProgress {
    fn default() -> Self {
        TerminalProgress::new()
    }
}

impl Progress for TerminalProgress {
    fn layer_started(&self, digest: &str, total_bytes: u64) {
        let bar = self.bars.add(ProgressBar::new(total_bytes));
        if let Ok(style) =
            ProgressStyle::with_template("layer {prefix}: {bar:30} {bytes}/{total_bytes} {msg}")
        {
            bar.set_style(style);
        }
        bar.set_prefix(short(digest).to_string());
        if let Ok(mut layers) = self.layers.lock() {
            layers.insert(digest.to_string(), bar);
        }
    }
    fn layer_advanced(&self, digest: &str, bytes: u64) {
        if let Some(bar) = self.bar(digest) {
            bar.inc(bytes);
        }
    }
    fn layer_done(&self, digest: &str, what: &str) {
        match self.bar(digest) {
            Some(bar) => bar.finish_with_message(what.to_string()),
            None => self.message(&format!("layer {}: {what}", short(digest))),
        }
    }
    fn message(&self, line: &str) {
        if self.bars.println(line).is_err() {
            let _ = writeln!(std::io::stderr(), "{line}");
        }
    }
}

/// The reporter for this process: bars if stderr is a terminal, plain lines otherwise.
pub fn for_stderr() -> Box<dyn Progress> {
    if std::io::stderr().is_terminal() {
        Box::new(TerminalProgress::new())
    } else {
        Box::new(PlainProgress)
    }
}
