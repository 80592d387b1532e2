//! `vireoctl vm shutdown|reboot`: the guest's own shutdown (ACPI power button, then a
//! stop after the timeout) and a reboot made of it and a start.

use super::*;

/// `vm shutdown NAME [--timeout S]`: true when the guest shut down by itself.
pub(crate) fn shutdown(
    ctx: &Ctx,
    name: &str,
    timeout: Option<u64>,
    out: Output,
) -> Result<bool, CtlError> {
    let q = timeout
        .map(|t| format!("?timeout_s={t}"))
        .unwrap_or_default();
    let v = ctx.json("PUT", &format!("/api/v1/vms/{name}/shutdown{q}"), None)?;
    let st: VmStatus = serde_json::from_value(v.clone())
        .map_err(|e| CtlError::Api(format!("unexpected answer of vireod: {e}")))?;
    let by_guest = st
        .last_exit
        .as_ref()
        .is_some_and(|e| e.reason == "guest-shutdown");
    match out {
        Output::Json => print_json(&v),
        Output::Table if by_guest => println!("{name}: the guest shut down"),
        Output::Table => {
            println!("{name}: the guest did not shut down in time (ACPI power button); stopped")
        }
    }
    Ok(by_guest)
}

/// `vm reboot NAME [--timeout S]`: shutdown, then start.
pub(crate) fn reboot(
    ctx: &Ctx,
    name: &str,
    timeout: Option<u64>,
    out: Output,
) -> Result<(), CtlError> {
    shutdown(ctx, name, timeout, out)?;
    let v = ctx.json("PUT", &format!("/api/v1/vms/{name}/start"), None)?;
    match out {
        Output::Json => print_json(&v),
        Output::Table => println!("{name}: started again"),
    }
    Ok(())
}
