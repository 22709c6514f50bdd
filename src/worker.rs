//! `tessera worker`: serves `tessera.worker.v1.Worker` on `--listen` and announces its addresses on
//! stdout (`TESSERA_WORKER_READY grpc=ADDR collective=ADDR`) for the launcher that started it.
//! With `--coordinator ADDR` it registers with that coordinator (and keeps registering again if
//! the coordinator restarts); with `--etcd` it registers in etcd. Either way SIGTERM deregisters
//! it at once.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use tessera_coordinator::registry::client::Registration;
use tessera_coordinator::tls::incoming::{self, FailureLog};
use tessera_proto::worker::v1::worker_server::WorkerServer;
use tessera_worker::metrics::WorkerMetrics;
use tessera_worker::service::{WorkerService, WorkerServiceConfig};
use tonic::transport::server::TcpIncoming;

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// Address for the worker's gRPC service; port 0 picks a free port (announced on stdout). The
    /// collective endpoint binds the same interface on a free port.
    #[arg(long, env = "TESSERA_WORKER_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Exit when stdin closes: set by a launcher that pipes stdin, so the worker never outlives it.
    #[arg(long)]
    exit_with_stdin: bool,
    /// This worker's id in the cluster (unique; a restarted worker may reuse its id); ranks
    /// follow id order. Default: <hostname>-<grpc port>.
    #[arg(long, env = "TESSERA_WORKER_ID")]
    worker_id: Option<String>,
    /// Serve Prometheus metrics (`GET /metrics`: step time, collective time, KV capacity) on this
    /// address; port 0 picks a free port. The address is reported to the coordinator, which
    /// lists it at `/v1/metrics/targets` for Prometheus' HTTP service discovery. Off when unset.
    #[arg(long, env = "TESSERA_WORKER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Register with the coordinator serving its registry at this address (host:port, as given
    /// to `tessera coordinator --listen`): static membership without etcd. The worker registers
    /// again, with backoff, whenever the coordinator restarts or the connection drops.
    #[arg(long, env = "TESSERA_COORDINATOR", conflicts_with = "etcd")]
    coordinator: Option<String>,
    /// IP address the coordinator and the other workers dial to reach this worker (with the ports
    /// it bound), registered in etcd or with the coordinator. Default: the --listen IP. Needed
    /// with --etcd when --listen is a wildcard (0.0.0.0 or [::]), which nobody else can dial
    /// (with --coordinator, the registry substitutes the address the worker calls from).
    #[arg(long, env = "TESSERA_WORKER_ADVERTISE_IP")]
    advertise_ip: Option<std::net::IpAddr>,
    #[command(flatten)]
    etcd: crate::membership::EtcdArgs,
    /// Mutual TLS with the coordinator: the gRPC service accepts only clients presenting a
    /// certificate from the cluster CA, and registration with --coordinator presents this
    /// worker's certificate. The collective links between workers stay plain TCP.
    #[command(flatten)]
    cluster_tls: crate::tls::ClusterTlsArgs,
    #[command(flatten)]
    device: crate::device::DeviceArgs,
    /// This worker's index among the workers on its host: with `--device cuda` (no ordinal) it
    /// picks GPU `local-rank mod GPUs`. `serve --tp N` sets it for the workers it starts.
    #[arg(long, default_value_t = 0, env = "TESSERA_LOCAL_RANK")]
    local_rank: usize,
}

fn default_worker_id(port: u16) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{port}")
}

pub fn run(args: WorkerArgs) -> Result<()> {
    // Before anything binds or announces itself: a bad file stops the worker here.
    let tls = args.cluster_tls.config().load()?;
    let etcd = args.etcd.config()?;
    if args.advertise_ip.is_none() && args.listen.ip().is_unspecified() && etcd.is_some() {
        anyhow::bail!(
            "--listen {} is a wildcard address that other machines can't dial: give --advertise-ip \
             (e.g. the pod or host IP) so etcd records a reachable address",
            args.listen
        );
    }
    // Open the device once before announcing anything, so a GPU that cannot be used stops the
    // worker here with the reason; each LoadShard opens it again (a rebuilt group starts clean).
    let device = args.device.config(args.local_rank);
    let identity = tessera_worker::device::Device::open(&device)?.identity();
    tracing::info!(device = %identity.name, uuid = ?identity.uuid, "worker device");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let grpc = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding the worker's gRPC address {}", args.listen))?;
        let collective = std::net::TcpListener::bind((args.listen.ip(), 0))
            .context("binding the collective endpoint")?;
        let (grpc_addr, collective_addr) = (grpc.local_addr()?, collective.local_addr()?);
        let shutdown = Arc::new(tokio::sync::Notify::new());
        if args.exit_with_stdin {
            let notify = Arc::clone(&shutdown);
            std::thread::spawn(move || {
                let mut sink = [0u8; 64];
                while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
                notify.notify_one();
            });
        }
        let mut stdout = std::io::stdout();
        writeln!(
            stdout,
            "TESSERA_WORKER_READY grpc={grpc_addr} collective={collective_addr}"
        )?;
        stdout.flush()?;
        tracing::info!(%grpc_addr, %collective_addr, mtls = tls.is_some(), "worker ready");
        let id = args
            .worker_id
            .clone()
            .unwrap_or_else(|| default_worker_id(grpc_addr.port()));
        // What others dial: the bound ports on the advertised (or bound) IP.
        let advertise = |bound: SocketAddr| {
            SocketAddr::new(args.advertise_ip.unwrap_or(bound.ip()), bound.port()).to_string()
        };
        let with_coordinator = match &args.coordinator {
            Some(addr) => {
                let me = tessera_proto::worker::v1::RegisterRequest {
                    worker_id: id.clone(),
                    grpc_address: advertise(grpc_addr),
                    collective_address: advertise(collective_addr),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                };
                tracing::info!(coordinator = %addr, %id, "registering with the coordinator");
                Some(Registration::start(addr, me, tls.as_ref())?)
            }
            None => None,
        };
        let registration = match etcd {
            Some(cfg) => {
                let record = tessera_membership::WorkerRecord {
                    id: id.clone(),
                    grpc_addr: advertise(grpc_addr),
                    collective_addr: advertise(collective_addr),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                };
                let reg = tessera_membership::register(&cfg, record)
                    .await
                    .context("registering in etcd")?;
                tracing::info!(
                    key = reg.key(),
                    lease = reg.lease_id(),
                    "registered in etcd"
                );
                Some(reg)
            }
            None => None,
        };
        let metrics = Arc::new(WorkerMetrics::new().context("registering the worker metrics")?);
        let metrics_address = match args.metrics_listen {
            Some(addr) => Some(serve_metrics(addr, Arc::clone(&metrics)).await?.to_string()),
            None => None,
        };
        let service = WorkerService::new(WorkerServiceConfig {
            collective_listener: collective,
            shutdown: Arc::clone(&shutdown),
            metrics,
            metrics_address,
            device,
            identity,
        });
        let stop = async move {
            tokio::select! {
                _ = shutdown.notified() => {}
                _ = tokio::signal::ctrl_c() => {}
                _ = terminated() => {}
            }
        };
        // grpc.health.v1 for probes and tools: SERVING while the process serves (whether a shard
        // is loaded is the coordinator's business, through the Worker service's own Health).
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_serving::<WorkerServer<WorkerService>>().await;
        let server = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(WorkerServer::new(service));
        match &tls {
            None => {
                server
                    .serve_with_incoming_shutdown(TcpIncoming::from(grpc), stop)
                    .await
            }
            Some(tls) => {
                let incoming =
                    incoming::accept(grpc, tls.acceptor(), "worker's gRPC", FailureLog::Warn);
                server
                    .serve_with_incoming_shutdown(incoming.into_stream(), stop)
                    .await
            }
        }
        .context("serving the worker")?;
        if let Some(reg) = with_coordinator {
            match reg.deregister().await {
                Ok(_) => tracing::info!("deregistered from the coordinator"),
                Err(e) => tracing::warn!(error = %e, "deregistering from the coordinator failed"),
            }
        }
        if let Some(reg) = registration {
            // Leave at once rather than after the lease expires.
            match reg.deregister().await {
                Ok(()) => tracing::info!("deregistered from etcd"),
                Err(e) => tracing::warn!(error = %e, "deregistering failed; the lease will expire"),
            }
        }
        Ok(())
    })
}

/// Serves `GET /metrics` on `addr` in the background; returns the bound address.
async fn serve_metrics(addr: SocketAddr, metrics: Arc<WorkerMetrics>) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = Arc::clone(&metrics);
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics server stopped");
        }
    });
    tracing::info!(%bound, "serving metrics");
    Ok(bound)
}

/// Resolves on SIGTERM (never elsewhere).
async fn terminated() {
    #[cfg(unix)]
    if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        s.recv().await;
        return;
    }
    std::future::pending::<()>().await
}
