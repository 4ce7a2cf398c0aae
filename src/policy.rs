//! The policy engine: ordered rules, first match wins, defaults by listener mode.
//!
//! Everything here is pure: [`decide`] takes a listener's compiled rules and the [`Facts`] of a
//! connection or request and returns a [`Decision`]. The proxy and `ciphergate explain` call the
//! very same function, so what `explain` prints is what traffic gets.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use serde::Deserialize;

/// What arrived on the socket: a TLS ClientHello, or anything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tls = 0,
    Plaintext = 1,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tls => "tls",
            Transport::Plaintext => "plaintext",
        }
    }
}

/// What a rule does with the traffic it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Forward as is. For plaintext this is an exception, and only a narrowed rule may say it.
    Allow,
    /// Make plaintext encrypted: redirect to https (terminate) or re-originate TLS (originate).
    Upgrade,
    /// Refuse: 426/403 on http, a closed connection on tcp.
    Reject,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Upgrade => "upgrade",
            Action::Reject => "reject",
        }
    }
}

/// Which way a listener faces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Clients speak TLS to ciphergate, which forwards to the app beside it (or re-originates).
    Terminate,
    /// The local app speaks plaintext to ciphergate, which sends it on with TLS.
    Originate,
    /// The app's connections, redirected here by `[capture]`, each to its original
    /// destination: the app's own TLS relayed untouched, plaintext HTTP upgraded to TLS, other
    /// plaintext refused.
    Transparent,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Terminate => "terminate",
            Mode::Originate => "originate",
            Mode::Transparent => "transparent",
        }
    }

    /// Whether traffic here comes from the local app and leaves the host: originate and
    /// transparent listeners.
    pub fn is_outbound(self) -> bool {
        matches!(self, Mode::Originate | Mode::Transparent)
    }
}

/// `enforce` applies rejections; `audit` lets them through and counts them as `audit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Enforcement {
    Enforce,
    Audit,
}

/// A `server_name` pattern: an exact name, or `*.suffix` matching exactly one more label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamePattern {
    Exact(Box<str>),
    /// Holds the suffix with its leading dot: `*.example.com` is stored as `.example.com`.
    Wildcard(Box<str>),
}

impl NamePattern {
    /// Parses a pattern, lowercased. Returns a reason when it is not a valid DNS name pattern.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let lower = pattern.trim_end_matches('.').to_ascii_lowercase();
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        if !is_dns_name(name) {
            return Err(format!(
                "`{pattern}` is not a DNS name or a `*.suffix` wildcard"
            ));
        }
        if wildcard && !name.contains('.') {
            return Err(format!(
                "`{pattern}` is too broad: a wildcard needs a suffix of at least two labels"
            ));
        }
        Ok(if wildcard {
            NamePattern::Wildcard(format!(".{name}").into())
        } else {
            NamePattern::Exact(name.into())
        })
    }

    /// `name` must already be lowercase, without a trailing dot.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Exact(exact) => **exact == *name,
            NamePattern::Wildcard(suffix) => name
                .strip_suffix(&**suffix)
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        }
    }
}

/// Whether `name` is a syntactically valid DNS host name (letters, digits, hyphens, underscores).
pub fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// One compiled rule. Every condition that is set must hold for the rule to match.
#[derive(Clone, Debug)]
pub struct Rule {
    pub name: Arc<str>,
    pub transport: Option<Transport>,
    pub source: Vec<IpNet>,
    pub server_name: Vec<NamePattern>,
    pub destination: Vec<IpNet>,
    /// Original destination ports (transparent listeners) or the upstream's port.
    pub destination_port: Vec<u16>,
    /// Normalised, without a trailing slash (except the root itself).
    pub path_prefix: Vec<String>,
    pub client_verified: Option<bool>,
    pub action: Action,
}

impl Rule {
    fn matches(&self, facts: &Facts<'_>) -> bool {
        // `upgrade` means "make plaintext encrypted"; TLS is encrypted already, so an upgrade
        // rule never decides TLS traffic.
        if self.action == Action::Upgrade && facts.transport == Transport::Tls {
            return false;
        }
        if self.transport.is_some_and(|t| t != facts.transport) {
            return false;
        }
        // An IPv4 client on a dual-stack socket arrives as `::ffff:a.b.c.d`; rules are
        // written for `a.b.c.d`.
        if !self.source.is_empty()
            && !facts
                .source
                .map(|ip| ip.to_canonical())
                .is_some_and(|ip| self.source.iter().any(|net| net.contains(&ip)))
        {
            return false;
        }
        if !self.destination.is_empty()
            && !facts
                .destination
                .map(|ip| ip.to_canonical())
                .is_some_and(|ip| self.destination.iter().any(|net| net.contains(&ip)))
        {
            return false;
        }
        if !self.destination_port.is_empty()
            && !facts
                .destination_port
                .is_some_and(|port| self.destination_port.contains(&port))
        {
            return false;
        }
        if !self.server_name.is_empty()
            && !facts
                .server_name
                .is_some_and(|name| self.server_name.iter().any(|p| p.matches(name)))
        {
            return false;
        }
        if !self.path_prefix.is_empty()
            && !facts.path.is_some_and(|path| {
                self.path_prefix
                    .iter()
                    .any(|prefix| path_has_prefix(path, prefix))
            })
        {
            return false;
        }
        if self
            .client_verified
            .is_some_and(|want| want != facts.client_verified)
        {
            return false;
        }
        true
    }
}

/// The rules that apply to one listener, in config order, and what to do when none matches.
#[derive(Clone, Debug)]
pub struct ListenerPolicy {
    pub mode: Mode,
    pub enforcement: Enforcement,
    pub rules: Vec<Rule>,
}

impl ListenerPolicy {
    /// Whether any rule tests `client_verified`, which is only known after a handshake.
    pub fn needs_client_verified(&self) -> bool {
        self.rules.iter().any(|r| r.client_verified.is_some())
    }

    /// Whether any rule tests `path_prefix`; then ambiguous paths are refused.
    pub fn needs_path(&self) -> bool {
        self.rules.iter().any(|r| !r.path_prefix.is_empty())
    }

    /// Whether any rule tests the resolved `destination`, which needs a lookup first.
    pub fn needs_destination(&self) -> bool {
        self.rules.iter().any(|r| !r.destination.is_empty())
    }

    /// The names of the rules, in order; the metric label of each.
    pub fn rule_names(&self) -> Vec<&str> {
        self.rules.iter().map(|r| &*r.name).collect()
    }
}

/// What is known about a connection or request when it is decided. Absent facts never match a
/// condition that asks for them.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    pub transport: Transport,
    /// The client's address.
    pub source: Option<IpAddr>,
    /// SNI for TLS, the Host name for plaintext http, the destination host on originate;
    /// lowercase, without port or trailing dot.
    pub server_name: Option<&'a str>,
    /// The normalised request path (http only), see [`normalize_path`].
    pub path: Option<&'a str>,
    /// The resolved upstream address (originate), or the original destination (transparent).
    pub destination: Option<IpAddr>,
    /// The upstream's port (originate), or the original destination's (transparent).
    pub destination_port: Option<u16>,
    /// Whether the client presented a certificate that verified.
    pub client_verified: bool,
}

/// The outcome of [`decide`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Index into the listener's rules, or `None` for the default.
    pub rule: Option<usize>,
    /// What to do. Under `audit`, a rejection arrives here as `Allow`.
    pub action: Action,
    /// Set when `audit` turned a rejection into `Allow`.
    pub audited: bool,
}

impl Decision {
    pub fn rule_name<'p>(&self, policy: &'p ListenerPolicy) -> &'p str {
        self.rule.map_or("default", |i| &policy.rules[i].name)
    }

    /// The action label this decision is counted under.
    pub fn label(&self) -> crate::metrics::DecisionLabel {
        if self.audited {
            crate::metrics::DecisionLabel::Audit
        } else {
            self.action.into()
        }
    }

    /// How the local app's plaintext leaves the host (originate and transparent listeners):
    /// in plaintext only for an explicit, narrowed `allow`. Under `audit` a rejection is let
    /// through over TLS, never in plaintext: audit must not open a plaintext path that
    /// enforcement would not.
    pub fn outbound(&self) -> Outbound {
        match self.action {
            Action::Reject => Outbound::Refuse,
            Action::Allow if self.audited => Outbound::Tls,
            Action::Allow => Outbound::Plaintext,
            Action::Upgrade => Outbound::Tls,
        }
    }
}

/// Which way the local app's plaintext goes, by [`Decision::outbound`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outbound {
    /// Sent on with verified TLS.
    Tls,
    /// Sent on as it is: a counted, narrowed plaintext exception.
    Plaintext,
    /// Refused.
    Refuse,
}

/// First matching rule wins; otherwise TLS is allowed, plaintext is rejected on `terminate`
/// listeners and upgraded (sent on with TLS) on `originate` and `transparent` listeners.
pub fn decide(policy: &ListenerPolicy, facts: &Facts<'_>) -> Decision {
    let (rule, action) = match policy.rules.iter().position(|r| r.matches(facts)) {
        Some(index) => (Some(index), policy.rules[index].action),
        None => (None, default_action(policy.mode, facts.transport)),
    };
    if action == Action::Reject && policy.enforcement == Enforcement::Audit {
        return Decision {
            rule,
            action: Action::Allow,
            audited: true,
        };
    }
    Decision {
        rule,
        action,
        audited: false,
    }
}

/// Decides a connection whose upstream name resolved to `addrs`: the decision for the first
/// address, and every address that gets the same decision (same rule, same action), in order.
/// Connecting only to those keeps a `destination` rule true of where the bytes actually go.
pub fn decide_destinations(
    policy: &ListenerPolicy,
    facts: &Facts<'_>,
    addrs: &[SocketAddr],
) -> (Decision, Vec<SocketAddr>) {
    let decide_for = |addr: &SocketAddr| {
        decide(
            policy,
            &Facts {
                destination: Some(addr.ip()),
                ..*facts
            },
        )
    };
    let Some(first) = addrs.first() else {
        return (decide(policy, facts), Vec::new());
    };
    let decision = decide_for(first);
    let approved = addrs
        .iter()
        .filter(|addr| decide_for(addr) == decision)
        .copied()
        .collect();
    (decision, approved)
}

pub fn default_action(mode: Mode, transport: Transport) -> Action {
    match (mode, transport) {
        (_, Transport::Tls) => Action::Allow,
        (Mode::Terminate, Transport::Plaintext) => Action::Reject,
        (Mode::Originate | Mode::Transparent, Transport::Plaintext) => Action::Upgrade,
    }
}

/// Whether `path` equals `prefix` or continues it with a whole segment.
/// Both must be normalised; `prefix` has no trailing slash unless it is `/`.
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return path.starts_with('/');
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Normalises a request path the way the policy sees it, and the upstream receives it:
/// percent-encoded unreserved characters decoded (RFC 3986 §6.2.2.2), repeated slashes merged,
/// and `.`/`..` segments removed (§5.2.4). Returns `None` for a path that does not start with
/// `/` (such as `*`), which no `path_prefix` matches.
pub fn normalize_path(path: &str) -> Option<Cow<'_, str>> {
    if !path.starts_with('/') {
        return None;
    }
    if !needs_normalizing(path) {
        return Some(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path);
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        trailing_slash = false;
        match segment {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                segments.pop();
                trailing_slash = true;
            }
            other => segments.push(other),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    Some(Cow::Owned(out))
}

fn needs_normalizing(path: &str) -> bool {
    path.contains('%')
        || path.contains("//")
        || path
            .split('/')
            .skip(1)
            .any(|segment| segment == "." || segment == "..")
}

fn decode_unreserved(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    // Work on bytes: only `%XX` escapes of ASCII are replaced by ASCII, every other byte is
    // copied as it came, so the result stays valid UTF-8.
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = (hi * 16 + lo) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.push(c);
                } else {
                    // Reserved or non-ASCII: keep encoded, with uppercase hex (§6.2.2.1).
                    out.push(b'%');
                    out.push(bytes[i + 1].to_ascii_uppercase());
                    out.push(bytes[i + 2].to_ascii_uppercase());
                }
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    Cow::Owned(String::from_utf8(out).expect("ASCII replaced by ASCII keeps UTF-8 valid"))
}

/// Whether servers are known to read `path` differently from RFC 3986: an encoded slash,
/// backslash or NUL (`%2F`, `%5C`, `%00`, `\`), or a `..;`/`.;` segment (Tomcat, Jetty). On a
/// listener whose rules test `path_prefix`, such paths are refused rather than guessed at.
pub fn is_ambiguous_path(path: &str) -> bool {
    if path.contains('\\') {
        return true;
    }
    let lower = |s: &str| s.to_ascii_lowercase();
    if path.contains('%') {
        let l = lower(path);
        if l.contains("%2f") || l.contains("%5c") || l.contains("%00") {
            return true;
        }
    }
    path.split('/')
        .any(|segment| segment.starts_with("..;") || segment.starts_with(".;"))
}

/// The host name of a Host header or URI authority, lowercased, without port, brackets or a
/// trailing dot. `None` when it is not a plausible host.
pub fn host_name(authority: &str) -> Option<Cow<'_, str>> {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        // An IPv6 literal: keep it bracket-less.
        rest.split_once(']')?.0
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            Some(_) => return None,
            None => authority,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, action: Action) -> Rule {
        Rule {
            name: name.into(),
            transport: None,
            source: vec![],
            server_name: vec![],
            destination: vec![],
            destination_port: vec![],
            path_prefix: vec![],
            client_verified: None,
            action,
        }
    }

    fn policy(mode: Mode, rules: Vec<Rule>) -> ListenerPolicy {
        ListenerPolicy {
            mode,
            enforcement: Enforcement::Enforce,
            rules,
        }
    }

    fn facts(transport: Transport) -> Facts<'static> {
        Facts {
            transport,
            source: None,
            server_name: None,
            path: None,
            destination: None,
            destination_port: None,
            client_verified: false,
        }
    }

    #[test]
    fn defaults_follow_the_decision_table() {
        let terminate = policy(Mode::Terminate, vec![]);
        let originate = policy(Mode::Originate, vec![]);
        let tls = facts(Transport::Tls);
        let plain = facts(Transport::Plaintext);
        assert_eq!(decide(&terminate, &tls).action, Action::Allow);
        assert_eq!(decide(&terminate, &plain).action, Action::Reject);
        assert_eq!(decide(&originate, &tls).action, Action::Allow);
        assert_eq!(decide(&originate, &plain).action, Action::Upgrade);
        assert_eq!(decide(&terminate, &plain).rule, None);
    }

    #[test]
    fn first_matching_rule_wins() {
        let mut first = rule("first", Action::Allow);
        first.source = vec!["10.0.0.0/8".parse().unwrap()];
        let mut second = rule("second", Action::Upgrade);
        second.source = vec!["10.1.0.0/16".parse().unwrap()];
        let p = policy(Mode::Terminate, vec![first, second]);
        let mut f = facts(Transport::Plaintext);
        f.source = Some("10.1.2.3".parse().unwrap());
        let d = decide(&p, &f);
        assert_eq!((d.rule, d.action), (Some(0), Action::Allow));
        f.source = Some("192.0.2.1".parse().unwrap());
        assert_eq!(decide(&p, &f).rule, None);
    }

    #[test]
    fn ipv4_mapped_addresses_match_ipv4_rules() {
        let mut r = rule("v4", Action::Reject);
        r.source = vec!["127.0.0.0/8".parse().unwrap()];
        r.destination = vec!["192.0.2.0/24".parse().unwrap()];
        let p = policy(Mode::Originate, vec![r]);
        let mut f = facts(Transport::Tls);
        f.source = Some("::ffff:127.0.0.1".parse().unwrap());
        f.destination = Some("::ffff:192.0.2.7".parse().unwrap());
        assert_eq!(decide(&p, &f).rule, Some(0));
    }

    #[test]
    fn absent_facts_never_match_a_condition() {
        let mut r = rule("by-name", Action::Allow);
        r.server_name = vec![NamePattern::parse("api.example.com").unwrap()];
        let p = policy(Mode::Terminate, vec![r]);
        assert_eq!(decide(&p, &facts(Transport::Plaintext)).rule, None);
    }

    #[test]
    fn upgrade_rules_never_decide_tls() {
        let p = policy(Mode::Terminate, vec![rule("up", Action::Upgrade)]);
        assert_eq!(decide(&p, &facts(Transport::Tls)).rule, None);
        assert_eq!(decide(&p, &facts(Transport::Plaintext)).rule, Some(0));
    }

    #[test]
    fn audit_turns_rejections_into_counted_allows() {
        let mut p = policy(Mode::Terminate, vec![]);
        p.enforcement = Enforcement::Audit;
        let d = decide(&p, &facts(Transport::Plaintext));
        assert_eq!(d.action, Action::Allow);
        assert!(d.audited);
        assert_eq!(d.label().as_str(), "audit");
        let d = decide(&p, &facts(Transport::Tls));
        assert!(!d.audited);
    }

    #[test]
    fn client_verified_condition() {
        let mut r = rule("need-cert", Action::Reject);
        r.client_verified = Some(false);
        let p = policy(Mode::Terminate, vec![r]);
        let mut f = facts(Transport::Tls);
        assert_eq!(decide(&p, &f).action, Action::Reject);
        f.client_verified = true;
        assert_eq!(decide(&p, &f).action, Action::Allow);
        assert!(p.needs_client_verified());
    }

    #[test]
    fn name_patterns() {
        let exact = NamePattern::parse("API.Example.com").unwrap();
        assert!(exact.matches("api.example.com"));
        assert!(!exact.matches("x.api.example.com"));
        let wild = NamePattern::parse("*.example.com").unwrap();
        assert!(wild.matches("a.example.com"));
        assert!(!wild.matches("example.com"));
        assert!(!wild.matches("a.b.example.com"));
        assert!(!wild.matches("aexample.com"));
        assert!(NamePattern::parse("*.com").is_err());
        assert!(NamePattern::parse("*").is_err());
        assert!(NamePattern::parse("a..b").is_err());
        assert!(NamePattern::parse("exa mple.com").is_err());
    }

    #[test]
    fn path_prefix_matches_whole_segments() {
        assert!(path_has_prefix("/healthz", "/healthz"));
        assert!(path_has_prefix("/healthz/x", "/healthz"));
        assert!(path_has_prefix("/healthz/", "/healthz"));
        assert!(!path_has_prefix("/healthzz", "/healthz"));
        assert!(!path_has_prefix("/health", "/healthz"));
        assert!(path_has_prefix("/anything", "/"));
    }

    #[test]
    fn paths_are_normalised() {
        let n = |p: &str| normalize_path(p).map(|c| c.into_owned());
        assert_eq!(n("/healthz").as_deref(), Some("/healthz"));
        assert_eq!(n("/healthz/../secret").as_deref(), Some("/secret"));
        assert_eq!(n("/a/./b/../c").as_deref(), Some("/a/c"));
        assert_eq!(n("/../../x").as_deref(), Some("/x"));
        assert_eq!(n("//healthz").as_deref(), Some("/healthz"));
        assert_eq!(n("/healthz/").as_deref(), Some("/healthz/"));
        assert_eq!(n("/a/..").as_deref(), Some("/"));
        assert_eq!(n("/%68ealthz").as_deref(), Some("/healthz"));
        assert_eq!(n("/healthz/%2e%2e/secret").as_deref(), Some("/secret"));
        assert_eq!(n("/a%2fb").as_deref(), Some("/a%2Fb"));
        assert_eq!(n("/a%zz").as_deref(), Some("/a%zz"));
        assert_eq!(n("/a%4").as_deref(), Some("/a%4"));
        assert_eq!(n("*"), None);
        assert_eq!(n("/caf%C3%A9/%2e/é").as_deref(), Some("/caf%C3%A9/é"));
    }

    #[test]
    fn ambiguous_paths() {
        for path in [
            "/a%2Fb",
            "/a%2fb",
            "/a%5Cb",
            "/a\\b",
            "/a%00",
            "/healthz/..;/x",
            "/.;/x",
        ] {
            assert!(is_ambiguous_path(path), "{path}");
        }
        for path in ["/a/b", "/a%20b", "/a;b", "/..a", "/a/.b"] {
            assert!(!is_ambiguous_path(path), "{path}");
        }
    }

    #[test]
    fn host_names_from_authorities() {
        let h = |a: &str| host_name(a).map(|c| c.into_owned());
        assert_eq!(h("Example.COM:8080").as_deref(), Some("example.com"));
        assert_eq!(h("example.com.").as_deref(), Some("example.com"));
        assert_eq!(h("[::1]:443").as_deref(), Some("::1"));
        assert_eq!(h("a:b"), None);
        assert_eq!(h(""), None);
    }

    #[test]
    fn destinations_are_decided_address_by_address() {
        let mut r = rule("internal-plain", Action::Allow);
        r.destination = vec!["10.0.0.0/8".parse().unwrap()];
        let p = policy(Mode::Originate, vec![r]);
        let f = facts(Transport::Plaintext);
        let addrs: Vec<SocketAddr> = ["10.1.1.1:80", "192.0.2.1:80", "10.2.2.2:80"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let (d, approved) = decide_destinations(&p, &f, &addrs);
        assert_eq!((d.rule, d.action), (Some(0), Action::Allow));
        assert_eq!(approved, [addrs[0], addrs[2]]);
        // A name whose first address is outside: upgraded, and only to the outside address.
        let (d, approved) = decide_destinations(&p, &f, &addrs[1..]);
        assert_eq!((d.rule, d.action), (None, Action::Upgrade));
        assert_eq!(approved, [addrs[1]]);
    }

    #[test]
    fn path_rules_decide_per_request() {
        let mut r = rule("health", Action::Allow);
        r.path_prefix = vec!["/healthz".into()];
        r.source = vec!["127.0.0.0/8".parse().unwrap()];
        let p = policy(Mode::Terminate, vec![r]);
        let mut f = facts(Transport::Plaintext);
        f.source = Some("127.0.0.1".parse().unwrap());
        for (path, allowed) in [
            ("/healthz", true),
            ("/healthz/x", true),
            ("/healthzz", false),
            ("/healthz/../secret", false),
        ] {
            let normal = normalize_path(path).unwrap();
            let d = decide(
                &p,
                &Facts {
                    path: Some(&normal),
                    ..f
                },
            );
            assert_eq!(d.action == Action::Allow, allowed, "{path}");
        }
    }
}
