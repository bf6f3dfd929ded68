//! Streaming, parallel, reproducible compression of one artifact.
//!
//! gzip is what Synology VMM and most importers take; zstd and xz suit other hypervisors.
//! The input is read in fixed-size blocks and never held whole in memory. Every format's
//! output depends only on the input and the level, never on the thread count: gzip is
//! compressed in fixed 128 KiB blocks (pigz-style, via `gzp`), and zstd and xz in their
//! multi-threaded modes, whose output is the same for any number of workers.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::util::{AtomicFile, HashingReader};

pub const GZIP_LEVEL: u32 = 6;
pub const ZSTD_LEVEL: u32 = 3;
pub const XZ_LEVEL: u32 = 6;
/// Bytes handed to the compressor at a time (a multiple of gzp's block size, so the
/// gzip block boundaries are fixed).
const READ_CHUNK: usize = 1 << 20;
const OUT_BUFFER: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Gzip,
    Zstd,
    Xz,
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Format::Gzip => "gz",
            Format::Zstd => "zst",
            Format::Xz => "xz",
        }
    }

    fn default_level(self) -> u32 {
        match self {
            Format::Gzip => GZIP_LEVEL,
            Format::Zstd => ZSTD_LEVEL,
            Format::Xz => XZ_LEVEL,
        }
    }

    fn max_level(self) -> u32 {
        match self {
            Format::Gzip => 9,
            Format::Zstd => 22,
            Format::Xz => 9,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub format: Format,
    /// `None`: the format's default.
    pub level: Option<u32>,
    /// `None`: all cores.
    pub threads: Option<usize>,
}

/// One compressed artifact.
#[derive(Debug, Clone, Serialize)]
pub struct Compressed {
    pub path: PathBuf,
    pub format: Format,
    pub size: u64,
    pub sha256: String,
    pub input_size: u64,
    pub input_sha256: String,
    pub seconds: f64,
}

/// `FILE` → `FILE.<ext>` beside it.
pub fn output_path(input: &Path, format: Format) -> PathBuf {
    let mut s = input.as_os_str().to_os_string();
    s.push(".");
    s.push(format.extension());
    PathBuf::from(s)
}

/// A writer that hashes and counts what goes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Feed `input` to `w` in fixed-size chunks, ticking the progress bar.
fn pump(input: &mut impl Read, w: &mut impl Write, bar: &indicatif::ProgressBar) -> Result<()> {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        // Full chunks only: fewer, even hand-offs to the compressor threads.
        let mut filled = 0;
        while filled < buf.len() {
            match input.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("reading the input"),
            }
        }
        if filled == 0 {
            return Ok(());
        }
        w.write_all(&buf[..filled])
            .context("writing the compressed output")?;
        bar.inc(filled as u64);
    }
}

/// Compress `input` into `FILE.<ext>` beside it (temporary name, mode 0600, renamed when
/// complete), hashing both sides on the way.
pub fn compress_file(input: &Path, opts: &Options, quiet: bool) -> Result<Compressed> {
    let start = Instant::now();
    let level = opts.level.unwrap_or(opts.format.default_level());
    if level > opts.format.max_level() || (level == 0 && opts.format != Format::Gzip) {
        anyhow::bail!(
            "--level {level} is out of range for {:?} (1-{})",
            opts.format,
            opts.format.max_level()
        );
    }
    let threads = match opts.threads {
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let file = File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let input_size = file
        .metadata()
        .with_context(|| format!("reading the size of {}", input.display()))?
        .len();
    let dest = output_path(input, opts.format);
    let out = AtomicFile::create(&dest)?;
    let sink = HashingWriter {
        inner: BufWriter::with_capacity(
            OUT_BUFFER,
            out.file()
                .try_clone()
                .context("duplicating the output handle")?,
        ),
        hasher: Sha256::new(),
        len: 0,
    };
    let bar = super::bytes_bar(
        input_size,
        &format!("compressing ({})", opts.format.extension()),
        quiet,
    );
    let mut reader = HashingReader::new(file);
    let mut sink = match opts.format {
        Format::Gzip => gzip(&mut reader, sink, level, threads, &bar)?,
        Format::Zstd => zstd(&mut reader, sink, level, threads, input_size, &bar)?,
        Format::Xz => xz(&mut reader, sink, level, threads, &bar)?,
    };
    sink.flush()
        .with_context(|| format!("writing {}", dest.display()))?;
    bar.finish_and_clear();
    let input_sha256 = hex::encode(reader.finish());
    let size = sink.len;
    let sha256 = hex::encode(sink.hasher.finalize());
    drop(sink.inner);
    out.commit()?;
    Ok(Compressed {
        path: dest,
        format: opts.format,
        size,
        sha256,
        input_size,
        input_sha256,
        seconds: start.elapsed().as_secs_f64(),
    })
}

type Sink = HashingWriter<BufWriter<File>>;

fn gzip(
    input: &mut impl Read,
    sink: Sink,
    level: u32,
    threads: usize,
    bar: &indicatif::ProgressBar,
) -> Result<Sink> {
    use gzp::par::compress::ParCompressBuilder;
    use gzp::ZWriter;
    // gzp's gzip header has no name, mtime 0, OS 255; its blocks are a fixed size, so the
    // stream is the same for any thread count.
    let mut z = ParCompressBuilder::<gzp::deflate::Gzip>::new()
        .num_threads(threads)
        .context("configuring gzip threads")?
        .compression_level(flate2::Compression::new(level))
        .from_writer(sink);
    pump(input, &mut z, bar)?;
    z.finish().context("finishing the gzip stream")
}

fn zstd(
    input: &mut impl Read,
    sink: Sink,
    level: u32,
    threads: usize,
    input_size: u64,
    bar: &indicatif::ProgressBar,
) -> Result<Sink> {
    let mut z = zstd::stream::Encoder::new(sink, level as i32).context("starting zstd")?;
    // At least one worker even for --threads 1: zstd's multi-threaded format is the same
    // for any number of workers, but differs from its single-threaded one.
    z.multithread(threads as u32)
        .context("configuring zstd threads")?;
    z.include_checksum(true).context("configuring zstd")?;
    z.set_pledged_src_size(Some(input_size))
        .context("configuring zstd")?;
    pump(input, &mut z, bar)?;
    z.finish().context("finishing the zstd stream")
}

fn xz(
    input: &mut impl Read,
    sink: Sink,
    level: u32,
    threads: usize,
    bar: &indicatif::ProgressBar,
) -> Result<Sink> {
    // Multi-threaded xz cuts the input into blocks of a size set by the preset, not by the
    // thread count, so the output is the same for any number of threads.
    let stream = liblzma::stream::MtStreamBuilder::new()
        .threads(threads as u32)
        .preset(level)
        .check(liblzma::stream::Check::Crc64)
        .encoder()
        .context("starting xz")?;
    let mut z = liblzma::write::XzEncoder::new_stream(sink, stream);
    pump(input, &mut z, bar)?;
    z.finish().context("finishing the xz stream")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_names() {
        assert_eq!(
            output_path(Path::new("a/b.raw"), Format::Gzip),
            PathBuf::from("a/b.raw.gz")
        );
        assert_eq!(
            output_path(Path::new("b.raw"), Format::Zstd),
            PathBuf::from("b.raw.zst")
        );
        assert_eq!(
            output_path(Path::new("b.raw"), Format::Xz),
            PathBuf::from("b.raw.xz")
        );
    }

    #[test]
    fn gzip_roundtrips_and_has_no_name_or_time() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("in.bin");
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 & 0x3f)
            .collect();
        std::fs::write(&src, &data).unwrap();
        let opts = Options {
            format: Format::Gzip,
            level: None,
            threads: Some(2),
        };
        let c = compress_file(&src, &opts, true).unwrap();
        let gz = std::fs::read(&c.path).unwrap();
        // RFC 1952 header: magic, deflate, no flags (no name), mtime 0.
        assert_eq!(&gz[..4], &[0x1f, 0x8b, 8, 0]);
        assert_eq!(&gz[4..8], &[0, 0, 0, 0]);
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut back)
            .unwrap();
        assert!(back == data);
        assert_eq!(c.input_sha256, crate::util::sha256_hex(&data));
        assert_eq!(c.sha256, crate::util::sha256_hex(&gz));
        assert_eq!(c.size, gz.len() as u64);
    }

    #[test]
    fn bad_level_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("in.bin");
        std::fs::write(&src, b"x").unwrap();
        let opts = Options {
            format: Format::Gzip,
            level: Some(10),
            threads: None,
        };
        let e = compress_file(&src, &opts, true).unwrap_err();
        assert!(format!("{e:#}").contains("out of range"), "{e:#}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
