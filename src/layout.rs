//! The disk layout contract: partitions, type GUIDs and the path of every file.
//!
//! `build` writes by it, `inspect` reads by it, and the appliance init finds its root
//! by it. Change a constant here and all three follow.

/// GPT partition type of the EFI System Partition.
pub const ESP_TYPE_GUID: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// GPT partition type of an x86-64 Linux root partition (Discoverable Partitions Spec).
pub const ROOT_TYPE_GUID: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";

pub const ESP_PART_NAME: &str = "EFI";
pub const ROOT_PART_NAME: &str = "appliance-root";
pub const ESP_LABEL: &str = "EFI";
pub const ROOT_LABEL: &str = "appliance";

pub const SECTOR: u64 = 512;
/// Partitions start and end on 1 MiB boundaries.
pub const ALIGN: u64 = 1024 * 1024;

/// Kernel command line parameter naming the root partition's unique GUID; the init
/// reads the GPT itself because the kernel may not publish PARTUUID in sysfs.
pub const ROOT_PARAM: &str = "mkappliance.root";

// ESP paths (FAT is case-insensitive; these are the names we write).
pub const ESP_BOOTLOADER: &str = "EFI/BOOT/BOOTX64.EFI";
pub const ESP_LOADER_CONF: &str = "loader/loader.conf";
pub const ESP_ENTRY: &str = "loader/entries/appliance.conf";
pub const ESP_KERNEL: &str = "vmlinuz";
pub const ESP_INITRAMFS: &str = "appliance.img";

// Rootfs paths.
pub const TFTP_ROOT: &str = "srv/tftp";
pub const HTTP_ROOT: &str = "srv/http";
pub const TFTP_IPXE: &str = "srv/tftp/ipxe.efi";
pub const TFTP_IPXE_BIOS: &str = "srv/tftp/undionly.kpxe";
pub const TFTP_IPXE_ARM64: &str = "srv/tftp/ipxe-arm64.efi";
pub const HTTP_BOOT_IPXE: &str = "srv/http/boot.ipxe";
pub const HTTP_CONFIG: &str = "srv/http/configs/minipc.yaml";
pub const HTTP_TALOSCONFIG: &str = "srv/http/configs/talosconfig";
pub const ETC_DIR: &str = "etc/appliance";
pub const DNSMASQ_CONF: &str = "etc/appliance/dnsmasq.conf";
pub const NGINX_CONF: &str = "etc/appliance/nginx.conf";
pub const APPLIANCE_TOML: &str = "etc/appliance/appliance.toml";
pub const STATE_DIR: &str = "var/lib/appliance";
pub const LOG_DIR: &str = "var/log/appliance";

/// `srv/http/talos/<version>/vmlinuz`
pub fn http_kernel(talos_version: &str) -> String {
    format!("{HTTP_ROOT}/talos/{talos_version}/vmlinuz")
}

/// `srv/http/talos/<version>/initramfs.xz`
pub fn http_initramfs(talos_version: &str) -> String {
    format!("{HTTP_ROOT}/talos/{talos_version}/initramfs.xz")
}

// Inside our initramfs (appliance.img).
pub const INITRD_INIT: &str = "init";
/// Module files to load, one path per line, dependencies first.
pub const INITRD_MODULES_ORDER: &str = "etc/modules.order";
/// Where the init mounts the rootfs.
pub const SYSROOT: &str = "/sysroot";

/// The line the init prints on every console once it is up; tests wait for it.
pub const READY_MARKER: &str = "MKAPPLIANCE-READY";
