//! Names derived from a pod's run directory, stable across runs of the pod and unique
//! among running pods (one run directory has one running pod: its lock says so; two
//! pods of one name in two run roots get different names): its MAC, its tap and its
//! nftables chain.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// FNV-1a 64: stable across Rust versions and hosts (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn hash(run_dir: &Path) -> u64 {
    fnv1a(run_dir.as_os_str().as_bytes())
}

/// The pod's MAC: locally administered, unicast (`02:` then five bytes of the run
/// directory's hash), so a pod keeps its MAC, and neighbours' caches stay right,
/// across restarts.
pub fn mac(run_dir: &Path) -> [u8; 6] {
    let h = hash(run_dir).to_be_bytes();
    [0x02, h[0], h[1], h[2], h[3], h[4]]
}

/// `02:1a:...` as `crib run --net mac=` takes it.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The pod's host-side tap: `crib` and 8 hex digits of the run directory's hash (15
/// bytes is the kernel's limit, IFNAMSIZ less the NUL; a pod name has up to 63).
pub fn tap_name(run_dir: &Path) -> String {
    format!("crib{:08x}", hash(run_dir) >> 32)
}

/// The pod's chain in table `inet crib`: `pod-<name>-<8 hex digits of the run
/// directory's hash>`.
pub fn chain_name(pod: &str, run_dir: &Path) -> String {
    format!("pod-{pod}-{:08x}", hash(run_dir) >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_is_stable_local_and_unicast() {
        let a = mac(Path::new("/run/crib/web"));
        assert_eq!(a, mac(Path::new("/run/crib/web")));
        assert_ne!(a, mac(Path::new("/tmp/other/web")));
        assert_eq!(a[0] & 0x02, 0x02, "locally administered");
        assert_eq!(a[0] & 0x01, 0, "unicast");
        assert_eq!(format_mac([2, 0xab, 0, 1, 2, 3]), "02:ab:00:01:02:03");
    }

    #[test]
    fn tap_name_fits_ifnamsiz() {
        let long = Path::new("/run/crib").join("a".repeat(63));
        assert_eq!(tap_name(&long).len(), 12);
        assert_ne!(tap_name(Path::new("/r/a")), tap_name(Path::new("/r/b")));
        assert_eq!(
            chain_name("web", Path::new("/r/web")),
            chain_name("web", Path::new("/r/web"))
        );
        assert!(chain_name("web", Path::new("/r/web")).starts_with("pod-web-"));
    }
}
