//! The virtio-blk device (virtio 1.2 §5.2): what the user gives ([`BlockConfig`]), what the
//! driver reads (features, [`ConfigSpace`]), and the life cycle. `activate` starts one
//! [`BlockWorker`](super::worker::BlockWorker) thread per queue and returns; `reset` stops
//! them after their I/O drained. No queue work happens here.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{ByteValued, Le16, Le32, Le64};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::composite::CompositeDisk;
use super::engine::composite::CompositeEngine;
use super::engine::sync::SyncEngine;
use super::engine::uring::UringEngine;
use super::engine::BlockEngine;
use super::metrics::{inc, BlockMetrics};
use super::request::DiskLimits;
use super::worker::{BlockWorker, WorkerEvents, WorkerParams};
use super::{
    error_chain, BlockError, DEFAULT_QUEUES, DEFAULT_QUEUE_SIZE, ID_BYTES, IOV_MAX, MAX_QUEUES,
    MAX_QUEUE_SIZE, MIN_QUEUE_SIZE, SECTOR_SIZE,
};
use crate::rate_limiter::RateLimitConfig;
use crate::virtio::{
    run_worker_setup, ActivateError, ActivatedQueue, GuestMemoryMmap, VirtioDevice,
    VirtioInterrupt, WorkerSetup,
};

/// Largest data descriptor the device takes (config `size_max`).
pub const SIZE_MAX_BYTES: u32 = 1 << 20;
/// Block size reported to the guest (config `blk_size`).
pub const BLOCK_SIZE_BYTES: u32 = 512;
/// Largest discard, in sectors (config `max_discard_sectors`).
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX;
/// Largest write-zeroes, in sectors (config `max_write_zeroes_sectors`).
pub const MAX_WRITE_ZEROES_SECTORS: u32 = u32::MAX;
/// Discard granularity, in sectors: 4 KiB, the block of common host filesystems.
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;

mod ioctls {
    // linux/fs.h: #define BLKGETSIZE64 _IOR(0x12, 114, size_t)
    vmm_sys_util::ioctl_ior_nr!(BLKGETSIZE64, 0x12, 114, u64);
}

/// A disk as the user describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// A disk image file or a host block device.
    pub path: PathBuf,
    /// The disk's serial (GET_ID), at most 20 bytes; also names it in logs.
    pub id: String,
    /// Open read-only and offer `VIRTIO_BLK_F_RO`.
    pub readonly: bool,
    /// Open with `O_DIRECT`, bypassing the host page cache.
    pub direct: bool,
    /// Number of queues (`queues=`), 1 to [`MAX_QUEUES`].
    pub queues: u16,
    /// Size of each queue (`queue_size=`), a power of two, [`MIN_QUEUE_SIZE`] to
    /// [`MAX_QUEUE_SIZE`].
    pub queue_size: u16,
    /// Bandwidth and ops limits; `None` for none.
    pub rate_limit: Option<RateLimitConfig>,
}

impl BlockConfig {
    /// A writable, cached disk with one queue of [`DEFAULT_QUEUE_SIZE`] and no rate limit.
    pub fn new(path: impl Into<PathBuf>, id: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            id: id.into(),
            readonly: false,
            direct: false,
            queues: DEFAULT_QUEUES,
            queue_size: DEFAULT_QUEUE_SIZE,
            rate_limit: None,
        }
    }
}

/// `struct virtio_blk_config` (§5.2.4) up to the secure-erase fields; the zoned fields that
/// follow are not offered.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigSpace {
    pub capacity: Le64,
    pub size_max: Le32,
    pub seg_max: Le32,
    pub geometry_cylinders: Le16,
    pub geometry_heads: u8,
    pub geometry_sectors: u8,
    pub blk_size: Le32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: Le16,
    pub opt_io_size: Le32,
    pub writeback: u8,
    pub unused0: u8,
    pub num_queues: Le16,
    pub max_discard_sectors: Le32,
    pub max_discard_seg: Le32,
    pub discard_sector_alignment: Le32,
    pub max_write_zeroes_sectors: Le32,
    pub max_write_zeroes_seg: Le32,
    pub write_zeroes_may_unmap: u8,
    pub unused1: [u8; 3],
    pub max_secure_erase_sectors: Le32,
    pub max_secure_erase_seg: Le32,
    pub secure_erase_sector_alignment: Le32,
}

// SAFETY: `repr(C)` of little-endian integers and byte arrays whose offsets follow their
// natural alignment with no gap and whose size is a multiple of 8 (checked below), so there
// are no padding bytes; every bit pattern is a valid value.
unsafe impl ByteValued for ConfigSpace {}

const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<ConfigSpace>() == 72);
    assert!(offset_of!(ConfigSpace, seg_max) == 12);
    assert!(offset_of!(ConfigSpace, blk_size) == 20);
    assert!(offset_of!(ConfigSpace, num_queues) == 34);
    assert!(offset_of!(ConfigSpace, max_discard_sectors) == 36);
    assert!(offset_of!(ConfigSpace, write_zeroes_may_unmap) == 56);
    assert!(offset_of!(ConfigSpace, max_secure_erase_sectors) == 60);
};

/// Which host I/O engine the queues use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoEngine {
    /// io_uring, or synchronous I/O where the host refuses io_uring.
    #[default]
    Auto,
    /// Synchronous I/O only.
    Sync,
}

/// A running queue worker as the device sees it.
struct WorkerHandle {
    queue: u16,
    kill: EventFd,
    control: EventFd,
    updates: Sender<RateLimitConfig>,
    thread: Option<JoinHandle<()>>,
}

/// A virtio-blk device.
pub struct Block {
    config: BlockConfig,
    /// The VMM's index for this disk, naming its threads (`blk{index}-q{queue}`).
    index: u32,
    file: Arc<File>,
    capacity_sectors: u64,
    config_space: ConfigSpace,
    avail_features: u64,
    acked_features: u64,
    queue_sizes: Vec<u16>,
    serial: [u8; ID_BYTES],
    metrics: Arc<BlockMetrics>,
    rate_limit: Mutex<RateLimitConfig>,
    workers: Vec<WorkerHandle>,
    engine: IoEngine,
    warned_no_uring: bool,
    worker_setup: Option<WorkerSetup>,
    /// Set for a disk made of several read-only files (a pod's layers).
    composite: Option<Arc<CompositeDisk>>,
}

impl Block {
    /// Opens the disk and validates the configuration. Errors name the path or the option
    /// (`id=`, `queues=`, `queue_size=`) and how to fix it.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        Self::create(config, None)
    }

    /// A read-only disk made of `disk`'s parts; `config.path` only names it in messages
    /// and `config.readonly` is forced on.
    pub fn new_composite(mut config: BlockConfig, disk: CompositeDisk) -> Result<Self, BlockError> {
        config.readonly = true;
        config.direct = false;
        Self::create(config, Some(Arc::new(disk)))
    }

    fn create(
        config: BlockConfig,
        composite: Option<Arc<CompositeDisk>>,
    ) -> Result<Self, BlockError> {
        if config.queues == 0 || config.queues > MAX_QUEUES {
            return Err(BlockError::QueueCount {
                value: config.queues,
                max: MAX_QUEUES,
            });
        }
        let qs = config.queue_size;
        if !qs.is_power_of_two() || !(MIN_QUEUE_SIZE..=MAX_QUEUE_SIZE).contains(&qs) {
            return Err(BlockError::QueueSize {
                value: qs,
                min: MIN_QUEUE_SIZE,
                max: MAX_QUEUE_SIZE,
            });
        }
        if config.id.len() > ID_BYTES {
            return Err(BlockError::IdTooLong {
                id: config.id.clone(),
                len: config.id.len(),
                max: ID_BYTES,
            });
        }
        let rate_limit = config.rate_limit.unwrap_or_default();
        rate_limit
            .validate()
            .map_err(|source| BlockError::RateLimit {
                id: config.id.clone(),
                source,
            })?;

        let (file, size) = match composite
            .as_ref()
            .and_then(|disk| disk.first_file().map(|f| (f, disk.size())))
        {
            Some(backing) => backing,
            None => {
                let file = open_disk(&config)?;
                let size = disk_size(&file, &config.path)?;
                (Arc::new(file), size)
            }
        };
        if size % SECTOR_SIZE != 0 {
            return Err(BlockError::UnalignedSize {
                path: config.path.clone(),
                size,
            });
        }
        let capacity_sectors = size / SECTOR_SIZE;

        let mut serial = [0u8; ID_BYTES];
        serial[..config.id.len()].copy_from_slice(config.id.as_bytes());
        let seg_max = seg_max(qs);
        let writable = !config.readonly;
        let config_space = ConfigSpace {
            capacity: capacity_sectors.into(),
            size_max: SIZE_MAX_BYTES.into(),
            seg_max: seg_max.into(),
            blk_size: BLOCK_SIZE_BYTES.into(),
            num_queues: config.queues.into(),
            max_discard_sectors: if writable { MAX_DISCARD_SECTORS } else { 0 }.into(),
            max_discard_seg: u32::from(writable).into(),
            discard_sector_alignment: if writable {
                DISCARD_SECTOR_ALIGNMENT
            } else {
                0
            }
            .into(),
            max_write_zeroes_sectors: if writable {
                MAX_WRITE_ZEROES_SECTORS
            } else {
                0
            }
            .into(),
            max_write_zeroes_seg: u32::from(writable).into(),
            write_zeroes_may_unmap: u8::from(writable),
            ..ConfigSpace::default()
        };

        Ok(Self {
            index: 0,
            file,
            composite,
            capacity_sectors,
            config_space,
            avail_features: features(config.readonly),
            acked_features: 0,
            queue_sizes: vec![qs; usize::from(config.queues)],
            serial,
            metrics: Arc::new(BlockMetrics::default()),
            rate_limit: Mutex::new(rate_limit),
            workers: Vec::new(),
            worker_setup: None,
            engine: IoEngine::default(),
            warned_no_uring: false,
            config,
        })
    }

    /// Sets the VMM's index for this disk (thread names `blk{index}-q{queue}`).
    pub fn with_index(mut self, index: u32) -> Self {
        self.index = index;
        self
    }

    /// Runs `setup` first in every queue worker thread (the VMM's seccomp filter).
    pub fn with_worker_setup(mut self, setup: WorkerSetup) -> Self {
        self.worker_setup = Some(setup);
        self
    }

    /// The VMM's index for this disk.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The configuration the device was built from.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// The disk's size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// What the driver reads from the configuration space.
    pub fn config_space(&self) -> ConfigSpace {
        self.config_space
    }

    /// The device's counters, shared with its workers.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// The limits in force (or to be, at the next activation).
    pub fn rate_limit(&self) -> RateLimitConfig {
        *self
            .rate_limit
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the rate limits, also while the guest runs: each running queue worker gets
    /// the new limits through its control channel and applies them between requests (new
    /// buckets start full). `RateLimitConfig::default()` removes all limits.
    pub fn update_rate_limit(&self, config: RateLimitConfig) -> Result<(), BlockError> {
        config.validate().map_err(|source| BlockError::RateLimit {
            id: self.config.id.clone(),
            source,
        })?;
        *self
            .rate_limit
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = config;
        for worker in &self.workers {
            let sent = worker.updates.send(config).is_ok() && worker.control.write(1).is_ok();
            if !sent {
                return Err(BlockError::WorkerGone {
                    id: self.config.id.clone(),
                    queue: worker.queue,
                });
            }
        }
        Ok(())
    }

    /// Chooses the I/O engine of queues activated from now on (default [`IoEngine::Auto`]);
    /// [`IoEngine::Sync`] suits hosts whose io_uring misbehaves.
    pub fn with_engine(mut self, engine: IoEngine) -> Self {
        self.engine = engine;
        self
    }

    fn limits(&self) -> DiskLimits {
        DiskLimits {
            capacity_sectors: self.capacity_sectors,
            readonly: self.config.readonly,
            discard: !self.config.readonly,
            write_zeroes: !self.config.readonly,
            seg_max: self.config_space.seg_max.to_native(),
            size_max: SIZE_MAX_BYTES,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_sectors: MAX_WRITE_ZEROES_SECTORS,
        }
    }

    fn make_engine(&mut self, mem: &GuestMemoryMmap, size: u16) -> Box<dyn BlockEngine> {
        if let Some(disk) = &self.composite {
            inc(&self.metrics.sync_queues);
            return Box::new(CompositeEngine::new(disk.clone(), mem.clone(), size));
        }
        if self.engine == IoEngine::Auto {
            match UringEngine::new(self.file.clone(), mem.clone(), size) {
                Ok(engine) => {
                    inc(&self.metrics.io_uring_queues);
                    return Box::new(engine);
                }
                Err(e) => {
                    if !self.warned_no_uring {
                        self.warned_no_uring = true;
                        tracing::warn!(
                            disk = %self.config.id,
                            device = self.index,
                            error = %error_chain(&e),
                            "io_uring unavailable; disk uses synchronous I/O"
                        );
                    }
                }
            }
        }
        inc(&self.metrics.sync_queues);
        Box::new(SyncEngine::new(self.file.clone(), mem.clone(), size))
    }

    fn start_worker(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &Arc<dyn VirtioInterrupt>,
        activated: ActivatedQueue,
        event_idx: bool,
    ) -> Result<(), ActivateError> {
        let ActivatedQueue {
            index,
            mut queue,
            kick,
        } = activated;
        queue.set_event_idx(event_idx);
        let engine = self.make_engine(mem, queue.size());
        let params = WorkerParams {
            device: self.index,
            id: Arc::from(self.config.id.as_str()),
            queue_index: index,
            limits: self.limits(),
            serial: self.serial,
            metrics: self.metrics.clone(),
            rate_limit: self.rate_limit(),
        };
        let worker = BlockWorker::new(params, queue, mem.clone(), interrupt.clone(), engine)
            .map_err(|e| ActivateError::Worker(io::Error::other(e)))?;
        let kill = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let control = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let (updates, receiver) = mpsc::channel();
        let events = WorkerEvents {
            kick,
            kill: kill.try_clone().map_err(ActivateError::Worker)?,
            control: control.try_clone().map_err(ActivateError::Worker)?,
            updates: receiver,
        };
        let irq = interrupt.clone();
        let id = self.config.id.clone();
        let setup = self.worker_setup.clone();
        let name = format!("blk{}-q{}", self.index, index);
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                if !run_worker_setup(setup.as_ref(), &name) {
                    irq.set_needs_reset();
                    return;
                }
                let run = std::panic::catch_unwind(AssertUnwindSafe(|| worker.run(events)));
                if run.is_err() {
                    tracing::error!(disk = %id, queue = index, "block queue worker panicked; the device needs a reset");
                    irq.set_needs_reset();
                }
            })
            .map_err(ActivateError::Worker)?;
        self.workers.push(WorkerHandle {
            queue: index,
            kill,
            control,
            updates,
            thread: Some(thread),
        });
        Ok(())
    }

    /// Stops every worker; each waits for its I/O in flight before exiting.
    fn stop_workers(&mut self) {
        for worker in &self.workers {
            if let Err(e) = worker.kill.write(1) {
                tracing::error!(disk = %self.config.id, queue = worker.queue, error = %e, "cannot signal block worker to stop");
            }
        }
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take() {
                if thread.join().is_err() {
                    tracing::error!(disk = %self.config.id, queue = worker.queue, "block worker panicked");
                }
            }
        }
        self.workers.clear();
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let space = self.config_space.as_slice();
        data.fill(0);
        let Some(src) = usize::try_from(offset).ok().and_then(|o| space.get(o..)) else {
            return;
        };
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // No writable field is offered (no CONFIG_WCE).
        tracing::debug!(disk = %self.config.id, offset, len = data.len(), "ignored config space write");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        self.stop_workers();
        if queues.is_empty() {
            return Err(ActivateError::QueueCount { got: 0, needed: 1 });
        }
        for q in &queues {
            if q.index >= self.config.queues || !q.queue.is_valid(&mem) {
                return Err(ActivateError::InvalidQueue(q.index));
            }
        }
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for q in queues {
            if let Err(e) = self.start_worker(&mem, &interrupt, q, event_idx) {
                self.stop_workers();
                return Err(e);
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_workers();
        self.acked_features = 0;
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

/// `seg_max` for a queue: all descriptors but header and status, within the host's limit.
fn seg_max(queue_size: u16) -> u32 {
    let seg = u32::from(queue_size).saturating_sub(2);
    seg.min(u32::try_from(IOV_MAX).unwrap_or(u32::MAX))
}

/// The features a disk offers.
fn features(readonly: bool) -> u64 {
    let mut bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_MQ,
    ]
    .iter()
    .fold(0u64, |acc, &bit| acc | (1u64 << bit));
    if readonly {
        bits |= 1 << VIRTIO_BLK_F_RO;
    } else {
        bits |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
    }
    bits
}

fn open_disk(config: &BlockConfig) -> Result<File, BlockError> {
    // Check the kind before opening: opening a FIFO would block until a writer comes.
    if let Ok(meta) = std::fs::metadata(&config.path) {
        let kind = meta.file_type();
        if !kind.is_file() && !kind.is_block_device() && !kind.is_dir() {
            return Err(BlockError::NotADisk {
                path: config.path.clone(),
            });
        }
    }
    let file = open_disk_file(config)?;
    super::lock::lock_disk(&file, &config.path, config.readonly)?;
    Ok(file)
}

fn open_disk_file(config: &BlockConfig) -> Result<File, BlockError> {
    let mut options = OpenOptions::new();
    options.read(true).write(!config.readonly);
    if config.direct {
        options.custom_flags(libc::O_DIRECT);
    }
    options.open(&config.path).map_err(|source| {
        let hint = match source.raw_os_error() {
            Some(libc::ENOENT) => "no such file; check the path",
            Some(libc::EACCES | libc::EPERM) => {
                "permission denied; fix the permissions or set readonly=on"
            }
            Some(libc::EROFS) => "the filesystem is read-only; set readonly=on",
            Some(libc::EINVAL) if config.direct => {
                "the filesystem does not support O_DIRECT; set direct=off"
            }
            Some(libc::EISDIR) => "it is a directory; give a disk image or block device",
            Some(libc::EBUSY) => "the device is busy (mounted or in use)",
            _ => "check that it is a readable disk image or block device",
        };
        BlockError::Open {
            path: config.path.clone(),
            hint,
            source,
        }
    })
}

fn disk_size(file: &File, path: &Path) -> Result<u64, BlockError> {
    let size_error = |source| BlockError::Size {
        path: path.to_path_buf(),
        source,
    };
    let meta = file.metadata().map_err(size_error)?;
    let kind = meta.file_type();
    if kind.is_block_device() {
        block_device_size(file).map_err(size_error)
    } else if kind.is_file() {
        Ok(meta.len())
    } else {
        Err(BlockError::NotADisk {
            path: path.to_path_buf(),
        })
    }
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 stores one u64 through its argument, which points to `size`, a
    // live u64 on this stack frame for the whole call; `file` is an open block device.
    let ret =
        unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(file, ioctls::BLKGETSIZE64(), &mut size) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;

    use super::*;
    use crate::rate_limiter::TokenBucketConfig;
    use crate::virtio::block::test_utils::{
        guest_memory, header, status_byte, used_entries, wait_for, ChainBuilder,
        RecordingInterrupt, TempDisk, DATA_ADDR, QUEUE_SIZE,
    };
    use crate::virtio::VirtioInterruptType;

    fn config(disk: &TempDisk) -> BlockConfig {
        BlockConfig {
            queue_size: QUEUE_SIZE,
            ..BlockConfig::new(&disk.path, "disk-7")
        }
    }

    fn block(disk: &TempDisk) -> Block {
        Block::new(config(disk))
            .unwrap()
            .with_index(7)
            .with_engine(IoEngine::Sync)
    }

    fn read_u32(b: &Block, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        b.read_config(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn new_missing_file_names_path_and_fix() {
        let cfg = BlockConfig::new("/nonexistent/crib-disk.img", "d");
        let err = Block::new(cfg).err().unwrap().to_string();
        assert!(
            err.contains("/nonexistent/crib-disk.img") && err.contains("check the path"),
            "{err}"
        );
    }

    #[test]
    fn new_directory_is_rejected() {
        let cfg = BlockConfig {
            readonly: true,
            ..BlockConfig::new(std::env::temp_dir(), "d")
        };
        let err = Block::new(cfg).err().unwrap();
        assert!(
            matches!(err, BlockError::NotADisk { .. } | BlockError::Open { .. }),
            "{err}"
        );
    }

    #[test]
    fn new_size_not_multiple_of_512_is_rejected() {
        let disk = TempDisk::new(1000);
        let err = Block::new(config(&disk)).err().unwrap();
        assert!(
            matches!(err, BlockError::UnalignedSize { size: 1000, .. }),
            "{err}"
        );
    }

    #[test]
    fn new_id_longer_than_20_bytes_names_option_and_limit() {
        let disk = TempDisk::new(4096);
        let cfg = BlockConfig {
            id: "a".repeat(21),
            ..config(&disk)
        };
        let err = Block::new(cfg).err().unwrap().to_string();
        assert!(err.contains("id=") && err.contains("20"), "{err}");
    }

    #[test]
    fn new_queue_size_not_power_of_two_names_option() {
        let disk = TempDisk::new(4096);
        let cfg = BlockConfig {
            queue_size: 100,
            ..config(&disk)
        };
        let err = Block::new(cfg).err().unwrap().to_string();
        assert!(err.contains("queue_size=100"), "{err}");
    }

    #[test]
    fn new_zero_queues_names_option() {
        let disk = TempDisk::new(4096);
        let cfg = BlockConfig {
            queues: 0,
            ..config(&disk)
        };
        let err = Block::new(cfg).err().unwrap().to_string();
        assert!(err.contains("queues=0"), "{err}");
    }

    #[test]
    fn new_invalid_rate_limit_is_rejected() {
        let disk = TempDisk::new(4096);
        let cfg = BlockConfig {
            rate_limit: Some(RateLimitConfig {
                bandwidth: Some(TokenBucketConfig::default()),
                ops: None,
            }),
            ..config(&disk)
        };
        assert!(matches!(Block::new(cfg), Err(BlockError::RateLimit { .. })));
    }

    #[test]
    fn features_writable_offer_discard_and_write_zeroes() {
        let disk = TempDisk::new(4096);
        let f = block(&disk).device_features();
        let want = (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
            | (1u64 << VIRTIO_F_VERSION_1);
        assert_eq!(f & want, want);
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn features_readonly_offer_ro_without_discard() {
        let disk = TempDisk::new(4096);
        let cfg = BlockConfig {
            readonly: true,
            ..config(&disk)
        };
        let f = Block::new(cfg).unwrap().device_features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(
            f & ((1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)),
            0
        );
    }

    #[test]
    fn config_space_reports_capacity_and_limits() {
        let disk = TempDisk::new(1 << 20);
        let b = block(&disk);
        let mut capacity = [0u8; 8];
        b.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 2048);
        // seg_max = queue size - 2; blk_size = 512.
        assert_eq!((read_u32(&b, 12), read_u32(&b, 20)), (14, 512));
    }

    #[test]
    fn config_space_discard_fields_match_spec_offsets() {
        let disk = TempDisk::new(4096);
        let b = block(&disk);
        let mut may_unmap = [0u8; 1];
        b.read_config(56, &mut may_unmap);
        // max_discard_seg at 40, max_write_zeroes_seg at 52.
        assert_eq!(
            (read_u32(&b, 40), read_u32(&b, 52), may_unmap[0]),
            (1, 1, 1)
        );
    }

    #[test]
    fn config_space_read_past_end_is_zeroes() {
        let disk = TempDisk::new(4096);
        let mut data = [0xffu8; 8];
        block(&disk).read_config(70, &mut data);
        assert_eq!(data, [0; 8]);
    }

    #[test]
    fn seg_max_is_capped_at_iov_max() {
        assert_eq!((seg_max(256), seg_max(32768)), (254, 1024));
    }

    #[test]
    fn set_acked_features_drops_unoffered_bits() {
        let disk = TempDisk::new(4096);
        let mut b = block(&disk);
        b.set_acked_features(u64::MAX);
        assert_eq!(b.acked_features, b.device_features());
    }

    #[test]
    fn activate_without_queues_is_rejected() {
        let disk = TempDisk::new(4096);
        let mut b = block(&disk);
        let err = b.activate(guest_memory(), RecordingInterrupt::new(), Vec::new());
        assert!(matches!(err, Err(ActivateError::QueueCount { got: 0, .. })));
    }

    #[test]
    fn activate_invalid_queue_is_rejected() {
        let disk = TempDisk::new(4096);
        let mut b = block(&disk);
        let queue = Queue::new(QUEUE_SIZE).unwrap();
        let aq = ActivatedQueue {
            index: 0,
            queue,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        let err = b.activate(guest_memory(), RecordingInterrupt::new(), vec![aq]);
        assert!(matches!(err, Err(ActivateError::InvalidQueue(0))));
    }

    /// Activates `b` on the mock queue; returns the kick eventfd.
    fn activate(
        b: &mut Block,
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<'_, GuestMemoryMmap>,
        irq: &Arc<RecordingInterrupt>,
    ) -> EventFd {
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let aq = ActivatedQueue {
            index: 0,
            queue: vq.create_queue().unwrap(),
            kick: kick.try_clone().unwrap(),
        };
        b.set_acked_features(b.device_features());
        b.activate(mem.clone(), irq.clone(), vec![aq]).unwrap();
        kick
    }

    #[test]
    fn activated_device_serves_a_kick_and_interrupts() {
        let disk = TempDisk::new(1 << 20);
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let irq = RecordingInterrupt::new();
        let mut b = block(&disk);
        let kick = activate(&mut b, &mem, &vq, &irq);

        header(&mem, VIRTIO_BLK_T_IN, 0);
        ChainBuilder::request(&[(DATA_ADDR, 512, true)]).add_to(&vq, 0);
        kick.write(1).unwrap();

        assert!(wait_for(
            || irq.triggered() == vec![VirtioInterruptType::Queue(0)]
        ));
        assert_eq!(used_entries(&vq), vec![(0, 513)]);
        assert_eq!(status_byte(&mem), 0);
    }

    #[test]
    fn activated_device_names_worker_thread() {
        let disk = TempDisk::new(4096);
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let irq = RecordingInterrupt::new();
        let mut b = block(&disk);
        let _kick = activate(&mut b, &mem, &vq, &irq);

        // The thread names itself as it starts.
        let named = wait_for(|| {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .any(|name| name.trim() == "blk7-q0")
        });
        assert!(named);
    }

    #[test]
    fn reset_stops_workers_and_forgets_features() {
        let disk = TempDisk::new(4096);
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let irq = RecordingInterrupt::new();
        let mut b = block(&disk);
        let _kick = activate(&mut b, &mem, &vq, &irq);

        b.reset();

        assert!(b.workers.is_empty());
        assert_eq!(b.acked_features, 0);
    }

    #[test]
    fn update_rate_limit_while_running_releases_held_request() {
        let disk = TempDisk::new(4096);
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let irq = RecordingInterrupt::new();
        let cfg = BlockConfig {
            rate_limit: Some(RateLimitConfig {
                bandwidth: None,
                ops: Some(TokenBucketConfig {
                    size: 1,
                    one_time_burst: 0,
                    refill_time_ms: 3_600_000,
                }),
            }),
            ..config(&disk)
        };
        let mut b = Block::new(cfg).unwrap().with_engine(IoEngine::Sync);
        let kick = activate(&mut b, &mem, &vq, &irq);
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        ChainBuilder::request(&[]).add_to(&vq, 0);
        ChainBuilder::request(&[]).add_to(&vq, 2);
        kick.write(1).unwrap();
        assert!(wait_for(|| used_entries(&vq).len() == 1));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(used_entries(&vq).len(), 1);

        b.update_rate_limit(RateLimitConfig::default()).unwrap();

        assert!(wait_for(|| used_entries(&vq).len() == 2));
        assert_eq!(b.metrics().snapshot().rate_limited, 1);
    }

    #[test]
    fn update_rate_limit_invalid_is_rejected() {
        let disk = TempDisk::new(4096);
        let b = block(&disk);
        let bad = RateLimitConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig::default()),
        };
        assert!(matches!(
            b.update_rate_limit(bad),
            Err(BlockError::RateLimit { .. })
        ));
    }

    #[test]
    fn update_rate_limit_before_activation_is_kept() {
        let disk = TempDisk::new(4096);
        let b = block(&disk);
        let limit = RateLimitConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 1 << 20,
                one_time_burst: 0,
                refill_time_ms: 1000,
            }),
            ops: None,
        };
        b.update_rate_limit(limit).unwrap();
        assert_eq!(b.rate_limit(), limit);
    }
}
