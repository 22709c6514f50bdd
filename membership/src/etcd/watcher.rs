//! The coordinator's watch on `<prefix>/workers/`: list what is there, then follow etcd's events
//! from the revision after the listing. Whenever the watch breaks (etcd restarted, the connection
//! dropped, the revision was compacted) the task lists again and diffs the listing against what it
//! had, so joins and leaves that happened while it was disconnected are still reported.

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::watch as channel;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{RpcError, connect, rpc, with_start_retry};
use crate::backoff::Backoff;
use crate::config::MembershipConfig;
use crate::error::MembershipError;
use crate::members::{MemberSet, MemberWatch, log_change};
use crate::record::WorkerRecord;

/// Starts watching the workers registered under `cfg.prefix`.
///
/// The returned view already holds the current members. If etcd cannot be reached, retries within
/// the start-up budget and then fails with [`MembershipError::Unreachable`]; once running, the
/// watcher reconnects by itself for as long as the view lives.
pub async fn watch(cfg: &MembershipConfig) -> Result<MemberWatch, MembershipError> {
    cfg.validate()?;
    let prefix = cfg.workers_prefix();
    let what = format!("watching {prefix}");
    let prefix = &prefix;
    let (client, set, revision) = with_start_retry(cfg, &what, || async move {
        let mut client = connect(cfg).await?;
        let mut set = MemberSet::new(prefix.clone());
        let revision = relist(&mut client, cfg, &mut set).await?;
        Ok((client, set, revision))
    })
    .await?;
    let (tx, rx) = channel::channel(set.snapshot());
    let watcher = Watcher {
        cfg: cfg.clone(),
        client,
        set,
        tx,
    };
    let task = tokio::spawn(watcher.run(revision));
    Ok(MemberWatch::with_task(cfg.prefix.clone(), rx, task))
}

/// Lists the workers prefix into `set`, logging each difference; returns the listing's revision.
async fn relist(
    client: &mut Client,
    cfg: &MembershipConfig,
    set: &mut MemberSet,
) -> Result<i64, RpcError> {
    let prefix = cfg.workers_prefix();
    let resp = rpc(
        cfg,
        client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let changes = set.replace_all(resp.kvs().iter().map(|kv| (kv.key(), kv.value())));
    for c in &changes {
        log_change(&cfg.prefix, c);
    }
    Ok(resp.header().map_or(0, |h| h.revision()))
}

struct Watcher {
    cfg: MembershipConfig,
    client: Client,
    set: MemberSet,
    tx: channel::Sender<Vec<WorkerRecord>>,
}

impl Watcher {
    async fn run(mut self, mut revision: i64) {
        let mut backoff = Backoff::new(self.cfg.backoff_initial, self.cfg.backoff_max);
        loop {
            let cause = self.follow(revision, &mut backoff).await;
            let since = Instant::now();
            let mut delay = backoff.next_delay();
            warn!(
                prefix = %self.cfg.prefix,
                "membership watch at {} interrupted: {cause}; listing again in {delay:.1?}",
                self.cfg.endpoints_display()
            );
            loop {
                tokio::time::sleep(delay).await;
                if let Ok(client) = connect(&self.cfg).await {
                    self.client = client;
                }
                match relist(&mut self.client, &self.cfg, &mut self.set).await {
                    Ok(r) => {
                        revision = r;
                        self.publish();
                        info!(
                            prefix = %self.cfg.prefix,
                            "membership watch resumed after {:.1?}; {} worker(s) present",
                            since.elapsed(),
                            self.tx.borrow().len()
                        );
                        break;
                    }
                    Err(e) => {
                        delay = backoff.next_delay();
                        warn!(
                            prefix = %self.cfg.prefix,
                            "membership watch: etcd at {} unreachable: {e}; retrying in {delay:.1?}",
                            self.cfg.endpoints_display()
                        );
                    }
                }
            }
        }
    }

    /// Applies events after `revision` until the watch ends; returns why it ended.
    async fn follow(&mut self, revision: i64, backoff: &mut Backoff) -> String {
        let prefix = self.cfg.workers_prefix();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut stream =
            match rpc(&self.cfg, self.client.watch(prefix.as_str(), Some(options))).await {
                Ok(s) => s,
                Err(e) => return e.to_string(),
            };
        loop {
            // No deadline here: a quiet cluster sends nothing for hours. A dead connection shows
            // through the HTTP/2 pings configured in `connect`.
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => return "etcd closed the watch stream".into(),
                Err(e) => return RpcError::from(e).to_string(),
            };
            if resp.created() {
                backoff.reset();
            }
            if resp.canceled() {
                return format!(
                    "etcd cancelled the watch (compact revision {}): {}",
                    resp.compact_revision(),
                    resp.cancel_reason()
                );
            }
            let mut changed = false;
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let change = match event.event_type() {
                    EventType::Put => self.set.apply_put(kv.key(), kv.value()),
                    EventType::Delete => self.set.apply_delete(kv.key()),
                };
                if let Some(c) = change {
                    log_change(&self.cfg.prefix, &c);
                    changed = true;
                }
            }
            if changed {
                self.publish();
            }
        }
    }

    /// Sends the member list to the views if it differs from the last one sent.
    fn publish(&self) {
        let now = self.set.snapshot();
        self.tx.send_if_modified(|cur| {
            if *cur == now {
                false
            } else {
                *cur = now;
                true
            }
        });
    }
}
