//! Fuzzes what containerd hands crib's shim (`crib_shim::spec`): a bundle's `config.json`
//! (the OCI runtime spec, `OciSpec::parse`) with its CRI annotations and namespaces, the
//! container's process checked by `container_process`, and an exec's process spec
//! (`exec_process`). The spec comes from whoever creates the container (a Kubernetes pod's
//! author, through the CRI plugin; `ctr run`'s user).
//!
//! Inputs are either raw bytes (the exec spec is then the document's `process` member) or a
//! structured spec: process, root, linux (namespaces, memory limit) and annotations, each
//! field absent, drawn from pools of plausible values (CRI annotation keys, namespace paths,
//! working directories) or any JSON, the document sometimes damaged; plus the namespace and
//! container id. Invariants: no input panics; a container the shim accepts is one crib
//! runs: the launch file the shim writes for its VM parses (`vmm::pod::LaunchFile`) and
//! prepares, and the body of cradle's `POST /crib/v1/containers` that adds it to a running
//! sandbox's VM parses and validates against that pod (`PodSpec::validate_process`); an
//! accepted exec has a program, no NUL and an absolute working directory.

#![no_main]

use std::path::{Path, PathBuf};

use arbitrary::{Arbitrary, Unstructured};
use crib_fuzz::json::{AnyJson, Damage, Field, Number, Text};
use crib_shim::spec::{self, OciSpec};
use initramfs::podspec::PodSpec;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use vmm::pod::LaunchFile;

/// Strings of OCI specs and the CRI: annotation keys and values, namespace kinds and
/// paths, working directories, environment entries.
const WORDS: &[&str] = &[
    spec::CONTAINER_TYPE_ANNOTATION,
    spec::SANDBOX_ID_ANNOTATION,
    "io.kubernetes.cri.sandbox-name",
    "io.kubernetes.cri.container-name",
    "sandbox",
    "container",
    "",
    "5f0c8bd2e1a4",
    "network",
    "pid",
    "ipc",
    "mount",
    "/var/run/netns/cni-8d3c1a52-7e0f-4b9a-a6f2-0d4e5c6b7a81",
    "/proc/4242/ns/net",
    "/",
    "/srv",
    "/app/",
    "/a/../b",
    "//x",
    "/.",
    "relative",
    "rootfs",
    "/abs/rootfs",
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOSTNAME=web-0",
    "=x",
    "NOEQ",
    "sh",
    "/pause",
    "-c",
    "a\u{0}b",
];

/// A string of [`WORDS`], or a [`Text`].
#[derive(Arbitrary, Debug)]
enum Word {
    Pool(u8),
    Text(Text),
}

impl From<Word> for Value {
    fn from(w: Word) -> Value {
        match w {
            Word::Pool(i) => WORDS[usize::from(i) % WORDS.len()].into(),
            Word::Text(t) => t.into(),
        }
    }
}

impl Word {
    fn key(self) -> String {
        match Value::from(self) {
            Value::String(s) => s,
            _ => String::new(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Process {
    terminal: Field<bool>,
    console_size: Option<(Field<Number>, Field<Number>)>,
    user: Option<(Field<Number>, Field<Number>)>,
    args: Option<Vec<Word>>,
    env: Option<Vec<Word>>,
    cwd: Field<Word>,
    extra: Option<(Text, AnyJson)>,
}

#[derive(Arbitrary, Debug)]
struct Namespace {
    kind: Field<Word>,
    path: Field<Word>,
}

#[derive(Arbitrary, Debug)]
struct Spec {
    process: Field<Process>,
    root: Option<(Field<Word>, Field<bool>)>,
    namespaces: Option<Vec<Namespace>>,
    memory_limit: Option<Field<Number>>,
    annotations: Option<Vec<(Word, Field<Word>)>>,
    extra: Option<(Text, AnyJson)>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    spec: Spec,
    damage: Damage,
    namespace: Word,
    id: Word,
}

fn object(build: impl FnOnce(&mut Map<String, Value>)) -> Value {
    let mut m = Map::new();
    build(&mut m);
    Value::Object(m)
}

fn words(list: Option<Vec<Word>>, m: &mut Map<String, Value>, key: &str) {
    if let Some(list) = list {
        m.insert(key.into(), list.into_iter().map(Value::from).collect());
    }
}

fn process(p: Process) -> Value {
    object(|m| {
        p.terminal.put(m, "terminal");
        if let Some((height, width)) = p.console_size {
            let size = object(|s| {
                height.put(s, "height");
                width.put(s, "width");
            });
            m.insert("consoleSize".into(), size);
        }
        if let Some((uid, gid)) = p.user {
            let user = object(|u| {
                uid.put(u, "uid");
                gid.put(u, "gid");
            });
            m.insert("user".into(), user);
        }
        words(p.args, m, "args");
        words(p.env, m, "env");
        p.cwd.put(m, "cwd");
        if let Some((key, value)) = p.extra {
            m.insert(key.0, value.0);
        }
    })
}

fn document(s: Spec) -> Value {
    object(|m| {
        m.insert("ociVersion".into(), "1.0.2-dev".into());
        match s.process {
            Field::Absent => {}
            Field::Valid(p) => {
                m.insert("process".into(), process(p));
            }
            Field::Any(v) => {
                m.insert("process".into(), v.0);
            }
        }
        if let Some((path, readonly)) = s.root {
            let root = object(|r| {
                path.put(r, "path");
                readonly.put(r, "readonly");
            });
            m.insert("root".into(), root);
        }
        let linux = object(|l| {
            if let Some(namespaces) = s.namespaces {
                let list = namespaces
                    .into_iter()
                    .map(|n| {
                        object(|o| {
                            n.kind.put(o, "type");
                            n.path.put(o, "path");
                        })
                    })
                    .collect();
                l.insert("namespaces".into(), Value::Array(list));
            }
            if let Some(limit) = s.memory_limit {
                let memory = object(|mem| limit.put(mem, "limit"));
                l.insert("resources".into(), serde_json::json!({ "memory": memory }));
            }
        });
        m.insert("linux".into(), linux);
        if let Some(annotations) = s.annotations {
            let map = object(|a| {
                for (key, value) in annotations {
                    value.put(a, &key.key());
                }
            });
            m.insert("annotations".into(), map);
        }
        if let Some((key, value)) = s.extra {
            m.insert(key.0, value.0);
        }
    })
}

/// The exec spec of a raw input: its `process` member, if it is JSON with one.
fn process_member(bytes: &[u8]) -> Option<Vec<u8>> {
    let value: Value = serde_json::from_slice(bytes).ok()?;
    serde_json::to_vec(value.get("process")?).ok()
}

fn check_exec(bytes: &[u8]) {
    let Ok(exec) = spec::exec_process(bytes) else {
        return;
    };
    assert!(
        exec.argv.first().is_some_and(|a| !a.is_empty()),
        "an exec without a program was accepted"
    );
    assert!(
        exec.argv.iter().chain(&exec.env).all(|s| !s.contains('\0')) && !exec.cwd.contains('\0'),
        "an exec with a NUL was accepted"
    );
    assert!(exec.cwd.starts_with('/'), "exec cwd {:?}", exec.cwd);
}

fn check_bundle(bytes: &[u8], namespace: &str, id: &str) {
    let bundle = Path::new("/run/containerd/io.containerd.runtime.v2.task/k8s.io/c1");
    let Ok(oci) = OciSpec::parse(bytes, &bundle.join("config.json")) else {
        return;
    };
    let _ = (oci.root_dir(bundle), oci.root_readonly());
    if let Some(sandbox) = oci.sandbox() {
        assert_eq!(
            oci.grouping(id),
            sandbox,
            "a sandbox's container is grouped elsewhere"
        );
    }
    let netns = oci.network_namespace();
    let Ok(process) = oci.container_process() else {
        return;
    };

    // The VM the container would own: the launch file the shim writes, as crib reads it.
    let pod = spec::pod_name(namespace, id);
    let state = PathBuf::from("/run/crib-shim").join(&pod);
    let launch = spec::launch_file(
        &pod,
        &process,
        &state.join("share"),
        netns.as_deref(),
        &state.join("run"),
    );
    let launch_bytes = serde_json::to_vec_pretty(&launch).expect("a Value serializes");
    if process
        .memory_bytes
        .is_some_and(|m| m > vmm::config::MAX_MEMORY_BYTES - (128 << 20))
    {
        // The VM gets the limit plus the guest's overhead: crib refuses one larger than
        // a VM can have when it starts, as it refuses one beyond the host's RAM.
        return;
    }
    let launch =
        LaunchFile::from_json(&launch_bytes, &state.join("launch.json")).unwrap_or_else(|e| {
            panic!("crib refuses the launch file of a container the shim accepted: {e:?}")
        });
    if let Err(e) = launch.prepare(Path::new("/run/crib"), Path::new("/guest")) {
        panic!("crib cannot prepare the VM of a container the shim accepted: {e:?}");
    }

    // The same container added to a running sandbox's VM (the launch file's pod).
    let body = spec::pod_process(&pod, &process);
    let body = serde_json::to_vec(&body).expect("a Value serializes");
    let added = PodSpec::process_from_json(&body, "processes[1]").unwrap_or_else(|e| {
        panic!("cradle refuses the body of a container the shim accepted: {e:?}")
    });
    if let Err(e) = launch.spec.validate_process(1, &added) {
        panic!("cradle refuses a container the shim accepted: {e:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte chooses: even, the rest is config.json as is; odd, a structured spec.
    match data.split_first() {
        Some((mode, rest)) if mode % 2 == 0 => {
            if let Some(exec) = process_member(rest) {
                check_exec(&exec);
            }
            check_bundle(rest, "k8s.io", "c1");
        }
        Some((_, rest)) => {
            let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(rest)) else {
                return;
            };
            let doc = document(input.spec);
            if let Some(p) = doc.get("process") {
                check_exec(&serde_json::to_vec(p).expect("a Value serializes"));
            }
            let bytes = input.damage.apply(&doc);
            check_bundle(&bytes, &input.namespace.key(), &input.id.key());
        }
        None => {}
    }
});
