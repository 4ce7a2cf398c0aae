//! Shared fixtures for the integration tests: certificates made with rcgen, the real
//! `ciphergate` binary on 127.0.0.1:0, upstreams that record what reaches them, and clients.
//!
//! Readiness is never a sleep: the proxy is ready when it logs `ciphergate ready`, a fixture is
//! ready when its socket is bound.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

pub use ciphergate::certs::{Authority, Issued};

/// How long a test waits for something that should happen promptly before failing.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ciphergate")
}

/// A temporary directory holding certificates and a config.
pub struct Workspace {
    pub dir: tempfile::TempDir,
    pub ca: Authority,
}

impl Workspace {
    /// A workspace with a CA and `server.crt`/`server.key` for localhost and 127.0.0.1.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Authority::new("ciphergate test CA").expect("ca");
        let ws = Workspace { dir, ca };
        ws.write("ca.crt", &ws.ca.cert_pem());
        let server = ws
            .ca
            .issue_server(&["localhost".into(), "127.0.0.1".into()])
            .expect("server cert");
        ws.write_issued("server", &server);
        ws
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The path as a string for a config file.
    pub fn p(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, contents).expect("write");
        path
    }

    pub fn write_issued(&self, stem: &str, issued: &Issued) {
        self.write(&format!("{stem}.crt"), &issued.cert_pem);
        self.write(&format!("{stem}.key"), &issued.key_pem);
    }

    /// Writes `ciphergate.toml` and returns its path.
    pub fn config(&self, toml: &str) -> PathBuf {
        self.write("ciphergate.toml", toml)
    }

    /// A `[[listener.certs]]` table with the workspace's server certificate.
    pub fn certs_table(&self) -> String {
        format!(
            "  [[listener.certs]]\n  cert = \"{}\"\n  key = \"{}\"\n",
            self.p("server.crt"),
            self.p("server.key")
        )
    }

    pub fn ca_pem(&self) -> String {
        self.ca.cert_pem()
    }
}

/// The `[admin]` and `[log]` tables every test config starts with.
pub fn preamble(level: &str) -> String {
    format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[log]\nlevel = \"{level}\"\nformat = \"json\"\ncounters_every = \"0s\"\n\n"
    )
}

/// A running `ciphergate run` process, killed when dropped.
pub struct ProxyProcess {
    child: Child,
    logs: Arc<(Mutex<Vec<String>>, Condvar)>,
    pub admin: SocketAddr,
    pub listeners: BTreeMap<String, SocketAddr>,
}

impl ProxyProcess {
    /// Starts the binary on `config` and waits for `ciphergate ready`.
    pub fn start(config: &Path) -> Self {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(bin());
        command
            .arg("run")
            .arg("-c")
            .arg(config)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn ciphergate");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let (lines, cv) = &*sink;
                lines.lock().unwrap().push(line);
                cv.notify_all();
            }
            sink.1.notify_all();
        });
        let mut proxy = ProxyProcess {
            child,
            logs,
            admin: "0.0.0.0:0".parse().unwrap(),
            listeners: BTreeMap::new(),
        };
        let ready = proxy.wait_for_log(|l| l.contains("\"ciphergate ready\""));
        assert!(
            ready,
            "ciphergate did not become ready; logs:\n{}",
            proxy.logs().join("\n")
        );
        for line in proxy.logs() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            match v["message"].as_str() {
                Some("listening") => {
                    let name = v["listener"].as_str().unwrap().to_owned();
                    let addr = v["bind"].as_str().unwrap().parse().unwrap();
                    proxy.listeners.insert(name, addr);
                }
                Some("admin endpoint listening") => {
                    proxy.admin = v["admin"].as_str().unwrap().parse().unwrap();
                }
                _ => {}
            }
        }
        proxy
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.listeners[listener]
    }

    pub fn port(&self, listener: &str) -> u16 {
        self.addr(listener).port()
    }

    /// Every line logged so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.0.lock().unwrap().clone()
    }

    /// Waits until a log line satisfies `pred`; false after [`PATIENCE`].
    pub fn wait_for_log(&self, pred: impl Fn(&str) -> bool) -> bool {
        self.wait_for_log_after(0, pred)
    }

    /// Waits until a line logged after the first `skip` lines satisfies `pred`.
    pub fn wait_for_log_after(&self, skip: usize, pred: impl Fn(&str) -> bool) -> bool {
        let (lines, cv) = &*self.logs;
        let deadline = std::time::Instant::now() + PATIENCE;
        let mut guard = lines.lock().unwrap();
        loop {
            if guard.iter().skip(skip).any(|l| pred(l)) {
                return true;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            guard = cv.wait_timeout(guard, deadline - now).unwrap().0;
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `/metrics` parsed into series -> value.
    pub async fn metrics(&self) -> Metrics {
        let (status, _, body) = get_plain(self.admin, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        Metrics::parse(&body)
    }

    /// Polls `/metrics` until the series reads `value` (or PATIENCE passes) and returns the
    /// last reading. A gauge can lag what a client sees by a moment: a connection's socket is
    /// closed before the task that owned it has finished dropping its state.
    pub async fn wait_for_metric(&self, name: &str, labels: &[(&str, &str)], value: f64) -> f64 {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let read = self.metrics().await.get(name, labels);
            if read == value || std::time::Instant::now() >= deadline {
                return read;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn metrics_text(&self) -> String {
        get_plain(self.admin, "/metrics").await.2
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parsed exposition: `name{labels}` (as written by the exporter) -> value.
pub struct Metrics(pub BTreeMap<String, f64>);

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let mut map = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            if let Some((series, value)) = line.rsplit_once(' ') {
                map.insert(series.to_owned(), value.parse().unwrap_or(f64::NAN));
            }
        }
        Metrics(map)
    }

    /// The value of the series `name` whose labels are exactly `labels` (in any order); 0 when
    /// absent.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .find(|(series, _)| {
                let Some((n, rest)) = series.split_once('{') else {
                    return series.as_str() == name && labels.is_empty();
                };
                if n != name {
                    return false;
                }
                let mut have: Vec<(String, String)> = rest
                    .trim_end_matches('}')
                    .split(',')
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap();
                        (k.to_owned(), v.trim_matches('"').to_owned())
                    })
                    .collect();
                let mut want: Vec<(String, String)> = labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                have.sort();
                want.sort();
                have == want
            })
            .map_or(0.0, |(_, v)| *v)
    }
}

/// What a recording upstream has seen.
pub struct Seen {
    pub connections: AtomicUsize,
    pub bytes: AtomicU64,
    pub requests: Mutex<Vec<SeenRequest>>,
    /// The number of requests that have arrived, for tests to wait on.
    arrived: tokio::sync::watch::Sender<usize>,
}

impl Default for Seen {
    fn default() -> Self {
        Seen {
            connections: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
            requests: Mutex::new(Vec::new()),
            arrived: tokio::sync::watch::channel(0).0,
        }
    }
}

#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub version: http::Version,
    pub method: String,
    pub path_and_query: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Seen {
    /// Waits until at least `n` requests have arrived (their heads; bodies may still flow).
    pub async fn wait_for_requests(&self, n: usize) {
        let mut rx = self.arrived.subscribe();
        tokio::time::timeout(PATIENCE, rx.wait_for(|count| *count >= n))
            .await
            .expect("requests did not arrive")
            .unwrap();
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    pub fn paths(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.path_and_query.clone())
            .collect()
    }

    pub fn requests(&self) -> Vec<SeenRequest> {
        self.requests.lock().unwrap().clone()
    }
}

/// A reading wrapper that counts the bytes an upstream receives.
struct CountingStream {
    inner: TcpStream,
    seen: Arc<Seen>,
}

impl tokio::io::AsyncRead for CountingStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.seen.bytes.fetch_add(n as u64, Ordering::SeqCst);
        poll
    }
}

impl tokio::io::AsyncWrite for CountingStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An address where connections are refused, kept so while the returned socket lives: it is
/// bound but never listens, so no other socket (one of the proxy's listeners, say) can be given
/// its port, as one could after a bind-and-drop.
pub fn refusing_addr() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

/// A plaintext HTTP/1.1 upstream on 127.0.0.1:0 that records every request and answers
/// `200 upstream saw {path}`. `/ws` answers a WebSocket-style upgrade and echoes bytes after it.
pub async fn http_upstream() -> (SocketAddr, Arc<Seen>) {
    http_upstream_on(TcpListener::bind("127.0.0.1:0").await.unwrap())
}

/// [`http_upstream`] with a short accept queue, as many apps have (Python's `http.server`
/// listens with 5): a burst of new connections beyond it waits for the kernel's
/// retransmissions.
pub fn http_upstream_with_backlog(backlog: u32) -> (SocketAddr, Arc<Seen>) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    http_upstream_on(socket.listen(backlog).unwrap())
}

fn http_upstream_on(listener: TcpListener) -> (SocketAddr, Arc<Seen>) {
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let state = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            state.connections.fetch_add(1, Ordering::SeqCst);
            let io = CountingStream {
                inner: stream,
                seen: state.clone(),
            };
            let seen = state.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(req, &seen).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(io), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, seen)
}

async fn answer(mut req: Request<Incoming>, seen: &Seen) -> Response<Full<Bytes>> {
    let upgrade = req.uri().path() == "/ws";
    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let body = if upgrade {
        Bytes::new()
    } else {
        body.collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default()
    };
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    seen.requests.lock().unwrap().push(SeenRequest {
        version: parts.version,
        method: parts.method.to_string(),
        path_and_query: path.clone(),
        headers: parts.headers.clone(),
        body,
    });
    seen.arrived.send_modify(|count| *count += 1);
    // `/slow?ms=N` answers after N milliseconds: an in-flight request for drain tests.
    if let Some(ms) = path
        .strip_prefix("/slow?ms=")
        .and_then(|ms| ms.parse().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(on_upgrade) = on_upgrade {
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    let mut response = Response::new(Full::new(Bytes::from(format!("upstream saw {path}"))));
    response
        .headers_mut()
        .insert("x-upstream", http::HeaderValue::from_static("yes"));
    // `/close` answers and closes the connection, like an app whose keep-alive ran out.
    if path == "/close" {
        response
            .headers_mut()
            .insert("connection", http::HeaderValue::from_static("close"));
    }
    response
}

/// A tcp upstream on 127.0.0.1:0 that echoes every byte and counts them.
pub async fn echo_upstream() -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let state = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            state.connections.fetch_add(1, Ordering::SeqCst);
            let seen = state.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    seen.bytes.fetch_add(n as u64, Ordering::SeqCst);
                    if stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// A rustls client config trusting `ca_pem`, offering `alpn`.
pub fn client_tls(ca_pem: &str, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(ciphergate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

/// Connects from a chosen loopback source address (127.0.0.0/8 all routes to lo).
pub async fn connect_from(source: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    socket.connect(to).await.unwrap()
}

pub async fn tls_connect(
    tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// A reusable HTTP/1.1 connection for keep-alive tests.
pub struct H1 {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl H1 {
    pub async fn new<I>(io: I) -> Self
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .unwrap();
        tokio::spawn(conn);
        H1 { sender }
    }

    pub async fn get(
        &mut self,
        host: &str,
        path: &str,
    ) -> hyper::Result<(StatusCode, http::HeaderMap, String)> {
        self.send(
            Request::get(path)
                .header("host", host)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
    }

    pub async fn send(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> hyper::Result<(StatusCode, http::HeaderMap, String)> {
        self.sender.ready().await?;
        let response = self.sender.send_request(req).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
    }

    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// One plaintext GET (used for the admin endpoint).
pub async fn get_plain(addr: SocketAddr, path: &str) -> (StatusCode, http::HeaderMap, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    H1::new(tcp).await.get("localhost", path).await.unwrap()
}

/// One GET over TLS with HTTP/1.1.
pub async fn get_tls(
    addr: SocketAddr,
    ca_pem: &str,
    sni: &str,
    path: &str,
) -> (StatusCode, http::HeaderMap, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tls_connect(tcp, client_tls(ca_pem, &["http/1.1"]), sni)
        .await
        .unwrap();
    H1::new(tls).await.get(sni, path).await.unwrap()
}

/// One GET over TLS with HTTP/2 (negotiated by ALPN).
pub async fn get_h2(
    addr: SocketAddr,
    ca_pem: &str,
    sni: &str,
    path: &str,
) -> (StatusCode, http::HeaderMap, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tls_connect(tcp, client_tls(ca_pem, &["h2"]), sni)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("https://{sni}{path}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// An HTTP/2 client connection over TLS; clones send concurrent streams on it.
#[derive(Clone)]
pub struct H2 {
    sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
}

impl H2 {
    pub async fn connect(addr: SocketAddr, ca_pem: &str, sni: &str) -> Self {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = tls_connect(tcp, client_tls(ca_pem, &["h2"]), sni)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        H2 { sender }
    }

    /// One GET on a new stream: the status and the body.
    pub async fn get(&mut self, uri: &str) -> hyper::Result<(StatusCode, Bytes)> {
        self.sender.ready().await?;
        let req = Request::get(uri).body(Empty::<Bytes>::new()).unwrap();
        let response = self.sender.send_request(req).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// Writes `bytes` and reads until the peer closes (or [`PATIENCE`] passes).
pub async fn exchange_raw(stream: &mut TcpStream, bytes: &[u8]) -> Vec<u8> {
    let _ = stream.write_all(bytes).await;
    read_to_close(stream).await
}

/// Reads until the peer closes or resets; panics after [`PATIENCE`].
pub async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let read = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the proxy did not close the connection");
    out
}

/// Reads `stream` until the proxy closes it and asserts that took about one second (a 1 s
/// timeout): at least 0.8 s, under 5 s.
pub async fn assert_closed_after_about_a_second<S>(stream: &mut S, what: &str)
where
    S: tokio::io::AsyncRead + Unpin,
{
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "{what} stayed open");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(5),
        "{what} closed after {waited:?}"
    );
}

/// Runs a command and returns (exit code, stdout, stderr).
pub fn run(command: &mut Command) -> (i32, String, String) {
    let out = command.output().expect("run command");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a blocking command off the async runtime.
pub async fn run_async(mut command: Command) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || run(&mut command))
        .await
        .unwrap()
}

/// How a TLS test upstream behaves.
pub struct TlsUpstream<'a> {
    /// The certificate it serves.
    pub cert: &'a Issued,
    /// ALPN protocols it accepts; `h2` makes it speak HTTP/2.
    pub alpn: &'a [&'a str],
    /// A CA PEM: when set, a client certificate signed by it is required.
    pub client_ca: Option<&'a str>,
    /// Serve TLS 1.2 only.
    pub tls12_only: bool,
}

impl<'a> TlsUpstream<'a> {
    pub fn new(cert: &'a Issued) -> Self {
        TlsUpstream {
            cert,
            alpn: &["http/1.1"],
            client_ca: None,
            tls12_only: false,
        }
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        use rustls::pki_types::PrivateKeyDer;
        use rustls::pki_types::pem::PemObject;
        let chain = vec![CertificateDer::from_pem_slice(self.cert.cert_pem.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(self.cert.key_pem.as_bytes()).unwrap();
        let versions: &[&rustls::SupportedProtocolVersion] = if self.tls12_only {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let builder = rustls::ServerConfig::builder_with_provider(ciphergate::tls::provider())
            .with_protocol_versions(versions)
            .unwrap();
        let builder = match self.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots
                    .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
                    .unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    ciphergate::tls::provider(),
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).unwrap();
        config.alpn_protocols = self.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Arc::new(config)
    }

    /// Serves HTTP (1.1, or 2 when negotiated) over TLS, recording requests like
    /// [`http_upstream`].
    pub async fn http(self) -> (SocketAddr, Arc<Seen>) {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.server_config());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let state = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                state.connections.fetch_add(1, Ordering::SeqCst);
                let io = CountingStream {
                    inner: stream,
                    seen: state.clone(),
                };
                let seen = state.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(io).await else {
                        return;
                    };
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let service = service_fn(move |req: Request<Incoming>| {
                        let seen = seen.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(req, &seen).await) }
                    });
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tls), service)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), service)
                            .await;
                    }
                });
            }
        });
        (addr, seen)
    }

    /// Echoes bytes over TLS, counting the plaintext it receives.
    pub async fn echo(self) -> (SocketAddr, Arc<Seen>) {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.server_config());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let state = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                state.connections.fetch_add(1, Ordering::SeqCst);
                let seen = state.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        seen.bytes.fetch_add(n as u64, Ordering::SeqCst);
                        if tls.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        (addr, seen)
    }
}

/// Whether this test may do what only root can (network namespaces, nftables, running the
/// proxy as another uid). When not root it says so on stderr and the test returns early,
/// unless `CIPHERGATE_REQUIRE_ROOT_TESTS=1` (CI sets it, and runs as root): then a skip is a
/// failure, so CI cannot pass without running these tests.
pub fn can_run_as_root(test: &str) -> bool {
    if effective_uid_is_root() {
        return true;
    }
    assert!(
        std::env::var("CIPHERGATE_REQUIRE_ROOT_TESTS").as_deref() != Ok("1"),
        "{test} needs root, and CIPHERGATE_REQUIRE_ROOT_TESTS=1 says it must not be skipped"
    );
    eprintln!("SKIPPED {test}: needs root (network namespaces and nftables)");
    false
}

/// The effective uid is 0 (read from /proc, so the tests need no `unsafe`).
fn effective_uid_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}
