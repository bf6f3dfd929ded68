//! DHCP client messages (RFC 2131/2132) and the IPv4/UDP framing a packet socket needs.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use anyhow::{bail, ensure, Context, Result};

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
const BOOTREQUEST: u8 = 1;
const BOOTREPLY: u8 = 2;
const HTYPE_ETHER: u8 = 1;
/// Fixed BOOTP part: op … file, before the magic cookie.
const BOOTP_FIXED: usize = 236;
/// RFC 1542: some relays and servers drop shorter BOOTP messages.
const BOOTP_MIN: usize = 300;
const SNAME: std::ops::Range<usize> = 44..108;
const FILE: std::ops::Range<usize> = 108..236;

// Message types (option 53).
pub const DISCOVER: u8 = 1;
pub const OFFER: u8 = 2;
pub const REQUEST: u8 = 3;
pub const ACK: u8 = 5;
pub const NAK: u8 = 6;

// Options.
const OPT_PAD: u8 = 0;
pub const OPT_SUBNET_MASK: u8 = 1;
pub const OPT_ROUTER: u8 = 3;
pub const OPT_DNS: u8 = 6;
const OPT_HOSTNAME: u8 = 12;
pub const OPT_DOMAIN: u8 = 15;
const OPT_BROADCAST: u8 = 28;
const OPT_REQUESTED_IP: u8 = 50;
pub const OPT_LEASE_TIME: u8 = 51;
const OPT_OVERLOAD: u8 = 52;
const OPT_MSG_TYPE: u8 = 53;
pub const OPT_SERVER_ID: u8 = 54;
const OPT_PARAMS: u8 = 55;
pub const OPT_MESSAGE: u8 = 56;
const OPT_MAX_SIZE: u8 = 57;
pub const OPT_T1: u8 = 58;
pub const OPT_T2: u8 = 59;
const OPT_CLIENT_ID: u8 = 61;
const OPT_END: u8 = 255;

/// What we ask the server for.
const PARAMS: &[u8] = &[
    OPT_SUBNET_MASK,
    OPT_ROUTER,
    OPT_DNS,
    OPT_DOMAIN,
    OPT_BROADCAST,
    OPT_LEASE_TIME,
    OPT_SERVER_ID,
    OPT_T1,
    OPT_T2,
];
/// Largest DHCP message we accept (an Ethernet MTU's worth).
const MAX_MESSAGE: u16 = 1500;

/// A message from us to servers.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub kind: u8,
    pub xid: u32,
    pub secs: u16,
    pub mac: [u8; 6],
    /// Our address while renewing or rebinding; unspecified otherwise.
    pub ciaddr: Ipv4Addr,
    /// Option 50, when selecting an offer.
    pub requested: Option<Ipv4Addr>,
    /// Option 54, when selecting an offer.
    pub server_id: Option<Ipv4Addr>,
    pub hostname: Option<&'a str>,
}

impl Request<'_> {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BOOTP_FIXED];
        b[0] = BOOTREQUEST;
        b[1] = HTYPE_ETHER;
        b[2] = 6;
        b[4..8].copy_from_slice(&self.xid.to_be_bytes());
        b[8..10].copy_from_slice(&self.secs.to_be_bytes());
        b[12..16].copy_from_slice(&self.ciaddr.octets());
        b[28..34].copy_from_slice(&self.mac);
        b.extend_from_slice(&MAGIC_COOKIE);
        let mut opt = |code: u8, data: &[u8]| {
            b.push(code);
            b.push(data.len() as u8);
            b.extend_from_slice(data);
        };
        opt(OPT_MSG_TYPE, &[self.kind]);
        let mut client_id = vec![HTYPE_ETHER];
        client_id.extend_from_slice(&self.mac);
        opt(OPT_CLIENT_ID, &client_id);
        if let Some(ip) = self.requested {
            opt(OPT_REQUESTED_IP, &ip.octets());
        }
        if let Some(ip) = self.server_id {
            opt(OPT_SERVER_ID, &ip.octets());
        }
        opt(OPT_MAX_SIZE, &MAX_MESSAGE.to_be_bytes());
        if let Some(h) = self.hostname.filter(|h| !h.is_empty() && h.len() < 64) {
            opt(OPT_HOSTNAME, h.as_bytes());
        }
        opt(OPT_PARAMS, PARAMS);
        b.push(OPT_END);
        if b.len() < BOOTP_MIN {
            b.resize(BOOTP_MIN, OPT_PAD);
        }
        b
    }
}

/// A server's reply, options merged by code.
#[derive(Debug, Clone)]
pub struct Reply {
    pub kind: u8,
    pub xid: u32,
    pub yiaddr: Ipv4Addr,
    pub siaddr: Ipv4Addr,
    pub chaddr: [u8; 6],
    pub options: BTreeMap<u8, Vec<u8>>,
}

impl Reply {
    pub fn decode(b: &[u8]) -> Result<Reply> {
        ensure!(
            b.len() >= BOOTP_FIXED + 4,
            "DHCP message too short ({} bytes)",
            b.len()
        );
        ensure!(b[0] == BOOTREPLY, "not a BOOTP reply (op {})", b[0]);
        ensure!(
            b[1] == HTYPE_ETHER && b[2] == 6,
            "not an Ethernet DHCP message"
        );
        ensure!(
            b[BOOTP_FIXED..BOOTP_FIXED + 4] == MAGIC_COOKIE,
            "no DHCP magic cookie"
        );
        let ip = |at: usize| Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3]);
        let mut options = BTreeMap::new();
        parse_options(&b[BOOTP_FIXED + 4..], &mut options)?;
        // Option overload (52): the file and/or sname fields carry more options.
        if let Some(&[o]) = options.get(&OPT_OVERLOAD).map(Vec::as_slice) {
            if o & 1 != 0 {
                parse_options(&b[FILE], &mut options)?;
            }
            if o & 2 != 0 {
                parse_options(&b[SNAME], &mut options)?;
            }
        }
        let kind = match options.get(&OPT_MSG_TYPE).map(Vec::as_slice) {
            Some(&[k]) => k,
            _ => bail!("DHCP reply without a message type"),
        };
        Ok(Reply {
            kind,
            xid: u32::from_be_bytes(b[4..8].try_into()?),
            yiaddr: ip(16),
            siaddr: ip(20),
            chaddr: b[28..34].try_into()?,
            options,
        })
    }

    pub fn ip(&self, code: u8) -> Option<Ipv4Addr> {
        self.ips(code).into_iter().next()
    }

    /// A list-of-addresses option (router, DNS), skipping a trailing partial entry.
    pub fn ips(&self, code: u8) -> Vec<Ipv4Addr> {
        self.options
            .get(&code)
            .map(|v| {
                v.chunks_exact(4)
                    .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn u32(&self, code: u8) -> Option<u32> {
        let v = self.options.get(&code)?;
        Some(u32::from_be_bytes(v.as_slice().try_into().ok()?))
    }

    pub fn text(&self, code: u8) -> Option<String> {
        let v = self.options.get(&code)?;
        let end = v.iter().position(|&c| c == 0).unwrap_or(v.len());
        let s = String::from_utf8_lossy(&v[..end]).trim().to_string();
        (!s.is_empty()).then_some(s)
    }
}

/// Options in `b` into `out`; repeated codes concatenate (RFC 3396).
fn parse_options(b: &[u8], out: &mut BTreeMap<u8, Vec<u8>>) -> Result<()> {
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            OPT_PAD => i += 1,
            OPT_END => break,
            code => {
                let len = *b.get(i + 1).context("DHCP option without a length")? as usize;
                let data = b
                    .get(i + 2..i + 2 + len)
                    .with_context(|| format!("DHCP option {code} runs past the message"))?;
                out.entry(code).or_default().extend_from_slice(data);
                i += 2 + len;
            }
        }
    }
    Ok(())
}

/// An IPv4 header plus UDP header around `payload`, both checksummed.
pub fn udp_ipv4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut p = Vec::with_capacity(total);
    // Version 4, IHL 5; TOS 0; length; id 0; flags+fragment 0; TTL 64; UDP.
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let ip_sum = checksum(&p[..20], 0);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    // Pseudo-header: addresses, protocol, UDP length.
    let mut pseudo = 0u32;
    for w in src.octets().chunks(2).chain(dst.octets().chunks(2)) {
        pseudo += u16::from_be_bytes([w[0], w[1]]) as u32;
    }
    pseudo += 17 + udp_len as u32;
    let mut udp_sum = checksum(&p[20..], pseudo);
    if udp_sum == 0 {
        udp_sum = 0xffff; // 0 means "no checksum" in UDP over IPv4
    }
    p[26..28].copy_from_slice(&udp_sum.to_be_bytes());
    p
}

/// The UDP datagram in an IPv4 packet: (source address, destination port, payload).
/// Checksums are not verified: veth and virtio hand us packets whose checksum the
/// sender left to offload, and Ethernet's FCS has already caught corruption on the wire.
pub fn parse_udp_ipv4(p: &[u8]) -> Option<(Ipv4Addr, u16, &[u8])> {
    if p.len() < 20 || p[0] >> 4 != 4 || p[9] != 17 {
        return None;
    }
    let ihl = (p[0] & 0x0f) as usize * 4;
    let total = u16::from_be_bytes([p[2], p[3]]) as usize;
    // Fragments cannot be parsed on their own; DHCP replies fit one frame.
    let frag = u16::from_be_bytes([p[6], p[7]]) & 0x3fff;
    if ihl < 20 || total > p.len() || total < ihl + 8 || frag != 0 {
        return None;
    }
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let udp = &p[ihl..total];
    let dport = u16::from_be_bytes([udp[2], udp[3]]);
    let ulen = u16::from_be_bytes([udp[4], udp[5]]) as usize;
    if ulen < 8 || ulen > udp.len() {
        return None;
    }
    Some((src, dport, &udp[8..ulen]))
}

/// The Internet checksum (RFC 1071) of `data`, starting from a partial sum.
fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x01];

    #[test]
    fn discover_layout() {
        let b = Request {
            kind: DISCOVER,
            xid: 0x1234_5678,
            secs: 3,
            mac: MAC,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            requested: None,
            server_id: None,
            hostname: Some("appl"),
        }
        .encode();
        assert_eq!(b.len(), 300);
        assert_eq!(&b[0..4], &[1, 1, 6, 0]);
        assert_eq!(&b[4..8], &[0x12, 0x34, 0x56, 0x78]);
        assert_eq!(&b[8..10], &[0, 3]);
        assert_eq!(&b[28..34], &MAC);
        assert_eq!(&b[236..240], &[99, 130, 83, 99]);
        // Option 53 = DISCOVER, then 61 = type 1 + MAC, then 57 = 1500.
        assert_eq!(&b[240..243], &[53, 1, 1]);
        assert_eq!(&b[243..252], &[61, 7, 1, 2, 0, 0, 0, 10, 1]);
        assert_eq!(&b[252..256], &[57, 2, 0x05, 0xdc]);
        assert_eq!(&b[256..262], b"\x0c\x04appl");
    }

    #[test]
    fn request_names_offer_and_server() {
        let b = Request {
            kind: REQUEST,
            xid: 1,
            secs: 0,
            mac: MAC,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            requested: Some(Ipv4Addr::new(192, 0, 2, 50)),
            server_id: Some(Ipv4Addr::new(192, 0, 2, 1)),
            hostname: None,
        }
        .encode();
        let opts = &b[240..];
        assert!(opts.windows(6).any(|w| w == [50, 4, 192, 0, 2, 50]));
        assert!(opts.windows(6).any(|w| w == [54, 4, 192, 0, 2, 1]));
    }

    /// A hand-assembled OFFER with a split (RFC 3396) DNS option and overloaded file field.
    #[test]
    fn parses_an_offer() {
        let mut b = vec![0u8; 236];
        b[0] = 2;
        b[1] = 1;
        b[2] = 6;
        b[4..8].copy_from_slice(&7u32.to_be_bytes());
        b[16..20].copy_from_slice(&[192, 0, 2, 50]);
        b[28..34].copy_from_slice(&MAC);
        // file field holds option 15 "lan"
        b[108..115].copy_from_slice(&[15, 3, b'l', b'a', b'n', 255, 0]);
        b.extend_from_slice(&[99, 130, 83, 99]);
        b.extend_from_slice(&[53, 1, 2, 52, 1, 1]);
        b.extend_from_slice(&[1, 4, 255, 255, 255, 0]);
        b.extend_from_slice(&[6, 4, 192, 0, 2, 1, 0, 6, 4, 9, 9, 9, 9]);
        b.extend_from_slice(&[51, 4, 0, 0, 0x0e, 0x10, 255]);
        let r = Reply::decode(&b).unwrap();
        assert_eq!(r.kind, OFFER);
        assert_eq!(r.xid, 7);
        assert_eq!(r.yiaddr, Ipv4Addr::new(192, 0, 2, 50));
        assert_eq!(r.chaddr, MAC);
        assert_eq!(
            r.ips(OPT_DNS),
            vec![Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(9, 9, 9, 9)]
        );
        assert_eq!(r.u32(OPT_LEASE_TIME), Some(3600));
        assert_eq!(r.text(OPT_DOMAIN).as_deref(), Some("lan"));
        assert_eq!(r.ip(OPT_SUBNET_MASK), Some(Ipv4Addr::new(255, 255, 255, 0)));

        let mut bad = b.clone();
        bad[0] = 1;
        assert!(Reply::decode(&bad).is_err());
        let mut trunc = b.clone();
        trunc.truncate(b.len() - 3); // option 51 cut short
        assert!(Reply::decode(&trunc).is_err());
    }

    /// RFC 1071's worked example sums to 0xddf2, whose complement is 0x220d.
    #[test]
    fn internet_checksum() {
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7], 0),
            0x220d
        );
    }

    #[test]
    fn framing_round_trips() {
        let p = udp_ipv4(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            CLIENT_PORT,
            SERVER_PORT,
            b"hello",
        );
        assert_eq!(p.len(), 20 + 8 + 5);
        // A valid header checksums to zero.
        assert_eq!(checksum(&p[..20], 0), 0);
        let (src, dport, payload) = parse_udp_ipv4(&p).unwrap();
        assert_eq!(src, Ipv4Addr::UNSPECIFIED);
        assert_eq!(dport, SERVER_PORT);
        assert_eq!(payload, b"hello");
        let mut frag = p.clone();
        frag[6] = 0x20; // more fragments
        assert!(parse_udp_ipv4(&frag).is_none());
    }
}
