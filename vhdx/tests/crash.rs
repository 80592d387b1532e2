//! Crash consistency: a fault-injecting storage that fails (and tears) the Nth
//! write and then loses an arbitrary subset of the writes not yet flushed, and
//! real SIGKILLs of a writer process. After reopening, qemu-img check passes
//! and every write followed by a completed flush reads back.

use crate::common;
use common::*;
use rand::Rng;
use std::io::{self, BufRead};
use std::path::Path;
use std::sync::{Arc, Mutex};
use vhdx::{CreateOptions, OpenOptions, Storage, Vhdx};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

enum Op {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

struct Inner {
    cur: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Op>,
    writes: usize,
    crash_at: usize,
    crashed: bool,
    tear: usize,
    /// File offset of every write call, in order.
    offsets: Vec<u64>,
}

/// In-memory file that models a disk cache: writes are visible at once but
/// durable only after sync; the `crash_at`th write is torn and fails, and
/// every later call fails.
struct Faulty(Mutex<Inner>);

fn apply(v: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write(o, d) => {
            let end = *o as usize + d.len();
            if v.len() < end {
                v.resize(end, 0);
            }
            v[*o as usize..end].copy_from_slice(d);
        }
        Op::SetLen(l) => v.resize(*l as usize, 0),
    }
}

impl Faulty {
    fn new(img: Vec<u8>, crash_at: usize, tear: usize) -> Faulty {
        Faulty(Mutex::new(Inner {
            cur: img.clone(),
            durable: img,
            pending: Vec::new(),
            writes: 0,
            crash_at,
            crashed: false,
            tear,
            offsets: Vec::new(),
        }))
    }
    /// What a disk could hold after the crash: the durable state plus a random
    /// subset of the writes issued since the last sync.
    fn crash_image(&self, r: &mut impl Rng, keep_all: bool) -> Vec<u8> {
        let g = self.0.lock().unwrap();
        let mut img = g.durable.clone();
        for op in &g.pending {
            if keep_all || r.gen_bool(0.5) {
                apply(&mut img, op);
            }
        }
        img
    }
    fn writes(&self) -> usize {
        self.0.lock().unwrap().writes
    }
    /// 1-based indices of the writes that went to a header.
    fn header_writes(&self) -> Vec<usize> {
        let g = self.0.lock().unwrap();
        g.offsets
            .iter()
            .enumerate()
            .filter(|(_, o)| HDR.contains(&(**o as usize)))
            .map(|(i, _)| i + 1)
            .collect()
    }
}

fn crashed() -> io::Error {
    io::Error::other("injected crash")
}

impl Storage for Faulty {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let g = self.0.lock().unwrap();
        if g.crashed {
            return Err(crashed());
        }
        let o = offset as usize;
        if o >= g.cur.len() {
            return Ok(0);
        }
        let n = buf.len().min(g.cur.len() - o);
        buf[..n].copy_from_slice(&g.cur[o..o + n]);
        Ok(n)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let mut g = self.0.lock().unwrap();
        if g.crashed {
            return Err(crashed());
        }
        g.writes += 1;
        g.offsets.push(offset);
        if g.writes == g.crash_at {
            g.crashed = true;
            // Torn: only a prefix (whole 512-byte sectors) reaches the cache.
            let keep = (g.tear % (buf.len() / 512 + 1)) * 512;
            let op = Op::Write(offset, buf[..keep.min(buf.len())].to_vec());
            apply(&mut g.cur, &op);
            g.pending.push(op);
            return Err(crashed());
        }
        let op = Op::Write(offset, buf.to_vec());
        apply(&mut g.cur, &op);
        g.pending.push(op);
        Ok(buf.len())
    }
    fn sync_data(&self) -> io::Result<()> {
        let mut g = self.0.lock().unwrap();
        if g.crashed {
            return Err(crashed());
        }
        let ops = std::mem::take(&mut g.pending);
        for op in &ops {
            apply(&mut g.durable, op);
        }
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut g = self.0.lock().unwrap();
        if g.crashed {
            return Err(crashed());
        }
        let op = Op::SetLen(len);
        apply(&mut g.cur, &op);
        g.pending.push(op);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.lock().unwrap().cur.len() as u64)
    }
}

struct Run {
    flushed: Vec<u8>,
    touched: Vec<bool>,
}

/// Runs the workload until the storage fails; returns the model as of the last
/// completed flush and the sectors written since.
fn workload(v: &Vhdx, seed: u64) -> Run {
    workload_with(v, seed, vec![0u8; SIZE as usize], 48, 6)
}

/// `writes` random writes over a disk whose content starts as `model`, a flush
/// after every `flush_every`th and at the end.
fn workload_with(
    v: &Vhdx,
    seed: u64,
    mut model: Vec<u8>,
    writes: usize,
    flush_every: usize,
) -> Run {
    let size = model.len() as u64;
    let mut r = rng(seed);
    let mut run = Run {
        flushed: model.clone(),
        touched: vec![false; (size / 512) as usize],
    };
    for i in 0..writes {
        let len = 512 * r.gen_range(1..64usize);
        let off = r.gen_range(0..(size - len as u64) / 512) * 512;
        let data = random_bytes(&mut r, len);
        for s in off / 512..(off + len as u64) / 512 {
            run.touched[s as usize] = true;
        }
        if v.write_at(&data, off).is_err() {
            return run;
        }
        model[off as usize..off as usize + len].copy_from_slice(&data);
        if i % flush_every == flush_every - 1 {
            if v.flush().is_err() {
                return run;
            }
            run.flushed.copy_from_slice(&model);
            run.touched.fill(false);
        }
    }
    if v.flush().is_ok() {
        run.flushed.copy_from_slice(&model);
        run.touched.fill(false);
    }
    run
}

fn verify(img: &Path, run: &Run, what: &str) {
    verify_with(img, run, what, true)
}

fn verify_with(img: &Path, run: &Run, what: &str, qemu: bool) {
    let v = Vhdx::open(img, OpenOptions::default())
        .unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
    let all = read_all(&v);
    v.close().unwrap();
    if qemu {
        qemu_check(img);
    }
    for (s, t) in run.touched.iter().enumerate() {
        if !t {
            let r = s * 512..(s + 1) * 512;
            assert!(
                all[r.clone()] == run.flushed[r],
                "{what}: flushed sector {s} lost"
            );
        }
    }
}

#[test]
fn injected_crash_at_every_write() {
    let d = tmp();
    let base = d.path().join("base.vhdx");
    Vhdx::create(
        &base,
        &CreateOptions {
            size: SIZE,
            block_size: Some(MIB as u32),
            ..Default::default()
        },
    )
    .unwrap()
    .close()
    .unwrap();
    let img0 = std::fs::read(&base).unwrap();
    // Dry run to count writes.
    let total = {
        let f = Arc::new(Faulty::new(img0.clone(), usize::MAX, 0));
        let v = Vhdx::open_storage(f.clone(), &base, OpenOptions::default()).unwrap();
        workload(&v, 1);
        v.close().unwrap();
        f.writes()
    };
    assert!(total > 50, "{total}");
    let mut r = rng(99);
    let target = d.path().join("crashed.vhdx");
    let step = (total / 60).max(1);
    let mut runs = 0;
    for crash_at in (1..=total).step_by(step) {
        let f = Arc::new(Faulty::new(img0.clone(), crash_at, r.gen()));
        let run = {
            let v = Vhdx::open_storage(f.clone(), &base, OpenOptions::default()).unwrap();
            workload(&v, 1)
        };
        for keep_all in [false, true] {
            std::fs::write(&target, f.crash_image(&mut r, keep_all)).unwrap();
            verify(
                &target,
                &run,
                &format!("crash at write {crash_at}/{total} keep_all={keep_all}"),
            );
            runs += 1;
        }
    }
    assert!(runs >= 40);
}

/// The writer process for the SIGKILL test (runs only when spawned by it).
#[test]
#[ignore]
fn sigkill_child_writer() {
    let Ok(path) = std::env::var("VHDX_CRASH_CHILD") else {
        return;
    };
    let v = Vhdx::open(Path::new(&path), OpenOptions::default()).unwrap();
    let slots = v.virtual_size() / 4096;
    let mut out = std::io::stdout();
    for i in 0..slots {
        let slot = (i * 7919) % slots;
        v.write_at(&pattern(i), slot * 4096).unwrap();
        if i % 8 == 7 {
            v.flush().unwrap();
            use std::io::Write;
            writeln!(out, "ACK {i}").unwrap();
            out.flush().unwrap();
        }
    }
}

fn pattern(i: u64) -> Vec<u8> {
    let mut p = vec![0u8; 4096];
    for (k, c) in p.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(i * 1_000_003 + k as u64).to_le_bytes());
    }
    p
}

#[test]
fn sigkill_writer_then_reopen() {
    let d = tmp();
    let mut r = rng(7);
    // VHDX_CRASH_RUNS=200 for a long run (`vhdx-bench --crash-runs N` does the same and more).
    let rounds: usize = std::env::var("VHDX_CRASH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    for round in 0..rounds {
        let p = d.path().join(format!("k{round}.vhdx"));
        Vhdx::create(
            &p,
            &CreateOptions {
                size: 64 * MIB,
                block_size: Some(MIB as u32),
                ..Default::default()
            },
        )
        .unwrap()
        .close()
        .unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "crash::sigkill_child_writer",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env("VHDX_CRASH_CHILD", &p)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let acked = Arc::new(Mutex::new(None::<u64>));
        let a2 = acked.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(n) = line
                    .strip_prefix("ACK ")
                    .and_then(|s| s.parse::<u64>().ok())
                {
                    *a2.lock().unwrap() = Some(n);
                }
            }
        });
        // Kill at a random moment once it has made some progress.
        let wait = r.gen_range(30..300);
        let t0 = std::time::Instant::now();
        while acked.lock().unwrap().is_none() && t0.elapsed().as_secs() < 20 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(std::time::Duration::from_millis(wait));
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        let last = acked
            .lock()
            .unwrap()
            .expect("writer never acknowledged a flush");
        // QEMU's replay of the same crashed image.
        let q = d.path().join(format!("q{round}.vhdx"));
        std::fs::copy(&p, &q).unwrap();
        let _ = run(
            "qemu-img",
            &["check", "-r", "all", "-f", "vhdx", q.to_str().unwrap()],
        );
        qemu_check(&q);
        let qemu_view = qemu_to_raw(&q, d.path());
        // Ours.
        let v = Vhdx::open(&p, OpenOptions::default()).unwrap();
        let ours = read_all(&v);
        v.close().unwrap();
        qemu_check(&p);
        let slots = 64 * MIB / 4096;
        for i in 0..=last {
            let o = (((i * 7919) % slots) * 4096) as usize;
            let want = pattern(i);
            assert!(
                ours[o..o + 4096] == want[..],
                "round {round}: acked write {i} (of {last}) lost by us"
            );
            assert!(
                qemu_view[o..o + 4096] == want[..],
                "round {round}: acked write {i} (of {last}) lost in qemu's replay"
            );
        }
    }
}

/// A differencing disk: the first partial write of a block allocates a sector
/// bitmap block whose 256 pages all go through the log, so the first flush
/// fills the log and starts a new log sequence in the middle of the flush.
/// (qemu does not open differencing VHDX images: the engine alone verifies.)
#[test]
fn injected_crash_differencing_with_log_restarts() {
    let d = tmp();
    let parent = d.path().join("parent.vhdx");
    let psize = 64 * MIB;
    let pv = Vhdx::create(
        &parent,
        &CreateOptions {
            size: psize,
            block_size: Some(MIB as u32),
            ..Default::default()
        },
    )
    .unwrap();
    let mut r = rng(5);
    let pdata = random_bytes(&mut r, psize as usize);
    pv.write_at(&pdata, 0).unwrap();
    pv.close().unwrap();
    let base = d.path().join("child.vhdx");
    Vhdx::create(
        &base,
        &CreateOptions {
            kind: vhdx::DiskKind::Differencing {
                parent: parent.clone(),
            },
            block_size: Some(MIB as u32),
            ..Default::default()
        },
    )
    .unwrap()
    .close()
    .unwrap();
    let img0 = std::fs::read(&base).unwrap();
    let (total, headers) = {
        let f = Arc::new(Faulty::new(img0.clone(), usize::MAX, 0));
        let v = Vhdx::open_storage(f.clone(), &base, OpenOptions::default()).unwrap();
        workload_with(&v, 3, pdata.clone(), 48, 6);
        v.close().unwrap();
        (f.writes(), f.header_writes())
    };
    // Session start, log start, at least one restart, close.
    assert!(headers.len() >= 4, "headers written at {headers:?}");
    let target = d.path().join("crashed.vhdx");
    let step = (total / 60).max(1);
    let mut runs = 0;
    for crash_at in (1..=total).step_by(step) {
        let f = Arc::new(Faulty::new(img0.clone(), crash_at, r.gen()));
        let run = {
            let v = Vhdx::open_storage(f.clone(), &base, OpenOptions::default()).unwrap();
            workload_with(&v, 3, pdata.clone(), 48, 6)
        };
        for keep_all in [false, true] {
            std::fs::write(&target, f.crash_image(&mut r, keep_all)).unwrap();
            verify_with(
                &target,
                &run,
                &format!("differencing: crash at write {crash_at}/{total} keep_all={keep_all}"),
                false,
            );
            runs += 1;
        }
    }
    assert!(runs >= 40);
}

/// Writes of its own block each, a flush after each: every flush logs a BAT
/// page, the log fills after 128 entries and a new sequence (new log GUID)
/// starts. Returns the writes issued and how many were covered by a completed flush.
fn lap_workload(v: &Vhdx) -> (Vec<(u64, Vec<u8>)>, usize) {
    let blocks = v.virtual_size() / MIB;
    let mut writes = Vec::new();
    let mut flushed = 0;
    for i in 0..blocks {
        let off = i * MIB + (i % 5) * 4096;
        let data: Vec<u8> = (0..4096u64).map(|k| (i * 31 + k * 7 + 1) as u8).collect();
        writes.push((off, data));
        let (o, d) = writes.last().unwrap();
        if v.write_at(d, *o).is_err() || v.flush().is_err() {
            return (writes, flushed);
        }
        flushed = writes.len();
    }
    (writes, flushed)
}

/// Every flushed write reads back, nothing else is there (bytes of the write
/// in flight at the crash may be old or new).
fn check_lap_view(view: &[u8], writes: &[(u64, Vec<u8>)], flushed: usize, what: &str) {
    let mut want = vec![0u8; view.len()];
    for (i, (o, d)) in writes.iter().enumerate() {
        let r = *o as usize..*o as usize + d.len();
        if i < flushed {
            want[r].copy_from_slice(d);
        } else {
            want[r.clone()].copy_from_slice(&view[r]);
        }
    }
    assert_same(view, &want, what);
}

/// Crashes around the start of a new log sequence, replayed by qemu (on a
/// copy) and by the engine.
#[test]
fn injected_crash_across_log_sequences() {
    let d = tmp();
    let base = d.path().join("laps.vhdx");
    Vhdx::create(
        &base,
        &CreateOptions {
            size: 132 * MIB,
            block_size: Some(MIB as u32),
            ..Default::default()
        },
    )
    .unwrap()
    .close()
    .unwrap();
    let img0 = std::fs::read(&base).unwrap();
    let (total, headers) = {
        let f = Arc::new(Faulty::new(img0.clone(), usize::MAX, 0));
        let v = Vhdx::open_storage(f.clone(), &base, OpenOptions::default()).unwrap();
        let (w, n) = lap_workload(&v);
        assert_eq!(n, w.len());
        v.close().unwrap();
        (f.writes(), f.header_writes())
    };
    // Header writes well inside the run are new log sequences.
    let restarts: Vec<usize> = headers
        .iter()
        .copied()
        .filter(|&h| h > total / 4 && h < total - 8)
        .collect();
    assert!(
        !restarts.is_empty(),
        "no new log sequence: headers at {headers:?} of {total}"
    );
    let mut points: Vec<usize> = restarts
        .iter()
        .flat_map(|&h| h.saturating_sub(3)..=h + 3)
        .collect();
    points.extend((1..=total).step_by((total / 10).max(1)));
    points.sort();
    points.dedup();
    let mut r = rng(11);
    let target = d.path().join("crashed-laps.vhdx");
    let copy = d.path().join("crashed-laps-qemu.vhdx");
    for crash_at in points {
        let f = Arc::new(Faulty::new(img0.clone(), crash_at, r.gen()));
        let (writes, flushed) = {
            let v = Vhdx::open_storage(f.clone(), &base, OpenOptions::default()).unwrap();
            lap_workload(&v)
        };
        let what = format!("crash at write {crash_at}/{total} (new sequences at {restarts:?})");
        std::fs::write(&target, f.crash_image(&mut r, false)).unwrap();
        // qemu's replay of a copy.
        std::fs::copy(&target, &copy).unwrap();
        let _ = run(
            "qemu-img",
            &["check", "-r", "all", "-f", "vhdx", copy.to_str().unwrap()],
        );
        qemu_check(&copy);
        check_lap_view(
            &qemu_to_raw(&copy, d.path()),
            &writes,
            flushed,
            &format!("qemu: {what}"),
        );
        // Ours.
        let v = Vhdx::open(&target, OpenOptions::default())
            .unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
        let ours = read_all(&v);
        v.close().unwrap();
        qemu_check(&target);
        check_lap_view(&ours, &writes, flushed, &format!("engine: {what}"));
    }
}
