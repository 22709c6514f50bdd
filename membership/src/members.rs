//! The coordinator's view of the group: a set of worker records kept up to date from etcd's
//! key-value events, and the `MemberWatch` handle that publishes it. The set logic is separate from
//! etcd so that the join/leave/malformed-record rules are tested without a server, and so that a
//! `MemberWatch` can also be fed from elsewhere (a static worker list, a test).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::error::MembershipError;
use crate::record::WorkerRecord;

/// One change to the member set, for logging.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    Joined(WorkerRecord),
    Updated(WorkerRecord),
    Left(WorkerRecord),
}

/// Worker records by key. Keys are `<workers_prefix><id>`, so key order is id order.
#[derive(Debug)]
pub(crate) struct MemberSet {
    workers_prefix: String,
    by_key: BTreeMap<Vec<u8>, WorkerRecord>,
}

impl MemberSet {
    pub(crate) fn new(workers_prefix: String) -> Self {
        Self {
            workers_prefix,
            by_key: BTreeMap::new(),
        }
    }

    /// A key was written. A value that is not a valid record is logged and treated as absent, so
    /// a worker that overwrites its own record with garbage leaves the group rather than keeping
    /// a stale entry.
    pub(crate) fn apply_put(&mut self, key: &[u8], value: &[u8]) -> Option<Change> {
        match WorkerRecord::from_kv(&self.workers_prefix, key, value) {
            Ok(record) => match self.by_key.insert(key.to_vec(), record.clone()) {
                None => Some(Change::Joined(record)),
                Some(old) if old != record => Some(Change::Updated(record)),
                Some(_) => None,
            },
            Err(reason) => {
                warn!(
                    key = %String::from_utf8_lossy(key),
                    value = %String::from_utf8_lossy(value),
                    "skipping malformed worker record: {reason}"
                );
                self.apply_delete(key)
            }
        }
    }

    /// A key was deleted (revoked or expired lease, or an operator's `etcdctl del`).
    pub(crate) fn apply_delete(&mut self, key: &[u8]) -> Option<Change> {
        self.by_key.remove(key).map(Change::Left)
    }

    /// Rebuilds the set from a full listing (start-up, or after the watch stream broke), returning
    /// what differs from before. A re-list cannot miss anything that happened while disconnected.
    pub(crate) fn replace_all<'a>(
        &mut self,
        kvs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Vec<Change> {
        let mut fresh = MemberSet::new(self.workers_prefix.clone());
        for (k, v) in kvs {
            // Malformed entries are logged by apply_put and left out.
            fresh.apply_put(k, v);
        }
        let mut changes = Vec::new();
        for (key, old) in &self.by_key {
            if !fresh.by_key.contains_key(key) {
                changes.push(Change::Left(old.clone()));
            }
        }
        for (key, new) in &fresh.by_key {
            match self.by_key.get(key) {
                None => changes.push(Change::Joined(new.clone())),
                Some(old) if old != new => changes.push(Change::Updated(new.clone())),
                Some(_) => {}
            }
        }
        self.by_key = fresh.by_key;
        changes
    }

    /// The members in id order.
    pub(crate) fn snapshot(&self) -> Vec<WorkerRecord> {
        self.by_key.values().cloned().collect()
    }
}

/// Logs a change at info level: the coordinator's operator wants every join and leave in the log.
pub(crate) fn log_change(prefix: &str, change: &Change) {
    match change {
        Change::Joined(r) => info!(
            prefix,
            worker = %r.id,
            grpc_addr = %r.grpc_addr,
            collective_addr = %r.collective_addr,
            version = %r.version,
            "worker joined"
        ),
        Change::Updated(r) => info!(
            prefix,
            worker = %r.id,
            grpc_addr = %r.grpc_addr,
            collective_addr = %r.collective_addr,
            version = %r.version,
            "worker record updated"
        ),
        Change::Left(r) => info!(prefix, worker = %r.id, "worker left"),
    }
}

/// A live view of the workers registered under a cluster prefix.
///
/// Dropping it stops the background watcher.
#[derive(Debug)]
pub struct MemberWatch {
    prefix: String,
    rx: watch::Receiver<Vec<WorkerRecord>>,
    task: Option<JoinHandle<()>>,
}

impl MemberWatch {
    /// A view fed by something other than etcd (a static worker list, a test): every value sent
    /// on the channel's sender is a complete member list. `prefix` only names it in errors.
    pub fn from_receiver(
        prefix: impl Into<String>,
        rx: watch::Receiver<Vec<WorkerRecord>>,
    ) -> Self {
        Self {
            prefix: prefix.into(),
            rx,
            task: None,
        }
    }

    pub(crate) fn with_task(
        prefix: String,
        rx: watch::Receiver<Vec<WorkerRecord>>,
        task: JoinHandle<()>,
    ) -> Self {
        Self {
            prefix,
            rx,
            task: Some(task),
        }
    }

    /// The members now, in id order.
    pub fn members(&self) -> Vec<WorkerRecord> {
        self.rx.borrow().clone()
    }

    /// Waits for the member list to change from the last one this handle returned, and returns
    /// the new list in id order.
    pub async fn changed(&mut self) -> Result<Vec<WorkerRecord>, MembershipError> {
        self.rx
            .changed()
            .await
            .map_err(|_| MembershipError::WatchClosed {
                prefix: self.prefix.clone(),
            })?;
        Ok(self.rx.borrow_and_update().clone())
    }

    /// Another receiver of the same member lists, for a task that reacts to membership on its own.
    pub fn subscribe(&self) -> watch::Receiver<Vec<WorkerRecord>> {
        self.rx.clone()
    }

    /// See [`wait_for_members`].
    pub async fn wait_for(
        &mut self,
        wanted: usize,
        timeout: Duration,
    ) -> Result<Vec<WorkerRecord>, MembershipError> {
        // A timeout too large to represent is no timeout at all.
        let deadline = tokio::time::Instant::now()
            .checked_add(timeout)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86400 * 365 * 30));
        loop {
            let now = self.rx.borrow_and_update().clone();
            if now.len() >= wanted {
                return Ok(now);
            }
            match tokio::time::timeout_at(deadline, self.rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return Err(MembershipError::WatchClosed {
                        prefix: self.prefix.clone(),
                    });
                }
                Err(_) => {
                    return Err(MembershipError::NotEnoughMembers {
                        prefix: self.prefix.clone(),
                        wanted,
                        waited: timeout,
                        present: now.into_iter().map(|r| r.id).collect(),
                    });
                }
            }
        }
    }
}

impl Drop for MemberWatch {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Waits until at least `wanted` workers are registered, or fails after `timeout` naming those
/// present. Returns every member (possibly more than `wanted`) in id order; forming the group from
/// them (ranks, which to use) is the caller's decision.
pub async fn wait_for_members(
    watch: &mut MemberWatch,
    wanted: usize,
    timeout: Duration,
) -> Result<Vec<WorkerRecord>, MembershipError> {
    watch.wait_for(wanted, timeout).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/t/workers/";

    fn rec(id: &str, port: u16) -> WorkerRecord {
        WorkerRecord {
            id: id.into(),
            grpc_addr: format!("127.0.0.1:{port}"),
            collective_addr: format!("127.0.0.1:{}", port + 100),
            version: "0.1.0".into(),
        }
    }

    fn key(id: &str) -> Vec<u8> {
        format!("{P}{id}").into_bytes()
    }

    #[test]
    fn puts_and_deletes_produce_joins_updates_and_leaves() {
        let mut s = MemberSet::new(P.into());
        let a = rec("a", 1);
        assert_eq!(
            s.apply_put(&key("a"), a.to_json().as_bytes()),
            Some(Change::Joined(a.clone()))
        );
        // A keep-alive re-put of the same record is not a change.
        assert_eq!(s.apply_put(&key("a"), a.to_json().as_bytes()), None);
        let a2 = rec("a", 2);
        assert_eq!(
            s.apply_put(&key("a"), a2.to_json().as_bytes()),
            Some(Change::Updated(a2.clone()))
        );
        assert_eq!(s.apply_delete(&key("a")), Some(Change::Left(a2)));
        assert_eq!(s.apply_delete(&key("a")), None);
    }

    #[test]
    fn malformed_values_are_skipped_and_evict_a_stale_entry() {
        let mut s = MemberSet::new(P.into());
        assert_eq!(s.apply_put(&key("a"), b"{broken"), None);
        assert!(s.snapshot().is_empty());
        let a = rec("a", 1);
        s.apply_put(&key("a"), a.to_json().as_bytes());
        assert_eq!(s.apply_put(&key("a"), b"{broken"), Some(Change::Left(a)));
    }

    #[test]
    fn relist_reports_the_difference_and_orders_by_id() {
        let mut s = MemberSet::new(P.into());
        let (a, b, c) = (rec("a", 1), rec("b", 2), rec("c", 3));
        s.apply_put(&key("b"), b.to_json().as_bytes());
        s.apply_put(&key("a"), a.to_json().as_bytes());
        let (kc, vc, vb) = (key("c"), c.to_json(), rec("b", 9).to_json());
        let (kb, kz) = (key("b"), key("z"));
        let listing: Vec<(&[u8], &[u8])> = vec![
            (&kc, vc.as_bytes()),
            (&kb, vb.as_bytes()),
            (&kz, b"garbage"),
        ];
        let changes = s.replace_all(listing);
        assert_eq!(
            changes,
            vec![
                Change::Left(a),
                Change::Updated(rec("b", 9)),
                Change::Joined(c.clone())
            ]
        );
        let ids: Vec<_> = s.snapshot().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["b", "c"]);
    }

    #[tokio::test]
    async fn wait_for_returns_once_enough_members_are_present() {
        let (tx, rx) = watch::channel(vec![]);
        let mut w = MemberWatch::from_receiver("/t", rx);
        let feeder = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(vec![rec("a", 1)]).unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(vec![rec("a", 1), rec("b", 2)]).unwrap();
            tx
        });
        let got = wait_for_members(&mut w, 2, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got.len(), 2);
        drop(feeder.await.unwrap());
        assert!(matches!(
            w.changed().await,
            Err(MembershipError::WatchClosed { .. })
        ));
    }

    #[tokio::test]
    async fn wait_for_accepts_an_unbounded_timeout() {
        let (_tx, rx) = watch::channel(vec![rec("a", 1)]);
        let mut w = MemberWatch::from_receiver("/t", rx);
        assert_eq!(w.wait_for(1, Duration::MAX).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn wait_for_times_out_naming_who_is_there() {
        let (_tx, rx) = watch::channel(vec![rec("a", 1)]);
        let mut w = MemberWatch::from_receiver("/t", rx);
        let err = w.wait_for(3, Duration::from_millis(50)).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("3 worker(s)") && msg.contains("[a]"), "{msg}");
    }
}
