//! `ciphergate demo`: the whole story on loopback in a few seconds, with nothing to set up.
//!
//! A small plaintext app, ciphergate in front of it (`ingress`, terminate) and behind it
//! (`egress`, originate), throwaway certificates, and real requests: TLS served with HSTS,
//! plaintext rejected, plaintext upgraded by a rule, an app request re-originated with TLS, and
//! the counters that recorded it all.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};

use crate::app::Proxy;
use crate::certs::{Authority, write_file};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo set-up failed: {0}")]
    Setup(String),
    #[error("demo step {step} failed: {reason}")]
    Step { step: usize, reason: String },
}

fn setup(e: impl std::fmt::Display) -> DemoError {
    DemoError::Setup(e.to_string())
}

/// Runs the demo, printing what happens to stdout.
pub async fn run() -> Result<(), DemoError> {
    let dir = tempfile::Builder::new()
        .prefix("ciphergate-demo-")
        .tempdir()
        .map_err(setup)?;
    let ca = Authority::new("ciphergate demo CA").map_err(setup)?;
    let server = ca
        .issue_server(&["localhost".into(), "127.0.0.1".into()])
        .map_err(setup)?;
    for (name, pem, secret) in [
        ("ca.crt", &ca.cert_pem(), false),
        ("server.crt", &server.cert_pem, false),
        ("server.key", &server.key_pem, true),
    ] {
        write_file(&dir.path().join(name), pem.as_bytes(), secret).map_err(setup)?;
    }

    let app = TcpListener::bind("127.0.0.1:0").await.map_err(setup)?;
    let app_addr = app.local_addr().map_err(setup)?;
    tokio::spawn(serve_app(app));

    // Start with the ingress alone, then reload with the egress pointed at the ingress's port:
    // the second config is applied the way SIGHUP applies one.
    let config_path = dir.path().join("ciphergate.toml");
    write_config(&config_path, dir.path(), app_addr, None)?;
    let config = crate::config::load(&config_path).map_err(setup)?;
    let mut proxy = Proxy::start(&config).await.map_err(setup)?;
    let ingress = addr_of(&proxy, "ingress")?;
    write_config(&config_path, dir.path(), app_addr, Some(ingress))?;
    let config = crate::config::load(&config_path).map_err(setup)?;
    proxy.reload(&config).await.map_err(setup)?;
    let egress = addr_of(&proxy, "egress")?;

    println!("ciphergate demo: everything on loopback, throwaway certificates");
    println!("  app      plaintext HTTP     {app_addr}");
    println!("  ingress  terminate, TLS     {ingress}  -> app");
    println!("  egress   originate          {egress}  -> TLS -> ingress");
    println!();

    let tls = client_tls(&ca.cert_pem())?;

    println!("1. A TLS client (HTTP/2 by ALPN) asks the ingress for /hello");
    let r = request(ingress, "localhost", "/hello", Some(&tls)).await;
    let r = expect(1, r, StatusCode::OK)?;
    let hsts = r.header(header::STRICT_TRANSPORT_SECURITY);
    println!(
        "   {} {}; strict-transport-security: {hsts}",
        r.version, r.status
    );
    println!("   app says: {}", r.body.trim());
    if hsts == "-" {
        return Err(step(1, "no HSTS header on a TLS response"));
    }

    println!(
        "2. A plaintext client asks the ingress for /account (no rule: plaintext is rejected)"
    );
    let r = expect(
        2,
        request(ingress, "127.0.0.1", "/account", None).await,
        StatusCode::UPGRADE_REQUIRED,
    )?;
    println!(
        "   {} {}; connection: {}",
        r.version,
        r.status,
        r.header(header::CONNECTION)
    );

    println!(
        "3. A plaintext client asks for localhost/login (rule `web-upgrade`: redirect to https)"
    );
    let r = expect(
        3,
        request(ingress, "localhost", "/login", None).await,
        StatusCode::PERMANENT_REDIRECT,
    )?;
    let location = r.header(header::LOCATION);
    println!("   {} {}; location: {location}", r.version, r.status);
    if location != format!("https://localhost:{}/login", ingress.port()) {
        return Err(step(3, "unexpected Location"));
    }

    println!("4. The app sends plaintext to the egress; it leaves encrypted (re-originated TLS)");
    let r = expect(
        4,
        request(egress, "localhost", "/from-the-app", None).await,
        StatusCode::OK,
    )?;
    println!("   {} {}; app says: {}", r.version, r.status, r.body.trim());

    println!();
    println!(
        "Counters (GET http://{}/metrics, non-zero series):",
        proxy.admin_addr()
    );
    let metrics = proxy.metrics().encode();
    let counters = nonzero_series(&metrics);
    print!("{counters}");
    if !counters.contains("ciphergate_tls_sessions_total{listener=\"egress\",leg=\"upstream\"") {
        return Err(step(4, "no upstream TLS session was counted on the egress"));
    }
    println!();
    println!("No log line or label above names a client, a host or a path.");
    proxy.drain().await;
    Ok(())
}

fn step(step: usize, reason: &str) -> DemoError {
    DemoError::Step {
        step,
        reason: reason.into(),
    }
}

fn addr_of(proxy: &Proxy, name: &str) -> Result<SocketAddr, DemoError> {
    proxy
        .listener_addrs()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, addr)| addr)
        .ok_or_else(|| setup(format!("listener {name} did not start")))
}

fn write_config(
    path: &Path,
    dir: &Path,
    app: SocketAddr,
    ingress: Option<SocketAddr>,
) -> Result<(), DemoError> {
    let d = dir.display();
    let mut toml = format!(
        r#"[admin]
bind = "127.0.0.1:0"

[log]
counters_every = "0s"

[[listener]]
name = "ingress"
bind = "127.0.0.1:0"
mode = "terminate"
protocol = "http"
upstream = "{app}"
  [[listener.certs]]
  cert = "{d}/server.crt"
  key = "{d}/server.key"

[[rule]]
name = "web-upgrade"
listeners = ["ingress"]
transport = "plaintext"
server_name = ["localhost"]
action = "upgrade"
"#
    );
    if let Some(ingress) = ingress {
        let _ = write!(
            toml,
            r#"
[[listener]]
name = "egress"
bind = "127.0.0.1:0"
mode = "originate"
protocol = "http"
upstream = "localhost:{port}"
  [listener.upstream_tls]
  ca = "{d}/ca.crt"
"#,
            port = ingress.port()
        );
    }
    std::fs::write(path, toml).map_err(setup)
}

async fn serve_app(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let service = service_fn(|req: Request<Incoming>| async move {
                let proto = req
                    .headers()
                    .get("x-forwarded-proto")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_owned();
                let body = format!(
                    "hello from the app: {} {} (x-forwarded-proto: {proto})\n",
                    req.method(),
                    req.uri().path()
                );
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn client_tls(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>, DemoError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| setup(format!("{e:?}")))?)
            .map_err(setup)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(setup)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

struct Answer {
    status: StatusCode,
    version: &'static str,
    headers: http::HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: header::HeaderName) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    }
}

fn expect(
    step: usize,
    answer: Result<Answer, String>,
    status: StatusCode,
) -> Result<Answer, DemoError> {
    let answer = answer.map_err(|reason| DemoError::Step { step, reason })?;
    if answer.status != status {
        return Err(DemoError::Step {
            step,
            reason: format!("expected {status}, got {}", answer.status),
        });
    }
    Ok(answer)
}

/// One GET, over TLS (HTTP/2 or HTTP/1.1 by ALPN) or plaintext HTTP/1.1.
async fn request(
    addr: SocketAddr,
    host: &str,
    path: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Answer, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let response = match tls {
        Some(config) => {
            let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
            let stream = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            let uri = format!("https://{host}{path}");
            if h2 {
                let (mut sender, conn) = hyper::client::conn::http2::handshake(
                    TokioExecutor::new(),
                    TokioIo::new(stream),
                )
                .await
                .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                let req = Request::get(uri)
                    .body(Empty::<Bytes>::new())
                    .map_err(|e| e.to_string())?;
                sender.send_request(req).await.map_err(|e| e.to_string())?
            } else {
                send_http1(TokioIo::new(stream), host, path).await?
            }
        }
        None => send_http1(TokioIo::new(tcp), host, path).await?,
    };
    let version = match response.version() {
        http::Version::HTTP_2 => "HTTP/2",
        _ => "HTTP/1.1",
    };
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Answer {
        status,
        version,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

async fn send_http1<I>(io: I, host: &str, path: &str) -> Result<Response<Incoming>, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(header::HOST, host)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    sender.send_request(req).await.map_err(|e| e.to_string())
}

/// The sample lines of an exposition whose value is not zero.
fn nonzero_series(exposition: &str) -> String {
    let mut out = String::new();
    for line in exposition.lines() {
        if line.starts_with('#') || line.starts_with("ciphergate_certificate_expiry") {
            continue;
        }
        if let Some((series, value)) = line.rsplit_once(' ')
            && value != "0"
        {
            let _ = writeln!(out, "  {series} {value}");
        }
    }
    out
}
