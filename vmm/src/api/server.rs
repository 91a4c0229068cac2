//! The API's HTTP glue: hyper 1 (HTTP/1.1 only) on a current-thread tokio runtime, on one
//! thread named `api`.
//!
//! Why hyper: it is the maintained HTTP implementation of the Rust ecosystem, and the
//! workspace already builds it (cradle's vdocker serves the Docker API with the same
//! hyper + current-thread tokio, so no new dependency tree). tiny_http would need a fork
//! or a TCP-only listener for Unix sockets; a hand-written parser would be one more
//! guest-independent but still hostile-input surface to maintain.
//!
//! A request head is checked first ([`head`]), so a malformed or oversized one gets the
//! JSON error body hyper's own parse errors lack. Limits against bad clients: a request
//! head must arrive within
//! [`HEADER_TIMEOUT`], a body within [`BODY_TIMEOUT`] and be at most
//! [`MAX_BODY_BYTES`]; at most [`MAX_CONNECTIONS`] connections are served at once (more
//! are closed on accept). Handlers run in `spawn_blocking` because a change waits for
//! the VMM's event loop; the runtime's thread keeps serving other connections meanwhile.

use std::convert::Infallible;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request as HttpRequest, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::Value;
use tokio::net::UnixListener;
use tokio::sync::Semaphore;

use super::{handle, head, route, ApiError, Reply, VmmHandle, MAX_BODY_BYTES};
use crate::seccomp;

/// Time a client has to send a request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to send a request body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("--api-socket: the path cannot be used")]
    Claim(#[from] devices::socket_path::SocketPathError),
    #[error("--api-socket {path}: cannot listen")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
}

/// Listens on `path` (replacing a stale socket, nothing else) and serves the API on a new
/// thread named `api`, which first applies `filter`. Returns once listening.
pub fn start(
    path: &Path,
    vmm: Arc<dyn VmmHandle>,
    filter: Option<seccomp::Filter>,
) -> Result<(), ApiServerError> {
    spawn(bind(path)?, vmm, filter)
}

/// The API's socket, bound and not yet served (see [`spawn`]): the jail binds every
/// socket before it drops privileges and before any thread starts.
pub struct ApiListener {
    path: std::path::PathBuf,
    listener: StdUnixListener,
}

/// Listens on `path`, replacing a stale socket but nothing else.
pub fn bind(path: &Path) -> Result<ApiListener, ApiServerError> {
    Ok(ApiListener {
        path: path.to_path_buf(),
        listener: listen(path)?,
    })
}

/// Serves the API of `bound` on a new thread named `api`, which first applies `filter`.
pub fn spawn(
    bound: ApiListener,
    vmm: Arc<dyn VmmHandle>,
    filter: Option<seccomp::Filter>,
) -> Result<(), ApiServerError> {
    let ApiListener { path, listener } = bound;
    let path = path.as_path();
    let listen_err = |source| ApiServerError::Listen {
        path: path.to_path_buf(),
        source,
    };
    listener.set_nonblocking(true).map_err(listen_err)?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            if let Some(filter) = filter {
                if let Err(e) = filter.apply() {
                    tracing::error!("api: {e}; the API is not served");
                    return;
                }
            }
            serve(listener, vmm)
        })
        .map_err(ApiServerError::Thread)?;
    tracing::info!("API on {}", path.display());
    Ok(())
}

fn listen(path: &Path) -> Result<StdUnixListener, ApiServerError> {
    devices::socket_path::claim(path)?;
    StdUnixListener::bind(path).map_err(|source| ApiServerError::Listen {
        path: path.to_path_buf(),
        source,
    })
}

fn serve(listener: StdUnixListener, vmm: Arc<dyn VmmHandle>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .thread_name("api-blocking")
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("api: cannot start the runtime: {e}; the API is not served");
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match UnixListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => {
                tracing::error!("api: cannot use the socket: {e}; the API is not served");
                return;
            }
        };
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("api: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!("api: {MAX_CONNECTIONS} connections open; closing a new one");
                continue;
            };
            let vmm = vmm.clone();
            tokio::spawn(async move {
                let mut stream = stream;
                if let Some(read) = head::read(&mut stream, HEADER_TIMEOUT).await {
                    let io = head::Replay::new(read, stream);
                    serve_connection(TokioIo::new(io), vmm).await;
                }
                drop(slot);
            });
        }
    });
}

async fn serve_connection<I>(io: I, vmm: Arc<dyn VmmHandle>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let exit_after = Arc::new(AtomicBool::new(false));
    let service = {
        let (vmm, exit_after) = (vmm.clone(), exit_after.clone());
        service_fn(move |request| respond(vmm.clone(), exit_after.clone(), request))
    };
    // One request per connection: a client cannot park an idle keep-alive connection on a
    // slot, and one that sends nothing loses it after HEADER_TIMEOUT, so MAX_CONNECTIONS
    // idle clients cannot lock out a new one for longer than that.
    let result = http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(false)
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(io, service)
        .await;
    if let Err(e) = result {
        tracing::debug!("api: connection ended: {e}");
    }
    if exit_after.load(Ordering::SeqCst) {
        let _ = tokio::task::spawn_blocking(move || vmm.reply_sent()).await;
    }
}

async fn respond(
    vmm: Arc<dyn VmmHandle>,
    exit_after: Arc<AtomicBool>,
    request: HttpRequest<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    let result = answer(vmm, request).await;
    let response = match result {
        Ok(reply) => {
            if reply.then_exit {
                exit_after.store(true, Ordering::SeqCst);
            }
            json_response(reply.status, &reply.body, reply.then_exit, None)
        }
        Err(error) => {
            tracing::info!("api: {method} {path}: {} {error}", error.status());
            json_response(error.status(), &error.body(), false, error.allow())
        }
    };
    Ok(response)
}

async fn answer(
    vmm: Arc<dyn VmmHandle>,
    request: HttpRequest<Incoming>,
) -> Result<Reply, ApiError> {
    let route = route(request.method().as_str(), request.uri().path())?;
    let body = Limited::new(request.into_body(), MAX_BODY_BYTES);
    let body = match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
        Err(_) => return Err(ApiError::Timeout(BODY_TIMEOUT.as_secs())),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return Err(ApiError::TooLarge)
        }
        Ok(Err(e)) => return Err(ApiError::BadRequest(format!("cannot read the body: {e}"))),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    tokio::task::spawn_blocking(move || handle(vmm.as_ref(), route, &body))
        .await
        .map_err(|e| ApiError::Internal(format!("the request handler failed: {e}")))?
}

fn json_response(
    status: u16,
    body: &Value,
    close: bool,
    allow: Option<&'static str>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if close {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(allow) = allow {
        headers.insert(ALLOW, HeaderValue::from_static(allow));
    }
    response
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::api::tests::FakeVmm;
    use crate::api::Request;

    fn socket(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("crib-api-{name}-{}.sock", std::process::id()))
    }

    fn start_fake(name: &str) -> (PathBuf, Arc<FakeVmm>) {
        let path = socket(name);
        let vmm = Arc::new(FakeVmm::default());
        start(&path, vmm.clone(), None).unwrap();
        (path, vmm)
    }

    /// Sends one raw request with `Connection: close` and returns the whole response.
    fn exchange(path: &Path, method: &str, uri: &str, body: &str) -> String {
        try_exchange(path, method, uri, body).unwrap()
    }

    fn try_exchange(path: &Path, method: &str, uri: &str, body: &str) -> std::io::Result<String> {
        let mut stream = UnixStream::connect(path)?;
        write!(
            stream,
            "{method} {uri} HTTP/1.1\r\nHost: crib\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        Ok(reply)
    }

    #[test]
    fn get_vm_answers_json_over_the_socket() {
        let (path, _vmm) = start_fake("info");

        let reply = exchange(&path, "GET", "/api/v1/vm", "");

        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        assert!(reply.contains("content-type: application/json"), "{reply}");
        assert!(
            reply.contains(r#"{"id":"fake","state":"running"}"#),
            "{reply}"
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn unknown_path_answers_404_json() {
        let (path, _vmm) = start_fake("404");

        let reply = exchange(&path, "GET", "/nope", "");

        assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
        assert!(reply.contains(r#"{"error":"no endpoint /nope"#), "{reply}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn wrong_method_answers_405_with_allow() {
        let (path, _vmm) = start_fake("405");

        let reply = exchange(&path, "DELETE", "/api/v1/vm", "");

        assert!(reply.starts_with("HTTP/1.1 405"), "{reply}");
        assert!(reply.contains("allow: GET"), "{reply}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn pause_reaches_the_vmm() {
        let (path, vmm) = start_fake("pause");

        let reply = exchange(&path, "PUT", "/api/v1/vm/pause", "");

        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert_eq!(*vmm.requests.lock().unwrap(), vec![Request::Pause]);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn conflict_from_the_vmm_is_409_json() {
        let (path, _vmm) = start_fake("409");

        let reply = exchange(&path, "PUT", "/api/v1/vm/resume", "");

        assert!(reply.starts_with("HTTP/1.1 409"), "{reply}");
        assert!(reply.contains(r#"{"error":"not paused"}"#), "{reply}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn huge_body_is_413_and_the_server_goes_on() {
        let (path, _vmm) = start_fake("413");
        let huge = "x".repeat(MAX_BODY_BYTES + 1);

        let reply = exchange(&path, "PUT", "/api/v1/vm/shutdown", &huge);
        let next = exchange(&path, "GET", "/api/v1/vm", "");

        assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
        assert!(next.starts_with("HTTP/1.1 200"), "{next}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn invalid_json_is_400_and_the_server_goes_on() {
        let (path, _vmm) = start_fake("400");

        let reply = exchange(&path, "PUT", "/api/v1/disks/data/rate-limit", "{nope");
        let next = exchange(&path, "GET", "/api/v1/metrics", "");

        assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
        assert!(reply.contains("invalid JSON body"), "{reply}");
        assert!(next.contains(r#""vcpu_exits""#), "{next}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn stop_reply_closes_the_connection_then_tells_the_vmm() {
        let (path, vmm) = start_fake("stop");
        let mut stream = UnixStream::connect(&path).unwrap();
        // Keep-alive request: the server must close after the reply all the same.
        stream
            .write_all(b"PUT /api/v1/vm/stop HTTP/1.1\r\nHost: crib\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        // reply_sent runs after the connection closed; give it a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while *vmm.replies_sent.lock().unwrap() == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }

        assert!(reply.starts_with("HTTP/1.1 202"), "{reply}");
        assert!(reply.contains("connection: close"), "{reply}");
        assert_eq!(*vmm.replies_sent.lock().unwrap(), 1);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn regular_file_at_the_path_is_refused_and_kept() {
        let path = socket("file");
        std::fs::write(&path, b"keep").unwrap();

        let err = start(&path, Arc::new(FakeVmm::default()), None).unwrap_err();

        assert!(matches!(
            err,
            ApiServerError::Claim(devices::socket_path::SocketPathError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn live_socket_of_another_server_is_refused_and_kept() {
        let path = socket("live");
        let _ = std::fs::remove_file(&path);
        let _other = std::os::unix::net::UnixListener::bind(&path).unwrap();

        let err = start(&path, Arc::new(FakeVmm::default()), None).unwrap_err();

        assert!(matches!(
            err,
            ApiServerError::Claim(devices::socket_path::SocketPathError::InUse { .. })
        ));
        assert!(path.exists());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn idle_clients_holding_every_slot_do_not_lock_out_a_new_one() {
        let (path, _vmm) = start_fake("idle");
        let idle: Vec<_> = (0..=MAX_CONNECTIONS)
            .map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap())
            .collect();

        // Their slots go after HEADER_TIMEOUT; keep asking until then and a little longer.
        let deadline = std::time::Instant::now() + HEADER_TIMEOUT * 3;
        let mut reply = String::new();
        while std::time::Instant::now() < deadline {
            // While the slots are taken the server closes a new connection at once.
            reply = try_exchange(&path, "GET", "/api/v1/vm", "").unwrap_or_default();
            if reply.starts_with("HTTP/1.1 200") {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }

        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        drop(idle);
        let _ = std::fs::remove_file(&path);
    }

    /// What hyper would answer with a bare status line gets the JSON body too.
    #[test]
    fn malformed_heads_get_json_errors_over_the_socket() {
        let (path, _vmm) = start_fake("head");
        for (raw, status) in [
            (&b"GARBAGE\r\n\r\n"[..], "400"),
            (
                b"PUT /api/v1/vm/pause HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                "400",
            ),
        ] {
            let mut stream = UnixStream::connect(&path).unwrap();
            stream.write_all(raw).unwrap();
            let mut reply = String::new();
            stream.read_to_string(&mut reply).unwrap();
            assert!(reply.starts_with(&format!("HTTP/1.1 {status}")), "{reply}");
            let body = reply.split_once("\r\n\r\n").unwrap().1;
            let value: Value = serde_json::from_str(body).unwrap();
            assert!(value["error"].is_string(), "{reply}");
        }
        // A head cut off mid-way is answered once the header timeout passes.
        let mut stream = UnixStream::connect(&path).unwrap();
        stream.write_all(b"GET /api/v1/vm HTTP/1.1\r\nHo").unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
        assert!(reply.contains(r#"{"error":"#), "{reply}");
        // The server still serves well-formed requests afterwards.
        let reply = exchange(&path, "GET", "/api/v1/vm", "");
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        let _ = std::fs::remove_file(&path);
    }
}
