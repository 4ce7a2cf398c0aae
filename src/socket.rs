//! A listener's socket: bound with the options its connections inherit, and accepting sockets
//! that no reactor has seen yet.
//!
//! tokio's `TcpListener::accept` registers every new socket with the accepting thread's
//! reactor, and handing it to a worker deregisters it again: two `epoll_ctl` calls per
//! connection that serve nothing. Here `accept` returns the plain socket, and the worker that
//! serves it registers it once. `TCP_NODELAY` is set on the listening socket, which Linux
//! copies to every connection it accepts, instead of once per connection.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A bound, listening TCP socket, registered with the reactor of the runtime that bound it.
#[derive(Debug)]
pub struct ListeningSocket {
    /// mio's listener, whose accept leaves the new socket unregistered.
    inner: AsyncFd<mio::net::TcpListener>,
    /// Read once at bind: it cannot change.
    local_addr: SocketAddr,
}

impl ListeningSocket {
    /// Binds `addr` (with `SO_REUSEADDR`, as tokio does) and starts listening. Must be called
    /// within a tokio runtime, whose reactor then wakes the accepting task.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let listener = mio::net::TcpListener::bind(addr)?;
        socket2::SockRef::from(&listener).set_tcp_nodelay(true)?;
        let local_addr = listener.local_addr()?;
        // SAFETY: the mio listener owns its descriptor, which stays open and the same until
        // the `AsyncFd` drops it; `as_raw_fd` always returns that descriptor.
        #[allow(unsafe_code)]
        let inner = unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self { inner, local_addr })
    }

    /// The address actually bound (differs from the requested one for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Waits for the next connection and returns it non-blocking, close-on-exec, with
    /// `TCP_NODELAY` inherited, and registered with no reactor.
    pub async fn accept(&self) -> io::Result<(std::net::TcpStream, SocketAddr)> {
        loop {
            let mut ready = self.inner.readable().await?;
            if let Ok(accepted) = ready.try_io(|listener| listener.get_ref().accept()) {
                // Readiness waits take no cooperative budget, as tokio's own accept does: under
                // a flood the loop must still let the runtime's other tasks run.
                tokio::task::coop::consume_budget().await;
                return accepted.map(|(stream, peer)| (stream.into(), peer));
            }
        }
    }
}

impl AsFd for ListeningSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.get_ref().as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_are_unregistered_nonblocking_and_without_nagle() {
        let socket = ListeningSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr();
        assert_ne!(addr.port(), 0);
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, peer) = socket.accept().await.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY was not inherited");
        // Non-blocking: a read with nothing sent returns at once.
        let mut buf = [0u8; 1];
        let read = std::io::Read::read(&mut &accepted, &mut buf);
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::WouldBlock);
        // Registered nowhere yet: this runtime, whose reactor accepted it, can take it.
        let mut stream = tokio::net::TcpStream::from_std(accepted).unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut client, b"x")
            .await
            .unwrap();
        let n = tokio::io::AsyncReadExt::read(&mut stream, &mut buf)
            .await
            .unwrap();
        assert_eq!((n, buf[0]), (1, b'x'));
    }
}
