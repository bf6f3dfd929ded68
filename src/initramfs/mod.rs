//! Initramfs: newc cpio, reading the Talos initramfs, building our own.
//!
//! The appliance boots the Talos kernel with our `appliance.img`: a zstd-compressed newc
//! cpio holding `/init` (mkappliance itself, normally a static-pie), the kernel modules it
//! must load (taken from Talos's `rootfs.sqsh`, signed, unmodified) and the list of them
//! in load order. Everything is written in sorted order with fixed metadata, so the same
//! inputs give the same bytes.

pub mod cpio;
pub mod elf;
pub mod modules;
pub mod talos;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Cursor, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::layout;
pub use modules::{select_modules, Module, ModuleSet, APPLIANCE_MODULES};
pub use talos::{decompress, extract_rootfs_sqsh};

/// zstd level for `appliance.img`. Measured here with the 14 MB release static-pie
/// (publishing grew it) + Debian's cloud kernel modules, 16.8 MB of cpio in all, on the
/// build's second thread (BENCHMARKS.md):
///   level 1: 7.6 MB in 38 ms     level 2: 7.1 MB in 46 ms     level 3: 6.9 MB in 63 ms
/// Up to level 2 the thread finishes before the main one has hashed the rootfs, so it
/// costs the build nothing; level 3 made it wait ~18 ms. Under QEMU TCG the appliance was
/// ready 0.3 s later with level 1's image than with level 2's or 3's.
pub const DEFAULT_ZSTD_LEVEL: i32 = 2;

/// Directories every appliance initramfs has (mount points and where files go).
const BASE_DIRS: &[&str] = &["dev", "proc", "sys", "run", "sysroot", "etc", "lib"];
const DIR_MODE: u32 = 0o755;
const EXEC_MODE: u32 = 0o755;
const FILE_MODE: u32 = 0o644;
/// The kernel opens `/dev/console` for PID 1 before any devtmpfs exists, and std needs
/// fds 0-2 open: both nodes live in the cpio.
const DEV_CONSOLE: (&str, u32, u32, u32) = ("dev/console", 0o600, 5, 1);
const DEV_NULL: (&str, u32, u32, u32) = ("dev/null", 0o666, 1, 3);
/// Where modules go in the initramfs (the kernel's and kmod's usual place).
const MODULES_DIR: &str = "lib/modules";

pub struct InitramfsSpec<'a> {
    /// The binary to run as `/init`.
    pub init: &'a Path,
    pub modules: &'a ModuleSet,
    pub mtime: u32,
    pub zstd_level: i32,
}

enum Item<'a> {
    Dir,
    CharDev { mode: u32, major: u32, minor: u32 },
    HostFile { mode: u32, path: PathBuf },
    Bytes { mode: u32, data: &'a [u8] },
    Owned { mode: u32, data: Vec<u8> },
}

/// The archive's contents, sorted by path (a parent sorts before its children).
#[derive(Default)]
struct Plan<'a> {
    items: BTreeMap<String, Item<'a>>,
}

impl<'a> Plan<'a> {
    fn add_parents(&mut self, path: &str) {
        let mut idx = 0;
        while let Some(pos) = path[idx..].find('/') {
            self.items
                .entry(path[..idx + pos].to_string())
                .or_insert(Item::Dir);
            idx += pos + 1;
        }
    }

    fn add(&mut self, path: &str, item: Item<'a>) -> Result<()> {
        let path = path.trim_start_matches('/');
        self.add_parents(path);
        match (self.items.get(path), &item) {
            (None, _) | (Some(Item::Dir), Item::Dir) => {}
            _ => bail!("{path} would be added to the initramfs twice"),
        }
        self.items.insert(path.to_string(), item);
        Ok(())
    }
}

/// `etc/modules.order`: absolute paths inside the initramfs, dependencies first.
fn modules_order(set: &ModuleSet) -> String {
    set.modules
        .iter()
        .map(|m| format!("/{MODULES_DIR}/{}/{}\n", set.kver, m.rel_path))
        .collect()
}

fn plan<'a>(spec: &InitramfsSpec<'a>) -> Result<Plan<'a>> {
    let mut plan = Plan::default();
    for dir in BASE_DIRS {
        plan.add(dir, Item::Dir)?;
    }
    for (path, mode, major, minor) in [DEV_CONSOLE, DEV_NULL] {
        plan.add(path, Item::CharDev { mode, major, minor })?;
    }
    plan.add(
        layout::INITRD_INIT,
        Item::HostFile {
            mode: EXEC_MODE,
            path: spec.init.to_path_buf(),
        },
    )?;
    // A dynamic init needs its loader and libraries at the paths the loader looks in.
    let runtime = elf::runtime_files(spec.init)
        .with_context(|| format!("finding the run-time files of {}", spec.init.display()))?;
    for path in runtime {
        let name = path
            .to_str()
            .with_context(|| format!("non-UTF-8 library path {}", path.display()))?
            .to_string();
        plan.add(
            &name,
            Item::HostFile {
                mode: EXEC_MODE,
                path,
            },
        )?;
    }
    let set = spec.modules;
    plan.add(&format!("{MODULES_DIR}/{}", set.kver), Item::Dir)?;
    for m in &set.modules {
        plan.add(
            &format!("{MODULES_DIR}/{}/{}", set.kver, m.rel_path),
            Item::Bytes {
                mode: FILE_MODE,
                data: &m.data,
            },
        )?;
    }
    plan.add(
        layout::INITRD_MODULES_ORDER,
        Item::Owned {
            mode: FILE_MODE,
            data: modules_order(set).into_bytes(),
        },
    )?;
    Ok(plan)
}

/// Write `appliance.img`: a zstd-compressed (with checksum) newc cpio for the kernel.
pub fn write_appliance_initramfs(spec: &InitramfsSpec, out: impl Write) -> Result<()> {
    let plan = plan(spec)?;
    let mut enc = zstd::stream::write::Encoder::new(out, spec.zstd_level)
        .context("setting up zstd encoder")?;
    enc.include_checksum(true)
        .context("enabling zstd checksum")?;
    let mut w = cpio::Writer::new(BufWriter::with_capacity(256 * 1024, enc), spec.mtime);
    for (path, item) in &plan.items {
        match item {
            Item::Dir => w.add_dir(path, DIR_MODE)?,
            Item::CharDev { mode, major, minor } => w.add_char_dev(path, *mode, *major, *minor)?,
            Item::HostFile { mode, path: host } => {
                let mut f =
                    File::open(host).with_context(|| format!("opening {}", host.display()))?;
                let len = f
                    .metadata()
                    .with_context(|| format!("reading metadata of {}", host.display()))?
                    .len();
                w.add_file(path, *mode, len, &mut f)
                    .with_context(|| format!("adding {} as /{path}", host.display()))?;
            }
            Item::Bytes { mode, data } => {
                w.add_file(path, *mode, data.len() as u64, &mut Cursor::new(data))?
            }
            Item::Owned { mode, data } => {
                w.add_file(path, *mode, data.len() as u64, &mut Cursor::new(data))?
            }
        }
    }
    let buffered = w.finish().context("finishing initramfs cpio")?;
    let enc = buffered
        .into_inner()
        .map_err(|e| e.into_error())
        .context("flushing initramfs")?;
    let mut out = enc.finish().context("finishing zstd stream")?;
    out.flush().context("flushing initramfs")?;
    Ok(())
}

/// List a (possibly compressed) initramfs: (name, mode, size) of every entry, in order.
pub fn read_entries(r: impl Read) -> Result<Vec<(String, u32, u64)>> {
    let stream = talos::decompress_borrowed(r)?;
    let mut reader = cpio::Reader::new(stream);
    let mut entries = Vec::new();
    while let Some(e) = reader.next_entry().context("reading initramfs")? {
        entries.push((e.name.clone(), e.mode(), e.size()));
    }
    Ok(entries)
}
