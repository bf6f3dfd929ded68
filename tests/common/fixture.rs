//! Talos-shaped fixture ISOs for integration tests.
//!
//! `talos_iso(variant)` runs `tests/fixtures/make-talos-iso.sh` once per variant into
//! `$MKAPPLIANCE_FIXTURE_CACHE` (or `<repo>/target/fixtures`), under a file lock so
//! parallel tests (threads or processes) build it once. The file name carries a hash of
//! the script, so editing the script rebuilds the fixtures.
//!
//! Variants: `default`, `bench`, `no-tree-bootloader`, a version such as `v1.10.0`, or
//! several joined with `+` (`bench+no-tree-bootloader`).
//!
//! Include it with `#[path = "common/fixture.rs"] mod fixture;`.
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

const SCRIPT: &str = "tests/fixtures/make-talos-iso.sh";
const CACHE_ENV: &str = "MKAPPLIANCE_FIXTURE_CACHE";

/// The inputs the script takes from Debian, as it reports them (`--print-inputs`).
#[derive(Debug)]
pub struct Inputs {
    /// Kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub kver: String,
    /// The unmodified Debian kernel (what `/boot/vmlinuz` holds in non-bench variants).
    pub kernel: PathBuf,
    /// `lib/modules/<kver>` of the Debian package (before depmod).
    pub modules: PathBuf,
    /// The systemd-boot EFI binary put in the ISO and in its EFI image.
    pub systemd_boot: PathBuf,
}

pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn script() -> PathBuf {
    repo_dir().join(SCRIPT)
}

/// Where built fixture ISOs are cached.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os(CACHE_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => repo_dir().join("target/fixtures"),
    }
}

/// Script arguments for a variant name.
pub fn variant_args(variant: &str) -> Vec<String> {
    let mut args = Vec::new();
    for part in variant.split('+') {
        match part {
            "default" | "" => {}
            "bench" => args.push("--bench".to_string()),
            "no-tree-bootloader" => args.push("--no-tree-bootloader".to_string()),
            v if v.starts_with('v') => args.extend(["--version".to_string(), v.to_string()]),
            other => panic!("unknown fixture variant part {other:?} in {variant:?}"),
        }
    }
    args
}

/// Run the fixture script to build `out` (no caching, no lock).
pub fn build_iso(variant: &str, out: &Path) {
    let output = Command::new(script())
        .arg(out)
        .args(variant_args(variant))
        .output()
        .expect("running make-talos-iso.sh");
    assert!(
        output.status.success(),
        "make-talos-iso.sh {variant} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The cached fixture ISO of a variant, built on first use.
pub fn talos_iso(variant: &str) -> PathBuf {
    let script_bytes = std::fs::read(script()).expect("reading make-talos-iso.sh");
    let mut h = Sha256::new();
    h.update(&script_bytes);
    h.update(variant_args(variant).join(" ").as_bytes());
    let stamp = &hex::encode(h.finalize())[..12];
    let dir = cache_dir();
    let out = dir.join(format!("talos-{variant}-{stamp}.iso"));
    if out.exists() {
        return out;
    }
    std::fs::create_dir_all(&dir).expect("creating the fixture cache");
    let lock = File::create(dir.join(format!("talos-{variant}.lock"))).expect("creating lock");
    lock.lock().expect("locking the fixture cache");
    if !out.exists() {
        // The script writes a temporary name and renames it, so `out` is always complete.
        build_iso(variant, &out);
    }
    out
}

/// What the script takes from Debian (fetched and cached on first use).
pub fn inputs() -> &'static Inputs {
    static INPUTS: OnceLock<Inputs> = OnceLock::new();
    INPUTS.get_or_init(|| {
        let output = Command::new(script())
            .arg("--print-inputs")
            .output()
            .expect("running make-talos-iso.sh --print-inputs");
        assert!(
            output.status.success(),
            "make-talos-iso.sh --print-inputs failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8(output.stdout).expect("utf-8 output");
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .unwrap_or_else(|| panic!("no {key}= in --print-inputs output: {text}"))
                .to_string()
        };
        Inputs {
            kver: get("kver"),
            kernel: get("kernel").into(),
            modules: get("modules").into(),
            systemd_boot: get("systemd_boot").into(),
        }
    })
}

/// Kernel release of the fixture's kernel, e.g. `6.1.0-56-cloud-amd64`.
pub fn kernel_version() -> String {
    inputs().kver.clone()
}

/// Debian's cloud kernel modules laid out like Talos (`usr/lib/modules/<kver>`, `lib` ->
/// `usr/lib`) with `modules.dep` made by the real depmod, as a package's postinst would.
/// Built once into the cache. Returns (root, kver).
pub fn depmod_root() -> (PathBuf, String) {
    let inputs = inputs();
    let root = cache_dir().join(format!("depmod-{}", inputs.kver));
    if !root.join("usr/lib/modules").is_dir() {
        // Unique scratch name: several test processes may fill the cache at once.
        let work = cache_dir().join(format!(
            "depmod-{}.partial-{}",
            inputs.kver,
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&work);
        let modules = work.join("usr/lib/modules");
        std::fs::create_dir_all(&modules).unwrap();
        let cp = Command::new("cp")
            .arg("-a")
            .arg(&inputs.modules)
            .arg(modules.join(&inputs.kver))
            .status()
            .unwrap();
        assert!(cp.success(), "copying {}", inputs.modules.display());
        std::os::unix::fs::symlink("usr/lib", work.join("lib")).unwrap();
        let depmod = Command::new("depmod")
            .arg("-b")
            .arg(&work)
            .arg(&inputs.kver)
            .status()
            .unwrap();
        assert!(depmod.success(), "depmod failed");
        // Whoever renames first wins; a loser's copy is identical and simply dropped.
        if std::fs::rename(&work, &root).is_err() {
            assert!(
                root.join("usr/lib/modules").is_dir(),
                "could not populate {}",
                root.display()
            );
            std::fs::remove_dir_all(&work).unwrap();
        }
    }
    (root, inputs.kver.clone())
}
