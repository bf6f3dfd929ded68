//! The PXE interface: its index, MAC and MTU, bringing it up and giving it the appliance
//! address (by ioctl and one rtnetlink message: the appliance has no `ip` binary).

use std::io;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context, Result};

use crate::config::Ipv4Cidr;

/// `struct ifreq`: a name and a 24-byte union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

/// What the services need to know about the PXE interface.
#[derive(Clone, Debug)]
pub struct Iface {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
}

impl IfReq {
    fn new(name: &str) -> Result<IfReq> {
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', '\0']) {
            bail!("{name:?} is not a valid interface name");
        }
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(r)
    }
}

fn ioctl(sock: &UdpSocket, req: libc::c_ulong, r: &mut IfReq) -> io::Result<()> {
    // SAFETY: `r` is a properly sized ifreq for these SIOC* requests.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), req, r as *mut IfReq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn control_socket() -> Result<UdpSocket> {
    UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("opening a control socket")
}

impl Iface {
    pub fn lookup(name: &str) -> Result<Iface> {
        let sock = control_socket()?;
        let mut r = IfReq::new(name)?;
        ioctl(&sock, libc::SIOCGIFHWADDR, &mut r)
            .with_context(|| format!("interface {name} not found"))?;
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&r.data[2..8]);
        let mut r = IfReq::new(name)?;
        ioctl(&sock, libc::SIOCGIFMTU, &mut r)
            .with_context(|| format!("reading the MTU of {name}"))?;
        let mtu = u32::from_ne_bytes([r.data[0], r.data[1], r.data[2], r.data[3]]);
        let cname = std::ffi::CString::new(name)?;
        // SAFETY: a valid NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if index == 0 {
            bail!("interface {name} not found");
        }
        Ok(Iface {
            name: name.to_string(),
            index,
            mac,
            mtu,
        })
    }

    /// Set the interface up if it is not.
    pub fn ensure_up(&self) -> Result<bool> {
        let sock = control_socket()?;
        let mut r = IfReq::new(&self.name)?;
        ioctl(&sock, libc::SIOCGIFFLAGS, &mut r)
            .with_context(|| format!("reading the flags of {}", self.name))?;
        let flags = i16::from_ne_bytes([r.data[0], r.data[1]]);
        if flags & libc::IFF_UP as i16 != 0 {
            return Ok(false);
        }
        let up = (flags | libc::IFF_UP as i16).to_ne_bytes();
        r.data[..2].copy_from_slice(&up);
        ioctl(&sock, libc::SIOCSIFFLAGS, &mut r)
            .with_context(|| format!("setting {} up", self.name))?;
        Ok(true)
    }

    /// The IPv4 addresses on this interface.
    pub fn ipv4_addrs(&self) -> Result<Vec<Ipv4Addr>> {
        let mut out = Vec::new();
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs fills `head` with a list we free below.
        if unsafe { libc::getifaddrs(&mut head) } != 0 {
            return Err(io::Error::last_os_error()).context("listing interface addresses");
        }
        let mut p = head;
        while !p.is_null() {
            // SAFETY: `p` walks the list getifaddrs returned; entries are valid until freed.
            let ifa = unsafe { &*p };
            // SAFETY: ifa_name is a NUL-terminated string.
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
            if !ifa.ifa_addr.is_null() && name.to_bytes() == self.name.as_bytes() {
                // SAFETY: ifa_addr is non-null; its family says how to read it.
                let family = unsafe { (*ifa.ifa_addr).sa_family };
                if i32::from(family) == libc::AF_INET {
                    // SAFETY: an AF_INET address is a sockaddr_in.
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
                }
            }
            p = ifa.ifa_next;
        }
        // SAFETY: `head` came from getifaddrs.
        unsafe { libc::freeifaddrs(head) };
        Ok(out)
    }

    /// Give the interface `cidr` unless it already has that address. Returns whether it added it.
    pub fn ensure_address(&self, cidr: Ipv4Cidr) -> Result<bool> {
        if self.ipv4_addrs()?.contains(&cidr.addr) {
            return Ok(false);
        }
        add_address(self.index, cidr).with_context(|| format!("adding {cidr} to {}", self.name))?;
        Ok(true)
    }

    pub fn mac_string(&self) -> String {
        let m = self.mac;
        format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// One RTM_NEWADDR request (NLM_F_CREATE | NLM_F_EXCL) and its acknowledgement.
fn add_address(index: u32, cidr: Ipv4Cidr) -> Result<()> {
    const NLMSG_HDR: usize = 16;
    const IFADDRMSG: usize = 8;
    const IFA_ADDRESS: u16 = 1;
    const IFA_LOCAL: u16 = 2;
    const IFA_BROADCAST: u16 = 4;
    const RTA_LEN_V4: u16 = 8;
    let mut msg = Vec::with_capacity(64);
    let total = (NLMSG_HDR + IFADDRMSG + 3 * usize::from(RTA_LEN_V4)) as u32;
    msg.extend_from_slice(&total.to_ne_bytes());
    msg.extend_from_slice(&libc::RTM_NEWADDR.to_ne_bytes());
    let flags =
        (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    msg.extend_from_slice(&[libc::AF_INET as u8, cidr.prefix, 0, libc::RT_SCOPE_UNIVERSE]);
    msg.extend_from_slice(&index.to_ne_bytes());
    for (kind, addr) in [
        (IFA_LOCAL, cidr.addr),
        (IFA_ADDRESS, cidr.addr),
        (IFA_BROADCAST, cidr.broadcast()),
    ] {
        msg.extend_from_slice(&RTA_LEN_V4.to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&addr.octets());
    }
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("opening a netlink socket");
    }
    // SAFETY: fd is a fresh, valid descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: msg is a valid buffer of msg.len() bytes; the kernel is the default peer.
    let sent = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error()).context("sending RTM_NEWADDR");
    }
    let mut buf = [0u8; 1024];
    // SAFETY: buf is writable for its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error()).context("reading the netlink answer");
    }
    let n = n as usize;
    if n < NLMSG_HDR + 4 {
        bail!("short netlink answer ({n} bytes)");
    }
    let kind = u16::from_ne_bytes([buf[4], buf[5]]);
    if i32::from(kind) != libc::NLMSG_ERROR {
        bail!("unexpected netlink answer type {kind}");
    }
    let errno = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
    match -errno {
        0 | libc::EEXIST => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)).context("the kernel refused the address"),
    }
}
