//! Bad input on both public APIs of a real `tessera serve --tp 2`: every case in the matrix is
//! refused with a client error naming the field (HTTP 4xx in OpenAI's shape, a gRPC status other
//! than INTERNAL/UNKNOWN), never a 500, and never reaches a worker (the coordinator's and every
//! worker's step counters stay at zero). A property test then throws random requests at both
//! APIs and checks the server never answers 5xx and stays healthy.

mod common;

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};
use tessera_common::metrics as m;
use tessera_proto::v1 as pb;
use tessera_proto::v1::tessera_client::TesseraClient;
use tonic::Code;

use common::server::Server;

/// The fixture's vocabulary and context (tests/fixtures/qwen3_moe/config.json).
const VOCAB: u32 = 384;
const CONTEXT: usize = 128;

fn model() -> std::path::PathBuf {
    common::fixtures_dir().join("qwen3_moe")
}

/// Sum of a counter over the coordinator and every worker (scraped like Prometheus does).
async fn steps_run(server: &Server, http: &reqwest::Client) -> f64 {
    let targets = common::server::metrics_targets(server, http).await;
    let mut total = 0.0;
    for group in targets.as_array().unwrap() {
        let addr = group["targets"][0].as_str().unwrap();
        let text = http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let counted = [
            format!("{}_count", m::STEP_DURATION),
            m::WORKER_STEPS.to_string(),
        ];
        total += text
            .lines()
            .filter(|l| counted.iter().any(|c| l.starts_with(c.as_str())))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    total
}

async fn post_raw(
    http: &reqwest::Client,
    url: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let resp = http
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or_else(|_| {
        panic!("status {status}: not JSON (OpenAI error shape expected): {text}")
    });
    (status, value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_validation_matrix_is_refused_with_the_field_named_and_never_reaches_a_worker() {
    let server = Server::start(&model(), &["--tp", "2"]);
    let http = reqwest::Client::new();
    let completions = format!("{}/v1/completions", server.http);
    let chat = format!("{}/v1/chat/completions", server.http);
    let long_prompt: Vec<u32> = (0..CONTEXT as u32).map(|i| i % VOCAB).collect();
    // (endpoint, body, expected status, field the error must name)
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            &completions,
            json!({"prompt": "a", "temperature": -0.5}),
            400,
            "temperature",
        ),
        (
            &completions,
            json!({"prompt": "a", "top_p": 0.0}),
            400,
            "top_p",
        ),
        (
            &completions,
            json!({"prompt": "a", "top_p": 1.5}),
            400,
            "top_p",
        ),
        (
            &completions,
            json!({"prompt": "a", "top_k": -2}),
            400,
            "top_k",
        ),
        (
            &completions,
            json!({"prompt": "a", "max_tokens": 0}),
            400,
            "max_tokens",
        ),
        (
            &completions,
            json!({"prompt": "a", "max_tokens": -1}),
            400,
            "max_tokens",
        ),
        (
            &completions,
            json!({"prompt": "a", "max_tokens": 1000}),
            400,
            "max_tokens",
        ),
        (
            &completions,
            json!({"prompt": "a", "max_tokens": "ten"}),
            400,
            "max_tokens",
        ),
        (&completions, json!({"prompt": long_prompt}), 400, "prompt"),
        (&completions, json!({"prompt": [1, VOCAB]}), 400, "prompt"),
        (&completions, json!({"prompt": [1, -3]}), 400, "prompt"),
        (
            &completions,
            json!({"prompt": "a", "stop_token_ids": [VOCAB]}),
            400,
            "stop_token_ids",
        ),
        (
            &completions,
            json!({"prompt": "a", "logit_bias": {VOCAB.to_string(): 1}}),
            400,
            "logit_bias",
        ),
        (
            &completions,
            json!({"prompt": "a", "logit_bias": {"x": 1}}),
            400,
            "logit_bias",
        ),
        (
            &completions,
            json!({"prompt": "a", "logprobs": 99}),
            400,
            "logprobs",
        ),
        (&completions, json!({"prompt": "a", "n": 2}), 400, "n"),
        (
            &completions,
            json!({"prompt": "a", "temperature": 1e39}),
            400,
            "temperature",
        ),
        (&completions, json!({"max_tokens": 3}), 400, "prompt"),
        (
            &completions,
            json!({"prompt": "a", "model": "no-such-model"}),
            404,
            "model",
        ),
        (&completions, json!([1, 2]), 400, "body"),
        (&chat, json!({"messages": "hi"}), 400, "messages"),
        (&chat, json!({"messages": []}), 400, "messages"),
        (
            &chat,
            json!({"messages": [{"role": "user", "content": "hi"}], "top_p": -1}),
            400,
            "top_p",
        ),
    ];
    let mut failures = Vec::new();
    for (url, body, status, field) in &cases {
        let (got, err) = post_raw(&http, url, body.to_string()).await;
        let named = err["error"]["param"].as_str() == Some(field)
            || err["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(field));
        if got != *status || !named {
            failures.push(format!(
                "{body} -> {got} {err} (wanted {status} naming {field})"
            ));
        }
    }
    // Bodies that are not JSON at all, or too large.
    let raw_cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{\"prompt\": ".to_vec(), 400, "body"),
        (b"{\"prompt\": \"\xff\xfe\"}".to_vec(), 400, "body"),
        (vec![b' '; 5 << 20], 413, "body"),
    ];
    for (body, status, field) in raw_cases {
        let shown = String::from_utf8_lossy(&body[..body.len().min(40)]).into_owned();
        let (got, err) = post_raw(&http, &completions, body).await;
        if got != status || err["error"]["param"].as_str() != Some(field) {
            failures.push(format!(
                "{shown:?} -> {got} {err} (wanted {status} naming {field})"
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");

    // The same over gRPC.
    let mut grpc = TesseraClient::connect(server.grpc.clone()).await.unwrap();
    let base = || pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds {
            ids: vec![1, 2],
        })),
        max_tokens: Some(2),
        ..Default::default()
    };
    let sampling = |f: &dyn Fn(&mut pb::SamplingParams)| {
        let mut r = base();
        let mut s = pb::SamplingParams::default();
        f(&mut s);
        r.sampling = Some(s);
        r
    };
    let grpc_cases: Vec<(pb::GenerateRequest, &str)> = vec![
        (sampling(&|s| s.temperature = Some(-1.0)), "temperature"),
        (sampling(&|s| s.top_p = Some(0.0)), "top_p"),
        (sampling(&|s| s.top_p = Some(1.01)), "top_p"),
        (
            pb::GenerateRequest {
                max_tokens: Some(0),
                ..base()
            },
            "max_tokens",
        ),
        (
            pb::GenerateRequest {
                max_tokens: Some(500),
                ..base()
            },
            "max_tokens",
        ),
        (
            pb::GenerateRequest {
                prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds {
                    ids: long_prompt.clone(),
                })),
                ..base()
            },
            "prompt",
        ),
        (
            pb::GenerateRequest {
                prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds {
                    ids: vec![VOCAB],
                })),
                ..base()
            },
            "prompt",
        ),
        (
            pb::GenerateRequest {
                stop_token_ids: vec![VOCAB + 7],
                ..base()
            },
            "stop_token_ids",
        ),
        (
            pb::GenerateRequest {
                top_logprobs: 21,
                ..base()
            },
            "top_logprobs",
        ),
        (
            pb::GenerateRequest {
                prompt: None,
                ..base()
            },
            "prompt",
        ),
    ];
    for (req, field) in grpc_cases {
        let shown = format!("{req:?}");
        let status = match grpc.generate(req).await {
            Ok(stream) => {
                let mut s = stream.into_inner();
                match s.message().await {
                    Err(status) => status,
                    Ok(m) => panic!("{shown} was accepted: {m:?}"),
                }
            }
            Err(status) => status,
        };
        if status.code() != Code::InvalidArgument || !status.message().contains(field) {
            failures.push(format!(
                "gRPC {shown} -> {status:?} (wanted INVALID_ARGUMENT naming {field})"
            ));
        }
    }
    // A message over the size limit.
    let huge = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text("a".repeat(5 << 20))),
        ..base()
    };
    let Err(status) = grpc.generate(huge).await else {
        panic!("a 5 MiB message was accepted");
    };
    if !matches!(
        status.code(),
        Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
    ) {
        failures.push(format!("gRPC 5 MiB message -> {status:?}"));
    }
    // A text prompt that is not UTF-8 (a protobuf `string` must be).
    let status = raw_generate(&server.grpc, &[0x12, 0x02, 0xff, 0xfe]).await;
    assert!(status.message().contains("UTF-8"), "{status:?}");
    if status.code() != Code::InvalidArgument {
        failures.push(format!("gRPC invalid UTF-8 text -> {status:?}"));
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(
        steps_run(&server, &http).await,
        0.0,
        "a refused request reached a worker"
    );
    // The server still serves.
    let (status, _) = post_raw(
        &http,
        &completions,
        json!({"prompt": [1], "max_tokens": 1}).to_string(),
    )
    .await;
    assert_eq!(status, 200);
}

/// Passes bytes through unchanged, to send messages a generated client cannot build.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

/// Calls `Generate` with an encoded request as given; returns the status it ends with.
async fn raw_generate(url: &str, message: &[u8]) -> tonic::Status {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/tessera.v1.Tessera/Generate");
    let reply = client
        .server_streaming(tonic::Request::new(message.to_vec()), path, RawCodec)
        .await;
    match reply {
        Err(status) => status,
        Ok(stream) => {
            // Drain: a valid message generates; the status is how the stream ends.
            let mut stream = stream.into_inner();
            loop {
                match stream.message().await {
                    Err(status) => break status,
                    Ok(None) => break tonic::Status::ok(""),
                    Ok(Some(_)) => {}
                }
            }
        }
    }
}

/// A JSON value of any shape, biased towards the shapes request fields take.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (-3i64..500).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-2.0f64..3.0).prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-z ]{0,12}".prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const FIELDS: &[&str] = &[
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "logit_bias",
    "stop",
    "stop_token_ids",
    "logprobs",
    "top_logprobs",
    "echo",
    "n",
    "stream",
    "stream_options",
    "ignore_eos",
    "model",
    "messages",
    "user",
    "best_of",
    "suffix",
];

/// A request object: a random subset of the real fields (plus an unknown one) with random values.
fn any_request() -> impl Strategy<Value = Value> {
    let field = (prop::sample::select(FIELDS), any_json());
    (prop::collection::vec(field, 0..7), any::<bool>()).prop_map(|(fields, small)| {
        let mut o: serde_json::Map<String, Value> = fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        // Keep generation short so the test stays quick when a request happens to be valid.
        if small && !o.contains_key("max_tokens") {
            o.insert("max_tokens".into(), json!(2));
        }
        Value::Object(o)
    })
}

#[test]
fn random_requests_never_get_a_server_error() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = Server::start(&model(), &["--tp", "2"]);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let grpc = rt
        .block_on(TesseraClient::connect(server.grpc.clone()))
        .unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 150,
        failure_persistence: None,
        ..Config::default()
    });
    let endpoints = ["/v1/completions", "/v1/chat/completions"];
    let strategy = (
        any_request(),
        0..2usize,
        any::<u64>(),
        any::<f32>(),
        0u32..600,
        prop::collection::vec(any::<u8>(), 0..48),
    );
    runner
        .run(
            &strategy,
            |(body, endpoint, seed, temp, max_tokens, raw)| {
                let url = format!("{}{}", server.http, endpoints[endpoint]);
                let status = rt.block_on(async {
                    http.post(&url)
                        .header("content-type", "application/json")
                        .body(body.to_string())
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                });
                let status = status.map_err(|e| TestCaseError::fail(format!("{body}: {e}")))?;
                prop_assert!(status < 500, "HTTP {status} for {body}");
                // gRPC: random sampling values and lengths on a random token prompt.
                let req = pb::GenerateRequest {
                    prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds {
                        ids: vec![(seed % 500) as u32, 3],
                    })),
                    max_tokens: Some(max_tokens),
                    sampling: Some(pb::SamplingParams {
                        temperature: Some(temp),
                        top_p: Some(temp / 2.0),
                        seed: Some(seed),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                let mut grpc = grpc.clone();
                let code = rt.block_on(async {
                    match grpc.generate(req).await {
                        Ok(s) => {
                            let mut s = s.into_inner();
                            loop {
                                match s.message().await {
                                    Ok(Some(_)) => {}
                                    Ok(None) => break Code::Ok,
                                    Err(e) => break e.code(),
                                }
                            }
                        }
                        Err(e) => e.code(),
                    }
                });
                prop_assert!(
                    !matches!(code, Code::Internal | Code::Unknown | Code::Unavailable),
                    "gRPC {code:?} for temperature {temp}, seed {seed}, max_tokens {max_tokens}"
                );
                // Arbitrary bytes as a Generate message.
                let status = rt.block_on(raw_generate(&server.grpc, &raw));
                prop_assert!(
                    !matches!(
                        status.code(),
                        Code::Internal | Code::Unknown | Code::Unavailable
                    ),
                    "gRPC {status:?} for the message {raw:?}"
                );
                Ok(())
            },
        )
        .unwrap();
    let (status, body) = rt.block_on(server.health(&http));
    assert_eq!(status, 200, "{body}");
}
