//! The real `docker` CLI against a pod: crib's `--docker-socket` forwards to cradle's
//! Docker API (vdocker) on guest vsock port 1. Pod kernel, cradle, no mocks.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crib_tests::{host_tool, run_crib_while, GuestArtifacts};

use crate::TestFn;

const DEADLINE: Duration = Duration::from_secs(300);
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![("linux_docker_cli_drives_a_pod", docker_cli_drives_a_pod)]
}

/// The pod: a process that ticks, one that exits 5, one that echoes its stdin.
const POD: &str = r#"{
  "name": "web",
  "lifetime": "until-shutdown",
  "processes": [
    {"name": "app", "argv": ["/bin/sh", "-c", "echo started; i=0; while true; do i=$((i+1)); echo tick $i; sleep 1; done"]},
    {"name": "once", "argv": ["/bin/sh", "-c", "echo once-ran; exit 5"]},
    {"name": "reader", "argv": ["/bin/sh", "-c", "read line; echo got:$line; exit 7"]}
  ]
}"#;

struct Docker {
    socket: PathBuf,
    config: PathBuf,
}

impl Docker {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker");
        cmd.arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .env("DOCKER_CONFIG", &self.config)
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT");
        cmd
    }

    /// Runs `docker args...` with `stdin` (if any), killing it after [`CALL_TIMEOUT`].
    fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<Output> {
        let mut child = self
            .command(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run the docker CLI (is it installed? scripts/install-deps.sh)")?;
        if let Some(data) = stdin {
            let mut pipe = child.stdin.take().context("no stdin")?;
            pipe.write_all(data)?;
        }
        wait_with_timeout(child, CALL_TIMEOUT).with_context(|| format!("docker {}", args.join(" ")))
    }

    /// Like [`Self::run`], failing unless docker exits with `code`; returns stdout.
    fn expect(&self, args: &[&str], stdin: Option<&[u8]>, code: i32) -> Result<String> {
        let out = self.run(args, stdin)?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.code() != Some(code) {
            bail!(
                "docker {}: exit {:?}, wanted {code}\nstdout: {stdout}\nstderr: {}",
                args.join(" "),
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }
}

fn wait_with_timeout(mut child: Child, timeout: Duration) -> Result<Output> {
    let start = Instant::now();
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_reader = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err_reader = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

/// A raw HTTP request on the docker socket; returns the status line.
fn http_status(socket: &Path, request: &str) -> Result<String> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(CALL_TIMEOUT))?;
    stream.write_all(request.as_bytes())?;
    let mut reply = vec![0u8; 4096];
    let n = stream.read(&mut reply)?;
    let reply = String::from_utf8_lossy(&reply[..n]).into_owned();
    Ok(reply.lines().next().unwrap_or_default().to_owned())
}

fn sha256_file(path: &Path) -> Result<String> {
    let out = host_tool("sha256sum", &[&path.display().to_string()])?;
    Ok(out.split_whitespace().next().unwrap_or_default().to_owned())
}

fn drive(docker: &Docker, dir: &Path) -> Result<()> {
    // The guest boots first: until vdocker listens, the socket answers 503.
    let start = Instant::now();
    loop {
        match docker.run(&["version", "--format", "{{.Server.APIVersion}}"], None) {
            Ok(out) if out.status.success() => break,
            Ok(out) if start.elapsed() > Duration::from_secs(150) => bail!(
                "docker version never succeeded: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) if start.elapsed() > Duration::from_secs(150) => return Err(e),
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }

    let ps = docker.expect(&["ps", "--format", "{{.Names}} {{.State}}"], None, 0)?;
    anyhow::ensure!(ps.contains("app running"), "docker ps: {ps}");

    let logs = docker.expect(&["logs", "app"], None, 0)?;
    anyhow::ensure!(logs.contains("started"), "docker logs: {logs}");

    // logs -f shows lines written after it started.
    let mut follow = docker
        .command(&["logs", "-f", "--tail", "0", "app"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(4));
    let _ = follow.kill();
    let followed = wait_with_timeout(follow, CALL_TIMEOUT)?;
    let followed = String::from_utf8_lossy(&followed.stdout);
    anyhow::ensure!(
        followed.contains("tick"),
        "docker logs -f saw no new line: {followed:?}"
    );

    docker.expect(&["exec", "app", "sh", "-c", "exit 3"], None, 3)?;
    let echoed = docker.expect(&["exec", "-i", "app", "cat"], Some(b"hello-stdin\n"), 0)?;
    anyhow::ensure!(echoed == "hello-stdin\n", "docker exec -i: {echoed:?}");

    // docker cp both ways with a 10 MB file.
    let data: Vec<u8> = (0..10_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let src = dir.join("in.bin");
    std::fs::write(&src, &data)?;
    let want = sha256_file(&src)?;
    docker.expect(
        &["cp", &src.display().to_string(), "app:/tmp/in.bin"],
        None,
        0,
    )?;
    let inside = docker.expect(&["exec", "app", "sha256sum", "/tmp/in.bin"], None, 0)?;
    anyhow::ensure!(
        inside.starts_with(&want),
        "sha256 in the guest: {inside}, host {want}"
    );
    let back = dir.join("out.bin");
    docker.expect(
        &["cp", "app:/tmp/in.bin", &back.display().to_string()],
        None,
        0,
    )?;
    anyhow::ensure!(sha256_file(&back)? == want, "the file copied out differs");

    let code = docker.expect(&["wait", "once"], None, 0)?;
    anyhow::ensure!(code.trim() == "5", "docker wait once: {code:?}");

    let attached = docker.run(&["attach", "reader"], Some(b"from-attach\n"))?;
    let attached_out = String::from_utf8_lossy(&attached.stdout);
    anyhow::ensure!(
        attached_out.contains("got:from-attach") && attached.status.code() == Some(7),
        "docker attach: exit {:?}, stdout {attached_out:?}",
        attached.status.code()
    );

    // An unknown path is a Docker error, not a hang.
    let status = http_status(
        &docker.socket,
        "GET /v1.47/no/such/path HTTP/1.1\r\nHost: docker\r\n\r\n",
    )?;
    anyhow::ensure!(status.contains(" 404 "), "unknown path: {status}");

    // The pod-level shutdown: cradle stops the processes and powers off.
    let status = http_status(
        &docker.socket,
        "POST /crib/v1/shutdown HTTP/1.1\r\nHost: docker\r\nContent-Length: 0\r\n\r\n",
    )?;
    anyhow::ensure!(status.contains(" 202 "), "shutdown call: {status}");
    Ok(())
}

fn docker_cli_drives_a_pod() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("crib-docker-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("docker-config"))?;
    let spec = dir.join("pod.json");
    std::fs::write(&spec, POD)?;
    let pod = GuestArtifacts::pod()?;
    let docker = Docker {
        socket: dir.join("docker.sock"),
        config: dir.join("docker-config"),
    };
    let args: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        pod.vmlinux.display().to_string(),
        "--initrd".into(),
        pod.initramfs.display().to_string(),
        "--cpus".into(),
        "2".into(),
        "--pod".into(),
        spec.display().to_string(),
        "--vsock".into(),
        format!("cid=3,socket={}", dir.join("vsock.sock").display()),
        "--docker-socket".into(),
        docker.socket.display().to_string(),
    ];
    let out = run_crib_while(&args, DEADLINE, || drive(&docker, &dir))?;
    std::fs::remove_dir_all(&dir)?;
    out.check(
        out.stdout
            .contains("cradle: process once exited with status 5"),
        "cradle reported the exit of process once",
    )?;
    out.check(out.code == Some(0), "crib exits 0 after the pod shutdown")
}
