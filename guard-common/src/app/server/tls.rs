//! TLS for guard's server, through rustls with the ring provider.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};

use super::ServeError;

/// A server configuration from a PEM certificate chain and a PEM private
/// key (PKCS#8, PKCS#1 or SEC1), without client authentication.
pub(crate) fn config_from_pem(cert: &Path, key: &Path) -> Result<ServerConfig, ServeError> {
    let file_error = |what: &'static str, path: &Path, reason: String| ServeError::TlsFile {
        what,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_error("certificates", cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error("certificates", cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(file_error(
            "certificates",
            cert,
            "no CERTIFICATE block in the file".to_owned(),
        ));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| file_error("private key", key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key_der))
        .map_err(|e| ServeError::Tls(e.to_string()))
}

/// The app's configuration, advertising through ALPN what the server
/// speaks when the app did not say: h2 only when HTTP/2 is on, so a client
/// never negotiates a protocol the connection will refuse.
pub(crate) fn with_alpn(config: Arc<ServerConfig>, http2: bool) -> Arc<ServerConfig> {
    if !config.alpn_protocols.is_empty() {
        return config;
    }
    let mut config = Arc::unwrap_or_clone(config);
    if http2 {
        config.alpn_protocols.push(b"h2".to_vec());
    }
    config.alpn_protocols.push(b"http/1.1".to_vec());
    Arc::new(config)
}
