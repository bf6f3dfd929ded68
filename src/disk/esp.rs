//! FAT32 EFI System Partition writer (and reader helpers for `inspect`).
//!
//! Written from the Microsoft FAT specification (fatgen103) rather than with `fatfs`,
//! whose 0.3.6 release writes `.`/`..` entries that `fsck.vfat` rejects (`fatfs` still
//! reads volumes, see [`FatImage`]). The writer plans the whole volume up front: every
//! directory and file gets one contiguous run of clusters, directories first, all in
//! sorted path order, so the bytes depend only on the inputs. Only regions holding data
//! are written, so the image stays sparse.

mod dirent;
mod geometry;
mod names;
mod plan;
mod reader;
mod writer;

use std::fs::File;

use anyhow::{ensure, Context, Result};

use crate::tree::FileTree;
use dirent::FatTime;
use geometry::{Geometry, SECTOR};
use plan::Plan;
pub use reader::{FatImage, Slice};
use writer::Writer;

/// Largest single write; file content is streamed in chunks of this size.
const CHUNK: usize = 1024 * 1024;
/// Partition sizes are multiples of this.
const SIZE_ALIGN: u64 = 1024 * 1024;
const MAX_LABEL: usize = 11;

/// Volume parameters of the ESP.
#[derive(Clone, Debug)]
pub struct FatParams {
    /// Volume serial number (derive it from a hash of the inputs).
    pub volume_id: u32,
    /// Volume label, at most 11 characters; stored upper-cased, empty for none.
    pub label: String,
    /// Unix seconds used for every directory entry (as UTC, clamped to 1980..2107).
    pub timestamp: i64,
}

/// Smallest FAT32 partition size in bytes (a multiple of 1 MiB) that holds `tree` with
/// `free_bytes` to spare.
pub fn min_size(tree: &FileTree, free_bytes: u64) -> u64 {
    min_size_of(&Plan::new(tree), free_bytes)
}

fn min_size_of(plan: &Plan, free_bytes: u64) -> u64 {
    let round = |n: u64| n.div_ceil(SIZE_ALIGN) * SIZE_ALIGN;
    let payload: u64 = plan.files.iter().map(|f| f.1.len()).sum();
    let mut size = Geometry::min_volume_bytes().max(round(payload + free_bytes));
    loop {
        let Ok(geo) = Geometry::new(size) else {
            // Only sizes beyond FAT32's reach fail here; `write` will say so.
            return size;
        };
        let cb = geo.cluster_bytes();
        // The label is not known here: count its root entry, which costs one slot at most.
        let need = plan.clusters_needed(cb, true) + free_bytes.div_ceil(cb);
        let have = u64::from(geo.clusters);
        if need <= have {
            return size;
        }
        // Each missing cluster costs at least a cluster's worth of partition.
        size = round(size + (need - have) * cb).max(size + SIZE_ALIGN);
    }
}

/// Format `[offset, offset + size)` of `out` as FAT32 and write `tree` into it.
///
/// The caller has already sized the file, and the range must read as zeros (a fresh
/// `set_len`): only the boot sectors, FSInfo, the used part of both FATs, directories
/// and file data are written, so the image stays sparse.
pub fn write(
    out: &File,
    offset: u64,
    size: u64,
    tree: &FileTree,
    params: &FatParams,
) -> Result<()> {
    ensure!(
        offset.is_multiple_of(SECTOR),
        "ESP offset {offset} is not a multiple of {SECTOR} bytes"
    );
    let file_len = out.metadata().context("reading the image size")?.len();
    ensure!(
        offset.saturating_add(size) <= file_len,
        "ESP [{offset}, {}) extends past the end of the {file_len}-byte image",
        offset.saturating_add(size)
    );
    let label = label_bytes(&params.label)?;
    let geo = Geometry::new(size).context("choosing the ESP geometry")?;
    let plan = Plan::new(tree);
    let alloc = plan
        .allocate(&geo, label.is_some())
        .context("laying out the ESP")?;
    let time = FatTime::from_unix(params.timestamp);
    let w = Writer { out, offset, geo };

    // Encode every directory before writing anything, so bad names fail early.
    let dirs = (0..plan.dirs.len())
        .map(|i| {
            plan.encode_dir(i, &alloc, label.as_ref(), time, geo.cluster_bytes())
                .with_context(|| format!("encoding ESP directory /{}", plan.dirs[i].path))
        })
        .collect::<Result<Vec<_>>>()?;
    w.write_fats(&alloc).context("writing the ESP's FATs")?;
    for (i, data) in dirs.iter().enumerate() {
        w.write_at(data, geo.cluster_offset(alloc.dirs[i].first))
            .with_context(|| format!("writing ESP directory /{}", plan.dirs[i].path))?;
    }
    let mut buf = vec![0u8; CHUNK];
    for ((path, content), run) in plan.files.iter().zip(&alloc.files) {
        if run.count > 0 {
            w.write_file(content, geo.cluster_offset(run.first), &mut buf)
                .with_context(|| format!("writing {path} into the ESP"))?;
        }
    }
    // The boot sectors last: until they exist the range is no filesystem at all.
    w.write_reserved(&alloc, params.volume_id, label.as_ref())
        .context("writing the ESP boot sectors")?;
    Ok(())
}

/// The label as the 11 space-padded bytes FAT stores, None for no label.
fn label_bytes(label: &str) -> Result<Option<[u8; MAX_LABEL]>> {
    let upper = label.to_ascii_uppercase();
    let upper = upper.trim_end();
    if upper.is_empty() {
        return Ok(None);
    }
    ensure!(
        upper.len() <= MAX_LABEL,
        "FAT label {label:?} is longer than {MAX_LABEL} characters"
    );
    // A label uses the short-name alphabet, plus spaces.
    ensure!(
        upper
            .chars()
            .all(|c| c == ' ' || names::as_short_name(c.encode_utf8(&mut [0; 4])).is_some()),
        "FAT label {label:?} may only hold A-Z, 0-9, spaces and $%'-_@~`!(){{}}^#&"
    );
    let mut out = [b' '; MAX_LABEL];
    out[..upper.len()].copy_from_slice(upper.as_bytes());
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(label_bytes("efi").unwrap(), Some(*b"EFI        "));
        assert_eq!(label_bytes("").unwrap(), None);
        assert_eq!(label_bytes("MY DISK").unwrap(), Some(*b"MY DISK    "));
        assert!(label_bytes("TWELVE_CHARS").is_err());
        assert!(label_bytes("A.B").is_err());
        assert!(label_bytes("é").is_err());
    }
}
