//! Who may do what on vireod's unix socket (the model of libvirt's read-only/read-write
//! split, decided per request from the kernel's word about the caller).
//!
//! Every connection's caller is read once, when it is accepted: uid, gid and pid with
//! `SO_PEERCRED`, the supplementary groups with `SO_PEERGROUPS` (both are the
//! credentials the caller had when it connected, taken by the kernel: no /proc lookup
//! a pid reuse could fool). Each request is then classified by its route in [`RULES`]:
//! - **operators** (uid 0, or a member of an `--operators-group` / `--socket-group`)
//!   may do everything;
//! - **viewers** (members of a `--viewers-group`) may only read: lists, info, metrics,
//!   events, console output;
//! - anyone else gets 403 with one line naming their uid and what is needed.
//!
//! Every request that may change something (any method but GET), allowed or refused,
//! is written to the audit table ([`crate::audit`]) with who asked and what came of it.

use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, MatchedPath, RawPathParams, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use axum::serve::IncomingStream;
use axum::Router;
use tokio::net::UnixListener;
use tracing::{debug, warn};

use crate::audit::Entry;
use crate::supervisor::Supervisor;

/// What a caller may do. Operators may do everything viewers may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read only: lists, info, metrics, events, console output.
    Viewer,
    /// Everything, as root.
    Operator,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
        }
    }
}

/// One route of the API and the least role that may call it.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub method: &'static str,
    /// The route as the router spells it (`/api/v1/vms/{name}/start`).
    pub route: &'static str,
    pub role: Role,
}

const fn rule(method: &'static str, route: &'static str, role: Role) -> Rule {
    Rule {
        method,
        route,
        role,
    }
}

use Role::{Operator, Viewer};

/// Every route of [`crate::server::router`] with its role (a unit test checks that no
/// route is missing). A matched route without a rule needs an operator.
pub const RULES: &[Rule] = &[
    rule("GET", "/api/v1/host.info", Viewer),
    rule("GET", "/api/v1/switches", Viewer),
    rule("GET", "/api/v1/openapi.yaml", Viewer),
    rule("GET", "/api/v1/events", Viewer),
    rule("GET", "/api/v1/export", Viewer),
    rule("GET", "/api/v1/vms", Viewer),
    rule("GET", "/api/v1/vms/{name}", Viewer),
    rule("PUT", "/api/v1/vms/{name}", Operator),
    rule("DELETE", "/api/v1/vms/{name}", Operator),
    rule("PUT", "/api/v1/vms/{name}/definition", Operator),
    rule("PUT", "/api/v1/vms/{name}/start", Operator),
    rule("PUT", "/api/v1/vms/{name}/stop", Operator),
    rule("PUT", "/api/v1/vms/{name}/shutdown", Operator),
    rule("PUT", "/api/v1/vms/{name}/reset", Operator),
    rule("PUT", "/api/v1/vms/{name}/kill", Operator),
    rule("PUT", "/api/v1/vms/{name}/pause", Operator),
    rule("PUT", "/api/v1/vms/{name}/resume", Operator),
    rule("PUT", "/api/v1/vms/{name}/save", Operator),
    rule("DELETE", "/api/v1/vms/{name}/saved-state", Operator),
    rule("PUT", "/api/v1/vms/{name}/migrate", Operator),
    rule("PUT", "/api/v1/vms/{name}/memory", Operator),
    rule("GET", "/api/v1/migrations", Viewer),
    rule("POST", "/api/v1/migrations/incoming", Operator),
    rule("GET", "/api/v1/migrations/{id}", Viewer),
    rule("DELETE", "/api/v1/migrations/{id}", Operator),
    rule("GET", "/api/v1/vms/{name}/metrics", Viewer),
    rule("PUT", "/api/v1/vms/{name}/metrics/reset", Operator),
    rule("GET", "/api/v1/vms/{name}/exits", Viewer),
    // Console output is for viewers; console input drives the guest.
    rule("GET", "/api/v1/vms/{name}/serial", Viewer),
    rule("POST", "/api/v1/vms/{name}/serial", Operator),
    rule("POST", "/api/v1/vms/{name}/guest-command", Operator),
    rule("GET", "/api/v1/audit", Operator),
    rule("GET", "/metrics", Viewer),
    rule("GET", "/api/v1/cluster", Viewer),
    rule("PUT", "/api/v1/cluster/vms/{name}", Operator),
    rule("DELETE", "/api/v1/cluster/vms/{name}/saved-state", Operator),
    rule("GET", "/api/v1/cluster/nodes/{node}", Viewer),
    rule("POST", "/api/v1/cluster/nodes/{node}/drain", Operator),
    rule("DELETE", "/api/v1/cluster/nodes/{node}/drain", Operator),
    rule("POST", "/api/v1/cluster/nodes/{node}/resume", Operator),
    rule("POST", "/api/v1/cluster/nodes/{node}/release", Operator),
    rule("GET", "/api/v1/cluster/update", Viewer),
    rule("POST", "/api/v1/cluster/update", Operator),
    // Validation writes (and removes) a probe file in each storage root.
    rule("GET", "/api/v1/cluster/validate", Operator),
    rule("POST", "/api/v1/cluster/bulk", Operator),
    rule("DELETE", "/api/v1/cluster/bulk/{id}", Operator),
    rule("GET", "/api/v1/cluster/migrations", Viewer),
    rule("GET", "/api/v1/cluster/events", Viewer),
    rule("GET", "/api/v1/replication", Viewer),
    rule("GET", "/api/v1/vms/{name}/replication", Viewer),
    rule("PUT", "/api/v1/vms/{name}/replication", Operator),
    rule("DELETE", "/api/v1/vms/{name}/replication", Operator),
    rule("POST", "/api/v1/vms/{name}/replication/pause", Operator),
    rule("POST", "/api/v1/vms/{name}/replication/resume", Operator),
    rule("PUT", "/api/v1/vms/{name}/replication/bandwidth", Operator),
    rule("POST", "/api/v1/vms/{name}/replication/failover", Operator),
    rule("POST", "/api/v1/vms/{name}/replication/reverse", Operator),
    rule("POST", "/api/v1/replicas/{vm}/failover", Operator),
    rule("GET", "/api/v1/replicas/{vm}/points", Viewer),
    rule("POST", "/api/v1/replicas/{vm}/test-failover", Operator),
    rule("DELETE", "/api/v1/replicas/{vm}/test-failover", Operator),
];

/// The role `method route` needs. `None` is a path no route matched (the answer is
/// 404, which anyone with a role may learn); a matched route missing from [`RULES`]
/// needs an operator, so a forgotten rule fails closed.
pub fn required_role(method: &Method, route: Option<&str>) -> Role {
    let Some(route) = route else {
        return Viewer;
    };
    // HEAD is answered by a GET route.
    let method = if method == Method::HEAD {
        Method::GET
    } else {
        method.clone()
    };
    RULES
        .iter()
        .find(|r| r.route == route && r.method == method.as_str())
        .map_or(Operator, |r| r.role)
}

/// A group given on the command line: its id and how the operator spelt it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub gid: u32,
    pub name: String,
}

impl std::fmt::Display for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.name == self.gid.to_string() {
            write!(f, "gid {}", self.gid)
        } else {
            write!(f, "{} (gid {})", self.name, self.gid)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("no group named {0:?} in /etc/group")]
    Unknown(String),
}

impl Group {
    /// A group from its number or its name (looked up in `/etc/group`).
    pub fn resolve(spec: &str) -> Result<Self, GroupError> {
        if let Ok(gid) = spec.parse() {
            return Ok(Group {
                gid,
                name: spec.to_string(),
            });
        }
        let path = "/etc/group";
        let text =
            std::fs::read_to_string(path).map_err(|source| GroupError::Read { path, source })?;
        Self::find_in(&text, spec).ok_or_else(|| GroupError::Unknown(spec.to_string()))
    }

    /// `name`'s entry in the text of an /etc/group file.
    fn find_in(group_file: &str, name: &str) -> Option<Self> {
        group_file.lines().find_map(|l| {
            let mut f = l.split(':');
            let (n, _pw, gid) = (f.next()?, f.next()?, f.next()?);
            (n == name).then_some(())?;
            Some(Group {
                gid: gid.parse().ok()?,
                name: name.to_string(),
            })
        })
    }
}

/// Which groups hold which role. Root is always an operator.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub operators: Vec<Group>,
    pub viewers: Vec<Group>,
}

impl Policy {
    /// The caller's role, `None` for an outsider.
    pub fn role_of(&self, c: &Caller) -> Option<Role> {
        let member = |groups: &[Group]| {
            groups
                .iter()
                .any(|g| g.gid == c.gid || c.groups.contains(&g.gid))
        };
        if c.uid == 0 || member(&self.operators) {
            Some(Operator)
        } else if member(&self.viewers) {
            Some(Viewer)
        } else {
            None
        }
    }

    fn list(groups: &[Group]) -> String {
        groups
            .iter()
            .map(Group::to_string)
            .collect::<Vec<_>>()
            .join(" or ")
    }

    /// Who may do what `needed` asks: "root or a member of vireo (gid 990)".
    fn who_may(&self, needed: Role) -> String {
        let mut groups = self.operators.clone();
        if needed == Viewer {
            groups.extend(self.viewers.iter().cloned());
        }
        if groups.is_empty() {
            "root".to_string()
        } else {
            format!("root or a member of {}", Self::list(&groups))
        }
    }

    /// The one line a refused caller gets.
    pub fn refusal(
        &self,
        c: &Caller,
        role: Option<Role>,
        needed: Role,
        method: &Method,
        path: &str,
    ) -> String {
        match role {
            None => format!(
                "uid {} may not use vireod: {method} {path} needs {} ({})",
                c.uid,
                match needed {
                    Viewer => "a viewer or an operator",
                    Operator => "an operator",
                },
                self.who_may(needed)
            ),
            Some(r) => format!(
                "uid {} is a {}: {method} {path} needs an operator ({})",
                c.uid,
                r.name(),
                self.who_may(Operator)
            ),
        }
    }
}

/// The credentials of the process at the other end of a connection, as the kernel
/// recorded them when it connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups (`SO_PEERGROUPS`).
    pub groups: Vec<u32>,
}

/// What vireod knows of a connection's caller: [`Caller`], or why it could not be read
/// (such a caller has no role).
#[derive(Clone, Debug)]
pub enum Peer {
    Known(Caller),
    Unknown(String),
}

impl Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        match Caller::of(stream.io()) {
            Ok(c) => Peer::Known(c),
            Err(e) => {
                warn!(error = %e, "cannot read the credentials of a caller");
                Peer::Unknown(e.to_string())
            }
        }
    }
}

impl Caller {
    /// The peer credentials of a connected unix stream.
    pub fn of(s: &tokio::net::UnixStream) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let cred = s.peer_cred()?;
        Ok(Caller {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
            groups: peer_groups(s.as_raw_fd())?,
        })
    }
}

/// `SO_PEERGROUPS` (Linux 4.13): the supplementary groups the peer had at connect().
fn peer_groups(fd: std::os::fd::RawFd) -> std::io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` is a writable buffer of `len` bytes that outlives the call;
        // the kernel writes at most `len` bytes and stores the size it needs in `len`.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || n <= groups.len() {
            return Err(e);
        }
        groups.resize(n, 0);
    }
}

/// What the access layer needs: the policy, and the supervisor whose inventory holds
/// the audit table.
struct Gate {
    policy: Policy,
    sup: Arc<Supervisor>,
}

/// `router` with every request checked against `policy` and every change audited.
/// Serve it with `into_make_service_with_connect_info::<Peer>()` (a request without
/// [`Peer`] is refused).
pub fn protect(router: Router, sup: Arc<Supervisor>, policy: Policy) -> Router {
    let gate = Arc::new(Gate { policy, sup });
    router.layer(axum::middleware::from_fn_with_state(gate, enforce))
}

/// What a request asks for, as the layer sees it.
struct Asked {
    method: Method,
    path: String,
    /// The route it matched (`None`: no route, the answer is 404).
    route: Option<String>,
    /// The VM named by its `{name}` path parameter.
    vm: Option<String>,
}

impl Asked {
    async fn of(parts: &mut axum::http::request::Parts) -> Self {
        use axum::RequestPartsExt;
        let route = parts
            .extensions
            .get::<MatchedPath>()
            .map(|m| m.as_str().to_string());
        let vm = parts.extract::<RawPathParams>().await.ok().and_then(|p| {
            p.iter()
                .find(|(k, _)| *k == "name")
                .map(|(_, v)| v.to_string())
        });
        Asked {
            method: parts.method.clone(),
            path: parts.uri.path().to_string(),
            route,
            vm,
        }
    }

    /// Whether it may change something (and so is audited): any method but GET on a
    /// route (a path that matches none changes nothing).
    fn is_change(&self) -> bool {
        self.route.is_some() && self.method != Method::GET && self.method != Method::HEAD
    }
}

impl Gate {
    /// Writes the audit row of a change; a failure to write is logged, not answered
    /// (an allowed change has already happened).
    fn record(&self, c: &Caller, role: Option<Role>, asked: &Asked, status: u16, detail: String) {
        if !asked.is_change() {
            return;
        }
        let e = Entry {
            id: 0,
            at_ms: crate::now_ms(),
            uid: Some(c.uid),
            pid: c.pid,
            role: role.map_or("none", Role::name).to_string(),
            peer: None,
            method: asked.method.to_string(),
            route: asked.route.clone().unwrap_or_default(),
            vm: asked.vm.clone(),
            status,
            detail,
        };
        if let Err(err) = self.sup.inventory().record_audit(&e) {
            warn!(error = %crate::error_chain(&err), entry = ?e, "cannot write the audit record");
        }
    }
}

/// What the answer to a change says: its error line (`{"error": ...}`; empty for a
/// success) and the VM it was about when the path did not name one (a migration
/// record's `vm`). A change's answer is one small JSON document, never a stream.
pub(crate) struct Outcome {
    pub(crate) detail: String,
    pub(crate) vm: Option<String>,
}

pub(crate) async fn read_outcome(resp: Response) -> (Response, Outcome) {
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 64 << 10)
        .await
        .unwrap_or_default();
    let json = serde_json::from_slice::<serde_json::Value>(&bytes).unwrap_or_default();
    let field = |k: &str| json[k].as_str().map(str::to_string);
    let outcome = Outcome {
        detail: field("error").unwrap_or_default(),
        vm: field("vm"),
    };
    (
        Response::from_parts(parts, axum::body::Body::from(bytes)),
        outcome,
    )
}

async fn enforce(State(gate): State<Arc<Gate>>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let asked = Asked::of(&mut parts).await;
    let caller = match parts.extensions.get::<ConnectInfo<Peer>>() {
        Some(ConnectInfo(Peer::Known(c))) => c.clone(),
        Some(ConnectInfo(Peer::Unknown(e))) => {
            return crate::server::error(403, format!("caller unknown ({e}): refused"));
        }
        None => {
            return crate::server::error(
                403,
                "caller unknown (no peer credentials): refused".into(),
            );
        }
    };
    let role = gate.policy.role_of(&caller);
    let needed = required_role(&asked.method, asked.route.as_deref());
    if role < Some(needed) {
        let msg = gate
            .policy
            .refusal(&caller, role, needed, &asked.method, &asked.path);
        debug!(uid = caller.uid, pid = ?caller.pid, method = %asked.method, path = %asked.path, "refused");
        gate.record(&caller, role, &asked, 403, msg.clone());
        return crate::server::error(403, msg);
    }
    let resp = next.run(Request::from_parts(parts, body)).await;
    if !asked.is_change() {
        return resp;
    }
    let (resp, outcome) = read_outcome(resp).await;
    let mut asked = asked;
    asked.vm = asked.vm.or(outcome.vm);
    gate.record(
        &caller,
        role,
        &asked,
        resp.status().as_u16(),
        outcome.detail,
    );
    resp
}

/// (path, METHOD) of every axum `.route(...)` call in Rust source `src`: a call on one
/// line (`.route("/p", get(x))`) or as rustfmt breaks a long one (`.route(\n "/p",\n
/// get(x).post(y),\n )`). For the tests that hold the authorisation table and the
/// OpenAPI document to the router.
#[doc(hidden)]
pub fn routes_in(src: &str) -> std::collections::BTreeSet<(String, String)> {
    let mut out = std::collections::BTreeSet::new();
    for chunk in src.split(".route(").skip(1) {
        let Some((path, rest)) = chunk
            .trim_start()
            .strip_prefix('"')
            .and_then(|c| c.split_once('"'))
        else {
            continue;
        };
        let end = ["))\n", "),\n        )\n"]
            .iter()
            .filter_map(|e| rest.find(e))
            .min()
            .unwrap_or(rest.len());
        let call = &rest[..end];
        for m in ["get", "put", "post", "delete", "patch"] {
            if call.contains(&format!(" {m}(")) || call.contains(&format!(".{m}(")) {
                out.insert((path.to_string(), m.to_uppercase()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// (route, method) of every `.route(...)` call in server.rs, cluster_routes.rs and
    /// replication/routes.rs.
    fn served() -> BTreeSet<(String, String)> {
        let src = [
            include_str!("server.rs"),
            include_str!("cluster_routes.rs"),
            include_str!("replication/routes.rs"),
        ]
        .concat();
        routes_in(&src)
    }

    #[test]
    fn every_served_route_has_exactly_one_rule_and_every_rule_a_route() {
        let served = served();
        assert!(served.len() >= 20, "parsed too few routes: {served:?}");
        let ruled: BTreeSet<(String, String)> = RULES
            .iter()
            .map(|r| (r.route.to_string(), r.method.to_string()))
            .collect();
        assert_eq!(ruled.len(), RULES.len(), "a route has two rules");
        let missing: Vec<_> = served.difference(&ruled).collect();
        assert!(
            missing.is_empty(),
            "routes without a role in RULES: {missing:?}"
        );
        let stale: Vec<_> = ruled.difference(&served).collect();
        assert!(
            stale.is_empty(),
            "rules for routes that are not served: {stale:?}"
        );
    }

    #[test]
    fn the_openapi_document_states_each_routes_role() {
        let doc: serde_yaml::Value = serde_yaml::from_str(crate::OPENAPI_YAML).unwrap();
        let mut n = 0;
        for (path, ops) in doc["paths"].as_mapping().unwrap() {
            let path = path.as_str().unwrap();
            for (m, op) in ops.as_mapping().unwrap() {
                let m = m.as_str().unwrap().to_uppercase();
                if m == "PARAMETERS" {
                    continue;
                }
                let want = required_role(&Method::from_bytes(m.as_bytes()).unwrap(), Some(path));
                assert_eq!(
                    op["x-vireo-role"].as_str(),
                    Some(want.name()),
                    "{m} {path}: x-vireo-role"
                );
                assert!(op["responses"]["403"].is_mapping(), "{m} {path}: no 403");
                n += 1;
            }
        }
        assert_eq!(n, RULES.len());
    }

    #[test]
    fn viewers_can_only_read() {
        for r in RULES.iter().filter(|r| r.role == Viewer) {
            assert_eq!(r.method, "GET", "{r:?}");
        }
        for route in ["/api/v1/vms/{name}/start", "/api/v1/vms/{name}/serial"] {
            let m = if route.ends_with("serial") {
                Method::POST
            } else {
                Method::PUT
            };
            assert_eq!(required_role(&m, Some(route)), Operator);
        }
        assert_eq!(required_role(&Method::GET, Some("/api/v1/audit")), Operator);
        assert_eq!(required_role(&Method::GET, Some("/api/v1/vms")), Viewer);
        assert_eq!(required_role(&Method::HEAD, Some("/api/v1/vms")), Viewer);
        assert_eq!(
            required_role(&Method::HEAD, Some("/api/v1/audit")),
            Operator
        );
    }

    #[test]
    fn a_route_without_a_rule_needs_an_operator_and_no_route_a_viewer() {
        assert_eq!(
            required_role(&Method::PUT, Some("/api/v1/new-thing")),
            Operator
        );
        assert_eq!(
            required_role(&Method::GET, Some("/api/v1/new-thing")),
            Operator
        );
        assert_eq!(required_role(&Method::POST, None), Viewer);
    }

    fn caller(uid: u32, gid: u32, groups: &[u32]) -> Caller {
        Caller {
            uid,
            gid,
            pid: Some(1),
            groups: groups.to_vec(),
        }
    }

    fn group(gid: u32) -> Group {
        Group {
            gid,
            name: gid.to_string(),
        }
    }

    #[test]
    fn roles_come_from_uid_0_the_primary_and_the_supplementary_groups() {
        let p = Policy {
            operators: vec![group(900)],
            viewers: vec![group(901)],
        };
        assert_eq!(p.role_of(&caller(0, 0, &[])), Some(Operator));
        assert_eq!(p.role_of(&caller(1000, 900, &[])), Some(Operator));
        assert_eq!(p.role_of(&caller(1000, 1000, &[5, 900])), Some(Operator));
        assert_eq!(p.role_of(&caller(1000, 901, &[])), Some(Viewer));
        assert_eq!(p.role_of(&caller(1000, 1000, &[901])), Some(Viewer));
        // In both groups: the larger role.
        assert_eq!(p.role_of(&caller(1000, 901, &[900])), Some(Operator));
        assert_eq!(p.role_of(&caller(1000, 1000, &[5, 6])), None);
        assert_eq!(Policy::default().role_of(&caller(1000, 900, &[901])), None);
    }

    #[test]
    fn a_refusal_names_the_uid_and_who_may() {
        let p = Policy {
            operators: vec![Group {
                gid: 900,
                name: "vireo".into(),
            }],
            viewers: vec![group(901)],
        };
        let m = p.refusal(
            &caller(1234, 5, &[]),
            Some(Viewer),
            Operator,
            &Method::PUT,
            "/api/v1/vms/a/start",
        );
        assert_eq!(
            m,
            "uid 1234 is a viewer: PUT /api/v1/vms/a/start needs an operator (root or a member of vireo (gid 900))"
        );
        let m = p.refusal(
            &caller(1234, 5, &[]),
            None,
            Viewer,
            &Method::GET,
            "/api/v1/vms",
        );
        assert_eq!(
            m,
            "uid 1234 may not use vireod: GET /api/v1/vms needs a viewer or an operator (root or a member of vireo (gid 900) or gid 901)"
        );
        assert!(!m.contains('\n'));
        let m = p.refusal(
            &caller(1234, 5, &[]),
            None,
            Operator,
            &Method::DELETE,
            "/api/v1/vms/a",
        );
        assert_eq!(
            m,
            "uid 1234 may not use vireod: DELETE /api/v1/vms/a needs an operator (root or a member of vireo (gid 900))"
        );
    }

    #[test]
    fn groups_resolve_by_number_or_by_name() {
        assert_eq!(Group::resolve("990").unwrap(), group(990));
        let file = "root:x:0:\nvireo-ops:x:990:alice,bob\nbad:x:nan:\n";
        assert_eq!(
            Group::find_in(file, "vireo-ops"),
            Some(Group {
                gid: 990,
                name: "vireo-ops".into()
            })
        );
        assert_eq!(Group::find_in(file, "vireo"), None);
        assert_eq!(Group::find_in(file, "bad"), None);
        assert!(matches!(
            Group::resolve("no-such-group-here"),
            Err(GroupError::Unknown(_))
        ));
    }

    #[tokio::test]
    async fn the_callers_credentials_come_from_the_kernel() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let c = Caller::of(&a).unwrap();
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        assert_eq!((c.uid, c.gid), (uid, gid));
        assert_eq!(c.pid, Some(std::process::id() as i32));
        // SAFETY: getgroups with a null buffer returns the count.
        let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        assert_eq!(c.groups.len(), n as usize, "{c:?}");
    }
}
