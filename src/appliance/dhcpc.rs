//! The uplink's DHCP client (RFC 2131): DISCOVER → OFFER → REQUEST → ACK, renewal at T1
//! (unicast to the server), rebinding at T2 (broadcast), a check of the lease when the
//! cable comes back (INIT-REBOOT: it may be another network now), and a fresh start when
//! the lease is refused or runs out. The lease becomes the uplink's address (with the
//! lease as its kernel lifetime, so a stuck client cannot keep a stale address), its
//! default route, and the DNS forwarder's upstream servers.
//!
//! It talks through an `AF_PACKET` socket on the uplink alone: it works before the link
//! has an address, sees replies before netfilter (the appliance's input guard drops
//! everything unsolicited on the uplink), and never listens on a UDP port.

mod socket;
pub mod wire;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use super::net::{DhcpInfo, Reporter, UplinkInfo, UplinkState};
use super::netlink::route::{Route, Rtnl, INFINITY_LIFE_TIME, RTPROT_DHCP};
use crate::config::Ipv4Cidr;
use socket::{random_u32, PacketSocket};
use wire::{Reply, Request};

/// Hostname we give the DHCP server (shows up in routers' lease tables).
pub const HOSTNAME: &str = "mkappliance";
const DNS_PORT: u16 = 53;
/// First DISCOVER retransmission; doubles up to [`DISCOVER_MAX`] (RFC 2131 4.1).
const DISCOVER_FIRST: Duration = Duration::from_secs(2);
const DISCOVER_MAX: Duration = Duration::from_secs(64);
/// Waits for the ACK to a selecting REQUEST before starting over.
const REQUEST_WAITS: [Duration; 3] = [
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(4),
];
/// RFC 2131 4.4.5: renewing/rebinding retransmissions wait at least this long.
const RENEW_MIN_WAIT: Duration = Duration::from_secs(60);
/// Say "offline" when no lease arrived within this long (we keep asking).
const NO_LEASE_NOTICE: Duration = Duration::from_secs(10);
/// How often a waiting client looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(200);
/// Pause after a NAK or a failure to configure the lease.
const RETRY_PAUSE: Duration = Duration::from_secs(2);
const BROADCAST_MAC: [u8; 6] = [0xff; 6];
/// Lease assumed when an ACK names none (RFC 2131 makes it mandatory; be lenient).
const DEFAULT_LEASE_SECS: u32 = 3600;
/// How often a bound client looks at the uplink's carrier.
const CARRIER_POLL: Duration = Duration::from_secs(1);
/// Waits for the ACK or NAK that confirms a lease once the cable is back (INIT-REBOOT).
const CONFIRM_WAITS: [Duration; 2] = [Duration::from_secs(2), Duration::from_secs(4)];
/// Link flag: the NIC has a carrier (a cable in, to something that is on).
const IFF_LOWER_UP: u32 = libc::IFF_LOWER_UP as u32;

/// Notices the uplink's cable coming back: the carrier up after a look that found it
/// down, or the kernel's count of carrier changes moved (an unplug between two looks).
struct CarrierWatch {
    up: Option<bool>,
    changes: Option<u32>,
}

impl CarrierWatch {
    fn new((up, changes): (Option<bool>, Option<u32>)) -> CarrierWatch {
        CarrierWatch { up, changes }
    }

    /// Take the next look; whether the cable came back since the last one.
    fn replugged(&mut self, (up, changes): (Option<bool>, Option<u32>)) -> bool {
        let back = up == Some(true)
            && (self.up == Some(false) || (self.changes.is_some() && changes != self.changes));
        self.up = up.or(self.up);
        self.changes = changes.or(self.changes);
        back
    }
}

/// What the client runs on.
#[derive(Debug, Clone)]
pub struct Settings {
    pub ifname: String,
    pub index: u32,
    pub mac: [u8; 6],
    /// DNS servers that replace the lease's (`--uplink-dns`); empty = use the lease's.
    pub dns_override: Vec<Ipv4Addr>,
}

/// A lease as the client keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub server: Ipv4Addr,
    /// Where the ACK came from on the link: the server, or the relay that routes to it.
    pub server_mac: [u8; 6],
    pub lease_secs: u32,
    pub t1: u32,
    pub t2: u32,
    /// When the REQUEST that earned it was sent; lease times count from here.
    pub start: Instant,
}

impl Lease {
    pub fn from_ack(r: &Reply, src: Ipv4Addr, src_mac: [u8; 6], start: Instant) -> Result<Lease> {
        ensure!(
            !r.yiaddr.is_unspecified() && !r.yiaddr.is_broadcast() && !r.yiaddr.is_multicast(),
            "DHCP ACK assigns an unusable address {}",
            r.yiaddr
        );
        let prefix = match r.ip(wire::OPT_SUBNET_MASK) {
            Some(mask) => mask_prefix(mask)
                .with_context(|| format!("DHCP ACK has an invalid subnet mask {mask}"))?,
            None => classful_prefix(r.yiaddr),
        };
        let lease_secs = r.u32(wire::OPT_LEASE_TIME).unwrap_or(DEFAULT_LEASE_SECS);
        let (t1, t2) = if lease_secs == u32::MAX {
            (u32::MAX, u32::MAX)
        } else {
            let t2 = r
                .u32(wire::OPT_T2)
                .filter(|&t| t <= lease_secs)
                .unwrap_or((lease_secs as u64 * 7 / 8) as u32);
            let t1 = r
                .u32(wire::OPT_T1)
                .filter(|&t| t <= t2)
                .unwrap_or((lease_secs / 2).min(t2));
            (t1, t2)
        };
        let server = r
            .ip(wire::OPT_SERVER_ID)
            .or_else(|| (!r.siaddr.is_unspecified()).then_some(r.siaddr))
            .unwrap_or(src);
        Ok(Lease {
            address: r.yiaddr,
            prefix,
            router: r
                .ips(wire::OPT_ROUTER)
                .into_iter()
                .find(|g| !g.is_unspecified()),
            dns: r
                .ips(wire::OPT_DNS)
                .into_iter()
                .filter(|d| !d.is_unspecified() && !d.is_broadcast())
                .collect(),
            domain: r.text(wire::OPT_DOMAIN),
            server,
            server_mac: src_mac,
            lease_secs,
            t1,
            t2,
            start,
        })
    }

    /// The instant `secs` into the lease; `None` for "never" (an infinite lease).
    fn at(&self, secs: u32) -> Option<Instant> {
        (secs != u32::MAX).then(|| self.start + Duration::from_secs(secs as u64))
    }

    pub fn cidr(&self) -> Ipv4Cidr {
        Ipv4Cidr {
            addr: self.address,
            prefix: self.prefix,
        }
    }
}

/// Prefix length of a contiguous netmask.
fn mask_prefix(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let p = m.leading_ones();
    (m.checked_shl(p).unwrap_or(0) == 0 && p > 0).then_some(p as u8)
}

/// The old class A/B/C prefix, for servers that send no subnet mask.
fn classful_prefix(ip: Ipv4Addr) -> u8 {
    match ip.octets()[0] {
        0..=127 => 8,
        128..=191 => 16,
        _ => 24,
    }
}

/// The client thread was asked to stop.
struct Stopped;
type Flow<T> = std::result::Result<T, Stopped>;

enum Kept {
    Renewed(Lease),
    Lost(String),
}

impl Kept {
    /// An ACK to a REQUEST sent at `sent`: the lease it grants, or why it is unusable.
    fn from_ack(r: &Reply, src: Ipv4Addr, mac: [u8; 6], sent: Instant) -> Kept {
        match Lease::from_ack(r, src, mac, sent) {
            Ok(n) => Kept::Renewed(n),
            Err(e) => Kept::Lost(format!("{e:#}")),
        }
    }
}

/// Start the client on its own thread. Fails only when its sockets cannot be opened.
pub fn spawn(
    settings: Settings,
    upstreams: Arc<RwLock<Vec<SocketAddr>>>,
    reporter: Arc<Reporter>,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>> {
    let sock = PacketSocket::open(settings.index)
        .with_context(|| format!("opening a packet socket on {}", settings.ifname))?;
    let rtnl = Rtnl::open()?;
    reporter.report(UplinkState::Acquiring {
        ifname: settings.ifname.clone(),
    });
    let client = Client {
        s: settings,
        sock,
        rtnl,
        upstreams,
        reporter,
        stop,
    };
    std::thread::Builder::new()
        .name("dhcp-client".into())
        .spawn(move || client.run())
        .context("starting the DHCP client thread")
}

struct Client {
    s: Settings,
    sock: PacketSocket,
    rtnl: Rtnl,
    upstreams: Arc<RwLock<Vec<SocketAddr>>>,
    reporter: Arc<Reporter>,
    stop: Arc<AtomicBool>,
}

impl Client {
    fn run(mut self) {
        let mut current: Option<Lease> = None;
        let mut renewals = 0u32;
        loop {
            let next = match &current {
                None => match self.acquire() {
                    Ok(l) => l,
                    Err(Stopped) => return,
                },
                Some(l) => match self.keep(l) {
                    Ok(Kept::Renewed(n)) => n,
                    Ok(Kept::Lost(reason)) => {
                        self.unapply(l);
                        current = None;
                        self.reporter.report(UplinkState::Offline {
                            reason: format!("{reason}; asking again"),
                        });
                        continue;
                    }
                    Err(Stopped) => return,
                },
            };
            let same = current
                .as_ref()
                .is_some_and(|c| c.cidr() == next.cidr() && c.router == next.router);
            if let Err(e) = self.apply(current.as_ref(), &next) {
                self.unapply(&next);
                current = None;
                self.reporter.report(UplinkState::Offline {
                    reason: format!("configuring the DHCP lease on {}: {e:#}", self.s.ifname),
                });
                if self.idle_until(Some(Instant::now() + RETRY_PAUSE)).is_err() {
                    return;
                }
                continue;
            }
            renewals = if same { renewals + 1 } else { 0 };
            self.reporter.report(UplinkState::Online(UplinkInfo {
                ifname: self.s.ifname.clone(),
                address: next.cidr(),
                gateway: next.router,
                dns: self.dns_for(&next),
                dhcp: Some(DhcpInfo {
                    server: next.server,
                    lease_secs: next.lease_secs,
                    renewals,
                }),
            }));
            current = Some(next);
        }
    }

    fn dns_for(&self, l: &Lease) -> Vec<Ipv4Addr> {
        if self.s.dns_override.is_empty() {
            l.dns.clone()
        } else {
            self.s.dns_override.clone()
        }
    }

    /// INIT → SELECTING → REQUESTING until a lease is ACKed.
    fn acquire(&mut self) -> Flow<Lease> {
        let began = Instant::now();
        let mut wait = DISCOVER_FIRST;
        let mut noticed = false;
        loop {
            let xid = random_u32();
            let secs = began.elapsed().as_secs().min(u16::MAX as u64) as u16;
            self.send_broadcast(&Request {
                kind: wire::DISCOVER,
                xid,
                secs,
                mac: self.s.mac,
                ciaddr: Ipv4Addr::UNSPECIFIED,
                requested: None,
                server_id: None,
                hostname: Some(HOSTNAME),
            });
            let jitter = Duration::from_millis((random_u32() % 1000) as u64);
            let deadline = Instant::now() + wait + jitter;
            // Looking at the carrier between slices: a cable plugged in (again) is worth a
            // DISCOVER now, not at the end of a wait that has grown to a minute.
            let mut watch = CarrierWatch::new(self.carrier());
            let (offer, replugged) = loop {
                let slice = (Instant::now() + CARRIER_POLL).min(deadline);
                let offer = self.wait_reply(xid, slice, |r| {
                    r.kind == wire::OFFER && !r.yiaddr.is_unspecified()
                })?;
                if offer.is_some() || Instant::now() >= deadline {
                    break (offer, false);
                }
                if watch.replugged(self.carrier()) {
                    break (None, true);
                }
            };
            wait = if replugged {
                DISCOVER_FIRST
            } else {
                (wait * 2).min(DISCOVER_MAX)
            };
            if let Some((offer, src, _)) = offer {
                let server = offer.ip(wire::OPT_SERVER_ID).unwrap_or(src);
                if let Some(lease) = self.select(xid, secs, &offer, server)? {
                    return Ok(lease);
                }
            }
            if !noticed && began.elapsed() >= NO_LEASE_NOTICE {
                noticed = true;
                self.reporter.report(UplinkState::Offline {
                    reason: format!(
                        "no DHCP lease on {} after {} s; still asking",
                        self.s.ifname,
                        began.elapsed().as_secs()
                    ),
                });
            }
        }
    }

    /// REQUEST the offered address from its server; `None` to start over.
    fn select(
        &mut self,
        xid: u32,
        secs: u16,
        offer: &Reply,
        server: Ipv4Addr,
    ) -> Flow<Option<Lease>> {
        for wait in REQUEST_WAITS {
            let sent = Instant::now();
            self.send_broadcast(&Request {
                kind: wire::REQUEST,
                xid,
                secs,
                mac: self.s.mac,
                ciaddr: Ipv4Addr::UNSPECIFIED,
                requested: Some(offer.yiaddr),
                server_id: Some(server),
                hostname: Some(HOSTNAME),
            });
            let reply = self.wait_reply(xid, sent + wait, |r| {
                (r.kind == wire::ACK || r.kind == wire::NAK)
                    && r.ip(wire::OPT_SERVER_ID).is_none_or(|s| s == server)
            })?;
            match reply {
                Some((r, src, mac)) if r.kind == wire::ACK => {
                    match Lease::from_ack(&r, src, mac, sent) {
                        Ok(l) => return Ok(Some(l)),
                        Err(e) => {
                            self.reporter.report(UplinkState::Offline {
                                reason: format!("{e:#}; asking again"),
                            });
                            self.idle_until(Some(Instant::now() + RETRY_PAUSE))?;
                            return Ok(None);
                        }
                    }
                }
                Some(_) => {
                    // NAK: the offer went to someone else meanwhile.
                    self.idle_until(Some(Instant::now() + RETRY_PAUSE))?;
                    return Ok(None);
                }
                None => {}
            }
        }
        Ok(None)
    }

    /// BOUND → RENEWING → REBINDING: extend the lease or report it lost.
    fn keep(&mut self, l: &Lease) -> Flow<Kept> {
        let (Some(t1), Some(t2), Some(end)) = (l.at(l.t1), l.at(l.t2), l.at(l.lease_secs)) else {
            // An infinite lease: only a cable plugged in again can change it.
            loop {
                self.bound_until(None)?;
                if let Some(k) = self.confirm(l)? {
                    return Ok(k);
                }
            }
        };
        // BOUND. The cable may come back on another network: confirm the lease then,
        // rather than keep a dead address and gateway until T1.
        while self.bound_until(Some(t1))? {
            if let Some(k) = self.confirm(l)? {
                return Ok(k);
            }
        }
        // RENEWING: unicast to the server that granted the lease.
        while Instant::now() < t2 {
            if let Some(k) = self.extend(l, Some(l.server), t2)? {
                return Ok(k);
            }
        }
        // REBINDING: any server may answer.
        while Instant::now() < end {
            if let Some(k) = self.extend(l, None, end)? {
                return Ok(k);
            }
        }
        Ok(Kept::Lost(format!(
            "DHCP lease of {} on {} expired",
            l.address, self.s.ifname
        )))
    }

    /// Wait until `deadline` (or forever); true as soon as the uplink's carrier comes back
    /// after it was lost.
    fn bound_until(&mut self, deadline: Option<Instant>) -> Flow<bool> {
        let mut watch = CarrierWatch::new(self.carrier());
        loop {
            let step = match deadline {
                Some(d) => d
                    .saturating_duration_since(Instant::now())
                    .min(CARRIER_POLL),
                None => CARRIER_POLL,
            };
            if step.is_zero() {
                return Ok(false);
            }
            self.idle_until(Some(Instant::now() + step))?;
            if watch.replugged(self.carrier()) {
                return Ok(true);
            }
        }
    }

    /// Whether the uplink has a carrier, and its count of carrier changes; `None` for
    /// what the kernel cannot tell us.
    fn carrier(&mut self) -> (Option<bool>, Option<u32>) {
        let link = self
            .rtnl
            .links()
            .ok()
            .and_then(|links| links.into_iter().find(|l| l.index == self.s.index));
        match link {
            Some(l) => (Some(l.flags & IFF_LOWER_UP != 0), l.carrier_changes),
            None => (None, None),
        }
    }

    /// INIT-REBOOT (RFC 2131 4.3.2, 4.4.2): ask whoever is on the link now to confirm the
    /// lease. A NAK (another network) loses it; silence keeps it (the RFC allows that).
    fn confirm(&mut self, l: &Lease) -> Flow<Option<Kept>> {
        let xid = random_u32();
        for wait in CONFIRM_WAITS {
            let sent = Instant::now();
            self.send_broadcast(&Request {
                kind: wire::REQUEST,
                xid,
                secs: 0,
                mac: self.s.mac,
                ciaddr: Ipv4Addr::UNSPECIFIED,
                requested: Some(l.address),
                server_id: None,
                hostname: Some(HOSTNAME),
            });
            let reply = self.wait_reply(xid, sent + wait, |r| {
                r.kind == wire::ACK || r.kind == wire::NAK
            })?;
            match reply {
                Some((r, src, mac)) if r.kind == wire::ACK => {
                    return Ok(Some(Kept::from_ack(&r, src, mac, sent)));
                }
                Some(_) => {
                    return Ok(Some(Kept::Lost(format!(
                        "the network on {} changed: DHCP server refused {}",
                        self.s.ifname, l.address
                    ))));
                }
                None => {}
            }
        }
        Ok(None)
    }

    /// One renewing (to `server`) or rebinding (broadcast) REQUEST before `until`.
    fn extend(
        &mut self,
        l: &Lease,
        server: Option<Ipv4Addr>,
        until: Instant,
    ) -> Flow<Option<Kept>> {
        let xid = random_u32();
        let sent = Instant::now();
        let req = Request {
            kind: wire::REQUEST,
            xid,
            secs: 0,
            mac: self.s.mac,
            ciaddr: l.address,
            requested: None,
            server_id: None,
            hostname: Some(HOSTNAME),
        };
        let payload = req.encode();
        let (dst, dst_mac) = match server {
            Some(s) => (s, l.server_mac),
            None => (Ipv4Addr::BROADCAST, BROADCAST_MAC),
        };
        let packet = wire::udp_ipv4(
            l.address,
            dst,
            wire::CLIENT_PORT,
            wire::SERVER_PORT,
            &payload,
        );
        // A failed send (link down) is just an unanswered request.
        let _ = self.sock.send(dst_mac, &packet);
        let remaining = until.saturating_duration_since(sent);
        let deadline = sent + (remaining / 2).max(RENEW_MIN_WAIT).min(remaining);
        let reply = self.wait_reply(xid, deadline, |r| {
            r.kind == wire::ACK || r.kind == wire::NAK
        })?;
        Ok(match reply {
            Some((r, src, mac)) if r.kind == wire::ACK => Some(Kept::from_ack(&r, src, mac, sent)),
            Some((r, _, _)) => Some(Kept::Lost(match r.text(wire::OPT_MESSAGE) {
                Some(m) => format!("DHCP server refused to extend the lease ({m})"),
                None => "DHCP server refused to extend the lease".into(),
            })),
            None => None,
        })
    }

    fn send_broadcast(&self, req: &Request) {
        let packet = wire::udp_ipv4(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            wire::CLIENT_PORT,
            wire::SERVER_PORT,
            &req.encode(),
        );
        let _ = self.sock.send(BROADCAST_MAC, &packet);
    }

    /// Wait until `deadline` for a reply to `xid` that `accept` likes.
    fn wait_reply(
        &self,
        xid: u32,
        deadline: Instant,
        accept: impl Fn(&Reply) -> bool,
    ) -> Flow<Option<(Reply, Ipv4Addr, [u8; 6])>> {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(Stopped);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let frame = match self.sock.recv((deadline - now).min(STOP_POLL)) {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(_) => {
                    std::thread::sleep(STOP_POLL);
                    continue;
                }
            };
            let Some((src, dport, payload)) = wire::parse_udp_ipv4(&frame.0) else {
                continue;
            };
            if dport != wire::CLIENT_PORT {
                continue;
            }
            let Ok(reply) = Reply::decode(payload) else {
                continue;
            };
            if reply.xid == xid && reply.chaddr == self.s.mac && accept(&reply) {
                return Ok(Some((reply, src, frame.1)));
            }
        }
    }

    /// Sleep until `deadline` (or forever), discarding stray replies, unless stopped.
    fn idle_until(&self, deadline: Option<Instant>) -> Flow<()> {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(Stopped);
            }
            let wait = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(());
                    }
                    (d - now).min(STOP_POLL)
                }
                None => STOP_POLL,
            };
            if self.sock.recv(wait).is_err() {
                std::thread::sleep(wait);
            }
        }
    }

    /// Put the lease on the link: address (lifetime = lease), default route, DNS.
    fn apply(&mut self, old: Option<&Lease>, new: &Lease) -> Result<()> {
        let index = self.s.index;
        if let Some(o) = old.filter(|o| o.cidr() != new.cidr()) {
            let _ = self.rtnl.del_address(index, o.address, o.prefix);
        }
        let life = if new.lease_secs == u32::MAX {
            INFINITY_LIFE_TIME
        } else {
            new.lease_secs
        };
        self.rtnl
            .add_address(index, new.address, new.prefix, Some((life, life)))?;
        match new.router {
            Some(gw) => {
                if !new.cidr().contains(gw) {
                    // A gateway outside the subnet must be reachable on the link first.
                    self.rtnl
                        .add_route(&Route::on_link(gw, 32, index, RTPROT_DHCP))?;
                }
                self.rtnl
                    .add_route(&Route::default_via(gw, index, RTPROT_DHCP))?;
            }
            None => {
                if let Some(gw) = old.and_then(|o| o.router) {
                    let _ = self
                        .rtnl
                        .del_route(&Route::default_via(gw, index, RTPROT_DHCP));
                }
            }
        }
        let dns = self.dns_for(new);
        set_upstreams(&self.upstreams, &dns);
        Ok(())
    }

    /// Take a lost lease off the link (its routes go with the address).
    fn unapply(&mut self, l: &Lease) {
        set_upstreams(&self.upstreams, &self.s.dns_override);
        let _ = self.rtnl.del_address(self.s.index, l.address, l.prefix);
        if let Some(gw) = l.router.filter(|gw| !l.cidr().contains(*gw)) {
            let _ = self
                .rtnl
                .del_route(&Route::on_link(gw, 32, self.s.index, RTPROT_DHCP));
        }
    }
}

pub fn set_upstreams(upstreams: &RwLock<Vec<SocketAddr>>, dns: &[Ipv4Addr]) {
    let list = dns
        .iter()
        .map(|ip| SocketAddr::new((*ip).into(), DNS_PORT))
        .collect();
    match upstreams.write() {
        Ok(mut u) => *u = list,
        Err(poisoned) => *poisoned.into_inner() = list,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn ack(options: &[(u8, &[u8])]) -> Reply {
        let mut o = BTreeMap::new();
        for (k, v) in options {
            o.insert(*k, v.to_vec());
        }
        Reply {
            kind: wire::ACK,
            xid: 1,
            yiaddr: Ipv4Addr::new(192, 0, 2, 50),
            siaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: [2, 0, 0, 0, 0, 1],
            options: o,
        }
    }

    #[test]
    fn lease_times_follow_rfc2131_defaults() {
        let now = Instant::now();
        let src = Ipv4Addr::new(192, 0, 2, 1);
        let l = Lease::from_ack(
            &ack(&[(51, &3600u32.to_be_bytes()), (1, &[255, 255, 254, 0])]),
            src,
            [0; 6],
            now,
        )
        .unwrap();
        assert_eq!((l.lease_secs, l.t1, l.t2), (3600, 1800, 3150));
        assert_eq!(l.prefix, 23);
        assert_eq!(l.server, src, "no option 54 and no siaddr: the sender");
        assert_eq!(l.at(l.t1), Some(now + Duration::from_secs(1800)));

        // Explicit T1/T2 win; a T2 beyond the lease is ignored.
        let l = Lease::from_ack(
            &ack(&[
                (51, &120u32.to_be_bytes()),
                (58, &2u32.to_be_bytes()),
                (59, &500u32.to_be_bytes()),
                (54, &[192, 0, 2, 9]),
            ]),
            src,
            [0; 6],
            now,
        )
        .unwrap();
        assert_eq!((l.t1, l.t2), (2, 105));
        assert_eq!(l.server, Ipv4Addr::new(192, 0, 2, 9));
        assert_eq!(l.prefix, 24, "classful default for 192.0.2.50");

        let forever = Lease::from_ack(&ack(&[(51, &[0xff; 4])]), src, [0; 6], now).unwrap();
        assert_eq!(forever.at(forever.t1), None);
    }

    #[test]
    fn a_cable_back_is_noticed_once() {
        let mut w = CarrierWatch::new((Some(false), Some(4)));
        assert!(!w.replugged((Some(false), Some(4))), "still out");
        assert!(w.replugged((Some(true), Some(5))), "plugged in");
        assert!(!w.replugged((Some(true), Some(5))), "noticed once");
        // Out and in again between two looks: only the count tells.
        assert!(w.replugged((Some(true), Some(7))));
        // Out at this look: not back yet.
        assert!(!w.replugged((Some(false), Some(8))));
        // A kernel without the count: only a look that saw it down tells.
        let mut w = CarrierWatch::new((Some(true), None));
        assert!(!w.replugged((Some(true), None)));
        assert!(!w.replugged((Some(false), None)));
        assert!(w.replugged((Some(true), None)));
        // A failed look changes nothing.
        let mut w = CarrierWatch::new((Some(false), Some(1)));
        assert!(!w.replugged((None, None)));
        assert!(w.replugged((Some(true), Some(2))));
    }

    #[test]
    fn netmasks() {
        assert_eq!(mask_prefix(Ipv4Addr::new(255, 255, 255, 0)), Some(24));
        assert_eq!(mask_prefix(Ipv4Addr::new(255, 255, 255, 255)), Some(32));
        assert_eq!(mask_prefix(Ipv4Addr::new(255, 0, 255, 0)), None);
        assert_eq!(mask_prefix(Ipv4Addr::new(0, 0, 0, 0)), None);
        assert!(Lease::from_ack(
            &ack(&[(1, &[255, 0, 255, 0])]),
            Ipv4Addr::LOCALHOST,
            [0; 6],
            Instant::now()
        )
        .is_err());
    }
}
