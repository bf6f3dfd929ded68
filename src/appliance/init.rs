//! The appliance's `/init`: PID 1 inside our initramfs.
//!
//! It does the least a kernel needs from userspace to reach the appliance's rootfs:
//! mount the pseudo filesystems, load the (signed) modules the Talos kernel keeps out of
//! its image, find the root partition by the GPT unique GUID named on the command line,
//! and mount it. Then it tells every console that it is ready (tests wait for that line)
//! and stays PID 1 forever: reaping orphans and powering off cleanly on SIGTERM,
//! SIGINT (Ctrl-Alt-Del) or an ACPI power-button press.
//! Failures are printed as `MKAPPLIANCE-ERROR …` and it stays alive, because an exiting
//! PID 1 is a kernel panic that hides the message an operator needs.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::console::Consoles;
use super::gptscan::{scan_block_devices, Guid, Scan};
use super::kcmdline::{root_guid_from_cmdline, PARTUUID_PREFIX};
use super::powerbutton::PowerButton;
use super::supervise::{supervise, SignalFd, HANDLED_SIGNALS};
use crate::layout::{INITRD_MODULES_ORDER, READY_MARKER, SYSROOT};

/// The line printed (after the marker) when the appliance cannot come up.
pub const ERROR_MARKER: &str = "MKAPPLIANCE-ERROR";
/// What a non-PID-1 invocation prints before exiting 1.
pub const REFUSAL: &str = "mkappliance init: refusing to run: not PID 1";

/// Both exist in our cpio: std needs fds 0-2 open before anything prints.
const DEV_CONSOLE: &str = "/dev/console";
const DEV_NULL: &str = "/dev/null";
const PROC_CMDLINE: &str = "/proc/cmdline";
const PROC_OSRELEASE: &str = "/proc/sys/kernel/osrelease";
const SYS_CLASS_BLOCK: &str = "/sys/class/block";
const DEV_DIR: &str = "/dev";
/// Filesystem type of the appliance rootfs (built into the Talos kernel).
const ROOT_FSTYPE: &str = "ext4";

/// Drivers probe asynchronously after `finit_module` returns: poll this long for the disk.
const ROOT_WAIT: Duration = Duration::from_secs(10);
const ROOT_POLL: Duration = Duration::from_millis(100);

/// `finit_module` flag (Linux 6.4+): the kernel decompresses the module itself.
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;
/// Module file suffixes that need [`MODULE_INIT_COMPRESSED_FILE`].
const COMPRESSED_MODULE_SUFFIXES: &[&str] = &[".ko.xz", ".ko.zst", ".ko.gz"];

/// Pseudo filesystems mounted first: (source, target, fstype, flags, data).
const EARLY_MOUNTS: &[(&str, &str, &str, libc::c_ulong, &str)] = &[
    ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
    (
        "proc",
        "/proc",
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    ),
    (
        "sysfs",
        "/sys",
        "sysfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    ),
    (
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    ),
];

/// Run as the appliance's PID 1. Never returns; exits 1 at once if not PID 1.
pub fn run() -> ! {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    if pid != 1 {
        eprintln!(
            "{REFUSAL} (pid {pid}); it mounts over /dev, /proc and /sys and belongs only in \
             the appliance initramfs"
        );
        std::process::exit(1);
    }
    ensure_std_fds();
    // Block the signals we handle before anything else could spawn a thread, so they
    // queue for the signalfd instead of being dropped (PID 1 ignores default actions).
    let signals = match SignalFd::new(&HANDLED_SIGNALS) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("{ERROR_MARKER} blocking signals: {e:#}");
            None
        }
    };
    // Ctrl-Alt-Del becomes SIGINT for us instead of an immediate hard reboot.
    // SAFETY: reboot with RB_DISABLE_CAD only changes a kernel flag.
    unsafe { libc::reboot(libc::RB_DISABLE_CAD) };

    let mount_errors = mount_early();
    let consoles = std::sync::Arc::new(Consoles::open_default());
    let kver = std::fs::read_to_string(PROC_OSRELEASE)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    consoles.line("");
    consoles.line(&format!(
        "mkappliance {} appliance init (kernel {kver}, consoles {})",
        env!("CARGO_PKG_VERSION"),
        consoles
            .paths()
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    ));

    let outcome = if let Some(e) = mount_errors {
        Err(e)
    } else {
        // A panic in PID 1 would be a kernel panic that hides the reason: report it instead.
        std::panic::catch_unwind(|| boot(&consoles, &kver))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the init panicked while booting")))
    };
    // The hypervisor's "shut down" presses the ACPI power button. Watched before the
    // ready line: a press right after it (the operator's, or a test's) must not be lost.
    let button = match PowerButton::open() {
        Ok(b) => Some(b),
        Err(e) => {
            consoles.line(&format!("power button: not watched: {e:#}"));
            None
        }
    };
    match outcome {
        Ok(facts) => consoles.line(&format!("{READY_MARKER} {facts}")),
        Err(e) => consoles.line(&format!("{ERROR_MARKER} {e:#}")),
    }
    supervise(&consoles, signals, button)
}

/// What the ready line reports.
struct Facts {
    root: String,
    modules: usize,
    modules_failed: usize,
    kver: String,
    serving: super::start::Serving,
}

impl std::fmt::Display for Facts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "root={} modules={}", self.root, self.modules)?;
        if self.modules_failed > 0 {
            write!(f, " modules_failed={}", self.modules_failed)?;
        }
        write!(
            f,
            " kver={} {} uptime_ms={}",
            self.kver,
            self.serving,
            uptime_ms()
        )
    }
}

fn boot(consoles: &std::sync::Arc<Consoles>, kver: &str) -> Result<Facts> {
    let modules = load_modules(&Path::new("/").join(INITRD_MODULES_ORDER), consoles)
        .context("loading kernel modules")?;
    let cmdline =
        std::fs::read_to_string(PROC_CMDLINE).with_context(|| format!("reading {PROC_CMDLINE}"))?;
    let guid = root_guid_from_cmdline(&cmdline)?;
    let start = Instant::now();
    let root = wait_for_root(&guid, ROOT_WAIT)?;
    consoles.line(&format!(
        "root: PARTUUID={guid} is {root} (found after {} ms)",
        start.elapsed().as_millis()
    ));
    mount_root(&root)?;
    consoles.line(&format!(
        "root: mounted {root} on {SYSROOT} ({ROOT_FSTYPE}, rw)"
    ));
    let serving = super::start::start(Path::new(SYSROOT), consoles)?;
    Ok(Facts {
        root,
        modules: modules.loaded + modules.already,
        modules_failed: modules.failed,
        kver: kver.to_string(),
        serving,
    })
}

/// Make sure fds 0, 1 and 2 are open: the kernel leaves them closed when it could not
/// open `/dev/console`, and std (and any child) assumes they exist.
fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            continue;
        }
        for path in [DEV_CONSOLE, DEV_NULL] {
            let Ok(c) = CString::new(path) else { continue };
            // SAFETY: c is a valid NUL-terminated path; the new fd is moved onto `fd`.
            unsafe {
                let new = libc::open(c.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
                if new < 0 {
                    continue;
                }
                if new != fd {
                    libc::dup2(new, fd);
                    libc::close(new);
                }
            }
            break;
        }
    }
}

pub(super) fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let cstr =
        |s: &str| CString::new(s).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e));
    let (source, target, fstype, data) = (cstr(source)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Mount devtmpfs, proc, sysfs and tmpfs; already mounted (EBUSY) is fine.
fn mount_early() -> Option<anyhow::Error> {
    let mut errors = Vec::new();
    for &(source, target, fstype, flags, data) in EARLY_MOUNTS {
        let result = std::fs::create_dir_all(target)
            .with_context(|| format!("creating {target}"))
            .and_then(|()| match mount(source, target, fstype, flags, data) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
                r => r.with_context(|| format!("mounting {fstype} on {target}")),
            });
        if let Err(e) = result {
            errors.push(format!("{e:#}"));
        }
    }
    if errors.is_empty() {
        None
    } else {
        Some(anyhow::anyhow!(errors.join("; ")))
    }
}

/// Result of loading the module list.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ModuleSummary {
    pub loaded: usize,
    /// Already loaded or built in (EEXIST).
    pub already: usize,
    /// For hardware this machine lacks (ENODEV), e.g. crc32c-intel without SSE4.2.
    pub no_device: usize,
    pub failed: usize,
}

/// The module paths in a `modules.order` list: one absolute path per line, blank lines
/// and `#` comments skipped.
pub fn parse_module_list(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// `finit_module` flags for a module file: compressed ones are decompressed by the kernel.
pub fn finit_flags(path: &str) -> libc::c_uint {
    if COMPRESSED_MODULE_SUFFIXES.iter().any(|s| path.ends_with(s)) {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    }
}

fn finit_module(path: &str) -> io::Result<()> {
    let file = File::open(path)?;
    let params = c"";
    // SAFETY: fd is open for the duration of the call, params is a valid C string.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            finit_flags(path),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Load every module in the list, in order. A missing list means a kernel with
/// everything built in; a module that fails is reported and the rest still load.
fn load_modules(list: &Path, consoles: &Consoles) -> Result<ModuleSummary> {
    let text = match std::fs::read_to_string(list) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            consoles.line(&format!("modules: no {}, none loaded", list.display()));
            return Ok(ModuleSummary::default());
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", list.display())),
    };
    let start = Instant::now();
    let mut summary = ModuleSummary::default();
    for path in parse_module_list(&text) {
        match finit_module(path) {
            Ok(()) => summary.loaded += 1,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => summary.already += 1,
            // Drivers for absent hardware refuse to load; that is not a fault.
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => summary.no_device += 1,
            Err(e) => {
                summary.failed += 1;
                consoles.line(&format!("modules: loading {path} failed: {e}"));
            }
        }
    }
    consoles.line(&format!(
        "modules: {} loaded, {} already present, {} not for this hardware, {} failed in {} ms",
        summary.loaded,
        summary.already,
        summary.no_device,
        summary.failed,
        start.elapsed().as_millis()
    ));
    Ok(summary)
}

/// Poll the block devices until a GPT partition with this unique GUID shows up.
fn wait_for_root(guid: &Guid, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        match scan_block_devices(Path::new(SYS_CLASS_BLOCK), Path::new(DEV_DIR), guid)
            .context("scanning block devices for the root partition")?
        {
            Scan::Found { partition, .. } => return Ok(format!("{DEV_DIR}/{partition}")),
            Scan::NotFound { seen } if Instant::now() >= deadline => {
                let seen = if seen.is_empty() {
                    "no disks".to_string()
                } else {
                    seen.join("; ")
                };
                bail!(
                    "no partition with {PARTUUID_PREFIX}{guid} after {} s (saw {seen})",
                    timeout.as_secs()
                );
            }
            Scan::NotFound { .. } => std::thread::sleep(ROOT_POLL),
        }
    }
}

fn mount_root(device: &str) -> Result<()> {
    std::fs::create_dir_all(SYSROOT).with_context(|| format!("creating {SYSROOT}"))?;
    mount(device, SYSROOT, ROOT_FSTYPE, 0, "")
        .with_context(|| format!("mounting {device} ({ROOT_FSTYPE}) on {SYSROOT}"))
}

fn uptime_ms() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32).as_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_list_and_flags() {
        let list = "# deps first\n/lib/modules/k/virtio.ko\n\n  /lib/modules/k/virtio_blk.ko.xz \n\
                    /lib/modules/k/e1000e.ko.zst\n";
        assert_eq!(
            parse_module_list(list),
            vec![
                "/lib/modules/k/virtio.ko",
                "/lib/modules/k/virtio_blk.ko.xz",
                "/lib/modules/k/e1000e.ko.zst"
            ]
        );
        assert_eq!(finit_flags("/lib/modules/k/virtio.ko"), 0);
        // 4 is MODULE_INIT_COMPRESSED_FILE in include/uapi/linux/module.h.
        assert_eq!(finit_flags("/lib/modules/k/virtio_blk.ko.xz"), 4);
        assert_eq!(finit_flags("/lib/modules/k/e1000e.ko.zst"), 4);
    }
}
