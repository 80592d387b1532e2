//! Where the serial port and the console write (off, null, tty or a capped file),
//! and the parser of their flags.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::options::parse_size;
use super::ConfigError;

/// Where a character device goes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase", tag = "mode", content = "file")]
#[serde(
    expecting = "an output: {\"mode\": \"off\"}, {\"mode\": \"null\"}, {\"mode\": \"tty\"} or {\"mode\": \"file\", \"file\": PATH}"
)]
pub enum OutputConfig {
    #[default]
    Off,
    Null,
    Tty,
    File(PathBuf),
}

/// The cap of a serial or console output file when none is configured: a guest that
/// prints in a loop cannot fill the host disk.
pub const DEFAULT_OUTPUT_MAX_SIZE: u64 = 16 << 20;

pub fn parse_output(flag: &'static str, s: &str) -> Result<OutputConfig, ConfigError> {
    parse_output_capped(flag, s).map(|(o, _)| o)
}

/// `off`, `null`, `tty` or `file=PATH[,max_size=BYTES]` (BYTES such as 16M): the
/// output and its file's cap, if given.
pub fn parse_output_capped(
    flag: &'static str,
    s: &str,
) -> Result<(OutputConfig, Option<u64>), ConfigError> {
    match s {
        "off" => Ok((OutputConfig::Off, None)),
        "null" => Ok((OutputConfig::Null, None)),
        "tty" => Ok((OutputConfig::Tty, None)),
        _ => match s.split_once('=') {
            Some(("file", rest)) => {
                // A path may hold commas; only a trailing `,max_size=` is the cap.
                let (p, cap) = match rest.rsplit_once(",max_size=") {
                    Some((p, v)) => {
                        let cap = parse_size(v).filter(|&c| c > 0).ok_or_else(|| {
                            ConfigError::BadValue {
                                flag,
                                key: "max_size".into(),
                                value: v.into(),
                                reason: "expected a size of at least 1 byte such as 16M".into(),
                            }
                        })?;
                        (p, Some(cap))
                    }
                    None => (rest, None),
                };
                if p.is_empty() {
                    return Err(ConfigError::BadValue {
                        flag,
                        key: "file".into(),
                        value: s.into(),
                        reason: "expected file=PATH".into(),
                    });
                }
                Ok((OutputConfig::File(PathBuf::from(p)), cap))
            }
            _ => Err(ConfigError::BadValue {
                flag,
                key: "mode".into(),
                value: s.into(),
                reason: "expected off, null, tty or file=PATH[,max_size=BYTES]".into(),
            }),
        },
    }
}
