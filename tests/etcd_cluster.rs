//! A cluster formed through a real etcd: `tessera worker --etcd` processes register,
//! `tessera coordinator --etcd --tp 2` forms its group from them and serves. Losing a worker
//! fails the running request promptly; the coordinator stays up, and once the worker is back
//! (same id) it re-forms the group and serves again. SIGTERM deregisters a worker at once.
//!
//! Needs the `etcd` feature (the README's test command enables it) and Debian's etcd-server.
#![cfg(feature = "etcd")]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tessera_membership::testing::EtcdServer;

use common::server::Server;

/// A `tessera worker` registered in etcd, killed when dropped.
struct Worker(Child);

impl Worker {
    fn start(etcd: &str, cluster: &str, id: &str) -> Worker {
        Worker::start_on(etcd, cluster, id, &["--listen", "127.0.0.1:0"])
    }

    /// With `listen`: the --listen (and --advertise-ip) flags.
    fn start_on(etcd: &str, cluster: &str, id: &str, listen: &[&str]) -> Worker {
        Worker(
            Command::new(env!("CARGO_BIN_EXE_tessera"))
                .arg("worker")
                .args(listen)
                .args(["--etcd", etcd])
                .args([
                    "--cluster",
                    cluster,
                    "--worker-id",
                    id,
                    "--etcd-lease-ttl",
                    "2",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("tessera worker starts"),
        )
    }

    fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([sig, &self.0.id().to_string()])
            .status()
            .unwrap();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn members(etcd: &EtcdServer, cluster: &str) -> Vec<String> {
    let cfg = etcd.test_config(&format!("/tessera/{cluster}"));
    let w = tessera_membership::watch(&cfg).await.unwrap();
    w.members().into_iter().map(|m| m.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_register_the_coordinator_forms_the_group_and_survives_a_lost_worker() {
    let etcd = EtcdServer::start()
        .await
        .expect("etcd starts (apt-get install etcd-server)");
    let url = etcd.client_url();
    let model = common::fixtures_dir().join("qwen3_moe");
    let case = &common::reference(&model).cases[0];
    let w0 = Worker::start(&url, "it", "w0");
    // One worker binds every interface and advertises loopback, as a pod binding 0.0.0.0 would
    // advertise its pod IP: etcd must hold the advertised address, which the coordinator dials.
    let w1 = Worker::start_on(
        &url,
        "it",
        "w1",
        &["--listen", "0.0.0.0:0", "--advertise-ip", "127.0.0.1"],
    );
    let server = Server::start_command(
        "coordinator",
        &model,
        &[
            "--tp",
            "2",
            "--etcd",
            &url,
            "--cluster",
            "it",
            "--wait-for-workers-secs",
            "30",
        ],
    );
    assert_eq!(members(&etcd, "it").await, ["w0", "w1"]);
    let cfg = etcd.test_config("/tessera/it");
    let records = tessera_membership::watch(&cfg).await.unwrap().members();
    let w1_record = records.iter().find(|m| m.id == "w1").unwrap();
    assert!(
        w1_record.grpc_addr.starts_with("127.0.0.1:")
            && w1_record.collective_addr.starts_with("127.0.0.1:"),
        "{w1_record:?}"
    );

    let http = reqwest::Client::new();
    let completions = format!("{}/v1/completions", server.http);
    let greedy = json!({"prompt": case.prompt_ids, "max_tokens": case.greedy_ids.len(),
                        "temperature": 0, "ignore_eos": true, "logprobs": 0});
    let first: Value = common::server::post_json(&http, &completions, &greedy).await;
    assert_eq!(
        first["usage"]["completion_tokens"],
        case.greedy_ids.len(),
        "{first}"
    );

    // SIGKILL w1 in the middle of a stream.
    let long = json!({"prompt": [5, 6, 7], "max_tokens": 120, "ignore_eos": true, "stream": true});
    let mut chunks = http
        .post(&completions)
        .json(&long)
        .send()
        .await
        .unwrap()
        .bytes_stream();
    chunks.next().await.unwrap().unwrap();
    let killed = Instant::now();
    w1.signal("-9");
    let rest = common::server::drain_within(&mut chunks, Duration::from_secs(5)).await;
    assert!(
        rest.contains("\"error\""),
        "the stream ends with an error: {rest}"
    );
    assert!(killed.elapsed() < Duration::from_secs(5));
    let (code, health) = server.health(&http).await;
    assert_eq!(code, 503, "degraded while a worker is missing: {health}");

    // The worker comes back under the same id; the coordinator re-forms the group.
    drop(w1);
    let _w1 = Worker::start(&url, "it", "w1");
    server
        .wait_health(&http, Duration::from_secs(60), |c, _| c == 200)
        .await;
    let again: Value = common::server::post_json(&http, &completions, &greedy).await;
    assert_eq!(
        again["choices"][0]["text"], first["choices"][0]["text"],
        "{again}"
    );

    // SIGTERM deregisters w0 at once (well before its 2 s lease would expire).
    w0.signal("-TERM");
    let start = Instant::now();
    while members(&etcd, "it").await.contains(&"w0".to_string()) {
        assert!(
            start.elapsed() < Duration::from_millis(1500),
            "w0 is still registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
