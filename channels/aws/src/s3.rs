//! The S3 mailbox: one object per value.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::operation::create_bucket::CreateBucketError;
use aws_sdk_s3::operation::get_object::GetObjectError;
use aws_sdk_s3::operation::head_bucket::HeadBucketError;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    AbortIncompleteMultipartUpload, BucketLifecycleConfiguration, BucketLocationConstraint,
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, CreateBucketConfiguration, Delete,
    ExpirationStatus, LifecycleExpiration, LifecycleRule, LifecycleRuleFilter, ObjectIdentifier,
};
use aws_sdk_s3::Client;
use fmi_channels::Instant;
use fmi_storage::{Mailbox, MailboxError, MailboxLimits, RequestStats};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::error::{classify, fatal, transient};
use crate::sdk;

const BACKEND: &str = "s3";
const MIB: usize = 1024 * 1024;

/// S3's smallest part size (every part but the last).
pub const MIN_PART_SIZE: usize = 5 * MIB;
/// S3's largest number of parts in one multipart upload.
const MAX_PARTS: usize = 10_000;
/// DeleteObjects takes at most 1000 keys per request.
const DELETE_BATCH: usize = 1000;
/// Parts of one multipart upload in flight at once: one S3 connection gives ~50 MB/s, several
/// in parallel multiply that, and 4 × 8 MiB bounds the memory in flight.
const PART_CONCURRENCY: usize = 4;
/// Upper bound on list pages (1000 keys each) so that a misbehaving server that keeps returning
/// continuation tokens cannot loop forever: 10 million keys.
const MAX_LIST_PAGES: usize = 10_000;
/// Id of the lifecycle rule that [`S3Mailbox::expire_after_days`] owns.
pub const LIFECYCLE_RULE_ID: &str = "fmi-mailbox-expiry";

fn default_max_value() -> usize {
    64 * MIB
}
fn default_multipart_threshold() -> usize {
    16 * MIB
}
fn default_part_size() -> usize {
    8 * MIB
}
fn default_timeout_secs() -> u64 {
    30
}

/// Configuration of the S3 mailbox (`[channels.s3]` in the fmi config file).
///
/// ```toml
/// [channels.s3]
/// bucket = "my-fmi-bucket"
/// prefix = "fmi/"                      # every key of the mailbox lives under it
/// region = "us-east-1"                 # else AWS_REGION / profile / us-east-1
/// endpoint = "http://127.0.0.1:9000"   # else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS
/// ```
///
/// Credentials always come from the standard AWS chain (environment, profile, web identity,
/// container or instance role), never from this file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// The bucket (must exist: see [`S3Mailbox::setup`]).
    pub bucket: String,
    /// Prepended to every key, so one bucket can hold other data too and a lifecycle rule can
    /// expire exactly the mailbox's objects. Empty by default.
    #[serde(default)]
    pub prefix: String,
    /// AWS region; `None` uses the standard chain, then `us-east-1`.
    #[serde(default)]
    pub region: Option<String>,
    /// Endpoint URL of a non-AWS server (MinIO, s3s-fs, ...); `None` uses
    /// `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` or AWS itself.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`) instead of virtual hosts
    /// (`bucket.endpoint/key`). `None`: path style exactly when a custom endpoint is in force,
    /// since local servers have no wildcard DNS.
    #[serde(default)]
    pub force_path_style: Option<bool>,
    /// Largest value one `put` accepts (the adapter chunks above it). Default 64 MiB.
    #[serde(default = "default_max_value")]
    pub max_value: usize,
    /// Values larger than this go up as a multipart upload. Default 16 MiB.
    #[serde(default = "default_multipart_threshold")]
    pub multipart_threshold: usize,
    /// Part size of multipart uploads, at least 5 MiB (S3's minimum). Default 8 MiB.
    #[serde(default = "default_part_size")]
    pub part_size: usize,
    /// Time limit of one HTTP request (one attempt). Default 30 s.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
}

impl S3Config {
    /// A configuration for `bucket` with every other setting at its default.
    pub fn new(bucket: impl Into<String>) -> Self {
        Self {
            bucket: bucket.into(),
            prefix: String::new(),
            region: None,
            endpoint: None,
            force_path_style: None,
            max_value: default_max_value(),
            multipart_threshold: default_multipart_threshold(),
            part_size: default_part_size(),
            timeout_secs: default_timeout_secs(),
        }
    }

    fn validate(&self) -> Result<(), MailboxError> {
        let bad = |what: String| Err(fatal(BACKEND, "config", what));
        if self.bucket.is_empty() {
            return bad("[channels.s3] bucket is empty".into());
        }
        if self.part_size < MIN_PART_SIZE {
            return bad(format!(
                "[channels.s3] part_size = {} is below S3's minimum part size of {MIN_PART_SIZE} bytes",
                self.part_size
            ));
        }
        if self.max_value == 0 || self.multipart_threshold == 0 || self.timeout_secs == 0 {
            return bad(
                "[channels.s3] max_value, multipart_threshold and timeout_secs must be positive"
                    .into(),
            );
        }
        if self.max_value.div_ceil(self.part_size) > MAX_PARTS {
            return bad(format!(
                "[channels.s3] max_value = {} needs more than S3's {MAX_PARTS} parts of part_size = {}",
                self.max_value, self.part_size
            ));
        }
        Ok(())
    }
}

/// Mailbox on an S3 bucket: each value is one object `prefix + key`.
///
/// Requests per operation: `put` 1 PutObject (multipart: 1 create + ⌈len / part_size⌉ parts +
/// 1 complete); `take` 1 GetObject, plus 1 DeleteObject when something was there; `get`
/// 1 GetObject; `list` 1 ListObjectsV2 per 1000 keys; `delete` 1 DeleteObjects per 1000 keys.
pub struct S3Mailbox {
    client: Client,
    bucket: String,
    prefix: String,
    endpoint: Option<String>,
    max_value: usize,
    multipart_threshold: usize,
    part_size: usize,
    /// Cleared when the server answered DeleteObjects with "not implemented": from then on
    /// `delete` sends one DeleteObject per key.
    batch_delete: AtomicBool,
    stats: Arc<RequestStats>,
}

impl fmt::Debug for S3Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Mailbox")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("max_value", &self.max_value)
            .field("multipart_threshold", &self.multipart_threshold)
            .finish_non_exhaustive()
    }
}

async fn client_for(config: &S3Config) -> Result<(Client, Option<String>), MailboxError> {
    config.validate()?;
    let sdk = sdk::load(
        config.region.as_deref(),
        Duration::from_secs(config.timeout_secs),
    )
    .await;
    let env_endpoint = sdk::env_endpoint("S3");
    let endpoint = config.endpoint.clone().or(env_endpoint);
    let mut builder = aws_sdk_s3::config::Builder::from(&sdk)
        .force_path_style(config.force_path_style.unwrap_or(endpoint.is_some()));
    if let Some(url) = &config.endpoint {
        builder = builder.endpoint_url(url);
    }
    Ok((Client::from_conf(builder.build()), endpoint))
}

fn describe_place(bucket: &str, endpoint: Option<&str>) -> String {
    match endpoint {
        Some(e) => format!("bucket '{bucket}' at {e}"),
        None => format!("bucket '{bucket}' on AWS"),
    }
}

impl S3Mailbox {
    /// Connects and checks that the bucket exists and is reachable with the current credentials
    /// (one HeadBucket request, billed and counted as a GET), so that a wrong name fails here
    /// and not at the first send.
    pub async fn connect(config: S3Config) -> Result<Self, MailboxError> {
        let (client, endpoint) = client_for(&config).await?;
        let stats = RequestStats::default();
        let check = || async {
            RequestStats::add(&stats.gets, 1);
            Self::check_bucket(&client, &config, endpoint.as_deref()).await
        };
        crate::with_connect_retries(&stats, check).await?;
        Ok(Self {
            client,
            bucket: config.bucket,
            prefix: config.prefix,
            endpoint,
            max_value: config.max_value,
            multipart_threshold: config.multipart_threshold,
            part_size: config.part_size,
            batch_delete: AtomicBool::new(true),
            stats: Arc::new(stats),
        })
    }

    /// One HeadBucket, its failure explained.
    async fn check_bucket(
        client: &aws_sdk_s3::Client,
        config: &S3Config,
        endpoint: Option<&str>,
    ) -> Result<(), MailboxError> {
        if let Err(e) = client.head_bucket().bucket(&config.bucket).send().await {
            let not_found = matches!(e.as_service_error(), Some(HeadBucketError::NotFound(_)));
            let c = classify(BACKEND, "connect", e);
            let place = describe_place(&config.bucket, endpoint);
            let detail = if not_found || c.status == Some(404) {
                format!("{place} does not exist: create it (`fmi setup`, or S3Mailbox::setup)")
            } else if c.status == Some(403) {
                format!(
                    "{place} is not accessible with these credentials (HTTP 403): check the \
                     AWS credentials and that the bucket is yours"
                )
            } else {
                format!("cannot reach {place}: {}", c.error.detail)
            };
            return Err(MailboxError {
                detail,
                retryable: c.error.retryable && !not_found,
                ..c.error
            });
        }
        Ok(())
    }

    /// Creates the bucket if it does not exist yet (idempotent), for tests and `fmi setup`.
    /// Returns whether it was created now.
    pub async fn setup(config: &S3Config) -> Result<bool, MailboxError> {
        let (client, _) = client_for(config).await?;
        let mut req = client.create_bucket().bucket(&config.bucket);
        // us-east-1 is the one region that rejects an explicit location constraint.
        let region = client
            .config()
            .region()
            .map(|r| r.as_ref().to_owned())
            .unwrap_or_else(|| sdk::FALLBACK_REGION.to_owned());
        if region != "us-east-1" {
            req = req.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(region.as_str()))
                    .build(),
            );
        }
        match req.send().await {
            Ok(_) => Ok(true),
            Err(e) => {
                if matches!(
                    e.as_service_error(),
                    Some(CreateBucketError::BucketAlreadyOwnedByYou(_))
                ) {
                    return Ok(false);
                }
                let c = classify(BACKEND, "setup", e);
                match c.code.as_deref() {
                    Some("BucketAlreadyOwnedByYou") => Ok(false),
                    // Single-tenant servers (s3s-fs) answer this for our own bucket too: it is
                    // ours if we may use it.
                    Some("BucketAlreadyExists")
                        if client
                            .head_bucket()
                            .bucket(&config.bucket)
                            .send()
                            .await
                            .is_ok() =>
                    {
                        Ok(false)
                    }
                    Some("BucketAlreadyExists") => Err(fatal(
                        BACKEND,
                        "setup",
                        format!(
                            "bucket '{}' already exists and belongs to another account: choose \
                             another name",
                            config.bucket
                        ),
                    )),
                    _ => Err(c.error),
                }
            }
        }
    }

    /// Adds (or replaces) a lifecycle rule that expires every object under the configured
    /// prefix `days` days after it was written, and aborts multipart uploads left incomplete
    /// for a day, so that messages of crashed jobs do not cost storage forever. Other rules of
    /// the bucket are kept (read, merged, written back).
    ///
    /// Returns `Ok(false)` if the server does not implement lifecycle configuration (s3s-fs
    /// 0.14 answers `NotImplemented`); AWS S3 and MinIO do.
    pub async fn expire_after_days(&self, days: u32) -> Result<bool, MailboxError> {
        const OP: &str = "lifecycle";
        let days = i32::try_from(days.max(1)).unwrap_or(i32::MAX);
        let unsupported = |code: Option<&str>, status: Option<u16>| {
            matches!(code, Some("NotImplemented")) || matches!(status, Some(501 | 405))
        };
        RequestStats::add(&self.stats.gets, 1);
        let mut rules = match self
            .client
            .get_bucket_lifecycle_configuration()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(out) => out.rules.unwrap_or_default(),
            Err(e) => {
                let c = classify(BACKEND, OP, e);
                match c.code.as_deref() {
                    _ if unsupported(c.code.as_deref(), c.status) => return Ok(false),
                    Some("NoSuchLifecycleConfiguration") => Vec::new(),
                    _ if c.status == Some(404) => Vec::new(),
                    _ => return Err(c.error),
                }
            }
        };
        rules.retain(|r| r.id() != Some(LIFECYCLE_RULE_ID));
        let rule = LifecycleRule::builder()
            .id(LIFECYCLE_RULE_ID)
            .filter(LifecycleRuleFilter::builder().prefix(&self.prefix).build())
            .status(ExpirationStatus::Enabled)
            .expiration(LifecycleExpiration::builder().days(days).build())
            .abort_incomplete_multipart_upload(
                AbortIncompleteMultipartUpload::builder()
                    .days_after_initiation(1)
                    .build(),
            )
            .build()
            .map_err(|e| fatal(BACKEND, OP, format!("lifecycle rule: {e}")))?;
        rules.push(rule);
        let lifecycle = BucketLifecycleConfiguration::builder()
            .set_rules(Some(rules))
            .build()
            .map_err(|e| fatal(BACKEND, OP, format!("lifecycle configuration: {e}")))?;
        RequestStats::add(&self.stats.puts, 1);
        match self
            .client
            .put_bucket_lifecycle_configuration()
            .bucket(&self.bucket)
            .lifecycle_configuration(lifecycle)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) => {
                let c = classify(BACKEND, OP, e);
                if unsupported(c.code.as_deref(), c.status) {
                    Ok(false)
                } else {
                    Err(c.error)
                }
            }
        }
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn object_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    async fn put_single(&self, key: &str, value: Vec<u8>) -> Result<(), MailboxError> {
        RequestStats::add(&self.stats.puts, 1);
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.object_key(key))
            .content_length(value.len() as i64)
            .body(ByteStream::from(value))
            .send()
            .await
            .map_err(|e| classify(BACKEND, "put", e).error)?;
        Ok(())
    }

    async fn put_multipart(&self, key: &str, value: &[u8]) -> Result<(), MailboxError> {
        const OP: &str = "put";
        let object = self.object_key(key);
        RequestStats::add(&self.stats.puts, 1);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&object)
            // The SDK adds a CRC32 checksum to every UploadPart; S3 rejects part checksums of an
            // upload created without an algorithm ("Checksum Type mismatch"), so name it here
            // and hand the part checksums back in CompleteMultipartUpload.
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .send()
            .await
            .map_err(|e| classify(BACKEND, OP, e).error)?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| {
                transient(
                    BACKEND,
                    OP,
                    "CreateMultipartUpload returned no upload id".into(),
                )
            })?
            .to_owned();

        let result = self.upload_parts(&object, &upload_id, value).await;
        let result = match result {
            Ok(parts) => {
                RequestStats::add(&self.stats.puts, 1);
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&object)
                    .upload_id(&upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| classify(BACKEND, OP, e).error)
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            // Parts of an abandoned upload are billed storage until aborted. Best effort: the
            // lifecycle rule's AbortIncompleteMultipartUpload catches what this misses.
            RequestStats::add(&self.stats.deletes, 1);
            if let Err(e) = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&object)
                .upload_id(&upload_id)
                .send()
                .await
            {
                tracing::debug!(error = %classify(BACKEND, "abort", e).error, "abort of a failed multipart upload failed");
            }
        }
        result
    }

    async fn upload_parts(
        &self,
        object: &str,
        upload_id: &str,
        value: &[u8],
    ) -> Result<Vec<CompletedPart>, MailboxError> {
        // Collected first (the futures are lazy) so that the stream's type does not hold the
        // closure, whose lifetimes the `Send` check of the boxed future cannot generalize.
        let uploads: Vec<_> = value
            .chunks(self.part_size)
            .enumerate()
            .map(|(i, chunk)| {
                // Part numbers start at 1; MAX_PARTS (checked in validate) fits in i32.
                let number = i as i32 + 1;
                let len = chunk.len() as i64;
                async move {
                    // Copied only when the part's turn comes: at most PART_CONCURRENCY parts
                    // in memory besides the caller's value.
                    let body = ByteStream::from(chunk.to_vec());
                    RequestStats::add(&self.stats.puts, 1);
                    let out = self
                        .client
                        .upload_part()
                        .bucket(&self.bucket)
                        .key(object)
                        .upload_id(upload_id)
                        .part_number(number)
                        .checksum_algorithm(ChecksumAlgorithm::Crc32)
                        .content_length(len)
                        .body(body)
                        .send()
                        .await
                        .map_err(|e| classify(BACKEND, "put", e).error)?;
                    let etag = out.e_tag().ok_or_else(|| {
                        transient(
                            BACKEND,
                            "put",
                            format!("UploadPart {number} returned no ETag"),
                        )
                    })?;
                    Ok::<_, MailboxError>(
                        CompletedPart::builder()
                            .part_number(number)
                            .e_tag(etag)
                            .set_checksum_crc32(out.checksum_crc32().map(str::to_owned))
                            .build(),
                    )
                }
            })
            .collect();
        let mut parts: Vec<CompletedPart> = futures::stream::iter(uploads)
            .buffer_unordered(PART_CONCURRENCY)
            .try_collect()
            .await?;
        parts.sort_by_key(|p| p.part_number());
        Ok(parts)
    }

    /// GetObject; `Ok(None)` when the key is missing.
    async fn get_object(
        &self,
        key: &str,
        op: &'static str,
    ) -> Result<Option<Vec<u8>>, MailboxError> {
        RequestStats::add(&self.stats.gets, 1);
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.object_key(key))
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) => {
                let no_such_key =
                    matches!(e.as_service_error(), Some(GetObjectError::NoSuchKey(_)));
                let c = classify(BACKEND, op, e);
                if no_such_key || c.status == Some(404) {
                    RequestStats::add(&self.stats.empty_gets, 1);
                    return Ok(None);
                }
                return Err(c.error);
            }
        };
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|e| transient(BACKEND, op, format!("reading the object body failed: {e}")))?
            .into_bytes();
        RequestStats::add(&self.stats.bytes_got, bytes.len() as u64);
        Ok(Some(bytes.to_vec()))
    }

    async fn delete_batch(&self, keys: &[String]) -> Result<(), MailboxError> {
        const OP: &str = "delete";
        if self.batch_delete.load(Ordering::Relaxed) {
            let objects = keys
                .iter()
                .map(|k| ObjectIdentifier::builder().key(self.object_key(k)).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| fatal(BACKEND, OP, format!("object identifier: {e}")))?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| fatal(BACKEND, OP, format!("delete request: {e}")))?;
            RequestStats::add(&self.stats.deletes, 1);
            match self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
            {
                Ok(out) => {
                    // Quiet mode lists only failures; a key that is already gone is no failure.
                    let failed: Vec<String> = out
                        .errors()
                        .iter()
                        .filter(|e| e.code() != Some("NoSuchKey"))
                        .map(|e| {
                            format!(
                                "{}: {} {}",
                                e.key().unwrap_or("?"),
                                e.code().unwrap_or("?"),
                                e.message().unwrap_or("")
                            )
                        })
                        .collect();
                    if failed.is_empty() {
                        return Ok(());
                    }
                    let n = failed.len();
                    return Err(transient(
                        BACKEND,
                        OP,
                        format!(
                            "DeleteObjects failed for {n} of {} keys: {}",
                            keys.len(),
                            failed.into_iter().take(3).collect::<Vec<_>>().join("; ")
                        ),
                    ));
                }
                Err(e) => {
                    let c = classify(BACKEND, OP, e);
                    if !(c.code.as_deref() == Some("NotImplemented")
                        || matches!(c.status, Some(501 | 405)))
                    {
                        return Err(c.error);
                    }
                    tracing::debug!(bucket = %self.bucket, "server lacks DeleteObjects: deleting key by key");
                    self.batch_delete.store(false, Ordering::Relaxed);
                }
            }
        }
        for key in keys {
            self.delete_one(key, OP).await?;
        }
        Ok(())
    }

    async fn delete_one(&self, key: &str, op: &'static str) -> Result<(), MailboxError> {
        delete_object_as(
            op,
            self.client.clone(),
            self.bucket.clone(),
            self.object_key(key),
            Arc::clone(&self.stats),
        )
        .await
    }

    /// `put` of `head` followed by `body`: one PutObject, or a multipart upload when the
    /// **payload** (`body`) is above the threshold. The adapter's 13-byte header must not push
    /// a message of exactly the threshold (16 MiB by default) into a multipart upload, which
    /// costs create + parts + complete instead of one PUT.
    async fn store(&self, key: &str, head: &[u8], body: &[u8]) -> Result<(), MailboxError> {
        let len = head.len() + body.len();
        if len > self.max_value {
            return Err(fatal(
                BACKEND,
                "put",
                format!(
                    "value of {len} bytes exceeds the S3 mailbox limit of {} bytes (max_value)",
                    self.max_value
                ),
            ));
        }
        let joined = || {
            let mut value = Vec::with_capacity(len);
            value.extend_from_slice(head);
            value.extend_from_slice(body);
            value
        };
        if body.len() <= self.multipart_threshold {
            self.put_single(key, joined()).await?;
        } else if head.is_empty() {
            self.put_multipart(key, body).await?;
        } else {
            self.put_multipart(key, &joined()).await?;
        }
        RequestStats::add(&self.stats.bytes_put, len as u64);
        Ok(())
    }

    async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, MailboxError> {
        const OP: &str = "list";
        let full = self.object_key(prefix);
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_LIST_PAGES {
            RequestStats::add(&self.stats.lists, 1);
            let out = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| classify(BACKEND, OP, e).error)?;
            keys.extend(
                out.contents()
                    .iter()
                    .filter_map(|o| o.key())
                    .filter_map(|k| k.strip_prefix(self.prefix.as_str()))
                    .map(str::to_owned),
            );
            match (out.is_truncated(), out.next_continuation_token()) {
                (Some(true), Some(next)) => token = Some(next.to_owned()),
                _ => return Ok(keys),
            }
        }
        Err(fatal(
            BACKEND,
            OP,
            format!("listing '{full}' returned more than {MAX_LIST_PAGES} pages"),
        ))
    }
}

impl Mailbox for S3Mailbox {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn limits(&self) -> MailboxLimits {
        MailboxLimits::new(self.max_value, false)
    }

    fn put<'a>(&'a self, key: &'a str, value: &'a [u8]) -> BoxFuture<'a, Result<(), MailboxError>> {
        self.store(key, &[], value).boxed()
    }

    fn put_parts<'a>(
        &'a self,
        key: &'a str,
        head: &'a [u8],
        body: &'a [u8],
    ) -> BoxFuture<'a, Result<(), MailboxError>> {
        self.store(key, head, body).boxed()
    }

    fn take<'a>(
        &'a self,
        key: &'a str,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, MailboxError>> {
        async move {
            // S3 has no atomic get-and-delete, and needs none: each key has exactly one reader
            // (its destination rank) and a GET can be repeated. Once the value is read it is
            // returned whatever happens to the delete (retried inline, then in the background:
            // `delete_read`): a delete that was applied but whose answer was lost must not turn
            // into an error, since the adapter's retry would then find nothing and the message
            // would be lost.
            let Some(value) = self.get_object(key, "take").await? else {
                return Ok(None);
            };
            let client = self.client.clone();
            let bucket = self.bucket.clone();
            let object = self.object_key(key);
            let stats = Arc::clone(&self.stats);
            crate::delete_read(BACKEND, key, deadline, Arc::clone(&self.stats), move || {
                delete_object(
                    client.clone(),
                    bucket.clone(),
                    object.clone(),
                    Arc::clone(&stats),
                )
            })
            .await;
            Ok(Some(value))
        }
        .boxed()
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, MailboxError>> {
        self.get_object(key, "get").boxed()
    }

    fn delete<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<(), MailboxError>> {
        async move {
            for batch in keys.chunks(DELETE_BATCH) {
                self.delete_batch(batch).await?;
            }
            Ok(())
        }
        .boxed()
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, MailboxError>> {
        self.list_keys(prefix).boxed()
    }

    fn incr<'a>(
        &'a self,
        _key: &'a str,
        _by: i64,
    ) -> Option<BoxFuture<'a, Result<i64, MailboxError>>> {
        // S3 has no atomic read-modify-write; the adapter uses list-based schemes instead.
        None
    }

    fn stats(&self) -> &RequestStats {
        &self.stats
    }
}

/// One DeleteObject (idempotent: S3 answers 204 for a missing key; some servers say 404).
fn delete_object(
    client: Client,
    bucket: String,
    object: String,
    stats: Arc<RequestStats>,
) -> BoxFuture<'static, Result<(), MailboxError>> {
    delete_object_as("take", client, bucket, object, stats).boxed()
}

async fn delete_object_as(
    op: &'static str,
    client: Client,
    bucket: String,
    object: String,
    stats: Arc<RequestStats>,
) -> Result<(), MailboxError> {
    RequestStats::add(&stats.deletes, 1);
    match client
        .delete_object()
        .bucket(bucket)
        .key(object)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => {
            let c = classify(BACKEND, op, e);
            if c.status == Some(404) {
                Ok(())
            } else {
                Err(c.error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_with_defaults_and_rejects_unknown_fields() {
        let c: S3Config = toml::from_str(
            "bucket = \"b\"\nprefix = \"fmi/\"\nregion = \"eu-west-1\"\nendpoint = \"http://127.0.0.1:9000\"",
        )
        .expect("parses");
        assert_eq!(
            c,
            S3Config {
                prefix: "fmi/".into(),
                region: Some("eu-west-1".into()),
                endpoint: Some("http://127.0.0.1:9000".into()),
                ..S3Config::new("b")
            }
        );
        assert_eq!(c.max_value, 64 * MIB);
        assert!(c.validate().is_ok());
        assert!(toml::from_str::<S3Config>("bucket = \"b\"\nbukket = \"typo\"").is_err());
        assert!(
            toml::from_str::<S3Config>("prefix = \"p\"").is_err(),
            "bucket is required"
        );
    }

    #[test]
    fn validation_names_the_bad_setting() {
        let err = |c: S3Config| c.validate().expect_err("invalid").to_string();
        assert!(err(S3Config::new("")).contains("bucket"));
        assert!(err(S3Config {
            part_size: MIN_PART_SIZE - 1,
            ..S3Config::new("b")
        })
        .contains("part_size"));
        assert!(err(S3Config {
            max_value: MAX_PARTS * MIN_PART_SIZE + 1,
            part_size: MIN_PART_SIZE,
            ..S3Config::new("b")
        })
        .contains("parts"));
    }
}
