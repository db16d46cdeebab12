//! The API over TLS, in process: a private CA and a certificate for
//! 127.0.0.1 made with rcgen, the server on an ephemeral port, and clients
//! that do and do not trust the CA. Plus the rule that plain HTTP is served
//! off loopback only when asked for.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use coordinator::{client, Transport};
use platform::netmap::RelayMap;

/// Writes a private CA and a certificate for 127.0.0.1 signed by it to
/// `dir`; returns the paths of the CA, the certificate and its key.
fn private_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let paths = (dir.join("ca.pem"), dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

struct Server {
    addr: SocketAddr,
    ca: PathBuf,
    _dir: tempfile::TempDir,
}

/// A coordinator serving TLS on 127.0.0.1, on an initialised state dir.
async fn tls_server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = private_ca(dir.path());
    let state_dir = dir.path().join("state");
    let store = coordinator::store::Store::open(&state_dir).await.unwrap();
    store.init(platform::unix_now()).await.unwrap();
    let state = coordinator::app_state(&state_dir, RelayMap::default(), true)
        .await
        .unwrap();
    let config = coordinator::tls::server_config(&cert, &key).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(coordinator::serve_on(listener, state, Some(config)));
    Server {
        addr,
        ca,
        _dir: dir,
    }
}

async fn healthz(http: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    let resp = http
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .error_for_status()?;
    Ok(resp.text().await?)
}

#[tokio::test]
async fn a_client_trusting_the_ca_gets_healthz() {
    let server = tls_server().await;
    let http = client::http_client(Some(&server.ca)).unwrap();
    let url = format!("https://{}/healthz", server.addr);
    assert_eq!(healthz(&http, &url).await.unwrap(), "ok");
}

#[tokio::test]
async fn a_client_not_trusting_the_ca_fails_the_handshake() {
    let server = tls_server().await;
    let http = client::http_client(None).unwrap();
    let url = format!("https://{}/healthz", server.addr);
    let err = format!("{:#}", healthz(&http, &url).await.unwrap_err());
    assert!(err.contains("certificate"), "{err}");
}

#[tokio::test]
async fn plain_http_to_the_tls_port_fails() {
    let server = tls_server().await;
    let http = client::http_client(None).unwrap();
    let url = format!("http://{}/healthz", server.addr);
    assert!(healthz(&http, &url).await.is_err());
}

#[tokio::test]
async fn a_stalled_handshake_does_not_hold_up_other_clients() {
    let server = tls_server().await;
    // Connects and never says a word.
    let _stalled = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let http = client::http_client(Some(&server.ca)).unwrap();
    let url = format!("https://{}/healthz", server.addr);
    assert_eq!(healthz(&http, &url).await.unwrap(), "ok");
}

#[tokio::test]
async fn serve_refuses_plain_http_off_loopback_unless_told() {
    let dir = tempfile::tempdir().unwrap();
    let http = Transport::Http { insecure: false };
    let listen: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let err = coordinator::serve(
        dir.path(),
        listen,
        RelayMap::default(),
        http.clone(),
        &Default::default(),
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("--insecure-http"), "{err:#}");
    // Nothing was created before the refusal.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    // On loopback, or with --insecure-http, the transport is accepted and
    // `serve` goes on to the (here uninitialised) state directory.
    let insecure = Transport::Http { insecure: true };
    for (listen, transport) in [("127.0.0.1:0", http), ("0.0.0.0:0", insecure)] {
        let listen: SocketAddr = listen.parse().unwrap();
        let err = coordinator::serve(
            dir.path(),
            listen,
            RelayMap::default(),
            transport,
            &Default::default(),
        )
        .await
        .unwrap_err();
        assert!(format!("{err:#}").contains("not initialised"), "{err:#}");
    }
}
