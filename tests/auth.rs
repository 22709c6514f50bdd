//! API-key authentication on a real `tessera serve`: with `--api-key` (given through the
//! environment, as operators should) every HTTP route and gRPC method needs
//! `Authorization: Bearer KEY`; health and metrics stay open unless `--api-key-exempt` says
//! otherwise; without a key configured nothing is asked.

mod common;

use std::process::{Command, Stdio};

use serde_json::{Value, json};
use tessera_proto::v1 as pb;
use tessera_proto::v1::tessera_client::TesseraClient;
use tonic::Code;

use common::server::Server;

const KEY: &str = "t0p-secret";

fn model() -> std::path::PathBuf {
    common::fixtures_dir().join("qwen3_moe")
}

/// `tessera serve` with the key in its environment and `extra` flags.
fn start(extra: &[&str]) -> Server {
    Server::start_with_env(&model(), extra, &[("TESSERA_API_KEY", KEY)])
}

async fn post(http: &reqwest::Client, url: &str, key: Option<&str>) -> (u16, Value) {
    let mut req = http
        .post(url)
        .json(&json!({"prompt": [1, 2], "max_tokens": 2}));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn generate_request() -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds {
            ids: vec![1, 2],
        })),
        max_tokens: Some(2),
        ..Default::default()
    }
}

async fn grpc_generate(url: &str, key: Option<&str>) -> Code {
    let mut client = TesseraClient::connect(url.to_string()).await.unwrap();
    let mut req = tonic::Request::new(generate_request());
    if let Some(k) = key {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    match client.generate(req).await {
        Err(s) => s.code(),
        Ok(stream) => {
            let mut stream = stream.into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => break Code::Ok,
                    Err(s) => break s.code(),
                }
            }
        }
    }
}

async fn grpc_health(url: &str) -> Code {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    match health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
    {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_and_method_needs_the_key_except_health_and_metrics() {
    let server = start(&[]);
    let http = reqwest::Client::new();
    let completions = format!("{}/v1/completions", server.http);
    let (status, err) = post(&http, &completions, None).await;
    assert_eq!(status, 401, "{err}");
    assert_eq!(err["error"]["code"], "invalid_api_key", "{err}");
    assert_eq!(post(&http, &completions, Some("t0p-secreT")).await.0, 401);
    assert_eq!(post(&http, &completions, Some(KEY)).await.0, 200);
    for path in ["/v1/models", "/v1/placement", "/v1/metrics/targets"] {
        let url = format!("{}{path}", server.http);
        let bare = http.get(&url).send().await.unwrap().status().as_u16();
        assert_eq!(bare, 401, "{path}");
        let keyed = http.get(&url).bearer_auth(KEY).send().await.unwrap();
        assert_eq!(keyed.status().as_u16(), 200, "{path}");
    }
    for path in ["/health", "/metrics"] {
        let url = format!("{}{path}", server.http);
        let bare = http.get(&url).send().await.unwrap().status().as_u16();
        assert_eq!(bare, 200, "{path} is exempt by default");
    }
    assert_eq!(
        grpc_generate(&server.grpc, None).await,
        Code::Unauthenticated
    );
    assert_eq!(
        grpc_generate(&server.grpc, Some("nope")).await,
        Code::Unauthenticated
    );
    assert_eq!(grpc_generate(&server.grpc, Some(KEY)).await, Code::Ok);
    assert_eq!(grpc_health(&server.grpc).await, Code::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_exempt_list_protects_health_too() {
    let server = start(&["--api-key-exempt", ""]);
    let http = reqwest::Client::new();
    let health = format!("{}/health", server.http);
    assert_eq!(http.get(&health).send().await.unwrap().status(), 401);
    let keyed = http.get(&health).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(keyed.status(), 200);
    assert_eq!(grpc_health(&server.grpc).await, Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_nothing_is_asked() {
    let server = Server::start(&model(), &[]);
    let http = reqwest::Client::new();
    let url = format!("{}/v1/completions", server.http);
    assert_eq!(post(&http, &url, None).await.0, 200);
    assert_eq!(grpc_generate(&server.grpc, None).await, Code::Ok);
}

#[test]
fn an_empty_key_is_a_configuration_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["serve", "--port", "0", "--grpc-port", "0", "--model"])
        .arg(model())
        .env("TESSERA_API_KEY", "")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--api-key is empty"), "{stderr}");
}

/// `tessera bench --url` against a keyed server: with the key every request completes over both
/// APIs; without it the run stops at its first call with the server's 401.
#[test]
fn the_load_generator_sends_the_key() {
    let server = start(&[]);
    let bench = |url: &str, extra: &[&str], key: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera"));
        cmd.args(["bench", "--url", url, "--json", "--num-requests", "3"])
            .args(["--input-len", "4", "--output-len", "2"])
            .args(extra)
            .env_remove("TESSERA_API_KEY")
            .stdin(Stdio::null());
        if let Some(k) = key {
            cmd.args(["--api-key", k]);
        }
        cmd.output().unwrap()
    };
    for (url, extra) in [
        (&server.http, &[][..]),
        (&server.grpc, &["--api", "grpc"][..]),
    ] {
        let out = bench(url, extra, Some(KEY));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{extra:?}: {stderr}");
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["completed"], 3, "{extra:?}: {report}");
        let refused = bench(url, extra, None);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{extra:?} ran without the key");
        assert!(stderr.contains("API key"), "{extra:?}: {stderr}");
    }
}
