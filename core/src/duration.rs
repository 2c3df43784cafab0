//! Durations as flags and files write them: `1500ms`, `3s`, `2.5s`, `5m`, `1h`, or a bare
//! number of seconds.

use std::time::Duration;

/// Parse a duration, or say what is wrong with it.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 3s or 500ms"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
            ));
        }
    };
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        // (text, milliseconds)
        let cases = [
            ("1500ms", 1500),
            ("3s", 3000),
            ("2.5s", 2500),
            ("5m", 300_000),
            ("2d", 172_800_000),
            ("1h", 3_600_000),
            ("7", 7000),
        ];
        for (text, ms) in cases {
            assert_eq!(parse(text), Ok(Duration::from_millis(ms)), "{text}");
        }
        assert!(parse("5w").unwrap_err().contains("unknown unit"));
        assert!(parse("soon").is_err());
    }
}
