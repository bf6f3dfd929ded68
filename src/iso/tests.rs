//! Unit tests: hand-built images exercise each SUSP feature and each corruption check;
//! a small xorriso image is mutated at random to show that bad input never panics.

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use super::record::strip_iso_name;
use super::*;

const SS: usize = SECTOR_SIZE as usize;

fn both16(v: u16) -> Vec<u8> {
    [v.to_le_bytes(), v.to_be_bytes()].concat()
}

fn both32(v: u32) -> Vec<u8> {
    [v.to_le_bytes(), v.to_be_bytes()].concat()
}

/// A directory record as ECMA-119 9.1 lays it out.
fn record(block: u32, len: u32, flags: u8, name: &[u8], sua: &[u8]) -> Vec<u8> {
    let mut r = vec![0u8; 33];
    r[2..10].copy_from_slice(&both32(block));
    r[10..18].copy_from_slice(&both32(len));
    r[25] = flags;
    r[28..32].copy_from_slice(&both16(1));
    r[32] = name.len() as u8;
    r.extend_from_slice(name);
    if name.len().is_multiple_of(2) {
        r.push(0);
    }
    r.extend_from_slice(sua);
    if r.len() % 2 == 1 {
        r.push(0);
    }
    r[0] = r.len() as u8;
    r
}

fn sp(skip: u8) -> Vec<u8> {
    vec![b'S', b'P', 7, 1, 0xBE, 0xEF, skip]
}

fn er_rrip() -> Vec<u8> {
    let id = b"RRIP_1991A";
    let mut e = vec![b'E', b'R', 0, 1, id.len() as u8, 0, 0, 1];
    e.extend_from_slice(id);
    e[2] = e.len() as u8;
    e
}

fn nm(flags: u8, name: &[u8]) -> Vec<u8> {
    let mut e = vec![b'N', b'M', 5 + name.len() as u8, 1, flags];
    e.extend_from_slice(name);
    e
}

fn px(mode: u32) -> Vec<u8> {
    let mut e = vec![b'P', b'X', 36, 1];
    for v in [mode, 1, 0, 0] {
        e.extend_from_slice(&both32(v));
    }
    e
}

fn ce(block: u32, offset: u32, len: u32) -> Vec<u8> {
    let mut e = vec![b'C', b'E', 28, 1];
    for v in [block, offset, len] {
        e.extend_from_slice(&both32(v));
    }
    e
}

/// A minimal image: PVD at 16, terminator at 17, root directory at `ROOT`.
struct Image(Vec<u8>);

const ROOT: u32 = 20;

impl Image {
    fn new(root_sua: &[u8], root_records: &[Vec<u8>]) -> Image {
        let mut img = Image(vec![0u8; 40 * SS]);
        let pvd = img.sector(16);
        pvd[0] = 1;
        pvd[1..6].copy_from_slice(b"CD001");
        pvd[6] = 1;
        pvd[40..72].copy_from_slice(format!("{:<32}", "SYNTH_VOL").as_bytes());
        pvd[80..88].copy_from_slice(&both32(40));
        pvd[128..132].copy_from_slice(&both16(2048));
        let root = record(ROOT, SS as u32, 2, &[0], &[]);
        pvd[156..156 + root.len()].copy_from_slice(&root);
        let term = img.sector(17);
        term[0] = 255;
        term[1..6].copy_from_slice(b"CD001");
        term[6] = 1;
        let mut recs = vec![
            record(ROOT, SS as u32, 2, &[0], root_sua),
            record(ROOT, SS as u32, 2, &[1], &[]),
        ];
        recs.extend_from_slice(root_records);
        img.write(ROOT, 0, &recs.concat());
        img
    }

    fn sector(&mut self, n: u32) -> &mut [u8] {
        let at = n as usize * SS;
        &mut self.0[at..at + SS]
    }

    fn write(&mut self, sector: u32, offset: usize, data: &[u8]) {
        self.sector(sector)[offset..offset + data.len()].copy_from_slice(data);
    }

    fn save(&self, dir: &Path, name: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, &self.0).unwrap();
        p
    }
}

fn read_all(iso: &Iso, e: &IsoEntry) -> Vec<u8> {
    let mut v = Vec::new();
    iso.reader(e).unwrap().read_to_end(&mut v).unwrap();
    v
}

fn err_chain(e: &anyhow::Error) -> String {
    format!("{e:#}")
}

#[test]
fn strips_iso_names() {
    assert_eq!(strip_iso_name("VMLINUZ.;1"), "VMLINUZ");
    assert_eq!(strip_iso_name("INITRAMF.XZ;1"), "INITRAMF.XZ");
    assert_eq!(strip_iso_name("BOOT"), "BOOT");
    assert_eq!(strip_iso_name("A;B"), "A;B");
}

/// SP skip length, NM split by CONTINUE across a CE continuation area, PX modes and a
/// two-extent file, all on one hand-made image.
#[test]
fn rock_ridge_features() {
    let skip = [0xAA, 0xBB, 0xCC];
    let su = |entries: &[Vec<u8>]| [skip.to_vec(), entries.concat()].concat();
    let mut root_sua = sp(3);
    root_sua.extend(er_rrip());
    let records = vec![
        record(31, 2048 + 10, 0x80, b"BIG.;1", &su(&[nm(0, b"big.bin")])),
        record(33, 10, 0, b"BIG.;1", &su(&[nm(0, b"big.bin")])),
        record(
            30,
            6,
            0,
            b"FILE1.;1",
            &su(&[nm(0, b"hello-World.txt"), px(0o100640)]),
        ),
        record(
            34,
            3,
            0,
            b"LONG.;1",
            &su(&[nm(1, b"part-one-"), ce(22, 100, 64)]),
        ),
    ];
    let mut img = Image::new(&root_sua, &records);
    // The continuation: the rest of the name, then ST, then junk that must be ignored.
    let cont = [nm(0, b"part-two"), b"ST\x04\x01".to_vec(), nm(0, b"junk")].concat();
    img.write(22, 100, &cont);
    img.write(30, 0, b"hello\n");
    img.write(31, 0, &[b'A'; SS]);
    img.write(32, 0, &[b'A'; 10]);
    img.write(33, 0, &[b'B'; 10]);
    img.write(34, 0, b"xyz");
    let tmp = tempfile::TempDir::new().unwrap();
    let iso = Iso::open(&img.save(tmp.path(), "rr.iso")).unwrap();

    assert_eq!(iso.volume_id(), "SYNTH_VOL");
    assert!(iso.has_rock_ridge());
    let names: Vec<_> = iso
        .read_dir("/")
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["big.bin", "hello-World.txt", "part-one-part-two"]);

    let f = iso.lookup("/hello-World.txt").unwrap().unwrap();
    assert_eq!((f.size, f.mode, f.is_dir), (6, Some(0o100640), false));
    assert_eq!(read_all(&iso, &f), b"hello\n");
    // Rock Ridge names are case-sensitive.
    assert!(iso.lookup("/HELLO-world.txt").unwrap().is_none());
    assert!(iso.lookup("/FILE1").unwrap().is_none());

    let long = iso.lookup("part-one-part-two").unwrap().unwrap();
    assert_eq!(read_all(&iso, &long), b"xyz");

    let big = iso.lookup("/big.bin").unwrap().unwrap();
    assert_eq!(big.size, 2048 + 10 + 10);
    assert_eq!(big.extents.len(), 2);
    let data = read_all(&iso, &big);
    assert_eq!(data.len(), 2068);
    assert!(data[..2058].iter().all(|&b| b == b'A'));
    assert!(data[2058..].iter().all(|&b| b == b'B'));
    let mut out = Vec::new();
    assert_eq!(iso.copy_to(&big, &mut out).unwrap(), 2068);
    assert_eq!(out, data);
}

#[test]
fn plain_iso9660_names_match_case_insensitively() {
    let records = vec![record(24, SS as u32, 2, b"BOOT", &[])];
    let mut img = Image::new(&[], &records);
    let sub = [
        record(24, SS as u32, 2, &[0], &[]),
        record(ROOT, SS as u32, 2, &[1], &[]),
        record(30, 5, 0, b"INITRAMF.XZ;1", &[]),
        record(31, 4, 0, b"VMLINUZ.;1", &[]),
    ]
    .concat();
    img.write(24, 0, &sub);
    img.write(30, 0, b"initr");
    img.write(31, 0, b"kern");
    let tmp = tempfile::TempDir::new().unwrap();
    let iso = Iso::open(&img.save(tmp.path(), "plain.iso")).unwrap();
    assert!(!iso.has_rock_ridge());
    for p in [
        "/boot/vmlinuz",
        "/BOOT/VMLINUZ",
        "/BOOT/VMLINUZ.;1",
        "boot/Vmlinuz.",
    ] {
        let e = iso
            .lookup(p)
            .unwrap()
            .unwrap_or_else(|| panic!("{p} not found"));
        assert_eq!(e.name, "VMLINUZ");
        assert_eq!(read_all(&iso, &e), b"kern");
    }
    let e = iso.lookup("/boot/initramf.xz").unwrap().unwrap();
    assert_eq!(read_all(&iso, &e), b"initr");
    assert!(iso.lookup("/boot/initramfs.xz").unwrap().is_none());
    assert!(iso.lookup("/boot/vmlinuz/x").unwrap().is_none());
    assert!(iso.read_dir("/boot/vmlinuz").is_err());
    assert!(iso.efi_boot_image().unwrap().is_none());
}

#[test]
fn corrupt_records_are_errors() {
    let tmp = tempfile::TempDir::new().unwrap();
    let rr_root = [sp(0), er_rrip()].concat();
    let cases: Vec<(&str, Image, &str)> = vec![
        (
            "short record",
            {
                let mut img = Image::new(&[], &[]);
                img.write(ROOT, 68, &[20, 0, 0]);
                img
            },
            "below the minimum",
        ),
        (
            "name overrun",
            {
                let mut r = record(30, 1, 0, b"A", &[]);
                r[32] = 200;
                Image::new(&[], &[r])
            },
            "does not fit",
        ),
        (
            "record overruns sector",
            {
                // The directory ends (data length 104) before the record's claimed end.
                let mut r = record(30, 1, 0, b"ABC", &[]);
                let end = 68 + r.len() as u32;
                r[0] = 60;
                let mut img = Image::new(&[], &[r]);
                img.write(16, 156 + 10, &both32(end));
                img
            },
            "overruns its sector",
        ),
        (
            "CE loop",
            {
                let mut img = Image::new(&rr_root, &[record(30, 1, 0, b"A", &ce(22, 0, 28))]);
                img.write(22, 0, &ce(22, 0, 28));
                img
            },
            "CE loop",
        ),
        (
            "SUSP overrun",
            {
                let mut bad = nm(0, b"x");
                bad[2] = 60;
                Image::new(&rr_root, &[record(30, 1, 0, b"A", &bad)])
            },
            "overruns its area",
        ),
        (
            "unfinished multi-extent",
            Image::new(&[], &[record(30, 1, 0x80, b"A", &[])]),
            "no final extent",
        ),
        (
            "slash in name",
            Image::new(&rr_root, &[record(30, 1, 0, b"A", &nm(0, b"a/b"))]),
            "invalid file name",
        ),
    ];
    for (what, img, msg) in cases {
        let path = img.save(tmp.path(), "bad.iso");
        let err = Iso::open(&path)
            .and_then(|iso| iso.read_dir("/"))
            .expect_err(what);
        assert!(err_chain(&err).contains(msg), "{what}: {err:#}");
    }
}

#[test]
fn rejects_non_iso_files() {
    let tmp = tempfile::TempDir::new().unwrap();
    let mut seed = 1u64;
    let random: Vec<u8> = (0..100_000).map(|_| lcg(&mut seed) as u8).collect();
    for (name, data) in [("random.bin", &random[..]), ("short.bin", &random[..1000])] {
        let p = tmp.path().join(name);
        std::fs::write(&p, data).unwrap();
        let err = Iso::open(&p).err().expect(name);
        assert!(
            err_chain(&err).contains("not an ISO9660 image (no CD001 at sector 16)"),
            "{err:#}"
        );
    }
}

fn lcg(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state >> 33
}

/// Build a small real image with xorriso: Rock Ridge, nested directories, a 255-byte name
/// (NM with CONTINUE in a CE area) and an appended EFI partition.
fn xorriso_image(dir: &Path) -> std::path::PathBuf {
    let tree = dir.join("tree");
    let long = "n".repeat(250) + ".long";
    for (p, data) in [
        ("boot/vmlinuz", "kernel".repeat(1000)),
        ("boot/grub/grub.cfg", "set timeout=1\n".into()),
        ("EFI/BOOT/BOOTX64.EFI", "MZ".into()),
        (&format!("deep/a/b/c/{long}") as &str, "long name\n".into()),
    ] {
        let p = tree.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    let efi = dir.join("efi.img");
    let ok = Command::new("mkfs.vfat")
        .args(["-C", "-n", "EFI"])
        .arg(&efi)
        .arg("1440")
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfs.vfat failed");
    let iso = dir.join("small.iso");
    let out = Command::new("xorriso")
        .args([
            "-as",
            "mkisofs",
            "-quiet",
            "-r",
            "-V",
            "SMALL",
            "--boot-catalog-hide",
            "-o",
        ])
        .arg(&iso)
        .args(["-append_partition", "2", "0xef"])
        .arg(&efi)
        .args([
            "-e",
            "--interval:appended_partition_2:all::",
            "-no-emul-boot",
        ])
        .arg(&tree)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "xorriso: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    iso
}

/// Visit every entry, reading every file; cycles in a corrupt tree are cut off.
fn walk(iso: &Iso) -> Result<usize> {
    let mut seen = HashSet::new();
    let mut stack = vec![("/".to_string(), 0)];
    let mut count = 0;
    while let Some((path, depth)) = stack.pop() {
        for e in iso.read_dir(&path)? {
            count += 1;
            if e.is_dir {
                if depth < 16 && seen.insert(e.extents[0].offset) {
                    stack.push((e.path.clone(), depth + 1));
                }
            } else {
                iso.copy_to(&e, &mut std::io::sink())?;
            }
        }
    }
    iso.efi_boot_image()?;
    Ok(count)
}

#[test]
fn xorriso_image_reads_back() {
    let tmp = tempfile::TempDir::new().unwrap();
    let path = xorriso_image(tmp.path());
    let iso = Iso::open(&path).unwrap();
    assert!(iso.has_rock_ridge());
    assert_eq!(iso.volume_id(), "SMALL");
    let long = "n".repeat(250) + ".long";
    let e = iso.lookup(&format!("/deep/a/b/c/{long}")).unwrap().unwrap();
    assert_eq!(e.name.len(), 255);
    assert_eq!(read_all(&iso, &e), b"long name\n");
    let k = iso.lookup("/boot/vmlinuz").unwrap().unwrap();
    assert_eq!(read_all(&iso, &k), "kernel".repeat(1000).as_bytes());
    // mkfs.vfat -C … 1440 makes a 1440 KiB filesystem.
    let (_, len) = iso.efi_boot_image().unwrap().unwrap();
    assert_eq!(len, 1440 * 1024);
    assert_eq!(walk(&iso).unwrap(), 12);
}

/// Flip random bytes of, or truncate, a real image: open + walk must return, not panic.
#[test]
fn mutated_images_never_panic() {
    let tmp = tempfile::TempDir::new().unwrap();
    let pristine = std::fs::read(xorriso_image(tmp.path())).unwrap();
    // Metadata (descriptors, catalog, directories, CE areas) sits in the first sectors.
    let hot = pristine.len().min(64 * SS);
    let path = tmp.path().join("mutant.iso");
    let mut seed = 0x150_u64;
    let (mut ok, mut err) = (0, 0);
    for round in 0..1000 {
        let mut data = pristine.clone();
        if round % 5 == 4 {
            data.truncate(lcg(&mut seed) as usize % pristine.len());
        } else {
            for _ in 0..1 + lcg(&mut seed) % 8 {
                let at = if lcg(&mut seed).is_multiple_of(4) {
                    lcg(&mut seed) as usize % data.len()
                } else {
                    16 * SS + lcg(&mut seed) as usize % (hot - 16 * SS)
                };
                data[at] ^= 1 << (lcg(&mut seed) % 8);
            }
        }
        std::fs::write(&path, &data).unwrap();
        match Iso::open(&path).and_then(|iso| walk(&iso)) {
            Ok(_) => ok += 1,
            Err(_) => err += 1,
        }
    }
    eprintln!("mutations: ok={ok} err={err}");
    // Both outcomes must occur, or the mutations are not reaching the parser.
    assert!(ok > 0 && err > 0, "ok={ok} err={err}");
}
