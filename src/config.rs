//! The appliance config: one typed struct, rendered into the image by `build` as
//! `/etc/appliance/appliance.toml` and read back by the appliance, `serve` and
//! `inspect`. The dnsmasq/nginx/iPXE files are views of it, never a second source.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

/// Schema version of appliance.toml; bump when a field changes meaning.
pub const CONFIG_SCHEMA: u32 = 1;

/// Kernel arguments Talos v1.11 uses for metal PXE boots on amd64 (DESIGN.md).
pub const TALOS_PXE_ARGS: &str = "talos.platform=metal console=tty0 init_on_alloc=1 slab_nomerge pti=on consoleblank=0 nvme_core.io_timeout=4294967295 printk.devkmsg=on selinux=1";

/// An Ethernet MAC address, printed lower-case with colons (dnsmasq's form).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Mac(pub [u8; 6]);

impl FromStr for Mac {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Mac> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        let valid = parts.len() == 6
            && parts
                .iter()
                .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
        ensure!(
            valid,
            "malformed MAC address {s:?}: expected six hex pairs like 00:11:22:33:44:55"
        );
        let mut b = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            b[i] = u8::from_str_radix(p, 16)?;
        }
        ensure!(
            b[0] & 1 == 0,
            "MAC address {s:?} is a multicast address; give the NIC's own (unicast) MAC"
        );
        ensure!(b != [0; 6], "MAC address {s:?} is all zeros");
        Ok(Mac(b))
    }
}

impl TryFrom<String> for Mac {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<Mac> {
        s.parse()
    }
}

impl From<Mac> for String {
    fn from(m: Mac) -> String {
        m.to_string()
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// An IPv4 address with prefix length, e.g. `10.10.10.2/24`.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        };
        Ipv4Addr::from(bits)
    }
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & u32::from(self.netmask()))
    }
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) | !u32::from(self.netmask()))
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & u32::from(self.netmask()) == u32::from(self.network())
    }
    /// True when `ip` is a usable host address of this subnet (not network/broadcast).
    pub fn is_host(&self, ip: Ipv4Addr) -> bool {
        self.contains(ip) && ip != self.network() && ip != self.broadcast()
    }
}

impl FromStr for Ipv4Cidr {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Ipv4Cidr> {
        let (a, p) = s.split_once('/').with_context(|| {
            format!("malformed address {s:?}: expected ADDRESS/PREFIX like 10.10.10.2/24")
        })?;
        let addr: Ipv4Addr = a
            .parse()
            .with_context(|| format!("malformed IPv4 address {a:?} in {s:?}"))?;
        let prefix: u8 = p
            .parse()
            .with_context(|| format!("malformed prefix length {p:?} in {s:?}"))?;
        ensure!(
            (8..=30).contains(&prefix),
            "prefix length /{prefix} in {s:?} is out of range: use /8 to /30"
        );
        let c = Ipv4Cidr { addr, prefix };
        ensure!(
            c.is_host(addr),
            "{s:?} is the network or broadcast address of its subnet"
        );
        Ok(c)
    }
}

impl TryFrom<String> for Ipv4Cidr {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<Ipv4Cidr> for String {
    fn from(c: Ipv4Cidr) -> String {
        c.to_string()
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl fmt::Debug for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// Check a Talos release tag such as `v1.11.6` or `v1.12.0-beta.1`.
pub fn check_talos_version(v: &str) -> Result<()> {
    let core = v.strip_prefix('v').unwrap_or("");
    let (nums, pre) = match core.split_once('-') {
        Some((n, p)) => (n, Some(p)),
        None => (core, None),
    };
    let ok_nums = nums.split('.').count() == 3
        && nums
            .split('.')
            .all(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
    let ok_pre = pre
        .is_none_or(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '.'));
    ensure!(
        ok_nums && ok_pre,
        "malformed Talos version {v:?}: expected a release tag like v1.11.6"
    );
    Ok(())
}

/// The ISO volume ID Talos uses for a version: `v1.11.6` → `TALOS_V1_11_6`.
pub fn talos_volume_id(version: &str) -> String {
    let mapped: String = version
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("TALOS_{mapped}")
}

/// A name that becomes a directory: letters, digits, `.`, `_`, `-`, not starting with `.`.
pub fn check_path_component(what: &str, v: &str) -> Result<()> {
    ensure!(
        !v.is_empty()
            && !v.starts_with('.')
            && v.len() <= 64
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')),
        "malformed {what} {v:?}: use letters, digits, '.', '_' and '-' only"
    );
    Ok(())
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// The appliance's address on the PXE link.
    pub appliance: Ipv4Cidr,
    /// The address the pinned node gets.
    pub minipc_ip: Ipv4Addr,
    /// Rendered into dnsmasq.conf as the original appliance did; only pinned MACs are served.
    pub dhcp_range: (Ipv4Addr, Ipv4Addr),
    pub lease_secs: u32,
    pub internal_mac: Option<Mac>,
    pub uplink_mac: Option<Mac>,
    /// Static uplink address for networks without DHCP; `None` = DHCP on the uplink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink_address: Option<Ipv4Cidr>,
    /// Default gateway with a static uplink address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink_gateway: Option<Ipv4Addr>,
    /// DNS servers the forwarder relays to; with DHCP they replace the lease's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uplink_dns: Vec<Ipv4Addr>,
}

impl Network {
    pub fn validate(&self) -> Result<()> {
        let a = self.appliance;
        ensure!(
            a.is_host(self.minipc_ip),
            "--minipc-ip {} is not a host address inside {} (subnet {}/{})",
            self.minipc_ip,
            a,
            a.network(),
            a.prefix
        );
        ensure!(
            self.minipc_ip != a.addr,
            "--minipc-ip {} is the appliance's own address",
            self.minipc_ip
        );
        let (lo, hi) = self.dhcp_range;
        for ip in [lo, hi] {
            ensure!(
                a.is_host(ip),
                "--dhcp-range address {ip} is not a host address inside {a}"
            );
        }
        ensure!(
            u32::from(lo) <= u32::from(hi),
            "--dhcp-range {lo},{hi}: the first address must not be above the last"
        );
        if let (Some(i), Some(u)) = (self.internal_mac, self.uplink_mac) {
            ensure!(i != u, "--internal-mac and --uplink-mac are both {i}");
        }
        self.validate_uplink()
    }

    fn validate_uplink(&self) -> Result<()> {
        let a = self.appliance;
        if let Some(u) = self.uplink_address {
            ensure!(
                !a.contains(u.network()) && !u.contains(a.network()),
                "--uplink-address {u} overlaps the PXE subnet {}/{}: the uplink must be \
                 another network",
                a.network(),
                a.prefix
            );
        }
        if let Some(g) = self.uplink_gateway {
            let u = self
                .uplink_address
                .with_context(|| format!("--uplink-gateway {g} needs --uplink-address"))?;
            ensure!(
                u.is_host(g) && g != u.addr,
                "--uplink-gateway {g} is not another host address inside {u} (subnet {}/{})",
                u.network(),
                u.prefix
            );
        }
        for d in &self.uplink_dns {
            ensure!(
                !(d.is_unspecified() || d.is_broadcast() || d.is_multicast() || d.is_loopback()),
                "--uplink-dns {d} is not a usable DNS server address"
            );
            ensure!(
                !a.contains(*d),
                "--uplink-dns {d} is inside the PXE subnet; give the uplink side's DNS servers"
            );
        }
        Ok(())
    }
}

pub fn parse_dhcp_range(s: &str) -> Result<(Ipv4Addr, Ipv4Addr)> {
    let (a, b) = s
        .split_once(',')
        .with_context(|| format!("malformed --dhcp-range {s:?}: expected FIRST,LAST"))?;
    let a = a
        .trim()
        .parse()
        .with_context(|| format!("malformed IPv4 address {a:?} in --dhcp-range"))?;
    let b = b
        .trim()
        .parse()
        .with_context(|| format!("malformed IPv4 address {b:?} in --dhcp-range"))?;
    Ok((a, b))
}

/// Files served over TFTP, by client type; `None` when not bundled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootFiles {
    pub ipxe_efi: String,
    pub ipxe_bios: Option<String>,
    pub ipxe_arm64: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplianceConfig {
    pub schema: u32,
    pub talos_version: String,
    pub bootstrap_version: String,
    /// The pinned node (the mini-PC).
    pub minipc_mac: Mac,
    pub network: Network,
    /// The full kernel command line the Talos node boots with.
    pub talos_kernel_args: String,
    pub boot_files: BootFiles,
    /// Serve `/configs/talosconfig` (the cluster admin credential); opt-in.
    pub serve_talosconfig: bool,
    /// After the node has fetched its whole config once, make its next boots exit iPXE to
    /// the local disk instead of reinstalling.
    pub boot_once: bool,
}

impl ApplianceConfig {
    pub fn appliance_ip(&self) -> Ipv4Addr {
        self.network.appliance.addr
    }

    pub fn http_base(&self) -> String {
        format!("http://{}", self.appliance_ip())
    }

    pub fn config_url(&self) -> String {
        format!("{}/configs/minipc.yaml", self.http_base())
    }

    /// Kernel args for the node: the Talos PXE defaults, the config URL, any extras.
    pub fn default_kernel_args(appliance_ip: Ipv4Addr, extra: Option<&str>) -> String {
        let mut s =
            format!("{TALOS_PXE_ARGS} talos.config=http://{appliance_ip}/configs/minipc.yaml");
        if let Some(e) = extra.map(str::trim).filter(|e| !e.is_empty()) {
            s.push(' ');
            s.push_str(e);
        }
        s
    }

    pub fn validate(&self) -> Result<()> {
        if self.schema != CONFIG_SCHEMA {
            bail!(
                "appliance config schema {} is not supported (this mkappliance reads {CONFIG_SCHEMA})",
                self.schema
            );
        }
        check_talos_version(&self.talos_version)?;
        check_path_component("bootstrap version", &self.bootstrap_version)?;
        // boot.ipxe puts them on one `kernel` line: a line break would end it and run the
        // rest as iPXE commands.
        if let Some(c) = self.talos_kernel_args.chars().find(|c| c.is_control()) {
            bail!(
                "the Talos kernel arguments contain the control character {c:?}: \
                 --extra-kernel-args must be one line of plain text"
            );
        }
        // The appliance's NICs share a link with the node (or stand in for it): the node's
        // MAC on one of them is a mix-up of the two machines.
        for (flag, mac) in [
            ("--internal-mac", self.network.internal_mac),
            ("--uplink-mac", self.network.uplink_mac),
        ] {
            ensure!(
                mac != Some(self.minipc_mac),
                "{flag} {} is the node's MAC: give the MAC of the appliance VM's own NIC",
                self.minipc_mac
            );
        }
        self.network.validate()
    }

    pub fn to_toml(&self) -> Result<String> {
        let body = toml::to_string_pretty(self).context("serializing the appliance config")?;
        Ok(format!(
            "# Appliance config written by mkappliance build; read by the appliance at boot.\n\
             # dnsmasq.conf, nginx.conf and boot.ipxe beside it are views of this file.\n{body}"
        ))
    }

    pub fn from_toml(text: &str) -> Result<ApplianceConfig> {
        let c: ApplianceConfig = toml::from_str(text).context("parsing appliance.toml")?;
        c.validate().context("validating appliance.toml")?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing() {
        assert_eq!(
            "00:11:22:AA:bb:cc".parse::<Mac>().unwrap().to_string(),
            "00:11:22:aa:bb:cc"
        );
        assert_eq!(
            "00-11-22-33-44-55".parse::<Mac>().unwrap().0,
            [0, 0x11, 0x22, 0x33, 0x44, 0x55]
        );
        for bad in [
            "00:11:22:33:44",
            "00:11:22:33:44:5g",
            "0:11:22:33:44:55",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn cidr_and_network_checks() {
        let c: Ipv4Cidr = "10.10.10.2/24".parse().unwrap();
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 10, 10, 255));
        assert!("10.10.10.0/24".parse::<Ipv4Cidr>().is_err());
        assert!("10.10.10.2".parse::<Ipv4Cidr>().is_err());
        assert!("10.10.10.2/33".parse::<Ipv4Cidr>().is_err());
        let mut n = Network {
            appliance: c,
            minipc_ip: Ipv4Addr::new(10, 10, 10, 100),
            dhcp_range: (Ipv4Addr::new(10, 10, 10, 50), Ipv4Addr::new(10, 10, 10, 60)),
            lease_secs: 3600,
            internal_mac: None,
            uplink_mac: None,
            uplink_address: None,
            uplink_gateway: None,
            uplink_dns: Vec::new(),
        };
        n.validate().unwrap();
        n.minipc_ip = Ipv4Addr::new(10, 10, 11, 100);
        assert!(n
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not a host address inside"));
        n.minipc_ip = Ipv4Addr::new(10, 10, 10, 2);
        assert!(n
            .validate()
            .unwrap_err()
            .to_string()
            .contains("appliance's own"));
    }

    #[test]
    fn uplink_static_settings() {
        let mut n = Network {
            appliance: "10.10.10.2/24".parse().unwrap(),
            minipc_ip: Ipv4Addr::new(10, 10, 10, 100),
            dhcp_range: (Ipv4Addr::new(10, 10, 10, 50), Ipv4Addr::new(10, 10, 10, 60)),
            lease_secs: 3600,
            internal_mac: None,
            uplink_mac: None,
            uplink_address: Some("192.168.1.50/24".parse().unwrap()),
            uplink_gateway: Some(Ipv4Addr::new(192, 168, 1, 1)),
            uplink_dns: vec![Ipv4Addr::new(192, 168, 1, 1), Ipv4Addr::new(9, 9, 9, 9)],
        };
        n.validate().unwrap();
        let err = |n: &Network| n.validate().unwrap_err().to_string();
        n.uplink_gateway = Some(Ipv4Addr::new(192, 168, 2, 1));
        assert!(err(&n).contains("not another host address inside"));
        n.uplink_gateway = Some(Ipv4Addr::new(192, 168, 1, 50));
        assert!(err(&n).contains("not another host address inside"));
        n.uplink_gateway = Some(Ipv4Addr::new(192, 168, 1, 1));
        n.uplink_address = Some("10.10.10.9/16".parse().unwrap());
        assert!(err(&n).contains("overlaps the PXE subnet"));
        n.uplink_address = None;
        assert!(err(&n).contains("needs --uplink-address"));
        n.uplink_gateway = None;
        n.validate().unwrap(); // DNS alone overrides DHCP's servers
        n.uplink_dns = vec![Ipv4Addr::new(127, 0, 0, 1)];
        assert!(err(&n).contains("not a usable DNS server"));
        n.uplink_dns = vec![Ipv4Addr::new(10, 10, 10, 1)];
        assert!(err(&n).contains("inside the PXE subnet"));
    }

    #[test]
    fn old_configs_without_uplink_settings_still_parse() {
        let n: Network = toml::from_str(
            r#"
            appliance = "10.10.10.2/24"
            minipc_ip = "10.10.10.100"
            dhcp_range = ["10.10.10.50", "10.10.10.60"]
            lease_secs = 43200
            "#,
        )
        .unwrap();
        assert_eq!(n.uplink_address, None);
        assert_eq!(n.uplink_gateway, None);
        assert!(n.uplink_dns.is_empty());
        // And unset settings stay out of the rendered file.
        let text = toml::to_string(&n).unwrap();
        assert!(!text.contains("uplink"), "{text}");
    }

    #[test]
    fn versions() {
        check_talos_version("v1.11.6").unwrap();
        check_talos_version("v1.12.0-beta.1").unwrap();
        for bad in ["1.11.6", "v1.11", "v1.11.x", "v1.11.6-", "v1.11.6/../x"] {
            assert!(check_talos_version(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(talos_volume_id("v1.11.6"), "TALOS_V1_11_6");
    }
}
