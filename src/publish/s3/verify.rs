//! Reading an uploaded object back. Its size must match, and the SHA-256 of every range of
//! its bytes must match the same range of the file: the object is then byte-for-byte the
//! file (a multipart ETag is not an MD5 of the object, so the ETag can't tell). Ranges are
//! read in parallel, and hashed as they stream, so nothing is held in memory.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

use super::describe;
use super::transfer::{bounded, Target};

const READ_BUFFER: usize = 1 << 20;

/// SHA-256 of `len` bytes of `path` from `offset`.
fn hash_range(path: &Path, offset: u64, len: u64) -> Result<String> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; READ_BUFFER.min(len as usize).max(1)];
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = ((end - pos) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], pos)
            .with_context(|| format!("reading {}", path.display()))?;
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(hex::encode(h.finalize()))
}

/// Check the object `t` against the file `path` (`size` bytes), in ranges of `chunk`.
pub(super) async fn verify(
    t: &Target,
    path: &Path,
    size: u64,
    chunk: u64,
    concurrency: usize,
    bar: &indicatif::ProgressBar,
) -> Result<()> {
    let len = t
        .object_len()
        .await
        .map_err(|e| anyhow!("reading the object's size: {e}"))?;
    match len {
        Some(n) if n == size => {}
        other => bail!(
            "the object has {} bytes but the file has {size}",
            other.map_or("an unknown number of".into(), |n| n.to_string())
        ),
    }
    if size == 0 {
        return Ok(());
    }
    let path: Arc<Path> = Arc::from(path);
    bounded(size.div_ceil(chunk), concurrency, |i| {
        let (t, path, bar) = (t.clone(), path.clone(), bar.clone());
        async move {
            let start = i * chunk;
            let len = chunk.min(size - start);
            let end = start + len - 1;
            let p = path.clone();
            let local = tokio::task::spawn_blocking(move || hash_range(&p, start, len));
            let mut obj = t
                .client
                .get_object()
                .bucket(&t.bucket)
                .key(&t.key)
                .range(format!("bytes={start}-{end}"))
                .send()
                .await
                .map_err(|e| anyhow!("reading bytes {start}-{end} back: {}", describe(&e)))?;
            let mut h = Sha256::new();
            let mut got = 0u64;
            while let Some(data) = obj
                .body
                .try_next()
                .await
                .with_context(|| format!("reading bytes {start}-{end} back"))?
            {
                h.update(&data);
                got += data.len() as u64;
                bar.inc(data.len() as u64);
            }
            if got != len {
                bail!("asked for bytes {start}-{end} ({len} bytes) and read back {got}");
            }
            let remote = hex::encode(h.finalize());
            let local = local.await.context("hashing task")??;
            if remote != local {
                bail!(
                    "bytes {start}-{end} differ from {}: SHA-256 {remote} in the bucket, {local} in the file",
                    path.display()
                );
            }
            Ok(())
        }
    })
    .await
    .map(|_| ())
}

/// SHA-256 of a whole file (for the report and SHA256SUMS-style output).
pub(super) fn hash_file(path: &Path) -> Result<String> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    crate::util::sha256_reader(f).with_context(|| format!("hashing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_hash_like_the_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abcdefgh").unwrap();
        // FIPS 180-2 vector for "abc".
        assert_eq!(
            hash_range(&p, 0, 3).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hash_range(&p, 0, 8).unwrap(), hash_file(&p).unwrap());
        assert_eq!(hash_range(&p, 3, 0).unwrap(), crate::util::sha256_hex(b""));
    }
}
