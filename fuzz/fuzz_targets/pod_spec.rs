//! Fuzzes the pod spec parser and validator (`initramfs::podspec::PodSpec::from_json`), which
//! both the host (`crib pod run`) and cradle in the guest run on untrusted JSON.
//!
//! Inputs are either raw bytes or a structured spec: an object with the spec's fields, each
//! absent, drawn from pools of plausible names, paths and tags, or any JSON, and the
//! serialized document sometimes damaged. Invariant: `from_json` returns an error or a spec
//! that validates again and survives a round trip (serialized and parsed back, it is equal);
//! no input panics.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use crib_fuzz::json::{AnyJson, Damage, Field, Number, Text};
use initramfs::podspec::PodSpec;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

#[derive(Arbitrary, Debug)]
struct Volume {
    name: Field<Text>,
    path: Field<Text>,
    fs: Field<Text>,
    readonly: Field<bool>,
    nvme_serial: Field<Text>,
    nvme_nsid: Field<Number>,
}

#[derive(Arbitrary, Debug)]
struct Filesystem {
    tag: Field<Text>,
    path: Field<Text>,
    readonly: Field<bool>,
}

#[derive(Arbitrary, Debug)]
struct Process {
    name: Field<Text>,
    argv: Option<Vec<Text>>,
    env: Option<Vec<Text>>,
    cwd: Field<Text>,
}

#[derive(Arbitrary, Debug)]
struct Spec {
    name: Field<Text>,
    volumes: Option<Vec<Volume>>,
    filesystems: Option<Vec<Filesystem>>,
    processes: Option<Vec<Process>>,
    lifetime: Field<Text>,
    extra: Option<(Text, AnyJson)>,
}

fn strings(list: Option<Vec<Text>>, map: &mut Map<String, Value>, key: &str) {
    if let Some(list) = list {
        map.insert(key.into(), list.into_iter().map(Value::from).collect());
    }
}

fn objects<T>(list: Option<Vec<T>>, map: &mut Map<String, Value>, key: &str, f: fn(T) -> Value) {
    if let Some(list) = list {
        map.insert(key.into(), list.into_iter().map(f).collect());
    }
}

fn volume(v: Volume) -> Value {
    let mut m = Map::new();
    v.name.put(&mut m, "name");
    v.path.put(&mut m, "path");
    v.fs.put(&mut m, "fs");
    v.readonly.put(&mut m, "readonly");
    v.nvme_serial.put(&mut m, "nvme_serial");
    v.nvme_nsid.put(&mut m, "nvme_nsid");
    Value::Object(m)
}

fn filesystem(f: Filesystem) -> Value {
    let mut m = Map::new();
    f.tag.put(&mut m, "tag");
    f.path.put(&mut m, "path");
    f.readonly.put(&mut m, "readonly");
    Value::Object(m)
}

fn process(p: Process) -> Value {
    let mut m = Map::new();
    p.name.put(&mut m, "name");
    strings(p.argv, &mut m, "argv");
    strings(p.env, &mut m, "env");
    p.cwd.put(&mut m, "cwd");
    Value::Object(m)
}

fn document(spec: Spec) -> Value {
    let mut m = Map::new();
    spec.name.put(&mut m, "name");
    objects(spec.volumes, &mut m, "volumes", volume);
    objects(spec.filesystems, &mut m, "filesystems", filesystem);
    objects(spec.processes, &mut m, "processes", process);
    spec.lifetime.put(&mut m, "lifetime");
    if let Some((key, value)) = spec.extra {
        m.insert(key.0, value.0);
    }
    Value::Object(m)
}

fuzz_target!(|data: &[u8]| {
    // The first byte chooses: even, the rest is the file as is; odd, a structured document.
    let bytes = match data.split_first() {
        Some((mode, rest)) if mode % 2 == 0 => rest.to_vec(),
        Some((_, rest)) => match <(Spec, Damage)>::arbitrary_take_rest(Unstructured::new(rest)) {
            Ok((doc, damage)) => damage.apply(&document(doc)),
            Err(_) => return,
        },
        None => return,
    };
    let Ok(spec) = PodSpec::from_json(&bytes) else {
        return;
    };
    spec.validate().expect("a parsed spec validates again");
    let again = serde_json::to_vec(&spec).expect("a spec serializes");
    let reparsed = PodSpec::from_json(&again).expect("a serialized spec parses");
    assert_eq!(reparsed, spec, "the round trip changed the spec");
});
