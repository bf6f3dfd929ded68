//! The ext4 writer, judged by e2fsprogs (`e2fsck`, `debugfs`, `dumpe2fs`) and read back
//! with `ext4-view`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use mkappliance::disk::rootfs::{self, Ext4Image, Ext4Params};
use mkappliance::tree::{Content, FileTree, Kind};

const OFFSET: u64 = 1 << 20;
const TIMESTAMP: u32 = 1_700_000_000;

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
    f.set_len(OFFSET + size + (1 << 20)).unwrap();
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

#[test]
fn smoke() {
    let tmp = tempfile::TempDir::new().unwrap();
    let mut tree = FileTree::new();
    tree.add_file("etc/hello", Content::bytes("hello\n"), 0o644)
        .unwrap();
    let size = rootfs::min_size(&tree, 0, 0);
    eprintln!("min size {size}");
    let img = write_image(tmp.path(), "a.img", &tree, size, &params());
    let (code, text) = e2fsck(&img);
    eprintln!("{text}");
    assert_eq!(code, 0);
    assert_eq!(debugfs(&img, "cat /etc/hello"), b"hello\n");
    let _ = (Kind::Dir, Ext4Image::open);
}
