//! Sizes as users write them: a plain number of GiB (QingCloud's unit), or a number with a
//! binary unit suffix (`64M`, `10G`, `1T`, also `64MiB`).

use serde::{de, Deserialize, Deserializer, Serialize};

const GIB: f64 = (1u64 << 30) as f64;

/// A size in bytes, parsed from the wire's number-of-GiB or suffixed string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

/// On the wire a size we send is exact bytes with a unit (`"67108864B"`): a bare number would
/// be read back as GiB.
impl Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}B", self.0))
    }
}

/// Parses `"10"` (GiB), `"1.5"` (GiB), `"64M"`, `"512K"`, `"10G"`, `"1T"`, `"4096B"`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size (use GiB, or a suffix: 64M, 10G, 1T)"))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "G" | "GB" | "GIB" => GIB,
        "B" => 1.0,
        "K" | "KB" | "KIB" => 1024.0,
        "M" | "MB" | "MIB" => 1024.0 * 1024.0,
        "T" | "TB" | "TIB" => GIB * 1024.0,
        "P" | "PB" | "PIB" => GIB * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "{text:?} has an unknown unit {other:?} (use K, M, G or T)"
            ))
        }
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{text:?} is too large"));
    }
    Ok(bytes.round() as u64)
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Float(f64),
            Text(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            de::Error::custom("size must be a number of GiB or a string such as \"64M\"")
        })? {
            Raw::Int(g) => g
                .checked_mul(1 << 30)
                .map(Size)
                .ok_or_else(|| de::Error::custom(format!("size {g} GiB is too large"))),
            Raw::Float(g) if g.is_finite() && g >= 0.0 && g * GIB < u64::MAX as f64 => {
                Ok(Size((g * GIB).round() as u64))
            }
            Raw::Float(g) => Err(de::Error::custom(format!("size {g} is not a valid size"))),
            Raw::Text(t) => parse_size(&t).map(Size).map_err(de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("10"), Ok(10 << 30));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("0.5"), Ok(1 << 29));
        assert!(parse_size("-1").is_err());
        assert!(parse_size("ten").is_err());
        assert!(parse_size("10X").is_err());
        assert!(parse_size("1e30").is_err());
    }

    #[test]
    fn deserializes_numbers_and_strings() {
        let s: Size = serde_json::from_str("2").unwrap();
        assert_eq!(s.0, 2 << 30);
        let s: Size = serde_json::from_str("\"64M\"").unwrap();
        assert_eq!(s.0, 64 << 20);
        assert!(serde_json::from_str::<Size>("-5").is_err());
        assert!(serde_json::from_str::<Size>("true").is_err());
        assert!(serde_json::from_str::<Size>("99999999999999999999").is_err());
        let s = Size(64 << 20);
        assert_eq!(
            serde_json::from_value::<Size>(serde_json::to_value(s).unwrap()).unwrap(),
            s
        );
    }
}
