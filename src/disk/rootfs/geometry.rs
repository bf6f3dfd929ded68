//! Where every group's metadata lives, and how many inodes the filesystem gets.
//!
//! Without `flex_bg` each block group holds, in order: a superblock and the group
//! descriptor table (only in groups 0, 1 and powers of 3, 5, 7: `sparse_super`), its block
//! bitmap, its inode bitmap and its inode table; the rest of the group is data.

use super::{BLOCKS_PER_GROUP, BLOCK_SIZE, DESC_SIZE, INODES_PER_BLOCK, INODES_PER_MIB};

/// Most inodes a group can have: its inode bitmap is one block.
const MAX_INODES_PER_GROUP: u64 = BLOCK_SIZE * 8;
/// Largest block count without the `64bit` feature, in whole groups.
const MAX_BLOCKS: u64 = (u32::MAX as u64 / BLOCKS_PER_GROUP) * BLOCKS_PER_GROUP;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Geometry {
    pub blocks_count: u64,
    pub groups: u64,
    pub inodes_per_group: u64,
    /// Inode table blocks per group.
    pub itable_blocks: u64,
    /// Group descriptor table blocks (in each group that has a superblock copy).
    pub gdt_blocks: u64,
}

/// Whether group `g` holds a superblock backup under `sparse_super`.
pub(super) fn has_super(g: u64) -> bool {
    fn power_of(mut n: u64, base: u64) -> bool {
        while n > 1 && n.is_multiple_of(base) {
            n /= base;
        }
        n == 1
    }
    g <= 1 || power_of(g, 3) || power_of(g, 5) || power_of(g, 7)
}

impl Geometry {
    /// Lay out a filesystem of `size` bytes whose tree uses `used_inodes` inodes (reserved
    /// ones included). Beyond those the filesystem gets 64 spare inodes per whole MiB (one per
    /// 16 KiB, mke2fs's default ratio); counting whole MiB keeps the inode count, and so the
    /// metadata, constant within each MiB, so a bigger partition never holds less.
    ///
    /// `Err(n)`: the size is too small for the metadata alone; at least `n` more blocks
    /// are needed.
    pub fn new(size: u64, used_inodes: u64) -> Result<Self, u64> {
        let mut blocks = (size / BLOCK_SIZE).min(MAX_BLOCKS);
        let wanted = used_inodes + (size >> 20) * INODES_PER_MIB;
        let mut groups = blocks.div_ceil(BLOCKS_PER_GROUP).max(1);
        loop {
            let per_group = wanted.div_ceil(groups).next_multiple_of(INODES_PER_BLOCK);
            if per_group > MAX_INODES_PER_GROUP {
                let groups_needed = wanted.div_ceil(MAX_INODES_PER_GROUP);
                return Err((groups_needed * BLOCKS_PER_GROUP)
                    .saturating_sub(blocks)
                    .max(1));
            }
            let geo = Geometry {
                blocks_count: blocks,
                groups,
                inodes_per_group: per_group,
                itable_blocks: per_group / INODES_PER_BLOCK,
                gdt_blocks: (groups * DESC_SIZE).div_ceil(BLOCK_SIZE),
            };
            let last = groups - 1;
            // The last group must hold its own metadata and at least one data block;
            // a shorter tail is left unused rather than made into a group (as mke2fs does).
            let need = geo.overhead(last) + 1;
            let have = blocks - last * BLOCKS_PER_GROUP;
            if have >= need {
                return Ok(geo);
            }
            if groups == 1 {
                return Err(need - have);
            }
            groups -= 1;
            blocks = groups * BLOCKS_PER_GROUP;
        }
    }

    pub fn total_inodes(&self) -> u64 {
        self.groups * self.inodes_per_group
    }

    pub fn group_start(&self, g: u64) -> u64 {
        g * BLOCKS_PER_GROUP
    }

    pub fn group_len(&self, g: u64) -> u64 {
        (self.blocks_count - self.group_start(g)).min(BLOCKS_PER_GROUP)
    }

    /// Blocks taken by the superblock copy and descriptor table at the start of group `g`.
    fn super_blocks(&self, g: u64) -> u64 {
        if has_super(g) {
            1 + self.gdt_blocks
        } else {
            0
        }
    }

    pub fn block_bitmap(&self, g: u64) -> u64 {
        self.group_start(g) + self.super_blocks(g)
    }

    pub fn inode_bitmap(&self, g: u64) -> u64 {
        self.block_bitmap(g) + 1
    }

    pub fn inode_table(&self, g: u64) -> u64 {
        self.block_bitmap(g) + 2
    }

    /// First data block of group `g`.
    pub fn data_start(&self, g: u64) -> u64 {
        self.inode_table(g) + self.itable_blocks
    }

    /// Metadata blocks at the start of group `g`.
    pub fn overhead(&self, g: u64) -> u64 {
        self.super_blocks(g) + 2 + self.itable_blocks
    }

    /// Blocks in use in group `g` when data has been allocated up to (not including)
    /// absolute block `alloc_end`; data is always allocated in block order, so the used
    /// blocks of a group are a prefix of it.
    pub fn used_blocks(&self, g: u64, alloc_end: u64) -> u64 {
        let used = alloc_end.saturating_sub(self.group_start(g));
        used.clamp(self.overhead(g), self.group_len(g))
    }

    /// Inodes in use in group `g` when inodes `1..=last_ino` are used.
    pub fn used_inodes(&self, g: u64, last_ino: u64) -> u64 {
        last_ino
            .saturating_sub(g * self.inodes_per_group)
            .min(self.inodes_per_group)
    }

    /// Free data blocks of the whole filesystem after allocating up to `alloc_end`.
    pub fn free_blocks(&self, alloc_end: u64) -> u64 {
        (0..self.groups)
            .map(|g| self.group_len(g) - self.used_blocks(g, alloc_end))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_super_groups() {
        let with: Vec<u64> = (0..60).filter(|&g| has_super(g)).collect();
        assert_eq!(with, [0, 1, 3, 5, 7, 9, 25, 27, 49]);
    }

    #[test]
    fn small_filesystem_is_one_group() {
        // 8 MiB: 2048 blocks, 20 used inodes + 8 * 64 spare = 532 -> 544 per group (34 blocks).
        let geo = Geometry::new(8 << 20, 20).unwrap();
        assert_eq!(geo.groups, 1);
        assert_eq!(geo.blocks_count, 2048);
        assert_eq!(geo.inodes_per_group, 544);
        assert_eq!(geo.itable_blocks, 34);
        assert_eq!(geo.data_start(0), 1 + 1 + 2 + 34);
        assert_eq!(geo.used_blocks(0, 0), 38);
        assert_eq!(geo.used_blocks(0, 100), 100);
        assert_eq!(geo.used_blocks(0, 5000), 2048);
    }

    #[test]
    fn short_last_group_is_dropped() {
        // Two full groups plus 3 blocks: too few for group 2's bitmaps and inode table.
        let geo = Geometry::new((2 * BLOCKS_PER_GROUP + 3) * BLOCK_SIZE, 11).unwrap();
        assert_eq!(geo.groups, 2);
        assert_eq!(geo.blocks_count, 2 * BLOCKS_PER_GROUP);
        // Group 2 has no superblock copy: bitmaps at its start.
        let geo = Geometry::new((3 * BLOCKS_PER_GROUP - 100) * BLOCK_SIZE, 11).unwrap();
        assert_eq!(geo.groups, 3);
        assert_eq!(geo.block_bitmap(2), 2 * BLOCKS_PER_GROUP);
        assert_eq!(geo.block_bitmap(1), BLOCKS_PER_GROUP + 1 + 1);
    }

    #[test]
    fn tiny_sizes_report_how_much_is_missing() {
        assert_eq!(
            Geometry::new(4 * BLOCK_SIZE, 11),
            Err(1 + 1 + 2 + 1 + 1 - 4)
        );
    }
}
