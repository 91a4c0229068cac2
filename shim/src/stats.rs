//! Stats: the container's cgroup v2 numbers, which cradle reads in the guest (the
//! `cgroup2` part of its `GET /containers/{name}/stats?stream=false` answer), in
//! containerd's format (`io.containerd.cgroups.v2.Metrics`, what runc's shim sends on a
//! cgroup v2 host). Pure, unit-tested.

use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use serde_json::Value;

/// The type URL containerd's `typeurl` gives cgroup v2 metrics.
pub const METRICS_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

fn number(value: &Value) -> u64 {
    value.as_u64().unwrap_or(0)
}

/// containerd's metrics from cradle's stats answer; a key cradle did not send is 0 (a
/// limit of `max` too, as runc's shim reports it).
pub fn metrics(stats: &Value) -> Metrics {
    let cgroup = &stats["cgroup2"];
    let cpu_stat = &cgroup["cpu.stat"];
    let memory_stat = &cgroup["memory.stat"];
    let mut metrics = Metrics::new();

    let mut pids = PidsStat::new();
    pids.current = number(&cgroup["pids.current"]);
    pids.limit = number(&cgroup["pids.max"]);
    metrics.pids = MessageField::some(pids);

    let mut cpu = CPUStat::new();
    cpu.usage_usec = number(&cpu_stat["usage_usec"]);
    cpu.user_usec = number(&cpu_stat["user_usec"]);
    cpu.system_usec = number(&cpu_stat["system_usec"]);
    cpu.nr_periods = number(&cpu_stat["nr_periods"]);
    cpu.nr_throttled = number(&cpu_stat["nr_throttled"]);
    cpu.throttled_usec = number(&cpu_stat["throttled_usec"]);
    cpu.nr_bursts = number(&cpu_stat["nr_bursts"]);
    cpu.burst_usec = number(&cpu_stat["burst_usec"]);
    metrics.cpu = MessageField::some(cpu);

    let mut memory = MemoryStat::new();
    let m = |key: &str| number(&memory_stat[key]);
    memory.anon = m("anon");
    memory.file = m("file");
    memory.kernel_stack = m("kernel_stack");
    memory.slab = m("slab");
    memory.sock = m("sock");
    memory.shmem = m("shmem");
    memory.file_mapped = m("file_mapped");
    memory.file_dirty = m("file_dirty");
    memory.file_writeback = m("file_writeback");
    memory.anon_thp = m("anon_thp");
    memory.inactive_anon = m("inactive_anon");
    memory.active_anon = m("active_anon");
    memory.inactive_file = m("inactive_file");
    memory.active_file = m("active_file");
    memory.unevictable = m("unevictable");
    memory.slab_reclaimable = m("slab_reclaimable");
    memory.slab_unreclaimable = m("slab_unreclaimable");
    memory.pgfault = m("pgfault");
    memory.pgmajfault = m("pgmajfault");
    memory.workingset_refault = m("workingset_refault");
    memory.workingset_activate = m("workingset_activate");
    memory.workingset_nodereclaim = m("workingset_nodereclaim");
    memory.pgrefill = m("pgrefill");
    memory.pgscan = m("pgscan");
    memory.pgsteal = m("pgsteal");
    memory.pgactivate = m("pgactivate");
    memory.pgdeactivate = m("pgdeactivate");
    memory.pglazyfree = m("pglazyfree");
    memory.pglazyfreed = m("pglazyfreed");
    memory.thp_fault_alloc = m("thp_fault_alloc");
    memory.thp_collapse_alloc = m("thp_collapse_alloc");
    memory.usage = number(&cgroup["memory.current"]);
    memory.usage_limit = number(&cgroup["memory.max"]);
    memory.swap_usage = number(&cgroup["memory.swap.current"]);
    memory.swap_limit = number(&cgroup["memory.swap.max"]);
    metrics.memory = MessageField::some(memory);

    let mut io = IOStat::new();
    for entry in cgroup["io.stat"].as_array().into_iter().flatten() {
        let mut usage = IOEntry::new();
        usage.major = number(&entry["major"]);
        usage.minor = number(&entry["minor"]);
        usage.rbytes = number(&entry["rbytes"]);
        usage.wbytes = number(&entry["wbytes"]);
        usage.rios = number(&entry["rios"]);
        usage.wios = number(&entry["wios"]);
        io.usage.push(usage);
    }
    metrics.io = MessageField::some(io);
    metrics
}

/// The metrics as the `Any` of a StatsResponse.
pub fn packed(metrics: &Metrics) -> Result<Any, containerd_shim::protos::protobuf::Error> {
    let mut any = Any::new();
    any.type_url = METRICS_TYPE_URL.to_owned();
    any.value = metrics.write_to_bytes()?;
    Ok(any)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cgroup_numbers_land_in_containerds_fields() {
        let stats = json!({
            "cgroup2": {
                "cpu.stat": {"usage_usec": 1500, "user_usec": 1000, "system_usec": 500,
                             "nr_periods": 3, "nr_throttled": 1, "throttled_usec": 20},
                "memory.stat": {"anon": 4096, "file": 8192, "pgfault": 77},
                "memory.current": 12288,
                "memory.max": 67108864,
                "pids.current": 2,
                "pids.max": null,
                "io.stat": [{"major": 254, "minor": 0, "rbytes": 10, "wbytes": 20, "rios": 1, "wios": 2}]
            }
        });
        let m = metrics(&stats);
        assert_eq!(
            (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.nr_throttled),
            (1500, 1000, 1)
        );
        assert_eq!(
            (m.memory.anon, m.memory.file, m.memory.pgfault),
            (4096, 8192, 77)
        );
        assert_eq!((m.memory.usage, m.memory.usage_limit), (12288, 64 << 20));
        assert_eq!((m.pids.current, m.pids.limit), (2, 0));
        assert_eq!(m.io.usage.len(), 1);
        assert_eq!((m.io.usage[0].major, m.io.usage[0].wbytes), (254, 20));
    }

    #[test]
    fn missing_or_garbage_numbers_are_zero() {
        let m = metrics(&json!({"cgroup2": {"cpu.stat": "x", "io.stat": {"a": 1}}}));
        assert_eq!(
            (m.cpu.usage_usec, m.memory.usage, m.io.usage.len()),
            (0, 0, 0)
        );
        let m = metrics(&json!([1, 2]));
        assert_eq!(m.pids.current, 0);
    }

    #[test]
    fn packed_metrics_carry_containerds_type_url_and_decode() {
        let mut m = Metrics::new();
        let mut pids = PidsStat::new();
        pids.current = 5;
        m.pids = MessageField::some(pids);
        let any = packed(&m).unwrap();
        assert_eq!(any.type_url, METRICS_TYPE_URL);
        let back = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(back.pids.current, 5);
    }
}
