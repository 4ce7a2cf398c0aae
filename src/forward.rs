//! Forward-proxy mode: an originate http listener without an `upstream`, for apps that set
//! `HTTP_PROXY` and `HTTPS_PROXY`.
//!
//! - Absolute-form `http://host[:port]/…` requests are upgraded: sent to
//!   `https://host[:port or 443]/…` with verified TLS, unless a narrowed `allow` rule matches.
//! - `CONNECT host:port` answers 200, then looks at the first bytes inside the tunnel: a TLS
//!   ClientHello is relayed as is (the app's own TLS); anything else is closed without a byte
//!   reaching the target, unless a narrowed `allow` rule matches.
//!
//! `server_name` rules match the destination host, `destination` rules its resolved addresses.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, timeout_at};

use crate::detect::{is_client_hello, may_become_client_hello};
use crate::http::{
    ConnInfo, HostHeader, HttpProxy, PooledClient, ProxyBody, Via, decide_originate,
    failure_response, forbidden_by_rule, forward, local, malformed, pooled_client, rewritten_path,
};
use crate::metrics::DecisionLabel;
use crate::policy::{self, Action, Decision, Facts, Outbound, Transport};
use crate::upstream::{Connector, DynamicConnector, Security, Upstream};

/// How many bytes tell a TLS ClientHello (record header + handshake type).
const HELLO_PREFIX: usize = 6;

/// The forward proxy's state: a pooled client keyed by destination.
pub struct ForwardProxy {
    /// Shared with the listener's earlier and later states while the TLS settings stay the
    /// same, so a reload keeps the open connections (see [`crate::http::HttpUpstream::new`]).
    client: Arc<PooledClient>,
    connector: DynamicConnector,
}

impl ForwardProxy {
    pub fn new(connector: DynamicConnector, earlier: Option<&ForwardProxy>) -> Self {
        match earlier.filter(|e| e.connector.same_as(&connector)) {
            Some(same) => ForwardProxy {
                client: same.client.clone(),
                connector: same.connector.clone(),
            },
            None => ForwardProxy {
                client: Arc::new(pooled_client(Connector::Dynamic(connector.clone()))),
                connector,
            },
        }
    }

    /// An upstream for `host:port` with the given security.
    fn upstream(&self, host: &str, port: u16, security: Security) -> Upstream {
        Upstream {
            addr: crate::config::UpstreamAddr {
                host: host.to_owned(),
                port,
            },
            security,
            timeout: self.connector.timeout,
            metrics: self.connector.metrics.clone(),
        }
    }
}

pub async fn handle(
    proxy: &HttpProxy,
    forward_proxy: &ForwardProxy,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    if req.method() == Method::CONNECT {
        tunnel(proxy, forward_proxy, conn, req).await
    } else {
        absolute(proxy, forward_proxy, conn, req).await
    }
}

/// The destination of a request target: a valid host name or IP, lowercase, and its port.
fn destination(authority: &Authority) -> Option<(String, Option<u16>)> {
    let host = policy::host_name(authority.as_str())?;
    if !policy::is_dns_name(&host) && host.parse::<IpAddr>().is_err() {
        return None;
    }
    Some((host.into_owned(), authority.port_u16()))
}

fn authority_for(host: &str, port: u16) -> Option<Authority> {
    let text = match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        _ => format!("{host}:{port}"),
    };
    Authority::try_from(text).ok()
}

fn not_a_proxy_request() -> Response<ProxyBody> {
    local(
        StatusCode::BAD_REQUEST,
        "this listener is a forward proxy: send absolute-form http:// URLs (HTTP_PROXY) or CONNECT (HTTPS_PROXY)\n",
    )
}

/// An absolute-form request: upgraded to https unless a narrowed rule allows plaintext.
async fn absolute(
    proxy: &HttpProxy,
    fp: &ForwardProxy,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    if let Some(refusal) = malformed(proxy, &req) {
        return refusal;
    }
    let uri = req.uri();
    let asked_tls = match uri.scheme() {
        Some(s) if *s == Scheme::HTTPS => true,
        Some(s) if *s == Scheme::HTTP => false,
        _ => return not_a_proxy_request(),
    };
    let Some((host, port)) = uri.authority().and_then(destination) else {
        return not_a_proxy_request();
    };
    let tls_port = port.unwrap_or(443);
    let normalized = policy::normalize_path(uri.path());
    let facts = Facts {
        transport: Transport::Plaintext,
        source: Some(conn.source),
        server_name: Some(&host),
        path: normalized.as_deref(),
        destination: None,
        destination_port: Some(port.unwrap_or(if asked_tls { 443 } else { 80 })),
        client_verified: false,
    };
    let resolver = fp.upstream(&host, tls_port, Security::PlaintextException);
    let (decision, approved) = match decide_originate(&proxy.policy, &facts, &resolver).await {
        Ok(decided) => decided,
        Err(failure) => return failure_response(failure),
    };
    let decision = proxy.count(decision);
    let rewritten = rewritten_path(normalized);

    // An https:// URL stays TLS whatever the rule says; an http:// one is upgraded unless a
    // narrowed rule allows it as is.
    let (scheme, port) = match decision.outbound() {
        Outbound::Refuse => return forbidden_by_rule(proxy, &decision),
        Outbound::Plaintext if !asked_tls => (Scheme::HTTP, port.unwrap_or(80)),
        Outbound::Tls | Outbound::Plaintext => (Scheme::HTTPS, tls_port),
    };
    let Some(authority) = authority_for(&host, port) else {
        return not_a_proxy_request();
    };
    // With approved addresses, a fresh connection to them; otherwise the pool.
    let pinned;
    let via = match approved {
        None => Via::Pool(&fp.client),
        Some(addrs) => {
            let uri = http::Uri::builder()
                .scheme(scheme.clone())
                .authority(authority.clone())
                .path_and_query("/")
                .build();
            let Some(upstream) = uri.ok().and_then(|u| fp.connector.upstream_for(&u)) else {
                return not_a_proxy_request();
            };
            pinned = upstream;
            let addrs = addrs
                .into_iter()
                .map(|a| SocketAddr::new(a.ip(), port))
                .collect();
            Via::Pinned(&pinned, addrs)
        }
    };
    forward(
        proxy,
        conn,
        req,
        rewritten.as_deref(),
        HostHeader::Destination,
        scheme,
        authority,
        via,
    )
    .await
}

/// `CONNECT host:port`: 200, then relay only a TLS ClientHello (or plaintext a rule allows).
async fn tunnel(
    proxy: &HttpProxy,
    fp: &ForwardProxy,
    conn: &ConnInfo,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let Some((host, Some(port))) = req.uri().authority().and_then(destination) else {
        return local(StatusCode::BAD_REQUEST, "CONNECT needs host:port\n");
    };
    // Resolve first only when a rule tests the resolved address; otherwise refuse a
    // destination the policy rejects before looking it up.
    let resolver = fp.upstream(&host, port, Security::Passthrough);
    let mut addrs = None;
    if proxy.policy.needs_destination() {
        match resolver.resolve().await {
            Ok(resolved) => addrs = Some(resolved),
            Err(failure) => return failure_response(failure),
        }
    }
    let facts = |transport| Facts {
        transport,
        source: Some(conn.source),
        server_name: Some(&host),
        path: None,
        destination: None,
        destination_port: Some(port),
        client_verified: false,
    };
    let decide = |transport| match &addrs {
        Some(addrs) => {
            let (decision, approved) =
                policy::decide_destinations(&proxy.policy, &facts(transport), addrs);
            (decision, Some(approved))
        }
        None => (policy::decide(&proxy.policy, &facts(transport)), None),
    };
    let (tls, tls_addrs) = decide(Transport::Tls);
    let (plain, plain_addrs) = decide(Transport::Plaintext);
    if tls.action == Action::Reject && !allows_plaintext(&plain) {
        // Refused whatever the tunnel would carry: say so now, and open nothing.
        return forbidden_by_rule(proxy, &proxy.count(tls));
    }
    let resolved = match addrs {
        Some(addrs) => addrs,
        None => match resolver.resolve().await {
            Ok(addrs) => addrs,
            Err(failure) => return failure_response(failure),
        },
    };
    let tls_addrs = tls_addrs.unwrap_or_else(|| resolved.clone());
    let plain_addrs = plain_addrs.unwrap_or(resolved);

    let on_upgrade = hyper::upgrade::on(&mut req);
    let metrics = proxy.metrics.clone();
    let held = conn.held.clone();
    let clock = conn.clock.clone();
    let idle = conn.idle_timeout;
    let first_bytes_deadline = Instant::now() + fp.connector.timeout;
    let passthrough = fp.upstream(&host, port, Security::Passthrough);
    let exception = fp.upstream(&host, port, Security::PlaintextException);
    conn.tasks.spawn(async move {
        let _held = held;
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut client = TokioIo::new(upgraded);
        let mut prefix = read_prefix(&mut client, HELLO_PREFIX, first_bytes_deadline).await;
        let hello = is_client_hello(&prefix)
            && complete_client_hello(&mut client, &mut prefix, first_bytes_deadline).await;
        let (upstream, addrs) = if hello {
            metrics.decision(tls.rule, tls.label());
            if tls.action == Action::Reject {
                return;
            }
            (passthrough, tls_addrs)
        } else if allows_plaintext(&plain) {
            metrics.decision(plain.rule, plain.label());
            (exception, plain_addrs)
        } else {
            // A tunnel must carry TLS; plaintext is refused (a tunnel cannot be upgraded),
            // counted under the rule that decided it.
            metrics.decision(plain.rule, DecisionLabel::Reject);
            return;
        };
        let Ok(mut upstream) = upstream.connect_to(&addrs).await else {
            return;
        };
        if upstream.write_all(&prefix).await.is_err() {
            return;
        }
        crate::relay::relay(client, upstream, &clock, idle).await;
    });
    let mut response = Response::new(Either::Right(Full::default()));
    *response.status_mut() = StatusCode::OK;
    response
}

/// Reads the rest of the first TLS record and has rustls parse it: only a well-formed
/// ClientHello makes a tunnel TLS, not six bytes that merely look like one. Everything read is
/// kept in `prefix`, to be sent on first.
async fn complete_client_hello<R: AsyncRead + Unpin>(
    reader: &mut R,
    prefix: &mut Vec<u8>,
    deadline: Instant,
) -> bool {
    const RECORD_HEADER: usize = 5;
    // A TLS record holds at most 2^14 bytes of plaintext.
    const MAX_RECORD: usize = RECORD_HEADER + (1 << 14);
    let length = usize::from(u16::from_be_bytes([prefix[3], prefix[4]]));
    let record = RECORD_HEADER + length;
    if record > MAX_RECORD {
        return false;
    }
    let read_all = timeout_at(deadline, async {
        let mut buf = [0u8; 4096];
        while prefix.len() < record {
            let want = (record - prefix.len()).min(buf.len());
            match reader.read(&mut buf[..want]).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => prefix.extend_from_slice(&buf[..n]),
            }
        }
        true
    })
    .await;
    if read_all != Ok(true) {
        return false;
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut bytes: &[u8] = prefix;
    acceptor.read_tls(&mut bytes).is_ok() && matches!(acceptor.accept(), Ok(Some(_)))
}

/// Plaintext leaves the host only by an explicit, narrowed `allow` — never by audit.
fn allows_plaintext(decision: &Decision) -> bool {
    decision.action == Action::Allow && !decision.audited
}

/// Reads until `want` bytes arrived, the bytes can no longer start a ClientHello, the peer
/// stopped sending, or the deadline passed.
async fn read_prefix<R: AsyncRead + Unpin>(
    reader: &mut R,
    want: usize,
    deadline: Instant,
) -> Vec<u8> {
    let mut prefix = Vec::with_capacity(want);
    let _ = timeout_at(deadline, async {
        let mut buf = vec![0u8; want];
        while prefix.len() < want && may_become_client_hello(&prefix) {
            match reader.read(&mut buf[..want - prefix.len()]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => prefix.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    prefix
}
