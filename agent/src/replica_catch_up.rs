//! The primary's catch-up from its change logs' region maps (docs/replica.md, "The
//! log's budget"): a log that outgrew its budget keeps a region bitmap instead of
//! segments; once the replica answers, the round restarts every log of the VM at one
//! moment (the VMM's `vm.replica-cut` with `catch_up`), each log's map frozen beside it
//! ([`replica::CATCH_UP_MAP`]). Then the replica is reset as for a resync (its points
//! dropped, its images kept: nothing between two points is ever offered as one), the
//! maps' regions are read from the disks — after the restart, so every later write to
//! them is in the new segments — and sent as chunks of the initial copy, the copy is
//! closed, and the round goes on as usual: a cut, the new segments, a point. Only the
//! maps' regions are read and sent.
//!
//! A marker ([`CATCH_UP_STARTED`]) in each log's directory says the replica was (or is
//! being) reset for this catch-up: a round that finds the maps and a replica whose
//! initial copy is not complete goes on with the catch-up if the marker is there, and
//! otherwise (the first initial copy never completed) drops the maps and resyncs by
//! block hashes. The markers go before the maps once the copy is closed.

use std::path::Path;

use replica::{RegionMap, CATCH_UP_MAP, DEGRADED_MAP};
use tracing::{info, warn};

use crate::replica_primary::{ShipError, Shipper, BASE_CHUNK, ZSTD_LEVEL};

/// The replica was reset for the catch-up from this log's frozen map.
pub const CATCH_UP_STARTED: &str = "catchup.started";

/// The names a host-crash restart of a log removes besides its segments (the VMM makes
/// a new spare live map at its next open).
pub const CATCH_UP_FILES: [&str; 3] = [DEGRADED_MAP, CATCH_UP_MAP, CATCH_UP_STARTED];

fn remove(dir: &Path, name: &str) -> Result<(), ShipError> {
    let path = dir.join(name);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ShipError::Io {
            what: "removing a catch-up file",
            path,
            source: e,
        }),
        _ => Ok(()),
    }
}

impl Shipper {
    /// Whether a disk's change log is over its budget (keeps a region bitmap).
    pub fn log_degraded(&self) -> bool {
        self.disks.iter().any(|d| {
            std::fs::read(d.log_dir.join(DEGRADED_MAP))
                .ok()
                .and_then(|b| RegionMap::decode(&b).ok())
                .is_some_and(|m| m.active)
        })
    }

    pub(crate) fn catch_up_started(&self) -> bool {
        self.disks
            .iter()
            .any(|d| d.log_dir.join(CATCH_UP_STARTED).exists())
    }

    /// Each disk's frozen map (empty: no catch-up pending). A map that cannot be read,
    /// is of another disk size, or whose log's restart is unfinished is an error.
    pub(crate) fn catch_up_maps(&self) -> Result<Vec<Option<RegionMap>>, ShipError> {
        let mut maps = Vec::with_capacity(self.disks.len());
        for d in &self.disks {
            let path = d.log_dir.join(CATCH_UP_MAP);
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    maps.push(None);
                    continue;
                }
                Err(source) => {
                    return Err(ShipError::Io {
                        what: "reading the catch-up map",
                        path,
                        source,
                    })
                }
            };
            let bad = |why: String| ShipError::Cut(format!("{}: {why}", path.display()));
            let map = RegionMap::decode(&bytes).map_err(bad)?;
            if map.disk_size() != d.size {
                return Err(bad(format!(
                    "a map of a disk of {} bytes, the disk has {}",
                    map.disk_size(),
                    d.size
                )));
            }
            if !map.restarted {
                return Err(bad(
                    "the log's restart is unfinished (the VMM's next open finishes it)".into(),
                ));
            }
            maps.push(Some(map));
        }
        if maps.iter().all(Option::is_none) {
            maps.clear();
        }
        Ok(maps)
    }

    /// Drops the catch-up's files (markers first: a marker never outlives its maps).
    pub(crate) fn drop_catch_up_maps(&self) -> Result<(), ShipError> {
        for d in &self.disks {
            remove(&d.log_dir, CATCH_UP_STARTED)?;
        }
        for d in &self.disks {
            remove(&d.log_dir, CATCH_UP_MAP)?;
        }
        Ok(())
    }

    /// The catch-up (module doc): the replica reset, each map's regions read and sent,
    /// the copy closed, the maps dropped. Returns (bytes on the wire, bytes of the
    /// regions sent).
    pub(crate) async fn catch_up(
        &self,
        maps: &[Option<RegionMap>],
    ) -> Result<(u64, u64), ShipError> {
        for d in &self.disks {
            let path = d.log_dir.join(CATCH_UP_STARTED);
            std::fs::write(&path, b"").map_err(|source| ShipError::Io {
                what: "marking the catch-up",
                path,
                source,
            })?;
        }
        let reset = format!("{}/resync", self.base_path());
        self.ok("POST", &reset, None).await?;
        warn!(vm = %self.vm, "replica reset for a catch-up from the change logs' region maps");
        let (mut sent, mut regions) = (0, 0);
        for (i, (d, map)) in self.disks.iter().zip(maps).enumerate() {
            let Some(map) = map else { continue };
            let image = d.open()?;
            let io = |source| ShipError::Io {
                what: "reading the image",
                path: d.image.clone(),
                source,
            };
            for (offset, len) in map.runs(BASE_CHUNK as u64) {
                let mut buf = vec![0u8; len as usize];
                image.read_exact_at(&mut buf, offset).map_err(io)?;
                regions += len;
                let body = zstd::encode_all(&buf[..], ZSTD_LEVEL).map_err(io)?;
                sent += body.len() as u64;
                let path = format!("{}/disks/{i}/base/{offset}", self.base_path());
                self.ok("PUT", &path, Some(body)).await?;
            }
        }
        self.ok("POST", &format!("{}/base-complete", self.base_path()), None)
            .await?;
        self.drop_catch_up_maps()?;
        info!(vm = %self.vm, bytes = sent, regions, "replica: caught up from the region maps");
        Ok((sent, regions))
    }
}
