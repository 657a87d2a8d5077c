//! Requests: `{"action": "CreateSnapshots", ...}` with QingCloud's parameter names.
//!
//! Parsing is two steps so that each failure has its own clear answer: the action name
//! (unknown → 1100 naming it), then that action's parameters (unknown or wrong-typed
//! parameters → 1100 naming the parameter).

use super::{ApiError, Size};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

/// Request bodies larger than this get a 1100 answer without being read further.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// A comma-separated list on the command line; an array (or a comma-separated string) on
/// the wire.
fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    Ok(
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a list of ids or a comma-separated string")
        })? {
            Raw::One(s) => split_list(&s),
            Raw::Many(v) => v.iter().flat_map(|s| split_list(s)).collect(),
        },
    )
}

/// Splits `"a, b,,c"` into `["a", "b", "c"]`.
pub fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect()
}

/// `0`/`1` as numbers, strings or booleans (QingCloud's CLI sends strings).
fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u8>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(i64),
        Bool(bool),
        Text(String),
    }
    let v = match Option::<Raw>::deserialize(d)? {
        None => return Ok(None),
        Some(Raw::Int(i)) => i,
        Some(Raw::Bool(b)) => i64::from(b),
        Some(Raw::Text(t)) => t
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("{t:?} is not 0 or 1")))?,
    };
    match v {
        0 | 1 => Ok(Some(v as u8)),
        _ => Err(serde::de::Error::custom(format!("{v} is not 0 or 1"))),
    }
}

macro_rules! params {
    ($(#[$doc:meta])* $name:ident { $($(#[$fattr:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name {
            /// Accepted for QingCloud compatibility; must equal the daemon's zone if given.
            #[serde(skip_serializing_if = "Option::is_none")]
            pub zone: Option<String>,
            $($(#[$fattr])* pub $field: $ty,)*
        }
    };
}

params!(CreateVolumes {
    size: Option<Size>,
    #[serde(skip_serializing_if = "Option::is_none")]
    volume_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend: Option<String>,
});

params!(DescribeVolumes {
    #[serde(deserialize_with = "list", skip_serializing_if = "Vec::is_empty")]
    volumes: Vec<String>,
    #[serde(deserialize_with = "list", skip_serializing_if = "Vec::is_empty")]
    status: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    search_word: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<u64>,
});

params!(AttachVolumes {
    #[serde(deserialize_with = "list")]
    volumes: Vec<String>,
});

params!(DetachVolumes {
    #[serde(deserialize_with = "list")]
    volumes: Vec<String>,
});

params!(ResizeVolumes {
    #[serde(deserialize_with = "list")]
    volumes: Vec<String>,
    size: Option<Size>,
});

params!(DeleteVolumes {
    #[serde(deserialize_with = "list")]
    volumes: Vec<String>,
});

params!(CreateSnapshots {
    #[serde(deserialize_with = "list")]
    resources: Vec<String>,
    #[serde(deserialize_with = "flag", skip_serializing_if = "Option::is_none")]
    is_full: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot_name: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    force: bool,
});

params!(DescribeSnapshots {
    #[serde(deserialize_with = "list", skip_serializing_if = "Vec::is_empty")]
    snapshots: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource_id: Option<String>,
    #[serde(deserialize_with = "flag", skip_serializing_if = "Option::is_none")]
    snapshot_type: Option<u8>,
    #[serde(deserialize_with = "list", skip_serializing_if = "Vec::is_empty")]
    status: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    search_word: Option<String>,
    #[serde(deserialize_with = "flag", skip_serializing_if = "Option::is_none")]
    verbose: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<u64>,
});

params!(DeleteSnapshots {
    #[serde(deserialize_with = "list")]
    snapshots: Vec<String>,
});

params!(CreateVolumeFromSnapshot {
    snapshot: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    volume_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    lazy: bool,
});

params!(ApplySnapshots {
    #[serde(deserialize_with = "list")]
    snapshots: Vec<String>,
});

params!(ModifySnapshotAttributes {
    snapshot: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
});

params!(VerifySnapshots {
    #[serde(deserialize_with = "list")]
    snapshots: Vec<String>,
});

params!(DescribeJobs {
    #[serde(deserialize_with = "list", skip_serializing_if = "Vec::is_empty")]
    jobs: Vec<String>,
    #[serde(deserialize_with = "list", skip_serializing_if = "Vec::is_empty")]
    status: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<u64>,
});

/// One parsed request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    CreateVolumes(CreateVolumes),
    DescribeVolumes(DescribeVolumes),
    AttachVolumes(AttachVolumes),
    DetachVolumes(DetachVolumes),
    ResizeVolumes(ResizeVolumes),
    DeleteVolumes(DeleteVolumes),
    CreateSnapshots(CreateSnapshots),
    DescribeSnapshots(DescribeSnapshots),
    DeleteSnapshots(DeleteSnapshots),
    CreateVolumeFromSnapshot(CreateVolumeFromSnapshot),
    ApplySnapshots(ApplySnapshots),
    ModifySnapshotAttributes(ModifySnapshotAttributes),
    VerifySnapshots(VerifySnapshots),
    DescribeJobs(DescribeJobs),
}

fn parse_params<T: DeserializeOwned>(action: &str, body: serde_json::Value) -> Result<T, ApiError> {
    serde_json::from_value(body).map_err(|e| ApiError::bad(format!("{action}: {e}")))
}

impl Request {
    /// Parses a request body. The error is always a 1100 with a message naming what is wrong.
    pub fn parse(body: &[u8]) -> Result<Request, ApiError> {
        let value: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad(format!("request body is not valid JSON: {e}")))?;
        let serde_json::Value::Object(mut map) = value else {
            return Err(ApiError::bad("request body must be a JSON object"));
        };
        let action = match map.remove("action") {
            Some(serde_json::Value::String(a)) => a,
            Some(_) => return Err(ApiError::bad("\"action\" must be a string")),
            None => return Err(ApiError::bad("request has no \"action\"")),
        };
        let body = serde_json::Value::Object(map);
        let a = action.as_str();
        Ok(match a {
            "CreateVolumes" => Request::CreateVolumes(parse_params(a, body)?),
            "DescribeVolumes" => Request::DescribeVolumes(parse_params(a, body)?),
            "AttachVolumes" => Request::AttachVolumes(parse_params(a, body)?),
            "DetachVolumes" => Request::DetachVolumes(parse_params(a, body)?),
            "ResizeVolumes" => Request::ResizeVolumes(parse_params(a, body)?),
            "DeleteVolumes" => Request::DeleteVolumes(parse_params(a, body)?),
            "CreateSnapshots" => Request::CreateSnapshots(parse_params(a, body)?),
            "DescribeSnapshots" => Request::DescribeSnapshots(parse_params(a, body)?),
            "DeleteSnapshots" => Request::DeleteSnapshots(parse_params(a, body)?),
            "CreateVolumeFromSnapshot" => Request::CreateVolumeFromSnapshot(parse_params(a, body)?),
            "ApplySnapshots" => Request::ApplySnapshots(parse_params(a, body)?),
            "ModifySnapshotAttributes" => Request::ModifySnapshotAttributes(parse_params(a, body)?),
            "VerifySnapshots" => Request::VerifySnapshots(parse_params(a, body)?),
            "DescribeJobs" => Request::DescribeJobs(parse_params(a, body)?),
            other => {
                let shown: String = other.chars().take(64).collect();
                return Err(ApiError::bad(format!("unknown action {shown:?}")));
            }
        })
    }

    /// The action's name, as on the wire.
    pub fn action(&self) -> &'static str {
        match self {
            Request::CreateVolumes(_) => "CreateVolumes",
            Request::DescribeVolumes(_) => "DescribeVolumes",
            Request::AttachVolumes(_) => "AttachVolumes",
            Request::DetachVolumes(_) => "DetachVolumes",
            Request::ResizeVolumes(_) => "ResizeVolumes",
            Request::DeleteVolumes(_) => "DeleteVolumes",
            Request::CreateSnapshots(_) => "CreateSnapshots",
            Request::DescribeSnapshots(_) => "DescribeSnapshots",
            Request::DeleteSnapshots(_) => "DeleteSnapshots",
            Request::CreateVolumeFromSnapshot(_) => "CreateVolumeFromSnapshot",
            Request::ApplySnapshots(_) => "ApplySnapshots",
            Request::ModifySnapshotAttributes(_) => "ModifySnapshotAttributes",
            Request::VerifySnapshots(_) => "VerifySnapshots",
            Request::DescribeJobs(_) => "DescribeJobs",
        }
    }

    /// True for the read-only `describe-*` actions that `reader_group` may call.
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Request::DescribeVolumes(_) | Request::DescribeSnapshots(_) | Request::DescribeJobs(_)
        )
    }

    /// The `zone` parameter, when the caller gave one.
    pub fn zone(&self) -> Option<&str> {
        match self {
            Request::CreateVolumes(p) => p.zone.as_deref(),
            Request::DescribeVolumes(p) => p.zone.as_deref(),
            Request::AttachVolumes(p) => p.zone.as_deref(),
            Request::DetachVolumes(p) => p.zone.as_deref(),
            Request::ResizeVolumes(p) => p.zone.as_deref(),
            Request::DeleteVolumes(p) => p.zone.as_deref(),
            Request::CreateSnapshots(p) => p.zone.as_deref(),
            Request::DescribeSnapshots(p) => p.zone.as_deref(),
            Request::DeleteSnapshots(p) => p.zone.as_deref(),
            Request::CreateVolumeFromSnapshot(p) => p.zone.as_deref(),
            Request::ApplySnapshots(p) => p.zone.as_deref(),
            Request::ModifySnapshotAttributes(p) => p.zone.as_deref(),
            Request::VerifySnapshots(p) => p.zone.as_deref(),
            Request::DescribeJobs(p) => p.zone.as_deref(),
        }
    }

    /// The request as a wire body, `action` included (used by the control command).
    pub fn to_body(&self) -> serde_json::Value {
        let params = match self {
            Request::CreateVolumes(p) => serde_json::to_value(p),
            Request::DescribeVolumes(p) => serde_json::to_value(p),
            Request::AttachVolumes(p) => serde_json::to_value(p),
            Request::DetachVolumes(p) => serde_json::to_value(p),
            Request::ResizeVolumes(p) => serde_json::to_value(p),
            Request::DeleteVolumes(p) => serde_json::to_value(p),
            Request::CreateSnapshots(p) => serde_json::to_value(p),
            Request::DescribeSnapshots(p) => serde_json::to_value(p),
            Request::DeleteSnapshots(p) => serde_json::to_value(p),
            Request::CreateVolumeFromSnapshot(p) => serde_json::to_value(p),
            Request::ApplySnapshots(p) => serde_json::to_value(p),
            Request::ModifySnapshotAttributes(p) => serde_json::to_value(p),
            Request::VerifySnapshots(p) => serde_json::to_value(p),
            Request::DescribeJobs(p) => serde_json::to_value(p),
        };
        let mut value = params.unwrap_or_else(|_| serde_json::json!({}));
        if let serde_json::Value::Object(map) = &mut value {
            map.insert("action".into(), self.action().into());
        }
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ErrorKind;

    #[test]
    fn parses_a_qingcloud_request() {
        let r = Request::parse(br#"{"action":"CreateSnapshots","resources":["vol-df3m8oal"],"is_full":1,"snapshot_name":"full-snap","zone":"ap2a"}"#).unwrap();
        let Request::CreateSnapshots(p) = &r else {
            panic!("{r:?}")
        };
        assert_eq!(p.resources, vec!["vol-df3m8oal"]);
        assert_eq!(p.is_full, Some(1));
        assert_eq!(r.zone(), Some("ap2a"));
        assert_eq!(
            Request::parse(r.to_body().to_string().as_bytes()).unwrap(),
            r
        );
    }

    #[test]
    fn comma_lists_and_string_flags() {
        let r = Request::parse(
            br#"{"action":"DeleteSnapshots","snapshots":"ss-aaaaaaaa, ss-bbbbbbbb"}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::DeleteSnapshots(DeleteSnapshots {
                zone: None,
                snapshots: vec!["ss-aaaaaaaa".into(), "ss-bbbbbbbb".into()]
            })
        );
        let r = Request::parse(
            br#"{"action":"CreateSnapshots","resources":"vol-aaaaaaaa","is_full":"0"}"#,
        )
        .unwrap();
        assert!(matches!(
            r,
            Request::CreateSnapshots(CreateSnapshots {
                is_full: Some(0),
                ..
            })
        ));
    }

    #[test]
    fn bad_requests_are_1100_with_a_reason() {
        for (body, needle) in [
            (&br"{not json"[..], "not valid JSON"),
            (br"[1,2]", "JSON object"),
            (br#"{"volumes":[]}"#, "no \"action\""),
            (br#"{"action":"FormatDisk"}"#, "unknown action"),
            (br#"{"action":"CreateVolumes","size":"ten"}"#, "size"),
            (br#"{"action":"CreateVolumes","size":-1}"#, "size"),
            (br#"{"action":"CreateVolumes","colour":"red"}"#, "colour"),
            (br#"{"action":"CreateSnapshots","is_full":7}"#, "0 or 1"),
            (br#"{"action":"AttachVolumes","volumes":5}"#, "list"),
        ] {
            let e = Request::parse(body).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidArgument);
            assert!(
                e.message.contains(needle),
                "{:?} → {}",
                String::from_utf8_lossy(body),
                e.message
            );
        }
    }
}
