//! Turning SDK errors into [`MailboxError`] without leaking SDK types.
//!
//! The adapter retries what is marked `retryable`, so the classification matters: throttling,
//! timeouts, 5xx answers and failures to send or read a response are transient; anything the
//! server answered with a 4xx (bad request, access denied, missing table, item too large) is not.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use fmi_storage::MailboxError;

/// Error codes that AWS services use for throttling and transient server trouble, whatever the
/// HTTP status says (DynamoDB throttles with 400 + `ProvisionedThroughputExceededException`).
const TRANSIENT_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "TransactionInProgressException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "LimitExceededException",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "InternalServerError",
    "InternalFailure",
    "ServiceUnavailable",
];

/// What [`classify`] found out about an SDK error.
pub(crate) struct Classified {
    /// HTTP status of the answer, when there was one.
    pub(crate) status: Option<u16>,
    /// The service's error code (`NoSuchKey`, `ResourceNotFoundException`, ...).
    pub(crate) code: Option<String>,
    /// The error as a `MailboxError`.
    pub(crate) error: MailboxError,
}

/// Maps any SDK error of the S3 or DynamoDB client (both use the same smithy `SdkError`).
pub(crate) fn classify<E>(
    backend: &'static str,
    op: &'static str,
    err: SdkError<E, HttpResponse>,
) -> Classified
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let (status, code, retryable, detail) = match &err {
        SdkError::ServiceError(ctx) => {
            let status = ctx.raw().status().as_u16();
            let code = ctx.err().code().map(str::to_owned);
            let message = ctx.err().message().unwrap_or("");
            let transient = status >= 500
                || status == 429
                || code
                    .as_deref()
                    .is_some_and(|c| TRANSIENT_CODES.contains(&c));
            let detail = format!(
                "HTTP {status} {}{}{}",
                code.as_deref().unwrap_or("(no error code)"),
                if message.is_empty() { "" } else { ": " },
                message
            );
            (Some(status), code, transient, detail)
        }
        SdkError::TimeoutError(_) => (None, None, true, "request timed out".to_owned()),
        SdkError::DispatchFailure(d) => {
            // A user error here is a configuration problem (bad endpoint URL, no HTTP client);
            // connection refused/reset and timeouts are worth another try.
            let retryable = !d.is_user();
            (
                None,
                None,
                retryable,
                format!("could not send the request: {}", chain(&err)),
            )
        }
        SdkError::ResponseError(ctx) => {
            // The server answered but the answer could not be read (truncated body, bad XML).
            let status = ctx.raw().status().as_u16();
            (
                Some(status),
                None,
                true,
                format!("unreadable response (HTTP {status}): {}", chain(&err)),
            )
        }
        SdkError::ConstructionFailure(_) => (
            None,
            None,
            false,
            format!("could not build the request: {}", chain(&err)),
        ),
        // SdkError is non-exhaustive: new kinds are treated as transient once.
        _ => (None, None, true, chain(&err)),
    };
    Classified {
        status,
        code,
        error: MailboxError {
            backend,
            op,
            retryable,
            detail,
        },
    }
}

/// The error with its sources. SDK errors never carry credentials (signing happens after the
/// request is built and the signature is not part of any error message).
fn chain<E>(err: &SdkError<E, HttpResponse>) -> String
where
    E: std::error::Error + 'static,
{
    DisplayErrorContext(err).to_string()
}

/// A non-retryable error made by this crate (configuration, limits, unexpected answers).
pub(crate) fn fatal(backend: &'static str, op: &'static str, detail: String) -> MailboxError {
    MailboxError {
        backend,
        op,
        retryable: false,
        detail,
    }
}

/// A retryable error made by this crate (an answer that may be complete next time).
pub(crate) fn transient(backend: &'static str, op: &'static str, detail: String) -> MailboxError {
    MailboxError {
        backend,
        op,
        retryable: true,
        detail,
    }
}
