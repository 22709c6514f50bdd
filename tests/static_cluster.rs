//! A cluster without etcd: `tessera coordinator --listen ADDR --tp 2` forms its group from two
//! `tessera worker --coordinator ADDR` processes that registered with it, and serves
//! transformers' greedy tokens. A worker SIGKILLed while nothing runs is noticed without any
//! request (`/health` degraded within seconds, new work refused with 503), and a replacement
//! worker makes the group whole again.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use common::server::Server;

/// A `tessera worker --coordinator ADDR`, killed when dropped.
struct Worker(Child);

impl Worker {
    fn start(coordinator: &str) -> Worker {
        Worker(
            Command::new(env!("CARGO_BIN_EXE_tessera"))
                .args(["worker", "--listen", "127.0.0.1:0"])
                .args(["--coordinator", coordinator])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("tessera worker starts"),
        )
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback address nobody listens on now (the coordinator binds it moments later).
fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_register_with_the_coordinator_and_an_idle_loss_is_noticed() {
    let model = common::fixtures_dir().join("qwen3_moe");
    let case = &common::reference(&model).cases[0];
    let registry = free_addr();
    // Workers first: they retry until the coordinator's registry is up.
    let _w0 = Worker::start(&registry);
    let mut w1 = Worker::start(&registry);
    let server = Server::start_command(
        "coordinator",
        &model,
        &[
            "--tp",
            "2",
            "--listen",
            &registry,
            "--wait-for-workers-secs",
            "30",
        ],
    );
    let n = case.greedy_ids.len();
    let ids = common::server::greedy_ids(&server.grpc, &case.prompt_ids, n).await;
    assert_eq!(
        ids, case.greedy_ids,
        "two registered workers vs transformers"
    );

    // SIGKILL a worker while idle: no request is sent, yet /health turns degraded.
    let http = reqwest::Client::new();
    server
        .wait_health(&http, Duration::from_secs(5), |c, _| c == 200)
        .await;
    let killed = Instant::now();
    w1.0.kill().unwrap();
    w1.0.wait().unwrap();
    let body = server
        .wait_health(&http, Duration::from_secs(3), |c, _| c == 503)
        .await;
    assert_eq!(body["status"], "degraded", "{body}");
    assert!(killed.elapsed() < Duration::from_secs(3));
    let refused = http
        .post(format!("{}/v1/completions", server.http))
        .json(&json!({"prompt": [5, 6, 7], "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503, "new work is refused while degraded");

    // A replacement registers; the coordinator forms the group again and serves the same tokens.
    let _w2 = Worker::start(&registry);
    let body = server
        .wait_health(&http, Duration::from_secs(30), |c, _| c == 200)
        .await;
    assert_eq!(body["group_failures"], 1, "{body}");
    let ids = common::server::greedy_ids(&server.grpc, &case.prompt_ids, n).await;
    assert_eq!(ids, case.greedy_ids, "the re-formed group vs transformers");
}

#[test]
fn a_coordinator_without_membership_says_what_it_needs() {
    let model = common::fixtures_dir().join("qwen3_moe");
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .arg("coordinator")
            .arg("--model")
            .arg(&model)
            .args(["--tp", "2", "--port", "0", "--grpc-port", "0"])
            .args(extra)
            .env_remove("TESSERA_ETCD")
            .env_remove("TESSERA_COORDINATOR_LISTEN")
            .stdin(Stdio::null())
            .output()
            .expect("tessera runs");
        assert!(!out.status.success(), "{extra:?} must fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&[]);
    assert!(
        err.contains("needs --listen ADDR") && err.contains("--etcd URL"),
        "{err}"
    );
    let err = run(&["--listen", "127.0.0.1:0", "--etcd", "http://127.0.0.1:1"]);
    assert!(err.contains("--listen") && err.contains("--etcd"), "{err}");
    let err = run(&["--listen", "not-an-address"]);
    assert!(err.contains("not-an-address"), "{err}");
}
