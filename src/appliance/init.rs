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
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::console::Consoles;
use super::gptscan::{scan_block_devices, Guid, Scan};
use super::powerbutton::PowerButton;
use crate::layout::{INITRD_MODULES_ORDER, READY_MARKER, ROOT_PARAM, SYSROOT};

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
/// The root prefix `mkappliance.root=` accepts.
const PARTUUID_PREFIX: &str = "PARTUUID=";

/// Drivers probe asynchronously after `finit_module` returns: poll this long for the disk.
const ROOT_WAIT: Duration = Duration::from_secs(10);
const ROOT_POLL: Duration = Duration::from_millis(100);
/// How long children get between SIGTERM and SIGKILL at power-off.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

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
    let consoles = Consoles::open_default();
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
    match outcome {
        Ok(facts) => consoles.line(&format!("{READY_MARKER} {facts}")),
        Err(e) => consoles.line(&format!("{ERROR_MARKER} {e:#}")),
    }
    // The hypervisor's "shut down" presses the ACPI power button.
    let button = match PowerButton::open() {
        Ok(b) => Some(b),
        Err(e) => {
            consoles.line(&format!("power button: not watched: {e:#}"));
            None
        }
    };
    supervise(&consoles, signals, button)
}

/// What the ready line reports.
struct Facts {
    root: String,
    modules: usize,
    modules_failed: usize,
    kver: String,
}

impl std::fmt::Display for Facts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "root={} modules={}", self.root, self.modules)?;
        if self.modules_failed > 0 {
            write!(f, " modules_failed={}", self.modules_failed)?;
        }
        write!(f, " kver={} uptime_ms={}", self.kver, uptime_ms())
    }
}

fn boot(consoles: &Consoles, kver: &str) -> Result<Facts> {
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
    Ok(Facts {
        root,
        modules: modules.loaded + modules.already,
        modules_failed: modules.failed,
        kver: kver.to_string(),
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

fn mount(
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
            Err(e) => {
                summary.failed += 1;
                consoles.line(&format!("modules: loading {path} failed: {e}"));
            }
        }
    }
    consoles.line(&format!(
        "modules: {} loaded, {} already present, {} failed in {} ms",
        summary.loaded,
        summary.already,
        summary.failed,
        start.elapsed().as_millis()
    ));
    Ok(summary)
}

/// Split a kernel command line into `key[=value]` words the way the kernel does:
/// whitespace separates, double quotes group (and are dropped), `--` ends the
/// kernel's part (what follows is for init).
pub fn cmdline_words(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_quotes = false;
    let mut has_word = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                has_word = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if has_word {
                    words.push(std::mem::take(&mut word));
                    has_word = false;
                }
            }
            c => {
                word.push(c);
                has_word = true;
            }
        }
    }
    if has_word {
        words.push(word);
    }
    if let Some(end) = words.iter().position(|w| w == "--") {
        words.truncate(end);
    }
    words
}

/// The value of `key=` on a kernel command line; the last occurrence wins, as for the
/// kernel's own parameters.
pub fn cmdline_param(cmdline: &str, key: &str) -> Option<String> {
    cmdline_words(cmdline)
        .into_iter()
        .filter_map(|w| {
            w.split_once('=')
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| v.to_string())
        })
        .next_back()
}

/// Parse a root spec `PARTUUID=<GUID>` (the only form the appliance writes).
pub fn parse_root_spec(spec: &str) -> Result<Guid> {
    let Some(guid) = spec
        .get(..PARTUUID_PREFIX.len())
        .filter(|p| p.eq_ignore_ascii_case(PARTUUID_PREFIX))
        .map(|_| &spec[PARTUUID_PREFIX.len()..])
    else {
        bail!("{ROOT_PARAM}={spec} is not of the form {PARTUUID_PREFIX}<GUID>");
    };
    guid.parse()
        .with_context(|| format!("parsing {ROOT_PARAM}={spec}"))
}

/// The root partition's unique GUID from the kernel command line.
pub fn root_guid_from_cmdline(cmdline: &str) -> Result<Guid> {
    let spec = cmdline_param(cmdline, ROOT_PARAM).with_context(|| {
        format!("no {ROOT_PARAM}={PARTUUID_PREFIX}<GUID> on the kernel command line")
    })?;
    parse_root_spec(&spec)
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

/// Signals PID 1 acts on; all are blocked and read from a signalfd.
const HANDLED_SIGNALS: [libc::c_int; 3] = [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT];

/// A signalfd over a set of signals that this function blocks for the whole process.
struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    fn new(signals: &[libc::c_int]) -> Result<Self> {
        // SAFETY: the sigset is initialised by sigemptyset before use; the fd returned by
        // signalfd is owned by the OwnedFd.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for &s in signals {
                libc::sigaddset(&mut set, s);
            }
            if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error()).context("sigprocmask");
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error()).context("signalfd");
            }
            Ok(SignalFd {
                fd: OwnedFd::from_raw_fd(fd),
            })
        }
    }

    /// Read one pending signal number (blocks until one arrives).
    fn read(&self) -> io::Result<u32> {
        // SAFETY: signalfd_siginfo is plain old data; read fills at most its size.
        unsafe {
            let mut info: libc::signalfd_siginfo = std::mem::zeroed();
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            let n = libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            );
            if n == size as isize {
                Ok(info.ssi_signo)
            } else if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "short signalfd read",
                ))
            }
        }
    }
}

/// Reap every exited child without blocking; orphans of the whole system end up here.
fn reap_children() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with WNOHANG only writes status.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            break;
        }
    }
}

/// PID 1's main loop: never returns.
///
/// Events come from the signalfd (SIGCHLD reaps; SIGTERM and SIGINT, which is
/// Ctrl-Alt-Del thanks to RB_DISABLE_CAD, power off) and from the ACPI power button.
fn supervise(consoles: &Consoles, signals: Option<SignalFd>, button: Option<PowerButton>) -> ! {
    let mut fds: Vec<libc::pollfd> = [
        signals.as_ref().map(|s| s.fd.as_raw_fd()),
        button.as_ref().map(|b| b.as_raw_fd()),
    ]
    .into_iter()
    .flatten()
    .map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    })
    .collect();
    loop {
        if fds.is_empty() {
            // Nothing to wait on: all we can still do is reap, slowly.
            reap_children();
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        // SAFETY: fds is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                consoles.line(&format!("mkappliance: poll: {e}"));
                std::thread::sleep(Duration::from_secs(1));
            }
            continue;
        }
        for pfd in &fds {
            if pfd.revents == 0 {
                continue;
            }
            if let Some(s) = signals.as_ref().filter(|s| s.fd.as_raw_fd() == pfd.fd) {
                match s.read() {
                    Ok(sig) if sig == libc::SIGCHLD as u32 => reap_children(),
                    Ok(sig) if sig == libc::SIGTERM as u32 => power_off(consoles, "SIGTERM"),
                    Ok(sig) if sig == libc::SIGINT as u32 => power_off(consoles, "SIGINT"),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => consoles.line(&format!("mkappliance: reading signals: {e}")),
                }
            }
            if let Some(b) = button.as_ref().filter(|b| b.as_raw_fd() == pfd.fd) {
                match b.read_events() {
                    Ok(events) if events.iter().any(|e| e.is_power_button()) => {
                        power_off(consoles, "power button")
                    }
                    Ok(_) => {}
                    Err(e) => consoles.line(&format!("mkappliance: {e:#}")),
                }
            }
        }
    }
}

/// Stop everything, flush the root filesystem and power the machine off.
fn power_off(consoles: &Consoles, reason: &str) -> ! {
    consoles.line(&format!("mkappliance: {reason}: powering off"));
    stop_all_processes();
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    if let Err(e) = unmount_sysroot() {
        consoles.line(&format!("mkappliance: {e:#}"));
    }
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    consoles.line("mkappliance: power off");
    // SAFETY: reboot(RB_POWER_OFF) does not return on success.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    consoles.line(&format!(
        "{ERROR_MARKER} power off failed: {}",
        io::Error::last_os_error()
    ));
    // PID 1 must not exit, even now.
    loop {
        reap_children();
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// SIGTERM every other process, give them a moment, then SIGKILL the rest.
fn stop_all_processes() {
    // SAFETY: kill(-1, …) signals every process but PID 1 itself and kernel threads.
    if unsafe { libc::kill(-1, libc::SIGTERM) } != 0 {
        return; // ESRCH: there are none
    }
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while Instant::now() < deadline {
        let mut status = 0;
        // SAFETY: waitpid with WNOHANG only writes status.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid < 0 {
            return; // ECHILD: all gone
        }
        if pid == 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    reap_children();
}

/// Unmount the rootfs so it is clean on the next boot; fall back to a read-only remount.
fn unmount_sysroot() -> Result<()> {
    let target = CString::new(Path::new(SYSROOT).as_os_str().as_bytes())
        .context("sysroot path contains NUL")?;
    // SAFETY: target is a valid NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EINVAL) {
        return Ok(()); // not mounted (booting had failed)
    }
    mount("none", SYSROOT, "", libc::MS_REMOUNT | libc::MS_RDONLY, "").with_context(|| {
        format!("unmounting {SYSROOT} failed ({err}), and so did remounting it read-only")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN_LIKE: &str = "BOOT_IMAGE=/vmlinuz console=tty0 console=ttyS0,115200 \
        mkappliance.root=PARTUUID=6e0b9e2a-5a47-4c1b-9e0d-3f2b1c4d5e6f quiet\n";

    #[test]
    fn finds_the_root_guid_on_the_command_line() {
        let g = root_guid_from_cmdline(DEBIAN_LIKE).unwrap();
        assert_eq!(g.to_string(), "6E0B9E2A-5A47-4C1B-9E0D-3F2B1C4D5E6F");
        // GPT byte order: first field little-endian.
        assert_eq!(&g.0[..4], &[0x2a, 0x9e, 0x0b, 0x6e]);
    }

    #[test]
    fn last_occurrence_wins_and_init_args_are_ignored() {
        let c = "mkappliance.root=PARTUUID=00000000-0000-0000-0000-000000000001 \
                 mkappliance.root=partuuid=00000000-0000-0000-0000-000000000002 \
                 -- mkappliance.root=PARTUUID=00000000-0000-0000-0000-000000000003";
        assert_eq!(
            root_guid_from_cmdline(c).unwrap().to_string(),
            "00000000-0000-0000-0000-000000000002"
        );
    }

    #[test]
    fn quotes_group_words_like_the_kernel() {
        let c = r#"a="x y" "mkappliance.root=PARTUUID=00000000-0000-0000-0000-0000000000AB" b"#;
        assert_eq!(
            cmdline_words(c),
            vec![
                "a=x y",
                "mkappliance.root=PARTUUID=00000000-0000-0000-0000-0000000000AB",
                "b"
            ]
        );
        assert_eq!(cmdline_param(c, "a").as_deref(), Some("x y"));
        assert_eq!(cmdline_param(c, "b"), None); // present but without a value
        assert_eq!(cmdline_param(c, "mkappliance"), None);
    }

    #[test]
    fn rejects_missing_or_malformed_root() {
        let err = root_guid_from_cmdline("console=ttyS0 root=/dev/vda2").unwrap_err();
        assert!(
            format!("{err:#}").contains("no mkappliance.root="),
            "{err:#}"
        );
        // A look-alike parameter must not match.
        let err = root_guid_from_cmdline(
            "xmkappliance.root=PARTUUID=00000000-0000-0000-0000-000000000001",
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("no mkappliance.root="),
            "{err:#}"
        );
        let err = root_guid_from_cmdline("mkappliance.root=/dev/vda2").unwrap_err();
        assert!(format!("{err:#}").contains("not of the form"), "{err:#}");
        let err = root_guid_from_cmdline("mkappliance.root=PARTUUID=1234").unwrap_err();
        assert!(format!("{err:#}").contains("not a GUID"), "{err:#}");
    }

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
