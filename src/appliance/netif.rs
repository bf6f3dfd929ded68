//! The PXE interface as the services see it: index, MAC and MTU, and (for `serve` on a
//! host) bringing it up with the appliance address, over the appliance's rtnetlink.

use std::io;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;

use anyhow::{bail, Context, Result};

use crate::appliance::netlink::route::{Rtnl, IFF_UP};
use crate::config::Ipv4Cidr;

/// Assumed when the MTU cannot be read (Ethernet).
const DEFAULT_MTU: u32 = 1500;

/// What the services need to know about the PXE interface.
#[derive(Clone, Debug)]
pub struct Iface {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// SIOCGIFMTU: rtnetlink's link dump has it too, but not in the parsed `Link`.
fn mtu(name: &str) -> io::Result<u32> {
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: [u8; 24],
    }
    let mut r = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: [0; 24],
    };
    let n = name.len().min(libc::IFNAMSIZ - 1);
    r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    // SAFETY: `r` is a properly sized ifreq for SIOCGIFMTU.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut r as *mut IfReq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u32::from_ne_bytes([
        r.data[0], r.data[1], r.data[2], r.data[3],
    ]))
}

impl Iface {
    pub fn lookup(name: &str) -> Result<Iface> {
        let link = Rtnl::open()?
            .link_by_name(name)?
            .with_context(|| format!("no network interface named {name}"))?;
        let Some(mac) = link.mac else {
            bail!("{name} is not an Ethernet interface (no MAC address)");
        };
        Ok(Iface {
            name: link.name,
            index: link.index,
            mac,
            mtu: mtu(name).unwrap_or(DEFAULT_MTU),
        })
    }

    /// Set the interface up if it is not. Returns whether it did.
    pub fn ensure_up(&self) -> Result<bool> {
        let mut rtnl = Rtnl::open()?;
        let link = rtnl
            .link_by_name(&self.name)?
            .with_context(|| format!("{} went away", self.name))?;
        if link.flags & IFF_UP != 0 {
            return Ok(false);
        }
        rtnl.set_up(self.index)
            .with_context(|| format!("setting {} up", self.name))?;
        Ok(true)
    }

    /// The IPv4 addresses on this interface.
    pub fn ipv4_addrs(&self) -> Result<Vec<Ipv4Addr>> {
        Ok(Rtnl::open()?
            .addresses()?
            .into_iter()
            .filter(|a| a.index == self.index)
            .map(|a| a.addr)
            .collect())
    }

    /// Give the interface `cidr` unless it already has that address. Returns the address
    /// it added, which is removed again when dropped; `None` when it was there already.
    pub fn ensure_address(&self, cidr: Ipv4Cidr) -> Result<Option<AddedAddress>> {
        if self.ipv4_addrs()?.contains(&cidr.addr) {
            return Ok(None);
        }
        Rtnl::open()?
            .add_address(self.index, cidr.addr, cidr.prefix, None)
            .with_context(|| format!("adding {cidr} to {}", self.name))?;
        Ok(Some(AddedAddress {
            iface: self.clone(),
            cidr,
        }))
    }
}

/// An address `serve` gave a host's interface: taken away again when dropped, so the
/// host is left as it was, whether serve stops or fails to start.
#[derive(Debug)]
pub struct AddedAddress {
    iface: Iface,
    cidr: Ipv4Cidr,
}

impl Drop for AddedAddress {
    fn drop(&mut self) {
        let removed = Rtnl::open()
            .and_then(|mut r| r.del_address(self.iface.index, self.cidr.addr, self.cidr.prefix));
        if let Err(e) = removed {
            eprintln!(
                "warning: could not remove {} from {}: {e:#}",
                self.cidr, self.iface.name
            );
        }
    }
}
