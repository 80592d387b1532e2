//! A vfio-user server's PCI function on the VMM's PCI root.
//!
//! The configuration space the guest sees is the VMM's own ([`PciConfiguration`]),
//! built from the server's: its identity (vendor, device, class, subsystem), one
//! 32-bit memory BAR per BAR region the server has, and an MSI-X capability at the
//! place the server's says (table and PBA in the same BAR, offsets and size
//! checked). The MSI-X table and PBA are emulated here; every other BAR access is a
//! REGION_READ/REGION_WRITE to the server. If the server fails (closes, hangs past
//! the reply timeout, answers nonsense) the function is marked failed: reads return
//! all ones, writes are dropped, an error is logged once and the device's state
//! (`failure`) says why; the VM keeps running.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vireo_util::sync::lock;

use super::client::{Client, ClientError, MAX_ACCESS};
use super::irq::{IrqForwarder, VectorFds};
use super::wire;
use crate::interrupt::MsiSink;
use crate::pci::{
    BarKind, MsixCap, MsixTable, PciBar, PciConfiguration, PciDevice, PciHeader, MSIX_ENTRY_SIZE,
};

/// The largest BAR accepted from a server (the VMM's PCI window is small).
const MAX_BAR_SIZE: u64 = 256 << 20;
/// The most MSI-X vectors PCI allows.
const MAX_VECTORS: u32 = 2048;
/// Configuration space read from the server (the type-0 header and capabilities).
const CONFIG_READ: usize = 256;
const MSIX_CAP_ID: u8 = 0x11;

/// Why a vfio-user device cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum UserDeviceError {
    #[error("vfio-user device {id} ({path}): {source}")]
    Client {
        id: String,
        path: PathBuf,
        #[source]
        source: ClientError,
    },
    #[error("vfio-user device {id} ({path}): {reason}")]
    Invalid {
        id: String,
        path: PathBuf,
        reason: String,
    },
    #[error("vfio-user device {id}: {what}: {source}")]
    Host {
        id: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What the VMM and the API see of a device's health and traffic.
#[derive(Default)]
pub struct UserDeviceStatus {
    failure: Mutex<Option<String>>,
    pub region_reads: AtomicU64,
    pub region_writes: AtomicU64,
    pub interrupts: Arc<AtomicU64>,
}

impl UserDeviceStatus {
    /// Why the device failed, if it did.
    pub fn failure(&self) -> Option<String> {
        lock(&self.failure).clone()
    }

    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("region_reads", self.region_reads.load(Ordering::Relaxed)),
            ("region_writes", self.region_writes.load(Ordering::Relaxed)),
            ("interrupts", self.interrupts.load(Ordering::Relaxed)),
            ("failed", u64::from(self.failure().is_some())),
        ]
    }
}

/// Where the MSI-X table and PBA live.
#[derive(Clone, Copy, Debug)]
struct MsixLayout {
    cap_offset: usize,
    bar: usize,
    table: u64,
    pba: u64,
    vectors: u16,
}

/// The function the guest sees.
pub struct UserPciDevice {
    id: String,
    config: PciConfiguration,
    /// None once the server failed.
    client: Option<Client>,
    msix: Option<MsixLayout>,
    /// Each BAR region's size as the server gave it (the BAR the guest sees is
    /// rounded up to a power of two of at least 4 KiB; the rest is not forwarded).
    region_sizes: [u64; 6],
    table: Arc<Mutex<MsixTable>>,
    sink: Arc<dyn MsiSink>,
    status: Arc<UserDeviceStatus>,
    _irqs: Option<IrqForwarder>,
}

/// The server's configuration space, as far as the VMM reads it.
struct ServerConfig([u8; CONFIG_READ]);

impl ServerConfig {
    fn u8(&self, at: usize) -> u8 {
        self.0.get(at).copied().unwrap_or(0)
    }
    fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.u8(at), self.u8(at + 1)])
    }
    fn u32(&self, at: usize) -> u32 {
        wire::u32_at(&self.0, at)
    }

    fn header(&self) -> PciHeader {
        PciHeader {
            vendor_id: self.u16(0),
            device_id: self.u16(2),
            revision: self.u8(8),
            prog_if: self.u8(9),
            subclass: self.u8(10),
            class_code: self.u8(11),
            subsystem_vendor_id: self.u16(0x2c),
            subsystem_id: self.u16(0x2e),
        }
    }

    /// The offset of the MSI-X capability, walking at most 48 entries of the list.
    fn msix_cap(&self) -> Option<usize> {
        if self.u16(6) & (1 << 4) == 0 {
            return None;
        }
        let mut at = usize::from(self.u8(0x34) & 0xfc);
        for _ in 0..48 {
            if !(0x40..CONFIG_READ - 12).contains(&at) {
                return None;
            }
            if self.u8(at) == MSIX_CAP_ID {
                return Some(at);
            }
            at = usize::from(self.u8(at + 1) & 0xfc);
        }
        None
    }
}

impl UserPciDevice {
    /// Connects to the server at `path`, maps `dma` (guest memory regions: fd, file
    /// offset, guest address, size) for its DMA, reads its layout and hands it the
    /// MSI-X eventfds.
    pub fn connect<F: std::os::fd::AsRawFd>(
        id: &str,
        path: &Path,
        dma: &[(&F, u64, u64, u64)],
        sink: Arc<dyn MsiSink>,
    ) -> Result<Self, UserDeviceError> {
        let client = Client::connect(path).map_err(|source| UserDeviceError::Client {
            id: id.into(),
            path: path.into(),
            source,
        })?;
        Self::set_up(id, path, client, dma, sink)
    }

    /// As [`Self::connect`], over a stream already connected to the server (one end
    /// of a socketpair: the fuzz target `vfio_user_replies` plays a hostile server on
    /// the other). `label` names the server in errors and logs.
    pub fn over_stream<F: std::os::fd::AsRawFd>(
        id: &str,
        label: &Path,
        stream: std::os::unix::net::UnixStream,
        dma: &[(&F, u64, u64, u64)],
        sink: Arc<dyn MsiSink>,
    ) -> Result<Self, UserDeviceError> {
        let client = Client::over(stream).map_err(|source| UserDeviceError::Client {
            id: id.into(),
            path: label.into(),
            source,
        })?;
        Self::set_up(id, label, client, dma, sink)
    }

    fn set_up<F: std::os::fd::AsRawFd>(
        id: &str,
        path: &Path,
        mut client: Client,
        dma: &[(&F, u64, u64, u64)],
        sink: Arc<dyn MsiSink>,
    ) -> Result<Self, UserDeviceError> {
        let client_err = |source| UserDeviceError::Client {
            id: id.into(),
            path: path.into(),
            source,
        };
        let invalid = |reason: String| UserDeviceError::Invalid {
            id: id.into(),
            path: path.into(),
            reason,
        };
        let info = client.device_info().map_err(client_err)?;
        if info.regions <= wire::CONFIG_REGION {
            return Err(invalid(format!(
                "{} regions, a PCI function has at least {}",
                info.regions,
                wire::CONFIG_REGION + 1
            )));
        }
        let cfg_info = client
            .region_info(wire::CONFIG_REGION)
            .map_err(client_err)?;
        let mut raw = [0u8; CONFIG_READ];
        let n = (cfg_info.size.min(CONFIG_READ as u64)) as usize;
        if n < 64 {
            return Err(invalid(format!(
                "configuration space of {} bytes",
                cfg_info.size
            )));
        }
        client
            .region_read(wire::CONFIG_REGION, 0, &mut raw[..n])
            .map_err(client_err)?;
        let server = ServerConfig(raw);
        let mut config = PciConfiguration::new(&server.header());
        let mut bar_sizes = [0u64; 6];
        for (i, size) in bar_sizes.iter_mut().enumerate() {
            let r = client.region_info(i as u32).map_err(client_err)?;
            if r.size == 0 {
                continue;
            }
            if r.size > MAX_BAR_SIZE {
                return Err(invalid(format!(
                    "BAR {i} of {} bytes (at most {MAX_BAR_SIZE})",
                    r.size
                )));
            }
            *size = r.size;
            config.add_bar(PciBar {
                index: i,
                kind: BarKind::Memory32,
                size: r.size,
                prefetchable: false,
            });
        }
        let msix = match server.msix_cap() {
            Some(_) if info.irqs <= wire::MSIX_IRQ_INDEX => {
                return Err(invalid(format!(
                    "an MSI-X capability but only {} interrupt indices",
                    info.irqs
                )))
            }
            Some(cap) => Some(
                msix_layout(&server, cap, &bar_sizes, &mut client).map_err(|e| match e {
                    Ok(reason) => invalid(reason),
                    Err(source) => client_err(source),
                })?,
            ),
            None => {
                tracing::warn!(
                    device = id,
                    "vfio-user device has no MSI-X capability: no interrupts"
                );
                None
            }
        };
        for (fd, offset, addr, size) in dma {
            client
                .dma_map(*fd, *offset, *addr, *size)
                .map_err(client_err)?;
        }
        let status = Arc::new(UserDeviceStatus::default());
        let table = Arc::new(Mutex::new(MsixTable::new(msix.map_or(1, |m| m.vectors))));
        let mut irqs = None;
        let msix = match msix {
            Some(m) => {
                let (body, writable) =
                    MsixCap::build(m.vectors, m.bar as u8, m.table as u32, m.pba as u32);
                let cap_offset = config.add_capability(&body, &writable);
                let host = |what, source| UserDeviceError::Host {
                    id: id.into(),
                    what,
                    source,
                };
                let fds = VectorFds::new(m.vectors).map_err(|e| host("eventfd", e))?;
                let raw: Vec<_> = fds.0.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
                // SCM_RIGHTS carries at most 253 descriptors per message.
                for (i, chunk) in raw.chunks(16).enumerate() {
                    client
                        .set_irq_eventfds(wire::MSIX_IRQ_INDEX, (i * 16) as u32, chunk)
                        .map_err(client_err)?;
                }
                irqs = Some(
                    IrqForwarder::start(
                        id,
                        fds,
                        table.clone(),
                        sink.clone(),
                        status.interrupts.clone(),
                    )
                    .map_err(|e| host("interrupt thread", e))?,
                );
                Some(MsixLayout { cap_offset, ..m })
            }
            None => None,
        };
        tracing::info!(
            device = id,
            socket = %path.display(),
            vendor = format_args!("{:#06x}", server.u16(0)),
            device_id = format_args!("{:#06x}", server.u16(2)),
            vectors = msix.map_or(0, |m| m.vectors),
            "vfio-user device connected"
        );
        Ok(Self {
            id: id.into(),
            config,
            client: Some(client),
            msix,
            region_sizes: bar_sizes,
            table,
            sink,
            status,
            _irqs: irqs,
        })
    }

    pub fn status(&self) -> Arc<UserDeviceStatus> {
        self.status.clone()
    }

    /// Whether an access lies inside the server's region (and is small enough to send).
    /// An empty access is never sent: it says nothing, and `0 <= size` would let it name
    /// a region the server never announced (the ROM, a BAR of size 0).
    fn forwarded(&self, bar: usize, offset: u64, len: usize) -> bool {
        let size = self.region_sizes.get(bar).copied().unwrap_or(0);
        len != 0
            && len <= MAX_ACCESS
            && offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= size)
    }

    /// A failed access: the server's refusal of one access (its errno) leaves the
    /// connection usable; anything else ends it.
    fn access_failed(&mut self, bar: usize, offset: u64, e: &ClientError) {
        if let ClientError::Server { errno, .. } = e {
            crate::guest_warn!(device = %self.id, bar, offset, errno, "vfio-user server refused a BAR access");
            return;
        }
        self.fail(e);
    }

    fn fail(&mut self, e: &ClientError) {
        // Dropping the client closes the socket (a vCPU may run this: close, not
        // shutdown, which its filter does not allow).
        if self.client.take().is_some() {
            let why = format!("the vfio-user server failed: {e}");
            tracing::error!(device = %self.id, error = %e, "vfio-user device failed; its accesses now read all ones");
            *lock(&self.status.failure) = Some(why);
        }
    }

    /// The MSI-X structure `offset` of BAR `bar` falls in: (is_table, offset within).
    fn msix_part(&self, bar: usize, offset: u64, len: usize) -> Option<(bool, u64)> {
        let m = self.msix.filter(|m| m.bar == bar)?;
        let t = lock(&self.table);
        let end = offset.checked_add(len as u64)?;
        if offset >= m.table && end <= m.table + t.table_size() {
            return Some((true, offset - m.table));
        }
        if offset >= m.pba && end <= m.pba + t.pba_size() {
            return Some((false, offset - m.pba));
        }
        None
    }

    fn sync_msix_control(&mut self) {
        if let Some(m) = self.msix {
            let (enabled, masked) = MsixCap::control(self.config.read_reg(m.cap_offset / 4));
            lock(&self.table).set_control(enabled, masked, self.sink.as_ref());
        }
    }
}

/// Reads and checks the MSI-X capability at `cap`: Ok(Err(reason)) when the server's
/// layout is not acceptable.
fn msix_layout(
    server: &ServerConfig,
    cap: usize,
    bar_sizes: &[u64; 6],
    client: &mut Client,
) -> Result<MsixLayout, Result<String, ClientError>> {
    let mut vectors = u32::from(server.u16(cap + 2) & 0x7ff) + 1;
    let (count, flags) = client.irq_info(wire::MSIX_IRQ_INDEX).map_err(Err)?;
    if flags & wire::IRQ_INFO_EVENTFD == 0 || count == 0 {
        return Err(Ok(format!(
            "MSI-X capability, but the MSI-X interrupt has {count} vectors and flags {flags:#x} (eventfds needed)"
        )));
    }
    vectors = vectors.min(count).min(MAX_VECTORS);
    let table = server.u32(cap + 4);
    let pba = server.u32(cap + 8);
    let bar = (table & 7) as usize;
    let size = bar_sizes.get(bar).copied().unwrap_or(0);
    let table_off = u64::from(table & !7);
    let pba_off = u64::from(pba & !7);
    let table_end = table_off + u64::from(vectors) * MSIX_ENTRY_SIZE;
    let pba_end = pba_off + u64::from(vectors).div_ceil(64) * 8;
    if (pba & 7) as usize != bar
        || size == 0
        || table_end > size
        || pba_end > size
        || (table_off < pba_end && pba_off < table_end)
    {
        return Err(Ok(format!(
            "MSI-X table {table:#x} / PBA {pba:#x} for {vectors} vectors does not fit one BAR \
             (BAR sizes {bar_sizes:?})"
        )));
    }
    Ok(MsixLayout {
        cap_offset: 0,
        bar,
        table: table_off,
        pba: pba_off,
        vectors: vectors as u16,
    })
}

impl PciDevice for UserPciDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write_reg(reg, offset, data);
        if self.msix.is_some_and(|m| reg == m.cap_offset / 4) {
            self.sync_msix_control();
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match self.msix_part(bar, offset, data.len()) {
            Some((true, o)) => return lock(&self.table).read_table(o, data),
            Some((false, o)) => return lock(&self.table).read_pba(o, data),
            None => {}
        }
        data.fill(0xff);
        if !self.forwarded(bar, offset, data.len()) {
            return;
        }
        let Some(client) = self.client.as_mut() else {
            return;
        };
        self.status.region_reads.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = client.region_read(bar as u32, offset, data) {
            data.fill(0xff);
            self.access_failed(bar, offset, &e);
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match self.msix_part(bar, offset, data.len()) {
            Some((true, o)) => {
                return lock(&self.table).write_table(o, data, self.sink.as_ref());
            }
            Some((false, _)) => return,
            None => {}
        }
        if !self.forwarded(bar, offset, data.len()) {
            return;
        }
        let Some(client) = self.client.as_mut() else {
            return;
        };
        self.status.region_writes.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = client.region_write(bar as u32, offset, data) {
            self.access_failed(bar, offset, &e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(caps: &[(usize, u8, u8)]) -> ServerConfig {
        let mut c = [0u8; CONFIG_READ];
        c[6] = 1 << 4;
        c[0x34] = caps.first().map_or(0, |c| c.0 as u8);
        for &(at, id, next) in caps {
            c[at] = id;
            c[at + 1] = next;
        }
        ServerConfig(c)
    }

    #[test]
    fn a_capability_list_that_loops_or_leaves_the_space_finds_nothing() {
        assert_eq!(
            config(&[(0x40, 0x05, 0x50), (0x50, 0x11, 0)]).msix_cap(),
            Some(0x50)
        );
        assert_eq!(
            config(&[(0x40, 0x05, 0x48), (0x48, 0x09, 0x40)]).msix_cap(),
            None
        );
        assert_eq!(config(&[(0x40, 0x05, 0xfc)]).msix_cap(), None);
        assert_eq!(config(&[(0x40, 0x05, 0x10)]).msix_cap(), None);
    }
}
