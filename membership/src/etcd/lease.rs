//! A worker's registration: its record stored under a lease, and the task that keeps the lease
//! alive for as long as the worker runs.
//!
//! The keep-alive task never gives up, because a worker that stops trying to be a member is worse
//! than one that waits: a broken stream is retried with jittered backoff on the same lease (an
//! etcd outage shorter than the TTL therefore changes nothing, and a restarted etcd extends
//! surviving leases itself); when etcd says the lease is gone (it expired while the worker was cut
//! off, or etcd lost its data) the task grants a new lease and writes the record again.

use etcd_client::{Client, PutOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use super::{RpcError, connect, lease_hex, rpc, with_start_retry};
use crate::backoff::Backoff;
use crate::config::MembershipConfig;
use crate::error::MembershipError;
use crate::record::WorkerRecord;

/// A worker's live membership. Keep it for the worker's lifetime.
///
/// [`deregister`](Self::deregister) leaves the group at once (a graceful shutdown). Dropping the
/// registration stops the keep-alives without revoking, so the record disappears when the lease
/// expires, exactly as if the process had died.
pub struct Registration {
    cfg: MembershipConfig,
    key: String,
    record: WorkerRecord,
    client: Client,
    lease: watch::Receiver<i64>,
    keeper: Option<JoinHandle<()>>,
}

/// Publishes `record` under `<prefix>/workers/<id>` with a fresh lease and starts keeping it alive.
///
/// If etcd cannot be reached, retries with backoff within `cfg.max_start_retries` and
/// `cfg.start_retry_deadline`, logging each failure, then fails with
/// [`MembershipError::Unreachable`]. A record left by an earlier instance with the same id is
/// replaced (with a warning), so a worker restarted within its old lease's TTL can rejoin.
pub async fn register(
    cfg: &MembershipConfig,
    record: WorkerRecord,
) -> Result<Registration, MembershipError> {
    cfg.validate()?;
    record.validate()?;
    let key = cfg.worker_key(&record.id);
    let value = record.to_json();
    let what = format!("registering worker {}", record.id);
    let (k, v) = (&key, &value);
    let (client, lease) = with_start_retry(cfg, &what, || async move {
        let mut client = connect(cfg).await?;
        let lease = grant_and_put(&mut client, cfg, k, v).await?;
        Ok((client, lease))
    })
    .await?;
    info!(
        worker = %record.id,
        key = %key,
        lease = %lease_hex(lease),
        ttl = ?cfg.lease_ttl,
        "registered in etcd at {}",
        cfg.endpoints_display()
    );
    let (lease_tx, lease_rx) = watch::channel(lease);
    let keeper = Keeper {
        cfg: cfg.clone(),
        client: client.clone(),
        key: key.clone(),
        value,
        worker: record.id.clone(),
        lease_tx,
        outage_since: None,
    };
    let task = tokio::spawn(keeper.run(lease));
    Ok(Registration {
        cfg: cfg.clone(),
        key,
        record,
        client,
        lease: lease_rx,
        keeper: Some(task),
    })
}

impl Registration {
    /// The lease the record is attached to now (it changes when the worker re-registers after
    /// losing its lease).
    pub fn lease_id(&self) -> i64 {
        *self.lease.borrow()
    }

    /// Receives the current lease id whenever the worker re-registers under a new lease.
    pub fn lease_changes(&self) -> watch::Receiver<i64> {
        self.lease.clone()
    }

    /// The etcd key of the record.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The published record.
    pub fn record(&self) -> &WorkerRecord {
        &self.record
    }

    /// Leaves the group now: stops the keep-alives and revokes the lease, which deletes the record
    /// at once. If etcd is unreachable this fails after `request_timeout`, and the record still
    /// disappears when the lease expires.
    pub async fn deregister(mut self) -> Result<(), MembershipError> {
        // The keeper must be gone before the revoke, or it could see the lease vanish and grant a
        // new one.
        if let Some(task) = self.keeper.take() {
            task.abort();
            // A cancelled task reports JoinError::Cancelled; there is nothing else to learn.
            let _ = task.await;
        }
        let lease = self.lease_id();
        match rpc(&self.cfg, self.client.lease_revoke(lease)).await {
            Ok(_) => {
                info!(worker = %self.record.id, key = %self.key, lease = %lease_hex(lease), "deregistered from etcd");
                Ok(())
            }
            Err(e) if e.is_lease_not_found() => {
                // Already expired (etcd was away longer than the TTL): the record is gone too.
                info!(worker = %self.record.id, key = %self.key, lease = %lease_hex(lease), "deregistered: the lease had already expired");
                Ok(())
            }
            Err(e) => Err(MembershipError::Request {
                endpoints: self.cfg.endpoints_display(),
                op: "revoking the lease",
                key: self.key.clone(),
                cause: e.to_string(),
            }),
        }
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // etcd-client's Client has no Debug; the key and lease identify a registration.
        f.debug_struct("Registration")
            .field("key", &self.key)
            .field("lease", &lease_hex(self.lease_id()))
            .finish_non_exhaustive()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(task) = self.keeper.take() {
            task.abort();
        }
    }
}

/// Grants a lease and writes the record under it; returns the lease id.
async fn grant_and_put(
    client: &mut Client,
    cfg: &MembershipConfig,
    key: &str,
    value: &str,
) -> Result<i64, RpcError> {
    // validate() guarantees whole seconds of at least 2.
    let ttl = i64::try_from(cfg.lease_ttl.as_secs()).unwrap_or(i64::MAX);
    let lease = rpc(cfg, client.lease_grant(ttl, None)).await?.id();
    let options = PutOptions::new().with_lease(lease).with_prev_key();
    match rpc(cfg, client.put(key, value, Some(options))).await {
        Ok(resp) => {
            if let Some(prev) = resp.prev_key()
                && prev.lease() != 0
                && prev.lease() != lease
            {
                warn!(
                    key,
                    old_lease = %lease_hex(prev.lease()),
                    new_lease = %lease_hex(lease),
                    "replaced a live record under the same key: an earlier instance of this worker \
                     whose lease has not expired yet, or two workers configured with the same id"
                );
            }
            Ok(lease)
        }
        Err(e) => {
            // Best effort: an orphaned lease holds no keys and expires by itself anyway.
            let _ = rpc(cfg, client.lease_revoke(lease)).await;
            Err(e)
        }
    }
}

/// Why a keep-alive session ended.
enum Ended {
    /// The stream broke or etcd went quiet; the lease may still be alive.
    Interrupted(String),
    /// etcd says the lease no longer exists.
    LeaseGone(String),
}

/// The background task behind a [`Registration`].
struct Keeper {
    cfg: MembershipConfig,
    client: Client,
    key: String,
    value: String,
    worker: String,
    lease_tx: watch::Sender<i64>,
    /// When the current run of failures began, for the "resumed" log line.
    outage_since: Option<Instant>,
}

impl Keeper {
    async fn run(mut self, mut lease: i64) {
        // A restarted etcd extends surviving leases by one TTL; retrying at least every half TTL
        // means the keep-alives resume before that extension runs out.
        let cap = self.cfg.backoff_max.min(self.cfg.lease_ttl / 2);
        let mut backoff = Backoff::new(self.cfg.backoff_initial.min(cap), cap);
        loop {
            match self.keep_alive(lease, &mut backoff).await {
                Ended::Interrupted(cause) => {
                    self.outage_since.get_or_insert_with(Instant::now);
                    let delay = backoff.next_delay();
                    warn!(
                        worker = %self.worker,
                        lease = %lease_hex(lease),
                        "etcd keep-alive at {} interrupted: {cause}; retrying in {delay:.1?}",
                        self.cfg.endpoints_display()
                    );
                    tokio::time::sleep(delay).await;
                    // A fresh client drops whatever state the old connection was left in; it
                    // connects lazily, so this cannot fail for endpoints that validated.
                    if let Ok(client) = connect(&self.cfg).await {
                        self.client = client;
                    }
                }
                Ended::LeaseGone(reason) => {
                    warn!(
                        worker = %self.worker,
                        lease = %lease_hex(lease),
                        key = %self.key,
                        "lease lost ({reason}); registering again with a new lease"
                    );
                    lease = self.reregister(&mut backoff).await;
                    self.outage_since = None;
                    self.lease_tx.send_replace(lease);
                    info!(
                        worker = %self.worker,
                        lease = %lease_hex(lease),
                        key = %self.key,
                        "re-registered in etcd with a new lease"
                    );
                }
            }
        }
    }

    /// Keeps `lease` alive until the stream ends, sending a keep-alive every third of the TTL.
    async fn keep_alive(&mut self, lease: i64, backoff: &mut Backoff) -> Ended {
        let (mut keeper, mut stream) =
            match rpc(&self.cfg, self.client.lease_keep_alive(lease)).await {
                Ok(pair) => pair,
                Err(e) if e.is_lease_not_found() => {
                    return Ended::LeaseGone(format!("etcd no longer knows it: {e}"));
                }
                Err(e) => return Ended::Interrupted(e.to_string()),
            };
        // Opening the stream already renewed the lease once.
        backoff.reset();
        if let Some(since) = self.outage_since.take() {
            info!(
                worker = %self.worker,
                lease = %lease_hex(lease),
                "etcd keep-alive resumed after {:.1?}; the lease survived",
                since.elapsed()
            );
        }
        let mut last_answer = Instant::now();
        let period = self.cfg.lease_ttl / 3;
        let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    // A half-open connection can swallow requests without an error; once no answer
                    // has come for a whole TTL the lease is as good as lost, so start over (which
                    // finds out whether it survived).
                    let silent = last_answer.elapsed();
                    if silent >= self.cfg.lease_ttl {
                        return Ended::Interrupted(format!(
                            "no keep-alive answer for {silent:.1?}, longer than the lease TTL"
                        ));
                    }
                    if let Err(e) = keeper.keep_alive().await {
                        return Ended::Interrupted(RpcError::from(e).to_string());
                    }
                }
                answer = stream.message() => match answer {
                    Ok(Some(resp)) if resp.ttl() <= 0 => {
                        return Ended::LeaseGone("etcd answered a keep-alive with TTL 0".into());
                    }
                    Ok(Some(resp)) => {
                        debug!(worker = %self.worker, lease = %lease_hex(lease), ttl = resp.ttl(), "lease renewed");
                        last_answer = Instant::now();
                    }
                    Ok(None) => return Ended::Interrupted("etcd closed the keep-alive stream".into()),
                    Err(e) => return Ended::Interrupted(RpcError::from(e).to_string()),
                },
            }
        }
    }

    /// Grants a new lease and rewrites the record, retrying until it works: a running worker must
    /// get back into the group whenever etcd is back.
    async fn reregister(&mut self, backoff: &mut Backoff) -> i64 {
        loop {
            match grant_and_put(&mut self.client, &self.cfg, &self.key, &self.value).await {
                Ok(lease) => {
                    backoff.reset();
                    return lease;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(
                        worker = %self.worker,
                        key = %self.key,
                        "re-registering: etcd at {} unreachable: {e}; retrying in {delay:.1?}",
                        self.cfg.endpoints_display()
                    );
                    tokio::time::sleep(delay).await;
                    if let Ok(client) = connect(&self.cfg).await {
                        self.client = client;
                    }
                }
            }
        }
    }
}
