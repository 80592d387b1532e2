//! `vireoctl vm resize NAME --memory SIZE` and `vm set NAME --dynamic-memory
//! min=..,max=..[,startup=..,buffer=..,weight=..]|off`: a running VM's memory now, and
//! its Dynamic Memory settings.

use agent::model::{DynamicMemory, MemoryStatus};
use api::dynamic_memory::{DEFAULT_BUFFER_PCT, DEFAULT_MEMORY_WEIGHT};

use super::*;

fn size(key: &str, v: &str) -> Result<u64, CtlError> {
    api::config::parse_size(v).ok_or_else(|| {
        CtlError::Usage(format!(
            "--dynamic-memory {key}={v}: expected a size such as 512M or 2G"
        ))
    })
}

fn number(key: &str, v: &str) -> Result<u32, CtlError> {
    v.parse()
        .map_err(|_| CtlError::Usage(format!("--dynamic-memory {key}={v}: expected a number")))
}

/// `--dynamic-memory`'s value over the VM's present settings: `off` (none), or
/// `KEY=VALUE,...` of min, max, startup, buffer, weight (min and max needed unless
/// the VM has them already). vireod checks the result.
pub(crate) fn parse_dynamic_memory(
    s: &str,
    now: Option<&DynamicMemory>,
) -> Result<Option<DynamicMemory>, CtlError> {
    if s == "off" {
        return Ok(None);
    }
    let (mut min, mut max) = (now.map(|d| d.minimum), now.map(|d| d.maximum));
    let mut d = DynamicMemory {
        startup: now.and_then(|d| d.startup),
        minimum: 0,
        maximum: 0,
        buffer: now.map_or(DEFAULT_BUFFER_PCT, |d| d.buffer),
        weight: now.map_or(DEFAULT_MEMORY_WEIGHT, |d| d.weight),
    };
    for kv in s.split(',').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| CtlError::Usage(format!("--dynamic-memory: {kv:?} is not KEY=VALUE")))?;
        match k {
            "min" | "minimum" => min = Some(size(k, v)?),
            "max" | "maximum" => max = Some(size(k, v)?),
            "startup" => d.startup = Some(size(k, v)?),
            "buffer" => d.buffer = number(k, v)?,
            "weight" => d.weight = number(k, v)?,
            _ => {
                return Err(CtlError::Usage(format!(
                "--dynamic-memory: unknown key {k:?} (min, max, startup, buffer, weight, or off)"
            )))
            }
        }
    }
    let (Some(min), Some(max)) = (min, max) else {
        return Err(CtlError::Usage(
            "--dynamic-memory needs min=SIZE and max=SIZE (e.g. min=512M,max=4G)".into(),
        ));
    };
    (d.minimum, d.maximum) = (min, max);
    Ok(Some(d))
}

/// `vm resize NAME --memory SIZE`.
pub(crate) fn resize(ctx: &Ctx, name: &str, memory: &str, out: Output) -> Result<(), CtlError> {
    let bytes = api::config::parse_size(memory)
        .ok_or_else(|| CtlError::Usage(format!("--memory {memory}: expected a size such as 1G")))?;
    let body = serde_json::json!({ "memory": bytes })
        .to_string()
        .into_bytes();
    let v = ctx.json("PUT", &format!("/api/v1/vms/{name}/memory"), Some(body))?;
    match out {
        Output::Json => print_json(&v),
        Output::Table => println!("{name}: memory resize to {} asked for", fmt_size(bytes)),
    }
    Ok(())
}

/// The MEMORY cell of `vm list` and the memory line of `vm info`: assigned (and
/// demand) of a running VM, else what its definition says.
pub(crate) fn memory_cell(st: Option<&MemoryStatus>, def: Option<&VmDefinition>) -> String {
    let mib = |b: u64| format!("{}M", b >> 20);
    match (st, def) {
        (Some(m), _) => match m.demand_bytes {
            Some(d) => format!("{} (demand {})", mib(m.assigned_bytes), mib(d)),
            None => mib(m.assigned_bytes),
        },
        (None, Some(d)) => match &d.dynamic_memory {
            Some(dm) => format!("{}..{}", mib(dm.minimum), mib(dm.maximum)),
            None => fmt_size(d.config.memory.size),
        },
        (None, None) => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_memory_flags_parse_over_the_present_settings() {
        let d = parse_dynamic_memory("min=512M,max=4G", None)
            .unwrap()
            .unwrap();
        assert_eq!((d.minimum, d.maximum), (512 << 20, 4 << 30));
        assert_eq!((d.buffer, d.weight, d.startup), (20, 5000, None));
        let d2 = parse_dynamic_memory("weight=9000,buffer=50", Some(&d))
            .unwrap()
            .unwrap();
        assert_eq!((d2.minimum, d2.weight, d2.buffer), (512 << 20, 9000, 50));
        assert_eq!(parse_dynamic_memory("off", Some(&d)).unwrap(), None);
        for bad in [
            "min=512M",
            "min=lots,max=1G",
            "min=1G,max=2G,colour=red",
            "x",
        ] {
            assert!(parse_dynamic_memory(bad, None).is_err(), "{bad}");
        }
    }
}
