//! The worker's side of the registry: `tessera worker --coordinator ADDR` keeps itself registered
//! with the coordinator for as long as it runs.
//!
//! Registration runs in the background and never gives up: a coordinator that is not up yet, that
//! restarted, or whose connection broke is retried with exponential backoff (capped, so a
//! restarted coordinator finds its workers again within a few seconds), and every attempt is
//! logged with its cause. [`Registration::deregister`] stops that and leaves at once (SIGTERM).

use std::time::Duration;

use tessera_proto::worker::v1 as pb;
use tessera_proto::worker::v1::registry_client::RegistryClient;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

use super::{KEEPALIVE, RegistryError};
use crate::cluster::{status_text, with_causes};
use crate::tls::ClusterTls;

/// First retry delay after a failed or lost registration; doubles up to [`BACKOFF_MAX`].
const BACKOFF_INITIAL: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(4);
/// How long connecting and the coordinator's acknowledgement may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A worker's registration, kept alive in the background until dropped or deregistered.
pub struct Registration {
    task: JoinHandle<()>,
    endpoint: Endpoint,
    addr: String,
    worker_id: String,
}

/// `host:port` or `http://host:port` as an endpoint with keep-alives (so a silent coordinator is
/// noticed) and a connect deadline; mutual TLS with `tls` (whatever the scheme said).
fn endpoint(addr: &str, tls: Option<&ClusterTls>) -> Result<Endpoint, RegistryError> {
    let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let bad = || RegistryError::BadAddress(addr.to_string());
    let parsed: tonic::codegen::http::Uri = uri.parse().map_err(|_| bad())?;
    if parsed.host().is_none() || parsed.port().is_none() {
        return Err(bad());
    }
    let endpoint = match tls {
        Some(tls) => tls.endpoint(addr).map_err(|e| RegistryError::Unreachable {
            addr: addr.to_string(),
            detail: e.to_string(),
        })?,
        None => Endpoint::from_shared(uri).map_err(|_| bad())?,
    };
    Ok(endpoint
        .connect_timeout(REQUEST_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE)
        .keep_alive_while_idle(true))
}

impl Registration {
    /// Starts registering `me` with the coordinator at `addr` (on the current tokio runtime) and
    /// returns at once; fails only on an address that cannot be parsed. With `tls` the worker
    /// presents its cluster certificate and accepts only a coordinator whose certificate chains
    /// to the cluster CA.
    pub fn start(
        addr: &str,
        me: pb::RegisterRequest,
        tls: Option<&ClusterTls>,
    ) -> Result<Self, RegistryError> {
        let endpoint = endpoint(addr, tls)?;
        let worker_id = me.worker_id.clone();
        let task = tokio::spawn(keep_registered(endpoint.clone(), addr.to_string(), me));
        Ok(Registration {
            task,
            endpoint,
            addr: addr.to_string(),
            worker_id,
        })
    }

    /// Removes this worker from the coordinator at once, then stops re-registering; true if the
    /// coordinator had it. (The registration's stream is closed only after the answer: closing it
    /// first would race the explicit removal.)
    pub async fn deregister(self) -> Result<bool, RegistryError> {
        let err = |detail: String| RegistryError::Unreachable {
            addr: self.addr.clone(),
            detail,
        };
        let call = async {
            let channel = self
                .endpoint
                .connect()
                .await
                .map_err(|e| err(with_causes(&e)))?;
            RegistryClient::new(channel)
                .deregister(pb::DeregisterRequest {
                    worker_id: self.worker_id.clone(),
                })
                .await
                .map_err(|s| err(status_text(&s)))
        };
        let reply = tokio::time::timeout(REQUEST_TIMEOUT, call)
            .await
            .map_err(|_| err(format!("no answer within {REQUEST_TIMEOUT:?}")))??;
        Ok(reply.into_inner().removed)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One registration: connects, registers, and returns the open stream once acknowledged.
async fn register_once(
    endpoint: &Endpoint,
    me: &pb::RegisterRequest,
) -> Result<(tonic::Streaming<pb::RegisterEvent>, u32), String> {
    let attempt = async {
        let channel: Channel = endpoint.connect().await.map_err(|e| with_causes(&e))?;
        let mut stream = RegistryClient::new(channel)
            .register(me.clone())
            .await
            .map_err(|s| format!("registration refused: {}", status_text(&s)))?
            .into_inner();
        let ack = stream
            .message()
            .await
            .map_err(|s| format!("registration failed: {}", status_text(&s)))?
            .ok_or_else(|| "the coordinator closed the registration at once".to_string())?;
        Ok((stream, ack.members))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, attempt)
        .await
        .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
}

/// Registers, holds the registration while it lasts, and registers again when it ends.
async fn keep_registered(endpoint: Endpoint, addr: String, me: pb::RegisterRequest) {
    let mut delay = BACKOFF_INITIAL;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match register_once(&endpoint, &me).await {
            Ok((mut stream, members)) => {
                tracing::info!(coordinator = %addr, id = %me.worker_id, members, "registered with the coordinator");
                (attempt, delay) = (0, BACKOFF_INITIAL);
                let why = loop {
                    match stream.message().await {
                        Ok(Some(_)) => continue,
                        Ok(None) => break "the coordinator ended the registration".to_string(),
                        Err(s) => break format!("the connection broke ({})", status_text(&s)),
                    }
                };
                tracing::warn!(
                    "registration with the coordinator at {addr} lost: {why}; registering again in {delay:?}"
                );
            }
            Err(e) => tracing::warn!(
                "coordinator at {addr} unreachable (attempt {attempt}): {e}; retrying in {delay:?}"
            ),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_need_a_host_and_a_port() {
        assert!(endpoint("127.0.0.1:7000", None).is_ok());
        assert!(endpoint("http://coordinator:7000", None).is_ok());
        for bad in ["", "coordinator", "http://", "127.0.0.1:port"] {
            let err = endpoint(bad, None).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }
}
