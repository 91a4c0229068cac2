//! A pod's network, built and removed as a whole: lease, bridge, tap, nft chain.
//! Whatever step fails, what came before is undone. Before leasing, every lease whose
//! pod is gone (its run directory's lock is free: `crib pod run` and its network
//! keeper were killed) is torn down, so `kill -9` leaves nothing behind for long.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::config::host_nameservers;
use crate::ipam::{Ipam, IpamLock};
use crate::{dhcp, link, nft, NetPlan, PodNetError, PodNetState};

/// Overrides the IPAM's directory.
pub const NET_DIR_ENV: &str = "CRIB_NET_DIR";
/// The IPAM's directory: one per host, whatever the run root, as the bridge and the
/// nft table are (pod names never start with a dot).
pub const DEFAULT_NET_DIR: &str = "/run/crib/.net";
/// The lock file in a pod's run directory that its `crib pod run` holds (vmm's
/// `pod::LOCK_FILE`).
pub const OWNER_LOCK_FILE: &str = "lock";
/// Where the host's nameservers are read.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The IPAM's directory: `$CRIB_NET_DIR`, else [`DEFAULT_NET_DIR`].
pub fn net_dir() -> PathBuf {
    std::env::var_os(NET_DIR_ENV)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_NET_DIR))
}

/// The IPAM kept in `net_dir`.
pub fn ipam(net_dir: &Path) -> Ipam {
    Ipam::new(net_dir)
}

/// Builds pod `pod`'s network: leases its addresses, makes sure the bridge and the
/// table exist, creates its tap and its nft chain. Everything is undone on error.
pub fn up(
    net_dir: &Path,
    pod: &str,
    run_dir: &Path,
    plan: &NetPlan,
) -> Result<PodNetState, PodNetError> {
    link::check_bridge(&plan.bridge)?;
    let ipam = ipam(net_dir);
    let lock = ipam.lock()?;
    let nameservers = match &plan.dns {
        Some(list) => list.clone(),
        None => std::fs::read_to_string(RESOLV_CONF)
            .map(|text| host_nameservers(&text))
            .unwrap_or_default(),
    };
    let state = ipam.allocate(&lock, plan, pod, run_dir, nameservers, &mut |lease| {
        reclaim(&lock, net_dir, lease, Some(run_dir))
    })?;
    let built = link::ensure_bridge(&state)
        .and_then(|()| nft::ensure_table())
        .and_then(|()| link::create_tap(&state))
        .and_then(|()| nft::run(&["-f", "-"], Some(&nft::pod_up_script(&state))).map(drop))
        .and_then(|()| {
            if state.dhcp {
                dhcp::add(&lock, net_dir, &state)
            } else {
                Ok(())
            }
        });
    if let Err(e) = built {
        teardown(&lock, net_dir, &state);
        ipam.release(&state);
        return Err(e);
    }
    drop(lock);
    Ok(state)
}

/// Removes pod `state`'s network: chain and map elements, tap, DHCP entry, lease.
pub fn down(net_dir: &Path, state: &PodNetState) {
    let ipam = ipam(net_dir);
    match ipam.lock() {
        Ok(lock) => teardown(&lock, net_dir, state),
        Err(e) => {
            tracing::warn!("pod {}: {e}; removing its network anyway", state.pod);
            teardown_links(state);
        }
    }
    ipam.release(state);
}

/// Removes the chain, the tap and the DHCP entry; missing ones are fine.
fn teardown(lock: &IpamLock, net_dir: &Path, state: &PodNetState) {
    teardown_links(state);
    if state.dhcp {
        dhcp::remove(lock, net_dir, state);
        remove_vm_dir(net_dir, state);
    }
}

/// A VM's (`crib run --net pod`) run directory is `<net dir>/vm-<id>`, holding only its
/// owner lock: it goes with the network, also when the sweep tears down after a crib and
/// its keeper were both killed. Never anything outside the IPAM's directory.
fn remove_vm_dir(net_dir: &Path, state: &PodNetState) {
    let is_vm_dir = state.run_dir.parent() == Some(net_dir)
        && state
            .run_dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("vm-"));
    if is_vm_dir {
        let _ = std::fs::remove_file(state.run_dir.join(OWNER_LOCK_FILE));
        // Only if empty: whatever else is there was not put there by crib.
        let _ = std::fs::remove_dir(&state.run_dir);
    }
}

/// Removes the chain and the tap.
fn teardown_links(state: &PodNetState) {
    if nft::chain_exists(&state.chain) {
        if let Err(e) = nft::run(&["-f", "-"], Some(&nft::pod_down_script(state))) {
            tracing::warn!("pod {}: cannot remove its nft rules: {e}", state.pod);
        }
    }
    link::delete(&state.tap);
}

/// Tears down every stale lease in `root`, the IPAM's directory (see [`up`]); returns
/// the pods swept.
pub fn sweep(net_dir: &Path) -> Result<Vec<String>, PodNetError> {
    let ipam = ipam(net_dir);
    let lock = ipam.lock()?;
    let mut swept = Vec::new();
    for lease in ipam.leases(&lock)? {
        if reclaim(&lock, net_dir, &lease, None) {
            ipam.release(&lease);
            swept.push(lease.pod);
        }
    }
    Ok(swept)
}

/// Whether `lease` is stale, tearing its network down if so: its pod is `own_run_dir`
/// (whose lock the caller holds, so its last run is over), its run directory is gone,
/// or nobody holds the run directory's lock.
fn reclaim(
    lock: &IpamLock,
    net_dir: &Path,
    lease: &PodNetState,
    own_run_dir: Option<&Path>,
) -> bool {
    if own_run_dir == Some(lease.run_dir.as_path()) {
        teardown(lock, net_dir, lease);
        return true;
    }
    let lock_path: PathBuf = lease.run_dir.join(OWNER_LOCK_FILE);
    let Ok(file) = File::open(&lock_path) else {
        teardown(lock, net_dir, lease);
        return true;
    };
    // SAFETY: flock on a descriptor owned by `file`; no memory is passed.
    let free = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if free {
        tracing::info!("pod {}: removing the network its dead crib left", lease.pod);
        // Still holding the owner's lock: its pod cannot start meanwhile.
        teardown(lock, net_dir, lease);
    }
    free
}
