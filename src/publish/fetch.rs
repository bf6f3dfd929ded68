//! Verified, resumable downloads of the build's inputs: the Talos ISO and iPXE.
//!
//! A download goes to a hidden `.NAME.part` beside its destination and is renamed into
//! place only once its digest matches. An interrupted transfer keeps the `.part`, and the
//! next attempt (in the same run, or a later one) asks for the rest with an HTTP Range
//! request. A checksum mismatch deletes the `.part` and fails.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256, Sha512};

use crate::cmdline::{DownloadArgs, FetchIpxeArgs, FetchTalosArgs};
use crate::{config, util};

pub const TALOS_RELEASES: &str = "https://github.com/siderolabs/talos/releases/download";
pub const IMAGE_FACTORY: &str = "https://factory.talos.dev/image";
pub const TALOS_ISO: &str = "metal-amd64.iso";
pub const TALOS_SUMS: &str = "sha512sum.txt";
pub const IPXE_FILES: &[&str] = &["ipxe.efi", "undionly.kpxe"];
const USER_AGENT: &str = concat!("mkappliance/", env!("CARGO_PKG_VERSION"));
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A transfer that sends nothing for this long counts as interrupted.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Checksum files are small; anything bigger is not one.
const MAX_SUMS_BYTES: u64 = 1 << 20;
const CHUNK: usize = 256 << 10;
/// Wait before retry n: BACKOFF * 2^(n-1).
const BACKOFF: Duration = Duration::from_millis(500);

/// Digests a download must match (either, both or none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expected {
    pub sha256: Option<String>,
    pub sha512: Option<String>,
    /// Where the expected digests came from, for messages.
    pub source: String,
}

impl Expected {
    fn is_empty(&self) -> bool {
        self.sha256.is_none() && self.sha512.is_none()
    }

    fn check(&self, got: &Digests) -> std::result::Result<(), String> {
        if let Some(w) = &self.sha512 {
            if *w != got.sha512 {
                return Err(format!(
                    "sha512 is {} but {} says {w}",
                    got.sha512, self.source
                ));
            }
        }
        if let Some(w) = &self.sha256 {
            if *w != got.sha256 {
                return Err(format!(
                    "sha256 is {} but {} says {w}",
                    got.sha256, self.source
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    pub sha256: String,
    pub sha512: String,
    pub size: u64,
}

fn parse_hex(what: &str, v: &str, bytes: usize) -> Result<String> {
    let v = v.trim().to_ascii_lowercase();
    if v.len() != bytes * 2 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{what} {v:?} is not {} hex digits", bytes * 2);
    }
    Ok(v)
}

/// The digest for `name` in a coreutils-format checksum file (`HEX  NAME` or `HEX *NAME`).
pub fn find_in_sums(text: &str, name: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (hex, rest) = l.trim_end().split_once(' ')?;
        let file = rest.strip_prefix(' ').or_else(|| rest.strip_prefix('*'))?;
        let file = file.strip_prefix("./").unwrap_or(file);
        (file == name && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| hex.to_ascii_lowercase())
    })
}

/// An HTTP agent: redirects followed (GitHub sends release assets elsewhere), status codes
/// handled by us, TLS by rustls with the system's roots.
pub fn agent() -> ureq::Agent {
    use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
    let roots: Vec<Certificate<'static>> = rustls_native_certs::load_native_certs()
        .certs
        .iter()
        .map(|c| Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .root_certs(RootCerts::new_with_certs(&roots))
        .build();
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .user_agent(USER_AGENT)
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_recv_response(Some(READ_TIMEOUT))
        .timeout_per_read(Some(READ_TIMEOUT))
        .tls_config(tls)
        .build()
        .into()
}

/// GET a small text file (a checksum list).
pub fn get_text(agent: &ureq::Agent, url: &str) -> Result<String> {
    let mut resp = agent
        .get(url)
        .call()
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status().as_u16();
    if status != 200 {
        bail!("GET {url}: HTTP {status}");
    }
    resp.body_mut()
        .with_config()
        .limit(MAX_SUMS_BYTES)
        .read_to_string()
        .with_context(|| format!("reading {url}"))
}

/// Why one attempt stopped.
enum Attempt {
    /// Worth another try (connection lost, 5xx); the `.part` keeps what arrived.
    Retry(anyhow::Error),
    /// Not worth one (4xx, local I/O).
    Fatal(anyhow::Error),
}

fn part_path(dest: &Path) -> Result<PathBuf> {
    let name = dest
        .file_name()
        .with_context(|| format!("{} has no file name", dest.display()))?;
    Ok(dest.with_file_name(format!(".{}.part", name.to_string_lossy())))
}

/// Beside a `.part`: what the server called the version it holds the start of (a strong
/// ETag or its Last-Modified), sent as `If-Range` on resume so that a file changed on
/// the server since is fetched whole instead of appended to the old start.
fn validator_path(part: &Path) -> PathBuf {
    let mut p = part.as_os_str().to_owned();
    p.push(".validator");
    PathBuf::from(p)
}

/// Remove a `.part` and its validator.
fn remove_part(part: &Path) -> io::Result<()> {
    let _ = std::fs::remove_file(validator_path(part));
    match std::fs::remove_file(part) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Hash a file's current content.
fn digests_of(path: &Path) -> Result<(Sha256, Sha512, u64)> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let (mut h256, mut h512, mut n) = (Sha256::new(), Sha512::new(), 0u64);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let k = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        h256.update(&buf[..k]);
        h512.update(&buf[..k]);
        n += k as u64;
    }
    Ok((h256, h512, n))
}

fn finish(h256: Sha256, h512: Sha512, size: u64) -> Digests {
    Digests {
        sha256: hex::encode(h256.finalize()),
        sha512: hex::encode(h512.finalize()),
        size,
    }
}

/// `bytes START-END/TOTAL` → (START, TOTAL).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()))
}

/// One GET into the `.part`, resuming from its current length.
fn attempt(
    agent: &ureq::Agent,
    url: &str,
    part: &Path,
    bar: &indicatif::ProgressBar,
) -> std::result::Result<(), Attempt> {
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut req = agent.get(url);
    if have > 0 {
        req = req.header("Range", format!("bytes={have}-"));
        if let Ok(v) = std::fs::read_to_string(validator_path(part)) {
            req = req.header("If-Range", v.trim());
        }
    }
    let resp = req.call().map_err(|e| {
        // A redirect loop or a broken redirect is the same on every try.
        let permanent = matches!(
            e,
            ureq::Error::TooManyRedirects | ureq::Error::RedirectFailed
        );
        let e = anyhow::Error::new(e).context(format!("GET {url}"));
        if permanent {
            Attempt::Fatal(e)
        } else {
            Attempt::Retry(e)
        }
    })?;
    let status = resp.status().as_u16();
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (start, total) = match status {
        200 => (0, resp.body().content_length()),
        206 => match header("content-range")
            .as_deref()
            .and_then(parse_content_range)
        {
            Some((s, total)) if s == have => (have, total),
            _ => {
                // A range we didn't ask for: start over rather than guess.
                let _ = remove_part(part);
                return Err(Attempt::Retry(anyhow::anyhow!(
                    "GET {url}: the server answered the Range request with {:?}",
                    header("content-range")
                )));
            }
        },
        416 if have > 0 => {
            // Complete only if the file is exactly as long as the .part; a longer .part
            // (left by another file) would otherwise be installed, unchecked when nothing
            // pins a digest. Start over from an empty .part.
            let total = header("content-range")
                .as_deref()
                .and_then(|v| v.trim().strip_prefix("bytes */"))
                .and_then(|t| t.trim().parse::<u64>().ok());
            if total == Some(have) {
                return Ok(());
            }
            drop(resp);
            remove_part(part).map_err(|e| {
                Attempt::Fatal(anyhow::Error::new(e).context(format!(
                    "removing {}, which is longer than {url}",
                    part.display()
                )))
            })?;
            return attempt(agent, url, part, bar);
        }
        500..=599 | 408 | 429 => {
            return Err(Attempt::Retry(anyhow::anyhow!("GET {url}: HTTP {status}")))
        }
        _ => return Err(Attempt::Fatal(anyhow::anyhow!("GET {url}: HTTP {status}"))),
    };
    // An error or login page sent with 200 (a captive portal, a moved asset) is never
    // the file; refuse it even when no digest is there to catch it.
    if let Some(ct) = header("content-type").filter(|c| {
        c.trim_start()
            .get(..9)
            .is_some_and(|t| t.eq_ignore_ascii_case("text/html"))
    }) {
        return Err(Attempt::Fatal(anyhow::anyhow!(
            "GET {url}: the server sent a web page (Content-Type: {ct}), not the file"
        )));
    }
    let fatal = |e: io::Error, what: &str| {
        Attempt::Fatal(anyhow::Error::new(e).context(format!("{what} {}", part.display())))
    };
    if start == 0 {
        // A weak ETag cannot go in If-Range (RFC 9110 13.1.5); a date can.
        let validator = header("etag")
            .filter(|e| !e.starts_with("W/"))
            .or_else(|| header("last-modified"));
        let path = validator_path(part);
        match validator {
            Some(v) => {
                std::fs::write(&path, v).map_err(|e| fatal(e, "writing the validator of"))?
            }
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(part)
        .map_err(|e| fatal(e, "opening"))?;
    f.set_len(start).map_err(|e| fatal(e, "truncating"))?;
    f.seek(SeekFrom::Start(start))
        .map_err(|e| fatal(e, "seeking in"))?;
    bar.set_length(total.map_or(0, |t| if status == 206 { t } else { t + start }));
    bar.set_position(start);
    let mut body = resp.into_body().into_reader();
    let mut buf = vec![0u8; CHUNK];
    let mut got = start;
    loop {
        let k = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = f.flush();
                return Err(Attempt::Retry(anyhow::Error::new(e).context(format!(
                    "GET {url}: the transfer was interrupted after {}",
                    util::human_size(got)
                ))));
            }
        };
        f.write_all(&buf[..k]).map_err(|e| fatal(e, "writing"))?;
        got += k as u64;
        bar.set_position(got);
    }
    if let Some(t) = total {
        let want = if status == 206 { t } else { t + start };
        if got < want {
            return Err(Attempt::Retry(anyhow::anyhow!(
                "GET {url}: the transfer stopped after {got} of {want} bytes"
            )));
        }
    }
    Ok(())
}

/// Download `url` to `dest`, verified against `expected` (when it says anything), resuming
/// an earlier `.part`. Returns the digests of what was installed.
pub fn download(
    agent: &ureq::Agent,
    url: &str,
    dest: &Path,
    expected: &Expected,
    opts: &DownloadArgs,
) -> Result<Digests> {
    let part = part_path(dest)?;
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating directory {}", dir.display()))?;
    }
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned());
    let bar = super::bytes_bar(0, name.as_deref().unwrap_or("download"), opts.quiet);
    let mut tries = 0;
    loop {
        match attempt(agent, url, &part, &bar) {
            Ok(()) => break,
            Err(Attempt::Fatal(e)) => {
                bar.abandon();
                return Err(e);
            }
            Err(Attempt::Retry(e)) => {
                if tries >= opts.retries {
                    bar.abandon();
                    let kept = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
                    if kept > 0 {
                        return Err(e.context(format!(
                            "kept the {} received in {}: run again to resume",
                            util::human_size(kept),
                            part.display()
                        )));
                    }
                    return Err(e);
                }
                tries += 1;
                bar.println(format!("{e:#}; retrying ({tries}/{})", opts.retries));
                std::thread::sleep(BACKOFF * 2u32.pow(tries - 1));
            }
        }
    }
    bar.finish_and_clear();
    let (h256, h512, size) = digests_of(&part)?;
    let got = finish(h256, h512, size);
    if let Err(why) = expected.check(&got) {
        let _ = remove_part(&part);
        bail!("checksum mismatch for {url}: {why}; deleted the download");
    }
    std::fs::rename(&part, dest)
        .with_context(|| format!("renaming {} to {}", part.display(), dest.display()))?;
    let _ = std::fs::remove_file(validator_path(&part));
    Ok(got)
}

/// The existing `dest` if it matches `expected` (which must say something).
fn already_there(dest: &Path, expected: &Expected) -> Result<Option<Digests>> {
    if expected.is_empty() || !dest.is_file() {
        return Ok(None);
    }
    let (h256, h512, size) = digests_of(dest)?;
    let got = finish(h256, h512, size);
    Ok(expected.check(&got).is_ok().then_some(got))
}

fn base(url: &str) -> &str {
    url.trim_end_matches('/')
}

/// `mkappliance fetch talos VERSION`.
pub fn fetch_talos(args: &FetchTalosArgs) -> Result<Digests> {
    config::check_talos_version(&args.version)?;
    let dest_dir = args
        .out_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("artifacts/talos/{}", args.version)));
    let dest = dest_dir.join(TALOS_ISO);
    let mut expected = Expected {
        sha256: args
            .sha256
            .as_deref()
            .map(|v| parse_hex("--sha256", v, 32))
            .transpose()?,
        sha512: args
            .sha512
            .as_deref()
            .map(|v| parse_hex("--sha512", v, 64))
            .transpose()?,
        source: "the command line".into(),
    };
    let agent = agent();
    let url = match &args.schematic {
        Some(s) => {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric()) {
                bail!("--schematic {s:?} is not an Image Factory schematic ID");
            }
            let b = args.base_url.as_deref().unwrap_or(IMAGE_FACTORY);
            format!("{}/{s}/{}/{TALOS_ISO}", base(b), args.version)
        }
        None => {
            let b = base(args.base_url.as_deref().unwrap_or(TALOS_RELEASES));
            let sums_url = format!("{b}/{}/{TALOS_SUMS}", args.version);
            let text = get_text(&agent, &sums_url)?;
            let want = find_in_sums(&text, TALOS_ISO).with_context(|| {
                format!(
                    "{sums_url} lists no {TALOS_ISO}: is {} a Talos release?",
                    args.version
                )
            })?;
            let want = parse_hex(&format!("the sha512 in {sums_url}"), &want, 64)?;
            if let Some(pinned) = &expected.sha512 {
                if *pinned != want {
                    bail!("--sha512 {pinned} disagrees with {sums_url} ({want})");
                }
            }
            expected.sha512 = Some(want);
            expected.source = sums_url;
            format!("{b}/{}/{TALOS_ISO}", args.version)
        }
    };
    if !args.download.force {
        if let Some(d) = already_there(&dest, &expected)? {
            if !args.download.quiet {
                println!("{} is already there and verified", dest.display());
            }
            return Ok(d);
        }
    }
    let d = download(&agent, &url, &dest, &expected, &args.download)?;
    if !args.download.quiet {
        println!("Fetched {url}");
        println!(
            "  into      {} ({})",
            dest.display(),
            util::human_size(d.size)
        );
        if expected.is_empty() {
            println!("  sha256    {}", d.sha256);
            println!("  sha512    {}", d.sha512);
            println!(
                "  not verified: the Image Factory publishes no checksums; pin this ISO with --sha256 {}",
                d.sha256
            );
        } else {
            println!("  verified  against {}", expected.source);
        }
    }
    Ok(d)
}

/// Where `fetch ipxe` puts its files.
pub fn ipxe_cache_dir() -> Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("mkappliance/ipxe"));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .context("neither XDG_CACHE_HOME nor HOME is set: pass --dir")?;
    Ok(PathBuf::from(home).join(".cache/mkappliance/ipxe"))
}

/// `mkappliance fetch ipxe`: only when the distribution has none (or with --force).
pub fn fetch_ipxe(args: &FetchIpxeArgs) -> Result<Vec<PathBuf>> {
    if !args.download.force {
        if let Some(p) = crate::builder::IPXE_SEARCH
            .iter()
            .map(Path::new)
            .find(|p| p.is_file())
        {
            if !args.download.quiet {
                println!(
                    "{} is installed (your distribution's iPXE), and `build` uses it: nothing to fetch (--force fetches anyway)",
                    p.display()
                );
            }
            return Ok(vec![]);
        }
    }
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => ipxe_cache_dir()?,
    };
    let agent = agent();
    let mut out = Vec::new();
    for (i, name) in IPXE_FILES.iter().enumerate() {
        let url = format!("{}/{name}", base(&args.base_url));
        let expected = Expected {
            sha256: match (i, &args.sha256) {
                (0, Some(v)) => Some(parse_hex("--sha256", v, 32)?),
                _ => None,
            },
            sha512: None,
            source: "--sha256".into(),
        };
        let dest = dir.join(name);
        let d = download(&agent, &url, &dest, &expected, &args.download)?;
        if !args.download.quiet {
            println!(
                "{} ({}) sha256 {}",
                dest.display(),
                util::human_size(d.size),
                d.sha256
            );
        }
        out.push(dest);
    }
    if !args.download.quiet {
        println!(
            "Build with: mkappliance build ... --ipxe {} --ipxe-bios {}",
            out[0].display(),
            out[1].display()
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_coreutils_checksum_lines() {
        let a = "a".repeat(128);
        let b = "B".repeat(128);
        let text = format!("{a}  initramfs-amd64.xz\n{b} *metal-amd64.iso\n");
        assert_eq!(
            find_in_sums(&text, "metal-amd64.iso"),
            Some("b".repeat(128))
        );
        assert_eq!(find_in_sums(&text, "initramfs-amd64.xz"), Some(a));
        assert_eq!(find_in_sums(&text, "metal-arm64.iso"), None);
        assert_eq!(find_in_sums("garbage", "metal-amd64.iso"), None);
    }

    #[test]
    fn content_ranges() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some((100, Some(200)))
        );
        assert_eq!(parse_content_range("bytes 0-9/*"), Some((0, None)));
        assert_eq!(parse_content_range("items 0-9/10"), None);
    }

    #[test]
    fn hex_pins_are_checked() {
        assert!(parse_hex("--sha256", &"0".repeat(64), 32).is_ok());
        assert!(parse_hex("--sha256", &"0".repeat(63), 32).is_err());
        assert!(parse_hex("--sha256", &"g".repeat(64), 32).is_err());
    }
}
