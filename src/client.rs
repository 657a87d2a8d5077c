//! The control command's HTTP/1.1 client for the daemon's unix socket.
//!
//! One request per connection, as `curl --unix-socket` would send it: `POST /iaas/` with a
//! JSON body for the API, `GET /metrics` for Prometheus text. It depends only on
//! `crate::api` (for error kinds); it never reaches into the daemon or the engine.

use crate::api::ErrorKind;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use std::io;
use std::path::{Path, PathBuf};
use tokio::net::UnixStream;

/// The path every API call is posted to.
pub const API_PATH: &str = "/iaas/";

/// Why a call did not produce a response from the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("The daemon is not running: there is no socket at {path} (start blocksnapd, or point --socket / BLOCKSNAP_SOCKET at its socket)")]
    SocketMissing {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("The daemon is not running: nothing accepts connections on {path}")]
    NotRunning {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "Permission denied on the socket {path}: run as root or as a member of the socket's group"
    )]
    PermissionDenied {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot connect to the daemon at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot build the request for {uri}")]
    Request {
        uri: String,
        #[source]
        source: hyper::http::Error,
    },
    #[error("The HTTP exchange with the daemon at {path} failed")]
    Http {
        path: PathBuf,
        #[source]
        source: hyper::Error,
    },
    #[error("The daemon answered {status} with a body that is not a JSON object: {body}")]
    BadResponse { status: StatusCode, body: String },
    #[error("The daemon answered {status} for {uri}: {body}")]
    Status {
        uri: String,
        status: StatusCode,
        body: String,
    },
}

impl ClientError {
    /// The contract's error kind: permission problems are 1400, everything else means the
    /// daemon is unavailable (5100).
    pub fn kind(&self) -> ErrorKind {
        match self {
            ClientError::PermissionDenied { .. } => ErrorKind::PermissionDenied,
            ClientError::Request { .. } => ErrorKind::InvalidArgument,
            _ => ErrorKind::Unavailable,
        }
    }

    /// The message with its chain of sources, for a person to act on.
    pub fn message(&self) -> String {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        message
    }

    /// The QingCloud-shaped response a failed call prints: `{"action", "ret_code", "message"}`.
    pub fn to_response(&self, action: &str) -> serde_json::Value {
        crate::api::ApiError::new(self.kind(), self.message()).to_response(action)
    }
}

fn connect_error(path: &Path, source: io::Error) -> ClientError {
    let path = path.to_path_buf();
    match source.kind() {
        io::ErrorKind::NotFound => ClientError::SocketMissing { path, source },
        io::ErrorKind::ConnectionRefused => ClientError::NotRunning { path, source },
        io::ErrorKind::PermissionDenied => ClientError::PermissionDenied { path, source },
        _ => ClientError::Connect { path, source },
    }
}

/// Sends one request on a fresh connection and returns the status and the whole body.
async fn exchange(
    socket: &Path,
    method: Method,
    uri: &str,
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, Bytes), ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| connect_error(socket, e))?;
    let http = |source| ClientError::Http {
        path: socket.to_path_buf(),
        source,
    };
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(http)?;
    // The connection future drives the socket; it ends once `sender` is dropped.
    let driver = tokio::spawn(connection);

    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(uri)
        .header(HOST, HeaderValue::from_static("localhost"));
    if body.is_some() {
        builder = builder.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    let request = builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|source| ClientError::Request {
            uri: uri.to_string(),
            source,
        })?;
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(http)?
        .to_bytes();
    drop(sender);
    driver.abort();
    Ok((status, bytes))
}

/// Posts one API request (`{"action": ..., ...}`) and returns the daemon's JSON response.
///
/// Any JSON object the daemon answers with is returned, whatever its HTTP status: the
/// `ret_code` inside it is what tells success from failure.
pub async fn call(
    socket: &Path,
    body: &serde_json::Value,
) -> Result<serde_json::Value, ClientError> {
    let payload = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let (status, bytes) = exchange(socket, Method::POST, API_PATH, Some(payload)).await?;
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(value @ serde_json::Value::Object(_)) => Ok(value),
        _ => Err(ClientError::BadResponse {
            status,
            body: shorten(&bytes),
        }),
    }
}

/// GETs a path (such as `/metrics`) and returns its text; a non-2xx status is an error.
pub async fn get(socket: &Path, path: &str) -> Result<String, ClientError> {
    let (status, bytes) = exchange(socket, Method::GET, path, None).await?;
    if !status.is_success() {
        return Err(ClientError::Status {
            uri: path.to_string(),
            status,
            body: shorten(&bytes),
        });
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The first few hundred characters of a body, for an error message.
fn shorten(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut short: String = text.chars().take(300).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    short.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn missing_socket_says_the_daemon_is_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nope.sock");
        let e = call(&sock, &serde_json::json!({"action": "DescribeJobs"}))
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::SocketMissing { .. }), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        let r = e.to_response("DescribeJobs");
        assert_eq!(r["action"], "DescribeJobsResponse");
        assert_eq!(r["ret_code"], 5100);
        let m = r["message"].as_str().unwrap();
        assert!(m.contains("not running") && m.contains("nope.sock"), "{m}");
    }

    #[tokio::test]
    async fn stale_socket_says_the_daemon_is_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let e = get(&sock, "/metrics").await.unwrap_err();
        assert!(matches!(e, ClientError::NotRunning { .. }), "{e:?}");
        assert!(e.message().contains("not running"));
    }

    #[test]
    fn connect_failures_name_their_cause() {
        let path = Path::new("/run/blocksnap/blocksnap.sock");
        let e = connect_error(path, io::Error::from(io::ErrorKind::PermissionDenied));
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert!(e
            .message()
            .starts_with("Permission denied on the socket /run/blocksnap/blocksnap.sock"));
        let e = connect_error(path, io::Error::from(io::ErrorKind::ConnectionRefused));
        assert!(matches!(e, ClientError::NotRunning { .. }));
        let e = connect_error(path, io::Error::from(io::ErrorKind::NotFound));
        assert!(matches!(e, ClientError::SocketMissing { .. }));
        let e = connect_error(path, io::Error::from_raw_os_error(libc::ENOTSOCK));
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(
            e.message().starts_with("Cannot connect to the daemon at"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn long_bodies_are_shortened() {
        let s = shorten(&[b'x'; 1000]);
        assert!(s.chars().count() == 301 && s.ends_with('…'));
        assert_eq!(shorten(b" ok \n"), "ok");
    }
}
