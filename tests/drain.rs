//! Graceful shutdown of a real `tessera serve --tp 2`: SIGTERM stops new work at once (503) while
//! the streams in flight run to their end, then the server exits 0; with a drain deadline of zero
//! the streams still in flight end with an error event instead of hanging or vanishing.

mod common;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;

use common::server::{Server, drain_within};

fn demo_model() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tessera-demo")
}

const STREAMS: usize = 8;
const TOKENS: usize = 200;

/// Opens `STREAMS` long streaming completions and waits for each one's first event.
async fn open_streams(
    server: &Server,
    http: &reqwest::Client,
) -> Vec<impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin + use<>> {
    let url = format!("{}/v1/completions", server.http);
    let mut streams = Vec::new();
    for i in 0..STREAMS {
        let body = json!({"prompt": [1 + i as u32, 2, 3], "max_tokens": TOKENS,
                          "ignore_eos": true, "stream": true, "temperature": 0});
        let resp = http.post(&url).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut s = resp.bytes_stream();
        let first = s.next().await.expect("a first event").unwrap();
        assert!(first.starts_with(b"data: "), "{first:?}");
        streams.push(s);
    }
    streams
}

fn sigterm(server: &Server) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_new_work_finishes_streams_in_flight_and_exits_zero() {
    let mut server = Server::start(&demo_model(), &["--tp", "2"]);
    let http = reqwest::Client::new();
    let mut streams = open_streams(&server, &http).await;
    sigterm(&server);
    // New work is refused while the old finishes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = http
        .post(format!("{}/v1/completions", server.http))
        .json(&json!({"prompt": [1], "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    let (status, body) = server.health(&http).await;
    assert_eq!(status, 503, "{body}");
    for s in &mut streams {
        let rest = drain_within(s, Duration::from_secs(60)).await;
        assert!(
            rest.contains("\"finish_reason\":\"length\"") && rest.ends_with("data: [DONE]\n\n"),
            "a stream was cut short by the drain: {}",
            &rest[rest.len().saturating_sub(300)..]
        );
        assert!(!rest.contains("\"error\""), "{rest}");
    }
    let exit = tokio::task::spawn_blocking(move || server.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_drain_deadline_streams_end_with_an_error_event() {
    let mut server = Server::start(&demo_model(), &["--tp", "2", "--drain-timeout-secs", "0"]);
    let http = reqwest::Client::new();
    let mut streams = open_streams(&server, &http).await;
    sigterm(&server);
    let mut cut = 0;
    for s in &mut streams {
        let rest = drain_within(s, Duration::from_secs(30)).await;
        if rest.contains("\"error\"") {
            cut += 1;
        } else {
            assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
        }
    }
    assert!(cut > 0, "no stream was still running at the deadline");
    let exit = tokio::task::spawn_blocking(move || server.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}
