//! TLS through real processes, with certificates made at test time (rcgen): a cluster CA, node
//! certificates it signs (for 127.0.0.1 and localhost, or for one cluster-wide DNS name; server
//! and client use), and an unrelated CA with a "rogue" certificate of its own.
//!
//! - `tessera serve --tls-cert --tls-key`: HTTPS and gRPC over TLS work for a client trusting the
//!   CA; a plain-text client, or one trusting another CA, gets nothing.
//! - Cluster mTLS: `serve --tp 2` passes the settings to its workers and generates what the plain
//!   group does; a worker with a certificate from another CA cannot register with a coordinator,
//!   while workers with the CA's certificates (issued to a name, `--cluster-server-name`) can;
//!   a worker refuses clients without a cluster certificate, and the coordinator refuses a worker
//!   whose certificate it cannot verify, naming the TLS failure.
//! - Bad files (missing, not PEM, no key, a key of another certificate, half the flags): a
//!   non-zero exit naming the file, before `TESSERA_SERVE_READY` / `TESSERA_WORKER_READY`.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tempfile::TempDir;
use tessera_proto::v1 as pb;
use tessera_proto::worker::v1 as wpb;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use common::server::Server;

fn model() -> PathBuf {
    common::fixtures_dir().join("qwen3_moe")
}

/// Certificates and keys in a temp folder: `ca.pem`; `NAME.pem` / `NAME.key` for each node the
/// cluster CA signed; `other-ca.pem`, `rogue.pem` / `rogue.key` from an unrelated CA.
struct Pki {
    dir: TempDir,
}

fn ca(name: &str) -> (CertificateParams, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (params, KeyPair::generate().unwrap())
}

impl Pki {
    fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
        };
        let (params, key) = ca("Tessera test cluster CA");
        pki.write("ca.pem", &params.self_signed(&key).unwrap().pem());
        let issuer = Issuer::new(params, key);
        for node in ["server", "coordinator", "worker"] {
            pki.leaf(node, &["127.0.0.1", "localhost"], &issuer);
        }
        // Issued to one cluster-wide name, for --cluster-server-name.
        for node in ["named-coordinator", "named-worker"] {
            pki.leaf(node, &["tessera-cluster"], &issuer);
        }
        let (params, key) = ca("Some other CA");
        pki.write("other-ca.pem", &params.self_signed(&key).unwrap().pem());
        pki.leaf(
            "rogue",
            &["127.0.0.1", "localhost"],
            &Issuer::new(params, key),
        );
        pki
    }

    /// A certificate for `names` (IP addresses or DNS names), good as server and as client.
    fn leaf(&self, name: &str, names: &[&str], issuer: &Issuer<'_, KeyPair>) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("valid names");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, issuer).unwrap();
        self.write(&format!("{name}.pem"), &cert.pem());
        self.write(&format!("{name}.key"), &key.serialize_pem());
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.path(name), text).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }

    /// `--cluster-ca ca.pem --cluster-cert NODE.pem --cluster-key NODE.key`.
    fn cluster_flags(&self, node: &str) -> Vec<String> {
        vec![
            "--cluster-ca".into(),
            self.arg("ca.pem"),
            "--cluster-cert".into(),
            self.arg(&format!("{node}.pem")),
            "--cluster-key".into(),
            self.arg(&format!("{node}.key")),
        ]
    }

    /// tonic client settings trusting `ca`, presenting `identity` (a node name) if any.
    fn grpc_tls(&self, ca: &str, identity: Option<&str>) -> ClientTlsConfig {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.read(ca)));
        if let Some(node) = identity {
            let (cert, key) = (
                self.read(&format!("{node}.pem")),
                self.read(&format!("{node}.key")),
            );
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        tls
    }
}

/// `http://ADDR` as `https://ADDR`.
fn https(url: &str) -> String {
    url.replacen("http://", "https://", 1)
}

/// One HTTP/1.1 request over TLS, trusting only `ca`: (status, body), or why it failed.
async fn https_request(
    ca: &Path,
    url: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, String), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let addr = url.trim_start_matches("https://");
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let io = hyper_util::rt::TokioIo::new(tls);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr)
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(bytes)))
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((
        status,
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    ))
}

/// Greedy ids over `channel`'s gRPC API, or the status that stopped it.
async fn greedy(channel: Channel, prompt: &[u32], n: u32) -> Result<Vec<u32>, tonic::Status> {
    let mut client = pb::tessera_client::TesseraClient::new(channel);
    let mut stream = client
        .generate(common::greedy_grpc_request(prompt, n))
        .await?
        .into_inner();
    let mut ids = Vec::new();
    while let Some(msg) = stream.message().await? {
        ids.extend(msg.token_ids);
    }
    Ok(ids)
}

fn serve_with_tls(pki: &Pki, extra: &[&str]) -> Server {
    let (cert, key) = (pki.arg("server.pem"), pki.arg("server.key"));
    let env = [
        ("TESSERA_TLS_CERT", cert.as_str()),
        ("TESSERA_TLS_KEY", key.as_str()),
    ];
    Server::start_with_env(&model(), extra, &env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_completions_work_for_clients_trusting_the_ca_and_plain_http_gets_nothing() {
    let pki = Pki::new();
    let server = serve_with_tls(&pki, &[]);
    let url = https(&server.http);
    let body = json!({"prompt": "The cat sat", "max_tokens": 4, "temperature": 0});
    let (status, text) = https_request(
        &pki.path("ca.pem"),
        &url,
        "POST",
        "/v1/completions",
        Some(body),
    )
    .await
    .expect("HTTPS with the CA trusted");
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 4, "{answer}");
    let (status, _) = https_request(&pki.path("ca.pem"), &url, "GET", "/health", None)
        .await
        .unwrap();
    assert_eq!(status, 200);

    // A client trusting another CA refuses the server's certificate.
    let err = https_request(&pki.path("other-ca.pem"), &url, "GET", "/health", None)
        .await
        .unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
    // Plain HTTP to the TLS port: the server drops the connection, nothing is served.
    let plain = reqwest::Client::new()
        .get(format!("{}/health", server.http))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
    // The server is still fine after both.
    let (status, _) = https_request(&pki.path("ca.pem"), &url, "GET", "/health", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_serves_transformers_tokens_and_refuses_plain_text() {
    let pki = Pki::new();
    let server = serve_with_tls(&pki, &[]);
    let case = &common::reference(&model()).cases[0];
    let n = case.greedy_ids.len() as u32;
    let channel = Endpoint::from_shared(https(&server.grpc))
        .unwrap()
        .tls_config(pki.grpc_tls("ca.pem", None))
        .unwrap()
        .connect()
        .await
        .expect("gRPC over TLS connects");
    let ids = greedy(channel, &case.prompt_ids, n).await.unwrap();
    assert_eq!(ids, case.greedy_ids, "gRPC over TLS vs transformers");

    // Plain HTTP/2 to the TLS port fails (at connect or at the first call).
    let plain = async {
        let channel = Endpoint::from_shared(server.grpc.clone())
            .unwrap()
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        greedy(channel, &case.prompt_ids, n).await
    };
    let plain = tokio::time::timeout(Duration::from_secs(10), plain)
        .await
        .expect("a plain client fails promptly");
    assert!(plain.is_err(), "plain gRPC was served: {plain:?}");
    // A client trusting another CA refuses the server.
    let other = Endpoint::from_shared(https(&server.grpc))
        .unwrap()
        .tls_config(pki.grpc_tls("other-ca.pem", None))
        .unwrap()
        .connect()
        .await;
    let err = other.expect_err("another CA's client accepted the server");
    assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");
}

/// The completion text of `prompt`, greedy, over plain HTTP.
async fn completion_text(server: &Server, prompt: &str) -> String {
    let body = json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let url = format!("{}/v1/completions", server.http);
    let answer = common::server::post_json(&reqwest::Client::new(), url, &body).await;
    answer["choices"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no text in {answer}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_tp_2_with_cluster_mtls_generates_what_the_plain_group_does() {
    let pki = Pki::new();
    let flags = pki.cluster_flags("coordinator");
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend(["--tp", "2"]);
    let secured = Server::start(&model(), &args);
    // The spawned workers got the cluster settings (and so serve only mTLS).
    let workers = secured.worker_pids();
    assert_eq!(workers.len(), 2, "{workers:?}");
    for pid in workers {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            cmdline.contains(&format!("--cluster-ca {}", pki.arg("ca.pem")))
                && cmdline.contains("--cluster-cert")
                && cmdline.contains("--cluster-key"),
            "worker {pid}: {cmdline}"
        );
    }
    let case = &common::reference(&model()).cases[0];
    let n = case.greedy_ids.len();
    let ids = common::server::greedy_ids(&secured.grpc, &case.prompt_ids, n).await;
    assert_eq!(ids, case.greedy_ids, "mTLS group vs transformers");

    let plain = Server::start(&model(), &["--tp", "2"]);
    for prompt in ["The cat sat on the mat", "Hello"] {
        assert_eq!(
            completion_text(&secured, prompt).await,
            completion_text(&plain, prompt).await,
            "{prompt:?}"
        );
    }
}

/// A loopback address nobody listens on now.
fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// A child process, killed when dropped, whose stderr is collected in the background.
struct Proc {
    child: Child,
    stderr: std::sync::mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(args: &[String]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tessera starts");
        let mut err = child.stderr.take().expect("piped");
        let (tx, stderr) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            let _ = tx.send(text);
        });
        Proc { child, stderr }
    }

    /// The first stdout line.
    fn ready_line(&mut self) -> String {
        let mut line = String::new();
        let stdout = self.child.stdout.as_mut().expect("piped");
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    }

    /// Waits for the exit (failing after `limit`); returns success and stderr.
    fn exit_within(mut self, limit: Duration) -> (bool, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(start.elapsed() < limit, "still running after {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        };
        (status.success(), self.stderr.recv().unwrap_or_default())
    }

    /// Kills the process and returns its stderr. (By reference: a closure that took the `Proc`
    /// would kill it when dropped.)
    fn kill(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr.recv().unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// `tessera coordinator --listen REGISTRY --tp 1` with `node`'s cluster certificate.
fn coordinator(pki: &Pki, node: &str, registry: &str, wait_secs: &str, extra: &[&str]) -> Proc {
    let mut args = strings(&[
        "coordinator",
        "--port",
        "0",
        "--grpc-port",
        "0",
        "--tp",
        "1",
    ]);
    args.extend(strings(&[
        "--listen",
        registry,
        "--wait-for-workers-secs",
        wait_secs,
    ]));
    args.extend(strings(&["--model", &model().to_string_lossy()]));
    args.extend(pki.cluster_flags(node));
    args.extend(strings(extra));
    Proc::spawn(&args)
}

/// `tessera worker` with `node`'s certificate (trusting the cluster CA), registering with
/// `coordinator` if given.
fn worker(pki: &Pki, node: &str, coordinator: Option<&str>, extra: &[&str]) -> Proc {
    let mut args = strings(&["worker", "--listen", "127.0.0.1:0"]);
    if let Some(addr) = coordinator {
        args.extend(strings(&["--coordinator", addr]));
    }
    args.extend(pki.cluster_flags(node));
    args.extend(strings(extra));
    Proc::spawn(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_needs_a_certificate_from_the_cluster_ca() {
    let pki = Pki::new();
    // A worker whose certificate another CA signed never joins: the coordinator gives up.
    let registry = free_addr();
    let coord = coordinator(&pki, "coordinator", &registry, "3", &[]);
    let mut rogue = worker(&pki, "rogue", Some(&registry), &[]);
    let (ok, coord_err) = coord.exit_within(Duration::from_secs(15));
    assert!(!ok, "the coordinator formed a group with a rogue worker");
    assert!(
        coord_err.contains("registered: none"),
        "the rogue worker registered: {coord_err}"
    );
    assert!(
        coord_err.contains("TLS handshake") && coord_err.contains("UnknownIssuer"),
        "the coordinator does not say why it refused the worker: {coord_err}"
    );
    let rogue_err = rogue.kill();
    assert!(
        rogue_err.contains("does not verify against the cluster CA"),
        "the rogue worker was not warned about its certificate: {rogue_err}"
    );

    // Certificates the cluster CA signed, issued to a name rather than the addresses dialled:
    // with --cluster-server-name the worker registers, the coordinator reaches it, and it serves.
    let registry = free_addr();
    let named = ["--cluster-server-name", "tessera-cluster"];
    let mut coord = coordinator(&pki, "named-coordinator", &registry, "20", &named);
    let _good = worker(&pki, "named-worker", Some(&registry), &named);
    let ready = coord.ready_line();
    let grpc = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .unwrap_or_else(|| panic!("no group formed: {ready:?} {}", coord.kill()));
    let case = &common::reference(&model()).cases[0];
    let n = case.greedy_ids.len() as u32;
    let served = async {
        let channel = Endpoint::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
        greedy(channel, &case.prompt_ids, n).await
    };
    match served.await {
        Ok(ids) => assert_eq!(
            ids, case.greedy_ids,
            "a registered mTLS worker vs transformers"
        ),
        Err(e) => panic!("{e:?}; the coordinator said: {}", coord.kill()),
    }
}

/// `Health` of the worker at `grpc` (`ip:port`) with `tls` (plain when `None`).
async fn worker_health(grpc: &str, tls: Option<ClientTlsConfig>) -> Result<bool, String> {
    let call = async {
        let endpoint = match tls {
            Some(tls) => Endpoint::from_shared(format!("https://{grpc}"))
                .unwrap()
                .tls_config(tls)
                .unwrap(),
            None => Endpoint::from_shared(format!("http://{grpc}")).unwrap(),
        };
        let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
        let mut client = wpb::worker_client::WorkerClient::new(channel);
        let reply = client
            .health(wpb::HealthRequest {})
            .await
            .map_err(|s| format!("{s:?}"))?;
        Ok(reply.into_inner().ready)
    };
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .unwrap_or_else(|_| Err("no answer within 10 s".into()))
}

fn announced_grpc(line: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .unwrap_or_else(|| panic!("unexpected announcement {line:?}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_coordinators_refuse_peers_without_a_cluster_certificate() {
    let pki = Pki::new();
    let mut good = worker(&pki, "worker", None, &[]);
    let grpc = announced_grpc(&good.ready_line());

    let with = |identity| Some(pki.grpc_tls("ca.pem", identity));
    assert_eq!(
        worker_health(&grpc, with(Some("coordinator"))).await,
        Ok(false)
    );
    // Under TLS 1.3 the client learns of the refusal only after its handshake, as an alert or
    // as a broken pipe, whichever comes first; the worker's log says why (below).
    let no_cert = worker_health(&grpc, with(None)).await;
    assert!(
        no_cert.is_err(),
        "a client without a certificate was served"
    );
    let rogue = worker_health(&grpc, with(Some("rogue"))).await;
    assert!(
        rogue.is_err(),
        "a client with another CA's certificate was served"
    );
    assert!(
        worker_health(&grpc, None).await.is_err(),
        "plain text served"
    );
    // Still serving its cluster after all that.
    assert_eq!(
        worker_health(&grpc, with(Some("coordinator"))).await,
        Ok(false)
    );
    let stderr = good.kill();
    for why in [
        "peer sent no certificates",
        "invalid peer certificate: UnknownIssuer",
    ] {
        assert!(
            stderr.contains("TLS handshake with 127.0.0.1:") && stderr.contains(why),
            "the worker does not log a refused client ({why}): {stderr}"
        );
    }

    // The coordinator's side: a worker serving a certificate from another CA is not a member.
    let mut rogue = worker(&pki, "rogue", None, &[]);
    let grpc = announced_grpc(&rogue.ready_line());
    let tls = tessera_coordinator::tls::ClusterTlsConfig {
        ca: Some(pki.path("ca.pem")),
        cert: Some(pki.path("coordinator.pem")),
        key: Some(pki.path("coordinator.key")),
        server_name: None,
    }
    .load()
    .unwrap();
    let opts = tessera_coordinator::cluster::LaunchOptions {
        exe: env!("CARGO_BIN_EXE_tessera").into(),
        model_dir: model(),
        world_size: 1,
        cache: tessera_worker::engine::EngineConfig {
            block_size: 16,
            num_blocks: 8,
        },
        kv_cache_bytes: None,
        placement: None,
        step_timeout: Duration::from_secs(10),
        cluster_tls: tls,
        device: Default::default(),
        limits: Default::default(),
    };
    let endpoint = tessera_coordinator::cluster::WorkerEndpoint {
        grpc,
        collective: "127.0.0.1:1".into(),
    };
    let err = tokio::task::spawn_blocking(move || {
        tessera_coordinator::cluster::Cluster::connect(&[endpoint], &opts).err()
    })
    .await
    .unwrap()
    .expect("connected to a worker the cluster CA did not certify")
    .to_string();
    assert!(
        err.contains("invalid peer certificate") && err.contains("UnknownIssuer"),
        "{err}"
    );
    rogue.kill();
}

/// Runs `tessera ARGS` to its end: (success, stdout, stderr).
fn run(args: &[String]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn bad_certificate_files_stop_the_process_before_it_is_ready_naming_the_file() {
    let pki = Pki::new();
    pki.write("garbage.pem", "this is not a certificate\n");
    let missing = pki.arg("missing.pem");
    let serve = |flags: &[String]| {
        let mut args = strings(&["serve", "--port", "0", "--grpc-port", "0", "--model"]);
        args.push(model().to_string_lossy().into_owned());
        args.extend(flags.iter().cloned());
        args
    };
    let tls = |cert: &str, key: &str| strings(&["--tls-cert", cert, "--tls-key", key]);
    let (cert, key) = (pki.arg("server.pem"), pki.arg("server.key"));
    let cases: Vec<(Vec<String>, Vec<String>)> = vec![
        (
            serve(&tls(&missing, &key)),
            strings(&[
                "cannot read the TLS certificate (--tls-cert)",
                &missing,
                "No such file",
            ]),
        ),
        (
            serve(&tls(&pki.arg("garbage.pem"), &key)),
            strings(&[&pki.arg("garbage.pem"), "is not PEM"]),
        ),
        (
            serve(&tls(&key, &key)),
            strings(&[
                "no certificate found in the TLS certificate (--tls-cert)",
                &key,
            ]),
        ),
        (
            serve(&tls(&cert, &cert)),
            strings(&["no private key found in the TLS key (--tls-key)", &cert]),
        ),
        (
            serve(&tls(&cert, &pki.arg("rogue.key"))),
            strings(&[&format!(
                "the private key in {} does not match the certificate in {cert}",
                pki.arg("rogue.key")
            )]),
        ),
        (
            serve(&strings(&["--tls-cert", &cert])),
            strings(&["--tls-cert and --tls-key go together; missing: --tls-key"]),
        ),
        (
            serve(&strings(&["--cluster-ca", &pki.arg("ca.pem"), "--tp", "2"])),
            strings(&["go together; missing: --cluster-cert and --cluster-key"]),
        ),
        (
            serve(&{
                let mut f = pki.cluster_flags("coordinator");
                f[1] = pki.arg("garbage.pem");
                f
            }),
            strings(&[
                "cluster CA (--cluster-ca)",
                &pki.arg("garbage.pem"),
                "is not PEM",
            ]),
        ),
        (
            serve(&{
                let mut f = pki.cluster_flags("coordinator");
                f.extend(strings(&["--cluster-server-name", "not a name!"]));
                f
            }),
            strings(&["--cluster-server-name \"not a name!\" is not a DNS name"]),
        ),
        (
            {
                let mut args = strings(&["worker", "--listen", "127.0.0.1:0"]);
                let mut f = pki.cluster_flags("worker");
                f[5] = pki.arg("coordinator.key");
                args.extend(f);
                args
            },
            strings(&["does not match the certificate", &pki.arg("worker.pem")]),
        ),
    ];
    for (args, needles) in cases {
        let started = Instant::now();
        let (ok, stdout, stderr) = run(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(
            !stdout.contains("READY"),
            "{args:?} announced itself: {stdout}"
        );
        for needle in &needles {
            assert!(
                stderr.contains(needle.as_str()),
                "{args:?}: {stderr:?} lacks {needle:?}"
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{args:?} took {:?}",
            started.elapsed()
        );
    }
}
