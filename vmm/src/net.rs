//! Turns a `--net` into a virtio-net device on its tap.

use devices::rate_limiter::{RateLimitConfig, TokenBucketConfig};
use devices::virtio::net::{Net, NetConfig as DeviceConfig, NetError};

use crate::config::{parse_mac, NetConfig};

/// A limit "per second" is a bucket of that size refilled every second.
const REFILL_TIME_MS: u64 = 1000;

/// The device's rate limits for `net`'s `bandwidth` and `ops` (per second, each way).
pub fn rate_limit(net: &NetConfig) -> RateLimitConfig {
    let bucket = |size: Option<u64>| {
        size.filter(|s| *s > 0).map(|size| TokenBucketConfig {
            size,
            one_time_burst: 0,
            refill_time_ms: REFILL_TIME_MS,
        })
    };
    RateLimitConfig {
        bandwidth: bucket(net.bandwidth),
        ops: bucket(net.ops),
    }
}

/// Attaches to (or creates) the tap and builds the device (not yet on the bus).
pub fn create(net: &NetConfig) -> Result<Net, NetError> {
    // Checked by the config's validation; a bad MAC here gets a random one.
    let mac = net.mac.as_deref().and_then(|m| parse_mac(m).ok());
    Net::new(DeviceConfig {
        tap: net.interface().to_string(),
        create: net.ifname.is_some(),
        mac,
        queues: net.queues,
        rate_limit: rate_limit(net),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_net;

    #[test]
    fn limits_are_per_second_buckets() {
        let net = parse_net("tap=t0,bandwidth=1M,ops=100").unwrap();
        let limit = rate_limit(&net);
        assert_eq!(
            limit.bandwidth.map(|b| (b.size, b.refill_time_ms)),
            Some((1 << 20, 1000))
        );
        assert_eq!(limit.ops.map(|b| b.size), Some(100));
        assert_eq!(
            rate_limit(&parse_net("tap=t0").unwrap()),
            RateLimitConfig::default()
        );
    }

    #[test]
    fn missing_tap_names_it_and_the_fix() {
        let net = parse_net("tap=crnotap7").unwrap();
        let err = create(&net).err().unwrap().to_string();
        assert!(err.contains("tap crnotap7 does not exist"), "{err}");
        assert!(err.contains("ifname=crnotap7"), "{err}");
    }
}
