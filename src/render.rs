//! Rendering the appliance's text files from minijinja templates.
//!
//! The templates live in `templates/`, are embedded in the binary, and any of them can be
//! overridden by a file of the same name in `--templates DIR`. Every template sees the
//! same context, derived from the one [`ApplianceConfig`].

use std::path::Path;

use anyhow::{Context, Result};
use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;

use crate::config::ApplianceConfig;

pub const BOOT_IPXE: &str = "boot.ipxe.j2";
/// What `/boot.ipxe` becomes for the node once boot-once is armed: exit to the local disk.
pub const BOOT_LOCAL_IPXE: &str = "boot-local.ipxe.j2";
pub const DNSMASQ_CONF: &str = "dnsmasq.conf.j2";
pub const NGINX_CONF: &str = "nginx.conf.j2";
pub const LOADER_CONF: &str = "loader.conf.j2";
pub const LOADER_ENTRY: &str = "appliance.conf.j2";

/// (name, embedded source) of every template.
pub const EMBEDDED: &[(&str, &str)] = &[
    (BOOT_IPXE, include_str!("../templates/boot.ipxe.j2")),
    (
        BOOT_LOCAL_IPXE,
        include_str!("../templates/boot-local.ipxe.j2"),
    ),
    (DNSMASQ_CONF, include_str!("../templates/dnsmasq.conf.j2")),
    (NGINX_CONF, include_str!("../templates/nginx.conf.j2")),
    (LOADER_CONF, include_str!("../templates/loader.conf.j2")),
    (LOADER_ENTRY, include_str!("../templates/appliance.conf.j2")),
];

/// What every template can use. Flat on purpose: templates stay simple to override.
#[derive(Serialize)]
struct TemplateContext<'a> {
    mkappliance_version: &'a str,
    talos_version: &'a str,
    bootstrap_version: &'a str,
    appliance_ip: String,
    appliance_cidr: String,
    netmask: String,
    minipc_ip: String,
    minipc_mac: String,
    dhcp_range_start: String,
    dhcp_range_end: String,
    lease_secs: u32,
    http_base: String,
    kernel_args: &'a str,
    appliance_kernel_args: &'a str,
    ipxe_efi: &'a str,
    ipxe_bios: Option<&'a str>,
    ipxe_arm64: Option<&'a str>,
    boot_once: bool,
}

pub struct Renderer {
    env: Environment<'static>,
}

impl Renderer {
    /// Embedded templates, each replaced by `dir/<name>` when that file exists.
    pub fn new(override_dir: Option<&Path>) -> Result<Renderer> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // Keep rendered files byte-for-byte as the templates lay them out.
        env.set_keep_trailing_newline(true);
        for (name, src) in EMBEDDED {
            let source = match override_dir.map(|d| d.join(name)).filter(|p| p.exists()) {
                Some(p) => std::fs::read_to_string(&p)
                    .with_context(|| format!("reading template {}", p.display()))?,
                None => src.to_string(),
            };
            env.add_template_owned(name.to_string(), source)
                .with_context(|| format!("parsing template {name}"))?;
        }
        if let Some(dir) = override_dir {
            anyhow::ensure!(
                dir.is_dir(),
                "--templates {}: not a directory",
                dir.display()
            );
        }
        Ok(Renderer { env })
    }

    /// Render template `name` for `cfg`; `appliance_kernel_args` is the appliance's own
    /// kernel command line (for the systemd-boot entry).
    pub fn render(
        &self,
        name: &str,
        cfg: &ApplianceConfig,
        appliance_kernel_args: &str,
    ) -> Result<String> {
        let n = &cfg.network;
        let ctx = TemplateContext {
            mkappliance_version: env!("CARGO_PKG_VERSION"),
            talos_version: &cfg.talos_version,
            bootstrap_version: &cfg.bootstrap_version,
            appliance_ip: n.appliance.addr.to_string(),
            appliance_cidr: n.appliance.to_string(),
            netmask: n.appliance.netmask().to_string(),
            minipc_ip: n.minipc_ip.to_string(),
            minipc_mac: cfg.minipc_mac.to_string(),
            dhcp_range_start: n.dhcp_range.0.to_string(),
            dhcp_range_end: n.dhcp_range.1.to_string(),
            lease_secs: n.lease_secs,
            http_base: cfg.http_base(),
            kernel_args: &cfg.talos_kernel_args,
            appliance_kernel_args,
            ipxe_efi: &cfg.boot_files.ipxe_efi,
            ipxe_bios: cfg.boot_files.ipxe_bios.as_deref(),
            ipxe_arm64: cfg.boot_files.ipxe_arm64.as_deref(),
            boot_once: cfg.boot_once,
        };
        self.env
            .get_template(name)
            .and_then(|t| t.render(&ctx))
            .with_context(|| format!("rendering template {name}"))
    }
}
