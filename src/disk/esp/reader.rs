//! Reading FAT volumes (ours, and the EFI image inside a Talos ISO) through `fatfs`.

use std::io::{self, Read, Seek, SeekFrom, Write};

use anyhow::{bail, Context, Result};

/// Bytes read from the device at a time; `fatfs` reads directory entries field by field.
const CACHE_BYTES: usize = 64 * 1024;
/// Deeper nesting than this means a directory loop in a corrupt volume.
const MAX_DEPTH: usize = 64;

/// A view of `[offset, offset + len)` of another stream, itself seekable from 0.
pub struct Slice<R> {
    inner: R,
    offset: u64,
    len: u64,
    pos: u64,
}

impl<R: Seek> Slice<R> {
    pub fn new(mut inner: R, offset: u64, len: u64) -> io::Result<Self> {
        inner.seek(SeekFrom::Start(offset))?;
        Ok(Slice {
            inner,
            offset,
            len,
            pos: 0,
        })
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// How many of `want` bytes fit before the end of the slice.
    fn room(&self, want: usize) -> usize {
        usize::try_from(self.len.saturating_sub(self.pos)).map_or(want, |left| want.min(left))
    }
}

impl<R: Read + Seek> Read for Slice<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.room(buf.len());
        if n == 0 {
            return Ok(0);
        }
        self.inner.seek(SeekFrom::Start(self.offset + self.pos))?;
        let got = self.inner.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl<R: Write + Seek> Write for Slice<R> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.room(buf.len());
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the slice",
            ));
        }
        self.inner.seek(SeekFrom::Start(self.offset + self.pos))?;
        let put = self.inner.write(&buf[..n])?;
        self.pos += put as u64;
        Ok(put)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R> Seek for Slice<R> {
    fn seek(&mut self, from: SeekFrom) -> io::Result<u64> {
        self.pos = seek_target(self.pos, self.len, from)?;
        Ok(self.pos)
    }
}

fn seek_target(pos: u64, len: u64, from: SeekFrom) -> io::Result<u64> {
    let target = match from {
        SeekFrom::Start(n) => Some(n),
        SeekFrom::End(d) => len.checked_add_signed(d),
        SeekFrom::Current(d) => pos.checked_add_signed(d),
    };
    target.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))
}

/// A read-only, block-cached adapter: `fatfs` wants `Write`, we never write.
struct ReadOnly<R> {
    inner: R,
    pos: u64,
    /// Length of the device, so reads past its end return 0 like a file does.
    len: u64,
    cache: Vec<u8>,
    cache_start: u64,
}

impl<R: Read + Seek> ReadOnly<R> {
    fn new(mut inner: R) -> io::Result<Self> {
        let len = inner.seek(SeekFrom::End(0))?;
        Ok(ReadOnly {
            inner,
            pos: 0,
            len,
            cache: Vec::new(),
            cache_start: 0,
        })
    }
}

impl<R: Read + Seek> Read for ReadOnly<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.len || buf.is_empty() {
            return Ok(0);
        }
        let cached = self.cache_start..self.cache_start + self.cache.len() as u64;
        if !cached.contains(&self.pos) {
            self.cache_start = self.pos - self.pos % CACHE_BYTES as u64;
            let want = (self.len - self.cache_start).min(CACHE_BYTES as u64) as usize;
            self.cache.resize(want, 0);
            self.inner.seek(SeekFrom::Start(self.cache_start))?;
            if let Err(e) = self.inner.read_exact(&mut self.cache) {
                self.cache.clear();
                return Err(e);
            }
        }
        let at = (self.pos - self.cache_start) as usize;
        let n = buf.len().min(self.cache.len() - at);
        buf[..n].copy_from_slice(&self.cache[at..at + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R> Write for ReadOnly<R> {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "FAT image opened read-only",
        ))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<R> Seek for ReadOnly<R> {
    fn seek(&mut self, from: SeekFrom) -> io::Result<u64> {
        self.pos = seek_target(self.pos, self.len, from)?;
        Ok(self.pos)
    }
}

type Fs<R> = fatfs::FileSystem<ReadOnly<R>>;
type Dir<'a, R> = fatfs::Dir<'a, ReadOnly<R>>;

/// A read-only FAT12/16/32 volume.
pub struct FatImage<R: Read + Seek> {
    fs: Fs<R>,
    label: String,
}

impl<R: Read + Seek> FatImage<R> {
    /// Open the volume that starts at byte 0 of `dev`.
    pub fn open(dev: R) -> Result<Self> {
        let dev = ReadOnly::new(dev).context("finding the size of the FAT volume")?;
        let fs = fatfs::FileSystem::new(dev, fatfs::FsOptions::new())
            .context("reading the FAT boot sector")?;
        // The root directory's label entry is what Linux and Windows show; the boot
        // sector copy is the fallback.
        let root_label = fs
            .read_volume_label_from_root_dir()
            .context("reading the FAT volume label")?;
        let label = root_label.unwrap_or_else(|| fs.volume_label());
        let label = label.trim_end().to_string();
        let label = if label == "NO NAME" {
            String::new()
        } else {
            label
        };
        Ok(FatImage { fs, label })
    }

    pub fn label(&self) -> String {
        self.label.clone()
    }

    pub fn volume_id(&self) -> u32 {
        self.fs.volume_id()
    }

    /// Every file and directory as (path, is_dir, size), sorted by path.
    pub fn list(&self) -> Result<Vec<(String, bool, u64)>> {
        let mut out = Vec::new();
        walk(&self.fs.root_dir(), "", 0, &mut out)?;
        out.sort();
        Ok(out)
    }

    /// The content of the file at `path` (case-insensitive), or None if there is none.
    pub fn read(&self, path: &str) -> Result<Option<Vec<u8>>> {
        let path = path.trim_matches('/');
        let mut file = match self.fs.root_dir().open_file(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("opening {path} in the FAT volume")),
        };
        let mut data = Vec::new();
        file.read_to_end(&mut data)
            .with_context(|| format!("reading {path} from the FAT volume"))?;
        Ok(Some(data))
    }
}

fn walk<R: Read + Seek>(
    dir: &Dir<'_, R>,
    prefix: &str,
    depth: usize,
    out: &mut Vec<(String, bool, u64)>,
) -> Result<()> {
    if depth > MAX_DEPTH {
        bail!("FAT directories nested deeper than {MAX_DEPTH} levels at {prefix}");
    }
    for entry in dir.iter() {
        let entry = entry.with_context(|| format!("reading FAT directory /{prefix}"))?;
        let name = entry.file_name();
        if name == "." || name == ".." {
            continue;
        }
        let path = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        if entry.is_dir() {
            out.push((path.clone(), true, 0));
            walk(&entry.to_dir(), &path, depth + 1, out)?;
        } else {
            out.push((path, false, entry.len()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn slice_reads_writes_and_seeks_within_bounds() {
        let data: Vec<u8> = (0..100).collect();
        let mut s = Slice::new(Cursor::new(data), 10, 20).unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        assert_eq!(buf, (10..30).collect::<Vec<u8>>());
        assert_eq!(s.seek(SeekFrom::End(-5)).unwrap(), 15);
        let mut b = [0u8; 10];
        assert_eq!(s.read(&mut b).unwrap(), 5);
        assert_eq!(&b[..5], &[25, 26, 27, 28, 29]);
        s.seek(SeekFrom::Start(18)).unwrap();
        assert_eq!(s.write(&[0xAA; 5]).unwrap(), 2);
        assert!(s.write(&[0xAA]).is_err());
        assert!(s.seek(SeekFrom::Current(-100)).is_err());
        let inner = s.into_inner().into_inner();
        assert_eq!(&inner[27..31], &[27, 0xAA, 0xAA, 30]);
    }

    #[test]
    fn read_only_cache_spans_blocks() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut r = ReadOnly::new(Cursor::new(data.clone())).unwrap();
        r.seek(SeekFrom::Start(CACHE_BYTES as u64 - 3)).unwrap();
        let mut buf = vec![0u8; 10];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(buf, &data[CACHE_BYTES - 3..CACHE_BYTES + 7]);
        r.seek(SeekFrom::End(-2)).unwrap();
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, &data[data.len() - 2..]);
        assert!(r.write(b"x").is_err());
    }
}
