//! The audit trail: one row per request that may change something (any method but
//! GET), allowed or refused, with who asked (a local caller's uid, pid and role; a peer
//! host's certificate identity), what (method, route, VM) and what came of it (HTTP
//! status, the error line). Requests of peer hosts on the peer listener are rows too
//! (role `peer`): every change, and every request answered with an error. Kept in the
//! inventory's database (table `audit`); read with `GET /api/v1/audit` (operators only)
//! or `vireoctl audit`.
//!
//! Outsiders can add rows (refused requests of local users without a role, error
//! answers to peers): those are kept apart, the newest [`KEEP_REFUSED`], so that a
//! flood of them never pushes out the record of what was done (the newest [`KEEP`]
//! other rows).

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
/// gets it when vireod opens it ([`upgrade`] adds later columns).
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

/// Columns added after the first audit table: the peer host's identity, and whether
/// the row is an outsider's refusal (kept apart).
const ADDED: &[(&str, &str)] = &[("peer", "TEXT"), ("refused", "INTEGER NOT NULL DEFAULT 0")];

/// Adds the columns an older table lacks, and the index of the refused rows.
pub(crate) fn upgrade(conn: &Connection) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare("PRAGMA table_info(audit)")?;
    let present = stmt
        .query_map([], |r| r.get::<_, String>(1))?
        .collect::<Result<Vec<_>, _>>()?;
    for (column, kind) in ADDED {
        if !present.iter().any(|c| c == column) {
            conn.execute_batch(&format!("ALTER TABLE audit ADD COLUMN {column} {kind}"))?;
        }
    }
    conn.execute_batch("CREATE INDEX IF NOT EXISTS audit_by_refused ON audit(refused, id);")
}

/// Rows kept of what was done (allowed or refused requests of callers with a role,
/// peers' changes); older ones are dropped as new ones come.
pub const KEEP: i64 = 100_000;

/// Rows kept of outsiders' refusals (local callers without a role, error answers to
/// peers), apart from [`KEEP`]: a flood of them drops only older ones of its kind.
pub const KEEP_REFUSED: i64 = 10_000;

/// Entries a query returns when it names no limit, and at most.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 10_000;

/// One audited request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Increasing with time (0 before the entry is stored).
    pub id: i64,
    pub at_ms: u64,
    /// A local caller's uid (None for a peer host).
    pub uid: Option<u32>,
    pub pid: Option<i32>,
    /// `operator`, `viewer`, `none` (an outsider) or `peer` (a host on the peer
    /// listener).
    pub role: String,
    /// A peer host's certificate identity: the name it was admitted as, its subject CN
    /// and DNS SANs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
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

impl Entry {
    /// An outsider's refusal: kept apart, see [`KEEP_REFUSED`].
    pub fn is_refused(&self) -> bool {
        self.role == "none" || (self.role == "peer" && self.status >= 400)
    }
}

/// Stores `e`; every [`TRIM_EVERY`] rows the table is trimmed to the newest [`KEEP`]
/// and [`KEEP_REFUSED`] rows (so each kind exceeds its bound by less than that).
pub(crate) fn insert(conn: &Connection, e: &Entry) -> rusqlite::Result<()> {
    let refused = e.is_refused();
    conn.execute(
        "INSERT INTO audit (at_ms, uid, pid, role, method, route, vm, status, detail, peer, refused)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            i(e.at_ms),
            e.uid.map_or(-1, i64::from),
            e.pid,
            e.role,
            e.method,
            e.route,
            e.vm,
            e.status,
            e.detail,
            e.peer,
            refused
        ],
    )?;
    if conn.last_insert_rowid() % TRIM_EVERY == 0 {
        trim(conn)?;
    }
    Ok(())
}

/// Every this many rows, the table is trimmed (a trim walks the kept rows' index).
const TRIM_EVERY: i64 = 512;

/// Drops the rows of each kind older than the newest [`KEEP`] (or [`KEEP_REFUSED`]).
pub(crate) fn trim(conn: &Connection) -> rusqlite::Result<()> {
    for (refused, keep) in [(false, KEEP), (true, KEEP_REFUSED)] {
        conn.execute(
            "DELETE FROM audit WHERE refused = ?1 AND id <= (
                 SELECT id FROM audit WHERE refused = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
            params![refused, keep],
        )?;
    }
    Ok(())
}

pub(crate) fn query(conn: &Connection, f: &Filter) -> rusqlite::Result<Vec<Entry>> {
    let mut stmt = conn.prepare(
        "SELECT id, at_ms, uid, pid, role, method, route, vm, status, detail, peer FROM audit
         WHERE (?1 IS NULL OR vm = ?1) AND at_ms >= ?2
         ORDER BY id DESC LIMIT ?3",
    )?;
    let rows = stmt.query_map(
        params![f.vm, i(f.since_ms.unwrap_or(0)), i(f.limit as u64)],
        |r| {
            Ok(Entry {
                id: r.get(0)?,
                at_ms: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                uid: u32::try_from(r.get::<_, i64>(2)?).ok(),
                pid: r.get(3)?,
                role: r.get(4)?,
                peer: r.get(10)?,
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
            uid: Some(1000),
            pid: Some(42),
            role: "operator".into(),
            peer: None,
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

    /// Guards the audit trail against a flood of refusals (issue 11, part 4): before,
    /// one table of the newest 100 000 rows let an outsider's refused requests push
    /// out the record of every change. Refusals are kept apart, the newest
    /// KEEP_REFUSED; what was done stays.
    #[test]
    fn a_flood_of_refusals_drops_only_older_refusals_never_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let inv = Inventory::open(&dir.path().join("inv.db")).unwrap();
        let mut conn = Connection::open(dir.path().join("inv.db")).unwrap();
        insert(&conn, &entry(1, Some("web"), 204)).unwrap();
        let outsider = Entry {
            uid: Some(1001),
            role: "none".into(),
            status: 403,
            ..entry(2, Some("web"), 403)
        };
        let peer = Entry {
            uid: None,
            role: "peer".into(),
            peer: Some("host-x (CN host-x; DNS host-x)".into()),
            method: "GET".into(),
            status: 404,
            ..entry(3, None, 404)
        };
        let tx = conn.transaction().unwrap();
        for n in 0..KEEP_REFUSED + 100 {
            insert(&tx, if n % 2 == 0 { &outsider } else { &peer }).unwrap();
        }
        tx.commit().unwrap();
        insert(&conn, &entry(4, Some("web"), 204)).unwrap();
        trim(&conn).unwrap();
        let count = |refused: bool| -> i64 {
            conn.query_row(
                "SELECT COUNT(*) FROM audit WHERE refused = ?1",
                params![refused],
                |r| r.get(0),
            )
            .unwrap()
        };
        assert_eq!(count(true), KEEP_REFUSED);
        assert_eq!(count(false), 2);
        let web = inv
            .audit(&Filter {
                vm: Some("web".into()),
                limit: MAX_LIMIT,
                ..Filter::default()
            })
            .unwrap();
        assert_eq!(
            web.first().map(|e| e.at_ms),
            Some(1),
            "the first change stays"
        );
        assert_eq!(web.last().map(|e| e.at_ms), Some(4));
        let newest = inv
            .audit(&Filter {
                limit: 2,
                ..Filter::default()
            })
            .unwrap();
        assert_eq!(newest[0].peer.as_deref(), peer.peer.as_deref());
        assert_eq!(newest[0].uid, None);
    }

    #[test]
    fn only_the_newest_rows_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let inv = Inventory::open(&dir.path().join("inv.db")).unwrap();
        let mut conn = Connection::open(dir.path().join("inv.db")).unwrap();
        let tx = conn.transaction().unwrap();
        for n in 0..KEEP + 1 {
            insert(&tx, &entry(n as u64, None, 200)).unwrap();
        }
        tx.commit().unwrap();
        trim(&conn).unwrap();
        let all = inv
            .audit(&Filter {
                limit: 1,
                since_ms: Some(0),
                ..Filter::default()
            })
            .unwrap();
        assert_eq!(all[0].at_ms, KEEP as u64);
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM audit", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, KEEP);
        let oldest: i64 = conn
            .query_row("SELECT MIN(at_ms) FROM audit", [], |r| r.get(0))
            .unwrap();
        assert_eq!(oldest, 1, "the oldest row was dropped");
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
