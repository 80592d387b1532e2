//! vCPUs: how many, their topology (sockets, cores, threads) and APIC IDs, the CPU
//! features they may see (processor compatibility), and the `--cpus` flag.

use serde::{Deserialize, Serialize};
use vireo_util::cpu_features::CpuFeatures;

use super::options::pairs;
use super::ConfigError;

/// Largest vCPU count we configure (MADT uses 8-bit APIC IDs).
pub const MAX_VCPUS: u8 = 254;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "cpus: an object such as {\"boot\": 2}")]
pub struct CpusConfig {
    pub boot: u8,
    /// How the vCPUs are arranged (CPUID leaves 0xB/0x1F, APIC IDs, MADT). Without it: one
    /// socket of `boot` single-threaded cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<CpuTopology>,
    /// Processor compatibility: the most CPU features the vCPUs get (a fingerprint
    /// string, `vireo_util::cpu_features`); each feature leaf of the host's CPUID is
    /// masked to it. A cluster gives its compatibility-mode VMs the features every
    /// node has, so they live-migrate between CPU generations. Without it: the host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<CpuFeatures>,
}

impl Default for CpusConfig {
    fn default() -> Self {
        Self {
            boot: 1,
            topology: None,
            features: None,
        }
    }
}

/// Sockets, cores per socket and threads per core; their product is the vCPU count.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a CPU topology: an object with sockets, cores and threads")]
pub struct CpuTopology {
    pub sockets: u8,
    pub cores: u8,
    pub threads: u8,
}

/// Bits an x2APIC-style ID gives a level with `n` members: ceil(log2(n)).
fn id_bits(n: u8) -> u32 {
    u32::from(n.max(1)).next_power_of_two().trailing_zeros()
}

impl CpuTopology {
    /// Bits of the APIC ID that number the thread within its core.
    pub fn thread_bits(&self) -> u32 {
        id_bits(self.threads)
    }

    /// Bits of the APIC ID below the socket number (thread and core).
    pub fn package_bits(&self) -> u32 {
        self.thread_bits() + id_bits(self.cores)
    }

    /// The APIC ID of vCPU `index` (vCPUs are numbered thread first, then core, then
    /// socket): socket, core and thread each in their own bit field, as hardware does,
    /// so counts that are not powers of two leave gaps.
    pub fn apic_id(&self, index: u32) -> u32 {
        let threads = u32::from(self.threads.max(1));
        let cores = u32::from(self.cores.max(1));
        let thread = index % threads;
        let core = index / threads % cores;
        let socket = index / threads / cores;
        socket << self.package_bits() | core << self.thread_bits() | thread
    }
}

impl CpusConfig {
    /// The topology in effect: the configured one, or one socket of `boot` cores.
    pub fn topology(&self) -> CpuTopology {
        self.topology.unwrap_or(CpuTopology {
            sockets: 1,
            cores: self.boot,
            threads: 1,
        })
    }

    /// The APIC ID (= KVM vCPU ID) of each vCPU, in vCPU order.
    pub fn apic_ids(&self) -> Vec<u8> {
        let t = self.topology();
        (0..u32::from(self.boot))
            .map(|i| u8::try_from(t.apic_id(i)).unwrap_or(u8::MAX))
            .collect()
    }
}

/// `--cpus`: `boot=N[,topology=S:C:T][,features=...]`, or just `N` (= `boot=N`).
pub fn parse_cpus(s: &str) -> Result<CpusConfig, ConfigError> {
    const F: &str = "--cpus";
    let mut c = CpusConfig::default();
    let long;
    let s = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        long = format!("boot={s}");
        long.as_str()
    } else {
        s
    };
    for (k, v) in pairs(F, s)? {
        match k.as_str() {
            "boot" => {
                c.boot = v.parse().map_err(|_| ConfigError::BadValue {
                    flag: F,
                    key: k.clone(),
                    value: v.clone(),
                    reason: "expected a number of vCPUs".into(),
                })?
            }
            "topology" => {
                let bad = |reason: &str| ConfigError::BadValue {
                    flag: F,
                    key: k.clone(),
                    value: v.clone(),
                    reason: reason.into(),
                };
                let parts: Vec<&str> = v.split(':').collect();
                let [s, co, th] = parts.as_slice() else {
                    return Err(bad("expected SOCKETS:CORES:THREADS"));
                };
                let n = |x: &str| x.parse::<u8>().ok().filter(|&n| n > 0);
                let (Some(sockets), Some(cores), Some(threads)) = (n(s), n(co), n(th)) else {
                    return Err(bad("each of SOCKETS:CORES:THREADS must be 1..=255"));
                };
                c.topology = Some(CpuTopology {
                    sockets,
                    cores,
                    threads,
                });
            }
            // Leaves joined by '+' (',' separates the flag's keys).
            "features" => {
                c.features = Some(CpuFeatures::parse_mask(&v.replace('+', ",")).map_err(|e| {
                    ConfigError::BadValue {
                        flag: F,
                        key: k.clone(),
                        value: v.clone(),
                        reason: e.to_string(),
                    }
                })?)
            }
            _ => return Err(ConfigError::UnknownKey { flag: F, key: k }),
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apic_ids_put_thread_core_and_socket_in_their_own_bit_fields() {
        let c = parse_cpus("boot=8,topology=2:2:2").unwrap();
        assert_eq!(c.apic_ids(), vec![0, 1, 2, 3, 4, 5, 6, 7]);
        // 3 cores need 2 bits, 4 threads 2 bits: socket 1 starts at 16, core 2 at 8.
        let c = parse_cpus("boot=24,topology=2:3:4").unwrap();
        let ids = c.apic_ids();
        assert_eq!(&ids[..4], &[0, 1, 2, 3]);
        assert_eq!(ids[8], 8);
        assert_eq!(ids[12], 16);
        assert_eq!(ids[23], 16 + 8 + 3);
        // Without a topology: one socket of single-threaded cores, IDs 0..n.
        let c = parse_cpus("boot=5").unwrap();
        assert_eq!(c.apic_ids(), vec![0, 1, 2, 3, 4]);
        // A bare count is boot=N.
        assert_eq!(parse_cpus("5").unwrap(), c);
        assert!(parse_cpus("5x").is_err());
        assert_eq!(c.topology().package_bits(), 3);
    }

    #[test]
    fn a_topology_survives_json_and_is_absent_when_not_set() {
        let c = parse_cpus("boot=4,topology=1:2:2").unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert!(
            json.contains(r#""topology":{"sockets":1,"cores":2,"threads":2}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<CpusConfig>(&json).unwrap(), c);
        let plain = serde_json::to_string(&parse_cpus("boot=4").unwrap()).unwrap();
        assert_eq!(plain, r#"{"boot":4}"#);
    }

    /// `features=` takes a fingerprint with its leaves joined by '+' on the command
    /// line, the same string with ',' in JSON; a mask without long mode, or a leaf
    /// that lists no features, is one line naming why.
    #[test]
    fn cpu_features_parse_from_the_flag_and_json_and_bad_masks_are_refused() {
        let one = "1.0:0000000000000000000000010789f3f9";
        let lm = "80000001.0:00000000000000000000000020100800";
        let c = parse_cpus(&format!("boot=2,features={one}+{lm}")).unwrap();
        let f = c.features.clone().unwrap();
        assert_eq!(f.to_string(), format!("{one},{lm}"));
        let json = serde_json::to_string(&c).unwrap();
        assert!(
            json.contains(&format!(r#""features":"{one},{lm}""#)),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<CpusConfig>(&json).unwrap(), c);
        for (bad, why) in [
            (format!("boot=2,features={one}"), "x86-64 baseline"),
            (
                "boot=2,features=4.0:00000000000000000000000000000000".into(),
                "lists no features",
            ),
            ("boot=2,features=1.0:12".into(), "LEAF.SUBLEAF"),
        ] {
            let e = parse_cpus(&bad).unwrap_err().to_string();
            assert!(e.contains(why) && !e.contains('\n'), "{bad}: {e}");
        }
        let e = serde_json::from_str::<CpusConfig>(&format!(r#"{{"boot":1,"features":"{one}"}}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x86-64 baseline"), "{e}");
    }
}
