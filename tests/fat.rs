//! The FAT32 ESP writer judged by real tools: `fsck.vfat`, `mdir` and `mcopy` (mtools),
//! plus the `fatfs`-based reader.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use mkappliance::disk::esp::{self, FatImage, FatParams, Slice};
use mkappliance::tree::{Content, FileTree, Kind, FILE_MODE};

mod common;
use common::noise;
use tempfile::TempDir;

const MIB: u64 = 1024 * 1024;
/// The partition starts 1 MiB into the image, like a GPT ESP.
const OFFSET: u64 = MIB;
/// 2025-12-17 01:02:03 UTC (`date -u -d '2025-12-17 01:02:03' +%s`).
const TIMESTAMP: i64 = 1_765_933_323;
const VOLUME_ID: u32 = 0x1234_ABCD;

fn params() -> FatParams {
    FatParams {
        volume_id: VOLUME_ID,
        label: "efi".into(),
        timestamp: TIMESTAMP,
    }
}

fn add(tree: &mut FileTree, path: &str, data: Vec<u8>) {
    tree.add_file(path, Content::bytes(data), FILE_MODE)
        .unwrap();
}

/// The real ESP's shape; the kernel is a 20 MB file on disk, streamed by the writer.
fn esp_tree(scratch: &Path) -> FileTree {
    let mut t = FileTree::new();
    add(&mut t, "EFI/BOOT/BOOTX64.EFI", noise(1, 123_456));
    add(
        &mut t,
        "loader/loader.conf",
        b"timeout 0\ndefault appliance.conf\neditor no\n".to_vec(),
    );
    add(
        &mut t,
        "loader/entries/appliance.conf",
        b"linux /vmlinuz\ninitrd /appliance.img\noptions console=tty0 console=ttyS0,115200\n"
            .to_vec(),
    );
    let kernel = scratch.join("vmlinuz");
    std::fs::write(&kernel, noise(2, 20_000_000)).unwrap();
    t.add_file("vmlinuz", Content::path(&kernel).unwrap(), FILE_MODE)
        .unwrap();
    add(&mut t, "appliance.img", noise(3, 1_500_001));
    t
}

const WORDS: [&str; 6] = [
    "Alpha",
    "beta",
    "GAMMA",
    "Delta Force",
    "eps.ilon",
    "Zeta-Jones",
];
const EXTS: [&str; 5] = ["txt", "Conf", "tar.gz", "EFI", "jpeg"];

/// The ESP plus everything that stresses names and directories.
fn big_tree(scratch: &Path) -> FileTree {
    let mut t = esp_tree(scratch);
    // 600 files in one directory: mostly long mixed-case names sharing prefixes, every
    // tenth a plain upper-case 8.3 name; sizes from 0 to a few clusters.
    for i in 0..600u64 {
        let name = if i % 10 == 0 {
            format!("F{i:04}.BIN")
        } else {
            format!(
                "{} Mixed-Case File {i:03}.{}",
                WORDS[i as usize % 6],
                EXTS[i as usize % 5]
            )
        };
        add(
            &mut t,
            &format!("Many Files/{name}"),
            noise(100 + i, (i as usize * 37) % 3000),
        );
    }
    add(&mut t, "a/B/c/D/e/deep file.bin", noise(4, 5000));
    add(&mut t, "a/B/sibling.TXT", noise(5, 10));
    t.add_dir("a/empty dir", 0o755).unwrap();
    add(&mut t, "empty.dat", Vec::new());
    add(&mut t, "one-cluster.bin", noise(6, 512));
    add(&mut t, "cluster-plus-one.bin", noise(7, 513));
    add(&mut t, "Ünïcödé naïve.txt", b"unicode\n".to_vec());
    add(&mut t, "UPPER.TXT", b"upper\n".to_vec());
    add(&mut t, "lower.txt", b"lower\n".to_vec());
    add(&mut t, ".hidden", b"dot\n".to_vec());
    add(&mut t, "x", b"x".to_vec());
    t
}

/// (path, is_dir, size) of every entry of the tree (the inputs, not the image).
fn expected(tree: &FileTree) -> Vec<(String, bool, u64)> {
    let mut v: Vec<_> = tree
        .iter()
        .map(|(p, e)| match &e.kind {
            Kind::Dir => (p.to_string(), true, 0),
            Kind::File(c) => (p.to_string(), false, c.len()),
            Kind::Symlink(_) => panic!("no symlinks on FAT"),
        })
        .collect();
    v.sort();
    v
}

struct Image {
    _dir: TempDir,
    path: PathBuf,
    size: u64,
}

impl Image {
    fn spec(&self) -> String {
        format!("{}@@{OFFSET}", self.path.display())
    }
}

/// An image with 1 MiB before and after the partition, the partition written by us.
fn write_image(tree: &FileTree, size: u64, params: &FatParams) -> anyhow::Result<Image> {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("disk.img");
    let f = File::create(&path).unwrap();
    f.set_len(OFFSET + size + MIB).unwrap();
    esp::write(&f, OFFSET, size, tree, params)?;
    Ok(Image {
        _dir: dir,
        path,
        size,
    })
}

fn partition_bytes(img: &Image, at: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    File::open(&img.path)
        .unwrap()
        .read_exact_at(&mut buf, OFFSET + at)
        .unwrap();
    buf
}

/// Run `fsck.vfat -n` on a (sparse) copy of the partition; it must exit 0 and print
/// nothing but its banner, pass names and the summary. Returns (used, total) clusters.
fn fsck(img: &Image) -> (u64, u64) {
    let copy = img.path.with_extension("part");
    let mut src = File::open(&img.path).unwrap();
    let mut dst = File::create(&copy).unwrap();
    dst.set_len(img.size).unwrap();
    src.seek(SeekFrom::Start(OFFSET)).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut done = 0;
    while done < img.size {
        src.read_exact(&mut buf).unwrap();
        if buf.iter().any(|&b| b != 0) {
            dst.write_all_at(&buf, done).unwrap();
        }
        done += MIB;
    }
    dst.flush().unwrap();
    let out = Command::new("fsck.vfat")
        .args(["-n", "-V", "-S", "-U"])
        .arg(&copy)
        .output()
        .expect("running fsck.vfat");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    std::fs::remove_file(&copy).unwrap();
    assert!(
        out.status.success(),
        "fsck.vfat failed:\n{stdout}\n{stderr}"
    );
    let mut summary = None;
    for line in stdout.lines().chain(stderr.lines()) {
        if line.starts_with("fsck.fat ")
            || line == "Starting check/repair pass."
            || line == "Starting verification pass."
        {
            continue;
        }
        let rest = line
            .strip_prefix(&format!("{}: ", copy.display()))
            .unwrap_or_else(|| panic!("fsck.vfat complained: {line:?}\n{stdout}"));
        // "N files, USED/TOTAL clusters"
        let clusters = rest
            .split(", ")
            .nth(1)
            .unwrap()
            .trim_end_matches(" clusters");
        let (used, total) = clusters.split_once('/').unwrap();
        summary = Some((used.parse().unwrap(), total.parse().unwrap()));
    }
    summary.expect("fsck.vfat summary line")
}

fn mtools(tool: &str) -> Command {
    let mut c = Command::new(tool);
    // mtools converts long names to the locale's charset and dates to local time.
    c.env("LC_ALL", "C.UTF-8").env("TZ", "UTC");
    c
}

struct Mdir {
    label: String,
    serial: String,
    /// path -> (is_dir, size, "YYYY-MM-DD HH:MM")
    entries: BTreeMap<String, (bool, u64, String)>,
    free: u64,
}

/// Parse `mdir -/` (recursive) output.
fn mdir(img: &Image) -> Mdir {
    let out = mtools("mdir")
        .args(["-/", "-i", &img.spec(), "::"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "mdir failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "mdir warned: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut m = Mdir {
        label: String::new(),
        serial: String::new(),
        entries: BTreeMap::new(),
        free: 0,
    };
    let mut dir = String::new();
    for line in text.lines() {
        if let Some(l) = line.strip_prefix(" Volume in drive : is ") {
            m.label = l.trim_end().to_string();
        } else if let Some(s) = line.strip_prefix(" Volume Serial Number is ") {
            m.serial = s.to_string();
        } else if let Some(d) = line.strip_prefix("Directory for ::/") {
            dir = d.to_string();
        } else if let Some(free) = line.trim().strip_suffix(" bytes free") {
            m.free = free.replace(' ', "").parse().unwrap();
        } else if line.is_empty() || line.starts_with(' ') || line == "Total files listed:" {
            // blank lines and per-directory totals
        } else {
            // "NAME     EXT       size YYYY-MM-DD  H:MM  long name"
            let (short, rest) = line.split_at(12);
            let mut tokens = rest.split_whitespace();
            let size = tokens.next().unwrap();
            let date = tokens
                .next()
                .unwrap_or_else(|| panic!("odd mdir line {line:?}"));
            let time = tokens.next().unwrap();
            let date_end = rest.find(date).unwrap() + date.len();
            let time_end = date_end + rest[date_end..].find(time).unwrap() + time.len();
            let after_time = &rest[time_end..];
            let long = after_time.trim_start();
            let name = if long.is_empty() {
                let (b, e) = short.split_at(8);
                let (b, e) = (b.trim(), e.trim());
                if e.is_empty() {
                    b.to_string()
                } else {
                    format!("{b}.{e}")
                }
            } else {
                long.to_string()
            };
            if name == "." || name == ".." {
                continue;
            }
            let path = if dir.is_empty() {
                name
            } else {
                format!("{dir}/{name}")
            };
            let entry = if size == "<DIR>" {
                (true, 0, format!("{date} {time}"))
            } else {
                (false, size.parse().unwrap(), format!("{date} {time}"))
            };
            m.entries.insert(path, entry);
        }
    }
    m
}

/// Everything `mcopy -s` extracts, as path -> content (None for directories).
fn mcopy_all(img: &Image) -> BTreeMap<String, Option<Vec<u8>>> {
    let dest = TempDir::new().unwrap();
    let out = mtools("mcopy")
        .args(["-s", "-m", "-i", &img.spec(), "::/*"])
        .arg(dest.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mcopy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut found = BTreeMap::new();
    fn walk(base: &Path, dir: &Path, found: &mut BTreeMap<String, Option<Vec<u8>>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(base).unwrap().to_str().unwrap().to_string();
            if p.is_dir() {
                found.insert(rel, None);
                walk(base, &p, found);
            } else {
                // mcopy -m sets the file time from the entry: check the FAT date/time
                // encoding (2-second resolution, so 01:02:03 reads back as 01:02:02).
                let mtime = std::fs::metadata(&p).unwrap().mtime();
                assert_eq!(mtime, TIMESTAMP - 1, "{rel}");
                found.insert(rel, Some(std::fs::read(&p).unwrap()));
            }
        }
    }
    walk(dest.path(), dest.path(), &mut found);
    found
}

fn content_of(tree: &FileTree, path: &str) -> Vec<u8> {
    match &tree.get(path).unwrap().kind {
        Kind::File(c) => c.read_all().unwrap(),
        _ => panic!("{path} is not a file"),
    }
}

/// Every check by every judge.
fn check_everything(tree: &FileTree, img: &Image) {
    let want = expected(tree);

    // Boot sector, read raw: the spec's fixed fields and the backup copy at sector 6.
    let boot = partition_bytes(img, 0, 512);
    assert_eq!(&boot[510..], &[0x55, 0xAA]);
    assert_eq!(
        u16::from_le_bytes([boot[11], boot[12]]),
        512,
        "bytes per sector"
    );
    assert_eq!(
        u16::from_le_bytes([boot[14], boot[15]]),
        32,
        "reserved sectors"
    );
    assert_eq!(boot[16], 2, "FATs");
    assert_eq!(boot[21], 0xF8, "media");
    assert_eq!(
        u32::from_le_bytes(boot[44..48].try_into().unwrap()),
        2,
        "root cluster"
    );
    assert_eq!(u16::from_le_bytes([boot[48], boot[49]]), 1, "FSInfo sector");
    assert_eq!(
        u16::from_le_bytes([boot[50], boot[51]]),
        6,
        "backup boot sector"
    );
    assert_eq!(
        u32::from_le_bytes(boot[32..36].try_into().unwrap()) as u64 * 512,
        img.size
    );
    assert_eq!(&boot[82..90], b"FAT32   ");
    assert_eq!(
        partition_bytes(img, 6 * 512, 512),
        boot,
        "backup boot sector differs"
    );
    let info = partition_bytes(img, 512, 512);
    assert_eq!(&info[0..4], b"RRaA");
    assert_eq!(&info[484..488], b"rrAa");

    // Nothing outside the partition was touched.
    let mut before = vec![0u8; OFFSET as usize];
    let mut after = vec![0u8; MIB as usize];
    let f = File::open(&img.path).unwrap();
    f.read_exact_at(&mut before, 0).unwrap();
    f.read_exact_at(&mut after, OFFSET + img.size).unwrap();
    assert!(
        before.iter().chain(&after).all(|&b| b == 0),
        "wrote outside the partition"
    );

    // fsck.vfat: clean, and its used-cluster count covers every file's clusters.
    let cluster = u64::from(boot[13]) * 512;
    let (used, total) = fsck(img);
    let data_clusters: u64 = want.iter().map(|e| e.2.div_ceil(cluster)).sum();
    assert!(
        used > data_clusters && used < data_clusters + 2000,
        "{used} clusters used"
    );

    // mdir: every name (long names exactly), size, and the timestamp; label and serial.
    let m = mdir(img);
    assert_eq!(m.label, "EFI");
    assert_eq!(m.serial, "1234-ABCD");
    let listed: Vec<_> = m
        .entries
        .iter()
        .map(|(p, e)| (p.clone(), e.0, e.1))
        .collect();
    assert_eq!(listed, want);
    assert!(
        m.entries.values().all(|e| e.2 == "2025-12-17 1:02"),
        "FAT timestamps"
    );
    assert_eq!(m.free, (total - used) * cluster, "free space");

    // mcopy: every file's bytes, under its exact long name.
    let copied = mcopy_all(img);
    assert_eq!(copied.len(), want.len());
    for (path, is_dir, _) in &want {
        let got = copied
            .get(path)
            .unwrap_or_else(|| panic!("mcopy lost {path}"));
        if *is_dir {
            assert!(got.is_none(), "{path} should be a directory");
        } else {
            assert!(
                got.as_ref() == Some(&content_of(tree, path)),
                "{path} differs"
            );
        }
    }

    // Our own reader, through a slice of the image.
    let dev = Slice::new(File::open(&img.path).unwrap(), OFFSET, img.size).unwrap();
    let fat = FatImage::open(dev).unwrap();
    assert_eq!(fat.label(), "EFI");
    assert_eq!(fat.volume_id(), VOLUME_ID);
    assert_eq!(fat.list().unwrap(), want);
    for (path, is_dir, _) in &want {
        if !is_dir {
            assert!(
                fat.read(path).unwrap().unwrap() == content_of(tree, path),
                "{path}"
            );
        }
    }
    assert_eq!(
        fat.read("efi/boot/bootx64.efi").unwrap().unwrap(),
        content_of(tree, "EFI/BOOT/BOOTX64.EFI")
    );
    assert_eq!(
        fat.read("LOADER/ENTRIES/APPLIANCE.CONF").unwrap().unwrap(),
        content_of(tree, "loader/entries/appliance.conf")
    );
    assert!(fat.read("no/such/file").unwrap().is_none());
}

#[test]
fn esp_at_min_size_passes_every_judge() {
    let scratch = TempDir::new().unwrap();
    let tree = esp_tree(scratch.path());
    let size = esp::min_size(&tree, 0);
    assert_eq!(size % MIB, 0);
    let img = write_image(&tree, size, &params()).unwrap();
    check_everything(&tree, &img);

    // Sparse: only the payload and a little metadata take disk space.
    let allocated = std::fs::metadata(&img.path).unwrap().blocks() * 512;
    assert!(
        allocated <= tree.payload_bytes() + 2 * MIB,
        "{allocated} bytes allocated for {} bytes of files",
        tree.payload_bytes()
    );
}

#[test]
fn many_long_names_nested_dirs_and_edge_sizes() {
    let scratch = TempDir::new().unwrap();
    let tree = big_tree(scratch.path());
    let img = write_image(&tree, 64 * MIB, &params()).unwrap();
    assert_eq!(
        partition_bytes(&img, 13, 1),
        [1],
        "64 MiB: 512-byte clusters"
    );
    check_everything(&tree, &img);
}

#[test]
fn big_volume_uses_bigger_clusters() {
    let scratch = TempDir::new().unwrap();
    let tree = big_tree(scratch.path());
    let img = write_image(&tree, 300 * MIB, &params()).unwrap();
    assert_eq!(partition_bytes(&img, 13, 1), [8], "300 MiB: 4 KiB clusters");
    check_everything(&tree, &img);
}

#[test]
fn reproducible_and_volume_id_matters() {
    let scratch = TempDir::new().unwrap();
    let tree = big_tree(scratch.path());
    let a = write_image(&tree, 64 * MIB, &params()).unwrap();
    let b = write_image(&tree, 64 * MIB, &params()).unwrap();
    let other = FatParams {
        volume_id: 0xCAFE_F00D,
        ..params()
    };
    let c = write_image(&tree, 64 * MIB, &other).unwrap();
    let read = |i: &Image| std::fs::read(&i.path).unwrap();
    let (a, b, c) = (read(&a), read(&b), read(&c));
    assert!(a == b, "two writes of the same tree differ");
    assert!(a != c, "the volume id does not change the image");
    let offs = OFFSET as usize + 67;
    assert_eq!(&c[offs..offs + 4], &0xCAFE_F00Du32.to_le_bytes());
}

#[test]
fn min_size_is_minimal_and_free_space_is_honoured() {
    let scratch = TempDir::new().unwrap();
    let mut tree = esp_tree(scratch.path());
    // Past FAT32's ~33 MiB minimum, so the tree itself decides the size.
    add(&mut tree, "more/padding.bin", noise(9, 40_000_000));
    let size = esp::min_size(&tree, 0);
    assert_eq!(size % MIB, 0);
    let img = write_image(&tree, size, &params()).unwrap();
    fsck(&img);
    let err = write_image(&tree, size - MIB, &params())
        .err()
        .expect("1 MiB less should not fit");
    let msg = format!("{err:#}");
    assert!(msg.contains("need"), "unclear error: {msg}");

    let free = 10 * MIB;
    let bigger = esp::min_size(&tree, free);
    assert!(bigger > size);
    let img = write_image(&tree, bigger, &params()).unwrap();
    fsck(&img);
    assert!(mdir(&img).free >= free);
}

#[test]
fn too_small_fails_clearly() {
    let scratch = TempDir::new().unwrap();
    let tree = esp_tree(scratch.path());
    let err = write_image(&tree, 16 * MIB, &params()).err().unwrap();
    assert!(
        format!("{err:#}").contains("too small for a FAT32"),
        "{err:#}"
    );
    let mut big = tree.clone();
    add(&mut big, "huge.bin", vec![1u8; 30_000_000]);
    let err = write_image(&big, 40 * MIB, &params()).err().unwrap();
    assert!(format!("{err:#}").contains("need"), "{err:#}");
}

#[test]
fn rejects_what_fat_cannot_hold() {
    let tiny = |f: &dyn Fn(&mut FileTree)| {
        let mut t = FileTree::new();
        f(&mut t);
        write_image(&t, 40 * MIB, &params())
            .err()
            .map(|e| format!("{e:#}"))
    };
    let e = tiny(&|t| t.add_symlink("link", "target").unwrap()).unwrap();
    assert!(e.contains("symlink"), "{e}");
    let e = tiny(&|t| {
        add(t, "dir/Readme.txt", vec![1]);
        add(t, "dir/README.TXT", vec![2]);
    })
    .unwrap();
    assert!(e.contains("case"), "{e}");
    let e = tiny(&|t| add(t, "a:b", vec![1])).unwrap();
    assert!(e.contains("not allowed"), "{e}");
    let e = tiny(&|t| add(t, "trailing.", vec![1])).unwrap();
    assert!(e.contains("end with"), "{e}");
    // A file on disk that changed after the tree recorded its length.
    let scratch = TempDir::new().unwrap();
    let host = scratch.path().join("shrinks");
    std::fs::write(&host, vec![5u8; 10_000]).unwrap();
    let content = Content::path(&host).unwrap();
    std::fs::write(&host, vec![5u8; 100]).unwrap();
    let e = tiny(&|t| t.add_file("shrinks", content.clone(), FILE_MODE).unwrap()).unwrap();
    assert!(e.contains("shrinks") && e.contains("shrink?"), "{e}");
    std::fs::write(&host, vec![5u8; 20_000]).unwrap();
    let e = tiny(&|t| t.add_file("grows", content.clone(), FILE_MODE).unwrap()).unwrap();
    assert!(e.contains("grew"), "{e}");

    let mut params = params();
    params.label = "much too long".into();
    assert!(write_image(&FileTree::new(), 40 * MIB, &params).is_err());
}

#[test]
fn empty_tree_and_no_label() {
    let img = write_image(
        &FileTree::new(),
        40 * MIB,
        &FatParams {
            volume_id: 1,
            label: String::new(),
            timestamp: 0,
        },
    )
    .unwrap();
    fsck(&img);
    let boot = partition_bytes(&img, 0, 512);
    assert_eq!(&boot[71..82], b"NO NAME    ");
    let dev = Slice::new(File::open(&img.path).unwrap(), OFFSET, img.size).unwrap();
    let fat = FatImage::open(dev).unwrap();
    assert_eq!(fat.label(), "");
    assert!(fat.list().unwrap().is_empty());
}
