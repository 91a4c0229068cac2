//! One stream connection between a guest port and a host Unix socket (virtio 1.2 §5.10.6.3
//! "Buffer Space Management" and §5.10.6.5 "Stream Sockets"): its life cycle and its credit
//! accounting both ways.
//!
//! Credit (§5.10.6.3): each side advertises `buf_alloc`, the bytes it can buffer, and
//! `fwd_cnt`, the bytes it has consumed; a sender with `tx_cnt` bytes sent may have at most
//! `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)` more in flight. The counters wrap at 2^32.
//! - Guest to host: data the socket cannot take at once is kept, up to [`CONN_BUF_BYTES`]
//!   (our `buf_alloc`); more is a credit violation and resets the connection. `fwd_cnt`
//!   counts bytes the socket took; a CREDIT_UPDATE goes out once a quarter of the buffer
//!   was freed since the guest last heard, or when the guest asks.
//! - Host to guest: the device reads ahead up to [`HOST_READ_AHEAD_BYTES`] and sends no
//!   more than the guest's credit: "VIRTIO_VSOCK_OP_RW data packets MUST only be
//!   transmitted when the peer has sufficient free buffer space for the payload"
//!   (§5.10.6.3.2). A guest without credit leaves the socket unread.
//!
//! Closing: guest SHUTDOWN(RCV) drops unsent host data and shuts the socket's read side;
//! SHUTDOWN(SEND) shuts its write side once guest data is flushed; both flags end the
//! connection with RST once flushed. Host EOF becomes SHUTDOWN(SEND) after the last data;
//! a host socket closed both ways (EPOLLHUP) becomes SHUTDOWN(SEND|RCV), then RST on the
//! guest's answer or after [`CLOSE_TIMEOUT_MS`].

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::packet::Header;
use super::unix::send_nosignal;
use super::{
    CLOSE_TIMEOUT_MS, CONNECT_TIMEOUT_MS, CONN_BUF_BYTES, HOST_CID, HOST_READ_AHEAD_BYTES,
    MAX_PKT_DATA_BYTES, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST,
    OP_RW, OP_SHUTDOWN, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Freed bytes that make a CREDIT_UPDATE worth sending unasked.
const CREDIT_UPDATE_THRESHOLD_BYTES: u32 = CONN_BUF_BYTES / 4;

const PENDING_REQUEST: u8 = 1;
const PENDING_RESPONSE: u8 = 2;
const PENDING_CREDIT_UPDATE: u8 = 4;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// Host-initiated: the guest has not answered our REQUEST yet.
    Connecting,
    /// The stream is open, maybe half-closed.
    Established,
    /// Over: the muxer forgets it, telling the guest with RST if `reset_guest`.
    Closed { reset_guest: bool },
}

/// A guest packet that breaks the protocol for its connection; the connection is reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Violation {
    #[error("op {op} is not valid in the connection's state")]
    UnexpectedOp { op: u16 },
    #[error("data beyond the credit the device gave")]
    CreditExceeded,
    #[error("data after the guest's SHUTDOWN(SEND)")]
    DataAfterShutdown,
}

/// One connection; see the module documentation.
pub(crate) struct Connection {
    stream: UnixStream,
    local_port: u32,
    peer_port: u32,
    state: State,
    /// Packets other than data and SHUTDOWN owed to the guest (`PENDING_*` bits).
    pending: u8,

    /// Guest data (and, first, our `OK` line) waiting for the host socket.
    to_host: VecDeque<u8>,
    /// Bytes at the front of `to_host` that are not guest data: they do not count toward
    /// `fwd_cnt`.
    to_host_preamble: usize,
    /// Guest data bytes received.
    rx_cnt: Wrapping<u32>,
    /// Guest data bytes the host socket took.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as the guest last heard it.
    fwd_cnt_sent: Wrapping<u32>,

    /// Host data read ahead, waiting for guest credit and RX buffers.
    to_guest: VecDeque<u8>,
    /// Host data bytes sent to the guest.
    tx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,

    /// SHUTDOWN flags the guest sent, accumulated.
    guest_shutdown: u32,
    /// SHUTDOWN flags sent to the guest, accumulated.
    shutdown_sent: u32,
    /// The host socket reached EOF: the host sends no more.
    host_eof: bool,
    /// The host socket is shut both ways (EPOLLHUP): nothing can be written to it.
    host_closed: bool,
    /// When the connect or close timeout ends the connection.
    deadline: Option<Instant>,

    /// The events epoll watches on the socket; `None` when it is not registered.
    pub registered: Option<EventSet>,
    /// The connection is in the muxer's RX queue.
    pub queued: bool,
}

impl Connection {
    /// A connection a host process asked for with `CONNECT <peer_port>`: a REQUEST is owed
    /// to the guest. `early_data` came after the `CONNECT` line.
    pub fn host_initiated(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        early_data: &[u8],
        now: Instant,
    ) -> Self {
        let mut c = Self::new(stream, local_port, peer_port, State::Connecting);
        c.pending = PENDING_REQUEST;
        c.to_guest.extend(early_data);
        c.deadline = Some(now + Duration::from_millis(CONNECT_TIMEOUT_MS));
        c
    }

    /// A connection the guest asked for with REQUEST, already connected to its host
    /// socket: a RESPONSE is owed to the guest.
    pub fn guest_initiated(stream: UnixStream, request: &Header) -> Self {
        let mut c = Self::new(
            stream,
            request.dst_port,
            request.src_port,
            State::Established,
        );
        c.pending = PENDING_RESPONSE;
        c.update_peer_credit(request.buf_alloc, request.fwd_cnt);
        c
    }

    fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Self {
        Self {
            stream,
            local_port,
            peer_port,
            state,
            pending: 0,
            to_host: VecDeque::new(),
            to_host_preamble: 0,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            to_guest: VecDeque::new(),
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            guest_shutdown: 0,
            shutdown_sent: 0,
            host_eof: false,
            host_closed: false,
            deadline: None,
            registered: None,
            queued: false,
        }
    }

    /// (host port, guest port).
    pub fn key(&self) -> (u32, u32) {
        (self.local_port, self.peer_port)
    }

    pub fn local_port(&self) -> u32 {
        self.local_port
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Ends the connection; the socket closes when the muxer drops it.
    pub fn close(&mut self, reset_guest: bool) {
        self.state = State::Closed { reset_guest };
    }

    /// Bytes the guest can take now (§5.10.6.3), 0 if it claims to have consumed more than
    /// it was sent (only a lying guest does; it only stalls itself).
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Records the credit fields every guest packet carries.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// Handles a guest packet for this connection (credit fields already recorded). A
    /// violation closes the connection with RST.
    pub fn on_packet(
        &mut self,
        header: &Header,
        data: &[u8],
        now: Instant,
    ) -> Result<(), Violation> {
        let result = match (header.op, self.state) {
            (_, State::Closed { .. }) => Ok(()),
            (OP_RST, _) => {
                self.close(false);
                Ok(())
            }
            (OP_RESPONSE, State::Connecting) => {
                self.on_response();
                Ok(())
            }
            (OP_SHUTDOWN, State::Established) => {
                self.on_shutdown(header.flags, now);
                Ok(())
            }
            (OP_RW, State::Established) => self.on_data(data),
            (OP_CREDIT_UPDATE, _) => Ok(()),
            (OP_CREDIT_REQUEST, _) => {
                self.pending |= PENDING_CREDIT_UPDATE;
                Ok(())
            }
            (op, _) => Err(Violation::UnexpectedOp { op }),
        };
        if result.is_err() {
            self.close(true);
        }
        result
    }

    /// The guest accepted our REQUEST: tell the host process which port it got.
    fn on_response(&mut self) {
        self.state = State::Established;
        self.deadline = None;
        if self.host_closed {
            self.close(true);
            return;
        }
        let line = format!("OK {}\n", self.local_port);
        self.to_host_preamble = line.len();
        self.to_host.extend(line.as_bytes());
        if self.flush_to_host().is_err() {
            self.close(true);
        }
    }

    fn on_shutdown(&mut self, flags: u32, now: Instant) {
        let new = flags & SHUTDOWN_BOTH & !self.guest_shutdown;
        self.guest_shutdown |= new;
        if new & SHUTDOWN_RCV != 0 {
            // The guest reads no more: unsent host data has no reader, and the host
            // process should learn that its writes fail.
            self.to_guest.clear();
            let _ = self.stream.shutdown(Shutdown::Read);
        }
        if new & SHUTDOWN_SEND != 0 && self.to_host.is_empty() {
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        if self.guest_shutdown == SHUTDOWN_BOTH {
            if self.to_host.is_empty() || self.host_closed {
                self.close(true);
            } else {
                self.deadline = Some(now + Duration::from_millis(CLOSE_TIMEOUT_MS));
            }
        }
    }

    fn on_data(&mut self, data: &[u8]) -> Result<(), Violation> {
        if self.guest_shutdown & SHUTDOWN_SEND != 0 {
            return Err(Violation::DataAfterShutdown);
        }
        let len = u32::try_from(data.len()).map_err(|_| Violation::CreditExceeded)?;
        let buffered = (self.rx_cnt - self.fwd_cnt).0;
        if buffered.checked_add(len).is_none_or(|b| b > CONN_BUF_BYTES) {
            return Err(Violation::CreditExceeded);
        }
        self.rx_cnt += len;
        if self.host_closed {
            // Nobody will read it: count it as consumed so the guest never stalls on it.
            self.fwd_cnt += len;
            self.note_forwarded();
            return Ok(());
        }
        let mut rest = data;
        if self.to_host.is_empty() {
            match send_nosignal(&self.stream, data) {
                Ok(n) => {
                    rest = data.get(n..).unwrap_or_default();
                    self.account_sent(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.close(true);
                    return Ok(());
                }
            }
        }
        self.to_host.extend(rest);
        Ok(())
    }

    /// Counts `n` bytes the host socket took from the front of `to_host` (or directly).
    fn account_sent(&mut self, n: usize) {
        let preamble = n.min(self.to_host_preamble);
        self.to_host_preamble -= preamble;
        // n - preamble is at most one packet or the buffer: both fit in u32.
        let data = u32::try_from(n - preamble).unwrap_or(u32::MAX);
        self.fwd_cnt += data;
        self.note_forwarded();
    }

    fn note_forwarded(&mut self) {
        if (self.fwd_cnt - self.fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD_BYTES {
            self.pending |= PENDING_CREDIT_UPDATE;
        }
    }

    /// Writes what the host socket takes of `to_host`.
    fn flush_to_host(&mut self) -> io::Result<()> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match send_nosignal(&self.stream, front) {
                Ok(0) => break,
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.account_sent(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The host socket is ready (epoll `events`). `scratch` is the muxer's read buffer.
    pub fn on_host_event(&mut self, events: EventSet, scratch: &mut [u8]) {
        if matches!(self.state, State::Closed { .. }) {
            return;
        }
        if events.contains(EventSet::ERROR) {
            self.close(true);
            return;
        }
        if events.contains(EventSet::HANG_UP) && !self.host_closed {
            self.host_closed = true;
            self.to_host.clear();
            self.to_host_preamble = 0;
            if self.state == State::Connecting {
                // Tell the guest only if it has heard of the connection.
                self.close(self.pending & PENDING_REQUEST == 0);
                return;
            }
            if self.guest_shutdown == SHUTDOWN_BOTH {
                self.close(true);
                return;
            }
        }
        if self.state != State::Established {
            return;
        }
        if !self.to_host.is_empty() {
            if self.flush_to_host().is_err() {
                self.close(true);
                return;
            }
            if self.to_host.is_empty() {
                self.on_flushed();
                if matches!(self.state, State::Closed { .. }) {
                    return;
                }
            }
        }
        if self.wants_read() {
            self.read_host(scratch);
        }
    }

    /// Everything the guest sent reached the host socket.
    fn on_flushed(&mut self) {
        if self.guest_shutdown & SHUTDOWN_SEND != 0 {
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        if self.guest_shutdown == SHUTDOWN_BOTH {
            self.close(true);
        }
    }

    fn wants_read(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && self.guest_shutdown & SHUTDOWN_RCV == 0
            && self.to_guest.len() < HOST_READ_AHEAD_BYTES
    }

    fn read_host(&mut self, scratch: &mut [u8]) {
        while self.to_guest.len() < HOST_READ_AHEAD_BYTES {
            let room = (HOST_READ_AHEAD_BYTES - self.to_guest.len()).min(scratch.len());
            if room == 0 {
                // A zero-length read would look like EOF.
                break;
            }
            match self.stream.read(&mut scratch[..room]) {
                Ok(0) => {
                    self.host_eof = true;
                    break;
                }
                Ok(n) => self.to_guest.extend(&scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close(true);
                    break;
                }
            }
        }
    }

    /// The connect or close timeout ran out: give up with RST.
    pub fn on_deadline(&mut self, now: Instant) {
        if self.deadline.is_some_and(|d| d <= now) {
            self.close(true);
        }
    }

    /// The host sends no more: it reached EOF, or it closed while the guest reads no more.
    fn host_done(&self) -> bool {
        self.host_eof || (self.host_closed && self.guest_shutdown & SHUTDOWN_RCV != 0)
    }

    /// The SHUTDOWN flags owed to the guest, once all host data went out.
    fn shutdown_due(&self) -> Option<u32> {
        if self.state != State::Established || !self.host_done() || !self.to_guest.is_empty() {
            return None;
        }
        let mut flags = SHUTDOWN_SEND;
        if self.host_closed {
            flags |= SHUTDOWN_RCV;
        }
        (flags & !self.shutdown_sent != 0).then_some(flags)
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && self.guest_shutdown & SHUTDOWN_RCV == 0
            && !self.to_guest.is_empty()
            && self.peer_credit() > 0
    }

    /// Something is owed to the guest (given an RX buffer with room for data).
    pub fn has_rx(&self) -> bool {
        !matches!(self.state, State::Closed { .. })
            && (self.pending != 0 || self.can_send_data() || self.shutdown_due().is_some())
    }

    /// The next packet for the guest, its data (if any) in `data`, given an RX buffer with
    /// `data_room` bytes for data.
    pub fn next_rx(
        &mut self,
        guest_cid: u64,
        data_room: usize,
        data: &mut Vec<u8>,
        now: Instant,
    ) -> Option<Header> {
        data.clear();
        if matches!(self.state, State::Closed { .. }) {
            return None;
        }
        let (op, flags) = if self.pending & PENDING_REQUEST != 0 {
            self.pending &= !PENDING_REQUEST;
            (OP_REQUEST, 0)
        } else if self.pending & PENDING_RESPONSE != 0 {
            self.pending &= !PENDING_RESPONSE;
            (OP_RESPONSE, 0)
        } else if self.can_send_data() && data_room > 0 {
            let credit = usize::try_from(self.peer_credit()).unwrap_or(usize::MAX);
            let max = usize::try_from(MAX_PKT_DATA_BYTES).unwrap_or(usize::MAX);
            let n = self.to_guest.len().min(credit).min(data_room).min(max);
            let (a, b) = self.to_guest.as_slices();
            let from_a = n.min(a.len());
            data.extend_from_slice(&a[..from_a]);
            data.extend_from_slice(&b[..n - from_a]);
            self.to_guest.drain(..n);
            // n <= MAX_PKT_DATA_BYTES.
            self.tx_cnt += u32::try_from(n).unwrap_or(0);
            (OP_RW, 0)
        } else if self.pending & PENDING_CREDIT_UPDATE != 0 {
            (OP_CREDIT_UPDATE, 0)
        } else if let Some(flags) = self.shutdown_due() {
            self.shutdown_sent |= flags;
            if flags & SHUTDOWN_RCV != 0 {
                // Closed both ways: the guest answers RST, or we do after the timeout.
                self.deadline = Some(now + Duration::from_millis(CLOSE_TIMEOUT_MS));
            }
            (OP_SHUTDOWN, flags)
        } else {
            return None;
        };
        // Every packet carries fwd_cnt: any of them is a credit update.
        self.pending &= !PENDING_CREDIT_UPDATE;
        self.fwd_cnt_sent = self.fwd_cnt;
        Some(self.header(guest_cid, op, flags, data.len()))
    }

    /// The RST that ends this connection for the guest.
    pub fn reset_header(&self, guest_cid: u64) -> Header {
        self.header(guest_cid, OP_RST, 0, 0)
    }

    fn header(&self, guest_cid: u64, op: u16, flags: u32, len: usize) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: u32::try_from(len).unwrap_or(0),
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_BYTES,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The events epoll should watch; `None` to leave the socket out of epoll (a socket
    /// shut both ways reports EPOLLHUP whatever it is asked for).
    pub fn interest(&self) -> Option<EventSet> {
        match self.state {
            State::Closed { .. } => None,
            State::Connecting if self.host_closed => None,
            // Only HANG_UP and ERROR, which epoll always reports: the host gave up.
            State::Connecting => Some(EventSet::empty()),
            State::Established => {
                let mut events = EventSet::empty();
                if self.wants_read() {
                    events |= EventSet::IN;
                }
                if !self.to_host.is_empty() {
                    events |= EventSet::OUT;
                }
                if events.is_empty() && self.host_closed {
                    None
                } else {
                    Some(events)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::virtio::vsock::test_utils::{guest_header, GUEST_CID};

    const HOST_PORT: u32 = 1 << 30;
    const GUEST_PORT: u32 = 5000;

    fn now() -> Instant {
        Instant::now()
    }

    /// An established guest-initiated connection and the host end of its socket.
    fn established(peer_buf_alloc: u32) -> (Connection, UnixStream) {
        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut request = guest_header(OP_REQUEST, GUEST_PORT, HOST_PORT);
        request.buf_alloc = peer_buf_alloc;
        let mut c = Connection::guest_initiated(ours, &request);
        let mut out = Vec::new();
        assert_eq!(
            c.next_rx(GUEST_CID, 0, &mut out, now()).unwrap().op,
            OP_RESPONSE
        );
        (c, host)
    }

    fn rw(len: usize) -> (Header, Vec<u8>) {
        let mut h = guest_header(OP_RW, GUEST_PORT, HOST_PORT);
        h.len = u32::try_from(len).unwrap();
        (h, vec![0x5a; len])
    }

    #[test]
    fn peer_credit_is_buf_alloc_minus_in_flight() {
        let (mut c, _host) = established(1000);
        c.tx_cnt = Wrapping(300);
        c.update_peer_credit(1000, 100);
        assert_eq!(c.peer_credit(), 800);
    }

    #[test]
    fn peer_credit_survives_counter_wrap() {
        let (mut c, _host) = established(1000);
        c.tx_cnt = Wrapping(10);
        c.update_peer_credit(1000, u32::MAX - 5);
        // 16 bytes in flight across the wrap.
        assert_eq!(c.peer_credit(), 984);
    }

    #[test]
    fn peer_fwd_cnt_ahead_of_tx_cnt_gives_no_credit() {
        let (mut c, _host) = established(1000);
        c.update_peer_credit(1000, 50);
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn host_data_is_sent_only_up_to_guest_credit() {
        let (mut c, mut host) = established(100);
        host.write_all(&[7u8; 300]).unwrap();
        c.on_host_event(EventSet::IN, &mut [0u8; 4096]);
        let mut out = Vec::new();

        let h = c.next_rx(GUEST_CID, 4096, &mut out, now()).unwrap();

        assert_eq!((h.op, h.len, out.len()), (OP_RW, 100, 100));
        assert!(!c.has_rx());
    }

    #[test]
    fn guest_data_beyond_buf_alloc_is_a_credit_violation() {
        let (mut c, _host) = established(0);
        // The host never reads: the socket buffer fills, then ours.
        let (h, data) = rw(64 << 10);
        let mut result = Ok(());
        for _ in 0..64 {
            result = c.on_packet(&h, &data, now());
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(Violation::CreditExceeded));
        assert_eq!(c.state(), State::Closed { reset_guest: true });
    }

    #[test]
    fn credit_request_is_answered_with_credit_update() {
        let (mut c, _host) = established(0);
        let h = guest_header(OP_CREDIT_REQUEST, GUEST_PORT, HOST_PORT);
        c.on_packet(&h, &[], now()).unwrap();
        let mut out = Vec::new();

        let reply = c.next_rx(GUEST_CID, 4096, &mut out, now()).unwrap();

        assert_eq!(
            (reply.op, reply.buf_alloc),
            (OP_CREDIT_UPDATE, CONN_BUF_BYTES)
        );
    }

    #[test]
    fn forwarding_a_quarter_of_the_buffer_owes_a_credit_update() {
        let (mut c, mut host) = established(0);
        let (h, data) = rw((CONN_BUF_BYTES / 4) as usize);
        c.on_packet(&h, &data, now()).unwrap();
        let mut sink = vec![0u8; data.len()];
        host.read_exact(&mut sink).unwrap();
        let mut out = Vec::new();

        let reply = c.next_rx(GUEST_CID, 4096, &mut out, now()).unwrap();

        assert_eq!(
            (reply.op, reply.fwd_cnt),
            (OP_CREDIT_UPDATE, CONN_BUF_BYTES / 4)
        );
    }

    #[test]
    fn response_in_established_state_resets() {
        let (mut c, _host) = established(0);
        let h = guest_header(OP_RESPONSE, GUEST_PORT, HOST_PORT);
        assert_eq!(
            c.on_packet(&h, &[], now()),
            Err(Violation::UnexpectedOp { op: OP_RESPONSE })
        );
        assert_eq!(c.state(), State::Closed { reset_guest: true });
    }

    #[test]
    fn data_after_guest_shutdown_send_resets() {
        let (mut c, _host) = established(0);
        let mut shut = guest_header(OP_SHUTDOWN, GUEST_PORT, HOST_PORT);
        shut.flags = SHUTDOWN_SEND;
        c.on_packet(&shut, &[], now()).unwrap();
        let (h, data) = rw(10);
        assert_eq!(
            c.on_packet(&h, &data, now()),
            Err(Violation::DataAfterShutdown)
        );
    }

    #[test]
    fn guest_shutdown_send_gives_host_eof() {
        let (mut c, mut host) = established(0);
        let mut shut = guest_header(OP_SHUTDOWN, GUEST_PORT, HOST_PORT);
        shut.flags = SHUTDOWN_SEND;
        c.on_packet(&shut, &[], now()).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(host.read(&mut buf).unwrap(), 0);
        assert_eq!(c.state(), State::Established);
    }

    #[test]
    fn guest_full_shutdown_closes_with_reset() {
        let (mut c, _host) = established(0);
        let mut shut = guest_header(OP_SHUTDOWN, GUEST_PORT, HOST_PORT);
        shut.flags = SHUTDOWN_BOTH;
        c.on_packet(&shut, &[], now()).unwrap();
        assert_eq!(c.state(), State::Closed { reset_guest: true });
    }

    #[test]
    fn host_half_close_owes_shutdown_send_after_data() {
        let (mut c, mut host) = established(1000);
        host.write_all(b"bye").unwrap();
        host.shutdown(Shutdown::Write).unwrap();
        c.on_host_event(EventSet::IN, &mut [0u8; 64]);
        let mut out = Vec::new();

        let data = c.next_rx(GUEST_CID, 4096, &mut out, now()).unwrap();
        let shut = c.next_rx(GUEST_CID, 4096, &mut out, now()).unwrap();

        assert_eq!((data.op, data.len), (OP_RW, 3));
        assert_eq!((shut.op, shut.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        assert_eq!(c.state(), State::Established);
    }

    #[test]
    fn host_close_owes_full_shutdown_then_times_out_with_reset() {
        let (mut c, host) = established(1000);
        drop(host);
        let t0 = now();
        c.on_host_event(EventSet::IN | EventSet::HANG_UP, &mut [0u8; 64]);
        let mut out = Vec::new();

        let shut = c.next_rx(GUEST_CID, 4096, &mut out, t0).unwrap();
        c.on_deadline(t0 + Duration::from_millis(CLOSE_TIMEOUT_MS));

        assert_eq!((shut.op, shut.flags), (OP_SHUTDOWN, SHUTDOWN_BOTH));
        assert_eq!(c.state(), State::Closed { reset_guest: true });
    }

    #[test]
    fn guest_rst_closes_without_reply() {
        let (mut c, _host) = established(0);
        let h = guest_header(OP_RST, GUEST_PORT, HOST_PORT);
        c.on_packet(&h, &[], now()).unwrap();
        assert_eq!(c.state(), State::Closed { reset_guest: false });
    }

    #[test]
    fn host_initiated_connection_answers_ok_line_on_response() {
        let (ours, mut host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut c = Connection::host_initiated(ours, HOST_PORT, 80, b"", now());
        let mut out = Vec::new();
        let req = c.next_rx(GUEST_CID, 4096, &mut out, now()).unwrap();
        let resp = guest_header(OP_RESPONSE, 80, HOST_PORT);

        c.on_packet(&resp, &[], now()).unwrap();

        let mut line = [0u8; 14];
        host.read_exact(&mut line).unwrap();
        assert_eq!(
            (req.op, req.dst_port, req.src_port),
            (OP_REQUEST, 80, HOST_PORT)
        );
        assert_eq!(&line, b"OK 1073741824\n");
        // The OK line is not guest data.
        assert_eq!(c.fwd_cnt.0, 0);
    }

    #[test]
    fn connect_timeout_resets() {
        let (ours, _host) = UnixStream::pair().unwrap();
        let t0 = now();
        let mut c = Connection::host_initiated(ours, HOST_PORT, 80, b"", t0);
        c.on_deadline(t0 + Duration::from_millis(CONNECT_TIMEOUT_MS));
        assert_eq!(c.state(), State::Closed { reset_guest: true });
    }
}
