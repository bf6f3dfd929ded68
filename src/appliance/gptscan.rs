//! Find the root partition by its GPT unique GUID, reading partition tables ourselves.
//!
//! Mainline kernels publish no `PARTUUID=` in `/sys/class/block/*/uevent`, and the
//! appliance has no udev/blkid, so the init reads the GPT of every whole disk it sees.
//! The parsing is pure (bytes in, partitions out) so it is tested against real tables
//! written by `sgdisk`.

use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};

/// "EFI PART", the GPT header signature.
const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";
/// The primary header lives in LBA 1.
const GPT_HEADER_LBA: u64 = 1;
/// Smallest header size the spec allows (the fields we read all lie below it).
const GPT_MIN_HEADER_SIZE: usize = 92;
/// Smallest partition entry size the spec allows.
const GPT_MIN_ENTRY_SIZE: usize = 128;
/// Refuse absurd entry arrays from a corrupt header (the spec's default is 128 × 128 B).
const GPT_MAX_ENTRY_ARRAY: usize = 1024 * 1024;
/// Sector size used when sysfs does not tell.
pub const DEFAULT_SECTOR_SIZE: u64 = 512;

/// A GUID as GPT stores it: the first three fields little-endian, the rest as bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    pub const ZERO: Guid = Guid([0; 16]);

    pub fn is_zero(&self) -> bool {
        *self == Self::ZERO
    }
}

impl FromStr for Guid {
    type Err = anyhow::Error;

    /// Parse the textual form `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX` (any case).
    fn from_str(s: &str) -> Result<Self> {
        let groups: Vec<&str> = s.split('-').collect();
        let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        ensure!(
            lens == [8, 4, 4, 4, 12],
            "{s:?} is not a GUID (expected XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX)"
        );
        let text: String = groups.concat();
        let mut big = [0u8; 16];
        hex::decode_to_slice(&text, &mut big).with_context(|| format!("{s:?} is not a GUID"))?;
        // Textual order is big-endian; GPT stores the first three fields little-endian.
        let mut disk = big;
        disk[0..4].reverse();
        disk[4..6].reverse();
        disk[6..8].reverse();
        Ok(Guid(disk))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-",
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9]
        )?;
        for x in &b[10..16] {
            write!(f, "{x:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}

/// The fields of a GPT header the init needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GptHeader {
    pub disk_guid: Guid,
    pub entries_lba: u64,
    pub num_entries: u32,
    pub entry_size: u32,
    pub entries_crc32: u32,
}

/// One used partition entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GptPartition {
    /// 1-based, as the kernel numbers partitions (`vda2` is entry 2).
    pub number: u32,
    pub type_guid: Guid,
    pub unique_guid: Guid,
    pub first_lba: u64,
    pub last_lba: u64,
    pub name: String,
}

fn le_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4-byte slice"))
}

fn le_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8-byte slice"))
}

fn guid_at(b: &[u8], off: usize) -> Guid {
    Guid(b[off..off + 16].try_into().expect("16-byte slice"))
}

/// Parse and CRC-check a GPT header from the bytes of its sector.
pub fn parse_header(sector: &[u8]) -> Result<GptHeader> {
    ensure!(
        sector.len() >= GPT_MIN_HEADER_SIZE,
        "GPT header sector is only {} bytes",
        sector.len()
    );
    if &sector[0..8] != GPT_SIGNATURE {
        bail!("no GPT signature");
    }
    let header_size = le_u32(sector, 12) as usize;
    ensure!(
        (GPT_MIN_HEADER_SIZE..=sector.len()).contains(&header_size),
        "GPT header size {header_size} out of range"
    );
    // The header CRC covers header_size bytes with the CRC field itself zeroed.
    let stored_crc = le_u32(sector, 16);
    let mut copy = sector[..header_size].to_vec();
    copy[16..20].fill(0);
    let crc = crc32fast::hash(&copy);
    ensure!(
        crc == stored_crc,
        "GPT header CRC mismatch (stored {stored_crc:#010x}, computed {crc:#010x})"
    );
    let header = GptHeader {
        disk_guid: guid_at(sector, 56),
        entries_lba: le_u64(sector, 72),
        num_entries: le_u32(sector, 80),
        entry_size: le_u32(sector, 84),
        entries_crc32: le_u32(sector, 88),
    };
    let entry_size = header.entry_size as usize;
    ensure!(
        entry_size >= GPT_MIN_ENTRY_SIZE && entry_size.is_multiple_of(8),
        "GPT entry size {entry_size} is invalid"
    );
    ensure!(
        header.entry_array_len() <= GPT_MAX_ENTRY_ARRAY,
        "GPT entry array of {} × {entry_size} bytes is implausibly large",
        header.num_entries
    );
    Ok(header)
}

impl GptHeader {
    /// Size in bytes of the partition entry array.
    pub fn entry_array_len(&self) -> usize {
        self.num_entries as usize * self.entry_size as usize
    }
}

/// Parse and CRC-check the partition entry array; unused (zero-type) entries are skipped.
pub fn parse_entries(header: &GptHeader, array: &[u8]) -> Result<Vec<GptPartition>> {
    let len = header.entry_array_len();
    ensure!(
        array.len() >= len,
        "GPT entry array truncated ({} of {len} bytes)",
        array.len()
    );
    let array = &array[..len];
    let crc = crc32fast::hash(array);
    ensure!(
        crc == header.entries_crc32,
        "GPT entry array CRC mismatch (stored {:#010x}, computed {crc:#010x})",
        header.entries_crc32
    );
    let mut parts = Vec::new();
    for (i, e) in array.chunks_exact(header.entry_size as usize).enumerate() {
        let type_guid = guid_at(e, 0);
        if type_guid.is_zero() {
            continue;
        }
        let name_units: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        parts.push(GptPartition {
            number: i as u32 + 1,
            type_guid,
            unique_guid: guid_at(e, 16),
            first_lba: le_u64(e, 32),
            last_lba: le_u64(e, 40),
            name: String::from_utf16_lossy(&name_units),
        });
    }
    Ok(parts)
}

/// Read the primary GPT of a disk (or disk image) with the given logical sector size.
pub fn read_gpt<R: Read + Seek>(disk: &mut R, sector_size: u64) -> Result<Vec<GptPartition>> {
    let mut sector = vec![0u8; sector_size as usize];
    disk.seek(SeekFrom::Start(GPT_HEADER_LBA * sector_size))
        .context("seeking to the GPT header")?;
    disk.read_exact(&mut sector)
        .context("reading the GPT header")?;
    let header = parse_header(&sector)?;
    let mut array = vec![0u8; header.entry_array_len()];
    disk.seek(SeekFrom::Start(header.entries_lba * sector_size))
        .context("seeking to the GPT entry array")?;
    disk.read_exact(&mut array)
        .context("reading the GPT entry array")?;
    parse_entries(&header, &array)
}

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
            Ok(parts) => parts,
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
    use std::process::Command;
    use tempfile::TempDir;

    const IMAGE_MIB: u64 = 16;
    const ROOT_TYPE: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
    const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";

    fn sgdisk(args: &[&str]) -> String {
        let out = Command::new("sgdisk")
            .args(args)
            .output()
            .expect("running sgdisk");
        assert!(
            out.status.success(),
            "sgdisk {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A 16 MiB image with an ESP and a root partition made by sgdisk.
    fn make_image(dir: &TempDir, root_guid: &str) -> std::path::PathBuf {
        let path = dir.path().join("disk.img");
        File::create(&path)
            .unwrap()
            .set_len(IMAGE_MIB * 1024 * 1024)
            .unwrap();
        let p = path.to_str().unwrap();
        sgdisk(&[
            "-n",
            "1:2048:+4M",
            "-t",
            "1:EF00",
            "-c",
            "1:EFI",
            "-n",
            "2:0:0",
            "-t",
            &format!("2:{ROOT_TYPE}"),
            "-c",
            "2:appliance-root",
            "-u",
            &format!("2:{root_guid}"),
            p,
        ]);
        path
    }

    /// A field of `sgdisk -i N` output, e.g. "Partition unique GUID".
    fn sgdisk_info(path: &Path, part: u32, field: &str) -> String {
        let out = sgdisk(&["-i", &part.to_string(), path.to_str().unwrap()]);
        let line = out
            .lines()
            .find(|l| l.starts_with(field))
            .unwrap_or_else(|| panic!("no {field:?} in sgdisk output:\n{out}"));
        line[field.len() + 1..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    }

    #[test]
    fn guid_text_round_trip_and_mixed_endian_bytes() {
        // UEFI spec, appendix A: the first three fields are stored little-endian.
        let g: Guid = "01234567-89ab-cdef-0123-456789ABCDEF".parse().unwrap();
        assert_eq!(
            g.0,
            [
                0x67, 0x45, 0x23, 0x01, 0xAB, 0x89, 0xEF, 0xCD, 0x01, 0x23, 0x45, 0x67, 0x89, 0xAB,
                0xCD, 0xEF
            ]
        );
        assert_eq!(g.to_string(), "01234567-89AB-CDEF-0123-456789ABCDEF");
        assert!("01234567-89ab-cdef-0123".parse::<Guid>().is_err());
        assert!("0123456789abcdef0123456789abcdef".parse::<Guid>().is_err());
        assert!("0123456Z-89ab-cdef-0123-456789abcdef"
            .parse::<Guid>()
            .is_err());
    }

    #[test]
    fn reads_partitions_as_sgdisk_reports_them() {
        let dir = TempDir::new().unwrap();
        // Let sgdisk pick a random GUID so nothing here is copied from our own code.
        let path = make_image(&dir, "R");
        let parts = read_gpt(&mut File::open(&path).unwrap(), 512).unwrap();
        assert_eq!(parts.len(), 2);
        for p in &parts {
            assert_eq!(
                p.unique_guid.to_string(),
                sgdisk_info(&path, p.number, "Partition unique GUID:")
            );
            assert_eq!(
                p.type_guid.to_string(),
                sgdisk_info(&path, p.number, "Partition GUID code:")
            );
            assert_eq!(
                p.first_lba.to_string(),
                sgdisk_info(&path, p.number, "First sector:")
            );
            assert_eq!(
                p.last_lba.to_string(),
                sgdisk_info(&path, p.number, "Last sector:")
            );
        }
        assert_eq!(parts[0].number, 1);
        assert_eq!(parts[0].type_guid.to_string(), ESP_TYPE);
        assert_eq!(parts[0].name, "EFI");
        assert_eq!(parts[0].first_lba, 2048);
        assert_eq!(parts[1].number, 2);
        assert_eq!(parts[1].type_guid.to_string(), ROOT_TYPE);
        assert_eq!(parts[1].name, "appliance-root");
    }

    #[test]
    fn known_guid_is_stored_mixed_endian_on_disk() {
        let dir = TempDir::new().unwrap();
        let path = make_image(&dir, "01234567-89AB-CDEF-0123-456789ABCDEF");
        let raw = std::fs::read(&path).unwrap();
        // sgdisk puts the entry array at LBA 2; entry 2 starts 128 bytes in, unique GUID at +16.
        let off = 2 * 512 + 128 + 16;
        assert_eq!(
            &raw[off..off + 16],
            &[
                0x67, 0x45, 0x23, 0x01, 0xAB, 0x89, 0xEF, 0xCD, 0x01, 0x23, 0x45, 0x67, 0x89, 0xAB,
                0xCD, 0xEF
            ]
        );
        let parts = read_gpt(&mut File::open(&path).unwrap(), 512).unwrap();
        assert_eq!(
            parts[1].unique_guid,
            "01234567-89ab-cdef-0123-456789abcdef".parse().unwrap()
        );
    }

    #[test]
    fn rejects_missing_and_corrupt_tables() {
        let dir = TempDir::new().unwrap();
        let blank = dir.path().join("blank.img");
        File::create(&blank).unwrap().set_len(1024 * 1024).unwrap();
        let err = read_gpt(&mut File::open(&blank).unwrap(), 512).unwrap_err();
        assert!(format!("{err:#}").contains("no GPT signature"), "{err:#}");

        let path = make_image(&dir, "R");
        let mut raw = std::fs::read(&path).unwrap();
        raw[512 + 60] ^= 0xff; // inside the disk GUID: header CRC must catch it
        let err = read_gpt(&mut std::io::Cursor::new(&raw), 512).unwrap_err();
        assert!(
            format!("{err:#}").contains("header CRC mismatch"),
            "{err:#}"
        );

        let mut raw = std::fs::read(&path).unwrap();
        raw[2 * 512 + 128 + 20] ^= 0xff; // inside entry 2: entry array CRC must catch it
        let err = read_gpt(&mut std::io::Cursor::new(&raw), 512).unwrap_err();
        assert!(format!("{err:#}").contains("entry array CRC"), "{err:#}");

        // Too short to hold LBA 1 at all.
        let err = read_gpt(&mut std::io::Cursor::new(vec![0u8; 700]), 512).unwrap_err();
        assert!(
            format!("{err:#}").contains("reading the GPT header"),
            "{err:#}"
        );
    }

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
