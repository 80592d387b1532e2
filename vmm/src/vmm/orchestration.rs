//! The control loop's side of live migration and live storage migration: it starts
//! sends and receives (`vm.send-migration`, `vm.receive-migration`,
//! `vm.migrate-disk`), switches over, and applies their outcomes (`MigrationEvent`) to
//! the VM — a failed send leaves the VM running here. The protocol, the page and disk
//! copies run in `crate::live`'s threads.

use std::sync::Arc;
use vireo_util::sync;

use api::{
    ApiError, MigrationInfo, MigrationStatus, ReceiveMigrationRequest, SendMigrationRequest,
    VmState,
};

use super::{api_error, error_chain, Vmm};
use crate::control::VmmExit;
use crate::live::{receive, send, MigrationEvent};

/// The refusal of `vm.create`, `vm.restore` and `vm.boot` while a migration is
/// awaited or received.
pub(super) const RECEIVING: &str =
    "this VMM is receiving a migration (vm.receive-migration): its VM is the one that arrives; create, restore or boot a VM after the migration ended (vm.migration-info)";

impl Vmm {
    /// The figures `vm.migration-info` reports (the last send's or receive's).
    pub fn migration_info(&self) -> MigrationInfo {
        sync::lock(&self.migration).clone()
    }

    /// Whether this VMM waits for (or takes in) a migration: its VM is the one that
    /// arrives, so nothing may create another meanwhile.
    pub(super) fn receiving(&self) -> bool {
        self.migration_info().status == MigrationStatus::Receiving
    }

    fn migration_busy(&self) -> bool {
        matches!(
            self.migration_info().status,
            MigrationStatus::Sending | MigrationStatus::Receiving
        )
    }

    fn set_migration(&self, info: MigrationInfo) {
        *sync::lock(&self.migration) = info;
    }

    /// Starts sending the running (or paused) VM to a listening destination.
    pub(super) fn send_migration(&mut self, r: &SendMigrationRequest) -> Result<(), ApiError> {
        // The same rule as the receive side: a unix socket beneath a storage root or in
        // a `--socket-dir` (vireod passes its own and its configured peers' `vms/`).
        crate::confinement::check_url(&r.destination_url)
            .map_err(|e| ApiError::bad_request(format!("destination_url: {e}")))?;
        let url: migration::transport::MigrationUrl =
            r.destination_url
                .parse()
                .map_err(|e: migration::transport::TransportError| {
                    ApiError::bad_request(e.to_string())
                })?;
        tcp_by_address(&url, "destination_url")?;
        let connections = r.connections.unwrap_or(1);
        if !(1..=migration::protocol::MAX_CONNECTIONS).contains(&connections) {
            return Err(ApiError::bad_request(format!(
                "connections must be 1..={}, got {connections}",
                migration::protocol::MAX_CONNECTIONS
            )));
        }
        let tls = r
            .tls
            .as_ref()
            .map(|t| crate::live::tls::client(t, &url))
            .transpose()
            .map_err(ApiError::bad_request)?;
        let secret =
            crate::live::tls::policy(&url, r.tls.is_some(), r.insecure, r.secret.as_deref())
                .map_err(ApiError::bad_request)?;
        if self.migration_busy() {
            return Err(ApiError::conflict("a migration is already in progress"));
        }
        if self.disk_migration.is_some() {
            return Err(ApiError::conflict(
                "a storage migration is in progress; migrate the VM after it",
            ));
        }
        let seccomp = self.seccomp.clone();
        let events = self.events_tx.clone();
        let info = self.migration.clone();
        let vm = self.vm_mut()?;
        if let Some(why) = vm.devices().migration_blocker() {
            return Err(ApiError::conflict(format!("cannot migrate this VM: {why}")));
        }
        if !matches!(vm.state(), VmState::Running | VmState::Paused) {
            return Err(ApiError::conflict(format!(
                "cannot migrate a VM that is {:?}",
                vm.state()
            )));
        }
        let config =
            serde_json::to_value(vm.config()).map_err(|e| ApiError::internal(e.to_string()))?;
        let shape = migration::protocol::GuestShape {
            disk_sizes: vm
                .config()
                .disks
                .iter()
                .map(crate::live::image_size::of)
                .collect::<Result<_, _>>()
                .map_err(ApiError::internal)?,
            cpuid: vm.cpu_features().map_err(api_error)?,
        };
        vm.set_dirty_logging(true).map_err(api_error)?;
        let (mem, vmfd) = vm.memory_and_vm();
        let manual_dirty_log = vm.manual_dirty_log();
        let (throttle, vcpu_threads) = vm.throttle();
        self.copying_storage = r.copy_storage;
        self.set_migration(MigrationInfo {
            status: MigrationStatus::Sending,
            ..Default::default()
        });
        let job = send::SendJob {
            url,
            tls,
            secret,
            shape,
            connections,
            downtime: std::time::Duration::from_millis(r.downtime_ms.unwrap_or(50)),
            compress: r.compress,
            copy_storage: r.copy_storage,
            bandwidth_limit: r.bandwidth_mib_s.map(|m| m << 20),
            config,
            mem,
            vm: vmfd,
            events,
            info,
            seccomp,
            throttle,
            vcpu_threads,
            manual_dirty_log,
        };
        send::spawn(job).map_err(|e| {
            self.set_migration(MigrationInfo::default());
            ApiError::internal(format!("cannot start the migration thread: {e}"))
        })
    }

    /// Starts moving disk `r.id` to a new image while the VM runs (see `live::disk`).
    pub(super) fn migrate_disk(&mut self, r: &api::MigrateDiskRequest) -> Result<(), ApiError> {
        use api::config::DiskFormat;
        use devices::block::Mirror;
        crate::confinement::check(&r.destination)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        if self.disk_migration.is_some() {
            return Err(ApiError::conflict(
                "a storage migration is already in progress",
            ));
        }
        if self.migration_busy() {
            return Err(ApiError::conflict("a live migration is in progress"));
        }
        let events = self.events_tx.clone();
        let seccomp = self.seccomp.clone();
        let vm = self.vm_mut()?;
        if !matches!(vm.state(), VmState::Running | VmState::Paused) {
            return Err(ApiError::conflict(format!(
                "cannot migrate a disk of a VM that is {:?}",
                vm.state()
            )));
        }
        let disks = &vm.config().disks;
        let index = disks
            .iter()
            .enumerate()
            .position(|(i, d)| d.id.clone().unwrap_or_else(|| format!("disk{i}")) == r.id)
            .ok_or_else(|| ApiError::not_found(format!("no disk '{}'", r.id)))?;
        let source = disks[index].clone();
        if source.readonly {
            return Err(ApiError::bad_request(format!(
                "disk '{}' is read-only",
                r.id
            )));
        }
        if source.replica_log.is_some() {
            return Err(ApiError::conflict(format!(
                "disk '{}' is replicated (replica_log): moving a replicated disk is not supported yet",
                r.id
            )));
        }
        if r.destination.exists() {
            return Err(ApiError::bad_request(format!(
                "{} exists (storage migration creates a new image)",
                r.destination.display()
            )));
        }
        let format = match r.format.as_deref() {
            Some(f) => f.parse::<DiskFormat>().map_err(ApiError::bad_request)?,
            None => source.effective_format(),
        };
        let src = vm
            .devices()
            .with_block(&r.id, |b| Ok(b.backend()))
            .map_err(ApiError::internal)?;
        crate::confinement::create_image(
            &r.destination,
            format,
            src.size(),
            src.logical_block_size(),
            src.physical_block_size(),
        )
        .map_err(|e| ApiError::bad_request(format!("cannot create the new image: {e}")))?;
        let destination = api::config::DiskConfig {
            path: r.destination.clone(),
            format: Some(format),
            ..source.clone()
        };
        let started = (|| {
            let dst = crate::device_manager::open_disk(&destination).map_err(|e| e.to_string())?;
            let dst = crate::device_manager::under_lease(dst, vm.devices().write_lease.as_ref());
            let mirror = Arc::new(Mirror::new(src, dst).map_err(|e| e.to_string())?);
            vm.devices().with_block(&r.id, |b| {
                b.replace_backend(mirror.clone(), None)
                    .map(drop)
                    .map_err(|e| e.to_string())
            })?;
            Ok::<_, String>(mirror)
        })();
        let mirror = match started {
            Ok(m) => m,
            Err(e) => {
                let _ = crate::confinement::remove_file(&r.destination);
                return Err(ApiError::internal(format!("cannot start the mirror: {e}")));
            }
        };
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        *sync::lock(&self.disk_info) = api::DiskMigrationInfo {
            status: MigrationStatus::Sending,
            id: Some(r.id.clone()),
            destination: Some(r.destination.clone()),
            total_bytes: mirror.size_bytes(),
            ..Default::default()
        };
        crate::live::disk::spawn_copy(crate::live::disk::CopyJob {
            mirror: mirror.clone(),
            cancel: cancel.clone(),
            info: self.disk_info.clone(),
            events,
            seccomp,
        })
        .map_err(|e| ApiError::internal(format!("cannot start the copy thread: {e}")))?;
        self.disk_migration = Some(crate::live::disk::DiskMigration {
            id: r.id.clone(),
            index,
            source,
            destination,
            delete_source: r.delete_source,
            mirror,
            cancel,
        });
        tracing::info!(disk = %r.id, to = %r.destination.display(), "storage migration started");
        Ok(())
    }

    /// The copy ended: switch to the new image, or back to the old one.
    fn disk_copied(&mut self, result: Result<(), String>) -> Option<VmmExit> {
        let m = self.disk_migration.take()?;
        let vm = self.vm.as_mut()?;
        let result = result.and_then(|()| {
            let reopen =
                crate::device_manager::reopen_for(&m.destination, vm.devices().write_lease.clone())
                    .map_err(|e| format!("keeping the new image open: {e}"))?;
            vm.devices().with_block(&m.id, |b| {
                b.replace_backend(m.mirror.destination(), Some(reopen))
                    .map(drop)
                    .map_err(|e| format!("switching to the new image: {e}"))
            })
        });
        match &result {
            Ok(()) => {
                vm.set_disk(m.index, m.destination.clone());
                drop(m.mirror);
                tracing::info!(disk = %m.id, path = %m.destination.path.display(), "storage migration done");
                if m.delete_source {
                    if let Err(e) = crate::confinement::remove_file(&m.source.path) {
                        tracing::warn!(error = %e, path = %m.source.path.display(), "cannot delete the old image");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(disk = %m.id, error = %e, "storage migration abandoned; the disk stays on its image");
                let back = vm.devices().with_block(&m.id, |b| {
                    b.replace_backend(m.mirror.source(), None)
                        .map(drop)
                        .map_err(|e| e.to_string())
                });
                if let Err(e) = back {
                    return Some(VmmExit::Crashed(format!(
                        "cannot put disk {} back on its image: {e}",
                        m.id
                    )));
                }
                drop(m.mirror);
                let _ = crate::confinement::remove_file(&m.destination.path);
            }
        }
        crate::live::disk::finish(&self.disk_info, &result);
        None
    }

    /// Listens for a source; the VM arrives paused and runs when the source commits.
    pub(super) fn receive_migration(
        &mut self,
        r: &ReceiveMigrationRequest,
    ) -> Result<(), ApiError> {
        crate::confinement::check_url(&r.receiver_url)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        if let Some(dir) = &r.storage_dir {
            crate::confinement::open_dir(dir).map_err(|e| ApiError::bad_request(e.to_string()))?;
        }
        let url: migration::transport::MigrationUrl =
            r.receiver_url
                .parse()
                .map_err(|e: migration::transport::TransportError| {
                    ApiError::bad_request(e.to_string())
                })?;
        tcp_by_address(&url, "receiver_url")?;
        if self.vm.is_some() {
            return Err(ApiError::conflict("a VM already exists in this VMM"));
        }
        if self.migration_busy() {
            return Err(ApiError::conflict("a migration is already in progress"));
        }
        let mut config = r.config.as_deref().cloned().ok_or_else(|| {
            ApiError::bad_request(
                "vm.receive-migration needs config: the VM to run here, as vm.create takes it",
            )
        })?;
        if let Some(s) = &self.serial_override {
            config.serial = s.clone();
        }
        config
            .validate()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let tls = r
            .tls
            .as_ref()
            .map(crate::live::tls::server)
            .transpose()
            .map_err(ApiError::bad_request)?;
        let secret =
            crate::live::tls::policy(&url, r.tls.is_some(), r.insecure, r.secret.as_deref())
                .map_err(ApiError::bad_request)?;
        // Shared storage: the images are here already; shared-nothing: the
        // configuration declares the sizes (the copies are made so).
        let disk_sizes = config
            .disks
            .iter()
            .map(|d| crate::live::image_size::of(d).ok())
            .collect();
        let listener = url
            .listen_with(tls)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        self.set_migration(MigrationInfo {
            status: MigrationStatus::Receiving,
            ..Default::default()
        });
        self.incoming_lease = config
            .write_lease
            .as_ref()
            .map(|l| Arc::new(devices::block::WriteLease::new(l.deadline_monotonic_ns)));
        receive::spawn(receive::ReceiveJob {
            write_lease: self.incoming_lease.clone(),
            listener,
            config,
            disk_sizes,
            secret,
            timeout: std::time::Duration::from_secs(r.timeout_s.unwrap_or(300)),
            storage_dir: r.storage_dir.clone(),
            events: self.events_tx.clone(),
            info: self.migration.clone(),
            seccomp: self.seccomp.clone(),
        })
        .map_err(|e| ApiError::internal(format!("cannot start the migration thread: {e}")))
    }

    /// Pauses the VM, saves its state and hands its disks over; on any failure the VM
    /// is put back as it was.
    fn switch_over(&mut self) -> Result<Vec<u8>, String> {
        let vm = self.vm.as_mut().ok_or("the VM is gone")?;
        let was_running = vm.state() == VmState::Running;
        if was_running {
            vm.pause().map_err(|e| error_chain(&e))?;
        }
        self.resume_if_migration_fails = was_running;
        let state = vm
            .saved_state()
            .map(|s| crate::vm::SavedVm {
                running: was_running,
                ..s
            })
            .map_err(|e| error_chain(&e))
            .and_then(|s| serde_json::to_vec(&s).map_err(|e| e.to_string()))?;
        // Shared storage changes hands; copied storage stays here, untouched.
        if !self.copying_storage {
            vm.detach_storage().map_err(|e| error_chain(&e))?;
        }
        Ok(state)
    }

    /// Shared-nothing: a mirror under every disk, its second half the migration queue.
    fn mirror_disks(
        &mut self,
        ops: std::sync::mpsc::Sender<migration::protocol::DiskOp>,
    ) -> Result<crate::live::MirroredDisks, String> {
        use devices::block::{BlockBackend, Mirror};
        let vm = self.vm.as_ref().ok_or("the VM is gone")?;
        let mut out = Vec::new();
        for (i, d) in vm.config().disks.iter().enumerate() {
            let id = d.id.clone().unwrap_or_else(|| format!("disk{i}"));
            let format = d.effective_format();
            let name = d
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| format!("{id}.img"));
            let mirror = vm.devices().with_block(&id, |b| {
                let src = b.backend();
                let remote =
                    crate::live::remote_disk::RemoteDisk::new(i as u32, src.as_ref(), ops.clone());
                let m = Arc::new(Mirror::new(src, Arc::new(remote)).map_err(|e| e.to_string())?);
                b.replace_backend(m.clone(), None)
                    .map_err(|e| e.to_string())?;
                Ok(m)
            })?;
            let begin = migration::protocol::DiskBegin {
                index: i as u32,
                name,
                format: format.to_string(),
                size: mirror.size_bytes(),
                logical_sector: mirror.logical_block_size(),
                physical_sector: mirror.physical_block_size(),
            };
            self.remote_mirrors.push((id, mirror.clone()));
            out.push((mirror, begin));
        }
        Ok(out)
    }

    /// Takes every shared-nothing mirror away again (the migration failed).
    fn unmirror_disks(&mut self) -> Result<(), String> {
        let mirrors = std::mem::take(&mut self.remote_mirrors);
        let Some(vm) = self.vm.as_ref() else {
            return Ok(());
        };
        for (id, m) in mirrors {
            vm.devices().with_block(&id, |b| {
                b.replace_backend(m.source(), None)
                    .map(drop)
                    .map_err(|e| e.to_string())
            })?;
        }
        Ok(())
    }

    /// After a failed send: disks back, dirty logging off, the guest running again.
    fn recover_from_failed_send(&mut self) -> Result<(), String> {
        let resume = std::mem::take(&mut self.resume_if_migration_fails);
        self.unmirror_disks()?;
        self.copying_storage = false;
        let Some(vm) = self.vm.as_mut() else {
            return Ok(());
        };
        vm.reattach_storage().map_err(|e| error_chain(&e))?;
        if let Err(e) = vm.set_dirty_logging(false) {
            tracing::warn!(error = %error_chain(&e), "cannot turn the dirty log off");
        }
        if resume && vm.state() == VmState::Paused {
            vm.resume().map_err(|e| error_chain(&e))?;
        }
        Ok(())
    }

    pub(super) fn handle_migration(&mut self, ev: MigrationEvent) -> Option<VmmExit> {
        match ev {
            MigrationEvent::SwitchOver(reply) => {
                let r = self.switch_over();
                if let Err(e) = &r {
                    tracing::warn!(error = %e, "switch-over failed; the VM stays here");
                    if let Err(e) = self.recover_from_failed_send() {
                        return Some(VmmExit::Crashed(format!("cannot recover the VM: {e}")));
                    }
                }
                let _ = reply.send(r);
                None
            }
            MigrationEvent::SendFinished(Ok(())) => {
                tracing::info!("VM migrated; this VMM stops");
                Some(VmmExit::Migrated)
            }
            MigrationEvent::SendFinished(Err(e)) => {
                {
                    let mut i = self.migration.lock().unwrap_or_else(|p| p.into_inner());
                    i.status = MigrationStatus::Failed;
                    i.error = Some(e);
                }
                match self.recover_from_failed_send() {
                    Ok(()) => None,
                    Err(e) => Some(VmmExit::Crashed(format!("cannot recover the VM: {e}"))),
                }
            }
            MigrationEvent::Incoming(vm, running, reply) => {
                let r = if self.vm.is_some() {
                    Err("a VM already exists in this VMM".to_string())
                } else {
                    // Renewals taken while the VM was built went to the incoming lease;
                    // the VM has not run yet, so its own lease is still unused.
                    if let (Some(arrived), Some(own)) =
                        (&self.incoming_lease, vm.devices().write_lease.as_ref())
                    {
                        let now = devices::block::monotonic_ns();
                        let (arrived_ahead_ms, arrived_renewed_ms_ago) = arrived.timing_ms(now);
                        let taken = own.renew_unused(arrived.deadline_ns());
                        let (ahead_ms, _) = own.timing_ms(now);
                        tracing::info!(
                            arrived_ahead_ms,
                            arrived_renewed_ms_ago,
                            ahead_ms,
                            taken = taken.is_ok(),
                            "the arrived VM takes the write lease renewed while it arrived"
                        );
                    }
                    self.vm = Some(*vm);
                    self.incoming_lease = None;
                    self.run_incoming_on_go = running;
                    Ok(())
                };
                let _ = reply.send(r);
                None
            }
            MigrationEvent::IncomingGo if !self.run_incoming_on_go => {
                tracing::info!("incoming VM here, paused as it was on the source");
                None
            }
            MigrationEvent::IncomingGo => {
                let r = self.vm.as_mut().map(|vm| vm.resume());
                match r {
                    Some(Ok(())) => {
                        tracing::info!("incoming VM running");
                        None
                    }
                    Some(Err(e)) => Some(VmmExit::Crashed(format!(
                        "cannot resume the migrated VM: {}",
                        error_chain(&e)
                    ))),
                    None => Some(VmmExit::Crashed("the migrated VM is gone".into())),
                }
            }
            MigrationEvent::DiskCopied(result) => self.disk_copied(result),
            MigrationEvent::MirrorDisks(ops, reply) => {
                let r = self.mirror_disks(ops);
                if r.is_err() {
                    let _ = self.unmirror_disks();
                }
                let _ = reply.send(r);
                None
            }
            MigrationEvent::OnControl(job) => {
                job();
                None
            }
            MigrationEvent::IncomingFailed(e) => {
                tracing::warn!(error = %e, "incoming migration failed; discarding the copy");
                self.incoming_lease = None;
                if let Some(mut vm) = self.vm.take() {
                    let _ = vm.shutdown();
                }
                None
            }
        }
    }
}

/// A TCP migration URL must name an address (`tcp:IP:PORT`): resolving a host name
/// reads `/etc/hosts` and `/etc/nsswitch.conf` and may query DNS, which no thread of a
/// confined VMM may do (the control thread opens no file, the file thread makes no
/// socket). vireod resolves its peers' names before it asks.
fn tcp_by_address(url: &migration::transport::MigrationUrl, field: &str) -> Result<(), ApiError> {
    match url {
        migration::transport::MigrationUrl::Tcp(a) if a.parse::<std::net::SocketAddr>().is_err() => {
            Err(ApiError::bad_request(format!(
                "{field} tcp:{a}: name an address (tcp:IP:PORT); this VMM does not resolve host names"
            )))
        }
        _ => Ok(()),
    }
}
