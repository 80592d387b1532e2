//! `check`: open (which validates every structure), look for leaked space,
//! and with `-r all` replay a pending log and cut leaks off the end.

use crate::CliResult;
use std::path::Path;
use vhdx::{Error, OpenOptions, Vhdx};

fn report(
    file: &Path,
    output: &str,
    corruptions: u64,
    leaks: u64,
    repaired_leaks: u64,
    msgs: &[String],
) -> CliResult<u8> {
    if output == "json" {
        let j = serde_json::json!({
            "filename": file.display().to_string(),
            "format": "vhdx",
            "check-errors": corruptions,
            "corruptions": corruptions,
            "leaks": leaks,
            "leaks-fixed": repaired_leaks,
            "messages": msgs,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&j).map_err(|e| e.to_string())?
        );
    } else {
        for m in msgs {
            println!("{m}");
        }
        if repaired_leaks > 0 {
            println!("The following inconsistencies were found and repaired:\n\n    {repaired_leaks} leaked clusters\n    0 corruptions\n");
        }
        if corruptions > 0 {
            println!("\n{corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.");
        } else if leaks > 0 {
            println!("\n{leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.");
        } else {
            println!("No errors were found on the image.");
        }
    }
    Ok(if corruptions > 0 {
        2
    } else if leaks > 0 {
        3
    } else {
        0
    })
}

pub fn run(file: &Path, repair: Option<&str>, output: &str, force_share: bool) -> CliResult<u8> {
    if !vhdx::probe(file).map_err(|e| format!("Could not open '{}': {e}", file.display()))? {
        return Err("This image format does not support checks".into());
    }
    let fix = match repair {
        None => false,
        Some("all") | Some("leaks") => true,
        Some(r) => return Err(format!("Unknown option for -r: '{r}' (leaks or all)")),
    };
    if fix && force_share {
        // Like qemu-img: sharing is for readers; a repair writes and needs the lock.
        return Err("--force-share (-U) can only be used without -r (read-only check)".into());
    }
    let mut msgs = Vec::new();
    let v = match Vhdx::open(
        file,
        OpenOptions {
            read_only: !fix,
            no_lock: force_share,
            ..Default::default()
        },
    ) {
        Ok(v) => v,
        Err(e @ (Error::Corrupt { .. } | Error::Parent { .. })) => {
            msgs.push(format!("ERROR: {e}"));
            return report(file, output, 1, 0, 0, &msgs);
        }
        Err(e) => return Err(format!("Could not open '{}': {e}", file.display())),
    };
    let mut corruptions = 0;
    if !fix && v.replayed_log_entries() > 0 {
        msgs.push(format!(
            "ERROR: the image has a pending log ({} entries) that needs to be replayed; run: vireo-img check -r all '{}'",
            v.replayed_log_entries(),
            file.display()
        ));
        corruptions += 1;
    } else if fix && v.replayed_log_entries() > 0 {
        msgs.push(format!(
            "Replayed {} pending log entries.",
            v.replayed_log_entries()
        ));
    }
    // Every block must be readable (sector bitmaps, parents).
    if let Err(e) = v.block_status(0, v.virtual_size()) {
        msgs.push(format!("ERROR: {e}"));
        corruptions += 1;
    }
    let leaked = v.leaked_bytes().map_err(|e| e.to_string())?;
    let cluster = 1u64 << 20;
    let mut leaks = leaked.div_ceil(cluster);
    let mut fixed = 0;
    if fix && leaks > 0 {
        v.repair_leaks().map_err(|e| e.to_string())?;
        fixed = leaks;
        leaks = 0;
    }
    v.close().map_err(|e| e.to_string())?;
    report(file, output, corruptions, leaks, fixed, &msgs)
}
