//! Live migration between two real vireods on one machine (different state and run
//! directories), real VMMs running the test guest: the queue's concurrency limit,
//! the hand-over of ownership, and failures that leave the VM on the source.

use crate::common;

use std::time::{Duration, Instant};

use common::{alive, Daemon, Events, T};
use serde_json::{json, Value};

/// A guest that rewrites 1024 pages (4 MiB) and checks each one it rewrites: once it
/// has written them all and is paused, a migration capped at 1 MiB/s takes ~4 s.
fn define_dirty(d: &Daemon, name: &str) {
    let def = json!({
        "config": {
            "payload": {"kernel": vireo_e2e::guest(), "cmdline": "test=dirty pages=1024 rate=4000"},
            "memory": {"size": 64u64 << 20},
        },
        "priority": "Medium",
    });
    d.ok(
        "PUT",
        &format!("/api/v1/vms/{name}"),
        Some(&def.to_string()),
    );
}

fn ms(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// The largest number of migrations whose [started, finished] intervals overlap.
fn max_overlap(records: &[Value]) -> usize {
    let mut edges: Vec<(u64, i32)> = Vec::new();
    for r in records {
        edges.push((ms(&r["started_at_ms"]), 1));
        edges.push((ms(&r["finished_at_ms"]), -1));
    }
    // At equal times an end comes before a start (a slot handed over).
    edges.sort();
    let (mut now, mut max) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        max = max.max(now);
    }
    max as usize
}

#[test]
fn three_migrations_with_a_limit_of_two_queue_the_third_and_all_arrive_counting() {
    let (src, dst) = Daemon::pair(
        &["--no-autostart", "--max-concurrent-migrations", "2"],
        &["--no-autostart"],
    );
    let mut src_events = Events::subscribe(&src.socket, "?vm=c");
    let names = ["a", "b", "c"];
    let mut pids = Vec::new();
    for n in names {
        src.define_counter(n, "Medium", "on-failure");
        src.ok("PUT", &format!("/api/v1/vms/{n}/start"), None);
        pids.push(src.pid(n).unwrap());
    }
    for n in names {
        src.wait_serial(n, "tick 20 ", T);
    }
    let host = src.ok("GET", "/api/v1/host.info", None);
    assert_eq!(host["max_concurrent_migrations"], 2, "{host}");

    // Three requests at once (a, b by the API, c by vireoctl).
    let body = json!({"destination_agent": dst.socket});
    let ra = src.migrate("a", &body);
    let rb = src.migrate("b", &body);
    let out = src.ctl_ok(&["vm", "migrate", "c", "--to", dst.socket.to_str().unwrap()]);
    assert!(out.contains("migration "), "{out}");
    let mut ids = vec![
        ra["id"].as_str().unwrap().to_string(),
        rb["id"].as_str().unwrap().to_string(),
    ];
    let list = src.migrations();
    let rc = list.iter().find(|r| r["vm"] == "c").unwrap().clone();
    ids.push(rc["id"].as_str().unwrap().to_string());
    // Right after the requests at most two run; the third waits its turn.
    let mut saw_queued = false;
    let start = Instant::now();
    loop {
        let recs = src.migrations();
        let running = recs.iter().filter(|r| r["state"] == "running").count();
        assert!(running <= 2, "more than 2 running: {recs:?}");
        saw_queued |= recs
            .iter()
            .any(|r| r["vm"] == "c" && r["state"] == "queued");
        if recs.iter().all(|r| r["state"] == "completed") {
            break;
        }
        assert!(
            !recs.iter().any(|r| r["state"] == "failed"),
            "a migration failed: {recs:?}\nsrc log:\n{}\ndst log:\n{}",
            src.log(),
            dst.log()
        );
        assert!(start.elapsed() < T, "migrations did not finish: {recs:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(saw_queued, "the third migration was never seen queued");
    let recs: Vec<Value> = ids.iter().map(|id| src.migration(id)).collect();
    // A completed migration shows the source VMM's final figures (its result line as it
    // exited), not the last 100 ms sample taken while it was still sending.
    for r in &recs {
        let p = &r["progress"];
        assert_eq!(p["status"], "completed", "{r}");
        assert_eq!(p["remaining_pages"], 0, "{r}");
        assert!(p["downtime_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert!(p["total_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert!(p["pages_sent"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(r["percent"], 100.0, "{r}");
    }
    let out = src.ctl_ok(&["migration", "info", &ids[0]]);
    let downtime = out.lines().find(|l| l.starts_with("downtime")).unwrap();
    assert!(!downtime.ends_with(" 0.0 ms"), "{out}");
    // The timestamps agree: never more than 2 at once, and the third started only
    // once one of the first two had finished.
    assert_eq!(max_overlap(&recs), 2, "{recs:?}");
    let first_end = ms(&recs[0]["finished_at_ms"]).min(ms(&recs[1]["finished_at_ms"]));
    assert!(
        ms(&recs[2]["started_at_ms"]) >= first_end,
        "c started before a slot was free: {recs:?}"
    );
    assert!(ms(&recs[2]["queued_at_ms"]) < ms(&recs[2]["started_at_ms"]));
    for r in &recs {
        // (progress is what the last poll saw: a tiny guest may be across in less
        // than one poll period)
        assert_eq!(r["percent"], 100.0, "{r}");
        assert!(r["peer_id"].is_string(), "{r}");
        assert!(r["error"].is_null(), "{r}");
    }
    // The VMs now belong to the destination: gone from the source (their VMMs
    // ended), running on the destination and still counting where they were.
    for (i, n) in names.iter().enumerate() {
        assert!(src.absent(n), "{n} still defined on the source");
        common::wait_dead(pids[i], T);
        let v = dst.wait_state(n, "Running", T);
        let pid = v["pid"].as_i64().unwrap() as i32;
        assert!(alive(pid));
        let before = dst.tick_numbers(n);
        let first = *before.first().unwrap_or(&0);
        assert!(
            first > 20,
            "{n} started over on the destination: {before:?}"
        );
        let last = *before.last().unwrap_or(&0);
        dst.wait_serial(n, &format!("tick {} ", last + 10), T);
        // The destination's records say the same.
        let incoming = dst
            .migrations()
            .into_iter()
            .find(|r| r["vm"] == *n)
            .unwrap();
        assert_eq!(incoming["direction"], "incoming");
        assert_eq!(incoming["state"], "completed");
    }
    let seen: Vec<String> = src_events
        .until("c", "migrated")
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    assert!(
        seen.ends_with(&[
            "migration-queued".to_string(),
            "migration-started".to_string(),
            "Migrating".to_string(),
            "deleted".to_string(),
            "migrated".to_string()
        ]),
        "{seen:?}"
    );
    let table = src.ctl_ok(&["migration", "list"]);
    assert!(table.lines().next().unwrap().starts_with("ID"), "{table}");
    assert_eq!(
        table.lines().filter(|l| l.contains("completed")).count(),
        3,
        "{table}"
    );

    // And back, with vireoctl waiting for the end.
    let out = dst.ctl_ok(&[
        "vm",
        "migrate",
        "a",
        "--to",
        src.socket.to_str().unwrap(),
        "--wait",
    ]);
    assert!(out.contains("completed"), "{out}");
    src.wait_state("a", "Running", T);
    assert!(dst.absent("a"));
    let last = *src.tick_numbers("a").last().unwrap_or(&0);
    src.wait_serial("a", &format!("tick {} ", last + 5), T);
}

#[test]
fn failed_migrations_leave_the_vm_running_and_supervised_on_the_source() {
    // A configured peer where no vireod listens.
    let nobody_dir = tempfile::tempdir().unwrap();
    let nobody = nobody_dir.path().join("vireod.sock");
    let (src, dst) = Daemon::pair(
        &[
            "--no-autostart",
            "--max-concurrent-migrations",
            "1",
            "--peer-socket",
            nobody.to_str().unwrap(),
        ],
        &["--no-autostart"],
    );
    define_dirty(&src, "x");
    src.define_counter("y", "Medium", "on-failure");
    for n in ["x", "y"] {
        src.ok("PUT", &format!("/api/v1/vms/{n}/start"), None);
    }
    // Every page written (the first report comes after a second), then paused: the
    // copy then has 4 MiB to move and nothing new to chase.
    src.wait_serial("x", "dirty pass=", T);
    src.ok("PUT", "/api/v1/vms/x/pause", None);
    src.wait_serial("y", "tick 5 ", T);
    let pid_x = src.pid("x").unwrap();
    let pid_y = src.pid("y").unwrap();

    // 1. The destination refuses: it has a VM of that name already.
    dst.define_counter("y", "Medium", "on-failure");
    let r = src.migrate("y", &json!({"destination_agent": dst.socket}));
    let r = src.wait_migration(r["id"].as_str().unwrap(), T);
    assert_eq!(r["state"], "failed", "{r}");
    let err = r["error"].as_str().unwrap();
    assert!(
        err.contains("destination refused") && err.contains("409"),
        "{err}"
    );
    assert_eq!(src.state("y"), "Running");
    assert_eq!(src.pid("y"), Some(pid_y));
    dst.ok("DELETE", "/api/v1/vms/y", None);

    // 2. No vireod at the (configured) destination socket.
    let r = src.migrate("y", &json!({"destination_agent": nobody}));
    let r = src.wait_migration(r["id"].as_str().unwrap(), T);
    assert_eq!(r["state"], "failed", "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("cannot connect"),
        "{r}"
    );
    assert_eq!(src.state("y"), "Running");

    // 3. The destination vanishes in the middle of the copy (its receiving VMM is
    // killed); meanwhile a second migration waits its turn (limit 1) and is cancelled,
    // and the running one cannot be.
    let rx = src.migrate(
        "x",
        &json!({"destination_agent": dst.socket, "bandwidth_mib_s": 1}),
    );
    let ry = src.migrate("y", &json!({"destination_agent": dst.socket}));
    let (idx, idy) = (
        rx["id"].as_str().unwrap().to_string(),
        ry["id"].as_str().unwrap().to_string(),
    );
    assert_eq!(src.migration(&idy)["state"], "queued");
    let (s, b) = src.api("DELETE", &format!("/api/v1/migrations/{idy}"), None);
    assert_eq!(s, 200, "{b}");
    let ry = src.wait_migration(&idy, T);
    assert_eq!(ry["state"], "cancelled", "{ry}");
    assert!(ry["started_at_ms"].is_null());
    assert_eq!(src.state("y"), "Running");
    let (s, b) = src.api("DELETE", &format!("/api/v1/migrations/{idx}"), None);
    assert_eq!(s, 409, "{b}");
    assert_eq!(src.state("x"), "Migrating");
    // Pages are flowing (the destination's record counts what its VMM received; the
    // source's counts only at the end of each round); kill the receiver.
    let start = Instant::now();
    let peer_id = loop {
        if let Some(p) = src.migration(&idx)["peer_id"].as_str() {
            break p.to_string();
        }
        assert!(start.elapsed() < T, "the destination never answered");
        std::thread::sleep(Duration::from_millis(5));
    };
    loop {
        let m = dst.migration(&peer_id);
        if m["progress"]["bytes_sent"].as_u64().unwrap_or(0) > 512 * 1024 {
            break;
        }
        assert_eq!(m["state"], "running", "{m}");
        assert_eq!(src.migration(&idx)["state"], "running");
        assert!(start.elapsed() < T, "no progress: {m}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let receiver = dst.pid("x").expect("receiver on the destination");
    assert_eq!(dst.state("x"), "Incoming");
    // SAFETY: kill with a pid read from vireod's API and a signal.
    unsafe { libc::kill(receiver, libc::SIGKILL) };
    let m = src.wait_migration(&idx, T);
    assert_eq!(m["state"], "failed", "{m}");
    // The VM stays where it was, with the same VMM, supervised and as it was
    // (paused); resumed, the guest goes on checking every page.
    let v = src.wait_state("x", "Paused", T);
    assert_eq!(v["pid"], pid_x, "{v}");
    assert!(v["migration"].is_null(), "{v}");
    src.ok("PUT", "/api/v1/vms/x/resume", None);
    let serial = src.serial("x");
    let reports = serial.lines().filter(|l| l.starts_with("dirty ")).count();
    let start = Instant::now();
    while src
        .serial("x")
        .lines()
        .filter(|l| l.starts_with("dirty "))
        .count()
        < reports + 2
    {
        assert!(
            start.elapsed() < T,
            "x stopped on the source:\n{}",
            src.serial("x")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!src.serial("x").contains("mismatch"), "{}", src.serial("x"));
    // The destination forgot it.
    let start = Instant::now();
    while !dst.absent("x") {
        assert!(start.elapsed() < T, "destination kept x: {}", dst.vm("x"));
        std::thread::sleep(Duration::from_millis(20));
    }
    let incoming = dst
        .migrations()
        .into_iter()
        .find(|r| r["vm"] == "x")
        .unwrap();
    assert_eq!(incoming["state"], "failed", "{incoming}");
    // Still supervised: a crash of its VMM is restarted by the policy.
    // SAFETY: kill with a pid read from vireod's API and a signal.
    unsafe { libc::kill(pid_x, libc::SIGKILL) };
    let start = Instant::now();
    loop {
        let v = src.vm("x");
        if v["state"] == "Running" && v["pid"] != pid_x {
            break;
        }
        assert!(start.elapsed() < T, "x was not restarted: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn migrate_requests_are_checked() {
    let d = Daemon::start(&["--no-autostart"]);
    d.define_counter("s", "Medium", "on-failure");
    // Unknown VM, stopped VM, both or neither destination, a bad URL.
    let (s, b) = d.api("PUT", "/api/v1/vms/nope/migrate", Some("{}"));
    assert_eq!(s, 404, "{b}");
    let url = json!({"destination_url": format!("unix:{}/vms/x.sock", d.run_dir.display())});
    let (s, b) = d.api("PUT", "/api/v1/vms/s/migrate", Some(&url.to_string()));
    assert_eq!(s, 409, "{b}");
    assert!(b.contains("Stopped"), "{b}");
    for body in [
        r#"{}"#,
        r#"{"destination_url":"unix:/x","destination_agent":"/y"}"#,
        r#"{"destination_url":"http://x"}"#,
        r#"{"destination_agent":"relative.sock"}"#,
        r#"{"destination_url":"unix:/x","bogus":1}"#,
        r#"{"destination_url":"unix:/x","connections":0}"#,
        r#"{"destination_url":"unix:/x","connections":17}"#,
    ] {
        let (s, b) = d.api("PUT", "/api/v1/vms/s/migrate", Some(body));
        assert_eq!(s, 400, "{body}: {b}");
    }
    let (s, b) = d.api("GET", "/api/v1/migrations/no-such-id", None);
    assert_eq!(s, 404, "{b}");
    // An incoming request for a name that exists is refused and changes nothing.
    let def = json!({"name": "s", "definition": {"config": common::counter_config()}});
    let (s, b) = d.api(
        "POST",
        "/api/v1/migrations/incoming",
        Some(&def.to_string()),
    );
    assert_eq!(s, 409, "{b}");
    assert_eq!(d.state("s"), "Stopped");
    assert!(d.migrations().is_empty());
}

/// A paused VM moves paused (as Hyper-V keeps a moved VM's state): the destination
/// vireod reports it Paused, its guest makes no progress there until resumed.
#[test]
fn a_paused_vm_migrates_and_stays_paused_until_resumed() {
    let (src, dst) = Daemon::pair(&["--no-autostart"], &["--no-autostart"]);
    src.define_counter("p", "Medium", "on-failure");
    src.ok("PUT", "/api/v1/vms/p/start", None);
    src.wait_serial("p", "tick 20 ", T);
    let paused = src.ok("PUT", "/api/v1/vms/p/pause", None);
    assert_eq!(paused["state"], "Paused", "{paused}");
    let rec = src.migrate("p", &json!({"destination_agent": dst.socket}));
    let done = src.wait_migration(rec["id"].as_str().unwrap(), T);
    assert_eq!(done["state"], "completed", "{done}\n{}", dst.log());
    assert!(src.absent("p"));
    let v = dst.wait_state("p", "Paused", T);
    assert_eq!(v["state"], "Paused", "{v}");
    // The destination's serial log holds what the guest printed there: nothing yet.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        dst.tick_numbers("p"),
        Vec::<u64>::new(),
        "the paused guest ran"
    );
    dst.ok("PUT", "/api/v1/vms/p/resume", None);
    dst.wait_state("p", "Running", T);
    let start = Instant::now();
    let ticks = loop {
        let t = dst.tick_numbers("p");
        if !t.is_empty() {
            break t;
        }
        assert!(start.elapsed() < T, "no tick after resume");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(ticks[0] > 20, "the guest started over: {ticks:?}");
    dst.wait_serial("p", &format!("tick {} ", ticks[0] + 5), T);
}

/// A TCP migration between two vireods of one host (`receiver_url: tcp:...`, in clear
/// with vireod's one-time secret) goes through the vireods' gateways: the destination
/// vireod listens on the port and the VMMs use sockets in their run directories only
/// (a vireo@ unit allows a VMM no IP socket); the VM arrives and counts on.
#[test]
fn a_same_host_tcp_migration_goes_through_the_vireods_and_arrives_counting() {
    let (src, dst) = Daemon::pair(&["--no-autostart"], &["--no-autostart"]);
    src.define_counter("t", "Medium", "on-failure");
    src.ok("PUT", "/api/v1/vms/t/start", None);
    src.wait_serial("t", "tick 10 ", T);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("tcp:127.0.0.1:{port}");
    let rec = src.migrate(
        "t",
        &json!({"destination_agent": dst.socket, "receiver_url": url}),
    );
    let done = src.wait_migration(rec["id"].as_str().unwrap(), T);
    assert_eq!(done["state"], "completed", "{done}\n{}", dst.log());
    assert_eq!(done["receiver_url"], url.as_str(), "{done}");
    assert!(
        dst.log()
            .contains("vireod receives in clear (insecure) for the VMM"),
        "{}",
        dst.log()
    );
    assert!(src.absent("t"));
    dst.wait_state("t", "Running", T);
    let start = Instant::now();
    let ticks = loop {
        let t = dst.tick_numbers("t");
        if !t.is_empty() {
            break t;
        }
        assert!(start.elapsed() < T, "no tick at the destination");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(ticks[0] > 10, "the guest started over: {ticks:?}");
    dst.wait_serial("t", &format!("tick {} ", ticks[0] + 5), T);
}

/// A raw disk of `size` bytes with a pattern at its start and its end.
fn patterned_disk(path: &std::path::Path, size: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let head: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    f.write_all_at(&head, 0).unwrap();
    f.write_all_at(&head, size - 4096).unwrap();
    std::fs::read(path).unwrap()
}

/// Shared-nothing between two vireods (issue 11, part 3): the source's vireod fills each
/// disk's size from its image, the destination's makes the copy in its storage_dir at
/// that size (before, the receiving VMM got no sizes and refused every shared-nothing
/// migration from a vireod). The copy holds the source's bytes, is exactly that size,
/// and the destination's definition names it.
#[test]
fn a_shared_nothing_migration_between_vireods_copies_each_disk_at_its_size() {
    let (src, dst) = Daemon::pair(&["--no-autostart"], &["--no-autostart"]);
    let disk = src.dir.path().join("s.raw");
    let bytes = patterned_disk(&disk, 2 << 20);
    let mut config = common::counter_config();
    config["disks"] = json!([{"path": disk, "format": "raw"}]);
    src.ok(
        "PUT",
        "/api/v1/vms/s",
        Some(&json!({"config": config, "priority": "Medium"}).to_string()),
    );
    src.ok("PUT", "/api/v1/vms/s/start", None);
    src.wait_serial("s", "tick 5 ", T);
    let copies = dst.dir.path().join("copies");
    std::fs::create_dir(&copies).unwrap();
    let rec = src.migrate(
        "s",
        &json!({"destination_agent": dst.socket, "copy_storage": true, "storage_dir": copies}),
    );
    let done = src.wait_migration(rec["id"].as_str().unwrap(), T);
    assert_eq!(done["state"], "completed", "{done}\n{}", dst.log());
    let v = dst.wait_state("s", "Running", T);
    let copy = copies.join("s.raw");
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), 2 << 20);
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        bytes,
        "the copy holds the disk"
    );
    let def = &v["definition"];
    let d0 = &def["config"]["disks"][0];
    assert_eq!(d0["path"], json!(copy), "{v}");
    assert_eq!(d0["size"], 2 << 20, "{def}");
}

/// The destination bounds a shared-nothing copy by its definition's size, not by what
/// the sender announces (issue 11, part 3): an incoming request without sizes is refused
/// up front (before, it was accepted and its receiver started); a sending VMM that
/// announces a 4 MiB disk where the definition says 1 MiB fails the migration naming
/// the size, and no copy is created or grown beyond 1 MiB.
#[test]
fn a_sender_announcing_a_disk_bigger_than_the_definition_is_refused_and_nothing_grows() {
    let dst = Daemon::start(&["--no-autostart"]);
    let copies = dst.dir.path().join("copies");
    std::fs::create_dir(&copies).unwrap();
    let secret = "ab".repeat(32);
    let incoming = |size: Option<u64>| {
        let mut disk = json!({"path": "/elsewhere/big.raw", "format": "raw"});
        if let Some(s) = size {
            disk["size"] = json!(s);
        }
        let mut config = common::counter_config();
        config["disks"] = json!([disk]);
        json!({
            "name": "big",
            "definition": {"config": config},
            "storage_dir": copies,
            "secret": secret,
        })
        .to_string()
    };
    let (s, b) = dst.api("POST", "/api/v1/migrations/incoming", Some(&incoming(None)));
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("needs the disk's size"), "{b}");
    assert!(dst.absent("big"));
    let rec = dst.ok(
        "POST",
        "/api/v1/migrations/incoming",
        Some(&incoming(Some(1 << 20))),
    );
    let url = rec["receiver_url"].as_str().unwrap().to_string();

    // The sender: a plain VMM with a 4 MiB disk of that name.
    let src_dir = tempfile::tempdir().unwrap();
    let big = src_dir.path().join("big.raw");
    patterned_disk(&big, 4 << 20);
    let api_sock = src_dir.path().join("src.sock");
    let vm = vireo_e2e::Vireo::guest(
        "test=counter period_ms=10",
        &[
            "--memory",
            "size=32M",
            "--disk",
            &format!("path={},format=raw", big.display()),
            "--api-socket",
            api_sock.to_str().unwrap(),
        ],
    )
    .spawn();
    vm.wait_serial("tick 2 ", T);
    let (s, b) = common::http(
        &api_sock,
        "PUT",
        "/api/v1/vm.send-migration",
        Some(&json!({"destination_url": url, "copy_storage": true, "secret": secret}).to_string()),
    );
    assert!(s == 204 || s == 200, "{s} {b}");
    let r = dst.wait_migration(rec["id"].as_str().unwrap(), T);
    assert_eq!(r["state"], "failed", "{r}");
    let err = r["error"].as_str().unwrap_or_default();
    assert!(err.contains("disks[0].size"), "{err}\n{}", dst.log());
    for f in std::fs::read_dir(&copies).unwrap() {
        let f = f.unwrap();
        assert!(
            f.metadata().unwrap().len() <= 1 << 20,
            "{:?} grew beyond the definition's size",
            f.path()
        );
    }
    assert!(dst.absent("big"));
    // The sender keeps its VM.
    let ticks = std::fs::read_to_string(&vm.serial).unwrap().len();
    let start = Instant::now();
    while std::fs::read_to_string(&vm.serial).unwrap().len() == ticks {
        assert!(start.elapsed() < T, "the sender's guest stopped");
        std::thread::sleep(Duration::from_millis(10));
    }
}
