//! `crib image pull REF [--insecure] [--platform OS/ARCH]`: the arguments and what the
//! command prints. Wired into the store's `ImageCommand`.

use clap::Args;

use super::{manifest::Platform, pull, PullError, PullOptions, DEFAULT_CONCURRENT_DOWNLOADS};
use crate::Store;

/// `crib image pull`.
#[derive(Debug, Clone, Args)]
pub struct PullArgs {
    /// The image: [REGISTRY/]NAME[:TAG|@sha256:DIGEST]; Docker Hub and `library/` by default.
    pub reference: String,
    /// Plain HTTP to a registry that is not on loopback (loopback always gets HTTP).
    #[arg(long)]
    pub insecure: bool,
    /// The platform an image index (manifest list) resolves to.
    #[arg(long, default_value = "linux/amd64")]
    pub platform: Platform,
    /// Layers downloaded at once.
    #[arg(long, default_value_t = DEFAULT_CONCURRENT_DOWNLOADS)]
    pub concurrent_downloads: usize,
}

/// Runs `crib image pull` against `store`: progress on stderr (per layer on a terminal,
/// plain lines otherwise), the image's name and digest on stdout.
pub fn run(store: &Store, args: &PullArgs) -> Result<(), PullError> {
    let options = PullOptions {
        insecure: args.insecure,
        platform: args.platform.clone(),
        concurrent_downloads: args.concurrent_downloads,
        docker_config: None,
    };
    let progress = crate::progress::for_stderr();
    let pulled = pull(store, &args.reference, &options, progress.as_ref())?;
    let name = pulled.record.names.first().map(String::as_str);
    println!(
        "{} {}",
        name.unwrap_or(&args.reference),
        pulled.manifest_digest
    );
    Ok(())
}
