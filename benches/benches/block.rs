//! virtio-blk device model throughput: 4 KiB random reads at queue depth 32 on one queue,
//! through the io_uring engine, against a 256 MiB file in the host page cache (compare with
//! `fio --ioengine=io_uring --rw=randread --bs=4k --iodepth=32 --direct=0 --size=256M`).
//!
//! A simulated driver plays the guest: it keeps 32 read requests in a split queue in plain
//! memory, kicks through an eventfd only when the device's `avail_event` asks for it, and
//! sleeps on the interrupt eventfd with `used_event` set, as Linux's virtio-blk does. The
//! device runs exactly as in a VM: its worker thread, epoll, io_uring. Criterion reports the
//! throughput in elements per second, i.e. IOPS.
//!
//! `cargo bench -p crib-benches --bench block`

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use devices::virtio::block::{Block, BlockConfig, IoEngine};
use devices::virtio::{
    ActivatedQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const DISK_BYTES: u64 = 256 << 20;
const BLOCK_BYTES: u32 = 4096;
const DEPTH: u16 = 32;
const QUEUE_SIZE: u16 = 256;
/// virtio-blk request types and flags (virtio 1.2 §5.2.6, §2.7.5).
const VIRTIO_BLK_T_IN: u32 = 0;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// Guest memory layout of the simulated driver.
const MEM_BYTES: usize = 1 << 20;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const HEADERS: u64 = 0x4000;
const STATUSES: u64 = 0x5000;
const BUFFERS: u64 = 0x1_0000;

/// The transport side of interrupts: an eventfd, like the irqfd in a VM.
struct EventFdInterrupt(EventFd);

impl VirtioInterrupt for EventFdInterrupt {
    fn trigger(&self, _kind: VirtioInterruptType) -> std::io::Result<()> {
        self.0.write(1)
    }

    fn set_needs_reset(&self) {
        eprintln!("block bench: the device reported DEVICE_NEEDS_RESET");
        std::process::abort();
    }
}

/// A guest driver keeping `DEPTH` reads in flight.
struct Driver {
    mem: GuestMemoryMmap,
    kick: EventFd,
    irq: Arc<EventFdInterrupt>,
    avail_idx: u16,
    last_used: u16,
    rng: u64,
    /// The sector each slot reads, to check the data once.
    sectors: [u64; DEPTH as usize],
    /// Notifications sent to the device, and interrupts waited for.
    kicks: u64,
    waits: u64,
    device: Block,
    disk: PathBuf,
}

impl Driver {
    fn new() -> Self {
        let disk = std::env::temp_dir().join(format!("crib-bench-blk-{}.img", std::process::id()));
        fill_disk(&disk);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).unwrap();
        let mut device = Block::new(BlockConfig {
            queue_size: QUEUE_SIZE,
            ..BlockConfig::new(&disk, "bench")
        })
        .unwrap()
        .with_engine(IoEngine::Auto);
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.set_size(QUEUE_SIZE);
        queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
        queue.set_ready(true);
        let kick = EventFd::new(0).unwrap();
        let irq = Arc::new(EventFdInterrupt(EventFd::new(0).unwrap()));
        device.set_acked_features(device.device_features());
        let activated = ActivatedQueue {
            index: 0,
            queue,
            kick: kick.try_clone().unwrap(),
        };
        device
            .activate(mem.clone(), irq.clone(), vec![activated])
            .unwrap();
        let metrics = device.metrics().snapshot();
        assert_eq!(
            metrics.io_uring_queues, 1,
            "the device did not get io_uring on this host"
        );

        let mut driver = Self {
            mem,
            kick,
            irq,
            avail_idx: 0,
            last_used: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
            sectors: [0; DEPTH as usize],
            kicks: 0,
            waits: 0,
            device,
            disk,
        };
        // Each slot owns descriptors 3s (header), 3s+1 (data), 3s+2 (status).
        for slot in 0..DEPTH {
            driver.write_chain(slot);
        }
        for slot in 0..DEPTH {
            driver.post(slot);
        }
        driver.publish();
        driver
    }

    fn write_chain(&self, slot: u16) {
        let s = u64::from(slot);
        let descs = [
            (HEADERS + 16 * s, 16, VRING_DESC_F_NEXT),
            (
                BUFFERS + u64::from(BLOCK_BYTES) * s,
                BLOCK_BYTES,
                VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            ),
            (STATUSES + s, 1, VRING_DESC_F_WRITE),
        ];
        for (i, (addr, len, flags)) in descs.into_iter().enumerate() {
            let index = 3 * slot + i as u16;
            let at = GuestAddress(DESC_TABLE + 16 * u64::from(index));
            self.mem.write_obj(addr, at).unwrap();
            self.mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
            self.mem
                .write_obj(index + 1, GuestAddress(at.0 + 14))
                .unwrap();
        }
    }

    /// Writes a fresh random-sector read into `slot` and puts it in the avail ring.
    fn post(&mut self, slot: u16) {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let blocks = DISK_BYTES / u64::from(BLOCK_BYTES);
        let sector = (self.rng % blocks) * u64::from(BLOCK_BYTES / 512);
        self.sectors[usize::from(slot)] = sector;
        let header = GuestAddress(HEADERS + 16 * u64::from(slot));
        self.mem.write_obj(VIRTIO_BLK_T_IN, header).unwrap();
        self.mem
            .write_obj(sector, GuestAddress(header.0 + 8))
            .unwrap();
        let entry = AVAIL_RING + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem.write_obj(3 * slot, GuestAddress(entry)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Publishes the avail index and kicks if the device asked to be (EVENT_IDX).
    fn publish(&mut self) {
        let old: u16 = self
            .mem
            .load(GuestAddress(AVAIL_RING + 2), Ordering::Relaxed)
            .unwrap();
        self.mem
            .store(
                self.avail_idx,
                GuestAddress(AVAIL_RING + 2),
                Ordering::Release,
            )
            .unwrap();
        std::sync::atomic::fence(Ordering::SeqCst);
        let avail_event: u16 = self
            .mem
            .load(
                GuestAddress(USED_RING + 4 + 8 * u64::from(QUEUE_SIZE)),
                Ordering::Acquire,
            )
            .unwrap();
        let new = self.avail_idx;
        // vring_need_event(event, new, old)
        if new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old) {
            self.kick.write(1).unwrap();
            self.kicks += 1;
        }
    }

    fn used_idx(&self) -> u16 {
        self.mem
            .load(GuestAddress(USED_RING + 2), Ordering::Acquire)
            .unwrap()
    }

    /// Completes `count` reads (re-posting each at once) and returns the time it took;
    /// with `check`, compares each buffer with what [`fill_disk`] wrote there.
    fn run(&mut self, count: u64, check: bool) -> Duration {
        let start = Instant::now();
        let mut done = 0u64;
        while done < count {
            let used = self.used_idx();
            if used == self.last_used {
                // Ask for an interrupt at the next completion, then check once more.
                self.mem
                    .store(
                        self.last_used,
                        GuestAddress(AVAIL_RING + 4 + 2 * u64::from(QUEUE_SIZE)),
                        Ordering::Release,
                    )
                    .unwrap();
                std::sync::atomic::fence(Ordering::SeqCst);
                if self.used_idx() == self.last_used {
                    self.irq.0.read().unwrap();
                    self.waits += 1;
                }
                continue;
            }
            while self.last_used != used {
                let elem = USED_RING + 4 + 8 * u64::from(self.last_used % QUEUE_SIZE);
                let head: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
                let slot = (head / 3) as u16;
                let status: u8 = self
                    .mem
                    .read_obj(GuestAddress(STATUSES + u64::from(slot)))
                    .unwrap();
                assert_eq!(status, 0, "read failed");
                if check {
                    self.check(slot);
                }
                self.last_used = self.last_used.wrapping_add(1);
                done += 1;
                self.post(slot);
            }
            self.publish();
        }
        start.elapsed()
    }
}

impl Driver {
    fn check(&self, slot: u16) {
        let mut got = [0u8; 16];
        let buffer = GuestAddress(BUFFERS + u64::from(BLOCK_BYTES) * u64::from(slot));
        self.mem.read_slice(&mut got, buffer).unwrap();
        let offset = self.sectors[usize::from(slot)] * 512;
        let want: Vec<u8> = (offset..offset + 16).map(pattern).collect();
        assert_eq!(got.as_slice(), want, "wrong data at offset {offset}");
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.device.reset();
        let _ = std::fs::remove_file(&self.disk);
    }
}

/// The byte [`fill_disk`] writes at `offset`.
fn pattern(offset: u64) -> u8 {
    ((offset % (1 << 20)) % 251) as u8 + 1
}

/// A 256 MiB file of non-zero data, so reads are not of holes.
fn fill_disk(path: &PathBuf) {
    let mut file = File::create(path).unwrap();
    let chunk: Vec<u8> = (0..1u64 << 20).map(pattern).collect();
    for _ in 0..DISK_BYTES / (1 << 20) {
        file.write_all(&chunk).unwrap();
    }
    file.sync_all().unwrap();
}

fn randread_4k_qd32(c: &mut Criterion) {
    let mut driver = Driver::new();
    // Warm up, checking that the reads return the disk's data.
    driver.run(100_000, true);

    let mut group = c.benchmark_group("virtio-blk");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    group.throughput(Throughput::Elements(1));
    group.bench_function("randread-4k-qd32-io_uring", |b| {
        b.iter_custom(|iters| driver.run(iters, false))
    });
    group.finish();

    let n = 500_000;
    let (kicks, waits) = (driver.kicks, driver.waits);
    let elapsed = driver.run(n, false);
    println!(
        "virtio-blk randread 4k qd32 io_uring: {:.0} IOPS ({n} reads in {:.2?}; {:.1} reads per kick, {:.1} per interrupt wait)",
        n as f64 / elapsed.as_secs_f64(),
        elapsed,
        n as f64 / (driver.kicks - kicks).max(1) as f64,
        n as f64 / (driver.waits - waits).max(1) as f64,
    );
}

criterion_group!(benches, randread_4k_qd32);
criterion_main!(benches);
