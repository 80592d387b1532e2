use super::*;

#[test]
fn names_are_safe_file_names() {
    for ok in ["a", "vm-1", "web_02.prod", "0"] {
        validate_name(ok).unwrap();
    }
    for bad in ["", "-a", ".x", "a/b", "../x", "a b", &"x".repeat(65), "é"] {
        assert!(validate_name(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn definition_defaults_and_rejects_unknown_fields() {
    let d: VmDefinition =
        serde_json::from_str(r#"{"config":{"payload":{"kernel":"/k"}}}"#).unwrap();
    assert_eq!(d.priority, Priority::Off);
    assert_eq!(d.restart, RestartPolicy::OnFailure);
    assert_eq!(d.max_restarts, 3);
    d.validate().unwrap();
    let d: VmDefinition = serde_json::from_str(
        r#"{"config":{"payload":{"kernel":"/k"}},"priority":"High","restart":"always"}"#,
    )
    .unwrap();
    assert_eq!(
        (d.priority, d.restart),
        (Priority::High, RestartPolicy::Always)
    );
    assert!(serde_json::from_str::<VmDefinition>(
        r#"{"config":{"payload":{"kernel":"/k"}},"prio":"High"}"#
    )
    .is_err());
}

/// One casing: priorities and restart policies are written in lower case (as
/// `--priority high`, `--restart on-failure` take them); the capitalized
/// priorities older definitions hold are still read.
#[test]
fn enums_are_written_in_lower_case_and_old_priorities_read() {
    for (text, p) in [
        ("high", Priority::High),
        ("High", Priority::High),
        ("off", Priority::Off),
        ("Medium", Priority::Medium),
    ] {
        let d: VmDefinition = serde_json::from_str(&format!(
            r#"{{"config":{{"payload":{{"kernel":"/k"}}}},"priority":"{text}"}}"#
        ))
        .unwrap();
        assert_eq!(d.priority, p, "{text}");
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["priority"], p.as_str());
        assert_eq!(v["priority"], text.to_lowercase());
        assert_eq!(v["restart"], "on-failure");
        assert_eq!(p.to_string(), text.to_lowercase());
    }
    for p in Priority::ALL {
        let cli = clap::ValueEnum::to_possible_value(&p).unwrap();
        assert_eq!(cli.get_name(), p.as_str());
    }
    let cli = clap::ValueEnum::to_possible_value(&RestartPolicy::OnFailure).unwrap();
    assert_eq!(cli.get_name(), RestartPolicy::OnFailure.as_str());
    let e = crate::json::from_slice::<VmDefinition>(
        br#"{"config":{"payload":{"kernel":"/k"}},"priority":"urgent"}"#,
    )
    .unwrap_err();
    assert!(
        e.contains(
            "priority: unknown value `urgent`, expected one of `high`, `medium`, `low`, `off`"
        ),
        "{e}"
    );
}

#[test]
fn definitions_need_absolute_paths_and_no_tty_console() {
    let mut d: VmDefinition =
        serde_json::from_str(r#"{"config":{"payload":{"kernel":"k.elf"}}}"#).unwrap();
    assert!(matches!(d.validate(), Err(ModelError::BadDefinition(m)) if m.contains("absolute")));
    d.config.payload.kernel = "/k".into();
    d.config.console = OutputConfig::Tty;
    d.config.serial = OutputConfig::Null;
    assert!(d.validate().is_err());
}

#[test]
fn priority_orders_start_first_to_last() {
    let mut v = vec![
        Priority::Low,
        Priority::Off,
        Priority::High,
        Priority::Medium,
    ];
    v.sort();
    assert_eq!(v, Priority::ALL);
}
