//! The appliance side: what runs inside the booted image.
//!
//! [`init`] is PID 1 in our initramfs; [`gptscan`] finds the root partition by reading
//! GPTs itself; [`console`] writes to every console an operator might watch;
//! [`kcmdline`] reads the kernel command line; [`supervise`] is PID 1's loop after
//! boot and [`powerbutton`] hears the ACPI power button.
//! [`net`] brings up the network over [`netlink`]: the PXE link, the uplink's [`dhcpc`]
//! client, [`nat`] through nf_tables and the [`dns`] forwarder.

pub mod console;
pub mod dhcpc;
pub mod dns;
pub mod gptscan;
pub mod init;
pub mod kcmdline;
pub mod nat;
pub mod net;
pub mod netlink;
pub mod powerbutton;
pub mod supervise;
