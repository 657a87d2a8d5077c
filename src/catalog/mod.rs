//! The persistent catalog: volumes, snapshots, jobs and the freeze journal.
//!
//! SQLite in WAL mode with `synchronous=FULL`: every committed change survives a crash or a
//! power loss, several readers never block the writer, and the file is one well-understood
//! format that an administrator can inspect with `sqlite3`. The catalog is owned by the
//! daemon's manager; nothing else opens it. Snapshot rows are a cache of the store's
//! manifests plus status, so the store stays the source of truth for snapshot data.

mod rows;

pub use rows::{FrozenRow, JobRow, JobStatus, SnapshotRow, VolumeRow};

use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("Cannot open the catalog {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("Catalog query failed ({op})")]
    Query {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("Catalog write failed ({op})")]
    Write {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl CatalogError {
    pub fn kind(&self) -> crate::api::ErrorKind {
        match self {
            CatalogError::Open { .. } => crate::api::ErrorKind::Unavailable,
            CatalogError::Query { .. } | CatalogError::Write { .. } => {
                crate::api::ErrorKind::Internal
            }
        }
    }
}

type Result<T> = std::result::Result<T, CatalogError>;

fn q(op: &'static str) -> impl FnOnce(rusqlite::Error) -> CatalogError {
    move |source| CatalogError::Query { op, source }
}

/// The failpoint before a write to the catalog (each statement commits on its own).
fn write_point(op: &'static str, checked: std::io::Result<()>) -> Result<()> {
    checked.map_err(|source| CatalogError::Write { op, source })
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS volumes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    size_bytes INTEGER NOT NULL,
    status TEXT NOT NULL,
    transition_status TEXT NOT NULL DEFAULT '',
    backend TEXT NOT NULL,
    device TEXT NOT NULL DEFAULT '',
    attached INTEGER NOT NULL DEFAULT 0,
    owner TEXT NOT NULL,
    create_time INTEGER NOT NULL,
    status_time INTEGER NOT NULL,
    last_snapshot_time INTEGER,
    active_head TEXT
);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    volume_id TEXT NOT NULL,
    volume_name TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    is_taken INTEGER NOT NULL DEFAULT 0,
    parent_id TEXT,
    size_bytes INTEGER NOT NULL DEFAULT 0,
    virtual_size_bytes INTEGER NOT NULL,
    snapshot_time INTEGER NOT NULL,
    create_time INTEGER NOT NULL,
    status_time INTEGER NOT NULL,
    freeze_ms INTEGER NOT NULL DEFAULT 0,
    consistency TEXT NOT NULL DEFAULT 'crash',
    owner TEXT NOT NULL,
    job_id TEXT
);
CREATE INDEX IF NOT EXISTS snapshots_by_volume ON snapshots(volume_id);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    action TEXT NOT NULL,
    status TEXT NOT NULL,
    resource_ids TEXT NOT NULL,
    done_bytes INTEGER NOT NULL DEFAULT 0,
    total_bytes INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    error_code INTEGER,
    params TEXT NOT NULL DEFAULT '{}',
    create_time INTEGER NOT NULL,
    status_time INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS frozen (
    mountpoint TEXT PRIMARY KEY,
    volume_id TEXT NOT NULL,
    since INTEGER NOT NULL
);
";

/// The catalog database. Not `Sync`: the manager wraps it in a mutex.
pub struct Catalog {
    conn: Connection,
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Catalog {
    /// Opens (creating if needed) the catalog at `path`.
    pub fn open(path: &Path) -> Result<Catalog> {
        let err = |source| CatalogError::Open {
            path: path.into(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(Catalog { conn })
    }

    /// An in-memory catalog for unit tests.
    pub fn in_memory() -> Result<Catalog> {
        let conn = Connection::open_in_memory().map_err(q("open in memory"))?;
        conn.execute_batch(SCHEMA).map_err(q("schema"))?;
        Ok(Catalog { conn })
    }

    /// Runs `f` as one transaction: everything it writes is committed together, or (on an
    /// error, or a crash before the commit) none of it. A daemon killed between two writes of
    /// one logical change (a snapshot made `available` and its volume's chain head moved to
    /// it) must not leave half of it.
    pub fn atomically<T>(&self, f: impl FnOnce(&Catalog) -> Result<T>) -> Result<T> {
        if !self.conn.is_autocommit() {
            // A caller that panicked mid-transaction: what it wrote is not trusted.
            self.conn
                .execute_batch("ROLLBACK")
                .map_err(q("roll back an abandoned transaction"))?;
        }
        self.conn
            .execute_batch("BEGIN")
            .map_err(q("begin a transaction"))?;
        match f(self) {
            Ok(v) => {
                if let Err(e) = self.conn.execute_batch("COMMIT") {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    return Err(q("commit a transaction")(e));
                }
                Ok(v)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Every row a query returns, converted by `from_row`.
    fn all<T>(
        &self,
        sql: &str,
        op: &'static str,
        from_row: fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>> {
        let mut st = self.conn.prepare(sql).map_err(q(op))?;
        let rows = st.query_map([], from_row).map_err(q(op))?;
        rows.collect::<std::result::Result<_, _>>().map_err(q(op))
    }

    // ---- volumes

    pub fn insert_volume(&self, v: &VolumeRow) -> Result<()> {
        write_point(
            "insert volume",
            crate::failpoint::check("catalog.volume.write"),
        )?;
        self.conn
            .execute(
                "INSERT INTO volumes (id, name, description, size_bytes, status, transition_status,
                 backend, device, attached, owner, create_time, status_time, last_snapshot_time,
                 active_head) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14)",
                params![
                    v.id,
                    v.name,
                    v.description,
                    v.size_bytes as i64,
                    v.status,
                    v.transition_status,
                    v.backend,
                    v.device,
                    v.attached,
                    v.owner,
                    v.create_time,
                    v.status_time,
                    v.last_snapshot_time,
                    v.active_head
                ],
            )
            .map_err(q("insert volume"))?;
        Ok(())
    }

    /// Writes every column of an existing volume row.
    pub fn update_volume(&self, v: &VolumeRow) -> Result<()> {
        write_point(
            "update volume",
            crate::failpoint::check("catalog.volume.write"),
        )?;
        self.conn
            .execute(
                "UPDATE volumes SET name=?2, description=?3, size_bytes=?4, status=?5,
                 transition_status=?6, backend=?7, device=?8, attached=?9, owner=?10,
                 create_time=?11, status_time=?12, last_snapshot_time=?13, active_head=?14
                 WHERE id=?1",
                params![
                    v.id,
                    v.name,
                    v.description,
                    v.size_bytes as i64,
                    v.status,
                    v.transition_status,
                    v.backend,
                    v.device,
                    v.attached,
                    v.owner,
                    v.create_time,
                    v.status_time,
                    v.last_snapshot_time,
                    v.active_head
                ],
            )
            .map_err(q("update volume"))?;
        Ok(())
    }

    pub fn volume(&self, id: &str) -> Result<Option<VolumeRow>> {
        self.conn
            .query_row(
                &format!("SELECT {} FROM volumes WHERE id=?1", VolumeRow::COLUMNS),
                [id],
                VolumeRow::from_row,
            )
            .optional()
            .map_err(q("select volume"))
    }

    /// Every volume, oldest first (deleted ones included).
    pub fn volumes(&self) -> Result<Vec<VolumeRow>> {
        self.all(
            &format!(
                "SELECT {} FROM volumes ORDER BY create_time, rowid",
                VolumeRow::COLUMNS
            ),
            "select volumes",
            VolumeRow::from_row,
        )
    }

    // ---- snapshots

    pub fn upsert_snapshot(&self, s: &SnapshotRow) -> Result<()> {
        write_point(
            "upsert snapshot",
            crate::failpoint::check("catalog.snapshot.write"),
        )?;
        self.conn
            .execute(
                "INSERT OR REPLACE INTO snapshots (id, volume_id, volume_name, name, description, status,
                 is_taken, parent_id, size_bytes, virtual_size_bytes, snapshot_time, create_time,
                 status_time, freeze_ms, consistency, owner, job_id)
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17)",
                params![
                    s.id, s.volume_id, s.volume_name, s.name, s.description, s.status, s.is_taken,
                    s.parent_id, s.size_bytes as i64, s.virtual_size_bytes as i64, s.snapshot_time,
                    s.create_time, s.status_time, s.freeze_ms as i64, s.consistency, s.owner, s.job_id
                ],
            )
            .map_err(q("upsert snapshot"))?;
        Ok(())
    }

    pub fn snapshot(&self, id: &str) -> Result<Option<SnapshotRow>> {
        self.conn
            .query_row(
                &format!("SELECT {} FROM snapshots WHERE id=?1", SnapshotRow::COLUMNS),
                [id],
                SnapshotRow::from_row,
            )
            .optional()
            .map_err(q("select snapshot"))
    }

    /// Every snapshot, oldest first.
    pub fn snapshots(&self) -> Result<Vec<SnapshotRow>> {
        self.all(
            &format!(
                "SELECT {} FROM snapshots ORDER BY snapshot_time, create_time, rowid",
                SnapshotRow::COLUMNS
            ),
            "select snapshots",
            SnapshotRow::from_row,
        )
    }

    pub fn delete_snapshot_row(&self, id: &str) -> Result<()> {
        write_point(
            "delete snapshot",
            crate::failpoint::check("catalog.snapshot.write"),
        )?;
        self.conn
            .execute("DELETE FROM snapshots WHERE id=?1", [id])
            .map_err(q("delete snapshot"))?;
        Ok(())
    }

    // ---- jobs

    pub fn upsert_job(&self, j: &JobRow) -> Result<()> {
        write_point("upsert job", crate::failpoint::check("catalog.job.write"))?;
        self.conn
            .execute(
                "INSERT OR REPLACE INTO jobs (id, action, status, resource_ids, done_bytes, total_bytes,
                 error, error_code, params, create_time, status_time)
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11)",
                params![
                    j.id, j.action, j.status.as_str(), serde_json::to_string(&j.resource_ids).unwrap_or_default(),
                    j.done_bytes as i64, j.total_bytes as i64, j.error, j.error_code, j.params.to_string(),
                    j.create_time, j.status_time
                ],
            )
            .map_err(q("upsert job"))?;
        Ok(())
    }

    pub fn job(&self, id: &str) -> Result<Option<JobRow>> {
        self.conn
            .query_row(
                &format!("SELECT {} FROM jobs WHERE id=?1", JobRow::COLUMNS),
                [id],
                JobRow::from_row,
            )
            .optional()
            .map_err(q("select job"))
    }

    /// Every job, oldest first.
    pub fn jobs(&self) -> Result<Vec<JobRow>> {
        self.all(
            &format!(
                "SELECT {} FROM jobs ORDER BY create_time, rowid",
                JobRow::COLUMNS
            ),
            "select jobs",
            JobRow::from_row,
        )
    }

    // ---- freeze journal

    /// Records, durably, that `mountpoint` is about to be frozen for `volume_id`.
    pub fn record_frozen(&self, mountpoint: &str, volume_id: &str) -> Result<()> {
        write_point(
            "record frozen",
            crate::failpoint::check("catalog.frozen.write"),
        )?;
        self.conn
            .execute(
                "INSERT OR REPLACE INTO frozen (mountpoint, volume_id, since) VALUES (?1, ?2, ?3)",
                params![mountpoint, volume_id, now()],
            )
            .map_err(q("record frozen"))?;
        Ok(())
    }

    pub fn clear_frozen(&self, mountpoint: &str) -> Result<()> {
        write_point(
            "clear frozen",
            crate::failpoint::check("catalog.frozen.write"),
        )?;
        self.conn
            .execute("DELETE FROM frozen WHERE mountpoint=?1", [mountpoint])
            .map_err(q("clear frozen"))?;
        Ok(())
    }

    pub fn frozen(&self) -> Result<Vec<FrozenRow>> {
        let mut st = self
            .conn
            .prepare("SELECT mountpoint, volume_id, since FROM frozen")
            .map_err(q("select frozen"))?;
        let rows = st
            .query_map([], |r| {
                Ok(FrozenRow {
                    mountpoint: r.get(0)?,
                    volume_id: r.get(1)?,
                    since: r.get(2)?,
                })
            })
            .map_err(q("select frozen"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(q("select frozen"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(id: &str) -> VolumeRow {
        VolumeRow {
            id: id.into(),
            name: "v".into(),
            description: String::new(),
            size_bytes: 1 << 30,
            status: "available".into(),
            transition_status: String::new(),
            backend: "loop".into(),
            device: String::new(),
            attached: false,
            owner: "root".into(),
            create_time: 1,
            status_time: 1,
            last_snapshot_time: None,
            active_head: None,
        }
    }

    #[test]
    fn rows_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        {
            let c = Catalog::open(&path).unwrap();
            c.insert_volume(&volume("vol-aaaaaaaa")).unwrap();
            let mut v = c.volume("vol-aaaaaaaa").unwrap().unwrap();
            v.attached = true;
            v.device = "/dev/loop9".into();
            c.update_volume(&v).unwrap();
            let job = JobRow::new(
                "j-aaaaaaaaaaa",
                "CreateVolumes",
                vec!["vol-aaaaaaaa".into()],
                serde_json::json!({"x": 1}),
            );
            c.upsert_job(&job).unwrap();
            c.record_frozen("/mnt/x", "vol-aaaaaaaa").unwrap();
        }
        let c = Catalog::open(&path).unwrap();
        let v = c.volume("vol-aaaaaaaa").unwrap().unwrap();
        assert!(v.attached);
        assert_eq!(v.device, "/dev/loop9");
        let j = c.job("j-aaaaaaaaaaa").unwrap().unwrap();
        assert_eq!(j.status, JobStatus::Pending);
        assert_eq!(j.resource_ids, vec!["vol-aaaaaaaa".to_string()]);
        assert_eq!(j.params["x"], 1);
        assert_eq!(c.frozen().unwrap().len(), 1);
        c.clear_frozen("/mnt/x").unwrap();
        assert!(c.frozen().unwrap().is_empty());
        assert!(c.volume("vol-bbbbbbbb").unwrap().is_none());
    }
}
