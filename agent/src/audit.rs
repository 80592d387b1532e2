//! The audit trail: one row per request that may change something (any method but
//! GET), allowed or refused, with who asked (uid, pid, role), what (method, route, VM)
//! and what came of it (HTTP status, the error line). Kept in the inventory's database
//! (table `audit`), the newest [`KEEP`] rows; read with `GET /api/v1/audit`
//! (operators only) or `vireoctl audit`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};

use crate::supervisor::Supervisor;

/// The table; `CREATE ... IF NOT EXISTS`, so a database from before the audit trail
/// gets it when vireod opens it.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    pid INTEGER,
    role TEXT NOT NULL,
    method TEXT NOT NULL,
    route TEXT NOT NULL,
    vm TEXT,
    status INTEGER NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_vm ON audit(vm, id);
";

/// Rows kept; older ones are dropped as new ones come (refused requests of any local
/// user are recorded too, so the table must not grow without bound).
pub const KEEP: i64 = 100_000;

/// Entries a query returns when it names no limit, and at most.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 10_000;

/// One audited request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Increasing with time (0 before the entry is stored).
    pub id: i64,
    pub at_ms: u64,
    pub uid: u32,
    pub pid: Option<i32>,
    /// `operator`, `viewer` or `none` (an outsider).
    pub role: String,
    pub method: String,
    /// The route (`/api/v1/vms/{name}/start`).
    pub route: String,
    pub vm: Option<String>,
    /// The HTTP status of the answer (403: refused).
    pub status: u16,
    /// Why it was refused or failed (the answer's error line); empty on success.
    pub detail: String,
}

/// Which entries a query wants: the newest `limit` that match, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub vm: Option<String>,
    pub since_ms: Option<u64>,
    pub limit: usize,
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Stores `e` and drops the rows older than the newest [`KEEP`].
pub(crate) fn insert(conn: &Connection, e: &Entry) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO audit (at_ms, uid, pid, role, method, route, vm, status, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            i(e.at_ms),
            e.uid,
            e.pid,
            e.role,
            e.method,
            e.route,
            e.vm,
            e.status,
            e.detail
        ],
    )?;
    let id = conn.last_insert_rowid();
    conn.execute("DELETE FROM audit WHERE id <= ?1", params![id - KEEP])?;
    Ok(())
}

pub(crate) fn query(conn: &Connection, f: &Filter) -> rusqlite::Result<Vec<Entry>> {
    let mut stmt = conn.prepare(
        "SELECT id, at_ms, uid, pid, role, method, route, vm, status, detail FROM audit
         WHERE (?1 IS NULL OR vm = ?1) AND at_ms >= ?2
         ORDER BY id DESC LIMIT ?3",
    )?;
    let rows = stmt.query_map(
        params![f.vm, i(f.since_ms.unwrap_or(0)), i(f.limit as u64)],
        |r| {
            Ok(Entry {
                id: r.get(0)?,
                at_ms: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                uid: r.get(2)?,
                pid: r.get(3)?,
                role: r.get(4)?,
                method: r.get(5)?,
                route: r.get(6)?,
                vm: r.get(7)?,
                status: r.get(8)?,
                detail: r.get(9)?,
            })
        },
    )?;
    let mut out = rows.collect::<Result<Vec<_>, _>>()?;
    out.reverse();
    Ok(out)
}

impl Filter {
    /// From the query string: `vm`, `since` (ms since the epoch), `limit`.
    pub fn from_query(q: &HashMap<String, String>) -> Result<Self, String> {
        let number = |key: &str| -> Result<Option<u64>, String> {
            q.get(key)
                .map(|v| {
                    v.parse()
                        .map_err(|_| format!("query parameter {key}={v:?} is not a number"))
                })
                .transpose()
        };
        Ok(Filter {
            vm: q.get("vm").cloned(),
            since_ms: number("since")?,
            limit: number("limit")?
                .map_or(DEFAULT_LIMIT, |l| l as usize)
                .min(MAX_LIMIT),
        })
    }
}

/// `GET /api/v1/audit[?vm=NAME][&since=MS][&limit=N]`.
pub async fn list(
    State(s): State<Arc<Supervisor>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let f = match Filter::from_query(&q) {
        Ok(f) => f,
        Err(m) => return crate::server::error(400, m),
    };
    let r = s.inventory().audit(&f);
    match r {
        Ok(entries) => (StatusCode::OK, Json(entries)).into_response(),
        Err(e) => crate::server::error(e.status(), crate::error_chain(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Inventory;

    fn entry(at_ms: u64, vm: Option<&str>, status: u16) -> Entry {
        Entry {
            id: 0,
            at_ms,
            uid: 1000,
            pid: Some(42),
            role: "operator".into(),
            method: "PUT".into(),
            route: "/api/v1/vms/{name}/start".into(),
            vm: vm.map(str::to_string),
            status,
            detail: String::new(),
        }
    }

    #[test]
    fn entries_are_filtered_by_vm_and_time_and_the_newest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut inv = Inventory::open(&dir.path().join("inv.db")).unwrap();
        inv.record_audit(&entry(10, Some("a"), 200)).unwrap();
        inv.record_audit(&entry(20, Some("b"), 403)).unwrap();
        inv.record_audit(&entry(30, Some("a"), 409)).unwrap();
        inv.record_audit(&entry(40, None, 201)).unwrap();
        let all = |f: Filter| inv.audit(&f).unwrap();
        let got = all(Filter {
            limit: 10,
            ..Filter::default()
        });
        assert_eq!(
            got.iter().map(|e| e.at_ms).collect::<Vec<_>>(),
            [10, 20, 30, 40]
        );
        assert_eq!(
            got[1],
            Entry {
                id: got[1].id,
                ..entry(20, Some("b"), 403)
            }
        );
        let a = all(Filter {
            vm: Some("a".into()),
            limit: 10,
            ..Filter::default()
        });
        assert_eq!(a.iter().map(|e| e.status).collect::<Vec<_>>(), [200, 409]);
        let newest = all(Filter {
            limit: 2,
            ..Filter::default()
        });
        assert_eq!(newest.iter().map(|e| e.at_ms).collect::<Vec<_>>(), [30, 40]);
        let since = all(Filter {
            since_ms: Some(25),
            limit: 10,
            ..Filter::default()
        });
        assert_eq!(since.iter().map(|e| e.at_ms).collect::<Vec<_>>(), [30, 40]);
    }

    #[test]
    fn a_database_from_before_the_audit_trail_gets_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE vms (name TEXT PRIMARY KEY NOT NULL, definition TEXT NOT NULL, created_ms INTEGER NOT NULL);
                 INSERT INTO vms VALUES ('old', '{\"config\":{}}', 1);",
            )
            .unwrap();
        }
        let mut inv = Inventory::open(&path).unwrap();
        inv.record_audit(&entry(5, Some("old"), 204)).unwrap();
        let got = inv
            .audit(&Filter {
                limit: 10,
                ..Filter::default()
            })
            .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].vm.as_deref(), Some("old"));
    }

    #[test]
    fn only_the_newest_rows_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let inv = Inventory::open(&dir.path().join("inv.db")).unwrap();
        let conn = Connection::open(dir.path().join("inv.db")).unwrap();
        // Pretend KEEP rows were written: the next insert drops the oldest.
        conn.execute(
            "INSERT INTO audit (id, at_ms, uid, role, method, route, status, detail)
             VALUES (1, 1, 0, 'operator', 'PUT', '/x', 200, ''), (?1, 2, 0, 'operator', 'PUT', '/x', 200, '')",
            params![KEEP],
        )
        .unwrap();
        insert(&conn, &entry(3, None, 200)).unwrap();
        let ids: Vec<i64> = inv
            .audit(&Filter {
                limit: 10,
                ..Filter::default()
            })
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, [KEEP, KEEP + 1]);
    }

    #[test]
    fn query_parameters_are_checked() {
        let q = |pairs: &[(&str, &str)]| {
            Filter::from_query(
                &pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        assert_eq!(
            q(&[]).unwrap(),
            Filter {
                limit: DEFAULT_LIMIT,
                ..Filter::default()
            }
        );
        assert_eq!(
            q(&[("vm", "web"), ("since", "7"), ("limit", "99999")]).unwrap(),
            Filter {
                vm: Some("web".into()),
                since_ms: Some(7),
                limit: MAX_LIMIT
            }
        );
        assert_eq!(
            q(&[("limit", "x")]).unwrap_err(),
            "query parameter limit=\"x\" is not a number"
        );
    }
}
