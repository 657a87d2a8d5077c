//! Wire types of the control protocol: requests, responses, return codes, ids and sizes.
//!
//! Shared by the daemon and the `blocksnap` command. Nothing here touches the engine,
//! the disk or the kernel: it is serde types and their parsers only.

mod ids;
mod items;
mod request;
mod size;

pub use ids::{new_job_id, new_snapshot_id, new_volume_id, IdKind, JobId, SnapshotId, VolumeId};
pub use items::{Job, Progress, Resource, Snapshot, Volume};
pub use request::split_list;
pub use request::{
    ApplySnapshots, AttachVolumes, CreateSnapshots, CreateVolumeFromSnapshot, CreateVolumes,
    DeleteSnapshots, DeleteVolumes, DescribeJobs, DescribeSnapshots, DescribeVolumes,
    DetachVolumes, ModifySnapshotAttributes, Request, ResizeVolumes, VerifySnapshots,
    MAX_BODY_BYTES,
};
pub use size::{parse_size, Size};

use serde::{Deserialize, Serialize};

/// The small set of error kinds every module's errors map to; each has one `ret_code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    InvalidArgument,
    PermissionDenied,
    NotFound,
    QuotaExceeded,
    Busy,
    Internal,
    Unavailable,
    Corrupt,
    Io,
}

impl ErrorKind {
    /// The contract's `ret_code` for this kind.
    pub fn ret_code(self) -> i32 {
        match self {
            ErrorKind::InvalidArgument => 1100,
            ErrorKind::PermissionDenied => 1400,
            ErrorKind::NotFound => 2100,
            ErrorKind::QuotaExceeded => 2400,
            ErrorKind::Busy => 2500,
            ErrorKind::Internal | ErrorKind::Io => 5000,
            ErrorKind::Unavailable => 5100,
            ErrorKind::Corrupt => 5300,
        }
    }

    /// The kind a `ret_code` stands for (`None` for 0 and unknown codes).
    pub fn from_ret_code(code: i32) -> Option<ErrorKind> {
        Some(match code {
            1100 => ErrorKind::InvalidArgument,
            1400 => ErrorKind::PermissionDenied,
            2100 => ErrorKind::NotFound,
            2400 => ErrorKind::QuotaExceeded,
            2500 => ErrorKind::Busy,
            5000 => ErrorKind::Internal,
            5100 => ErrorKind::Unavailable,
            5300 => ErrorKind::Corrupt,
            _ => return None,
        })
    }
}

/// An error as it travels on the wire: a kind and a message a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError {
            kind,
            message: message.into(),
        }
    }
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::InvalidArgument, message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::NotFound, message)
    }
    pub fn busy(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::Busy, message)
    }
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::Internal, message)
    }

    /// The response object for this error: `{"action": "<Action>Response", "ret_code", "message"}`.
    pub fn to_response(&self, action: &str) -> serde_json::Value {
        serde_json::json!({
            "action": response_action(action),
            "ret_code": self.kind.ret_code(),
            "message": self.message,
        })
    }
}

/// `CreateSnapshots` → `CreateSnapshotsResponse`; an empty or unknown action still gets a name.
pub fn response_action(action: &str) -> String {
    if action.is_empty() {
        "Response".to_string()
    } else {
        format!("{action}Response")
    }
}

/// Formats a time as RFC 3339 UTC with second precision and a `Z` suffix.
pub fn format_time(unix_secs: i64) -> String {
    // Civil-from-days (Howard Hinnant's algorithm): no time zone database is needed for UTC.
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_time(1_795_391_999), "2026-11-22T23:59:59Z");
    }

    #[test]
    fn ret_codes_round_trip() {
        for kind in [
            ErrorKind::InvalidArgument,
            ErrorKind::PermissionDenied,
            ErrorKind::NotFound,
            ErrorKind::QuotaExceeded,
            ErrorKind::Busy,
            ErrorKind::Internal,
            ErrorKind::Unavailable,
            ErrorKind::Corrupt,
        ] {
            assert_eq!(ErrorKind::from_ret_code(kind.ret_code()), Some(kind));
        }
    }
}
