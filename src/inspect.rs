//! `mkappliance inspect`: read an image back without root and check it by the layout.

use std::fs::File;

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use crate::cmdline::InspectArgs;
use crate::config::ApplianceConfig;
use crate::disk::{esp, gpt, rootfs};
use crate::layout;
use crate::util::sha256_hex;

/// Files whose content is a secret: listed with size only, never hashed or printed.
const SECRET_FILES: &[&str] = &[layout::HTTP_CONFIG, layout::HTTP_TALOSCONFIG];

#[derive(Debug, Serialize)]
pub struct FileInfo {
    pub path: String,
    pub is_dir: bool,
    pub size: u64,
    /// `None` for directories and redacted secrets.
    pub sha256: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct PartitionInfo {
    pub name: String,
    pub type_guid: String,
    pub unique_guid: String,
    pub offset: u64,
    pub size: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub disk_guid: String,
    pub partitions: Vec<PartitionInfo>,
    pub esp_label: String,
    pub esp_files: Vec<FileInfo>,
    pub rootfs_label: String,
    pub rootfs_files: Vec<FileInfo>,
    pub boot_entry: String,
    pub config: ApplianceConfig,
}

fn find(table: &gpt::Table, type_guid: &str, what: &str) -> Result<gpt::Partition> {
    let t = gpt::Guid::parse(type_guid)?;
    table
        .partitions
        .iter()
        .find(|p| p.type_guid == t)
        .cloned()
        .with_context(|| format!("no {what} partition (type {type_guid})"))
}

/// Read an image and check it against the layout; errors name the image and what is
/// missing.
pub fn read_report(path: &std::path::Path) -> Result<Report> {
    check_image(path).with_context(|| format!("inspecting {}", path.display()))
}

fn check_image(path: &std::path::Path) -> Result<Report> {
    let file = File::open(path)?;
    let (header, table) = gpt::read_with_header(&file).context("not a GPT disk")?;
    // A copy cut short still has its partition table at the front; the disk ends with
    // the backup header, so the file must reach that far.
    // By seeking, not metadata: a block device (the image written to a USB stick) has
    // a metadata length of 0.
    let file_len = std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0))?;
    let disk_len = header
        .alternate_lba
        .saturating_add(1)
        .saturating_mul(gpt::DEFAULT_SECTOR_SIZE);
    ensure!(
        disk_len <= file_len,
        "truncated: its GPT describes a {disk_len}-byte disk but the file has {file_len} \
         bytes (an incomplete copy or download?)"
    );
    let esp_part = find(&table, layout::ESP_TYPE_GUID, "EFI System")?;
    let root_part = find(&table, layout::ROOT_TYPE_GUID, "root")?;

    let fat = esp::FatImage::open(esp::Slice::new(
        file.try_clone()?,
        esp_part.offset(),
        esp_part.size(),
    )?)
    .context("reading the ESP")?;
    let mut esp_files = Vec::new();
    for (p, is_dir, size) in fat.list()? {
        let sha256 = if is_dir {
            None
        } else {
            fat.read(&p)?.map(|d| sha256_hex(&d))
        };
        esp_files.push(FileInfo {
            path: p,
            is_dir,
            size,
            sha256,
        });
    }
    for required in [
        layout::ESP_BOOTLOADER,
        layout::ESP_KERNEL,
        layout::ESP_INITRAMFS,
        layout::ESP_LOADER_CONF,
    ] {
        if fat.read(required)?.is_none() {
            bail!("the ESP has no {required}: not an mkappliance image");
        }
    }
    let boot_entry = fat
        .read(layout::ESP_ENTRY)?
        .with_context(|| format!("the ESP has no {}", layout::ESP_ENTRY))?;
    let boot_entry = String::from_utf8(boot_entry).context("the boot entry is not UTF-8")?;

    let ext = rootfs::Ext4Image::open(file, root_part.offset(), root_part.size())
        .context("reading the rootfs")?;
    let toml = ext
        .read(layout::APPLIANCE_TOML)
        .with_context(|| format!("the rootfs has no readable /{}", layout::APPLIANCE_TOML))?;
    let config = ApplianceConfig::from_toml(&String::from_utf8_lossy(&toml))?;
    let mut rootfs_files = Vec::new();
    for (p, is_dir, size) in ext.list()? {
        let sha256 = if is_dir || SECRET_FILES.contains(&p.as_str()) {
            None
        } else {
            Some(sha256_hex(&ext.read(&p)?))
        };
        rootfs_files.push(FileInfo {
            path: p,
            is_dir,
            size,
            sha256,
        });
    }
    let mut required = vec![
        layout::TFTP_IPXE.to_string(),
        layout::HTTP_BOOT_IPXE.to_string(),
        layout::HTTP_CONFIG.to_string(),
        layout::http_kernel(&config.talos_version),
        layout::http_initramfs(&config.talos_version),
    ];
    if config.serve_talosconfig {
        required.push(layout::HTTP_TALOSCONFIG.to_string());
    }
    for r in required {
        if !rootfs_files.iter().any(|f| f.path == r) {
            bail!("the rootfs has no /{r}: not a complete mkappliance image");
        }
    }
    Ok(Report {
        disk_guid: table.disk_guid.to_string(),
        partitions: table
            .partitions
            .iter()
            .map(|p| PartitionInfo {
                name: p.name.clone(),
                type_guid: p.type_guid.to_string(),
                unique_guid: p.unique_guid.to_string(),
                offset: p.offset(),
                size: p.size(),
            })
            .collect(),
        esp_label: fat.label(),
        esp_files,
        rootfs_label: ext.label(),
        rootfs_files,
        boot_entry,
        config,
    })
}

pub fn inspect(args: &InspectArgs) -> Result<()> {
    let r = read_report(&args.image)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let c = &r.config;
    println!("{}: mkappliance image", args.image.display());
    println!(
        "  Talos {} (bootstrap {})",
        c.talos_version, c.bootstrap_version
    );
    println!("  node  {} → {}", c.minipc_mac, c.network.minipc_ip);
    println!(
        "  appliance {} (config {})",
        c.network.appliance,
        c.config_url()
    );
    println!(
        "  boot-once {}, talosconfig served {}",
        c.boot_once, c.serve_talosconfig
    );
    println!("Partitions (disk {}):", r.disk_guid);
    for p in &r.partitions {
        println!(
            "  {:<16} {} offset {} size {}",
            p.name,
            p.unique_guid,
            p.offset,
            crate::util::human_size(p.size)
        );
    }
    println!("Boot entry:");
    for l in r.boot_entry.lines() {
        println!("  {l}");
    }
    for (label, files) in [
        (format!("ESP ({})", r.esp_label), &r.esp_files),
        (format!("rootfs ({})", r.rootfs_label), &r.rootfs_files),
    ] {
        println!("{label}:");
        for f in files {
            match &f.sha256 {
                Some(h) => println!("  {:>10}  {}  /{}", f.size, &h[..16], f.path),
                None if f.is_dir => println!("  {:>10}  {:16}  /{}/", "", "", f.path),
                None => println!("  {:>10}  {:16}  /{}", f.size, "(redacted)", f.path),
            }
        }
    }
    Ok(())
}
