//! Putting the planned volume on disk: boot sectors, FSInfo, FATs and file data.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;

use anyhow::{bail, Context, Result};

use super::geometry::{
    Geometry, FAT_ENTRY_BYTES, FIRST_CLUSTER, NUM_FATS, RESERVED_SECTORS, SECTOR,
};
use super::plan::Allocation;
use super::CHUNK;
use crate::tree::Content;

const OEM_NAME: &[u8; 8] = b"MSWIN4.1";
const MEDIA_FIXED: u8 = 0xF8;
const FSINFO_SECTOR: u16 = 1;
const BACKUP_BOOT_SECTOR: u16 = 6;
const DRIVE_NUMBER: u8 = 0x80;
const EXT_BOOT_SIGNATURE: u8 = 0x29;
/// CHS fields nobody uses any more, set like other formatters do.
const SECTORS_PER_TRACK: u16 = 63;
const HEADS: u16 = 255;
/// `jmp short 0x5A; nop`, and at 0x5A `int 0x18` ("no bootable disk") then `hlt` forever:
/// an ESP is never booted through its boot sector.
const JUMP: [u8; 3] = [0xEB, 0x58, 0x90];
const BOOT_CODE_AT: usize = 0x5A;
const BOOT_CODE: [u8; 5] = [0xCD, 0x18, 0xF4, 0xEB, 0xFD];
const FS_TYPE: &[u8; 8] = b"FAT32   ";
const FSINFO_LEAD: u32 = 0x4161_5252;
const FSINFO_STRUCT: u32 = 0x6141_7272;
const FSINFO_TRAIL: u32 = 0xAA55_0000;
const FSINFO_UNKNOWN: u32 = 0xFFFF_FFFF;
/// FAT entry 0 repeats the media byte; entry 1 is end-of-chain with the
/// clean-shutdown and no-I/O-error bits set.
const FAT_ENTRY0: u32 = 0x0FFF_FF00 | MEDIA_FIXED as u32;
const FAT_EOC: u32 = 0x0FFF_FFFF;
/// Label stored in the boot sector of a volume without one.
const NO_LABEL: &[u8; 11] = b"NO NAME    ";

pub(super) struct Writer<'a> {
    pub out: &'a File,
    /// Byte offset of the volume in `out`.
    pub offset: u64,
    pub geo: Geometry,
}

impl Writer<'_> {
    /// Write `data` at `pos` (relative to the volume), at most `CHUNK` bytes per call.
    pub fn write_at(&self, data: &[u8], pos: u64) -> Result<()> {
        for (i, chunk) in data.chunks(CHUNK).enumerate() {
            let at = self.offset + pos + (i * CHUNK) as u64;
            self.out
                .write_all_at(chunk, at)
                .with_context(|| format!("writing {} bytes at offset {at}", chunk.len()))?;
        }
        Ok(())
    }

    /// Boot sector, FSInfo and their backups; the rest of the reserved area is zeros.
    pub fn write_reserved(
        &self,
        alloc: &Allocation,
        volume_id: u32,
        label: Option<&[u8; 11]>,
    ) -> Result<()> {
        let geo = &self.geo;
        let mut boot = [0u8; SECTOR as usize];
        boot[0..3].copy_from_slice(&JUMP);
        boot[3..11].copy_from_slice(OEM_NAME);
        boot[11..13].copy_from_slice(&(SECTOR as u16).to_le_bytes());
        boot[13] = geo.sectors_per_cluster as u8;
        boot[14..16].copy_from_slice(&(RESERVED_SECTORS as u16).to_le_bytes());
        boot[16] = NUM_FATS as u8;
        // 17..19 root entries, 19..21 16-bit sector count, 22..24 16-bit FAT size: 0 on FAT32
        boot[21] = MEDIA_FIXED;
        boot[24..26].copy_from_slice(&SECTORS_PER_TRACK.to_le_bytes());
        boot[26..28].copy_from_slice(&HEADS.to_le_bytes());
        // Hidden sectors: where the partition starts on its disk.
        let hidden = u32::try_from(self.offset / SECTOR).unwrap_or(u32::MAX);
        boot[28..32].copy_from_slice(&hidden.to_le_bytes());
        boot[32..36].copy_from_slice(&geo.total_sectors.to_le_bytes());
        boot[36..40].copy_from_slice(&geo.fat_sectors.to_le_bytes());
        // 40..42 flags 0: FATs mirrored; 42..44 version 0.0
        boot[44..48].copy_from_slice(&FIRST_CLUSTER.to_le_bytes()); // root directory
        boot[48..50].copy_from_slice(&FSINFO_SECTOR.to_le_bytes());
        boot[50..52].copy_from_slice(&BACKUP_BOOT_SECTOR.to_le_bytes());
        boot[64] = DRIVE_NUMBER;
        boot[66] = EXT_BOOT_SIGNATURE;
        boot[67..71].copy_from_slice(&volume_id.to_le_bytes());
        boot[71..82].copy_from_slice(label.unwrap_or(NO_LABEL));
        boot[82..90].copy_from_slice(FS_TYPE);
        boot[BOOT_CODE_AT..BOOT_CODE_AT + BOOT_CODE.len()].copy_from_slice(&BOOT_CODE);
        boot[510] = 0x55;
        boot[511] = 0xAA;

        let free = geo.clusters - (alloc.next_free - FIRST_CLUSTER);
        let next_free = if free == 0 {
            FSINFO_UNKNOWN
        } else {
            alloc.next_free
        };
        let mut info = [0u8; SECTOR as usize];
        info[0..4].copy_from_slice(&FSINFO_LEAD.to_le_bytes());
        info[484..488].copy_from_slice(&FSINFO_STRUCT.to_le_bytes());
        info[488..492].copy_from_slice(&free.to_le_bytes());
        info[492..496].copy_from_slice(&next_free.to_le_bytes());
        info[508..512].copy_from_slice(&FSINFO_TRAIL.to_le_bytes());

        // The whole reserved area at once (16 KiB): zeros between the copies included,
        // so nothing left in the range from before can look like a boot sector.
        let mut reserved = vec![0u8; (u64::from(RESERVED_SECTORS) * SECTOR) as usize];
        for (sector, data) in [
            (0, &boot),
            (FSINFO_SECTOR, &info),
            (BACKUP_BOOT_SECTOR, &boot),
            (BACKUP_BOOT_SECTOR + FSINFO_SECTOR, &info),
        ] {
            let at = usize::from(sector) * SECTOR as usize;
            reserved[at..at + SECTOR as usize].copy_from_slice(data);
        }
        self.write_at(&reserved, 0)
    }

    /// The used part of both FATs: every run is a chain of consecutive clusters.
    pub fn write_fats(&self, alloc: &Allocation) -> Result<()> {
        let mut buf: Vec<u8> = Vec::with_capacity(CHUNK);
        let mut written = 0u64;
        let flush = |buf: &mut Vec<u8>, written: &mut u64| -> Result<()> {
            // Pad the tail to whole sectors; the rest of the FAT stays an unwritten hole.
            buf.resize(buf.len().next_multiple_of(SECTOR as usize), 0);
            for copy in 0..NUM_FATS {
                self.write_at(buf, self.geo.fat_offset(copy) + *written)?;
            }
            *written += buf.len() as u64;
            buf.clear();
            Ok(())
        };
        buf.extend(FAT_ENTRY0.to_le_bytes());
        buf.extend(FAT_EOC.to_le_bytes());
        for run in alloc.runs() {
            let last = run.first + run.count - 1;
            for cluster in run.first..=last {
                let next = if cluster == last {
                    FAT_EOC
                } else {
                    cluster + 1
                };
                buf.extend(next.to_le_bytes());
                if buf.len() == CHUNK {
                    flush(&mut buf, &mut written)?;
                }
            }
        }
        if !buf.is_empty() {
            flush(&mut buf, &mut written)?;
        }
        debug_assert_eq!(
            written.div_ceil(SECTOR) * SECTOR,
            (u64::from(alloc.next_free) * FAT_ENTRY_BYTES).div_ceil(SECTOR) * SECTOR
        );
        Ok(())
    }

    /// Stream `content` to `pos`, skipping all-zero chunks (they are holes already).
    pub fn write_file(&self, content: &Content, pos: u64, buf: &mut [u8]) -> Result<()> {
        let len = content.len();
        let mut reader = content.open()?;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            let chunk = &mut buf[..n];
            reader.read_exact(chunk).with_context(|| {
                format!(
                    "reading bytes {done}..{} of {len} (did the file shrink?)",
                    done + n as u64
                )
            })?;
            if chunk.iter().any(|&b| b != 0) {
                self.write_at(chunk, pos + done)?;
            }
            done += n as u64;
        }
        let mut probe = [0u8; 1];
        if reader.read(&mut probe).context("reading past the end")? != 0 {
            bail!("the file grew beyond the {len} bytes it had when the tree was built");
        }
        Ok(())
    }
}
