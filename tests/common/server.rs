//! A real `tessera serve` process for integration tests: started on free ports, killed (with its
//! worker processes) when dropped.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub http: String,
    /// `http://127.0.0.1:PORT` (for tonic clients)
    pub grpc: String,
}

impl Server {
    /// Starts `tessera serve --model DIR --port 0 --grpc-port 0 EXTRA...` and waits until it
    /// announces its addresses.
    pub fn start(model: &std::path::Path, extra: &[&str]) -> Server {
        Self::start_command("serve", model, extra)
    }

    /// Like [`Server::start`], with extra environment variables.
    pub fn start_with_env(model: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        Self::spawn("serve", model, extra, env)
    }

    /// Like [`Server::start`] for another serving subcommand (e.g. `coordinator`).
    pub fn start_command(command: &str, model: &std::path::Path, extra: &[&str]) -> Server {
        Self::spawn(command, model, extra, &[])
    }

    fn spawn(
        command: &str,
        model: &std::path::Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .envs(env.iter().copied())
            .arg(command)
            .arg("--model")
            .arg(model)
            .args(["--port", "0", "--grpc-port", "0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("tessera serve starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reading the ready line");
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .map(|a| format!("http://{a}"))
                .unwrap_or_else(|| panic!("unexpected ready line {line:?}"))
        };
        Server {
            http: field("http="),
            grpc: field("grpc="),
            child,
        }
    }

    /// Process ids of the worker processes this server started.
    pub fn worker_pids(&self) -> Vec<u32> {
        let out = Command::new("pgrep")
            .args(["-P", &self.child.id().to_string()])
            .output()
            .expect("pgrep runs");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// `GET /health` as (status code, body).
    pub async fn health(&self, client: &reqwest::Client) -> (u16, serde_json::Value) {
        let r = client
            .get(format!("{}/health", self.http))
            .send()
            .await
            .expect("health answers");
        let code = r.status().as_u16();
        (code, r.json().await.unwrap_or_default())
    }

    /// Waits until `/health` satisfies `pred`, failing after `limit`.
    pub async fn wait_health(
        &self,
        client: &reqwest::Client,
        limit: Duration,
        pred: impl Fn(u16, &serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let (code, body) = self.health(client).await;
            if pred(code, &body) {
                return body;
            }
            assert!(
                start.elapsed() < limit,
                "health never reached the expected state: {code} {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `GET /v1/metrics/targets`: the coordinator's and workers' scrape targets (Prometheus HTTP SD).
pub async fn metrics_targets(server: &Server, client: &reqwest::Client) -> serde_json::Value {
    client
        .get(format!("{}/v1/metrics/targets", server.http))
        .send()
        .await
        .expect("the server answers")
        .json()
        .await
        .expect("a JSON answer")
}

/// POSTs `body` as JSON and returns the JSON answer (whatever the status).
pub async fn post_json(
    client: &reqwest::Client,
    url: impl reqwest::IntoUrl,
    body: &serde_json::Value,
) -> serde_json::Value {
    let resp = client
        .post(url)
        .json(body)
        .send()
        .await
        .expect("the server answers");
    resp.json().await.expect("a JSON answer")
}

/// Reads what is left of a streaming response, failing if it does not end within `limit`.
pub async fn drain_within(
    chunks: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    limit: Duration,
) -> String {
    use futures_util::StreamExt;
    let mut rest = String::new();
    let ended = tokio::time::timeout(limit, async {
        while let Some(c) = chunks.next().await {
            match c {
                Ok(c) => rest.push_str(&String::from_utf8_lossy(&c)),
                Err(_) => break,
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the stream did not end within {limit:?}: {rest}"
    );
    rest
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Greedy token ids for `prompt` (`n` tokens, eos ignored) over the server's gRPC API.
pub async fn greedy_ids(grpc: &str, prompt: &[u32], n: usize) -> Vec<u32> {
    use tessera_proto::v1 as pb;
    let mut client = pb::tessera_client::TesseraClient::connect(grpc.to_string())
        .await
        .expect("the gRPC API answers");
    let req = super::greedy_grpc_request(prompt, n as u32);
    let mut stream = client.generate(req).await.expect("generate").into_inner();
    let mut ids = Vec::new();
    while let Some(msg) = stream.message().await.expect("a whole stream") {
        ids.extend(msg.token_ids);
    }
    ids
}

/// Polls the batch job `id` until it completes and returns it; fails the test if it leaves the
/// queued/running states any other way or takes longer than `limit`.
pub async fn wait_for_job(
    grpc: &mut tessera_proto::v1::tessera_client::TesseraClient<tonic::transport::Channel>,
    id: &str,
    limit: Duration,
) -> tessera_proto::v1::Job {
    use tessera_proto::v1 as pb;
    let start = Instant::now();
    loop {
        let j = grpc
            .get_job(pb::GetJobRequest { id: id.to_string() })
            .await
            .expect("GetJob")
            .into_inner();
        if j.status == pb::JobStatus::Completed as i32 {
            return j;
        }
        assert!(
            [pb::JobStatus::Queued as i32, pb::JobStatus::Running as i32].contains(&j.status),
            "{j:?}"
        );
        assert!(
            start.elapsed() < limit,
            "job not done after {limit:?}: {j:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
