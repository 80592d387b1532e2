//! The control socket's JSON API: one request per line, one reply per line.
//!
//! Requests (`op` names the request):
//! `{"op":"ports"}`, `{"op":"counters","port":"vm1"}`, `{"op":"macs"}`,
//! `{"op":"extensions"}`, `{"op":"acl-list","port":"vm1"}`,
//! `{"op":"acl-add","port":"vm1","rule":{"action":"deny",...}}`,
//! `{"op":"acl-remove","port":"vm1","id":3}`,
//! `{"op":"port-add","spec":"name=vm2,iface=tap1,vlan=10"}`, `{"op":"port-remove","port":"vm2"}`,
//! `{"op":"mirror-set","port":"vm1","to":"mon","direction":"both"}` (direction `in`,
//! `out` or `both`, the default), `{"op":"mirror-clear","port":"vm1"}`,
//! `{"op":"storm-set","port":"vm1","pps":1000}`, `{"op":"storm-clear","port":"vm1"}`,
//! `{"op":"qos-set","port":"vm1","max":"8M:out","rate":"1G","weight":3,"min":"100M"}`
//! (every field but `port` optional: those given replace the port's, rates in bits/s
//! as a number or a string with a k/M/G/T suffix, `max` as `RATE[:in|out|both]`),
//! `{"op":"qos-clear","port":"vm1"}`,
//! `{"op":"trace","port":"vm1"}` (the reply line, then a pcapng stream of the port's
//! frames on the same connection until the client closes it).
//! Replies: `{"ok":true,...}` or `{"ok":false,"error":"one line"}`.

use serde::Deserialize;
use serde_json::{json, Value};
use switch::acl::AclRule;
use switch::mirror::MirrorDirection;
use switch::qos::{check_weight, Cap, QosError, QosSpec, Rate};

/// A request line may be at most this long.
pub const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Ports,
    Counters {
        port: String,
    },
    Macs,
    Extensions,
    AclList {
        port: String,
    },
    AclAdd {
        port: String,
        rule: AclRule,
    },
    AclRemove {
        port: String,
        id: u64,
    },
    PortAdd {
        spec: String,
    },
    PortRemove {
        port: String,
    },
    MirrorSet {
        port: String,
        to: String,
        #[serde(default)]
        direction: MirrorDirection,
    },
    MirrorClear {
        port: String,
    },
    StormSet {
        port: String,
        pps: u64,
    },
    StormClear {
        port: String,
    },
    QosSet {
        port: String,
        #[serde(default)]
        max: Option<Cap>,
        #[serde(default)]
        rate: Option<Rate>,
        #[serde(default)]
        weight: Option<u64>,
        #[serde(default)]
        min: Option<Rate>,
    },
    QosClear {
        port: String,
    },
    /// Turns this connection into a pcapng stream of the port's frames.
    Trace {
        port: String,
    },
}

/// The QoS fields of a `qos-set` request, checked.
pub fn qos_update(
    max: Option<Cap>,
    rate: Option<Rate>,
    weight: Option<u64>,
    min: Option<Rate>,
) -> Result<QosSpec, QosError> {
    Ok(QosSpec {
        max,
        rate,
        weight: weight.map(check_weight).transpose()?,
        min,
    })
}

pub fn parse(line: &[u8]) -> Result<Request, String> {
    serde_json::from_slice(line).map_err(|e| format!("bad request: {e}"))
}

pub fn ok(mut v: Value) -> Value {
    if let Value::Object(m) = &mut v {
        m.insert("ok".into(), Value::Bool(true));
        v
    } else {
        json!({ "ok": true, "result": v })
    }
}

pub fn err(msg: impl std::fmt::Display) -> Value {
    json!({ "ok": false, "error": msg.to_string() })
}
