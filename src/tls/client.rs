//! The `ClientConfig` for re-originated TLS. Verification always runs against a root store;
//! there is no setting, and no code path, that turns it off.

use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};

use crate::config::{ListenerConfig, Protocol, Roots, UpstreamTlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error("listener {listener}: upstream_tls: {reason}")]
    Build { listener: String, reason: String },
}

/// What a connector needs to speak TLS to the upstream.
#[derive(Clone)]
pub struct UpstreamTls {
    pub config: Arc<ClientConfig>,
    /// Sent as SNI and verified against the certificate.
    pub server_name: ServerName<'static>,
}

/// Builds the upstream TLS settings of a listener: its `upstream_tls` table if given, the
/// defaults (bundled webpki roots, SNI = upstream host) otherwise.
pub fn upstream_tls(listener: &ListenerConfig, host: &str) -> Result<UpstreamTls, ClientTlsError> {
    let fail = |reason: String| ClientTlsError::Build {
        listener: listener.name.clone(),
        reason,
    };
    let tls = listener.upstream_tls.as_ref();
    let name = tls
        .and_then(|t| t.server_name.as_deref())
        .unwrap_or(host)
        .to_owned();
    let server_name =
        ServerName::try_from(name).map_err(|_| fail("invalid upstream server name".into()))?;
    let config = client_config(listener, tls).map_err(fail)?;
    Ok(UpstreamTls {
        config,
        server_name,
    })
}

pub fn client_config(
    listener: &ListenerConfig,
    tls: Option<&UpstreamTlsConfig>,
) -> Result<Arc<ClientConfig>, String> {
    let roots = match tls.map_or(&Roots::Webpki, |t| &t.roots) {
        Roots::Webpki => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                return Err("no usable certificate in the system root store".into());
            }
            store
        }
        Roots::Ca { certs, .. } => {
            let mut store = RootCertStore::empty();
            for cert in certs {
                store.add(cert.clone()).map_err(|e| format!("ca: {e}"))?;
            }
            store
        }
    };
    let min_version = tls
        .and_then(|t| t.min_tls_version)
        .unwrap_or(listener.settings.min_tls_version);
    let builder = ClientConfig::builder_with_provider(super::provider())
        .with_protocol_versions(min_version.versions())
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match tls.and_then(|t| t.client_cert.as_ref()) {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| format!("client_cert: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    let configured = tls.map(|t| t.alpn.as_slice()).unwrap_or_default();
    config.alpn_protocols = if !configured.is_empty() {
        configured.iter().map(|p| p.as_bytes().to_vec()).collect()
    } else if listener.protocol == Protocol::Http {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        Vec::new()
    };
    Ok(Arc::new(config))
}
