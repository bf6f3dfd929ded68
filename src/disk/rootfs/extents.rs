//! Where a file's bytes lie inside an ext4 filesystem, so a server can `pread` or
//! `sendfile` them straight from the image instead of copying through a reader.
//!
//! `ext4-view` does not expose block maps, so this walks the few structures needed
//! itself (kernel Documentation/filesystems/ext4): superblock → group descriptor →
//! inode → extent tree, and linear directory blocks for lookups (hashed directories keep
//! linear-readable leaves, so this finds names in them too).

use std::fs::File;
use std::os::unix::fs::FileExt;

use anyhow::{bail, ensure, Context, Result};

const SUPERBLOCK_OFFSET: u64 = 1024;
const EXT4_MAGIC: u16 = 0xEF53;
const ROOT_INO: u32 = 2;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_FILETYPE: u32 = 0x2;
const EXTENTS_FL: u32 = 0x80000;
const INLINE_DATA_FL: u32 = 0x1000_0000;
const EXTENT_MAGIC: u16 = 0xF30A;
/// An extent longer than this is unwritten (reads as zeros); subtract it for the length.
const UNWRITTEN_LEN: u16 = 32768;
/// Deeper trees than this do not occur (4 levels address 2^32 blocks); stop on corruption.
const MAX_DEPTH: u16 = 5;
const S_IFMT: u16 = 0o170000;
const S_IFREG: u16 = 0o100000;
const S_IFDIR: u16 = 0o040000;
/// Longest path we resolve, in components (a loop guard; we do not follow symlinks).
const MAX_COMPONENTS: usize = 64;

/// A run of a file's bytes: `len` bytes at file offset `logical` are at byte `physical`
/// of the image. Unwritten extents read as zeros; gaps between extents are holes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileExtent {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
    pub unwritten: bool,
}

/// A regular file's size and extents, sorted by `logical`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileMap {
    pub size: u64,
    pub extents: Vec<FileExtent>,
}

struct Super {
    block_size: u64,
    inodes_per_group: u32,
    inode_size: u64,
    desc_size: u64,
    first_data_block: u64,
    incompat: u32,
}

/// The filesystem at `[offset, offset + size)` of `file`.
pub(super) struct Mapper<'a> {
    file: &'a File,
    offset: u64,
    size: u64,
    sb: Super,
}

fn u16le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl<'a> Mapper<'a> {
    pub(super) fn new(file: &'a File, offset: u64, size: u64) -> Result<Mapper<'a>> {
        let mut m = Mapper {
            file,
            offset,
            size,
            sb: Super {
                block_size: 1024,
                inodes_per_group: 0,
                inode_size: 0,
                desc_size: 0,
                first_data_block: 0,
                incompat: 0,
            },
        };
        let b = m
            .read(SUPERBLOCK_OFFSET, 1024)
            .context("reading the superblock")?;
        ensure!(u16le(&b, 0x38) == EXT4_MAGIC, "no ext4 superblock");
        let log = u32le(&b, 0x18);
        ensure!(log <= 6, "unsupported block size 2^(10+{log})");
        let incompat = u32le(&b, 0x60);
        let rev = u32le(&b, 0x4C);
        m.sb = Super {
            block_size: 1024 << log,
            inodes_per_group: u32le(&b, 0x28),
            inode_size: if rev == 0 {
                128
            } else {
                u64::from(u16le(&b, 0x58))
            },
            desc_size: if incompat & INCOMPAT_64BIT != 0 {
                u64::from(u16le(&b, 0xFE)).max(32)
            } else {
                32
            },
            first_data_block: u64::from(u32le(&b, 0x14)),
            incompat,
        };
        ensure!(
            m.sb.inodes_per_group > 0 && m.sb.inode_size >= 128,
            "corrupt superblock (inodes per group {}, inode size {})",
            m.sb.inodes_per_group,
            m.sb.inode_size
        );
        Ok(m)
    }

    fn read(&self, at: u64, len: u64) -> Result<Vec<u8>> {
        ensure!(
            at.checked_add(len).is_some_and(|end| end <= self.size),
            "read of {len} bytes at {at} is past the end of the {}-byte filesystem",
            self.size
        );
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, self.offset + at)
            .with_context(|| format!("reading {len} bytes at filesystem offset {at}"))?;
        Ok(buf)
    }

    fn inode(&self, ino: u32) -> Result<Vec<u8>> {
        ensure!(ino >= 1, "inode number 0");
        let group = u64::from((ino - 1) / self.sb.inodes_per_group);
        let index = u64::from((ino - 1) % self.sb.inodes_per_group);
        let desc_at =
            (self.sb.first_data_block + 1) * self.sb.block_size + group * self.sb.desc_size;
        let d = self
            .read(desc_at, self.sb.desc_size)
            .with_context(|| format!("reading the descriptor of group {group}"))?;
        let mut table = u64::from(u32le(&d, 0x08));
        if self.sb.desc_size >= 64 {
            table |= u64::from(u32le(&d, 0x28)) << 32;
        }
        self.read(
            table * self.sb.block_size + index * self.sb.inode_size,
            self.sb.inode_size.min(256),
        )
        .with_context(|| format!("reading inode {ino}"))
    }

    /// Size and extents of an inode's data.
    fn map_inode(&self, inode: &[u8]) -> Result<FileMap> {
        let flags = u32le(inode, 0x20);
        ensure!(flags & INLINE_DATA_FL == 0, "inline data is not supported");
        ensure!(
            flags & EXTENTS_FL != 0,
            "block-mapped (non-extent) files are not supported"
        );
        let size = u64::from(u32le(inode, 0x04)) | u64::from(u32le(inode, 0x6C)) << 32;
        let mut extents = Vec::new();
        self.walk_node(&inode[0x28..0x28 + 60], MAX_DEPTH, &mut extents)?;
        extents.sort_by_key(|e: &FileExtent| e.logical);
        Ok(FileMap { size, extents })
    }

    fn walk_node(&self, node: &[u8], budget: u16, out: &mut Vec<FileExtent>) -> Result<()> {
        ensure!(
            node.len() >= 12 && u16le(node, 0) == EXTENT_MAGIC,
            "bad extent header"
        );
        let entries = usize::from(u16le(node, 2));
        let depth = u16le(node, 6);
        ensure!(
            depth < budget && 12 + entries * 12 <= node.len(),
            "corrupt extent tree (depth {depth}, {entries} entries)"
        );
        for i in 0..entries {
            let e = &node[12 + i * 12..24 + i * 12];
            if depth == 0 {
                let raw_len = u16le(e, 4);
                let (len, unwritten) = if raw_len > UNWRITTEN_LEN {
                    (raw_len - UNWRITTEN_LEN, true)
                } else {
                    (raw_len, false)
                };
                let start = u64::from(u16le(e, 6)) << 32 | u64::from(u32le(e, 8));
                let bs = self.sb.block_size;
                let physical = start * bs;
                let len = u64::from(len) * bs;
                ensure!(
                    physical
                        .checked_add(len)
                        .is_some_and(|end| end <= self.size),
                    "extent at block {start} is past the end of the filesystem"
                );
                out.push(FileExtent {
                    logical: u64::from(u32le(e, 0)) * bs,
                    physical: physical + self.offset,
                    len,
                    unwritten,
                });
            } else {
                let leaf = u64::from(u16le(e, 8)) << 32 | u64::from(u32le(e, 4));
                let child = self.read(leaf * self.sb.block_size, self.sb.block_size)?;
                self.walk_node(&child, depth, out)?;
            }
        }
        Ok(())
    }

    /// The inode number of `name` in the directory `dir`, if present.
    fn dir_lookup(&self, dir: &[u8], name: &str) -> Result<Option<u32>> {
        ensure!(
            self.sb.incompat & INCOMPAT_FILETYPE != 0,
            "directories without the filetype feature are not supported"
        );
        let map = self.map_inode(dir)?;
        for e in map.extents.iter().filter(|e| !e.unwritten) {
            let data = self.read(
                e.physical - self.offset,
                e.len.min(map.size - e.logical.min(map.size)),
            )?;
            for block in data.chunks(self.sb.block_size as usize) {
                let mut at = 0;
                while at + 8 <= block.len() {
                    let ino = u32le(block, at);
                    let rec_len = usize::from(u16le(block, at + 4));
                    let name_len = usize::from(block[at + 6]);
                    if rec_len < 8 || at + rec_len > block.len() {
                        break; // corrupt entry: ignore the rest of this block
                    }
                    if ino != 0
                        && name_len <= rec_len - 8
                        && &block[at + 8..at + 8 + name_len] == name.as_bytes()
                    {
                        return Ok(Some(ino));
                    }
                    at += rec_len;
                }
            }
        }
        Ok(None)
    }

    /// The map of the regular file at `path` (relative to the root, no `..`).
    pub(super) fn file_map(&self, path: &str) -> Result<FileMap> {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        ensure!(
            !parts.is_empty() && parts.len() <= MAX_COMPONENTS,
            "bad path {path:?}"
        );
        let mut inode = self.inode(ROOT_INO)?;
        for (i, part) in parts.iter().enumerate() {
            ensure!(*part != "." && *part != "..", "bad path {path:?}");
            if u16le(&inode, 0) & S_IFMT != S_IFDIR {
                bail!("/{} is not a directory", parts[..i].join("/"));
            }
            let ino = self
                .dir_lookup(&inode, part)?
                .with_context(|| format!("/{path} not found"))?;
            inode = self.inode(ino)?;
        }
        ensure!(
            u16le(&inode, 0) & S_IFMT == S_IFREG,
            "/{path} is not a regular file"
        );
        self.map_inode(&inode)
            .with_context(|| format!("mapping the blocks of /{path}"))
    }
}
