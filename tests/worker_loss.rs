//! Losing a worker under `tessera serve --tp 2`: the streaming client gets a terminal error
//! promptly, the coordinator stays up and reports itself degraded, rebuilds the group, and serves
//! the next request. A worker lost while nothing runs is noticed too, by the idle health checks,
//! and a stalled one (SIGSTOP) by the step and collective deadlines.

mod common;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use common::server::Server;

/// Starts a long streaming completion, waits for its first event, then sends `signal` to `pid`;
/// returns the rest of the stream and when the signal went.
async fn signal_mid_stream(
    http: &reqwest::Client,
    url: &str,
    signal: &str,
    pid: u32,
) -> (
    impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin + use<>,
    Instant,
) {
    let body = json!({"prompt": [5, 6, 7], "max_tokens": 120, "ignore_eos": true, "stream": true});
    let resp = http.post(url).json(&body).send().await.unwrap();
    let mut chunks = resp.bytes_stream();
    chunks.next().await.unwrap().unwrap();
    let at = Instant::now();
    std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    (chunks, at)
}

/// Waits for the group to be whole again (health 200), then checks it completes a request.
async fn serves_again(server: &Server, http: &reqwest::Client, url: &str) {
    server
        .wait_health(http, Duration::from_secs(60), |c, _| c == 200)
        .await;
    let ok: Value = common::server::post_json(
        http,
        url,
        &json!({"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert_eq!(ok["usage"]["completion_tokens"], 4, "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_worker_fails_the_stream_then_the_group_is_rebuilt() {
    let model = common::fixtures_dir().join("qwen3_moe");
    let server = Server::start(&model, &["--tp", "2"]);
    let http = reqwest::Client::new();
    let url = format!("{}/v1/completions", server.http);
    let workers = server.worker_pids();
    assert_eq!(workers.len(), 2, "two worker processes: {workers:?}");

    let (mut chunks, killed_at) = signal_mid_stream(&http, &url, "-9", workers[1]).await;
    // The stream must end with an error chunk, then [DONE].
    let rest = common::server::drain_within(&mut chunks, Duration::from_secs(5)).await;
    let error = rest
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v.get("error").is_some())
        .unwrap_or_else(|| panic!("no error event in {rest}"));
    assert_eq!(error["error"]["type"], "service_unavailable", "{error}");
    assert!(rest.trim_end().ends_with("data: [DONE]"));
    assert!(
        killed_at.elapsed() < Duration::from_secs(2),
        "error after {:?}",
        killed_at.elapsed()
    );

    // The coordinator is still up: degraded (503) or already rebuilt, then whole again.
    let (code, _) = server.health(&http).await;
    assert!(code == 503 || code == 200);
    serves_again(&server, &http, &url).await;
    let new_workers = server.worker_pids();
    assert_eq!(new_workers.len(), 2);
    assert!(!new_workers.contains(&workers[1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_idle_is_noticed_without_any_request() {
    let model = common::fixtures_dir().join("qwen3_moe");
    let server = Server::start(&model, &["--tp", "2"]);
    let http = reqwest::Client::new();
    let workers = server.worker_pids();
    assert_eq!(workers.len(), 2, "two worker processes: {workers:?}");
    let body = server
        .wait_health(&http, Duration::from_secs(5), |c, _| c == 200)
        .await;
    assert_eq!(body["group_failures"], 0, "{body}");

    let killed_at = Instant::now();
    std::process::Command::new("kill")
        .args(["-9", &workers[0].to_string()])
        .status()
        .unwrap();
    // The embedded group relaunches its workers at once, so the degraded window may be shorter
    // than a poll; the failure count proves the loss was seen either way.
    let seen = server
        .wait_health(&http, Duration::from_secs(3), |c, b| {
            c == 503 || b["group_failures"].as_u64().unwrap_or(0) >= 1
        })
        .await;
    assert!(killed_at.elapsed() < Duration::from_secs(3), "{seen}");
    let body = server
        .wait_health(&http, Duration::from_secs(30), |c, _| c == 200)
        .await;
    assert_eq!(body["group_failures"], 1, "{body}");
    let new_workers = server.worker_pids();
    assert_eq!(new_workers.len(), 2);
    assert!(!new_workers.contains(&workers[0]), "{new_workers:?}");
    let ok: Value = common::server::post_json(
        &http,
        format!("{}/v1/completions", server.http),
        &json!({"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert_eq!(ok["usage"]["completion_tokens"], 4, "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_worker_is_caught_by_the_step_deadline_not_a_hang() {
    let model = common::fixtures_dir().join("qwen3_moe");
    let server = Server::start(&model, &["--tp", "2", "--step-timeout-secs", "2"]);
    let http = reqwest::Client::new();
    let url = format!("{}/v1/completions", server.http);
    let workers = server.worker_pids();
    let (mut chunks, stopped_at) = signal_mid_stream(&http, &url, "-STOP", workers[1]).await;
    // The stream ends with an error once the 2 s step deadline (or rank 0's collective deadline)
    // passes, whether the stall hit mid-step or between steps (the idle check then).
    let rest = common::server::drain_within(&mut chunks, Duration::from_secs(10)).await;
    let waited = stopped_at.elapsed();
    // A stream that already finished before the stall would prove nothing.
    assert!(rest.contains("\"error\""), "no error event: {rest}");
    assert!(waited < Duration::from_secs(6), "error after {waited:?}");
    // The group is rebuilt with fresh workers (the stopped one is killed with the old group).
    serves_again(&server, &http, &url).await;
    assert!(!server.worker_pids().contains(&workers[1]));
}
