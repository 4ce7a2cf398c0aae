//! Bytes between a client and an upstream (tcp listeners), until either side closes or the
//! connection goes idle.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::io::IdleClock;

/// Copies both ways, passing half-closes on, and gives up after `idle` without traffic.
/// The client stream is the metered one, so it is what the idle clock sees.
pub async fn relay<C, U>(mut client: C, mut upstream: U, clock: &IdleClock, idle: Duration)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
        _ = clock.expired(idle) => {}
    }
}
