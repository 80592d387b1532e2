//! JSON bodies and files read into the API's types with errors a person can act on:
//! the path of the field at fault (`disks[0].format: unknown value ...`), and no
//! Rust type names (each type says what it expects, `#[serde(expecting = ...)]`).
//! Sizes are bytes or strings with a K/M/G/T suffix ([`size`]).

use serde::de::DeserializeOwned;

/// `T` from JSON bytes; the error names the field it is about. The document must be
/// an object (serde would take a struct's fields from an array too, in order).
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        Some(_) => return Err("expected a JSON object ({ ... })".into()),
        None => return Err("the body is empty: expected a JSON object ({ ... })".into()),
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(describe)?;
    de.end().map_err(|e| e.to_string())?;
    Ok(value)
}

/// `T` from a JSON value (a part of a larger document), as [`from_slice`].
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(describe)
}

fn describe<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> String {
    let path = e.path().to_string();
    let inner = no_type_names(&plain_words(&e.inner().to_string()));
    if path.is_empty() || path == "." {
        inner
    } else {
        format!("{path}: {inner}")
    }
}

/// Serde's names of Rust's number types, in words.
const NUMBER_WORDS: [(&str, &str); 8] = [
    ("expected u8", "expected an integer from 0 to 255"),
    ("expected u16", "expected an integer from 0 to 65535"),
    ("expected u32", "expected an integer from 0 to 4294967295"),
    ("expected u64", "expected a non-negative integer"),
    ("expected i32", "expected an integer"),
    ("expected i64", "expected an integer"),
    ("expected f32", "expected a number"),
    ("expected f64", "expected a number"),
];

fn plain_words(message: &str) -> String {
    let mut m = message.to_string();
    for (rust, words) in NUMBER_WORDS {
        // Whole words only: "expected u8" but not "expected u8x".
        let mut out = String::with_capacity(m.len());
        let mut rest = m.as_str();
        while let Some(i) = rest.find(rust) {
            let after = &rest[i + rust.len()..];
            out.push_str(&rest[..i]);
            if after.starts_with(|c: char| c.is_ascii_alphanumeric()) {
                out.push_str(rust);
            } else {
                out.push_str(words);
            }
            rest = after;
        }
        out.push_str(rest);
        m = out;
    }
    m
}

/// Serde's phrases that name Rust types (`expected struct VmConfig with 8 elements`,
/// `expected unit variant OutputConfig::Tty`), in words: a person writing JSON knows
/// objects and values, not the types behind them.
fn no_type_names(message: &str) -> String {
    const KINDS: [&str; 6] = [
        "expected unit variant ",
        "expected struct variant ",
        "expected tuple variant ",
        "expected newtype variant ",
        "expected tuple struct ",
        "expected struct ",
    ];
    let mut m = message.to_string();
    while let Some((at, kind)) = KINDS
        .iter()
        .filter_map(|k| m.find(k).map(|i| (i, *k)))
        .min_by_key(|(i, k)| (*i, usize::MAX - k.len()))
    {
        let name_start = at + kind.len();
        let name_len = m[name_start..]
            .find(|c: char| c.is_whitespace())
            .unwrap_or(m.len() - name_start);
        let name = &m[name_start..name_start + name_len];
        let variant = name.rsplit("::").next().unwrap_or(name).to_lowercase();
        let mut end = name_start + name_len;
        let words = match kind {
            "expected unit variant " => {
                format!("expected no value here (\"{variant}\" takes none)")
            }
            "expected struct " => {
                // "... with 8 elements": serde counting the fields of an array.
                let rest = &m[end..];
                if let Some(tail) = rest.strip_prefix(" with ") {
                    if let Some(j) = tail.find(" element") {
                        end += " with ".len() + j + " element".len();
                        if m[end..].starts_with('s') {
                            end += 1;
                        }
                    }
                }
                "expected an object".to_string()
            }
            "expected tuple struct " => "expected a value".to_string(),
            _ => format!("expected the value of \"{variant}\""),
        };
        m.replace_range(at..end, &words);
    }
    // Enum variants are values to a JSON writer.
    m = m.replace("unknown variant `", "unknown value `");
    // An array where an object belongs: serde says "invalid length N".
    if let Some(rest) = m.strip_prefix("invalid length ") {
        if let Some(i) = rest.find(", expected ") {
            if rest[i..].contains("object") {
                m = format!("invalid type: array{}", &rest[i..]);
            }
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use crate::VmConfig;

    fn err(body: &str) -> String {
        super::from_slice::<VmConfig>(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn errors_name_the_field_and_no_rust_type() {
        let cases = [
            (
                r#"{"payload":{"kernel":"/k"},"serial":"tty"}"#,
                "serial: invalid type: string \"tty\", expected an output",
            ),
            (
                r#"{"payload":{"kernel":"/k"},"disks":[{"path":"/d","format":"qcow"}]}"#,
                "disks[0].format: unknown value `qcow`, expected `raw` or `vhdx`",
            ),
            (
                r#"{"payload":{"kernel":"/k"},"cpus":{"boot":"two"}}"#,
                "cpus.boot: invalid type: string \"two\", expected an integer from 0 to 255",
            ),
            (
                r#"{"payload":{"kernel":"/k"},"memory":{"size":"lots"}}"#,
                "memory.size: invalid value: string \"lots\", expected a size",
            ),
            ("[1, 2]", "expected a JSON object"),
            ("", "the body is empty"),
        ];
        for (body, expect) in cases {
            let e = err(body);
            assert!(e.contains(expect), "{body}: {e}");
            for rust in [
                "OutputConfig",
                "VmConfig",
                "PayloadConfig",
                "struct ",
                "enum ",
            ] {
                assert!(!e.contains(rust), "{body}: {e}");
            }
        }
    }

    /// Bodies whose errors serde words with Rust type names (`OutputConfig::Tty`,
    /// `struct NumaNode with 5 elements`) get plain words naming the field.
    #[test]
    fn serde_type_phrases_become_plain_words() {
        let cases = [
            (
                r#"{"payload":{"kernel":"/k"},"serial":{"mode":"tty","file":"/x"}}"#,
                r#"serial.file: invalid type: string "/x", expected no value here ("tty" takes none)"#,
            ),
            (
                r#"{"payload":{"kernel":"/k"},"numa":[[]]}"#,
                "numa[0]: invalid type: array, expected an object",
            ),
            (
                r#"{"payload":{"kernel":"/k"},"write_lease":[]}"#,
                "write_lease: invalid type: array, expected an object",
            ),
            (
                r#"{"payload":[]}"#,
                "payload: invalid type: array, expected payload: an object",
            ),
        ];
        for (body, expect) in cases {
            let e = err(body);
            assert!(e.starts_with(expect), "{body}: {e}");
            for rust in [
                "::",
                "struct ",
                "variant ",
                "element",
                "NumaNode",
                "WriteLease",
            ] {
                assert!(!e.contains(rust), "{body}: {e}");
            }
        }
        let e = super::from_slice::<crate::host::VmDefinition>(br#"{"config":[]}"#).unwrap_err();
        assert!(
            e.starts_with("config: invalid type: array, expected a VM configuration"),
            "{e}"
        );
        assert_eq!(
            super::no_type_names("expected struct variant Foo::BarBaz or x"),
            r#"expected the value of "barbaz" or x"#
        );
        assert_eq!(super::no_type_names("nothing to do"), "nothing to do");
    }

    #[test]
    fn sizes_are_bytes_or_suffixed_strings() {
        let c: VmConfig = super::from_slice(
            br#"{"payload":{"kernel":"/k"},"memory":{"size":"64M"},
                "disks":[{"path":"/d","size":"1G"}],"serial_max_size":"2M",
                "balloon":{"size":"16M"}}"#,
        )
        .unwrap();
        assert_eq!(c.memory.size, 64 << 20);
        assert_eq!(c.disks[0].size, Some(1 << 30));
        assert_eq!(c.serial_max_size, Some(2 << 20));
        assert_eq!(c.balloon.map(|b| b.size), Some(16 << 20));
        let c: VmConfig =
            super::from_slice(br#"{"payload":{"kernel":"/k"},"memory":{"size":67108864}}"#)
                .unwrap();
        assert_eq!(c.memory.size, 64 << 20);
        // Written back as numbers, read back the same.
        let again: VmConfig =
            super::from_slice(serde_json::to_string(&c).unwrap().as_bytes()).unwrap();
        assert_eq!(again, c);
        assert!(err(r#"{"payload":{"kernel":"/k"},"memory":{"size":-1}}"#).contains("memory.size"));
    }
}

/// Sizes in bytes that JSON may also give as strings with a suffix, as the command
/// line does: `"64M"`, `"2G"` (powers of 1024; [`crate::config::parse_size`]).
pub mod size {
    use serde::de::{self, Deserializer, Visitor};

    const EXPECTING: &str = "a size: bytes (an integer), or a string such as \"64M\" or \"2G\"";

    struct SizeVisitor;

    impl Visitor<'_> for SizeVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(EXPECTING)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            crate::config::parse_size(v)
                .ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
        }
    }

    /// `#[serde(deserialize_with = "crate::json::size::de")]`.
    pub fn de<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(SizeVisitor)
    }

    struct OptionalSize;

    impl<'de> Visitor<'de> for OptionalSize {
        type Value = Option<u64>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(EXPECTING)
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            de(d).map(Some)
        }
    }

    /// `#[serde(default, deserialize_with = "crate::json::size::de_opt")]`.
    pub fn de_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        d.deserialize_option(OptionalSize)
    }
}
