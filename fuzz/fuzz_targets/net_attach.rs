//! Fuzzes podnet's attach mode (`podnet::attach`): what `ip -j addr show dev eth0`,
//! `ip -j -4/-6 route show default` and `tc -j filter show dev eth0 ingress` print inside
//! the network namespace a pod's CNI plugins built (`parse_interface`,
//! `parse_default_gateway`, `classify_filters`), and `state_from`, which checks the
//! interface and makes the guest's network of it; resolv.conf's nameservers
//! (`config::host_nameservers`) with it.
//!
//! Inputs are either raw bytes (up to four documents separated by 0xff bytes, which JSON
//! text never holds: addresses, IPv4 routes, IPv6 routes, filters) or structured outputs:
//! links with addresses, routes and filters whose fields are absent, drawn from pools of
//! the values `ip` and `tc` print, or any JSON, each document sometimes damaged.
//! Invariants: no input panics; a parsed interface has prefix lengths in range and a
//! lowercase MAC; filters classified as crib's redirect only to the pod's tap (or a gone
//! device); an accepted interface gives a state with an MTU pods support, whose
//! `info.json` round trip is exact and whose guest network (`vmm::pod_net::guest_network`)
//! is a valid pod spec `network` for cradle.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};
use crib_fuzz::json::{AnyJson, Damage, Field, Number, Text};
use initramfs::podspec::PodSpec;
use libfuzzer_sys::fuzz_target;
use podnet::attach::{self, AttachState, IngressFilters};
use podnet::config::{host_nameservers, MAX_MTU, MIN_MTU};
use podnet::AttachPlan;
use serde_json::{json, Map, Value};
use vmm::pod_net::{guest_network, NetworkState};

const INTERFACE: &str = "eth0";
const RUN_DIR: &str = "/run/crib/web";
/// Stands for the pod's tap (`ident::tap_name(RUN_DIR)`) in [`WORDS`].
const TAP: &str = "@tap";

/// What `ip -j` and `tc -j` print: names, kinds, families, scopes, addresses.
const WORDS: &[&str] = &[
    INTERFACE,
    "eth1",
    "lo",
    TAP,
    "crib5e6f7a8b",
    "*",
    "",
    "ether",
    "loopback",
    "none",
    "ipip",
    "inet",
    "inet6",
    "global",
    "link",
    "host",
    "default",
    "10.99.0.0/24",
    "10.99.0.2",
    "10.99.0.1",
    "192.0.2.1",
    "0.0.0.0",
    "255.255.255.255",
    "224.0.0.1",
    "256.1.1.1",
    "fd00:99::2",
    "fd00:99::1",
    "fe80::1",
    "::",
    "::ffff:10.0.0.1",
    "fe80::1%eth0",
    "02:AA:bb:cc:dd:ee",
    "00:00:00:00:00:00",
    "ff:ff:ff:ff:ff:ff",
    "zz",
    "matchall",
    "u32",
    "flower",
    "bpf",
    "mirred",
    "gact",
    "redirect",
    "mirror",
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
            Word::Pool(i) => match WORDS[usize::from(i) % WORDS.len()] {
                TAP => podnet::ident::tap_name(Path::new(RUN_DIR)).into(),
                word => word.into(),
            },
            Word::Text(t) => t.into(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Addr {
    family: Field<Word>,
    local: Field<Word>,
    prefixlen: Field<Number>,
    scope: Field<Word>,
    extra: Option<(Text, AnyJson)>,
}

#[derive(Arbitrary, Debug)]
struct Link {
    ifname: Field<Word>,
    link_type: Field<Word>,
    address: Field<Word>,
    mtu: Field<Number>,
    addr_info: Option<Vec<Addr>>,
    extra: Option<(Text, AnyJson)>,
}

#[derive(Arbitrary, Debug)]
struct Route {
    dst: Field<Word>,
    gateway: Field<Word>,
    dev: Field<Word>,
    extra: Option<(Text, AnyJson)>,
}

#[derive(Arbitrary, Debug)]
struct Action {
    kind: Field<Word>,
    mirred_action: Field<Word>,
    to_dev: Field<Word>,
}

#[derive(Arbitrary, Debug)]
struct Filter {
    kind: Field<Word>,
    /// `options`: absent (the line naming the filter), or with a hash table and actions.
    options: Option<(Option<Number>, Option<Vec<Action>>)>,
}

/// A document: structured, or any JSON.
#[derive(Arbitrary, Debug)]
enum Doc<T> {
    List(Vec<T>),
    Any(AnyJson),
}

#[derive(Arbitrary, Debug)]
struct Input {
    links: Doc<Link>,
    routes4: Doc<Route>,
    routes6: Doc<Route>,
    filters: Doc<Filter>,
    /// The launch file's nameservers (`None`: resolv.conf's).
    dns: Option<Vec<IpAddr>>,
    resolv_conf: Text,
    damage: (u8, Damage),
}

fn object(build: impl FnOnce(&mut Map<String, Value>)) -> Value {
    let mut m = Map::new();
    build(&mut m);
    Value::Object(m)
}

fn extra(m: &mut Map<String, Value>, extra: Option<(Text, AnyJson)>) {
    if let Some((key, value)) = extra {
        m.insert(key.0, value.0);
    }
}

fn link(l: Link) -> Value {
    object(|m| {
        l.ifname.put(m, "ifname");
        l.link_type.put(m, "link_type");
        l.address.put(m, "address");
        l.mtu.put(m, "mtu");
        if let Some(addrs) = l.addr_info {
            let list = addrs
                .into_iter()
                .map(|a| {
                    object(|o| {
                        a.family.put(o, "family");
                        a.local.put(o, "local");
                        a.prefixlen.put(o, "prefixlen");
                        a.scope.put(o, "scope");
                        extra(o, a.extra);
                    })
                })
                .collect();
            m.insert("addr_info".into(), Value::Array(list));
        }
        extra(m, l.extra);
    })
}

fn route(r: Route) -> Value {
    object(|m| {
        r.dst.put(m, "dst");
        r.gateway.put(m, "gateway");
        r.dev.put(m, "dev");
        m.insert("flags".into(), json!([]));
        extra(m, r.extra);
    })
}

fn filter(f: Filter) -> Value {
    object(|m| {
        m.insert("protocol".into(), "all".into());
        m.insert("pref".into(), 1.into());
        f.kind.put(m, "kind");
        if let Some((divisor, actions)) = f.options {
            let options = object(|o| {
                if let Some(divisor) = divisor {
                    o.insert("ht_divisor".into(), divisor.into());
                }
                if let Some(actions) = actions {
                    let list = actions
                        .into_iter()
                        .map(|a| {
                            object(|x| {
                                a.kind.put(x, "kind");
                                a.mirred_action.put(x, "mirred_action");
                                a.to_dev.put(x, "to_dev");
                            })
                        })
                        .collect();
                    o.insert("actions".into(), Value::Array(list));
                }
            });
            m.insert("options".into(), options);
        }
    })
}

fn document<T>(doc: Doc<T>, f: fn(T) -> Value) -> Value {
    match doc {
        Doc::List(list) => Value::Array(list.into_iter().map(f).collect()),
        Doc::Any(any) => any.0,
    }
}

/// A `tc` document's filters classified as crib's: each action is a mirred redirect to
/// the pod's tap or to a gone device.
fn check_crib_filters(json: &str, tap: &str) {
    let Ok(Value::Array(filters)) = serde_json::from_str::<Value>(json) else {
        return;
    };
    let actions = filters
        .iter()
        .filter_map(|f| f.get("options")?.get("actions")?.as_array())
        .flatten();
    for action in actions {
        let to = action.get("to_dev").and_then(Value::as_str);
        assert!(
            action.get("kind").and_then(Value::as_str) == Some("mirred")
                && action.get("mirred_action").and_then(Value::as_str) == Some("redirect")
                && (to == Some(tap) || to == Some("*")),
            "a filter that is not crib's redirect was taken for crib's: {action}"
        );
    }
}

fn check(docs: [&str; 4], dns: Option<Vec<IpAddr>>, resolv_conf: &str) {
    let [addrs, routes4, routes6, filters] = docs;
    let tap = podnet::ident::tap_name(Path::new(RUN_DIR));
    if let Ok(IngressFilters::Crib) = attach::classify_filters(filters, &tap, "tc") {
        check_crib_filters(filters, &tap);
    }
    let gateway = attach::parse_default_gateway::<Ipv4Addr>(routes4, INTERFACE, "ip -4");
    let gateway6 = attach::parse_default_gateway::<Ipv6Addr>(routes6, INTERFACE, "ip -6");
    let Ok(info) = attach::parse_interface(addrs, "ip") else {
        return;
    };
    assert!(info.ipv4.is_none_or(|(_, len)| len <= 32), "{info:?}");
    assert!(info.ipv6.is_none_or(|(_, len)| len <= 128), "{info:?}");
    assert_eq!(info.mac, info.mac.to_ascii_lowercase());

    let plan = AttachPlan {
        interface: INTERFACE.into(),
        dns,
        search: vec!["svc.cluster.local".into()],
    };
    let state = attach::state_from(
        "web",
        Path::new(RUN_DIR),
        &plan,
        &info,
        gateway.ok().flatten(),
        gateway6.ok().flatten(),
        || host_nameservers(resolv_conf),
    );
    let Ok(state) = state else {
        return;
    };
    assert!((MIN_MTU..=MAX_MTU).contains(&state.mtu), "{state:?}");
    assert_eq!(state.address6.is_some(), state.prefix6_len.is_some());
    assert!(state.gateway6.is_none() || state.address6.is_some());
    let info_json = serde_json::to_vec(&state).expect("a state serializes");
    let back: AttachState = serde_json::from_slice(&info_json).expect("info.json parses back");
    assert_eq!(back, state, "info.json's round trip changed the state");

    let network = guest_network(&NetworkState::Attach(state));
    let spec = serde_json::to_vec(&json!({"name": "web", "network": network})).expect("JSON");
    if let Err(e) = PodSpec::from_json(&spec) {
        panic!("cradle refuses the network of an attached interface: {e:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte chooses: even, the rest is the tools' output as is; odd, structured.
    match data.split_first() {
        Some((mode, rest)) if mode % 2 == 0 => {
            let mut parts = rest.split(|b| *b == 0xff).map(String::from_utf8_lossy);
            let mut next = || parts.next().unwrap_or_default();
            let docs = [next(), next(), next(), next()];
            check(
                [&docs[0], &docs[1], &docs[2], &docs[3]],
                None,
                "nameserver 192.0.2.53\nnameserver 127.0.0.53\n",
            );
        }
        Some((_, rest)) => {
            let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(rest)) else {
                return;
            };
            let values = [
                document(input.links, link),
                document(input.routes4, route),
                document(input.routes6, route),
                document(input.filters, filter),
            ];
            // The damage hits one document; the others are as serialized.
            let (which, damage) = input.damage;
            let mut docs: [String; 4] = std::array::from_fn(|i| values[i].to_string());
            let hit = usize::from(which) % docs.len();
            docs[hit] = String::from_utf8_lossy(&damage.apply(&values[hit])).into_owned();
            check(
                [&docs[0], &docs[1], &docs[2], &docs[3]],
                input.dns,
                &input.resolv_conf.0,
            );
        }
        None => {}
    }
});
