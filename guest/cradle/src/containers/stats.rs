//! A container's resource usage, read from its cgroup v2 directory (the kernel's
//! Documentation/admin-guide/cgroup-v2.rst formats): `cpu.stat` and `memory.stat` are
//! flat keyed (`key value` lines), `memory.current`, `memory.max`, `pids.current`,
//! `pids.max` single values (`max` for no limit), `io.stat` nested keyed (`MAJ:MIN
//! key=value ...` per device). The parsers are pure; [`read`] does the I/O.
//! vdocker turns a [`CgroupStats`] into Docker's stats JSON plus crib's `cgroup2`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

/// One device's line of `io.stat`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IoStat {
    pub major: u64,
    pub minor: u64,
    pub rbytes: u64,
    pub wbytes: u64,
    pub rios: u64,
    pub wios: u64,
}

/// The counters of one cgroup. A file the kernel does not have (a controller not
/// enabled) reads as empty or 0, never as an error: stats are best effort.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CgroupStats {
    #[serde(rename = "cpu.stat")]
    pub cpu_stat: BTreeMap<String, u64>,
    #[serde(rename = "memory.stat")]
    pub memory_stat: BTreeMap<String, u64>,
    #[serde(rename = "memory.current")]
    pub memory_current: u64,
    /// `None`: no limit (`max`).
    #[serde(rename = "memory.max")]
    pub memory_max: Option<u64>,
    #[serde(rename = "memory.swap.current")]
    pub memory_swap_current: u64,
    #[serde(rename = "pids.current")]
    pub pids_current: u64,
    #[serde(rename = "pids.max")]
    pub pids_max: Option<u64>,
    #[serde(rename = "io.stat")]
    pub io_stat: Vec<IoStat>,
}

/// `key value` lines; a line that is not that (or whose value is not a u64) is skipped.
pub fn parse_flat_keyed(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let key = parts.next()?;
            let value = parts.next()?.parse().ok()?;
            parts.next().is_none().then(|| (key.to_owned(), value))
        })
        .collect()
}

/// A single value: a number, or `max` (no limit: `Some(None)`). Garbage is `None`.
pub fn parse_limit(text: &str) -> Option<Option<u64>> {
    match text.trim() {
        "max" => Some(None),
        value => value.parse().ok().map(Some),
    }
}

/// `io.stat`: a line per device, `MAJ:MIN rbytes=N wbytes=N rios=N wios=N dbytes=N
/// dios=N` (keys the kernel adds later are ignored, missing ones are 0).
pub fn parse_io_stat(text: &str) -> Vec<IoStat> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let (major, minor) = parts.next()?.split_once(':')?;
            let mut stat = IoStat {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                ..IoStat::default()
            };
            for pair in parts {
                let Some((key, value)) = pair.split_once('=') else {
                    continue;
                };
                let Ok(value) = value.parse() else {
                    continue;
                };
                match key {
                    "rbytes" => stat.rbytes = value,
                    "wbytes" => stat.wbytes = value,
                    "rios" => stat.rios = value,
                    "wios" => stat.wios = value,
                    _ => {}
                }
            }
            Some(stat)
        })
        .collect()
}

/// The whole machine's CPU time in nanoseconds from `/proc/stat`'s `cpu` line (user,
/// nice, system, idle, iowait, irq, softirq, steal, in `ticks_per_second` units), as
/// Docker's `system_cpu_usage`. `None` without such a line.
pub fn system_cpu_ns(proc_stat: &str, ticks_per_second: u64) -> Option<u64> {
    let line = proc_stat
        .lines()
        .find(|line| line.split_whitespace().next() == Some("cpu"))?;
    let ticks: u64 = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse::<u64>().ok())
        .fold(0, u64::saturating_add);
    let ns_per_tick = 1_000_000_000u64.checked_div(ticks_per_second)?;
    Some(ticks.saturating_mul(ns_per_tick))
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
pub fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Reads the cgroup `dir`.
pub fn read(dir: &Path) -> CgroupStats {
    let text = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let number = |name: &str| parse_limit(&text(name)).flatten().unwrap_or(0);
    let limit = |name: &str| parse_limit(&text(name)).flatten();
    CgroupStats {
        cpu_stat: parse_flat_keyed(&text("cpu.stat")),
        memory_stat: parse_flat_keyed(&text("memory.stat")),
        memory_current: number("memory.current"),
        memory_max: limit("memory.max"),
        memory_swap_current: number("memory.swap.current"),
        pids_current: number("pids.current"),
        pids_max: limit("pids.max"),
        io_stat: parse_io_stat(&text("io.stat")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_flat_keyed_reads_cpu_stat() {
        let stat = parse_flat_keyed(
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\nbogus\nbad x\n",
        );

        assert_eq!(stat.get("usage_usec"), Some(&1500));
        assert_eq!(stat.get("system_usec"), Some(&500));
        assert_eq!(stat.len(), 4);
    }

    #[test]
    fn parse_limit_reads_numbers_and_max() {
        assert_eq!(parse_limit("67108864\n"), Some(Some(67_108_864)));
        assert_eq!(parse_limit("max\n"), Some(None));
        assert_eq!(parse_limit(""), None);
        assert_eq!(parse_limit("-1"), None);
    }

    #[test]
    fn parse_io_stat_reads_each_device_and_skips_garbage() {
        let stats = parse_io_stat(
            "254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\nnonsense\n8:16 rbytes=1 future=7\n",
        );

        assert_eq!(
            stats,
            [
                IoStat {
                    major: 254,
                    minor: 0,
                    rbytes: 4096,
                    wbytes: 8192,
                    rios: 1,
                    wios: 2
                },
                IoStat {
                    major: 8,
                    minor: 16,
                    rbytes: 1,
                    ..IoStat::default()
                }
            ]
        );
    }

    #[test]
    fn system_cpu_ns_sums_the_first_eight_fields() {
        let stat = "cpu  10 0 5 100 1 0 0 4 0 0\ncpu0 10 0 5 100 1 0 0 4 0 0\n";

        assert_eq!(system_cpu_ns(stat, 100), Some(120 * 10_000_000));
        assert_eq!(system_cpu_ns("intr 1\n", 100), None);
        assert_eq!(system_cpu_ns(stat, 0), None);
    }

    #[test]
    fn mem_total_bytes_reads_kib() {
        assert_eq!(
            mem_total_bytes("MemTotal:        2048 kB\nMemFree: 1 kB\n"),
            Some(2048 * 1024)
        );
        assert_eq!(mem_total_bytes("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn read_of_a_cgroup_dir_fills_every_field_and_serializes_with_kernel_names() {
        let dir = crate::testing::TempDir::new("cgroup-stats");
        let files = [
            ("cpu.stat", "usage_usec 7\n"),
            ("memory.stat", "anon 4096\nfile 0\n"),
            ("memory.current", "8192\n"),
            ("memory.max", "max\n"),
            ("memory.swap.current", "0\n"),
            ("pids.current", "2\n"),
            ("pids.max", "100\n"),
            ("io.stat", "254:0 rbytes=1 wbytes=2 rios=3 wios=4\n"),
        ];
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }

        let stats = read(dir.path());
        let json = serde_json::to_value(&stats).unwrap();

        assert_eq!(json["cpu.stat"]["usage_usec"], 7);
        assert_eq!(json["memory.current"], 8192);
        assert!(json["memory.max"].is_null());
        assert_eq!(json["pids.max"], 100);
        assert_eq!(json["io.stat"][0]["wios"], 4);
        assert_eq!(json["memory.stat"]["anon"], 4096);
    }

    #[test]
    fn read_of_a_missing_dir_is_all_zero() {
        let stats = read(Path::new("/nonexistent/cradle-cgroup"));

        assert_eq!(stats, CgroupStats::default());
    }
}
