//! Shared AWS SDK setup: region, credentials, timeouts, retries and the HTTP client.

use std::time::Duration;

use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};

/// Region used when neither the config nor the environment (`AWS_REGION`, profile) names one.
/// Non-AWS servers ignore the region but SigV4 signing needs one.
pub(crate) const FALLBACK_REGION: &str = "us-east-1";

/// Connecting to a server that does not answer in 3 s will not work at all; failing fast lets
/// the adapter retry (or report) instead of hanging until the message deadline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Loads the region, credentials (the standard chain: environment, profile, web identity, ECS,
/// IMDS) and endpoint settings (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_<SERVICE>`) the way every
/// AWS SDK does.
///
/// The SDK's own retries are switched off: the storage adapter retries every error marked
/// retryable with its own backoff and deadline, and one policy (instead of two stacked ones)
/// keeps [`fmi_storage::RequestStats`] an exact count of the HTTP requests sent, which is what
/// the cost model bills.
pub(crate) async fn load(region: Option<&str>, attempt_timeout: Duration) -> SdkConfig {
    let region = RegionProviderChain::first_try(region.map(|r| Region::new(r.to_owned())))
        .or_default_provider()
        .or_else(Region::from_static(FALLBACK_REGION));
    aws_config::defaults(BehaviorVersion::latest())
        .region(region)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(attempt_timeout)
                .build(),
        )
        .load()
        .await
}

/// Whether an endpoint override is in force for `service` (`"S3"`, `"DYNAMODB"`) through the
/// SDK's standard environment variables.
pub(crate) fn env_endpoint(service: &str) -> Option<String> {
    std::env::var(format!("AWS_ENDPOINT_URL_{service}"))
        .ok()
        .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
        .filter(|v| !v.is_empty())
}

/// Seconds since the Unix epoch (for TTL attributes).
pub(crate) fn epoch_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
