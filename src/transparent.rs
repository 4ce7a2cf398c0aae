//! Transparent listeners: the app's own connections, redirected here by `[capture]`, each sent
//! on to its original destination (read with `SO_ORIGINAL_DST`) according to its first bytes.
//!
//! | the app sends          | by default                                                   |
//! |------------------------|--------------------------------------------------------------|
//! | a TLS ClientHello      | relayed untouched: the app's own TLS, never decrypted        |
//! | plaintext HTTP/1.x     | each request sent over verified TLS to its Host (80 -> 443)  |
//! | other plaintext        | closed: not a byte reaches the destination                   |
//!
//! Rules decide on the original destination (`destination`, `destination_port`), the SNI or
//! Host (`server_name`) and, for HTTP, the path. A plaintext `allow` that needs no bytes to
//! match (a destination and port) relays at once, so protocols where the server speaks first
//! work; everything else waits for the app's first bytes, under `handshake_timeout`.
//!
//! ciphergate's own upstream connections carry its uid, which the netfilter rules exempt. If
//! that exemption is missing (a wrong `proxy_uid`), one of them would come back here: it is
//! recognised by its source address and closed, so a misconfiguration cannot loop.
//!
//! Nothing here logs, and no address, port, Host or SNI leaves this module but to connect.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::UpstreamAddr;
use crate::conn::{Conn, Held};
use crate::detect::{Sniffed, sniff};
use crate::http::{
    ConnInfo, HostHeader, HttpProxy, ProxyBody, Via, forbidden_by_rule, forward, local, malformed,
    request_host, rewritten_path,
};
use crate::io::{IdleClock, Metered, Prefixed};
use crate::listener::ListenerState;
use crate::metrics::{DecisionLabel, ListenerMetrics};
use crate::policy::{self, Action, Decision, Facts, Outbound, Transport};
use crate::tls::MinTlsVersion;
use crate::tls::client::{ClientTls, UpstreamTls};
use crate::tls::hello::{self, Hello, Parsed};
use crate::upstream::{Security, Upstream, UpstreamStream};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a transparent listener needs to send HTTP on with TLS.
pub struct TransparentRoute {
    /// Verifies the destinations plaintext HTTP is upgraded to (`upstream_tls` roots).
    pub tls: ClientTls,
    /// Bounds connecting to a destination, with its TLS handshake.
    pub timeout: Duration,
    pub metrics: ListenerMetrics,
}

/// Where one of the app's connections was headed, and the connection ciphergate keeps there
/// for its HTTP requests.
pub struct Original {
    pub addr: SocketAddr,
    kept: Kept,
}

impl Original {
    pub fn new(addr: SocketAddr) -> Self {
        Original {
            addr,
            kept: Kept::default(),
        }
    }
}

/// The life of one redirected connection. `stream` is as accepted: not yet registered with
/// this worker's reactor.
pub async fn serve(
    state: Arc<ListenerState>,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    held: Arc<Held>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let metrics = &state.metrics;
    let refuse_unknown = || metrics.decision(None, DecisionLabel::Reject);
    let Ok(local) = stream.local_addr() else {
        return;
    };
    // Not redirected (the app dialled the listener itself), or one of ciphergate's own
    // connections come back: there is nowhere to send it.
    let original = match crate::sys::original_destination(&stream, local.is_ipv6()) {
        Ok(original) if original != local && !is_own(peer) => original,
        _ => return refuse_unknown(),
    };
    let Ok(stream) = TcpStream::from_std(stream) else {
        return;
    };
    let clock = IdleClock::new();
    let io = Metered::new(stream, metrics.byte_counters(), clock.clone());
    let conn = Conn {
        source: peer.ip(),
        state,
        held,
        clock,
        shutdown,
        tasks,
    };
    let facts = Facts {
        transport: Transport::Plaintext,
        source: Some(conn.source),
        server_name: None,
        path: None,
        destination: Some(original.ip()),
        destination_port: Some(original.port()),
        client_verified: false,
    };
    // A plaintext exception for this destination needs no bytes to decide: relay now, so a
    // protocol whose server speaks first is not held up.
    let without_bytes = policy::decide(&conn.state.policy, &facts);
    if without_bytes.rule.is_some() && without_bytes.outbound() == Outbound::Plaintext {
        conn.state.metrics.connection(Transport::Plaintext);
        count(&conn, &without_bytes);
        return relay(&conn, io, original, Security::PlaintextException).await;
    }

    let deadline = Instant::now() + conn.state.settings.handshake_timeout;
    let (first, io) = match timeout_at(deadline, first_bytes(io)).await {
        Ok(Ok(read)) => read,
        // Closed or failed before a byte came.
        Ok(Err(_)) => return,
        // Silence: nothing to tell TLS or HTTP by, so it is other plaintext.
        Err(_) => {
            conn.state.metrics.connection(Transport::Plaintext);
            return refuse_other(&conn, &without_bytes);
        }
    };
    match first {
        First::Tls(hello) => {
            conn.state.metrics.connection(Transport::Tls);
            if passthrough(&conn, &hello, original) {
                relay(&conn, io, original, Security::Passthrough).await
            }
        }
        First::Http => {
            conn.state.metrics.connection(Transport::Plaintext);
            let info = conn.info(Transport::Plaintext, None, false, Some(original));
            crate::http::serve(&conn, io, info).await
        }
        First::Other => {
            conn.state.metrics.connection(Transport::Plaintext);
            refuse_other(&conn, &without_bytes)
        }
    }
}

/// What the first bytes of a connection turned out to be.
enum First {
    Tls(Hello),
    Http,
    Other,
}

/// Reads until the first bytes say what the connection carries (for TLS, the whole
/// ClientHello), and gives the stream back with those bytes to be read again.
async fn first_bytes<S>(mut io: S) -> std::io::Result<(First, Prefixed<S>)>
where
    S: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(512);
    loop {
        let first = match sniff(&buf) {
            Sniffed::NeedMore => None,
            Sniffed::Http => Some(First::Http),
            Sniffed::Other => Some(First::Other),
            Sniffed::Tls => match hello::parse(&buf) {
                Parsed::Incomplete => None,
                Parsed::Hello(hello) => Some(First::Tls(hello)),
                // Looks like TLS and is not: nothing can be decided about it.
                Parsed::Invalid => Some(First::Other),
            },
        };
        if let Some(first) = first {
            return Ok((first, Prefixed::new(buf, io)));
        }
        if buf.len() > hello::MAX_HELLO + 1024 {
            return Ok((First::Other, Prefixed::new(buf, io)));
        }
        buf.reserve(4096);
        if io.read_buf(&mut buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Decides the app's own TLS, counts the decision, and says whether to relay it. A hello
/// that offers nothing at or above `min_tls_version` is refused, unless a rule names it.
fn passthrough(conn: &Conn, hello: &Hello, original: SocketAddr) -> bool {
    let facts = Facts {
        transport: Transport::Tls,
        source: Some(conn.source),
        server_name: hello.server_name.as_deref(),
        path: None,
        destination: Some(original.ip()),
        destination_port: Some(original.port()),
        client_verified: false,
    };
    let decision = policy::decide(&conn.state.policy, &facts);
    let floor = match conn.state.settings.min_tls_version {
        MinTlsVersion::Tls12 => hello::TLS12,
        MinTlsVersion::Tls13 => hello::TLS13,
    };
    if decision.rule.is_none() && hello.max_version < floor {
        conn.state.metrics.decision(None, DecisionLabel::Reject);
        return false;
    }
    count(conn, &decision);
    decision.action == Action::Allow
}

/// Other plaintext: it has no TLS to be sent on with, so whatever would have upgraded it
/// refuses it, and audit cannot let it out either (no plaintext leaves the host but by a
/// narrowed `allow`). Counted as a rejection under the rule that decided.
fn refuse_other(conn: &Conn, decision: &Decision) {
    conn.state
        .metrics
        .decision(decision.rule, DecisionLabel::Reject);
}

fn count(conn: &Conn, decision: &Decision) {
    conn.state.metrics.decision(decision.rule, decision.label());
}

/// Connects to the original destination and relays until either side closes or the
/// connection idles out.
async fn relay<C>(conn: &Conn, client: C, original: SocketAddr, security: Security)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let upstream = Upstream {
        addr: UpstreamAddr {
            host: original.ip().to_string(),
            port: original.port(),
        },
        security,
        timeout: conn.state.settings.handshake_timeout,
        metrics: conn.state.metrics.clone(),
    };
    let Ok(stream) = upstream.connect_to(&[original]).await else {
        return;
    };
    let _own = OwnConnection::register(&stream);
    crate::relay::relay(
        client,
        stream,
        &conn.clock,
        conn.state.settings.idle_timeout,
    )
    .await
}

/// Decides and answers one plaintext HTTP request of the app's.
pub async fn handle(
    proxy: &HttpProxy,
    route: &TransparentRoute,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    if let Some(refusal) = malformed(proxy, &req) {
        return refusal;
    }
    let Some(original) = conn.original.as_ref() else {
        return local(StatusCode::BAD_GATEWAY, "no original destination\n");
    };
    let Some(host) = request_host(&req)
        .and_then(policy::host_name)
        .filter(|h| policy::is_dns_name(h) || h.parse::<std::net::IpAddr>().is_ok())
    else {
        return local(StatusCode::BAD_REQUEST, "a valid Host header is required\n");
    };
    let normalized = policy::normalize_path(req.uri().path());
    let facts = Facts {
        transport: Transport::Plaintext,
        source: Some(conn.source),
        server_name: Some(&host),
        path: normalized.as_deref(),
        destination: Some(original.addr.ip()),
        destination_port: Some(original.addr.port()),
        client_verified: false,
    };
    let decision = proxy.count(policy::decide(&proxy.policy, &facts));
    let (scheme, port, security) = match decision.outbound() {
        Outbound::Refuse => return forbidden_by_rule(proxy, &decision),
        Outbound::Tls => {
            let Ok(name) = ServerName::try_from(host.to_string()) else {
                return local(StatusCode::BAD_REQUEST, "a valid Host header is required\n");
            };
            let security = Security::Tls(UpstreamTls {
                client: route.tls.clone(),
                server_name: name,
            });
            // Plain HTTP's port becomes HTTPS's; any other keeps its number.
            let port = match original.addr.port() {
                80 => 443,
                port => port,
            };
            (Scheme::HTTPS, port, security)
        }
        Outbound::Plaintext => (
            Scheme::HTTP,
            original.addr.port(),
            Security::PlaintextException,
        ),
    };
    let Some(authority) = authority(&host, port) else {
        return local(StatusCode::BAD_REQUEST, "a valid Host header is required\n");
    };
    let upstream = Upstream {
        addr: UpstreamAddr {
            host: host.into_owned(),
            port,
        },
        security,
        timeout: route.timeout,
        metrics: route.metrics.clone(),
    };
    let rewritten = rewritten_path(normalized);
    let target = Target {
        upstream,
        addr: SocketAddr::new(original.addr.ip(), port),
    };
    forward(
        proxy,
        conn,
        req,
        rewritten.as_deref(),
        HostHeader::Destination,
        scheme,
        authority,
        Via::Kept(&original.kept, &target),
    )
    .await
}

fn authority(host: &str, port: u16) -> Option<Authority> {
    let text = match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        _ => format!("{host}:{port}"),
    };
    Authority::try_from(text).ok()
}

/// Where one request goes: how, and to which address (the original destination's, with the
/// port the decision chose).
pub struct Target {
    upstream: Upstream,
    addr: SocketAddr,
}

/// The upstream connection an app connection's HTTP requests go on, kept between them while
/// they go to the same place.
#[derive(Default)]
pub struct Kept(Mutex<Option<KeptConnection>>);

struct KeptConnection {
    /// Where it goes: the address, whether TLS, and the name verified.
    to: (SocketAddr, bool, Box<str>),
    sender: Sender,
    _own: OwnConnection,
}

enum Sender {
    H1(http1::SendRequest<Incoming>),
    H2(http2::SendRequest<Incoming>),
}

impl Kept {
    /// Sends `req` on the kept connection when it goes to `target` and is free, else on a new
    /// one, which is then kept.
    pub async fn send(
        &self,
        target: &Target,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, BoxError> {
        let to = (
            target.addr,
            target.upstream.uses_tls(),
            target.upstream.addr.host.as_str().into(),
        );
        let kept = {
            let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            match slot.take() {
                Some(k) if k.to == to && k.sender.is_ready() => Some(k),
                _ => None,
            }
        };
        let (mut connection, reused) = match kept {
            Some(k) => (k, true),
            None => (connect(target, to).await?, false),
        };
        let response = match connection.sender.send(req).await {
            Ok(response) => response,
            // The destination closed the kept connection while it sat idle: once more, new.
            Err((_, Some(req))) if reused => {
                connection = connect(target, connection.to).await?;
                connection.sender.send(req).await.map_err(|(e, _)| e)?
            }
            Err((error, _)) => return Err(error),
        };
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(connection);
        Ok(response)
    }
}

impl Sender {
    fn is_ready(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_ready(),
            Sender::H2(s) => s.is_ready(),
        }
    }

    /// Sends a request; on failure, the request back when it was never written.
    async fn send(
        &mut self,
        mut req: Request<Incoming>,
    ) -> Result<Response<Incoming>, (BoxError, Option<Request<Incoming>>)> {
        match self {
            Sender::H1(sender) => {
                // HTTP/1.1 on a direct connection takes the origin form.
                let origin = req.uri().path_and_query().cloned();
                *req.uri_mut() =
                    Uri::from(origin.unwrap_or_else(|| PathAndQuery::from_static("/")));
                sender.try_send_request(req).await.map_err(|mut e| {
                    let req = e.take_message();
                    (e.into_error().into(), req)
                })
            }
            Sender::H2(sender) => sender.send_request(req).await.map_err(|e| (e.into(), None)),
        }
    }
}

async fn connect(
    target: &Target,
    to: (SocketAddr, bool, Box<str>),
) -> Result<KeptConnection, BoxError> {
    let stream = target.upstream.connect_to(&[target.addr]).await?;
    let own = OwnConnection::register(&stream);
    let sender = if stream.negotiated_h2() {
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Sender::H2(sender)
    } else {
        let (sender, conn) = http1::handshake::<_, Incoming>(TokioIo::new(stream)).await?;
        tokio::spawn(conn.with_upgrades());
        Sender::H1(sender)
    };
    Ok(KeptConnection {
        to,
        sender,
        _own: own,
    })
}

/// The local addresses of ciphergate's own connections to original destinations, while they
/// are open. A connection arriving from one of them is one of ours come back.
static OWN: LazyLock<Mutex<HashSet<SocketAddr>>> = LazyLock::new(Default::default);

/// One of ciphergate's connections, known as its own until dropped.
struct OwnConnection(Option<SocketAddr>);

impl OwnConnection {
    fn register(stream: &UpstreamStream) -> Self {
        let addr = stream.local_addr().ok();
        if let Some(addr) = addr {
            OWN.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(addr);
        }
        OwnConnection(addr)
    }
}

impl Drop for OwnConnection {
    fn drop(&mut self) {
        if let Some(addr) = self.0 {
            OWN.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&addr);
        }
    }
}

fn is_own(peer: SocketAddr) -> bool {
    OWN.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .contains(&peer)
}
