//! The `vireo` binary of this build runs. Having an integration test makes
//! `cargo nextest run --workspace` build (and put in target/<profile>/) the binary with
//! the features of the test build, i.e. with `test-hooks`, which the end-to-end tests
//! (tests/e2e/confinement.rs) need.

#[test]
fn vireo_prints_its_version() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vireo"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("vireo "));
}
