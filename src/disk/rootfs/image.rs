//! Reading an ext4 filesystem back (for `mkappliance inspect` and tests), with `ext4-view`.

use std::fs::File;
use std::os::unix::fs::FileExt;

use anyhow::{bail, Context, Result};
use ext4_view::{Ext4, Ext4Read};

use super::extents::{FileMap, Mapper};

/// A byte range of a file, as `ext4-view` reads it.
struct Range {
    file: File,
    offset: u64,
    size: u64,
}

impl Ext4Read for Range {
    fn read(
        &mut self,
        start: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let end = start.checked_add(dst.len() as u64);
        if end.is_none_or(|end| end > self.size) {
            return Err(format!(
                "read of {} bytes at {start} is past the end of the {}-byte filesystem",
                dst.len(),
                self.size
            )
            .into());
        }
        self.file.read_exact_at(dst, self.offset + start)?;
        Ok(())
    }
}

/// An ext4 filesystem opened read-only over a byte range of a file.
pub struct Ext4Image {
    fs: Ext4,
    /// The same range again, for [`Ext4Image::file_map`].
    raw: Range,
}

impl Ext4Image {
    pub fn open(file: File, offset: u64, size: u64) -> Result<Self> {
        let raw = Range {
            file: file
                .try_clone()
                .context("duplicating the image file handle")?,
            offset,
            size,
        };
        let fs = Ext4::load(Box::new(Range { file, offset, size }))
            .with_context(|| format!("opening ext4 filesystem at offset {offset}"))?;
        Ok(Ext4Image { fs, raw })
    }

    /// Where the bytes of the regular file at `path` lie in the image file (offsets count
    /// from the start of the image, not of the filesystem), so they can be `pread` or
    /// `sendfile`d directly. Symlinks are not followed.
    pub fn file_map(&self, path: &str) -> Result<FileMap> {
        Mapper::new(&self.raw.file, self.raw.offset, self.raw.size)?.file_map(path)
    }

    /// All entries, sorted by path: (path without leading '/', is_dir, size). Symlinks are
    /// not followed (their size is the target's length); `lost+found` is included.
    pub fn list(&self) -> Result<Vec<(String, bool, u64)>> {
        let mut out = Vec::new();
        self.walk("", &mut out)?;
        out.sort();
        Ok(out)
    }

    fn walk(&self, dir: &str, out: &mut Vec<(String, bool, u64)>) -> Result<()> {
        let abs = format!("/{dir}");
        let entries = self
            .fs
            .read_dir(abs.as_str())
            .with_context(|| format!("reading directory {abs}"))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("reading directory {abs}"))?;
            let name = entry.file_name();
            let name = name
                .as_str()
                .with_context(|| format!("non-UTF-8 name in {abs}"))?;
            if name == "." || name == ".." {
                continue;
            }
            let path = if dir.is_empty() {
                name.to_string()
            } else {
                format!("{dir}/{name}")
            };
            let meta = entry
                .metadata()
                .with_context(|| format!("reading metadata of /{path}"))?;
            out.push((path.clone(), meta.is_dir(), meta.len()));
            if meta.is_dir() {
                self.walk(&path, out)?;
            }
        }
        Ok(())
    }

    /// The contents of the regular file at `path` (with or without a leading '/').
    pub fn read(&self, path: &str) -> Result<Vec<u8>> {
        let abs = format!("/{}", path.trim_start_matches('/'));
        let meta = self
            .fs
            .symlink_metadata(abs.as_str())
            .with_context(|| format!("looking up {abs}"))?;
        if meta.is_dir() {
            bail!("{abs} is a directory");
        }
        self.fs
            .read(abs.as_str())
            .with_context(|| format!("reading {abs}"))
    }

    pub fn label(&self) -> String {
        self.fs.label().display().to_string()
    }

    pub fn uuid(&self) -> [u8; 16] {
        *self.fs.uuid().as_bytes()
    }
}
