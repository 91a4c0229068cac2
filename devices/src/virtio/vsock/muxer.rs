//! The host side of the device: the listener on the `socket=` path, the `CONNECT <port>`
//! handshake of host processes, the connections by (host port, guest port), the RSTs owed
//! for packets that name no connection, and which packet goes to the guest next.
//!
//! The muxer owns every socket; the worker owns the epoll instance. Each slot (a socket
//! in the handshake, or a connection) has an epoll token; the muxer notes which slots may
//! need different events and [`Muxer::sync_epoll`] applies that once per loop turn.
//! Connections waiting to send to the guest sit in a round-robin queue, so one busy
//! connection cannot starve the others of RX buffers.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{Connection, State};
use super::metrics::{inc, VsockMetrics};
use super::packet::{Header, Rejection};
use super::unix::connect_nonblocking;
use super::{HANDSHAKE_TIMEOUT_MS, MAX_CONNECTIONS, MAX_PENDING_RESETS, OP_REQUEST, OP_RST};

/// Epoll token of the listener.
pub(crate) const LISTENER_TOKEN: u64 = 4;
/// First epoll token of a slot; the worker's own tokens are below.
const FIRST_SLOT_TOKEN: u64 = 16;
/// First host port given to host-initiated connections.
pub(crate) const FIRST_EPHEMERAL_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line read (the longest valid one is 19 bytes).
const HANDSHAKE_BYTES: usize = 32;
/// How long the listener rests after accept() fails (out of descriptors, say), so a
/// pending connection does not spin the worker.
const ACCEPT_BACKOFF_MS: u64 = 100;
/// Bytes read from a host socket per read() call.
const READ_CHUNK_BYTES: usize = 64 << 10;

/// Log-once bit numbers of host-side events.
const LOG_ACCEPT: u32 = 0;
const LOG_FULL: u32 = 1;
const LOG_EPOLL: u32 = 2;
const LOG_VIOLATION: u32 = 3;
/// Log-once bit numbers of packet errors start here (plus `PacketError::kind_index`).
const LOG_PACKET_BASE: u32 = 8;

/// A host socket that has not sent its `CONNECT` line yet.
struct Handshake {
    stream: UnixStream,
    line: [u8; HANDSHAKE_BYTES],
    len: usize,
    deadline: Instant,
    registered: Option<EventSet>,
}

enum Slot {
    Handshake(Handshake),
    Conn(Connection),
}

/// The host side; see the module documentation.
pub(crate) struct Muxer {
    guest_cid: u64,
    socket_path: PathBuf,
    listener: UnixListener,
    listener_registered: bool,
    /// accept() failed: the listener is out of epoll until then.
    listener_paused_until: Option<Instant>,
    slots: HashMap<u64, Slot>,
    by_key: HashMap<(u32, u32), u64>,
    next_token: u64,
    next_ephemeral_port: u32,
    /// RSTs for packets that name no connection (or for connections already forgotten).
    resets: VecDeque<Header>,
    /// Connections with something for the guest, in turn.
    rx_ready: VecDeque<u64>,
    /// Slots whose epoll events may have changed.
    dirty: Vec<u64>,
    scratch: Vec<u8>,
    metrics: Arc<VsockMetrics>,
    logged: u64,
}

impl Muxer {
    /// `listener` must be non-blocking; guest connections to port P go to `socket_path`_P.
    pub fn new(
        guest_cid: u64,
        socket_path: PathBuf,
        listener: UnixListener,
        metrics: Arc<VsockMetrics>,
    ) -> Self {
        Self {
            guest_cid,
            socket_path,
            listener,
            listener_registered: false,
            listener_paused_until: None,
            slots: HashMap::new(),
            by_key: HashMap::new(),
            next_token: FIRST_SLOT_TOKEN,
            next_ephemeral_port: FIRST_EPHEMERAL_PORT,
            resets: VecDeque::new(),
            rx_ready: VecDeque::new(),
            dirty: Vec::new(),
            scratch: vec![0; READ_CHUNK_BYTES],
            metrics,
            logged: 0,
        }
    }

    /// Live connections (not counting sockets still in the handshake).
    #[cfg(test)]
    pub fn connection_count(&self) -> usize {
        self.by_key.len()
    }

    fn log_once(&mut self, bit: u32) -> bool {
        let mask = 1u64 << bit.min(63);
        let first = self.logged & mask == 0;
        self.logged |= mask;
        first
    }

    fn add_slot(&mut self, slot: Slot) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        self.slots.insert(token, slot);
        self.dirty.push(token);
        token
    }

    /// Accepts every pending host connection into the handshake.
    pub fn accept(&mut self, now: Instant) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.slots.len() >= MAX_CONNECTIONS {
                        inc(&self.metrics.connections_refused);
                        if self.log_once(LOG_FULL) {
                            tracing::warn!(
                                max = MAX_CONNECTIONS,
                                "vsock: too many connections; refusing host connections (logged once)"
                            );
                        }
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    self.add_slot(Slot::Handshake(Handshake {
                        stream,
                        line: [0; HANDSHAKE_BYTES],
                        len: 0,
                        deadline: now + Duration::from_millis(HANDSHAKE_TIMEOUT_MS),
                        registered: None,
                    }));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if self.log_once(LOG_ACCEPT) {
                        tracing::warn!(error = %e, "vsock: cannot accept host connections (logged once)");
                    }
                    self.listener_paused_until =
                        Some(now + Duration::from_millis(ACCEPT_BACKOFF_MS));
                    break;
                }
            }
        }
    }

    /// A slot's socket is ready.
    pub fn handle_event(&mut self, token: u64, events: EventSet, now: Instant) {
        match self.slots.get_mut(&token) {
            Some(Slot::Handshake(_)) => self.read_handshake(token, events, now),
            Some(Slot::Conn(conn)) => {
                conn.on_host_event(events, &mut self.scratch);
                self.settle(token);
            }
            None => {}
        }
    }

    fn read_handshake(&mut self, token: u64, events: EventSet, now: Instant) {
        let Some(Slot::Handshake(hs)) = self.slots.get_mut(&token) else {
            return;
        };
        let mut done = false;
        let mut line_end = None;
        while hs.len < HANDSHAKE_BYTES {
            match hs.stream.read(&mut hs.line[hs.len..]) {
                Ok(0) => {
                    done = true;
                    break;
                }
                Ok(n) => {
                    let start = hs.len;
                    hs.len += n;
                    if let Some(i) = hs.line[start..hs.len].iter().position(|&b| b == b'\n') {
                        line_end = Some(start + i);
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    done = true;
                    break;
                }
            }
        }
        if line_end.is_none() && (hs.len == HANDSHAKE_BYTES || events.contains(EventSet::ERROR)) {
            done = true;
        }
        if let Some(end) = line_end {
            let Some(Slot::Handshake(hs)) = self.slots.remove(&token) else {
                return;
            };
            match parse_connect(&hs.line[..end]) {
                Some(port) => self.connect_to_guest(token, hs, end, port, now),
                None => tracing::debug!("vsock: host socket sent a bad CONNECT line; closed"),
            }
        } else if done || events.contains(EventSet::HANG_UP) {
            self.slots.remove(&token);
        }
    }

    /// A host process asked for guest port `port`: owe the guest a REQUEST.
    fn connect_to_guest(&mut self, token: u64, hs: Handshake, end: usize, port: u32, now: Instant) {
        let Some(local_port) = self.allocate_port() else {
            inc(&self.metrics.connections_refused);
            return;
        };
        let early = hs.line.get(end + 1..hs.len).unwrap_or_default();
        let mut conn = Connection::host_initiated(hs.stream, local_port, port, early, now);
        conn.registered = hs.registered;
        self.by_key.insert(conn.key(), token);
        self.slots.insert(token, Slot::Conn(conn));
        self.settle(token);
    }

    /// A host port from [`FIRST_EPHEMERAL_PORT`] up that no live connection uses.
    fn allocate_port(&mut self) -> Option<u32> {
        // At most MAX_CONNECTIONS ports are taken: this ends within that many + 1 tries.
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_ephemeral_port;
            self.next_ephemeral_port = if port >= u32::MAX - 1 {
                FIRST_EPHEMERAL_PORT
            } else {
                port + 1
            };
            let taken = self.slots.values().any(|s| match s {
                Slot::Conn(c) => c.local_port() == port,
                Slot::Handshake(_) => false,
            });
            if !taken {
                return Some(port);
            }
        }
        None
    }

    /// A valid packet from the guest.
    pub fn handle_guest_packet(&mut self, header: &Header, data: &[u8], now: Instant) {
        let key = (header.dst_port, header.src_port);
        match (header.op, self.by_key.get(&key).copied()) {
            (OP_REQUEST, Some(token)) => {
                // A second REQUEST for a live pair: the guest lost track; start over.
                self.note_violation("REQUEST for a connection that exists");
                self.close(token, true);
            }
            (OP_REQUEST, None) => self.connect_to_host(header),
            (OP_RST, None) => {}
            (_, None) => {
                self.note_violation("packet for no connection");
                self.push_reset(header.reset_reply(self.guest_cid));
            }
            (_, Some(token)) => {
                if let Some(Slot::Conn(conn)) = self.slots.get_mut(&token) {
                    let was_connecting = conn.state() == State::Connecting;
                    conn.update_peer_credit(header.buf_alloc, header.fwd_cnt);
                    let result = conn.on_packet(header, data, now);
                    if was_connecting && conn.state() == State::Established {
                        inc(&self.metrics.connections_opened);
                    }
                    if let Err(violation) = result {
                        self.note_violation(&violation.to_string());
                    }
                }
                self.settle(token);
            }
        }
    }

    fn note_violation(&mut self, what: &str) {
        inc(&self.metrics.invalid_packets);
        if self.log_once(LOG_VIOLATION) {
            tracing::warn!(
                problem = what,
                "vsock: guest packet breaks the protocol; connection reset (logged once)"
            );
        }
    }

    /// The guest connects to host port `P`: connect to `<socket>_P`, answer RESPONSE or RST.
    fn connect_to_host(&mut self, request: &Header) {
        if self.slots.len() >= MAX_CONNECTIONS {
            inc(&self.metrics.connections_refused);
            self.push_reset(request.reset_reply(self.guest_cid));
            return;
        }
        let path = port_path(&self.socket_path, request.dst_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                inc(&self.metrics.connections_opened);
                let conn = Connection::guest_initiated(stream, request);
                let key = conn.key();
                let token = self.add_slot(Slot::Conn(conn));
                self.by_key.insert(key, token);
                self.settle(token);
            }
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "vsock: guest connection refused");
                inc(&self.metrics.connections_refused);
                self.push_reset(request.reset_reply(self.guest_cid));
            }
        }
    }

    /// A packet the checks refused: count it, log its kind once, answer RST when its
    /// header could be read (never to a RST), and close the connection it named.
    pub fn reject(&mut self, rejection: Rejection) {
        inc(&self.metrics.invalid_packets);
        let bit = LOG_PACKET_BASE + rejection.error.kind_index();
        if self.log_once(bit) {
            tracing::warn!(
                error = %crate::virtio::block::error_chain(&rejection.error),
                "vsock: invalid guest packet dropped (logged once per kind)"
            );
        }
        let Some(header) = rejection.header else {
            return;
        };
        if header.op == OP_RST {
            return;
        }
        match self
            .by_key
            .get(&(header.dst_port, header.src_port))
            .copied()
        {
            Some(token) => self.close(token, true),
            None => self.push_reset(header.reset_reply(self.guest_cid)),
        }
    }

    fn push_reset(&mut self, header: Header) {
        if self.resets.len() >= MAX_PENDING_RESETS {
            inc(&self.metrics.resets_dropped);
            return;
        }
        self.resets.push_back(header);
    }

    /// Forgets a connection (its socket closes), owing the guest a RST if `reset_guest`.
    fn close(&mut self, token: u64, reset_guest: bool) {
        let Some(slot) = self.slots.remove(&token) else {
            return;
        };
        if let Slot::Conn(conn) = slot {
            self.by_key.remove(&conn.key());
            if reset_guest {
                self.push_reset(conn.reset_header(self.guest_cid));
            }
        }
    }

    /// After a connection changed: forget it if closed, else queue it for the guest and
    /// re-check its epoll events.
    fn settle(&mut self, token: u64) {
        let Some(Slot::Conn(conn)) = self.slots.get_mut(&token) else {
            return;
        };
        if let State::Closed { reset_guest } = conn.state() {
            self.close(token, reset_guest);
            return;
        }
        if !conn.queued && conn.has_rx() {
            conn.queued = true;
            self.rx_ready.push_back(token);
        }
        self.dirty.push(token);
    }

    /// Something may be owed to the guest.
    pub fn has_rx(&self) -> bool {
        !self.resets.is_empty() || !self.rx_ready.is_empty()
    }

    /// The next packet for the guest given an RX buffer with `data_room` bytes for data;
    /// its data in `data`. `None` when nothing fits.
    pub fn next_rx(
        &mut self,
        data_room: usize,
        data: &mut Vec<u8>,
        now: Instant,
    ) -> Option<Header> {
        data.clear();
        if let Some(reset) = self.resets.pop_front() {
            inc(&self.metrics.resets_sent);
            return Some(reset);
        }
        for _ in 0..self.rx_ready.len() {
            let token = self.rx_ready.pop_front()?;
            let Some(Slot::Conn(conn)) = self.slots.get_mut(&token) else {
                continue;
            };
            conn.queued = false;
            if let Some(header) = conn.next_rx(self.guest_cid, data_room, data, now) {
                self.settle(token);
                return Some(header);
            }
            if conn.has_rx() {
                // Data waits for an RX buffer with room for it.
                conn.queued = true;
                self.rx_ready.push_back(token);
            }
        }
        None
    }

    /// The earliest timeout of any slot (or of the listener's rest).
    pub fn next_deadline(&self) -> Option<Instant> {
        let slots = self.slots.values().filter_map(|s| match s {
            Slot::Handshake(hs) => Some(hs.deadline),
            Slot::Conn(c) => c.deadline(),
        });
        slots.chain(self.listener_paused_until).min()
    }

    /// Ends whatever timed out by `now`.
    pub fn expire(&mut self, now: Instant) {
        if self.listener_paused_until.is_some_and(|t| t <= now) {
            self.listener_paused_until = None;
        }
        let expired: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| match s {
                Slot::Handshake(hs) => hs.deadline <= now,
                Slot::Conn(c) => c.deadline().is_some_and(|d| d <= now),
            })
            .map(|(&t, _)| t)
            .collect();
        for token in expired {
            match self.slots.get_mut(&token) {
                Some(Slot::Handshake(_)) => {
                    self.slots.remove(&token);
                }
                Some(Slot::Conn(conn)) => {
                    conn.on_deadline(now);
                    self.settle(token);
                }
                None => {}
            }
        }
    }

    /// Applies the epoll events slots need now (and the listener's).
    pub fn sync_epoll(&mut self, epoll: &Epoll) {
        let listener_wanted = self.listener_paused_until.is_none();
        if listener_wanted != self.listener_registered {
            let fd = self.listener.as_raw_fd();
            let result = if listener_wanted {
                epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
                )
            } else {
                epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())
            };
            match result {
                Ok(()) => self.listener_registered = listener_wanted,
                Err(e) => self.log_epoll_error(&e),
            }
        }

        let mut dirty = std::mem::take(&mut self.dirty);
        for token in dirty.drain(..) {
            let (fd, wanted, registered) = match self.slots.get(&token) {
                Some(Slot::Handshake(hs)) => {
                    (hs.stream.as_raw_fd(), Some(EventSet::IN), hs.registered)
                }
                Some(Slot::Conn(c)) => (c.fd(), c.interest(), c.registered),
                None => continue,
            };
            if wanted == registered {
                continue;
            }
            match update_epoll(epoll, fd, token, registered, wanted) {
                Ok(()) => match self.slots.get_mut(&token) {
                    Some(Slot::Handshake(hs)) => hs.registered = wanted,
                    Some(Slot::Conn(c)) => c.registered = wanted,
                    None => {}
                },
                Err(e) => {
                    // Out of epoll watches: a socket nobody watches would hang; end it.
                    self.log_epoll_error(&e);
                    self.close(token, true);
                }
            }
        }
        self.dirty = dirty;
    }

    fn log_epoll_error(&mut self, e: &io::Error) {
        if self.log_once(LOG_EPOLL) {
            tracing::error!(error = %e, "vsock: epoll_ctl failed (logged once)");
        }
    }
}

fn update_epoll(
    epoll: &Epoll,
    fd: RawFd,
    token: u64,
    registered: Option<EventSet>,
    wanted: Option<EventSet>,
) -> io::Result<()> {
    match (registered, wanted) {
        (None, Some(events)) => {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
        }
        (Some(_), Some(events)) => {
            epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
        }
        (Some(_), None) => epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default()),
        (None, None) => Ok(()),
    }
}

/// The port of a `CONNECT <port>` line (without its newline).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    text.strip_prefix("CONNECT ")?.trim().parse().ok()
}

/// `<socket>_<port>`: where a guest connection to host port `port` goes.
fn port_path(socket: &Path, port: u32) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(format!("_{port}"));
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_connect_reads_port() {
        assert_eq!(parse_connect(b"CONNECT 1234"), Some(1234));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
    }

    #[test]
    fn parse_connect_refuses_garbage() {
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"connect 1"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }

    #[test]
    fn port_path_appends_underscore_and_port() {
        assert_eq!(
            port_path(Path::new("/run/x.sock"), 1234),
            PathBuf::from("/run/x.sock_1234")
        );
    }
}
