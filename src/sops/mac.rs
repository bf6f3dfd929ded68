//! The decryption walk and the MAC.
//!
//! sops walks every document in order, depth first; each leaf's key path (map keys only:
//! list items add nothing) decides whether it is encrypted and authenticates it. The MAC
//! is SHA-512 over the plaintext bytes of the leaves in that order (only the encrypted
//! ones with `mac_only_encrypted`, after a fixed prefix), as upper-case hex, itself
//! stored encrypted with `lastmodified` as additional data.

use anyhow::{anyhow, bail, Result};
use sha2::{Digest, Sha512};

use super::cipher::{self, DataKey};
use super::metadata::Rules;
use super::tree::{MapItem, Value};

/// SHA-256 of "sops": the MAC starts with it when only encrypted values are covered, so
/// the two kinds of MAC never coincide.
const MAC_ONLY_ENCRYPTED_INIT: [u8; 32] = [
    0x8a, 0x3f, 0xd2, 0xad, 0x54, 0xce, 0x66, 0x52, 0x7b, 0x10, 0x34, 0xf3, 0xd1, 0x47, 0xbe, 0x0b,
    0x0b, 0x97, 0x5b, 0x3b, 0xf4, 0x4f, 0x72, 0xc6, 0xfd, 0xad, 0xec, 0x81, 0x76, 0xf2, 0x7d, 0x69,
];

pub struct Walker<'a> {
    rules: &'a Rules,
    key: &'a DataKey,
    hash: Sha512,
    path: Vec<String>,
    comments: Vec<Vec<String>>,
}

fn aad(path: &[String]) -> String {
    let mut s = path.join(":");
    s.push(':');
    s
}

impl<'a> Walker<'a> {
    pub fn new(rules: &'a Rules, key: &'a DataKey) -> Walker<'a> {
        let mut hash = Sha512::new();
        if rules.mac_only_encrypted {
            hash.update(MAC_ONLY_ENCRYPTED_INIT);
        }
        Walker {
            rules,
            key,
            hash,
            path: Vec::new(),
            comments: Vec::new(),
        }
    }

    /// Decrypt one document in place, feeding the MAC.
    pub fn document(&mut self, doc: &mut Value) -> Result<()> {
        match doc {
            Value::Map(items) => self.map(items),
            _ => bail!("a document is not a map"),
        }
    }

    /// The MAC over everything walked so far.
    pub fn finish(self) -> String {
        hex::encode_upper(self.hash.finalize())
    }

    fn map(&mut self, items: &mut [MapItem]) -> Result<()> {
        self.comments.push(Vec::new());
        for item in items.iter_mut() {
            match item {
                MapItem::Comment(c) => {
                    self.comments.last_mut().expect("pushed").push(c.clone());
                    if let Some(plain) = self.comment(c) {
                        *c = plain;
                    }
                }
                MapItem::Pair(k, v) => {
                    self.path.push(k.clone());
                    let r = self.value(v);
                    self.path.pop();
                    r?;
                    self.comments.last_mut().expect("pushed").clear();
                }
            }
        }
        self.comments.pop();
        Ok(())
    }

    fn seq(&mut self, items: &mut [Value]) -> Result<()> {
        self.comments.push(Vec::new());
        for item in items.iter_mut() {
            if let Value::Comment(c) = item {
                self.comments.last_mut().expect("pushed").push(c.clone());
                if let Some(plain) = self.comment(c) {
                    *c = plain;
                }
            } else {
                self.value(item)?;
                self.comments.last_mut().expect("pushed").clear();
            }
        }
        self.comments.pop();
        Ok(())
    }

    fn value(&mut self, v: &mut Value) -> Result<()> {
        match v {
            Value::Null => Ok(()),
            Value::Map(items) => self.map(items),
            Value::Seq(items) => self.seq(items),
            _ => self.leaf(v),
        }
    }

    /// A comment's plaintext, if it is encrypted. sops decrypts comments whose position
    /// says they are encrypted and keeps the text when that fails; comments are not in
    /// the MAC. Comment positions are approximate here (the YAML parser does not report
    /// them), so the enclosing paths are tried from the innermost out.
    fn comment(&self, c: &str) -> Option<String> {
        if !cipher::is_encrypted(c) || !self.rules.should_encrypt(&self.path, &self.comments, true)
        {
            return None;
        }
        (0..=self.path.len()).rev().find_map(|n| {
            match cipher::decrypt(self.key, c, &aad(&self.path[..n])) {
                Ok(Value::Comment(p)) | Ok(Value::Str(p)) => Some(p),
                _ => None,
            }
        })
    }

    fn leaf(&mut self, v: &mut Value) -> Result<()> {
        let encrypted = self.rules.should_encrypt(&self.path, &self.comments, false);
        if encrypted {
            match v {
                // sops writes empty strings as they are.
                Value::Str(s) if s.is_empty() => {}
                Value::Str(s) => {
                    let plain = cipher::decrypt(self.key, s, &aad(&self.path))
                        .map_err(|e| anyhow!("value at {}: {e:#}", self.path.join(".")))?;
                    *v = plain;
                }
                _ => bail!(
                    "value at {} is not encrypted although the file's rules say it should be",
                    self.path.join(".")
                ),
            }
        }
        if !self.rules.mac_only_encrypted || encrypted {
            if let Some(b) = cipher::mac_bytes(v) {
                self.hash.update(b);
            }
        }
        Ok(())
    }
}
