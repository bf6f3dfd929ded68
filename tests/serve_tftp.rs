//! TFTP of `mkappliance serve`, judged by curl and atftp (windowsize) and by a test-side
//! client laid out here from RFC 1350/2347/7440 that loses packets on purpose.

mod common;
#[path = "common/fixture.rs"]
mod fixture;
#[path = "serve_lab/mod.rs"]
mod lab;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lab::{events, Pair, APPLIANCE_IP, PINNED_MAC};

const IPXE: &str = "/usr/lib/ipxe/ipxe.efi";
const BIG: usize = 20_000_000;

/// An image whose TFTP root also holds `big.bin` (20 MB of noise) and `text.txt`.
fn image_with_files(dir: &Path) -> (PathBuf, Vec<u8>) {
    let ov = dir.join("overlay/srv/tftp");
    std::fs::create_dir_all(&ov).unwrap();
    let big = common::noise(0x9E37_79B9, BIG);
    std::fs::write(ov.join("big.bin"), &big).unwrap();
    std::fs::write(ov.join("text.txt"), b"line one\nline two\r\nend").unwrap();
    let overlay = dir.join("overlay");
    let image = lab::build_image(dir, &["--overlay", overlay.to_str().unwrap()]);
    (image, big)
}

/// `serve` on that image, the client at 10.10.10.100 with the pinned MAC; `big.bin`'s
/// bytes. Bound in this order, they are dropped server first, directory last.
fn serving_files() -> (tempfile::TempDir, Vec<u8>, Pair, lab::Proc) {
    let dir = tempfile::tempdir().unwrap();
    let (image, big) = image_with_files(dir.path());
    let pair = Pair::new(PINNED_MAC, Some("10.10.10.100/24"));
    let serve = lab::serve_image(&pair.server, dir.path(), &image, false);
    (dir, big, pair, serve)
}

#[test]
fn curl_fetches_ipxe_and_a_20_mb_file_with_any_block_size() {
    let (_dir, big, pair, serve) = serving_files();
    let ipxe = std::fs::read(IPXE).unwrap();
    for blk in [None, Some("1468"), Some("8192")] {
        for (name, want) in [("ipxe.efi", &ipxe), ("big.bin", &big)] {
            let mut args = vec![];
            if let Some(b) = blk {
                args.extend(["--tftp-blksize", b]);
            }
            let url = format!("tftp://{APPLIANCE_IP}/{name}");
            args.push(&url);
            let (code, body, _) = lab::curl(&pair.client, &args);
            assert_eq!(code, 0, "curl {args:?}\n{}", serve.output());
            assert!(
                body == *want,
                "{name} with blksize {blk:?}: {} bytes differ",
                body.len()
            );
        }
    }
    let log = serve.output();
    let sent = events(&log, "tftp-sent");
    assert_eq!(sent.len(), 6, "{log}");
    // One after the other, the six transfers ran on one thread, kept for the next.
    assert_eq!(
        serve.threads_named(mkappliance::appliance::tftp::TRANSFER_THREAD),
        1
    );
    // 8192 does not fit the 1500-byte link: clamped to 1500 - 32.
    assert_eq!(
        sent.iter().filter(|l| l.contains("blksize=1468")).count(),
        4,
        "{log}"
    );
    assert!(sent.iter().all(|l| l.contains(PINNED_MAC)), "{log}");
}

#[test]
fn atftp_with_windowsize_and_many_clients_at_once() {
    let (dir, big, pair, serve) = serving_files();
    let out = dir.path().join("atftp.bin");
    lab::run(
        pair.client
            .cmd("atftp")
            .args([
                "--option",
                "windowsize 16",
                "--option",
                "blksize 1468",
                "-g",
                "-r",
                "big.bin",
                "-l",
            ])
            .arg(&out)
            .arg(APPLIANCE_IP),
    );
    assert!(
        std::fs::read(&out).unwrap() == big,
        "atftp windowsize 16: bytes differ"
    );
    assert!(
        events(&serve.output(), "tftp-sent")
            .iter()
            .any(|l| l.contains("windowsize=16") && l.contains("bytes=20000000")),
        "{}",
        serve.output()
    );

    // Eight curls at once.
    let procs: Vec<_> = (0..8)
        .map(|i| {
            let p = dir.path().join(format!("c{i}.bin"));
            let child = pair
                .client
                .cmd("curl")
                .args(["-s", "--max-time", "60", "--tftp-blksize", "1468", "-o"])
                .arg(&p)
                .arg(format!("tftp://{APPLIANCE_IP}/big.bin"))
                .spawn()
                .unwrap();
            (child, p)
        })
        .collect();
    for (mut child, p) in procs {
        assert!(child.wait().unwrap().success());
        assert!(std::fs::read(&p).unwrap() == big, "{} differs", p.display());
    }
    assert_eq!(events(&serve.output(), "tftp-sent").len(), 9);
}

/// The server reads the next window while the client acknowledges this one: what it
/// sends after a short ACK, a timeout or a lost packet must still be the file's bytes.
#[test]
fn windows_resent_after_short_acks_timeouts_and_losses_carry_the_right_bytes() {
    let (dir, big, pair, serve) = serving_files();
    let want = big.clone();
    pair.client.enter(move || {
        // Window of 8: every 7th window is acknowledged only up to its 3rd block (the
        // rest "lost"), the 50th not at all (the server resends it after 1 s).
        let (s, _, tid) = request_oack(
            "big.bin",
            &[("blksize", "1468"), ("windowsize", "8")],
            "OACK",
        );
        s.send_to(&ack(0), tid).unwrap();
        let (mut got, mut acked, mut round) = (Vec::new(), 0u64, 0);
        let (mut short, mut silent) = (0, 0);
        loop {
            let mut win: Vec<Vec<u8>> = Vec::new();
            while win.len() < 8 && win.last().is_none_or(|d| d.len() == 1468) {
                let (p, _) = next(&s, Duration::from_secs(3)).expect("DATA");
                let n = acked + 1 + win.len() as u64;
                assert_eq!(data_block(&p), n as u16, "out of order");
                win.push(p[4..].to_vec());
            }
            round += 1;
            if round == 50 {
                silent += 1;
                continue;
            }
            let keep = if round % 7 == 3 && win.len() > 3 {
                short += 1;
                3
            } else {
                win.len()
            };
            let end = keep == win.len() && win[keep - 1].len() < 1468;
            win[..keep].iter().for_each(|d| got.extend_from_slice(d));
            acked += keep as u64;
            s.send_to(&ack(acked as u16), tid).unwrap();
            if end {
                break;
            }
        }
        assert!(short > 200 && silent == 1);
        assert!(
            got == want,
            "bytes differ after go-backs ({} bytes)",
            got.len()
        );
    });

    // A route MTU below the datagrams': the kernel refuses them as one GSO send, and the
    // server falls back to sending them one by one (IP fragments them).
    pair.server.ip(&[
        "route",
        "add",
        &format!("{}/32", lab::NODE_IP),
        "dev",
        lab::SERVER_IF,
        "mtu",
        "lock",
        "1000",
    ]);
    let out = dir.path().join("fragmented.bin");
    atftp_window_8(&pair, &out);
    assert!(
        std::fs::read(&out).unwrap() == big,
        "atftp through a 1000-byte route MTU: bytes differ"
    );
    pair.server
        .ip(&["route", "del", &format!("{}/32", lab::NODE_IP)]);

    // atftp with every 400th DATA packet dropped on the way in (as netfilter counts
    // them: a GSO send can pass the veth whole, as one packet): the server's timeout
    // resends the window it had read past.
    let rules = dir.path().join("lossy.nft");
    std::fs::write(
        &rules,
        "table inet lossy {\n  chain input {\n    type filter hook input priority 0;\n    \
         udp sport != 69 numgen inc mod 400 == 7 counter drop\n  }\n}\n",
    )
    .unwrap();
    lab::run(pair.client.cmd("nft").arg("-f").arg(&rules));
    let out = dir.path().join("lossy.bin");
    atftp_window_8(&pair, &out);
    let counted = lab::run(
        pair.client
            .cmd("nft")
            .args(["list", "table", "inet", "lossy"]),
    );
    let dropped: u64 = counted
        .split("counter packets ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(dropped >= 2, "nothing was dropped: {counted}");
    assert!(
        std::fs::read(&out).unwrap() == big,
        "atftp after {dropped} losses: bytes differ"
    );
    assert_eq!(
        events(&serve.output(), "tftp-sent").len(),
        3,
        "{}",
        serve.output()
    );
}

/// `big.bin` with atftp, windowsize 8, blksize 1468, into `out`.
fn atftp_window_8(pair: &Pair, out: &Path) {
    lab::run(
        pair.client
            .cmd("timeout")
            .args([
                "60",
                "atftp",
                "--option",
                "windowsize 8",
                "--option",
                "blksize 1468",
                "-g",
                "-r",
                "big.bin",
                "-l",
            ])
            .arg(out)
            .arg(APPLIANCE_IP),
    );
}

#[test]
fn refuses_writes_traversal_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let image = lab::build_image(dir.path(), &[]);
    let pair = Pair::new(PINNED_MAC, Some("10.10.10.100/24"));
    let serve = lab::serve_image(&pair.server, dir.path(), &image, false);
    let upload = dir.path().join("up.txt");
    std::fs::write(&upload, "hello").unwrap();
    let (code, _, _) = lab::curl(
        &pair.client,
        &[
            "-T",
            upload.to_str().unwrap(),
            &format!("tftp://{APPLIANCE_IP}/up.txt"),
        ],
    );
    assert_ne!(code, 0, "an upload was accepted");
    for path in [
        "../../etc/appliance/appliance.toml",
        "..%2f..%2fetc%2fappliance%2fappliance.toml",
        "/../http/configs/minipc.yaml",
        "nope.efi",
    ] {
        let (code, body, _) = lab::curl(
            &pair.client,
            &["--path-as-is", &format!("tftp://{APPLIANCE_IP}/{path}")],
        );
        assert_ne!(code, 0, "{path} was served");
        assert!(body.is_empty(), "{path}: got {} bytes", body.len());
    }
    let log = serve.output();
    let refused = events(&log, "tftp-refused");
    assert!(
        refused
            .iter()
            .any(|l| l.contains("write requests are refused")),
        "{log}"
    );
    assert!(
        refused.iter().any(|l| l.contains("access violation")),
        "{log}"
    );
    assert!(
        refused.iter().any(|l| l.contains("file not found")),
        "{log}"
    );
    assert!(events(&log, "tftp-sent").is_empty(), "{log}");
}

/// Firmware asks for the size (RRQ with tsize, ERROR 8 to the OACK) and then reads the
/// file at once; a client may do both from one port. The read must be answered, not
/// taken for a retransmission of the size query whose thread is still cleaning up.
#[test]
fn a_read_right_after_a_size_query_from_the_same_port_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let image = lab::build_image(dir.path(), &[]);
    let pair = Pair::new(PINNED_MAC, Some("10.10.10.100/24"));
    let serve = lab::serve_image(&pair.server, dir.path(), &image, false);
    let answered = pair.client.enter(|| {
        (0..20)
            .filter(|_| {
                let (s, _, tid) =
                    request_oack("ipxe.efi", &[("tsize", "0"), ("blksize", "1468")], "OACK");
                s.send_to(&[0, 5, 0, 8, 0], tid).unwrap();
                s.send_to(&rrq("ipxe.efi", "octet", &[("blksize", "1468")]), server())
                    .unwrap();
                let Some((p, tid)) = next(&s, Duration::from_secs(1)) else {
                    return false;
                };
                assert_eq!(&p[..2], &[0, 6], "not an OACK: {p:?}");
                s.send_to(&[0, 5, 0, 0, 0], tid).unwrap();
                true
            })
            .count()
    });
    assert_eq!(answered, 20, "reads unanswered:\n{}", serve.output());
}

// A test-side client.

fn rrq(name: &str, mode: &str, opts: &[(&str, &str)]) -> Vec<u8> {
    let mut b = vec![0, 1];
    for s in [name, mode]
        .iter()
        .chain(opts.iter().flat_map(|(k, v)| [k, v]))
    {
        b.extend_from_slice(s.as_bytes());
        b.push(0);
    }
    b
}

/// Send a read request from a fresh client socket; return it with the server's first
/// reply (OACK or DATA 1) and the transfer's TID, or panic naming `what`.
fn request(
    name: &str,
    mode: &str,
    opts: &[(&str, &str)],
    what: &str,
) -> (UdpSocket, Vec<u8>, SocketAddr) {
    let s = UdpSocket::bind("10.10.10.100:0").unwrap();
    s.send_to(&rrq(name, mode, opts), server()).unwrap();
    let (p, tid) = next(&s, Duration::from_secs(2)).expect(what);
    (s, p, tid)
}

/// [`request`] with options: the first reply must be an OACK; returns its option bytes.
fn request_oack(name: &str, opts: &[(&str, &str)], what: &str) -> (UdpSocket, Vec<u8>, SocketAddr) {
    let (s, p, tid) = request(name, "octet", opts, what);
    assert_eq!(&p[..2], &[0, 6], "{what}: not an OACK: {p:?}");
    (s, p[2..].to_vec(), tid)
}

fn ack(block: u16) -> [u8; 4] {
    let b = block.to_be_bytes();
    [0, 4, b[0], b[1]]
}

/// The next packet from the server within `wait`, with its source (the transfer's TID).
fn next(s: &UdpSocket, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = vec![0u8; 70000];
    let (n, from) = s.recv_from(&mut buf).ok()?;
    buf.truncate(n);
    Some((buf, from))
}

fn data_block(p: &[u8]) -> u16 {
    assert_eq!(&p[..2], &[0, 3], "expected DATA, got {p:?}");
    u16::from_be_bytes([p[2], p[3]])
}

fn server() -> SocketAddr {
    (APPLIANCE_IP.parse::<std::net::Ipv4Addr>().unwrap(), 69).into()
}

#[test]
fn retransmits_on_timeout_goes_back_on_short_acks_and_rolls_over() {
    let (_dir, big, pair, serve) = serving_files();
    pair.client.enter(move || {
        // Lock-step: DATA 1 unacknowledged comes again after the 1 s default timeout.
        let (s, p, tid) = request("big.bin", "octet", &[], "DATA 1");
        assert_eq!(data_block(&p), 1);
        assert_eq!(p.len(), 4 + 512);
        let t = Instant::now();
        let (p, _) = next(&s, Duration::from_secs(3)).expect("DATA 1 again");
        assert_eq!(data_block(&p), 1);
        assert!(p[4..] == big[..512], "DATA 1 resent with other bytes");
        assert!(
            t.elapsed() >= Duration::from_millis(800),
            "resent too early"
        );
        // A duplicate ACK must not cause a duplicate send (Sorcerer's Apprentice).
        s.send_to(&ack(1), tid).unwrap();
        s.send_to(&ack(1), tid).unwrap();
        let (p, _) = next(&s, Duration::from_secs(2)).unwrap();
        assert_eq!(data_block(&p), 2);
        assert!(
            next(&s, Duration::from_millis(300)).is_none(),
            "block 2 was sent twice"
        );
        s.send_to(&[0, 5, 0, 0, b'b', b'y', b'e', 0], tid).unwrap();

        // Window of 4: ACK 0 after the OACK, then ACK 2 of 1..=4 makes it go back to 3.
        let (s, opts, tid) =
            request_oack("big.bin", &[("windowsize", "4"), ("tsize", "0")], "OACK");
        let text = String::from_utf8_lossy(&opts).to_string();
        assert!(text.contains("windowsize\x004\x00"), "{text:?}");
        assert!(text.contains(&format!("tsize\x00{BIG}\x00")), "{text:?}");
        s.send_to(&ack(0), tid).unwrap();
        let blocks: Vec<u16> = (0..4)
            .map(|_| data_block(&next(&s, Duration::from_secs(2)).unwrap().0))
            .collect();
        assert_eq!(blocks, [1, 2, 3, 4]);
        s.send_to(&ack(2), tid).unwrap();
        let (p, _) = next(&s, Duration::from_secs(2)).unwrap();
        assert_eq!(data_block(&p), 3, "no go-back after a short ACK");
        s.send_to(&[0, 5, 0, 0, 0], tid).unwrap();

        // OVMF's size query: RRQ with tsize, then ERROR 8 (option refused) to the OACK.
        let (s, _, tid) = request_oack(
            "ipxe.efi",
            &[("tsize", "0"), ("blksize", "1468")],
            "OACK to the size query",
        );
        s.send_to(&[0, 5, 0, 8, 0], tid).unwrap();

        // 8-byte blocks: 2.5 million blocks would take long, so fetch 600 KB worth of a
        // 20 MB file with a window of 64 past block 65535 and check the bytes.
        let (s, _, tid) =
            request_oack("big.bin", &[("blksize", "8"), ("windowsize", "64")], "OACK");
        s.send_to(&ack(0), tid).unwrap();
        let mut got: Vec<u8> = Vec::new();
        let mut expect: u64 = 1;
        while expect <= 75_000 {
            let (p, _) = next(&s, Duration::from_secs(3)).expect("DATA");
            let b = data_block(&p);
            if b != expect as u16 {
                continue; // a resent window overlapping what we have
            }
            got.extend_from_slice(&p[4..]);
            if expect.is_multiple_of(64) {
                s.send_to(&ack(b), tid).unwrap();
            }
            expect += 1;
        }
        s.send_to(&[0, 5, 0, 0, 0], tid).unwrap();
        assert!(
            got == big[..got.len()],
            "bytes differ across the block-number rollover"
        );
        assert_eq!(got.len(), 75_000 * 8);

        // netascii: LF becomes CR LF, CR becomes CR NUL.
        let (s, p, tid) = request("text.txt", "netascii", &[], "netascii DATA 1");
        assert_eq!(data_block(&p), 1);
        assert_eq!(&p[4..], b"line one\r\nline two\r\0\r\nend");
        s.send_to(&ack(1), tid).unwrap();
    });
    let log = serve.output();
    assert!(
        events(&log, "tftp-failed").len() >= 3,
        "aborted transfers are logged as failed:\n{log}"
    );
    let probes = events(&log, "tftp-size-query");
    assert_eq!(probes.len(), 1, "one size query:\n{log}");
    assert!(
        probes[0].contains("file=ipxe.efi")
            && probes[0].contains(&format!("bytes={}", std::fs::metadata(IPXE).unwrap().len())),
        "the size query names the file and its size:\n{log}"
    );
    assert!(
        !events(&log, "tftp-failed")
            .iter()
            .any(|l| l.contains("file=ipxe.efi")),
        "a size query is not a failed transfer:\n{log}"
    );
}
