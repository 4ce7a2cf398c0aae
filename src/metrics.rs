//! The fixed set of counters ciphergate exports.
//!
//! Every label value comes from config (listener and rule names, certificate indices) or from a
//! closed enumeration in this module. There is no API that takes free-form text for a label, so
//! traffic-derived values (addresses, names, paths) cannot reach `/metrics` by construction.
//!
//! Hot paths never look anything up: a [`ListenerMetrics`] holds a handle to every series of its
//! listener, created once when the listener's state is built, and counting is one atomic add.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::policy::{Action, Transport};

/// Which side of the proxy a TLS session is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leg {
    /// Between a client and ciphergate.
    Downstream,
    /// Between ciphergate and an upstream.
    Upstream,
}

impl Leg {
    const ALL: [Leg; 2] = [Leg::Downstream, Leg::Upstream];

    pub fn as_str(self) -> &'static str {
        match self {
            Leg::Downstream => "downstream",
            Leg::Upstream => "upstream",
        }
    }
}

/// How a TLS handshake ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeOutcome {
    Ok,
    Failed,
    Timeout,
}

impl HandshakeOutcome {
    const ALL: [HandshakeOutcome; 3] = [
        HandshakeOutcome::Ok,
        HandshakeOutcome::Failed,
        HandshakeOutcome::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeOutcome::Ok => "ok",
            HandshakeOutcome::Failed => "failed",
            HandshakeOutcome::Timeout => "timeout",
        }
    }
}

/// The negotiated protocol version of a TLS session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

impl TlsVersion {
    const ALL: [TlsVersion; 2] = [TlsVersion::Tls12, TlsVersion::Tls13];

    pub fn as_str(self) -> &'static str {
        match self {
            TlsVersion::Tls12 => "tls1_2",
            TlsVersion::Tls13 => "tls1_3",
        }
    }
}

/// The negotiated key-exchange group of a TLS session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KxGroup {
    X25519Mlkem768,
    X25519,
    Secp256r1,
    Secp384r1,
    Other,
}

impl KxGroup {
    const ALL: [KxGroup; 5] = [
        KxGroup::X25519Mlkem768,
        KxGroup::X25519,
        KxGroup::Secp256r1,
        KxGroup::Secp384r1,
        KxGroup::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KxGroup::X25519Mlkem768 => "x25519mlkem768",
            KxGroup::X25519 => "x25519",
            KxGroup::Secp256r1 => "secp256r1",
            KxGroup::Secp384r1 => "secp384r1",
            KxGroup::Other => "other",
        }
    }
}

/// Why a connection to an upstream failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamFailure {
    /// No address could be resolved or connected to.
    #[error("upstream connect failed")]
    Connect,
    /// The TLS handshake failed: the certificate did not verify, or the peer does not speak TLS.
    #[error("upstream tls handshake failed")]
    Tls,
    /// Connecting or the handshake took longer than `handshake_timeout`.
    #[error("upstream timed out")]
    Timeout,
    /// The upstream broke the protocol, or closed the connection mid-exchange.
    #[error("upstream protocol error")]
    Protocol,
}

impl UpstreamFailure {
    const ALL: [UpstreamFailure; 4] = [
        UpstreamFailure::Connect,
        UpstreamFailure::Tls,
        UpstreamFailure::Timeout,
        UpstreamFailure::Protocol,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamFailure::Connect => "connect",
            UpstreamFailure::Tls => "tls",
            UpstreamFailure::Timeout => "timeout",
            UpstreamFailure::Protocol => "protocol",
        }
    }
}

/// The label a decision is counted under: the action taken, or `audit` for a rejection that
/// `enforcement = "audit"` let through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecisionLabel {
    Allow,
    Upgrade,
    Reject,
    Audit,
}

impl DecisionLabel {
    const ALL: [DecisionLabel; 4] = [
        DecisionLabel::Allow,
        DecisionLabel::Upgrade,
        DecisionLabel::Reject,
        DecisionLabel::Audit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DecisionLabel::Allow => "allow",
            DecisionLabel::Upgrade => "upgrade",
            DecisionLabel::Reject => "reject",
            DecisionLabel::Audit => "audit",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl From<Action> for DecisionLabel {
    fn from(action: Action) -> Self {
        match action {
            Action::Allow => DecisionLabel::Allow,
            Action::Upgrade => DecisionLabel::Upgrade,
            Action::Reject => DecisionLabel::Reject,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    Ok,
    Rejected,
}

impl ReloadOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadOutcome::Ok => "ok",
            ReloadOutcome::Rejected => "rejected",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabels {
    listener: String,
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    listener: String,
    rule: String,
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    listener: String,
    leg: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionLabels {
    listener: String,
    leg: &'static str,
    version: &'static str,
    group: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    listener: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    listener: String,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    listener: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    listener: String,
    cert: String,
}

/// The process-wide registry and its metric families.
pub struct Metrics {
    registry: Registry,
    connections: Family<TransportLabels, Counter>,
    active: Family<ListenerLabels, Gauge>,
    decisions: Family<DecisionLabels, Counter>,
    handshakes: Family<HandshakeLabels, Counter>,
    sessions: Family<SessionLabels, Counter>,
    upstream_errors: Family<ReasonLabels, Counter>,
    responses: Family<ClassLabels, Counter>,
    bytes: Family<DirectionLabels, Counter>,
    overload: Family<ListenerLabels, Counter>,
    reloads: Family<OutcomeLabels, Counter>,
    cert_expiry: Family<CertLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let metrics = Metrics {
            connections: Family::default(),
            active: Family::default(),
            decisions: Family::default(),
            handshakes: Family::default(),
            sessions: Family::default(),
            upstream_errors: Family::default(),
            responses: Family::default(),
            bytes: Family::default(),
            overload: Family::default(),
            reloads: Family::default(),
            cert_expiry: Family::default(),
            registry: Registry::default(),
        };
        // prometheus-client appends `_total` to counters.
        registry.register(
            "ciphergate_connections",
            "Connections accepted, by transport detected on the first bytes",
            metrics.connections.clone(),
        );
        registry.register(
            "ciphergate_connections_active",
            "Connections currently open",
            metrics.active.clone(),
        );
        registry.register(
            "ciphergate_decisions",
            "Policy decisions, by the rule that matched (or default) and the action taken",
            metrics.decisions.clone(),
        );
        registry.register(
            "ciphergate_tls_handshakes",
            "TLS handshakes, by leg and outcome",
            metrics.handshakes.clone(),
        );
        registry.register(
            "ciphergate_tls_sessions",
            "Established TLS sessions, by leg, protocol version and key-exchange group",
            metrics.sessions.clone(),
        );
        registry.register(
            "ciphergate_upstream_errors",
            "Failed upstream exchanges, by failure category",
            metrics.upstream_errors.clone(),
        );
        registry.register(
            "ciphergate_http_responses",
            "HTTP responses sent to clients, by status class",
            metrics.responses.clone(),
        );
        registry.register(
            "ciphergate_bytes",
            "Bytes on client connections: in = from clients, out = to clients",
            metrics.bytes.clone(),
        );
        registry.register(
            "ciphergate_overload_rejections",
            "Connections closed at once because the listener was at max_connections",
            metrics.overload.clone(),
        );
        registry.register(
            "ciphergate_config_reloads",
            "Configuration reloads, by outcome",
            metrics.reloads.clone(),
        );
        registry.register(
            "ciphergate_certificate_expiry_timestamp_seconds",
            "notAfter of each served certificate, as a Unix timestamp",
            metrics.cert_expiry.clone(),
        );
        // Both reload outcomes are visible from the start, so an alert on `rejected` works
        // before the first reload.
        for outcome in [ReloadOutcome::Ok, ReloadOutcome::Rejected] {
            let _ = metrics.reloads.get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            });
        }
        Metrics {
            registry,
            ..metrics
        }
    }

    /// Creates (or finds again, after a reload) every series of one listener.
    ///
    /// `rules` are the names of the rules that apply to the listener, in policy order; their
    /// counters are addressed by that index in [`ListenerMetrics::decision`].
    pub fn listener(&self, name: &str, rules: &[&str], cert_count: usize) -> ListenerMetrics {
        let listener = || name.to_owned();
        let transport = |t: Transport| {
            self.connections.get_or_create_owned(&TransportLabels {
                listener: listener(),
                transport: t.as_str(),
            })
        };
        let decisions_for = |rule: &str| -> [Counter; 4] {
            DecisionLabel::ALL.map(|action| {
                self.decisions.get_or_create_owned(&DecisionLabels {
                    listener: listener(),
                    rule: rule.to_owned(),
                    action: action.as_str(),
                })
            })
        };
        let mut decisions = Vec::with_capacity(rules.len() + 1);
        decisions.push(decisions_for("default"));
        decisions.extend(rules.iter().map(|rule| decisions_for(rule)));

        let handshakes = Leg::ALL.map(|leg| {
            HandshakeOutcome::ALL.map(|outcome| {
                self.handshakes.get_or_create_owned(&HandshakeLabels {
                    listener: listener(),
                    leg: leg.as_str(),
                    outcome: outcome.as_str(),
                })
            })
        });
        let sessions = Leg::ALL.map(|leg| {
            TlsVersion::ALL.map(|version| {
                KxGroup::ALL.map(|group| {
                    self.sessions.get_or_create_owned(&SessionLabels {
                        listener: listener(),
                        leg: leg.as_str(),
                        version: version.as_str(),
                        group: group.as_str(),
                    })
                })
            })
        });
        let upstream_errors = UpstreamFailure::ALL.map(|reason| {
            self.upstream_errors.get_or_create_owned(&ReasonLabels {
                listener: listener(),
                reason: reason.as_str(),
            })
        });
        let responses = ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|class| {
            self.responses.get_or_create_owned(&ClassLabels {
                listener: listener(),
                class,
            })
        });
        let bytes = ["in", "out"].map(|direction| {
            self.bytes.get_or_create_owned(&DirectionLabels {
                listener: listener(),
                direction,
            })
        });
        let cert_expiry = (0..cert_count)
            .map(|index| {
                self.cert_expiry.get_or_create_owned(&CertLabels {
                    listener: listener(),
                    cert: index.to_string(),
                })
            })
            .collect();

        ListenerMetrics(Arc::new(Series {
            connections: [transport(Transport::Tls), transport(Transport::Plaintext)],
            active: self.active.get_or_create_owned(&ListenerLabels {
                listener: listener(),
            }),
            decisions,
            handshakes,
            sessions,
            upstream_errors,
            responses,
            bytes_in: bytes[0].clone(),
            bytes_out: bytes[1].clone(),
            overload: self.overload.get_or_create_owned(&ListenerLabels {
                listener: listener(),
            }),
            cert_expiry,
        }))
    }

    pub fn reload(&self, outcome: ReloadOutcome) {
        self.reloads
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// The whole registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// The whole registry in the Prometheus text format 0.0.4: as OpenMetrics, but counter
    /// families are named with their `_total` suffix in `# HELP`/`# TYPE`, and no `# EOF`.
    pub fn encode_prometheus(&self) -> String {
        let open_metrics = self.encode();
        let counters: Vec<&str> = open_metrics
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
            .collect();
        let mut out = String::with_capacity(open_metrics.len() + 256);
        for line in open_metrics.lines() {
            if line == "# EOF" {
                continue;
            }
            let meta = line
                .strip_prefix("# HELP ")
                .map(|rest| ("# HELP ", rest))
                .or_else(|| line.strip_prefix("# TYPE ").map(|rest| ("# TYPE ", rest)));
            match meta {
                Some((kind, rest)) => {
                    let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                    let suffix = if counters.contains(&name) {
                        "_total"
                    } else {
                        ""
                    };
                    let _ = writeln!(out, "{kind}{name}{suffix} {tail}");
                }
                None => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out
    }
}

/// Handles to every series of one listener; cloning one is one reference count.
#[derive(Clone)]
pub struct ListenerMetrics(Arc<Series>);

/// The series of one listener.
struct Series {
    /// Indexed by [`Transport`] (`tls`, `plaintext`).
    connections: [Counter; 2],
    active: Gauge,
    /// Index 0 is `default`; index `i + 1` is the listener's `i`-th rule.
    decisions: Vec<[Counter; 4]>,
    handshakes: [[Counter; 3]; 2],
    sessions: [[[Counter; 5]; 2]; 2],
    upstream_errors: [Counter; 4],
    responses: [Counter; 5],
    bytes_in: Counter,
    bytes_out: Counter,
    overload: Counter,
    cert_expiry: Vec<Gauge>,
}

impl ListenerMetrics {
    pub fn connection(&self, transport: Transport) {
        self.0.connections[transport as usize].inc();
    }

    /// Counts an open connection until the returned guard is dropped.
    pub fn active_guard(&self) -> ActiveGuard {
        self.0.active.inc();
        ActiveGuard(self.0.active.clone())
    }

    /// `rule` is the index of the listener's rule that matched, or `None` for the default.
    pub fn decision(&self, rule: Option<usize>, label: DecisionLabel) {
        let row = rule.map_or(0, |index| index + 1);
        if let Some(counters) = self.0.decisions.get(row) {
            counters[label.index()].inc();
        }
    }

    pub fn handshake(&self, leg: Leg, outcome: HandshakeOutcome) {
        self.0.handshakes[leg as usize][outcome as usize].inc();
    }

    pub fn session(&self, leg: Leg, version: TlsVersion, group: KxGroup) {
        self.0.sessions[leg as usize][version as usize][group as usize].inc();
    }

    pub fn upstream_error(&self, failure: UpstreamFailure) {
        self.0.upstream_errors[failure as usize].inc();
    }

    /// Counts a response sent to a client by its status class.
    pub fn response(&self, status: http::StatusCode) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.0.responses[class].inc();
    }

    /// The counters a client connection's byte meter adds to.
    pub fn byte_counters(&self) -> (Counter, Counter) {
        (self.0.bytes_in.clone(), self.0.bytes_out.clone())
    }

    pub fn overload(&self) {
        self.0.overload.inc();
    }

    pub fn set_cert_expiry(&self, index: usize, not_after_unix: i64) {
        if let Some(gauge) = self.0.cert_expiry.get(index) {
            gauge.set(not_after_unix);
        }
    }

    /// A one-line summary of this listener's counters, for the periodic log snapshot.
    pub fn snapshot(&self) -> String {
        let sum = |counters: &[Counter]| counters.iter().map(Counter::get).sum::<u64>();
        let mut decisions = [0u64; 4];
        for row in &self.0.decisions {
            for (total, counter) in decisions.iter_mut().zip(row) {
                *total += counter.get();
            }
        }
        let failed_handshakes: u64 = self
            .0
            .handshakes
            .iter()
            .map(|leg| leg[1].get() + leg[2].get())
            .sum();
        let mut out = String::with_capacity(256);
        let _ = write!(
            out,
            "connections_tls={} connections_plaintext={} active={} allow={} upgrade={} \
             reject={} audit={} handshakes_failed={} upstream_errors={} responses={} \
             bytes_in={} bytes_out={} overload={}",
            self.0.connections[0].get(),
            self.0.connections[1].get(),
            self.0.active.get(),
            decisions[0],
            decisions[1],
            decisions[2],
            decisions[3],
            failed_handshakes,
            sum(&self.0.upstream_errors),
            sum(&self.0.responses),
            self.0.bytes_in.get(),
            self.0.bytes_out.get(),
            self.0.overload.get(),
        );
        out
    }
}

/// Decrements `ciphergate_connections_active` when a connection ends, however it ends.
pub struct ActiveGuard(Gauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A counter shared between a byte meter and the registry.
pub type SharedCounter = Counter<u64, AtomicU64>;

/// The registry shared by the whole process.
pub type SharedMetrics = Arc<Metrics>;
