//! The document model sops itself uses: ordered maps whose items may be comments, lists
//! that may hold comments, and typed scalars. Both the YAML and the JSON store parse into
//! it and emit from it, so decryption and the MAC walk are written once.

use super::scalar::Timestamp;

/// One value of a document.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    /// A YAML timestamp (sops 3.9+ keeps these typed: `type:time`).
    Time(Timestamp),
    /// Raw bytes (`type:bytes`, written by sops's binary store).
    Bytes(Vec<u8>),
    Map(Vec<MapItem>),
    /// A list; [`Value::Comment`] elements are comment lines between its items.
    Seq(Vec<Value>),
    /// A comment line (the text after `#`), only as a list element.
    Comment(String),
}

/// One item of a map: a key and its value, or a comment line between items.
#[derive(Debug, Clone, PartialEq)]
pub enum MapItem {
    Pair(String, Value),
    Comment(String),
}

impl Value {
    /// The value under `key` in a map (first match), if this is a map.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(items) => items.iter().find_map(|i| match i {
                MapItem::Pair(k, v) if k == key => Some(v),
                _ => None,
            }),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The same tree without comments: what a YAML or JSON reader sees.
    pub fn without_comments(&self) -> Value {
        match self {
            Value::Map(items) => Value::Map(
                items
                    .iter()
                    .filter_map(|i| match i {
                        MapItem::Pair(k, v) => Some(MapItem::Pair(k.clone(), v.without_comments())),
                        MapItem::Comment(_) => None,
                    })
                    .collect(),
            ),
            Value::Seq(items) => Value::Seq(
                items
                    .iter()
                    .filter(|v| !matches!(v, Value::Comment(_)))
                    .map(Value::without_comments)
                    .collect(),
            ),
            v => v.clone(),
        }
    }

    /// Visit every string scalar (keys excluded), depth first.
    pub fn any_str(&self, f: &mut impl FnMut(&str) -> bool) -> bool {
        match self {
            Value::Str(s) => f(s),
            Value::Map(items) => items.iter().any(|i| match i {
                MapItem::Pair(_, v) => v.any_str(f),
                MapItem::Comment(c) => f(c),
            }),
            Value::Seq(items) => items.iter().any(|v| v.any_str(f)),
            Value::Comment(c) => f(c),
            _ => false,
        }
    }
}
