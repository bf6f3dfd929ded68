//! YAML streams in and out of the sops document model.
//!
//! Reading uses saphyr-parser for the structure and finds comment lines itself (the
//! parser drops them), placing each before the item it precedes. Writing reproduces what
//! `sops -d` prints (gopkg.in/yaml.v3 with an indent of 4): same key order, documents
//! separated by `---`, multi-line strings as literal block scalars, and the same choice
//! of plain, single- or double-quoted strings.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use saphyr_parser::{Event, Parser, ScalarStyle, Span};

use super::scalar::{self, resolve_plain, Timestamp};
use super::tree::{MapItem, Value};

mod emit;
pub use emit::emit_stream;

struct Comment {
    line: usize,
    col: usize,
    text: String,
}

struct Reader<'a> {
    events: Vec<(Event<'a>, Span)>,
    pos: usize,
    comments: Vec<Comment>,
    next_comment: usize,
    anchors: HashMap<usize, Value>,
}

/// Parse a YAML stream into one map per document. Empty documents become empty maps (as
/// in sops); a document that is a list or a scalar is an error.
pub fn parse_stream(text: &str) -> Result<Vec<Value>> {
    let mut events = Vec::new();
    for ev in Parser::new_from_str(text) {
        let (ev, span) = ev.map_err(|e| {
            anyhow::anyhow!(
                "invalid YAML at line {} column {}: {}",
                e.marker().line(),
                e.marker().col() + 1,
                e.info()
            )
        })?;
        events.push((ev, span));
    }
    // Lines inside multi-line scalars are content, not comments.
    let lines: Vec<&str> = text.lines().collect();
    let mut in_scalar = vec![false; lines.len() + 2];
    for (ev, span) in &events {
        if let Event::Scalar(_, style, ..) = ev {
            // A block scalar's span runs from its first content line to where the next
            // token starts; a quoted or plain one's from its first to its last character.
            let (first, last) = match style {
                ScalarStyle::Literal | ScalarStyle::Folded => {
                    let end_line = lines.get(span.end.line().wrapping_sub(1)).unwrap_or(&"");
                    let at_next_token = end_line
                        .chars()
                        .take(span.end.col())
                        .all(|c| c == ' ' || c == '\t');
                    let last = span.end.line() - usize::from(at_next_token);
                    (span.start.line(), last)
                }
                _ => (span.start.line() + 1, span.end.line()),
            };
            for l in first..=last {
                if let Some(x) = in_scalar.get_mut(l) {
                    *x = true;
                }
            }
        }
    }
    let comments = lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let body = l.trim_start_matches([' ', '\t']);
            let text = body.strip_prefix('#')?;
            (!in_scalar[i + 1]).then(|| Comment {
                line: i + 1,
                col: l.len() - body.len(),
                text: text.to_string(),
            })
        })
        .collect();
    let mut r = Reader {
        events,
        pos: 0,
        comments,
        next_comment: 0,
        anchors: HashMap::new(),
    };
    r.stream()
}

impl<'a> Reader<'a> {
    fn next(&mut self) -> Result<(Event<'a>, Span)> {
        let e = self
            .events
            .get(self.pos)
            .cloned()
            .context("unexpected end of YAML")?;
        self.pos += 1;
        Ok(e)
    }

    /// Comments on lines before `line` (and at or right of `min_col`, if given) not yet placed.
    fn comments_before(&mut self, line: usize, min_col: Option<usize>) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(c) = self.comments.get(self.next_comment) {
            if c.line >= line || min_col.is_some_and(|m| c.col < m) {
                break;
            }
            out.push(c.text.clone());
            self.next_comment += 1;
        }
        out
    }

    fn stream(&mut self) -> Result<Vec<Value>> {
        let mut docs = Vec::new();
        loop {
            let (ev, _) = self.next()?;
            match ev {
                Event::StreamStart | Event::Nothing => {}
                Event::DocumentStart(_) => docs.push(self.document(docs.len() + 1)?),
                Event::StreamEnd => break,
                other => bail!("unexpected YAML event {other:?}"),
            }
        }
        Ok(docs)
    }

    fn document(&mut self, n: usize) -> Result<Value> {
        let (ev, span) = self.next()?;
        let mut doc = match ev {
            Event::MappingStart(anchor, _) => self.mapping(anchor)?,
            Event::Scalar(ref s, ScalarStyle::Plain, _, None) if s.is_empty() || s == "null" => {
                Value::Map(Vec::new())
            }
            Event::SequenceStart(..) => {
                bail!("YAML document {n} is a list: sops files must be maps at the top")
            }
            _ => bail!(
                "YAML document {n} (line {}) is a single value: sops files must be maps at the top",
                span.start.line()
            ),
        };
        let (ev, span) = self.next()?;
        if ev != Event::DocumentEnd {
            bail!("unexpected YAML event {ev:?} at line {}", span.start.line());
        }
        // Comments after the last item belong to the document.
        let foot = self.comments_before(span.end.line().max(span.start.line() + 1), None);
        if let Value::Map(items) = &mut doc {
            items.extend(foot.into_iter().map(MapItem::Comment));
        }
        Ok(doc)
    }

    fn node(&mut self, ev: Event<'a>, span: Span) -> Result<Value> {
        Ok(match ev {
            Event::Scalar(s, style, anchor, tag) => {
                let v = scalar_value(&s, style, tag.as_deref(), span)?;
                if anchor > 0 {
                    self.anchors.insert(anchor, v.clone());
                }
                v
            }
            Event::Alias(id) => self
                .anchors
                .get(&id)
                .cloned()
                .with_context(|| format!("unknown YAML alias at line {}", span.start.line()))?,
            Event::MappingStart(anchor, _) => self.mapping(anchor)?,
            Event::SequenceStart(anchor, _) => self.sequence(anchor)?,
            other => bail!(
                "unexpected YAML event {other:?} at line {}",
                span.start.line()
            ),
        })
    }

    fn mapping(&mut self, anchor: usize) -> Result<Value> {
        let mut items = Vec::new();
        let mut item_col = None;
        loop {
            let (ev, span) = self.next()?;
            match ev {
                Event::MappingEnd => {
                    let foot = self.comments_before(span.start.line(), item_col);
                    items.extend(foot.into_iter().map(MapItem::Comment));
                    break;
                }
                Event::Scalar(..) | Event::Alias(_) => {
                    item_col.get_or_insert(span.start.col());
                    let head = self.comments_before(span.start.line(), None);
                    items.extend(head.into_iter().map(MapItem::Comment));
                    let key = match self.node(ev, span)? {
                        Value::Str(s) => s,
                        Value::Null => String::new(),
                        other => key_text(&other),
                    };
                    let (vev, vspan) = self.next()?;
                    let value = self.node(vev, vspan)?;
                    items.push(MapItem::Pair(key, value));
                }
                _ => bail!(
                    "unsupported YAML map key (a list or map) at line {}",
                    span.start.line()
                ),
            }
        }
        let v = Value::Map(items);
        if anchor > 0 {
            self.anchors.insert(anchor, v.clone());
        }
        Ok(v)
    }

    fn sequence(&mut self, anchor: usize) -> Result<Value> {
        let mut items = Vec::new();
        let mut item_col = None;
        loop {
            let (ev, span) = self.next()?;
            if ev == Event::SequenceEnd {
                let foot = self.comments_before(span.start.line(), item_col);
                items.extend(foot.into_iter().map(Value::Comment));
                break;
            }
            // The dash sits two columns left of an item's content in block style.
            item_col.get_or_insert(span.start.col().saturating_sub(2));
            let head = self.comments_before(span.start.line(), None);
            items.extend(head.into_iter().map(Value::Comment));
            items.push(self.node(ev, span)?);
        }
        let v = Value::Seq(items);
        if anchor > 0 {
            self.anchors.insert(anchor, v.clone());
        }
        Ok(v)
    }
}

/// Text of a non-string key, as the YAML source spelled it (sops itself rejects these).
fn key_text(v: &Value) -> String {
    match v {
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => scalar::yaml_float(*f),
        Value::Time(t) => t.rfc3339_nano(),
        _ => String::new(),
    }
}

/// The typed value of a scalar, as yaml.v3 decodes it into an `interface{}`.
fn scalar_value(
    s: &str,
    style: ScalarStyle,
    tag: Option<&saphyr_parser::Tag>,
    span: Span,
) -> Result<Value> {
    let Some(tag) = tag else {
        return Ok(if style == ScalarStyle::Plain {
            resolve_plain(s)
        } else {
            Value::Str(s.to_string())
        });
    };
    if !tag.is_yaml_core_schema() {
        return Ok(Value::Str(s.to_string()));
    }
    let bad = || {
        anyhow::anyhow!(
            "YAML value {s:?} at line {} does not fit its tag !!{}",
            span.start.line(),
            tag.suffix
        )
    };
    Ok(match tag.suffix.as_str() {
        "str" => Value::Str(s.to_string()),
        "null" => Value::Null,
        "bool" => match resolve_plain(s) {
            v @ Value::Bool(_) => v,
            _ => return Err(bad()),
        },
        "int" => Value::Int(scalar::go_parse_int(&s.replace('_', "")).ok_or_else(bad)?),
        "float" => match resolve_plain(s) {
            Value::Float(f) => Value::Float(f),
            Value::Int(i) => Value::Float(i as f64),
            _ => return Err(bad()),
        },
        "timestamp" => Value::Time(Timestamp::parse(s).ok_or_else(bad)?),
        "binary" => {
            let clean: String = s.chars().filter(|c| !c.is_whitespace()).collect();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(clean)
                .map_err(|_| bad())?;
            match String::from_utf8(bytes) {
                Ok(s) => Value::Str(s),
                Err(e) => Value::Bytes(e.into_bytes()),
            }
        }
        _ => resolve_plain(s),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(items: Vec<(&str, Value)>) -> Value {
        Value::Map(
            items
                .into_iter()
                .map(|(k, v)| MapItem::Pair(k.into(), v))
                .collect(),
        )
    }

    #[test]
    fn parses_types_order_and_documents() {
        let docs = parse_stream("b: 1\na: \"1\"\nc: [x, 2.5]\nd: |\n  l1\n  l2\n---\ne: ~\n---\n")
            .unwrap();
        assert_eq!(docs.len(), 3);
        assert_eq!(
            docs[0],
            map(vec![
                ("b", Value::Int(1)),
                ("a", Value::Str("1".into())),
                (
                    "c",
                    Value::Seq(vec![Value::Str("x".into()), Value::Float(2.5)])
                ),
                ("d", Value::Str("l1\nl2\n".into())),
            ])
        );
        assert_eq!(docs[1], map(vec![("e", Value::Null)]));
        assert_eq!(docs[2], Value::Map(vec![]));
    }

    #[test]
    fn comments_are_placed_before_their_item() {
        let text = "# top\na: 1\nb:\n  # inner\n  c: |\n    # not a comment\n  # foot\n# end\n";
        let docs = parse_stream("a: |-\n  # content\n  # more").unwrap();
        assert_eq!(
            docs[0].get("a"),
            Some(&Value::Str("# content\n# more".into()))
        );
        let docs = parse_stream(text).unwrap();
        let Value::Map(items) = &docs[0] else {
            panic!()
        };
        assert_eq!(items[0], MapItem::Comment(" top".into()));
        let Some(MapItem::Pair(_, Value::Map(inner))) = items.get(2) else {
            panic!("{items:?}")
        };
        assert_eq!(inner[0], MapItem::Comment(" inner".into()));
        assert_eq!(
            inner[1],
            MapItem::Pair("c".into(), Value::Str("# not a comment\n".into()))
        );
        assert_eq!(inner[2], MapItem::Comment(" foot".into()));
        assert_eq!(items[3], MapItem::Comment(" end".into()));
    }

    #[test]
    fn anchors_and_aliases_expand() {
        let docs = parse_stream("a: &x\n  k: v\nb: *x\n").unwrap();
        assert_eq!(docs[0].get("a"), docs[0].get("b"));
    }

    #[test]
    fn rejects_non_map_documents() {
        assert!(parse_stream("- a\n- b\n").is_err());
        assert!(parse_stream("just text\n").is_err());
    }

    #[test]
    fn emits_like_yaml_v3() {
        // Expected text: what sops 3.11 (yaml.v3, indent 4) printed for the same tree.
        let doc = map(vec![
            (
                "a",
                Value::Seq(vec![
                    Value::Str("lit\nx\n".into()),
                    map(vec![("k", Value::Str("v\n".into())), ("k2", Value::Int(1))]),
                    Value::Str("y".into()),
                    Value::Str(" lead".into()),
                    Value::Str("tab\there".into()),
                    Value::Str("#h".into()),
                ]),
            ),
            ("yes", Value::Str("".into())),
            ("n", Value::Map(vec![])),
            ("f", Value::Float(1e6)),
        ]);
        assert_eq!(
            emit_stream(&[doc.clone(), doc]),
            "a:\n    - |\n      lit\n      x\n    - k: |\n        v\n      k2: 1\n    - \"y\"\n    - ' lead'\n    - \"tab\\there\"\n    - '#h'\n\"yes\": \"\"\n\"n\": {}\nf: 1e+06\n---\na:\n    - |\n      lit\n      x\n    - k: |\n        v\n      k2: 1\n    - \"y\"\n    - ' lead'\n    - \"tab\\there\"\n    - '#h'\n\"yes\": \"\"\n\"n\": {}\nf: 1e+06\n"
        );
    }

    #[test]
    fn round_trips_through_the_parser() {
        let text =
            "a:\n    b: |4+\n\n    c: \"\\U0001F600\\x01\"\n    d: |4-\n         lead\n        x\n";
        let docs = parse_stream(text).unwrap();
        assert_eq!(parse_stream(&emit_stream(&docs)).unwrap(), docs);
    }
}
