//! Integration tests of the ISO reader on Talos-shaped fixture ISOs built by real xorriso,
//! judged by real tools (sha256sum, zstd, cpio, unsquashfs, mdir, mcopy, fsck.vfat).

#[path = "common/fixture.rs"]
mod fixture;

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

use mkappliance::iso::Iso;
use tempfile::TempDir;

/// The volume ID Talos v1.11.6 ISOs carry (DESIGN.md).
const TALOS_VOLUME_ID: &str = "TALOS_V1_11_6";
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
/// The script makes the EFI image with `mkfs.vfat -C … 4096` (KiB).
const EFI_IMAGE_BYTES: u64 = 4096 * 1024;

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// sha256 of a file, by coreutils: an independent judge of what the reader returns.
fn sha256sum(path: &Path) -> String {
    let out = String::from_utf8(run(Command::new("sha256sum").arg(path))).unwrap();
    out.split_whitespace().next().unwrap().to_string()
}

fn extract(iso: &Iso, path: &str, dest: &Path) -> u64 {
    let entry = iso
        .lookup(path)
        .unwrap()
        .unwrap_or_else(|| panic!("{path} missing"));
    let mut f = File::create(dest).unwrap();
    let n = iso.copy_to(&entry, &mut f).unwrap();
    f.flush().unwrap();
    n
}

/// Save the EFI boot image range to a file and check it with mtools.
fn check_efi_image(iso_path: &Path, tmp: &Path) {
    let iso = Iso::open(iso_path).unwrap();
    let (offset, len) = iso.efi_boot_image().unwrap().expect("no EFI boot image");
    assert_eq!(len, EFI_IMAGE_BYTES);
    let mut bytes = vec![0u8; len as usize];
    let mut f = File::open(iso_path).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut bytes).unwrap();
    // A FAT boot sector: x86 jump, 512 bytes per sector, 0x55AA signature.
    assert_eq!(bytes[0], 0xEB);
    assert_eq!(&bytes[11..13], &512u16.to_le_bytes());
    assert_eq!(&bytes[510..512], &[0x55, 0xAA]);
    let img = tmp.join("efiboot.img");
    std::fs::write(&img, &bytes).unwrap();
    run(Command::new("fsck.vfat").arg("-n").arg(&img));
    let listing = String::from_utf8(run(Command::new("mdir")
        .args(["-b", "-i"])
        .arg(&img)
        .arg("::EFI/BOOT")))
    .unwrap();
    assert!(listing.contains("BOOTX64.EFI"), "mdir: {listing}");
    let efi = tmp.join("BOOTX64.EFI");
    run(Command::new("mcopy")
        .arg("-i")
        .arg(&img)
        .arg("::EFI/BOOT/BOOTX64.EFI")
        .arg(&efi));
    assert_eq!(sha256sum(&efi), sha256sum(&fixture::inputs().systemd_boot));
}

#[test]
fn fixture_tree_and_volume_id() {
    let iso = Iso::open(&fixture::talos_iso("default")).unwrap();
    assert_eq!(iso.volume_id(), TALOS_VOLUME_ID);
    assert!(iso.has_rock_ridge());
    for path in [
        "/boot/vmlinuz",
        "/boot/initramfs.xz",
        "/boot/grub/grub.cfg",
        "/EFI/BOOT/BOOTX64.EFI",
        "/EFI/Linux/Talos-v1.11.6.efi",
        "/loader/loader.conf",
    ] {
        let e = iso
            .lookup(path)
            .unwrap()
            .unwrap_or_else(|| panic!("{path} missing"));
        assert!(!e.is_dir, "{path}");
        assert_eq!(e.path, path);
        assert_eq!(
            e.mode.map(|m| m & 0o170000),
            Some(0o100000),
            "{path} is a regular file"
        );
    }
    let mut root: Vec<_> = iso
        .read_dir("/")
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    root.sort();
    assert_eq!(root, ["EFI", "boot", "loader"]);
    // Rock Ridge names are case-sensitive; the ISO9660 names are not used.
    assert!(iso.lookup("/BOOT/VMLINUZ").unwrap().is_none());
    assert!(iso.lookup("/boot/nonexistent").unwrap().is_none());
}

#[test]
fn vmlinuz_is_the_debian_kernel() {
    let tmp = TempDir::new().unwrap();
    let iso = Iso::open(&fixture::talos_iso("default")).unwrap();
    let out = tmp.path().join("vmlinuz");
    let n = extract(&iso, "/boot/vmlinuz", &out);
    let kernel = &fixture::inputs().kernel;
    assert_eq!(n, std::fs::metadata(kernel).unwrap().len());
    assert_eq!(sha256sum(&out), sha256sum(kernel));
    // The reader yields exactly `size` bytes too.
    let e = iso.lookup("/boot/vmlinuz").unwrap().unwrap();
    let mut v = Vec::new();
    iso.reader(&e).unwrap().read_to_end(&mut v).unwrap();
    assert_eq!(v.len() as u64, n);

    let efi = tmp.path().join("BOOTX64.EFI");
    extract(&iso, "/EFI/BOOT/BOOTX64.EFI", &efi);
    assert_eq!(sha256sum(&efi), sha256sum(&fixture::inputs().systemd_boot));
    assert!(fixture::kernel_version().ends_with("-cloud-amd64"));
}

#[test]
fn initramfs_is_zstd_cpio_with_modules() {
    let tmp = TempDir::new().unwrap();
    let iso = Iso::open(&fixture::talos_iso("default")).unwrap();
    let e = iso.lookup("/boot/initramfs.xz").unwrap().unwrap();
    let mut magic = [0u8; 4];
    iso.reader(&e).unwrap().read_exact(&mut magic).unwrap();
    assert_eq!(magic, ZSTD_MAGIC);

    let zst = tmp.path().join("initramfs.zst");
    extract(&iso, "/boot/initramfs.xz", &zst);
    let cpio = tmp.path().join("initramfs.cpio");
    run(Command::new("zstd")
        .args(["-q", "-d"])
        .arg(&zst)
        .arg("-o")
        .arg(&cpio));
    let list = run(Command::new("sh")
        .arg("-c")
        .arg("cpio -t --quiet < \"$1\"")
        .arg("sh")
        .arg(&cpio));
    let list = String::from_utf8(list).unwrap();
    let names: Vec<_> = list.lines().collect();
    for want in ["init", "rootfs.sqsh", "bin/busybox", "etc/modules.order"] {
        assert!(
            names.contains(&want),
            "{want} not in the fixture initramfs: {names:?}"
        );
    }
    let dir = tmp.path().join("x");
    std::fs::create_dir(&dir).unwrap();
    run(Command::new("sh")
        .arg("-c")
        .arg("cd \"$1\" && cpio -i --quiet < \"$2\"")
        .arg("sh")
        .arg(&dir)
        .arg(&cpio));
    let kver = fixture::kernel_version();
    let listing = String::from_utf8(run(Command::new("unsquashfs")
        .arg("-l")
        .arg(dir.join("rootfs.sqsh"))))
    .unwrap();
    for f in ["modules.dep", "modules.builtin", "modules.alias"] {
        let want = format!("squashfs-root/usr/lib/modules/{kver}/{f}");
        assert!(
            listing.lines().any(|l| l == want),
            "{want} not in rootfs.sqsh"
        );
    }
    let virtio_net =
        format!("squashfs-root/usr/lib/modules/{kver}/kernel/drivers/net/virtio_net.ko");
    assert!(listing.lines().any(|l| l == virtio_net));
}

#[test]
fn efi_boot_image_holds_systemd_boot() {
    let tmp = TempDir::new().unwrap();
    check_efi_image(&fixture::talos_iso("default"), tmp.path());
}

#[test]
fn no_tree_bootloader_variant_still_has_efi_image() {
    let tmp = TempDir::new().unwrap();
    let path = fixture::talos_iso("no-tree-bootloader");
    let iso = Iso::open(&path).unwrap();
    assert!(iso.lookup("/EFI/BOOT/BOOTX64.EFI").unwrap().is_none());
    assert!(iso.lookup("/boot/vmlinuz").unwrap().is_some());
    assert!(iso
        .lookup("/EFI/Linux/Talos-v1.11.6.efi")
        .unwrap()
        .is_some());
    check_efi_image(&path, tmp.path());
}

#[test]
fn truncated_iso_reports_truncation() {
    let tmp = TempDir::new().unwrap();
    let full = fixture::talos_iso("default");
    let iso = Iso::open(&full).unwrap();
    let vmlinuz = iso.lookup("/boot/vmlinuz").unwrap().unwrap();
    let ext = vmlinuz.extents[0];
    let cut = ext.offset + ext.len / 2;
    let cut_path = tmp.path().join("cut.iso");
    let mut src = File::open(&full).unwrap().take(cut);
    std::io::copy(&mut src, &mut File::create(&cut_path).unwrap()).unwrap();

    let iso = Iso::open(&cut_path).unwrap();
    let e = iso.lookup("/boot/vmlinuz").unwrap().unwrap();
    let err = iso.copy_to(&e, &mut std::io::sink()).unwrap_err();
    assert!(format!("{err:#}").contains("truncated"), "{err:#}");
    assert!(iso.reader(&e).is_err());
}

#[test]
fn random_file_is_not_an_iso() {
    let tmp = TempDir::new().unwrap();
    let p = tmp.path().join("random.bin");
    let mut data = Vec::new();
    File::open("/dev/urandom")
        .unwrap()
        .take(1 << 20)
        .read_to_end(&mut data)
        .unwrap();
    std::fs::write(&p, &data).unwrap();
    let err = Iso::open(&p).err().expect("random data opened as an ISO");
    assert!(format!("{err:#}").contains("not an ISO9660 image (no CD001 at sector 16)"));
}

#[test]
fn plain_iso9660_names_without_rock_ridge() {
    let tmp = TempDir::new().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(tree.join("boot")).unwrap();
    std::fs::write(tree.join("boot/vmlinuz"), b"kernel bytes").unwrap();
    std::fs::write(tree.join("boot/initramfs.xz"), b"initramfs bytes").unwrap();
    let out = tmp.path().join("plain.iso");
    run(Command::new("xorriso")
        .args(["-rockridge", "off", "-joliet", "off", "-outdev"])
        .arg(&out)
        .arg("-map")
        .arg(&tree)
        .arg("/"));
    let iso = Iso::open(&out).unwrap();
    assert!(!iso.has_rock_ridge());
    // xorriso records these as BOOT, VMLINUZ.;1 and INITRAMFS.XZ;1.
    let names: Vec<_> = iso
        .read_dir("/BOOT")
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["INITRAMFS.XZ", "VMLINUZ"]);
    for (path, want) in [
        ("/BOOT/VMLINUZ", &b"kernel bytes"[..]),
        ("/boot/vmlinuz", b"kernel bytes"),
        ("/boot/initramfs.xz", b"initramfs bytes"),
        ("/BOOT/INITRAMFS.XZ;1", b"initramfs bytes"),
    ] {
        let e = iso
            .lookup(path)
            .unwrap()
            .unwrap_or_else(|| panic!("{path} missing"));
        let mut v = Vec::new();
        iso.reader(&e).unwrap().read_to_end(&mut v).unwrap();
        assert_eq!(v, want, "{path}");
    }
}

/// The EFI image found three other ways: an appended partition without El Torito, via the
/// MBR (type 0xef) and via the GPT (ESP type GUID); and an El Torito image stored as a file
/// too big for the catalog's 16-bit count of 512-byte sectors, so only FAT sizing is right.
#[test]
fn efi_image_found_via_mbr_gpt_and_big_el_torito_file() {
    let tmp = TempDir::new().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("readme"), b"hi").unwrap();
    let payload = tmp.path().join("payload.efi");
    std::fs::write(&payload, b"MZ payload").unwrap();
    let make_fat = |img: &Path, kib: u64| {
        run(Command::new("mkfs.vfat")
            .args(["-C", "-n", "ESP"])
            .arg(img)
            .arg(kib.to_string()));
        run(Command::new("mmd").arg("-i").arg(img).arg("::EFI"));
        run(Command::new("mcopy")
            .arg("-i")
            .arg(img)
            .arg(&payload)
            .arg("::EFI/PAYLOAD.EFI"));
    };
    let small = tmp.path().join("efi.img");
    make_fat(&small, 2048);
    // 40 MiB > 65535 * 512 bytes.
    make_fat(&tree.join("efi.img"), 40 * 1024);
    let small_s = small.to_str().unwrap();
    let cases: [(&str, &[&str], u64); 3] = [
        (
            "mbr",
            &["-append_partition", "2", "0xef", small_s],
            2048 * 1024,
        ),
        (
            "gpt",
            &[
                "-append_partition",
                "2",
                "0xef",
                small_s,
                "-appended_part_as_gpt",
            ],
            2048 * 1024,
        ),
        (
            "eltorito-file",
            &["-e", "efi.img", "-no-emul-boot"],
            40 * 1024 * 1024,
        ),
    ];
    for (name, args, want_len) in cases {
        let out = tmp.path().join(format!("{name}.iso"));
        run(Command::new("xorriso")
            .args(["-as", "mkisofs", "-quiet", "-r", "-o"])
            .arg(&out)
            .args(args)
            .arg(&tree));
        let iso = Iso::open(&out).unwrap();
        let (offset, len) = iso.efi_boot_image().unwrap().expect("EFI image not found");
        assert_eq!(len, want_len, "{name}");
        let mut bytes = vec![0u8; len as usize];
        let mut f = File::open(&out).unwrap();
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(offset)).unwrap();
        f.read_exact(&mut bytes).unwrap();
        let part = tmp.path().join("part.img");
        std::fs::write(&part, &bytes).unwrap();
        run(Command::new("fsck.vfat").arg("-n").arg(&part));
        let got = run(Command::new("mtype")
            .arg("-i")
            .arg(&part)
            .arg("::EFI/PAYLOAD.EFI"));
        assert_eq!(got, b"MZ payload", "{name}");
    }
}

#[test]
fn fixture_builds_are_reproducible() {
    let tmp = TempDir::new().unwrap();
    let cached = fixture::talos_iso("default");
    let fresh = tmp.path().join("again.iso");
    fixture::build_iso("default", &fresh);
    assert_eq!(sha256sum(&fresh), sha256sum(&cached));
}

#[test]
fn bench_variant_is_talos_sized() {
    let iso = Iso::open(&fixture::talos_iso("bench")).unwrap();
    let kernel = iso.lookup("/boot/vmlinuz").unwrap().unwrap();
    assert_eq!(kernel.size, 20_000_000);
    let initramfs = iso.lookup("/boot/initramfs.xz").unwrap().unwrap();
    assert!(
        (80_000_000..100_000_000).contains(&initramfs.size),
        "initramfs is {} bytes",
        initramfs.size
    );
    // The padding is incompressible, so the disc can't be much smaller than its files.
    let disc = std::fs::metadata(fixture::talos_iso("bench"))
        .unwrap()
        .len();
    assert!(disc > kernel.size + initramfs.size);
}
