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
//!
//! On terminate listeners the kernel holds a new connection until its first bytes arrive
//! ([`DEFER_ACCEPT`]), so the ClientHello is usually there when the connection is accepted and
//! one wake-up serves both; a client that stays silent is handed over after the wait and has
//! the rest of its `handshake_timeout` from then.
//!
//! Nothing here logs: a connection's fate is visible only in counters.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ListenerConfig, Protocol, Settings, UpstreamAddr};
use crate::conn::{Conn, Held};
use crate::detect::{Detected, detect, detect_now};
use crate::forward::ForwardProxy;
use crate::http::{HttpProxy, HttpUpstream, Route, decide_originate};
use crate::io::Metered;
use crate::metrics::{HandshakeOutcome, Leg, ListenerMetrics, Metrics};
use crate::policy::{self, Action, Facts, ListenerPolicy, Mode, Outbound, Transport};
use crate::socket::ListeningSocket;
use crate::tls::stream::{ServerStream, read_client_hello};
use crate::transparent::TransparentRoute;
use crate::upstream::{DynamicConnector, Security, Upstream};
use crate::workers::Workers;
use crate::{BoxFuture, boxed};

/// The largest HTTP request head accepted (HTTP/1 request line + headers, HTTP/2 header list);
/// beyond it, HTTP/1 gets 431.
pub const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// Header fields in one HTTP/1 request head; beyond it, 431. As HAProxy's default (101), and
/// no more than hyper parses on the stack: a larger limit makes hyper allocate and clear two
/// arrays of that many entries for every request (dhat: 2 × 6.4 KB per request at 200).
pub const MAX_REQUEST_HEADERS: usize = 100;
/// Concurrent streams per HTTP/2 connection.
pub const MAX_H2_STREAMS: u32 = 256;
/// How long the kernel holds a new connection that has sent nothing, on listeners where the
/// client speaks first (`TCP_DEFER_ACCEPT`). Linux's shortest: the SYN-ACK's first retry.
pub const DEFER_ACCEPT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    ServerTls(#[from] crate::tls::server::ServerTlsError),
    #[error(transparent)]
    ClientTls(#[from] crate::tls::client::ClientTlsError),
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
    /// Http and transparent listeners.
    pub http: Option<HttpProxy>,
    /// Tcp listeners only.
    tcp: Option<TcpTargets>,
    /// `max_connections`, shared with the listener's earlier and later states.
    pub limit: Arc<ConnectionLimit>,
    /// Whether the listening socket holds connections until their first bytes arrive: set by
    /// whoever applies [`ListenerState::accept_wait`] to the socket, once the kernel took it.
    pub accept_deferred: bool,
}

/// `max_connections` of one listener. It outlives reloads: connections opened under the old
/// config stay counted, and a new limit applies to new connections at once.
pub struct ConnectionLimit {
    open: AtomicUsize,
    max: AtomicUsize,
}

impl ConnectionLimit {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(ConnectionLimit {
            open: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        })
    }

    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// A permit, or `None` when the listener is full.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if before >= self.max.load(Ordering::Relaxed) {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Permit(self.clone()))
    }
}

/// One open connection's place under `max_connections`.
pub struct Permit(Arc<ConnectionLimit>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where a tcp listener's bytes go: its usual leg, and (originate only) the plaintext leg a
/// narrowed `allow` rule may choose.
struct TcpTargets {
    upstream: Arc<Upstream>,
    plaintext_exception: Option<Arc<Upstream>>,
}

impl ListenerState {
    /// `bound_port` is the port the listener's socket has (it differs from the config's when
    /// that says port 0).
    /// `limit` is the listener's connection limit, kept across reloads; its maximum is set
    /// from this config.
    /// `earlier` is the state this one replaces on a reload: upstream legs that stay the same
    /// keep its open connections.
    pub fn build(
        config: &ListenerConfig,
        bound_port: u16,
        limit: Arc<ConnectionLimit>,
        metrics: &Metrics,
        earlier: Option<&ListenerState>,
    ) -> Result<Self, BuildError> {
        let earlier_route = earlier.and_then(|e| e.http.as_ref()).map(|h| &h.route);
        let earlier_legs = earlier_route.map(Route::upstreams).unwrap_or_default();
        let leg = |upstream| HttpUpstream::new(upstream, &earlier_legs);
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
            Mode::Originate | Mode::Transparent => None,
        };
        let timeout = config.settings.handshake_timeout;
        let make = |addr: &UpstreamAddr, security| {
            Arc::new(Upstream {
                addr: addr.clone(),
                security,
                timeout,
                metrics: listener_metrics.clone(),
            })
        };
        // The usual leg and, on originate listeners whose rules could allow plaintext, the
        // exception leg.
        let legs = match &config.upstream {
            Some(addr) => {
                let security = if config.upstream_uses_tls() {
                    Security::Tls(crate::tls::client::upstream_tls(config, &addr.host)?)
                } else {
                    Security::LoopbackPlaintext
                };
                let may_allow_plaintext =
                    config.mode == Mode::Originate
                        && config.policy.rules.iter().any(|r| {
                            r.action == Action::Allow && r.transport != Some(Transport::Tls)
                        });
                Some((
                    make(addr, security),
                    may_allow_plaintext.then(|| make(addr, Security::PlaintextException)),
                ))
            }
            None => None,
        };

        let (http, tcp) = match (config.protocol, legs) {
            _ if config.mode == Mode::Transparent => {
                let tls = crate::tls::client::client_config(config, config.upstream_tls.as_ref())
                    .map_err(|reason| crate::tls::client::ClientTlsError::Build {
                    listener: config.name.clone(),
                    reason,
                })?;
                let route = Route::Transparent(TransparentRoute {
                    tls,
                    timeout,
                    metrics: listener_metrics.clone(),
                });
                let proxy = HttpProxy::new(config, bound_port, route, listener_metrics.clone());
                (Some(proxy), None)
            }
            (Protocol::Http, legs) => {
                let route = match (config.mode, legs) {
                    (Mode::Terminate, Some((upstream, _))) => Route::Terminate(leg(upstream)),
                    (Mode::Originate | Mode::Transparent, Some((upstream, exception))) => {
                        Route::Originate {
                            tls: leg(upstream),
                            plaintext_exception: exception.map(|e| Box::new(leg(e))),
                        }
                    }
                    // Validation guarantees terminate listeners have an upstream.
                    (_, None) => {
                        let client =
                            crate::tls::client::client_config(config, config.upstream_tls.as_ref())
                                .map_err(|reason| crate::tls::client::ClientTlsError::Build {
                                    listener: config.name.clone(),
                                    reason,
                                })?;
                        let earlier = match earlier_route {
                            Some(Route::Forward(forward)) => Some(forward),
                            _ => None,
                        };
                        let connector = DynamicConnector {
                            tls: client,
                            timeout,
                            metrics: listener_metrics.clone(),
                        };
                        Route::Forward(ForwardProxy::new(connector, earlier))
                    }
                };
                let proxy = HttpProxy::new(config, bound_port, route, listener_metrics.clone());
                (Some(proxy), None)
            }
            (Protocol::Tcp, Some((upstream, plaintext_exception))) => (
                None,
                Some(TcpTargets {
                    upstream,
                    plaintext_exception,
                }),
            ),
            // Validation guarantees tcp listeners have an upstream.
            (Protocol::Tcp, None) => (None, None),
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
            tcp,
            limit,
            accept_deferred: false,
        })
    }

    /// How long the listening socket should hold a silent new connection. Terminate
    /// listeners only, where the client speaks first: a ClientHello, or a plaintext request
    /// that detection waits for anyway. Zero where the client may wait for the server, and
    /// where `handshake_timeout` is under twice the wait: a connection the kernel hands over
    /// without data (after the wait, or through SYN cookies) has the timeout less the wait
    /// left, and that rest should still be long enough for a handshake.
    pub fn accept_wait(&self) -> Duration {
        if self.tls.is_some() && self.settings.handshake_timeout >= 2 * DEFER_ACCEPT {
            DEFER_ACCEPT
        } else {
            Duration::ZERO
        }
    }
}

/// Accepts until `shutdown`, then lets go of the socket; it closes, refusing new connections,
/// once the listener's handle in [`crate::app`] has let go too.
pub async fn accept_loop(
    listener: Arc<ListeningSocket>,
    state: Arc<ArcSwap<ListenerState>>,
    shutdown: CancellationToken,
    connections: TaskTracker,
    workers: Arc<Workers>,
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
        let Some(permit) = state.limit.try_acquire() else {
            state.metrics.overload();
            drop(stream);
            continue;
        };
        let held = Held::new(permit, state.metrics.active_guard());
        let tasks = connections.clone();
        workers.spawn(
            &connections,
            connection(state, stream, peer, held, shutdown.clone(), tasks),
        );
    }
}

/// The whole life of one client connection. Every way out just returns: dropping the streams
/// closes them.
async fn connection(
    state: Arc<ListenerState>,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    held: Arc<Held>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    if state.mode == Mode::Transparent {
        let serve = crate::transparent::serve(state, stream, peer, held, shutdown, tasks);
        return boxed(serve).await;
    }
    let mut deadline = Instant::now() + state.settings.handshake_timeout;
    // Originate listeners carry the local app's bytes as plaintext (detection would stall
    // protocols where the server speaks first); terminate listeners look at the first byte.
    let arrived = match state.tls {
        None => Some(Detected::Plaintext),
        Some(_) => match detect_now(&stream) {
            Ok(arrived) => arrived,
            Err(_) => return,
        },
    };
    if arrived.is_none() && state.accept_deferred {
        // Nothing yet on a deferring socket: the client has been silent for the kernel's
        // wait already, and that counts against its handshake_timeout.
        deadline -= DEFER_ACCEPT;
    }
    // Register the socket with this worker's reactor, so its readiness wakes this thread.
    // (`TCP_NODELAY` came with it from the listening socket.)
    let Ok(stream) = TcpStream::from_std(stream) else {
        return;
    };
    let detected = match arrived {
        Some(detected) => detected,
        None => match boxed(timeout_at(deadline, detect(&stream))).await {
            Ok(Ok(detected)) => detected,
            Ok(Err(_)) => return,
            Err(_) => {
                // Silence where a ClientHello was due is a stalled handshake.
                state
                    .metrics
                    .handshake(Leg::Downstream, HandshakeOutcome::Timeout);
                return;
            }
        },
    };
    let (conn, io) = Conn::new(state, stream, peer, held, shutdown, tasks);
    serve(&conn, detected, io, deadline).await
}

/// The connection's next stage, boxed (see [`boxed`]): a connection's task should not carry the
/// handshake's state, or the HTTP machinery it may never reach, for as long as it is open.
fn serve(
    conn: &Conn,
    detected: Detected,
    io: Metered<TcpStream>,
    deadline: Instant,
) -> BoxFuture<'_, ()> {
    match (detected, conn.state.tls.clone()) {
        (Detected::Closed, _) => boxed(std::future::ready(())),
        (Detected::Tls, Some(tls)) => boxed(terminate_tls(conn, io, tls, deadline)),
        (_, _) => {
            conn.state.metrics.connection(Transport::Plaintext);
            match conn.state.protocol {
                Protocol::Http => boxed(crate::http::serve(
                    conn,
                    io,
                    conn.info(Transport::Plaintext, None, false, None),
                )),
                Protocol::Tcp => boxed(async move {
                    if let Some((upstream, addrs)) =
                        decide_tcp(conn, Transport::Plaintext, None, false).await
                    {
                        relay_to(conn, io, &upstream, addrs).await
                    }
                }),
            }
        }
    }
}

/// A terminate listener's TLS connection: the handshake, then what the connection carries,
/// each boxed in turn so the handshake's state is gone before the connection settles down.
async fn terminate_tls(
    conn: &Conn,
    io: Metered<TcpStream>,
    config: Arc<ServerConfig>,
    deadline: Instant,
) {
    if let Some(tls) = boxed(tls_handshake(conn, io, config, deadline)).await {
        boxed(after_handshake(conn, tls)).await
    }
}

/// A TLS connection whose handshake completed. The stream is boxed: it is the largest thing a
/// connection holds (the rustls session), and every later stage only moves the pointer.
struct Established {
    stream: Box<ServerStream<Metered<TcpStream>>>,
    sni: Option<Box<str>>,
    client_verified: bool,
    /// A tcp listener's decision, when it was made before the handshake finished.
    early: Option<(Arc<Upstream>, Option<Vec<SocketAddr>>)>,
}

/// The TLS handshake of a terminate listener. Its future is large (the ClientHello stage, the
/// handshake's own state); it is dropped before the connection moves on, so a connection that
/// sits open holds only what [`after_handshake`] needs.
async fn tls_handshake(
    conn: &Conn,
    io: Metered<TcpStream>,
    config: Arc<ServerConfig>,
    deadline: Instant,
) -> Option<Established> {
    let state = &conn.state;
    let metrics = &state.metrics;
    metrics.connection(Transport::Tls);
    let hello = timeout_at(deadline, read_client_hello(io)).await;
    let hello = handshake_step(metrics, hello)?;
    let sni: Option<Box<str>> = hello
        .server_name()
        .map(|name| name.trim_end_matches('.').to_ascii_lowercase().into());

    // A tcp listener refuses before the handshake completes, unless a rule needs to know
    // whether the client certificate verified.
    let early = if state.protocol == Protocol::Tcp && !state.policy.needs_client_verified() {
        Some(decide_tcp(conn, Transport::Tls, sni.as_deref(), false).await?)
    } else {
        None
    };

    let stream = handshake_step(metrics, timeout_at(deadline, hello.handshake(config)).await)?;
    metrics.handshake(Leg::Downstream, HandshakeOutcome::Ok);
    let session = stream.session();
    let (version, group) = crate::tls::session_labels(
        session.protocol_version(),
        session.negotiated_key_exchange_group().map(|g| g.name()),
    );
    metrics.session(Leg::Downstream, version, group);
    let client_verified = session
        .peer_certificates()
        .is_some_and(|chain| !chain.is_empty());
    Some(Established {
        stream: Box::new(stream),
        sni,
        client_verified,
        early,
    })
}

/// One step of a downstream handshake under `handshake_timeout`: its result, or `None` with
/// the failure or the timeout counted.
fn handshake_step<T, E>(
    metrics: &ListenerMetrics,
    step: Result<Result<T, E>, tokio::time::error::Elapsed>,
) -> Option<T> {
    match step {
        Ok(Ok(done)) => Some(done),
        Ok(Err(_)) => {
            metrics.handshake(Leg::Downstream, HandshakeOutcome::Failed);
            None
        }
        Err(_) => {
            metrics.handshake(Leg::Downstream, HandshakeOutcome::Timeout);
            None
        }
    }
}

/// A terminated TLS connection's protocol.
async fn after_handshake(conn: &Conn, tls: Established) {
    let Established {
        stream,
        sni,
        client_verified,
        early,
    } = tls;
    match conn.state.protocol {
        Protocol::Http => {
            if !until_first_request(conn, &stream).await {
                return;
            }
            let info = conn.info(Transport::Tls, sni, client_verified, None);
            boxed(crate::http::serve(conn, stream, info)).await
        }
        Protocol::Tcp => {
            let target = match early {
                Some(target) => Some(target),
                None => {
                    boxed(decide_tcp(
                        conn,
                        Transport::Tls,
                        sni.as_deref(),
                        client_verified,
                    ))
                    .await
                }
            };
            if let Some((upstream, addrs)) = target {
                boxed(relay_to(conn, stream, &upstream, addrs)).await
            }
        }
    }
}

/// Holds an established TLS connection until its first request bytes arrive, so a connection
/// that is open but quiet costs its TLS state and nothing more: the HTTP machinery and its
/// buffers are allocated once there is something to read (as nginx does). Returns false when
/// nothing came within `header_timeout`, the connection closed, or the proxy is draining.
async fn until_first_request(conn: &Conn, stream: &ServerStream<Metered<TcpStream>>) -> bool {
    // A client may send its request right behind its Finished message.
    if stream.has_buffered_input() {
        return true;
    }
    let socket = stream.get_ref().get_ref();
    tokio::select! {
        readable = socket.readable() => readable.is_ok(),
        // As for any request head, the first one is due within `header_timeout`.
        _ = tokio::time::sleep(conn.state.settings.header_timeout) => false,
        _ = conn.shutdown.cancelled() => false,
    }
}

/// Decides a tcp connection, counts the decision, and returns the leg to relay to (with the
/// addresses the policy approved, when a rule tests `destination`), or `None` to close.
async fn decide_tcp(
    conn: &Conn,
    transport: Transport,
    sni: Option<&str>,
    client_verified: bool,
) -> Option<(Arc<Upstream>, Option<Vec<SocketAddr>>)> {
    let state = &conn.state;
    let targets = state.tcp.as_ref()?;
    let server_name = match state.mode {
        Mode::Terminate => sni,
        Mode::Originate | Mode::Transparent => Some(targets.upstream.addr.host.as_str()),
    };
    let facts = Facts {
        transport,
        source: Some(conn.source),
        server_name,
        path: None,
        destination: None,
        destination_port: match state.mode {
            Mode::Terminate => None,
            _ => Some(targets.upstream.addr.port),
        },
        client_verified,
    };
    let (decision, addrs) = match state.mode {
        Mode::Originate | Mode::Transparent => {
            decide_originate(&state.policy, &facts, &targets.upstream)
                .await
                .ok()?
        }
        Mode::Terminate => (policy::decide(&state.policy, &facts), None),
    };
    state.metrics.decision(decision.rule, decision.label());
    let upstream = match state.mode {
        Mode::Terminate if decision.action == Action::Reject => return None,
        Mode::Terminate => &targets.upstream,
        Mode::Originate | Mode::Transparent => match decision.outbound() {
            Outbound::Refuse => return None,
            Outbound::Tls => &targets.upstream,
            Outbound::Plaintext => targets.plaintext_exception.as_ref()?,
        },
    };
    Some((upstream.clone(), addrs))
}

/// Connects the chosen leg and relays until either side closes or the connection idles out.
async fn relay_to<C>(conn: &Conn, client: C, upstream: &Upstream, addrs: Option<Vec<SocketAddr>>)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let connected = match addrs {
        Some(addrs) => upstream.connect_to(&addrs).await,
        None => upstream.connect().await,
    };
    let Ok(upstream) = connected else { return };
    crate::relay::relay(
        client,
        upstream,
        &conn.clock,
        conn.state.settings.idle_timeout,
    )
    .await
}
