//! DHCP on a pod bridge, for marketplace VMs (`crib run --net pod`): their images
//! configure eth0 over DHCP, as Debian's cloud images do, so crib answers DHCP on the
//! bridge with the address the IPAM leased them (docs/NETWORK.md, "Marketplace VMs").
//!
//! One dnsmasq per bridge, with DNS off (`--port=0`), no configuration of the host's
//! (`--conf-file=/dev/null`) and no lease file of its own (`--leasefile-ro`): the IPAM's
//! leases are the leases. It only answers the MACs of the VMs on the bridge, given on
//! its command line (`--dhcp-host=MAC,ADDRESS,infinite`); crib keeps them in a hosts
//! directory, one file per VM. Everything lives in `<net dir>/dhcp-<bridge>/`: `hosts/`,
//! `dnsmasq.pid`, `dnsmasq.log`. Every change happens under the IPAM's lock and
//! restarts dnsmasq with the hosts then present (none: it stays stopped and the
//! directory goes). Not its `--dhcp-hostsdir`: dnsmasq reads that after dropping root,
//! so a private `$CRIB_NET_DIR` hides it; and told of a VM gone, it would keep that VM's
//! lease in memory and refuse the address to the next VM the IPAM gives it to.

use std::io::ErrorKind;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cidr::Cidr4;
use crate::ipam::IpamLock;
use crate::{PodNetError, PodNetState};

/// The DHCP server crib runs on a bridge.
pub const DNSMASQ: &str = "dnsmasq";
const HOSTS_DIR: &str = "hosts";
const PID_FILE: &str = "dnsmasq.pid";
const LOG_FILE: &str = "dnsmasq.log";
/// How long a stopped dnsmasq gets to exit before it is killed.
const STOP_WAIT: Duration = Duration::from_secs(3);

/// The DHCP directory of `bridge` in the IPAM's directory.
pub fn dir(net_dir: &Path, bridge: &str) -> PathBuf {
    net_dir.join(format!("dhcp-{bridge}"))
}

/// The hosts-file line of `state`'s VM.
pub fn host_line(state: &PodNetState) -> String {
    format!("{},{},infinite\n", state.mac, state.address)
}

/// dnsmasq's arguments for the bridge of `state` (every VM on a bridge shares its
/// subnet, gateway, MTU and nameservers: the bridge refuses another subnet).
pub fn dnsmasq_args(
    state: &PodNetState,
    dir: &Path,
    hosts: &[String],
) -> Result<Vec<String>, PodNetError> {
    let subnet: Cidr4 = state.subnet.parse().map_err(|e| PodNetError::Field {
        field: "network.subnet".into(),
        value: state.subnet.clone(),
        fix: format!("{e}"),
    })?;
    let netmask = std::net::Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(subnet.prefix_len))
            .unwrap_or(0),
    );
    let mut args = vec![
        "--conf-file=/dev/null".to_string(),
        "--port=0".into(),
        format!("--interface={}", state.bridge),
        "--bind-interfaces".into(),
        "--dhcp-authoritative".into(),
        "--leasefile-ro".into(),
        "--log-dhcp".into(),
        format!("--log-facility={}", dir.join(LOG_FILE).display()),
        format!("--pid-file={}", dir.join(PID_FILE).display()),
        format!("--dhcp-range={},static,{netmask},infinite", subnet.network),
        format!("--dhcp-option=option:router,{}", state.gateway),
        format!("--dhcp-option=option:mtu,{}", state.mtu),
    ];
    let dns: Vec<String> = state
        .nameservers
        .iter()
        .filter(|n| n.is_ipv4())
        .map(ToString::to_string)
        .collect();
    // An empty option 6: the VM gets no nameserver rather than dnsmasq's own address.
    args.push(format!(
        "--dhcp-option=option:dns-server{}",
        if dns.is_empty() {
            String::new()
        } else {
            format!(",{}", dns.join(","))
        }
    ));
    args.extend(hosts.iter().map(|h| format!("--dhcp-host={h}")));
    if !state.search.is_empty() {
        args.push(format!(
            "--dhcp-option=option:domain-search,{}",
            state.search.join(",")
        ));
    }
    Ok(args)
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> PodNetError + '_ {
    move |source| PodNetError::Lease {
        path: path.to_path_buf(),
        source,
    }
}

/// Serves `state`'s VM its address on its bridge: its hosts file, then dnsmasq
/// (re)started with every VM's. Undone if dnsmasq cannot start.
pub fn add(_lock: &IpamLock, net_dir: &Path, state: &PodNetState) -> Result<(), PodNetError> {
    let dir = dir(net_dir, &state.bridge);
    let hosts = dir.join(HOSTS_DIR);
    std::fs::create_dir_all(&hosts).map_err(io_err(&hosts))?;
    let file = hosts.join(&state.tap);
    std::fs::write(&file, host_line(state)).map_err(io_err(&file))?;
    restart(state, &dir).inspect_err(|_| {
        let _ = std::fs::remove_file(&file);
        if let Err(e) = restart(state, &dir) {
            tracing::warn!(
                "bridge {}: cannot restart its DHCP server: {e}",
                state.bridge
            );
        }
    })
}

/// Stops serving `state`'s VM: removes its hosts file and restarts dnsmasq for the VMs
/// left on the bridge (none: stops it and removes the directory).
pub fn remove(_lock: &IpamLock, net_dir: &Path, state: &PodNetState) {
    let dir = dir(net_dir, &state.bridge);
    let file = dir.join(HOSTS_DIR).join(&state.tap);
    if let Err(e) = std::fs::remove_file(&file) {
        if e.kind() != ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {e}", file.display());
        }
    }
    if let Err(e) = restart(state, &dir) {
        tracing::warn!(
            "bridge {}: cannot restart its DHCP server: {e}",
            state.bridge
        );
    }
}

/// The hosts lines of the VMs on the bridge of `dir`, sorted.
fn hosts(dir: &Path) -> Vec<String> {
    let mut lines: Vec<String> = std::fs::read_dir(dir.join(HOSTS_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
        .flat_map(|text| {
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect();
    lines.sort();
    lines
}

/// Stops the bridge's dnsmasq if it runs, then starts it for the hosts present, or
/// removes the directory when there are none.
fn restart(state: &PodNetState, dir: &Path) -> Result<(), PodNetError> {
    if let Some(pid) = running(dir) {
        stop(pid);
    }
    if remove_dir_if_unused(dir) {
        return Ok(());
    }
    start(state, dir, &hosts(dir))
}

/// Removes `dir` if its hosts directory is empty (or missing); whether it did.
fn remove_dir_if_unused(dir: &Path) -> bool {
    let hosts = dir.join(HOSTS_DIR);
    let empty = std::fs::read_dir(&hosts).map_or(true, |mut d| d.next().is_none());
    if empty {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            if e.kind() != ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {e}", dir.display());
            }
        }
    }
    empty
}

/// Starts dnsmasq for `state`'s bridge; it returns once it serves, or fails saying why
/// (its own message is in its log file).
fn start(state: &PodNetState, dir: &Path, hosts: &[String]) -> Result<(), PodNetError> {
    let args = dnsmasq_args(state, dir, hosts)?;
    let command = format!("{DNSMASQ} {}", args.join(" "));
    let mut dnsmasq = Command::new(DNSMASQ);
    // SAFETY: runs in the child between fork and exec and only makes a system call
    // (async-signal-safe). It marks every descriptor above stderr close-on-exec: the
    // keeper that restarts dnsmasq holds its VM's run-directory lock without that flag,
    // and the long-lived dnsmasq must not hold the lock (nor any other descriptor).
    // Kernels before 5.11 lack close_range; dnsmasq then inherits what it inherits.
    unsafe {
        dnsmasq.pre_exec(|| {
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    let out = dnsmasq
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| PodNetError::Spawn {
            command: DNSMASQ.into(),
            source,
        })?;
    if !out.status.success() {
        let log = std::fs::read_to_string(dir.join(LOG_FILE)).unwrap_or_default();
        return Err(PodNetError::Command {
            command,
            stderr: format!(
                "{} {}",
                String::from_utf8_lossy(&out.stderr).trim(),
                log.lines().last().unwrap_or("")
            )
            .trim()
            .to_string(),
        });
    }
    Ok(())
}

/// The pid of the dnsmasq serving `dir`, if it runs (its command line names our pid
/// file, so a recycled pid is not taken for it).
fn running(dir: &Path) -> Option<libc::pid_t> {
    let pid_file = dir.join(PID_FILE);
    let pid: libc::pid_t = std::fs::read_to_string(&pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let needle = format!("--pid-file={}", pid_file.display());
    cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == needle.as_bytes())
        .then_some(pid)
}

/// SIGTERM, then SIGKILL if it has not exited within [`STOP_WAIT`].
fn stop(pid: libc::pid_t) {
    // A zombie has exited: its reaper (init, or a subreaper that takes its time) owns it.
    let alive = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X")
        })
    };
    // SAFETY: kill sends a signal; no memory is passed. `pid` is a dnsmasq of ours
    // (checked by `running`).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let start = Instant::now();
    while alive() && start.elapsed() < STOP_WAIT {
        std::thread::sleep(Duration::from_millis(20));
    }
    if alive() {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> PodNetState {
        PodNetState {
            pod: "vm1".into(),
            run_dir: "/run/crib/.net/vms/vm1".into(),
            bridge: "crib0".into(),
            tap: "crib0000abcd".into(),
            chain: "pod-vm1-0000abcd".into(),
            mac: "02:00:00:00:ab:cd".into(),
            mtu: 1400,
            subnet: "10.88.0.0/16".into(),
            address: "10.88.0.7".parse().unwrap(),
            prefix_len: 16,
            gateway: "10.88.0.1".parse().unwrap(),
            subnet6: None,
            address6: None,
            prefix6_len: None,
            gateway6: None,
            ports: vec![],
            nameservers: vec![
                "192.0.2.53".parse().unwrap(),
                "2001:db8::53".parse().unwrap(),
            ],
            search: vec!["example.test".into()],
            dhcp: true,
        }
    }

    #[test]
    fn dnsmasq_serves_the_bridge_only_its_hosts_and_no_dns() {
        let hosts = [host_line(&state()).trim().to_string()];
        let args = dnsmasq_args(&state(), Path::new("/n/dhcp-crib0"), &hosts).unwrap();
        for wanted in [
            "--port=0",
            "--conf-file=/dev/null",
            "--interface=crib0",
            "--bind-interfaces",
            "--leasefile-ro",
            "--dhcp-range=10.88.0.0,static,255.255.0.0,infinite",
            "--dhcp-host=02:00:00:00:ab:cd,10.88.0.7,infinite",
            "--pid-file=/n/dhcp-crib0/dnsmasq.pid",
            "--dhcp-option=option:router,10.88.0.1",
            "--dhcp-option=option:mtu,1400",
            "--dhcp-option=option:dns-server,192.0.2.53",
            "--dhcp-option=option:domain-search,example.test",
        ] {
            assert!(args.iter().any(|a| a == wanted), "{wanted} in {args:?}");
        }
        assert_eq!(
            host_line(&state()),
            "02:00:00:00:ab:cd,10.88.0.7,infinite\n"
        );
    }

    #[test]
    fn no_nameserver_sends_an_empty_dns_option() {
        let mut s = state();
        s.nameservers.clear();
        let args = dnsmasq_args(&s, Path::new("/d"), &[]).unwrap();
        assert!(args.iter().any(|a| a == "--dhcp-option=option:dns-server"));
    }

    #[test]
    fn a_dir_without_hosts_is_removed_and_nothing_runs_there() {
        let dir = std::env::temp_dir().join(format!("crib-dhcp-{}", std::process::id()));
        std::fs::create_dir_all(dir.join(HOSTS_DIR)).unwrap();
        std::fs::write(
            dir.join(HOSTS_DIR).join("b"),
            "02:00:00:00:00:0b,10.88.0.3,infinite\n",
        )
        .unwrap();
        std::fs::write(
            dir.join(HOSTS_DIR).join("a"),
            "02:00:00:00:00:0a,10.88.0.2,infinite\n",
        )
        .unwrap();
        assert_eq!(
            hosts(&dir),
            [
                "02:00:00:00:00:0a,10.88.0.2,infinite",
                "02:00:00:00:00:0b,10.88.0.3,infinite"
            ]
        );
        assert!(!remove_dir_if_unused(&dir));
        std::fs::remove_file(dir.join(HOSTS_DIR).join("a")).unwrap();
        std::fs::remove_file(dir.join(HOSTS_DIR).join("b")).unwrap();
        assert!(running(&dir).is_none());
        assert!(remove_dir_if_unused(&dir));
        assert!(!dir.exists());
    }
}
