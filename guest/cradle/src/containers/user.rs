//! A container's user as Docker resolves it (`docker run -u`): `name`, `uid`, `name:group`,
//! `uid:gid`, `name:gid` or `uid:group`, looked up in the image's own `/etc/passwd` and
//! `/etc/group`. A name must be in the file; a number need not be (Docker runs unknown
//! uids, with gid 0 when passwd does not know them). The supplementary groups are those
//! of `/etc/group` that list the user's name, unless a group was given explicitly
//! (Docker then still adds them; so does this).
//!
//! Parsing is pure: the files are untrusted image content, malformed lines are skipped.

use thiserror::Error;

/// Errors of resolving a user; each says what the image lacks.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum UserError {
    #[error("user {name:?} is not in the image's /etc/passwd; use a uid or a user the image has")]
    UnknownUser { name: String },
    #[error("group {name:?} is not in the image's /etc/group; use a gid or a group the image has")]
    UnknownGroup { name: String },
    #[error("{value:?} is not a user; write name, uid, name:group or uid:gid")]
    Invalid { value: String },
}

/// Who a container's process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, without duplicates.
    pub groups: Vec<u32>,
    /// The home directory from passwd, `/` when unknown (HOME's default).
    pub home: String,
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        let _gecos = fields.next();
        let home = fields.next().unwrap_or("/");
        Some(PasswdEntry {
            name,
            uid,
            gid,
            home,
        })
    })
}

fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    text.lines().filter_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        let gid = fields.next()?.parse().ok()?;
        let members = fields
            .next()
            .unwrap_or("")
            .split(',')
            .filter(|m| !m.is_empty())
            .collect();
        Some(GroupEntry { name, gid, members })
    })
}

/// Resolves `user` (`name`, `uid`, with an optional `:group`/`:gid`) against the image's
/// `passwd` and `group` texts (empty when the image has no such file).
pub fn resolve(user: &str, passwd: &str, group: &str) -> Result<ResolvedUser, UserError> {
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    if user_part.is_empty() || group_part.is_some_and(str::is_empty) {
        return Err(UserError::Invalid {
            value: user.to_owned(),
        });
    }
    let by_name = passwd_entries(passwd).find(|e| e.name == user_part);
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => by_name.or_else(|| passwd_entries(passwd).find(|e| e.uid == uid)),
        Err(_) => Some(by_name.ok_or_else(|| UserError::UnknownUser {
            name: user_part.to_owned(),
        })?),
    };
    let uid = match (&entry, user_part.parse::<u32>()) {
        (Some(e), _) => e.uid,
        (None, Ok(uid)) => uid,
        (None, Err(_)) => {
            return Err(UserError::UnknownUser {
                name: user_part.to_owned(),
            })
        }
    };
    let gid = match group_part {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                group_entries(group)
                    .find(|e| e.name == g)
                    .ok_or_else(|| UserError::UnknownGroup { name: g.to_owned() })?
                    .gid
            }
        },
        None => entry.as_ref().map_or(0, |e| e.gid),
    };
    let mut groups = vec![gid];
    if let Some(e) = &entry {
        for g in group_entries(group) {
            if g.members.contains(&e.name) && !groups.contains(&g.gid) {
                groups.push(g.gid);
            }
        }
    }
    let home = entry.as_ref().map_or("/", |e| e.home);
    Ok(ResolvedUser {
        uid,
        gid,
        groups,
        home: if home.is_empty() { "/" } else { home }.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        app:x:1000:1000:App:/home/app:/bin/sh\n\
        broken line\n\
        nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nwheel:x:10:app,root\naudio:x:29:app\nbad\n";

    #[test]
    fn name_gets_its_uid_gid_home_and_supplementary_groups() {
        let user = resolve("app", PASSWD, GROUP).unwrap();
        assert_eq!(
            user,
            ResolvedUser {
                uid: 1000,
                gid: 1000,
                groups: vec![1000, 10, 29],
                home: "/home/app".into()
            }
        );
    }

    #[test]
    fn uid_known_to_passwd_gets_its_entry() {
        let user = resolve("65534", PASSWD, GROUP).unwrap();
        assert_eq!(
            (user.uid, user.gid, user.home.as_str()),
            (65534, 65534, "/nonexistent")
        );
    }

    #[test]
    fn unknown_uid_runs_with_gid_zero() {
        let user = resolve("4242", PASSWD, GROUP).unwrap();
        assert_eq!(
            (user.uid, user.gid, user.groups.clone()),
            (4242, 0, vec![0])
        );
    }

    #[test]
    fn explicit_group_by_name_or_number() {
        assert_eq!(resolve("app:wheel", PASSWD, GROUP).unwrap().gid, 10);
        assert_eq!(resolve("1000:77", PASSWD, GROUP).unwrap().gid, 77);
    }

    #[test]
    fn unknown_names_and_bad_syntax_are_errors() {
        assert_eq!(
            resolve("ghost", PASSWD, GROUP).unwrap_err(),
            UserError::UnknownUser {
                name: "ghost".into()
            }
        );
        assert_eq!(
            resolve("app:ghosts", PASSWD, GROUP).unwrap_err(),
            UserError::UnknownGroup {
                name: "ghosts".into()
            }
        );
        assert!(matches!(
            resolve("app:", PASSWD, GROUP),
            Err(UserError::Invalid { .. })
        ));
        assert!(matches!(
            resolve("", "", ""),
            Err(UserError::Invalid { .. })
        ));
    }

    #[test]
    fn image_without_passwd_still_takes_numbers() {
        assert_eq!(resolve("0", "", "").unwrap().uid, 0);
        assert!(resolve("root", "", "").is_err());
    }
}
