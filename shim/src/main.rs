//! `containerd-shim-crib-v2`: containerd's runtime v2 shim for crib (docs/SHIM.md).
//! containerd runs it as `io.containerd.crib.v2`; each container gets a crib VM of its
//! own, whose guest init (cradle) runs the container's process chrooted into the rootfs
//! containerd prepared, shared over virtio-fs.

use crib_shim::service;

/// The runtime's name as containerd knows it.
const RUNTIME_ID: &str = "io.containerd.crib.v2";

fn main() {
    // The shim waits for its crib child itself: no library reaper taking that exit
    // (waitpid(-1) on SIGCHLD), and no subreaper adopting crib's orphans.
    let config = containerd_shim::Config {
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<service::Service>(RUNTIME_ID, Some(config));
}
