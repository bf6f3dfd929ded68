//! Integration tests for the initramfs module, judged by real tools: GNU cpio, zstd, xz,
//! mksquashfs, depmod/modprobe (kmod), ldd, readelf.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Cursor, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use mkappliance::initramfs::{
    self, cpio, elf, extract_rootfs_sqsh, read_entries, select_modules, write_appliance_initramfs,
    InitramfsSpec, Module, ModuleSet, APPLIANCE_MODULES,
};

mod common;
#[path = "common/fixture.rs"]
mod fixture;

const MTIME: u32 = 1_700_000_000;

fn tempdir() -> tempfile::TempDir {
    tempfile::TempDir::new_in(std::env::temp_dir()).unwrap()
}

/// Run a command, feeding `stdin`, and insist that it succeeds.
fn run(cmd: &mut Command, stdin: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One line of `cpio -itvn`: (mode string, size or "maj,min", name, symlink target).
#[derive(Debug, PartialEq)]
struct Listed {
    mode: String,
    uid: String,
    gid: String,
    size: String,
    name: String,
    target: Option<String>,
}

fn cpio_list(archive: &[u8]) -> Vec<Listed> {
    let out = run(Command::new("cpio").args(["-itvn"]), archive);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Anything but the block count (e.g. "junk", "premature end") means a format error.
    assert!(
        stderr
            .lines()
            .all(|l| l.ends_with("block") || l.ends_with("blocks")),
        "cpio complained: {stderr}"
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            // crw------- 1 0 0 5, 1 Nov 14 2023 dev/console
            let (size, rest) = if t[4].ends_with(',') {
                (format!("{}{}", t[4], t[5]), &t[6..])
            } else {
                (t[4].to_string(), &t[5..])
            };
            let name = rest[3].to_string();
            let target = (rest.len() > 5 && rest[4] == "->").then(|| rest[5].to_string());
            Listed {
                mode: t[0].into(),
                uid: t[2].into(),
                gid: t[3].into(),
                size,
                name,
                target,
            }
        })
        .collect()
}

fn sample_files() -> Vec<(String, Vec<u8>)> {
    // Sizes around every padding case, plus one bigger than the reader's buffer.
    let mut v: Vec<(String, Vec<u8>)> = (0..9)
        .map(|n| (format!("data/len{n}"), common::noise(n as u64 + 1, n)))
        .collect();
    v.push(("data/sub/big".into(), common::noise(99, 200_003)));
    v.push(("data/sub/a name with spaces".into(), b"spaces\n".to_vec()));
    v
}

fn write_sample(with_dev: bool) -> Vec<u8> {
    let mut w = cpio::Writer::new(Vec::new(), MTIME);
    if with_dev {
        w.add_dir("dev", 0o755).unwrap();
        w.add_char_dev("dev/console", 0o600, 5, 1).unwrap();
    }
    w.add_dir("data", 0o755).unwrap();
    w.add_dir("data/sub", 0o700).unwrap();
    for (name, data) in sample_files() {
        let mode = if name.ends_with("len3") { 0o755 } else { 0o644 };
        w.add_file(&name, mode, data.len() as u64, &mut Cursor::new(&data))
            .unwrap();
    }
    w.add_symlink("data/link", "sub/big").unwrap();
    w.finish().unwrap()
}

#[test]
fn gnu_cpio_lists_our_archive() {
    let archive = write_sample(true);
    let listed = cpio_list(&archive);
    let by_name: HashMap<&str, &Listed> = listed.iter().map(|l| (l.name.as_str(), l)).collect();
    assert_eq!(listed.len(), 4 + 11 + 1);
    for l in &listed {
        assert_eq!((l.uid.as_str(), l.gid.as_str()), ("0", "0"), "{l:?}");
    }
    assert_eq!(by_name["dev"].mode, "drwxr-xr-x");
    assert_eq!(by_name["dev/console"].mode, "crw-------");
    assert_eq!(by_name["dev/console"].size, "5,1");
    assert_eq!(by_name["data/sub"].mode, "drwx------");
    assert_eq!(by_name["data/len3"].mode, "-rwxr-xr-x");
    assert_eq!(by_name["data/len8"].mode, "-rw-r--r--");
    assert_eq!(by_name["data/len8"].size, "8");
    assert_eq!(by_name["data/sub/big"].size, "200003");
    assert_eq!(by_name["data/link"].mode, "lrwxrwxrwx");
    assert_eq!(by_name["data/link"].target.as_deref(), Some("sub/big"));
    // Directories come before their contents, in the order written.
    let names: Vec<&str> = listed.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(&names[..4], ["dev", "dev/console", "data", "data/sub"]);
}

#[test]
fn gnu_cpio_extracts_identical_bytes() {
    let archive = write_sample(false);
    let dir = tempdir();
    run(
        Command::new("cpio")
            .args(["-idm", "--no-absolute-filenames", "--quiet"])
            .current_dir(dir.path()),
        &archive,
    );
    for (name, data) in sample_files() {
        let p = dir.path().join(&name);
        assert_eq!(fs::read(&p).unwrap(), data, "{name}");
        let meta = fs::metadata(&p).unwrap();
        assert_eq!(meta.mtime(), MTIME as i64, "{name}");
        let want = if name.ends_with("len3") { 0o755 } else { 0o644 };
        assert_eq!(meta.permissions().mode() & 0o7777, want, "{name}");
    }
    let link = fs::read_link(dir.path().join("data/link")).unwrap();
    assert_eq!(link, Path::new("sub/big"));
    let sub = fs::metadata(dir.path().join("data/sub")).unwrap();
    assert!(sub.is_dir());
    assert_eq!(sub.permissions().mode() & 0o7777, 0o700);
}

#[test]
fn our_reader_reads_back_our_archive() {
    let archive = write_sample(true);
    let mut r = cpio::Reader::new(Cursor::new(&archive));
    let mut got = BTreeMap::new();
    while let Some(mut e) = r.next_entry().unwrap() {
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        assert_eq!(e.header.mtime, MTIME);
        got.insert(e.name.clone(), (e.mode(), data));
    }
    for (name, data) in sample_files() {
        assert_eq!(got[&name].1, data, "{name}");
    }
    assert_eq!(got["dev/console"].0, 0o020600);
    assert_eq!(got["data/link"], (0o120777, b"sub/big".to_vec()));
}

/// Make a tree on disk and archive it with GNU cpio in the given format.
fn gnu_archive(dir: &Path, format: &str) -> Vec<u8> {
    let out = run(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "find . | LC_ALL=C sort | cpio -o --quiet -H {format}"
            ))
            .current_dir(dir),
        b"",
    );
    out.stdout
}

fn populate(dir: &Path, seed: u32) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    fs::create_dir_all(dir.join("a/b")).unwrap();
    for (i, n) in [0usize, 1, 2, 3, 5, 70_001].iter().enumerate() {
        let name = format!("a/b/f{seed}_{i}");
        let data = common::noise(u64::from(seed) + i as u64, *n);
        fs::write(dir.join(&name), &data).unwrap();
        files.insert(name, data);
    }
    std::os::unix::fs::symlink("b/f0", dir.join("a/sym")).unwrap();
    files
}

#[test]
fn our_reader_reads_gnu_cpio_archives_including_concatenated() {
    let d1 = tempdir();
    let d2 = tempdir();
    let f1 = populate(d1.path(), 10);
    let f2 = populate(d2.path(), 20);
    for format in ["newc", "crc"] {
        let mut archive = gnu_archive(d1.path(), format);
        assert_eq!(archive.len() % 512, 0, "GNU cpio pads to blocks");
        archive.extend(gnu_archive(d2.path(), format));
        let mut r = cpio::Reader::new(Cursor::new(&archive));
        let mut files = BTreeMap::new();
        let mut links = Vec::new();
        let mut count = 0;
        while let Some(mut e) = r.next_entry().unwrap() {
            count += 1;
            if e.is_file() {
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                assert_eq!(data.len() as u64, e.size());
                files.insert(e.path().to_string(), data);
            } else if e.is_symlink() {
                links.push(e.read_link().unwrap());
            }
        }
        let mut want = f1.clone();
        want.extend(f2.clone());
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        for (name, data) in &want {
            assert!(&files[name] == data, "{format}: {name} differs");
        }
        assert_eq!(links, ["b/f0", "b/f0"]);
        // ".", "./a", "./a/b", 6 files, 1 symlink per archive.
        assert_eq!(count, 2 * 10, "{format}");
    }
}

#[test]
fn decompress_handles_real_zstd_xz_and_plain() {
    let archive = write_sample(false);
    let zst = run(Command::new("zstd").args(["-q", "-c", "-19"]), &archive).stdout;
    let xz = run(Command::new("xz").args(["-c", "--check=crc32"]), &archive).stdout;
    for (what, input) in [("plain", archive.clone()), ("zstd", zst), ("xz", xz)] {
        let listed = read_entries(Cursor::new(&input)).unwrap();
        assert_eq!(listed.len(), 14, "{what}");
        let mut out = Vec::new();
        initramfs::decompress(Cursor::new(input))
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, archive, "{what}");
    }
    let err = initramfs::decompress(Cursor::new(b"PK\x03\x04 not an initramfs".to_vec()))
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("504b0304"), "{err:#}");
}

#[test]
fn extracts_rootfs_sqsh_from_a_talos_like_initramfs() {
    // Talos: a newc cpio made by the usual tools with /init and /rootfs.sqsh, then zstd.
    let dir = tempdir();
    let sqsh = common::noise(7, 3_000_001);
    fs::write(dir.path().join("init"), b"\x7fELF fake init").unwrap();
    fs::write(dir.path().join("rootfs.sqsh"), &sqsh).unwrap();
    let archive = gnu_archive(dir.path(), "newc");
    let zst = run(Command::new("zstd").args(["-q", "-c"]), &archive).stdout;
    let mut f = extract_rootfs_sqsh(Cursor::new(&zst)).unwrap();
    let mut got = Vec::new();
    f.read_to_end(&mut got).unwrap();
    assert!(got == sqsh, "extracted rootfs.sqsh differs");

    let err = extract_rootfs_sqsh(Cursor::new(&zst[..zst.len() - 5000]))
        .err()
        .unwrap();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("truncated") || msg.contains("corrupt"),
        "{msg}"
    );

    fs::remove_file(dir.path().join("rootfs.sqsh")).unwrap();
    let archive = gnu_archive(dir.path(), "newc");
    let err = extract_rootfs_sqsh(Cursor::new(&archive)).err().unwrap();
    assert!(
        format!("{err:#}").contains("Talos initramfs has no rootfs.sqsh"),
        "{err:#}"
    );
}

fn mksquashfs(src: &Path, dest: &Path) {
    run(
        Command::new("mksquashfs").arg(src).arg(dest).args([
            "-comp",
            "zstd",
            "-noappend",
            "-quiet",
            "-all-root",
            "-e",
            "boot",
        ]),
        b"",
    );
}

const FAKE_KVER: &str = "6.1.0-test";

/// A modules tree with a hand-written modules.dep (paths relative to the kver dir).
fn fake_modules_root(root: &Path, kvers: &[&str]) {
    let dep = "\
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko.xz:
kernel/drivers/unused/unused.ko:
";
    for kver in kvers {
        let base = root.join("usr/lib/modules").join(kver);
        for line in dep.lines() {
            let path = line.split(':').next().unwrap();
            let p = base.join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, format!("fake module at {path}")).unwrap();
        }
        fs::write(base.join("modules.dep"), dep).unwrap();
        fs::write(
            base.join("modules.builtin"),
            "kernel/fs/ext4/ext4.ko\nkernel/net/packet/af_packet.ko\n",
        )
        .unwrap();
    }
}

#[test]
fn select_modules_on_a_hand_made_squashfs() {
    let dir = tempdir();
    let root = dir.path().join("root");
    fake_modules_root(&root, &[FAKE_KVER]);
    let sqsh = dir.path().join("rootfs.sqsh");
    mksquashfs(&root, &sqsh);
    let wanted = [
        "virtio_net",
        "virtio-pci",
        "ext4",
        "no_such_module",
        "failover",
        "e1000e",
        "af-packet",
        "virtio_net",
    ];
    let set = select_modules(fs::File::open(&sqsh).unwrap(), &wanted).unwrap();
    assert_eq!(set.kver, FAKE_KVER);
    let order: Vec<(&str, &str)> = set
        .modules
        .iter()
        .map(|m| (m.name.as_str(), m.rel_path.as_str()))
        .collect();
    assert_eq!(
        order,
        [
            ("failover", "kernel/net/core/failover.ko"),
            ("net_failover", "kernel/drivers/net/net_failover.ko"),
            ("virtio_net", "kernel/drivers/net/virtio_net.ko"),
            (
                "virtio_pci_modern_dev",
                "kernel/drivers/virtio/virtio_pci_modern_dev.ko"
            ),
            (
                "virtio_pci_legacy_dev",
                "kernel/drivers/virtio/virtio_pci_legacy_dev.ko"
            ),
            ("virtio_pci", "kernel/drivers/virtio/virtio_pci.ko"),
            (
                "e1000e",
                "kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko.xz"
            ),
        ]
    );
    for m in &set.modules {
        assert_eq!(
            m.data,
            format!("fake module at {}", m.rel_path).into_bytes()
        );
    }
    assert_eq!(set.builtin, ["ext4", "af_packet"]);
    assert_eq!(set.missing, ["no_such_module"]);
}

#[test]
fn select_modules_needs_exactly_one_kernel() {
    let dir = tempdir();
    let two = dir.path().join("two");
    fake_modules_root(&two, &["6.1.0-a", "6.1.0-b"]);
    let none = dir.path().join("none");
    fs::create_dir_all(none.join("usr/lib/firmware")).unwrap();
    for (src, want) in [(&two, "several"), (&none, "no kernel modules")] {
        let sqsh = dir.path().join("x.sqsh");
        mksquashfs(src, &sqsh);
        let err = select_modules(fs::File::open(&sqsh).unwrap(), &["virtio_net"])
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains(want), "{err:#}");
    }
    let not_sqsh = dir.path().join("garbage");
    fs::write(&not_sqsh, common::noise(3, 100_000)).unwrap();
    assert!(select_modules(fs::File::open(&not_sqsh).unwrap(), &["x"]).is_err());
}

/// What kmod says about a module: Ok(load order of module paths) or Err(builtin/unknown).
fn modprobe_show_depends(root: &Path, kver: &str, name: &str) -> Result<Vec<String>, String> {
    let out = Command::new("modprobe")
        .arg("--show-depends")
        .arg("-d")
        .arg(root)
        .args(["-S", kver, name])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err("missing".into());
    }
    if stdout.trim_start().starts_with("builtin ") {
        return Err("builtin".into());
    }
    let prefix = format!("{}/lib/modules/{kver}/", root.display());
    Ok(stdout
        .lines()
        .filter_map(|l| l.strip_prefix("insmod "))
        .map(|p| {
            let p = p.split_whitespace().next().unwrap();
            p.strip_prefix(&prefix)
                .unwrap_or_else(|| panic!("{p} not under {prefix}"))
                .to_string()
        })
        .collect())
}

#[test]
fn select_modules_agrees_with_kmod_on_debian_cloud_kernel() {
    let (root, kver) = fixture::depmod_root();
    let dir = tempdir();
    let sqsh = dir.path().join("rootfs.sqsh");
    mksquashfs(&root, &sqsh);
    let set = select_modules(fs::File::open(&sqsh).unwrap(), APPLIANCE_MODULES).unwrap();
    assert_eq!(set.kver, kver);
    let pos: HashMap<&str, usize> = set
        .modules
        .iter()
        .enumerate()
        .map(|(i, m)| (m.rel_path.as_str(), i))
        .collect();
    assert_eq!(pos.len(), set.modules.len(), "a module appears twice");
    let mut closure = std::collections::HashSet::new();
    for want in APPLIANCE_MODULES {
        let name = want.replace('-', "_");
        match modprobe_show_depends(&root, &kver, want) {
            Ok(load) => {
                // kmod's own load order: each dependency before the module itself.
                let me = load.last().unwrap();
                assert!(pos.contains_key(me.as_str()), "{want} ({me}) not selected");
                for dep in &load {
                    let i = *pos
                        .get(dep.as_str())
                        .unwrap_or_else(|| panic!("{dep}, needed by {want}, not selected"));
                    assert!(i <= pos[me.as_str()], "{dep} loads after {me}");
                    closure.insert(dep.clone());
                }
            }
            Err(kind) if kind == "builtin" => {
                assert!(set.builtin.contains(&name), "{want} builtin")
            }
            Err(_) => assert!(set.missing.contains(&name), "{want} should be missing"),
        }
    }
    // Nothing extra, and the data is the file's.
    assert_eq!(closure.len(), set.modules.len());
    for m in &set.modules {
        let on_disk = fs::read(root.join("usr/lib/modules").join(&kver).join(&m.rel_path)).unwrap();
        assert!(on_disk == m.data, "{} differs", m.rel_path);
    }
    // The cloud kernel has virtio as modules and ext4 built in (see DESIGN.md).
    let names: Vec<&str> = set.modules.iter().map(|m| m.name.as_str()).collect();
    for n in [
        "virtio_net",
        "virtio_pci",
        "virtio_blk",
        "failover",
        "net_failover",
    ] {
        assert!(names.contains(&n), "{n} not in {names:?}");
    }
    assert!(set.builtin.contains(&"ext4".to_string()));
    assert!(
        set.missing.contains(&"e1000e".to_string()),
        "{:?}",
        set.missing
    );

    // And the whole thing packs into an appliance initramfs.
    let init = std::env::current_exe().unwrap();
    let spec = InitramfsSpec {
        init: &init,
        modules: &set,
        mtime: MTIME,
        zstd_level: initramfs::DEFAULT_ZSTD_LEVEL,
    };
    let mut img = Vec::new();
    write_appliance_initramfs(&spec, &mut img).unwrap();
    let cpio = run(Command::new("zstd").args(["-d", "-c", "-q"]), &img).stdout;
    let listed = cpio_list(&cpio);
    let order = listed
        .iter()
        .find(|l| l.name == "etc/modules.order")
        .unwrap();
    assert!(order.size.parse::<u64>().unwrap() > 0);
}

fn fake_set() -> ModuleSet {
    let m = |name: &str, rel: &str| Module {
        name: name.into(),
        rel_path: rel.into(),
        data: format!("module {name}").into_bytes(),
    };
    ModuleSet {
        kver: FAKE_KVER.into(),
        modules: vec![
            m("failover", "kernel/net/core/failover.ko"),
            m("net_failover", "kernel/drivers/net/net_failover.ko"),
            m("virtio_net", "kernel/drivers/net/virtio_net.ko"),
        ],
        builtin: vec!["ext4".into()],
        missing: vec![],
    }
}

/// Extract a cpio (without device nodes, which need privileges) into `dir`.
fn extract(cpio: &[u8], dir: &Path) {
    run(
        Command::new("cpio")
            .args(["-idm", "--no-absolute-filenames", "--quiet", "-f", "dev/*"])
            .current_dir(dir),
        cpio,
    );
}

#[test]
fn appliance_initramfs_with_static_init() {
    let init = std::env::current_exe().unwrap();
    let set = fake_set();
    let spec = InitramfsSpec {
        init: &init,
        modules: &set,
        mtime: MTIME,
        zstd_level: initramfs::DEFAULT_ZSTD_LEVEL,
    };
    let mut img = Vec::new();
    write_appliance_initramfs(&spec, &mut img).unwrap();
    let mut again = Vec::new();
    write_appliance_initramfs(&spec, &mut again).unwrap();
    assert!(img == again, "two runs differ");
    assert_eq!(&img[..4], [0x28, 0xb5, 0x2f, 0xfd], "zstd magic");

    let dir = tempdir();
    let img_path = dir.path().join("appliance.img");
    fs::write(&img_path, &img).unwrap();
    run(Command::new("zstd").arg("-t").arg("-q").arg(&img_path), b"");
    // The frame carries a checksum (zstd -lv reports it).
    let info = run(Command::new("zstd").arg("-lv").arg(&img_path), b"").stdout;
    assert!(
        String::from_utf8_lossy(&info).contains("Check: XXH64"),
        "{}",
        String::from_utf8_lossy(&info)
    );
    let cpio = run(
        Command::new("zstd").args(["-d", "-c", "-q"]).arg(&img_path),
        b"",
    )
    .stdout;

    let listed = cpio_list(&cpio);
    let names: Vec<&str> = listed.iter().map(|l| l.name.as_str()).collect();
    let k = FAKE_KVER;
    let want = vec![
        "dev".to_string(),
        "dev/console".into(),
        "dev/null".into(),
        "etc".into(),
        "etc/modules.order".into(),
        "init".into(),
        "lib".into(),
        "lib/modules".into(),
        format!("lib/modules/{k}"),
        format!("lib/modules/{k}/kernel"),
        format!("lib/modules/{k}/kernel/drivers"),
        format!("lib/modules/{k}/kernel/drivers/net"),
        format!("lib/modules/{k}/kernel/drivers/net/net_failover.ko"),
        format!("lib/modules/{k}/kernel/drivers/net/virtio_net.ko"),
        format!("lib/modules/{k}/kernel/net"),
        format!("lib/modules/{k}/kernel/net/core"),
        format!("lib/modules/{k}/kernel/net/core/failover.ko"),
        "proc".into(),
        "run".into(),
        "sys".into(),
        "sysroot".into(),
    ];
    assert_eq!(names, want);
    let by: HashMap<&str, &Listed> = listed.iter().map(|l| (l.name.as_str(), l)).collect();
    assert_eq!(by["dev/console"].mode, "crw-------");
    assert_eq!(by["dev/console"].size, "5,1");
    assert_eq!(by["dev/null"].mode, "crw-rw-rw-");
    assert_eq!(by["dev/null"].size, "1,3");
    assert_eq!(by["init"].mode, "-rwxr-xr-x");
    assert_eq!(by["sysroot"].mode, "drwxr-xr-x");

    let out = tempdir();
    extract(&cpio, out.path());
    assert!(fs::read(out.path().join("init")).unwrap() == fs::read(&init).unwrap());
    assert_eq!(
        fs::read_to_string(out.path().join("etc/modules.order")).unwrap(),
        format!(
            "/lib/modules/{k}/kernel/net/core/failover.ko\n\
             /lib/modules/{k}/kernel/drivers/net/net_failover.ko\n\
             /lib/modules/{k}/kernel/drivers/net/virtio_net.ko\n"
        )
    );
    assert_eq!(
        fs::read(
            out.path()
                .join(format!("lib/modules/{k}/kernel/drivers/net/virtio_net.ko"))
        )
        .unwrap(),
        b"module virtio_net"
    );

    // read_entries (for `inspect`) agrees with cpio.
    let entries = read_entries(Cursor::new(&img)).unwrap();
    let names2: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(names2, want);
    let init_entry = entries.iter().find(|e| e.0 == "init").unwrap();
    assert_eq!(init_entry.1, 0o100755);
    assert_eq!(init_entry.2, fs::metadata(&init).unwrap().len());
}

#[test]
fn appliance_initramfs_with_dynamic_init_carries_its_libraries() {
    let init = Path::new("/bin/ls");
    let set = ModuleSet {
        kver: FAKE_KVER.into(),
        modules: vec![],
        builtin: vec![],
        missing: vec![],
    };
    let spec = InitramfsSpec {
        init,
        modules: &set,
        mtime: MTIME,
        zstd_level: 3,
    };
    let mut img = Vec::new();
    write_appliance_initramfs(&spec, &mut img).unwrap();
    let cpio = run(Command::new("zstd").args(["-d", "-c", "-q"]), &img).stdout;
    let names: Vec<String> = cpio_list(&cpio).into_iter().map(|l| l.name).collect();
    // ldd is the judge of what the loader needs.
    let ldd = run(Command::new("ldd").arg(init), b"").stdout;
    let mut needed = 0;
    for line in String::from_utf8_lossy(&ldd).lines() {
        let path = line
            .split("=>")
            .last()
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap();
        if let Some(rel) = path.strip_prefix('/') {
            needed += 1;
            assert!(
                names.contains(&rel.to_string()),
                "{path} missing in {names:?}"
            );
        }
    }
    assert!(needed >= 2, "{}", String::from_utf8_lossy(&ldd));
    let out = tempdir();
    extract(&cpio, out.path());
    assert_eq!(
        fs::read_to_string(out.path().join("etc/modules.order")).unwrap(),
        ""
    );
    // As root, the extracted tree must run its init on its own.
    if running_as_root() {
        let o = Command::new("chroot")
            .arg(out.path())
            .args(["/init", "-d", "/lib"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

fn running_as_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

#[test]
fn elf_dynamic_and_static() {
    let (interp, needed) = elf::interpreter_and_needed("/bin/ls").unwrap().unwrap();
    let readelf =
        String::from_utf8(run(Command::new("readelf").args(["-l", "-d", "/bin/ls"]), b"").stdout)
            .unwrap();
    assert!(
        readelf.contains(&format!("[Requesting program interpreter: {interp}]")),
        "{interp}"
    );
    assert_eq!(interp, "/lib64/ld-linux-x86-64.so.2");
    let want: Vec<String> = readelf
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .map(|l| {
            l.split('[')
                .nth(1)
                .unwrap()
                .trim_end_matches(']')
                .to_string()
        })
        .collect();
    assert_eq!(needed, want);
    assert!(needed.contains(&"libc.so.6".to_string()));

    let files = elf::runtime_files("/bin/ls").unwrap();
    assert_eq!(files[0], Path::new("/lib64/ld-linux-x86-64.so.2"));
    assert!(files.iter().any(|f| f.ends_with("libc.so.6")), "{files:?}");

    // The test binary itself is a static-pie (crt-static, see .cargo/config.toml).
    let me = std::env::current_exe().unwrap();
    let readelf =
        String::from_utf8(run(Command::new("readelf").arg("-l").arg(&me), b"").stdout).unwrap();
    assert!(!readelf.contains("INTERP"), "test binary is not static");
    assert_eq!(elf::interpreter_and_needed(&me).unwrap(), None);
    assert!(elf::runtime_files(&me).unwrap().is_empty());
}
