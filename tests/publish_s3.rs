//! `mkappliance upload` and `build --upload` against a moto S3 server on 127.0.0.1, with
//! the AWS CLI as the independent client that reads the objects back and lists what a
//! failed upload left behind.

mod common;
#[path = "common/fixture.rs"]
mod fixture;
#[path = "publish_support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::*;

const BUCKET: &str = "appliances";
const MIB: usize = 1 << 20;

/// An artifact directory: one file big enough for several 5 MiB parts, and small ones.
fn artifacts(dir: &Path) -> Vec<(String, Vec<u8>)> {
    std::fs::create_dir_all(dir.join("extra")).unwrap();
    let files = vec![
        ("bootstrap-pxe.raw".to_string(), noise(11, 23 * MIB + 4321)),
        (
            "bootstrap-pxe.raw.sha256".to_string(),
            b"abc  bootstrap-pxe.raw\n".to_vec(),
        ),
        ("extra/notes.txt".to_string(), b"hello\n".to_vec()),
        ("empty".to_string(), vec![]),
    ];
    for (name, data) in &files {
        std::fs::write(dir.join(name), data).unwrap();
    }
    // Temporaries are not artifacts.
    std::fs::write(dir.join(".bootstrap-pxe.raw.tmp-99"), b"partial").unwrap();
    files
}

fn upload(dir: &Path, endpoint: &str, extra: &[&str]) -> Output {
    let mut c = mk(&["upload"]);
    c.arg(dir)
        .args([
            "--bucket",
            BUCKET,
            "--endpoint",
            endpoint,
            "--part-size-mib",
            "5",
        ])
        .args(extra);
    let o = c.output().unwrap();
    assert_no_secret(&o);
    o
}

#[test]
fn uploads_multipart_and_small_files_that_another_client_reads_back() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("2025-12-17");
    let files = artifacts(&dir);
    let o = upload(&dir, &moto.endpoint, &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    // Told once that the image holds secrets.
    assert_eq!(err.matches("secrets").count(), 1, "{err}");

    let keys = moto.keys(BUCKET);
    let mut want: Vec<String> = files
        .iter()
        .map(|(n, _)| format!("bootstrap/2025-12-17/{n}"))
        .collect();
    want.sort();
    assert_eq!(keys, want);
    for (name, data) in &files {
        let key = format!("bootstrap/2025-12-17/{name}");
        let back = moto.download(BUCKET, &key, &tmp.path().join("back"));
        assert!(back == *data, "{key} differs after the round trip");
        // Every object URL is printed, path-style.
        assert!(
            out.contains(&format!("{}/{BUCKET}/{key}", moto.endpoint)),
            "{key} not in {out}"
        );
    }
    // 23 MiB in 5 MiB parts: a real multipart upload (its ETag has a part count).
    let head = moto.aws_ok(&[
        "s3api",
        "head-object",
        "--bucket",
        BUCKET,
        "--key",
        "bootstrap/2025-12-17/bootstrap-pxe.raw",
    ]);
    assert!(head.contains("-5\\\""), "{head}");
    assert!(out.contains("5 parts"), "{out}");
    assert!(moto.open_multipart_uploads(BUCKET).is_empty());
}

#[test]
fn a_failing_part_aborts_the_multipart_upload() {
    for fault in [Fault::Status500, Fault::Drop] {
        let moto = Moto::start();
        moto.create_bucket(BUCKET);
        let proxy = fault_proxy(moto.port, "partNumber=2&", fault);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("2025-12-17");
        artifacts(&dir);
        let o = upload(
            &dir,
            &proxy.endpoint,
            &["--retries", "1", "--concurrency", "2"],
        );
        let (out, err) = text(&o);
        assert!(!o.status.success(), "{fault:?}: {out}\n{err}");
        assert!(err.contains("part 2 of 5"), "{fault:?}: {err}");
        assert!(err.contains("after 2 attempt"), "{fault:?}: {err}");
        assert!(err.contains("aborted"), "{fault:?}: {err}");
        if let Fault::Status500 = fault {
            assert!(
                err.contains("InternalError: injected fault (HTTP 500)"),
                "{err}"
            );
        }
        common::the_error_line(&err);
        // One try and one retry reached the proxy's fault.
        assert_eq!(proxy.injected.load(std::sync::atomic::Ordering::SeqCst), 2);
        // Nothing half-written stays: no open multipart upload, no object.
        assert_eq!(
            moto.open_multipart_uploads(BUCKET),
            Vec::<serde_json::Value>::new()
        );
        assert!(
            !moto
                .keys(BUCKET)
                .iter()
                .any(|k| k.ends_with("bootstrap-pxe.raw")),
            "{:?}",
            moto.keys(BUCKET)
        );
    }
}

#[test]
fn ctrl_c_aborts_the_multipart_upload() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    // Parts take 3 s to get through: time to interrupt mid-upload.
    let proxy = fault_proxy(moto.port, "partNumber=", Fault::Delay(3000));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v1");
    artifacts(&dir);
    let mut c = mk(&["upload"]);
    c.arg(&dir)
        .args([
            "--bucket",
            BUCKET,
            "--endpoint",
            &proxy.endpoint,
            "--part-size-mib",
            "5",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = c.spawn().unwrap();
    let start = std::time::Instant::now();
    while proxy.injected.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(start.elapsed().as_secs() < 60, "no part reached the proxy");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}\n{err}");
    assert!(err.contains("interrupted (Ctrl-C)"), "{err}");
    assert!(err.contains("was aborted"), "{err}");
    assert!(moto.open_multipart_uploads(BUCKET).is_empty());
    assert!(!moto
        .keys(BUCKET)
        .iter()
        .any(|k| k.ends_with("bootstrap-pxe.raw")));
}

#[test]
fn verification_catches_an_object_that_differs() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    // Reads of the image come back with one bit flipped.
    let proxy = fault_proxy(
        moto.port,
        "GET /appliances/bootstrap/v1/bootstrap-pxe.raw",
        Fault::Corrupt,
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v1");
    artifacts(&dir);
    // Read back whole, and in parallel 5 MiB ranges.
    for extra in [&[][..], &["--verify-range-mib", "5"][..]] {
        let o = upload(&dir, &proxy.endpoint, extra);
        let (out, err) = text(&o);
        assert!(!o.status.success(), "{out}\n{err}");
        assert!(
            err.contains("verifying s3://appliances/bootstrap/v1/bootstrap-pxe.raw"),
            "{err}"
        );
        assert!(err.contains("differ from"), "{err}");
    }
    assert!(proxy.injected.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    // Ranged reads of an intact object pass.
    let o = upload(&dir, &moto.endpoint, &["--verify-range-mib", "5"]);
    assert!(o.status.success(), "{:?}", text(&o));
    // Without verification the same upload "succeeds": the check is what caught it.
    let o = upload(&dir, &proxy.endpoint, &["--no-verify"]);
    assert!(o.status.success(), "{:?}", text(&o));
}

#[test]
fn a_missing_bucket_is_a_clear_error() {
    let moto = Moto::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v1");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("a"), b"a").unwrap();
    let o = upload(&dir, &moto.endpoint, &[]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains(&format!(
            "bucket \"{BUCKET}\" does not exist at {}",
            moto.endpoint
        )),
        "{err}"
    );
}

#[test]
fn standard_aws_variables_and_profiles_work_too() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v2");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("a.txt"), b"a\n").unwrap();
    let plain = |c: &mut Command| {
        hermetic_env(c);
        c.arg("upload").arg(&dir).args(["--bucket", BUCKET]);
    };

    // AWS_* variables only, endpoint included.
    let mut c = Command::new(bin());
    plain(&mut c);
    c.env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_REGION", REGION)
        .env("AWS_ENDPOINT_URL", &moto.endpoint);
    let o = c.output().unwrap();
    assert_no_secret(&o);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(text(&o)
        .0
        .contains(&format!("{}/{BUCKET}/bootstrap/v2/a.txt", moto.endpoint)));

    // A named profile from config and credentials files.
    let config = tmp.path().join("config");
    let creds = tmp.path().join("credentials");
    std::fs::write(
        &config,
        format!(
            "[profile ci]\nregion = {REGION}\nendpoint_url = {}\n",
            moto.endpoint
        ),
    )
    .unwrap();
    std::fs::write(
        &creds,
        format!("[ci]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"),
    )
    .unwrap();
    let mut c = Command::new(bin());
    plain(&mut c);
    c.args(["--profile", "ci", "--prefix", "prof"])
        .env("AWS_CONFIG_FILE", &config)
        .env("AWS_SHARED_CREDENTIALS_FILE", &creds);
    let o = c.output().unwrap();
    assert_no_secret(&o);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(moto.keys(BUCKET).contains(&"prof/a.txt".to_string()));

    // No credentials anywhere: said plainly, before any upload.
    let mut c = Command::new(bin());
    plain(&mut c);
    c.args(["--endpoint", &moto.endpoint]);
    let o = c.output().unwrap();
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("no S3 credentials"), "{err}");
    assert_eq!(moto.keys(BUCKET).len(), 2);
}

#[test]
fn dry_run_shows_the_plan_without_contacting_anything() {
    // A port nobody listens on: any request would fail.
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("2025-12-17");
    artifacts(&dir);
    let o = upload(&dir, &endpoint, &["--dry-run", "--prefix", "/custom/p/"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(
        out.contains(&format!("s3://{BUCKET}/custom/p/bootstrap-pxe.raw")),
        "{out}"
    );
    assert!(out.contains("multipart in 5 parts"), "{out}");
    assert!(
        out.contains(&format!("s3://{BUCKET}/custom/p/extra/notes.txt")),
        "{out}"
    );
    assert!(!out.contains(".tmp-99"), "{out}");
    assert!(out.contains("dry run"), "{out}");

    // With --json, stdout is the plan as JSON and nothing else.
    let o = upload(&dir, &endpoint, &["--dry-run", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    let plan: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {out}"));
    let keys: Vec<&str> = plan
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["key"].as_str().unwrap())
        .collect();
    assert!(
        keys.contains(&"bootstrap/2025-12-17/extra/notes.txt"),
        "{keys:?}"
    );

    // No bucket anywhere: told how to give one.
    let mut c = mk(&["upload", "--dry-run"]);
    let o = c.arg(&dir).output().unwrap();
    assert!(!o.status.success());
    assert!(text(&o).1.contains("IDRIVE_BUCKET"), "{:?}", text(&o));
}

#[test]
fn sse_and_age_encryption() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let tmp = tempfile::tempdir().unwrap();
    let key_file = tmp.path().join("age.key");
    let kg = Command::new("age-keygen")
        .arg("-o")
        .arg(&key_file)
        .output()
        .unwrap();
    assert!(kg.status.success());
    let recipient = String::from_utf8_lossy(&kg.stderr)
        .split_whitespace()
        .find(|w| w.starts_with("age1"))
        .unwrap()
        .to_string();
    // A second recipient: an SSH key, as `age -R ~/.ssh/id_ed25519.pub` takes it.
    let ssh_key = tmp.path().join("id_ed25519");
    let kg = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&ssh_key)
        .output()
        .unwrap();
    assert!(kg.status.success(), "{:?}", text(&kg));
    let ssh_pub = std::fs::read_to_string(tmp.path().join("id_ed25519.pub")).unwrap();
    let dir = tmp.path().join("enc");
    let files = artifacts(&dir);
    let o = upload(
        &dir,
        &moto.endpoint,
        &[
            "--sse",
            "--encrypt-to",
            &recipient,
            "--encrypt-to",
            ssh_pub.trim(),
            "--json",
            "--prefix",
            "p",
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report.as_array().unwrap().len(), files.len());
    assert_eq!(
        moto.keys(BUCKET),
        [
            "p/bootstrap-pxe.raw.age",
            "p/bootstrap-pxe.raw.sha256",
            "p/empty.age",
            "p/extra/notes.txt.age"
        ]
    );
    // The store was asked to encrypt at rest.
    let head = moto.aws_ok(&[
        "s3api",
        "head-object",
        "--bucket",
        BUCKET,
        "--key",
        "p/empty.age",
    ]);
    assert!(
        head.contains("\"ServerSideEncryption\": \"AES256\""),
        "{head}"
    );
    // `age -d` opens what was uploaded; the checksum file stays plain.
    for (name, data) in &files {
        let plain = name.ends_with(".sha256");
        let key = if plain {
            format!("p/{name}")
        } else {
            format!("p/{name}.age")
        };
        let got = moto.download(BUCKET, &key, &tmp.path().join("obj"));
        if plain {
            assert!(got == *data);
            continue;
        }
        assert!(got.starts_with(b"age-encryption.org/v1\n"), "{key}");
        let dec = Command::new("age")
            .arg("-d")
            .arg("-i")
            .arg(&key_file)
            .arg(tmp.path().join("obj"))
            .output()
            .unwrap();
        assert!(dec.status.success(), "{:?}", text(&dec));
        assert!(
            dec.stdout == *data,
            "{name} did not decrypt to the original"
        );
        // The SSH key opens it too.
        let dec = Command::new("age")
            .arg("-d")
            .arg("-i")
            .arg(&ssh_key)
            .arg(tmp.path().join("obj"))
            .output()
            .unwrap();
        assert!(dec.status.success(), "{:?}", text(&dec));
        assert!(dec.stdout == *data, "{name}: the SSH key did not open it");
    }
    // The scratch copies are gone.
    assert!(std::fs::read_dir(&dir).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".mkappliance")));
}

#[test]
fn build_with_compress_and_upload_from_the_environment() {
    let iso = fixture::talos_iso("default");
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("artifacts/bootstrap/2025-12-17");
    // The original helper script's interface: COMPRESS/UPLOAD + IDRIVE_* variables.
    let mut c = common::build_cmd(&iso, &out, &["--json"]);
    hermetic_env(&mut c);
    c.env("SOURCE_DATE_EPOCH", common::EPOCH)
        .env("COMPRESS", "true")
        .env("UPLOAD", "true")
        .env("IDRIVE_BUCKET", BUCKET)
        .env("IDRIVE_ENDPOINT", &moto.endpoint)
        .env("IDRIVE_REGION", REGION)
        .env("IDRIVE_ACCESS_KEY", ACCESS_KEY)
        .env("IDRIVE_SECRET_KEY", SECRET_KEY);
    let o = common::run_ok(&mut c);
    assert_no_secret(&o);
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let uploaded = summary["published"]["uploaded"].as_array().unwrap();
    assert_eq!(uploaded.len(), 4);
    assert!(uploaded.iter().all(|u| u["verified"] == true));
    assert_eq!(
        moto.keys(BUCKET),
        [
            "bootstrap/2025-12-17/SHA256SUMS",
            "bootstrap/2025-12-17/bootstrap-pxe.raw",
            "bootstrap/2025-12-17/bootstrap-pxe.raw.gz",
            "bootstrap/2025-12-17/bootstrap-pxe.raw.sha256",
        ]
    );
    // What the bucket holds is what was built, and the release checks out with sha256sum.
    let dl = tmp.path().join("download");
    std::fs::create_dir(&dl).unwrap();
    for name in ["SHA256SUMS", "bootstrap-pxe.raw", "bootstrap-pxe.raw.gz"] {
        let got = moto.download(
            BUCKET,
            &format!("bootstrap/2025-12-17/{name}"),
            &dl.join(name),
        );
        assert!(got == std::fs::read(out.join(name)).unwrap(), "{name}");
    }
    let check = Command::new("sha256sum")
        .args(["-c", "--strict", "SHA256SUMS"])
        .current_dir(&dl)
        .output()
        .unwrap();
    assert!(check.status.success(), "{:?}", text(&check));
    let gz = Command::new("gzip")
        .arg("-t")
        .arg(dl.join("bootstrap-pxe.raw.gz"))
        .status()
        .unwrap();
    assert!(gz.success());
}

/// One file of several failing: the error names it, its bucket and key, and says plainly
/// which objects the earlier files already put in the bucket (a partial publish).
#[test]
fn a_failing_file_says_what_the_bucket_already_holds() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    // Sorted, the files go up as bootstrap-pxe.raw, bootstrap-pxe.raw.sha256, empty,
    // extra/notes.txt: the last one fails.
    let proxy = fault_proxy(moto.port, "notes.txt", Fault::Status500);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("2025-12-17");
    artifacts(&dir);
    let o = upload(&dir, &proxy.endpoint, &["--retries", "1", "--json"]);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}\n{err}");
    assert_eq!(proxy.injected.load(std::sync::atomic::Ordering::SeqCst), 2);
    let line = common::the_error_line(&err);
    let prefix = "s3://appliances/bootstrap/2025-12-17/";
    // The failing file, its bucket and key, and why.
    assert!(
        line.contains("extra/notes.txt") && line.contains(&format!("{prefix}extra/notes.txt")),
        "{line}"
    );
    assert!(line.contains("InternalError"), "{line}");
    // What the bucket holds, as the other client lists it.
    let keys = moto.keys(BUCKET);
    assert_eq!(
        keys,
        [
            "bootstrap/2025-12-17/bootstrap-pxe.raw",
            "bootstrap/2025-12-17/bootstrap-pxe.raw.sha256",
            "bootstrap/2025-12-17/empty",
        ]
    );
    assert!(line.contains("incomplete publish"), "{line}");
    assert!(line.contains("3 of the 4 objects"), "{line}");
    for k in &keys {
        assert!(line.contains(k.as_str()), "{k} not named: {line}");
    }
    assert!(moto.open_multipart_uploads(BUCKET).is_empty());
}

/// A file rewritten while it is being uploaded: the run must fail rather than report a
/// SHA-256 the object does not have (or leave an object that is neither version).
#[test]
fn a_file_that_changes_during_the_upload_fails() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    // Part 2 waits, so parts 3-5 are read from the file after it changed.
    let proxy = fault_proxy(moto.port, "partNumber=2&", Fault::Delay(2500));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("2025-12-17");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bootstrap-pxe.raw");
    let data = noise(21, 23 * MIB);
    std::fs::write(&file, &data).unwrap();
    let mut c = mk(&["upload"]);
    c.arg(&dir).args([
        "--bucket",
        BUCKET,
        "--endpoint",
        &proxy.endpoint,
        "--part-size-mib",
        "5",
        "--concurrency",
        "1",
        "--json",
    ]);
    let child = c
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Rewrite the last part's bytes in place while part 2 is held up.
    let start = std::time::Instant::now();
    while proxy.injected.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(start.elapsed() < std::time::Duration::from_secs(60));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.write_all_at(&[0xAA; 4096], (22 * MIB) as u64).unwrap();
    }
    let o = child.wait_with_output().unwrap();
    let (out, err) = text(&o);
    assert!(std::fs::read(&file).unwrap() != data);
    assert!(
        !o.status.success(),
        "a changed file was reported as uploaded:\n{out}\n{err}"
    );
    let error = common::the_error_line(&err);
    assert!(
        error.contains("changed while it was being uploaded")
            && error.contains("s3://appliances/bootstrap/2025-12-17/bootstrap-pxe.raw"),
        "{err}"
    );
}
