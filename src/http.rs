//! The HTTP side of a listener: one decision per request, then forward, redirect or refuse.
//!
//! | action  | plaintext request            | TLS request           |
//! |---------|------------------------------|-----------------------|
//! | allow   | forward                      | forward (+ HSTS)      |
//! | upgrade | 308 to `https://host[:port]` | (never matches TLS)   |
//! | reject  | 426 + `Connection: close`    | 403                   |
//!
//! On originate listeners `upgrade` (the default for plaintext) forwards over verified TLS,
//! `allow` forwards plaintext (a narrowed exception) and `reject` answers 403 naming the rule.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::config::ListenerConfig;
use crate::metrics::{ListenerMetrics, UpstreamFailure};
use crate::policy::{self, Action, Facts, ListenerPolicy, Mode, Transport};
use crate::upstream::{Connector, Upstream};

/// The body of every response ciphergate sends: the upstream's, streamed, or a short local one.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// How long an unused pooled upstream connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// One upstream as the HTTP side uses it: a pooled client and the URI parts to address it.
pub struct HttpUpstream {
    client: Client<Connector, Incoming>,
    scheme: Scheme,
    authority: Authority,
}

impl HttpUpstream {
    pub fn new(upstream: Arc<Upstream>) -> Self {
        let scheme = if upstream.uses_tls() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let authority = Authority::try_from(upstream.addr.authority())
            .expect("a validated upstream address is a valid authority");
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .http2_adaptive_window(true)
            .build(Connector(upstream));
        HttpUpstream {
            client,
            scheme,
            authority,
        }
    }
}

/// The per-listener HTTP state, built once per config and shared by its connections.
pub struct HttpProxy {
    pub mode: Mode,
    pub policy: ListenerPolicy,
    pub metrics: ListenerMetrics,
    /// The usual leg: plaintext to the app beside a terminate listener, or verified TLS.
    pub upstream: HttpUpstream,
    /// A plaintext leg to an originate listener's upstream, used only when a narrowed `allow`
    /// rule matches; `None` when no rule of the listener could allow plaintext.
    pub plaintext_exception: Option<HttpUpstream>,
    /// The upstream host, which originate rules match as `server_name`.
    pub upstream_host: String,
    pub hsts: Option<HeaderValue>,
    pub redirect_port: u16,
}

impl HttpProxy {
    /// `bound_port` is the port the listener's socket actually has, the default redirect port.
    pub fn new(
        config: &ListenerConfig,
        bound_port: u16,
        upstream: Arc<Upstream>,
        plaintext_exception: Option<Arc<Upstream>>,
        metrics: ListenerMetrics,
    ) -> Self {
        HttpProxy {
            mode: config.mode,
            policy: config.policy.clone(),
            metrics,
            upstream_host: upstream.addr.host.clone(),
            upstream: HttpUpstream::new(upstream),
            plaintext_exception: plaintext_exception.map(HttpUpstream::new),
            hsts: config.settings.hsts.clone(),
            redirect_port: config.redirect_port.unwrap_or(bound_port),
        }
    }
}

/// What is known about the client connection a request arrived on.
pub struct ConnInfo {
    pub transport: Transport,
    pub source: IpAddr,
    /// The SNI of a TLS connection, lowercased.
    pub sni: Option<Box<str>>,
    pub client_verified: bool,
}

/// Decides and answers one request. Every response is counted by class.
pub async fn handle(
    proxy: &HttpProxy,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let mut response = route(proxy, conn, req).await;
    if conn.transport == Transport::Tls
        && proxy.mode == Mode::Terminate
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

async fn route(proxy: &HttpProxy, conn: &ConnInfo, req: Request<Incoming>) -> Response<ProxyBody> {
    // The path and host borrow the request; decide in a scope of their own so the request can
    // be moved on afterwards. Only a path that normalisation changed is kept (owned).
    let (decision, rewritten) = {
        let normalized = policy::normalize_path(req.uri().path());
        let host = request_host(&req).and_then(policy::host_name);
        let server_name = match (proxy.mode, conn.transport) {
            (Mode::Originate, _) => Some(proxy.upstream_host.as_str()),
            (Mode::Terminate, Transport::Tls) => conn.sni.as_deref(),
            (Mode::Terminate, Transport::Plaintext) => host.as_deref(),
        };
        let facts = Facts {
            transport: conn.transport,
            source: Some(conn.source),
            server_name,
            path: normalized.as_deref(),
            destination: None,
            client_verified: conn.client_verified,
        };
        let decision = policy::decide(&proxy.policy, &facts);
        proxy.metrics.decision(decision.rule, decision.label());
        if proxy.mode == Mode::Terminate && decision.action == Action::Upgrade {
            return redirect(host.as_deref(), proxy.redirect_port, req.uri());
        }
        let rewritten = match normalized {
            Some(Cow::Owned(path)) => Some(path),
            _ => None,
        };
        (decision, rewritten)
    };
    let rewritten = rewritten.as_deref();

    match (proxy.mode, decision.action, conn.transport) {
        (Mode::Terminate, Action::Reject, Transport::Plaintext) => upgrade_required(),
        (Mode::Terminate, Action::Reject, Transport::Tls) => {
            local(StatusCode::FORBIDDEN, "forbidden by policy\n")
        }
        (Mode::Terminate, Action::Allow | Action::Upgrade, _) => {
            forward(proxy, &proxy.upstream, conn, req, rewritten).await
        }
        (Mode::Originate, Action::Reject, _) => local(
            StatusCode::FORBIDDEN,
            format!(
                "forbidden by ciphergate rule `{}`\n",
                decision.rule_name(&proxy.policy)
            ),
        ),
        (Mode::Originate, Action::Upgrade, _) => {
            forward(proxy, &proxy.upstream, conn, req, rewritten).await
        }
        (Mode::Originate, Action::Allow, _) => match &proxy.plaintext_exception {
            Some(plain) => forward(proxy, plain, conn, req, rewritten).await,
            // Unreachable by construction (the exception leg exists whenever a rule could
            // allow), but if it ever is, fail closed.
            None => local(StatusCode::FORBIDDEN, "forbidden by policy\n"),
        },
    }
}

/// The request's host: the URI authority (HTTP/2, absolute-form) or the Host header.
fn request_host(req: &Request<Incoming>) -> Option<&str> {
    req.uri()
        .authority()
        .map(Authority::as_str)
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

fn local(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
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

/// Sends the request on to `target` and streams the answer back. The upstream sees the
/// normalised path the policy decided on: `rewritten` is set when normalisation changed it.
async fn forward(
    proxy: &HttpProxy,
    target: &HttpUpstream,
    conn: &ConnInfo,
    mut req: Request<Incoming>,
    rewritten: Option<&str>,
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
            PathAndQuery::try_from(rebuilt).ok()
        }
        (_, original) => original.cloned(),
    };
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(target.scheme.clone());
    uri.authority = Some(target.authority.clone());
    uri.path_and_query = Some(path_and_query.unwrap_or_else(|| PathAndQuery::from_static("/")));
    let Ok(uri) = Uri::from_parts(uri) else {
        return local(StatusCode::BAD_REQUEST, "invalid request target\n");
    };
    let original_authority = parts.uri.authority().cloned();
    parts.uri = uri;
    parts.version = Version::HTTP_11;

    strip_hop_by_hop(&mut parts.headers, upgrade);
    if !parts.headers.contains_key(header::HOST)
        && let Some(authority) = original_authority
        && let Ok(value) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(header::HOST, value);
    }
    if proxy.mode == Mode::Terminate {
        let proto = match conn.transport {
            Transport::Tls => "https",
            Transport::Plaintext => "http",
        };
        parts
            .headers
            .insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }

    let mut response = match target
        .client
        .request(Request::from_parts(parts, body))
        .await
    {
        Ok(response) => response,
        Err(error) => return upstream_failure(&proxy.metrics, &error),
    };

    if upgrade && response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        if let Some(client_upgrade) = client_upgrade {
            tokio::spawn(async move {
                if let (Ok(client), Ok(upstream)) = tokio::join!(client_upgrade, upstream_upgrade) {
                    let _ = tokio::io::copy_bidirectional(
                        &mut TokioIo::new(client),
                        &mut TokioIo::new(upstream),
                    )
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

/// A 502 (or 504 on a timeout) naming the failure category.
fn upstream_failure(
    metrics: &ListenerMetrics,
    error: &hyper_util::client::legacy::Error,
) -> Response<ProxyBody> {
    // Connect-phase failures were counted by the connector, with their category.
    let failure = if error.is_connect() {
        find_failure(error).unwrap_or(UpstreamFailure::Connect)
    } else {
        metrics.upstream_error(UpstreamFailure::Protocol);
        UpstreamFailure::Protocol
    };
    let status = match failure {
        UpstreamFailure::Timeout => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    local(status, format!("{failure}\n"))
}

fn find_failure(error: &(dyn std::error::Error + 'static)) -> Option<UpstreamFailure> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(failure) = e.downcast_ref::<UpstreamFailure>() {
            return Some(*failure);
        }
        current = e.source();
    }
    None
}

/// An HTTP/1.1 `Connection: upgrade` request (WebSocket and friends).
fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.method() != Method::CONNECT
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes headers that belong to one connection (RFC 9110 §7.6.1), keeping
/// `Connection: upgrade` and `Upgrade` when an upgrade is being relayed.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        if !(keep_upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    for name in [
        header::TE,
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
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
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
