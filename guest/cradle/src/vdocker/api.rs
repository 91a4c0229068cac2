//! The Docker Engine API handlers: one per [`Route`], with the JSON shapes
//! the docker 28 CLI reads. Negotiation: `/_ping` and every response carry
//! `Api-Version` [`API_VERSION`]; the CLI then prefixes its paths with it.

use std::time::{Duration, SystemTime};

use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderName, HeaderValue, CACHE_CONTROL, PRAGMA, SERVER};
use hyper::{Method, Request, Response, StatusCode};
use initramfs::podspec::PodSpec;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::archive;
use super::attach::{self, AttachOptions};
use super::containers::{Container, Run};
use super::errors::VdockerError;
use super::exec::{self, ExecCreateBody, ExecStartBody};
use super::logs::{self, LogQuery};
use super::registry::Registry;
use super::routing::{route, Query, Route};
use super::server::{self, ResponseBody, BODY_CHANNEL_CHUNKS, MULTIPLEXED_STREAM, RAW_STREAM};
use super::stats;
use super::time::{human_duration, parse_unix_timestamp, rfc3339_nanos, unix_seconds, ZERO_TIME};
use super::top;

/// The API version served: Docker 27's, which the docker 28 CLI speaks.
pub const API_VERSION: &str = "1.47";
/// The oldest version the CLI may ask for (Docker's own minimum).
const MIN_API_VERSION: &str = "1.24";
/// The engine version reported by `docker version`.
const ENGINE_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "-cradle");
/// Largest JSON request body.
const MAX_JSON_BYTES: usize = 1024 * 1024;
/// How long a forced removal waits for the container to die of SIGKILL.
const REMOVE_KILL_WAIT_SECONDS: u64 = 10;
/// Seconds `stop`, `restart` and the shutdown call wait before SIGKILL.
const DEFAULT_STOP_SECONDS: u64 = 10;
/// The image every container reports.
const IMAGE: &str = "cradle";

/// The API over one registry.
pub struct Api {
    registry: Registry,
}

impl Api {
    pub fn new(registry: Registry) -> Self {
        Self { registry }
    }

    /// Answers one request; never fails (errors are Docker error JSON).
    pub async fn handle(&self, request: Request<Incoming>) -> Response<ResponseBody> {
        let mut response = match self.dispatch(request).await {
            Ok(response) => response,
            Err(error) => server::error_response(&error),
        };
        let headers = response.headers_mut();
        headers.insert(
            HeaderName::from_static("api-version"),
            HeaderValue::from_static(API_VERSION),
        );
        headers.insert(
            SERVER,
            HeaderValue::from_static(concat!(
                "Docker/",
                env!("CARGO_PKG_VERSION"),
                "-cradle (linux)"
            )),
        );
        response
    }

    async fn dispatch(
        &self,
        mut request: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, VdockerError> {
        let route = route(request.method(), request.uri().path())?;
        let query = Query::parse(request.uri().query());
        let registry = &self.registry;
        match route {
            Route::Ping => Ok(ping(request.method() == Method::HEAD)),
            Route::Version => Ok(server::json(StatusCode::OK, &version())),
            Route::ListContainers => {
                let all = query.flag("all");
                let list: Vec<Value> = registry
                    .containers()
                    .iter()
                    .filter(|c| all || c.running_run().is_some())
                    .map(|c| summary(c))
                    .collect();
                Ok(server::json(StatusCode::OK, &Value::Array(list)))
            }
            Route::Inspect(key) => {
                let container = registry.find(&key)?;
                Ok(server::json(StatusCode::OK, &inspect(&container)))
            }
            Route::Logs(key) => {
                let container = registry.find(&key)?;
                let query = log_query(&query)?;
                // A TTY's logs are raw, as Docker sends them.
                let content_type = if container.spec.tty {
                    RAW_STREAM
                } else {
                    MULTIPLEXED_STREAM
                };
                let (tx, rx) = mpsc::channel(BODY_CHANNEL_CHUNKS);
                tokio::spawn(async move { logs::stream(&container, query, tx).await });
                Ok(server::streaming(StatusCode::OK, content_type, rx))
            }
            Route::Attach(key) => {
                let container = registry.find(&key)?;
                let upgrade = server::take_upgrade(&mut request);
                Ok(attach::attach(
                    container,
                    AttachOptions::from_query(&query),
                    upgrade,
                ))
            }
            Route::Resize(key) => {
                let container = registry.find(&key)?;
                let height = query.number::<u16>("h")?.unwrap_or(0);
                let width = query.number::<u16>("w")?.unwrap_or(0);
                container.resize(height, width)?;
                Ok(server::empty(StatusCode::OK))
            }
            Route::Archive(key) => {
                let container = registry.find(&key)?;
                let root = container_root(&container.name)?;
                let path = query.get("path");
                match *request.method() {
                    Method::PUT => {
                        archive::put(&container.name, root, path, request.into_body()).await
                    }
                    Method::HEAD => archive::get(&container.name, root, path, true).await,
                    _ => archive::get(&container.name, root, path, false).await,
                }
            }
            Route::Top(key) => {
                let container = registry.find(&key)?;
                top::top(&container, query.get("ps_args"))
            }
            Route::Wait(key) => wait(registry.find(&key)?, query.get("condition")),
            Route::Kill(key) => {
                let container = registry.find(&key)?;
                let signal = signal_param(&query, libc::SIGKILL)?;
                container.signal(signal)?;
                Ok(server::empty(StatusCode::NO_CONTENT))
            }
            Route::Stop(key) => {
                let container = registry.find(&key)?;
                let signal = signal_param(&query, libc::SIGTERM)?;
                container.stop(signal, stop_timeout(&query)?).await?;
                Ok(server::empty(StatusCode::NO_CONTENT))
            }
            Route::Start(key) => {
                registry.find(&key)?.start()?;
                Ok(server::empty(StatusCode::NO_CONTENT))
            }
            Route::Restart(key) => {
                let container = registry.find(&key)?;
                let signal = signal_param(&query, libc::SIGTERM)?;
                match container.stop(signal, stop_timeout(&query)?).await {
                    Ok(()) | Err(VdockerError::NotModified(_)) => {}
                    Err(error) => return Err(error),
                }
                match container.start() {
                    Ok(()) | Err(VdockerError::NotModified(_)) => {}
                    Err(error) => return Err(error),
                }
                Ok(server::empty(StatusCode::NO_CONTENT))
            }
            Route::ExecCreate(key) => {
                let container = registry.find(&key)?;
                let body: ExecCreateBody =
                    server::read_json(request.body_mut(), MAX_JSON_BYTES).await?;
                let exec = registry.execs().create(container, body)?;
                Ok(server::json(StatusCode::CREATED, &json!({ "Id": exec.id })))
            }
            Route::ExecStart(key) => {
                let exec = registry.execs().find(&key)?;
                let upgrade = server::take_upgrade(&mut request);
                let body: ExecStartBody =
                    server::read_json(request.body_mut(), MAX_JSON_BYTES).await?;
                exec::start(registry, exec, body, upgrade)
            }
            Route::ExecInspect(key) => Ok(server::json(
                StatusCode::OK,
                &registry.execs().find(&key)?.inspect(),
            )),
            Route::ExecResize(key) => {
                let exec = registry.execs().find(&key)?;
                let height = query.number::<u16>("h")?.unwrap_or(0);
                let width = query.number::<u16>("w")?.unwrap_or(0);
                exec.resize(height, width)?;
                Ok(server::empty(StatusCode::OK))
            }
            Route::ExecKill(key) => {
                let exec = registry.execs().find(&key)?;
                let signal = signal_param(&query, libc::SIGKILL)?;
                exec.signal(signal)?;
                Ok(server::empty(StatusCode::NO_CONTENT))
            }
            Route::CreateContainer => {
                let bytes = server::read_body(request.body_mut(), MAX_JSON_BYTES).await?;
                let at = format!("processes[{}]", registry.next_index());
                let process = PodSpec::process_from_json(&bytes, &at)
                    .map_err(|source| VdockerError::InvalidProcess { source })?;
                let container = registry.create(process)?;
                Ok(server::json(
                    StatusCode::CREATED,
                    &json!({ "Id": container.id, "Warnings": [] }),
                ))
            }
            Route::Remove(key) => {
                let container = registry.find(&key)?;
                remove(registry, container, query.flag("force")).await?;
                Ok(server::empty(StatusCode::NO_CONTENT))
            }
            Route::Stats(key) => Ok(stats::respond(registry.find(&key)?, &query)),
            Route::Shutdown => {
                let grace = stop_timeout(&query)?;
                registry.request_shutdown(grace);
                Ok(server::json(
                    StatusCode::ACCEPTED,
                    &json!({
                        "message": format!(
                            "shutting down: SIGTERM to every process, SIGKILL after {} s, then unmount and power off",
                            grace.as_secs()
                        )
                    }),
                ))
            }
        }
    }
}

/// `DELETE /containers/{id}`: with `force`, a running container is killed (SIGKILL to
/// its process group, no restart) and waited for; without, it is a conflict. The
/// removal itself waits for the cgroup to empty, so it runs off the API's thread.
async fn remove(
    registry: &Registry,
    container: std::sync::Arc<Container>,
    force: bool,
) -> Result<(), VdockerError> {
    if container.is_active() {
        if !force {
            return Err(VdockerError::RemoveRunning(container.id.clone()));
        }
        container.hold();
        if let Some(number) = container.running_run() {
            let _ = container.signal_group(libc::SIGKILL);
            let wait = Duration::from_secs(REMOVE_KILL_WAIT_SECONDS);
            if tokio::time::timeout(wait, container.wait_run_exit(number))
                .await
                .is_err()
            {
                return Err(VdockerError::KillTimeout(
                    container.name.clone(),
                    REMOVE_KILL_WAIT_SECONDS,
                ));
            }
        }
    }
    let registry = registry.clone();
    let name = container.name.clone();
    tokio::task::spawn_blocking(move || registry.remove(&container))
        .await
        .map_err(|_| VdockerError::RemoveFailed(name))?
}

/// `/_ping`: "OK" and the negotiation headers.
fn ping(head: bool) -> Response<ResponseBody> {
    let mut response = if head {
        server::empty(StatusCode::OK)
    } else {
        server::full(StatusCode::OK, "text/plain; charset=utf-8", "OK")
    };
    let headers = response.headers_mut();
    headers.insert(
        HeaderName::from_static("ostype"),
        HeaderValue::from_static("linux"),
    );
    headers.insert(
        HeaderName::from_static("docker-experimental"),
        HeaderValue::from_static("false"),
    );
    headers.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store, must-revalidate"),
    );
    headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

/// Go's name for this architecture.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn kernel_version() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_owned())
        .unwrap_or_default()
}

/// `GET /version`.
fn version() -> Value {
    let kernel = kernel_version();
    json!({
        "Platform": { "Name": "crib cradle" },
        "Components": [{
            "Name": "Engine",
            "Version": ENGINE_VERSION,
            "Details": {
                "ApiVersion": API_VERSION,
                "Arch": go_arch(),
                "BuildTime": "",
                "Experimental": "false",
                "GitCommit": "",
                "GoVersion": "",
                "KernelVersion": kernel,
                "MinAPIVersion": MIN_API_VERSION,
                "Os": "linux",
            },
        }],
        "Version": ENGINE_VERSION,
        "ApiVersion": API_VERSION,
        "MinAPIVersion": MIN_API_VERSION,
        "GitCommit": "",
        "GoVersion": "",
        "Os": "linux",
        "Arch": go_arch(),
        "KernelVersion": kernel,
        "BuildTime": "",
    })
}

/// Docker's state name of a container's latest run.
fn status_name(run: Option<&Run>) -> &'static str {
    match run {
        None => "created",
        Some(run) if run.is_running() => "running",
        Some(run) if run.pid.is_none() => "created",
        Some(_) => "exited",
    }
}

/// `docker ps`'s STATUS column: "Up 5 minutes", "Exited (0) 3 seconds ago".
fn status_text(run: Option<&Run>, now: SystemTime) -> String {
    let since = |time: SystemTime| human_duration(now.duration_since(time).unwrap_or_default());
    match run {
        None => "Created".to_owned(),
        Some(run) if run.is_running() => format!("Up {}", since(run.started_at)),
        Some(run) => match run.finished_at {
            Some(finished) => format!("Exited ({}) {} ago", run.exit_code(), since(finished)),
            None => format!("Exited ({})", run.exit_code()),
        },
    }
}

/// The container of an image process (`None`: a process in cradle's root).
fn image_of(container: &Container) -> Option<crate::containers::ContainerPlan> {
    crate::containers::get()?.plan(&container.name)
}

/// The root filesystem `docker cp` works in: an image container's own (`/proc/PID/root`
/// of its PID 1), `None` for a process in cradle's root.
fn container_root(name: &str) -> Result<Option<std::path::PathBuf>, VdockerError> {
    let Some(plan) = crate::containers::get().and_then(|all| all.plan(name)) else {
        return Ok(None);
    };
    let pid = std::fs::read_to_string(plan.pid_file())
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
        .ok_or_else(|| VdockerError::NotRunning(name.to_owned()))?;
    Ok(Some(format!("/proc/{pid}/root").into()))
}

/// An entry of `GET /containers/json`.
fn summary(container: &Container) -> Value {
    let run = container.snapshot();
    let image = image_of(container);
    json!({
        "Id": container.id,
        "Names": [format!("/{}", container.name)],
        "Image": image.as_ref().map_or(IMAGE, |i| i.image.as_str()),
        "ImageID": image.as_ref().map_or("", |i| i.digest.as_str()),
        "Command": image.as_ref().map_or(&container.spec.argv, |i| &i.argv).join(" "),
        "Created": unix_seconds(container.created),
        "Ports": [],
        "Labels": {},
        "State": status_name(run.as_ref()),
        "Status": status_text(run.as_ref(), SystemTime::now()),
        "HostConfig": { "NetworkMode": "host" },
        "NetworkSettings": { "Networks": {} },
        "Mounts": [],
    })
}

/// `GET /containers/{id}/json`.
fn inspect(container: &Container) -> Value {
    let run = container.snapshot();
    let run = run.as_ref();
    let running = run.is_some_and(Run::is_running);
    let image = image_of(container);
    let argv = image.as_ref().map_or(&container.spec.argv, |i| &i.argv);
    let (restart_count, restarting) = container.restarts();
    let policy = container.spec.restart.docker();
    let (path, args) = argv
        .split_first()
        .map(|(program, rest)| (program.clone(), rest.to_vec()))
        .unwrap_or_default();
    json!({
        "Id": container.id,
        "Created": rfc3339_nanos(container.created),
        "Path": path,
        "Args": args,
        "State": {
            "Status": status_name(run),
            "Running": running,
            "Paused": false,
            "Restarting": restarting,
            "OOMKilled": false,
            "Dead": false,
            "Pid": run.filter(|r| r.is_running()).and_then(|r| r.pid).unwrap_or(0),
            "ExitCode": run.map_or(0, Run::exit_code),
            "Error": run.and_then(|r| r.error.clone()).unwrap_or_default(),
            "StartedAt": run.map_or_else(|| ZERO_TIME.to_owned(), |r| rfc3339_nanos(r.started_at)),
            "FinishedAt": run
                .and_then(|r| r.finished_at)
                .map_or_else(|| ZERO_TIME.to_owned(), rfc3339_nanos),
        },
        "Image": image.as_ref().map_or(IMAGE, |i| i.digest.as_str()),
        "Name": format!("/{}", container.name),
        "RestartCount": restart_count,
        "Driver": "",
        "Platform": "linux",
        "MountLabel": "",
        "ProcessLabel": "",
        "AppArmorProfile": "",
        "HostConfig": {
            "NetworkMode": "host",
            "AutoRemove": false,
            "RestartPolicy": { "Name": policy.0, "MaximumRetryCount": policy.1 },
        },
        "Mounts": [],
        "Config": {
            "Hostname": if image.is_some() { container.name.as_str() } else { "" },
            "User": image.as_ref().map_or("", |i| i.user.as_str()),
            "AttachStdin": false,
            "AttachStdout": false,
            "AttachStderr": false,
            "Tty": container.spec.tty,
            "OpenStdin": true,
            "StdinOnce": false,
            "Env": image.as_ref().map_or(&container.spec.env, |i| &i.env),
            "Cmd": image.as_ref().map_or(&container.spec.argv, |i| &i.cmd),
            "Image": image.as_ref().map_or(IMAGE, |i| i.image.as_str()),
            "WorkingDir": image.as_ref().map_or_else(
                || container.spec.cwd.clone().unwrap_or_else(|| "/".to_owned()),
                |i| i.cwd.clone(),
            ),
            "Entrypoint": image.as_ref().map(|i| i.entrypoint.clone()),
            "Labels": {},
        },
        "NetworkSettings": { "Networks": {} },
    })
}

/// The logs query: `stdout`, `stderr`, `follow`, `tail`, `timestamps`,
/// `since`, `until`.
fn log_query(query: &Query) -> Result<LogQuery, VdockerError> {
    let log_query = LogQuery {
        stdout: query.flag("stdout"),
        stderr: query.flag("stderr"),
        since: time_param(query, "since")?,
        until: time_param(query, "until")?,
        tail: tail_param(query.get("tail"))?,
        timestamps: query.flag("timestamps"),
        follow: query.flag("follow"),
    };
    if !log_query.stdout && !log_query.stderr {
        return Err(VdockerError::BadRequest(
            "you must choose at least one stream: stdout=1 or stderr=1",
        ));
    }
    Ok(log_query)
}

fn time_param(query: &Query, name: &'static str) -> Result<Option<SystemTime>, VdockerError> {
    match query.get(name) {
        None | Some("") | Some("0") => Ok(None),
        Some(value) => {
            parse_unix_timestamp(value)
                .map(Some)
                .ok_or_else(|| VdockerError::BadParameter {
                    name,
                    value: value.to_owned(),
                    expected: "a Unix timestamp, like 1714564800 or 1714564800.5",
                })
        }
    }
}

/// `all` (or nothing, or a negative number) is every line.
fn tail_param(value: Option<&str>) -> Result<Option<usize>, VdockerError> {
    match value {
        None | Some("") | Some("all") => Ok(None),
        Some(value) if value.starts_with('-') => Ok(None),
        Some(value) => value
            .parse()
            .map(Some)
            .map_err(|_| VdockerError::BadParameter {
                name: "tail",
                value: value.to_owned(),
                expected: "\"all\" or a number of lines",
            }),
    }
}

/// `t` (Docker's timeout in seconds), default 10.
fn stop_timeout(query: &Query) -> Result<Duration, VdockerError> {
    Ok(Duration::from_secs(
        query.number::<u64>("t")?.unwrap_or(DEFAULT_STOP_SECONDS),
    ))
}

/// The `signal` parameter, `default` if absent.
fn signal_param(query: &Query, default: i32) -> Result<i32, VdockerError> {
    match query.get("signal") {
        None | Some("") => Ok(default),
        Some(value) => parse_signal(value).ok_or_else(|| VdockerError::BadParameter {
            name: "signal",
            value: value.to_owned(),
            expected: "a signal name or number, like SIGTERM, TERM or 15",
        }),
    }
}

/// Signal names Docker accepts (with or without `SIG`, any case), numbers.
pub fn parse_signal(text: &str) -> Option<i32> {
    if let Ok(number) = text.parse::<i32>() {
        return (1..=64).contains(&number).then_some(number);
    }
    let upper = text.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let signal = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "ILL" => libc::SIGILL,
        "TRAP" => libc::SIGTRAP,
        "ABRT" | "IOT" => libc::SIGABRT,
        "BUS" => libc::SIGBUS,
        "FPE" => libc::SIGFPE,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "SEGV" => libc::SIGSEGV,
        "USR2" => libc::SIGUSR2,
        "PIPE" => libc::SIGPIPE,
        "ALRM" => libc::SIGALRM,
        "TERM" => libc::SIGTERM,
        "STKFLT" => libc::SIGSTKFLT,
        "CHLD" => libc::SIGCHLD,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "TSTP" => libc::SIGTSTP,
        "TTIN" => libc::SIGTTIN,
        "TTOU" => libc::SIGTTOU,
        "URG" => libc::SIGURG,
        "XCPU" => libc::SIGXCPU,
        "XFSZ" => libc::SIGXFSZ,
        "VTALRM" => libc::SIGVTALRM,
        "PROF" => libc::SIGPROF,
        "WINCH" => libc::SIGWINCH,
        "IO" | "POLL" => libc::SIGIO,
        "PWR" => libc::SIGPWR,
        "SYS" => libc::SIGSYS,
        _ => return None,
    };
    Some(signal)
}

/// `POST /containers/{id}/wait`: headers now, `{"StatusCode":N,"Error":null}`
/// when the condition is met (the CLI waits for the headers before
/// attaching, so they cannot wait for the exit).
fn wait(
    container: std::sync::Arc<Container>,
    condition: Option<&str>,
) -> Result<Response<ResponseBody>, VdockerError> {
    let next_exit = match condition {
        None | Some("") | Some("not-running") | Some("removed") => false,
        Some("next-exit") => true,
        Some(other) => {
            return Err(VdockerError::BadParameter {
                name: "condition",
                value: other.to_owned(),
                expected: "not-running, next-exit or removed",
            })
        }
    };
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let code = tokio::select! {
            code = async {
                if next_exit {
                    container.wait_next_exit().await
                } else {
                    container.wait_not_running().await
                }
            } => code,
            () = tx.closed() => return,
        };
        let mut body = json!({ "StatusCode": code, "Error": null }).to_string();
        body.push('\n');
        let _ = tx.send(Bytes::from(body)).await;
    });
    Ok(server::streaming(StatusCode::OK, "application/json", rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_signal_accepts_names_prefixes_and_numbers() {
        assert_eq!(parse_signal("SIGTERM"), Some(libc::SIGTERM));
        assert_eq!(parse_signal("kill"), Some(libc::SIGKILL));
        assert_eq!(parse_signal("9"), Some(9));
        assert_eq!(parse_signal("SIGNOPE"), None);
        assert_eq!(parse_signal("0"), None);
    }

    #[test]
    fn tail_param_reads_all_and_numbers() {
        assert_eq!(tail_param(Some("all")).unwrap(), None);
        assert_eq!(tail_param(Some("5")).unwrap(), Some(5));
        assert!(tail_param(Some("five")).is_err());
    }

    #[test]
    fn log_query_without_a_stream_is_400() {
        let error = log_query(&Query::parse(Some("follow=1"))).unwrap_err();

        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn status_text_of_a_never_started_container_is_created() {
        assert_eq!(status_text(None, SystemTime::now()), "Created");
    }
}
