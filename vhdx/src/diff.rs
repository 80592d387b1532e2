//! Differencing chains: finding the parent from the locator, checking the
//! linkage GUID, refusing loops and mismatched geometry.

use crate::error::{Error, Result};
use crate::image::{OpenOptions, Vhdx};
use crate::metadata::{DiskParams, ParentLocator};
use std::path::{Path, PathBuf};
use uuid::Uuid;

fn windows_to_unix(s: &str) -> String {
    s.replace('\\', "/")
}

/// Candidate parent paths in the order the locator suggests them.
pub fn parent_candidates(child: &Path, loc: &ParentLocator) -> Vec<PathBuf> {
    let dir = child.parent().unwrap_or_else(|| Path::new("."));
    let mut out = Vec::new();
    if let Some(rel) = loc.get("relative_path") {
        let r = windows_to_unix(rel);
        let r = r.strip_prefix("./").unwrap_or(&r).to_string();
        out.push(dir.join(r));
    }
    for key in ["absolute_win32_path", "volume_path"] {
        if let Some(abs) = loc.get(key) {
            let a = windows_to_unix(abs);
            if a.starts_with('/') {
                out.push(PathBuf::from(a));
            } else if let Some(name) = Path::new(&a).file_name() {
                // A Windows path (C:/...): try its file name next to the child.
                out.push(dir.join(name));
            }
        }
    }
    out
}

pub(crate) fn parse_linkage(s: &str) -> Option<Uuid> {
    Uuid::parse_str(s.trim().trim_start_matches('{').trim_end_matches('}')).ok()
}

pub(crate) fn open_parent(
    child: &Path,
    loc: &ParentLocator,
    params: &DiskParams,
    opts: &OpenOptions,
    chain: &mut Vec<PathBuf>,
) -> Result<Vhdx> {
    let direct = opts.direct;
    let cp = child.display().to_string();
    let perr = |reason: String| Error::Parent {
        path: cp.clone(),
        reason,
    };
    let linkage = loc.get("parent_linkage").and_then(parse_linkage);
    let linkage2 = loc.get("parent_linkage2").and_then(parse_linkage);
    if linkage.is_none() {
        return Err(perr("parent locator has no valid parent_linkage".into()));
    }
    let cands = parent_candidates(child, loc);
    let hit = match &opts.parent_opener {
        Some(opener) => {
            let mut hit = None;
            for c in &cands {
                if let Some(file) = (opener.0)(child, c).map_err(&perr)? {
                    hit = Some((c, Some(file)));
                    break;
                }
            }
            hit
        }
        None => cands.iter().find(|p| p.is_file()).map(|p| (p, None)),
    };
    let Some((found, opened)) = hit else {
        return Err(perr(format!(
            "none of the locator paths exists: {}",
            cands
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let canon = std::fs::canonicalize(found).unwrap_or_else(|_| found.clone());
    if chain.contains(&canon) {
        return Err(perr(format!(
            "parent chain loops back to {}",
            canon.display()
        )));
    }
    let popts = OpenOptions {
        read_only: true,
        direct,
        // Parents are read-only; they are locked (shared) unless the child was
        // opened with locking off (same file system, same reason).
        no_lock: opts.no_lock,
        parent_opener: opts.parent_opener.clone(),
        ..Default::default()
    };
    let parent = match opened {
        Some(file) => {
            use std::os::fd::AsRawFd;
            // O_DIRECT reopens the very file that was opened, through its fd.
            let by_fd = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
            let storage: std::sync::Arc<dyn crate::Storage> = std::sync::Arc::new(if direct {
                crate::FileStorage::with_direct(file, &by_fd, false)
            } else {
                crate::FileStorage::new(file)
            });
            Vhdx::open_storage_depth(storage, found, &popts, chain)?
        }
        None => Vhdx::open_depth(found, &popts, chain)?,
    };
    let dwg = parent.data_write_guid();
    if Some(dwg) != linkage && Some(dwg) != linkage2 {
        return Err(perr(format!(
            "{} has data write GUID {{{dwg}}} but the child expects {{{}}}: the parent was modified after the child was created",
            found.display(),
            linkage.unwrap_or_default()
        )));
    }
    if parent.virtual_size() != params.virtual_size
        || parent.logical_sector_size() != params.logical_sector_size
    {
        return Err(perr(format!(
            "{} has size {} / sector {} but the child has {} / {}",
            found.display(),
            parent.virtual_size(),
            parent.logical_sector_size(),
            params.virtual_size,
            params.logical_sector_size
        )));
    }
    Ok(parent)
}

/// Relative path from `from_dir` to `to` (both absolute), with `..` as needed.
pub(crate) fn relative_path(from_dir: &Path, to: &Path) -> PathBuf {
    let a: Vec<_> = from_dir.components().collect();
    let b: Vec<_> = to.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut p = PathBuf::new();
    for _ in common..a.len() {
        p.push("..");
    }
    for c in &b[common..] {
        p.push(c);
    }
    p
}
