//! rtnetlink: the links, IPv4 addresses and IPv4 routes the appliance needs, and the
//! dumps that read them back.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};

use super::{attr_string, attr_u32, attrs, MsgBuilder, Socket, NLM_F_CREATE, NLM_F_REPLACE};

// Message types (include/uapi/linux/rtnetlink.h).
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;

// Link attributes (include/uapi/linux/if_link.h).
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_CARRIER_CHANGES: u16 = 35;
const IFLA_INFO_KIND: u16 = 1;

// Address attributes (include/uapi/linux/if_addr.h).
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const IFA_CACHEINFO: u16 = 6;

// Route attributes and values.
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PRIORITY: u16 = 6;
const RTA_TABLE: u16 = 15;
pub const RT_TABLE_MAIN: u8 = 254;
pub const RTPROT_KERNEL: u8 = 2;
pub const RTPROT_STATIC: u8 = 4;
pub const RTPROT_DHCP: u8 = 16;
pub const RT_SCOPE_UNIVERSE: u8 = 0;
pub const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;

pub const IFF_UP: u32 = libc::IFF_UP as u32;
pub const IFF_LOOPBACK: u32 = libc::IFF_LOOPBACK as u32;
pub const ARPHRD_ETHER: u16 = 1;
/// The kernel's "forever" for address lifetimes.
pub const INFINITY_LIFE_TIME: u32 = u32::MAX;

const AF_INET: u8 = libc::AF_INET as u8;

/// A network interface as rtnetlink reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// Hardware address, for links that have a 6-byte one.
    pub mac: Option<[u8; 6]>,
    /// ARPHRD_* type (1 = Ethernet).
    pub link_type: u16,
    pub flags: u32,
    /// Driver kind for virtual links (`veth`, `bond`, `dummy`…); physical NICs have none.
    pub kind: Option<String>,
    /// How often the carrier came or went since the link was created (a brief unplug
    /// between two looks at `flags` still counts).
    pub carrier_changes: Option<u32>,
}

/// An IPv4 address on a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr {
    pub index: u32,
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

/// An IPv4 route in the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub protocol: u8,
    pub scope: u8,
    pub metric: Option<u32>,
}

impl Route {
    /// A default route via `gateway` out of `oif`.
    pub fn default_via(gateway: Ipv4Addr, oif: u32, protocol: u8) -> Route {
        Route {
            dst: Ipv4Addr::UNSPECIFIED,
            prefix: 0,
            gateway: Some(gateway),
            oif: Some(oif),
            protocol,
            scope: RT_SCOPE_UNIVERSE,
            metric: None,
        }
    }

    /// A directly connected host route (for a gateway outside the address's subnet).
    pub fn on_link(dst: Ipv4Addr, prefix: u8, oif: u32, protocol: u8) -> Route {
        Route {
            dst,
            prefix,
            gateway: None,
            oif: Some(oif),
            protocol,
            scope: RT_SCOPE_LINK,
            metric: None,
        }
    }
}

/// rtnetlink operations over one socket.
pub struct Rtnl {
    sock: Socket,
}

impl Rtnl {
    pub fn open() -> Result<Rtnl> {
        Ok(Rtnl {
            sock: Socket::route()?,
        })
    }

    pub fn links(&mut self) -> Result<Vec<Link>> {
        let mut m = MsgBuilder::new(RTM_GETLINK, 0);
        m.header(&ifinfomsg(0, 0, 0));
        let replies = self.sock.dump(&m).context("listing network links")?;
        Ok(replies
            .iter()
            .filter_map(|r| parse_link(&r.payload))
            .collect())
    }

    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>> {
        Ok(self.links()?.into_iter().find(|l| l.name == name))
    }

    /// Set a link administratively up.
    pub fn set_up(&mut self, index: u32) -> Result<()> {
        let mut m = MsgBuilder::new(RTM_NEWLINK, 0);
        m.header(&ifinfomsg(index, IFF_UP, IFF_UP));
        self.sock
            .request(&m)
            .with_context(|| format!("setting link {index} up"))
    }

    pub fn addresses(&mut self) -> Result<Vec<Addr>> {
        let mut m = MsgBuilder::new(RTM_GETADDR, 0);
        m.header(&ifaddrmsg(0, 0));
        let replies = self.sock.dump(&m).context("listing IPv4 addresses")?;
        Ok(replies
            .iter()
            .filter_map(|r| parse_addr(&r.payload))
            .collect())
    }

    /// Add (or update) an address; `lifetime` is (valid, preferred) seconds, `None` = forever.
    pub fn add_address(
        &mut self,
        index: u32,
        addr: Ipv4Addr,
        prefix: u8,
        lifetime: Option<(u32, u32)>,
    ) -> Result<()> {
        let mut m = MsgBuilder::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE);
        m.header(&ifaddrmsg(index, prefix))
            .attr(IFA_LOCAL, &addr.octets())
            .attr(IFA_ADDRESS, &addr.octets());
        if prefix < 31 {
            m.attr(IFA_BROADCAST, &broadcast(addr, prefix).octets());
        }
        if let Some((valid, preferred)) = lifetime {
            let mut ci = Vec::with_capacity(16);
            ci.extend_from_slice(&preferred.to_ne_bytes());
            ci.extend_from_slice(&valid.to_ne_bytes());
            ci.extend_from_slice(&[0; 8]);
            m.attr(IFA_CACHEINFO, &ci);
        }
        self.sock
            .request(&m)
            .with_context(|| format!("adding address {addr}/{prefix} to link {index}"))
    }

    pub fn del_address(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) -> Result<()> {
        let mut m = MsgBuilder::new(RTM_DELADDR, 0);
        m.header(&ifaddrmsg(index, prefix))
            .attr(IFA_LOCAL, &addr.octets())
            .attr(IFA_ADDRESS, &addr.octets());
        self.sock
            .request(&m)
            .with_context(|| format!("removing address {addr}/{prefix} from link {index}"))
    }

    /// IPv4 routes of the main table.
    pub fn routes(&mut self) -> Result<Vec<Route>> {
        let mut m = MsgBuilder::new(RTM_GETROUTE, 0);
        m.header(&rtmsg(0, RT_TABLE_MAIN, 0, 0, 0));
        let replies = self.sock.dump(&m).context("listing IPv4 routes")?;
        Ok(replies
            .iter()
            .filter_map(|r| parse_route(&r.payload))
            .collect())
    }

    /// Add or replace a route in the main table.
    pub fn add_route(&mut self, r: &Route) -> Result<()> {
        let mut m = MsgBuilder::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE);
        route_attrs(&mut m, r);
        self.sock
            .request(&m)
            .with_context(|| format!("adding route {}", describe(r)))
    }

    pub fn del_route(&mut self, r: &Route) -> Result<()> {
        let mut m = MsgBuilder::new(RTM_DELROUTE, 0);
        route_attrs(&mut m, r);
        self.sock
            .request(&m)
            .with_context(|| format!("removing route {}", describe(r)))
    }
}

fn describe(r: &Route) -> String {
    let mut s = format!("{}/{}", r.dst, r.prefix);
    if let Some(g) = r.gateway {
        s.push_str(&format!(" via {g}"));
    }
    if let Some(o) = r.oif {
        s.push_str(&format!(" dev #{o}"));
    }
    s
}

fn route_attrs(m: &mut MsgBuilder, r: &Route) {
    m.header(&rtmsg(
        r.prefix,
        RT_TABLE_MAIN,
        r.protocol,
        r.scope,
        RTN_UNICAST,
    ));
    m.attr_u32(RTA_TABLE, RT_TABLE_MAIN as u32);
    if r.prefix > 0 {
        m.attr(RTA_DST, &r.dst.octets());
    }
    if let Some(g) = r.gateway {
        m.attr(RTA_GATEWAY, &g.octets());
    }
    if let Some(o) = r.oif {
        m.attr_u32(RTA_OIF, o);
    }
    if let Some(p) = r.metric {
        m.attr_u32(RTA_PRIORITY, p);
    }
}

fn broadcast(addr: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    Ipv4Addr::from(u32::from(addr) | !mask)
}

/// struct ifinfomsg { family, pad, type, index, flags, change }.
fn ifinfomsg(index: u32, flags: u32, change: u32) -> Vec<u8> {
    let mut h = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
    h.extend_from_slice(&(index as i32).to_ne_bytes());
    h.extend_from_slice(&flags.to_ne_bytes());
    h.extend_from_slice(&change.to_ne_bytes());
    h
}

/// struct ifaddrmsg { family, prefixlen, flags, scope, index }.
fn ifaddrmsg(index: u32, prefix: u8) -> Vec<u8> {
    let mut h = vec![AF_INET, prefix, 0, RT_SCOPE_UNIVERSE];
    h.extend_from_slice(&index.to_ne_bytes());
    h
}

/// struct rtmsg { family, dst_len, src_len, tos, table, protocol, scope, type, flags }.
fn rtmsg(dst_len: u8, table: u8, protocol: u8, scope: u8, ty: u8) -> Vec<u8> {
    let mut h = vec![AF_INET, dst_len, 0, 0, table, protocol, scope, ty];
    h.extend_from_slice(&0u32.to_ne_bytes());
    h
}

fn ipv4(data: &[u8]) -> Option<Ipv4Addr> {
    let b: [u8; 4] = data.get(..4)?.try_into().ok()?;
    Some(Ipv4Addr::from(b))
}

fn parse_link(p: &[u8]) -> Option<Link> {
    let link_type = u16::from_ne_bytes(p.get(2..4)?.try_into().ok()?);
    let index = i32::from_ne_bytes(p.get(4..8)?.try_into().ok()?) as u32;
    let flags = u32::from_ne_bytes(p.get(8..12)?.try_into().ok()?);
    let mut link = Link {
        index,
        name: String::new(),
        mac: None,
        link_type,
        flags,
        kind: None,
        carrier_changes: None,
    };
    for (ty, data) in attrs(p.get(16..)?) {
        match ty {
            IFLA_IFNAME => link.name = attr_string(data),
            IFLA_ADDRESS if data.len() == 6 => link.mac = data.try_into().ok(),
            IFLA_CARRIER_CHANGES => {
                link.carrier_changes = data.try_into().ok().map(u32::from_ne_bytes)
            }
            IFLA_LINKINFO => {
                link.kind = attrs(data)
                    .find(|(t, _)| *t == IFLA_INFO_KIND)
                    .map(|(_, d)| attr_string(d));
            }
            _ => {}
        }
    }
    Some(link)
}

fn parse_addr(p: &[u8]) -> Option<Addr> {
    if *p.first()? != AF_INET {
        return None;
    }
    let prefix = *p.get(1)?;
    let index = u32::from_ne_bytes(p.get(4..8)?.try_into().ok()?);
    let mut local = None;
    let mut address = None;
    for (ty, data) in attrs(p.get(8..)?) {
        match ty {
            IFA_LOCAL => local = ipv4(data),
            IFA_ADDRESS => address = ipv4(data),
            _ => {}
        }
    }
    Some(Addr {
        index,
        addr: local.or(address)?,
        prefix,
    })
}

fn parse_route(p: &[u8]) -> Option<Route> {
    if *p.first()? != AF_INET {
        return None;
    }
    let prefix = *p.get(1)?;
    let table = *p.get(4)?;
    let protocol = *p.get(5)?;
    let scope = *p.get(6)?;
    let mut r = Route {
        dst: Ipv4Addr::UNSPECIFIED,
        prefix,
        gateway: None,
        oif: None,
        protocol,
        scope,
        metric: None,
    };
    let mut table32 = table as u32;
    for (ty, data) in attrs(p.get(12..)?) {
        match ty {
            RTA_DST => r.dst = ipv4(data)?,
            RTA_GATEWAY => r.gateway = ipv4(data),
            RTA_OIF => r.oif = attr_u32(data),
            RTA_PRIORITY => r.metric = attr_u32(data),
            RTA_TABLE => table32 = attr_u32(data)?,
            _ => {}
        }
    }
    (table32 == RT_TABLE_MAIN as u32).then_some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_addresses() {
        assert_eq!(
            broadcast(Ipv4Addr::new(10, 10, 10, 2), 24),
            Ipv4Addr::new(10, 10, 10, 255)
        );
        assert_eq!(
            broadcast(Ipv4Addr::new(192, 168, 1, 77), 23),
            Ipv4Addr::new(192, 168, 1, 255)
        );
    }

    #[test]
    fn parses_a_link_message() {
        let mut m = MsgBuilder::new(RTM_NEWLINK, 0);
        let mut hdr = vec![0u8, 0];
        hdr.extend_from_slice(&ARPHRD_ETHER.to_ne_bytes());
        hdr.extend_from_slice(&7i32.to_ne_bytes());
        hdr.extend_from_slice(&(IFF_UP).to_ne_bytes());
        hdr.extend_from_slice(&0u32.to_ne_bytes());
        m.header(&hdr)
            .attr_str(IFLA_IFNAME, "eth1")
            .attr(IFLA_ADDRESS, &[2, 0, 0, 0, 0, 9])
            .nested(IFLA_LINKINFO, |m| {
                m.attr_str(IFLA_INFO_KIND, "veth");
            })
            .attr(IFLA_CARRIER_CHANGES, &3u32.to_ne_bytes());
        let b = m.finish(1);
        let l = parse_link(&b[16..]).unwrap();
        assert_eq!(
            l,
            Link {
                index: 7,
                name: "eth1".into(),
                mac: Some([2, 0, 0, 0, 0, 9]),
                link_type: ARPHRD_ETHER,
                flags: IFF_UP,
                kind: Some("veth".into()),
                carrier_changes: Some(3),
            }
        );
    }
}
