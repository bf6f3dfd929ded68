//! GUID Partition Table: writing (with a protective MBR) and reading back.
//!
//! Written by hand rather than with the `gpt` crate, which assigns random partition
//! GUIDs: every GUID here comes from the caller so images are reproducible.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};

use crate::layout::SECTOR;

const SIGNATURE: &[u8; 8] = b"EFI PART";
const REVISION: u32 = 0x0001_0000;
const HEADER_SIZE: u32 = 92;
const ENTRY_COUNT: u32 = 128;
const ENTRY_SIZE: u32 = 128;
/// Sectors taken by the entry array: 128 entries × 128 bytes / 512.
const ENTRY_SECTORS: u64 = (ENTRY_COUNT * ENTRY_SIZE) as u64 / SECTOR;
const MBR_TYPE_PROTECTIVE: u8 = 0xEE;
const NAME_UNITS: usize = 36;
/// The primary header lives in LBA 1.
const GPT_HEADER_LBA: u64 = 1;
/// Smallest header size the spec allows (the fields we read all lie below it).
const GPT_MIN_HEADER_SIZE: usize = 92;
/// Smallest partition entry size the spec allows.
const GPT_MIN_ENTRY_SIZE: usize = 128;
/// Refuse absurd entry arrays from a corrupt header (the spec's default is 128 × 128 B).
const GPT_MAX_ENTRY_ARRAY: usize = 1024 * 1024;
/// Sector size used when nothing says otherwise.
pub const DEFAULT_SECTOR_SIZE: u64 = 512;

/// A GUID as the 16 bytes GPT stores (first three fields little-endian).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    pub const ZERO: Guid = Guid([0; 16]);

    pub fn is_zero(&self) -> bool {
        *self == Self::ZERO
    }

    /// Parse the canonical text form `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX`.
    pub fn parse(s: &str) -> Result<Guid> {
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        ensure!(
            hex.len() == 32 && s.len() == 36,
            "{s:?} is not a GUID (expected XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX)"
        );
        let raw = hex::decode(&hex).with_context(|| format!("{s:?} is not a GUID"))?;
        let mut b = [0u8; 16];
        b.copy_from_slice(&raw);
        b[0..4].reverse();
        b[4..6].reverse();
        b[6..8].reverse();
        Ok(Guid(b))
    }

    /// Build a GUID from arbitrary bytes (e.g. a hash), marked as an RFC 4122 version 4
    /// variant so tools display it like any other.
    pub fn from_hash(bytes: &[u8]) -> Guid {
        let mut b = [0u8; 16];
        b.copy_from_slice(&bytes[..16]);
        // Byte 7 is the high byte of the little-endian third field.
        b[7] = (b[7] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Guid(b)
    }
}

impl FromStr for Guid {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Guid> {
        Guid::parse(s)
    }
}

impl std::fmt::Display for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-",
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9]
        )?;
        for x in &b[10..] {
            write!(f, "{x:02X}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// 1-based entry number, as the kernel numbers partitions (`vda2` is entry 2).
    /// Writing ignores it: entries are written in order.
    pub number: u32,
    pub type_guid: Guid,
    pub unique_guid: Guid,
    /// First and last sector, inclusive, as GPT stores them.
    pub first_lba: u64,
    pub last_lba: u64,
    pub name: String,
}

impl Partition {
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR
    }
    pub fn size(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba) * SECTOR
    }
}

#[derive(Clone, Debug)]
pub struct Table {
    pub disk_guid: Guid,
    pub partitions: Vec<Partition>,
}

/// First sector a partition may use, and last, for a disk of `total` sectors.
pub fn usable_range(total_sectors: u64) -> (u64, u64) {
    (2 + ENTRY_SECTORS, total_sectors - 2 - ENTRY_SECTORS)
}

fn entry_bytes(parts: &[Partition]) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; (ENTRY_COUNT * ENTRY_SIZE) as usize];
    ensure!(parts.len() <= ENTRY_COUNT as usize, "too many partitions");
    for (i, p) in parts.iter().enumerate() {
        let e = &mut buf[i * ENTRY_SIZE as usize..(i + 1) * ENTRY_SIZE as usize];
        e[0..16].copy_from_slice(&p.type_guid.0);
        e[16..32].copy_from_slice(&p.unique_guid.0);
        e[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
        e[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
        let units: Vec<u16> = p.name.encode_utf16().collect();
        ensure!(
            units.len() <= NAME_UNITS,
            "partition name {:?} too long",
            p.name
        );
        for (j, u) in units.iter().enumerate() {
            e[56 + 2 * j..58 + 2 * j].copy_from_slice(&u.to_le_bytes());
        }
    }
    Ok(buf)
}

fn header_bytes(table: &Table, total: u64, backup: bool, entries_crc: u32) -> Vec<u8> {
    let (first, last) = usable_range(total);
    let (this_lba, other_lba, entries_lba) = if backup {
        (total - 1, 1, total - 1 - ENTRY_SECTORS)
    } else {
        (1, total - 1, 2)
    };
    let mut h = vec![0u8; SECTOR as usize];
    h[0..8].copy_from_slice(SIGNATURE);
    h[8..12].copy_from_slice(&REVISION.to_le_bytes());
    h[12..16].copy_from_slice(&HEADER_SIZE.to_le_bytes());
    h[24..32].copy_from_slice(&this_lba.to_le_bytes());
    h[32..40].copy_from_slice(&other_lba.to_le_bytes());
    h[40..48].copy_from_slice(&first.to_le_bytes());
    h[48..56].copy_from_slice(&last.to_le_bytes());
    h[56..72].copy_from_slice(&table.disk_guid.0);
    h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
    h[80..84].copy_from_slice(&ENTRY_COUNT.to_le_bytes());
    h[84..88].copy_from_slice(&ENTRY_SIZE.to_le_bytes());
    h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
    let crc = crc32fast::hash(&h[..HEADER_SIZE as usize]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

fn protective_mbr(total: u64) -> Vec<u8> {
    let mut m = vec![0u8; SECTOR as usize];
    let e = &mut m[446..462];
    e[1..4].copy_from_slice(&[0x00, 0x02, 0x00]); // CHS of LBA 1
    e[4] = MBR_TYPE_PROTECTIVE;
    e[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    e[8..12].copy_from_slice(&1u32.to_le_bytes());
    let size = (total - 1).min(u32::MAX as u64) as u32;
    e[12..16].copy_from_slice(&size.to_le_bytes());
    m[510] = 0x55;
    m[511] = 0xAA;
    m
}

/// Write the protective MBR and both GPT copies to a file of `total_bytes`.
pub fn write(out: &File, total_bytes: u64, table: &Table) -> Result<()> {
    ensure!(
        total_bytes.is_multiple_of(SECTOR),
        "disk size is not a multiple of {SECTOR}"
    );
    let total = total_bytes / SECTOR;
    let (first, last) = usable_range(total);
    for p in &table.partitions {
        ensure!(
            p.first_lba >= first && p.last_lba <= last && p.first_lba <= p.last_lba,
            "partition {} ({}..{}) outside the usable sectors {first}..{last}",
            p.name,
            p.first_lba,
            p.last_lba
        );
    }
    let entries = entry_bytes(&table.partitions)?;
    let crc = crc32fast::hash(&entries);
    let writes = [
        (0, protective_mbr(total)),
        (SECTOR, header_bytes(table, total, false, crc)),
        (2 * SECTOR, entries.clone()),
        ((total - 1 - ENTRY_SECTORS) * SECTOR, entries),
        ((total - 1) * SECTOR, header_bytes(table, total, true, crc)),
    ];
    for (off, bytes) in writes {
        out.write_all_at(&bytes, off)
            .with_context(|| format!("writing partition table at byte {off}"))?;
    }
    Ok(())
}

/// Read and parse the primary GPT of an image file (512-byte sectors).
pub fn read(file: &File) -> Result<Table> {
    read_gpt(&mut &*file, DEFAULT_SECTOR_SIZE)
}

/// [`read`], with the primary header it came from (where the backup header is, say).
pub fn read_with_header(file: &File) -> Result<(GptHeader, Table)> {
    read_header_and_table(&mut &*file, DEFAULT_SECTOR_SIZE)
}

/// The fields of a GPT header a reader needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GptHeader {
    /// Where the backup header is: the disk's last sector.
    pub alternate_lba: u64,
    pub disk_guid: Guid,
    pub entries_lba: u64,
    pub num_entries: u32,
    pub entry_size: u32,
    pub entries_crc32: u32,
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
    if &sector[0..8] != SIGNATURE {
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
        alternate_lba: le_u64(sector, 32),
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
pub fn parse_entries(header: &GptHeader, array: &[u8]) -> Result<Vec<Partition>> {
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
        parts.push(Partition {
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

/// Read the primary GPT of a disk (or disk image) with the given logical sector size
/// (CRC-checked; the backup copy is not consulted).
pub fn read_gpt<R: Read + Seek>(disk: &mut R, sector_size: u64) -> Result<Table> {
    read_header_and_table(disk, sector_size).map(|(_, table)| table)
}

fn read_header_and_table<R: Read + Seek>(
    disk: &mut R,
    sector_size: u64,
) -> Result<(GptHeader, Table)> {
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
    let table = Table {
        disk_guid: header.disk_guid,
        partitions: parse_entries(&header, &array)?,
    };
    Ok((header, table))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::Path;
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
    pub(crate) fn make_image(dir: &TempDir, root_guid: &str) -> std::path::PathBuf {
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
    fn guid_text_round_trip_and_mixed_endian() {
        let g = Guid::parse("C12A7328-F81F-11D2-BA4B-00A0C93EC93B").unwrap();
        // The on-disk bytes of the ESP type GUID as the UEFI spec lists them.
        assert_eq!(
            g.0,
            [
                0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
                0xc9, 0x3b
            ]
        );
        assert_eq!(g.to_string(), "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
        assert!(Guid::parse("C12A7328F81F11D2BA4B00A0C93EC93B").is_err());
        assert!(Guid::parse("Z12A7328-F81F-11D2-BA4B-00A0C93EC93B").is_err());
    }

    #[test]
    fn hash_guid_is_version_4() {
        let g = Guid::from_hash(&[0xffu8; 32]).to_string();
        assert_eq!(&g[14..15], "4");
        assert!(matches!(&g[19..20], "8" | "9" | "A" | "B"));
    }

    #[test]
    fn reads_partitions_as_sgdisk_reports_them() {
        let dir = TempDir::new().unwrap();
        // Let sgdisk pick a random GUID so nothing here is copied from our own code.
        let path = make_image(&dir, "R");
        let parts = read_gpt(&mut File::open(&path).unwrap(), 512)
            .map(|t| t.partitions)
            .unwrap();
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
        let parts = read_gpt(&mut File::open(&path).unwrap(), 512)
            .map(|t| t.partitions)
            .unwrap();
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
        let err = read_gpt(&mut File::open(&blank).unwrap(), 512)
            .map(|t| t.partitions)
            .unwrap_err();
        assert!(format!("{err:#}").contains("no GPT signature"), "{err:#}");

        let path = make_image(&dir, "R");
        let mut raw = std::fs::read(&path).unwrap();
        raw[512 + 60] ^= 0xff; // inside the disk GUID: header CRC must catch it
        let err = read_gpt(&mut std::io::Cursor::new(&raw), 512)
            .map(|t| t.partitions)
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("header CRC mismatch"),
            "{err:#}"
        );

        let mut raw = std::fs::read(&path).unwrap();
        raw[2 * 512 + 128 + 20] ^= 0xff; // inside entry 2: entry array CRC must catch it
        let err = read_gpt(&mut std::io::Cursor::new(&raw), 512)
            .map(|t| t.partitions)
            .unwrap_err();
        assert!(format!("{err:#}").contains("entry array CRC"), "{err:#}");

        // Too short to hold LBA 1 at all.
        let err = read_gpt(&mut std::io::Cursor::new(vec![0u8; 700]), 512)
            .map(|t| t.partitions)
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("reading the GPT header"),
            "{err:#}"
        );
    }
}
