//! Many vCPUs: the test guest starts every application processor the standard way
//! (INIT-SIPI-SIPI through a real-mode trampoline), checks each one's APIC ID and CPUID
//! topology, and runs work on each at CPL3. Then the same with every vCPU busy across
//! pause/resume, a snapshot restored in a fresh VMM, and a live migration.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use vireo_e2e::mobility::{migrate_to_new_vmm, restore};
use vireo_e2e::{
    api, assert_guest_ok, guest, have_qemu, serial_line, wait_for_socket, wait_with_timeout,
    Running, Vireo,
};

const T: Duration = Duration::from_secs(90);

/// The per-CPU result lines (`smp cpu apic=N result=X ok`), sorted.
fn cpu_lines(serial: &str) -> Vec<String> {
    let mut v: Vec<String> = serial
        .lines()
        .filter(|l| l.starts_with("smp cpu apic="))
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

#[test]
fn guests_of_24_to_64_vcpus_bring_up_every_ap_and_see_their_topology() {
    for (cpus, topology, want) in [
        ("boot=32", None, "sockets=1 cores=32 threads=1"),
        // Above ~32 vCPUs, APs were lost when the boot CPU ran before the others existed.
        ("boot=64", None, "sockets=1 cores=64 threads=1"),
        ("boot=32", Some("2:8:2"), "sockets=2 cores=8 threads=2"),
        // Counts that are not powers of two leave gaps between APIC IDs.
        ("boot=24", Some("2:3:4"), "sockets=2 cores=3 threads=4"),
    ] {
        let arg = match topology {
            Some(t) => format!("{cpus},topology={t}"),
            None => cpus.to_string(),
        };
        let (out, serial) = Vireo::guest(
            "test=smp rounds=200000",
            &["--cpus", &arg, "--memory", "size=512M"],
        )
        .run(T);
        assert_guest_ok(&out, &serial);
        let n: usize = cpus.trim_start_matches("boot=").parse().unwrap();
        assert!(
            serial_line(&serial, "smp online")
                .starts_with(&format!("smp online cpus={n} aps={}", n - 1)),
            "{serial}"
        );
        assert_eq!(
            serial_line(&serial, "smp topology"),
            format!("smp topology {want}")
        );
        assert_eq!(cpu_lines(&serial).len(), n - 1, "{serial}");
    }
}

/// QEMU, the reference, runs the same guest with the same topology: the same APs come up
/// with the same APIC IDs and compute the same results.
#[test]
fn qemu_and_vireo_start_the_same_aps_with_the_same_results() {
    if !have_qemu() {
        panic!("qemu-system-x86_64 is required (scripts/setup installs it)");
    }
    let cmdline = "test=smp rounds=200000";
    let q = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,pcie=on",
            "-accel",
            "kvm",
            "-cpu",
            "host,-arch-capabilities",
        ])
        .args(["-m", "512", "-smp", "32,sockets=2,cores=8,threads=2"])
        .args(["-display", "none", "-no-reboot", "-serial", "stdio"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .arg("-kernel")
        .arg(guest())
        .args(["-append", cmdline])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run qemu-system-x86_64");
    let q = wait_with_timeout(q, T);
    let theirs = String::from_utf8_lossy(&q.stdout).to_string();
    assert_eq!(q.status.code(), Some(1), "QEMU: {theirs}");
    let (out, ours) = Vireo::guest(
        cmdline,
        &["--cpus", "boot=32,topology=2:8:2", "--memory", "size=512M"],
    )
    .run(T);
    assert_guest_ok(&out, &ours);
    assert_eq!(
        serial_line(&ours, "smp topology"),
        serial_line(&theirs, "smp topology")
    );
    assert_eq!(cpu_lines(&ours).len(), 31);
    assert_eq!(cpu_lines(&ours), cpu_lines(&theirs));
}

const BUSY: &str = "test=smp work=spin report_ms=100";
const CPUS: &str = "boot=32,topology=2:8:2";
const EVERY_AP: &str = "advanced=31 of 31";

/// The highest `smp progress round=N` in `serial`.
fn last_round(serial: &str) -> u64 {
    serial
        .lines()
        .filter_map(|l| l.strip_prefix("smp progress round="))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Waits for a progress report after round `after` in which every AP advanced.
fn wait_every_ap_advancing(serial_of: impl Fn() -> String, after: u64) -> u64 {
    let start = std::time::Instant::now();
    loop {
        let s = serial_of();
        let hit = s.lines().find_map(|l| {
            let r = l.strip_prefix("smp progress round=")?;
            let round: u64 = r.split_whitespace().next()?.parse().ok()?;
            (round > after && l.ends_with(EVERY_AP)).then_some(round)
        });
        if let Some(r) = hit {
            return r;
        }
        assert!(
            start.elapsed() < T,
            "no report after round {after} with every AP advancing:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn busy_vm(sock: &Path) -> Running {
    let vm = Vireo::guest(
        BUSY,
        &[
            "--cpus",
            CPUS,
            "--memory",
            "size=512M",
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    )
    .spawn();
    wait_for_socket(sock, T);
    vm
}

#[test]
fn thirty_two_busy_vcpus_survive_pause_resume_and_a_snapshot_restored_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let vm = busy_vm(&sock);
    let r = wait_every_ap_advancing(|| vm.serial_text(), 2);

    // Paused: no vCPU runs, so the boot CPU reports nothing.
    assert_eq!(api(&sock, "PUT", "vm.pause", None).0, 204);
    let paused_at = last_round(&vm.serial_text());
    assert!(paused_at >= r);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        last_round(&vm.serial_text()),
        paused_at,
        "a paused guest ran"
    );
    assert_eq!(api(&sock, "PUT", "vm.resume", None).0, 204);
    let r = wait_every_ap_advancing(|| vm.serial_text(), paused_at);

    // A snapshot of the running APs, restored in a fresh VMM: all 31 go on.
    assert_eq!(api(&sock, "PUT", "vm.pause", None).0, 204);
    let snap = dir.path().join("snap");
    let url = format!(r#"{{"destination_url":"file://{}"}}"#, snap.display());
    let (s, body) = api(&sock, "PUT", "vm.snapshot", Some(&url));
    assert_eq!(s, 204, "{body}");
    let before = last_round(&vm.serial_text());
    assert!(before >= r);
    assert_eq!(api(&sock, "PUT", "vm.shutdown", None).0, 204);
    assert_eq!(vm.wait(T).status.code(), Some(0));

    let serial = dir.path().join("restored.log");
    let mut restored = restore(&snap, &serial, None);
    let text = || std::fs::read_to_string(&serial).unwrap_or_default();
    let after = wait_every_ap_advancing(text, before);
    assert!(after > before);
    assert!(
        !text().contains("smp online"),
        "the restored guest must not start over:\n{}",
        text()
    );
    restored.kill().unwrap();
    restored.wait().unwrap();
}

#[test]
fn thirty_two_busy_vcpus_live_migrate_and_every_ap_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let src_sock = dir.path().join("src.sock");
    let src = busy_vm(&src_sock);
    wait_every_ap_advancing(|| src.serial_text(), 2);

    let dst = migrate_to_new_vmm(&src_sock, src, dir.path());
    let text = || dst.serial_text();
    wait_every_ap_advancing(text, 0);
    assert!(
        !text().contains("smp online"),
        "the guest must not start over at the destination:\n{}",
        text()
    );
    assert_eq!(api(&dst.sock, "PUT", "vm.shutdown", None).0, 204);
    let out = dst.wait();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What `test=cpuid` printed: each feature leaf's registers (eax, ebx, ecx, edx) by
/// `F.I`, and the XSAVE components leaf 0xd.0 offers.
fn guest_cpuid(serial: &str) -> (std::collections::BTreeMap<String, [u32; 4]>, u64) {
    let hex = |s: &str| u32::from_str_radix(s, 16).unwrap();
    let mut leaves = std::collections::BTreeMap::new();
    let mut xcr0 = None;
    for line in serial.lines() {
        let Some(rest) = line.strip_prefix("cpuid ") else {
            continue;
        };
        let (leaf, regs) = rest.split_once(' ').unwrap();
        if let Some(x) = regs.strip_prefix("xcr0=") {
            xcr0 = Some(u64::from_str_radix(x.trim(), 16).unwrap());
            continue;
        }
        let r: Vec<u32> = regs
            .split_whitespace()
            .map(|kv| hex(kv.split_once('=').unwrap().1))
            .collect();
        leaves.insert(leaf.to_string(), [r[0], r[1], r[2], r[3]]);
    }
    assert_eq!(leaves.len(), 5, "{serial}");
    (leaves, xcr0.expect("an xcr0 line"))
}

/// Whether KVM here is the hardware-virtualization kind (kvm_intel/kvm_amd), whose
/// CPUID exits always answer from the vCPU's CPUID table.
fn standard_kvm() -> bool {
    Path::new("/sys/module/kvm_intel").exists() || Path::new("/sys/module/kvm_amd").exists()
}

/// `vm.info`'s `cpu_features`: the fingerprint of the CPUID the VMM gave the vCPUs.
fn info_features(sock: &Path) -> vireo_util::cpu_features::CpuFeatures {
    let (s, body) = api(sock, "GET", "vm.info", None);
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    vireo_util::cpu_features::CpuFeatures::parse(v["cpu_features"].as_str().unwrap()).unwrap()
}

/// Processor compatibility (`--cpus features=`): a VM given only the x86-64 baseline
/// gets, in every feature leaf of the CPUID the VMM programs (`vm.info`'s
/// `cpu_features`), exactly its host's features within the mask, and the guest reads
/// them (leaf 0x8000_0001 everywhere; every leaf and the XSAVE components of leaf 0xd
/// where KVM is VT-x/AMD-V: the PVM-style KVM of our test machines answers leaves 1, 7
/// and 0xd at CPL0 with the host's values, whatever the VMM set). The masked VM
/// live-migrates (both ends mask alike) and keeps its features.
#[test]
fn a_processor_compatibility_mask_hides_features_and_the_masked_vm_migrates() {
    use vireo_util::cpu_features::CpuFeatures;
    let dir = tempfile::tempdir().unwrap();
    let host_sock = dir.path().join("host.sock");
    let host_vm = Vireo::guest(
        "test=cpuid period_ms=20",
        &["--api-socket", host_sock.to_str().unwrap()],
    )
    .spawn();
    wait_for_socket(&host_sock, T);
    let (host_leaves, host_xcr0) = guest_cpuid(&host_vm.wait_serial("tick 1 ", T));
    let host = info_features(&host_sock);
    drop(host_vm);

    let features =
        "1.0:0000000000000000000000000700a371+80000001.0:00000000000000000000000020100800";
    let mask = CpuFeatures::parse_mask(&features.replace('+', ",")).unwrap();
    let sock = dir.path().join("src.sock");
    let cpus = format!("boot=1,features={features}");
    let vm = Vireo::guest(
        "test=cpuid period_ms=20",
        &["--cpus", &cpus, "--api-socket", sock.to_str().unwrap()],
    )
    .spawn();
    wait_for_socket(&sock, T);
    let (guest, xcr0) = guest_cpuid(&vm.wait_serial("tick 1 ", T));

    // Programmed: the host's features within the mask, nothing beyond.
    let given = info_features(&sock);
    assert_eq!(given, host.intersect(&mask), "host {host}");
    let hidden = given.lacks(&host);
    assert!(
        !hidden.is_empty(),
        "the host has nothing beyond the baseline: {host}"
    );

    // Read by the guest. The VMM sets the hypervisor (leaf 1 ecx 31) and HTT (edx 28)
    // bits itself, KVM OSXSAVE (ecx 27) from CR4.
    let as_guest_reads = |f: &CpuFeatures, leaf: &str| -> [u32; 4] {
        let (func, idx) = leaf.split_once('.').unwrap();
        let func = u32::from_str_radix(func, 16).unwrap();
        let idx = u32::from_str_radix(idx, 16).unwrap();
        let l = f
            .leaves()
            .iter()
            .find(|l| (l.function, l.index) == (func, idx))
            .map_or([0; 4], |l| l.registers());
        l
    };
    let own = |leaf: &str| -> [u32; 4] {
        if leaf == "1.0" {
            [u32::MAX, u32::MAX, !(1 << 27 | 1 << 31), !(1 << 28)]
        } else {
            [u32::MAX; 4]
        }
    };
    let feature_regs: [(&str, [bool; 4]); 5] = [
        ("1.0", [false, false, true, true]),
        ("7.0", [false, true, true, true]),
        ("7.1", [true, true, true, true]),
        ("80000001.0", [false, false, true, true]),
        ("80000007.0", [true, true, true, true]),
    ];
    let checked: Vec<&str> = if standard_kvm() {
        feature_regs.iter().map(|(l, _)| *l).collect()
    } else {
        vec!["80000001.0"]
    };
    for (leaf, which) in feature_regs {
        if !checked.contains(&leaf) {
            continue;
        }
        let (want, read, o) = (as_guest_reads(&given, leaf), guest[leaf], own(leaf));
        for k in 0..4 {
            if which[k] {
                assert_eq!(
                    read[k] & o[k],
                    want[k] & o[k],
                    "leaf {leaf} reg {k}: the guest read {:#010x}, the VMM gave {:#010x}",
                    read[k],
                    want[k]
                );
            }
        }
    }
    // XSAVE state of hidden features: AVX (2), MPX (3, 4), AVX-512 (5-7), PKRU (9),
    // AMX (17, 18) go with them.
    if standard_kvm() {
        let gone: u64 = 1 << 2 | 3 << 3 | 7 << 5 | 1 << 9 | 3 << 17;
        assert_eq!(xcr0, host_xcr0 & !gone, "{xcr0:#x} of {host_xcr0:#x}");
    }
    eprintln!(
        "guest-read leaves checked: {checked:?} (standard KVM: {}); hidden: {}; host as read {host_leaves:x?}, xcr0 {host_xcr0:#x} -> {xcr0:#x}",
        standard_kvm(),
        hidden.len()
    );

    // Both ends mask alike: the migration's CPUID comparison passes, the guest goes on
    // with the same features.
    let dst = migrate_to_new_vmm(&sock, vm, dir.path());
    let start = std::time::Instant::now();
    while dst.serial_text().matches("tick ").count() < 5 {
        assert!(start.elapsed() < T, "no ticks at the destination");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !dst.serial_text().contains("cpuid 1.0"),
        "the guest started over at the destination"
    );
    assert_eq!(info_features(&dst.sock), given);
    assert_eq!(api(&dst.sock, "PUT", "vm.shutdown", None).0, 204);
    assert_eq!(dst.wait().status.code(), Some(0));
}
