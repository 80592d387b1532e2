//! Live migration of a running VM (pre-copy over the KVM dirty log, shared storage).
//!
//! - [`dirty`]: which pages changed since the last look: KVM's log for vCPU writes,
//!   united with the bitmap our own devices fill when they write guest memory.
//! - [`send`]: the source's thread: memory rounds until the rest fits the downtime
//!   target, then the switch-over (the control loop pauses the VM and hands its disks
//!   over), the last pages, the state, and the commit.
//! - [`receive`]: the destination's thread: memory in, then the VM built from the
//!   state, and resumed only when the source commits.
//!
//! - [`pages`]: dirty pages into Pages frames on one stream (batching, zero runs,
//!   compression, pacing).
//! - [`parallel_send`] / [`parallel_receive`]: several page streams beside the control
//!   stream (`connections` > 1), with a barrier per round at the destination.
//!
//! - [`gate`]: the destination's door: TLS allow-list and proof of the secret on every
//!   stream, strangers refused and counted without breaking the migration.
//! - [`compare`]: the source's guest (its Hello) against this host's configuration.
//! - [`image_size`]: a disk's size from the configuration or its image.
//! - [`tls`]: the API's TLS settings loaded into the transport's TLS configurations.
//!
//! - [`disk`]: live storage migration, a mirror of the old and new image.
//!
//! The protocol and its commit point are in `migration::protocol`.

pub mod compare;
pub mod dirty;
pub mod disk;
pub mod gate;
pub mod image_size;
pub mod pages;
pub mod parallel_receive;
pub mod parallel_send;
pub mod receive;
pub mod remote_disk;
pub mod send;
pub mod tls;

use std::sync::mpsc::Sender;

use crate::vm::Vm;

/// The disks a shared-nothing migration copies: the mirrors and their announcements.
pub type MirroredDisks = Vec<(
    std::sync::Arc<devices::block::Mirror>,
    migration::protocol::DiskBegin,
)>;

/// What migration threads ask of (or tell) the control loop.
pub enum MigrationEvent {
    /// Source: converged. Pause the VM, save its state, release its disks; reply with
    /// the state (JSON) or why not.
    SwitchOver(Sender<Result<Vec<u8>, String>>),
    /// Source: Go was sent (Ok: the destination owns the VM now) or the migration failed
    /// before the commit (Err: resume here).
    SendFinished(Result<(), String>),
    /// Destination: the VM is built (paused); install it, then say so. The flag: it
    /// ran on the source (else it stays paused after the commit).
    Incoming(Box<Vm>, bool, Sender<Result<(), String>>),
    /// Destination: the source committed; run (if it ran on the source).
    IncomingGo,
    /// Destination: failed; discard any copy.
    IncomingFailed(String),
    /// Destination: work the receive thread's filter does not allow (opening
    /// /dev/kvm, disks, taps; KVM ioctls; removing files): it runs here, on the control
    /// thread, and sends its result back itself (receive::on_control).
    OnControl(Box<dyn FnOnce() + Send>),
    /// Shared-nothing source: put a mirror under every disk whose second half sends
    /// writes to this queue; reply with the mirrors (in disk order) and each disk's
    /// announcement for the destination.
    MirrorDisks(
        std::sync::mpsc::Sender<migration::protocol::DiskOp>,
        Sender<Result<MirroredDisks, String>>,
    ),
    /// Storage migration: the copy is done (Ok: switch to the new image) or failed.
    DiskCopied(Result<(), String>),
}
