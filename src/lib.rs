//! ciphergate: a sidecar proxy that makes encryption the default for every connection into and
//! out of the application beside it.
//!
//! # How one connection flows
//!
//! 1. [`listener`] accepts it (or closes it at once when the listener is at `max_connections`),
//!    takes a snapshot of the listener's live state, so a reload never changes a connection
//!    midway, and hands it to the next of the per-core [`workers`], where it stays until it
//!    closes, with the upstream connections it uses ([`pool`]).
//! 2. [`detect`] peeks at the first byte: a TLS handshake record, or plaintext.
//! 3. TLS on a terminate listener: [`tls::server`] picks a certificate by SNI (client
//!    certificates verified when configured) and [`tls::stream`] runs the handshake, all under
//!    `handshake_timeout`, then carries the traffic, holding no buffer while the connection is
//!    quiet.
//! 4. The [`policy`] engine decides, from the listener's ordered rules: per request on http
//!    listeners ([`http`]), per connection on tcp listeners ([`relay`]). Allow forwards, upgrade
//!    redirects to https (terminate) or re-originates TLS (originate), reject refuses.
//! 5. [`upstream`] connects the other leg: plaintext only to a loopback upstream beside a
//!    terminate listener or by a narrowed originate exception, verified TLS
//!    ([`tls::client`]) everywhere else.
//! 6. [`metrics`] counts every step under config names and fixed enumerations; nothing about
//!    the peer is kept, logged ([`logging`]) or exported ([`admin`]).
//!
//! [`config`] turns files into a validated [`config::Config`], reporting every error with its
//! key path; [`app`] binds everything, reloads on SIGHUP and drains on SIGTERM. [`capture`]
//! builds, from `[capture]`, the nftables rules that send every TCP connection of the pod to
//! those listeners (`ciphergate capture install|remove|print`, run once before the proxy).

// `unsafe` is allowed in two places only: the socket option in [`sys`], and registering a
// listening socket with the reactor in [`socket`].
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod capture;
pub mod certs;
pub mod config;
pub mod conn;
pub mod demo;
pub mod detect;
pub mod forward;
pub mod http;
pub mod io;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod pool;
pub mod relay;
pub mod socket;
pub mod sys;
pub mod tls;
pub mod transparent;
pub mod upstream;
pub mod workers;

use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Boxes `future` in a plain fn, so the async fn that awaits it keeps no room for it. An async
/// fn is as large as its largest state, temporaries included; a connection's later stages and a
/// request's rarely taken paths are boxed where they start, so a quiet connection does not hold
/// the handshake's state, and every request's future (which hyper copies as it builds and hands
/// it over, whole for an HTTP/2 stream) stays small.
pub(crate) fn boxed<'a, T>(future: impl Future<Output = T> + Send + 'a) -> BoxFuture<'a, T> {
    Box::pin(future)
}
