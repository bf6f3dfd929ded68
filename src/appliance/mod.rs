//! The appliance side: what runs inside the booted image.
//!
//! [`init`] is PID 1 in our initramfs and hands over to [`start`] once the root is mounted; [`gptscan`] finds the root partition by reading
//! GPTs itself; [`console`] writes to every console an operator might watch;
//! [`kcmdline`] reads the kernel command line; [`supervise`] is PID 1's loop after
//! boot and [`powerbutton`] hears the ACPI power button.
//! [`net`] brings up the network over [`netlink`]: the PXE link, the uplink's [`dhcpc`]
//! client, [`nat`] through nf_tables and the [`dns`] forwarder.
//!
//! The PXE services ([`serve::start`]; also `mkappliance serve`): [`dhcp`], [`tftp`]
//! and [`http`] serve a [`served::ServedTree`], [`ra`] tells iPXE there is no IPv6
//! router, [`bootonce`] ends the reinstall loop, [`events`] is the operator's log, and
//! [`netif`] gives the PXE interface its address when `serve` runs on a host.

pub mod bootonce;
pub mod console;
pub mod dhcp;
pub mod dhcpc;
pub mod dns;
pub mod events;
pub mod gptscan;
pub mod http;
pub mod init;
pub mod kcmdline;
pub mod nat;
pub mod net;
pub mod netif;
pub mod netlink;
pub mod powerbutton;
pub mod ra;
pub mod serve;
pub mod served;
pub mod start;
pub mod supervise;
pub mod tftp;
