//! Wiring: bind the admin endpoint and every listener, run until a signal, reload on SIGHUP,
//! drain on SIGTERM/SIGINT.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::admin::{self, Readiness};
use crate::config::{self, CaptureConfig, Config, fingerprint};
use crate::listener::{self, BuildError, ConnectionLimit, ListenerState};
use crate::metrics::{Metrics, ReloadOutcome};
use crate::policy::Mode;
use crate::socket::ListeningSocket;
use crate::sys;
use crate::workers::Workers;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("failed to bind {what} on {addr}: {source}")]
    Bind {
        what: String,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
    #[error("cannot start the worker threads: {0}")]
    Workers(io::Error),
    #[error(
        "{0}: the netfilter rules in place were installed from the running config, so a reload \
         cannot apply that; run `ciphergate capture install` with the new config and restart \
         (in Kubernetes: roll out new pods)"
    )]
    CaptureChanged(String),
}

/// One bound listener and the state its accept loop reads.
struct ListenerHandle {
    name: String,
    /// The configured address (a rebind is detected against it).
    bind: SocketAddr,
    state: Arc<ArcSwap<ListenerState>>,
    /// The listening socket, shared with the accept loop, for options a reload changes and
    /// the address actually bound (differs when the config says port 0).
    socket: Arc<ListeningSocket>,
    /// Stops this accept loop alone (on reload) or with everything (on drain).
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// A transparent listener's socket on the other loopback family, with its accept loop:
    /// a redirect lands on the loopback address of the connection's own family.
    twin: Option<Twin>,
}

/// The other loopback family's socket of a transparent listener.
struct Twin {
    /// Stops this accept loop alone (a reload to another mode), or with the listener.
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// A running proxy.
pub struct Proxy {
    config_path: PathBuf,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    listeners: Vec<ListenerHandle>,
    shutdown: CancellationToken,
    connections: TaskTracker,
    workers: Arc<Workers>,
    admin_addr: SocketAddr,
    admin_task: JoinHandle<()>,
    /// The `[capture]` the proxy started with: the rules installed in the namespace follow it,
    /// so a reload must not change it.
    capture: Option<CaptureConfig>,
}

impl Proxy {
    /// Binds the admin endpoint and every listener, and starts accepting.
    pub async fn start(config: &Config) -> Result<Proxy, AppError> {
        let workers = Workers::start(Workers::default_count()).map_err(AppError::Workers)?;
        let metrics = Arc::new(Metrics::new());
        let readiness = Arc::new(Readiness::default());
        let admin = TcpListener::bind(config.admin.bind)
            .await
            .map_err(|source| AppError::Bind {
                what: "admin".into(),
                addr: config.admin.bind,
                source,
            })?;
        let admin_addr = admin.local_addr().unwrap_or(config.admin.bind);
        let admin_task = tokio::spawn(admin::serve(admin, metrics.clone(), readiness.clone()));

        let mut proxy = Proxy {
            config_path: config.path.clone(),
            metrics,
            readiness,
            listeners: Vec::new(),
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
            workers,
            admin_addr,
            admin_task,
            capture: config.capture.clone(),
        };
        let mut sockets = Vec::with_capacity(config.listeners.len());
        for listener in &config.listeners {
            sockets.push(Some(bind(&listener.name, listener.bind)?));
        }
        let states = proxy.build_states(config, &sockets)?;
        for (state, socket) in states.into_iter().zip(sockets) {
            if let Some(socket) = socket {
                proxy.spawn_listener(socket, state);
            }
        }
        proxy.readiness.set_ready();
        Ok(proxy)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Each listener's name and the address it is bound to.
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .map(|h| (h.name.clone(), h.socket.local_addr()))
            .collect()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Builds the state of every listener. `sockets[i]` is listener `i`'s new socket, or `None`
    /// when the running listener of that name and address is kept.
    fn build_states(
        &self,
        config: &Config,
        sockets: &[Option<ListeningSocket>],
    ) -> Result<Vec<ListenerState>, AppError> {
        config
            .listeners
            .iter()
            .zip(sockets)
            .map(|(l, socket)| {
                let running = self.running(&l.name, l.bind);
                let bound = match socket {
                    Some(socket) => Some(socket.local_addr()),
                    None => running.map(|h| h.socket.local_addr()),
                };
                let port = bound.map_or(l.bind.port(), |a| a.port());
                let limit = match running {
                    Some(h) => h.state.load().limit.clone(),
                    None => ConnectionLimit::new(l.settings.max_connections),
                };
                let earlier = running.map(|h| h.state.load_full());
                ListenerState::build(l, port, limit, &self.metrics, earlier.as_deref())
                    .map_err(AppError::from)
            })
            .collect()
    }

    /// The running listener with this name bound to this configured address.
    fn running(&self, name: &str, bind: SocketAddr) -> Option<&ListenerHandle> {
        self.listeners
            .iter()
            .find(|h| h.name == name && h.bind == bind)
    }

    fn spawn_listener(&mut self, socket: ListeningSocket, mut state: ListenerState) {
        let socket = Arc::new(socket);
        defer_accept(&socket, &mut state);
        let stop = self.shutdown.child_token();
        let name = state.name.clone();
        let mode = state.mode;
        let bind = state.bind;
        let state = Arc::new(ArcSwap::from_pointee(state));
        let task = tokio::spawn(listener::accept_loop(
            socket.clone(),
            state.clone(),
            stop.clone(),
            self.connections.clone(),
            self.workers.clone(),
        ));
        info!(listener = %name, bind = %socket.local_addr(), "listening");
        let mut handle = ListenerHandle {
            name,
            bind,
            state,
            socket,
            stop,
            task,
            twin: None,
        };
        if mode == Mode::Transparent {
            handle.twin = self.spawn_twin(&handle);
        }
        self.listeners.push(handle);
    }

    /// Listens for a transparent listener on the other loopback family's address, same port.
    fn spawn_twin(&self, handle: &ListenerHandle) -> Option<Twin> {
        let addr = twin_loopback(handle.socket.local_addr());
        match ListeningSocket::bind(addr) {
            Ok(socket) => {
                info!(listener = %handle.name, bind = %socket.local_addr(), "listening");
                let stop = handle.stop.child_token();
                let task = tokio::spawn(listener::accept_loop(
                    Arc::new(socket),
                    handle.state.clone(),
                    stop.clone(),
                    self.connections.clone(),
                    self.workers.clone(),
                ));
                Some(Twin { stop, task })
            }
            Err(e) => {
                // An IPv4-only pod has no ::1; its connections are all IPv4 anyway.
                warn!(listener = %handle.name, bind = %addr, error = %e, "not listening on the other loopback family");
                None
            }
        }
    }

    /// Applies a new config to new connections. Every new socket is bound and every listener
    /// state built before anything changes, so a failure leaves the running config whole.
    pub async fn reload(&mut self, config: &Config) -> Result<(), AppError> {
        if let Some(change) =
            CaptureConfig::difference(self.capture.as_ref(), config.capture.as_ref())
        {
            return Err(AppError::CaptureChanged(change));
        }
        let mut sockets = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            sockets.push(match self.running(&l.name, l.bind) {
                Some(_) => None,
                None => Some(bind(&l.name, l.bind)?),
            });
        }
        let states = self.build_states(config, &sockets)?;
        let wanted: Vec<(String, SocketAddr)> =
            states.iter().map(|s| (s.name.clone(), s.bind)).collect();
        // Stop listeners that are gone or rebound; their open connections finish on their own.
        self.listeners.retain(|h| {
            let keep = wanted.iter().any(|(n, b)| *n == h.name && *b == h.bind);
            if !keep {
                h.stop.cancel();
            }
            keep
        });
        for (mut state, socket) in states.into_iter().zip(sockets) {
            match socket {
                Some(socket) => self.spawn_listener(socket, state),
                None => {
                    let Some(i) = self.listeners.iter().position(|h| h.name == state.name) else {
                        continue;
                    };
                    let transparent = state.mode == Mode::Transparent;
                    let h = &self.listeners[i];
                    defer_accept(&h.socket, &mut state);
                    // The limit carries over; its new maximum applies from now.
                    state.limit.set_max(state.settings.max_connections);
                    h.state.store(Arc::new(state));
                    // Only a transparent listener takes the other loopback family too.
                    match (transparent, h.twin.is_some()) {
                        (false, true) => {
                            if let Some(twin) = self.listeners[i].twin.take() {
                                twin.stop.cancel();
                            }
                        }
                        (true, false) => {
                            self.listeners[i].twin = self.spawn_twin(&self.listeners[i])
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// Logs one line of counters per listener.
    pub fn log_counters(&self) {
        for h in &self.listeners {
            let counters = h.state.load().metrics.snapshot();
            info!(listener = %h.name, counters = %counters, "counters");
        }
    }

    /// Stops accepting, turns `/readyz` to 503, lets in-flight work finish up to the longest
    /// `drain_timeout`. Returns whether everything finished in time.
    pub async fn drain(self) -> bool {
        self.readiness.set_draining();
        let timeout = self
            .listeners
            .iter()
            .map(|h| h.state.load().settings.drain_timeout)
            .max()
            .unwrap_or(Duration::ZERO);
        self.shutdown.cancel();
        for h in self.listeners {
            let _ = h.task.await;
            if let Some(twin) = h.twin {
                let _ = twin.task.await;
            }
        }
        // Logged once the listening sockets are closed: from here no new connection is taken.
        info!("draining");
        self.connections.close();
        let finished = tokio::time::timeout(timeout, self.connections.wait())
            .await
            .is_ok();
        self.admin_task.abort();
        finished
    }

    /// Reloads from the config file, counting and logging the outcome. Returns the files the
    /// applied config names, to watch from now on.
    async fn reload_from_file(&mut self) -> Option<(Vec<PathBuf>, u64)> {
        let outcome = match config::load(&self.config_path) {
            Ok(config) => {
                for warning in &config.warnings {
                    warn!(warning = %warning, "config warning");
                }
                match self.reload(&config).await {
                    Ok(()) => Ok((config.files, config.fingerprint)),
                    Err(e) => Err(vec![e.to_string()]),
                }
            }
            Err(errors) => Err(errors.0.iter().map(ToString::to_string).collect()),
        };
        match outcome {
            Ok(files) => {
                self.metrics.reload(ReloadOutcome::Ok);
                info!("config reloaded");
                Some(files)
            }
            Err(reasons) => {
                self.metrics.reload(ReloadOutcome::Rejected);
                for reason in reasons {
                    error!(error = %reason, "config reload refused; the running config stays");
                }
                None
            }
        }
    }
}

/// How often the watched files are compared.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Notices changes to the config file and every file it names, however they happen: an edit,
/// a rename over it, a Kubernetes ConfigMap/Secret symlink swap. It compares contents, so a
/// touch without a change reloads nothing, and acts once a change has held still for one
/// interval, so a file written in several steps is read whole.
struct Watch {
    files: Vec<PathBuf>,
    seen: u64,
    pending: Option<u64>,
}

impl Watch {
    /// `seen` is the fingerprint of `files` when the running config was read.
    fn new(files: Vec<PathBuf>, seen: u64) -> Self {
        Watch {
            files,
            seen,
            pending: None,
        }
    }

    /// True when the files changed and have stayed as they are since the last poll.
    fn poll(&mut self) -> bool {
        let now = fingerprint(&self.files);
        if now == self.seen {
            self.pending = None;
            return false;
        }
        if self.pending == Some(now) {
            self.seen = now;
            self.pending = None;
            return true;
        }
        self.pending = Some(now);
        false
    }

    /// Watches the files of a config just applied, from the state they were read in; after a
    /// refused reload, keeps the old files and takes their current state as seen.
    fn rebase(&mut self, applied: Option<(Vec<PathBuf>, u64)>) {
        match applied {
            Some((files, seen)) => {
                self.files = files;
                self.seen = seen;
            }
            None => self.seen = fingerprint(&self.files),
        }
        self.pending = None;
    }
}

/// Applies the state's accept wait to its listening socket, and records whether the kernel
/// took it (a listener whose socket does not defer keeps its timeouts as they are).
fn defer_accept(socket: &ListeningSocket, state: &mut ListenerState) {
    let wait = state.accept_wait();
    if let Err(e) = sys::set_defer_accept(socket, wait)
        && e.kind() != std::io::ErrorKind::Unsupported
    {
        warn!(listener = %state.name, wait_s = wait.as_secs(), error = %e, "deferred accept not changed");
    }
    // What the kernel does, whatever was asked: a failed change leaves the old wait in place.
    state.accept_deferred = sys::defer_accept(socket).is_ok_and(|w| !w.is_zero());
}

/// The same port on the loopback address of the other family.
fn twin_loopback(addr: SocketAddr) -> SocketAddr {
    let ip: IpAddr = match addr.ip() {
        IpAddr::V4(_) => Ipv6Addr::LOCALHOST.into(),
        IpAddr::V6(_) => Ipv4Addr::LOCALHOST.into(),
    };
    SocketAddr::new(ip, addr.port())
}

fn bind(name: &str, addr: SocketAddr) -> Result<ListeningSocket, AppError> {
    ListeningSocket::bind(addr).map_err(|source| AppError::Bind {
        what: format!("listener {name}"),
        addr,
        source,
    })
}

/// Runs the proxy until SIGTERM or SIGINT, then drains.
pub async fn run(config: Config) -> Result<(), AppError> {
    let mut hangup = signal(SignalKind::hangup()).map_err(AppError::Signals)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(AppError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(AppError::Signals)?;

    let mut proxy = Proxy::start(&config).await?;
    info!(admin = %proxy.admin_addr(), "admin endpoint listening");
    for warning in &config.warnings {
        warn!(warning = %warning, "config warning");
    }
    if let Some(capture) = config.capture.as_ref().filter(|c| c.outbound.is_some())
        && sys::effective_uid() != capture.proxy_uid
    {
        warn!(
            proxy_uid = capture.proxy_uid,
            uid = sys::effective_uid(),
            "capture.proxy_uid is not the uid ciphergate runs as: the capture rules will send its \
             own outbound connections back to it, and they will be refused"
        );
    }
    info!(listeners = proxy.listeners.len(), "ciphergate ready");

    let every = config.log.counters_every;
    let mut ticker = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
    ticker.tick().await;
    let mut watch = Watch::new(config.files.clone(), config.fingerprint);
    let mut watch_ticker = tokio::time::interval(WATCH_EVERY);
    watch_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                let files = proxy.reload_from_file().await;
                watch.rebase(files);
            }
            _ = watch_ticker.tick() => {
                if watch.poll() {
                    info!("config or certificate files changed; reloading");
                    let files = proxy.reload_from_file().await;
                    watch.rebase(files);
                }
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = ticker.tick(), if every.is_some() => proxy.log_counters(),
        }
    }
    let finished = proxy.drain().await;
    if finished {
        info!("drained; exiting");
    } else {
        warn!("drain_timeout reached; closing the remaining connections");
    }
    Ok(())
}
