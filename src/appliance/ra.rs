//! An IPv6 router advertisement on the PXE link saying "no router here" (router lifetime
//! 0, no prefix), so iPXE finishes IPv6 configuration at once instead of waiting ~13 s
//! for a router that will never come. Sent at start, every minute, and in answer to
//! every router solicitation.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::appliance::events::{Event, EventLog};
use crate::appliance::netif::Iface;

const ICMPV6_RS: u8 = 133;
const ICMPV6_RA: u8 = 134;
/// Neighbour discovery requires hop limit 255 (RFC 4861 6.1.2).
const ND_HOP_LIMIT: u32 = 255;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
const UNSOLICITED_EVERY: Duration = Duration::from_secs(60);
/// Until the link-local address is usable (DAD), retry this often.
const RETRY: Duration = Duration::from_secs(1);
/// Give up unsolicited sending after this many failures (no IPv6 on the link).
const MAX_FAILURES: u32 = 30;
const READ_TIMEOUT: Duration = Duration::from_millis(500);

/// The advertisement: type, code, checksum (the kernel fills it), cur hop limit 0,
/// flags 0 (no M/O), router lifetime 0, reachable 0, retrans 0, and our link-layer
/// address (option 1, length 1 = 8 bytes).
pub fn advertisement(mac: [u8; 6]) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[0] = ICMPV6_RA;
    b[16] = 1;
    b[17] = 1;
    b[18..24].copy_from_slice(&mac);
    b
}

pub struct Advertiser {
    sock: Socket,
    iface: Iface,
}

impl Advertiser {
    pub fn bind(iface: &Iface) -> Result<Advertiser> {
        let sock = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
            .context("opening an ICMPv6 socket")?;
        sock.bind_device(Some(iface.name.as_bytes()))
            .with_context(|| format!("binding ICMPv6 to {}", iface.name))?;
        sock.set_multicast_hops_v6(ND_HOP_LIMIT)?;
        sock.set_unicast_hops_v6(ND_HOP_LIMIT)?;
        sock.set_multicast_if_v6(iface.index)?;
        sock.set_multicast_loop_v6(false)?;
        // Solicitations go to all-routers, a group only routers join.
        sock.join_multicast_v6(&ALL_ROUTERS, iface.index)
            .context("joining ff02::2")?;
        sock.set_read_timeout(Some(READ_TIMEOUT))?;
        Ok(Advertiser {
            sock,
            iface: iface.clone(),
        })
    }

    fn send(&self) -> std::io::Result<usize> {
        let dest = SocketAddrV6::new(ALL_NODES, 0, 0, self.iface.index);
        self.sock
            .send_to(&advertisement(self.iface.mac), &SocketAddr::V6(dest).into())
    }

    pub fn run(self, stop: Arc<AtomicBool>, events: EventLog) {
        let mut next = Instant::now();
        let mut failures = 0u32;
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if failures < MAX_FAILURES && now >= next {
                match self.send() {
                    Ok(_) => {
                        failures = 0;
                        next = now + UNSOLICITED_EVERY;
                    }
                    Err(e) => {
                        failures += 1;
                        next = now + RETRY;
                        if failures == MAX_FAILURES {
                            events.emit(
                                Event::new("ipv6-ra-off")
                                    .warning()
                                    .field("interface", self.iface.name.clone())
                                    .field("error", e.to_string())
                                    .field(
                                        "note",
                                        "no IPv6 on this link: iPXE may wait ~13 s for it",
                                    ),
                            );
                        }
                    }
                }
            }
            if let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                // SAFETY: recv_from initialised the first n bytes.
                let first = n.checked_sub(1).map(|_| unsafe { buf[0].assume_init() });
                if first == Some(ICMPV6_RS) {
                    let _ = self.send();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn layout() {
        // RFC 4861 4.2: type 134, router lifetime (bytes 6-7) 0, then the SLLA option.
        let b = super::advertisement([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
        assert_eq!(b[0], 134);
        assert_eq!(&b[4..16], &[0; 12]);
        assert_eq!(&b[16..24], &[1, 1, 0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
    }
}
