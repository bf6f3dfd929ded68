//! Writing YAML as `sops -d` prints it: gopkg.in/yaml.v3 with an indent of 4, whose
//! style choices (plain, quoted, literal block) and indentation rules are reproduced here.

use base64::Engine as _;

use crate::sops::scalar;
use crate::sops::tree::{MapItem, Value};

/// yaml.v3's indent as sops configures it.
const INDENT: usize = 4;

/// Emit documents as `sops -d` prints them.
pub fn emit_stream(docs: &[Value]) -> String {
    let mut out = String::new();
    for (i, doc) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        match doc {
            Value::Map(items) if items.iter().any(|i| matches!(i, MapItem::Pair(..))) => {
                emit_map(&mut out, items, 0, false)
            }
            Value::Map(items) => {
                for item in items {
                    if let MapItem::Comment(c) = item {
                        out.push('#');
                        out.push_str(c);
                        out.push('\n');
                    }
                }
                out.push_str("{}\n");
            }
            other => emit_scalar(&mut out, other, 0, false),
        }
    }
    out
}

/// yaml.v3's next block indentation: aligned to multiples of the indent.
fn deeper(indent: usize) -> usize {
    INDENT * ((indent + INDENT) / INDENT)
}

fn pad(out: &mut String, n: usize) {
    out.extend(std::iter::repeat_n(' ', n));
}

fn end_line(out: &mut String) {
    if !out.ends_with('\n') {
        out.push('\n');
    }
}

fn is_empty_collection(v: &Value) -> Option<&'static str> {
    match v {
        Value::Map(items) if !items.iter().any(|i| matches!(i, MapItem::Pair(..))) => Some("{}"),
        Value::Seq(items) if !items.iter().any(|i| !matches!(i, Value::Comment(_))) => Some("[]"),
        _ => None,
    }
}

/// A block map whose keys sit at column `indent`; with `inline`, the first line is
/// already positioned (after a list dash).
fn emit_map(out: &mut String, items: &[MapItem], indent: usize, inline: bool) {
    let mut first = true;
    for item in items {
        if !(first && inline) {
            pad(out, indent);
        }
        match item {
            MapItem::Comment(c) => {
                out.push('#');
                out.push_str(c);
                out.push('\n');
                // A comment cannot follow the dash: the next line is a fresh one.
                if first && inline {
                    first = false;
                    continue;
                }
            }
            MapItem::Pair(k, v) => {
                if k.contains('\n') {
                    out.push_str("? ");
                    emit_string(out, k, deeper(indent), false);
                    end_line(out);
                    pad(out, indent);
                    out.push(':');
                } else {
                    emit_string(out, k, indent, true);
                    out.push(':');
                }
                emit_value_after_key(out, v, indent);
            }
        }
        first = false;
    }
}

fn emit_value_after_key(out: &mut String, v: &Value, indent: usize) {
    if let Some(empty) = is_empty_collection(v) {
        out.push(' ');
        out.push_str(empty);
        out.push('\n');
        return;
    }
    match v {
        Value::Map(items) => {
            out.push('\n');
            emit_map(out, items, deeper(indent), false);
        }
        Value::Seq(items) => {
            out.push('\n');
            emit_seq(out, items, deeper(indent), false);
        }
        _ => {
            out.push(' ');
            emit_scalar(out, v, deeper(indent), false);
        }
    }
}

/// A block list whose dashes sit at column `indent`.
fn emit_seq(out: &mut String, items: &[Value], indent: usize, inline: bool) {
    let mut first = true;
    for item in items {
        if let Value::Comment(c) = item {
            if first && inline {
                // yaml.v3 would hoist it; keep it on its own line.
                out.push('\n');
            }
            pad(out, indent);
            out.push('#');
            out.push_str(c);
            out.push('\n');
            first = false;
            continue;
        }
        // Comments leading an item map are written before its dash.
        let (leading, rest): (Vec<&MapItem>, &[MapItem]) = match item {
            Value::Map(m) => {
                let n = m
                    .iter()
                    .take_while(|i| matches!(i, MapItem::Comment(_)))
                    .count();
                (m[..n].iter().collect(), &m[n..])
            }
            _ => (Vec::new(), &[]),
        };
        for c in leading {
            if let MapItem::Comment(c) = c {
                if first && inline {
                    out.push('\n');
                }
                pad(out, indent);
                out.push('#');
                out.push_str(c);
                out.push('\n');
                first = false;
            }
        }
        if !(first && inline) {
            pad(out, indent);
        }
        out.push_str("- ");
        if let Some(empty) = is_empty_collection(item) {
            out.push_str(empty);
            out.push('\n');
        } else {
            match item {
                Value::Map(_) => emit_map(out, rest, indent + 2, true),
                Value::Seq(s) => emit_seq(out, s, indent + 2, true),
                _ => emit_scalar(out, item, indent + 2, false),
            }
        }
        first = false;
    }
}

/// A scalar at the current position; block scalar content goes at `indent`.
fn emit_scalar(out: &mut String, v: &Value, indent: usize, key: bool) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Int(i) => out.push_str(&i.to_string()),
        Value::Float(f) => out.push_str(&scalar::yaml_float(*f)),
        Value::Time(t) => out.push_str(&t.rfc3339_nano()),
        Value::Str(s) => emit_string(out, s, indent, key),
        Value::Bytes(b) => {
            out.push_str("!!binary ");
            out.push_str(&base64::engine::general_purpose::STANDARD.encode(b));
        }
        Value::Comment(c) => {
            out.push('#');
            out.push_str(c);
        }
        Value::Map(_) | Value::Seq(_) => unreachable!("collections are emitted by their parent"),
    }
    end_line(out);
}

fn is_break(c: char) -> bool {
    matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}')
}

fn is_blankz(c: Option<char>) -> bool {
    match c {
        None => true,
        Some(c) => c == ' ' || c == '\t' || is_break(c) || c == '\0',
    }
}

/// libyaml's notion of printable (yaml.v3 writes everything else escaped).
fn is_printable(c: char) -> bool {
    let u = c as u32;
    u == 0x0A
        || (0x20..=0x7E).contains(&u)
        || (0xA0..=0xD7FF).contains(&u)
        || ((0xE000..=0xFFFD).contains(&u) && u != 0xFEFF)
}

struct Allowed {
    block_plain: bool,
    single: bool,
    block: bool,
}

/// yaml.v3's scalar analysis, for the block context sops writes in.
fn analyze(s: &str) -> Allowed {
    let chars: Vec<char> = s.chars().collect();
    if chars.is_empty() {
        return Allowed {
            block_plain: true,
            single: true,
            block: false,
        };
    }
    let mut block_ind = s.starts_with("---") || s.starts_with("...");
    let (mut line_breaks, mut special, mut tabs) = (false, false, false);
    let (mut leading_space, mut leading_break, mut trailing_space, mut trailing_break) =
        (false, false, false, false);
    let (mut break_space, mut space_break) = (false, false);
    let (mut prev_space, mut prev_break) = (false, false);
    let mut preceded_by_ws = true;
    let n = chars.len();
    for i in 0..n {
        let c = chars[i];
        let followed_by_ws = is_blankz(chars.get(i + 1).copied());
        if i == 0 {
            match c {
                '#' | ',' | '[' | ']' | '{' | '}' | '&' | '*' | '!' | '|' | '>' | '\'' | '"'
                | '%' | '@' | '`' => block_ind = true,
                '?' | ':' if followed_by_ws => block_ind = true,
                '-' if followed_by_ws => block_ind = true,
                _ => {}
            }
        } else {
            match c {
                ':' if followed_by_ws => block_ind = true,
                '#' if preceded_by_ws => block_ind = true,
                _ => {}
            }
        }
        if c == '\t' {
            tabs = true;
        } else if !is_printable(c) {
            special = true;
        }
        if is_break(c) {
            line_breaks = true;
        }
        if c == ' ' {
            leading_space |= i == 0;
            trailing_space |= i == n - 1;
            break_space |= prev_break;
            (prev_space, prev_break) = (true, false);
        } else if is_break(c) {
            leading_break |= i == 0;
            trailing_break |= i == n - 1;
            space_break |= prev_space;
            (prev_space, prev_break) = (false, true);
        } else {
            (prev_space, prev_break) = (false, false);
        }
        preceded_by_ws = is_blankz(Some(c));
    }
    let mut a = Allowed {
        block_plain: true,
        single: true,
        block: true,
    };
    if leading_space || leading_break || trailing_space || trailing_break {
        a.block_plain = false;
    }
    if trailing_space {
        a.block = false;
    }
    if break_space {
        a.block_plain = false;
        a.single = false;
    }
    if space_break || tabs || special {
        a.block_plain = false;
        a.single = false;
    }
    if space_break || special {
        a.block = false;
    }
    if line_breaks || block_ind {
        a.block_plain = false;
    }
    a
}

#[derive(PartialEq)]
enum Style {
    Plain,
    Single,
    Double,
    Literal,
}

fn choose_style(s: &str, key: bool) -> Style {
    let mut style = if s.contains('\n') {
        Style::Literal
    } else if scalar::plain_reads_as_string(s) {
        Style::Plain
    } else {
        Style::Double
    };
    let a = analyze(s);
    if style == Style::Plain && !a.block_plain {
        style = Style::Single;
    }
    if style == Style::Single && !a.single {
        style = Style::Double;
    }
    if style == Style::Literal && (!a.block || key) {
        style = Style::Double;
    }
    style
}

fn emit_string(out: &mut String, s: &str, indent: usize, key: bool) {
    if s == "<<" {
        // yaml.v3 marks a literal "<<" with the merge tag.
        out.push_str("!!merge <<");
        return;
    }
    match choose_style(s, key) {
        Style::Plain => out.push_str(s),
        Style::Single => {
            out.push('\'');
            out.push_str(&s.replace('\'', "''"));
            out.push('\'');
        }
        Style::Double => write_double(out, s),
        Style::Literal => write_literal(out, s, indent),
    }
}

fn write_double(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        if !is_printable(c) || c == '\u{FEFF}' || is_break(c) || c == '"' || c == '\\' {
            match c {
                '\0' => out.push_str("\\0"),
                '\x07' => out.push_str("\\a"),
                '\x08' => out.push_str("\\b"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\x0B' => out.push_str("\\v"),
                '\x0C' => out.push_str("\\f"),
                '\r' => out.push_str("\\r"),
                '\x1B' => out.push_str("\\e"),
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\u{85}' => out.push_str("\\N"),
                '\u{A0}' => out.push_str("\\_"),
                '\u{2028}' => out.push_str("\\L"),
                '\u{2029}' => out.push_str("\\P"),
                c if (c as u32) <= 0xFF => out.push_str(&format!("\\x{:02X}", c as u32)),
                c if (c as u32) <= 0xFFFF => out.push_str(&format!("\\u{:04X}", c as u32)),
                c => out.push_str(&format!("\\U{:08X}", c as u32)),
            }
        } else {
            out.push(c);
        }
    }
    out.push('"');
}

fn write_literal(out: &mut String, s: &str, indent: usize) {
    out.push('|');
    let first = s.chars().next();
    if first.is_some_and(|c| c == ' ' || is_break(c)) {
        out.push_str(&INDENT.to_string());
    }
    let mut rev = s.chars().rev();
    let last = rev.next();
    if !last.is_some_and(is_break) {
        out.push('-');
    } else if rev.next().is_none_or(is_break) {
        out.push('+');
    }
    out.push('\n');
    let mut line_start = true;
    for c in s.chars() {
        if is_break(c) {
            out.push(c);
            line_start = true;
        } else {
            if line_start {
                pad(out, indent);
                line_start = false;
            }
            out.push(c);
        }
    }
}
