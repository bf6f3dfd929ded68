//! The `sops:` section of an encrypted file: recipients, MAC, and which values are
//! encrypted.

use anyhow::{bail, Context, Result};
use regex::Regex;

use super::scalar::Timestamp;
use super::tree::{MapItem, Value};

/// The key sops puts its metadata under, at the top of every document.
pub const SOPS_KEY: &str = "sops";
/// The suffix sops uses when a file names no rule.
const DEFAULT_UNENCRYPTED_SUFFIX: &str = "_unencrypted";

/// One age recipient entry: the public key and the data key encrypted to it.
#[derive(Debug, Clone)]
pub struct AgeEntry {
    pub recipient: String,
    pub enc: String,
}

/// Which values of the file are encrypted (sops's `shouldBeEncrypted` inputs).
#[derive(Debug, Default)]
pub struct Rules {
    pub unencrypted_suffix: Option<String>,
    pub encrypted_suffix: Option<String>,
    pub unencrypted_regex: Option<Regex>,
    pub encrypted_regex: Option<Regex>,
    pub unencrypted_comment_regex: Option<Regex>,
    pub encrypted_comment_regex: Option<Regex>,
    pub mac_only_encrypted: bool,
}

#[derive(Debug)]
pub struct Metadata {
    /// Age entries of the (single) key group, in file order.
    pub age: Vec<AgeEntry>,
    /// Key types other than age present in the file (pgp, kms, …), for error messages.
    pub other_keys: Vec<String>,
    /// `lastmodified` as sops re-formats it: the additional data of the MAC.
    pub lastmodified: String,
    pub mac: String,
    pub rules: Rules,
}

fn string_field(m: &Value, key: &str) -> Result<Option<String>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Str(s)) if s.is_empty() => Ok(None),
        Some(Value::Str(s)) => Ok(Some(s.clone())),
        Some(Value::Time(t)) => Ok(Some(t.rfc3339_nano())),
        Some(other) => bail!("sops.{key} should be a string, found {other:?}"),
    }
}

fn regex_field(m: &Value, key: &str) -> Result<Option<Regex>> {
    string_field(m, key)?
        .map(|r| Regex::new(&r).with_context(|| format!("invalid sops.{key} {r:?}")))
        .transpose()
}

fn age_entries(list: Option<&Value>) -> Result<Vec<AgeEntry>> {
    let Some(Value::Seq(items)) = list else {
        return Ok(Vec::new());
    };
    items
        .iter()
        .filter(|v| !matches!(v, Value::Comment(_)))
        .map(|entry| {
            Ok(AgeEntry {
                recipient: string_field(entry, "recipient")?
                    .context("an age entry has no recipient")?
                    .trim()
                    .to_string(),
                enc: string_field(entry, "enc")?.context("an age entry has no enc")?,
            })
        })
        .collect()
}

/// Key types sops supports besides age, named as in the metadata.
const OTHER_KEY_TYPES: &[&str] = &["pgp", "kms", "gcp_kms", "azure_kv", "hc_vault", "hckms"];

fn other_keys(group: &Value) -> Vec<String> {
    OTHER_KEY_TYPES
        .iter()
        .filter(|t| matches!(group.get(t), Some(Value::Seq(s)) if !s.is_empty()))
        .map(|t| t.to_string())
        .collect()
}

impl Metadata {
    /// Read the metadata map (the value of the top-level `sops` key).
    pub fn from_value(m: &Value) -> Result<Metadata> {
        if !matches!(m, Value::Map(_)) {
            bail!("the sops section is not a map");
        }
        let mut age = age_entries(m.get("age"))?;
        let mut other = other_keys(m);
        if let Some(Value::Seq(groups)) = m.get("key_groups") {
            let groups: Vec<&Value> = groups
                .iter()
                .filter(|g| !matches!(g, Value::Comment(_)))
                .collect();
            if groups.len() > 1 {
                bail!(
                    "the file splits its data key over {} key groups (Shamir secret sharing), which mkappliance does not support: re-encrypt it with one group",
                    groups.len()
                );
            }
            for g in groups {
                age.extend(age_entries(g.get("age"))?);
                other.extend(other_keys(g));
            }
        }
        let lastmodified =
            string_field(m, "lastmodified")?.context("the sops section has no lastmodified")?;
        // sops authenticates the MAC with lastmodified re-formatted as RFC 3339.
        let lastmodified = Timestamp::parse(&lastmodified)
            .map(|t| t.rfc3339())
            .with_context(|| format!("sops.lastmodified {lastmodified:?} is not a time"))?;
        let mac = string_field(m, "mac")?.context("the sops section has no mac")?;
        let mut rules = Rules {
            unencrypted_suffix: string_field(m, "unencrypted_suffix")?,
            encrypted_suffix: string_field(m, "encrypted_suffix")?,
            unencrypted_regex: regex_field(m, "unencrypted_regex")?,
            encrypted_regex: regex_field(m, "encrypted_regex")?,
            unencrypted_comment_regex: regex_field(m, "unencrypted_comment_regex")?,
            encrypted_comment_regex: regex_field(m, "encrypted_comment_regex")?,
            mac_only_encrypted: matches!(m.get("mac_only_encrypted"), Some(Value::Bool(true))),
        };
        let count = [
            rules.unencrypted_suffix.is_some(),
            rules.encrypted_suffix.is_some(),
            rules.unencrypted_regex.is_some(),
            rules.encrypted_regex.is_some(),
            rules.unencrypted_comment_regex.is_some(),
            rules.encrypted_comment_regex.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if count > 1 {
            bail!("the sops section names more than one of the *_suffix / *_regex rules");
        }
        if count == 0 {
            rules.unencrypted_suffix = Some(DEFAULT_UNENCRYPTED_SUFFIX.to_string());
        }
        Ok(Metadata {
            age,
            other_keys: other,
            lastmodified,
            mac,
            rules,
        })
    }
}

/// Remove the top-level `sops` item of a document, returning its value.
pub fn take_sops(doc: &mut Value) -> Option<Value> {
    let Value::Map(items) = doc else {
        return None;
    };
    let i = items
        .iter()
        .position(|i| matches!(i, MapItem::Pair(k, _) if k == SOPS_KEY))?;
    match items.remove(i) {
        MapItem::Pair(_, v) => Some(v),
        MapItem::Comment(_) => None,
    }
}

impl Rules {
    /// sops's `shouldBeEncrypted`: each configured rule, in sops's order, may override.
    pub fn should_encrypt(
        &self,
        path: &[String],
        comments: &[Vec<String>],
        is_comment: bool,
    ) -> bool {
        let mut enc = true;
        if let Some(sfx) = &self.unencrypted_suffix {
            if path.iter().any(|p| p.ends_with(sfx.as_str())) {
                enc = false;
            }
        }
        if let Some(sfx) = &self.encrypted_suffix {
            enc = path.iter().any(|p| p.ends_with(sfx.as_str()));
        }
        if let Some(re) = &self.unencrypted_regex {
            if path.iter().any(|p| re.is_match(p)) {
                enc = false;
            }
        }
        if let Some(re) = &self.encrypted_regex {
            enc = path.iter().any(|p| re.is_match(p));
        }
        if let Some(re) = &self.unencrypted_comment_regex {
            if comments.iter().flatten().any(|c| re.is_match(c)) {
                enc = false;
            }
        }
        if let Some(re) = &self.encrypted_comment_regex {
            // A matching comment line does not encrypt itself, only what follows it.
            let last = comments.len().saturating_sub(1);
            let last_len = comments.last().map_or(0, Vec::len);
            enc = comments.iter().enumerate().any(|(i, cs)| {
                cs.iter()
                    .enumerate()
                    .any(|(j, c)| !(is_comment && i == last && j + 1 == last_len) && re.is_match(c))
            });
        }
        enc
    }
}
