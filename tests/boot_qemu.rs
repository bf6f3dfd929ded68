//! The built image boots under QEMU (TCG) with OVMF: firmware → systemd-boot → kernel +
//! appliance.img → our /init, which loads its modules, mounts the rootfs it finds by GPT
//! partition GUID and prints the ready line on the serial console.

mod common;
#[path = "common/fixture.rs"]
mod fixture;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// Under TCG the firmware alone takes ~4 s; a loaded CI machine may be several times slower.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn boot(image: &Path, dir: &Path) -> (Vm, std::path::PathBuf) {
    let vars = dir.join("vars.fd");
    std::fs::copy(OVMF_VARS, &vars).unwrap();
    let log = dir.join("serial.log");
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-machine",
            "q35",
            "-m",
            "512",
            "-display",
            "none",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,file={}", vars.display()))
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=raw", image.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting qemu-system-x86_64");
    (Vm(child), log)
}

/// Wait until the serial log has a line containing `needle`; return the whole log.
fn wait_for(vm: &mut Vm, log: &Path, needle: &str) -> Result<String, String> {
    let start = Instant::now();
    loop {
        let text = std::fs::read(log)
            .map(|b| String::from_utf8_lossy(&b).to_string())
            .unwrap_or_default();
        if text.contains(needle) {
            return Ok(text);
        }
        if let Some(status) = vm.0.try_wait().unwrap() {
            let mut err = String::new();
            vm.0.stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return Err(format!(
                "QEMU exited ({status}) before {needle:?}: {err}\n{text}"
            ));
        }
        if start.elapsed() > BOOT_TIMEOUT {
            return Err(format!(
                "no {needle:?} after {BOOT_TIMEOUT:?}; serial console:\n{text}"
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn image_boots_under_ovmf_to_the_ready_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    run_ok(&mut build_cmd(&fixture::talos_iso("default"), &out, &[]));
    let image = out.join("bootstrap-pxe.raw");
    let (_, _, _, root_guid) = sgdisk_partition(&image, 2);
    let (mut vm, log) = boot(&image, tmp.path());
    let text = wait_for(&mut vm, &log, "MKAPPLIANCE-READY").unwrap_or_else(|e| panic!("{e}"));
    let ready = text
        .lines()
        .find(|l| l.starts_with("MKAPPLIANCE-READY"))
        .unwrap();
    // systemd-boot passed our entry's options (the root GUID sgdisk reports) to the kernel.
    assert!(
        text.contains(&format!("mkappliance.root=PARTUUID={root_guid}")),
        "{text}"
    );
    assert!(ready.contains("root=/dev/vda2"), "{ready}");
    assert!(
        ready.contains(&format!("kver={}", fixture::kernel_version())),
        "{ready}"
    );
    assert!(
        !ready.contains("modules_failed"),
        "a bundled module failed to load: {text}"
    );
    assert!(!text.contains("MKAPPLIANCE-ERROR"), "{text}");
    assert!(!text.contains("Kernel panic"), "{text}");
}
