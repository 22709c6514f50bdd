//! TLS connections accepted off the accept loop, for axum and tonic servers alike.
//!
//! [`accept`] takes a bound listener and an acceptor and returns [`Handshakes`]: a background
//! task accepts TCP connections and runs each handshake in a task of its own (bounded by
//! [`HANDSHAKE_TIMEOUT`](super::HANDSHAKE_TIMEOUT)), handing over only connections whose
//! handshake succeeded. A plain-text client, a client without an acceptable certificate or one
//! that never finishes its handshake is dropped and logged without delaying anyone else. The
//! task ends when the server drops its `Handshakes` (shutdown), closing the listener.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::HANDSHAKE_TIMEOUT;

/// Finished handshakes waiting for the server to take them.
const QUEUE: usize = 64;

/// How loudly failed handshakes are logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureLog {
    /// Public listeners: anyone can connect, so failures are routine (`debug`).
    Quiet,
    /// Cluster listeners: a failure is a misconfigured or foreign peer (`warn`).
    Warn,
}

/// TLS connections that completed their handshake, in arrival order.
pub struct Handshakes {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    /// `None` if the listener could not say (it is bound, so that does not happen in practice).
    local: Option<SocketAddr>,
}

/// Accepts TLS on `listener` in the background; `what` names the listener in logs.
pub fn accept(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    what: &'static str,
    log: FailureLog,
) -> Handshakes {
    let local = listener.local_addr().ok();
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        tracing::warn!(listener = what, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            // Tokens are streamed in small writes; Nagle's algorithm would hold them back.
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let failed =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                            return;
                        }
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => format!("not finished within {HANDSHAKE_TIMEOUT:?}"),
                    };
                match log {
                    FailureLog::Quiet => {
                        tracing::debug!("TLS handshake with {peer} on the {what} failed: {failed}")
                    }
                    FailureLog::Warn => {
                        tracing::warn!("TLS handshake with {peer} on the {what} failed: {failed}")
                    }
                }
            });
        }
    });
    Handshakes { rx, local }
}

impl Handshakes {
    /// The connections as tonic's `serve_with_incoming` takes them.
    pub fn into_stream(
        self,
    ) -> impl futures_util::Stream<Item = std::io::Result<TlsStream<TcpStream>>> + Send + 'static
    {
        futures_util::stream::unfold(self.rx, |mut rx| async move {
            let (tls, _) = rx.recv().await?;
            Some((Ok(tls), rx))
        })
    }
}

impl axum::serve::Listener for Handshakes {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept task only stops once this side is gone, so this cannot happen.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.local
            .ok_or_else(|| std::io::Error::other("the listener has no local address"))
    }
}
