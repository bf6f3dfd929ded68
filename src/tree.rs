//! An in-memory description of a filesystem tree to be written into an image.
//!
//! Both filesystem writers (FAT32 ESP and ext4 rootfs) consume a [`FileTree`], so the
//! builder decides *what* goes into the image once and the writers only decide *how*.
//! Paths are relative, `/`-separated, without a leading slash; iteration is always in
//! sorted byte order, which is what makes images reproducible.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

/// Where a regular file's bytes come from.
#[derive(Clone, Debug)]
pub enum Content {
    /// Bytes held in memory (rendered templates, small generated files).
    Bytes(Arc<Vec<u8>>),
    /// A file on disk, streamed when the image is written; `len` is checked then.
    Path { path: PathBuf, len: u64 },
    /// A byte range of a file on disk (a file inside an ISO, streamed without copying).
    Range {
        path: PathBuf,
        offset: u64,
        len: u64,
    },
}

impl Content {
    pub fn bytes(data: impl Into<Vec<u8>>) -> Self {
        Content::Bytes(Arc::new(data.into()))
    }

    /// Refer to a file on disk, recording its current length.
    pub fn path(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let len = std::fs::metadata(&path)
            .with_context(|| format!("reading metadata of {}", path.display()))?
            .len();
        Ok(Content::Path { path, len })
    }

    pub fn len(&self) -> u64 {
        match self {
            Content::Bytes(b) => b.len() as u64,
            Content::Path { len, .. } | Content::Range { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Open a reader that yields exactly `len()` bytes (callers should still use `take`).
    pub fn open(&self) -> Result<Box<dyn Read + Send + 'static>> {
        match self {
            Content::Bytes(b) => Ok(Box::new(Cursor::new(SharedBytes(b.clone())))),
            Content::Path { path, .. } => {
                let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
                Ok(Box::new(f))
            }
            Content::Range { path, offset, len } => {
                use std::io::{Seek, SeekFrom};
                let mut f =
                    File::open(path).with_context(|| format!("opening {}", path.display()))?;
                f.seek(SeekFrom::Start(*offset))
                    .with_context(|| format!("seeking in {}", path.display()))?;
                Ok(Box::new(f.take(*len)))
            }
        }
    }

    /// Read the whole content into memory (for small files only).
    pub fn read_all(&self) -> Result<Vec<u8>> {
        let mut v = Vec::with_capacity(self.len() as usize);
        self.open()?.read_to_end(&mut v)?;
        Ok(v)
    }
}

/// `Arc<Vec<u8>>` as a byte slice, so a reader over it owns what it reads.
struct SharedBytes(Arc<Vec<u8>>);

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

#[derive(Clone, Debug)]
pub enum Kind {
    Dir,
    File(Content),
    Symlink(String),
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub kind: Kind,
    /// Permission bits only (e.g. 0o644); the type comes from `kind`.
    pub mode: u32,
}

/// A sorted tree of directories, files and symlinks. Parents are created implicitly.
#[derive(Clone, Debug, Default)]
pub struct FileTree {
    entries: BTreeMap<String, Entry>,
}

pub const DIR_MODE: u32 = 0o755;
pub const FILE_MODE: u32 = 0o644;

fn normalize(path: &str) -> Result<String> {
    let mut parts = Vec::new();
    for comp in path.split('/') {
        match comp {
            "" | "." => {}
            ".." => bail!("path {path:?} contains '..'"),
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        bail!("empty path {path:?}");
    }
    Ok(parts.join("/"))
}

impl FileTree {
    pub fn new() -> Self {
        Self::default()
    }

    fn ensure_parents(&mut self, path: &str) -> Result<()> {
        let mut idx = 0;
        while let Some(pos) = path[idx..].find('/') {
            let parent = &path[..idx + pos];
            match self.entries.get(parent) {
                Some(Entry {
                    kind: Kind::Dir, ..
                }) => {}
                Some(_) => bail!("{parent} is not a directory (needed for {path})"),
                None => {
                    self.entries.insert(
                        parent.to_string(),
                        Entry {
                            kind: Kind::Dir,
                            mode: DIR_MODE,
                        },
                    );
                }
            }
            idx += pos + 1;
        }
        Ok(())
    }

    fn insert(&mut self, path: &str, entry: Entry) -> Result<()> {
        let path = normalize(path)?;
        self.ensure_parents(&path)?;
        if let Some(old) = self.entries.get(&path) {
            // A directory may be re-declared (to change its mode); files are replaced,
            // which is how overlays override generated files.
            if matches!(old.kind, Kind::Dir) != matches!(entry.kind, Kind::Dir) {
                bail!("{path} is declared both as a directory and as a non-directory");
            }
        }
        self.entries.insert(path, entry);
        Ok(())
    }

    pub fn add_dir(&mut self, path: &str, mode: u32) -> Result<()> {
        self.insert(
            path,
            Entry {
                kind: Kind::Dir,
                mode,
            },
        )
    }

    pub fn add_file(&mut self, path: &str, content: Content, mode: u32) -> Result<()> {
        self.insert(
            path,
            Entry {
                kind: Kind::File(content),
                mode,
            },
        )
    }

    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.insert(
            path,
            Entry {
                kind: Kind::Symlink(target.to_string()),
                mode: 0o777,
            },
        )
    }

    /// Copy a directory tree from disk under `prefix` (used for `--overlay`).
    /// Modes are normalized (0755 for executables and dirs, 0644 otherwise) so that
    /// the checkout's umask does not change the image.
    pub fn add_host_dir(&mut self, src: &Path, prefix: &str) -> Result<()> {
        let mut names: Vec<_> = std::fs::read_dir(src)
            .with_context(|| format!("reading directory {}", src.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("reading directory {}", src.display()))?;
        names.sort();
        for name in names {
            let name_str = name
                .to_str()
                .with_context(|| format!("non-UTF-8 file name in {}", src.display()))?;
            let host = src.join(&name);
            let dest = if prefix.is_empty() {
                name_str.to_string()
            } else {
                format!("{prefix}/{name_str}")
            };
            let meta = std::fs::symlink_metadata(&host)
                .with_context(|| format!("reading metadata of {}", host.display()))?;
            let ft = meta.file_type();
            if ft.is_dir() {
                self.add_dir(&dest, DIR_MODE)?;
                self.add_host_dir(&host, &dest)?;
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&host)
                    .with_context(|| format!("reading symlink {}", host.display()))?;
                let target = target
                    .to_str()
                    .with_context(|| format!("non-UTF-8 symlink target in {}", host.display()))?;
                self.add_symlink(&dest, target)?;
            } else if ft.is_file() {
                use std::os::unix::fs::PermissionsExt;
                let mode = if meta.permissions().mode() & 0o111 != 0 {
                    0o755
                } else {
                    FILE_MODE
                };
                self.add_file(&dest, Content::path(&host)?, mode)?;
            } else {
                bail!(
                    "{}: only files, directories and symlinks can be copied",
                    host.display()
                );
            }
        }
        Ok(())
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path.trim_matches('/'))
    }

    /// All entries in sorted path order (a parent always precedes its children).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Direct children of `dir` ("" for the root), sorted by name: (name, full path, entry).
    pub fn children<'a>(&'a self, dir: &str) -> Vec<(&'a str, &'a str, &'a Entry)> {
        let dir = dir.trim_matches('/');
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        self.entries
            .range::<str, _>((
                std::ops::Bound::Included(prefix.as_str()),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| !k[prefix.len()..].contains('/'))
            .map(|(k, v)| (&k[prefix.len()..], k.as_str(), v))
            .collect()
    }

    /// Sum of the apparent sizes of all regular files.
    pub fn payload_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|e| match &e.kind {
                Kind::File(c) => c.len(),
                _ => 0,
            })
            .sum()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_implicit_and_children_sorted() {
        let mut t = FileTree::new();
        t.add_file("b/z.txt", Content::bytes("z"), FILE_MODE)
            .unwrap();
        t.add_file("b/a.txt", Content::bytes("a"), FILE_MODE)
            .unwrap();
        t.add_file("a", Content::bytes("root"), FILE_MODE).unwrap();
        t.add_file("b/c/d", Content::bytes("deep"), FILE_MODE)
            .unwrap();
        let root: Vec<_> = t.children("").iter().map(|c| c.0).collect();
        assert_eq!(root, ["a", "b"]);
        let b: Vec<_> = t.children("b").iter().map(|c| c.0).collect();
        assert_eq!(b, ["a.txt", "c", "z.txt"]);
        assert!(matches!(t.get("b/c").unwrap().kind, Kind::Dir));
        assert_eq!(t.payload_bytes(), 1 + 1 + 4 + 4);
    }

    #[test]
    fn rejects_dotdot_and_type_conflicts() {
        let mut t = FileTree::new();
        assert!(t
            .add_file("../etc/passwd", Content::bytes(""), 0o644)
            .is_err());
        t.add_file("x", Content::bytes(""), 0o644).unwrap();
        assert!(t.add_file("x/y", Content::bytes(""), 0o644).is_err());
        assert!(t.add_dir("x", 0o755).is_err());
    }
}
