//! virtio-blk device model throughput: 4 KiB random reads at queue depth 32 per queue, on one
//! queue and on four, through the io_uring engine, against a 256 MiB file in the host page
//! cache (compare with `fio --ioengine=io_uring --rw=randread --bs=4k --iodepth=32
//! --direct=0 --size=256M`, with `--numjobs=1` and `--numjobs=4 --group_reporting`).
//!
//! A simulated driver plays the guest on each queue: it keeps 32 read requests in a split
//! queue in plain memory, kicks through the queue's eventfd only when the device's
//! `avail_event` asks for it, and sleeps on the queue's interrupt eventfd (one vector per
//! queue, as with MSI-X) with `used_event` set, as Linux's virtio-blk does. Before it
//! sleeps it polls the used ring as KVM polls a halted vCPU (adaptive, up to `halt_poll_ns`
//! = 200 us; `CRIB_BENCH_HALT_POLL_US=0`: sleep at once). With several
//! queues, each driver runs on its own thread, like one submitting CPU per queue. The device
//! runs exactly as in a VM: a worker thread per queue, epoll, io_uring. Criterion reports the
//! throughput in elements per second, i.e. IOPS over all queues.
//!
//! `cargo bench -p crib-benches --bench block`

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
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

/// Guest memory layout of the simulated driver: one region per queue, each holding the
/// queue's rings and its requests' buffers, at these offsets.
const REGION_BYTES: u64 = 0x4_0000;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const HEADERS: u64 = 0x4000;
const STATUSES: u64 = 0x5000;
const BUFFERS: u64 = 0x1_0000;
const _: () = assert!(BUFFERS + DEPTH as u64 * BLOCK_BYTES as u64 <= REGION_BYTES);

/// The transport side of interrupts: an eventfd per queue, like MSI-X vectors on irqfds.
struct EventFdInterrupt(Vec<EventFd>);

impl VirtioInterrupt for EventFdInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()> {
        match kind {
            VirtioInterruptType::Queue(index) => self.0[usize::from(index)].write(1),
            // The drivers ignore configuration changes; a spurious wake-up is harmless.
            VirtioInterruptType::Config => self.0.iter().try_for_each(|fd| fd.write(1)),
        }
    }

    fn set_needs_reset(&self) {
        eprintln!("block bench: the device reported DEVICE_NEEDS_RESET");
        std::process::abort();
    }
}

/// A 256 MiB temp file of non-zero data, so reads are not of holes; removed on drop.
struct Disk(PathBuf);

impl Disk {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("crib-bench-blk-{}.img", std::process::id()));
        let mut file = File::create(&path).unwrap();
        let chunk: Vec<u8> = (0..1u64 << 20).map(pattern).collect();
        for _ in 0..DISK_BYTES / (1 << 20) {
            file.write_all(&chunk).unwrap();
        }
        file.sync_all().unwrap();
        Self(path)
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The byte [`Disk::new`] writes at `offset`.
fn pattern(offset: u64) -> u8 {
    ((offset % (1 << 20)) % 251) as u8 + 1
}

/// A block device activated with `queues` queues, a [`QueueDriver`] on each.
struct Bench {
    device: Block,
    drivers: Vec<QueueDriver>,
}

impl Bench {
    fn new(disk: &Path, queues: u16) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(
            GuestAddress(0),
            usize::try_from(REGION_BYTES * u64::from(queues)).unwrap(),
        )])
        .unwrap();
        let mut device = Block::new(BlockConfig {
            queues,
            queue_size: QUEUE_SIZE,
            ..BlockConfig::new(disk, "bench")
        })
        .unwrap()
        .with_engine(IoEngine::Auto);
        device.set_acked_features(device.device_features());

        let irqs: Vec<EventFd> = (0..queues).map(|_| EventFd::new(0).unwrap()).collect();
        let mut drivers = Vec::new();
        let mut activated = Vec::new();
        for index in 0..queues {
            let driver = QueueDriver::new(
                mem.clone(),
                index,
                irqs[usize::from(index)].try_clone().unwrap(),
            );
            activated.push(driver.activated_queue());
            drivers.push(driver);
        }
        device
            .activate(mem, Arc::new(EventFdInterrupt(irqs)), activated)
            .unwrap();
        let metrics = device.metrics().snapshot();
        assert_eq!(
            metrics.io_uring_queues,
            u64::from(queues),
            "the device did not get io_uring on this host"
        );
        for driver in &mut drivers {
            driver.start();
        }
        Self { device, drivers }
    }

    /// Completes `per_queue` reads on every queue, each queue driven from its own thread, and
    /// returns the time until the last one finished; `check` as in [`QueueDriver::run`].
    fn run(&mut self, per_queue: u64, check: bool) -> Duration {
        let start = Instant::now();
        std::thread::scope(|s| {
            for driver in &mut self.drivers {
                s.spawn(move || driver.run(per_queue, check));
            }
        });
        start.elapsed()
    }

    /// Kicks sent and interrupt waits, over all queues.
    fn notifications(&self) -> (u64, u64) {
        self.drivers
            .iter()
            .fold((0, 0), |(k, w), d| (k + d.kicks, w + d.waits))
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.device.reset();
    }
}

/// A guest driver keeping `DEPTH` reads in flight on one queue, in that queue's region of
/// guest memory.
struct QueueDriver {
    mem: GuestMemoryMmap,
    index: u16,
    /// Where the queue's region starts in guest memory.
    base: u64,
    kick: EventFd,
    irq: EventFd,
    avail_idx: u16,
    last_used: u16,
    rng: u64,
    /// The sector each slot reads, to check the data.
    sectors: [u64; DEPTH as usize],
    /// Notifications sent to the device, and interrupts waited for.
    kicks: u64,
    waits: u64,
    /// The driver's halt polling, as KVM's for a vCPU.
    halt_poll: HaltPoll,
}

/// KVM's adaptive halt polling (virt/kvm/kvm_main.c, x86 defaults of Linux 6.1): a vCPU
/// that halts is first polled for `window`; the window starts at 0, grows (to 10 us, then
/// doubling, up to `halt_poll_ns` = 200 us) after a halt that ended within the maximum, and
/// drops to 0 after one that outlasted it. `CRIB_BENCH_HALT_POLL_US` sets the maximum; 0
/// turns polling off (a vCPU that sleeps at once).
struct HaltPoll {
    max: Duration,
    window: Duration,
}

impl HaltPoll {
    const GROW_START: Duration = Duration::from_micros(10);

    fn from_env() -> Self {
        let micros = std::env::var("CRIB_BENCH_HALT_POLL_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200);
        Self {
            max: Duration::from_micros(micros),
            window: Duration::ZERO,
        }
    }

    /// Polls for up to the window until `done`; returns whether it came. KVM stops polling
    /// as soon as another task wants the CPU (`single_task_running()`, `need_resched()`);
    /// user space cannot ask that, so each check yields the CPU to any such task.
    fn poll(&self, done: impl Fn() -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < self.window {
            if done() {
                return true;
            }
            std::thread::yield_now();
        }
        false
    }

    /// Adjusts the window after a halt that lasted `halted` (polling and sleeping).
    fn adapt(&mut self, halted: Duration) {
        if halted <= self.window {
            // Ended while polling: keep the window.
        } else if !self.window.is_zero() && halted > self.max {
            self.window = Duration::ZERO;
        } else if self.window < self.max && halted < self.max {
            self.window = (self.window * 2).max(Self::GROW_START).min(self.max);
        }
    }
}

impl QueueDriver {
    fn new(mem: GuestMemoryMmap, index: u16, irq: EventFd) -> Self {
        let driver = Self {
            mem,
            index,
            base: REGION_BYTES * u64::from(index),
            kick: EventFd::new(0).unwrap(),
            irq,
            avail_idx: 0,
            last_used: 0,
            // A different stream of sectors per queue.
            rng: 0x9e37_79b9_7f4a_7c15 ^ (u64::from(index) << 32),
            sectors: [0; DEPTH as usize],
            kicks: 0,
            waits: 0,
            halt_poll: HaltPoll::from_env(),
        };
        // Each slot owns descriptors 3s (header), 3s+1 (data), 3s+2 (status).
        for slot in 0..DEPTH {
            driver.write_chain(slot);
        }
        driver
    }

    /// The guest address `offset` bytes into this queue's region.
    fn at(&self, offset: u64) -> GuestAddress {
        GuestAddress(self.base + offset)
    }

    /// The queue as the transport hands it to the device once the driver set it up.
    fn activated_queue(&self) -> ActivatedQueue {
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.set_size(QUEUE_SIZE);
        let address = |offset| Some(u32::try_from(self.at(offset).0).unwrap());
        queue.set_desc_table_address(address(DESC_TABLE), Some(0));
        queue.set_avail_ring_address(address(AVAIL_RING), Some(0));
        queue.set_used_ring_address(address(USED_RING), Some(0));
        queue.set_ready(true);
        ActivatedQueue {
            index: self.index,
            queue,
            kick: self.kick.try_clone().unwrap(),
        }
    }

    /// Posts the first `DEPTH` requests.
    fn start(&mut self) {
        for slot in 0..DEPTH {
            self.post(slot);
        }
        self.publish();
    }

    fn write_chain(&self, slot: u16) {
        let s = u64::from(slot);
        let descs = [
            (self.at(HEADERS + 16 * s), 16, VRING_DESC_F_NEXT),
            (
                self.buffer(slot),
                BLOCK_BYTES,
                VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            ),
            (self.at(STATUSES + s), 1, VRING_DESC_F_WRITE),
        ];
        for (i, (addr, len, flags)) in descs.into_iter().enumerate() {
            let index = 3 * slot + i as u16;
            let at = self.at(DESC_TABLE + 16 * u64::from(index));
            self.mem.write_obj(addr.0, at).unwrap();
            self.mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
            self.mem
                .write_obj(index + 1, GuestAddress(at.0 + 14))
                .unwrap();
        }
    }

    fn buffer(&self, slot: u16) -> GuestAddress {
        self.at(BUFFERS + u64::from(BLOCK_BYTES) * u64::from(slot))
    }

    /// Writes a fresh random-sector read into `slot` and puts it in the avail ring.
    fn post(&mut self, slot: u16) {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let blocks = DISK_BYTES / u64::from(BLOCK_BYTES);
        let sector = (self.rng % blocks) * u64::from(BLOCK_BYTES / 512);
        self.sectors[usize::from(slot)] = sector;
        let header = self.at(HEADERS + 16 * u64::from(slot));
        self.mem.write_obj(VIRTIO_BLK_T_IN, header).unwrap();
        self.mem
            .write_obj(sector, GuestAddress(header.0 + 8))
            .unwrap();
        let entry = self.at(AVAIL_RING + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE));
        self.mem.write_obj(3 * slot, entry).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Publishes the avail index and kicks if the device asked to be (EVENT_IDX).
    fn publish(&mut self) {
        let idx = self.at(AVAIL_RING + 2);
        let old: u16 = self.mem.load(idx, Ordering::Relaxed).unwrap();
        self.mem
            .store(self.avail_idx, idx, Ordering::Release)
            .unwrap();
        std::sync::atomic::fence(Ordering::SeqCst);
        let avail_event: u16 = self
            .mem
            .load(
                self.at(USED_RING + 4 + 8 * u64::from(QUEUE_SIZE)),
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
            .load(self.at(USED_RING + 2), Ordering::Acquire)
            .unwrap()
    }

    /// Completes `count` reads (re-posting each at once); with `check`, compares each buffer
    /// with what [`Disk::new`] wrote there.
    fn run(&mut self, count: u64, check: bool) {
        let mut done = 0u64;
        while done < count {
            let used = self.used_idx();
            if used == self.last_used {
                // The guest's vCPU halts until the interrupt. KVM does not put it to sleep
                // at once: it polls first (halt polling), so a completion within the
                // window wakes no one.
                let halted = Instant::now();
                if !self.halt_poll.poll(|| self.used_idx() != used) {
                    // Ask for an interrupt at the next completion, then check once more.
                    self.mem
                        .store(
                            self.last_used,
                            self.at(AVAIL_RING + 4 + 2 * u64::from(QUEUE_SIZE)),
                            Ordering::Release,
                        )
                        .unwrap();
                    std::sync::atomic::fence(Ordering::SeqCst);
                    if self.used_idx() == self.last_used {
                        self.irq.read().unwrap();
                        self.waits += 1;
                    }
                }
                self.halt_poll.adapt(halted.elapsed());
                continue;
            }
            while self.last_used != used {
                let elem = self.at(USED_RING + 4 + 8 * u64::from(self.last_used % QUEUE_SIZE));
                let head: u32 = self.mem.read_obj(elem).unwrap();
                let slot = (head / 3) as u16;
                let status: u8 = self
                    .mem
                    .read_obj(self.at(STATUSES + u64::from(slot)))
                    .unwrap();
                assert_eq!(status, 0, "read failed on queue {}", self.index);
                if check {
                    self.check(slot);
                }
                self.last_used = self.last_used.wrapping_add(1);
                done += 1;
                self.post(slot);
            }
            self.publish();
        }
    }

    fn check(&self, slot: u16) {
        let mut got = [0u8; 16];
        self.mem.read_slice(&mut got, self.buffer(slot)).unwrap();
        let offset = self.sectors[usize::from(slot)] * 512;
        let want: Vec<u8> = (offset..offset + 16).map(pattern).collect();
        assert_eq!(
            got.as_slice(),
            want,
            "wrong data at offset {offset} on queue {}",
            self.index
        );
    }
}

fn randread_4k_qd32(c: &mut Criterion) {
    let disk = Disk::new();
    let mut group = c.benchmark_group("virtio-blk");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));

    for queues in [1u16, 4] {
        let mut bench = Bench::new(&disk.0, queues);
        // Warm up, checking that the reads return the disk's data on every queue.
        bench.run(100_000, true);

        // One iteration is one read on every queue.
        group.throughput(Throughput::Elements(u64::from(queues)));
        group.bench_function(format!("randread-4k-qd32-{queues}q-io_uring"), |b| {
            b.iter_custom(|iters| bench.run(iters, false))
        });

        let per_queue = 500_000 / u64::from(queues);
        let n = per_queue * u64::from(queues);
        let (kicks, waits) = bench.notifications();
        let elapsed = bench.run(per_queue, false);
        let (kicks_after, waits_after) = bench.notifications();
        println!(
            "virtio-blk randread 4k qd32 {queues}q io_uring: {:.0} IOPS ({n} reads in {:.2?}; {:.1} reads per kick, {:.1} per interrupt wait; driver halt-polls up to {} us)",
            n as f64 / elapsed.as_secs_f64(),
            elapsed,
            n as f64 / (kicks_after - kicks).max(1) as f64,
            n as f64 / (waits_after - waits).max(1) as f64,
            HaltPoll::from_env().max.as_micros(),
        );
    }
    group.finish();
}

criterion_group!(benches, randread_4k_qd32);
criterion_main!(benches);
