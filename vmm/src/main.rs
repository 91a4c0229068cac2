//! `crib`: the command line of the VMM.

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use devices::ExitReason;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;
use vmm::config::{self, Origin, VmConfig, DEFAULT_CMDLINE};
use vmm::control::{RunOutcome, StopCause};
use vmm::pod;

/// Exit codes of `crib run` (documented in the README).
mod exit_code {
    /// The guest powered off or rebooted.
    pub const GUEST_EXITED: u8 = 0;
    /// crib could not start or run the VM (bad configuration, host error).
    pub const VMM_ERROR: u8 = 1;
    /// The guest kernel panicked.
    pub const GUEST_PANIC: u8 = 3;
    /// The guest triple-faulted.
    pub const TRIPLE_FAULT: u8 = 4;
    /// KVM could not run a vCPU (internal error, emulation failure, failed entry).
    pub const VCPU_ERROR: u8 = 5;
    /// crib stopped the guest without its consent: `PUT /api/v1/vm/stop`, or a graceful
    /// shutdown (API or SIGTERM/SIGINT) the guest did not finish in time or could not be
    /// asked for.
    pub const STOPPED: u8 = 6;
}

#[derive(Parser)]
#[command(
    name = "crib",
    version,
    about = "A KVM virtual machine monitor for pods and marketplace VMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM and run it until the guest powers off.
    Run(RunArgs),
    /// Show the configuration `crib run` would use, as a JSON config file.
    Config(ConfigArgs),
    /// Run and manage pods: one launch file per pod, sockets in a run directory.
    #[command(subcommand)]
    Pod(PodCommand),
    /// Manage the host image store: import, list, inspect, remove, prune (docs/IMAGES.md).
    #[command(subcommand)]
    Image(images::cli::ImageCommand),
}

/// `crib pod ...` (README.md, "Pods: crib pod").
#[derive(Subcommand)]
enum PodCommand {
    /// Boot the pod of a launch file and run it until it ends; crib's exit status is the
    /// pod's (the exit codes of `crib run`).
    Run {
        /// The launch file: {"pod": <pod spec>, "disks": {...}, "shares": {...}, ...}.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        #[command(flatten)]
        root: RunRootArg,
    },
    /// List the running pods: name, state, uptime, run directory.
    Ls {
        #[command(flatten)]
        root: RunRootArg,
    },
    /// Shut a pod down gracefully (cradle stops its processes and powers off), forced
    /// after --timeout; waits until it has ended.
    Stop {
        /// The pod's name, or its run directory (a path with a '/').
        #[arg(value_name = "NAME")]
        name: String,
        /// Seconds the guest gets to power off before crib stops it.
        #[arg(long, value_name = "S", default_value_t = 20,
              value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout: u64,
        /// Stop the guest at once instead (crib exits 6).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        root: RunRootArg,
    },
    /// Print a pod's serial console (its run directory's console.log).
    Logs {
        /// The pod's name, or its run directory (a path with a '/').
        #[arg(value_name = "NAME")]
        name: String,
        /// Keep printing what the pod writes until it ends.
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        root: RunRootArg,
    },
    /// Remove the networks that pods killed with `kill -9` left (taps, nft chains,
    /// address leases); `crib pod run` does it too.
    NetSweep,
    /// Internal: spawned by `crib pod run`, removes the pod's network once crib ends.
    #[command(hide = true)]
    NetKeeper {
        #[arg(value_name = "LEASE")]
        lease: PathBuf,
        /// The IPAM's directory.
        #[arg(value_name = "NET_DIR")]
        net_dir: PathBuf,
    },
    /// Internal: spawned by `crib pod run` for `"network": {"attach": ...}`, removes the
    /// pod's tap and tc redirect once crib ends.
    #[command(hide = true)]
    NetAttachKeeper {
        #[arg(value_name = "INTERFACE")]
        interface: String,
        #[arg(value_name = "TAP")]
        tap: String,
    },
}

#[derive(Args)]
struct RunRootArg {
    /// The directory holding one run directory per pod; default $CRIB_RUN_ROOT, else
    /// /run/crib as root, $XDG_RUNTIME_DIR/crib, /tmp/crib-<uid>.
    #[arg(long, value_name = "DIR")]
    run_root: Option<PathBuf>,
}

#[derive(Args)]
struct ConfigArgs {
    /// Print the effective configuration as JSON (`crib run --config` takes it back).
    #[arg(long, required = true)]
    print: bool,
    #[command(flatten)]
    run: RunArgs,
}

/// `on` or `off`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Switch {
    On,
    Off,
}

/// Every `crib run` flag; a config file takes the same settings. `--config` cannot be
/// combined with any other flag (one source of truth: the file, or the flags).
#[derive(Args)]
struct RunArgs {
    /// The whole VM as one JSON document (docs/api.yaml, schema VmConfig; `crib config
    /// --print` writes one). No other run flag may be given with it.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "kernel", "initrd", "cmdline", "cpus", "memory", "console", "disk", "vsock", "fs", "net",
        "vfio", "docker_socket", "pod", "api_socket", "id", "seccomp", "rng",
    ])]
    config: Option<PathBuf>,
    /// Guest kernel: an uncompressed ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH", required_unless_present = "config")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (cpio archive) handed to the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line; arguments after `--` go to the guest's init.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE, allow_hyphen_values = true)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u64,
    /// Guest RAM, e.g. 512M or 2G.
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    memory: String,
    /// Where the serial console goes: stdout, off or file=PATH.
    #[arg(long, value_name = "WHERE", default_value = "stdout")]
    console: String,
    /// A virtio-blk volume (repeatable): path=FILE_OR_BLOCKDEV,id=NAME[,readonly=on]
    /// [,direct=on][,queues=N][,queue_size=N][,iops=N][,bandwidth=BYTES_PER_S][,burst=BYTES]
    /// [,iops_burst=N]
    #[arg(long, value_name = "SPEC")]
    disk: Vec<String>,
    /// A virtio-vsock device: cid=N,socket=PATH. Host processes connect to PATH and write
    /// `CONNECT <port>`; guest connections to host port P go to PATH_P.
    #[arg(long, value_name = "SPEC")]
    vsock: Vec<String>,
    /// A virtio-fs share (repeatable), mounted in the guest with `mount -t virtiofs TAG DIR`:
    /// tag=TAG,socket=PATH (a running virtiofsd) or tag=TAG,dir=PATH (crib starts
    /// virtiofsd for PATH), [,queues=N][,queue_size=N]. TAG is at most 36 bytes.
    #[arg(long, value_name = "SPEC")]
    fs: Vec<String>,
    /// A virtio-net device (repeatable) on a tap: tap=NAME (an existing tap, `ip tuntap add
    /// dev NAME mode tap user $USER`) or ifname=NAME (crib creates it, needs CAP_NET_ADMIN),
    /// [,mac=52:54:00:12:34:56][,queues=N][,bandwidth=BYTES_PER_S][,ops=FRAMES_PER_S].
    /// Or `pod[,bridge=NAME][,port=HOST:GUEST[/udp]]...`: on the pods' bridge, crib makes
    /// the tap and serves the VM its leased address over DHCP (docs/NETWORK.md; root).
    #[arg(long, value_name = "SPEC")]
    net: Vec<String>,
    /// Pass a host PCI function through with VFIO (repeatable): its address as `lspci -D`
    /// shows it, e.g. 0000:00:04.0. It must be bound to vfio-pci, behind an IOMMU.
    #[arg(long, value_name = "BDF")]
    vfio: Vec<String>,
    /// Serve the pod's Docker API on this Unix socket (`docker -H unix://PATH ps`),
    /// forwarded to cradle on guest vsock port 1; needs --vsock.
    #[arg(long, value_name = "PATH")]
    docker_socket: Option<PathBuf>,
    /// A pod spec (JSON, docs/POD_SPEC.md) for cradle; needs --initrd.
    #[arg(long, value_name = "FILE")]
    pod: Option<PathBuf>,
    /// Serve crib's HTTP API (docs/api.yaml) on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// The VM's name in log lines and the API (letters, digits, '.', '_', '-');
    /// default crib-<pid>.
    #[arg(long, value_name = "NAME")]
    id: Option<String>,
    /// Seccomp filters per thread; `off` only to debug a filter (logs a warning).
    #[arg(long, value_name = "on|off", default_value = "on")]
    seccomp: Switch,
    /// The virtio-rng entropy device, fed by the host's getrandom: on, off or
    /// bandwidth=BYTES_PER_S (default 1M; 0 for no limit).
    #[arg(long, value_name = "SPEC", default_value = "on")]
    rng: String,
}

impl RunArgs {
    /// The configuration of the file, or of the flags; both checked by
    /// [`VmConfig::validate`].
    fn into_config(self) -> Result<VmConfig, config::ConfigError> {
        if let Some(path) = &self.config {
            return VmConfig::load(path);
        }
        let origin = Origin::Cli;
        let disks = self
            .disk
            .iter()
            .map(|d| config::parse_disk(d))
            .collect::<Result<Vec<_>, _>>()?;
        let config = VmConfig {
            id: self.id,
            // clap requires --kernel without --config; an empty path fails to open later.
            kernel: self.kernel.unwrap_or_default(),
            initrd: self.initrd,
            cmdline: self.cmdline,
            cpus: config::parse_cpus(origin.name("cpus"), self.cpus)?,
            memory_bytes: config::parse_memory(origin.name("memory"), &self.memory)?,
            console: config::parse_console(origin.name("console"), &self.console)?,
            disks,
            vsock: config::parse_vsock_option(&self.vsock)?,
            fs: self
                .fs
                .iter()
                .map(|f| config::parse_fs(f))
                .collect::<Result<Vec<_>, _>>()?,
            net: self
                .net
                .iter()
                .map(|n| config::parse_net(n))
                .collect::<Result<Vec<_>, _>>()?,
            vfio: self
                .vfio
                .iter()
                .map(|b| b.parse().map_err(config::ConfigError::Vfio))
                .collect::<Result<Vec<_>, _>>()?,
            docker_socket: self.docker_socket,
            pod: self.pod,
            api_socket: self.api_socket,
            seccomp: self.seccomp == Switch::On,
            rng: config::parse_rng(&self.rng)?,
        };
        config.validate(origin)
    }
}

/// Log lines: `<time> <LEVEL> vm_id=<id> <message and fields>`, from every thread.
struct VmLogFormat {
    id: String,
}

impl<S, N> FormatEvent<S, N> for VmLogFormat
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        SystemTime.format_time(&mut writer)?;
        write!(
            writer,
            " {:>5} vm_id={} ",
            event.metadata().level(),
            self.id
        )?;
        // Messages carry text from outside (paths, ids, API paths, guest output): a control
        // character in it must not forge a log line or reach the terminal raw.
        let mut message = String::new();
        ctx.format_fields(Writer::new(&mut message), event)?;
        writer.write_str(&escape_control(&message))?;
        writeln!(writer)
    }
}

/// `text` with every control character escaped (`\n`, `\u{1b}`), so one log event stays
/// one line of printable text.
fn escape_control(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    std::borrow::Cow::Owned(escaped)
}

fn init_logging(id: &str) {
    let level = match std::env::var("CRIB_LOG").as_deref() {
        Ok("error") => tracing::Level::ERROR,
        Ok("warn") => tracing::Level::WARN,
        Ok("debug") => tracing::Level::DEBUG,
        Ok("trace") => tracing::Level::TRACE,
        _ => tracing::Level::INFO,
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .event_format(VmLogFormat { id: id.to_string() })
        .try_init()
        // A jailed pod's child inherits the supervisor's: one is enough.
        .ok();
}

/// Prints an error and its causes, once each (the causes are not in the messages).
fn report(error: &dyn std::error::Error) {
    let mut text = format!("crib: error: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!("\n  caused by: {cause}"));
        source = cause.source();
    }
    text.push('\n');
    print_stderr(&text);
}

/// Writes `text` to stdout and flushes it. A closed or full stdout loses the text but never
/// panics, as `println!` would: crib's work (a running VM) matters more than its chatter.
fn print_stdout(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// [`print_stdout`] for stderr.
fn print_stderr(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

fn run(args: RunArgs, start: Instant) -> u8 {
    match args.into_config() {
        Ok(config) => run_vm(config, start, None),
        Err(e) => {
            report(&e);
            exit_code::VMM_ERROR
        }
    }
}

/// Runs the VM of `config` until it ends; the exit code says how.
fn run_vm(mut config: VmConfig, start: Instant, jail: Option<&vmm::jail::Confinement>) -> u8 {
    let id = config.effective_id();
    config.id = Some(id.clone());
    init_logging(&id);
    // Held until crib exits: its keeper then removes the VM's pod network.
    let _network = match vmm::pod_net::attach_vm(&mut config) {
        Ok(network) => {
            if let Some(net) = &network {
                let s = &net.state;
                let ports: Vec<String> = s.ports.iter().map(ToString::to_string).collect();
                tracing::info!(
                    "network: {} on {} (tap {}, MAC {}, over DHCP; ports [{}])",
                    s.address,
                    s.bridge,
                    s.tap,
                    s.mac,
                    ports.join(", ")
                );
            }
            network
        }
        Err(e) => {
            report(&e);
            return exit_code::VMM_ERROR;
        }
    };
    match vmm::run_confined(&config, start, jail) {
        Ok(outcome) => {
            let (code, what) = match outcome {
                RunOutcome::Guest(ExitReason::Poweroff) => {
                    (exit_code::GUEST_EXITED, "guest powered off")
                }
                RunOutcome::Guest(ExitReason::Reset) => (exit_code::GUEST_EXITED, "guest rebooted"),
                RunOutcome::Guest(ExitReason::Panic) => {
                    (exit_code::GUEST_PANIC, "guest kernel panicked")
                }
                RunOutcome::Guest(ExitReason::TripleFault) => {
                    (exit_code::TRIPLE_FAULT, "guest triple-faulted")
                }
                RunOutcome::Guest(ExitReason::VcpuError) => {
                    (exit_code::VCPU_ERROR, "KVM could not run the guest")
                }
                RunOutcome::Guest(ExitReason::DeviceFailed) => (
                    exit_code::VMM_ERROR,
                    "crib stopped the guest: a device failed (the error is above)",
                ),
                RunOutcome::Stopped(StopCause::Requested) => {
                    (exit_code::STOPPED, "guest stopped (forced stop requested)")
                }
                RunOutcome::Stopped(StopCause::ShutdownTimedOut) => (
                    exit_code::STOPPED,
                    "guest stopped: it did not power off within the shutdown timeout",
                ),
                RunOutcome::Stopped(StopCause::GuestUnreachable) => (
                    exit_code::STOPPED,
                    "guest stopped: it could not be asked to power off",
                ),
            };
            if code == exit_code::GUEST_EXITED {
                tracing::info!("{what}");
            } else if code == exit_code::STOPPED {
                tracing::warn!("{what}");
            } else {
                tracing::error!("{what}");
            }
            code
        }
        Err(e) => {
            report(&e);
            exit_code::VMM_ERROR
        }
    }
}

fn print_config(args: ConfigArgs) -> u8 {
    match args.run.into_config().and_then(|c| c.to_json_pretty()) {
        Ok(json) => {
            print_stdout(&format!("{json}\n"));
            exit_code::GUEST_EXITED
        }
        Err(e) => {
            report(&e);
            exit_code::VMM_ERROR
        }
    }
}

/// `crib pod run FILE`: the launch file's VM, through the same path as `crib run`.
fn pod_run(file: &Path, root: Option<&Path>, start: Instant) -> u8 {
    let root = pod::run_root(root);
    let guest_dir = pod::guest_dir();
    let prepared = pod::LaunchFile::load(file).and_then(|launch| {
        let prepared = launch.prepare(&root, &guest_dir)?;
        if launch.jail.is_some() {
            // Its log lines (a stale cgroup removed) come before the VM's.
            init_logging(&prepared.name);
            vmm::jail::check_supported(!prepared.config.vfio.is_empty()).map_err(|source| {
                pod::PodError::Jail {
                    name: prepared.name.clone(),
                    source,
                }
            })?;
        }
        for (what, field, default, path) in [
            (
                "kernel",
                "kernel",
                pod::DEFAULT_KERNEL,
                Some(&prepared.config.kernel),
            ),
            (
                "initramfs",
                "initrd",
                pod::DEFAULT_INITRD,
                prepared.config.initrd.as_ref(),
            ),
        ] {
            if let Some(path) = path.filter(|p| !p.exists()) {
                return Err(pod::PodError::MissingGuestFile {
                    what,
                    field,
                    default,
                    path: path.clone(),
                });
            }
        }
        // Leased before the run directory is touched: ids held by another pod leave it as
        // it was.
        let ids = launch
            .jail
            .map(|request| lease_jail_ids(&prepared, request))
            .transpose()?;
        let lock = prepared.create_run_dir(&root, &launch, &guest_dir)?;
        if let Some(lease) = &ids {
            let vmm::jail::Jail { uid, gid } = lease.jail;
            let ids = serde_json::json!({"uid": uid, "gid": gid, "auto": lease.auto});
            prepared.add_to_info([("jail", ids)])?;
        }
        let mut prepared = prepared;
        let network = vmm::pod_net::attach(&mut prepared, &launch, lock.raw_fd())?;
        Ok((prepared, lock, network, ids))
    });
    // The lease of the jail's ids is held (by this process only) until the pod has ended.
    let (prepared, _lock, network, ids) = match prepared {
        Ok(prepared) => prepared,
        Err(e) => {
            report(&e);
            return exit_code::VMM_ERROR;
        }
    };
    for line in prepared.socket_lines() {
        print_stdout(&format!("{line}\n"));
    }
    if let Some(net) = &network {
        print_stdout(&format!("network: {}\n", net.state.summary()));
    }
    let (recorder, code) = match ids.as_ref().map(|lease| lease.jail) {
        None => {
            let recorder = prepared.exit_recorder();
            (recorder, run_vm(prepared.config.clone(), start, None))
        }
        // Opened once the child is gone: it must not inherit the exit file.
        Some(jail) => {
            let code = run_jailed(&prepared, jail, start);
            (prepared.exit_recorder(), code)
        }
    };
    if let Some(recorder) = recorder {
        recorder.record(code);
    }
    prepared.remove_sockets();
    code
}

/// Takes the jail's ids (docs/JAIL.md, "Ids").
fn lease_jail_ids(
    prepared: &pod::PreparedPod,
    request: vmm::jail::JailRequest,
) -> Result<vmm::jail_ids::IdLease, pod::PodError> {
    use vmm::jail_ids::{lease_ids, HostIds, AUTO_IDS, ID_LOCK_DIR};
    let jail_error = |source| pod::PodError::Jail {
        name: prepared.name.clone(),
        source,
    };
    let host = HostIds::read();
    let lease = lease_ids(
        request,
        Path::new(ID_LOCK_DIR),
        AUTO_IDS,
        &host,
        &prepared.name,
    )
    .map_err(|e| jail_error(e.into()))?;
    let vmm::jail::Jail { uid, gid } = lease.jail;
    let how = if lease.auto { "automatic" } else { "fixed" };
    tracing::info!("jail ids: uid {uid}, gid {gid} ({how}, held in {ID_LOCK_DIR})");
    Ok(lease)
}

/// A jailed pod (docs/JAIL.md): its cgroup, then a child that is PID 1 of a new PID
/// namespace runs the VM and is confined once it is set up; this process (root) waits for
/// it, forwards SIGTERM/SIGINT, returns its exit code and removes the cgroup.
fn run_jailed(prepared: &pod::PreparedPod, jail: vmm::jail::Jail, start: Instant) -> u8 {
    let config = &prepared.config;
    if !config.fs.is_empty() {
        // Found here, in the host's mount namespace; the child inherits the answer.
        let _ = vmm::fs::find_virtiofsd();
    }
    let limits = vmm::jail::CgroupLimits::for_vm(config);
    let cgroup = match vmm::jail::Cgroup::create(&prepared.name, &limits) {
        Ok(cgroup) => cgroup,
        Err(source) => {
            report(&pod::PodError::Jail {
                name: prepared.name.clone(),
                source,
            });
            return exit_code::VMM_ERROR;
        }
    };
    let confinement = vmm::jail::Confinement {
        jail,
        run_dir: prepared.run_dir.clone(),
        sockets: [
            config.api_socket.clone(),
            config.docker_socket.clone(),
            config.vsock.as_ref().map(|v| v.socket.clone()),
        ]
        .into_iter()
        .flatten()
        .collect(),
    };
    let supervised = vmm::jail::supervise(|| {
        if let Err(source) = vmm::jail::enter(cgroup.path()) {
            report(&pod::PodError::Jail {
                name: prepared.name.clone(),
                source,
            });
            return exit_code::VMM_ERROR;
        }
        run_vm(config.clone(), start, Some(&confinement))
    });
    cgroup.remove();
    vmm::jail::restore_run_dir(&prepared.run_dir);
    match supervised {
        Ok(code) => code,
        Err(source) => {
            report(&pod::PodError::Jail {
                name: prepared.name.clone(),
                source,
            });
            exit_code::VMM_ERROR
        }
    }
}

fn pod_command(command: PodCommand, start: Instant) -> u8 {
    let result = match command {
        PodCommand::Run { file, root } => return pod_run(&file, root.run_root.as_deref(), start),
        PodCommand::NetSweep => podnet::setup::sweep(&podnet::setup::net_dir())
            .map(|pods| {
                for pod in pods {
                    print_stdout(&format!("removed the network of pod {pod}\n"));
                }
            })
            .map_err(|source| pod::PodError::Network {
                name: "(sweep)".into(),
                source,
            }),
        PodCommand::NetKeeper { lease, net_dir } => vmm::pod_net::keep(&net_dir, &lease),
        PodCommand::NetAttachKeeper { interface, tap } => {
            vmm::pod_net::keep_attached(&interface, &tap)
        }
        PodCommand::Ls { root } => pod::list(&pod::run_root(root.run_root.as_deref()))
            .map(|pods| print_stdout(&pod::format_list(&pods))),
        PodCommand::Stop {
            name,
            timeout,
            force,
            root,
        } => {
            let dir = pod::pod_dir(&pod::run_root(root.run_root.as_deref()), &name);
            pod::stop(&dir, &name, Duration::from_secs(timeout), force).map(|code| match code {
                Some(code) => print_stdout(&format!("pod {name} stopped (crib exited {code})\n")),
                None => print_stdout(&format!(
                    "pod {name} stopped (crib's exit code was not recorded)\n"
                )),
            })
        }
        PodCommand::Logs { name, follow, root } => {
            let dir = pod::pod_dir(&pod::run_root(root.run_root.as_deref()), &name);
            pod::logs(&dir, &name, follow, &mut std::io::stdout().lock())
        }
    };
    match result {
        Ok(()) => exit_code::GUEST_EXITED,
        Err(e) => {
            report(&e);
            exit_code::VMM_ERROR
        }
    }
}

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(args) => run(args, start),
        Command::Config(args) => print_config(args),
        Command::Pod(command) => pod_command(command, start),
        Command::Image(command) => images::cli::run(command),
    };
    // vCPU threads may still sit in KVM_RUN: end the process rather than join them.
    let _ = std::io::stdout().flush();
    std::process::exit(i32::from(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_control_keeps_plain_text_borrowed() {
        assert!(matches!(
            escape_control("api: GET /api/v1/vm"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn escape_control_turns_a_forged_line_into_one_line() {
        let escaped = escape_control("GET /x\n2026-01-01 ERROR vm_id=other forged\u{1b}[31m");

        assert_eq!(
            escaped,
            "GET /x\\n2026-01-01 ERROR vm_id=other forged\\u{1b}[31m"
        );
    }
}
