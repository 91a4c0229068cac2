//! Turns a `--disk` into a virtio-blk device, and keeps a handle on it for the API's
//! live rate-limit updates ([`SharedBlock`]).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use devices::virtio::block::{
    Block, BlockConfig, BlockError, BlockMetrics, CompositeDisk, RateLimitConfig, TokenBucketConfig,
};
use devices::virtio::{
    ActivateError, ActivatedQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt,
};

use crate::config::DiskConfig;

/// A limit "per second" is a bucket of that size refilled every second.
const REFILL_TIME_MS: u64 = 1000;

/// A disk's limits as the user gives them (`--disk iops=..`, the API's rate-limit body).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskLimits {
    /// Operations per second; `None` or 0 for no limit.
    pub iops: Option<u64>,
    /// Bytes per second; `None` or 0 for no limit.
    pub bandwidth: Option<u64>,
    /// One-time burst above `bandwidth`, in bytes.
    pub burst: Option<u64>,
    /// One-time burst above `iops`, in operations.
    pub iops_burst: Option<u64>,
}

impl DiskLimits {
    /// The limits of `disk`.
    pub fn of(disk: &DiskConfig) -> Self {
        Self {
            iops: disk.iops,
            bandwidth: disk.bandwidth,
            burst: disk.burst,
            iops_burst: disk.iops_burst,
        }
    }

    /// The device's token buckets: each limit per second is a bucket of that size
    /// refilled every second; `None` if nothing is limited.
    pub fn to_rate_limit(self) -> Option<RateLimitConfig> {
        let bucket = |size: Option<u64>, burst: Option<u64>| {
            size.filter(|s| *s > 0).map(|size| TokenBucketConfig {
                size,
                one_time_burst: burst.unwrap_or(0),
                refill_time_ms: REFILL_TIME_MS,
            })
        };
        let limits = RateLimitConfig {
            bandwidth: bucket(self.bandwidth, self.burst),
            ops: bucket(self.iops, self.iops_burst),
        };
        (limits.bandwidth.is_some() || limits.ops.is_some()).then_some(limits)
    }
}

/// The rate limit of `disk`, if it has one.
pub fn rate_limit(disk: &DiskConfig) -> Option<RateLimitConfig> {
    DiskLimits::of(disk).to_rate_limit()
}

/// A [`Block`] the transport drives and the VMM can still reach (for rate-limit updates
/// and metrics). The mutex is taken on the transport's control path (configuration
/// reads, activate, reset) and by an update, never per request: queue work happens on the
/// device's own worker threads.
pub struct SharedBlock {
    block: Arc<Mutex<Block>>,
    queue_sizes: Vec<u16>,
}

impl SharedBlock {
    /// Wraps `block`; the returned `Arc` is the VMM's handle on it.
    pub fn new(block: Block) -> (Self, Arc<Mutex<Block>>) {
        let queue_sizes = block.queue_max_sizes().to_vec();
        let block = Arc::new(Mutex::new(block));
        (
            Self {
                block: block.clone(),
                queue_sizes,
            },
            block,
        )
    }

    fn lock(&self) -> MutexGuard<'_, Block> {
        self.block.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl VirtioDevice for SharedBlock {
    fn device_type(&self) -> u32 {
        self.lock().device_type()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.lock().device_features()
    }

    fn set_acked_features(&mut self, features: u64) {
        self.lock().set_acked_features(features)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.lock().read_config(offset, data)
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.lock().write_config(offset, data)
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        self.lock().activate(mem, interrupt, queues)
    }

    fn reset(&mut self) {
        self.lock().reset()
    }
}

/// What the VMM keeps of each disk.
pub struct DiskHandle {
    pub id: String,
    pub block: Arc<Mutex<Block>>,
    pub metrics: Arc<BlockMetrics>,
}

/// Opens the backing file or device of disk number `index`.
pub fn create(index: usize, disk: &DiskConfig) -> Result<Block, BlockError> {
    let index = u32::try_from(index).unwrap_or(u32::MAX);
    let config = BlockConfig {
        path: disk.path.clone(),
        id: disk.id.clone(),
        readonly: disk.readonly,
        direct: disk.direct,
        queues: disk.queues,
        queue_size: disk.queue_size,
        rate_limit: rate_limit(disk),
    };
    let block = if disk.composite.is_empty() {
        Block::new(config)?
    } else {
        Block::new_composite(config, CompositeDisk::open(&disk.composite)?)?
    };
    Ok(block.with_index(index))
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
    fn zero_limits_are_no_limit() {
        let limits = DiskLimits {
            iops: Some(0),
            bandwidth: Some(0),
            ..DiskLimits::default()
        };
        assert_eq!(limits.to_rate_limit(), None);
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
