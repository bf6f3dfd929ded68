//! PID 1 after boot: reap orphans, and power off cleanly when asked.
//!
//! Requests come as SIGTERM, SIGINT (Ctrl-Alt-Del, once the init has set
//! RB_DISABLE_CAD) or an ACPI power-button press; all are read in one poll loop.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::console::Consoles;
use super::init::{mount, ERROR_MARKER};
use super::powerbutton::PowerButton;
use crate::layout::SYSROOT;

/// How long children get between SIGTERM and SIGKILL at power-off.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Signals PID 1 acts on; all are blocked and read from a signalfd.
pub(super) const HANDLED_SIGNALS: [libc::c_int; 3] = [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT];

/// A signalfd over a set of signals, blocked first so they queue for it; threads
/// spawned later inherit the mask, so no other thread ever takes them.
pub(super) struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    pub(super) fn new(signals: &[libc::c_int]) -> Result<Self> {
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
pub(super) fn supervise(
    consoles: &Consoles,
    signals: Option<SignalFd>,
    button: Option<PowerButton>,
) -> ! {
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
    // Our own threads hold files on the rootfs (event log, served files): close them.
    super::start::stop();
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
