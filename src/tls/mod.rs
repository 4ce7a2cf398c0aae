//! TLS on both legs: rustls with the aws-lc-rs provider, and nothing else.
//!
//! - [`server`] builds the `ServerConfig` of a terminate listener (certificates chosen by SNI,
//!   client authentication, version floor, session tickets).
//! - [`client`] builds the `ClientConfig` for re-originated TLS (roots, version floor, ALPN,
//!   client certificates). There is no code path that skips certificate verification.
//! - [`hello`] reads a ClientHello that is relayed, not terminated (transparent listeners).
//! - [`pem`] loads certificates and keys from PEM files.
//! - [`records`] watches the framing of TLS that is relayed (transparent listeners).
//! - [`stream`] runs a terminate listener's handshake and carries its traffic.
//! - [`hkdf`] gives TLS 1.3's key schedule HMAC keys that are prepared once per secret.
//!
//! No config built here ever sets a key log: `SSLKEYLOGFILE` is ignored by construction.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::{NamedGroup, ProtocolVersion};

use crate::metrics::{KxGroup, TlsVersion};

pub mod client;
pub mod hello;
mod hkdf;
pub mod pem;
pub mod records;
pub mod server;
pub mod stream;

/// The one crypto provider every config is built with: aws-lc-rs, whose default key-exchange
/// preference puts the hybrid post-quantum X25519MLKEM768 first; its TLS 1.3 suites derive
/// keys with [`hkdf`]'s prepared HMAC keys.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            Arc::new(hkdf::with_prepared_hmac(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
        })
        .clone()
}

/// The lowest TLS version a listener or upstream accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MinTlsVersion {
    Tls12,
    Tls13,
}

impl MinTlsVersion {
    pub fn versions(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        static BOTH: &[&rustls::SupportedProtocolVersion] =
            &[&rustls::version::TLS13, &rustls::version::TLS12];
        static ONLY_13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        match self {
            MinTlsVersion::Tls12 => BOTH,
            MinTlsVersion::Tls13 => ONLY_13,
        }
    }
}

/// The metric labels of a negotiated session.
pub fn session_labels(
    version: Option<ProtocolVersion>,
    group: Option<NamedGroup>,
) -> (TlsVersion, KxGroup) {
    let version = match version {
        Some(ProtocolVersion::TLSv1_2) => TlsVersion::Tls12,
        _ => TlsVersion::Tls13,
    };
    let group = match group {
        Some(NamedGroup::X25519MLKEM768) => KxGroup::X25519Mlkem768,
        Some(NamedGroup::X25519) => KxGroup::X25519,
        Some(NamedGroup::secp256r1) => KxGroup::Secp256r1,
        Some(NamedGroup::secp384r1) => KxGroup::Secp384r1,
        _ => KxGroup::Other,
    };
    (version, group)
}
