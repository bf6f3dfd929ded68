//! Byte encodings of the ext4 on-disk structures we write (all little-endian).
//! Offsets follow the kernel's Documentation/filesystems/ext4.

use super::geometry::Geometry;
use super::plan::{Body, DirEntry, Extent, Node};
use super::{Ext4Params, BLOCKS_PER_GROUP, BLOCK_SIZE, DESC_SIZE, FIRST_INO, INODE_SIZE};

const SUPER_MAGIC: u16 = 0xEF53;
const EXTENT_MAGIC: u16 = 0xF30A;
const EXTENT_HEADER: usize = 12;
const EXTENT_ENTRY: usize = 12;
/// Extent entries that fit in `i_block` after the header.
pub(super) const INODE_EXTENTS: usize = 4;
/// Extent entries that fit in one leaf block after the header.
pub(super) const LEAF_EXTENTS: usize = (BLOCK_SIZE as usize - EXTENT_HEADER) / EXTENT_ENTRY;

const COMPAT_EXT_ATTR: u32 = 0x8;
const COMPAT_DIR_INDEX: u32 = 0x20;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_EXTENTS: u32 = 0x40;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_LARGE_FILE: u32 = 0x2;
const RO_COMPAT_HUGE_FILE: u32 = 0x8;
const RO_COMPAT_DIR_NLINK: u32 = 0x20;
const RO_COMPAT_EXTRA_ISIZE: u32 = 0x40;

const STATE_CLEAN: u16 = 1;
const ERRORS_CONTINUE: u16 = 1;
const REV_DYNAMIC: u32 = 1;
const HASH_HALF_MD4: u8 = 1;
/// `user_xattr,acl`, what mke2fs sets by default.
const DEFM_XATTR_USER_ACL: u32 = 0x4 | 0x8;
/// Directory hashes use signed chars, as on x86 (what mke2fs records there).
const FLAGS_SIGNED_HASH: u32 = 0x1;
/// i_extra_isize: room for the *_extra timestamps, crtime and i_version_hi.
pub(super) const EXTRA_ISIZE: u16 = 32;

pub(super) const INODE_FLAG_EXTENTS: u32 = 0x80000;

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Counts that only the finished allocation knows.
pub(super) struct Totals {
    pub free_blocks: u64,
    pub free_inodes: u64,
}

/// The 1024-byte superblock; `group` is the group whose copy this is.
pub(super) fn superblock(
    geo: &Geometry,
    totals: &Totals,
    params: &Ext4Params,
    group: u64,
) -> Vec<u8> {
    let ts = params.timestamp;
    let mut b = vec![0u8; 1024];
    put32(&mut b, 0x0, geo.total_inodes() as u32);
    put32(&mut b, 0x4, geo.blocks_count as u32);
    put32(&mut b, 0x8, 0); // no reserved blocks: the appliance runs as root anyway
    put32(&mut b, 0xC, totals.free_blocks as u32);
    put32(&mut b, 0x10, totals.free_inodes as u32);
    put32(&mut b, 0x14, 0); // first data block (0 with 4 KiB blocks)
    put32(&mut b, 0x18, 2); // log2(block size) - 10
    put32(&mut b, 0x1C, 2); // cluster size = block size
    put32(&mut b, 0x20, BLOCKS_PER_GROUP as u32);
    put32(&mut b, 0x24, BLOCKS_PER_GROUP as u32);
    put32(&mut b, 0x28, geo.inodes_per_group as u32);
    put32(&mut b, 0x2C, 0); // last mount time: never mounted
    put32(&mut b, 0x30, ts); // last write time
    put16(&mut b, 0x34, 0); // mount count
    put16(&mut b, 0x36, 0xFFFF); // max mount count: no forced checks
    put16(&mut b, 0x38, SUPER_MAGIC);
    put16(&mut b, 0x3A, STATE_CLEAN);
    put16(&mut b, 0x3C, ERRORS_CONTINUE);
    put32(&mut b, 0x40, ts); // last check
    put32(&mut b, 0x48, 0); // creator OS: Linux
    put32(&mut b, 0x4C, REV_DYNAMIC);
    put32(&mut b, 0x54, FIRST_INO as u32);
    put16(&mut b, 0x58, INODE_SIZE as u16);
    put16(&mut b, 0x5A, group as u16);
    put32(&mut b, 0x5C, COMPAT_EXT_ATTR | COMPAT_DIR_INDEX);
    put32(&mut b, 0x60, INCOMPAT_FILETYPE | INCOMPAT_EXTENTS);
    put32(
        &mut b,
        0x64,
        RO_COMPAT_SPARSE_SUPER
            | RO_COMPAT_LARGE_FILE
            | RO_COMPAT_HUGE_FILE
            | RO_COMPAT_DIR_NLINK
            | RO_COMPAT_EXTRA_ISIZE,
    );
    b[0x68..0x78].copy_from_slice(&params.uuid);
    let label = params.label.as_bytes();
    b[0x78..0x78 + label.len()].copy_from_slice(label);
    b[0xEC..0xFC].copy_from_slice(&params.hash_seed);
    b[0xFC] = HASH_HALF_MD4;
    put32(&mut b, 0x100, DEFM_XATTR_USER_ACL);
    put32(&mut b, 0x108, ts); // mkfs time
    put16(&mut b, 0x15C, EXTRA_ISIZE); // s_min_extra_isize
    put16(&mut b, 0x15E, EXTRA_ISIZE); // s_want_extra_isize
    put32(&mut b, 0x160, FLAGS_SIGNED_HASH);
    b
}

/// One 32-byte group descriptor (no `64bit`, no checksums).
pub(super) fn group_desc(
    geo: &Geometry,
    g: u64,
    free_blocks: u64,
    free_inodes: u64,
    dirs: u64,
) -> [u8; DESC_SIZE as usize] {
    let mut b = [0u8; DESC_SIZE as usize];
    put32(&mut b, 0x0, geo.block_bitmap(g) as u32);
    put32(&mut b, 0x4, geo.inode_bitmap(g) as u32);
    put32(&mut b, 0x8, geo.inode_table(g) as u32);
    put16(&mut b, 0xC, free_blocks as u16);
    put16(&mut b, 0xE, free_inodes as u16);
    put16(&mut b, 0x10, dirs as u16);
    b
}

/// A bitmap block with bits `0..used` set, and bits `len..` set as padding (bits past the
/// end of the group, or past the last inode of the group, must read as in use).
pub(super) fn bitmap(used: u64, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE as usize];
    let set = |b: &mut [u8], from: u64, to: u64| {
        for bit in from..to {
            b[(bit / 8) as usize] |= 1 << (bit % 8);
        }
    };
    set(&mut b, 0, used);
    set(&mut b, len, BLOCK_SIZE * 8);
    b
}

/// Split a timestamp into the 32-bit field and its `_extra` field: times from 2038 on
/// wrap the signed 32-bit field and carry epoch bit 0 in `_extra` (nanoseconds are 0).
fn time_fields(ts: u32) -> (u32, u32) {
    (ts, u32::from(ts > i32::MAX as u32))
}

/// The 256-byte inode for `node`.
pub(super) fn inode(node: &Node<'_>, ts: u32) -> [u8; INODE_SIZE as usize] {
    let mut b = [0u8; INODE_SIZE as usize];
    let (t, t_extra) = time_fields(ts);
    put16(&mut b, 0x0, node.mode);
    // uid and gid (all halves) stay 0: everything belongs to root.
    put32(&mut b, 0x4, node.size as u32);
    put32(&mut b, 0x8, t); // atime
    put32(&mut b, 0xC, t); // ctime
    put32(&mut b, 0x10, t); // mtime
    put16(&mut b, 0x1A, node.links);
    let sectors = node.allocated_blocks() * (BLOCK_SIZE / 512);
    put32(&mut b, 0x1C, sectors as u32);
    put16(&mut b, 0x74, (sectors >> 32) as u16);
    put32(&mut b, 0x6C, (node.size >> 32) as u32);
    let i_block = &mut b[0x28..0x28 + 60];
    match &node.body {
        Body::FastSymlink(target) => i_block[..target.len()].copy_from_slice(target.as_bytes()),
        _ => {
            put32(&mut b, 0x20, INODE_FLAG_EXTENTS);
            extent_root(&node.extents, &node.leaves, &mut b[0x28..0x28 + 60]);
        }
    }
    put16(&mut b, 0x80, EXTRA_ISIZE);
    put32(&mut b, 0x84, t_extra); // ctime_extra
    put32(&mut b, 0x88, t_extra); // mtime_extra
    put32(&mut b, 0x8C, t_extra); // atime_extra
    put32(&mut b, 0x90, t); // crtime
    put32(&mut b, 0x94, t_extra);
    b
}

/// Inode 1 (bad blocks, empty) carries the timestamps too, as mke2fs writes it.
pub(super) fn bad_blocks_inode(ts: u32) -> [u8; INODE_SIZE as usize] {
    let mut b = [0u8; INODE_SIZE as usize];
    for off in [0x8, 0xC, 0x10] {
        put32(&mut b, off, ts);
    }
    b
}

fn extent_header(b: &mut [u8], entries: usize, max: usize, depth: u16) {
    put16(b, 0, EXTENT_MAGIC);
    put16(b, 2, entries as u16);
    put16(b, 4, max as u16);
    put16(b, 6, depth);
}

fn extent_entry(b: &mut [u8], e: &Extent) {
    put32(b, 0, e.logical);
    put16(b, 4, e.len as u16);
    put16(b, 6, (e.start >> 32) as u16);
    put32(b, 8, e.start as u32);
}

/// The extent tree root in `i_block`: the extents themselves when they fit (depth 0),
/// else one index entry per leaf block (depth 1).
fn extent_root(extents: &[Extent], leaves: &[u64], i_block: &mut [u8]) {
    if leaves.is_empty() {
        extent_header(i_block, extents.len(), INODE_EXTENTS, 0);
        for (i, e) in extents.iter().enumerate() {
            let off = EXTENT_HEADER + i * EXTENT_ENTRY;
            extent_entry(&mut i_block[off..off + EXTENT_ENTRY], e);
        }
    } else {
        extent_header(i_block, leaves.len(), INODE_EXTENTS, 1);
        for (i, (leaf, chunk)) in leaves.iter().zip(extents.chunks(LEAF_EXTENTS)).enumerate() {
            let off = EXTENT_HEADER + i * EXTENT_ENTRY;
            let b = &mut i_block[off..off + EXTENT_ENTRY];
            put32(b, 0, chunk[0].logical);
            put32(b, 4, *leaf as u32);
            put16(b, 8, (*leaf >> 32) as u16);
        }
    }
}

/// A leaf block of the extent tree holding `extents` (at most `LEAF_EXTENTS`).
pub(super) fn extent_leaf(extents: &[Extent]) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE as usize];
    extent_header(&mut b, extents.len(), LEAF_EXTENTS, 0);
    for (i, e) in extents.iter().enumerate() {
        let off = EXTENT_HEADER + i * EXTENT_ENTRY;
        extent_entry(&mut b[off..off + EXTENT_ENTRY], e);
    }
    b
}

/// Bytes a directory entry with a name of `name_len` bytes takes (8-byte header, 4-aligned).
pub(super) fn dirent_len(name_len: usize) -> usize {
    (8 + name_len).next_multiple_of(4)
}

/// One linear directory block holding `entries`, the last stretched to the block end.
/// An empty slice gives an empty block (one unused entry spanning it).
pub(super) fn dir_block(entries: &[DirEntry<'_>]) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE as usize];
    let mut off = 0;
    for (i, e) in entries.iter().enumerate() {
        let rec_len = if i + 1 == entries.len() {
            BLOCK_SIZE as usize - off
        } else {
            dirent_len(e.name.len())
        };
        put32(&mut b[off..], 0, e.ino as u32);
        put16(&mut b[off..], 4, rec_len as u16);
        b[off + 6] = e.name.len() as u8;
        b[off + 7] = e.ftype;
        b[off + 8..off + 8 + e.name.len()].copy_from_slice(e.name.as_bytes());
        off += rec_len;
    }
    if entries.is_empty() {
        put16(&mut b, 4, BLOCK_SIZE as u16);
    }
    b
}
