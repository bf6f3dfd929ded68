//! Scalars the way sops's Go libraries read and write them: which plain YAML scalars are
//! numbers, bools, nulls or timestamps (gopkg.in/yaml.v3 resolution), and Go's float and
//! time formatting. The MAC is computed over these text forms, so they must match Go's
//! byte for byte.

use std::fmt::Write as _;
use std::sync::OnceLock;

use regex::Regex;

use super::tree::Value;

/// A YAML timestamp as yaml.v3 accepts it (`2001-12-14`, `2001-12-14T21:59:43.1+01:00`,
/// `2001-12-14 21:59:43`), kept with its zone offset so it prints back the way Go does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    pub year: i32,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    pub nanos: u32,
    /// Offset east of UTC in seconds (0 prints as `Z`).
    pub offset: i32,
}

fn days_in_month(year: i32, month: u8) -> u8 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        _ => 28,
    }
}

/// Take 1 or 2 ASCII digits (Go's `getnum` for layout fields like `1`, `2`, `15`, `4`).
fn num12(s: &str) -> Option<(u32, &str)> {
    let b = s.as_bytes();
    let n = b.iter().take(2).take_while(|c| c.is_ascii_digit()).count();
    if n == 0 {
        return None;
    }
    Some((s[..n].parse().ok()?, &s[n..]))
}

impl Timestamp {
    /// Parse the layouts yaml.v3 tries (RFC 3339 with short fields, `t` or `T`; space
    /// separated without zone; date only). `None` if it is not a timestamp.
    pub fn parse(s: &str) -> Option<Timestamp> {
        // Quick check as in yaml.v3: four digits and a dash.
        let b = s.as_bytes();
        if b.len() < 5 || !b[..4].iter().all(u8::is_ascii_digit) || b[4] != b'-' {
            return None;
        }
        let year: i32 = s[..4].parse().ok()?;
        let (month, rest) = num12(&s[5..])?;
        let rest = rest.strip_prefix('-')?;
        let (day, rest) = num12(rest)?;
        let mut t = Timestamp {
            year,
            month: month as u8,
            day: day as u8,
            hour: 0,
            minute: 0,
            second: 0,
            nanos: 0,
            offset: 0,
        };
        if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, t.month) as u32 {
            return None;
        }
        if rest.is_empty() {
            return Some(t);
        }
        let (zoned, rest) = match rest.as_bytes()[0] {
            b'T' | b't' => (true, &rest[1..]),
            b' ' => (false, &rest[1..]),
            _ => return None,
        };
        let (hour, rest) = num12(rest)?;
        let (minute, rest) = num12(rest.strip_prefix(':')?)?;
        let (second, mut rest) = num12(rest.strip_prefix(':')?)?;
        if hour > 23 || minute > 59 || second > 59 {
            return None;
        }
        (t.hour, t.minute, t.second) = (hour as u8, minute as u8, second as u8);
        let rb = rest.as_bytes();
        if rb.len() >= 2 && (rb[0] == b'.' || rb[0] == b',') && rb[1].is_ascii_digit() {
            let n = rb[1..].iter().take_while(|c| c.is_ascii_digit()).count();
            let digits = &rest[1..1 + n];
            let mut nanos = 0u32;
            for (i, c) in digits.bytes().take(9).enumerate() {
                nanos += (c - b'0') as u32 * 10u32.pow(8 - i as u32);
            }
            t.nanos = nanos;
            rest = &rest[1 + n..];
        }
        if zoned {
            if let Some(r) = rest.strip_prefix('Z') {
                rest = r;
            } else {
                let rb = rest.as_bytes();
                if rb.len() < 6 || (rb[0] != b'+' && rb[0] != b'-') || rb[3] != b':' {
                    return None;
                }
                let hh: i32 = rest[1..3].parse().ok()?;
                let mm: i32 = rest[4..6].parse().ok()?;
                if hh > 24 || mm > 59 || !rest[1..3].bytes().all(|c| c.is_ascii_digit()) {
                    return None;
                }
                let off = hh * 3600 + mm * 60;
                t.offset = if rb[0] == b'-' { -off } else { off };
                rest = &rest[6..];
            }
        }
        rest.is_empty().then_some(t)
    }

    fn write_base(&self, out: &mut String) {
        let _ = write!(
            out,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        );
    }

    fn write_zone(&self, out: &mut String) {
        if self.offset == 0 {
            out.push('Z');
        } else {
            let sign = if self.offset < 0 { '-' } else { '+' };
            let a = self.offset.abs();
            let _ = write!(out, "{sign}{:02}:{:02}", a / 3600, a % 3600 / 60);
        }
    }

    /// Go's `time.RFC3339` layout (no fraction).
    pub fn rfc3339(&self) -> String {
        let mut s = String::new();
        self.write_base(&mut s);
        self.write_zone(&mut s);
        s
    }

    /// Go's `time.RFC3339Nano` layout (fraction without trailing zeros).
    pub fn rfc3339_nano(&self) -> String {
        let mut s = String::new();
        self.write_base(&mut s);
        if self.nanos != 0 {
            let frac = format!("{:09}", self.nanos);
            s.push('.');
            s.push_str(frac.trim_end_matches('0'));
        }
        self.write_zone(&mut s);
        s
    }
}

/// Go's `strconv.ParseInt(s, 0, 64)`: optional sign, then `0x`, `0o`, `0b`, a leading `0`
/// for octal, or decimal.
pub fn go_parse_int(s: &str) -> Option<i64> {
    let (neg, body) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let u = go_parse_uint_body(body)?;
    if neg {
        if u <= i64::MAX as u64 + 1 {
            Some((u as i64).wrapping_neg())
        } else {
            None
        }
    } else {
        i64::try_from(u).ok()
    }
}

fn go_parse_uint_body(body: &str) -> Option<u64> {
    let lower = body.get(..2).map(str::to_ascii_lowercase);
    let (radix, digits) = match lower.as_deref() {
        Some("0x") => (16, &body[2..]),
        Some("0o") => (8, &body[2..]),
        Some("0b") => (2, &body[2..]),
        _ if body.len() > 1 && body.starts_with('0') => (8, &body[1..]),
        _ => (10, body),
    };
    if digits.is_empty() || !digits.bytes().all(|c| (c as char).is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

fn yaml_style_float() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$").expect("static regex")
    })
}

fn base60_float() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$").expect("static regex")
    })
}

/// What yaml.v3 decodes an untagged plain scalar into.
pub fn resolve_plain(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Value::Float(f64::INFINITY)
        }
        "-.inf" | "-.Inf" | "-.INF" => return Value::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Value::Float(f64::NAN),
        _ => {}
    }
    match s.as_bytes()[0] {
        b'.' => match s.parse::<f64>() {
            Ok(f)
                if s[1..]
                    .bytes()
                    .all(|c| c.is_ascii_digit() || b"eE+-".contains(&c)) =>
            {
                Value::Float(f)
            }
            _ => Value::Str(s.to_string()),
        },
        b'0'..=b'9' | b'+' | b'-' => {
            if let Some(t) = Timestamp::parse(s) {
                return Value::Time(t);
            }
            let plain = s.replace('_', "");
            if let Some(i) = go_parse_int(&plain) {
                return Value::Int(i);
            }
            if let Some(u) = plain
                .strip_prefix('+')
                .map_or(go_parse_uint_body(&plain), go_parse_uint_body)
            {
                // Beyond i64: yaml.v3 gives a uint64, which sops cannot encrypt anyway.
                return Value::Float(u as f64);
            }
            if yaml_style_float().is_match(&plain) {
                if let Ok(f) = plain.parse::<f64>() {
                    return Value::Float(f);
                }
            }
            Value::Str(s.to_string())
        }
        _ => Value::Str(s.to_string()),
    }
}

/// Whether yaml.v3 may write this string unquoted: it must read back as a string, and
/// not look like a YAML 1.1 bool or base-60 number either.
pub fn plain_reads_as_string(s: &str) -> bool {
    if s == "<<" {
        return false;
    }
    matches!(resolve_plain(s), Value::Str(_))
        && !base60_float().is_match(s)
        && !matches!(
            s,
            "y" | "Y"
                | "yes"
                | "Yes"
                | "YES"
                | "n"
                | "N"
                | "no"
                | "No"
                | "NO"
                | "on"
                | "On"
                | "ON"
                | "off"
                | "Off"
                | "OFF"
        )
}

/// The shortest decimal digits of `f` and the exponent of the first digit.
fn shortest_digits(f: f64) -> (bool, String, i32) {
    let e = format!("{:e}", f.abs());
    let (mant, exp) = e.split_once('e').expect("LowerExp has an exponent");
    (
        f.is_sign_negative(),
        mant.replace('.', ""),
        exp.parse().expect("LowerExp exponent is an integer"),
    )
}

fn go_exp_form(neg: bool, digits: &str, exp: i32) -> String {
    let mut s = String::new();
    if neg {
        s.push('-');
    }
    s.push_str(&digits[..1]);
    if digits.len() > 1 {
        s.push('.');
        s.push_str(&digits[1..]);
    }
    let _ = write!(
        s,
        "e{}{:02}",
        if exp < 0 { '-' } else { '+' },
        exp.unsigned_abs()
    );
    s
}

/// Go's `strconv.FormatFloat(f, 'f', -1, 64)`: the MAC and ciphertext form of floats.
pub fn go_format_f(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        // Rust's Display is the shortest round-trip form, never in exponent notation.
        format!("{f}")
    }
}

/// How yaml.v3 writes a float: `FormatFloat(f, 'g', -1, 64)` and `.inf`/`.nan`.
pub fn yaml_float(f: f64) -> String {
    if f.is_nan() {
        return ".nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { ".inf" } else { "-.inf" }.into();
    }
    let (neg, digits, exp) = shortest_digits(f);
    if f != 0.0 && !(-4..6).contains(&exp) {
        go_exp_form(neg, &digits, exp)
    } else {
        format!("{f}")
    }
}

/// How Go's encoding/json writes a float64.
pub fn json_float(f: f64) -> String {
    let a = f.abs();
    if a != 0.0 && !(1e-6..1e21).contains(&a) {
        let (neg, digits, exp) = shortest_digits(f);
        let s = go_exp_form(neg, &digits, exp);
        // encoding/json trims e-07 to e-7.
        match s.find("e-0") {
            Some(i) if s.len() == i + 4 => format!("{}e-{}", &s[..i], &s[i + 3..]),
            _ => s,
        }
    } else {
        format!("{f}")
    }
}

/// Go's `strconv.ParseBool`.
pub fn go_parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_like_yaml_v3() {
        assert_eq!(resolve_plain("6443"), Value::Int(6443));
        assert_eq!(resolve_plain("0x1F"), Value::Int(31));
        assert_eq!(resolve_plain("0755"), Value::Int(493));
        assert_eq!(resolve_plain("0o17"), Value::Int(15));
        assert_eq!(resolve_plain("-0b101"), Value::Int(-5));
        assert_eq!(resolve_plain("1_000"), Value::Int(1000));
        // Not octal, not an int: yaml.v3 falls through to its float pattern.
        assert_eq!(resolve_plain("08"), Value::Float(8.0));
        assert_eq!(resolve_plain("1.5"), Value::Float(1.5));
        assert_eq!(resolve_plain(".5"), Value::Float(0.5));
        assert_eq!(resolve_plain("1e3"), Value::Float(1000.0));
        assert_eq!(resolve_plain("~"), Value::Null);
        assert_eq!(resolve_plain("True"), Value::Bool(true));
        assert_eq!(resolve_plain("yes"), Value::Str("yes".into()));
        assert_eq!(resolve_plain("1.2.3"), Value::Str("1.2.3".into()));
        assert_eq!(resolve_plain("-"), Value::Str("-".into()));
        assert!(matches!(resolve_plain("2001-12-14"), Value::Time(_)));
        assert!(matches!(resolve_plain(".nan"), Value::Float(f) if f.is_nan()));
    }

    #[test]
    fn quoting_decisions() {
        for s in [
            "123",
            "true",
            "null",
            "",
            "yes",
            "off",
            "y",
            "1:20",
            "2001-12-14",
            "<<",
        ] {
            assert!(!plain_reads_as_string(s), "{s}");
        }
        for s in ["abc", "v1alpha1", "1.2.3", "/dev/sda", "a b"] {
            assert!(plain_reads_as_string(s), "{s}");
        }
    }

    #[test]
    fn go_float_forms() {
        // Expected strings are Go's own output for these values.
        for (f, g, fixed, json) in [
            (1.0, "1", "1", "1"),
            (1.5, "1.5", "1.5", "1.5"),
            (1e21, "1e+21", "1000000000000000000000", "1e+21"),
            (123456.0, "123456", "123456", "123456"),
            (1234567.0, "1.234567e+06", "1234567", "1234567"),
            (0.0001, "0.0001", "0.0001", "0.0001"),
            (0.00001, "1e-05", "0.00001", "0.00001"),
            (1e-7, "1e-07", "0.0000001", "1e-7"),
            (-0.0, "-0", "-0", "-0"),
            (
                1.2345678901234567e19,
                "1.2345678901234567e+19",
                "12345678901234567000",
                "12345678901234567000",
            ),
        ] {
            assert_eq!(yaml_float(f), g, "{f}");
            assert_eq!(go_format_f(f), fixed, "{f}");
            assert_eq!(json_float(f), json, "{f}");
        }
    }

    #[test]
    fn timestamps() {
        let t = Timestamp::parse("2001-12-14").unwrap();
        assert_eq!(t.rfc3339_nano(), "2001-12-14T00:00:00Z");
        let t = Timestamp::parse("2001-12-14t21:59:43.10-05:00").unwrap();
        assert_eq!(t.rfc3339_nano(), "2001-12-14T21:59:43.1-05:00");
        assert_eq!(t.rfc3339(), "2001-12-14T21:59:43-05:00");
        let t = Timestamp::parse("2001-1-4 1:2:3").unwrap();
        assert_eq!(t.rfc3339_nano(), "2001-01-04T01:02:03Z");
        assert!(Timestamp::parse("2001-02-30").is_none());
        assert!(Timestamp::parse("2001-12-14 21:59:43 +01:00").is_none());
        assert!(Timestamp::parse("20011-12-14").is_none());
    }
}
