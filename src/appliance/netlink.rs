//! A small netlink client over raw `AF_NETLINK` sockets.
//!
//! The appliance has no `ip` or `nft` binary: links, addresses and routes go through
//! rtnetlink ([`route`]) and the NAT ruleset through nfnetlink batches (`nat`). Both need
//! only this much: build a message of attributes, send it, wait for the kernel's ACK (with
//! its extended error text when it refuses), and read back dumps.

pub mod route;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{bail, Context, Result};

// Header flags (include/uapi/linux/netlink.h).
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;
pub const NLM_F_DUMP: u16 = 0x300;
/// On an error message: the original request was cut to its header.
const NLM_F_CAPPED: u16 = 0x100;
/// On an error message: extended-ACK attributes follow.
const NLM_F_ACK_TLVS: u16 = 0x200;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;

const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
/// Extended-ACK attribute carrying the kernel's error text.
const NLMSGERR_ATTR_MSG: u16 = 1;

// Socket options at SOL_NETLINK.
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

/// Size of `struct nlmsghdr`.
pub const HDR_LEN: usize = 16;
/// How long to wait for the kernel's answer before calling it lost.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// Receive buffer: large enough for any single dump datagram.
const RECV_BUF: usize = 64 * 1024;

/// Netlink messages and attributes are padded to 4 bytes.
pub fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// One message under construction: header, family header, attributes.
pub struct MsgBuilder {
    buf: Vec<u8>,
}

impl MsgBuilder {
    pub fn new(ty: u16, flags: u16) -> MsgBuilder {
        let mut buf = vec![0u8; HDR_LEN];
        buf[4..6].copy_from_slice(&ty.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        MsgBuilder { buf }
    }

    /// Append the family-specific fixed header (ifinfomsg, rtmsg, nfgenmsg…).
    pub fn header(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self.pad();
        self
    }

    pub fn attr(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    pub fn attr_u8(&mut self, ty: u16, v: u8) -> &mut Self {
        self.attr(ty, &[v])
    }

    pub fn attr_u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.attr(ty, &v.to_ne_bytes())
    }

    /// A big-endian u32 (nf_tables attributes are in network byte order).
    pub fn attr_be32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.attr(ty, &v.to_be_bytes())
    }

    /// A NUL-terminated string.
    pub fn attr_str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut data = Vec::with_capacity(s.len() + 1);
        data.extend_from_slice(s.as_bytes());
        data.push(0);
        self.attr(ty, &data)
    }

    /// A nested attribute whose content `f` appends.
    pub fn nested(&mut self, ty: u16, f: impl FnOnce(&mut Self)) -> &mut Self {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        f(self);
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.buf[start + 2..start + 4].copy_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        self
    }

    /// The finished message with its length and sequence number filled in.
    pub fn finish(&self, seq: u32) -> Vec<u8> {
        let mut out = self.buf.clone();
        let len = out.len() as u32;
        out[0..4].copy_from_slice(&len.to_ne_bytes());
        out[8..12].copy_from_slice(&seq.to_ne_bytes());
        out
    }

    fn pad(&mut self) {
        self.buf.resize(align(self.buf.len()), 0);
    }
}

/// One received message.
#[derive(Debug, Clone)]
pub struct Message {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    /// Everything after the netlink header.
    pub payload: Vec<u8>,
}

/// Split a datagram into its messages.
pub fn parse_messages(buf: &[u8]) -> Result<Vec<Message>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + HDR_LEN <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into()?) as usize;
        if len < HDR_LEN || off + len > buf.len() {
            bail!(
                "malformed netlink message: length {len} at offset {off} of {}",
                buf.len()
            );
        }
        out.push(Message {
            ty: u16::from_ne_bytes(buf[off + 4..off + 6].try_into()?),
            flags: u16::from_ne_bytes(buf[off + 6..off + 8].try_into()?),
            seq: u32::from_ne_bytes(buf[off + 8..off + 12].try_into()?),
            payload: buf[off + HDR_LEN..off + len].to_vec(),
        });
        off += align(len);
    }
    Ok(out)
}

/// Iterator over the attributes in a buffer: (type without flag bits, payload).
pub struct Attrs<'a> {
    buf: &'a [u8],
}

pub fn attrs(buf: &[u8]) -> Attrs<'_> {
    Attrs { buf }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([self.buf[0], self.buf[1]]) as usize;
        let ty = u16::from_ne_bytes([self.buf[2], self.buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > self.buf.len() {
            self.buf = &[];
            return None;
        }
        let data = &self.buf[4..len];
        self.buf = &self.buf[align(len).min(self.buf.len())..];
        Some((ty, data))
    }
}

pub fn attr_u32(data: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(data.get(..4)?.try_into().ok()?))
}

/// A NUL-terminated (or unterminated) string attribute.
pub fn attr_string(data: &[u8]) -> String {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

/// An open netlink socket of one protocol.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
    what: &'static str,
}

impl Socket {
    /// rtnetlink: links, addresses, routes.
    pub fn route() -> Result<Socket> {
        Socket::open(libc::NETLINK_ROUTE, "rtnetlink")
    }

    /// nfnetlink: nf_tables.
    pub fn netfilter() -> Result<Socket> {
        Socket::open(libc::NETLINK_NETFILTER, "nfnetlink")
    }

    fn open(protocol: libc::c_int, what: &'static str) -> Result<Socket> {
        // SAFETY: plain socket(2) call; the fd is owned right away.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("opening a {what} socket"));
        }
        // SAFETY: raw is a fresh, valid fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; zeroed means "kernel assigns our port id".
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: sa is a valid sockaddr_nl of the size passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("binding a {what} socket"));
        }
        // Error texts from the kernel and short error replies; older kernels lack them.
        let _ = setsockopt_int(&fd, libc::SOL_NETLINK, NETLINK_EXT_ACK, 1);
        let _ = setsockopt_int(&fd, libc::SOL_NETLINK, NETLINK_CAP_ACK, 1);
        set_recv_timeout(&fd, RECV_TIMEOUT)
            .with_context(|| format!("configuring a {what} socket"))?;
        // Start from a value unlikely to match a previous socket's replies.
        let seq = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(1))
        .wrapping_mul(1000);
        Ok(Socket { fd, seq, what })
    }

    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    pub fn send(&self, buf: &[u8]) -> Result<()> {
        // SAFETY: sockaddr_nl zeroed = the kernel (port id 0).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: buf and sa are valid for the lengths passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                0,
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("sending to {}", self.what));
        }
        if n as usize != buf.len() {
            bail!("short send to {}: {n} of {} bytes", self.what, buf.len());
        }
        Ok(())
    }

    /// Receive one datagram (blocks for a few seconds at most).
    pub fn recv(&self) -> Result<Vec<Message>> {
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            // SAFETY: buf is valid for RECV_BUF bytes.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if e.kind() == io::ErrorKind::WouldBlock {
                    bail!(
                        "no answer from {} within {} s",
                        self.what,
                        RECV_TIMEOUT.as_secs()
                    );
                }
                return Err(e).with_context(|| format!("receiving from {}", self.what));
            }
            let n = n as usize;
            if n > buf.len() {
                bail!(
                    "{} reply of {n} bytes exceeds our {RECV_BUF}-byte buffer",
                    self.what
                );
            }
            return parse_messages(&buf[..n]);
        }
    }

    /// Send one request and wait for its ACK.
    pub fn request(&mut self, msg: &MsgBuilder) -> Result<()> {
        let seq = self.next_seq();
        let mut buf = msg.finish(seq);
        let flags = u16::from_ne_bytes([buf[6], buf[7]]) | NLM_F_ACK;
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        self.send(&buf)?;
        self.wait_acks(&[seq])
    }

    /// Wait until every sequence number in `seqs` has been acknowledged; the first
    /// error the kernel reports is returned.
    pub fn wait_acks(&self, seqs: &[u32]) -> Result<()> {
        let mut pending: Vec<u32> = seqs.to_vec();
        while !pending.is_empty() {
            for m in self.recv()? {
                if m.ty != NLMSG_ERROR || !pending.contains(&m.seq) {
                    continue; // a late reply to something earlier
                }
                pending.retain(|&s| s != m.seq);
                check_error(&m)?;
            }
        }
        Ok(())
    }

    /// Run a dump request and collect every reply message until NLMSG_DONE.
    pub fn dump(&mut self, msg: &MsgBuilder) -> Result<Vec<Message>> {
        let seq = self.next_seq();
        let mut buf = msg.finish(seq);
        let flags = u16::from_ne_bytes([buf[6], buf[7]]) | NLM_F_DUMP;
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        self.send(&buf)?;
        let mut out = Vec::new();
        loop {
            for m in self.recv()? {
                if m.seq != seq {
                    continue;
                }
                match m.ty {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        check_error(&m)?;
                        return Ok(out);
                    }
                    NLMSG_OVERRUN => bail!("{} dump overran", self.what),
                    _ => out.push(m),
                }
            }
        }
    }
}

/// Turn an NLMSG_ERROR message into Ok (an ACK) or the error it carries.
fn check_error(m: &Message) -> Result<()> {
    let code = m
        .payload
        .get(..4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .context("truncated netlink error message")?;
    if code == 0 {
        return Ok(());
    }
    let err = io::Error::from_raw_os_error(-code);
    match ext_ack_text(m) {
        Some(text) => bail!("{err}: {text}"),
        None => Err(err.into()),
    }
}

/// The kernel's extended-ACK error text, when it sent one.
fn ext_ack_text(m: &Message) -> Option<String> {
    if m.flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    // struct nlmsgerr: error code, then the offending message (only its header if capped).
    let orig_len = if m.flags & NLM_F_CAPPED != 0 {
        HDR_LEN
    } else {
        u32::from_ne_bytes(m.payload.get(4..8)?.try_into().ok()?) as usize
    };
    let tlvs = m.payload.get(align(4 + orig_len)..)?;
    attrs(tlvs)
        .find(|(ty, _)| *ty == NLMSGERR_ATTR_MSG)
        .map(|(_, d)| attr_string(d))
}

fn setsockopt_int(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: v is a valid c_int for the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_recv_timeout(fd: &OwnedFd, t: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: tv is a valid timeval for the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_padded_attributes_and_nests() {
        let mut m = MsgBuilder::new(16, NLM_F_CREATE);
        m.header(&[1, 2, 3]).attr_str(3, "eth0").nested(4, |m| {
            m.attr_u8(1, 7);
        });
        let b = m.finish(42);
        // header 16 + family header 3→4 + "eth0\0" attr 9→12 + nest (4 + 5→8) = 44
        assert_eq!(b.len(), 44);
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), 44);
        assert_eq!(u16::from_ne_bytes(b[4..6].try_into().unwrap()), 16);
        assert_eq!(
            u16::from_ne_bytes(b[6..8].try_into().unwrap()),
            NLM_F_CREATE | NLM_F_REQUEST
        );
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 42);
        assert_eq!(&b[16..20], &[1, 2, 3, 0]);
        // attr: len 9, type 3, "eth0\0", 3 pad bytes
        assert_eq!(&b[20..24], &[9, 0, 3, 0]);
        assert_eq!(&b[24..32], b"eth0\0\0\0\0");
        // nest: len 12, type 4 | NLA_F_NESTED, inner attr len 5 type 1 value 7
        assert_eq!(&b[32..36], &[12, 0, 4, 0x80]);
        assert_eq!(&b[36..44], &[5, 0, 1, 0, 7, 0, 0, 0]);

        let parsed = parse_messages(&b).unwrap();
        assert_eq!(parsed.len(), 1);
        let a: Vec<_> = attrs(&parsed[0].payload[4..]).collect();
        assert_eq!(a[0].0, 3);
        assert_eq!(attr_string(a[0].1), "eth0");
        assert_eq!(a[1].0, 4, "nested flag is masked off");
        let inner: Vec<_> = attrs(a[1].1).collect();
        assert_eq!(inner, vec![(1u16, &[7u8][..])]);
    }

    #[test]
    fn rejects_truncated_messages() {
        let b = MsgBuilder::new(16, 0).finish(1);
        assert!(parse_messages(&b[..15]).unwrap().is_empty());
        let mut bad = b.clone();
        bad[0] = 200;
        assert!(parse_messages(&bad).is_err());
    }

    #[test]
    fn error_messages_carry_errno_and_text() {
        // nlmsgerr { error: -EEXIST, capped header }, then NLMSGERR_ATTR_MSG "File exists!".
        let mut payload = (-libc::EEXIST).to_ne_bytes().to_vec();
        payload.extend_from_slice(&[0u8; HDR_LEN]);
        payload.extend_from_slice(&[17, 0, 1, 0]);
        payload.extend_from_slice(b"it is there\0\0\0\0\0");
        let m = Message {
            ty: NLMSG_ERROR,
            flags: NLM_F_CAPPED | NLM_F_ACK_TLVS,
            seq: 1,
            payload,
        };
        let e = format!("{:#}", check_error(&m).unwrap_err());
        assert!(
            e.contains("File exists") && e.contains("it is there"),
            "{e}"
        );
        let ack = Message {
            ty: NLMSG_ERROR,
            flags: 0,
            seq: 1,
            payload: vec![0; 20],
        };
        check_error(&ack).unwrap();
    }
}
