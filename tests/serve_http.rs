//! HTTP of `mkappliance serve`, judged by curl against the bytes debugfs reads out of the
//! image: the nginx.conf locations, GET/HEAD/Range, keep-alive, the configs ACL,
//! traversal, boot-once across restarts, and `--root` serving the unpacked tree.

mod common;
#[path = "common/fixture.rs"]
mod fixture;
#[path = "serve_lab/mod.rs"]
mod lab;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use lab::{events, Ns, Pair, APPLIANCE_IP, PINNED_MAC};

const TALOS: &str = "v1.11.6";
/// A second address on the client side: on the link, but not the pinned node.
const OTHER_IP: &str = "10.10.10.101";

struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// curl in `ns` with `args`; the last response's status, headers (lower-case) and body.
fn http(ns: &Ns, args: &[&str]) -> Reply {
    let dir = tempfile::tempdir().unwrap();
    let (h, b) = (dir.path().join("h"), dir.path().join("b"));
    let out = ns
        .cmd("curl")
        .args(["-s", "--max-time", "30", "-D"])
        .arg(&h)
        .arg("-o")
        .arg(&b)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "curl {args:?} failed: {out:?}");
    let head = std::fs::read_to_string(&h).unwrap();
    let last = head.trim_end().rsplit("\r\n\r\n").next().unwrap();
    let mut lines = last.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: std::fs::read(&b).unwrap_or_default(),
    }
}

fn url(path: &str) -> String {
    format!("http://{APPLIANCE_IP}{path}")
}

fn client() -> Pair {
    let pair = Pair::new(PINNED_MAC, Some("10.10.10.100/24"));
    pair.client
        .add_addr(lab::CLIENT_IF, &format!("{OTHER_IP}/24"));
    pair
}

#[test]
fn get_head_ranges_types_and_keep_alive() {
    let dir = tempfile::tempdir().unwrap();
    let image = lab::build_image(dir.path(), &[]);
    let pair = client();
    let serve = lab::serve_image(&pair.server, dir.path(), &image, false);
    let c = &pair.client;

    let boot = http(c, &[&url("/boot.ipxe")]);
    assert_eq!(boot.status, 200);
    assert_eq!(boot.body, lab::image_file(&image, "srv/http/boot.ipxe"));
    assert_eq!(boot.headers["content-type"], "text/plain");

    let kernel = lab::image_file(&image, &format!("srv/http/talos/{TALOS}/vmlinuz"));
    let r = http(c, &[&url(&format!("/talos/{TALOS}/vmlinuz"))]);
    assert_eq!(r.status, 200);
    assert!(r.body == kernel, "vmlinuz differs");
    assert_eq!(r.headers["content-length"], kernel.len().to_string());
    assert_eq!(r.headers["content-type"], "application/octet-stream");
    assert_eq!(r.headers["accept-ranges"], "bytes");

    let initramfs = lab::image_file(&image, &format!("srv/http/talos/{TALOS}/initramfs.xz"));
    let r = http(c, &["-I", &url(&format!("/talos/{TALOS}/initramfs.xz"))]);
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-length"], initramfs.len().to_string());
    let (_, _, w) = lab::curl(c, &["-I", &url(&format!("/talos/{TALOS}/initramfs.xz"))]);
    assert_eq!(w, "200 0", "HEAD sent a body");

    let len = kernel.len();
    let path = url(&format!("/talos/{TALOS}/vmlinuz"));
    let r = http(c, &["-r", "100-199", &path]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, kernel[100..200]);
    assert_eq!(r.headers["content-range"], format!("bytes 100-199/{len}"));
    let r = http(c, &["-H", "Range: bytes=-10", &path]);
    assert_eq!((r.status, &r.body[..]), (206, &kernel[len - 10..]));
    let r = http(c, &["-r", &format!("{}-", len - 5), &path]);
    assert_eq!((r.status, &r.body[..]), (206, &kernel[len - 5..]));
    let r = http(c, &["-r", &format!("{len}-"), &path]);
    assert_eq!(r.status, 416);
    assert_eq!(r.headers["content-range"], format!("bytes */{len}"));
    // If-Range with a validator we never sent cannot match: the whole file, not a piece
    // of what may be another version of it (RFC 9110 13.1.5).
    for validator in ["\"6941f280-d87800\"", "Wed, 17 Dec 2025 00:00:00 GMT"] {
        let r = http(
            c,
            &["-r", "0-9", "-H", &format!("If-Range: {validator}"), &path],
        );
        assert_eq!(r.status, 200, "If-Range: {validator}");
        assert!(
            r.body == kernel,
            "If-Range: {validator}: not the whole file"
        );
    }

    // UEFI HTTP boot fetches iPXE from the TFTP root.
    let r = http(c, &[&url("/ipxe.efi")]);
    assert_eq!(r.status, 200);
    assert!(r.body == std::fs::read("/usr/lib/ipxe/ipxe.efi").unwrap());

    // Only the nginx.conf locations; no listings.
    for p in [
        "/",
        "/talos/",
        "/talos",
        "/etc/appliance/appliance.toml",
        "/srv/http/boot.ipxe",
        "/dnsmasq.conf",
    ] {
        assert_eq!(http(c, &[&url(p)]).status, 404, "{p}");
    }
    assert_eq!(http(c, &["-X", "DELETE", &url("/boot.ipxe")]).status, 405);

    // Two requests, one connection.
    let out = c
        .cmd("curl")
        .args([
            "-sv",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            &url("/boot.ipxe"),
            &url("/boot.ipxe"),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Re-using existing connection"), "{err}");
    let log = serve.output();
    assert!(
        events(&log, "http").iter().any(|l| l.contains(PINNED_MAC)
            && l.contains(&format!("path=/talos/{TALOS}/vmlinuz"))
            && l.contains(&format!("bytes={len}"))),
        "{log}"
    );
}

#[test]
fn configs_go_to_the_pinned_node_only_and_traversal_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = lab::build_image(dir.path(), &[]);
    let pair = client();
    let serve = lab::serve_image(&pair.server, dir.path(), &image, false);
    let c = &pair.client;
    let config = lab::image_file(&image, "srv/http/configs/minipc.yaml");

    let r = http(c, &["--interface", OTHER_IP, &url("/configs/minipc.yaml")]);
    assert_eq!(r.status, 403);
    assert!(
        !r.body.windows(8).any(|w| w == b"machine:"),
        "config leaked in a 403 body"
    );
    for p in [
        "/talos/../configs/minipc.yaml",
        "/talos/%2e%2e/configs/minipc.yaml",
        "/%2E%2E/srv/http/configs/minipc.yaml",
        "/talos/..%2fconfigs/minipc.yaml",
        "/../../etc/passwd",
        "/talos/..\\..\\configs/minipc.yaml",
    ] {
        let r = http(c, &["--path-as-is", "--interface", OTHER_IP, &url(p)]);
        assert!(matches!(r.status, 400 | 403 | 404), "{p}: {}", r.status);
        assert!(r.body != config, "{p} served the config");
    }
    let r = http(c, &[&url("/configs/minipc.yaml")]);
    assert_eq!(r.status, 200);
    assert!(r.body == config);
    let log = serve.output();
    let denied: Vec<_> = events(&log, "http")
        .into_iter()
        .filter(|l| l.contains("status=403"))
        .collect();
    assert_eq!(denied.len(), 1, "{log}");
    assert!(
        denied[0].contains("WARNING") && denied[0].contains(OTHER_IP),
        "{log}"
    );
}

/// A client that goes away halfway through a download: the log says how much was sent,
/// not 0 (the operator reads it to see how far the node got).
#[test]
fn a_download_cut_short_is_logged_with_the_bytes_sent() {
    use std::io::{Read, Write};
    const READ: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let image = lab::build_image(dir.path(), &[]);
    let pair = client();
    let serve = lab::serve_image(&pair.server, dir.path(), &image, false);
    let path = format!("/talos/{TALOS}/initramfs.xz");
    let len = lab::image_file(&image, &format!("srv/http{path}")).len() as u64;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {APPLIANCE_IP}\r\n\r\n");
    pair.client.enter(move || {
        let mut s = std::net::TcpStream::connect((APPLIANCE_IP, 80)).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0;
        while got < READ {
            got += s.read(&mut buf).unwrap();
        }
        // Close with a reset, as a client that gives up does.
        socket2::SockRef::from(&s)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
    });
    let needle = format!("path={path} ");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let line = loop {
        let log = serve.output();
        if let Some(l) = events(&log, "http")
            .into_iter()
            .find(|l| l.contains(&needle))
        {
            break l.to_string();
        }
        assert!(std::time::Instant::now() < end, "no http event:\n{log}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let bytes: u64 = line
        .split(' ')
        .find_map(|f| f.strip_prefix("bytes="))
        .and_then(|b| b.parse().ok())
        .unwrap_or_else(|| panic!("no bytes in {line}"));
    // At least what the client read (less the head), less than the whole file.
    assert!(
        bytes >= (READ - 1024) as u64 && bytes < len,
        "bytes={bytes} for a download cut after {READ} of {len}: {line}"
    );
}

fn boot_script(c: &Ns, from: &str) -> String {
    let r = http(c, &["--interface", from, &url("/boot.ipxe")]);
    assert_eq!(r.status, 200);
    String::from_utf8(r.body).unwrap()
}

const INSTALL: &str = "kernel http://10.10.10.2/talos/v1.11.6/vmlinuz";

#[test]
fn boot_once_switches_after_the_config_and_survives_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let image = lab::build_image(dir.path(), &[]);
    let pair = client();
    let c = &pair.client;
    let node = lab::NODE_IP;
    let mut serve = lab::serve(
        &pair.server,
        dir.path(),
        "serve1",
        &lab::image_args(&image),
        &[],
        false,
    );
    assert!(boot_script(c, node).contains(INSTALL));
    // A HEAD or a partial fetch is not the whole config.
    http(c, &["-I", &url("/configs/minipc.yaml")]);
    http(c, &["-r", "0-9", &url("/configs/minipc.yaml")]);
    assert!(boot_script(c, node).contains(INSTALL));
    assert_eq!(http(c, &[&url("/configs/minipc.yaml")]).status, 200);
    let exit = boot_script(c, node);
    assert!(
        exit.starts_with("#!ipxe") && exit.contains("\nexit\n") && !exit.contains("kernel"),
        "{exit}"
    );
    // Only the node's own boots change.
    assert!(boot_script(c, OTHER_IP).contains(INSTALL));
    let log = serve.output();
    assert_eq!(events(&log, "config-fetched").len(), 1, "{log}");
    assert_eq!(events(&log, "boot-once-armed").len(), 1, "{log}");
    assert!(serve.stop(), "serve did not exit cleanly on SIGTERM");

    let mut serve = lab::serve(
        &pair.server,
        dir.path(),
        "serve2",
        &lab::image_args(&image),
        &[],
        false,
    );
    assert!(serve.output().contains("armed: the node boots from disk"));
    assert_eq!(boot_script(c, node), exit);
    serve.stop();

    let serve = lab::serve(
        &pair.server,
        dir.path(),
        "serve3",
        &lab::image_args(&image),
        &["--rearm"],
        false,
    );
    assert!(boot_script(c, node).contains(INSTALL));
    assert_eq!(events(&serve.output(), "boot-once-rearmed").len(), 1);
    // The operator's log file has the whole story.
    let file = std::fs::read_to_string(dir.path().join("log/events.log")).unwrap();
    for kind in ["config-fetched", "boot-once-armed", "boot-once-rearmed"] {
        assert!(
            !events(&file, kind).is_empty(),
            "{kind} missing from events.log:\n{file}"
        );
    }
}

#[test]
fn pxe_every_boot_never_switches() {
    let dir = tempfile::tempdir().unwrap();
    let image = lab::build_image(dir.path(), &["--pxe-every-boot"]);
    let pair = client();
    let serve = lab::serve_image(&pair.server, dir.path(), &image, false);
    assert_eq!(
        http(&pair.client, &[&url("/configs/minipc.yaml")]).status,
        200
    );
    assert!(boot_script(&pair.client, lab::NODE_IP).contains(INSTALL));
    assert!(events(&serve.output(), "boot-once-armed").is_empty());
}

#[test]
fn serves_an_unpacked_root_like_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let image = lab::build_image(dir.path(), &[]);
    let (offset, _, _, _) = common::sgdisk_partition(&image, 2);
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    lab::run(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("rdump / {}", root.display()))
            .arg(format!("{}?offset={offset}", image.display())),
    );
    // An escape hatch inside the tree must not lead out of it.
    std::os::unix::fs::symlink("/etc", root.join("srv/http/talos/etc")).unwrap();
    let pair = client();
    let root_args = [Path::new("--root"), root.as_path()];
    let serve = lab::serve(&pair.server, dir.path(), "serve", &root_args, &[], false);
    for p in [
        "/boot.ipxe".to_string(),
        "/configs/minipc.yaml".into(),
        "/ipxe.efi".into(),
        format!("/talos/{TALOS}/vmlinuz"),
        format!("/talos/{TALOS}/initramfs.xz"),
    ] {
        let r = http(&pair.client, &[&url(&p)]);
        assert_eq!(r.status, 200, "{p}");
        let rel = match p.as_str() {
            "/ipxe.efi" => "srv/tftp/ipxe.efi".to_string(),
            other => format!("srv/http{other}"),
        };
        assert!(r.body == lab::image_file(&image, &rel), "{p} differs");
    }
    assert_eq!(http(&pair.client, &[&url("/talos/etc/passwd")]).status, 404);
    assert!(dir
        .path()
        .join("state/boot-once-00-11-22-33-44-55.json")
        .exists());
    drop(serve);
}
