//! Each container's output as timestamped lines in a bounded in-memory
//! store, and `GET /containers/{id}/logs` over it.
//!
//! The store keeps at most its cap in bytes (lines plus a fixed
//! per-line overhead), dropping the oldest lines first, like a ring. Lines
//! are split on `\n`; a line longer than [`MAX_LINE_BYTES`] is stored in
//! pieces (Docker does the same at 16 KiB). Every line has a sequence
//! number so a follower can ask for what came after the last one it sent.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use hyper::body::Bytes;
use tokio::sync::{mpsc, watch};

use super::containers::Container;
use super::frames::{self, StreamKind};
use super::time::rfc3339_nanos;

/// Longest stored line; longer ones are split.
pub const MAX_LINE_BYTES: usize = 16 * 1024;
/// What a line costs beyond its bytes (its entry and the deque slot),
/// counted against the cap so a flood of empty lines is bounded too.
const LINE_OVERHEAD_BYTES: usize = 64;
/// Lines per chunk sent to a logs client.
const LINES_PER_CHUNK: usize = 256;

/// One stored line (or piece of a long line), with its `\n` if it had one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub seq: u64,
    pub time: SystemTime,
    pub stream: StreamKind,
    pub bytes: Vec<u8>,
}

/// Which lines a logs request wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogQuery {
    pub stdout: bool,
    pub stderr: bool,
    /// Only lines at or after this time.
    pub since: Option<SystemTime>,
    /// Only lines at or before this time.
    pub until: Option<SystemTime>,
    /// Only the last N of the lines that match (`None`: all).
    pub tail: Option<usize>,
    /// Prefix each line with its RFC 3339 time and a space.
    pub timestamps: bool,
    /// Keep streaming new lines while the process runs.
    pub follow: bool,
}

impl LogQuery {
    fn wants(&self, line: &LogLine) -> bool {
        let stream = match line.stream {
            StreamKind::Stdout => self.stdout,
            StreamKind::Stderr => self.stderr,
        };
        stream
            && self.since.is_none_or(|since| line.time >= since)
            && self.until.is_none_or(|until| line.time <= until)
    }
}

/// The bounded line store of one container. Shared by the threads that
/// read the process's pipes and the API's tasks.
pub struct LogStore {
    buffer: Mutex<LogBuffer>,
    /// The sequence number the next line will get; followers wait on it.
    appended: watch::Sender<u64>,
}

#[derive(Debug)]
struct LogBuffer {
    lines: VecDeque<LogLine>,
    bytes: usize,
    cap_bytes: usize,
    next_seq: u64,
}

impl LogStore {
    /// An empty store holding at most `cap_bytes`.
    pub fn new(cap_bytes: usize) -> Self {
        Self {
            buffer: Mutex::new(LogBuffer {
                lines: VecDeque::new(),
                bytes: 0,
                cap_bytes,
                next_seq: 0,
            }),
            appended: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LogBuffer> {
        self.buffer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The cap given to [`LogStore::new`].
    #[cfg(test)]
    pub fn cap_bytes(&self) -> usize {
        self.lock().cap_bytes
    }

    /// Bytes held now, overhead included.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Stores a line read at `time`, dropping the oldest lines while over
    /// the cap.
    pub fn push(&self, stream: StreamKind, bytes: Vec<u8>, time: SystemTime) {
        let next = {
            let mut buffer = self.lock();
            let seq = buffer.next_seq;
            buffer.next_seq = seq.wrapping_add(1);
            buffer.bytes = buffer
                .bytes
                .saturating_add(bytes.len() + LINE_OVERHEAD_BYTES);
            buffer.lines.push_back(LogLine {
                seq,
                time,
                stream,
                bytes,
            });
            while buffer.bytes > buffer.cap_bytes {
                let Some(oldest) = buffer.lines.pop_front() else {
                    break;
                };
                buffer.bytes = buffer
                    .bytes
                    .saturating_sub(oldest.bytes.len() + LINE_OVERHEAD_BYTES);
            }
            buffer.next_seq
        };
        self.appended.send_replace(next);
    }

    /// The lines `query` selects (tail applied) and the sequence number to
    /// follow from.
    pub fn select(&self, query: &LogQuery) -> (Vec<LogLine>, u64) {
        let buffer = self.lock();
        let matching: Vec<&LogLine> = buffer.lines.iter().filter(|l| query.wants(l)).collect();
        let skip = query
            .tail
            .map_or(0, |tail| matching.len().saturating_sub(tail));
        let lines = matching.into_iter().skip(skip).cloned().collect();
        (lines, buffer.next_seq)
    }

    /// Lines from sequence number `from` on that `query` wants (no tail),
    /// and the sequence number to continue from.
    pub fn after(&self, from: u64, query: &LogQuery) -> (Vec<LogLine>, u64) {
        let buffer = self.lock();
        let lines = buffer
            .lines
            .iter()
            .filter(|l| l.seq >= from && query.wants(l))
            .cloned()
            .collect();
        (lines, buffer.next_seq)
    }

    /// Wakes whenever a line is stored.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }
}

/// Splits a byte stream into lines, keeping a partial last line until its
/// `\n` arrives (or it reaches [`MAX_LINE_BYTES`], or the stream ends).
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// The complete lines `chunk` finishes, each with its `\n`.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        for piece in chunk.split_inclusive(|&b| b == b'\n') {
            let mut piece = piece;
            while !piece.is_empty() {
                let room = MAX_LINE_BYTES.saturating_sub(self.partial.len());
                let (take, rest) = piece.split_at(piece.len().min(room));
                self.partial.extend_from_slice(take);
                piece = rest;
                if self.partial.ends_with(b"\n") || self.partial.len() >= MAX_LINE_BYTES {
                    lines.push(std::mem::take(&mut self.partial));
                }
            }
        }
        lines
    }

    /// The partial line left when the stream ends, if any.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        (!self.partial.is_empty()).then(|| std::mem::take(&mut self.partial))
    }
}

/// `line` as a client sees it: optionally `<time> ` first, then its bytes.
pub fn render(line: &LogLine, timestamps: bool) -> Vec<u8> {
    if !timestamps {
        return line.bytes.clone();
    }
    let mut out = rfc3339_nanos(line.time).into_bytes();
    out.push(b' ');
    out.extend_from_slice(&line.bytes);
    out
}

/// `lines` as multiplexed frames (`raw`, for a TTY's: as they are), in chunks for the
/// response body.
fn frame_chunks(lines: &[LogLine], timestamps: bool, raw: bool) -> Vec<Bytes> {
    lines
        .chunks(LINES_PER_CHUNK)
        .map(|chunk| {
            let mut out = Vec::new();
            for line in chunk {
                if raw {
                    out.extend_from_slice(&render(line, timestamps));
                } else {
                    frames::append(&mut out, line.stream, &render(line, timestamps));
                }
            }
            Bytes::from(out)
        })
        .collect()
}

/// Sends `lines` to the client; false once it has gone away.
async fn send_lines(
    tx: &mpsc::Sender<Bytes>,
    lines: &[LogLine],
    timestamps: bool,
    raw: bool,
) -> bool {
    for chunk in frame_chunks(lines, timestamps, raw) {
        if tx.send(chunk).await.is_err() {
            return false;
        }
    }
    true
}

/// Streams `container`'s logs as `query` asks into `tx` (the response
/// body): the selected lines, then, with `follow` and while the process
/// runs, each new line, until it has exited and its output is drained or
/// the client goes away (the body, and so `tx`, is dropped).
pub async fn stream(container: &Container, query: LogQuery, tx: mpsc::Sender<Bytes>) {
    // Subscribe first: a line stored after select() then wakes us.
    let mut appended = container.logs.subscribe();
    let (lines, mut next) = container.logs.select(&query);
    // A TTY's output is one stream, sent raw as Docker does.
    let raw = container.spec.tty;
    if !send_lines(&tx, &lines, query.timestamps, raw).await || !query.follow {
        return;
    }
    let Some(run) = container.running_run() else {
        return;
    };
    let mut done = std::pin::pin!(container.wait_output_done(run));
    loop {
        let finished = tokio::select! {
            changed = appended.changed() => changed.is_err(),
            () = &mut done => true,
            () = tx.closed() => return,
        };
        let (lines, after) = container.logs.after(next, &query);
        next = after;
        if !send_lines(&tx, &lines, query.timestamps, raw).await || finished {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    fn all() -> LogQuery {
        LogQuery {
            stdout: true,
            stderr: true,
            since: None,
            until: None,
            tail: None,
            timestamps: false,
            follow: false,
        }
    }

    /// A store with "a\n" (stdout, t=1), "b\n" (stderr, t=2), "c\n"
    /// (stdout, t=3).
    fn three_lines() -> LogStore {
        let store = LogStore::new(1 << 20);
        store.push(StreamKind::Stdout, b"a\n".to_vec(), at(1));
        store.push(StreamKind::Stderr, b"b\n".to_vec(), at(2));
        store.push(StreamKind::Stdout, b"c\n".to_vec(), at(3));
        store
    }

    fn texts(lines: &[LogLine]) -> Vec<&[u8]> {
        lines.iter().map(|l| l.bytes.as_slice()).collect()
    }

    #[test]
    fn select_tail_two_is_the_last_two() {
        let query = LogQuery {
            tail: Some(2),
            ..all()
        };

        let (lines, next) = three_lines().select(&query);

        assert_eq!(texts(&lines), [b"b\n", b"c\n"]);
        assert_eq!(next, 3);
    }

    #[test]
    fn select_tail_zero_is_nothing() {
        let query = LogQuery {
            tail: Some(0),
            ..all()
        };

        assert!(three_lines().select(&query).0.is_empty());
    }

    #[test]
    fn select_tail_applies_after_the_stream_filter() {
        let query = LogQuery {
            stderr: false,
            tail: Some(1),
            ..all()
        };

        let (lines, _) = three_lines().select(&query);

        assert_eq!(texts(&lines), [b"c\n"]);
    }

    #[test]
    fn select_since_keeps_lines_at_or_after() {
        let query = LogQuery {
            since: Some(at(2)),
            ..all()
        };

        let (lines, _) = three_lines().select(&query);

        assert_eq!(texts(&lines), [b"b\n", b"c\n"]);
    }

    #[test]
    fn select_until_keeps_lines_at_or_before() {
        let query = LogQuery {
            until: Some(at(1)),
            ..all()
        };

        let (lines, _) = three_lines().select(&query);

        assert_eq!(texts(&lines), [b"a\n"]);
    }

    #[test]
    fn after_returns_only_newer_lines() {
        let store = three_lines();

        let (lines, next) = store.after(2, &all());

        assert_eq!(texts(&lines), [b"c\n"]);
        assert_eq!(next, 3);
    }

    #[test]
    fn push_over_the_cap_drops_the_oldest() {
        // Room for two 10-byte lines with their overhead, not three.
        let store = LogStore::new(2 * (10 + LINE_OVERHEAD_BYTES));
        for text in [b"000000000\n", b"111111111\n", b"222222222\n"] {
            store.push(StreamKind::Stdout, text.to_vec(), at(1));
        }

        let (lines, _) = store.select(&all());

        assert_eq!(texts(&lines), [b"111111111\n", b"222222222\n"]);
        assert!(store.bytes() <= store.cap_bytes());
    }

    #[test]
    fn push_wakes_subscribers() {
        let store = LogStore::new(1024);
        let mut rx = store.subscribe();

        store.push(StreamKind::Stdout, b"x\n".to_vec(), at(1));

        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 1);
    }

    #[test]
    fn splitter_keeps_a_partial_line_until_its_newline() {
        let mut splitter = LineSplitter::default();

        let first = splitter.push(b"one\ntw");
        let second = splitter.push(b"o\n");

        assert_eq!(first, [b"one\n".to_vec()]);
        assert_eq!(second, [b"two\n".to_vec()]);
        assert_eq!(splitter.finish(), None);
    }

    #[test]
    fn splitter_finish_returns_the_unterminated_rest() {
        let mut splitter = LineSplitter::default();
        splitter.push(b"prompt> ");

        assert_eq!(splitter.finish(), Some(b"prompt> ".to_vec()));
    }

    #[test]
    fn splitter_cuts_an_overlong_line() {
        let mut splitter = LineSplitter::default();

        let lines = splitter.push(&vec![b'x'; MAX_LINE_BYTES + 5]);

        assert_eq!(lines.len(), 1);
        assert_eq!(lines.first().map(Vec::len), Some(MAX_LINE_BYTES));
        assert_eq!(splitter.finish().map(|r| r.len()), Some(5));
    }

    #[test]
    fn render_with_timestamps_prefixes_rfc3339() {
        let line = LogLine {
            seq: 0,
            time: at(0),
            stream: StreamKind::Stdout,
            bytes: b"hi\n".to_vec(),
        };

        assert_eq!(
            render(&line, true),
            b"1970-01-01T00:00:00.000000000Z hi\n".to_vec()
        );
    }

    #[test]
    fn frame_chunks_frames_each_line_on_its_stream() {
        let (lines, _) = three_lines().select(&all());

        let chunks = frame_chunks(&lines, false, false);

        let mut expected = frames::encode(StreamKind::Stdout, b"a\n");
        expected.extend(frames::encode(StreamKind::Stderr, b"b\n"));
        expected.extend(frames::encode(StreamKind::Stdout, b"c\n"));
        assert_eq!(chunks, [Bytes::from(expected)]);
    }

    #[test]
    fn frame_chunks_of_a_tty_are_the_raw_bytes() {
        let (lines, _) = three_lines().select(&all());

        let chunks = frame_chunks(&lines, false, true);

        assert_eq!(chunks, [Bytes::from_static(b"a\nb\nc\n")]);
    }
}
