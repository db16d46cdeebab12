//! TLS for relay connections: the server's configuration from PEM files, and
//! the client's (from the client crate), which trusts the public web roots
//! plus, optionally, a private CA given in PEM. The configurations
//! themselves are built by `platform::tls`, shared with the coordinator and
//! `meshd`; this module only reads the files and keeps the relay's error
//! wording.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use tokio_rustls::rustls;

/// Server configuration from a certificate chain and a private key (PEM files).
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

pub use derp_client::tls_config as client_config;
