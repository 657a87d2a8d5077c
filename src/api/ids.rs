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

    /// Why `s` is not an id of this kind, for a person: a hostile string is shown escaped
    /// (`{:?}`: no control characters reach a terminal) and cut to its first 64 characters.
    fn refusal(self, s: &str) -> String {
        let shown: String = s.chars().take(64).collect();
        let cut = if shown.len() < s.len() {
            format!("… ({} bytes)", s.len())
        } else {
            String::new()
        };
        format!(
            "{shown:?}{cut} is not a {} id ({}followed by {} characters of [0-9a-z])",
            self.noun(),
            self.prefix(),
            self.len()
        )
    }

    /// Refuses (1100) the first string of `ids` that is not an id of this kind. For filters
    /// such as `describe-volumes -v`: a malformed id is a mistake worth saying, not a filter
    /// that silently matches nothing.
    pub fn check_all(self, ids: &[String]) -> Result<(), super::ApiError> {
        match ids.iter().find(|s| !self.is_valid(s)) {
            Some(bad) => Err(super::ApiError::bad(self.refusal(bad))),
            None => Ok(()),
        }
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
                    Err($kind.refusal(&s))
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
        // Kinds do not mix, and look-alikes (Cyrillic a, full-width digits) are not ids.
        assert!("ss-umocjmc3".parse::<VolumeId>().is_err());
        assert!("vol-\u{430}bcdefgh".parse::<VolumeId>().is_err());
        assert!("vol-\u{ff11}2345678".parse::<VolumeId>().is_err());
    }

    #[test]
    fn refusals_are_short_and_escaped() {
        let long = format!("vol-{}", "a".repeat(100 * 1024));
        let e = long.parse::<VolumeId>().unwrap_err();
        assert!(e.len() < 200, "{e}");
        assert!(e.contains("102404 bytes"), "{e}");
        let e = "vol-\u{1b}[31m\u{0}".parse::<VolumeId>().unwrap_err();
        assert!(!e.chars().any(char::is_control), "{e:?}");
        let ids = vec!["vol-aaaaaaaa".to_string(), "../x".to_string()];
        let e = IdKind::Volume.check_all(&ids).unwrap_err();
        assert_eq!(e.kind, crate::api::ErrorKind::InvalidArgument);
        assert!(e.message.contains("\"../x\""), "{}", e.message);
        assert!(IdKind::Volume.check_all(&ids[..1]).is_ok());
        assert!("j-9ebq2zp5sm3".parse::<JobId>().is_ok());
    }
}
