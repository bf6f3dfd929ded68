//! Starting the PXE services: [`start`] is what the appliance init calls; [`run`] is
//! `mkappliance serve` on an ordinary Linux host (the same services, until Ctrl-C).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

use crate::appliance::bootonce::{self, BootOnce};
use crate::appliance::dhcp::DhcpServer;
use crate::appliance::events::{Event, EventLog};
use crate::appliance::http::{HttpServer, Site};
use crate::appliance::netif::{AddedAddress, Iface};
use crate::appliance::ra::Advertiser;
use crate::appliance::served::ServedTree;
use crate::appliance::tftp::TftpServer;
use crate::appliance::{dns, net};
use crate::cmdline::ServeArgs;
use crate::layout;
use crate::render::{self, Renderer};
use crate::util::sha256_hex;

/// Largest machine config we hash for the boot-once state.
const MAX_CONFIG: u64 = 16 << 20;
/// Upstream DNS servers for `serve --uplink`.
const RESOLV_CONF: &str = "/etc/resolv.conf";
const DNS_PORT: u16 = 53;
/// What a permission error as another user means.
const NEEDS_ROOT: &str = "serve needs root (or CAP_NET_ADMIN, CAP_NET_RAW and \
    CAP_NET_BIND_SERVICE) to configure the interface and bind ports 67, 69 and 80";
/// Under `$XDG_STATE_HOME` (or `~/.local/state`) when serving an image.
const STATE_SUBDIR: &str = "mkappliance";

pub struct ServeOptions {
    /// The PXE interface: DHCP answers only there; HTTP and TFTP bind its address.
    pub interface: String,
    /// Boot-once state (`/var/lib/appliance` inside the appliance).
    pub state_dir: PathBuf,
    /// Set the interface up and give it the appliance address when it lacks it.
    pub configure_interface: bool,
    /// Forget that the node fetched its config before serving (re-arm the install).
    pub rearm: bool,
}

/// The running services. Dropping this does not stop them; [`Handles::stop`] does.
pub struct Handles {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub iface: Iface,
    pub address: Ipv4Addr,
    /// The node's boot-once state, shared with the HTTP server (the console re-arms it).
    pub boot_once: Arc<BootOnce>,
    /// The address `serve` added to the interface, removed when the services stop.
    added: Option<AddedAddress>,
}

impl Handles {
    /// Ask every service to stop, and wait for them (each notices within a second;
    /// transfers in flight finish or time out on their own).
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
        drop(self.added);
    }

    /// Block until the services stop (they stop only through [`Handles::stop`]).
    pub fn wait(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .with_context(|| format!("starting the {name} thread"))
}

/// Start DHCP, TFTP, HTTP and the IPv6 RA for `tree` on `opts.interface`, each on its
/// own thread, and return once all are listening.
pub fn start(tree: Arc<ServedTree>, opts: &ServeOptions, events: &EventLog) -> Result<Handles> {
    let cfg = tree.config().clone();
    let appliance = cfg.network.appliance;
    let iface = Iface::lookup(&opts.interface)?;
    // Held until the services stop; an error below drops it, taking the address away.
    let mut added = None;
    if opts.configure_interface {
        if iface.ensure_up()? {
            events.emit(Event::new("link-up").field("interface", iface.name.clone()));
        }
        added = iface.ensure_address(appliance)?;
        if added.is_some() {
            events.emit(
                Event::new("address-added")
                    .ip(appliance.addr)
                    .field("interface", iface.name.clone())
                    .field("address", appliance.to_string()),
            );
        }
    } else if !iface.ipv4_addrs()?.contains(&appliance.addr) {
        bail!(
            "{} does not have the appliance address {appliance}",
            iface.name
        );
    }
    events.pin(cfg.network.minipc_ip, cfg.minipc_mac);

    let config = tree
        .read_small(layout::HTTP_CONFIG, MAX_CONFIG)?
        .with_context(|| format!("the served tree has no /{}", layout::HTTP_CONFIG))?;
    if opts.rearm && bootonce::rearm(&opts.state_dir, cfg.minipc_mac)? {
        events.emit(
            Event::new("boot-once-rearmed")
                .mac(cfg.minipc_mac)
                .field("note", "the node installs Talos again on its next PXE boot"),
        );
    }
    let boot_once = Arc::new(BootOnce::open(
        &opts.state_dir,
        cfg.minipc_mac,
        sha256_hex(&config),
        cfg.boot_once,
    ));
    let exit_script = Renderer::new(None)?
        .render(render::BOOT_LOCAL_IPXE, &cfg, "")?
        .into_bytes();

    let http = HttpServer::bind(
        appliance.addr,
        Site {
            tree: tree.clone(),
            pinned_ip: cfg.network.minipc_ip,
            ipxe_efi: cfg.boot_files.ipxe_efi.clone(),
            boot_once: boot_once.clone(),
            exit_script,
            events: events.clone(),
        },
    )
    .context("starting HTTP")?;
    let tftp = TftpServer::bind(appliance.addr, iface.mtu, tree.clone(), events)
        .context("starting TFTP")?;
    let dhcp = DhcpServer::bind(&cfg, &iface, events).context("starting DHCP")?;
    let ra = match Advertiser::bind(&iface) {
        Ok(a) => Some(a),
        Err(e) => {
            events.emit(
                Event::new("ipv6-ra-off")
                    .warning()
                    .field("error", format!("{e:#}"))
                    .field("note", "iPXE may wait ~13 s for IPv6"),
            );
            None
        }
    };

    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let s = stop.clone();
    threads.push(spawn("http", move || http.run(s))?);
    let s = stop.clone();
    threads.push(spawn("tftp", move || tftp.run(s))?);
    let s = stop.clone();
    threads.push(spawn("dhcp", move || dhcp.run(s))?);
    if let Some(ra) = ra {
        let (s, ev) = (stop.clone(), events.clone());
        threads.push(spawn("ipv6-ra", move || ra.run(s, ev))?);
    }
    events.emit(
        Event::new("ready")
            .mac(cfg.minipc_mac)
            .ip(cfg.network.minipc_ip)
            .field("interface", iface.name.clone())
            .field("address", appliance.to_string())
            .field("talos", cfg.talos_version.clone())
            .field("serving", tree.describe())
            .field(
                "boot_once",
                match (boot_once.enabled(), boot_once.armed()) {
                    (false, _) => "off",
                    (true, false) => "waiting for the config fetch",
                    (true, true) => "armed: the node boots from disk",
                },
            ),
    );
    Ok(Handles {
        stop,
        threads,
        iface,
        address: appliance.addr,
        boot_once,
        added,
    })
}

/// Where `serve --image` keeps state: `$XDG_STATE_HOME/mkappliance`, else
/// `~/.local/state/mkappliance`.
fn default_state_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join(STATE_SUBDIR));
    }
    let home = std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .context("neither XDG_STATE_HOME nor HOME is set: pass --state-dir DIR")?;
    Ok(Path::new(&home).join(".local/state").join(STATE_SUBDIR))
}

/// Block SIGINT and SIGTERM (in this thread and every thread started after) and return
/// the set, to wait for them with `sigwait`.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set; pthread_sigmask on the calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// `mkappliance serve`.
pub fn run(args: &ServeArgs) -> Result<()> {
    let tree = match (&args.image, &args.root) {
        (Some(img), _) => ServedTree::open_image(img)
            .with_context(|| format!("reading the image {}", img.display()))?,
        (None, Some(root)) => ServedTree::open_dir(root)?,
        (None, None) => bail!("give --image IMAGE or --root DIR"),
    };
    let state_dir = match (&args.state_dir, tree.root_dir()) {
        (Some(d), _) => d.clone(),
        (None, Some(root)) => root.join(layout::STATE_DIR),
        (None, None) => default_state_dir()?,
    };
    let log_dir = match (&args.log_dir, tree.root_dir()) {
        (Some(d), _) => d.clone(),
        (None, Some(root)) => root.join(layout::LOG_DIR),
        (None, None) => state_dir.clone(),
    };
    let events = EventLog::new(args.json, true);
    let logging = events.log_to_dir(&log_dir);
    let signals = block_stop_signals();
    let opts = ServeOptions {
        interface: args.interface.clone(),
        state_dir: state_dir.clone(),
        configure_interface: true,
        rearm: args.rearm,
    };
    let pxe_subnet = tree.config().network.appliance;
    let handles = start(Arc::new(tree), &opts, &events).map_err(needs_root_hint)?;
    // Dropped at the end of `run`: the NAT table goes and forwarding is restored.
    let _uplink = match &args.uplink {
        Some(ifname) => Some(start_uplink(ifname, pxe_subnet, &events)?),
        None => None,
    };
    if !logging {
        events.emit(
            Event::new("log-off")
                .field("dir", log_dir.display().to_string())
                .field("note", "not writable: events go to stderr only"),
        );
    }
    let mut sig: libc::c_int = 0;
    // SAFETY: `signals` is an initialised set blocked in this thread.
    unsafe { libc::sigwait(&signals, &mut sig) };
    events.emit(Event::new("stopping").field("signal", sig));
    handles.stop();
    Ok(())
}

/// A permission error as a user other than root is the missing root, not the thing that
/// failed: say so first.
fn needs_root_hint(e: anyhow::Error) -> anyhow::Error {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let denied = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
    });
    if denied && !root {
        e.context(NEEDS_ROOT)
    } else {
        e
    }
}

/// `serve --uplink`: NAT out of `ifname` and a DNS forwarder on the appliance address.
fn start_uplink(
    ifname: &str,
    pxe_subnet: crate::config::Ipv4Cidr,
    events: &EventLog,
) -> Result<(net::HostUplink, dns::DnsHandle)> {
    let nat = net::HostUplink::enable(ifname, pxe_subnet)?;
    let resolv = std::fs::read_to_string(RESOLV_CONF).unwrap_or_default();
    let upstreams = dns::upstreams_from_resolv_conf(&resolv);
    let forwarder = dns::start(
        (pxe_subnet.addr, DNS_PORT).into(),
        Arc::new(std::sync::RwLock::new(upstreams.clone())),
    )
    .context("starting the DNS forwarder")?;
    events.emit(
        Event::new("uplink")
            .field("interface", ifname.to_string())
            .field("nat", pxe_subnet.to_string())
            .field(
                "dns",
                upstreams
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
    );
    Ok((nat, forwarder))
}
