//! A DNS forwarder on the PXE address: queries from the node go, unchanged, to the
//! uplink's DNS servers (in order, until one answers), over UDP or TCP as they came.
//! With no upstream, or none answering, the node gets SERVFAIL at once instead of
//! waiting out its own timeouts. It binds the PXE address only, never the uplink.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// How long one upstream gets to answer before the next is tried.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Queries relayed at once; beyond that the node gets SERVFAIL.
const MAX_IN_FLIGHT: usize = 64;
/// TCP connections served at once, and how long an idle one stays open.
const MAX_TCP: usize = 16;
const TCP_IDLE: Duration = Duration::from_secs(10);
/// How often the serving loops look at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(200);
const HEADER_LEN: usize = 12;
const RCODE_SERVFAIL: u8 = 2;
const MAX_MESSAGE: usize = 65535;

/// A running forwarder.
pub struct DnsHandle {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl DnsHandle {
    /// The address it listens on (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stop listening (queries already being relayed finish on their own).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Listen on `bind` (UDP and TCP; port 0 picks one) and relay to `upstreams`, read
/// afresh for every query so DHCP lease changes apply at once.
pub fn start(bind: SocketAddr, upstreams: Arc<RwLock<Vec<SocketAddr>>>) -> Result<DnsHandle> {
    let udp = UdpSocket::bind(bind).with_context(|| format!("binding DNS (UDP) on {bind}"))?;
    let local = udp.local_addr()?;
    let tcp = TcpListener::bind(local).with_context(|| format!("binding DNS (TCP) on {local}"))?;
    udp.set_read_timeout(Some(STOP_POLL))?;
    let stop = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let udp_thread = {
        let (stop, ups, in_flight) = (stop.clone(), upstreams.clone(), in_flight.clone());
        std::thread::Builder::new()
            .name("dns-udp".into())
            .spawn(move || serve_udp(udp, local, ups, stop, in_flight))?
    };
    let tcp_thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("dns-tcp".into())
            .spawn(move || serve_tcp(tcp, local, upstreams, stop))?
    };
    Ok(DnsHandle {
        local,
        stop,
        threads: vec![udp_thread, tcp_thread],
    })
}

/// Upstream servers from a resolv.conf (`nameserver` lines), for `serve` on a host.
pub fn upstreams_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "nameserver").then_some(())?;
            // Scoped IPv6 (fe80::1%eth0) cannot be parsed into an IpAddr: skip it.
            let ip: IpAddr = w.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

/// Decrements the in-flight count when a relay thread ends, however it ends.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn serve_udp(
    sock: UdpSocket,
    local: SocketAddr,
    upstreams: Arc<RwLock<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
) {
    let sock = Arc::new(sock);
    let mut buf = vec![0u8; MAX_MESSAGE];
    while !stop.load(Ordering::Relaxed) {
        let (n, client) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(_) => continue, // timeout (stop check) or a transient error
        };
        let query = buf[..n].to_vec();
        if !is_query(&query) {
            continue;
        }
        if in_flight.fetch_add(1, Ordering::Relaxed) >= MAX_IN_FLIGHT {
            in_flight.fetch_sub(1, Ordering::Relaxed);
            if let Some(r) = servfail(&query) {
                let _ = sock.send_to(&r, client);
            }
            continue;
        }
        let guard = InFlight(in_flight.clone());
        let (sock, ups) = (sock.clone(), upstreams.clone());
        // If no thread can be started the closure, guard included, is dropped: the
        // query goes unanswered and the count stays right.
        let _ = std::thread::Builder::new()
            .name("dns-relay".into())
            .spawn(move || {
                let _guard = guard;
                let answer = relay(&query, &servers(&ups, local), ask_udp);
                if let Some(a) = answer {
                    let _ = sock.send_to(&a, client);
                }
            });
    }
}

fn serve_tcp(
    listener: TcpListener,
    local: SocketAddr,
    upstreams: Arc<RwLock<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
) {
    let open = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        if !readable(&listener, STOP_POLL) {
            continue;
        }
        let Ok((conn, _)) = listener.accept() else {
            continue;
        };
        if open.fetch_add(1, Ordering::Relaxed) >= MAX_TCP {
            open.fetch_sub(1, Ordering::Relaxed);
            continue; // dropping the stream closes it
        }
        let guard = InFlight(open.clone());
        let ups = upstreams.clone();
        let _ = std::thread::Builder::new()
            .name("dns-tcp-conn".into())
            .spawn(move || {
                let _guard = guard;
                let _ = serve_tcp_conn(conn, local, &ups);
            });
    }
}

/// Answer length-prefixed queries on one connection until it closes or idles.
fn serve_tcp_conn(
    mut conn: TcpStream,
    local: SocketAddr,
    upstreams: &RwLock<Vec<SocketAddr>>,
) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(TCP_IDLE))?;
    conn.set_write_timeout(Some(TCP_IDLE))?;
    loop {
        let query = read_framed(&mut conn)?;
        if !is_query(&query) {
            return Ok(());
        }
        let Some(answer) = relay(&query, &servers(upstreams, local), ask_tcp) else {
            return Ok(());
        };
        write_framed(&mut conn, &answer)?;
    }
}

/// The upstream list now, without ourselves (a misconfiguration would loop).
fn servers(upstreams: &RwLock<Vec<SocketAddr>>, local: SocketAddr) -> Vec<SocketAddr> {
    let list = upstreams
        .read()
        .map(|u| u.clone())
        .unwrap_or_else(|p| p.into_inner().clone());
    list.into_iter().filter(|s| *s != local).collect()
}

/// Ask each server in turn; SERVFAIL when none answers. `None` only for a query too
/// malformed to answer.
fn relay(
    query: &[u8],
    servers: &[SocketAddr],
    ask: fn(SocketAddr, &[u8]) -> std::io::Result<Vec<u8>>,
) -> Option<Vec<u8>> {
    for s in servers {
        if let Ok(a) = ask(*s, query) {
            return Some(a);
        }
    }
    servfail(query)
}

fn ask_udp(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let any: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    // A fresh socket (random source port) per query, connected so that only the
    // server's datagrams arrive.
    let sock = UdpSocket::bind(any)?;
    sock.connect(server)?;
    sock.send(query)?;
    let deadline = Instant::now() + UPSTREAM_TIMEOUT;
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        sock.set_read_timeout(Some(left))?;
        let n = sock.recv(&mut buf)?;
        if answers(query, &buf[..n]) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

fn ask_tcp(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut conn = TcpStream::connect_timeout(&server, UPSTREAM_TIMEOUT)?;
    conn.set_read_timeout(Some(UPSTREAM_TIMEOUT))?;
    conn.set_write_timeout(Some(UPSTREAM_TIMEOUT))?;
    write_framed(&mut conn, query)?;
    let answer = read_framed(&mut conn)?;
    if answers(query, &answer) {
        Ok(answer)
    } else {
        Err(std::io::ErrorKind::InvalidData.into())
    }
}

fn read_framed(conn: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    conn.read_exact(&mut len)?;
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    conn.read_exact(&mut msg)?;
    Ok(msg)
}

fn write_framed(conn: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| std::io::ErrorKind::InvalidData)?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    conn.write_all(&out)
}

/// A DNS message with the QR bit clear.
fn is_query(m: &[u8]) -> bool {
    m.len() >= HEADER_LEN && m[2] & 0x80 == 0
}

/// A response (QR set) with the query's ID.
fn answers(query: &[u8], answer: &[u8]) -> bool {
    answer.len() >= HEADER_LEN && answer[..2] == query[..2] && answer[2] & 0x80 != 0
}

/// SERVFAIL for `query`: its ID, opcode, RD bit and (single) question.
pub fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < HEADER_LEN {
        return None;
    }
    let mut r = query[..HEADER_LEN].to_vec();
    r[2] = 0x80 | (query[2] & 0x79); // QR, same opcode and RD; AA and TC clear
    r[3] = 0x80 | RCODE_SERVFAIL; // RA
    r[4..12].fill(0);
    let qdcount = u16::from_be_bytes([query[4], query[5]]);
    if qdcount == 1 {
        if let Some(end) = question_end(query) {
            r[5] = 1;
            r.extend_from_slice(&query[HEADER_LEN..end]);
        }
    }
    Some(r)
}

/// End of the first question (name, type, class), if it is well formed.
fn question_end(m: &[u8]) -> Option<usize> {
    let mut i = HEADER_LEN;
    loop {
        let len = *m.get(i)? as usize;
        match len {
            0 => {
                i += 1;
                break;
            }
            l if l & 0xc0 == 0xc0 => {
                i += 2;
                break;
            }
            l if l < 64 => i += 1 + l,
            _ => return None,
        }
    }
    let end = i + 4;
    (end <= m.len()).then_some(end)
}

/// Wait until a listener has a connection to accept.
fn readable(l: &TcpListener, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: pfd is one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) > 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `example.com. A IN`, ID 0xbeef, RD.
    fn query() -> Vec<u8> {
        let mut q = vec![0xbe, 0xef, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x07example\x03com\x00");
        q.extend_from_slice(&[0, 1, 0, 1]);
        q
    }

    #[test]
    fn servfail_echoes_id_and_question() {
        let q = query();
        let r = servfail(&q).unwrap();
        assert_eq!(
            &r[..12],
            &[0xbe, 0xef, 0x81, 0x82, 0, 1, 0, 0, 0, 0, 0, 0],
            "QR+RD, RA+SERVFAIL, one question"
        );
        assert_eq!(&r[12..], &q[12..]);
        // With an additional (EDNS) record in the query, only the question is echoed.
        let mut with_opt = q.clone();
        with_opt[11] = 1;
        with_opt.extend_from_slice(&[0, 0, 41, 16, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(servfail(&with_opt).unwrap(), r);
        // A truncated question: header only, QDCOUNT 0.
        let r = servfail(&q[..20]).unwrap();
        assert_eq!(r.len(), 12);
        assert_eq!(&r[4..6], &[0, 0]);
        assert_eq!(servfail(&q[..5]), None);
    }

    #[test]
    fn responses_must_match_the_query() {
        let q = query();
        let mut a = servfail(&q).unwrap();
        assert!(answers(&q, &a));
        a[1] ^= 1;
        assert!(!answers(&q, &a));
        assert!(!answers(&q, &q), "a query is not an answer");
        assert!(is_query(&q) && !is_query(&servfail(&q).unwrap()));
    }

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# comment\nsearch lan\nnameserver 127.0.0.53\nnameserver  2001:db8::1\n\
                    nameserver fe80::1%eth0\noptions edns0\n";
        assert_eq!(
            upstreams_from_resolv_conf(text),
            vec![
                "127.0.0.53:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::1]:53".parse().unwrap()
            ]
        );
    }
}
