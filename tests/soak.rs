//! Soak: load on a real `tessera serve --tp 2` for a while, with clients that hang up mid-stream
//! and one worker SIGKILLed half-way. Every stream a client reads to its end must end with
//! exactly one terminal event (a finish reason or an error, then `[DONE]`); afterwards nothing is
//! left running, the server serves again, and the coordinator's memory is flat (its resident set
//! grows by less than a bound between the first and last quarter of the run).
//!
//! CI runs it for 20 s; `TESSERA_SOAK_SECS=600 cargo test --release --test soak -- --nocapture`
//! (or `bash tests/soak.sh MINUTES`) soaks for longer.

mod common;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use common::server::Server;

/// Resident set of a process in KiB (Linux).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

#[derive(Debug, Default)]
struct Tally {
    finished: u64,
    failed: u64,
    hung_up: u64,
    refused: u64,
}

/// One client request: reads the stream to its end, or hangs up after `hang_up_after` events.
/// Returns which terminal outcome it saw; panics on zero or two terminal events.
async fn one(
    http: &reqwest::Client,
    url: &str,
    body: Value,
    hang_up_after: Option<usize>,
) -> &'static str {
    let resp = match http.post(url).json(&body).send().await {
        Ok(r) => r,
        Err(e) => panic!("the server went away: {e}"),
    };
    match resp.status().as_u16() {
        200 => {}
        503 | 429 => return "refused",
        s => panic!("status {s}: {}", resp.text().await.unwrap_or_default()),
    }
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    let mut events = 0;
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else { break };
        text.push_str(&String::from_utf8_lossy(&chunk));
        events += 1;
        if hang_up_after.is_some_and(|n| events >= n) {
            return "hung_up";
        }
    }
    let terminal: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter(|d| {
            d.contains("\"error\"")
                || d.contains("\"finish_reason\":\"") && !d.contains("\"finish_reason\":null")
        })
        .collect();
    assert_eq!(
        terminal.len(),
        1,
        "want exactly one terminal event in {text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    if terminal[0].contains("\"error\"") {
        "failed"
    } else {
        "finished"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_cancellations_and_a_worker_kill() {
    let secs: u64 = std::env::var("TESSERA_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let run = Duration::from_secs(secs);
    let server = Server::start(&common::fixtures_dir().join("qwen3_moe"), &["--tp", "2"]);
    let pid = server.child.id();
    let http = reqwest::Client::new();
    let url = format!("{}/v1/completions", server.http);
    let start = Instant::now();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut tally = Tally::default();
    let mut rss_early = None;
    let mut killed = false;
    let mut tasks = tokio::task::JoinSet::new();
    while start.elapsed() < run {
        while tasks.len() < 8 {
            let body = json!({
                "prompt": (0..rng.random_range(1..40)).map(|_| rng.random_range(0..384)).collect::<Vec<u32>>(),
                "max_tokens": rng.random_range(1..60),
                "temperature": rng.random_range(0.0..1.5),
                "ignore_eos": rng.random_bool(0.5),
                "stream": true,
            });
            let hang_up = rng.random_bool(0.25).then(|| rng.random_range(1..5));
            let (http, url) = (http.clone(), url.clone());
            tasks.spawn(async move { one(&http, &url, body, hang_up).await });
        }
        match tasks.join_next().await {
            Some(Ok("finished")) => tally.finished += 1,
            Some(Ok("failed")) => tally.failed += 1,
            Some(Ok("hung_up")) => tally.hung_up += 1,
            Some(Ok(_)) => tally.refused += 1,
            Some(Err(e)) => panic!("a client failed: {e}"),
            None => {}
        }
        if !killed && start.elapsed() > run / 2 {
            let workers = server.worker_pids();
            std::process::Command::new("kill")
                .args(["-9", &workers[1].to_string()])
                .status()
                .unwrap();
            killed = true;
        }
        if rss_early.is_none() && start.elapsed() > run / 4 {
            rss_early = Some(rss_kib(pid));
        }
    }
    while let Some(done) = tasks.join_next().await {
        match done.unwrap() {
            "finished" => tally.finished += 1,
            "failed" => tally.failed += 1,
            "hung_up" => tally.hung_up += 1,
            _ => tally.refused += 1,
        }
    }
    eprintln!("soak for {secs} s: {tally:?}");
    assert!(tally.finished > 50, "{tally:?}");
    assert!(tally.hung_up > 0, "{tally:?}");
    // Nothing left behind: no running or waiting request, and the server serves.
    server
        .wait_health(&http, Duration::from_secs(60), |c, b| {
            c == 200 && b["running"] == 0 && b["waiting"] == 0
        })
        .await;
    let ok: Value =
        common::server::post_json(&http, &url, &json!({"prompt": [1], "max_tokens": 2})).await;
    assert_eq!(ok["usage"]["completion_tokens"], 2, "{ok}");
    let (early, late) = (rss_early.unwrap_or(0), rss_kib(pid));
    eprintln!("coordinator RSS: {early} KiB at a quarter, {late} KiB at the end");
    assert!(
        late < early + 64 * 1024,
        "the coordinator grew from {early} KiB to {late} KiB"
    );
}
