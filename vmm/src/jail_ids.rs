//! The ids of jailed pods (docs/JAIL.md, "Ids"): a lease on a uid and a gid that no other
//! crib pod on the host holds, for as long as its `crib pod run` lives.
//!
//! A lease is an exclusive `flock` on `<dir>/uid-<N>` and `<dir>/gid-<N>` ([`ID_LOCK_DIR`]),
//! taken by the supervisor (root, outside the jail) and never inherited by the jailed
//! child (it closes every descriptor past stdio, so it cannot unlock the lease). The
//! kernel drops the locks when the supervisor's process ends, however it ends (`kill -9`
//! too), so nothing has to be cleaned up; the files themselves stay, empty of meaning
//! until locked again.
//!
//! `"jail": "auto"` takes the first id of [`AUTO_IDS`] whose two files are free and that
//! the host's user database does not use (`/etc/passwd`, `/etc/group`, the ranges of
//! `/etc/subuid` and `/etc/subgid`); `{"uid": N, "gid": N}` takes exactly those, refused
//! if another pod holds them.

use std::fs::File;
use std::io::Write as _;
use std::ops::RangeInclusive;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use crate::jail::{Jail, JailRequest};

/// Where the lease files are (root's, 0700).
pub const ID_LOCK_DIR: &str = "/run/crib/jail-ids";
/// The ids `"jail": "auto"` picks from (uid = gid): 65536 of them, above the first
/// `/etc/subuid` range useradd gives (100000-165535); ids the host's user database uses
/// are skipped. The range must be reserved for crib: no user, group or file of its own.
pub const AUTO_IDS: RangeInclusive<u32> = 200_000..=265_535;

/// Errors of a lease, each with the fix.
#[derive(Debug, thiserror::Error)]
pub enum JailIdError {
    #[error("cannot create the jail id directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open or lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("jail.{kind} {id} is held by another running pod ({path} is locked): give each pod ids of its own, or write \"jail\": \"auto\"")]
    Held {
        kind: &'static str,
        id: u32,
        path: PathBuf,
    },
    #[error("every id of {first}-{last} is held by a running pod or used by the host's user database: stop a jailed pod, or give this one fixed ids")]
    Exhausted { first: u32, last: u32 },
}

/// Ids the host's user database uses, which `"auto"` skips.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostIds {
    /// uids of /etc/passwd and gids of /etc/group (one list: a pod's uid = gid).
    ids: Vec<u32>,
    /// The subordinate ranges of /etc/subuid and /etc/subgid, `(first, count)`.
    ranges: Vec<(u64, u64)>,
}

impl HostIds {
    /// Reads the host's files; a missing or unreadable one adds nothing.
    pub fn read() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        Self::parse(
            &[&read("/etc/passwd"), &read("/etc/group")],
            &[&read("/etc/subuid"), &read("/etc/subgid")],
        )
    }

    /// From the text of passwd/group files (the id is the third field) and of
    /// subuid/subgid files (`name:first:count`); lines that do not parse are skipped.
    pub fn parse(databases: &[&str], subordinates: &[&str]) -> Self {
        fn field(line: &str, n: usize) -> Option<&str> {
            line.split(':').nth(n).map(str::trim)
        }
        let ids = databases
            .iter()
            .flat_map(|text| text.lines())
            .filter_map(|line| field(line, 2)?.parse().ok())
            .collect();
        let ranges = subordinates
            .iter()
            .flat_map(|text| text.lines())
            .filter_map(|line| Some((field(line, 1)?.parse().ok()?, field(line, 2)?.parse().ok()?)))
            .collect();
        Self { ids, ranges }
    }

    /// Whether the host's database uses `id` as a user, a group or a subordinate id.
    pub fn uses(&self, id: u32) -> bool {
        let wide = u64::from(id);
        self.ids.contains(&id)
            || self
                .ranges
                .iter()
                .any(|&(first, count)| wide >= first && wide - first < count)
    }
}

/// The held locks of a pod's ids; dropping it frees them.
#[derive(Debug)]
pub struct IdLease {
    pub jail: Jail,
    /// Whether the ids were picked by `"auto"`.
    pub auto: bool,
    _locks: [File; 2],
}

/// Takes the ids `request` asks for in `dir`, for pod `pod` (written into the lock files,
/// for whoever looks). `range` and `host` matter only to `Auto`.
pub fn lease_ids(
    request: JailRequest,
    dir: &Path,
    range: RangeInclusive<u32>,
    host: &HostIds,
    pod: &str,
) -> Result<IdLease, JailIdError> {
    create_dir(dir)?;
    match request {
        JailRequest::Fixed(jail) => {
            let uid = lock(dir, "uid", jail.uid, pod)?.ok_or_else(|| held(dir, "uid", jail.uid))?;
            let gid = lock(dir, "gid", jail.gid, pod)?.ok_or_else(|| held(dir, "gid", jail.gid))?;
            Ok(IdLease {
                jail,
                auto: false,
                _locks: [uid, gid],
            })
        }
        JailRequest::Auto => {
            let (first, last) = (*range.start(), *range.end());
            for id in range.filter(|&id| !host.uses(id)) {
                let Some(uid) = lock(dir, "uid", id, pod)? else {
                    continue;
                };
                // A fixed-id pod may hold the gid alone: then the next id.
                if let Some(gid) = lock(dir, "gid", id, pod)? {
                    return Ok(IdLease {
                        jail: Jail { uid: id, gid: id },
                        auto: true,
                        _locks: [uid, gid],
                    });
                }
            }
            Err(JailIdError::Exhausted { first, last })
        }
    }
}

fn held(dir: &Path, kind: &'static str, id: u32) -> JailIdError {
    JailIdError::Held {
        kind,
        id,
        path: lock_path(dir, kind, id),
    }
}

/// `<dir>/<kind>-<id>`.
pub fn lock_path(dir: &Path, kind: &str, id: u32) -> PathBuf {
    dir.join(format!("{kind}-{id}"))
}

fn create_dir(dir: &Path) -> Result<(), JailIdError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| JailIdError::Dir {
            path: dir.to_path_buf(),
            source,
        })
}

/// The locked file of `kind` `id`, or `None` if another process holds it.
fn lock(dir: &Path, kind: &str, id: u32, pod: &str) -> Result<Option<File>, JailIdError> {
    let path = lock_path(dir, kind, id);
    let error = |source| JailIdError::Lock {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(error)?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
        Err(errno) => return Err(error(errno.into())),
    }
    // Who holds it, for an operator's `cat`; the lock is what counts.
    let note = format!("pod {pod}, crib pid {}\n", std::process::id());
    file.set_len(0)
        .and_then(|()| file.write_all(note.as_bytes()))
        .map_err(error)?;
    Ok(Some(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three ids, enough to see one skipped and one exhausted.
    const SMALL: RangeInclusive<u32> = 300_000..=300_002;

    /// A lease directory of the test's own, removed when it ends.
    struct TempDir(PathBuf);

    impl std::ops::Deref for TempDir {
        type Target = Path;

        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn temp_dir(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("crib-jail-ids-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }

    fn fixed(uid: u32, gid: u32) -> JailRequest {
        JailRequest::Fixed(Jail { uid, gid })
    }

    #[test]
    fn auto_takes_the_first_id_of_the_range() {
        let dir = temp_dir("first");

        let lease = lease_ids(JailRequest::Auto, &dir, SMALL, &HostIds::default(), "a").unwrap();

        assert_eq!(
            lease.jail,
            Jail {
                uid: 300_000,
                gid: 300_000
            }
        );
        assert!(lease.auto);
    }

    #[test]
    fn auto_skips_an_id_another_lease_holds() {
        let dir = temp_dir("skip");
        let _first = lease_ids(JailRequest::Auto, &dir, SMALL, &HostIds::default(), "a").unwrap();

        let second = lease_ids(JailRequest::Auto, &dir, SMALL, &HostIds::default(), "b").unwrap();

        assert_eq!(second.jail.uid, 300_001);
    }

    #[test]
    fn auto_reuses_an_id_once_its_lease_is_dropped() {
        let dir = temp_dir("reuse");
        drop(lease_ids(JailRequest::Auto, &dir, SMALL, &HostIds::default(), "a").unwrap());

        let again = lease_ids(JailRequest::Auto, &dir, SMALL, &HostIds::default(), "b").unwrap();

        assert_eq!(again.jail.uid, 300_000);
    }

    #[test]
    fn auto_skips_an_id_whose_gid_a_fixed_pod_holds() {
        let dir = temp_dir("gid");
        let _fixed =
            lease_ids(fixed(1234, 300_000), &dir, SMALL, &HostIds::default(), "f").unwrap();

        let lease = lease_ids(JailRequest::Auto, &dir, SMALL, &HostIds::default(), "a").unwrap();

        assert_eq!(
            lease.jail,
            Jail {
                uid: 300_001,
                gid: 300_001
            }
        );
    }

    #[test]
    fn auto_skips_ids_of_the_host_database() {
        let dir = temp_dir("host");
        // 300000 is a user, 300001 the first of a subordinate range of one.
        let host = HostIds::parse(&["svc:x:300000:300000::/:/bin/false"], &["alice:300001:1"]);

        let lease = lease_ids(JailRequest::Auto, &dir, SMALL, &host, "a").unwrap();

        assert_eq!(lease.jail.uid, 300_002);
    }

    #[test]
    fn auto_fails_when_every_id_is_held_naming_the_range() {
        let dir = temp_dir("full");
        let _held: Vec<_> = (0..3)
            .map(|_| lease_ids(JailRequest::Auto, &dir, SMALL, &HostIds::default(), "a").unwrap())
            .collect();

        let error =
            lease_ids(JailRequest::Auto, &dir, SMALL, &HostIds::default(), "b").unwrap_err();

        assert!(error.to_string().contains("300000-300002"), "{error}");
    }

    #[test]
    fn fixed_ids_held_by_another_pod_are_refused_naming_the_field() {
        let dir = temp_dir("held");
        let _first = lease_ids(
            fixed(100_000, 100_001),
            &dir,
            SMALL,
            &HostIds::default(),
            "a",
        );

        let error = lease_ids(
            fixed(100_000, 100_002),
            &dir,
            SMALL,
            &HostIds::default(),
            "b",
        )
        .unwrap_err();

        let text = error.to_string();
        assert!(text.contains("jail.uid 100000 is held"), "{text}");
        assert!(text.contains("\"auto\""), "{text}");
    }

    #[test]
    fn fixed_ids_are_taken_as_given() {
        let dir = temp_dir("fixed");

        let lease = lease_ids(
            fixed(100_000, 100_001),
            &dir,
            SMALL,
            &HostIds::default(),
            "a",
        )
        .unwrap();

        assert_eq!(
            lease.jail,
            Jail {
                uid: 100_000,
                gid: 100_001
            }
        );
        assert!(!lease.auto);
    }

    #[test]
    fn the_lock_file_names_the_pod() {
        let dir = temp_dir("note");

        let _lease = lease_ids(JailRequest::Auto, &dir, SMALL, &HostIds::default(), "web").unwrap();

        let note = std::fs::read_to_string(lock_path(&dir, "uid", 300_000)).unwrap();
        assert!(note.starts_with("pod web, crib pid "), "{note}");
    }

    #[test]
    fn host_ids_parse_skips_malformed_lines() {
        let host = HostIds::parse(&["root:x:0:0::/root:/bin/sh\nbroken\nx:y:z"], &["a:b:c"]);

        assert!(host.uses(0));
        assert!(!host.uses(1));
    }

    #[test]
    fn host_ids_cover_a_whole_subordinate_range() {
        let host = HostIds::parse(&[], &["alice:100000:65536"]);

        assert!(host.uses(165_535));
        assert!(!host.uses(165_536));
    }
}
