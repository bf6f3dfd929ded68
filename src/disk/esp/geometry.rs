//! Volume geometry: how a partition of a given size divides into reserved sectors, two FATs
//! and data clusters (Microsoft FAT spec, fatgen103, FAT32 only).

use anyhow::{bail, Result};

pub(super) const SECTOR: u64 = 512;
pub(super) const RESERVED_SECTORS: u32 = 32;
pub(super) const NUM_FATS: u32 = 2;
/// Bytes per FAT32 entry.
pub(super) const FAT_ENTRY_BYTES: u64 = 4;
/// Clusters 0 and 1 have FAT entries but no data; data starts at cluster 2.
pub(super) const FIRST_CLUSTER: u32 = 2;
/// By definition a volume with fewer clusters is FAT12/16, whatever its BPB says...
const FAT32_MIN_CLUSTERS: u32 = 65_525;
/// ...and some implementations count slightly differently, so stay clear of the boundary.
const CLUSTER_MARGIN: u32 = 1024;
const MIN_CLUSTERS: u32 = FAT32_MIN_CLUSTERS + CLUSTER_MARGIN;
/// Cluster numbers from 0x0FFFFFF7 up mean bad/end-of-chain.
const MAX_CLUSTERS: u32 = 0x0FFF_FFF6 - FIRST_CLUSTER;
const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
/// fatgen103's FAT32 cluster sizes: (largest volume in bytes, sectors per cluster).
const CLUSTER_TABLE: &[(u64, u32)] = &[
    (260 * MIB, 1),
    (8 * GIB, 8),
    (16 * GIB, 16),
    (32 * GIB, 32),
    (u64::MAX, 64),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Geometry {
    pub total_sectors: u32,
    pub sectors_per_cluster: u32,
    /// Sectors of one FAT copy.
    pub fat_sectors: u32,
    /// Number of data clusters (numbered from 2).
    pub clusters: u32,
}

impl Geometry {
    /// The geometry of a FAT32 volume of `size` bytes (rounded down to whole sectors).
    pub fn new(size: u64) -> Result<Self> {
        let total = size / SECTOR;
        let Ok(total) = u32::try_from(total) else {
            bail!("{size} bytes is too large for a FAT32 volume of 512-byte sectors (max 2 TiB)");
        };
        let mut spc = CLUSTER_TABLE
            .iter()
            .find(|(max, _)| size <= *max)
            .map_or(64, |e| e.1);
        // Prefer the table's cluster size, but shrink it if that leaves too few clusters.
        loop {
            if let Some(g) = Self::with_cluster_sectors(total, spc) {
                if g.clusters >= MIN_CLUSTERS {
                    if g.clusters > MAX_CLUSTERS {
                        bail!("{size} bytes is too large for a FAT32 volume");
                    }
                    return Ok(g);
                }
            }
            if spc == 1 {
                bail!(
                    "{size} bytes is too small for a FAT32 volume (at least {} bytes are needed)",
                    Self::min_volume_bytes()
                );
            }
            spc /= 2;
        }
    }

    /// Smallest volume (in bytes, a multiple of 1 MiB) that can be FAT32 at all.
    pub fn min_volume_bytes() -> u64 {
        let clusters = u64::from(MIN_CLUSTERS);
        let entries_per_sector = SECTOR / FAT_ENTRY_BYTES;
        let fat = (clusters + u64::from(FIRST_CLUSTER)).div_ceil(entries_per_sector);
        let sectors = u64::from(RESERVED_SECTORS) + u64::from(NUM_FATS) * fat + clusters;
        (sectors * SECTOR).div_ceil(MIB) * MIB
    }

    fn with_cluster_sectors(total: u32, spc: u32) -> Option<Self> {
        let avail = u64::from(total.checked_sub(RESERVED_SECTORS)?);
        let spc64 = u64::from(spc);
        let per_sector = SECTOR / FAT_ENTRY_BYTES;
        let nfats = u64::from(NUM_FATS);
        let clusters_for = |fat: u64| avail.saturating_sub(nfats * fat) / spc64;
        let covers = |fat: u64| fat * per_sector >= clusters_for(fat) + u64::from(FIRST_CLUSTER);
        // Smallest FAT whose entries cover all clusters it leaves room for:
        // fat * (per_sector * spc + nfats) >= avail + 2 * spc is sufficient; one step
        // down may still suffice because the cluster count is rounded down.
        let mut fat =
            (avail + u64::from(FIRST_CLUSTER) * spc64).div_ceil(per_sector * spc64 + nfats);
        while fat > 1 && covers(fat - 1) {
            fat -= 1;
        }
        // With 32 reserved sectors the data region then starts on a cluster boundary
        // (relative to the 1 MiB aligned partition), which flash media like.
        // (32 reserved sectors are even, so a FAT size within `spc` steps always does it.)
        let reserved = u64::from(RESERVED_SECTORS);
        while !(reserved + nfats * fat).is_multiple_of(spc64) {
            fat += 1;
        }
        if nfats * fat >= avail {
            return None;
        }
        Some(Geometry {
            total_sectors: total,
            sectors_per_cluster: spc,
            fat_sectors: u32::try_from(fat).ok()?,
            clusters: u32::try_from(clusters_for(fat)).ok()?,
        })
    }

    pub fn cluster_bytes(&self) -> u64 {
        u64::from(self.sectors_per_cluster) * SECTOR
    }

    /// Byte offset (from the volume start) of FAT copy `copy`.
    pub fn fat_offset(&self, copy: u32) -> u64 {
        (u64::from(RESERVED_SECTORS) + u64::from(copy) * u64::from(self.fat_sectors)) * SECTOR
    }

    /// Byte offset (from the volume start) of data cluster `cluster` (>= 2).
    pub fn cluster_offset(&self, cluster: u32) -> u64 {
        self.fat_offset(NUM_FATS) + u64::from(cluster - FIRST_CLUSTER) * self.cluster_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_invariants(g: &Geometry) {
        let entries = u64::from(g.fat_sectors) * SECTOR / FAT_ENTRY_BYTES;
        assert!(entries >= u64::from(g.clusters) + 2, "{g:?}: FAT too small");
        let used = u64::from(RESERVED_SECTORS)
            + 2 * u64::from(g.fat_sectors)
            + u64::from(g.clusters) * u64::from(g.sectors_per_cluster);
        assert!(
            used <= u64::from(g.total_sectors),
            "{g:?}: overflows the volume"
        );
        assert!(
            u64::from(g.total_sectors) - used < u64::from(g.sectors_per_cluster),
            "{g:?}: a whole cluster is wasted"
        );
        assert!(g.clusters >= 65_525);
        // data region on a cluster boundary
        assert_eq!(g.fat_offset(2) % g.cluster_bytes(), 0, "{g:?}");
    }

    #[test]
    fn cluster_sizes_follow_the_spec_table() {
        let g = Geometry::new(64 * MIB).unwrap();
        assert_eq!(g.sectors_per_cluster, 1);
        check_invariants(&g);
        let g = Geometry::new(260 * MIB).unwrap();
        assert_eq!(g.sectors_per_cluster, 1);
        check_invariants(&g);
        let g = Geometry::new(261 * MIB).unwrap();
        assert_eq!(g.sectors_per_cluster, 8);
        check_invariants(&g);
        let g = Geometry::new(20 * GIB).unwrap();
        assert_eq!(g.sectors_per_cluster, 32);
        check_invariants(&g);
        let g = Geometry::new(100 * GIB).unwrap();
        assert_eq!(g.sectors_per_cluster, 64);
        check_invariants(&g);
    }

    #[test]
    fn fat_size_is_minimal_for_one_sector_clusters() {
        // 64 MiB = 131072 sectors, 131040 after the reserved ones. With 1008 FAT sectors
        // 129024 clusters remain but 1008 * 128 = 129024 entries < 129024 + 2; with 1009,
        // 129022 clusters need 129024 entries and get 129152.
        let g = Geometry::new(64 * MIB).unwrap();
        assert_eq!(g.fat_sectors, 1009);
        assert_eq!(g.clusters, 131_040 - 2 * 1009);
    }

    #[test]
    fn too_small_and_minimum() {
        assert!(Geometry::new(32 * MIB).is_err());
        let min = Geometry::min_volume_bytes();
        assert_eq!(min % MIB, 0);
        assert!(Geometry::new(min).is_ok());
        assert!(Geometry::new(min - MIB).is_err());
        // A volume just above the 260 MiB step that cannot hold enough 4 KiB clusters
        // still works with smaller ones.
        for mib in [33, 34, 35, 100, 259, 261, 262, 300, 1000, 8193] {
            if let Ok(g) = Geometry::new(mib * MIB) {
                check_invariants(&g);
            }
        }
    }
}
