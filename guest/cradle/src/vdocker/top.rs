//! `docker top`: `GET /containers/{id}/top`, the processes of one container, read from
//! `/proc` (no `ps` in the guest or the image is needed).
//!
//! A container's processes are its run's process and every descendant, plus, for an
//! image container, every process in its PID namespace (what `docker exec` started
//! there). PIDs are cradle's (the pod's), as Docker shows host PIDs. Columns are fixed:
//! `UID PID PPID TIME CMD`; ps options other than `-ef` are refused.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;

use hyper::{Response, StatusCode};
use serde_json::json;

use super::containers::Container;
use super::errors::VdockerError;
use super::server::{self, ResponseBody};

/// One process, as `/proc/PID/stat` and `status` say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    pub ppid: u32,
    /// utime + stime, in clock ticks.
    pub ticks: u64,
    pub comm: String,
}

/// Parses `/proc/PID/stat`. The command name is in parentheses and may itself hold
/// spaces and parentheses: the fields after it start after the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text.get(..open)?.trim().parse().ok()?;
    let comm = text.get(open + 1..close)?.to_owned();
    // After ")": state(3) ppid(4) ... utime(14) stime(15), numbered from 1 with pid.
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    let field = |number: usize| rest.get(number - 3).and_then(|f| f.parse::<u64>().ok());
    Some(ProcStat {
        pid,
        ppid: u32::try_from(field(4)?).ok()?,
        ticks: field(14)?.saturating_add(field(15)?),
        comm,
    })
}

/// `[[hh:]mm:]ss` as ps prints TIME: always `HH:MM:SS`.
pub fn cpu_time(ticks: u64, ticks_per_second: u64) -> String {
    let seconds = ticks / ticks_per_second.max(1);
    format!(
        "{:02}:{:02}:{:02}",
        seconds / 3600,
        (seconds / 60) % 60,
        seconds % 60
    )
}

/// `root` and every process whose parent chain reaches it.
pub fn descendants(root: u32, parents: &BTreeMap<u32, u32>) -> BTreeSet<u32> {
    let mut chosen = BTreeSet::from([root]);
    // Parents are not always older in PID order (PIDs wrap): repeat until stable.
    loop {
        let before = chosen.len();
        for (&pid, ppid) in parents {
            if chosen.contains(ppid) {
                chosen.insert(pid);
            }
        }
        if chosen.len() == before {
            return chosen;
        }
    }
}

/// Every process in `/proc` (those that vanish while read are skipped).
fn all_processes() -> Vec<ProcStat> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?))
        .collect()
}

fn pid_namespace(pid: u32) -> Option<std::path::PathBuf> {
    fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

fn real_uid(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().next().map(str::to_owned))
        })
        .unwrap_or_else(|| "?".to_owned())
}

fn command_line(process: &ProcStat) -> String {
    let raw = fs::read(format!("/proc/{}/cmdline", process.pid)).unwrap_or_default();
    let words: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|word| !word.is_empty())
        .map(|word| String::from_utf8_lossy(word).into_owned())
        .collect();
    if words.is_empty() {
        format!("[{}]", process.comm)
    } else {
        words.join(" ")
    }
}

/// The handler.
pub fn top(
    container: &Container,
    ps_args: Option<&str>,
) -> Result<Response<ResponseBody>, VdockerError> {
    if let Some(args) = ps_args
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "-ef")
    {
        return Err(VdockerError::BadParameter {
            name: "ps_args",
            value: args.to_owned(),
            expected: "no ps options (docker top shows UID PID PPID TIME CMD, read from /proc)",
        });
    }
    let run_pid = u32::try_from(container.running_pid()?)
        .map_err(|_| VdockerError::NotRunning(container.name.clone()))?;
    let processes = all_processes();
    let parents: BTreeMap<u32, u32> = processes.iter().map(|p| (p.pid, p.ppid)).collect();
    let mut chosen = descendants(run_pid, &parents);
    // An image container's PID 1 is a child of the set-up stage; its namespace also
    // holds what `docker exec` started, which descends from cradle, not from the run.
    let namespace = chosen
        .iter()
        .filter_map(|&pid| pid_namespace(pid))
        .find(|ns| pid_namespace(1).as_ref() != Some(ns));
    if let Some(namespace) = namespace {
        for process in &processes {
            if pid_namespace(process.pid).as_ref() == Some(&namespace) {
                chosen.insert(process.pid);
            }
        }
    }
    // SAFETY: sysconf only reads a constant of the running system.
    let ticks_per_second =
        u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    let rows: Vec<Vec<String>> = processes
        .iter()
        .filter(|p| chosen.contains(&p.pid))
        .map(|p| {
            vec![
                real_uid(p.pid),
                p.pid.to_string(),
                p.ppid.to_string(),
                cpu_time(p.ticks, ticks_per_second),
                command_line(p),
            ]
        })
        .collect();
    Ok(server::json(
        StatusCode::OK,
        &json!({ "Titles": ["UID", "PID", "PPID", "TIME", "CMD"], "Processes": rows }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parentheses_in_the_name_parses() {
        let text =
            "42 (my (odd) name) S 7 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 300 1000 10";
        let stat = parse_stat(text).unwrap();
        assert_eq!(stat.pid, 42);
        assert_eq!(stat.ppid, 7);
        assert_eq!(stat.comm, "my (odd) name");
        assert_eq!(stat.ticks, 300);
    }

    #[test]
    fn truncated_stat_is_none() {
        assert_eq!(parse_stat("42 (sh) S"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn cpu_time_is_hh_mm_ss() {
        assert_eq!(cpu_time(0, 100), "00:00:00");
        assert_eq!(cpu_time(366_100, 100), "01:01:01");
        assert_eq!(cpu_time(5, 0), "00:00:05");
    }

    #[test]
    fn descendants_follow_the_parent_chain_whatever_the_pid_order() {
        let parents = BTreeMap::from([(10, 1), (11, 10), (5, 11), (12, 1), (13, 5)]);
        assert_eq!(descendants(10, &parents), BTreeSet::from([10, 11, 5, 13]));
    }

    #[test]
    fn this_process_is_in_proc() {
        let me = std::process::id();
        assert!(all_processes().iter().any(|p| p.pid == me));
    }
}
