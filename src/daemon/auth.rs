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
        groups.extend(pid.map(process_groups).unwrap_or_default());
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
fn process_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
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
}
