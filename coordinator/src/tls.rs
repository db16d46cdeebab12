//! TLS for the API: the server configuration from PEM files (built by
//! `platform::tls`, the one implementation shared with the relay and
//! `meshd`), and a listener for `axum::serve` that hands over connections
//! only once their handshake is done.
//!
//! Handshakes run in their own tasks, each with a deadline, so a slow or
//! stalled client never holds up the accept loop. At most
//! [`MAX_HANDSHAKES`] run at once; beyond that new connections wait in the
//! kernel's backlog. Finished streams reach the server through a bounded
//! queue, which holds its handshake slot until taken: memory stays bounded
//! however fast clients arrive.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How long a client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at most.
pub const MAX_HANDSHAKES: usize = 256;
/// Finished handshakes waiting for the server to take them.
const READY_QUEUE: usize = 64;

/// Server configuration from a certificate chain and its private key (PEM files).
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let chain = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
    let key_pem =
        std::fs::read(key).with_context(|| format!("reading the private key {}", key.display()))?;
    platform::tls::server_config(&chain, &key_pem).with_context(|| {
        format!(
            "TLS certificate {} with key {}",
            cert.display(),
            key.display()
        )
    })
}

/// A TCP listener whose connections come out TLS-terminated.
pub struct TlsListener {
    local_addr: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    accepting: JoinHandle<()>,
}

impl TlsListener {
    /// Starts accepting on `tcp` (needs a tokio runtime).
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let local_addr = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(READY_QUEUE);
        let accepting = tokio::spawn(accept_loop(tcp, TlsAcceptor::from(config), tx));
        Ok(TlsListener {
            local_addr,
            ready,
            accepting,
        })
    }
}

impl Drop for TlsListener {
    /// Closes the socket with the listener, as a plain `TcpListener` would.
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop ends only when aborted by our own drop, so
            // this is not reached; if it were, accept nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

async fn accept_loop(
    mut tcp: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        // Never closed, so this always yields a slot.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // axum's own accept: it retries and backs off on accept errors.
        let (stream, peer) = axum::serve::Listener::accept(&mut tcp).await;
        let _ = stream.set_nodelay(true);
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = ready.send((tls, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}
