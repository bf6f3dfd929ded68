//! `mkappliance compress` and `build --compress`, judged by the real `gzip`, `zstd`, `xz`,
//! `cmp` and `sha256sum`.

mod common;
#[path = "common/fixture.rs"]
mod fixture;
#[path = "publish_support/mod.rs"]
mod support;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use support::{hermetic_env, noise, text};

/// An image-like input: text, incompressible noise, a long run of zeros (a hole) and a
/// repetitive binary-ish region, so blocks of every kind cross gzip block boundaries.
fn image_like(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    for i in 0..20_000 {
        writeln!(
            f,
            "line {i}: the quick brown fox jumps over the lazy dog {}",
            i * 7
        )
        .unwrap();
    }
    f.write_all(&noise(42, 3_000_000)).unwrap();
    f.set_len(f.metadata().unwrap().len() + 5_000_000).unwrap(); // a hole
    use std::io::Seek;
    f.seek(std::io::SeekFrom::End(0)).unwrap();
    let pattern: Vec<u8> = (0..4096u32)
        .map(|i| (i % 251) as u8 ^ (i >> 8) as u8)
        .collect();
    for _ in 0..500 {
        f.write_all(&pattern).unwrap();
    }
    f.write_all(b"tail").unwrap();
    p
}

fn compress(file: &Path, extra: &[&str]) -> std::process::Output {
    let mut c = Command::new(support::bin());
    hermetic_env(&mut c);
    c.arg("compress").arg(file).arg("--quiet").args(extra);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{:?}", text(&o));
    o
}

fn ok(cmd: &mut Command) -> Vec<u8> {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(o.status.success(), "{cmd:?}: {:?}", text(&o));
    o.stdout
}

/// `tool -t` accepts the file and `tool -dc` gives back the input, per `cmp`.
fn judge(tool: &str, compressed: &Path, original: &Path) {
    ok(Command::new(tool).arg("-t").arg(compressed));
    let mut dec = Command::new(tool)
        .arg("-dc")
        .arg(compressed)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let cmp = Command::new("cmp")
        .arg("-")
        .arg(original)
        .stdin(dec.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(dec.wait().unwrap().success());
    assert!(cmp.status.success(), "{tool} -dc | cmp: {:?}", text(&cmp));
}

#[test]
fn gzip_is_valid_reproducible_and_independent_of_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image_like(tmp.path(), "disk.raw");
    compress(&img, &["--threads", "1"]);
    let gz = tmp.path().join("disk.raw.gz");
    judge("gzip", &gz, &img);
    // Also plain `gunzip` as a CI job or a person would run it.
    let mut g = Command::new("gunzip")
        .arg("-c")
        .arg(&gz)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let cmp = Command::new("cmp")
        .arg("-")
        .arg(&img)
        .stdin(g.stdout.take().unwrap())
        .status()
        .unwrap();
    assert!(g.wait().unwrap().success() && cmp.success());

    let one = std::fs::read(&gz).unwrap();
    // RFC 1952: ID1 ID2 CM=8, FLG=0 (no FNAME), MTIME=0.
    assert_eq!(&one[..8], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0]);
    // gzip -l agrees on the uncompressed size (ISIZE).
    let list = String::from_utf8(ok(Command::new("gzip").arg("-l").arg(&gz))).unwrap();
    let size = std::fs::metadata(&img).unwrap().len().to_string();
    assert!(list.contains(&size), "{list}");
    // Mode 0600, like the image: it holds the cluster's secrets.
    assert_eq!(
        std::fs::metadata(&gz).unwrap().permissions().mode() & 0o777,
        0o600
    );

    for threads in ["2", "3", "8"] {
        compress(&img, &["--threads", threads]);
        assert!(
            std::fs::read(&gz).unwrap() == one,
            "--threads {threads} changed the .gz bytes"
        );
    }
    compress(&img, &[]);
    assert!(
        std::fs::read(&gz).unwrap() == one,
        "a second run changed the bytes"
    );
}

#[test]
fn zstd_and_xz_are_valid_and_independent_of_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image_like(tmp.path(), "disk.raw");
    for (format, ext, tool) in [("zstd", "zst", "zstd"), ("xz", "xz", "xz")] {
        compress(&img, &["--format", format, "--threads", "1"]);
        let out = tmp.path().join(format!("disk.raw.{ext}"));
        judge(tool, &out, &img);
        let one = std::fs::read(&out).unwrap();
        compress(&img, &["--format", format, "--threads", "4"]);
        assert!(
            std::fs::read(&out).unwrap() == one,
            "{format}: --threads changed the bytes"
        );
    }
}

#[test]
fn sha256sums_lists_every_artifact_and_checks_out() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image_like(tmp.path(), "bootstrap-pxe.raw");
    std::fs::write(tmp.path().join("notes.txt"), b"release notes\n").unwrap();
    compress(&img, &[]);
    compress(&img, &["--format", "xz"]);
    let sums = std::fs::read_to_string(tmp.path().join("SHA256SUMS")).unwrap();
    let names: Vec<&str> = sums
        .lines()
        .map(|l| l.split_once("  ").unwrap().1)
        .collect();
    assert_eq!(
        names,
        [
            "bootstrap-pxe.raw",
            "bootstrap-pxe.raw.gz",
            "bootstrap-pxe.raw.xz",
            "notes.txt"
        ]
    );
    let check = ok(Command::new("sha256sum")
        .args(["-c", "--strict", "SHA256SUMS"])
        .current_dir(tmp.path()));
    assert_eq!(String::from_utf8(check).unwrap().matches(": OK").count(), 4);

    // A corrupted artifact is caught by the same file.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(tmp.path().join("notes.txt"))
        .unwrap();
    f.write_all(b"x").unwrap();
    let st = Command::new("sha256sum")
        .args(["-c", "--quiet", "SHA256SUMS"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(!st.status.success());
}

#[test]
fn compression_streams_in_bounded_memory() {
    // 768 MiB, mostly a hole: held in memory it would show in the peak RSS.
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("big.raw");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(768 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&noise(3, 1 << 20), 100 << 20).unwrap();
    let o = Command::new("/usr/bin/time")
        .args(["-f", "%M"])
        .arg(support::bin())
        .arg("compress")
        .arg(&img)
        .args(["--quiet", "--no-sums"])
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let peak_kib: u64 = err.trim().lines().last().unwrap().trim().parse().unwrap();
    assert!(peak_kib < 96 * 1024, "peak RSS {peak_kib} KiB");
    ok(Command::new("gzip")
        .arg("-t")
        .arg(tmp.path().join("big.raw.gz")));
}

#[test]
fn bad_input_fails_with_one_line_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Command::new(support::bin());
    let o = c
        .arg("compress")
        .arg(tmp.path().join("missing.raw"))
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.starts_with("error: compressing") && err.contains("missing.raw"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let img = image_like(tmp.path(), "a.raw");
    let o = Command::new(support::bin())
        .arg("compress")
        .arg(&img)
        .args(["--format", "zstd", "--level", "23"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).1.contains("out of range"));
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn build_compress_writes_gz_and_sha256sums() {
    let iso = fixture::talos_iso("default");
    let tmp = tempfile::tempdir().unwrap();
    // COMPRESS=true as the original helper script took it.
    let out = tmp.path().join("env");
    let mut c = common::build_cmd(&iso, &out, &[]);
    hermetic_env(&mut c);
    c.env("SOURCE_DATE_EPOCH", common::EPOCH)
        .env("COMPRESS", "true");
    common::run_ok(&mut c);
    let raw = out.join("bootstrap-pxe.raw");
    let gz = out.join("bootstrap-pxe.raw.gz");
    judge("gzip", &gz, &raw);
    ok(Command::new("sha256sum")
        .args(["-c", "--strict", "SHA256SUMS"])
        .current_dir(&out));
    let sums = std::fs::read_to_string(out.join("SHA256SUMS")).unwrap();
    assert_eq!(sums.lines().count(), 2, "{sums}");

    // The flag gives the same bytes; COMPRESS=false turns it off; --compress=zstd picks zstd.
    let out2 = tmp.path().join("flag");
    let mut c = common::build_cmd(&iso, &out2, &["--compress"]);
    hermetic_env(&mut c);
    c.env("SOURCE_DATE_EPOCH", common::EPOCH);
    common::run_ok(&mut c);
    assert!(
        std::fs::read(out2.join("bootstrap-pxe.raw.gz")).unwrap() == std::fs::read(&gz).unwrap()
    );

    let out3 = tmp.path().join("off");
    let mut c = common::build_cmd(&iso, &out3, &["--json"]);
    hermetic_env(&mut c);
    c.env("SOURCE_DATE_EPOCH", common::EPOCH)
        .env("COMPRESS", "false");
    let o = common::run_ok(&mut c);
    assert!(!out3.join("bootstrap-pxe.raw.gz").exists());
    assert!(!out3.join("SHA256SUMS").exists());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v.get("published").is_none());

    let out4 = tmp.path().join("zstd");
    let mut c = common::build_cmd(&iso, &out4, &["--compress=zstd", "--json"]);
    hermetic_env(&mut c);
    c.env("SOURCE_DATE_EPOCH", common::EPOCH);
    let o = common::run_ok(&mut c);
    judge(
        "zstd",
        &out4.join("bootstrap-pxe.raw.zst"),
        &out4.join("bootstrap-pxe.raw"),
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["published"]["compressed"]["format"], "zstd");
    let zst_sha = ok(Command::new("sha256sum").arg(out4.join("bootstrap-pxe.raw.zst")));
    assert_eq!(
        v["published"]["compressed"]["sha256"].as_str().unwrap(),
        String::from_utf8(zst_sha)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
    );
}
