//! Configuration: figment (TOML, YAML or JSON, plus `CIPHERGATE_` environment overrides) into a
//! validated [`Config`].
//!
//! Loading never stops at the first mistake. Every table is read key by key, so one run reports
//! every unknown key, every value of the wrong type and every semantic error, each naming the
//! file (or environment variable) it came from and its 0-based key path, such as
//! `listener[0].upstream_tls.ca`.
//!
//! Certificates and keys are read and checked here, so `ciphergate check` catches a missing file
//! or a key that does not match its certificate, and `run` starts from material already loaded.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use figment::Figment;
use figment::providers::{Env, Format, Json, Toml, Yaml};
use figment::value::{Dict, Value};
use http::HeaderValue;
use ipnet::IpNet;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::de::DeserializeOwned;

use crate::policy::{
    Action, Enforcement, ListenerPolicy, Mode, NamePattern, Rule, Transport, normalize_path,
};
use crate::tls::MinTlsVersion;

/// The longest duration any setting accepts; beyond it timers overflow, and no timeout of a
/// proxy needs more.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The most connections one listener may be configured for.
pub const MAX_CONNECTIONS: u64 = 1_000_000;

/// How long before expiry `check` starts warning about a certificate.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// A fully validated configuration.
pub struct Config {
    /// The file it was loaded from.
    pub path: PathBuf,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub listeners: Vec<ListenerConfig>,
    /// `[capture]`: the netfilter rules that send every connection of the pod through
    /// ciphergate; `None` when the table is absent.
    pub capture: Option<CaptureConfig>,
    /// Findings that do not stop the config from loading (a certificate close to expiry).
    pub warnings: Vec<ConfigIssue>,
    /// The config file and every certificate, key and CA file it names: what a change to
    /// should reload.
    pub files: Vec<PathBuf>,
    /// [`fingerprint`] of `files` right after they were read, the baseline a watcher compares
    /// against (taken later, a change in between would be missed).
    pub fingerprint: u64,
}

/// `[capture]`, validated against the listeners it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Where every outbound TCP connection to a non-local address goes: a transparent
    /// listener's name and port.
    pub outbound: Option<CaptureTarget>,
    /// App ports whose inbound TCP goes to a terminate listener.
    pub inbound: Vec<InboundCapture>,
    /// Connections made by this uid (ciphergate's own) are never redirected.
    pub proxy_uid: u32,
    /// Outbound destinations left alone.
    pub exclude_cidrs: Vec<IpNet>,
    /// Outbound destination ports left alone.
    pub exclude_ports: Vec<u16>,
    /// Ports where ciphergate itself listens on a non-loopback address (captured terminate
    /// listeners, other listeners, admin): inbound connections to them are its own.
    pub own_ports: Vec<u16>,
}

impl CaptureConfig {
    /// What differs between two captures, in words, for a refused reload.
    pub fn difference(old: Option<&CaptureConfig>, new: Option<&CaptureConfig>) -> Option<String> {
        let (old, new) = match (old, new) {
            (None, None) => return None,
            (Some(_), None) => return Some("[capture] was removed".into()),
            (None, Some(_)) => return Some("[capture] was added".into()),
            (Some(old), Some(new)) => (old, new),
        };
        let what = if old.outbound != new.outbound {
            "capture.outbound_listener, or its port"
        } else if old.inbound != new.inbound {
            "capture.inbound, or the port of a listener it names"
        } else if old.proxy_uid != new.proxy_uid {
            "capture.proxy_uid"
        } else if old.exclude_cidrs != new.exclude_cidrs || old.exclude_ports != new.exclude_ports {
            "capture's exclusions"
        } else if old.own_ports != new.own_ports {
            "the ports ciphergate listens on outside the pod (the inbound guard lets in only \
             the installed ones)"
        } else {
            return None;
        };
        Some(format!("{what} changed"))
    }
}

/// A listener that captured connections are redirected to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureTarget {
    pub listener: String,
    pub port: u16,
}

/// One `[[capture.inbound]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundCapture {
    /// The app port clients dial.
    pub port: u16,
    /// The terminate listener that takes its connections instead.
    pub to: CaptureTarget,
}

/// The uid the image runs ciphergate as, and `proxy_uid`'s default.
pub const DEFAULT_PROXY_UID: u32 = 65532;

pub struct AdminConfig {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub bind: SocketAddr,
}

pub struct LogConfig {
    /// A level (`trace` … `error`, `off`); `RUST_LOG` overrides it.
    pub level: String,
    pub format: LogFormat,
    /// How often counters are written to the log; `None` when `"0s"`.
    pub counters_every: Option<Duration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 and HTTP/2 (by ALPN), decided per request.
    Http,
    /// A byte stream, decided per connection.
    Tcp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
        }
    }
}

/// Settings every listener inherits from `[defaults]` and may override.
#[derive(Clone, Debug)]
pub struct Settings {
    pub enforcement: Enforcement,
    pub min_tls_version: MinTlsVersion,
    /// Bounds detection of the first bytes plus the whole TLS handshake.
    pub handshake_timeout: Duration,
    /// Bounds the arrival of a complete HTTP/1 request head (also the keep-alive idle wait).
    pub header_timeout: Duration,
    /// A connection with no bytes in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// Beyond this many open connections, new ones are closed and counted.
    pub max_connections: usize,
    /// How long in-flight work may take to finish after SIGTERM.
    pub drain_timeout: Duration,
    /// The Strict-Transport-Security value added to responses served over TLS.
    pub hsts: Option<HeaderValue>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            enforcement: Enforcement::Enforce,
            min_tls_version: MinTlsVersion::Tls12,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_connections: 10_000,
            drain_timeout: Duration::from_secs(30),
            hsts: Some(HeaderValue::from_static("max-age=31536000")),
        }
    }
}

/// `host:port` of an upstream. The host is an IP literal or a DNS name, resolved at connect time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamAddr {
    pub host: String,
    pub port: u16,
}

impl UpstreamAddr {
    /// Parses `host:port`, `1.2.3.4:port` or `[v6]:port`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(UpstreamAddr {
                host: addr.ip().to_string(),
                port: addr.port(),
            });
        }
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("`{text}` is not host:port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{text}` has no valid port"))?;
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if !crate::policy::is_dns_name(&host) {
            return Err(format!("`{text}` does not name a valid host"));
        }
        Ok(UpstreamAddr { host, port })
    }

    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// Whether the host is on this machine: a loopback IP literal or `localhost`. Plaintext
    /// legs to such a host still connect only to loopback addresses after resolution.
    pub fn is_loopback(&self) -> bool {
        match self.ip() {
            Some(ip) => ip.is_loopback(),
            None => self.host == "localhost",
        }
    }

    /// `host:port` with IPv6 hosts bracketed, as used in URIs.
    pub fn authority(&self) -> String {
        match self.ip() {
            Some(IpAddr::V6(v6)) => format!("[{v6}]:{}", self.port),
            _ => format!("{}:{}", self.host, self.port),
        }
    }
}

/// A served certificate chain with its key, and the names it is chosen for.
pub struct CertConfig {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// `server_names`, or the certificate's DNS SANs when not given.
    pub server_names: Vec<NamePattern>,
    /// The leaf's notAfter, as a Unix timestamp.
    pub not_after: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuthMode {
    /// Handshakes without a verified client certificate fail.
    Required,
    /// A certificate is verified when presented; rules can test `client_verified`.
    Optional,
}

pub struct ClientAuthConfig {
    pub ca_path: PathBuf,
    pub roots: Vec<CertificateDer<'static>>,
    pub mode: ClientAuthMode,
}

/// Where upstream certificates are verified against.
pub enum Roots {
    /// Mozilla's roots, bundled in the binary (works in a distroless image).
    Webpki,
    /// The operating system's store.
    System,
    /// A PEM bundle.
    Ca {
        path: PathBuf,
        certs: Vec<CertificateDer<'static>>,
    },
}

pub struct UpstreamTlsConfig {
    /// The name to send as SNI and verify the certificate for; default: the upstream host.
    pub server_name: Option<String>,
    pub roots: Roots,
    /// A client certificate chain and key for mTLS to the upstream.
    pub client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    /// ALPN protocols to offer; empty = the protocol's default.
    pub alpn: Vec<String>,
    pub min_tls_version: Option<MinTlsVersion>,
}

pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub mode: Mode,
    pub protocol: Protocol,
    /// `None` only on an originate http listener, which then acts as a forward proxy.
    pub upstream: Option<UpstreamAddr>,
    /// The port put in upgrade redirects; `None` means the port the listener is bound to.
    pub redirect_port: Option<u16>,
    pub settings: Settings,
    pub certs: Vec<CertConfig>,
    pub client_auth: Option<ClientAuthConfig>,
    pub upstream_tls: Option<UpstreamTlsConfig>,
    /// The rules that apply to this listener, in config order.
    pub policy: ListenerPolicy,
}

impl ListenerConfig {
    /// Whether the upstream leg is re-originated TLS. Plaintext goes only to a loopback upstream
    /// of a terminate listener without an `upstream_tls` table.
    pub fn upstream_uses_tls(&self) -> bool {
        match (&self.upstream, self.mode) {
            (Some(up), Mode::Terminate) => self.upstream_tls.is_some() || !up.is_loopback(),
            _ => true,
        }
    }
}

/// One finding, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The file, or the environment variable, the value came from.
    pub source: String,
    /// The 0-based key path, such as `listener[0].upstream_tls.ca`; empty for the whole file.
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.source, self.reason)
        } else {
            write!(f, "{}: {}: {}", self.source, self.key, self.reason)
        }
    }
}

/// Every error found in a config, in the order they were found.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigIssue>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{issue}")?;
        }
        Ok(())
    }
}

/// Loads and validates `path` plus environment overrides.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    let whole = |reason: String| {
        ConfigErrors(vec![ConfigIssue {
            source: file.clone(),
            key: String::new(),
            reason,
        }])
    };
    // figment treats a missing file as empty; a typo in -c must not start an empty proxy.
    if let Err(e) = std::fs::metadata(path) {
        return Err(whole(format!("cannot read config file: {e}")));
    }
    let format = match path.extension().and_then(|e| e.to_str()) {
        Some("yaml" | "yml") => Figment::from(Yaml::file_exact(path)),
        Some("json") => Figment::from(Json::file_exact(path)),
        _ => Figment::from(Toml::file_exact(path)),
    };
    // Only `CIPHERGATE_<SECTION>__<KEY>` variables are settings. Others with the prefix are
    // not ours: `CIPHERGATE_CONFIG`, and the `CIPHERGATE_SERVICE_HOST`-style variables
    // Kubernetes injects for a Service of that name.
    let figment = format.merge(
        Env::prefixed("CIPHERGATE_")
            .filter(|key| key.as_str().contains("__"))
            .split("__"),
    );
    let root: Dict = figment.extract().map_err(|e| {
        whole(
            e.into_iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;

    let mut cx = Ctx {
        figment: &figment,
        file,
        errors: Vec::new(),
        warnings: Vec::new(),
        files: vec![path.to_owned()],
    };
    let config = cx.config(path, &root);
    if cx.errors.is_empty() {
        let mut config = config.expect("a config without errors is complete");
        config.warnings = cx.warnings;
        config.fingerprint = fingerprint(&cx.files);
        config.files = cx.files;
        Ok(config)
    } else {
        Err(ConfigErrors(cx.errors))
    }
}

/// The state of one validation pass: where values come from, and what was found.
struct Ctx<'f> {
    figment: &'f Figment,
    file: String,
    /// Every certificate, key and CA file read, for the reload watcher.
    files: Vec<PathBuf>,
    errors: Vec<ConfigIssue>,
    warnings: Vec<ConfigIssue>,
}

/// One table being read: its key path, and which of its keys have been looked at.
struct Table<'a> {
    dict: &'a Dict,
    path: String,
    seen: Vec<&'static str>,
}

impl<'a> Table<'a> {
    fn new(dict: &'a Dict, path: impl Into<String>) -> Self {
        Table {
            dict,
            path: path.into(),
            seen: Vec::new(),
        }
    }

    fn key(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn raw(&mut self, key: &'static str) -> Option<&'a Value> {
        self.seen.push(key);
        self.dict.get(key)
    }
}

impl Ctx<'_> {
    /// Where a value came from: its file, or the environment variable that set it.
    fn source_of(&self, value: Option<&Value>, key: &str) -> String {
        let Some(value) = value else {
            return self.file.clone();
        };
        match self
            .figment
            .get_metadata(value.tag())
            .and_then(|m| m.source.as_ref())
        {
            Some(figment::Source::File(path)) => path.display().to_string(),
            Some(_) | None if self.is_env(value) => {
                let var = key.replace('.', "__").to_ascii_uppercase();
                format!("environment variable CIPHERGATE_{var}")
            }
            _ => self.file.clone(),
        }
    }

    fn is_env(&self, value: &Value) -> bool {
        self.figment
            .get_metadata(value.tag())
            .is_some_and(|m| m.name.contains("environment"))
    }

    fn error(&mut self, value: Option<&Value>, key: &str, reason: impl Into<String>) {
        let source = self.source_of(value, key);
        self.errors.push(ConfigIssue {
            source,
            key: key.to_owned(),
            reason: reason.into(),
        });
    }

    fn warn(&mut self, key: &str, reason: impl Into<String>) {
        self.warnings.push(ConfigIssue {
            source: self.file.clone(),
            key: key.to_owned(),
            reason: reason.into(),
        });
    }

    /// Reads `key` as a `T`; a wrong type is recorded and yields `None`.
    fn get<T: DeserializeOwned>(&mut self, table: &mut Table<'_>, key: &'static str) -> Option<T> {
        let value = table.raw(key)?;
        match value.deserialize::<T>() {
            Ok(v) => Some(v),
            Err(e) => {
                let path = table.key(key);
                self.error(Some(value), &path, e.kind.to_string());
                None
            }
        }
    }

    fn required<T: DeserializeOwned>(
        &mut self,
        table: &mut Table<'_>,
        key: &'static str,
    ) -> Option<T> {
        if !table.dict.contains_key(key) {
            table.seen.push(key);
            let path = table.key(key);
            self.error(None, &path, "missing: this key is required");
            return None;
        }
        self.get(table, key)
    }

    /// Reads a sub-table, recording an error when `key` holds something else.
    fn table<'a>(&mut self, parent: &mut Table<'a>, key: &'static str) -> Option<Table<'a>> {
        let value = parent.raw(key)?;
        let path = parent.key(key);
        match value {
            Value::Dict(_, dict) => Some(Table::new(dict, path)),
            other => {
                self.error(Some(other), &path, "expected a table");
                None
            }
        }
    }

    /// Reads an array of tables (`[[listener]]`).
    fn tables<'a>(&mut self, parent: &mut Table<'a>, key: &'static str) -> Vec<Table<'a>> {
        let Some(value) = parent.raw(key) else {
            return Vec::new();
        };
        let path = parent.key(key);
        let Value::Array(_, items) = value else {
            self.error(Some(value), &path, "expected an array of tables");
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match item {
                Value::Dict(_, dict) => out.push(Table::new(dict, format!("{path}[{i}]"))),
                other => self.error(Some(other), &format!("{path}[{i}]"), "expected a table"),
            }
        }
        out
    }

    /// Records every key of `table` that was never looked at.
    fn finish(&mut self, table: Table<'_>) {
        for (key, value) in table.dict {
            if !table.seen.contains(&key.as_str()) {
                let path = table.key(key);
                self.error(Some(value), &path, "unknown key");
            }
        }
    }

    fn duration(&mut self, table: &mut Table<'_>, key: &'static str) -> Option<Duration> {
        let value = table.raw(key)?;
        let path = table.key(key);
        match value.as_str().map(humantime::parse_duration) {
            Some(Ok(d)) if d > MAX_DURATION => {
                self.error(Some(value), &path, "must be at most 7 days");
                None
            }
            Some(Ok(d)) => Some(d),
            Some(Err(e)) => {
                self.error(Some(value), &path, format!("invalid duration: {e}"));
                None
            }
            None => {
                self.error(
                    Some(value),
                    &path,
                    "expected a duration string such as \"10s\" or \"5m\"",
                );
                None
            }
        }
    }

    fn positive_duration(&mut self, table: &mut Table<'_>, key: &'static str) -> Option<Duration> {
        let d = self.duration(table, key)?;
        if d.is_zero() {
            let path = table.key(key);
            let value = table.dict.get(key);
            self.error(value, &path, "must be greater than zero");
            return None;
        }
        Some(d)
    }

    fn tls_version(&mut self, table: &mut Table<'_>, key: &'static str) -> Option<MinTlsVersion> {
        let value = table.raw(key)?;
        let text = match value {
            Value::String(_, s) => s.clone(),
            Value::Num(_, n) => n.to_f64().map(|f| f.to_string()).unwrap_or_default(),
            _ => String::new(),
        };
        match text.as_str() {
            "1.2" => Some(MinTlsVersion::Tls12),
            "1.3" => Some(MinTlsVersion::Tls13),
            _ => {
                let path = table.key(key);
                self.error(Some(value), &path, "expected \"1.2\" or \"1.3\"");
                None
            }
        }
    }

    fn bind(&mut self, table: &mut Table<'_>, key: &'static str) -> Option<SocketAddr> {
        let text: String = self.required(table, key)?;
        match text.parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                let path = table.key(key);
                let value = table.dict.get(key);
                self.error(
                    value,
                    &path,
                    format!("`{text}` is not an IP:port address (such as 127.0.0.1:8443)"),
                );
                None
            }
        }
    }

    fn path(&mut self, table: &mut Table<'_>, key: &'static str) -> Option<PathBuf> {
        self.get::<String>(table, key).map(PathBuf::from)
    }

    fn config(&mut self, path: &Path, root: &Dict) -> Option<Config> {
        let mut top = Table::new(root, "");

        let admin = match self.table(&mut top, "admin") {
            Some(mut t) => {
                let bind = if t.dict.contains_key("bind") {
                    self.bind(&mut t, "bind")
                } else {
                    Some(default_admin_bind())
                };
                self.finish(t);
                bind.map(|bind| AdminConfig { bind })
            }
            None => Some(AdminConfig {
                bind: default_admin_bind(),
            }),
        };

        let log = self.log(&mut top);

        let defaults = match self.table(&mut top, "defaults") {
            Some(mut t) => {
                let settings = self.settings(&mut t, &Settings::default());
                self.finish(t);
                settings
            }
            None => Settings::default(),
        };

        let listener_tables = self.tables(&mut top, "listener");
        if listener_tables.is_empty() && !root.contains_key("listener") {
            self.error(None, "listener", "at least one [[listener]] is required");
        }
        let mut listeners = Vec::new();
        for table in listener_tables {
            listeners.push(self.listener(table, &defaults));
        }

        let rule_tables = self.tables(&mut top, "rule");
        let mut rules = Vec::new();
        for table in rule_tables {
            rules.push(self.rule(table));
        }

        self.check_listeners(&listeners, admin.as_ref());
        self.check_rules(&rules, &listeners);
        let capture = self.capture(&mut top, &listeners, admin.as_ref());
        self.finish(top);

        if !self.errors.is_empty() {
            return None;
        }
        let listeners = listeners
            .into_iter()
            .filter_map(|l| l.finish(&rules))
            .collect::<Vec<_>>();
        Some(Config {
            path: path.to_owned(),
            admin: admin?,
            log: log?,
            listeners,
            capture,
            warnings: Vec::new(),
            files: Vec::new(),
            fingerprint: 0,
        })
    }

    /// Reads `[capture]` and checks it against the listeners it names.
    fn capture(
        &mut self,
        top: &mut Table<'_>,
        listeners: &[ListenerEntry],
        admin: Option<&AdminConfig>,
    ) -> Option<CaptureConfig> {
        let mut t = self.table(top, "capture")?;
        let errors_before = self.errors.len();
        let target = |cx: &mut Self, name: &str, key: &str, value: Option<&Value>, want: Mode| {
            let Some(l) = listeners.iter().find(|l| l.name.as_deref() == Some(name)) else {
                let names = listener_names(listeners);
                cx.error(
                    value,
                    key,
                    format!("no listener is named `{name}` (listeners: {names})"),
                );
                return None;
            };
            if l.mode != want {
                cx.error(
                    value,
                    key,
                    format!(
                        "listener `{name}` is {}; this must name a {} listener",
                        l.mode.as_str(),
                        want.as_str()
                    ),
                );
                return None;
            }
            let bind = l.bind?;
            if bind.port() == 0 {
                cx.error(
                    value,
                    key,
                    format!(
                        "listener `{name}` binds port 0: the netfilter rules need the port it \
                         listens on, so give it a fixed one"
                    ),
                );
                return None;
            }
            let placement_ok = match want {
                Mode::Transparent => bind.ip().is_loopback(),
                _ => bind.ip().is_unspecified(),
            };
            if !placement_ok {
                let why = match want {
                    Mode::Transparent => {
                        "binds a non-loopback address: a redirect lands on the loopback address \
                         (127.0.0.1 or ::1)"
                    }
                    _ => {
                        "does not bind the unspecified address: an inbound redirect lands on the \
                         receiving interface's address, so bind 0.0.0.0 or [::]"
                    }
                };
                cx.error(value, key, format!("listener `{name}` {why}"));
                return None;
            }
            Some(CaptureTarget {
                listener: name.to_owned(),
                port: bind.port(),
            })
        };

        let outbound = match self.get::<String>(&mut t, "outbound_listener") {
            Some(name) => {
                let value = t.dict.get("outbound_listener");
                let key = t.key("outbound_listener");
                target(self, &name, &key, value, Mode::Transparent)
            }
            None => None,
        };
        let mut inbound = Vec::new();
        let mut seen_ports = Vec::new();
        for mut it in self.tables(&mut t, "inbound") {
            let port = self.required::<u16>(&mut it, "port");
            let name = self.required::<String>(&mut it, "listener");
            if port == Some(0) {
                let value = it.dict.get("port");
                self.error(value, &it.key("port"), "must be a port from 1 to 65535");
            }
            if let Some(port) = port
                && seen_ports.contains(&port)
            {
                let value = it.dict.get("port");
                self.error(
                    value,
                    &it.key("port"),
                    format!("port {port} is captured twice"),
                );
            }
            seen_ports.extend(port);
            if let (Some(port), Some(name)) = (port.filter(|p| *p != 0), name) {
                let value = it.dict.get("listener");
                let key = it.key("listener");
                if let Some(to) = target(self, &name, &key, value, Mode::Terminate) {
                    inbound.push(InboundCapture { port, to });
                }
            }
            self.finish(it);
        }
        let proxy_uid = self
            .get::<u32>(&mut t, "proxy_uid")
            .unwrap_or(DEFAULT_PROXY_UID);
        let exclude_cidrs = if t.dict.contains_key("exclude_cidrs") {
            self.cidrs(&mut t, "exclude_cidrs").unwrap_or_default()
        } else {
            Vec::new()
        };
        if !exclude_cidrs.is_empty() && !cidrs_narrow(Some(&exclude_cidrs)) {
            let value = t.dict.get("exclude_cidrs");
            self.error(
                value,
                &t.key("exclude_cidrs"),
                "excludes every address: nothing outbound would be captured (list only the \
                 destinations to leave alone)",
            );
        }
        if proxy_uid == 0 {
            let value = t.dict.get("proxy_uid");
            self.error(
                value,
                &t.key("proxy_uid"),
                "0 would exempt every process running as root, the app's included: run \
                 ciphergate as a uid of its own (the image's is 65532)",
            );
        }
        let exclude_ports = self
            .get::<Vec<u16>>(&mut t, "exclude_ports")
            .unwrap_or_default();
        if exclude_ports.contains(&0) {
            let value = t.dict.get("exclude_ports");
            self.error(value, &t.key("exclude_ports"), "ports run from 1 to 65535");
        }
        if !t.dict.contains_key("outbound_listener") && !t.dict.contains_key("inbound") {
            self.error(
                None,
                &t.path,
                "captures nothing: give outbound_listener, inbound, or both",
            );
        }
        let key_path = t.path.clone();
        self.finish(t);
        if self.errors.len() > errors_before {
            return None;
        }
        // Where ciphergate itself takes connections from outside the pod.
        let mut own_ports: Vec<u16> = listeners
            .iter()
            .filter_map(|l| l.bind)
            .chain(admin.map(|a| a.bind))
            .filter(|b| !b.ip().is_loopback() && b.port() != 0)
            .map(|b| b.port())
            .collect();
        own_ports.sort_unstable();
        own_ports.dedup();
        if let Some(clash) = inbound.iter().find(|i| own_ports.contains(&i.port)) {
            self.error(
                None,
                &format!("{key_path}.inbound"),
                format!(
                    "port {} is one ciphergate listens on itself: capturing it would send its \
                     own clients in a circle",
                    clash.port
                ),
            );
            return None;
        }
        Some(CaptureConfig {
            outbound,
            inbound,
            proxy_uid,
            exclude_cidrs,
            exclude_ports,
            own_ports,
        })
    }

    fn log(&mut self, top: &mut Table<'_>) -> Option<LogConfig> {
        let mut log = LogConfig {
            level: "info".into(),
            format: LogFormat::Json,
            counters_every: Some(Duration::from_secs(60)),
        };
        let Some(mut t) = self.table(top, "log") else {
            return Some(log);
        };
        let mut ok = true;
        if let Some(level) = self.get::<String>(&mut t, "level") {
            let level = level.to_ascii_lowercase();
            if ["trace", "debug", "info", "warn", "error", "off"].contains(&level.as_str()) {
                log.level = level;
            } else {
                let value = t.dict.get("level");
                self.error(
                    value,
                    &t.key("level"),
                    "expected one of trace, debug, info, warn, error, off",
                );
                ok = false;
            }
        }
        if let Some(format) = self.get(&mut t, "format") {
            log.format = format;
        }
        if t.dict.contains_key("counters_every") {
            match self.duration(&mut t, "counters_every") {
                Some(d) => log.counters_every = (!d.is_zero()).then_some(d),
                None => ok = false,
            }
        }
        self.finish(t);
        ok.then_some(log)
    }

    /// Reads the keys shared by `[defaults]` and each listener, over `base`.
    fn settings(&mut self, t: &mut Table<'_>, base: &Settings) -> Settings {
        let mut s = base.clone();
        if let Some(v) = self.get(t, "enforcement") {
            s.enforcement = v;
        }
        if let Some(v) = self.tls_version(t, "min_tls_version") {
            s.min_tls_version = v;
        }
        if let Some(v) = self.positive_duration(t, "handshake_timeout") {
            s.handshake_timeout = v;
        }
        if let Some(v) = self.positive_duration(t, "header_timeout") {
            s.header_timeout = v;
        }
        if let Some(v) = self.positive_duration(t, "idle_timeout") {
            s.idle_timeout = v;
        }
        if let Some(v) = self.positive_duration(t, "drain_timeout") {
            s.drain_timeout = v;
        }
        if let Some(v) = self.get::<u64>(t, "max_connections") {
            if v == 0 || v > MAX_CONNECTIONS {
                let value = t.dict.get("max_connections");
                self.error(
                    value,
                    &t.key("max_connections"),
                    format!("must be at least 1 and at most {MAX_CONNECTIONS}"),
                );
            } else {
                s.max_connections = usize::try_from(v).unwrap_or(usize::MAX);
            }
        }
        if let Some(v) = self.get::<String>(t, "hsts") {
            if v.is_empty() {
                s.hsts = None;
            } else {
                match HeaderValue::from_str(&v) {
                    Ok(h) => s.hsts = Some(h),
                    Err(_) => {
                        let value = t.dict.get("hsts");
                        self.error(value, &t.key("hsts"), "not a valid header value");
                    }
                }
            }
        }
        s
    }

    fn listener(&mut self, mut t: Table<'_>, defaults: &Settings) -> ListenerEntry {
        let errors_before = self.errors.len();
        let name = self.required::<String>(&mut t, "name");
        if let Some(name) = &name
            && !valid_name(name)
        {
            let value = t.dict.get("name");
            self.error(
                value,
                &t.key("name"),
                format!("`{name}` must be 1-48 characters of a-z, 0-9, _ and -"),
            );
        }
        let bind = self.bind(&mut t, "bind");
        let mode = self.get(&mut t, "mode").unwrap_or(Mode::Terminate);
        let protocol = self.get(&mut t, "protocol").unwrap_or(Protocol::Http);
        let upstream = match self.get::<String>(&mut t, "upstream") {
            Some(text) => match UpstreamAddr::parse(&text) {
                Ok(up) => Some(up),
                Err(reason) => {
                    let value = t.dict.get("upstream");
                    self.error(value, &t.key("upstream"), reason);
                    None
                }
            },
            None => None,
        };
        let redirect_port = self.get::<u16>(&mut t, "redirect_port");
        let settings = self.settings(&mut t, defaults);

        let now = unix_now();
        let mut certs = Vec::new();
        for mut ct in self.tables(&mut t, "certs") {
            if let Some(cert) = self.cert(&mut ct, now) {
                certs.push(cert);
            }
            self.finish(ct);
        }
        let client_auth = match self.table(&mut t, "client_auth") {
            Some(mut ct) => {
                let auth = self.client_auth(&mut ct);
                self.finish(ct);
                auth
            }
            None => None,
        };
        let upstream_tls = match self.table(&mut t, "upstream_tls") {
            Some(mut ut) => {
                let tls = self.upstream_tls(&mut ut);
                self.finish(ut);
                tls
            }
            None => None,
        };

        // Combinations that make no sense for the listener's mode and protocol.
        let terminate = mode == Mode::Terminate;
        if mode == Mode::Transparent {
            for (key, reason) in [
                (
                    "upstream",
                    "a transparent listener sends each connection to its original destination; \
                     remove upstream",
                ),
                (
                    "protocol",
                    "a transparent listener tells HTTP from other traffic by the first bytes of \
                     each connection; remove protocol",
                ),
            ] {
                if let Some(value) = t.dict.get(key) {
                    self.error(Some(value), &t.key(key), reason);
                }
            }
            if let Some(bind) = bind
                && !bind.ip().is_loopback()
            {
                let value = t.dict.get("bind");
                self.error(
                    value,
                    &t.key("bind"),
                    "a transparent listener takes the connections [capture] redirects to it, \
                     which land on loopback: bind 127.0.0.1 or [::1]",
                );
            }
        } else if upstream.is_none() && !t.dict.contains_key("upstream") {
            if terminate {
                self.error(
                    None,
                    &t.key("upstream"),
                    "missing: a terminate listener needs an upstream",
                );
            } else if protocol == Protocol::Tcp {
                self.error(
                    None,
                    &t.key("upstream"),
                    "missing: an originate tcp listener needs an upstream",
                );
            }
        }
        if terminate && !t.dict.contains_key("certs") {
            self.error(
                None,
                &t.key("certs"),
                "missing: a terminate listener needs at least one [[listener.certs]]",
            );
        }
        if !terminate {
            for key in ["certs", "client_auth", "redirect_port"] {
                if let Some(value) = t.dict.get(key) {
                    self.error(
                        Some(value),
                        &t.key(key),
                        "applies to terminate listeners only",
                    );
                }
            }
        }
        if !terminate
            && upstream.is_none()
            && let Some(Value::Dict(_, tls)) = t.dict.get("upstream_tls")
        {
            for (key, reason) in [
                (
                    "server_name",
                    "a forward proxy verifies each destination by its own name; server_name \
                     applies only with a fixed upstream",
                ),
                (
                    "client_cert",
                    "a forward proxy would present this certificate to every destination the app \
                     names; client certificates need a fixed upstream",
                ),
            ] {
                if let Some(value) = tls.get(key) {
                    self.error(
                        Some(value),
                        &format!("{}.{key}", t.key("upstream_tls")),
                        reason,
                    );
                }
            }
        }
        if terminate && protocol == Protocol::Tcp && t.dict.contains_key("redirect_port") {
            let value = t.dict.get("redirect_port");
            self.error(
                value,
                &t.key("redirect_port"),
                "applies to http listeners only",
            );
        }
        let key_path = t.path.clone();
        self.finish(t);

        let complete = self.errors.len() == errors_before;
        let config = match (&name, bind) {
            (Some(name), Some(bind)) if complete => Some(ListenerConfig {
                redirect_port,
                name: name.clone(),
                bind,
                mode,
                protocol,
                upstream,
                settings,
                certs,
                client_auth,
                upstream_tls,
                policy: ListenerPolicy {
                    mode,
                    enforcement: Enforcement::Enforce,
                    rules: Vec::new(),
                },
            }),
            _ => None,
        };
        ListenerEntry {
            key_path,
            name,
            bind,
            mode,
            protocol,
            config,
        }
    }

    fn read_certs(&mut self, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
        self.files.push(path.to_owned());
        crate::tls::pem::load_certs(path)
    }

    fn cert(&mut self, t: &mut Table<'_>, now: i64) -> Option<CertConfig> {
        let cert_path = self.required::<String>(t, "cert").map(PathBuf::from);
        let key_path = self.required::<String>(t, "key").map(PathBuf::from);
        let names = self.get::<Vec<String>>(t, "server_names");
        let mut server_names = Vec::new();
        for (i, name) in names.iter().flatten().enumerate() {
            match NamePattern::parse(name) {
                Ok(p) => server_names.push(p),
                Err(reason) => {
                    let value = t.dict.get("server_names");
                    self.error(value, &format!("{}[{i}]", t.key("server_names")), reason);
                }
            }
        }
        let (cert_path, key_path) = (cert_path?, key_path?);
        self.files.extend([cert_path.clone(), key_path.clone()]);
        let chain = match crate::tls::pem::load_certs(&cert_path) {
            Ok(chain) => Some(chain),
            Err(reason) => {
                let value = t.dict.get("cert");
                self.error(value, &t.key("cert"), reason);
                None
            }
        };
        let key = match crate::tls::pem::load_key(&key_path) {
            Ok(key) => Some(key),
            Err(reason) => {
                let value = t.dict.get("key");
                self.error(value, &t.key("key"), reason);
                None
            }
        };
        let (chain, key) = (chain?, key?);
        if let Err(reason) = crate::tls::server::certified_key(&chain, &key) {
            let value = t.dict.get("key");
            self.error(value, &t.key("key"), reason);
            return None;
        }
        if let Some(i) =
            (1..chain.len()).find(|&i| !crate::tls::pem::names_issuer(&chain[i - 1], &chain[i]))
        {
            let value = t.dict.get("cert");
            self.error(
                value,
                &t.key("cert"),
                format!(
                    "certificate {i} in {} did not issue certificate {}: the chain must run from \
                     the leaf to its issuers, in order",
                    cert_path.display(),
                    i - 1
                ),
            );
            return None;
        }
        let Some(not_after) = crate::tls::pem::not_after(&chain[0]) else {
            let value = t.dict.get("cert");
            self.error(
                value,
                &t.key("cert"),
                "the certificate does not parse as X.509",
            );
            return None;
        };
        if not_after < now {
            let value = t.dict.get("cert");
            self.error(
                value,
                &t.key("cert"),
                format!(
                    "the certificate in {} expired at {}",
                    cert_path.display(),
                    format_unix(not_after)
                ),
            );
            return None;
        }
        if not_after < now + EXPIRY_WARNING.as_secs() as i64 {
            self.warn(
                &t.key("cert"),
                format!(
                    "the certificate in {} expires soon, at {}",
                    cert_path.display(),
                    format_unix(not_after)
                ),
            );
        }
        if names.is_none() {
            server_names = crate::tls::pem::dns_names(&chain[0])
                .iter()
                .filter_map(|n| NamePattern::parse(n).ok())
                .collect();
        }
        Some(CertConfig {
            cert_path,
            key_path,
            chain,
            key,
            server_names,
            not_after,
        })
    }

    fn client_auth(&mut self, t: &mut Table<'_>) -> Option<ClientAuthConfig> {
        let ca_path = self.required::<String>(t, "ca").map(PathBuf::from);
        let mode = self.get(t, "mode").unwrap_or(ClientAuthMode::Required);
        let ca_path = ca_path?;
        self.files.push(ca_path.clone());
        match crate::tls::pem::load_certs(&ca_path) {
            Ok(roots) => Some(ClientAuthConfig {
                ca_path,
                roots,
                mode,
            }),
            Err(reason) => {
                let value = t.dict.get("ca");
                self.error(value, &t.key("ca"), reason);
                None
            }
        }
    }

    fn upstream_tls(&mut self, t: &mut Table<'_>) -> Option<UpstreamTlsConfig> {
        let errors_before = self.errors.len();
        let server_name = self.get::<String>(t, "server_name");
        if let Some(name) = &server_name
            && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            let value = t.dict.get("server_name");
            self.error(
                value,
                &t.key("server_name"),
                format!("`{name}` is not a DNS name or IP address"),
            );
        }
        let ca = self.path(t, "ca");
        let roots_name = self.get::<String>(t, "roots");
        let roots = match (ca, roots_name.as_deref()) {
            (Some(_), Some(_)) => {
                let value = t.dict.get("roots");
                self.error(
                    value,
                    &t.key("roots"),
                    "give either `ca` or `roots`, not both",
                );
                None
            }
            (Some(path), None) => match self.read_certs(&path) {
                Ok(certs) => Some(Roots::Ca { path, certs }),
                Err(reason) => {
                    let value = t.dict.get("ca");
                    self.error(value, &t.key("ca"), reason);
                    None
                }
            },
            (None, None | Some("webpki")) => Some(Roots::Webpki),
            (None, Some("system")) => Some(Roots::System),
            (None, Some(other)) => {
                let value = t.dict.get("roots");
                self.error(
                    value,
                    &t.key("roots"),
                    format!("`{other}` is not one of webpki, system (or give `ca`)"),
                );
                None
            }
        };
        let cert = self.path(t, "client_cert");
        let key = self.path(t, "client_key");
        let client_cert = match (cert, key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                self.files.extend([cert.clone(), key.clone()]);
                let chain = crate::tls::pem::load_certs(&cert);
                let key_der = crate::tls::pem::load_key(&key);
                match (chain, key_der) {
                    (Ok(chain), Ok(key_der)) => {
                        match crate::tls::server::certified_key(&chain, &key_der) {
                            Ok(_) => Some((chain, key_der)),
                            Err(reason) => {
                                let value = t.dict.get("client_key");
                                self.error(value, &t.key("client_key"), reason);
                                None
                            }
                        }
                    }
                    (chain, key_der) => {
                        if let Err(reason) = chain {
                            let value = t.dict.get("client_cert");
                            self.error(value, &t.key("client_cert"), reason);
                        }
                        if let Err(reason) = key_der {
                            let value = t.dict.get("client_key");
                            self.error(value, &t.key("client_key"), reason);
                        }
                        None
                    }
                }
            }
            (Some(_), None) => {
                self.error(
                    None,
                    &t.key("client_key"),
                    "missing: client_cert needs client_key",
                );
                None
            }
            (None, Some(_)) => {
                self.error(
                    None,
                    &t.key("client_cert"),
                    "missing: client_key needs client_cert",
                );
                None
            }
        };
        let alpn = self.get::<Vec<String>>(t, "alpn").unwrap_or_default();
        for (i, proto) in alpn.iter().enumerate() {
            if proto != "h2" && proto != "http/1.1" {
                let value = t.dict.get("alpn");
                self.error(
                    value,
                    &format!("{}[{i}]", t.key("alpn")),
                    format!("`{proto}` is not one of h2, http/1.1"),
                );
            }
        }
        let min_tls_version = self.tls_version(t, "min_tls_version");
        if self.errors.len() > errors_before {
            return None;
        }
        Some(UpstreamTlsConfig {
            server_name,
            roots: roots?,
            client_cert,
            alpn,
            min_tls_version,
        })
    }

    fn rule(&mut self, mut t: Table<'_>) -> RuleEntry {
        let errors_before = self.errors.len();
        let key_path = t.path.clone();
        let name = self.required::<String>(&mut t, "name");
        if let Some(name) = &name
            && (!valid_name(name) || name == "default")
        {
            let value = t.dict.get("name");
            self.error(
                value,
                &t.key("name"),
                format!("`{name}` must be 1-48 characters of a-z, 0-9, _ and -, and not `default`"),
            );
        }
        let listeners = self.get::<Vec<String>>(&mut t, "listeners");
        if listeners.as_ref().is_some_and(Vec::is_empty) {
            let value = t.dict.get("listeners");
            self.error(
                value,
                &t.key("listeners"),
                "empty: omit the key to apply the rule to every listener",
            );
        }
        let transport = self.get::<Transport>(&mut t, "transport");
        let source = self.cidrs(&mut t, "source");
        let destination = self.cidrs(&mut t, "destination");
        let destination_port = self.get::<Vec<u16>>(&mut t, "destination_port");
        match destination_port.as_deref() {
            Some([]) => {
                let value = t.dict.get("destination_port");
                self.error(
                    value,
                    &t.key("destination_port"),
                    "empty: omit the key instead",
                );
            }
            Some(ports) if ports.contains(&0) => {
                let value = t.dict.get("destination_port");
                self.error(
                    value,
                    &t.key("destination_port"),
                    "ports run from 1 to 65535",
                );
            }
            _ => {}
        }
        let mut server_name = Vec::new();
        for (i, name) in self
            .get::<Vec<String>>(&mut t, "server_name")
            .iter()
            .flatten()
            .enumerate()
        {
            match NamePattern::parse(name) {
                Ok(p) => server_name.push(p),
                Err(reason) => {
                    let value = t.dict.get("server_name");
                    self.error(value, &format!("{}[{i}]", t.key("server_name")), reason);
                }
            }
        }
        let mut path_prefix = Vec::new();
        for (i, prefix) in self
            .get::<Vec<String>>(&mut t, "path_prefix")
            .iter()
            .flatten()
            .enumerate()
        {
            let key = format!("{}[{i}]", t.key("path_prefix"));
            let value = t.dict.get("path_prefix");
            let trimmed = if prefix.len() > 1 {
                prefix.trim_end_matches('/')
            } else {
                prefix.as_str()
            };
            match normalize_path(trimmed) {
                Some(n) if n == trimmed && !prefix.contains(['?', '#']) => {
                    path_prefix.push(trimmed.to_owned())
                }
                Some(_) => self.error(
                    value,
                    &key,
                    format!(
                        "`{prefix}` is not a normalised path (no `.`/`..` segments, `//` or %-escapes of plain characters)"
                    ),
                ),
                None => self.error(value, &key, format!("`{prefix}` must start with `/`")),
            }
        }
        let client_verified = self.get::<bool>(&mut t, "client_verified");
        let action = self.required::<Action>(&mut t, "action");
        let action_value = t.dict.get("action").cloned();
        let destination_key = if t.dict.contains_key("destination") {
            "destination"
        } else {
            "destination_port"
        };
        let t_has_destination =
            t.dict.contains_key("destination") || t.dict.contains_key("destination_port");
        let mut plaintext_allow_by_source_only = false;
        let mut plaintext_allow_without_host = false;
        let t_has_path_prefix = t.dict.contains_key("path_prefix");
        self.finish(t);

        if let Some(action) = action {
            if action == Action::Upgrade && transport == Some(Transport::Tls) {
                self.error(
                    action_value.as_ref(),
                    &format!("{key_path}.action"),
                    "`upgrade` applies to plaintext; a rule with transport = \"tls\" cannot upgrade",
                );
            }
            let narrowed_beyond_source = cidrs_narrow(destination.as_deref())
                || destination_port.as_ref().is_some_and(|p| !p.is_empty())
                || !server_name.is_empty()
                // `/` among the prefixes matches every path: no narrowing at all.
                || (!path_prefix.is_empty() && path_prefix.iter().all(|p| p != "/"));
            let narrowed = narrowed_beyond_source || cidrs_narrow(source.as_deref());
            let plaintext_possible =
                transport != Some(Transport::Tls) && client_verified != Some(true);
            plaintext_allow_by_source_only =
                action == Action::Allow && plaintext_possible && !narrowed_beyond_source;
            plaintext_allow_without_host = action == Action::Allow
                && plaintext_possible
                && !cidrs_narrow(destination.as_deref())
                && server_name.is_empty();
            if action == Action::Allow && plaintext_possible && !narrowed {
                self.error(
                    action_value.as_ref(),
                    &format!("{key_path}.action"),
                    "a blanket plaintext `allow` is not permitted: narrow the rule with source, \
                     server_name, destination, destination_port or path_prefix (or set \
                     transport = \"tls\")",
                );
            }
        }
        let complete = self.errors.len() == errors_before;
        let rule = match (&name, action) {
            (Some(name), Some(action)) if complete => Some(Rule {
                name: name.as_str().into(),
                transport,
                source: source.unwrap_or_default(),
                server_name,
                destination: destination.unwrap_or_default(),
                destination_port: destination_port.unwrap_or_default(),
                path_prefix,
                client_verified,
                action,
            }),
            _ => None,
        };
        RuleEntry {
            plaintext_allow_by_source_only,
            plaintext_allow_without_host,
            has_destination: t_has_destination,
            destination_key,
            has_path_prefix: t_has_path_prefix,
            key_path,
            name,
            listeners,
            action,
            rule,
        }
    }

    fn cidrs(&mut self, t: &mut Table<'_>, key: &'static str) -> Option<Vec<IpNet>> {
        let items = self.get::<Vec<String>>(t, key)?;
        let mut nets = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let parsed = item
                .parse::<IpNet>()
                .or_else(|_| item.parse::<IpAddr>().map(IpNet::from));
            match parsed {
                Ok(net) => nets.push(net.trunc()),
                Err(_) => {
                    let value = t.dict.get(key);
                    self.error(
                        value,
                        &format!("{}[{i}]", t.key(key)),
                        format!("`{item}` is not an IP address or CIDR (such as 10.0.0.0/8)"),
                    );
                }
            }
        }
        if items.is_empty() {
            let value = t.dict.get(key);
            self.error(value, &t.key(key), "empty: omit the key instead");
        }
        Some(nets)
    }

    /// Checks across listeners: unique names and non-overlapping addresses. Runs on every
    /// listener, even one with errors of its own, so one pass reports everything.
    fn check_listeners(&mut self, listeners: &[ListenerEntry], admin: Option<&AdminConfig>) {
        let mut names = HashSet::new();
        let mut binds: BTreeMap<SocketAddr, String> = BTreeMap::new();
        if let Some(admin) = admin {
            binds.insert(admin.bind, "admin.bind".into());
        }
        for l in listeners {
            if let Some(name) = &l.name
                && !names.insert(name.clone())
            {
                self.error(
                    None,
                    &format!("{}.name", l.key_path),
                    format!("duplicate listener name `{name}`"),
                );
            }
            let Some(bind) = l.bind else { continue };
            let overlaps = binds.iter().find(|(other, _)| {
                bind.port() != 0
                    && other.port() == bind.port()
                    && (other.ip() == bind.ip()
                        || other.ip().is_unspecified()
                        || bind.ip().is_unspecified())
            });
            if let Some((_, other)) = overlaps {
                self.error(
                    None,
                    &format!("{}.bind", l.key_path),
                    format!("{bind} is already used by {other}"),
                );
            }
            binds.insert(bind, format!("{}.bind", l.key_path));
        }
    }

    /// Checks between rules and the listeners they apply to.
    fn check_rules(&mut self, rules: &[RuleEntry], listeners: &[ListenerEntry]) {
        let mut names = HashSet::new();
        for rule in rules {
            let key = |k: &str| format!("{}.{k}", rule.key_path);
            if let Some(name) = &rule.name
                && !names.insert(name.clone())
            {
                self.error(None, &key("name"), format!("duplicate rule name `{name}`"));
            }
            if let Some(wanted) = &rule.listeners {
                for (i, name) in wanted.iter().enumerate() {
                    if !listeners.iter().any(|l| l.name.as_ref() == Some(name)) {
                        self.error(
                            None,
                            &format!("{}[{i}]", key("listeners")),
                            format!(
                                "no listener is named `{name}` (listeners: {})",
                                listener_names(listeners)
                            ),
                        );
                    }
                }
            }
            let covered: Vec<&ListenerEntry> = listeners
                .iter()
                .filter(|l| l.name.as_deref().is_some_and(|n| rule.applies_to(n)))
                .collect();
            if covered.is_empty() {
                continue;
            }
            if rule.action == Some(Action::Upgrade) {
                for l in covered
                    .iter()
                    .filter(|l| l.mode == Mode::Terminate && l.protocol == Protocol::Tcp)
                {
                    self.error(
                        None,
                        &key("action"),
                        format!(
                            "`upgrade` cannot apply to tcp listener `{}`: a byte stream has no \
                             redirect (use `listeners` to leave it out)",
                            l.name.as_deref().unwrap_or_default()
                        ),
                    );
                }
            }
            if rule.plaintext_allow_by_source_only
                && let Some(l) = covered.iter().find(|l| l.mode.is_outbound())
            {
                self.error(
                    None,
                    &key("action"),
                    format!(
                        "a plaintext `allow` on {} listener `{}` must be narrowed by \
                         destination, destination_port, server_name or path_prefix: every \
                         connection there comes from the local app, so source narrows nothing",
                        l.mode.as_str(),
                        l.name.as_deref().unwrap_or_default()
                    ),
                );
            }
            if rule.plaintext_allow_without_host
                && !rule.plaintext_allow_by_source_only
                && let Some(l) = covered.iter().find(|l| l.mode == Mode::Transparent)
            {
                self.error(
                    None,
                    &key("action"),
                    format!(
                        "a plaintext `allow` on transparent listener `{}` must name where the \
                         plaintext may go, with destination (addresses) or server_name (a name, \
                         which must resolve to the address the app dialled): the app chooses \
                         its ports, Host headers and paths",
                        l.name.as_deref().unwrap_or_default()
                    ),
                );
            }
            if rule.has_destination && covered.iter().all(|l| !l.mode.is_outbound()) {
                self.error(
                    None,
                    &key(rule.destination_key),
                    "matches only on originate and transparent listeners, and the rule applies \
                     to none",
                );
            }
            if rule.has_path_prefix && covered.iter().all(|l| l.protocol != Protocol::Http) {
                self.error(
                    None,
                    &key("path_prefix"),
                    "matches only on http listeners, and the rule applies to none",
                );
            }
        }
    }
}

/// What is known of one `[[listener]]` table: its shape even when it has errors (for checks
/// across listeners), and its config when it has none.
struct ListenerEntry {
    key_path: String,
    name: Option<String>,
    bind: Option<SocketAddr>,
    mode: Mode,
    protocol: Protocol,
    config: Option<ListenerConfig>,
}

impl ListenerEntry {
    /// Attaches the rules that apply to this listener, in config order.
    fn finish(self, rules: &[RuleEntry]) -> Option<ListenerConfig> {
        let mut config = self.config?;
        config.policy = ListenerPolicy {
            mode: config.mode,
            enforcement: config.settings.enforcement,
            rules: rules
                .iter()
                .filter(|r| r.applies_to(&config.name))
                .filter_map(|r| r.rule.clone())
                .collect(),
        };
        Some(config)
    }
}

/// What is known of one `[[rule]]` table, like [`ListenerEntry`].
struct RuleEntry {
    key_path: String,
    name: Option<String>,
    listeners: Option<Vec<String>>,
    action: Option<Action>,
    /// Whether the rule tests `destination` or `destination_port`, and which key to name.
    has_destination: bool,
    destination_key: &'static str,
    has_path_prefix: bool,
    /// A plaintext `allow` whose only narrowing is `source`: not narrow on an originate
    /// listener, where every connection comes from the local app.
    plaintext_allow_by_source_only: bool,
    /// A plaintext `allow` that names neither addresses (`destination`) nor a host
    /// (`server_name`): on a transparent listener the app picks ports, Hosts and paths, so only
    /// those say where plaintext may go.
    plaintext_allow_without_host: bool,
    rule: Option<Rule>,
}

impl RuleEntry {
    fn applies_to(&self, listener: &str) -> bool {
        self.listeners
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == listener))
    }
}

/// Whether a list of CIDRs leaves some address out: `0.0.0.0/1` + `128.0.0.0/1` is as blanket
/// as `0.0.0.0/0`.
fn cidrs_narrow(nets: Option<&[IpNet]>) -> bool {
    match nets {
        Some(nets) if !nets.is_empty() => IpNet::aggregate(&nets.to_vec())
            .iter()
            .all(|net| net.prefix_len() > 0),
        _ => false,
    }
}

/// The names of the listeners, for an error that names a missing one.
fn listener_names(listeners: &[ListenerEntry]) -> String {
    let names: Vec<&str> = listeners.iter().filter_map(|l| l.name.as_deref()).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// Listener and rule names become metric labels: short, lowercase, no surprises.
fn valid_name(name: &str) -> bool {
    (1..=48).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn default_admin_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}

/// A digest of the contents of `files` (or of why one cannot be read), to tell whether any
/// changed, however it changed.
pub fn fingerprint(files: &[PathBuf]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for file in files {
        file.hash(&mut hasher);
        match std::fs::read(file) {
            Ok(bytes) => bytes.hash(&mut hasher),
            Err(e) => e.kind().hash(&mut hasher),
        }
    }
    hasher.finish()
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn format_unix(ts: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_secs(ts.max(0) as u64);
    humantime::format_rfc3339_seconds(time).to_string()
}
