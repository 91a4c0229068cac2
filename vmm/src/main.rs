//! `crib`: the command line of the VMM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use devices::ExitReason;
use vmm::config::{self, VmConfig, DEFAULT_CMDLINE};

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
}

#[derive(Args)]
struct RunArgs {
    /// Guest kernel: an uncompressed ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
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
    /// Serve the pod's Docker API on this Unix socket (`docker -H unix://PATH ps`),
    /// forwarded to cradle on guest vsock port 1; needs --vsock.
    #[arg(long, value_name = "PATH")]
    docker_socket: Option<PathBuf>,
    /// A pod spec (JSON, docs/POD_SPEC.md) for cradle; needs --initrd.
    #[arg(long, value_name = "FILE")]
    pod: Option<PathBuf>,
}

impl RunArgs {
    fn into_config(self) -> Result<VmConfig, config::ConfigError> {
        let disks = self
            .disk
            .iter()
            .map(|d| config::parse_disk(d))
            .collect::<Result<Vec<_>, _>>()?;
        config::check_disks(&disks)?;
        let vsock = config::parse_vsock_option(&self.vsock)?;
        if self.docker_socket.is_some() && vsock.is_none() {
            return Err(config::ConfigError::DockerSocketWithoutVsock);
        }
        Ok(VmConfig {
            disks,
            vsock,
            docker_socket: self.docker_socket,
            pod: self.pod,
            kernel: self.kernel,
            initrd: self.initrd,
            cmdline: self.cmdline,
            cpus: config::parse_cpus(self.cpus)?,
            memory_bytes: config::parse_memory(&self.memory)?,
            console: config::parse_console(&self.console)?,
        })
    }
}

fn init_logging() {
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
        .with_target(false)
        .init();
}

/// Prints an error and its causes, once each (the causes are not in the messages).
fn report(error: &dyn std::error::Error) {
    let mut text = format!("crib: error: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!("\n  caused by: {cause}"));
        source = cause.source();
    }
    eprintln!("{text}");
}

fn run(args: RunArgs, start: Instant) -> u8 {
    let config = match args.into_config() {
        Ok(config) => config,
        Err(e) => {
            report(&e);
            return exit_code::VMM_ERROR;
        }
    };
    match vmm::run(&config, start) {
        Ok(reason) => {
            let (code, what) = match reason {
                ExitReason::Poweroff => (exit_code::GUEST_EXITED, "guest powered off"),
                ExitReason::Reset => (exit_code::GUEST_EXITED, "guest rebooted"),
                ExitReason::Panic => (exit_code::GUEST_PANIC, "guest kernel panicked"),
                ExitReason::TripleFault => (exit_code::TRIPLE_FAULT, "guest triple-faulted"),
                ExitReason::VcpuError => (exit_code::VCPU_ERROR, "KVM could not run the guest"),
            };
            if code == exit_code::GUEST_EXITED {
                tracing::info!("{what}");
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

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = Cli::parse();
    init_logging();
    let code = match cli.command {
        Command::Run(args) => run(args, start),
    };
    // vCPU threads may still sit in KVM_RUN: end the process rather than join them.
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::process::exit(i32::from(code))
}
