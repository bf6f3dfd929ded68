//! Any bytes on port 67: parsing never panics, the policy answers or ignores, and every
//! reply we would send parses back as the same message.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use mkappliance::appliance::dhcp::packet::Packet;
use mkappliance::appliance::dhcp::policy::{Outcome, Policy};
use mkappliance::config::BootFiles;

fuzz_target!(|data: &[u8]| {
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
    let _ = (req.client_arch(), req.max_reply_size(), req.has_user_class(b"iPXE"));
    if let Outcome::Reply { reply, .. } = policy.handle(&req) {
        let wire = reply.encode();
        let back = Packet::parse(&wire).expect("our reply must parse");
        assert_eq!(back.xid, reply.xid);
        assert_eq!(back.message_type(), reply.message_type());
        assert_eq!(back.yiaddr, reply.yiaddr);
    }
});
