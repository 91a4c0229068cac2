//! The entry point of the `vsock_packets` fuzz target (feature `fuzzing`): the device's
//! worker over RX and TX queues a fuzzer set up, with its muxer listening on a temporary
//! socket, a host process listening on one port for guest connections, and host sockets
//! that connect and write what the fuzzer chose; run for a few turns on the calling thread.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::metrics::{VsockMetrics, VsockMetricsSnapshot};
use super::muxer::Muxer;
use super::worker::{VsockWorker, WorkerEvents, WorkerParams};
use crate::virtio::{GuestMemoryMmap, VirtioInterrupt, VirtioInterruptType};

/// The guest's CID.
pub const GUEST_CID: u64 = 3;
/// The host port a host process listens on (`<socket>_1024`): guest connections to it
/// succeed, to any other port get RST.
pub const LISTENING_PORT: u32 = 1024;

/// What one run did.
#[derive(Debug)]
pub struct VsockOutcome {
    /// The worker found a queue broken (it would set DEVICE_NEEDS_RESET).
    pub broken: bool,
    /// The device's counters at the end.
    pub metrics: VsockMetricsSnapshot,
}

#[derive(Default)]
struct NoInterrupt {
    needs_reset: AtomicBool,
}

impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _kind: VirtioInterruptType) -> std::io::Result<()> {
        Ok(())
    }

    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::Relaxed);
    }
}

/// Removes the run's socket files.
struct Paths(Vec<PathBuf>);

impl Drop for Paths {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The first host port the device gives a host-initiated connection.
pub const FIRST_HOST_PORT: u32 = super::muxer::FIRST_EPHEMERAL_PORT;

/// Runs a worker on `rx` and `tx` (set up by the caller over `mem`): starts it, connects
/// one host socket per entry of `host_writes` and writes that entry to it (a `CONNECT
/// <port>\n` line, data, or anything), then runs `turns` turns as if both queues were
/// kicked each time, calling `before_turn(n)` before turn `n` (the driver may queue more
/// chains there, answering what the device sent).
pub fn run(
    mem: &GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    host_writes: &[Vec<u8>],
    turns: u8,
    before_turn: &mut dyn FnMut(u8),
) -> VsockOutcome {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let socket = std::env::temp_dir().join(format!("crib-fuzz-vsock-{}-{n}", std::process::id()));
    let mut port_socket = socket.as_os_str().to_owned();
    port_socket.push(format!("_{LISTENING_PORT}"));
    let port_socket = PathBuf::from(port_socket);
    let _paths = Paths(vec![socket.clone(), port_socket.clone()]);
    let listener = UnixListener::bind(&socket).expect("bind the vsock socket");
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    // Guest connections to LISTENING_PORT land in this one's backlog.
    let _host_listener = UnixListener::bind(&port_socket).expect("bind the port socket");

    let metrics = Arc::new(VsockMetrics::default());
    let muxer = Muxer::new(GUEST_CID, socket.clone(), listener, metrics.clone());
    let kick = || EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let (rx_kick, tx_kick) = (kick(), kick());
    let events = WorkerEvents {
        rx_kick: rx_kick.try_clone().expect("eventfd"),
        tx_kick: tx_kick.try_clone().expect("eventfd"),
        event_kick: kick(),
        kill: kick(),
    };
    let params = WorkerParams {
        guest_cid: GUEST_CID,
        metrics: metrics.clone(),
    };
    let interrupt = Arc::new(NoInterrupt::default());
    let Ok(mut worker) = VsockWorker::new(params, mem.clone(), interrupt, rx, tx, muxer, events)
    else {
        return VsockOutcome {
            broken: true,
            metrics: metrics.snapshot(),
        };
    };
    let mut result = worker.start();
    let mut hosts: Vec<UnixStream> = Vec::new();
    for bytes in host_writes {
        if let Ok(mut stream) = UnixStream::connect(&socket) {
            let _ = stream.set_nonblocking(true);
            let _ = stream.write(bytes);
            hosts.push(stream);
        }
    }
    for turn in 0..turns {
        if result.is_err() {
            break;
        }
        before_turn(turn);
        let _ = rx_kick.write(1);
        let _ = tx_kick.write(1);
        result = worker.turn(Some(Duration::ZERO)).map(|_| ());
    }
    VsockOutcome {
        broken: result.is_err(),
        metrics: metrics.snapshot(),
    }
}
