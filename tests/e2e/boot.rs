//! Booting the test guest: banner, CPU count and memory size as configured, exit status.

use std::time::Duration;

use vireo_e2e::{assert_guest_ok, serial_line, Vireo};

const T: Duration = Duration::from_secs(30);

#[test]
fn guest_sees_configured_cpus_and_memory() {
    for (cpus, mem) in [(1u32, 128u32), (4, 512)] {
        let (out, serial) = Vireo::guest(
            "test=boot",
            &[
                "--cpus",
                &format!("boot={cpus}"),
                "--memory",
                &format!("size={mem}M"),
            ],
        )
        .run(T);
        assert_guest_ok(&out, &serial);
        assert_eq!(
            serial_line(&serial, "vireo-guest: boot"),
            format!("vireo-guest: boot cpus={cpus} mem_mib={mem}")
        );
    }
}

#[test]
fn memory_above_4g_is_usable() {
    // 4.5 GiB: RAM continues above the 32-bit PCI hole; the guest probes every GiB.
    let (out, serial) = Vireo::guest("test=mem", &["--memory", "size=4608M"]).run(T);
    assert_guest_ok(&out, &serial);
    assert!(serial.contains("mem ram 0x100000000.."), "{serial}");
}

/// 1 TiB on this 24 GiB host (overcommit: only what the guest touches is backed): the
/// guest maps its whole range and a word every GiB, first and last included, reads
/// back what it wrote.
#[test]
fn a_1_tib_guest_reads_back_memory_across_its_whole_range() {
    let (out, serial) = Vireo::guest("test=mem", &["--memory", "size=1T,overcommit=on"]).run(T);
    assert_guest_ok(&out, &serial);
    // RAM above the PCI hole: 4 GiB up to 1 TiB + the 1 GiB that the hole displaced.
    assert!(
        serial.contains("mem ram 0x100000000..0x10040000000 ok"),
        "{serial}"
    );
    let probes: u64 = serial_line(&serial, "mem regions=")
        .rsplit("probes=")
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(probes > 1024, "a probe per GiB of 1 TiB: {serial}");
}

/// Puts `nr_hugepages` of 2 MiB back as it was when dropped.
struct HugePagePool(String);

const NR_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

impl Drop for HugePagePool {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, &self.0);
    }
}

/// With huge pages, guest RAM is hugetlb memory taken from the pool (checked in the
/// VMM's smaps) and the guest reads back memory across its range.
#[test]
fn hugepages_back_guest_ram_from_the_pool() {
    let old = std::fs::read_to_string(NR_HUGEPAGES).unwrap();
    let _restore = HugePagePool(old.clone());
    let want = old.trim().parse::<u64>().unwrap() + 136;
    std::fs::write(NR_HUGEPAGES, want.to_string()).unwrap();
    let got: u64 = std::fs::read_to_string(NR_HUGEPAGES)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(got, want, "the kernel could not give {want} huge pages");
    let vm = Vireo::guest(
        "test=counter period_ms=20",
        &["--memory", "size=256M,hugepages=on"],
    )
    .spawn();
    vm.wait_serial("tick 2 ", T);
    let pid = vm.child.as_ref().unwrap().id();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    // Every mapping's header line is followed by its fields; find the 2 MiB-page ones.
    let mut huge = 0u64;
    let mut size = 0u64;
    for line in smaps.lines() {
        if let Some(kib) = line.strip_prefix("Size:") {
            size = kib
                .trim()
                .trim_end_matches(" kB")
                .trim()
                .parse()
                .unwrap_or(0);
        }
        if line.starts_with("KernelPageSize:") && line.contains(" 2048 kB") {
            huge += size;
        }
    }
    assert_eq!(
        huge,
        256 << 10,
        "guest RAM is 256 MiB of 2 MiB pages:\n{smaps}"
    );
    drop(vm);

    let (out, serial) = Vireo::guest("test=mem", &["--memory", "size=256M,hugepages=on"]).run(T);
    assert_guest_ok(&out, &serial);
}

#[test]
fn guest_failure_is_exit_status_2() {
    let (out, serial) = Vireo::guest("test=no-such-test", &[]).run(T);
    assert!(serial.contains("result fail unknown test"), "{serial}");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn guest_exception_is_reported_not_hung() {
    let (out, serial) = Vireo::guest("test=fault kind=pf", &[]).run(T);
    assert!(
        serial.contains("vireo-guest: exception vector=0x0e"),
        "{serial}"
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "guest exits 0x7f through debug-exit"
    );
}

#[test]
fn pci_enumeration_finds_host_bridge_and_virtio_devices() {
    let (out, serial) = Vireo::guest("test=pci", &["--rng"]).run(T);
    assert_guest_ok(&out, &serial);
    assert!(
        serial.contains("pci 00:00.0 vendor=8086 device=0d57 class=060000"),
        "{serial}"
    );
    assert!(
        serial.contains("pci 00:01.0 vendor=1af4 device=1044"),
        "virtio-rng: {serial}"
    );
    assert!(
        serial.contains("assigned=vmm"),
        "the VMM assigns BARs: {serial}"
    );
}

#[test]
fn msix_interrupts_reach_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let (out, serial) =
        Vireo::guest("test=msi", &["--disk", &format!("path={}", disk.display())]).run(T);
    assert_guest_ok(&out, &serial);
    // The guest waits for the interrupt without a deadline of its own (a guest-side timer
    // measures the host's load); `run(T)` is the hang guard, so an MSI that never arrives
    // still fails here.
    let line = serial_line(&serial, "msi vector=0x40 delivered=");
    assert!(
        !line.starts_with("msi vector=0x40 delivered=0 "),
        "MSI-X not counted: {line}"
    );
}

/// Seccomp mode (0 off, 2 filter) and name of every thread of `pid`.
fn thread_seccomp(pid: u32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((field("Name:"), field("Seccomp:").parse().unwrap_or(99)));
    }
    out
}

#[test]
fn every_thread_runs_under_a_seccomp_filter() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let sock = dir.path().join("vm.sock");
    let disk_arg = format!("path={}", disk.display());
    for (flag, want) in [("true", 2u32), ("false", 0)] {
        let _ = std::fs::remove_file(&sock);
        let vm = Vireo::guest(
            // msi activates virtio-blk (its worker thread starts), then the counter runs.
            "test=counter period_ms=20",
            &[
                "--cpus",
                "boot=2",
                "--disk",
                &disk_arg,
                "--rng",
                "--api-socket",
                sock.to_str().unwrap(),
                "--seccomp",
                flag,
            ],
        )
        .spawn();
        vm.wait_serial("tick 2 ", T);
        let pid = vm.child.as_ref().unwrap().id();
        // A thread takes its name when it first runs (on a loaded machine, after the
        // guest's first ticks): wait for the ones this test looks for.
        let start = std::time::Instant::now();
        let threads = loop {
            let threads = thread_seccomp(pid);
            let named = |n: &str| threads.iter().any(|(t, _)| t == n);
            if named("vireo-vcpu0")
                && named("vireo-vcpu1")
                && named("vireo-api")
                && named("vireo-files")
            {
                break threads;
            }
            assert!(start.elapsed() < T, "threads never named: {threads:?}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        for (name, mode) in &threads {
            assert_eq!(
                *mode, want,
                "thread {name} with --seccomp {flag}: {threads:?}"
            );
        }
        if flag == "true" {
            // The file thread runs under its own filter, not stacked on the control
            // thread's (it starts before the control thread is confined): one program,
            // where the control thread has two (clone3's ENOSYS answer, then its own)
            // and every thread it starts has more.
            let filters = thread_filter_counts(pid);
            let count = |n: &str| {
                filters
                    .iter()
                    .find(|(t, _)| t == n)
                    .map(|(_, c)| *c)
                    .unwrap_or_else(|| panic!("no thread {n}: {filters:?}"))
            };
            assert_eq!(count("vireo-files"), 1, "{filters:?}");
            assert_eq!(count("vireo"), 2, "{filters:?}");
            assert!(count("vireo-vcpu0") > 2, "{filters:?}");
        }
    }
}

/// Every thread of `pid` and the number of seccomp filters it runs under
/// (`Seccomp_filters:` of its status).
fn thread_filter_counts(pid: u32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((
            field("Name:"),
            field("Seccomp_filters:").parse().unwrap_or(99),
        ));
    }
    out
}
