//! The appliance's network: which NIC is which, the PXE link's static address, the
//! uplink (DHCP client or static settings), forwarding and NAT, and the DNS forwarder.
//!
//! [`bring_up`] does all of it in order for the init. The pieces are public so that
//! `mkappliance serve --uplink IFACE` can reuse NAT and forwarding on a host whose
//! uplink is already configured ([`HostUplink`]).

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::netlink::route::{Route, Rtnl, ARPHRD_ETHER, IFF_LOOPBACK, RTPROT_STATIC};
use super::{dhcpc, dns, nat};
use crate::config::{ApplianceConfig, Ipv4Cidr, Mac, Network};

pub const SYS_CLASS_NET: &str = "/sys/class/net";
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const DNS_PORT: u16 = 53;
const NIC_POLL: Duration = Duration::from_millis(50);
/// Virtual links that still count as a cable to a NIC: veth is how containers and our
/// tests wire namespaces. Bond, dummy, gretap… (built into the Talos kernel, created at
/// boot) have other kinds and are never picked.
const CABLE_KINDS: &[&str] = &["veth"];

/// An Ethernet NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub name: String,
    pub index: u32,
    pub mac: Mac,
    /// The NIC's device in sysfs (its PCI path), which orders NICs like the slots do.
    pub device: Option<PathBuf>,
}

impl fmt::Display for Nic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.mac)
    }
}

/// Every Ethernet NIC, physical ones first in bus order, then the rest by index.
pub fn list_nics(rtnl: &mut Rtnl, sys_class_net: &Path) -> Result<Vec<Nic>> {
    let mut nics: Vec<Nic> = rtnl
        .links()?
        .into_iter()
        .filter(|l| {
            l.link_type == ARPHRD_ETHER
                && l.flags & IFF_LOOPBACK == 0
                && l.kind.as_deref().is_none_or(|k| CABLE_KINDS.contains(&k))
        })
        .filter_map(|l| {
            let mac = Mac(l.mac?);
            if mac.0 == [0; 6] {
                return None;
            }
            Some(Nic {
                device: nic_device(sys_class_net, &l.name),
                name: l.name,
                index: l.index,
                mac,
            })
        })
        .collect();
    sort_nics(&mut nics);
    Ok(nics)
}

/// The NIC's bus device (`/sys/class/net/NAME/device` resolved), for physical NICs.
fn nic_device(sys_class_net: &Path, name: &str) -> Option<PathBuf> {
    std::fs::canonicalize(sys_class_net.join(name).join("device")).ok()
}

fn sort_nics(nics: &mut [Nic]) {
    nics.sort_by(|a, b| {
        (a.device.is_none(), &a.device, a.index).cmp(&(b.device.is_none(), &b.device, b.index))
    });
}

/// Which NIC does what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicRoles {
    pub pxe: Nic,
    pub uplink: Option<Nic>,
    /// Why there is no uplink, when there is none.
    pub no_uplink: Option<String>,
}

/// PXE NIC by `internal_mac`, else the first NIC that is not the uplink's; uplink by
/// `uplink_mac`, else the first other NIC.
pub fn assign_roles(nics: &[Nic], internal: Option<Mac>, uplink: Option<Mac>) -> Result<NicRoles> {
    let seen = || {
        if nics.is_empty() {
            "none".to_string()
        } else {
            nics.iter()
                .map(Nic::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let pxe = match internal {
        Some(m) => nics
            .iter()
            .find(|n| n.mac == m)
            .with_context(|| format!("no NIC has the --internal-mac {m} (NICs: {})", seen()))?,
        None => nics
            .iter()
            .find(|n| Some(n.mac) != uplink)
            .with_context(|| format!("no Ethernet NIC for the PXE link (NICs: {})", seen()))?,
    };
    let (up, no_uplink) = match uplink {
        Some(m) => match nics.iter().find(|n| n.mac == m) {
            Some(n) => (Some(n.clone()), None),
            None => (None, Some(format!("no NIC has the --uplink-mac {m}"))),
        },
        None => match nics.iter().find(|n| n.index != pxe.index) {
            Some(n) => (Some(n.clone()), None),
            None => (None, Some(format!("{} is the only NIC", pxe.name))),
        },
    };
    Ok(NicRoles {
        pxe: pxe.clone(),
        uplink: up,
        no_uplink,
    })
}

/// How long [`find_nics`] waits for drivers to register their NICs.
#[derive(Debug, Clone, Copy)]
pub struct NicWait {
    /// For the PXE NIC.
    pub pxe: Duration,
    /// For an uplink pinned by MAC (`uplink_mac`), once the PXE NIC is there.
    pub uplink: Duration,
}

impl Default for NicWait {
    fn default() -> Self {
        NicWait {
            pxe: Duration::from_secs(10),
            uplink: Duration::from_secs(2),
        }
    }
}

/// Wait for the NICs (drivers probe asynchronously after their modules load), then
/// assign roles. Fails only when there is no PXE NIC.
pub fn find_nics(net: &Network, wait: NicWait) -> Result<NicRoles> {
    let mut rtnl = Rtnl::open()?;
    let start = Instant::now();
    let mut pxe_seen: Option<Instant> = None;
    loop {
        let nics = list_nics(&mut rtnl, Path::new(SYS_CLASS_NET))?;
        let now = Instant::now();
        let has_pxe = match net.internal_mac {
            Some(m) => nics.iter().any(|n| n.mac == m),
            None => nics.iter().any(|n| Some(n.mac) != net.uplink_mac),
        };
        if has_pxe {
            let since = *pxe_seen.get_or_insert(now);
            // PCI NIC drivers probe while their module loads, so an unpinned second NIC
            // is there by now or not at all; only a pinned (maybe slow, USB) uplink is
            // worth waiting for, and waiting for nothing would slow every offline boot.
            let settled = match net.uplink_mac {
                Some(m) => nics.iter().any(|n| n.mac == m) || now >= since + wait.uplink,
                None => true,
            };
            if settled {
                return assign_roles(&nics, net.internal_mac, net.uplink_mac);
            }
        } else if now >= start + wait.pxe {
            return assign_roles(&nics, net.internal_mac, net.uplink_mac)
                .with_context(|| format!("after waiting {} s for NICs", wait.pxe.as_secs()));
        }
        std::thread::sleep(NIC_POLL);
    }
}

/// The configured PXE link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PxeLink {
    pub nic: Nic,
    pub address: Ipv4Cidr,
}

/// Bring the loopback interface up (nobody else does in our initramfs).
pub fn loopback_up() -> Result<()> {
    let mut rtnl = Rtnl::open()?;
    let lo = rtnl
        .links()?
        .into_iter()
        .find(|l| l.flags & IFF_LOOPBACK != 0)
        .context("no loopback interface")?;
    rtnl.set_up(lo.index).context("bringing up loopback")
}

/// Put the appliance address on the PXE NIC (replacing any other IPv4 address there)
/// and bring it up.
pub fn setup_pxe(cfg: &ApplianceConfig, nic: &Nic) -> Result<PxeLink> {
    let want = cfg.network.appliance;
    let configure = || -> Result<()> {
        let mut rtnl = Rtnl::open()?;
        let stale: Vec<_> = rtnl
            .addresses()?
            .into_iter()
            .filter(|a| a.index == nic.index && (a.addr, a.prefix) != (want.addr, want.prefix))
            .collect();
        for a in stale {
            rtnl.del_address(a.index, a.addr, a.prefix)?;
        }
        rtnl.add_address(nic.index, want.addr, want.prefix, None)?;
        rtnl.set_up(nic.index)
    };
    configure().with_context(|| format!("configuring the PXE NIC {nic}"))?;
    Ok(PxeLink {
        nic: nic.clone(),
        address: want,
    })
}

/// Turn IPv4 forwarding on or off; returns whether it was on before.
pub fn set_forwarding(on: bool) -> Result<bool> {
    let before = std::fs::read_to_string(IP_FORWARD)
        .with_context(|| format!("reading {IP_FORWARD}"))?
        .trim()
        == "1";
    std::fs::write(IP_FORWARD, if on { "1\n" } else { "0\n" })
        .with_context(|| format!("writing {IP_FORWARD}"))?;
    Ok(before)
}

/// The appliance has no IPv6 service; without IPv6 on the uplink the kernel answers
/// nothing there either. Best effort: kernels without IPv6 have no such file.
fn disable_ipv6(ifname: &str) {
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"),
        "1\n",
    );
}

/// The uplink's state, for the console banner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UplinkState {
    /// No uplink, or it has no address (yet): the PXE services keep working.
    Offline {
        reason: String,
    },
    /// The DHCP client is asking for a lease.
    Acquiring {
        ifname: String,
    },
    Online(UplinkInfo),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkInfo {
    pub ifname: String,
    pub address: Ipv4Cidr,
    pub gateway: Option<Ipv4Addr>,
    /// The servers the DNS forwarder relays to.
    pub dns: Vec<Ipv4Addr>,
    /// `None` for static settings.
    pub dhcp: Option<DhcpInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpInfo {
    pub server: Ipv4Addr,
    pub lease_secs: u32,
    /// Times this lease was extended (0 for a fresh one).
    pub renewals: u32,
}

impl fmt::Display for UplinkState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UplinkState::Offline { reason } => write!(f, "offline: {reason}"),
            UplinkState::Acquiring { ifname } => write!(f, "{ifname}: asking for a DHCP lease"),
            UplinkState::Online(i) => {
                write!(f, "{} {}", i.ifname, i.address)?;
                match i.gateway {
                    Some(g) => write!(f, " via {g}")?,
                    None => write!(f, " (no gateway)")?,
                }
                let dns: Vec<String> = i.dns.iter().map(Ipv4Addr::to_string).collect();
                if dns.is_empty() {
                    write!(f, ", no DNS")?;
                } else {
                    write!(f, ", DNS {}", dns.join(" "))?;
                }
                match &i.dhcp {
                    None => write!(f, ", static"),
                    Some(d) => {
                        write!(f, ", DHCP from {}", d.server)?;
                        if d.lease_secs != u32::MAX {
                            write!(f, ", lease {} s", d.lease_secs)?;
                        }
                        if d.renewals > 0 {
                            write!(f, ", renewed {}x", d.renewals)?;
                        }
                        Ok(())
                    }
                }
            }
        }
    }
}

type Callback = Box<dyn Fn(&UplinkState) + Send>;

/// Keeps the latest uplink state and tells the callback about each change.
pub struct Reporter {
    state: Mutex<UplinkState>,
    callback: Mutex<Callback>,
}

impl Reporter {
    pub fn new(callback: impl Fn(&UplinkState) + Send + 'static) -> Reporter {
        Reporter {
            state: Mutex::new(UplinkState::Offline {
                reason: "not started".into(),
            }),
            callback: Mutex::new(Box::new(callback)),
        }
    }

    pub fn report(&self, s: UplinkState) {
        match self.state.lock() {
            Ok(mut g) => *g = s.clone(),
            Err(p) => *p.into_inner() = s.clone(),
        }
        let cb = self.callback.lock().unwrap_or_else(|p| p.into_inner());
        cb(&s);
    }

    pub fn current(&self) -> UplinkState {
        self.state
            .lock()
            .map(|g| g.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

/// The running uplink. Dropping it leaves the DHCP client running; [`UplinkHandle::stop`]
/// ends it (the address stays until its lifetime runs out).
pub struct UplinkHandle {
    pub ifname: Option<String>,
    upstreams: Arc<RwLock<Vec<SocketAddr>>>,
    reporter: Arc<Reporter>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UplinkHandle {
    /// The DNS servers to forward to; updated as leases come and go.
    pub fn upstreams(&self) -> Arc<RwLock<Vec<SocketAddr>>> {
        self.upstreams.clone()
    }

    pub fn state(&self) -> UplinkState {
        self.reporter.current()
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Configure the uplink: static settings when the config has an `uplink_address`, else a
/// DHCP client on its own thread. Every state change goes to `on_change` (the first one
/// before this returns). Never fails: problems leave the appliance offline, and say why.
pub fn setup_uplink(
    cfg: &ApplianceConfig,
    roles: &NicRoles,
    on_change: impl Fn(&UplinkState) + Send + 'static,
) -> UplinkHandle {
    let net = &cfg.network;
    let reporter = Arc::new(Reporter::new(on_change));
    let upstreams = Arc::new(RwLock::new(Vec::new()));
    dhcpc::set_upstreams(&upstreams, &net.uplink_dns);
    let mut handle = UplinkHandle {
        ifname: roles.uplink.as_ref().map(|n| n.name.clone()),
        upstreams: upstreams.clone(),
        reporter: reporter.clone(),
        stop: Arc::new(AtomicBool::new(false)),
        thread: None,
    };
    let Some(nic) = &roles.uplink else {
        let why = roles.no_uplink.as_deref().unwrap_or("no uplink NIC");
        reporter.report(UplinkState::Offline {
            reason: why.to_string(),
        });
        return handle;
    };
    disable_ipv6(&nic.name);
    let result = match net.uplink_address {
        Some(addr) => static_uplink(nic, addr, net.uplink_gateway).map(|()| {
            reporter.report(UplinkState::Online(UplinkInfo {
                ifname: nic.name.clone(),
                address: addr,
                gateway: net.uplink_gateway,
                dns: net.uplink_dns.clone(),
                dhcp: None,
            }));
        }),
        None => Rtnl::open()
            .and_then(|mut r| r.set_up(nic.index))
            .and_then(|()| {
                let settings = dhcpc::Settings {
                    ifname: nic.name.clone(),
                    index: nic.index,
                    mac: nic.mac.0,
                    dns_override: net.uplink_dns.clone(),
                };
                dhcpc::spawn(settings, upstreams, reporter.clone(), handle.stop.clone())
            })
            .map(|t| handle.thread = Some(t)),
    };
    if let Err(e) = result {
        reporter.report(UplinkState::Offline {
            reason: format!("setting up the uplink {nic}: {e:#}"),
        });
    }
    handle
}

fn static_uplink(nic: &Nic, addr: Ipv4Cidr, gateway: Option<Ipv4Addr>) -> Result<()> {
    let mut rtnl = Rtnl::open()?;
    rtnl.add_address(nic.index, addr.addr, addr.prefix, None)?;
    rtnl.set_up(nic.index)?;
    if let Some(gw) = gateway {
        rtnl.add_route(&Route::default_via(gw, nic.index, RTPROT_STATIC))?;
    }
    Ok(())
}

/// Everything the appliance's network is, once [`bring_up`] returns.
pub struct ApplianceNet {
    pub pxe: PxeLink,
    pub uplink: UplinkHandle,
    pub dns: Option<dns::DnsHandle>,
    /// What did not work but leaves the PXE services able to run (printed by the caller).
    pub warnings: Vec<String>,
}

/// Bring up the appliance's network, in order: loopback, NICs, PXE address, forwarding +
/// NAT + input guard (when there is an uplink), the uplink, the DNS forwarder on the PXE
/// address. Fails only when the PXE link cannot be configured.
pub fn bring_up(
    cfg: &ApplianceConfig,
    wait: NicWait,
    on_uplink: impl Fn(&UplinkState) + Send + 'static,
) -> Result<ApplianceNet> {
    let mut warnings = Vec::new();
    if let Err(e) = loopback_up() {
        warnings.push(format!("{e:#}"));
    }
    let roles = find_nics(&cfg.network, wait)?;
    let pxe = setup_pxe(cfg, &roles.pxe)?;
    if let Some(up) = &roles.uplink {
        let nat = set_forwarding(true).and_then(|_| {
            nat::enable_rules(&nat::NatRules {
                pxe_subnet: pxe.address,
                uplink: up.name.clone(),
                guard_input: true,
            })
        });
        if let Err(e) = nat {
            warnings.push(format!("NAT to the uplink is off: {e:#}"));
        }
    }
    let uplink = setup_uplink(cfg, &roles, on_uplink);
    let bind = SocketAddr::new(pxe.address.addr.into(), DNS_PORT);
    let dns = match dns::start(bind, uplink.upstreams()) {
        Ok(h) => Some(h),
        Err(e) => {
            warnings.push(format!("DNS forwarder is off: {e:#}"));
            None
        }
    };
    Ok(ApplianceNet {
        pxe,
        uplink,
        dns,
        warnings,
    })
}

/// `mkappliance serve --uplink IFACE`: NAT the PXE subnet out of a host's already
/// configured uplink. Dropping it removes the table and restores forwarding.
pub struct HostUplink {
    pub ifname: String,
    forwarding_was_on: bool,
}

impl HostUplink {
    pub fn enable(ifname: &str, pxe_subnet: Ipv4Cidr) -> Result<HostUplink> {
        let mut rtnl = Rtnl::open()?;
        if rtnl.link_by_name(ifname)?.is_none() {
            bail!("--uplink {ifname}: no such network interface");
        }
        let forwarding_was_on = set_forwarding(true)?;
        if let Err(e) = nat::enable(pxe_subnet, ifname) {
            if !forwarding_was_on {
                let _ = set_forwarding(false);
            }
            return Err(e);
        }
        Ok(HostUplink {
            ifname: ifname.to_string(),
            forwarding_was_on,
        })
    }
}

impl Drop for HostUplink {
    fn drop(&mut self) {
        let _ = nat::disable();
        if !self.forwarding_was_on {
            let _ = set_forwarding(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(name: &str, index: u32, last: u8, device: Option<&str>) -> Nic {
        Nic {
            name: name.into(),
            index,
            mac: Mac([2, 0, 0, 0, 0, last]),
            device: device.map(PathBuf::from),
        }
    }

    #[test]
    fn nics_sort_by_bus_path_then_index() {
        let mut v = vec![
            nic("veth9", 3, 9, None),
            nic(
                "enp0s4",
                9,
                4,
                Some("/sys/devices/pci0000:00/0000:00:04.0/virtio1"),
            ),
            nic("veth2", 2, 8, None),
            nic(
                "enp0s3",
                7,
                3,
                Some("/sys/devices/pci0000:00/0000:00:03.0/virtio0"),
            ),
        ];
        sort_nics(&mut v);
        let names: Vec<&str> = v.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["enp0s3", "enp0s4", "veth2", "veth9"]);
    }

    #[test]
    fn roles_by_mac_or_order() {
        let a = nic("eth0", 2, 1, None);
        let b = nic("eth1", 3, 2, None);
        let c = nic("eth2", 4, 3, None);
        let all = [a.clone(), b.clone(), c.clone()];
        let r = assign_roles(&all, None, None).unwrap();
        assert_eq!(
            (r.pxe.name.as_str(), r.uplink.unwrap().name.as_str()),
            ("eth0", "eth1")
        );
        // Uplink pinned to the first NIC: the PXE NIC is the next one.
        let r = assign_roles(&all, None, Some(a.mac)).unwrap();
        assert_eq!(
            (r.pxe.name.as_str(), r.uplink.unwrap().name.as_str()),
            ("eth1", "eth0")
        );
        let r = assign_roles(&all, Some(c.mac), None).unwrap();
        assert_eq!(
            (r.pxe.name.as_str(), r.uplink.unwrap().name.as_str()),
            ("eth2", "eth0")
        );
        // One NIC: offline, and why.
        let r = assign_roles(std::slice::from_ref(&b), None, None).unwrap();
        assert_eq!(r.uplink, None);
        assert_eq!(r.no_uplink.as_deref(), Some("eth1 is the only NIC"));
        let r = assign_roles(&all[..2], None, Some(c.mac)).unwrap();
        assert_eq!(
            r.no_uplink.unwrap(),
            "no NIC has the --uplink-mac 02:00:00:00:00:03"
        );
        let e = assign_roles(&all[..2], Some(c.mac), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no NIC has the --internal-mac 02:00:00:00:00:03 (NICs: eth0 (02:00:00:00:00:01), \
             eth1 (02:00:00:00:00:02))"
        );
        assert!(assign_roles(&[], None, None).is_err());
    }

    #[test]
    fn physical_nics_found_through_sysfs_links() {
        // A fake /sys/class/net: eth1's device link points at a PCI path.
        let tmp = tempfile::tempdir().unwrap();
        let pci = tmp.path().join("devices/pci0000:00/0000:00:05.0/virtio3");
        std::fs::create_dir_all(&pci).unwrap();
        let class = tmp.path().join("class/net/eth1");
        std::fs::create_dir_all(&class).unwrap();
        std::os::unix::fs::symlink(
            "../../../devices/pci0000:00/0000:00:05.0/virtio3",
            class.join("device"),
        )
        .unwrap();
        std::fs::create_dir_all(tmp.path().join("class/net/veth0")).unwrap();
        let net = tmp.path().join("class/net");
        assert_eq!(
            nic_device(&net, "eth1"),
            Some(
                std::fs::canonicalize(tmp.path())
                    .unwrap()
                    .join("devices/pci0000:00/0000:00:05.0/virtio3")
            )
        );
        assert_eq!(nic_device(&net, "veth0"), None);
        assert_eq!(nic_device(&net, "absent"), None);
    }

    #[test]
    fn uplink_state_lines() {
        let s = UplinkState::Online(UplinkInfo {
            ifname: "eth1".into(),
            address: "192.168.1.50/24".parse().unwrap(),
            gateway: Some(Ipv4Addr::new(192, 168, 1, 1)),
            dns: vec![Ipv4Addr::new(192, 168, 1, 1)],
            dhcp: Some(DhcpInfo {
                server: Ipv4Addr::new(192, 168, 1, 1),
                lease_secs: 86400,
                renewals: 2,
            }),
        });
        assert_eq!(
            s.to_string(),
            "eth1 192.168.1.50/24 via 192.168.1.1, DNS 192.168.1.1, DHCP from 192.168.1.1, \
             lease 86400 s, renewed 2x"
        );
        let s = UplinkState::Offline {
            reason: "eth0 is the only NIC".into(),
        };
        assert_eq!(s.to_string(), "offline: eth0 is the only NIC");
    }
}
