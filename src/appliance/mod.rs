//! The appliance side: what runs inside the booted image.
//!
//! [`init`] is PID 1 in our initramfs; [`gptscan`] finds the root partition by reading
//! GPTs itself; [`console`] writes to every console an operator might watch;
//! [`powerbutton`] hears the ACPI power button.

pub mod console;
pub mod gptscan;
pub mod init;
pub mod powerbutton;
