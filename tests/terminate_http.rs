//! Terminate listeners with `protocol = "http"`: TLS served, plaintext decided by policy,
//! per-request decisions, upgrades relayed, certificates by SNI. Real sockets, the real binary,
//! real clients (rustls + hyper, curl, openssl).

mod common;

use std::process::Command;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode, Version};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn ingress(ws: &Workspace, upstream: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "{}[[listener]]\nname = \"ingress\"\nbind = \"127.0.0.1:0\"\nmode = \"terminate\"\nprotocol = \"http\"\nupstream = \"{upstream}\"\n{}{extra}",
        preamble("info"),
        ws.certs_table(),
    )
}

#[tokio::test]
async fn tls_is_served_with_hsts_over_http1_and_h2() {
    let ws = Workspace::new();
    let (up, seen) = http_upstream().await;
    let proxy = ProxyProcess::start(&ws.config(&ingress(&ws, up, "")));
    let addr = proxy.addr("ingress");

    let (status, headers, body) = get_tls(addr, &ws.ca_pem(), "localhost", "/hello?x=1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "upstream saw /hello?x=1");
    assert_eq!(headers["strict-transport-security"], "max-age=31536000");
    assert_eq!(headers["x-upstream"], "yes");

    let (status, headers, body) = get_h2(addr, &ws.ca_pem(), "localhost", "/over-h2").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "upstream saw /over-h2");
    assert_eq!(headers["strict-transport-security"], "max-age=31536000");

    // curl, the way users try it: HTTP/1.1 and HTTP/2.
    let url = format!("https://localhost:{}/from-curl", addr.port());
    let resolve = format!("localhost:{}:127.0.0.1", addr.port());
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let mut curl = Command::new("curl");
        curl.args([
            "-sS",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-w",
            "version=%{http_version}\n",
        ])
        .arg(flag)
        .args(["--cacert", &ws.p("ca.crt"), "--resolve", &resolve, &url]);
        let (code, out, err) = run_async(curl).await;
        assert_eq!(code, 0, "curl {flag} failed: {err}");
        assert!(out.contains(" 200"), "{out}");
        assert!(
            out.to_ascii_lowercase()
                .contains("strict-transport-security: max-age=31536000"),
            "{out}"
        );
        assert!(out.contains(&format!("version={version}")), "{out}");
    }

    let requests = seen.requests();
    assert_eq!(requests.len(), 4);
    for r in &requests {
        assert_eq!(r.headers["x-forwarded-proto"], "https");
        assert!(r.headers.contains_key("host"));
    }
    // The upstream connections are pooled: four requests, fewer connections.
    assert!(
        seen.connections() < 4,
        "{} upstream connections",
        seen.connections()
    );

    let m = proxy.metrics().await;
    let l = ("listener", "ingress");
    assert_eq!(
        m.get("ciphergate_connections_total", &[l, ("transport", "tls")]),
        4.0
    );
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[l, ("rule", "default"), ("action", "allow")]
        ),
        4.0
    );
    assert_eq!(
        m.get("ciphergate_http_responses_total", &[l, ("class", "2xx")]),
        4.0
    );
    assert_eq!(
        m.get(
            "ciphergate_tls_handshakes_total",
            &[l, ("leg", "downstream"), ("outcome", "ok")]
        ),
        4.0
    );
    let group = |g| {
        m.get(
            "ciphergate_tls_sessions_total",
            &[
                l,
                ("leg", "downstream"),
                ("version", "tls1_3"),
                ("group", g),
            ],
        )
    };
    // rustls clients negotiate the hybrid post-quantum group; curl's OpenSSL 3.0 X25519.
    assert_eq!(group("x25519mlkem768"), 2.0);
    assert_eq!(group("x25519"), 2.0);
    assert!(m.get("ciphergate_bytes_total", &[l, ("direction", "in")]) > 0.0);
    assert!(m.get("ciphergate_bytes_total", &[l, ("direction", "out")]) > 0.0);
}

#[tokio::test]
async fn plaintext_is_rejected_with_426_and_nothing_reaches_the_upstream() {
    let ws = Workspace::new();
    let (up, seen) = http_upstream().await;
    let proxy = ProxyProcess::start(&ws.config(&ingress(&ws, up, "")));
    let addr = proxy.addr("ingress");

    let mut h1 = H1::new(TcpStream::connect(addr).await.unwrap()).await;
    let req = Request::post("/account")
        .header("host", "localhost")
        .body(Full::new(Bytes::from_static(b"password=hunter2")))
        .unwrap();
    let (status, headers, body) = h1.send(req).await.unwrap();
    assert_eq!(status, StatusCode::UPGRADE_REQUIRED);
    assert_eq!(headers["connection"], "close");
    assert!(!body.is_empty());
    assert!(!headers.contains_key("strict-transport-security"));

    let mut curl = Command::new("curl");
    curl.args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://127.0.0.1:{}/", addr.port()));
    let (code, out, _) = run_async(curl).await;
    assert_eq!((code, out.as_str()), (0, "426"));

    assert_eq!(seen.connections(), 0, "the upstream was contacted");
    let m = proxy.metrics().await;
    let l = ("listener", "ingress");
    assert_eq!(
        m.get(
            "ciphergate_connections_total",
            &[l, ("transport", "plaintext")]
        ),
        2.0
    );
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[l, ("rule", "default"), ("action", "reject")]
        ),
        2.0
    );
    assert_eq!(
        m.get("ciphergate_http_responses_total", &[l, ("class", "4xx")]),
        2.0
    );
}

#[tokio::test]
async fn upgrade_rule_redirects_with_the_exact_location() {
    let ws = Workspace::new();
    let (up, seen) = http_upstream().await;
    let mut config = ingress(
        &ws,
        up,
        "\n[[rule]]\nname = \"web-upgrade\"\ntransport = \"plaintext\"\nserver_name = [\"www.example.test\", \"*.apps.example.test\"]\naction = \"upgrade\"\n",
    );
    config.push_str(&format!(
        "\n[[listener]]\nname = \"std-port\"\nbind = \"127.0.0.1:0\"\nupstream = \"{up}\"\nredirect_port = 443\n{}",
        ws.certs_table()
    ));
    let proxy = ProxyProcess::start(&ws.config(&config));

    for (listener, host, path, location) in [
        (
            "ingress",
            "www.example.test:8080",
            "/a/b?c=d",
            format!("https://www.example.test:{}/a/b?c=d", proxy.port("ingress")),
        ),
        (
            "ingress",
            "App1.Apps.Example.Test",
            "/",
            format!("https://app1.apps.example.test:{}/", proxy.port("ingress")),
        ),
        (
            "std-port",
            "www.example.test",
            "/login",
            "https://www.example.test/login".to_owned(),
        ),
    ] {
        let mut h1 = H1::new(TcpStream::connect(proxy.addr(listener)).await.unwrap()).await;
        let (status, headers, _) = h1.get(host, path).await.unwrap();
        assert_eq!(status, StatusCode::PERMANENT_REDIRECT, "{host}{path}");
        assert_eq!(headers["location"], location.as_str());
    }
    // A name the rule does not cover is rejected, not redirected.
    let mut h1 = H1::new(TcpStream::connect(proxy.addr("ingress")).await.unwrap()).await;
    let (status, _, _) = h1.get("a.b.apps.example.test", "/").await.unwrap();
    assert_eq!(status, StatusCode::UPGRADE_REQUIRED);

    assert_eq!(seen.connections(), 0);
    let m = proxy.metrics().await;
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[
                ("listener", "ingress"),
                ("rule", "web-upgrade"),
                ("action", "upgrade")
            ]
        ),
        2.0
    );
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[
                ("listener", "std-port"),
                ("rule", "web-upgrade"),
                ("action", "upgrade")
            ]
        ),
        1.0
    );
}

#[tokio::test]
async fn a_path_exception_is_decided_per_request_on_a_kept_alive_connection() {
    let ws = Workspace::new();
    let (up, seen) = http_upstream().await;
    let rule = "\n[[rule]]\nname = \"lb-healthcheck\"\ntransport = \"plaintext\"\nsource = [\"127.0.0.0/8\"]\npath_prefix = [\"/healthz\"]\naction = \"allow\"\n";
    let proxy = ProxyProcess::start(&ws.config(&ingress(&ws, up, rule)));
    let addr = proxy.addr("ingress");

    let mut h1 = H1::new(TcpStream::connect(addr).await.unwrap()).await;
    let (status, headers, body) = h1.get("localhost", "/healthz").await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "upstream saw /healthz")
    );
    assert!(!headers.contains_key("strict-transport-security"));
    let (status, _, _) = h1.get("localhost", "/healthz/live").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    // Same connection, a path outside the exception: refused, and the connection closes.
    let (status, headers, _) = h1.get("localhost", "/healthzz").await.unwrap();
    assert_eq!(status, StatusCode::UPGRADE_REQUIRED);
    assert_eq!(headers["connection"], "close");

    for sneaky in ["/healthz/../secret", "/healthz/%2e%2e/secret"] {
        let mut h1 = H1::new(TcpStream::connect(addr).await.unwrap()).await;
        let (status, _, _) = h1.get("localhost", sneaky).await.unwrap();
        assert_eq!(status, StatusCode::UPGRADE_REQUIRED, "{sneaky}");
    }
    // Paths servers are known to read differently (an encoded slash some decode, `..;` that
    // Tomcat treats as `..`) are refused outright where rules test paths.
    for ambiguous in [
        "/healthz/..%2Fsecret",
        "/healthz/..;/secret",
        "/healthz/..%5csecret",
    ] {
        let mut h1 = H1::new(TcpStream::connect(addr).await.unwrap()).await;
        let (status, _, _) = h1.get("localhost", ambiguous).await.unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{ambiguous}");
    }

    // Over TLS the upstream receives the normalised path the policy decided on.
    let (status, _, body) = get_tls(addr, &ws.ca_pem(), "localhost", "/a/./b/../c?q=1").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "upstream saw /a/c?q=1")
    );

    assert_eq!(seen.paths(), ["/healthz", "/healthz/live", "/a/c?q=1"]);
    let m = proxy.metrics().await;
    let l = ("listener", "ingress");
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[l, ("rule", "lb-healthcheck"), ("action", "allow")]
        ),
        2.0
    );
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[l, ("rule", "default"), ("action", "reject")]
        ),
        3.0
    );
}

#[tokio::test]
async fn rejected_tls_requests_get_403_and_audit_mode_counts_instead() {
    let ws = Workspace::new();
    let (up, seen) = http_upstream().await;
    let rules =
        "\n[[rule]]\nname = \"no-admin\"\npath_prefix = [\"/admin\"]\naction = \"reject\"\n";
    let mut config = ingress(&ws, up, rules);
    config.push_str(&format!(
        "\n[[listener]]\nname = \"audited\"\nbind = \"127.0.0.1:0\"\nupstream = \"{up}\"\nenforcement = \"audit\"\n{}",
        ws.certs_table()
    ));
    let proxy = ProxyProcess::start(&ws.config(&config));

    let (status, headers, _) = get_tls(
        proxy.addr("ingress"),
        &ws.ca_pem(),
        "localhost",
        "/admin/users",
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers["strict-transport-security"], "max-age=31536000");
    assert_eq!(seen.connections(), 0);

    // Audit: the same request, and a plaintext one, go through and are counted as audit.
    let (status, _, _) = get_tls(
        proxy.addr("audited"),
        &ws.ca_pem(),
        "localhost",
        "/admin/users",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let mut h1 = H1::new(TcpStream::connect(proxy.addr("audited")).await.unwrap()).await;
    let (status, _, _) = h1.get("localhost", "/plain").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seen.paths(), ["/admin/users", "/plain"]);

    let m = proxy.metrics().await;
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[
                ("listener", "ingress"),
                ("rule", "no-admin"),
                ("action", "reject")
            ]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[
                ("listener", "audited"),
                ("rule", "no-admin"),
                ("action", "audit")
            ]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[
                ("listener", "audited"),
                ("rule", "default"),
                ("action", "audit")
            ]
        ),
        1.0
    );
}

#[tokio::test]
async fn websocket_upgrades_are_relayed() {
    let ws = Workspace::new();
    let (up, seen) = http_upstream().await;
    let proxy = ProxyProcess::start(&ws.config(&ingress(&ws, up, "")));

    let tcp = TcpStream::connect(proxy.addr("ingress")).await.unwrap();
    let tls = tls_connect(tcp, client_tls(&ws.ca_pem(), &["http/1.1"]), "localhost")
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    let req = Request::get("/ws")
        .header("host", "localhost")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let upgraded = hyper::upgrade::on(response).await.unwrap();
    let mut io = TokioIo::new(upgraded);
    io.write_all(b"ping through the tunnel").await.unwrap();
    let mut buf = vec![0u8; 23];
    io.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping through the tunnel");
    let r = &seen.requests()[0];
    assert_eq!(r.headers["upgrade"], "websocket");
}

#[tokio::test]
async fn sni_chooses_between_certificates() {
    let ws = Workspace::new();
    let other = ws.ca.issue_server(&["api.other.test".into()]).unwrap();
    ws.write_issued("other", &other);
    let (up, _) = http_upstream().await;
    let config = format!(
        "{}[[listener]]\nname = \"ingress\"\nbind = \"127.0.0.1:0\"\nupstream = \"{up}\"\n{}  [[listener.certs]]\n  cert = \"{}\"\n  key = \"{}\"\n  server_names = [\"*.other.test\"]\n",
        preamble("info"),
        ws.certs_table(),
        ws.p("other.crt"),
        ws.p("other.key"),
    );
    let proxy = ProxyProcess::start(&ws.config(&config));
    let addr = proxy.addr("ingress");
    let leaf = |pem: &str| {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    };
    let server_leaf = leaf(&std::fs::read_to_string(ws.path("server.crt")).unwrap());
    let other_leaf = leaf(&other.cert_pem);

    for (sni, expected) in [
        ("api.other.test", &other_leaf),
        ("localhost", &server_leaf),
        // No SNI (an IP address is never sent as SNI): the first certificate.
        ("127.0.0.1", &server_leaf),
    ] {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = tls_connect(tcp, client_tls(&ws.ca_pem(), &["http/1.1"]), sni)
            .await
            .unwrap_or_else(|e| panic!("{sni}: {e}"));
        let presented = &tls.get_ref().1.peer_certificates().unwrap()[0];
        assert_eq!(presented, expected, "{sni}");
    }
}

#[tokio::test]
async fn openssl_s_client_sees_tls13_and_old_versions_are_refused() {
    let ws = Workspace::new();
    let (up, _) = http_upstream().await;
    let proxy = ProxyProcess::start(&ws.config(&ingress(&ws, up, "")));
    let connect = format!("127.0.0.1:{}", proxy.port("ingress"));

    let s_client = |extra: &[&str]| {
        let mut c = Command::new("openssl");
        c.args(["s_client", "-connect", &connect, "-servername", "localhost"])
            .args(["-CAfile", &ws.p("ca.crt"), "-brief"])
            .args(extra)
            .stdin(std::process::Stdio::null());
        c
    };
    let (_, out, err) = run_async(s_client(&[])).await;
    let text = format!("{out}{err}");
    assert!(text.contains("Protocol version: TLSv1.3"), "{text}");
    assert!(text.contains("Verification: OK"), "{text}");

    let (_, out, err) = run_async(s_client(&["-tls1_2"])).await;
    assert!(format!("{out}{err}").contains("Protocol version: TLSv1.2"));

    for old in ["-tls1", "-tls1_1"] {
        let (code, out, err) = run_async(s_client(&[old, "-cipher", "DEFAULT@SECLEVEL=0"])).await;
        let text = format!("{out}{err}");
        assert_ne!(code, 0, "{old} was accepted: {text}");
        assert!(!text.contains("Protocol version: TLSv1"), "{old}: {text}");
    }
    // A TLS 1.2 suite without forward secrecy, or a CBC one, is refused.
    for suite in [
        "AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-SHA",
        "ECDHE-ECDSA-AES128-SHA256",
    ] {
        let (code, _, _) = run_async(s_client(&["-tls1_2", "-cipher", suite])).await;
        assert_ne!(code, 0, "{suite} was accepted");
    }
}

#[tokio::test]
async fn an_upstream_tls_table_reoriginates_verified_tls_even_on_loopback() {
    let ws = Workspace::new();
    let (up, seen) = http_upstream().await;
    // A first ciphergate terminates TLS in front of the plain upstream; the listener under test
    // re-originates TLS to it and must verify its certificate.
    let front = format!(
        "{}[[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\nupstream = \"{up}\"\n{}",
        preamble("info"),
        ws.certs_table()
    );
    let front = ProxyProcess::start(&ws.write("front.toml", &front));
    let front_addr = front.addr("front");

    let stranger = Authority::new("a CA nobody trusts").unwrap();
    ws.write("stranger.crt", &stranger.cert_pem());
    let config = format!(
        "{}[[listener]]\nname = \"verified\"\nbind = \"127.0.0.1:0\"\nupstream = \"{front_addr}\"\n{}  [listener.upstream_tls]\n  ca = \"{}\"\n  server_name = \"localhost\"\n\n[[listener]]\nname = \"unverifiable\"\nbind = \"127.0.0.1:0\"\nupstream = \"{front_addr}\"\n{}  [listener.upstream_tls]\n  ca = \"{}\"\n  server_name = \"localhost\"\n",
        preamble("info"),
        ws.certs_table(),
        ws.p("ca.crt"),
        ws.certs_table(),
        ws.p("stranger.crt"),
    );
    let proxy = ProxyProcess::start(&ws.config(&config));

    let (status, _, body) = get_tls(
        proxy.addr("verified"),
        &ws.ca_pem(),
        "localhost",
        "/via-tls",
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "upstream saw /via-tls")
    );

    let (status, _, body) = get_tls(
        proxy.addr("unverifiable"),
        &ws.ca_pem(),
        "localhost",
        "/never",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(body.trim(), "upstream tls handshake failed");
    assert_eq!(seen.paths(), ["/via-tls"]);

    let m = proxy.metrics().await;
    let ok = m.get(
        "ciphergate_tls_handshakes_total",
        &[
            ("listener", "verified"),
            ("leg", "upstream"),
            ("outcome", "ok"),
        ],
    );
    assert_eq!(ok, 1.0);
    assert_eq!(
        m.get(
            "ciphergate_tls_handshakes_total",
            &[
                ("listener", "unverifiable"),
                ("leg", "upstream"),
                ("outcome", "failed")
            ]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "ciphergate_upstream_errors_total",
            &[("listener", "unverifiable"), ("reason", "tls")]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "ciphergate_http_responses_total",
            &[("listener", "unverifiable"), ("class", "5xx")]
        ),
        1.0
    );
}

#[tokio::test]
async fn an_unreachable_upstream_gets_502_and_is_counted() {
    let ws = Workspace::new();
    let (_dead_socket, dead) = refusing_addr();
    let proxy = ProxyProcess::start(&ws.config(&ingress(&ws, dead, "")));
    let (status, _, body) = get_tls(proxy.addr("ingress"), &ws.ca_pem(), "localhost", "/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(body.trim(), "upstream connect failed");
    let m = proxy.metrics().await;
    assert_eq!(
        m.get(
            "ciphergate_upstream_errors_total",
            &[("listener", "ingress"), ("reason", "connect")]
        ),
        1.0
    );
}

#[tokio::test]
async fn neither_a_host_nor_an_upgrade_can_be_smuggled_past_the_policy() {
    let ws = Workspace::new();
    let (up, seen) = http_upstream().await;
    let rule = "\n[[rule]]\nname = \"status-page\"\ntransport = \"plaintext\"\nserver_name = [\"status.example.test\"]\naction = \"allow\"\n";
    let proxy = ProxyProcess::start(&ws.config(&ingress(&ws, up, rule)));
    let addr = proxy.addr("ingress");
    let raw = |text: &'static str| async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        String::from_utf8_lossy(&exchange_raw(&mut stream, text.as_bytes()).await).into_owned()
    };

    // Absolute-form: the policy decides on the target's host, and that is the Host sent on.
    let answer = raw("GET http://status.example.test/admin HTTP/1.1\r\nHost: admin.example.test\r\nConnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Two Host headers: refused before any decision.
    let answer = raw("GET / HTTP/1.1\r\nHost: status.example.test\r\nHost: admin.example.test\r\nConnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // `Connection: host` cannot strip the Host the policy saw; an h2c upgrade is not relayed;
    // forwarding claims from the client are dropped.
    let answer = raw("GET /up HTTP/1.1\r\nHost: status.example.test\r\nConnection: close, host, Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nX-Forwarded-For: 203.0.113.9\r\nForwarded: for=203.0.113.9\r\nTE: trailers\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let requests = seen.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[0].headers["host"], "status.example.test");
    let up_req = &requests[1];
    assert_eq!(up_req.headers["host"], "status.example.test");
    for gone in [
        "upgrade",
        "http2-settings",
        "x-forwarded-for",
        "forwarded",
        "connection",
    ] {
        assert!(
            !up_req.headers.contains_key(gone),
            "{gone} reached the upstream"
        );
    }
    assert_eq!(up_req.headers["te"], "trailers");

    // Over TLS the policy decides by SNI; a request for another host on that connection is
    // misdirected.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tls_connect(tcp, client_tls(&ws.ca_pem(), &["http/1.1"]), "localhost")
        .await
        .unwrap();
    let (status, _, _) = H1::new(tls)
        .await
        .get("status.example.test", "/")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(seen.requests().len(), 2);
}

#[tokio::test]
async fn upstream_connections_outlive_clients_and_closed_ones_are_replaced() {
    let ws = Workspace::new();
    let (up, seen) = http_upstream().await;
    let proxy = ProxyProcess::start_with_env(
        &ws.config(&ingress(&ws, up, "")),
        &[("TOKIO_WORKER_THREADS", "2")],
    );
    let addr = proxy.addr("ingress");

    // Ten clients, one request each, one after another. Connections are dealt to the two
    // workers in turn and each worker keeps its own idle upstream connections: two serve all.
    for i in 0..10 {
        let (status, _, _) = get_tls(addr, &ws.ca_pem(), "localhost", &format!("/one/{i}")).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(seen.connections(), 2);

    // The app closes its side; the next request goes on a new connection, without an error.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tls_connect(tcp, client_tls(&ws.ca_pem(), &["http/1.1"]), "localhost")
        .await
        .unwrap();
    let mut h1 = H1::new(tls).await;
    for path in ["/close", "/after-close", "/close", "/after-close-again"] {
        let (status, _, body) = h1.get("localhost", path).await.unwrap();
        assert_eq!(
            (status, body),
            (StatusCode::OK, format!("upstream saw {path}"))
        );
    }
    // The first /close ends the worker's idle connection, the second the one opened after it.
    assert_eq!(seen.connections(), 4);
    let m = proxy.metrics().await;
    assert_eq!(
        m.get(
            "ciphergate_upstream_errors_total",
            &[("listener", "ingress"), ("reason", "protocol")]
        ),
        0.0
    );
}

#[tokio::test]
async fn ipv4_clients_of_a_dual_stack_listener_meet_ipv4_rules() {
    let ws = Workspace::new();
    let (up, seen) = http_upstream().await;
    let config = format!(
        "{}[[listener]]\nname = \"dual\"\nbind = \"[::]:0\"\nupstream = \"{up}\"\n{}\n[[rule]]\nname = \"no-loopback-v4\"\ntransport = \"tls\"\nsource = [\"127.0.0.0/8\"]\naction = \"reject\"\n",
        preamble("info"),
        ws.certs_table()
    );
    let proxy = ProxyProcess::start(&ws.config(&config));
    // The socket is bound to [::]; the client comes over IPv4, seen as ::ffff:127.0.0.1.
    let v4 = std::net::SocketAddr::from(([127, 0, 0, 1], proxy.port("dual")));
    let (status, _, _) = get_tls(v4, &ws.ca_pem(), "localhost", "/").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(seen.connections(), 0);
    let m = proxy.metrics().await;
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[
                ("listener", "dual"),
                ("rule", "no-loopback-v4"),
                ("action", "reject")
            ]
        ),
        1.0
    );
}

#[tokio::test]
async fn metrics_come_as_prometheus_text_or_openmetrics_on_request() {
    let ws = Workspace::new();
    let (up, _) = http_upstream().await;
    let proxy = ProxyProcess::start(&ws.config(&ingress(&ws, up, "")));
    let (status, headers, body) = get_plain(proxy.admin, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    assert!(
        body.contains("# TYPE ciphergate_connections_total counter"),
        "{body}"
    );
    assert!(
        body.contains("# TYPE ciphergate_connections_active gauge"),
        "{body}"
    );
    assert!(!body.contains("# EOF"));

    let tcp = TcpStream::connect(proxy.admin).await.unwrap();
    let req = Request::get("/metrics")
        .header("host", "localhost")
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        )
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (_, headers, body) = H1::new(tcp).await.send(req).await.unwrap();
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(
        body.contains("# TYPE ciphergate_connections counter"),
        "{body}"
    );
    assert!(body.trim_end().ends_with("# EOF"));
}

#[tokio::test]
async fn http10_requests_without_host_reach_the_app_as_http11_with_a_host() {
    let ws = Workspace::new();
    let (up, seen) = http_upstream().await;
    let proxy = ProxyProcess::start_with_env(
        &ws.config(&ingress(&ws, up, "")),
        &[("TOKIO_WORKER_THREADS", "1")],
    );
    let port = proxy.port("ingress");

    // curl --http1.0 with `-H Host:` sends `GET /old/N HTTP/1.0` and no Host at all.
    for round in 0..2 {
        let mut curl = Command::new("curl");
        curl.args([
            "-sS",
            "--http1.0",
            "-H",
            "Host:",
            "--cacert",
            &ws.p("ca.crt"),
        ])
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .arg(format!("https://localhost:{port}/old/{round}"));
        let (code, out, err) = run_async(curl).await;
        assert_eq!(code, 0, "curl failed: {err}");
        assert_eq!(out, format!("upstream saw /old/{round}"));
    }
    let requests = seen.requests();
    assert_eq!(requests.len(), 2);
    for req in &requests {
        // The name the client connected to (its SNI), on HTTP/1.1.
        assert_eq!(req.headers["host"], "localhost");
        assert_eq!(req.version, Version::HTTP_11);
    }
    // Both client connections used the same kept-alive upstream connection.
    assert_eq!(seen.connections(), 1);

    // HTTP/1.1 requires a Host; a request without one gets no made-up name.
    let mut curl = Command::new("curl");
    curl.args([
        "-sS",
        "--http1.1",
        "-H",
        "Host:",
        "--cacert",
        &ws.p("ca.crt"),
    ])
    .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
    .arg(format!("https://localhost:{port}/new"));
    let (code, _, err) = run_async(curl).await;
    assert_eq!(code, 0, "curl failed: {err}");
    let requests = seen.requests();
    assert_eq!(requests[2].path_and_query, "/new");
    assert!(!requests[2].headers.contains_key("host"));
}
