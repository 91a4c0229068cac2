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
//!
//! In attach mode (`"network": {"attach": "eth0"}`, [`podnet::attach`]) the VM takes
//! over an interface of crib's network namespace; its keeper (`crib pod
//! net-attach-keeper`, in the same namespace) removes the tap and the tc redirect and
//! leaves the interface to CNI. A keeper killed too leaves them until the next run of
//! the pod in that namespace replaces them (or the namespace goes).

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use podnet::{AttachState, NetworkPlan, PodNetState};
use serde_json::{json, Value};

use crate::config::{NetConfig, VmConfig};
use crate::pod::{Launch, PodError, PreparedPod, SPEC_FILE};

/// A pod's built network and the keeper that removes it when crib ends.
#[derive(Debug)]
pub struct PodNetwork {
    pub state: NetworkState,
    /// Never waited for: its stdin closes when crib exits.
    _keeper: Child,
}

/// A pod's network as built, of either mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkState {
    /// A tap on crib's bridge, a lease, an nft chain.
    Bridge(PodNetState),
    /// An interface of crib's network namespace taken over through tc redirection.
    Attach(AttachState),
}

impl NetworkState {
    /// What `crib pod run` prints after `network: `.
    pub fn summary(&self) -> String {
        match self {
            Self::Bridge(s) => {
                let v6 = s.address6.map(|a| format!(" {a}")).unwrap_or_default();
                let ports: Vec<String> = s.ports.iter().map(ToString::to_string).collect();
                format!(
                    "{}{v6} on {} (tap {}, ports [{}])",
                    s.address,
                    s.bridge,
                    s.tap,
                    ports.join(", ")
                )
            }
            Self::Attach(s) => {
                let v6 = s.address6.map(|a| format!(" {a}")).unwrap_or_default();
                let gw = s
                    .gateway
                    .map(|g| format!(", gateway {g}"))
                    .unwrap_or_default();
                format!(
                    "{}{v6} attached to {} (tap {}, MAC {}, MTU {}{gw})",
                    s.address, s.attach, s.tap, s.mac, s.mtu
                )
            }
        }
    }
}

/// The guest eth0's addresses, routes and resolver, for the pod spec and the NIC.
struct GuestNetwork<'a> {
    address: (std::net::Ipv4Addr, u8),
    gateway: Option<std::net::Ipv4Addr>,
    address6: Option<(std::net::Ipv6Addr, u8)>,
    gateway6: Option<std::net::Ipv6Addr>,
    mtu: u16,
    nameservers: &'a [std::net::IpAddr],
    search: &'a [String],
}

impl GuestNetwork<'_> {
    /// The pod spec's `network` for cradle (guest/initramfs/src/podspec.rs `NetworkSpec`).
    fn to_spec(&self) -> Value {
        let mut net = json!({
            "address": format!("{}/{}", self.address.0, self.address.1),
            "mtu": self.mtu,
            "nameservers": self.nameservers.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            "search": self.search,
        });
        if let Some(gw) = self.gateway {
            net["gateway"] = json!(gw.to_string());
        }
        if let Some((a6, len)) = self.address6 {
            net["address6"] = json!(format!("{a6}/{len}"));
        }
        if let Some(gw6) = self.gateway6 {
            net["gateway6"] = json!(gw6.to_string());
        }
        net
    }

    /// The NIC's `addresses` (shown by `GET /api/v1/vm`).
    fn addresses(&self) -> Vec<String> {
        let v4 = format!("{}/{}", self.address.0, self.address.1);
        let v6 = self.address6.map(|(a, l)| format!("{a}/{l}"));
        std::iter::once(v4).chain(v6).collect()
    }
}

impl NetworkState {
    fn guest(&self) -> GuestNetwork<'_> {
        match self {
            Self::Bridge(s) => GuestNetwork {
                address: (s.address, s.prefix_len),
                gateway: Some(s.gateway),
                address6: s.address6.zip(s.prefix6_len),
                gateway6: s.gateway6,
                mtu: s.mtu,
                nameservers: &s.nameservers,
                search: &s.search,
            },
            Self::Attach(s) => GuestNetwork {
                address: (s.address, s.prefix_len),
                gateway: s.gateway,
                address6: s.address6.zip(s.prefix6_len),
                gateway6: s.gateway6,
                mtu: s.mtu,
                nameservers: &s.nameservers,
                search: &s.search,
            },
        }
    }

    fn tap(&self) -> &str {
        match self {
            Self::Bridge(s) => &s.tap,
            Self::Attach(s) => &s.tap,
        }
    }

    fn mac(&self) -> &str {
        match self {
            Self::Bridge(s) => &s.mac,
            Self::Attach(s) => &s.mac,
        }
    }

    /// `info.json`'s `network`: the lease, or the attached interface's identity.
    fn to_info(&self) -> Value {
        match self {
            Self::Bridge(s) => serde_json::to_value(s),
            Self::Attach(s) => serde_json::to_value(s),
        }
        .unwrap_or(Value::Null)
    }
}

/// The pod spec's `network` for cradle (guest/initramfs/src/podspec.rs `NetworkSpec`).
pub fn guest_network(state: &NetworkState) -> Value {
    state.guest().to_spec()
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
    let network_err = |source| PodError::Network {
        name: prepared.name.clone(),
        source,
    };
    let keeper_err = |source| PodError::WriteFile {
        path: PathBuf::from("crib pod net-keeper"),
        source,
    };
    let (state, keeper) = match plan {
        NetworkPlan::Bridge(plan) => {
            let net_dir = podnet::setup::net_dir();
            let root = net_dir.as_path(); // the IPAM's directory
            let state = podnet::setup::up(root, &prepared.name, &prepared.run_dir, plan)
                .map_err(network_err)?;
            let lease = podnet::setup::ipam(root).lease_path(&state);
            let keeper = spawn_keeper(&[lease.as_os_str(), root.as_os_str()], false, lock_fd)
                .map_err(|e| {
                    podnet::setup::down(root, &state);
                    keeper_err(e)
                })?;
            (NetworkState::Bridge(state), keeper)
        }
        NetworkPlan::Attach(plan) => {
            let state =
                podnet::attach::up(&prepared.name, &prepared.run_dir, plan).map_err(network_err)?;
            let args = [state.attach.as_ref(), state.tap.as_ref()];
            let keeper = spawn_keeper(&args, true, lock_fd).map_err(|e| {
                podnet::attach::down(&state.attach, &state.tap);
                keeper_err(e)
            })?;
            (NetworkState::Attach(state), keeper)
        }
    };
    // From here on the keeper undoes the network if crib fails: it ends with crib.
    prepared.config.net = vec![NetConfig {
        tap: Some(state.tap().to_string()),
        ifname: None,
        mac: Some(state.mac().to_string()),
        queues: 1,
        bandwidth: None,
        ops: None,
        addresses: state.guest().addresses(),
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
    prepared.add_to_info([
        ("network", state.to_info()),
        (
            "config",
            serde_json::to_value(&prepared.config).unwrap_or(Value::Null),
        ),
    ])?;
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
    let args = [lease.as_os_str(), net_dir.as_os_str()];
    let keeper = spawn_keeper(&args, false, lock.as_raw_fd()).map_err(|source| {
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

/// Spawns `crib pod net-keeper LEASE NET_DIR` (bridge mode) or `crib pod
/// net-attach-keeper INTERFACE TAP` (`attach`), holding `lock_fd`.
fn spawn_keeper(args: &[&OsStr], attach: bool, lock_fd: RawFd) -> std::io::Result<Child> {
    let exe = std::env::current_exe()?;
    let mut command = Command::new(exe);
    command
        .arg("pod")
        .arg(if attach {
            "net-attach-keeper"
        } else {
            "net-keeper"
        })
        .args(args)
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
    wait_for_crib();
    podnet::setup::down(root, &state);
    remove_vm_run_dir(&state);
    Ok(())
}

/// `crib pod net-attach-keeper INTERFACE TAP`: waits until standard input closes (crib
/// ended), then removes the tap and the tc redirect on the interface (in the network
/// namespace the keeper inherited from crib).
pub fn keep_attached(interface: &str, tap: &str) -> Result<(), PodError> {
    wait_for_crib();
    podnet::attach::down(interface, tap);
    Ok(())
}

/// Returns once standard input, a pipe from crib, reaches its end: crib has exited.
fn wait_for_crib() {
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
        spec["network"] = guest_network(&NetworkState::Bridge(state()));
        let spec = PodSpec::from_json(spec.to_string().as_bytes()).unwrap();
        let net = spec.network.unwrap();
        assert_eq!(net.address, "10.88.0.2/16");
        assert_eq!(net.address6.as_deref(), Some("fd63:7269:6200::2/64"));
        assert_eq!(net.gateway6.as_deref(), Some("fd63:7269:6200::1"));
        assert_eq!((net.mtu, net.nameservers.len()), (Some(1400), 1));
    }

    fn attached() -> AttachState {
        AttachState {
            pod: "web".into(),
            run_dir: "/run/crib/web".into(),
            attach: "eth0".into(),
            tap: "crib00000001".into(),
            mac: "0a:58:0a:63:00:02".into(),
            mtu: 1450,
            address: "10.99.0.2".parse().unwrap(),
            prefix_len: 24,
            gateway: None,
            address6: None,
            prefix6_len: None,
            gateway6: None,
            nameservers: vec![],
            search: vec!["svc.cluster.local".into()],
        }
    }

    #[test]
    fn attached_guest_network_is_the_interfaces_without_a_missing_gateway() {
        let state = NetworkState::Attach(attached());
        let mut spec = json!({"name": "web"});
        spec["network"] = guest_network(&state);
        let net = PodSpec::from_json(spec.to_string().as_bytes())
            .unwrap()
            .network
            .unwrap();
        assert_eq!((net.address.as_str(), net.gateway), ("10.99.0.2/24", None));
        assert_eq!((net.mtu, net.search.len()), (Some(1450), 1));
        assert_eq!(state.guest().addresses(), vec!["10.99.0.2/24".to_string()]);
    }

    #[test]
    fn attached_info_has_the_addresses_pod_ls_reads() {
        let mut state = attached();
        state.address6 = Some("fd00:99::2".parse().unwrap());
        state.prefix6_len = Some(64);
        let info = NetworkState::Attach(state).to_info();
        assert_eq!(info["address"], "10.99.0.2");
        assert_eq!(info["address6"], "fd00:99::2");
        assert_eq!(info["attach"], "eth0");
    }
}
