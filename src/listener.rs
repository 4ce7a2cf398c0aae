//! A listener: its live state, the accept loop, and the life of one connection.
//!
//! ```text
//! accept ─ permit? ─ detect (peek) ─┬─ TLS ─ ClientHello ─ [tcp: decide] ─ handshake ─┬─ http: hyper, decide per request
//!                                   │                                                └─ tcp: decide, relay
//!                                   └─ plaintext ─────────────────────────────────────┬─ http: hyper, decide per request
//!                                                                                     └─ tcp: decide, relay
//! ```
//! Detection and the handshake share one deadline (`handshake_timeout`); the HTTP/1 request
//! head has `header_timeout`; a connection without traffic for `idle_timeout` is closed.
//! Nothing here logs: a connection's fate is visible only in counters.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::ServerConfig;
use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, timeout_at};
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ListenerConfig, Protocol, Settings};
use crate::detect::{Detected, detect};
use crate::http::{ConnInfo, HttpProxy};
use crate::io::{IdleClock, Metered};
use crate::metrics::{HandshakeOutcome, Leg, ListenerMetrics, Metrics};
use crate::policy::{self, Action, Facts, ListenerPolicy, Mode, Transport};
use crate::upstream::{Security, Upstream};

/// The largest HTTP request head accepted (HTTP/1 request line + headers, HTTP/2 header list);
/// beyond it, HTTP/1 gets 431.
pub const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// Concurrent streams per HTTP/2 connection.
pub const MAX_H2_STREAMS: u32 = 256;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    ServerTls(#[from] crate::tls::server::ServerTlsError),
    #[error(transparent)]
    ClientTls(#[from] crate::tls::client::ClientTlsError),
    #[error(
        "listener {0}: forward-proxy mode (an originate http listener without upstream) is not available yet"
    )]
    ForwardProxy(String),
}

/// Everything a connection needs, built from one config. Connections take a snapshot when they
/// are accepted and keep it, so a reload changes only what new connections see.
pub struct ListenerState {
    pub name: String,
    pub bind: SocketAddr,
    pub mode: Mode,
    pub protocol: Protocol,
    pub settings: Settings,
    pub policy: ListenerPolicy,
    pub metrics: ListenerMetrics,
    /// Terminate listeners only.
    pub tls: Option<Arc<ServerConfig>>,
    /// Http listeners only.
    pub http: Option<HttpProxy>,
    http_server: auto::Builder<TokioExecutor>,
    /// Tcp listeners only.
    tcp: Option<TcpTargets>,
    /// The upstream host, which originate rules match as `server_name`.
    upstream_host: String,
    /// Permits for `max_connections`.
    pub limit: Arc<Semaphore>,
}

struct TcpTargets {
    upstream: Arc<Upstream>,
    plaintext_exception: Option<Arc<Upstream>>,
}

impl ListenerState {
    /// `bound_port` is the port the listener's socket has (it differs from the config's when
    /// that says port 0).
    pub fn build(
        config: &ListenerConfig,
        bound_port: u16,
        metrics: &Metrics,
    ) -> Result<Self, BuildError> {
        let listener_metrics = metrics.listener(
            &config.name,
            &config.policy.rule_names(),
            config.certs.len(),
        );
        for (index, cert) in config.certs.iter().enumerate() {
            listener_metrics.set_cert_expiry(index, cert.not_after);
        }
        let tls = match config.mode {
            Mode::Terminate => Some(crate::tls::server::server_config(config)?),
            Mode::Originate => None,
        };
        let Some(addr) = config.upstream.clone() else {
            return Err(BuildError::ForwardProxy(config.name.clone()));
        };
        let security = if config.upstream_uses_tls() {
            Security::Tls(crate::tls::client::upstream_tls(config, &addr.host)?)
        } else {
            Security::LoopbackPlaintext
        };
        let make = |security| {
            Arc::new(Upstream {
                addr: addr.clone(),
                security,
                timeout: config.settings.handshake_timeout,
                metrics: listener_metrics.clone(),
            })
        };
        let upstream = make(security);
        let plaintext_exception = (config.mode == Mode::Originate
            && config
                .policy
                .rules
                .iter()
                .any(|r| r.action == Action::Allow && r.transport != Some(Transport::Tls)))
        .then(|| make(Security::PlaintextException));

        let (http, tcp) = match config.protocol {
            Protocol::Http => (
                Some(HttpProxy::new(
                    config,
                    bound_port,
                    upstream,
                    plaintext_exception,
                    listener_metrics.clone(),
                )),
                None,
            ),
            Protocol::Tcp => (
                None,
                Some(TcpTargets {
                    upstream,
                    plaintext_exception,
                }),
            ),
        };

        Ok(ListenerState {
            name: config.name.clone(),
            bind: config.bind,
            mode: config.mode,
            protocol: config.protocol,
            settings: config.settings.clone(),
            policy: config.policy.clone(),
            metrics: listener_metrics,
            tls,
            http,
            http_server: http_server(&config.settings),
            tcp,
            upstream_host: addr.host,
            limit: Arc::new(Semaphore::new(config.settings.max_connections)),
        })
    }
}

fn http_server(settings: &Settings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_buf_size(MAX_REQUEST_HEAD)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_H2_STREAMS)
        .max_header_list_size(MAX_REQUEST_HEAD as u32)
        .adaptive_window(true);
    builder
}

/// Accepts until `shutdown`, then drops the socket so new connections are refused.
pub async fn accept_loop(
    listener: TcpListener,
    state: Arc<ArcSwap<ListenerState>>,
    shutdown: CancellationToken,
    connections: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            // Out of file descriptors or similar: back off a little rather than spin.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let state = state.load_full();
        let Ok(permit) = state.limit.clone().try_acquire_owned() else {
            state.metrics.overload();
            drop(stream);
            continue;
        };
        connections.spawn(connection(state, stream, peer, permit, shutdown.clone()));
    }
}

/// The whole life of one client connection. Every way out just returns: dropping the streams
/// closes them.
async fn connection(
    state: Arc<ListenerState>,
    stream: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    let _active = state.metrics.active_guard();
    let _ = stream.set_nodelay(true);
    let deadline = Instant::now() + state.settings.handshake_timeout;
    let detected = match timeout_at(deadline, detect(&stream)).await {
        Ok(Ok(detected)) => detected,
        Ok(Err(_)) => return,
        Err(_) => {
            // Silence where a ClientHello was due is a stalled handshake.
            if state.mode == Mode::Terminate {
                state
                    .metrics
                    .handshake(Leg::Downstream, HandshakeOutcome::Timeout);
            }
            return;
        }
    };
    let clock = IdleClock::new();
    let io = Metered::new(stream, state.metrics.byte_counters(), clock.clone());
    let source = peer.ip();
    match (detected, &state.tls) {
        (Detected::Closed, _) => {}
        (Detected::Tls, Some(tls)) => {
            let tls = tls.clone();
            terminate_tls(&state, io, source, tls, deadline, &clock, &shutdown).await
        }
        (Detected::Tls, None) => {
            // TLS from the local app to an originate listener: end-to-end encrypted already.
            state.metrics.connection(Transport::Tls);
            carry(
                &state,
                io,
                Transport::Tls,
                source,
                None,
                false,
                &clock,
                &shutdown,
            )
            .await
        }
        (Detected::Plaintext, _) => {
            state.metrics.connection(Transport::Plaintext);
            carry(
                &state,
                io,
                Transport::Plaintext,
                source,
                None,
                false,
                &clock,
                &shutdown,
            )
            .await
        }
    }
}

/// The TLS handshake of a terminate listener, then the connection's protocol.
async fn terminate_tls(
    state: &Arc<ListenerState>,
    io: Metered<TcpStream>,
    source: std::net::IpAddr,
    config: Arc<ServerConfig>,
    deadline: Instant,
    clock: &Arc<IdleClock>,
    shutdown: &CancellationToken,
) {
    state.metrics.connection(Transport::Tls);
    let metrics = &state.metrics;
    let start = match timeout_at(deadline, LazyConfigAcceptor::new(Acceptor::default(), io)).await {
        Ok(Ok(start)) => start,
        Ok(Err(_)) => return metrics.handshake(Leg::Downstream, HandshakeOutcome::Failed),
        Err(_) => return metrics.handshake(Leg::Downstream, HandshakeOutcome::Timeout),
    };
    let sni: Option<Box<str>> = start
        .client_hello()
        .server_name()
        .map(|name| name.trim_end_matches('.').to_ascii_lowercase().into());

    // A tcp listener refuses before the handshake completes, unless a rule needs to know
    // whether the client certificate verified.
    let early = (state.protocol == Protocol::Tcp && !state.policy.needs_client_verified())
        .then(|| decide_tcp(state, Transport::Tls, source, sni.as_deref(), false));
    if early == Some(Action::Reject) {
        return;
    }

    let stream = match timeout_at(deadline, start.into_stream(config)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(_)) => return metrics.handshake(Leg::Downstream, HandshakeOutcome::Failed),
        Err(_) => return metrics.handshake(Leg::Downstream, HandshakeOutcome::Timeout),
    };
    metrics.handshake(Leg::Downstream, HandshakeOutcome::Ok);
    let session = stream.get_ref().1;
    let (version, group) = crate::tls::session_labels(
        session.protocol_version(),
        session.negotiated_key_exchange_group().map(|g| g.name()),
    );
    metrics.session(Leg::Downstream, version, group);
    let client_verified = session
        .peer_certificates()
        .is_some_and(|chain| !chain.is_empty());

    match state.protocol {
        Protocol::Http => {
            let info = ConnInfo {
                transport: Transport::Tls,
                source,
                sni,
                client_verified,
            };
            serve_http(state, stream, info, clock, shutdown).await
        }
        Protocol::Tcp => {
            let action = match early {
                Some(action) => action,
                None => decide_tcp(
                    state,
                    Transport::Tls,
                    source,
                    sni.as_deref(),
                    client_verified,
                ),
            };
            if action != Action::Reject {
                relay_to_upstream(state, stream, action, clock).await
            }
        }
    }
}

/// A connection that is not terminated here: plaintext, or TLS passing through an originate
/// listener.
#[allow(clippy::too_many_arguments)]
async fn carry(
    state: &Arc<ListenerState>,
    io: Metered<TcpStream>,
    transport: Transport,
    source: std::net::IpAddr,
    sni: Option<Box<str>>,
    client_verified: bool,
    clock: &Arc<IdleClock>,
    shutdown: &CancellationToken,
) {
    match state.protocol {
        Protocol::Http => {
            let info = ConnInfo {
                transport,
                source,
                sni,
                client_verified,
            };
            serve_http(state, io, info, clock, shutdown).await
        }
        Protocol::Tcp => {
            let action = decide_tcp(state, transport, source, None, false);
            if action != Action::Reject {
                relay_to_upstream(state, io, action, clock).await
            }
        }
    }
}

/// Decides a tcp connection and counts the decision; under `audit` a rejection comes back as
/// `Allow`.
fn decide_tcp(
    state: &ListenerState,
    transport: Transport,
    source: std::net::IpAddr,
    sni: Option<&str>,
    client_verified: bool,
) -> Action {
    let server_name = match state.mode {
        Mode::Terminate => sni,
        Mode::Originate => Some(state.upstream_host.as_str()),
    };
    let facts = Facts {
        transport,
        source: Some(source),
        server_name,
        path: None,
        destination: None,
        client_verified,
    };
    let decision = policy::decide(&state.policy, &facts);
    state.metrics.decision(decision.rule, decision.label());
    decision.action
}

/// Connects the leg the decision calls for and relays. On an originate listener `allow` is the
/// narrowed plaintext exception; everything else goes over the listener's usual leg.
async fn relay_to_upstream<C>(state: &ListenerState, client: C, action: Action, clock: &IdleClock)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let Some(targets) = &state.tcp else { return };
    let target = match (state.mode, action) {
        (Mode::Originate, Action::Allow) => match &targets.plaintext_exception {
            Some(plain) => plain,
            None => return,
        },
        _ => &targets.upstream,
    };
    let Ok(upstream) = target.connect().await else {
        return;
    };
    crate::relay::relay(client, upstream, clock, state.settings.idle_timeout).await
}

/// Serves HTTP/1.1 or HTTP/2 on a connection until it ends, goes idle, or the drain is over.
async fn serve_http<I>(
    state: &Arc<ListenerState>,
    io: I,
    info: ConnInfo,
    clock: &Arc<IdleClock>,
    shutdown: &CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let info = Arc::new(info);
    let service_state = state.clone();
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
    let conn = state
        .http_server
        .serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let idle = state.settings.idle_timeout;
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = clock.expired(idle) => return,
        _ = shutdown.cancelled() => conn.as_mut().graceful_shutdown(),
    }
    // Draining: finish what is in flight; the app stops waiting at `drain_timeout`.
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = clock.expired(idle) => {}
    }
}
