//! Writing a planned filesystem: contents in block order, then the metadata.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use anyhow::{bail, Context, Result};

use super::geometry::{has_super, Geometry};
use super::ondisk::{self, Totals, LEAF_EXTENTS};
use super::plan::{Body, Extent, Layout, Node};
use super::{Ext4Params, BLOCK_SIZE, INODE_SIZE};
use crate::tree::Content;

/// Largest buffer used to stream a file or fill zeros.
const CHUNK: usize = 1 << 20;
const CHUNK_BLOCKS: u64 = CHUNK as u64 / BLOCK_SIZE;
const ZERO_BLOCK: [u8; BLOCK_SIZE as usize] = [0; BLOCK_SIZE as usize];
/// The primary superblock sits 1024 bytes into the filesystem (after the boot sector area).
const SUPERBLOCK_OFFSET: u64 = 1024;

/// The destination range. When it is unwritten (a hole of a freshly sized file), it
/// already reads as zeros, so all-zero blocks are skipped and the image stays sparse;
/// otherwise every block that must read as zero is written.
pub(super) struct Out<'f> {
    file: &'f File,
    offset: u64,
    sparse: bool,
}

/// Whether `[offset, offset+size)` of `file` holds no data (only holes). A filesystem
/// without SEEK_DATA reports everything as data, which just turns the optimisation off.
fn range_is_hole(file: &File, offset: u64, size: u64) -> bool {
    let fd = file.as_raw_fd();
    let Ok(start) = libc::off_t::try_from(offset) else {
        return false;
    };
    // SAFETY: plain lseek on a descriptor we borrow; the position is restored below, and
    // this module only uses positioned I/O anyway.
    unsafe {
        let saved = libc::lseek(fd, 0, libc::SEEK_CUR);
        let data = libc::lseek(fd, start, libc::SEEK_DATA);
        let errno = std::io::Error::last_os_error().raw_os_error();
        if saved >= 0 {
            libc::lseek(fd, saved, libc::SEEK_SET);
        }
        if data < 0 {
            errno == Some(libc::ENXIO)
        } else {
            data as u64 >= offset + size
        }
    }
}

impl<'f> Out<'f> {
    pub fn new(file: &'f File, offset: u64, size: u64) -> Self {
        Out {
            file,
            offset,
            sparse: range_is_hole(file, offset, size),
        }
    }

    fn write_bytes(&self, at: u64, data: &[u8]) -> Result<()> {
        self.file
            .write_all_at(data, self.offset + at)
            .with_context(|| format!("writing {} bytes at filesystem byte {at}", data.len()))
    }

    /// Write whole blocks starting at `block`, skipping all-zero ones in sparse mode.
    fn write_blocks(&self, block: u64, data: &[u8]) -> Result<()> {
        debug_assert!(data.len().is_multiple_of(BLOCK_SIZE as usize));
        if !self.sparse {
            return self.write_bytes(block * BLOCK_SIZE, data);
        }
        let blocks: Vec<&[u8]> = data.chunks(BLOCK_SIZE as usize).collect();
        let mut i = 0;
        while i < blocks.len() {
            // Slice comparison is a memcmp, fast even in debug builds.
            if blocks[i] == ZERO_BLOCK {
                i += 1;
                continue;
            }
            let start = i;
            while i < blocks.len() && blocks[i] != ZERO_BLOCK {
                i += 1;
            }
            let bs = BLOCK_SIZE as usize;
            self.write_bytes(
                (block + start as u64) * BLOCK_SIZE,
                &data[start * bs..i * bs],
            )?;
        }
        Ok(())
    }

    /// Make `count` blocks at `block` read as zero (nothing to do in sparse mode).
    fn zero_blocks(&self, block: u64, count: u64) -> Result<()> {
        if self.sparse {
            return Ok(());
        }
        let zeros = vec![0u8; CHUNK];
        let mut done = 0;
        while done < count {
            let n = (count - done).min(CHUNK_BLOCKS);
            self.write_bytes(
                (block + done) * BLOCK_SIZE,
                &zeros[..(n * BLOCK_SIZE) as usize],
            )?;
            done += n;
        }
        Ok(())
    }
}

/// Fill `buf` from `r`; returns how many bytes were read (less only at end of input).
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Stream a regular file's content into its extents, 1 MiB at a time.
fn write_file(out: &Out<'_>, node: &Node<'_>, content: &Content, buf: &mut [u8]) -> Result<()> {
    let mut reader = content.open()?;
    let mut remaining = node.size;
    for e in &node.extents {
        let mut done = 0;
        while done < u64::from(e.len) {
            let blocks = (u64::from(e.len) - done).min(CHUNK_BLOCKS);
            let want = (blocks * BLOCK_SIZE).min(remaining) as usize;
            let got = read_full(&mut reader, &mut buf[..want])?;
            if got < want {
                bail!(
                    "source ended after {} of {} bytes (changed while writing?)",
                    node.size - remaining + got as u64,
                    node.size
                );
            }
            let padded = (blocks * BLOCK_SIZE) as usize;
            buf[want..padded].fill(0);
            out.write_blocks(e.start + done, &buf[..padded])?;
            remaining -= want as u64;
            done += blocks;
        }
    }
    if read_full(&mut reader, &mut buf[..1])? != 0 {
        bail!(
            "source is longer than its recorded {} bytes (changed while writing?)",
            node.size
        );
    }
    Ok(())
}

/// Write `blocks` (one buffer per logical block) through the extents.
fn write_mapped(
    out: &Out<'_>,
    extents: &[Extent],
    blocks: &mut dyn Iterator<Item = Vec<u8>>,
) -> Result<()> {
    let mut run = Vec::with_capacity(CHUNK);
    for e in extents {
        let mut done = 0;
        while done < u64::from(e.len) {
            let n = (u64::from(e.len) - done).min(CHUNK_BLOCKS);
            run.clear();
            for _ in 0..n {
                run.extend_from_slice(&blocks.next().context("fewer blocks than extents map")?);
            }
            out.write_blocks(e.start + done, &run)?;
            done += n;
        }
    }
    Ok(())
}

/// Write every inode's data blocks and extent leaves.
pub(super) fn contents(out: &Out<'_>, layout: &Layout<'_>) -> Result<()> {
    let mut buf = vec![0u8; CHUNK];
    for node in &layout.nodes {
        let what = || format!("writing /{}", node.path);
        match &node.body {
            Body::Dir { entries, blocks } => {
                let mut iter = (0..node.data_blocks).map(|i| {
                    let range = blocks.get(i as usize).cloned().unwrap_or(0..0);
                    ondisk::dir_block(&entries[range])
                });
                write_mapped(out, &node.extents, &mut iter).with_context(what)?;
            }
            Body::File(content) => {
                write_file(out, node, content, &mut buf).with_context(what)?;
            }
            Body::SlowSymlink(target) => {
                let mut block = vec![0u8; BLOCK_SIZE as usize];
                block[..target.len()].copy_from_slice(target.as_bytes());
                write_mapped(out, &node.extents, &mut std::iter::once(block)).with_context(what)?;
            }
            Body::FastSymlink(_) => {}
        }
        for (leaf, extents) in node.leaves.iter().zip(node.extents.chunks(LEAF_EXTENTS)) {
            out.write_blocks(*leaf, &ondisk::extent_leaf(extents))
                .with_context(what)?;
        }
    }
    Ok(())
}

/// Write inode tables, bitmaps, group descriptors and superblocks.
pub(super) fn metadata(
    out: &Out<'_>,
    geo: &Geometry,
    layout: &Layout<'_>,
    alloc_end: u64,
    params: &Ext4Params,
) -> Result<()> {
    let last_ino = layout.last_ino();
    let ipg = geo.inodes_per_group;
    let isize = INODE_SIZE as usize;
    let mut nodes = layout.nodes.iter().peekable();
    let mut gdt = vec![0u8; (geo.gdt_blocks * BLOCK_SIZE) as usize];
    for g in 0..geo.groups {
        let group_inodes = geo.used_inodes(g, last_ino);
        let mut dirs = 0;
        // Inode table: only the blocks holding used inodes carry anything.
        let table_blocks = (group_inodes * INODE_SIZE).div_ceil(BLOCK_SIZE);
        let mut table = vec![0u8; (table_blocks * BLOCK_SIZE) as usize];
        if g == 0 {
            table[..isize].copy_from_slice(&ondisk::bad_blocks_inode(params.timestamp));
        }
        while let Some(node) = nodes.next_if(|n| (n.ino - 1) / ipg == g) {
            let at = ((node.ino - 1) % ipg) as usize * isize;
            table[at..at + isize].copy_from_slice(&ondisk::inode(node, params.timestamp));
            dirs += u64::from(node.is_dir());
        }
        out.write_blocks(geo.inode_table(g), &table)
            .with_context(|| format!("writing inode table of group {g}"))?;
        out.zero_blocks(
            geo.inode_table(g) + table_blocks,
            geo.itable_blocks - table_blocks,
        )
        .with_context(|| format!("clearing inode table of group {g}"))?;

        let used_blocks = geo.used_blocks(g, alloc_end);
        out.write_blocks(
            geo.block_bitmap(g),
            &ondisk::bitmap(used_blocks, geo.group_len(g)),
        )
        .with_context(|| format!("writing block bitmap of group {g}"))?;
        out.write_blocks(geo.inode_bitmap(g), &ondisk::bitmap(group_inodes, ipg))
            .with_context(|| format!("writing inode bitmap of group {g}"))?;

        let desc = ondisk::group_desc(
            geo,
            g,
            geo.group_len(g) - used_blocks,
            ipg - group_inodes,
            dirs,
        );
        let at = g as usize * desc.len();
        gdt[at..at + desc.len()].copy_from_slice(&desc);
    }

    let totals = Totals {
        free_blocks: geo.free_blocks(alloc_end),
        free_inodes: geo.total_inodes() - last_ino,
    };
    for g in (0..geo.groups).filter(|&g| has_super(g)) {
        let start = geo.group_start(g);
        out.write_blocks(start + 1, &gdt)
            .with_context(|| format!("writing group descriptors in group {g}"))?;
        let sb = ondisk::superblock(geo, &totals, params, g);
        let at = if g == 0 {
            SUPERBLOCK_OFFSET
        } else {
            start * BLOCK_SIZE
        };
        out.write_bytes(at, &sb)
            .with_context(|| format!("writing superblock copy in group {g}"))?;
    }
    Ok(())
}
