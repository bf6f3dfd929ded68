//! The TFTP server: read-only, rooted at `/srv/tftp`, on port 69 of the appliance
//! address. Each read runs on its own thread and socket ([`transfer`]); writes are
//! refused, paths that try to leave the root are refused.

pub mod packet;
pub mod transfer;
mod window;

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, SendError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::appliance::events::{lock, Event, EventLog};
use crate::appliance::served::{clean_path, PathError, ServedTree};
use crate::layout;
use packet::{Mode, Request, RequestError};
use transfer::Source;

pub const PORT: u16 = 69;
/// Concurrent transfers; beyond this, requests get "server busy".
const MAX_TRANSFERS: usize = 64;
/// netascii is converted in memory, so only for files up to this size.
const MAX_NETASCII: u64 = 4 << 20;
/// IPv4 + UDP + TFTP headers: a block must fit the link MTU with these.
const HEADERS: u32 = 20 + 8 + 4;
const READ_TIMEOUT: Duration = Duration::from_millis(500);
/// Largest request we read (RFC 2347 says requests fit in 512 bytes; be lenient).
const MAX_REQUEST: usize = 2048;
/// Threads need little stack: a block buffer lives on the heap.
const THREAD_STACK: usize = 256 << 10;
/// The name of transfer threads (`/proc/<pid>/task/*/comm`).
pub const TRANSFER_THREAD: &str = "tftp-transfer";

/// The requests being served: the client's address and the request's bytes.
type Running = Arc<Mutex<HashSet<(SocketAddr, Vec<u8>)>>>;

pub struct TftpServer {
    sock: UdpSocket,
    ip: Ipv4Addr,
    max_blksize: u16,
    tree: Arc<ServedTree>,
    events: EventLog,
    active: Arc<AtomicUsize>,
    running: Running,
    workers: Workers,
}

/// A UDP socket on `ip:port`, reusable at once after a restart.
pub fn bind_udp(ip: Ipv4Addr, port: u16) -> Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    let addr: SocketAddr = (ip, port).into();
    s.bind(&addr.into())
        .with_context(|| format!("binding UDP {addr}"))?;
    Ok(s.into())
}

impl TftpServer {
    /// Bind port 69 on `ip`; blocks are limited to what fits in `mtu`.
    pub fn bind(
        ip: Ipv4Addr,
        mtu: u32,
        tree: Arc<ServedTree>,
        events: &EventLog,
    ) -> Result<TftpServer> {
        let sock = bind_udp(ip, PORT)?;
        sock.set_read_timeout(Some(READ_TIMEOUT))?;
        let max_blksize = mtu.saturating_sub(HEADERS).clamp(
            u32::from(packet::DEFAULT_BLKSIZE),
            u32::from(packet::MAX_BLKSIZE),
        ) as u16;
        Ok(TftpServer {
            sock,
            ip,
            max_blksize,
            tree,
            events: events.clone(),
            active: Arc::new(AtomicUsize::new(0)),
            running: Running::default(),
            workers: Workers::default(),
        })
    }

    pub fn run(self, stop: Arc<AtomicBool>) {
        let mut buf = vec![0u8; MAX_REQUEST];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, src)) = self.sock.recv_from(&mut buf) {
                self.request(&buf[..n], src);
            }
        }
    }

    /// Answer `bytes` to `to` from a fresh socket (a new TID, as for any reply).
    fn reply(&self, to: SocketAddr, bytes: &[u8]) {
        if let Ok(s) = bind_udp(self.ip, 0) {
            let _ = s.send_to(bytes, to);
        }
    }

    fn refuse(&self, to: SocketAddr, code: u16, msg: &str, file: &str) {
        self.reply(to, &packet::error(code, msg));
        let mut ev = Event::new("tftp-refused")
            .ip(to.ip())
            .field("file", file.to_string())
            .field("reason", msg.to_string());
        if let Some(m) = self.events.mac_for(to.ip()) {
            ev = ev.mac(m);
        }
        self.events.emit(ev);
    }

    fn request(&self, data: &[u8], src: SocketAddr) {
        let req = match Request::parse(data) {
            Ok(r) => r,
            Err(RequestError::Malformed) => {
                // Stray ACKs/ERRORs for finished transfers land here too: no answer.
                if data.len() >= 2
                    && matches!(
                        u16::from_be_bytes([data[0], data[1]]),
                        packet::ACK | packet::ERROR
                    )
                {
                    return;
                }
                return self.refuse(src, packet::ERR_ILLEGAL, "malformed request", "");
            }
            Err(RequestError::BadMode(m)) => {
                return self.refuse(
                    src,
                    packet::ERR_ILLEGAL,
                    &format!("mode {m:?} is not supported"),
                    "",
                )
            }
        };
        if req.write {
            return self.refuse(
                src,
                packet::ERR_ACCESS,
                "read-only server: write requests are refused",
                &req.filename,
            );
        }
        let rel = match clean_path(&req.filename) {
            Ok(p) => p,
            Err(PathError::Traversal) => {
                return self.refuse(
                    src,
                    packet::ERR_ACCESS,
                    "access violation: path outside the TFTP root",
                    &req.filename,
                )
            }
            Err(PathError::Empty) => {
                return self.refuse(src, packet::ERR_NOT_FOUND, "file not found", &req.filename)
            }
        };
        let file = match self.tree.open(&format!("{}/{rel}", layout::TFTP_ROOT)) {
            Ok(Some(f)) => f,
            Ok(None) => return self.refuse(src, packet::ERR_NOT_FOUND, "file not found", &rel),
            Err(e) => {
                return self.refuse(
                    src,
                    packet::ERR_UNDEFINED,
                    &format!("cannot read the file: {e}"),
                    &rel,
                )
            }
        };
        let source = match req.mode {
            Mode::Octet => Source::File(file),
            Mode::Netascii if file.len() <= MAX_NETASCII => {
                let mut raw = vec![0u8; file.len() as usize];
                match file.read_at(0, &mut raw) {
                    Ok(n) => {
                        raw.truncate(n);
                        Source::Memory(packet::to_netascii(&raw))
                    }
                    Err(e) => {
                        return self.refuse(
                            src,
                            packet::ERR_UNDEFINED,
                            &format!("cannot read the file: {e}"),
                            &rel,
                        )
                    }
                }
            }
            Mode::Netascii => {
                return self.refuse(
                    src,
                    packet::ERR_UNDEFINED,
                    "netascii is limited to 4 MiB files: use octet",
                    &rel,
                )
            }
        };
        // A retransmitted RRQ (the same bytes from the same port) while its transfer runs:
        // the transfer answers it. Another request from that port is a new transfer (a
        // client that asked for the size and ended with an ERROR may ask for the file
        // right away, before that transfer's thread has cleaned up).
        let key = (src, data.to_vec());
        if !lock(&self.running).insert(key.clone()) {
            return;
        }
        if self.active.fetch_add(1, Ordering::SeqCst) >= MAX_TRANSFERS {
            self.active.fetch_sub(1, Ordering::SeqCst);
            lock(&self.running).remove(&key);
            return self.refuse(
                src,
                packet::ERR_UNDEFINED,
                "server busy: too many transfers",
                &rel,
            );
        }
        let opts = req.negotiate(self.max_blksize);
        let job = Job {
            ip: self.ip,
            key: key.clone(),
            rel,
            source,
            opts,
            events: self.events.clone(),
            active: self.active.clone(),
            running: self.running.clone(),
        };
        if self.workers.run(job).is_err() {
            self.active.fetch_sub(1, Ordering::SeqCst);
            lock(&self.running).remove(&key);
        }
    }
}

/// Transfer threads, each kept for the next transfer when done (at most
/// `MAX_TRANSFERS` run at once, so at most that many are ever started).
///
/// A lock-step transfer is a ping-pong: every block wakes the thread. The scheduler puts
/// a new thread on an idle CPU, away from where the client's packets are taken in, and
/// wakes it there for every block: on an idle VM that is a halted vCPU to wake each time
/// (the 0.85 MB `ipxe.efi` went at 0.63 of dnsmasq's speed, BENCHMARKS.md). A thread that
/// has served before is woken where it ran, next to the client, as dnsmasq's one
/// process is (1.08 of dnsmasq's speed).
#[derive(Clone, Default)]
struct Workers {
    idle: Arc<Mutex<Vec<Sender<Job>>>>,
}

impl Workers {
    /// Run `job` on an idle transfer thread, or on a new one. `Err` if no thread could
    /// be started (the job is dropped).
    fn run(&self, mut job: Job) -> Result<(), ()> {
        while let Some(worker) = lock(&self.idle).pop() {
            match worker.send(job) {
                Ok(()) => return Ok(()),
                // Cannot happen (an idle thread waits in recv, holding its receiver),
                // but a job is never dropped: try the next, or a new thread.
                Err(SendError(j)) => job = j,
            }
        }
        let (tx, rx) = channel::<Job>();
        let idle = self.idle.clone();
        std::thread::Builder::new()
            .name(TRANSFER_THREAD.into())
            .stack_size(THREAD_STACK)
            .spawn(move || {
                let mut next = Some(job);
                while let Some(job) = next.take() {
                    job.run();
                    lock(&idle).push(tx.clone());
                    // Never fails: this thread holds a sender itself.
                    next = rx.recv().ok();
                }
            })
            .map(drop)
            .map_err(drop)
    }
}

struct Job {
    ip: Ipv4Addr,
    /// This request in [`Running`]: the client's address and the request's bytes.
    key: (SocketAddr, Vec<u8>),
    rel: String,
    source: Source,
    opts: packet::Negotiated,
    events: EventLog,
    active: Arc<AtomicUsize>,
    running: Running,
}

impl Job {
    fn run(self) {
        let start = Instant::now();
        let src = self.key.0;
        let result = bind_udp(self.ip, 0)
            .and_then(|s| s.connect(src).map(|_| s).context("connecting"))
            .map_err(|e| transfer::Failure::Io(std::io::Error::other(format!("{e:#}"))))
            .and_then(|s| transfer::send(&s, &self.source, &self.opts));
        let mut ev = match &result {
            Ok(bytes) => Event::new("tftp-sent").field("bytes", *bytes),
            // Not a failure: the size query that comes before the real request.
            Err(transfer::Failure::SizeOnly) => {
                Event::new("tftp-size-query").field("bytes", self.source.len())
            }
            Err(e) => Event::new("tftp-failed").field("error", e.to_string()),
        };
        ev = ev
            .ip(src.ip())
            .field("file", self.rel.clone())
            .field("ms", start.elapsed().as_millis() as u64)
            .field(
                "blksize",
                self.opts.blksize.unwrap_or(packet::DEFAULT_BLKSIZE),
            )
            .field("windowsize", self.opts.windowsize.unwrap_or(1));
        if let Some(m) = self.events.mac_for(src.ip()) {
            ev = ev.mac(m);
        }
        self.events.emit(ev);
        lock(&self.running).remove(&self.key);
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
}
