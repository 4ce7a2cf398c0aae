//! TLS policy on the downstream leg: client authentication, resumption, version floors,
//! post-quantum key exchange, RSA and ECDSA certificates, intermediates, the expiry metric.

mod common;

use std::sync::Arc;

use common::*;
use http::StatusCode;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, HandshakeKind, RootCertStore};
use tokio::net::TcpStream;

fn roots(pem: &str) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    roots
}

/// A client config with a session cache (the default), optionally a client certificate, and
/// a chosen protocol-version set and key-exchange groups.
fn client(
    ca_pem: &str,
    cert: Option<&Issued>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    groups: Option<&[&'static dyn rustls::crypto::SupportedKxGroup]>,
) -> Arc<ClientConfig> {
    let mut provider = (*ciphergate::tls::provider()).clone();
    if let Some(groups) = groups {
        provider.kx_groups = groups.to_vec();
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots(ca_pem));
    let mut config = match cert {
        Some(issued) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = Resumption::in_memory_sessions(64);
    Arc::new(config)
}

const BOTH: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Connects, sends one request, and returns the status (or the error) and how the handshake went.
async fn request(
    addr: std::net::SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<(StatusCode, Option<HandshakeKind>), String> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tls_connect(tcp, config, "localhost")
        .await
        .map_err(|e| e.to_string())?;
    let kind = tls.get_ref().1.handshake_kind();
    let mut h1 = H1::new(tls).await;
    // With TLS 1.3 a refused client certificate shows at the first read, not the handshake.
    let (status, _, _) = h1.get("localhost", "/").await.map_err(|e| e.to_string())?;
    Ok((status, kind))
}

fn listener(ws: &Workspace, name: &str, up: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "\n[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nupstream = \"{up}\"\n{extra}{}",
        ws.certs_table()
    )
}

#[tokio::test]
async fn client_certificates_are_required_and_resumption_cannot_skip_the_check() {
    let ws = Workspace::new();
    let (up, seen) = http_upstream().await;
    let auth = format!(
        "  [listener.client_auth]\n  ca = \"{}\"\n  mode = \"required\"\n",
        ws.p("ca.crt")
    );
    let config = format!(
        "{}{}{}",
        preamble("info"),
        listener(&ws, "mtls", up, &auth),
        listener(&ws, "open", up, "")
    );
    let proxy = ProxyProcess::start(&ws.config(&config));
    let ca = ws.ca_pem();
    let valid = ws.ca.issue_client("good client").unwrap();
    let stranger = Authority::new("stranger").unwrap();
    let foreign = stranger.issue_client("foreign client").unwrap();

    assert!(
        request(proxy.addr("mtls"), client(&ca, None, BOTH, None))
            .await
            .is_err()
    );
    assert!(
        request(proxy.addr("mtls"), client(&ca, Some(&foreign), BOTH, None))
            .await
            .is_err()
    );
    assert_eq!(seen.connections(), 0);

    // With a valid certificate: served, and every connection is a full handshake, because a
    // listener that requires client certificates issues no session tickets.
    let config = client(&ca, Some(&valid), BOTH, None);
    for _ in 0..2 {
        let (status, kind) = request(proxy.addr("mtls"), config.clone()).await.unwrap();
        assert_eq!((status, kind), (StatusCode::OK, Some(HandshakeKind::Full)));
    }
    // Elsewhere resumption is on: the second connection resumes.
    let config = client(&ca, None, BOTH, None);
    let (_, first) = request(proxy.addr("open"), config.clone()).await.unwrap();
    let (_, second) = request(proxy.addr("open"), config).await.unwrap();
    assert_eq!(
        (first, second),
        (Some(HandshakeKind::Full), Some(HandshakeKind::Resumed))
    );

    let m = proxy.metrics().await;
    let failed = m.get(
        "ciphergate_tls_handshakes_total",
        &[
            ("listener", "mtls"),
            ("leg", "downstream"),
            ("outcome", "failed"),
        ],
    );
    assert_eq!(failed, 2.0);
}

#[tokio::test]
async fn version_floors_and_key_exchange_groups_are_enforced_and_counted() {
    let ws = Workspace::new();
    let (up, _) = http_upstream().await;
    let config = format!(
        "{}{}{}",
        preamble("info"),
        listener(&ws, "modern", up, "min_tls_version = \"1.3\"\n"),
        listener(&ws, "intermediate", up, "")
    );
    let proxy = ProxyProcess::start(&ws.config(&config));
    let ca = ws.ca_pem();
    let tls12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    let x25519_only: &[&dyn rustls::crypto::SupportedKxGroup] =
        &[rustls::crypto::aws_lc_rs::kx_group::X25519];

    assert!(
        request(proxy.addr("modern"), client(&ca, None, tls12, None))
            .await
            .is_err()
    );
    assert!(
        request(proxy.addr("modern"), client(&ca, None, BOTH, None))
            .await
            .is_ok()
    );
    assert!(
        request(
            proxy.addr("modern"),
            client(&ca, None, BOTH, Some(x25519_only))
        )
        .await
        .is_ok()
    );
    assert!(
        request(proxy.addr("intermediate"), client(&ca, None, tls12, None))
            .await
            .is_ok()
    );

    let m = proxy.metrics().await;
    let sessions = |listener, version, group| {
        m.get(
            "ciphergate_tls_sessions_total",
            &[
                ("listener", listener),
                ("leg", "downstream"),
                ("version", version),
                ("group", group),
            ],
        )
    };
    // The hybrid post-quantum group is preferred whenever the client offers it.
    assert_eq!(sessions("modern", "tls1_3", "x25519mlkem768"), 1.0);
    assert_eq!(sessions("modern", "tls1_3", "x25519"), 1.0);
    assert_eq!(sessions("intermediate", "tls1_2", "x25519"), 1.0);
    assert_eq!(
        m.get(
            "ciphergate_tls_handshakes_total",
            &[
                ("listener", "modern"),
                ("leg", "downstream"),
                ("outcome", "failed")
            ]
        ),
        1.0
    );
}

#[tokio::test]
async fn rsa_and_ecdsa_certificates_with_intermediates_and_their_expiry() {
    let ws = Workspace::new();
    // root -> intermediate -> RSA leaf; the file holds leaf + intermediate.
    let root_key = KeyPair::generate().unwrap();
    let mut root_params = CertificateParams::default();
    root_params
        .distinguished_name
        .push(DnType::CommonName, "chain test root");
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let root = CertifiedIssuer::self_signed(root_params, root_key).unwrap();
    let mut mid_params = CertificateParams::default();
    mid_params
        .distinguished_name
        .push(DnType::CommonName, "chain test intermediate");
    mid_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    mid_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let mid = CertifiedIssuer::signed_by(mid_params, KeyPair::generate().unwrap(), &root).unwrap();
    let rsa_key =
        KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
    let mut leaf_params = CertificateParams::new(vec!["rsa.chain.test".to_owned()]).unwrap();
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "rsa.chain.test");
    let not_after = time::OffsetDateTime::now_utc() + time::Duration::days(30);
    leaf_params.not_after = not_after;
    let leaf = leaf_params.signed_by(&rsa_key, &mid).unwrap();
    ws.write("rsa.crt", &format!("{}{}", leaf.pem(), mid.pem()));
    ws.write("rsa.key", &rsa_key.serialize_pem());

    let (up, _) = http_upstream().await;
    let certs = format!(
        "  [[listener.certs]]\n  cert = \"{}\"\n  key = \"{}\"\n",
        ws.p("rsa.crt"),
        ws.p("rsa.key")
    );
    let config = format!("{}{}", preamble("info"), listener(&ws, "mixed", up, &certs));
    let proxy = ProxyProcess::start(&ws.config(&config));

    // A client that trusts only the root verifies the RSA leaf through the served intermediate.
    let tcp = TcpStream::connect(proxy.addr("mixed")).await.unwrap();
    let tls = tls_connect(
        tcp,
        client_tls(&root.pem(), &["http/1.1"]),
        "rsa.chain.test",
    )
    .await
    .unwrap();
    assert_eq!(tls.get_ref().1.peer_certificates().unwrap().len(), 2);
    // The ECDSA certificate is chosen for its own name.
    let (status, _, _) = get_tls(proxy.addr("mixed"), &ws.ca_pem(), "localhost", "/").await;
    assert_eq!(status, StatusCode::OK);

    let m = proxy.metrics().await;
    let expiry = m.get(
        "ciphergate_certificate_expiry_timestamp_seconds",
        &[("listener", "mixed"), ("cert", "0")],
    );
    assert_eq!(expiry, not_after.unix_timestamp() as f64);
    assert!(
        m.get(
            "ciphergate_certificate_expiry_timestamp_seconds",
            &[("listener", "mixed"), ("cert", "1")]
        ) > expiry
    );
}

#[tokio::test]
async fn a_client_certificate_can_be_required_for_some_paths_only() {
    let ws = Workspace::new();
    let (up, seen) = http_upstream().await;
    let extra = format!(
        "  [listener.client_auth]\n  ca = \"{}\"\n  mode = \"optional\"\n\n[[rule]]\nname = \"admin-needs-cert\"\npath_prefix = [\"/admin\"]\nclient_verified = false\naction = \"reject\"\n",
        ws.p("ca.crt")
    );
    // The rule goes after the listener's tables.
    let config = format!(
        "{}[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nupstream = \"{up}\"\n{}{extra}",
        preamble("info"),
        ws.certs_table()
    );
    let proxy = ProxyProcess::start(&ws.config(&config));
    let ca = ws.ca_pem();
    let valid = ws.ca.issue_client("operator").unwrap();
    let addr = proxy.addr("web");
    let get = |config: Arc<ClientConfig>, path: &'static str| async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = tls_connect(tcp, config, "localhost").await.unwrap();
        H1::new(tls).await.get("localhost", path).await.unwrap().0
    };
    let anonymous = client(&ca, None, BOTH, None);
    let operator = client(&ca, Some(&valid), BOTH, None);
    assert_eq!(get(anonymous.clone(), "/").await, StatusCode::OK);
    assert_eq!(get(anonymous, "/admin/users").await, StatusCode::FORBIDDEN);
    assert_eq!(get(operator, "/admin/users").await, StatusCode::OK);
    assert_eq!(seen.paths(), ["/", "/admin/users"]);
}
