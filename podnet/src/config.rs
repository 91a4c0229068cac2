//! The launch file's `network` field (docs/POD_SPEC.md, "Network"): `"none"`, or an
//! object whose every key has a default (bridge mode), or `{"attach": "eth0"}` (attach
//! mode, docs/NETWORK.md). [`NetworkPlan::from_json`] checks it all before anything on
//! the host is touched.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Deserialize;
use serde_json::Value;

use crate::cidr::{Cidr4, Cidr6};
use crate::ports::PortMap;
use crate::PodNetError;

/// The bridge pods join unless the launch file names another.
pub const DEFAULT_BRIDGE: &str = "crib0";
/// The pods' IPv4 subnet; the bridge has its first address.
pub const DEFAULT_SUBNET: &str = "10.88.0.0/16";
/// The pods' IPv6 ULA prefix ("crib" in its global ID); the bridge has `::1`.
pub const DEFAULT_SUBNET6: &str = "fd63:7269:6200::/64";
/// The pod's MTU unless given.
pub const DEFAULT_MTU: u16 = 1500;
/// Smallest MTU: IPv6 needs 1280.
pub const MIN_MTU: u16 = 1280;
/// Largest MTU: a jumbo frame.
pub const MAX_MTU: u16 = 9000;

/// The launch file's `network` object as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkField {
    bridge: Option<String>,
    subnet: Option<String>,
    /// `null`: no IPv6.
    #[serde(default = "default_subnet6")]
    subnet6: Option<String>,
    address: Option<String>,
    address6: Option<String>,
    #[serde(default)]
    ports: Vec<String>,
    mtu: Option<u16>,
    dns: Option<Vec<String>>,
    #[serde(default)]
    search: Vec<String>,
}

fn default_subnet6() -> Option<String> {
    Some(DEFAULT_SUBNET6.to_string())
}

/// A checked `network`: what [`crate::setup::up`] builds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetPlan {
    pub bridge: String,
    pub subnet: Cidr4,
    pub subnet6: Option<Cidr6>,
    /// A static address, else one is leased.
    pub address: Option<Ipv4Addr>,
    pub address6: Option<Ipv6Addr>,
    pub ports: Vec<PortMap>,
    pub mtu: u16,
    /// `None`: the host's nameservers that a pod can reach.
    pub dns: Option<Vec<IpAddr>>,
    pub search: Vec<String>,
    /// Serve the address over DHCP on the bridge ([`crate::dhcp`]): a marketplace VM
    /// configures itself, where cradle is told its address. Never from a launch file.
    pub dhcp: bool,
}

/// The launch file's `network` as checked: what kind of network the pod gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkPlan {
    /// A tap on crib's bridge with leased addresses ([`crate::setup::up`]).
    Bridge(NetPlan),
    /// The identity of an interface that is already in crib's network namespace
    /// (CNI's eth0), taken over through tc redirection ([`crate::attach::up`]).
    Attach(AttachPlan),
}

/// `{"attach": "eth0", "dns": [...], "search": [...]}`: the VM takes over interface
/// `interface` (its MAC, MTU, addresses and default routes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachPlan {
    pub interface: String,
    /// `None`: the nameservers of crib's resolv.conf that a pod can reach.
    pub dns: Option<Vec<IpAddr>>,
    pub search: Vec<String>,
}

/// The launch file's `network` object in attach mode as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachField {
    attach: String,
    dns: Option<Vec<String>>,
    #[serde(default)]
    search: Vec<String>,
}

/// The keys of bridge mode, which attach mode takes from the interface or has no use for.
const BRIDGE_ONLY_FIELDS: [&str; 7] = [
    "bridge", "subnet", "subnet6", "address", "address6", "ports", "mtu",
];

impl NetworkPlan {
    /// `None` for `"none"`; attach mode for an object with `attach`; bridge mode
    /// otherwise ([`NetPlan::from_json`]).
    pub fn from_json(value: Option<&Value>) -> Result<Option<Self>, PodNetError> {
        match value {
            Some(Value::Object(map)) if map.contains_key("attach") => {
                AttachPlan::from_object(map).map(|p| Some(Self::Attach(p)))
            }
            _ => Ok(NetPlan::from_json(value)?.map(Self::Bridge)),
        }
    }
}

impl AttachPlan {
    fn from_object(map: &serde_json::Map<String, Value>) -> Result<Self, PodNetError> {
        if let Some(name) = BRIDGE_ONLY_FIELDS.iter().find(|k| map.contains_key(**k)) {
            return Err(PodNetError::AttachConflict {
                field: format!("network.{name}"),
            });
        }
        let written: AttachField = serde_json::from_value(Value::Object(map.clone()))
            .map_err(|e| PodNetError::Json { source: e })?;
        if !valid_ifname(&written.attach) {
            return Err(field(
                "attach",
                &written.attach,
                "name the interface CNI made in crib's network namespace, like \"eth0\" (1 to 15 characters without '/', ':' or spaces)",
            ));
        }
        Ok(Self {
            interface: written.attach,
            dns: written.dns.as_deref().map(parse_dns).transpose()?,
            search: check_search(written.search)?,
        })
    }
}

/// The `dns` list: nameservers' IP addresses.
fn parse_dns(list: &[String]) -> Result<Vec<IpAddr>, PodNetError> {
    list.iter()
        .enumerate()
        .map(|(i, text)| {
            text.parse::<IpAddr>().map_err(|_| {
                field(
                    &format!("dns[{i}]"),
                    text,
                    "write a nameserver's IP address like 192.0.2.53",
                )
            })
        })
        .collect()
}

/// The `search` list: domain names.
fn check_search(search: Vec<String>) -> Result<Vec<String>, PodNetError> {
    for (i, domain) in search.iter().enumerate() {
        let ok = !domain.is_empty()
            && domain.len() <= 253
            && domain
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !ok {
            return Err(field(
                &format!("search[{i}]"),
                domain,
                "write a domain like example.com",
            ));
        }
    }
    Ok(search)
}

fn field(field: &str, value: impl ToString, fix: impl ToString) -> PodNetError {
    PodNetError::Field {
        field: format!("network.{field}"),
        value: value.to_string(),
        fix: fix.to_string(),
    }
}

/// A Linux interface name: 1 to 15 bytes, no '/', ':' or whitespace.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

impl NetPlan {
    /// `None` for `"none"`; the plan for an object (or an absent field: `null`).
    pub fn from_json(value: Option<&Value>) -> Result<Option<Self>, PodNetError> {
        let written: NetworkField = match value {
            None | Some(Value::Null) => NetworkField {
                subnet6: default_subnet6(),
                ..Default::default()
            },
            Some(Value::String(s)) if s == "none" => return Ok(None),
            Some(Value::String(s)) => {
                return Err(field(
                    "",
                    s,
                    "write \"none\" or an object like {\"ports\": [\"8080:80\"]}",
                )
                .retitle("network"))
            }
            Some(v) => {
                serde_json::from_value(v.clone()).map_err(|e| PodNetError::Json { source: e })?
            }
        };
        let bridge = written.bridge.unwrap_or_else(|| DEFAULT_BRIDGE.into());
        if !valid_ifname(&bridge) {
            return Err(field(
                "bridge",
                &bridge,
                "use 1 to 15 characters without '/', ':' or spaces",
            ));
        }
        let subnet_text = written.subnet.unwrap_or_else(|| DEFAULT_SUBNET.into());
        let subnet: Cidr4 = subnet_text.parse().map_err(|e| {
            field(
                "subnet",
                &subnet_text,
                format!("{e}; write it like \"10.88.0.0/16\""),
            )
        })?;
        let subnet6 = match &written.subnet6 {
            None => None,
            Some(text) => Some(text.parse::<Cidr6>().map_err(|e| {
                field(
                    "subnet6",
                    text,
                    format!("{e}; write it like \"{DEFAULT_SUBNET6}\" or null for no IPv6"),
                )
            })?),
        };
        let address = match &written.address {
            None => None,
            Some(text) => {
                let addr: Ipv4Addr = text
                    .parse()
                    .map_err(|_| field("address", text, "write an IPv4 address like 10.88.0.10"))?;
                let n = subnet.host_number(addr);
                if !subnet.contains(addr) || n <= 1 || n == subnet.last_host_number() {
                    return Err(field(
                        "address",
                        text,
                        format!("pick a host address of network.subnet {subnet} other than its first (the bridge's) and last"),
                    ));
                }
                Some(addr)
            }
        };
        let address6 = match &written.address6 {
            None => None,
            Some(text) => {
                let addr: Ipv6Addr = text.parse().map_err(|_| {
                    field(
                        "address6",
                        text,
                        "write an IPv6 address like fd63:7269:6200::10",
                    )
                })?;
                match subnet6 {
                    Some(net) if net.contains(addr) && Some(addr) != net.host(0) && Some(addr) != net.host(1) => {}
                    Some(net) => {
                        return Err(field(
                            "address6",
                            text,
                            format!("pick an address of network.subnet6 {net} other than ::0 and ::1 (the bridge's)"),
                        ))
                    }
                    None => return Err(field("address6", text, "set network.subnet6 too, or remove address6")),
                }
                Some(addr)
            }
        };
        let mut ports: Vec<PortMap> = Vec::new();
        for (i, text) in written.ports.iter().enumerate() {
            let port: PortMap = text
                .parse()
                .map_err(|e| field(&format!("ports[{i}]"), text, e))?;
            if let Some(other) = ports
                .iter()
                .find(|p| p.host == port.host && p.protocol == port.protocol)
            {
                return Err(field(
                    &format!("ports[{i}]"),
                    text,
                    format!("host port {}/{} is already published as {other}; publish each host port once", port.host, port.protocol.as_str()),
                ));
            }
            ports.push(port);
        }
        let mtu = written.mtu.unwrap_or(DEFAULT_MTU);
        if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
            return Err(field("mtu", mtu, format!("use {MIN_MTU} to {MAX_MTU}")));
        }
        let dns = written.dns.as_deref().map(parse_dns).transpose()?;
        let search = check_search(written.search)?;
        Ok(Some(Self {
            bridge,
            subnet,
            subnet6,
            address,
            address6,
            ports,
            mtu,
            dns,
            search,
            dhcp: false,
        }))
    }
}

impl PodNetError {
    fn retitle(self, name: &str) -> Self {
        match self {
            Self::Field { value, fix, .. } => Self::Field {
                field: name.to_string(),
                value,
                fix,
            },
            other => other,
        }
    }
}

/// The host's nameservers from resolv.conf text, less loopback ones (systemd-resolved's
/// 127.0.0.53 and the like), which a pod cannot reach.
pub fn host_nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            words.next()?.parse::<IpAddr>().ok()
        })
        .filter(|ip| !ip.is_loopback())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plan(v: Value) -> Result<Option<NetPlan>, PodNetError> {
        NetPlan::from_json(Some(&v))
    }

    #[test]
    fn absent_field_gets_every_default() {
        let p = NetPlan::from_json(None).unwrap().unwrap();
        assert_eq!(p.bridge, "crib0");
        assert_eq!(p.subnet.to_string(), "10.88.0.0/16");
        assert_eq!(p.subnet6.unwrap().to_string(), DEFAULT_SUBNET6);
        assert_eq!((p.mtu, p.address, p.dns.clone()), (1500, None, None));
    }

    #[test]
    fn none_turns_networking_off() {
        assert_eq!(plan(json!("none")).unwrap(), None);
        let err = plan(json!("host")).unwrap_err().to_string();
        assert!(err.contains("network: \"host\""), "{err}");
    }

    #[test]
    fn invalid_cidr_names_the_field_and_fix() {
        let err = plan(json!({"subnet": "10.88.0.0/33"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("network.subnet"), "{err}");
        assert!(err.contains("10.88.0.0/16"), "{err}");
        let err = plan(json!({"subnet6": "fd00::1/64"}))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("network.subnet6") && err.contains("fd00::/64"),
            "{err}"
        );
    }

    #[test]
    fn address_outside_the_subnet_is_refused() {
        let err = plan(json!({"address": "10.99.0.5"}))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("network.address") && err.contains("10.88.0.0/16"),
            "{err}"
        );
        let err = plan(json!({"address": "10.88.0.1"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("the bridge's"), "{err}");
        let err = plan(json!({"address": "not-an-ip"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("network.address"), "{err}");
        let err = plan(json!({"address6": "fd00::5"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("network.address6"), "{err}");
    }

    #[test]
    fn static_addresses_and_ports_parse() {
        let p = plan(
            json!({"address": "10.88.3.4", "address6": "fd63:7269:6200::3:4",
            "ports": ["8080:80/tcp", "5353:53/udp"], "mtu": 1400, "dns": ["192.0.2.53"],
            "search": ["example.com"]}),
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.address, Some("10.88.3.4".parse().unwrap()));
        assert_eq!(p.ports.len(), 2);
        assert_eq!(p.mtu, 1400);
        assert_eq!(p.dns, Some(vec!["192.0.2.53".parse().unwrap()]));
    }

    #[test]
    fn bad_port_and_duplicate_port_name_the_entry() {
        let err = plan(json!({"ports": ["80", "8080:99999"]}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("network.ports[1]"), "{err}");
        let err = plan(json!({"ports": ["80", "80:81"]}))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("network.ports[1]") && err.contains("once"),
            "{err}"
        );
    }

    #[test]
    fn bad_bridge_mtu_dns_are_refused() {
        assert!(plan(json!({"bridge": "a/b"})).is_err());
        assert!(plan(json!({"bridge": "sixteen-chars-xx"})).is_err());
        assert!(plan(json!({"mtu": 500}))
            .unwrap_err()
            .to_string()
            .contains("network.mtu"));
        assert!(plan(json!({"dns": ["x"]}))
            .unwrap_err()
            .to_string()
            .contains("network.dns[0]"));
        let err = plan(json!({"speed": 1})).unwrap_err();
        let cause = std::error::Error::source(&err).unwrap().to_string();
        assert!(cause.contains("speed"), "{cause}");
    }

    fn network(v: Value) -> Result<Option<NetworkPlan>, PodNetError> {
        NetworkPlan::from_json(Some(&v))
    }

    #[test]
    fn attach_names_the_interface_with_dns_and_search() {
        let p = network(
            json!({"attach": "eth0", "dns": ["10.96.0.10"], "search": ["svc.cluster.local"]}),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            p,
            NetworkPlan::Attach(AttachPlan {
                interface: "eth0".into(),
                dns: Some(vec!["10.96.0.10".parse().unwrap()]),
                search: vec!["svc.cluster.local".into()],
            })
        );
    }

    #[test]
    fn object_without_attach_is_bridge_mode() {
        let p = network(json!({"mtu": 1400})).unwrap().unwrap();
        assert!(
            matches!(p, NetworkPlan::Bridge(NetPlan { mtu: 1400, .. })),
            "{p:?}"
        );
        assert_eq!(network(json!("none")).unwrap(), None);
    }

    #[test]
    fn attach_with_bridge_fields_names_the_field() {
        for name in BRIDGE_ONLY_FIELDS {
            let mut v = json!({"attach": "eth0"});
            v[name] = json!(null);
            let err = network(v).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!(
                    "network.{name} cannot be combined with network.attach"
                )),
                "{err}"
            );
        }
    }

    #[test]
    fn attach_with_a_bad_name_dns_or_unknown_field_is_refused() {
        let err = network(json!({"attach": "a/b"})).unwrap_err().to_string();
        assert!(
            err.contains("network.attach") && err.contains("eth0"),
            "{err}"
        );
        assert!(network(json!({"attach": ""})).is_err());
        assert!(network(json!({"attach": 3})).is_err());
        let err = network(json!({"attach": "eth0", "dns": ["x"]})).unwrap_err();
        assert!(err.to_string().contains("network.dns[0]"), "{err}");
        let err = network(json!({"attach": "eth0", "search": ["a b"]})).unwrap_err();
        assert!(err.to_string().contains("network.search[0]"), "{err}");
        let err = network(json!({"attach": "eth0", "speed": 1})).unwrap_err();
        let cause = std::error::Error::source(&err).unwrap().to_string();
        assert!(cause.contains("speed"), "{cause}");
    }

    #[test]
    fn loopback_nameservers_are_dropped() {
        let text = "# x\nnameserver 127.0.0.53\nnameserver 192.0.2.1\nnameserver ::1\nsearch lan\n";
        assert_eq!(
            host_nameservers(text),
            vec!["192.0.2.1".parse::<IpAddr>().unwrap()]
        );
    }
}
