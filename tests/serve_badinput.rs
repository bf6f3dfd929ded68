//! Bad input to `mkappliance serve`: malformed DHCP packets, TFTP requests with bad
//! options or traversal, HTTP requests with traversal, bad ranges, huge headers and
//! stalled clients. None may crash or stall the server: after each barrage, a real
//! client must still be served.

mod common;
#[path = "common/fixture.rs"]
mod fixture;
#[path = "serve_lab/mod.rs"]
mod lab;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use common::noise;
use lab::{events, Pair, APPLIANCE_IP, CLIENT_IF, PINNED_MAC};
use socket2::{Domain, Protocol, Socket, Type};

/// A DHCP header for the pinned MAC with `tail` as the option area.
fn dhcp_with(tail: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 236];
    b[0] = 1;
    b[1] = 1;
    b[2] = 6;
    b[28..34].copy_from_slice(&[0, 0x11, 0x22, 0x33, 0x44, 0x55]);
    b.extend_from_slice(tail);
    b
}

#[test]
fn malformed_dhcp_packets_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = lab::build_image(dir.path(), &[]);
    let pair = Pair::new(PINNED_MAC, None);
    let mut serve = lab::serve_image(&pair.server, dir.path(), &image, true);
    pair.client.enter(|| {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        s.set_broadcast(true).unwrap();
        s.bind_device(Some(CLIENT_IF.as_bytes())).unwrap();
        let any: SocketAddr = (Ipv4Addr::UNSPECIFIED, 68).into();
        s.bind(&any.into()).unwrap();
        let s: UdpSocket = s.into();
        let to: SocketAddr = (Ipv4Addr::BROADCAST, 67).into();
        let cookie = [99u8, 130, 83, 99];
        let mut bad: Vec<Vec<u8>> = vec![
            vec![],
            vec![1],
            vec![0; 239],
            dhcp_with(&[1, 2, 3, 4]), // wrong magic cookie
            dhcp_with(&[cookie.as_slice(), &[53]].concat()), // option code without length
            dhcp_with(&[cookie.as_slice(), &[53, 200, 1]].concat()), // length past the end
            dhcp_with(&[cookie.as_slice(), &[53, 0, 255]].concat()), // empty message type
            dhcp_with(&[cookie.as_slice(), &[53, 1, 99, 255]].concat()), // unknown type
            dhcp_with(&[cookie.as_slice(), &[52, 1, 3, 53, 1, 1, 255]].concat()), // overload into zeros
            dhcp_with(
                &[
                    cookie.as_slice(),
                    &[93, 1, 7, 77, 3, 9, 9, 9, 55, 0, 53, 1, 1, 255],
                ]
                .concat(),
            ),
            [
                dhcp_with(&cookie),
                vec![12, 255],
                vec![b'x'; 255],
                vec![53, 1, 1],
            ]
            .concat(), // no END
            [dhcp_with(&cookie), vec![0; 20000]].concat(), // oversized (fragmented)
        ];
        bad.extend((0..200).map(|i| noise(i, 1 + (i as usize * 37) % 1400)));
        bad.extend(
            (0..200)
                .map(|i| [dhcp_with(&cookie), noise(i + 1000, (i as usize * 13) % 600)].concat()),
        );
        for p in &bad {
            let _ = s.send_to(p, to);
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(serve.running(), "serve died:\n{}", serve.output());
    let lease = lab::udhcpc(&pair.client, dir.path(), CLIENT_IF, &["-x", "0x5d:0007"])
        .expect("still serving");
    assert_eq!(lease["ip"], lab::NODE_IP);
    assert_eq!(lease["boot_file"], "ipxe.efi");
    // Garbage is logged once per sender, not once per packet.
    assert!(
        events(&serve.output(), "dhcp-malformed").len() <= 2,
        "{}",
        serve.output()
    );
}

fn rrq(parts: &[&[u8]]) -> Vec<u8> {
    let mut b = vec![0, 1];
    for p in parts {
        b.extend_from_slice(p);
        b.push(0);
    }
    b
}

/// Send one request from a fresh port; the first answer (opcode, rest), if any.
fn tftp_ask(packet: &[u8]) -> Option<(u16, Vec<u8>)> {
    let s = UdpSocket::bind("10.10.10.100:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    s.send_to(packet, (APPLIANCE_IP, 69)).unwrap();
    let mut buf = vec![0u8; 70000];
    let (n, from) = s.recv_from(&mut buf).ok()?;
    let op = u16::from_be_bytes([buf[0], buf[1]]);
    // Be polite: end any transfer this started.
    let _ = s.send_to(&[0, 5, 0, 0, 0], from);
    Some((op, buf[2..n].to_vec()))
}

#[test]
fn bad_tftp_requests_get_errors_or_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let image = lab::build_image(dir.path(), &[]);
    let pair = Pair::new(PINNED_MAC, Some("10.10.10.100/24"));
    let mut serve = lab::serve_image(&pair.server, dir.path(), &image, false);
    pair.client.enter(|| {
        let err = |p: &[u8]| {
            let (op, rest) = tftp_ask(p).unwrap_or_else(|| panic!("no answer to {p:?}"));
            assert_eq!(op, 5, "expected ERROR for {p:?}");
            u16::from_be_bytes([rest[0], rest[1]])
        };
        // Malformed: no NULs, no mode, a WRQ, an obsolete mode.
        assert_eq!(err(b"\0\x01ipxe.efi"), 4);
        assert_eq!(err(&rrq(&[b"ipxe.efi"])), 4);
        assert_eq!(err(&rrq(&[b"ipxe.efi", b"mail"])), 4);
        let mut wrq = rrq(&[b"x", b"octet"]);
        wrq[1] = 2;
        assert_eq!(err(&wrq), 2);
        // Traversal and absolute paths outside the root.
        for name in [
            &b"../etc/appliance/appliance.toml"[..],
            b"..\\..\\etc\\passwd",
            b"a/../../x",
            b"\xff\xfe",
        ] {
            let code = err(&rrq(&[name, b"octet"]));
            assert!(code == 2 || code == 4, "{name:?}: {code}");
        }
        assert_eq!(err(&rrq(&[&[b'a'; 1500], b"octet"])), 2);
        // Bad option values are left out of the OACK; the transfer still starts.
        let (op, rest) = tftp_ask(&rrq(&[
            b"ipxe.efi",
            b"octet",
            b"blksize",
            b"1",
            b"timeout",
            b"0",
            b"windowsize",
            b"x",
            b"tsize",
            b"-5",
            b"blksize",
            b"99999",
        ]))
        .unwrap();
        assert_eq!(op, 3, "no options accepted: plain DATA 1 ({rest:?})");
        assert_eq!(u16::from_be_bytes([rest[0], rest[1]]), 1);
        assert_eq!(rest.len(), 2 + 512);
        let (op, rest) =
            tftp_ask(&rrq(&[b"ipxe.efi", b"octet", b"blksize", b"99999", b"odd"])).unwrap();
        assert_eq!(op, 6);
        assert_eq!(rest, b"blksize\x001468\x00");
        // Stray ACKs and ERRORs to port 69 get nothing; other junk an ERROR 4.
        assert!(tftp_ask(&[0, 4, 0, 1]).is_none());
        assert!(tftp_ask(&[0, 5, 0, 0, 0]).is_none());
        assert_eq!(err(&[0, 9, 1, 2, 3]), 4);
        assert_eq!(err(&[0]), 4);
        for i in 0..300 {
            let s = UdpSocket::bind("10.10.10.100:0").unwrap();
            let _ = s.send_to(&noise(i, 1 + (i as usize * 7) % 700), (APPLIANCE_IP, 69));
        }
    });
    assert!(serve.running(), "serve died:\n{}", serve.output());
    let (code, body, _) = lab::curl(&pair.client, &[&format!("tftp://{APPLIANCE_IP}/ipxe.efi")]);
    assert_eq!(code, 0);
    assert!(body == std::fs::read("/usr/lib/ipxe/ipxe.efi").unwrap());
}

/// Raw HTTP: send `req`, read until the server closes or `timeout`; the response text.
fn raw_http(req: &[u8], timeout: Duration) -> String {
    let mut s = TcpStream::connect((APPLIANCE_IP, 80)).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    let _ = s.write_all(req);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn status(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn bad_http_requests_get_4xx_and_stalled_clients_block_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let image = lab::build_image(dir.path(), &[]);
    let pair = Pair::new(PINNED_MAC, Some("10.10.10.100/24"));
    let mut serve = lab::serve_image(&pair.server, dir.path(), &image, false);
    let boot = lab::image_file(&image, "srv/http/boot.ipxe");
    let expected = boot.clone();
    pair.client.enter(move || {
        let t = Duration::from_secs(5);
        // Stalled clients: a silent connection and a half-sent head stay open meanwhile.
        let _silent = TcpStream::connect((APPLIANCE_IP, 80)).unwrap();
        let mut half = TcpStream::connect((APPLIANCE_IP, 80)).unwrap();
        half.write_all(b"GET /boot.ipxe HTTP/1.1\r\nHost: x\r\n")
            .unwrap();

        let huge = format!(
            "GET /boot.ipxe HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(100_000)
        );
        assert_eq!(status(&raw_http(huge.as_bytes(), t)), 431);
        // Over the 16 KiB limit but complete in one read: refused all the same.
        let over = format!(
            "GET /boot.ipxe HTTP/1.1\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(18_000)
        );
        assert_eq!(status(&raw_http(over.as_bytes(), t)), 431);
        let many: String = (0..100).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(
            status(&raw_http(
                format!("GET /boot.ipxe HTTP/1.1\r\n{many}\r\n").as_bytes(),
                t
            )),
            431
        );
        for (req, want) in [
            (&b"GARBAGE\r\n\r\n"[..], 400),
            (b"GET /boot.ipxe HTTP/9.9\r\n\r\n", 505),
            (b"GET /../../etc/passwd HTTP/1.1\r\n\r\n", 400),
            (b"GET /talos/%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\n\r\n", 400),
            (b"GET /boot.ipxe%00.png HTTP/1.1\r\n\r\n", 400),
            (b"GET /%zz HTTP/1.1\r\n\r\n", 400),
            (b"GET boot.ipxe HTTP/1.1\r\n\r\n", 400),
            (b"GET /boot.ipxe HTTP/1.1\r\n folded: x\r\n\r\n", 400),
            (
                b"GET /boot.ipxe HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
                400,
            ),
            (
                b"GET /boot.ipxe HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                400,
            ),
            (b"\xff\xfe\r\n\r\n", 400),
            (b"PUT /boot.ipxe HTTP/1.1\r\n\r\n", 405),
            // Odd but valid requests nginx serves: an empty line before the request line
            // (RFC 9112 2.2), a later HTTP/1 minor version (RFC 9110 2.5), the absolute
            // form with the scheme in capitals, whose query is not its path (RFC 9112
            // 3.2.2).
            (
                &b"\r\nGET /boot.ipxe HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
                200,
            ),
            (b"GET /boot.ipxe HTTP/1.2\r\nConnection: close\r\n\r\n", 200),
            (
                b"GET HTTP://10.10.10.2/boot.ipxe HTTP/1.1\r\nConnection: close\r\n\r\n",
                200,
            ),
            (
                b"GET http://10.10.10.2?/boot.ipxe HTTP/1.1\r\nConnection: close\r\n\r\n",
                404,
            ),
        ] {
            let resp = raw_http(req, t);
            assert_eq!(
                status(&resp),
                want,
                "{:?} → {resp:?}",
                String::from_utf8_lossy(req)
            );
        }
        // Bad ranges: ignored (whole file) or 416, never a crash or a wrong slice.
        for (range, want) in [
            ("bytes=5-2", 200),
            ("bytes=0-1,3-4", 200),
            ("bytes=abc", 200),
            ("lines=0-1", 200),
            ("bytes=99999999999999999999-", 200),
            ("bytes=999999-", 416),
            ("bytes=-0", 416),
        ] {
            let req =
                format!("GET /boot.ipxe HTTP/1.1\r\nRange: {range}\r\nConnection: close\r\n\r\n");
            let resp = raw_http(req.as_bytes(), t);
            assert_eq!(status(&resp), want, "{range}: {resp:?}");
            if want == 200 {
                assert!(
                    resp.ends_with(&String::from_utf8_lossy(&boot).to_string()),
                    "{range}"
                );
            }
        }
        // Pipelined requests on one connection are answered in order.
        let two =
            b"GET /boot.ipxe HTTP/1.1\r\n\r\nHEAD /boot.ipxe HTTP/1.1\r\nConnection: close\r\n\r\n";
        let resp = raw_http(two, t);
        assert_eq!(resp.matches("HTTP/1.1 200 OK").count(), 2, "{resp}");
        // Noise.
        for i in 0..100 {
            let junk = [noise(i, 10 + i as usize * 50), b"\r\n\r\n".to_vec()].concat();
            let resp = raw_http(&junk, t);
            assert!(matches!(status(&resp), 400 | 505), "{resp:?}");
        }
        // The stalled clients never held anyone up; the half head times out on its own.
        drop(half);
    });
    assert!(serve.running(), "serve died:\n{}", serve.output());
    let r = lab::curl(&pair.client, &[&format!("http://{APPLIANCE_IP}/boot.ipxe")]);
    assert_eq!((r.0, r.1), (0, expected));
}

/// After a refused request the server drains what the client still sends, briefly: a
/// client that keeps trickling bytes into the closing connection must not hold its
/// thread (and one of the 128 connections) for ever.
#[test]
fn a_client_trickling_into_a_closing_connection_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let image = lab::build_image(dir.path(), &[]);
    let pair = Pair::new(PINNED_MAC, Some("10.10.10.100/24"));
    let serve = lab::serve_image(&pair.server, dir.path(), &image, false);
    let held = pair.client.enter(|| {
        let mut s = TcpStream::connect((APPLIANCE_IP, 80)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // An endless head: 431, then the server closes its side and drains.
        s.write_all(format!("GET /boot.ipxe HTTP/1.1\r\nX: {}", "a".repeat(30_000)).as_bytes())
            .unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).unwrap();
        assert_eq!(status(&String::from_utf8_lossy(&resp)), 431);
        // A byte every 200 ms; once the server has closed, a write fails (reset).
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            if s.write_all(b"a").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        start.elapsed()
    });
    assert!(
        held < Duration::from_secs(6),
        "the server drained a trickling client for {held:?}"
    );
    drop(serve);
}
