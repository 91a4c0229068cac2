//! Fuzzes the body of cradle's `POST /crib/v1/containers` (a process added to a running
//! pod, as the shim adds a CRI container to its sandbox's VM): `PodSpec::process_from_json`
//! then `PodSpec::validate_process` against the pod, as cradle's handler and registry run
//! them, with `rootfs` as a filesystem's tag or `TAG/DIR` (`split_rootfs`,
//! `rootfs_mount`, `rootfs_path`).
//!
//! Inputs are either raw bytes (the body as is, added to a pod like the shim's) or a
//! structured pod and body. The pod is always valid: a choice among volumes and
//! filesystems whose names and tags meet (a volume and a filesystem both called `data`,
//! tags holding '/'); the pod spec parser has its own target. The body is mostly valid
//! (a name, argv, a rootfs from a pool of tags, `TAG/DIR` forms and what must be refused;
//! env, cwd, mounts, user, memory, cpus, restart, tty and console size from pools of
//! valid and invalid values), a field now and then any JSON or unknown, the document
//! now and then damaged. Invariants: no input panics; an accepted process's rootfs lies
//! inside its filesystem's mount (only plain components below it), and the mount cradle
//! bounds it by once symlinks are resolved (`rootfs_mount`) is that filesystem's; its
//! mounts' sources are the pod's; it survives a serialize-parse round trip; added to the
//! pod's processes (its name free), the pod validates as a whole (boot and run time
//! agree).

#![no_main]

use std::path::{Component, Path};

use arbitrary::{Arbitrary, Unstructured};
use crib_fuzz::json::{AnyJson, Damage, Text};
use initramfs::podspec::{PodSpec, ProcessSpec};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

/// The pod's volumes (name, mount point): each in or out by a bit of a mask.
const VOLUMES: &[(&str, Option<&str>)] = &[
    ("data", Some("/data")),
    ("rootfs", Some("/vol/rootfs")),
    ("scratch", None),
    ("gfs", None),
];
/// The pod's filesystems (tag, mount point): some tags are volume names too, some hold
/// '/'; `/data/share` is inside the `data` volume (listed first, as it must be).
const FILESYSTEMS: &[(&str, &str)] = &[
    ("rootfs", "/run/rootfs"),
    ("gfs", "/shared"),
    ("data", "/data/share"),
    ("share/c1", "/run/share"),
    ("a/b", "/mnt/ab"),
    ("Tag.1", "/mnt/t"),
];

/// Pools of JSON values (as JSON text) for the body's fields, valid and not.
const NAMES: &[&str] = &[
    r#""app""#,
    r#""c-0123456789abcdef""#,
    r#""container""#,
    r#""Bad Name""#,
    r#""""#,
];
const ARGS: &[&str] = &[
    r#""sh""#,
    r#""/bin/sh""#,
    r#""-c""#,
    r#""exit 0""#,
    r#""""#,
    r#""a\u0000b""#,
];
const ROOTFS: &[&str] = &[
    r#""rootfs""#,
    r#""rootfs/container""#,
    r#""rootfs/c-0123456789abcdef""#,
    r#""share/c1""#,
    r#""share/c1/rootfs""#,
    r#""a/b""#,
    r#""a/b/c""#,
    r#""data""#,
    r#""data/x""#,
    r#""gfs/x/y""#,
    r#""rootfs/../etc""#,
    r#""rootfs/./x""#,
    r#""rootfs//x""#,
    r#""rootfs/""#,
    r#""rootfs/..""#,
    r#""/run/rootfs/x""#,
    r#""/x""#,
    r#""""#,
    r#""unknown/x""#,
    r#""scratch""#,
    r#""gfs/a\u0000b""#,
];
const ENV: &[&str] = &[r#""PATH=/bin""#, r#""A=1""#, r#""=x""#, r#""NOEQ""#];
const CWDS: &[&str] = &[
    r#""/""#,
    r#""/srv""#,
    r#""/srv/""#,
    r#""/a/../b""#,
    r#""rel""#,
];
const SOURCES: &[&str] = &[
    r#""data""#,
    r#""scratch""#,
    r#""rootfs""#,
    r#""gfs""#,
    r#""a/b""#,
    r#""nope""#,
];
const MOUNT_PATHS: &[&str] = &[
    r#""/data""#,
    r#""/var/lib/app""#,
    r#""/var/lib""#,
    r#""/""#,
    r#""/proc/x""#,
    r#""rel""#,
];
const USERS: &[&str] = &[
    r#""0:0""#,
    r#""1000:100""#,
    r#""app""#,
    r#""""#,
    r#""a\nb""#,
];
const MEMORY: &[&str] = &[r#""256M""#, "268435456", r#""1M""#, "0", r#""1G""#];
const CPUS: &[&str] = &["0.5", "1", "0", "2000", r#""1""#];
const RESTART: &[&str] = &[
    r#""no""#,
    r#""on-failure:3""#,
    r#""always""#,
    r#""sometimes""#,
];
const BOOLS: &[&str] = &["true", "false"];
const SIZES: &[&str] = &["[40, 120]", "[0, 80]", "[24]"];

/// A value of a pool (of JSON texts), or, one time in sixteen, any JSON.
#[derive(Debug)]
struct Pick<const POOL: u8>(Value);

fn pool(which: u8) -> &'static [&'static str] {
    match which {
        0 => NAMES,
        1 => ARGS,
        2 => ROOTFS,
        3 => ENV,
        4 => CWDS,
        5 => SOURCES,
        6 => MOUNT_PATHS,
        7 => USERS,
        8 => MEMORY,
        9 => CPUS,
        10 => RESTART,
        11 => BOOLS,
        _ => SIZES,
    }
}

impl<'a, const POOL: u8> Arbitrary<'a> for Pick<POOL> {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        if u.ratio(1, 16)? {
            return Ok(Pick(AnyJson::arbitrary(u)?.0));
        }
        let text = u.choose(pool(POOL))?;
        Ok(Pick(
            serde_json::from_str(text).expect("the pools are JSON"),
        ))
    }
}

/// A field that is usually there.
#[derive(Debug)]
struct Usual<T>(Option<T>);

/// A field that is usually absent.
#[derive(Debug)]
struct Rare<T>(Option<T>);

impl<'a, T: Arbitrary<'a>> Arbitrary<'a> for Usual<T> {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let absent = u.ratio(1, 16)?;
        Ok(Usual((!absent).then(|| T::arbitrary(u)).transpose()?))
    }
}

impl<'a, T: Arbitrary<'a>> Arbitrary<'a> for Rare<T> {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let present = u.ratio(1, 8)?;
        Ok(Rare(present.then(|| T::arbitrary(u)).transpose()?))
    }
}

#[derive(Arbitrary, Debug)]
struct Mount {
    source: Usual<Pick<5>>,
    path: Usual<Pick<6>>,
    readonly: Rare<Pick<11>>,
}

#[derive(Arbitrary, Debug)]
struct Process {
    name: Usual<Pick<0>>,
    argv: Usual<Vec<Pick<1>>>,
    rootfs: Usual<Pick<2>>,
    env: Rare<Vec<Pick<3>>>,
    cwd: Rare<Pick<4>>,
    mounts: Rare<Vec<Mount>>,
    user: Rare<Pick<7>>,
    memory: Rare<Pick<8>>,
    cpus: Rare<Pick<9>>,
    restart: Rare<Pick<10>>,
    init: Rare<Pick<11>>,
    tty: Rare<Pick<11>>,
    console_size: Rare<Pick<12>>,
    image: Rare<Text>,
    entrypoint: Rare<Vec<Text>>,
    /// A field cradle does not know.
    unknown: Rare<(Text, AnyJson)>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Which of [`VOLUMES`] and [`FILESYSTEMS`] the pod has, a bit each.
    volumes: u8,
    filesystems: u8,
    /// A process the pod started with: its name is then taken.
    running: bool,
    body: Process,
    damage: Rare<Damage>,
}

fn put<T: Into<Value>>(m: &mut Map<String, Value>, key: &str, value: Option<T>) {
    if let Some(value) = value {
        m.insert(key.into(), value.into());
    }
}

impl<const POOL: u8> From<Pick<POOL>> for Value {
    fn from(p: Pick<POOL>) -> Value {
        p.0
    }
}

fn list<T: Into<Value>>(list: Vec<T>) -> Value {
    Value::Array(list.into_iter().map(Into::into).collect())
}

fn process(p: Process) -> Value {
    let mut m = Map::new();
    put(&mut m, "name", p.name.0);
    put(&mut m, "argv", p.argv.0.map(list));
    put(&mut m, "rootfs", p.rootfs.0);
    put(&mut m, "env", p.env.0.map(list));
    put(&mut m, "cwd", p.cwd.0);
    let mounts = p.mounts.0.map(|mounts| {
        let mounts = mounts.into_iter().map(|mount| {
            let mut o = Map::new();
            put(&mut o, "source", mount.source.0);
            put(&mut o, "path", mount.path.0);
            put(&mut o, "readonly", mount.readonly.0);
            Value::Object(o)
        });
        Value::Array(mounts.collect())
    });
    put(&mut m, "mounts", mounts);
    put(&mut m, "user", p.user.0);
    put(&mut m, "memory", p.memory.0);
    put(&mut m, "cpus", p.cpus.0);
    put(&mut m, "restart", p.restart.0);
    put(&mut m, "init", p.init.0);
    put(&mut m, "tty", p.tty.0);
    put(&mut m, "console_size", p.console_size.0);
    put(&mut m, "image", p.image.0);
    put(&mut m, "entrypoint", p.entrypoint.0.map(list));
    if let Some((key, value)) = p.unknown.0 {
        m.insert(key.0, value.0);
    }
    Value::Object(m)
}

/// The pod the masks choose: valid by construction.
fn pod(volume_mask: u8, fs_mask: u8, running: bool) -> PodSpec {
    let volumes: Vec<Value> = VOLUMES
        .iter()
        .enumerate()
        .filter(|(i, _)| volume_mask & (1 << i) != 0)
        .map(|(_, (name, path))| match path {
            Some(path) => json!({"name": name, "path": path}),
            None => json!({ "name": name }),
        })
        .collect();
    let filesystems: Vec<Value> = FILESYSTEMS
        .iter()
        .enumerate()
        .filter(|(i, _)| fs_mask & (1 << i) != 0)
        .map(|(_, (tag, path))| json!({"tag": tag, "path": path}))
        .collect();
    let mut spec = json!({
        "name": "sandbox",
        "volumes": volumes,
        "filesystems": filesystems,
        "lifetime": "until-shutdown",
    });
    if running {
        spec["processes"] = json!([{"name": "container", "argv": ["/pause"]}]);
    }
    let bytes = serde_json::to_vec(&spec).expect("JSON");
    PodSpec::from_json(&bytes).unwrap_or_else(|e| panic!("the harness's pod is valid: {e:?}"))
}

/// What cradle's handler and registry check, then the invariants of an accepted process.
fn check(pod: &PodSpec, body: &[u8]) {
    let index = pod.processes.len();
    let at = format!("processes[{index}]");
    let Ok(process) = PodSpec::process_from_json(body, &at) else {
        return;
    };
    if process.image.is_some() {
        // The registry refuses image processes (their layers are resolved before boot).
        return;
    }
    if pod.validate_process(index, &process).is_err() {
        return;
    }

    if let Some(rootfs) = &process.rootfs {
        let (tag, _) = pod.split_rootfs(rootfs);
        let fs = pod
            .filesystems
            .iter()
            .find(|fs| fs.tag == tag)
            .unwrap_or_else(|| panic!("rootfs {rootfs:?} accepted without its filesystem"));
        let path = pod
            .rootfs_path(rootfs)
            .unwrap_or_else(|| panic!("rootfs {rootfs:?} accepted without a path"));
        let below = path
            .strip_prefix(&fs.path)
            .unwrap_or_else(|_| panic!("rootfs {rootfs:?} is {path:?}, outside {:?}", fs.path));
        assert!(
            below
                .components()
                .all(|c| matches!(c, Component::Normal(_))),
            "rootfs {rootfs:?} is {path:?}: not plain below {:?}",
            fs.path
        );
        assert_eq!(
            pod.rootfs_mount(rootfs).map(Path::new),
            Some(Path::new(&fs.path)),
            "the mount cradle bounds rootfs {rootfs:?} by is not its filesystem's"
        );
    }
    for mount in &process.mounts {
        assert!(pod.mount_source(&mount.source).is_some(), "{mount:?}");
    }

    let again = serde_json::to_vec(&process).expect("a process serializes");
    let reparsed: ProcessSpec =
        PodSpec::process_from_json(&again, &at).expect("a serialized process parses");
    assert_eq!(reparsed, process, "the round trip changed the process");

    if pod.processes.iter().all(|p| p.name != process.name) {
        let mut whole = pod.clone();
        whole.processes.push(process);
        if let Err(e) = whole.validate() {
            panic!("a process added at run time makes a pod that does not validate: {e:?}");
        }
    }
}

/// The pod of a raw body: the shim's (its launch file's pod, the sandbox's container
/// running), with a volume and another share.
const SHIM_POD: &str = r#"{"name": "c-0123456789abcdef", "volumes": [{"name": "data", "path": "/data"}],
    "filesystems": [{"tag": "rootfs", "path": "/run/rootfs"}, {"tag": "gfs", "path": "/shared"}],
    "processes": [{"name": "container", "rootfs": "rootfs/container", "argv": ["/pause"], "cwd": "/", "user": "0:0"}],
    "lifetime": "until-shutdown"}"#;

fuzz_target!(|data: &[u8]| {
    // The first byte chooses: even, the rest is the body as is, added to the shim's pod;
    // odd, a structured pod and body.
    match data.split_first() {
        Some((mode, rest)) if mode % 2 == 0 => {
            let pod = PodSpec::from_json(SHIM_POD.as_bytes()).expect("the shim's pod is valid");
            check(&pod, rest);
        }
        Some((_, rest)) => {
            let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(rest)) else {
                return;
            };
            let pod = pod(input.volumes, input.filesystems, input.running);
            let body = process(input.body);
            let body = match input.damage.0 {
                Some(damage) => damage.apply(&body),
                None => serde_json::to_vec(&body).expect("JSON"),
            };
            check(&pod, &body);
        }
        None => {}
    }
});
