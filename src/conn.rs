//! One client connection's context, shared by every path it can take: the listener state it
//! was accepted under, what keeps it accounted for, its idle clock, and the drain signal.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http::{ConnInfo, HttpProxy};
use crate::io::{IdleClock, Metered};
use crate::listener::{ListenerState, Permit};
use crate::metrics::ActiveGuard;
use crate::policy::Transport;
use crate::transparent::Original;

/// What keeps a connection accounted for: its `max_connections` permit and its place in
/// `ciphergate_connections_active`. Released when the connection, and any tunnel it was
/// upgraded into, has ended.
pub struct Held {
    _permit: Permit,
    _active: ActiveGuard,
}

impl Held {
    pub fn new(permit: Permit, active: ActiveGuard) -> Arc<Self> {
        Arc::new(Held {
            _permit: permit,
            _active: active,
        })
    }
}

/// A client connection, from accept to close.
pub struct Conn {
    /// The listener's state when the connection was accepted; a reload does not change it.
    pub state: Arc<ListenerState>,
    /// The client's address (never logged).
    pub source: IpAddr,
    pub held: Arc<Held>,
    /// When a byte last moved, for `idle_timeout`.
    pub clock: Arc<IdleClock>,
    /// Cancelled when the listener stops: the connection finishes what is in flight.
    pub shutdown: CancellationToken,
    /// Tasks the connection spawns (tunnels), so a drain waits for them.
    pub tasks: TaskTracker,
}

impl Conn {
    /// The context of a connection accepted under `state`, and its socket, metered: bytes
    /// counted and the idle clock kept.
    pub fn new(
        state: Arc<ListenerState>,
        stream: TcpStream,
        peer: SocketAddr,
        held: Arc<Held>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> (Conn, Metered<TcpStream>) {
        let clock = IdleClock::new();
        let io = Metered::new(stream, state.metrics.byte_counters(), clock.clone());
        let conn = Conn {
            source: peer.ip(),
            state,
            held,
            clock,
            shutdown,
            tasks,
        };
        (conn, io)
    }

    /// The HTTP view of this connection. `original` is the destination a transparent
    /// listener's connection was headed for.
    pub fn info(
        &self,
        transport: Transport,
        sni: Option<Box<str>>,
        client_verified: bool,
        original: Option<SocketAddr>,
    ) -> ConnInfo {
        ConnInfo {
            transport,
            source: self.source,
            sni,
            client_verified,
            held: self.held.clone(),
            clock: self.clock.clone(),
            idle_timeout: self.state.settings.idle_timeout,
            tasks: self.tasks.clone(),
            sticky: self.state.http.as_ref().and_then(HttpProxy::sticky),
            original: original.map(Original::new),
        }
    }
}
