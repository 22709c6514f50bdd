//! `tessera serve --tp 2` as users meet it: real worker processes, HTTP and gRPC clients.
//!
//! Greedy results under load must be identical to the same request run alone, and match
//! transformers' references; cancelled streams free their blocks; a full queue answers 429 /
//! RESOURCE_EXHAUSTED; batch jobs go through their lifecycle; chat templates are applied.

mod common;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tessera_proto::v1 as pb;
use tessera_proto::v1::tessera_client::TesseraClient;

use common::server::Server;

fn model() -> std::path::PathBuf {
    common::fixtures_dir().join("qwen3_moe")
}

/// Runs a gRPC Generate to its end: (token ids, text, finish reason).
async fn grpc_generate(
    client: &mut TesseraClient<tonic::transport::Channel>,
    req: pb::GenerateRequest,
) -> Result<(Vec<u32>, String, String), tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let (mut ids, mut text, mut finish) = (vec![], String::new(), String::new());
    while let Some(msg) = stream.message().await? {
        ids.extend(msg.token_ids);
        text.push_str(&msg.text);
        if !msg.finish_reason.is_empty() {
            finish = msg.finish_reason;
        }
    }
    Ok((ids, text, finish))
}

/// Streams an HTTP completion; returns the concatenated text and the finish reason.
async fn http_stream(client: &reqwest::Client, url: &str, body: Value) -> (String, String) {
    let resp = client.post(url).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let raw = resp.text().await.unwrap();
    let (mut text, mut finish) = (String::new(), String::new());
    let mut done = false;
    for line in raw.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(line).unwrap();
        assert!(v.get("error").is_none(), "stream failed: {v}");
        if let Some(c) = v["choices"].get(0) {
            text.push_str(c["text"].as_str().unwrap_or_default());
            text.push_str(c["delta"]["content"].as_str().unwrap_or_default());
            if let Some(f) = c["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
    }
    assert!(done, "the stream ends with [DONE]");
    (text, finish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_streams_over_http_and_grpc_match_solo_runs_and_transformers() {
    let server = Server::start(&model(), &["--tp", "2", "--max-step-tokens", "24"]);
    let reference = common::reference(&model());
    let mut grpc = TesseraClient::connect(server.grpc.clone()).await.unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/v1/completions", server.http);

    // Solo runs first: each reference prompt, alone, must give transformers' greedy tokens.
    let mut solo = Vec::new();
    for case in &reference.cases {
        let n = case.greedy_ids.len() as u32;
        let (ids, text, finish) =
            grpc_generate(&mut grpc, common::greedy_grpc_request(&case.prompt_ids, n))
                .await
                .unwrap();
        assert_eq!(ids, case.greedy_ids, "solo gRPC run vs transformers");
        assert_eq!(finish, "length");
        let body = json!({"prompt": case.prompt_ids, "max_tokens": n, "temperature": 0,
                          "ignore_eos": true, "stream": true});
        let (http_text, _) = http_stream(&http, &url, body).await;
        assert_eq!(http_text, text, "HTTP and gRPC give the same text");
        solo.push((ids, text));
    }

    // 32 concurrent streaming requests over each API, cycling through the prompts.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..32 {
        let case = &reference.cases[i % reference.cases.len()];
        let n = case.greedy_ids.len() as u32;
        let mut g = grpc.clone();
        let req = common::greedy_grpc_request(&case.prompt_ids, n);
        tasks.spawn(async move { (i, "grpc", grpc_generate(&mut g, req).await.unwrap().1) });
        let (h, u) = (http.clone(), url.clone());
        let body = json!({"prompt": case.prompt_ids, "max_tokens": n, "temperature": 0,
                          "ignore_eos": true, "stream": true});
        tasks.spawn(async move { (i, "http", http_stream(&h, &u, body).await.0) });
    }
    let mut finished = 0;
    while let Some(done) = tasks.join_next().await {
        let (i, api, text) = done.unwrap();
        assert_eq!(
            text,
            solo[i % solo.len()].1,
            "request {i} over {api} under load"
        );
        finished += 1;
    }
    assert_eq!(finished, 64);
    let health = server
        .wait_health(&http, Duration::from_secs(5), |c, b| {
            c == 200 && b["running"] == 0
        })
        .await;
    assert_eq!(
        health["kv_cache_usage"], 0.0,
        "every block is back: {health}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_frees_its_blocks_and_abort_stops_a_request() {
    let server = Server::start(&model(), &["--tp", "2"]);
    let http = reqwest::Client::new();
    let body = json!({"prompt": [5, 6, 7], "max_tokens": 120, "ignore_eos": true,
                      "temperature": 0, "stream": true});
    let resp = http
        .post(format!("{}/v1/completions", server.http))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut chunks = resp.bytes_stream();
    chunks.next().await.unwrap().unwrap();
    let busy = server.health(&http).await.1;
    assert_eq!(busy["running"], 1, "{busy}");
    assert!(busy["kv_cache_usage"].as_f64().unwrap() > 0.0);
    drop(chunks);
    server
        .wait_health(&http, Duration::from_secs(5), |_, b| {
            b["running"] == 0 && b["kv_cache_usage"] == 0.0
        })
        .await;

    // gRPC Abort by request id ends the stream with finish_reason "abort".
    let mut grpc = TesseraClient::connect(server.grpc.clone()).await.unwrap();
    let req = pb::GenerateRequest {
        request_id: "long-one".into(),
        ..common::greedy_grpc_request(&[5, 6, 7], 120)
    };
    let mut stream = grpc.generate(req).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    let found = grpc
        .abort(pb::AbortRequest {
            request_id: "long-one".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .found;
    assert!(found);
    let mut last = None;
    while let Some(m) = stream.message().await.unwrap() {
        last = Some(m);
    }
    let last = last.unwrap();
    assert_eq!(last.finish_reason, "abort");
    assert!(last.usage.unwrap().completion_tokens < 120);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_refused_with_429_and_resource_exhausted() {
    // The demo model (larger, 512 positions) keeps the held requests busy for seconds, so the
    // queue is still full when the refused requests arrive, even on a slow or loaded machine.
    let demo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tessera-demo");
    let server = Server::start(&demo, &["--max-running", "1", "--max-waiting", "1"]);
    let http = reqwest::Client::new();
    let url = format!("{}/v1/completions", server.http);
    let long = json!({"prompt": [5, 6, 7], "max_tokens": 500, "ignore_eos": true});
    // One runs, one waits: both accepted. The second is sent once the first runs, so that it
    // finds the waiting slot free however soon the engine loop picks the first up.
    let mut held = Vec::new();
    for i in 0..2 {
        let resp = http
            .post(&url)
            .json(&json!({"prompt": [5, 6, 7], "max_tokens": 500, "ignore_eos": true, "stream": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        held.push(resp);
        if i == 0 {
            server
                .wait_health(&http, Duration::from_secs(5), |_, b| b["running"] == 1)
                .await;
        }
    }
    let resp = http.post(&url).json(&long).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "queue_full", "{err}");
    let mut grpc = TesseraClient::connect(server.grpc.clone()).await.unwrap();
    let status = grpc_generate(&mut grpc, common::greedy_grpc_request(&[1, 2], 4))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
    drop(held);
    // Once the held streams are gone the server accepts work again.
    server
        .wait_health(&http, Duration::from_secs(5), |_, b| b["running"] == 0)
        .await;
    let ok = http
        .post(&url)
        .json(&json!({"prompt": [5], "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_jobs_complete_and_cancel() {
    let server = Server::start(&model(), &["--tp", "2"]);
    let reference = common::reference(&model());
    let mut grpc = TesseraClient::connect(server.grpc.clone()).await.unwrap();
    let requests = reference
        .cases
        .iter()
        .enumerate()
        .map(|(i, c)| pb::JobRequest {
            custom_id: format!("case-{i}"),
            request: Some(common::greedy_grpc_request(
                &c.prompt_ids,
                c.greedy_ids.len() as u32,
            )),
        })
        .collect();
    let job = grpc
        .submit_job(pb::SubmitJobRequest {
            requests,
            label: "reference".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let job = common::server::wait_for_job(&mut grpc, &job.id, Duration::from_secs(60)).await;
    assert_eq!(job.counts.unwrap().completed, reference.cases.len() as u32);
    let mut results = grpc
        .get_job_results(pb::GetJobResultsRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    let mut i = 0;
    while let Some(r) = results.message().await.unwrap() {
        assert_eq!(r.custom_id, format!("case-{i}"));
        assert_eq!(r.token_ids, reference.cases[i].greedy_ids, "job result {i}");
        i += 1;
    }
    assert_eq!(i, reference.cases.len());

    // A long job, cancelled while it runs.
    let requests = (0..40)
        .map(|i| pb::JobRequest {
            custom_id: format!("long-{i}"),
            request: Some(common::greedy_grpc_request(&[3, 4, 5], 100)),
        })
        .collect();
    let long = grpc
        .submit_job(pb::SubmitJobRequest {
            requests,
            label: "long".into(),
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cancelled = grpc
        .cancel_job(pb::CancelJobRequest {
            id: long.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        cancelled.status,
        pb::JobStatus::Cancelled as i32,
        "{cancelled:?}"
    );
    let counts = cancelled.counts.unwrap();
    assert_eq!(counts.total, 40);
    assert!(counts.cancelled > 0, "{counts:?}");
    assert_eq!(counts.completed + counts.failed + counts.cancelled, 40);
    let listed = grpc
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(listed.len(), 2);
    let missing = grpc
        .get_job(pb::GetJobRequest {
            id: "job-99".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_requests_use_the_models_template() {
    let server = Server::start(&model(), &[]);
    let http = reqwest::Client::new();
    let chat: Value = common::server::post_json(
        &http,
        format!("{}/v1/chat/completions", server.http),
        &json!({"model": "qwen3_moe", "messages": [{"role": "user", "content": "The cat"}],
                      "max_tokens": 6, "temperature": 0, "logprobs": true, "top_logprobs": 2}),
    )
    .await;
    // The same prompt rendered by hand, through the completions endpoint.
    let prompt = "<|im_start|>user\nThe cat<|im_end|>\n<|im_start|>assistant\n";
    let plain: Value = common::server::post_json(
        &http,
        format!("{}/v1/completions", server.http),
        &json!({"prompt": prompt, "max_tokens": 6, "temperature": 0}),
    )
    .await;
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(
        chat["choices"][0]["message"]["content"], plain["choices"][0]["text"],
        "{chat} vs {plain}"
    );
    assert_eq!(
        chat["usage"]["prompt_tokens"],
        plain["usage"]["prompt_tokens"]
    );
    let lps = &chat["choices"][0]["logprobs"]["content"];
    assert_eq!(
        lps.as_array().unwrap().len(),
        chat["usage"]["completion_tokens"].as_u64().unwrap() as usize
    );
    assert_eq!(lps[0]["top_logprobs"].as_array().unwrap().len(), 2);

    let wrong: Value = common::server::post_json(
        &http,
        format!("{}/v1/chat/completions", server.http),
        &json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(wrong["error"]["code"], "not_found", "{wrong}");
}

/// Runs `tessera bench` against `url` and returns its JSON report.
fn bench(url: &str, extra: &[&str]) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["bench", "--url", url, "--json", "--num-requests", "12"])
        .args(["--input-len", "10", "--output-len", "6"])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_reports_throughput_and_latency_over_both_apis() {
    let server = Server::start(&model(), &["--tp", "2"]);
    let (http, grpc) = (server.http.clone(), server.grpc.clone());
    let reports = tokio::task::spawn_blocking(move || {
        [
            bench(&http, &["--concurrency", "4"]),
            bench(&grpc, &["--api", "grpc", "--request-rate", "100"]),
        ]
    })
    .await
    .unwrap();
    for r in reports {
        assert_eq!(r["completed"], 12, "{r}");
        assert_eq!(r["failed"], 0, "{r}");
        assert_eq!(
            r["output_tokens"],
            12 * 6,
            "eos is ignored, lengths are exact: {r}"
        );
        assert!(r["output_tokens_per_s"].as_f64().unwrap() > 0.0);
        for key in ["ttft_ms", "itl_ms", "e2e_ms"] {
            let p = &r[key];
            assert!(
                p["p50"].as_f64().unwrap() <= p["p99"].as_f64().unwrap(),
                "{key}: {p}"
            );
        }
        assert!(r["ttft_ms"]["p50"].as_f64().unwrap() > 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_placement_map_is_readable_and_replaceable_at_runtime() {
    let server = Server::start(&model(), &["--tp", "2"]);
    let reference = common::reference(&model());
    let http = reqwest::Client::new();
    let url = format!("{}/v1/placement", server.http);
    let before: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(before["world_size"], 2, "{before}");
    let layer = &before["layers"][0];
    let experts = layer["ranks"].as_array().unwrap().len();
    assert_eq!(layer["ranks"][0], 0);

    // A stream in flight while the experts move finishes as it would have alone.
    let mut grpc = TesseraClient::connect(server.grpc.clone()).await.unwrap();
    let (solo, _, _) = grpc_generate(&mut grpc, common::greedy_grpc_request(&[5, 6, 7], 60))
        .await
        .unwrap();
    let mut g = grpc.clone();
    let running = tokio::spawn(async move {
        grpc_generate(&mut g, common::greedy_grpc_request(&[5, 6, 7], 60)).await
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    // Every expert to rank 1: rank 0 keeps attention and dense work only.
    let moved = json!({"world_size": 2, "layers": before["layers"].as_array().unwrap().iter()
        .map(|l| json!({"layer": l["layer"], "ranks": vec![1; experts]})).collect::<Vec<_>>()});
    let resp = http.put(&url).json(&moved).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let after: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(after, moved);
    assert_eq!(
        running.await.unwrap().unwrap().0,
        solo,
        "the preempted stream is unchanged"
    );
    let case = &reference.cases[0];
    let (ids, _, _) = grpc_generate(
        &mut grpc,
        common::greedy_grpc_request(&case.prompt_ids, case.greedy_ids.len() as u32),
    )
    .await
    .unwrap();
    assert_eq!(
        ids, case.greedy_ids,
        "transformers' tokens under the new placement"
    );

    let bad = json!({"world_size": 3, "layers": moved["layers"]});
    let resp = http.put(&url).json(&bad).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["param"], "placement", "{err}");
}
