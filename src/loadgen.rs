//! `tessera bench --url ...`: a load generator against a running server, like vLLM's
//! `bench serve`. It sends N streaming requests with random prompts of a given input length
//! distribution (token ids, so no tokenizer is needed) at a fixed request rate (Poisson
//! arrivals) or as fast as a concurrency limit allows, over HTTP (OpenAI completions) or gRPC
//! (tessera.v1), and reports throughput and latency percentiles.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use futures_util::StreamExt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use tessera_proto::v1 as pb;
use tessera_proto::v1::tessera_client::TesseraClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Api {
    /// OpenAI-compatible `/v1/completions` with SSE streaming.
    Http,
    /// tessera.v1 `Generate` (server streaming).
    Grpc,
}

#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Server to load: `http://host:port` (the HTTP port for --api http, the gRPC port for
    /// --api grpc).
    #[arg(long, env = "TESSERA_BENCH_URL")]
    pub url: Option<String>,
    /// Which API to call.
    #[arg(long, value_enum, default_value_t = Api::Http)]
    pub api: Api,
    /// Requests to send.
    #[arg(long, default_value_t = 64)]
    pub num_requests: usize,
    /// Mean prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Mean generated tokens per request (eos is ignored, so each request generates exactly its
    /// drawn length).
    #[arg(long, default_value_t = 64)]
    pub output_len: usize,
    /// Lengths are drawn uniformly from [len × (1 − r), len × (1 + r)]; 0 makes them fixed.
    #[arg(long, default_value_t = 0.0)]
    pub range_ratio: f64,
    /// Requests per second (Poisson arrivals); absent or `inf` sends them all at once (bounded by
    /// --concurrency).
    #[arg(long)]
    pub request_rate: Option<f64>,
    /// Most requests in flight at once; 0 means no limit.
    #[arg(long, default_value_t = 0)]
    pub concurrency: usize,
    /// Seed for prompts, lengths and arrival times.
    #[arg(long, default_value_t = 0)]
    pub request_seed: u64,
    /// Also write the JSON result to this file.
    #[arg(long)]
    pub result_file: Option<PathBuf>,
    /// API key of a server started with `--api-key`: sent as `Authorization: Bearer KEY` (an
    /// HTTP header, or gRPC metadata).
    #[arg(long, env = "TESSERA_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// The gRPC client every request shares: a channel whose calls carry the API key, if any.
type GrpcClient = TesseraClient<InterceptedService<Channel, BearerAuth>>;

/// Adds `authorization: Bearer KEY` to every gRPC call (nothing without a key).
#[derive(Clone)]
struct BearerAuth(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

impl LoadArgs {
    /// `Bearer KEY`, checked once: a key with characters a header can't carry is a usage error.
    fn bearer(&self) -> Result<Option<String>> {
        match &self.api_key {
            None => Ok(None),
            Some(k) if k.is_empty() || !k.bytes().all(|b| b.is_ascii_graphic()) => {
                bail!("--api-key must be non-empty printable ASCII without spaces")
            }
            Some(k) => Ok(Some(format!("Bearer {k}"))),
        }
    }

    fn http_client(&self) -> Result<reqwest::Client> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(b) = self.bearer()? {
            headers.insert(reqwest::header::AUTHORIZATION, b.parse()?);
        }
        Ok(reqwest::Client::builder()
            .default_headers(headers)
            .build()?)
    }

    async fn grpc_client(&self, url: &str) -> Result<GrpcClient> {
        let channel = Endpoint::from_shared(url.to_string())
            .with_context(|| format!("bad --url {url}"))?
            .connect()
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let key = self.bearer()?.map(|b| b.parse()).transpose()?;
        Ok(TesseraClient::with_interceptor(channel, BearerAuth(key)))
    }
}

/// What one request measured.
#[derive(Debug, Default)]
struct Sample {
    ok: bool,
    error: Option<String>,
    prompt_tokens: usize,
    output_tokens: usize,
    ttft: Option<f64>,
    /// Gaps between consecutive tokens after the first (seconds).
    itl: Vec<f64>,
    e2e: f64,
}

struct Job {
    prompt: Vec<u32>,
    max_tokens: usize,
}

fn draw_len(rng: &mut ChaCha8Rng, mean: usize, ratio: f64) -> usize {
    let lo = ((mean as f64) * (1.0 - ratio)).round().max(1.0) as usize;
    let hi = ((mean as f64) * (1.0 + ratio)).round().max(lo as f64) as usize;
    rng.random_range(lo..=hi)
}

/// Vocabulary size and context length the server reports.
async fn model_shape(args: &LoadArgs, url: &str) -> Result<(usize, usize)> {
    match args.api {
        Api::Http => {
            let resp = args
                .http_client()?
                .get(format!("{url}/v1/models"))
                .send()
                .await
                .with_context(|| format!("GET {url}/v1/models"))?;
            if !resp.status().is_success() {
                bail!(
                    "GET {url}/v1/models: HTTP {}: {}",
                    resp.status(),
                    resp.text().await.unwrap_or_default()
                );
            }
            let v: Value = resp.json().await?;
            let m = &v["data"][0];
            let vocab = m["vocab_size"]
                .as_u64()
                .context("/v1/models has no vocab_size")?;
            let ctx = m["max_model_len"]
                .as_u64()
                .context("/v1/models has no max_model_len")?;
            Ok((vocab as usize, ctx as usize))
        }
        Api::Grpc => {
            let i = args
                .grpc_client(url)
                .await?
                .get_model_info(pb::GetModelInfoRequest {})
                .await
                .with_context(|| format!("GetModelInfo at {url}"))?
                .into_inner();
            Ok((i.vocab_size as usize, i.max_context as usize))
        }
    }
}

async fn run_http(client: reqwest::Client, url: String, job: Job) -> Sample {
    let start = Instant::now();
    let mut s = Sample {
        prompt_tokens: job.prompt.len(),
        ..Default::default()
    };
    let body = json!({"prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0,
                      "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
    let resp = match client
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            s.error = Some(format!(
                "HTTP {}: {}",
                r.status(),
                r.text().await.unwrap_or_default()
            ));
            return s;
        }
        Err(e) => {
            s.error = Some(e.to_string());
            return s;
        }
    };
    let mut last: Option<Instant> = None;
    let mut buf = String::new();
    let mut chunks = resp.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let Ok(chunk) = chunk else {
            s.error = Some("the stream broke".into());
            return s;
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                s.ok = s.error.is_none();
                s.e2e = start.elapsed().as_secs_f64();
                return s;
            }
            let v: Value = serde_json::from_str(data).unwrap_or_default();
            if let Some(e) = v.get("error") {
                s.error = Some(e["message"].as_str().unwrap_or("error").to_string());
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                s.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
            }
            // Every content chunk from Tessera carries one token.
            if v["choices"][0]["finish_reason"].is_null() && v["choices"].get(0).is_some() {
                let now = Instant::now();
                match last {
                    None => s.ttft = Some((now - start).as_secs_f64()),
                    Some(prev) => s.itl.push((now - prev).as_secs_f64()),
                }
                last = Some(now);
            }
        }
    }
    s.error
        .get_or_insert_with(|| "the stream ended without [DONE]".into());
    s
}

async fn run_grpc(mut client: GrpcClient, job: Job) -> Sample {
    let start = Instant::now();
    let mut s = Sample {
        prompt_tokens: job.prompt.len(),
        ..Default::default()
    };
    let req = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds {
            ids: job.prompt,
        })),
        max_tokens: Some(job.max_tokens as u32),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        ignore_eos: true,
        ..Default::default()
    };
    let mut stream = match client.generate(req).await {
        Ok(r) => r.into_inner(),
        Err(e) => {
            s.error = Some(e.to_string());
            return s;
        }
    };
    let mut last: Option<Instant> = None;
    loop {
        match stream.message().await {
            Ok(Some(m)) => {
                for _ in &m.token_ids {
                    let now = Instant::now();
                    match last {
                        None => s.ttft = Some((now - start).as_secs_f64()),
                        Some(prev) => s.itl.push((now - prev).as_secs_f64()),
                    }
                    last = Some(now);
                    s.output_tokens += 1;
                }
                if !m.finish_reason.is_empty() {
                    s.ok = true;
                }
            }
            Ok(None) => break,
            Err(e) => {
                s.error = Some(e.to_string());
                return s;
            }
        }
    }
    s.e2e = start.elapsed().as_secs_f64();
    s
}

/// The p-th percentile (0–100) of `v` (nearest rank), in milliseconds.
fn pct_ms(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1] * 1e3
}

fn stats(v: &mut [f64]) -> Value {
    let mean = if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64 * 1e3
    };
    json!({"mean": mean, "p50": pct_ms(v, 50.0), "p90": pct_ms(v, 90.0), "p99": pct_ms(v, 99.0)})
}

pub fn run(args: &LoadArgs, print_json: bool) -> Result<()> {
    let Some(url) = args.url.clone() else {
        bail!("give --url of a running server (or --roofline for the CPU roofline report)");
    };
    let url = url.trim_end_matches('/').to_string();
    if args.num_requests == 0 || args.input_len == 0 || args.output_len == 0 {
        bail!("--num-requests, --input-len and --output-len must be at least 1");
    }
    if !(0.0..1.0).contains(&args.range_ratio) {
        bail!("--range-ratio must be in [0, 1), got {}", args.range_ratio);
    }
    if let Some(r) = args.request_rate
        && (r.is_nan() || r <= 0.0)
    {
        bail!("--request-rate must be > 0, got {r}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(drive(args, url, print_json))
}

async fn drive(args: &LoadArgs, url: String, print_json: bool) -> Result<()> {
    let (vocab, ctx) = model_shape(args, &url).await?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.request_seed);
    let jobs: Vec<Job> = (0..args.num_requests)
        .map(|_| {
            let n_in = draw_len(&mut rng, args.input_len, args.range_ratio)
                .min(ctx.saturating_sub(2))
                .max(1);
            let n_out = draw_len(&mut rng, args.output_len, args.range_ratio)
                .min(ctx - n_in)
                .max(1);
            Job {
                prompt: (0..n_in)
                    .map(|_| rng.random_range(0..vocab as u32))
                    .collect(),
                max_tokens: n_out,
            }
        })
        .collect();
    let http = args.http_client()?;
    let grpc = match args.api {
        Api::Grpc => Some(args.grpc_client(&url).await?),
        Api::Http => None,
    };
    let limit = if args.concurrency == 0 {
        usize::MAX >> 4
    } else {
        args.concurrency
    };
    let gate = Arc::new(tokio::sync::Semaphore::new(limit));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for job in jobs {
        if let Some(rate) = args.request_rate.filter(|r| r.is_finite()) {
            // Exponential gaps give Poisson arrivals.
            let gap = -(1.0 - rng.random::<f64>()).ln() / rate;
            tokio::time::sleep(Duration::from_secs_f64(gap)).await;
        }
        let permit = Arc::clone(&gate).acquire_owned().await?;
        let (http, url, grpc) = (http.clone(), url.clone(), grpc.clone());
        tasks.spawn(async move {
            let s = match grpc {
                Some(c) => run_grpc(c, job).await,
                None => run_http(http, url, job).await,
            };
            drop(permit);
            s
        });
    }
    let mut samples = Vec::new();
    while let Some(s) = tasks.join_next().await {
        samples.push(s?);
    }
    let secs = started.elapsed().as_secs_f64();
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let failed: Vec<&String> = samples.iter().filter_map(|s| s.error.as_ref()).collect();
    let out_tokens: usize = ok.iter().map(|s| s.output_tokens).sum();
    let in_tokens: usize = ok.iter().map(|s| s.prompt_tokens).sum();
    let mut ttft: Vec<f64> = ok.iter().filter_map(|s| s.ttft).collect();
    let mut itl: Vec<f64> = ok.iter().flat_map(|s| s.itl.iter().copied()).collect();
    let mut e2e: Vec<f64> = ok.iter().map(|s| s.e2e).collect();
    let report = json!({
        "api": format!("{:?}", args.api).to_lowercase(),
        "url": url,
        "num_requests": args.num_requests,
        "completed": ok.len(),
        "failed": failed.len(),
        "first_error": failed.first(),
        "request_rate": args.request_rate.map_or("inf".to_string(), |r| r.to_string()),
        "concurrency": args.concurrency,
        "duration_s": secs,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "requests_per_s": ok.len() as f64 / secs,
        "output_tokens_per_s": out_tokens as f64 / secs,
        "total_tokens_per_s": (in_tokens + out_tokens) as f64 / secs,
        "ttft_ms": stats(&mut ttft),
        "itl_ms": stats(&mut itl),
        "e2e_ms": stats(&mut e2e),
    });
    if let Some(path) = &args.result_file {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if print_json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    println!(
        "============ Serving benchmark ({}) ============",
        r["api"].as_str().unwrap_or("")
    );
    println!(
        "{:<32}{}/{}",
        "Successful requests:", r["completed"], r["num_requests"]
    );
    println!("{:<32}{}", "Failed requests:", r["failed"]);
    println!("{:<32}{:.2}", "Duration (s):", f(&r["duration_s"]));
    println!("{:<32}{}", "Input tokens:", r["input_tokens"]);
    println!("{:<32}{}", "Generated tokens:", r["output_tokens"]);
    println!(
        "{:<32}{:.2}",
        "Request throughput (req/s):",
        f(&r["requests_per_s"])
    );
    println!(
        "{:<32}{:.2}",
        "Output throughput (tok/s):",
        f(&r["output_tokens_per_s"])
    );
    println!(
        "{:<32}{:.2}",
        "Total throughput (tok/s):",
        f(&r["total_tokens_per_s"])
    );
    for (name, key) in [
        ("TTFT", "ttft_ms"),
        ("ITL", "itl_ms"),
        ("E2E latency", "e2e_ms"),
    ] {
        let s = &r[key];
        println!(
            "{:<32}mean {:.1} · p50 {:.1} · p90 {:.1} · p99 {:.1}",
            format!("{name} (ms):"),
            f(&s["mean"]),
            f(&s["p50"]),
            f(&s["p90"]),
            f(&s["p99"])
        );
    }
    if let Some(e) = r["first_error"].as_str() {
        println!("{:<32}{e}", "First error:");
    }
}
