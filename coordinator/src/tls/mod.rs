//! TLS for Tessera's listeners and cluster links, through rustls with the ring provider.
//!
//! Two independent settings:
//!
//! - [`PublicTlsConfig`] (`--tls-cert`, `--tls-key`): the public HTTP and gRPC listeners speak
//!   TLS. Clients are not asked for certificates (the API key, `auth.rs`, authenticates them).
//! - [`ClusterTlsConfig`] (`--cluster-ca`, `--cluster-cert`, `--cluster-key`): mutual TLS on the
//!   control plane between coordinator and workers (the `Worker` service the coordinator calls,
//!   the `Registry` service workers call). Each side presents its certificate and accepts only a
//!   peer whose certificate chains to the cluster CA. The collective TCP links between workers are
//!   not covered (docs/RELIABILITY.md).
//!
//! Files are read, parsed and checked when the settings are loaded, before anything listens, so a
//! missing file, a file that is not PEM, a key file without a key or a key that does not belong
//! to the certificate stops the process with an error naming the file. Servers accept TLS through
//! [`incoming`], which runs handshakes off the accept loop so a slow or silent client cannot hold
//! up others; clients use tonic's rustls connector ([`ClusterTls::endpoint`]).

pub mod incoming;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer};
use rustls::pki_types::{PrivateSec1KeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio_rustls::TlsAcceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Longest a TLS handshake may take, on either side, before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{flags} go together; missing: {missing}")]
    Incomplete {
        flags: &'static str,
        missing: String,
    },
    #[error("cannot read the {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the {what} {} is not PEM: it has no `-----BEGIN ...-----` line (convert a DER file with \
         `openssl x509 -inform der` or `openssl pkey -inform der`)",
        path.display()
    )]
    NotPem { what: &'static str, path: PathBuf },
    #[error("the {what} {} is malformed PEM: {detail}", path.display())]
    BadPem {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("no certificate found in the {what} {} (expected a `-----BEGIN CERTIFICATE-----` block)", path.display())]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error(
        "no private key found in the {what} {} (expected `-----BEGIN PRIVATE KEY-----`, \
         `RSA PRIVATE KEY` or `EC PRIVATE KEY`)",
        path.display()
    )]
    NoKey { what: &'static str, path: PathBuf },
    #[error(
        "the private key in {} is encrypted; give it unencrypted (`openssl pkey -in KEY -out PLAIN`)",
        path.display()
    )]
    EncryptedKey { path: PathBuf },
    #[error("the private key in {} does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("cannot use the certificate {} with the key {}: {detail}", cert.display(), key.display())]
    Unusable {
        cert: PathBuf,
        key: PathBuf,
        detail: String,
    },
    #[error("the cluster CA {}: {detail}", path.display())]
    BadCa { path: PathBuf, detail: String },
    #[error("--cluster-server-name {0:?} is not a DNS name or IP address")]
    BadServerName(String),
    #[error("TLS settings for {addr}: {detail}")]
    Client { addr: String, detail: String },
}

/// TLS on the public listeners: both fields or neither.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicTlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: Option<PathBuf>,
    /// PEM private key of the leaf certificate.
    pub key: Option<PathBuf>,
}

impl PublicTlsConfig {
    /// Both files named, or neither.
    pub fn validate(&self) -> Result<(), TlsError> {
        let flags = [("--tls-cert", &self.cert), ("--tls-key", &self.key)];
        check_together("--tls-cert and --tls-key", &flags)
    }

    /// Reads and checks the files; `None` when TLS is off.
    pub fn load(&self) -> Result<Option<PublicTls>, TlsError> {
        self.validate()?;
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            return Ok(None);
        };
        let pair = KeyPair::read(
            cert,
            key,
            "TLS certificate (--tls-cert)",
            "TLS key (--tls-key)",
        )?;
        let with_alpn = |alpn: &[&[u8]]| -> Result<Arc<rustls::ServerConfig>, TlsError> {
            let mut config = server_builder()
                .with_no_client_auth()
                .with_single_cert(pair.chain.clone(), pair.key.clone_key())
                .map_err(|e| pair.error(e))?;
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(config))
        };
        // axum is built with HTTP/1 only; gRPC is HTTP/2 and tonic clients insist on `h2`.
        Ok(Some(PublicTls {
            http: with_alpn(&[b"http/1.1"])?,
            grpc: with_alpn(&[b"h2"])?,
        }))
    }
}

/// Loaded public TLS settings.
#[derive(Clone)]
pub struct PublicTls {
    http: Arc<rustls::ServerConfig>,
    grpc: Arc<rustls::ServerConfig>,
}

impl PublicTls {
    /// For the OpenAI-compatible HTTP listener.
    pub fn http_acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.http))
    }

    /// For the public gRPC listener.
    pub fn grpc_acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.grpc))
    }
}

/// Mutual TLS between coordinator and workers: the three files together, or none.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterTlsConfig {
    /// PEM certificates of the cluster CA(s) that peers' certificates must chain to.
    pub ca: Option<PathBuf>,
    /// This process's PEM certificate chain (presented as server and as client, so it needs the
    /// serverAuth and clientAuth extended key usages, or no EKU extension at all).
    pub cert: Option<PathBuf>,
    /// Its private key.
    pub key: Option<PathBuf>,
    /// The name peers' server certificates are checked against; by default the host of the
    /// address dialled (an IP address or a DNS name).
    pub server_name: Option<String>,
}

impl ClusterTlsConfig {
    /// All three files named, or none (a server name alone means nothing).
    pub fn validate(&self) -> Result<(), TlsError> {
        let flags = [
            ("--cluster-ca", &self.ca),
            ("--cluster-cert", &self.cert),
            ("--cluster-key", &self.key),
        ];
        let all = "--cluster-ca, --cluster-cert and --cluster-key";
        if flags.iter().all(|(_, p)| p.is_none()) && self.server_name.is_some() {
            return Err(TlsError::Incomplete {
                flags: "--cluster-server-name and the cluster TLS files",
                missing: all.into(),
            });
        }
        check_together(all, &flags)
    }

    /// Reads and checks the files; `None` when cluster TLS is off.
    pub fn load(&self) -> Result<Option<ClusterTls>, TlsError> {
        self.validate()?;
        let (Some(ca), Some(cert), Some(key)) = (&self.ca, &self.cert, &self.key) else {
            return Ok(None);
        };
        let ca_pem = read(ca, "cluster CA (--cluster-ca)")?;
        let mut roots = RootCertStore::empty();
        for der in certificates(&ca_pem, ca, "cluster CA (--cluster-ca)")? {
            roots.add(der).map_err(|e| TlsError::BadCa {
                path: ca.clone(),
                detail: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::BadCa {
                path: ca.clone(),
                detail: e.to_string(),
            })?;
        let pair = KeyPair::read(
            cert,
            key,
            "cluster certificate (--cluster-cert)",
            "cluster key (--cluster-key)",
        )?;
        // A certificate the CA did not issue will be refused by every peer; say so now, while
        // still starting (a warning, not an error: peers may trust a different CA bundle).
        if let Some((leaf, rest)) = pair.chain.split_first()
            && let Err(e) = verifier.verify_client_cert(leaf, rest, UnixTime::now())
        {
            tracing::warn!(
                "the cluster certificate {} does not verify against the cluster CA {}: {e}; \
                 peers trusting that CA will refuse it",
                cert.display(),
                ca.display()
            );
        }
        let mut server = server_builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(pair.chain.clone(), pair.key.clone_key())
            .map_err(|e| pair.error(e))?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        let mut client = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca_pem))
            .identity(Identity::from_pem(&pair.cert_pem, &pair.key_pem))
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(name) = &self.server_name {
            rustls::pki_types::ServerName::try_from(name.as_str())
                .map_err(|_| TlsError::BadServerName(name.clone()))?;
            client = client.domain_name(name.clone());
        }
        let tls = ClusterTls {
            config: self.clone(),
            server: Arc::new(server),
            client,
        };
        // tonic builds its connector per endpoint; build one now so its errors surface here.
        tls.endpoint("127.0.0.1:1")?;
        Ok(Some(tls))
    }

    /// The flags that give a spawned `tessera worker` these settings.
    pub fn worker_args(&self) -> Vec<std::ffi::OsString> {
        let mut args = Vec::new();
        for (flag, path) in [
            ("--cluster-ca", &self.ca),
            ("--cluster-cert", &self.cert),
            ("--cluster-key", &self.key),
        ] {
            if let Some(p) = path {
                args.push(flag.into());
                args.push(p.clone().into_os_string());
            }
        }
        if let Some(name) = &self.server_name {
            args.push("--cluster-server-name".into());
            args.push(name.into());
        }
        args
    }
}

/// Loaded cluster TLS settings: a server side that requires client certificates and a client
/// side that presents this process's certificate.
#[derive(Clone)]
pub struct ClusterTls {
    config: ClusterTlsConfig,
    server: Arc<rustls::ServerConfig>,
    client: ClientTlsConfig,
}

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterTls")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ClusterTls {
    /// The settings these were loaded from.
    pub fn config(&self) -> &ClusterTlsConfig {
        &self.config
    }

    /// For the worker's gRPC listener and the coordinator's registry.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.server))
    }

    /// An mTLS endpoint for `addr` (`host:port`, or a URL whose scheme is replaced by https).
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, TlsError> {
        let hostport = addr
            .strip_prefix("http://")
            .or_else(|| addr.strip_prefix("https://"))
            .unwrap_or(addr);
        let err = |detail: String| TlsError::Client {
            addr: addr.to_string(),
            detail,
        };
        Endpoint::from_shared(format!("https://{hostport}"))
            .map_err(|e| err(e.to_string()))?
            .tls_config(self.client.clone())
            .map_err(|e| err(crate::cluster::with_causes(&e)))
    }
}

/// A control-plane endpoint for `addr` (`host:port`): mTLS when `tls` is set, plain otherwise.
pub fn cluster_endpoint(addr: &str, tls: Option<&ClusterTls>) -> Result<Endpoint, TlsError> {
    match tls {
        Some(tls) => tls.endpoint(addr),
        None => Endpoint::from_shared(format!("http://{addr}")).map_err(|e| TlsError::Client {
            addr: addr.to_string(),
            detail: e.to_string(),
        }),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_builder() -> rustls::ConfigBuilder<rustls::ServerConfig, rustls::WantsVerifier> {
    rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        // The ring provider supports every default version, so this cannot fail.
        .unwrap_or_else(|e| unreachable!("ring supports the default TLS versions: {e}"))
}

/// The flags of `flags` left unset; an error unless that is none or all of them.
fn check_together(
    together: &'static str,
    flags: &[(&'static str, &Option<PathBuf>)],
) -> Result<(), TlsError> {
    let missing: Vec<&str> = flags
        .iter()
        .filter(|(_, p)| p.is_none())
        .map(|(f, _)| *f)
        .collect();
    if missing.is_empty() || missing.len() == flags.len() {
        return Ok(());
    }
    Err(TlsError::Incomplete {
        flags: together,
        missing: missing.join(" and "),
    })
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Every PEM section of `bytes` that rustls knows (unknown labels are skipped).
fn sections(
    bytes: &[u8],
    path: &Path,
    what: &'static str,
) -> Result<Vec<(SectionKind, Vec<u8>)>, TlsError> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    if !bytes.windows(BEGIN.len()).any(|w| w == BEGIN) {
        return Err(TlsError::NotPem {
            what,
            path: path.to_path_buf(),
        });
    }
    <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| TlsError::BadPem {
            what,
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
}

fn certificates(
    bytes: &[u8],
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = sections(bytes, path, what)?
        .into_iter()
        .filter(|(kind, _)| *kind == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der))
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn private_key(
    bytes: &[u8],
    path: &Path,
    what: &'static str,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    let found = sections(bytes, path, what);
    // An encrypted key is an unknown section to rustls: name it rather than "no key found".
    const ENCRYPTED: &[u8] = b"-----BEGIN ENCRYPTED PRIVATE KEY";
    let encrypted = bytes.windows(ENCRYPTED.len()).any(|w| w == ENCRYPTED);
    for (kind, der) in found? {
        return Ok(match kind {
            SectionKind::PrivateKey => PrivatePkcs8KeyDer::from(der).into(),
            SectionKind::RsaPrivateKey => PrivatePkcs1KeyDer::from(der).into(),
            SectionKind::EcPrivateKey => PrivateSec1KeyDer::from(der).into(),
            _ => continue,
        });
    }
    Err(if encrypted {
        TlsError::EncryptedKey {
            path: path.to_path_buf(),
        }
    } else {
        TlsError::NoKey {
            what,
            path: path.to_path_buf(),
        }
    })
}

/// A certificate chain and its key, read from their files, with the PEM text kept for tonic.
struct KeyPair {
    cert_path: PathBuf,
    key_path: PathBuf,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl KeyPair {
    fn read(
        cert: &Path,
        key: &Path,
        cert_what: &'static str,
        key_what: &'static str,
    ) -> Result<Self, TlsError> {
        let cert_pem = read(cert, cert_what)?;
        let key_pem = read(key, key_what)?;
        let pair = KeyPair {
            chain: certificates(&cert_pem, cert, cert_what)?,
            key: private_key(&key_pem, key, key_what)?,
            cert_path: cert.to_path_buf(),
            key_path: key.to_path_buf(),
            cert_pem,
            key_pem,
        };
        // rustls checks that the key parses and matches the leaf's public key.
        server_builder()
            .with_no_client_auth()
            .with_single_cert(pair.chain.clone(), pair.key.clone_key())
            .map_err(|e| pair.error(e))?;
        Ok(pair)
    }

    /// What rustls said about this pair, in the operator's terms.
    fn error(&self, e: rustls::Error) -> TlsError {
        let (cert, key) = (self.cert_path.clone(), self.key_path.clone());
        let detail = match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                return TlsError::KeyMismatch { cert, key };
            }
            rustls::Error::InvalidCertificate(e) => {
                format!("the certificate is not a valid X.509 certificate ({e:?})")
            }
            rustls::Error::General(e) => format!("the private key is unusable: {e}"),
            e => e.to_string(),
        };
        TlsError::Unusable { cert, key, detail }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_must_come_complete() {
        assert!(PublicTlsConfig::default().validate().is_ok());
        let half = PublicTlsConfig {
            cert: Some("c.pem".into()),
            key: None,
        };
        let err = half.validate().unwrap_err().to_string();
        assert!(err.contains("go together; missing: --tls-key"), "{err}");

        assert!(ClusterTlsConfig::default().validate().is_ok());
        let partial = ClusterTlsConfig {
            ca: Some("ca.pem".into()),
            ..Default::default()
        };
        let err = partial.validate().unwrap_err().to_string();
        assert!(
            err.contains("missing: --cluster-cert and --cluster-key"),
            "{err}"
        );
        let name_only = ClusterTlsConfig {
            server_name: Some("tessera".into()),
            ..Default::default()
        };
        assert!(name_only.validate().is_err());
    }

    #[test]
    fn file_problems_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let der = write("der.pem", "\u{30}\u{82}binary");
        let empty_pem = write(
            "other.pem",
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        );
        let broken = write("broken.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n");
        let encrypted = write(
            "enc.pem",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        );
        let load = |cert: &Path, key: &Path| {
            PublicTlsConfig {
                cert: Some(cert.to_path_buf()),
                key: Some(key.to_path_buf()),
            }
            .load()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
        };
        let missing = dir.path().join("missing.pem");
        let err = load(&missing, &der);
        assert!(
            err.contains("missing.pem") && err.contains("cannot read"),
            "{err}"
        );
        let err = load(&der, &der);
        assert!(err.contains("der.pem is not PEM"), "{err}");
        let err = load(&broken, &der);
        assert!(err.contains("broken.pem is malformed PEM"), "{err}");
        let err = load(&empty_pem, &der);
        assert!(
            err.contains("no certificate found") && err.contains("other.pem"),
            "{err}"
        );
        assert!(matches!(PublicTlsConfig::default().load(), Ok(None)));
        let key_err = private_key(
            b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            &empty_pem,
            "key",
        )
        .unwrap_err()
        .to_string();
        assert!(key_err.contains("no private key found"), "{key_err}");
        let enc = private_key(&std::fs::read(&encrypted).unwrap(), &encrypted, "key")
            .unwrap_err()
            .to_string();
        assert!(enc.contains("is encrypted"), "{enc}");
    }
}
