//! Which VMs a bulk request names: a list of names, or a selector of `KEY=VALUE` terms
//! that must all match.

use crate::failover::Snapshot;
use crate::keys::{Priority, VmDefinition};

use super::plan::running_on;
use super::BulkError;

/// One term of a selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Term {
    Priority(Priority),
    /// The node that runs the VM now.
    Node(String),
    /// The VM's anti-affinity class.
    Class(String),
}

/// `KEY=VALUE[,KEY=VALUE]...`: every term must match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    pub text: String,
    pub terms: Vec<Term>,
}

impl Selector {
    pub fn parse(text: &str) -> Result<Selector, BulkError> {
        let bad = |why: String| BulkError::BadSelector {
            selector: text.to_string(),
            why,
        };
        let mut terms = Vec::new();
        for part in text.split(',').map(str::trim) {
            let Some((k, v)) = part.split_once('=') else {
                return Err(bad(format!("{part:?} is not KEY=VALUE")));
            };
            let (k, v) = (k.trim(), v.trim());
            if v.is_empty() {
                return Err(bad(format!("{k} has no value")));
            }
            terms.push(match k {
                "priority" => Term::Priority(v.parse().map_err(bad)?),
                "node" => Term::Node(v.to_string()),
                "class" => Term::Class(v.to_string()),
                other => return Err(BulkError::UnknownKey(other.to_string())),
            });
        }
        Ok(Selector {
            text: text.to_string(),
            terms,
        })
    }

    fn matches(&self, snap: &Snapshot, def: &VmDefinition) -> bool {
        self.terms.iter().all(|t| match t {
            Term::Priority(p) => def.priority == *p,
            Term::Node(n) => running_on(snap, &def.name).is_some_and(|on| on == n),
            Term::Class(c) => def.anti_affinity.as_deref() == Some(c.as_str()),
        })
    }
}

/// Which VMs a request is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    Names(Vec<String>),
    Selector(Selector),
}

impl Selection {
    pub(super) fn text(&self) -> String {
        match self {
            Selection::Names(n) => n.join(","),
            Selection::Selector(s) => s.text.clone(),
        }
    }

    /// The selected VMs, by name. Unknown names refuse the request; so does a selector
    /// that matches nothing.
    pub fn select(&self, snap: &Snapshot) -> Result<Vec<String>, BulkError> {
        match self {
            Selection::Names(names) => {
                let unknown: Vec<String> = names
                    .iter()
                    .filter(|n| !snap.vms.contains_key(*n))
                    .cloned()
                    .collect();
                if !unknown.is_empty() {
                    return Err(BulkError::UnknownVms(unknown));
                }
                let mut v = names.clone();
                v.sort();
                v.dedup();
                Ok(v)
            }
            Selection::Selector(s) => {
                let v: Vec<String> = snap
                    .vms
                    .values()
                    .filter(|d| s.matches(snap, d))
                    .map(|d| d.name.clone())
                    .collect();
                if v.is_empty() {
                    return Err(BulkError::NoneSelected(s.text.clone()));
                }
                Ok(v)
            }
        }
    }
}
