//! From containerd's bundle to crib's launch file: the process of the bundle's OCI
//! `config.json` (args, env, cwd, user) becomes a process of a pod whose root filesystem
//! is the bundle's rootfs, bound into a directory shared with the guest over virtio-fs
//! (docs/SHIM.md, docs/POD_SPEC.md `rootfs`). The CRI annotations say which containers
//! share one VM (a pod sandbox). Pure functions, unit-tested.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use initramfs::containers::MIN_MEMORY_BYTES;
use serde::Deserialize;
use serde_json::{json, Value};
use thiserror::Error;

/// The virtio-fs tag of the directory holding the containers' root filesystems (one
/// subdirectory each, named as the container's process).
pub const ROOTFS_TAG: &str = "rootfs";
/// Where cradle mounts that share (each container's root is bound from there).
pub const ROOTFS_GUEST_PATH: &str = "/run/rootfs";
/// The process name, in the pod, of the container whose Start boots the VM (a lone
/// container, or a CRI sandbox's pause container).
pub const PROCESS_NAME: &str = "container";
/// The CRI plugin's annotations (containerd 1.6, `pkg/cri/annotations`): whether a
/// container is a sandbox or a container in one, and which sandbox.
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
/// The interface CNI gives a CRI sandbox's network namespace (the CRI plugin's
/// `CNI_IFNAME`), which the VM takes over.
pub const CNI_INTERFACE: &str = "eth0";
/// The guest's vCPUs and memory when the spec sets no limits.
const DEFAULT_CPUS: u32 = 1;
const DEFAULT_MEMORY_MIB: u64 = 512;
/// Memory crib's guest needs beyond the container's limit (kernel, cradle).
const GUEST_OVERHEAD_MIB: u64 = 128;

/// Errors of reading the bundle's OCI spec.
#[derive(Debug, Error)]
pub enum SpecError {
    #[error("cannot read the OCI spec {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the OCI spec {} is not valid JSON of the runtime spec", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the OCI spec has no process: crib runs a container's process, give one in config.json"
    )]
    NoProcess,
    #[error("the OCI spec's process.args is empty: give the command to run")]
    NoArgs,
    #[error(
        "the exec's process spec is not JSON of an OCI process (args, env, cwd, user, terminal)"
    )]
    ExecParse {
        #[source]
        source: serde_json::Error,
    },
    #[error("process.{field}: {value:?} contains a NUL byte")]
    Nul { field: &'static str, value: String },
    #[error("linux.resources.memory.limit: {limit} bytes is less than the {MIN_MEMORY_BYTES} (4 MiB) cradle takes as a container's memory limit; give at least 4 MiB, or no limit")]
    MemoryLimit { limit: u64 },
}

/// The subset of the OCI runtime spec (config.json) the shim reads; other fields are
/// ignored.
#[derive(Debug, Default, Deserialize)]
pub struct OciSpec {
    #[serde(default)]
    pub process: Option<OciProcess>,
    #[serde(default)]
    pub root: Option<OciRoot>,
    #[serde(default)]
    pub linux: Option<OciLinux>,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OciProcess {
    #[serde(default)]
    pub terminal: bool,
    #[serde(default)]
    pub console_size: Option<OciBox>,
    #[serde(default)]
    pub user: OciUser,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cwd: String,
}

/// A terminal's size.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
pub struct OciBox {
    #[serde(default)]
    pub height: u32,
    #[serde(default)]
    pub width: u32,
}

#[derive(Debug, Default, Deserialize)]
pub struct OciUser {
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
}

#[derive(Debug, Default, Deserialize)]
pub struct OciRoot {
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub readonly: bool,
}

#[derive(Debug, Default, Deserialize)]
pub struct OciLinux {
    #[serde(default)]
    pub resources: Option<OciResources>,
    #[serde(default)]
    pub namespaces: Vec<OciNamespace>,
}

#[derive(Debug, Default, Deserialize)]
pub struct OciNamespace {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub path: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct OciResources {
    #[serde(default)]
    pub memory: Option<OciMemory>,
}

#[derive(Debug, Default, Deserialize)]
pub struct OciMemory {
    #[serde(default)]
    pub limit: Option<i64>,
}

/// What the guest runs: the container's process as cradle's pod spec takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerProcess {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    /// `uid:gid`, resolved numerically by cradle.
    pub user: String,
    /// The container's memory limit in bytes, if the spec sets one.
    pub memory_bytes: Option<u64>,
    /// `process.terminal`: a TTY (cradle's `tty`), its output one raw stream.
    pub terminal: bool,
    /// `[height, width]` of the terminal at start (`process.consoleSize`, or a resize
    /// before the start).
    pub console_size: Option<[u16; 2]>,
}

impl OciSpec {
    /// Reads `config.json` of the bundle `bundle`.
    pub fn load(bundle: &Path) -> Result<Self, SpecError> {
        let path = bundle.join("config.json");
        let text = std::fs::read(&path).map_err(|source| SpecError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text, &path)
    }

    /// Parses the contents of a `config.json` (`path` names it in errors).
    pub fn parse(json: &[u8], path: &Path) -> Result<Self, SpecError> {
        serde_json::from_slice(json).map_err(|source| SpecError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Whether `root.readonly` asks for a read-only root.
    pub fn root_readonly(&self) -> bool {
        self.root.as_ref().is_some_and(|r| r.readonly)
    }

    /// The root filesystem's directory: `root.path` relative to the bundle, else
    /// `bundle/rootfs`.
    pub fn root_dir(&self, bundle: &Path) -> PathBuf {
        match self.root.as_ref().map(|r| r.path.as_str()) {
            Some(path) if !path.is_empty() => bundle.join(path),
            _ => bundle.join("rootfs"),
        }
    }

    /// The sandbox this container joins: the CRI's sandbox id for a container of type
    /// `container`; `None` for a sandbox (whose id is its own) or a container without
    /// the CRI's annotations (`ctr run`), which get a VM of their own.
    pub fn sandbox(&self) -> Option<&str> {
        let kind = self.annotations.get(CONTAINER_TYPE_ANNOTATION)?;
        if kind != "container" {
            return None;
        }
        self.annotations
            .get(SANDBOX_ID_ANNOTATION)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    /// Which shim serves the container: its sandbox's, else its own.
    pub fn grouping<'a>(&'a self, id: &'a str) -> &'a str {
        self.annotations
            .get(SANDBOX_ID_ANNOTATION)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or(id)
    }

    /// The network namespace the spec joins by path (the CNI-made namespace of a CRI
    /// sandbox); `None` for a new, empty one.
    pub fn network_namespace(&self) -> Option<PathBuf> {
        self.linux
            .as_ref()?
            .namespaces
            .iter()
            .find(|n| n.kind == "network" && !n.path.is_empty())
            .map(|n| PathBuf::from(&n.path))
    }

    /// The container's process, checked.
    pub fn container_process(&self) -> Result<ContainerProcess, SpecError> {
        let process = self.process.as_ref().ok_or(SpecError::NoProcess)?;
        let (argv, env, cwd, user) = checked(process)?;
        let memory_bytes = self
            .linux
            .as_ref()
            .and_then(|l| l.resources.as_ref())
            .and_then(|r| r.memory.as_ref())
            .and_then(|m| m.limit)
            .and_then(|limit| u64::try_from(limit).ok())
            .filter(|limit| *limit > 0);
        // cradle refuses a smaller one in the pod spec: the VM would not start.
        if let Some(limit) = memory_bytes.filter(|limit| *limit < MIN_MEMORY_BYTES) {
            return Err(SpecError::MemoryLimit { limit });
        }
        Ok(ContainerProcess {
            argv,
            env,
            cwd,
            user,
            memory_bytes,
            terminal: process.terminal,
            console_size: process.terminal.then(|| console_size(process)).flatten(),
        })
    }
}

/// An exec process (`ctr task exec`): what containerd's `ExecProcessRequest.spec` (the
/// JSON of an OCI process) asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecProcess {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    /// `uid:gid`.
    pub user: String,
    pub terminal: bool,
    /// `[height, width]`, if the spec gives a size.
    pub console_size: Option<[u16; 2]>,
}

/// Reads and checks an exec's process spec (JSON bytes).
pub fn exec_process(json: &[u8]) -> Result<ExecProcess, SpecError> {
    let process: OciProcess =
        serde_json::from_slice(json).map_err(|source| SpecError::ExecParse { source })?;
    let (argv, env, cwd, user) = checked(&process)?;
    let console_size = console_size(&process);
    Ok(ExecProcess {
        argv,
        env,
        cwd,
        user,
        terminal: process.terminal,
        console_size,
    })
}

/// A process's `consoleSize` as `[height, width]`, if it gives a usable one.
fn console_size(process: &OciProcess) -> Option<[u16; 2]> {
    process
        .console_size
        .and_then(|b| Some([u16::try_from(b.height).ok()?, u16::try_from(b.width).ok()?]))
        .filter(|[h, w]| *h > 0 && *w > 0)
}

/// A process's args (not empty), env (NAME=VALUE entries only), cwd (absolute and
/// clean, else /) and `uid:gid`; no NUL bytes.
fn checked(process: &OciProcess) -> Result<(Vec<String>, Vec<String>, String, String), SpecError> {
    if process.args.first().is_none_or(String::is_empty) {
        return Err(SpecError::NoArgs);
    }
    for (field, values) in [("args", &process.args), ("env", &process.env)] {
        if let Some(value) = values.iter().find(|v| v.contains('\0')) {
            return Err(SpecError::Nul {
                field,
                value: value.clone(),
            });
        }
    }
    let cwd = if process.cwd.starts_with('/') {
        clean_path(&process.cwd)
    } else {
        "/".to_owned()
    };
    if cwd.contains('\0') {
        return Err(SpecError::Nul {
            field: "cwd",
            value: cwd,
        });
    }
    // Entries that are not NAME=VALUE would be refused by the pod spec.
    let env = process
        .env
        .iter()
        .filter(|e| e.split_once('=').is_some_and(|(n, _)| !n.is_empty()))
        .cloned()
        .collect();
    let user = format!("{}:{}", process.user.uid, process.user.gid);
    Ok((process.args.clone(), env, cwd, user))
}

/// An absolute path without empty, `.` or `..` components (the pod spec refuses them),
/// resolved lexically as Go's `filepath.Clean` does: `/app/` is `/app`, `/a/../b` is `/b`
/// (which differs from the kernel's resolution only when `a` is a symlink), and `..`
/// stops at `/`.
fn clean_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    format!("/{}", parts.join("/"))
}

/// A pod name (1 to 63 of `a-z0-9-`) for the container `id` of namespace `namespace`:
/// `c-` and 16 hex digits of their FNV-1a hash, as containerd's ids may hold any
/// character and be longer.
pub fn pod_name(namespace: &str, id: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in namespace.bytes().chain([0]).chain(id.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("c-{hash:016x}")
}

/// The pod spec's process (docs/POD_SPEC.md) that runs `process` as `name`, its root the
/// subdirectory `name` of the rootfs share: a process of the launch file, or the body
/// of cradle's `POST /crib/v1/containers` for a container added to a running pod.
pub fn pod_process(name: &str, process: &ContainerProcess) -> Value {
    let mut proc_json = json!({
        "name": name,
        "rootfs": format!("{ROOTFS_TAG}/{name}"),
        "argv": process.argv,
        "cwd": process.cwd,
        "user": process.user,
    });
    if !process.env.is_empty() {
        proc_json["env"] = json!(process.env);
    }
    if let Some(limit) = process.memory_bytes {
        proc_json["memory"] = json!(limit);
    }
    if process.terminal {
        proc_json["tty"] = json!(true);
        if let Some(size) = process.console_size {
            proc_json["console_size"] = json!(size);
        }
    }
    proc_json
}

/// crib's launch file (README, "crib pod run") for the VM of a container or a sandbox:
/// its process (named [`PROCESS_NAME`]) with the virtio-fs share `share` (which holds
/// every container's root) as its root's parent, the VM kept up after the process exits
/// (`until-shutdown`) so the shim can read its logs and exit code, then shut it down.
/// With `netns` (a CRI sandbox's), the VM takes over the namespace's CNI interface
/// (docs/NETWORK.md, attach mode): crib is started inside that namespace.
pub fn launch_file(
    pod: &str,
    process: &ContainerProcess,
    share: &Path,
    netns: Option<&Path>,
    run_dir: &Path,
) -> Value {
    let mut memory_mib = DEFAULT_MEMORY_MIB;
    if let Some(limit) = process.memory_bytes {
        memory_mib = memory_mib.max((limit >> 20) + GUEST_OVERHEAD_MIB);
    }
    let network = match netns {
        Some(_) => json!({"attach": CNI_INTERFACE}),
        None => json!("none"),
    };
    json!({
        "pod": {
            "name": pod,
            "filesystems": [{"tag": ROOTFS_TAG, "path": ROOTFS_GUEST_PATH}],
            "processes": [pod_process(PROCESS_NAME, process)],
            "lifetime": "until-shutdown",
        },
        "cpus": DEFAULT_CPUS,
        "memory": format!("{memory_mib}M"),
        "shares": {ROOTFS_TAG: {"dir": share}},
        "run_dir": run_dir,
        "network": network,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> OciSpec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn process_takes_args_env_cwd_and_numeric_user() {
        let spec = spec(
            r#"{"ociVersion": "1.0.2", "process": {"terminal": false, "user": {"uid": 1000, "gid": 100},
                "args": ["sh", "-c", "exit 7"], "env": ["PATH=/bin", "TERM=xterm"], "cwd": "/srv"},
                "root": {"path": "rootfs"}, "linux": {"namespaces": []}}"#,
        );
        let process = spec.container_process().unwrap();
        assert_eq!(
            process,
            ContainerProcess {
                argv: vec!["sh".into(), "-c".into(), "exit 7".into()],
                env: vec!["PATH=/bin".into(), "TERM=xterm".into()],
                cwd: "/srv".into(),
                user: "1000:100".into(),
                memory_bytes: None,
                terminal: false,
                console_size: None,
            }
        );
    }

    #[test]
    fn exec_process_takes_terminal_and_console_size() {
        let exec = exec_process(
            br#"{"terminal": true, "consoleSize": {"height": 40, "width": 120}, "user": {"uid": 0, "gid": 0},
                "args": ["sh"], "env": ["PATH=/bin", "bogus"], "cwd": ""}"#,
        )
        .unwrap();
        assert_eq!(
            exec,
            ExecProcess {
                argv: vec!["sh".into()],
                env: vec!["PATH=/bin".into()],
                cwd: "/".into(),
                user: "0:0".into(),
                terminal: true,
                console_size: Some([40, 120]),
            }
        );
    }

    #[test]
    fn exec_process_of_garbage_or_without_args_is_an_error() {
        let err = exec_process(b"\xff{").unwrap_err();
        assert!(matches!(err, SpecError::ExecParse { .. }), "{err}");
        let err = exec_process(br#"{"args": []}"#).unwrap_err();
        assert!(matches!(err, SpecError::NoArgs), "{err}");
        let err = exec_process(br#"{"args": ["a\u0000b"]}"#).unwrap_err();
        assert!(matches!(err, SpecError::Nul { field: "args", .. }), "{err}");
    }

    #[test]
    fn memory_limit_is_taken_from_linux_resources() {
        let spec = spec(
            r#"{"process": {"args": ["sh"]}, "linux": {"resources": {"memory": {"limit": 67108864}}}}"#,
        );
        assert_eq!(
            spec.container_process().unwrap().memory_bytes,
            Some(64 << 20)
        );
    }

    /// Found by the shim_bundle fuzz target: cradle refuses a container memory limit
    /// under 4 MiB in the VM's pod spec, so the shim refuses it at Create.
    #[test]
    fn memory_limit_below_crib_minimum_is_an_error() {
        let spec = spec(
            r#"{"process": {"args": ["sh"]}, "linux": {"resources": {"memory": {"limit": 1048576}}}}"#,
        );

        let err = spec.container_process().unwrap_err();

        assert!(
            matches!(err, SpecError::MemoryLimit { limit: 1048576 }),
            "{err}"
        );
    }

    #[test]
    fn memory_limit_of_minus_one_is_no_limit() {
        let spec = spec(
            r#"{"process": {"args": ["sh"]}, "linux": {"resources": {"memory": {"limit": -1}}}}"#,
        );

        assert_eq!(spec.container_process().unwrap().memory_bytes, None);
    }

    /// Found by the shim_bundle fuzz target: the pod spec refuses a cwd with an empty,
    /// `.` or `..` component (`/app/`, which Kubernetes' workingDir allows).
    #[test]
    fn unclean_cwd_is_cleaned() {
        let cwd = |path: &str| {
            let json = format!(r#"{{"process": {{"args": ["sh"], "cwd": {path:?}}}}}"#);
            spec(&json).container_process().unwrap().cwd
        };

        assert_eq!(
            [
                cwd("/app/"),
                cwd("//srv//www/."),
                cwd("/a/../b"),
                cwd("/../..")
            ],
            ["/app", "/srv/www", "/b", "/"]
        );
    }

    #[test]
    fn missing_process_is_an_error() {
        let err = spec(r#"{"root": {"path": "rootfs"}}"#)
            .container_process()
            .unwrap_err();
        assert!(matches!(err, SpecError::NoProcess), "{err}");
    }

    #[test]
    fn empty_args_is_an_error() {
        let err = spec(r#"{"process": {"args": []}}"#)
            .container_process()
            .unwrap_err();
        assert!(matches!(err, SpecError::NoArgs), "{err}");
    }

    #[test]
    fn terminal_process_takes_the_console_size() {
        let process = spec(
            r#"{"process": {"terminal": true, "consoleSize": {"height": 40, "width": 120},
                "args": ["sh"]}}"#,
        )
        .container_process()
        .unwrap();

        assert!(process.terminal);
        assert_eq!(process.console_size, Some([40, 120]));
    }

    #[test]
    fn console_size_without_terminal_is_ignored() {
        let process =
            spec(r#"{"process": {"consoleSize": {"height": 40, "width": 120}, "args": ["sh"]}}"#)
                .container_process()
                .unwrap();

        assert_eq!((process.terminal, process.console_size), (false, None));
    }

    #[test]
    fn pod_process_of_a_terminal_has_tty_and_console_size() {
        let process = ContainerProcess {
            argv: vec!["sh".into()],
            env: vec![],
            cwd: "/".into(),
            user: "0:0".into(),
            memory_bytes: None,
            terminal: true,
            console_size: Some([40, 120]),
        };

        let json = pod_process("c-abc", &process);

        assert_eq!(json["tty"], true);
        assert_eq!(json["console_size"], json!([40, 120]));
    }

    #[test]
    fn nul_in_args_is_an_error() {
        let err = spec(r#"{"process": {"args": ["a\u0000b"]}}"#)
            .container_process()
            .unwrap_err();
        assert!(matches!(err, SpecError::Nul { field: "args", .. }), "{err}");
    }

    #[test]
    fn relative_cwd_becomes_root_and_malformed_env_is_dropped() {
        let process =
            spec(r#"{"process": {"args": ["sh"], "cwd": "tmp", "env": ["=x", "NOEQ", "A=1"]}}"#)
                .container_process()
                .unwrap();
        assert_eq!(
            (process.cwd.as_str(), process.env.clone()),
            ("/", vec!["A=1".to_owned()])
        );
    }

    #[test]
    fn load_of_a_missing_bundle_names_the_file() {
        let err = OciSpec::load(Path::new("/nonexistent-bundle")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent-bundle/config.json"),
            "{err}"
        );
    }

    #[test]
    fn root_dir_is_relative_to_the_bundle() {
        let bundle = Path::new("/b");
        assert_eq!(spec("{}").root_dir(bundle), Path::new("/b/rootfs"));
        assert_eq!(
            spec(r#"{"root": {"path": "r2"}}"#).root_dir(bundle),
            Path::new("/b/r2")
        );
    }

    #[test]
    fn pod_name_is_a_valid_pod_name_and_differs_by_namespace() {
        let a = pod_name("default", "Web_1.x");
        assert_eq!(a.len(), 18);
        assert!(a
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        assert_ne!(a, pod_name("k8s.io", "Web_1.x"));
    }

    #[test]
    fn launch_file_shares_the_roots_and_runs_the_process_in_its_own() {
        let process = ContainerProcess {
            argv: vec!["uname".into(), "-r".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            user: "0:0".into(),
            memory_bytes: Some(1 << 30),
            terminal: false,
            console_size: None,
        };
        let launch = launch_file(
            "c-1",
            &process,
            Path::new("/state/share"),
            None,
            Path::new("/run/x"),
        );
        assert_eq!(launch["shares"]["rootfs"]["dir"], "/state/share");
        assert_eq!(launch["pod"]["filesystems"][0]["path"], ROOTFS_GUEST_PATH);
        assert_eq!(launch["pod"]["processes"][0]["rootfs"], "rootfs/container");
        assert_eq!(launch["pod"]["processes"][0]["argv"][1], "-r");
        assert_eq!(launch["pod"]["processes"][0]["memory"], 1u64 << 30);
        assert_eq!(launch["pod"]["lifetime"], "until-shutdown");
        assert_eq!(launch["memory"], "1152M");
        assert_eq!(launch["network"], "none");
        let launch = launch_file(
            "c-1",
            &process,
            Path::new("/s"),
            Some(Path::new("/var/run/netns/cni-1")),
            Path::new("/r"),
        );
        assert_eq!(launch["network"]["attach"], CNI_INTERFACE);
    }

    #[test]
    fn cri_annotations_group_a_sandbox_and_its_containers() {
        let sandbox = spec(
            r#"{"annotations": {"io.kubernetes.cri.container-type": "sandbox",
                "io.kubernetes.cri.sandbox-id": "s1"},
                "linux": {"namespaces": [{"type": "pid"},
                  {"type": "network", "path": "/var/run/netns/cni-x"}]}}"#,
        );
        assert_eq!(sandbox.sandbox(), None);
        assert_eq!(sandbox.grouping("s1"), "s1");
        assert_eq!(
            sandbox.network_namespace(),
            Some(PathBuf::from("/var/run/netns/cni-x"))
        );
        let member = spec(
            r#"{"annotations": {"io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.sandbox-id": "s1"}}"#,
        );
        assert_eq!(member.sandbox(), Some("s1"));
        assert_eq!(member.grouping("c1"), "s1");
        let lone = spec(r#"{"linux": {"namespaces": [{"type": "network"}]}}"#);
        assert_eq!((lone.sandbox(), lone.grouping("c2")), (None, "c2"));
        assert_eq!(lone.network_namespace(), None);
    }

    #[test]
    fn pod_process_roots_the_container_in_its_subdirectory() {
        let process = ContainerProcess {
            argv: vec!["sh".into()],
            env: vec![],
            cwd: "/".into(),
            user: "0:0".into(),
            memory_bytes: None,
            terminal: false,
            console_size: None,
        };
        let json = pod_process("c-abc", &process);
        assert_eq!(json["rootfs"], "rootfs/c-abc");
        assert_eq!(json["name"], "c-abc");
        assert!(json.get("env").is_none() && json.get("memory").is_none());
        assert!(json.get("tty").is_none() && json.get("console_size").is_none());
    }
}
