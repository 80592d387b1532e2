//! The destination's side of a migration between two vireods.
//!
//! `POST /api/v1/migrations/incoming` (from the source's vireod) defines the VM here
//! (state Incoming), starts a `vireo` with no VM (`--serial file=<this host's serial
//! log>`), has it listen (`vm.receive-migration`) and answers with the record, whose
//! `receiver_url` the source's VMM connects to. A task then follows the receiving
//! VMM: once its `vm.migration-info` says completed and `vm.info` shows the VM, the
//! VM is this host's (Running, its VMM supervised like any other, event `migrated`).
//! If the migration fails, is cancelled (`DELETE /api/v1/migrations/{id}`, which the
//! source sends when its side fails), no source connects within
//! `--incoming-timeout-s`, or the receiver dies, the receiver is stopped and the
//! definition removed: the VM was never here.
//!
//! From a peer host (the request came over the peer listener, mutual TLS): the record's
//! source is the host name the peer's certificate proved (not what the body says), only
//! that peer may read or cancel it, and vireod listens with TLS (this host's identity;
//! it requires the source host's certificate from the CA) on TCP — on a port of
//! `--migration-ports` (held until the migration ends), or by default on a free port
//! of the peer listener's address — and carries each admitted stream to the receiving
//! VMM's unix socket in its run directory (`crate::tls_gateway`): the host's key never
//! reaches a VMM.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{info, warn};

use super::{lock, mkdir, Supervisor, Vm, VMM_TIMEOUT};
use crate::client;
use crate::launcher::LaunchSpec;
use crate::model::{
    validate_name, IncomingRequest, MigrationDirection, MigrationRecord, MigrationState, VmState,
};
use crate::{error_chain, now_ms, AgentError};

const POLL: Duration = Duration::from_millis(100);

/// Every how many unanswered polls of a receiving VMM a warning says so (about 5 s).
const UNANSWERED_REPORT: u32 = 50;

/// What a cluster node checks of every incoming VM before anything is made for it: a
/// clustered VM arrives only by a move the cluster recorded, from that move's source
/// host, and runs here under this node's fencing token and write lease (the
/// definition the source sent carries the source's).
pub trait IncomingGuard: Send + Sync {
    /// Refuses the VM, or adjusts `def` for this host. `from_peer`: the host name the
    /// source's certificate proved (None: a client of the unix socket).
    fn admit<'a>(
        &'a self,
        name: &'a str,
        def: &'a mut crate::model::VmDefinition,
        from_peer: Option<&'a str>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), AgentError>> + Send + 'a>>;
}

/// How an incoming migration ended.
enum Arrival {
    /// The VM runs here, in this state.
    Arrived(VmState),
    Failed(String),
    Cancelled,
}

impl Supervisor {
    /// Checks every path an arriving VM's definition names (and the `storage_dir` of a
    /// shared-nothing migration) against the storage roots — against the peer's own
    /// storage when it has one (`--peer-storage`) — and, on a replica server, against
    /// the other primaries' replicas (see [`crate::peer_scope`]).
    fn confine_arrival(
        &self,
        req: &mut IncomingRequest,
        from_peer: Option<&str>,
    ) -> Result<(), AgentError> {
        let scope = from_peer.and_then(|p| self.peer_scopes.of(p));
        let roots = scope.unwrap_or(&self.roots);
        let vm_dir = self.vm_dir(&req.name);
        let confined = match &req.storage_dir {
            Some(dir) => roots
                .open_dir(dir)
                .map_err(|e| AgentError::BadMigration(format!("storage_dir: {e}")))
                .and_then(|_| {
                    crate::confinement::confine_incoming_copy(
                        roots,
                        &vm_dir,
                        &mut req.definition,
                        dir,
                    )
                }),
            None => crate::confinement::confine_definition(roots, &vm_dir, &mut req.definition),
        };
        if let (Err(e), Some(peer)) = (&confined, from_peer.filter(|_| scope.is_some())) {
            return Err(AgentError::BadMigration(format!(
                "{e} (peer {peer} may name files only beneath its --peer-storage)"
            )));
        }
        confined?;
        if let (Some(area), Some(peer)) = (&self.replica_area, from_peer) {
            area.refuse_others(&req.definition, req.storage_dir.as_deref(), peer)?;
        }
        if let Some(dir) = &req.storage_dir {
            if self.cfg.jail_uids.is_some() {
                // The jail gives it to the VM's uid: it must hold nothing of anyone else.
                let empty = std::fs::read_dir(dir)
                    .map(|mut d| d.next().is_none())
                    .unwrap_or(false);
                if !empty {
                    return Err(AgentError::BadMigration(format!(
                        "storage_dir {}: must be an empty directory (a jailed VMM gets it as its own)",
                        dir.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Defines the VM and starts its receiving VMM; returns the record with the
    /// receiver's URL. `from_peer`: the peer host whose certificate the request came
    /// with (None: a client of the unix socket).
    pub async fn incoming(
        self: &Arc<Self>,
        req: IncomingRequest,
        from_peer: Option<String>,
    ) -> Result<MigrationRecord, AgentError> {
        let mut req = req;
        validate_name(&req.name)?;
        if let Some(guard) = self.incoming_guard.get() {
            guard
                .admit(&req.name, &mut req.definition, from_peer.as_deref())
                .await?;
        }
        req.definition.validate()?;
        self.confine_arrival(&mut req, from_peer.as_deref())?;
        let others: Vec<(String, crate::model::VmDefinition)> = lock(&self.vms)
            .iter()
            .filter(|(n, _)| **n != req.name)
            .map(|(n, vm)| (n.clone(), vm.def.clone()))
            .collect();
        crate::confinement::refuse_other_vms_disks(&req.definition, &others)?;
        let name = req.name.clone();
        // A port of --migration-ports is held until this migration ends (the lease
        // goes with the task that follows it, or is dropped on an early return).
        let mut port = None;
        // The receiver's TCP port as vireod bound it when choosing it (a port of the
        // range, or a free one): the gateway listens on that very socket.
        let mut bound = None;
        let url = match (&req.receiver_url, &from_peer) {
            (Some(u), Some(_)) if u.starts_with("tcp:") => {
                if let Some(pool) = &self.cfg.migration_ports {
                    return Err(AgentError::BadMigration(format!(
                        "receiver_url {u:?}: a peer does not choose the port; this host's \
                         receivers listen on --migration-ports {}",
                        pool.range()
                    )));
                }
                u.clone()
            }
            (Some(u), _) => u.clone(),
            (None, Some(_)) => match &self.cfg.migration_ports {
                Some(pool) => {
                    let mut lease = pool.lease(self.receiver_ip())?;
                    let url = format!("tcp:{}", lease.addr());
                    bound = lease.take_listener();
                    port = Some(lease);
                    url
                }
                None => {
                    let (url, listener) = self.free_receiver_port()?;
                    bound = Some(listener);
                    url
                }
            },
            (None, None) => format!("unix:{}", self.migrate_socket_path(&name).display()),
        };
        if !(url.starts_with("unix:") || url.starts_with("tcp:")) {
            return Err(AgentError::BadMigration(format!(
                "receiver_url {url:?}: expected unix:/path or tcp:host:port"
            )));
        }
        crate::confinement::check_receiver_url(&url, &self.vm_run_dir(&name))?;
        let tls = match &from_peer {
            Some(_) if !url.starts_with("tcp:") => {
                return Err(AgentError::BadMigration(format!(
                    "receiver_url {url:?}: a migration from a peer host arrives over TCP"
                )))
            }
            Some(peer) => Some(self.receive_tls(peer)?),
            None if url.starts_with("tcp:") && !(req.insecure && req.secret.is_some()) => {
                return Err(AgentError::BadMigration(format!(
                    "receiver_url {url:?}: a TCP migration without mutual TLS needs insecure: true and a secret"
                )))
            }
            None => None,
        };
        let peer = match &from_peer {
            Some(host) => host.clone(),
            None => req
                .source
                .clone()
                .unwrap_or_else(|| "unknown source".into()),
        };
        let (rec, cancel, generation) = {
            let mut vms = lock(&self.vms);
            if vms.contains_key(&name) {
                return Err(AgentError::Duplicate(name));
            }
            let (rec, cancel) =
                self.migrations
                    .create(&name, MigrationDirection::Incoming, peer.clone())?;
            let rec = match &from_peer {
                Some(host) => self
                    .migrations
                    .update(&rec.id, |r| r.peer_host = Some(host.clone()))
                    .unwrap_or(rec),
                None => rec,
            };
            if let Err(e) = lock(&self.inv).insert(&name, &req.definition, now_ms()) {
                self.migrations.update(&rec.id, |r| {
                    r.state = MigrationState::Failed;
                    r.error = Some(error_chain(&e));
                    r.finished_at_ms = Some(now_ms());
                });
                return Err(e);
            }
            self.note_saved_area(&name, &req.definition);
            let mut vm = Vm::new(req.definition.clone());
            vm.migration = Some(rec.id.clone());
            vm.generation = self
                .generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let generation = vm.generation;
            vms.insert(name.clone(), vm);
            (rec, cancel, generation)
        };
        self.emit(
            &name,
            "defined",
            Some(format!("incoming migration {}", rec.id)),
        );
        self.set_state_of(
            &name,
            VmState::Incoming,
            Some(format!("migration {} from {peer}", rec.id)),
        );
        self.save_record(&rec);
        let gateway = match self
            .start_receiver(&name, generation, &url, &req, tls, bound)
            .await
        {
            Ok(g) => g,
            Err(e) => {
                let msg = error_chain(&e);
                warn!(vm = %name, error = %msg, "incoming migration: receiver did not start");
                self.end_incoming(&rec.id, &name, Arrival::Failed(msg))
                    .await;
                return Err(e);
            }
        };
        let rec = self
            .record(&rec.id, |r| r.receiver_url = Some(url.clone()))
            .unwrap_or(rec);
        let me = self.clone();
        let (id, n) = (rec.id.clone(), name.clone());
        tokio::spawn(async move {
            let stats = gateway.as_ref().map(|g| g.stats());
            me.follow_incoming(id, n, cancel, stats).await;
            // The migration ended: the gateway stops, its port is free again.
            drop(gateway);
            drop(port);
        });
        info!(vm = %name, id = %rec.id, url = %url, "waiting for an incoming VM");
        Ok(rec)
    }

    /// The configuration the receiving VMM runs the VM with: the definition, with this
    /// host's serial log and console file (as a start here would have them). The
    /// source's VMM sends only the guest's state; its configuration is compared with
    /// this one, never used.
    fn receive_config(&self, name: &str, def: &crate::model::VmDefinition) -> api::VmConfig {
        let mut cfg = def.config.clone();
        cfg.serial = api::config::OutputConfig::File(self.serial_path(name));
        if let api::config::OutputConfig::File(_) = cfg.console {
            cfg.console = api::config::OutputConfig::File(self.vm_dir(name).join("console.log"));
        }
        cfg
    }

    /// Spawns the receiving VMM and has it listen on `url`; with `tls` (a peer host's
    /// migration), vireod listens on `url` itself (on `bound` if it bound it already)
    /// and carries the admitted streams to the VMM's own socket (see tls_gateway).
    async fn start_receiver(
        self: &Arc<Self>,
        name: &str,
        generation: u64,
        url: &str,
        req: &IncomingRequest,
        tls: Option<migration::tls::ServerTls>,
        bound: Option<std::net::TcpListener>,
    ) -> Result<Option<crate::tls_gateway::Gateway>, AgentError> {
        let mut spec = LaunchSpec {
            memory: Some(req.definition.config.memory.size),
            ..self.receive_spec(name)
        };
        mkdir(&self.vm_dir(name), 0o750)?;
        mkdir(&self.vm_run_dir(name), 0o700)?;
        self.prepare_saved_area(name)?;
        let cfg = self.receive_config(name, &req.definition);
        let mut binds: Vec<std::path::PathBuf> = req.storage_dir.iter().cloned().collect();
        let mut read_only = vec![cfg.payload.kernel.clone()];
        read_only.extend(cfg.payload.initramfs.iter().cloned());
        if let api::config::OutputConfig::File(f) = &cfg.console {
            binds.push(f.clone());
        }
        for d in &cfg.disks {
            // A shared-nothing migration's disks are made in storage_dir instead.
            if req.storage_dir.is_none() && !d.readonly {
                binds.push(d.path.clone());
                // A clustered disk's fencing record: the VMM admits the disk by it.
                if d.fencing_token.is_some() {
                    binds.push(super::vmm_fence_record(&d.path));
                }
            } else if req.storage_dir.is_none() {
                read_only.push(d.path.clone());
            }
        }
        spec.jail = self.jail_spec(name, binds, read_only)?;
        let (vmm_url, gateway) = match url.strip_prefix("tcp:") {
            Some(addr) => {
                let listener = match bound {
                    Some(l) => l,
                    None => std::net::TcpListener::bind(addr).map_err(|e| {
                        AgentError::io("cannot listen for the migration on", addr, e)
                    })?,
                };
                let inside = self.migrate_socket_path(name);
                if tls.is_some() {
                    info!(
                        vm = name,
                        url,
                        "vireod receives with TLS (this host's identity; only the source host's certificate gets in) for the VMM"
                    );
                } else {
                    info!(
                        vm = name,
                        url, "vireod receives in clear (insecure) for the VMM"
                    );
                }
                let gateway = crate::tls_gateway::inbound(listener, tls, inside.clone())?;
                self.watch_gateway(&gateway);
                (format!("unix:{}", inside.display()), Some(gateway))
            }
            None => (url.to_string(), None),
        };
        let url = vmm_url.as_str();
        if let Some(p) = url.strip_prefix("unix:") {
            let _ = std::fs::remove_file(p); // A stale socket of an earlier attempt.
        }
        let (handle, watch) = self.cfg.launcher.spawn(&spec).await?;
        {
            let mut vms = lock(&self.vms);
            match vms.get_mut(name) {
                Some(vm) if vm.generation == generation => {
                    vm.handle = Some(handle.clone());
                    vm.started_at_ms = Some(now_ms());
                }
                _ => {
                    let _ = handle.signal(libc::SIGKILL);
                    return Err(AgentError::UnknownVm(name.to_string()));
                }
            }
        }
        self.watch(name.to_string(), generation, handle.pid, watch);
        let body = serde_json::json!({
            "receiver_url": url,
            "storage_dir": req.storage_dir,
            "config": cfg,
            "secret": req.secret,
            // The VMM listens on a unix socket only: TCP (and TLS) is vireod's gateway.
            "timeout_s": self.cfg.incoming_timeout.as_secs().max(1),
        });
        let deadline = Instant::now() + self.cfg.start_timeout;
        let failed = |reason: String| AgentError::StartFailed {
            name: name.to_string(),
            reason,
        };
        // Whether an earlier try may have reached the VMM (it timed out or broke after
        // connecting): a VMM slow to answer under load may still have taken it.
        let mut maybe_taken = false;
        loop {
            if !self.has_process(name, generation) {
                let why = crate::launcher::tail_lines(&spec.log, 3).join(" / ");
                return Err(failed(format!("the receiving VMM ended: {why}")));
            }
            if spec.socket.exists() {
                let sent = client::request(
                    &spec.socket,
                    "PUT",
                    "/api/v1/vm.receive-migration",
                    Some(body.to_string().into_bytes()),
                    VMM_TIMEOUT,
                )
                .await;
                if let Err(e) = &sent {
                    if !matches!(e, client::ClientError::Connect { .. }) {
                        warn!(vm = name, error = %e, "vm.receive-migration unanswered; asking again");
                        maybe_taken = true;
                    }
                }
                if let Ok(r) = sent {
                    if r.ok() {
                        break;
                    }
                    // The try before did reach it: this VMM (ours alone) is receiving.
                    if r.status == 409 && maybe_taken && vmm_receiving(&spec.socket).await {
                        info!(
                            vm = name,
                            "the VMM took the unanswered vm.receive-migration"
                        );
                        break;
                    }
                    let _ = handle.signal(libc::SIGKILL);
                    return Err(AgentError::Vmm {
                        name: name.to_string(),
                        message: format!(
                            "vm.receive-migration: {} {}",
                            r.status,
                            r.error_message()
                        ),
                    });
                }
            }
            if Instant::now() > deadline {
                let _ = handle.signal(libc::SIGKILL);
                return Err(failed(format!(
                    "the receiving VMM did not listen within {:?}",
                    self.cfg.start_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.private_socket(name, &spec.socket);
        Ok(gateway)
    }

    /// vireod's TLS for a migration from a peer host: this host's identity; the source
    /// must present a certificate from the CA naming `peer` (the host whose
    /// certificate asked for this migration), not revoked by `--tls-crl` (read now: a
    /// source revoked since vireod's last reload is refused in the handshake).
    fn receive_tls(&self, peer: &str) -> Result<migration::tls::ServerTls, AgentError> {
        let id = self.cfg.identity.as_ref().ok_or_else(|| {
            AgentError::BadMigration("this vireod has no host identity to receive with".into())
        })?;
        let files = migration::tls::TlsFiles {
            cert: Some(id.files.cert.clone()),
            key: Some(id.files.key.clone()),
            ca: id.files.ca.clone(),
            crl: id.crl.clone(),
        };
        migration::tls::ServerTls::load(&files, &[peer.to_string()])
            .map_err(|e| AgentError::BadMigration(format!("this host's identity: {e}")))
    }

    /// Where receiving VMMs listen: the peer listener's address.
    fn receiver_ip(&self) -> std::net::IpAddr {
        self.cfg
            .listen
            .map(|a| a.ip())
            .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into())
    }

    /// `tcp:IP:PORT` of a port bound now on the peer listener's address, and its
    /// listener: vireod's migration gateway serves it.
    fn free_receiver_port(&self) -> Result<(String, std::net::TcpListener), AgentError> {
        let ip = self.receiver_ip();
        let cannot = |e| AgentError::io("cannot listen for a migration on", ip.to_string(), e);
        let listener = std::net::TcpListener::bind((ip, 0)).map_err(cannot)?;
        let addr = listener.local_addr().map_err(cannot)?;
        Ok((format!("tcp:{addr}"), listener))
    }

    /// Whether `name`'s VMM of this generation is still there.
    pub(super) fn has_process(&self, name: &str, generation: u64) -> bool {
        lock(&self.vms)
            .get(name)
            .is_some_and(|vm| vm.generation == generation && vm.handle.is_some())
    }

    /// Follows the receiving VMM until the VM arrived, the migration failed, or it was
    /// cancelled.
    pub(super) async fn follow_incoming(
        self: Arc<Self>,
        id: String,
        name: String,
        mut cancel: oneshot::Receiver<()>,
        gateway: Option<Arc<crate::tls_gateway::GatewayStats>>,
    ) {
        let generation = lock(&self.vms).get(&name).map(|vm| vm.generation);
        let Some(generation) = generation else {
            return;
        };
        let sock = self.socket_path(&name);
        let connect_deadline = Instant::now() + self.cfg.incoming_timeout;
        let (mut cancelled, mut armed) = (false, true);
        let mut unanswered = 0u32;
        let outcome = loop {
            tokio::select! {
                r = &mut cancel, if armed => {
                    // A cancel that lost its sender (record finished) is no cancel.
                    armed = false;
                    cancelled = r.is_ok();
                }
                _ = tokio::time::sleep(POLL) => {}
            }
            if !self.has_process(&name, generation) {
                let why = lock(&self.vms)
                    .get(&name)
                    .and_then(|vm| vm.last_exit.clone())
                    .map(|e| {
                        format!(
                            "{}{}",
                            e.reason,
                            e.vmm_log_tail
                                .last()
                                .map(|l| format!(": {l}"))
                                .unwrap_or_default()
                        )
                    })
                    .unwrap_or_else(|| "gone".into());
                break Arrival::Failed(format!("the receiving VMM ended ({why})"));
            }
            let info =
                match client::request(&sock, "GET", "/api/v1/vm.migration-info", None, VMM_TIMEOUT)
                    .await
                {
                    Ok(r) if r.ok() => serde_json::from_slice::<api::MigrationInfo>(&r.body)
                        .map_err(|e| format!("vm.migration-info: {e}")),
                    Ok(r) => Err(format!(
                        "vm.migration-info: {} {}",
                        r.status,
                        r.error_message()
                    )),
                    Err(e) => Err(format!("vm.migration-info: {e}")),
                };
            let mut info = match info {
                Ok(i) => {
                    unanswered = 0;
                    i
                }
                Err(e) => {
                    unanswered += 1;
                    if unanswered.is_multiple_of(UNANSWERED_REPORT) {
                        warn!(vm = %name, error = %e, polls = unanswered, "the receiving VMM does not report its migration");
                    }
                    continue;
                }
            };
            if let Some(g) = &gateway {
                g.merge_into(&mut info);
            }
            let streams = gateway.as_ref().map_or(0, |g| g.streams());
            self.migrations.update(&id, |r| {
                r.percent = crate::migrations::percent(&info);
                r.progress = Some(info.clone());
                r.streams = streams;
            });
            match info.status {
                api::MigrationStatus::Completed => match self.vm_state_of_vmm(&name).await {
                    Some(state) => break Arrival::Arrived(state),
                    // Resuming: the next poll sees it.
                    None => {
                        unanswered += 1;
                        if unanswered.is_multiple_of(UNANSWERED_REPORT) {
                            warn!(vm = %name, polls = unanswered, "the arrived VM's VMM does not report it running or paused");
                        }
                        continue;
                    }
                },
                api::MigrationStatus::Failed => {
                    break Arrival::Failed(
                        info.error
                            .unwrap_or_else(|| "the receiving VMM reports failure".into()),
                    )
                }
                _ if cancelled => break Arrival::Cancelled,
                _ if info.bytes_sent == 0 && Instant::now() > connect_deadline => {
                    break Arrival::Failed(format!(
                        "no source sent anything within {:?}",
                        self.cfg.incoming_timeout
                    ))
                }
                _ => {}
            }
        };
        self.end_incoming(&id, &name, outcome).await;
    }

    /// The VM's state as its VMM reports it (Running or Paused), if it has a VM.
    pub(super) async fn vm_state_of_vmm(&self, name: &str) -> Option<VmState> {
        let sock = self.socket_path(name);
        let r = client::request(&sock, "GET", "/api/v1/vm.info", None, VMM_TIMEOUT)
            .await
            .ok()?;
        if !r.ok() {
            return None;
        }
        match r.json()?.get("state")?.as_str()? {
            "Running" => Some(VmState::Running),
            "Paused" => Some(VmState::Paused),
            _ => None,
        }
    }

    /// Makes the arrived VM this host's, or removes every trace of it.
    async fn end_incoming(self: &Arc<Self>, id: &str, name: &str, outcome: Arrival) {
        match outcome {
            Arrival::Arrived(state) => {
                self.adopt_arrived(name, state).await;
                self.record(id, |r| {
                    r.state = MigrationState::Completed;
                    r.percent = 100.0;
                    r.finished_at_ms = Some(now_ms());
                });
                self.emit(name, "migrated", Some(format!("arrived (migration {id})")));
                info!(vm = name, id, "incoming VM arrived");
            }
            Arrival::Failed(why) => {
                self.discard_incoming(name).await;
                self.record(id, |r| {
                    r.state = MigrationState::Failed;
                    r.error = Some(why.clone());
                    r.finished_at_ms = Some(now_ms());
                });
                self.emit(name, "migration-failed", Some(why.clone()));
                warn!(vm = name, id, error = %why, "incoming migration failed");
            }
            Arrival::Cancelled => {
                self.discard_incoming(name).await;
                self.record(id, |r| {
                    r.state = MigrationState::Cancelled;
                    r.finished_at_ms = Some(now_ms());
                });
                self.emit(name, "migration-cancelled", Some(id.to_string()));
            }
        }
    }

    /// The VM runs here now: supervised as any VM, its definition updated with what
    /// the migration changed (the disks of a shared-nothing migration).
    async fn adopt_arrived(self: &Arc<Self>, name: &str, state: VmState) {
        let sock = self.socket_path(name);
        let disks = match client::request(&sock, "GET", "/api/v1/vm.info", None, VMM_TIMEOUT).await
        {
            Ok(r) if r.ok() => serde_json::from_slice::<api::VmInfo>(&r.body)
                .ok()
                .map(|i| i.config.disks),
            _ => None,
        };
        let (pid, weight) = {
            let mut vms = lock(&self.vms);
            let Some(vm) = vms.get_mut(name) else {
                return;
            };
            vm.migration = None;
            vm.restarts = 0;
            vm.started_at_ms = Some(now_ms());
            if let Some(d) = disks {
                if d != vm.def.config.disks {
                    vm.def.config.disks = d;
                    if let Err(e) = lock(&self.inv).update(name, &vm.def) {
                        warn!(vm = name, error = %error_chain(&e), "cannot record the migrated disks");
                    }
                }
            }
            self.set_state(name, vm, state, Some("arrived by live migration".into()));
            (
                vm.handle.as_ref().map(|h| h.pid),
                (vm.def.weight(), usize::from(vm.def.config.cpus.boot)),
            )
        };
        let _ = std::fs::remove_file(self.migrate_socket_path(name));
        if let Some(pid) = pid {
            self.cfg
                .launcher
                .running(&self.spec(name), pid, weight.0, weight.1)
                .await;
        }
    }

    /// Stops the receiving VMM (if any) and forgets the VM.
    async fn discard_incoming(self: &Arc<Self>, name: &str) {
        let handle = lock(&self.vms).get_mut(name).and_then(|vm| {
            vm.stop_requested = true;
            vm.handle.clone()
        });
        if let Some(h) = handle {
            let _ = h.signal(libc::SIGKILL);
            self.wait_gone(name, &h, Duration::from_secs(10)).await;
        }
        self.forget(name);
    }

    /// Follows again, after vireod's restart, the incoming migrations whose receiver
    /// was re-adopted; settles those whose receiver is gone or whose VM arrived while
    /// vireod was away.
    pub(super) async fn resume_incoming(self: &Arc<Self>) {
        for rec in self.migrations.list() {
            if rec.direction != MigrationDirection::Incoming || rec.state.finished() {
                continue;
            }
            let state = lock(&self.vms).get(&rec.vm).map(|vm| vm.state);
            match state {
                Some(VmState::Incoming) => {
                    if let Some(cancel) = self.migrations.rearm(&rec.id) {
                        let me = self.clone();
                        tokio::spawn(async move {
                            me.follow_incoming(rec.id, rec.vm, cancel, None).await
                        });
                    }
                }
                Some(VmState::Running | VmState::Paused) => {
                    if let Some(vm) = lock(&self.vms).get_mut(&rec.vm) {
                        vm.migration = None;
                    }
                    self.record(&rec.id, |r| {
                        r.state = MigrationState::Completed;
                        r.percent = 100.0;
                        r.finished_at_ms = Some(now_ms());
                        r.error = None;
                    });
                }
                _ => {
                    let why = "the receiving VMM ended while vireod was not running".to_string();
                    self.end_incoming(&rec.id, &rec.vm, Arrival::Failed(why))
                        .await;
                }
            }
        }
    }
}

/// Whether the VMM at `socket` says it is receiving a migration (`vm.migration-info`).
async fn vmm_receiving(socket: &std::path::Path) -> bool {
    let Ok(r) = client::request(
        socket,
        "GET",
        "/api/v1/vm.migration-info",
        None,
        VMM_TIMEOUT,
    )
    .await
    else {
        return false;
    };
    r.ok()
        && serde_json::from_slice::<api::MigrationInfo>(&r.body)
            .is_ok_and(|i| i.status == api::MigrationStatus::Receiving)
}
