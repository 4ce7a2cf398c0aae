//! Promise 3: no log line and no metric label carries a peer or destination address, port, SNI,
//! Host, path, header or certificate subject, at any level, dependencies' logging included.
//!
//! Traffic with distinctive values (source addresses, SNI, Host, paths, headers, a client
//! certificate subject) is driven through every kind of outcome with `RUST_LOG=trace`; then the
//! whole log and `/metrics` are searched for each value, and every log field and metric label
//! is checked against the fixed set it may come from.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use tokio::io::AsyncWriteExt;

const MARK: &str = "zq7";

#[tokio::test]
async fn nothing_traffic_derived_reaches_logs_or_metrics() {
    let ws = Workspace::new();
    let server = ws
        .ca
        .issue_server(&[format!("*.{MARK}-sni.test"), "localhost".into()])
        .unwrap();
    ws.write_issued("server", &server);
    let client_cert = ws
        .ca
        .issue_client(&format!("{MARK}-client-subject"))
        .unwrap();
    let (up, _) = http_upstream().await;
    let (echo, _) = echo_upstream().await;
    let (dead_socket, dead) = refusing_addr();
    let (tls_up, _) = TlsUpstream::new(&server).http().await;

    let config = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[log]\nlevel = \"trace\"\nformat = \"json\"\ncounters_every = \"1s\"\n\n\
         [defaults]\nhandshake_timeout = \"1s\"\nheader_timeout = \"1s\"\n\n\
         [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nupstream = \"{up}\"\n{certs}\
           [listener.client_auth]\n  ca = \"{ca}\"\n  mode = \"optional\"\n\n\
         [[listener]]\nname = \"bytes\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nupstream = \"{echo}\"\n{certs}\n\
         [[listener]]\nname = \"broken\"\nbind = \"127.0.0.1:0\"\nupstream = \"{dead}\"\n{certs}\n\
         [[listener]]\nname = \"out\"\nbind = \"127.0.0.1:0\"\nmode = \"originate\"\n  [listener.upstream_tls]\n  ca = \"{ca}\"\n\n\
         [[listener]]\nname = \"api\"\nbind = \"127.0.0.1:0\"\nmode = \"originate\"\nupstream = \"localhost:{tls_port}\"\n  [listener.upstream_tls]\n  ca = \"{ca}\"\n\n\
         [[rule]]\nname = \"health\"\nlisteners = [\"web\"]\ntransport = \"plaintext\"\nsource = [\"127.0.0.2/32\"]\npath_prefix = [\"/{MARK}-health\"]\naction = \"allow\"\n\n\
         [[rule]]\nname = \"redirect\"\nlisteners = [\"web\"]\ntransport = \"plaintext\"\nserver_name = [\"www.{MARK}-host.test\"]\naction = \"upgrade\"\n",
        certs = ws.certs_table(),
        ca = ws.p("ca.crt"),
        tls_port = tls_up.port(),
    );
    let proxy = ProxyProcess::start_with_env(&ws.config(&config), &[("RUST_LOG", "trace")]);
    let web = proxy.addr("web");
    let mut secrets: Vec<String> = vec![
        MARK.into(),
        up.to_string(),
        echo.to_string(),
        dead.to_string(),
    ];
    let mut client_ports = BTreeSet::new();

    // Plaintext from distinct sources: allowed, redirected, rejected, with marked Host, paths
    // and headers.
    for (i, (host, path)) in [
        ("localhost", format!("/{MARK}-health/x?token={MARK}-query")),
        (
            &*format!("www.{MARK}-host.test"),
            format!("/{MARK}-redirected"),
        ),
        (
            &*format!("{MARK}-other-host.test"),
            format!("/{MARK}-rejected"),
        ),
    ]
    .iter()
    .enumerate()
    {
        let source: IpAddr = format!("127.0.0.{}", i + 2).parse().unwrap();
        secrets.push(source.to_string());
        let tcp = connect_from(source, web).await;
        client_ports.insert(tcp.local_addr().unwrap().port());
        let mut h1 = H1::new(tcp).await;
        let req = Request::get(path.as_str())
            .header("host", *host)
            .header("user-agent", format!("{MARK}-agent"))
            .header("x-secret", format!("{MARK}-header-value"))
            .header("cookie", format!("session={MARK}-cookie"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let _ = h1.send(req).await;
    }

    // TLS with a marked SNI, from other sources, with and without a client certificate.
    for i in 0..2 {
        let source: IpAddr = format!("127.0.0.{}", i + 10).parse().unwrap();
        secrets.push(source.to_string());
        let tcp = connect_from(source, web).await;
        client_ports.insert(tcp.local_addr().unwrap().port());
        let sni = format!("api{i}.{MARK}-sni.test");
        let config = if i == 0 {
            client_tls(&ws.ca_pem(), &["http/1.1"])
        } else {
            with_client_cert(&ws, &client_cert)
        };
        let tls = tls_connect(tcp, config, &sni).await.unwrap();
        let mut h1 = H1::new(tls).await;
        let _ = h1
            .get(
                &format!("{MARK}-tls-host.test"),
                &format!("/{MARK}-tls-path"),
            )
            .await;
    }

    // A handshake that fails (unknown SNI is fine, but this client trusts nothing), a stalled
    // one, garbage, a tcp relay, a refused tcp plaintext, and an unreachable upstream.
    let tcp = connect_from("127.0.0.20".parse().unwrap(), web).await;
    client_ports.insert(tcp.local_addr().unwrap().port());
    let stranger = Authority::new("stranger").unwrap();
    let _ = tls_connect(
        tcp,
        client_tls(&stranger.cert_pem(), &[]),
        &format!("fail.{MARK}-sni.test"),
    )
    .await;
    let mut stalled = connect_from("127.0.0.21".parse().unwrap(), web).await;
    client_ports.insert(stalled.local_addr().unwrap().port());
    stalled.write_all(&[0x16, 0x03, 0x01, 0x00]).await.unwrap();
    let mut garbage = connect_from("127.0.0.22".parse().unwrap(), web).await;
    client_ports.insert(garbage.local_addr().unwrap().port());
    let _ = exchange_raw(
        &mut garbage,
        format!("{MARK} garbage \x01\x02\r\n\r\n").as_bytes(),
    )
    .await;
    let tcp = connect_from("127.0.0.23".parse().unwrap(), proxy.addr("bytes")).await;
    client_ports.insert(tcp.local_addr().unwrap().port());
    let mut tls = tls_connect(
        tcp,
        client_tls(&ws.ca_pem(), &[]),
        &format!("db.{MARK}-sni.test"),
    )
    .await
    .unwrap();
    tls.write_all(format!("{MARK}-payload").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 11];
    tokio::io::AsyncReadExt::read_exact(&mut tls, &mut buf)
        .await
        .unwrap();
    let mut refused = connect_from("127.0.0.24".parse().unwrap(), proxy.addr("bytes")).await;
    client_ports.insert(refused.local_addr().unwrap().port());
    let _ = exchange_raw(&mut refused, format!("{MARK}-plain-payload").as_bytes()).await;
    let tcp = connect_from("127.0.0.25".parse().unwrap(), proxy.addr("broken")).await;
    client_ports.insert(tcp.local_addr().unwrap().port());
    let tls = tls_connect(
        tcp,
        client_tls(&ws.ca_pem(), &["h2"]),
        &format!("down.{MARK}-sni.test"),
    )
    .await
    .unwrap();
    drop(tls);
    let _ = read_to_close(&mut stalled).await;
    for i in 20..26 {
        secrets.push(format!("127.0.0.{i}"));
    }

    // The app's way out: a fixed egress, and the forward proxy with absolute-form URLs (one
    // served over TLS, one to a name that does not resolve) and CONNECT tunnels (TLS refused by
    // the stranger CA, plaintext refused, and a name that does not resolve).
    let mut app =
        H1::new(connect_from("127.0.0.26".parse().unwrap(), proxy.addr("api")).await).await;
    let _ = app.get("localhost", &format!("/{MARK}-egress-path")).await;
    for url in [
        format!("http://localhost:{}/{MARK}-forwarded", tls_up.port()),
        format!("http://{MARK}-nowhere.invalid/{MARK}-lost"),
    ] {
        let mut h1 =
            H1::new(connect_from("127.0.0.27".parse().unwrap(), proxy.addr("out")).await).await;
        let _ = h1.get(&format!("{MARK}-proxy-host"), &url).await;
    }
    for (target, payload) in [
        (echo.to_string(), format!("{MARK} plaintext in a tunnel")),
        (format!("{MARK}-tunnel.invalid:443"), String::new()),
        (tls_up.to_string(), String::new()),
    ] {
        let mut raw = connect_from("127.0.0.28".parse().unwrap(), proxy.addr("out")).await;
        client_ports.insert(raw.local_addr().unwrap().port());
        let connect = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n{payload}");
        let _ = exchange_raw(&mut raw, connect.as_bytes()).await;
    }
    for i in 26..29 {
        secrets.push(format!("127.0.0.{i}"));
    }

    // Wait for a counter snapshot taken after all of it, so snapshots are searched too.
    let after = proxy.logs().len();
    assert!(
        proxy.wait_for_log_after(after, |l| l.contains("\"counters\"")),
        "no counter snapshot after the traffic"
    );

    // The proxy's own addresses are config, not traffic: a client socket on another loopback
    // address may have been given the same port number as one of the listeners.
    let own_ports: BTreeSet<u16> = proxy
        .listeners
        .values()
        .chain([&proxy.admin])
        .map(SocketAddr::port)
        .collect();
    client_ports.retain(|port| !own_ports.contains(port));

    let logs = proxy.logs();
    let metrics = proxy.metrics_text().await;
    assert!(
        logs.iter().any(|l| l.contains("\"listening\"")),
        "logging did not work"
    );

    for secret in &secrets {
        for line in &logs {
            assert!(
                !line.contains(secret.as_str()),
                "log line carries `{secret}`: {line}"
            );
        }
        assert!(
            !metrics.contains(secret.as_str()),
            "/metrics carries `{secret}`"
        );
    }
    for port in &client_ports {
        for pattern in [
            format!(":{port}"),
            format!("\"{port}\""),
            format!("={port}"),
        ] {
            for line in &logs {
                assert!(
                    !line.contains(&pattern),
                    "log line carries port {port}: {line}"
                );
            }
            assert!(!metrics.contains(&pattern), "/metrics carries port {port}");
        }
    }

    check_log_fields(&logs);
    check_metric_labels(&metrics);
    drop(dead_socket);
}

/// Every log line is JSON with fields from a fixed set, and only config names in `listener`.
fn check_log_fields(logs: &[String]) {
    let allowed: BTreeSet<&str> = [
        "timestamp",
        "level",
        "message",
        "listener",
        "bind",
        "admin",
        "listeners",
        "counters",
        "error",
        "warning",
        "file",
        "line",
    ]
    .into();
    for line in logs {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        let object = value.as_object().expect("a JSON object");
        for key in object.keys() {
            assert!(
                allowed.contains(key.as_str()),
                "unexpected log field `{key}`: {line}"
            );
        }
        if let Some(listener) = object.get("listener") {
            assert!(
                ["web", "bytes", "broken", "out", "api"].contains(&listener.as_str().unwrap()),
                "{line}"
            );
        }
    }
}

/// Every label is one of SPEC's, and every value a config name or from its enumeration.
fn check_metric_labels(metrics: &str) {
    let values = |label: &str| -> &'static [&'static str] {
        match label {
            "listener" => &["web", "bytes", "broken", "out", "api"],
            "rule" => &["default", "health", "redirect"],
            "transport" => &["tls", "plaintext"],
            "action" => &["allow", "upgrade", "reject", "audit"],
            "leg" => &["downstream", "upstream"],
            "outcome" => &["ok", "failed", "timeout", "rejected"],
            "version" => &["tls1_2", "tls1_3"],
            "group" => &[
                "x25519mlkem768",
                "x25519",
                "secp256r1",
                "secp384r1",
                "other",
            ],
            "reason" => &["connect", "tls", "timeout", "protocol"],
            "class" => &["1xx", "2xx", "3xx", "4xx", "5xx"],
            "direction" => &["in", "out"],
            "cert" => &["0"],
            other => panic!("unexpected label `{other}`"),
        }
    };
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some((_, labels)) = line.split_once('{') else {
            continue;
        };
        let labels = labels.rsplit_once('}').unwrap().0;
        for pair in labels.split(',') {
            let (key, value) = pair.split_once('=').unwrap();
            let value = value.trim_matches('"');
            assert!(
                values(key).contains(&value),
                "label {key}={value} in {line}"
            );
        }
    }
}

fn with_client_cert(ws: &Workspace, issued: &Issued) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ws.ca_pem().as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(ciphergate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    std::sync::Arc::new(config)
}
