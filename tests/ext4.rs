//! The ext4 writer, judged by e2fsprogs (`e2fsck`, `debugfs`, `dumpe2fs`) and read back
//! with `ext4-view`. Expected values come from the trees the tests build, not from the writer.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use mkappliance::disk::rootfs::{self, Ext4Image, Ext4Params};

mod common;
use mkappliance::tree::{Content, FileTree, Kind};

/// Filesystems start 1 MiB into their image, like a partition would.
const OFFSET: u64 = 1 << 20;
const TIMESTAMP: u32 = 1_700_000_000; // 0x6553f100
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

fn params() -> Ext4Params {
    Ext4Params {
        uuid: *b"\x01\x23\x45\x67\x89\xab\xcd\xef\x10\x32\x54\x76\x98\xba\xdc\xfe",
        hash_seed: [7; 16],
        timestamp: TIMESTAMP,
        label: "appliance".into(),
    }
}

/// A fresh sparse image holding a filesystem of `size` bytes at `OFFSET`, plus 1 MiB after.
fn write_image(dir: &Path, name: &str, tree: &FileTree, size: u64, params: &Ext4Params) -> PathBuf {
    let path = dir.join(name);
    let f = File::create(&path).unwrap();
    f.set_len(OFFSET + size + MIB).unwrap();
    rootfs::write(&f, OFFSET, size, tree, params).unwrap();
    path
}

fn spec(img: &Path) -> String {
    format!("{}?offset={OFFSET}", img.display())
}

/// Run `e2fsck -fn`; returns (exit code, stdout + stderr).
fn e2fsck(img: &Path) -> (i32, String) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(spec(img))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// `e2fsck -fn` must pass and report `used_inodes` files in use.
fn assert_fsck_clean(img: &Path, used_inodes: usize) {
    let (code, text) = e2fsck(img);
    assert_eq!(code, 0, "e2fsck failed:\n{text}");
    let stats = text
        .lines()
        .find(|l| l.starts_with("appliance: ") && l.contains(" files (") && l.ends_with(" blocks"))
        .unwrap_or_else(|| panic!("no stats line in e2fsck output:\n{text}"));
    eprintln!("{stats}");
    let files = stats["appliance: ".len()..].split('/').next().unwrap();
    assert_eq!(files, used_inodes.to_string(), "{stats}");
}

fn debugfs(img: &Path, request: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(spec(img))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "debugfs {request}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn debugfs_text(img: &Path, request: &str) -> String {
    String::from_utf8(debugfs(img, request)).unwrap()
}

/// `dumpe2fs -h` field, e.g. "Free blocks".
fn dumpe2fs_field(img: &Path, field: &str) -> String {
    let out = Command::new("dumpe2fs")
        .arg("-h")
        .arg(spec(img))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in dumpe2fs output"));
    line[field.len() + 1..].trim().to_string()
}

/// Compare `debugfs cat` of `path` with `expected`, streaming (for big files).
fn assert_debugfs_cat_matches(img: &Path, path: &str, expected: &mut dyn Read) {
    let mut child = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat \"/{path}\""))
        .arg(spec(img))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut got = child.stdout.take().unwrap();
    let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut offset = 0u64;
    loop {
        let n = read_up_to(expected, &mut a);
        let m = read_up_to(&mut got, &mut b[..n.max(1)]);
        assert_eq!(m, n, "{path}: length differs at {offset}");
        if n == 0 {
            break;
        }
        assert!(
            a[..n] == b[..n],
            "{path}: content differs in the MiB at {offset}"
        );
        offset += n as u64;
    }
    assert!(child.wait().unwrap().success());
}

fn read_up_to(r: &mut dyn Read, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

fn files_equal(a: &Path, b: &Path) -> bool {
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_up_to(&mut fa, &mut x);
        let m = read_up_to(&mut fb, &mut y);
        if n != m || x[..n] != y[..m] {
            return false;
        }
        if n == 0 {
            return true;
        }
    }
}

/// Pieces written into a sparse host file: (offset, length, seed).
const BIG_LEN: u64 = 300 * MIB;
const BIG_CHUNKS: [(u64, usize, u64); 3] = [
    (0, 65536, 1),
    (150 * MIB + 123, MIB as usize, 2),
    (BIG_LEN - 10, 10, 3),
];
/// Over 4 groups (512 MiB), so over 4 extents: needs an extent tree with a leaf block.
const HUGE_LEN: u64 = 530 * MIB;
const HUGE_CHUNKS: [(u64, usize, u64); 2] = [(5, 4096, 4), (520 * MIB, 100_000, 5)];

fn sparse_source(path: &Path, len: u64, chunks: &[(u64, usize, u64)]) -> u64 {
    let f = File::create(path).unwrap();
    f.set_len(len).unwrap();
    let mut written = 0;
    for &(at, n, seed) in chunks {
        f.write_all_at(&common::noise(seed, n), at).unwrap();
        written += (n as u64).div_ceil(BLOCK) * BLOCK + BLOCK; // rounded, maybe straddling
    }
    written
}

/// A tree of many shapes; returns it with the bytes its sources put on disk (non-zero).
fn many_shapes(src: &Path) -> (FileTree, u64) {
    let mut t = FileTree::new();
    let mut payload = 0;
    let mut add = |t: &mut FileTree, path: &str, data: Vec<u8>, mode| {
        payload += (data.len() as u64).div_ceil(BLOCK) * BLOCK;
        t.add_file(path, Content::bytes(data), mode).unwrap();
    };
    add(&mut t, "files/empty", vec![], 0o644);
    for (i, len) in [1usize, 100, 4095, 4096, 4097, 12345, 70000]
        .into_iter()
        .enumerate()
    {
        add(
            &mut t,
            &format!("files/small-{len}"),
            common::noise(10 + i as u64, len),
            0o644,
        );
    }
    add(&mut t, "files/with space", b"spaced\n".to_vec(), 0o644);
    add(&mut t, "files/ünïcødé", b"unicode\n".to_vec(), 0o644);
    add(
        &mut t,
        &format!("files/{}", "n".repeat(255)),
        b"long name\n".to_vec(),
        0o644,
    );
    // Odd modes.
    add(&mut t, "modes/setuid", b"#!/bin/sh\n".to_vec(), 0o4750);
    add(&mut t, "modes/none", b"secret\n".to_vec(), 0o000);
    add(&mut t, "modes/private", b"key\n".to_vec(), 0o600);
    t.add_dir("modes/sticky", 0o1777).unwrap();
    t.add_dir("modes/setgid", 0o2750).unwrap();
    // Empty directories.
    t.add_dir("var/lib/appliance", 0o755).unwrap();
    t.add_dir("var/log/appliance", 0o750).unwrap();
    t.add_dir("empty", 0o700).unwrap();
    // A directory of 2000 entries spans several blocks.
    for i in 0..2000 {
        let data = if i % 3 == 0 {
            vec![]
        } else {
            format!("entry {i}\n").into_bytes()
        };
        add(&mut t, &format!("many/entry-{i:04}"), data, 0o644);
    }
    // Deep nesting.
    let deep: Vec<String> = (0..40).map(|i| format!("d{i}")).collect();
    add(
        &mut t,
        &format!("deep/{}/leaf.txt", deep.join("/")),
        b"deep leaf\n".to_vec(),
        0o644,
    );
    // Symlinks: fast ones live in the inode (< 60 bytes), slow ones in a block.
    t.add_symlink("links/fast", "../files/small-100").unwrap();
    t.add_symlink("links/b59", &"x".repeat(59)).unwrap();
    t.add_symlink("links/b60", &"y".repeat(60)).unwrap();
    t.add_symlink("links/slow", &format!("/{}", "z/".repeat(1500)))
        .unwrap();
    // Big files from sparse host files, streamed.
    let big = src.join("big.bin");
    payload += sparse_source(&big, BIG_LEN, &BIG_CHUNKS);
    t.add_file("srv/http/big.bin", Content::path(&big).unwrap(), 0o644)
        .unwrap();
    let huge = src.join("huge.bin");
    payload += sparse_source(&huge, HUGE_LEN, &HUGE_CHUNKS);
    t.add_file("srv/http/huge.bin", Content::path(&huge).unwrap(), 0o644)
        .unwrap();
    (t, payload)
}

/// What `Ext4Image::list` should show for `tree`: (path, is_dir, size) with sizes of files
/// and symlinks; directories get `None` (their size is checked separately).
fn expected_listing(tree: &FileTree) -> BTreeMap<String, (bool, Option<u64>)> {
    let mut m: BTreeMap<_, _> = tree
        .iter()
        .map(|(p, e)| {
            let v = match &e.kind {
                Kind::Dir => (true, None),
                Kind::File(c) => (false, Some(c.len())),
                Kind::Symlink(t) => (false, Some(t.len() as u64)),
            };
            (p.to_string(), v)
        })
        .collect();
    m.insert("lost+found".into(), (true, None));
    m
}

/// Mode, uid, gid and times from `debugfs stat`.
fn assert_stat(img: &Path, path: &str, kind: &str, mode: u32) {
    let text = debugfs_text(img, &format!("stat \"/{path}\""));
    assert!(text.contains(&format!("Type: {kind}")), "{path}: {text}");
    assert!(
        text.contains(&format!("Mode:  0{mode:03o} ")),
        "{path}: want mode {mode:o}: {text}"
    );
    assert!(
        text.contains("User:     0   Group:     0"),
        "{path}: {text}"
    );
    for field in ["ctime", "atime", "mtime", "crtime"] {
        assert!(
            text.contains(&format!("{field}: 0x{TIMESTAMP:08x}:00000000")),
            "{path}: {field}: {text}"
        );
    }
}

#[test]
fn many_shapes_pass_e2fsck_and_read_back() {
    let tmp = tempfile::TempDir::new().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let (tree, payload) = many_shapes(&src);
    let size = rootfs::min_size(&tree, 16 * MIB, 1000);
    let img = write_image(tmp.path(), "a.img", &tree, size, &params());

    // 1. e2fsck is happy and counts every inode: the tree's, root, lost+found, 1-10.
    assert_fsck_clean(&img, tree.len() + 11);

    // 2. debugfs reads what went in.
    for path in [
        "files/empty",
        "files/small-1",
        "files/small-4095",
        "files/small-4096",
        "files/small-4097",
        "files/small-70000",
        "files/with space",
        "files/ünïcødé",
        "modes/none",
        "many/entry-0000",
        "many/entry-1001",
        "many/entry-1999",
    ] {
        let Kind::File(c) = &tree.get(path).unwrap().kind else {
            panic!()
        };
        assert_eq!(
            debugfs(&img, &format!("cat \"/{path}\"")),
            c.read_all().unwrap(),
            "{path}"
        );
    }
    let deep_leaf = tree
        .iter()
        .find(|(p, _)| p.ends_with("leaf.txt"))
        .unwrap()
        .0;
    assert_eq!(debugfs(&img, &format!("cat /{deep_leaf}")), b"deep leaf\n");
    for (path, src_name) in [
        ("srv/http/big.bin", "big.bin"),
        ("srv/http/huge.bin", "huge.bin"),
    ] {
        assert_debugfs_cat_matches(&img, path, &mut File::open(src.join(src_name)).unwrap());
    }

    // 3. Modes, owners, timestamps; symlink kinds; the huge file's extent tree has a leaf
    //    block (debugfs lists it as ETB0).
    assert_stat(&img, "modes/setuid", "regular", 0o4750);
    assert_stat(&img, "modes/none", "regular", 0);
    assert_stat(&img, "modes/sticky", "directory", 0o1777);
    assert_stat(&img, "modes/setgid", "directory", 0o2750);
    assert_stat(&img, "var/log/appliance", "directory", 0o750);
    assert_stat(&img, "links/fast", "symlink", 0o777);
    assert_stat(&img, "lost+found", "directory", 0o700);
    assert_stat(&img, "", "directory", 0o755);
    let fast = debugfs_text(&img, "stat /links/fast");
    assert!(
        fast.contains("Fast link dest: \"../files/small-100\""),
        "{fast}"
    );
    assert!(debugfs_text(&img, "stat /links/b59").contains("Fast link dest:"));
    assert!(!debugfs_text(&img, "stat /links/b60").contains("Fast link dest:"));
    let huge = debugfs_text(&img, "stat /srv/http/huge.bin");
    assert!(huge.contains("(ETB0):"), "{huge}");
    assert!(huge.contains(&format!("Size: {HUGE_LEN}")), "{huge}");
    assert_eq!(
        debugfs_text(&img, "stat /many").matches("Links: 2").count(),
        1
    );

    // 4. The ext4-view reader sees the same tree.
    let image = Ext4Image::open(File::open(&img).unwrap(), OFFSET, size).unwrap();
    assert_eq!(image.label(), "appliance");
    assert_eq!(image.uuid(), params().uuid);
    let listed = image.list().unwrap();
    let expected = expected_listing(&tree);
    assert_eq!(listed.len(), expected.len());
    for (path, is_dir, len) in &listed {
        let (want_dir, want_len) = expected
            .get(path)
            .unwrap_or_else(|| panic!("unexpected {path}"));
        assert_eq!(is_dir, want_dir, "{path}");
        match want_len {
            Some(want) => assert_eq!(len, want, "{path}"),
            None => assert!(*len > 0 && len % BLOCK == 0, "{path}: directory size {len}"),
        }
    }
    // 2002 entries of at least 20 bytes: 10 blocks (204 fit in a block), not 1.
    let many = listed.iter().find(|e| e.0 == "many").unwrap();
    assert_eq!(many.2, 10 * BLOCK);
    for (path, entry) in tree.iter() {
        if let Kind::File(c) = &entry.kind {
            if c.len() < MIB {
                assert_eq!(image.read(path).unwrap(), c.read_all().unwrap(), "{path}");
            }
        }
    }
    let mut big = vec![0u8; BIG_LEN as usize];
    for &(at, n, seed) in &BIG_CHUNKS {
        big[at as usize..at as usize + n].copy_from_slice(&common::noise(seed, n));
    }
    assert!(image.read("srv/http/big.bin").unwrap() == big);

    // 5. Sparse: only data and metadata are allocated.
    let allocated = std::fs::metadata(&img).unwrap().blocks() * 512;
    let metadata_allowance = 4 * MIB;
    assert!(
        allocated <= payload + metadata_allowance,
        "image allocates {allocated} bytes for {payload} bytes of data"
    );

    // 6. Reproducible, and the UUID is in the bytes.
    let again = write_image(tmp.path(), "b.img", &tree, size, &params());
    assert!(files_equal(&img, &again), "two writes differ");
    std::fs::remove_file(&again).unwrap();
    let mut other = params();
    other.uuid[0] ^= 0xff;
    let other_img = write_image(tmp.path(), "c.img", &tree, size, &other);
    assert!(
        !files_equal(&img, &other_img),
        "UUID change did not change the image"
    );
    assert_eq!(
        dumpe2fs_field(&other_img, "Filesystem UUID"),
        "fe234567-89ab-cdef-1032-547698badcfe"
    );
    assert_eq!(
        dumpe2fs_field(&other_img, "Filesystem volume name"),
        "appliance"
    );
    assert_eq!(dumpe2fs_field(&other_img, "Errors behavior"), "Continue");
    assert_eq!(dumpe2fs_field(&other_img, "Filesystem state"), "clean");
}

fn small_tree() -> FileTree {
    let mut t = FileTree::new();
    t.add_file("etc/hello", Content::bytes("hello\n"), 0o644)
        .unwrap();
    t.add_file(
        "srv/data",
        Content::bytes(common::noise(42, 100_000)),
        0o644,
    )
    .unwrap();
    t
}

#[test]
fn corruption_is_detected() {
    let tmp = tempfile::TempDir::new().unwrap();
    let tree = small_tree();
    let size = rootfs::min_size(&tree, MIB, 100);
    let img = write_image(tmp.path(), "a.img", &tree, size, &params());
    assert_fsck_clean(&img, tree.len() + 11);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(&img)
        .unwrap();

    // Group 0's free blocks count (descriptor table in block 1, bytes 12-13).
    let at = OFFSET + BLOCK + 12;
    let mut count = [0u8; 2];
    f.read_exact_at(&mut count, at).unwrap();
    f.write_all_at(&(u16::from_le_bytes(count) + 1).to_le_bytes(), at)
        .unwrap();
    let (code, text) = e2fsck(&img);
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("Free blocks count wrong for group #0"),
        "{text}"
    );
    f.write_all_at(&count, at).unwrap();
    assert_fsck_clean(&img, tree.len() + 11);

    // The superblock's inode count.
    let at = OFFSET + 1024;
    let mut inodes = [0u8; 4];
    f.read_exact_at(&mut inodes, at).unwrap();
    f.write_all_at(&(u32::from_le_bytes(inodes) + 8).to_le_bytes(), at)
        .unwrap();
    let (code, text) = e2fsck(&img);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("Inode count in superblock is"), "{text}");
}

#[test]
fn min_size_is_tight_and_too_small_is_a_clear_error() {
    let tmp = tempfile::TempDir::new().unwrap();
    let mut tree = small_tree();
    for i in 0..500 {
        tree.add_file(
            &format!("many/f{i}"),
            Content::bytes(common::noise(i, 5000)),
            0o644,
        )
        .unwrap();
    }
    let entries = tree.len() as u64;
    let data_blocks: u64 = tree
        .iter()
        .filter_map(|(_, e)| match &e.kind {
            Kind::File(c) => Some(c.len().div_ceil(BLOCK)),
            _ => None,
        })
        .sum();

    let size = rootfs::min_size(&tree, 0, 0);
    assert_eq!(size % BLOCK, 0);
    // Data, 256 bytes of inode per entry, plus a little (superblock, bitmaps, directories).
    let bound = data_blocks * BLOCK + (entries + 11) * 256 + 128 * 1024;
    assert!(size <= bound, "min_size {size} > {bound}");
    let img = write_image(tmp.path(), "exact.img", &tree, size, &params());
    assert_fsck_clean(&img, tree.len() + 11);

    for short in [size - BLOCK, size / 4] {
        let f = File::create(tmp.path().join("short.img")).unwrap();
        f.set_len(OFFSET + size).unwrap();
        let err = rootfs::write(&f, OFFSET, short, &tree, &params()).unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            format!("tree needs {size} bytes but partition has {short}")
        );
    }

    // Headroom: free blocks and inodes as asked for, read back by dumpe2fs. Spare inodes
    // come at 64 per MiB, so 2000 of them fit in 50 MiB and the blocks decide the size...
    let size = rootfs::min_size(&tree, 50 * MIB, 2000);
    let img = write_image(tmp.path(), "roomy.img", &tree, size, &params());
    assert_fsck_clean(&img, tree.len() + 11);
    let free_blocks: u64 = dumpe2fs_field(&img, "Free blocks").parse().unwrap();
    let free_inodes: u64 = dumpe2fs_field(&img, "Free inodes").parse().unwrap();
    // The kernel keeps min(2 %, 4096 blocks) back from everyone (s_resv_clusters).
    let block_count: u64 = dumpe2fs_field(&img, "Block count").parse().unwrap();
    let usable = free_blocks - (block_count / 50).min(4096);
    assert!(
        usable * BLOCK >= 50 * MIB,
        "{free_blocks} free blocks of {block_count}"
    );
    assert!(
        usable * BLOCK < 50 * MIB + BLOCK,
        "{free_blocks} free blocks: not tight"
    );
    assert!(free_inodes >= 2000, "{free_inodes} free inodes");
    // ...while 5000 need 79 MiB (5000 / 64, rounded up): the inodes decide.
    let size = rootfs::min_size(&tree, 0, 5000);
    assert_eq!(size.div_ceil(MIB), 79);
    let img = write_image(tmp.path(), "inodes.img", &tree, size, &params());
    assert_fsck_clean(&img, tree.len() + 11);
    let free_inodes: u64 = dumpe2fs_field(&img, "Free inodes").parse().unwrap();
    assert!(
        (5000..5000 + 64).contains(&free_inodes),
        "{free_inodes} free inodes"
    );
}

#[test]
fn writes_over_old_data_when_the_range_is_not_a_hole() {
    let tmp = tempfile::TempDir::new().unwrap();
    let tree = small_tree();
    let size = 8 * MIB;
    let path = tmp.path().join("dirty.img");
    let f = File::create(&path).unwrap();
    f.set_len(OFFSET + size + MIB).unwrap();
    f.write_all_at(&vec![0xA5; size as usize], OFFSET).unwrap();
    rootfs::write(&f, OFFSET, size, &tree, &params()).unwrap();
    assert_fsck_clean(&path, tree.len() + 11);
    assert_eq!(debugfs(&path, "cat /etc/hello"), b"hello\n");
    let Kind::File(c) = &tree.get("srv/data").unwrap().kind else {
        panic!()
    };
    assert_eq!(debugfs(&path, "cat /srv/data"), c.read_all().unwrap());
}

#[test]
fn source_that_changed_size_is_an_error() {
    let tmp = tempfile::TempDir::new().unwrap();
    let src = tmp.path().join("src.bin");
    std::fs::write(&src, b"0123456789").unwrap();
    for recorded in [5, 20] {
        let mut tree = FileTree::new();
        tree.add_file(
            "x",
            Content::Path {
                path: src.clone(),
                len: recorded,
            },
            0o644,
        )
        .unwrap();
        let size = rootfs::min_size(&tree, 0, 0);
        let f = File::create(tmp.path().join("x.img")).unwrap();
        f.set_len(size).unwrap();
        let err = format!(
            "{:#}",
            rootfs::write(&f, 0, size, &tree, &params()).unwrap_err()
        );
        assert!(err.starts_with("writing /x: "), "{err}");
        assert!(err.contains("changed while writing"), "{err}");
    }
}

#[test]
fn label_too_long_is_an_error() {
    let tmp = tempfile::TempDir::new().unwrap();
    let f = File::create(tmp.path().join("x.img")).unwrap();
    f.set_len(MIB).unwrap();
    let mut p = params();
    p.label = "seventeen-chars!!".into();
    let err = rootfs::write(&f, 0, MIB, &FileTree::new(), &p).unwrap_err();
    assert!(err.to_string().contains("longer than 16 bytes"), "{err}");
}

/// Not an assertion: how long a ~110 MB write takes (I/O bound; the target is < 0.2 s).
#[test]
fn timing_of_a_110_mb_write() {
    let tmp = tempfile::TempDir::new().unwrap();
    let src = tmp.path().join("payload.bin");
    std::fs::write(&src, common::noise(99, 100_000_000)).unwrap();
    let mut tree = FileTree::new();
    tree.add_file(
        "srv/http/talos/vmlinuz",
        Content::path(&src).unwrap(),
        0o644,
    )
    .unwrap();
    for i in 0..1000 {
        tree.add_file(
            &format!("srv/small/{i}"),
            Content::bytes(common::noise(i, 10_000)),
            0o644,
        )
        .unwrap();
    }
    let size = rootfs::min_size(&tree, 32 * MIB, 4096);
    let path = tmp.path().join("t.img");
    let f = File::create(&path).unwrap();
    f.set_len(OFFSET + size).unwrap();
    let start = Instant::now();
    rootfs::write(&f, OFFSET, size, &tree, &params()).unwrap();
    let took = start.elapsed();
    eprintln!(
        "ext4 write of {} MB into a {} MB filesystem took {took:.3?}",
        tree.payload_bytes() / 1_000_000,
        size / 1_000_000
    );
    drop(f);
    assert_fsck_clean(&path, tree.len() + 11);
    assert_debugfs_cat_matches(
        &path,
        "srv/http/talos/vmlinuz",
        &mut File::open(&src).unwrap(),
    );
}

/// Times from 2038 on overflow the signed 32-bit fields: the `_extra` epoch bits carry them.
#[test]
fn post_2038_timestamps_use_the_epoch_bits() {
    let tmp = tempfile::TempDir::new().unwrap();
    let tree = small_tree();
    let mut p = params();
    p.timestamp = 0xF000_0000; // 2097-08-05 09:04:00 UTC
    let size = rootfs::min_size(&tree, 0, 0);
    let img = write_image(tmp.path(), "a.img", &tree, size, &p);
    let stat = debugfs_text(&img, "stat /etc/hello");
    for field in ["ctime", "atime", "mtime", "crtime"] {
        let line = stat
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{field}:")))
            .unwrap();
        assert!(
            line.contains("0xf0000000:00000001") && line.contains("2097"),
            "{line}"
        );
    }
}
