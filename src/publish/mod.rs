//! Publishing (the CI release job's half): compress an image, list checksums, upload to an
//! S3-compatible bucket; and fetching the build's inputs with verified, resumable downloads.
//!
//! `compress` → `sums` → `s3` is the path of `build --compress --upload`; `fetch` stands
//! alone. Every output file is written under a temporary name and renamed when complete.

pub mod compress;
pub mod encrypt;
pub mod fetch;
pub mod s3;
pub mod sums;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::cmdline::{BuildArgs, CompressArgs, FetchCommand, UploadArgs};

pub use compress::Format;
pub use s3::Sse;

/// Told once per run before anything leaves the machine.
pub const SECRETS_NOTE: &str = "note: the appliance image holds the cluster's machine config \
    (its secrets): keep the bucket private, or use --sse / --encrypt-to";

/// The value of `--compress[=FORMAT]` or `COMPRESS=...`: `true`/`1`/`yes` mean gzip,
/// `false`/`0`/`no`/empty mean no compression, otherwise a format name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressFlag(pub Option<Format>);

impl CompressFlag {
    pub fn parse(v: &str) -> Result<CompressFlag, String> {
        match v.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(CompressFlag(Some(Format::Gzip))),
            "false" | "0" | "no" | "off" | "" => Ok(CompressFlag(None)),
            "gzip" | "gz" => Ok(CompressFlag(Some(Format::Gzip))),
            "zstd" | "zst" => Ok(CompressFlag(Some(Format::Zstd))),
            "xz" => Ok(CompressFlag(Some(Format::Xz))),
            other => Err(format!(
                "{other:?} is not a compression: expected gzip, zstd, xz, true or false"
            )),
        }
    }
}

/// What `build --compress/--upload` did, added to the build summary.
#[derive(Debug, Serialize, Default)]
pub struct Published {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressed: Option<compress::Compressed>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256sums: Option<PathBuf>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub uploaded: Vec<s3::Uploaded>,
}

impl Published {
    /// Lines for the human build summary.
    pub fn print(&self) {
        if let Some(c) = &self.compressed {
            println!(
                "  compressed {} ({}, {:.1}%)",
                c.path.display(),
                crate::util::human_size(c.size),
                100.0 * c.size as f64 / c.input_size.max(1) as f64
            );
        }
        if let Some(s) = &self.sha256sums {
            println!("  checksums {}", s.display());
        }
        for u in &self.uploaded {
            println!(
                "  uploaded  {}{}",
                u.url,
                if u.verified { " (verified)" } else { "" }
            );
        }
    }
}

/// The tail of `build`: compress, list checksums, upload, as the flags ask.
/// `image_sha256` is the digest the build already computed (saves a re-read).
pub fn after_build(
    args: &BuildArgs,
    image: &Path,
    image_sha256: &str,
) -> Result<Option<Published>> {
    let format = args.compress.and_then(|c| c.0);
    if format.is_none() && !args.upload {
        return Ok(None);
    }
    let dir = parent_dir(image);
    let mut known = BTreeMap::new();
    known.insert(file_name(image)?, image_sha256.to_string());
    let mut published = Published::default();
    if let Some(format) = format {
        let c = compress::compress_file(
            image,
            &compress::Options {
                format,
                level: None,
                threads: None,
            },
            args.quiet || args.json,
        )
        .with_context(|| format!("compressing {}", image.display()))?;
        known.insert(file_name(&c.path)?, c.sha256.clone());
        published.compressed = Some(c);
    }
    published.sha256sums = Some(sums::write_sha256sums(dir, &known)?);
    if args.upload {
        let prefix = args
            .s3
            .prefix
            .clone()
            .unwrap_or_else(|| s3::default_prefix(&args.bootstrap_version));
        published.uploaded = s3::upload_dir(
            dir,
            &args.s3,
            &prefix,
            &s3::RunOptions {
                dry_run: false,
                quiet: args.quiet || args.json,
                // The build summary lists the objects.
                print: false,
            },
        )?;
    }
    Ok(Some(published))
}

/// `mkappliance compress FILE`.
pub fn compress_cmd(args: &CompressArgs) -> Result<()> {
    let c = compress::compress_file(
        &args.file,
        &compress::Options {
            format: args.format,
            level: args.level,
            threads: args.threads,
        },
        args.quiet,
    )
    .with_context(|| format!("compressing {}", args.file.display()))?;
    let sums = if args.no_sums {
        None
    } else {
        let mut known = BTreeMap::new();
        known.insert(file_name(&args.file)?, c.input_sha256.clone());
        known.insert(file_name(&c.path)?, c.sha256.clone());
        Some(sums::write_sha256sums(parent_dir(&args.file), &known)?)
    };
    if !args.quiet {
        println!(
            "Compressed {} → {} ({} → {}, {:.1}% in {:.2} s)",
            args.file.display(),
            c.path.display(),
            crate::util::human_size(c.input_size),
            crate::util::human_size(c.size),
            100.0 * c.size as f64 / c.input_size.max(1) as f64,
            c.seconds
        );
        println!("  sha256    {}", c.sha256);
        if let Some(s) = sums {
            println!("  checksums {}", s.display());
        }
    }
    Ok(())
}

/// `mkappliance upload DIR`.
pub fn upload_cmd(args: &UploadArgs) -> Result<()> {
    if !args.dir.is_dir() {
        bail!("{} is not a directory", args.dir.display());
    }
    let prefix = match &args.s3.prefix {
        Some(p) => p.clone(),
        None => {
            let abs = std::path::absolute(&args.dir)
                .with_context(|| format!("resolving {}", args.dir.display()))?;
            let name = abs.file_name().with_context(|| {
                format!(
                    "{} has no name to derive the key prefix from: pass --prefix",
                    args.dir.display()
                )
            })?;
            s3::default_prefix(&name.to_string_lossy())
        }
    };
    let uploaded = s3::upload_dir(
        &args.dir,
        &args.s3,
        &prefix,
        &s3::RunOptions {
            dry_run: args.dry_run,
            quiet: args.quiet || args.json,
            print: !args.quiet && !args.json,
        },
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&uploaded)?);
    }
    Ok(())
}

/// `mkappliance fetch ...`.
pub fn fetch_cmd(cmd: &FetchCommand) -> Result<()> {
    match cmd {
        FetchCommand::Talos(a) => fetch::fetch_talos(a).map(|_| ()),
        FetchCommand::Ipxe(a) => fetch::fetch_ipxe(a).map(|_| ()),
    }
}

fn parent_dir(p: &Path) -> &Path {
    p.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn file_name(p: &Path) -> Result<String> {
    Ok(p.file_name()
        .with_context(|| format!("{} has no file name", p.display()))?
        .to_string_lossy()
        .into_owned())
}

/// A byte-count progress bar on stderr with throughput, or a hidden one.
pub(crate) fn bytes_bar(len: u64, msg: &str, hidden: bool) -> indicatif::ProgressBar {
    if hidden {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:24!} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_message(msg.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compress_flag_values() {
        assert_eq!(
            CompressFlag::parse("true"),
            Ok(CompressFlag(Some(Format::Gzip)))
        );
        assert_eq!(
            CompressFlag::parse("TRUE"),
            Ok(CompressFlag(Some(Format::Gzip)))
        );
        assert_eq!(CompressFlag::parse("false"), Ok(CompressFlag(None)));
        assert_eq!(CompressFlag::parse(""), Ok(CompressFlag(None)));
        assert_eq!(
            CompressFlag::parse("xz"),
            Ok(CompressFlag(Some(Format::Xz)))
        );
        assert_eq!(
            CompressFlag::parse("zstd"),
            Ok(CompressFlag(Some(Format::Zstd)))
        );
        assert!(CompressFlag::parse("bzip2").is_err());
    }
}
