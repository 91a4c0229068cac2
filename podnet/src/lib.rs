//! The host side of pod networking (docs/NETWORK.md): each pod's tap joins a Linux
//! bridge that has the gateway addresses; an IPAM leases each pod its addresses under
//! the run root; nftables table `inet crib` masquerades the pods' IPv4 egress and
//! publishes their ports, each pod's rules in a chain of its own.
//!
//! [`setup::up`] builds a pod's network in one go (undone if any step fails),
//! [`setup::down`] removes it, and both sweep what pods killed with `kill -9` left.
//!
//! Attach mode ([`attach`]) instead gives the VM the identity of an interface that is
//! already in crib's network namespace (CNI's eth0 under Kubernetes) through tc
//! redirection: no bridge, lease or nft there.

pub mod attach;
pub mod cidr;
pub mod config;
pub mod dhcp;
pub mod ident;
pub mod ipam;
pub mod link;
pub mod nft;
pub mod ports;
pub mod setup;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use attach::AttachState;
pub use config::{AttachPlan, NetPlan, NetworkPlan};
pub use ports::{PortMap, Protocol};

/// Errors of pod networking, each naming the field or object and the fix.
#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    #[error("{field}: {value:?} is not valid: {fix}")]
    Field {
        field: String,
        value: String,
        fix: String,
    },
    #[error("field network is invalid")]
    Json {
        #[source]
        source: serde_json::Error,
    },
    #[error("network.ports: host port {port} is already published by pod {pod}: pick another host port or stop pod {pod}")]
    PortTaken { port: String, pod: String },
    #[error("network.address: {address} is already leased to pod {pod}: pick another address or remove it to get a free one")]
    AddressTaken { address: String, pod: String },
    #[error(
        "network.subnet {subnet} has no free address left: stop a pod or give a larger subnet"
    )]
    SubnetFull { subnet: String },
    #[error("network.bridge: {name} exists but is not a bridge: name another bridge (crib creates it) or remove the interface {name}")]
    NotABridge { name: String },
    #[error("network.bridge: bridge {bridge} has {found} but the launch file's network.subnet wants {wanted}: use the bridge's subnet or another bridge name")]
    BridgeSubnet {
        bridge: String,
        found: String,
        wanted: String,
    },
    #[error("cannot use the address leases in {path}: pod networking needs root (or set $CRIB_NET_DIR to a directory you can write, with CAP_NET_ADMIN), or set \"network\": \"none\" in the launch file")]
    Lease {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run `{command}`: install it (scripts/install-deps.sh) and run crib as root or with CAP_NET_ADMIN")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{field} cannot be combined with network.attach: an attached pod takes the interface's addresses, MTU and routes as CNI set them, and has no bridge, lease or published ports; remove {field}")]
    AttachConflict { field: String },
    #[error("network.attach: there is no interface {interface} in crib's network namespace: run crib in the namespace that holds it (`ip netns exec NS crib pod run ...`) or name another interface")]
    AttachMissing { interface: String },
    #[error("network.attach: {interface} is a {link_type} interface, not an Ethernet one: name the veth CNI made, like eth0")]
    AttachNotEthernet {
        interface: String,
        link_type: String,
    },
    #[error("network.attach: {interface} has no IPv4 address: let CNI configure it before the pod starts (the VM takes the address the interface has); see `ip addr show dev {interface}`")]
    AttachNoIpv4 { interface: String },
    #[error("network.attach: {interface} has MTU {mtu}, outside the {min} to {max} pods support: set the CNI network's mtu within it")]
    AttachMtu {
        interface: String,
        mtu: u64,
        min: u16,
        max: u16,
    },
    #[error("network.attach: {interface} already has tc ingress filters that crib did not add ({found}): remove them (`tc qdisc del dev {interface} ingress`) or attach another interface")]
    AttachForeignFilters { interface: String, found: String },
    #[error("cannot understand the output of `{command}`: {problem}")]
    ToolOutput { command: String, problem: String },
    #[error("cannot write {path}: crib needs root or CAP_NET_ADMIN for pod networking, or set \"network\": \"none\"")]
    Sysctl {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A pod's network as built: its lease file holds this, and it is all
/// [`setup::down`] needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodNetState {
    pub pod: String,
    /// The run directory whose `lock` the pod's crib holds while it runs.
    pub run_dir: PathBuf,
    pub bridge: String,
    pub tap: String,
    pub chain: String,
    pub mac: String,
    pub mtu: u16,
    pub subnet: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet6: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<Ipv6Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix6_len: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<Ipv6Addr>,
    #[serde(default)]
    pub ports: Vec<PortMap>,
    #[serde(default)]
    pub nameservers: Vec<IpAddr>,
    #[serde(default)]
    pub search: Vec<String>,
    /// A marketplace VM's lease: its address is served over DHCP ([`dhcp`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dhcp: bool,
}
