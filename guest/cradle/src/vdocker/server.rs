//! The HTTP/1.1 server: accepts connections from any [`Listener`] (vsock in
//! the guest, a Unix socket in tests), serves each with hyper (upgrades on,
//! for the hijacked attach and exec streams), and hands requests to
//! [`Api`]. Also the response body type and the response helpers.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, UPGRADE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::mpsc;

use super::api::Api;
use super::errors::VdockerError;
use super::fdio::FdStream;
use super::registry::Registry;
use super::vsock::VsockListener;
use crate::console::{self, say};

/// Content type of a multiplexed stdout/stderr stream.
pub const MULTIPLEXED_STREAM: &str = "application/vnd.docker.multiplexed-stream";
/// Content type of a raw (TTY) stream.
pub const RAW_STREAM: &str = "application/vnd.docker.raw-stream";
/// Pause after a failed accept (out of fds, say) before the next one.
const ACCEPT_RETRY_MS: u64 = 100;
/// Buffer between a session and its response body (no-upgrade streams).
const DUPLEX_BYTES: usize = 64 * 1024;
/// Chunks queued between a producer task and a response body.
pub const BODY_CHANNEL_CHUNKS: usize = 16;

/// Where connections come from.
pub trait Listener: Send + Sync + 'static {
    type Conn: AsyncRead + AsyncWrite + Send + Unpin + 'static;

    fn accept(&self) -> impl Future<Output = io::Result<Self::Conn>> + Send;
}

impl Listener for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;

    async fn accept(&self) -> io::Result<Self::Conn> {
        tokio::net::UnixListener::accept(self)
            .await
            .map(|(stream, _)| stream)
    }
}

impl Listener for VsockListener {
    type Conn = FdStream;

    async fn accept(&self) -> io::Result<Self::Conn> {
        VsockListener::accept(self).await
    }
}

/// Serves the Docker API for `registry` on `listener`, for ever.
pub async fn serve<L: Listener>(listener: L, registry: Registry) {
    let api = Arc::new(Api::new(registry));
    let mut warned = false;
    loop {
        let conn = match listener.accept().await {
            Ok(conn) => conn,
            Err(error) => {
                if !warned {
                    say!("vdocker: warning: cannot accept a connection: {error}");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(ACCEPT_RETRY_MS)).await;
                continue;
            }
        };
        let api = Arc::clone(&api);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let api = Arc::clone(&api);
                async move { Ok::<_, Infallible>(api.handle(request).await) }
            });
            // A connection error concerns that client only.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(conn), service)
                .with_upgrades()
                .await;
        });
    }
}

/// A response body: nothing, one buffer, or chunks from a producer task
/// (which stops when the client goes away and the body is dropped).
pub enum ResponseBody {
    Empty,
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<Bytes>),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Channel(rx) => rx
                .poll_recv(cx)
                .map(|chunk| chunk.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty | Self::Full(None) => true,
            Self::Full(Some(_)) | Self::Channel(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty | Self::Full(None) => SizeHint::with_exact(0),
            Self::Full(Some(bytes)) => {
                SizeHint::with_exact(u64::try_from(bytes.len()).unwrap_or(u64::MAX))
            }
            Self::Channel(_) => SizeHint::default(),
        }
    }
}

/// A response with `status` and no body.
pub fn empty(status: StatusCode) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::Empty);
    *response.status_mut() = status;
    response
}

/// A response with `status` and `body` of `content_type`.
pub fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::Full(Some(body.into())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<ResponseBody> {
    let mut body = value.to_string().into_bytes();
    body.push(b'\n');
    full(status, "application/json", body)
}

/// A response whose body a task produces into `rx`.
pub fn streaming(
    status: StatusCode,
    content_type: &'static str,
    rx: mpsc::Receiver<Bytes>,
) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::Channel(rx));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Docker's error response: `{"message": "<error>: <cause>..."}`.
pub fn error_response(error: &VdockerError) -> Response<ResponseBody> {
    let status = error.status();
    if status == StatusCode::NOT_MODIFIED {
        return empty(status);
    }
    json(
        status,
        &serde_json::json!({ "message": console::error_chain(error) }),
    )
}

/// A connection's byte stream, once hijacked.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
pub type BoxIo = Box<dyn Io>;

/// The upgrade a client asked for (`Connection: Upgrade` with an
/// `Upgrade` header, as the docker CLI sends for attach and exec), taken
/// from the request; `None` if it asked for none.
pub fn take_upgrade<B>(request: &mut Request<B>) -> Option<OnUpgrade> {
    let headers = request.headers();
    let wants = headers.contains_key(UPGRADE)
        && headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .any(|value| value.to_ascii_lowercase().contains("upgrade"));
    wants.then(|| hyper::upgrade::on(request))
}

/// Where a hijacked session's bytes go, before the response is sent.
pub enum Hijack {
    /// `101 UPGRADED`: the connection itself, both ways.
    Upgrade(OnUpgrade),
    /// `200` with a streaming body: output only.
    Body(tokio::io::DuplexStream),
}

impl Hijack {
    /// The session's stream once the response is out; `None` if the client
    /// went away first.
    pub async fn into_io(self) -> Option<BoxIo> {
        match self {
            Self::Upgrade(on_upgrade) => {
                let upgraded = on_upgrade.await.ok()?;
                Some(Box::new(TokioIo::new(upgraded)))
            }
            Self::Body(duplex) => Some(Box::new(duplex)),
        }
    }
}

/// The response that starts a hijacked stream of `content_type`: `101
/// UPGRADED` with `Upgrade: tcp` if the client asked for an upgrade, else
/// `200` with the stream as its body (then stdin cannot be sent).
pub fn hijack(
    upgrade: Option<OnUpgrade>,
    content_type: &'static str,
) -> (Response<ResponseBody>, Hijack) {
    match upgrade {
        Some(on_upgrade) => {
            let mut response = empty(StatusCode::SWITCHING_PROTOCOLS);
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
            headers.insert(UPGRADE, HeaderValue::from_static("tcp"));
            response
                .extensions_mut()
                .insert(hyper::ext::ReasonPhrase::from_static(b"UPGRADED"));
            (response, Hijack::Upgrade(on_upgrade))
        }
        None => {
            let (session_end, body_end) = tokio::io::duplex(DUPLEX_BYTES);
            let (tx, rx) = mpsc::channel(BODY_CHANNEL_CHUNKS);
            tokio::spawn(forward_to_body(body_end, tx));
            (
                streaming(StatusCode::OK, content_type, rx),
                Hijack::Body(session_end),
            )
        }
    }
}

/// Copies what a session writes into its response body.
async fn forward_to_body(mut from: tokio::io::DuplexStream, tx: mpsc::Sender<Bytes>) {
    let mut buffer = vec![0u8; DUPLEX_BYTES];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        let Some(chunk) = buffer.get(..read) else {
            return;
        };
        if tx.send(Bytes::copy_from_slice(chunk)).await.is_err() {
            return;
        }
    }
}

/// Reads a request body of at most `limit` bytes.
pub async fn read_body(body: &mut Incoming, limit: usize) -> Result<Vec<u8>, VdockerError> {
    use http_body_util::BodyExt;

    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|source| VdockerError::ReadBody { source })?;
        if let Ok(data) = frame.into_data() {
            if bytes.len().saturating_add(data.len()) > limit {
                return Err(VdockerError::BodyTooLarge { limit });
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(bytes)
}

/// Reads a JSON request body of at most `limit` bytes; an empty body reads
/// as `{}`.
pub async fn read_json<T: serde::de::DeserializeOwned>(
    body: &mut Incoming,
    limit: usize,
) -> Result<T, VdockerError> {
    let bytes = read_body(body, limit).await?;
    let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    serde_json::from_slice(text).map_err(|source| VdockerError::BadJson { source })
}
