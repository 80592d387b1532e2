//! Tests across the flags and types: parsing and refusing flags of every kind, and the
//! OpenAPI document against the serde field names.

use std::path::PathBuf;

use super::*;

#[test]
fn parses_flags_in_cloud_hypervisor_style() {
    assert_eq!(parse_cpus("boot=4").unwrap().boot, 4);
    assert_eq!(parse_memory("size=512M").unwrap().size, 512 << 20);
    assert_eq!(parse_memory("size=2G,hugepages=on").unwrap().size, 2 << 30);
    let d = parse_disk("path=/a.vhdx,readonly=on,serial=abc").unwrap();
    assert_eq!(d.path, PathBuf::from("/a.vhdx"));
    assert!(d.readonly && !d.direct);
    assert!(d.locking, "locking is on unless turned off");
    let off = parse_disk("path=/a.vhdx,locking=off").unwrap();
    assert!(!off.locking);
    // Round trip: the default is not written out, off is.
    let j = serde_json::to_value(&off).unwrap();
    assert_eq!(j["locking"], serde_json::json!(false));
    let back: DiskConfig = serde_json::from_value(j).unwrap();
    assert!(!back.locking);
    let on = parse_disk("path=/a.vhdx").unwrap();
    assert!(serde_json::to_value(&on).unwrap().get("locking").is_none());
    assert!(parse_disk("path=/a,locking=maybe").is_err());
    // A clustered VM's fencing token: a number, absent unless given.
    assert_eq!(d.fencing_token, None);
    let fenced = parse_disk("path=/a,fencing_token=42").unwrap();
    assert_eq!(fenced.fencing_token, Some(42));
    assert_eq!(serde_json::to_value(&fenced).unwrap()["fencing_token"], 42);
    assert!(parse_disk("path=/a,fencing_token=-1").is_err());
    assert!(serde_json::to_value(&on)
        .unwrap()
        .get("fencing_token")
        .is_none());
    assert_eq!(d.serial.as_deref(), Some("abc"));
    assert_eq!(d.on_error, None);
    let d = parse_disk("path=/a,on_error=stop").unwrap();
    assert_eq!(d.on_error, Some(OnError::Stop));
    assert!(parse_disk("path=/a,on_error=ignore").is_err());
    let d = parse_disk("path=/a,replica_log=/a.rlog").unwrap();
    assert_eq!(
        d.replica_log.as_deref(),
        Some(std::path::Path::new("/a.rlog"))
    );
    assert!(parse_disk("path=/a,readonly=on,replica_log=/a.rlog").is_err());
    assert!(serde_json::to_value(parse_disk("path=/a").unwrap())
        .unwrap()
        .get("replica_log")
        .is_none());
    assert_eq!(
        parse_output("--serial", "file=/tmp/x").unwrap(),
        OutputConfig::File("/tmp/x".into())
    );
    assert_eq!(
        parse_output_capped("--serial", "file=/tmp/a,b,max_size=4M").unwrap(),
        (OutputConfig::File("/tmp/a,b".into()), Some(4 << 20))
    );
}

#[test]
fn rejects_bad_flags_with_a_clear_reason() {
    assert!(matches!(
        parse_disk("readonly=on"),
        Err(ConfigError::Missing { key: "path", .. })
    ));
    assert!(matches!(
        parse_disk("path=/a,colour=red"),
        Err(ConfigError::UnknownKey { .. })
    ));
    assert!(matches!(
        parse_disk("path=/a,readonly=maybe"),
        Err(ConfigError::BadValue { .. })
    ));
    assert!(matches!(
        parse_memory("size=lots"),
        Err(ConfigError::BadValue { .. })
    ));
    assert!(matches!(
        parse_cpus("boot"),
        Err(ConfigError::NotKeyValue { .. })
    ));
    assert!(parse_output("--serial", "file=").is_err());
    assert!(parse_output_capped("--serial", "file=/x,max_size=0").is_err());
    assert!(parse_output_capped("--serial", "file=/x,max_size=lots").is_err());
    assert!(parse_output_capped("--serial", "file=,max_size=1M").is_err());
    assert_eq!(parse_size("1T"), Some(1 << 40));
    assert_eq!(parse_size("99999999999999T"), None);
}

#[test]
fn the_openapi_document_describes_every_config_field() {
    let doc: serde_yaml::Value = serde_yaml::from_str(crate::OPENAPI_YAML).unwrap();
    let vm = &doc["components"]["schemas"]["VmConfig"]["properties"];
    let keys = |v: &serde_yaml::Value| -> Vec<String> {
        let mut k: Vec<String> = v
            .as_mapping()
            .map(|m| {
                m.keys()
                    .filter_map(|k| k.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        k.sort();
        k
    };
    let full = VmConfig {
        numa: vec![
            crate::numa::parse_numa("node=0,cpus=0,memory=512M,host_node=0,distances=1@20")
                .unwrap(),
        ],
        balloon: Some(parse_balloon("size=1M,deflate_on_oom=on").unwrap()),
        payload: PayloadConfig {
            kernel: "/k".into(),
            cmdline: None,
            initramfs: None,
        },
        cpus: parse_cpus("boot=2,topology=1:2:1").unwrap(),
        memory: parse_memory(
            "size=1G,hugepages=on,hugepage_size=2M,overcommit=on,shared=on,hotplug_size=1G",
        )
        .unwrap(),
        disks: vec![parse_disk("path=/d").unwrap()],
        serial: OutputConfig::Null,
        console: OutputConfig::Off,
        serial_max_size: Some(1 << 20),
        console_max_size: Some(1 << 20),
        rng: true,
        guest_agent: true,
        // Every field at once, for the keys (a valid device has a tap or a socket).
        nets: vec![NetConfig {
            vhost_user: Some("/run/vs/n.sock".into()),
            switch: Some("sw".into()),
            vlan: Some(10),
            guard: Some("all".into()),
            max: Some("1G".into()),
            ..parse_net("tap=t,mac=52:54:00:00:00:01,id=n").unwrap()
        }],
        user_devices: vec![crate::config::parse_user_device("socket=/run/u.sock,id=u").unwrap()],
        write_lease: Some(crate::WriteLease {
            deadline_monotonic_ns: 1,
        }),
    };
    let json = serde_json::to_value(&full).unwrap();
    let serde_keys = |v: &serde_json::Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(vm), serde_keys(&json), "VmConfig properties");
    assert_eq!(
        keys(&vm["nets"]["items"]["properties"]),
        serde_keys(&json["nets"][0]),
        "NetConfig properties"
    );
    for (field, what) in [("cpus", "CpusConfig"), ("memory", "MemoryConfig")] {
        assert_eq!(
            keys(&vm[field]["properties"]),
            serde_keys(&json[field]),
            "{what} properties"
        );
    }
    assert_eq!(
        keys(&vm["cpus"]["properties"]["topology"]["properties"]),
        serde_keys(&json["cpus"]["topology"]),
        "CpuTopology properties"
    );
    assert_eq!(
        keys(&vm["balloon"]["properties"]),
        serde_keys(&json["balloon"]),
        "BalloonConfig properties"
    );
    assert_eq!(
        keys(&vm["numa"]["items"]["properties"]),
        serde_keys(&json["numa"][0]),
        "NumaNode properties"
    );
}
