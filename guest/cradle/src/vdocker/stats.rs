//! `GET /containers/{id}/stats`: Docker's stats JSON (API 1.47, the fields a cgroup v2
//! host fills: `read`, `cpu_stats`, `precpu_stats`, `memory_stats`, `pids_stats`,
//! `blkio_stats`) from the container's cgroup ([`crate::containers::stats`]), plus crib's
//! `cgroup2` object with the kernel's own numbers (containerd's shim turns those into its
//! cgroup v2 metrics). `stream=false` (or `one-shot=1`) answers one object; otherwise a
//! line per second until the client goes, each with the previous sample's CPU numbers as
//! `precpu_stats`, as Docker does.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::containers::Container;
use super::routing::Query;
use super::server::{self, ResponseBody};
use super::time::{rfc3339_nanos, ZERO_TIME};
use crate::containers::stats::{self, CgroupStats};

/// Between two samples of a stream.
const STREAM_INTERVAL_MS: u64 = 1000;
/// `/proc/stat`'s unit (USER_HZ): 100 on every architecture Linux exposes it for
/// userspace ABI, which is why Docker can assume it too.
const USER_HZ: u64 = 100;

/// The machine-wide numbers a sample carries next to the container's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostSample {
    pub system_cpu_ns: u64,
    pub online_cpus: u64,
    pub mem_total_bytes: u64,
}

impl HostSample {
    /// Reads `/proc/stat` and `/proc/meminfo`.
    fn read() -> Self {
        let proc_stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            system_cpu_ns: stats::system_cpu_ns(&proc_stat, USER_HZ).unwrap_or(0),
            online_cpus: std::thread::available_parallelism()
                .map_or(1, |n| u64::try_from(n.get()).unwrap_or(1)),
            mem_total_bytes: stats::mem_total_bytes(&meminfo).unwrap_or(0),
        }
    }
}

/// Docker's `cpu_stats` from a cgroup's `cpu.stat` (microseconds there, nanoseconds
/// here) and the host's numbers.
pub fn cpu_stats(cgroup: &CgroupStats, host: HostSample) -> Value {
    let usec = |key: &str| cgroup.cpu_stat.get(key).copied().unwrap_or(0);
    let ns = |key: &str| usec(key).saturating_mul(1000);
    json!({
        "cpu_usage": {
            "total_usage": ns("usage_usec"),
            "usage_in_kernelmode": ns("system_usec"),
            "usage_in_usermode": ns("user_usec"),
        },
        "system_cpu_usage": host.system_cpu_ns,
        "online_cpus": host.online_cpus,
        "throttling_data": {
            "periods": usec("nr_periods"),
            "throttled_periods": usec("nr_throttled"),
            "throttled_time": ns("throttled_usec"),
        },
    })
}

/// One stats object for `container`: `cgroup` is `None` for a container without a
/// cgroup (its numbers are zero and `cgroup2` is null); `pre` is the previous sample's
/// (`read`, `cpu_stats`) of a stream.
pub fn stats_json(
    container: &Container,
    cgroup: Option<&CgroupStats>,
    host: HostSample,
    now: SystemTime,
    pre: Option<(SystemTime, Value)>,
) -> Value {
    let zero = CgroupStats::default();
    let numbers = cgroup.unwrap_or(&zero);
    let pids = match numbers.pids_max {
        Some(limit) => json!({ "current": numbers.pids_current, "limit": limit }),
        None => json!({ "current": numbers.pids_current }),
    };
    let io: Vec<Value> = numbers
        .io_stat
        .iter()
        .flat_map(|device| {
            [("read", device.rbytes), ("write", device.wbytes)].map(|(op, value)| {
                json!({ "major": device.major, "minor": device.minor, "op": op, "value": value })
            })
        })
        .collect();
    let (preread, precpu) = match pre {
        Some((time, cpu)) => (rfc3339_nanos(time), cpu),
        None => (
            ZERO_TIME.to_owned(),
            cpu_stats(&zero, HostSample::default()),
        ),
    };
    json!({
        "name": format!("/{}", container.name),
        "id": container.id,
        "read": rfc3339_nanos(now),
        "preread": preread,
        "pids_stats": pids,
        "blkio_stats": {
            "io_service_bytes_recursive": io,
            "io_serviced_recursive": null,
            "io_queue_recursive": null,
            "io_service_time_recursive": null,
            "io_wait_time_recursive": null,
            "io_merged_recursive": null,
            "io_time_recursive": null,
            "sectors_recursive": null,
        },
        "num_procs": 0,
        "storage_stats": {},
        "cpu_stats": cpu_stats(numbers, host),
        "precpu_stats": precpu,
        "memory_stats": {
            "usage": numbers.memory_current,
            "limit": numbers.memory_max.unwrap_or(host.mem_total_bytes),
            "stats": numbers.memory_stat,
        },
        "cgroup2": cgroup,
    })
}

/// A sample of `container` now.
fn sample(container: &Container, pre: Option<(SystemTime, Value)>) -> Value {
    let cgroup = container.cgroup.as_deref().map(stats::read);
    stats_json(
        container,
        cgroup.as_ref(),
        HostSample::read(),
        SystemTime::now(),
        pre,
    )
}

/// Whether the query asks for one sample: `stream=false` (Docker's default is to
/// stream) or `one-shot=true`.
pub fn one_sample(query: &Query) -> bool {
    let stream = query.get("stream").is_none_or(|_| query.flag("stream"));
    !stream || query.flag("one-shot")
}

/// The response to `GET /containers/{id}/stats`.
pub fn respond(container: Arc<Container>, query: &Query) -> Response<ResponseBody> {
    if one_sample(query) {
        return server::json(StatusCode::OK, &sample(&container, None));
    }
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut pre = None;
        loop {
            let now = SystemTime::now();
            let value = sample(&container, pre.take());
            pre = value.get("cpu_stats").map(|cpu| (now, cpu.clone()));
            let mut line = value.to_string();
            line.push('\n');
            if tx.send(Bytes::from(line)).await.is_err() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(STREAM_INTERVAL_MS)) => {}
                () = tx.closed() => return,
            }
        }
    });
    server::streaming(StatusCode::OK, "application/json", rx)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::containers::stats::IoStat;
    use crate::vdocker::registry::testing::{registry, spec};

    fn host() -> HostSample {
        HostSample {
            system_cpu_ns: 5_000,
            online_cpus: 2,
            mem_total_bytes: 512 << 20,
        }
    }

    fn cgroup() -> CgroupStats {
        CgroupStats {
            cpu_stat: BTreeMap::from([
                ("usage_usec".to_owned(), 3),
                ("user_usec".to_owned(), 2),
                ("system_usec".to_owned(), 1),
            ]),
            memory_current: 4096,
            memory_max: Some(64 << 20),
            pids_current: 3,
            io_stat: vec![IoStat {
                major: 254,
                minor: 0,
                rbytes: 10,
                wbytes: 20,
                rios: 1,
                wios: 2,
            }],
            ..CgroupStats::default()
        }
    }

    #[test]
    fn stats_json_has_docker_fields_in_nanoseconds_and_the_cgroup2_extension() {
        let registry = registry(&[spec("c1", "exit 0")]);
        let container = registry.find("c1").unwrap();

        let value = stats_json(&container, Some(&cgroup()), host(), SystemTime::now(), None);

        assert_eq!(value["cpu_stats"]["cpu_usage"]["total_usage"], 3000);
        assert_eq!(value["cpu_stats"]["cpu_usage"]["usage_in_usermode"], 2000);
        assert_eq!(value["cpu_stats"]["online_cpus"], 2);
        assert_eq!(value["memory_stats"]["usage"], 4096);
        assert_eq!(value["memory_stats"]["limit"], 64 << 20);
        assert_eq!(value["pids_stats"]["current"], 3);
        assert!(value["pids_stats"].get("limit").is_none());
        assert_eq!(
            value["blkio_stats"]["io_service_bytes_recursive"][1]["op"],
            "write"
        );
        assert_eq!(
            value["blkio_stats"]["io_service_bytes_recursive"][1]["value"],
            20
        );
        assert_eq!(value["cgroup2"]["cpu.stat"]["usage_usec"], 3);
        assert_eq!(value["cgroup2"]["memory.max"], 64 << 20);
        assert_eq!(value["name"], "/c1");
        assert_eq!(value["preread"], ZERO_TIME);
    }

    #[test]
    fn stats_json_without_a_cgroup_is_zero_with_the_host_memory_as_limit() {
        let registry = registry(&[spec("c1", "exit 0")]);
        let container = registry.find("c1").unwrap();

        let value = stats_json(&container, None, host(), SystemTime::now(), None);

        assert!(value["cgroup2"].is_null());
        assert_eq!(value["memory_stats"]["limit"], 512 << 20);
        assert_eq!(value["cpu_stats"]["cpu_usage"]["total_usage"], 0);
    }

    #[test]
    fn one_sample_follows_stream_and_one_shot() {
        assert!(one_sample(&Query::parse(Some("stream=false"))));
        assert!(one_sample(&Query::parse(Some("stream=0"))));
        assert!(one_sample(&Query::parse(Some("one-shot=1"))));
        assert!(!one_sample(&Query::parse(None)));
        assert!(!one_sample(&Query::parse(Some("stream=1"))));
    }
}
