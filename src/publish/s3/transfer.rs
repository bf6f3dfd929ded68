//! Putting one file: a single PUT when small, else a multipart upload whose parts go up
//! `--concurrency` at a time and which is aborted if it can't be completed.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;

use super::{describe, interrupt, is_unparsed_success, part_size_for, Sse, BODY_BUFFER};
use crate::cmdline::S3Args;
use crate::publish::sums;
use crate::util;

/// How often running transfers look for a Ctrl-C.
const SIGNAL_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Where an object goes.
#[derive(Clone)]
pub(super) struct Target {
    pub client: Client,
    pub bucket: String,
    pub key: String,
}

impl Target {
    /// The object's size as HEAD reports it (`None`: the server did not say); the error
    /// is described for a message.
    pub async fn object_len(&self) -> Result<Option<u64>, String> {
        self.client
            .head_object()
            .bucket(&self.bucket)
            .key(&self.key)
            .send()
            .await
            .map(|h| h.content_length().map(|n| n as u64))
            .map_err(|e| describe(&e))
    }
}

/// Run `job(0..n)`, at most `concurrency` at once, and return the results in order. The
/// first failure cancels the jobs in flight (and waits for them to stop) before returning.
pub(super) async fn bounded<T, F, Fut>(n: u64, concurrency: usize, job: F) -> Result<Vec<T>>
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let mut first_err: Option<anyhow::Error> = None;
    let mut next = 0u64;
    loop {
        while first_err.is_none() && next < n && set.len() < concurrency.max(1) {
            let (i, fut) = (next, job(next));
            set.spawn(async move { (i, fut.await) });
            next += 1;
        }
        // Wake up now and then to notice Ctrl-C.
        let joined = match tokio::time::timeout(SIGNAL_POLL, set.join_next()).await {
            Ok(j) => j,
            Err(_) => {
                if let Err(e) = interrupt::check() {
                    if first_err.is_none() {
                        first_err = Some(e);
                        set.abort_all();
                    }
                }
                continue;
            }
        };
        match joined {
            None => break,
            Some(Ok((i, Ok(v)))) => out[i as usize] = Some(v),
            Some(Ok((_, Err(e)))) => {
                if first_err.is_none() {
                    first_err = Some(e);
                    set.abort_all();
                }
            }
            Some(Err(j)) if j.is_cancelled() => {}
            Some(Err(j)) => {
                if first_err.is_none() {
                    first_err = Some(anyhow!("a transfer task failed: {j}"));
                    set.abort_all();
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out
            .into_iter()
            .map(|v| v.expect("every job finished"))
            .collect()),
    }
}

/// Upload `path` (`size` bytes) to `t`; returns the number of parts (0: a single PUT).
pub(super) async fn upload_file(
    t: &Target,
    s3: &S3Args,
    path: &Path,
    size: u64,
    part_bytes: u64,
    bar: &indicatif::ProgressBar,
) -> Result<u64> {
    let sse = s3.sse.map(Sse::header);
    if size < part_bytes {
        let body = ByteStream::read_from()
            .path(path)
            .buffer_size(BODY_BUFFER)
            .build()
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        t.client
            .put_object()
            .bucket(&t.bucket)
            .key(&t.key)
            .content_length(size as i64)
            .content_type(content_type(&t.key))
            .set_server_side_encryption(sse)
            .set_ssekms_key_id(s3.sse_kms_key_id.clone())
            .body(body)
            .send()
            .await
            .map_err(|e| anyhow!("PUT failed: {}", describe(&e)))?;
        bar.inc(size);
        return Ok(0);
    }

    let part_size = part_size_for(size, part_bytes);
    let n_parts = size.div_ceil(part_size);
    let created = t
        .client
        .create_multipart_upload()
        .bucket(&t.bucket)
        .key(&t.key)
        .content_type(content_type(&t.key))
        .set_server_side_encryption(sse)
        .set_ssekms_key_id(s3.sse_kms_key_id.clone())
        .send()
        .await
        .map_err(|e| anyhow!("starting the multipart upload: {}", describe(&e)))?;
    let upload_id = created
        .upload_id()
        .context("the store started a multipart upload without an upload ID")?
        .to_string();

    let result = async {
        let parts = upload_parts(t, s3, &upload_id, path, size, part_size, bar).await?;
        complete(t, &upload_id, parts, size).await
    }
    .await;
    let Err(e) = result else {
        return Ok(n_parts);
    };
    bar.abandon();
    // Nothing half-written may stay: drop the parts already stored.
    let aborted = t
        .client
        .abort_multipart_upload()
        .bucket(&t.bucket)
        .key(&t.key)
        .upload_id(&upload_id)
        .send()
        .await;
    Err(match aborted {
        Ok(_) => e.context(format!(
            "the multipart upload ({n_parts} parts of {}) was aborted; nothing was left in the bucket",
            util::human_size(part_size)
        )),
        Err(ae) => e.context(format!(
            "and aborting the multipart upload {upload_id} failed too ({}): remove it with \
             `aws s3api abort-multipart-upload` or a lifecycle rule",
            describe(&ae)
        )),
    })
}

/// Every part, `--concurrency` at a time, each retried by the SDK before it counts as failed.
async fn upload_parts(
    t: &Target,
    s3: &S3Args,
    upload_id: &str,
    path: &Path,
    size: u64,
    part_size: u64,
    bar: &indicatif::ProgressBar,
) -> Result<Vec<CompletedPart>> {
    let n_parts = size.div_ceil(part_size);
    let attempts = s3.retries + 1;
    let path: Arc<Path> = Arc::from(path);
    let upload_id: Arc<str> = Arc::from(upload_id);
    bounded(n_parts, s3.concurrency, |i| {
        let (t, path, bar, upload_id) = (t.clone(), path.clone(), bar.clone(), upload_id.clone());
        async move {
            let number = i + 1;
            let offset = i * part_size;
            let len = part_size.min(size - offset);
            let body = ByteStream::read_from()
                .path(&*path)
                .offset(offset)
                .length(Length::Exact(len))
                .buffer_size(BODY_BUFFER)
                .build()
                .await
                .with_context(|| format!("opening {}", path.display()))?;
            let out = t
                .client
                .upload_part()
                .bucket(&t.bucket)
                .key(&t.key)
                .upload_id(&*upload_id)
                .part_number(number as i32)
                .content_length(len as i64)
                .body(body)
                .send()
                .await
                .map_err(|e| {
                    anyhow!(
                        "part {number} of {n_parts} (bytes {offset}-{}) failed after {attempts} attempt(s): {}",
                        offset + len - 1,
                        describe(&e)
                    )
                })?;
            bar.inc(len);
            Ok(CompletedPart::builder()
                .part_number(number as i32)
                .set_e_tag(out.e_tag)
                .build())
        }
    })
    .await
}

async fn complete(t: &Target, upload_id: &str, parts: Vec<CompletedPart>, size: u64) -> Result<()> {
    let completed = t
        .client
        .complete_multipart_upload()
        .bucket(&t.bucket)
        .key(&t.key)
        .upload_id(upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await;
    match completed {
        Ok(_) => Ok(()),
        Err(e) if is_unparsed_success(&e) => {
            // HTTP 200 with a body the SDK can't parse (moto 5.2 names its root element
            // CompleteMultipartUploadResponse): an S3 error inside a 200 would carry a code,
            // so this one succeeded. The object's size (and the verification that follows)
            // tell for sure.
            let len = t.object_len().await.map_err(|he| {
                anyhow!(
                    "completing the multipart upload: {}; and the object is not there: {he}",
                    describe(&e)
                )
            })?;
            match len {
                Some(n) if n == size => Ok(()),
                other => Err(anyhow!(
                    "completing the multipart upload: {}; the object has {other:?} bytes, not {size}",
                    describe(&e)
                )),
            }
        }
        Err(e) => Err(anyhow!("completing the multipart upload: {}", describe(&e))),
    }
}

pub(super) fn content_type(key: &str) -> &'static str {
    let name = key.rsplit('/').next().unwrap_or(key);
    if name == sums::SUMS_NAME || name.ends_with(".sha256") || name.ends_with(".txt") {
        "text/plain; charset=utf-8"
    } else if name.ends_with(".gz") {
        "application/gzip"
    } else if name.ends_with(".zst") {
        "application/zstd"
    } else if name.ends_with(".xz") {
        "application/x-xz"
    } else {
        "application/octet-stream"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_keeps_order_and_stops_at_the_first_error() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let v = rt
            .block_on(bounded(10, 3, |i| async move {
                tokio::time::sleep(std::time::Duration::from_millis(10 * (10 - i))).await;
                Ok(i * 2)
            }))
            .unwrap();
        assert_eq!(v, (0..10).map(|i| i * 2).collect::<Vec<_>>());
        let started = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let s = started.clone();
        let e = rt
            .block_on(bounded(100, 2, move |i| {
                s.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    if i == 3 {
                        anyhow::bail!("job 3 failed");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    Ok(i)
                }
            }))
            .unwrap_err();
        assert_eq!(e.to_string(), "job 3 failed");
        assert!(started.load(std::sync::atomic::Ordering::SeqCst) < 10);
    }
}
