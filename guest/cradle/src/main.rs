//! cradle: crib's guest init, PID 1 inside a pod's microVM.
//!
//! At boot, in order: write the "init started" boot marker; mount /dev,
//! /proc, /sys, /run, /tmp, /dev/pts (repairing stdio on the way); load the
//! initramfs's kernel modules in dependency order; print the ready line and
//! write the "ready" marker; if the VMM shipped a pod spec
//! (`/etc/cradle/pod.json`), set up its volumes (link, format if blank,
//! mount), mount its virtio-fs filesystems, start its processes and serve the Docker API subset (vdocker)
//! on vsock port 1, and wait for the pod to end (its processes exited, or
//! the shutdown call, per the spec's `lifetime`); run the command passed
//! after `--` on the kernel command line, if any; then stop leftover
//! processes, unmount the filesystems and volumes, sync and power off.
//! The ACPI power button (crib's graceful shutdown when there is no vsock)
//! ends the pod as the shutdown call does, and stops the command.
//!
//! PID 1 must never exit (the kernel panics when init dies): every error is
//! printed as `cradle: error: ...` and the VM is powered off. No code path
//! here is meant to panic; a panic anyway is caught and powers off too.

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented
    )
)]

mod boot_marker;
mod cmdline;
mod command;
mod console;
mod containers;
mod disks;
mod filesystems;
mod module_dep;
mod module_load;
mod mounts;
mod network;
mod pod;
mod power;
mod power_button;
mod probe;
mod processes;
mod reaper;
#[cfg(test)]
mod testing;
mod vdocker;
mod volumes;

use std::ffi::OsString;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use initramfs::podspec::POD_SPEC_GUEST_PATH;
use thiserror::Error;

use crate::boot_marker::{BootMarker, MARKER_INIT_STARTED, MARKER_READY};
use crate::command::CommandError;
use crate::console::say;
use crate::containers::{ContainerError, Containers};
use crate::filesystems::FsMountError;
use crate::module_load::millis;
use crate::mounts::MountError;
use crate::pod::PodError;
use crate::reaper::Reaper;
use crate::vdocker::{PodEnd, Registry, RegistryOptions};
use crate::volumes::{Layout, VolumeError, Volumes};

/// What the pod's processes (and the command) get after the power button before
/// SIGKILL. The button carries no time; crib's default graceful-shutdown timeout is
/// 20 s, and unmounting and syncing need some of it.
const POWER_BUTTON_GRACE: Duration = Duration::from_secs(10);

/// Errors that end the boot (each powers the VM off).
#[derive(Debug, Error)]
pub enum CradleError {
    #[error("mounting the base filesystems failed")]
    Mount(#[from] MountError),
    #[error("the test hook failed")]
    Command(#[from] CommandError),
    #[error("cannot set up the pod")]
    Pod(#[from] PodError),
    #[error("cannot set up the pod's volumes")]
    Volume(#[from] VolumeError),
    #[error("cannot mount the pod's filesystems")]
    Fs(#[from] FsMountError),
    #[error("cannot set up the pod's containers")]
    Containers(#[from] ContainerError),
}

fn main() {
    // cradle re-executed to set up a container (containers::stage), not PID 1.
    let mut args = std::env::args();
    if std::process::id() != 1 {
        match args.nth(1).as_deref() {
            Some(containers::STAGE_ARG) => {
                containers::stage::main(&args.next().unwrap_or_default())
            }
            Some(containers::EXEC_ARG) => {
                containers::stage::exec_main(&args.next().unwrap_or_default())
            }
            _ => {}
        }
    }
    // First thing: tell the VMM that init is running.
    let marker = match BootMarker::open() {
        Ok(marker) => {
            marker.write(MARKER_INIT_STARTED);
            Some(marker)
        }
        Err(error) => {
            // The console may not be open yet; the line is lost then.
            console::log_warning(&error);
            None
        }
    };
    let start = Instant::now();
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();

    // Outside the closure so the volumes are unmounted and the pod's
    // processes stopped whatever happened.
    let mut volumes = Volumes::default();
    let mut pod = None;
    match panic::catch_unwind(AssertUnwindSafe(|| {
        boot(marker.as_ref(), start, &args, &mut volumes, &mut pod)
    })) {
        Ok(Ok(())) => {}
        Ok(Err(error)) => console::log_error(&error),
        Err(_) => say!("error: cradle panicked"),
    }
    let shutdown = pod.as_ref().and_then(Registry::shutdown_requested);
    if let Some(registry) = &pod {
        // SIGTERM, then SIGKILL after the shutdown call's grace (or the
        // sweep's): containers and exec sessions.
        let grace = shutdown.unwrap_or(Duration::from_millis(processes::STOP_GRACE_MS));
        registry.stop_all(grace);
    }
    if !volumes.is_empty() || shutdown.is_some() {
        // Nothing may keep a volume busy while it is unmounted.
        processes::stop_leftovers();
    }
    volumes.tear_down();
    power::power_off()
}

/// Everything between the first marker and power-off.
fn boot(
    marker: Option<&BootMarker>,
    start: Instant,
    args: &[OsString],
    volumes: &mut Volumes,
    pod: &mut Option<Registry>,
) -> Result<(), CradleError> {
    let mut steps = Steps::new(start);

    mounts::mount(&mounts::DEV)?;
    if let Err(error) = console::ensure_stdio() {
        // Not fatal: a pod without a console can still be driven over vsock.
        console::log_warning(&error);
    }
    for mount in &mounts::MOUNTS {
        mounts::mount(mount)?;
    }
    steps.mark("mounts");

    let flags = cmdline::read_flags();
    steps.mark("cmdline");

    let modules = module_load::load_all(flags.debug);
    steps.mark("modules");

    // Before the ready marker: crib may press the button as soon as it sees the marker.
    let button = power_button::Button::open();
    if let Some(marker) = marker {
        marker.write(MARKER_READY);
    }
    say!(
        "ready ({} modules in {:.1} ms)",
        modules.loaded,
        millis(modules.elapsed)
    );

    let spec = pod::read_spec(Path::new(POD_SPEC_GUEST_PATH))?;
    steps.mark("pod spec");
    if let Some(spec) = &spec {
        say!(
            "pod {}: volumes {}, filesystems {}, processes {}",
            spec.name,
            spec.volumes.len(),
            spec.filesystems.len(),
            spec.processes.len()
        );
        volumes.set_up(&spec.volumes, &Layout::guest())?;
        steps.mark("volumes");
        filesystems::mount_all(&spec.filesystems, volumes)?;
        steps.mark("filesystems");
        Containers::set_up(spec)?;
        steps.mark("containers");
    }
    if let Err(error) = network::configure(spec.as_ref()) {
        // Not fatal: the processes may not need the network; the console says why.
        say!("network: {error}");
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            say!("  caused by: {cause}");
            source = cause.source();
        }
    }
    steps.mark("network");
    if flags.debug {
        steps.print();
    }
    // From here on every child is started and reaped through this.
    let reaper = Reaper::for_this_process();
    let command_running = Arc::new(AtomicBool::new(false));
    if let Some(spec) = &spec {
        let registry = Registry::for_pod(spec.clone(), reaper.clone(), RegistryOptions::guest());
        registry.start_all();
        // After the processes: the server never delays them.
        vdocker::spawn_on_vsock(registry.clone());
        *pod = Some(registry.clone());
        watch_power_button(
            button.as_ref(),
            Some(registry.clone()),
            command_running.clone(),
        );
        if let PodEnd::Shutdown(grace) = registry.wait_for_end(spec.lifetime) {
            say!(
                "shutdown requested; stopping processes (SIGKILL after {} s)",
                grace.as_secs()
            );
            return Ok(());
        }
    }

    if spec.is_none() {
        watch_power_button(button.as_ref(), None, command_running.clone());
    }
    match args.split_first() {
        Some((program, rest)) => {
            command_running.store(true, Ordering::SeqCst);
            let outcome = command::run(program, rest, &reaper)?;
            say!("{outcome}");
        }
        None => say!("no command; powering off"),
    }
    Ok(())
}

/// On a power-button press: the pod ends as on the shutdown call, and a running command
/// (with everything else but cradle) is stopped, so that boot() returns and the VM
/// powers off.
fn watch_power_button(
    button: Option<&power_button::Button>,
    pod: Option<Registry>,
    command_running: Arc<AtomicBool>,
) {
    let Some(button) = button else {
        return;
    };
    button.on_press(move || {
        if let Some(registry) = &pod {
            registry.request_shutdown(POWER_BUTTON_GRACE);
        }
        if command_running.load(Ordering::SeqCst) {
            processes::terminate_all(POWER_BUTTON_GRACE);
        }
    });
}

/// Per-step timings for `cradle.debug`.
struct Steps {
    start: Instant,
    last: Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Steps {
    fn new(start: Instant) -> Self {
        Self {
            start,
            last: start,
            done: Vec::new(),
        }
    }

    /// Records that `name` finished now.
    fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.done.push((name, now.duration_since(self.last)));
        self.last = now;
    }

    fn print(&self) {
        // CLOCK_MONOTONIC starts near zero at boot: this is how long the
        // kernel took to reach init.
        say!(
            "debug: init started {:.1} ms after boot",
            millis(uptime(self.start))
        );
        for (name, took) in &self.done {
            say!("debug: {name} {:.2} ms", millis(*took));
        }
        say!(
            "debug: total {:.2} ms",
            millis(self.last.duration_since(self.start))
        );
    }
}

/// Time since boot (CLOCK_MONOTONIC) at `instant`.
fn uptime(instant: Instant) -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the pointer, which
    // refers to a live local.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u32::try_from(now.tv_nsec).unwrap_or(0);
    Duration::new(secs, nanos).saturating_sub(instant.elapsed())
}
