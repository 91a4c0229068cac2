//! A small blocking client of the Docker Engine API that cradle serves in the guest and
//! crib forwards to `docker.sock` in the pod's run directory (docs/POD_SPEC.md, "Docker
//! API"): container state, logs (multiplexed frames), wait, kill and crib's shutdown
//! call. HTTP/1.1 over a Unix socket, one request per connection (`Connection: close`);
//! bodies with a length, chunked or until EOF.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Largest header block or non-streamed body accepted.
const MAX_BODY_BYTES: usize = 1 << 20;

/// Errors of talking to the pod's Docker API.
#[derive(Debug, Error)]
pub enum DockerError {
    #[error("cannot reach the pod's Docker API at {}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{method} {path}: the connection failed")]
    Io {
        method: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{method} {path}: malformed response: {what}")]
    Malformed {
        method: &'static str,
        path: String,
        what: String,
    },
    #[error("{method} {path}: HTTP {status}: {body}")]
    Status {
        method: &'static str,
        path: String,
        status: u16,
        body: String,
    },
}

/// The pod's Docker API socket.
#[derive(Debug, Clone)]
pub struct DockerClient {
    socket: PathBuf,
}

/// A response whose body is read as a stream.
pub struct Response {
    pub status: u16,
    pub body: Box<dyn Read + Send>,
}

impl DockerClient {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
        }
    }

    /// Sends one request and returns the status and a reader of the body.
    pub fn send(&self, method: &'static str, path: &str) -> Result<Response, DockerError> {
        self.request(method, path, None, false)
            .map(|(response, _)| response)
    }

    /// Sends one request (with a JSON body if `body` is given; asking to upgrade the
    /// connection to a raw stream if `upgrade`) and returns the response and a handle of
    /// the connection for writing to it.
    fn request(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&[u8]>,
        upgrade: bool,
    ) -> Result<(Response, UnixStream), DockerError> {
        let stream = UnixStream::connect(&self.socket).map_err(|source| DockerError::Connect {
            socket: self.socket.clone(),
            source,
        })?;
        let io_err = |source| DockerError::Io {
            method,
            path: path.to_owned(),
            source,
        };
        let body = body.unwrap_or_default();
        let content_type = if body.is_empty() {
            ""
        } else {
            "Content-Type: application/json\r\n"
        };
        let connection = if upgrade {
            "Connection: Upgrade\r\nUpgrade: tcp\r\n"
        } else {
            "Connection: close\r\n"
        };
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: crib\r\n{content_type}Content-Length: {}\r\n{connection}\r\n",
            body.len()
        );
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(body);
        (&stream).write_all(&bytes).map_err(io_err)?;
        let writer = stream.try_clone().map_err(io_err)?;
        let mut reader = BufReader::new(stream);
        let head = read_head(&mut reader).map_err(io_err)?;
        let malformed = |what: &str| DockerError::Malformed {
            method,
            path: path.to_owned(),
            what: what.to_owned(),
        };
        let parsed = parse_head(&head).ok_or_else(|| malformed("bad status line or headers"))?;
        let body: Box<dyn Read + Send> = match parsed.framing {
            // A switched protocol's stream runs until the connection ends.
            _ if parsed.status == 101 => Box::new(reader),
            Framing::Length(n) => Box::new(reader.take(n)),
            Framing::Chunked => Box::new(Chunked::new(reader)),
            Framing::UntilEof => Box::new(reader),
        };
        Ok((
            Response {
                status: parsed.status,
                body,
            },
            writer,
        ))
    }

    /// Sends a request with a JSON body and reads its whole (small) answer; a status of
    /// 300 or more is an error carrying the body.
    pub fn call_json(
        &self,
        method: &'static str,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<String, DockerError> {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        let (response, _) = self.request(method, path, Some(&bytes), false)?;
        read_answer(method, path, response)
    }

    /// `POST path` with a JSON body, asking for the connection to be hijacked (Docker's
    /// attach and exec start): the process's output is read from `output`, its input
    /// written to `input` (shutting down `input`'s write side closes it).
    pub fn hijack(&self, path: &str, body: &serde_json::Value) -> Result<Hijacked, DockerError> {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        let body = (!body.is_null()).then_some(bytes.as_slice());
        let (response, input) = self.request("POST", path, body, true)?;
        if response.status >= 300 {
            return Err(read_answer("POST", path, response)
                .err()
                .unwrap_or_else(|| DockerError::Malformed {
                    method: "POST",
                    path: path.to_owned(),
                    what: "an error status with no error".to_owned(),
                }));
        }
        Ok(Hijacked {
            output: response.body,
            input,
        })
    }

    /// Sends a request and reads its whole (small) body; a status of 300 or more is an
    /// error carrying the body.
    pub fn call(&self, method: &'static str, path: &str) -> Result<String, DockerError> {
        let response = self.send(method, path)?;
        read_answer(method, path, response)
    }

    /// True once the API answers `/_ping`.
    pub fn ping(&self) -> bool {
        self.call("GET", "/_ping").is_ok()
    }
}

/// A hijacked connection: the process's output, and its input.
pub struct Hijacked {
    pub output: Box<dyn Read + Send>,
    pub input: UnixStream,
}

/// Reads a (small) response body; a status of 300 or more is an error carrying it.
fn read_answer(
    method: &'static str,
    path: &str,
    response: Response,
) -> Result<String, DockerError> {
    let mut body = Vec::new();
    response
        .body
        .take(MAX_BODY_BYTES as u64)
        .read_to_end(&mut body)
        .map_err(|source| DockerError::Io {
            method,
            path: path.to_owned(),
            source,
        })?;
    let body = String::from_utf8_lossy(&body).into_owned();
    if response.status >= 300 {
        return Err(DockerError::Status {
            method,
            path: path.to_owned(),
            status: response.status,
            body: body.trim().to_owned(),
        });
    }
    Ok(body)
}

/// How a response body ends.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    UntilEof,
}

#[derive(Debug, PartialEq, Eq)]
struct Head {
    status: u16,
    framing: Framing,
}

/// Reads up to the blank line after the headers.
fn read_head(reader: &mut impl BufRead) -> io::Result<String> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed before the response headers ended",
            ));
        }
        if line == "\r\n" || line == "\n" {
            return Ok(head);
        }
        head.push_str(&line);
        if head.len() > MAX_BODY_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "response headers too long",
            ));
        }
    }
}

fn parse_head(head: &str) -> Option<Head> {
    let mut lines = head.lines();
    let status_line = lines.next()?;
    let mut words = status_line.split_whitespace();
    if !words.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status = words.next()?.parse().ok()?;
    let mut framing = Framing::UntilEof;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            framing = Framing::Length(value.parse().ok()?);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.eq_ignore_ascii_case("chunked")
        {
            framing = Framing::Chunked;
        }
    }
    Some(Head { status, framing })
}

/// A chunked body (RFC 9112 7.1), without trailers.
struct Chunked<R> {
    inner: R,
    left: u64,
    done: bool,
}

impl<R: BufRead> Chunked<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            left: 0,
            done: false,
        }
    }
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            self.inner.read_line(&mut line)?;
            let size = line.trim().split(';').next().unwrap_or_default();
            self.left = u64::from_str_radix(size, 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let want = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let read = self.inner.read(&mut buf[..want])?;
        if read == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= read as u64;
        if self.left == 0 {
            let mut crlf = String::new();
            self.inner.read_line(&mut crlf)?;
        }
        Ok(read)
    }
}

/// The stream a frame of Docker's multiplexed output belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Splits Docker's multiplexed stream (8-byte headers: stream, 3 zero bytes, big-endian
/// length) from `body` into `out`, frame by frame, until the body ends.
pub fn demux(
    mut body: impl Read,
    mut out: impl FnMut(Stream, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut header = [0u8; 8];
    let mut payload = Vec::new();
    loop {
        match body.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let stream = match header[0] {
            2 => Stream::Stderr,
            _ => Stream::Stdout,
        };
        let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        payload.resize(len as usize, 0);
        body.read_exact(&mut payload)?;
        out(stream, &payload)?;
    }
}

/// The `"StatusCode"` of a wait response.
pub fn wait_status(body: &str) -> Option<i64> {
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    value.get("StatusCode")?.as_i64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_with_length_chunked_or_neither() {
        assert_eq!(
            parse_head("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n"),
            Some(Head {
                status: 200,
                framing: Framing::Length(12)
            })
        );
        assert_eq!(
            parse_head("HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n")
                .map(|h| h.framing),
            Some(Framing::Chunked)
        );
        assert_eq!(
            parse_head("HTTP/1.1 101 Upgrade\r\n").map(|h| h.framing),
            Some(Framing::UntilEof)
        );
    }

    #[test]
    fn garbage_head_is_refused() {
        assert_eq!(parse_head("SSH-2.0\r\n"), None);
        assert_eq!(parse_head("HTTP/1.1 abc\r\n"), None);
    }

    #[test]
    fn chunked_body_is_joined() {
        let raw = b"5\r\nhello\r\n1;ext=1\r\n!\r\n0\r\n\r\n";
        let mut out = String::new();
        Chunked::new(&raw[..]).read_to_string(&mut out).unwrap();
        assert_eq!(out, "hello!");
    }

    #[test]
    fn bad_chunk_size_is_an_error() {
        let mut out = Vec::new();
        let err = Chunked::new(&b"zz\r\n"[..])
            .read_to_end(&mut out)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn demux_splits_stdout_and_stderr() {
        let mut raw = vec![1, 0, 0, 0, 0, 0, 0, 3];
        raw.extend(b"out");
        raw.extend([2, 0, 0, 0, 0, 0, 0, 4]);
        raw.extend(b"err\n");
        let mut seen = Vec::new();
        demux(&raw[..], |s, b| {
            seen.push((s, b.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                (Stream::Stdout, b"out".to_vec()),
                (Stream::Stderr, b"err\n".to_vec())
            ]
        );
    }

    #[test]
    fn demux_of_a_truncated_frame_is_an_error() {
        let raw = [1, 0, 0, 0, 0, 0, 0, 9, b'x'];
        assert!(demux(&raw[..], |_, _| Ok(())).is_err());
    }

    #[test]
    fn wait_status_reads_the_code() {
        assert_eq!(wait_status(r#"{"StatusCode":7,"Error":null}"#), Some(7));
        assert_eq!(wait_status("nope"), None);
    }
}
