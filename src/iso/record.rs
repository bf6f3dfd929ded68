//! ISO9660 directory records and their SUSP / Rock Ridge System Use entries.

use std::ops::Range;

use anyhow::{bail, Context, Result};

use super::{Extent, Iso, SECTOR_SIZE};

/// Fixed part of a directory record; the name follows.
const RECORD_HEADER_LEN: usize = 33;
const FLAG_DIRECTORY: u8 = 0x02;
/// "Not the final record of this file": ISO9660 level 3 multi-extent files.
const FLAG_MULTI_EXTENT: u8 = 0x80;

/// SP "check bytes" that prove the System Use area really holds SUSP entries.
const SP_CHECK: [u8; 2] = [0xBE, 0xEF];
/// ER extension identifiers that announce Rock Ridge.
const RRIP_IDS: [&[u8]; 3] = [b"RRIP_1991A", b"IEEE_P1282", b"IEEE_1282"];
const NM_CONTINUE: u8 = 0x01;
const NM_CURRENT: u8 = 0x02;
const NM_PARENT: u8 = 0x04;
/// CE chains longer than this are treated as a loop in a corrupt image.
const MAX_CE_HOPS: usize = 32;
/// A continuation area is at most one block in practice; allow some slack, no more.
const MAX_CE_LEN: u32 = 16 * SECTOR_SIZE as u32;

pub(super) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(super) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(super) fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

/// `VMLINUZ.;1` → `VMLINUZ`, `INITRAMF.XZ;1` → `INITRAMF.XZ`.
pub(super) fn strip_iso_name(name: &str) -> &str {
    let name = match name.rfind(';') {
        Some(i) if name[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &name[..i],
        _ => name,
    };
    name.strip_suffix('.').unwrap_or(name)
}

/// One parsed directory record.
#[derive(Debug)]
pub(super) struct Record {
    /// Record length in bytes.
    pub len: usize,
    pub flags: u8,
    /// First block of the data, after any extended attribute record.
    pub block: u64,
    pub data_len: u64,
    pub unit_size: u8,
    pub gap_size: u8,
    /// Raw ISO9660 name (`[0]` is `.`, `[1]` is `..`).
    pub name: Vec<u8>,
    /// The System Use area, relative to the record start.
    pub sua: Range<usize>,
}

impl Record {
    /// Parse the record at the start of `buf` (which ends at the sector boundary).
    pub fn parse(buf: &[u8]) -> Result<Record> {
        let Some(&len) = buf.first() else {
            bail!("empty directory record");
        };
        let len = usize::from(len);
        if len < RECORD_HEADER_LEN + 1 {
            bail!("record length {len} is below the minimum of 34");
        }
        if len > buf.len() {
            bail!(
                "record of {len} bytes overruns its sector ({} bytes left)",
                buf.len()
            );
        }
        let name_len = usize::from(buf[32]);
        if name_len == 0 || RECORD_HEADER_LEN + name_len > len {
            bail!("name length {name_len} does not fit a record of {len} bytes");
        }
        // A pad byte follows an even-length name so the System Use area starts even.
        let sua_start = (RECORD_HEADER_LEN + name_len + (1 - name_len % 2)).min(len);
        let ext_attr_len = u64::from(buf[1]);
        Ok(Record {
            len,
            flags: buf[25],
            block: u64::from(le32(buf, 2)) + ext_attr_len,
            data_len: u64::from(le32(buf, 10)),
            unit_size: buf[26],
            gap_size: buf[27],
            name: buf[RECORD_HEADER_LEN..RECORD_HEADER_LEN + name_len].to_vec(),
            sua: sua_start..len,
        })
    }

    pub fn is_dir(&self) -> bool {
        self.flags & FLAG_DIRECTORY != 0
    }

    pub fn is_multi_extent(&self) -> bool {
        self.flags & FLAG_MULTI_EXTENT != 0
    }

    pub fn interleaved(&self) -> bool {
        self.unit_size != 0 || self.gap_size != 0
    }

    pub fn extent(&self) -> Extent {
        Extent {
            offset: self.block * SECTOR_SIZE,
            len: self.data_len,
        }
    }
}

/// What the System Use entries of one record say.
#[derive(Debug, Default)]
pub(super) struct Susp {
    /// SP entry: SUSP is in use, with this skip length.
    pub sp_skip: Option<usize>,
    /// ER entry naming Rock Ridge, or RRIP entries seen.
    pub rrip: bool,
    /// NM: the Rock Ridge name (all components concatenated).
    pub name: Option<Vec<u8>>,
    /// The last NM entry seen had no CONTINUE flag.
    pub name_complete: bool,
    /// PX: POSIX file mode.
    pub mode: Option<u32>,
    /// RE: this directory was relocated; its real place is a CL entry elsewhere.
    pub relocated: bool,
}

impl Iso {
    /// Parse a System Use area (after skipping `skip` bytes) and its CE continuations.
    pub(super) fn parse_susp(&self, sua: &[u8], skip: usize) -> Result<Susp> {
        let mut susp = Susp::default();
        let mut area = sua.get(skip..).unwrap_or_default().to_vec();
        let mut hops = 0;
        loop {
            let continuation = parse_area(&area, &mut susp)?;
            let Some((block, offset, len)) = continuation else {
                break;
            };
            hops += 1;
            if hops > MAX_CE_HOPS {
                bail!("more than {MAX_CE_HOPS} SUSP continuation areas (a CE loop?)");
            }
            if len > MAX_CE_LEN {
                bail!("SUSP continuation area of {len} bytes is implausibly large");
            }
            area = vec![0u8; len as usize];
            let at = u64::from(block) * SECTOR_SIZE + u64::from(offset);
            self.read_at(at, &mut area, "SUSP continuation area")
                .context("following a CE entry")?;
        }
        Ok(susp)
    }
}

/// Parse the entries of one area into `susp`; returns the CE continuation (block, offset, len).
fn parse_area(area: &[u8], susp: &mut Susp) -> Result<Option<(u32, u32, u32)>> {
    let mut continuation = None;
    let mut pos = 0;
    while pos + 4 <= area.len() {
        let sig = [area[pos], area[pos + 1]];
        let len = usize::from(area[pos + 2]);
        if len < 4 {
            // Padding up to the end of the record.
            break;
        }
        if pos + len > area.len() {
            bail!(
                "SUSP entry {} of {len} bytes overruns its area",
                String::from_utf8_lossy(&sig)
            );
        }
        let e = &area[pos..pos + len];
        pos += len;
        match &sig {
            b"ST" => break,
            b"CE" => {
                if len < 28 {
                    bail!("CE entry of {len} bytes is too short");
                }
                continuation = Some((le32(e, 4), le32(e, 12), le32(e, 20)));
            }
            b"SP" if len >= 7 && e[4..6] == SP_CHECK => susp.sp_skip = Some(usize::from(e[6])),
            b"ER" if len >= 8 => {
                let id_len = usize::from(e[4]);
                let id = e.get(8..8 + id_len).unwrap_or_default();
                susp.rrip |= RRIP_IDS.contains(&id);
            }
            b"NM" => {
                if len < 5 {
                    bail!("NM entry of {len} bytes is too short");
                }
                susp.rrip = true;
                let flags = e[4];
                // A name is the NM entries up to the first one without CONTINUE (which may
                // sit in a continuation area); anything after that is ignored.
                if flags & (NM_CURRENT | NM_PARENT) == 0 && !susp.name_complete {
                    let name = susp.name.get_or_insert_with(Vec::new);
                    name.extend_from_slice(&e[5..]);
                    susp.name_complete = flags & NM_CONTINUE == 0;
                }
            }
            b"PX" => {
                if len < 36 {
                    bail!("PX entry of {len} bytes is too short");
                }
                susp.rrip = true;
                susp.mode = Some(le32(e, 4));
            }
            b"RE" => susp.relocated = true,
            b"RR" | b"TF" | b"SL" | b"CL" | b"PL" => susp.rrip = true,
            _ => {}
        }
    }
    Ok(continuation)
}
