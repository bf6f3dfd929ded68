//! Locate the UEFI boot image (a FAT filesystem) of an ISO: the El Torito catalog's EFI
//! entry first, then a type 0xEF partition in the MBR, then an ESP in the GPT.
//!
//! grub-mkrescue (and so Talos) appends the FAT image as partition 2 and points the
//! El Torito entry at it; the entry's 16-bit count of 512-byte sectors can't describe
//! big images, so the size always comes from the FAT boot sector itself.

use anyhow::{bail, Context, Result};

use super::record::{le16, le32, le64};
use super::{Iso, SECTOR_SIZE};

/// El Torito platform ID of UEFI boot entries.
const PLATFORM_EFI: u8 = 0xEF;
const CATALOG_ENTRY_LEN: usize = 32;
/// The catalog is read up to this size (64 entries per sector; real discs use one sector).
const CATALOG_MAX_LEN: u64 = 4 * SECTOR_SIZE;
const HEADER_VALIDATION: u8 = 0x01;
const HEADER_SECTION_MORE: u8 = 0x90;
const HEADER_SECTION_FINAL: u8 = 0x91;
const ENTRY_EXTENSION: u8 = 0x44;

const MBR_LEN: usize = 512;
const MBR_TABLE_OFFSET: usize = 446;
const MBR_TYPE_EFI: u8 = 0xEF;
const MBR_TYPE_GPT_PROTECTIVE: u8 = 0xEE;
const BOOT_SIGNATURE: [u8; 2] = [0x55, 0xAA];
/// MBR and GPT on hybrid ISOs address 512-byte sectors.
const LBA_SIZE: u64 = 512;
const GPT_SIGNATURE: &[u8] = b"EFI PART";
const GPT_MAX_ENTRIES: u64 = 1024;
/// C12A7328-F81F-11D2-BA4B-00A0C93EC93B as stored on disk (first three fields little-endian).
const ESP_TYPE_GUID: [u8; 16] = [
    0x28, 0x73, 0x2A, 0xC1, 0x1F, 0xF8, 0xD2, 0x11, 0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E, 0xC9, 0x3B,
];

pub(super) fn efi_boot_image(iso: &Iso) -> Result<Option<(u64, u64)>> {
    let mut candidates = Vec::new();
    if let Some(catalog) = iso.boot_catalog {
        candidates
            .extend(el_torito_efi_entries(iso, catalog).context("reading the El Torito catalog")?);
    }
    candidates.extend(partition_candidates(iso).context("reading the partition table")?);
    for offset in candidates {
        if let Some(len) = fat_size(iso, offset)? {
            return Ok(Some((offset, len)));
        }
    }
    Ok(None)
}

/// Byte offsets of the catalog's EFI boot images, in catalog order.
fn el_torito_efi_entries(iso: &Iso, catalog: u64) -> Result<Vec<u64>> {
    let start = catalog * SECTOR_SIZE;
    let len = CATALOG_MAX_LEN.min(iso.len.saturating_sub(start));
    if len < SECTOR_SIZE {
        bail!("truncated: boot catalog at sector {catalog} lies beyond the end of the image");
    }
    let mut cat = vec![0u8; len as usize];
    iso.read_at(start, &mut cat, "El Torito boot catalog")?;
    let validation = &cat[..CATALOG_ENTRY_LEN];
    if validation[0] != HEADER_VALIDATION || validation[30..32] != BOOT_SIGNATURE {
        bail!("no validation entry at the start of the boot catalog (sector {catalog})");
    }
    let sum = (0..CATALOG_ENTRY_LEN)
        .step_by(2)
        .fold(0u16, |s, i| s.wrapping_add(le16(validation, i)));
    if sum != 0 {
        bail!("boot catalog validation entry has a bad checksum");
    }
    let mut found = Vec::new();
    // The initial/default entry boots on the validation entry's platform.
    if validation[1] == PLATFORM_EFI {
        found.push(u64::from(le32(&cat, CATALOG_ENTRY_LEN + 8)) * SECTOR_SIZE);
    }
    let mut pos = 2 * CATALOG_ENTRY_LEN;
    while pos + CATALOG_ENTRY_LEN <= cat.len() {
        let header = cat[pos];
        if header != HEADER_SECTION_MORE && header != HEADER_SECTION_FINAL {
            break;
        }
        let platform = cat[pos + 1];
        let count = le16(&cat, pos + 2);
        pos += CATALOG_ENTRY_LEN;
        for _ in 0..count {
            if pos + CATALOG_ENTRY_LEN > cat.len() {
                break;
            }
            if platform == PLATFORM_EFI {
                found.push(u64::from(le32(&cat, pos + 8)) * SECTOR_SIZE);
            }
            pos += CATALOG_ENTRY_LEN;
            while pos + CATALOG_ENTRY_LEN <= cat.len() && cat[pos] == ENTRY_EXTENSION {
                pos += CATALOG_ENTRY_LEN;
            }
        }
        if header == HEADER_SECTION_FINAL {
            break;
        }
    }
    Ok(found)
}

/// Byte offsets of 0xEF MBR partitions, then of GPT EFI System Partitions.
fn partition_candidates(iso: &Iso) -> Result<Vec<u64>> {
    let mut mbr = [0u8; MBR_LEN];
    iso.read_at(0, &mut mbr, "MBR")?;
    let mut found = Vec::new();
    let mut gpt = false;
    if mbr[510..512] == BOOT_SIGNATURE {
        for i in 0..4 {
            let e = &mbr[MBR_TABLE_OFFSET + 16 * i..MBR_TABLE_OFFSET + 16 * (i + 1)];
            let start = u64::from(le32(e, 8));
            match e[4] {
                MBR_TYPE_EFI if start > 0 => found.push(start * LBA_SIZE),
                MBR_TYPE_GPT_PROTECTIVE => gpt = true,
                _ => {}
            }
        }
    }
    let mut header = [0u8; 92];
    iso.read_at(LBA_SIZE, &mut header, "GPT header")?;
    if gpt || header[..8] == *GPT_SIGNATURE {
        found.extend(gpt_esps(iso, &header)?);
    }
    Ok(found)
}

fn gpt_esps(iso: &Iso, header: &[u8]) -> Result<Vec<u64>> {
    if header[..8] != *GPT_SIGNATURE {
        return Ok(Vec::new());
    }
    let entries_lba = le64(header, 72);
    let count = u64::from(le32(header, 80));
    let entry_len = u64::from(le32(header, 84));
    if !(128..=4096).contains(&entry_len) || count > GPT_MAX_ENTRIES {
        bail!("implausible GPT: {count} entries of {entry_len} bytes");
    }
    let mut table = vec![0u8; (count * entry_len) as usize];
    iso.read_at(
        entries_lba.saturating_mul(LBA_SIZE),
        &mut table,
        "GPT partition entries",
    )?;
    Ok(table
        .chunks_exact(entry_len as usize)
        .filter(|e| e[..16] == ESP_TYPE_GUID)
        .map(|e| le64(e, 32).saturating_mul(LBA_SIZE))
        .filter(|&offset| offset > 0)
        .collect())
}

/// Size of the FAT filesystem whose boot sector is at `offset`, or `None` if there is none.
fn fat_size(iso: &Iso, offset: u64) -> Result<Option<u64>> {
    let mut bs = [0u8; 512];
    iso.read_at(offset, &mut bs, "EFI boot image")?;
    let bytes_per_sector = u64::from(le16(&bs, 11));
    let sectors_per_cluster = bs[13];
    let total16 = u64::from(le16(&bs, 19));
    let total = if total16 != 0 {
        total16
    } else {
        u64::from(le32(&bs, 32))
    };
    let plausible = bs[510..512] == BOOT_SIGNATURE
        && (bs[0] == 0xEB || bs[0] == 0xE9)
        && matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096)
        && sectors_per_cluster.is_power_of_two()
        && le16(&bs, 14) > 0
        && bs[16] > 0
        && total > 0;
    if !plausible {
        return Ok(None);
    }
    let len = total * bytes_per_sector;
    let end = offset + len;
    if end > iso.len {
        bail!(
            "truncated: EFI boot image at bytes {offset}..{end} lies beyond the end of the image ({} bytes)",
            iso.len
        );
    }
    Ok(Some(len))
}
