//! The client socket wrappers: [`Metered`] counts bytes into `ciphergate_bytes_total` and keeps
//! the clock an idle timeout is measured against; [`Prefixed`] gives back bytes read to tell
//! what a connection carries.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::metrics::SharedCounter;

/// When a connection last moved a byte, in milliseconds since it was accepted.
pub struct IdleClock {
    start: Instant,
    last_ms: AtomicU64,
}

impl IdleClock {
    pub fn new() -> Arc<Self> {
        Arc::new(IdleClock {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once no byte has moved for `idle`.
    pub async fn expired(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = self.start + last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A client stream that counts what passes and touches its [`IdleClock`].
pub struct Metered<T> {
    inner: T,
    bytes_in: SharedCounter,
    bytes_out: SharedCounter,
    clock: Arc<IdleClock>,
}

impl<T> Metered<T> {
    pub fn new(inner: T, counters: (SharedCounter, SharedCounter), clock: Arc<IdleClock>) -> Self {
        Metered {
            inner,
            bytes_in: counters.0,
            bytes_out: counters.1,
            clock,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.bytes_in.inc_by(n as u64);
            self.clock.touch();
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll
            && n > 0
        {
            self.bytes_out.inc_by(n as u64);
            self.clock.touch();
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = poll
            && n > 0
        {
            self.bytes_out.inc_by(n as u64);
            self.clock.touch();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A stream whose first reads return bytes already read from it (to sniff what it carries),
/// then carry on from the stream itself.
pub struct Prefixed<T> {
    prefix: Vec<u8>,
    /// How much of `prefix` has been read again.
    at: usize,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(prefix: Vec<u8>, inner: T) -> Self {
        Prefixed {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            if self.at == self.prefix.len() {
                // Given back whole: hold no memory for it from here on.
                self.prefix = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Looks at every byte read from a stream before it is handed on.
pub trait Inspect {
    /// An error ends the stream: the bytes of that read are not handed on.
    fn inspect(&mut self, read: &[u8]) -> io::Result<()>;
}

impl Inspect for crate::tls::records::RecordWatch {
    fn inspect(&mut self, read: &[u8]) -> io::Result<()> {
        self.feed(read)
            .map_err(|v| io::Error::new(io::ErrorKind::InvalidData, v))
    }
}

/// A stream whose reads pass an [`Inspect`] first; writes go straight through.
pub struct Inspected<T, I> {
    inner: T,
    inspector: I,
}

impl<T, I> Inspected<T, I> {
    pub fn new(inner: T, inspector: I) -> Self {
        Inspected { inner, inspector }
    }
}

impl<T: AsyncRead + Unpin, I: Inspect + Unpin> AsyncRead for Inspected<T, I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        match this.inspector.inspect(&buf.filled()[before..]) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => {
                buf.set_filled(before);
                Poll::Ready(Err(e))
            }
        }
    }
}

impl<T: AsyncWrite + Unpin, I: Unpin> AsyncWrite for Inspected<T, I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_prefix_is_read_again_before_the_stream() {
        let mut stream = Prefixed::new(b"GET ".to_vec(), &b"/ HTTP/1.1"[..]);
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "GET / HTTP/1.1");
    }
}
