//! The per-VM REST API: lifecycle through the socket, counters, wrong-state refusals.

use std::path::Path;
use std::time::Duration;

use vireo_e2e::{api, wait_for_socket, Vireo};

const T: Duration = Duration::from_secs(30);

fn tick_count(serial: &str) -> usize {
    serial.lines().filter(|l| l.starts_with("tick ")).count()
}

#[test]
fn pause_stops_the_guest_resume_restarts_it_shutdown_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let disk = dir.path().join("d.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let vm = Vireo::guest(
        "test=counter period_ms=10",
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--disk",
            &format!("path={}", disk.display()),
        ],
    )
    .spawn();
    wait_for_socket(&sock, T);
    vm.wait_serial("tick 5 ", T);

    let mode = std::fs::metadata(&sock).map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o777
    });
    assert_eq!(mode.unwrap(), 0o600, "API socket is private");

    let (s, body) = api(&sock, "GET", "vmm.ping", None);
    assert_eq!(s, 200, "{body}");
    let (s, body) = api(&sock, "GET", "vm.info", None);
    assert_eq!(s, 200);
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["state"], "Running");

    assert_eq!(api(&sock, "PUT", "vm.pause", None).0, 204);
    let before = tick_count(&vm.serial_text());
    std::thread::sleep(Duration::from_millis(300));
    let after = tick_count(&vm.serial_text());
    assert!(
        after <= before + 1,
        "guest progressed while paused: {before} -> {after}"
    );
    let (_, body) = api(&sock, "GET", "vm.info", None);
    assert!(body.contains("\"Paused\""), "{body}");

    // Wrong-state calls get 409 and change nothing.
    assert_eq!(api(&sock, "PUT", "vm.pause", None).0, 409);
    assert_eq!(api(&sock, "PUT", "vm.boot", None).0, 409);

    assert_eq!(api(&sock, "PUT", "vm.resume", None).0, 204);
    vm.wait_serial(&format!("tick {} ", after + 10), T);
    assert_eq!(api(&sock, "PUT", "vm.resume", None).0, 409);

    let (s, body) = api(&sock, "GET", "vm.counters", None);
    assert_eq!(s, 200);
    let counters: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(counters["vcpus"]["exits"].as_u64().unwrap() > 0, "{body}");
    assert!(counters["disk0"]["read_ops"].is_u64(), "{body}");

    assert_eq!(api(&sock, "GET", "vm.nonsense", None).0, 404);
    assert_eq!(api(&sock, "PUT", "vm.shutdown", None).0, 204);
    let out = vm.wait(T);
    assert_eq!(out.status.code(), Some(0));
    assert!(!Path::new(&sock).exists(), "socket removed on exit");
}

#[test]
fn create_and_boot_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let serial = dir.path().join("serial.log");
    let child = std::process::Command::new(vireo_e2e::bin("vireo"))
        .arg("--api-socket")
        .arg(&sock)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&sock, T);
    assert_eq!(api(&sock, "PUT", "vm.boot", None).0, 404, "no VM yet");
    assert_eq!(api(&sock, "PUT", "vm.create", Some("{not json")).0, 400);
    // Bodies serde would answer with Rust type names get plain words naming the field.
    for (body, field) in [
        (
            r#"{"payload":{"kernel":"/k"},"serial":{"mode":"tty","file":"/x"}}"#,
            "serial.file",
        ),
        (r#"{"payload":[]}"#, "payload"),
        (r#"{"payload":{"kernel":"/k"},"numa":[[]]}"#, "numa[0]"),
        (
            r#"{"payload":{"kernel":"/k"},"cpus":{"boot":"two"}}"#,
            "cpus.boot",
        ),
    ] {
        let (s, answer) = api(&sock, "PUT", "vm.create", Some(body));
        assert_eq!(s, 400, "{body}: {answer}");
        assert!(answer.contains(field), "{body}: {answer}");
        for rust in [
            "::", "struct ", "variant ", "element", "Config", "NumaNode", "u8",
        ] {
            assert!(!answer.contains(rust), "{body}: {answer}");
        }
    }
    let (s, body) = api(
        &sock,
        "PUT",
        "vm.create",
        Some(r#"{"payload":{"kernel":"/nonexistent"}}"#),
    );
    assert_eq!(s, 400);
    assert!(body.contains("/nonexistent"), "{body}");

    let cfg = serde_json::json!({
        "payload": {"kernel": vireo_e2e::guest(), "cmdline": "test=boot"},
        "cpus": {"boot": 2},
        "memory": {"size": 128u64 << 20},
        "serial": {"mode": "file", "file": serial},
    });
    assert_eq!(
        api(&sock, "PUT", "vm.create", Some(&cfg.to_string())).0,
        204
    );
    assert_eq!(
        api(&sock, "PUT", "vm.create", Some(&cfg.to_string())).0,
        409
    );
    let (_, body) = api(&sock, "GET", "vm.info", None);
    assert!(body.contains("\"Created\""), "{body}");
    assert_eq!(api(&sock, "PUT", "vm.boot", None).0, 204);
    let out = vireo_e2e::wait_with_timeout(child, T);
    assert_eq!(out.status.code(), Some(0));
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(text.contains("boot cpus=2 mem_mib=128"), "{text}");
}

/// `--cpus N` and `--memory SIZE` are short for `boot=N` and `size=SIZE` (the same
/// parsers serve `vireoctl vm create`): the guest sees 2 vCPUs and 128 MiB.
#[test]
fn short_cpus_and_memory_flags_boot_the_vm_they_say() {
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.log");
    let child = std::process::Command::new(vireo_e2e::bin("vireo"))
        .arg("--kernel")
        .arg(vireo_e2e::guest())
        .args(["--cmdline", "test=boot", "--cpus", "2", "--memory", "128M"])
        .arg("--serial")
        .arg(format!("file={}", serial.display()))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = vireo_e2e::wait_with_timeout(child, T);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(text.contains("boot cpus=2 mem_mib=128"), "{text}");
}

/// `--config FILE` with VM flags beside it: each flag overrides the file's value (the
/// guest sees the flags' 2 vCPUs and 96 MiB, not the file's 1 and 64 MiB, and its
/// command line), none is dropped; the rest of the file stands (its serial file).
#[test]
fn flags_beside_a_config_file_override_its_values() {
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.log");
    let cfg = dir.path().join("vm.json");
    let file = serde_json::json!({
        "payload": {"kernel": vireo_e2e::guest(), "cmdline": "test=nothing-here"},
        "cpus": {"boot": 1},
        "memory": {"size": 64 << 20},
        "serial": {"mode": "file", "file": serial},
    });
    std::fs::write(&cfg, file.to_string()).unwrap();
    let child = std::process::Command::new(vireo_e2e::bin("vireo"))
        .arg("--config")
        .arg(&cfg)
        .args(["--cmdline", "test=boot", "--cpus", "2", "--memory", "96M"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = vireo_e2e::wait_with_timeout(child, T);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(text.contains("boot cpus=2 mem_mib=96"), "{text}");
}

#[test]
fn openapi_document_lists_exactly_the_served_routes() {
    let doc: serde_json::Value = {
        let yaml = api_doc();
        serde_yaml_like_paths(&yaml)
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let _vmm = Vireo::guest("test=counter", &["--api-socket", sock.to_str().unwrap()]).spawn();
    wait_for_socket(&sock, T);
    for (path, method) in doc.as_array().unwrap().iter().map(|p| {
        (
            p[0].as_str().unwrap().to_string(),
            p[1].as_str().unwrap().to_uppercase(),
        )
    }) {
        if path == "vmm.shutdown" || path == "vm.shutdown" || path == "vm.reboot" {
            continue; // These end or restart the VM; covered elsewhere.
        }
        let (s, body) = api(&sock, &method, &path, Some("{}"));
        assert_ne!(
            s, 404,
            "{method} {path} is documented but not served: {body}"
        );
        assert_ne!(s, 405, "{method} {path}: wrong method: {body}");
    }
}

fn api_doc() -> String {
    std::fs::read_to_string(vireo_e2e::workspace().join("api/openapi/vireo.yaml")).unwrap()
}

/// Extracts (path, method) pairs from the OpenAPI YAML's `paths:` section.
fn serde_yaml_like_paths(yaml: &str) -> serde_json::Value {
    let mut out = Vec::new();
    let mut in_paths = false;
    let mut current = None;
    for line in yaml.lines() {
        if line.starts_with("paths:") {
            in_paths = true;
            continue;
        }
        if in_paths && !line.starts_with(' ') && !line.is_empty() {
            break;
        }
        if let Some(p) = line.strip_prefix("  /") {
            current = Some(p.trim_end_matches(':').to_string());
        } else if let (Some(p), Some(m)) = (
            &current,
            line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')),
        ) {
            if ["get", "put", "post", "delete", "patch"].contains(&m) {
                out.push(serde_json::json!([p, m]));
            }
        }
    }
    assert!(out.len() >= 8, "parsed too few routes: {out:?}");
    serde_json::Value::Array(out)
}

#[test]
fn power_button_reaches_the_guest_which_powers_off_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let vm = Vireo::guest(
        "test=power-button",
        &["--api-socket", sock.to_str().unwrap()],
    )
    .spawn();
    wait_for_socket(&sock, T);
    vm.wait_serial("power-button waiting", T);
    // A paused guest cannot see the button: refused, nothing pending afterwards.
    assert_eq!(api(&sock, "PUT", "vm.pause", None).0, 204);
    let (s, body) = api(&sock, "PUT", "vm.power-button", None);
    assert_eq!(s, 409, "{body}");
    assert_eq!(api(&sock, "PUT", "vm.resume", None).0, 204);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !vm.serial_text().contains("pressed"),
        "a refused press must not reach the guest"
    );
    assert_eq!(api(&sock, "PUT", "vm.power-button", None).0, 204);
    let serial = vm.wait_serial("vireo-guest: result ok", T);
    assert!(
        serial.contains("power-button pressed events=0x08"),
        "{serial}"
    );
    let out = vm.wait(T);
    assert_eq!(
        out.status.code(),
        Some(0),
        "ACPI S5 power-off is a clean exit"
    );
}
