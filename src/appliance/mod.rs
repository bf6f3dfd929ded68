//! The appliance side: what runs inside the booted image.
//!
//! [`init`] is PID 1 in our initramfs; [`gptscan`] finds the root partition by reading
//! GPTs itself; [`console`] writes to every console an operator might watch.
//!
//! The PXE services ([`serve::start`]; also `mkappliance serve`): [`dhcp`], [`tftp`]
//! and [`http`] serve a [`served::ServedTree`], [`ra`] tells iPXE there is no IPv6
//! router, [`bootonce`] ends the reinstall loop, [`events`] is the operator's log, and
//! [`netif`] gives the PXE interface its address.

pub mod bootonce;
pub mod console;
pub mod dhcp;
pub mod events;
pub mod gptscan;
pub mod http;
pub mod init;
pub mod netif;
pub mod ra;
pub mod serve;
pub mod served;
pub mod tftp;
