//! A Kubernetes pod through containerd's CRI socket, as a kubelet runs it (issue 19):
//! a containerd of the test's own with the CRI plugin on (`containerd_config`), images
//! built from the image store's busybox fixtures and imported into the `k8s.io`
//! namespace (nothing is pulled), and one test per runtime handler:
//!
//! - `linux_shim_cri_runc_*`: `io.containerd.runc.v2`, the reference: it proves the
//!   harness and is the baseline of the CRI benchmark (it prints the time from
//!   RunPodSandbox to both containers started).
//! - `linux_shim_cri_crib_*`: `io.containerd.crib.v2` (docs/SHIM.md), which must also show
//!   the pod kernel to both containers, run both in one VM (one crib process while they
//!   run) and prints the same timing.
//!
//! The pod: a sandbox with its own network (CNI `bridge` + `host-local`), container A
//! serving HTTP on the pod's port 8080, container B fetching it from 127.0.0.1 and
//! exiting; ExecSync in A; CRI's log files; the pod's IP from the host side; stop and
//! remove; then nothing left. Before it, a sandbox with an unknown runtime handler is
//! refused with containerd's message.
//!
//! containerd runs in a network namespace of its own (`Containerd::launch`): the CNI
//! bridge, its gateway address and the pods' host-side veths live there, the "host side"
//! of the pod is that namespace (entered with nsenter), and no traffic or interface ever
//! touches the namespace the test was started in.

mod client;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use images::fixtures;
use k8s_cri::v1 as cri;

use crate::shim::{self, Containerd, CALL_TIMEOUT};
use crate::TestFn;
use client::CriClient;

/// Set to 1 for containerd's (and the shims') debug log in a failure's report.
const DEBUG_ENV: &str = "CRIB_CRI_DEBUG";

/// The image of both containers, and the sandbox ("pause") image: busybox's layer with
/// a command that sleeps forever.
const IMAGE: &str = "docker.io/library/crib-cri-busybox:1";
const PAUSE_IMAGE: &str = "docker.io/library/crib-cri-pause:1";
/// The CNI network: its bridge (in containerd's network namespace) and subnet.
const CNI_NETWORK: &str = "crib-cri-test";
const CNI_BRIDGE: &str = "cricni0";
const CNI_SUBNET_PREFIX: &str = "10.89.0.";
const CNI_SUBNET: &str = "10.89.0.0/24";
/// Container A's HTTP port, on the pod's network (localhost for B, the pod IP for the host).
const HTTP_PORT: u16 = 8080;
/// How long StopContainer lets a container end on SIGTERM before SIGKILL.
const STOP_TIMEOUT_SECS: i64 = 10;

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![
        (
            "linux_shim_cri_runc_pod_two_containers_exec_logs_network_and_cleanup",
            || pod_end_to_end(Handler::Runc),
        ),
        (
            "linux_shim_cri_crib_pod_two_containers_exec_logs_network_and_cleanup",
            || pod_end_to_end(Handler::Crib),
        ),
    ]
}

/// The CRI runtime handler under test (a `runtimes.<name>` table of the config).
#[derive(Clone, Copy, Debug)]
enum Handler {
    Runc,
    Crib,
}

impl Handler {
    fn name(self) -> &'static str {
        match self {
            Handler::Runc => "runc",
            Handler::Crib => "crib",
        }
    }

    /// Fails unless `release` (a container's `uname -r`) is this handler's kernel: the
    /// host's for runc, the pod kernel's for crib.
    fn check_kernel(self, release: &str, what: &str) -> Result<()> {
        let host = crib_tests::host_tool("uname", &["-r"])?;
        let host = host.trim();
        match self {
            Handler::Runc => ensure!(
                release == host,
                "{what}: uname -r is {release:?}, wanted the host's {host:?}"
            ),
            Handler::Crib => {
                let pod = shim::pod_kernel_release()?;
                ensure!(
                    release.starts_with(&pod) && release != host,
                    "{what}: uname -r is {release:?}, wanted the pod kernel's {pod}* (the host runs {host:?})"
                );
            }
        }
        Ok(())
    }
}

/// containerd's config for a CRI test in `dir`: the CRI plugin on, everything it keeps
/// (images, snapshots, sandboxes, network namespaces, runc's state) under `dir`, the
/// `runc` and `crib` runtime handlers, and a CNI network of its own.
fn containerd_config(dir: &Path) -> String {
    let cri = r#"plugins."io.containerd.grpc.v1.cri""#;
    let level = match std::env::var(DEBUG_ENV).as_deref() {
        Ok("1") => "debug",
        _ => "info",
    };
    format!(
        r#"{base}
# Shims get -debug with containerd's debug level.
[debug]
  level = "{level}"

# Not /opt/containerd.
[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"

[{cri}]
  # The pod's sandbox ("pause") container: imported by the test, never pulled.
  sandbox_image = "{PAUSE_IMAGE}"
  # A lab (or a CI container) may run a kernel with AppArmor on and have no
  # apparmor_parser; the pods need no profile, and no SELinux labels.
  disable_apparmor = true
  enable_selinux = false
  # The test runs as root (in the lab: root of L1): the sandbox's oom_score_adj of -998
  # is allowed, and runc gets a cgroup per container (cgroup v2, cgroupfs driver below).
  restrict_oom_score_adj = false
  disable_cgroup = false
  max_container_log_line_size = 16384
  # The pods' network namespaces under the state directory, not /var/run/netns.
  netns_mounts_under_state_dir = true
  # The streaming server (exec/attach/port-forward URLs; ExecSync does not use it) on a
  # free loopback port of containerd's own network namespace.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        # No systemd in the lab: the cgroupfs driver; runc's state under the test's dir.
        SystemdCgroup = false
        Root = "{dir}/runc"

    # As docs/SHIM.md registers it: no options table.
    [{cri}.containerd.runtimes.crib]
      runtime_type = "{runtime}"

  # Debian's containernetworking-plugins; containerd adds the loopback plugin for the
  # pod's lo itself, next to the one network in conf_dir.
  [{cri}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{dir}/cni/net.d"
    max_conf_num = 1
"#,
        base = Containerd::base_config(dir, &[]),
        dir = dir.display(),
        runtime = shim::RUNTIME,
    )
}

/// The CNI network: a bridge of its own with the gateway address (in containerd's
/// namespace), no masquerading, addresses from `host-local` kept under `dir`.
fn cni_conflist(dir: &Path) -> String {
    format!(
        r#"{{
  "cniVersion": "1.0.0",
  "name": "{CNI_NETWORK}",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "{CNI_BRIDGE}",
      "isGateway": true,
      "ipMasq": false,
      "ipam": {{
        "type": "host-local",
        "ranges": [[{{ "subnet": "{CNI_SUBNET}" }}]],
        "routes": [{{ "dst": "0.0.0.0/0" }}],
        "dataDir": "{ipam}"
      }}
    }}
  ]
}}
"#,
        ipam = ipam_dir(dir).display()
    )
}

fn ipam_dir(dir: &Path) -> PathBuf {
    dir.join("cni/ipam")
}

/// Starts the CRI containerd in `dir`, imports both images into `k8s.io` and waits until
/// CRI reports the runtime and the network ready.
fn start(dir: &Path) -> Result<(Containerd, CriClient)> {
    // The CNI bridge plugin's links; the lab's L1 has no on-demand module loading (best
    // effort: built in, or loaded already, elsewhere).
    let _ = Command::new("modprobe")
        .args(["-q", "-a", "bridge", "veth"])
        .status();
    let conflist = ("cni/net.d/10-crib-cri-test.conflist", cni_conflist(dir));
    let containerd = Containerd::launch(dir, &containerd_config(dir), &[conflist], true)?;

    let busybox = fixtures::busybox_image(IMAGE)?;
    let mut pause = fixtures::busybox_image(PAUSE_IMAGE)?;
    // Like Kubernetes' pause: PID 1 of nothing, until StopPodSandbox kills it.
    pause.config.cmd = Some(vec!["sleep".into(), "2147483647".into()]);
    for (name, image) in [("busybox", busybox), ("pause", pause)] {
        let layout = dir.join(format!("{name}-layout"));
        fixtures::write_oci_layout(&layout, &image)?;
        let archive = dir.join(format!("{name}.tar"));
        fixtures::tar_directory(&layout, &archive)?;
        let out = shim::run(
            containerd
                .ctr(&[
                    "-n",
                    "k8s.io",
                    "image",
                    "import",
                    &archive.to_string_lossy(),
                ])
                .as_mut(),
            CALL_TIMEOUT,
        )?;
        out.check(out.code == Some(0), &format!("ctr image import {name}"))?;
    }

    let mut cri = CriClient::connect(&containerd.socket())?;
    let version = cri.version(cri::VersionRequest::default())?;
    ensure!(
        version.runtime_name == "containerd" && version.runtime_api_version == "v1",
        "CRI Version: {version:?}, wanted containerd serving v1"
    );
    let mut last = None;
    let ready = shim::eventually(CALL_TIMEOUT, || {
        let status = cri.status(cri::StatusRequest::default());
        let ready = status.as_ref().is_ok_and(|s| {
            let conditions = s.status.iter().flat_map(|s| &s.conditions);
            conditions.filter(|c| c.status).count() == 2
        });
        last = Some(status);
        ready
    });
    if !ready {
        bail!(
            "CRI Status never had RuntimeReady and NetworkReady: {last:?}\n{}",
            containerd.logs()
        );
    }
    Ok((containerd, cri))
}

/// What a kubelet asks for: the pod's own network, IPC and UTS; a PID namespace per
/// container (the v1.PodSpec default).
fn namespaces() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Pod as i32,
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

fn pod_config(log_directory: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "cri-pod".into(),
            uid: "6b1d8f6e-crib-cri-pod".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "cri-pod".into(),
        log_directory: log_directory.to_string_lossy().into_owned(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container `name` of `image` (an image id, as a kubelet passes) running `sh -c
/// script`, logging to `<name>/0.log` in the pod's log directory.
fn container_config(name: &str, image: &str, script: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: vec!["sh".into(), "-c".into(), script.into()],
        log_path: format!("{name}/0.log"),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Container A: says it serves (stdout) and is ready (stderr), serves `hi` over HTTP
/// on the pod's port, and exits 7 on SIGTERM (StopContainer) after saying so.
fn server_script() -> String {
    format!(
        "echo serving; echo ready >&2; mkdir -p /www; echo hi > /www/index.html; \
         httpd -f -p {HTTP_PORT} -h /www & \
         trap 'echo stopping; kill $!; exit 7' TERM; wait"
    )
}

/// Container B: fetches A's page over the pod's loopback (retrying while A starts),
/// prints it and its kernel's release, and exits 4 (a code of its own, so the exit code
/// seen is the container's).
fn client_script() -> String {
    format!(
        "for i in $(seq 200); do \
           if wget -q -O - http://127.0.0.1:{HTTP_PORT}/ 2>/dev/null; then uname -r; exit 4; fi; \
           usleep 100000; \
         done; echo A unreachable >&2; exit 1"
    )
}

/// One line of a CRI container log: `TIMESTAMP STREAM TAG CONTENT` (the kubelet's
/// format: RFC 3339 time, `stdout` or `stderr`, `F` for a full line or `P` for a part).
#[derive(Debug, PartialEq)]
struct LogLine {
    stream: String,
    tag: String,
    content: String,
}

fn read_cri_log(path: &Path) -> Result<Vec<LogLine>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the CRI log {}", path.display()))?;
    text.lines()
        .map(|line| {
            let mut fields = line.splitn(4, ' ');
            let (Some(time), Some(stream), Some(tag)) =
                (fields.next(), fields.next(), fields.next())
            else {
                bail!("{}: not a CRI log line: {line:?}", path.display());
            };
            ensure!(
                time.len() >= 20 && time.as_bytes().get(10) == Some(&b'T'),
                "{}: no RFC 3339 time in {line:?}",
                path.display()
            );
            Ok(LogLine {
                stream: stream.into(),
                tag: tag.into(),
                content: fields.next().unwrap_or_default().into(),
            })
        })
        .collect()
}

fn full_line(stream: &str, content: &str) -> LogLine {
    LogLine {
        stream: stream.into(),
        tag: "F".into(),
        content: content.into(),
    }
}

/// Polls ContainerStatus of `id` until it is `state` (or `limit` passes).
fn wait_for_state(
    cri: &mut CriClient,
    id: &str,
    state: cri::ContainerState,
    limit: Duration,
) -> Result<cri::ContainerStatus> {
    let started = Instant::now();
    loop {
        let status = cri
            .container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })?
            .status
            .context("ContainerStatus without a status")?;
        if status.state() == state || started.elapsed() > limit {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `cmd` in the container `id` through ExecSync.
fn exec_sync(cri: &mut CriClient, id: &str, cmd: &[&str]) -> Result<cri::ExecSyncResponse> {
    Ok(cri.exec_sync(cri::ExecSyncRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
        timeout: 60,
    })?)
}

/// Runs `command` in containerd's network namespace (the pod's host side).
fn in_host_netns(containerd: &Containerd, command: &[&str]) -> Result<crib_tests::RunOutput> {
    shim::run(
        Command::new("nsenter")
            .arg(format!("--net=/proc/{}/ns/net", containerd.pid()))
            .arg("--")
            .args(command),
        CALL_TIMEOUT,
    )
}

/// Stops and removes every sandbox CRI still lists (after a failure, so containerd is not
/// killed under running shims).
fn remove_pods(cri: &mut CriClient) {
    let pods = cri
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .map(|r| r.items)
        .unwrap_or_default();
    for pod in pods {
        let _ = cri.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        });
        let _ = cri.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.id,
        });
    }
}

fn pod_end_to_end(handler: Handler) -> Result<()> {
    let dir = std::env::temp_dir().join(format!(
        "crib-cri-{}-{}",
        handler.name(),
        std::process::id()
    ));
    let (containerd, mut cri) = start(&dir)?;
    drive_pod(handler, &dir, &containerd, &mut cri).map_err(|e| {
        // The logs first: removing the pods removes the shim's state (crib's log).
        let logs = containerd.logs();
        remove_pods(&mut cri);
        e.context(logs)
    })
}

fn drive_pod(
    handler: Handler,
    dir: &Path,
    containerd: &Containerd,
    cri: &mut CriClient,
) -> Result<()> {
    // Nothing is pulled: both images are known to CRI (ImageStatus answers with them).
    let mut image_id = String::new();
    for image in [IMAGE, PAUSE_IMAGE] {
        let status = cri.image_status(cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            verbose: false,
        })?;
        let found = status
            .image
            .with_context(|| format!("ImageStatus {image}: not found"))?;
        ensure!(
            found.repo_tags.iter().any(|t| t == image),
            "ImageStatus {image}: tags {:?}",
            found.repo_tags
        );
        if image == IMAGE {
            image_id = found.id;
        }
    }

    let logs = dir.join("pods/default_cri-pod_6b1d8f6e-crib-cri-pod");
    for name in ["a", "b"] {
        // The kubelet makes the pod's and each container's log directory.
        std::fs::create_dir_all(logs.join(name))?;
    }
    let config = pod_config(&logs);

    // Bad input: a handler containerd does not know is refused with its message.
    let refused = cri.run_pod_sandbox(cri::RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: "no-such-handler".into(),
    });
    match refused {
        Err(status)
            if status
                .message()
                .contains(r#"no runtime for "no-such-handler""#) => {}
        other => bail!("RunPodSandbox with an unknown handler: {other:?}"),
    }

    // The pod: its sandbox, then A (the server) and B (the client).
    let started = Instant::now();
    let pod = cri
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.name().into(),
        })?
        .pod_sandbox_id;
    let mut ids = Vec::new();
    for (name, script) in [("a", server_script()), ("b", client_script())] {
        let id = cri
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config(name, &image_id, &script)),
                sandbox_config: Some(config.clone()),
            })?
            .container_id;
        cri.start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })?;
        ids.push(id);
    }
    println!(
        "cri {}: RunPodSandbox to both containers started: {} ms",
        handler.name(),
        started.elapsed().as_millis()
    );
    let (a, b) = (ids[0].clone(), ids[1].clone());

    let sandbox = cri
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })?
        .status
        .context("PodSandboxStatus without a status")?;
    let ip = sandbox
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    ensure!(
        sandbox.state() == cri::PodSandboxState::SandboxReady
            && ip.starts_with(CNI_SUBNET_PREFIX)
            && sandbox.runtime_handler == handler.name(),
        "PodSandboxStatus: wanted ready, an address in {CNI_SUBNET}, handler {}: {sandbox:?}",
        handler.name()
    );

    // A runs; B fetched A's page over the pod's loopback and exited with its own code.
    let status = wait_for_state(cri, &a, cri::ContainerState::ContainerRunning, CALL_TIMEOUT)?;
    ensure!(
        status.state() == cri::ContainerState::ContainerRunning,
        "ContainerStatus a: wanted running: {status:?}"
    );
    let status = wait_for_state(cri, &b, cri::ContainerState::ContainerExited, CALL_TIMEOUT)?;
    ensure!(
        status.state() == cri::ContainerState::ContainerExited && status.exit_code == 4,
        "ContainerStatus b: wanted exited with B's code 4: {status:?}"
    );
    if let Handler::Crib = handler {
        // One VM for the pod: a single crib, started by the sandbox's shim.
        let cribs: Vec<String> = shim::processes_mentioning(" pod run ")
            .into_iter()
            .filter(|p| p.contains(&dir.display().to_string()))
            .collect();
        ensure!(
            cribs.len() == 1,
            "wanted one crib VM for the pod's sandbox and both containers: {cribs:#?}"
        );
    }
    let b_log = read_cri_log(&logs.join("b/0.log"))?;
    ensure!(
        b_log.len() == 2 && b_log[0] == full_line("stdout", "hi"),
        "b's CRI log: wanted A's page, then uname -r: {b_log:?}"
    );
    handler.check_kernel(&b_log[1].content, "container b")?;

    // ExecSync in A: stdout and stderr apart, the exit code; A's kernel.
    let out = exec_sync(cri, &a, &["sh", "-c", "echo out; echo err >&2; exit 3"])?;
    ensure!(
        out.stdout == b"out\n" && out.stderr == b"err\n" && out.exit_code == 3,
        "ExecSync sh -c 'echo out; echo err >&2; exit 3': {out:?}"
    );
    let out = exec_sync(cri, &a, &["uname", "-r"])?;
    ensure!(out.exit_code == 0, "ExecSync uname -r: {out:?}");
    handler.check_kernel(String::from_utf8_lossy(&out.stdout).trim(), "container a")?;

    // ContainerStats: the container's cgroup numbers (for crib, the shim's Stats reads
    // them in the guest and sends containerd's cgroup v2 metrics).
    let stats = cri
        .container_stats(cri::ContainerStatsRequest {
            container_id: a.clone(),
        })?
        .stats
        .context("ContainerStats without stats")?;
    let memory = stats.memory.as_ref().map_or(0, |m| {
        let value = |v: &Option<cri::UInt64Value>| v.as_ref().map_or(0, |v| v.value);
        value(&m.usage_bytes).max(value(&m.working_set_bytes))
    });
    let cpu = stats
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .map_or(0, |v| v.value);
    ensure!(
        memory > 0 && cpu > 0,
        "ContainerStats a: wanted memory in use and CPU time: {stats:?}"
    );

    // The pod's address from the host side: containerd's namespace, where the bridge is.
    let url = format!("http://{ip}:{HTTP_PORT}/");
    // No `-T`: Debian 12's busybox 1.35 wget segfaults with it (and hung in the lab);
    // `run` bounds the call instead.
    let out = in_host_netns(containerd, &["busybox", "wget", "-q", "-O", "-", &url])?;
    out.check(
        out.code == Some(0) && out.stdout == "hi\n",
        &format!("wget {url} from the pod's host side"),
    )?;

    // StopContainer: A's trap says so and exits 7; its log has all three lines.
    cri.stop_container(cri::StopContainerRequest {
        container_id: a.clone(),
        timeout: STOP_TIMEOUT_SECS,
    })?;
    let status = wait_for_state(cri, &a, cri::ContainerState::ContainerExited, CALL_TIMEOUT)?;
    ensure!(
        status.state() == cri::ContainerState::ContainerExited && status.exit_code == 7,
        "ContainerStatus a after StopContainer: wanted exited with the trap's 7: {status:?}"
    );
    let a_log = read_cri_log(&logs.join("a/0.log"))?;
    for line in [
        full_line("stdout", "serving"),
        full_line("stderr", "ready"),
        full_line("stdout", "stopping"),
    ] {
        ensure!(
            a_log.contains(&line),
            "a's CRI log: no {line:?} in {a_log:?}"
        );
    }

    for id in [&a, &b] {
        cri.remove_container(cri::RemoveContainerRequest {
            container_id: id.clone(),
        })?;
    }
    let left = cri.list_containers(cri::ListContainersRequest::default())?;
    ensure!(left.containers.is_empty(), "containers left: {left:?}");
    cri.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })?;
    let status = cri
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })?
        .status
        .context("PodSandboxStatus without a status")?;
    ensure!(
        status.state() == cri::PodSandboxState::SandboxNotready,
        "PodSandboxStatus after StopPodSandbox: {status:?}"
    );
    cri.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })?;
    let left = cri.list_pod_sandbox(cri::ListPodSandboxRequest::default())?;
    ensure!(left.items.is_empty(), "sandboxes left: {left:?}");

    check_nothing_left(containerd)
}

/// No shim, crib or virtiofsd process, no mount under the test's directory, no network
/// namespace, host-side veth or address lease, no sandbox, container, task or shim state.
fn check_nothing_left(containerd: &Containerd) -> Result<()> {
    let dir = &containerd.dir;
    let dir_text = dir.display().to_string();
    // Shims (their -address), crib and virtiofsd (the shim's state dir) name the dir.
    let leftovers = || -> Vec<String> {
        shim::processes_mentioning(&dir_text)
            .into_iter()
            .chain(shim::processes_mentioning("containerd-shim-crib-v2"))
            .filter(|p| !p.contains("containerd --config"))
            .collect()
    };
    if !shim::eventually(Duration::from_secs(20), || leftovers().is_empty()) {
        bail!("processes left: {:#?}", leftovers());
    }
    let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter(|l| l.contains(&dir_text))
        .map(str::to_owned)
        .collect();
    ensure!(mounts.is_empty(), "mounts left: {mounts:#?}");

    let out = in_host_netns(containerd, &["ip", "-o", "link", "show"])?;
    let links: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or_default())
        .filter(|n| *n != "lo" && *n != CNI_BRIDGE)
        .collect();
    ensure!(
        out.code == Some(0) && links.is_empty(),
        "host-side links left: {links:?}\n{}",
        out.stdout
    );
    // host-local keeps a file per leased address (and its lock and last_reserved_ip.0).
    let leases: Vec<String> = std::fs::read_dir(ipam_dir(dir).join(CNI_NETWORK))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(CNI_SUBNET_PREFIX))
        .collect();
    ensure!(leases.is_empty(), "address leases left: {leases:?}");

    let state = dir.join("state");
    let root = dir.join("root");
    let mut left = Vec::new();
    for sub in [
        state.join("io.containerd.grpc.v1.cri/netns"),
        state.join("io.containerd.grpc.v1.cri/sandboxes"),
        state.join("io.containerd.grpc.v1.cri/containers"),
        state.join("io.containerd.runtime.v2.task/k8s.io"),
        root.join("io.containerd.grpc.v1.cri/sandboxes"),
        root.join("io.containerd.grpc.v1.cri/containers"),
        dir.join("runc/k8s.io"),
        containerd.shim_state(),
    ] {
        left.extend(
            std::fs::read_dir(&sub)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path()),
        );
    }
    ensure!(left.is_empty(), "state left: {left:#?}");
    Ok(())
}
