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
use tokio::time::{Instant, timeout_at};

use crate::config::UpstreamAddr;
use crate::metrics::{HandshakeOutcome, Leg, ListenerMetrics, UpstreamFailure};
use crate::tls::client::UpstreamTls;

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

    /// Connects, counting any failure under its category.
    pub async fn connect(&self) -> Result<UpstreamStream, UpstreamFailure> {
        let result = self.try_connect().await;
        if let Err(failure) = result {
            self.metrics.upstream_error(failure);
        }
        result
    }

    async fn try_connect(&self) -> Result<UpstreamStream, UpstreamFailure> {
        let deadline = Instant::now() + self.timeout;
        let tcp = timeout_at(deadline, self.connect_tcp())
            .await
            .map_err(|_| UpstreamFailure::Timeout)??;
        let Security::Tls(tls) = &self.security else {
            return Ok(UpstreamStream::Plain(tcp));
        };
        let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
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

    async fn connect_tcp(&self) -> Result<TcpStream, UpstreamFailure> {
        let loopback_only = matches!(self.security, Security::LoopbackPlaintext);
        let addrs: Vec<SocketAddr> =
            tokio::net::lookup_host((self.addr.host.as_str(), self.addr.port))
                .await
                .map_err(|_| UpstreamFailure::Connect)?
                .filter(|a| !loopback_only || a.ip().is_loopback())
                .collect();
        for addr in addrs {
            if let Ok(stream) = TcpStream::connect(addr).await {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
        }
        Err(UpstreamFailure::Connect)
    }
}

/// A connected upstream leg.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl UpstreamStream {
    fn negotiated_h2(&self) -> bool {
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

/// The hyper client's connector: whatever URI it is asked for, it connects to its one upstream.
#[derive(Clone)]
pub struct Connector(pub Arc<Upstream>);

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<UpstreamStream>;
    type Error = UpstreamFailure;
    type Future =
        Pin<Box<dyn Future<Output = Result<TokioIo<UpstreamStream>, UpstreamFailure>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let upstream = self.0.clone();
        Box::pin(async move { upstream.connect().await.map(TokioIo::new) })
    }
}
