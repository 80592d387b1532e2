//! The agent's errors. Each variant says what a user needs to act on it, and maps to
//! one HTTP status.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid VM name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("{0}")]
    BadConfig(String),
    #[error("invalid VM definition: {0}")]
    BadDefinition(String),
    #[error("no VM named {0:?}")]
    UnknownVm(String),
    #[error("a VM named {0:?} already exists")]
    Duplicate(String),
    #[error("VM {name:?} is {state}: cannot {action}")]
    WrongState {
        name: String,
        state: String,
        action: &'static str,
    },
    #[error("VM {name:?}: a VMM still answers on {socket} (not this vireod's): not starting a second one over its files")]
    VmmStillRuns { name: String, socket: PathBuf },
    /// The VM was failed over to its replica host and runs there: starting it here
    /// too would be a split brain.
    #[error("VM {name:?} does not start here: {why}")]
    FailedOverElsewhere {
        name: String,
        to: String,
        why: String,
    },
    #[error("VM {name:?} cannot be saved: {why}")]
    NotSavable { name: String, why: &'static str },
    /// The cluster refused (or could not record) a clustered VM's save.
    #[error("VM {name:?} cannot be saved: {source}")]
    ClusterSave {
        name: String,
        #[source]
        source: cluster::saved::SaveError,
    },
    #[error("VM {name:?} failed to start: {reason}")]
    StartFailed { name: String, reason: String },
    /// A definition's network adapter names a switch this vireod does not run.
    #[error("invalid VM definition: nets[{index}] names switch {switch:?}, which this host does not have (vireod --switch; known: {known})")]
    UnknownSwitch {
        index: usize,
        switch: String,
        known: String,
    },
    /// A host switch refused a VM's port (its options, a clash).
    #[error("switch {switch:?} refused port {port}: {reason}")]
    SwitchPort {
        switch: String,
        port: String,
        reason: String,
    },
    #[error("inventory database {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{unit}: {message}")]
    Systemd { unit: String, message: String },
    #[error("no migration {0:?}")]
    UnknownMigration(String),
    #[error("invalid migration request: {0}")]
    BadMigration(String),
    #[error("migration {id}: {reason}")]
    MigrationConflict { id: String, reason: String },
    #[error("VM {name:?} cannot be resized: {reason}")]
    Resize { name: String, reason: String },
    #[error("VMM of {name:?}: {message}")]
    Vmm { name: String, message: String },
    #[error(transparent)]
    NoMigrationPort(#[from] crate::migration_ports::PortsExhausted),
    #[error(
        "every jail uid of --jail-uids {first}-{last} is taken: delete a VM or widen the range"
    )]
    JailIdsExhausted { first: u32, last: u32 },
    #[error("stored definition of {name:?} is unreadable: {source}")]
    Corrupt {
        name: String,
        #[source]
        source: serde_json::Error,
    },
}

impl AgentError {
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        AgentError::Io {
            what,
            path: path.into(),
            source,
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            AgentError::BadName { .. }
            | AgentError::BadDefinition(_)
            | AgentError::BadMigration(_)
            | AgentError::UnknownSwitch { .. }
            | AgentError::Resize { .. } => 400,
            AgentError::UnknownVm(_) | AgentError::UnknownMigration(_) => 404,
            AgentError::Duplicate(_)
            | AgentError::WrongState { .. }
            | AgentError::VmmStillRuns { .. }
            | AgentError::FailedOverElsewhere { .. }
            | AgentError::NotSavable { .. }
            | AgentError::SwitchPort { .. }
            | AgentError::MigrationConflict { .. } => 409,
            AgentError::ClusterSave { source, .. } => match source {
                cluster::saved::SaveError::UnknownVm(_) => 404,
                cluster::saved::SaveError::Store(_) => 503,
                _ => 409,
            },
            AgentError::StartFailed { .. } => 500,
            AgentError::Vmm { .. } => 502,
            AgentError::NoMigrationPort(_) => 503,
            _ => 500,
        }
    }
}

impl From<api::host::ModelError> for AgentError {
    fn from(e: api::host::ModelError) -> Self {
        use api::host::ModelError;
        match e {
            ModelError::BadName { name, reason } => AgentError::BadName { name, reason },
            ModelError::BadDefinition(m) => AgentError::BadDefinition(m),
            ModelError::BadMigration(m) => AgentError::BadMigration(m),
        }
    }
}
