//! Logging: tracing-subscriber on stderr, JSON by default.
//!
//! Only ciphergate's own events are ever written. Dependencies' events (hyper, h2, rustls…) are
//! dropped by target before formatting, whatever `RUST_LOG` says, because their debug and trace
//! output carries addresses, names and headers. No `log`-crate bridge is installed either.
//! Panics are reported without their message, which could hold traffic-derived text.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Installs the global subscriber. `level` comes from config; `RUST_LOG`, when set, overrides it.
pub fn init(level: &str, format: LogFormat) {
    let filter = match std::env::var("RUST_LOG") {
        // A RUST_LOG that does not parse falls back to the config's level rather than
        // silencing everything.
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(&directives)
            .unwrap_or_else(|_| {
                eprintln!("ignoring RUST_LOG: not a valid filter; using log.level = {level}");
                EnvFilter::new(level)
            }),
        _ => EnvFilter::new(level),
    };
    let ours = filter_fn(|meta| is_ours(meta.target()));
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let layer = match format {
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_filter(ours)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => layer
            .with_ansi(false)
            .with_filter(ours)
            .with_filter(filter)
            .boxed(),
    };
    let _ = tracing_subscriber::registry().with(layer).try_init();

    std::panic::set_hook(Box::new(|info| {
        let (file, line) = info
            .location()
            .map_or(("unknown", 0), |l| (l.file(), l.line()));
        tracing::error!(file, line, "internal error: a task panicked");
    }));
}

/// Whether an event's target is one of ciphergate's modules.
pub fn is_ours(target: &str) -> bool {
    target == "ciphergate" || target.starts_with("ciphergate::")
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_our_targets() {
        assert!(super::is_ours("ciphergate::app"));
        assert!(super::is_ours("ciphergate"));
        assert!(!super::is_ours("ciphergate_evil"));
        assert!(!super::is_ours("h2::codec"));
        assert!(!super::is_ours("rustls::server"));
    }
}
