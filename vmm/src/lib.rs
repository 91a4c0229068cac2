//! The running VM: configuration, KVM VM and vCPUs, guest memory, devices, the VMM
//! thread's event loop, the API and life-cycle control, seccomp. The binary `crib` is a
//! thin CLI over [`run`].

pub mod api;
pub mod bar_relocation;
pub mod bar_space;
pub mod block;
pub mod config;
pub mod console;
pub mod control;
pub mod device_manager;
pub mod docker_proxy;
pub mod fs;
pub mod interrupts;
pub mod jail;
pub mod jail_ids;
pub mod memory;
pub mod net;
pub mod pod;
pub mod pod_images;
pub mod pod_net;
pub mod seccomp;
pub mod vcpu;
pub mod vfio;
pub mod vm;
pub mod vsock;

use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::legacy::acpi_power::{
    ACPI_POWER_PORT_BASE, ACPI_POWER_PORT_LEN, RESET_OFFSET, RESET_VALUE, SLEEP_CONTROL_OFFSET,
    SLEEP_STATUS_OFFSET,
};
use devices::legacy::boot_marker::{BootTimes, BOOT_MARKER_PORT};
use devices::legacy::ged::{GED_IRQ, GED_PORT};
use devices::legacy::i8042::{I8042_PORT_BASE, I8042_PORT_LEN};
use devices::legacy::pvpanic::PVPANIC_PORT;
use devices::legacy::serial::{COM1_IRQ, COM1_PORT_BASE, COM1_PORT_LEN};
use devices::legacy::{
    AcpiPower, BootMarker, ConsoleOutput, ConsoleSink, Ged, GedEvents, PvPanic, Serial, I8042,
};
use devices::{Bus, BusDevice, BusError, ExitReason, VmExit};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::block::DiskHandle;
use crate::config::{ConsoleConfig, VmConfig};
use crate::control::{Controller, RunOutcome};
use crate::vcpu::{Vcpu, VcpuBuses, VcpuPause};
use crate::vm::Vm;

/// Everything that can stop a VM from starting.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot open {what} {path}")]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{what} {path} is not a regular file: give a file (a FIFO or device cannot be loaded)"
    )]
    NotAFile { what: &'static str, path: PathBuf },
    #[error("cannot start the thread that loads the kernel and initrd")]
    GuestLoader(#[source] std::io::Error),
    #[error("memory={bytes} bytes is more than this host has ({host} bytes of RAM and swap): give a smaller --memory")]
    MemoryBeyondHost { bytes: u64, host: u64 },
    #[error("cannot load kernel {path}")]
    Kernel {
        path: PathBuf,
        #[source]
        source: boot::kernel::KernelError,
    },
    #[error("cannot load initrd {path}")]
    Initrd {
        path: PathBuf,
        #[source]
        source: boot::kernel::KernelError,
    },
    #[error("initrd {path} is larger than 4 GiB")]
    InitrdTooLarge { path: PathBuf },
    #[error("invalid kernel command line")]
    Cmdline(#[source] boot::cmdline::CmdlineError),
    #[error("cannot create guest memory")]
    Memory(#[source] memory::MemoryError),
    #[error("cannot create the entropy device (--rng)")]
    Rng(#[source] devices::rate_limiter::RateLimiterError),
    #[error("cannot write the boot page tables")]
    Paging(#[source] boot::paging::PagingError),
    #[error("cannot write the boot GDT")]
    Gdt(#[source] vm_memory::GuestMemoryError),
    #[error("cannot write the ACPI tables")]
    Acpi(#[source] boot::acpi::AcpiError),
    #[error("cannot write the zero page")]
    ZeroPage(#[source] boot::zero_page::ZeroPageError),
    #[error("cannot create the VM")]
    Vm(#[source] vm::VmError),
    #[error("cannot create a vCPU")]
    Vcpu(#[source] vcpu::VcpuError),
    #[error("cannot place a device on the bus")]
    Bus(#[source] BusError),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("the VMM event loop failed")]
    EventLoop(#[source] event_manager::Error),
    #[error("cannot set up a device")]
    Device(#[source] device_manager::DeviceError),
    #[error("invalid pod spec {path}")]
    Pod {
        path: PathBuf,
        #[source]
        source: initramfs::PodArchiveError,
    },
    #[error("--pod needs --initrd: the pod spec is appended to the initramfs")]
    PodWithoutInitrd,
    #[error("cannot open disk {id}")]
    Disk {
        id: String,
        #[source]
        source: devices::virtio::block::BlockError,
    },
    #[error("cannot set up --vsock")]
    Vsock(#[source] devices::virtio::vsock::VsockError),
    #[error("cannot set up a virtio-fs share")]
    Fs(#[source] fs::FsSetupError),
    #[error("cannot set up --net tap {tap}")]
    Net {
        tap: String,
        #[source]
        source: devices::virtio::net::NetError,
    },
    #[error("cannot set up VFIO passthrough (--vfio)")]
    Vfio(#[source] vfio::VfioError),
    #[error("cannot set up --docker-socket")]
    DockerSocket(#[source] docker_proxy::DockerProxyError),
    #[error("cannot set up --api-socket")]
    Api(#[source] api::ApiServerError),
    #[error("cannot set up life-cycle control")]
    Control(#[source] control::ControlError),
    #[error("cannot set up seccomp (--seccomp off disables it, for debugging only)")]
    Seccomp(#[source] seccomp::SeccompError),
    #[error("cannot jail the VM (docs/JAIL.md)")]
    Jail(#[source] jail::JailError),
}

/// Opens an input file (kernel, initrd, pod spec). Only a regular file: a FIFO would block
/// the open (or the read) forever, a device would read without end.
fn open(what: &'static str, path: &Path) -> Result<File, VmmError> {
    let open_error = |source| VmmError::Open {
        what,
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(open_error)?;
    if !meta.is_file() {
        return Err(VmmError::NotAFile {
            what,
            path: path.to_path_buf(),
        });
    }
    File::open(path).map_err(open_error)
}

/// Refuses guest RAM larger than the host's RAM and swap together: such a VM would only
/// run until the guest touched enough of it for the OOM killer to end crib.
fn check_host_memory(bytes: u64) -> Result<(), VmmError> {
    let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo") else {
        return Ok(());
    };
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib.saturating_mul(1024))
    };
    let (Some(ram), swap) = (field("MemTotal:"), field("SwapTotal:").unwrap_or(0)) else {
        return Ok(());
    };
    let host = ram.saturating_add(swap);
    if bytes > host {
        return Err(VmmError::MemoryBeyondHost { bytes, host });
    }
    Ok(())
}

fn console_sink(config: &ConsoleConfig) -> Result<ConsoleSink, VmmError> {
    Ok(match config {
        ConsoleConfig::Stdout => ConsoleSink::Stdout,
        ConsoleConfig::Off => ConsoleSink::Off,
        ConsoleConfig::File(path) => ConsoleSink::File(
            File::options()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmmError::Open {
                    what: "console file",
                    path: path.clone(),
                    source,
                })?,
        ),
    })
}

/// Where the kernel is entered.
struct BootEntry {
    entry: u64,
    pml4: u64,
}

/// A boot RNG seed from the host's getrandom (never blocks once the host pool is ready).
fn host_random_seed() -> std::io::Result<[u8; boot::zero_page::RNG_SEED_BYTES]> {
    let mut seed = [0u8; boot::zero_page::RNG_SEED_BYTES];
    let mut filled = 0;
    while filled < seed.len() {
        let rest = &mut seed[filled..];
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes for the call.
        let ret = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(ret) {
            Ok(n) => filled += n,
            Err(_) => {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
    Ok(seed)
}

/// What the loader thread put into guest memory: the kernel, and the initrd (with the pod
/// spec archive appended) with its address and length.
struct LoadedImages {
    kernel: boot::kernel::LoadedKernel,
    initrd: Option<(GuestAddress, u64)>,
}

/// The guest's boot images, opened (and the pod spec read) before the loader thread starts,
/// so that a missing file fails the start before any device exists.
struct BootImages {
    kernel: File,
    kernel_path: PathBuf,
    /// Guest RAM, which bounds where the initrd can go.
    memory_bytes: u64,
    /// The initrd, its path and its length.
    initrd: Option<(File, PathBuf, u64)>,
    /// The pod spec as a cpio archive, appended to the initrd.
    pod_archive: Option<Vec<u8>>,
}

fn open_boot_images(config: &VmConfig) -> Result<BootImages, VmmError> {
    let kernel = open("kernel", &config.kernel)?;
    let pod_archive = match &config.pod {
        Some(path) => {
            let mut spec = Vec::new();
            open("pod spec", path)?
                .read_to_end(&mut spec)
                .map_err(|source| VmmError::Open {
                    what: "pod spec",
                    path: path.clone(),
                    source,
                })?;
            let archive = initramfs::pod_archive(&spec).map_err(|source| VmmError::Pod {
                path: path.clone(),
                source,
            })?;
            Some(archive)
        }
        None => None,
    };
    let initrd = match &config.initrd {
        Some(path) => {
            let file = open("initrd", path)?;
            let size = file
                .metadata()
                .map_err(|source| VmmError::Open {
                    what: "initrd",
                    path: path.clone(),
                    source,
                })?
                .len();
            Some((file, path.clone(), size))
        }
        None if pod_archive.is_some() => return Err(VmmError::PodWithoutInitrd),
        None => None,
    };
    Ok(BootImages {
        kernel,
        kernel_path: config.kernel.clone(),
        memory_bytes: config.memory_bytes,
        initrd,
        pod_archive,
    })
}

/// Copies the kernel and the initrd into guest RAM on a thread of its own, so that the
/// copies (mostly the host kernel zeroing the fresh huge pages they land in) overlap with
/// creating the VM and its devices. The caller joins it before it writes the boot data
/// and creates the vCPUs, and before the jail (which wants a single thread).
fn spawn_guest_loader(
    config: &VmConfig,
    mem: &memory::GuestMemory,
) -> Result<std::thread::JoinHandle<Result<LoadedImages, VmmError>>, VmmError> {
    let images = open_boot_images(config)?;
    let mem = mem.clone();
    std::thread::Builder::new()
        .name("guest-loader".into())
        .spawn(move || load_images(&mem, images))
        .map_err(VmmError::GuestLoader)
}

/// Waits for [`spawn_guest_loader`]'s thread; a panic there is a bug and goes on here.
fn join_guest_loader(
    loader: std::thread::JoinHandle<Result<LoadedImages, VmmError>>,
) -> Result<LoadedImages, VmmError> {
    loader
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Copies the kernel, then the initrd and the pod spec archive after it, into guest RAM.
fn load_images(mem: &memory::GuestMemory, images: BootImages) -> Result<LoadedImages, VmmError> {
    let BootImages {
        kernel: mut kernel_file,
        kernel_path,
        memory_bytes,
        initrd,
        pod_archive,
    } = images;
    let kernel =
        boot::kernel::load_kernel(mem, &mut kernel_file).map_err(|source| VmmError::Kernel {
            path: kernel_path,
            source,
        })?;
    tracing::debug!(
        "kernel {:?} loaded, entry {:#x}",
        kernel.format,
        kernel.entry.0
    );
    let initrd = match initrd {
        Some((mut file, path, size)) => {
            let len = usize::try_from(size)
                .map_err(|_| VmmError::InitrdTooLarge { path: path.clone() })?;
            let initrd_err = |source| VmmError::Initrd {
                path: path.clone(),
                source,
            };
            // The pod spec is a second cpio archive right after the initramfs (4-byte
            // aligned): the kernel unpacks concatenated archives in order.
            let pod_offset = (size + 3) & !3;
            let total = pod_archive
                .as_ref()
                .map_or(size, |pod| pod_offset + pod.len() as u64);
            let addr =
                boot::kernel::place_initrd(&kernel, memory_bytes, total).map_err(initrd_err)?;
            boot::kernel::load_initrd(mem, addr, &mut file, len).map_err(initrd_err)?;
            if let Some(pod) = &pod_archive {
                mem.write_slice(pod, GuestAddress(addr.0 + pod_offset))
                    .map_err(|e| initrd_err(boot::kernel::KernelError::InitrdCopy(e)))?;
            }
            Some((addr, total))
        }
        None => None,
    };
    Ok(LoadedImages { kernel, initrd })
}

/// Writes what the kernel reads at entry besides itself: the command line, the ACPI
/// tables, the boot RNG seed, the zero page, the GDT and the identity page tables.
fn write_boot_data(
    config: &VmConfig,
    mem: &memory::GuestMemory,
    mmio64: Option<(u64, u64)>,
    images: &LoadedImages,
) -> Result<BootEntry, VmmError> {
    let LoadedImages { kernel, initrd } = images;
    let cmdline = boot::cmdline::build(
        &config.cmdline,
        boot::cmdline::max_len(kernel.setup_header.as_ref()),
        config.cpus,
    )
    .map_err(VmmError::Cmdline)?;
    let cmdline_len = boot::cmdline::write(mem, &cmdline).map_err(VmmError::Cmdline)?;

    let rsdp = boot::acpi::write_tables(
        mem,
        &boot::acpi::AcpiConfig {
            cpus: config.cpus,
            sleep_control_port: ACPI_POWER_PORT_BASE + SLEEP_CONTROL_OFFSET as u16,
            sleep_status_port: ACPI_POWER_PORT_BASE + SLEEP_STATUS_OFFSET as u16,
            reset_port: ACPI_POWER_PORT_BASE + RESET_OFFSET as u16,
            reset_value: RESET_VALUE,
            pvpanic_port: Some(PVPANIC_PORT),
            serial: Some((COM1_PORT_BASE, COM1_IRQ)),
            pci: Some(boot::acpi::PciHostBridge {
                ecam_start: boot::layout::PCI_ECAM_START,
                mmio_start: boot::layout::PCI_MMIO_START,
                mmio_size: boot::layout::PCI_MMIO_SIZE,
                mmio64,
            }),
            ged: Some(boot::acpi::GenericEventDevice {
                event_port: GED_PORT,
                irq: GED_IRQ,
            }),
        },
    )
    .map_err(VmmError::Acpi)?;

    // A seed from the host's pool: the guest's crng is ready before its first user, so
    // nothing in the guest (cradle formatting a volume) waits for entropy.
    let setup_data = match host_random_seed() {
        Ok(seed) => Some(boot::zero_page::write_rng_seed(mem, &seed).map_err(VmmError::ZeroPage)?),
        Err(e) => {
            tracing::warn!("no RNG seed for the guest: getrandom failed: {e}");
            None
        }
    };
    let params = boot::zero_page::build(&boot::zero_page::ZeroPage {
        setup_header: kernel.setup_header,
        cmdline_len,
        initrd: *initrd,
        mem_bytes: config.memory_bytes,
        rsdp: Some(rsdp),
        setup_data,
    })
    .map_err(VmmError::ZeroPage)?;
    boot::zero_page::write(mem, &params).map_err(VmmError::ZeroPage)?;
    boot::gdt::write_gdt_and_idt(mem).map_err(VmmError::Gdt)?;
    let pml4 = boot::paging::write_identity_page_tables(mem).map_err(VmmError::Paging)?;
    Ok(BootEntry {
        entry: kernel.entry.0,
        pml4,
    })
}

/// A device and the port range it serves.
type PortDevice = (Arc<Mutex<dyn BusDevice>>, u16, u16);

/// The legacy devices every VM has, on the port-I/O bus.
struct LegacyDevices {
    serial: Arc<Mutex<Serial>>,
    serial_irq: EventFd,
    /// The GED's events (the power button) and the eventfd of its interrupt.
    ged: Arc<GedEvents>,
    ged_irq: EventFd,
}

fn add_legacy_devices(
    pio: &mut Bus,
    config: &VmConfig,
    exit: &Arc<VmExit>,
    start: Instant,
    boot_times: &Arc<BootTimes>,
) -> Result<LegacyDevices, VmmError> {
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
    let out = ConsoleOutput::new(console_sink(&config.console)?);
    let serial = Arc::new(Mutex::new(Serial::new(
        serial_irq.try_clone().map_err(VmmError::EventFd)?,
        out,
    )));
    let ged_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
    let ged = Arc::new(GedEvents::new(
        ged_irq.try_clone().map_err(VmmError::EventFd)?,
    ));
    let devices: [PortDevice; 6] = [
        (serial.clone(), COM1_PORT_BASE, COM1_PORT_LEN),
        (
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
            I8042_PORT_BASE,
            I8042_PORT_LEN,
        ),
        (
            Arc::new(Mutex::new(AcpiPower::new(exit.clone()))),
            ACPI_POWER_PORT_BASE,
            ACPI_POWER_PORT_LEN,
        ),
        (Arc::new(Mutex::new(Ged::new(ged.clone()))), GED_PORT, 1),
        (
            Arc::new(Mutex::new(PvPanic::new(exit.clone()))),
            PVPANIC_PORT,
            1,
        ),
        (
            Arc::new(Mutex::new(BootMarker::new(start, boot_times.clone()))),
            BOOT_MARKER_PORT,
            1,
        ),
    ];
    for (device, base, len) in devices {
        pio.insert(device, u64::from(base), u64::from(len))
            .map_err(VmmError::Bus)?;
    }
    Ok(LegacyDevices {
        serial,
        serial_irq,
        ged,
        ged_irq,
    })
}

/// Wakes the VMM loop when the VM must end.
struct ExitWatcher {
    exit: Arc<VmExit>,
    done: bool,
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.exit.event(), EventSet::IN)) {
            tracing::error!("cannot watch the VM exit event: {e:?}");
            self.done = true;
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.exit.event().read();
        self.done = true;
    }
}

/// CPU time this process has used so far.
pub fn process_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// Boots `config` and serves it until the guest ends or crib stops it; returns how it
/// ended. `start` is the process start, against which boot times are measured.
pub fn run(config: &VmConfig, start: Instant) -> Result<RunOutcome, VmmError> {
    run_confined(config, start, None)
}

/// [`run`], with the process moved into `jail` ([`jail::confine`]) once every file, device
/// and socket the VM needs is open and before crib starts any thread.
pub fn run_confined(
    config: &VmConfig,
    start: Instant,
    jail: Option<&jail::Confinement>,
) -> Result<RunOutcome, VmmError> {
    let filters = seccomp::Filters::new(config.seccomp).map_err(VmmError::Seccomp)?;
    vcpu::install_kick_handler().map_err(VmmError::Vcpu)?;
    check_host_memory(config.memory_bytes)?;
    let ranges: Vec<_> = boot::memory_map::ram_ranges(config.memory_bytes);
    // virtio-fs is the only vhost-user device: its daemon maps guest RAM.
    let backing = memory::RamBacking::for_vm(config.fs.len());
    let (mem, backing) = memory::create_guest_memory(&ranges, backing).map_err(VmmError::Memory)?;
    match memory::check_huge_pages(backing) {
        Ok(huge) => tracing::info!("guest RAM: {backing:?}, huge pages: {huge}"),
        Err(why) => {
            tracing::info!("guest RAM: {backing:?}, huge pages: none");
            tracing::warn!("guest RAM gets no huge pages: {why}");
        }
    }
    let loader = spawn_guest_loader(config, &mem)?;
    let vm = Vm::new(mem).map_err(VmmError::Vm)?;
    let cpuid = vcpu::supported_cpuid(&vm).map_err(VmmError::Vcpu)?;
    let mmio64 =
        boot::memory_map::pci_mmio64_window(config.memory_bytes, vcpu::guest_phys_bits(&cpuid));
    let exit = Arc::new(VmExit::new().map_err(VmmError::EventFd)?);
    let boot_times = Arc::new(BootTimes::default());
    let mut pio = Bus::new();
    let legacy = add_legacy_devices(&mut pio, config, &exit, start, &boot_times)?;
    vm.register_irqfd(&legacy.serial_irq, COM1_IRQ)
        .map_err(VmmError::Vm)?;
    vm.register_irqfd(&legacy.ged_irq, GED_IRQ)
        .map_err(VmmError::Vm)?;
    let mut device_manager =
        device_manager::DeviceManager::new(&vm, mmio64).map_err(VmmError::Device)?;
    let mut disks = Vec::with_capacity(config.disks.len());
    for (index, disk) in config.disks.iter().enumerate() {
        let mut device = block::create(index, disk).map_err(|source| VmmError::Disk {
            id: disk.id.clone(),
            source,
        })?;
        if let Some(setup) = seccomp::worker_setup(&filters.block_worker) {
            device = device.with_worker_setup(setup);
        }
        let metrics = device.metrics();
        let (device, handle) = block::SharedBlock::new(device);
        device_manager
            .add_virtio_pci(&vm, &format!("disk {}", disk.id), Box::new(device))
            .map_err(VmmError::Device)?;
        disks.push(DiskHandle {
            id: disk.id.clone(),
            block: handle,
            metrics,
        });
    }
    let mut vsock_metrics = None;
    if let Some(vsock_config) = &config.vsock {
        let mut device = vsock::create(vsock_config).map_err(VmmError::Vsock)?;
        if let Some(setup) = seccomp::worker_setup(&filters.vsock_worker) {
            device = device.with_worker_setup(setup);
        }
        vsock_metrics = Some(device.metrics());
        device_manager
            .add_virtio_pci(&vm, "vsock", Box::new(device))
            .map_err(VmmError::Device)?;
    }
    let docker_listener = match (&config.docker_socket, &config.vsock) {
        (Some(path), Some(_)) => Some(docker_proxy::bind(path).map_err(VmmError::DockerSocket)?),
        _ => None,
    };
    // Started virtiofsd processes; they end with their device's connection or with crib.
    // A jailed pod's go in its run directory, and into its namespaces and cgroup.
    let mut fs_daemons = Vec::with_capacity(config.fs.len());
    let fs_socket_dir = jail.map(|j| j.run_dir.as_path());
    for (index, share) in config.fs.iter().enumerate() {
        let (device, daemon) = fs::create(index, share, fs_socket_dir).map_err(VmmError::Fs)?;
        device_manager
            .add_virtio_pci(&vm, &format!("fs {}", share.tag), Box::new(device))
            .map_err(VmmError::Device)?;
        fs_daemons.extend(daemon);
    }
    let mut net_metrics = Vec::with_capacity(config.net.len());
    for net_config in &config.net {
        let tap = net_config.interface().to_string();
        let mut device = net::create(net_config).map_err(|source| VmmError::Net {
            tap: tap.clone(),
            source,
        })?;
        if let Some(setup) = seccomp::worker_setup(&filters.net_worker) {
            device = device.with_worker_setup(setup);
        }
        net_metrics.push((tap.clone(), device.metrics()));
        device_manager
            .add_virtio_pci(&vm, &format!("net {tap}"), Box::new(device))
            .map_err(VmmError::Device)?;
    }
    if !fs_daemons.is_empty() {
        tracing::debug!("started {} virtiofsd processes", fs_daemons.len());
    }
    // Passed-through devices: one container for all, guest RAM DMA-mapped once; dropped
    // (devices reset) when `run` returns.
    let _vfio = if config.vfio.is_empty() {
        None
    } else {
        let mut host =
            vfio::VfioHost::new(vm.fd().clone(), &config.vfio).map_err(VmmError::Vfio)?;
        for bdf in &config.vfio {
            device_manager
                .add_vfio(&mut host, bdf)
                .map_err(VmmError::Device)?;
        }
        host.map_guest_memory(vm.memory(), filters.vmm.clone(), exit.clone())
            .map_err(VmmError::Vfio)?;
        Some(host)
    };
    // Last on the bus: every other device keeps the PCI slot it had before virtio-rng.
    if let Some(options) = &config.rng {
        let limit = match options.bandwidth {
            Some(0) => None,
            bytes => Some(devices::rate_limiter::TokenBucketConfig {
                size: bytes.unwrap_or(devices::virtio::rng::DEFAULT_BYTES_PER_SEC),
                one_time_burst: 0,
                refill_time_ms: 1000,
            }),
        };
        let mut device = devices::virtio::rng::Rng::new(devices::virtio::rng::RngConfig {
            rate_limit: devices::rate_limiter::RateLimitConfig {
                bandwidth: limit,
                ops: None,
            },
        })
        .map_err(VmmError::Rng)?;
        if let Some(setup) = seccomp::worker_setup(&filters.rng_worker) {
            device = device.with_worker_setup(setup);
        }
        device_manager
            .add_virtio_pci(&vm, "rng", Box::new(device))
            .map_err(VmmError::Device)?;
    }
    let mmio = device_manager.finish(&mut pio).map_err(VmmError::Device)?;
    let buses = VcpuBuses {
        pio: Arc::new(pio),
        mmio,
        exits: Arc::new(vcpu::ExitCounters::default()),
    };

    let shared = Arc::new(control::Shared::new(
        config.clone(),
        start,
        boot_times.clone(),
        buses.exits.clone(),
        disks,
        vsock_metrics,
        net_metrics,
    ));
    let pause = Arc::new(VcpuPause::default());
    let (mut controller, handle) = Controller::new(
        shared,
        pause.clone(),
        config.vsock.as_ref().map(|v| v.socket.clone()),
        Some(legacy.ged.clone()),
    )
    .map_err(VmmError::Control)?;
    controller.set_vm(vm.fd().clone());
    let api_listener = match &config.api_socket {
        Some(path) => Some(api::bind(path).map_err(VmmError::Api)?),
        None => None,
    };
    let images = join_guest_loader(loader)?;
    let entry = write_boot_data(config, vm.memory(), mmio64, &images)?;
    let vcpus = (0..config.cpus)
        .map(|i| Vcpu::new(&vm, &cpuid, i, config.cpus, entry.entry, entry.pml4))
        .collect::<Result<Vec<_>, _>>()
        .map_err(VmmError::Vcpu)?;
    // Every file, device and socket is open, no thread has started: the last moment
    // with privileges.
    if let Some(jail) = jail {
        jail::confine(jail).map_err(VmmError::Jail)?;
    }
    for daemon in &mut fs_daemons {
        daemon.supervise();
    }
    if let (Some(bound), Some(vsock_config)) = (docker_listener, &config.vsock) {
        docker_proxy::spawn(bound, &vsock_config.socket, filters.docker_proxy.clone())
            .map_err(VmmError::DockerSocket)?;
    }
    if let Some(bound) = api_listener {
        api::spawn(bound, Arc::new(handle), filters.api.clone()).map_err(VmmError::Api)?;
    }

    let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
        .map_err(VmmError::EventLoop)?;
    let watcher = Arc::new(Mutex::new(ExitWatcher {
        exit: exit.clone(),
        done: false,
    }));
    manager.add_subscriber(watcher.clone());
    let _raw_terminal = if config.console == ConsoleConfig::Stdout {
        manager.add_subscriber(Arc::new(Mutex::new(console::ConsoleInput::new(
            legacy.serial.clone(),
        ))));
        Some(console::RawTerminal::enable())
    } else {
        None
    };

    tracing::info!(
        "vmm ready to run: {} ms wall, {} us CPU since start",
        start.elapsed().as_millis(),
        process_cpu_time().as_micros()
    );
    let mut threads = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        threads.push(
            vcpu.spawn(
                buses.clone(),
                exit.clone(),
                pause.clone(),
                filters.vcpu.clone(),
            )
            .map_err(VmmError::Vcpu)?,
        );
    }
    controller.start(threads).map_err(VmmError::Control)?;
    let controller = Arc::new(Mutex::new(controller));
    manager.add_subscriber(controller.clone());
    // Last: every other thread has started with its own filter.
    if let Some(filter) = &filters.vmm {
        filter.apply().map_err(VmmError::Seccomp)?;
    }
    let outcome = loop {
        manager.run().map_err(VmmError::EventLoop)?;
        if watcher.lock().unwrap_or_else(|e| e.into_inner()).done {
            break RunOutcome::Guest(exit.reason().unwrap_or(ExitReason::VcpuError));
        }
        if let Some(outcome) = controller
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .outcome()
        {
            break outcome;
        }
    };
    tracing::info!("vCPU exits to crib: {}", buses.exits.summary());
    // The vCPU threads are left in KVM_RUN: the caller ends the process.
    Ok(outcome)
}
