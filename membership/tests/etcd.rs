//! Membership against a real etcd (`testing::EtcdServer`, Debian's etcd-server): registration and
//! watch, clean and unclean departures, etcd outages shorter and longer than the lease TTL, a
//! worker cut off from etcd while etcd stays up, malformed records, and etcd absent at start-up.
//! Every test starts its own etcd on free loopback ports; leases are 2 s so each test takes seconds.
#![cfg(feature = "etcd")]

mod support;

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tessera_membership::testing::{EtcdServer, unused_local_url};
use tessera_membership::{
    MemberWatch, MembershipConfig, MembershipError, Registration, WorkerRecord, register,
    wait_for_members, watch,
};
use tokio::time::Instant;

use support::{Proxy, init_logs, record};

/// Waits until the watch shows exactly `ids` (in id order); returns how long that took.
async fn wait_for_ids(w: &mut MemberWatch, ids: &[&str], within: Duration) -> Result<Duration> {
    let start = Instant::now();
    let deadline = start + within;
    let mut now = w.members();
    loop {
        let have: Vec<&str> = now.iter().map(|r| r.id.as_str()).collect();
        if have == ids {
            return Ok(start.elapsed());
        }
        now = match tokio::time::timeout_at(deadline, w.changed()).await {
            Ok(r) => r?,
            Err(_) => bail!("members still {have:?} after {within:?}, expected {ids:?}"),
        };
    }
}

async fn etcd() -> Result<EtcdServer> {
    init_logs();
    // The error says how to install etcd when it is missing; the test fails with it.
    Ok(EtcdServer::start().await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_worker_appears_in_the_watch() -> Result<()> {
    let etcd = etcd().await?;
    let cfg = etcd.test_config("/t/appear");
    let mut w = watch(&cfg).await?;
    assert!(w.members().is_empty());
    let rec = record("w0", 7000);
    let reg = register(&cfg, rec.clone()).await?;
    assert_eq!(reg.key(), "/t/appear/workers/w0");
    assert_ne!(reg.lease_id(), 0);
    let got = wait_for_members(&mut w, 1, Duration::from_secs(5)).await?;
    assert_eq!(got, vec![rec]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_form_a_group_in_id_order_and_clusters_are_separate() -> Result<()> {
    let etcd = etcd().await?;
    let cfg = etcd.test_config("/t/two");
    let other = etcd.test_config("/t/other");
    let _r1 = register(&cfg, record("w1", 7001)).await?;
    let _r0 = register(&cfg, record("w0", 7000)).await?;
    let _stranger = register(&other, record("w9", 7009)).await?;
    // A watch started after the registrations finds them in its initial listing.
    let mut w = watch(&cfg).await?;
    let got = wait_for_members(&mut w, 2, Duration::from_secs(5)).await?;
    let ids: Vec<_> = got.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["w0", "w1"]);
    assert_eq!(got[1].grpc_addr, "127.0.0.1:7001");
    // Not a third: the other prefix is another cluster.
    let err = w.wait_for(3, Duration::from_millis(300)).await.unwrap_err();
    assert!(
        matches!(err, MembershipError::NotEnoughMembers { .. }),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistering_removes_the_worker_at_once() -> Result<()> {
    let etcd = etcd().await?;
    let cfg = etcd.test_config("/t/dereg");
    let mut w = watch(&cfg).await?;
    let r0 = register(&cfg, record("w0", 7000)).await?;
    let r1 = register(&cfg, record("w1", 7001)).await?;
    wait_for_ids(&mut w, &["w0", "w1"], Duration::from_secs(5)).await?;
    r0.deregister().await?;
    let took = wait_for_ids(&mut w, &["w1"], Duration::from_secs(5)).await?;
    // Far sooner than the 2 s lease would expire by itself.
    ensure!(
        took < Duration::from_millis(1000),
        "deregistration took {took:?}"
    );
    drop(r1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_stops_keep_alives_disappears_after_the_ttl() -> Result<()> {
    let etcd = etcd().await?;
    let cfg = etcd.test_config("/t/expire");
    let mut w = watch(&cfg).await?;
    let reg = register(&cfg, record("w0", 7000)).await?;
    wait_for_ids(&mut w, &["w0"], Duration::from_secs(5)).await?;
    // Held for two TTLs, the keep-alives keep it present.
    tokio::time::sleep(cfg.lease_ttl * 2).await;
    assert_eq!(w.members().len(), 1, "a kept-alive registration expired");
    // Dropping without deregistering is what a crashed worker looks like to etcd.
    drop(reg);
    let took = wait_for_ids(&mut w, &[], Duration::from_secs(6)).await?;
    // The last keep-alive went out at most a third of the TTL before the drop.
    ensure!(
        took >= cfg.lease_ttl / 2,
        "gone after {took:?}, before its lease could have expired"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_shorter_than_the_ttl_changes_nothing() -> Result<()> {
    let mut etcd = etcd().await?;
    let cfg = etcd.test_config("/t/short");
    let mut w = watch(&cfg).await?;
    let reg = register(&cfg, record("w0", 7000)).await?;
    wait_for_ids(&mut w, &["w0"], Duration::from_secs(5)).await?;
    let lease = reg.lease_id();
    let mut seen = w.subscribe();
    let empty_seen = tokio::spawn(async move {
        while seen.changed().await.is_ok() {
            if seen.borrow_and_update().is_empty() {
                return true;
            }
        }
        false
    });
    etcd.stop();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    etcd.restart().await?;
    // Give both tasks time to reconnect and run for a while on the restarted etcd.
    tokio::time::sleep(cfg.lease_ttl * 2).await;
    assert_eq!(reg.lease_id(), lease, "the worker re-registered");
    assert_eq!(w.members().len(), 1);
    drop(w);
    assert!(!empty_seen.await?, "the watch reported the worker gone");
    reg.deregister().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_long_etcd_outage_the_worker_is_a_member_again() -> Result<()> {
    let mut etcd = etcd().await?;
    let cfg = etcd.test_config("/t/long");
    let mut w = watch(&cfg).await?;
    let reg = register(&cfg, record("w0", 7000)).await?;
    wait_for_ids(&mut w, &["w0"], Duration::from_secs(5)).await?;
    let lease = reg.lease_id();
    etcd.stop();
    tokio::time::sleep(cfg.lease_ttl + Duration::from_secs(1)).await;
    // Same port, same data: etcd restores its leases and, on electing itself, extends them by
    // a TTL, so the worker may keep its lease; either way it must be a member again.
    etcd.restart().await?;
    wait_for_ids(&mut w, &["w0"], Duration::from_secs(6)).await?;
    // And stay one: the keep-alives (on the old lease or a new one) work against the new etcd.
    tokio::time::sleep(cfg.lease_ttl * 2).await;
    wait_for_ids(&mut w, &["w0"], Duration::from_millis(10)).await?;
    tracing::info!(
        "lease before the outage {lease:x}, after {:x}",
        reg.lease_id()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_that_lost_its_data_gets_the_worker_back_with_a_new_lease() -> Result<()> {
    let mut etcd = etcd().await?;
    let cfg = etcd.test_config("/t/wiped");
    let mut w = watch(&cfg).await?;
    let reg = register(&cfg, record("w0", 7000)).await?;
    let mut leases = reg.lease_changes();
    wait_for_ids(&mut w, &["w0"], Duration::from_secs(5)).await?;
    let old = reg.lease_id();
    etcd.stop();
    tokio::time::sleep(cfg.lease_ttl + Duration::from_secs(1)).await;
    etcd.restart_empty().await?;
    tokio::time::timeout(Duration::from_secs(8), leases.changed())
        .await
        .context("no new lease within 8 s of etcd coming back")??;
    ensure!(reg.lease_id() != old, "lease unchanged");
    wait_for_ids(&mut w, &["w0"], Duration::from_secs(6)).await?;
    reg.deregister().await?;
    wait_for_ids(&mut w, &[], Duration::from_secs(2)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_longer_than_the_ttl_is_dropped_then_re_registers() -> Result<()> {
    let etcd = etcd().await?;
    let watcher_cfg = etcd.test_config("/t/partition");
    // The worker reaches etcd through a proxy that can silently swallow traffic; the coordinator's
    // watch goes direct, as if only the worker's network had failed.
    let proxy = Proxy::start(&etcd.client_url()).await?;
    let mut worker_cfg = watcher_cfg.clone();
    worker_cfg.endpoints = vec![proxy.url()];
    let mut w = watch(&watcher_cfg).await?;
    let reg = register(&worker_cfg, record("w0", 7000)).await?;
    let mut leases = reg.lease_changes();
    wait_for_ids(&mut w, &["w0"], Duration::from_secs(5)).await?;
    let old = reg.lease_id();

    proxy.blackhole(true);
    let took = wait_for_ids(&mut w, &[], Duration::from_secs(6)).await?;
    ensure!(
        took >= Duration::from_secs(1),
        "dropped after only {took:?}"
    );
    proxy.blackhole(false);

    tokio::time::timeout(Duration::from_secs(8), leases.changed())
        .await
        .context("no re-registration within 8 s of the network healing")??;
    ensure!(reg.lease_id() != old, "lease unchanged");
    wait_for_ids(&mut w, &["w0"], Duration::from_secs(5)).await?;
    reg.deregister().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_are_skipped() -> Result<()> {
    let etcd = etcd().await?;
    let cfg = etcd.test_config("/t/junk");
    let mut client = etcd_client::Client::connect([etcd.client_url()], None).await?;
    client
        .put("/t/junk/workers/early", "not json", None)
        .await?;
    let mut w = watch(&cfg).await?;
    assert!(w.members().is_empty(), "{:?}", w.members());
    let _reg = register(&cfg, record("w0", 7000)).await?;
    client
        .put("/t/junk/workers/late", r#"{"id":"someone-else"}"#, None)
        .await?;
    let impostor = record("w1", 7001);
    let json = serde_json::to_string(&impostor)?;
    client.put("/t/junk/workers/w2", json, None).await?;
    // A valid record after the junk still arrives, and the junk never does.
    let _r3 = register(&cfg, record("w3", 7003)).await?;
    wait_for_ids(&mut w, &["w0", "w3"], Duration::from_secs(5)).await?;
    // A member whose record turns to junk leaves.
    client.put("/t/junk/workers/w3", "{", None).await?;
    wait_for_ids(&mut w, &["w0"], Duration::from_secs(5)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_etcd_at_start_fails_after_bounded_retries_naming_the_endpoint() -> Result<()> {
    init_logs();
    let url = unused_local_url()?;
    let mut cfg = MembershipConfig {
        endpoints: vec![url.clone()],
        prefix: "/t/nobody".into(),
        lease_ttl: Duration::from_secs(2),
        connect_timeout: Duration::from_millis(200),
        request_timeout: Duration::from_millis(300),
        max_start_retries: 3,
        start_retry_deadline: Duration::from_secs(30),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(100),
    };
    // Bounded by the attempt count.
    let start = Instant::now();
    let err = register(&cfg, record("w0", 7000)).await.unwrap_err();
    let took = start.elapsed();
    match &err {
        MembershipError::Unreachable {
            endpoints,
            attempts,
            ..
        } => {
            assert_eq!(endpoints, &url);
            assert_eq!(*attempts, 3);
        }
        other => bail!("expected Unreachable, got {other}"),
    }
    assert!(err.to_string().contains(&url), "{err}");
    ensure!(took < Duration::from_secs(3), "gave up after {took:?}");

    // Bounded by the deadline.
    cfg.max_start_retries = 1000;
    cfg.start_retry_deadline = Duration::from_millis(700);
    let start = Instant::now();
    let err = watch(&cfg).await.unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(err, MembershipError::Unreachable { attempts, .. } if attempts > 1),
        "{err}"
    );
    ensure!(took < Duration::from_secs(2), "gave up after {took:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_starting_late_is_waited_for() -> Result<()> {
    let mut etcd = etcd().await?;
    let mut cfg = etcd.test_config("/t/late");
    cfg.max_start_retries = 100;
    cfg.start_retry_deadline = Duration::from_secs(10);
    etcd.stop();
    let registering = tokio::spawn({
        let cfg = cfg.clone();
        async move { register(&cfg, record("w0", 7000)).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    etcd.restart().await?;
    let reg = registering.await??;
    let mut w = watch(&cfg).await?;
    wait_for_ids(&mut w, &["w0"], Duration::from_secs(5)).await?;
    reg.deregister().await?;
    Ok(())
}

#[tokio::test]
async fn invalid_input_is_rejected_before_contacting_etcd() {
    let cfg = MembershipConfig {
        endpoints: vec![],
        ..Default::default()
    };
    assert!(matches!(
        register(&cfg, record("w0", 1)).await,
        Err(MembershipError::InvalidConfig {
            field: "endpoints",
            ..
        })
    ));
    let cfg = MembershipConfig::default();
    let bad = WorkerRecord {
        id: "a/b".into(),
        ..record("x", 1)
    };
    assert!(matches!(
        register(&cfg, bad).await,
        Err(MembershipError::InvalidRecord { field: "id", .. })
    ));
}

/// Callers spawn these onto tokio and keep the handles in shared state; this fails to compile if
/// any of them stops being `Send`.
#[test]
fn futures_and_handles_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    fn assert_send_sync<T: Send + Sync>() {}
    fn deregister_is_send(r: Registration) {
        assert_send(&r.deregister());
    }
    let cfg = MembershipConfig::default();
    assert_send(&register(&cfg, record("w0", 1)));
    assert_send(&watch(&cfg));
    let _ = deregister_is_send;
    assert_send_sync::<Registration>();
    assert_send_sync::<MemberWatch>();
}
