//! Names derived from a pod's name, stable across runs: its MAC, its tap and its
//! nftables chain.

/// FNV-1a 64: stable across Rust versions and hosts (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The pod's MAC: locally administered, unicast (`02:` then five bytes of the name's
/// hash), so a pod keeps its MAC, and neighbours' caches stay right, across restarts.
pub fn mac(pod: &str) -> [u8; 6] {
    let h = fnv1a(pod.as_bytes()).to_be_bytes();
    [0x02, h[0], h[1], h[2], h[3], h[4]]
}

/// `02:1a:...` as `crib run --net mac=` takes it.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The pod's host-side tap: `crib` and 8 hex digits of the name's hash (15 bytes is
/// the kernel's limit, IFNAMSIZ less the NUL; a pod name has up to 63).
pub fn tap_name(pod: &str) -> String {
    format!("crib{:08x}", fnv1a(pod.as_bytes()) >> 32)
}

/// The pod's chain in table `inet crib`.
pub fn chain_name(pod: &str) -> String {
    format!("pod-{pod}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_is_stable_local_and_unicast() {
        let a = mac("web");
        assert_eq!(a, mac("web"));
        assert_ne!(a, mac("web2"));
        assert_eq!(a[0] & 0x02, 0x02, "locally administered");
        assert_eq!(a[0] & 0x01, 0, "unicast");
        assert_eq!(format_mac([2, 0xab, 0, 1, 2, 3]), "02:ab:00:01:02:03");
    }

    #[test]
    fn tap_name_fits_ifnamsiz() {
        let long = "a".repeat(63);
        assert_eq!(tap_name(&long).len(), 12);
        assert_ne!(tap_name("a"), tap_name("b"));
        assert_eq!(tap_name("web"), tap_name("web"));
    }
}
