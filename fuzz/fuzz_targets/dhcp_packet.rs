//! Any bytes on port 67: parsing never panics, the policy answers or ignores, and every
//! reply we would send parses back as the same message.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use mkappliance::appliance::dhcp::packet::Packet;
use mkappliance::appliance::dhcp::policy::{Outcome, Policy};
use mkappliance::config::BootFiles;

fuzz_target!(|data: &[u8]| {
    check(data);
    // The same bytes as the options of a well-formed request (a BOOTREQUEST header from
    // an Ethernet MAC and the magic cookie), so that most of the time goes into the
    // option parser and the policy rather than into finding the cookie.
    let mut framed = vec![0u8; 240];
    framed[..4].copy_from_slice(&[1, 1, 6, 0]);
    framed[28..34].copy_from_slice(&[0, 0x11, 0x22, 0x33, 0x44, 0x55]);
    framed[236..].copy_from_slice(&[99, 130, 83, 99]);
    framed.extend_from_slice(data);
    check(&framed);
});

fn check(data: &[u8]) {
    let Ok(req) = Packet::parse(data) else { return };
    let policy = Policy {
        server_ip: Ipv4Addr::new(10, 10, 10, 2),
        netmask: Ipv4Addr::new(255, 255, 255, 0),
        broadcast: Ipv4Addr::new(10, 10, 10, 255),
        // The MAC of the input itself, so the fuzzer reaches the answering paths.
        mac: req.mac().unwrap_or([0, 0x11, 0x22, 0x33, 0x44, 0x55]),
        client_ip: Ipv4Addr::new(10, 10, 10, 100),
        lease_secs: 43200,
        boot: BootFiles {
            ipxe_efi: "ipxe.efi".into(),
            ipxe_bios: Some("undionly.kpxe".into()),
            ipxe_arm64: Some("ipxe-arm64.efi".into()),
        },
    };
    let _ = (
        req.client_arch(),
        req.max_reply_size(),
        req.has_user_class(b"iPXE"),
    );
    // A random relay address is off the link and ignored: try the input also as a client
    // on the link, so the fuzzer reaches the answering paths.
    let mut direct = req.clone();
    direct.giaddr = Ipv4Addr::UNSPECIFIED;
    for req in [&req, &direct] {
        if let Outcome::Reply { reply, .. } = policy.handle(req) {
            let wire = reply.encode();
            let back = Packet::parse(&wire).expect("our reply must parse");
            assert_eq!(back.xid, reply.xid);
            assert_eq!(back.message_type(), reply.message_type());
            assert_eq!(back.yiaddr, reply.yiaddr);
        }
    }
}
