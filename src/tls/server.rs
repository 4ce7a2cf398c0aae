//! The `ServerConfig` of a terminate listener.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};

use crate::config::{ClientAuthMode, ListenerConfig, Protocol};
use crate::policy::NamePattern;

/// Why a server config could not be built. Carries config-derived text only.
#[derive(Debug, thiserror::Error)]
pub enum ServerTlsError {
    #[error("listener {listener}: {reason}")]
    Build { listener: String, reason: String },
}

/// Pairs a chain with its key, checking that the key belongs to the leaf certificate.
pub fn certified_key(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, String> {
    let provider = super::provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| format!("unusable private key: {e}"))?;
    let certified = CertifiedKey::new(chain.to_vec(), signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(certified))
        }
        Err(_) => Err("the private key does not match the certificate".into()),
    }
}

/// Builds the listener's TLS config: its certificates chosen by SNI, its version floor, client
/// authentication when configured, and ALPN `h2`/`http/1.1`/`http/1.0` on http listeners.
pub fn server_config(listener: &ListenerConfig) -> Result<Arc<ServerConfig>, ServerTlsError> {
    let fail = |reason: String| ServerTlsError::Build {
        listener: listener.name.clone(),
        reason,
    };
    let mut entries = Vec::with_capacity(listener.certs.len());
    for cert in &listener.certs {
        let key = certified_key(&cert.chain, &cert.key).map_err(fail)?;
        entries.push((cert.server_names.clone(), key));
    }
    if entries.is_empty() {
        return Err(fail("no certificate".into()));
    }

    let builder = ServerConfig::builder_with_provider(super::provider())
        .with_protocol_versions(listener.settings.min_tls_version.versions())
        .map_err(|e| fail(e.to_string()))?;
    let require_client_cert = listener
        .client_auth
        .as_ref()
        .is_some_and(|auth| auth.mode == ClientAuthMode::Required);
    let builder = match &listener.client_auth {
        None => builder.with_no_client_auth(),
        Some(auth) => {
            let mut roots = RootCertStore::empty();
            for cert in &auth.roots {
                roots
                    .add(cert.clone())
                    .map_err(|e| fail(format!("client_auth.ca: {e}")))?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), super::provider());
            let verifier = match auth.mode {
                ClientAuthMode::Required => verifier,
                ClientAuthMode::Optional => verifier.allow_unauthenticated(),
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| fail(e.to_string()))?)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(SniResolver { entries }));
    config.ignore_client_order = true;
    if listener.protocol == Protocol::Http {
        // `http/1.0` too: `curl --http1.0` offers only that, and a server that knows none of a
        // client's protocols must refuse the handshake.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()];
    }
    if require_client_cert {
        // A resumed session must never stand in for a certificate check.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    } else {
        config.ticketer =
            rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| fail(e.to_string()))?;
    }
    Ok(Arc::new(config))
}

/// Picks a certificate by SNI: the first whose names match, else the first certificate.
#[derive(Debug)]
struct SniResolver {
    entries: Vec<(Vec<NamePattern>, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello.server_name().and_then(|sni| {
            let sni = sni.to_ascii_lowercase();
            self.entries
                .iter()
                .find(|(names, _)| names.iter().any(|p| p.matches(&sni)))
        });
        chosen.or(self.entries.first()).map(|(_, key)| key.clone())
    }
}
