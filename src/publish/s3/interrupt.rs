//! Ctrl-C (SIGINT) or SIGTERM (a cancelled CI job) during an upload: note it, so the
//! transfer stops at the next check and aborts its multipart upload instead of leaving
//! orphaned parts in the bucket. The handlers in force before are restored afterwards.

use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{bail, Result};

/// The signal received during the upload, or 0.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn note(sig: libc::c_int) {
    RECEIVED.store(sig, Ordering::SeqCst);
}

/// Handlers for SIGINT and SIGTERM that only take note, for as long as this lives.
pub(super) struct Guard {
    old: [(libc::c_int, libc::sigaction); 2],
}

impl Guard {
    pub fn install() -> Guard {
        RECEIVED.store(0, Ordering::SeqCst);
        let mut old = [(libc::SIGINT, zeroed()), (libc::SIGTERM, zeroed())];
        for (sig, prev) in old.iter_mut() {
            let mut act = zeroed();
            act.sa_sigaction = note as *const () as libc::sighandler_t;
            // SAFETY: a valid sigaction for a handler that only stores to an atomic.
            unsafe {
                libc::sigemptyset(&mut act.sa_mask);
                libc::sigaction(*sig, &act, prev);
            }
        }
        Guard { old }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for (sig, prev) in &self.old {
            // SAFETY: restoring the action sigaction gave us.
            unsafe {
                libc::sigaction(*sig, prev, std::ptr::null_mut());
            }
        }
    }
}

fn zeroed() -> libc::sigaction {
    // SAFETY: sigaction is plain data; all-zero is SIG_DFL with an empty mask.
    unsafe { std::mem::zeroed() }
}

/// Fail if a signal arrived.
pub(super) fn check() -> Result<()> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => Ok(()),
        libc::SIGINT => bail!("interrupted (Ctrl-C)"),
        sig => bail!("interrupted (signal {sig})"),
    }
}
