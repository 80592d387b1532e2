//! Sizes as qemu-img writes them: `512`, `64K`, `32M`, `1G`, `2T` (powers of 1024).

use crate::CliResult;

pub fn parse(s: &str) -> CliResult<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'B' => 1,
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'P' => 1 << 50,
                _ => return Err(format!("Invalid size '{s}'")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let v: f64 = num.parse().map_err(|_| format!("Invalid size '{s}'"))?;
    if v.is_nan() || v < 0.0 || !v.is_finite() {
        return Err(format!("Invalid size '{s}'"));
    }
    let r = v * mult as f64;
    if r > u64::MAX as f64 / 2.0 {
        return Err(format!("Size '{s}' is too large"));
    }
    Ok(r.round() as u64)
}
