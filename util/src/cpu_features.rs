//! CPU features as guests see them through CPUID: the leaves that list features, the
//! registers of each that hold feature bits, and sets of features that can be compared,
//! intersected and applied as a mask.
//!
//! One model serves three users: a live migration compares the features the source's
//! vCPUs got with what the destination would give ([`CpuidLeaf::feature_part`]); a
//! cluster node publishes its host's set as a fingerprint string and placement compares
//! them ([`CpuFeatures`]); and a VM in processor compatibility mode (`cpus.features`)
//! gets its host's features masked to a set every node of its cluster has
//! ([`CpuFeatures::intersect`], [`CpuFeatures::mask_entry`]), as Hyper-V's
//! (dynamic) processor compatibility mode and libvirt's `cpu-baseline` do.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One CPUID leaf (function, index) and its four registers.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CpuidLeaf {
    pub function: u32,
    pub index: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl From<&kvm_bindings::kvm_cpuid_entry2> for CpuidLeaf {
    fn from(e: &kvm_bindings::kvm_cpuid_entry2) -> Self {
        CpuidLeaf {
            function: e.function,
            index: e.index,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

/// The feature leaves of KVM's CPUID entries (`CpuidLeaf::feature_part` of each): what
/// the VMM compares before a migration and a node publishes as its fingerprint.
pub fn feature_leaves_of(entries: &[kvm_bindings::kvm_cpuid_entry2]) -> Vec<CpuidLeaf> {
    entries
        .iter()
        .filter_map(|e| CpuidLeaf::from(e).feature_part())
        .collect()
}

/// The CPUID leaves that list CPU features (with the registers that hold them), as a
/// migration compares them: what a guest probed once must be there after the move.
pub const FEATURE_LEAVES: [(u32, u32); 6] = [
    (1, 0),
    (7, 0),
    (7, 1),
    (0xd, 1),
    (0x8000_0001, 0),
    (0x8000_0007, 0),
];

/// Which of leaf (`function`, `index`)'s registers (eax, ebx, ecx, edx) hold feature
/// bits; None for a leaf that is not a feature leaf.
pub fn feature_registers(function: u32, index: u32) -> Option<[bool; 4]> {
    Some(match (function, index) {
        // eax: family/model/stepping; ebx: APIC ID, CLFLUSH size, counts.
        (1, 0) => [false, false, true, true],
        // eax: the highest subleaf.
        (7, 0) => [false, true, true, true],
        (7, 1) => [true, true, true, true],
        // Only eax lists features (XSAVEOPT, XSAVEC, ...); ebx is a size; ecx/edx the
        // supervisor state components (not features a guest probes).
        (0xd, 1) => [true, false, false, false],
        // eax: extended family/model; ebx: brand/package type.
        (0x8000_0001, 0) => [false, false, true, true],
        (0x8000_0007, 0) => [true, true, true, true],
        _ => return None,
    })
}

impl CpuidLeaf {
    /// The leaf's registers in order eax, ebx, ecx, edx.
    pub fn registers(&self) -> [u32; 4] {
        [self.eax, self.ebx, self.ecx, self.edx]
    }

    fn with_registers(self, [eax, ebx, ecx, edx]: [u32; 4]) -> CpuidLeaf {
        CpuidLeaf {
            eax,
            ebx,
            ecx,
            edx,
            ..self
        }
    }

    /// `leaf` as a migration compares it, if it is one of [`FEATURE_LEAVES`]: the
    /// registers that hold no feature bits (family, APIC IDs, counts, sizes) zeroed.
    pub fn feature_part(self) -> Option<CpuidLeaf> {
        let which = feature_registers(self.function, self.index)?;
        let mut regs = self.registers();
        for (r, keep) in regs.iter_mut().zip(which) {
            if !keep {
                *r = 0;
            }
        }
        Some(self.with_registers(regs))
    }
}

/// The feature leaves as one string (sorted, hex): two hosts whose fingerprints are
/// equal give their guests the same CPU features, so a live migration between them
/// passes the VMM's CPUID comparison. Cluster nodes publish theirs; live moves go only
/// between nodes with the same.
pub fn cpuid_fingerprint(leaves: &[CpuidLeaf]) -> String {
    let mut sorted: Vec<&CpuidLeaf> = leaves.iter().collect();
    sorted.sort_by_key(|l| (l.function, l.index));
    sorted
        .iter()
        .map(|l| {
            format!(
                "{:x}.{:x}:{:08x}{:08x}{:08x}{:08x}",
                l.function, l.index, l.eax, l.ebx, l.ecx, l.edx
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Why a feature string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FeaturesError {
    #[error("CPU features: {0:?} is not LEAF.SUBLEAF:32 hex digits (eax ebx ecx edx)")]
    Syntax(String),
    #[error("CPU features: leaf {0:#x}.{1:x} lists no features (feature leaves: 1.0, 7.0, 7.1, d.1, 80000001.0, 80000007.0)")]
    NotAFeatureLeaf(u32, u32),
    #[error("CPU features: leaf {0:#x}.{1:x} appears twice")]
    Duplicate(u32, u32),
    #[error("CPU features: leaf {function:#x}.{index:x} {register} holds no feature bits, yet is {value:#010x}")]
    NotFeatureBits {
        function: u32,
        index: u32,
        register: &'static str,
        value: u32,
    },
    #[error(
        "CPU features: the x86-64 baseline is missing ({0}): a guest could not run in long mode"
    )]
    NoBaseline(&'static str),
}

const REGISTER_NAMES: [&str; 4] = ["eax", "ebx", "ecx", "edx"];

/// A set of CPU features: the feature registers of each feature leaf (a leaf that is
/// absent has none of its features; one with no bits is not kept). Written and read as the fingerprint string
/// ([`cpuid_fingerprint`]): `1.0:<eax><ebx><ecx><edx>,7.0:...`, hex.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    /// Feature parts of feature leaves, sorted by (function, index), at most one each.
    leaves: Vec<CpuidLeaf>,
}

/// A feature a set lacks: leaf, register and the bits missing there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub function: u32,
    pub index: u32,
    pub register: &'static str,
    pub bits: u32,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cpuid {:#x}.{:x} {} bits {:#010x}",
            self.function, self.index, self.register, self.bits
        )
    }
}

/// x86-64-v1: what every 64-bit guest needs (leaf 1 edx: FPU, TSC, MSR, PAE, CX8, APIC,
/// PGE, CMOV, FXSR, SSE, SSE2; leaf 0x8000_0001 edx: long mode, SYSCALL, NX).
const BASELINE: [(u32, usize, u32, &str); 2] = [
    (
        1,
        3,
        1 | 1 << 4
            | 1 << 5
            | 1 << 6
            | 1 << 8
            | 1 << 9
            | 1 << 13
            | 1 << 15
            | 1 << 24
            | 1 << 25
            | 1 << 26,
        "leaf 1 edx: fpu tsc msr pae cx8 apic pge cmov fxsr sse sse2",
    ),
    (
        0x8000_0001,
        3,
        1 << 11 | 1 << 20 | 1 << 29,
        "leaf 0x80000001 edx: syscall nx lm",
    ),
];

/// XSAVE state components (bits of XCR0) and the feature each belongs to: a component
/// whose feature is masked is not offered in leaf 0xd.0 either, so that no guest can
/// enable state the destination of a migration may lack.
const XSAVE_COMPONENTS: [(u64, (u32, u32), usize, u32); 5] = [
    // YMM: AVX (leaf 1 ecx 28).
    (1 << 2, (1, 0), 2, 1 << 28),
    // BNDREGS, BNDCSR: MPX (leaf 7.0 ebx 14).
    (3 << 3, (7, 0), 1, 1 << 14),
    // opmask, ZMM_Hi256, Hi16_ZMM: AVX512F (leaf 7.0 ebx 16).
    (7 << 5, (7, 0), 1, 1 << 16),
    // PKRU: PKU (leaf 7.0 ecx 3).
    (1 << 9, (7, 0), 2, 1 << 3),
    // XTILECFG, XTILEDATA: AMX-TILE (leaf 7.0 edx 24).
    (3 << 17, (7, 0), 3, 1 << 24),
];

impl CpuFeatures {
    /// The features in `leaves` (their feature leaves' feature registers; other leaves
    /// are ignored).
    pub fn from_leaves(leaves: &[CpuidLeaf]) -> CpuFeatures {
        let mut out: Vec<CpuidLeaf> = leaves.iter().filter_map(|l| l.feature_part()).collect();
        out.sort_by_key(|l| (l.function, l.index));
        out.dedup_by_key(|l| (l.function, l.index));
        CpuFeatures::normal(out)
    }

    /// Without leaves that have no feature bits (absent and all zero mean the same:
    /// no features there), so that equal sets compare equal.
    fn normal(mut leaves: Vec<CpuidLeaf>) -> CpuFeatures {
        leaves.retain(|l| l.registers() != [0; 4]);
        CpuFeatures { leaves }
    }

    /// Reads a fingerprint string; refuses anything but feature leaves with bits in
    /// feature registers only.
    pub fn parse(s: &str) -> Result<CpuFeatures, FeaturesError> {
        let mut leaves: Vec<CpuidLeaf> = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let syntax = || FeaturesError::Syntax(part.to_string());
            let (id, regs) = part.split_once(':').ok_or_else(syntax)?;
            let (f, i) = id.split_once('.').ok_or_else(syntax)?;
            let function =
                u32::from_str_radix(f.trim_start_matches("0x"), 16).map_err(|_| syntax())?;
            let index = u32::from_str_radix(i, 16).map_err(|_| syntax())?;
            if regs.len() != 32 || !regs.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(syntax());
            }
            let mut r = [0u32; 4];
            for (k, v) in r.iter_mut().enumerate() {
                *v = u32::from_str_radix(&regs[k * 8..k * 8 + 8], 16).map_err(|_| syntax())?;
            }
            let which = feature_registers(function, index)
                .ok_or(FeaturesError::NotAFeatureLeaf(function, index))?;
            for k in 0..4 {
                if !which[k] && r[k] != 0 {
                    return Err(FeaturesError::NotFeatureBits {
                        function,
                        index,
                        register: REGISTER_NAMES[k],
                        value: r[k],
                    });
                }
            }
            if leaves
                .iter()
                .any(|l| (l.function, l.index) == (function, index))
            {
                return Err(FeaturesError::Duplicate(function, index));
            }
            leaves.push(
                CpuidLeaf {
                    function,
                    index,
                    ..CpuidLeaf::default()
                }
                .with_registers(r),
            );
        }
        leaves.sort_by_key(|l| (l.function, l.index));
        Ok(CpuFeatures::normal(leaves))
    }

    /// As [`CpuFeatures::parse`], and the set keeps the x86-64 baseline: what a VM's
    /// mask must keep.
    pub fn parse_mask(s: &str) -> Result<CpuFeatures, FeaturesError> {
        let f = CpuFeatures::parse(s)?;
        for (function, reg, bits, what) in BASELINE {
            if f.register(function, 0, reg) & bits != bits {
                return Err(FeaturesError::NoBaseline(what));
            }
        }
        Ok(f)
    }

    /// The feature leaves, sorted.
    pub fn leaves(&self) -> &[CpuidLeaf] {
        &self.leaves
    }

    fn leaf(&self, function: u32, index: u32) -> Option<&CpuidLeaf> {
        self.leaves
            .iter()
            .find(|l| (l.function, l.index) == (function, index))
    }

    /// Register `reg` (0 = eax .. 3 = edx) of leaf (`function`, `index`): 0 where the
    /// leaf is absent.
    fn register(&self, function: u32, index: u32, reg: usize) -> u32 {
        self.leaf(function, index).map_or(0, |l| l.registers()[reg])
    }

    /// The features both sets have (a leaf absent from either is absent).
    pub fn intersect(&self, other: &CpuFeatures) -> CpuFeatures {
        let leaves = self
            .leaves
            .iter()
            .filter_map(|a| {
                let b = other.leaf(a.function, a.index)?;
                let (x, y) = (a.registers(), b.registers());
                Some(a.with_registers([x[0] & y[0], x[1] & y[1], x[2] & y[2], x[3] & y[3]]))
            })
            .collect();
        CpuFeatures::normal(leaves)
    }

    /// The features every set has; None for no sets.
    pub fn common<'a>(sets: impl IntoIterator<Item = &'a CpuFeatures>) -> Option<CpuFeatures> {
        sets.into_iter().fold(None, |acc: Option<CpuFeatures>, s| {
            Some(match acc {
                None => s.clone(),
                Some(a) => a.intersect(s),
            })
        })
    }

    /// The features of `wanted` this set lacks (empty: it has them all).
    pub fn lacks(&self, wanted: &CpuFeatures) -> Vec<Missing> {
        let mut out = Vec::new();
        for w in &wanted.leaves {
            let have = self.leaf(w.function, w.index).map(CpuidLeaf::registers);
            for (k, want) in w.registers().into_iter().enumerate() {
                let bits = want & !have.map_or(0, |h| h[k]);
                if bits != 0 {
                    out.push(Missing {
                        function: w.function,
                        index: w.index,
                        register: REGISTER_NAMES[k],
                        bits,
                    });
                }
            }
        }
        out
    }

    /// Masks one CPUID entry a vCPU would get: a feature leaf keeps only the feature
    /// bits this set has (non-feature registers untouched); leaf 0xd.0 offers only the
    /// XSAVE components whose features this set has. Other leaves are untouched.
    pub fn mask_entry(&self, function: u32, index: u32, regs: &mut [u32; 4]) {
        if let Some(which) = feature_registers(function, index) {
            let mask = self.leaf(function, index).map(CpuidLeaf::registers);
            for k in 0..4 {
                if which[k] {
                    regs[k] &= mask.map_or(0, |m| m[k]);
                }
            }
        } else if (function, index) == (0xd, 0) {
            let allowed = self.xcr0_allowed();
            regs[0] &= allowed as u32;
            regs[3] &= (allowed >> 32) as u32;
        }
    }

    /// The XCR0 bits (XSAVE components) this set allows: all but those of masked
    /// features.
    pub fn xcr0_allowed(&self) -> u64 {
        XSAVE_COMPONENTS
            .iter()
            .filter(|&&(_, (f, i), reg, bit)| self.register(f, i, reg) & bit == 0)
            .fold(u64::MAX, |acc, &(component, ..)| acc & !component)
    }
}

impl fmt::Display for CpuFeatures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&cpuid_fingerprint(&self.leaves))
    }
}

impl Serialize for CpuFeatures {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CpuFeatures {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        CpuFeatures::parse_mask(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, r: u32) -> CpuidLeaf {
        CpuidLeaf {
            function,
            index,
            eax: r,
            ebx: r + 1,
            ecx: r + 2,
            edx: r + 3,
        }
    }

    /// A host with the baseline and some more.
    fn host(extra_ecx1: u32, extra_ebx7: u32) -> CpuFeatures {
        let base_edx1 = BASELINE[0].2;
        let base_edx81 = BASELINE[1].2;
        CpuFeatures::from_leaves(&[
            CpuidLeaf {
                function: 1,
                eax: 0x906ea,
                ecx: 1 | extra_ecx1,
                edx: base_edx1,
                ..Default::default()
            },
            CpuidLeaf {
                function: 7,
                eax: 2,
                ebx: 1 | extra_ebx7,
                ..Default::default()
            },
            CpuidLeaf {
                function: 0x8000_0001,
                edx: base_edx81,
                ..Default::default()
            },
        ])
    }

    #[test]
    fn feature_parts_keep_feature_registers_only_and_the_fingerprint_is_sorted() {
        assert_eq!(leaf(4, 0, 9).feature_part(), None, "not a feature leaf");
        let one = leaf(1, 0, 0x10).feature_part().unwrap();
        assert_eq!((one.eax, one.ebx, one.ecx, one.edx), (0, 0, 0x12, 0x13));
        let xsave = leaf(0xd, 1, 0x20).feature_part().unwrap();
        assert_eq!(
            (xsave.eax, xsave.ebx, xsave.ecx, xsave.edx),
            (0x20, 0, 0, 0)
        );
        let a = cpuid_fingerprint(&[leaf(7, 0, 1), one]);
        let b = cpuid_fingerprint(&[one, leaf(7, 0, 1)]);
        assert_eq!(a, b, "order does not matter");
        assert!(a.starts_with("1.0:") && a.contains(",7.0:"), "{a}");
        assert_ne!(a, cpuid_fingerprint(&[one, leaf(7, 0, 2)]));
    }

    #[test]
    fn a_fingerprint_reads_back_as_the_same_set_and_bad_ones_name_their_fault() {
        let h = host(1 << 28, 1 << 16);
        let text = h.to_string();
        assert_eq!(CpuFeatures::parse(&text), Ok(h.clone()));
        // A leaf with no bits is the same as none.
        let zero = format!("{text},7.1:00000000000000000000000000000000");
        assert_eq!(CpuFeatures::parse(&zero), Ok(h.clone()));
        assert_eq!(CpuFeatures::parse_mask(&text), Ok(h));
        for (bad, want) in [
            ("1.0:00", "LEAF.SUBLEAF"),
            ("1.0:zz000000000000000000000000000000", "LEAF.SUBLEAF"),
            ("4.0:00000000000000000000000000000000", "lists no features"),
            (
                "1.0:00000001000000000000000000000000",
                "eax holds no feature bits",
            ),
            (
                "7.0:00000000000000000000000000000000,7.0:00000000000000000000000000000000",
                "twice",
            ),
        ] {
            let e = CpuFeatures::parse(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
        // Parses, but without long mode it is no mask for a 64-bit guest.
        let e = CpuFeatures::parse_mask("7.0:00000000ffffffff0000000000000000")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x86-64 baseline"), "{e}");
    }

    #[test]
    fn the_common_set_has_what_every_host_has_and_lacks_names_the_difference() {
        let new = host(1 << 28, 1 << 16 | 1 << 5);
        let old = host(0, 1 << 5);
        let common = CpuFeatures::common([&new, &old]).unwrap();
        assert_eq!(common, old.intersect(&new));
        assert!(new.lacks(&common).is_empty() && old.lacks(&common).is_empty());
        let missing = old.lacks(&new);
        assert_eq!(
            missing,
            vec![
                Missing {
                    function: 1,
                    index: 0,
                    register: "ecx",
                    bits: 1 << 28
                },
                Missing {
                    function: 7,
                    index: 0,
                    register: "ebx",
                    bits: 1 << 16
                },
            ]
        );
        assert_eq!(missing[0].to_string(), "cpuid 0x1.0 ecx bits 0x10000000");
        assert_eq!(CpuFeatures::common([]), None);
        // A leaf one host lacks is absent from the common set.
        let mut bare = old.clone();
        bare.leaves.retain(|l| l.function != 7);
        assert!(CpuFeatures::common([&new, &bare])
            .unwrap()
            .leaf(7, 0)
            .is_none());
    }

    #[test]
    fn a_mask_keeps_only_its_feature_bits_and_the_xsave_components_of_them() {
        let mask = host(0, 0); // no AVX, no AVX-512
        let mut one = [0x906ea, 0x0800_0800, 0xffff_ffff, 0xffff_ffff];
        mask.mask_entry(1, 0, &mut one);
        assert_eq!(one[0], 0x906ea, "eax is not a feature register");
        assert_eq!(one[1], 0x0800_0800, "ebx is not a feature register");
        assert_eq!(one[2], 1);
        assert_eq!(one[3], BASELINE[0].2);
        // A feature leaf absent from the mask loses its features.
        let mut seven_one = [0xffff_ffff; 4];
        mask.mask_entry(7, 1, &mut seven_one);
        assert_eq!(seven_one, [0; 4]);
        // Not a feature leaf: untouched.
        let mut four = [1, 2, 3, 4];
        mask.mask_entry(4, 0, &mut four);
        assert_eq!(four, [1, 2, 3, 4]);
        // XCR0: x87, SSE stay; YMM, opmask/ZMM, MPX, PKRU, AMX go.
        let mut xsave = [0x0006_02ff, 0x2440, 0x2440, 0];
        mask.mask_entry(0xd, 0, &mut xsave);
        assert_eq!(xsave[0], 0x3, "{:#x}", xsave[0]);
        assert_eq!(xsave[1], 0x2440, "sizes untouched");
        let avx = host(1 << 28, 1 << 16);
        let mut xsave = [0xe7, 0, 0, 0];
        avx.mask_entry(0xd, 0, &mut xsave);
        assert_eq!(
            xsave[0], 0xe7,
            "AVX and AVX-512 state kept with their features"
        );
    }

    #[test]
    fn serde_reads_a_mask_as_its_string_and_refuses_one_without_the_baseline() {
        let h = host(1 << 28, 0);
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, format!("\"{h}\""));
        let back: CpuFeatures = serde_json::from_str(&json).unwrap();
        assert_eq!(back, h);
        let e = serde_json::from_str::<CpuFeatures>("\"1.0:00000000000000000000000000000000\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("baseline"), "{e}");
    }
}
