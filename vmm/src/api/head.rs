//! Checks a connection's request head before hyper reads it, so that a malformed, huge or
//! late head gets the API's JSON error body.
//!
//! Why not leave it to hyper: hyper answers its own parse errors with a bare status line and
//! no body, and offers no hook to change that; docs/api.yaml promises `{"error"}` on every
//! error. The server serves one request per connection, so checking the first head is
//! enough. The parsing is httparse's (the parser hyper itself uses), with hyper's limit of
//! 100 headers; this module adds only the framing checks hyper would refuse (lengths,
//! transfer codings, the request target) and replays the bytes it read to hyper.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Bytes;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// The largest request head accepted (crib's requests carry a handful of headers).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// hyper's own limit on the number of headers.
const MAX_HEADERS: usize = 100;

/// Why a head was refused, as the status and JSON body the client gets.
#[derive(Debug, PartialEq)]
pub struct Refusal {
    pub status: u16,
    pub body: Value,
}

impl Refusal {
    fn new(status: u16, message: impl std::fmt::Display) -> Self {
        Self {
            status,
            body: json!({ "error": message.to_string() }),
        }
    }

    /// The whole HTTP response, with `Connection: close`.
    pub fn response(&self) -> Vec<u8> {
        let reason = match self.status {
            400 => "Bad Request",
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            _ => "Error",
        };
        let body = format!("{}\n", self.body);
        format!(
            "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            self.status,
            body.len()
        )
        .into_bytes()
    }
}

/// Whether `buf` holds a whole acceptable head (`Ok(true)`), needs more bytes
/// (`Ok(false)`), or is refused.
pub fn check(buf: &[u8]) -> Result<bool, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => Err(too_large()),
        Ok(httparse::Status::Partial) => Ok(false),
        Ok(httparse::Status::Complete(_)) => {
            check_framing(&request)?;
            Ok(true)
        }
        Err(httparse::Error::TooManyHeaders) => Err(Refusal::new(
            431,
            format!("the request has more than {MAX_HEADERS} headers: send fewer"),
        )),
        Err(e) => Err(Refusal::new(
            400,
            format!("the request is not valid HTTP/1.1 ({e}): send METHOD PATH HTTP/1.1, headers, a blank line"),
        )),
    }
}

fn too_large() -> Refusal {
    Refusal::new(
        431,
        format!(
            "the request head is larger than {} KiB: send fewer or shorter headers",
            MAX_HEAD_BYTES / 1024
        ),
    )
}

fn check_framing(request: &httparse::Request<'_, '_>) -> Result<(), Refusal> {
    let path = request.path.unwrap_or_default();
    if path.parse::<hyper::Uri>().is_err() {
        return Err(Refusal::new(
            400,
            format!(
                "the request target {:?} is not a valid URI: send a path like /api/v1/vm",
                path.escape_debug().to_string()
            ),
        ));
    }
    let mut length: Option<u64> = None;
    let mut chunked = false;
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    Refusal::new(
                        400,
                        format!(
                            "Content-Length {:?} is not a number of bytes",
                            String::from_utf8_lossy(header.value)
                        ),
                    )
                })?;
            if length.is_some_and(|l| l != value) {
                return Err(Refusal::new(
                    400,
                    "the request has two different Content-Length headers: send one",
                ));
            }
            length = Some(value);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = String::from_utf8_lossy(header.value)
                .rsplit(',')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase();
            if last != "chunked" {
                return Err(Refusal::new(
                    400,
                    "Transfer-Encoding must end in chunked: send the body with Content-Length instead",
                ));
            }
            chunked = true;
        }
    }
    if chunked && length.is_some() {
        return Err(Refusal::new(
            400,
            "the request has both Content-Length and Transfer-Encoding: send one",
        ));
    }
    Ok(())
}

/// Reads `stream` until a whole head is in, within `timeout`. Returns the bytes read
/// (the head and whatever followed it), or `None` once the client was answered or left.
pub async fn read<S>(stream: &mut S, timeout: Duration) -> Option<Vec<u8>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = Vec::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    let refusal = loop {
        match check(&buf) {
            Ok(true) => return Some(buf),
            Ok(false) => {}
            Err(refusal) => break refusal,
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) if buf.is_empty() => return None,
            Err(_) => {
                break Refusal::new(
                    408,
                    format!(
                        "the request head did not arrive within {} s: send it whole",
                        timeout.as_secs()
                    ),
                )
            }
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    tracing::info!(
        "api: refused a request head: {} {}",
        refusal.status,
        refusal.body["error"].as_str().unwrap_or_default()
    );
    let _ = stream.write_all(&refusal.response()).await;
    let _ = stream.shutdown().await;
    None
}

/// A stream whose first bytes are the `prefix` already read from it.
pub struct Replay<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Replay<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix: Bytes::from(prefix),
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(head: &[u8]) -> Refusal {
        check(head).expect_err("refused")
    }

    #[test]
    fn a_whole_head_passes_and_a_partial_one_waits() {
        assert_eq!(
            check(b"GET /api/v1/vm HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok(true)
        );
        assert_eq!(check(b"GET /api/v1/vm HTTP/1.1\r\nHo"), Ok(false));
        assert_eq!(check(b""), Ok(false));
        assert_eq!(
            check(
                b"PUT /api/v1/vm/stop HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}"
            ),
            Ok(true)
        );
    }

    #[test]
    fn garbage_and_bad_framing_get_400_with_the_fix() {
        let r = refused(b"GARBAGE\r\n\r\n");
        assert_eq!(r.status, 400);
        assert!(r.body["error"].as_str().unwrap().contains("HTTP/1.1"));
        for (head, says) in [
            (
                &b"PUT / HTTP/1.1\r\nContent-Length: ten\r\n\r\n"[..],
                "Content-Length",
            ),
            (
                b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "two different",
            ),
            (
                b"PUT / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
                "chunked",
            ),
            (
                b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                "both",
            ),
            (b"GET http://[::1 HTTP/1.1\r\n\r\n", "not a valid URI"),
        ] {
            let r = refused(head);
            assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(head));
            assert!(r.body["error"].as_str().unwrap().contains(says), "{r:?}");
        }
    }

    #[test]
    fn too_many_or_too_large_headers_get_431() {
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(refused(&many).status, 431);
        let mut large = b"GET / HTTP/1.1\r\nX: ".to_vec();
        large.resize(MAX_HEAD_BYTES, b'a');
        assert_eq!(refused(&large).status, 431);
    }

    #[test]
    fn a_refusal_is_a_complete_json_response() {
        let text = String::from_utf8(refused(b"\x00\x01\r\n\r\n").response()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let value: Value = serde_json::from_str(body).unwrap();
        assert!(value["error"].is_string());
    }
}
