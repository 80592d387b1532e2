//! `vireo-img`: the disk tool, with qemu-img's verbs.

// Product code has no unwrap()/expect(): bad input gets an error, never a panic (test
// code, built with cfg(test), may).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod check;
mod convert;
mod size;

use clap::builder::PossibleValuesParser;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use vhdx::{CreateOptions, DiskKind, OpenOptions, Vhdx};

/// Errors of the tool: the message printed after `vireo-img: `.
pub type CliResult<T> = Result<T, String>;

#[derive(Parser)]
#[command(
    name = "vireo-img",
    version,
    about = "VHDX disk image tool (qemu-img verbs)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// `--output`'s values.
const OUTPUTS: [&str; 2] = ["human", "json"];
/// `-f`'s and `-O`'s values.
const FORMATS: [&str; 2] = ["vhdx", "raw"];

#[derive(Subcommand)]
enum Cmd {
    /// Create an image: `create -f vhdx [-o opts] FILE SIZE`, `create -f vhdx -b PARENT -F vhdx CHILD`, `create -f raw FILE SIZE`.
    Create {
        /// The image's format.
        #[arg(short = 'f', default_value = "vhdx", value_parser = PossibleValuesParser::new(FORMATS))]
        format: String,
        /// VHDX options, `key=value[,...]`; `-o help` lists them.
        #[arg(short = 'o')]
        options: Option<String>,
        /// The parent; a relative path is read against CHILD's directory (as qemu-img does).
        #[arg(short = 'b')]
        backing: Option<PathBuf>,
        /// The parent's format (only vhdx).
        #[arg(short = 'F')]
        backing_format: Option<String>,
        /// Replace FILE if it exists (without it, an existing file is refused and kept).
        #[arg(long)]
        force: bool,
        /// The image to create.
        file: PathBuf,
        /// Virtual size: bytes, or with a suffix K, M, G, T, P (powers of 1024); a
        /// differencing disk takes its parent's.
        size: Option<String>,
    },
    /// Show what an image is.
    Info {
        /// The image's format (checked against what the file is).
        #[arg(short = 'f', value_parser = PossibleValuesParser::new(FORMATS))]
        format: Option<String>,
        /// Open without taking the image lock (qemu-img's `-U`): for an image
        /// another process holds, or a file system without OFD locks.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Print for people (`human`) or programs (`json`, qemu-img's fields).
        #[arg(long = "output", default_value = "human", value_parser = PossibleValuesParser::new(OUTPUTS))]
        output: String,
        /// The image.
        file: PathBuf,
    },
    /// Check an image (exit 0 clean, 2 corruption, 3 leaks).
    Check {
        /// The image's format (checked against what the file is).
        #[arg(short = 'f', value_parser = PossibleValuesParser::new(FORMATS))]
        format: Option<String>,
        /// Open without taking the image lock (qemu-img's `-U`): for an image
        /// another process holds, or a file system without OFD locks.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Repair what the check finds: `leaks` or `all` (both release leaked blocks).
        #[arg(short = 'r')]
        repair: Option<String>,
        /// Print for people (`human`) or programs (`json`, qemu-img's fields).
        #[arg(long = "output", default_value = "human", value_parser = PossibleValuesParser::new(OUTPUTS))]
        output: String,
        /// The image.
        file: PathBuf,
    },
    /// Copy an image to another format, skipping zeros.
    Convert {
        /// Show the progress.
        #[arg(short = 'p')]
        progress: bool,
        /// Open without taking the image lock (qemu-img's `-U`): for an image
        /// another process holds, or a file system without OFD locks.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// The source's format (detected when left out; `raw` reads any file's bytes
        /// as they are).
        #[arg(short = 'f', value_parser = PossibleValuesParser::new(FORMATS))]
        src_format: Option<String>,
        /// The destination's format.
        #[arg(short = 'O', default_value = "raw", value_parser = PossibleValuesParser::new(FORMATS))]
        dst_format: String,
        /// The destination's VHDX options, `key=value[,...]`; `-o help` lists them.
        #[arg(short = 'o')]
        options: Option<String>,
        /// Chunks converted in parallel (like qemu-img's -m).
        #[arg(short = 'm', default_value_t = convert::DEFAULT_WORKERS)]
        workers: usize,
        /// Destination cache mode: none (O_DIRECT, flush at the end),
        /// writeback (page cache, flush at the end), unsafe (no flush).
        #[arg(short = 't', default_value = "none")]
        dst_cache: convert::CacheMode,
        /// Source cache mode: none (O_DIRECT) or writeback (page cache).
        #[arg(short = 'T', default_value = "none")]
        src_cache: convert::CacheMode,
        /// The image to read.
        src: PathBuf,
        /// The image to write (replaced if it exists, as qemu-img does).
        dst: PathBuf,
    },
    /// Change the virtual size: `resize FILE [+|-]SIZE`.
    Resize {
        /// The image's format (checked against what the file is).
        #[arg(short = 'f', value_parser = PossibleValuesParser::new(FORMATS))]
        format: Option<String>,
        /// Allow a smaller size: what lies beyond it is lost.
        #[arg(long)]
        shrink: bool,
        /// The image.
        file: PathBuf,
        /// The new size, or `+SIZE`/`-SIZE` relative to the current one (suffixes as
        /// for create).
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
    /// Merge a differencing disk into its parent.
    Commit {
        /// The image's format (checked against what the file is).
        #[arg(short = 'f', value_parser = PossibleValuesParser::new(FORMATS))]
        format: Option<String>,
        /// The differencing disk.
        file: PathBuf,
    },
    /// Release all-zero blocks and shrink the file.
    Compact {
        /// The VHDX image.
        file: PathBuf,
    },
    /// Show where the data of an image lives.
    Map {
        /// The image's format (checked against what the file is).
        #[arg(short = 'f', value_parser = PossibleValuesParser::new(FORMATS))]
        format: Option<String>,
        /// Open without taking the image lock (qemu-img's `-U`): for an image
        /// another process holds, or a file system without OFD locks.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Print for people (`human`) or programs (`json`, qemu-img's fields).
        #[arg(long = "output", default_value = "human", value_parser = PossibleValuesParser::new(OUTPUTS))]
        output: String,
        /// The image.
        file: PathBuf,
    },
}

/// `-f FORMAT` given for an existing image must say what the file is: a vhdx file
/// is not read as raw (nor the other way round) behind the user's back.
fn check_format(file: &Path, format: Option<&str>) -> CliResult<()> {
    let Some(format) = format else { return Ok(()) };
    let is_vhdx =
        vhdx::probe(file).map_err(|e| format!("Could not open '{}': {e}", file.display()))?;
    let actual = if is_vhdx { "vhdx" } else { "raw" };
    if format != actual {
        return Err(format!(
            "'{}' is a {actual} image, not {format} (leave -f out, or give -f {actual})",
            file.display()
        ));
    }
    Ok(())
}

/// `-o help`: the VHDX creation options.
const CREATE_OPTIONS_HELP: &str = "Supported VHDX options:
  size=SIZE                  virtual size (also the SIZE argument)
  subformat=dynamic|fixed    dynamic (blocks allocated on write, default) or fixed (all allocated)
  block_size=SIZE            payload block size, a power of two from 1M to 256M (default 32M; 2M for a differencing disk)
  log_size=SIZE              the metadata log's size, a multiple of 1M (default 1M)
  logical_sector_size=512|4096
  physical_sector_size=512|4096";

/// Whether `-o` asks for the list of options (`help` or `?`, as qemu-img takes).
pub fn wants_options_help(options: Option<&str>) -> bool {
    matches!(options, Some("help" | "?"))
}

pub fn print_options_help() {
    println!("{CREATE_OPTIONS_HELP}");
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VIREO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Create {
            format,
            options,
            backing,
            backing_format,
            force,
            file,
            size,
        } => create(
            &format,
            options.as_deref(),
            backing.as_deref(),
            backing_format.as_deref(),
            &file,
            size.as_deref(),
            force,
        )
        .map(|_| 0),
        Cmd::Info {
            format,
            output,
            file,
            force_share,
        } => check_format(&file, format.as_deref())
            .and_then(|_| info(&file, &output, force_share))
            .map(|_| 0),
        Cmd::Check {
            format,
            repair,
            output,
            file,
            force_share,
        } => check_format(&file, format.as_deref())
            .and_then(|_| check::run(&file, repair.as_deref(), &output, force_share)),
        Cmd::Convert {
            progress,
            force_share,
            src_format,
            dst_format,
            options,
            workers,
            dst_cache,
            src_cache,
            src,
            dst,
        } => convert::run(&convert::Job {
            src: &src,
            src_format: src_format.as_deref(),
            src_cache,
            dst: &dst,
            dst_format: &dst_format,
            dst_cache,
            options: options.as_deref(),
            progress,
            workers,
            src_force_share: force_share,
        })
        .map(|_| 0),
        Cmd::Resize {
            format,
            shrink,
            file,
            size,
        } => check_format(&file, format.as_deref())
            .and_then(|_| resize(&file, &size, shrink))
            .map(|_| 0),
        Cmd::Commit { format, file } => check_format(&file, format.as_deref())
            .and_then(|_| vhdx::commit(&file).map_err(|e| e.to_string()))
            .map(|_| {
                println!("Image committed.");
                0
            }),
        Cmd::Compact { file } => compact(&file).map(|_| 0),
        Cmd::Map {
            format,
            output,
            file,
            force_share,
        } => check_format(&file, format.as_deref())
            .and_then(|_| map(&file, &output, force_share))
            .map(|_| 0),
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(msg) => {
            eprintln!("vireo-img: {msg}");
            ExitCode::from(1)
        }
    }
}

/// `-o key=value,...` for VHDX creation.
pub fn parse_create_options(opts: Option<&str>, base: &mut CreateOptions) -> CliResult<()> {
    let Some(opts) = opts else { return Ok(()) };
    for kv in opts.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("Invalid option '{kv}'"))?;
        match k {
            "block_size" => {
                let b = size::parse(v)?;
                base.block_size =
                    Some(u32::try_from(b).map_err(|_| format!("block_size {v} too large"))?);
            }
            "logical_sector_size" => base.logical_sector_size = size::parse(v)? as u32,
            "physical_sector_size" => base.physical_sector_size = size::parse(v)? as u32,
            "log_size" => base.log_size = size::parse(v)? as u32,
            "subformat" => {
                base.kind = match v {
                    "dynamic" => DiskKind::Dynamic,
                    "fixed" => DiskKind::Fixed,
                    _ => return Err(format!("Invalid subformat '{v}' (dynamic or fixed)")),
                }
            }
            "size" => base.size = size::parse(v)?,
            _ => return Err(format!("Invalid parameter '{k}'")),
        }
    }
    Ok(())
}

/// The backing file `-b` names: a relative path is read against the new image's directory,
/// as qemu-img and Hyper-V read it, not against the current directory.
fn backing_beside(child: &Path, backing: &Path) -> PathBuf {
    match child.parent() {
        Some(dir) if backing.is_relative() && !dir.as_os_str().is_empty() => dir.join(backing),
        _ => backing.to_path_buf(),
    }
}

fn create(
    format: &str,
    options: Option<&str>,
    backing: Option<&Path>,
    backing_format: Option<&str>,
    file: &Path,
    size_arg: Option<&str>,
    force: bool,
) -> CliResult<()> {
    if wants_options_help(options) {
        print_options_help();
        return Ok(());
    }
    if !force && std::fs::symlink_metadata(file).is_ok() {
        return Err(format!(
            "'{}' exists: refusing to overwrite it (--force replaces it)",
            file.display()
        ));
    }
    match format {
        "raw" => {
            let size = size::parse(size_arg.ok_or("Image creation needs a size parameter")?)?;
            vhdx::create_raw(file, size).map_err(|e| e.to_string())?;
            println!("Formatting '{}', fmt=raw size={size}", file.display());
            Ok(())
        }
        "vhdx" => {
            let mut o = CreateOptions::default();
            parse_create_options(options, &mut o)?;
            if let Some(b) = backing {
                if let Some(bf) = backing_format {
                    if bf != "vhdx" {
                        return Err(format!(
                            "backing format '{bf}' is not supported (only vhdx)"
                        ));
                    }
                }
                o.kind = DiskKind::Differencing {
                    parent: backing_beside(file, b),
                };
            } else {
                let s = size_arg.ok_or("Image creation needs a size parameter")?;
                o.size = size::parse(s)?;
                let lss = u64::from(o.logical_sector_size);
                o.size = o.size.div_ceil(lss) * lss;
            }
            let v = Vhdx::create(file, &o).map_err(|e| e.to_string())?;
            println!(
                "Formatting '{}', fmt=vhdx size={} block_size={} log_size={}",
                file.display(),
                v.virtual_size(),
                v.block_size(),
                o.log_size
            );
            v.close().map_err(|e| e.to_string())
        }
        f => Err(format!("Unknown file format '{f}'")),
    }
}

fn human(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.3} {}", U[i]).replace(".000 ", " ")
    }
}

fn disk_usage(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// Opens an image read-only; `force_share` skips the lock (`-U`).
pub fn open_ro(file: &Path, force_share: bool) -> CliResult<Vhdx> {
    Vhdx::open(
        file,
        OpenOptions {
            read_only: true,
            no_lock: force_share,
            ..Default::default()
        },
    )
    .map_err(|e| format!("Could not open '{}': {e}", file.display()))
}

fn info(file: &Path, output: &str, force_share: bool) -> CliResult<()> {
    if !vhdx::probe(file).map_err(|e| e.to_string())? {
        let size = std::fs::metadata(file)
            .map_err(|e| format!("Could not open '{}': {e}", file.display()))?
            .len();
        if output == "json" {
            let j = serde_json::json!({"filename": file.display().to_string(), "format": "raw", "virtual-size": size, "actual-size": disk_usage(file), "dirty-flag": false});
            println!(
                "{}",
                serde_json::to_string_pretty(&j).map_err(|e| e.to_string())?
            );
        } else {
            println!(
                "image: {}\nfile format: raw\nvirtual size: {} ({size} bytes)\ndisk size: {}",
                file.display(),
                human(size),
                human(disk_usage(file))
            );
        }
        return Ok(());
    }
    let v = open_ro(file, force_share)?;
    let h = v.header();
    let parent = v.parent().map(|p| p.path().display().to_string());
    let user_items: Vec<String> = v
        .metadata_items()
        .iter()
        .filter(|i| i.flags & 1 != 0)
        .map(|i| format!("{} ({} bytes)", i.id, i.data.len()))
        .collect();
    if output == "json" {
        let mut j = serde_json::json!({
            "filename": file.display().to_string(),
            "format": "vhdx",
            "virtual-size": v.virtual_size(),
            "actual-size": disk_usage(file),
            "cluster-size": v.block_size(),
            "dirty-flag": v.replayed_log_entries() > 0,
            "format-specific": {"type": "vhdx", "data": {
                "block-size": v.block_size(),
                "logical-sector-size": v.logical_sector_size(),
                "physical-sector-size": v.physical_sector_size(),
                "leave-blocks-allocated": v.leave_blocks_allocated(),
                "has-parent": v.has_parent(),
                "log-length": h.log_length,
                "pending-log-entries": v.replayed_log_entries(),
                "page83": v.page83().to_string(),
                "data-write-guid": h.data_write_guid.to_string(),
                "creator": v.creator(),
                "user-metadata-items": user_items,
            }},
        });
        if let Some(p) = parent {
            j["backing-filename"] = serde_json::Value::String(p);
            j["backing-filename-format"] = serde_json::Value::String("vhdx".into());
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&j).map_err(|e| e.to_string())?
        );
    } else {
        println!("image: {}", file.display());
        println!("file format: vhdx");
        println!(
            "virtual size: {} ({} bytes)",
            human(v.virtual_size()),
            v.virtual_size()
        );
        println!("disk size: {}", human(disk_usage(file)));
        println!("cluster_size: {}", v.block_size());
        if let Some(p) = parent {
            println!("backing file: {p}");
            println!("backing file format: vhdx");
        }
        println!("Format specific information:");
        println!("    logical sector size: {}", v.logical_sector_size());
        println!("    physical sector size: {}", v.physical_sector_size());
        println!(
            "    subformat: {}",
            if v.leave_blocks_allocated() {
                "fixed"
            } else if v.has_parent() {
                "differencing"
            } else {
                "dynamic"
            }
        );
        println!("    log length: {}", h.log_length);
        if v.replayed_log_entries() > 0 {
            println!(
                "    pending log entries: {} (replayed in memory)",
                v.replayed_log_entries()
            );
        }
        println!("    creator: {}", v.creator());
        for u in user_items {
            println!("    user metadata: {u}");
        }
    }
    Ok(())
}

/// qemu-img's refusal of a smaller size without `--shrink`.
const SHRINK_REFUSED: &str =
    "Use the --shrink option to perform a shrink operation (what lies beyond the new size is lost)";

fn resize(file: &Path, arg: &str, shrink: bool) -> CliResult<()> {
    let is_vhdx = vhdx::probe(file).map_err(|e| e.to_string())?;
    let (rel, s) = match arg.as_bytes().first() {
        Some(b'+') => (1i8, &arg[1..]),
        Some(b'-') => (-1, &arg[1..]),
        _ => (0, arg),
    };
    let n = size::parse(s)?;
    if !is_vhdx {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(file)
            .map_err(|e| e.to_string())?;
        let cur = f.metadata().map_err(|e| e.to_string())?.len();
        let new = match rel {
            1 => cur + n,
            -1 => cur.checked_sub(n).ok_or("Image size cannot be negative")?,
            _ => n,
        };
        if new < cur && !shrink {
            return Err(SHRINK_REFUSED.into());
        }
        f.set_len(new).map_err(|e| e.to_string())?;
        println!("Image resized.");
        return Ok(());
    }
    let mut v = Vhdx::open(file, OpenOptions::default())
        .map_err(|e| format!("Could not open '{}': {e}", file.display()))?;
    let cur = v.virtual_size();
    let new = match rel {
        1 => cur + n,
        -1 => cur.checked_sub(n).ok_or("Image size cannot be negative")?,
        _ => n,
    };
    let lss = u64::from(v.logical_sector_size());
    let new = new.div_ceil(lss) * lss;
    if new < cur && !shrink {
        return Err(SHRINK_REFUSED.into());
    }
    v.resize(new).map_err(|e| e.to_string())?;
    v.close().map_err(|e| e.to_string())?;
    println!("Image resized.");
    Ok(())
}

fn compact(file: &Path) -> CliResult<()> {
    let mut v = Vhdx::open(file, OpenOptions::default())
        .map_err(|e| format!("Could not open '{}': {e}", file.display()))?;
    let s = v.compact().map_err(|e| e.to_string())?;
    v.close().map_err(|e| e.to_string())?;
    println!(
        "Image compacted: {} zero blocks released, {} blocks moved, file {} -> {} bytes.",
        s.released_blocks, s.moved_blocks, s.old_file_size, s.new_file_size
    );
    Ok(())
}

fn map(file: &Path, output: &str, force_share: bool) -> CliResult<()> {
    let v = open_ro(file, force_share)?;
    let ext = v
        .block_status(0, v.virtual_size())
        .map_err(|e| e.to_string())?;
    let files: Vec<String> = {
        let mut f = vec![v.path().display().to_string()];
        let mut p = v.parent();
        while let Some(x) = p {
            f.push(x.path().display().to_string());
            p = x.parent();
        }
        f
    };
    if output == "json" {
        let arr: Vec<serde_json::Value> = ext
            .iter()
            .map(|e| {
                let mut j = serde_json::json!({"start": e.start, "length": e.length, "depth": e.depth, "present": e.data || (e.zero && (e.depth as usize) < files.len()), "zero": e.zero, "data": e.data});
                if let Some(o) = e.offset {
                    j["offset"] = serde_json::Value::from(o);
                }
                j
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&arr).map_err(|e| e.to_string())?
        );
    } else {
        println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
        for e in ext.iter().filter(|e| e.data) {
            println!(
                "{:<#16x}{:<#16x}{:<#16x}{}",
                e.start,
                e.length,
                e.offset.unwrap_or(0),
                files.get(e.depth as usize).cloned().unwrap_or_default()
            );
        }
    }
    Ok(())
}
