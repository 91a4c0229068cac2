//! `--docker-socket PATH`: a Unix socket on the host where the plain `docker` CLI talks to
//! cradle's Docker API (vdocker, guest vsock port 1).
//!
//! Each accepted connection is forwarded byte for byte through the vsock device's host
//! socket (`CONNECT 1`), so HTTP, keep-alive and hijacked connections (`attach`, `exec`)
//! all work without crib parsing HTTP. Half-closes are passed on both ways: `docker exec
//! -i` closes its write side when stdin ends and still reads the command's output.
//!
//! One listener thread plus two threads per live connection: the docker CLI opens a
//! handful at a time, and blocking copies keep this off the vCPU and I/O threads.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The guest port vdocker listens on.
pub const VDOCKER_PORT: u32 = 1;
/// How long the guest may take to accept a connection (cradle may still be booting).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors setting up the docker socket.
#[derive(Debug, thiserror::Error)]
pub enum DockerProxyError {
    #[error("--docker-socket: the path cannot be used")]
    Claim(#[from] devices::socket_path::SocketPathError),
    #[error("--docker-socket {path}: cannot listen")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the docker socket thread")]
    Thread(#[source] io::Error),
}

/// Why a connection to the guest's vdocker port could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("cannot connect to the vsock socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the vsock handshake failed")]
    Handshake(#[source] io::Error),
    #[error("the guest refused port {VDOCKER_PORT} (is vdocker running? got {0:?})")]
    Refused(String),
}

/// Listens on `docker_socket` and forwards every connection to guest port 1 through the
/// vsock host socket `vsock_socket`. Returns once listening; the thread lives as long as
/// the process. The listener thread first applies `filter` (its connection threads
/// inherit it).
pub fn start(
    docker_socket: &Path,
    vsock_socket: &Path,
    filter: Option<crate::seccomp::Filter>,
) -> Result<(), DockerProxyError> {
    spawn(bind(docker_socket)?, vsock_socket, filter)
}

/// The docker socket, bound and not yet served (see [`spawn`]): the jail binds every
/// socket before it drops privileges and before any thread starts.
pub struct DockerListener {
    path: PathBuf,
    listener: UnixListener,
}

/// Listens on `docker_socket`, replacing a stale socket but nothing else.
pub fn bind(docker_socket: &Path) -> Result<DockerListener, DockerProxyError> {
    Ok(DockerListener {
        path: docker_socket.to_path_buf(),
        listener: listen(docker_socket)?,
    })
}

/// Forwards every connection of `bound` to guest port 1 through the vsock host socket
/// `vsock_socket`, on a thread that first applies `filter` (as [`start`]).
pub fn spawn(
    bound: DockerListener,
    vsock_socket: &Path,
    filter: Option<crate::seccomp::Filter>,
) -> Result<(), DockerProxyError> {
    let DockerListener {
        path: docker_socket,
        listener,
    } = bound;
    let docker_socket = docker_socket.as_path();
    let vsock_socket = vsock_socket.to_path_buf();
    std::thread::Builder::new()
        .name("docker-proxy".into())
        .spawn(move || {
            if let Some(filter) = filter {
                if let Err(e) = filter.apply() {
                    tracing::error!("docker socket: {e}; the docker socket is not served");
                    return;
                }
            }
            serve(&listener, &vsock_socket)
        })
        .map_err(DockerProxyError::Thread)?;
    tracing::info!(
        "docker API of the pod on {} (docker -H unix://{} ps)",
        docker_socket.display(),
        docker_socket.display()
    );
    Ok(())
}

/// Binds `path`, replacing a stale socket file but nothing else.
fn listen(path: &Path) -> Result<UnixListener, DockerProxyError> {
    devices::socket_path::claim(path)?;
    UnixListener::bind(path).map_err(|source| DockerProxyError::Listen {
        path: path.to_path_buf(),
        source,
    })
}

fn serve(listener: &UnixListener, vsock_socket: &Path) {
    for client in listener.incoming() {
        let client = match client {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!("docker socket: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let vsock_socket = vsock_socket.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name("docker-conn".into())
            .spawn(move || {
                if let Err(e) = forward(client, &vsock_socket) {
                    tracing::warn!("docker socket: {e}");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("docker socket: cannot start a connection thread: {e}");
        }
    }
}

/// Opens a stream to guest port 1 through the vsock host socket.
pub fn connect_guest(vsock_socket: &Path) -> Result<UnixStream, ForwardError> {
    let mut guest = UnixStream::connect(vsock_socket).map_err(|source| ForwardError::Connect {
        path: vsock_socket.to_path_buf(),
        source,
    })?;
    guest
        .write_all(format!("CONNECT {VDOCKER_PORT}\n").as_bytes())
        .map_err(ForwardError::Handshake)?;
    guest
        .set_read_timeout(Some(CONNECT_TIMEOUT))
        .map_err(ForwardError::Handshake)?;
    // Read the reply byte by byte: whatever follows the line is the guest's data.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        match guest.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ForwardError::Handshake(e)),
        }
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    if !line.starts_with("OK ") {
        return Err(ForwardError::Refused(line));
    }
    guest
        .set_read_timeout(None)
        .map_err(ForwardError::Handshake)?;
    Ok(guest)
}

fn forward(client: UnixStream, vsock_socket: &Path) -> Result<(), ForwardError> {
    let guest = match connect_guest(vsock_socket) {
        Ok(guest) => guest,
        Err(e) => {
            // Tell the docker CLI something it can show, instead of a bare EOF.
            let _ = reply_unavailable(&client, &e);
            return Err(e);
        }
    };
    let (client_r, guest_w) = match (client.try_clone(), guest.try_clone()) {
        (Ok(c), Ok(g)) => (c, g),
        (Err(e), _) | (_, Err(e)) => return Err(ForwardError::Handshake(e)),
    };
    let upstream = std::thread::Builder::new()
        .name("docker-up".into())
        .spawn(move || copy_then_close(client_r, guest_w));
    copy_then_close(guest, client);
    if let Ok(handle) = upstream {
        let _ = handle.join();
    }
    Ok(())
}

/// Copies until EOF or an error, then ends the write side of `to` so the peer sees EOF
/// (a half-close: the other direction goes on).
fn copy_then_close(from: UnixStream, mut to: UnixStream) {
    let mut reader = BufReader::with_capacity(64 * 1024, from);
    loop {
        let chunk = match reader.fill_buf() {
            Ok([]) => break,
            Ok(chunk) => chunk,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let len = chunk.len();
        if to.write_all(chunk).is_err() {
            break;
        }
        reader.consume(len);
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A 503 with Docker's error JSON, for a connection the guest could not take.
fn reply_unavailable(mut client: &UnixStream, error: &ForwardError) -> io::Result<()> {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    let body = serde_json::json!({
        "message": format!("crib: the pod's docker API is not reachable: {message}")
    })
    .to_string();
    write!(
        client,
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    client.shutdown(Shutdown::Write)?;
    // Closing with the request still unread would reset the connection before the
    // client reads the reply: drain until the client closes (bounded).
    client.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut sink = [0u8; 4096];
    while matches!(client.read(&mut sink), Ok(n) if n > 0) {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("crib-docker-{name}-{}", std::process::id()))
    }

    /// A fake vsock host socket: answers CONNECT 1 with OK, then echoes upper-cased
    /// data until EOF, then writes "bye" (to show the half-close reached it).
    fn fake_vsock(path: &Path, accept: bool) {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    assert_eq!(line, "CONNECT 1\n");
                    if !accept {
                        return;
                    }
                    stream.write_all(b"OK 1073741824\n").unwrap();
                    let mut data = Vec::new();
                    reader.read_to_end(&mut data).unwrap();
                    stream.write_all(&data.to_ascii_uppercase()).unwrap();
                    stream.write_all(b"bye").unwrap();
                });
            }
        });
    }

    #[test]
    fn connection_is_forwarded_with_half_close_both_ways() {
        let (docker, vsock) = (temp("fwd.sock"), temp("fwd-vsock.sock"));
        fake_vsock(&vsock, true);
        start(&docker, &vsock, None).unwrap();

        let mut client = UnixStream::connect(&docker).unwrap();
        client.write_all(b"hello through vsock").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut reply = String::new();
        client.read_to_string(&mut reply).unwrap();

        assert_eq!(reply, "HELLO THROUGH VSOCKbye");
        let _ = std::fs::remove_file(&docker);
        let _ = std::fs::remove_file(&vsock);
    }

    #[test]
    fn refused_guest_port_gets_a_docker_error_reply() {
        let (docker, vsock) = (temp("refused.sock"), temp("refused-vsock.sock"));
        fake_vsock(&vsock, false);
        start(&docker, &vsock, None).unwrap();

        let mut client = UnixStream::connect(&docker).unwrap();
        client.write_all(b"GET /_ping HTTP/1.1\r\n\r\n").unwrap();
        let mut reply = String::new();
        client.read_to_string(&mut reply).unwrap();

        assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
        assert!(reply.contains("\"message\":\"crib: the pod's docker API is not reachable"));
        let _ = std::fs::remove_file(&docker);
        let _ = std::fs::remove_file(&vsock);
    }

    #[test]
    fn regular_file_at_the_path_is_refused_and_kept() {
        let path = temp("file");
        std::fs::write(&path, b"keep me").unwrap();

        let err = start(&path, Path::new("/nonexistent"), None).unwrap_err();

        assert!(matches!(
            err,
            DockerProxyError::Claim(devices::socket_path::SocketPathError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
        std::fs::remove_file(&path).unwrap();
    }
}
