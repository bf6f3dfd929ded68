//! The rogue-DHCP guard: if another DHCP server answers on the PXE link (the NICs were
//! swapped and this is the home LAN, say), we must not hand out addresses there.
//!
//! It probes: a DISCOVER from our own MAC with the broadcast flag, answered by every
//! server on the link, ours excepted (we ignore unknown MACs). It also listens: any
//! broadcast OFFER/ACK/NAK from a server that is not us. Either stands the DHCP server
//! down; it resumes only after a probe goes unanswered and the link has been quiet for
//! a while. DHCP answers wait for the first probe window to close (the server holds
//! requests that come in meanwhile and answers them then).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use super::packet::{self, opt, Packet};
use crate::appliance::events::{Event, EventLog};
use crate::appliance::netif::Iface;

pub const CLIENT_PORT: u16 = 68;
pub const SERVER_PORT: u16 = 67;
/// How long a probe collects answers. Servers ping an address before offering it
/// (dnsmasq, so many home routers, waits 3 s; ISC dhcpd 1 s): outlast that.
pub const PROBE_WINDOW: Duration = Duration::from_secs(4);
const PROBE_EVERY_SERVING: Duration = Duration::from_secs(60);
const PROBE_EVERY_STANDING: Duration = Duration::from_secs(10);
/// After the last foreign answer, how long the link must stay quiet before we serve.
const QUIET_TO_RESUME: Duration = Duration::from_secs(30);
/// While standing down, repeat the warning this often.
const REMIND_EVERY: Duration = Duration::from_secs(60);
/// Our probes say who they are, for anyone reading the other server's log.
const PROBE_VENDOR: &[u8] = b"mkappliance-rogue-dhcp-guard";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Until the first probe window closes.
    Starting,
    Serving,
    StandingDown,
}

pub struct Guard {
    sock: Option<UdpSocket>,
    iface: Iface,
    server_ip: Ipv4Addr,
    state: State,
    /// The open probe: its xid and when its window closes.
    probe: Option<(u32, Instant)>,
    probe_answered: bool,
    next_probe: Instant,
    last_foreign: Option<Instant>,
    last_warning: Option<Instant>,
}

/// A UDP socket on `port` of the PXE interface only (SO_BINDTODEVICE), broadcast-capable.
pub fn bind_device_udp(iface: &Iface, port: u16) -> Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    s.bind_device(Some(iface.name.as_bytes()))
        .with_context(|| format!("binding to interface {}", iface.name))?;
    let addr: SocketAddr = (Ipv4Addr::UNSPECIFIED, port).into();
    s.bind(&addr.into())
        .with_context(|| format!("binding UDP port {port} on {}", iface.name))?;
    Ok(s.into())
}

/// A probe's transaction ID. The guard probes right after boot, often before the kernel's
/// CRNG is seeded: GRND_INSECURE never blocks there (a blocking getrandom held the DHCP
/// thread for about a second while the kernel spun the CPU to gather entropy, which under
/// emulation slowed everything else on the host), and an xid needs no cryptographic
/// quality.
fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_INSECURE) };
    if n != 4 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.subsec_nanos() ^ std::process::id();
    }
    u32::from_ne_bytes(b)
}

impl Guard {
    /// A guard on port 68 of `iface`. Without that port (a DHCP client holds it) the guard
    /// is off: say so and serve.
    pub fn new(iface: &Iface, server_ip: Ipv4Addr, events: &EventLog) -> Guard {
        let sock = match bind_device_udp(iface, CLIENT_PORT) {
            Ok(s) => Some(s),
            Err(e) => {
                events.emit(
                    Event::new("dhcp-guard-off")
                        .warning()
                        .field("interface", iface.name.clone())
                        .field("error", format!("{e:#}")),
                );
                None
            }
        };
        let now = Instant::now();
        Guard {
            state: if sock.is_some() {
                State::Starting
            } else {
                State::Serving
            },
            sock,
            iface: iface.clone(),
            server_ip,
            probe: None,
            probe_answered: false,
            next_probe: now,
            last_foreign: None,
            last_warning: None,
        }
    }

    pub fn socket(&self) -> Option<&UdpSocket> {
        self.sock.as_ref()
    }

    /// Whether the DHCP server may answer clients now.
    pub fn serving(&self) -> bool {
        self.state == State::Serving
    }

    /// While the first probe window is open (nothing seen yet): when it closes, if it
    /// has been opened.
    pub fn starting(&self) -> Option<Option<Instant>> {
        (self.state == State::Starting).then(|| self.probe.map(|(_, closes)| closes))
    }

    fn probe_packet(&self, xid: u32) -> Vec<u8> {
        let mut chaddr = [0u8; 16];
        chaddr[..6].copy_from_slice(&self.iface.mac);
        let mut p = Packet {
            op: packet::BOOTREQUEST,
            htype: packet::HTYPE_ETHER,
            hlen: 6,
            hops: 0,
            xid,
            secs: 0,
            flags: packet::FLAG_BROADCAST,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr,
            sname: Vec::new(),
            file: Vec::new(),
            options: Vec::new(),
        };
        p.set(opt::MESSAGE_TYPE, [packet::DISCOVER]);
        p.set(opt::PARAMS, vec![opt::SUBNET_MASK, opt::ROUTER, opt::DNS]);
        p.set(opt::VENDOR_CLASS, PROBE_VENDOR.to_vec());
        p.encode()
    }

    /// Time-driven work: open a probe when one is due, close its window when it ends.
    pub fn tick(&mut self, now: Instant, events: &EventLog) {
        let Some(sock) = &self.sock else { return };
        if let Some((_, closes)) = self.probe {
            if now < closes {
                return;
            }
            self.probe = None;
            let quiet = self
                .last_foreign
                .is_none_or(|t| now.duration_since(t) >= QUIET_TO_RESUME);
            match self.state {
                State::Starting if !self.probe_answered => {
                    self.state = State::Serving;
                    events.emit(
                        Event::new("dhcp-guard-clear")
                            .field("interface", self.iface.name.clone())
                            .field("note", "no other DHCP server answered: serving DHCP"),
                    );
                }
                State::StandingDown if !self.probe_answered && quiet => {
                    self.state = State::Serving;
                    events.emit(
                        Event::new("dhcp-resumed")
                            .field("interface", self.iface.name.clone())
                            .field("note", "the other DHCP server is gone: serving DHCP again"),
                    );
                }
                _ => {}
            }
        }
        if now >= self.next_probe && self.probe.is_none() {
            let xid = random_u32();
            let dest: SocketAddr = (Ipv4Addr::BROADCAST, SERVER_PORT).into();
            // A failed send (link down) just means no probe this round.
            let _ = sock.send_to(&self.probe_packet(xid), dest);
            self.probe = Some((xid, now + PROBE_WINDOW));
            self.probe_answered = false;
            self.next_probe = now
                + match self.state {
                    State::Serving => PROBE_EVERY_SERVING,
                    _ => PROBE_EVERY_STANDING,
                };
        }
        if self.state == State::StandingDown
            && self
                .last_warning
                .is_none_or(|t| now.duration_since(t) >= REMIND_EVERY)
        {
            self.warn(now, None, events);
        }
    }

    fn warn(&mut self, now: Instant, server: Option<Ipv4Addr>, events: &EventLog) {
        self.last_warning = Some(now);
        let mut ev = Event::new("dhcp-rogue")
            .warning()
            .field("interface", self.iface.name.clone());
        if let Some(s) = server {
            ev = ev.field("server", s.to_string());
        }
        events.emit(ev.field(
            "note",
            "another DHCP server answers on this link: NOT serving DHCP here (are the NICs swapped?)",
        ));
    }

    /// Read what arrived on port 68; a foreign server's answer stands us down.
    pub fn readable(&mut self, now: Instant, events: &EventLog) {
        let mut buf = [0u8; 1500];
        loop {
            let Some(sock) = &self.sock else { return };
            let (n, src) = match sock.recv_from(&mut buf) {
                Ok(r) => r,
                Err(_) => return, // WouldBlock: drained
            };
            let Ok(p) = Packet::parse(&buf[..n]) else {
                continue;
            };
            let from_us = p.server_id() == Some(self.server_ip)
                || matches!(src, SocketAddr::V4(a) if *a.ip() == self.server_ip);
            let answer = matches!(
                p.message_type(),
                Some(packet::OFFER | packet::ACK | packet::NAK)
            );
            if p.op != packet::BOOTREPLY || from_us || !answer {
                continue;
            }
            if self.probe.is_some_and(|(xid, _)| xid == p.xid) {
                self.probe_answered = true;
            }
            self.last_foreign = Some(now);
            if self.state != State::StandingDown {
                self.state = State::StandingDown;
                self.next_probe = now + PROBE_EVERY_STANDING;
                let server = p.server_id().or(match src {
                    SocketAddr::V4(a) => Some(*a.ip()),
                    SocketAddr::V6(_) => None,
                });
                self.warn(now, server, events);
            }
        }
    }
}
