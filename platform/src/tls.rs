//! TLS configurations (rustls with the ring provider) built from PEM bytes:
//! the one place the coordinator, the relay and `meshd` get theirs, so every
//! control-plane and relay connection trusts the same roots and speaks the
//! same protocol versions.
//!
//! It lives here rather than in `derp-relay` because the coordinator must not
//! link the relay server, and rather than in each binary because two copies
//! of trust rules drift. Platform stays pure: callers read the files and hand
//! over bytes; nothing here touches a socket or the file system.
//!
//! Clients trust the Mozilla roots compiled in by `webpki-roots` (the same on
//! every host and in minimal containers without a CA bundle), plus a private
//! CA when one is given, which is how self-hosted coordinators and relays are
//! reached.

use std::sync::Arc;

/// The rustls these configurations are for, for callers to name its types.
pub use rustls;
use rustls::pki_types::pem::{self, PemObject as _};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("no certificate in the PEM")]
    NoCertificate,
    #[error("unreadable PEM: {0}")]
    Pem(pem::Error),
    #[error("certificate and key do not match or are unsupported: {0}")]
    CertKey(rustls::Error),
    #[error("unusable CA certificate: {0}")]
    Ca(rustls::Error),
    #[error("no usable protocol version: {0}")]
    Versions(rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server configuration from a certificate chain and its private key (PEM).
pub fn server_config(
    cert_chain_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    let chain = certificates(cert_chain_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(TlsConfigError::Pem)?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsConfigError::Versions)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(TlsConfigError::CertKey)?;
    Ok(Arc::new(config))
}

/// Client configuration: the public web roots, plus every certificate in
/// `extra_ca_pem` if given.
pub fn client_config(
    extra_ca_pem: Option<&[u8]>,
) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_ca_pem {
        for cert in certificates(pem)? {
            roots.add(cert).map_err(TlsConfigError::Ca)?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsConfigError::Versions)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Every certificate in `pem`; at least one.
fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(TlsConfigError::Pem)?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificate);
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;

    struct Pki {
        ca_pem: String,
        cert_pem: String,
        key_pem: String,
    }

    /// A private CA and a certificate for 127.0.0.1 signed by it.
    fn pki() -> Pki {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        Pki {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Runs a handshake in memory; the first error either side reports.
    fn handshake(
        client: Arc<rustls::ClientConfig>,
        server: Arc<rustls::ServerConfig>,
    ) -> Result<(), rustls::Error> {
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut c = rustls::ClientConnection::new(client, name)?;
        let mut s = rustls::ServerConnection::new(server)?;
        for _ in 0..10 {
            let mut wire = Vec::new();
            c.write_tls(&mut wire).unwrap();
            s.read_tls(&mut wire.as_slice()).unwrap();
            s.process_new_packets()?;
            wire.clear();
            s.write_tls(&mut wire).unwrap();
            c.read_tls(&mut wire.as_slice()).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn a_client_trusting_the_private_ca_completes_a_handshake() {
        let pki = pki();
        let server = server_config(pki.cert_pem.as_bytes(), pki.key_pem.as_bytes()).unwrap();
        let client = client_config(Some(pki.ca_pem.as_bytes())).unwrap();
        handshake(client, server).unwrap();
    }

    #[test]
    fn a_client_with_only_public_roots_rejects_a_private_certificate() {
        let pki = pki();
        let server = server_config(pki.cert_pem.as_bytes(), pki.key_pem.as_bytes()).unwrap();
        let err = handshake(client_config(None).unwrap(), server).unwrap_err();
        assert!(
            matches!(err, rustls::Error::InvalidCertificate(_)),
            "{err:?}"
        );
    }

    #[test]
    fn bad_pem_is_an_error_not_a_panic() {
        let pki = pki();
        assert!(matches!(
            server_config(b"", pki.key_pem.as_bytes()),
            Err(TlsConfigError::NoCertificate)
        ));
        assert!(matches!(
            server_config(pki.cert_pem.as_bytes(), b"no key here"),
            Err(TlsConfigError::Pem(_))
        ));
        // The CA's certificate with the leaf's key.
        assert!(matches!(
            server_config(pki.ca_pem.as_bytes(), pki.key_pem.as_bytes()),
            Err(TlsConfigError::CertKey(_))
        ));
        assert!(matches!(
            client_config(Some(b"not pem")),
            Err(TlsConfigError::NoCertificate)
        ));
    }
}
