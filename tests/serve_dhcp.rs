//! DHCP and the IPv6 RA of `mkappliance serve`, judged by real clients (busybox udhcpc),
//! by real dnsmasq on the rendered dnsmasq.conf, and by a test-side client whose
//! packets are laid out here by hand from RFC 2131.

mod common;
#[path = "common/fixture.rs"]
mod fixture;
#[path = "serve_lab/mod.rs"]
mod lab;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use lab::{
    events, Ns, Pair, Proc, Switch, APPLIANCE_IP, CLIENT_IF, NODE_IP, PINNED_MAC, SERVER_IF,
};
use socket2::{Domain, Protocol, Socket, Type};

/// What udhcpc reports that both servers must agree on.
const COMPARED: &[&str] = &[
    "ip",
    "subnet",
    "router",
    "dns",
    "siaddr",
    "boot_file",
    "serverid",
    "lease",
    "hostname",
    "opt175",
    "vendor",
];

fn dnsmasq(ns: &Ns, dir: &Path, conf: &Path, extra: &[&str]) -> Proc {
    let mut cmd = ns.cmd("dnsmasq");
    cmd.arg("-d")
        .arg("-C")
        .arg(conf)
        .arg(format!(
            "--dhcp-leasefile={}",
            dir.join("dnsmasq.leases").display()
        ))
        .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
        .arg("--user=root")
        .args(extra);
    let mut p = Proc::spawn("dnsmasq", cmd, &dir.join("dnsmasq.log"));
    p.wait_for("DHCP, IP range", Duration::from_secs(10));
    p
}

#[test]
fn pinned_node_gets_what_dnsmasq_gives_it() {
    let dir = tempfile::tempdir().unwrap();
    let image = lab::build_image(dir.path(), &[]);
    let conf = dir.path().join("dnsmasq.conf");
    std::fs::write(&conf, lab::image_file(&image, "etc/appliance/dnsmasq.conf")).unwrap();

    let ours = Pair::new(PINNED_MAC, None);
    let theirs = Pair::new(PINNED_MAC, None);
    theirs.server.add_addr(SERVER_IF, "10.10.10.2/24");
    let _dnsmasq = dnsmasq(&theirs.server, dir.path(), &conf, &["--port=0"]);
    let serve = lab::serve_image(&ours.server, dir.path(), &image, true);

    // (udhcpc options, the boot file the rendered config implies)
    let cases: &[(&[&str], Option<&str>)] = &[
        (&[], None),
        (&["-x", "0x5d:0007"], Some("ipxe.efi")),
        (&["-x", "0x5d:0009", "-B"], Some("ipxe.efi")),
        (
            &["-x", "0x4d:69505845", "-x", "0x5d:0007"],
            Some("http://10.10.10.2/boot.ipxe"),
        ),
        (
            &["-V", "HTTPClient:Arch:00016", "-x", "0x5d:0010"],
            Some("http://10.10.10.2/ipxe.efi"),
        ),
        (&["-x", "0x5d:0000"], None), // BIOS: no undionly.kpxe bundled
    ];
    for (args, boot) in cases {
        let a = lab::udhcpc(&ours.client, dir.path(), CLIENT_IF, args)
            .unwrap_or_else(|| panic!("no lease from serve for {args:?}:\n{}", serve.output()));
        let b = lab::udhcpc(&theirs.client, dir.path(), CLIENT_IF, args)
            .unwrap_or_else(|| panic!("no lease from dnsmasq for {args:?}"));
        for k in COMPARED {
            assert_eq!(a.get(*k), b.get(*k), "{k} differs for {args:?}");
        }
        assert_eq!(a["ip"], NODE_IP);
        assert_eq!(a["router"], APPLIANCE_IP);
        assert_eq!(a["dns"], APPLIANCE_IP);
        assert_eq!(a["subnet"], "255.255.255.0");
        assert_eq!(a["serverid"], APPLIANCE_IP);
        assert_eq!(a["lease"], "43200");
        assert_eq!(a.get("boot_file").map(String::as_str), *boot, "{args:?}");
    }
    let log = serve.output();
    assert_eq!(events(&log, "dhcp-ack").len(), cases.len(), "{log}");
    assert!(
        events(&log, "dhcp-offer")
            .iter()
            .any(|l| l.contains(PINNED_MAC) && l.contains("boot=ipxe.efi")),
        "{log}"
    );
}

/// A client that asks while the rogue-DHCP guard's first probe is still open (a PXE
/// client powered on with the appliance) is answered when it closes, not dropped: OVMF
/// would send its next DISCOVER only 4 s later and then wait 8 s for offers.
#[test]
fn a_discover_in_the_guards_first_window_is_answered_when_it_closes() {
    let dir = tempfile::tempdir().unwrap();
    let image = lab::build_image(dir.path(), &[]);
    let pair = Pair::new(PINNED_MAC, None);
    // Waits for the ready line only: the guard's first window (4 s) is still open.
    let serve = lab::serve(
        &pair.server,
        dir.path(),
        "serve",
        &lab::image_args(&image),
        &[],
        false,
    );
    assert!(
        events(&serve.output(), "dhcp-guard-clear").is_empty(),
        "the window closed before the client started:\n{}",
        serve.output()
    );
    // One DISCOVER, then up to 8 s for an offer.
    let lease = lab::udhcpc(
        &pair.client,
        dir.path(),
        CLIENT_IF,
        &["-x", "0x5d:0007", "-t", "1", "-T", "8"],
    )
    .unwrap_or_else(|| panic!("no lease for the one DISCOVER:\n{}", serve.output()));
    assert_eq!(lease["ip"], NODE_IP);
    assert_eq!(lease.get("boot_file").map(String::as_str), Some("ipxe.efi"));
    let log = serve.output();
    let pos = |kind: &str| {
        log.find(&format!(" {kind} "))
            .unwrap_or_else(|| panic!("no {kind} in:\n{log}"))
    };
    // Held while the window was open, offered once it closed clean.
    assert!(pos("dhcp-held") < pos("dhcp-guard-clear"), "{log}");
    assert!(pos("dhcp-guard-clear") < pos("dhcp-offer"), "{log}");
    assert_eq!(events(&log, "dhcp-offer").len(), 1, "{log}");
    assert!(events(&log, "dhcp-not-serving").is_empty(), "{log}");
}

/// Install (in a child, before exec) a seccomp filter that kills the process on a
/// getrandom that could block: neither GRND_NONBLOCK (1) nor GRND_INSECURE (4) set.
fn kill_on_blocking_getrandom(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    /// struct seccomp_data: nr at 0, arch at 4, args[2] (low half) at 16 + 2 * 8.
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    const ARG2: u32 = 32;
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let filter = [
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, ARCH),
        jump(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            AUDIT_ARCH_X86_64,
            0,
            4,
        ),
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, NR),
        jump(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            libc::SYS_getrandom as u32,
            0,
            2,
        ),
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, ARG2),
        jump(
            libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K,
            0x1 | 0x4,
            0,
            1,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_KILL_PROCESS),
    ];
    // SAFETY: between fork and exec only prctl and seccomp run, on a filter the closure
    // owns (fork copied it into the child).
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    &prog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The appliance starts its services as PID 1 early in boot, often before the kernel's
/// CRNG is seeded: a getrandom that blocks there stalls DHCP for as long as the kernel
/// takes to seed it, and sets the kernel spinning to gather entropy. `serve` must never
/// ask for randomness that can block (here such a call kills it).
#[test]
fn serve_never_asks_for_randomness_that_can_block() {
    let dir = tempfile::tempdir().unwrap();
    let image = lab::build_image(dir.path(), &[]);
    let pair = Pair::new(PINNED_MAC, None);
    let mut cmd = pair.server.cmd(common::bin());
    cmd.args(["serve", "--interface", SERVER_IF, "--image"])
        .arg(&image)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--log-dir")
        .arg(dir.path().join("log"));
    kill_on_blocking_getrandom(&mut cmd);
    let mut serve = Proc::spawn("serve", cmd, &dir.path().join("serve.log"));
    serve.wait_for("dhcp-guard-clear", Duration::from_secs(20));
    let lease = lab::udhcpc(&pair.client, dir.path(), CLIENT_IF, &["-x", "0x5d:0007"])
        .unwrap_or_else(|| panic!("no lease:\n{}", serve.output()));
    assert_eq!(lease["ip"], NODE_IP);
    assert!(serve.running(), "{}", serve.output());
}

#[test]
fn other_macs_get_nothing_and_are_logged_once() {
    let dir = tempfile::tempdir().unwrap();
    let image = lab::build_image(dir.path(), &[]);
    let stranger = "52:54:00:12:34:56";
    let pair = Pair::new(stranger, None);
    let serve = lab::serve_image(&pair.server, dir.path(), &image, true);
    for _ in 0..2 {
        assert!(lab::udhcpc(&pair.client, dir.path(), CLIENT_IF, &["-x", "0x5d:0007"]).is_none());
    }
    let log = serve.output();
    let ignored = events(&log, "dhcp-ignored");
    assert_eq!(ignored.len(), 1, "{log}");
    assert!(ignored[0].contains(stranger), "{log}");
    assert!(events(&log, "dhcp-offer").is_empty(), "{log}");
}

#[test]
fn another_dhcp_server_on_the_link_makes_ours_stand_down() {
    let dir = tempfile::tempdir().unwrap();
    let image = lab::build_image(dir.path(), &[]);
    let switch = Switch::new();
    let server = Ns::new("s");
    let rogue = Ns::new("r");
    let client = Ns::new("c");
    switch.attach(&server, SERVER_IF);
    switch.attach(&rogue, "eth0");
    switch.attach(&client, CLIENT_IF);
    client.ip(&["link", "set", CLIENT_IF, "address", PINNED_MAC]);
    rogue.add_addr("eth0", "10.10.10.3/24");
    // A home router: answers everyone from its own range.
    let conf = dir.path().join("rogue.conf");
    std::fs::write(
        &conf,
        "interface=eth0\nbind-interfaces\ndhcp-range=10.10.10.150,10.10.10.200,1h\n",
    )
    .unwrap();
    let _rogue = dnsmasq(&rogue, dir.path(), &conf, &["--port=0"]);

    let mut cmd = server.cmd(common::bin());
    cmd.args(["serve", "--interface", SERVER_IF, "--image"])
        .arg(&image)
        .arg("--state-dir")
        .arg(dir.path().join("state"));
    let mut serve = Proc::spawn("serve", cmd, &dir.path().join("serve.log"));
    serve.wait_for("dhcp-rogue", Duration::from_secs(15));
    // The probe's answer came inside the first window: DHCP was never served here.
    assert!(
        events(&serve.output(), "dhcp-guard-clear").is_empty(),
        "{}",
        serve.output()
    );

    // dnsmasq pings an address for 3 s before offering it: give udhcpc time.
    let lease = lab::udhcpc(
        &client,
        dir.path(),
        CLIENT_IF,
        &["-x", "0x5d:0007", "-t", "3", "-T", "4"],
    )
    .unwrap_or_else(|| {
        panic!(
            "no lease from the other server:\n{}\n{}",
            std::fs::read_to_string(dir.path().join("dnsmasq.log")).unwrap_or_default(),
            serve.output()
        )
    });
    assert_eq!(lease["serverid"], "10.10.10.3");
    assert_ne!(lease["ip"], NODE_IP);
    let log = serve.output();
    assert!(log.contains("WARNING dhcp-rogue"), "{log}");
    assert!(log.contains("server=10.10.10.3"), "{log}");
    assert!(events(&log, "dhcp-offer").is_empty(), "{log}");
    assert!(events(&log, "dhcp-guard-clear").is_empty(), "{log}");
    assert_eq!(events(&log, "dhcp-not-serving").len(), 1, "{log}");
}

// A test-side DHCP client, laid out from RFC 2131 figure 1.

const XID: u32 = 0x1234_5678;

fn mac_bytes() -> [u8; 6] {
    [0x00, 0x11, 0x22, 0x33, 0x44, 0x55]
}

fn dhcp_packet(kind: u8, ciaddr: Ipv4Addr, broadcast: bool, options: &[(u8, &[u8])]) -> Vec<u8> {
    let mut b = vec![0u8; 236];
    b[0] = 1;
    b[1] = 1;
    b[2] = 6;
    b[4..8].copy_from_slice(&XID.to_be_bytes());
    if broadcast {
        b[10] = 0x80;
    }
    b[12..16].copy_from_slice(&ciaddr.octets());
    b[28..34].copy_from_slice(&mac_bytes());
    b.extend_from_slice(&[99, 130, 83, 99, 53, 1, kind]);
    for (code, value) in options {
        b.push(*code);
        b.push(value.len() as u8);
        b.extend_from_slice(value);
    }
    b.push(255);
    b
}

/// (message type, yiaddr, ciaddr, options) of a reply, parsed by hand.
struct Answer {
    kind: u8,
    yiaddr: Ipv4Addr,
    ciaddr: Ipv4Addr,
    options: Vec<(u8, Vec<u8>)>,
}

impl Answer {
    fn opt(&self, code: u8) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_slice())
    }
}

fn parse_answer(b: &[u8]) -> Option<Answer> {
    if b.len() < 240
        || b[0] != 2
        || b[4..8] != XID.to_be_bytes()
        || b[236..240] != [99, 130, 83, 99]
    {
        return None;
    }
    let mut options = Vec::new();
    let mut i = 240;
    while i + 1 < b.len() && b[i] != 255 {
        if b[i] == 0 {
            i += 1;
            continue;
        }
        let len = b[i + 1] as usize;
        options.push((b[i], b.get(i + 2..i + 2 + len)?.to_vec()));
        i += 2 + len;
    }
    let kind = options.iter().find(|(c, _)| *c == 53)?.1.first().copied()?;
    let ip = |at: usize| Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3]);
    Some(Answer {
        kind,
        yiaddr: ip(16),
        ciaddr: ip(12),
        options,
    })
}

fn client_socket() -> UdpSocket {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    s.set_reuse_address(true).unwrap();
    s.set_broadcast(true).unwrap();
    s.bind_device(Some(CLIENT_IF.as_bytes())).unwrap();
    let addr: SocketAddr = (Ipv4Addr::UNSPECIFIED, 68).into();
    s.bind(&addr.into()).unwrap();
    let s: UdpSocket = s.into();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s
}

/// Send `packet` to `to` and collect what answers within `wait`.
fn exchange(s: &UdpSocket, packet: &[u8], to: Ipv4Addr, wait: Duration) -> Option<Answer> {
    s.send_to(packet, (to, 67)).unwrap();
    let end = Instant::now() + wait;
    let mut buf = [0u8; 1500];
    while Instant::now() < end {
        if let Ok(n) = s.recv(&mut buf) {
            if let Some(a) = parse_answer(&buf[..n]) {
                return Some(a);
            }
        }
    }
    None
}

#[test]
fn request_states_inform_release_and_decline() {
    let dir = tempfile::tempdir().unwrap();
    let image = lab::build_image(dir.path(), &[]);
    let pair = Pair::new(PINNED_MAC, Some("10.10.10.100/24"));
    let serve = lab::serve_image(&pair.server, dir.path(), &image, true);
    let us = Ipv4Addr::new(10, 10, 10, 2);
    let node = Ipv4Addr::new(10, 10, 10, 100);
    let bcast = Ipv4Addr::BROADCAST;
    let zero = Ipv4Addr::UNSPECIFIED;
    let second = Duration::from_secs(1);
    pair.client.enter(move || {
        let s = client_socket();
        // DISCOVER with and without the broadcast flag (the second answer is unicast to
        // the offered address through the ARP entry the server adds).
        for broadcast in [true, false] {
            let a =
                exchange(&s, &dhcp_packet(1, zero, broadcast, &[]), bcast, second).expect("OFFER");
            assert_eq!((a.kind, a.yiaddr), (2, node));
            assert_eq!(a.opt(54), Some(&us.octets()[..]));
        }
        // SELECTING.
        let a = exchange(
            &s,
            &dhcp_packet(3, zero, true, &[(54, &us.octets()), (50, &node.octets())]),
            bcast,
            second,
        )
        .expect("ACK");
        assert_eq!((a.kind, a.yiaddr), (5, node));
        assert_eq!(a.opt(51), Some(&43200u32.to_be_bytes()[..]));
        // SELECTING someone else's offer: silence.
        assert!(exchange(
            &s,
            &dhcp_packet(
                3,
                zero,
                true,
                &[(54, &[10, 10, 10, 9]), (50, &node.octets())]
            ),
            bcast,
            Duration::from_millis(500),
        )
        .is_none());
        // INIT-REBOOT with a stale address: NAK.
        let a = exchange(
            &s,
            &dhcp_packet(3, zero, true, &[(50, &[10, 10, 10, 77])]),
            bcast,
            second,
        )
        .expect("NAK");
        assert_eq!(a.kind, 6);
        // RENEWING: unicast to the server, answered to ciaddr.
        let a = exchange(&s, &dhcp_packet(3, node, false, &[]), us, second).expect("renew ACK");
        assert_eq!((a.kind, a.yiaddr), (5, node));
        // REBINDING with the wrong address: NAK.
        let a = exchange(
            &s,
            &dhcp_packet(3, Ipv4Addr::new(10, 10, 10, 77), true, &[]),
            bcast,
            second,
        )
        .expect("rebind NAK");
        assert_eq!(a.kind, 6);
        // INFORM: configuration without an address or lease.
        let a = exchange(&s, &dhcp_packet(8, node, false, &[]), us, second).expect("INFORM ACK");
        assert_eq!((a.kind, a.yiaddr, a.ciaddr), (5, zero, node));
        assert_eq!(a.opt(51), None);
        assert_eq!(a.opt(3), Some(&us.octets()[..]));
        // RELEASE and DECLINE get no answer; after a DECLINE the address is not offered.
        assert!(exchange(
            &s,
            &dhcp_packet(7, node, false, &[(54, &us.octets())]),
            us,
            Duration::from_millis(300)
        )
        .is_none());
        // A DECLINE of what we did not offer (no or another server identifier, another
        // address) is ignored, as dnsmasq does: the node is still offered its address.
        for decline in [
            dhcp_packet(4, zero, true, &[(50, &node.octets())]),
            dhcp_packet(
                4,
                zero,
                true,
                &[(54, &[10, 10, 10, 9]), (50, &node.octets())],
            ),
            dhcp_packet(
                4,
                zero,
                true,
                &[(54, &us.octets()), (50, &[10, 10, 10, 77])],
            ),
        ] {
            assert!(exchange(&s, &decline, bcast, Duration::from_millis(300)).is_none());
        }
        let a = exchange(&s, &dhcp_packet(1, zero, true, &[]), bcast, second)
            .expect("OFFER after foreign DECLINEs");
        assert_eq!((a.kind, a.yiaddr), (2, node));
        assert!(exchange(
            &s,
            &dhcp_packet(4, zero, true, &[(54, &us.octets()), (50, &node.octets())]),
            bcast,
            Duration::from_millis(300)
        )
        .is_none());
        assert!(exchange(&s, &dhcp_packet(1, zero, true, &[]), bcast, second).is_none());
    });
    let log = serve.output();
    assert_eq!(events(&log, "dhcp-release").len(), 1, "{log}");
    assert!(log.contains("WARNING dhcp-decline"), "{log}");
    assert!(log.contains("dhcp-declined-backoff"), "{log}");
    assert_eq!(events(&log, "dhcp-nak").len(), 2, "{log}");
    assert_eq!(events(&log, "dhcp-inform").len(), 1, "{log}");
}

#[test]
fn router_advertisement_says_there_is_no_router() {
    let dir = tempfile::tempdir().unwrap();
    let image = lab::build_image(dir.path(), &[]);
    let pair = Pair::new(PINNED_MAC, None);
    let server_mac = pair.server.ip(&["-br", "link", "show", SERVER_IF]);
    let server_mac = server_mac.split_whitespace().nth(2).unwrap().to_string();
    let _serve = lab::serve_image(&pair.server, dir.path(), &image, false);
    let ra = pair.client.enter(|| {
        let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).unwrap();
        s.bind_device(Some(CLIENT_IF.as_bytes())).unwrap();
        s.set_multicast_hops_v6(255).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(250)))
            .unwrap();
        let index: u32 = std::fs::read_to_string(format!("/sys/class/net/{CLIENT_IF}/ifindex"))
            .map(|s| s.trim().parse().unwrap())
            .unwrap_or(0);
        let all_routers =
            SocketAddrV6::new(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2), 0, 0, index);
        // A router solicitation (RFC 4861 4.1): type 133, code 0, checksum by the kernel.
        let rs = [133u8, 0, 0, 0, 0, 0, 0, 0];
        let end = Instant::now() + Duration::from_secs(10);
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
        while Instant::now() < end {
            // Fails until the link-local address has passed DAD; keep trying.
            let _ = s.send_to(&rs, &SocketAddr::V6(all_routers).into());
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                // SAFETY: recv_from initialised n bytes.
                let b: Vec<u8> = buf[..n]
                    .iter()
                    .map(|x| unsafe { x.assume_init() })
                    .collect();
                if b.first() == Some(&134) {
                    return b;
                }
            }
        }
        panic!("no router advertisement within 10 s");
    });
    assert_eq!(&ra[6..8], &[0, 0], "router lifetime must be 0");
    assert_eq!(ra[5] & 0xc0, 0, "no managed/other flags");
    let mut i = 16;
    let mut slla = None;
    while i + 1 < ra.len() {
        let (kind, len) = (ra[i], ra[i + 1] as usize * 8);
        assert_ne!(kind, 3, "a prefix option was sent");
        if kind == 1 {
            slla = Some(
                ra[i + 2..i + 8]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
            );
        }
        assert!(len > 0);
        i += len;
    }
    assert_eq!(slla.as_deref(), Some(server_mac.as_str()));
}
