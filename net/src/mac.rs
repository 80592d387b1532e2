//! Ethernet MAC addresses: parsing (`52:54:00:12:34:56`), formatting, serde as a string.

use std::fmt;
use std::str::FromStr;

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr([u8; 6]);

/// Why a string is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacParseError {
    #[error("'{0}' is not a MAC address (expected six hex bytes such as 52:54:00:12:34:56)")]
    Syntax(String),
    #[error("'{0}' is a multicast address; a NIC needs a unicast one (lowest bit of the first byte clear)")]
    Multicast(String),
}

impl MacAddr {
    pub const fn new(bytes: [u8; 6]) -> Self {
        Self(bytes)
    }

    pub const fn bytes(&self) -> [u8; 6] {
        self.0
    }

    /// A locally administered unicast address (52:54:00 is QEMU/KVM's customary
    /// prefix) whose last three bytes come from `seed`: stable for one VM's device.
    pub fn local_from_seed(seed: u64) -> Self {
        // splitmix64: spreads neighbouring seeds over the whole 24 bits.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let b = z.to_le_bytes();
        Self([0x52, 0x54, 0x00, b[0], b[1], b[2]])
    }

    /// A random locally administered unicast address (52:54:00:xx:xx:xx), from the
    /// kernel's random pool (falls back to the time if getrandom fails).
    pub fn random_local() -> Self {
        let mut seed = [0u8; 8];
        // SAFETY: getrandom writes at most `seed.len()` bytes into `seed`.
        let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
        let seed = if n == seed.len() as isize {
            u64::from_le_bytes(seed)
        } else {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        };
        Self::local_from_seed(seed)
    }

    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl FromStr for MacAddr {
    type Err = MacParseError;

    /// Six bytes of one or two hex digits, separated by `:` (or all by `-`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || MacParseError::Syntax(s.to_string());
        let sep = if s.contains('-') { '-' } else { ':' };
        let mut bytes = [0u8; 6];
        let mut parts = s.split(sep);
        for b in &mut bytes {
            let p = parts.next().ok_or_else(syntax)?;
            if p.is_empty() || p.len() > 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(syntax());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| syntax())?;
        }
        if parts.next().is_some() {
            return Err(syntax());
        }
        let mac = Self(bytes);
        if mac.is_multicast() {
            return Err(MacParseError::Multicast(s.to_string()));
        }
        Ok(mac)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        let m: MacAddr = "52:54:00:AB:cd:1".parse().unwrap();
        assert_eq!(m.bytes(), [0x52, 0x54, 0x00, 0xab, 0xcd, 0x01]);
        assert_eq!(m.to_string(), "52:54:00:ab:cd:01");
        assert_eq!(
            "02-00-00-00-00-07".parse::<MacAddr>().unwrap().bytes()[5],
            7
        );
    }

    #[test]
    fn rejects_what_is_not_a_unicast_mac() {
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:5g",
            "52:54:00:12:34:567",
            "52:54:00::34:56",
            "52:54:00-12:34:56",
            "+2:54:00:12:34:56",
        ] {
            assert!(
                matches!(bad.parse::<MacAddr>(), Err(MacParseError::Syntax(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            "01:00:5e:00:00:01".parse::<MacAddr>(),
            Err(MacParseError::Multicast(_))
        ));
    }

    #[test]
    fn serde_uses_the_text_form() {
        let m = MacAddr::new([0x52, 0x54, 0, 1, 2, 3]);
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, "\"52:54:00:01:02:03\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&j).unwrap(), m);
        let e = serde_json::from_str::<MacAddr>("\"nope\"").unwrap_err();
        assert!(e.to_string().contains("not a MAC address"), "{e}");
    }

    #[test]
    fn seeded_addresses_are_local_unicast_and_stable() {
        let a = MacAddr::local_from_seed(1);
        assert_eq!(a, MacAddr::local_from_seed(1));
        assert_ne!(a, MacAddr::local_from_seed(2));
        assert!(!a.is_multicast());
        assert_eq!(a.bytes()[0] & 2, 2, "locally administered");
        let (r1, r2) = (MacAddr::random_local(), MacAddr::random_local());
        assert_ne!(r1, r2);
        assert!(!r1.is_multicast() && r1.bytes()[..3] == [0x52, 0x54, 0]);
    }
}
