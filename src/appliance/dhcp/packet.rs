//! DHCP messages (RFC 2131/2132): parsing what clients send, encoding what we answer.
//!
//! The parser takes any bytes (it is fuzzed): it checks lengths before every read,
//! merges repeated options (RFC 3396) and follows option overload into `file`/`sname`.

use std::net::Ipv4Addr;

pub const BOOTREQUEST: u8 = 1;
pub const BOOTREPLY: u8 = 2;
pub const HTYPE_ETHER: u8 = 1;
pub const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// Fixed BOOTP header up to `file`'s end; the magic cookie follows.
const FIXED_LEN: usize = 236;
/// Replies are padded to the BOOTP minimum some old clients insist on.
const MIN_REPLY: usize = 300;
pub const FLAG_BROADCAST: u16 = 0x8000;

pub const DISCOVER: u8 = 1;
pub const OFFER: u8 = 2;
pub const REQUEST: u8 = 3;
pub const DECLINE: u8 = 4;
pub const ACK: u8 = 5;
pub const NAK: u8 = 6;
pub const RELEASE: u8 = 7;
pub const INFORM: u8 = 8;

pub mod opt {
    pub const PAD: u8 = 0;
    pub const SUBNET_MASK: u8 = 1;
    pub const ROUTER: u8 = 3;
    pub const DNS: u8 = 6;
    pub const HOSTNAME: u8 = 12;
    pub const BROADCAST: u8 = 28;
    pub const REQUESTED_IP: u8 = 50;
    pub const LEASE_TIME: u8 = 51;
    pub const OVERLOAD: u8 = 52;
    pub const MESSAGE_TYPE: u8 = 53;
    pub const SERVER_ID: u8 = 54;
    pub const PARAMS: u8 = 55;
    pub const MESSAGE: u8 = 56;
    pub const MAX_SIZE: u8 = 57;
    pub const RENEWAL: u8 = 58;
    pub const REBINDING: u8 = 59;
    pub const VENDOR_CLASS: u8 = 60;
    /// Vendor-specific options (PXE's live here for PXEClient).
    pub const VENDOR_OPTS: u8 = 43;
    pub const CLIENT_ID: u8 = 61;
    pub const TFTP_SERVER: u8 = 66;
    pub const BOOTFILE: u8 = 67;
    pub const USER_CLASS: u8 = 77;
    pub const CLIENT_ARCH: u8 = 93;
    pub const IPXE_ENCAP: u8 = 175;
    pub const END: u8 = 255;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    TooShort,
    BadMagic,
    /// An option's length runs past the end of its area.
    Truncated,
}

/// A DHCP message. Options keep their order; repeated codes are concatenated on parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub op: u8,
    pub htype: u8,
    pub hlen: u8,
    pub hops: u8,
    pub xid: u32,
    pub secs: u16,
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    pub yiaddr: Ipv4Addr,
    pub siaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    pub chaddr: [u8; 16],
    pub sname: Vec<u8>,
    pub file: Vec<u8>,
    pub options: Vec<(u8, Vec<u8>)>,
}

fn ip(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// Parse an option area into `out`, merging repeats. Stops at END.
fn parse_options(area: &[u8], out: &mut Vec<(u8, Vec<u8>)>) -> Result<(), ParseError> {
    let mut i = 0;
    while i < area.len() {
        let code = area[i];
        match code {
            opt::PAD => i += 1,
            opt::END => return Ok(()),
            _ => {
                let len = *area.get(i + 1).ok_or(ParseError::Truncated)? as usize;
                let value = area.get(i + 2..i + 2 + len).ok_or(ParseError::Truncated)?;
                match out.iter_mut().find(|(c, _)| *c == code) {
                    Some((_, v)) => v.extend_from_slice(value),
                    None => out.push((code, value.to_vec())),
                }
                i += 2 + len;
            }
        }
    }
    Ok(())
}

impl Packet {
    pub fn parse(b: &[u8]) -> Result<Packet, ParseError> {
        if b.len() < FIXED_LEN + MAGIC.len() {
            return Err(ParseError::TooShort);
        }
        if b[FIXED_LEN..FIXED_LEN + 4] != MAGIC {
            return Err(ParseError::BadMagic);
        }
        let mut chaddr = [0u8; 16];
        chaddr.copy_from_slice(&b[28..44]);
        let mut p = Packet {
            op: b[0],
            htype: b[1],
            hlen: b[2],
            hops: b[3],
            xid: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            secs: u16::from_be_bytes([b[8], b[9]]),
            flags: u16::from_be_bytes([b[10], b[11]]),
            ciaddr: ip(b, 12),
            yiaddr: ip(b, 16),
            siaddr: ip(b, 20),
            giaddr: ip(b, 24),
            chaddr,
            sname: b[44..108].to_vec(),
            file: b[108..236].to_vec(),
            options: Vec::new(),
        };
        parse_options(&b[FIXED_LEN + 4..], &mut p.options)?;
        // Option overload (52): 1 = file, 2 = sname, 3 = both carry more options.
        let overload = p
            .get(opt::OVERLOAD)
            .and_then(|v| v.first().copied())
            .unwrap_or(0);
        if overload & 1 != 0 {
            parse_options(&b[108..236], &mut p.options)?;
        }
        if overload & 2 != 0 {
            parse_options(&b[44..108], &mut p.options)?;
        }
        Ok(p)
    }

    pub fn get(&self, code: u8) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_slice())
    }

    pub fn set(&mut self, code: u8, value: impl Into<Vec<u8>>) {
        let value = value.into();
        match self.options.iter_mut().find(|(c, _)| *c == code) {
            Some((_, v)) => *v = value,
            None => self.options.push((code, value)),
        }
    }

    pub fn message_type(&self) -> Option<u8> {
        self.get(opt::MESSAGE_TYPE)
            .filter(|v| v.len() == 1)
            .map(|v| v[0])
    }

    fn ip_option(&self, code: u8) -> Option<Ipv4Addr> {
        self.get(code).filter(|v| v.len() == 4).map(|v| ip(v, 0))
    }

    pub fn requested_ip(&self) -> Option<Ipv4Addr> {
        self.ip_option(opt::REQUESTED_IP)
    }

    pub fn server_id(&self) -> Option<Ipv4Addr> {
        self.ip_option(opt::SERVER_ID)
    }

    /// The client's MAC when it is Ethernet (htype 1, hlen 6).
    pub fn mac(&self) -> Option<[u8; 6]> {
        (self.htype == HTYPE_ETHER && self.hlen == 6).then(|| {
            let mut m = [0u8; 6];
            m.copy_from_slice(&self.chaddr[..6]);
            m
        })
    }

    /// Option 93: the first architecture type the client lists.
    pub fn client_arch(&self) -> Option<u16> {
        self.get(opt::CLIENT_ARCH)
            .filter(|v| v.len() >= 2)
            .map(|v| u16::from_be_bytes([v[0], v[1]]))
    }

    pub fn vendor_class(&self) -> Option<&[u8]> {
        self.get(opt::VENDOR_CLASS)
    }

    /// Whether the user class (77) names `class`, either raw (as iPXE sends it) or as
    /// one of the length-prefixed RFC 3004 entries.
    pub fn has_user_class(&self, class: &[u8]) -> bool {
        let Some(v) = self.get(opt::USER_CLASS) else {
            return false;
        };
        if v == class {
            return true;
        }
        let mut i = 0;
        while i < v.len() {
            let len = v[i] as usize;
            match v.get(i + 1..i + 1 + len) {
                Some(entry) if entry == class => return true,
                Some(_) => i += 1 + len,
                None => return false,
            }
        }
        false
    }

    /// The largest reply the client accepts (option 57), at least the RFC minimum.
    pub fn max_reply_size(&self) -> usize {
        const IP_UDP: usize = 28;
        self.get(opt::MAX_SIZE)
            .filter(|v| v.len() == 2)
            .map(|v| u16::from_be_bytes([v[0], v[1]]) as usize)
            .unwrap_or(576)
            .max(576)
            - IP_UDP
    }

    /// Put the options a client asked for (its option 55) in the order it asked, after
    /// the message type and server identifier; the rest keep their order at the end.
    /// RFC 2132 9.8: the server "MUST try to insert the requested options in the order
    /// requested"; some PXE ROMs read only the first few.
    pub fn order_options_like(&mut self, requested: &[u8]) {
        let rank = |code: u8| match code {
            opt::MESSAGE_TYPE => 0,
            opt::SERVER_ID => 1,
            c => requested
                .iter()
                .position(|&r| r == c)
                .map_or(usize::MAX, |i| i + 2),
        };
        self.options.sort_by_key(|(c, _)| rank(*c)); // stable: the rest stay in order
    }

    /// Make the reply fit in `max` bytes (the client's [`Self::max_reply_size`]) by
    /// dropping, least needed first, the options a client can do without and did not
    /// ask for. Returns whether it fits. Only a very long client identifier, which
    /// replies echo, takes a reply near the 548 bytes every client must accept.
    pub fn fit(&mut self, max: usize, requested: &[u8]) -> bool {
        const EXPENDABLE: [u8; 5] = [
            opt::HOSTNAME,
            opt::BROADCAST,
            opt::REBINDING,
            opt::RENEWAL,
            opt::CLIENT_ID,
        ];
        for code in EXPENDABLE {
            if self.encode().len() <= max {
                return true;
            }
            if !requested.contains(&code) {
                self.options.retain(|(c, _)| *c != code);
            }
        }
        self.encode().len() <= max
    }

    /// A reply skeleton for `req`: same xid, flags, giaddr and chaddr.
    pub fn reply_to(req: &Packet) -> Packet {
        Packet {
            op: BOOTREPLY,
            htype: req.htype,
            hlen: req.hlen,
            hops: 0,
            xid: req.xid,
            secs: 0,
            flags: req.flags,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: req.giaddr,
            chaddr: req.chaddr,
            sname: Vec::new(),
            file: Vec::new(),
            options: Vec::new(),
        }
    }

    /// Wire form: options in order (values over 255 bytes split per RFC 3396), END, padded.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(MIN_REPLY + 64);
        b.extend_from_slice(&[self.op, self.htype, self.hlen, self.hops]);
        b.extend_from_slice(&self.xid.to_be_bytes());
        b.extend_from_slice(&self.secs.to_be_bytes());
        b.extend_from_slice(&self.flags.to_be_bytes());
        for a in [self.ciaddr, self.yiaddr, self.siaddr, self.giaddr] {
            b.extend_from_slice(&a.octets());
        }
        b.extend_from_slice(&self.chaddr);
        for (field, len) in [(&self.sname, 64), (&self.file, 128)] {
            let n = field.len().min(len - 1); // keep a terminating NUL
            b.extend_from_slice(&field[..n]);
            b.resize(b.len() + len - n, 0);
        }
        b.extend_from_slice(&MAGIC);
        for (code, value) in &self.options {
            if value.is_empty() {
                b.extend_from_slice(&[*code, 0]);
            }
            for chunk in value.chunks(255) {
                b.push(*code);
                b.push(chunk.len() as u8);
                b.extend_from_slice(chunk);
            }
        }
        b.push(opt::END);
        if b.len() < MIN_REPLY {
            b.resize(MIN_REPLY, 0);
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DISCOVER laid out by hand from RFC 2131 figure 1 (not by our encoder).
    fn discover_bytes() -> Vec<u8> {
        let mut b = vec![0u8; 236];
        b[0] = 1; // BOOTREQUEST
        b[1] = 1;
        b[2] = 6;
        b[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        b[10] = 0x80; // broadcast flag
        b[28..34].copy_from_slice(&[0, 0x11, 0x22, 0x33, 0x44, 0x55]);
        b.extend_from_slice(&[99, 130, 83, 99]);
        b.extend_from_slice(&[53, 1, 1]); // DISCOVER
        b.extend_from_slice(&[93, 2, 0, 7]); // x64 UEFI
        b.extend_from_slice(&[77, 4, b'i', b'P', b'X', b'E']);
        b.extend_from_slice(&[60, 9]);
        b.extend_from_slice(b"PXEClient");
        b.extend_from_slice(&[12, 2, b'a', b'b', 12, 2, b'c', b'd']); // split option (RFC 3396)
        b.extend_from_slice(&[0, 0, 255]);
        b
    }

    #[test]
    fn parses_a_discover() {
        let p = Packet::parse(&discover_bytes()).unwrap();
        assert_eq!(p.op, BOOTREQUEST);
        assert_eq!(p.xid, 0xdeadbeef);
        assert_eq!(p.flags, FLAG_BROADCAST);
        assert_eq!(p.mac(), Some([0, 0x11, 0x22, 0x33, 0x44, 0x55]));
        assert_eq!(p.message_type(), Some(DISCOVER));
        assert_eq!(p.client_arch(), Some(7));
        assert!(p.has_user_class(b"iPXE"));
        assert_eq!(p.vendor_class(), Some(&b"PXEClient"[..]));
        assert_eq!(p.get(opt::HOSTNAME), Some(&b"abcd"[..]));
        assert_eq!(p.max_reply_size(), 548);
    }

    #[test]
    fn rfc3004_user_class() {
        let mut p = Packet::parse(&discover_bytes()).unwrap();
        p.set(opt::USER_CLASS, b"\x03foo\x04iPXE".to_vec());
        assert!(p.has_user_class(b"iPXE"));
        p.set(opt::USER_CLASS, b"\x09iPXE".to_vec());
        assert!(!p.has_user_class(b"iPXE"));
    }

    #[test]
    fn overload_and_errors() {
        let mut b = discover_bytes();
        // Put option 12 in `file` and announce it with option 52 = 1.
        b[108..113].copy_from_slice(&[12, 2, b'x', b'y', 255]);
        let end = b.len() - 1;
        b[end - 2..=end].copy_from_slice(&[52, 1, 1]);
        b.push(255);
        let p = Packet::parse(&b).unwrap();
        assert_eq!(p.get(opt::HOSTNAME), Some(&b"abcdxy"[..]));

        assert_eq!(Packet::parse(&b[..200]), Err(ParseError::TooShort));
        let mut bad = discover_bytes();
        bad[236] = 0;
        assert_eq!(Packet::parse(&bad), Err(ParseError::BadMagic));
        let mut trunc = discover_bytes();
        trunc.truncate(240 + 3 + 4 + 3); // cuts option 77's value
        assert_eq!(Packet::parse(&trunc), Err(ParseError::Truncated));
    }

    #[test]
    fn encodes_round_trip() {
        let req = Packet::parse(&discover_bytes()).unwrap();
        let mut r = Packet::reply_to(&req);
        r.yiaddr = Ipv4Addr::new(10, 10, 10, 100);
        r.file = b"ipxe.efi".to_vec();
        r.set(opt::MESSAGE_TYPE, [OFFER]);
        r.set(opt::VENDOR_CLASS, vec![b'x'; 300]);
        let wire = r.encode();
        assert!(wire.len() >= 300);
        assert_eq!(&wire[16..20], &[10, 10, 10, 100]);
        assert_eq!(&wire[108..117], b"ipxe.efi\0");
        let back = Packet::parse(&wire).unwrap();
        assert_eq!(back.op, BOOTREPLY);
        assert_eq!(back.xid, req.xid);
        assert_eq!(back.get(opt::VENDOR_CLASS).map(<[u8]>::len), Some(300));
        assert_eq!(back.message_type(), Some(OFFER));
    }
}
