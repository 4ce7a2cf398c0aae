//! The HTTP side of a listener: one decision per request, then forward, redirect or refuse.
//!
//! Terminate listeners:
//!
//! | action  | plaintext request            | TLS request           |
//! |---------|------------------------------|-----------------------|
//! | allow   | forward                      | forward (+ HSTS)      |
//! | upgrade | 308 to `https://host[:port]` | (never matches TLS)   |
//! | reject  | 426 + `Connection: close`    | 403                   |
//!
//! Originate listeners: `upgrade` (the default for the app's plaintext) forwards over verified
//! TLS, `allow` forwards plaintext (only a narrowed rule can say so) and `reject` answers 403
//! naming the rule. Without a fixed upstream the listener is a forward proxy ([`crate::forward`]).
//!
//! When a rule tests `destination`, the upstream name is resolved first, every address is
//! decided, and the request goes on a fresh connection to the addresses that got the same
//! decision: what the policy approved is where the bytes go.

use std::borrow::Cow;
use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::task::TaskTracker;

use crate::boxed;
use crate::config::{ListenerConfig, Settings};
use crate::conn::Conn;
use crate::conn::Held;
use crate::forward::ForwardProxy;
use crate::io::IdleClock;
use crate::listener::{MAX_H2_STREAMS, MAX_REQUEST_HEAD, MAX_REQUEST_HEADERS};
use crate::metrics::{ListenerMetrics, UpstreamFailure};
use crate::policy::{self, Action, Decision, Facts, ListenerPolicy, Mode, Outbound, Transport};
use crate::pool::{LocalPool, Sticky};
use crate::transparent::{Kept, Original, Target, TransparentRoute};
use crate::upstream::{Connector, Security, Upstream, UpstreamStream};
use crate::workers::PerWorker;

/// The body of every response ciphergate sends: the upstream's, streamed, or a short local one.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// A pooled upstream client (keep-alive HTTP/1.1, or HTTP/2 when ALPN says so), one pool per
/// worker.
pub type PooledClient = PerWorker<Client<Connector, Incoming>>;

/// How long an unused pooled upstream connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

pub fn pooled_client(connector: Connector) -> PooledClient {
    PerWorker::new(|| {
        Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .http2_adaptive_window(true)
            .build(connector.clone())
    })
}

/// One fixed upstream as the HTTP side uses it: how to reach it, a pooled client, and the URI
/// parts that address it. A clone is another handle on the same leg and its connections.
#[derive(Clone)]
pub struct HttpUpstream {
    pub target: Arc<Upstream>,
    /// Shared with the listener's earlier and later states while the leg stays the same.
    client: Arc<PooledClient>,
    scheme: Scheme,
    authority: Authority,
    /// The Host an originate listener sends: the upstream's name, with its port unless it is
    /// the scheme's default.
    host_header: HeaderValue,
    /// For the app beside a terminate listener (plaintext on loopback): connections kept per
    /// client connection, see [`crate::pool`].
    local: Option<Arc<LocalPool>>,
}

impl HttpUpstream {
    /// The leg to `target`, keeping the open connections of an earlier state's leg when it is
    /// the same one (see [`Upstream::same_leg`]): a reload then costs the app no new
    /// connections. Discarding them would make every client connection opened after a reload
    /// open its own again, at once, and an app with a short accept queue (Python's
    /// `http.server` has 5) drops such a burst: those requests wait seconds for the kernel's
    /// retransmissions.
    pub fn new(target: Arc<Upstream>, earlier: &[&HttpUpstream]) -> Self {
        match earlier.iter().find(|e| e.target.same_leg(&target)) {
            Some(same) => HttpUpstream::clone(same),
            None => Self::fresh(target),
        }
    }

    fn fresh(target: Arc<Upstream>) -> Self {
        let scheme = if target.uses_tls() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let authority = Authority::try_from(target.addr.authority())
            .expect("a validated upstream address is a valid authority");
        let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
        let host_header = if target.addr.port == default_port {
            authority.host().to_owned()
        } else {
            authority.as_str().to_owned()
        };
        let host_header = HeaderValue::try_from(host_header)
            .expect("a validated upstream address is a valid header value");
        let local = matches!(target.security, Security::LoopbackPlaintext)
            .then(|| LocalPool::new(target.clone()));
        HttpUpstream {
            host_header,
            local,
            client: Arc::new(pooled_client(Connector::Fixed(target.clone()))),
            target,
            scheme,
            authority,
        }
    }

    fn pooled(&self) -> (Via<'_>, Scheme, Authority) {
        (
            Via::Pool(&self.client),
            self.scheme.clone(),
            self.authority.clone(),
        )
    }

    fn pinned(&self, addrs: Vec<SocketAddr>) -> (Via<'_>, Scheme, Authority) {
        (
            Via::Pinned(&self.target, addrs),
            self.scheme.clone(),
            self.authority.clone(),
        )
    }
}

/// Where a listener's requests go.
pub enum Route {
    /// A terminate listener: the app beside it, or a re-originated TLS upstream.
    Terminate(HttpUpstream),
    /// An originate listener with a fixed upstream.
    Originate {
        /// Verified TLS: the default.
        tls: HttpUpstream,
        /// Plaintext, used only when a narrowed `allow` rule matches; `None` when no rule of
        /// the listener could allow plaintext.
        plaintext_exception: Option<Box<HttpUpstream>>,
    },
    /// An originate listener without an upstream: a forward proxy for `HTTP_PROXY`.
    Forward(ForwardProxy),
    /// A transparent listener: each request to its connection's original destination.
    Transparent(TransparentRoute),
}

impl Route {
    /// The fixed upstream legs of this route.
    pub fn upstreams(&self) -> Vec<&HttpUpstream> {
        match self {
            Route::Terminate(upstream) => vec![upstream],
            Route::Originate {
                tls,
                plaintext_exception,
            } => std::iter::once(tls)
                .chain(plaintext_exception.as_deref())
                .collect(),
            Route::Forward(_) | Route::Transparent(_) => Vec::new(),
        }
    }
}

/// The per-listener HTTP state, built once per config and shared by its connections.
pub struct HttpProxy {
    /// The HTTP/1.1 and HTTP/2 server settings its connections are served with.
    pub server: auto::Builder<StreamExecutor>,
    pub policy: ListenerPolicy,
    pub metrics: ListenerMetrics,
    pub route: Route,
    pub hsts: Option<HeaderValue>,
    pub redirect_port: u16,
}

impl HttpProxy {
    /// `bound_port` is the port the listener's socket actually has, the default redirect port.
    pub fn new(
        config: &ListenerConfig,
        bound_port: u16,
        route: Route,
        metrics: ListenerMetrics,
    ) -> Self {
        HttpProxy {
            server: http_server(&config.settings),
            policy: config.policy.clone(),
            metrics,
            route,
            hsts: config.settings.hsts.clone(),
            redirect_port: config.redirect_port.unwrap_or(bound_port),
        }
    }

    /// The per-connection upstream slot for a new client connection, when this listener
    /// forwards to the app beside it.
    pub fn sticky(&self) -> Option<Sticky> {
        match &self.route {
            Route::Terminate(upstream) => upstream.local.clone().map(Sticky::new),
            _ => None,
        }
    }

    pub fn mode(&self) -> Mode {
        match self.route {
            Route::Terminate(_) => Mode::Terminate,
            Route::Originate { .. } | Route::Forward(_) => Mode::Originate,
            Route::Transparent(_) => Mode::Transparent,
        }
    }

    /// Counts a decision and returns it.
    pub fn count(&self, decision: Decision) -> Decision {
        self.metrics.decision(decision.rule, decision.label());
        decision
    }
}

/// What is known about the client connection a request arrived on, and what keeps it
/// accounted for when an upgrade hands its socket to a tunnel.
pub struct ConnInfo {
    pub transport: Transport,
    pub source: IpAddr,
    /// The SNI of a TLS connection, lowercased.
    pub sni: Option<Box<str>>,
    pub client_verified: bool,
    /// The connection's permit and active-gauge entry; a tunnel holds a clone.
    pub held: Arc<Held>,
    pub clock: Arc<IdleClock>,
    pub idle_timeout: Duration,
    /// Tunnels are spawned here, so a drain waits for them.
    pub tasks: TaskTracker,
    /// The upstream connection this client connection keeps to the app beside it.
    pub sticky: Option<Sticky>,
    /// Where a transparent listener's connection was headed.
    pub original: Option<Original>,
}

/// Decides and answers one request. Every response is counted by class.
pub async fn handle(
    proxy: &HttpProxy,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let mut response = match &proxy.route {
        Route::Terminate(upstream) => terminate(proxy, upstream, conn, req).await,
        Route::Originate {
            tls,
            plaintext_exception,
        } => {
            boxed(originate(
                proxy,
                tls,
                plaintext_exception.as_deref(),
                conn,
                req,
            ))
            .await
        }
        Route::Forward(forward) => boxed(crate::forward::handle(proxy, forward, conn, req)).await,
        Route::Transparent(route) => {
            boxed(crate::transparent::handle(proxy, route, conn, req)).await
        }
    };
    if conn.transport == Transport::Tls
        && proxy.mode() == Mode::Terminate
        && let Some(hsts) = &proxy.hsts
    {
        response
            .headers_mut()
            .entry(header::STRICT_TRANSPORT_SECURITY)
            .or_insert_with(|| hsts.clone());
    }
    proxy.metrics.response(response.status());
    response
}

/// The normalised path, owned only when normalisation changed it (the common case allocates
/// nothing).
pub fn rewritten_path(normalized: Option<Cow<'_, str>>) -> Option<String> {
    match normalized {
        Some(Cow::Owned(path)) => Some(path),
        _ => None,
    }
}

async fn terminate(
    proxy: &HttpProxy,
    upstream: &HttpUpstream,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    if let Some(refusal) = malformed(proxy, &req) {
        return refusal;
    }
    // The path and host borrow the request; decide in a scope of their own so the request can
    // be moved on afterwards.
    let (decision, rewritten) = {
        let normalized = policy::normalize_path(req.uri().path());
        let host = request_host(&req).and_then(policy::host_name);
        // On TLS the policy decides by SNI: a request for another host on this connection
        // (h2 coalescing, or a deliberate mismatch) must come on its own connection.
        if let (Some(sni), Some(host)) = (conn.sni.as_deref(), host.as_deref())
            && sni != host
        {
            return local(
                StatusCode::MISDIRECTED_REQUEST,
                "this connection is for another host\n",
            );
        }
        let server_name = match conn.transport {
            Transport::Tls => conn.sni.as_deref(),
            Transport::Plaintext => host.as_deref(),
        };
        let facts = Facts {
            transport: conn.transport,
            source: Some(conn.source),
            server_name,
            path: normalized.as_deref(),
            destination: None,
            destination_port: None,
            client_verified: conn.client_verified,
        };
        let decision = proxy.count(policy::decide(&proxy.policy, &facts));
        if decision.action == Action::Upgrade {
            return redirect(host.as_deref(), proxy.redirect_port, req.uri());
        }
        (decision, rewritten_path(normalized))
    };
    match (decision.action, conn.transport) {
        (Action::Reject, Transport::Plaintext) => upgrade_required(),
        (Action::Reject, Transport::Tls) => local(StatusCode::FORBIDDEN, "forbidden by policy\n"),
        _ => {
            let (via, scheme, authority) = match (&upstream.local, &conn.sticky) {
                (Some(pool), Some(sticky)) => (
                    Via::Local(pool, sticky),
                    upstream.scheme.clone(),
                    upstream.authority.clone(),
                ),
                _ => upstream.pooled(),
            };
            forward(
                proxy,
                conn,
                req,
                rewritten.as_deref(),
                HostHeader::FromRequest,
                scheme,
                authority,
                via,
            )
            .await
        }
    }
}

async fn originate(
    proxy: &HttpProxy,
    tls: &HttpUpstream,
    plaintext_exception: Option<&HttpUpstream>,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    if let Some(refusal) = malformed(proxy, &req) {
        return refusal;
    }
    let normalized = policy::normalize_path(req.uri().path());
    let facts = Facts {
        transport: conn.transport,
        source: Some(conn.source),
        server_name: Some(&tls.target.addr.host),
        path: normalized.as_deref(),
        destination: None,
        destination_port: Some(tls.target.addr.port),
        client_verified: false,
    };
    let (decision, addrs) = match decide_originate(&proxy.policy, &facts, &tls.target).await {
        Ok(decided) => decided,
        Err(failure) => return failure_response(failure),
    };
    let decision = proxy.count(decision);
    let rewritten = rewritten_path(normalized);
    let leg = match decision.outbound() {
        Outbound::Refuse => return forbidden_by_rule(proxy, &decision),
        Outbound::Tls => tls,
        Outbound::Plaintext => match plaintext_exception {
            Some(plain) => plain,
            // The exception leg exists whenever a rule could allow; fail closed regardless.
            None => return forbidden_by_rule(proxy, &decision),
        },
    };
    let (via, scheme, authority) = match addrs {
        Some(addrs) => leg.pinned(addrs),
        None => leg.pooled(),
    };
    // The app addressed ciphergate; the upstream must see its own name.
    let host = HostHeader::Set(leg.host_header.clone());
    forward(
        proxy,
        conn,
        req,
        rewritten.as_deref(),
        host,
        scheme,
        authority,
        via,
    )
    .await
}

/// Decides an originate request or connection. When a rule tests `destination`, `target` is
/// resolved first and the addresses that got the decision come back with it; otherwise no
/// lookup happens here (the connection resolves at connect time).
pub async fn decide_originate(
    policy: &ListenerPolicy,
    facts: &Facts<'_>,
    target: &Upstream,
) -> Result<(Decision, Option<Vec<SocketAddr>>), UpstreamFailure> {
    if !policy.needs_destination() {
        return Ok((policy::decide(policy, facts), None));
    }
    let addrs = target.resolve().await?;
    let (decision, approved) = policy::decide_destinations(policy, facts, &addrs);
    Ok((decision, Some(approved)))
}

/// 403 naming the rule that refused (originate listeners: the local app may be told why).
pub fn forbidden_by_rule(proxy: &HttpProxy, decision: &Decision) -> Response<ProxyBody> {
    local(
        StatusCode::FORBIDDEN,
        format!(
            "forbidden by ciphergate rule `{}`\n",
            decision.rule_name(&proxy.policy)
        ),
    )
}

/// The request's host: the URI authority (HTTP/2, absolute-form) or the Host header.
pub fn request_host(req: &Request<Incoming>) -> Option<&str> {
    req.uri()
        .authority()
        .map(Authority::as_str)
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

pub fn local(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(body.into())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn upgrade_required() -> Response<ProxyBody> {
    let mut response = local(
        StatusCode::UPGRADE_REQUIRED,
        "plaintext is not accepted here: connect with https\n",
    );
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    headers.insert(
        header::UPGRADE,
        HeaderValue::from_static("TLS/1.3, TLS/1.2"),
    );
    response
}

/// `308` to the same request over https: the Host's name without its port, then
/// `:redirect_port` unless it is 443.
fn redirect(host: Option<&str>, port: u16, uri: &Uri) -> Response<ProxyBody> {
    let Some(host) = host.filter(|h| policy::is_dns_name(h) || h.parse::<IpAddr>().is_ok()) else {
        return local(StatusCode::BAD_REQUEST, "a valid Host header is required\n");
    };
    let host = match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
        _ => host.to_owned(),
    };
    let path = uri.path_and_query().map_or("/", PathAndQuery::as_str);
    let location = if port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{port}{path}")
    };
    let Ok(location) = HeaderValue::try_from(location) else {
        return local(StatusCode::BAD_REQUEST, "invalid request target\n");
    };
    let mut response = local(StatusCode::PERMANENT_REDIRECT, "use https\n");
    response.headers_mut().insert(header::LOCATION, location);
    response
}

/// How a request reaches its upstream.
pub enum Via<'a> {
    /// A pooled client; the URI names the upstream.
    Pool(&'a PooledClient),
    /// A fresh connection to addresses the policy approved.
    Pinned(&'a Upstream, Vec<SocketAddr>),
    /// The client connection's own connection to the app beside it.
    Local(&'a LocalPool, &'a Sticky),
    /// The connection a transparent listener's client connection keeps to where it was
    /// headed.
    Kept(&'a Kept, &'a Target),
}

/// Sends the request on and streams the answer back. The upstream sees the normalised path the
/// policy decided on (`rewritten` is set when normalisation changed it), without the client's
/// hop-by-hop headers.
#[allow(clippy::too_many_arguments)]
pub async fn forward(
    proxy: &HttpProxy,
    conn: &ConnInfo,
    mut req: Request<Incoming>,
    rewritten: Option<&str>,
    host: HostHeader,
    scheme: Scheme,
    authority: Authority,
    via: Via<'_>,
) -> Response<ProxyBody> {
    let upgrade = wants_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();

    let path_and_query = match (rewritten, parts.uri.path_and_query()) {
        (Some(path), Some(original)) => {
            let rebuilt = match original.query() {
                Some(query) => format!("{path}?{query}"),
                None => path.to_owned(),
            };
            match PathAndQuery::try_from(rebuilt) {
                Ok(rebuilt) => Some(rebuilt),
                Err(_) => return local(StatusCode::BAD_REQUEST, "invalid request target\n"),
            }
        }
        (_, original) => original.cloned(),
    };
    // The upstream sees the host the policy decided on: the request target's authority when
    // there is one (HTTP/2, absolute-form; RFC 9112 §3.2.2), replacing any Host header.
    let from_request = || {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .or_else(|| parts.headers.get(header::HOST).cloned())
    };
    let (host_value, authority) = match host {
        HostHeader::Set(value) => (Some(value), authority),
        HostHeader::Destination => (from_request(), authority),
        // A fixed upstream is connected to whatever the URI says, so the URI can carry the
        // client's host: HTTP/2 upstreams then see it as `:authority`.
        HostHeader::FromRequest => {
            // An HTTP/1.0 client may send no Host, but the upstream gets HTTP/1.1, which
            // requires one (an app would answer 400 and close): the name the client connected
            // to, else the upstream's own, as the server's default authority (RFC 9112 §3.3).
            // Later versions must send one; without it the app answers as it sees fit.
            let default_host = || {
                let name = conn.sni.as_deref().unwrap_or(authority.as_str());
                HeaderValue::from_str(name).ok()
            };
            let value = match from_request() {
                None if parts.version == Version::HTTP_10 => default_host(),
                value => value,
            };
            let carried = value
                .as_ref()
                .and_then(|v| Authority::try_from(v.as_bytes()).ok())
                .unwrap_or(authority);
            (value, carried)
        }
    };
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(scheme);
    uri.authority = Some(authority);
    uri.path_and_query = Some(path_and_query.unwrap_or_else(|| PathAndQuery::from_static("/")));
    let Ok(uri) = Uri::from_parts(uri) else {
        return local(StatusCode::BAD_REQUEST, "invalid request target\n");
    };
    parts.uri = uri;
    parts.version = Version::HTTP_11;

    strip_hop_by_hop(&mut parts.headers, upgrade);
    if let Some(host) = host_value {
        parts.headers.insert(header::HOST, host);
    }
    if proxy.mode() == Mode::Terminate {
        // ciphergate is the trust boundary: whatever the client claims about forwarding is
        // dropped, and the one fact it vouches for is set.
        if parts
            .headers
            .keys()
            .any(|name| SPOOFABLE.contains(&name.as_str()))
        {
            for name in SPOOFABLE {
                parts.headers.remove(name);
            }
        }
        let proto = match conn.transport {
            Transport::Tls => "https",
            Transport::Plaintext => "http",
        };
        parts
            .headers
            .insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }

    let req = Request::from_parts(parts, body);
    let sent = match via {
        Via::Pool(client) => client
            .get()
            .request(req)
            .await
            .map_err(|e| Box::new(e) as BoxError),
        Via::Pinned(upstream, addrs) => boxed(send_pinned(upstream, &addrs, req)).await,
        Via::Local(pool, sticky) => pool.send(sticky, req).await,
        Via::Kept(kept, target) => kept.send(target, req).await,
    };
    let mut response = match sent {
        Ok(response) => response,
        Err(error) => return failure_response(classify(&proxy.metrics, &*error)),
    };

    if upgrade && response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        if let Some(client_upgrade) = client_upgrade {
            let held = conn.held.clone();
            let clock = conn.clock.clone();
            let idle = conn.idle_timeout;
            conn.tasks.spawn(async move {
                let _held = held;
                if let (Ok(client), Ok(upstream)) = tokio::join!(client_upgrade, upstream_upgrade) {
                    crate::relay::relay(TokioIo::new(client), TokioIo::new(upstream), &clock, idle)
                        .await;
                }
            });
        }
    } else {
        strip_hop_by_hop(response.headers_mut(), false);
    }
    response.map(Either::Left)
}

const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Forwarding claims a client could make up; removed on terminate listeners.
const SPOOFABLE: [&str; 7] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-real-ip",
    "x-forwarded-client-cert",
    "x-client-cert",
];

/// The Host header the upstream gets.
pub enum HostHeader {
    /// The client's (the request target's authority if it has one, else its Host header), to
    /// a fixed upstream (terminate listeners).
    FromRequest,
    /// The client's, to the destination it names (forward proxy).
    Destination,
    /// A fixed value (the upstream's own name, on originate listeners).
    Set(HeaderValue),
}

/// A request refused before any decision: more than one Host header, or (when rules test
/// paths) a path servers are known to read differently.
pub fn malformed(proxy: &HttpProxy, req: &Request<Incoming>) -> Option<Response<ProxyBody>> {
    if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
        return Some(local(
            StatusCode::BAD_REQUEST,
            "more than one Host header\n",
        ));
    }
    if proxy.policy.needs_path() && policy::is_ambiguous_path(req.uri().path()) {
        return Some(local(
            StatusCode::BAD_REQUEST,
            "ambiguous path: encoded slashes, backslashes, NUL and `..;` segments are refused\n",
        ));
    }
    None
}

pub type BoxError = Box<dyn StdError + Send + Sync>;

/// One request on a fresh connection to `addrs`.
async fn send_pinned(
    upstream: &Upstream,
    addrs: &[SocketAddr],
    req: Request<Incoming>,
) -> Result<Response<Incoming>, BoxError> {
    let stream = upstream.connect_to(addrs).await?;
    let mut sender = Sender::handshake(stream).await?;
    sender.send(req).await.map_err(|(error, _)| error)
}

/// A client connection to an upstream: HTTP/2 when ALPN chose it, else HTTP/1.1 (with
/// upgrades, for WebSocket).
pub enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Incoming>),
    H2(hyper::client::conn::http2::SendRequest<Incoming>),
}

impl Sender {
    /// The HTTP handshake on a connected leg; its connection task is spawned here.
    pub async fn handshake(stream: UpstreamStream) -> Result<Sender, BoxError> {
        if stream.negotiated_h2() {
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await?;
            tokio::spawn(conn);
            Ok(Sender::H2(sender))
        } else {
            let (sender, conn) =
                hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(stream)).await?;
            tokio::spawn(conn.with_upgrades());
            Ok(Sender::H1(sender))
        }
    }

    pub fn is_ready(&self) -> bool {
        match self {
            Sender::H1(sender) => sender.is_ready(),
            Sender::H2(sender) => sender.is_ready(),
        }
    }

    /// Sends a request; on failure, the request back too when it was never written.
    pub async fn send(
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

/// The failure category of a failed exchange, counting it unless the connector already did.
pub fn classify(metrics: &ListenerMetrics, error: &(dyn StdError + 'static)) -> UpstreamFailure {
    let mut current = Some(error);
    let mut tls = false;
    while let Some(e) = current {
        if let Some(failure) = e.downcast_ref::<UpstreamFailure>() {
            // Counted where it happened.
            return *failure;
        }
        if e.is::<rustls::Error>() {
            tls = true;
        }
        // `io::Error::source` skips the error it wraps; look inside explicitly.
        current = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner),
            None => e.source(),
        };
    }
    let failure = if tls {
        // Such as a TLS 1.3 server refusing our certificate after the handshake.
        UpstreamFailure::Tls
    } else {
        UpstreamFailure::Protocol
    };
    metrics.upstream_error(failure);
    failure
}

/// 502 (504 on a timeout) with a one-line body naming the failure category.
pub fn failure_response(failure: UpstreamFailure) -> Response<ProxyBody> {
    let status = match failure {
        UpstreamFailure::Timeout => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    local(status, format!("{failure}\n"))
}

/// An HTTP/1.1 `Connection: upgrade` request (WebSocket and friends).
/// Only WebSocket is relayed: an `h2c` upgrade would open a plaintext HTTP/2 session that no
/// per-request decision sees.
fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.method() != Method::CONNECT
        && req
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(token))
}

/// The tokens of every `Connection` header, trimmed.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Headers a `Connection` list may never remove: dropping them would change what the request
/// means to the upstream (its host, its framing, what ciphergate vouches for).
const PROTECTED: [HeaderName; 5] = [
    header::HOST,
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    header::AUTHORIZATION,
    X_FORWARDED_PROTO,
];

/// Removes headers that belong to one connection (RFC 9110 §7.6.1), keeping
/// `Connection: upgrade` and `Upgrade` when an upgrade is being relayed, and `TE: trailers`
/// (gRPC needs it).
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of these: one pass over the names instead of a dozen lookups.
    if !keep_upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // `Connection: keep-alive` or `close` names no field the message has: nothing to collect.
    if connection_tokens(headers).any(|t| headers.contains_key(t)) {
        let listed: Vec<HeaderName> = connection_tokens(headers)
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .filter(|name| !PROTECTED.contains(name))
            .collect();
        for name in listed {
            if !(keep_upgrade && name == header::UPGRADE) {
                headers.remove(name);
            }
        }
    }
    let trailers_only = headers.get_all(header::TE).iter().count() == 1
        && headers
            .get(header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !trailers_only {
        headers.remove(header::TE);
    }
    headers.remove("http2-settings");
    for name in [
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// Whether a header belongs to one connection, or might name others that do.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::UPGRADE,
    ]
    .contains(name)
        || ["keep-alive", "proxy-connection", "http2-settings"].contains(&name.as_str())
}

/// Runs each HTTP/2 stream as a task of its own, boxed first: a stream's future holds the whole
/// request handling, and a task stores its future inline, so spawning it unboxed copies
/// kilobytes into the task, and again when the task finishes. Measured with h2load (8
/// connections × 10 streams, alternating runs): 11.7 -> 11.1 us of proxy CPU per request.
#[derive(Clone, Copy)]
pub struct StreamExecutor;

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, stream: F) {
        tokio::spawn(Box::pin(stream));
    }
}

/// The HTTP/1.1 and HTTP/2 server every connection of a listener is served with.
fn http_server(settings: &Settings) -> auto::Builder<StreamExecutor> {
    let mut builder = auto::Builder::new(StreamExecutor);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_buf_size(MAX_REQUEST_HEAD)
        .max_headers(MAX_REQUEST_HEADERS)
        .keep_alive(true)
        .writev(false);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_H2_STREAMS)
        .max_header_list_size(MAX_REQUEST_HEAD as u32)
        .adaptive_window(true);
    builder
}

/// Serves HTTP/1.1 or HTTP/2 on a connection until it ends, goes idle, or the drain is over.
pub async fn serve<I>(conn: &Conn, io: I, info: ConnInfo)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let info = Arc::new(info);
    let service_state = conn.state.clone();
    let service = service_fn(move |req| {
        let state = service_state.clone();
        let info = info.clone();
        async move {
            let proxy = state
                .http
                .as_ref()
                .expect("http listeners have an http proxy");
            Ok::<_, Infallible>(crate::http::handle(proxy, &info, req).await)
        }
    });
    let http = conn
        .state
        .http
        .as_ref()
        .expect("http listeners have an http proxy")
        .server
        .serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(http);
    let idle = conn.state.settings.idle_timeout;
    tokio::select! {
        result = http.as_mut() => return count_protocol_error(&conn.state.metrics, result),
        _ = conn.clock.expired(idle) => return,
        _ = conn.shutdown.cancelled() => http.as_mut().graceful_shutdown(),
    }
    // Draining: finish what is in flight; the app stops waiting at `drain_timeout`.
    tokio::select! {
        result = http.as_mut() => count_protocol_error(&conn.state.metrics, result),
        _ = conn.clock.expired(idle) => {}
    }
}

/// Counts the response hyper itself writes when a request head does not parse: 431 for an
/// oversized head, 400 otherwise.
fn count_protocol_error(
    metrics: &ListenerMetrics,
    result: Result<(), Box<dyn std::error::Error + Send + Sync>>,
) {
    let Err(error) = result else { return };
    let Some(error) = error.downcast_ref::<hyper::Error>() else {
        return;
    };
    if error.is_parse_too_large() {
        metrics.response(http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    } else if error.is_parse() && !error.is_parse_version_h2() {
        metrics.response(http::StatusCode::BAD_REQUEST);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert(
            "http2-settings",
            HeaderValue::from_static("AAMAAABkAAQAoAAAAAIAAAAA"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn connection_cannot_remove_what_the_request_means() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("host, content-length, x-forwarded-proto"),
        );
        h.insert(header::HOST, HeaderValue::from_static("a.example"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h[header::HOST], "a.example");
        assert_eq!(h[header::CONTENT_LENGTH], "3");
        assert_eq!(h[header::TE], "trailers", "gRPC needs TE: trailers");
        assert!(!h.contains_key(header::CONNECTION));
    }

    #[test]
    fn upgrade_headers_survive_an_upgrade() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
    }

    #[test]
    fn redirect_locations() {
        let uri: Uri = "/a/b?c=d".parse().unwrap();
        let loc = |host, port| {
            redirect(Some(host), port, &uri)
                .headers()
                .get(header::LOCATION)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(
            loc("example.com", 443).as_deref(),
            Some("https://example.com/a/b?c=d")
        );
        assert_eq!(
            loc("example.com", 8443).as_deref(),
            Some("https://example.com:8443/a/b?c=d")
        );
        assert_eq!(
            loc("::1", 8443).as_deref(),
            Some("https://[::1]:8443/a/b?c=d")
        );
        assert_eq!(redirect(None, 443, &uri).status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            redirect(Some("a b"), 443, &uri).status(),
            StatusCode::BAD_REQUEST
        );
    }
}
