//! From a mounted rootfs to a serving appliance: read the config, bring up the network,
//! start the PXE services, and say so on the consoles.

use std::fmt;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};

use super::bootonce::BootOnce;
use super::console::Consoles;
use super::events::EventLog;
use super::net::{self, ApplianceNet, NicWait, UplinkState};
use super::serve::{self, Handles, ServeOptions};
use super::served::ServedTree;
use crate::config::ApplianceConfig;
use crate::layout::{APPLIANCE_TOML, LOG_DIR, STATE_DIR};

/// Consoles an operator types on (serial first, then the VGA console's keyboard).
const KEY_CONSOLES: &[&str] = &["/dev/ttyS0", "/dev/tty0"];
/// The key that re-arms the install after a failed one.
const REARM_KEY: u8 = b'r';

/// The running network and services, kept until power-off so they can be stopped and
/// their files (event log, served tree) closed before the rootfs is unmounted.
struct Running {
    services: Handles,
    net: ApplianceNet,
}

static RUNNING: Mutex<Option<Running>> = Mutex::new(None);

/// Stop the services and the network (before unmounting the rootfs at power-off).
pub fn stop() {
    let running = RUNNING.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(r) = running {
        r.services.stop();
        if let Some(dns) = r.net.dns {
            dns.stop();
        }
        r.net.uplink.stop();
    }
}

/// What the ready line reports about the running appliance.
pub struct Serving {
    pub address: String,
    pub pxe_nic: String,
    pub node: String,
    pub uplink: String,
}

impl fmt::Display for Serving {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ip={} pxe={} node={} uplink={} services=dhcp,tftp,http,dns",
            self.address, self.pxe_nic, self.node, self.uplink
        )
    }
}

/// One word for the ready line; the full state is printed on its own line.
fn uplink_word(s: &UplinkState) -> String {
    match s {
        UplinkState::Offline { .. } => "offline".into(),
        UplinkState::Acquiring { ifname } => format!("{ifname}:acquiring"),
        UplinkState::Online(i) => format!("{}:{}", i.ifname, i.address),
    }
}

/// Start everything the appliance serves from the rootfs mounted at `sysroot`. The
/// network and the services run on their own threads until [`stop`].
pub fn start(sysroot: &Path, consoles: &Arc<Consoles>) -> Result<Serving> {
    let toml_path = sysroot.join(APPLIANCE_TOML);
    let text = std::fs::read_to_string(&toml_path)
        .with_context(|| format!("reading the appliance config {}", toml_path.display()))?;
    let cfg = ApplianceConfig::from_toml(&text)?;

    let c = consoles.clone();
    let sink: Box<dyn Fn(&str) + Send + Sync> = Box::new(move |line: &str| c.line(line));
    let events = EventLog::with_sinks(false, false, vec![sink]);
    if !events.log_to_dir(&sysroot.join(LOG_DIR)) {
        consoles.line(&format!(
            "events: /{LOG_DIR} is not writable; events go to the consoles only"
        ));
    }

    let c = consoles.clone();
    let appliance_net = net::bring_up(&cfg, NicWait::default(), move |s| {
        c.line(&format!("uplink: {s}"))
    })
    .context("bringing up the PXE network")?;
    for w in &appliance_net.warnings {
        consoles.line(&format!("network: {w}"));
    }
    let pxe_nic = appliance_net.pxe.nic.name.clone();

    let tree = ServedTree::open_dir(sysroot).context("opening the served tree")?;
    let handles = serve::start(
        Arc::new(tree),
        &ServeOptions {
            interface: pxe_nic.clone(),
            state_dir: sysroot.join(STATE_DIR),
            configure_interface: false,
            rearm: false,
        },
        &events,
    )
    .context("starting the PXE services")?;

    for dev in KEY_CONSOLES {
        watch_keys(dev, handles.boot_once.clone(), consoles.clone());
    }

    let uplink = appliance_net.uplink.state();
    consoles.line(&format!(
        "appliance: {} on {pxe_nic}, serving {} ({}) Talos {}; uplink {uplink}",
        cfg.network.appliance, cfg.minipc_mac, cfg.network.minipc_ip, cfg.talos_version
    ));
    consoles.line(&format!(
        "appliance: waiting for {} to PXE boot ({})",
        cfg.minipc_mac,
        if cfg.boot_once {
            "boot-once: it installs once, then boots its disk; press r here to re-arm"
        } else {
            "it installs on every PXE boot"
        }
    ));
    let serving = Serving {
        address: cfg.network.appliance.to_string(),
        pxe_nic,
        node: cfg.minipc_mac.to_string(),
        uplink: uplink_word(&uplink),
    };
    *RUNNING.lock().unwrap_or_else(|e| e.into_inner()) = Some(Running {
        services: handles,
        net: appliance_net,
    });
    Ok(serving)
}

/// Read single key presses from a console (no Enter needed) and re-arm boot-once on `r`,
/// so an operator can retry a failed install from the hypervisor's console.
fn watch_keys(dev: &'static str, boot_once: Arc<BootOnce>, consoles: Arc<Consoles>) {
    let Ok(mut tty) = std::fs::OpenOptions::new().read(true).open(dev) else {
        return;
    };
    // SAFETY: termios is plain data filled by tcgetattr before tcsetattr reads it.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(tty.as_raw_fd(), &mut t) == 0 {
            t.c_lflag &= !(libc::ICANON | libc::ECHO);
            t.c_cc[libc::VMIN] = 1;
            t.c_cc[libc::VTIME] = 0;
            libc::tcsetattr(tty.as_raw_fd(), libc::TCSANOW, &t);
        }
    }
    let c = consoles.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("keys {dev}"))
        .spawn(move || {
            let consoles = c;
            let mut key = [0u8; 1];
            while let Ok(1) = tty.read(&mut key) {
                if key[0].to_ascii_lowercase() != REARM_KEY {
                    continue;
                }
                match boot_once.rearm() {
                    Ok(true) => consoles.line(
                        "boot-once: re-armed: the node installs Talos again on its next PXE boot",
                    ),
                    Ok(false) => consoles.line("boot-once: not armed yet; nothing to re-arm"),
                    Err(e) => consoles.line(&format!("boot-once: re-arm failed: {e:#}")),
                }
            }
        });
    if let Err(e) = spawned {
        consoles.line(&format!("keys: not watching {dev}: {e}"));
    }
}
