//! Planning the volume: which directories and files exist, how many clusters each
//! takes, where each run starts, and the bytes of every directory.

use std::collections::{BTreeMap, HashSet};

use anyhow::{bail, Context, Result};

use super::dirent::{
    short_entry, FatTime, ATTR_ARCHIVE, ATTR_DIRECTORY, ATTR_VOLUME_ID, DIR_ENTRY_BYTES, DOT,
    DOTDOT,
};
use super::geometry::{Geometry, FIRST_CLUSTER, SECTOR};
use super::names::{self, ShortNames};
use crate::tree::{Content, Entry, FileTree, Kind};

/// A directory may hold at most this many entries (offsets into it are 16-bit).
const MAX_DIR_ENTRIES: u64 = 65_536;

/// One directory of the volume and its children in sorted order.
pub(super) struct DirPlan<'a> {
    pub path: &'a str,
    /// Index of the parent directory in `Plan::dirs`, None for the root.
    parent: Option<usize>,
    /// (name, full path, entry)
    children: Vec<(&'a str, &'a str, &'a Entry)>,
}

/// What goes into the volume, before clusters are assigned.
pub(super) struct Plan<'a> {
    /// The root first, then every directory in path order (parents before children).
    pub dirs: Vec<DirPlan<'a>>,
    /// Regular files in path order.
    pub files: Vec<(&'a str, &'a Content)>,
    dir_index: BTreeMap<&'a str, usize>,
    file_index: BTreeMap<&'a str, usize>,
}

/// A contiguous run of clusters; `first` is 0 for an empty file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Run {
    pub first: u32,
    pub count: u32,
}

pub(super) struct Allocation {
    /// Runs in cluster order: directories (as in `Plan::dirs`), then files.
    pub dirs: Vec<Run>,
    pub files: Vec<Run>,
    /// First cluster after everything allocated.
    pub next_free: u32,
}

impl Allocation {
    /// Every non-empty run in ascending cluster order (they tile `2..next_free`).
    pub fn runs(&self) -> impl Iterator<Item = Run> + '_ {
        self.dirs
            .iter()
            .chain(&self.files)
            .copied()
            .filter(|r| r.count > 0)
    }
}

impl<'a> Plan<'a> {
    pub fn new(tree: &'a FileTree) -> Self {
        let mut plan = Plan {
            dirs: vec![DirPlan {
                path: "",
                parent: None,
                children: tree.children(""),
            }],
            files: Vec::new(),
            dir_index: BTreeMap::from([("", 0)]),
            file_index: BTreeMap::new(),
        };
        for (path, entry) in tree.iter() {
            match &entry.kind {
                Kind::Dir => {
                    let parent = path.rsplit_once('/').map_or("", |p| p.0);
                    plan.dir_index.insert(path, plan.dirs.len());
                    plan.dirs.push(DirPlan {
                        path,
                        parent: plan.dir_index.get(parent).copied(),
                        children: tree.children(path),
                    });
                }
                Kind::File(c) => {
                    plan.file_index.insert(path, plan.files.len());
                    plan.files.push((path, c));
                }
                // Rejected when the directory holding it is encoded.
                Kind::Symlink(_) => {}
            }
        }
        plan
    }

    /// Directory entries (32-byte slots) directory `i` needs.
    fn dir_slots(&self, i: usize, label: bool) -> u64 {
        let dir = &self.dirs[i];
        let own = match dir.parent {
            None => u64::from(label),
            Some(_) => 2, // "." and ".."
        };
        own + dir
            .children
            .iter()
            .map(|c| names::slots(c.0) as u64)
            .sum::<u64>()
    }

    fn dir_clusters(&self, i: usize, label: bool, cluster_bytes: u64) -> u64 {
        (self.dir_slots(i, label) * DIR_ENTRY_BYTES as u64)
            .div_ceil(cluster_bytes)
            .max(1)
    }

    /// Clusters all directories and files take with clusters of `cluster_bytes`.
    pub fn clusters_needed(&self, cluster_bytes: u64, label: bool) -> u64 {
        let dirs: u64 = (0..self.dirs.len())
            .map(|i| self.dir_clusters(i, label, cluster_bytes))
            .sum();
        let files: u64 = self
            .files
            .iter()
            .map(|f| f.1.len().div_ceil(cluster_bytes))
            .sum();
        dirs + files
    }

    /// Give every directory, then every file, its run of clusters from cluster 2 on.
    pub fn allocate(&self, geo: &Geometry, label: bool) -> Result<Allocation> {
        let cb = geo.cluster_bytes();
        let need = self.clusters_needed(cb, label);
        if need > u64::from(geo.clusters) {
            bail!(
                "the files need {} bytes in {cb}-byte clusters, but a {}-byte FAT32 volume \
                 holds only {} (make the partition at least {} bytes)",
                need * cb,
                u64::from(geo.total_sectors) * SECTOR,
                u64::from(geo.clusters) * cb,
                super::min_size_of(self, 0)
            );
        }
        let mut next = FIRST_CLUSTER;
        // Counts fit in u32: their total was checked against the cluster count.
        let mut take = |count: u64| {
            let first = if count == 0 { 0 } else { next };
            next += count as u32;
            Run {
                first,
                count: count as u32,
            }
        };
        let dirs = (0..self.dirs.len())
            .map(|i| take(self.dir_clusters(i, label, cb)))
            .collect();
        let files = self
            .files
            .iter()
            .map(|f| take(f.1.len().div_ceil(cb)))
            .collect();
        Ok(Allocation {
            dirs,
            files,
            next_free: next,
        })
    }

    /// The bytes of directory `i`, padded with zeros to its whole clusters.
    pub fn encode_dir(
        &self,
        i: usize,
        alloc: &Allocation,
        label: Option<&[u8; 11]>,
        time: FatTime,
        cluster_bytes: u64,
    ) -> Result<Vec<u8>> {
        let dir = &self.dirs[i];
        let run = alloc.dirs[i];
        let mut out = Vec::with_capacity((u64::from(run.count) * cluster_bytes) as usize);
        match dir.parent {
            None => {
                if let Some(label) = label {
                    out.extend(short_entry(label, ATTR_VOLUME_ID, 0, 0, time));
                }
            }
            Some(parent) => {
                // ".." of a directory in the root points at cluster 0, not the root's cluster.
                let up = if parent == 0 {
                    0
                } else {
                    alloc.dirs[parent].first
                };
                out.extend(short_entry(&DOT, ATTR_DIRECTORY, run.first, 0, time));
                out.extend(short_entry(&DOTDOT, ATTR_DIRECTORY, up, 0, time));
            }
        }

        // FAT looks names up case-insensitively, so "A" and "a" cannot both exist.
        let mut seen = HashSet::new();
        for (name, _, _) in &dir.children {
            if !seen.insert(name.to_uppercase()) {
                bail!("{name:?} clashes with another name that differs only in case");
            }
        }
        // Names already in upper-case 8.3 form keep their short name; the others get
        // generated ones that avoid them.
        let mut shorts = ShortNames::default();
        for (name, _, _) in &dir.children {
            if let Some(s) = names::as_short_name(name) {
                shorts.reserve(s);
            }
        }
        for (name, path, entry) in &dir.children {
            let (attr, first, size) = match &entry.kind {
                Kind::Dir => (ATTR_DIRECTORY, alloc.dirs[self.dir_index[path]].first, 0),
                Kind::File(c) => {
                    let size = u32::try_from(c.len()).ok().with_context(|| {
                        format!("{path} is {} bytes, over FAT's 4 GiB limit", c.len())
                    })?;
                    (ATTR_ARCHIVE, alloc.files[self.file_index[path]].first, size)
                }
                Kind::Symlink(_) => bail!("{path} is a symlink, which FAT cannot store"),
            };
            match names::as_short_name(name) {
                Some(short) => out.extend(short_entry(&short, attr, first, size, time)),
                None => {
                    let units =
                        names::long_name_units(name).with_context(|| format!("storing {path}"))?;
                    let short = shorts.generate(name)?;
                    for e in names::lfn_entries(&units, &short) {
                        out.extend(e);
                    }
                    out.extend(short_entry(&short, attr, first, size, time));
                }
            }
        }

        let entries = (out.len() / DIR_ENTRY_BYTES) as u64;
        if entries > MAX_DIR_ENTRIES {
            bail!("{entries} directory entries (with long names) exceed FAT's {MAX_DIR_ENTRIES}");
        }
        let len = (u64::from(run.count) * cluster_bytes) as usize;
        // The planner counted the same slots; a mismatch would be a bug here, not bad input.
        anyhow::ensure!(
            out.len() <= len,
            "directory outgrew its {len} planned bytes"
        );
        out.resize(len, 0);
        Ok(out)
    }
}
