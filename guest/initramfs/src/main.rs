//! `crib-initramfs`: writes crib's guest initramfs (see the library docs).
//!
//! ```text
//! crib-initramfs --cradle PATH [--kernel DIR [--modules a,b,c]] [--busybox PATH]
//!                [--mkfs PATH]... [--add SRC:DST]... --output FILE
//! ```
//! The file is replaced atomically, and left untouched (mtime included) when
//! the new image is byte-identical, so a rerun with nothing changed is cheap
//! for whatever watches it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use initramfs::{write_image, ExtraFile, ImageSpec, KernelDir, DEFAULT_MODULES};

/// Build crib's guest initramfs (uncompressed newc cpio).
#[derive(Debug, Parser)]
#[command(name = "crib-initramfs", version)]
struct Args {
    /// The static cradle binary, installed as /init.
    #[arg(long, value_name = "PATH")]
    cradle: PathBuf,
    /// Output directory of guest/kernel/fetch-debian-kernel.sh (has VERSION
    /// and root/lib/modules/<VERSION>). Leave it out for a kernel with
    /// everything built in (guest/kernel/build-pod-kernel.sh): no modules.
    #[arg(long, value_name = "DIR")]
    kernel: Option<PathBuf>,
    /// Kernel modules to ship, with their dependencies ('-' or '_'; empty for
    /// none). Default: virtio_pci, virtio_blk, virtio_net,
    /// vmw_vsock_virtio_transport, virtiofs, overlay, pvpanic_mmio, virtio_rng.
    #[arg(long, value_name = "a,b,c", value_delimiter = ',')]
    modules: Option<Vec<String>>,
    /// A static busybox, installed as /bin/busybox with a symlink per applet.
    #[arg(long, value_name = "PATH")]
    busybox: Option<PathBuf>,
    /// A mkfs.<fs> tool (like /usr/sbin/mkfs.ext4) for cradle to format
    /// blank volumes, installed as /sbin/mkfs.<fs> with the shared libraries
    /// and ELF interpreter ldd finds for it (repeatable).
    #[arg(long, value_name = "PATH")]
    mkfs: Vec<PathBuf>,
    /// Copy a host file into the image (repeatable).
    #[arg(long = "add", value_name = "SRC:DST")]
    add: Vec<ExtraFile>,
    /// Where to write the archive.
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The cause chain, once, on one line.
            let _ = writeln!(std::io::stderr(), "crib-initramfs: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let kernel = args.kernel.as_deref().map(KernelDir::open).transpose()?;
    let modules = match (args.modules, &kernel) {
        (Some(names), _) => names.into_iter().filter(|n| !n.trim().is_empty()).collect(),
        (None, Some(_)) => DEFAULT_MODULES.iter().map(|m| (*m).to_owned()).collect(),
        (None, None) => Vec::new(),
    };
    let spec = ImageSpec {
        init: args.cradle,
        kernel,
        modules,
        busybox: args.busybox,
        mkfs: args.mkfs,
        extra: args.add,
    };

    let temp = temp_path(&args.output);
    let result = write_to(&spec, &temp, &args.output).and_then(|summary| {
        let unchanged = same_content(&temp, &args.output);
        if unchanged {
            std::fs::remove_file(&temp)
                .with_context(|| format!("cannot remove {}", temp.display()))?;
        } else {
            std::fs::rename(&temp, &args.output).with_context(|| {
                format!(
                    "cannot move {} to {}",
                    temp.display(),
                    args.output.display()
                )
            })?;
        }
        Ok((summary, unchanged))
    });
    let (summary, unchanged) = match result {
        Ok(done) => done,
        Err(error) => {
            let _ = std::fs::remove_file(&temp);
            return Err(error);
        }
    };

    let names: Vec<String> = summary.modules.entries.iter().map(|e| e.name()).collect();
    // Progress goes to stderr; a closed stderr is not worth failing for.
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(
        stderr,
        "crib-initramfs: {} {} ({summary})",
        if unchanged { "unchanged" } else { "wrote" },
        args.output.display()
    );
    let _ = writeln!(stderr, "crib-initramfs: modules: {}", names.join(" "));
    Ok(())
}

/// Writes the image to `path` (a temporary name for `output`), returning
/// its summary.
fn write_to(spec: &ImageSpec, path: &Path, output: &Path) -> Result<initramfs::ImageSummary> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let (mut out, summary) = write_image(spec, BufWriter::new(file))
        .with_context(|| format!("cannot build {}", output.display()))?;
    out.flush()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(summary)
}

/// `dir/.name.tmp.<pid>`: same filesystem, so the rename is atomic.
fn temp_path(output: &Path) -> PathBuf {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "initramfs".to_owned());
    output.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

/// Whether both files exist with the same bytes.
fn same_content(a: &Path, b: &Path) -> bool {
    match (std::fs::read(a), std::fs::read(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
