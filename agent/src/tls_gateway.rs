//! vireod's TLS gateway for migrations between hosts: the host's identity (its private
//! key) never leaves vireod.
//!
//! A VMM is what a hostile guest attacks. If it held the host's key (as it did when
//! vireod copied the identity into a jailed VMM's run directory for a TLS migration),
//! a guest that escaped into its VMM would hold the host's identity: it could speak to
//! every peer vireod and receiving VMM as this host. So between two vireods the VMMs
//! speak plain migration streams over unix sockets in their own run directories, and
//! vireod carries each stream over mutual TLS:
//!
//! - **outbound** (the source): the VMM sends to `vms/NAME/send.sock`; for each stream
//!   vireod connects to the peer's receiver, verifies it as the peer host (its name,
//!   the CA, `--tls-crl`), presents this host's certificate, waits for the receiver's
//!   go-ahead byte and then joins the two;
//! - **inbound** (the destination): vireod listens on the receiver's TCP port, admits
//!   only the source host's certificate (the CA, `--tls-crl`, the one allowed name),
//!   sends the go-ahead byte and joins the stream to the receiving VMM's unix socket.
//!
//! What is on the wire is unchanged (the same TLS and go-ahead byte as a VMM's own
//! migration TLS, [`migration::tls`]); the streams inside still prove the migration's
//! one-time secret to the VMM. A refused handshake is counted and explained as the
//! VMM's own refusals are ([`GatewayStats`]), and a failed one on the source side is
//! the migration's error.
//!
//! A TCP migration without TLS (`insecure: true`, asked for by a local client) goes
//! through the same gateway with no TLS: the VMMs vireod starts never open an IP
//! socket (the vireo@ unit allows them none), only their run directory's sockets.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use migration::tls::{ClientTls, ServerTls, ACCEPTED};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tracing::{debug, info, warn};

use crate::AgentError;

/// How long a peer has for its TLS handshake (and the go-ahead byte).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// Buffer of each direction of a joined stream: migration streams carry pages in
/// large writes, and the default 8 KiB would cost a system call per two pages.
const JOIN_BUFFER: usize = 256 * 1024;

/// What a gateway saw: refused connections and why (inbound), the last failure
/// (outbound). Shared with the task that serves it.
#[derive(Debug, Default)]
pub struct GatewayStats {
    refused: AtomicU32,
    /// Streams carried (joined to their other end), ever.
    carried_total: AtomicU32,
    last_refusal: Mutex<Option<String>>,
    last_error: Mutex<Option<String>>,
    /// The TLS streams being carried: the peer's certificate chain and the task.
    carried: Mutex<Vec<Carried>>,
}

/// One TLS stream the gateway carries.
#[derive(Debug)]
struct Carried {
    peer: Vec<CertificateDer<'static>>,
    task: tokio::task::AbortHandle,
}

impl GatewayStats {
    /// Connections refused in the TLS handshake (inbound).
    pub fn refused(&self) -> u32 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Streams the gateway joined to their other end (TLS, TCP or unix), ever.
    pub fn streams(&self) -> u32 {
        self.carried_total.load(Ordering::Relaxed)
    }

    /// Why the last refused connection was refused (inbound).
    pub fn last_refusal(&self) -> Option<String> {
        vireo_util::sync::lock(&self.last_refusal).clone()
    }

    /// The last stream that could not be carried to the peer (outbound).
    pub fn last_error(&self) -> Option<String> {
        vireo_util::sync::lock(&self.last_error).clone()
    }

    fn refuse(&self, why: String) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        *vireo_util::sync::lock(&self.last_refusal) = Some(why);
    }

    fn fail(&self, why: String) {
        *vireo_util::sync::lock(&self.last_error) = Some(why);
    }

    fn carry(&self, peer: Vec<CertificateDer<'static>>, task: tokio::task::AbortHandle) {
        let mut carried = vireo_util::sync::lock(&self.carried);
        carried.retain(|c| !c.task.is_finished());
        carried.push(Carried { peer, task });
    }

    /// Cuts every stream whose peer certificate `trusted` no longer accepts (vireod
    /// calls this after a SIGHUP reloaded the CA and CRL): a peer revoked while its
    /// migration runs loses it there and then, and the migration fails (the source
    /// keeps its VM). Returns how many streams were cut.
    pub fn cut_untrusted(
        &self,
        trusted: impl Fn(&[CertificateDer<'static>]) -> Result<(), String>,
    ) -> usize {
        let mut carried = vireo_util::sync::lock(&self.carried);
        carried.retain(|c| !c.task.is_finished());
        let mut cut = 0;
        carried.retain(|c| match trusted(&c.peer) {
            Ok(()) => true,
            Err(why) => {
                c.task.abort();
                cut += 1;
                let why = format!("the migration peer's certificate is no longer trusted: {why}");
                warn!(reason = %why, "migration gateway cut a stream");
                *vireo_util::sync::lock(&self.last_error) = Some(why);
                false
            }
        });
        cut
    }

    /// `info` (the VMM's migration progress) with the gateway's refusals added: the
    /// VMM sees only the streams the gateway let in.
    pub fn merge_into(&self, info: &mut api::MigrationInfo) {
        let refused = self.refused();
        if refused > 0 {
            info.refused_connections = info.refused_connections.saturating_add(refused);
            if let Some(why) = self.last_refusal() {
                info.last_refusal = Some(why);
            }
        }
    }
}

/// A running gateway; dropping it stops it (and removes its unix socket, if any).
pub struct Gateway {
    task: tokio::task::JoinHandle<()>,
    socket: Option<PathBuf>,
    stats: Arc<GatewayStats>,
}

impl Gateway {
    pub fn stats(&self) -> Arc<GatewayStats> {
        self.stats.clone()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(s) = &self.socket {
            let _ = std::fs::remove_file(s);
        }
    }
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("socket", &self.socket)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Where an outbound gateway carries the sending VMM's streams.
pub enum Receiver {
    /// A peer host's receiver, over mutual TLS as this client, verified as this name.
    Tls(SocketAddr, ClientTls, ServerName<'static>),
    /// TCP in clear (`insecure`; the streams prove the migration's secret).
    Tcp(SocketAddr),
    /// A unix socket the VMM's jail does not show (another vireod's run directory).
    Unix(PathBuf),
}

/// The source's side: serves `listen` (a unix socket in the sending VMM's run
/// directory, given to `owner` when the VMM is jailed) and carries every stream to
/// `to`.
pub fn outbound(listen: &Path, owner: Option<u32>, to: Receiver) -> Result<Gateway, AgentError> {
    let _ = std::fs::remove_file(listen);
    let l = UnixListener::bind(listen)
        .map_err(|e| AgentError::io("cannot listen for the migration gateway on", listen, e))?;
    if let Some(uid) = owner {
        std::os::unix::fs::chown(listen, Some(uid), Some(uid))
            .map_err(|e| AgentError::io("cannot hand over", listen, e))?;
    }
    let stats = Arc::new(GatewayStats::default());
    let served = stats.clone();
    let (peer, tls, unix) = match to {
        Receiver::Tls(addr, client, name) => {
            (Some(addr), Some((client.rustls_config(), name)), None)
        }
        Receiver::Tcp(addr) => (Some(addr), None, None),
        Receiver::Unix(path) => (None, None, Some(path)),
    };
    let task = tokio::spawn(async move {
        loop {
            let Ok((vmm, _)) = l.accept().await else {
                return;
            };
            let (tls, unix, stats) = (tls.clone(), unix.clone(), served.clone());
            tokio::spawn(async move {
                if let Some(path) = unix {
                    match UnixStream::connect(&path).await {
                        Ok(out) => join(vmm, out, path.display().to_string(), stats).await,
                        Err(e) => {
                            let why = format!("unix:{}: {e}", path.display());
                            warn!(error = %why, "migration gateway: cannot reach the receiver");
                            stats.fail(why);
                        }
                    }
                    return;
                }
                let Some(peer) = peer else { return };
                let Some((config, name)) = tls else {
                    match TcpStream::connect(peer).await {
                        Ok(tcp) => {
                            let _ = tcp.set_nodelay(true);
                            join(vmm, tcp, peer.to_string(), stats).await
                        }
                        Err(e) => {
                            let why = format!("tcp:{peer}: {e}");
                            warn!(%peer, error = %why, "migration gateway: cannot reach the peer");
                            stats.fail(why);
                        }
                    }
                    return;
                };
                let connector = tokio_rustls::TlsConnector::from(config);
                let tls = async {
                    let tcp = TcpStream::connect(peer).await?;
                    let _ = tcp.set_nodelay(true);
                    let mut tls = connector.connect(name, tcp).await?;
                    let mut ok = [0u8; 1];
                    tls.read_exact(&mut ok).await?;
                    if ok[0] != ACCEPTED {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "the peer is not a Vireo TLS migration endpoint",
                        ));
                    }
                    Ok(tls)
                };
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls).await {
                    Ok(Ok(tls)) => {
                        let chain = peer_chain(tls.get_ref().1.peer_certificates());
                        let joined = tokio::spawn(join(vmm, tls, peer.to_string(), stats.clone()));
                        stats.carry(chain, joined.abort_handle());
                    }
                    Ok(Err(e)) => {
                        let why = format!(
                            "tcp:{peer}: TLS handshake failed: {}",
                            migration::tls::explain(&e)
                        );
                        warn!(%peer, error = %why, "migration gateway: cannot carry a stream to the peer");
                        stats.fail(why);
                    }
                    Err(_) => {
                        let why = format!(
                            "tcp:{peer}: TLS handshake failed: no answer within {HANDSHAKE_TIMEOUT:?}"
                        );
                        warn!(%peer, error = %why, "migration gateway: cannot carry a stream to the peer");
                        stats.fail(why);
                    }
                }
            });
        }
    });
    Ok(Gateway {
        task,
        socket: Some(listen.to_path_buf()),
        stats,
    })
}

/// The destination's side: accepts on `listener` (the receiver's TCP port, bound by
/// vireod), admits what `server` admits (the source host only; without `server`
/// every connection, which must then prove the secret to the VMM) and joins every
/// admitted stream to the receiving VMM's unix socket `vmm`.
pub fn inbound(
    listener: std::net::TcpListener,
    server: Option<ServerTls>,
    vmm: PathBuf,
) -> Result<Gateway, AgentError> {
    let addr = listener
        .local_addr()
        .map_err(|e| AgentError::io("cannot serve the migration port", "", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| AgentError::io("cannot serve the migration port", addr.to_string(), e))?;
    let l = TcpListener::from_std(listener)
        .map_err(|e| AgentError::io("cannot serve the migration port", addr.to_string(), e))?;
    let stats = Arc::new(GatewayStats::default());
    let served = stats.clone();
    let acceptor = server.map(|s| tokio_rustls::TlsAcceptor::from(s.rustls_config()));
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, from)) = l.accept().await else {
                return;
            };
            let (acceptor, stats, vmm) = (acceptor.clone(), served.clone(), vmm.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let Some(acceptor) = acceptor else {
                    match UnixStream::connect(&vmm).await {
                        Ok(inside) => join(inside, tcp, from.to_string(), stats).await,
                        Err(e) => {
                            warn!(vmm = %vmm.display(), error = %e, "migration gateway cannot reach the receiving VMM")
                        }
                    }
                    return;
                };
                let admitted = async {
                    let mut tls = acceptor.accept(tcp).await?;
                    tls.write_all(&[ACCEPTED]).await?;
                    tls.flush().await?;
                    Ok::<_, std::io::Error>(tls)
                };
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, admitted).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        let why = format!(
                            "{from}: TLS handshake failed: {}",
                            migration::tls::explain(&e)
                        );
                        info!(%from, reason = %why, "migration gateway refused a connection");
                        stats.refuse(why);
                        return;
                    }
                    Err(_) => {
                        let why = format!("{from}: no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
                        info!(%from, reason = %why, "migration gateway refused a connection");
                        stats.refuse(why);
                        return;
                    }
                };
                match UnixStream::connect(&vmm).await {
                    Ok(inside) => {
                        let chain = peer_chain(tls.get_ref().1.peer_certificates());
                        let joined =
                            tokio::spawn(join(inside, tls, from.to_string(), stats.clone()));
                        stats.carry(chain, joined.abort_handle());
                    }
                    Err(e) => {
                        warn!(vmm = %vmm.display(), error = %e, "migration gateway cannot reach the receiving VMM")
                    }
                }
            });
        }
    });
    Ok(Gateway {
        task,
        socket: None,
        stats,
    })
}

/// Copies both ways until both ends are done; counts the stream in `stats`.
async fn join<T>(mut vmm: UnixStream, mut tls: T, peer: String, stats: Arc<GatewayStats>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stats.carried_total.fetch_add(1, Ordering::Relaxed);
    let r = tokio::io::copy_bidirectional_with_sizes(&mut vmm, &mut tls, JOIN_BUFFER, JOIN_BUFFER)
        .await;
    debug!(peer, result = ?r, "migration gateway stream ended");
}

/// The peer's certificate chain as the handshake saw it.
fn peer_chain(certs: Option<&[CertificateDer<'_>]>) -> Vec<CertificateDer<'static>> {
    certs
        .unwrap_or_default()
        .iter()
        .map(|c| c.clone().into_owned())
        .collect()
}
