//! The TLS flags shared by `serve`, `coordinator` and `worker`, turned into the coordinator
//! crate's settings (`tessera_coordinator::tls`), which check them and load the files.
//!
//! Public TLS (`--tls-cert`, `--tls-key`) covers the HTTP and gRPC listeners of `serve` and
//! `coordinator`. Cluster mTLS (`--cluster-ca`, `--cluster-cert`, `--cluster-key`) covers the
//! control plane between a coordinator and its workers, and must be given to both sides.

use std::path::PathBuf;

use clap::Args;
use tessera_coordinator::tls::{ClusterTlsConfig, PublicTlsConfig};

#[derive(Args, Debug, Clone, Default)]
pub struct PublicTlsArgs {
    /// PEM certificate chain (leaf first) for the HTTP and gRPC listeners. With --tls-key both
    /// serve TLS only (https://; gRPC clients must use TLS); unset: plain text.
    #[arg(long, env = "TESSERA_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1, unencrypted) of --tls-cert.
    #[arg(long, env = "TESSERA_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

impl PublicTlsArgs {
    pub fn config(&self) -> PublicTlsConfig {
        PublicTlsConfig {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        }
    }
}

#[derive(Args, Debug, Clone, Default)]
pub struct ClusterTlsArgs {
    /// PEM certificate(s) of the cluster CA: with --cluster-cert and --cluster-key, coordinator
    /// and workers talk mutual TLS and accept only peers whose certificate chains to it. Give the
    /// same CA to every process of the cluster; unset: plain gRPC between them.
    #[arg(long, env = "TESSERA_CLUSTER_CA")]
    pub cluster_ca: Option<PathBuf>,
    /// This process's PEM certificate chain for the cluster, signed by the cluster CA. It is
    /// used as server and as client certificate, so it needs both the serverAuth and clientAuth
    /// extended key usages (or none), and a SAN for the address peers dial (or see
    /// --cluster-server-name).
    #[arg(long, env = "TESSERA_CLUSTER_CERT")]
    pub cluster_cert: Option<PathBuf>,
    /// PEM private key of --cluster-cert (unencrypted).
    #[arg(long, env = "TESSERA_CLUSTER_KEY")]
    pub cluster_key: Option<PathBuf>,
    /// Check peers' certificates against this DNS name instead of the host in their address
    /// (for certificates issued to one cluster-wide name, e.g. when pod IPs change).
    #[arg(long, env = "TESSERA_CLUSTER_SERVER_NAME")]
    pub cluster_server_name: Option<String>,
}

impl ClusterTlsArgs {
    pub fn config(&self) -> ClusterTlsConfig {
        ClusterTlsConfig {
            ca: self.cluster_ca.clone(),
            cert: self.cluster_cert.clone(),
            key: self.cluster_key.clone(),
            server_name: self.cluster_server_name.clone(),
        }
    }
}
