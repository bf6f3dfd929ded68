//! mkappliance: build a Talos PXE appliance disk image, and run as that appliance's init.
//!
//! The builder pipeline is iso → payload (kernel, initramfs, rendered files) → disk
//! (GPT + FAT32 ESP + ext4 rootfs). The two contracts everything hangs off are
//! [`layout`] (where every file lives on the disk) and [`config`] (the appliance config).

pub mod appliance;
pub mod builder;
pub mod cmdline;
pub mod config;
pub mod disk;
pub mod initramfs;
pub mod inspect;
pub mod iso;
pub mod layout;
pub mod machineconfig;
pub mod publish;
pub mod render;
pub mod run;
pub mod sops;
pub mod tree;
pub mod util;
