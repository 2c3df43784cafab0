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

/// The canonical form the API server stores a quantity in (`1000m` → `1`, `0.5` → `500m`,
/// `2048Mi` → `2Gi`, `1536Ki` → `1536Ki`, `1500M` → `1500M`). Quantities finer than a
/// milli-unit keep their text.
pub fn canonical(q: &str) -> Result<String, String> {
    let v = parse_milli(q)?;
    let q = q.trim();
    if q.ends_with(['u', 'n'])
        || q.split_once('.')
            .is_some_and(|(_, f)| f.trim_end_matches(|c: char| !c.is_ascii_digit()).len() > 3)
    {
        return Ok(q.to_string());
    }
    if v == 0 {
        return Ok("0".into());
    }
    let binary = q.ends_with('i');
    let exponent = q.contains(['e', 'E']);
    if binary && v % 1000 == 0 {
        let n = v / 1000;
        let k = (0..=5u32)
            .rev()
            .find(|k| n % (1i128 << (10 * k)) == 0)
            .unwrap_or(0);
        let suffix = ["", "Ki", "Mi", "Gi", "Ti", "Pi"][k as usize];
        return Ok(format!("{}{suffix}", n >> (10 * k)));
    }
    if v % 1000 != 0 {
        return Ok(if exponent {
            format!("{v}e-3")
        } else {
            format!("{v}m")
        });
    }
    let n = v / 1000;
    let k = (0..=6u32)
        .rev()
        .find(|k| n % 1000i128.pow(*k) == 0)
        .unwrap_or(0);
    let mantissa = n / 1000i128.pow(k);
    Ok(match (exponent, k) {
        (true, 0) => format!("{mantissa}"),
        (true, k) => format!("{mantissa}e{}", 3 * k),
        (false, k) => format!(
            "{mantissa}{}",
            ["", "k", "M", "G", "T", "P", "E"][k as usize]
        ),
    })
}

/// Fields whose members are quantities: resource requirements, node capacity, pod overhead,
/// DRA device capacity.
const QUANTITY_MAPS: &[&str] = &["requests", "limits", "capacity", "allocatable", "overhead"];

/// Rewrite every quantity in an object to its canonical string, as the API server's decoding
/// does; a number (`nvidia.com/gpu: 1` in YAML) becomes a string. The error names the field.
pub fn normalize(obj: &mut serde_json::Value) -> Result<(), String> {
    walk(obj, "")
}

fn walk(v: &mut serde_json::Value, path: &str) -> Result<(), String> {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                let here = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                if QUANTITY_MAPS.contains(&k.as_str())
                    && let Value::Object(q) = child
                {
                    for (name, value) in q.iter_mut() {
                        let at = format!("{here}[{name}]");
                        match value {
                            // DRA: `capacity: {memory: {value: 80Gi}}`.
                            Value::Object(o) => {
                                if let Some(x) = o.get_mut("value") {
                                    quantity(x, &format!("{at}.value"))?;
                                }
                            }
                            x => quantity(x, &at)?,
                        }
                    }
                    continue;
                }
                if k == "sizeLimit" {
                    quantity(child, &here)?;
                    continue;
                }
                walk(child, &here)?;
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter_mut().enumerate() {
                walk(child, &format!("{path}[{i}]"))?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn quantity(v: &mut serde_json::Value, path: &str) -> Result<(), String> {
    let text = match &*v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::Null => return Ok(()),
        other => {
            return Err(format!(
                "{path}: a quantity must be a string or a number, not {other}"
            ));
        }
    };
    *v = serde_json::Value::String(canonical(&text).map_err(|e| format!("{path}: {e}"))?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms_match_the_api_server() {
        for (given, want) in [
            ("1", "1"),
            ("1000m", "1"),
            ("0.5", "500m"),
            ("1500m", "1500m"),
            ("2048Mi", "2Gi"),
            ("1536Ki", "1536Ki"),
            ("1.5Ki", "1536"),
            ("1500M", "1500M"),
            ("1000M", "1G"),
            ("2e3", "2e3"),
            ("0", "0"),
            ("100n", "100n"),
        ] {
            assert_eq!(canonical(given).unwrap(), want, "{given}");
        }
    }

    #[test]
    fn numbers_become_strings_and_bad_ones_name_the_field() {
        let mut pod = serde_json::json!({"spec": {"containers": [{"resources": {
            "requests": {"nvidia.com/gpu": 1, "cpu": 0.5, "memory": "1024Mi"},
            "limits": {"nvidia.com/gpu": 1}}}],
            "volumes": [{"emptyDir": {"sizeLimit": 1073741824}}]}});
        normalize(&mut pod).unwrap();
        let r = &pod["spec"]["containers"][0]["resources"];
        assert_eq!(r["requests"]["nvidia.com/gpu"], "1");
        assert_eq!(r["requests"]["cpu"], "500m");
        assert_eq!(r["requests"]["memory"], "1Gi");
        assert_eq!(
            pod["spec"]["volumes"][0]["emptyDir"]["sizeLimit"],
            "1073741824"
        );
        let mut bad = serde_json::json!({"spec": {"containers": [{"resources": {"limits": {"cpu": "lots"}}}]}});
        let e = normalize(&mut bad).unwrap_err();
        assert!(
            e.starts_with("spec.containers[0].resources.limits[cpu]: quantities must match"),
            "{e}"
        );
    }

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
