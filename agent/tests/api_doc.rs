//! The OpenAPI document lists exactly the routes the server serves; the shipped
//! systemd units verify; vireoctl's completions and man page render.

use crate::common;

use std::collections::BTreeSet;

use common::Daemon;

fn workspace_file(p: &str) -> String {
    std::fs::read_to_string(vireo_e2e::workspace().join(p)).unwrap()
}

/// (path, method) pairs of the OpenAPI document.
fn documented() -> BTreeSet<(String, String)> {
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&workspace_file("agent/openapi/vireod.yaml")).unwrap();
    let mut out = BTreeSet::new();
    for (path, ops) in doc["paths"].as_mapping().unwrap() {
        for (m, _) in ops.as_mapping().unwrap() {
            let m = m.as_str().unwrap();
            if ["get", "put", "post", "delete", "patch"].contains(&m) {
                out.insert((path.as_str().unwrap().to_string(), m.to_uppercase()));
            }
        }
    }
    out
}

/// (path, method) pairs of the router, read from the `.route(...)` calls of server.rs
/// cluster_routes.rs and replication/routes.rs (the cluster and replication routes,
/// merged in by vireod).
fn routed() -> BTreeSet<(String, String)> {
    let src = workspace_file("agent/src/server.rs")
        + &workspace_file("agent/src/cluster_routes.rs")
        + &workspace_file("agent/src/replication/routes.rs");
    agent::authz::routes_in(&src)
}

#[test]
fn openapi_document_lists_exactly_the_served_routes() {
    let doc = documented();
    let code = routed();
    assert!(code.len() >= 18, "parsed too few routes: {code:?}");
    assert_eq!(doc, code, "document and router differ");

    // And the running server answers each documented route (never the fallback 404 or
    // a 405). VM routes go to a VM that does not exist, so nothing is changed.
    let d = Daemon::start(&["--no-autostart"]);
    for (path, method) in &doc {
        if path == "/api/v1/events" {
            continue; // A stream; covered by the lifecycle test.
        }
        let p = path
            .replace("{name}", "no-such-vm")
            .replace("{id}", "no-such-migration");
        let (s, body) = d.api(method, &p, Some("{}"));
        assert_ne!(s, 405, "{method} {p}: wrong method: {body}");
        assert!(
            !body.contains("no such API endpoint"),
            "{method} {p} is documented but not served: {body}"
        );
        if path.starts_with("/api/v1/cluster") {
            // This vireod is no cluster node: the cluster routes say so.
            assert_eq!(s, 409, "{method} {p}: {body}");
            assert!(body.contains("not a cluster node"), "{method} {p}: {body}");
        } else if path.contains("{name}") && !(method == "PUT" && path == "/api/v1/vms/{name}") {
            assert_eq!(s, 404, "{method} {p}: {body}");
            assert!(body.contains("no VM named"), "{method} {p}: {body}");
        } else if path.starts_with("/api/v1/replicas/") {
            // No replica server here: the replica routes say so (or refuse the body).
            assert!(
                s == 400 || (s == 409 && body.contains("not a replica server")),
                "{method} {p}: {s} {body}"
            );
        } else if path.contains("{id}") {
            assert_eq!(s, 404, "{method} {p}: {body}");
            assert!(body.contains("no migration"), "{method} {p}: {body}");
        } else if method == "POST" {
            assert_eq!(s, 400, "{method} {p}: {body}");
        } else if method == "GET" {
            assert_eq!(s, 200, "{method} {p}: {body}");
        }
    }
    let (s, body) = d.api("GET", "/api/v1/openapi.yaml", None);
    assert_eq!(s, 200);
    assert_eq!(body, workspace_file("agent/openapi/vireod.yaml"));
}

#[test]
fn shipped_systemd_units_verify() {
    let which = std::process::Command::new("sh")
        .args(["-c", "command -v systemd-analyze"])
        .output();
    if !which.map(|o| o.status.success()).unwrap_or(false) {
        vireo_e2e::skip_or_fail_under_ci(
            "systemd-analyze is not installed (scripts/setup installs systemd)",
        );
        return;
    }
    // The units name /usr/bin/vireod and /usr/bin/vireo: verify copies that name the
    // built binaries, so the check does not depend on an installation.
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = common::bin("vireod").parent().unwrap().to_path_buf();
    for (src, dst) in [
        ("vireod.service", "vireod.service"),
        ("vireo@.service", "vireo@.service"),
        ("vireo@.service", "vireo@test.service"),
        ("vireo.slice", "vireo.slice"),
    ] {
        let text = std::fs::read_to_string(vireo_e2e::workspace().join("agent/systemd").join(src))
            .unwrap();
        assert!(
            text.contains("/usr/bin/") || src.ends_with(".slice"),
            "{src}"
        );
        std::fs::write(
            dir.path().join(dst),
            text.replace("/usr/bin/", &format!("{}/", bin_dir.display())),
        )
        .unwrap();
    }
    let o = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("vireod.service"))
        .arg(dir.path().join("vireo@test.service"))
        .arg(dir.path().join("vireo.slice"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "systemd-analyze verify failed:\n{err}");
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("vireo")).collect();
    assert!(ours.is_empty(), "warnings about our units:\n{err}");
}

#[test]
fn vireoctl_renders_completions_and_a_man_page() {
    for shell in ["bash", "zsh", "fish"] {
        let o = std::process::Command::new(common::bin("vireoctl"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(o.status.success());
        let s = String::from_utf8_lossy(&o.stdout);
        assert!(
            s.contains("vireoctl") && s.contains("migrate"),
            "{shell}: {s}"
        );
    }
    let o = std::process::Command::new(common::bin("vireoctl"))
        .arg("man")
        .output()
        .unwrap();
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.starts_with(".ie") || s.contains(".TH vireoctl"), "{s}");
}

#[test]
fn vireo_tells_systemd_it_is_ready_once_the_vm_runs() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify");
    let server = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    server.set_read_timeout(Some(common::T)).unwrap();
    let sock = dir.path().join("vm.sock");
    let cfg = dir.path().join("vm.json");
    let mut c = common::counter_config();
    c["serial"] = serde_json::json!({"mode": "file", "file": dir.path().join("serial.log")});
    std::fs::write(&cfg, c.to_string()).unwrap();
    let mut child = std::process::Command::new(common::bin("vireo"))
        .arg("--config")
        .arg(&cfg)
        .arg("--api-socket")
        .arg(&sock)
        .env("NOTIFY_SOCKET", &notify)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 64];
    let got = server.recv(&mut buf);
    let (s, body) = if got.is_ok() {
        common::http(&sock, "GET", "/api/v1/vm.info", None)
    } else {
        (0, String::new())
    };
    let _ = child.kill();
    let _ = child.wait();
    let n = got.expect("READY=1 datagram");
    assert_eq!(&buf[..n], b"READY=1");
    assert_eq!(s, 200);
    assert!(body.contains("\"Running\""), "ready means running: {body}");
}
