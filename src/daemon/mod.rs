//! The daemon: binds the control socket, recovers, serves, and stops cleanly.
//!
//! `run` is the whole life of `blocksnapd`: recovery first (thaw what a previous run froze,
//! finish or fail interrupted work, re-attach volumes), then READY=1, then serving until
//! SIGTERM/SIGINT; SIGHUP reloads the configuration.

mod auth;
mod capture;
mod jobs;
mod lazy;
mod manager;
mod metrics;
mod nbd_capture;
mod recovery;
mod server;
mod snapshots;
mod volumes;

pub use auth::Caller;
pub use manager::Manager;

use crate::config::Config;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("Cannot create directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Another daemon is already listening on {path}")]
    SocketInUse { path: PathBuf },
    #[error("Cannot bind socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot set owner or mode of socket {path}")]
    SocketPerms {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("socket_group {group:?} does not exist")]
    NoSuchGroup { group: String },
    #[error("Cannot open the catalog")]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error("Cannot open the snapshot store")]
    Store(#[from] crate::store::StoreError),
    #[error("Cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("Recovery failed: {0}")]
    Recovery(String),
}

/// Where to reload the configuration from on SIGHUP.
pub struct ConfigSource {
    pub path: PathBuf,
    pub explicit: bool,
    pub state_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, crate::config::ConfigError> {
        let mut c = Config::load(&self.path, self.explicit)?;
        if let Some(d) = &self.state_dir {
            c.state_dir = d.clone();
        }
        if let Some(s) = &self.socket {
            c.socket = s.clone();
        }
        Ok(c)
    }
}

fn create_dir(path: &Path, mode: u32) -> Result<(), DaemonError> {
    std::fs::create_dir_all(path).map_err(|source| DaemonError::CreateDir {
        path: path.into(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        DaemonError::CreateDir {
            path: path.into(),
            source,
        }
    })
}

/// Binds a unix socket at `path`, replacing a stale socket file but never a live daemon's.
/// Binds `[nbd] tcp` (validated as a loopback address by the config) when set.
async fn bind_nbd_tcp(addr: &str) -> Result<Option<tokio::net::TcpListener>, DaemonError> {
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Bind {
            path: PathBuf::from(format!("tcp:{addr}")),
            source,
        })?;
    // TCP carries no peer credentials: every local user can reach a loopback port.
    tracing::warn!(%addr, "NBD also served on TCP: any local user can connect to it");
    Ok(Some(listener))
}

pub fn bind_socket(
    path: &Path,
    mode: u32,
    group: Option<&str>,
) -> Result<tokio::net::UnixListener, DaemonError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| DaemonError::CreateDir {
            path: parent.into(),
            source,
        })?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::SocketInUse { path: path.into() });
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|source| DaemonError::Bind {
        path: path.into(),
        source,
    })?;
    let perms = |source| DaemonError::SocketPerms {
        path: path.into(),
        source,
    };
    if let Some(group) = group {
        let gid = auth::group_gid(group).ok_or_else(|| DaemonError::NoSuchGroup {
            group: group.into(),
        })?;
        nix::unistd::chown(path, None, Some(gid)).map_err(|e| perms(std::io::Error::from(e)))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(perms)?;
    Ok(listener)
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config, source: ConfigSource) -> Result<(), DaemonError> {
    create_dir(&config.state_dir, 0o700)?;
    create_dir(&config.state_dir.join("volumes"), 0o700)?;
    create_dir(&config.state_dir.join("tmp"), 0o700)?;
    let catalog = crate::catalog::Catalog::open(&config.state_dir.join("catalog.db"))?;
    // Thawing comes before anything else that could wait: a filesystem frozen by a previous
    // run blocks its writers until we get here.
    recovery::thaw_leftovers(&catalog);
    let store_path = config.store_path();
    std::fs::create_dir_all(&store_path).map_err(|source| DaemonError::CreateDir {
        path: store_path.clone(),
        source,
    })?;
    let store = crate::store::Store::open(&store_path)?;
    let manager = Arc::new(Manager::new(config.clone(), catalog, store));
    let mode = config.socket_mode_bits().unwrap_or(0o660);
    let listener = bind_socket(&config.socket, mode, Some(&config.socket_group))?;
    // The NBD server does not check peer credentials, and a connection to it reads and writes
    // volume data: only root and `admin_group` may connect, whatever the control socket allows.
    let nbd_group = if auth::group_gid(&config.admin_group).is_some() {
        config.admin_group.as_str()
    } else {
        "root"
    };
    let nbd_listener = bind_socket(&config.nbd_socket_path(), mode & 0o770, Some(nbd_group))?;
    let nbd_tcp = bind_nbd_tcp(&config.nbd.tcp).await?;
    recovery::recover(&manager).map_err(|e| DaemonError::Recovery(e.message))?;
    crate::failpoint::arm_deferred().map_err(DaemonError::Recovery)?;

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(DaemonError::Signals)?;
    let handle = signals.handle();
    let (sig_tx, mut sig_rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for s in signals.forever() {
                if sig_tx.send(s).is_err() {
                    break;
                }
            }
        })
        .map_err(DaemonError::Signals)?;

    let wait_shutdown = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let server = tokio::spawn(server::serve(
        listener,
        manager.clone(),
        wait_shutdown(shutdown_rx.clone()),
    ));
    let nbd = {
        let nbd = manager.nbd.clone();
        let rx = shutdown_rx.clone();
        tokio::spawn(async move { nbd.serve_unix(nbd_listener, wait_shutdown(rx)).await })
    };
    let nbd_tcp = nbd_tcp.map(|listener| {
        let nbd = manager.nbd.clone();
        let rx = shutdown_rx.clone();
        tokio::spawn(async move { nbd.serve_tcp(listener, wait_shutdown(rx)).await })
    });
    let watchdog = start_watchdog();
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status("idle"),
        ],
    );
    tracing::info!(socket = %config.socket.display(), state_dir = %config.state_dir.display(), "blocksnapd ready");

    while let Some(sig) = sig_rx.recv().await {
        if sig == signal_hook::consts::SIGHUP {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
            match source
                .load()
                .map_err(|e| e.to_string())
                .and_then(|c| manager.reload(c))
            {
                Ok(()) => tracing::info!("configuration reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "configuration not reloaded; keeping the old one")
                }
            }
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
            continue;
        }
        tracing::info!(signal = sig, "stopping");
        break;
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let _ = shutdown_tx.send(true);
    manager.jobs().shutdown(Duration::from_secs(20)).await;
    let _ = server.await;
    let _ = nbd.await;
    if let Some(t) = nbd_tcp {
        let _ = t.await;
    }
    manager.close_trackers();
    if let Some(w) = watchdog {
        w.abort();
    }
    handle.close();
    for p in [&config.socket, &config.nbd_socket_path()] {
        let _ = std::fs::remove_file(p);
    }
    tracing::info!("blocksnapd stopped");
    Ok(())
}

/// Pings systemd's watchdog at half its interval when `WatchdogSec=` is set.
fn start_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    let period = Duration::from_micros(usec / 2);
    Some(tokio::spawn(async move {
        loop {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            tokio::time::sleep(period).await;
        }
    }))
}
