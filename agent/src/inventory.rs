//! The inventory: VM definitions, exit records and metering, in one SQLite database
//! (`<state-dir>/inventory.db`, WAL journal, synchronous=FULL: a definition that was
//! acknowledged survives a crash of vireod or of the host).

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use crate::model::{ExitRecord, MeteringReport, MigrationRecord, VmDefinition};
use crate::AgentError;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY NOT NULL,
    definition TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS exits (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    status INTEGER,
    signal INTEGER,
    reason TEXT NOT NULL,
    serial_tail TEXT NOT NULL,
    vmm_log_tail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS exits_by_name ON exits(name, id);
CREATE TABLE IF NOT EXISTS meter (
    name TEXT PRIMARY KEY NOT NULL,
    since_ms INTEGER NOT NULL,
    sampled_at_ms INTEGER NOT NULL DEFAULT 0,
    running_ms INTEGER NOT NULL DEFAULT 0,
    cpu_ns INTEGER NOT NULL DEFAULT 0,
    mem_sum INTEGER NOT NULL DEFAULT 0,
    mem_samples INTEGER NOT NULL DEFAULT 0,
    mem_min INTEGER NOT NULL DEFAULT 0,
    mem_max INTEGER NOT NULL DEFAULT 0,
    disk_read INTEGER NOT NULL DEFAULT 0,
    disk_write INTEGER NOT NULL DEFAULT 0,
    read_ops INTEGER NOT NULL DEFAULT 0,
    write_ops INTEGER NOT NULL DEFAULT 0,
    last_pid INTEGER NOT NULL DEFAULT 0,
    last_start INTEGER NOT NULL DEFAULT 0,
    last_at_ms INTEGER NOT NULL DEFAULT 0,
    last_cpu_ns INTEGER NOT NULL DEFAULT 0,
    last_read INTEGER NOT NULL DEFAULT 0,
    last_write INTEGER NOT NULL DEFAULT 0,
    last_read_ops INTEGER NOT NULL DEFAULT 0,
    last_write_ops INTEGER NOT NULL DEFAULT 0,
    net_rx INTEGER NOT NULL DEFAULT 0,
    net_tx INTEGER NOT NULL DEFAULT 0,
    last_net_rx INTEGER NOT NULL DEFAULT 0,
    last_net_tx INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS samples (
    name TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    cpu_ns INTEGER NOT NULL,
    rss_bytes INTEGER NOT NULL,
    disk_read INTEGER NOT NULL,
    disk_write INTEGER NOT NULL,
    net_rx INTEGER NOT NULL DEFAULT 0,
    net_tx INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS samples_by_time ON samples(at_ms);
CREATE TABLE IF NOT EXISTS jail_ids (
    name TEXT PRIMARY KEY NOT NULL,
    uid INTEGER NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS replications (
    name TEXT PRIMARY KEY NOT NULL,
    settings TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS migrations (
    id TEXT PRIMARY KEY NOT NULL,
    queued_ms INTEGER NOT NULL,
    record TEXT NOT NULL
);
";

/// Columns added after the first release: (table, column), added to an older
/// database when it is opened (`CREATE TABLE IF NOT EXISTS` leaves old tables alone).
const ADDED_COLUMNS: &[(&str, &str)] = &[
    ("meter", "net_rx"),
    ("meter", "net_tx"),
    ("meter", "last_net_rx"),
    ("meter", "last_net_tx"),
    ("samples", "net_rx"),
    ("samples", "net_tx"),
];

/// Raw samples older than this are dropped (the `meter` totals keep their sum).
const SAMPLE_RETENTION_MS: u64 = 24 * 3600 * 1000;

/// One reading of a running VMM: cumulative values of that process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    pub name: String,
    pub at_ms: u64,
    pub pid: i32,
    /// The process's start time (with `pid`, tells a restarted VMM from the same one).
    pub start_ticks: u64,
    /// How long this process has run (counts the time before its first sample).
    pub age_ms: u64,
    pub cpu_ns: u64,
    pub rss_bytes: u64,
    pub disk_read: u64,
    pub disk_write: u64,
    pub read_ops: u64,
    pub write_ops: u64,
    /// Bytes the guest received and sent on its network devices.
    pub net_rx: u64,
    pub net_tx: u64,
}

/// A VM's previous reading in `meter`: pid, start, at, cpu, read, write, read ops,
/// write ops, net rx, net tx.
type LastReading = (i64, i64, i64, i64, i64, i64, i64, i64, i64, i64);

/// Adds the columns of [`ADDED_COLUMNS`] an older database lacks.
fn add_missing_columns(conn: &Connection) -> rusqlite::Result<()> {
    for (table, column) in ADDED_COLUMNS {
        let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})"))?;
        let present = stmt
            .query_map([], |r| r.get::<_, String>(1))?
            .collect::<Result<Vec<_>, _>>()?
            .iter()
            .any(|c| c == column);
        if !present {
            conn.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0"
            ))?;
        }
    }
    Ok(())
}

pub struct Inventory {
    conn: Connection,
    path: PathBuf,
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Inventory {
    pub fn open(path: &Path) -> Result<Self, AgentError> {
        let db = |source| AgentError::Db {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        conn.execute_batch(crate::audit::SCHEMA).map_err(db)?;
        crate::audit::upgrade(&conn).map_err(db)?;
        add_missing_columns(&conn).map_err(db)?;
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    fn db(&self, source: rusqlite::Error) -> AgentError {
        AgentError::Db {
            path: self.path.clone(),
            source,
        }
    }

    /// Adds a definition; a name that exists is refused.
    pub fn insert(
        &mut self,
        name: &str,
        def: &VmDefinition,
        now_ms: u64,
    ) -> Result<(), AgentError> {
        let json =
            serde_json::to_string(def).map_err(|e| AgentError::BadDefinition(e.to_string()))?;
        let tx = self.conn.transaction().map_err(|e| AgentError::Db {
            path: self.path.clone(),
            source: e,
        })?;
        let n = tx
            .execute(
                "INSERT OR IGNORE INTO vms (name, definition, created_ms) VALUES (?1, ?2, ?3)",
                params![name, json, i(now_ms)],
            )
            .map_err(|e| AgentError::Db {
                path: self.path.clone(),
                source: e,
            })?;
        if n == 0 {
            return Err(AgentError::Duplicate(name.to_string()));
        }
        tx.execute(
            "INSERT OR REPLACE INTO meter (name, since_ms) VALUES (?1, ?2)",
            params![name, i(now_ms)],
        )
        .map_err(|e| AgentError::Db {
            path: self.path.clone(),
            source: e,
        })?;
        tx.commit().map_err(|e| self.db(e))
    }

    /// Removes a definition with its history; false if there was none.
    pub fn delete(&mut self, name: &str) -> Result<bool, AgentError> {
        let tx = self.conn.transaction().map_err(|e| AgentError::Db {
            path: self.path.clone(),
            source: e,
        })?;
        let mut n = 0;
        for sql in [
            "DELETE FROM vms WHERE name = ?1",
            "DELETE FROM exits WHERE name = ?1",
            "DELETE FROM meter WHERE name = ?1",
            "DELETE FROM samples WHERE name = ?1",
            "DELETE FROM jail_ids WHERE name = ?1",
            "DELETE FROM replications WHERE name = ?1",
        ] {
            let c = tx.execute(sql, params![name]).map_err(|e| AgentError::Db {
                path: self.path.clone(),
                source: e,
            })?;
            if n == 0 {
                n = c;
            }
        }
        tx.commit().map_err(|e| self.db(e))?;
        Ok(n > 0)
    }

    /// The jail uid (and gid) of `name`: the one it was given before, else the lowest
    /// free one of `range` (stored, so it stays the VM's across restarts of the VM and
    /// of vireod until the VM is deleted). The column is UNIQUE: two VMs never share one.
    pub fn jail_uid(
        &mut self,
        name: &str,
        range: std::ops::RangeInclusive<u32>,
    ) -> Result<u32, AgentError> {
        let tx = self.conn.transaction().map_err(|e| AgentError::Db {
            path: self.path.clone(),
            source: e,
        })?;
        let had: Option<i64> = tx
            .query_row(
                "SELECT uid FROM jail_ids WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| AgentError::Db {
                path: self.path.clone(),
                source: e,
            })?;
        if let Some(uid) = had.and_then(|u| u32::try_from(u).ok()) {
            return Ok(uid);
        }
        let used: std::collections::BTreeSet<u32> = {
            let mut st = tx
                .prepare("SELECT uid FROM jail_ids")
                .map_err(|e| AgentError::Db {
                    path: self.path.clone(),
                    source: e,
                })?;
            let rows = st
                .query_map([], |r| r.get::<_, i64>(0))
                .map_err(|e| AgentError::Db {
                    path: self.path.clone(),
                    source: e,
                })?;
            rows.filter_map(|r| r.ok())
                .filter_map(|u| u32::try_from(u).ok())
                .collect()
        };
        let (first, last) = (*range.start(), *range.end());
        let uid = range
            .into_iter()
            .find(|u| !used.contains(u))
            .ok_or(AgentError::JailIdsExhausted { first, last })?;
        tx.execute(
            "INSERT INTO jail_ids (name, uid) VALUES (?1, ?2)",
            params![name, i64::from(uid)],
        )
        .map_err(|e| AgentError::Db {
            path: self.path.clone(),
            source: e,
        })?;
        tx.commit().map_err(|e| self.db(e))?;
        Ok(uid)
    }

    /// The jail uid `name` holds, if any.
    pub fn jail_uid_of(&self, name: &str) -> Result<Option<u32>, AgentError> {
        let had: Option<i64> = self
            .conn
            .query_row(
                "SELECT uid FROM jail_ids WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.db(e))?;
        Ok(had.and_then(|u| u32::try_from(u).ok()))
    }

    /// Appends an entry to the audit trail ([`crate::audit`]).
    pub fn record_audit(&mut self, e: &crate::audit::Entry) -> Result<(), AgentError> {
        crate::audit::insert(&self.conn, e).map_err(|e| self.db(e))
    }

    /// The audit entries `f` asks for, oldest first.
    pub fn audit(&self, f: &crate::audit::Filter) -> Result<Vec<crate::audit::Entry>, AgentError> {
        crate::audit::query(&self.conn, f).map_err(|e| self.db(e))
    }

    /// Replaces the definition of an existing VM (e.g. its disks after a shared-nothing
    /// migration); false if there is none.
    pub fn update(&mut self, name: &str, def: &VmDefinition) -> Result<bool, AgentError> {
        let json =
            serde_json::to_string(def).map_err(|e| AgentError::BadDefinition(e.to_string()))?;
        let n = self
            .conn
            .execute(
                "UPDATE vms SET definition = ?2 WHERE name = ?1",
                params![name, json],
            )
            .map_err(|e| self.db(e))?;
        Ok(n > 0)
    }

    /// Writes a migration record (insert or replace); keeps the newest
    /// [`crate::migrations::KEEP_FINISHED`] records.
    pub fn save_migration(&mut self, rec: &MigrationRecord) -> Result<(), AgentError> {
        let json =
            serde_json::to_string(rec).map_err(|e| AgentError::BadMigration(e.to_string()))?;
        self.conn
            .execute(
                "INSERT OR REPLACE INTO migrations (id, queued_ms, record) VALUES (?1, ?2, ?3)",
                params![rec.id, i(rec.queued_at_ms), json],
            )
            .map_err(|e| self.db(e))?;
        self.conn
            .execute(
                "DELETE FROM migrations WHERE id NOT IN (SELECT id FROM migrations ORDER BY queued_ms DESC LIMIT ?1)",
                params![crate::migrations::KEEP_FINISHED as i64],
            )
            .map_err(|e| self.db(e))?;
        Ok(())
    }

    /// Every stored migration record, oldest first (unreadable rows are skipped).
    pub fn migrations(&self) -> Result<Vec<MigrationRecord>, AgentError> {
        let mut st = self
            .conn
            .prepare("SELECT record FROM migrations ORDER BY queued_ms, id")
            .map_err(|e| self.db(e))?;
        let rows = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(|e| self.db(e))?;
        let mut out = Vec::new();
        for row in rows {
            let json = row.map_err(|e| self.db(e))?;
            match serde_json::from_str(&json) {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!(error = %e, "unreadable migration record skipped"),
            }
        }
        Ok(out)
    }

    /// Stores VM `name`'s replication settings (a JSON document,
    /// [`crate::replication::Settings`]), or removes them with `None`.
    pub fn save_replication(
        &mut self,
        name: &str,
        settings: Option<&str>,
    ) -> Result<(), AgentError> {
        match settings {
            Some(json) => self.conn.execute(
                "INSERT OR REPLACE INTO replications (name, settings) VALUES (?1, ?2)",
                params![name, json],
            ),
            None => self
                .conn
                .execute("DELETE FROM replications WHERE name = ?1", params![name]),
        }
        .map_err(|e| self.db(e))?;
        Ok(())
    }

    /// Every stored replication setting: (VM name, JSON), by name.
    pub fn replications(&self) -> Result<Vec<(String, String)>, AgentError> {
        let mut st = self
            .conn
            .prepare("SELECT name, settings FROM replications ORDER BY name")
            .map_err(|e| self.db(e))?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| self.db(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.db(e))
    }

    /// Every definition, by name.
    pub fn list(&self) -> Result<Vec<(String, VmDefinition)>, AgentError> {
        let mut st = self
            .conn
            .prepare("SELECT name, definition FROM vms ORDER BY name")
            .map_err(|e| self.db(e))?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| self.db(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (name, json) = row.map_err(|e| self.db(e))?;
            let def = serde_json::from_str(&json).map_err(|source| AgentError::Corrupt {
                name: name.clone(),
                source,
            })?;
            out.push((name, def));
        }
        Ok(out)
    }

    pub fn record_exit(&mut self, name: &str, e: &ExitRecord) -> Result<(), AgentError> {
        let tail = serde_json::to_string(&e.serial_tail).unwrap_or_default();
        let log = serde_json::to_string(&e.vmm_log_tail).unwrap_or_default();
        self.conn
            .execute(
                "INSERT INTO exits (name, at_ms, pid, status, signal, reason, serial_tail, vmm_log_tail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![name, i(e.at_ms), e.pid, e.status, e.signal, e.reason, tail, log],
            )
            .map_err(|e| self.db(e))?;
        Ok(())
    }

    /// The most recent exits of a VM, newest first.
    pub fn exits(&self, name: &str, limit: usize) -> Result<Vec<ExitRecord>, AgentError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT at_ms, pid, status, signal, reason, serial_tail, vmm_log_tail FROM exits
                 WHERE name = ?1 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(|e| self.db(e))?;
        let rows = st
            .query_map(params![name, limit as i64], |r| {
                Ok(ExitRecord {
                    at_ms: u(r.get(0)?),
                    pid: r.get(1)?,
                    status: r.get(2)?,
                    signal: r.get(3)?,
                    reason: r.get(4)?,
                    serial_tail: serde_json::from_str(&r.get::<_, String>(5)?).unwrap_or_default(),
                    vmm_log_tail: serde_json::from_str(&r.get::<_, String>(6)?).unwrap_or_default(),
                })
            })
            .map_err(|e| self.db(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.db(e))
    }

    /// Adds samples to the raw history and to each VM's totals, in one transaction.
    pub fn record_samples(&mut self, samples: &[Sample]) -> Result<(), AgentError> {
        let path = self.path.clone();
        let db = |source| AgentError::Db {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(db)?;
        for s in samples {
            tx.execute(
                "INSERT INTO samples (name, at_ms, pid, cpu_ns, rss_bytes, disk_read, disk_write,
                                      net_rx, net_tx)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    s.name,
                    i(s.at_ms),
                    s.pid,
                    i(s.cpu_ns),
                    i(s.rss_bytes),
                    i(s.disk_read),
                    i(s.disk_write),
                    i(s.net_rx),
                    i(s.net_tx)
                ],
            )
            .map_err(db)?;
            let last: Option<LastReading> = tx
                .query_row(
                    "SELECT last_pid, last_start, last_at_ms, last_cpu_ns, last_read, last_write,
                            last_read_ops, last_write_ops, last_net_rx, last_net_tx
                     FROM meter WHERE name = ?1",
                    params![s.name],
                    |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                            r.get(6)?,
                            r.get(7)?,
                            r.get(8)?,
                            r.get(9)?,
                        ))
                    },
                )
                .optional()
                .map_err(db)?;
            let Some((lpid, lstart, lat, lcpu, lr, lw, lro, lwo, lrx, ltx)) = last else {
                continue; // Deleted meanwhile.
            };
            let same = lpid == i64::from(s.pid) && u(lstart) == s.start_ticks;
            // Same process: count what it did since the last sample. A new process
            // (restart, first sample): everything it did since it started.
            let d = |cur: u64, last: i64| {
                if same {
                    cur.saturating_sub(u(last))
                } else {
                    cur
                }
            };
            let run = if same {
                s.at_ms.saturating_sub(u(lat))
            } else {
                s.age_ms
            };
            tx.execute(
                "UPDATE meter SET sampled_at_ms = ?2, running_ms = running_ms + ?3,
                    cpu_ns = cpu_ns + ?4,
                    mem_sum = mem_sum + ?5, mem_samples = mem_samples + 1,
                    mem_min = CASE WHEN mem_samples = 0 OR ?5 < mem_min THEN ?5 ELSE mem_min END,
                    mem_max = CASE WHEN ?5 > mem_max THEN ?5 ELSE mem_max END,
                    disk_read = disk_read + ?6, disk_write = disk_write + ?7,
                    read_ops = read_ops + ?8, write_ops = write_ops + ?9,
                    last_pid = ?10, last_start = ?11, last_at_ms = ?2, last_cpu_ns = ?12,
                    last_read = ?13, last_write = ?14, last_read_ops = ?15, last_write_ops = ?16,
                    net_rx = net_rx + ?17, net_tx = net_tx + ?18,
                    last_net_rx = ?19, last_net_tx = ?20
                 WHERE name = ?1",
                params![
                    s.name,
                    i(s.at_ms),
                    i(run),
                    i(d(s.cpu_ns, lcpu)),
                    i(s.rss_bytes),
                    i(d(s.disk_read, lr)),
                    i(d(s.disk_write, lw)),
                    i(d(s.read_ops, lro)),
                    i(d(s.write_ops, lwo)),
                    s.pid,
                    i(s.start_ticks),
                    i(s.cpu_ns),
                    i(s.disk_read),
                    i(s.disk_write),
                    i(s.read_ops),
                    i(s.write_ops),
                    i(d(s.net_rx, lrx)),
                    i(d(s.net_tx, ltx)),
                    i(s.net_rx),
                    i(s.net_tx)
                ],
            )
            .map_err(db)?;
        }
        if let Some(newest) = samples.iter().map(|s| s.at_ms).max() {
            tx.execute(
                "DELETE FROM samples WHERE at_ms < ?1",
                params![i(newest.saturating_sub(SAMPLE_RETENTION_MS))],
            )
            .map_err(db)?;
        }
        tx.commit().map_err(db)
    }

    /// The VM's totals since its last reset (None if the VM is unknown).
    pub fn metering(&self, name: &str) -> Result<Option<MeteringReport>, AgentError> {
        self.conn
            .query_row(
                "SELECT since_ms, sampled_at_ms, running_ms, cpu_ns, mem_sum, mem_samples, mem_min,
                        mem_max, disk_read, disk_write, read_ops, write_ops, net_rx, net_tx
                 FROM meter WHERE name = ?1",
                params![name],
                |r| {
                    let running_ms = u(r.get(2)?);
                    let cpu_ns = u(r.get(3)?);
                    let mem_sum = u(r.get(4)?);
                    let samples = u(r.get(5)?);
                    Ok(MeteringReport {
                        name: name.to_string(),
                        since_ms: u(r.get(0)?),
                        sampled_at_ms: u(r.get(1)?),
                        running_ms,
                        cpu_ns,
                        avg_cpu_percent: if running_ms == 0 {
                            0.0
                        } else {
                            cpu_ns as f64 / (running_ms as f64 * 1e6) * 100.0
                        },
                        avg_memory_bytes: mem_sum.checked_div(samples).unwrap_or(0),
                        min_memory_bytes: u(r.get(6)?),
                        max_memory_bytes: u(r.get(7)?),
                        disk_read_bytes: u(r.get(8)?),
                        disk_write_bytes: u(r.get(9)?),
                        disk_read_ops: u(r.get(10)?),
                        disk_write_ops: u(r.get(11)?),
                        net_rx_bytes: u(r.get(12)?),
                        net_tx_bytes: u(r.get(13)?),
                        samples,
                    })
                },
            )
            .optional()
            .map_err(|e| self.db(e))
    }

    /// Starts the VM's metering afresh at `now_ms` (the current process's readings
    /// stay the baseline, so only what happens from now on is counted).
    pub fn reset_metering(&mut self, name: &str, now_ms: u64) -> Result<bool, AgentError> {
        let n = self
            .conn
            .execute(
                "UPDATE meter SET since_ms = ?2, sampled_at_ms = 0, running_ms = 0, cpu_ns = 0,
                    mem_sum = 0, mem_samples = 0, mem_min = 0, mem_max = 0, disk_read = 0,
                    disk_write = 0, read_ops = 0, write_ops = 0, net_rx = 0, net_tx = 0,
                    last_at_ms = ?2
                 WHERE name = ?1",
                params![name, i(now_ms)],
            )
            .map_err(|e| self.db(e))?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_older_database_gets_the_network_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            // The meter and samples tables as the first release made them.
            let c = Connection::open(&path).unwrap();
            let old = super::SCHEMA
                .replace(",\n    net_rx INTEGER NOT NULL DEFAULT 0,\n    net_tx INTEGER NOT NULL DEFAULT 0,\n    last_net_rx INTEGER NOT NULL DEFAULT 0,\n    last_net_tx INTEGER NOT NULL DEFAULT 0\n", "\n")
                .replace(",\n    net_rx INTEGER NOT NULL DEFAULT 0,\n    net_tx INTEGER NOT NULL DEFAULT 0\n", "\n");
            assert!(!old.contains("net_rx"), "{old}");
            c.execute_batch(&old).unwrap();
        }
        let mut inv = Inventory::open(&path).unwrap();
        inv.insert("a", &def(), 0).unwrap();
        inv.record_samples(&[Sample {
            name: "a".into(),
            at_ms: 10,
            pid: 1,
            net_rx: 100,
            net_tx: 7,
            ..Default::default()
        }])
        .unwrap();
        let m = inv.metering("a").unwrap().unwrap();
        assert_eq!((m.net_rx_bytes, m.net_tx_bytes), (100, 7));
    }

    use super::*;

    fn def() -> VmDefinition {
        serde_json::from_str(r#"{"config":{"payload":{"kernel":"/k"}},"priority":"Low"}"#).unwrap()
    }

    #[test]
    fn definitions_persist_and_names_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("inv.db");
        {
            let mut inv = Inventory::open(&p).unwrap();
            inv.insert("a", &def(), 1).unwrap();
            assert!(matches!(
                inv.insert("a", &def(), 2),
                Err(AgentError::Duplicate(_))
            ));
            inv.insert("b", &def(), 3).unwrap();
        }
        let mut inv = Inventory::open(&p).unwrap();
        let l = inv.list().unwrap();
        assert_eq!(
            l.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(l[0].1, def());
        assert!(inv.delete("a").unwrap());
        assert!(!inv.delete("a").unwrap());
        assert_eq!(inv.list().unwrap().len(), 1);
    }

    #[test]
    fn exits_are_kept_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut inv = Inventory::open(&dir.path().join("inv.db")).unwrap();
        inv.insert("a", &def(), 1).unwrap();
        for n in 0..3 {
            inv.record_exit(
                "a",
                &ExitRecord {
                    at_ms: n,
                    pid: 7,
                    status: None,
                    signal: Some(9),
                    reason: format!("r{n}"),
                    serial_tail: vec!["tick 1".into()],
                    vmm_log_tail: vec![],
                },
            )
            .unwrap();
        }
        let e = inv.exits("a", 2).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].reason, "r2");
        assert_eq!(e[0].serial_tail, ["tick 1"]);
    }

    #[test]
    fn metering_adds_deltas_across_samples_restarts_and_resets() {
        let dir = tempfile::tempdir().unwrap();
        let mut inv = Inventory::open(&dir.path().join("inv.db")).unwrap();
        inv.insert("a", &def(), 0).unwrap();
        let s = |at_ms, pid, start_ticks, cpu_ns, rss_bytes, disk_write| Sample {
            name: "a".into(),
            at_ms,
            pid,
            start_ticks,
            age_ms: 500,
            cpu_ns,
            rss_bytes,
            disk_read: 0,
            disk_write,
            read_ops: 0,
            write_ops: disk_write / 512,
            net_rx: disk_write * 2,
            net_tx: disk_write / 2,
        };
        inv.record_samples(&[s(1000, 10, 1, 100_000_000, 4 << 20, 1024)])
            .unwrap();
        inv.record_samples(&[s(2000, 10, 1, 600_000_000, 8 << 20, 4096)])
            .unwrap();
        // The VMM restarted (new pid): its counters start from zero again.
        inv.record_samples(&[s(3000, 11, 9, 50_000_000, 6 << 20, 512)])
            .unwrap();
        let m = inv.metering("a").unwrap().unwrap();
        assert_eq!(m.disk_write_bytes, 4096 + 512);
        assert_eq!(m.disk_write_ops, 9);
        assert_eq!(
            (m.net_rx_bytes, m.net_tx_bytes),
            (2 * (4096 + 512), (4096 + 512) / 2)
        );
        assert_eq!(m.cpu_ns, 650_000_000);
        assert_eq!(m.running_ms, 500 + 1000 + 500);
        assert_eq!(m.min_memory_bytes, 4 << 20);
        assert_eq!(m.max_memory_bytes, 8 << 20);
        assert_eq!(m.avg_memory_bytes, 6 << 20);
        assert_eq!(m.samples, 3);
        assert!(
            (m.avg_cpu_percent - 32.5).abs() < 1e-9,
            "{}",
            m.avg_cpu_percent
        );

        assert!(inv.reset_metering("a", 3500).unwrap());
        inv.record_samples(&[s(4000, 11, 9, 80_000_000, 6 << 20, 1536)])
            .unwrap();
        let m = inv.metering("a").unwrap().unwrap();
        assert_eq!(m.since_ms, 3500);
        assert_eq!(
            m.disk_write_bytes, 1024,
            "only what happened after the reset"
        );
        assert_eq!((m.net_rx_bytes, m.net_tx_bytes), (2048, 512));
        assert_eq!(m.cpu_ns, 30_000_000);
        assert_eq!(m.running_ms, 500);
        assert!(inv.metering("zz").unwrap().is_none());
    }
}
