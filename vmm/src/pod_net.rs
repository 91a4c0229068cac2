//! `crib pod run`'s network (docs/NETWORK.md): builds it with [`podnet`] once the run
//! directory is locked, hands the VM the tap and the MAC and cradle the addresses (the
//! spec's `network`), and leaves the teardown to a keeper process.
//!
//! Once the VM runs, crib's seccomp filter allows no `fork`/`exec`, so crib cannot run
//! `ip` and `nft` when the pod ends. The keeper (`crib pod net-keeper`, spawned before
//! the VM starts, in a process group of its own) waits for its standard input, a pipe
//! from crib, to close: that happens however crib ends, `kill -9` included. It then
//! removes the pod's chain, tap and lease. It holds the run directory's lock meanwhile
//! (it inherits the descriptor), so the pod cannot start again half torn down; if the
//! keeper dies too, the next `crib pod run` on the host sweeps the lease.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use podnet::PodNetState;
use serde_json::{json, Value};

use crate::config::{NetConfig, VmConfig};
use crate::pod::{Launch, PodError, PreparedPod, INFO_FILE, SPEC_FILE};

/// A pod's built network and the keeper that removes it when crib ends.
#[derive(Debug)]
pub struct PodNetwork {
    pub state: PodNetState,
    /// Never waited for: its stdin closes when crib exits.
    _keeper: Child,
}

/// The pod spec's `network` for cradle (guest/initramfs/src/podspec.rs `NetworkSpec`).
pub fn guest_network(state: &PodNetState) -> Value {
    let mut net = json!({
        "address": format!("{}/{}", state.address, state.prefix_len),
        "gateway": state.gateway.to_string(),
        "mtu": state.mtu,
        "nameservers": state.nameservers.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        "search": state.search,
    });
    if let (Some(a6), Some(len)) = (state.address6, state.prefix6_len) {
        net["address6"] = json!(format!("{a6}/{len}"));
    }
    if let Some(gw6) = state.gateway6 {
        net["gateway6"] = json!(gw6.to_string());
    }
    net
}

/// Builds the pod's network if its launch file wants one: the VM gets the tap, the
/// spec and `info.json` the addresses. `lock_fd` is the run directory's lock, which the
/// keeper inherits.
pub fn attach(
    prepared: &mut PreparedPod,
    launch: &Launch,
    lock_fd: RawFd,
) -> Result<Option<PodNetwork>, PodError> {
    let Some(plan) = &launch.network else {
        return Ok(None);
    };
    let net_dir = podnet::setup::net_dir();
    let root = net_dir.as_path(); // the IPAM's directory
    let state =
        podnet::setup::up(root, &prepared.name, &prepared.run_dir, plan).map_err(|source| {
            PodError::Network {
                name: prepared.name.clone(),
                source,
            }
        })?;
    let undo = |e: PodError| {
        podnet::setup::down(root, &state);
        e
    };
    let keeper = spawn_keeper(root, &podnet::setup::ipam(root).lease_path(&state), lock_fd)
        .map_err(|source| {
            undo(PodError::WriteFile {
                path: PathBuf::from("crib pod net-keeper"),
                source,
            })
        })?;
    prepared.config.net = vec![NetConfig {
        tap: Some(state.tap.clone()),
        ifname: None,
        mac: Some(state.mac.clone()),
        queues: 1,
        bandwidth: None,
        ops: None,
        addresses: [
            Some(format!("{}/{}", state.address, state.prefix_len)),
            state
                .address6
                .zip(state.prefix6_len)
                .map(|(a, l)| format!("{a}/{l}")),
        ]
        .into_iter()
        .flatten()
        .collect(),
        pod: None,
    }];
    let write = |path: PathBuf, value: &Value| {
        std::fs::write(&path, format!("{value:#}\n"))
            .map_err(|source| PodError::WriteFile { path, source })
    };
    // The spec as create_run_dir wrote it (with the images' `resolved` section), plus eth0.
    let spec_path = prepared.run_dir.join(SPEC_FILE);
    let mut spec: Value = std::fs::read(&spec_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| launch.spec_json.clone());
    spec["network"] = guest_network(&state);
    write(spec_path, &spec)?;
    let info_path = prepared.run_dir.join(INFO_FILE);
    let mut info: Value = std::fs::read(&info_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| json!({}));
    info["network"] = serde_json::to_value(&state).unwrap_or(Value::Null);
    info["config"] = serde_json::to_value(&prepared.config).unwrap_or(Value::Null);
    write(info_path, &info)?;
    Ok(Some(PodNetwork {
        state,
        _keeper: keeper,
    }))
}

/// Errors of `crib run --net pod`, each with its fix.
#[derive(Debug, thiserror::Error)]
pub enum VmNetError {
    #[error("--net pod: a VM with --id {id} is already on the pod network ({path} is locked): give this VM another --id")]
    Busy { id: String, path: PathBuf },
    #[error("--net pod: cannot create {path}: run crib as root, or set $CRIB_NET_DIR to a directory you can write (with CAP_NET_ADMIN)")]
    RunDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--net pod: cannot put VM {id} on the pod network")]
    Network {
        id: String,
        #[source]
        source: podnet::PodNetError,
    },
    #[error("--net pod: cannot start `crib pod net-keeper`, which removes the VM's network when crib ends")]
    Keeper {
        #[source]
        source: std::io::Error,
    },
}

/// A VM's network on the pod bridge: held until crib exits, when the keeper removes it.
#[derive(Debug)]
pub struct VmNetwork {
    pub state: PodNetState,
    /// Never waited for: its stdin closes when crib exits.
    _keeper: Child,
    /// The run directory's lock: while crib holds it, no sweep takes the lease.
    _lock: File,
}

/// Where VM `id`'s network is recorded as owned: a directory in the IPAM's directory
/// whose `lock` crib holds (its hash names the tap, the MAC and the nft chain, so they
/// are stable for an id).
pub fn vm_run_dir(net_dir: &Path, id: &str) -> PathBuf {
    net_dir.join(format!("vm-{id}"))
}

/// Puts the VM's `--net pod` device (at most one, checked by the config) on the pod
/// network: lease, tap on the bridge, nft chain, DHCP entry, keeper. The device gets
/// the tap, the MAC and the address (shown by `GET /api/v1/vm`).
pub fn attach_vm(config: &mut VmConfig) -> Result<Option<VmNetwork>, VmNetError> {
    let id = config.effective_id();
    let Some(net) = config.net.iter_mut().find(|n| n.pod.is_some()) else {
        return Ok(None);
    };
    let request = net.pod.clone().unwrap_or_default();
    let network_err = |source| VmNetError::Network {
        id: id.clone(),
        source,
    };
    let plan = request.plan().map_err(network_err)?;
    let net_dir = podnet::setup::net_dir();
    let run_dir = vm_run_dir(&net_dir, &id);
    let dir_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| VmNetError::RunDir { path, source }
    };
    std::fs::create_dir_all(&run_dir).map_err(dir_err(&run_dir))?;
    let lock_path = run_dir.join(podnet::setup::OWNER_LOCK_FILE);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(dir_err(&lock_path))?;
    // SAFETY: flock on a descriptor owned by `lock`; no memory is passed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(VmNetError::Busy {
            id,
            path: lock_path,
        });
    }
    let state = podnet::setup::up(&net_dir, &id, &run_dir, &plan).map_err(|e| {
        // Nothing was built (up undoes its steps): the directory goes too.
        let _ = std::fs::remove_file(&lock_path);
        let _ = std::fs::remove_dir(&run_dir);
        network_err(e)
    })?;
    let lease = podnet::setup::ipam(&net_dir).lease_path(&state);
    let keeper = spawn_keeper(&net_dir, &lease, lock.as_raw_fd()).map_err(|source| {
        podnet::setup::down(&net_dir, &state);
        remove_vm_run_dir(&state);
        VmNetError::Keeper { source }
    })?;
    net.pod = None;
    net.tap = Some(state.tap.clone());
    net.mac = Some(state.mac.clone());
    net.addresses = vec![format!("{}/{}", state.address, state.prefix_len)];
    Ok(Some(VmNetwork {
        state,
        _keeper: keeper,
        _lock: lock,
    }))
}

/// Removes a VM's run directory (only a VM's: a pod's belongs to its run root).
fn remove_vm_run_dir(state: &PodNetState) {
    if state.dhcp {
        let _ = std::fs::remove_file(state.run_dir.join(podnet::setup::OWNER_LOCK_FILE));
        let _ = std::fs::remove_dir(&state.run_dir);
    }
}

fn spawn_keeper(root: &Path, lease: &Path, lock_fd: RawFd) -> std::io::Result<Child> {
    let exe = std::env::current_exe()?;
    let mut command = Command::new(exe);
    command
        .arg("pod")
        .arg("net-keeper")
        .arg(lease)
        .arg(root)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .process_group(0);
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // fcntl, which is async-signal-safe; it clears FD_CLOEXEC on the run directory's
    // lock so the keeper holds the lock until it has torn the network down.
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(lock_fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn()
}

/// `crib pod net-keeper LEASE NET_DIR`: waits until standard input closes (crib ended), then
/// removes the network of the lease.
pub fn keep(root: &Path, lease: &Path) -> Result<(), PodError> {
    let read_err = |source| PodError::ReadFile {
        path: lease.to_path_buf(),
        source,
    };
    let bytes = std::fs::read(lease).map_err(read_err)?;
    let state: PodNetState = serde_json::from_slice(&bytes).map_err(|source| PodError::Json {
        path: lease.to_path_buf(),
        field: String::new(),
        source,
    })?;
    let mut sink = [0u8; 64];
    let mut stdin = std::io::stdin().lock();
    loop {
        match stdin.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    podnet::setup::down(root, &state);
    remove_vm_run_dir(&state);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use initramfs::podspec::PodSpec;

    fn state() -> PodNetState {
        PodNetState {
            pod: "web".into(),
            run_dir: "/run/crib/web".into(),
            bridge: "crib0".into(),
            tap: "crib00000001".into(),
            chain: "pod-web-00000001".into(),
            mac: "02:00:00:00:00:01".into(),
            mtu: 1400,
            subnet: "10.88.0.0/16".into(),
            address: "10.88.0.2".parse().unwrap(),
            prefix_len: 16,
            gateway: "10.88.0.1".parse().unwrap(),
            subnet6: Some("fd63:7269:6200::/64".into()),
            address6: Some("fd63:7269:6200::2".parse().unwrap()),
            prefix6_len: Some(64),
            gateway6: Some("fd63:7269:6200::1".parse().unwrap()),
            ports: vec![],
            nameservers: vec!["192.0.2.53".parse().unwrap()],
            search: vec![],
            dhcp: false,
        }
    }

    #[test]
    fn guest_network_is_a_valid_spec_network() {
        let mut spec = json!({"name": "web"});
        spec["network"] = guest_network(&state());
        let spec = PodSpec::from_json(spec.to_string().as_bytes()).unwrap();
        let net = spec.network.unwrap();
        assert_eq!(net.address, "10.88.0.2/16");
        assert_eq!(net.address6.as_deref(), Some("fd63:7269:6200::2/64"));
        assert_eq!(net.gateway6.as_deref(), Some("fd63:7269:6200::1"));
        assert_eq!((net.mtu, net.nameservers.len()), (Some(1400), 1));
    }
}
