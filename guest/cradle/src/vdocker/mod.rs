//! vdocker: the subset of the Docker Engine API that lets the real `docker`
//! CLI drive a pod, served by cradle on vsock port 1 (any CID) over
//! HTTP/1.1; the host forwards a Unix socket to it.
//!
//! Each process of the pod spec is a container ([`containers`]): `docker
//! ps`, `inspect`, `logs` (with `-f`, `--tail`, `-t`, `--since`),
//! `attach`, `exec` (`-i`, `-t`), `cp` both ways, `wait`, `kill`, `stop`,
//! `start`, `restart`, `top`, `stats`, `rm`. `POST /crib/v1/containers` adds a
//! container (a pod-spec process) to the running pod, `DELETE /containers/{id}` removes
//! one. `POST /crib/v1/shutdown` ends the pod (SIGTERM, SIGKILL after `t` seconds,
//! unmount, power off: the main thread does it).
//!
//! The server runs on a current-thread tokio runtime on a thread of its
//! own, started after the pod's processes are spawned so it never delays
//! them. Without a vsock device it prints one `cradle: vdocker: ...` line
//! and the pod runs without it.
//!
//! Modules: [`server`] (HTTP glue, listener, bodies), [`routing`] (paths),
//! [`api`] (handlers and JSON), [`stats`] (stats JSON), [`registry`] (the pod's containers and
//! lifecycle), [`containers`] (one process's supervision),
//! [`logs`] (bounded log store), [`exec`], [`attach`], [`archive`] (`docker
//! cp`), [`frames`] (multiplexed stream format), [`errors`], [`fdio`] and
//! [`vsock`] (fds under tokio), [`time`].

mod api;
mod archive;
mod attach;
pub mod containers;
#[cfg(test)]
mod docker_cli_tests;
mod errors;
mod exec;
mod fdio;
mod frames;
pub mod logs;
mod registry;
mod routing;
mod server;
mod stats;
mod time;
mod top;
mod vsock;

use std::io;

pub use registry::{PodEnd, Registry, RegistryOptions};
pub use server::serve;

use crate::console::{self, say};

/// The end of the one line printed when the API cannot be served.
const WITHOUT_API: &str =
    "; the pod runs without the Docker API and ends when its processes have exited";

/// Threads tokio may start for blocking work (tar for `docker cp`).
const MAX_BLOCKING_THREADS: usize = 4;

/// The runtime vdocker runs on: one thread, I/O and timers.
pub fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .thread_name("vdocker-blocking")
        .build()
}

/// Starts the Docker API for `registry` on vsock port 1, on a thread of its
/// own; returns at once. Failures print one `cradle: vdocker: ...` line.
pub fn spawn_on_vsock(registry: Registry) {
    let fallback = registry.clone();
    let spawned = std::thread::Builder::new()
        .name("vdocker".to_owned())
        .spawn(move || {
            let runtime = match runtime() {
                Ok(runtime) => runtime,
                Err(error) => {
                    say!("vdocker: cannot start its runtime: {error}{WITHOUT_API}");
                    registry.api_unavailable();
                    return;
                }
            };
            runtime.block_on(async move {
                match vsock::VsockListener::bind(vsock::VDOCKER_PORT) {
                    Ok(listener) => serve(listener, registry).await,
                    Err(error) => {
                        say!("vdocker: {}{WITHOUT_API}", console::error_chain(&error));
                        registry.api_unavailable();
                    }
                }
            });
        });
    if let Err(error) = spawned {
        say!("vdocker: cannot start its thread: {error}{WITHOUT_API}");
        fallback.api_unavailable();
    }
}
