//! Who may do what through vireod: real vireod, real VMMs, callers that really are
//! other local users (a forked child with its own uid, gid and groups connects to the
//! socket). Outsiders are refused everywhere, viewers only read, operators do
//! everything, every change (allowed or refused) is in the audit trail with the
//! caller's uid and pid, and the VMs' own sockets are vireod's alone.

use crate::common;

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::caller::{unused_ids, Caller};
use common::{Daemon, T};
use serde_json::{json, Value};

/// Test ids: two groups and callers built from them.
struct Ids {
    ops: u32,
    viewers: u32,
    other: u32,
    base: u32,
}

impl Ids {
    fn new() -> Self {
        let base = unused_ids();
        Ids {
            ops: base + 1,
            viewers: base + 2,
            other: base + 3,
            base,
        }
    }
    fn outsider(&self) -> Caller {
        Caller {
            uid: self.base + 4,
            gid: self.other,
            groups: vec![self.other],
        }
    }
    /// A viewer through a supplementary group.
    fn viewer(&self) -> Caller {
        Caller {
            uid: self.base + 5,
            gid: self.other,
            groups: vec![self.other, self.viewers],
        }
    }
    /// A viewer through the primary group.
    fn viewer_by_gid(&self) -> Caller {
        Caller {
            uid: self.base + 6,
            gid: self.viewers,
            groups: vec![],
        }
    }
    fn operator(&self) -> Caller {
        Caller {
            uid: self.base + 7,
            gid: self.other,
            groups: vec![self.ops],
        }
    }
    fn daemon(&self) -> Daemon {
        let d = Daemon::start(&[
            "--no-autostart",
            "--operators-group",
            &self.ops.to_string(),
            "--viewers-group",
            &self.viewers.to_string(),
        ]);
        // The test's directory is root's 0700; other users must reach the socket.
        std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// (path, method) of every route in the OpenAPI document (which api_doc.rs checks
/// against the router).
fn documented() -> BTreeSet<(String, String)> {
    let text =
        std::fs::read_to_string(vireo_e2e::workspace().join("agent/openapi/vireod.yaml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut out = BTreeSet::new();
    for (path, ops) in doc["paths"].as_mapping().unwrap() {
        for (m, _) in ops.as_mapping().unwrap() {
            let m = m.as_str().unwrap();
            if ["get", "put", "post", "delete", "patch"].contains(&m) {
                out.insert((path.as_str().unwrap().to_string(), m.to_uppercase()));
            }
        }
    }
    assert!(out.len() >= 20, "{out:?}");
    out
}

fn audit(d: &Daemon, query: &str) -> Vec<Value> {
    d.ok("GET", &format!("/api/v1/audit{query}"), None)
        .as_array()
        .cloned()
        .unwrap()
}

#[test]
fn outsiders_are_refused_on_every_route_and_change_nothing() {
    if !is_root() {
        panic!("this test takes other users' ids: run it as root (as CI does)");
    }
    let ids = Ids::new();
    let d = ids.daemon();
    d.define_counter("web", "Off", "never");
    let pid = d.ok("PUT", "/api/v1/vms/web/start", None)["pid"].as_i64();
    let before = d.ok("GET", "/api/v1/export", None);
    let outsider = ids.outsider();

    let mut routes: Vec<(String, String)> = documented().into_iter().collect();
    routes.push(("/api/v1/no-such-route".into(), "GET".into()));
    routes.push(("/api/v1/no-such-route".into(), "PUT".into()));
    let mut changes = 0;
    for (path, method) in &routes {
        let p = path.replace("{name}", "web").replace("{id}", "m1");
        let r = outsider.request(&d.socket, method, &p, Some("{}"));
        assert_eq!(r.status, 403, "{method} {p}: {}", r.body);
        let want = format!(
            "uid {} may not use vireod: {method} {p} needs",
            outsider.uid
        );
        assert!(r.body.contains(&want), "{method} {p}: {}", r.body);
        assert_eq!(r.body.lines().count(), 1, "{}", r.body);
        if method != "GET" && !path.contains("no-such-route") {
            changes += 1;
        }
    }
    // Nothing changed: the VM runs in the same process with the same definition.
    assert_eq!(d.state("web"), "Running");
    assert_eq!(d.ok("GET", "/api/v1/vms/web", None)["pid"].as_i64(), pid);
    assert_eq!(d.ok("GET", "/api/v1/export", None), before);
    // Each refused change is in the audit trail, with the outsider's uid and no role.
    let refused: Vec<Value> = audit(&d, "?limit=1000")
        .into_iter()
        .filter(|e| e["uid"] == outsider.uid)
        .collect();
    assert_eq!(refused.len(), changes, "{refused:#?}");
    for e in &refused {
        assert_eq!(e["status"], 403, "{e}");
        assert_eq!(e["role"], "none", "{e}");
        assert!(
            e["detail"].as_str().unwrap().contains("may not use vireod"),
            "{e}"
        );
    }
    assert!(refused.iter().any(|e| e["method"] == "DELETE"
        && e["route"] == "/api/v1/vms/{name}"
        && e["vm"] == "web"));
}

#[test]
fn viewers_read_everything_and_change_nothing() {
    if !is_root() {
        panic!("this test takes other users' ids: run it as root (as CI does)");
    }
    let ids = Ids::new();
    let d = ids.daemon();
    d.define_counter("web", "Off", "never");
    let pid = d.ok("PUT", "/api/v1/vms/web/start", None)["pid"].as_i64();
    d.wait_serial("web", "tick ", T);
    let before = d.ok("GET", "/api/v1/export", None);

    for viewer in [ids.viewer(), ids.viewer_by_gid()] {
        let get = |path: &str| {
            let r = viewer.request(&d.socket, "GET", path, None);
            assert_eq!(r.status, 200, "GET {path}: {}", r.body);
            r.body
        };
        assert!(get("/api/v1/vms").contains("\"web\""));
        assert!(get("/api/v1/vms/web").contains("\"Running\""));
        assert!(get("/api/v1/host.info").contains("run_dir"));
        assert!(get("/api/v1/export").contains("\"web\""));
        get("/api/v1/migrations");
        get("/api/v1/vms/web/exits");
        assert!(get("/api/v1/vms/web/metrics").contains("cpu"));
        assert!(get("/metrics").contains("vm=\"web\""));
        assert!(get("/api/v1/vms/web/serial?lines=5").contains("tick "));

        // Events: the viewer sees a pause an operator makes.
        let mut ev = viewer.events(&d.socket, "?vm=web");
        assert_eq!(ev.status, 200);
        d.ok("PUT", "/api/v1/vms/web/pause", None);
        let e = ev.next();
        assert_eq!(
            (&e["vm"], &e["event"]),
            (&json!("web"), &json!("Paused")),
            "{e}"
        );
        d.ok("PUT", "/api/v1/vms/web/resume", None);

        let def = json!({"config": common::counter_config()}).to_string();
        let migrate = json!({"destination_url": "unix:/tmp/nowhere.sock"}).to_string();
        let incoming =
            json!({"name": "rx", "definition": {"config": common::counter_config()}}).to_string();
        for (method, path, body) in [
            ("PUT", "/api/v1/vms/web/start", None),
            ("PUT", "/api/v1/vms/web/stop", None),
            ("PUT", "/api/v1/vms/web/kill", None),
            ("PUT", "/api/v1/vms/web/pause", None),
            ("PUT", "/api/v1/vms/web/resume", None),
            ("PUT", "/api/v1/vms/web2", Some(def.as_str())),
            ("PUT", "/api/v1/vms/web", Some(def.as_str())),
            ("DELETE", "/api/v1/vms/web", None),
            ("PUT", "/api/v1/vms/web/migrate", Some(migrate.as_str())),
            ("PUT", "/api/v1/vms/web/metrics/reset", None),
            ("POST", "/api/v1/vms/web/serial", Some("quit\r")),
            (
                "POST",
                "/api/v1/migrations/incoming",
                Some(incoming.as_str()),
            ),
            ("DELETE", "/api/v1/migrations/m1", None),
            ("GET", "/api/v1/audit", None),
        ] {
            let r = viewer.request(&d.socket, method, path, body);
            assert_eq!(r.status, 403, "{method} {path}: {}", r.body);
            let want = format!(
                "uid {} is a viewer: {method} {path} needs an operator",
                viewer.uid
            );
            assert!(r.body.contains(&want), "{}", r.body);
        }
        // Nothing changed.
        let st = d.ok("GET", "/api/v1/vms/web", None);
        assert_eq!(
            (st["state"].as_str(), st["pid"].as_i64()),
            (Some("Running"), pid),
            "{st}"
        );
        assert!(d.absent("web2"));
        assert!(d.absent("rx"));
        assert_eq!(d.ok("GET", "/api/v1/export", None), before);
        assert_eq!(d.ok("GET", "/api/v1/migrations", None), json!([]));

        // vireoctl as the viewer: reading works, a change fails with the 403 line.
        let ctl = |args: &[&str]| {
            viewer
                .command(&common::bin("vireoctl"))
                .arg("--socket")
                .arg(&d.socket)
                .args(args)
                .output()
                .unwrap()
        };
        let o = ctl(&["vm", "list"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).contains("web"));
        let o = ctl(&["vm", "stop", "web"]);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!("uid {} is a viewer", viewer.uid)) && err.contains("(403)"),
            "{err}"
        );
        assert_eq!(d.state("web"), "Running");
    }
}

#[test]
fn operators_change_everything_and_each_change_is_audited() {
    if !is_root() {
        panic!("this test takes other users' ids: run it as root (as CI does)");
    }
    let ids = Ids::new();
    let d = ids.daemon();
    let op = ids.operator();
    let viewer = ids.viewer();
    let def = json!({"config": common::counter_config(), "priority": "Off"}).to_string();

    let mut expected = Vec::new();
    let mut call = |who: &Caller, method: &str, path: &str, body: Option<&str>, status: u16| {
        let r = who.request(&d.socket, method, path, body);
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        expected.push((who.uid, r.pid, method.to_string(), status));
        r
    };
    call(&op, "PUT", "/api/v1/vms/web", Some(&def), 201);
    call(&op, "PUT", "/api/v1/vms/web/start", None, 200);
    call(&viewer, "PUT", "/api/v1/vms/web/stop", None, 403);
    call(&op, "PUT", "/api/v1/vms/web/pause", None, 200);
    call(&op, "PUT", "/api/v1/vms/web/resume", None, 200);
    call(&op, "PUT", "/api/v1/vms/web/metrics/reset", None, 204);
    call(&op, "PUT", "/api/v1/vms/nope/start", None, 404);
    call(&op, "PUT", "/api/v1/vms/web/stop", None, 200);
    call(&op, "DELETE", "/api/v1/vms/web", None, 204);
    // An incoming migration and its cancel: their VM is in the body and the record.
    let incoming = json!({"name": "rx", "definition": {"config": common::counter_config()}});
    let r = call(
        &op,
        "POST",
        "/api/v1/migrations/incoming",
        Some(&incoming.to_string()),
        201,
    );
    let id = serde_json::from_str::<Value>(&r.body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    call(
        &op,
        "DELETE",
        &format!("/api/v1/migrations/{id}"),
        None,
        200,
    );
    assert_eq!(d.wait_migration(&id, T)["state"], "cancelled");
    assert!(d.absent("web"));
    // Reading is not audited.
    assert_eq!(
        op.request(&d.socket, "GET", "/api/v1/vms", None).status,
        200
    );

    let r = op.request(&d.socket, "GET", "/api/v1/audit", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let entries: Vec<Value> = serde_json::from_str(&r.body).unwrap();
    let got: Vec<(u32, i32, String, u16)> = entries
        .iter()
        .map(|e| {
            (
                e["uid"].as_u64().unwrap() as u32,
                e["pid"].as_i64().unwrap() as i32,
                e["method"].as_str().unwrap().to_string(),
                e["status"].as_u64().unwrap() as u16,
            )
        })
        .collect();
    assert_eq!(got, expected, "{entries:#?}");
    let roles: Vec<&str> = entries
        .iter()
        .map(|e| e["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles[2], "viewer");
    assert!(roles
        .iter()
        .enumerate()
        .all(|(i, r)| i == 2 || *r == "operator"));
    assert_eq!(entries[1]["route"], "/api/v1/vms/{name}/start");
    assert_eq!(entries[1]["vm"], "web");
    assert!(entries[2]["detail"]
        .as_str()
        .unwrap()
        .contains("is a viewer"));
    assert_eq!(entries[6]["vm"], "nope");
    assert!(entries[6]["detail"]
        .as_str()
        .unwrap()
        .contains("no VM named"));
    assert_eq!(entries[1]["detail"], "");
    assert_eq!(entries[9]["route"], "/api/v1/migrations/incoming");
    assert_eq!(entries[9]["vm"], "rx");
    assert_eq!(entries[10]["route"], "/api/v1/migrations/{id}");
    assert_eq!(entries[10]["vm"], "rx");

    // Filters.
    assert_eq!(audit(&d, "?vm=nope").len(), 1);
    let last2 = audit(&d, "?limit=2");
    assert_eq!(last2.len(), 2);
    assert_eq!(last2[0]["method"], "POST");
    assert_eq!(last2[1]["method"], "DELETE");
    let since = entries[7]["at_ms"].as_u64().unwrap();
    assert!(audit(&d, &format!("?since={since}")).len() >= 2);
    let (s, b) = d.api("GET", "/api/v1/audit?limit=x", None);
    assert_eq!(s, 400, "{b}");
    // Only operators read it.
    assert_eq!(
        viewer
            .request(&d.socket, "GET", "/api/v1/audit", None)
            .status,
        403
    );

    // vireoctl audit prints them.
    let text = d.ctl_ok(&["audit", "--vm", "web"]);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("TIME") && lines[0].contains("UID"),
        "{text}"
    );
    assert_eq!(lines.len(), 1 + 8, "{text}");
    assert!(
        lines[3].contains(&viewer.uid.to_string()) && lines[3].contains("403"),
        "{text}"
    );
    assert!(lines[3].contains("is a viewer"), "{text}");
    assert!(
        lines[8].contains(&op.uid.to_string()) && lines[8].contains("DELETE"),
        "{text}"
    );
    let text = d.ctl_ok(&["audit", "--limit", "1"]);
    assert_eq!(text.lines().count(), 2, "{text}");
    let o = d.ctl(&["audit", "--vm", "../x"]);
    assert!(!o.status.success());
}

/// The run directory's `vms/` (0700) and each VM's socket (0600) are root's: no other
/// user reaches a VMM but through vireod.
#[test]
fn vm_sockets_are_private_and_vms_are_reached_through_vireod() {
    if !is_root() {
        panic!("this test takes other users' ids: run it as root (as CI does)");
    }
    let ids = Ids::new();
    let d = ids.daemon();
    let op = ids.operator();
    let def = json!({"config": {
        "payload": {"kernel": vireo_e2e::guest(), "cmdline": "test=echo"},
        "memory": {"size": 32u64 << 20},
    }});
    let r = op.request(&d.socket, "PUT", "/api/v1/vms/e", Some(&def.to_string()));
    assert_eq!(r.status, 201, "{}", r.body);
    let r = op.request(&d.socket, "PUT", "/api/v1/vms/e/start", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let st: Value = serde_json::from_str(&r.body).unwrap();
    let sock = PathBuf::from(st["socket"].as_str().unwrap());
    let meta = |p: &Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.uid(), m.gid(), m.permissions().mode() & 0o777)
    };
    assert_eq!(meta(&sock), (0, 0, 0o600));
    assert_eq!(meta(&d.run_dir.join("vms")), (0, 0, 0o700));
    assert_eq!(meta(&d.socket).2, 0o666);

    // Neither an operator nor a viewer can connect to the VMM itself.
    for who in [op.clone(), ids.viewer()] {
        let e = who
            .try_request(&sock, "PUT", "/api/v1/vm.pause", None)
            .map(|r| r.status);
        assert_eq!(e, Err(libc::EACCES), "uid {}", who.uid);
    }
    assert_eq!(d.state("e"), "Running");
    // The socket itself works (for root).
    let (s, b) = common::http(&sock, "GET", "/api/v1/vm.info", None);
    assert_eq!(s, 200, "{b}");

    // Through vireod: the console both ways and a pause.
    d.wait_serial("e", "echo ready", T);
    let r = op.request(&d.socket, "POST", "/api/v1/vms/e/serial", Some("hello\r"));
    assert_eq!(r.status, 200, "{}", r.body);
    d.wait_serial("e", "echo hello", T);
    let r = ids
        .viewer()
        .request(&d.socket, "GET", "/api/v1/vms/e/serial", None);
    assert!(r.body.contains("echo hello"), "{}", r.body);
    let r = op.request(&d.socket, "PUT", "/api/v1/vms/e/pause", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(d.state("e"), "Paused");
    let r = op.request(&d.socket, "PUT", "/api/v1/vms/e/kill", None);
    assert_eq!(r.status, 200, "{}", r.body);
}
