//! Fuzzes the VM config file (`crib run --config FILE`, `vmm::config::VmConfig::from_json`):
//! JSON from a file the user names, checked by the same functions as the command line.
//!
//! Inputs are either raw bytes or a structured config: an object with the config's fields
//! (disks, vsock, fs, net, vfio...), each absent, drawn from pools of plausible paths, sizes,
//! tags and addresses, or any JSON, and the serialized document sometimes damaged.
//! Invariant: `from_json` returns an error or a config that survives a round trip (the
//! config file `crib config --print` would write parses back to an equal config); no input
//! panics.

#![no_main]

use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};
use crib_fuzz::json::{AnyJson, Damage, Field, Number, Text};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use vmm::config::VmConfig;

#[derive(Arbitrary, Debug)]
struct Disk {
    path: Field<Text>,
    id: Field<Text>,
    readonly: Field<bool>,
    direct: Field<bool>,
    queues: Field<Number>,
    queue_size: Field<Number>,
    iops: Field<Text>,
    bandwidth: Field<Number>,
    burst: Field<Text>,
    iops_burst: Field<Number>,
}

#[derive(Arbitrary, Debug)]
struct Vsock {
    cid: Field<Number>,
    socket: Field<Text>,
}

#[derive(Arbitrary, Debug)]
struct Fs {
    tag: Field<Text>,
    socket: Field<Text>,
    dir: Field<Text>,
    queues: Field<Number>,
    queue_size: Field<Number>,
}

#[derive(Arbitrary, Debug)]
struct Net {
    tap: Field<Text>,
    ifname: Field<Text>,
    mac: Field<Text>,
    queues: Field<Number>,
    bandwidth: Field<Text>,
    ops: Field<Number>,
}

#[derive(Arbitrary, Debug)]
struct Config {
    id: Field<Text>,
    kernel: Field<Text>,
    initrd: Field<Text>,
    cmdline: Field<Text>,
    cpus: Field<Number>,
    memory: Field<Text>,
    console: Field<Text>,
    disks: Option<Vec<Disk>>,
    vsock: Option<Vsock>,
    fs: Option<Vec<Fs>>,
    net: Option<Vec<Net>>,
    vfio: Option<Vec<Text>>,
    docker_socket: Field<Text>,
    pod: Field<Text>,
    api_socket: Field<Text>,
    seccomp: Field<bool>,
    extra: Option<(Text, AnyJson)>,
}

fn disk(d: Disk) -> Value {
    let mut m = Map::new();
    d.path.put(&mut m, "path");
    d.id.put(&mut m, "id");
    d.readonly.put(&mut m, "readonly");
    d.direct.put(&mut m, "direct");
    d.queues.put(&mut m, "queues");
    d.queue_size.put(&mut m, "queue_size");
    d.iops.put(&mut m, "iops");
    d.bandwidth.put(&mut m, "bandwidth");
    d.burst.put(&mut m, "burst");
    d.iops_burst.put(&mut m, "iops_burst");
    Value::Object(m)
}

fn fs(f: Fs) -> Value {
    let mut m = Map::new();
    f.tag.put(&mut m, "tag");
    f.socket.put(&mut m, "socket");
    f.dir.put(&mut m, "dir");
    f.queues.put(&mut m, "queues");
    f.queue_size.put(&mut m, "queue_size");
    Value::Object(m)
}

fn net(n: Net) -> Value {
    let mut m = Map::new();
    n.tap.put(&mut m, "tap");
    n.ifname.put(&mut m, "ifname");
    n.mac.put(&mut m, "mac");
    n.queues.put(&mut m, "queues");
    n.bandwidth.put(&mut m, "bandwidth");
    n.ops.put(&mut m, "ops");
    Value::Object(m)
}

fn document(c: Config) -> Value {
    let mut m = Map::new();
    c.id.put(&mut m, "id");
    c.kernel.put(&mut m, "kernel");
    c.initrd.put(&mut m, "initrd");
    c.cmdline.put(&mut m, "cmdline");
    c.cpus.put(&mut m, "cpus");
    c.memory.put(&mut m, "memory");
    c.console.put(&mut m, "console");
    if let Some(disks) = c.disks {
        m.insert("disks".into(), disks.into_iter().map(disk).collect());
    }
    if let Some(v) = c.vsock {
        let mut o = Map::new();
        v.cid.put(&mut o, "cid");
        v.socket.put(&mut o, "socket");
        m.insert("vsock".into(), Value::Object(o));
    }
    if let Some(list) = c.fs {
        m.insert("fs".into(), list.into_iter().map(fs).collect());
    }
    if let Some(list) = c.net {
        m.insert("net".into(), list.into_iter().map(net).collect());
    }
    if let Some(list) = c.vfio {
        m.insert("vfio".into(), list.into_iter().map(Value::from).collect());
    }
    c.docker_socket.put(&mut m, "docker_socket");
    c.pod.put(&mut m, "pod");
    c.api_socket.put(&mut m, "api_socket");
    c.seccomp.put(&mut m, "seccomp");
    if let Some((key, value)) = c.extra {
        m.insert(key.0, value.0);
    }
    Value::Object(m)
}

fuzz_target!(|data: &[u8]| {
    // The first byte chooses: even, the rest is the file as is; odd, a structured document.
    let bytes = match data.split_first() {
        Some((mode, rest)) if mode % 2 == 0 => rest.to_vec(),
        Some((_, rest)) => match <(Config, Damage)>::arbitrary_take_rest(Unstructured::new(rest)) {
            Ok((doc, damage)) => damage.apply(&document(doc)),
            Err(_) => return,
        },
        None => return,
    };
    let path = Path::new("/fuzz/vm.json");
    let Ok(config) = VmConfig::from_json(&bytes, path) else {
        return;
    };
    let again = serde_json::to_vec(&config).expect("a config serializes");
    let reparsed = match VmConfig::from_json(&again, path) {
        Ok(c) => c,
        Err(e) => panic!(
            "the config file of a valid config does not parse: {e:?}\n{}",
            String::from_utf8_lossy(&again)
        ),
    };
    assert_eq!(reparsed, config, "the round trip changed the config");
});
