//! The `ciphergate` command line. Exit codes: 0 success, 2 usage or config error, 1 runtime
//! failure.

#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use ciphergate::config::{self, Config};
use ciphergate::policy::{self, Action, Decision, Facts, Mode, Transport};

const DEFAULT_CONFIG: &str = "config/ciphergate.toml";

/// mimalloc rather than glibc's malloc: a proxy that has served a while has glibc's free lists
/// fragmented by many sizes, and its allocations slow down (`_int_malloc` twice its share in a
/// profile of handshakes after a minute of keep-alive traffic). Built without transparent huge
/// pages, so a sidecar's memory stays what its connections need (RSS 11 MB at start, as with
/// glibc; 22 MB with them).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A sidecar proxy that makes encryption the default for every connection.
#[derive(Parser)]
#[command(name = "ciphergate", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run(ConfigArg),
    /// Validate the config and policy; exit 0, or 2 with every error on stderr.
    Check(ConfigArg),
    /// Print which rule a connection or request would match, and the action, without running.
    Explain(ExplainArgs),
    /// Development certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// The nftables rules of `[capture]`, which send every TCP connection of the pod through
    /// ciphergate (Linux; in the current network namespace; only the table `inet ciphergate`).
    #[command(subcommand)]
    Capture(CaptureCommand),
    /// A self-contained demonstration on loopback; exits 0 when every step behaved.
    Demo,
}

#[derive(Args)]
struct ConfigArg {
    /// Config file (TOML, or YAML/JSON by extension). Default: $CIPHERGATE_CONFIG, then
    /// config/ciphergate.toml.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl ConfigArg {
    fn path(&self) -> PathBuf {
        self.config
            .clone()
            .or_else(|| std::env::var_os("CIPHERGATE_CONFIG").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
    }
}

#[derive(Args)]
struct ExplainArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The listener the traffic arrives on.
    #[arg(long, value_name = "NAME")]
    listener: String,
    /// The traffic is plaintext (the default on originate listeners, where the local app
    /// speaks plaintext).
    #[arg(long, conflicts_with = "tls")]
    plaintext: bool,
    /// The traffic is TLS (the default on terminate listeners).
    #[arg(long)]
    tls: bool,
    /// The client's address.
    #[arg(long, value_name = "IP")]
    source: Option<IpAddr>,
    /// SNI for TLS, the Host name for plaintext http, the destination host on originate
    /// (default there: the listener's upstream host).
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
    /// The request path (http listeners).
    #[arg(long, value_name = "P")]
    path: Option<String>,
    /// The resolved upstream address (originate listeners) or the original destination
    /// (transparent listeners), with or without a port: `203.0.113.7:6379`, `[2001:db8::7]:443`.
    #[arg(long, value_name = "IP[:PORT]", value_parser = parse_destination)]
    destination: Option<(IpAddr, Option<u16>)>,
    /// The client presented a certificate that verified.
    #[arg(long)]
    client_verified: bool,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Make a development CA, a server certificate and a client certificate.
    Init {
        /// Where to write ca.crt/.key, server.crt/.key and client.crt/.key.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// A DNS name or IP address for the server certificate (repeatable).
        /// Default: localhost, 127.0.0.1, ::1.
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
        /// Validity of the server and client certificates, in days (Mozilla's "modern"
        /// profile wants under 90).
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum CaptureCommand {
    /// Put the rules in place, replacing any earlier version in one transaction (idempotent).
    /// Needs CAP_NET_ADMIN and the nft tool: run it in an init container.
    Install(ConfigArg),
    /// Delete the table `inet ciphergate`; succeeds when it is not there. Reads no config
    /// (`-c` is accepted and ignored), so it works when the config is gone or broken.
    Remove(ConfigArg),
    /// Write the rules `install` applies to stdout, as an `nft -f` script (for your own
    /// tooling: `ciphergate capture print | nft -f -`). Needs no privilege and no nft.
    Print(ConfigArg),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every config is built with this provider explicitly; installing it as the process default
    // too means no dependency can ever pick another one.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match cli.command {
        Command::Run(arg) => run(&arg),
        Command::Check(arg) => check(&arg),
        Command::Explain(args) => explain(&args),
        Command::Certs(CertsCommand::Init {
            dir,
            names,
            days,
            force,
        }) => certs_init(dir, names, days, force),
        Command::Capture(command) => capture(&command),
        Command::Demo => demo(),
    }
}

/// Loads a config, printing every error to stderr.
fn load(arg: &ConfigArg) -> Result<Config, ExitCode> {
    config::load(&arg.path()).map_err(|errors| {
        for issue in &errors.0 {
            eprintln!("error: {issue}");
        }
        eprintln!(
            "{}: {} error{}",
            arg.path().display(),
            errors.0.len(),
            if errors.0.len() == 1 { "" } else { "s" }
        );
        ExitCode::from(2)
    })
}

fn check(arg: &ConfigArg) -> ExitCode {
    let config = match load(arg) {
        Ok(config) => config,
        Err(code) => return code,
    };
    for warning in &config.warnings {
        eprintln!("warning: {warning}");
    }
    let rules: usize = config.listeners.iter().map(|l| l.policy.rules.len()).sum();
    println!(
        "{}: ok ({} listener{}, {} rule application{})",
        config.path.display(),
        config.listeners.len(),
        if config.listeners.len() == 1 { "" } else { "s" },
        rules,
        if rules == 1 { "" } else { "s" },
    );
    ExitCode::SUCCESS
}

fn explain(args: &ExplainArgs) -> ExitCode {
    let config = match load(&args.config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let Some(listener) = config.listeners.iter().find(|l| l.name == args.listener) else {
        let names: Vec<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
        eprintln!(
            "error: no listener is named `{}` (listeners: {})",
            args.listener,
            names.join(", ")
        );
        return ExitCode::from(2);
    };
    let transport = match (args.plaintext, args.tls, listener.mode) {
        (true, _, _) => Transport::Plaintext,
        (_, true, _) => Transport::Tls,
        (_, _, Mode::Originate | Mode::Transparent) => Transport::Plaintext,
        (_, _, Mode::Terminate) => Transport::Tls,
    };
    let server_name = args
        .server_name
        .as_deref()
        .and_then(policy::host_name)
        .map(|n| n.into_owned())
        .or_else(|| match listener.mode {
            Mode::Originate => listener.upstream.as_ref().map(|u| u.host.clone()),
            Mode::Terminate | Mode::Transparent => None,
        });
    let path = args.path.as_deref().and_then(policy::normalize_path);
    let facts = Facts {
        transport,
        source: args.source,
        server_name: server_name.as_deref(),
        path: path.as_deref(),
        // A fixed upstream given as an IP literal is the destination, without any lookup.
        destination: args
            .destination
            .map(|(ip, _)| ip)
            .or_else(|| match listener.mode {
                Mode::Originate => listener.upstream.as_ref().and_then(|u| u.ip()),
                Mode::Terminate | Mode::Transparent => None,
            }),
        destination_port: args.destination.and_then(|(_, port)| port).or_else(|| {
            match listener.mode {
                Mode::Originate => listener.upstream.as_ref().map(|u| u.port),
                Mode::Terminate | Mode::Transparent => None,
            }
        }),
        client_verified: args.client_verified,
    };
    let decision = policy::decide(&listener.policy, &facts);
    match listener.mode {
        // The protocol is told per connection, from its first bytes.
        Mode::Transparent => println!("listener: {} (transparent)", listener.name),
        mode => println!(
            "listener: {} ({}, {})",
            listener.name,
            mode.as_str(),
            listener.protocol.as_str()
        ),
    }
    println!("transport: {}", transport.as_str());
    println!("rule: {}", decision.rule_name(&listener.policy));
    println!("action: {}", decision.label().as_str());
    println!("effect: {}", effect(listener, transport, &decision));
    ExitCode::SUCCESS
}

/// What the decision table says happens.
fn effect(listener: &config::ListenerConfig, transport: Transport, decision: &Decision) -> String {
    use config::Protocol::{Http, Tcp};
    let (action, audited) = (decision.action, decision.audited);
    let rule = decision.rule.map(|i| &listener.policy.rules[i]);
    // A transparent listener's plaintext exception that needs HTTP to match (a Host or a
    // path) cannot apply to other plaintext, which is then closed.
    let needs_http = rule.is_some_and(|r| !r.server_name.is_empty() || !r.path_prefix.is_empty());
    let floor = match listener.settings.min_tls_version {
        ciphergate::tls::MinTlsVersion::Tls12 => "1.2",
        ciphergate::tls::MinTlsVersion::Tls13 => "1.3",
    };
    let audit = if audited {
        " (audit mode: this would be rejected under enforce)"
    } else {
        ""
    };
    let text = match (listener.mode, listener.protocol, action, transport) {
        (Mode::Terminate, Http, Action::Reject, Transport::Plaintext) => {
            "426 Upgrade Required, Connection: close".into()
        }
        (Mode::Terminate, Http, Action::Reject, Transport::Tls) => "403 Forbidden".into(),
        (Mode::Terminate, Http, Action::Upgrade, _) => format!(
            "308 Permanent Redirect to https://{{host}}{}{{path}}",
            match listener.redirect_port.unwrap_or(listener.bind.port()) {
                443 => String::new(),
                port => format!(":{port}"),
            }
        ),
        (Mode::Terminate, Tcp, Action::Reject, _) => {
            "connection closed without forwarding a byte".into()
        }
        (Mode::Terminate, _, _, _) if listener.upstream_uses_tls() => {
            "forwarded; the upstream leg is re-originated TLS".into()
        }
        (Mode::Terminate, _, _, Transport::Plaintext) => {
            "forwarded as is to the loopback upstream (a counted plaintext exception)".into()
        }
        (Mode::Terminate, _, _, Transport::Tls) => "forwarded to the loopback upstream".into(),
        (Mode::Originate, Http, Action::Reject, _) => "403 Forbidden naming the rule".into(),
        (Mode::Originate, Tcp, Action::Reject, _) => "connection closed".into(),
        (Mode::Originate, _, Action::Upgrade, _) => "sent on with verified TLS".into(),
        // Audit never opens a plaintext leg: an audited rejection goes on over TLS.
        (Mode::Originate, _, Action::Allow, Transport::Plaintext) if audited => {
            "sent on with verified TLS".into()
        }
        (Mode::Originate, _, Action::Allow, Transport::Plaintext) => {
            "sent on in plaintext (a narrowed, counted exception)".into()
        }
        (Mode::Originate, _, Action::Allow, Transport::Tls) => "relayed as is (already TLS)".into(),
        (Mode::Transparent, _, Action::Reject, Transport::Tls) => {
            "connection closed before a byte reaches the destination".into()
        }
        (Mode::Transparent, _, _, Transport::Tls) => format!(
            "the app's own TLS relayed untouched to the original destination (never decrypted); \
             a hello that offers nothing at or above TLS {floor}, or a server that chooses less, \
             is closed"
        ),
        (Mode::Transparent, _, Action::Reject, Transport::Plaintext) => {
            "HTTP/1.x: 403 Forbidden naming the rule; other plaintext: connection closed, 0 bytes \
             reach the destination"
                .into()
        }
        (Mode::Transparent, _, Action::Allow, Transport::Plaintext) if !audited && needs_http => {
            "HTTP/1.x requests it matches: forwarded as is to the original destination (a \
             narrowed, counted plaintext exception; a server_name must resolve to the address the \
             app dialled); other plaintext: connection closed, 0 bytes reach the destination"
                .into()
        }
        (Mode::Transparent, _, Action::Allow, Transport::Plaintext) if !audited => {
            "forwarded as is to the original destination, at once, before any byte (a narrowed, \
             counted plaintext exception)"
                .into()
        }
        (Mode::Transparent, _, _, Transport::Plaintext) => {
            "HTTP/1.x: each request sent over verified TLS to its Host at the original destination \
             address (port 80 becomes 443); other plaintext: connection closed, 0 bytes reach the \
             destination"
                .into()
        }
    };
    format!("{text}{audit}")
}

/// `IP`, `IP:PORT` or `[IPv6]:PORT`.
fn parse_destination(text: &str) -> Result<(IpAddr, Option<u16>), String> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok((ip, None));
    }
    match text.parse::<std::net::SocketAddr>() {
        Ok(addr) => Ok((addr.ip(), Some(addr.port()))),
        Err(_) => Err(format!(
            "`{text}` is not IP or IP:PORT (such as 203.0.113.7:6379 or [2001:db8::7]:443)"
        )),
    }
}

fn capture(command: &CaptureCommand) -> ExitCode {
    use ciphergate::capture;
    let arg = match command {
        // Removing needs nothing from the config: it works when the config is gone or broken.
        CaptureCommand::Remove(_) => {
            return capture_outcome(capture::remove(), "removed (if it was there)");
        }
        CaptureCommand::Install(arg) | CaptureCommand::Print(arg) => arg,
    };
    let config = match load(arg) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let Some(rules) = config.capture else {
        eprintln!(
            "error: {}: capture: missing: there is no [capture] table, so there are no rules to \
             install or print",
            config.path.display()
        );
        return ExitCode::from(2);
    };
    if let CaptureCommand::Print(_) = command {
        print!("{}", capture::ruleset(&rules));
        return ExitCode::SUCCESS;
    }
    capture_outcome(capture::install(&rules), "installed")
}

fn capture_outcome(result: Result<(), ciphergate::capture::CaptureError>, done: &str) -> ExitCode {
    match result {
        Ok(()) => {
            println!("nftables table {}: {done}", ciphergate::capture::TABLE);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(arg: &ConfigArg) -> ExitCode {
    let config = match load(arg) {
        Ok(config) => config,
        Err(code) => return code,
    };
    ciphergate::logging::init(&config.log.level, config.log.format);
    // Connections run on their own per-core runtimes (`workers`); this one accepts, serves
    // the admin endpoint and applies reloads. Two threads, so reading files for a reload (or a
    // slow mounted volume) never holds up accepting and `/healthz`.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ciphergate-main")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(ciphergate::app::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "ciphergate stopped");
            ExitCode::from(1)
        }
    }
}

fn certs_init(dir: PathBuf, names: Vec<String>, days: u32, force: bool) -> ExitCode {
    let names = if names.is_empty() {
        ciphergate::certs::default_names()
    } else {
        names
    };
    if let Some(bad) = names
        .iter()
        .find(|n| n.parse::<std::net::IpAddr>().is_err() && policy::NamePattern::parse(n).is_err())
    {
        eprintln!(
            "error: --name `{bad}` is not a DNS name, a `*.suffix` wildcard or an IP address"
        );
        return ExitCode::from(2);
    }
    match ciphergate::certs::init(&dir, &names, days, force) {
        Ok(files) => {
            for file in files {
                println!("wrote {}", file.display());
            }
            println!("server certificate names: {}", names.join(", "));
            ExitCode::SUCCESS
        }
        Err(e @ ciphergate::certs::CertsError::Exists(_)) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn demo() -> ExitCode {
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")
        .and_then(|rt| {
            rt.block_on(ciphergate::demo::run())
                .map_err(anyhow::Error::from)
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
