//! A network lab for the `serve` tests: network namespaces joined by veth pairs (or a
//! bridge), `mkappliance serve` and real peers (dnsmasq, udhcpc, curl, atftp) run inside
//! them. Traffic never leaves the namespaces a test creates. Everything is torn down on
//! drop, panics included: processes first (declare them after their namespaces), then
//! the namespaces, which takes their interfaces with them.
//!
//! Include with `#[path = "serve_lab/mod.rs"] mod lab;` (it uses `common` and `fixture`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const PINNED_MAC: &str = "00:11:22:33:44:55";
pub const APPLIANCE_IP: &str = "10.10.10.2";
pub const NODE_IP: &str = "10.10.10.100";
/// The server side's interface name in every lab.
pub const SERVER_IF: &str = "pxe0";
pub const CLIENT_IF: &str = "eth0";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A unique short tag per call: namespace names must not clash between tests that run
/// at the same time (threads here, other test binaries, other checkouts).
pub fn tag() -> String {
    format!(
        "mka{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

pub fn run(cmd: &mut Command) -> String {
    crate::common::run_stdout(cmd)
}

/// A network namespace, deleted on drop.
pub struct Ns {
    pub name: String,
}

impl Ns {
    pub fn new(role: &str) -> Ns {
        let name = format!("{}{role}", tag());
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Ns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ARGS…`
    pub fn ip(&self, args: &[&str]) -> String {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command run inside the namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Run `f` on a thread that has joined this namespace (sockets it opens live there).
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let fd = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            // SAFETY: setns on this thread only, with a valid netns fd.
            let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in the namespace panicked")
    }

    pub fn add_addr(&self, iface: &str, cidr: &str) {
        self.ip(&["addr", "add", cidr, "dev", iface]);
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A veth pair: `a_if` in `a`, `b_if` in `b`, both up.
pub fn veth(a: &Ns, a_if: &str, b: &Ns, b_if: &str) {
    run(Command::new("ip").args([
        "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ]));
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

/// A switch: a bridge in its own namespace; `attach` plugs a namespace into it.
pub struct Switch {
    pub ns: Ns,
    ports: AtomicUsize,
}

impl Switch {
    pub fn new() -> Switch {
        let ns = Ns::new("sw");
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.ip(&["link", "set", "br0", "up"]);
        Switch {
            ns,
            ports: AtomicUsize::new(0),
        }
    }

    pub fn attach(&self, other: &Ns, iface: &str) {
        let port = format!("p{}", self.ports.fetch_add(1, Ordering::SeqCst));
        veth(&self.ns, &port, other, iface);
        self.ns.ip(&["link", "set", &port, "master", "br0"]);
    }
}

/// A background process whose stdout+stderr go to a file; killed on drop.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Proc {
        let out = File::create(log).expect("creating the process log");
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({cmd:?}): {e}"));
        Proc {
            name: name.into(),
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process's threads named `name` (`/proc/<pid>/task/*/comm`).
    pub fn threads_named(&self, name: &str) -> usize {
        let pid = self.child.as_ref().expect("running").id();
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("reading the process's threads")
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|comm| comm.trim_end() == name)
            .count()
    }

    /// Wait until the output contains `needle`; panics with the output after `timeout`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) {
        let end = Instant::now() + timeout;
        loop {
            if self.output().contains(needle) {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{} exited ({status}) before printing {needle:?}:\n{}",
                    self.name,
                    self.output()
                );
            }
            assert!(
                Instant::now() < end,
                "{} did not print {needle:?} within {timeout:?}:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// SIGTERM, then SIGKILL after 5 s; returns whether it exited successfully.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `mkappliance serve` in `ns` on [`SERVER_IF`]; `source` is `--image X` or `--root X`.
/// Waits until it is serving; with `dhcp` also until the rogue-DHCP guard cleared.
pub fn serve(
    ns: &Ns,
    dir: &Path,
    name: &str,
    source: &[&Path],
    extra: &[&str],
    dhcp: bool,
) -> Proc {
    let mut cmd = ns.cmd(crate::common::bin());
    cmd.arg("serve")
        .args(source)
        .args(["--interface", SERVER_IF])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--log-dir")
        .arg(dir.join("log"))
        .args(extra);
    let mut p = Proc::spawn(name, cmd, &dir.join(format!("{name}.log")));
    p.wait_for(" ready ", Duration::from_secs(20));
    if dhcp {
        p.wait_for("dhcp-guard-clear", Duration::from_secs(10));
    }
    p
}

/// [`serve`] straight from a built image, the way most tests run it.
pub fn serve_image(ns: &Ns, dir: &Path, image: &Path, dhcp: bool) -> Proc {
    serve(ns, dir, "serve", &image_args(image), &[], dhcp)
}

/// `--image PATH` as arguments for [`serve`].
pub fn image_args(image: &Path) -> [&Path; 2] {
    [Path::new("--image"), image]
}

/// A built appliance image (fixture ISO, example config) in `dir`, plus `extra` build args.
pub fn build_image(dir: &Path, extra: &[&str]) -> PathBuf {
    let iso = crate::fixture::talos_iso("default");
    let out = dir.join("out");
    crate::common::run_ok(&mut crate::common::build_cmd(&iso, &out, extra));
    out.join("bootstrap-pxe.raw")
}

/// A file from the image's rootfs, read by the real `debugfs`.
pub fn image_file(image: &Path, path: &str) -> Vec<u8> {
    let (offset, _, _, _) = crate::common::sgdisk_partition(image, 2);
    crate::common::debugfs_cat(image, offset, path)
}

/// Server and one client on a veth pair: server `pxe0` (no address: serve adds it),
/// client `eth0` with `client_mac` and, when given, an address.
pub struct Pair {
    pub server: Ns,
    pub client: Ns,
}

impl Pair {
    pub fn new(client_mac: &str, client_cidr: Option<&str>) -> Pair {
        let server = Ns::new("s");
        let client = Ns::new("c");
        veth(&server, SERVER_IF, &client, CLIENT_IF);
        client.ip(&["link", "set", CLIENT_IF, "address", client_mac]);
        if let Some(c) = client_cidr {
            client.add_addr(CLIENT_IF, c);
        }
        Pair { server, client }
    }
}

/// Run busybox udhcpc once in `ns`; the variables it hands its script on `bound`, or
/// `None` when it got no lease.
pub fn udhcpc(ns: &Ns, dir: &Path, iface: &str, args: &[&str]) -> Option<HashMap<String, String>> {
    let t = tag();
    let out = dir.join(format!("udhcpc-{t}.env"));
    let script = dir.join(format!("udhcpc-{t}.sh"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$1\" = bound ] && env > '{}'\nexit 0\n",
            out.display()
        ),
    )
    .unwrap();
    run(Command::new("chmod").arg("+x").arg(&script));
    let status = ns
        .cmd("busybox")
        .args([
            "udhcpc", "-i", iface, "-f", "-q", "-n", "-t", "3", "-T", "1", "-s",
        ])
        .arg(&script)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("running udhcpc");
    if !status.success() {
        return None;
    }
    let text = std::fs::read_to_string(&out).ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// curl in `ns`; returns (exit code, body bytes, `-w` output).
pub fn curl(ns: &Ns, args: &[&str]) -> (i32, Vec<u8>, String) {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body");
    let out = ns
        .cmd("curl")
        .args(["-s", "--max-time", "60", "-o"])
        .arg(&body)
        .args(["-w", "%{http_code} %{size_download}"])
        .args(args)
        .output()
        .expect("running curl");
    (
        out.status.code().unwrap_or(-1),
        std::fs::read(&body).unwrap_or_default(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Lines of the serve log for one event kind.
pub fn events<'a>(log: &'a str, kind: &str) -> Vec<&'a str> {
    let needle = format!(" {kind} ");
    log.lines().filter(|l| l.contains(&needle)).collect()
}
