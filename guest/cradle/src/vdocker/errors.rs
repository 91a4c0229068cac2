//! The API's errors and their HTTP status. A client never sees a Rust
//! panic or a hang: every failure becomes Docker's error body
//! `{"message": "..."}` (the error and its causes on one line) with the
//! status Docker would use (404 no such container, 409 conflict, ...).

use std::io;

use hyper::StatusCode;
use thiserror::Error;

use initramfs::podspec::PodSpecError;

use super::archive::ArchiveError;
use crate::containers::ContainerError;

/// Errors of an API request.
#[derive(Debug, Error)]
pub enum VdockerError {
    #[error("page not found: {method} {path} is not part of cradle's Docker API")]
    NotFound { method: String, path: String },
    #[error("{method} is not allowed on {path}; use {allowed}")]
    MethodNotAllowed {
        method: String,
        path: String,
        allowed: &'static str,
    },
    #[error("{what} is not implemented by cradle: a pod's containers are the processes of its spec and those added with POST /crib/v1/containers, with exec, logs, attach, cp, wait, kill, stop, start, restart, stats and rm")]
    NotImplemented { what: String },
    #[error("No such container: {0}")]
    NoSuchContainer(String),
    #[error("multiple containers match the id prefix {0:?}; give more of the id, or the name")]
    AmbiguousContainer(String),
    #[error("No such exec instance: {0}")]
    NoSuchExec(String),
    #[error("invalid JSON in the request body; send the fields of the Docker Engine API")]
    BadJson {
        #[source]
        source: serde_json::Error,
    },
    #[error("the request body is over {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("cannot read the request body")]
    ReadBody {
        #[source]
        source: hyper::Error,
    },
    #[error("bad parameter {name}={value:?}: {expected}")]
    BadParameter {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("container {0} is not running")]
    NotRunning(String),
    /// Docker answers 304 with no body: already started, already stopped.
    #[error("container {0} is already in that state")]
    NotModified(String),
    #[error("exec {0} is not running: it has not been started or has exited")]
    ExecNotRunning(String),
    #[error("cannot signal exec {id}")]
    ExecSignal {
        id: String,
        #[source]
        source: io::Error,
    },
    #[error("exec {0} has already been started")]
    ExecAlreadyStarted(String),
    #[error("cannot signal container {name}")]
    Signal {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("cannot run {program} in the container")]
    ExecSpawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up the exec session")]
    ExecSetup {
        #[source]
        source: io::Error,
    },
    #[error("cannot resize the terminal of container {name}")]
    Resize {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("{field}: a container with an image cannot be added to a running pod (its layers are resolved by the host before boot); give a rootfs (TAG or TAG/DIR of one of the pod's filesystems) or neither")]
    ImageProcess { field: String },
    #[error("the container is not a valid process of the pod spec (docs/POD_SPEC.md)")]
    InvalidProcess {
        #[source]
        source: PodSpecError,
    },
    #[error("Conflict. The container name \"/{name}\" is already in use by container \"{id}\". You have to remove (or rename) that container to be able to reuse that name.")]
    NameInUse { name: String, id: String },
    #[error("cannot create the container {name}")]
    CreateContainer {
        name: String,
        #[source]
        source: ContainerError,
    },
    #[error("this pod cannot run containers: cradle did not set up its container support")]
    NoContainerSupport,
    #[error("You cannot remove a running container {0}. Stop the container before attempting removal or force remove")]
    RemoveRunning(String),
    #[error("container {0} did not exit within {1} s of SIGKILL; it is not removed")]
    KillTimeout(String, u64),
    #[error("cannot remove the container {0}: the removal did not finish")]
    RemoveFailed(String),
}

impl VdockerError {
    /// The HTTP status Docker uses for this kind of error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotFound { .. } | Self::NoSuchContainer(_) | Self::NoSuchExec(_) => {
                StatusCode::NOT_FOUND
            }
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotImplemented { .. } => StatusCode::NOT_IMPLEMENTED,
            Self::AmbiguousContainer(_)
            | Self::BadJson { .. }
            | Self::ReadBody { .. }
            | Self::BadParameter { .. }
            | Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NotRunning(_) | Self::ExecNotRunning(_) | Self::ExecAlreadyStarted(_) => {
                StatusCode::CONFLICT
            }
            Self::NotModified(_) => StatusCode::NOT_MODIFIED,
            Self::ImageProcess { .. } | Self::InvalidProcess { .. } => StatusCode::BAD_REQUEST,
            Self::NameInUse { .. } | Self::RemoveRunning(_) => StatusCode::CONFLICT,
            Self::CreateContainer { source, .. } => match source {
                ContainerError::RootfsDir { .. }
                | ContainerError::RootfsOutside { .. }
                | ContainerError::UnknownRootfs { .. } => StatusCode::BAD_REQUEST,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            Self::NoContainerSupport | Self::KillTimeout(..) | Self::RemoveFailed(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Self::Archive(error) => error.status(),
            Self::Signal { .. }
            | Self::ExecSignal { .. }
            | Self::ExecSpawn { .. }
            | Self::ExecSetup { .. }
            | Self::Resize { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_no_such_container_is_404() {
        assert_eq!(
            VdockerError::NoSuchContainer("x".to_owned()).status(),
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn status_not_running_is_409() {
        assert_eq!(
            VdockerError::NotRunning("x".to_owned()).status(),
            StatusCode::CONFLICT
        );
    }
}
