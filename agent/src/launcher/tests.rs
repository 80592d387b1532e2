use super::*;
use std::process::Command;

#[test]
fn argv_boots_a_config_or_receives_with_a_serial_file() {
    let mut spec = LaunchSpec {
        name: "web".into(),
        vireo_bin: "/usr/bin/vireo".into(),
        args: VmmArgs::Boot {
            config: "/run/vireo/vms/web.json".into(),
        },
        socket: "/run/vireo/vms/web.sock".into(),
        log: "/l".into(),
        pid_file: "/p".into(),
        env_file: "/e".into(),
        storage_roots: Vec::new(),
        block_devices: Vec::new(),
        socket_dirs: vec!["/run/vireo/vms".into()],
        memory: None,
        jail: None,
    };
    assert_eq!(
        spec.argv().unwrap(),
        [
            "--config",
            "/run/vireo/vms/web.json",
            "--api-socket",
            "/run/vireo/vms/web.sock"
        ]
    );
    spec.args = VmmArgs::Receive {
        serial: "/var/lib/vireo/vms/web/serial.log".into(),
    };
    assert_eq!(
        spec.argv().unwrap(),
        [
            "--serial",
            "file=/var/lib/vireo/vms/web/serial.log",
            "--api-socket",
            "/run/vireo/vms/web.sock"
        ]
    );
}

#[test]
fn a_jail_comes_first_and_a_path_with_a_comma_is_refused() {
    let mut spec = LaunchSpec {
        name: "web".into(),
        vireo_bin: "/usr/bin/vireo".into(),
        args: VmmArgs::Boot {
            config: "/run/vireo/vms/web.json".into(),
        },
        socket: "/run/vireo/vms/web/api.sock".into(),
        log: "/l".into(),
        pid_file: "/p".into(),
        env_file: "/e".into(),
        storage_roots: Vec::new(),
        block_devices: Vec::new(),
        socket_dirs: vec!["/run/vireo/vms".into()],
        memory: None,
        jail: Some(JailSpec {
            uid: 980003,
            root: "/run/vireo/jail/web".into(),
            netns: None,
            binds: vec!["/run/vireo/vms/web".into(), "/srv/in".into()],
            read_only: vec!["/srv/k.elf".into()],
            new_pid_namespace: false,
        }),
    };
    assert_eq!(
        spec.argv().unwrap()[..2],
        [
            "--jail",
            "uid=980003,gid=980003,root=/run/vireo/jail/web,bind=/run/vireo/vms/web,\
             bind=/srv/in,bind_ro=/srv/k.elf"
        ]
    );
    if let Some(j) = spec.jail.as_mut() {
        j.binds.push("/srv/a,uid=0".into());
    }
    let e = spec.argv().unwrap_err().to_string();
    assert!(e.contains("a path with ',' cannot be given"), "{e}");
}

#[test]
fn tail_lines_takes_the_last_lines() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("log");
    std::fs::write(&p, "a\nb\n\nc\nd\n").unwrap();
    assert_eq!(tail_lines(&p, 2), ["c", "d"]);
    assert_eq!(tail_lines(&p, 10), ["a", "b", "c", "d"]);
    assert!(tail_lines(&dir.path().join("none"), 3).is_empty());
    std::fs::write(&p, "a\nb\ntic").unwrap();
    assert_eq!(tail_lines(&p, 2), ["b", "tic"]);
    assert_eq!(tail_complete_lines(&p, 2), ["a", "b"]);
}

#[tokio::test]
async fn spawn_watch_signal_and_refuse_to_adopt_a_stranger() {
    let dir = tempfile::tempdir().unwrap();
    let spec = LaunchSpec {
        name: "x".into(),
        vireo_bin: "/bin/sleep".into(),
        args: VmmArgs::Boot {
            config: "100".into(),
        },
        socket: dir.path().join("s.sock"),
        log: dir.path().join("log"),
        pid_file: dir.path().join("x.pid"),
        env_file: dir.path().join("x.env"),
        storage_roots: Vec::new(),
        block_devices: Vec::new(),
        socket_dirs: vec!["/run/vireo/vms".into()],
        memory: None,
        jail: None,
    };
    // `sleep --config 100 --api-socket ...` fails at once: exit status 1 is seen.
    let launcher = Launcher::Direct(direct::Direct::new(CpuCgroups::off()));
    let (h, w) = launcher.spawn(&spec).await.unwrap();
    let e = w.wait().await;
    assert_eq!(e.status, Some(1));
    assert!(!h.alive());
    // A live process that is not vireo is not adopted.
    let mut sleeper = Command::new("/bin/sleep").arg("30").spawn().unwrap();
    let st = procfs::stat(sleeper.id() as i32).unwrap();
    std::fs::write(
        &spec.pid_file,
        format!("{} {}", sleeper.id(), st.start_ticks),
    )
    .unwrap();
    assert!(matches!(launcher.adopt(&spec), Err(NotAdopted::NotOurs(_))));
    std::fs::write(&spec.pid_file, "999999999 1").unwrap();
    assert!(matches!(adopt(&spec), Err(NotAdopted::Gone)));
    std::fs::remove_file(&spec.pid_file).unwrap();
    assert!(matches!(adopt(&spec), Err(NotAdopted::NoPidFile)));
    // Killing through the pidfd, seen by a watcher of a non-child.
    let (h, w) = watch(sleeper.id() as i32, None).unwrap();
    h.signal(libc::SIGKILL).unwrap();
    let _ = sleeper.wait();
    let e = tokio::time::timeout(std::time::Duration::from_secs(5), w.wait())
        .await
        .unwrap();
    assert_eq!(
        e,
        Exit {
            status: None,
            signal: None
        }
    );
}
