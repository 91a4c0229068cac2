//! Docker's multiplexed stream format (Engine API, "Attach to a container",
//! "Stream format"): when a process has no TTY its stdout and stderr share
//! one connection as frames, each an 8-byte header
//! `[STREAM_TYPE, 0, 0, 0, SIZE1, SIZE2, SIZE3, SIZE4]` (size big-endian)
//! followed by SIZE bytes of payload. STREAM_TYPE is 0 stdin, 1 stdout,
//! 2 stderr. With a TTY the stream is raw bytes instead.

/// Which output stream a frame carries (cradle never sends stdin frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    Stdout,
    Stderr,
}

impl StreamKind {
    /// The header's STREAM_TYPE byte.
    pub fn code(self) -> u8 {
        match self {
            Self::Stdout => 1,
            Self::Stderr => 2,
        }
    }
}

/// Size of a frame header.
pub const HEADER_BYTES: usize = 8;
/// Largest payload of one frame (its size field is a u32).
const MAX_PAYLOAD_BYTES: usize = u32::MAX as usize;

/// The header of a frame of `size` bytes on `stream`.
pub fn header(stream: StreamKind, size: u32) -> [u8; HEADER_BYTES] {
    let [a, b, c, d] = size.to_be_bytes();
    [stream.code(), 0, 0, 0, a, b, c, d]
}

/// Appends `payload` to `out` as frames on `stream` (one, unless the
/// payload is over 4 GiB). An empty payload adds nothing: a zero-size
/// frame means nothing to the client.
pub fn append(out: &mut Vec<u8>, stream: StreamKind, payload: &[u8]) {
    for chunk in payload.chunks(MAX_PAYLOAD_BYTES) {
        // chunks() never yields more than MAX_PAYLOAD_BYTES (u32::MAX).
        let size = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&header(stream, size));
        out.extend_from_slice(chunk);
    }
}

/// `payload` as frames on `stream`.
pub fn encode(stream: StreamKind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    append(&mut out, stream, payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_stdout_has_type_one_and_big_endian_size() {
        let frame = encode(StreamKind::Stdout, b"hi\n");

        assert_eq!(frame, [1, 0, 0, 0, 0, 0, 0, 3, b'h', b'i', b'\n']);
    }

    #[test]
    fn encode_stderr_has_type_two() {
        let frame = encode(StreamKind::Stderr, b"e");

        assert_eq!(frame.first(), Some(&2));
    }

    #[test]
    fn header_of_a_large_frame_spans_all_size_bytes() {
        assert_eq!(
            header(StreamKind::Stdout, 0x0102_0304),
            [1, 0, 0, 0, 1, 2, 3, 4]
        );
    }

    #[test]
    fn append_two_frames_concatenates_them() {
        let mut out = Vec::new();

        append(&mut out, StreamKind::Stdout, b"a");
        append(&mut out, StreamKind::Stderr, b"b");

        assert_eq!(
            out,
            [1, 0, 0, 0, 0, 0, 0, 1, b'a', 2, 0, 0, 0, 0, 0, 0, 1, b'b']
        );
    }

    #[test]
    fn encode_empty_payload_is_nothing() {
        assert!(encode(StreamKind::Stdout, b"").is_empty());
    }
}
