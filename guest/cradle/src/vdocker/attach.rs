//! `POST /containers/{id}/attach`: the container's live output as
//! multiplexed frames (raw bytes for a process with a TTY, as Docker sends
//! them), optionally after a replay of its logs (`logs=1`), and the
//! client's bytes into its stdin (`stdin=1`; with a TTY, the terminal). The client's end of input does not close the process's
//! stdin: that pipe stays open for the next attach, as with Docker's
//! `OpenStdin` without `StdinOnce`. The stream ends when the run the
//! client attached to has exited and its output is drained.

use std::sync::Arc;

use hyper::body::Bytes;
use hyper::upgrade::OnUpgrade;
use hyper::Response;
use tokio::io::{AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};

use super::containers::{Container, OutputChunk};
use super::fdio::FdStream;
use super::frames::{self, StreamKind};
use super::logs::{self, LogQuery};
use super::routing::Query;
use super::server::{self, BoxIo, ResponseBody, MULTIPLEXED_STREAM, RAW_STREAM};

/// What an attach request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachOptions {
    /// Live output (and input) while the process runs.
    pub stream: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    /// Replay the stored output first.
    pub logs: bool,
    /// crib's: close the process's stdin at the client's end of input.
    pub close_stdin: bool,
    /// The process has a TTY: output goes out raw, not framed.
    pub raw: bool,
}

impl AttachOptions {
    pub fn from_query(query: &Query) -> Self {
        Self {
            stream: query.flag("stream"),
            stdin: query.flag("stdin"),
            stdout: query.flag("stdout"),
            stderr: query.flag("stderr"),
            logs: query.flag("logs"),
            close_stdin: query.flag("closeStdin"),
            raw: false,
        }
    }

    fn wants(&self, stream: StreamKind) -> bool {
        match stream {
            StreamKind::Stdout => self.stdout,
            StreamKind::Stderr => self.stderr,
        }
    }
}

/// Answers an attach request: the response now, the session in a task.
pub fn attach(
    container: Arc<Container>,
    options: AttachOptions,
    upgrade: Option<OnUpgrade>,
) -> Response<ResponseBody> {
    let options = AttachOptions {
        raw: container.spec.tty,
        ..options
    };
    // Subscribe before answering: output from here on is not missed.
    let output = container.subscribe_output();
    let run = container.running_run().filter(|_| options.stream);
    let content_type = if options.raw {
        RAW_STREAM
    } else {
        MULTIPLEXED_STREAM
    };
    let (response, hijack) = server::hijack(upgrade, content_type);
    tokio::spawn(async move {
        if let Some(io) = hijack.into_io().await {
            session(io, container, options, output, run).await;
        }
    });
    response
}

async fn session(
    io: BoxIo,
    container: Arc<Container>,
    options: AttachOptions,
    mut output: broadcast::Receiver<OutputChunk>,
    run: Option<u64>,
) {
    let (client_in, mut client_out) = tokio::io::split(io);
    if options.logs && !replay(&container, options, &mut client_out).await {
        return;
    }
    let stdin = if options.stdin && run.is_some() {
        container
            .stdin()
            .and_then(|fd| fd.try_clone().ok())
            .and_then(|fd| FdStream::new(fd).ok())
    } else {
        None
    };
    let close_stdin = options.close_stdin.then(|| (Arc::clone(&container), run));
    let forward = stdin.map(|mut stdin| {
        tokio::spawn(async move {
            let mut client_in = client_in;
            // Dropping our duplicate at the end leaves the pipe open...
            let copied = tokio::io::copy(&mut client_in, &mut stdin).await;
            drop(stdin);
            // ... unless the client asked for it to close at its end of input.
            if let (Ok(_), Some((container, Some(number)))) = (copied, close_stdin) {
                container.close_stdin(number);
            }
        })
    });
    if let Some(number) = run {
        let mut done = std::pin::pin!(container.wait_output_done(number));
        loop {
            let received = tokio::select! {
                received = output.recv() => received,
                () = &mut done => break,
            };
            match received {
                Ok(chunk) => {
                    if !send(&mut client_out, options, &chunk).await {
                        break;
                    }
                }
                // A slow client missed some output; go on with the rest.
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => break,
            }
        }
        // What the output threads sent before they finished.
        loop {
            match output.try_recv() {
                Ok(chunk) => {
                    if !send(&mut client_out, options, &chunk).await {
                        break;
                    }
                }
                Err(TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
    }
    if let Some(task) = forward {
        task.abort();
    }
    let _ = client_out.shutdown().await;
}

/// Writes `chunk` as a frame if its stream is wanted; false once the
/// client has gone.
async fn send<W: AsyncWrite + Unpin>(
    out: &mut W,
    options: AttachOptions,
    chunk: &OutputChunk,
) -> bool {
    if !options.wants(chunk.stream) {
        return true;
    }
    let written = if options.raw {
        out.write_all(&chunk.bytes).await
    } else {
        out.write_all(&frames::encode(chunk.stream, &chunk.bytes))
            .await
    };
    written.is_ok()
}

/// Sends the stored output; false once the client has gone.
async fn replay(container: &Container, options: AttachOptions, out: &mut WriteHalf<BoxIo>) -> bool {
    let query = LogQuery {
        stdout: options.stdout,
        stderr: options.stderr,
        since: None,
        until: None,
        tail: None,
        timestamps: false,
        follow: false,
    };
    let (lines, _) = container.logs.select(&query);
    for line in &lines {
        let chunk = OutputChunk {
            stream: line.stream,
            bytes: Bytes::from(logs::render(line, false)),
        };
        if !send(out, options, &chunk).await {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_query_reads_the_cli_flags() {
        let query = Query::parse(Some("stream=1&stdin=1&stdout=1&stderr=0&logs=true"));

        let options = AttachOptions::from_query(&query);

        assert_eq!(
            options,
            AttachOptions {
                stream: true,
                stdin: true,
                stdout: true,
                stderr: false,
                logs: true,
                close_stdin: false,
                raw: false,
            }
        );
        assert!(!options.wants(StreamKind::Stderr));
    }

    #[test]
    fn send_with_a_tty_writes_the_raw_bytes() {
        let options = AttachOptions {
            stream: true,
            stdin: false,
            stdout: true,
            stderr: true,
            logs: false,
            close_stdin: false,
            raw: true,
        };
        let chunk = OutputChunk {
            stream: StreamKind::Stdout,
            bytes: Bytes::from_static(b"hi\r\n"),
        };
        let mut out = Vec::new();

        let sent = crate::vdocker::registry::testing::block_on(send(&mut out, options, &chunk));

        assert!(sent);
        assert_eq!(out, b"hi\r\n");
    }
}
