//! crib's HTTP API on a Unix socket (`--api-socket`): HTTP/1.1 with JSON bodies, specified
//! in docs/api.yaml (OpenAPI 3).
//!
//! - this file: routing and the JSON of each endpoint, pure and testable against a fake
//!   VMM ([`VmmHandle`]);
//! - `server.rs`: the HTTP glue (hyper on a current-thread tokio runtime, on a thread of
//!   its own), body limits and time-outs.
//!
//! The API thread never touches a vCPU or an I/O thread: reads (`GET`) come from shared
//! atomics, changes go to the VMM's event loop as a [`Request`] over a channel plus an
//! eventfd, and the reply comes back the same way (see `control.rs`).

mod head;
pub mod server;

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

pub use server::{bind, spawn, start, ApiListener, ApiServerError};

/// Largest request body the API reads; every valid body is far smaller.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Default time a graceful shutdown waits for the guest before stopping it.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest shutdown timeout accepted.
pub const MAX_SHUTDOWN_TIMEOUT_S: u64 = 3600;

/// A change asked of the VMM's event loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Pause,
    Resume,
    /// Ask the guest to power off; stop it after `timeout`.
    Shutdown {
        timeout: Duration,
    },
    /// Stop the guest now.
    Stop,
    /// Replace the rate limit of disk `id`.
    RateLimit {
        id: String,
        limits: RateLimitBody,
    },
}

/// The VMM's answer to a [`Request`].
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    /// 200 or 202.
    pub status: u16,
    pub body: Value,
    /// The VMM ends once this reply is written: the server closes the connection after
    /// it and then calls [`VmmHandle::reply_sent`].
    pub then_exit: bool,
}

impl Reply {
    /// 200 with `body`.
    pub fn ok(body: Value) -> Self {
        Self {
            status: 200,
            body,
            then_exit: false,
        }
    }
}

/// What the API needs of the VMM; the real one is `control::VmmControl`, tests use fakes.
pub trait VmmHandle: Send + Sync + 'static {
    /// `GET /api/v1/vm`: id, state, effective config, boot times, uptime.
    fn info(&self) -> Value;
    /// `GET /api/v1/metrics`.
    fn metrics(&self) -> Value;
    /// Hands `request` to the VMM and waits (bounded) for its reply. Blocks: the server
    /// calls it off its async threads.
    fn request(&self, request: Request) -> Result<Reply, ApiError>;
    /// A reply with `then_exit` was written (or its client went away): the VMM may end.
    fn reply_sent(&self);
}

/// An API error: its status and a message the caller can act on, sent as
/// `{"error": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{method} is not allowed on {path}: use {allowed}")]
    MethodNotAllowed {
        method: String,
        path: String,
        allowed: &'static str,
    },
    #[error("{0}")]
    Conflict(String),
    #[error("request body is larger than {MAX_BODY_BYTES} bytes: send the JSON object only")]
    TooLarge,
    #[error("the request did not arrive within {0} s: send it in one go")]
    Timeout(u64),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequest(_) => 400,
            Self::NotFound(_) => 404,
            Self::MethodNotAllowed { .. } => 405,
            Self::Timeout(_) => 408,
            Self::Conflict(_) => 409,
            Self::TooLarge => 413,
            Self::Internal(_) => 500,
        }
    }

    /// `{"error": "..."}`.
    pub fn body(&self) -> Value {
        json!({ "error": self.to_string() })
    }

    /// The `Allow` header of a 405.
    pub fn allow(&self) -> Option<&'static str> {
        match self {
            Self::MethodNotAllowed { allowed, .. } => Some(allowed),
            _ => None,
        }
    }
}

/// An endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    VmInfo,
    Pause,
    Resume,
    Shutdown,
    Stop,
    RateLimit(String),
    Metrics,
}

const PREFIX: &str = "/api/v1/";

/// The endpoint of `method` and `path` (without the query).
pub fn route(method: &str, path: &str) -> Result<Route, ApiError> {
    let not_found = || {
        ApiError::NotFound(format!(
            "no endpoint {path}: see docs/api.yaml (GET /api/v1/vm, GET /api/v1/metrics, \
             PUT /api/v1/vm/{{pause,resume,shutdown,stop}}, PUT /api/v1/disks/{{id}}/rate-limit)"
        ))
    };
    let rest = path.strip_prefix(PREFIX).ok_or_else(not_found)?;
    let segments: Vec<&str> = rest.split('/').collect();
    let (route, allowed) = match segments.as_slice() {
        ["vm"] => (Route::VmInfo, "GET"),
        ["metrics"] => (Route::Metrics, "GET"),
        ["vm", "pause"] => (Route::Pause, "PUT"),
        ["vm", "resume"] => (Route::Resume, "PUT"),
        ["vm", "shutdown"] => (Route::Shutdown, "PUT"),
        ["vm", "stop"] => (Route::Stop, "PUT"),
        ["disks", id, "rate-limit"] if !id.is_empty() => {
            let id = percent_decode(id).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "disk id '{id}' in the path is not valid percent-encoded UTF-8"
                ))
            })?;
            (Route::RateLimit(id), "PUT")
        }
        _ => return Err(not_found()),
    };
    if method != allowed {
        return Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_string(),
            allowed,
        });
    }
    Ok(route)
}

/// Decodes `%XX` escapes; `None` for a bad escape or non-UTF-8 result.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A body that must be empty or `{}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmptyBody {}

/// `PUT /api/v1/vm/shutdown`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShutdownBody {
    /// Seconds to wait for the guest before stopping it.
    timeout_s: Option<u64>,
}

/// `PUT /api/v1/disks/{id}/rate-limit`: the disk's new limits, replacing all of the old
/// ones; an absent or zero `iops`/`bandwidth` means no limit of that kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitBody {
    #[serde(default, deserialize_with = "crate::config::de_optional_size")]
    pub iops: Option<u64>,
    #[serde(default, deserialize_with = "crate::config::de_optional_size")]
    pub bandwidth: Option<u64>,
    #[serde(default, deserialize_with = "crate::config::de_optional_size")]
    pub burst: Option<u64>,
    #[serde(default, deserialize_with = "crate::config::de_optional_size")]
    pub iops_burst: Option<u64>,
}

/// Parses a JSON body; an empty body is `{}`. Errors name the field and what it takes.
/// Only an object is a body: serde would also take a struct's fields from an array.
fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::BadRequest(
            "invalid JSON body: it must be a JSON object ({...}), as docs/api.yaml says".into(),
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        ApiError::BadRequest(if path == "." {
            format!("invalid JSON body: {inner}")
        } else {
            format!("invalid JSON body: field {path}: {inner}")
        })
    })
}

/// Serves one request: `route` with its `body`. Blocks on the VMM for changes.
pub fn handle(vmm: &dyn VmmHandle, route: Route, body: &[u8]) -> Result<Reply, ApiError> {
    match route {
        Route::VmInfo => Ok(Reply::ok(vmm.info())),
        Route::Metrics => Ok(Reply::ok(vmm.metrics())),
        Route::Pause => {
            parse_body::<EmptyBody>(body)?;
            vmm.request(Request::Pause)
        }
        Route::Resume => {
            parse_body::<EmptyBody>(body)?;
            vmm.request(Request::Resume)
        }
        Route::Stop => {
            parse_body::<EmptyBody>(body)?;
            vmm.request(Request::Stop)
        }
        Route::Shutdown => {
            let body: ShutdownBody = parse_body(body)?;
            let timeout = match body.timeout_s {
                None => DEFAULT_SHUTDOWN_TIMEOUT,
                Some(s) if (1..=MAX_SHUTDOWN_TIMEOUT_S).contains(&s) => Duration::from_secs(s),
                Some(s) => {
                    return Err(ApiError::BadRequest(format!(
                        "timeout_s {s} is out of range: use 1 to {MAX_SHUTDOWN_TIMEOUT_S}"
                    )))
                }
            };
            vmm.request(Request::Shutdown { timeout })
        }
        Route::RateLimit(id) => {
            let limits: RateLimitBody = parse_body(body)?;
            vmm.request(Request::RateLimit { id, limits })
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A VMM that records requests and answers 200 with the request's name.
    #[derive(Default)]
    pub(crate) struct FakeVmm {
        pub requests: Mutex<Vec<Request>>,
        pub replies_sent: Mutex<usize>,
    }

    impl VmmHandle for FakeVmm {
        fn info(&self) -> Value {
            json!({"id": "fake", "state": "running"})
        }

        fn metrics(&self) -> Value {
            json!({"vcpu_exits": {"io_out": 1}})
        }

        fn request(&self, request: Request) -> Result<Reply, ApiError> {
            let reply = match &request {
                Request::RateLimit { id, .. } if id != "data" => {
                    Err(ApiError::NotFound(format!("no disk '{id}'")))
                }
                Request::Resume => Err(ApiError::Conflict("not paused".into())),
                Request::Stop => Ok(Reply {
                    status: 202,
                    body: json!({"state": "stopping"}),
                    then_exit: true,
                }),
                other => Ok(Reply::ok(json!({ "request": format!("{other:?}") }))),
            };
            self.requests
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(request);
            reply
        }

        fn reply_sent(&self) {
            *self.replies_sent.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        }
    }

    fn call(vmm: &FakeVmm, method: &str, path: &str, body: &str) -> Result<Reply, ApiError> {
        handle(vmm, route(method, path)?, body.as_bytes())
    }

    #[test]
    fn every_endpoint_routes() {
        assert_eq!(route("GET", "/api/v1/vm"), Ok(Route::VmInfo));
        assert_eq!(route("GET", "/api/v1/metrics"), Ok(Route::Metrics));
        assert_eq!(route("PUT", "/api/v1/vm/pause"), Ok(Route::Pause));
        assert_eq!(route("PUT", "/api/v1/vm/resume"), Ok(Route::Resume));
        assert_eq!(route("PUT", "/api/v1/vm/shutdown"), Ok(Route::Shutdown));
        assert_eq!(route("PUT", "/api/v1/vm/stop"), Ok(Route::Stop));
        assert_eq!(
            route("PUT", "/api/v1/disks/data/rate-limit"),
            Ok(Route::RateLimit("data".into()))
        );
    }

    #[test]
    fn unknown_path_is_404_naming_the_endpoints() {
        let err = route("GET", "/api/v1/vms").unwrap_err();
        assert_eq!(err.status(), 404);
        assert!(err.to_string().contains("GET /api/v1/vm"), "{err}");
    }

    #[test]
    fn path_outside_the_prefix_is_404() {
        assert_eq!(route("GET", "/").unwrap_err().status(), 404);
    }

    #[test]
    fn wrong_method_is_405_with_the_allowed_one() {
        let err = route("POST", "/api/v1/vm/pause").unwrap_err();
        assert_eq!(err.status(), 405);
        assert_eq!(err.allow(), Some("PUT"));
        assert_eq!(
            err.to_string(),
            "POST is not allowed on /api/v1/vm/pause: use PUT"
        );
    }

    #[test]
    fn disk_id_is_percent_decoded() {
        assert_eq!(
            route("PUT", "/api/v1/disks/my%20disk/rate-limit"),
            Ok(Route::RateLimit("my disk".into()))
        );
        assert_eq!(
            route("PUT", "/api/v1/disks/%zz/rate-limit")
                .unwrap_err()
                .status(),
            400
        );
    }

    #[test]
    fn empty_disk_id_is_404() {
        assert_eq!(
            route("PUT", "/api/v1/disks//rate-limit")
                .unwrap_err()
                .status(),
            404
        );
    }

    #[test]
    fn pause_accepts_an_empty_body_or_an_empty_object() {
        let vmm = FakeVmm::default();
        call(&vmm, "PUT", "/api/v1/vm/pause", "").unwrap();
        call(&vmm, "PUT", "/api/v1/vm/pause", " {} ").unwrap();
        assert_eq!(
            *vmm.requests.lock().unwrap(),
            vec![Request::Pause, Request::Pause]
        );
    }

    #[test]
    fn array_where_an_object_belongs_is_400_and_reaches_nothing() {
        let vmm = FakeVmm::default();

        let shutdown = call(&vmm, "PUT", "/api/v1/vm/shutdown", "[5]").unwrap_err();
        let limit = call(&vmm, "PUT", "/api/v1/disks/data/rate-limit", "[1, 2]").unwrap_err();

        assert_eq!(shutdown.status(), 400);
        assert!(shutdown.to_string().contains("JSON object"), "{shutdown}");
        assert_eq!(limit.status(), 400);
        assert!(vmm.requests.lock().unwrap().is_empty());
    }

    #[test]
    fn pause_with_unknown_field_is_400_naming_it() {
        let err = call(
            &FakeVmm::default(),
            "PUT",
            "/api/v1/vm/pause",
            r#"{"now": true}"#,
        )
        .unwrap_err();
        assert_eq!(err.status(), 400);
        assert!(err.to_string().contains("unknown field `now`"), "{err}");
    }

    #[test]
    fn shutdown_default_timeout_is_twenty_seconds() {
        let vmm = FakeVmm::default();
        call(&vmm, "PUT", "/api/v1/vm/shutdown", "").unwrap();
        assert_eq!(
            *vmm.requests.lock().unwrap(),
            vec![Request::Shutdown {
                timeout: Duration::from_secs(20)
            }]
        );
    }

    #[test]
    fn shutdown_takes_timeout_s() {
        let vmm = FakeVmm::default();
        call(&vmm, "PUT", "/api/v1/vm/shutdown", r#"{"timeout_s": 3}"#).unwrap();
        assert_eq!(
            *vmm.requests.lock().unwrap(),
            vec![Request::Shutdown {
                timeout: Duration::from_secs(3)
            }]
        );
    }

    #[test]
    fn shutdown_zero_timeout_is_400_with_the_range() {
        let err = call(
            &FakeVmm::default(),
            "PUT",
            "/api/v1/vm/shutdown",
            r#"{"timeout_s": 0}"#,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "timeout_s 0 is out of range: use 1 to 3600"
        );
    }

    #[test]
    fn shutdown_timeout_of_wrong_type_names_the_field() {
        let err = call(
            &FakeVmm::default(),
            "PUT",
            "/api/v1/vm/shutdown",
            r#"{"timeout_s": "soon"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("field timeout_s"), "{err}");
    }

    #[test]
    fn invalid_json_is_400() {
        let err = call(&FakeVmm::default(), "PUT", "/api/v1/vm/shutdown", "{").unwrap_err();
        assert_eq!(err.status(), 400);
        assert!(err.to_string().starts_with("invalid JSON body"), "{err}");
    }

    #[test]
    fn rate_limit_body_takes_numbers_and_sizes() {
        let vmm = FakeVmm::default();
        call(
            &vmm,
            "PUT",
            "/api/v1/disks/data/rate-limit",
            r#"{"iops": 100, "bandwidth": "10M", "burst": 0, "iops_burst": 5}"#,
        )
        .unwrap();
        assert_eq!(
            *vmm.requests.lock().unwrap(),
            vec![Request::RateLimit {
                id: "data".into(),
                limits: RateLimitBody {
                    iops: Some(100),
                    bandwidth: Some(10 << 20),
                    burst: Some(0),
                    iops_burst: Some(5),
                }
            }]
        );
    }

    #[test]
    fn rate_limit_unknown_field_is_400() {
        let err = call(
            &FakeVmm::default(),
            "PUT",
            "/api/v1/disks/data/rate-limit",
            r#"{"ops": 1}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `ops`"), "{err}");
    }

    #[test]
    fn rate_limit_of_unknown_disk_is_the_vmms_404() {
        let err = call(
            &FakeVmm::default(),
            "PUT",
            "/api/v1/disks/nope/rate-limit",
            "{}",
        )
        .unwrap_err();
        assert_eq!(err.status(), 404);
    }

    #[test]
    fn error_body_is_json_with_the_message() {
        assert_eq!(
            ApiError::Conflict("the VM is shutting down".into()).body(),
            json!({"error": "the VM is shutting down"})
        );
    }
}
