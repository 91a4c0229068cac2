//! Turns a `--disk` into a virtio-blk device.

use devices::virtio::block::{Block, BlockConfig, BlockError, RateLimitConfig, TokenBucketConfig};

use crate::config::DiskConfig;

/// A limit "per second" is a bucket of that size refilled every second.
const REFILL_TIME_MS: u64 = 1000;

/// The rate limit of `disk`, if it has one.
pub fn rate_limit(disk: &DiskConfig) -> Option<RateLimitConfig> {
    let bucket = |size: Option<u64>, burst: Option<u64>| {
        size.map(|size| TokenBucketConfig {
            size,
            one_time_burst: burst.unwrap_or(0),
            refill_time_ms: REFILL_TIME_MS,
        })
    };
    let limits = RateLimitConfig {
        bandwidth: bucket(disk.bandwidth, disk.burst),
        ops: bucket(disk.iops, disk.iops_burst),
    };
    (limits.bandwidth.is_some() || limits.ops.is_some()).then_some(limits)
}

/// Opens the backing file or device of disk number `index`.
pub fn create(index: usize, disk: &DiskConfig) -> Result<Block, BlockError> {
    let index = u32::try_from(index).unwrap_or(u32::MAX);
    Block::new(BlockConfig {
        path: disk.path.clone(),
        id: disk.id.clone(),
        readonly: disk.readonly,
        direct: disk.direct,
        queues: disk.queues,
        queue_size: disk.queue_size,
        rate_limit: rate_limit(disk),
    })
    .map(|block| block.with_index(index))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_disk;

    #[test]
    fn unlimited_disk_has_no_rate_limit() {
        assert_eq!(rate_limit(&parse_disk("path=a,id=b").unwrap()), None);
    }

    #[test]
    fn iops_and_bandwidth_become_one_second_buckets() {
        let limits =
            rate_limit(&parse_disk("path=a,id=b,iops=500,bandwidth=1M,burst=4M").unwrap()).unwrap();
        assert_eq!(
            limits.ops,
            Some(TokenBucketConfig {
                size: 500,
                one_time_burst: 0,
                refill_time_ms: 1000
            })
        );
        assert_eq!(
            limits.bandwidth,
            Some(TokenBucketConfig {
                size: 1 << 20,
                one_time_burst: 4 << 20,
                refill_time_ms: 1000
            })
        );
    }
}
