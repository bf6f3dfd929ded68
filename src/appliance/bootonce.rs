//! Boot-once: once the pinned node has received its whole machine config, its next
//! boots get a `boot.ipxe` that exits to the local disk, ending the reinstall loop.
//!
//! The state is one small file per node in the state directory (`/var/lib/appliance`
//! in the appliance), written atomically and synced so it survives restarts and power
//! cuts. It records the SHA-256 of the config the node fetched: serve a different config
//! (a new image) and the node installs again.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::appliance::events::rfc3339;
use crate::config::Mac;

#[derive(Debug, Serialize, Deserialize)]
struct State {
    mac: String,
    config_sha256: String,
    fetched_by: String,
    time: String,
}

/// The state file of `mac` in `dir`.
pub fn state_file(dir: &Path, mac: Mac) -> PathBuf {
    dir.join(format!(
        "boot-once-{}.json",
        mac.to_string().replace(':', "-")
    ))
}

/// Re-arm the PXE install for `mac`: forget that it fetched its config. Returns whether
/// there was anything to forget. (The appliance console's re-arm key calls this.)
pub fn rearm(dir: &Path, mac: Mac) -> Result<bool> {
    let path = state_file(dir, mac);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

pub struct BootOnce {
    dir: PathBuf,
    mac: Mac,
    config_sha256: String,
    enabled: bool,
    done: AtomicBool,
}

impl BootOnce {
    /// `enabled` is the image's boot-once policy (off with `build --pxe-every-boot`).
    pub fn open(dir: &Path, mac: Mac, config_sha256: String, enabled: bool) -> BootOnce {
        let done = std::fs::read(state_file(dir, mac))
            .ok()
            .and_then(|b| serde_json::from_slice::<State>(&b).ok())
            .is_some_and(|s| s.config_sha256 == config_sha256);
        BootOnce {
            dir: dir.to_path_buf(),
            mac,
            config_sha256,
            enabled,
            done: AtomicBool::new(done),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether the node's `boot.ipxe` is now the exit-to-disk script.
    pub fn armed(&self) -> bool {
        self.enabled && self.done.load(Ordering::SeqCst)
    }

    /// Forget that the node fetched its config, on disk and in the running server, so its
    /// next PXE boot installs again. Returns whether it was armed.
    pub fn rearm(&self) -> Result<bool> {
        let was = self.done.swap(false, Ordering::SeqCst);
        Ok(rearm(&self.dir, self.mac)? || was)
    }

    /// The node has its whole config: arm. Returns whether this armed it (false when it
    /// already was, or boot-once is off).
    pub fn arm(&self, by: IpAddr) -> Result<bool> {
        if !self.enabled || self.done.swap(true, Ordering::SeqCst) {
            return Ok(false);
        }
        let state = State {
            mac: self.mac.to_string(),
            config_sha256: self.config_sha256.clone(),
            fetched_by: by.to_string(),
            time: rfc3339(SystemTime::now()),
        };
        let written = write_synced(
            &state_file(&self.dir, self.mac),
            &serde_json::to_vec_pretty(&state)?,
        );
        if written.is_err() {
            // Not persisted: stay unarmed rather than pretend it survives a restart.
            self.done.store(false, Ordering::SeqCst);
        }
        written.map(|_| true)
    }
}

/// Write `data` to `dest` via a temporary file, fsync, rename, fsync the directory.
fn write_synced(dest: &Path, data: &[u8]) -> Result<()> {
    let dir = dest.parent().context("state file has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dest.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn arms_persists_and_rearms() {
        let dir = tempfile::tempdir().unwrap();
        let mac: Mac = "00:11:22:33:44:55".parse().unwrap();
        let ip = IpAddr::V4(Ipv4Addr::new(10, 10, 10, 100));
        let b = BootOnce::open(dir.path(), mac, "aa".into(), true);
        assert!(!b.armed());
        assert!(b.arm(ip).unwrap());
        assert!(b.armed());
        assert!(!b.arm(ip).unwrap(), "second arm is a no-op");
        assert!(dir.path().join("boot-once-00-11-22-33-44-55.json").exists());
        // A restart reads it back; a different config does not count.
        assert!(BootOnce::open(dir.path(), mac, "aa".into(), true).armed());
        assert!(!BootOnce::open(dir.path(), mac, "bb".into(), true).armed());
        // Off by policy: never armed, nothing written.
        assert!(!BootOnce::open(dir.path(), mac, "aa".into(), false).armed());
        assert!(rearm(dir.path(), mac).unwrap());
        assert!(!rearm(dir.path(), mac).unwrap());
        assert!(!BootOnce::open(dir.path(), mac, "aa".into(), true).armed());
    }

    #[test]
    fn live_rearm_clears_the_running_state_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mac: Mac = "00:11:22:33:44:55".parse().unwrap();
        let b = BootOnce::open(dir.path(), mac, "aa".into(), true);
        assert!(!b.rearm().unwrap(), "nothing to re-arm yet");
        b.arm(IpAddr::V4(Ipv4Addr::new(10, 10, 10, 100))).unwrap();
        assert!(b.rearm().unwrap());
        assert!(!b.armed());
        assert!(!dir.path().join("boot-once-00-11-22-33-44-55.json").exists());
        assert!(!BootOnce::open(dir.path(), mac, "aa".into(), true).armed());
    }

    #[test]
    fn unwritable_state_stays_unarmed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "").unwrap();
        let mac: Mac = "00:11:22:33:44:55".parse().unwrap();
        let b = BootOnce::open(&file, mac, "aa".into(), true);
        assert!(b.arm(IpAddr::V4(Ipv4Addr::LOCALHOST)).is_err());
        assert!(!b.armed());
    }
}
