//! Originate listeners: the local app speaks plaintext, ciphergate speaks verified TLS. Fixed
//! upstreams, forward-proxy mode driven by `curl -x`, CONNECT tunnels, failures that fail
//! closed, and narrowed plaintext exceptions.

mod common;

use std::process::Command;

use common::*;
use http::{StatusCode, Version};
use time::{Duration, OffsetDateTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn egress(name: &str, upstream: &str, extra: &str) -> String {
    format!(
        "\n[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nmode = \"originate\"\nupstream = \"{upstream}\"\n{extra}"
    )
}

fn upstream_tls(ca: &str, more: &str) -> String {
    format!("  [listener.upstream_tls]\n  ca = \"{ca}\"\n{more}")
}

async fn app_get(proxy: &ProxyProcess, listener: &str, path: &str) -> (StatusCode, String) {
    let mut h1 = H1::new(TcpStream::connect(proxy.addr(listener)).await.unwrap()).await;
    let (status, _, body) = h1.get("localhost", path).await.unwrap();
    (status, body)
}

#[tokio::test]
async fn a_fixed_upstream_gets_verified_pooled_tls_and_h2_when_offered() {
    let ws = Workspace::new();
    let cert = ws.ca.issue_server(&["localhost".into()]).unwrap();
    let (h1_up, h1_seen) = TlsUpstream::new(&cert).http().await;
    let (h2_up, h2_seen) = TlsUpstream {
        alpn: &["h2"],
        ..TlsUpstream::new(&cert)
    }
    .http()
    .await;
    let ca = ws.p("ca.crt");
    let config = format!(
        "{}{}{}",
        preamble("info"),
        egress(
            "api",
            &format!("localhost:{}", h1_up.port()),
            &upstream_tls(&ca, "")
        ),
        egress(
            "api-h2",
            &format!("localhost:{}", h2_up.port()),
            &upstream_tls(&ca, "")
        ),
    );
    let proxy = ProxyProcess::start_with_env(&ws.config(&config), &[("TOKIO_WORKER_THREADS", "2")]);

    // Client connections are dealt to the two workers in turn; each worker pools its own
    // upstream connections, so six requests make two connections and two handshakes.
    for i in 0..6 {
        let (status, body) = app_get(&proxy, "api", &format!("/call/{i}")).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, &*format!("upstream saw /call/{i}"))
        );
    }
    assert_eq!(h1_seen.connections(), 2, "upstream connections are pooled");
    let (status, _) = app_get(&proxy, "api-h2", "/over-h2").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h2_seen.requests()[0].version, Version::HTTP_2);
    assert_eq!(h2_seen.requests()[0].path_and_query, "/over-h2");

    let m = proxy.metrics().await;
    let l = ("listener", "api");
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[l, ("rule", "default"), ("action", "upgrade")]
        ),
        6.0
    );
    assert_eq!(
        m.get(
            "ciphergate_tls_handshakes_total",
            &[l, ("leg", "upstream"), ("outcome", "ok")]
        ),
        2.0
    );
    assert_eq!(
        m.get(
            "ciphergate_tls_sessions_total",
            &[
                l,
                ("leg", "upstream"),
                ("version", "tls1_3"),
                ("group", "x25519mlkem768")
            ]
        ),
        2.0
    );
    // No X-Forwarded-Proto is added on the way out of the host.
    assert!(
        !h1_seen.requests()[0]
            .headers
            .contains_key("x-forwarded-proto")
    );
}

#[tokio::test]
async fn every_failed_upstream_handshake_fails_closed_with_its_category() {
    let ws = Workspace::new();
    let ca = ws.p("ca.crt");
    let good = ws.ca.issue_server(&["localhost".into()]).unwrap();
    let stranger = Authority::new("another CA").unwrap();
    let foreign = stranger.issue_server(&["localhost".into()]).unwrap();
    let misnamed = ws.ca.issue_server(&["elsewhere.test".into()]).unwrap();
    let expired = ws
        .ca
        .issue_server_valid(
            &["localhost".into()],
            OffsetDateTime::now_utc() - Duration::days(30),
            OffsetDateTime::now_utc() - Duration::days(1),
        )
        .unwrap();
    let client = ws.ca.issue_client("egress client").unwrap();
    ws.write_issued("client", &client);

    let (foreign_up, foreign_seen) = TlsUpstream::new(&foreign).http().await;
    let (misnamed_up, misnamed_seen) = TlsUpstream::new(&misnamed).http().await;
    let (expired_up, expired_seen) = TlsUpstream::new(&expired).http().await;
    let (plain_up, plain_seen) = http_upstream().await;
    let (mtls_up, mtls_seen) = TlsUpstream {
        client_ca: Some(&ws.ca.cert_pem()),
        ..TlsUpstream::new(&good)
    }
    .http()
    .await;
    let (old_up, old_seen) = TlsUpstream {
        tls12_only: true,
        ..TlsUpstream::new(&good)
    }
    .http()
    .await;
    let (_dead_socket, dead) = refusing_addr();
    let at = |addr: std::net::SocketAddr| format!("localhost:{}", addr.port());
    let client_cert = format!(
        "  client_cert = \"{}\"\n  client_key = \"{}\"\n",
        ws.p("client.crt"),
        ws.p("client.key")
    );
    let config = [
        preamble("info"),
        egress("foreign", &at(foreign_up), &upstream_tls(&ca, "")),
        egress("misnamed", &at(misnamed_up), &upstream_tls(&ca, "")),
        egress("expired", &at(expired_up), &upstream_tls(&ca, "")),
        egress("plaintext", &at(plain_up), &upstream_tls(&ca, "")),
        egress("no-client-cert", &at(mtls_up), &upstream_tls(&ca, "")),
        egress(
            "with-client-cert",
            &at(mtls_up),
            &upstream_tls(&ca, &client_cert),
        ),
        egress(
            "floor",
            &at(old_up),
            &upstream_tls(&ca, "  min_tls_version = \"1.3\"\n"),
        ),
        egress("tls12", &at(old_up), &upstream_tls(&ca, "")),
        egress("dead", &at(dead), &upstream_tls(&ca, "")),
    ]
    .concat();
    let proxy = ProxyProcess::start(&ws.config(&config));

    for (listener, status, body) in [
        (
            "foreign",
            StatusCode::BAD_GATEWAY,
            "upstream tls handshake failed",
        ),
        (
            "misnamed",
            StatusCode::BAD_GATEWAY,
            "upstream tls handshake failed",
        ),
        (
            "expired",
            StatusCode::BAD_GATEWAY,
            "upstream tls handshake failed",
        ),
        (
            "plaintext",
            StatusCode::BAD_GATEWAY,
            "upstream tls handshake failed",
        ),
        (
            "no-client-cert",
            StatusCode::BAD_GATEWAY,
            "upstream tls handshake failed",
        ),
        (
            "floor",
            StatusCode::BAD_GATEWAY,
            "upstream tls handshake failed",
        ),
        ("dead", StatusCode::BAD_GATEWAY, "upstream connect failed"),
        ("with-client-cert", StatusCode::OK, "upstream saw /secret"),
        ("tls12", StatusCode::OK, "upstream saw /secret"),
    ] {
        let (got, text) = app_get(&proxy, listener, "/secret").await;
        assert_eq!((got, text.trim()), (status, body), "{listener}");
    }

    // Nothing was ever sent in plaintext, and no refused upstream saw a request.
    for seen in [&foreign_seen, &misnamed_seen, &expired_seen, &plain_seen] {
        assert!(seen.requests().is_empty());
    }
    assert_eq!(mtls_seen.paths(), ["/secret"]);
    assert_eq!(old_seen.paths(), ["/secret"]);
    // The plaintext-only upstream received a ClientHello, never the request.
    assert!(plain_seen.bytes() > 0);

    let m = proxy.metrics().await;
    for listener in [
        "foreign",
        "misnamed",
        "expired",
        "plaintext",
        "no-client-cert",
        "floor",
    ] {
        assert_eq!(
            m.get(
                "ciphergate_upstream_errors_total",
                &[("listener", listener), ("reason", "tls")]
            ),
            1.0,
            "{listener}"
        );
        assert_eq!(
            m.get(
                "ciphergate_http_responses_total",
                &[("listener", listener), ("class", "5xx")]
            ),
            1.0,
            "{listener}"
        );
    }
    for listener in ["foreign", "misnamed", "expired", "plaintext", "floor"] {
        assert_eq!(
            m.get(
                "ciphergate_tls_handshakes_total",
                &[
                    ("listener", listener),
                    ("leg", "upstream"),
                    ("outcome", "failed")
                ]
            ),
            1.0,
            "{listener}"
        );
    }
    assert_eq!(
        m.get(
            "ciphergate_upstream_errors_total",
            &[("listener", "dead"), ("reason", "connect")]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "ciphergate_tls_sessions_total",
            &[
                ("listener", "tls12"),
                ("leg", "upstream"),
                ("version", "tls1_2"),
                ("group", "x25519mlkem768")
            ]
        ) + m.get(
            "ciphergate_tls_sessions_total",
            &[
                ("listener", "tls12"),
                ("leg", "upstream"),
                ("version", "tls1_2"),
                ("group", "x25519")
            ]
        ),
        1.0
    );
}

/// Reads an HTTP response head from a raw stream.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(PATIENCE, stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test]
async fn the_forward_proxy_upgrades_http_and_tunnels_only_tls() {
    let ws = Workspace::new();
    let cert = ws.ca.issue_server(&["localhost".into()]).unwrap();
    let (tls_up, tls_seen) = TlsUpstream::new(&cert).http().await;
    let (echo, echo_seen) = echo_upstream().await;
    let config = format!(
        "{}\n[[listener]]\nname = \"fwd\"\nbind = \"127.0.0.1:0\"\nmode = \"originate\"\n{}\n[[rule]]\nname = \"no-tracker\"\nserver_name = [\"tracker.example.test\"]\naction = \"reject\"\n",
        preamble("info"),
        upstream_tls(&ws.p("ca.crt"), ""),
    );
    let proxy = ProxyProcess::start(&ws.config(&config));
    let proxy_url = format!("http://{}", proxy.addr("fwd"));

    // curl as the app, with HTTP_PROXY semantics: an http:// URL leaves encrypted.
    let mut curl = Command::new("curl");
    curl.args(["-sS", "-x", &proxy_url])
        .arg(format!("http://localhost:{}/plain-url?q=1", tls_up.port()));
    let (code, out, err) = run_async(curl).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "upstream saw /plain-url?q=1");

    // An https:// URL goes through CONNECT; curl does its own TLS inside the tunnel.
    let mut curl = Command::new("curl");
    curl.args(["-sS", "-x", &proxy_url, "--cacert", &ws.p("ca.crt")])
        .arg(format!("https://localhost:{}/tunnelled", tls_up.port()));
    let (code, out, err) = run_async(curl).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "upstream saw /tunnelled");
    assert_eq!(tls_seen.paths(), ["/plain-url?q=1", "/tunnelled"]);

    // A CONNECT that carries plaintext is answered 200, then closed: not one byte arrives.
    let mut raw = TcpStream::connect(proxy.addr("fwd")).await.unwrap();
    raw.write_all(format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(read_head(&mut raw).await.starts_with("HTTP/1.1 200"));
    let answer = exchange_raw(&mut raw, b"PLAINTEXT SECRET\r\n").await;
    assert!(answer.is_empty());
    // Nor does plaintext dressed in six bytes of a ClientHello record header.
    let mut raw = TcpStream::connect(proxy.addr("fwd")).await.unwrap();
    raw.write_all(format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(read_head(&mut raw).await.starts_with("HTTP/1.1 200"));
    let mut disguised = vec![0x16, 0x03, 0x01, 0x00, 0x20, 0x01];
    disguised.extend_from_slice(b"PLAINTEXT SECRET IN DISGUISE....");
    assert!(exchange_raw(&mut raw, &disguised[..]).await.is_empty());
    assert_eq!((echo_seen.connections(), echo_seen.bytes()), (0, 0));

    // A refused destination: 403 naming the rule, for both forms.
    let mut curl = Command::new("curl");
    curl.args(["-sS", "-x", &proxy_url, "-w", "\n%{http_code}"])
        .arg("http://tracker.example.test/pixel");
    let (_, out, _) = run_async(curl).await;
    assert!(out.contains("no-tracker") && out.ends_with("403"), "{out}");
    let mut raw = TcpStream::connect(proxy.addr("fwd")).await.unwrap();
    raw.write_all(
        b"CONNECT tracker.example.test:443 HTTP/1.1\r\nHost: tracker.example.test:443\r\n\r\n",
    )
    .await
    .unwrap();
    assert!(read_head(&mut raw).await.starts_with("HTTP/1.1 403"));

    // Origin-form requests are not proxy requests.
    let (status, _) = app_get(&proxy, "fwd", "/").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let m = proxy.metrics().await;
    let l = ("listener", "fwd");
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[l, ("rule", "default"), ("action", "upgrade")]
        ),
        1.0 // the http:// URL
    );
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[l, ("rule", "default"), ("action", "allow")]
        ),
        1.0 // the TLS tunnel
    );
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[l, ("rule", "default"), ("action", "reject")]
        ),
        2.0 // the plaintext tunnels, one disguised
    );
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[l, ("rule", "no-tracker"), ("action", "reject")]
        ),
        2.0
    );
}

#[tokio::test]
async fn a_narrowed_rule_is_the_only_way_plaintext_leaves() {
    let ws = Workspace::new();
    let (plain_up, plain_seen) = http_upstream().await;
    let (echo, echo_seen) = echo_upstream().await;
    let cert = ws.ca.issue_server(&["localhost".into()]).unwrap();
    let (tls_echo, tls_echo_seen) = TlsUpstream::new(&cert).echo().await;
    let config = format!(
        "{pre}\n[[listener]]\nname = \"fwd\"\nbind = \"127.0.0.1:0\"\nmode = \"originate\"\n{tls}\
         {tcp_tls}{tcp_plain}\n\
         [[rule]]\nname = \"legacy-lan\"\nlisteners = [\"fwd\", \"db-legacy\"]\ntransport = \"plaintext\"\ndestination = [\"127.0.0.1/32\"]\naction = \"allow\"\n",
        pre = preamble("info"),
        tls = upstream_tls(&ws.p("ca.crt"), ""),
        tcp_tls = egress(
            "db",
            &format!("localhost:{}", tls_echo.port()),
            &format!("protocol = \"tcp\"\n{}", upstream_tls(&ws.p("ca.crt"), ""))
        ),
        tcp_plain = egress("db-legacy", &echo.to_string(), "protocol = \"tcp\"\n"),
    );
    let proxy = ProxyProcess::start(&ws.config(&config));

    // http:// to an address the rule names: plaintext, as is.
    let mut curl = Command::new("curl");
    curl.args(["-sS", "-x", &format!("http://{}", proxy.addr("fwd"))])
        .arg(format!("http://{plain_up}/legacy"));
    let (code, out, err) = run_async(curl).await;
    assert_eq!((code, out.as_str()), (0, "upstream saw /legacy"), "{err}");
    assert_eq!(plain_seen.paths(), ["/legacy"]);

    // A CONNECT tunnel carrying plaintext to that address is relayed too.
    let mut raw = TcpStream::connect(proxy.addr("fwd")).await.unwrap();
    raw.write_all(format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(read_head(&mut raw).await.starts_with("HTTP/1.1 200"));
    raw.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    raw.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    drop(raw);

    // tcp originate: TLS by default (the app's bytes arrive decrypted at the TLS echo)...
    let mut db = TcpStream::connect(proxy.addr("db")).await.unwrap();
    db.write_all(b"SELECT 1;").await.unwrap();
    let mut buf = [0u8; 9];
    db.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"SELECT 1;");
    assert_eq!(tls_echo_seen.bytes(), 9);
    // ...and plaintext only where the rule allows it.
    let mut legacy = TcpStream::connect(proxy.addr("db-legacy")).await.unwrap();
    legacy.write_all(b"legacy").await.unwrap();
    let mut buf = [0u8; 6];
    legacy.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"legacy");
    assert_eq!(echo_seen.bytes(), 4 + 6);

    let m = proxy.metrics().await;
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[
                ("listener", "fwd"),
                ("rule", "legacy-lan"),
                ("action", "allow")
            ]
        ),
        2.0
    );
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[
                ("listener", "db"),
                ("rule", "default"),
                ("action", "upgrade")
            ]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[
                ("listener", "db-legacy"),
                ("rule", "legacy-lan"),
                ("action", "allow")
            ]
        ),
        1.0
    );
}

#[tokio::test]
async fn an_upstream_that_only_speaks_tls_1_1_is_refused() {
    let ws = Workspace::new();
    // openssl plays the outdated server; it needs a fixed port, so take a free one.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = std::process::Command::new("openssl")
        .args(["s_server", "-accept", &format!("127.0.0.1:{port}")])
        .args(["-cert", &ws.p("server.crt"), "-key", &ws.p("server.key")])
        .args(["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0", "-www"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let stdout = server.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.contains("ACCEPT"))
    });
    assert!(
        tokio::time::timeout(PATIENCE, ready)
            .await
            .unwrap()
            .unwrap()
    );

    let config = format!(
        "{}{}",
        preamble("info"),
        egress(
            "old",
            &format!("localhost:{port}"),
            &upstream_tls(&ws.p("ca.crt"), "")
        )
    );
    let proxy = ProxyProcess::start(&ws.config(&config));
    let (status, body) = app_get(&proxy, "old", "/").await;
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(
        (status, body.trim()),
        (StatusCode::BAD_GATEWAY, "upstream tls handshake failed")
    );
    let m = proxy.metrics().await;
    assert_eq!(
        m.get(
            "ciphergate_tls_handshakes_total",
            &[
                ("listener", "old"),
                ("leg", "upstream"),
                ("outcome", "failed")
            ]
        ),
        1.0
    );
}

/// Sends SIGHUP and waits until the reload is logged as applied.
fn reload(proxy: &ProxyProcess) {
    let lines = proxy.logs().len();
    proxy.signal("HUP");
    assert!(proxy.wait_for_log_after(lines, |l| l.contains("config reloaded")));
}

/// A reload keeps the verified TLS connections to an upstream whose TLS settings it does not
/// change, and opens new ones (with a new handshake) when it changes them.
#[tokio::test]
async fn a_reload_keeps_upstream_tls_connections_only_while_their_settings_stay() {
    let ws = Workspace::new();
    let cert = ws.ca.issue_server(&["localhost".into()]).unwrap();
    let (up, seen) = TlsUpstream::new(&cert).http().await;
    let ca = ws.p("ca.crt");
    let upstream = format!("localhost:{}", up.port());
    let config = |more: &str| {
        format!(
            "{}{}",
            preamble("info"),
            egress("api", &upstream, &upstream_tls(&ca, more))
        )
    };
    let path = ws.config(&config(""));
    // One worker: every client connection shares one pool.
    let proxy = ProxyProcess::start_with_env(&path, &[("TOKIO_WORKER_THREADS", "1")]);
    assert_eq!(app_get(&proxy, "api", "/first").await.0, StatusCode::OK);
    assert_eq!(seen.connections(), 1);

    // The same settings (the file rewritten): the open connection carries on.
    std::fs::write(&path, config("")).unwrap();
    reload(&proxy);
    assert_eq!(app_get(&proxy, "api", "/same").await.0, StatusCode::OK);
    assert_eq!(
        seen.connections(),
        1,
        "a reload that changed nothing reconnected"
    );

    // Other TLS settings: connections made under the old ones are not used for new requests.
    std::fs::write(&path, config("  alpn = [\"http/1.1\"]\n")).unwrap();
    reload(&proxy);
    assert_eq!(app_get(&proxy, "api", "/changed").await.0, StatusCode::OK);
    assert_eq!(
        seen.connections(),
        2,
        "a changed upstream_tls reused the old connection"
    );
    let m = proxy.metrics().await;
    assert_eq!(
        m.get(
            "ciphergate_tls_handshakes_total",
            &[("listener", "api"), ("leg", "upstream"), ("outcome", "ok")]
        ),
        2.0
    );
}
