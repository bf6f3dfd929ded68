//! Client-side encryption to age recipients: `NAME` → `NAME.age`, which `age -d -i KEY`
//! opens. The store then only ever sees ciphertext.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::util::AtomicFile;

pub const EXTENSION: &str = "age";

/// Parsed recipients, shareable across threads.
pub type Recipients = Arc<Vec<Box<dyn age::Recipient + Send + Sync>>>;

/// Parse recipients as `age` takes them: `age1...` (from `age-keygen`) or an SSH public key
/// line (`ssh-ed25519 AAAA...`, `ssh-rsa AAAA...`).
pub fn parse_recipients(list: &[String]) -> Result<Recipients> {
    let mut out: Vec<Box<dyn age::Recipient + Send + Sync>> = Vec::new();
    for r in list {
        let r = r.trim();
        if r.starts_with("age1") {
            let rec = age::x25519::Recipient::from_str(r).map_err(|e| {
                anyhow::anyhow!("--encrypt-to {r:?} is not a valid age recipient: {e}")
            })?;
            out.push(Box::new(rec));
        } else if r.starts_with("ssh-") {
            let rec = age::ssh::Recipient::from_str(r).map_err(|e| {
                anyhow::anyhow!("--encrypt-to {r:?} is not a usable SSH public key: {e:?}")
            })?;
            out.push(Box::new(rec));
        } else {
            bail!(
                "--encrypt-to {r:?} is not an age recipient (age1... from age-keygen, or an ssh-ed25519/ssh-rsa public key)"
            );
        }
    }
    Ok(Arc::new(out))
}

/// Encrypt `src` to `dest` (streaming; temporary name, renamed when complete).
pub fn encrypt_file(src: &Path, dest: &Path, recipients: &Recipients) -> Result<()> {
    if recipients.is_empty() {
        bail!("no age recipients to encrypt {} to", src.display());
    }
    let encryptor = age::Encryptor::with_recipients(
        recipients.iter().map(|r| r.as_ref() as &dyn age::Recipient),
    )
    .context("setting up age encryption")?;
    let out = AtomicFile::create(dest)?;
    let sink = BufWriter::with_capacity(
        1 << 20,
        out.file()
            .try_clone()
            .context("duplicating the output handle")?,
    );
    let mut w = encryptor
        .wrap_output(sink)
        .with_context(|| format!("writing {}", dest.display()))?;
    let mut input = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    io::copy(&mut input, &mut w)
        .with_context(|| format!("encrypting {} to {}", src.display(), dest.display()))?;
    w.finish()
        .and_then(|mut b| b.flush())
        .with_context(|| format!("writing {}", dest.display()))?;
    out.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(r: &str) -> String {
        match parse_recipients(&[r.to_string()]) {
            Ok(_) => panic!("{r:?} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn rejects_what_is_not_a_recipient() {
        assert!(err("gpg:ABCDEF").contains("not an age recipient"));
        assert!(err("age1notvalid").contains("not a valid age recipient"));
        assert!(err("ssh-ed25519 AAAAnotbase64").contains("not a usable SSH public key"));
    }
}
