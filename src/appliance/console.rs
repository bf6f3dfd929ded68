//! Writing to every console the operator might be watching.
//!
//! With `console=tty0 console=ttyS0,115200` the kernel logs to both, but `/dev/console`
//! is only the last one named; an operator looking at the VGA console of a hypervisor
//! and a test reading the serial port must both see the init's lines, so it opens the
//! serial port and the VGA console separately and writes each line to all of them.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Consoles written separately when they can be opened, in this order.
const CONSOLE_DEVICES: &[&str] = &["/dev/ttyS0", "/dev/tty0"];
/// Used only when none of the above opens.
const FALLBACK_CONSOLE: &str = "/dev/console";

/// A set of open console devices; every line goes to each of them.
pub struct Consoles {
    outputs: Mutex<Vec<(PathBuf, File)>>,
}

impl Consoles {
    /// Open every console in [`CONSOLE_DEVICES`] that exists and opens, else `/dev/console`.
    pub fn open_default() -> Self {
        let mut outputs: Vec<(PathBuf, File)> = CONSOLE_DEVICES
            .iter()
            .filter_map(|p| open_console(Path::new(p)).map(|f| (PathBuf::from(p), f)))
            .collect();
        if outputs.is_empty() {
            if let Some(f) = open_console(Path::new(FALLBACK_CONSOLE)) {
                outputs.push((PathBuf::from(FALLBACK_CONSOLE), f));
            }
        }
        Consoles {
            outputs: Mutex::new(outputs),
        }
    }

    /// Consoles over explicit files (tests, or a host-side dry run).
    pub fn from_files(files: Vec<(PathBuf, File)>) -> Self {
        Consoles {
            outputs: Mutex::new(files),
        }
    }

    /// The device paths written to.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.lock().iter().map(|(p, _)| p.clone()).collect()
    }

    /// Write one line to every console. Errors are ignored: PID 1 has nowhere else to
    /// report them, and a console that went away must not stop the appliance.
    pub fn line(&self, text: &str) {
        let mut buf = String::with_capacity(text.len() + 1);
        buf.push_str(text);
        buf.push('\n');
        for (_, f) in self.lock().iter_mut() {
            let _ = f.write_all(buf.as_bytes());
            let _ = f.flush();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(PathBuf, File)>> {
        // A panic while holding the lock must not silence the consoles.
        self.outputs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Open a console for writing. `O_NOCTTY` so PID 1 never acquires a controlling terminal
/// (a hangup on it would otherwise send us SIGHUP). A serial port without hardware fails
/// to open (EIO), which simply leaves it out.
fn open_console(path: &Path) -> Option<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_reaches_every_console() {
        let dir = tempfile::TempDir::new().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let consoles = Consoles::from_files(vec![
            (a.clone(), File::create(&a).unwrap()),
            (b.clone(), File::create(&b).unwrap()),
        ]);
        consoles.line("hello");
        consoles.line("MKAPPLIANCE-READY x=1");
        for p in [&a, &b] {
            assert_eq!(
                std::fs::read_to_string(p).unwrap(),
                "hello\nMKAPPLIANCE-READY x=1\n"
            );
        }
        assert_eq!(consoles.paths(), vec![a, b]);
    }
}
