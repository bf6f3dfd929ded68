//! The HTTP server: the rendered `nginx.conf` as code. Port 80 of the appliance address;
//! `/boot.ipxe`, `/talos/…`, `/<ipxe.efi>` (from the TFTP root, for UEFI HTTP boot) and
//! `/configs/…` (the pinned node only); everything else 404, no listings, no `..`.
//! GET and HEAD, one byte range, keep-alive, bodies by `sendfile`. A thread per
//! connection: a PXE link has a handful of clients, and blocking I/O keeps it simple.

pub mod request;

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::appliance::bootonce::BootOnce;
use crate::appliance::events::{Event, EventLog};
use crate::appliance::served::{ServedFile, ServedTree};
use crate::layout;
use crate::util::civil_from_days;
use request::{head_end, parse_range, Method, Range, Request, MAX_HEAD};

pub const PORT: u16 = 80;
const MAX_CONNECTIONS: usize = 128;
/// Time to send a whole request head once its first byte arrived (slow clients).
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle keep-alive connections close after this (nginx's `keepalive_timeout 65`).
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(65);
/// A client that stops reading for this long is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);
const ACCEPT_POLL_MS: i32 = 500;
/// How long, and how much, a closing connection drains what the client still sends.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_MAX_BYTES: usize = 1 << 20;
const THREAD_STACK: usize = 256 << 10;
/// The node's machine config: a complete 200 of it arms boot-once.
const CONFIG_PATH: &str = "configs/minipc.yaml";

/// What every connection needs.
pub struct Site {
    pub tree: Arc<ServedTree>,
    pub pinned_ip: Ipv4Addr,
    pub ipxe_efi: String,
    pub boot_once: Arc<BootOnce>,
    /// `/boot.ipxe` for the node once boot-once is armed.
    pub exit_script: Vec<u8>,
    pub events: EventLog,
}

pub struct HttpServer {
    listener: TcpListener,
    site: Arc<Site>,
    conns: Arc<AtomicUsize>,
}

/// nginx.conf's `types`: ipxe and yaml are text, the rest octets.
fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, e)| e) {
        Some("ipxe" | "yaml") => "text/plain",
        _ => "application/octet-stream",
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Internal Server Error",
    }
}

/// IMF-fixdate: `Wed, 17 Dec 2025 00:00:00 GMT`.
pub fn http_date(t: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let s = secs.rem_euclid(86_400);
    format!(
        "{}, {d:02} {} {y:04} {:02}:{:02}:{:02} GMT",
        DAYS[days.rem_euclid(7) as usize],
        MONTHS[m as usize - 1],
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

enum Body {
    Bytes(Vec<u8>),
    File(ServedFile, u64, u64),
}

struct Response {
    status: u16,
    content_type: &'static str,
    /// Length of the representation (for HEAD and Content-Range).
    len: u64,
    range: Option<(u64, u64)>,
    body: Body,
    extra: Option<String>,
}

impl Response {
    fn error(status: u16) -> Response {
        let text = format!("{status} {}\n", reason(status));
        Response {
            status,
            content_type: "text/plain",
            len: text.len() as u64,
            range: None,
            body: Body::Bytes(text.into_bytes()),
            extra: (status == 405).then(|| "Allow: GET, HEAD\r\n".to_string()),
        }
    }
}

impl HttpServer {
    pub fn bind(ip: Ipv4Addr, site: Site) -> Result<HttpServer> {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        let addr: SocketAddr = (ip, PORT).into();
        s.bind(&addr.into())
            .with_context(|| format!("binding TCP {addr}"))?;
        s.listen(128)?;
        Ok(HttpServer {
            listener: s.into(),
            site: Arc::new(site),
            conns: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub fn run(self, stop: Arc<AtomicBool>) {
        while !stop.load(Ordering::Relaxed) {
            let mut pfd = libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, ACCEPT_POLL_MS) } <= 0 {
                continue;
            }
            let Ok((stream, peer)) = self.listener.accept() else {
                continue;
            };
            if self.conns.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                self.conns.fetch_sub(1, Ordering::SeqCst);
                let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
                let _ = send(&stream, &Response::error(503), false, false);
                continue;
            }
            let site = self.site.clone();
            let conns = self.conns.clone();
            let spawned = std::thread::Builder::new()
                .name("http-conn".into())
                .stack_size(THREAD_STACK)
                .spawn(move || {
                    connection(&site, stream, peer);
                    conns.fetch_sub(1, Ordering::SeqCst);
                });
            if spawned.is_err() {
                self.conns.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

/// Read one request head into `buf` (which may already hold pipelined bytes). `Ok(None)`
/// when the client closed or idled out between requests.
fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Option<usize>, u16> {
    let mut chunk = [0u8; 4096];
    let mut deadline: Option<Instant> = None;
    loop {
        // Empty lines before a request line are ignored (RFC 9112 2.2), as nginx does.
        let blank = buf
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
        buf.drain(..blank);
        if let Some(end) = head_end(buf) {
            // The limit holds however the head arrived (all in one read, too).
            return if end > MAX_HEAD {
                Err(431)
            } else {
                Ok(Some(end))
            };
        }
        if buf.len() > MAX_HEAD {
            return Err(431);
        }
        let started = !buf.is_empty();
        if started && deadline.is_none() {
            deadline = Some(Instant::now() + HEAD_TIMEOUT);
        }
        let timeout = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => KEEPALIVE_TIMEOUT,
        };
        if timeout.is_zero() {
            return Err(408);
        }
        let _ = stream.set_read_timeout(Some(timeout));
        match stream.read(&mut chunk) {
            Ok(0) => return if started { Err(400) } else { Ok(None) },
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) if started => return Err(408),
            Err(_) => return Ok(None),
        }
    }
}

fn connection(site: &Site, mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(SEND_TIMEOUT));
    let mut buf = Vec::with_capacity(4096);
    loop {
        let end = match read_head(&mut stream, &mut buf) {
            Ok(Some(end)) => end,
            Ok(None) => return,
            Err(status) => {
                let _ = send(&stream, &Response::error(status), false, false);
                log(site, peer, "-", "-", status, 0, Duration::ZERO);
                return linger(stream);
            }
        };
        let started = Instant::now();
        let parsed = Request::parse(&buf[..end - 2]);
        buf.drain(..end);
        let req = match parsed {
            Ok(r) => r,
            Err(status) => {
                let _ = send(&stream, &Response::error(status), false, false);
                log(site, peer, "-", "-", status, 0, started.elapsed());
                return linger(stream);
            }
        };
        let resp = if req.has_body() {
            Response::error(400)
        } else {
            route(site, &req, peer.ip())
        };
        // After a malformed request, nothing that follows on the connection is trusted.
        let keep = req.keep_alive() && !matches!(resp.status, 400 | 405 | 431 | 500 | 505);
        let head_only = req.method == Method::Head;
        let (bytes, sent) = send(&stream, &resp, keep, head_only);
        let method = match req.method {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Other => "other",
        };
        let path = req.target.split('?').next().unwrap_or("").to_string();
        log(
            site,
            peer,
            method,
            &path,
            resp.status,
            bytes,
            started.elapsed(),
        );
        let complete = sent.is_ok() && bytes == body_len(&resp);
        if complete && !head_only && resp.status == 200 && req.path().as_deref() == Ok(CONFIG_PATH)
        {
            config_fetched(site, peer.ip(), bytes);
        }
        if sent.is_err() {
            return;
        }
        if !keep {
            return linger(stream);
        }
    }
}

/// Close after a response the client may still be sending into (an oversized head, a
/// body): half-close, then drain briefly, so the kernel does not answer the unread bytes
/// with a reset that destroys the response before the client reads it.
fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // LINGER in all: a client that keeps trickling bytes must not hold the thread.
    let deadline = Instant::now() + LINGER;
    let mut sink = [0u8; 16 * 1024];
    let mut left = LINGER_MAX_BYTES;
    while left > 0 {
        let rest = deadline.saturating_duration_since(Instant::now());
        if rest.is_zero() || stream.set_read_timeout(Some(rest)).is_err() {
            return;
        }
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

fn log(
    site: &Site,
    peer: SocketAddr,
    method: &str,
    path: &str,
    status: u16,
    bytes: u64,
    took: Duration,
) {
    let mut ev = Event::new("http")
        .ip(peer.ip())
        .field("method", method.to_string())
        .field("path", path.to_string())
        .field("status", status)
        .field("bytes", bytes)
        .field("ms", took.as_millis() as u64);
    if status == 403 {
        ev = ev
            .warning()
            .field("note", "machine configs go to the pinned node only");
    }
    if let Some(m) = site.events.mac_for(peer.ip()) {
        ev = ev.mac(m);
    }
    site.events.emit(ev);
}

fn config_fetched(site: &Site, ip: IpAddr, bytes: u64) {
    let mac = site.events.mac_for(ip);
    let with_mac = |mut ev: Event| {
        if let Some(m) = mac {
            ev = ev.mac(m);
        }
        ev.ip(ip)
    };
    site.events
        .emit(with_mac(Event::new("config-fetched").field("bytes", bytes)));
    match site.boot_once.arm(ip) {
        Ok(true) => site
            .events
            .emit(with_mac(Event::new("boot-once-armed").field(
                "note",
                "next boots of the node exit iPXE to the local disk (re-arm: serve --rearm)",
            ))),
        Ok(false) => {}
        Err(e) => site.events.emit(with_mac(
            Event::new("boot-once-failed")
                .warning()
                .field("error", format!("{e:#}")),
        )),
    }
}

fn body_len(r: &Response) -> u64 {
    match &r.body {
        Body::Bytes(b) => b.len() as u64,
        Body::File(_, _, len) => *len,
    }
}

/// The nginx.conf locations.
fn route(site: &Site, req: &Request, peer: IpAddr) -> Response {
    if req.method == Method::Other {
        return Response::error(405);
    }
    let path = match req.path() {
        Ok(p) => p,
        Err(status) => return Response::error(status),
    };
    let rel = if path == "boot.ipxe" {
        if site.boot_once.armed() && peer == IpAddr::V4(site.pinned_ip) {
            return Response {
                status: 200,
                content_type: "text/plain",
                len: site.exit_script.len() as u64,
                range: None,
                body: Body::Bytes(site.exit_script.clone()),
                extra: None,
            };
        }
        layout::HTTP_BOOT_IPXE.to_string()
    } else if path == site.ipxe_efi {
        format!("{}/{path}", layout::TFTP_ROOT)
    } else if path.starts_with("talos/") {
        format!("{}/{path}", layout::HTTP_ROOT)
    } else if path.starts_with("configs/") {
        if peer != IpAddr::V4(site.pinned_ip) {
            return Response::error(403);
        }
        format!("{}/{path}", layout::HTTP_ROOT)
    } else {
        return Response::error(404);
    };
    let file = match site.tree.open(&rel) {
        Ok(Some(f)) => f,
        Ok(None) => return Response::error(404),
        Err(_) => return Response::error(500),
    };
    let len = file.len();
    let content_type = content_type(&path);
    // If-Range (RFC 9110 13.1.5): we send no validators (ETag, Last-Modified), so the
    // client's cannot match: the range is ignored, the whole file goes.
    let range = match req.header("if-range") {
        Some(_) => None,
        None => req.header("range"),
    };
    match parse_range(range, len) {
        Range::Full => Response {
            status: 200,
            content_type,
            len,
            range: None,
            body: Body::File(file, 0, len),
            extra: None,
        },
        Range::Partial(start, end) => Response {
            status: 206,
            content_type,
            len,
            range: Some((start, end)),
            body: Body::File(file, start, end - start + 1),
            extra: None,
        },
        Range::Unsatisfiable => {
            let mut r = Response::error(416);
            r.extra = Some(format!("Content-Range: bytes */{len}\r\n"));
            r
        }
    }
}

/// Write the status line and headers; with `more`, the kernel holds them for the body.
fn write_head(stream: &TcpStream, r: &Response, keep: bool, more: bool) -> io::Result<()> {
    let mut h = format!(
        "HTTP/1.1 {} {}\r\nServer: mkappliance\r\nDate: {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
        r.status,
        reason(r.status),
        http_date(SystemTime::now()),
        r.content_type,
        body_len(r),
    );
    if let Some((start, end)) = r.range {
        h.push_str(&format!("Content-Range: bytes {start}-{end}/{}\r\n", r.len));
    }
    if matches!(r.status, 200 | 206) {
        h.push_str("Accept-Ranges: bytes\r\n");
    }
    if let Some(x) = &r.extra {
        h.push_str(x);
    }
    h.push_str(if keep {
        "Connection: keep-alive\r\n\r\n"
    } else {
        "Connection: close\r\n\r\n"
    });
    let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
    let mut b = h.as_bytes();
    while !b.is_empty() {
        // SAFETY: b is valid for its length.
        let n = unsafe { libc::send(stream.as_raw_fd(), b.as_ptr().cast(), b.len(), flags) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        b = &b[n as usize..];
    }
    Ok(())
}

/// Send a response: the body bytes sent (for the log, also when the client went away
/// halfway), and whether all of it went.
fn send(stream: &TcpStream, r: &Response, keep: bool, head_only: bool) -> (u64, io::Result<()>) {
    let has_body = !head_only && body_len(r) > 0;
    if let Err(e) = write_head(stream, r, keep, has_body) {
        return (0, Err(e));
    }
    if !has_body {
        return (0, Ok(()));
    }
    match &r.body {
        Body::Bytes(b) => {
            let mut s = stream;
            match s.write_all(b) {
                Ok(()) => (b.len() as u64, Ok(())),
                Err(e) => (0, Err(e)),
            }
        }
        Body::File(f, start, len) => match f.send_to(stream, *start, *len) {
            (n, Ok(())) if n < *len => (
                n,
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file shrank",
                )),
            ),
            sent => sent,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_types() {
        // RFC 9110's example date, 784111777 s after the epoch.
        assert_eq!(
            http_date(UNIX_EPOCH + Duration::from_secs(784_111_777)),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(content_type("boot.ipxe"), "text/plain");
        assert_eq!(content_type("configs/minipc.yaml"), "text/plain");
        assert_eq!(
            content_type("talos/v1/initramfs.xz"),
            "application/octet-stream"
        );
        assert_eq!(content_type("talos/v1/vmlinuz"), "application/octet-stream");
    }
}
