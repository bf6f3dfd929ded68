//! The built image boots under QEMU (TCG) with OVMF: firmware → systemd-boot → kernel +
//! appliance.img → our /init, which loads its modules, mounts the rootfs it finds by GPT
//! partition GUID, brings up its network and services and prints the ready line on the
//! serial console. With an uplink on QEMU user networking it gets a lease and installs the
//! NAT; without one it says it is offline and still serves; the ACPI power button (the
//! hypervisor's "shut down") powers it off with the rootfs cleanly unmounted.

mod common;
#[path = "common/fixture.rs"]
mod fixture;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::qemu::{Vm, VmSpec};
use common::*;

/// Under TCG the firmware alone takes ~4 s; a loaded CI machine may be several times slower.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(60);
const PXE_MAC: &str = "52:54:00:a0:00:02";
const UPLINK_MAC: &str = "52:54:00:a0:00:03";

/// Ports of the appliance's services, forwarded from loopback to its uplink address
/// (10.0.2.15) so the test can knock on them from the uplink side: (proto, guest port).
const SCAN: &[(&str, u16)] = &[
    ("tcp", 80),
    ("tcp", 53),
    ("udp", 53),
    ("udp", 67),
    ("udp", 69),
];

/// A free loopback port for QEMU's hostfwd (bound and released right away).
fn free_port_for(proto: &str) -> u16 {
    if proto == "tcp" {
        return free_port();
    }
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Boot `image` with its PXE NIC on a link of its own and, when `uplink`, a second NIC on
/// QEMU user networking (`restrict=on`: nothing leaves this machine) whose `hostfwd`s
/// (`fwd`: proto, host port, guest port) reach the appliance's uplink address.
fn boot(image: &Path, dir: &Path, uplink: bool, fwd: &[(&str, u16, u16)]) -> Vm {
    let mut args: Vec<String> = vec![
        "-drive".into(),
        format!("file={},if=virtio,format=raw", image.display()),
        "-netdev".into(),
        "hubport,id=pxe,hubid=0".into(),
        "-device".into(),
        format!("virtio-net-pci,netdev=pxe,mac={PXE_MAC},romfile="),
    ];
    if uplink {
        let mut netdev = "user,id=up,restrict=on".to_string();
        for (proto, host, guest) in fwd {
            netdev.push_str(&format!(",hostfwd={proto}:127.0.0.1:{host}-:{guest}"));
        }
        args.extend([
            "-netdev".into(),
            netdev,
            "-device".into(),
            format!("virtio-net-pci,netdev=up,mac={UPLINK_MAC},romfile="),
        ]);
    }
    Vm::start(dir, "appliance", VmSpec::new(args))
}

/// Whether something answers a probe sent to a forwarded port: an HTTP request over TCP
/// (QEMU accepts the host side at once, so only a reply counts), or a DNS query, a DHCP
/// DISCOVER or a TFTP read request over UDP.
fn answers(proto: &str, port: u16) -> bool {
    let timeout = Duration::from_secs(3);
    if proto == "tcp" {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        s.set_read_timeout(Some(timeout)).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
        let mut buf = [0u8; 64];
        return matches!(s.read(&mut buf), Ok(n) if n > 0);
    }
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    // DNS query for "a." (also garbage to DHCP/TFTP), then a TFTP RRQ, then a BOOTREQUEST.
    let dns = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x00\x00\x01\x00\x01".to_vec();
    let rrq = b"\x00\x01ipxe.efi\x00octet\x00".to_vec();
    let mut dhcp = vec![0u8; 300];
    dhcp[0] = 1; // BOOTREQUEST
    dhcp[1] = 1;
    dhcp[2] = 6;
    dhcp[28..34].copy_from_slice(&[0x00, 0x11, 0x22, 0x33, 0x44, 0x55]);
    dhcp[236..240].copy_from_slice(&[99, 130, 83, 99]);
    dhcp[240..243].copy_from_slice(&[53, 1, 1]);
    dhcp[243] = 255;
    for probe in [dns, rrq, dhcp] {
        let _ = s.send_to(&probe, ("127.0.0.1", port));
    }
    let mut buf = [0u8; 1500];
    s.recv_from(&mut buf).is_ok()
}

fn build_image(dir: &Path) -> PathBuf {
    let out = dir.join("out");
    run_ok(&mut build_cmd(
        &fixture::talos_iso("default"),
        &out,
        &["--internal-mac", PXE_MAC, "--uplink-mac", UPLINK_MAC],
    ));
    out.join("bootstrap-pxe.raw")
}

/// A dumpe2fs field of the image's rootfs (an independent reader of its state).
fn rootfs_field(image: &Path, field: &str) -> String {
    let (offset, ..) = sgdisk_partition(image, 2);
    let out = run_ok(
        Command::new("dumpe2fs")
            .arg("-h")
            .arg(format!("{}?offset={offset}", image.display())),
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in dumpe2fs output"))
        .trim()
        .to_string()
}

#[test]
fn image_boots_gets_an_uplink_and_powers_off_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let image = build_image(tmp.path());
    let (_, _, _, root_guid) = sgdisk_partition(&image, 2);
    let fwd: Vec<(&str, u16, u16)> = SCAN
        .iter()
        .map(|&(proto, guest)| (proto, free_port_for(proto), guest))
        .collect();
    let mut vm = boot(&image, tmp.path(), true, &fwd);
    let ready = vm.wait_for("MKAPPLIANCE-READY", BOOT_TIMEOUT);
    let text = vm.text();
    // systemd-boot passed our entry's options (the root GUID sgdisk reports) to the kernel.
    assert!(
        text.contains(&format!("mkappliance.root=PARTUUID={root_guid}")),
        "{text}"
    );
    for fact in [
        "root=/dev/vda2",
        "ip=10.10.10.2/24",
        "node=00:11:22:33:44:55",
        "services=dhcp,tftp,http,dns",
    ] {
        assert!(
            ready.split_whitespace().any(|w| w == fact),
            "{fact} not in {ready}"
        );
    }
    assert!(
        ready.contains(&format!("kver={}", fixture::kernel_version())),
        "{ready}"
    );
    assert!(
        !ready.contains("modules_failed"),
        "a bundled module failed to load:\n{text}"
    );
    // QEMU's user network hands out 10.0.2.15 from its DHCP server at 10.0.2.2 (with
    // restrict=on it names no gateway: nothing is routed off this machine).
    let lease = vm.wait_for("10.0.2.15/24", BOOT_TIMEOUT);
    assert!(
        lease.starts_with("uplink: eth") && lease.contains("DHCP from 10.0.2.2"),
        "{lease}"
    );
    let text = vm.text();
    assert!(
        !text.contains("network:"),
        "the network came up with warnings:\n{text}"
    );
    assert!(
        !text.contains("dhcp-rogue"),
        "DHCP stood down on the PXE link:\n{text}"
    );
    assert!(!text.contains("MKAPPLIANCE-ERROR"), "{text}");
    // Nothing of ours answers on the uplink address: knock on every service port there.
    for &(proto, host, guest) in &fwd {
        assert!(
            !answers(proto, host),
            "{proto}/{guest} answers on the uplink address:\n{}",
            vm.text()
        );
    }
    vm.power_button();
    vm.wait_exit(POWEROFF_TIMEOUT);
    let text = vm.text();
    assert!(text.contains("mkappliance: power off"), "{text}");
    assert!(!text.contains("Kernel panic"), "{text}");
    assert_eq!(rootfs_field(&image, "Filesystem state:"), "clean");
    assert_eq!(rootfs_field(&image, "Mount count:"), "1");
}

#[test]
fn without_an_uplink_it_says_offline_and_still_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let image = build_image(tmp.path());
    let mut vm = boot(&image, tmp.path(), false, &[]);
    let ready = vm.wait_for("MKAPPLIANCE-READY", BOOT_TIMEOUT);
    assert!(ready.contains("uplink=offline"), "{ready}");
    assert!(ready.contains("services=dhcp,tftp,http,dns"), "{ready}");
    let text = vm.text();
    assert!(text.contains("uplink: offline"), "{text}");
    assert!(!text.contains("MKAPPLIANCE-ERROR"), "{text}");
    // One key on the VGA console's keyboard re-arms boot-once (nothing armed yet here).
    vm.monitor("sendkey r");
    vm.wait_for("boot-once: not armed yet", BOOT_TIMEOUT);
}

/// Control for the uplink knock: the probes do detect a service that answers.
#[test]
fn the_uplink_knock_detects_listeners() {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        if let Ok((n, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], peer);
        }
    });
    assert!(answers("udp", udp_port));
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_port = tcp.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = tcp.accept() {
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n");
        }
    });
    assert!(answers("tcp", tcp_port));
    // And silence is silence.
    assert!(!answers("udp", free_port_for("udp")));
}
