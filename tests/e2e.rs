//! End to end: the image `mkappliance build` writes boots in QEMU (TCG, q35, OVMF) and
//! PXE-boots a client through the whole chain, with neither libvirt nor root.
//!
//! The appliance VM has its PXE NIC on a private L2 link (`-netdev dgram` between two
//! loopback UDP ports, as `mkappliance run` uses; see `run::Link` for why not a socket) and its
//! uplink on QEMU user networking with `restrict=on` (nothing leaves the machine) and a
//! `guestfwd` from 10.0.2.100:80 to a tiny HTTP server this test runs on loopback, standing
//! in for the internet. The client VM has no disk and one NIC on the link with the pinned
//! MAC and an empty `romfile=`, so OVMF does real PXE: DHCP → TFTP `ipxe.efi` → iPXE →
//! `/boot.ipxe` → kernel + initramfs over HTTP → the fixture ISO's client init, which
//! takes a lease, fetches `talos.config=` and `fixture.probe=` and prints what it got.
//! The machine config is SOPS-encrypted by the real `sops` with a key from `age-keygen`.
//!
//! Deliberately broken images (a wrong pinned MAC, no `ipxe.efi`, no config, a config
//! that is not the one sops decrypts) must fail at their stage, judged from what the
//! consoles say rather than by a timeout.
//!
//! Knobs: `IT_TALOS_VERSION` (the fixture ISO claims that release), `IT_BOOTSTRAP_IP`
//! (the appliance's address on the PXE link, a /24), `IT_MINIPC_MAC`, `IT_CLIENT_MAC` (the
//! MAC the client boots with), `IT_MINIPC_IP`, `IT_TIMEOUT_S` (per stage), `IT_KEEP` (keep
//! the run directory), `IT_KEEP_ON_FAIL` (keep it when the test fails), `IT_GUI` (show the
//! VMs' displays), `IT_BOOTSTRAP_DISK` (boot this image instead of building one; its own
//! config says which MAC and addresses to expect). With `IT_TALOS_ISO` and `IT_TALOSCTL`
//! (a real Talos ISO and a matching talosctl) the client is real Talos instead of the
//! fixture: it installs to a disk through the appliance's NAT (so the uplink is not
//! restricted then), reboots, gets boot-once's exit script, boots from its disk, and the
//! test waits for the Talos API on :50000 and runs `talosctl bootstrap` and
//! `talosctl health`. That path needs the internet and KVM-class speed; it has never run
//! on the machines this project is built on.

mod common;
#[path = "common/fixture.rs"]
mod fixture;
#[path = "e2e/image.rs"]
mod image;
#[path = "e2e/rig.rs"]
mod rig;

use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mkappliance::run::Link;
use sha2::{Digest, Sha256};

use image::{
    edit_rootfs, external_image, file_name, parent, prepare, real_talos_knobs, rootfs_has,
    RealTalos, Setup,
};

use common::free_port;
use rig::{env_or, serve_probe, Failure, Fatal, Rig, RunDir, Side, Vm, VmSpec};

/// The appliance's own NICs, pinned at build time so QEMU's device order does not matter.
const PXE_NIC_MAC: &str = "52:54:00:aa:00:01";
const UPLINK_MAC: &str = "52:54:00:aa:00:02";
const MINIPC_MAC: &str = "52:54:00:00:00:55";
/// A client the appliance must not answer.
const STRANGER_MAC: &str = "52:54:00:00:00:66";
const MINIPC_IP: &str = "10.10.10.100";
/// The appliance's address on the PXE link (the build's default).
const BOOTSTRAP_IP: &str = "10.10.10.2";
/// Where QEMU's user network forwards to our loopback server.
const PROBE_URL: &str = "http://10.0.2.100/probe";
const STAGE_TIMEOUT_S: u64 = 180;
const TALOS_API_PORT: u16 = 50000;
/// Paths in the rootfs that the broken-image tests take away.
const ROOTFS_IPXE: &str = "/srv/tftp/ipxe.efi";
const ROOTFS_CONFIG: &str = "/srv/http/configs/minipc.yaml";

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Appliance VM arguments: the image, the uplink and the PXE link.
fn appliance_spec(s: &Setup, probe_port: u16, link: Link) -> VmSpec {
    // A real Talos install pulls its installer image through the NAT: only then may the
    // uplink reach beyond this machine.
    let restrict = if s.real_talos.is_some() { "off" } else { "on" };
    let uplink = vec![
        "-netdev".into(),
        format!(
            "user,id=up,restrict={restrict},guestfwd=tcp:10.0.2.100:80-tcp:127.0.0.1:{probe_port}"
        ),
        "-device".into(),
        match &s.uplink_mac {
            Some(mac) => format!("virtio-net-pci,netdev=up,mac={mac},romfile="),
            None => "virtio-net-pci,netdev=up,romfile=".into(),
        },
    ];
    let pxe = vec![
        "-netdev".into(),
        link.appliance_netdev(),
        "-device".into(),
        match &s.pxe_nic_mac {
            Some(mac) => format!("virtio-net-pci,netdev=pxe,mac={mac},romfile="),
            None => "virtio-net-pci,netdev=pxe,romfile=".into(),
        },
    ];
    let mut args = vec![
        "-drive".into(),
        // snapshot: an IT_BOOTSTRAP_DISK is someone's image, and the appliance writes its
        // boot-once state to its rootfs.
        format!(
            "file={},if=virtio,format=raw,snapshot=on",
            s.image.display()
        ),
    ];
    // Pinned MACs must win over PCI order, so put the uplink first; an image without pins
    // takes the first NIC for PXE.
    if s.pxe_nic_mac.is_some() {
        args.extend(uplink);
        args.extend(pxe);
    } else {
        args.extend(pxe);
        args.extend(uplink);
    }
    VmSpec::new(args)
}

/// A PXE client on the link with `mac`. A real Talos client also gets a disk to install
/// to (booted after the NIC) and a NIC that forwards 127.0.0.1:`api_port` to its API.
fn client_spec(dir: &Path, name: &str, mac: &str, link: Link, api_port: Option<u16>) -> VmSpec {
    let mut args = vec![
        "-netdev".into(),
        link.client_netdev(),
        "-device".into(),
        format!("virtio-net-pci,netdev=pxe,mac={mac},romfile=,bootindex=1"),
    ];
    let Some(port) = api_port else {
        return VmSpec::new(args);
    };
    let disk = dir.join(format!("{name}-disk.raw"));
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(10 << 30)
        .unwrap();
    args.extend([
        "-drive".into(),
        format!("file={},if=none,id=disk,format=raw", disk.display()),
        "-device".into(),
        "virtio-blk-pci,drive=disk,bootindex=2".into(),
        "-netdev".into(),
        format!("user,id=api,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:{TALOS_API_PORT}"),
        "-device".into(),
        "virtio-net-pci,netdev=api,romfile=".into(),
    ]);
    VmSpec {
        memory_mib: 2048,
        cpus: 2,
        reboot: true,
        ..VmSpec::new(args)
    }
}

/// Seconds the chain took, for BENCHMARKS.md.
struct Timings {
    appliance_ready_s: f64,
    uptime_ms: String,
    client_kernel_s: f64,
    config_s: f64,
}

/// Boot the appliance and one client through the whole chain; then (unless `first_boot_only`)
/// the second boot and a stranger.
fn run_chain(dir: &Path, s: &Setup, first_boot_only: bool) -> Result<Timings, Failure> {
    let started = Instant::now();
    let timeout = Duration::from_secs(
        env_or("IT_TIMEOUT_S", &STAGE_TIMEOUT_S.to_string())
            .parse()
            .expect("IT_TIMEOUT_S is a number of seconds"),
    );
    let probe_body = format!(
        "probe-{}-{}",
        std::process::id(),
        started.elapsed().as_nanos()
    );
    let (probe_port, probe_requests) = serve_probe(probe_body.clone());
    let link = Link::free().unwrap();
    let api_port = s.real_talos.as_ref().map(|_| free_port());
    let mut rig = Rig::new(dir, timeout, started);
    rig.appliance = Some(Vm::start(
        dir,
        "appliance",
        appliance_spec(s, probe_port, link),
    ));
    use Side::{Appliance as A, Client as C};
    let mac = s.minipc_mac.as_str();
    let client = s.client_mac.as_str();

    let ready = rig.expect(
        A,
        "appliance ready",
        &[mkappliance::layout::READY_MARKER],
        &[Fatal {
            needles: &["MKAPPLIANCE-ERROR"],
            why: "the appliance reports an error",
        }],
    )?;
    let appliance_ready_s = started.elapsed().as_secs_f64();
    let field = |name: &str| {
        ready
            .split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .map(str::to_string)
    };
    for fact in [
        format!("node={mac}"),
        format!("ip={}/24", s.appliance_ip),
        "services=dhcp,tftp,http,dns".to_string(),
        "uplink=".to_string(),
    ] {
        if !ready.contains(&fact) {
            return Err(rig.fail("appliance ready", &format!("no {fact} in {ready}")));
        }
    }
    let uptime_ms = field("uptime_ms=").unwrap_or_else(|| "?".into());
    if field("pxe=").is_none() {
        return Err(rig.fail("appliance ready", "no pxe= on the ready line"));
    }

    // First boot: the whole chain.
    let client_start = Instant::now();
    rig.start_client(
        "client1",
        client_spec(dir, "client1", client, link, api_port),
    );
    rig.expect(
        A,
        "DHCP offer to the pinned MAC",
        &["dhcp-offer", mac, "boot=ipxe.efi"],
        &[Fatal {
            needles: &["dhcp-ignored", client],
            why: "the appliance ignored the client",
        }],
    )?;
    rig.expect(
        A,
        "DHCP ack to the pinned MAC",
        &["dhcp-ack", mac, "boot=ipxe.efi"],
        &[],
    )?;
    rig.expect(
        C,
        "firmware lease",
        &["Station IP address is", &s.minipc_ip],
        &[],
    )?;
    rig.expect(
        A,
        "TFTP ipxe.efi",
        &["tftp-sent", mac, "file=ipxe.efi"],
        &[
            Fatal {
                needles: &["tftp-refused", "ipxe.efi"],
                why: "the appliance refused the TFTP request",
            },
            Fatal {
                needles: &["tftp-failed", "ipxe.efi"],
                why: "the TFTP transfer failed",
            },
        ],
    )?;
    rig.expect(C, "iPXE starts", &["iPXE"], &[])?;
    let boot_ipxe = format!("http://{}/boot.ipxe", s.appliance_ip);
    rig.expect(
        A,
        "iPXE's DHCP",
        &["dhcp-ack", mac, &boot_ipxe, "client=iPXE"],
        &[],
    )?;
    rig.expect(
        A,
        "HTTP /boot.ipxe",
        &["http", mac, "path=/boot.ipxe", "status=200"],
        &[],
    )?;
    let talos = s.talos.as_str();
    let kernel_path = format!("path=/talos/{talos}/vmlinuz");
    let initrd_path = format!("path=/talos/{talos}/initramfs.xz");
    let not_served = Fatal {
        needles: &["http", mac, "status=4"],
        why: "the appliance refused a boot file",
    };
    rig.expect(
        A,
        "HTTP kernel",
        &["http", mac, &kernel_path, "status=200"],
        &[not_served],
    )?;
    rig.expect(
        A,
        "HTTP initramfs",
        &["http", mac, &initrd_path, "status=200"],
        &[not_served],
    )?;
    let config_url = format!("talos.config=http://{}/configs/minipc.yaml", s.appliance_ip);
    let kernel_line = if s.real_talos.is_some() {
        "Kernel command line:"
    } else {
        "FIXTURE-INIT"
    };
    let init = rig.expect(C, "client kernel starts", &[kernel_line, &config_url], &[])?;
    let client_kernel_s = client_start.elapsed().as_secs_f64();
    if s.probe && !init.contains(&format!("fixture.probe={PROBE_URL}")) {
        return Err(rig.fail(
            "client kernel starts",
            &format!("no fixture.probe= in {init}"),
        ));
    }

    let config_s;
    if let Some(real) = &s.real_talos {
        config_s = real_talos_stages(&mut rig, s, real, api_port.unwrap())?;
    } else {
        let lease = rig.expect(C, "client lease", &["FIXTURE-LEASE"], &[])?;
        for want in [
            format!("ip={}", s.minipc_ip),
            format!("router={}", s.appliance_ip),
            format!("dns={}", s.appliance_ip),
        ] {
            if !lease.split_whitespace().any(|w| w == want) {
                return Err(rig.fail("client lease", &format!("no {want} in {lease}")));
            }
        }
        let digest = rig.expect(C, "config fetched", &["FIXTURE-CONFIG-SHA256"], &[])?;
        if !digest.ends_with(&s.config_sha) {
            return Err(rig.fail(
                "config fetched",
                &format!(
                    "the served config is not what sops decrypts ({}): {digest}",
                    s.config_sha
                ),
            ));
        }
        config_s = client_start.elapsed().as_secs_f64();
        rig.expect(
            A,
            "appliance saw the config fetch",
            &["config-fetched", mac],
            &[],
        )?;
        rig.expect(A, "boot-once armed", &["boot-once-armed", mac], &[])?;
        if s.probe {
            let probe = rig.expect(C, "probe through the NAT", &["FIXTURE-PROBE"], &[])?;
            let seen = probe_requests.lock().unwrap().clone();
            if !probe.ends_with(&format!("FIXTURE-PROBE {probe_body}")) {
                return Err(rig.fail(
                    "probe through the NAT",
                    &format!("expected {probe_body:?}; requests seen: {seen:?}"),
                ));
            }
            if !seen.iter().any(|r| r.starts_with("GET /probe ")) {
                return Err(rig.fail(
                    "probe through the NAT",
                    "the loopback server saw no GET /probe",
                ));
            }
        } else {
            eprintln!("the image's kernel arguments have no fixture.probe=: NAT probe skipped");
        }
        rig.expect(C, "client done", &["FIXTURE-DONE"], &[])?;
        rig.client_exits("client powers off")?;
    }
    let timings = Timings {
        appliance_ready_s,
        uptime_ms,
        client_kernel_s,
        config_s,
    };
    if first_boot_only {
        return Ok(timings);
    }

    if s.real_talos.is_none() {
        // Second boot of the pinned client: boot-once sends it to its disk.
        rig.start_client("client2", client_spec(dir, "client2", mac, link, None));
        second_boot_exits(&mut rig, s, "second boot")?;
        std::thread::sleep(Duration::from_secs(2));
        if rig.unread(A).contains(&kernel_path) {
            return Err(rig.fail(
                "second boot: exit script",
                "the pinned client fetched the kernel again",
            ));
        }
    }
    rig.stop_client();

    // A stranger on the link gets no answer, and the appliance says why.
    rig.start_client(
        "stranger",
        client_spec(dir, "stranger", STRANGER_MAC, link, None),
    );
    rig.expect(A, "stranger ignored", &["dhcp-ignored", STRANGER_MAC], &[])?;
    if rig
        .unread(A)
        .contains(&format!("dhcp-offer {STRANGER_MAC}"))
    {
        return Err(rig.fail(
            "stranger ignored",
            "the appliance offered the stranger an address",
        ));
    }
    rig.stop_client();
    eprintln!("[{:6.1} s] all stages passed", rig.elapsed_s());
    Ok(timings)
}

/// A PXE boot after the config was fetched: iPXE gets boot-once's exit script.
fn second_boot_exits(rig: &mut Rig, s: &Setup, what: &str) -> Result<(), Failure> {
    let mac = s.minipc_mac.as_str();
    rig.expect(
        Side::Appliance,
        &format!("{what}: TFTP ipxe.efi"),
        &["tftp-sent", mac, "file=ipxe.efi"],
        &[],
    )?;
    rig.expect(
        Side::Appliance,
        &format!("{what}: /boot.ipxe"),
        &["http", mac, "path=/boot.ipxe", "status=200"],
        &[],
    )?;
    rig.expect(
        Side::Client,
        &format!("{what}: exit script"),
        &["already installed Talos", &s.talos],
        &[],
    )?;
    Ok(())
}

/// Real Talos: the node fetches its config, installs, reboots through boot-once's exit
/// script to its disk, and its API comes up healthy. Returns seconds to config fetched.
fn real_talos_stages(
    rig: &mut Rig,
    s: &Setup,
    real: &RealTalos,
    api_port: u16,
) -> Result<f64, Failure> {
    let started = Instant::now();
    let mac = s.minipc_mac.as_str();
    rig.expect(
        Side::Appliance,
        "appliance saw the config fetch",
        &["config-fetched", mac],
        &[],
    )?;
    let config_s = started.elapsed().as_secs_f64();
    rig.expect(
        Side::Appliance,
        "boot-once armed",
        &["boot-once-armed", mac],
        &[],
    )?;
    second_boot_exits(rig, s, "after the install")?;

    let stage = "Talos API on :50000";
    let deadline = Instant::now() + rig.timeout;
    while TcpStream::connect(("127.0.0.1", api_port)).is_err() {
        if Instant::now() > deadline {
            return Err(rig.fail(stage, "nothing answers on the forwarded API port"));
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    eprintln!("[{:6.1} s] {stage}", rig.elapsed_s());
    let talosctl = |args: &[&str]| {
        Command::new(&real.talosctl)
            .arg("--talosconfig")
            .arg(&real.talosconfig)
            .args([
                "--endpoints",
                &format!("127.0.0.1:{api_port}"),
                "--nodes",
                &s.minipc_ip,
            ])
            .args(args)
            .output()
            .expect("running talosctl")
    };
    let deadline = Instant::now() + rig.timeout;
    loop {
        let out = talosctl(&["bootstrap"]);
        if out.status.success() {
            break;
        }
        if Instant::now() > deadline {
            let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(rig.fail("talosctl bootstrap", &why));
        }
        std::thread::sleep(Duration::from_secs(5));
    }
    let wait = format!("{}s", rig.timeout.as_secs());
    let out = talosctl(&["health", "--wait-timeout", &wait]);
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(rig.fail("talosctl health", &why));
    }
    eprintln!("[{:6.1} s] talosctl health: healthy", rig.elapsed_s());
    Ok(config_s)
}

#[test]
fn client_pxe_boots_through_the_appliance() {
    let run = RunDir::new();
    let started = Instant::now();
    if real_talos_knobs().is_none() {
        eprintln!(
            "real-Talos stages (Talos API on :50000, talosctl health) skipped: set IT_TALOS_ISO and IT_TALOSCTL to run them"
        );
    }
    let setup = prepare(run.path());
    eprintln!(
        "[{:6.1} s] image ready: {}",
        started.elapsed().as_secs_f64(),
        setup.image.display()
    );
    let t = run_chain(run.path(), &setup, false).unwrap_or_else(|f| panic!("{f}"));
    eprintln!(
        "e2e timings: appliance power-on to ready {:.1} s (kernel uptime {} ms); client power-on to kernel {:.1} s, to config fetched {:.1} s; whole test {:.1} s",
        t.appliance_ready_s,
        t.uptime_ms,
        t.client_kernel_s,
        t.config_s,
        started.elapsed().as_secs_f64()
    );
}

/// Build the fixture image, break it with `spoil`, and run it: it must fail at `stage` for
/// a reason containing `why`, and say which stage.
fn broken(stage: &str, why: &str, spoil: impl FnOnce(&mut Setup, &Path)) {
    if !fixture_only() {
        return;
    }
    let run = RunDir::new();
    let mut setup = prepare(run.path());
    spoil(&mut setup, run.path());
    match run_chain(run.path(), &setup, true) {
        Ok(_) => panic!("the broken image passed every stage; expected a failure at {stage:?}"),
        Err(f) => {
            eprintln!("failed as it should: stage {:?}: {}", f.stage, f.why);
            assert_eq!(f.stage, stage, "failed at the wrong stage:\n{f}");
            assert!(
                f.why.contains(why),
                "failed for the wrong reason (want {why:?}):\n{f}"
            );
            assert!(
                f.to_string().contains(stage),
                "the message does not name the stage: {f}"
            );
        }
    }
}

/// The broken-image tests build their own fixture image; knobs that swap the image or
/// the client out do not apply.
fn fixture_only() -> bool {
    let swapped = [
        "IT_BOOTSTRAP_DISK",
        "IT_TALOS_ISO",
        "IT_TALOSCTL",
        "IT_CLIENT_MAC",
    ]
    .iter()
    .any(|k| std::env::var_os(k).is_some());
    if swapped {
        eprintln!("skipped: this test runs only on the fixture image");
    }
    !swapped
}

#[test]
fn broken_image_wrong_pinned_mac_fails_at_dhcp() {
    broken(
        "DHCP offer to the pinned MAC",
        "dhcp-ignored 52:54:00:00:00:56",
        |setup, _| {
            // The image pins MINIPC_MAC; the machine on the link has another MAC.
            setup.client_mac = "52:54:00:00:00:56".into();
        },
    );
}

#[test]
fn broken_image_without_ipxe_efi_fails_at_tftp() {
    broken("TFTP ipxe.efi", "tftp-refused", |setup, _| {
        edit_rootfs(&setup.image, &format!("rm {ROOTFS_IPXE}\n"));
        assert!(
            !rootfs_has(&setup.image, ROOTFS_IPXE),
            "debugfs did not remove {ROOTFS_IPXE}"
        );
    });
}

#[test]
fn broken_image_without_config_fails_at_appliance_ready() {
    broken("appliance ready", "configs/minipc.yaml", |setup, _| {
        edit_rootfs(&setup.image, &format!("rm {ROOTFS_CONFIG}\n"));
        assert!(
            !rootfs_has(&setup.image, ROOTFS_CONFIG),
            "debugfs did not remove {ROOTFS_CONFIG}"
        );
    });
}

#[test]
fn broken_image_with_a_wrong_config_fails_at_config_fetched() {
    broken("config fetched", "not what sops decrypts", |setup, dir| {
        // Same path, other bytes: what sops decrypts is no longer what the appliance serves.
        let other = dir.join("other.yaml");
        std::fs::write(&other, "machine:\n  type: worker\n").unwrap();
        edit_rootfs(
            &setup.image,
            &format!(
                "rm {ROOTFS_CONFIG}\ncd {}\nwrite {} {}\n",
                parent(ROOTFS_CONFIG),
                other.display(),
                file_name(ROOTFS_CONFIG)
            ),
        );
        assert!(rootfs_has(&setup.image, ROOTFS_CONFIG));
    });
}

/// `IT_BOOTSTRAP_DISK` takes its expectations from the image (`inspect --json`, `debugfs`):
/// they must be what the build was given and what sops decrypts, with no VM needed.
#[test]
fn bootstrap_disk_expectations_come_from_the_image() {
    if !fixture_only() {
        return;
    }
    let run = RunDir::new();
    let built = prepare(run.path());
    let read = external_image(built.image.clone());
    assert_eq!(read.minipc_mac, built.minipc_mac);
    assert_eq!(read.client_mac, built.minipc_mac);
    assert_eq!(read.minipc_ip, built.minipc_ip);
    assert_eq!(read.appliance_ip, built.appliance_ip);
    assert_eq!(read.talos, built.talos);
    assert_eq!(
        read.config_sha, built.config_sha,
        "the served config is not what sops decrypts"
    );
    assert_eq!(read.pxe_nic_mac.as_deref(), Some(PXE_NIC_MAC));
    assert_eq!(read.uplink_mac.as_deref(), Some(UPLINK_MAC));
    assert!(read.probe, "fixture.probe= is in the kernel arguments");
}
