//! Encrypted values: `ENC[AES256_GCM,data:…,iv:…,tag:…,type:…]`, AES-256-GCM with a
//! 32-byte IV and the value's key path as additional data.

use aes_gcm::aead::consts::U32;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::aes::Aes256;
use aes_gcm::{AesGcm, Nonce, Tag};
use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use zeroize::Zeroizing;

use super::scalar::{self, Timestamp};
use super::tree::Value;

const PREFIX: &str = "ENC[AES256_GCM,data:";
/// sops always writes 32-byte IVs.
const IV_LEN: usize = 32;
const TAG_LEN: usize = 16;

type Gcm = AesGcm<Aes256, U32>;

/// The 32-byte data key every value of a file is encrypted with, expanded once for
/// AES-GCM; both are zeroed on drop.
pub struct DataKey {
    gcm: Gcm,
}

impl DataKey {
    pub fn from_slice(b: &[u8]) -> Result<DataKey> {
        let key: Zeroizing<[u8; 32]> = Zeroizing::new(
            b.try_into()
                .map_err(|_| anyhow!("the data key is {} bytes, expected 32", b.len()))?,
        );
        Ok(DataKey {
            gcm: Gcm::new_from_slice(&key[..]).expect("32-byte key"),
        })
    }
}

/// Whether a string looks like a sops-encrypted value.
pub fn is_encrypted(s: &str) -> bool {
    s.starts_with(PREFIX)
}

struct Parts<'a> {
    data: &'a str,
    iv: &'a str,
    tag: &'a str,
    kind: &'a str,
}

fn split(s: &str) -> Option<Parts<'_>> {
    let body = s.strip_prefix(PREFIX)?;
    let body = &body[..body.rfind(']')?];
    let (data, rest) = body.split_once(",iv:")?;
    let (iv, rest) = rest.split_once(",tag:")?;
    let (tag, kind) = rest.split_once(",type:")?;
    Some(Parts {
        data,
        iv,
        tag,
        kind,
    })
}

/// Decrypt one value; `aad` is its key path joined with `:` plus a trailing `:`.
/// Returns the typed plaintext (comments come back as [`Value::Comment`]).
pub fn decrypt(key: &DataKey, value: &str, aad: &str) -> Result<Value> {
    let p = split(value).context("not in sops's ENC[AES256_GCM,…] format")?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut buf = b64.decode(p.data).context("bad base64 in data")?;
    let iv = b64.decode(p.iv).context("bad base64 in iv")?;
    let tag = b64.decode(p.tag).context("bad base64 in tag")?;
    if iv.len() != IV_LEN || tag.len() != TAG_LEN {
        bail!(
            "unexpected IV or tag length ({} and {} bytes)",
            iv.len(),
            tag.len()
        );
    }
    key.gcm
        .decrypt_in_place_detached(
            Nonce::<U32>::from_slice(&iv),
            aad.as_bytes(),
            &mut buf,
            Tag::from_slice(&tag),
        )
        .map_err(|_| anyhow!("authentication failed (wrong key, or the value was changed)"))?;
    let text = || String::from_utf8(buf.clone()).context("plaintext is not UTF-8");
    let bad = |t: &str| anyhow!("decrypted {t} value does not parse");
    Ok(match p.kind {
        "str" => Value::Str(text()?),
        "comment" => Value::Comment(text()?),
        "bytes" => Value::Bytes(buf),
        "int" => Value::Int(text()?.parse().map_err(|_| bad("int"))?),
        "float" => Value::Float(text()?.parse().map_err(|_| bad("float"))?),
        "bool" => Value::Bool(scalar::go_parse_bool(&text()?).ok_or_else(|| bad("bool"))?),
        "time" => Value::Time(Timestamp::parse(&text()?).ok_or_else(|| bad("time"))?),
        other => bail!("unknown value type {other:?}"),
    })
}

/// The bytes sops feeds into the MAC for a plaintext value (its `ToBytes`).
pub fn mac_bytes(v: &Value) -> Option<Vec<u8>> {
    Some(match v {
        Value::Str(s) => s.as_bytes().to_vec(),
        Value::Int(i) => i.to_string().into_bytes(),
        Value::Float(f) => scalar::go_format_f(*f).into_bytes(),
        Value::Bool(true) => b"True".to_vec(),
        Value::Bool(false) => b"False".to_vec(),
        Value::Bytes(b) => b.clone(),
        Value::Time(t) => t.rfc3339_nano().into_bytes(),
        Value::Null | Value::Map(_) | Value::Seq(_) | Value::Comment(_) => return None,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use aes_gcm::aead::AeadInPlace;

    /// Encrypt like sops does (used to build test values; production never encrypts).
    pub fn encrypt(key: &DataKey, plain: &[u8], aad: &str, kind: &str) -> String {
        let gcm = &key.gcm;
        let iv = [7u8; IV_LEN];
        let mut buf = plain.to_vec();
        let tag = gcm
            .encrypt_in_place_detached(Nonce::<U32>::from_slice(&iv), aad.as_bytes(), &mut buf)
            .unwrap();
        let b64 = base64::engine::general_purpose::STANDARD;
        format!(
            "ENC[AES256_GCM,data:{},iv:{},tag:{},type:{kind}]",
            b64.encode(&buf),
            b64.encode(iv),
            b64.encode(tag)
        )
    }

    #[test]
    fn round_trip_and_authentication() {
        let key = DataKey::from_slice(&[1u8; 32]).unwrap();
        let enc = encrypt(&key, b"6443", "machine:port:", "int");
        assert_eq!(
            decrypt(&key, &enc, "machine:port:").unwrap(),
            Value::Int(6443)
        );
        // The key path is authenticated: moving a value to another key breaks it.
        assert!(decrypt(&key, &enc, "machine:other:").is_err());
        let other = DataKey::from_slice(&[2u8; 32]).unwrap();
        assert!(decrypt(&other, &enc, "machine:port:").is_err());
        let enc = encrypt(&key, b"True", "a:", "bool");
        assert_eq!(decrypt(&key, &enc, "a:").unwrap(), Value::Bool(true));
        assert!(decrypt(&key, "ENC[AES256_GCM,data:xx", "a:").is_err());
        assert!(DataKey::from_slice(&[0u8; 16]).is_err());
    }
}
