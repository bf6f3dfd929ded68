//! Network namespaces for the `net_*` tests. Each test makes its own, with a unique name,
//! and removes them again (killing what it started inside) even when it panics. Traffic
//! stays inside these namespaces.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Run a command, panic with its output when it fails, return stdout.
pub fn run(cmd: &mut Command) -> String {
    crate::common::run_stdout(cmd)
}

pub struct Netns {
    pub name: String,
    children: Mutex<Vec<Child>>,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!(
            "mka-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns {
            name,
            children: Mutex::new(Vec::new()),
        };
        ns.ip("link set lo up");
        ns
    }

    /// `ip -n NAME <args>` (whitespace-separated), stdout.
    pub fn ip(&self, args: &str) -> String {
        run(Command::new("ip")
            .args(["-n", &self.name])
            .args(args.split_whitespace()))
    }

    /// `ip -j -n NAME <args>` parsed as JSON.
    pub fn ip_json(&self, args: &str) -> serde_json::Value {
        let out = run(Command::new("ip")
            .args(["-j", "-n", &self.name])
            .args(args.split_whitespace()));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j {args}: {e}: {out}"))
    }

    pub fn cmd(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(argv);
        c
    }

    /// Run a program inside the namespace and return its output (any exit status).
    pub fn output(&self, argv: &[&str]) -> Output {
        self.cmd(argv)
            .output()
            .unwrap_or_else(|e| panic!("running {argv:?} in {}: {e}", self.name))
    }

    /// Start a program inside the namespace; it is killed when the namespace is dropped.
    pub fn spawn(&self, argv: &[&str]) {
        let child = self
            .cmd(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {argv:?} in {}: {e}", self.name));
        self.children.lock().unwrap().push(child);
    }

    /// Run `f` on a thread that has entered this namespace (threads it starts stay there).
    pub fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            let h = s.spawn(move || {
                let ns = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
                // SAFETY: setns on this thread only, with a valid netns fd.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            });
            match h.join() {
                Ok(r) => r,
                Err(p) => std::panic::resume_unwind(p),
            }
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for mut c in self
            .children
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A veth cable between two namespaces, with fixed names and MACs.
pub fn veth(a: &Netns, a_if: &str, a_mac: &str, b: &Netns, b_if: &str, b_mac: &str) {
    run(Command::new("ip").args([
        "link", "add", a_if, "address", a_mac, "netns", &a.name, "type", "veth", "peer", "name",
        b_if, "address", b_mac, "netns", &b.name,
    ]));
}

/// Poll `f` until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Start dnsmasq in `ns` with these extra arguments; it logs to `log` and stays in the
/// foreground so the namespace's drop kills it.
pub fn dnsmasq(ns: &Netns, dir: &std::path::Path, extra: &[&str]) -> std::path::PathBuf {
    let log = dir.join(format!("dnsmasq-{}.log", ns.name));
    let leases = dir.join(format!("dnsmasq-{}.leases", ns.name));
    let mut argv = vec![
        "dnsmasq".to_string(),
        "--keep-in-foreground".into(),
        "--conf-file=/dev/null".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--user=root".into(),
        "--pid-file".into(),
        format!("--log-facility={}", log.display()),
        format!("--dhcp-leasefile={}", leases.display()),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
    ns.spawn(&refs);
    log
}

/// An appliance config for the network tests: the default build's (PXE 10.10.10.2/24,
/// node 10.10.10.100) with the NICs pinned as given and a one-hour lease.
pub fn appliance_config(
    internal_mac: Option<&str>,
    uplink_mac: Option<&str>,
) -> mkappliance::config::ApplianceConfig {
    let mut cfg = crate::common::sample_config();
    cfg.bootstrap_version = "test".into();
    cfg.network.lease_secs = 3600;
    cfg.network.internal_mac = internal_mac.map(|m| m.parse().unwrap());
    cfg.network.uplink_mac = uplink_mac.map(|m| m.parse().unwrap());
    cfg.talos_kernel_args = String::new();
    cfg.boot_files.ipxe_bios = None;
    cfg
}

/// The IPv4 addresses `ip -j addr show dev IF` lists: (local, prefixlen, valid_life_time).
pub fn ipv4_addrs(ns: &Netns, ifname: &str) -> Vec<(String, u64, Option<u64>)> {
    let v = ns.ip_json(&format!("addr show dev {ifname}"));
    v[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["family"] == "inet")
        .map(|a| {
            (
                a["local"].as_str().unwrap().to_string(),
                a["prefixlen"].as_u64().unwrap(),
                a["valid_life_time"].as_u64(),
            )
        })
        .collect()
}

/// A tiny HTTP server on a thread inside a namespace that records who connected.
pub struct HttpProbe {
    pub peers: std::sync::Arc<Mutex<Vec<std::net::IpAddr>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl HttpProbe {
    pub fn start(ns: &Netns, addr: &str, body: &'static str) -> HttpProbe {
        use std::io::{Read, Write};
        let peers = std::sync::Arc::new(Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, s) = (peers.clone(), stop.clone());
        let listener = ns.enter(|| std::net::TcpListener::bind(addr).unwrap());
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((mut conn, peer)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                p.lock().unwrap().push(peer.ip());
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(
                    conn,
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        HttpProbe { peers, stop }
    }
}

impl Drop for HttpProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
