//! TFTP packets (RFC 1350) and option negotiation (RFC 2347 blksize/tsize/timeout from
//! RFC 2348/2349, windowsize from RFC 7440). The request parser takes any bytes (fuzzed).

pub const RRQ: u16 = 1;
pub const WRQ: u16 = 2;
pub const DATA: u16 = 3;
pub const ACK: u16 = 4;
pub const ERROR: u16 = 5;
pub const OACK: u16 = 6;

pub const ERR_UNDEFINED: u16 = 0;
pub const ERR_NOT_FOUND: u16 = 1;
pub const ERR_ACCESS: u16 = 2;
pub const ERR_ILLEGAL: u16 = 4;
pub const ERR_UNKNOWN_TID: u16 = 5;
pub const ERR_OPTIONS: u16 = 8;

pub const DEFAULT_BLKSIZE: u16 = 512;
/// RFC 2348 limits.
pub const MIN_BLKSIZE: u16 = 8;
pub const MAX_BLKSIZE: u16 = 65464;
/// RFC 2349 limits, seconds.
pub const MIN_TIMEOUT: u8 = 1;
pub const MAX_TIMEOUT: u8 = 255;
/// We grant at most this window (RFC 7440 lets the server lower it).
pub const MAX_WINDOW: u16 = 64;
/// Most options we look at in one request (the rest are ignored).
const MAX_OPTIONS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Octet,
    Netascii,
}

/// A read or write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub write: bool,
    pub filename: String,
    pub mode: Mode,
    /// Option (name lower-cased, value) pairs in the order sent.
    pub options: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// Not an RRQ/WRQ, or not NUL-terminated strings.
    Malformed,
    /// A mode other than octet/netascii (e.g. the obsolete "mail").
    BadMode(String),
}

/// The options we accept, with the values to put in the OACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Negotiated {
    pub blksize: Option<u16>,
    pub timeout: Option<u8>,
    /// The client asked for the transfer size.
    pub tsize: bool,
    pub windowsize: Option<u16>,
}

impl Negotiated {
    pub fn any(&self) -> bool {
        self.blksize.is_some() || self.timeout.is_some() || self.tsize || self.windowsize.is_some()
    }
}

fn cstr(b: &[u8]) -> Option<(&str, &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    Some((std::str::from_utf8(&b[..end]).ok()?, &b[end + 1..]))
}

impl Request {
    pub fn parse(b: &[u8]) -> Result<Request, RequestError> {
        if b.len() < 4 {
            return Err(RequestError::Malformed);
        }
        let op = u16::from_be_bytes([b[0], b[1]]);
        if op != RRQ && op != WRQ {
            return Err(RequestError::Malformed);
        }
        let (filename, rest) = cstr(&b[2..]).ok_or(RequestError::Malformed)?;
        let (mode, mut rest) = cstr(rest).ok_or(RequestError::Malformed)?;
        let mode = match mode.to_ascii_lowercase().as_str() {
            "octet" => Mode::Octet,
            "netascii" => Mode::Netascii,
            other => return Err(RequestError::BadMode(other.to_string())),
        };
        let mut options: Vec<(String, String)> = Vec::new();
        // Options are name/value pairs; a trailing odd string or junk is ignored.
        while let Some((name, r)) = cstr(rest) {
            let Some((value, r2)) = cstr(r) else { break };
            rest = r2;
            let name = name.to_ascii_lowercase();
            if options.len() < MAX_OPTIONS && !options.iter().any(|(n, _)| *n == name) {
                options.push((name, value.to_string()));
            }
        }
        Ok(Request {
            write: op == WRQ,
            filename: filename.to_string(),
            mode,
            options,
        })
    }

    /// Accept the options we support with sane values; ignore the rest (RFC 2347: the
    /// server leaves out what it does not accept). `max_blksize` is what the path fits.
    pub fn negotiate(&self, max_blksize: u16) -> Negotiated {
        let mut n = Negotiated::default();
        for (name, value) in &self.options {
            let num: Option<u64> = value.parse().ok();
            match (name.as_str(), num) {
                ("blksize", Some(v)) if v >= u64::from(MIN_BLKSIZE) => {
                    n.blksize = Some(v.min(u64::from(max_blksize.min(MAX_BLKSIZE))) as u16)
                }
                ("timeout", Some(v))
                    if (u64::from(MIN_TIMEOUT)..=u64::from(MAX_TIMEOUT)).contains(&v) =>
                {
                    n.timeout = Some(v as u8)
                }
                ("tsize", Some(_)) if !self.write => n.tsize = true,
                ("windowsize", Some(v)) if v >= 1 => {
                    n.windowsize = Some(v.min(u64::from(MAX_WINDOW)) as u16)
                }
                _ => {}
            }
        }
        n
    }
}

pub fn error(code: u16, msg: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(5 + msg.len());
    b.extend_from_slice(&ERROR.to_be_bytes());
    b.extend_from_slice(&code.to_be_bytes());
    b.extend_from_slice(msg.as_bytes());
    b.push(0);
    b
}

pub fn oack(n: &Negotiated, size: u64) -> Vec<u8> {
    let mut b = OACK.to_be_bytes().to_vec();
    let mut put = |k: &str, v: String| {
        b.extend_from_slice(k.as_bytes());
        b.push(0);
        b.extend_from_slice(v.as_bytes());
        b.push(0);
    };
    if let Some(v) = n.blksize {
        put("blksize", v.to_string());
    }
    if let Some(v) = n.timeout {
        put("timeout", v.to_string());
    }
    if n.tsize {
        put("tsize", size.to_string());
    }
    if let Some(v) = n.windowsize {
        put("windowsize", v.to_string());
    }
    b
}

/// A client's answer during a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Ack(u16),
    Error(u16),
    Other,
}

pub fn parse_reply(b: &[u8]) -> Reply {
    if b.len() < 4 {
        return Reply::Other;
    }
    let op = u16::from_be_bytes([b[0], b[1]]);
    let n = u16::from_be_bytes([b[2], b[3]]);
    match op {
        ACK => Reply::Ack(n),
        ERROR => Reply::Error(n),
        _ => Reply::Other,
    }
}

/// netascii (RFC 764 via RFC 1350): CR → CR NUL, LF → CR LF.
pub fn to_netascii(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 16);
    for &c in data {
        match c {
            b'\r' => out.extend_from_slice(b"\r\0"),
            b'\n' => out.extend_from_slice(b"\r\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rrq(parts: &[&str]) -> Vec<u8> {
        let mut b = vec![0, 1];
        for p in parts {
            b.extend_from_slice(p.as_bytes());
            b.push(0);
        }
        b
    }

    #[test]
    fn parses_requests_and_options() {
        let r = Request::parse(&rrq(&[
            "ipxe.efi", "OCTET", "BlkSize", "1468", "tsize", "0",
        ]))
        .unwrap();
        assert_eq!(r.filename, "ipxe.efi");
        assert_eq!(r.mode, Mode::Octet);
        assert!(!r.write);
        assert_eq!(
            r.options,
            vec![
                ("blksize".into(), "1468".into()),
                ("tsize".into(), "0".into())
            ]
        );
        let n = r.negotiate(1468);
        assert_eq!(n.blksize, Some(1468));
        assert!(n.tsize);
        assert_eq!(
            oack(&n, 1234),
            b"\0\x06blksize\x001468\0tsize\x001234\0".to_vec()
        );

        let mut w = rrq(&["x", "netascii"]);
        w[1] = 2;
        let r = Request::parse(&w).unwrap();
        assert!(r.write);
        assert_eq!(r.mode, Mode::Netascii);
    }

    #[test]
    fn rejects_bad_requests() {
        assert_eq!(Request::parse(&[0, 1]), Err(RequestError::Malformed));
        assert_eq!(
            Request::parse(b"\0\x01no-nul"),
            Err(RequestError::Malformed)
        );
        assert_eq!(
            Request::parse(b"\0\x03x\0octet\0"),
            Err(RequestError::Malformed)
        );
        assert_eq!(
            Request::parse(b"\0\x01x\0\xff\xfe\0"),
            Err(RequestError::Malformed)
        );
        assert_eq!(
            Request::parse(&rrq(&["x", "mail"])),
            Err(RequestError::BadMode("mail".into()))
        );
    }

    #[test]
    fn clamps_and_ignores_bad_values() {
        let n = Request::parse(&rrq(&[
            "f",
            "octet",
            "blksize",
            "4",
            "timeout",
            "0",
            "windowsize",
            "0",
            "tsize",
            "x",
        ]))
        .unwrap()
        .negotiate(1468);
        assert_eq!(n, Negotiated::default());
        assert!(!n.any());
        let n = Request::parse(&rrq(&[
            "f",
            "octet",
            "blksize",
            "99999",
            "timeout",
            "3",
            "windowsize",
            "1000",
            "junk",
        ]))
        .unwrap()
        .negotiate(1468);
        assert_eq!(n.blksize, Some(1468));
        assert_eq!(n.timeout, Some(3));
        assert_eq!(n.windowsize, Some(MAX_WINDOW));
        // Duplicates: the first wins.
        let r = Request::parse(&rrq(&["f", "octet", "blksize", "1024", "blksize", "512"])).unwrap();
        assert_eq!(r.negotiate(1468).blksize, Some(1024));
    }

    #[test]
    fn replies_and_netascii() {
        assert_eq!(parse_reply(&[0, 4, 0x12, 0x34]), Reply::Ack(0x1234));
        assert_eq!(parse_reply(&[0, 5, 0, 8, 0]), Reply::Error(8));
        assert_eq!(parse_reply(&[0, 4]), Reply::Other);
        assert_eq!(to_netascii(b"a\nb\rc"), b"a\r\nb\r\0c".to_vec());
        assert_eq!(error(1, "nope"), b"\0\x05\0\x01nope\0".to_vec());
    }
}
