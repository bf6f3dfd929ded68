//! The rendered dnsmasq.conf and nginx.conf must be valid for the real daemons, and the
//! rendered files must say what the appliance serves (checked against values written
//! here by hand, not taken from the code).

use std::process::Command;

mod common;

use mkappliance::config::ApplianceConfig;
use mkappliance::render::{self, Renderer};

fn sample() -> ApplianceConfig {
    common::sample_config()
}

fn render(name: &str) -> String {
    Renderer::new(None)
        .unwrap()
        .render(name, &sample(), "console=ttyS0")
        .unwrap()
}

#[test]
fn dnsmasq_conf_passes_dnsmasq_test() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("dnsmasq.conf");
    let text = render(render::DNSMASQ_CONF);
    std::fs::write(&conf, &text).unwrap();
    let out = Command::new("dnsmasq")
        .arg("--test")
        .arg("-C")
        .arg(&conf)
        .output()
        .expect("run dnsmasq");
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && msg.contains("syntax check OK"),
        "dnsmasq --test: {msg}"
    );
    // A broken line must make the same check fail, so the test can fail.
    std::fs::write(
        &conf,
        format!("{text}\ndhcp-host=not-a-mac-or-anything,,,,\nbogus-option=1\n"),
    )
    .unwrap();
    let bad = Command::new("dnsmasq")
        .arg("--test")
        .arg("-C")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    for needle in [
        "dhcp-host=00:11:22:33:44:55,10.10.10.100,",
        "dhcp-range=10.10.10.50,10.10.10.60,255.255.255.0,",
        "dhcp-ignore=tag:!known",
        "listen-address=10.10.10.2",
        "dhcp-boot=tag:!ipxe,tag:efi64,ipxe.efi,,10.10.10.2",
        "dhcp-boot=tag:!ipxe,tag:bios,undionly.kpxe,,10.10.10.2",
        "dhcp-boot=tag:ipxe,http://10.10.10.2/boot.ipxe",
        "tftp-root=/srv/tftp",
        "windowsize",
        "boot-once",
    ] {
        assert!(
            text.contains(needle),
            "dnsmasq.conf lacks {needle:?}:\n{text}"
        );
    }
    assert!(
        !text.contains("arm64,ipxe-arm64"),
        "ARM64 boot line rendered without an ARM64 iPXE"
    );
}

/// `nginx -t` binds the listen address, so run it in a private network namespace that
/// has the appliance address (unprivileged: a user namespace maps us to root).
fn nginx_t(dir: &std::path::Path, conf: &std::path::Path) -> std::process::Output {
    let script = format!(
        "ip link set lo up && ip addr add 10.10.10.2/24 dev lo && exec nginx -t -q -p '{}' -c '{}'",
        dir.display(),
        conf.display()
    );
    Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "sh", "-c", &script])
        .output()
        .expect("run nginx in a network namespace")
}

#[test]
fn nginx_conf_passes_nginx_t() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nginx.conf");
    let text = render(render::NGINX_CONF);
    std::fs::write(&conf, &text).unwrap();
    let out = nginx_t(dir.path(), &conf);
    assert!(
        out.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        &conf,
        text.replace("autoindex off;", "autoindex off; no_such_directive 1;"),
    )
    .unwrap();
    let bad = nginx_t(dir.path(), &conf);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no_such_directive"));
    for needle in [
        "listen 10.10.10.2:80;",
        "root /srv/http;",
        "allow 10.10.10.100;",
        "deny all;",
        "autoindex off;",
    ] {
        assert!(text.contains(needle), "nginx.conf lacks {needle:?}");
    }
}

#[test]
fn boot_ipxe_boots_talos_with_the_config_url() {
    let text = render(render::BOOT_IPXE);
    assert!(text.starts_with("#!ipxe\n"));
    let kernel = text
        .lines()
        .find(|l| l.starts_with("kernel "))
        .expect("kernel line");
    assert!(
        kernel.starts_with("kernel http://10.10.10.2/talos/v1.11.6/vmlinuz initrd=initramfs.xz ")
    );
    for arg in [
        "talos.platform=metal",
        "console=tty0",
        "init_on_alloc=1",
        "slab_nomerge",
        "pti=on",
        "consoleblank=0",
        "nvme_core.io_timeout=4294967295",
        "printk.devkmsg=on",
        "selinux=1",
        "talos.config=http://10.10.10.2/configs/minipc.yaml",
        "talos.dashboard.disabled=1",
    ] {
        assert!(
            kernel.split(' ').any(|a| a == arg),
            "kernel line lacks {arg}: {kernel}"
        );
    }
    assert!(text.contains("\ninitrd http://10.10.10.2/talos/v1.11.6/initramfs.xz\n"));
    assert!(text.trim_end().ends_with("boot"));
}

#[test]
fn loader_files_and_overrides() {
    assert_eq!(
        render(render::LOADER_CONF),
        "timeout 0\ndefault appliance.conf\neditor no\n"
    );
    let entry = render(render::LOADER_ENTRY);
    assert!(
        entry.contains("\nlinux /vmlinuz\ninitrd /appliance.img\noptions console=ttyS0\n"),
        "{entry}"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(render::LOADER_CONF), "timeout 5\n").unwrap();
    let r = Renderer::new(Some(dir.path())).unwrap();
    assert_eq!(
        r.render(render::LOADER_CONF, &sample(), "").unwrap(),
        "timeout 5\n"
    );
    // A template with an undefined variable is an error, not an empty string.
    std::fs::write(dir.path().join(render::BOOT_IPXE), "{{ no_such_thing }}").unwrap();
    let r = Renderer::new(Some(dir.path())).unwrap();
    assert!(r.render(render::BOOT_IPXE, &sample(), "").is_err());
}
