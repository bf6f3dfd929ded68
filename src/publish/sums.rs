//! `SHA256SUMS`: one coreutils-format line per artifact, so `sha256sum -c SHA256SUMS` checks
//! a downloaded release.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::util;

pub const SUMS_NAME: &str = "SHA256SUMS";
/// Single-file checksums written beside an image (`bootstrap-pxe.raw.sha256`): not listed.
const SIDECAR_SUFFIX: &str = ".sha256";

/// Whether `name` is an artifact to list: not hidden (temporary files are), not a checksum.
pub fn is_artifact(name: &str) -> bool {
    !name.starts_with('.') && name != SUMS_NAME && !name.ends_with(SIDECAR_SUFFIX)
}

/// The `SHA256SUMS` text for `dir`: every regular file at its top level that
/// [`is_artifact`], sorted by name. `known` gives digests already computed, by file name.
pub fn sha256sums(dir: &Path, known: &BTreeMap<String, String>) -> Result<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry
            .file_type()
            .with_context(|| format!("reading {}", entry.path().display()))?
            .is_file();
        if !is_file || !is_artifact(&name) {
            continue;
        }
        // coreutils escapes such names with a leading backslash; nobody needs them here.
        if name.contains(['\n', '\\', '\r']) {
            bail!("{:?} in {}: file names with newlines or backslashes can't be listed in {SUMS_NAME}", name, dir.display());
        }
        names.push(name);
    }
    names.sort();
    let mut text = String::new();
    for name in names {
        let digest = match known.get(&name) {
            Some(d) => d.clone(),
            None => {
                let p = dir.join(&name);
                let f = File::open(&p).with_context(|| format!("opening {}", p.display()))?;
                util::sha256_reader(f).with_context(|| format!("hashing {}", p.display()))?
            }
        };
        text.push_str(&format!("{digest}  {name}\n"));
    }
    Ok(text)
}

/// Write `dir/SHA256SUMS` atomically; returns its path.
pub fn write_sha256sums(dir: &Path, known: &BTreeMap<String, String>) -> Result<PathBuf> {
    let text = sha256sums(dir, known)?;
    let path = dir.join(SUMS_NAME);
    util::write_atomic(&path, text.as_bytes())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_artifacts_sorted_and_skips_checksums_and_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("b.raw"), b"abc").unwrap();
        std::fs::write(d.join("a.raw.gz"), b"").unwrap();
        std::fs::write(d.join("b.raw.sha256"), b"x").unwrap();
        std::fs::write(d.join(".b.raw.tmp-1"), b"x").unwrap();
        std::fs::write(d.join(SUMS_NAME), b"old").unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        let text = sha256sums(d, &BTreeMap::new()).unwrap();
        // Digests of "" and "abc" (FIPS 180-2 test vector).
        assert_eq!(
            text,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855  a.raw.gz\n\
             ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  b.raw\n"
        );
        let mut known = BTreeMap::new();
        known.insert("b.raw".to_string(), "00".repeat(32));
        let text = sha256sums(d, &known).unwrap();
        assert!(text.ends_with(&format!("{}  b.raw\n", "00".repeat(32))));
    }
}
