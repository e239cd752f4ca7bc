//! The DynamoDB mailbox: one item per value.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::operation::create_table::CreateTableError;
use aws_sdk_dynamodb::operation::describe_table::DescribeTableError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, ConsumedCapacity, DeleteRequest,
    KeySchemaElement, KeyType, ReturnConsumedCapacity, ReturnValue, ScalarAttributeType,
    TableStatus, TimeToLiveSpecification, TimeToLiveStatus, WriteRequest,
};
use aws_sdk_dynamodb::Client;
use fmi_channels::Instant;
use fmi_storage::{Mailbox, MailboxError, MailboxLimits, RequestStats};
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::{Deserialize, Serialize};

use crate::error::{classify, fatal, transient};
use crate::sdk;

const BACKEND: &str = "dynamodb";

/// Partition key attribute (string): the mailbox key.
pub const KEY_ATTR: &str = "k";
/// Value attribute (binary). Left out for an empty value.
pub const VALUE_ATTR: &str = "v";
/// Counter attribute (number) of [`Mailbox::incr`] items.
pub const COUNTER_ATTR: &str = "n";
/// Number-set attribute beside a counter: the ranks counted by [`Mailbox::incr_marking`].
pub(crate) const MEMBERS_ATTR: &str = "m";
/// Jobs up to this many ranks record members: 128 ranks of at most 3 digits keep a counter item
/// well under the 1 KB billed as one write unit.
pub(crate) const MARK_MAX_RANKS: u32 = 128;
/// Expiry attribute (number, epoch seconds) that the table's TTL setting watches.
pub const TTL_ATTR: &str = "ttl";

/// DynamoDB's item limit is 400 KB, counting attribute names and values. Values up to this size
/// leave ample room for the key (adapter keys are < 100 B), the attribute names and the TTL
/// number; the adapter cuts larger messages into chunks of this size.
pub const DEFAULT_MAX_VALUE: usize = 350_000;
/// DynamoDB's hard item-size limit, in bytes.
pub const ITEM_LIMIT: usize = 400 * 1024;
/// BatchWriteItem takes at most 25 requests.
const DELETE_BATCH: usize = 25;
/// Rounds of resubmitting BatchWriteItem's unprocessed items before giving up (retryable).
const UNPROCESSED_ROUNDS: u32 = 8;
/// Upper bound on Scan pages (1 MB each) so a misbehaving server cannot loop forever.
const MAX_SCAN_PAGES: usize = 100_000;
/// How long `take` waits for the answer to its first DeleteItem before delivering the value
/// it read and leaving the delete to retries (well under the adapter's grace past a deadline).
const DELETE_FIRST: Duration = Duration::from_millis(500);
/// How long `setup` waits for a new table to become ACTIVE (AWS: seconds; dynalite: at once).
const TABLE_ACTIVE_WAIT: Duration = Duration::from_secs(120);

fn default_max_value() -> usize {
    DEFAULT_MAX_VALUE
}
fn default_ttl_secs() -> u64 {
    // A day: long past any job's deadline, short enough that crashed jobs cost little.
    24 * 60 * 60
}
fn default_timeout_secs() -> u64 {
    10
}

/// Configuration of the DynamoDB mailbox (`[channels.dynamodb]` in the fmi config file).
///
/// ```toml
/// [channels.dynamodb]
/// table = "fmi-mailbox"
/// region = "us-east-1"                  # else AWS_REGION / profile / us-east-1
/// endpoint = "http://127.0.0.1:8000"    # else AWS_ENDPOINT_URL_DYNAMODB / AWS_ENDPOINT_URL / AWS
/// ```
///
/// Credentials always come from the standard AWS chain, never from this file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamoConfig {
    /// The table (must exist: see [`DynamoMailbox::setup`]); partition key `k` (string).
    pub table: String,
    /// AWS region; `None` uses the standard chain, then `us-east-1`.
    #[serde(default)]
    pub region: Option<String>,
    /// Endpoint URL of a non-AWS server (DynamoDB Local, dynalite); `None` uses
    /// `AWS_ENDPOINT_URL_DYNAMODB` / `AWS_ENDPOINT_URL` or AWS itself.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Largest value one `put` accepts, at most 390,000 bytes. Default 350,000.
    #[serde(default = "default_max_value")]
    pub max_value: usize,
    /// Items expire this many seconds after they were written (through the table's TTL
    /// setting, when enabled: DynamoDB deletes expired items within days, for free). Default
    /// one day.
    #[serde(default = "default_ttl_secs")]
    pub ttl_secs: u64,
    /// Time limit of one HTTP request (one attempt). Default 10 s.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
}

impl DynamoConfig {
    /// A configuration for `table` with every other setting at its default.
    pub fn new(table: impl Into<String>) -> Self {
        Self {
            table: table.into(),
            region: None,
            endpoint: None,
            max_value: default_max_value(),
            ttl_secs: default_ttl_secs(),
            timeout_secs: default_timeout_secs(),
        }
    }

    fn validate(&self) -> Result<(), MailboxError> {
        let bad = |what: String| Err(fatal(BACKEND, "config", what));
        // DynamoDB table names: 3..=255 characters of [a-zA-Z0-9_.-].
        let valid_name = (3..=255).contains(&self.table.len())
            && self
                .table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !valid_name {
            return bad(format!(
                "[channels.dynamodb] table = {:?} is not a valid DynamoDB table name (3 to 255 of \
                 a-z A-Z 0-9 _ - .)",
                self.table
            ));
        }
        // Keep 10 KB for the key, attribute names and TTL so an item never hits 400 KB.
        if self.max_value == 0 || self.max_value > ITEM_LIMIT - 10_000 {
            return bad(format!(
                "[channels.dynamodb] max_value = {} must be between 1 and {} (items are limited \
                 to {ITEM_LIMIT} bytes including key and attribute names)",
                self.max_value,
                ITEM_LIMIT - 10_000
            ));
        }
        if self.timeout_secs == 0 {
            return bad("[channels.dynamodb] timeout_secs must be positive".into());
        }
        Ok(())
    }
}

/// What [`DynamoMailbox::setup`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DynamoSetup {
    /// The table was created now (false: it existed).
    pub created: bool,
    /// The TTL setting on [`TTL_ATTR`] is enabled (false: the server does not support it).
    pub ttl_enabled: bool,
}

/// Mailbox on a DynamoDB table: each value is one item `{k: key, v: value, ttl: expiry}`.
///
/// Requests per operation: `put` 1 PutItem; `take` 1 strongly consistent GetItem, plus 1
/// DeleteItem when something was there; `get` 1 GetItem; `list` 1 Scan per MB of table; `delete` 1 BatchWriteItem per 25 keys;
/// `incr` 1 UpdateItem.
pub struct DynamoMailbox {
    client: Client,
    table: String,
    endpoint: Option<String>,
    max_value: usize,
    ttl_secs: u64,
    stats: Arc<RequestStats>,
}

impl fmt::Debug for DynamoMailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynamoMailbox")
            .field("table", &self.table)
            .field("endpoint", &self.endpoint)
            .field("max_value", &self.max_value)
            .finish_non_exhaustive()
    }
}

async fn client_for(config: &DynamoConfig) -> Result<(Client, Option<String>), MailboxError> {
    config.validate()?;
    let sdk = sdk::load(
        config.region.as_deref(),
        Duration::from_secs(config.timeout_secs),
    )
    .await;
    let endpoint = config
        .endpoint
        .clone()
        .or_else(|| sdk::env_endpoint("DYNAMODB"));
    let mut builder = aws_sdk_dynamodb::config::Builder::from(&sdk);
    if let Some(url) = &config.endpoint {
        builder = builder.endpoint_url(url);
    }
    Ok((Client::from_conf(builder.build()), endpoint))
}

fn describe_place(table: &str, endpoint: Option<&str>) -> String {
    match endpoint {
        Some(e) => format!("table '{table}' at {e}"),
        None => format!("table '{table}' on AWS"),
    }
}

/// Size of an item as DynamoDB bills it: attribute names plus values (a number takes about one
/// byte per two digits plus one).
fn item_size(key_len: usize, value_len: usize) -> usize {
    KEY_ATTR.len() + key_len + VALUE_ATTR.len() + value_len + TTL_ATTR.len() + 7
}

/// Capacity units the server reported, or `estimate` when it reported none (a server may leave
/// `ConsumedCapacity` out). Units are rounded up to whole units.
fn units(reported: Option<&ConsumedCapacity>, estimate: u64) -> u64 {
    match reported.and_then(|c| c.capacity_units()) {
        Some(u) if u > 0.0 => u.ceil() as u64,
        _ => estimate,
    }
}

/// Write units of an item of `size` bytes: one per KB started, at least one.
fn write_units(size: usize) -> u64 {
    size.div_ceil(1024).max(1) as u64
}

/// Strongly consistent read units of `size` bytes: one per 4 KB started, at least one.
fn read_units(size: usize) -> u64 {
    size.div_ceil(4096).max(1) as u64
}

/// The value of an item (missing `v` is the empty value).
fn value_of(mut item: HashMap<String, AttributeValue>) -> Result<Vec<u8>, String> {
    match item.remove(VALUE_ATTR) {
        None => Ok(Vec::new()),
        Some(AttributeValue::B(blob)) => Ok(blob.into_inner()),
        Some(other) => Err(format!("attribute '{VALUE_ATTR}' is not binary: {other:?}")),
    }
}

impl DynamoMailbox {
    /// Connects and checks that the table exists and is reachable with the current credentials
    /// (one DescribeTable request: a free control-plane call, so not in the request counters),
    /// so that a wrong name fails here and not at the first send.
    pub async fn connect(config: DynamoConfig) -> Result<Self, MailboxError> {
        let (client, endpoint) = client_for(&config).await?;
        let stats = RequestStats::default();
        let place = describe_place(&config.table, endpoint.as_deref());
        crate::with_connect_retries(&stats, || Self::check_table(&client, &config.table, &place))
            .await?;
        Ok(Self {
            client,
            table: config.table,
            endpoint,
            max_value: config.max_value,
            ttl_secs: config.ttl_secs,
            stats: Arc::new(stats),
        })
    }

    /// One DescribeTable, its failure explained.
    async fn check_table(
        client: &aws_sdk_dynamodb::Client,
        table: &str,
        place: &str,
    ) -> Result<(), MailboxError> {
        match client.describe_table().table_name(table).send().await {
            Ok(out) => {
                let status = out.table().and_then(|t| t.table_status());
                if matches!(status, Some(TableStatus::Deleting)) {
                    return Err(fatal(
                        BACKEND,
                        "connect",
                        format!("{place} is being deleted"),
                    ));
                }
            }
            Err(e) => {
                let missing = matches!(
                    e.as_service_error(),
                    Some(DescribeTableError::ResourceNotFoundException(_))
                );
                let c = classify(BACKEND, "connect", e);
                if missing || c.code.as_deref() == Some("ResourceNotFoundException") {
                    return Err(fatal(
                        BACKEND,
                        "connect",
                        format!(
                            "{place} does not exist: create it (`fmi setup`, or \
                             DynamoMailbox::setup)"
                        ),
                    ));
                }
                return Err(MailboxError {
                    detail: format!("cannot reach {place}: {}", c.error.detail),
                    ..c.error
                });
            }
        }
        Ok(())
    }

    /// Creates the table if it does not exist (partition key `k` string, on-demand billing),
    /// waits until it is ACTIVE, and enables TTL on [`TTL_ATTR`] where the server supports it.
    /// Idempotent; for tests and `fmi setup`.
    pub async fn setup(config: &DynamoConfig) -> Result<DynamoSetup, MailboxError> {
        const OP: &str = "setup";
        let (client, _) = client_for(config).await?;
        let key_def = AttributeDefinition::builder()
            .attribute_name(KEY_ATTR)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(|e| fatal(BACKEND, OP, e.to_string()))?;
        let key_schema = KeySchemaElement::builder()
            .attribute_name(KEY_ATTR)
            .key_type(KeyType::Hash)
            .build()
            .map_err(|e| fatal(BACKEND, OP, e.to_string()))?;
        let created = match client
            .create_table()
            .table_name(&config.table)
            .attribute_definitions(key_def)
            .key_schema(key_schema)
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await
        {
            Ok(_) => true,
            Err(e) => {
                let in_use = matches!(
                    e.as_service_error(),
                    Some(CreateTableError::ResourceInUseException(_))
                );
                let c = classify(BACKEND, OP, e);
                if !(in_use || c.code.as_deref() == Some("ResourceInUseException")) {
                    return Err(c.error);
                }
                false
            }
        };
        wait_active(&client, &config.table).await?;
        let ttl_enabled = enable_ttl(&client, &config.table).await?;
        Ok(DynamoSetup {
            created,
            ttl_enabled,
        })
    }

    /// The table.
    pub fn table(&self) -> &str {
        &self.table
    }

    fn expiry(&self) -> AttributeValue {
        AttributeValue::N((sdk::epoch_secs() + self.ttl_secs).to_string())
    }

    fn key(key: &str) -> AttributeValue {
        AttributeValue::S(key.to_owned())
    }

    async fn put_item(&self, key: &str, value: &[u8]) -> Result<(), MailboxError> {
        const OP: &str = "put";
        if value.len() > self.max_value {
            return Err(fatal(
                BACKEND,
                OP,
                format!(
                    "value of {} bytes exceeds the DynamoDB mailbox limit of {} bytes \
                     (max_value; items are limited to {ITEM_LIMIT} bytes)",
                    value.len(),
                    self.max_value
                ),
            ));
        }
        let mut req = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(KEY_ATTR, Self::key(key))
            .item(TTL_ATTR, self.expiry())
            // Exactly once: if a retried put finds the item already there, the first attempt
            // went through. Keys are unique per message chunk, so an existing item is always
            // this very value.
            .condition_expression("attribute_not_exists(k)")
            .return_consumed_capacity(ReturnConsumedCapacity::Total);
        // Empty binary attributes are rejected by older servers; an absent `v` means empty.
        if !value.is_empty() {
            req = req.item(VALUE_ATTR, AttributeValue::B(Blob::new(value.to_vec())));
        }
        RequestStats::add(&self.stats.puts, 1);
        let estimate = write_units(item_size(key.len(), value.len()));
        match req.send().await {
            Ok(out) => {
                RequestStats::add(
                    &self.stats.write_units,
                    units(out.consumed_capacity(), estimate),
                );
            }
            Err(e) => {
                let exists = matches!(
                    e.as_service_error(),
                    Some(PutItemError::ConditionalCheckFailedException(_))
                );
                let c = classify(BACKEND, OP, e);
                // A failed condition still consumes (at least) one write unit.
                RequestStats::add(&self.stats.write_units, 1);
                if !(exists || c.code.as_deref() == Some("ConditionalCheckFailedException")) {
                    return Err(c.error);
                }
            }
        }
        RequestStats::add(&self.stats.bytes_put, value.len() as u64);
        Ok(())
    }

    async fn take_item(
        &self,
        key: &str,
        deadline: Instant,
    ) -> Result<Option<Vec<u8>>, MailboxError> {
        // Read, then delete: a strongly consistent GetItem (repeatable), then a DeleteItem,
        // the value returned whatever happens to the delete. One DeleteItem with
        // ReturnValues=ALL_OLD alone would save a request, but when the delete is applied and
        // its answer lost (a connection cut) the retry finds nothing and the message is lost.
        let Some(value) = self.get_item(key, "take").await? else {
            return Ok(None);
        };
        // The first delete still asks for the old item: if it answers, it tells whether this
        // taker removed the item or another taker got there first (the adapter never has two
        // takers of one key, but the Mailbox contract lets a value be taken once). If it fails
        // or is slow, the outcome is unknown, so the value is delivered and the (idempotent)
        // delete retried: a lost answer must not lose the message.
        let first = tokio::time::timeout(
            DELETE_FIRST,
            delete_item(
                self.client.clone(),
                self.table.clone(),
                key.to_owned(),
                Arc::clone(&self.stats),
            ),
        )
        .await;
        match first {
            Ok(Ok(true)) => return Ok(Some(value)),
            Ok(Ok(false)) => {
                RequestStats::add(&self.stats.empty_gets, 1);
                return Ok(None);
            }
            Ok(Err(e)) if !e.retryable => {
                tracing::warn!(%key, error = %e, "could not delete an item after reading it; it expires or goes with cleanup");
                return Ok(Some(value));
            }
            _ => {}
        }
        RequestStats::add(&self.stats.retries, 1);
        let client = self.client.clone();
        let table = self.table.clone();
        let stats = Arc::clone(&self.stats);
        let item_key = key.to_owned();
        crate::delete_read(BACKEND, key, deadline, Arc::clone(&self.stats), move || {
            delete_item(
                client.clone(),
                table.clone(),
                item_key.clone(),
                Arc::clone(&stats),
            )
            .map(|r| r.map(|_| ()))
        })
        .await;
        Ok(Some(value))
    }

    async fn get_item(&self, key: &str, op: &'static str) -> Result<Option<Vec<u8>>, MailboxError> {
        RequestStats::add(&self.stats.gets, 1);
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(KEY_ATTR, Self::key(key))
            .consistent_read(true)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| classify(BACKEND, op, e).error)?;
        let consumed = out.consumed_capacity().cloned();
        let Some(item) = out.item else {
            RequestStats::add(&self.stats.empty_gets, 1);
            RequestStats::add(&self.stats.read_units, units(consumed.as_ref(), 1));
            return Ok(None);
        };
        let value = value_of(item).map_err(|e| fatal(BACKEND, op, e))?;
        RequestStats::add(
            &self.stats.read_units,
            units(
                consumed.as_ref(),
                read_units(item_size(key.len(), value.len())),
            ),
        );
        RequestStats::add(&self.stats.bytes_got, value.len() as u64);
        Ok(Some(value))
    }

    async fn delete_items(&self, keys: &[String]) -> Result<(), MailboxError> {
        const OP: &str = "delete";
        for batch in keys.chunks(DELETE_BATCH) {
            // BatchWriteItem rejects a batch that names one key twice.
            let mut unique: Vec<&String> = batch.iter().collect();
            unique.sort();
            unique.dedup();
            let mut pending = unique
                .into_iter()
                .map(|k| {
                    DeleteRequest::builder()
                        .key(KEY_ATTR, Self::key(k))
                        .build()
                        .map(|d| WriteRequest::builder().delete_request(d).build())
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| fatal(BACKEND, OP, e.to_string()))?;
            let mut round = 0;
            while !pending.is_empty() {
                if round == UNPROCESSED_ROUNDS {
                    return Err(transient(
                        BACKEND,
                        OP,
                        format!(
                            "{} deletes still unprocessed after {UNPROCESSED_ROUNDS} rounds \
                             (throttled)",
                            pending.len()
                        ),
                    ));
                }
                if round > 0 {
                    // Unprocessed items mean throttling: back off before resubmitting.
                    tokio::time::sleep(Duration::from_millis(25 << round)).await;
                }
                round += 1;
                RequestStats::add(&self.stats.deletes, 1);
                let n = pending.len() as u64;
                let out = self
                    .client
                    .batch_write_item()
                    .request_items(&self.table, std::mem::take(&mut pending))
                    .return_consumed_capacity(ReturnConsumedCapacity::Total)
                    .send()
                    .await
                    .map_err(|e| classify(BACKEND, OP, e).error)?;
                let reported: u64 = out
                    .consumed_capacity()
                    .iter()
                    .filter_map(|c| c.capacity_units())
                    .map(|u| u.ceil() as u64)
                    .sum();
                pending = out
                    .unprocessed_items
                    .and_then(|mut m| m.remove(&self.table))
                    .unwrap_or_default();
                let done = n - pending.len() as u64;
                RequestStats::add(
                    &self.stats.write_units,
                    if reported > 0 { reported } else { done },
                );
            }
        }
        Ok(())
    }

    async fn scan_keys(&self, prefix: &str) -> Result<Vec<String>, MailboxError> {
        const OP: &str = "list";
        let mut keys = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        for _ in 0..MAX_SCAN_PAGES {
            RequestStats::add(&self.stats.lists, 1);
            let out = self
                .client
                .scan()
                .table_name(&self.table)
                .filter_expression("begins_with(k, :p)")
                .expression_attribute_values(":p", Self::key(prefix))
                .projection_expression(KEY_ATTR)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(|e| classify(BACKEND, OP, e).error)?;
            let before = keys.len();
            keys.extend(
                out.items()
                    .iter()
                    .filter_map(|item| match item.get(KEY_ATTR) {
                        Some(AttributeValue::S(k)) => Some(k.clone()),
                        _ => None,
                    }),
            );
            // Estimate (when the server reports nothing): the keys returned; a real Scan bills
            // every item it reads, matching or not.
            let returned: usize = keys[before..].iter().map(|k| k.len() + 1).sum();
            RequestStats::add(
                &self.stats.read_units,
                units(out.consumed_capacity(), read_units(returned)),
            );
            match out.last_evaluated_key {
                Some(last) if !last.is_empty() => start = Some(last),
                _ => return Ok(keys),
            }
        }
        Err(fatal(
            BACKEND,
            OP,
            format!("scanning for '{prefix}' returned more than {MAX_SCAN_PAGES} pages"),
        ))
    }

    async fn incr_counter(
        &self,
        key: &str,
        by: i64,
        member: Option<u32>,
    ) -> Result<i64, MailboxError> {
        const OP: &str = "incr";
        RequestStats::add(&self.stats.counters, 1);
        let update = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(KEY_ATTR, Self::key(key))
            .expression_attribute_names("#n", COUNTER_ATTR)
            // `ttl` is a reserved word in expressions.
            .expression_attribute_names("#t", TTL_ATTR)
            .expression_attribute_values(":by", AttributeValue::N(by.to_string()))
            .expression_attribute_values(":ttl", self.expiry());
        let update = match member {
            Some(m) => update
                .update_expression("ADD #n :by, #m :m SET #t = :ttl")
                .expression_attribute_names("#m", MEMBERS_ATTR)
                .expression_attribute_values(":m", AttributeValue::Ns(vec![m.to_string()])),
            None => update.update_expression("ADD #n :by SET #t = :ttl"),
        };
        let out = update
            .return_values(ReturnValue::UpdatedNew)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| classify(BACKEND, OP, e).error)?;
        RequestStats::add(
            &self.stats.write_units,
            units(
                out.consumed_capacity(),
                write_units(item_size(key.len(), 8)),
            ),
        );
        match out.attributes().and_then(|a| a.get(COUNTER_ATTR)) {
            Some(AttributeValue::N(n)) => n.parse::<i64>().map_err(|e| {
                fatal(
                    BACKEND,
                    OP,
                    format!("counter '{key}' holds {n:?}, not an integer: {e}"),
                )
            }),
            other => Err(fatal(
                BACKEND,
                OP,
                format!("UpdateItem returned no counter for '{key}': {other:?}"),
            )),
        }
    }
}

/// One DeleteItem of a value `take` has read (idempotent: deleting a missing item succeeds),
/// returning whether the item was still there (`ReturnValues=ALL_OLD`; the old item costs no
/// extra units). Billed as a write of the item's size; the estimate, when the server reports
/// nothing, is one unit.
fn delete_item(
    client: Client,
    table: String,
    key: String,
    stats: Arc<RequestStats>,
) -> BoxFuture<'static, Result<bool, MailboxError>> {
    async move {
        RequestStats::add(&stats.deletes, 1);
        let out = client
            .delete_item()
            .table_name(table)
            .key(KEY_ATTR, AttributeValue::S(key))
            .return_values(ReturnValue::AllOld)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| classify(BACKEND, "take", e).error)?;
        RequestStats::add(&stats.write_units, units(out.consumed_capacity(), 1));
        Ok(out.attributes.is_some_and(|a| !a.is_empty()))
    }
    .boxed()
}

async fn wait_active(client: &Client, table: &str) -> Result<(), MailboxError> {
    let give_up = std::time::Instant::now() + TABLE_ACTIVE_WAIT;
    loop {
        let out = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| classify(BACKEND, "setup", e).error)?;
        if matches!(
            out.table().and_then(|t| t.table_status()),
            Some(TableStatus::Active)
        ) {
            return Ok(());
        }
        if std::time::Instant::now() >= give_up {
            return Err(transient(
                BACKEND,
                "setup",
                format!(
                    "table '{table}' not ACTIVE after {} s",
                    TABLE_ACTIVE_WAIT.as_secs()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Enables TTL on [`TTL_ATTR`]; `Ok(false)` if the server does not support TTL.
async fn enable_ttl(client: &Client, table: &str) -> Result<bool, MailboxError> {
    const OP: &str = "setup";
    let unsupported = |code: Option<&str>, status: Option<u16>| {
        matches!(
            code,
            Some("UnknownOperationException" | "NotImplemented" | "UnrecognizedClientException")
        ) || matches!(status, Some(501 | 404))
    };
    match client
        .describe_time_to_live()
        .table_name(table)
        .send()
        .await
    {
        Ok(out) => {
            let d = out.time_to_live_description();
            let on = matches!(
                d.and_then(|d| d.time_to_live_status()),
                Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)
            );
            if on && d.and_then(|d| d.attribute_name()) == Some(TTL_ATTR) {
                return Ok(true);
            }
        }
        Err(e) => {
            let c = classify(BACKEND, OP, e);
            if unsupported(c.code.as_deref(), c.status) {
                return Ok(false);
            }
            return Err(c.error);
        }
    }
    let spec = TimeToLiveSpecification::builder()
        .enabled(true)
        .attribute_name(TTL_ATTR)
        .build()
        .map_err(|e| fatal(BACKEND, OP, e.to_string()))?;
    match client
        .update_time_to_live()
        .table_name(table)
        .time_to_live_specification(spec)
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

impl Mailbox for DynamoMailbox {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn limits(&self) -> MailboxLimits {
        MailboxLimits::new(self.max_value, false)
    }

    fn put<'a>(&'a self, key: &'a str, value: &'a [u8]) -> BoxFuture<'a, Result<(), MailboxError>> {
        self.put_item(key, value).boxed()
    }

    fn take<'a>(
        &'a self,
        key: &'a str,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, MailboxError>> {
        self.take_item(key, deadline).boxed()
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, MailboxError>> {
        self.get_item(key, "get").boxed()
    }

    fn delete<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<(), MailboxError>> {
        self.delete_items(keys).boxed()
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, MailboxError>> {
        self.scan_keys(prefix).boxed()
    }

    fn incr<'a>(
        &'a self,
        key: &'a str,
        by: i64,
    ) -> Option<BoxFuture<'a, Result<i64, MailboxError>>> {
        Some(self.incr_counter(key, by, None).boxed())
    }

    /// A number set beside the counter, in the same UpdateItem, for jobs of at most
    /// [`MARK_MAX_RANKS`] ranks: the item then stays within the 1 KB of one write unit.
    fn incr_marking<'a>(
        &'a self,
        key: &'a str,
        by: i64,
        member: u32,
        of: u32,
    ) -> Option<BoxFuture<'a, Result<i64, MailboxError>>> {
        let member = (of <= MARK_MAX_RANKS).then_some(member);
        Some(self.incr_counter(key, by, member).boxed())
    }

    fn marked<'a>(
        &'a self,
        key: &'a str,
        of: u32,
    ) -> BoxFuture<'a, Result<Option<Vec<fmi_storage::Mark>>, MailboxError>> {
        async move {
            if of > MARK_MAX_RANKS {
                return Ok(None);
            }
            RequestStats::add(&self.stats.gets, 1);
            let out = self
                .client
                .get_item()
                .table_name(&self.table)
                .key(KEY_ATTR, Self::key(key))
                .consistent_read(true)
                .projection_expression("#m")
                .expression_attribute_names("#m", MEMBERS_ATTR)
                .send()
                .await
                .map_err(|e| classify(BACKEND, "marked", e).error)?;
            RequestStats::add(&self.stats.read_units, 1);
            Ok(Some(
                match out.item.as_ref().and_then(|i| i.get(MEMBERS_ATTR)) {
                    Some(AttributeValue::Ns(v)) => v
                        .iter()
                        .filter_map(|n| {
                            Some(fmi_storage::Mark {
                                member: n.parse().ok()?,
                                at: None,
                            })
                        })
                        .collect(),
                    _ => Vec::new(),
                },
            ))
        }
        .boxed()
    }

    fn stats(&self) -> &RequestStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_with_defaults_and_rejects_unknown_fields() {
        let c: DynamoConfig =
            toml::from_str("table = \"fmi-mailbox\"\nregion = \"us-west-2\"").expect("parses");
        assert_eq!(
            c,
            DynamoConfig {
                region: Some("us-west-2".into()),
                ..DynamoConfig::new("fmi-mailbox")
            }
        );
        assert_eq!(c.max_value, DEFAULT_MAX_VALUE);
        assert!(c.validate().is_ok());
        assert!(toml::from_str::<DynamoConfig>("table = \"t\"\nbucket = \"b\"").is_err());
    }

    #[test]
    fn validation_and_unit_estimates() {
        assert!(
            DynamoConfig::new("ab").validate().is_err(),
            "names have 3+ chars"
        );
        assert!(DynamoConfig::new("a b c").validate().is_err());
        let too_big = DynamoConfig {
            max_value: ITEM_LIMIT,
            ..DynamoConfig::new("fmi")
        };
        assert!(too_big.validate().is_err());
        assert_eq!(write_units(0), 1);
        assert_eq!(write_units(1024), 1);
        assert_eq!(write_units(1025), 2);
        assert_eq!(read_units(4096), 1);
        assert_eq!(read_units(4097), 2);
        // The default limit plus a long key stays under DynamoDB's item limit.
        assert!(item_size(1000, DEFAULT_MAX_VALUE) < ITEM_LIMIT);
    }
}
