//! Client-side encryption to age recipients: `NAME` → `NAME.age`, which `age -d -i KEY`
//! opens. The store then only ever sees ciphertext.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context, Result};

use crate::util::AtomicFile;

pub const EXTENSION: &str = "age";

/// Parse `age1...` recipients (X25519, as `age-keygen` prints them).
pub fn parse_recipients(list: &[String]) -> Result<Vec<age::x25519::Recipient>> {
    list.iter()
        .map(|r| {
            let r = r.trim();
            if !r.starts_with("age1") {
                bail!("--encrypt-to {r:?} is not an age recipient (age1..., from age-keygen)");
            }
            age::x25519::Recipient::from_str(r).map_err(|e| {
                anyhow::anyhow!("--encrypt-to {r:?} is not a valid age recipient: {e}")
            })
        })
        .collect()
}

/// Encrypt `src` to `dest` (streaming; temporary name, renamed when complete).
pub fn encrypt_file(src: &Path, dest: &Path, recipients: &[age::x25519::Recipient]) -> Result<()> {
    if recipients.is_empty() {
        bail!("no age recipients to encrypt {} to", src.display());
    }
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
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

    #[test]
    fn rejects_what_is_not_a_recipient() {
        let e = parse_recipients(&["ssh-ed25519 AAAA".into()]).unwrap_err();
        assert!(format!("{e}").contains("not an age recipient"), "{e}");
        let e = parse_recipients(&["age1notvalid".into()]).unwrap_err();
        assert!(format!("{e}").contains("not a valid age recipient"), "{e}");
    }
}
