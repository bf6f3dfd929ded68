//! `mkappliance run IMAGE`: boot a built image in QEMU together with a PXE client VM, so an
//! operator can watch the whole install before importing the image anywhere.
//!
//! Everything is checked before a VM starts (the image by `inspect`'s reader, QEMU, OVMF,
//! the flags), so a mistake costs one line, not a boot. The image is never written
//! (`snapshot=on`); the work files live in a temporary directory that is removed on every
//! exit, Ctrl-C and SIGTERM included, unless `--keep DIR` names where to keep them.

mod console;
mod qemu;
mod session;
mod signals;

/// The VMs' private link, which the end-to-end test uses too.
pub use qemu::Link;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::config::{ApplianceConfig, Mac};
pub use qemu::{Accel, DiskBus};

/// MACs for appliance NICs the image does not pin (locally administered QEMU range).
const DEFAULT_PXE_MAC: &str = "52:54:00:4d:4b:01";
const DEFAULT_UPLINK_MAC: &str = "52:54:00:4d:4b:02";
const DEFAULT_TIMEOUT_S: u64 = 300;
const MIB: u64 = 1024 * 1024;
/// Exit status after Ctrl-C or SIGTERM before the run reached what it waited for.
pub const INTERRUPTED_EXIT: i32 = 130;
const WORKDIR_PREFIX: &str = "mkappliance-run-";

#[derive(Debug, Args)]
#[command(after_long_help = "EXAMPLES:\n    \
    mkappliance run artifacts/bootstrap/2025-12-17/bootstrap-pxe.raw\n    \
    mkappliance run IMAGE --client-mac 52:54:00:00:00:66   # a stranger: ignored\n    \
    mkappliance run IMAGE --offline --until config-fetched --json   # CI\n\n\
    A real Talos node needs x86-64-v2 and 2 GiB of RAM; under TCG (no usable /dev/kvm) its\n\
    install is slow but works. Build the image with --extra-kernel-args console=ttyS0 to see\n\
    the node's kernel on the client console here, or watch its screen with --gui.")]
pub struct RunArgs {
    /// Built appliance image (.raw) to boot; it is not modified
    pub image: PathBuf,
    /// MAC the client VM boots with [default: the node MAC pinned in the image]; another MAC
    /// shows the appliance ignoring a stranger
    #[arg(long, value_name = "MAC")]
    pub client_mac: Option<String>,
    /// Client VM memory (a real Talos node needs 2 GiB)
    #[arg(long, value_name = "MIB", default_value_t = 2048)]
    pub client_memory: u32,
    /// Size of the client's empty, sparse disk, e.g. 10G or 512M
    #[arg(long, value_name = "SIZE", default_value = "10G")]
    pub client_disk_size: String,
    /// How the client's disk is attached (nvme: /dev/nvme0n1, the example config's install
    /// disk)
    #[arg(long, value_enum, value_name = "BUS", default_value = "nvme")]
    pub client_disk_bus: DiskBus,
    /// Boot only the appliance
    #[arg(long)]
    pub no_client: bool,
    /// Cut the appliance's uplink off from this host's network (QEMU user networking with
    /// restrict=on): the appliance still serves, and its NAT goes nowhere
    #[arg(long)]
    pub offline: bool,
    /// Accelerator for both VMs
    #[arg(long, value_enum, value_name = "ACCEL", default_value = "auto")]
    pub accel: Accel,
    /// UEFI firmware code for both VMs
    #[arg(long, value_name = "PATH", default_value = qemu::OVMF_CODE)]
    pub ovmf_code: PathBuf,
    /// UEFI variable store template (each VM boots with a fresh copy)
    #[arg(long, value_name = "PATH", default_value = qemu::OVMF_VARS)]
    pub ovmf_vars: PathBuf,
    /// End the run (exit status 0) once this stage is reached instead of running until
    /// Ctrl-C
    #[arg(long, value_enum, value_name = "STAGE")]
    pub until: Option<Stage>,
    /// Seconds each awaited stage may take (the appliance's ready line from its power-on,
    /// the config fetch from the client's, the client's exit from the fetch) before the
    /// run fails naming it. Without --until only the ready line is awaited
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_TIMEOUT_S)]
    pub timeout: u64,
    /// Keep the run files (console logs, client disk, firmware variables) in this new or
    /// empty directory instead of removing them
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
    /// Show the VMs' displays (their VGA consoles) in windows
    #[arg(long)]
    pub gui: bool,
    /// Print a JSON object with the stage timings on stdout at the end (for CI)
    #[arg(long)]
    pub json: bool,
}

/// The stages of a run, in the order they happen; `--until` names one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Stage {
    /// The appliance printed its ready line (MKAPPLIANCE-READY)
    #[value(name = "ready")]
    ApplianceReady,
    /// The appliance served the client its machine config (its config-fetched event)
    ConfigFetched,
    /// The client VM powered off after fetching its config
    ClientExit,
}

impl Stage {
    pub const ALL: [Stage; 3] = [
        Stage::ApplianceReady,
        Stage::ConfigFetched,
        Stage::ClientExit,
    ];

    /// How errors name the stage.
    pub fn name(self) -> &'static str {
        match self {
            Stage::ApplianceReady => "appliance ready",
            Stage::ConfigFetched => "client config fetched",
            Stage::ClientExit => "client exit",
        }
    }

    /// The `--until` value.
    pub fn flag_value(self) -> &'static str {
        match self {
            Stage::ApplianceReady => "ready",
            Stage::ConfigFetched => "config-fetched",
            Stage::ClientExit => "client-exit",
        }
    }

    fn needs_client(self) -> bool {
        self != Stage::ApplianceReady
    }
}

impl DiskBus {
    pub fn name(self) -> &'static str {
        match self {
            DiskBus::Nvme => "NVMe",
            DiskBus::Virtio => "virtio",
            DiskBus::Sata => "SATA",
        }
    }
}

/// A signal stopped the run before what it waited for.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {signal} before {stage:?}; the VMs were stopped")]
pub struct Interrupted {
    pub signal: &'static str,
    pub stage: &'static str,
}

/// The client VM's settings.
#[derive(Debug)]
pub struct ClientPlan {
    pub mac: Mac,
    pub memory_mib: u32,
    pub disk_size: u64,
    pub disk_bus: DiskBus,
}

/// A validated run.
#[derive(Debug)]
pub struct Plan {
    pub image: PathBuf,
    pub config: ApplianceConfig,
    pub qemu: PathBuf,
    pub ovmf_code: PathBuf,
    pub ovmf_vars: PathBuf,
    pub accel: Accel,
    pub pxe_mac: Mac,
    pub uplink_mac: Mac,
    pub client: Option<ClientPlan>,
    pub offline: bool,
    pub gui: bool,
    pub until: Option<Stage>,
    pub timeout: Duration,
}

/// What `--json` prints: what was reached and when (seconds).
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub ok: bool,
    pub error: Option<String>,
    pub image: String,
    pub talos_version: String,
    pub accel: &'static str,
    /// `--accel auto` tried KVM, which could not run the firmware, and fell back to TCG.
    pub kvm_fallback: bool,
    pub until: Option<&'static str>,
    /// The `--until` values of the stages reached, in order.
    pub reached: Vec<&'static str>,
    pub client_mac: Option<String>,
    /// Appliance power-on to its ready line.
    pub appliance_ready_s: Option<f64>,
    /// The appliance kernel's uptime at its ready line (from the line itself).
    pub appliance_uptime_ms: Option<u64>,
    /// Appliance power-on to client power-on.
    pub client_start_s: Option<f64>,
    /// Client power-on to the appliance's config-fetched event.
    pub client_config_fetched_s: Option<f64>,
    /// Client power-on to its VM exiting.
    pub client_exit_s: Option<f64>,
    /// Appliance power-on to its VM exiting by itself.
    pub appliance_exit_s: Option<f64>,
    pub total_s: f64,
}

/// A status line on stderr (stdout carries the consoles).
fn status(msg: &str) {
    eprintln!("mkappliance run: {msg}");
}

/// A size like `10G` or `512M`: an integer with an optional K/M/G/T suffix (powers of
/// 1024; `B`, `KB`, `KiB`… accepted), rounded up to whole MiB.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let digits = t.chars().take_while(|c| c.is_ascii_digit()).count();
    let (num, unit) = t.split_at(digits);
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => bail!("malformed size {s:?}: expected a number with an optional K, M, G or T suffix, like 10G"),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("malformed size {s:?}: expected a number like 10G"))?;
    let bytes = n
        .checked_mul(1 << shift)
        .with_context(|| format!("size {s:?} is too large"))?;
    ensure!(bytes >= MIB, "size {s:?} is too small: give at least 1M");
    Ok(bytes.div_ceil(MIB) * MIB)
}

impl Plan {
    /// Check everything before any VM starts; each error is one line saying what to do.
    pub fn validate(args: &RunArgs) -> Result<Plan> {
        let client_mac: Option<Mac> = match &args.client_mac {
            Some(m) => Some(m.parse().with_context(|| format!("--client-mac {m:?}"))?),
            None => None,
        };
        let disk_size = parse_size(&args.client_disk_size)
            .with_context(|| format!("--client-disk-size {:?}", args.client_disk_size))?;
        ensure!(
            args.client_memory >= 128,
            "--client-memory {} MiB is too little for UEFI firmware: give at least 128 (a real Talos node needs 2048)",
            args.client_memory
        );
        ensure!(args.timeout > 0, "--timeout must be at least 1 second");
        if let Some(keep) = &args.keep {
            // Checked again when created; here so the mistake fails before any output.
            check_keep_dir(keep)?;
        }
        if let (true, Some(u)) = (args.no_client, args.until) {
            ensure!(
                !u.needs_client(),
                "--until {} needs the client VM: drop --no-client",
                u.flag_value()
            );
        }
        let qemu = qemu::find_program(qemu::QEMU).with_context(|| {
            format!(
                "{} is not on PATH: install QEMU ({})",
                qemu::QEMU,
                qemu::INSTALL_HINT
            )
        })?;
        for (path, flag) in [
            (&args.ovmf_code, "--ovmf-code"),
            (&args.ovmf_vars, "--ovmf-vars"),
        ] {
            ensure!(
                path.is_file(),
                "OVMF firmware {} ({flag}) not found: install it ({}) or point {flag} at it",
                path.display(),
                qemu::INSTALL_HINT
            );
        }
        if args.accel == Accel::Kvm {
            ensure!(
                qemu::kvm_usable(),
                "--accel kvm: /dev/kvm is missing or not read-write for this user: use --accel tcg (or auto)"
            );
        }
        let config = read_image(&args.image)?;
        let net = &config.network;
        let pxe_mac = net.internal_mac.unwrap_or(default_mac(DEFAULT_PXE_MAC)?);
        let uplink_mac = net.uplink_mac.unwrap_or(default_mac(DEFAULT_UPLINK_MAC)?);
        ensure!(
            pxe_mac != uplink_mac,
            "the image pins one MAC {pxe_mac} for both appliance NICs"
        );
        let client = if args.no_client {
            None
        } else {
            let mac = client_mac.unwrap_or(config.minipc_mac);
            ensure!(
                mac != pxe_mac && mac != uplink_mac,
                "--client-mac {mac} is one of the appliance's own NIC MACs: pick another"
            );
            Some(ClientPlan {
                mac,
                memory_mib: args.client_memory,
                disk_size,
                disk_bus: args.client_disk_bus,
            })
        };
        Ok(Plan {
            image: args.image.clone(),
            config,
            qemu,
            ovmf_code: args.ovmf_code.clone(),
            ovmf_vars: args.ovmf_vars.clone(),
            accel: args.accel,
            pxe_mac,
            uplink_mac,
            client,
            offline: args.offline,
            gui: args.gui,
            until: args.until,
            timeout: Duration::from_secs(args.timeout),
        })
    }
}

fn default_mac(s: &str) -> Result<Mac> {
    s.parse()
}

/// The image's appliance config, read the way `inspect` does (which also checks it is a
/// complete mkappliance image).
fn read_image(image: &Path) -> Result<ApplianceConfig> {
    let shown = image.display();
    match std::fs::metadata(image) {
        Ok(m) if m.is_file() => {}
        Ok(_) => bail!("{shown} is not a file: give the .raw image `mkappliance build` wrote"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{shown} does not exist: build an image with `mkappliance build` (or `just run` with no argument builds the demo image)"
        ),
        Err(e) => bail!("{shown}: {e}"),
    }
    let report = crate::inspect::read_report(image).map_err(|e| {
        // The first layer is `inspecting IMAGE`, which this message says already.
        let why: Vec<String> = e.chain().skip(1).map(|c| c.to_string()).collect();
        anyhow::anyhow!(
            "{shown} is not an mkappliance image ({}): give the .raw image `mkappliance build` wrote",
            why.join(": ")
        )
    })?;
    Ok(report.config)
}

/// `--keep DIR` must be new (not there yet) or empty: the run's files must not mix with
/// others.
fn check_keep_dir(dir: &Path) -> Result<()> {
    match std::fs::read_dir(dir).map(|mut d| d.next().is_none()) {
        Ok(true) => Ok(()),
        Ok(false) => bail!(
            "--keep {} is not empty: give a new or empty directory",
            dir.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => bail!(
            "--keep {}: {e}: give a new or empty directory",
            dir.display()
        ),
    }
}

/// Where the run's files live: a temporary directory, or `--keep DIR`.
enum WorkDir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl WorkDir {
    fn create(keep: Option<&Path>) -> Result<WorkDir> {
        let Some(dir) = keep else {
            let t = tempfile::Builder::new()
                .prefix(WORKDIR_PREFIX)
                .tempdir()
                .context("creating a temporary directory for the run files")?;
            return Ok(WorkDir::Temp(t));
        };
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--keep: creating {}", dir.display()))?;
        check_keep_dir(dir)?;
        Ok(WorkDir::Kept(dir.to_path_buf()))
    }

    fn path(&self) -> &Path {
        match self {
            WorkDir::Temp(t) => t.path(),
            WorkDir::Kept(p) => p,
        }
    }
}

/// `mkappliance run`.
pub fn run(args: &RunArgs) -> Result<()> {
    let plan = Plan::validate(args)?;
    let started = Instant::now();
    let c = &plan.config;
    status(&format!(
        "{}: Talos {}, node {} at {}, appliance {}",
        plan.image.display(),
        c.talos_version,
        c.minipc_mac,
        c.network.minipc_ip,
        c.network.appliance
    ));
    if let Some(client) = &plan.client {
        if client.mac != c.minipc_mac {
            status(&format!(
                "the client boots as {}, not the node {}: the appliance should ignore it (dhcp-ignored)",
                client.mac, c.minipc_mac
            ));
        }
        if !c
            .talos_kernel_args
            .split_whitespace()
            .any(|a| a.starts_with("console=ttyS"))
        {
            status("the node's kernel logs to its screen only (no console=ttyS0 in the image's --extra-kernel-args): use --gui to watch it");
        }
    }
    signals::install()?;
    let work = WorkDir::create(args.keep.as_deref())?;
    match &work {
        WorkDir::Temp(t) => status(&format!(
            "run files in {} (removed on exit); the image is not modified (snapshot=on); Ctrl-C quits",
            t.path().display()
        )),
        WorkDir::Kept(p) => status(&format!(
            "run files in {} (kept); the image is not modified (snapshot=on); Ctrl-C quits",
            p.display()
        )),
    }

    let mut report = Report {
        image: plan.image.display().to_string(),
        talos_version: c.talos_version.clone(),
        until: plan.until.map(Stage::flag_value),
        client_mac: plan.client.as_ref().map(|c| c.mac.to_string()),
        ..Report::default()
    };
    let result = session::Session::start(&plan, work.path(), &mut report)
        .and_then(|s| s.watch())
        .map(|_| ());
    report.total_s = (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
    report.ok = result.is_ok();
    report.error = result.as_ref().err().map(|e| format!("{e:#}"));
    if let WorkDir::Kept(p) = &work {
        status(&format!("run files kept in {}", p.display()));
    }
    drop(work);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1t").unwrap(), 1 << 40);
        // Rounded up to whole MiB.
        assert_eq!(parse_size("1025K").unwrap(), 2 << 20);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        for bad in ["", "G", "10X", "-1G", "1.5G", "100K", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn stages_in_order_with_flag_values() {
        let values: Vec<String> = Stage::value_variants()
            .iter()
            .map(|s| s.to_possible_value().unwrap().get_name().to_string())
            .collect();
        assert_eq!(values, ["ready", "config-fetched", "client-exit"]);
        for s in Stage::ALL {
            assert_eq!(s.to_possible_value().unwrap().get_name(), s.flag_value());
        }
        assert!(Stage::ApplianceReady < Stage::ConfigFetched);
        assert!(Stage::ConfigFetched < Stage::ClientExit);
    }

    #[test]
    fn workdir_keep_must_be_empty() {
        let t = tempfile::tempdir().unwrap();
        let new = t.path().join("new");
        assert!(WorkDir::create(Some(&new)).is_ok());
        std::fs::write(new.join("x"), b"").unwrap();
        let e = WorkDir::create(Some(&new)).err().unwrap();
        assert!(format!("{e:#}").contains("is not empty"), "{e:#}");
    }
}
