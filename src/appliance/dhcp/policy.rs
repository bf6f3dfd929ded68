//! What to answer: the semantics of the rendered `dnsmasq.conf`, as a pure function of
//! the request (no sockets, no clock), so every rule has a unit test.
//!
//! - only the pinned MAC is known (`dhcp-host` + `dhcp-ignore=tag:!known`);
//! - it gets the pinned address, mask, broadcast, router and DNS (the appliance),
//!   hostname `minipc`, lease, T1 = lease/2, T2 = 7/8 lease, next-server = us;
//! - iPXE (user class `iPXE` or option 175) gets `http://<us>/boot.ipxe` and
//!   175.176 = 1; HTTP-boot clients (vendor class `HTTPClient`) get the iPXE URL and
//!   option 60 `HTTPClient`; PXE firmware gets the iPXE build for its arch (93);
//! - authoritative: a REQUEST for another address is NAKed.

use std::net::Ipv4Addr;

use super::packet::{self, opt, Packet};
use crate::config::{ApplianceConfig, BootFiles};

/// PXE vendor options (option 43): PXE_DISCOVERY_CONTROL (6) = 8, "use the boot file in
/// this offer, do no boot server discovery", then the end marker.
const PXE_NO_DISCOVERY: [u8; 4] = [6, 1, 8, 255];

/// The host name `dhcp-host` gives the node.
pub const HOSTNAME: &str = "minipc";
/// iPXE's encapsulated options: 176 ("no-pxedhcp") = 1, then the END of the sub-options,
/// byte for byte what dnsmasq sends for `encap:175,176,1b`.
const IPXE_NO_PXEDHCP: [u8; 4] = [176, 1, 1, 255];
/// Option 93 values (RFC 4578 and the IANA registry).
pub const ARCH_BIOS: u16 = 0;
pub const ARCH_X64_UEFI: u16 = 7;
pub const ARCH_X64_UEFI_ALT: u16 = 9;
pub const ARCH_ARM64_UEFI: u16 = 11;

#[derive(Debug, Clone)]
pub struct Policy {
    pub server_ip: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub broadcast: Ipv4Addr,
    pub mac: [u8; 6],
    pub client_ip: Ipv4Addr,
    pub lease_secs: u32,
    pub boot: BootFiles,
}

/// Why a request got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// Not the pinned MAC (or not Ethernet): `dhcp-ignore=tag:!known`.
    Unknown,
    /// A BOOTREPLY, or no/unknown message type.
    NotARequest,
    /// A REQUEST selecting another server's offer.
    OtherServer,
    /// A DECLINE of an address we did not hand out, or a request relayed from another
    /// subnet (we have addresses on this link only).
    NotOurs,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ignore(Ignored),
    /// OFFER, ACK or NAK; `boot` is the boot file or URL handed out, if any.
    Reply {
        reply: Packet,
        boot: Option<String>,
    },
    /// The node says the address is in use by someone else.
    Decline {
        ip: Option<Ipv4Addr>,
    },
    Release,
}

/// What a client boots next, by who it says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Boot {
    file: String,
    /// A TFTP file name (else an HTTP URL): option 66 names us.
    tftp: bool,
}

impl Policy {
    pub fn from_config(cfg: &ApplianceConfig) -> Policy {
        let n = &cfg.network;
        Policy {
            server_ip: n.appliance.addr,
            netmask: n.appliance.netmask(),
            broadcast: n.appliance.broadcast(),
            mac: cfg.minipc_mac.0,
            client_ip: n.minipc_ip,
            lease_secs: n.lease_secs,
            boot: cfg.boot_files.clone(),
        }
    }

    fn http_base(&self) -> String {
        format!("http://{}", self.server_ip)
    }

    fn boot_for(&self, req: &Packet) -> Option<Boot> {
        if is_ipxe(req) {
            return Some(Boot {
                file: format!("{}/boot.ipxe", self.http_base()),
                tftp: false,
            });
        }
        if is_http_client(req) {
            return Some(Boot {
                file: format!("{}/{}", self.http_base(), self.boot.ipxe_efi),
                tftp: false,
            });
        }
        let file = match req.client_arch()? {
            ARCH_BIOS => self.boot.ipxe_bios.clone()?,
            ARCH_X64_UEFI | ARCH_X64_UEFI_ALT => self.boot.ipxe_efi.clone(),
            ARCH_ARM64_UEFI => self.boot.ipxe_arm64.clone()?,
            _ => return None,
        };
        Some(Boot { file, tftp: true })
    }

    pub fn handle(&self, req: &Packet) -> Outcome {
        if req.op != packet::BOOTREQUEST {
            return Outcome::Ignore(Ignored::NotARequest);
        }
        if req.mac() != Some(self.mac) {
            return Outcome::Ignore(Ignored::Unknown);
        }
        // A relay asks for an address on its own subnet (RFC 2131 4.3.1); ours is not
        // there (dnsmasq: "no address range available for DHCP request via …").
        if !req.giaddr.is_unspecified() && !self.on_link(req.giaddr) {
            return Outcome::Ignore(Ignored::NotOurs);
        }
        match req.message_type() {
            Some(packet::DISCOVER) => self.offer_or_ack(req, packet::OFFER),
            Some(packet::REQUEST) => self.request(req),
            Some(packet::INFORM) => self.offer_or_ack(req, packet::ACK),
            // Only a DECLINE of our offer of the node's address counts (RFC 2131 4.3.3;
            // dnsmasq checks both): any other would keep the node off the link for the
            // whole backoff for nothing.
            Some(packet::DECLINE)
                if req.server_id() == Some(self.server_ip)
                    && req.requested_ip() == Some(self.client_ip) =>
            {
                Outcome::Decline {
                    ip: Some(self.client_ip),
                }
            }
            Some(packet::DECLINE) => Outcome::Ignore(Ignored::NotOurs),
            Some(packet::RELEASE) => Outcome::Release,
            _ => Outcome::Ignore(Ignored::NotARequest),
        }
    }

    /// REQUEST in its four states (RFC 2131 4.3.2).
    fn request(&self, req: &Packet) -> Outcome {
        let wanted = match (req.server_id(), req.requested_ip()) {
            // SELECTING: answering an offer, ours or another server's.
            (Some(sid), requested) => {
                if sid != self.server_ip {
                    return Outcome::Ignore(Ignored::OtherServer);
                }
                requested.unwrap_or(req.ciaddr)
            }
            // INIT-REBOOT: checking a remembered address.
            (None, Some(requested)) => requested,
            // RENEWING (unicast) or REBINDING (broadcast): ciaddr holds the address.
            (None, None) => req.ciaddr,
        };
        if wanted == self.client_ip {
            self.offer_or_ack(req, packet::ACK)
        } else {
            self.nak(req)
        }
    }

    /// Whether `ip` is on the PXE link's subnet.
    fn on_link(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::from(self.netmask);
        u32::from(ip) & mask == u32::from(self.server_ip) & mask
    }

    fn nak(&self, req: &Packet) -> Outcome {
        let mut r = Packet::reply_to(req);
        // Through a relay, the broadcast bit makes it broadcast the NAK to a client whose
        // address is wrong (RFC 2131 4.3.2: the server MUST set it).
        if !req.giaddr.is_unspecified() {
            r.flags |= packet::FLAG_BROADCAST;
        }
        r.set(opt::MESSAGE_TYPE, [packet::NAK]);
        r.set(opt::SERVER_ID, self.server_ip.octets());
        r.set(opt::MESSAGE, b"wrong address".to_vec());
        Outcome::Reply {
            reply: r,
            boot: None,
        }
    }

    /// OFFER/ACK with the full configuration; for INFORM (an ACK without an address or
    /// lease, RFC 2131 3.4) `yiaddr` stays empty.
    fn offer_or_ack(&self, req: &Packet, kind: u8) -> Outcome {
        let inform = req.message_type() == Some(packet::INFORM);
        let mut r = Packet::reply_to(req);
        r.siaddr = self.server_ip;
        if inform {
            r.ciaddr = req.ciaddr;
        } else {
            r.yiaddr = self.client_ip;
        }
        r.set(opt::MESSAGE_TYPE, [kind]);
        r.set(opt::SERVER_ID, self.server_ip.octets());
        if !inform {
            let l = self.lease_secs;
            r.set(opt::LEASE_TIME, l.to_be_bytes());
            r.set(opt::RENEWAL, (l / 2).to_be_bytes());
            r.set(
                opt::REBINDING,
                ((u64::from(l) * 7 / 8) as u32).to_be_bytes(),
            );
        }
        r.set(opt::SUBNET_MASK, self.netmask.octets());
        r.set(opt::BROADCAST, self.broadcast.octets());
        r.set(opt::HOSTNAME, HOSTNAME.as_bytes().to_vec());
        r.set(opt::DNS, self.server_ip.octets());
        r.set(opt::ROUTER, self.server_ip.octets());
        if let Some(id) = req.get(opt::CLIENT_ID) {
            r.set(opt::CLIENT_ID, id.to_vec()); // RFC 6842
        }
        let boot = self.boot_for(req);
        if let Some(b) = &boot {
            r.file = b.file.as_bytes().to_vec();
            if b.tftp {
                r.set(opt::TFTP_SERVER, self.server_ip.to_string().into_bytes());
            }
            r.set(opt::BOOTFILE, b.file.as_bytes().to_vec());
        }
        if is_http_client(req) {
            r.set(opt::VENDOR_CLASS, b"HTTPClient".to_vec());
        } else if req
            .vendor_class()
            .is_some_and(|v| v.starts_with(b"PXEClient"))
        {
            // Some PXE ROMs ignore replies without `PXEClient`; but with it and no option
            // 43 the offer asks for boot server discovery on port 4011, which we do not
            // serve (OVMF then fails with PXE-E16). So echo it together with discovery
            // control "no discovery: boot the file named in this offer".
            r.set(opt::VENDOR_CLASS, b"PXEClient".to_vec());
            r.set(opt::VENDOR_OPTS, PXE_NO_DISCOVERY.to_vec());
        }
        if is_ipxe(req) {
            r.set(opt::IPXE_ENCAP, IPXE_NO_PXEDHCP.to_vec());
        }
        let requested = req.get(opt::PARAMS).unwrap_or_default();
        r.order_options_like(requested);
        // Too big even so, it goes out as it is: the client may still take it.
        r.fit(req.max_reply_size(), requested);
        Outcome::Reply {
            reply: r,
            boot: boot.map(|b| b.file),
        }
    }
}

/// `dhcp-userclass=set:ipxe,iPXE` and `dhcp-match=set:ipxe,175`.
pub fn is_ipxe(req: &Packet) -> bool {
    req.has_user_class(b"iPXE") || req.get(opt::IPXE_ENCAP).is_some()
}

/// `dhcp-vendorclass=set:httpclient,HTTPClient` (a prefix match, as dnsmasq does).
pub fn is_http_client(req: &Packet) -> bool {
    req.vendor_class()
        .is_some_and(|v| v.starts_with(b"HTTPClient"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PINNED: [u8; 6] = [0, 0x11, 0x22, 0x33, 0x44, 0x55];
    const US: Ipv4Addr = Ipv4Addr::new(10, 10, 10, 2);
    const NODE: Ipv4Addr = Ipv4Addr::new(10, 10, 10, 100);

    fn policy() -> Policy {
        Policy {
            server_ip: US,
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            broadcast: Ipv4Addr::new(10, 10, 10, 255),
            mac: PINNED,
            client_ip: NODE,
            lease_secs: 43200,
            boot: BootFiles {
                ipxe_efi: "ipxe.efi".into(),
                ipxe_bios: None,
                ipxe_arm64: Some("ipxe-arm64.efi".into()),
            },
        }
    }

    fn request(kind: u8, mac: [u8; 6], options: &[(u8, &[u8])]) -> Packet {
        let mut chaddr = [0u8; 16];
        chaddr[..6].copy_from_slice(&mac);
        let mut p = Packet {
            op: packet::BOOTREQUEST,
            htype: 1,
            hlen: 6,
            hops: 0,
            xid: 42,
            secs: 0,
            flags: 0,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr,
            sname: Vec::new(),
            file: Vec::new(),
            options: vec![(opt::MESSAGE_TYPE, vec![kind])],
        };
        for (c, v) in options {
            p.set(*c, v.to_vec());
        }
        p
    }

    fn reply(o: Outcome) -> (Packet, Option<String>) {
        match o {
            Outcome::Reply { reply, boot } => (reply, boot),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn offers_the_pinned_address_and_config() {
        let (r, boot) = reply(policy().handle(&request(packet::DISCOVER, PINNED, &[])));
        assert_eq!(r.message_type(), Some(packet::OFFER));
        assert_eq!(r.yiaddr, NODE);
        assert_eq!(r.siaddr, US);
        assert_eq!(r.xid, 42);
        assert_eq!(r.get(opt::SERVER_ID), Some(&[10, 10, 10, 2][..]));
        assert_eq!(r.get(opt::SUBNET_MASK), Some(&[255, 255, 255, 0][..]));
        assert_eq!(r.get(opt::ROUTER), Some(&[10, 10, 10, 2][..]));
        assert_eq!(r.get(opt::DNS), Some(&[10, 10, 10, 2][..]));
        // 43200 s, T1 21600 s (0x5460), T2 37800 s (0x93a8): as dnsmasq sends.
        assert_eq!(r.get(opt::LEASE_TIME), Some(&[0, 0, 0xa8, 0xc0][..]));
        assert_eq!(r.get(opt::RENEWAL), Some(&[0, 0, 0x54, 0x60][..]));
        assert_eq!(r.get(opt::REBINDING), Some(&[0, 0, 0x93, 0xa8][..]));
        assert_eq!(r.get(opt::HOSTNAME), Some(&b"minipc"[..]));
        assert_eq!(boot, None, "no arch, no iPXE: no boot file");
        assert!(r.file.is_empty());
    }

    #[test]
    fn ignores_other_macs_and_replies() {
        let other = [0x52, 0x54, 0, 1, 2, 3];
        assert_eq!(
            policy().handle(&request(packet::DISCOVER, other, &[])),
            Outcome::Ignore(Ignored::Unknown)
        );
        let mut r = request(packet::DISCOVER, PINNED, &[]);
        r.op = packet::BOOTREPLY;
        assert_eq!(policy().handle(&r), Outcome::Ignore(Ignored::NotARequest));
        r.op = packet::BOOTREQUEST;
        r.hlen = 8;
        assert_eq!(policy().handle(&r), Outcome::Ignore(Ignored::Unknown));
        let mut none = request(packet::DISCOVER, PINNED, &[]);
        none.options.clear();
        assert_eq!(
            policy().handle(&none),
            Outcome::Ignore(Ignored::NotARequest)
        );
    }

    #[test]
    fn boot_file_by_client() {
        let p = policy();
        let boot = |opts: &[(u8, &[u8])]| reply(p.handle(&request(packet::DISCOVER, PINNED, opts)));
        let (r, b) = boot(&[(opt::CLIENT_ARCH, &[0, 7])]);
        assert_eq!(b.as_deref(), Some("ipxe.efi"));
        assert_eq!(r.file, b"ipxe.efi");
        assert_eq!(r.get(opt::TFTP_SERVER), Some(&b"10.10.10.2"[..]));
        assert_eq!(r.get(opt::BOOTFILE), Some(&b"ipxe.efi"[..]));
        assert_eq!(
            boot(&[(opt::CLIENT_ARCH, &[0, 9])]).1.as_deref(),
            Some("ipxe.efi")
        );
        assert_eq!(
            boot(&[(opt::CLIENT_ARCH, &[0, 11])]).1.as_deref(),
            Some("ipxe-arm64.efi")
        );
        // BIOS without undionly.kpxe, and IA32 UEFI: an address but nothing to boot.
        assert_eq!(boot(&[(opt::CLIENT_ARCH, &[0, 0])]).1, None);
        assert_eq!(boot(&[(opt::CLIENT_ARCH, &[0, 6])]).1, None);

        // iPXE by user class or by option 175, whatever arch it reports: no loop.
        for opts in [
            &[
                (opt::USER_CLASS, &b"iPXE"[..]),
                (opt::CLIENT_ARCH, &[0, 7][..]),
            ][..],
            &[(opt::IPXE_ENCAP, &[177, 1, 1][..])][..],
        ] {
            let (r, b) = boot(opts);
            assert_eq!(b.as_deref(), Some("http://10.10.10.2/boot.ipxe"));
            assert_eq!(r.get(opt::IPXE_ENCAP), Some(&[176, 1, 1, 255][..]));
            assert_eq!(r.get(opt::TFTP_SERVER), None);
        }

        // UEFI HTTP boot: a URL and option 60 echoed.
        let (r, b) = boot(&[
            (opt::VENDOR_CLASS, &b"HTTPClient:Arch:00016:UNDI:003001"[..]),
            (opt::CLIENT_ARCH, &[0, 16]),
        ]);
        assert_eq!(b.as_deref(), Some("http://10.10.10.2/ipxe.efi"));
        assert_eq!(r.get(opt::VENDOR_CLASS), Some(&b"HTTPClient"[..]));

        // PXE firmware: PXEClient echoed, with PXE discovery control 8 (option 43,
        // sub-option 6: boot the offered file, no boot server discovery).
        let (r, b) = boot(&[
            (opt::VENDOR_CLASS, &b"PXEClient:Arch:00007:UNDI:003016"[..]),
            (opt::CLIENT_ARCH, &[0, 7]),
        ]);
        assert_eq!(b.as_deref(), Some("ipxe.efi"));
        assert_eq!(r.get(opt::VENDOR_CLASS), Some(&b"PXEClient"[..]));
        assert_eq!(r.get(opt::VENDOR_OPTS), Some(&[6u8, 1, 8, 255][..]));
    }

    #[test]
    fn bios_file_when_bundled() {
        let mut p = policy();
        p.boot.ipxe_bios = Some("undionly.kpxe".into());
        let (_, b) = reply(p.handle(&request(
            packet::DISCOVER,
            PINNED,
            &[(opt::CLIENT_ARCH, &[0, 0])],
        )));
        assert_eq!(b.as_deref(), Some("undionly.kpxe"));
    }

    #[test]
    fn request_states() {
        let p = policy();
        let us = US.octets();
        let node = NODE.octets();
        let other_ip = [10, 10, 10, 77];
        // SELECTING our offer.
        let (r, _) = reply(p.handle(&request(
            packet::REQUEST,
            PINNED,
            &[(opt::SERVER_ID, &us), (opt::REQUESTED_IP, &node)],
        )));
        assert_eq!(r.message_type(), Some(packet::ACK));
        assert_eq!(r.yiaddr, NODE);
        // SELECTING another server's offer: silence.
        assert_eq!(
            p.handle(&request(
                packet::REQUEST,
                PINNED,
                &[
                    (opt::SERVER_ID, &[10, 10, 10, 9]),
                    (opt::REQUESTED_IP, &node)
                ],
            )),
            Outcome::Ignore(Ignored::OtherServer)
        );
        // INIT-REBOOT with the right and a wrong address.
        let (r, _) = reply(p.handle(&request(
            packet::REQUEST,
            PINNED,
            &[(opt::REQUESTED_IP, &node)],
        )));
        assert_eq!(r.message_type(), Some(packet::ACK));
        let (r, _) = reply(p.handle(&request(
            packet::REQUEST,
            PINNED,
            &[(opt::REQUESTED_IP, &other_ip)],
        )));
        assert_eq!(r.message_type(), Some(packet::NAK));
        assert_eq!(r.yiaddr, Ipv4Addr::UNSPECIFIED);
        // RENEWING/REBINDING: ciaddr.
        let mut renew = request(packet::REQUEST, PINNED, &[]);
        renew.ciaddr = NODE;
        let (r, _) = reply(p.handle(&renew));
        assert_eq!(r.message_type(), Some(packet::ACK));
        renew.ciaddr = Ipv4Addr::from(other_ip);
        let (r, _) = reply(p.handle(&renew));
        assert_eq!(r.message_type(), Some(packet::NAK));
    }

    #[test]
    fn inform_decline_release() {
        let p = policy();
        let mut inform = request(packet::INFORM, PINNED, &[]);
        inform.ciaddr = NODE;
        let (r, _) = reply(p.handle(&inform));
        assert_eq!(r.message_type(), Some(packet::ACK));
        assert_eq!(r.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(r.ciaddr, NODE);
        assert_eq!(r.get(opt::LEASE_TIME), None);
        assert_eq!(r.get(opt::ROUTER), Some(&[10, 10, 10, 2][..]));
        let decline = |opts: &[(u8, &[u8])]| p.handle(&request(packet::DECLINE, PINNED, opts));
        assert_eq!(
            decline(&[
                (opt::SERVER_ID, &US.octets()),
                (opt::REQUESTED_IP, &NODE.octets())
            ]),
            Outcome::Decline { ip: Some(NODE) }
        );
        // Declines of what we did not offer change nothing (as in dnsmasq): no server
        // identifier, another server's, or another address.
        for opts in [
            &[(opt::REQUESTED_IP, &NODE.octets()[..])][..],
            &[
                (opt::SERVER_ID, &[10, 10, 10, 9][..]),
                (opt::REQUESTED_IP, &NODE.octets()[..]),
            ],
            &[
                (opt::SERVER_ID, &US.octets()[..]),
                (opt::REQUESTED_IP, &[10, 10, 10, 77][..]),
            ],
            &[(opt::SERVER_ID, &US.octets()[..])],
        ] {
            assert_eq!(decline(opts), Outcome::Ignore(Ignored::NotOurs), "{opts:?}");
        }
        assert_eq!(
            p.handle(&request(packet::RELEASE, PINNED, &[])),
            Outcome::Release
        );
    }

    #[test]
    fn relayed_requests() {
        let p = policy();
        let relayed = |kind, giaddr: [u8; 4], opts: &[(u8, &[u8])]| {
            let mut r = request(kind, PINNED, opts);
            r.giaddr = Ipv4Addr::from(giaddr);
            p.handle(&r)
        };
        // A relay on this subnet: answered, to the relay (the reply keeps giaddr).
        let (r, _) = reply(relayed(packet::DISCOVER, [10, 10, 10, 1], &[]));
        assert_eq!((r.yiaddr, r.giaddr), (NODE, Ipv4Addr::new(10, 10, 10, 1)));
        // A NAK through a relay has the broadcast bit set (RFC 2131 4.3.2).
        let (r, _) = reply(relayed(
            packet::REQUEST,
            [10, 10, 10, 1],
            &[(opt::REQUESTED_IP, &[10, 10, 10, 77])],
        ));
        assert_eq!(r.message_type(), Some(packet::NAK));
        assert_eq!(r.flags & packet::FLAG_BROADCAST, packet::FLAG_BROADCAST);
        // Without a relay, the NAK keeps the client's flags (it goes out broadcast anyway).
        let (r, _) = reply(p.handle(&request(
            packet::REQUEST,
            PINNED,
            &[(opt::REQUESTED_IP, &[10, 10, 10, 77])],
        )));
        assert_eq!(r.flags, 0);
        // A relay on another subnet: our address is not for there.
        for kind in [packet::DISCOVER, packet::REQUEST, packet::INFORM] {
            assert_eq!(
                relayed(
                    kind,
                    [192, 168, 5, 1],
                    &[(opt::REQUESTED_IP, &NODE.octets())]
                ),
                Outcome::Ignore(Ignored::NotOurs)
            );
        }
    }

    /// The option codes of an encoded reply, in wire order, read straight off the bytes
    /// (after the 236-byte header and the 4-byte magic cookie).
    fn wire_codes(wire: &[u8]) -> Vec<u8> {
        let mut codes = Vec::new();
        let mut i = 240;
        while i < wire.len() && wire[i] != opt::END {
            if wire[i] == opt::PAD {
                i += 1;
                continue;
            }
            codes.push(wire[i]);
            i += 2 + wire[i + 1] as usize;
        }
        codes
    }

    #[test]
    fn requested_options_come_in_the_requested_order() {
        // As an iPXE client might ask: boot file first, then router, mask, DNS; 12 and
        // 66 are answered but not asked for, 200 is asked for but not answered.
        let prl: &[u8] = &[67, 3, 200, 1, 6];
        let req = request(
            packet::DISCOVER,
            PINNED,
            &[(opt::PARAMS, prl), (opt::CLIENT_ARCH, &[0, 7])],
        );
        let (r, _) = reply(policy().handle(&req));
        let codes = wire_codes(&r.encode());
        assert_eq!(codes[..6], [53, 54, 67, 3, 1, 6], "{codes:?}");
        for unasked in [51, 12, 66] {
            assert!(
                codes[6..].contains(&unasked),
                "{unasked} missing: {codes:?}"
            );
        }
        // Without option 55 every option is still there, 53 and 54 first.
        let (r, _) = reply(policy().handle(&request(
            packet::DISCOVER,
            PINNED,
            &[(opt::CLIENT_ARCH, &[0, 7])],
        )));
        let all = wire_codes(&r.encode());
        assert_eq!(all[..2], [53, 54]);
        let (mut a, mut b) = (all.clone(), codes);
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b, "the same options either way");
    }

    #[test]
    fn replies_fit_the_clients_maximum_message_size() {
        // A 250-byte client identifier, echoed (RFC 6842), takes a reply past the 548
        // bytes of UDP payload that a client allowing only 576-byte messages accepts.
        let id = [7u8; 250];
        let ask = |max: u16| {
            reply(policy().handle(&request(
                packet::DISCOVER,
                PINNED,
                &[
                    (opt::CLIENT_ID, &id),
                    (opt::MAX_SIZE, &max.to_be_bytes()),
                    (opt::CLIENT_ARCH, &[0, 7]),
                ],
            )))
            .0
        };
        let big = ask(1500);
        let wire = big.encode();
        assert!(
            wire.len() > 576 - 28,
            "the test needs a big reply: {}",
            wire.len()
        );
        assert_eq!(big.get(opt::CLIENT_ID), Some(&id[..]));
        let small = ask(576);
        let codes = wire_codes(&small.encode());
        assert!(
            small.encode().len() <= 576 - 28,
            "{} bytes",
            small.encode().len()
        );
        // What the node needs to boot is all still there.
        for need in [53, 54, 51, 1, 3, 6, 66, 67] {
            assert!(codes.contains(&need), "{need} dropped: {codes:?}");
        }
    }

    #[test]
    fn echoes_client_id() {
        let (r, _) = reply(policy().handle(&request(
            packet::DISCOVER,
            PINNED,
            &[(opt::CLIENT_ID, &[1, 0, 0x11, 0x22, 0x33, 0x44, 0x55])],
        )));
        assert_eq!(
            r.get(opt::CLIENT_ID),
            Some(&[1, 0, 0x11, 0x22, 0x33, 0x44, 0x55][..])
        );
    }
}
