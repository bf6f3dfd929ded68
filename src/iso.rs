//! ISO9660 + Rock Ridge reader for Talos ISOs.
//!
//! Talos names its files only through Rock Ridge (`vmlinuz`, `initramfs.xz`); the plain
//! ISO9660 names are upper-case 8.3. This reader streams: directories and file data are
//! read with positioned reads from the `File` when asked for, never the whole image.
//! SUSP (SP skip length, CE continuation areas, NM with CONTINUE, PX modes) is parsed
//! here; RE/CL directory relocation is not followed (relocated entries are hidden).
//! [`Iso::efi_boot_image`] finds the UEFI El Torito image (see `boot.rs`).

mod boot;
mod record;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::io::{self, Read, Write};
use std::ops::ControlFlow;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use record::{Record, Susp};

/// ISO9660 sector (and the only logical block size we accept, as every real disc uses).
pub const SECTOR_SIZE: u64 = 2048;
/// The volume descriptor set starts at sector 16, after the system area.
const FIRST_VD_SECTOR: u64 = 16;
/// Stop looking for the terminator after this many descriptors (corrupt images).
const MAX_VOLUME_DESCRIPTORS: u64 = 64;
const STANDARD_ID: &[u8] = b"CD001";
const VD_BOOT_RECORD: u8 = 0;
const VD_PRIMARY: u8 = 1;
const VD_TERMINATOR: u8 = 255;
const EL_TORITO_ID: &[u8] = b"EL TORITO SPECIFICATION";
/// Copy buffer for [`Iso::copy_to`]: big reads keep kernel/initramfs copies fast.
const COPY_BUF_SIZE: usize = 1 << 20;

/// One contiguous run of a file's bytes in the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset in the image.
    pub offset: u64,
    pub len: u64,
}

/// A file or directory found in the ISO tree.
#[derive(Clone, Debug)]
pub struct IsoEntry {
    /// Absolute path with the names as matched (Rock Ridge when present), e.g. `/boot/vmlinuz`.
    pub path: String,
    /// Last path component (empty for the root).
    pub name: String,
    pub is_dir: bool,
    /// Total size in bytes (sum of the extents).
    pub size: u64,
    /// POSIX mode from the Rock Ridge PX entry, when present.
    pub mode: Option<u32>,
    /// Where the bytes are: one extent, or several for ISO9660 level 3 multi-extent files.
    pub extents: Vec<Extent>,
}

/// An open ISO9660 image.
pub struct Iso {
    file: File,
    path: PathBuf,
    /// Image length when opened; reads past it are reported as truncation.
    len: u64,
    volume_id: String,
    root: IsoEntry,
    /// SUSP is in use: bytes to skip at the start of every System Use area (SP LEN_SKP).
    susp_skip: Option<usize>,
    /// Rock Ridge names are present: match case-sensitively on them.
    rock_ridge: bool,
    /// Sector of the El Torito boot catalog, if the image has one.
    boot_catalog: Option<u64>,
}

impl Iso {
    /// Open an image and validate its primary volume descriptor.
    pub fn open(path: &Path) -> Result<Iso> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("reading metadata of {}", path.display()))?
            .len();
        if len < (FIRST_VD_SECTOR + 1) * SECTOR_SIZE {
            bail!(
                "not an ISO9660 image (no CD001 at sector 16): {} is only {len} bytes",
                path.display()
            );
        }
        let mut iso = Iso {
            file,
            path: path.to_owned(),
            len,
            volume_id: String::new(),
            root: IsoEntry {
                path: "/".into(),
                name: String::new(),
                is_dir: true,
                size: 0,
                mode: None,
                extents: Vec::new(),
            },
            susp_skip: None,
            rock_ridge: false,
            boot_catalog: None,
        };
        iso.read_volume_descriptors()
            .with_context(|| format!("reading ISO9660 image {}", path.display()))?;
        iso.detect_rock_ridge()
            .with_context(|| format!("reading the root directory of {}", path.display()))?;
        Ok(iso)
    }

    /// The volume ID from the primary volume descriptor, trailing spaces removed.
    pub fn volume_id(&self) -> &str {
        &self.volume_id
    }

    /// Whether the image carries Rock Ridge names.
    pub fn has_rock_ridge(&self) -> bool {
        self.rock_ridge
    }

    /// Find an entry by absolute path (`/boot/vmlinuz`). Rock Ridge names match
    /// case-sensitively; without Rock Ridge, ISO9660 names match case-insensitively
    /// ignoring the `;1` version and a trailing `.`.
    pub fn lookup(&self, path: &str) -> Result<Option<IsoEntry>> {
        let mut cur = self.root.clone();
        for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            if comp == ".." {
                bail!("looking up {path}: '..' is not supported");
            }
            if !cur.is_dir {
                return Ok(None);
            }
            let mut found = None;
            self.scan_dir(&cur, |e| {
                if self.name_matches(&e.name, comp) {
                    found = Some(e);
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .with_context(|| format!("looking up {path} in {}", self.path.display()))?;
            match found {
                Some(e) => cur = e,
                None => return Ok(None),
            }
        }
        Ok(Some(cur))
    }

    /// List a directory in on-disc order (which ISO9660 sorts by ISO name).
    pub fn read_dir(&self, path: &str) -> Result<Vec<IsoEntry>> {
        let dir = self
            .lookup(path)?
            .with_context(|| format!("no such directory {path} in {}", self.path.display()))?;
        if !dir.is_dir {
            bail!("{path} in {} is not a directory", self.path.display());
        }
        let mut entries = Vec::new();
        self.scan_dir(&dir, |e| {
            entries.push(e);
            ControlFlow::Continue(())
        })
        .with_context(|| format!("reading directory {path} of {}", self.path.display()))?;
        Ok(entries)
    }

    /// A reader yielding exactly `entry.size` bytes of a file.
    pub fn reader(&self, entry: &IsoEntry) -> Result<impl Read + '_> {
        if entry.is_dir {
            bail!("{} is a directory", entry.path);
        }
        let len = self
            .file
            .metadata()
            .with_context(|| format!("reading metadata of {}", self.path.display()))?
            .len();
        for ext in &entry.extents {
            let end = ext.offset.saturating_add(ext.len);
            if end > len {
                bail!(
                    "truncated: {} needs bytes {}..{end} but {} ends at byte {len}",
                    entry.path,
                    ext.offset,
                    self.path.display()
                );
            }
        }
        Ok(ExtentReader {
            file: &self.file,
            path: entry.path.clone(),
            extents: entry.extents.clone(),
            index: 0,
            pos: 0,
        })
    }

    /// Copy a file's bytes to `w`; returns the number of bytes copied (`entry.size`).
    pub fn copy_to(&self, entry: &IsoEntry, w: &mut dyn Write) -> Result<u64> {
        let mut r = self.reader(entry)?;
        let mut buf = vec![0u8; COPY_BUF_SIZE.min(entry.size.max(1) as usize)];
        let mut total = 0u64;
        loop {
            let n = r
                .read(&mut buf)
                .with_context(|| format!("reading {} from {}", entry.path, self.path.display()))?;
            if n == 0 {
                break;
            }
            w.write_all(&buf[..n])
                .with_context(|| format!("writing out {}", entry.path))?;
            total += n as u64;
        }
        if total != entry.size {
            bail!(
                "{}: copied {total} bytes, expected {}",
                entry.path,
                entry.size
            );
        }
        Ok(total)
    }

    /// Byte range (offset, len) of the UEFI boot image: the El Torito catalog's EFI (platform 0xEF)
    /// entry, or an appended partition of type 0xEF in the ISO's MBR / GPT (grub-mkrescue
    /// -append_partition 2 0xef efiboot.img). Size it from the FAT boot sector found there
    /// (total sectors × bytes per sector), since the El Torito sector count is unreliable.
    pub fn efi_boot_image(&self) -> Result<Option<(u64, u64)>> {
        boot::efi_boot_image(self)
            .with_context(|| format!("finding the UEFI boot image in {}", self.path.display()))
    }

    /// Read exactly `buf.len()` bytes at `offset`, reporting reads past the end as truncation.
    fn read_at(&self, offset: u64, buf: &mut [u8], what: &str) -> Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        if end > self.len {
            bail!(
                "truncated: {what} at bytes {offset}..{end} lies beyond the end of the image ({} bytes)",
                self.len
            );
        }
        self.file
            .read_exact_at(buf, offset)
            .with_context(|| format!("reading {what} at byte {offset}"))
    }

    fn read_volume_descriptors(&mut self) -> Result<()> {
        let mut vd = vec![0u8; SECTOR_SIZE as usize];
        let mut primary = false;
        for sector in FIRST_VD_SECTOR..FIRST_VD_SECTOR + MAX_VOLUME_DESCRIPTORS {
            self.read_at(sector * SECTOR_SIZE, &mut vd, "volume descriptor")?;
            if &vd[1..6] != STANDARD_ID {
                if sector == FIRST_VD_SECTOR {
                    bail!("not an ISO9660 image (no CD001 at sector 16)");
                }
                bail!("corrupt volume descriptor set: no CD001 at sector {sector}");
            }
            match vd[0] {
                VD_PRIMARY if !primary => {
                    self.parse_primary(&vd)?;
                    primary = true;
                }
                VD_BOOT_RECORD if vd[7..7 + EL_TORITO_ID.len()] == *EL_TORITO_ID => {
                    self.boot_catalog = Some(u64::from(record::le32(&vd, 71)));
                }
                VD_TERMINATOR => {
                    if !primary {
                        bail!("no primary volume descriptor before the terminator");
                    }
                    return Ok(());
                }
                _ => {}
            }
        }
        bail!("no volume descriptor set terminator in the first {MAX_VOLUME_DESCRIPTORS} sectors")
    }

    fn parse_primary(&mut self, vd: &[u8]) -> Result<()> {
        let block_size = u64::from(record::le16(vd, 128));
        if block_size != SECTOR_SIZE {
            bail!("unsupported logical block size {block_size} (only 2048 is supported)");
        }
        self.volume_id = String::from_utf8_lossy(&vd[40..72])
            .trim_end_matches([' ', '\0'])
            .to_string();
        let root = Record::parse(&vd[156..190]).context("corrupt root directory record")?;
        if !root.is_dir() {
            bail!("root directory record is not a directory");
        }
        self.root.size = root.data_len;
        self.root.extents = vec![root.extent()];
        Ok(())
    }

    /// SUSP is announced by an SP entry at the start of the root's `.` record; Rock Ridge
    /// by an ER entry naming RRIP, or by RRIP entries on that record.
    fn detect_rock_ridge(&mut self) -> Result<()> {
        let Some(first) = self.root.extents.first().copied() else {
            bail!("root directory has no extent");
        };
        if first.len == 0 {
            bail!("root directory is empty (no '.' record)");
        }
        let mut block = vec![0u8; SECTOR_SIZE.min(first.len) as usize];
        self.read_at(first.offset, &mut block, "root directory")?;
        let dot = Record::parse(&block).context("corrupt '.' record of the root directory")?;
        if dot.name != [0] {
            bail!("root directory does not start with a '.' record");
        }
        let susp = self.parse_susp(&block[dot.sua.clone()], 0)?;
        if let Some(skip) = susp.sp_skip {
            self.susp_skip = Some(skip);
            self.rock_ridge = susp.rrip;
        }
        Ok(())
    }

    fn name_matches(&self, name: &str, wanted: &str) -> bool {
        if self.rock_ridge {
            name == wanted
        } else {
            name.eq_ignore_ascii_case(record::strip_iso_name(wanted))
        }
    }

    /// Call `f` for each entry of a directory (not `.`/`..`), stopping when it breaks.
    fn scan_dir(
        &self,
        dir: &IsoEntry,
        mut f: impl FnMut(IsoEntry) -> ControlFlow<()>,
    ) -> Result<()> {
        let mut pending: Option<IsoEntry> = None;
        let mut block = vec![0u8; SECTOR_SIZE as usize];
        for ext in &dir.extents {
            let mut done = 0u64;
            while done < ext.len {
                let n = SECTOR_SIZE.min(ext.len - done) as usize;
                let block_offset = ext.offset + done;
                self.read_at(
                    block_offset,
                    &mut block[..n],
                    &format!("directory {}", dir.path),
                )?;
                done += n as u64;
                let mut pos = 0;
                // Records never cross a sector; a zero length byte pads to the next one.
                while pos < n && block[pos] != 0 {
                    let rec = Record::parse(&block[pos..n]).with_context(|| {
                        format!(
                            "corrupt directory record in {} at byte {}",
                            dir.path,
                            block_offset + pos as u64
                        )
                    })?;
                    let here = block_offset + pos as u64;
                    pos += rec.len;
                    if rec.name == [0] || rec.name == [1] {
                        continue;
                    }
                    let entry = self
                        .make_entry(dir, &rec, &block[pos - rec.len..pos])
                        .with_context(|| {
                            format!("reading directory record in {} at byte {here}", dir.path)
                        })?;
                    let Some(entry) = entry else { continue };
                    let entry = match pending.take() {
                        Some(mut p) => {
                            if p.name != entry.name || entry.is_dir {
                                bail!(
                                    "multi-extent file {} is interrupted by {} in {}",
                                    p.path,
                                    entry.name,
                                    dir.path
                                );
                            }
                            p.size += entry.size;
                            p.extents.extend(entry.extents);
                            p
                        }
                        None => entry,
                    };
                    if rec.is_multi_extent() {
                        pending = Some(entry);
                        continue;
                    }
                    if f(entry).is_break() {
                        return Ok(());
                    }
                }
            }
        }
        if let Some(p) = pending {
            bail!(
                "multi-extent file {} has no final extent in {}",
                p.path,
                dir.path
            );
        }
        Ok(())
    }

    /// Build the entry for one record; `None` for entries Rock Ridge relocated elsewhere.
    fn make_entry(&self, dir: &IsoEntry, rec: &Record, raw: &[u8]) -> Result<Option<IsoEntry>> {
        if rec.is_multi_extent() && rec.is_dir() {
            bail!("directory record with the multi-extent flag");
        }
        if rec.interleaved() {
            bail!("interleaved files are not supported");
        }
        let susp = match self.susp_skip {
            Some(skip) => self.parse_susp(&raw[rec.sua.clone()], skip)?,
            None => Susp::default(),
        };
        if susp.relocated {
            return Ok(None);
        }
        let name = match (&susp.name, self.rock_ridge) {
            (Some(nm), true) => String::from_utf8_lossy(nm).into_owned(),
            _ => record::strip_iso_name(&String::from_utf8_lossy(&rec.name)).to_string(),
        };
        if name.is_empty() || name.contains('/') {
            bail!("invalid file name {name:?}");
        }
        let path = if dir.path == "/" {
            format!("/{name}")
        } else {
            format!("{}/{name}", dir.path)
        };
        Ok(Some(IsoEntry {
            path,
            name,
            is_dir: rec.is_dir(),
            size: rec.data_len,
            mode: susp.mode,
            extents: vec![rec.extent()],
        }))
    }
}

/// Streams a file's extents with positioned reads.
struct ExtentReader<'a> {
    file: &'a File,
    path: String,
    extents: Vec<Extent>,
    index: usize,
    /// Position within `extents[index]`.
    pos: u64,
}

impl Read for ExtentReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while let Some(ext) = self.extents.get(self.index) {
            if self.pos >= ext.len {
                self.index += 1;
                self.pos = 0;
                continue;
            }
            let want = (ext.len - self.pos).min(buf.len() as u64) as usize;
            let n = self.file.read_at(&mut buf[..want], ext.offset + self.pos)?;
            if n == 0 && want > 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "truncated: image ends at byte {} inside {}",
                        ext.offset + self.pos,
                        self.path
                    ),
                ));
            }
            self.pos += n as u64;
            return Ok(n);
        }
        Ok(0)
    }
}
