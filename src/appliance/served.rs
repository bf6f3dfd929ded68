//! The tree the services serve: an unpacked rootfs directory (inside the appliance, or
//! `serve --root`) or a built image read directly (`serve --image`, no root, no mount).
//!
//! Either way a file comes back as a [`ServedFile`]: an open file plus where the served
//! bytes lie in it, so TFTP can `pread` and HTTP can `sendfile` without copying through
//! user space. Image files are mapped once at startup (the image is read-only).

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::config::ApplianceConfig;
use crate::disk::{gpt, rootfs};
use crate::layout;

/// Longest request path we consider (TFTP names and HTTP paths).
pub const MAX_PATH: usize = 1024;
/// Directories whose files an image tree indexes (all the services ever read).
const IMAGE_INDEXED: &[&str] = &["srv/"];
/// Chunk for writing zeros where an image file has a hole.
const ZEROS: [u8; 4096] = [0; 4096];

/// Why a requested path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `..`, a NUL, or too long: an attempt to leave the tree.
    Traversal,
    Empty,
}

/// Normalize a request path relative to a served root: `\` counts as `/` (some PXE
/// clients send DOS paths), empty and `.` components go away, and any `..`, NUL or
/// control character refuses the whole request rather than being resolved.
pub fn clean_path(raw: &str) -> Result<String, PathError> {
    if raw.len() > MAX_PATH || raw.chars().any(|c| c == '\0' || c.is_control()) {
        return Err(PathError::Traversal);
    }
    let mut parts = Vec::new();
    for part in raw.split(['/', '\\']) {
        match part {
            "" | "." => {}
            ".." => return Err(PathError::Traversal),
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err(PathError::Empty);
    }
    Ok(parts.join("/"))
}

enum Source {
    /// A rootfs directory, opened as a directory fd all lookups stay beneath.
    Dir { root: PathBuf, dir: File },
    /// An image: the file and the extents of every file under [`IMAGE_INDEXED`].
    Image {
        path: PathBuf,
        file: Arc<File>,
        files: HashMap<String, Arc<rootfs::FileMap>>,
    },
}

/// The served tree and the appliance config read from it.
pub struct ServedTree {
    source: Source,
    config: ApplianceConfig,
}

/// One file to serve: read it with [`ServedFile::read_at`] or send it to a socket with
/// [`ServedFile::send_to`].
pub struct ServedFile {
    file: Arc<File>,
    len: u64,
    /// `None`: file offset = served offset (a plain file).
    map: Option<Arc<rootfs::FileMap>>,
}

impl ServedTree {
    /// Serve an unpacked rootfs at `root` (it holds `srv/` and `etc/appliance/`).
    pub fn open_dir(root: &Path) -> Result<ServedTree> {
        let dir = File::open(root).with_context(|| format!("opening {}", root.display()))?;
        if !dir.metadata()?.is_dir() {
            bail!("{} is not a directory", root.display());
        }
        let toml_path = root.join(layout::APPLIANCE_TOML);
        let toml = std::fs::read_to_string(&toml_path).with_context(|| {
            format!(
                "reading {}: is this an appliance rootfs?",
                toml_path.display()
            )
        })?;
        let config = ApplianceConfig::from_toml(&toml)?;
        Ok(ServedTree {
            source: Source::Dir {
                root: root.to_path_buf(),
                dir,
            },
            config,
        })
    }

    /// Serve straight out of a built image: find the root partition by its GPT type and
    /// map every file under `srv/`.
    pub fn open_image(image: &Path) -> Result<ServedTree> {
        let file = File::open(image).with_context(|| format!("opening {}", image.display()))?;
        let table =
            gpt::read(&file).with_context(|| format!("{} is not a GPT disk", image.display()))?;
        let root_type = gpt::Guid::parse(layout::ROOT_TYPE_GUID)?;
        let part = table
            .partitions
            .iter()
            .find(|p| p.type_guid == root_type)
            .with_context(|| format!("{} has no appliance root partition", image.display()))?;
        let ext = rootfs::Ext4Image::open(file.try_clone()?, part.offset(), part.size())
            .context("reading the image's rootfs")?;
        let toml = ext
            .read(layout::APPLIANCE_TOML)
            .with_context(|| format!("reading /{} from the image", layout::APPLIANCE_TOML))?;
        let config = ApplianceConfig::from_toml(&String::from_utf8_lossy(&toml))?;
        let mut files = HashMap::new();
        for (path, is_dir, _) in ext.list()? {
            if is_dir || !IMAGE_INDEXED.iter().any(|p| path.starts_with(p)) {
                continue;
            }
            // Symlinks and other non-regular files are simply not served.
            if let Ok(map) = ext.file_map(&path) {
                files.insert(path, Arc::new(map));
            }
        }
        Ok(ServedTree {
            source: Source::Image {
                path: image.to_path_buf(),
                file: Arc::new(file),
                files,
            },
            config,
        })
    }

    pub fn config(&self) -> &ApplianceConfig {
        &self.config
    }

    /// `--root DIR` or `--image FILE`, for messages.
    pub fn describe(&self) -> String {
        match &self.source {
            Source::Dir { root, .. } => format!("directory {}", root.display()),
            Source::Image { path, .. } => format!("image {}", path.display()),
        }
    }

    /// The rootfs directory when serving one (its `var/` holds state and logs).
    pub fn root_dir(&self) -> Option<&Path> {
        match &self.source {
            Source::Dir { root, .. } => Some(root),
            Source::Image { .. } => None,
        }
    }

    /// Open the regular file at `rel` (a [`clean_path`] result, relative to the rootfs).
    /// `Ok(None)` when it does not exist or is not a regular file.
    pub fn open(&self, rel: &str) -> io::Result<Option<ServedFile>> {
        match &self.source {
            Source::Image { file, files, .. } => Ok(files.get(rel).map(|m| ServedFile {
                file: file.clone(),
                len: m.size,
                map: Some(m.clone()),
            })),
            Source::Dir { dir, .. } => {
                let Some(f) = open_beneath(dir, rel)? else {
                    return Ok(None);
                };
                let meta = f.metadata()?;
                if !meta.is_file() {
                    return Ok(None);
                }
                Ok(Some(ServedFile {
                    file: Arc::new(f),
                    len: meta.len(),
                    map: None,
                }))
            }
        }
    }

    /// The whole content of a small file (configs, scripts).
    pub fn read_small(&self, rel: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let Some(f) = self.open(rel).with_context(|| format!("opening /{rel}"))? else {
            return Ok(None);
        };
        if f.len() > limit {
            bail!("/{rel} is larger than {limit} bytes");
        }
        let mut buf = vec![0u8; f.len() as usize];
        let n = f
            .read_at(0, &mut buf)
            .with_context(|| format!("reading /{rel}"))?;
        buf.truncate(n);
        Ok(Some(buf))
    }
}

/// `openat2(dir, rel, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`: the kernel refuses any
/// resolution (`..`, absolute symlinks) that would leave `dir`. On kernels before 5.6,
/// falls back to checking the canonical path.
fn open_beneath(dir: &File, rel: &str) -> io::Result<Option<File>> {
    let c = CString::new(rel).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: open_how is plain old data; all-zero is valid (mode 0, no flags).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid dirfd, NUL-terminated path and an open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd >= 0 {
        // SAFETY: a fresh descriptor we now own.
        return Ok(Some(unsafe { File::from_raw_fd(fd as i32) }));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOENT | libc::ENOTDIR | libc::EXDEV | libc::ELOOP) => Ok(None),
        Some(libc::ENOSYS) => open_checked(dir, rel),
        _ => Err(err),
    }
}

fn open_checked(dir: &File, rel: &str) -> io::Result<Option<File>> {
    let root = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd()))?;
    let target = match root.join(rel).canonicalize() {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !target
        .as_os_str()
        .as_bytes()
        .starts_with(root.as_os_str().as_bytes())
    {
        return Ok(None);
    }
    File::open(target).map(Some)
}

impl ServedFile {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fill `buf` from served offset `pos`; returns the bytes read (short only at the end).
    pub fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        let want = (buf.len() as u64).min(self.len.saturating_sub(pos)) as usize;
        let mut done = 0;
        while done < want {
            let at = pos + done as u64;
            let (src, run) = self.locate(at, (want - done) as u64);
            let chunk = &mut buf[done..done + run as usize];
            match src {
                None => chunk.fill(0),
                Some(off) => {
                    let n = self.file.read_at(chunk, off)?;
                    if n == 0 {
                        return Ok(done); // the file shrank under us
                    }
                    done += n;
                    continue;
                }
            }
            done += run as usize;
        }
        Ok(done)
    }

    /// Where served byte `pos` is: `(Some(file offset) | None for zeros, run length)`,
    /// the run being at most `max` bytes.
    fn locate(&self, pos: u64, max: u64) -> (Option<u64>, u64) {
        let Some(map) = &self.map else {
            return (Some(pos), max);
        };
        let i = map.extents.partition_point(|e| e.logical + e.len <= pos);
        match map.extents.get(i) {
            Some(e) if e.logical <= pos => {
                let run = (e.logical + e.len - pos).min(max);
                let off = (!e.unwritten).then_some(e.physical + pos - e.logical);
                (off, run)
            }
            Some(e) => (None, (e.logical - pos).min(max)),
            None => (None, max),
        }
    }

    /// Send `len` bytes from served offset `pos` to a (blocking) socket with `sendfile`.
    /// Returns the bytes sent, which is `len` unless the file shrank or an error (the
    /// second value) stopped the send: the bytes before it went all the same.
    pub fn send_to(&self, sock: &impl AsRawFd, pos: u64, len: u64) -> (u64, io::Result<()>) {
        let end = pos.saturating_add(len).min(self.len);
        let mut at = pos;
        while at < end {
            let (src, run) = self.locate(at, end - at);
            let sent = match src {
                Some(off) => sendfile(sock, &self.file, off, run),
                None => {
                    let n = (run as usize).min(ZEROS.len());
                    write_fd(sock, &ZEROS[..n])
                }
            };
            match sent {
                Ok(0) => break,
                Ok(n) => at += n as u64,
                Err(e) => return (at - pos, Err(e)),
            }
        }
        (at - pos, Ok(()))
    }
}

fn sendfile(sock: &impl AsRawFd, file: &File, off: u64, len: u64) -> io::Result<usize> {
    // The kernel moves at most ~2 GiB per call.
    let count = len.min(1 << 30) as usize;
    let mut offset = off as libc::off_t;
    loop {
        // SAFETY: valid fds; `offset` is updated by the kernel.
        let n = unsafe { libc::sendfile(sock.as_raw_fd(), file.as_raw_fd(), &mut offset, count) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn write_fd(sock: &impl AsRawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::write(sock.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(clean_path("/ipxe.efi"), Ok("ipxe.efi".into()));
        assert_eq!(
            clean_path("talos//v1/./vmlinuz"),
            Ok("talos/v1/vmlinuz".into())
        );
        assert_eq!(clean_path("\\boot\\x.efi"), Ok("boot/x.efi".into()));
        for bad in [
            "../etc/passwd",
            "/a/../../b",
            "a/..",
            "..\\x",
            "a\0b",
            "a\nb",
        ] {
            assert_eq!(clean_path(bad), Err(PathError::Traversal), "{bad:?}");
        }
        assert_eq!(clean_path("/"), Err(PathError::Empty));
        assert_eq!(clean_path(&"a/".repeat(600)), Err(PathError::Traversal));
        // Dots inside names are fine.
        assert_eq!(clean_path("a..b/.x"), Ok("a..b/.x".into()));
    }

    fn mapped(extents: Vec<rootfs::FileExtent>, len: u64, file: File) -> ServedFile {
        ServedFile {
            file: Arc::new(file),
            len,
            map: Some(Arc::new(rootfs::FileMap { size: len, extents })),
        }
    }

    #[test]
    fn reads_through_extents_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let data: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let e = |logical, physical, len, unwritten| rootfs::FileExtent {
            logical,
            physical,
            len,
            unwritten,
        };
        // Served bytes: [0,10) ← image[100,110); [10,20) hole; [20,30) unwritten; [30,40) ← image[0,10).
        let f = mapped(
            vec![
                e(0, 100, 10, false),
                e(20, 50, 10, true),
                e(30, 0, 10, false),
            ],
            45,
            File::open(&p).unwrap(),
        );
        let mut buf = [0xAAu8; 50];
        assert_eq!(f.read_at(0, &mut buf).unwrap(), 45);
        let mut want = Vec::new();
        want.extend(100u8..110);
        want.extend([0u8; 20]);
        want.extend(0u8..10);
        want.extend([0u8; 5]);
        assert_eq!(&buf[..45], &want[..]);
        let mut small = [0u8; 4];
        assert_eq!(f.read_at(8, &mut small).unwrap(), 4);
        assert_eq!(small, [108, 109, 0, 0]);
        assert_eq!(f.read_at(45, &mut small).unwrap(), 0);
    }
}
