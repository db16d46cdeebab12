//! HTTP front: `GET /derp` with `Upgrade: crank-derp` becomes a relay
//! connection; `/healthz` and OpenMetrics `/metrics` beside it. Plus the STUN
//! responder on UDP.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UdpSocket;
use tokio::sync::OwnedSemaphorePermit;

use super::metrics::{Drop, CONTENT_TYPE};
use super::Relay;
use crate::proto::stun;

/// The `Upgrade` token of the relay protocol.
pub use derp_proto::UPGRADE_PROTOCOL;
/// Largest HTTP request head read before the upgrade (hyper's smallest).
const MAX_REQUEST_HEAD: usize = 8192;

pub fn router(relay: Arc<Relay>) -> Router {
    Router::new()
        .route("/derp", get(upgrade))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(|State(r): State<Arc<Relay>>| async move {
                ([(header::CONTENT_TYPE, CONTENT_TYPE)], r.render_metrics())
            }),
        )
        .with_state(relay)
}

impl Relay {
    /// The OpenMetrics text of `/metrics`.
    pub fn render_metrics(&self) -> String {
        let (admitted, refused) = self.admission().cached();
        self.metrics.set_admission_cached(admitted, refused);
        self.metrics.render()
    }
}

fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    (status, axum::Json(body)).into_response()
}

/// The connection permit of the TCP connection a request came on: the
/// upgraded relay connection takes it over, so it counts until it ends.
#[derive(Clone)]
struct ConnPermit(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

async fn upgrade(
    State(relay): State<Arc<Relay>>,
    permit: Option<Extension<ConnPermit>>,
    mut req: Request,
) -> Response {
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(UPGRADE_PROTOCOL));
    if !wants {
        return json_error(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "send `Upgrade: crank-derp`",
        );
    }
    let Some(handshake) = relay.handshake_permit() else {
        relay.metrics.drop(Drop::TooManyHandshakes);
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_handshakes",
            "too many connections are proving their key; try again shortly",
        );
    };
    let conn = permit
        .and_then(|Extension(ConnPermit(p))| p.lock().unwrap_or_else(|e| e.into_inner()).take());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let _conn = conn;
        match on_upgrade.await {
            Ok(upgraded) => relay.serve_conn(TokioIo::new(upgraded), handshake).await,
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, UPGRADE_PROTOCOL)
        .header(header::CONNECTION, "Upgrade")
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Serves the relay on `listener` (over TLS with `tls`), HTTP/1.1 with
/// upgrades, forever. Every TCP connection takes a permit from the relay's
/// connection cap at accept (none left: closed at once, counted), and has
/// the handshake deadline to send its request head.
pub async fn serve(
    listener: tokio::net::TcpListener,
    relay: Arc<Relay>,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
) -> anyhow::Result<()> {
    let app = router(relay.clone());
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let deadline = relay.limits().handshake_timeout;
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept");
                // Out of file descriptors, say: give others a moment.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = relay.connection_permit() else {
            relay.metrics.drop(Drop::TooManyConnections);
            continue;
        };
        let app = app
            .clone()
            .layer(Extension(ConnPermit(Arc::new(Mutex::new(Some(permit))))));
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let result = match acceptor {
                Some(acceptor) => {
                    match tokio::time::timeout(deadline, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => serve_http(TokioIo::new(tls), app, deadline).await,
                        Ok(Err(e)) => Err(e).context("TLS handshake"),
                        Err(_) => Err(anyhow::anyhow!("TLS handshake timed out")),
                    }
                }
                None => serve_http(TokioIo::new(tcp), app, deadline).await,
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = format!("{e:#}"), "connection ended");
            }
        });
    }
}

async fn serve_http<I>(io: I, app: Router, deadline: Duration) -> anyhow::Result<()>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(app);
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(deadline)
        .max_buf_size(MAX_REQUEST_HEAD)
        .serve_connection(io, service)
        .with_upgrades()
        .await
        .context("HTTP")
}

/// Answers STUN binding requests on `socket` forever; anything else is ignored.
pub async fn serve_stun(socket: UdpSocket) {
    let mut buf = [0u8; 1500];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        if let Some(tx) = stun::parse_request(&buf[..n]) {
            let seen = SocketAddr::new(from.ip().to_canonical(), from.port());
            let _ = socket.send_to(&stun::response(&tx, seen), from).await;
        }
    }
}
