//! The "newc" cpio format (magic `070701`), as the kernel's initramfs unpacker reads it.
//!
//! Layout of one entry: a 110-byte ASCII header (magic + 13 fields of 8 upper-case hex
//! digits), the NUL-terminated name, zeros up to a 4-byte boundary, the data, zeros up to
//! a 4-byte boundary. The archive ends with an entry named `TRAILER!!!`. The kernel
//! (init/initramfs.c) also accepts several archives back to back, with zero bytes between
//! them, as long as each starts on a 4-byte boundary. It does not create missing parent
//! directories, so a directory must come before anything inside it.

use std::collections::HashSet;
use std::io::{self, BufRead, BufReader, Read, Write};

use anyhow::{bail, ensure, Context, Result};

pub const NEWC_MAGIC: &[u8; 6] = b"070701";
/// Same layout, plus a checksum (the byte sum of the data) in the last field.
pub const NEWC_CRC_MAGIC: &[u8; 6] = b"070702";
/// The old portable format, which the kernel refuses.
const ODC_MAGIC: &[u8; 6] = b"070707";
pub const HEADER_LEN: usize = 110;
pub const TRAILER: &str = "TRAILER!!!";
/// The kernel skips names and symlink targets longer than this.
const PATH_MAX: u32 = 4096;
const ALIGN: u64 = 4;

pub const S_IFMT: u32 = 0o170000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;
const PERM_MASK: u32 = 0o7777;

fn pad_len(offset: u64) -> u64 {
    (ALIGN - offset % ALIGN) % ALIGN
}

/// The 13 numeric fields of a newc header, in on-disk order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub ino: u32,
    /// File type and permission bits (`S_IF*` | 0o7777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
    /// Length of the data (for a symlink: of its target).
    pub filesize: u32,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    /// Length of the name including its NUL.
    pub namesize: u32,
    pub check: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut buf = [0u8; HEADER_LEN];
        buf[..6].copy_from_slice(NEWC_MAGIC);
        let fields = [
            self.ino,
            self.mode,
            self.uid,
            self.gid,
            self.nlink,
            self.mtime,
            self.filesize,
            self.dev_major,
            self.dev_minor,
            self.rdev_major,
            self.rdev_minor,
            self.namesize,
            self.check,
        ];
        for (i, f) in fields.iter().enumerate() {
            let start = 6 + 8 * i;
            buf[start..start + 8].copy_from_slice(format!("{f:08X}").as_bytes());
        }
        buf
    }

    /// Parse a header; returns it and whether the data carries a checksum.
    fn decode(buf: &[u8; HEADER_LEN], offset: u64) -> Result<(Self, bool)> {
        let magic = &buf[..6];
        let crc = if magic == NEWC_MAGIC {
            false
        } else if magic == NEWC_CRC_MAGIC {
            true
        } else if magic == ODC_MAGIC {
            bail!("cpio entry at offset {offset} is in the old portable format; only newc is supported");
        } else {
            bail!(
                "no cpio magic at offset {offset} (found {})",
                hex::encode(magic)
            );
        };
        let mut f = [0u32; 13];
        for (i, v) in f.iter_mut().enumerate() {
            let start = 6 + 8 * i;
            let text = std::str::from_utf8(&buf[start..start + 8])
                .ok()
                .filter(|t| t.bytes().all(|b| b.is_ascii_hexdigit()))
                .with_context(|| format!("malformed cpio header field {i} at offset {offset}"))?;
            *v = u32::from_str_radix(text, 16)
                .with_context(|| format!("malformed cpio header field {i} at offset {offset}"))?;
        }
        let h = Header {
            ino: f[0],
            mode: f[1],
            uid: f[2],
            gid: f[3],
            nlink: f[4],
            mtime: f[5],
            filesize: f[6],
            dev_major: f[7],
            dev_minor: f[8],
            rdev_major: f[9],
            rdev_minor: f[10],
            namesize: f[11],
            check: f[12],
        };
        Ok((h, crc))
    }
}

/// Check a path for the archive and return it without a leading '/'.
fn archive_name(path: &str) -> Result<String> {
    let name = path.trim_start_matches('/').trim_end_matches('/');
    ensure!(!name.is_empty(), "empty cpio entry name {path:?}");
    ensure!(
        !name.contains('\0'),
        "cpio entry name {path:?} contains NUL"
    );
    ensure!(
        name.len() < PATH_MAX as usize,
        "cpio entry name {path:?} is too long"
    );
    for comp in name.split('/') {
        ensure!(
            !matches!(comp, "" | "." | ".."),
            "cpio entry name {path:?} is not a normalized relative path"
        );
    }
    ensure!(name != TRAILER, "{TRAILER} is reserved");
    Ok(name.to_string())
}

/// Deterministic newc writer: inodes numbered from 1 in order of addition, uid/gid 0,
/// one fixed mtime, nlink 2 for directories and 1 otherwise (so the kernel never tries
/// to hard-link two entries).
pub struct Writer<W: Write> {
    out: W,
    offset: u64,
    next_ino: u32,
    mtime: u32,
    names: HashSet<String>,
    dirs: HashSet<String>,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W, mtime: u32) -> Self {
        Writer {
            out,
            offset: 0,
            next_ino: 1,
            mtime,
            names: HashSet::new(),
            dirs: HashSet::new(),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> Result<()> {
        self.out.write_all(buf).context("writing cpio archive")?;
        self.offset += buf.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let n = pad_len(self.offset) as usize;
        self.write_all(&[0u8; ALIGN as usize][..n])
    }

    /// Register a new entry name, checking that it is unique and its parent exists.
    fn claim(&mut self, path: &str) -> Result<String> {
        let name = archive_name(path)?;
        if let Some((parent, _)) = name.rsplit_once('/') {
            ensure!(
                self.dirs.contains(parent),
                "cpio entry {name}: parent directory {parent} must be added first"
            );
        }
        ensure!(
            self.names.insert(name.clone()),
            "duplicate cpio entry {name}"
        );
        Ok(name)
    }

    fn write_header(&mut self, name: &str, mut h: Header) -> Result<()> {
        h.ino = if name == TRAILER { 0 } else { self.next_ino };
        if name != TRAILER {
            self.next_ino = self
                .next_ino
                .checked_add(1)
                .context("too many cpio entries")?;
        }
        h.mtime = if name == TRAILER { 0 } else { self.mtime };
        h.namesize = name.len() as u32 + 1;
        let header = h.encode();
        self.write_all(&header)?;
        self.write_all(name.as_bytes())?;
        self.write_all(&[0])?;
        self.pad()
    }

    pub fn add_dir(&mut self, path: &str, mode: u32) -> Result<()> {
        let name = self.claim(path)?;
        let h = Header {
            mode: S_IFDIR | (mode & PERM_MASK),
            nlink: 2,
            ..Header::default()
        };
        self.write_header(&name, h)?;
        self.dirs.insert(name);
        Ok(())
    }

    /// Add a regular file of exactly `len` bytes read from `data`.
    pub fn add_file(&mut self, path: &str, mode: u32, len: u64, data: &mut dyn Read) -> Result<()> {
        let name = self.claim(path)?;
        let filesize = u32::try_from(len)
            .with_context(|| format!("{name}: {len} bytes is too large for newc cpio"))?;
        let h = Header {
            mode: S_IFREG | (mode & PERM_MASK),
            nlink: 1,
            filesize,
            ..Header::default()
        };
        self.write_header(&name, h)?;
        let copied = io::copy(&mut data.take(len), &mut self.out)
            .with_context(|| format!("copying {name} into cpio archive"))?;
        self.offset += copied;
        ensure!(
            copied == len,
            "{name}: source ended after {copied} of {len} bytes"
        );
        let mut probe = [0u8; 1];
        let extra = data
            .read(&mut probe)
            .with_context(|| format!("reading {name}"))?;
        ensure!(
            extra == 0,
            "{name}: source is longer than the declared {len} bytes"
        );
        self.pad()
    }

    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<()> {
        let name = self.claim(path)?;
        ensure!(
            !target.is_empty() && (target.len() as u32) < PATH_MAX && !target.contains('\0'),
            "{name}: invalid symlink target {target:?}"
        );
        let h = Header {
            mode: S_IFLNK | 0o777,
            nlink: 1,
            filesize: target.len() as u32,
            ..Header::default()
        };
        self.write_header(&name, h)?;
        self.write_all(target.as_bytes())?;
        self.pad()
    }

    pub fn add_char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> Result<()> {
        let name = self.claim(path)?;
        let h = Header {
            mode: S_IFCHR | (mode & PERM_MASK),
            nlink: 1,
            rdev_major: major,
            rdev_minor: minor,
            ..Header::default()
        };
        self.write_header(&name, h)
    }

    /// Write the trailer and hand back the output (not flushed beyond what `write` did).
    pub fn finish(mut self) -> Result<W> {
        let h = Header {
            nlink: 1,
            ..Header::default()
        };
        self.write_header(TRAILER, h)?;
        self.out.flush().context("flushing cpio archive")?;
        Ok(self.out)
    }
}

/// Streaming newc reader. Reads one or more concatenated archives; zero bytes between
/// them are skipped. Errors on a truncated archive (EOF before a trailer or inside data).
pub struct Reader<R: Read> {
    inner: BufReader<R>,
    offset: u64,
    /// Data bytes of the current entry not yet consumed, and its checksum state.
    remaining: u64,
    crc: Option<(u32, u32)>,
    current: String,
    /// A trailer was read and no entry has followed it yet.
    after_trailer: bool,
}

/// One entry of a [`Reader`]; reading it yields the entry's data.
pub struct Entry<'a, R: Read> {
    pub header: Header,
    pub name: String,
    reader: &'a mut Reader<R>,
}

impl<R: Read> Entry<'_, R> {
    pub fn mode(&self) -> u32 {
        self.header.mode
    }
    pub fn size(&self) -> u64 {
        self.header.filesize as u64
    }
    pub fn file_type(&self) -> u32 {
        self.header.mode & S_IFMT
    }
    pub fn is_dir(&self) -> bool {
        self.file_type() == S_IFDIR
    }
    pub fn is_file(&self) -> bool {
        self.file_type() == S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.file_type() == S_IFLNK
    }
    /// The name without a leading "./" or "/".
    pub fn path(&self) -> &str {
        let n = self.name.trim_start_matches("./");
        n.trim_start_matches('/')
    }
    /// Read a symlink's target (consumes the data).
    pub fn read_link(&mut self) -> Result<String> {
        ensure!(self.is_symlink(), "{} is not a symlink", self.name);
        let mut t = String::new();
        self.read_to_string(&mut t)
            .with_context(|| format!("reading symlink target of {}", self.name))?;
        Ok(t)
    }
}

impl<R: Read> Read for Entry<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read_data(buf)
    }
}

impl<R: Read> Reader<R> {
    pub fn new(inner: R) -> Self {
        Reader {
            inner: BufReader::with_capacity(64 * 1024, inner),
            offset: 0,
            remaining: 0,
            crc: None,
            current: String::new(),
            after_trailer: false,
        }
    }

    fn read_data(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "truncated cpio archive: data of {} ends {} bytes early",
                    self.current, self.remaining
                ),
            ));
        }
        self.remaining -= n as u64;
        self.offset += n as u64;
        if let Some((sum, expected)) = &mut self.crc {
            for b in &buf[..n] {
                *sum = sum.wrapping_add(*b as u32);
            }
            if self.remaining == 0 && *sum != *expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("cpio checksum mismatch for {}", self.current),
                ));
            }
        }
        Ok(n)
    }

    fn read_exact_counted(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                anyhow::anyhow!(
                    "truncated cpio archive: {what} at offset {} is cut short",
                    self.offset
                )
            } else {
                anyhow::Error::new(e)
                    .context(format!("reading cpio {what} at offset {}", self.offset))
            }
        })?;
        self.offset += buf.len() as u64;
        Ok(())
    }

    fn skip_padding(&mut self) -> Result<()> {
        let mut pad = [0u8; ALIGN as usize];
        let n = pad_len(self.offset) as usize;
        self.read_exact_counted(&mut pad[..n], "padding")
    }

    /// Skip zero bytes; returns false at EOF.
    fn skip_zeros(&mut self) -> Result<bool> {
        loop {
            let buf = self
                .inner
                .fill_buf()
                .with_context(|| format!("reading cpio archive at offset {}", self.offset))?;
            if buf.is_empty() {
                return Ok(false);
            }
            let zeros = buf.iter().take_while(|&&b| b == 0).count();
            let more = zeros < buf.len();
            self.inner.consume(zeros);
            self.offset += zeros as u64;
            if more {
                return Ok(true);
            }
        }
    }

    /// Advance to the next entry (skipping whatever is left of the current one).
    /// Returns `None` after the last trailer.
    pub fn next_entry(&mut self) -> Result<Option<Entry<'_, R>>> {
        let current = self.current.clone();
        io::copy(&mut ReadData(self), &mut io::sink())
            .with_context(|| format!("skipping data of {current}"))?;
        self.skip_padding()?;
        loop {
            if self.after_trailer || self.offset == 0 {
                if !self.skip_zeros()? {
                    ensure!(
                        self.after_trailer,
                        "no cpio archive (the input is empty or all zeros)"
                    );
                    return Ok(None);
                }
                ensure!(
                    self.offset.is_multiple_of(ALIGN),
                    "data at offset {} is not a 4-byte aligned cpio archive",
                    self.offset
                );
            }
            let start = self.offset;
            let mut raw = [0u8; HEADER_LEN];
            self.read_exact_counted(&mut raw, "header")?;
            let (header, crc) = Header::decode(&raw, start)?;
            ensure!(
                header.namesize > 0 && header.namesize <= PATH_MAX,
                "malformed cpio archive: name size {} at offset {start}",
                header.namesize
            );
            let mut name = vec![0u8; header.namesize as usize];
            self.read_exact_counted(&mut name, "name")?;
            ensure!(
                name.pop() == Some(0),
                "malformed cpio archive: name at offset {start} is not NUL-terminated"
            );
            let name = String::from_utf8_lossy(&name).into_owned();
            self.skip_padding()?;
            if header.mode & S_IFMT == S_IFLNK {
                ensure!(
                    header.filesize < PATH_MAX,
                    "malformed cpio archive: symlink {name} target too long"
                );
            }
            self.remaining = header.filesize as u64;
            // Like the kernel, only regular files' checksums are checked (GNU cpio writes
            // 0 for symlinks).
            let is_file = header.mode & S_IFMT == S_IFREG;
            self.crc = (crc && is_file).then_some((0, header.check));
            self.current = name.clone();
            if name == TRAILER {
                ensure!(
                    self.remaining == 0,
                    "malformed cpio archive: trailer at offset {start} has data"
                );
                self.after_trailer = true;
                continue;
            }
            self.after_trailer = false;
            return Ok(Some(Entry {
                header,
                name,
                reader: self,
            }));
        }
    }
}

struct ReadData<'a, R: Read>(&'a mut Reader<R>);

impl<R: Read> Read for ReadData<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read_data(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn sample(mtime: u32) -> Vec<u8> {
        let mut w = Writer::new(Vec::new(), mtime);
        w.add_dir("dev", 0o755).unwrap();
        w.add_char_dev("dev/console", 0o600, 5, 1).unwrap();
        w.add_file("init", 0o755, 5, &mut Cursor::new(b"hello"))
            .unwrap();
        w.add_symlink("sh", "init").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn header_and_padding_layout() {
        let a = sample(0x1234);
        // First entry "dev": header 110 + "dev\0" 4 = 114, padded to 116.
        assert_eq!(&a[..6], b"070701");
        assert_eq!(&a[6..14], b"00000001"); // ino
        assert_eq!(&a[14..22], b"000041ED"); // mode dir 0755
        assert_eq!(&a[38..46], b"00000002"); // nlink
        assert_eq!(&a[46..54], b"00001234"); // mtime
        assert_eq!(&a[110..114], b"dev\0");
        assert_eq!(&a[114..116], b"\0\0");
        assert_eq!(&a[116..122], b"070701");
        assert_eq!(a.len() % 4, 0);
        // The archive ends with the trailer: 110 + 11 bytes of name = 121, padded to 124.
        let tail = b"TRAILER!!!\0";
        let pos = a.windows(tail.len()).position(|w| w == tail).unwrap();
        assert_eq!(pos + tail.len() + 3, a.len());
        assert_eq!(
            &a[pos - HEADER_LEN..pos - HEADER_LEN + 14],
            b"07070100000000"
        );
    }

    #[test]
    fn reads_back_what_it_writes() {
        let a = sample(7);
        let mut r = Reader::new(Cursor::new(&a));
        let mut seen = Vec::new();
        while let Some(mut e) = r.next_entry().unwrap() {
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            seen.push((
                e.name.clone(),
                e.mode(),
                e.header.rdev_major,
                e.header.rdev_minor,
                data,
            ));
        }
        assert_eq!(
            seen,
            vec![
                ("dev".into(), 0o40755, 0, 0, vec![]),
                ("dev/console".into(), 0o20600, 5, 1, vec![]),
                ("init".into(), 0o100755, 0, 0, b"hello".to_vec()),
                ("sh".into(), 0o120777, 0, 0, b"init".to_vec()),
            ]
        );
    }

    #[test]
    fn concatenated_with_zero_padding_and_skipped_data() {
        let mut a = sample(1);
        a.extend_from_slice(&[0u8; 512]);
        let mut w = Writer::new(Vec::new(), 1);
        w.add_file("second", 0o644, 3, &mut Cursor::new(b"abc"))
            .unwrap();
        a.extend(w.finish().unwrap());
        a.extend_from_slice(&[0u8; 100]);
        let mut r = Reader::new(Cursor::new(&a));
        let mut names = Vec::new();
        // Do not read any data: the reader must skip it itself.
        while let Some(e) = r.next_entry().unwrap() {
            names.push(e.name.clone());
        }
        assert_eq!(names, ["dev", "dev/console", "init", "sh", "second"]);
    }

    #[test]
    fn truncation_and_garbage_are_errors() {
        let a = sample(1);
        for cut in [0, 50, 120, 300, a.len() - 10] {
            let mut r = Reader::new(Cursor::new(&a[..cut]));
            let res = (|| -> Result<()> {
                while let Some(mut e) = r.next_entry()? {
                    io::copy(&mut e, &mut io::sink())?;
                }
                Ok(())
            })();
            assert!(res.is_err(), "cut at {cut} was accepted");
        }
        let mut r = Reader::new(Cursor::new(b"not a cpio archive at all, but long enough to hold a header......................................................"));
        let err = r.next_entry().err().unwrap();
        assert!(format!("{err:#}").contains("no cpio magic"), "{err:#}");
        // A misaligned second archive is refused, as the kernel would.
        let mut b = sample(1);
        b.push(0);
        b.extend(sample(1));
        let mut r = Reader::new(Cursor::new(&b));
        let res = (|| -> Result<()> {
            while r.next_entry()?.is_some() {}
            Ok(())
        })();
        assert!(res.is_err());
    }

    #[test]
    fn writer_rejects_bad_input() {
        let mut w = Writer::new(Vec::new(), 0);
        assert!(
            w.add_file("a/b", 0o644, 0, &mut io::empty()).is_err(),
            "missing parent"
        );
        assert!(w.add_dir("../x", 0o755).is_err());
        assert!(w.add_dir("", 0o755).is_err());
        w.add_dir("/a", 0o755).unwrap();
        assert!(w.add_dir("a", 0o755).is_err(), "duplicate");
        assert!(w
            .add_file("a/short", 0o644, 10, &mut Cursor::new(b"abc"))
            .is_err());
        assert!(w
            .add_file("a/long", 0o644, 2, &mut Cursor::new(b"abc"))
            .is_err());
    }

    #[test]
    fn crc_format_is_verified() {
        let a = sample(1);
        // Turn the "init" entry into 070702 with the right and then a wrong checksum.
        let pos = a.windows(5).position(|w| w == b"init\0").unwrap() - HEADER_LEN;
        let sum: u32 = b"hello".iter().map(|&b| b as u32).sum();
        for (check, ok) in [(sum, true), (sum + 1, false)] {
            let mut b = a.clone();
            b[pos..pos + 6].copy_from_slice(NEWC_CRC_MAGIC);
            b[pos + 102..pos + 110].copy_from_slice(format!("{check:08X}").as_bytes());
            let mut r = Reader::new(Cursor::new(&b));
            let res = (|| -> Result<()> {
                while let Some(mut e) = r.next_entry()? {
                    io::copy(&mut e, &mut io::sink())?;
                }
                Ok(())
            })();
            assert_eq!(res.is_ok(), ok, "{res:?}");
        }
    }
}
