//! JSON in and out of the sops document model, the way sops's JSON store does it: key
//! order kept, every number a float64, output indented with tabs and escaped like Go's
//! encoding/json.

use anyhow::{bail, Context, Result};

use super::scalar;
use super::tree::{MapItem, Value};

/// Parse a JSON document whose top level is an object.
pub fn parse(text: &str) -> Result<Value> {
    let mut p = JsonParser {
        s: text.as_bytes(),
        text,
        i: 0,
    };
    p.ws();
    if p.peek() != Some(b'{') {
        bail!("the JSON document is not an object");
    }
    let v = p.value(0)?;
    p.ws();
    if p.i != p.s.len() {
        bail!("trailing data after the JSON object at byte {}", p.i);
    }
    Ok(v)
}

/// JSON nesting deeper than this is refused (stack safety).
const MAX_DEPTH: usize = 512;

struct JsonParser<'a> {
    s: &'a [u8],
    text: &'a str,
    i: usize,
}

impl JsonParser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn err<T>(&self, what: &str) -> Result<T> {
        match self.peek() {
            None => bail!("invalid JSON: unexpected end of input (the file looks truncated)"),
            Some(_) => bail!("invalid JSON at byte {}: {what}", self.i),
        }
    }

    fn expect(&mut self, c: u8) -> Result<()> {
        self.ws();
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            self.err(&format!("expected '{}'", c as char))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value> {
        if depth > MAX_DEPTH {
            bail!("JSON nested too deeply");
        }
        self.ws();
        match self.peek() {
            Some(b'{') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.peek() == Some(b'}') {
                    self.i += 1;
                    return Ok(Value::Map(items));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    self.expect(b':')?;
                    let v = self.value(depth + 1)?;
                    items.push(MapItem::Pair(k, v));
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Value::Map(items));
                        }
                        _ => return self.err("expected ',' or '}'"),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Ok(Value::Seq(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Value::Seq(items));
                        }
                        _ => return self.err("expected ',' or ']'"),
                    }
                }
            }
            Some(b'"') => Ok(Value::Str(self.string()?)),
            Some(b't') => self.word("true", Value::Bool(true)),
            Some(b'f') => self.word("false", Value::Bool(false)),
            Some(b'n') => self.word("null", Value::Null),
            Some(b'-' | b'0'..=b'9') => {
                let start = self.i;
                while matches!(
                    self.peek(),
                    Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                ) {
                    self.i += 1;
                }
                let n = &self.text[start..self.i];
                // encoding/json decodes every number into a float64.
                n.parse::<f64>()
                    .map(Value::Float)
                    .with_context(|| format!("invalid JSON number {n:?} at byte {start}"))
            }
            _ => self.err("expected a value"),
        }
    }

    fn word(&mut self, w: &str, v: Value) -> Result<Value> {
        if self.s[self.i..].starts_with(w.as_bytes()) {
            self.i += w.len();
            Ok(v)
        } else {
            self.err("expected a value")
        }
    }

    fn hex4(&mut self) -> Result<u32> {
        let h = self
            .text
            .get(self.i..self.i + 4)
            .and_then(|h| u32::from_str_radix(h, 16).ok());
        match h {
            Some(v) => {
                self.i += 4;
                Ok(v)
            }
            None => self.err("bad \\u escape"),
        }
    }

    fn string(&mut self) -> Result<String> {
        if self.peek() != Some(b'"') {
            return self.err("expected a string");
        }
        self.i += 1;
        let mut out = String::new();
        loop {
            let start = self.i;
            while !matches!(self.peek(), Some(b'"' | b'\\') | None) {
                if self.s[self.i] < 0x20 {
                    return self.err("control character in string");
                }
                self.i += 1;
            }
            out.push_str(&self.text[start..self.i]);
            match self.peek() {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.i += 1;
                    let c = self.peek();
                    self.i += 1;
                    match c {
                        Some(b'"') => out.push('"'),
                        Some(b'\\') => out.push('\\'),
                        Some(b'/') => out.push('/'),
                        Some(b'b') => out.push('\u{8}'),
                        Some(b'f') => out.push('\u{c}'),
                        Some(b'n') => out.push('\n'),
                        Some(b'r') => out.push('\r'),
                        Some(b't') => out.push('\t'),
                        Some(b'u') => {
                            let mut c = self.hex4()?;
                            if (0xD800..0xDC00).contains(&c) && self.s[self.i..].starts_with(b"\\u")
                            {
                                self.i += 2;
                                let lo = self.hex4()?;
                                if (0xDC00..0xE000).contains(&lo) {
                                    c = 0x10000 + ((c - 0xD800) << 10) + (lo - 0xDC00);
                                } else {
                                    out.push('\u{FFFD}');
                                    c = lo;
                                }
                            }
                            out.push(char::from_u32(c).unwrap_or('\u{FFFD}'));
                        }
                        _ => {
                            self.i -= 1;
                            return self.err("bad escape");
                        }
                    }
                }
                _ => return self.err("unterminated string"),
            }
        }
    }
}

/// Emit a document as `sops -d` prints JSON: tab indentation, `{}`/`[]` for empty
/// collections, Go's escaping, and a final newline.
pub fn emit(doc: &Value) -> Result<String> {
    let mut out = String::new();
    value(&mut out, doc, 0)?;
    out.push('\n');
    Ok(out)
}

fn newline(out: &mut String, depth: usize) {
    out.push('\n');
    out.extend(std::iter::repeat_n('\t', depth));
}

fn value(out: &mut String, v: &Value, depth: usize) -> Result<()> {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Int(i) => out.push_str(&i.to_string()),
        Value::Float(f) if !f.is_finite() => bail!("JSON cannot hold the number {f}"),
        Value::Float(f) => out.push_str(&scalar::json_float(*f)),
        Value::Str(s) => string(out, s),
        Value::Time(t) => string(out, &t.rfc3339_nano()),
        Value::Bytes(b) => string(out, &String::from_utf8_lossy(b)),
        Value::Comment(_) => {}
        Value::Map(items) => {
            let pairs: Vec<(&String, &Value)> = items
                .iter()
                .filter_map(|i| match i {
                    MapItem::Pair(k, v) => Some((k, v)),
                    MapItem::Comment(_) => None,
                })
                .collect();
            out.push('{');
            for (n, (k, v)) in pairs.iter().enumerate() {
                newline(out, depth + 1);
                string(out, k);
                out.push_str(": ");
                value(out, v, depth + 1)?;
                if n + 1 < pairs.len() {
                    out.push(',');
                }
            }
            if !pairs.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        Value::Seq(items) => {
            let vals: Vec<&Value> = items
                .iter()
                .filter(|v| !matches!(v, Value::Comment(_)))
                .collect();
            out.push('[');
            for (n, v) in vals.iter().enumerate() {
                newline(out, depth + 1);
                value(out, v, depth + 1)?;
                if n + 1 < vals.len() {
                    out.push(',');
                }
            }
            if !vals.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
    }
    Ok(())
}

/// A JSON string as Go's encoding/json writes it (HTML-safe escapes included).
fn string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_in_order_with_floats() {
        let v = parse(r#"{"b": 1, "a": [true, null, "x\u00e9\n"], "c": {}}"#).unwrap();
        assert_eq!(
            v,
            Value::Map(vec![
                MapItem::Pair("b".into(), Value::Float(1.0)),
                MapItem::Pair(
                    "a".into(),
                    Value::Seq(vec![
                        Value::Bool(true),
                        Value::Null,
                        Value::Str("xé\n".into())
                    ])
                ),
                MapItem::Pair("c".into(), Value::Map(vec![])),
            ])
        );
        assert!(parse("[1]").is_err());
        assert!(parse(r#"{"a": 1"#).is_err());
        assert!(parse(r#"{"a": 1} x"#).is_err());
    }

    #[test]
    fn emits_like_go() {
        // Expected text: what sops 3.11 printed for the same document.
        let v =
            parse(r#"{"a": 1, "f": [1, "x", {"g": 2}], "h": {}, "i": [], "u": "hé <>&"}"#).unwrap();
        assert_eq!(
            emit(&v).unwrap(),
            "{\n\t\"a\": 1,\n\t\"f\": [\n\t\t1,\n\t\t\"x\",\n\t\t{\n\t\t\t\"g\": 2\n\t\t}\n\t],\n\t\"h\": {},\n\t\"i\": [],\n\t\"u\": \"hé \\u003c\\u003e\\u0026\"\n}\n"
        );
    }
}
