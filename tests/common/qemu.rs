//! QEMU VMs for the tests: TCG, the serial console in a file, a monitor socket; killed
//! when dropped. `IT_GUI=1` shows their screens.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
const POLL: Duration = Duration::from_millis(200);

/// How a VM boots.
pub enum Boot {
    /// q35 with OVMF (a fresh copy of the variable store for each VM).
    Uefi,
    /// The default machine, booting a kernel directly.
    Kernel {
        kernel: PathBuf,
        initrd: PathBuf,
        append: String,
    },
}

/// How a VM is started, beyond the console and monitor every VM gets.
pub struct VmSpec {
    pub memory_mib: u32,
    pub cpus: u32,
    /// Without `-no-reboot` a guest reboot restarts the VM (a real Talos install reboots).
    pub reboot: bool,
    pub boot: Boot,
    /// Disks, NICs and anything else.
    pub args: Vec<String>,
}

impl VmSpec {
    /// A UEFI VM with 512 MiB and one CPU that stops when the guest reboots.
    pub fn new(args: Vec<String>) -> VmSpec {
        VmSpec {
            memory_mib: 512,
            cpus: 1,
            reboot: false,
            boot: Boot::Uefi,
            args,
        }
    }
}

pub struct Vm {
    child: Child,
    /// The serial console.
    pub log: PathBuf,
    monitor: PathBuf,
    stderr: PathBuf,
}

impl Vm {
    /// Start `spec` with its files (`<name>.log`, …) in `dir`.
    pub fn start(dir: &Path, name: &str, spec: VmSpec) -> Vm {
        let log = dir.join(format!("{name}.log"));
        let monitor = dir.join(format!("{name}.monitor"));
        let stderr = dir.join(format!("{name}.qemu-stderr"));
        let gui = std::env::var("IT_GUI").is_ok_and(|v| !v.is_empty() && v != "0");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg"])
            .args(["-m", &spec.memory_mib.to_string()])
            .args(["-smp", &spec.cpus.to_string()])
            .args(["-display", if gui { "gtk" } else { "none" }])
            .arg("-serial")
            .arg(format!("file:{}", log.display()))
            .arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", monitor.display()));
        match &spec.boot {
            Boot::Uefi => {
                let vars = dir.join(format!("{name}-vars.fd"));
                std::fs::copy(OVMF_VARS, &vars).unwrap();
                cmd.args(["-machine", "q35"])
                    .arg("-drive")
                    .arg(format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"))
                    .arg("-drive")
                    .arg(format!("if=pflash,format=raw,file={}", vars.display()));
            }
            Boot::Kernel {
                kernel,
                initrd,
                append,
            } => {
                cmd.arg("-kernel")
                    .arg(kernel)
                    .arg("-initrd")
                    .arg(initrd)
                    .args(["-append", append]);
            }
        }
        if !spec.reboot {
            cmd.arg("-no-reboot");
        }
        let child = cmd
            .args(&spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("starting qemu-system-x86_64");
        Vm {
            child,
            log,
            monitor,
            stderr,
        }
    }

    /// The serial console so far.
    pub fn text(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    /// Wait for a console line containing `needle` and return it; panics with the console
    /// (and QEMU's own complaints) if QEMU exits first or `timeout` passes.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let text = self.text();
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
                panic!("QEMU exited ({status}) before {needle:?}: {err}\nconsole:\n{text}");
            }
            assert!(
                start.elapsed() < timeout,
                "no {needle:?} after {timeout:?}; console:\n{text}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// Wait for QEMU to exit by itself (the guest powered off).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "the VM did not power off in {timeout:?}; console:\n{}",
                self.text()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Run a monitor command, waiting for its prompt so it is done before we hang up.
    pub fn monitor(&self, command: &str) {
        let mut mon = UnixStream::connect(&self.monitor).expect("connecting to the monitor");
        mon.write_all(format!("{command}\n").as_bytes()).unwrap();
        mon.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while String::from_utf8_lossy(&seen).matches("(qemu)").count() < 2 {
            match mon.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Press the ACPI power button, as a hypervisor's "shut down" does.
    pub fn power_button(&self) {
        self.monitor("system_powerdown");
    }

    /// Press Ctrl-Alt-Del on the PS/2 keyboard.
    pub fn ctrl_alt_del(&self) {
        self.monitor("sendkey ctrl-alt-delete");
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
