//! Fuzzes `crib pod run`'s launch file (`vmm::pod::LaunchFile::from_json`): JSON naming a pod
//! spec and the disks, shares, vCPUs and memory the host gives it, then `Launch::prepare`,
//! which turns it into the VM config `crib run` would use.
//!
//! Inputs are either raw bytes or a structured launch file: a pod spec with volumes and
//! filesystems, and disks and shares keyed by names drawn from the same small pool (so they
//! often match), each field absent, plausible or any JSON, the document sometimes damaged.
//! Invariant: `from_json` returns an error or a launch whose `prepare` returns an error or a
//! valid VM config (it validates again); no input panics.

#![no_main]

use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};
use crib_fuzz::json::{AnyJson, Damage, Field, Number, Text};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use vmm::config::Origin;
use vmm::pod::LaunchFile;

/// Volume, disk, filesystem and share names: few, so they meet.
const NAMES: &[&str] = &["data", "logs", "db-1", "tag0", "", "Bad Name"];

#[derive(Arbitrary, Debug)]
struct Name(u8);

impl Name {
    fn get(&self) -> String {
        NAMES[usize::from(self.0) % NAMES.len()].to_string()
    }
}

#[derive(Arbitrary, Debug)]
struct Volume {
    name: Name,
    path: Field<Text>,
    nvme_serial: Field<Text>,
}

#[derive(Arbitrary, Debug)]
struct Share {
    tag: Name,
    path: Field<Text>,
}

#[derive(Arbitrary, Debug)]
struct Disk {
    name: Name,
    path: Field<Text>,
    readonly: Field<bool>,
    queues: Field<Number>,
    queue_size: Field<Number>,
    iops: Field<Text>,
}

#[derive(Arbitrary, Debug)]
struct HostShare {
    tag: Name,
    dir: Field<Text>,
    socket: Field<Text>,
    queues: Field<Number>,
}

#[derive(Arbitrary, Debug)]
struct Launch {
    pod_name: Field<Text>,
    volumes: Vec<Volume>,
    filesystems: Vec<Share>,
    process_argv: Option<Vec<Text>>,
    kernel: Field<Text>,
    initrd: Field<Text>,
    cpus: Field<Number>,
    memory: Field<Text>,
    console: Field<Text>,
    run_dir: Field<Text>,
    disks: Vec<Disk>,
    shares: Vec<HostShare>,
    vfio: Option<Vec<Text>>,
    extra: Option<(Text, AnyJson)>,
}

fn document(l: Launch) -> Value {
    let mut pod = Map::new();
    l.pod_name.put(&mut pod, "name");
    let volumes: Vec<Value> = l
        .volumes
        .into_iter()
        .map(|v| {
            let mut m = Map::new();
            m.insert("name".into(), v.name.get().into());
            v.path.put(&mut m, "path");
            v.nvme_serial.put(&mut m, "nvme_serial");
            Value::Object(m)
        })
        .collect();
    pod.insert("volumes".into(), volumes.into());
    let filesystems: Vec<Value> = l
        .filesystems
        .into_iter()
        .map(|f| {
            let mut m = Map::new();
            m.insert("tag".into(), f.tag.get().into());
            f.path.put(&mut m, "path");
            Value::Object(m)
        })
        .collect();
    pod.insert("filesystems".into(), filesystems.into());
    if let Some(argv) = l.process_argv {
        let argv: Vec<Value> = argv.into_iter().map(Value::from).collect();
        pod.insert(
            "processes".into(),
            serde_json::json!([{ "name": "main", "argv": argv }]),
        );
    }

    let mut m = Map::new();
    m.insert("pod".into(), Value::Object(pod));
    l.kernel.put(&mut m, "kernel");
    l.initrd.put(&mut m, "initrd");
    l.cpus.put(&mut m, "cpus");
    l.memory.put(&mut m, "memory");
    l.console.put(&mut m, "console");
    l.run_dir.put(&mut m, "run_dir");
    let mut disks = Map::new();
    for d in l.disks {
        let mut o = Map::new();
        d.path.put(&mut o, "path");
        d.readonly.put(&mut o, "readonly");
        d.queues.put(&mut o, "queues");
        d.queue_size.put(&mut o, "queue_size");
        d.iops.put(&mut o, "iops");
        disks.insert(d.name.get(), Value::Object(o));
    }
    m.insert("disks".into(), Value::Object(disks));
    let mut shares = Map::new();
    for s in l.shares {
        let mut o = Map::new();
        s.dir.put(&mut o, "dir");
        s.socket.put(&mut o, "socket");
        s.queues.put(&mut o, "queues");
        shares.insert(s.tag.get(), Value::Object(o));
    }
    m.insert("shares".into(), Value::Object(shares));
    if let Some(list) = l.vfio {
        m.insert("vfio".into(), list.into_iter().map(Value::from).collect());
    }
    if let Some((key, value)) = l.extra {
        m.insert(key.0, value.0);
    }
    Value::Object(m)
}

fuzz_target!(|data: &[u8]| {
    // The first byte chooses: even, the rest is the file as is; odd, a structured document.
    let bytes = match data.split_first() {
        Some((mode, rest)) if mode % 2 == 0 => rest.to_vec(),
        Some((_, rest)) => match <(Launch, Damage)>::arbitrary_take_rest(Unstructured::new(rest)) {
            Ok((doc, damage)) => damage.apply(&document(doc)),
            Err(_) => return,
        },
        None => return,
    };
    let Ok(launch) = LaunchFile::from_json(&bytes, Path::new("/fuzz/pod.json")) else {
        return;
    };
    let Ok(prepared) = launch.prepare(Path::new("/run/crib"), Path::new("/guest")) else {
        return;
    };
    prepared
        .config
        .clone()
        .validate(Origin::File)
        .expect("a prepared pod's config validates again");
});
