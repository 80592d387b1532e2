//! `--only cluster-scale`: the failover cluster's control plane at scale (issue 13's
//! figure). A real 3-member etcd (Debian's etcd 3.4, in clear on loopback, data in
//! tmpfs) and `--cluster-nodes` node agents in this process
//! (`vireo_e2e::cluster_fleet`): each runs the real `NodeAgent` and failover
//! `Controller` on vireod's cadence, with its own etcd connections; the VMs are
//! stand-ins (marked running when the reconcile says so, no VMM), so this measures the
//! control plane only.
//!
//! 1. Definition: `--cluster-vms` VMs of a mixed priority and size
//!    (`cluster_fleet::mix`) defined through `define_vm` (16 at once), then the time
//!    until the controllers placed every one and its node runs it.
//! 2. Listing, `--cluster-lists` times while the fleet runs: the list of every node
//!    and VM as `vireoctl cluster status` gets it from a vireod (`GET
//!    /api/v1/cluster`): from the vireod's inventory view (`cluster::inventory`, kept
//!    by a watch since the bench started) serialized to JSON, linearizable (the view
//!    first reaches etcd's current revision: one count-only read) and as the view
//!    stands; beside it the old way, `Snapshot::read` (four full prefix reads), and
//!    those reads without decoding: min/p50/p99/max. The measured vireod (its view,
//!    its list) runs on a runtime of its own, as a vireod process would. The
//!    linearizable list is timed again during the drains (every 100 ms), when the
//!    cluster changes.
//! 3. Failover, `--cluster-rounds` rounds, a different victim each: the victim's loop,
//!    renewals and VMs stop at once (a crash); from then until every one of its
//!    High VMs, then every auto-start VM, runs on another node; and from its lease's
//!    expiry (its node key's deletion, seen by a watch) to all placed.
//! 4. Drain, `--cluster-rounds` rounds: `cluster::drain` of one node (concurrency 2,
//!    vireoctl's default) until it is paused and runs nothing, every VM running
//!    elsewhere; the stand-in "migrates" a VM at once. Then the node is resumed.
//! 5. etcd's size (`endpoint status`' dbSize) and key count after definition and after
//!    the rounds.
//!
//! Each phase prints the counters that explain it: etcd transactions (and those whose
//! comparisons failed), prefix reads with the keys and MiB they returned, controller
//! passes with the decisions applied and lost to another controller.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::failover::{define_vm, Snapshot};
use cluster::inventory::{self, View};
use cluster::keys::{self, NodeState, OwnerRecord, Priority, Unowned};
use cluster::store::WatchEvent;
use cluster::{ClusterStore, EtcdSecurity, EtcdStore};
use vireo_e2e::cluster_fleet::counted::{Counted, Counters, Counts};
use vireo_e2e::cluster_fleet::{mix, Fleet, Stats};
use vireo_e2e::etcd::EtcdCluster;

pub struct Options {
    pub nodes: usize,
    pub vms: usize,
    pub rounds: usize,
    pub lists: usize,
}

const DEFINE_AT_ONCE: usize = 16;
const DRAIN_CONCURRENCY: u32 = cluster::drain::DEFAULT_CONCURRENCY;
const PHASE_LIMIT: Duration = Duration::from_secs(600);
const DRAIN_LIMIT: Duration = Duration::from_secs(180);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// (min, median, max).
fn mmm(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i.min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or(f64::NAN)
}

/// The fleet's controller and executor counters at one moment.
#[derive(Clone, Copy, Default)]
struct Loop {
    passes: u64,
    applied: u64,
    lost: u64,
    pass_errors: u64,
    fences: u64,
    moves: u64,
    slow_turns: u64,
}

fn loop_now(s: &Stats) -> Loop {
    Loop {
        passes: Stats::get(&s.passes),
        applied: Stats::get(&s.applied),
        lost: Stats::get(&s.lost),
        pass_errors: Stats::get(&s.pass_errors),
        fences: Stats::get(&s.fences),
        moves: Stats::get(&s.moves),
        slow_turns: Stats::get(&s.slow_turns),
    }
}

/// What happened in the fleet between two moments.
struct Delta {
    store: Counts,
    passes: u64,
    applied: u64,
    lost: u64,
    pass_errors: u64,
    fences: u64,
    moves: u64,
    slow_turns: u64,
}

struct Mark {
    store: Counts,
    l: Loop,
}

fn mark(f: &Fleet) -> Mark {
    Mark {
        store: f.counters.now(),
        l: loop_now(&f.stats),
    }
}

fn since(f: &Fleet, m: &Mark) -> Delta {
    let l = loop_now(&f.stats);
    Delta {
        store: f.counters.now() - m.store,
        passes: l.passes - m.l.passes,
        applied: l.applied - m.l.applied,
        lost: l.lost - m.l.lost,
        pass_errors: l.pass_errors - m.l.pass_errors,
        fences: l.fences - m.l.fences,
        moves: l.moves - m.l.moves,
        slow_turns: l.slow_turns - m.l.slow_turns,
    }
}

impl Delta {
    fn line(&self) -> String {
        format!(
            "txns {} (failed {}), revision checks {}, watches opened {}, prefix reads {} ({} keys, {:.0} MiB), controller passes {} (applied {}, lost {}, errors {}), fence stops {}, slow turns {}",
            self.store.txns,
            self.store.txns_failed,
            self.store.revisions,
            self.store.watches,
            self.store.ranges,
            self.store.range_keys,
            mib(self.store.range_bytes),
            self.passes,
            self.applied,
            self.lost,
            self.pass_errors,
            self.fences,
            self.slow_turns
        )
    }
}

/// Waits (polling every `every`) until `done` or the phase limit; the time it took.
async fn until(every: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < PHASE_LIMIT {
        if done() {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(every).await;
    }
    None
}

/// Every VM of `vms` runs on exactly one live node.
fn all_placed(f: &Fleet, vms: usize) -> bool {
    let p = f.placement();
    p.len() == vms && p.values().all(|n| n.len() == 1)
}

fn etcd_size(etcd: &EtcdCluster) -> String {
    let st = etcd.status();
    let sizes: Vec<String> = st
        .iter()
        .map(|s| format!("{:.1}", mib(s["dbSize"].as_u64().unwrap_or(0))))
        .collect();
    let in_use: Vec<String> = st
        .iter()
        .map(|s| format!("{:.1}", mib(s["dbSizeInUse"].as_u64().unwrap_or(0))))
        .collect();
    let rev = st
        .first()
        .and_then(|s| s["header"]["revision"].as_u64())
        .unwrap_or(0);
    format!(
        "db size per member {} MiB (in use {} MiB), {} keys under vireo/ ({} events), revision {rev}",
        sizes.join(" / "),
        in_use.join(" / "),
        etcd.key_count("vireo/"),
        etcd.key_count(keys::EVENTS),
    )
}

pub fn table(o: &Options) {
    let etcd = EtcdCluster::start(3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // The vireod whose lists are timed runs on a runtime of its own (one worker), as
    // a vireod process would: its view and its list handler do not wait for a worker
    // behind the 64 node agents' loops (they still share the machine's 2 cores).
    let vireod = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("vireod")
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(o, &etcd, vireod.handle().clone()));
    rt.shutdown_background();
    vireod.shutdown_background();
}

struct Round {
    victim: String,
    vms: usize,
    high: usize,
    /// No Auto Start VMs marked off, of those the victim ran.
    off: (usize, usize),
    high_ms: f64,
    all_ms: f64,
    expiry_ms: f64,
    from_expiry_ms: f64,
    delta: Delta,
}

async fn run(o: &Options, etcd: &EtcdCluster, vireod: tokio::runtime::Handle) {
    let eps = etcd.endpoints();
    let observer = EtcdStore::connect(&eps, &EtcdSecurity::Insecure)
        .await
        .expect("connect to etcd");
    // One vireod's inventory view, from the start (as a vireod has it), on a
    // connection of its own whose calls are counted apart from the fleet's.
    let view_counters = Arc::new(Counters::default());
    let (view, view_store) = {
        let (eps, counters) = (eps.clone(), view_counters.clone());
        // Connected and started on the vireod's runtime: its tasks run there.
        vireod
            .spawn(async move {
                let store = Counted {
                    inner: EtcdStore::connect(&eps, &EtcdSecurity::Insecure)
                        .await
                        .expect("connect to etcd"),
                    counters,
                };
                (View::start(store.clone()), store)
            })
            .await
            .expect("the vireod runtime")
    };
    let capacity = mix::node_capacity(o.nodes, o.vms);
    println!(
        "### Cluster control plane at scale: {} nodes, {} VMs, real etcd (3 members)\n",
        o.nodes, o.vms
    );
    println!("etcd 3.4 (Debian), 3 members on loopback in clear, data in tmpfs; node agents in this process, each with its own etcd connections, running vireod's loop (turn 100 ms; failover controller passes every 200 ms on the first {} live nodes by name; lease TTL 2 s renewed every 500 ms on a lease runtime); stand-in VMs (no VMM): this measures the control plane only. Node capacity {} GiB / {} vCPUs; VMs 10% High, 40% Medium, 40% Low, 10% No Auto Start, 1–8 GiB.\n", cluster::failover::CONTROLLERS, capacity.memory_mib >> 10, capacity.vcpus);
    let t = Instant::now();
    let mut fleet = Fleet::start(eps.clone(), o.nodes, capacity)
        .await
        .expect("start the node agents");
    loop {
        let (nodes, _) = observer.get_prefix(keys::NODES).await.expect("nodes");
        if nodes.len() == o.nodes {
            break;
        }
        assert!(t.elapsed() < PHASE_LIMIT, "nodes did not join");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("{} nodes joined in {:.0} ms\n", o.nodes, ms(t.elapsed()));

    // 1. Definition.
    let m = mark(&fleet);
    let t = Instant::now();
    let next = Arc::new(Mutex::new(0usize));
    let definer = fleet.connect().await.expect("connect to etcd");
    let retries = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut definers = tokio::task::JoinSet::new();
    for _ in 0..DEFINE_AT_ONCE {
        let (store, next, n) = (definer.clone(), next.clone(), o.vms);
        let retries = retries.clone();
        definers.spawn(async move {
            loop {
                let i = {
                    let mut g = next.lock().unwrap_or_else(|e| e.into_inner());
                    *g += 1;
                    *g - 1
                };
                if i >= n {
                    return;
                }
                // As an operator's client would: again after a timeout (define_vm
                // is idempotent), counted.
                let mut tries = 0;
                while let Err(e) = define_vm(&store, &mix::vm(i), true).await {
                    tries += 1;
                    assert!(tries < 20, "define a VM: {e}");
                    retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
    }
    while definers.join_next().await.is_some() {}
    let defined = t.elapsed();
    let mut said = Instant::now();
    let placed = until(Duration::from_millis(20), || {
        if said.elapsed() > Duration::from_secs(10) {
            said = Instant::now();
            eprintln!(
                "placement: {} of {} VMs run after {:.0} s",
                fleet.placement().len(),
                o.vms,
                t.elapsed().as_secs_f64()
            );
        }
        all_placed(&fleet, o.vms)
    })
    .await;
    let def_bytes: usize = (0..o.vms.min(100))
        .map(|i| keys::encode(&mix::vm(i)).len())
        .sum::<usize>()
        / o.vms.min(100);
    println!("| phase | time (ms) |\n|---|---|");
    println!(
        "| define {} VMs ({DEFINE_AT_ONCE} at once; ~{def_bytes} bytes each; {} retried after a timeout) | {:.0} |",
        o.vms,
        retries.load(std::sync::atomic::Ordering::Relaxed),
        ms(defined)
    );
    match placed {
        Some(p) => println!("| … then until every VM runs on one node | {:.0} |", ms(p)),
        None => println!("| … then until every VM runs on one node | not within {PHASE_LIMIT:?} |"),
    }
    println!(
        "\nCounters (definition and placement): {}\n",
        since(&fleet, &m).line()
    );
    println!("etcd after definition: {}\n", etcd_size(etcd));

    // 2. Listing.
    let lv = ListView {
        view,
        store: view_store,
        counters: view_counters,
        rt: vireod,
    };
    list(o, &observer, &fleet, &lv).await;

    // 3. Failover.
    let gone = Arc::new(Mutex::new(HashMap::<String, Instant>::new()));
    let mut watch = observer
        .watch_prefix(keys::NODES, 0)
        .await
        .expect("watch nodes");
    let seen = gone.clone();
    tokio::spawn(async move {
        while let Some(ev) = watch.next().await {
            if let WatchEvent::Delete { key, .. } = ev {
                if let Some(n) = keys::name_of(keys::NODES, &key) {
                    seen.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(n.to_string(), Instant::now());
                }
            }
        }
    });
    let defs: BTreeMap<String, Priority> = (0..o.vms)
        .map(|i| {
            let d = mix::vm(i);
            (d.name, d.priority)
        })
        .collect();
    let mut rounds = Vec::new();
    for r in 0..o.rounds {
        let victim = (r * 7 + 3) % o.nodes;
        match failover_round(&mut fleet, victim, &defs, &gone, &observer).await {
            Some(round) => rounds.push(round),
            None => println!("failover round {r}: not done within {PHASE_LIMIT:?}"),
        }
        fleet.restart(victim).await.expect("restart the victim");
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    print_failover(&rounds);

    // 4. Drain.
    drains(o, &mut fleet, &observer, &lv).await;

    println!("etcd after the rounds: {}\n", etcd_size(etcd));
    let twice = fleet.placement().values().filter(|n| n.len() > 1).count();
    println!("VMs running on more than one node at the end: {twice}\n");
}

/// The vireod whose lists the bench times: its inventory view, its connection and
/// its runtime.
struct ListView {
    view: View,
    store: Counted<EtcdStore>,
    counters: Arc<Counters>,
    rt: tokio::runtime::Handle,
}

/// How long a linearizable list waits for the view (vireod's `LIST_WAIT`).
const LIST_WAIT: Duration = Duration::from_secs(1);

/// The list's JSON from `view` as it stands (what `GET /api/v1/cluster?stale=true`
/// sends): its length.
fn json_of(view: &View) -> usize {
    view.with(|inv| {
        serde_json::to_vec(&inventory::list(&inv.snapshot, inv.revision))
            .map(|b| b.len())
            .unwrap_or(0)
    })
    .expect("the view has read the cluster")
}

impl ListView {
    /// The list as it stands, timed on the vireod's runtime: (ms, JSON length).
    async fn as_is(&self) -> (f64, usize) {
        let view = self.view.clone();
        self.rt
            .spawn(async move {
                let t = Instant::now();
                let len = json_of(&view);
                (ms(t.elapsed()), len)
            })
            .await
            .expect("the vireod runtime")
    }

    /// The linearizable list (`GET /api/v1/cluster`), timed on the vireod's runtime:
    /// the view at etcd's current revision, then the JSON. Returns the time and the
    /// JSON's length and whether the view had to wait; `None` when it did not reach
    /// the revision within vireod's wait (vireod would then read etcd itself:
    /// counted, the time kept).
    async fn linearizable(&self) -> (f64, Option<(usize, bool)>) {
        let (view, store) = (self.view.clone(), self.store.clone());
        self.rt
            .spawn(async move {
                let t = Instant::now();
                let before = view.revision();
                let r = match view.catch_up(&store, LIST_WAIT).await {
                    Ok(at) => Some((json_of(&view), before.is_some_and(|b| b < at))),
                    Err(e) => {
                        eprintln!("linearizable list: {e}");
                        None
                    }
                };
                (ms(t.elapsed()), r)
            })
            .await
            .expect("the vireod runtime")
    }
}

/// min, p50, p99, max of `v` as a table row.
fn row(what: &str, v: &[f64]) -> String {
    format!(
        "| {what} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
        v.len(),
        pct(v, 0.0),
        pct(v, 0.5),
        pct(v, 0.99),
        pct(v, 1.0)
    )
}

async fn list(o: &Options, observer: &EtcdStore, fleet: &Fleet, lv: &ListView) {
    lv.view
        .catch_up(&lv.store, Duration::from_secs(30))
        .await
        .expect("the view reaches etcd's revision");
    let m = mark(fleet);
    let view_before = lv.counters.now();
    let stats_before = lv.view.stats();
    let mut lin = Vec::with_capacity(o.lists);
    let mut stale = Vec::with_capacity(o.lists);
    let mut lat = Vec::with_capacity(o.lists);
    let mut raw = Vec::with_capacity(o.lists);
    let mut vms = 0;
    let mut json = 0;
    let mut waited = 0;
    let mut behind = 0;
    for _ in 0..o.lists {
        let (took, r) = lv.linearizable().await;
        match r {
            Some((len, w)) => {
                json = len;
                waited += usize::from(w);
            }
            None => behind += 1,
        }
        lin.push(took);
        stale.push(lv.as_is().await.0);
        let t = Instant::now();
        let snap = Snapshot::read(observer).await.expect("read every VM");
        lat.push(ms(t.elapsed()));
        vms = snap.vms.len();
        // The same records without decoding them: etcd's part.
        let t = Instant::now();
        for prefix in [keys::NODES, keys::VMS, keys::OWNERS, keys::ADMIN] {
            observer.get_prefix(prefix).await.expect("read a prefix");
        }
        raw.push(ms(t.elapsed()));
    }
    let view_calls = lv.counters.now() - view_before;
    let stats = lv.view.stats();
    let (kvs, _) = observer.get_prefix(keys::VMS).await.expect("vms");
    let bytes: usize = kvs.iter().map(|kv| kv.value.len() + kv.key.len()).sum();
    println!(
        "List of every node and VM, {} times each while the fleet runs ({vms} VMs; {:.2} MiB of VM records in etcd; the list's JSON {:.2} MiB). From a vireod's inventory view: linearizable (`GET /api/v1/cluster`: one count-only read of etcd's revision; the view waited for it {waited} times, and {behind} times did not reach it within 1 s) and as the view stands (`?stale=true`), both serialized to JSON; the old way, `Snapshot::read` (four full prefix reads, records decoded), and those reads without decoding:\n",
        o.lists,
        mib(bytes as u64),
        mib(json as u64)
    );
    println!("| list | n | min (ms) | p50 (ms) | p99 (ms) | max (ms) |\n|---|---|---|---|---|---|");
    println!("{}", row("view, linearizable", &lin));
    println!("{}", row("view, as it stands", &stale));
    println!("{}", row("`Snapshot::read` (old)", &lat));
    println!("{}", row("four prefix reads only", &raw));
    println!(
        "\nThe view's own etcd calls meanwhile: revision checks {}, prefix reads {} ({} keys), watches opened {}; reads of the whole inventory {} (since the bench started: {}), watch batches applied {}.\n",
        view_calls.revisions,
        view_calls.ranges,
        view_calls.range_keys,
        view_calls.watches,
        stats.lists - stats_before.lists,
        stats.lists,
        stats.batches - stats_before.batches,
    );
    println!(
        "Counters meanwhile (the fleet's own load): {}\n",
        since(fleet, &m).line()
    );
}

async fn failover_round(
    fleet: &mut Fleet,
    victim: usize,
    defs: &BTreeMap<String, Priority>,
    gone: &Mutex<HashMap<String, Instant>>,
    observer: &EtcdStore,
) -> Option<Round> {
    let name = Fleet::name(victim);
    let on: Vec<String> = fleet.running_on(victim);
    let prio = |vm: &String| defs.get(vm).copied().unwrap_or(Priority::Low);
    let auto: Vec<String> = on
        .iter()
        .filter(|v| prio(v) != Priority::NoAutoStart)
        .cloned()
        .collect();
    let high: Vec<String> = on
        .iter()
        .filter(|v| prio(v) == Priority::High)
        .cloned()
        .collect();
    let off: Vec<String> = on
        .iter()
        .filter(|v| prio(v) == Priority::NoAutoStart)
        .cloned()
        .collect();
    let m = mark(fleet);
    let t0 = Instant::now();
    fleet.kill(victim);
    let elsewhere = |f: &Fleet, vms: &[String]| {
        let p = f.placement();
        vms.iter().all(|v| p.get(v).is_some_and(|n| n.len() == 1))
    };
    let mut high_at = None;
    let all_at = loop {
        let p_high = elsewhere(fleet, &high);
        if p_high && high_at.is_none() {
            high_at = Some(t0.elapsed());
        }
        if p_high && elsewhere(fleet, &auto) {
            break t0.elapsed();
        }
        if t0.elapsed() > PHASE_LIMIT {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let delta = since(fleet, &m);
    let expiry = gone
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&name)
        .map(|at| at.saturating_duration_since(t0));
    // No Auto Start VMs of the victim stay off (the controller writes them last).
    let mut stayed_off = 0;
    let t_off = Instant::now();
    while t_off.elapsed() < Duration::from_secs(10) {
        stayed_off = 0;
        for vm in &off {
            let kv = observer.get(&keys::owner_key(vm)).await.ok().flatten();
            let o = kv.and_then(|kv| keys::decode::<OwnerRecord>(&kv.value));
            if o == Some(OwnerRecord::Unowned(Unowned::Off)) {
                stayed_off += 1;
            }
        }
        if stayed_off == off.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expiry_ms = expiry.map_or(f64::NAN, ms);
    Some(Round {
        victim: name,
        vms: auto.len(),
        high: high.len(),
        off: (stayed_off, off.len()),
        high_ms: ms(high_at.unwrap_or(all_at)),
        all_ms: ms(all_at),
        expiry_ms,
        from_expiry_ms: ms(all_at) - expiry_ms,
        delta,
    })
}

fn print_failover(rounds: &[Round]) {
    println!(
        "Failover of one node (a crash: its loop, renewals and VMs stop at once), per round:\n"
    );
    println!("| victim | auto-start VMs | of them High | No Auto Start left off | kill → lease gone (ms) | kill → High running (ms) | kill → all running (ms) | lease gone → all running (ms) |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in rounds {
        println!(
            "| {} | {} | {} | {} of {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            r.victim,
            r.vms,
            r.high,
            r.off.0,
            r.off.1,
            r.expiry_ms,
            r.high_ms,
            r.all_ms,
            r.from_expiry_ms
        );
    }
    let col = |f: fn(&Round) -> f64| mmm(&rounds.iter().map(f).collect::<Vec<_>>());
    let row =
        |what: &str, (a, b, c): (f64, f64, f64)| println!("| {what} | {a:.0} | {b:.0} | {c:.0} |");
    println!("\n| failover (ms) | min | median | max |\n|---|---|---|---|");
    row("kill → lease gone", col(|r| r.expiry_ms));
    row("kill → High running elsewhere", col(|r| r.high_ms));
    row("kill → all auto-start running elsewhere", col(|r| r.all_ms));
    row("lease gone → all running", col(|r| r.from_expiry_ms));
    println!("\nCounters per round (kill → all running):\n");
    for r in rounds {
        println!("- {}: {}", r.victim, r.delta.line());
    }
    println!();
}

async fn drains(o: &Options, fleet: &mut Fleet, observer: &EtcdStore, lv: &ListView) {
    println!("Drain of one node (`cluster::drain`, concurrency {DRAIN_CONCURRENCY}; the stand-in migrates at once; vireod's executor period 200 ms), per round:\n");
    println!("| node | VMs moved | drain call (ms) | drain → paused and empty (ms) | moves | txns (failed) | prefix reads (keys) |");
    println!("|---|---|---|---|---|---|---|");
    let mut times = Vec::new();
    let mut lists = Vec::new();
    let mut behind = 0;
    for r in 0..o.rounds {
        let i = (r * 11 + 5) % o.nodes;
        let name = Fleet::name(i);
        let on = fleet.running_on(i);
        let m = mark(fleet);
        let t0 = Instant::now();
        let plan = match cluster::drain::drain(observer, &name, false, DRAIN_CONCURRENCY).await {
            Ok(p) => p,
            Err(e) => {
                println!("| {name} | {} | drain refused: {e} | | | | |", on.len());
                continue;
            }
        };
        let called = t0.elapsed();
        let mut done = None;
        let mut next_list = Instant::now();
        while t0.elapsed() < DRAIN_LIMIT {
            if next_list.elapsed() >= Duration::from_millis(100) {
                next_list = Instant::now();
                let (took, r) = lv.linearizable().await;
                if r.is_none() {
                    behind += 1;
                }
                lists.push(took);
            }
            let (a, _) = cluster::admin::read(observer, &name)
                .await
                .unwrap_or_default();
            let p = fleet.placement();
            let moved = on
                .iter()
                .all(|v| p.get(v).is_some_and(|n| n.len() == 1 && n[0] != name));
            if a.state == NodeState::Paused && fleet.running_on(i).is_empty() && moved {
                done = Some(t0.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let d = since(fleet, &m);
        match done {
            Some(t) => {
                times.push(ms(t));
                println!(
                    "| {name} | {} | {:.0} | {:.0} | {} | {} ({}) | {} ({}) |",
                    plan.moves.len(),
                    ms(called),
                    ms(t),
                    d.moves,
                    d.store.txns,
                    d.store.txns_failed,
                    d.store.ranges,
                    d.store.range_keys
                );
            }
            None => println!(
                "| {name} | {} | {:.0} | not within {DRAIN_LIMIT:?} | | | |",
                plan.moves.len(),
                ms(called)
            ),
        }
        cluster::drain::resume(observer, &name, false, DRAIN_CONCURRENCY)
            .await
            .expect("resume the drained node");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (a, b, c) = mmm(&times);
    println!("\nDrain → paused and empty: min {a:.0} ms, median {b:.0} ms, max {c:.0} ms.\n");
    println!("Linearizable lists from the view during the drains (every 100 ms; {behind} did not reach etcd's revision within 1 s):\n");
    println!("| list | n | min (ms) | p50 (ms) | p99 (ms) | max (ms) |\n|---|---|---|---|---|---|");
    println!("{}\n", row("view, linearizable, during drains", &lists));
}
