//! `serve --image` reads files straight out of the image by their ext4 extents: the
//! extents must be exactly the blocks the real `debugfs` reports, and the served bytes
//! exactly what `debugfs cat` reads.

mod common;
#[path = "common/fixture.rs"]
mod fixture;
#[path = "serve_lab/mod.rs"]
mod lab;

use std::fs::File;
use std::process::Command;

use mkappliance::appliance::served::ServedTree;
use mkappliance::disk::rootfs::Ext4Image;

const BLOCK: u64 = 4096;

/// A file's leaf extents as (logical block, physical block, length in blocks), per
/// `debugfs -R "dump_extents -l PATH"`.
fn debugfs_extents(image: &std::path::Path, offset: u64, path: &str) -> Vec<(u64, u64, u64)> {
    let out = lab::run(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("dump_extents -l /{path}"))
            .arg(format!("{}?offset={offset}", image.display())),
    );
    out.lines()
        .skip(1)
        .map(|l| {
            // " 1/ 1   1/  5     0 - 32767   476 - 33243  32768"
            let n: Vec<u64> = l
                .replace(['/', '-'], " ")
                .split_whitespace()
                .filter_map(|t| t.parse().ok())
                .collect();
            (n[4], n[6], n[8])
        })
        .collect()
}

#[test]
fn extents_are_the_blocks_debugfs_reports() {
    let dir = tempfile::tempdir().unwrap();
    // A sparse 600 MB file spans five 128 MiB block groups: more extents than fit in the
    // inode, so the map comes through a depth-1 extent tree.
    let ov = dir.path().join("overlay/srv/http/talos");
    std::fs::create_dir_all(&ov).unwrap();
    File::create(ov.join("huge.bin"))
        .unwrap()
        .set_len(600 << 20)
        .unwrap();
    std::fs::write(ov.join("empty"), b"").unwrap();
    std::fs::write(ov.join("small"), b"hello").unwrap();
    let overlay = dir.path().join("overlay");
    let image = lab::build_image(dir.path(), &["--overlay", overlay.to_str().unwrap()]);
    let (offset, size, _, _) = common::sgdisk_partition(&image, 2);
    let ext = Ext4Image::open(File::open(&image).unwrap(), offset, size).unwrap();

    let mut checked = 0;
    let mut max_extents = 0;
    for (path, is_dir, len) in ext.list().unwrap() {
        if is_dir || path.starts_with("lost+found") {
            continue;
        }
        let map = ext.file_map(&path).unwrap();
        assert_eq!(map.size, len, "{path}");
        let mut next = 0;
        let mut ours = Vec::new();
        for e in &map.extents {
            assert!(!e.unwritten, "{path}");
            assert_eq!(e.logical, next, "{path}: a hole");
            assert_eq!((e.physical - offset) % BLOCK, 0);
            ours.push((
                e.logical / BLOCK,
                (e.physical - offset) / BLOCK,
                e.len / BLOCK,
            ));
            next += e.len;
        }
        assert!(
            next >= len && next - len < BLOCK,
            "{path}: {next} bytes mapped for {len}"
        );
        assert_eq!(ours, debugfs_extents(&image, offset, &path), "{path}");
        max_extents = max_extents.max(map.extents.len());
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} files");
    assert!(
        max_extents > 4,
        "the big file should need an extent tree ({max_extents} extents)"
    );
    assert!(
        ext.file_map("srv/http").is_err(),
        "a directory mapped as a file"
    );
    assert!(ext.file_map("srv/nope").is_err());

    // The served tree reads the same bytes debugfs does.
    let tree = ServedTree::open_image(&image).unwrap();
    for path in [
        "srv/http/boot.ipxe",
        "srv/http/configs/minipc.yaml",
        "srv/tftp/ipxe.efi",
        "srv/http/talos/small",
        "srv/http/talos/empty",
    ] {
        let f = tree.open(path).unwrap().unwrap();
        let mut buf = vec![0u8; f.len() as usize];
        assert_eq!(f.read_at(0, &mut buf).unwrap(), buf.len());
        assert_eq!(buf, lab::image_file(&image, path), "{path}");
    }
    let kernel = "srv/http/talos/v1.11.6/vmlinuz";
    let f = tree.open(kernel).unwrap().unwrap();
    let want = lab::image_file(&image, kernel);
    let mut buf = vec![0u8; 10_000];
    assert_eq!(f.read_at(123_457, &mut buf).unwrap(), buf.len());
    assert_eq!(buf, want[123_457..133_457]);
    assert!(tree.open("srv/http/talos").unwrap().is_none());
    assert!(
        tree.open("etc/appliance/appliance.toml").unwrap().is_none(),
        "only srv/ is served"
    );
    assert_eq!(tree.config().minipc_mac.to_string(), lab::PINNED_MAC);
}
