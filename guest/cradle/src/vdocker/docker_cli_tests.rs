//! End to end: the real `docker` CLI (version 28) against vdocker served on
//! a Unix socket in a temp dir, with a registry of real processes. The
//! CLI is required: without it these tests fail, naming it (CI installs
//! it). Every CLI call has a timeout, so a hang fails instead of blocking.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use initramfs::podspec::{PodLifetime, ProcessSpec};

use super::containers::LOG_CAP_BYTES;
use super::registry::{PodEnd, Registry, RegistryOptions};
use crate::reaper::{ReapMode, Reaper};
use crate::testing::TempDir;

/// How long one CLI call may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Size of the file copied in and out (10 MiB).
const BIG_FILE_BYTES: usize = 10 * 1024 * 1024;

/// The containers every test gets.
const SCRIPTS: &[(&str, &str)] = &[
    ("app", "echo out; echo err >&2; exec sleep 300"),
    ("ticker", "while :; do echo tick; sleep 0.2; done"),
    (
        "echoer",
        r#"while read l; do echo "got $l"; [ "$l" = quit ] && exit 7; done; sleep 300"#,
    ),
    ("victim", "exec sleep 300"),
    // With a TTY (TTY_NAME).
    ("term", "echo out; echo err >&2; exec sleep 300"),
];
/// The process of [`SCRIPTS`] that has a TTY.
const TTY_NAME: &str = "term";

/// The docker CLI: `docker` on PATH, else /usr/local/bin/docker. Panics
/// (fails the test) if there is none.
fn docker_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("docker"))
            .find(|candidate| candidate.is_file())
    });
    let fallback = PathBuf::from("/usr/local/bin/docker");
    on_path
        .or_else(|| fallback.is_file().then_some(fallback))
        .unwrap_or_else(|| {
            panic!(
                "the docker CLI is missing: these tests drive vdocker with the real `docker` \
                 (version 28) and need it on PATH or at /usr/local/bin/docker; CI installs it"
            )
        })
}

/// A registry of [`SCRIPTS`] served on `<dir>/docker.sock`.
struct Harness {
    dir: TempDir,
    socket: PathBuf,
    registry: Registry,
    docker: PathBuf,
    _server: JoinHandle<()>,
}

/// What a CLI call produced.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Harness {
    fn start(tag: &str) -> Self {
        let docker = docker_binary();
        let dir = TempDir::new(tag);
        std::fs::create_dir(dir.path().join("config")).unwrap();
        let socket = dir.path().join("docker.sock");
        let specs: Vec<ProcessSpec> = SCRIPTS
            .iter()
            .map(|(name, script)| ProcessSpec {
                name: (*name).to_owned(),
                argv: vec!["sh".to_owned(), "-c".to_owned(), (*script).to_owned()],
                env: vec!["GREETING=hello".to_owned()],
                cwd: None,
                tty: *name == TTY_NAME,
                ..ProcessSpec::default()
            })
            .collect();
        let options = RegistryOptions {
            echo: false,
            log_cap_bytes: LOG_CAP_BYTES,
            cgroups: false,
        };
        let registry = Registry::new(&specs, Reaper::new(ReapMode::Own), options);
        registry.start_all();
        let server_registry = registry.clone();
        let server_socket = socket.clone();
        let server = std::thread::spawn(move || {
            super::runtime().unwrap().block_on(async move {
                let listener = tokio::net::UnixListener::bind(&server_socket).unwrap();
                super::serve(listener, server_registry).await;
            });
        });
        let start = Instant::now();
        while UnixStream::connect(&socket).is_err() {
            assert!(start.elapsed() < LISTEN_TIMEOUT, "vdocker did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self {
            dir,
            socket,
            registry,
            docker,
            _server: server,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `docker -H unix://<socket> ARGS`, not started yet.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.docker);
        command
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .env("DOCKER_CONFIG", self.path("config"))
            .env("DOCKER_CLI_HINTS", "false")
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .env_remove("DOCKER_TLS_VERIFY");
        command
    }

    /// Runs the CLI with `stdin` to its end, within [`CLI_TIMEOUT`].
    fn docker_with_input(&self, args: &[&str], stdin: Option<&[u8]>) -> Run {
        let mut command = self.command(args);
        command
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            let input = input.to_vec();
            std::thread::spawn(move || {
                let _ = pipe.write_all(&input);
            });
        }
        let stdout = read_in_background(child.stdout.take().unwrap());
        let stderr = read_in_background(child.stderr.take().unwrap());
        let code = wait_with_timeout(&mut child, CLI_TIMEOUT);
        let run = Run {
            code: code.flatten(),
            stdout: stdout.join().unwrap(),
            stderr: stderr.join().unwrap(),
        };
        assert!(
            code.is_some(),
            "docker {args:?} did not finish within {CLI_TIMEOUT:?}\n{}",
            run.describe()
        );
        run
    }

    fn docker(&self, args: &[&str]) -> Run {
        self.docker_with_input(args, None)
    }

    /// Runs the CLI and requires exit status 0.
    fn docker_ok(&self, args: &[&str]) -> Run {
        let run = self.docker(args);
        assert_eq!(run.code, Some(0), "docker {args:?}\n{}", run.describe());
        run
    }

    /// A raw HTTP/1.1 request; (status, body).
    fn http(&self, request: &str) -> (u16, String) {
        let mut stream = UnixStream::connect(&self.socket).unwrap();
        stream.set_read_timeout(Some(CLI_TIMEOUT)).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        (status, body)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.registry.stop_all(Duration::from_millis(500));
    }
}

fn read_in_background(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// `Some(exit code)` if `child` ended within `timeout` (`Some(None)`: by a
/// signal); `None` (after killing it) if not.
fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<Option<i32>> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status.code());
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn sha256(path: &Path) -> String {
    let output = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(output.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// `bytes` of xorshift noise: no runs for a sparse file or compression to hide.
fn noise(bytes: usize) -> Vec<u8> {
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    (0..bytes)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

#[test]
fn docker_version_reports_the_server_and_negotiated_api() {
    let harness = Harness::start("vd-version");

    let run = harness.docker_ok(&["version"]);

    assert!(run.stdout.contains("Server:"), "{}", run.describe());
    assert!(run.stdout.contains("1.47"), "{}", run.describe());
}

#[test]
fn docker_ps_lists_the_running_processes_by_name() {
    let harness = Harness::start("vd-ps");

    let run = harness.docker_ok(&["ps", "--format", "{{.Names}} {{.Image}} {{.State}}"]);

    for name in ["app", "ticker", "echoer", "victim"] {
        assert!(
            run.stdout.contains(&format!("{name} cradle running")),
            "{}",
            run.describe()
        );
    }
}

#[test]
fn docker_inspect_has_state_config_and_name() {
    let harness = Harness::start("vd-inspect");

    let run = harness.docker_ok(&[
        "inspect",
        "--format",
        "{{.Name}} {{.State.Status}} {{.State.Running}} {{.Config.Image}} {{index .Config.Env 0}}",
        "app",
    ]);

    assert_eq!(run.stdout.trim(), "/app running true cradle GREETING=hello");
}

#[test]
fn docker_logs_separates_stdout_and_stderr() {
    let harness = Harness::start("vd-logs");
    // The lines are written at once; give the pumps a moment.
    std::thread::sleep(Duration::from_millis(300));

    let run = harness.docker_ok(&["logs", "app"]);

    assert_eq!(run.stdout, "out\n", "{}", run.describe());
    assert_eq!(run.stderr, "err\n", "{}", run.describe());
}

#[test]
fn docker_logs_of_a_tty_process_are_raw() {
    let harness = Harness::start("vd-logs-tty");
    std::thread::sleep(Duration::from_millis(300));

    let run = harness.docker_ok(&["logs", TTY_NAME]);
    let inspect = harness.docker_ok(&["inspect", "--format", "{{.Config.Tty}}", TTY_NAME]);

    // One stream, no frame headers; the pty turns \n into \r\n.
    assert_eq!(run.stdout, "out\r\nerr\r\n", "{}", run.describe());
    assert_eq!(run.stderr, "", "{}", run.describe());
    assert_eq!(inspect.stdout.trim(), "true");
}

#[test]
fn docker_logs_tail_and_timestamps() {
    let harness = Harness::start("vd-logs-tail");
    std::thread::sleep(Duration::from_millis(700));

    let run = harness.docker_ok(&["logs", "--tail", "1", "--timestamps", "ticker"]);

    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{}", run.describe());
    // 2024-05-01T12:00:00.123456789Z tick
    assert!(
        lines
            .first()
            .is_some_and(|l| l.ends_with("Z tick") && l.len() == 35),
        "{}",
        run.describe()
    );
}

#[test]
fn docker_logs_follow_sees_a_new_line() {
    let harness = Harness::start("vd-follow");
    let mut child = harness
        .command(&["logs", "--follow", "--tail", "0", "ticker"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 256];
        let mut seen = Vec::new();
        while let Ok(read) = stdout.read(&mut buffer) {
            if read == 0 {
                break;
            }
            seen.extend_from_slice(&buffer[..read]);
            if seen.windows(5).any(|w| w == b"tick\n") {
                let _ = tx.send(());
                break;
            }
        }
    });

    let got = rx.recv_timeout(Duration::from_secs(10));

    let _ = child.kill();
    let _ = child.wait();
    assert!(got.is_ok(), "docker logs -f showed no new line within 10 s");
}

#[test]
fn docker_exec_reports_the_exit_code() {
    let harness = Harness::start("vd-exec-code");

    let run = harness.docker(&["exec", "app", "sh", "-c", "echo hi; echo oops >&2; exit 3"]);

    assert_eq!(run.code, Some(3), "{}", run.describe());
    assert_eq!(run.stdout, "hi\n");
    assert_eq!(run.stderr, "oops\n");
}

#[test]
fn docker_exec_sees_the_container_env_and_its_own() {
    let harness = Harness::start("vd-exec-env");

    let run = harness.docker_ok(&[
        "exec",
        "-e",
        "EXTRA=1",
        "-w",
        "/tmp",
        "app",
        "sh",
        "-c",
        "echo $GREETING $EXTRA $PWD",
    ]);

    assert_eq!(run.stdout, "hello 1 /tmp\n");
}

#[test]
fn docker_exec_with_a_background_child_ends_with_the_process() {
    let harness = Harness::start("vd-exec-bg");

    // The backgrounded sleep keeps stdout open for 30 s.
    let run = harness.docker(&["exec", "app", "sh", "-c", "sleep 30 & echo started"]);

    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert_eq!(run.stdout, "started\n");
}

#[test]
fn docker_exec_missing_program_is_127() {
    let harness = Harness::start("vd-exec-missing");

    let run = harness.docker(&["exec", "app", "/nonexistent/cradle-test"]);

    assert_eq!(run.code, Some(127), "{}", run.describe());
}

#[test]
fn docker_exec_interactive_forwards_stdin_until_its_end() {
    let harness = Harness::start("vd-exec-stdin");

    let run = harness.docker_with_input(&["exec", "-i", "app", "cat"], Some(b"x\ny\n"));

    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert_eq!(run.stdout, "x\ny\n");
}

#[test]
fn docker_exec_tty_runs_on_a_terminal() {
    let harness = Harness::start("vd-exec-tty");

    let run = harness.docker(&[
        "exec",
        "-t",
        "app",
        "sh",
        "-c",
        "test -t 0 && test -t 1 && echo on-a-tty; exit 4",
    ]);

    assert_eq!(run.code, Some(4), "{}", run.describe());
    // Raw stream: no frame headers, and the pty turns \n into \r\n.
    assert_eq!(run.stdout, "on-a-tty\r\n", "{}", run.describe());
}

#[test]
fn docker_cp_round_trips_a_10_mib_file_and_a_directory() {
    let harness = Harness::start("vd-cp");
    let source = harness.path("big.bin");
    std::fs::write(&source, noise(BIG_FILE_BYTES)).unwrap();
    std::fs::create_dir(harness.path("incoming")).unwrap();
    let inside = harness.path("incoming/big.bin");
    let back = harness.path("back.bin");
    let tree = harness.path("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/leaf.txt"), "leaf\n").unwrap();
    std::os::unix::fs::symlink("sub/leaf.txt", tree.join("link")).unwrap();

    harness.docker_ok(&[
        "cp",
        &source.to_string_lossy(),
        &format!("app:{}", inside.display()),
    ]);
    harness.docker_ok(&[
        "cp",
        &format!("app:{}", inside.display()),
        &back.to_string_lossy(),
    ]);
    let tree_inside = harness.path("incoming/tree");
    let tree_back = harness.path("tree-back");
    harness.docker_ok(&[
        "cp",
        &tree.to_string_lossy(),
        &format!("app:{}", tree_inside.display()),
    ]);
    harness.docker_ok(&[
        "cp",
        &format!("app:{}", tree_inside.display()),
        &tree_back.to_string_lossy(),
    ]);

    assert_eq!(sha256(&inside), sha256(&source));
    assert_eq!(sha256(&back), sha256(&source));
    assert_eq!(
        std::fs::read_to_string(tree_back.join("sub/leaf.txt")).unwrap(),
        "leaf\n"
    );
    assert_eq!(
        std::fs::read_link(tree_back.join("link")).unwrap(),
        PathBuf::from("sub/leaf.txt")
    );
}

#[test]
fn docker_cp_from_a_missing_path_fails_naming_it() {
    let harness = Harness::start("vd-cp-missing");

    let run = harness.docker(&[
        "cp",
        "app:/nonexistent/cradle-test",
        &harness.path("x").to_string_lossy(),
    ]);

    assert_ne!(run.code, Some(0));
    assert!(
        run.stderr.contains("/nonexistent/cradle-test"),
        "{}",
        run.describe()
    );
}

#[test]
fn docker_attach_forwards_stdin_and_returns_the_exit_code() {
    let harness = Harness::start("vd-attach");

    let run = harness.docker_with_input(&["attach", "echoer"], Some(b"hi\nquit\n"));

    assert_eq!(run.code, Some(7), "{}", run.describe());
    assert_eq!(run.stdout, "got hi\ngot quit\n", "{}", run.describe());
    let waited = harness.docker_ok(&["wait", "echoer"]);
    assert_eq!(waited.stdout.trim(), "7");
}

#[test]
fn docker_kill_wait_start_stop_restart() {
    let harness = Harness::start("vd-kill");

    harness.docker_ok(&["kill", "victim"]);
    let waited = harness.docker_ok(&["wait", "victim"]);
    // Exec and cp still work once a process has exited (until-shutdown pods).
    let exec_after = harness.docker_ok(&["exec", "victim", "echo", "still-here"]);
    let state = harness.docker_ok(&[
        "inspect",
        "--format",
        "{{.State.Status}} {{.State.ExitCode}}",
        "victim",
    ]);
    harness.docker_ok(&["start", "victim"]);
    let started = harness.docker_ok(&["inspect", "--format", "{{.State.Running}}", "victim"]);
    harness.docker_ok(&["restart", "-t", "1", "victim"]);
    let restarted = harness.docker_ok(&["inspect", "--format", "{{.State.Running}}", "victim"]);
    harness.docker_ok(&["stop", "-t", "1", "victim"]);
    let stopped = harness.docker_ok(&["ps", "-a", "--format", "{{.Names}} {{.State}}"]);

    assert_eq!(waited.stdout.trim(), "137");
    assert_eq!(exec_after.stdout, "still-here\n");
    assert_eq!(state.stdout.trim(), "exited 137");
    assert_eq!(started.stdout.trim(), "true");
    assert_eq!(restarted.stdout.trim(), "true");
    assert!(
        stopped.stdout.contains("victim exited"),
        "{}",
        stopped.describe()
    );
}

#[test]
fn unknown_path_and_bad_json_get_docker_error_json() {
    let harness = Harness::start("vd-errors");

    let (status, body) =
        harness.http("GET /v1.47/nope HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n");
    let (bad_status, bad_body) = harness.http(
        "POST /v1.47/containers/app/exec HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: 1\r\n\r\n{",
    );
    let (missing_status, _) = harness.http(
        "GET /v1.47/containers/ghost/json HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n",
    );

    assert_eq!(status, 404, "{body}");
    assert!(body.starts_with("{\"message\":"), "{body}");
    assert_eq!(bad_status, 400, "{bad_body}");
    assert!(bad_body.contains("invalid JSON"), "{bad_body}");
    assert_eq!(missing_status, 404);
}

#[test]
fn attach_without_upgrade_streams_the_logs_as_the_body() {
    let harness = Harness::start("vd-attach-plain");
    std::thread::sleep(Duration::from_millis(300));

    let (status, body) = harness.http(
        "POST /v1.47/containers/app/attach?logs=1&stdout=1&stderr=1 HTTP/1.1\r\n\
         Host: docker\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    );

    assert_eq!(status, 200, "{body}");
    // Frames (stdout "out\n", stderr "err\n") in a chunked body.
    assert!(body.contains("\u{1}\0\0\0\0\0\0\u{4}out\n"), "{body:?}");
    assert!(body.contains("\u{2}\0\0\0\0\0\0\u{4}err\n"), "{body:?}");
}

#[test]
fn shutdown_call_ends_the_pod_with_its_grace() {
    let harness = Harness::start("vd-shutdown");

    let (status, body) = harness.http(
        "POST /crib/v1/shutdown?t=1 HTTP/1.1\r\nHost: docker\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    );

    assert_eq!(status, 202, "{body}");
    assert_eq!(
        harness.registry.wait_for_end(PodLifetime::UntilShutdown),
        PodEnd::Shutdown(Duration::from_secs(1))
    );
}

/// `POST /crib/v1/containers` with `body`; (status, body).
fn create(harness: &Harness, body: &str) -> (u16, String) {
    harness.http(&format!(
        "POST /crib/v1/containers HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ))
}

#[test]
fn added_container_starts_logs_execs_stats_and_is_removed() {
    let harness = Harness::start("vd-added");
    let body = r#"{"name":"late","argv":["sh","-c","echo LATE-$A; exec sleep 300"],"env":["A=1"]}"#;

    let (status, created) = create(&harness, body);
    assert_eq!(status, 201, "{created}");
    let id = super::registry::container_id("late");
    assert!(created.contains(&format!("\"Id\":\"{id}\"")), "{created}");
    assert!(created.contains("\"Warnings\":[]"), "{created}");
    let listed = harness.docker_ok(&["ps", "-a", "--format", "{{.Names}} {{.State}}"]);
    assert!(
        listed.stdout.contains("late created"),
        "{}",
        listed.describe()
    );

    harness.docker_ok(&["start", "late"]);
    let start = Instant::now();
    let logs = loop {
        let logs = harness.docker_ok(&["logs", "late"]);
        if logs.stdout.contains("LATE-1") || start.elapsed() > CLI_TIMEOUT {
            break logs;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(logs.stdout.contains("LATE-1"), "{}", logs.describe());
    let exec = harness.docker_ok(&["exec", "late", "sh", "-c", "echo in-$A"]);
    assert_eq!(exec.stdout.trim(), "in-1");
    let stats = harness.docker_ok(&["stats", "--no-stream", "--format", "{{.Name}}", "late"]);
    assert_eq!(stats.stdout.trim(), "late", "{}", stats.describe());

    let refused = harness.docker(&["rm", "late"]);
    assert_ne!(refused.code, Some(0));
    assert!(
        refused
            .stderr
            .contains("You cannot remove a running container"),
        "{}",
        refused.describe()
    );
    harness.docker_ok(&["rm", "-f", "late"]);
    let gone = harness.docker(&["inspect", "late"]);
    assert_ne!(gone.code, Some(0));

    let (again, again_body) = create(&harness, body);
    assert_eq!(again, 201, "{again_body}");
}

#[test]
fn added_tty_container_logs_raw_and_resizes() {
    let harness = Harness::start("vd-added-tty");
    let body = r#"{"name":"late-tty","argv":["sh","-c","stty size; exec sleep 300"],"tty":true,"console_size":[30,100]}"#;

    let (status, created) = create(&harness, body);
    assert_eq!(status, 201, "{created}");
    harness.docker_ok(&["start", "late-tty"]);
    let start = Instant::now();
    let logs = loop {
        let logs = harness.docker_ok(&["logs", "late-tty"]);
        if !logs.stdout.is_empty() || start.elapsed() > CLI_TIMEOUT {
            break logs;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (resized, resized_body) = harness.http(
        "POST /containers/late-tty/resize?h=40&w=120 HTTP/1.1\r\nHost: docker\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    );
    // The terminal the process has (its stdin), seen from here.
    let pid = harness.docker_ok(&["inspect", "--format", "{{.State.Pid}}", "late-tty"]);
    let size = Command::new("sh")
        .args([
            "-c",
            &format!("stty size </proc/{}/fd/0", pid.stdout.trim()),
        ])
        .output()
        .unwrap();
    harness.docker_ok(&["rm", "-f", "late-tty"]);

    assert_eq!(logs.stdout, "30 100\r\n", "{}", logs.describe());
    assert_eq!(resized, 200, "{resized_body}");
    assert_eq!(String::from_utf8_lossy(&size.stdout), "40 120\n");
}

#[test]
fn create_refuses_a_name_in_use_bad_json_and_an_image() {
    let harness = Harness::start("vd-create-errors");

    let (taken, taken_body) = create(&harness, r#"{"name":"app","argv":["true"]}"#);
    let (unknown, unknown_body) = create(
        &harness,
        r#"{"name":"x","argv":["true"],"privileged":true}"#,
    );
    let (image, image_body) = create(&harness, r#"{"name":"x","image":"busybox"}"#);
    let (rootfs, rootfs_body) = create(
        &harness,
        r#"{"name":"x","argv":["true"],"rootfs":"share/../x"}"#,
    );

    assert_eq!(taken, 409, "{taken_body}");
    assert!(taken_body.contains("already in use"), "{taken_body}");
    assert_eq!(unknown, 400, "{unknown_body}");
    assert!(
        unknown_body.contains("processes[5].privileged"),
        "{unknown_body}"
    );
    assert_eq!(image, 400, "{image_body}");
    assert!(image_body.contains("processes[5].image"), "{image_body}");
    assert_eq!(rootfs, 400, "{rootfs_body}");
    assert!(rootfs_body.contains("processes[5].rootfs"), "{rootfs_body}");
}

#[test]
fn stats_one_shot_has_docker_and_cgroup2_fields() {
    let harness = Harness::start("vd-stats");

    let (status, body) = harness.http(
        "GET /v1.47/containers/app/stats?stream=false HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n",
    );

    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(value["name"], "/app");
    assert!(
        value["cpu_stats"]["cpu_usage"]["total_usage"].is_u64(),
        "{value}"
    );
    assert!(value["memory_stats"]["limit"].is_u64(), "{value}");
    // The tests' registry makes no cgroups (they would be the host's).
    assert!(value["cgroup2"].is_null(), "{value}");
}
