//! Resource ids: `vol-` + 8, `ss-` + 8, `j-` + 11 characters of `[0-9a-z]`.

use rand::Rng;
use serde::{Deserialize, Serialize};
use std::fmt;

const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// Which kind of resource an id names; carries its prefix and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    Volume,
    Snapshot,
    Job,
}

impl IdKind {
    fn prefix(self) -> &'static str {
        match self {
            IdKind::Volume => "vol-",
            IdKind::Snapshot => "ss-",
            IdKind::Job => "j-",
        }
    }
    fn len(self) -> usize {
        match self {
            IdKind::Volume | IdKind::Snapshot => 8,
            IdKind::Job => 11,
        }
    }
    fn noun(self) -> &'static str {
        match self {
            IdKind::Volume => "volume",
            IdKind::Snapshot => "snapshot",
            IdKind::Job => "job",
        }
    }

    /// True when `s` is a well-formed id of this kind. Only such strings ever reach a path.
    pub fn is_valid(self, s: &str) -> bool {
        s.strip_prefix(self.prefix()).is_some_and(|rest| {
            rest.len() == self.len() && rest.bytes().all(|b| ALPHABET.contains(&b))
        })
    }

    fn generate(self) -> String {
        let mut rng = rand::thread_rng();
        let tail: String = (0..self.len())
            .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
            .collect();
        format!("{}{tail}", self.prefix())
    }
}

macro_rules! id_type {
    ($name:ident, $kind:expr) => {
        /// A validated resource id; can be joined to a path safely.
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                if $kind.is_valid(&s) {
                    Ok($name(s))
                } else {
                    Err(format!(
                        "{:?} is not a {} id ({}followed by {} characters of [0-9a-z])",
                        s,
                        $kind.noun(),
                        $kind.prefix(),
                        $kind.len()
                    ))
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                $name::try_from(s.to_string())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(VolumeId, IdKind::Volume);
id_type!(SnapshotId, IdKind::Snapshot);
id_type!(JobId, IdKind::Job);

pub fn new_volume_id() -> VolumeId {
    VolumeId(IdKind::Volume.generate())
}
pub fn new_snapshot_id() -> SnapshotId {
    SnapshotId(IdKind::Snapshot.generate())
}
pub fn new_job_id() -> JobId {
    JobId(IdKind::Job.generate())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_valid() {
        for _ in 0..100 {
            assert!(IdKind::Volume.is_valid(new_volume_id().as_str()));
            assert!(IdKind::Snapshot.is_valid(new_snapshot_id().as_str()));
            assert!(IdKind::Job.is_valid(new_job_id().as_str()));
        }
    }

    #[test]
    fn hostile_ids_are_refused() {
        for bad in [
            "vol-../../et",
            "vol-ABCDEFGH",
            "vol-1234567",
            "vol-123456789",
            "ss-1234567/",
            "",
            "vol-1234\u{0}678",
        ] {
            assert!("x".parse::<VolumeId>().is_err());
            assert!(bad.parse::<VolumeId>().is_err(), "{bad:?}");
        }
        assert!("ss-umocjmc3".parse::<SnapshotId>().is_ok());
        assert!("j-9ebq2zp5sm3".parse::<JobId>().is_ok());
    }
}
