//! The DHCP client's `AF_PACKET` socket, and the randomness its transaction IDs need.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{Context, Result};

const ETH_P_IP: u16 = 0x0800;

/// A random number for transaction IDs and jitter. PID 1 asks early in boot, before the
/// kernel's CRNG may be ready: GRND_INSECURE never blocks (Linux 5.6+), and DHCP needs no
/// cryptographic quality.
pub fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: b is valid for 4 bytes; getrandom only writes into it.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_INSECURE) };
    if n != 4 {
        // Older kernels refuse the flag; a time-derived value still varies per request.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        return t ^ std::process::id().rotate_left(16);
    }
    u32::from_ne_bytes(b)
}

/// An `AF_PACKET` datagram socket on one interface that only passes UDP to port 68.
pub struct PacketSocket {
    fd: OwnedFd,
    index: u32,
}

/// Classic BPF over the IPv4 header: UDP, not a fragment, destination port 68.
const FILTER: [(u16, u8, u8, u32); 9] = [
    (0x30, 0, 0, 9),      // ldb [9]            protocol
    (0x15, 0, 6, 17),     // jeq #17 else drop
    (0x28, 0, 0, 6),      // ldh [6]            flags + fragment offset
    (0x45, 4, 0, 0x1fff), // jset #0x1fff → drop
    (0xb1, 0, 0, 0),      // ldxb 4*([0]&0xf)   header length
    (0x48, 0, 0, 2),      // ldh [x+2]          destination port
    (0x15, 0, 1, 68),     // jeq #68 else drop
    (0x06, 0, 0, 0xffff), // ret: accept
    (0x06, 0, 0, 0),      // ret: drop
];

impl PacketSocket {
    pub fn open(index: u32) -> Result<PacketSocket> {
        // Protocol 0 receives nothing until bind, so the filter is in place first.
        // SAFETY: plain socket(2); the fd is owned right away.
        let raw =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error()).context("socket(AF_PACKET)");
        }
        // SAFETY: raw is a fresh fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut code: Vec<libc::sock_filter> = FILTER
            .iter()
            .map(|&(code, jt, jf, k)| libc::sock_filter { code, jt, jf, k })
            .collect();
        let prog = libc::sock_fprog {
            len: code.len() as u16,
            filter: code.as_mut_ptr(),
        };
        // SAFETY: prog points at `code`, alive for the call.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&prog as *const libc::sock_fprog).cast(),
                std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("attaching the DHCP socket filter");
        }
        let sa = sockaddr_ll(index, [0; 6]);
        // SAFETY: sa is a valid sockaddr_ll of the size passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("binding the packet socket");
        }
        Ok(PacketSocket { fd, index })
    }

    pub fn send(&self, dst_mac: [u8; 6], packet: &[u8]) -> io::Result<()> {
        let sa = sockaddr_ll(self.index, dst_mac);
        // SAFETY: packet and sa are valid for the lengths passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// One IPv4 packet and the sender's MAC, or `None` after `timeout`.
    pub fn recv(&self, timeout: Duration) -> io::Result<Option<(Vec<u8>, [u8; 6])>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is one valid pollfd.
        let n = unsafe {
            libc::poll(
                &mut pfd,
                1,
                timeout.as_millis().min(i32::MAX as u128) as i32,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if n == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; 2048];
        // SAFETY: sockaddr_ll is plain data, filled by recvfrom.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut sa_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: buf, sa and sa_len are valid for the sizes given.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                (&mut sa as *mut libc::sockaddr_ll).cast(),
                &mut sa_len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock
                || e.kind() == io::ErrorKind::Interrupted
            {
                Ok(None)
            } else {
                Err(e)
            };
        }
        buf.truncate(n as usize);
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&sa.sll_addr[..6]);
        Ok(Some((buf, mac)))
    }
}

fn sockaddr_ll(index: u32, mac: [u8; 6]) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain data.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = ETH_P_IP.to_be();
    sa.sll_ifindex = index as i32;
    sa.sll_halen = 6;
    sa.sll_addr[..6].copy_from_slice(&mac);
    sa
}
