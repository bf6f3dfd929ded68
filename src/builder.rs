//! `mkappliance build`: Talos ISO + machine config → appliance disk image.
//!
//! The pipeline is: check inputs → read the ISO → render the config views → lay out both
//! filesystem trees → write the GPT disk under a temporary name and hash it, while a second
//! thread picks the kernel modules and builds our initramfs for the ESP (see `image`) →
//! rename. Nothing is left behind on failure.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::cmdline::BuildArgs;
use crate::config::{self, ApplianceConfig, BootFiles, Ipv4Cidr, Mac, Network};
use crate::disk::{esp, gpt, rootfs};
use crate::initramfs::{self, modules};
use crate::iso::{Iso, IsoEntry};
use crate::layout;
use crate::machineconfig;
use crate::render::{self, Renderer};
use crate::sops;
use crate::tree::{Content, FileTree, DIR_MODE, FILE_MODE};
use crate::util::{self, AtomicFile};

mod image;

pub const IMAGE_NAME: &str = "bootstrap-pxe.raw";
/// Where distributions install iPXE for x86-64 UEFI, in the order we look.
pub const IPXE_SEARCH: &[&str] = &[
    "/usr/lib/ipxe/ipxe.efi",
    "/usr/share/ipxe/ipxe.efi",
    "/usr/share/ipxe/ipxe-x86_64.efi",
    "/usr/share/ipxe/ipxe-snponly-x86_64.efi",
];
const ISO_KERNEL: &str = "/boot/vmlinuz";
const ISO_INITRAMFS: &str = "/boot/initramfs.xz";
const ISO_BOOTLOADER: &str = "/EFI/BOOT/BOOTX64.EFI";
/// Room held in the ESP for the modules in `appliance.img`, on top of `/init`'s own
/// size (zstd only shrinks both). Talos builds most drivers in: the modules we take from
/// Debian's cloud kernel, a worst case, are 2.8 MB.
const MODULES_RESERVE: u64 = 4 << 20;
/// Lease handed to the node, as the original appliance did (12 h).
const LEASE_SECS: u32 = 12 * 3600;

/// What a build produced, printed as the summary (or JSON with `--json`).
#[derive(Debug, Serialize)]
pub struct Summary {
    pub image: PathBuf,
    pub sha256: String,
    pub size_bytes: u64,
    pub allocated_bytes: u64,
    pub talos_version: String,
    pub bootstrap_version: String,
    pub minipc_mac: String,
    pub minipc_ip: String,
    pub appliance_ip: String,
    pub config_url: String,
    pub talosconfig_served: bool,
    pub boot_once: bool,
    pub kernel_modules: Vec<String>,
    pub seconds: f64,
    /// What `--compress`/`--upload` did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published: Option<crate::publish::Published>,
}

fn parse_mac(flag: &str, v: &str) -> Result<Mac> {
    v.parse().with_context(|| format!("invalid {flag}"))
}

fn parse_ipv4(flag: &str, v: &str) -> Result<std::net::Ipv4Addr> {
    v.trim()
        .parse()
        .with_context(|| format!("invalid {flag} {v:?}: expected an IPv4 address"))
}

/// Turn the command line into a validated appliance config (no file access).
pub fn config_from_args(args: &BuildArgs, boot_files: BootFiles) -> Result<ApplianceConfig> {
    config::check_talos_version(&args.talos_version)?;
    config::check_path_component("bootstrap version", &args.bootstrap_version)?;
    let minipc_mac = parse_mac("MINIPC_MAC", &args.minipc_mac)?;
    let appliance: Ipv4Cidr = args
        .appliance_ip
        .parse()
        .context("invalid --appliance-ip")?;
    let minipc_ip = args.minipc_ip.parse().with_context(|| {
        format!(
            "invalid --minipc-ip {:?}: expected an IPv4 address",
            args.minipc_ip
        )
    })?;
    let network = Network {
        appliance,
        minipc_ip,
        dhcp_range: config::parse_dhcp_range(&args.dhcp_range)?,
        lease_secs: LEASE_SECS,
        internal_mac: args
            .internal_mac
            .as_deref()
            .map(|m| parse_mac("--internal-mac", m))
            .transpose()?,
        uplink_mac: args
            .uplink_mac
            .as_deref()
            .map(|m| parse_mac("--uplink-mac", m))
            .transpose()?,
        uplink_address: args
            .uplink_address
            .as_deref()
            .map(|a| a.parse().context("invalid --uplink-address"))
            .transpose()?,
        uplink_gateway: args
            .uplink_gateway
            .as_deref()
            .map(|g| parse_ipv4("--uplink-gateway", g))
            .transpose()?,
        uplink_dns: args
            .uplink_dns
            .iter()
            .map(|d| parse_ipv4("--uplink-dns", d))
            .collect::<Result<_>>()?,
    };
    let cfg = ApplianceConfig {
        schema: config::CONFIG_SCHEMA,
        talos_version: args.talos_version.clone(),
        bootstrap_version: args.bootstrap_version.clone(),
        minipc_mac,
        talos_kernel_args: ApplianceConfig::default_kernel_args(
            appliance.addr,
            args.extra_kernel_args.as_deref(),
        ),
        network,
        boot_files,
        serve_talosconfig: args.talosconfig.is_some(),
        boot_once: !args.pxe_every_boot,
    };
    cfg.validate()?;
    Ok(cfg)
}

fn require_file(path: &Path, what: &str, hint: &str) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => bail!("{what} {} is not a regular file", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{what} not found at {}: {hint}", path.display())
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {what} {}", path.display())),
    }
}

/// The input files of a build, all checked to exist.
struct Inputs {
    iso: PathBuf,
    ipxe: PathBuf,
    init: PathBuf,
}

fn resolve_inputs(args: &BuildArgs) -> Result<Inputs> {
    let iso = args.iso.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "artifacts/talos/{}/metal-amd64.iso",
            args.talos_version
        ))
    });
    require_file(
        &iso,
        "Talos ISO",
        &format!(
            "run `mkappliance fetch talos {v}` (or download \
             https://github.com/siderolabs/talos/releases/download/{v}/metal-amd64.iso there), \
             or pass --iso PATH",
            v = args.talos_version
        ),
    )?;
    require_file(
        &args.config,
        "machine config",
        "generate one with `talosctl gen config`, or pass --config PATH",
    )?;
    if let Some(t) = &args.talosconfig {
        require_file(t, "talosconfig", "check the --talosconfig path")?;
    }
    let ipxe = match &args.ipxe {
        Some(p) => p.clone(),
        None => {
            // The distribution's copy first, then what `mkappliance fetch ipxe` cached.
            let cached = crate::publish::fetch::ipxe_cache_dir()
                .ok()
                .map(|d| d.join("ipxe.efi"));
            IPXE_SEARCH
                .iter()
                .map(PathBuf::from)
                .chain(cached)
                .find(|p| p.is_file())
                .with_context(|| {
                    format!(
                        "no iPXE found (looked in {} and the `mkappliance fetch ipxe` cache): \
                         install your distribution's ipxe package, run `mkappliance fetch ipxe`, \
                         or pass --ipxe PATH",
                        IPXE_SEARCH.join(", ")
                    )
                })?
        }
    };
    require_file(&ipxe, "iPXE binary", "pass --ipxe PATH")?;
    for (flag, path) in [
        ("--ipxe-bios", &args.ipxe_bios),
        ("--ipxe-arm64", &args.ipxe_arm64),
        ("--bootloader", &args.bootloader),
    ] {
        if let Some(p) = path {
            require_file(p, flag, &format!("check the {flag} path"))?;
        }
    }
    let init = match &args.init_binary {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("locating the mkappliance binary for /init")?,
    };
    require_file(&init, "init binary", "pass --init-binary PATH")?;
    for o in &args.overlay {
        if !o.is_dir() {
            bail!("overlay {} is not a directory", o.display());
        }
    }
    Ok(Inputs { iso, ipxe, init })
}

/// The byte range of a file inside the ISO, checked to lie within the file.
fn iso_range(iso_path: &Path, e: &IsoEntry) -> Result<(u64, u64)> {
    let [extent] = e.extents.as_slice() else {
        bail!(
            "{} in the ISO is stored in {} extents; expected one",
            e.path,
            e.extents.len()
        );
    };
    let iso_len = std::fs::metadata(iso_path)?.len();
    if extent.offset + extent.len > iso_len {
        bail!(
            "{} is truncated: {} ends at byte {} but the file has {iso_len} bytes",
            iso_path.display(),
            e.path,
            extent.offset + extent.len
        );
    }
    Ok((extent.offset, extent.len))
}

/// Read systemd-boot from the ISO tree, or else from the ISO's UEFI boot image.
fn bootloader_from_iso(iso: &Iso, iso_path: &Path) -> Result<Content> {
    if let Some(e) = iso.lookup(ISO_BOOTLOADER)? {
        let (offset, len) = iso_range(iso_path, &e)?;
        return Ok(Content::Range {
            path: iso_path.to_path_buf(),
            offset,
            len,
        });
    }
    let (offset, len) = iso.efi_boot_image()?.with_context(|| {
        format!(
            "the ISO has neither {ISO_BOOTLOADER} nor a UEFI boot image: pass --bootloader PATH"
        )
    })?;
    let file = std::fs::File::open(iso_path)?;
    let fat = esp::FatImage::open(esp::Slice::new(file, offset, len)?)
        .context("reading the ISO's UEFI boot image")?;
    let data = fat.read(ISO_BOOTLOADER)?.with_context(|| {
        format!("the ISO's UEFI boot image has no {ISO_BOOTLOADER}: pass --bootloader PATH")
    })?;
    Ok(Content::bytes(data))
}

/// Feed everything that determines the image into a hash, for GUIDs and serials.
/// Paths are left out on purpose: the checkout location must not change the image.
fn identity_hash(
    cfg_toml: &str,
    trees: &[&FileTree],
    iso_pvd: &[u8],
    init_files: &[PathBuf],
    epoch: u32,
) -> Result<[u8; 32]> {
    let mut h = Sha256::new();
    h.update(cfg_toml.as_bytes());
    h.update(iso_pvd);
    h.update(epoch.to_le_bytes());
    h.update(initramfs::DEFAULT_ZSTD_LEVEL.to_le_bytes());
    for m in modules::APPLIANCE_MODULES {
        h.update(m.as_bytes());
        h.update(b"\n");
    }
    for p in init_files {
        // The linker's build ID names a binary as well as its bytes, without reading
        // 14 MB on the way to the first byte of the image.
        if let Ok(Some(id)) = initramfs::elf::build_id(p) {
            h.update(b"build-id");
            h.update(&id);
            continue;
        }
        let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
        std::io::copy(&mut std::io::BufReader::with_capacity(1 << 20, f), &mut h)
            .with_context(|| format!("hashing {}", p.display()))?;
    }
    for tree in trees {
        for (path, entry) in tree.iter() {
            h.update(path.as_bytes());
            h.update(entry.mode.to_le_bytes());
            match &entry.kind {
                crate::tree::Kind::Dir => h.update(b"d"),
                crate::tree::Kind::Symlink(t) => h.update(t.as_bytes()),
                crate::tree::Kind::File(Content::Range { offset, len, .. }) => {
                    // Inside the ISO, whose descriptor is hashed already.
                    h.update(offset.to_le_bytes());
                    h.update(len.to_le_bytes());
                }
                crate::tree::Kind::File(c) => {
                    h.update(c.len().to_le_bytes());
                    let mut r = c.open()?;
                    std::io::copy(&mut r, &mut h).context("hashing build inputs")?;
                }
            }
        }
    }
    Ok(h.finalize().into())
}

fn derive(seed: &[u8; 32], what: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(seed);
    h.update(what.as_bytes());
    h.finalize().into()
}

/// `MKAPPLIANCE_TIMINGS=1` prints how long each step took (for benchmarking), one
/// timer per thread.
struct Timer {
    prefix: &'static str,
    last: Option<std::cell::Cell<Instant>>,
}

impl Timer {
    fn new(prefix: &'static str) -> Timer {
        let last = std::env::var_os("MKAPPLIANCE_TIMINGS").map(|_| Instant::now().into());
        Timer { prefix, last }
    }
    /// Print the time since the last lap, naming what it was spent on.
    fn lap(&self, what: &str) {
        if let Some(last) = &self.last {
            let ms = last.replace(Instant::now()).elapsed().as_secs_f64() * 1000.0;
            eprintln!("{}{ms:>7.1} ms  {what}", self.prefix);
        }
    }
}

/// Progress on stderr: one spinner line per step (hidden with --quiet/--json or no TTY).
struct Steps {
    bar: indicatif::ProgressBar,
    start: Instant,
    timer: Timer,
    current: std::cell::RefCell<String>,
}

impl Steps {
    fn new(hidden: bool) -> Steps {
        let bar = if hidden {
            indicatif::ProgressBar::hidden()
        } else {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
                    .expect("static template"),
            );
            b.enable_steady_tick(std::time::Duration::from_millis(100));
            b
        };
        Steps {
            bar,
            start: Instant::now(),
            timer: Timer::new(""),
            current: std::cell::RefCell::new("checking inputs".into()),
        }
    }
    fn step(&self, msg: &str) {
        let prev = self.current.replace(msg.to_string());
        self.timer.lap(&prev);
        self.bar.set_message(msg.to_string());
    }
    fn done(&self) {
        self.timer.lap(&self.current.borrow());
        self.bar.finish_and_clear();
    }
}

pub fn build(args: &BuildArgs) -> Result<Summary> {
    let steps = Steps::new(args.quiet || args.json);
    let epoch = util::source_date_epoch()?;
    let boot_files = BootFiles {
        ipxe_efi: "ipxe.efi".into(),
        ipxe_bios: args.ipxe_bios.as_ref().map(|_| "undionly.kpxe".into()),
        ipxe_arm64: args.ipxe_arm64.as_ref().map(|_| "ipxe-arm64.efi".into()),
    };
    // Arguments first (cheap, and the most common mistakes), then the files they name.
    let cfg = config_from_args(args, boot_files)?;
    if args.upload {
        crate::publish::s3::check_args(&args.s3).context("--upload")?;
    }
    let inputs = resolve_inputs(args)?;
    let out_dir = args.out_dir.clone().unwrap_or_else(|| {
        PathBuf::from(format!("artifacts/bootstrap/{}", args.bootstrap_version))
    });
    // Decrypt (or read) the secrets now, before the slow steps: a wrong key fails fast.
    // The plaintext stays in memory and goes only into the image.
    let keys = sops::KeyOptions {
        age_key_file: args.age_key_file.clone(),
    };
    let machine_config = sops::load(&args.config, &keys)
        .with_context(|| format!("reading machine config {}", args.config.display()))?;
    let talosconfig = args
        .talosconfig
        .as_ref()
        .map(|p| {
            sops::load(p, &keys)
                .map(|t| t.bytes)
                .with_context(|| format!("reading talosconfig {}", p.display()))
        })
        .transpose()?;

    steps.step("reading the Talos ISO");
    let iso = Iso::open(&inputs.iso)
        .with_context(|| format!("reading Talos ISO {}", inputs.iso.display()))?;
    let want_vol = config::talos_volume_id(&cfg.talos_version);
    if iso.volume_id() != want_vol {
        bail!(
            "{} is not the Talos {} ISO (volume ID {:?}, expected {want_vol:?}): pass the matching --iso or version",
            inputs.iso.display(),
            cfg.talos_version,
            iso.volume_id()
        );
    }
    // Checked against the release the ISO is now known to be.
    if !args.skip_config_check {
        let warnings = machineconfig::check(&machine_config.docs, &cfg.talos_version)
            .with_context(|| format!("checking machine config {}", args.config.display()))?;
        for w in warnings {
            eprintln!("warning: {}: {w}", args.config.display());
        }
    }
    let machine_config = machine_config.bytes;
    let iso_file = |p: &str| -> Result<Content> {
        let e = iso.lookup(p)?.with_context(|| {
            format!(
                "{} has no {p}: is it a Talos metal ISO?",
                inputs.iso.display()
            )
        })?;
        let (offset, len) = iso_range(&inputs.iso, &e)?;
        Ok(Content::Range {
            path: inputs.iso.clone(),
            offset,
            len,
        })
    };
    let kernel = iso_file(ISO_KERNEL)?;
    let talos_initramfs = iso_file(ISO_INITRAMFS)?;
    let bootloader = match &args.bootloader {
        Some(p) => Content::path(p)?,
        None => bootloader_from_iso(&iso, &inputs.iso)?,
    };

    steps.step("rendering the appliance config");
    if talosconfig.is_some() {
        eprintln!(
            "warning: serving the talosconfig (cluster admin credential) at /configs/talosconfig to {}",
            cfg.network.minipc_ip
        );
    }
    let renderer = Renderer::new(args.templates.as_deref())?;
    let cfg_toml = cfg.to_toml()?;

    // The rootfs tree, in the layout DESIGN.md declares.
    let mut root = FileTree::new();
    root.add_file(layout::TFTP_IPXE, Content::path(&inputs.ipxe)?, FILE_MODE)?;
    if let Some(p) = &args.ipxe_bios {
        root.add_file(layout::TFTP_IPXE_BIOS, Content::path(p)?, FILE_MODE)?;
    }
    if let Some(p) = &args.ipxe_arm64 {
        root.add_file(layout::TFTP_IPXE_ARM64, Content::path(p)?, FILE_MODE)?;
    }
    root.add_file(
        &layout::http_kernel(&cfg.talos_version),
        kernel.clone(),
        FILE_MODE,
    )?;
    root.add_file(
        &layout::http_initramfs(&cfg.talos_version),
        talos_initramfs.clone(),
        FILE_MODE,
    )?;
    root.add_dir(&format!("{}/configs", layout::HTTP_ROOT), 0o750)?;
    root.add_file(layout::HTTP_CONFIG, Content::bytes(machine_config), 0o640)?;
    if let Some(t) = talosconfig {
        root.add_file(layout::HTTP_TALOSCONFIG, Content::bytes(t), 0o640)?;
    }
    root.add_file(
        layout::HTTP_BOOT_IPXE,
        Content::bytes(renderer.render(render::BOOT_IPXE, &cfg, "")?),
        FILE_MODE,
    )?;
    root.add_file(
        layout::DNSMASQ_CONF,
        Content::bytes(renderer.render(render::DNSMASQ_CONF, &cfg, "")?),
        FILE_MODE,
    )?;
    root.add_file(
        layout::NGINX_CONF,
        Content::bytes(renderer.render(render::NGINX_CONF, &cfg, "")?),
        FILE_MODE,
    )?;
    root.add_file(
        layout::APPLIANCE_TOML,
        Content::bytes(cfg_toml.clone()),
        FILE_MODE,
    )?;
    root.add_dir(layout::STATE_DIR, DIR_MODE)?;
    root.add_dir(layout::LOG_DIR, DIR_MODE)?;
    for o in &args.overlay {
        root.add_host_dir(o, "")
            .with_context(|| format!("adding overlay {}", o.display()))?;
    }

    // The ESP tree; the loader entry names the root partition, whose GUID comes from the
    // hash of everything else.
    let mut esp_tree = FileTree::new();
    esp_tree.add_file(layout::ESP_BOOTLOADER, bootloader, FILE_MODE)?;
    esp_tree.add_file(layout::ESP_KERNEL, kernel, FILE_MODE)?;
    esp_tree.add_file(
        layout::ESP_LOADER_CONF,
        Content::bytes(renderer.render(render::LOADER_CONF, &cfg, "")?),
        FILE_MODE,
    )?;

    let mut pvd = vec![0u8; 2048];
    {
        let mut f = std::fs::File::open(&inputs.iso)?;
        f.seek(SeekFrom::Start(16 * 2048))?;
        f.read_exact(&mut pvd)
            .context("reading the ISO volume descriptor")?;
    }
    // appliance.img does not exist yet: what it is made of stands in for it (the init
    // and its libraries, the mtime, the module list; the modules come from the ISO).
    let init_files: Vec<PathBuf> = std::iter::once(inputs.init.clone())
        .chain(
            initramfs::elf::runtime_files(&inputs.init).with_context(|| {
                format!("finding the run-time files of {}", inputs.init.display())
            })?,
        )
        .collect();
    let seed = identity_hash(&cfg_toml, &[&root, &esp_tree], &pvd, &init_files, epoch)?;
    let disk_guid = gpt::Guid::from_hash(&derive(&seed, "disk"));
    let esp_guid = gpt::Guid::from_hash(&derive(&seed, "esp"));
    let root_guid = gpt::Guid::from_hash(&derive(&seed, "root"));
    let appliance_args = format!(
        "console=tty0 console=ttyS0,115200 {}=PARTUUID={root_guid}",
        layout::ROOT_PARAM
    );
    esp_tree.add_file(
        layout::ESP_ENTRY,
        Content::bytes(renderer.render(render::LOADER_ENTRY, &cfg, &appliance_args)?),
        FILE_MODE,
    )?;

    let fat_seed = derive(&seed, "fat");
    let parts = image::Parts {
        root,
        ext4: rootfs::Ext4Params {
            uuid: gpt::Guid::from_hash(&derive(&seed, "ext4-uuid")).0,
            hash_seed: gpt::Guid::from_hash(&derive(&seed, "ext4-hash-seed")).0,
            timestamp: epoch,
            label: layout::ROOT_LABEL.into(),
        },
        esp: esp_tree,
        fat: esp::FatParams {
            volume_id: u32::from_le_bytes([fat_seed[0], fat_seed[1], fat_seed[2], fat_seed[3]]),
            label: layout::ESP_LABEL.into(),
            timestamp: epoch as i64,
        },
        esp_reserve: init_files
            .iter()
            .map(|p| std::fs::metadata(p).map(|m| m.len()))
            .sum::<std::io::Result<u64>>()
            .context("reading the size of the init binary")?
            + MODULES_RESERVE,
        disk_guid,
        esp_guid,
        root_guid,
    };

    steps.step("writing the image");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("creating output directory {}", out_dir.display()))?;
    let dest = out_dir.join(IMAGE_NAME);
    let out = AtomicFile::create(&dest)?;
    let file = out.file();
    let initramfs = || -> Result<(Vec<u8>, modules::ModuleSet)> {
        let t = Timer::new("[initramfs thread] ");
        // Where a corrupt ISO is corrupt: the initramfs inside that ISO.
        let where_ = || {
            format!(
                "reading the Talos initramfs {ISO_INITRAMFS} in {}",
                inputs.iso.display()
            )
        };
        let sqsh = initramfs::talos::extract_rootfs_sqsh(
            initramfs::talos::decompress(talos_initramfs.open()?).with_context(where_)?,
        )
        .with_context(where_)?;
        t.lap("spooling rootfs.sqsh");
        let mods = modules::select_modules(sqsh, modules::APPLIANCE_MODULES)
            .context("selecting kernel modules from the Talos rootfs")?;
        t.lap("picking kernel modules");
        let mut img = Vec::new();
        initramfs::write_appliance_initramfs(
            &initramfs::InitramfsSpec {
                init: &inputs.init,
                modules: &mods,
                mtime: epoch,
                zstd_level: initramfs::DEFAULT_ZSTD_LEVEL,
            },
            &mut img,
        )
        .context("building the appliance initramfs")?;
        t.lap("building appliance.img");
        Ok((img, mods))
    };
    let (written, mods) = image::write(file, &parts, initramfs, &|m| steps.step(m))
        .with_context(|| format!("writing {}", dest.display()))?;
    let (total, sha256) = (written.total, written.sha256);
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        file.metadata()?.blocks() * 512
    };
    // The image and its checksum appear together or not at all, Ctrl-C or not.
    let sha_path = out_dir.join(format!("{IMAGE_NAME}.sha256"));
    util::with_signals_blocked(|| -> Result<()> {
        out.commit()?;
        util::write_atomic(&sha_path, format!("{sha256}  {IMAGE_NAME}\n").as_bytes()).inspect_err(
            |_| {
                let _ = std::fs::remove_file(&dest);
            },
        )
    })?;
    steps.done();
    let published = crate::publish::after_build(args, &dest, &sha256)?;

    let summary = Summary {
        image: dest,
        sha256,
        size_bytes: total,
        allocated_bytes: allocated,
        talos_version: cfg.talos_version.clone(),
        bootstrap_version: cfg.bootstrap_version.clone(),
        minipc_mac: cfg.minipc_mac.to_string(),
        minipc_ip: cfg.network.minipc_ip.to_string(),
        appliance_ip: cfg.network.appliance.to_string(),
        config_url: cfg.config_url(),
        talosconfig_served: cfg.serve_talosconfig,
        boot_once: cfg.boot_once,
        kernel_modules: mods.modules.iter().map(|m| m.name.clone()).collect(),
        seconds: steps.start.elapsed().as_secs_f64(),
        published,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else if !args.quiet {
        print_summary(&summary, &cfg);
    }
    Ok(summary)
}

fn print_summary(s: &Summary, cfg: &ApplianceConfig) {
    println!("Built {} in {:.2} s", s.image.display(), s.seconds);
    println!(
        "  size      {} ({} allocated)",
        util::human_size(s.size_bytes),
        util::human_size(s.allocated_bytes)
    );
    println!("  sha256    {}", s.sha256);
    println!(
        "  Talos     {} (bootstrap {})",
        s.talos_version, s.bootstrap_version
    );
    println!("  appliance {} on the PXE link", s.appliance_ip);
    println!("The node {} will get:", s.minipc_mac);
    println!(
        "  DHCP      {} (router and DNS {})",
        s.minipc_ip,
        cfg.appliance_ip()
    );
    println!(
        "  TFTP      {} (UEFI), then http://{}/boot.ipxe",
        cfg.boot_files.ipxe_efi,
        cfg.appliance_ip()
    );
    println!("  config    {}", s.config_url);
    if s.talosconfig_served {
        println!(
            "  also      {}/configs/talosconfig (admin credential!)",
            cfg.http_base()
        );
    }
    println!(
        "  then      {}",
        if s.boot_once {
            "boots from its own disk once it has its config (boot-once)"
        } else {
            "PXE-installs on every boot (--pxe-every-boot)"
        }
    );
    if let Some(p) = &s.published {
        p.print();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(init: &[PathBuf]) -> [u8; 32] {
        identity_hash("cfg", &[&FileTree::new()], &[0; 2048], init, 1_700_000_000).unwrap()
    }

    /// An init with a GNU build ID is named by it; one without (objcopy removed the note)
    /// by its bytes, so changing a byte changes the GUIDs.
    #[test]
    fn init_named_by_build_id_or_else_by_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        let copy = dir.path().join("copy");
        std::fs::copy(&exe, &copy).unwrap();
        assert_eq!(
            seed(std::slice::from_ref(&exe)),
            seed(&[copy]),
            "same build ID"
        );

        let bare = dir.path().join("bare");
        let status = std::process::Command::new("objcopy")
            .arg("--remove-section=.note.gnu.build-id")
            .arg(&exe)
            .arg(&bare)
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(initramfs::elf::build_id(&bare).unwrap(), None);
        let before = seed(std::slice::from_ref(&bare));
        assert_ne!(before, seed(&[exe]));
        let mut bytes = std::fs::read(&bare).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&bare, bytes).unwrap();
        assert_ne!(before, seed(&[bare]), "a changed byte must change the seed");
    }
}
