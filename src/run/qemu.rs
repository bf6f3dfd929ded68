//! QEMU command lines for the two VMs, and the VM processes themselves.
//!
//! Both VMs are q35 machines with OVMF (a private copy of the variable store each), their
//! serial port written to a file. They share one private L2 link: a `dgram` netdev, one
//! UDP datagram per Ethernet frame between two loopback ports, so no root, bridge or tap is
//! needed.

use std::fs::{File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::ValueEnum;

use crate::config::Mac;

pub const QEMU: &str = "qemu-system-x86_64";
/// Debian's `ovmf` package (4 MiB flash layout).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// How to get QEMU and OVMF on Debian and Ubuntu.
pub const INSTALL_HINT: &str = "apt-get install qemu-system-x86 ovmf";
const KVM_DEVICE: &str = "/dev/kvm";
/// The appliance needs little: the Talos kernel, our init and the served files in RAM.
pub const APPLIANCE_MEMORY_MIB: u32 = 512;
/// What QEMU prints when KVM cannot run a firmware guest (nested virtualisation often
/// lacks what OVMF's first instructions need): the cue to fall back to TCG.
const KVM_FAILURES: &[&str] = &[
    "KVM internal error",
    "failed to initialize kvm",
    "Could not access KVM kernel module",
];
/// How long a VM gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);
const WAIT_POLL: Duration = Duration::from_millis(20);

/// `--accel`: how the VMs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Accel {
    /// KVM when /dev/kvm is usable, else TCG; falls back to TCG when KVM fails the firmware
    Auto,
    /// Hardware virtualisation (fast; needs read-write /dev/kvm)
    Kvm,
    /// QEMU's emulator (slow, works everywhere)
    Tcg,
}

/// The accelerator a VM actually runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Kvm,
    Tcg,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Kvm => "kvm",
            Engine::Tcg => "tcg",
        }
    }
}

/// `--client-disk-bus`: how the client's disk appears to its OS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DiskBus {
    /// NVMe: /dev/nvme0n1, the install disk of a typical mini-PC config
    Nvme,
    /// virtio-blk: /dev/vda
    Virtio,
    /// SATA on the q35 AHCI controller: /dev/sda
    Sata,
}

/// True when /dev/kvm opens read-write (KVM may still fail a guest; see [`kvm_failed`]).
pub fn kvm_usable() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(KVM_DEVICE)
        .is_ok()
}

/// Whether QEMU's stderr says KVM could not run the guest.
pub fn kvm_failed(stderr: &str) -> bool {
    KVM_FAILURES.iter().any(|m| stderr.contains(m))
}

/// The executable `name` on PATH.
pub fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// A path as a QEMU option value: UTF-8, with commas doubled (QEMU's escape).
pub fn opt_path(p: &Path) -> Result<String> {
    let s = p.to_str().with_context(|| {
        format!(
            "{} is not a UTF-8 path, which QEMU options need",
            p.display()
        )
    })?;
    Ok(s.replace(',', ",,"))
}

/// Everything one VM's command line is made of.
pub struct VmSpec {
    /// `appliance` or `client`: the QEMU `-name` is `mkappliance-<name>`.
    pub name: &'static str,
    pub engine: Engine,
    pub memory_mib: u32,
    pub ovmf_code: PathBuf,
    /// This VM's own copy of the OVMF variable store.
    pub vars: PathBuf,
    pub serial_log: PathBuf,
    pub gui: bool,
    /// A CPU model with every feature the accelerator offers (Talos needs x86-64-v2,
    /// which QEMU's default model lacks).
    pub full_cpu: bool,
    /// Disks and NICs.
    pub devices: Vec<String>,
}

/// The QEMU arguments of a VM.
pub fn command_line(spec: &VmSpec) -> Result<Vec<String>> {
    let mut a: Vec<String> = vec![
        "-name".into(),
        format!("mkappliance-{}", spec.name),
        "-machine".into(),
        "q35".into(),
        "-accel".into(),
        spec.engine.name().into(),
        "-m".into(),
        spec.memory_mib.to_string(),
    ];
    match (spec.engine, spec.full_cpu) {
        (Engine::Kvm, _) => a.extend(["-cpu".into(), "host".into()]),
        (Engine::Tcg, true) => a.extend(["-cpu".into(), "max".into()]),
        (Engine::Tcg, false) => {}
    }
    if !spec.gui {
        a.extend(["-display".into(), "none".into()]);
    }
    a.extend([
        "-drive".into(),
        format!(
            "if=pflash,format=raw,readonly=on,file={}",
            opt_path(&spec.ovmf_code)?
        ),
        "-drive".into(),
        format!("if=pflash,format=raw,file={}", opt_path(&spec.vars)?),
        "-chardev".into(),
        format!("file,id=serial0,path={}", opt_path(&spec.serial_log)?),
        "-serial".into(),
        "chardev:serial0".into(),
        // No monitor on stdio: QEMU's stdin and stdout are not a terminal here.
        "-monitor".into(),
        "none".into(),
    ]);
    a.extend(spec.devices.iter().cloned());
    Ok(a)
}

/// The private L2 link between the two VMs: `-netdev dgram` between two loopback UDP ports.
/// Not `-netdev socket`: that is one TCP connection without `TCP_NODELAY`, so the 2nd to
/// 4th frame of each TFTP window waits ~40 ms for the peer's delayed ACK (OVMF asks for
/// windowsize 4; 6.5 s more for `ipxe.efi`, BENCHMARKS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub appliance_port: u16,
    pub client_port: u16,
}

impl Link {
    /// Two UDP ports on loopback that nobody uses right now.
    pub fn free() -> Result<Link> {
        let bind = || {
            std::net::UdpSocket::bind("127.0.0.1:0")
                .context("finding a free loopback UDP port for the VMs' private link")
        };
        // Both held at once, so they differ.
        let (a, c) = (bind()?, bind()?);
        Ok(Link {
            appliance_port: a.local_addr()?.port(),
            client_port: c.local_addr()?.port(),
        })
    }

    /// The `-netdev` of the appliance's PXE NIC.
    pub fn appliance_netdev(&self) -> String {
        dgram(self.appliance_port, self.client_port)
    }

    /// The `-netdev` of the client's NIC.
    pub fn client_netdev(&self) -> String {
        dgram(self.client_port, self.appliance_port)
    }
}

fn dgram(local: u16, remote: u16) -> String {
    format!(
        "dgram,id=pxe,local.type=inet,local.host=127.0.0.1,local.port={local},remote.type=inet,remote.host=127.0.0.1,remote.port={remote}"
    )
}

/// The appliance's disk and NICs. The image is opened with `snapshot=on`: every write
/// goes to a throwaway overlay, never to the image. The PXE NIC comes first on the bus:
/// an image without pinned MACs takes its first NIC for PXE and the other as uplink.
pub fn appliance_devices(
    image: &Path,
    link: Link,
    pxe_mac: Mac,
    uplink_mac: Mac,
    offline: bool,
) -> Result<Vec<String>> {
    let restrict = if offline { ",restrict=on" } else { "" };
    Ok(vec![
        "-drive".into(),
        format!("file={},if=virtio,format=raw,snapshot=on", opt_path(image)?),
        "-netdev".into(),
        link.appliance_netdev(),
        "-device".into(),
        format!("virtio-net-pci,netdev=pxe,mac={pxe_mac},romfile="),
        "-netdev".into(),
        format!("user,id=uplink{restrict}"),
        "-device".into(),
        format!("virtio-net-pci,netdev=uplink,mac={uplink_mac},romfile="),
    ])
}

/// The client's NIC and disk. An empty `romfile=` keeps QEMU's iPXE option ROM off the
/// NIC, so OVMF's own PXE does DHCP and TFTP like a real machine's firmware. The NIC
/// boots first and the disk second: once Talos is installed, boot-once's exit script
/// falls through from the NIC to the disk.
pub fn client_devices(link: Link, mac: Mac, disk: &Path, bus: DiskBus) -> Result<Vec<String>> {
    let disk_device = match bus {
        DiskBus::Nvme => "nvme,drive=disk,serial=mkappliance-client,bootindex=2",
        DiskBus::Virtio => "virtio-blk-pci,drive=disk,bootindex=2",
        DiskBus::Sata => "ide-hd,drive=disk,bus=ide.0,bootindex=2",
    };
    Ok(vec![
        "-netdev".into(),
        link.client_netdev(),
        "-device".into(),
        format!("virtio-net-pci,netdev=pxe,mac={mac},romfile=,bootindex=1"),
        "-drive".into(),
        format!("file={},if=none,id=disk,format=raw", opt_path(disk)?),
        "-device".into(),
        disk_device.into(),
    ])
}

/// A running QEMU. Stopped (and reaped) when dropped.
pub struct Vm {
    pub name: &'static str,
    child: Child,
    stderr: PathBuf,
    status: Option<ExitStatus>,
}

impl Vm {
    /// Start QEMU with `args`; its stderr goes to `stderr` (read back for errors).
    pub fn spawn(qemu: &Path, name: &'static str, args: &[String], stderr: &Path) -> Result<Vm> {
        let err = File::create(stderr).with_context(|| format!("creating {}", stderr.display()))?;
        let mut cmd = Command::new(qemu);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            // Its own process group: Ctrl-C reaches only us, and we stop the VMs in order.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                // Should we die without cleaning up (SIGKILL), the VM goes with us.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} for the {name} VM", qemu.display()))?;
        Ok(Vm {
            name,
            child,
            stderr: stderr.to_path_buf(),
            status: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status once QEMU has exited.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for the {} VM", self.name))?;
        }
        Ok(self.status)
    }

    /// What QEMU wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read(&self.stderr)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// QEMU's last stderr line, for error messages.
    pub fn stderr_last_line(&self) -> Option<String> {
        self.stderr_text()
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_string())
    }

    /// SIGTERM (QEMU exits at once), then SIGKILL if it has not after [`STOP_GRACE`].
    pub fn stop(&mut self) {
        if self.status.is_some() {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: signalling our own child, which has not been reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.status = Some(s);
                return;
            }
            std::thread::sleep(WAIT_POLL);
        }
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINK: Link = Link {
        appliance_port: 4000,
        client_port: 4001,
    };

    fn mac(s: &str) -> Mac {
        s.parse().unwrap()
    }

    #[test]
    fn the_image_is_never_written() {
        let d = appliance_devices(
            Path::new("/img/a,b.raw"),
            LINK,
            mac("52:54:00:00:00:01"),
            mac("52:54:00:00:00:02"),
            false,
        )
        .unwrap();
        assert_eq!(d[1], "file=/img/a,,b.raw,if=virtio,format=raw,snapshot=on");
    }

    #[test]
    fn pxe_nic_first_and_offline_restricts_the_uplink() {
        let d = appliance_devices(
            Path::new("/i.raw"),
            LINK,
            mac("52:54:00:00:00:01"),
            mac("52:54:00:00:00:02"),
            true,
        )
        .unwrap();
        let devices: Vec<&String> = d
            .iter()
            .filter(|s| s.starts_with("virtio-net-pci"))
            .collect();
        assert_eq!(
            devices,
            [
                "virtio-net-pci,netdev=pxe,mac=52:54:00:00:00:01,romfile=",
                "virtio-net-pci,netdev=uplink,mac=52:54:00:00:00:02,romfile="
            ]
        );
        assert!(d.contains(&"dgram,id=pxe,local.type=inet,local.host=127.0.0.1,local.port=4000,remote.type=inet,remote.host=127.0.0.1,remote.port=4001".to_string()));
        assert!(d.contains(&"user,id=uplink,restrict=on".to_string()));
    }

    #[test]
    fn client_boots_nic_then_disk() {
        let d = client_devices(
            LINK,
            mac("00:11:22:33:44:55"),
            Path::new("/d.raw"),
            DiskBus::Nvme,
        )
        .unwrap();
        assert_eq!(
            d[3],
            "virtio-net-pci,netdev=pxe,mac=00:11:22:33:44:55,romfile=,bootindex=1"
        );
        assert!(d[7].starts_with("nvme,drive=disk") && d[7].ends_with("bootindex=2"));
        assert_eq!(d[1], "dgram,id=pxe,local.type=inet,local.host=127.0.0.1,local.port=4001,remote.type=inet,remote.host=127.0.0.1,remote.port=4000");
    }

    #[test]
    fn command_line_by_engine() {
        let spec = |engine, full_cpu, gui| VmSpec {
            name: "client",
            engine,
            memory_mib: 2048,
            ovmf_code: "/c.fd".into(),
            vars: "/run/v.fd".into(),
            serial_log: "/run/s.log".into(),
            gui,
            full_cpu,
            devices: vec!["-x".into()],
        };
        let kvm = command_line(&spec(Engine::Kvm, false, false)).unwrap();
        let joined = kvm.join(" ");
        assert!(joined.contains("-accel kvm -m 2048 -cpu host -display none"));
        assert!(joined.contains("-chardev file,id=serial0,path=/run/s.log -serial chardev:serial0"));
        assert!(joined.ends_with("-x"));
        let tcg = command_line(&spec(Engine::Tcg, true, true))
            .unwrap()
            .join(" ");
        assert!(tcg.contains("-accel tcg -m 2048 -cpu max -drive"), "{tcg}");
        let plain = command_line(&spec(Engine::Tcg, false, false)).unwrap();
        assert!(!plain.contains(&"-cpu".to_string()));
    }

    #[test]
    fn kvm_failures_are_recognised() {
        assert!(kvm_failed("warning: x\nKVM internal error. Suberror: 1\n"));
        assert!(!kvm_failed(
            "qemu-system-x86_64: terminating on signal 15\n"
        ));
    }
}
