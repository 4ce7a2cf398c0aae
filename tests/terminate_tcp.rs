//! Terminate listeners with `protocol = "tcp"`: TLS relayed as bytes, plaintext closed without
//! forwarding a byte unless a narrowed rule allows it, and refusals before the handshake ends.

mod common;

use std::net::IpAddr;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn tcp_listener(ws: &Workspace, upstream: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "{}[[listener]]\nname = \"db\"\nbind = \"127.0.0.1:0\"\nmode = \"terminate\"\nprotocol = \"tcp\"\nupstream = \"{upstream}\"\n{}{extra}",
        preamble("info"),
        ws.certs_table(),
    )
}

async fn echo_through<S>(stream: &mut S, message: &[u8]) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(message).await.unwrap();
    let mut buf = vec![0u8; message.len()];
    stream.read_exact(&mut buf).await.unwrap();
    buf
}

#[tokio::test]
async fn tls_is_relayed_and_plaintext_is_closed_untouched() {
    let ws = Workspace::new();
    let (up, seen) = echo_upstream().await;
    let proxy = ProxyProcess::start(&ws.config(&tcp_listener(&ws, up, "")));
    let addr = proxy.addr("db");

    // Plaintext first: closed, and the upstream never hears of it.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    let answer = exchange_raw(&mut plain, b"SELECT secret FROM users;\n").await;
    assert!(answer.is_empty());
    assert_eq!(seen.connections(), 0);

    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = tls_connect(tcp, client_tls(&ws.ca_pem(), &[]), "localhost")
        .await
        .unwrap();
    assert_eq!(
        echo_through(&mut tls, b"hello over tls").await,
        b"hello over tls"
    );
    assert_eq!(echo_through(&mut tls, b"and again").await, b"and again");
    drop(tls);
    assert_eq!(seen.connections(), 1);
    assert_eq!(seen.bytes(), 23);

    let m = proxy.metrics().await;
    let l = ("listener", "db");
    assert_eq!(
        m.get("ciphergate_connections_total", &[l, ("transport", "tls")]),
        1.0
    );
    assert_eq!(
        m.get(
            "ciphergate_connections_total",
            &[l, ("transport", "plaintext")]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[l, ("rule", "default"), ("action", "allow")]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[l, ("rule", "default"), ("action", "reject")]
        ),
        1.0
    );
    // The plaintext bytes arrived at ciphergate (counted in) but nothing went back.
    assert!(m.get("ciphergate_bytes_total", &[l, ("direction", "in")]) >= 26.0);
}

#[tokio::test]
async fn a_source_exception_allows_plaintext_from_one_address_only() {
    let ws = Workspace::new();
    let (up, seen) = echo_upstream().await;
    let rule = "\n[[rule]]\nname = \"legacy-client\"\ntransport = \"plaintext\"\nsource = [\"127.0.0.5/32\"]\naction = \"allow\"\n";
    let proxy = ProxyProcess::start(&ws.config(&tcp_listener(&ws, up, rule)));
    let addr = proxy.addr("db");

    let allowed: IpAddr = "127.0.0.5".parse().unwrap();
    let mut stream = connect_from(allowed, addr).await;
    assert_eq!(
        echo_through(&mut stream, b"legacy bytes").await,
        b"legacy bytes"
    );
    drop(stream);

    let other: IpAddr = "127.0.0.6".parse().unwrap();
    let mut stream = connect_from(other, addr).await;
    assert!(exchange_raw(&mut stream, b"not me").await.is_empty());

    assert_eq!(seen.connections(), 1);
    assert_eq!(seen.bytes(), 12);
    let m = proxy.metrics().await;
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[
                ("listener", "db"),
                ("rule", "legacy-client"),
                ("action", "allow")
            ]
        ),
        1.0
    );
}

#[tokio::test]
async fn a_rejected_tls_connection_is_closed_before_the_handshake_completes() {
    let ws = Workspace::new();
    let wildcard = ws
        .ca
        .issue_server(&["*.internal.test".into(), "localhost".into()])
        .unwrap();
    ws.write_issued("server", &wildcard);
    let (up, seen) = echo_upstream().await;
    let rule = "\n[[rule]]\nname = \"no-legacy-name\"\nserver_name = [\"legacy.internal.test\"]\naction = \"reject\"\n";
    let proxy = ProxyProcess::start(&ws.config(&tcp_listener(&ws, up, rule)));
    let addr = proxy.addr("db");

    let tcp = TcpStream::connect(addr).await.unwrap();
    let refused = tls_connect(tcp, client_tls(&ws.ca_pem(), &[]), "legacy.internal.test").await;
    assert!(refused.is_err(), "the handshake completed");

    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = tls_connect(tcp, client_tls(&ws.ca_pem(), &[]), "current.internal.test")
        .await
        .unwrap();
    assert_eq!(echo_through(&mut tls, b"ok").await, b"ok");

    assert_eq!(seen.connections(), 1);
    let m = proxy.metrics().await;
    let l = ("listener", "db");
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[l, ("rule", "no-legacy-name"), ("action", "reject")]
        ),
        1.0
    );
    // Refused before the handshake: only the allowed connection completed one.
    assert_eq!(
        m.get(
            "ciphergate_tls_handshakes_total",
            &[l, ("leg", "downstream"), ("outcome", "ok")]
        ),
        1.0
    );
}

#[tokio::test]
async fn client_verified_rules_decide_after_the_handshake() {
    let ws = Workspace::new();
    let client = ws.ca.issue_client("test client").unwrap();
    let (up, seen) = echo_upstream().await;
    let extra = format!(
        "  [listener.client_auth]\n  ca = \"{}\"\n  mode = \"optional\"\n\n[[rule]]\nname = \"need-client-cert\"\nclient_verified = false\naction = \"reject\"\n",
        ws.p("ca.crt")
    );
    let proxy = ProxyProcess::start(&ws.config(&tcp_listener(&ws, up, &extra)));
    let addr = proxy.addr("db");

    // Without a certificate the handshake completes (optional), then the rule closes it.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut anonymous = tls_connect(tcp, client_tls(&ws.ca_pem(), &[]), "localhost")
        .await
        .unwrap();
    let _ = anonymous.write_all(b"let me in").await;
    let mut buf = [0u8; 16];
    let n = anonymous.read(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0, "an anonymous client was relayed");

    // With one, relayed.
    use rustls::pki_types::pem::PemObject;
    let chain = vec![
        rustls::pki_types::CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).unwrap(),
    ];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ws.ca_pem().as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(ciphergate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut verified = tls_connect(tcp, std::sync::Arc::new(config), "localhost")
        .await
        .unwrap();
    assert_eq!(
        echo_through(&mut verified, b"with a cert").await,
        b"with a cert"
    );
    assert_eq!(seen.connections(), 1);
    assert_eq!(seen.bytes(), 11);
}
