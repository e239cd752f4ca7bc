//! # An fmi job step as a Lambda handler
//!
//! Every invocation of the function is one rank. The driver that fans the invocations out
//! (`examples/lambda/invoke.py`) puts everything a rank needs to join the job in its event:
//!
//! ```text
//!  driver ──invoke(event rank=0)──▶ handle() ─┐
//!         ──invoke(event rank=1)──▶ handle() ─┼─ join job `job` through `rendezvous` (token),
//!         ──invoke(event rank=N-1)▶ handle() ─┘  allreduce(values), return the sum
//! ```
//!
//! [`handle`] is a plain blocking function with the event and response shapes of the Python
//! handler (`examples/lambda/python/handler.py`); the binary `fmi-lambda-handler` calls it with
//! an event read from its argument or stdin, which is how the tests run N "invocations" as N
//! local processes. To deploy it, wrap it with the `lambda_runtime` crate (see
//! `examples/lambda/README.md`); the blocking communicator must then run on a blocking thread
//! (`tokio::task::spawn_blocking`), since it refuses to block inside the runtime.

use serde::{Deserialize, Serialize};

/// What each invocation receives.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Event {
    /// This invocation's rank, `0..size`.
    pub rank: u32,
    /// The number of invocations (ranks) in the job.
    pub size: u32,
    /// The job id, shared by all invocations of one job (`[A-Za-z0-9._-]{1,64}`).
    pub job: String,
    /// `host:port` of the rendezvous server (needed when `size > 1`).
    #[serde(default)]
    pub rendezvous: Option<String>,
    /// The job's secret token, checked by the rendezvous server.
    #[serde(default)]
    pub token: Option<String>,
    /// Path of a TOML configuration file inside the function's package.
    #[serde(default)]
    pub config: Option<String>,
    /// A channel to force (`"tcp"`, `"redis"`, `"s3"`, ...).
    #[serde(default)]
    pub channel: Option<String>,
    /// This rank's contribution; `[rank + 1]` when absent.
    #[serde(default)]
    pub values: Option<Vec<f64>>,
}

/// What each invocation returns.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Response {
    /// The rank that answered.
    pub rank: u32,
    /// The job's size.
    pub size: u32,
    /// The job id.
    pub job: String,
    /// The element-wise sum of every rank's values.
    pub sum: Vec<f64>,
}

/// Joins the job the event describes, sums every rank's values, and returns the sum.
pub fn handle(event: &Event) -> fmi::Result<Response> {
    let mut settings = fmi::EnvSettings::new(event.rank, event.size, &event.job)?;
    settings.rendezvous = event.rendezvous.clone();
    settings.token = event.token.clone();
    settings.config = event.config.clone().map(Into::into);
    settings.channel = event.channel.clone();
    let comm = fmi::blocking::Communicator::from_settings(settings)?;
    let values = event
        .values
        .clone()
        .unwrap_or_else(|| vec![f64::from(event.rank) + 1.0]);
    let sum = comm.allreduce(&values, fmi::Op::Sum)?;
    Ok(Response {
        rank: comm.rank().0,
        size: comm.size(),
        job: comm.job().to_string(),
        sum,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_rank_job_needs_no_server() {
        let event: Event =
            serde_json::from_str(r#"{"rank": 0, "size": 1, "job": "solo", "values": [1.5, 2]}"#)
                .expect("valid event");
        let response = handle(&event).expect("one rank");
        assert_eq!(response.sum, vec![1.5, 2.0]);
        assert_eq!((response.rank, response.size), (0, 1));
    }

    #[test]
    fn bad_events_are_errors() {
        let event: Event =
            serde_json::from_str(r#"{"rank": 3, "size": 2, "job": "j"}"#).expect("parses");
        assert!(handle(&event).is_err());
    }
}
