//! The pod network's links: the bridge (created on first use, with the gateway
//! addresses) and each pod's tap, through the `ip` tool (iproute2), plus the sysctls
//! that let the host route for the pods. Attach mode's `tc` runs through here too.

use std::path::PathBuf;
use std::process::Command;

use crate::{PodNetError, PodNetState};

/// Runs iproute2's `ip` with `args`; its stdout, or its stderr as the error.
pub(crate) fn ip(args: &[&str]) -> Result<String, PodNetError> {
    run_tool("ip", args)
}

/// Runs iproute2's `tc` with `args`; its stdout, or its stderr as the error.
pub(crate) fn tc(args: &[&str]) -> Result<String, PodNetError> {
    run_tool("tc", args)
}

fn run_tool(program: &str, args: &[&str]) -> Result<String, PodNetError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
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

/// Whether interface `name` exists (asked of the kernel: /sys/class/net shows the
/// network namespace sysfs was mounted in, not necessarily ours).
pub fn exists(name: &str) -> bool {
    ip(&["-o", "link", "show", "dev", name]).is_ok()
}

fn is_bridge(name: &str) -> bool {
    ip(&["-j", "-d", "link", "show", "dev", name])
        .is_ok_and(|json| json.contains("\"info_kind\":\"bridge\""))
}

/// Refuses an existing interface `name` that is not a bridge (a missing one is fine:
/// [`ensure_bridge`] creates it).
pub fn check_bridge(name: &str) -> Result<(), PodNetError> {
    if exists(name) && !is_bridge(name) {
        return Err(PodNetError::NotABridge {
            name: name.to_string(),
        });
    }
    Ok(())
}

fn write_sysctl(path: &str, value: &str) -> Result<(), PodNetError> {
    let path = PathBuf::from(path);
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(|source| PodNetError::Sysctl { path, source })
}

/// Creates bridge `state.bridge` if missing, gives it the gateway addresses and turns
/// on forwarding (and `route_localnet` on it, for ports published on 127.0.0.1).
/// Refuses a bridge that has another IPv4 subnet.
pub fn ensure_bridge(state: &PodNetState) -> Result<(), PodNetError> {
    let bridge = state.bridge.as_str();
    check_bridge(bridge)?;
    if !exists(bridge) {
        modprobe(&["bridge", "tun"]);
        ip(&["link", "add", "name", bridge, "type", "bridge"])?;
    }
    let wanted = format!("{}/{}", state.gateway, state.prefix_len);
    let have = ip(&["-o", "-4", "addr", "show", "dev", bridge])?;
    let addrs: Vec<&str> = have
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|x| *x == "inet")?;
            w.next()
        })
        .collect();
    if !addrs.contains(&wanted.as_str()) {
        if let Some(found) = addrs.first() {
            return Err(PodNetError::BridgeSubnet {
                bridge: bridge.to_string(),
                found: found.to_string(),
                wanted: state.subnet.clone(),
            });
        }
        ip(&["addr", "add", &wanted, "dev", bridge])?;
    }
    if let (Some(gw6), Some(len)) = (state.gateway6, state.prefix6_len) {
        let wanted6 = format!("{gw6}/{len}");
        let have6 = ip(&["-o", "-6", "addr", "show", "dev", bridge])?;
        if !have6.contains(&format!(" {wanted6} ")) {
            ip(&["-6", "addr", "add", &wanted6, "dev", bridge, "nodad"])?;
        }
        write_sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1")?;
    }
    ip(&["link", "set", "dev", bridge, "up"])?;
    write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
    write_sysctl(
        &format!("/proc/sys/net/ipv4/conf/{bridge}/route_localnet"),
        "1",
    )?;
    Ok(())
}

/// Creates the pod's tap (persistent, so it exists before crib opens it; a stale one of
/// the same name is replaced) and puts it on the bridge with the pod's MTU.
pub fn create_tap(state: &PodNetState) -> Result<(), PodNetError> {
    delete(&state.tap);
    ip(&["tuntap", "add", "dev", &state.tap, "mode", "tap"])?;
    let mtu = state.mtu.to_string();
    ip(&[
        "link",
        "set",
        "dev",
        &state.tap,
        "mtu",
        &mtu,
        "master",
        &state.bridge,
        "up",
    ])
    .map(drop)
}

/// Loads kernel `modules` with `modprobe -q -a`, best effort: a module built into the
/// kernel, or a host without modprobe, is not an error here (the step that needs the
/// module says so).
pub fn modprobe(modules: &[&str]) {
    let _ = Command::new("modprobe")
        .args(["-q", "-a"])
        .args(modules)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// Deletes interface `name` if it exists (logged if that fails).
pub fn delete(name: &str) {
    if exists(name) {
        if let Err(e) = ip(&["link", "del", "dev", name]) {
            tracing::warn!("cannot delete interface {name}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_that_is_not_a_bridge_is_refused() {
        // Every network namespace has lo; no privilege is needed to look at it.
        let err = check_bridge("lo").unwrap_err();
        assert!(matches!(err, PodNetError::NotABridge { .. }), "{err}");
        assert!(check_bridge("crib-no-such").is_ok());
    }
}
