//! Human sizes: parsing "20G" and printing "1.5 GiB".

/// Parses a size: a number with an optional unit. `K`, `M`, `G`, `T`, `P`
/// (optionally followed by `iB` or `B`) are powers of 1024, as qemu-img
/// reads them; `s` means 512-byte sectors; no unit means bytes. A decimal
/// fraction is allowed with a unit ("1.5G"). Returns bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit = unit.trim();
    let bad = || {
        format!(
            "'{text}' is not a size (examples: 20G, 512M, 1.5T, 4096s for sectors, 1048576 for bytes)"
        )
    };
    if number.is_empty() || number.matches('.').count() > 1 {
        return Err(bad());
    }
    let lower = unit.to_ascii_lowercase();
    let scale: u64 = match lower.trim_end_matches("ib").trim_end_matches('b') {
        "" if lower.is_empty() || lower == "b" => 1,
        "s" if lower == "s" => 512,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        "p" => 1 << 50,
        _ => return Err(bad()),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let mut bytes = whole
        .checked_mul(scale)
        .ok_or_else(|| format!("'{text}' is too large"))?;
    if !fraction.is_empty() {
        if scale == 1 || scale == 512 || fraction.len() > 9 {
            return Err(bad());
        }
        let digits: u64 = fraction.parse().map_err(|_| bad())?;
        let denominator = 10u64.pow(fraction.len() as u32);
        let part = u128::from(digits) * u128::from(scale) / u128::from(denominator);
        bytes = bytes
            .checked_add(part as u64)
            .ok_or_else(|| format!("'{text}' is too large"))?;
    }
    Ok(bytes)
}

/// Bytes in the largest binary unit that keeps the number at least 1,
/// with up to one decimal ("64 MiB", "1.5 GiB", "512 bytes").
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let text = format!("{value:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("20GiB"), Ok(20 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("4096s"), Ok(4096 * 512));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("abc").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("-5G").is_err());
        assert!(parse_size("99999999999P").is_err());
    }

    #[test]
    fn sizes_print() {
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(64 << 20), "64 MiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }
}
