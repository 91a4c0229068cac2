//! nftables rules, as scripts for `nft -f -` (one script is one atomic transaction).
//!
//! Everything lives in table `inet crib` (docs/NETWORK.md shows it whole):
//! - set `nets4`: the pods' IPv4 subnets; `postrouting` masquerades what leaves them
//!   for elsewhere, and what reaches a pod from 127.0.0.0/8 (published ports on
//!   localhost) or from a pod through a published port (hairpin).
//! - map `ports`: `protocol . host port : jump pod-<name>`; `prerouting` (traffic
//!   from other hosts and the pods) and `output` (the host's own) look up every packet
//!   to a local address in it.
//! - chain `pod-<name>`: the pod's DNAT rules. Adding it and its map elements is one
//!   transaction; so is removing them.
//!
//! The `nft` tool rather than a crate: its text format is what an operator reads and
//! types (`nft list table inet crib`), it is in every distribution, and a transaction
//! is one `nft -f -`. The netlink crates for nftables are young or unmaintained.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::{PodNetError, PodNetState};

/// The kernel modules table `inet crib` needs (absent ones are fine: built in).
const NFT_MODULES: &[&str] = &[
    "nf_tables",
    "nft_chain_nat",
    "nft_nat",
    "nft_masq",
    "nft_ct",
    "nft_fib_inet",
    "nft_fib_ipv4",
    "nft_fib_ipv6",
];

/// The table, in family `inet` (IPv4 and IPv6).
pub const TABLE: &str = "crib";

/// The base table, sets, map and chains; run once, when the table is missing.
pub fn base_script() -> String {
    format!(
        "table inet {TABLE} {{
  set nets4 {{ type ipv4_addr; flags interval; }}
  map ports {{ type inet_proto . inet_service : verdict; }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    fib daddr type local meta l4proto . th dport vmap @ports
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    fib daddr type local meta l4proto . th dport vmap @ports
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr @nets4 ip daddr != @nets4 masquerade
    ip saddr 127.0.0.0/8 ip daddr @nets4 masquerade
    ct status dnat ip saddr @nets4 ip daddr @nets4 masquerade
  }}
}}
"
    )
}

/// Adds pod `state`'s chain, DNAT rules and map elements, and its subnet to `nets4`.
/// `create element` fails if another pod holds a host port: nothing is then added.
pub fn pod_up_script(state: &PodNetState) -> String {
    let chain = &state.chain;
    let mut s = format!("add element inet {TABLE} nets4 {{ {} }}\n", state.subnet);
    s.push_str(&format!("add chain inet {TABLE} {chain}\n"));
    for p in &state.ports {
        let proto = p.protocol.as_str();
        s.push_str(&format!(
            "add rule inet {TABLE} {chain} meta nfproto ipv4 meta l4proto {proto} th dport {} dnat ip to {}:{}\n",
            p.host, state.address, p.pod
        ));
        if let Some(a6) = state.address6 {
            s.push_str(&format!(
                "add rule inet {TABLE} {chain} meta nfproto ipv6 meta l4proto {proto} th dport {} dnat ip6 to [{a6}]:{}\n",
                p.host, p.pod
            ));
        }
    }
    for p in &state.ports {
        s.push_str(&format!(
            "create element inet {TABLE} ports {{ {} . {} : jump {chain} }}\n",
            p.protocol.as_str(),
            p.host
        ));
    }
    s
}

/// Removes pod `state`'s map elements and chain (the subnet stays in `nets4`: other
/// pods share it).
pub fn pod_down_script(state: &PodNetState) -> String {
    let mut s = String::new();
    for p in &state.ports {
        s.push_str(&format!(
            "delete element inet {TABLE} ports {{ {} . {} }}\n",
            p.protocol.as_str(),
            p.host
        ));
    }
    s.push_str(&format!("flush chain inet {TABLE} {}\n", state.chain));
    s.push_str(&format!("delete chain inet {TABLE} {}\n", state.chain));
    s
}

/// Runs `nft` with `args`, `script` on its standard input.
pub fn run(args: &[&str], script: Option<&str>) -> Result<String, PodNetError> {
    let command = format!("nft {}", args.join(" "));
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if script.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| PodNetError::Spawn {
            command: command.clone(),
            source,
        })?;
    if let (Some(script), Some(mut stdin)) = (script, child.stdin.take()) {
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|source| PodNetError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(PodNetError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates the table unless it exists (call under the IPAM lock).
pub fn ensure_table() -> Result<(), PodNetError> {
    if run(&["list", "table", "inet", TABLE], None).is_ok() {
        return Ok(());
    }
    // The kernel loads these on demand, but only if its modprobe helper can find them
    // (not from a chroot or a container, for example): load them first.
    crate::link::modprobe(NFT_MODULES);
    run(&["-f", "-"], Some(&base_script())).map(drop).map_err(|e| match e {
        PodNetError::Command { command, stderr } if stderr.contains("No such file or directory") => {
            PodNetError::Command {
                command,
                stderr: format!(
                    "{stderr}\n(the kernel lacks an nftables module: modprobe nft_chain_nat nft_nat nft_masq nft_ct nft_fib_inet)"
                ),
            }
        }
        other => other,
    })
}

/// Whether chain `name` exists in the table.
pub fn chain_exists(name: &str) -> bool {
    run(&["list", "chain", "inet", TABLE, name], None).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::PortMap;

    fn state() -> PodNetState {
        PodNetState {
            pod: "web".into(),
            run_dir: "/run/crib/web".into(),
            bridge: "crib0".into(),
            tap: "crib0000".into(),
            chain: "pod-web".into(),
            mac: "02:00:00:00:00:01".into(),
            mtu: 1500,
            subnet: "10.88.0.0/16".into(),
            address: "10.88.0.2".parse().unwrap(),
            prefix_len: 16,
            gateway: "10.88.0.1".parse().unwrap(),
            subnet6: Some("fd63:7269:6200::/64".into()),
            address6: Some("fd63:7269:6200::2".parse().unwrap()),
            prefix6_len: Some(64),
            gateway6: Some("fd63:7269:6200::1".parse().unwrap()),
            ports: vec![
                "8080:80/tcp".parse::<PortMap>().unwrap(),
                "5353:53/udp".parse().unwrap(),
            ],
            nameservers: vec![],
            search: vec![],
            dhcp: false,
        }
    }

    #[test]
    fn pod_up_adds_chain_rules_and_elements() {
        let script = pod_up_script(&state());
        assert_eq!(
            script,
            "add element inet crib nets4 { 10.88.0.0/16 }
add chain inet crib pod-web
add rule inet crib pod-web meta nfproto ipv4 meta l4proto tcp th dport 8080 dnat ip to 10.88.0.2:80
add rule inet crib pod-web meta nfproto ipv6 meta l4proto tcp th dport 8080 dnat ip6 to [fd63:7269:6200::2]:80
add rule inet crib pod-web meta nfproto ipv4 meta l4proto udp th dport 5353 dnat ip to 10.88.0.2:53
add rule inet crib pod-web meta nfproto ipv6 meta l4proto udp th dport 5353 dnat ip6 to [fd63:7269:6200::2]:53
create element inet crib ports { tcp . 8080 : jump pod-web }
create element inet crib ports { udp . 5353 : jump pod-web }
"
        );
    }

    #[test]
    fn pod_down_removes_elements_then_the_chain() {
        assert_eq!(
            pod_down_script(&state()),
            "delete element inet crib ports { tcp . 8080 }
delete element inet crib ports { udp . 5353 }
flush chain inet crib pod-web
delete chain inet crib pod-web
"
        );
    }

    #[test]
    fn pod_without_ports_or_ipv6_gets_an_empty_chain() {
        let mut s = state();
        s.ports.clear();
        s.address6 = None;
        assert_eq!(
            pod_up_script(&s),
            "add element inet crib nets4 { 10.88.0.0/16 }\nadd chain inet crib pod-web\n"
        );
    }

    #[test]
    fn base_table_hooks_every_path() {
        let base = base_script();
        for needle in [
            "hook prerouting",
            "hook output",
            "hook postrouting",
            "masquerade",
            "vmap @ports",
        ] {
            assert!(base.contains(needle), "{needle}");
        }
    }
}
