//! What the in-process API tests share: a server state on a temporary
//! database, one way to call the router, and signed device requests.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body as HttpBody;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use platform::api::{Capabilities, RegisterRequest};
use platform::keys::{DevicePrivate, DiscoPrivate, NodePrivate};
use platform::people::DeviceCodeRequest;
use platform::signed::{Signed, DOMAIN_DEVICE_CODE, DOMAIN_REGISTER};
use platform::unix_now;
use serde_json::Value;
use tower::ServiceExt;

use super::{router, AppState, SharedState};
use crate::hub::Hub;
use crate::store::Store;

/// A server's state on `store`, batching map-stream changes for 10 ms.
pub fn state(store: Store, public_url: Option<&str>) -> SharedState {
    Arc::new(AppState {
        store,
        hub: Hub::new(Duration::from_secs(20)),
        batch_window: Duration::from_millis(10),
        relay_map: Default::default(),
        tls: false,
        public_url: public_url.map(str::to_owned),
    })
}

/// Calls the router as the holder of `token` with a raw body; returns the
/// status and the body as JSON (or as a JSON string when it is not JSON).
pub async fn call(
    state: &SharedState,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<String>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req
        .header("content-type", "application/json")
        .body(body.map(HttpBody::from).unwrap_or_else(HttpBody::empty))
        .unwrap();
    let resp = router(state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, value)
}

/// A registration signed by `dev`, as JSON text.
pub fn register_body(
    dev: &DevicePrivate,
    node: &NodePrivate,
    auth_key: &str,
    host: &str,
    ts: u64,
) -> String {
    let req = RegisterRequest {
        timestamp: ts,
        auth_key: auth_key.into(),
        node_key: node.public(),
        disco_key: DiscoPrivate::generate().public(),
        hostname: host.into(),
        os: "linux".into(),
        capabilities: Capabilities {
            cpu_cores: 2,
            arch: "x86_64".into(),
            ram_bytes: 1 << 30,
            ..Default::default()
        },
        network: None,
    };
    serde_json::to_string(&Signed::sign(dev, DOMAIN_REGISTER, &req)).unwrap()
}

/// A device-code request signed by `dev`: a start (no code) or a poll.
pub fn device_code_body(dev: &DevicePrivate, host: &str, code: Option<&str>) -> Value {
    let req = DeviceCodeRequest {
        timestamp: unix_now(),
        hostname: host.into(),
        code: code.map(str::to_owned),
    };
    serde_json::to_value(Signed::sign(dev, DOMAIN_DEVICE_CODE, &req)).unwrap()
}
