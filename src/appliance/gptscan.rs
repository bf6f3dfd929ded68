//! Find the root partition by its GPT unique GUID, reading partition tables ourselves.
//!
//! Mainline kernels publish no `PARTUUID=` in `/sys/class/block/*/uevent`, and the
//! appliance has no udev/blkid, so the init reads the GPT of every whole disk it sees
//! (with the same reader `inspect` uses, `crate::disk::gpt`).

use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result};

pub use crate::disk::gpt::Guid;
use crate::disk::gpt::{read_gpt, DEFAULT_SECTOR_SIZE};

/// The kernel's name for partition `number` of `disk`: a `p` separates the number when
/// the disk name itself ends in a digit (`nvme0n1p2`, `mmcblk0p2`, but `vda2`, `sda2`).
pub fn partition_device_name(disk: &str, number: u32) -> String {
    if disk.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{disk}p{number}")
    } else {
        format!("{disk}{number}")
    }
}

/// What one scan of the block devices found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scan {
    /// The partition exists in a GPT and its device is present (`vda2`).
    Found { disk: String, partition: String },
    /// Not (yet) found; `seen` describes every whole disk looked at, for the error message.
    NotFound { seen: Vec<String> },
}

/// Look through the whole disks listed in `sys_block` (normally `/sys/class/block`) for a
/// GPT partition whose unique GUID is `guid`, reading each disk from `dev_dir/<name>`.
///
/// A disk whose table names the partition counts as found only once both the partition's
/// sysfs entry and its device node exist, so a caller can simply poll this.
pub fn scan_block_devices(sys_block: &Path, dev_dir: &Path, guid: &Guid) -> Result<Scan> {
    let mut names: Vec<String> = std::fs::read_dir(sys_block)
        .with_context(|| format!("listing {}", sys_block.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut seen = Vec::new();
    for disk in names {
        let sys = sys_block.join(&disk);
        // Partitions have a `partition` attribute; we only read tables of whole disks.
        if sys.join("partition").exists() {
            continue;
        }
        let sector_size = std::fs::read_to_string(sys.join("queue/logical_block_size"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(DEFAULT_SECTOR_SIZE);
        let parts = match File::open(dev_dir.join(&disk))
            .map_err(anyhow::Error::from)
            .and_then(|mut f| read_gpt(&mut f, sector_size))
        {
            Ok(table) => table.partitions,
            Err(e) => {
                seen.push(format!("{disk}: {e:#}"));
                continue;
            }
        };
        match parts.iter().find(|p| p.unique_guid == *guid) {
            Some(p) => {
                let partition = partition_device_name(&disk, p.number);
                if sys_block.join(&partition).exists() && dev_dir.join(&partition).exists() {
                    return Ok(Scan::Found { disk, partition });
                }
                seen.push(format!(
                    "{disk}: has it as {partition}, device not there yet"
                ));
            }
            None => seen.push(format!("{disk}: GPT with {} partitions", parts.len())),
        }
    }
    Ok(Scan::NotFound { seen })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::gpt::tests::make_image;
    use tempfile::TempDir;

    #[test]
    fn partition_names_follow_the_kernel() {
        assert_eq!(partition_device_name("vda", 2), "vda2");
        assert_eq!(partition_device_name("sda", 2), "sda2");
        assert_eq!(partition_device_name("xvda", 1), "xvda1");
        assert_eq!(partition_device_name("nvme0n1", 2), "nvme0n1p2");
        assert_eq!(partition_device_name("mmcblk0", 2), "mmcblk0p2");
        assert_eq!(partition_device_name("sdaa", 12), "sdaa12");
    }

    #[test]
    fn scan_finds_partition_in_fake_sysfs() {
        let dir = TempDir::new().unwrap();
        let guid = "6E0B9E2A-5A47-4C1B-9E0D-3F2B1C4D5E6F";
        let image = make_image(&dir, guid);
        let sys = dir.path().join("sys");
        let dev = dir.path().join("dev");
        std::fs::create_dir_all(sys.join("ram0")).unwrap();
        std::fs::create_dir_all(sys.join("nvme0n1/queue")).unwrap();
        std::fs::write(sys.join("nvme0n1/queue/logical_block_size"), "512\n").unwrap();
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("ram0"), vec![0u8; 4096]).unwrap();
        std::fs::copy(&image, dev.join("nvme0n1")).unwrap();
        let want: Guid = guid.parse().unwrap();

        // The table names it, but the partition device has not appeared yet.
        match scan_block_devices(&sys, &dev, &want).unwrap() {
            Scan::NotFound { seen } => {
                assert!(seen.iter().any(|s| s.contains("nvme0n1p2")), "{seen:?}");
                assert!(seen.iter().any(|s| s.starts_with("ram0:")), "{seen:?}");
            }
            other => panic!("found too early: {other:?}"),
        }

        std::fs::create_dir_all(sys.join("nvme0n1p2")).unwrap();
        std::fs::write(sys.join("nvme0n1p2/partition"), "2\n").unwrap();
        std::fs::write(dev.join("nvme0n1p2"), b"").unwrap();
        assert_eq!(
            scan_block_devices(&sys, &dev, &want).unwrap(),
            Scan::Found {
                disk: "nvme0n1".into(),
                partition: "nvme0n1p2".into()
            }
        );

        let other: Guid = "00000000-0000-0000-0000-000000000001".parse().unwrap();
        assert!(matches!(
            scan_block_devices(&sys, &dev, &other).unwrap(),
            Scan::NotFound { .. }
        ));
    }
}
