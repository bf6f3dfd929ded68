//! Small shared pieces: atomic output files, hashing, sizes, reproducible time.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Once;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// Timestamp used when `SOURCE_DATE_EPOCH` is unset: 2025-01-01T00:00:00Z.
pub const DEFAULT_EPOCH: u32 = 1_735_689_600;

/// `SOURCE_DATE_EPOCH` (reproducible-builds.org), or a fixed default.
pub fn source_date_epoch() -> Result<u32> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v
            .trim()
            .parse::<u32>()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a Unix timestamp")),
        Err(_) => Ok(DEFAULT_EPOCH),
    }
}

/// The temp file currently being written, unlinked by the SIGINT/SIGTERM handler.
static PENDING: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());
static HANDLER: Once = Once::new();

extern "C" fn on_signal(sig: libc::c_int) {
    let p = PENDING.swap(std::ptr::null_mut(), Ordering::SeqCst);
    // SAFETY: unlink, write and _exit are async-signal-safe; p came from CString::into_raw.
    unsafe {
        if !p.is_null() {
            libc::unlink(p);
        }
        let msg = b"\ninterrupted: removed the partial output\n";
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(128 + sig);
    }
}

/// Forget the pending temp file (it was renamed, removed, or never created).
fn clear_pending() {
    let p = PENDING.swap(std::ptr::null_mut(), Ordering::SeqCst);
    if !p.is_null() {
        // SAFETY: p came from CString::into_raw.
        drop(unsafe { CString::from_raw(p) });
    }
}

/// An output file written under a temporary name in its final directory, mode 0600, and
/// renamed into place by [`AtomicFile::commit`]. Dropped without commit (error, panic) or
/// interrupted by Ctrl-C, it removes itself, so nothing half-written is ever left.
pub struct AtomicFile {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
}

impl AtomicFile {
    pub fn create(dest: &Path) -> Result<AtomicFile> {
        let dir = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = dest
            .file_name()
            .with_context(|| format!("{} has no file name", dest.display()))?;
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        // Arm the Ctrl-C cleanup before the file exists, so no signal can fall between
        // creating it and being able to remove it (unlinking a missing path is harmless).
        HANDLER.call_once(|| {
            // SAFETY: installing a handler that only calls async-signal-safe functions.
            unsafe {
                libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
                libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
            }
        });
        if let Ok(c) = CString::new(tmp.as_os_str().as_bytes()) {
            let old = PENDING.swap(c.into_raw(), Ordering::SeqCst);
            if !old.is_null() {
                // SAFETY: old came from CString::into_raw.
                drop(unsafe { CString::from_raw(old) });
            }
        }
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
        {
            Ok(f) => f,
            Err(e) => {
                clear_pending();
                return Err(e).with_context(|| format!("creating {}", tmp.display()));
            }
        };
        Ok(AtomicFile {
            file: Some(file),
            tmp,
            dest: dest.to_path_buf(),
        })
    }

    pub fn file(&self) -> &File {
        self.file.as_ref().expect("file present until commit")
    }

    /// Rename into place. No fsync, like cp or a compiler: a full flush of a few hundred
    /// MB would dominate the build, and a torn file after a power cut is caught by the
    /// `.sha256` written beside it.
    pub fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("file present until commit");
        drop(file);
        std::fs::rename(&self.tmp, &self.dest).with_context(|| {
            format!("renaming {} to {}", self.tmp.display(), self.dest.display())
        })?;
        clear_pending();
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            clear_pending();
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Run `f` with SIGINT and SIGTERM held back, so a Ctrl-C cannot land between the steps
/// that publish a build's artifacts (it is delivered, and acted on, right after).
pub fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigset_t is initialised by sigemptyset; sigprocmask only changes our mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        let r = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        r
    }
}

/// Write `data` to `dest` atomically (temp name, 0600, rename).
pub fn write_atomic(dest: &Path, data: &[u8]) -> Result<()> {
    let f = AtomicFile::create(dest)?;
    f.file()
        .write_all(data)
        .with_context(|| format!("writing {}", dest.display()))?;
    f.commit()
}

/// A `Read` adapter that hashes what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
        }
    }
    pub fn finish(self) -> [u8; 32] {
        self.hasher.finalize().into()
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// SHA-256 of a reader's whole content.
pub fn sha256_reader(r: impl Read) -> Result<String> {
    let mut h = HashingReader::new(r);
    io::copy(&mut h, &mut io::sink()).context("reading data to hash")?;
    Ok(hex::encode(h.finish()))
}

pub fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// `123.4 MiB`-style sizes for humans.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's
/// days-to-civil algorithm over 400-year eras).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Deterministic pseudo-random bytes (xorshift64) for unit tests: incompressible, and
/// the same on every run.
#[cfg(test)]
pub(crate) fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_file_commits_or_vanishes() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.raw");
        {
            let f = AtomicFile::create(&dest).unwrap();
            f.file().write_all(b"partial").unwrap();
            // dropped without commit
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let f = AtomicFile::create(&dest).unwrap();
        f.file().write_all(b"whole").unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"whole");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        // 2000-02-29 (a leap day in a century year divisible by 400) is day 11016.
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn sizes() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(round_up(1, 4096), 4096);
        assert_eq!(round_up(8192, 4096), 8192);
    }
}
