//! The e2e test's images: built from a SOPS-encrypted config (or `IT_BOOTSTRAP_DISK`, or
//! real Talos), what to expect of them, and how the broken-image tests break them.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::rig::env_or;
use crate::{common, fixture, sha256_hex, PROBE_URL, PXE_NIC_MAC, UPLINK_MAC};
use crate::{BOOTSTRAP_IP, MINIPC_IP, MINIPC_MAC, ROOTFS_CONFIG};

/// What to boot and what to expect of it.
pub struct Setup {
    pub image: PathBuf,
    pub talos: String,
    /// The mini-PC MAC pinned in the image.
    pub minipc_mac: String,
    /// The MAC the client boots with (the pinned one unless a test says otherwise).
    pub client_mac: String,
    pub minipc_ip: String,
    pub appliance_ip: String,
    /// SHA-256 of the config the client must receive.
    pub config_sha: String,
    /// The appliance's NIC MACs when the image pins them.
    pub pxe_nic_mac: Option<String>,
    pub uplink_mac: Option<String>,
    /// The client init fetches `fixture.probe=` through the NAT.
    pub probe: bool,
    pub real_talos: Option<RealTalos>,
}

/// A real Talos client: talosctl and the talosconfig made with the machine config.
pub struct RealTalos {
    pub talosctl: PathBuf,
    pub talosconfig: PathBuf,
}

/// Encrypt `plain` with the real sops for a new age key; returns (encrypted, key file,
/// what the real sops decrypts it to).
fn sops_encrypt(dir: &Path, plain: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let key = dir.join("age-key.txt");
    common::run_ok(Command::new("age-keygen").arg("-o").arg(&key));
    let recipient = std::fs::read_to_string(&key)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("# public key: ").map(str::to_string))
        .expect("age-keygen writes the public key");
    let sops = |args: &[&std::ffi::OsStr]| {
        let mut c = Command::new(common::sops_bin());
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", dir)
            .env("SOPS_AGE_KEY_FILE", &key)
            .args(args);
        common::run_ok(&mut c).stdout
    };
    let enc = dir.join("controlplane.enc.yaml");
    let src = dir.join("controlplane.yaml");
    if plain != src {
        std::fs::copy(plain, &src).unwrap();
    }
    std::fs::write(
        &enc,
        sops(&[
            "--encrypt".as_ref(),
            "--age".as_ref(),
            recipient.as_ref(),
            src.as_os_str(),
        ]),
    )
    .unwrap();
    let text = std::fs::read_to_string(&enc).unwrap();
    assert!(
        text.contains("ENC[AES256_GCM"),
        "sops did not encrypt:\n{text}"
    );
    let decrypted = sops(&["--decrypt".as_ref(), enc.as_os_str()]);
    (enc, key, decrypted)
}

/// `IT_TALOS_ISO` and `IT_TALOSCTL`, both or neither.
pub fn real_talos_knobs() -> Option<(PathBuf, PathBuf)> {
    match (
        std::env::var_os("IT_TALOS_ISO"),
        std::env::var_os("IT_TALOSCTL"),
    ) {
        (Some(iso), Some(ctl)) => Some((iso.into(), ctl.into())),
        (None, None) => None,
        _ => panic!("set both IT_TALOS_ISO and IT_TALOSCTL for the real-Talos path, or neither"),
    }
}

/// Build the image (or take `IT_BOOTSTRAP_DISK`) and say what to expect of it.
pub fn prepare(dir: &Path) -> Setup {
    if let Some(disk) = std::env::var_os("IT_BOOTSTRAP_DISK") {
        return external_image(PathBuf::from(disk));
    }
    let minipc_mac = env_or("IT_MINIPC_MAC", MINIPC_MAC).to_lowercase();
    let minipc_ip = env_or("IT_MINIPC_IP", MINIPC_IP);
    let appliance_ip = env_or("IT_BOOTSTRAP_IP", BOOTSTRAP_IP);
    let talos = env_or("IT_TALOS_VERSION", common::TALOS);
    let real = real_talos_knobs();

    let (iso, plain, mut extra_args, real_talos) = match &real {
        Some((iso, talosctl)) => {
            // A real machine config and its talosconfig, for a node that installs to the
            // client VM's virtio disk and whose API the test reaches on 127.0.0.1.
            let out = dir.join("talos");
            common::run_ok(
                Command::new(talosctl)
                    .args(["gen", "config", "e2e"])
                    .arg(format!("https://{minipc_ip}:6443"))
                    .args([
                        "--install-disk",
                        "/dev/vda",
                        "--additional-sans",
                        "127.0.0.1",
                    ])
                    .arg("--output-dir")
                    .arg(&out),
            );
            let rt = RealTalos {
                talosctl: talosctl.clone(),
                talosconfig: out.join("talosconfig"),
            };
            (
                iso.clone(),
                out.join("controlplane.yaml"),
                String::new(),
                Some(rt),
            )
        }
        None => {
            let variant = if talos == common::TALOS {
                "default"
            } else {
                &talos
            };
            let args = format!("fixture.probe={PROBE_URL}");
            (
                fixture::talos_iso(variant),
                common::example_config(),
                args,
                None,
            )
        }
    };
    // console=ttyS0 last: the client's /dev/console is then the serial port.
    extra_args.push_str(" console=ttyS0");

    let (enc, key, plain) = sops_encrypt(dir, &plain);
    let out = dir.join("out");
    let mut build = Command::new(common::bin());
    build
        .args(["build", &talos, "e2e", &minipc_mac, "--quiet"])
        .arg("--iso")
        .arg(&iso)
        .arg("--config")
        .arg(&enc)
        .arg("--age-key-file")
        .arg(&key)
        .arg("--out-dir")
        .arg(&out)
        .args(["--minipc-ip", &minipc_ip])
        .arg("--appliance-ip")
        .arg(format!("{appliance_ip}/24"))
        .args(["--internal-mac", PXE_NIC_MAC, "--uplink-mac", UPLINK_MAC])
        .arg("--extra-kernel-args")
        .arg(extra_args.trim())
        .env("SOURCE_DATE_EPOCH", common::EPOCH);
    common::run_ok(&mut build);
    Setup {
        image: out.join("bootstrap-pxe.raw"),
        talos,
        client_mac: env_or("IT_CLIENT_MAC", &minipc_mac).to_lowercase(),
        minipc_mac,
        minipc_ip,
        appliance_ip,
        config_sha: sha256_hex(&plain),
        pxe_nic_mac: Some(PXE_NIC_MAC.into()),
        uplink_mac: Some(UPLINK_MAC.into()),
        probe: real_talos.is_none(),
        real_talos,
    }
}

/// `IT_BOOTSTRAP_DISK`: what the image's own config (read back by `inspect`) promises.
pub fn external_image(image: PathBuf) -> Setup {
    assert!(
        real_talos_knobs().is_none(),
        "IT_BOOTSTRAP_DISK and the real-Talos knobs are not supported together"
    );
    let json = common::run_stdout(
        Command::new(common::bin())
            .arg("inspect")
            .arg("--json")
            .arg(&image),
    );
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    let cfg = &report["config"];
    let text = |v: &serde_json::Value| v.as_str().map(str::to_lowercase);
    let args = cfg["talos_kernel_args"].as_str().unwrap_or_default();
    assert!(
        args.contains("console=ttyS0"),
        "IT_BOOTSTRAP_DISK: the image's Talos kernel arguments lack console=ttyS0, so the client's stages can't be seen: rebuild with --extra-kernel-args console=ttyS0"
    );
    let (root, ..) = common::sgdisk_partition(&image, 2);
    let config = common::debugfs_cat(&image, root, ROOTFS_CONFIG.trim_start_matches('/'));
    let minipc_mac = text(&cfg["minipc_mac"]).unwrap();
    Setup {
        talos: text(&cfg["talos_version"]).unwrap(),
        client_mac: env_or("IT_CLIENT_MAC", &minipc_mac).to_lowercase(),
        minipc_mac,
        minipc_ip: text(&cfg["network"]["minipc_ip"]).unwrap(),
        appliance_ip: text(&cfg["network"]["appliance"])
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_string(),
        config_sha: sha256_hex(&config),
        pxe_nic_mac: text(&cfg["network"]["internal_mac"]),
        uplink_mac: text(&cfg["network"]["uplink_mac"]),
        probe: args.contains(&format!("fixture.probe={PROBE_URL}")),
        real_talos: None,
        image,
    }
}

/// Edit the image's ext4 rootfs in place with the real `debugfs -w` (one command per
/// line), then check it with `e2fsck -fn`.
pub fn edit_rootfs(image: &Path, commands: &str) {
    let (offset, size, ..) = common::sgdisk_partition(image, 2);
    let dir = image.parent().unwrap();
    let script = dir.join("debugfs.cmds");
    std::fs::write(&script, commands).unwrap();
    let spec = format!("{}?offset={offset}", image.display());
    common::run_ok(
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&script)
            .arg(&spec),
    );
    // e2fsck wants the filesystem alone: check a copy of the partition.
    let part = dir.join("rootfs.check");
    let mut src = std::fs::File::open(image).unwrap();
    std::io::Seek::seek(&mut src, std::io::SeekFrom::Start(offset)).unwrap();
    let mut dst = std::fs::File::create(&part).unwrap();
    std::io::copy(&mut std::io::Read::take(src, size), &mut dst).unwrap();
    common::run_ok(Command::new("e2fsck").arg("-fn").arg(&part));
    std::fs::remove_file(&part).unwrap();
}

pub fn parent(path: &str) -> &str {
    path.rsplit_once('/').unwrap().0
}

pub fn file_name(path: &str) -> &str {
    path.rsplit_once('/').unwrap().1
}

/// Whether `path` exists in the image's rootfs, by the real `debugfs`.
pub fn rootfs_has(image: &Path, path: &str) -> bool {
    let (offset, ..) = common::sgdisk_partition(image, 2);
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("stat {path}"))
        .arg(format!("{}?offset={offset}", image.display()))
        .output()
        .unwrap();
    !String::from_utf8_lossy(&out.stderr).contains("File not found")
}
