//! The control socket: HTTP/1.1 over a unix socket, one route table, peer credentials.
//!
//! The only place that knows HTTP. Each connection's peer credentials (SO_PEERCRED) decide
//! what it may do; handlers hand parsed requests to the manager and never touch state.

use super::auth::{Access, Caller};
use super::manager::Manager;
use crate::api::{ApiError, Request, MAX_BODY_BYTES};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio::sync::Semaphore;

/// At most this many connections are served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 4096;
/// A client must send its headers within this time, and its body within `BODY_TIMEOUT`.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

type Response = hyper::Response<Full<Bytes>>;

/// Serves `listener` until `shutdown` resolves; open connections are then closed gracefully.
pub async fn serve(
    listener: UnixListener,
    manager: Arc<Manager>,
    shutdown: impl Future<Output = ()>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (close_tx, close_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed on the control socket");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let caller = match stream.peer_cred() {
            Ok(cred) => Caller::from_cred(cred.uid(), cred.gid(), cred.pid()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read peer credentials; closing connection");
                continue;
            }
        };
        let manager = manager.clone();
        let mut close_rx = close_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let caller = Arc::new(caller);
            let service = hyper::service::service_fn(move |req| {
                let manager = manager.clone();
                let caller = caller.clone();
                async move { Ok::<_, std::convert::Infallible>(route(req, &manager, &caller).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { tracing::debug!(error = %e, "control connection ended with an error") },
                _ = close_rx.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
        });
    }
    let _ = close_tx.send(true);
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| hyper::Response::new(Full::new(Bytes::new())))
}

async fn route(req: hyper::Request<Incoming>, manager: &Arc<Manager>, caller: &Caller) -> Response {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/iaas/" | "/iaas" | "/") => {
            let (value, action, code) = iaas(req, manager, caller).await;
            manager.metrics().count_request(&action, code);
            json_response(StatusCode::OK, &value)
        }
        (&Method::GET, "/metrics") => {
            // Counts of what exists are a description: readers may see them, strangers not.
            if caller.access(&manager.config()) == Access::None {
                let e = refusal(caller, "GET /metrics");
                return json_response(StatusCode::FORBIDDEN, &e.to_response(""));
            }
            let text = manager.render_metrics();
            hyper::Response::builder()
                .header("content-type", "text/plain; version=0.0.4")
                .body(Full::new(Bytes::from(text)))
                .unwrap_or_else(|_| hyper::Response::new(Full::new(Bytes::new())))
        }
        // For `blocksnap --wait` (not part of the API): answers `{"ended": true}` as soon as
        // the job `job_id` is no longer waiting or running, `{"ended": false}` after
        // `timeout_ms` (at most 5 s). The caller then asks DescribeJobs for the job's state.
        (&Method::GET, "/jobs/wait") => {
            if caller.access(&manager.config()) == Access::None {
                let e = refusal(caller, "GET /jobs/wait");
                return json_response(StatusCode::FORBIDDEN, &e.to_response(""));
            }
            let (mut job, mut ms) = (None, 1000u64);
            for (k, v) in req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .filter_map(|kv| kv.split_once('='))
            {
                match k {
                    "job_id" => job = Some(v.to_string()),
                    "timeout_ms" => ms = v.parse().unwrap_or(ms),
                    _ => {}
                }
            }
            let Some(job) = job else {
                let e = ApiError::bad("GET /jobs/wait needs ?job_id=");
                return json_response(StatusCode::BAD_REQUEST, &e.to_response(""));
            };
            let timeout = Duration::from_millis(ms.min(5000));
            let ended = manager.jobs().wait_ended(&job, timeout).await;
            json_response(StatusCode::OK, &serde_json::json!({ "ended": ended }))
        }
        (_, path) => {
            let path: String = path.chars().take(128).collect();
            let e = ApiError::bad(format!(
                "no such endpoint: {} {path} (use POST /iaas/ or GET /metrics)",
                req.method()
            ));
            json_response(StatusCode::NOT_FOUND, &e.to_response(""))
        }
    }
}

/// Reads, parses, authorizes and runs one request; returns the response, the action name
/// (for metrics) and the ret_code.
async fn iaas(
    req: hyper::Request<Incoming>,
    manager: &Arc<Manager>,
    caller: &Caller,
) -> (serde_json::Value, String, i32) {
    let body = match tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY_BYTES).collect(),
    )
    .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            let e = if e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ApiError::bad(format!(
                    "request body is larger than {} bytes",
                    MAX_BODY_BYTES
                ))
            } else {
                ApiError::bad(format!("cannot read the request body: {e}"))
            };
            return (e.to_response(""), "invalid".into(), e.kind.ret_code());
        }
        Err(_) => {
            let e = ApiError::bad("the request body did not arrive in time");
            return (e.to_response(""), "invalid".into(), e.kind.ret_code());
        }
    };
    // A stranger gets 1400 whatever it sent: the body is not even parsed for it.
    let access = caller.access(&manager.config());
    if access == Access::None {
        let action = action_name(&body);
        let e = refusal(
            caller,
            if action.is_empty() {
                "the API"
            } else {
                &action
            },
        );
        return (e.to_response(&action), "denied".into(), e.kind.ret_code());
    }
    let request = match Request::parse(&body) {
        Ok(r) => r,
        Err(e) => {
            let action = action_name(&body);
            return (e.to_response(&action), "invalid".into(), e.kind.ret_code());
        }
    };
    let action = request.action().to_string();
    let allowed = match access {
        Access::Admin => true,
        Access::Reader => request.is_read_only(),
        Access::None => false,
    };
    if !allowed {
        let e = refusal(caller, &action);
        return (e.to_response(&action), action, e.kind.ret_code());
    }
    match manager.handle(request, caller).await {
        Ok(mut value) => {
            if let serde_json::Value::Object(map) = &mut value {
                map.insert("action".into(), crate::api::response_action(&action).into());
                map.insert("ret_code".into(), 0.into());
            }
            (value, action, 0)
        }
        Err(e) => {
            tracing::debug!(action, error = %e.message, "request refused");
            (e.to_response(&action), action.clone(), e.kind.ret_code())
        }
    }
}

/// The 1400 answer for a caller who may not call `what`.
fn refusal(caller: &Caller, what: &str) -> ApiError {
    ApiError::new(
        crate::api::ErrorKind::PermissionDenied,
        format!(
            "user {} (uid {}) may not call {what}",
            caller.user, caller.uid
        ),
    )
}

/// The `action` of an unparsable request, when it has a recognisable one, for the response name.
fn action_name(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("action").and_then(|a| a.as_str()).map(String::from))
        .filter(|a| a.len() <= 64 && a.chars().all(|c| c.is_ascii_alphanumeric()))
        .unwrap_or_default()
}
