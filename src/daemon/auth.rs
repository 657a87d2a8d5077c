//! Who is calling, and what they may do: peer credentials mapped to the configured groups.

use crate::config::Config;
use nix::unistd::{Gid, Group, Uid, User};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Admin,
    Reader,
    None,
}

/// A connected client, from SO_PEERCRED.
#[derive(Debug, Clone)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// The user's name (or the uid as text when it has none); becomes `owner`.
    pub user: String,
    /// Primary and supplementary groups of the calling process.
    pub groups: Vec<u32>,
}

impl Caller {
    pub fn from_cred(uid: u32, gid: u32, pid: Option<i32>) -> Caller {
        let user = User::from_uid(Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| uid.to_string());
        let mut groups = vec![gid];
        groups.extend(pid.map(|p| process_groups(p, uid)).unwrap_or_default());
        Caller {
            uid,
            gid,
            pid,
            user,
            groups,
        }
    }

    /// The daemon itself, for work it does on its own behalf (recovery).
    pub fn daemon() -> Caller {
        Caller {
            uid: 0,
            gid: 0,
            pid: None,
            user: "root".into(),
            groups: vec![0],
        }
    }

    pub fn access(&self, config: &Config) -> Access {
        if self.uid == 0 || in_group(&self.groups, &config.admin_group) {
            Access::Admin
        } else if in_group(&self.groups, &config.reader_group) {
            Access::Reader
        } else {
            Access::None
        }
    }
}

fn in_group(groups: &[u32], name: &str) -> bool {
    if name.is_empty() {
        return false;
    }
    match Group::from_name(name) {
        Ok(Some(g)) => groups.contains(&g.gid.as_raw()),
        _ => false,
    }
}

/// Supplementary groups of a live process, from `/proc/<pid>/status` (`Groups:` line): the
/// credentials the process really holds, not what /etc/group says today.
///
/// SO_PEERCRED fixes uid, gid and pid at connect time, but this file is read later: if the
/// client has exited and its pid was reused, the file describes another process. The groups
/// count only when that process still has the client's effective uid, so a reused pid can
/// never lend a stranger the groups of another user's process. (SO_PEERGROUPS would fix the
/// groups at connect time too; nix has no wrapper for it yet.)
fn process_groups(pid: i32, uid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| groups_from_status(&s, uid))
        .unwrap_or_default()
}

/// The `Groups:` of a `/proc/<pid>/status` text whose effective uid (second field of `Uid:`)
/// is `uid`; nothing otherwise.
fn groups_from_status(status: &str, uid: u32) -> Vec<u32> {
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name));
    let euid = field("Uid:").and_then(|u| u.split_whitespace().nth(1)?.parse::<u32>().ok());
    if euid != Some(uid) {
        return Vec::new();
    }
    field("Groups:")
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Resolves a group name to its gid (for the socket's owner group).
pub fn group_gid(name: &str) -> Option<Gid> {
    Group::from_name(name).ok().flatten().map(|g| g.gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_admin_and_strangers_are_not() {
        let config = Config::default();
        assert_eq!(Caller::daemon().access(&config), Access::Admin);
        let stranger = Caller {
            uid: 4242,
            gid: 4242,
            pid: None,
            user: "x".into(),
            groups: vec![4242],
        };
        assert_eq!(stranger.access(&config), Access::None);
        let config = Config {
            reader_group: "root".into(),
            ..Config::default()
        };
        let reader = Caller {
            uid: 4242,
            gid: 0,
            pid: None,
            user: "x".into(),
            groups: vec![0],
        };
        assert_eq!(reader.access(&config), Access::Reader);
    }

    #[test]
    fn groups_count_only_for_the_callers_uid() {
        let status = "Name:\tsh\nUid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\nGroups:\t27 50 100 \n";
        assert_eq!(groups_from_status(status, 1000), vec![27, 50, 100]);
        // A reused pid now running as someone else lends nothing.
        assert!(groups_from_status(status, 4242).is_empty());
        assert!(groups_from_status("Groups:\t27\n", 1000).is_empty());
        let setuid = "Uid:\t1000\t0\t0\t0\nGroups:\t27\n";
        assert_eq!(groups_from_status(setuid, 0), vec![27]);
        assert!(groups_from_status(setuid, 1000).is_empty());
    }
}
