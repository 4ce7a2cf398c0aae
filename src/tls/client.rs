//! The `ClientConfig` for re-originated TLS. Verification always runs against a root store;
//! there is no setting, and no code path, that turns it off.

use std::sync::Arc;

use aws_lc_rs::digest;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};

use crate::config::{ListenerConfig, Protocol, Roots, UpstreamTlsConfig};
use crate::policy::Mode;

#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error("listener {listener}: upstream_tls: {reason}")]
    Build { listener: String, reason: String },
}

/// A digest of everything a [`ClientConfig`] was built from (roots, client certificate and
/// key, versions, ALPN). Two equal fingerprints mean a connection made under one config is as
/// good as one made under the other, so a reload can keep the connections already open.
pub type Fingerprint = [u8; 32];

/// A built client config and its [`Fingerprint`].
#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    pub fingerprint: Fingerprint,
}

/// What a connector needs to speak TLS to the upstream.
#[derive(Clone)]
pub struct UpstreamTls {
    pub client: ClientTls,
    /// Sent as SNI and verified against the certificate.
    pub server_name: ServerName<'static>,
}

impl UpstreamTls {
    /// Whether connections made with `self` may be used where `other` is configured.
    pub fn same_as(&self, other: &UpstreamTls) -> bool {
        self.server_name == other.server_name && self.client.fingerprint == other.client.fingerprint
    }
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
    let client = client_config(listener, tls).map_err(fail)?;
    Ok(UpstreamTls {
        client,
        server_name,
    })
}

pub fn client_config(
    listener: &ListenerConfig,
    tls: Option<&UpstreamTlsConfig>,
) -> Result<ClientTls, String> {
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
    let client_cert = tls.and_then(|t| t.client_cert.as_ref());
    let configured = tls.map(|t| t.alpn.as_slice()).unwrap_or_default();
    let alpn = if !configured.is_empty() {
        configured.iter().map(|p| p.as_bytes().to_vec()).collect()
    } else if listener.mode == Mode::Transparent {
        // The app's HTTP/1.x, one upstream connection per app connection: HTTP/2 would win
        // nothing, and would drop the Upgrade a WebSocket needs.
        vec![b"http/1.1".to_vec()]
    } else if listener.protocol == Protocol::Http {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        Vec::new()
    };

    let mut digest = digest::Context::new(&digest::SHA256);
    let mut field = |bytes: &[u8]| {
        digest.update(&(bytes.len() as u64).to_be_bytes());
        digest.update(bytes);
    };
    for root in roots.roots.iter() {
        field(&root.subject);
        field(&root.subject_public_key_info);
    }
    field(&[min_version as u8]);
    if let Some((chain, key)) = client_cert {
        for cert in chain {
            field(cert);
        }
        field(key.secret_der());
    }
    for protocol in &alpn {
        field(protocol);
    }
    let fingerprint = digest
        .finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes");

    let builder = ClientConfig::builder_with_provider(super::provider())
        .with_protocol_versions(min_version.versions())
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match client_cert {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| format!("client_cert: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn;
    Ok(ClientTls {
        config: Arc::new(config),
        fingerprint,
    })
}
