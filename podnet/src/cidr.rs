//! IPv4 and IPv6 prefixes (`10.88.0.0/16`, `fd63:7269:6200::/64`): parsing, membership
//! and the n-th host, all the IPAM needs.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IPv4 prefix whose address has no host bits set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr4 {
    pub network: Ipv4Addr,
    pub prefix_len: u8,
}

/// An IPv6 prefix whose address has no host bits set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr6 {
    pub network: Ipv6Addr,
    pub prefix_len: u8,
}

/// Why a prefix does not parse; the caller names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("not ADDRESS/LENGTH")]
    NoSlash,
    #[error("not an IP address of this family")]
    BadAddress,
    #[error("the prefix length is not a number from {min} to {max}")]
    BadLength { min: u8, max: u8 },
    #[error("host bits are set; the network address is {0}")]
    HostBits(String),
}

fn split(text: &str, min: u8, max: u8) -> Result<(&str, u8), CidrError> {
    let (addr, len) = text.split_once('/').ok_or(CidrError::NoSlash)?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| (min..=max).contains(l))
        .ok_or(CidrError::BadLength { min, max })?;
    Ok((addr, len))
}

/// Smallest IPv4 subnet: a network, a gateway, a pod and a broadcast address.
pub const MIN_PREFIX4: u8 = 8;
/// Longest IPv4 prefix with room for the gateway and a pod.
pub const MAX_PREFIX4: u8 = 29;
/// Longest IPv6 prefix crib accepts (pods get the same host number as in IPv4).
pub const MAX_PREFIX6: u8 = 120;

impl Cidr4 {
    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0)
    }

    /// Whether `addr` is inside the prefix.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == u32::from(self.network)
    }

    /// Host number `n` (0 is the network address), if the prefix has it.
    pub fn host(&self, n: u32) -> Option<Ipv4Addr> {
        (n <= !self.mask()).then(|| Ipv4Addr::from(u32::from(self.network) | n))
    }

    /// The host number of `addr` (which must be inside).
    pub fn host_number(&self, addr: Ipv4Addr) -> u32 {
        u32::from(addr) & !self.mask()
    }

    /// The broadcast address's host number: the highest.
    pub fn last_host_number(&self) -> u32 {
        !self.mask()
    }
}

impl FromStr for Cidr4 {
    type Err = CidrError;
    fn from_str(text: &str) -> Result<Self, CidrError> {
        let (addr, prefix_len) = split(text, MIN_PREFIX4, MAX_PREFIX4)?;
        let network: Ipv4Addr = addr.parse().map_err(|_| CidrError::BadAddress)?;
        let cidr = Self {
            network,
            prefix_len,
        };
        let masked = Ipv4Addr::from(u32::from(network) & cidr.mask());
        if masked != network {
            return Err(CidrError::HostBits(format!("{masked}/{prefix_len}")));
        }
        Ok(cidr)
    }
}

impl Cidr6 {
    fn mask(&self) -> u128 {
        u128::MAX
            .checked_shl(128 - u32::from(self.prefix_len))
            .unwrap_or(0)
    }

    /// Whether `addr` is inside the prefix.
    pub fn contains(&self, addr: Ipv6Addr) -> bool {
        u128::from(addr) & self.mask() == u128::from(self.network)
    }

    /// Host number `n`, if the prefix has it.
    pub fn host(&self, n: u32) -> Option<Ipv6Addr> {
        (u128::from(n) <= !self.mask())
            .then(|| Ipv6Addr::from(u128::from(self.network) | u128::from(n)))
    }
}

impl FromStr for Cidr6 {
    type Err = CidrError;
    fn from_str(text: &str) -> Result<Self, CidrError> {
        let (addr, prefix_len) = split(text, 8, MAX_PREFIX6)?;
        let network: Ipv6Addr = addr.parse().map_err(|_| CidrError::BadAddress)?;
        let cidr = Self {
            network,
            prefix_len,
        };
        let masked = Ipv6Addr::from(u128::from(network) & cidr.mask());
        if masked != network {
            return Err(CidrError::HostBits(format!("{masked}/{prefix_len}")));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl fmt::Display for Cidr6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr4_parses_and_contains() {
        let net: Cidr4 = "10.88.0.0/16".parse().unwrap();
        assert!(net.contains("10.88.255.1".parse().unwrap()));
        assert!(!net.contains("10.89.0.1".parse().unwrap()));
        assert_eq!(net.host(1), Some("10.88.0.1".parse().unwrap()));
        assert_eq!(net.host(65_536), None);
        assert_eq!(net.last_host_number(), 65_535);
    }

    #[test]
    fn cidr4_with_host_bits_names_the_network() {
        assert_eq!(
            "10.88.0.1/16".parse::<Cidr4>(),
            Err(CidrError::HostBits("10.88.0.0/16".into()))
        );
    }

    #[test]
    fn cidr4_bad_input_is_refused() {
        assert_eq!("10.88.0.0".parse::<Cidr4>(), Err(CidrError::NoSlash));
        assert_eq!("10.88.0/16".parse::<Cidr4>(), Err(CidrError::BadAddress));
        assert!(matches!(
            "10.88.0.0/33".parse::<Cidr4>(),
            Err(CidrError::BadLength { .. })
        ));
        assert!(matches!(
            "10.88.0.0/31".parse::<Cidr4>(),
            Err(CidrError::BadLength { .. })
        ));
    }

    #[test]
    fn cidr6_parses_and_gives_hosts() {
        let net: Cidr6 = "fd63:7269:6200::/64".parse().unwrap();
        assert_eq!(net.host(5), Some("fd63:7269:6200::5".parse().unwrap()));
        assert!(net.contains("fd63:7269:6200::ffff".parse().unwrap()));
        assert!("fd63:7269:6200::1/64".parse::<Cidr6>().is_err());
        assert!("10.0.0.0/64".parse::<Cidr6>().is_err());
    }
}
