//! Hostile bytes: garbage, stalled handshakes, stalled request heads, oversized headers and
//! floods end in a closed connection or an error status, bounded by the configured timeouts,
//! while other clients keep being served and nothing reaches the upstream.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A listener with one-second timeouts, so every bound is tested in about a second.
fn config(ws: &Workspace, upstream: std::net::SocketAddr, max_connections: usize) -> String {
    format!(
        "{}[defaults]\nhandshake_timeout = \"1s\"\nheader_timeout = \"1s\"\nidle_timeout = \"3s\"\nmax_connections = {max_connections}\n\n[[listener]]\nname = \"ingress\"\nbind = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n{}\n[[listener]]\nname = \"raw\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nupstream = \"{upstream}\"\n{}",
        preamble("info"),
        ws.certs_table(),
        ws.certs_table(),
    )
}

/// The first bytes of a real ClientHello record: enough to be detected as TLS, never enough to
/// finish it.
const PARTIAL_CLIENT_HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03];

async fn still_served(proxy: &ProxyProcess, ws: &Workspace) {
    let (status, _, _) = get_tls(proxy.addr("ingress"), &ws.ca_pem(), "localhost", "/ok").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn stalled_handshakes_time_out_and_are_counted() {
    let ws = Workspace::new();
    let (up, seen) = http_upstream().await;
    let proxy = ProxyProcess::start(&ws.config(&config(&ws, up, 100)));

    for listener in ["ingress", "raw"] {
        let mut partial = TcpStream::connect(proxy.addr(listener)).await.unwrap();
        let mut silent = TcpStream::connect(proxy.addr(listener)).await.unwrap();
        partial.write_all(PARTIAL_CLIENT_HELLO).await.unwrap();
        let started = Instant::now();
        // Other clients are served while these two hang.
        still_served(&proxy, &ws).await;
        assert!(read_to_close(&mut partial).await.is_empty());
        assert!(read_to_close(&mut silent).await.is_empty());
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(900),
            "closed after {waited:?}"
        );
        assert!(waited < Duration::from_secs(5), "closed after {waited:?}");
    }

    let m = proxy.metrics().await;
    for listener in ["ingress", "raw"] {
        let timeouts = m.get(
            "ciphergate_tls_handshakes_total",
            &[
                ("listener", listener),
                ("leg", "downstream"),
                ("outcome", "timeout"),
            ],
        );
        assert_eq!(timeouts, 2.0, "{listener}");
    }
    // Only the probes to /ok reached the upstream.
    assert!(seen.paths().iter().all(|p| p == "/ok"));
}

/// On terminate listeners a client that has sent nothing waits in the kernel, not in the
/// proxy: it holds no task, no buffer and no `max_connections` permit until it speaks. On
/// originate listeners, where the server may speak first, it is accepted at once.
#[tokio::test]
async fn a_silent_client_is_accepted_only_once_it_speaks_on_terminate_listeners() {
    let ws = Workspace::new();
    let (up, seen) = http_upstream().await;
    let proxy = ProxyProcess::start(&ws.config(&format!(
        "{}[defaults]\nhandshake_timeout = \"5s\"\nheader_timeout = \"5s\"\n\n[[listener]]\nname = \"ingress\"\nbind = \"127.0.0.1:0\"\nupstream = \"{up}\"\n{}\n[[listener]]\nname = \"fwd\"\nbind = \"127.0.0.1:0\"\nmode = \"originate\"\nupstream = \"{up}\"\n",
        preamble("info"),
        ws.certs_table(),
    )));
    let active = |listener| ("ciphergate_connections_active", [("listener", listener)]);

    let (name, labels) = active("ingress");
    // The kernel hands a silent client over after about a second anyway, so the check must
    // be made well within it; on a machine too slow for that it is made again.
    let mut attempts = 0;
    let (mut silent, _kept) = loop {
        attempts += 1;
        let started = Instant::now();
        let silent = TcpStream::connect(proxy.addr("ingress")).await.unwrap();
        // A client that connected after the silent one is accepted and served; the accept
        // queue is in order, so the silent one would have been accepted first had it been
        // queued.
        let tcp = TcpStream::connect(proxy.addr("ingress")).await.unwrap();
        let tls = tls_connect(tcp, client_tls(&ws.ca_pem(), &["http/1.1"]), "localhost")
            .await
            .unwrap();
        let mut kept = H1::new(tls).await;
        let (status, _, _) = kept.get("localhost", "/ok").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        let open = proxy.metrics().await.get(name, &labels);
        if started.elapsed() < Duration::from_millis(800) {
            assert_eq!(open, 1.0);
            break (silent, kept);
        }
        assert!(
            attempts < 5,
            "every attempt took longer than the kernel's wait"
        );
        drop((silent, kept));
        assert_eq!(proxy.wait_for_metric(name, &labels, 0.0).await, 0.0);
    };

    // Its first bytes hand it over.
    silent.write_all(PARTIAL_CLIENT_HELLO).await.unwrap();
    assert_eq!(proxy.wait_for_metric(name, &labels, 2.0).await, 2.0);

    let _plain = TcpStream::connect(proxy.addr("fwd")).await.unwrap();
    let (name, labels) = active("fwd");
    assert_eq!(proxy.wait_for_metric(name, &labels, 1.0).await, 1.0);
    assert!(seen.paths().iter().all(|p| p == "/ok"));
}

/// The kernel's wait counts against `handshake_timeout`: a client silent from the start is
/// closed at the timeout, not at the timeout plus the wait.
#[tokio::test]
async fn a_silent_client_is_closed_at_handshake_timeout_counted_from_connect() {
    let ws = Workspace::new();
    let (up, _) = http_upstream().await;
    let proxy = ProxyProcess::start(&ws.config(&format!(
        "{}[defaults]\nhandshake_timeout = \"2s\"\n\n[[listener]]\nname = \"ingress\"\nbind = \"127.0.0.1:0\"\nupstream = \"{up}\"\n{}",
        preamble("info"),
        ws.certs_table(),
    )));
    let started = Instant::now();
    let mut silent = TcpStream::connect(proxy.addr("ingress")).await.unwrap();
    assert!(read_to_close(&mut silent).await.is_empty());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_millis(2800),
        "closed after {waited:?}"
    );
    let timeouts = proxy
        .wait_for_metric(
            "ciphergate_tls_handshakes_total",
            &[
                ("listener", "ingress"),
                ("leg", "downstream"),
                ("outcome", "timeout"),
            ],
            1.0,
        )
        .await;
    assert_eq!(timeouts, 1.0);
}

#[tokio::test]
async fn garbage_ends_in_an_error_or_a_closed_connection() {
    let ws = Workspace::new();
    let (up, seen) = http_upstream().await;
    let proxy = ProxyProcess::start(&ws.config(&config(&ws, up, 100)));

    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("binary", (0..=255u8).rev().cycle().take(4096).collect()),
        ("tls-looking", {
            let mut v = vec![0x16, 0x03, 0x01, 0x00, 0x10];
            v.extend(std::iter::repeat_n(0xAB, 64));
            v
        }),
        (
            "bad request line",
            b"GARBAGE \x01\x02 NOT/HTTP\r\n\r\n".to_vec(),
        ),
        ("h2 preface then junk", {
            let mut v = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            v.extend(std::iter::repeat_n(0xFF, 64));
            v
        }),
    ];
    for listener in ["ingress", "raw"] {
        for (what, bytes) in &garbage {
            let mut stream = TcpStream::connect(proxy.addr(listener)).await.unwrap();
            let answer = exchange_raw(&mut stream, bytes).await;
            let text = String::from_utf8_lossy(&answer);
            assert!(
                answer.is_empty()
                    || text.starts_with("HTTP/1.1 400")
                    || text.starts_with("HTTP/1.1 426")
                    || answer[0] == 0x15 // a TLS alert
                    || answer.len() < 64, // an h2 GOAWAY frame
                "{listener}/{what}: {text:?}"
            );
        }
    }
    still_served(&proxy, &ws).await;
    assert_eq!(seen.paths(), ["/ok"]);
    assert_eq!(seen.connections(), 1, "garbage reached the upstream");
    let m = proxy.metrics().await;
    assert!(
        m.get(
            "ciphergate_tls_handshakes_total",
            &[
                ("listener", "ingress"),
                ("leg", "downstream"),
                ("outcome", "failed")
            ]
        ) >= 1.0
    );
}

#[tokio::test]
async fn a_stalled_request_head_is_cut_at_header_timeout() {
    let ws = Workspace::new();
    let (up, seen) = http_upstream().await;
    let proxy = ProxyProcess::start(&ws.config(&config(&ws, up, 100)));
    let addr = proxy.addr("ingress");

    // Plaintext: a head that never ends.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /slow HTTP/1.1\r\nHost: localhost\r\nX-Slow: 1\r\n")
        .await
        .unwrap();
    // TLS: the handshake completes, then the head stalls.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = tls_connect(tcp, client_tls(&ws.ca_pem(), &["http/1.1"]), "localhost")
        .await
        .unwrap();
    tls.write_all(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    still_served(&proxy, &ws).await;

    let answer = read_to_close(&mut plain).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800),
        "closed after {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "closed after {waited:?}");
    let text = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );

    let mut rest = Vec::new();
    let read = tokio::time::timeout(
        PATIENCE,
        tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut rest),
    )
    .await;
    assert!(
        read.is_ok(),
        "the TLS connection with a stalled head was not closed"
    );
    assert!(!seen.paths().iter().any(|p| p == "/slow"));
}

#[tokio::test]
async fn a_one_mebibyte_header_is_refused() {
    let ws = Workspace::new();
    let (up, seen) = http_upstream().await;
    let proxy = ProxyProcess::start(&ws.config(&config(&ws, up, 100)));
    let addr = proxy.addr("ingress");

    let mut head = b"GET /big HTTP/1.1\r\nHost: localhost\r\nX-Big: ".to_vec();
    head.extend(std::iter::repeat_n(b'a', 1 << 20));
    head.extend_from_slice(b"\r\n\r\n");

    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = tls_connect(tcp, client_tls(&ws.ca_pem(), &["http/1.1"]), "localhost")
        .await
        .unwrap();
    let _ = tls.write_all(&head).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        PATIENCE,
        tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut answer),
    )
    .await;
    assert!(read.is_ok(), "the connection stayed open");
    let text = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || text.starts_with("HTTP/1.1 431"),
        "{text}"
    );

    // Plaintext too: the head is refused before any decision could forward it.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    let answer = exchange_raw(&mut plain, &head).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || text.starts_with("HTTP/1.1 431"),
        "{text}"
    );

    still_served(&proxy, &ws).await;
    assert_eq!(seen.paths(), ["/ok"]);
    // The 431s hyper writes itself are counted like every other response.
    let m = proxy.metrics().await;
    assert_eq!(
        m.get(
            "ciphergate_http_responses_total",
            &[("listener", "ingress"), ("class", "4xx")]
        ),
        2.0
    );
}

#[tokio::test]
async fn more_than_100_header_fields_get_431() {
    let ws = Workspace::new();
    let (up, seen) = http_upstream().await;
    let proxy = ProxyProcess::start(&ws.config(&config(&ws, up, 100)));
    let addr = proxy.addr("ingress");

    // Host, Connection and `extra` more fields, over TLS; returns the status line.
    let ca = ws.ca_pem();
    let send = |extra: usize| {
        let ca = ca.clone();
        async move {
            let mut head =
                format!("GET /fields/{extra} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
            for i in 0..extra {
                head.push_str(&format!("X-Field-{i}: v\r\n"));
            }
            head.push_str("\r\n");
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut tls = tls_connect(tcp, client_tls(&ca, &["http/1.1"]), "localhost")
                .await
                .unwrap();
            tls.write_all(head.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            tokio::time::timeout(
                PATIENCE,
                tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut answer),
            )
            .await
            .expect("the connection stayed open")
            .unwrap();
            String::from_utf8_lossy(&answer)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned()
        }
    };
    assert_eq!(send(98).await, "HTTP/1.1 200 OK");
    assert_eq!(
        send(99).await,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    assert_eq!(seen.paths(), ["/fields/98"]);
}

#[tokio::test]
async fn beyond_max_connections_new_connections_are_closed_and_counted() {
    let ws = Workspace::new();
    let (up, _) = http_upstream().await;
    let proxy = ProxyProcess::start(&ws.config(&config(&ws, up, 2)));
    let addr = proxy.addr("ingress");

    // Two TLS connections hold the two permits.
    let mut held = Vec::new();
    for _ in 0..2 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        held.push(
            tls_connect(tcp, client_tls(&ws.ca_pem(), &["http/1.1"]), "localhost")
                .await
                .unwrap(),
        );
    }
    let mut third = TcpStream::connect(addr).await.unwrap();
    let answer = exchange_raw(&mut third, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert!(answer.is_empty());
    let m = proxy.metrics().await;
    assert_eq!(
        m.get(
            "ciphergate_overload_rejections_total",
            &[("listener", "ingress")]
        ),
        1.0
    );
    assert_eq!(
        m.get("ciphergate_connections_active", &[("listener", "ingress")]),
        2.0
    );

    // Once one is released, the listener serves again.
    drop(held.pop());
    let served = tokio::time::timeout(PATIENCE, async {
        loop {
            let tcp = TcpStream::connect(addr).await.unwrap();
            if let Ok(tls) =
                tls_connect(tcp, client_tls(&ws.ca_pem(), &["http/1.1"]), "localhost").await
                && let Ok((status, _, _)) = H1::new(tls).await.get("localhost", "/").await
            {
                return status;
            }
        }
    })
    .await
    .expect("never served again");
    assert_eq!(served, StatusCode::OK);
}

#[tokio::test]
async fn a_tls_client_that_never_sends_a_request_is_closed_at_header_timeout() {
    let ws = Workspace::new();
    let (up, _) = http_upstream().await;
    let proxy = ProxyProcess::start(&ws.config(&config(&ws, up, 100)));
    let tcp = TcpStream::connect(proxy.addr("ingress")).await.unwrap();
    let mut tls = tls_connect(tcp, client_tls(&ws.ca_pem(), &["http/1.1"]), "localhost")
        .await
        .unwrap();
    assert_closed_after_about_a_second(&mut tls, "a silent TLS client").await;
}
