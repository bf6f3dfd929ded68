//! ext4 root filesystem writer: mkfs and populate in one pass, reproducible and sparse.
//!
//! There is no usable pure-Rust mkfs, so this writes the on-disk format directly
//! (kernel Documentation/filesystems/ext4). The filesystem is deliberately plain, the
//! feature set of `mke2fs -t ext4 -O ^has_journal,^metadata_csum,^resize_inode,^flex_bg,^64bit`:
//! 4 KiB blocks, 32768 blocks per group, 256-byte inodes; `filetype` + `extents`
//! (incompat), `sparse_super`, `large_file`, `huge_file`, `dir_nlink`, `extra_isize`
//! (ro_compat), `ext_attr` + `dir_index` (compat, so the kernel may index directories
//! it grows). Directories are linear (no htree), which every reader understands.
//!
//! Every inode is allocated contiguously in inode order, which is path order, so the
//! layout follows from the tree alone: same inputs, same bytes. Only blocks that carry
//! data or metadata are written; the rest of the range is left as it is (a hole).
//!
//! Adding a journal would take: inode 8 with a contiguous extent of N blocks (mke2fs
//! picks 4096 blocks for 128 MiB-1 GiB filesystems), a JBD2 v2 superblock (big-endian,
//! magic 0xC03B3998, block type 4, s_blocksize, s_maxlen = N, s_first = 1,
//! s_sequence = 1, s_start = 0 for "clean") in its first block, the rest left zero;
//! `has_journal` (compat 0x4), `s_journal_inum = 8`, and a copy of the inode's `i_block`
//! and size in `s_jnl_blocks` with `s_jnl_backup_type = 1`.

mod extents;
mod geometry;
mod image;
mod ondisk;
mod plan;
mod write;

use std::fs::File;

use anyhow::{anyhow, bail, Context, Result};

pub use extents::{FileExtent, FileMap};
use geometry::Geometry;
pub use image::Ext4Image;
use plan::Layout;

use crate::tree::FileTree;

const BLOCK_SIZE: u64 = 4096;
const BLOCKS_PER_GROUP: u64 = 32768;
const INODE_SIZE: u64 = 256;
const INODES_PER_BLOCK: u64 = BLOCK_SIZE / INODE_SIZE;
/// Group descriptor size without the `64bit` feature.
const DESC_SIZE: u64 = 32;
/// Spare inodes per MiB of partition (one per 16 KiB).
const INODES_PER_MIB: u64 = 64;
const ROOT_INO: u64 = 2;
/// Inodes 1-10 are reserved; 11 is the first ordinary one and is `lost+found`.
const FIRST_INO: u64 = 11;
const LOST_FOUND_INO: u64 = 11;
/// mke2fs gives lost+found 16 KiB so e2fsck can reconnect files without allocating.
const LOST_FOUND_BLOCKS: u64 = 4;
const MAX_LABEL: usize = 16;
const MIB: u64 = 1 << 20;
/// Most blocks the kernel reserves for itself (see [`kernel_reserve`]).
const KERNEL_RESERVE_MAX: u64 = 4096;

/// Everything about the filesystem that does not come from the tree.
#[derive(Clone, Debug)]
pub struct Ext4Params {
    pub uuid: [u8; 16],
    /// Seed of the directory index hash (`s_hash_seed`).
    pub hash_seed: [u8; 16],
    /// Every inode and superblock timestamp (seconds since the epoch).
    pub timestamp: u32,
    /// Volume label, at most 16 bytes.
    pub label: String,
}

/// Smallest partition size in bytes (a multiple of 4096) that holds `tree` with at least
/// `free_bytes` of free data blocks and `free_inodes` free inodes left over.
///
/// Free space is what the running kernel lets programs use: ext4 holds back
/// min(2 %, 4096 blocks) from everyone (`s_resv_clusters`), so when `free_bytes` is
/// non-zero that much comes on top. The filesystem gets 64 spare inodes per MiB of
/// partition, so many free inodes cost size (16 KiB per inode). If the tree cannot be
/// laid out at all (a bad name, say), this returns a rough estimate and [`write`] reports
/// the real error.
pub fn min_size(tree: &FileTree, free_bytes: u64, free_inodes: u32) -> u64 {
    let estimate = (tree.payload_bytes() + free_bytes).next_multiple_of(BLOCK_SIZE) + MIB;
    let Ok(mut layout) = Layout::new(tree) else {
        return estimate;
    };
    let want_free = free_bytes.div_ceil(BLOCK_SIZE);
    let last_ino = layout.last_ino();
    // Start from a lower bound and add each try's shortfall: a size between two tries
    // cannot fit, since one more block adds at most one free block.
    let mut blocks = layout.data_blocks() + want_free + 1;
    loop {
        let size = blocks * BLOCK_SIZE;
        if blocks > u64::from(u32::MAX) {
            return size;
        }
        let short = match Geometry::new(size, last_ino) {
            Err(more) => more,
            Ok(geo) => {
                let Ok(end) = layout.allocate(&geo) else {
                    return estimate;
                };
                let over = end.saturating_sub(geo.blocks_count);
                let want = match want_free {
                    0 => 0,
                    n => n + kernel_reserve(geo.blocks_count),
                };
                let short_blocks = over + want.saturating_sub(geo.free_blocks(end));
                let have_inodes = geo.total_inodes() - last_ino;
                let short_inodes = u64::from(free_inodes).saturating_sub(have_inodes);
                let inode_blocks = short_inodes.div_ceil(INODES_PER_MIB) * (MIB / BLOCK_SIZE);
                short_blocks.max(inode_blocks)
            }
        };
        if short == 0 {
            return size;
        }
        blocks += short;
    }
}

/// Blocks the kernel keeps back from all users of an extent-mapped filesystem
/// (fs/ext4/super.c, `ext4_calculate_resv_clusters`): 2 % of the blocks, at most 4096.
fn kernel_reserve(blocks_count: u64) -> u64 {
    (blocks_count / 50).min(KERNEL_RESERVE_MAX)
}

/// Format `[offset, offset+size)` of `out` as ext4 and write `tree` into it.
///
/// The caller has already sized the file. Only blocks holding data or metadata are
/// written, and when the range is still a hole (a fresh `set_len`) all-zero blocks are
/// skipped too, so the image stays sparse. File contents are streamed 1 MiB at a time.
pub fn write(
    out: &File,
    offset: u64,
    size: u64,
    tree: &FileTree,
    params: &Ext4Params,
) -> Result<()> {
    if params.label.len() > MAX_LABEL {
        bail!(
            "ext4 label {:?} is longer than {MAX_LABEL} bytes",
            params.label
        );
    }
    let file_len = out.metadata().context("reading image size")?.len();
    if offset.checked_add(size).is_none_or(|end| end > file_len) {
        bail!("ext4 range {offset}+{size} is past the end of the {file_len}-byte image");
    }
    let mut layout = Layout::new(tree).context("laying out the ext4 filesystem")?;
    let placed = match Geometry::new(size, layout.last_ino()) {
        Ok(geo) => {
            let end = layout.allocate(&geo).context("allocating ext4 blocks")?;
            (end <= geo.blocks_count).then_some((geo, end))
        }
        Err(_) => None,
    };
    let (geo, alloc_end) = placed.ok_or_else(|| {
        anyhow!(
            "tree needs {} bytes but partition has {size}",
            min_size(tree, 0, 0)
        )
    })?;

    let sink = write::Out::new(out, offset, size);
    write::contents(&sink, &layout)?;
    write::metadata(&sink, &geo, &layout, alloc_end, params).context("writing ext4 metadata")?;
    Ok(())
}
