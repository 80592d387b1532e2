//! The source's side of a live migration: the queue and the hand-over.
//!
//! `PUT /api/v1/vms/{name}/migrate` records the migration (queued) and returns at
//! once; a task waits for one of the host's `--max-concurrent-migrations` slots (in
//! the order the migrations were asked for), then:
//! 1. claims the VM (state Migrating: no stop, pause or second migration meanwhile;
//!    kill stays possible);
//! 2. with `destination_agent`: asks the destination's vireod to receive it
//!    (`POST /api/v1/migrations/incoming` with the VM's definition; to another host
//!    over mutual TLS with this host's identity), which answers with the receiver's
//!    URL; with `destination_url`: that URL;
//! 3. `vm.send-migration` on the VM's VMM (to a peer host: to a socket in its run
//!    directory, from which vireod carries each stream over TLS with this host's
//!    certificate and the peer's name as the server name), then follows its
//!    `vm.migration-info` (progress into the record) until it completes, fails, or
//!    the VMM ends;
//! 4. committed (the VMM reported completed, or ended with status 0 and — with an
//!    agent — the destination confirms the VM arrived): the VM is forgotten here
//!    (definition, history and files removed; the record stays) and event
//!    `migrated`; not committed: the VMM resumed the guest itself, the VM is
//!    Running (or Paused) here again, supervised as before, the destination is told
//!    to discard its copy, and event `migration-failed`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{info, warn};

use super::{lock, Supervisor, VMM_TIMEOUT};
use crate::client::{self, Endpoint};
use crate::model::{
    AgentAddress, MigrateRequest, MigrationDirection, MigrationRecord, MigrationState,
    VmDefinition, VmState,
};
use crate::{error_chain, now_ms, AgentError};

const POLL: Duration = Duration::from_millis(100);
/// How long the destination's vireod may take to start its receiver.
const INCOMING_CALL: Duration = Duration::from_secs(120);
/// After the commit: how long the source VMM may take to exit, and the destination
/// to report the VM running.
const AFTER_COMMIT: Duration = Duration::from_secs(60);

/// The destination's vireod and its id of this migration.
struct PeerAgent {
    endpoint: Endpoint,
    id: String,
    /// A vireod on another host: its name (its certificate carries it).
    host: Option<String>,
}

/// What the sending VMM did.
enum Sent {
    /// It reported the commit (or exited cleanly after sending).
    Committed {
        confirmed: bool,
    },
    Failed(String),
}

impl Supervisor {
    /// Queues a live migration of `name`; returns its record at once.
    pub fn migrate(
        self: &Arc<Self>,
        name: &str,
        req: MigrateRequest,
    ) -> Result<MigrationRecord, AgentError> {
        req.validate()?;
        let agent = req.agent_address()?;
        if let Some(AgentAddress::Unix(p)) = &agent {
            crate::confinement::check_agent_socket(p, &self.cfg.peer_sockets)?;
        }
        if let Some(url) = &req.destination_url {
            crate::confinement::check_send_url(url, &self.send_socket_dirs())?;
        }
        if matches!(agent, Some(AgentAddress::Https { .. })) && self.cfg.identity.is_none() {
            return Err(AgentError::BadMigration(
                "an https:// destination_agent needs this vireod's host identity \
                 (--tls-cert, --tls-key, --tls-ca)"
                    .into(),
            ));
        }
        {
            let vms = lock(&self.vms);
            let vm = vms
                .get(name)
                .ok_or_else(|| AgentError::UnknownVm(name.to_string()))?;
            if !matches!(vm.state, VmState::Running | VmState::Paused) {
                return Err(AgentError::WrongState {
                    name: name.to_string(),
                    state: vm.state.to_string(),
                    action: "migrate it (it must be Running or Paused)",
                });
            }
        }
        let (rec, cancel) =
            self.migrations
                .create(name, MigrationDirection::Outgoing, req.peer())?;
        self.save_record(&rec);
        self.emit(
            name,
            "migration-queued",
            Some(format!("migration {} to {}", rec.id, rec.peer)),
        );
        let me = self.clone();
        let (id, n) = (rec.id.clone(), name.to_string());
        tokio::spawn(async move { me.run_outgoing(id, n, req, cancel).await });
        Ok(rec)
    }

    async fn run_outgoing(
        self: Arc<Self>,
        id: String,
        name: String,
        req: MigrateRequest,
        mut cancel: oneshot::Receiver<()>,
    ) {
        let permit = tokio::select! {
            p = self.migrations.slot() => p,
            r = &mut cancel => {
                if r.is_ok() {
                    self.record(&id, |r| {
                        r.state = MigrationState::Cancelled;
                        r.finished_at_ms = Some(now_ms());
                    });
                    self.emit(&name, "migration-cancelled", Some(id.clone()));
                }
                return;
            }
        };
        // Cancelled while the slot was being handed over: start() refuses.
        let Some(rec) = self.migrations.start(&id) else {
            self.record(&id, |r| {
                r.state = MigrationState::Cancelled;
                r.finished_at_ms = Some(now_ms());
            });
            self.emit(&name, "migration-cancelled", Some(id.clone()));
            return;
        };
        self.save_record(&rec);
        self.emit(
            &name,
            "migration-started",
            Some(format!("migration {id} to {}", rec.peer)),
        );
        info!(vm = %name, id = %id, to = %rec.peer, "migration started");
        let result = self.send_vm(&id, &name, &req).await;
        // The record is final before the slot is given back: the next migration's
        // start time is never before this one's end.
        match result {
            Ok(()) => {
                self.record(&id, |r| {
                    r.state = MigrationState::Completed;
                    r.percent = 100.0;
                    r.finished_at_ms = Some(now_ms());
                });
                self.emit(
                    &name,
                    "migrated",
                    Some(format!("to {} (migration {id})", rec.peer)),
                );
                info!(vm = %name, id = %id, "migration completed");
            }
            Err(e) => {
                self.record(&id, |r| {
                    r.state = MigrationState::Failed;
                    r.error = Some(e.clone());
                    r.finished_at_ms = Some(now_ms());
                });
                self.emit(&name, "migration-failed", Some(e.clone()));
                warn!(vm = %name, id = %id, error = %e, "migration failed");
            }
        }
        drop(permit);
    }

    /// Claims the VM, hands it over, and settles where it is afterwards.
    async fn send_vm(
        self: &Arc<Self>,
        id: &str,
        name: &str,
        req: &MigrateRequest,
    ) -> Result<(), String> {
        let (was, def, generation) = {
            let mut vms = lock(&self.vms);
            let vm = vms
                .get_mut(name)
                .ok_or_else(|| format!("VM {name:?} is no longer defined"))?;
            if vm.handle.is_none() || !matches!(vm.state, VmState::Running | VmState::Paused) {
                return Err(format!("VM {name:?} is {}: not migrated", vm.state));
            }
            vm.migration = Some(id.to_string());
            let was = vm.state;
            self.set_state(
                name,
                vm,
                VmState::Migrating,
                Some(format!("migration {id} to {}", req.peer())),
            );
            (was, vm.def.clone(), vm.generation)
        };
        let agent = match req.agent_address() {
            Ok(a) => a,
            Err(e) => {
                self.release(name, id, was).await;
                return Err(error_chain(&e));
            }
        };
        // A one-time secret for this migration, for both VMMs (a destination_url's is
        // the caller's).
        let secret = match (&agent, &req.secret) {
            (Some(_), _) => match new_secret() {
                Ok(s) => Some(s),
                Err(e) => {
                    self.release(name, id, was).await;
                    return Err(e);
                }
            },
            (None, s) => s.clone(),
        };
        // To a peer host the VMMs' stream is mutual TLS; only a same-host vireod asked
        // for a TCP receiver gets plain TCP (and says so).
        let to_peer_host = matches!(agent, Some(AgentAddress::Https { .. }));
        let insecure = req.insecure || (!to_peer_host && tcp_without_tls(req));
        let peer = match agent {
            Some(addr) => match self
                .ask_destination(id, name, &def, addr, req, secret.as_deref(), insecure)
                .await
            {
                Ok(p) => Some(p),
                Err(e) => {
                    self.release(name, id, was).await;
                    return Err(e);
                }
            },
            None => {
                let url = req.destination_url.clone().unwrap_or_default();
                self.migrations
                    .update(id, |r| r.receiver_url = Some(url.clone()));
                None
            }
        };
        let url = self
            .migrations
            .get(id)
            .ok()
            .and_then(|r| r.receiver_url)
            .unwrap_or_default();
        let sent = self
            .send_and_follow(
                id,
                name,
                req,
                &url,
                (secret.as_deref(), insecure),
                generation,
                peer.as_ref(),
            )
            .await;
        match sent {
            Sent::Committed { confirmed } => {
                // The VM is the destination's now.
                self.forget(name);
                match (&peer, confirmed) {
                    (Some(p), false) => self
                        .await_arrival(p)
                        .await
                        .map_err(|e| format!("handed over (the source let the VM go), but {e}")),
                    _ => Ok(()),
                }
            }
            Sent::Failed(e) => {
                if let Some(p) = &peer {
                    self.tell_destination_to_discard(p).await;
                }
                self.release(name, id, was).await;
                Err(e)
            }
        }
    }

    /// How to reach the destination's vireod: its socket, or its peer listener over
    /// mutual TLS with this host's identity.
    fn peer_endpoint(&self, addr: AgentAddress) -> Result<(Endpoint, Option<String>), String> {
        match addr {
            AgentAddress::Unix(p) => Ok((Endpoint::Unix(p), None)),
            AgentAddress::Https { authority, name } => {
                let id =
                    self.cfg.identity.as_ref().ok_or(
                        "this vireod has no host identity (--tls-cert, --tls-key, --tls-ca)",
                    )?;
                let tls = id.client_config().map_err(|e| error_chain(&e))?;
                let server_name = rustls::pki_types::ServerName::try_from(name.clone())
                    .map_err(|e| format!("destination name {name:?}: {e}"))?;
                Ok((
                    Endpoint::Https {
                        authority,
                        server_name,
                        tls,
                    },
                    Some(name),
                ))
            }
        }
    }

    /// `POST /api/v1/migrations/incoming` on the destination's vireod.
    #[allow(clippy::too_many_arguments)]
    async fn ask_destination(
        &self,
        id: &str,
        name: &str,
        def: &VmDefinition,
        addr: AgentAddress,
        req: &MigrateRequest,
        secret: Option<&str>,
        insecure: bool,
    ) -> Result<PeerAgent, String> {
        let (endpoint, host) = self.peer_endpoint(addr)?;
        // Shared-nothing: the destination makes each copy the size the definition
        // declares and lets the sending VMM announce and write no more.
        let mut def = def.clone();
        if req.copy_storage {
            for (i, d) in def.config.disks.iter_mut().enumerate() {
                d.size = Some(
                    crate::confinement::disk_size(&self.roots, d)
                        .map_err(|e| format!("disk {i}: {e}"))?,
                );
            }
        }
        let body = serde_json::json!({
            "name": name,
            "definition": def,
            "receiver_url": req.receiver_url,
            "storage_dir": req.storage_dir,
            "source": format!("{} (migration {id})", crate::procfs::hostname()),
            "secret": secret,
            "insecure": insecure,
        });
        let r = client::request_to(
            &endpoint,
            "POST",
            "/api/v1/migrations/incoming",
            Some(body.to_string().into_bytes()),
            INCOMING_CALL,
        )
        .await
        .map_err(|e| format!("destination vireod: {}", error_chain(&e)))?;
        if !r.ok() {
            return Err(format!(
                "destination refused: {} ({})",
                r.error_message(),
                r.status
            ));
        }
        let rec: MigrationRecord = serde_json::from_slice(&r.body)
            .map_err(|e| format!("destination vireod answered something else: {e}"))?;
        let url = rec
            .receiver_url
            .clone()
            .ok_or("destination vireod gave no receiver_url")?;
        let url = reachable_receiver(&url, &endpoint);
        crate::confinement::check_send_url(&url, &self.send_socket_dirs())
            .map_err(|e| format!("destination vireod's receiver: {}", error_chain(&e)))?;
        self.migrations.update(id, |r| {
            r.peer_id = Some(rec.id.clone());
            r.receiver_url = Some(url);
        });
        Ok(PeerAgent {
            endpoint,
            id: rec.id,
            host,
        })
    }

    /// Starts the VMM's send and follows it to its end. `trust`: the migration's
    /// secret, and whether TCP without TLS is allowed.
    #[allow(clippy::too_many_arguments)]
    async fn send_and_follow(
        &self,
        id: &str,
        name: &str,
        req: &MigrateRequest,
        url: &str,
        trust: (Option<&str>, bool),
        generation: u64,
        peer: Option<&PeerAgent>,
    ) -> Sent {
        let sock = self.socket_path(name);
        // To a peer host the VMM sends plain streams to a socket in its own run
        // directory, and vireod carries them over TLS (the host's key stays in vireod:
        // see tls_gateway). A jailed VMM sees only that directory: a unix receiver
        // elsewhere is reached through a relay there.
        let jail_uid = self.jail_uid(name);
        let tls = self.send_tls(peer).transpose();
        let receiver = match (tls, jail_uid, url.strip_prefix("unix:")) {
            (Err(e), _, _) => return Sent::Failed(e),
            (Ok(tls), _, None) => {
                // TCP: through vireod's gateway, with TLS to a peer host, in clear only
                // when the request said insecure (and the streams prove the secret).
                if tls.is_none() && !(trust.1 && trust.0.is_some()) {
                    return Sent::Failed(format!(
                        "{url}: a TCP migration without mutual TLS needs insecure: true and a secret"
                    ));
                }
                let addr = url.strip_prefix("tcp:").unwrap_or(url);
                let to = match tokio::net::lookup_host(addr).await.map(|mut a| a.next()) {
                    Ok(Some(to)) => to,
                    Ok(None) => return Sent::Failed(format!("{url}: no address")),
                    Err(e) => return Sent::Failed(format!("{url}: {e}")),
                };
                Some(match tls {
                    Some((client, server_name)) => {
                        crate::tls_gateway::Receiver::Tls(to, client, server_name)
                    }
                    None => crate::tls_gateway::Receiver::Tcp(to),
                })
            }
            (Ok(Some(_)), _, Some(_)) => {
                return Sent::Failed(format!(
                    "the peer host's receiver {url:?} is not a tcp:HOST:PORT"
                ))
            }
            // A jailed VMM does not see a unix receiver elsewhere: through its run directory.
            (Ok(None), Some(_), Some(to)) => Some(crate::tls_gateway::Receiver::Unix(to.into())),
            (Ok(None), None, Some(_)) => None,
        };
        let mut gateway = None;
        let url = match receiver {
            Some(receiver) => {
                let listen = self.relay_socket_path(name);
                match crate::tls_gateway::outbound(&listen, jail_uid, receiver) {
                    Ok(g) => {
                        self.watch_gateway(&g);
                        gateway = Some(g)
                    }
                    Err(e) => return Sent::Failed(error_chain(&e)),
                }
                format!("unix:{}", listen.display())
            }
            None => url.to_string(),
        };
        let gateway_error = || gateway.as_ref().and_then(|g| g.stats().last_error());
        let streams = || gateway.as_ref().map_or(0, |g| g.stats().streams());
        // A stream the gateway could not carry is why the VMM's send failed.
        let failed = |vmm: String| match gateway_error() {
            Some(g) => Sent::Failed(format!("{g} (the VMM: {vmm})")),
            None => Sent::Failed(vmm),
        };
        let body = serde_json::json!({
            "destination_url": url,
            "downtime_ms": req.downtime_ms,
            "compress": req.compress,
            "bandwidth_mib_s": req.bandwidth_mib_s,
            "copy_storage": req.copy_storage,
            "connections": req.connections,
            "secret": trust.0,
            "insecure": trust.1,
        });
        match client::request(
            &sock,
            "PUT",
            "/api/v1/vm.send-migration",
            Some(body.to_string().into_bytes()),
            VMM_TIMEOUT,
        )
        .await
        {
            Ok(r) if r.ok() => {}
            Ok(r) => {
                return failed(format!(
                    "the VMM refused to send: {} ({})",
                    r.error_message(),
                    r.status
                ))
            }
            Err(e) => return failed(format!("the VMM: {}", error_chain(&e))),
        }
        let mut committed_at: Option<Instant> = None;
        loop {
            tokio::time::sleep(POLL).await;
            let ended = {
                let vms = lock(&self.vms);
                match vms.get(name) {
                    Some(vm) if vm.generation == generation && vm.handle.is_some() => None,
                    Some(vm) => Some((vm.last_exit.clone(), vm.stop_requested)),
                    None => Some((None, false)),
                }
            };
            if let Some((exit, killed)) = ended {
                // The VMM exits a few ms after Go, before the next poll: its final
                // figures come from the result line it wrote as it exited.
                if let Some(last) = exit
                    .as_ref()
                    .and_then(|e| crate::migrations::final_result(&e.vmm_log_tail))
                {
                    self.migrations.update(id, |r| {
                        r.percent = crate::migrations::percent(&last);
                        r.progress = Some(last);
                        r.streams = streams();
                    });
                }
                if committed_at.is_some() {
                    return Sent::Committed { confirmed: false };
                }
                let clean = !killed && exit.as_ref().is_some_and(|e| e.status == Some(0));
                let how = exit
                    .as_ref()
                    .map(|e| {
                        format!(
                            "{} (status {:?}, signal {:?})",
                            e.reason, e.status, e.signal
                        )
                    })
                    .unwrap_or_else(|| "gone".into());
                if !clean {
                    return failed(format!("the source VMM ended during the migration: {how}"));
                }
                // A clean exit before the VMM said "completed": the hand-over, unless
                // the guest powered off meanwhile. Only a destination vireod can tell.
                return match peer {
                    None => Sent::Committed { confirmed: false },
                    Some(p) => match self.await_arrival(p).await {
                        Ok(()) => Sent::Committed { confirmed: true },
                        Err(e) => Sent::Failed(format!(
                            "the source VMM ended (status 0) and {e}; the VM stays here, stopped"
                        )),
                    },
                };
            }
            if let Some(t) = committed_at {
                if t.elapsed() > AFTER_COMMIT {
                    // The VM runs at the destination; this process has no business.
                    warn!(
                        vm = name,
                        "source VMM still there after the commit; killing it"
                    );
                    if let Some(h) = lock(&self.vms).get(name).and_then(|vm| vm.handle.clone()) {
                        let _ = h.signal(libc::SIGKILL);
                    }
                }
                continue;
            }
            let info =
                match client::request(&sock, "GET", "/api/v1/vm.migration-info", None, VMM_TIMEOUT)
                    .await
                {
                    Ok(r) if r.ok() => serde_json::from_slice::<api::MigrationInfo>(&r.body).ok(),
                    _ => None, // Busy, or exiting: the next round sees which.
                };
            let Some(info) = info else {
                continue;
            };
            self.migrations.update(id, |r| {
                r.percent = crate::migrations::percent(&info);
                r.progress = Some(info.clone());
                r.streams = streams();
            });
            match info.status {
                api::MigrationStatus::Completed => committed_at = Some(Instant::now()),
                api::MigrationStatus::Failed => {
                    return failed(
                        info.error
                            .unwrap_or_else(|| "the VMM reports failure".into()),
                    )
                }
                _ => {}
            }
        }
    }

    /// The TLS vireod's gateway speaks to a peer host's receiver: this host's
    /// identity, the peer's name as the server name, and `--tls-crl` (read now: a
    /// destination revoked since vireod's last reload is refused). None for a vireod
    /// on this host; an identity file that cannot be read is an error.
    #[allow(clippy::type_complexity)]
    fn send_tls(
        &self,
        peer: Option<&PeerAgent>,
    ) -> Option<
        Result<
            (
                migration::tls::ClientTls,
                rustls::pki_types::ServerName<'static>,
            ),
            String,
        >,
    > {
        let host = peer?.host.as_ref()?;
        let id = self.cfg.identity.as_ref()?;
        let files = migration::tls::TlsFiles {
            cert: Some(id.files.cert.clone()),
            key: Some(id.files.key.clone()),
            ca: id.files.ca.clone(),
            crl: id.crl.clone(),
        };
        Some(
            migration::tls::ClientTls::load(&files, Some(host))
                .and_then(|c| Ok((c.server_name_for(None)?, c)))
                .map(|(n, c)| (c, n))
                .map_err(|e| format!("this host's identity: {e}")),
        )
    }

    /// Waits until the destination's vireod reports the VM arrived.
    async fn await_arrival(&self, p: &PeerAgent) -> Result<(), String> {
        let deadline = Instant::now() + AFTER_COMMIT;
        let path = format!("/api/v1/migrations/{}", p.id);
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            match client::request_to(&p.endpoint, "GET", &path, None, VMM_TIMEOUT).await {
                Ok(r) if r.ok() => {
                    if let Ok(rec) = serde_json::from_slice::<MigrationRecord>(&r.body) {
                        match rec.state {
                            MigrationState::Completed => return Ok(()),
                            MigrationState::Failed | MigrationState::Cancelled => {
                                return Err(format!(
                                    "the destination reports the migration {:?}: {}",
                                    rec.state,
                                    rec.error.unwrap_or_default()
                                )
                                .to_lowercase())
                            }
                            _ => {}
                        }
                    }
                }
                Ok(r) => last = format!("{} ({})", r.error_message(), r.status),
                Err(e) => last = error_chain(&e),
            }
            tokio::time::sleep(POLL).await;
        }
        Err(format!(
            "the destination vireod did not confirm the VM's arrival within {AFTER_COMMIT:?} ({last})"
        ))
    }

    /// The send failed before the commit: the destination discards its copy.
    async fn tell_destination_to_discard(&self, p: &PeerAgent) {
        let path = format!("/api/v1/migrations/{}", p.id);
        match client::request_to(&p.endpoint, "DELETE", &path, None, VMM_TIMEOUT).await {
            Ok(r) if r.ok() || r.status == 409 => {} // 409: it ended on its own.
            Ok(r) => {
                warn!(id = %p.id, status = r.status, error = %r.error_message(), "destination did not cancel")
            }
            Err(e) => {
                warn!(id = %p.id, error = %error_chain(&e), "cannot reach the destination to cancel")
            }
        }
    }

    /// The migration did not happen: the VM is this host's again, in the state its
    /// VMM reports (the VMM resumes the guest itself after a failed send).
    async fn release(&self, name: &str, id: &str, was: VmState) {
        let alive = lock(&self.vms)
            .get(name)
            .is_some_and(|vm| vm.handle.is_some());
        let now = if alive {
            self.vm_state_of_vmm(name).await.unwrap_or(was)
        } else {
            VmState::Stopped
        };
        let mut vms = lock(&self.vms);
        let Some(vm) = vms.get_mut(name) else {
            return;
        };
        if vm.migration.as_deref() != Some(id) {
            return;
        }
        vm.migration = None;
        vm.stop_requested = false;
        if vm.state == VmState::Migrating {
            let state = if vm.handle.is_some() {
                now
            } else if vm.last_exit.as_ref().is_some_and(|e| e.status == Some(0)) {
                VmState::Stopped
            } else {
                VmState::Crashed
            };
            self.set_state(
                name,
                vm,
                state,
                Some(format!("migration {id} failed; the VM stays here")),
            );
        }
    }
}

/// A migration's one-time secret: 32 random bytes as 64 hex digits.
fn new_secret() -> Result<String, String> {
    let mut b = [0u8; 32];
    // SAFETY: getrandom(2) writes at most b.len() bytes into the live buffer `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        return Err(format!(
            "no randomness for the migration secret: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// A migration to a vireod on this host (its socket) whose receiver was asked to listen
/// on TCP: there is no peer name for TLS, so it is plain TCP (and says so). Migrations
/// to another host's vireod (`https://`) are always mutual TLS.
fn tcp_without_tls(req: &MigrateRequest) -> bool {
    req.destination_agent.is_some()
        && req
            .receiver_url
            .as_deref()
            .is_some_and(|u| u.starts_with("tcp:"))
}

/// The receiver's URL as the source's VMM can reach it: a peer whose receiver listens
/// on every address (`tcp:0.0.0.0:P`, `tcp:[::]:P`) is reached at the address its
/// vireod was reached at.
fn reachable_receiver(url: &str, endpoint: &Endpoint) -> String {
    let Endpoint::Https { authority, .. } = endpoint else {
        return url.to_string();
    };
    let Some(addr) = url.strip_prefix("tcp:") else {
        return url.to_string();
    };
    let Ok(sock) = addr.parse::<std::net::SocketAddr>() else {
        return url.to_string();
    };
    if !sock.ip().is_unspecified() {
        return url.to_string();
    }
    let host = authority
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(authority);
    // The VMM takes an address only (its threads cannot resolve names): resolve here.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match std::net::ToSocketAddrs::to_socket_addrs(&(host, sock.port()))
        .ok()
        .and_then(|mut a| a.next())
    {
        Some(resolved) => format!("tcp:{resolved}"),
        None => format!("tcp:{host}:{}", sock.port()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_receiver_is_reached_where_its_vireod_was() {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let id = Endpoint::Https {
            authority: "10.1.2.3:7443".into(),
            server_name: rustls::pki_types::ServerName::try_from("b").unwrap(),
            tls: Arc::new(tls),
        };
        assert_eq!(
            reachable_receiver("tcp:0.0.0.0:6000", &id),
            "tcp:10.1.2.3:6000"
        );
        assert_eq!(
            reachable_receiver("tcp:[::]:6000", &id),
            "tcp:10.1.2.3:6000"
        );
        assert_eq!(
            reachable_receiver("tcp:10.9.9.9:6000", &id),
            "tcp:10.9.9.9:6000"
        );
        assert_eq!(reachable_receiver("unix:/x", &id), "unix:/x");
        let unix = Endpoint::Unix("/s".into());
        assert_eq!(
            reachable_receiver("tcp:0.0.0.0:6000", &unix),
            "tcp:0.0.0.0:6000"
        );
    }
}
