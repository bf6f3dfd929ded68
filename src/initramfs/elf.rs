//! Just enough ELF64 parsing to tell whether `/init` needs a dynamic loader, and which
//! shared libraries to put next to it. A static-pie (our own binary) has no PT_INTERP.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
const DYN_LEN: usize = 16;
const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
/// The linker's `--build-id` note: a digest of the linked output.
const NT_GNU_BUILD_ID: u32 = 3;
const NOTE_OWNER_GNU: &[u8] = b"GNU\0";
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
/// Refuse absurd table sizes from a damaged file instead of allocating them.
const MAX_TABLE: u64 = 16 * 1024 * 1024;

/// Where the dynamic loader looks when there is no ld.so.cache (as in our initramfs).
pub const LIBRARY_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/lib",
    "/usr/lib",
];

struct ElfInfo {
    machine: u16,
    interp: Option<String>,
    needed: Vec<String>,
    build_id: Option<Vec<u8>>,
}

struct Phdr {
    p_type: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

fn u16le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64le(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn read_at(f: &mut File, offset: u64, len: u64) -> Result<Vec<u8>> {
    ensure!(
        len <= MAX_TABLE,
        "ELF table of {len} bytes is implausibly large"
    );
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf)
        .with_context(|| format!("reading {len} bytes at offset {offset}"))?;
    Ok(buf)
}

/// NUL-terminated string at `at` in `buf`.
fn c_str(buf: &[u8], at: u64) -> Result<String> {
    let rest = buf
        .get(at as usize..)
        .with_context(|| format!("string offset {at} is out of range"))?;
    let end = rest
        .iter()
        .position(|&b| b == 0)
        .context("unterminated string")?;
    String::from_utf8(rest[..end].to_vec()).context("non-UTF-8 string")
}

fn parse(path: &Path) -> Result<ElfInfo> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    parse_file(&mut f).with_context(|| format!("parsing ELF file {}", path.display()))
}

fn parse_file(f: &mut File) -> Result<ElfInfo> {
    let mut eh = [0u8; EHDR_LEN];
    f.read_exact(&mut eh)
        .context("file too short for an ELF header")?;
    ensure!(&eh[..4] == ELF_MAGIC, "not an ELF file");
    ensure!(eh[4] == ELFCLASS64, "not a 64-bit ELF file");
    ensure!(eh[5] == ELFDATA2LSB, "not a little-endian ELF file");
    let machine = u16le(&eh, 18);
    let phoff = u64le(&eh, 32);
    let phentsize = u16le(&eh, 54) as u64;
    let phnum = u16le(&eh, 56) as u64;
    ensure!(
        phnum == 0 || phentsize >= PHDR_LEN as u64,
        "program header entries of {phentsize} bytes are too small"
    );
    let table = read_at(f, phoff, phentsize * phnum).context("reading program headers")?;
    let phdrs: Vec<Phdr> = (0..phnum as usize)
        .map(|i| {
            let b = &table[i * phentsize as usize..];
            Phdr {
                p_type: u32le(b, 0),
                offset: u64le(b, 8),
                vaddr: u64le(b, 16),
                filesz: u64le(b, 32),
            }
        })
        .collect();

    let interp = match phdrs.iter().find(|p| p.p_type == PT_INTERP) {
        Some(p) => {
            let raw = read_at(f, p.offset, p.filesz).context("reading PT_INTERP")?;
            Some(c_str(&raw, 0).context("reading PT_INTERP")?)
        }
        None => None,
    };

    let mut needed = Vec::new();
    if let Some(dynamic) = phdrs.iter().find(|p| p.p_type == PT_DYNAMIC) {
        let raw = read_at(f, dynamic.offset, dynamic.filesz).context("reading PT_DYNAMIC")?;
        let (mut strtab, mut strsz, mut needed_offs) = (None, None, Vec::new());
        for ent in raw.chunks_exact(DYN_LEN) {
            let (tag, val) = (u64le(ent, 0), u64le(ent, 8));
            match tag {
                DT_NULL => break,
                DT_NEEDED => needed_offs.push(val),
                DT_STRTAB => strtab = Some(val),
                DT_STRSZ => strsz = Some(val),
                _ => {}
            }
        }
        if !needed_offs.is_empty() {
            let (addr, size) = strtab
                .zip(strsz)
                .context("dynamic section has DT_NEEDED but no string table")?;
            // DT_STRTAB is a virtual address: find the file offset through PT_LOAD.
            let seg = phdrs
                .iter()
                .find(|p| p.p_type == PT_LOAD && p.vaddr <= addr && addr < p.vaddr + p.filesz)
                .context("DT_STRTAB lies outside every PT_LOAD segment")?;
            let strings =
                read_at(f, addr - seg.vaddr + seg.offset, size).context("reading DT_STRTAB")?;
            for off in needed_offs {
                needed.push(c_str(&strings, off).context("reading DT_NEEDED name")?);
            }
        }
    }
    let mut build_id = None;
    for note in phdrs.iter().filter(|p| p.p_type == PT_NOTE) {
        let raw = read_at(f, note.offset, note.filesz).context("reading PT_NOTE")?;
        if let Some(id) = find_build_id(&raw) {
            build_id = Some(id.to_vec());
            break;
        }
    }
    Ok(ElfInfo {
        machine,
        interp,
        needed,
        build_id,
    })
}

/// The GNU build ID in a PT_NOTE segment's notes (each: name size, desc size, type,
/// then name and desc, both padded to 4 bytes).
fn find_build_id(notes: &[u8]) -> Option<&[u8]> {
    let pad = |n: usize| n.div_ceil(4) * 4;
    let mut at = 0;
    while at + 12 <= notes.len() {
        let namesz = u32le(notes, at) as usize;
        let descsz = u32le(notes, at + 4) as usize;
        let kind = u32le(notes, at + 8);
        let name = notes.get(at + 12..at + 12 + namesz)?;
        let desc_at = at + 12 + pad(namesz);
        let desc = notes.get(desc_at..desc_at + descsz)?;
        if kind == NT_GNU_BUILD_ID && name == NOTE_OWNER_GNU && !desc.is_empty() {
            return Some(desc);
        }
        at = desc_at + pad(descsz);
    }
    None
}

/// The linker's GNU build ID of an ELF file, if it has one.
pub fn build_id(path: impl AsRef<Path>) -> Result<Option<Vec<u8>>> {
    Ok(parse(path.as_ref())?.build_id)
}

/// For a dynamically linked ELF64 executable: its interpreter and `DT_NEEDED` libraries.
/// `None` for a static executable (a static-pie has a dynamic section but no PT_INTERP).
pub fn interpreter_and_needed(path: impl AsRef<Path>) -> Result<Option<(String, Vec<String>)>> {
    let info = parse(path.as_ref())?;
    Ok(info.interp.map(|i| (i, info.needed)))
}

/// Find `name` in [`LIBRARY_DIRS`], skipping files for another machine (e.g. i386 in /lib).
fn find_library(name: &str, machine: u16) -> Result<PathBuf> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    for dir in LIBRARY_DIRS {
        let cand = Path::new(dir).join(name);
        if !cand.is_file() {
            continue;
        }
        if parse(&cand).map(|i| i.machine == machine).unwrap_or(false) {
            return Ok(cand);
        }
    }
    bail!(
        "shared library {name} not found in {}",
        LIBRARY_DIRS.join(", ")
    )
}

/// Files a binary needs at run time besides itself: its interpreter and every shared
/// library it needs, recursively, at the paths where the loader will look for them.
/// Empty for a static binary.
pub fn runtime_files(binary: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    let binary = binary.as_ref();
    let info = parse(binary)?;
    let Some(interp) = info.interp else {
        return Ok(Vec::new());
    };
    let interp_path = PathBuf::from(&interp);
    ensure!(
        interp_path.is_file(),
        "{}: interpreter {interp} not found",
        binary.display()
    );
    let mut files = vec![interp_path.clone()];
    // The loader is already in memory under its soname; libc's DT_NEEDED on it is satisfied.
    let mut seen: HashSet<String> = interp_path
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .into_iter()
        .collect();
    let mut queue: Vec<String> = info.needed;
    let mut i = 0;
    while i < queue.len() {
        let name = queue[i].clone();
        i += 1;
        if !seen.insert(name.clone()) {
            continue;
        }
        let path = find_library(&name, info.machine)
            .with_context(|| format!("resolving libraries of {}", binary.display()))?;
        let lib = parse(&path)?;
        queue.extend(lib.needed);
        files.push(path);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_elf() {
        let dir = tempfile::TempDir::new().unwrap();
        let p = dir.path().join("script");
        std::fs::write(&p, "#!/bin/sh\necho hi\n".repeat(10)).unwrap();
        let err = interpreter_and_needed(&p).err().unwrap();
        assert!(format!("{err:#}").contains("not an ELF file"), "{err:#}");
    }

    /// The build ID as binutils' readelf reads it, from this very test binary and from a
    /// copy with the note removed by objcopy.
    #[test]
    fn build_id_matches_readelf() {
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new("readelf")
            .arg("-n")
            .arg(&exe)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let want = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Build ID: "))
            .expect("the linker wrote a build ID");
        assert_eq!(hex::encode(build_id(&exe).unwrap().unwrap()), want);

        let dir = tempfile::TempDir::new().unwrap();
        let stripped = dir.path().join("no-build-id");
        let status = std::process::Command::new("objcopy")
            .arg("--remove-section=.note.gnu.build-id")
            .arg(&exe)
            .arg(&stripped)
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(build_id(&stripped).unwrap(), None);
    }
}
