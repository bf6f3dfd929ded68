//! The DHCP server: port 67 on the PXE interface only (SO_BINDTODEVICE), answering the
//! pinned MAC as the rendered `dnsmasq.conf` says ([`policy`]), unless the rogue-DHCP
//! [`guard`] has seen another server on the link.

pub mod guard;
pub mod packet;
pub mod policy;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::appliance::events::{Event, EventLog};
use crate::appliance::netif::Iface;
use crate::config::{ApplianceConfig, Mac};
use guard::{bind_device_udp, Guard, CLIENT_PORT, SERVER_PORT};
use packet::Packet;
use policy::{Ignored, Outcome, Policy};

/// How often the loop wakes to run the guard and notice a stop.
const TICK: Duration = Duration::from_millis(250);
/// dnsmasq keeps a declined static address out of use this long (DECLINE_BACKOFF).
const DECLINE_BACKOFF: Duration = Duration::from_secs(600);
/// Requests held while the guard's first probe window is open, answered when it closes
/// clean. Dropping them instead costs a PXE client far more than the wait: OVMF sends its
/// next DISCOVER 4 s later and then collects offers for 8 s instead of 4.
const MAX_HELD: usize = 16;
/// `ATF_COM`: a complete ARP entry.
const ATF_COM: libc::c_int = 0x02;

pub struct DhcpServer {
    sock: UdpSocket,
    iface: Iface,
    policy: Policy,
    guard: Guard,
    events: EventLog,
    declined_until: Option<Instant>,
    held: Vec<(Vec<u8>, SocketAddr)>,
}

impl DhcpServer {
    /// Bind port 67 on the PXE interface and the guard's port 68.
    pub fn bind(cfg: &ApplianceConfig, iface: &Iface, events: &EventLog) -> Result<DhcpServer> {
        let sock = bind_device_udp(iface, SERVER_PORT)?;
        sock.set_nonblocking(true)?;
        let guard = Guard::new(iface, cfg.appliance_ip(), events);
        if let Some(s) = guard.socket() {
            s.set_nonblocking(true)?;
        }
        Ok(DhcpServer {
            sock,
            iface: iface.clone(),
            policy: Policy::from_config(cfg),
            guard,
            events: events.clone(),
            declined_until: None,
            held: Vec::new(),
        })
    }

    /// Serve until `stop` is set.
    pub fn run(mut self, stop: Arc<AtomicBool>) {
        let mut buf = vec![0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            self.guard.tick(now, &self.events);
            self.release_held();
            // Wake when the first probe window closes, to answer what it held at once.
            let wait = match self.guard.starting() {
                Some(Some(closes)) => closes.saturating_duration_since(now).min(TICK),
                _ => TICK,
            };
            let mut fds = vec![libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            if let Some(g) = self.guard.socket() {
                fds.push(libc::pollfd {
                    fd: g.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            // SAFETY: fds is a valid array of fds.len() pollfds.
            let n = unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    wait.as_micros().div_ceil(1000) as i32,
                )
            };
            if n <= 0 {
                continue;
            }
            if fds.get(1).is_some_and(|f| f.revents != 0) {
                self.guard.readable(Instant::now(), &self.events);
            }
            if fds[0].revents != 0 {
                while let Ok((len, src)) = self.sock.recv_from(&mut buf) {
                    self.handle(&buf[..len], src);
                }
            }
        }
    }

    /// Once the guard's first window has closed: answer what it held, or (standing
    /// down) let [`Self::handle`] say why not.
    fn release_held(&mut self) {
        if self.held.is_empty() || self.guard.starting().is_some() {
            return;
        }
        for (data, src) in std::mem::take(&mut self.held) {
            self.handle(&data, src);
        }
    }

    fn handle(&mut self, data: &[u8], src: SocketAddr) {
        let req = match Packet::parse(data) {
            Ok(p) => p,
            Err(e) => {
                self.events.emit_once(
                    format!("dhcp-malformed {}", src.ip()),
                    Event::new("dhcp-malformed")
                        .ip(src.ip())
                        .field("error", format!("{e:?}"))
                        .field("note", "logged once per sender"),
                );
                return;
            }
        };
        let mac = req.mac().map(Mac);
        // Our own guard probe comes back to us through the loopback of broadcasts.
        if req.mac() == Some(self.iface.mac) {
            return;
        }
        let outcome = self.policy.handle(&req);
        let wants_address = matches!(req.message_type(), Some(packet::DISCOVER | packet::REQUEST));
        if let Outcome::Ignore(why) = outcome {
            if why == Ignored::Unknown {
                let who =
                    mac.map_or_else(|| format!("{:02x?}", &req.chaddr[..6]), |m| m.to_string());
                let mut ev = Event::new("dhcp-ignored")
                    .field("interface", self.iface.name.clone())
                    .field("note", "not the pinned MAC; logged once per MAC");
                if let Some(m) = mac {
                    ev = ev.mac(m);
                }
                self.events.emit_once(format!("dhcp-ignored {who}"), ev);
            }
            return;
        }
        let mac = Mac(self.policy.mac);
        if self.guard.starting().is_some() {
            if self.held.len() < MAX_HELD {
                self.held.push((data.to_vec(), src));
            }
            self.events.emit_once(
                format!("dhcp-held {mac}"),
                Event::new("dhcp-held").mac(mac).field(
                    "note",
                    "answering when the rogue-DHCP guard's first probe closes (within 4 s)",
                ),
            );
            return;
        }
        if !self.guard.serving() {
            self.events.emit_once(
                format!("dhcp-not-serving {mac}"),
                Event::new("dhcp-not-serving")
                    .warning()
                    .mac(mac)
                    .field("note", "another DHCP server is on this link"),
            );
            return;
        }
        let now = Instant::now();
        if wants_address && self.declined_until.is_some_and(|t| now < t) {
            self.events.emit_once(
                format!("dhcp-declined-backoff {mac}"),
                Event::new("dhcp-declined-backoff")
                    .warning()
                    .mac(mac)
                    .field(
                        "note",
                        "the node declined its address (in use?): not offering it for 10 minutes",
                    ),
            );
            return;
        }
        match outcome {
            Outcome::Ignore(_) => {}
            Outcome::Decline { ip } => {
                self.declined_until = Some(now + DECLINE_BACKOFF);
                let mut ev = Event::new("dhcp-decline")
                    .warning()
                    .mac(mac)
                    .field("note", "the node found its address in use by another host");
                if let Some(ip) = ip {
                    ev = ev.ip(ip);
                }
                self.events.emit(ev);
            }
            Outcome::Release => self.events.emit(
                Event::new("dhcp-release")
                    .mac(mac)
                    .ip(self.policy.client_ip),
            ),
            Outcome::Reply { reply, boot } => {
                let kind = match (reply.message_type(), req.message_type()) {
                    (Some(packet::OFFER), _) => "dhcp-offer",
                    (Some(packet::NAK), _) => "dhcp-nak",
                    (_, Some(packet::INFORM)) => "dhcp-inform",
                    _ => "dhcp-ack",
                };
                let dest = self.destination(&req, &reply);
                let sent = self.sock.send_to(&reply.encode(), dest);
                let mut ev = Event::new(kind).mac(mac).ip(self.policy.client_ip);
                if let Some(b) = boot {
                    ev = ev.field("boot", b);
                }
                if let Some(arch) = req.client_arch() {
                    ev = ev.field("arch", arch);
                }
                if policy::is_ipxe(&req) {
                    ev = ev.field("client", "iPXE");
                } else if policy::is_http_client(&req) {
                    ev = ev.field("client", "HTTPClient");
                }
                if let Err(e) = sent {
                    ev = ev
                        .warning()
                        .field("error", format!("sending to {dest}: {e}"));
                }
                self.events.emit(ev);
            }
        }
    }

    /// Where a reply goes (RFC 2131 4.1): a relay, the client's own address, a
    /// broadcast, or the offered address by an ARP entry we add for the client's MAC
    /// (a client without an address cannot answer ARP).
    fn destination(&self, req: &Packet, reply: &Packet) -> SocketAddr {
        let broadcast: SocketAddr = (Ipv4Addr::BROADCAST, CLIENT_PORT).into();
        if !req.giaddr.is_unspecified() {
            return (req.giaddr, SERVER_PORT).into();
        }
        if reply.message_type() == Some(packet::NAK) {
            return broadcast;
        }
        if !req.ciaddr.is_unspecified() {
            return (req.ciaddr, CLIENT_PORT).into();
        }
        if req.flags & packet::FLAG_BROADCAST != 0 || reply.yiaddr.is_unspecified() {
            return broadcast;
        }
        match self.add_arp(reply.yiaddr, &req.chaddr[..6]) {
            Ok(()) => (reply.yiaddr, CLIENT_PORT).into(),
            Err(_) => broadcast,
        }
    }

    /// SIOCSARP: tell the kernel `ip` is at `mac` on the PXE interface.
    fn add_arp(&self, ip: Ipv4Addr, mac: &[u8]) -> std::io::Result<()> {
        // SAFETY: arpreq is plain old data; zero is a valid value for every field.
        let mut req: libc::arpreq = unsafe { std::mem::zeroed() };
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: sockaddr_in fits in sockaddr (both 16 bytes).
        req.arp_pa = unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) };
        req.arp_ha.sa_family = libc::ARPHRD_ETHER;
        for (d, s) in req.arp_ha.sa_data.iter_mut().zip(mac) {
            *d = *s as libc::c_char;
        }
        req.arp_flags = ATF_COM;
        for (d, s) in req.arp_dev.iter_mut().zip(self.iface.name.as_bytes()) {
            *d = *s as libc::c_char;
        }
        // SAFETY: a valid arpreq for SIOCSARP on an AF_INET socket.
        let rc = unsafe { libc::ioctl(self.sock.as_raw_fd(), libc::SIOCSARP, &req) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}
