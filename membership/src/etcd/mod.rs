//! The etcd side of membership (the `etcd` feature): connecting, bounding every request with a
//! deadline, and the start-up retry loop shared by `register` and `watch`. etcd-client's channel is
//! lazy and load-balanced, so a request to a dead endpoint can wait indefinitely for a connection;
//! every unary call therefore goes through [`rpc`] with the configured request timeout.

mod lease;
mod watcher;

use std::error::Error as _;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::config::MembershipConfig;
use crate::error::MembershipError;

pub use lease::{Registration, register};
pub use watcher::watch;

/// HTTP/2 ping interval on the etcd connection, so that a silently dead peer breaks long-lived
/// streams (watch, keep-alive). etcd answers pings more often than every 5 s with GOAWAY
/// ("too_many_pings", its `--grpc-keepalive-min-time` default), hence 10 s.
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(10);

/// Why one etcd request failed.
#[derive(Debug)]
pub(crate) enum RpcError {
    Timeout(Duration),
    Etcd(etcd_client::Error),
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // etcd-client's and tonic's own Display forms are either terse ("transport error") or a
        // debug dump; the operator needs the gRPC message and the root cause (connection refused,
        // broken pipe), once each.
        match self {
            RpcError::Timeout(d) => write!(f, "no answer within {d:.1?}"),
            RpcError::Etcd(etcd_client::Error::GRpcStatus(s)) => {
                let head = if s.message().is_empty() {
                    format!("{:?}", s.code())
                } else {
                    s.message().to_owned()
                };
                write_with_root_cause(f, &head, s.source())
            }
            RpcError::Etcd(etcd_client::Error::TransportError(e)) => {
                write_with_root_cause(f, &e.to_string(), e.source())
            }
            RpcError::Etcd(e) => write!(f, "{e}"),
        }
    }
}

fn write_with_root_cause(
    f: &mut fmt::Formatter<'_>,
    head: &str,
    source: Option<&(dyn std::error::Error + 'static)>,
) -> fmt::Result {
    let mut root = None;
    let mut cur = source;
    while let Some(s) = cur {
        root = Some(s);
        cur = s.source();
    }
    match root.map(ToString::to_string) {
        Some(r) if !head.contains(&r) => write!(f, "{head}: {r}"),
        _ => write!(f, "{head}"),
    }
}

impl From<etcd_client::Error> for RpcError {
    fn from(e: etcd_client::Error) -> Self {
        RpcError::Etcd(e)
    }
}

impl RpcError {
    /// etcd answered that the lease does not exist (it expired, was revoked, or etcd lost its
    /// data).
    pub(crate) fn is_lease_not_found(&self) -> bool {
        match self {
            // etcd-client reports a keep-alive answered with TTL 0 this way.
            RpcError::Etcd(etcd_client::Error::LeaseKeepAliveError(_)) => true,
            RpcError::Etcd(etcd_client::Error::GRpcStatus(s)) => s.code() == tonic::Code::NotFound,
            _ => false,
        }
    }
}

/// Runs one etcd request under the configured deadline.
pub(crate) async fn rpc<T>(
    cfg: &MembershipConfig,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, RpcError> {
    match tokio::time::timeout(cfg.request_timeout, request).await {
        Ok(r) => r.map_err(RpcError::Etcd),
        Err(_) => Err(RpcError::Timeout(cfg.request_timeout)),
    }
}

/// A client for the configured endpoints. Connecting is lazy: this fails only on malformed
/// endpoints, and reachability shows on the first request.
pub(crate) async fn connect(cfg: &MembershipConfig) -> Result<Client, RpcError> {
    let options = ConnectOptions::new()
        .with_connect_timeout(cfg.connect_timeout)
        .with_keep_alive(HTTP2_PING_INTERVAL, cfg.request_timeout)
        // Without a leader an etcd member's view is stale and its watches go quiet; requiring a
        // leader makes such a member fail requests and cancel watches, which we retry elsewhere.
        .with_require_leader(true);
    Ok(Client::connect(&cfg.endpoints, Some(options)).await?)
}

/// Runs `attempt` until it succeeds, `cfg.max_start_retries` attempts have failed, or the next
/// attempt would start after `cfg.start_retry_deadline`. `what` names the operation in log lines.
///
/// `attempt` is a closure returning a future rather than an async closure: the futures of async
/// closures are not yet provably `Send`, and callers spawn `register` and `watch` onto tokio.
pub(crate) async fn with_start_retry<T, F>(
    cfg: &MembershipConfig,
    what: &str,
    mut attempt: impl FnMut() -> F,
) -> Result<T, MembershipError>
where
    F: Future<Output = Result<T, RpcError>>,
{
    let started = Instant::now();
    let endpoints = cfg.endpoints_display();
    let max = cfg.max_start_retries;
    let mut backoff = Backoff::new(cfg.backoff_initial, cfg.backoff_max);
    let mut n = 0;
    loop {
        n += 1;
        let cause = match attempt().await {
            Ok(v) => {
                if n > 1 {
                    info!("{what}: etcd at {endpoints} reachable after {n} attempts");
                }
                return Ok(v);
            }
            Err(e) => e.to_string(),
        };
        let delay = backoff.next_delay();
        let elapsed = started.elapsed();
        if n >= max || elapsed + delay > cfg.start_retry_deadline {
            return Err(MembershipError::Unreachable {
                endpoints,
                attempts: n,
                elapsed,
                cause,
            });
        }
        warn!(
            "{what}: etcd at {endpoints} unreachable (attempt {n}/{max}): {cause}; retrying in {delay:.1?}"
        );
        tokio::time::sleep(delay).await;
    }
}

/// A lease id as etcdctl prints it (hex), so log lines can be pasted into `etcdctl lease`.
pub(crate) fn lease_hex(id: i64) -> String {
    format!("{id:x}")
}
