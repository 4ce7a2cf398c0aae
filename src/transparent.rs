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
//! match (a destination) relays at once, so protocols where the server speaks first work;
//! everything else waits for the app's first bytes, under `handshake_timeout`.
//!
//! The app chooses its Host, SNI and path, and they say nothing about the address it dialled.
//! So a plaintext exception matched by `server_name` alone holds only when that name resolves
//! to the original destination; and relayed TLS is watched record by record
//! ([`RecordWatch`]): plaintext after a ClientHello, or a server that settles on a version
//! under `min_tls_version`, ends the relay.
//!
//! ciphergate's own connections carry its uid, which the netfilter rules exempt. If that
//! exemption is missing (a wrong `proxy_uid`), one of them comes back here: each is registered
//! by its local port and destination before its SYN goes out, so it is recognised at once and
//! closed, and the misconfiguration costs one refused hop, not a loop.
//!
//! Nothing here logs, and no address, port, Host or SNI leaves this module but to connect.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use http::HeaderValue;
use http::uri::{Authority, Scheme};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::UpstreamAddr;
use crate::conn::{Conn, Held};
use crate::detect::{Sniffed, sniff};
use crate::http::{
    BoxError, ConnInfo, HostHeader, HttpProxy, ProxyBody, Sender, Via, forbidden_by_rule, forward,
    local, malformed, request_host, rewritten_path,
};
use crate::io::{Inspected, Prefixed};
use crate::listener::ListenerState;
use crate::metrics::{DecisionLabel, ListenerMetrics, UpstreamFailure};
use crate::policy::{self, Action, Decision, Facts, ListenerPolicy, Outbound, Transport};
use crate::tls::MinTlsVersion;
use crate::tls::client::{ClientTls, UpstreamTls};
use crate::tls::hello::{self, Hello, Parsed};
use crate::tls::records::RecordWatch;
use crate::upstream::{Security, Upstream, UpstreamStream};

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

/// The facts of a connection to `original`, before anything is known of its bytes.
fn facts<'a>(source: IpAddr, original: SocketAddr, transport: Transport) -> Facts<'a> {
    Facts {
        transport,
        source: Some(source),
        server_name: None,
        path: None,
        destination: Some(original.ip()),
        destination_port: Some(original.port()),
        client_verified: false,
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
    let Ok(local) = stream.local_addr() else {
        return;
    };
    // Not redirected (the app dialled the listener itself), or one of ciphergate's own
    // connections come back: there is nowhere to send it.
    let original = match crate::sys::original_destination(&stream, local.is_ipv6()) {
        Ok(original) if original != local && !is_own(peer, original) => original,
        _ => return state.metrics.decision(None, DecisionLabel::Reject),
    };
    let Ok(stream) = TcpStream::from_std(stream) else {
        return;
    };
    let (conn, io) = Conn::new(state, stream, peer, held, shutdown, tasks);
    // A plaintext exception for this destination needs no bytes to decide: relay now, so a
    // protocol whose server speaks first is not held up. (Counted as plaintext: it is decided
    // before a byte is seen.)
    let without_bytes = policy::decide(
        &conn.state.policy,
        &facts(conn.source, original, Transport::Plaintext),
    );
    if without_bytes.rule.is_some() && without_bytes.outbound() == Outbound::Plaintext {
        conn.state.metrics.connection(Transport::Plaintext);
        count(&conn, &without_bytes);
        return relay(&conn, io, original, Security::PlaintextException, None).await;
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
            if let Some(floor) = passthrough(&conn, &hello, original) {
                relay(&conn, io, original, Security::Passthrough, Some(floor)).await
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
        buf.reserve(4096);
        if io.read_buf(&mut buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Decides the app's own TLS and counts the decision: the version floor the relay must hold
/// the server to, or `None` to close. A hello that offers nothing at or above
/// `min_tls_version` is refused whatever the rules say.
fn passthrough(conn: &Conn, hello: &Hello, original: SocketAddr) -> Option<u16> {
    let floor = match conn.state.settings.min_tls_version {
        MinTlsVersion::Tls12 => hello::TLS12,
        MinTlsVersion::Tls13 => hello::TLS13,
    };
    if hello.max_version < floor {
        conn.state.metrics.decision(None, DecisionLabel::Reject);
        return None;
    }
    let decision = policy::decide(
        &conn.state.policy,
        &Facts {
            server_name: hello.server_name.as_deref(),
            ..facts(conn.source, original, Transport::Tls)
        },
    );
    count(conn, &decision);
    (decision.action == Action::Allow).then_some(floor)
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
/// connection idles out. With a `floor`, both directions must stay TLS records and the server
/// must choose at least that version.
async fn relay<C>(
    conn: &Conn,
    client: C,
    original: SocketAddr,
    security: Security,
    floor: Option<u16>,
) where
    C: AsyncRead + AsyncWrite + Unpin,
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
    let Ok((stream, _own)) = dial(&upstream, original).await else {
        return;
    };
    let (clock, idle) = (&conn.clock, conn.state.settings.idle_timeout);
    match floor {
        Some(floor) => {
            let client = Inspected::new(client, RecordWatch::client());
            let stream = Inspected::new(stream, RecordWatch::server(floor));
            crate::relay::relay(client, stream, clock, idle).await
        }
        None => crate::relay::relay(client, stream, clock, idle).await,
    }
}

/// Opens ciphergate's own connection to `to`, registered as its own before its SYN goes out,
/// and makes the leg over it. Counts any failure.
async fn dial(
    upstream: &Upstream,
    to: SocketAddr,
) -> Result<(UpstreamStream, OwnConnection), UpstreamFailure> {
    let connected = timeout(upstream.timeout, async {
        let (socket, any) = match to {
            SocketAddr::V4(_) => (TcpSocket::new_v4()?, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            SocketAddr::V6(_) => (TcpSocket::new_v6()?, IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        };
        socket.set_nodelay(true)?;
        socket.bind(SocketAddr::new(any, 0))?;
        let own = OwnConnection::register(socket.local_addr()?.port(), to);
        Ok::<_, std::io::Error>((socket.connect(to).await?, own))
    })
    .await;
    let (tcp, own) = match connected {
        Ok(Ok(connected)) => connected,
        Ok(Err(_)) => {
            upstream.metrics.upstream_error(UpstreamFailure::Connect);
            return Err(UpstreamFailure::Connect);
        }
        Err(_) => {
            upstream.metrics.upstream_error(UpstreamFailure::Timeout);
            return Err(UpstreamFailure::Timeout);
        }
    };
    Ok((upstream.over(tcp).await?, own))
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
        .filter(|h| policy::is_dns_name(h) || h.parse::<IpAddr>().is_ok())
    else {
        return local(StatusCode::BAD_REQUEST, "a valid Host header is required\n");
    };
    let normalized = policy::normalize_path(req.uri().path());
    let facts = Facts {
        server_name: Some(&host),
        path: normalized.as_deref(),
        ..facts(conn.source, original.addr, Transport::Plaintext)
    };
    let decision = proxy.count(decide_http(&proxy.policy, &facts, &host, original.addr).await);
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
    // Over TLS the destination sees the authority it is reached at (`name`, not `name:80`);
    // a plaintext exception carries the app's own Host.
    let host_header = match scheme == Scheme::HTTPS {
        true => {
            let text = if port == 443 {
                authority.host()
            } else {
                authority.as_str()
            };
            match HeaderValue::from_str(text) {
                Ok(value) => HostHeader::Set(value),
                Err(_) => return local(StatusCode::BAD_REQUEST, "invalid Host\n"),
            }
        }
        false => HostHeader::Destination,
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
        host_header,
        scheme,
        authority,
        Via::Kept(&original.kept, &target),
    )
    .await
}

/// Decides a request. A plaintext exception matched by `server_name` without a `destination`
/// holds only when the Host resolves to the address the app dialled: the app chooses its Host,
/// and a name must not let plaintext go to any address. Otherwise the request is decided as
/// if it named no host.
async fn decide_http(
    policy: &ListenerPolicy,
    facts: &Facts<'_>,
    host: &str,
    original: SocketAddr,
) -> Decision {
    let decision = policy::decide(policy, facts);
    let Some(rule) = decision.rule.map(|i| &policy.rules[i]) else {
        return decision;
    };
    if decision.outbound() != Outbound::Plaintext
        || rule.server_name.is_empty()
        || !rule.destination.is_empty()
    {
        return decision;
    }
    let resolved = timeout(
        Duration::from_secs(5),
        tokio::net::lookup_host((host, original.port())),
    )
    .await;
    let dialled = original.ip().to_canonical();
    let holds = match resolved {
        Ok(Ok(mut addrs)) => addrs.any(|a| a.ip().to_canonical() == dialled),
        _ => false,
    };
    if holds {
        decision
    } else {
        policy::decide(
            policy,
            &Facts {
                server_name: None,
                ..*facts
            },
        )
    }
}

fn authority(host: &str, port: u16) -> Option<Authority> {
    let text = match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
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

/// Where a kept connection goes: the address, whether TLS, and the name verified.
type KeptTo = (SocketAddr, bool, Box<str>);

/// The upstream connection an app connection's HTTP requests go on, kept between them while
/// they go to the same place.
#[derive(Default)]
pub struct Kept(Mutex<Option<KeptConnection>>);

struct KeptConnection {
    to: KeptTo,
    sender: Sender,
    _own: OwnConnection,
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
            slot.take().filter(|k| k.to == to && k.sender.is_ready())
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

async fn connect(target: &Target, to: KeptTo) -> Result<KeptConnection, BoxError> {
    let (stream, own) = dial(&target.upstream, target.addr).await?;
    Ok(KeptConnection {
        to,
        sender: Sender::handshake(stream).await?,
        _own: own,
    })
}

/// ciphergate's own connections to original destinations while they are open, by local port
/// and destination (a port is reused for other destinations), with how many hold each.
static OWN: LazyLock<Mutex<HashMap<(u16, SocketAddr), usize>>> = LazyLock::new(Default::default);

/// One of ciphergate's connections, known as its own until dropped.
struct OwnConnection((u16, SocketAddr));

impl OwnConnection {
    fn register(port: u16, to: SocketAddr) -> Self {
        let key = (port, canonical(to));
        *OWN.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default() += 1;
        OwnConnection(key)
    }
}

impl Drop for OwnConnection {
    fn drop(&mut self) {
        let mut own = OWN.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = own.get_mut(&self.0) {
            *count -= 1;
            if *count == 0 {
                own.remove(&self.0);
            }
        }
    }
}

/// Whether a connection from `peer` to `original` is one of ciphergate's own come back.
fn is_own(peer: SocketAddr, original: SocketAddr) -> bool {
    OWN.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .contains_key(&(peer.port(), canonical(original)))
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}
