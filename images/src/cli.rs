//! `crib image ...`: the image store's command line (docs/IMAGES.md, "Commands"). The
//! `crib` binary embeds [`ImageCommand`] and calls [`run`].

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::json;

use crate::progress;
use crate::store::{ImageRecord, Store, StoreError};

/// `--state-dir`, shared by every subcommand.
#[derive(Args, Debug, Clone)]
pub struct StateDirArg {
    /// The image store; default $CRIB_STATE_DIR, else /var/lib/crib as root,
    /// $XDG_DATA_HOME/crib or ~/.local/share/crib.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

impl StateDirArg {
    fn open(&self) -> Result<Store, StoreError> {
        let root = self.state_dir.clone().unwrap_or_else(Store::default_root);
        Store::open(&root)
    }
}

/// `crib image ...`
#[derive(Subcommand, Debug, Clone)]
pub enum ImageCommand {
    /// Import an image: a `docker save` archive, an OCI image layout directory, or a tar
    /// of one (gzip/zstd compressed or not). Verifies every blob and converts each new
    /// layer to an erofs image (needs root).
    Import {
        /// The archive or directory.
        #[arg(value_name = "FILE|DIR")]
        path: PathBuf,
        /// Name the image NAME[:TAG] (default tag latest) instead of the names the
        /// archive carries.
        #[arg(long, value_name = "NAME:TAG")]
        name: Option<String>,
        #[command(flatten)]
        state: StateDirArg,
    },
    /// List the images: name, digest, size of the erofs layers, creation time.
    Ls {
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Print an image's record as JSON: digest, names, config, layers and their files.
    Inspect {
        /// A name (busybox, busybox:1.36), a digest or a digest prefix.
        #[arg(value_name = "REF|DIGEST")]
        reference: String,
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Remove images (their records and all their names); their layers stay until
    /// `crib image prune`.
    Rm {
        #[arg(value_name = "REF|DIGEST", required = true)]
        references: Vec<String>,
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Delete the blobs and layer files no image uses.
    Prune {
        #[command(flatten)]
        state: StateDirArg,
    },
}

/// Runs an image command; returns the process exit code (0 success, 1 error). Errors are
/// printed to stderr with their causes.
pub fn run(command: ImageCommand) -> u8 {
    match run_command(command) {
        Ok(()) => 0,
        Err(e) => {
            report(&e);
            1
        }
    }
}

fn report(error: &dyn std::error::Error) {
    let mut line = format!("error: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    eprintln!("{line}");
}

fn run_command(command: ImageCommand) -> Result<(), StoreError> {
    let mut out = std::io::stdout().lock();
    match command {
        ImageCommand::Import { path, name, state } => {
            let store = state.open()?;
            let progress = progress::for_stderr();
            for record in store.import_path(&path, name.as_deref(), progress.as_ref())? {
                let _ = writeln!(out, "{}", record.digest);
            }
        }
        ImageCommand::Ls { state } => {
            let _ = write!(out, "{}", format_list(&state.open()?.list()?));
        }
        ImageCommand::Inspect { reference, state } => {
            let store = state.open()?;
            let value = inspect(&store, &reference)?;
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            );
        }
        ImageCommand::Rm { references, state } => {
            let store = state.open()?;
            for reference in references {
                let record = store.remove(&reference)?;
                let _ = writeln!(out, "removed {}", record.digest);
            }
        }
        ImageCommand::Prune { state } => {
            let stats = state.open()?.prune()?;
            let _ = writeln!(
                out,
                "pruned {} blobs and {} layers, {} freed",
                stats.blobs,
                stats.layers,
                human_size(stats.bytes)
            );
        }
    }
    Ok(())
}

/// The JSON `crib image inspect` prints.
pub fn inspect(store: &Store, reference: &str) -> Result<serde_json::Value, StoreError> {
    let record = store.record(reference)?;
    let resolved = store.resolve(reference)?;
    let layers: Vec<_> = record
        .layers
        .iter()
        .map(|l| {
            json!({
                "digest": l.digest,
                "mediaType": l.media_type,
                "size": l.size,
                "diffID": l.diff_id,
                "file": store.root().join(&l.erofs),
                "fileSize": l.erofs_size,
            })
        })
        .collect();
    Ok(json!({
        "digest": record.digest,
        "names": record.names,
        "created": record.created,
        "importedAt": record.imported_at,
        "configDigest": record.config_digest,
        "config": serde_json::to_value(&resolved.config).unwrap_or_default(),
        "layers": layers,
    }))
}

/// `1.2 MiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The table `crib image ls` prints: one row per name (`<none>` for an unnamed image).
pub fn format_list(records: &[ImageRecord]) -> String {
    let mut rows = vec![[
        "NAME".to_string(),
        "DIGEST".to_string(),
        "SIZE".to_string(),
        "CREATED".to_string(),
    ]];
    for record in records {
        let names = if record.names.is_empty() {
            vec!["<none>".to_string()]
        } else {
            record.names.clone()
        };
        for name in names {
            rows.push([
                name,
                record.digest.short().to_string(),
                human_size(record.size()),
                record.created.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
    }
    let widths: Vec<usize> = (0..4)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut text = String::new();
    for row in rows {
        let line = format!(
            "{:w0$}  {:w1$}  {:>w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_size_mebibytes_has_one_decimal() {
        assert_eq!(human_size(3 * 1024 * 1024 / 2), "1.5 MiB");
    }

    #[test]
    fn format_list_unnamed_image_shows_none() {
        let record = ImageRecord {
            digest: crate::Digest::of(b"m"),
            config_digest: crate::Digest::of(b"c"),
            layers: Vec::new(),
            names: Vec::new(),
            created: None,
            imported_at: 0,
        };

        let text = format_list(&[record]);

        assert!(text.lines().nth(1).unwrap().starts_with("<none>"));
    }
}
