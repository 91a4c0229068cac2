//! Maps a request's method and path to a [`Route`], and parses query
//! strings. Pure: no I/O, unit tested.
//!
//! Docker clients prefix paths with the API version (`/v1.47/containers/json`)
//! once they have negotiated one, and use bare paths before (`/_ping`);
//! both are accepted. `/crib/v1/...` is cradle's own (never prefixed).

use hyper::Method;

use super::errors::VdockerError;

/// What a request asks for. Ids are as given (id, id prefix or name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Ping,
    Version,
    ListContainers,
    Inspect(String),
    Logs(String),
    Attach(String),
    Resize(String),
    Archive(String),
    Top(String),
    Wait(String),
    Kill(String),
    Stop(String),
    Start(String),
    Restart(String),
    ExecCreate(String),
    ExecStart(String),
    ExecInspect(String),
    ExecResize(String),
    /// crib's: `POST /exec/{id}/kill?signal=N` (Docker has no way to signal an exec).
    ExecKill(String),
    Shutdown,
    /// crib's: `POST /crib/v1/containers` with a pod-spec process as the body.
    CreateContainer,
    /// `DELETE /containers/{id}` (`docker rm`).
    Remove(String),
    /// `GET /containers/{id}/stats`.
    Stats(String),
}

/// Routes `method` on `path` (no query string).
pub fn route(method: &Method, path: &str) -> Result<Route, VdockerError> {
    let bare = strip_version(path);
    let segments: Vec<&str> = bare.trim_start_matches('/').split('/').collect();
    let check = |allowed: &[Method], allowed_text: &'static str, route: Route| {
        if allowed.contains(method) {
            Ok(route)
        } else {
            Err(VdockerError::MethodNotAllowed {
                method: method.to_string(),
                path: path.to_owned(),
                allowed: allowed_text,
            })
        }
    };
    let get = |route| check(&[Method::GET], "GET", route);
    let post = |route| check(&[Method::POST], "POST", route);
    let id = |id: &&str| (*id).to_owned();
    match segments.as_slice() {
        ["_ping"] => check(&[Method::GET, Method::HEAD], "GET or HEAD", Route::Ping),
        ["version"] => get(Route::Version),
        ["containers", "json"] => get(Route::ListContainers),
        ["containers", c, "json"] if !c.is_empty() => get(Route::Inspect(id(c))),
        ["containers", c, "logs"] if !c.is_empty() => get(Route::Logs(id(c))),
        ["containers", c, "attach"] if !c.is_empty() => post(Route::Attach(id(c))),
        ["containers", c, "resize"] if !c.is_empty() => post(Route::Resize(id(c))),
        ["containers", c, "wait"] if !c.is_empty() => post(Route::Wait(id(c))),
        ["containers", c, "kill"] if !c.is_empty() => post(Route::Kill(id(c))),
        ["containers", c, "stop"] if !c.is_empty() => post(Route::Stop(id(c))),
        ["containers", c, "start"] if !c.is_empty() => post(Route::Start(id(c))),
        ["containers", c, "restart"] if !c.is_empty() => post(Route::Restart(id(c))),
        ["containers", c, "exec"] if !c.is_empty() => post(Route::ExecCreate(id(c))),
        ["containers", c, "top"] if !c.is_empty() => get(Route::Top(id(c))),
        ["containers", c, "stats"] if !c.is_empty() => get(Route::Stats(id(c))),
        ["containers", c] if !c.is_empty() && *c != "json" && *c != "create" => {
            check(&[Method::DELETE], "DELETE", Route::Remove(id(c)))
        }
        ["containers", c, "archive"] if !c.is_empty() => check(
            &[Method::GET, Method::HEAD, Method::PUT],
            "GET, HEAD or PUT",
            Route::Archive(id(c)),
        ),
        ["exec", e, "start"] if !e.is_empty() => post(Route::ExecStart(id(e))),
        ["exec", e, "json"] if !e.is_empty() => get(Route::ExecInspect(id(e))),
        ["exec", e, "resize"] if !e.is_empty() => post(Route::ExecResize(id(e))),
        ["exec", e, "kill"] if !e.is_empty() => post(Route::ExecKill(id(e))),
        ["crib", "v1", "shutdown"] if bare.len() == path.len() => post(Route::Shutdown),
        ["crib", "v1", "containers"] if bare.len() == path.len() => post(Route::CreateContainer),
        ["containers", "", ..] | ["exec", "", ..] => Err(VdockerError::NotFound {
            method: method.to_string(),
            path: path.to_owned(),
        }),
        _ if is_known_docker_path(&segments) => Err(VdockerError::NotImplemented {
            what: format!("{method} {bare}"),
        }),
        _ => Err(VdockerError::NotFound {
            method: method.to_string(),
            path: path.to_owned(),
        }),
    }
}

/// Docker endpoints cradle does not serve: 501 rather than 404, so
/// `docker run` or `docker images` say why.
fn is_known_docker_path(segments: &[&str]) -> bool {
    matches!(
        segments,
        ["containers", ..]
            | ["images", ..]
            | ["build", ..]
            | ["networks", ..]
            | ["volumes", ..]
            | ["info"]
            | ["events"]
            | ["system", ..]
            | ["auth"]
            | ["commit"]
            | ["swarm", ..]
            | ["services", ..]
            | ["nodes", ..]
            | ["tasks", ..]
            | ["secrets", ..]
            | ["configs", ..]
            | ["plugins", ..]
            | ["session"]
            | ["distribution", ..]
    )
}

/// `path` without a leading `/v<major>.<minor>`.
fn strip_version(path: &str) -> &str {
    let Some(rest) = path.strip_prefix("/v") else {
        return path;
    };
    let (version, tail) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => return path,
    };
    let is_version = version.split_once('.').is_some_and(|(major, minor)| {
        [major, minor]
            .iter()
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
    });
    if is_version {
        tail
    } else {
        path
    }
}

/// A decoded query string (`a=1&b=x%2Fy`).
#[derive(Debug, Default, Clone)]
pub struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    /// Parses `query` (the part after `?`), percent-decoding it.
    pub fn parse(query: Option<&str>) -> Self {
        let pairs = query
            .map(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .into_owned()
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        Self { pairs }
    }

    /// The last value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// A Docker boolean: `1`, `true`, `True`... are true; absent, empty,
    /// `0` and `false` are false.
    pub fn flag(&self, name: &str) -> bool {
        self.get(name).is_some_and(|value| {
            !value.is_empty() && value != "0" && !value.eq_ignore_ascii_case("false")
        })
    }

    /// An unsigned number; absent or empty is `None`.
    pub fn number<T: std::str::FromStr>(
        &self,
        name: &'static str,
    ) -> Result<Option<T>, VdockerError> {
        match self.get(name) {
            None | Some("") => Ok(None),
            Some(value) => value
                .parse()
                .map(Some)
                .map_err(|_| VdockerError::BadParameter {
                    name,
                    value: value.to_owned(),
                    expected: "a non-negative integer",
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_versioned_inspect_has_the_id() {
        assert_eq!(
            route(&Method::GET, "/v1.47/containers/app/json").unwrap(),
            Route::Inspect("app".to_owned())
        );
    }

    #[test]
    fn route_unversioned_ping_is_ping() {
        assert_eq!(route(&Method::HEAD, "/_ping").unwrap(), Route::Ping);
    }

    #[test]
    fn route_list_is_not_an_inspect_of_json() {
        assert_eq!(
            route(&Method::GET, "/v1.41/containers/json").unwrap(),
            Route::ListContainers
        );
    }

    #[test]
    fn route_exec_start_has_the_exec_id() {
        assert_eq!(
            route(&Method::POST, "/v1.47/exec/abc/start").unwrap(),
            Route::ExecStart("abc".to_owned())
        );
    }

    #[test]
    fn route_exec_kill_is_a_post_with_the_exec_id() {
        assert_eq!(
            route(&Method::POST, "/exec/abc/kill").unwrap(),
            Route::ExecKill("abc".to_owned())
        );
        assert!(route(&Method::GET, "/exec/abc/kill").is_err());
    }

    #[test]
    fn route_top_is_a_get() {
        assert_eq!(
            route(&Method::GET, "/v1.47/containers/web/top").unwrap(),
            Route::Top("web".into())
        );
        assert!(route(&Method::POST, "/containers/web/top").is_err());
    }

    #[test]
    fn route_archive_accepts_head_and_put() {
        assert!(route(&Method::HEAD, "/containers/c/archive").is_ok());
        assert!(route(&Method::PUT, "/containers/c/archive").is_ok());
    }

    #[test]
    fn route_wrong_method_is_405_naming_the_allowed_one() {
        let error = route(&Method::GET, "/v1.47/containers/c/kill").unwrap_err();

        assert_eq!(error.status(), hyper::StatusCode::METHOD_NOT_ALLOWED);
        assert!(error.to_string().contains("use POST"), "{error}");
    }

    #[test]
    fn route_unknown_path_is_404() {
        let error = route(&Method::GET, "/v1.47/nope").unwrap_err();

        assert_eq!(error.status(), hyper::StatusCode::NOT_FOUND);
    }

    #[test]
    fn route_container_create_is_501() {
        let error = route(&Method::POST, "/v1.47/containers/create").unwrap_err();

        assert_eq!(error.status(), hyper::StatusCode::NOT_IMPLEMENTED);
    }

    #[test]
    fn route_shutdown_is_unversioned_only() {
        assert_eq!(
            route(&Method::POST, "/crib/v1/shutdown").unwrap(),
            Route::Shutdown
        );
        assert!(route(&Method::POST, "/v1.47/crib/v1/shutdown").is_err());
    }

    #[test]
    fn route_crib_create_container_is_an_unversioned_post() {
        assert_eq!(
            route(&Method::POST, "/crib/v1/containers").unwrap(),
            Route::CreateContainer
        );
        assert!(route(&Method::POST, "/v1.47/crib/v1/containers").is_err());
        let error = route(&Method::GET, "/crib/v1/containers").unwrap_err();
        assert_eq!(error.status(), hyper::StatusCode::METHOD_NOT_ALLOWED);
    }

    #[test]
    fn route_delete_container_is_remove() {
        assert_eq!(
            route(&Method::DELETE, "/v1.47/containers/c1").unwrap(),
            Route::Remove("c1".into())
        );
        let error = route(&Method::GET, "/containers/c1").unwrap_err();
        assert_eq!(error.status(), hyper::StatusCode::METHOD_NOT_ALLOWED);
    }

    #[test]
    fn route_container_list_and_create_are_not_a_remove() {
        assert_eq!(
            route(&Method::GET, "/containers/json").unwrap(),
            Route::ListContainers
        );
        let error = route(&Method::DELETE, "/containers/create").unwrap_err();
        assert_eq!(error.status(), hyper::StatusCode::NOT_IMPLEMENTED);
    }

    #[test]
    fn route_stats_is_a_get() {
        assert_eq!(
            route(&Method::GET, "/v1.47/containers/c1/stats").unwrap(),
            Route::Stats("c1".into())
        );
        assert!(route(&Method::POST, "/containers/c1/stats").is_err());
    }

    #[test]
    fn route_empty_id_is_404() {
        let error = route(&Method::GET, "/containers//json").unwrap_err();

        assert_eq!(error.status(), hyper::StatusCode::NOT_FOUND);
    }

    #[test]
    fn strip_version_keeps_non_version_paths() {
        assert_eq!(strip_version("/v1.47/version"), "/version");
        assert_eq!(strip_version("/version"), "/version");
        assert_eq!(strip_version("/vx.1/version"), "/vx.1/version");
        assert_eq!(strip_version("/v1.47"), "/v1.47");
    }

    #[test]
    fn query_decodes_percent_escapes() {
        let query = Query::parse(Some("path=%2Ftmp%2Fa+b&x=1"));

        assert_eq!(query.get("path"), Some("/tmp/a b"));
    }

    #[test]
    fn query_flag_reads_docker_booleans() {
        let query = Query::parse(Some("a=1&b=true&c=0&d=false&e="));

        assert!(query.flag("a") && query.flag("b"));
        assert!(!query.flag("c") && !query.flag("d") && !query.flag("e"));
        assert!(!query.flag("missing"));
    }

    #[test]
    fn query_number_rejects_garbage() {
        let query = Query::parse(Some("t=ten"));

        let error = query.number::<u64>("t").unwrap_err();

        assert_eq!(error.status(), hyper::StatusCode::BAD_REQUEST);
    }
}
