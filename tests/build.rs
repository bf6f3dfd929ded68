//! `mkappliance build` end to end on the Talos-shaped fixture ISO, judged by real tools:
//! sgdisk, fsck.vfat, e2fsck, mtools, debugfs, xorriso, zstd + cpio.

mod common;
#[path = "common/fixture.rs"]
mod fixture;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::*;

const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const ROOT_TYPE: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";

fn build(out: &Path, extra: &[&str]) -> std::path::PathBuf {
    let iso = fixture::talos_iso("default");
    run_ok(&mut build_cmd(&iso, out, extra));
    out.join("bootstrap-pxe.raw")
}

/// A file from the ISO, extracted by xorriso (an independent ISO reader).
fn from_iso(iso: &Path, path: &str, dir: &Path) -> Vec<u8> {
    let dest = dir.join(path.replace('/', "_"));
    run_ok(
        Command::new("xorriso")
            .args(["-osirrox", "on", "-indev"])
            .arg(iso)
            .args(["-extract", path])
            .arg(&dest),
    );
    std::fs::read(&dest).unwrap()
}

#[test]
fn image_passes_real_tools_and_holds_its_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let image = build(&out, &["--talosconfig", "examples/controlplane.yaml"]);
    let iso = fixture::talos_iso("default");
    let inputs = fixture::inputs();

    // The image holds secrets: 0600. Its checksum file agrees with sha256sum.
    assert_eq!(
        std::fs::metadata(&image).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let sum = run_ok(Command::new("sha256sum").arg(&image));
    let sum = String::from_utf8_lossy(&sum.stdout);
    let recorded = std::fs::read_to_string(out.join("bootstrap-pxe.raw.sha256")).unwrap();
    assert_eq!(
        recorded.split_whitespace().next(),
        sum.split_whitespace().next()
    );

    // GPT: sgdisk is happy; partition 1 is the ESP, partition 2 the x86-64 root.
    let v = run_ok(Command::new("sgdisk").arg("-v").arg(&image));
    assert!(
        String::from_utf8_lossy(&v.stdout).contains("No problems found"),
        "{v:?}"
    );
    let (esp_off, esp_size, esp_type, _) = sgdisk_partition(&image, 1);
    let (root_off, root_size, root_type, root_guid) = sgdisk_partition(&image, 2);
    assert_eq!(esp_type, ESP_TYPE);
    assert_eq!(root_type, ROOT_TYPE);
    assert_eq!(esp_off % (1 << 20), 0);
    assert_eq!(root_off % (1 << 20), 0);

    // ESP: fsck.vfat on the partition's bytes, then files read back with mtools.
    let esp_copy = tmp.path().join("esp.img");
    let bytes = std::fs::read(&image).unwrap();
    std::fs::write(
        &esp_copy,
        &bytes[esp_off as usize..(esp_off + esp_size) as usize],
    )
    .unwrap();
    let fsck = run_ok(Command::new("fsck.vfat").arg("-n").arg(&esp_copy));
    let fsck_out = String::from_utf8_lossy(&fsck.stdout);
    assert!(!fsck_out.to_lowercase().contains("corrupt"), "{fsck_out}");
    let label = run_ok(
        Command::new("mlabel")
            .arg("-s")
            .arg("-i")
            .arg(&esp_copy)
            .arg("::")
            .env("MTOOLS_SKIP_CHECK", "1"),
    );
    assert!(String::from_utf8_lossy(&label.stdout).contains("EFI"));
    assert_eq!(
        mcopy(&image, esp_off, "EFI/BOOT/BOOTX64.EFI"),
        std::fs::read(&inputs.systemd_boot).unwrap()
    );
    assert_eq!(
        mcopy(&image, esp_off, "vmlinuz"),
        std::fs::read(&inputs.kernel).unwrap()
    );
    assert_eq!(
        mcopy(&image, esp_off, "loader/loader.conf"),
        b"timeout 0\ndefault appliance.conf\neditor no\n"
    );
    let entry = String::from_utf8(mcopy(&image, esp_off, "loader/entries/appliance.conf")).unwrap();
    assert!(
        entry.contains("\nlinux /vmlinuz\ninitrd /appliance.img\n"),
        "{entry}"
    );
    assert!(
        entry.contains(&format!("mkappliance.root=PARTUUID={root_guid}")),
        "boot entry does not name root partition {root_guid}: {entry}"
    );
    assert!(entry.contains("console=ttyS0,115200") && entry.contains("console=tty0"));

    // appliance.img: a zstd newc cpio whose /init is this very binary.
    let initrd = mcopy(&image, esp_off, "appliance.img");
    let raw = tmp.path().join("appliance.img");
    std::fs::write(&raw, &initrd).unwrap();
    run_ok(Command::new("zstd").arg("-tq").arg(&raw));
    let x = tmp.path().join("initrd");
    std::fs::create_dir(&x).unwrap();
    run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "zstd -dc {} | cpio -idm --quiet --no-absolute-filenames",
                raw.display()
            ))
            .current_dir(&x),
    );
    assert_eq!(
        std::fs::read(x.join("init")).unwrap(),
        std::fs::read(bin()).unwrap()
    );
    let order = std::fs::read_to_string(x.join("etc/modules.order")).unwrap();
    for m in [
        "virtio_pci.ko",
        "virtio_blk.ko",
        "virtio_net.ko",
        "failover.ko",
    ] {
        assert!(
            order.lines().any(|l| l.ends_with(&format!("/{m}"))),
            "{m} not in modules.order:\n{order}"
        );
    }
    for line in order.lines() {
        assert!(
            x.join(line.trim_start_matches('/')).is_file(),
            "{line} listed but not in the initramfs"
        );
    }

    // Rootfs: e2fsck, then every served file read back with debugfs.
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(format!("{}?offset={root_off}", image.display()))
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    assert!(root_size > 0);
    let iso_initramfs = from_iso(&iso, "/boot/initramfs.xz", tmp.path());
    let expect: Vec<(&str, Vec<u8>)> = vec![
        (
            "srv/tftp/ipxe.efi",
            std::fs::read("/usr/lib/ipxe/ipxe.efi").unwrap(),
        ),
        (
            "srv/http/talos/v1.11.6/vmlinuz",
            std::fs::read(&inputs.kernel).unwrap(),
        ),
        ("srv/http/talos/v1.11.6/initramfs.xz", iso_initramfs),
        (
            "srv/http/configs/minipc.yaml",
            std::fs::read(example_config()).unwrap(),
        ),
        (
            "srv/http/configs/talosconfig",
            std::fs::read(example_config()).unwrap(),
        ),
    ];
    for (path, want) in expect {
        assert!(
            debugfs_cat(&image, root_off, path) == want,
            "{path} differs from its input"
        );
    }
    let boot = String::from_utf8(debugfs_cat(&image, root_off, "srv/http/boot.ipxe")).unwrap();
    assert!(
        boot.contains("talos.config=http://10.10.10.2/configs/minipc.yaml"),
        "{boot}"
    );
    let dnsmasq =
        String::from_utf8(debugfs_cat(&image, root_off, "etc/appliance/dnsmasq.conf")).unwrap();
    assert!(dnsmasq.contains("dhcp-host=00:11:22:33:44:55,10.10.10.100,"));
    let toml = String::from_utf8(debugfs_cat(
        &image,
        root_off,
        "etc/appliance/appliance.toml",
    ))
    .unwrap();
    assert!(
        toml.contains("talos_version = \"v1.11.6\"") && toml.contains("serve_talosconfig = true"),
        "{toml}"
    );
    for dir in ["var/lib/appliance", "var/log/appliance"] {
        let stat = run_ok(
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("stat /{dir}"))
                .arg(format!("{}?offset={root_off}", image.display())),
        );
        assert!(
            String::from_utf8_lossy(&stat.stdout).contains("Type: directory"),
            "{dir} missing"
        );
    }

    // Sparse and small: allocated ≤ payload + 16 MiB, apparent ≤ payload + 128 MiB.
    let meta = std::fs::metadata(&image).unwrap();
    let payload: u64 = {
        let kernel = std::fs::metadata(&inputs.kernel).unwrap().len();
        let boot_efi = std::fs::metadata(&inputs.systemd_boot).unwrap().len();
        let initramfs = std::fs::metadata(tmp.path().join("_boot_initramfs.xz"))
            .unwrap()
            .len();
        // ESP: bootloader, kernel, appliance.img; rootfs: ipxe, kernel, initramfs, 2 configs.
        boot_efi
            + kernel
            + initrd.len() as u64
            + std::fs::metadata("/usr/lib/ipxe/ipxe.efi").unwrap().len()
            + kernel
            + initramfs
    };
    assert!(
        meta.blocks() * 512 <= payload + (16 << 20),
        "allocated {} > payload {payload} + 16 MiB",
        meta.blocks() * 512
    );
    assert!(
        meta.len() <= payload + (128 << 20),
        "apparent {} > payload {payload} + 128 MiB",
        meta.len()
    );

    // inspect reads it back and agrees with sgdisk.
    let j = run_ok(Command::new(bin()).arg("inspect").arg("--json").arg(&image));
    let j: serde_json::Value = serde_json::from_slice(&j.stdout).unwrap();
    assert_eq!(j["config"]["talos_version"], "v1.11.6");
    assert_eq!(j["config"]["minipc_mac"], "00:11:22:33:44:55");
    assert_eq!(j["partitions"][1]["unique_guid"], root_guid.as_str());
    let cfg = j["rootfs_files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "srv/http/configs/minipc.yaml")
        .unwrap();
    assert!(
        cfg["sha256"].is_null(),
        "the machine config must be redacted in inspect"
    );
}

#[test]
fn builds_are_reproducible_and_inputs_change_guids() {
    let tmp = tempfile::tempdir().unwrap();
    let iso = fixture::talos_iso("default");
    let a = tmp.path().join("a");
    let b = tmp.path().join("elsewhere/b");
    run_ok(&mut build_cmd(&iso, &a, &[]));
    // Another working directory, time zone and umask must not change a byte.
    let wd = tmp.path().join("wd");
    std::fs::create_dir(&wd).unwrap();
    let mut cmd = build_cmd(&iso, &b, &[]);
    cmd.current_dir(&wd).env("TZ", "Pacific/Kiritimati");
    // SAFETY: umask in the child before exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::umask(0o077);
            Ok(())
        });
    }
    run_ok(&mut cmd);
    let ia = std::fs::read(a.join("bootstrap-pxe.raw")).unwrap();
    let ib = std::fs::read(b.join("bootstrap-pxe.raw")).unwrap();
    assert!(ia == ib, "two builds of the same inputs differ");

    let c = tmp.path().join("c");
    let cmd = build_cmd(&iso, &c, &[]);
    let args: Vec<_> = cmd.get_args().map(|s| s.to_os_string()).collect();
    let mut cmd2 = Command::new(bin());
    cmd2.args(args.iter().map(|a| {
        if a == MAC {
            "00:11:22:33:44:66".into()
        } else {
            a.clone()
        }
    }))
    .env("SOURCE_DATE_EPOCH", EPOCH);
    run_ok(&mut cmd2);
    let disk_guid = |p: &Path| {
        let out = run_ok(Command::new("sgdisk").arg("-p").arg(p));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with("Disk identifier"))
            .unwrap()
            .to_string()
    };
    let ga = disk_guid(&a.join("bootstrap-pxe.raw"));
    assert_ne!(
        ga,
        disk_guid(&c.join("bootstrap-pxe.raw")),
        "a different MAC gave the same disk GUID"
    );
    assert_ne!(
        sgdisk_partition(&a.join("bootstrap-pxe.raw"), 2).3,
        sgdisk_partition(&c.join("bootstrap-pxe.raw"), 2).3
    );
}

#[test]
fn bootloader_falls_back_to_the_iso_efi_image() {
    let tmp = tempfile::tempdir().unwrap();
    let iso = fixture::talos_iso("no-tree-bootloader");
    let out = tmp.path().join("out");
    run_ok(&mut build_cmd(&iso, &out, &[]));
    let image = out.join("bootstrap-pxe.raw");
    let (esp_off, ..) = sgdisk_partition(&image, 1);
    assert_eq!(
        mcopy(&image, esp_off, "EFI/BOOT/BOOTX64.EFI"),
        std::fs::read(&fixture::inputs().systemd_boot).unwrap()
    );
}

#[test]
fn overlays_and_templates_override() {
    let tmp = tempfile::tempdir().unwrap();
    let overlay = tmp.path().join("overlay");
    std::fs::create_dir_all(overlay.join("etc/appliance")).unwrap();
    std::fs::write(overlay.join("etc/appliance/extra.txt"), "hello overlay\n").unwrap();
    std::fs::write(overlay.join("etc/appliance/nginx.conf"), "# mine\n").unwrap();
    let templates = tmp.path().join("templates");
    std::fs::create_dir(&templates).unwrap();
    std::fs::write(
        templates.join("boot.ipxe.j2"),
        "#!ipxe\necho custom {{ talos_version }}\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let image = build(
        &out,
        &[
            "--overlay",
            overlay.to_str().unwrap(),
            "--templates",
            templates.to_str().unwrap(),
        ],
    );
    let (root_off, ..) = sgdisk_partition(&image, 2);
    assert_eq!(
        debugfs_cat(&image, root_off, "etc/appliance/extra.txt"),
        b"hello overlay\n"
    );
    assert_eq!(
        debugfs_cat(&image, root_off, "etc/appliance/nginx.conf"),
        b"# mine\n"
    );
    assert_eq!(
        debugfs_cat(&image, root_off, "srv/http/boot.ipxe"),
        b"#!ipxe\necho custom v1.11.6\n"
    );
}

#[test]
fn inspect_rejects_what_is_not_a_complete_appliance() {
    let tmp = tempfile::tempdir().unwrap();
    let inspect = |p: &Path| Command::new(bin()).arg("inspect").arg(p).output().unwrap();

    let junk = tmp.path().join("junk.raw");
    std::fs::write(&junk, vec![0u8; 1 << 20]).unwrap();
    let o = inspect(&junk);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a GPT disk"));

    let image = build(&tmp.path().join("out"), &[]);
    assert!(inspect(&image).status.success());
    let text = String::from_utf8(inspect(&image).stdout).unwrap();
    assert!(
        text.contains("(redacted)") && text.contains("/srv/http/configs/minipc.yaml"),
        "{text}"
    );

    // A copy cut short, even by its last sector (the backup GPT), is not an image:
    // sgdisk says what size the disk should be.
    let bytes = std::fs::read(&image).unwrap();
    let sgdisk = run_stdout(Command::new("sgdisk").arg("-p").arg(&image));
    let sectors: u64 = sgdisk
        .lines()
        .find_map(|l| l.strip_prefix("Disk "))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no disk size in {sgdisk}"))
        .parse()
        .unwrap();
    assert_eq!(sectors * 512, bytes.len() as u64, "{sgdisk}");
    for cut in [bytes.len() - 512, bytes.len() * 3 / 4] {
        let short = tmp.path().join("short.raw");
        std::fs::write(&short, &bytes[..cut]).unwrap();
        let o = inspect(&short);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "a {cut}-byte copy passed: {stderr}");
        assert!(
            stderr.contains("short.raw") && stderr.contains("truncated"),
            "{stderr}"
        );
    }

    // Remove a served file with the real debugfs: inspect must notice.
    let (root_off, ..) = sgdisk_partition(&image, 2);
    run_ok(
        Command::new("debugfs")
            .arg("-w")
            .arg("-R")
            .arg("rm /srv/tftp/ipxe.efi")
            .arg(format!("{}?offset={root_off}", image.display())),
    );
    let o = inspect(&image);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no /srv/tftp/ipxe.efi"),
        "{o:?}"
    );
}

#[test]
fn optional_boot_files_bootloader_and_a_dynamic_init_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let arm64 = tmp.path().join("ipxe-arm64.efi");
    std::fs::write(&arm64, b"stand-in arm64 iPXE").unwrap();
    let out = tmp.path().join("out");
    let image = build(
        &out,
        &[
            "--ipxe-bios",
            "/usr/lib/ipxe/undionly.kpxe",
            "--ipxe-arm64",
            arm64.to_str().unwrap(),
            "--bootloader",
            "/usr/lib/ipxe/snponly.efi",
            "--init-binary",
            "/bin/ls",
        ],
    );
    let (esp_off, ..) = sgdisk_partition(&image, 1);
    let (root_off, ..) = sgdisk_partition(&image, 2);
    assert_eq!(
        mcopy(&image, esp_off, "EFI/BOOT/BOOTX64.EFI"),
        std::fs::read("/usr/lib/ipxe/snponly.efi").unwrap()
    );
    assert_eq!(
        debugfs_cat(&image, root_off, "srv/tftp/undionly.kpxe"),
        std::fs::read("/usr/lib/ipxe/undionly.kpxe").unwrap()
    );
    assert_eq!(
        debugfs_cat(&image, root_off, "srv/tftp/ipxe-arm64.efi"),
        b"stand-in arm64 iPXE"
    );
    let dnsmasq =
        String::from_utf8(debugfs_cat(&image, root_off, "etc/appliance/dnsmasq.conf")).unwrap();
    assert!(
        dnsmasq.contains("dhcp-boot=tag:!ipxe,tag:bios,undionly.kpxe,,10.10.10.2"),
        "{dnsmasq}"
    );
    assert!(
        dnsmasq.contains("dhcp-boot=tag:!ipxe,tag:arm64,ipxe-arm64.efi,,10.10.10.2"),
        "{dnsmasq}"
    );

    // A dynamically linked /init brings its interpreter and libraries, as ldd lists them.
    let x = tmp.path().join("initrd");
    std::fs::create_dir(&x).unwrap();
    std::fs::write(
        tmp.path().join("appliance.img"),
        mcopy(&image, esp_off, "appliance.img"),
    )
    .unwrap();
    run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("zstd -dc ../appliance.img | cpio -idm --quiet --no-absolute-filenames")
            .current_dir(&x),
    );
    assert_eq!(
        std::fs::read(x.join("init")).unwrap(),
        std::fs::read("/bin/ls").unwrap()
    );
    let ldd = run_ok(Command::new("ldd").arg("/bin/ls"));
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let inside = x.join(lib.trim_start_matches('/'));
        assert!(
            inside.exists(),
            "{lib} (from ldd /bin/ls) is not in the initramfs"
        );
    }
}

/// `build --help` names every place the build looks for iPXE, in the order it looks.
#[test]
fn help_names_every_ipxe_default() {
    let help = run_stdout(Command::new(bin()).args(["build", "--help"]));
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut at = 0;
    for place in mkappliance::builder::IPXE_SEARCH
        .iter()
        .copied()
        .chain(["`mkappliance fetch ipxe` cache"])
    {
        let found = help[at..]
            .find(place)
            .unwrap_or_else(|| panic!("{place} not in the --ipxe help (in order): {help}"));
        at += found + place.len();
    }
}
