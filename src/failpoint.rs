//! Injected I/O faults and crash points, for tests only.
//!
//! Every site where the daemon writes, syncs or renames something durable calls
//! [`check`] with a stable name (`store.blob.fsync`, `catalog.commit`, ...). In a normal build
//! this compiles to nothing. Built with `--features failpoints`, the daemon reads the
//! `FAILPOINTS` environment variable at start (`name=action;name=action`, the `fail` crate's
//! syntax) and a site can then:
//!
//! - `return` — fail with an injected I/O error, every time ("forever");
//! - `1*return` — fail once, then behave;
//! - `return(enospc)` — fail with `ENOSPC`;
//! - `3*off->return(kill)` — let 3 hits pass, then SIGKILL the whole process at the 4th:
//!   a crash at an exact point, before the operation the site guards.
//!
//! Site names are listed in [`SITES`] so tests can enumerate them.

use std::io;

/// Every failpoint site in the daemon. Keep in sync with the `check` calls (a unit test
/// greps the sources for them).
pub const SITES: &[&str] = &[
    "store.blob.create",
    "store.blob.write",
    "store.blob.fsync",
    "store.blob.rename",
    "store.dir.fsync",
    "store.delete",
    // Volume images (create, grow, roll back, restore target) and their directory.
    "volume.image.create",
    "volume.image.resize",
    "volume.image.fsync",
    "volume.dir.fsync",
    // Catalog: before each SQLite write (each commits on its own, `synchronous=FULL`).
    "catalog.volume.write",
    "catalog.snapshot.write",
    "catalog.job.write",
    "catalog.frozen.write",
    // NBD export data (write, FLUSH/FUA), the change-tracking bitmap and its base marker.
    "nbd.export.write",
    "nbd.export.fsync",
    "nbd.cbt.write",
    "nbd.cbt.fsync",
    "nbd.cbt-base.rename",
    // Lazy restore: the hydration map and the volume's marker.
    "nbd.hydration-map.write",
    "nbd.hydration-map.fsync",
    "lazy.marker.write",
    // Restore: the new volume's image as the store writes it.
    "restore.target.write",
    "restore.target.fsync",
];

/// Passes unless a failpoint named `name` is configured to fail or kill here.
#[inline]
pub fn check(name: &str) -> io::Result<()> {
    #[cfg(feature = "failpoints")]
    fail::fail_point!(name, |arg: Option<String>| Err(injected(
        name,
        arg.as_deref()
    )));
    let _ = name;
    Ok(())
}

/// Installs the failpoints named in `FAILPOINTS`. Without the `failpoints` feature, a
/// non-empty `FAILPOINTS` is refused loudly rather than ignored. With
/// `FAILPOINTS_ARM=ready` they are only checked here and installed by [`arm_deferred`],
/// once the daemon has recovered (so a crash point is never spent on the start itself).
pub fn setup_from_env() -> Result<(), String> {
    let spec = std::env::var("FAILPOINTS").unwrap_or_default();
    if spec.trim().is_empty() {
        return Ok(());
    }
    #[cfg(feature = "failpoints")]
    {
        let parsed = parse(&spec)?;
        if std::env::var("FAILPOINTS_ARM").as_deref() == Ok("ready") {
            let _ = DEFERRED.set(parsed);
            return Ok(());
        }
        install(&parsed)
    }
    #[cfg(not(feature = "failpoints"))]
    Err(
        "FAILPOINTS is set but this build has no failpoints (build with --features failpoints)"
            .into(),
    )
}

/// Installs failpoints deferred by `FAILPOINTS_ARM=ready` (a no-op otherwise).
pub fn arm_deferred() -> Result<(), String> {
    #[cfg(feature = "failpoints")]
    if let Some(parsed) = DEFERRED.get() {
        return install(parsed);
    }
    Ok(())
}

#[cfg(feature = "failpoints")]
static DEFERRED: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();

#[cfg(feature = "failpoints")]
fn parse(spec: &str) -> Result<Vec<(String, String)>, String> {
    spec.split(';')
        .filter(|p| !p.trim().is_empty())
        .map(|part| {
            part.split_once('=')
                .map(|(n, a)| (n.trim().to_string(), a.trim().to_string()))
                .ok_or_else(|| format!("FAILPOINTS: {part:?} is not name=action"))
        })
        .collect()
}

#[cfg(feature = "failpoints")]
fn install(parsed: &[(String, String)]) -> Result<(), String> {
    for (name, action) in parsed {
        fail::cfg(name.as_str(), action).map_err(|e| format!("FAILPOINTS: {name}: {e}"))?;
    }
    tracing::warn!(?parsed, "failpoints installed (test build)");
    Ok(())
}

#[cfg(feature = "failpoints")]
fn injected(name: &str, arg: Option<&str>) -> io::Error {
    match arg {
        Some("kill") => {
            tracing::warn!(site = name, "failpoint: SIGKILL");
            let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::SIGKILL);
            // SIGKILL cannot be caught; should delivery lag, never go past the site.
            loop {
                std::thread::park();
            }
        }
        Some("enospc") => io::Error::from_raw_os_error(libc::ENOSPC),
        _ => io::Error::other(format!("injected I/O error at failpoint {name}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `check("...")` in the sources names a site in `SITES`, and every site is used.
    #[test]
    fn sites_match_the_sources() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut used = std::collections::BTreeSet::new();
        let mut stack = vec![root];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).expect("read src") {
                let p = e.expect("entry").path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("failpoint.rs") {
                    let text = std::fs::read_to_string(&p).expect("read source");
                    for piece in text.split("failpoint::check(\"").skip(1) {
                        if let Some(end) = piece.find('"') {
                            used.insert(piece[..end].to_string());
                        }
                    }
                }
            }
        }
        let listed: std::collections::BTreeSet<String> =
            SITES.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            used, listed,
            "failpoint::SITES and the check() calls differ"
        );
    }
}
