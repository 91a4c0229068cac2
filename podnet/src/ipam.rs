//! Address leases: one file per leased IPv4 address under `<net dir>/leases/`,
//! holding the pod's whole [`PodNetState`]. Every change happens under an exclusive
//! `flock` of `<net dir>/lock`, so concurrent launches never get the same address
//! or host port. A pod's IPv6 address has the same host number as its IPv4 one.
//!
//! A lease outlives a `crib pod run` killed with `kill -9`; the caller's `reclaim`
//! decides which leases are stale (their pod's run-directory lock is free) and tears
//! their network down before the lease goes.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::net::IpAddr;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::{ident, NetPlan, PodNetError, PodNetState};

/// The directory of leases inside the IPAM directory.
const LEASES_DIR: &str = "leases";
/// The lock file inside the IPAM directory.
const LOCK_FILE: &str = "lock";

/// The leases of one run root.
#[derive(Clone, Debug)]
pub struct Ipam {
    dir: PathBuf,
}

/// The IPAM's lock, held until dropped.
#[derive(Debug)]
pub struct IpamLock {
    _file: File,
}

impl Ipam {
    /// The leases kept in `dir` (created on first use).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn err(&self, path: &Path) -> impl Fn(std::io::Error) -> PodNetError {
        let path = path.to_path_buf();
        move |source| PodNetError::Lease {
            path: path.clone(),
            source,
        }
    }

    /// Waits for and takes the IPAM's lock.
    pub fn lock(&self) -> Result<IpamLock, PodNetError> {
        let leases = self.dir.join(LEASES_DIR);
        std::fs::create_dir_all(&leases).map_err(self.err(&leases))?;
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(self.err(&path))?;
        loop {
            // SAFETY: flock on a descriptor owned by `file`; no memory is passed.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(IpamLock { _file: file });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                return Err(self.err(&path)(e));
            }
        }
    }

    /// The lease file of `state`.
    pub fn lease_path(&self, state: &PodNetState) -> PathBuf {
        self.dir
            .join(LEASES_DIR)
            .join(format!("{}.json", state.address))
    }

    /// Every readable lease. A file that does not parse is no lease (and is logged).
    pub fn leases(&self, _lock: &IpamLock) -> Result<Vec<PodNetState>, PodNetError> {
        let dir = self.dir.join(LEASES_DIR);
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(self.err(&dir))?.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<PodNetState>(&b).ok())
            {
                Some(state) => out.push(state),
                None => tracing::warn!("ignoring unreadable lease {}", path.display()),
            }
        }
        out.sort_by_key(|s| s.address);
        Ok(out)
    }

    /// Writes `state`'s lease (whole or not at all: a temporary file renamed in).
    pub fn write(&self, _lock: &IpamLock, state: &PodNetState) -> Result<(), PodNetError> {
        let path = self.lease_path(state);
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec_pretty(state).unwrap_or_default();
        std::fs::write(&tmp, body).map_err(self.err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(self.err(&path))
    }

    /// Removes `state`'s lease; a missing one is fine. Needs no lock: removing one file
    /// is atomic, and nothing else uses a lease whose pod has ended.
    pub fn release(&self, state: &PodNetState) {
        let path = self.lease_path(state);
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != ErrorKind::NotFound {
                tracing::warn!("cannot remove lease {}: {e}", path.display());
            }
        }
    }

    /// Leases pod `pod` (run directory `run_dir`) the addresses of `plan`, after
    /// releasing every lease for which `reclaim` returns true (it tears the stale pod's
    /// network down first). Refuses host ports or a static address another live lease
    /// holds.
    pub fn allocate(
        &self,
        lock: &IpamLock,
        plan: &NetPlan,
        pod: &str,
        run_dir: &Path,
        nameservers: Vec<IpAddr>,
        reclaim: &mut dyn FnMut(&PodNetState) -> bool,
    ) -> Result<PodNetState, PodNetError> {
        let mut live = Vec::new();
        for lease in self.leases(lock)? {
            if reclaim(&lease) {
                self.release(&lease);
            } else {
                live.push(lease);
            }
        }
        for port in &plan.ports {
            if let Some(owner) = live.iter().find(|l| {
                l.ports
                    .iter()
                    .any(|p| p.host == port.host && p.protocol == port.protocol)
            }) {
                return Err(PodNetError::PortTaken {
                    port: format!("{}/{}", port.host, port.protocol.as_str()),
                    pod: owner.pod.clone(),
                });
            }
        }
        let used4: HashSet<_> = live.iter().map(|l| l.address).collect();
        let used6: HashSet<_> = live.iter().filter_map(|l| l.address6).collect();
        let subnet = plan.subnet;
        let address = match plan.address {
            Some(addr) => {
                if let Some(owner) = live.iter().find(|l| l.address == addr) {
                    return Err(PodNetError::AddressTaken {
                        address: addr.to_string(),
                        pod: owner.pod.clone(),
                    });
                }
                addr
            }
            None => (2..subnet.last_host_number())
                .filter_map(|n| subnet.host(n))
                .find(|a| {
                    !used4.contains(a)
                        && plan
                            .subnet6
                            .and_then(|s6| s6.host(subnet.host_number(*a)))
                            .is_none_or(|a6| !used6.contains(&a6))
                })
                .ok_or_else(|| PodNetError::SubnetFull {
                    subnet: subnet.to_string(),
                })?,
        };
        let address6 = match (plan.address6, plan.subnet6) {
            (Some(a6), _) => {
                if let Some(owner) = live.iter().find(|l| l.address6 == Some(a6)) {
                    return Err(PodNetError::AddressTaken {
                        address: a6.to_string(),
                        pod: owner.pod.clone(),
                    });
                }
                Some(a6)
            }
            (None, Some(s6)) => s6.host(subnet.host_number(address)),
            (None, None) => None,
        };
        let state = PodNetState {
            pod: pod.to_string(),
            run_dir: run_dir.to_path_buf(),
            bridge: plan.bridge.clone(),
            tap: ident::tap_name(run_dir),
            chain: ident::chain_name(pod, run_dir),
            mac: ident::format_mac(ident::mac(run_dir)),
            mtu: plan.mtu,
            subnet: subnet.to_string(),
            address,
            prefix_len: subnet.prefix_len,
            gateway: subnet.host(1).unwrap_or(subnet.network),
            subnet6: plan.subnet6.map(|s| s.to_string()),
            address6,
            prefix6_len: plan.subnet6.map(|s| s.prefix_len),
            gateway6: plan.subnet6.and_then(|s| s.host(1)),
            ports: plan.ports.clone(),
            nameservers,
            search: plan.search.clone(),
            dhcp: plan.dhcp,
        };
        self.write(lock, &state)?;
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("crib-ipam-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// A test's IPAM directory, removed when the test ends (pass or fail).
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            Self(temp_dir(name))
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn plan(v: serde_json::Value) -> NetPlan {
        NetPlan::from_json(Some(&v)).unwrap().unwrap()
    }

    fn allocate(ipam: &Ipam, plan: &NetPlan, pod: &str) -> Result<PodNetState, PodNetError> {
        let lock = ipam.lock().unwrap();
        ipam.allocate(&lock, plan, pod, Path::new("/run/x"), vec![], &mut |_| {
            false
        })
    }

    #[test]
    fn first_lease_is_the_third_address_with_the_same_ipv6_host() {
        let scratch = Scratch::new("first");
        let ipam = Ipam::new(&scratch.0);
        let s = allocate(&ipam, &plan(json!({})), "web").unwrap();
        assert_eq!(s.address.to_string(), "10.88.0.2");
        assert_eq!(s.gateway.to_string(), "10.88.0.1");
        assert_eq!(s.address6.unwrap().to_string(), "fd63:7269:6200::2");
        assert_eq!(s.gateway6.unwrap().to_string(), "fd63:7269:6200::1");
        assert!(ipam.lease_path(&s).exists());
        ipam.release(&s);
        assert!(!ipam.lease_path(&s).exists());
    }

    #[test]
    fn concurrent_allocations_get_distinct_addresses() {
        let dir = temp_dir("concurrent");
        let threads: Vec<_> = (0..10)
            .map(|i| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let ipam = Ipam::new(&dir);
                    allocate(&ipam, &plan(json!({})), &format!("p{i}"))
                        .unwrap()
                        .address
                })
            })
            .collect();
        let addrs: HashSet<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(addrs.len(), 10);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn stale_lease_is_reclaimed_and_its_address_reused() {
        let scratch = Scratch::new("stale");
        let ipam = Ipam::new(&scratch.0);
        let p = plan(json!({"ports": ["8080:80"]}));
        let dead = allocate(&ipam, &p, "dead").unwrap();
        let lock = ipam.lock().unwrap();
        let mut reclaimed = Vec::new();
        let s = ipam
            .allocate(&lock, &p, "new", Path::new("/r"), vec![], &mut |l| {
                reclaimed.push(l.pod.clone());
                true
            })
            .unwrap();
        assert_eq!(reclaimed, vec!["dead".to_string()]);
        assert_eq!(s.address, dead.address);
        assert_eq!(ipam.leases(&lock).unwrap().len(), 1);
    }

    #[test]
    fn published_port_of_a_live_pod_is_refused() {
        let scratch = Scratch::new("port");
        let ipam = Ipam::new(&scratch.0);
        allocate(&ipam, &plan(json!({"ports": ["8080:80"]})), "a").unwrap();
        let err = allocate(
            &ipam,
            &plan(json!({"ports": ["9000:90", "8080:81/tcp"]})),
            "b",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("8080/tcp is already published by pod a"),
            "{err}"
        );
        // udp 8080 is another port.
        assert!(allocate(&ipam, &plan(json!({"ports": ["8080:80/udp"]})), "c").is_ok());
    }

    #[test]
    fn static_address_is_used_and_a_taken_one_refused() {
        let scratch = Scratch::new("static");
        let ipam = Ipam::new(&scratch.0);
        let p = plan(json!({"address": "10.88.7.7"}));
        let s = allocate(&ipam, &p, "a").unwrap();
        assert_eq!(s.address.to_string(), "10.88.7.7");
        assert_eq!(s.address6.unwrap().to_string(), "fd63:7269:6200::707");
        let err = allocate(&ipam, &p, "b").unwrap_err().to_string();
        assert!(err.contains("already leased to pod a"), "{err}");
        // A dynamic lease skips it.
        assert_eq!(
            allocate(&ipam, &plan(json!({})), "c")
                .unwrap()
                .address
                .to_string(),
            "10.88.0.2"
        );
    }

    #[test]
    fn full_subnet_says_so() {
        let scratch = Scratch::new("full");
        let ipam = Ipam::new(&scratch.0);
        let p = plan(json!({"subnet": "10.9.0.0/29", "subnet6": null}));
        for i in 0..5 {
            allocate(&ipam, &p, &format!("p{i}")).unwrap();
        }
        let err = allocate(&ipam, &p, "p5").unwrap_err();
        assert!(matches!(err, PodNetError::SubnetFull { .. }), "{err}");
    }
}
