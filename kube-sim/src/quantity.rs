//! Kubernetes resource quantities (`500m`, `4Gi`, `8`, `1e3`) as integer milli-units.

/// Parse a quantity into milli-units (`"1"` → 1000, `"500m"` → 500, `"1Ki"` → 1_024_000).
pub fn parse_milli(q: &str) -> Result<i128, String> {
    let q = q.trim();
    let bad = || {
        format!(
            "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$': {q:?}"
        )
    };
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    if num.is_empty() {
        return Err(bad());
    }
    let (mul_num, mul_den): (i128, i128) = match suffix {
        "" => (1000, 1),
        "m" => (1, 1),
        "u" => (1, 1000),
        "n" => (1, 1_000_000),
        "k" => (1000 * 1000, 1),
        "M" => (1000 * 1_000_000, 1),
        "G" => (1000 * 1_000_000_000, 1),
        "T" => (1000 * 1_000_000_000_000, 1),
        "P" => (1000 * 1_000_000_000_000_000, 1),
        "Ki" => (1000 << 10, 1),
        "Mi" => (1000 << 20, 1),
        "Gi" => (1000 << 30, 1),
        "Ti" => (1000 << 40, 1),
        "Pi" => (1000 << 50, 1),
        s if s.starts_with(['e', 'E']) => {
            let exp: u32 = s[1..].parse().map_err(|_| bad())?;
            (1000 * 10i128.checked_pow(exp).ok_or_else(bad)?, 1)
        }
        _ => return Err(bad()),
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let neg = int.starts_with('-');
    let int_abs: i128 = int.trim_start_matches(['+', '-']).parse().unwrap_or(0);
    let mut value = int_abs * mul_num / mul_den;
    if !frac.is_empty() {
        let digits: i128 = frac.parse().map_err(|_| bad())?;
        let scale = 10i128.pow(frac.len() as u32);
        value += digits * mul_num / mul_den / scale;
    }
    Ok(if neg { -value } else { value })
}

/// Parse a whole-number quantity (extended resources such as `nvidia.com/gpu`).
pub fn parse_count(q: &str) -> Result<i64, String> {
    Ok((parse_milli(q)? / 1000) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_kubernetes_uses() {
        assert_eq!(parse_milli("1").unwrap(), 1000);
        assert_eq!(parse_milli("500m").unwrap(), 500);
        assert_eq!(parse_milli("1.5").unwrap(), 1500);
        assert_eq!(parse_milli("1Ki").unwrap(), 1024 * 1000);
        assert_eq!(parse_milli("80Gi").unwrap(), 80 * (1i128 << 30) * 1000);
        assert_eq!(parse_milli("1e3").unwrap(), 1_000_000);
        assert_eq!(parse_milli("2k").unwrap(), 2_000_000);
        assert_eq!(parse_count("8").unwrap(), 8);
        assert!(parse_milli("eight").is_err());
        assert!(parse_milli("8Qi").is_err());
    }
}
