//! Writing and hashing the disk, with `appliance.img` built on a second thread.
//!
//! The image's SHA-256 is the longest single step (one core, ~2 GB/s) and can only run
//! front to back, while building `appliance.img` (decompressing the whole Talos initramfs
//! for its modules, then zstd) is the next longest and is needed only for the ESP. So the
//! rootfs comes first on the disk and the ESP last: this thread writes the GPT and the
//! rootfs and hashes them while the other builds `appliance.img` and writes the ESP into
//! room reserved for it. If `appliance.img` outgrows the reservation, the ESP is resized
//! and the whole image hashed again: slower, same bytes as a fresh layout of that size.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::disk::{esp, gpt, rootfs};
use crate::layout::{self, ALIGN, SECTOR};
use crate::tree::{Content, FileTree, FILE_MODE};
use crate::util;

/// Spare room in the ESP beyond its files (kernel updates, firmware scratch).
pub const ESP_HEADROOM: u64 = 4 << 20;
/// Spare room in the rootfs for the appliance's state (a few bytes) and its event log
/// (~100 bytes a line, a few dozen lines per install): years of use. Every spare byte is
/// also hashed on each build, at ~0.5 ms per MiB.
pub const ROOT_HEADROOM: u64 = 8 << 20;
const ROOT_SPARE_INODES: u32 = 1024;
/// Read size when hashing the image back.
const HASH_CHUNK: usize = 1 << 20;

/// Everything the image holds, except `appliance.img`, which `write` gets from its
/// second thread.
pub struct Parts {
    pub root: FileTree,
    pub ext4: rootfs::Ext4Params,
    /// The ESP's files without `appliance.img`.
    pub esp: FileTree,
    pub fat: esp::FatParams,
    /// Bytes held in the ESP for `appliance.img` before it exists.
    pub esp_reserve: u64,
    pub disk_guid: gpt::Guid,
    pub esp_guid: gpt::Guid,
    pub root_guid: gpt::Guid,
}

pub struct Written {
    pub total: u64,
    pub sha256: String,
}

/// Where things go: 1 MiB for the GPT, the rootfs, the ESP, 1 MiB for the backup GPT.
#[derive(Clone, Copy)]
struct Geometry {
    root_size: u64,
    esp_off: u64,
    esp_size: u64,
    total: u64,
}

impl Geometry {
    fn new(root_size: u64, esp_size: u64) -> Geometry {
        let esp_off = ALIGN + root_size;
        Geometry {
            root_size,
            esp_off,
            esp_size,
            total: esp_off + esp_size + ALIGN,
        }
    }

    fn table(&self, p: &Parts) -> Result<gpt::Table> {
        // Entry 1 is the ESP and entry 2 the root, as DESIGN.md numbers them, whatever
        // their order on the disk.
        Ok(gpt::Table {
            disk_guid: p.disk_guid,
            partitions: vec![
                gpt::Partition {
                    number: 1,
                    type_guid: gpt::Guid::parse(layout::ESP_TYPE_GUID)?,
                    unique_guid: p.esp_guid,
                    first_lba: self.esp_off / SECTOR,
                    last_lba: (self.esp_off + self.esp_size) / SECTOR - 1,
                    name: layout::ESP_PART_NAME.into(),
                },
                gpt::Partition {
                    number: 2,
                    type_guid: gpt::Guid::parse(layout::ROOT_TYPE_GUID)?,
                    unique_guid: p.root_guid,
                    first_lba: ALIGN / SECTOR,
                    last_lba: (ALIGN + self.root_size) / SECTOR - 1,
                    name: layout::ROOT_PART_NAME.into(),
                },
            ],
        })
    }

    /// Size `file` (all holes) and write both GPTs.
    fn start(&self, file: &File, p: &Parts) -> Result<()> {
        file.set_len(self.total)
            .with_context(|| format!("sizing the image to {} bytes", self.total))?;
        gpt::write(file, self.total, &self.table(p)?)
    }
}

fn esp_size(tree: &FileTree, free_bytes: u64) -> u64 {
    util::round_up(esp::min_size(tree, free_bytes), ALIGN)
}

/// Write the image into `file` (empty) and hash it. `initramfs` runs on a second thread
/// and returns `appliance.img` with a value handed back to the caller.
pub fn write<T: Send>(
    file: &File,
    parts: &Parts,
    initramfs: impl FnOnce() -> Result<(Vec<u8>, T)> + Send,
    lap: &dyn Fn(&str),
) -> Result<(Written, T)> {
    let root_size = util::round_up(
        rootfs::min_size(&parts.root, ROOT_HEADROOM, ROOT_SPARE_INODES),
        ALIGN,
    );
    let geo = Geometry::new(root_size, esp_size(&parts.esp, parts.esp_reserve));
    geo.start(file, parts)?;

    std::thread::scope(|s| {
        // The ESP's tree comes back only when it did not fit and is not written yet.
        let worker = s.spawn(|| -> Result<(Option<FileTree>, T)> {
            let (img, extra) = initramfs()?;
            let mut tree = parts.esp.clone();
            tree.add_file(layout::ESP_INITRAMFS, Content::bytes(img), FILE_MODE)?;
            if esp::min_size(&tree, ESP_HEADROOM) > geo.esp_size {
                return Ok((Some(tree), extra));
            }
            esp::write(file, geo.esp_off, geo.esp_size, &tree, &parts.fat)
                .context("writing the ESP")?;
            Ok((None, extra))
        });

        lap("writing the rootfs");
        rootfs::write(file, ALIGN, geo.root_size, &parts.root, &parts.ext4)
            .context("writing the rootfs")?;
        lap("hashing the GPT and the rootfs");
        let mut h = Sha256::new();
        hash_region(file, &mut h, 0, geo.esp_off)?;
        lap("waiting for the ESP");
        let (unwritten, extra) = worker
            .join()
            .map_err(|_| anyhow::anyhow!("the appliance initramfs thread panicked"))??;
        let (mut geo, mut hashed) = (geo, geo.esp_off);
        if let Some(tree) = unwritten {
            lap("resizing the ESP");
            geo = Geometry::new(geo.root_size, esp_size(&tree, ESP_HEADROOM));
            // Cut off the old ESP and backup GPT so the new ESP's range reads as zeros.
            file.set_len(geo.esp_off)
                .context("truncating the image to resize the ESP")?;
            geo.start(file, parts)?;
            esp::write(file, geo.esp_off, geo.esp_size, &tree, &parts.fat)
                .context("writing the ESP")?;
            // The primary GPT changed: start over.
            h = Sha256::new();
            hashed = 0;
        }
        lap("hashing the ESP");
        hash_region(file, &mut h, hashed, geo.total)?;
        let written = Written {
            total: geo.total,
            sha256: hex::encode(h.finalize()),
        };
        Ok((written, extra))
    })
}

/// The next data (`SEEK_DATA`) or hole (`SEEK_HOLE`) at or after `pos`, capped at `end`
/// (also where there is none).
fn seek(file: &File, pos: u64, whence: libc::c_int, end: u64) -> u64 {
    // SAFETY: lseek on a valid fd; this module reads with positioned I/O only.
    let at = unsafe { libc::lseek(file.as_raw_fd(), pos as libc::off_t, whence) };
    if at < 0 {
        end
    } else {
        (at as u64).min(end)
    }
}

/// Feed `[start, end)` of `file` into `h`, reading only data (holes hash as zeros).
pub fn hash_region(file: &File, h: &mut Sha256, start: u64, end: u64) -> Result<()> {
    let zeros = vec![0u8; HASH_CHUNK];
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut pos = start;
    while pos < end {
        let data = seek(file, pos, libc::SEEK_DATA, end);
        while pos < data {
            let n = ((data - pos) as usize).min(HASH_CHUNK);
            h.update(&zeros[..n]);
            pos += n as u64;
        }
        if pos >= end {
            break;
        }
        let hole = seek(file, pos, libc::SEEK_HOLE, end);
        while pos < hole {
            let n = ((hole - pos) as usize).min(HASH_CHUNK);
            file.read_exact_at(&mut buf[..n], pos)
                .context("reading the image back to hash it")?;
            h.update(&buf[..n]);
            pos += n as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn run(cmd: &mut Command) -> String {
        let out = cmd.output().expect("running a checker");
        assert!(out.status.success(), "{cmd:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn parts(esp_reserve: u64) -> Parts {
        let mut root = FileTree::new();
        root.add_file(
            "srv/http/big",
            Content::bytes(util::noise(1, 3 << 20)),
            FILE_MODE,
        )
        .unwrap();
        let mut esp = FileTree::new();
        esp.add_file(
            layout::ESP_KERNEL,
            Content::bytes(util::noise(2, 1 << 20)),
            FILE_MODE,
        )
        .unwrap();
        let guid = |n: u8| gpt::Guid::from_hash(&[n; 16]);
        Parts {
            root,
            ext4: rootfs::Ext4Params {
                uuid: [7; 16],
                hash_seed: [8; 16],
                timestamp: 1_700_000_000,
                label: "test".into(),
            },
            esp,
            fat: esp::FatParams {
                volume_id: 0x1234_5678,
                label: "EFI".into(),
                timestamp: 1_700_000_000,
            },
            esp_reserve,
            disk_guid: guid(1),
            esp_guid: guid(2),
            root_guid: guid(3),
        }
    }

    /// (start, size) in bytes of partition `n`, as sgdisk reads it.
    fn sgdisk_part(image: &std::path::Path, n: u32) -> (u64, u64) {
        let info = run(Command::new("sgdisk")
            .arg("-i")
            .arg(n.to_string())
            .arg(image));
        let sector = |key: &str| -> u64 {
            let line = info.lines().find(|l| l.starts_with(key)).unwrap();
            line[key.len()..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let first = sector("First sector:");
        let last = sector("Last sector:");
        (first * 512, (last + 1 - first) * 512)
    }

    /// Build with an `appliance.img` of `img_len` bytes; check the result with real tools
    /// and return the ESP's size and whether the build had to resize it.
    fn build_and_check(img_len: usize, reserve: u64) -> (u64, bool) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let img = util::noise(3, img_len);
        let want_img = img.clone();
        let steps = std::cell::RefCell::new(Vec::new());
        let lap = |m: &str| steps.borrow_mut().push(m.to_string());
        let (written, extra) = write(&file, &parts(reserve), || Ok((img, 42u32)), &lap).unwrap();
        drop(file);
        assert_eq!(extra, 42);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), written.total);
        let sum = run(Command::new("sha256sum").arg(&path));
        assert_eq!(sum.split_whitespace().next(), Some(written.sha256.as_str()));
        assert!(run(Command::new("sgdisk").arg("-v").arg(&path)).contains("No problems found"));

        let (esp_off, esp_len) = sgdisk_part(&path, 1);
        let (root_off, root_len) = sgdisk_part(&path, 2);
        assert_eq!(root_off, ALIGN, "the rootfs comes first");
        assert_eq!(esp_off, root_off + root_len, "the ESP follows the rootfs");
        assert_eq!(esp_off + esp_len + ALIGN, written.total);

        let bytes = std::fs::read(&path).unwrap();
        let esp_img = dir.path().join("esp.img");
        std::fs::write(
            &esp_img,
            &bytes[esp_off as usize..(esp_off + esp_len) as usize],
        )
        .unwrap();
        run(Command::new("fsck.vfat").arg("-n").arg(&esp_img));
        let got = dir.path().join("got.img");
        run(Command::new("mcopy")
            .arg("-n")
            .arg("-i")
            .arg(&esp_img)
            .arg("::/appliance.img")
            .arg(&got)
            .env("MTOOLS_SKIP_CHECK", "1"));
        assert!(
            std::fs::read(&got).unwrap() == want_img,
            "appliance.img differs"
        );
        let root_img = dir.path().join("root.img");
        std::fs::write(
            &root_img,
            &bytes[root_off as usize..(root_off + root_len) as usize],
        )
        .unwrap();
        run(Command::new("e2fsck").arg("-fn").arg(&root_img));
        let resized = steps.borrow().iter().any(|m| m == "resizing the ESP");
        (esp_len, resized)
    }

    #[test]
    fn appliance_img_within_the_reservation() {
        let (esp_len, resized) = build_and_check(2 << 20, 8 << 20);
        assert!(
            !resized,
            "2 MiB fit 8 MiB of reservation: the ESP was written once"
        );
        // FAT32's smallest volume is ~33 MiB; nothing here needs more.
        assert!(esp_len <= 40 << 20, "{esp_len}");
    }

    #[test]
    fn appliance_img_outgrowing_the_reservation_resizes_the_esp() {
        // 48 MiB cannot fit an ESP sized for 1 MiB of reservation (FAT32's minimum).
        let (esp_len, resized) = build_and_check(48 << 20, 1 << 20);
        assert!(resized);
        assert!(esp_len >= (48 << 20) + ESP_HEADROOM, "{esp_len}");
    }
}
