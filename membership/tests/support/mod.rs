//! Helpers for the etcd tests: worker records, log capture, and a TCP proxy that can cut a worker
//! off from etcd without stopping etcd.

use std::net::SocketAddr;

use anyhow::Result;
use tessera_membership::WorkerRecord;
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

pub fn record(id: &str, port: u16) -> WorkerRecord {
    WorkerRecord {
        id: id.into(),
        grpc_addr: format!("127.0.0.1:{port}"),
        collective_addr: format!("127.0.0.1:{}", port + 1000),
        version: "0.1.0-test".into(),
    }
}

/// Shows the crate's log lines in a failing test's output (`RUST_LOG` overrides the level).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "tessera_membership=debug,info".into());
    // Several tests in one process: only the first installs the subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A loopback TCP proxy to one upstream. In blackhole mode it stops moving bytes but keeps every
/// connection open (and accepts new ones), as a network partition does; leaving the mode closes
/// those connections, so clients reconnect through a working path.
pub struct Proxy {
    addr: SocketAddr,
    blackholed: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream_url: &str) -> Result<Self> {
        let upstream = upstream_url.trim_start_matches("http://").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (blackholed, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            // Owning the connections here means aborting this task closes them all.
            let mut connections = JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                connections.spawn(relay(inbound, upstream.clone(), rx.clone()));
            }
        });
        Ok(Self {
            addr,
            blackholed,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn blackhole(&self, on: bool) {
        self.blackholed.send_replace(on);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until the mode is `on`. (A helper so that `wait_for`'s read guard is released at once.)
async fn until(rx: &mut watch::Receiver<bool>, on: bool) {
    let _ = rx.wait_for(|b| *b == on).await;
}

async fn relay(mut inbound: TcpStream, upstream: String, mut rx: watch::Receiver<bool>) {
    if *rx.borrow() {
        until(&mut rx, false).await;
        return;
    }
    let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
        return;
    };
    tokio::select! {
        _ = copy_bidirectional(&mut inbound, &mut outbound) => {}
        _ = until(&mut rx, true) => {
            // Hold both sockets, silent, until the partition ends.
            until(&mut rx, false).await;
        }
    }
}
