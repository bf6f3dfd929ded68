//! `mkappliance fetch` against a small HTTP server on 127.0.0.1 serving a fixture "ISO"
//! and a coreutils `sha512sum.txt` (written by the real `sha512sum`).

mod common;
#[path = "publish_support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use support::*;

const VER: &str = "v1.11.6";
const ISO_LEN: usize = 3 * 1024 * 1024 + 12345;

fn iso() -> Vec<u8> {
    noise(0x1505, ISO_LEN)
}

/// A digest by the real coreutils tool, e.g. `sha512sum`.
fn coreutils_digest(tool: &str, data: &[u8], dir: &Path) -> String {
    let f = dir.join(format!("digest-input-{tool}"));
    std::fs::write(&f, data).unwrap();
    let out = Command::new(tool).arg(&f).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A release directory the way GitHub lays one out, under /releases/<ver>/.
fn release_routes(iso_route: support::Route, sums: String) -> HashMap<String, support::Route> {
    let mut r = HashMap::new();
    r.insert(format!("/releases/{VER}/metal-amd64.iso"), iso_route);
    r.insert(
        format!("/releases/{VER}/sha512sum.txt"),
        support::Route::Body(sums.into_bytes()),
    );
    r
}

fn sums_text(iso_sha512: &str) -> String {
    // Other assets listed around ours, as in a real release.
    format!(
        "{}  initramfs-amd64.xz\n{iso_sha512}  metal-amd64.iso\n{}  vmlinuz-amd64\n",
        "1".repeat(128),
        "2".repeat(128)
    )
}

fn fetch(server: &FileServer, out: &Path, extra: &[&str]) -> Output {
    let mut c = Command::new(bin());
    hermetic_env(&mut c);
    c.args(["fetch", "talos", VER, "--quiet", "--base-url"])
        .arg(format!("{}/releases", server.base))
        .arg("--out-dir")
        .arg(out)
        .args(extra);
    c.output().unwrap()
}

fn iso_gets(server: &FileServer) -> Vec<Seen> {
    server
        .seen()
        .into_iter()
        .filter(|s| s.path.ends_with("metal-amd64.iso"))
        .collect()
}

fn leftovers(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => vec![],
    }
}

#[test]
fn downloads_and_verifies_against_sha512sum_txt() {
    let tmp = tempfile::tempdir().unwrap();
    let data = iso();
    let sha512 = coreutils_digest("sha512sum", &data, tmp.path());
    let server = file_server(release_routes(
        Route::Body(data.clone()),
        sums_text(&sha512),
    ));
    let out = tmp.path().join("artifacts/talos").join(VER);
    let o = fetch(&server, &out, &[]);
    let (so, se) = text(&o);
    assert!(o.status.success(), "{so}\n{se}");
    assert!(std::fs::read(out.join("metal-amd64.iso")).unwrap() == data);
    assert_eq!(leftovers(&out), vec!["metal-amd64.iso".to_string()]);

    // A second run finds the verified file and downloads nothing.
    let before = iso_gets(&server).len();
    let o = fetch(&server, &out, &[]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(iso_gets(&server).len(), before);
}

#[test]
fn checksum_mismatch_deletes_the_download_and_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let data = iso();
    // The digest of something else.
    let wrong = coreutils_digest("sha512sum", b"not the iso", tmp.path());
    let server = file_server(release_routes(Route::Body(data), sums_text(&wrong)));
    let out = tmp.path().join("out");
    let o = fetch(&server, &out, &[]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(err.contains(&wrong), "{err}");
    assert!(err.contains("deleted"), "{err}");
    assert_eq!(leftovers(&out), Vec::<String>::new(), "nothing may stay");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn server_error_fails_clearly_after_retries() {
    let tmp = tempfile::tempdir().unwrap();
    let data = iso();
    let sha512 = coreutils_digest("sha512sum", &data, tmp.path());
    let server = file_server(release_routes(Route::Status(503), sums_text(&sha512)));
    let out = tmp.path().join("out");
    let o = fetch(&server, &out, &["--retries", "1"]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("HTTP 503"), "{err}");
    assert!(err.contains("metal-amd64.iso"), "{err}");
    assert_eq!(iso_gets(&server).len(), 2, "one try and one retry");
    assert_eq!(leftovers(&out), Vec::<String>::new());

    // A missing checksum file is an error too, before any ISO byte moves.
    let mut routes = HashMap::new();
    routes.insert(
        format!("/releases/{VER}/metal-amd64.iso"),
        Route::Body(iso()),
    );
    let server = file_server(routes);
    let o = fetch(&server, &out, &[]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("sha512sum.txt: HTTP 404"), "{err}");
    assert!(iso_gets(&server).is_empty());
}

#[test]
fn interrupted_transfer_resumes_with_a_range_request() {
    let tmp = tempfile::tempdir().unwrap();
    let data = iso();
    let sha512 = coreutils_digest("sha512sum", &data, tmp.path());
    let cut = 1_000_000;
    let server = file_server(release_routes(
        Route::CutAfter(data.clone(), cut, 1),
        sums_text(&sha512),
    ));
    let out = tmp.path().join("out");

    // No retries: the run fails and keeps what arrived.
    let o = fetch(&server, &out, &["--retries", "0"]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("run again to resume"), "{err}");
    assert!(!out.join("metal-amd64.iso").exists());
    let part = out.join(".metal-amd64.iso.part");
    let kept = std::fs::metadata(&part).unwrap().len() as usize;
    assert!(kept > 0 && kept <= cut, "kept {kept}");
    assert!(std::fs::read(&part).unwrap() == data[..kept]);

    // The next run asks only for the rest.
    let o = fetch(&server, &out, &[]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(std::fs::read(out.join("metal-amd64.iso")).unwrap() == data);
    assert!(!part.exists());
    let gets = iso_gets(&server);
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[1].range.as_deref(), Some(&*format!("bytes={kept}-")));
}

#[test]
fn interrupted_transfer_is_retried_within_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = iso();
    let sha512 = coreutils_digest("sha512sum", &data, tmp.path());
    let server = file_server(release_routes(
        Route::CutAfter(data.clone(), 2_000_000, 1),
        sums_text(&sha512),
    ));
    let out = tmp.path().join("out");
    let o = fetch(&server, &out, &[]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(std::fs::read(out.join("metal-amd64.iso")).unwrap() == data);
    let gets = iso_gets(&server);
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert!(gets[0].range.is_none());
    assert!(gets[1].range.as_deref().unwrap().starts_with("bytes="));
}

#[test]
fn image_factory_download_prints_the_digest_or_checks_a_pin() {
    let tmp = tempfile::tempdir().unwrap();
    let data = iso();
    let sha256 = coreutils_digest("sha256sum", &data, tmp.path());
    let schematic = "376567988ad370138ad8b2698212367b8edcb69b5fd68c80be1f2ec7d603b4ba";
    let mut routes = HashMap::new();
    routes.insert(
        format!("/image/{schematic}/{VER}/metal-amd64.iso"),
        Route::Body(data.clone()),
    );
    let server = file_server(routes);
    let run = |out: &Path, extra: &[&str]| {
        let mut c = Command::new(bin());
        hermetic_env(&mut c);
        c.args([
            "fetch",
            "talos",
            VER,
            "--schematic",
            schematic,
            "--base-url",
        ])
        .arg(format!("{}/image", server.base))
        .arg("--out-dir")
        .arg(out)
        .args(extra);
        c.output().unwrap()
    };

    // Unpinned: installed, and the digest is printed so it can be pinned.
    let out = tmp.path().join("a");
    let o = run(&out, &[]);
    let (so, se) = text(&o);
    assert!(o.status.success(), "{so}\n{se}");
    assert!(so.contains(&sha256), "{so}");
    assert!(so.contains("--sha256"), "{so}");
    assert!(std::fs::read(out.join("metal-amd64.iso")).unwrap() == data);

    // Pinned right: fine. Pinned wrong: deleted and failed.
    let o = run(&tmp.path().join("b"), &["--sha256", &sha256, "--quiet"]);
    assert!(o.status.success(), "{:?}", text(&o));
    let wrong = coreutils_digest("sha256sum", b"other", tmp.path());
    let out = tmp.path().join("c");
    let o = run(&out, &["--sha256", &wrong, "--quiet"]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("checksum mismatch"), "{err}");
    assert_eq!(leftovers(&out), Vec::<String>::new());
    // No checksum file is asked for.
    assert!(server.seen().iter().all(|s| !s.path.contains("sum")));
}

#[test]
fn fetch_ipxe_into_a_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let efi = noise(7, 200_000);
    let kpxe = noise(8, 70_000);
    let mut routes = HashMap::new();
    routes.insert("/ipxe.efi".to_string(), Route::Body(efi.clone()));
    routes.insert("/undionly.kpxe".to_string(), Route::Body(kpxe.clone()));
    let server = file_server(routes);
    let dir = tmp.path().join("cache");
    let sha256 = coreutils_digest("sha256sum", &efi, tmp.path());
    let mut c = Command::new(bin());
    hermetic_env(&mut c);
    c.args([
        "fetch",
        "ipxe",
        "--force",
        "--base-url",
        &server.base,
        "--sha256",
        &sha256,
    ])
    .arg("--dir")
    .arg(&dir);
    let o = c.output().unwrap();
    let (so, se) = text(&o);
    assert!(o.status.success(), "{so}\n{se}");
    assert!(std::fs::read(dir.join("ipxe.efi")).unwrap() == efi);
    assert!(std::fs::read(dir.join("undionly.kpxe")).unwrap() == kpxe);
    assert!(so.contains(&sha256), "{so}");

    // Without --dir the cache is under XDG_CACHE_HOME.
    let mut c = Command::new(bin());
    hermetic_env(&mut c);
    c.args([
        "fetch",
        "ipxe",
        "--force",
        "--quiet",
        "--base-url",
        &server.base,
    ])
    .env("XDG_CACHE_HOME", tmp.path().join("xdg"));
    let o = c.output().unwrap();
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(tmp.path().join("xdg/mkappliance/ipxe/ipxe.efi").is_file());
}

#[test]
fn bad_arguments_fail_before_any_request() {
    let tmp = tempfile::tempdir().unwrap();
    let server = file_server(HashMap::new());
    for (args, want) in [
        (vec!["--sha256", "abc"], "--sha256"),
        (vec!["--sha512", &"z".repeat(128)], "--sha512"),
    ] {
        let o = fetch(&server, tmp.path(), &args);
        let (_, err) = text(&o);
        assert!(!o.status.success());
        assert!(err.contains(want), "{err}");
    }
    let mut c = Command::new(bin());
    hermetic_env(&mut c);
    let o = c
        .args(["fetch", "talos", "1.11", "--base-url", &server.base])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(server.seen().is_empty());
}

fn fetch_ipxe(server: &FileServer, dir: &Path) -> Output {
    fetch_ipxe_from(&server.base, dir).output().unwrap()
}

/// `fetch ipxe` from `base` into `dir`, not yet run.
fn fetch_ipxe_from(base: &str, dir: &Path) -> Command {
    let mut c = Command::new(bin());
    hermetic_env(&mut c);
    c.args(["fetch", "ipxe", "--force", "--quiet", "--base-url", base])
        .arg("--dir")
        .arg(dir);
    c
}

/// A `.part` longer than the file (left by another, bigger download) gets 416 for its
/// Range request: it must be replaced, not installed as it is (nothing pins undionly.kpxe).
#[test]
fn a_part_longer_than_the_file_is_downloaded_again() {
    let tmp = tempfile::tempdir().unwrap();
    let efi = noise(9, 150_000);
    let kpxe = noise(10, 60_000);
    let mut routes = HashMap::new();
    routes.insert("/ipxe.efi".to_string(), Route::Body(efi.clone()));
    routes.insert("/undionly.kpxe".to_string(), Route::Body(kpxe.clone()));
    let server = file_server(routes);
    let dir = tmp.path().join("cache");
    std::fs::create_dir_all(&dir).unwrap();
    let mut stale = kpxe.clone();
    stale.extend_from_slice(&noise(11, 5_000));
    std::fs::write(dir.join(".undionly.kpxe.part"), &stale).unwrap();
    // And a .part exactly as long as the file is complete: no second GET for it.
    std::fs::write(dir.join(".ipxe.efi.part"), &efi).unwrap();

    let o = fetch_ipxe(&server, &dir);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(std::fs::read(dir.join("undionly.kpxe")).unwrap() == kpxe);
    assert!(std::fs::read(dir.join("ipxe.efi")).unwrap() == efi);
    let gets: Vec<Seen> = server.seen();
    let kpxe_gets: Vec<_> = gets
        .iter()
        .filter(|s| s.path == "/undionly.kpxe")
        .map(|s| s.range.clone())
        .collect();
    assert_eq!(
        kpxe_gets,
        vec![Some(format!("bytes={}-", stale.len())), None],
        "{gets:?}"
    );
    assert_eq!(gets.iter().filter(|s| s.path == "/ipxe.efi").count(), 1);
    let mut left = leftovers(&dir);
    left.sort();
    assert_eq!(left, ["ipxe.efi", "undionly.kpxe"]);
}

/// A 200 that is an HTML page is not the file, even when no digest would catch it; a
/// redirect loop fails at once instead of being retried with backoff.
#[test]
fn an_html_page_or_a_redirect_loop_fails_without_installing_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let mut routes = HashMap::new();
    routes.insert(
        "/ipxe.efi".to_string(),
        Route::Html(b"<!DOCTYPE html><html><body>Please log in</body></html>".to_vec()),
    );
    let server = file_server(routes);
    let dir = tmp.path().join("cache");
    let o = fetch_ipxe(&server, &dir);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("/ipxe.efi") && err.contains("text/html"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));

    let mut routes = HashMap::new();
    routes.insert("/ipxe.efi".to_string(), Route::Redirect("/ipxe.efi".into()));
    let server = file_server(routes);
    let o = fetch_ipxe(&server, &dir);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("redirect"), "{err}");
    // One try's worth of hops (ureq follows 10), not one per retry.
    let hops = server.seen().len();
    assert!((2..=12).contains(&hops), "{hops} requests");
    assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
}

/// nginx, the real peer for `If-Range`: serving `root` on 127.0.0.1 at 100 KB/s (slow
/// enough to stop a download halfway), logging each request's URI, status, Range and
/// If-Range to `access.log`. Killed when dropped.
struct Nginx(std::process::Child, String);

impl Nginx {
    fn start(dir: &Path, root: &Path) -> Nginx {
        let port = free_port();
        let conf = dir.join("nginx.conf");
        let d = dir.display();
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 16; }}\n\
                 http {{\n  log_format r '$uri $status \"$http_range\" \"$http_if_range\"';\n  \
                 access_log {d}/access.log r;\n  client_body_temp_path {d}/body;\n  \
                 proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
                 uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
                 default_type application/octet-stream;\n  server {{\n    \
                 listen 127.0.0.1:{port};\n    root {};\n    limit_rate 100k;\n  }}\n}}\n",
                root.display()
            ),
        )
        .unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir)
            .spawn()
            .expect("nginx");
        wait_for_port(port, "nginx");
        Nginx(child, format!("http://127.0.0.1:{port}"))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Stop a download of nginx's `ipxe.efi` about a third of the way, let `change` alter the
/// served tree, run `fetch ipxe` again; returns the file it installed, what the file was
/// at first, and nginx's log lines for `ipxe.efi`.
fn resume_from_nginx(change: impl FnOnce(&Path)) -> (Vec<u8>, Vec<u8>, Vec<String>) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("www");
    std::fs::create_dir(&root).unwrap();
    let old = noise(21, 300_000);
    std::fs::write(root.join("ipxe.efi"), &old).unwrap();
    std::fs::write(root.join("undionly.kpxe"), noise(23, 1000)).unwrap();
    let nginx = Nginx::start(tmp.path(), &root);
    let out = tmp.path().join("cache");
    let mut first = fetch_ipxe_from(&nginx.1, &out).spawn().unwrap();
    let part = out.join(".ipxe.efi.part");
    let t = std::time::Instant::now();
    while std::fs::metadata(&part).map_or(0, |m| m.len()) < 50_000 {
        assert!(
            t.elapsed().as_secs() < 10,
            "no .part after {:?}",
            t.elapsed()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let kept = std::fs::read(&part).unwrap();
    assert!(
        kept.len() < old.len() && old.starts_with(&kept),
        "{}",
        kept.len()
    );
    change(&root);
    let o = fetch_ipxe_from(&nginx.1, &out).output().unwrap();
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(leftovers(&out).len(), 2, "{:?}", leftovers(&out));
    let log = std::fs::read_to_string(tmp.path().join("access.log")).unwrap();
    let gets = log
        .lines()
        .filter(|l| l.starts_with("/ipxe.efi "))
        .map(str::to_string)
        .collect();
    (std::fs::read(out.join("ipxe.efi")).unwrap(), old, gets)
}

/// A download stopped halfway, then the file changed on the server (a new iPXE build):
/// the next run must not append the new file's end to the old one's start. Nothing pins
/// iPXE's digest, so only `If-Range` (with nginx's ETag) can tell.
#[test]
fn a_resumed_download_of_a_file_changed_since_is_fetched_whole() {
    let new = noise(22, 300_000);
    let (got, _, gets) = resume_from_nginx(|root| {
        // nginx's ETag is the file's mtime (in seconds) and size.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        std::fs::write(root.join("ipxe.efi"), &new).unwrap();
    });
    assert!(
        got == new,
        "the old start with the new end was installed: {gets:?}"
    );
    assert!(gets.last().unwrap().contains(" 200 "), "{gets:?}");
}

/// The same stop with the file unchanged: the next run asks for the rest only (206).
#[test]
fn a_resumed_download_of_an_unchanged_file_fetches_only_the_rest() {
    let (got, old, gets) = resume_from_nginx(|_| {});
    assert!(got == old);
    let last = gets.last().unwrap();
    assert!(last.contains(" 206 \"bytes="), "{gets:?}");
    assert!(!last.ends_with("\"-\""), "no If-Range was sent: {gets:?}");
}
