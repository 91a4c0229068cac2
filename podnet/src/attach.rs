//! Attach mode (`"network": {"attach": "eth0"}`, docs/NETWORK.md "Attach mode"): crib
//! runs inside a network namespace that already holds an interface (under Kubernetes,
//! the veth `eth0` that CNI made for the pod sandbox, with its address, default route
//! and MAC), and the VM takes over that interface's identity, as Kata Containers'
//! "tcfilter" model does:
//!
//! - the interface's MAC, MTU, IPv4 (required) and global IPv6 address and the default
//!   gateways are read with `ip -j` and become the guest's eth0 (the pod spec's
//!   `network`);
//! - a tap of the pod's (named as bridge mode names it, from the run directory) gets
//!   the interface's MTU, and two tc filters redirect every frame between them: what
//!   arrives on the interface leaves through the tap to the VM, what the VM sends
//!   leaves through the interface (an ingress qdisc on each, a `matchall` filter with
//!   `action mirred egress redirect`; `u32 match u32 0 0` where the kernel lacks
//!   `cls_matchall`).
//!
//! The interface and its addresses stay as CNI left them: [`down`] removes only the
//! tap and the ingress qdisc (with its filters) that [`up`] added.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{host_nameservers, MAX_MTU, MIN_MTU};
use crate::link::{ip, tc};
use crate::{ident, link, AttachPlan, PodNetError};

/// Where crib's nameservers are read when the launch file gives none (`ip netns exec`
/// binds /etc/netns/NS/resolv.conf over it when there is one).
const RESOLV_CONF: &str = "/etc/resolv.conf";
/// What `tc` shows as a mirred action's device once that device is gone.
const GONE_DEVICE: &str = "*";

/// An attached pod's network as built: what `info.json` records and the keeper removes
/// (the tap, and the ingress qdisc on the interface).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachState {
    pub pod: String,
    pub run_dir: PathBuf,
    /// The interface the VM took over (CNI's).
    pub attach: String,
    pub tap: String,
    /// The interface's MAC, now the guest eth0's.
    pub mac: String,
    pub mtu: u16,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<Ipv6Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix6_len: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<Ipv6Addr>,
    #[serde(default)]
    pub nameservers: Vec<IpAddr>,
    #[serde(default)]
    pub search: Vec<String>,
}

/// What `ip -j addr show dev NAME` says about an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceInfo {
    pub link_type: String,
    pub mac: String,
    pub mtu: u64,
    /// The first IPv4 address of global scope, with its prefix length.
    pub ipv4: Option<(Ipv4Addr, u8)>,
    /// The first IPv6 address of global scope, with its prefix length.
    pub ipv6: Option<(Ipv6Addr, u8)>,
}

fn output_err(command: &str, problem: impl ToString) -> PodNetError {
    PodNetError::ToolOutput {
        command: command.to_string(),
        problem: problem.to_string(),
    }
}

/// Parses `ip -j addr show dev NAME`'s output (`command` names it in errors).
pub fn parse_interface(json: &str, command: &str) -> Result<InterfaceInfo, PodNetError> {
    let links: Vec<Value> = serde_json::from_str(json).map_err(|e| output_err(command, e))?;
    let link = links
        .first()
        .ok_or_else(|| output_err(command, "no interface listed"))?;
    let text = |key: &str| {
        link.get(key)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| output_err(command, format!("no \"{key}\"")))
    };
    let mtu = link
        .get("mtu")
        .and_then(Value::as_u64)
        .ok_or_else(|| output_err(command, "no \"mtu\""))?;
    let mut info = InterfaceInfo {
        link_type: text("link_type")?,
        mac: text("address")?.to_ascii_lowercase(),
        mtu,
        ipv4: None,
        ipv6: None,
    };
    let addrs = link
        .get("addr_info")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for addr in addrs {
        if addr.get("scope").and_then(Value::as_str) != Some("global") {
            continue;
        }
        let local = addr.get("local").and_then(Value::as_str);
        let len = addr
            .get("prefixlen")
            .and_then(Value::as_u64)
            .and_then(|l| u8::try_from(l).ok());
        let (Some(local), Some(len)) = (local, len) else {
            continue;
        };
        match addr.get("family").and_then(Value::as_str) {
            Some("inet") if info.ipv4.is_none() && len <= 32 => {
                info.ipv4 = local.parse().ok().map(|a| (a, len));
            }
            Some("inet6") if info.ipv6.is_none() && len <= 128 => {
                info.ipv6 = local.parse().ok().map(|a| (a, len));
            }
            _ => {}
        }
    }
    Ok(info)
}

/// The gateway of the first default route through `interface` in `ip -j route show
/// default`'s output; `None` if there is none (or it has no gateway).
pub fn parse_default_gateway<A: FromStr>(
    json: &str,
    interface: &str,
    command: &str,
) -> Result<Option<A>, PodNetError> {
    let routes: Vec<Value> = serde_json::from_str(json).map_err(|e| output_err(command, e))?;
    Ok(routes
        .iter()
        .filter(|r| r.get("dst").and_then(Value::as_str) == Some("default"))
        .filter(|r| r.get("dev").and_then(Value::as_str) == Some(interface))
        .find_map(|r| r.get("gateway")?.as_str()?.parse().ok()))
}

/// Whose the filters in `tc -j filter show dev NAME ingress`'s output are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IngressFilters {
    /// Only crib's redirects: to `tap`, or to a device that is gone (a killed crib's
    /// tap, removed since), or none at all.
    Crib,
    /// Anything else, described (`u32 -> crib5e6f7a8b`, `flower`).
    Foreign(String),
}

/// Classifies the ingress filters of an interface (see [`IngressFilters`]).
pub fn classify_filters(
    json: &str,
    tap: &str,
    command: &str,
) -> Result<IngressFilters, PodNetError> {
    let filters: Vec<Value> = serde_json::from_str(json).map_err(|e| output_err(command, e))?;
    let mut foreign = Vec::new();
    for filter in &filters {
        let kind = filter.get("kind").and_then(Value::as_str).unwrap_or("?");
        let Some(options) = filter.get("options") else {
            // The line that only names a filter's priority and kind.
            continue;
        };
        let Some(actions) = options.get("actions").and_then(Value::as_array) else {
            // u32's hash table, which every u32 filter comes with.
            if kind == "u32" && options.get("ht_divisor").is_some() {
                continue;
            }
            foreign.push(kind.to_string());
            continue;
        };
        for action in actions {
            let to = action.get("to_dev").and_then(Value::as_str).unwrap_or("");
            let redirect = action.get("kind").and_then(Value::as_str) == Some("mirred")
                && action.get("mirred_action").and_then(Value::as_str) == Some("redirect");
            let crib_kind = kind == "matchall" || kind == "u32";
            if !(crib_kind && redirect && (to == tap || to == GONE_DEVICE)) {
                foreign.push(format!("{kind} -> {to}"));
            }
        }
    }
    Ok(if foreign.is_empty() {
        IngressFilters::Crib
    } else {
        IngressFilters::Foreign(foreign.join(", "))
    })
}

/// Reads interface `name` in crib's network namespace.
pub fn inspect(name: &str) -> Result<InterfaceInfo, PodNetError> {
    if !link::exists(name) {
        return Err(PodNetError::AttachMissing {
            interface: name.to_string(),
        });
    }
    let args = ["-j", "addr", "show", "dev", name];
    parse_interface(&ip(&args)?, &format!("ip {}", args.join(" ")))
}

fn default_gateway<A: FromStr>(family: &str, interface: &str) -> Result<Option<A>, PodNetError> {
    let args = ["-j", family, "route", "show", "default"];
    parse_default_gateway(&ip(&args)?, interface, &format!("ip {}", args.join(" ")))
}

/// The addresses and routes pod `pod` (run directory `run_dir`) takes over from
/// interface `plan.interface`, checked; nothing is changed.
pub fn plan_state(
    pod: &str,
    run_dir: &Path,
    plan: &AttachPlan,
) -> Result<AttachState, PodNetError> {
    let interface = plan.interface.as_str();
    let info = inspect(interface)?;
    state_from(
        pod,
        run_dir,
        plan,
        &info,
        default_gateway("-4", interface)?,
        default_gateway("-6", interface)?,
        || {
            std::fs::read_to_string(RESOLV_CONF)
                .map(|text| host_nameservers(&text))
                .unwrap_or_default()
        },
    )
}

/// [`plan_state`] without the tools: checks `info` and combines it with the gateways
/// and the nameservers (the launch file's, else `resolv_conf`'s).
pub fn state_from(
    pod: &str,
    run_dir: &Path,
    plan: &AttachPlan,
    info: &InterfaceInfo,
    gateway: Option<Ipv4Addr>,
    gateway6: Option<Ipv6Addr>,
    resolv_conf: impl FnOnce() -> Vec<IpAddr>,
) -> Result<AttachState, PodNetError> {
    let interface = plan.interface.clone();
    if info.link_type != "ether" {
        return Err(PodNetError::AttachNotEthernet {
            interface,
            link_type: info.link_type.clone(),
        });
    }
    let mtu = u16::try_from(info.mtu)
        .ok()
        .filter(|m| (MIN_MTU..=MAX_MTU).contains(m))
        .ok_or(PodNetError::AttachMtu {
            interface: interface.clone(),
            mtu: info.mtu,
            min: MIN_MTU,
            max: MAX_MTU,
        })?;
    let Some((address, prefix_len)) = info.ipv4 else {
        return Err(PodNetError::AttachNoIpv4 { interface });
    };
    Ok(AttachState {
        pod: pod.to_string(),
        run_dir: run_dir.to_path_buf(),
        attach: interface,
        tap: ident::tap_name(run_dir),
        mac: info.mac.clone(),
        mtu,
        address,
        prefix_len,
        gateway,
        address6: info.ipv6.map(|(a, _)| a),
        prefix6_len: info.ipv6.map(|(_, l)| l),
        // A default IPv6 route without an IPv6 address to use it from is no use.
        gateway6: gateway6.filter(|_| info.ipv6.is_some()),
        nameservers: plan.dns.clone().unwrap_or_else(resolv_conf),
        search: plan.search.clone(),
    })
}

/// Takes over interface `plan.interface` for pod `pod`: reads its identity, creates the
/// pod's tap (replacing a killed crib's of the same name) with its MTU, and redirects
/// every frame between the two. Undone if any step fails.
pub fn up(pod: &str, run_dir: &Path, plan: &AttachPlan) -> Result<AttachState, PodNetError> {
    let state = plan_state(pod, run_dir, plan)?;
    link::modprobe(&[
        "tun",
        "sch_ingress",
        "cls_matchall",
        "cls_u32",
        "act_mirred",
    ]);
    if let Err(e) = build(&state) {
        down(&state.attach, &state.tap);
        return Err(e);
    }
    Ok(state)
}

fn build(state: &AttachState) -> Result<(), PodNetError> {
    let (interface, tap) = (state.attach.as_str(), state.tap.as_str());
    // A killed crib's tap goes first: its redirect then points at a gone device, which
    // marks it as crib's.
    link::delete(tap);
    if has_ingress_qdisc(interface)? {
        match ingress_filters(interface, tap)? {
            IngressFilters::Crib => tc(&["qdisc", "del", "dev", interface, "ingress"]).map(drop)?,
            IngressFilters::Foreign(found) => {
                return Err(PodNetError::AttachForeignFilters {
                    interface: interface.to_string(),
                    found,
                })
            }
        }
    }
    ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
    let mtu = state.mtu.to_string();
    ip(&["link", "set", "dev", tap, "mtu", &mtu, "up"])?;
    for (from, to) in [(interface, tap), (tap, interface)] {
        tc(&["qdisc", "add", "dev", from, "ingress"])?;
        redirect(from, to)?;
    }
    Ok(())
}

/// Redirects every frame arriving on `from` out of `to`.
fn redirect(from: &str, to: &str) -> Result<(), PodNetError> {
    let filter = |classifier: &[&str]| {
        let mut args = vec![
            "filter", "add", "dev", from, "ingress", "pref", "1", "protocol", "all",
        ];
        args.extend_from_slice(classifier);
        args.extend_from_slice(&["action", "mirred", "egress", "redirect", "dev", to]);
        tc(&args).map(drop)
    };
    filter(&["matchall"]).or_else(|e| {
        // A kernel without cls_matchall (u32 is older and everywhere): the same match.
        tracing::debug!("matchall filter on {from} refused ({e}), using u32");
        filter(&["u32", "match", "u32", "0", "0"])
    })
}

fn has_ingress_qdisc(interface: &str) -> Result<bool, PodNetError> {
    let args = ["-j", "qdisc", "show", "dev", interface];
    let json = tc(&args)?;
    let qdiscs: Vec<Value> = serde_json::from_str(&json)
        .map_err(|e| output_err(&format!("tc {}", args.join(" ")), e))?;
    Ok(qdiscs
        .iter()
        .any(|q| q.get("kind").and_then(Value::as_str) == Some("ingress")))
}

fn ingress_filters(interface: &str, tap: &str) -> Result<IngressFilters, PodNetError> {
    let args = ["-j", "filter", "show", "dev", interface, "ingress"];
    classify_filters(&tc(&args)?, tap, &format!("tc {}", args.join(" ")))
}

/// Removes what [`up`] added: the ingress qdisc on `interface` (with its filters) if
/// its filters are crib's, and `tap`. The interface and its addresses stay. Whatever is
/// missing is fine; failures are logged.
pub fn down(interface: &str, tap: &str) {
    let removed = has_ingress_qdisc(interface).and_then(|has| {
        if !has {
            return Ok(());
        }
        match ingress_filters(interface, tap)? {
            IngressFilters::Crib => tc(&["qdisc", "del", "dev", interface, "ingress"]).map(drop),
            IngressFilters::Foreign(found) => {
                tracing::warn!("{interface}: leaving its ingress qdisc, which has filters crib did not add ({found})");
                Ok(())
            }
        }
    });
    if let Err(e) = removed {
        // A gone interface (the namespace is being torn down) has nothing to remove.
        if link::exists(interface) {
            tracing::warn!("{interface}: cannot remove crib's tc redirect: {e}");
        }
    }
    link::delete(tap);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ip -j addr show dev eth0` of a CNI veth (iproute2 6.1), with a link-local IPv6
    /// address that must not be taken for the global one.
    const VETH: &str = r#"[{"ifindex":3,"link":"peer0","ifname":"eth0","flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],"mtu":1450,"qdisc":"noqueue","operstate":"UP","group":"default","txqlen":1000,"link_type":"ether","address":"02:AA:bb:cc:dd:ee","broadcast":"ff:ff:ff:ff:ff:ff","addr_info":[{"family":"inet6","local":"fe80::aa:bbff:fecc:ddee","prefixlen":64,"scope":"link"},{"family":"inet","local":"10.99.0.2","prefixlen":24,"scope":"global","label":"eth0"},{"family":"inet6","local":"fd00:99::2","prefixlen":64,"scope":"global","nodad":true}]}]"#;
    const LO: &str = r#"[{"ifindex":1,"ifname":"lo","mtu":65536,"link_type":"loopback","address":"00:00:00:00:00:00","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]}]"#;

    fn plan(dns: Option<Vec<IpAddr>>) -> AttachPlan {
        AttachPlan {
            interface: "eth0".into(),
            dns,
            search: vec!["svc.cluster.local".into()],
        }
    }

    fn state(info: &InterfaceInfo, plan: &AttachPlan) -> Result<AttachState, PodNetError> {
        state_from(
            "web",
            Path::new("/run/crib/web"),
            plan,
            info,
            Some("10.99.0.1".parse().unwrap()),
            Some("fd00:99::1".parse().unwrap()),
            || vec!["192.0.2.53".parse().unwrap()],
        )
    }

    #[test]
    fn veth_gives_mac_mtu_and_global_addresses() {
        let info = parse_interface(VETH, "ip").unwrap();
        assert_eq!(info.mac, "02:aa:bb:cc:dd:ee");
        assert_eq!((info.mtu, info.link_type.as_str()), (1450, "ether"));
        assert_eq!(info.ipv4, Some(("10.99.0.2".parse().unwrap(), 24)));
        assert_eq!(info.ipv6, Some(("fd00:99::2".parse().unwrap(), 64)));
    }

    #[test]
    fn unexpected_ip_output_is_an_error_naming_the_command() {
        let err = parse_interface("[]", "ip -j addr show dev eth0").unwrap_err();
        assert!(
            err.to_string().contains("ip -j addr show dev eth0"),
            "{err}"
        );
        assert!(parse_interface("not json", "ip").is_err());
        assert!(parse_interface(r#"[{"mtu":1500}]"#, "ip").is_err());
    }

    #[test]
    fn default_gateway_is_the_one_through_the_interface() {
        let json = r#"[{"dst":"default","gateway":"192.0.2.1","dev":"eth1","flags":[]},{"dst":"default","gateway":"10.99.0.1","dev":"eth0","flags":["onlink"]}]"#;
        let gw: Option<Ipv4Addr> = parse_default_gateway(json, "eth0", "ip").unwrap();
        assert_eq!(gw, Some("10.99.0.1".parse().unwrap()));
        let six = r#"[{"dst":"default","gateway":"fe80::1","dev":"eth0","metric":1024,"flags":[],"pref":"medium"}]"#;
        let gw6: Option<Ipv6Addr> = parse_default_gateway(six, "eth0", "ip").unwrap();
        assert_eq!(gw6, Some("fe80::1".parse().unwrap()));
        let none: Option<Ipv4Addr> = parse_default_gateway("[]", "eth0", "ip").unwrap();
        assert_eq!(none, None);
    }

    #[test]
    fn state_takes_the_interface_identity_and_the_pods_tap() {
        let s = state(&parse_interface(VETH, "ip").unwrap(), &plan(None)).unwrap();
        assert_eq!(
            (s.attach.as_str(), s.mac.as_str(), s.mtu),
            ("eth0", "02:aa:bb:cc:dd:ee", 1450)
        );
        assert_eq!(s.tap, ident::tap_name(Path::new("/run/crib/web")));
        assert_eq!(
            (s.address.to_string(), s.prefix_len),
            ("10.99.0.2".into(), 24)
        );
        assert_eq!(s.gateway6.unwrap().to_string(), "fd00:99::1");
        assert_eq!(s.nameservers, vec!["192.0.2.53".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn launch_file_nameservers_win_over_resolv_conf() {
        let dns = vec!["10.96.0.10".parse().unwrap()];
        let s = state(
            &parse_interface(VETH, "ip").unwrap(),
            &plan(Some(dns.clone())),
        )
        .unwrap();
        assert_eq!(s.nameservers, dns);
    }

    #[test]
    fn interface_without_ipv4_is_refused_with_the_fix() {
        let mut info = parse_interface(VETH, "ip").unwrap();
        info.ipv4 = None;
        info.ipv6 = None;
        let err = state(&info, &plan(None)).unwrap_err().to_string();
        assert!(
            err.contains("eth0 has no IPv4 address") && err.contains("CNI"),
            "{err}"
        );
    }

    #[test]
    fn loopback_is_refused() {
        let err = state(&parse_interface(LO, "ip").unwrap(), &plan(None)).unwrap_err();
        assert!(
            matches!(err, PodNetError::AttachNotEthernet { .. }),
            "{err}"
        );
    }

    #[test]
    fn mtu_outside_what_pods_support_is_refused() {
        let mut info = parse_interface(VETH, "ip").unwrap();
        info.mtu = 9001;
        let err = state(&info, &plan(None)).unwrap_err().to_string();
        assert!(
            err.contains("MTU 9001") && err.contains("1280 to 9000"),
            "{err}"
        );
    }

    #[test]
    fn ipv6_gateway_without_ipv6_address_is_dropped() {
        let mut info = parse_interface(VETH, "ip").unwrap();
        info.ipv6 = None;
        let s = state(&info, &plan(None)).unwrap();
        assert_eq!((s.address6, s.gateway6), (None, None));
    }

    /// `tc -j filter show dev eth0 ingress` with crib's u32 redirect (iproute2 6.1).
    const U32_TO_TAP: &str = r#"[{"protocol":"all","pref":1,"kind":"u32","chain":0},{"protocol":"all","pref":1,"kind":"u32","chain":0,"options":{"fh":"800:","ht_divisor":1}},{"protocol":"all","pref":1,"kind":"u32","chain":0,"options":{"fh":"800::800","order":2048,"key_ht":"800","bkt":"0","not_in_hw":true,"match":{"value":"0","mask":"0","offmask":"","off":0},"actions":[{"order":1,"kind":"mirred","mirred_action":"redirect","direction":"egress","to_dev":"TAP","control_action":{"type":"stolen"},"index":1,"ref":1,"bind":1}]}}]"#;

    #[test]
    fn redirect_to_the_tap_or_to_a_gone_device_is_cribs() {
        let ours = U32_TO_TAP.replace("TAP", "crib1a2b3c4d");
        assert_eq!(
            classify_filters(&ours, "crib1a2b3c4d", "tc").unwrap(),
            IngressFilters::Crib
        );
        let gone = U32_TO_TAP.replace("TAP", "*");
        assert_eq!(
            classify_filters(&gone, "crib1a2b3c4d", "tc").unwrap(),
            IngressFilters::Crib
        );
        assert_eq!(
            classify_filters("[]", "crib1a2b3c4d", "tc").unwrap(),
            IngressFilters::Crib
        );
    }

    #[test]
    fn other_filters_are_foreign() {
        let other_tap = U32_TO_TAP.replace("TAP", "crib5e6f7a8b");
        assert_eq!(
            classify_filters(&other_tap, "crib1a2b3c4d", "tc").unwrap(),
            IngressFilters::Foreign("u32 -> crib5e6f7a8b".into())
        );
        let flower = r#"[{"protocol":"ip","pref":49152,"kind":"flower","chain":0,"options":{"keys":{},"not_in_hw":true}}]"#;
        assert_eq!(
            classify_filters(flower, "crib1a2b3c4d", "tc").unwrap(),
            IngressFilters::Foreign("flower".into())
        );
    }
}
