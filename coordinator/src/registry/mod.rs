//! Static membership without etcd: the coordinator serves `tessera.worker.v1.Registry` on
//! `--listen`, workers started with `--coordinator ADDR` register with it ([`client`]), and the
//! coordinator forms its group from the registered workers, ordered by id like etcd members.
//!
//! A registration lives as long as its `Register` stream: the coordinator holds the stream open
//! and forgets the worker when it closes, which happens when the worker process dies (its socket
//! closes) or the connection breaks (HTTP/2 keep-alive pings notice a silent peer). `Deregister`
//! removes a worker at once on graceful shutdown. Each registration has a session number, so the
//! stream of a replaced registration (same id, re-registered) cannot remove its successor.

pub mod client;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_proto::worker::v1 as pb;
use tessera_proto::worker::v1::registry_server::{Registry as RegistryRpc, RegistryServer};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::cluster::WorkerEndpoint;
use crate::tls::{ClusterTls, incoming};

/// How often both ends ping an idle registration connection, and how long a ping may go
/// unanswered before the connection (and with it the registration) is dropped.
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("cannot start the registry's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("binding the registry on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{wanted} workers did not register within {waited:?}; registered: {present}")]
    NotEnoughWorkers {
        wanted: usize,
        waited: Duration,
        present: String,
    },
    #[error("coordinator address {0:?} is not host:port or http://host:port")]
    BadAddress(String),
    #[error("registering with the coordinator at {addr}: {detail}")]
    Unreachable { addr: String, detail: String },
}

/// A registered worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    pub endpoint: WorkerEndpoint,
}

struct Entry {
    session: u64,
    endpoint: WorkerEndpoint,
}

/// The registered workers, shared by the gRPC service and the group factory.
struct Members {
    by_id: Mutex<BTreeMap<String, Entry>>,
    next_session: std::sync::atomic::AtomicU64,
    /// Bumped on every change, so waiters wake up.
    changed: watch::Sender<u64>,
}

impl Members {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        crate::lock(&self.by_id)
    }

    fn list(&self) -> Vec<Member> {
        self.lock()
            .iter()
            .map(|(id, e)| Member {
                id: id.clone(),
                endpoint: e.endpoint.clone(),
            })
            .collect()
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Removes `id` if it still holds `session` (any session when `None`); true if removed.
    fn remove(&self, id: &str, session: Option<u64>) -> bool {
        let mut by_id = self.lock();
        let current = by_id.get(id).map(|e| e.session);
        let removed = current.is_some() && (session.is_none() || current == session);
        if removed {
            by_id.remove(id);
            let left = by_id.len();
            drop(by_id);
            tracing::info!(id, members = left, "worker left");
            self.bump();
        }
        removed
    }
}

/// The registry a coordinator serves; dropping it stops the server.
pub struct Registry {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    members: Arc<Members>,
}

impl Registry {
    /// Binds `addr` and serves the registry on a runtime of its own (the coordinator forms its
    /// group before its serving runtime exists, and rebuilds it from the serving thread). With
    /// `tls`, only workers presenting a certificate from the cluster CA can register.
    pub fn serve(addr: SocketAddr, tls: Option<&ClusterTls>) -> Result<Self, RegistryError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tessera-registry")
            .enable_all()
            .build()
            .map_err(RegistryError::Runtime)?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .map_err(|source| RegistryError::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| RegistryError::Bind { addr, source })?;
        let members = Arc::new(Members {
            by_id: Mutex::new(BTreeMap::new()),
            next_session: std::sync::atomic::AtomicU64::new(1),
            changed: watch::channel(0).0,
        });
        let service = RegistryService {
            members: Arc::clone(&members),
        };
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE))
            .http2_keepalive_timeout(Some(KEEPALIVE))
            .add_service(RegistryServer::new(service));
        let acceptor = tls.map(ClusterTls::acceptor);
        rt.spawn(async move {
            let served = match acceptor {
                None => {
                    server
                        .serve_with_incoming(TcpIncoming::from(listener))
                        .await
                }
                Some(acceptor) => {
                    let warn = crate::tls::incoming::FailureLog::Warn;
                    let incoming = incoming::accept(listener, acceptor, "worker registry", warn);
                    server.serve_with_incoming(incoming.into_stream()).await
                }
            };
            if let Err(e) = served {
                tracing::error!(error = %e, "the worker registry stopped");
            }
        });
        tracing::info!(addr = %bound, mtls = tls.is_some(), "worker registry listening (tessera worker --coordinator {bound})");
        Ok(Registry {
            rt,
            addr: bound,
            members,
        })
    }

    /// The address the registry listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The registered workers, by id.
    pub fn members(&self) -> Vec<Member> {
        self.members.list()
    }

    /// Blocks until at least `n` workers are registered (then returns all of them, by id), or
    /// fails after `timeout` naming those present. Not for use inside an async runtime.
    pub fn wait_for_members(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Member>, RegistryError> {
        let members = Arc::clone(&self.members);
        let mut changed = members.changed.subscribe();
        self.rt.block_on(async move {
            let enough = tokio::time::timeout(timeout, async {
                loop {
                    changed.mark_unchanged();
                    let now = members.list();
                    if now.len() >= n {
                        return now;
                    }
                    if changed.changed().await.is_err() {
                        // The sender lives in `members`, so this cannot happen; wait out the timeout.
                        std::future::pending::<()>().await;
                    }
                }
            })
            .await;
            enough.map_err(|_| {
                let present: Vec<String> = members
                    .list()
                    .into_iter()
                    .map(|m| format!("{} ({})", m.id, m.endpoint.grpc))
                    .collect();
                RegistryError::NotEnoughWorkers {
                    wanted: n,
                    waited: timeout,
                    present: if present.is_empty() {
                        "none".into()
                    } else {
                        present.join(", ")
                    },
                }
            })
        })
    }
}

struct RegistryService {
    members: Arc<Members>,
}

/// `addr` with an unspecified host replaced by `peer`'s (a worker listening on 0.0.0.0 announces
/// an address nobody else can dial).
fn reachable(field: &str, addr: &str, peer: Option<IpAddr>) -> Result<String, Status> {
    let parsed: SocketAddr = addr.parse().map_err(|_| {
        Status::invalid_argument(format!("{field} {addr:?} is not an ip:port address"))
    })?;
    Ok(match peer {
        Some(ip) if parsed.ip().is_unspecified() => SocketAddr::new(ip, parsed.port()).to_string(),
        _ => parsed.to_string(),
    })
}

type EventStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<pb::RegisterEvent, Status>> + Send>>;

#[tonic::async_trait]
impl RegistryRpc for RegistryService {
    type RegisterStream = EventStream;

    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let peer = request.remote_addr().map(|a| a.ip());
        let req = request.into_inner();
        if req.worker_id.trim().is_empty() || req.worker_id.contains('/') {
            return Err(Status::invalid_argument(format!(
                "worker_id {:?} must be non-empty and contain no '/'",
                req.worker_id
            )));
        }
        let endpoint = WorkerEndpoint {
            grpc: reachable("grpc_address", &req.grpc_address, peer)?,
            collective: reachable("collective_address", &req.collective_address, peer)?,
        };
        let members = Arc::clone(&self.members);
        let session = members
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (count, replaced) = {
            let mut by_id = members.lock();
            let replaced = by_id
                .insert(
                    req.worker_id.clone(),
                    Entry {
                        session,
                        endpoint: endpoint.clone(),
                    },
                )
                .is_some();
            (by_id.len(), replaced)
        };
        tracing::info!(
            id = %req.worker_id,
            grpc = %endpoint.grpc,
            collective = %endpoint.collective,
            version = %req.version,
            members = count,
            replaced,
            "worker registered"
        );
        members.bump();
        let (tx, rx) = mpsc::channel(1);
        // Cannot fail: the receiver is still here.
        let _ = tx.try_send(Ok(pb::RegisterEvent {
            members: count as u32,
        }));
        let id = req.worker_id;
        tokio::spawn(async move {
            // The receiver goes when tonic drops the response: the worker's connection closed.
            tx.closed().await;
            members.remove(&id, Some(session));
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let id = request.into_inner().worker_id;
        Ok(Response::new(pb::DeregisterResponse {
            removed: self.members.remove(&id, None),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn me(id: &str) -> pb::RegisterRequest {
        pb::RegisterRequest {
            worker_id: id.into(),
            grpc_address: "0.0.0.0:7001".into(),
            collective_address: "127.0.0.1:7002".into(),
            version: "test".into(),
        }
    }

    fn ids(members: &[Member]) -> Vec<&str> {
        members.iter().map(|m| m.id.as_str()).collect()
    }

    fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < limit, "not within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn workers_register_deregister_and_are_forgotten_when_their_connection_closes() {
        let registry = Registry::serve("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let addr = registry.addr().to_string();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let start = |id: &str| {
            let req = me(id);
            rt.block_on(async { client::Registration::start(&addr, req, None) })
                .unwrap()
        };
        let (b, a) = (start("b"), start("a"));
        let members = registry
            .wait_for_members(2, Duration::from_secs(10))
            .unwrap();
        assert_eq!(ids(&members), ["a", "b"], "id order is rank order");
        assert_eq!(
            members[0].endpoint,
            WorkerEndpoint {
                grpc: "127.0.0.1:7001".into(),
                collective: "127.0.0.1:7002".into()
            },
            "an unspecified host becomes the address the worker called from"
        );

        assert!(rt.block_on(a.deregister()).unwrap());
        assert_eq!(
            ids(&registry.members()),
            ["b"],
            "deregistering is immediate"
        );
        drop(b);
        wait_until(Duration::from_secs(5), || registry.members().is_empty());

        let err = registry
            .wait_for_members(1, Duration::from_millis(200))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("1 workers did not register within 200ms; registered: none"),
            "{err}"
        );
    }

    #[test]
    fn workers_register_again_with_a_restarted_coordinator() {
        let registry = Registry::serve("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let addr = registry.addr();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _w = rt
            .block_on(async { client::Registration::start(&addr.to_string(), me("w"), None) })
            .unwrap();
        registry
            .wait_for_members(1, Duration::from_secs(10))
            .unwrap();
        drop(registry);
        let restarted = Registry::serve(addr, None).unwrap();
        let members = restarted
            .wait_for_members(1, Duration::from_secs(10))
            .unwrap();
        assert_eq!(ids(&members), ["w"]);
    }

    #[test]
    fn malformed_registrations_are_refused_with_the_field_named() {
        let registry = Registry::serve("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let url = format!("http://{}", registry.addr());
        let rt = tokio::runtime::Runtime::new().unwrap();
        let refused = |req: pb::RegisterRequest| {
            rt.block_on(async {
                let mut c = tessera_proto::worker::v1::registry_client::RegistryClient::connect(
                    url.clone(),
                )
                .await
                .unwrap();
                c.register(req).await.unwrap_err().message().to_string()
            })
        };
        let msg = refused(pb::RegisterRequest {
            grpc_address: "nowhere".into(),
            ..me("w")
        });
        assert!(msg.contains("grpc_address \"nowhere\""), "{msg}");
        let msg = refused(me(""));
        assert!(msg.contains("worker_id"), "{msg}");
        assert!(registry.members().is_empty());
    }
}
