//! Bad input: a clear one-line error, a non-zero exit status, nothing written.

use std::process::Command;
use std::time::Duration;

use vireo_e2e::{bin, guest, wait_with_timeout};

const T: Duration = Duration::from_secs(30);

fn vireo(args: &[&str]) -> (i32, String) {
    let child = Command::new(bin("vireo"))
        .args(args)
        .args(["--serial", "null"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_with_timeout(child, T);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn assert_one_line_error(code: i32, stderr: &str, needle: &str) {
    assert_ne!(code, 0, "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("vireo: error:") || l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "exactly one error line:\n{stderr}");
    assert!(
        errors[0].contains(needle),
        "{needle:?} not in {:?}",
        errors[0]
    );
}

#[test]
fn missing_kernel() {
    let (code, err) = vireo(&["--kernel", "/no/such/kernel"]);
    assert_one_line_error(code, &err, "/no/such/kernel");
}

/// A guest larger than the host is refused unless overcommit is asked for; overcommit
/// does not combine with huge pages; 4 TiB is the most a guest can have.
#[test]
fn guest_memory_beyond_the_host_or_the_limit_is_one_clear_error() {
    let g = guest();
    let kernel = g.to_str().unwrap();
    let (code, err) = vireo(&["--kernel", kernel, "--memory", "size=1T"]);
    assert_one_line_error(code, &err, "exceeds this host's");
    assert!(
        err.contains("overcommit=on"),
        "the error names the way out: {err}"
    );
    let (code, err) = vireo(&["--kernel", kernel, "--memory", "size=5T,overcommit=on"]);
    assert_one_line_error(code, &err, "at most 4096 GiB");
    let (code, err) = vireo(&[
        "--kernel",
        kernel,
        "--memory",
        "size=1G,overcommit=on,hugepages=on",
    ]);
    assert_one_line_error(code, &err, "cannot be used with hugepages");
    let (code, err) = vireo(&["--kernel", kernel, "--memory", "size=1G,overcommit=maybe"]);
    assert_one_line_error(code, &err, "overcommit");
}

/// A virtio-mem hotplug region that is not whole blocks, or with memory it cannot
/// give back block by block: one clear line each.
#[test]
fn hotplug_regions_that_cannot_be_are_one_clear_error() {
    let g = guest();
    let kernel = g.to_str().unwrap();
    for (memory, says) in [
        (
            "size=256M,hotplug_size=3M",
            "multiple of the virtio-mem block size (2 MiB)",
        ),
        ("size=256M,hotplug_size=0", "non-zero multiple"),
        (
            "size=256M,hotplug_size=1G,hugepages=on",
            "hotplug_size cannot be used with hugepages",
        ),
        (
            "size=256M,hotplug_size=1G,shared=on",
            "hotplug_size cannot be used with memory.shared",
        ),
        (
            "size=256M,hotplug_size=5T,overcommit=on",
            "memory.size + memory.hotplug_size must be at most 4096 GiB",
        ),
        ("size=256M,hotplug_size=lots", "hotplug_size"),
        ("size=256M,hotplug_size=1T", "exceeds this host's"),
    ] {
        let (code, err) = vireo(&["--kernel", kernel, "--memory", memory]);
        assert_one_line_error(code, &err, says);
    }
}

/// vCPU counts and topologies the VMM cannot give a guest: one clear line each.
#[test]
fn vcpu_counts_and_topologies_that_cannot_be_are_one_clear_error() {
    let g = guest();
    let kernel = g.to_str().unwrap();
    for (cpus, says) in [
        ("boot=255", "cpus.boot must be 1..=254"),
        ("boot=0", "cpus.boot must be 1..=254"),
        ("boot=8,topology=1:3:3", "must multiply to cpus.boot 8"),
        ("boot=200,topology=5:40:1", "needs APIC IDs up to 295"),
        ("boot=8,topology=2:x:2", "SOCKETS:CORES:THREADS"),
        ("boot=8,topology=2:4", "SOCKETS:CORES:THREADS"),
        ("boot=8,topology=0:4:2", "SOCKETS:CORES:THREADS"),
    ] {
        let (code, err) = vireo(&["--kernel", kernel, "--cpus", cpus]);
        assert_one_line_error(code, &err, says);
    }
}

/// NUMA nodes that do not describe the VM, or a host node this host lacks.
#[test]
fn numa_nodes_that_do_not_fit_the_vm_or_the_host_are_one_clear_error() {
    let g = guest();
    let kernel = g.to_str().unwrap();
    let two = |a: &str, b: &str| {
        vireo(&[
            "--kernel", kernel, "--cpus", "boot=4", "--memory", "size=1G", "--numa", a, "--numa", b,
        ])
    };
    for ((a, b), says) in [
        (
            ("node=0,cpus=0-1,memory=512M", "node=1,cpus=2,memory=512M"),
            "vCPU 3 is on no node",
        ),
        (
            ("node=0,cpus=0-1,memory=512M", "node=1,cpus=1-3,memory=512M"),
            "vCPU 1 is on node 0 and node 1",
        ),
        (
            ("node=0,cpus=0-1,memory=512M", "node=1,cpus=2-3,memory=256M"),
            "adds up to 768 MiB",
        ),
        (
            ("node=0,cpus=0-1,memory=512M", "node=2,cpus=2-3,memory=512M"),
            "numbered 0..2",
        ),
        (
            ("node=0,cpus=0-1,memory=512M", "node=1,cpus=2-7,memory=512M"),
            "names vCPU 4",
        ),
        (
            (
                "node=0,cpus=0-1,memory=512M,distances=1@5",
                "node=1,cpus=2-3,memory=512M",
            ),
            "11..=254",
        ),
        (
            ("node=0,cpus=0-1,memory=512M", "node=1,cpus=2-3,size=512M"),
            "unknown option 'size'",
        ),
        // This host has one node (node 0).
        (
            (
                "node=0,cpus=0-1,memory=512M,host_node=64",
                "node=1,cpus=2-3,memory=512M",
            ),
            "host node 64 does not exist here",
        ),
    ] {
        let (code, err) = two(a, b);
        assert_one_line_error(code, &err, says);
    }
}

/// Huge pages the host's pool cannot give are refused at start, naming the pool (they
/// used to be mapped without a reservation: the kernel load then failed obscurely, and a
/// guest touching past the pool would have been a SIGBUS in the VMM).
#[test]
fn huge_pages_the_pool_cannot_give_are_one_clear_error() {
    let g = guest();
    let kernel = g.to_str().unwrap();
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    let size = format!("size={}M,hugepages=on", (free + 64) * 2);
    let (code, err) = vireo(&["--kernel", kernel, "--memory", &size]);
    assert_one_line_error(
        code,
        &err,
        &format!("needs {} huge pages of 2048 KiB", free + 64),
    );
    for (memory, says) in [
        (
            "size=1G,hugepage_size=2M",
            "hugepage_size needs hugepages=on",
        ),
        ("size=1G,hugepages=on,hugepage_size=4M", "must be 2M or 1G"),
        (
            "size=1536M,hugepages=on,hugepage_size=1G",
            "multiple of the huge page size",
        ),
    ] {
        let (code, err) = vireo(&["--kernel", kernel, "--memory", memory]);
        assert_one_line_error(code, &err, says);
    }
}

#[test]
fn balloons_that_cannot_be_are_one_clear_error() {
    let g = guest();
    let kernel = g.to_str().unwrap();
    for (memory, balloon, says) in [
        (
            "size=256M",
            "size=512M",
            "balloon.size (512 MiB) exceeds the VM's memory (256 MiB)",
        ),
        (
            "size=256M,hugepages=on",
            "size=0",
            "cannot give back huge pages",
        ),
        (
            "size=256M",
            "size=0,stats_interval=soon",
            "expected seconds",
        ),
        ("size=256M", "size=0,inflate=on", "unknown option 'inflate'"),
    ] {
        let (code, err) = vireo(&["--kernel", kernel, "--memory", memory, "--balloon", balloon]);
        assert_one_line_error(code, &err, says);
    }
}

#[test]
fn kernel_that_is_not_elf() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("k");
    std::fs::write(&k, b"#!/bin/sh\necho not a kernel\n").unwrap();
    let (code, err) = vireo(&["--kernel", k.to_str().unwrap()]);
    assert_one_line_error(code, &err, "neither an ELF");
}

#[test]
fn unreadable_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("k");
    std::fs::create_dir(&k).unwrap(); // a directory cannot be read as a kernel
    let (code, err) = vireo(&["--kernel", k.to_str().unwrap()]);
    assert_one_line_error(code, &err, "cannot read kernel");
}

#[test]
fn bad_flags() {
    let g = guest();
    let g = g.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["--kernel", g, "--disk", "readonly=on"],
            "missing required option 'path'",
        ),
        (vec!["--kernel", g, "--memory", "size=lots"], "--memory"),
        (vec!["--kernel", g, "--cpus", "boot=0"], "cpus.boot"),
        (vec!["--kernel", g, "--cpus", "boot=9999"], "--cpus"),
        (
            vec!["--kernel", g, "--disk", "path=/x,colour=red"],
            "unknown option 'colour'",
        ),
        (vec![], "nothing to run"),
    ] {
        let (code, err) = vireo(&args);
        assert_one_line_error(code, &err, needle);
    }
}

#[test]
fn memory_larger_than_the_host() {
    let (code, err) = vireo(&[
        "--kernel",
        guest().to_str().unwrap(),
        "--memory",
        "size=256G",
    ]);
    assert_one_line_error(code, &err, "exceeds this host");
}

#[test]
fn disk_locked_by_another_vmm_is_refused_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.raw");
    std::fs::write(&disk, vec![0x5au8; 1 << 20]).unwrap();
    let sock = dir.path().join("vm.sock");
    let disk_arg = format!("path={}", disk.display());
    let first = vireo_e2e::Vireo::guest(
        "test=counter",
        &["--disk", &disk_arg, "--api-socket", sock.to_str().unwrap()],
    )
    .spawn();
    vireo_e2e::wait_for_socket(&sock, T);
    // The API socket is up before the VM (and its disk lock) is: wait for the guest.
    first.wait_serial("tick 1 ", T);
    let (code, err) = vireo(&[
        "--kernel",
        guest().to_str().unwrap(),
        "--cmdline",
        "test=blk-write seed=1 sectors=8",
        "--disk",
        &disk_arg,
    ]);
    assert_one_line_error(code, &err, "in use by another process");
    drop(first);
    assert!(std::fs::read(&disk).unwrap().iter().all(|&b| b == 0x5a));
}

#[test]
fn malformed_disk_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vm.json");
    std::fs::write(
        &cfg,
        r#"{"payload":{"kernel":"/k"},"cpus":{"boot":"many"}}"#,
    )
    .unwrap();
    let (code, err) = vireo(&["--config", cfg.to_str().unwrap()]);
    assert_one_line_error(code, &err, "vm.json");
}

/// VM flags without a VM to describe (no --kernel or --config: a VMM waiting for
/// vm.create, or restoring a snapshot) are refused by name, not dropped; --serial
/// alone is taken (it applies to the VM that arrives).
#[test]
fn vm_flags_without_a_new_vm_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let sock = sock.to_str().unwrap();
    let (code, err) = vireo(&["--api-socket", sock, "--cpus", "2", "--memory", "1G"]);
    assert_one_line_error(code, &err, "--cpus, --memory describe a new VM");
    let (code, err) = vireo(&["--restore", dir.path().to_str().unwrap(), "--rng"]);
    assert_one_line_error(code, &err, "--rng describe");
    let (code, err) = vireo(&["--api-socket", sock, "--rng=maybe"]);
    assert_one_line_error(code, &err, "on or off");
}
