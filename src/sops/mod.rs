//! SOPS decryption, compatible with what sops 3.x writes for YAML and JSON files with
//! age recipients, with no `sops` binary needed.
//!
//! A file with a top-level `sops` section is decrypted: the data key is unwrapped with
//! an age identity ([`keys`]), every value is decrypted and the MAC recomputed and
//! checked ([`mac`]), and the plaintext is emitted the way `sops -d` prints it. A file
//! without one passes through unchanged, unless it holds encrypted values (then it is an
//! error: a truncated or hand-edited sops file). The plaintext stays in memory.

pub mod cipher;
pub mod json;
pub mod keys;
pub mod mac;
pub mod metadata;
pub mod scalar;
pub mod tree;
pub mod yaml;

use std::path::Path;

use anyhow::{bail, Context, Result};

pub use keys::KeyOptions;
use metadata::Metadata;
pub use tree::{MapItem, Value};

/// Encrypted files larger than this are refused (a config is kilobytes).
const MAX_FILE: u64 = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

impl Format {
    /// As sops decides: by extension; a `.json`-less file that parses as a JSON object is
    /// also JSON.
    pub fn detect(path: &Path, text: &str) -> Format {
        let ext_json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        if ext_json || (text.trim_start().starts_with('{') && json::parse(text).is_ok()) {
            Format::Json
        } else {
            Format::Yaml
        }
    }
}

/// A file's plaintext and its parsed documents.
#[derive(Debug)]
pub struct Plaintext {
    /// The bytes to use: the decrypted document as `sops -d` prints it, or the file's own
    /// bytes when it was not encrypted.
    pub bytes: Vec<u8>,
    /// The documents, decrypted (comments included).
    pub docs: Vec<Value>,
    pub was_encrypted: bool,
    pub format: Format,
}

/// Read `path` and decrypt it if it is a sops file.
pub fn load(path: &Path, keys: &KeyOptions) -> Result<Plaintext> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len > MAX_FILE {
        bail!("{} is {len} bytes: too large for a config", path.display());
    }
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = String::from_utf8(data)
        .map_err(|_| anyhow::anyhow!("{} is not UTF-8 text", path.display()))?;
    let format = Format::detect(path, &text);
    decrypt_text(text, format, keys).with_context(|| format!("decrypting {}", path.display()))
}

fn parse(text: &str, format: Format) -> Result<Vec<Value>> {
    match format {
        Format::Yaml => yaml::parse_stream(text),
        Format::Json => Ok(vec![json::parse(text)?]),
    }
}

/// Decrypt a sops document (or pass a plain one through).
pub fn decrypt_text(text: String, format: Format, keys: &KeyOptions) -> Result<Plaintext> {
    let mut docs = parse(&text, format)?;
    // sops reads its metadata from the first document and writes it into every one.
    let mut section = None;
    for doc in &mut docs {
        if let Some(s) = metadata::take_sops(doc) {
            section.get_or_insert(s);
        }
    }
    let Some(section) = section else {
        let mut found = None;
        for doc in &docs {
            doc.any_str(&mut |s| {
                let hit = cipher::is_encrypted(s);
                if hit {
                    found = Some(s.chars().take(40).collect::<String>());
                }
                hit
            });
        }
        if let Some(sample) = found {
            bail!(
                "it looks half-encrypted: it holds sops-encrypted values ({sample}…) but no sops metadata section (truncated or edited?)"
            );
        }
        return Ok(Plaintext {
            bytes: text.into_bytes(),
            docs,
            was_encrypted: false,
            format,
        });
    };
    let meta = Metadata::from_value(&section).context("reading the sops metadata")?;
    let ssh = meta.age.iter().any(|a| a.recipient.starts_with("ssh-"));
    let ids = keys::load(keys, ssh)?;
    let key = keys::data_key(&meta, &ids)?;
    drop(ids);

    let mut walker = mac::Walker::new(&meta.rules, &key);
    for doc in &mut docs {
        walker.document(doc)?;
    }
    let computed = walker.finish();
    let stored = match cipher::decrypt(&key, &meta.mac, &meta.lastmodified) {
        Ok(Value::Str(s)) => s,
        Ok(_) => bail!("the stored MAC is not a string"),
        Err(e) => bail!("MAC mismatch: the stored MAC does not authenticate ({e:#}): the file was modified or is corrupted"),
    };
    drop(key);
    if stored != computed {
        bail!("MAC mismatch: the file was modified after sops encrypted it, or is corrupted");
    }
    let bytes = match format {
        Format::Yaml => yaml::emit_stream(&docs).into_bytes(),
        Format::Json => json::emit(&docs[0])?.into_bytes(),
    };
    Ok(Plaintext {
        bytes,
        docs,
        was_encrypted: true,
        format,
    })
}
