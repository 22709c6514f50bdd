//! A real etcd for tests (the `testing` feature): one `etcd` process on free loopback ports with its
//! data in a temporary directory, killed when the guard drops. Tests can stop it and start it again
//! on the same address, with its data (a crash and restart) or without (a replaced etcd), to
//! exercise outages.
//!
//! The binary is `$TESSERA_ETCD_BIN`, else `etcd` on `PATH` (Debian: `apt-get install
//! etcd-server`). A missing binary is an error that says so, never a silent skip: a test that
//! needs etcd and cannot get it must fail.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::MembershipConfig;

/// Environment variable naming the etcd binary, overriding the `PATH` search.
pub const ETCD_BIN_ENV: &str = "TESSERA_ETCD_BIN";

/// How long a fresh etcd may take to elect itself and answer `/health`.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a test etcd could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EtcdServerError {
    #[error(
        "the `etcd` binary was not found ({looked}); install Debian's etcd-server: \
         `apt-get install etcd-server` (tests/run.sh installs it)"
    )]
    NotInstalled { looked: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("etcd for {url} exited during start-up ({status}); its log ends:\n{log}")]
    Exited {
        url: String,
        status: String,
        log: String,
    },
    #[error("etcd at {url} not healthy after {waited:?}; its log ends:\n{log}")]
    NotHealthy {
        url: String,
        waited: Duration,
        log: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EtcdServerError {
    let what = what.into();
    move |source| EtcdServerError::Io { what, source }
}

/// A running etcd on loopback. Dropping it kills the process and deletes its data.
#[derive(Debug)]
pub struct EtcdServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd on two free loopback ports and waits until it reports healthy.
    pub async fn start() -> Result<Self, EtcdServerError> {
        let bin = find_etcd()?;
        let dir = tempfile::Builder::new()
            .prefix("tessera-etcd-")
            .tempdir()
            .map_err(io_err("creating a temporary directory for etcd"))?;
        let mut server = Self {
            bin,
            dir,
            client_port: free_port()?,
            peer_port: free_port()?,
            child: None,
        };
        server.launch().await?;
        Ok(server)
    }

    /// The client URL, e.g. `http://127.0.0.1:41234`.
    pub fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// A membership config for this server with test-sized durations: 2 s leases, sub-second
    /// timeouts and backoff, and a start-up budget of a few seconds.
    pub fn test_config(&self, prefix: &str) -> MembershipConfig {
        MembershipConfig {
            endpoints: vec![self.client_url()],
            prefix: prefix.to_owned(),
            lease_ttl: Duration::from_secs(2),
            connect_timeout: Duration::from_millis(500),
            request_timeout: Duration::from_secs(1),
            max_start_retries: 10,
            start_retry_deadline: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(500),
        }
    }

    /// Kills etcd (SIGKILL, as a crash would) and waits for it to exit. Its data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Either call fails only if the process is already gone, which is the goal.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports with the data it had: a restart after a crash.
    pub async fn restart(&mut self) -> Result<(), EtcdServerError> {
        self.stop();
        self.launch().await
    }

    /// Starts etcd again on the same ports with no data: every key and lease is gone, as when an
    /// etcd is replaced by a fresh one at the same address.
    pub async fn restart_empty(&mut self) -> Result<(), EtcdServerError> {
        self.stop();
        let data = self.data_dir();
        if data.exists() {
            std::fs::remove_dir_all(&data)
                .map_err(io_err(format!("removing {}", data.display())))?;
        }
        self.launch().await
    }

    /// The last lines of etcd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    async fn launch(&mut self) -> Result<(), EtcdServerError> {
        let client = self.client_url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io_err("opening etcd's log file"))?;
        let log2 = log.try_clone().map_err(io_err("opening etcd's log file"))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--name=tessera-test")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=tessera-test={peer}"))
            .arg("--initial-cluster-state=new")
            // A single member still waits one election timeout before leading; shorter timings
            // make start-up and restarts quick. Leases stay valid down to 1.5 × election timeout.
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // etcd 3.4 refuses to run on architectures it does not officially support unless told.
        if std::env::consts::ARCH == "aarch64" {
            cmd.env("ETCD_UNSUPPORTED_ARCH", "arm64");
        }
        let child = cmd
            .spawn()
            .map_err(io_err(format!("starting {}", self.bin.display())))?;
        self.child = Some(child);
        self.wait_healthy().await
    }

    async fn wait_healthy(&mut self) -> Result<(), EtcdServerError> {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(EtcdServerError::Exited {
                    url: self.client_url(),
                    status: status.to_string(),
                    log: self.log_tail(),
                });
            }
            if health(self.client_port).await {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                self.stop();
                return Err(EtcdServerError::NotHealthy {
                    url: self.client_url(),
                    waited: START_TIMEOUT,
                    log: self.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback URL where nothing listens (a port that was free a moment ago), for tests of an
/// unreachable etcd.
pub fn unused_local_url() -> Result<String, EtcdServerError> {
    Ok(format!("http://127.0.0.1:{}", free_port()?))
}

fn free_port() -> Result<u16, EtcdServerError> {
    // Binding port 0 and releasing it leaves a small window in which another process could take
    // the port; etcd would then fail to start and say so in the error.
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io_err("finding a free port"))?;
    let port = l
        .local_addr()
        .map_err(io_err("finding a free port"))?
        .port();
    Ok(port)
}

fn find_etcd() -> Result<PathBuf, EtcdServerError> {
    if let Some(p) = std::env::var_os(ETCD_BIN_ENV) {
        let p = PathBuf::from(p);
        return if is_file(&p) {
            Ok(p)
        } else {
            Err(EtcdServerError::NotInstalled {
                looked: format!("${ETCD_BIN_ENV} is {}, which is not a file", p.display()),
            })
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("etcd"))
        .find(|p| is_file(p))
        .ok_or_else(|| EtcdServerError::NotInstalled {
            looked: format!("no `etcd` on PATH and ${ETCD_BIN_ENV} unset"),
        })
}

fn is_file(p: &Path) -> bool {
    p.metadata().is_ok_and(|m| m.is_file())
}

/// Whether etcd's `/health` endpoint answers `"health":"true"` (it does once a leader exists).
async fn health(port: u16) -> bool {
    let probe = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .ok()?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await.ok()?;
        let text = String::from_utf8_lossy(&body);
        Some(text.contains(r#""health":"true""#))
    };
    tokio::time::timeout(Duration::from_secs(1), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}
