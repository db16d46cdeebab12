//! HTTP front: `GET /derp` with `Upgrade: crank-derp` becomes a relay
//! connection; `/healthz` and Prometheus `/metrics` beside it. Plus the STUN
//! responder on UDP.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::TokioIo;
use tokio::net::UdpSocket;

use super::Relay;
use crate::proto::stun;

/// The `Upgrade` token of the relay protocol.
pub const UPGRADE_PROTOCOL: &str = "crank-derp";

pub fn router(relay: Arc<Relay>) -> Router {
    Router::new()
        .route("/derp", get(upgrade))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(|State(r): State<Arc<Relay>>| async move { r.metrics.render() }),
        )
        .with_state(relay)
}

fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    (status, axum::Json(body)).into_response()
}

async fn upgrade(State(relay): State<Arc<Relay>>, mut req: Request) -> Response {
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
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => relay.serve_conn(TokioIo::new(upgraded)).await,
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

/// Serves `app` over TLS on `listener`, HTTP/1.1 with upgrades, forever.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    config: Arc<tokio_rustls::rustls::ServerConfig>,
) -> anyhow::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept");
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let tls = match acceptor.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
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
