//! GUID Partition Table: writing (with a protective MBR) and reading back.
//!
//! Written by hand rather than with the `gpt` crate, which assigns random partition
//! GUIDs: every GUID here comes from the caller so images are reproducible.

use std::fs::File;
use std::os::unix::fs::FileExt;

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

/// A GUID as the 16 bytes GPT stores (first three fields little-endian).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// Parse the canonical text form `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX`.
    pub fn parse(s: &str) -> Result<Guid> {
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        ensure!(
            hex.len() == 32 && s.len() == 36,
            "malformed GUID {s:?}: expected XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX"
        );
        let raw = hex::decode(&hex).with_context(|| format!("malformed GUID {s:?}"))?;
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

/// Parse the primary GPT from the first sectors of a disk (at least 34 sectors).
pub fn parse(disk_start: &[u8]) -> Result<Table> {
    ensure!(
        disk_start.len() >= (2 + ENTRY_SECTORS as usize) * SECTOR as usize,
        "disk too small for a GPT"
    );
    let h = &disk_start[SECTOR as usize..2 * SECTOR as usize];
    if &h[0..8] != SIGNATURE {
        bail!("no GPT found (missing \"EFI PART\" signature at LBA 1)");
    }
    let hsize = u32::from_le_bytes(h[12..16].try_into()?) as usize;
    ensure!(
        (92..=SECTOR as usize).contains(&hsize),
        "GPT header size {hsize} is invalid"
    );
    let mut hcopy = h[..hsize].to_vec();
    hcopy[16..20].fill(0);
    let want = u32::from_le_bytes(h[16..20].try_into()?);
    ensure!(
        crc32fast::hash(&hcopy) == want,
        "GPT header checksum mismatch"
    );
    let mut disk_guid = [0u8; 16];
    disk_guid.copy_from_slice(&h[56..72]);
    let entries_lba = u64::from_le_bytes(h[72..80].try_into()?);
    let count = u32::from_le_bytes(h[80..84].try_into()?) as usize;
    let esize = u32::from_le_bytes(h[84..88].try_into()?) as usize;
    ensure!(
        esize >= 128 && count <= 1024,
        "GPT entry array geometry is invalid"
    );
    let start = (entries_lba * SECTOR) as usize;
    let end = start + count * esize;
    ensure!(
        end <= disk_start.len(),
        "GPT entry array lies beyond the data read"
    );
    let array = &disk_start[start..end];
    ensure!(
        crc32fast::hash(array) == u32::from_le_bytes(h[88..92].try_into()?),
        "GPT partition entry checksum mismatch"
    );
    let mut partitions = Vec::new();
    for e in array.chunks(esize) {
        let mut t = [0u8; 16];
        t.copy_from_slice(&e[0..16]);
        if t == [0u8; 16] {
            continue;
        }
        let mut u = [0u8; 16];
        u.copy_from_slice(&e[16..32]);
        let units: Vec<u16> = e[56..128]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&c| c != 0)
            .collect();
        partitions.push(Partition {
            type_guid: Guid(t),
            unique_guid: Guid(u),
            first_lba: u64::from_le_bytes(e[32..40].try_into()?),
            last_lba: u64::from_le_bytes(e[40..48].try_into()?),
            name: String::from_utf16_lossy(&units),
        });
    }
    Ok(Table {
        disk_guid: Guid(disk_guid),
        partitions,
    })
}

/// Bytes to read from the start of a disk to parse its GPT.
pub const PARSE_BYTES: usize = ((2 + ENTRY_SECTORS) * SECTOR) as usize;

/// Read and parse the primary GPT of an image file.
pub fn read(file: &File) -> Result<Table> {
    let mut buf = vec![0u8; PARSE_BYTES];
    file.read_exact_at(&mut buf, 0)
        .context("reading the partition table (file shorter than a GPT disk)")?;
    parse(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
