//! Connecting to an upstream: resolve at connect time, try every address, and speak verified
//! TLS unless the leg is provably local (or a narrowed policy exception says otherwise).
//!
//! Failures map to the fixed [`UpstreamFailure`] categories, counted once, here. Nothing about
//! the destination is kept in an error.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};

use crate::config::UpstreamAddr;
use crate::metrics::{HandshakeOutcome, Leg, ListenerMetrics, UpstreamFailure};
use crate::tls::client::{ClientTls, UpstreamTls};

/// How the bytes of a leg travel.
#[derive(Clone)]
pub enum Security {
    /// Verified TLS.
    Tls(UpstreamTls),
    /// Plaintext to the app beside ciphergate: only loopback addresses are ever connected to,
    /// whatever the name resolves to.
    LoopbackPlaintext,
    /// Plaintext by a narrowed `allow` rule of an originate listener.
    PlaintextException,
    /// Raw TCP carrying the app's own TLS: only ever used for bytes that began with a TLS
    /// ClientHello (a forward-proxy `CONNECT` tunnel).
    Passthrough,
}

/// One upstream target and how to reach it.
pub struct Upstream {
    pub addr: UpstreamAddr,
    pub security: Security,
    /// Bounds resolution, connect and handshake together.
    pub timeout: Duration,
    pub metrics: ListenerMetrics,
}

impl Upstream {
    pub fn uses_tls(&self) -> bool {
        matches!(self.security, Security::Tls(_))
    }

    /// Whether a connection made for `self` is as good for `other`: the same address, security
    /// and timeout. A reload keeps a leg's open connections when the new config's leg is the
    /// same.
    pub fn same_leg(&self, other: &Upstream) -> bool {
        let security = match (&self.security, &other.security) {
            (Security::Tls(a), Security::Tls(b)) => a.same_as(b),
            (a, b) => std::mem::discriminant(a) == std::mem::discriminant(b),
        };
        security && self.addr == other.addr && self.timeout == other.timeout
    }

    /// Resolves the host (at connect time, never cached) to the addresses this leg may use:
    /// only loopback ones for a loopback plaintext leg.
    pub async fn resolve(&self) -> Result<Vec<SocketAddr>, UpstreamFailure> {
        let result = timeout(self.timeout, self.lookup())
            .await
            .unwrap_or(Err(UpstreamFailure::Timeout));
        if let Err(failure) = result {
            self.metrics.upstream_error(failure);
        }
        result
    }

    async fn lookup(&self) -> Result<Vec<SocketAddr>, UpstreamFailure> {
        let loopback_only = matches!(self.security, Security::LoopbackPlaintext);
        let addrs: Vec<SocketAddr> =
            tokio::net::lookup_host((self.addr.host.as_str(), self.addr.port))
                .await
                .map_err(|_| UpstreamFailure::Connect)?
                .filter(|a| !loopback_only || a.ip().is_loopback())
                .collect();
        if addrs.is_empty() {
            return Err(UpstreamFailure::Connect);
        }
        Ok(addrs)
    }

    /// Resolves and connects, trying every address in turn; counts any failure.
    pub async fn connect(&self) -> Result<UpstreamStream, UpstreamFailure> {
        let deadline = Instant::now() + self.timeout;
        let result = match timeout_at(deadline, self.lookup()).await {
            Ok(Ok(addrs)) => self.try_connect(&addrs, deadline).await,
            Ok(Err(failure)) => Err(failure),
            Err(_) => Err(UpstreamFailure::Timeout),
        };
        if let Err(failure) = result {
            self.metrics.upstream_error(failure);
        }
        result
    }

    /// Connects to one of `addrs` (already resolved, and approved by the policy), in turn;
    /// counts any failure.
    pub async fn connect_to(
        &self,
        addrs: &[SocketAddr],
    ) -> Result<UpstreamStream, UpstreamFailure> {
        let result = self.try_connect(addrs, Instant::now() + self.timeout).await;
        if let Err(failure) = result {
            self.metrics.upstream_error(failure);
        }
        result
    }

    /// Makes the leg over a TCP connection the caller opened itself (from a socket it had to
    /// know the address of first): verified TLS for a TLS leg. Counts any failure.
    pub async fn over(&self, tcp: TcpStream) -> Result<UpstreamStream, UpstreamFailure> {
        let result = self.secure(tcp, Instant::now() + self.timeout).await;
        if let Err(failure) = result {
            self.metrics.upstream_error(failure);
        }
        result
    }

    async fn try_connect(
        &self,
        addrs: &[SocketAddr],
        deadline: Instant,
    ) -> Result<UpstreamStream, UpstreamFailure> {
        let tcp = connect_any(addrs, &self.security, deadline).await?;
        self.secure(tcp, deadline).await
    }

    /// The leg's security over a connected socket: the TLS handshake for a TLS leg.
    async fn secure(
        &self,
        tcp: TcpStream,
        deadline: Instant,
    ) -> Result<UpstreamStream, UpstreamFailure> {
        let Security::Tls(tls) = &self.security else {
            return Ok(UpstreamStream::Plain(tcp));
        };
        let connector = tokio_rustls::TlsConnector::from(tls.client.config.clone());
        match timeout_at(deadline, connector.connect(tls.server_name.clone(), tcp)).await {
            Ok(Ok(stream)) => {
                self.metrics.handshake(Leg::Upstream, HandshakeOutcome::Ok);
                let conn = stream.get_ref().1;
                let (version, group) = crate::tls::session_labels(
                    conn.protocol_version(),
                    conn.negotiated_key_exchange_group().map(|g| g.name()),
                );
                self.metrics.session(Leg::Upstream, version, group);
                Ok(UpstreamStream::Tls(Box::new(stream)))
            }
            Ok(Err(_)) => {
                self.metrics
                    .handshake(Leg::Upstream, HandshakeOutcome::Failed);
                Err(UpstreamFailure::Tls)
            }
            Err(_) => {
                self.metrics
                    .handshake(Leg::Upstream, HandshakeOutcome::Timeout);
                Err(UpstreamFailure::Timeout)
            }
        }
    }
}

/// The first address of `addrs` that accepts a connection, each tried in turn with an equal
/// share of the time left, so one address that drops packets cannot use up the whole budget.
/// A loopback plaintext leg never connects anywhere else, whoever resolved the addresses.
async fn connect_any(
    addrs: &[SocketAddr],
    security: &Security,
    deadline: Instant,
) -> Result<TcpStream, UpstreamFailure> {
    let loopback_only = matches!(security, Security::LoopbackPlaintext);
    let candidates: Vec<&SocketAddr> = addrs
        .iter()
        .filter(|a| !loopback_only || a.ip().is_loopback())
        .collect();
    let mut timed_out = false;
    for (i, addr) in candidates.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let share = left / (candidates.len() - i) as u32;
        match timeout(share, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(_)) => {}
            Err(_) => timed_out = true,
        }
    }
    Err(if timed_out {
        UpstreamFailure::Timeout
    } else {
        UpstreamFailure::Connect
    })
}

/// A connected upstream leg.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl UpstreamStream {
    pub fn negotiated_h2(&self) -> bool {
        match self {
            UpstreamStream::Plain(_) => false,
            UpstreamStream::Tls(tls) => tls.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        let connected = Connected::new();
        if self.negotiated_h2() {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

/// The forward proxy's connector: it connects to whatever the URI names. `https` URIs get
/// verified TLS with the URI host as SNI; `http` URIs are plaintext, which the forward proxy
/// builds only after a narrowed `allow` rule matched.
#[derive(Clone)]
pub struct DynamicConnector {
    pub tls: ClientTls,
    pub timeout: Duration,
    pub metrics: ListenerMetrics,
}

impl DynamicConnector {
    /// Whether connections made by `self` are as good for `other` (see [`Upstream::same_leg`]).
    pub fn same_as(&self, other: &DynamicConnector) -> bool {
        self.tls.fingerprint == other.tls.fingerprint && self.timeout == other.timeout
    }

    /// The upstream a URI names, or `None` when it names no host.
    pub fn upstream_for(&self, uri: &Uri) -> Option<Upstream> {
        let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
        let tls = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let security = if tls {
            let server_name = rustls::pki_types::ServerName::try_from(host.to_owned()).ok()?;
            Security::Tls(UpstreamTls {
                client: self.tls.clone(),
                server_name,
            })
        } else {
            Security::PlaintextException
        };
        Some(Upstream {
            addr: UpstreamAddr {
                host: host.to_ascii_lowercase(),
                port,
            },
            security,
            timeout: self.timeout,
            metrics: self.metrics.clone(),
        })
    }
}

/// The hyper client's connector.
#[derive(Clone)]
pub enum Connector {
    /// Whatever URI it is asked for, it connects to its one upstream.
    Fixed(Arc<Upstream>),
    /// It connects to the host and port the URI names (forward proxy).
    Dynamic(DynamicConnector),
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<UpstreamStream>;
    type Error = UpstreamFailure;
    type Future =
        Pin<Box<dyn Future<Output = Result<TokioIo<UpstreamStream>, UpstreamFailure>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        match self {
            Connector::Fixed(upstream) => {
                let upstream = upstream.clone();
                Box::pin(async move { upstream.connect().await.map(TokioIo::new) })
            }
            Connector::Dynamic(dynamic) => {
                let upstream = dynamic.upstream_for(&uri);
                Box::pin(async move {
                    match upstream {
                        Some(upstream) => upstream.connect().await.map(TokioIo::new),
                        None => Err(UpstreamFailure::Connect),
                    }
                })
            }
        }
    }
}
