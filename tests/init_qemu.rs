//! The appliance init, proven in a real VM: Debian's cloud kernel boots a hand-made
//! initramfs (real `cpio` + `zstd`) whose `/init` is our binary, with a virtio disk whose
//! GPT (made by `sgdisk`) holds an ext4 root (made by `mkfs.ext4`). The serial console
//! must show the ready line; Ctrl-Alt-Del and the ACPI power button must power the VM
//! off with the root cleanly unmounted (judged by `dumpe2fs`); a GUID that matches nothing must give
//! `MKAPPLIANCE-ERROR` and a live PID 1, not a kernel panic.
//!
//! The kernel is the fixture script's Debian cloud kernel (`tests/common/fixture.rs`).

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tempfile::TempDir;

mod common;
#[path = "common/fixture.rs"]
mod fixture;

use common::qemu::{Boot, Vm, VmSpec};

/// Debian's metapackage; its dependency is the versioned kernel package we extract.
/// Modules a virtio-blk + ext4 root needs on that kernel (ext4 is built in there).
/// `virtio_pci` is the bus driver: nothing depends on it, so it must be named.
/// `button` is the ACPI power button (built into the Talos kernel, a module here).
const NEEDED_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_blk",
    "ext4",
    "button",
    "virtio_net",
];
/// The x86-64 root partition type of the Discoverable Partitions Specification.
const ROOT_TYPE: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
const ROOT_GUID: &str = "6A1B2C3D-4E5F-4A6B-8C7D-9E0F1A2B3C4D";
/// On no disk: the init must say so and stay alive.
const MISSING_GUID: &str = "DEADBEEF-0BAD-4F00-8BAD-F00DCAFEBABE";
const DISK_MIB: u64 = 64;
const READY_TIMEOUT: Duration = Duration::from_secs(120);
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(60);
/// Written by the init; tests compare against these literals, not the crate's constants.
const READY: &str = "MKAPPLIANCE-READY";
const ERROR: &str = "MKAPPLIANCE-ERROR";

fn run(cmd: &mut Command) -> String {
    crate::common::run_stdout(cmd)
}

/// Debian's cloud kernel, extracted and depmod'ed.
struct Kernel {
    /// The extracted package tree (`boot/`, `lib/modules/<kver>/`).
    root: PathBuf,
    kver: String,
}

impl Kernel {
    fn vmlinuz(&self) -> PathBuf {
        fixture::inputs().kernel.clone()
    }

    /// Absolute module paths (inside the tree) for `names` and their dependencies,
    /// dependencies first, as `modprobe --show-depends` orders them.
    fn module_paths(&self, names: &[&str]) -> Vec<String> {
        let mut paths: Vec<String> = Vec::new();
        for name in names {
            let out = run(Command::new("modprobe")
                .arg("--show-depends")
                .arg("-d")
                .arg(&self.root)
                .arg("-S")
                .arg(&self.kver)
                .arg(name));
            for line in out.lines() {
                // "insmod /abs/path.ko [params]" or "builtin ext4"
                let mut words = line.split_whitespace();
                if words.next() != Some("insmod") {
                    continue;
                }
                let full = words.next().expect("insmod line names a file");
                let rel = full
                    .strip_prefix(self.root.to_str().unwrap())
                    .unwrap_or_else(|| panic!("{full} is outside {}", self.root.display()));
                if !paths.iter().any(|p| p == rel) {
                    paths.push(rel.to_string());
                }
            }
        }
        paths
    }
}

/// Debian's cloud kernel from the fixture cache (one download for all tests).
fn kernel() -> &'static Kernel {
    static KERNEL: OnceLock<Kernel> = OnceLock::new();
    KERNEL.get_or_init(|| {
        let (root, kver) = fixture::depmod_root();
        Kernel { root, kver }
    })
}

/// The binary to use as `/init`: the main binary, which dispatches to the appliance init
/// when started as `init` (and refuses outside PID 1).
fn init_binary() -> PathBuf {
    let main = PathBuf::from(env!("CARGO_BIN_EXE_mkappliance"));
    let out = Command::new(&main).arg0("init").output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refusing to run: not PID 1"),
        "mkappliance started as `init` did not dispatch to the appliance init: {out:?}"
    );
    main
}

/// One newc cpio header + name (+ no data), padded to 4 bytes.
fn newc_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32)) {
    let namesize = name.len() + 1;
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        0,
        0,
        0,
        rdev.0,
        rdev.1,
        namesize as u32,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// A newc archive with just the device nodes the kernel and std need before devtmpfs:
/// written here so the test needs no root (mknod) and no fakeroot.
fn device_nodes_cpio() -> Vec<u8> {
    let mut out = Vec::new();
    newc_entry(&mut out, 900_001, "dev/console", 0o020600, (5, 1));
    newc_entry(&mut out, 900_002, "dev/null", 0o020666, (1, 3));
    newc_entry(&mut out, 0, "TRAILER!!!", 0, (0, 0));
    out
}

/// Build a zstd-compressed initramfs: our init, the modules and their list.
/// `extra_order` lines are appended to `etc/modules.order` as they are.
fn make_initramfs(dir: &Path, kernel: &Kernel, extra_order: &[&str]) -> (PathBuf, usize) {
    let stage = dir.join("stage");
    for d in ["dev", "etc", "proc", "sys", "run", "sysroot"] {
        std::fs::create_dir_all(stage.join(d)).unwrap();
    }
    std::fs::copy(init_binary(), stage.join("init")).unwrap();
    let modules = kernel.module_paths(NEEDED_MODULES);
    assert!(
        modules.iter().any(|m| m.ends_with("/virtio_blk.ko")),
        "{modules:?}"
    );
    for m in &modules {
        let dst = stage.join(m.trim_start_matches('/'));
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(kernel.root.join(m.trim_start_matches('/')), dst).unwrap();
    }
    let mut order = modules.join("\n") + "\n";
    for l in extra_order {
        order.push_str(l);
        order.push('\n');
    }
    std::fs::write(stage.join("etc/modules.order"), order).unwrap();

    // Every path under the stage, parents first, as cpio wants them.
    let mut list = Vec::new();
    let mut todo = vec![PathBuf::from(".")];
    while let Some(rel) = todo.pop() {
        list.push(rel.clone());
        let abs = stage.join(&rel);
        if abs.is_dir() && !abs.is_symlink() {
            let mut kids: Vec<PathBuf> = std::fs::read_dir(&abs)
                .unwrap()
                .map(|e| rel.join(e.unwrap().file_name()))
                .collect();
            kids.sort();
            kids.reverse();
            todo.extend(kids);
        }
    }
    let list: String = list.iter().map(|p| format!("{}\n", p.display())).collect();
    let mut cpio = Command::new("cpio")
        .args(["-o", "-H", "newc", "-R", "0:0", "--quiet"])
        .current_dir(&stage)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = cpio.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(list.as_bytes()).unwrap());
    let mut archive = Vec::new();
    cpio.stdout
        .take()
        .unwrap()
        .read_to_end(&mut archive)
        .unwrap();
    writer.join().unwrap();
    assert!(cpio.wait().unwrap().success());

    // The kernel unpacks concatenated archives (zero padding between them is skipped).
    let nodes = device_nodes_cpio();
    let listing = Command::new("cpio")
        .args(["-itv", "--quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(&nodes)?;
            c.wait_with_output()
        })
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.contains("crw-------")
            && listing.contains("5,   1")
            && listing.contains("dev/console"),
        "cpio does not read our device nodes as expected:\n{listing}"
    );
    archive.extend_from_slice(&nodes);

    let raw = dir.join("initramfs.cpio");
    std::fs::write(&raw, &archive).unwrap();
    let img = dir.join("initramfs.zst");
    run(Command::new("zstd")
        .args(["-q", "-f", "-10"])
        .arg(&raw)
        .arg("-o")
        .arg(&img));
    (img, modules.len())
}

/// A GPT disk: part 1 ESP-typed, part 2 root-typed with ROOT_GUID and an ext4 on it.
/// Returns the image and the byte offset of partition 2.
fn make_disk(dir: &Path) -> (PathBuf, u64) {
    let disk = dir.join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(DISK_MIB << 20)
        .unwrap();
    run(Command::new("sgdisk")
        .args(["-n", "1:2048:+8M", "-t", "1:EF00", "-n", "2:0:0"])
        .arg("-t")
        .arg(format!("2:{ROOT_TYPE}"))
        .arg("-u")
        .arg(format!("2:{ROOT_GUID}"))
        .arg(&disk));
    let info = run(Command::new("sgdisk").arg("-i").arg("2").arg(&disk));
    let sector = |field: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in:\n{info}"))
    };
    let (first, last) = (sector("First sector:"), sector("Last sector:"));
    let offset = first * 512;
    let size_kib = (last + 1 - first) / 2;
    // What the init serves from: the appliance config and the machine config.
    let tree = dir.join("rootfs");
    let cfg = common::sample_config();
    for (path, text) in [
        ("etc/appliance/appliance.toml", cfg.to_toml().unwrap()),
        (
            "srv/http/configs/minipc.yaml",
            "version: v1alpha1\n".to_string(),
        ),
    ] {
        std::fs::create_dir_all(tree.join(path).parent().unwrap()).unwrap();
        std::fs::write(tree.join(path), text).unwrap();
    }
    for d in ["srv/tftp", "var/lib/appliance", "var/log/appliance"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "appliance"])
        .arg("-d")
        .arg(&tree)
        .arg(format!("-Eoffset={offset}"))
        .arg(&disk)
        .arg(format!("{size_kib}k")));
    assert_eq!(dumpe2fs_field(&disk, offset, "Mount count"), "0");
    (disk, offset)
}

fn dumpe2fs_field(disk: &Path, offset: u64, field: &str) -> String {
    let out = run(Command::new("dumpe2fs")
        .arg("-h")
        .arg(format!("{}?offset={offset}", disk.display()))
        .stderr(Stdio::null()));
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {field} in dumpe2fs output:\n{out}"))
}

/// Boot `kernel` with `initrd` and `disk` (virtio), and a PXE NIC on a hub of its own:
/// nobody else on the link, no uplink.
fn boot(dir: &Path, kernel: &Kernel, initrd: &Path, disk: &Path, append: &str) -> Vm {
    let spec = VmSpec {
        boot: Boot::Kernel {
            kernel: kernel.vmlinuz(),
            initrd: initrd.to_path_buf(),
            append: append.to_string(),
        },
        ..VmSpec::new(vec![
            "-drive".into(),
            format!("file={},if=virtio,format=raw", disk.display()),
            "-netdev".into(),
            "hubport,id=pxe,hubid=0".into(),
            "-device".into(),
            "virtio-net-pci,netdev=pxe".into(),
        ])
    };
    Vm::start(dir, "vm", spec)
}

fn assert_no_panic(console: &str) {
    for bad in ["Kernel panic", "Attempted to kill init", "panicked at"] {
        assert!(!console.contains(bad), "{bad:?} on the console:\n{console}");
    }
}

#[test]
fn boots_mounts_root_and_powers_off_cleanly() {
    let kernel = kernel();
    let dir = TempDir::new().unwrap();
    let (initrd, nmodules) = make_initramfs(dir.path(), kernel, &[]);
    let (disk, offset) = make_disk(dir.path());
    // tty0 last: /dev/console is then the VGA console, so the serial port sees our lines
    // only because the init writes to ttyS0 itself.
    let append = format!("console=ttyS0 console=tty0 mkappliance.root=PARTUUID={ROOT_GUID}");
    let mut vm = boot(dir.path(), kernel, &initrd, &disk, &append);
    let ready = vm.wait_for(READY, READY_TIMEOUT);
    eprintln!("{ready}");
    let facts: Vec<&str> = ready
        .split_once(READY)
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    assert!(facts.contains(&"root=/dev/vda2"), "{ready}");
    assert!(
        facts.contains(&format!("modules={nmodules}").as_str()),
        "{ready}"
    );
    assert!(
        facts.contains(&format!("kver={}", kernel.kver).as_str()),
        "{ready}"
    );
    let uptime = facts
        .iter()
        .find_map(|f| f.strip_prefix("uptime_ms="))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no uptime_ms in {ready}"));
    assert!(
        uptime > 0 && uptime < READY_TIMEOUT.as_millis() as u64,
        "{ready}"
    );
    let console = vm.text();
    assert!(
        console.contains("appliance init (kernel"),
        "no banner:\n{console}"
    );
    // The kernel found /dev/console in our cpio (else it warns and leaves fds 0-2 closed).
    assert!(
        !console.contains("unable to open an initial console"),
        "{console}"
    );
    assert!(!console.contains(ERROR), "{console}");
    assert!(!console.contains("power button: not watched"), "{console}");

    vm.ctrl_alt_del();
    let status = vm.wait_exit(POWEROFF_TIMEOUT);
    let console = vm.text();
    assert!(status.success(), "qemu exited with {status}:\n{console}");
    assert!(console.contains("SIGINT: powering off"), "{console}");
    assert_no_panic(&console);
    // Mounted read-write exactly once, and unmounted cleanly before power-off.
    assert_eq!(dumpe2fs_field(&disk, offset, "Mount count"), "1");
    assert_eq!(dumpe2fs_field(&disk, offset, "Filesystem state"), "clean");
    // With a journal, "mounted" shows as needs_recovery until a real unmount clears it.
    let features = dumpe2fs_field(&disk, offset, "Filesystem features");
    assert!(features.contains("has_journal"), "{features}");
    assert!(!features.contains("needs_recovery"), "{features}");
}

#[test]
fn acpi_power_button_powers_off_cleanly() {
    let kernel = kernel();
    let dir = TempDir::new().unwrap();
    let (initrd, _) = make_initramfs(dir.path(), kernel, &[]);
    let (disk, offset) = make_disk(dir.path());
    let append = format!("console=ttyS0 mkappliance.root=PARTUUID={ROOT_GUID}");
    let mut vm = boot(dir.path(), kernel, &initrd, &disk, &append);
    vm.wait_for(READY, READY_TIMEOUT);
    vm.power_button();
    let status = vm.wait_exit(POWEROFF_TIMEOUT);
    let console = vm.text();
    assert!(status.success(), "qemu exited with {status}:\n{console}");
    assert!(console.contains("power button: powering off"), "{console}");
    assert_no_panic(&console);
    assert_eq!(dumpe2fs_field(&disk, offset, "Mount count"), "1");
    let features = dumpe2fs_field(&disk, offset, "Filesystem features");
    assert!(!features.contains("needs_recovery"), "{features}");
}

#[test]
fn unknown_root_guid_reports_error_and_stays_alive() {
    let kernel = kernel();
    let dir = TempDir::new().unwrap();
    // A module that does not exist must be reported, and loading must go on.
    let (initrd, _) = make_initramfs(dir.path(), kernel, &["/lib/modules/no-such-module.ko"]);
    let (disk, offset) = make_disk(dir.path());
    let append = format!("console=ttyS0 mkappliance.root=PARTUUID={MISSING_GUID}");
    let mut vm = boot(dir.path(), kernel, &initrd, &disk, &append);
    let error = vm.wait_for(ERROR, READY_TIMEOUT);
    eprintln!("{error}");
    assert!(
        error.to_uppercase().contains(MISSING_GUID),
        "error does not name the GUID: {error}"
    );
    let console = vm.text();
    assert!(
        console.contains("/lib/modules/no-such-module.ko failed"),
        "{console}"
    );
    // The disk was seen, so the virtio modules did load despite the bad entry.
    assert!(error.contains("vda"), "{error}");
    assert!(!console.contains(READY), "{console}");

    // Still PID 1 and still listening: Ctrl-Alt-Del powers off.
    std::thread::sleep(Duration::from_secs(2));
    vm.ctrl_alt_del();
    let status = vm.wait_exit(POWEROFF_TIMEOUT);
    let console = vm.text();
    assert!(status.success(), "qemu exited with {status}:\n{console}");
    assert!(console.contains("SIGINT: powering off"), "{console}");
    assert_no_panic(&console);
    assert_eq!(dumpe2fs_field(&disk, offset, "Mount count"), "0");
}

#[test]
fn refuses_to_run_outside_pid_1() {
    let out = Command::new(init_binary()).arg0("init").output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refusing to run: not PID 1"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains(READY));
}
