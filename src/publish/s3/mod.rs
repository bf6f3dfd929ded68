//! Upload a directory of artifacts to an S3-compatible bucket, then read every object back.
//!
//! Built for stores that are not AWS (iDrive e2, MinIO, Ceph, Garage, R2): path-style
//! addressing, a custom endpoint and region, and checksums only where an operation requires
//! them (the SDK's default CRC headers on every upload are rejected by several of them).
//! Small files go up in one PUT; large ones as a multipart upload whose parts go in
//! parallel. A failed multipart upload is aborted, so no half-written object or orphaned
//! parts stay behind. Every object is then read back in parallel ranges and compared with
//! the file range by range (`verify`). Credentials are only ever read from the environment
//! and never printed.
//!
//! `transfer` puts one file (PUT or multipart), `verify` reads it back.

mod interrupt;
mod transfer;
mod verify;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::types::ServerSideEncryption;
use aws_sdk_s3::Client;
use serde::Serialize;

use super::{encrypt, sums};
use crate::cmdline::S3Args;
use crate::util;

pub const DEFAULT_REGION: &str = "us-east-1";
/// S3's limits: parts of at least 5 MiB (but the last), at most 10,000 of them.
const MIN_PART: u64 = 5 << 20;
const MAX_PARTS: u64 = 10_000;
/// First retry after this; the SDK doubles it (with jitter) on each further attempt.
const INITIAL_BACKOFF: Duration = Duration::from_millis(250);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Read granularity of file-backed request bodies.
const BODY_BUFFER: usize = 256 << 10;
/// Environment variables that carry credentials for the original helper script's store.
const ENV_ACCESS_KEY: &str = "IDRIVE_ACCESS_KEY";
const ENV_SECRET_KEY: &str = "IDRIVE_SECRET_KEY";
const NO_CREDENTIALS: &str = "no S3 credentials: set IDRIVE_ACCESS_KEY and IDRIVE_SECRET_KEY, \
    or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or pass --profile";

/// Server-side encryption requested with `--sse`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Sse {
    #[value(name = "AES256")]
    Aes256,
    #[value(name = "aws:kms")]
    Kms,
}

impl Sse {
    fn header(self) -> ServerSideEncryption {
        match self {
            Sse::Aes256 => ServerSideEncryption::Aes256,
            Sse::Kms => ServerSideEncryption::AwsKms,
        }
    }
}

/// One object put in the bucket (or, with `--dry-run`, that would be).
#[derive(Debug, Clone, Serialize)]
pub struct Uploaded {
    pub file: PathBuf,
    pub key: String,
    pub url: String,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// 0 for a single PUT.
    pub parts: u64,
    pub encrypted: bool,
    pub verified: bool,
}

pub struct RunOptions {
    pub dry_run: bool,
    /// No progress bars.
    pub quiet: bool,
    /// Print each object's URL and a total on stdout.
    pub print: bool,
}

/// The key prefix the original helper script used: `bootstrap/<version>/`.
pub fn default_prefix(bootstrap_version: &str) -> String {
    format!("bootstrap/{bootstrap_version}/")
}

fn normalize_prefix(p: &str) -> String {
    let p = p.trim_matches('/');
    if p.is_empty() {
        String::new()
    } else {
        format!("{p}/")
    }
}

/// `host[:port]` → `https://host[:port]`; a URL with a scheme is kept as it is.
pub fn normalize_endpoint(e: &str) -> String {
    let e = e.trim().trim_end_matches('/');
    if e.contains("://") {
        e.to_string()
    } else {
        format!("https://{e}")
    }
}

/// The endpoint requests go to: the flag (or IDRIVE_ENDPOINT), else the SDK's own
/// variables, else AWS itself (`None`).
fn endpoint_override(s3: &S3Args) -> Option<String> {
    s3.endpoint
        .as_deref()
        .filter(|e| !e.trim().is_empty())
        .map(normalize_endpoint)
}

fn display_endpoint(s3: &S3Args, region: &str) -> String {
    endpoint_override(s3)
        .or_else(|| {
            ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]
                .iter()
                .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
                .map(|e| normalize_endpoint(&e))
        })
        .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"))
}

/// Percent-encode a key for a URL, keeping `/`.
fn url_key(key: &str) -> String {
    let mut s = String::new();
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// Part size for a file: the requested one, grown so the file fits in 10,000 parts.
pub fn part_size_for(len: u64, requested: u64) -> u64 {
    let min_for_count = len.div_ceil(MAX_PARTS);
    requested.max(MIN_PART).max(min_for_count)
}

/// A local file to upload, with the key it goes to (relative to the prefix).
struct Item {
    path: PathBuf,
    rel: String,
    size: u64,
}

/// Every regular file under `dir`, recursively, sorted; hidden files and directories
/// (temporaries) skipped.
fn list_files(dir: &Path) -> Result<Vec<Item>> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<Item>) -> Result<()> {
        let rd = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
        for entry in rd {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let meta =
                std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
            if meta.is_dir() {
                walk(base, &path, out)?;
            } else if meta.is_file() {
                let rel = path
                    .strip_prefix(base)
                    .expect("walked from base")
                    .to_string_lossy()
                    .into_owned();
                out.push(Item {
                    path,
                    rel,
                    size: meta.len(),
                });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

/// Checksums are not secret and let a reader check what they decrypted: never encrypted.
fn is_checksum(rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    !sums::is_artifact(name) && !name.starts_with('.')
}

/// `SdkError` → one readable line: the store's code and message, or the transport failure.
fn describe<E>(e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match e {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let err = se.err();
            match (err.code(), err.message()) {
                (Some(c), Some(m)) => format!("{c}: {m} (HTTP {status})"),
                (Some(c), None) => format!("{c} (HTTP {status})"),
                _ => format!("HTTP {status}: {}", error_chain(e)),
            }
        }
        other => error_chain(other),
    }
}

/// An error and its sources, `: `-joined, each said once (SDK errors repeat their source).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let t = err.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// A 200 response whose body the SDK could not parse and that names no error code.
fn is_unparsed_success<E>(e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> bool
where
    E: ProvideErrorMetadata,
{
    matches!(e, SdkError::ServiceError(se)
        if se.raw().status().as_u16() == 200 && se.err().code().is_none())
}

/// The checks of the upload options that need neither files nor the network: the bucket
/// and the age recipients. `build --upload` runs them before building, so a missing
/// bucket fails in a moment instead of after the build.
pub fn check_args(s3: &S3Args) -> Result<(String, Option<encrypt::Recipients>)> {
    let bucket = s3
        .bucket
        .clone()
        .filter(|b| !b.trim().is_empty())
        .context("no bucket to upload to: pass --bucket or set IDRIVE_BUCKET")?;
    if s3.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if s3.part_size_mib << 20 < MIN_PART {
        bail!("--part-size-mib must be at least 5 (S3's smallest part)");
    }
    let recipients = if s3.encrypt_to.is_empty() {
        None
    } else {
        Some(encrypt::parse_recipients(&s3.encrypt_to)?)
    };
    Ok((bucket, recipients))
}

/// Upload every file of `dir` under `prefix`, verify, print the URLs.
pub fn upload_dir(
    dir: &Path,
    s3: &S3Args,
    prefix: &str,
    run: &RunOptions,
) -> Result<Vec<Uploaded>> {
    let (bucket, recipients) = check_args(s3)?;
    let prefix = normalize_prefix(prefix);
    let items = list_files(dir)?;
    if items.is_empty() {
        bail!("nothing to upload: {} has no files", dir.display());
    }
    let region_hint = s3.region.clone().unwrap_or_else(|| {
        std::env::var("AWS_REGION")
            .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|_| DEFAULT_REGION.to_string())
    });
    let endpoint = display_endpoint(s3, &region_hint);
    let url_of = |key: &str| format!("{endpoint}/{bucket}/{}", url_key(key));
    let part_bytes = s3.part_size_mib << 20;

    // What goes where: the same plan for --dry-run and the real thing.
    let plan: Vec<(Item, String, bool)> = items
        .into_iter()
        .map(|it| {
            let encrypted = recipients.is_some() && !is_checksum(&it.rel);
            let key = if encrypted {
                format!("{prefix}{}.{}", it.rel, encrypt::EXTENSION)
            } else {
                format!("{prefix}{}", it.rel)
            };
            (it, key, encrypted)
        })
        .collect();
    eprintln!("{}", super::SECRETS_NOTE);
    if run.dry_run {
        // The plan is the output, but stdout belongs to the JSON when there is JSON.
        let say = |line: String| {
            if run.print {
                println!("{line}");
            } else {
                eprintln!("{line}");
            }
        };
        say(format!(
            "Would upload to s3://{bucket}/{prefix} at {endpoint} (dry run: nothing sent):"
        ));
        let mut out = Vec::new();
        for (it, key, encrypted) in plan {
            let parts = if it.size >= part_bytes {
                it.size.div_ceil(part_size_for(it.size, part_bytes))
            } else {
                0
            };
            say(format!(
                "  {} ({}) → s3://{bucket}/{key}{}{}",
                it.path.display(),
                util::human_size(it.size),
                if encrypted {
                    format!(", age-encrypted to {} recipient(s)", s3.encrypt_to.len())
                } else {
                    String::new()
                },
                if parts > 0 {
                    format!(", multipart in {parts} parts")
                } else {
                    ", single PUT".to_string()
                }
            ));
            out.push(Uploaded {
                file: it.path,
                url: url_of(&key),
                key,
                size: it.size,
                sha256: None,
                parts,
                encrypted,
                verified: false,
            });
        }
        return Ok(out);
    }

    let _signals = interrupt::Guard::install();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let client = make_client(s3).await?;
        check_bucket(&client, &bucket, &endpoint).await?;

        // Encrypt into a hidden scratch directory beside the artifacts (same disk, and
        // skipped by listings); it goes away with its guard.
        let scratch = if recipients.is_some() {
            Some(
                tempfile::Builder::new()
                    .prefix(".mkappliance-age-")
                    .tempdir_in(dir)
                    .with_context(|| {
                        format!("creating a scratch directory in {}", dir.display())
                    })?,
            )
        } else {
            None
        };
        let start = Instant::now();
        let mut total = 0u64;
        let mut done = Vec::new();
        let n_files = plan.len();
        for (it, key, encrypted) in plan {
            // Each file in its own block, so that a failure can say what is already up.
            let one: Result<Uploaded> = async {
                interrupt::check()?;
                let (path, size) = match (&recipients, &scratch, encrypted) {
                    (Some(r), Some(sd), true) => {
                        let dest = sd.path().join(format!(
                            "{}.{}",
                            it.rel.replace('/', "_"),
                            encrypt::EXTENSION
                        ));
                        let (src, r) = (it.path.clone(), r.clone());
                        let d = dest.clone();
                        tokio::task::spawn_blocking(move || encrypt::encrypt_file(&src, &d, &r))
                            .await
                            .context("encryption task")??;
                        let size = std::fs::metadata(&dest)?.len();
                        (dest, size)
                    }
                    _ => (it.path.clone(), it.size),
                };
                let before = FileState::of(&path)?;
                // The whole file's digest for the report, hashed while it uploads.
                let whole = {
                    let p = path.clone();
                    tokio::task::spawn_blocking(move || verify::hash_file(&p))
                };
                let target = transfer::Target {
                    client: client.clone(),
                    bucket: bucket.clone(),
                    key: key.clone(),
                };
                let bar = super::bytes_bar(size, &it.rel, run.quiet);
                let parts = transfer::upload_file(&target, s3, &path, size, part_bytes, &bar)
                    .await
                    .with_context(|| {
                        format!("uploading {} to s3://{bucket}/{key}", it.path.display())
                    })?;
                bar.finish_and_clear();
                let sha256 = whole.await.context("hashing task")??;
                let verified = if s3.no_verify {
                    false
                } else {
                    let bar = super::bytes_bar(size, &format!("verifying {}", it.rel), run.quiet);
                    verify::verify(
                        &target,
                        &path,
                        size,
                        part_size_for(size, part_bytes).max(s3.verify_range_mib.max(1) << 20),
                        s3.concurrency,
                        &bar,
                    )
                    .await
                    .with_context(|| format!("verifying s3://{bucket}/{key}"))?;
                    bar.finish_and_clear();
                    true
                };
                // Parts, digest and read-back each read the file at their own time: they
                // only agree if it stayed put.
                if FileState::of(&path)? != before {
                    bail!(
                        "{} changed while it was being uploaded to s3://{bucket}/{key}: the \
                         object and the reported SHA-256 may match neither version; upload it \
                         again once it is complete",
                        it.path.display()
                    );
                }
                total += size;
                let up = Uploaded {
                    file: it.path,
                    url: url_of(&key),
                    key,
                    size,
                    sha256: Some(sha256),
                    parts,
                    encrypted,
                    verified,
                };
                if run.print {
                    println!(
                        "{} ({}{}{})",
                        up.url,
                        util::human_size(size),
                        if parts > 0 {
                            format!(", {parts} parts")
                        } else {
                            String::new()
                        },
                        if verified {
                            ", size and sha256 verified"
                        } else {
                            ""
                        }
                    );
                }
                Ok(up)
            }
            .await;
            let up = one.map_err(|e| incomplete(e, &done, n_files, &bucket, &prefix))?;
            done.push(up);
        }
        if run.print {
            let secs = start.elapsed().as_secs_f64();
            println!(
                "Uploaded {} objects ({}) to s3://{bucket}/{prefix} in {secs:.1} s ({}/s)",
                done.len(),
                util::human_size(total),
                util::human_size((total as f64 / secs.max(1e-3)) as u64)
            );
        }
        Ok(done)
    })
}

/// What tells that a file was written to: size, inode, and modification and change times.
#[derive(PartialEq, Eq)]
struct FileState([i64; 6]);

impl FileState {
    fn of(path: &Path) -> Result<FileState> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(FileState([
            m.len() as i64,
            m.ino() as i64,
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
        ]))
    }
}

/// A failure after some files went up: the bucket holds a partial publish, so say which
/// objects it has (the error itself names the file that failed).
fn incomplete(
    e: anyhow::Error,
    done: &[Uploaded],
    n_files: usize,
    bucket: &str,
    prefix: &str,
) -> anyhow::Error {
    if done.is_empty() {
        return e;
    }
    let keys: Vec<&str> = done.iter().map(|u| u.key.as_str()).collect();
    e.context(format!(
        "incomplete publish: s3://{bucket}/{prefix} now holds {} of the {n_files} objects ({}), \
         uploaded before this failure; run again to upload everything",
        done.len(),
        keys.join(", ")
    ))
}

async fn make_client(s3: &S3Args) -> Result<Client> {
    use aws_config::meta::region::RegionProviderChain;
    // Our own region chain: the default one ends at the instance metadata service, which
    // a CI runner outside AWS would wait on.
    let mut profile_region = aws_config::profile::ProfileFileRegionProvider::builder();
    if let Some(p) = &s3.profile {
        profile_region = profile_region.profile_name(p);
    }
    let region = RegionProviderChain::first_try(s3.region.clone().map(Region::new))
        .or_else(aws_config::environment::EnvironmentVariableRegionProvider::new())
        .or_else(profile_region.build())
        .or_else(Region::from_static(DEFAULT_REGION));
    let retry = aws_config::retry::RetryConfig::standard()
        .with_max_attempts(s3.retries + 1)
        .with_initial_backoff(INITIAL_BACKOFF);
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .build();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(region)
        .retry_config(retry)
        .timeout_config(timeouts);
    if let Some(p) = &s3.profile {
        loader = loader.profile_name(p);
    }
    let access = std::env::var(ENV_ACCESS_KEY).ok().filter(|v| !v.is_empty());
    let secret = std::env::var(ENV_SECRET_KEY).ok().filter(|v| !v.is_empty());
    match (access, secret) {
        (Some(a), Some(s)) => {
            loader = loader.credentials_provider(Credentials::new(a, s, None, None, "IDRIVE"));
        }
        (Some(_), None) => bail!("{ENV_ACCESS_KEY} is set but {ENV_SECRET_KEY} is not"),
        (None, Some(_)) => bail!("{ENV_SECRET_KEY} is set but {ENV_ACCESS_KEY} is not"),
        (None, None) => {}
    }
    let sdk = loader.load().await;
    // Find credentials now, to say plainly what is missing (and never what was found).
    use aws_sdk_s3::config::ProvideCredentials;
    let provider = sdk.credentials_provider().context(NO_CREDENTIALS)?;
    if let Err(e) = provider.provide_credentials().await {
        bail!("{NO_CREDENTIALS} ({})", error_chain(&e));
    }
    let mut conf = aws_sdk_s3::config::Builder::from(&sdk)
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
    if let Some(e) = endpoint_override(s3) {
        conf = conf.endpoint_url(e);
    }
    Ok(Client::from_conf(conf.build()))
}

/// Fail early, and clearly, when the bucket is missing or not ours.
async fn check_bucket(client: &Client, bucket: &str, endpoint: &str) -> Result<()> {
    match client.head_bucket().bucket(bucket).send().await {
        Ok(_) => Ok(()),
        Err(e) => {
            let status = e.raw_response().map(|r| r.status().as_u16());
            match status {
                Some(404) => bail!("bucket {bucket:?} does not exist at {endpoint}"),
                Some(401 | 403) => bail!(
                    "access to bucket {bucket:?} at {endpoint} was denied (HTTP {}): check the \
                     credentials ({ENV_ACCESS_KEY}/{ENV_SECRET_KEY} or AWS_*) and the bucket policy",
                    status.unwrap_or(403)
                ),
                _ => bail!("cannot reach bucket {bucket:?} at {endpoint}: {}", describe(&e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_endpoints() {
        assert_eq!(default_prefix("2025-12-17"), "bootstrap/2025-12-17/");
        assert_eq!(normalize_prefix("/a/b"), "a/b/");
        assert_eq!(normalize_prefix("a/b/"), "a/b/");
        assert_eq!(normalize_prefix("/"), "");
        assert_eq!(
            normalize_endpoint("s3.eu-central-2.idrivee2.com"),
            "https://s3.eu-central-2.idrivee2.com"
        );
        assert_eq!(
            normalize_endpoint("http://127.0.0.1:9000/"),
            "http://127.0.0.1:9000"
        );
        assert_eq!(url_key("a b/c+d.raw"), "a%20b/c%2Bd.raw");
    }

    #[test]
    fn part_sizes_respect_s3_limits() {
        const MIB: u64 = 1 << 20;
        assert_eq!(part_size_for(100 * MIB, 16 * MIB), 16 * MIB);
        assert_eq!(part_size_for(100 * MIB, MIB), 5 * MIB);
        // 200 GB in at most 10,000 parts.
        let big = 200_000_000_000u64;
        let p = part_size_for(big, 16 * MIB);
        assert!(big.div_ceil(p) <= 10_000 && p >= 16 * MIB);
    }

    #[test]
    fn checksum_files_stay_plain() {
        assert!(is_checksum("SHA256SUMS"));
        assert!(is_checksum("sub/bootstrap-pxe.raw.sha256"));
        assert!(!is_checksum("bootstrap-pxe.raw.gz"));
    }
}
