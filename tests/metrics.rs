//! Metrics as operators meet them: a real Prometheus (Debian's `prometheus`, started here on a
//! loopback port) discovers a running `tessera serve --tp 2` and its workers through
//! `/v1/metrics/targets`, scrapes them while the test drives load (HTTP completions, an invalid
//! request, a batch job over gRPC), and then **every PromQL expression in the Grafana dashboard**
//! (`deploy/grafana/tessera.json`) is evaluated through Prometheus' HTTP API and must return data.
//! The dashboard's metric names must be the constants of `tessera_common::metrics`.

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tessera_common::metrics as m;
use tessera_proto::v1 as pb;
use tessera_proto::v1::tessera_client::TesseraClient;

use common::server::Server;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn dashboard() -> Value {
    let path = repo().join("deploy/grafana/tessera.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Every `expr` of the dashboard's panels, and the metric each template variable reads.
fn dashboard_queries(d: &Value) -> (Vec<String>, Vec<String>) {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(o) => {
                for (k, v) in o {
                    match (k.as_str(), v) {
                        ("expr", Value::String(e)) => out.push(e.clone()),
                        ("templating", _) => {}
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut exprs = Vec::new();
    walk(d, &mut exprs);
    // `label_values(METRIC, LABEL)`: evaluated as `count by (LABEL) (METRIC)`.
    let vars = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["query"]["query"].as_str().or(v["query"].as_str()))
        .filter_map(|q| {
            let inner = q.strip_prefix("label_values(")?.strip_suffix(')')?;
            let (metric, label) = inner.split_once(',')?;
            Some(format!("count by ({}) ({})", label.trim(), metric.trim()))
        })
        .collect();
    (exprs, vars)
}

/// Metric names (`tessera_…`) an expression reads, histogram suffixes removed.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("tessera_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| m::ALL.contains(b)))
            .unwrap_or(name);
        names.push(base.to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn the_dashboard_reads_only_metrics_tessera_exports_and_shows_them_all() {
    let (exprs, vars) = dashboard_queries(&dashboard());
    assert!(exprs.len() >= 20, "only {} queries", exprs.len());
    let used: std::collections::BTreeSet<String> = exprs
        .iter()
        .chain(&vars)
        .flat_map(|e| metric_names(e))
        .collect();
    for name in &used {
        assert!(
            m::ALL.contains(&name.as_str()),
            "the dashboard reads {name}, which is not in tessera_common::metrics"
        );
    }
    for name in m::ALL {
        assert!(used.contains(*name), "no dashboard panel shows {name}");
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Prometheus process on a loopback port, stopped when dropped.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(sd_url: &str) -> Prometheus {
        let bin = ["prometheus", "/usr/bin/prometheus"]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok())
            .expect(
                "Prometheus is not installed: `apt-get install prometheus` (tests/run.sh does)",
            );
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: tessera\n    http_sd_configs:\n      \
                 - url: {sd_url}\n        refresh_interval: 1s\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts");
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    /// The result vector of an instant query (panics on an API error, naming the query).
    async fn query(&self, http: &reqwest::Client, expr: &str) -> Vec<Value> {
        let resp: Value = http
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .await
            .unwrap_or_else(|e| panic!("prometheus at {}: {e}", self.url))
            .json()
            .await
            .unwrap();
        assert_eq!(resp["status"], "success", "{expr}: {resp}");
        resp["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until `expr` returns at least `n` series.
    async fn wait_for(&self, http: &reqwest::Client, expr: &str, n: usize, limit: Duration) {
        let start = Instant::now();
        loop {
            if let Ok(resp) = http
                .get(format!("{}/api/v1/query", self.url))
                .query(&[("query", expr)])
                .send()
                .await
                && let Ok(v) = resp.json::<Value>().await
                && v["data"]["result"].as_array().is_some_and(|r| r.len() >= n)
            {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "`{expr}` did not reach {n} series within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn model() -> PathBuf {
    common::fixtures_dir().join("qwen3_moe")
}

/// Completions over HTTP (streamed and not), one refused request, one batch job over gRPC.
async fn drive_load(server: &Server, http: &reqwest::Client) {
    let url = format!("{}/v1/completions", server.http);
    for i in 0..6u32 {
        let body = json!({"prompt": [1 + i, 2, 3], "max_tokens": 6, "stream": i % 2 == 0,
                          "ignore_eos": true});
        let resp = http.post(&url).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
    }
    let bad = http
        .post(&url)
        .json(&json!({"prompt": "x", "temperature": -1}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let mut grpc = TesseraClient::connect(server.grpc.clone()).await.unwrap();
    let request = |ids: Vec<u32>| pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids })),
        max_tokens: Some(4),
        ..Default::default()
    };
    let job = grpc
        .submit_job(pb::SubmitJobRequest {
            requests: (0..3)
                .map(|i| pb::JobRequest {
                    custom_id: format!("r{i}"),
                    request: Some(request(vec![4, 5, 6 + i])),
                })
                .collect(),
            label: "metrics".into(),
        })
        .await
        .unwrap()
        .into_inner();
    common::server::wait_for_job(&mut grpc, &job.id, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_coordinator_and_workers_and_every_dashboard_query_has_data() {
    let server = Server::start(&model(), &["--tp", "2"]);
    let http = reqwest::Client::new();
    let targets = common::server::metrics_targets(&server, &http).await;
    assert_eq!(
        targets.as_array().map(Vec::len),
        Some(3),
        "the coordinator and two workers: {targets}"
    );
    let prom = Prometheus::start(&format!("{}/v1/metrics/targets", server.http));
    let limit = Duration::from_secs(30);
    prom.wait_for(&http, "up == 1", 3, limit).await;

    drive_load(&server, &http).await;
    // Rates need two scrapes after the load; the job's series, one scrape after it finished.
    tokio::time::sleep(Duration::from_secs(3)).await;
    prom.wait_for(&http, "tessera_jobs{status=\"completed\"} == 1", 1, limit)
        .await;

    let (exprs, vars) = dashboard_queries(&dashboard());
    let mut empty = Vec::new();
    for expr in exprs.iter().chain(&vars) {
        let concrete = expr
            .replace("$__rate_interval", "1m")
            .replace("$model", ".+")
            .replace("$instance", ".+");
        if prom.query(&http, &concrete).await.is_empty() {
            empty.push(concrete);
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries with no data: {empty:#?}"
    );

    // Values, not just presence: the counters saw this load.
    let value = |r: &[Value]| -> f64 { r[0]["value"][1].as_str().unwrap().parse().unwrap() };
    let q = |e: &str| format!("sum({e})");
    let generated = value(&prom.query(&http, &q(m::GENERATION_TOKENS)).await);
    assert!(generated >= 6.0 * 6.0 + 3.0 * 4.0, "{generated}");
    let invalid = format!("{}{{kind=\"invalid_request\"}}", m::REQUEST_ERRORS);
    assert_eq!(value(&prom.query(&http, &invalid).await), 1.0);
    let workers = format!("count(count by (instance) ({}))", m::WORKER_STEPS);
    assert_eq!(value(&prom.query(&http, &workers).await), 2.0);
    let up = q(m::WORKERS_UP);
    assert_eq!(value(&prom.query(&http, &up).await), 2.0);

    // Every token of every step went to top-k experts in each MoE layer.
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(model().join("config.json")).unwrap())
            .unwrap();
    let top_k = config["num_experts_per_tok"].as_f64().unwrap();
    let tokens = value(
        &prom
            .query(&http, &q(&format!("{}_sum", m::STEP_TOKENS)))
            .await,
    );
    let per_layer = prom
        .query(&http, &format!("sum by (layer) ({})", m::EXPERT_TOKENS))
        .await;
    assert!(!per_layer.is_empty());
    for layer in &per_layer {
        let routed: f64 = layer["value"][1].as_str().unwrap().parse().unwrap();
        assert_eq!(routed, tokens * top_k, "{layer}");
    }
}
