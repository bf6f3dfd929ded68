//! Reading the Talos initramfs: sniff its compression, stream the cpio, and spool
//! `rootfs.sqsh` (the squashfs holding the kernel modules) into a temporary file.

use std::fs::File;
use std::io::{self, Cursor, Read, Seek, SeekFrom, Write};

use anyhow::{bail, Context, Result};

use super::cpio;

/// Talos ships `initramfs.xz` compressed with zstd despite its name.
pub const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
pub const XZ_MAGIC: &[u8] = &[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00];
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
/// Bytes read to decide the format: the longest magic above.
const SNIFF_LEN: usize = 6;
/// The squashfs inside the Talos initramfs.
pub const ROOTFS_SQSH: &str = "rootfs.sqsh";
/// Buffer for spooling `rootfs.sqsh` to its temporary file.
const SPOOL_BUF: usize = 1 << 20;

/// Read up to `buf.len()` bytes, stopping early only at EOF.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// `io::copy` with a 1 MiB buffer filled before each write: its 8 KiB one made spooling the
/// ~70 MB squashfs cost ~8,000 write calls, most of the time of picking the modules. (A
/// `BufReader` in front of `io::copy` writes what one decoder read gives, 128 KiB: 36 ms
/// against 30 for 64 MB.)
fn copy_large(r: &mut impl Read, w: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; SPOOL_BUF];
    let mut total = 0;
    loop {
        let n = read_up_to(r, &mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        w.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Like [`decompress`], for readers that borrow.
pub(crate) fn decompress_borrowed<'a>(mut r: impl Read + 'a) -> Result<Box<dyn Read + 'a>> {
    let mut magic = [0u8; SNIFF_LEN];
    let n = read_up_to(&mut r, &mut magic).context("reading initramfs magic")?;
    let magic = &magic[..n];
    // Put the sniffed bytes back in front of the stream.
    let whole = Cursor::new(magic.to_vec()).chain(r);
    if magic.starts_with(ZSTD_MAGIC) {
        let d = zstd::stream::read::Decoder::new(whole).context("setting up zstd decoder")?;
        Ok(Box::new(d))
    } else if magic.starts_with(XZ_MAGIC) {
        // Multi-stream, like `xz -d`: concatenated streams decode as one.
        Ok(Box::new(liblzma::read::XzDecoder::new_multi_decoder(whole)))
    } else if magic.starts_with(cpio::NEWC_MAGIC) || magic.starts_with(cpio::NEWC_CRC_MAGIC) {
        Ok(Box::new(whole))
    } else if magic.starts_with(GZIP_MAGIC) {
        bail!("initramfs is gzip-compressed, which is not supported (only zstd, xz or plain cpio)");
    } else if magic.is_empty() {
        bail!("initramfs is empty");
    } else {
        bail!(
            "unknown initramfs format: magic bytes {} are not zstd, xz or newc cpio",
            hex::encode(magic)
        );
    }
}

/// Wrap a (possibly compressed) initramfs in a decoder chosen by its magic bytes:
/// zstd, xz, or an uncompressed newc cpio passed through as is.
pub fn decompress(r: impl Read + 'static) -> Result<Box<dyn Read>> {
    decompress_borrowed(r)
}

/// Stream the Talos initramfs and copy its `rootfs.sqsh` into an anonymous temporary
/// file (hundreds of MB would not fit comfortably in memory), rewound to the start.
pub fn extract_rootfs_sqsh(initramfs: impl Read) -> Result<File> {
    let stream = decompress_borrowed(initramfs).context("opening Talos initramfs")?;
    let mut reader = cpio::Reader::new(stream);
    while let Some(mut entry) = reader
        .next_entry()
        .context("reading Talos initramfs (corrupt compressed data or truncated archive)")?
    {
        if entry.path() != ROOTFS_SQSH {
            continue;
        }
        if !entry.is_file() {
            bail!("{ROOTFS_SQSH} in the Talos initramfs is not a regular file");
        }
        let mut tmp = tempfile::tempfile().context("creating temporary file for rootfs.sqsh")?;
        let size = entry.size();
        let copied = copy_large(&mut entry, &mut tmp).with_context(|| {
            format!("extracting {ROOTFS_SQSH} from the Talos initramfs (corrupt compressed data or truncated archive)")
        })?;
        if copied != size {
            bail!("{ROOTFS_SQSH}: copied {copied} of {size} bytes");
        }
        // Read on to the end, so the trailer and the compressed stream's checksum are
        // verified too: a damaged stream must not yield a silently damaged squashfs.
        while reader
            .next_entry()
            .context("reading the rest of the Talos initramfs (corrupt compressed data or truncated archive)")?
            .is_some()
        {}
        tmp.seek(SeekFrom::Start(0))
            .context("rewinding extracted rootfs.sqsh")?;
        return Ok(tmp);
    }
    bail!("Talos initramfs has no {ROOTFS_SQSH}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = cpio::Writer::new(Vec::new(), 0);
        for (name, data) in files {
            w.add_file(name, 0o644, data.len() as u64, &mut Cursor::new(data))
                .unwrap();
        }
        w.finish().unwrap()
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        e.include_checksum(true).unwrap();
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn decompress_sniffs_all_three() {
        let plain = archive(&[("a", b"1")]);
        for input in [plain.clone(), zstd(&plain), xz(&plain)] {
            let mut out = Vec::new();
            decompress(Cursor::new(input))
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
            assert_eq!(out, plain);
        }
    }

    #[test]
    fn decompress_names_unknown_magic() {
        let err = decompress(Cursor::new(b"\x01\x02\x03\x04\x05\x06\x07".to_vec()))
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("010203040506"), "{err:#}");
        let err = decompress(Cursor::new(vec![0x1f, 0x8b, 8, 0]))
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("gzip"), "{err:#}");
        assert!(decompress(Cursor::new(Vec::new())).is_err());
    }

    #[test]
    fn extracts_rootfs_and_reports_absence_and_damage() {
        // Pseudo-random bytes, so that damage to the compressed stream cannot go unnoticed.
        let sqsh = crate::util::noise(0x2545_f491, 100_000);
        let a = archive(&[("init", b"#!"), ("rootfs.sqsh", &sqsh)]);
        let mut f = extract_rootfs_sqsh(Cursor::new(zstd(&a))).unwrap();
        let mut got = Vec::new();
        f.read_to_end(&mut got).unwrap();
        assert_eq!(got, sqsh);

        let err = extract_rootfs_sqsh(Cursor::new(zstd(&archive(&[("init", b"#!")]))))
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("has no rootfs.sqsh"), "{err:#}");

        // Truncated in the middle of rootfs.sqsh, plain and compressed.
        let cut = &a[..a.len() / 2];
        let err = extract_rootfs_sqsh(Cursor::new(cut.to_vec()))
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("truncated"), "{err:#}");
        let z = zstd(&a);
        assert!(extract_rootfs_sqsh(Cursor::new(z[..z.len() / 2].to_vec())).is_err());
        // Corrupt compressed data.
        let mut bad = z.clone();
        let mid = bad.len() / 2;
        for b in &mut bad[mid..mid + 64] {
            *b ^= 0x55;
        }
        let err = extract_rootfs_sqsh(Cursor::new(bad)).err().unwrap();
        assert!(
            format!("{err:#}").contains("corrupt compressed data"),
            "{err:#}"
        );
    }
}
