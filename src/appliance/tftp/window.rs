//! DATA packets a window at a time. The blocks are read with one `pread` into one
//! buffer (their headers kept apart) and sent with one `sendmsg` that the kernel cuts
//! into datagrams (UDP GSO), or one `sendmmsg` where GSO is not available: on a fast
//! link the per-packet system calls and trips through the stack are what limit TFTP.
//! The buffer remembers which blocks it holds, so the next window can be read while
//! the client is still acknowledging this one ([`Window::prefetch`]).

use std::io;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;

use super::packet;
use super::transfer::Source;

/// DATA opcode and block number.
const HEADER: usize = 4;
/// Most bytes read ahead for one window; larger windows go out in several batches.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// Linux's limits for one GSO send: 64 segments (UDP_MAX_SEGMENTS before 6.9) whose
/// payloads fit one IPv4 datagram.
const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 65_507;
/// `<linux/udp.h>`: the socket option that sets the GSO segment size.
const UDP_SEGMENT: libc::c_int = 103;

/// Blocks the buffer holds: the first's absolute number, how many, the bytes read.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Held {
    first: u64,
    count: usize,
    got: usize,
}

pub struct Window {
    blksize: usize,
    headers: Vec<[u8; HEADER]>,
    data: Vec<u8>,
    held: Option<Held>,
    /// Reused for every send, so a window costs no allocation.
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    /// Datagrams per GSO send; 0 once GSO is off (unsupported, or refused by the path).
    gso_segments: usize,
}

impl Window {
    /// Buffers for windows of `window` blocks of `blksize` bytes sent on `sock`, which
    /// gets its GSO segment size set when `gso` and a window has more than one block.
    pub fn new(sock: &UdpSocket, window: u64, blksize: u64, gso: bool) -> Window {
        let blksize = blksize as usize;
        let slots = (window as usize).clamp(1, (MAX_BATCH_BYTES / blksize).max(1));
        let segments = GSO_MAX_SEGMENTS.min(GSO_MAX_BYTES / (HEADER + blksize));
        let gso_segments =
            if gso && slots > 1 && segments > 1 && set_gso_size(sock, HEADER + blksize).is_ok() {
                segments
            } else {
                0
            };
        Window {
            blksize,
            headers: vec![[0; HEADER]; slots],
            data: vec![0; slots * blksize],
            held: None,
            iov: Vec::with_capacity(2 * slots),
            msgs: Vec::with_capacity(slots),
            gso_segments,
        }
    }

    fn slots(&self) -> usize {
        self.headers.len()
    }

    /// Whether sends go out as GSO batches.
    #[cfg(test)]
    fn gso(&self) -> bool {
        self.gso_segments > 0
    }

    /// Have blocks `first..first + count` in the buffer (`count` ≤ slots), reading them
    /// unless they are there already.
    fn load(&mut self, src: &Source, first: u64, count: usize) -> io::Result<()> {
        if matches!(self.held, Some(h) if h.first == first && h.count == count) {
            return Ok(());
        }
        // Invalid until the read succeeded.
        self.held = None;
        let got = src.read_at(
            (first - 1) * self.blksize as u64,
            &mut self.data[..count * self.blksize],
        )?;
        for (i, h) in self.headers[..count].iter_mut().enumerate() {
            h[..2].copy_from_slice(&packet::DATA.to_be_bytes());
            h[2..].copy_from_slice(&((first + i as u64) as u16).to_be_bytes());
        }
        self.held = Some(Held { first, count, got });
        Ok(())
    }

    /// Read blocks `first..=hi` (as much as one batch holds) ahead of their [`send`].
    ///
    /// [`send`]: Window::send
    pub fn prefetch(&mut self, src: &Source, first: u64, hi: u64) -> io::Result<()> {
        if first > hi {
            return Ok(());
        }
        let count = ((hi - first + 1) as usize).min(self.slots());
        self.load(src, first, count)
    }

    /// Send blocks `first..=hi`.
    pub fn send(&mut self, sock: &UdpSocket, src: &Source, first: u64, hi: u64) -> io::Result<()> {
        let mut block = first;
        while block <= hi {
            let count = ((hi - block + 1) as usize).min(self.slots());
            self.load(src, block, count)?;
            self.transmit(sock)?;
            block += count as u64;
        }
        Ok(())
    }

    /// Send the blocks held.
    fn transmit(&mut self, sock: &UdpSocket) -> io::Result<()> {
        let Some(Held { count, got, .. }) = self.held else {
            return Ok(());
        };
        let blksize = self.blksize;
        self.iov.clear();
        for i in 0..count {
            let start = i * blksize;
            let end = (start + blksize).min(got).max(start);
            self.iov.push(libc::iovec {
                iov_base: self.headers[i].as_mut_ptr().cast(),
                iov_len: HEADER,
            });
            self.iov.push(libc::iovec {
                iov_base: self.data[start..].as_mut_ptr().cast(),
                iov_len: end - start,
            });
        }
        // GSO cuts at every `HEADER + blksize` bytes: only the last block may be short.
        let mut sent = 0;
        if self.gso_segments > 0 && count > 1 && got >= (count - 1) * blksize {
            while sent < count {
                let n = (count - sent).min(self.gso_segments);
                match send_iov(sock, &mut self.iov[2 * sent..2 * (sent + n)]) {
                    Ok(()) => sent += n,
                    // EIO: the device cannot checksum (no GSO); EMSGSIZE or EINVAL: the
                    // datagrams do not fit the route's MTU unfragmented. sendmmsg does both.
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EIO | libc::EINVAL | libc::EMSGSIZE)
                        ) =>
                    {
                        self.gso_segments = 0;
                        let _ = set_gso_size(sock, 0);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        if sent < count {
            send_each(sock, &mut self.iov[2 * sent..], &mut self.msgs)?;
        }
        Ok(())
    }
}

/// Set (or with 0 clear) the socket's GSO segment size: a send longer than that goes
/// out as datagrams of that size, the last one shorter.
fn set_gso_size(sock: &UdpSocket, size: usize) -> io::Result<()> {
    let size = size as libc::c_int;
    // SAFETY: a valid fd and a c_int option value of the given size.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            UDP_SEGMENT,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One `sendmsg` of all of `iov` (the socket is connected).
fn send_iov(sock: &UdpSocket, iov: &mut [libc::iovec]) -> io::Result<()> {
    // SAFETY: msghdr is plain old data; zero is a valid value (no address, no control).
    let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
    m.msg_iov = iov.as_mut_ptr();
    m.msg_iovlen = iov.len();
    loop {
        // SAFETY: the iovecs point at live buffers.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &m, 0) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `sendmmsg` of (header, payload) iovec pairs, one datagram per pair, until all went.
fn send_each(
    sock: &UdpSocket,
    iov: &mut [libc::iovec],
    msgs: &mut Vec<libc::mmsghdr>,
) -> io::Result<()> {
    msgs.clear();
    for pair in iov.chunks_mut(2) {
        // SAFETY: mmsghdr is plain old data; zero is a valid value (no address, no control).
        let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
        m.msg_hdr.msg_iov = pair.as_mut_ptr();
        m.msg_hdr.msg_iovlen = pair.len();
        msgs.push(m);
    }
    let mut sent = 0;
    while sent < msgs.len() {
        let rest = &mut msgs[sent..];
        // SAFETY: every mmsghdr points at iovecs over live buffers; the socket is connected.
        let n =
            unsafe { libc::sendmmsg(sock.as_raw_fd(), rest.as_mut_ptr(), rest.len() as u32, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A connected pair on loopback; the receiver's buffer holds a 64-block window.
    fn pair() -> (UdpSocket, UdpSocket) {
        let rx = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        rx.set_recv_buffer_size(1 << 20).unwrap();
        rx.bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        let rx: UdpSocket = rx.into();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        (tx, rx)
    }

    /// Deterministic noise, so every block differs from its neighbours.
    fn noise(len: usize) -> Vec<u8> {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// The next `n` datagrams, then check that no more came.
    fn recv(rx: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; 70_000];
        let got = (0..n)
            .map(|_| {
                let k = rx.recv(&mut buf).expect("a datagram");
                buf[..k].to_vec()
            })
            .collect();
        rx.set_nonblocking(true).unwrap();
        assert!(rx.recv(&mut buf).is_err(), "more datagrams than blocks");
        rx.set_nonblocking(false).unwrap();
        got
    }

    /// DATA packet of block `n` (1-based) of `file` in `blksize` blocks, laid out from
    /// RFC 1350: opcode 3, the block number modulo 2^16, up to `blksize` bytes.
    fn expected(file: &[u8], blksize: usize, n: u64) -> Vec<u8> {
        let start = ((n - 1) as usize * blksize).min(file.len());
        let end = (start + blksize).min(file.len());
        let mut p = vec![0, 3, (n >> 8) as u8, n as u8];
        p.extend_from_slice(&file[start..end]);
        p
    }

    fn check(got: &[Vec<u8>], file: &[u8], blksize: usize, first: u64) {
        for (i, p) in got.iter().enumerate() {
            let n = first + i as u64;
            assert!(*p == expected(file, blksize, n), "block {n} differs");
        }
    }

    #[test]
    fn windows_go_out_as_exact_datagrams_with_and_without_gso() {
        // 20 full blocks and a short one; a file that ends on a block boundary has an
        // empty last block (block 21 of 20 × 1468).
        for (len, last) in [(20 * 1468 + 700, 21), (20 * 1468, 21)] {
            let file = noise(len);
            let src = Source::Memory(file.clone());
            for gso in [true, false] {
                let (tx, rx) = pair();
                let mut w = Window::new(&tx, 8, 1468, gso);
                assert_eq!(w.gso(), gso, "loopback does GSO");
                w.send(&tx, &src, 1, 8).unwrap();
                check(&recv(&rx, 8), &file, 1468, 1);
                w.send(&tx, &src, 9, 16).unwrap();
                check(&recv(&rx, 8), &file, 1468, 9);
                w.send(&tx, &src, 17, last).unwrap();
                let tail = recv(&rx, 5);
                check(&tail, &file, 1468, 17);
                assert_eq!(tail[4].len(), 4 + len % 1468, "gso {gso}");
            }
        }
    }

    #[test]
    fn a_prefetched_window_is_sent_only_when_it_is_the_one_asked_for() {
        let file = noise(100 * 512);
        let src = Source::Memory(file.clone());
        let (tx, rx) = pair();
        let mut w = Window::new(&tx, 8, 512, true);
        w.send(&tx, &src, 1, 8).unwrap();
        check(&recv(&rx, 8), &file, 512, 1);
        // Read 9..=16 ahead; a short ACK of 5 asks for 6..=13 instead.
        w.prefetch(&src, 9, 16).unwrap();
        w.send(&tx, &src, 6, 13).unwrap();
        check(&recv(&rx, 8), &file, 512, 6);
        // Read 14..=21 ahead; a timeout sends 6..=13 again.
        w.prefetch(&src, 14, 21).unwrap();
        w.send(&tx, &src, 6, 13).unwrap();
        check(&recv(&rx, 8), &file, 512, 6);
        // The full ACK: the prefetched window, and the same again after a timeout.
        w.prefetch(&src, 14, 21).unwrap();
        w.send(&tx, &src, 14, 21).unwrap();
        w.send(&tx, &src, 14, 21).unwrap();
        let got = recv(&rx, 16);
        check(&got[..8], &file, 512, 14);
        check(&got[8..], &file, 512, 14);
        // Read ahead of a last window shorter than the window; nothing past the end.
        w.prefetch(&src, 97, 101).unwrap();
        w.prefetch(&src, 102, 101).unwrap();
        w.send(&tx, &src, 97, 101).unwrap();
        let got = recv(&rx, 5);
        check(&got, &file, 512, 97);
        assert_eq!(got[4].len(), 4, "an empty last block ends the file");
    }

    #[test]
    fn large_windows_are_cut_into_gso_sends_and_batches_and_numbers_roll_over() {
        // 64 × 1472-byte datagrams exceed one GSO send (44 fit in 64 KiB).
        let file = noise(64 * 1468 * 2);
        let src = Source::Memory(file.clone());
        let (tx, rx) = pair();
        let mut w = Window::new(&tx, 64, 1468, true);
        w.send(&tx, &src, 65, 128).unwrap();
        check(&recv(&rx, 64), &file, 1468, 65);
        // 8-byte blocks past block 65535: 64 segments per GSO send.
        let file = noise(70_000 * 8);
        let src = Source::Memory(file.clone());
        let mut w = Window::new(&tx, 64, 8, true);
        w.send(&tx, &src, 65_500, 65_563).unwrap();
        let got = recv(&rx, 64);
        check(&got, &file, 8, 65_500);
        assert_eq!(&got[36][..4], &[0, 3, 0, 0], "block 65536 is 0 on the wire");
        // Blocks too big for 1 MiB of window go in batches.
        let file = noise(40 * 60_000);
        let src = Source::Memory(file.clone());
        let (tx, rx) = pair();
        let mut w = Window::new(&tx, 32, 60_000, true);
        assert_eq!(w.slots(), 17);
        w.send(&tx, &src, 1, 10).unwrap();
        check(&recv(&rx, 10), &file, 60_000, 1);
    }
}
