//! Command-line interface: one struct per subcommand, dispatched by `main.rs`.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};

use crate::publish::{CompressFlag, Format, Sse};
pub use crate::run::RunArgs;

#[derive(Debug, Parser)]
#[command(
    name = "mkappliance",
    version,
    about = "Build a bootable UEFI PXE appliance disk that installs Talos Linux on one machine",
    long_about = "Build a bootable UEFI PXE appliance disk that installs Talos Linux on one machine.\n\n\
        `mkappliance build` turns a Talos ISO and a machine config into a small GPT disk image \
        (FAT32 ESP + ext4 rootfs). Import it into Synology VMM, Proxmox or libvirt on a link to \
        the bare-metal node: booted, it serves that node DHCP, iPXE over TFTP and the Talos \
        kernel, initramfs and machine config over HTTP.\n\n\
        Inside the appliance this same binary runs as /init."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build the appliance disk image from a Talos ISO and a machine config
    Build(Box<BuildArgs>),
    /// Read a built image back (no root needed) and check it is a valid appliance
    Inspect(InspectArgs),
    /// Run the appliance's PXE services (DHCP, TFTP, HTTP) on this host
    Serve(ServeArgs),
    /// Boot a built image in QEMU with a PXE client VM, to try it before importing it
    ///
    /// Boots IMAGE as the appliance VM (q35, UEFI firmware, 512 MiB; KVM when /dev/kvm is
    /// usable, else TCG) with its PXE NIC on a private link to a client VM and its uplink on
    /// QEMU user networking (NAT to this host's network; --offline cuts it off). When the
    /// appliance prints its ready line, the client VM (UEFI, an empty disk, the node MAC the
    /// image pins) PXE-boots from it as the mini-PC would: DHCP, iPXE over TFTP, Talos over
    /// HTTP, the machine config, then its own disk once installed. The image is not
    /// modified: the appliance's writes go to a throwaway snapshot. Both serial consoles are
    /// streamed to stdout, prefixed "appliance | " and "client    | "; status goes to stderr.
    /// Press Ctrl-C to quit: both VMs are stopped and the run files removed. For scripts and
    /// CI, --until ends the run with status 0 once a stage is reached, --timeout fails a
    /// stage that takes too long (naming it) and --json prints the timings.
    Run(Box<RunArgs>),
    /// Decrypt a SOPS-encrypted config (age recipients) and print it on stdout, as the
    /// build does; plaintext files are printed unchanged
    Decrypt(DecryptArgs),
    /// Compress an artifact (reproducible, parallel) and write SHA256SUMS beside it
    Compress(CompressArgs),
    /// Upload a directory of artifacts to an S3-compatible bucket and verify every object
    Upload(Box<UploadArgs>),
    /// Download a build input (Talos ISO, iPXE) and verify its checksum
    #[command(subcommand)]
    Fetch(FetchCommand),
}

#[derive(Debug, Args)]
#[command(after_long_help = "EXAMPLE:\n    \
    mkappliance build v1.11.6 2025-12-17 00:11:22:33:44:55\n\n\
    reads artifacts/talos/v1.11.6/metal-amd64.iso and config/controlplane.yaml and writes\n\
    artifacts/bootstrap/2025-12-17/bootstrap-pxe.raw (mode 0600: it holds cluster secrets).\n\n\
    Set SOURCE_DATE_EPOCH for reproducible timestamps; the same inputs give the same bytes.")]
pub struct BuildArgs {
    /// Talos release the node installs, e.g. v1.11.6 (must match the ISO)
    pub talos_version: String,
    /// Name of this appliance build, e.g. a date like 2025-12-17 (names the output dir)
    pub bootstrap_version: String,
    /// MAC address of the node to install (the only machine the appliance serves)
    pub minipc_mac: String,

    /// Talos ISO [default: artifacts/talos/<TALOS_VERSION>/metal-amd64.iso]
    #[arg(long, value_name = "PATH")]
    pub iso: Option<PathBuf>,
    /// Talos machine config for the node (controlplane.yaml or worker.yaml)
    #[arg(long, value_name = "PATH", default_value = "config/controlplane.yaml")]
    pub config: PathBuf,
    /// Also serve this talosconfig at /configs/talosconfig. Opt-in: it is the cluster's
    /// admin credential and the node never needs it
    #[arg(long, value_name = "PATH")]
    pub talosconfig: Option<PathBuf>,
    /// Age key file for SOPS-encrypted configs, tried before SOPS_AGE_KEY,
    /// SOPS_AGE_KEY_FILE, SOPS_AGE_KEY_CMD and ~/.config/sops/age/keys.txt
    #[arg(long, value_name = "PATH")]
    pub age_key_file: Option<PathBuf>,
    /// Do not check that --config is a Talos machine config (version v1alpha1, a machine
    /// type, a cluster section)
    #[arg(long)]
    pub skip_config_check: bool,
    /// iPXE for x86-64 UEFI clients [default: the first of /usr/lib/ipxe/ipxe.efi,
    /// /usr/share/ipxe/ipxe.efi, /usr/share/ipxe/ipxe-x86_64.efi,
    /// /usr/share/ipxe/ipxe-snponly-x86_64.efi, then the `mkappliance fetch ipxe` cache].
    /// Use snponly.efi for NICs iPXE has no driver for (it drives the NIC through the
    /// firmware's own UNDI/SNP)
    #[arg(long, value_name = "PATH")]
    pub ipxe: Option<PathBuf>,
    /// iPXE for legacy BIOS clients (undionly.kpxe); BIOS clients are not served without it
    #[arg(long, value_name = "PATH")]
    pub ipxe_bios: Option<PathBuf>,
    /// iPXE for ARM64 UEFI clients; ARM64 clients are not served without it
    #[arg(long, value_name = "PATH")]
    pub ipxe_arm64: Option<PathBuf>,
    /// Static x86-64 Linux binary to use as the appliance's /init instead of this
    /// mkappliance (needed when building on macOS or arm64)
    #[arg(long, value_name = "PATH")]
    pub init_binary: Option<PathBuf>,
    /// UEFI boot loader for the appliance [default: systemd-boot from the ISO]
    #[arg(long, value_name = "PATH")]
    pub bootloader: Option<PathBuf>,
    /// Output directory [default: artifacts/bootstrap/<BOOTSTRAP_VERSION>]
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Directory whose files override the embedded templates of the same name
    /// (boot.ipxe.j2, dnsmasq.conf.j2, nginx.conf.j2, loader.conf.j2, appliance.conf.j2)
    #[arg(long, value_name = "DIR")]
    pub templates: Option<PathBuf>,
    /// Directory tree copied into the appliance rootfs last (repeatable; later wins)
    #[arg(long, value_name = "DIR")]
    pub overlay: Vec<PathBuf>,

    /// Appliance address and prefix on the PXE link
    #[arg(long, value_name = "CIDR", default_value = "10.10.10.2/24")]
    pub appliance_ip: String,
    /// Address the node gets
    #[arg(long, value_name = "IP", default_value = "10.10.10.100")]
    pub minipc_ip: String,
    /// DHCP range rendered into dnsmasq.conf (only the pinned MAC is served)
    #[arg(
        long,
        value_name = "FIRST,LAST",
        default_value = "10.10.10.50,10.10.10.60"
    )]
    pub dhcp_range: String,
    /// MAC of the appliance VM's NIC on the PXE link [default: the first NIC]
    #[arg(long, value_name = "MAC")]
    pub internal_mac: Option<String>,
    /// MAC of the appliance VM's uplink NIC [default: the other NIC]
    #[arg(long, value_name = "MAC")]
    pub uplink_mac: Option<String>,
    /// Static uplink address for networks without DHCP, e.g. 192.168.1.50/24
    /// [default: DHCP on the uplink]
    #[arg(long, value_name = "CIDR")]
    pub uplink_address: Option<String>,
    /// Default gateway for the static --uplink-address
    #[arg(long, value_name = "IP")]
    pub uplink_gateway: Option<String>,
    /// DNS servers the appliance forwards the node's queries to (comma-separated or
    /// repeated); with DHCP they replace the servers the lease names
    #[arg(long, value_name = "IP", value_delimiter = ',')]
    pub uplink_dns: Vec<String>,
    /// Extra kernel arguments for the Talos node (appended to the Talos PXE defaults)
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub extra_kernel_args: Option<String>,
    /// Keep PXE-installing on every boot instead of exiting to the local disk once the
    /// node has fetched its config
    #[arg(long)]
    pub pxe_every_boot: bool,

    /// Also compress the image (`--compress` alone: gzip) and write SHA256SUMS.
    /// COMPRESS=true in the environment does the same, as the original helper script did
    #[arg(long, env = "COMPRESS", value_name = "FORMAT", num_args = 0..=1,
          default_missing_value = "gzip", value_parser = CompressFlag::parse)]
    pub compress: Option<CompressFlag>,
    /// Then upload the output directory to s3://BUCKET/bootstrap/<BOOTSTRAP_VERSION>/
    /// (UPLOAD=true in the environment does the same)
    #[arg(long, env = "UPLOAD", value_parser = clap::builder::FalseyValueParser::new())]
    pub upload: bool,

    /// Print the summary as JSON on stdout (for CI)
    #[arg(long)]
    pub json: bool,
    /// No progress output
    #[arg(long, short)]
    pub quiet: bool,

    // Last: its help heading applies to everything after it.
    #[command(flatten)]
    pub s3: S3Args,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Appliance disk image (.raw)
    pub image: PathBuf,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(
    group(ArgGroup::new("source").required(true).args(["image", "root"])),
    after_long_help = "EXAMPLE:\n    \
    sudo mkappliance serve --image artifacts/bootstrap/2025-12-17/bootstrap-pxe.raw --interface enx00e04c680001\n\n\
    serves the node plugged into that NIC exactly as the appliance VM would: DHCP (its MAC\n\
    only, on that interface only), iPXE over TFTP and Talos over HTTP on the appliance\n\
    address, which is added to the interface when missing (and removed on exit).\n\
    Needs root (ports 67, 69, 80). One line per event on stderr; Ctrl-C stops."
)]
pub struct ServeArgs {
    /// Built appliance image to serve from (read directly: no root needed to read it,
    /// no loop mount)
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<PathBuf>,
    /// Unpacked appliance rootfs to serve from (the directory holding srv/ and etc/)
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Network interface on the node's link; DHCP answers only there
    #[arg(long, short, value_name = "IFACE")]
    pub interface: String,
    /// Where the boot-once state lives [default: DIR/var/lib/appliance with --root,
    /// $XDG_STATE_HOME/mkappliance (or ~/.local/state/mkappliance) with --image]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Where events.log is appended [default: DIR/var/log/appliance with --root, the
    /// state directory with --image]
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
    /// Re-arm the PXE install: forget that the node fetched its config, then serve
    #[arg(long)]
    pub rearm: bool,
    /// Also NAT the node's subnet out of this interface (nf_tables masquerade, forwarding
    /// on) and run the DNS forwarder on the appliance address, relaying to the servers in
    /// /etc/resolv.conf: the host stands in for the appliance VM, uplink included
    #[arg(long, value_name = "IFACE")]
    pub uplink: Option<String>,
    /// Print events as JSON lines
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(
    after_long_help = "Keys are looked up as sops does: --age-key-file, SOPS_AGE_KEY,\n\
    SOPS_AGE_KEY_FILE, SOPS_AGE_KEY_CMD, then $XDG_CONFIG_HOME/sops/age/keys.txt\n\
    (~/.config/sops/age/keys.txt); for ssh-ed25519 recipients SOPS_AGE_SSH_PRIVATE_KEY_FILE\n\
    or ~/.ssh/id_ed25519. The MAC is always verified."
)]
pub struct DecryptArgs {
    /// SOPS-encrypted YAML or JSON file
    pub file: PathBuf,
    /// Age key file, tried before the environment and the default key file
    #[arg(long, value_name = "PATH")]
    pub age_key_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(
    after_long_help = "The output is written beside FILE as FILE.gz (or .zst, .xz) under a \
    temporary name and renamed when complete; SHA256SUMS in the same directory then lists \
    every artifact there. Gzip output has no name and mtime 0, and its bytes do not depend \
    on --threads: the same input always gives the same .gz."
)]
pub struct CompressArgs {
    /// File to compress (e.g. artifacts/bootstrap/2025-12-17/bootstrap-pxe.raw)
    pub file: PathBuf,
    /// Compression format: gzip for Synology VMM and most importers; zstd and xz for others
    #[arg(long, value_enum, default_value = "gzip")]
    pub format: Format,
    /// Compression level [default: gzip 6, zstd 3, xz 6]
    #[arg(long, value_name = "N")]
    pub level: Option<u32>,
    /// Compression threads [default: all cores]
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Do not write SHA256SUMS
    #[arg(long)]
    pub no_sums: bool,
    /// No progress output
    #[arg(long, short)]
    pub quiet: bool,
}

/// Where and how to upload: shared by `build --upload` and `upload`.
///
/// Credentials come only from the environment (IDRIVE_ACCESS_KEY + IDRIVE_SECRET_KEY, or the
/// standard AWS chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN, AWS_PROFILE
/// or --profile, web identity, container and instance roles), never from flags: a flag would
/// show up in `ps` and in CI logs.
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "Upload options")]
pub struct S3Args {
    /// Bucket to upload to
    #[arg(long, env = "IDRIVE_BUCKET", value_name = "NAME")]
    pub bucket: Option<String>,
    /// S3 endpoint of an S3-compatible store (iDrive e2, MinIO, Ceph, Garage, R2...);
    /// `https://` is assumed when no scheme is given [default: AWS_ENDPOINT_URL_S3,
    /// AWS_ENDPOINT_URL, or AWS S3]
    #[arg(long, env = "IDRIVE_ENDPOINT", value_name = "URL")]
    pub endpoint: Option<String>,
    /// Region [default: AWS_REGION, AWS_DEFAULT_REGION, the profile's, or us-east-1]
    #[arg(long, env = "IDRIVE_REGION", value_name = "REGION")]
    pub region: Option<String>,
    /// Named profile from ~/.aws/config and ~/.aws/credentials [default: AWS_PROFILE]
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
    /// Key prefix [default: bootstrap/<BOOTSTRAP_VERSION>/, i.e. bootstrap/ + the
    /// directory's name]
    #[arg(long, value_name = "PREFIX")]
    pub prefix: Option<String>,
    /// Ask the store to encrypt the objects at rest (`--sse` alone: AES256)
    #[arg(long, value_enum, value_name = "ALGORITHM", num_args = 0..=1, default_missing_value = "AES256")]
    pub sse: Option<Sse>,
    /// KMS key for `--sse aws:kms`
    #[arg(long, value_name = "KEY_ID", requires = "sse")]
    pub sse_kms_key_id: Option<String>,
    /// Encrypt every artifact to this age recipient (age1..., or an ssh-ed25519/ssh-rsa public
    /// key line) before upload, uploading NAME.age instead of NAME (repeatable; checksum
    /// files stay plain)
    #[arg(long, value_name = "AGE_RECIPIENT")]
    pub encrypt_to: Vec<String>,
    /// Files of at least this many MiB are sent as a multipart upload in parts of this size
    #[arg(long, value_name = "MIB", default_value_t = 16)]
    pub part_size_mib: u64,
    /// Parts uploaded at once
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub concurrency: usize,
    /// Retries of a failed request (with exponential backoff) before giving up
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub retries: u32,
    /// Skip reading every object back to check its size and SHA-256
    #[arg(long)]
    pub no_verify: bool,
    /// Objects are read back in parallel ranges of at least this size. Each ranged GET
    /// costs some servers a pass over the whole object (moto: 8 ranges of a 166 MiB object
    /// took 3.5 times as long as one GET), so only really large objects are split
    #[arg(long, value_name = "MIB", default_value_t = 256, hide = true)]
    pub verify_range_mib: u64,
}

#[derive(Debug, Args)]
#[command(after_long_help = "EXAMPLE (a CI release job):\n    \
    IDRIVE_BUCKET=... IDRIVE_ENDPOINT=... IDRIVE_REGION=... \\\n    \
    IDRIVE_ACCESS_KEY=... IDRIVE_SECRET_KEY=... \\\n    \
    mkappliance upload artifacts/bootstrap/2025-12-17\n\n\
    uploads every file of the directory to s3://$IDRIVE_BUCKET/bootstrap/2025-12-17/, reads \
    each object back to check its size and SHA-256, and prints the object URLs. A failed \
    multipart upload is aborted, so nothing half-written stays in the bucket.")]
pub struct UploadArgs {
    /// Directory of artifacts to upload (every file in it, recursively; hidden files skipped)
    pub dir: PathBuf,
    /// Show what would go where, without contacting the store
    #[arg(long)]
    pub dry_run: bool,
    /// Print the uploaded objects as JSON on stdout
    #[arg(long)]
    pub json: bool,
    /// No progress output
    #[arg(long, short)]
    pub quiet: bool,
    // Last: its help heading applies to everything after it.
    #[command(flatten)]
    pub s3: S3Args,
}

#[derive(Debug, Subcommand)]
pub enum FetchCommand {
    /// Download a Talos metal-amd64.iso into artifacts/talos/<VERSION>/ (where `build`
    /// looks), verified against the release's sha512sum.txt
    Talos(FetchTalosArgs),
    /// Download iPXE (ipxe.efi, undionly.kpxe) into a cache, when no distribution copy exists
    Ipxe(FetchIpxeArgs),
}

/// Options shared by every download.
#[derive(Debug, Args, Clone)]
pub struct DownloadArgs {
    /// Retries of an interrupted or failed download; each resumes where the last stopped
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub retries: u32,
    /// Download again even when a verified copy is already there
    #[arg(long)]
    pub force: bool,
    /// No progress output
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
#[command(after_long_help = "EXAMPLES:\n    \
    mkappliance fetch talos v1.11.6\n    \
    mkappliance fetch talos v1.11.6 --schematic 376567988ad370138ad8b2698212367b8edcb69b5fd68c80be1f2ec7d603b4ba --sha256 HEX\n\n\
    The download goes to a hidden .part file beside the destination and is renamed only \
    once its checksum matches; an interrupted download resumes from there (HTTP Range). \
    A checksum mismatch deletes the download.")]
pub struct FetchTalosArgs {
    /// Talos release, e.g. v1.11.6
    pub version: String,
    /// Image Factory schematic ID: fetch <BASE_URL>/<SCHEMATIC>/<VERSION>/metal-amd64.iso
    /// from the Image Factory, which publishes no checksum file (pin it with --sha256/--sha512)
    #[arg(long, value_name = "ID")]
    pub schematic: Option<String>,
    /// Mirror or Image Factory base URL [default: https://github.com/siderolabs/talos/releases/download,
    /// or https://factory.talos.dev/image with --schematic]
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,
    /// Expected SHA-256 of the ISO (hex)
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,
    /// Expected SHA-512 of the ISO (hex)
    #[arg(long, value_name = "HEX")]
    pub sha512: Option<String>,
    /// Output directory [default: artifacts/talos/<VERSION>]
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    #[command(flatten)]
    pub download: DownloadArgs,
}

#[derive(Debug, Args)]
pub struct FetchIpxeArgs {
    /// Base URL the iPXE binaries are fetched from
    #[arg(long, value_name = "URL", default_value = "https://boot.ipxe.org")]
    pub base_url: String,
    /// Cache directory [default: $XDG_CACHE_HOME/mkappliance/ipxe or ~/.cache/mkappliance/ipxe]
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Expected SHA-256 of ipxe.efi (hex); iPXE publishes no checksum file
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,
    #[command(flatten)]
    pub download: DownloadArgs,
}
