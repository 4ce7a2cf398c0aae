//! A terminate listener's TLS stream, on rustls's unbuffered API.
//!
//! rustls's buffered `ServerConnection` keeps a 4 KiB read buffer from its first read until it
//! is dropped, which is most of what an open but quiet connection costs. Here the stream owns
//! its buffers and borrows them from its worker only while bytes wait in them, so a quiet
//! connection holds its TLS session and nothing more. Records are also encrypted straight into
//! the outgoing buffer, where the buffered API makes a new allocation for each one.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::server::{Acceptor, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use rustls::{CommonState, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// The size of a buffer lent by the worker: two full TLS records, so one write can carry
/// [`MAX_WRITE`] bytes of plaintext and one read can take two records.
const BUF_SIZE: usize = 2 * (16 * 1024 + 256 + 5) + 512;

/// Plaintext taken by one `poll_write`.
const MAX_WRITE: usize = 32 * 1024;

/// Queued bytes that a write takes along in its own send instead of sending them first: the
/// session tickets that end a handshake (about 400 bytes), when the client's first request
/// came with its Finished. Fits in the slack [`BUF_SIZE`] leaves after a [`MAX_WRITE`].
const CARRY: usize = 512;

/// The most received bytes held unprocessed: rustls takes handshake messages of up to 64 KiB.
const MAX_INCOMING: usize = 64 * 1024 + BUF_SIZE;

/// Buffers each worker keeps for its connections to borrow.
const MAX_SPARE: usize = 32;

thread_local! {
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    /// Where the slices of a vectored write are gathered, so they go out in as few records as
    /// one slice would.
    static GATHER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn borrow_buffer() -> Vec<u8> {
    SPARE
        .with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| vec![0; BUF_SIZE])
}

fn return_buffer(buf: Vec<u8>) {
    if buf.len() == BUF_SIZE {
        SPARE.with_borrow_mut(|spare| {
            if spare.len() < MAX_SPARE {
                spare.push(buf);
            }
        });
    }
}

/// Bytes waiting in a buffer borrowed from the worker, `buf[start..end]`. Once it is empty it
/// gives the buffer back and holds no memory.
#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.release();
        }
    }

    /// Gives the buffer back to the worker; only ever called when nothing waits in it.
    fn release(&mut self) {
        self.start = 0;
        self.end = 0;
        if !self.buf.is_empty() {
            return_buffer(std::mem::take(&mut self.buf));
        }
    }

    /// Moves waiting bytes out of a borrowed buffer into one of their own size, and gives the
    /// borrowed one back: for a peer that sent part of a record and went quiet.
    fn park(&mut self) {
        if self.buf.len() == BUF_SIZE && !self.is_empty() {
            let parked = self.bytes().to_vec();
            return_buffer(std::mem::replace(&mut self.buf, parked));
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// The free space at the end, at least `want` bytes of it: borrows a buffer (taking in
    /// parked bytes), moves the waiting bytes to the front, or grows, as needed.
    fn room(&mut self, want: usize) -> &mut [u8] {
        if self.buf.len() < BUF_SIZE {
            let parked = std::mem::replace(&mut self.buf, borrow_buffer());
            self.buf[..parked.len()].copy_from_slice(&parked);
        }
        if self.buf.len() - self.end < want {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() - self.end < want {
                self.buf.resize(self.end + want, 0);
            }
        }
        &mut self.buf[self.end..]
    }

    fn filled(&mut self, n: usize) {
        self.end += n;
        if self.is_empty() {
            self.release();
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.room(bytes.len())[..bytes.len()].copy_from_slice(bytes);
        self.filled(bytes.len());
    }

    /// Runs `write` on the free space until it fits, growing by what it says it needs.
    fn write_with<E>(
        &mut self,
        mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
        required: impl Fn(&E) -> Option<InsufficientSizeError>,
    ) -> Result<(), E> {
        let mut want = 0;
        loop {
            match write(self.room(want)) {
                Ok(n) => {
                    self.filled(n);
                    return Ok(());
                }
                Err(error) => match required(&error) {
                    Some(size) if size.required_size > want => want = size.required_size,
                    _ => {
                        if self.is_empty() {
                            self.release();
                        }
                        return Err(error);
                    }
                },
            }
        }
    }
}

fn encode_size(error: &EncodeError) -> Option<InsufficientSizeError> {
    match error {
        EncodeError::InsufficientSize(size) => Some(*size),
        _ => None,
    }
}

fn encrypt_size(error: &EncryptError) -> Option<InsufficientSizeError> {
    match error {
        EncryptError::InsufficientSize(size) => Some(*size),
        _ => None,
    }
}

fn tls_error(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

/// Where processing the received bytes stopped.
#[derive(PartialEq, Eq)]
enum Advance {
    /// Plaintext arrived for the reader.
    Plaintext,
    /// rustls needs more bytes from the peer.
    NeedInput,
    /// Nothing more to process; application data may be written (and was, when asked).
    Writable,
    /// Both sides have sent close_notify.
    Closed,
}

/// What [`ServerStream::advance`] should write once rustls allows application data.
#[derive(Clone, Copy)]
enum Write<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

/// A server-side TLS stream over `IO`.
pub struct ServerStream<IO> {
    io: IO,
    conn: UnbufferedServerConnection,
    /// Received TLS bytes rustls has not processed yet.
    incoming: Pending,
    /// Decrypted bytes the reader has not taken yet.
    plaintext: Pending,
    /// TLS bytes to send.
    outgoing: Pending,
    /// No more plaintext will come: the peer sent close_notify or closed the socket.
    read_done: bool,
    /// Our close_notify is queued.
    write_done: bool,
    /// The socket ended without close_notify.
    truncated: bool,
    /// rustls failed (and queued its alert); it must not be asked to process anything again.
    failed: bool,
    /// `outgoing` holds only the session tickets, kept back to go with the first write: a
    /// flush before it does not send them.
    tickets_wait: bool,
}

/// A new connection's ClientHello, read and parsed; the bytes it came in are kept for the
/// handshake.
pub struct Hello<IO> {
    io: IO,
    incoming: Pending,
    server_name: Option<Box<str>>,
}

/// Reads a ClientHello from `io`, answering with an alert when it does not parse.
///
/// The unbuffered API does not expose the ClientHello's server name, which the policy needs
/// before the handshake goes on, so the hello is parsed once by an [`Acceptor`] for that and
/// then handed as it came to the connection that does the handshake.
pub async fn read_client_hello<IO>(mut io: IO) -> io::Result<Hello<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut acceptor = Acceptor::default();
    let mut incoming = Pending::default();
    let mut fed = 0;
    loop {
        let n = poll_fn(|cx| poll_fill(&mut io, &mut incoming, cx)).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        while fed < incoming.end {
            let mut unread = &incoming.buf[fed..incoming.end];
            match acceptor.read_tls(&mut unread)? {
                0 => break,
                n => fed += n,
            }
        }
        match acceptor.accept() {
            Ok(None) => continue,
            Ok(Some(accepted)) => {
                let server_name = accepted.client_hello().server_name().map(Into::into);
                return Ok(Hello {
                    io,
                    incoming,
                    server_name,
                });
            }
            Err((error, mut alert)) => {
                let mut bytes = Vec::new();
                if alert.write_all(&mut bytes).is_ok() {
                    let _ = io.write_all(&bytes).await;
                }
                return Err(tls_error(error));
            }
        }
    }
}

/// Reads what the socket has into `incoming`; `Ok(0)` at end of stream.
fn poll_fill<IO: AsyncRead + Unpin>(
    io: &mut IO,
    incoming: &mut Pending,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if incoming.len() >= MAX_INCOMING {
        return Poll::Ready(Err(tls_error("TLS message too large")));
    }
    let mut buf = ReadBuf::new(incoming.room(4096));
    let poll = Pin::new(io).poll_read(cx, &mut buf);
    let n = buf.filled().len();
    incoming.filled(n);
    match poll {
        Poll::Ready(Ok(())) => Poll::Ready(Ok(n)),
        Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
        Poll::Pending => {
            incoming.park();
            Poll::Pending
        }
    }
}

impl<IO> Hello<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    /// The server name the client asked for, as it sent it.
    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// Completes the handshake with `config`. The session tickets that end it are sent now,
    /// unless the client's first request is already here: then they go out with the answer
    /// to it, in the same send.
    pub async fn handshake(self, config: Arc<ServerConfig>) -> io::Result<ServerStream<IO>> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut stream = ServerStream {
            io: self.io,
            conn,
            incoming: self.incoming,
            plaintext: Pending::default(),
            outgoing: Pending::default(),
            read_done: false,
            write_done: false,
            truncated: false,
            failed: false,
            tickets_wait: false,
        };
        loop {
            let step = match stream.advance(Write::Nothing) {
                Ok(step) => step,
                Err(error) => {
                    // The alert rustls queued, if the socket takes it.
                    let _ = poll_fn(|cx| stream.poll_send(cx)).await;
                    return Err(error);
                }
            };
            match step {
                Advance::Closed => return Err(io::ErrorKind::UnexpectedEof.into()),
                _ if !stream.conn.is_handshaking() => break,
                // A TLS 1.3 server may write before the client's Finished; it still needs it.
                Advance::Plaintext | Advance::NeedInput | Advance::Writable => {
                    poll_fn(|cx| stream.poll_send(cx)).await?;
                    let n =
                        poll_fn(|cx| poll_fill(&mut stream.io, &mut stream.incoming, cx)).await?;
                    if n == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
            }
        }
        if stream.has_buffered_input() {
            stream.tickets_wait = !stream.outgoing.is_empty();
        } else {
            poll_fn(|cx| stream.poll_send(cx)).await?;
        }
        Ok(stream)
    }
}

impl<IO> ServerStream<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// The negotiated session: version, group, the client's certificates.
    pub fn session(&self) -> &CommonState {
        &self.conn
    }

    /// The bytes of buffer the stream holds: 0 while it has borrowed none.
    #[cfg(test)]
    fn held_bytes(&self) -> usize {
        self.incoming.buf.len() + self.plaintext.buf.len() + self.outgoing.buf.len()
    }

    /// True when received bytes wait here: plaintext, or records not yet processed.
    pub fn has_buffered_input(&self) -> bool {
        !self.plaintext.is_empty() || !self.incoming.is_empty()
    }

    /// Feeds the received bytes to rustls until it has plaintext for the reader, needs more
    /// bytes, or allows application data, and then writes `write`. Whatever rustls has to
    /// send goes to `outgoing`.
    fn advance(&mut self, write: Write<'_>) -> io::Result<Advance> {
        let Self {
            conn,
            incoming,
            plaintext,
            outgoing,
            read_done,
            failed,
            ..
        } = self;
        if *failed {
            return Err(tls_error("the TLS connection failed"));
        }
        loop {
            let UnbufferedStatus { mut discard, state } =
                conn.process_tls_records(incoming.bytes_mut());
            let step = match state {
                Err(error) => Err(error),
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    let mut result = Ok(Some(Advance::Plaintext));
                    while let Some(record) = traffic.next_record() {
                        match record {
                            Ok(record) => {
                                discard += record.discard;
                                plaintext.push(record.payload);
                            }
                            Err(error) => {
                                result = Err(error);
                                break;
                            }
                        }
                    }
                    result
                }
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    match outgoing.write_with(|out| data.encode(out), encode_size) {
                        Ok(()) => Ok(None),
                        Err(error) => Err(rustls::Error::General(error.to_string())),
                    }
                }
                // The bytes stay in `outgoing` and go out in order with whatever follows them.
                Ok(ConnectionState::TransmitTlsData(data)) => {
                    data.done();
                    Ok(None)
                }
                Ok(ConnectionState::BlockedHandshake) => Ok(Some(Advance::NeedInput)),
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    let written = match write {
                        Write::Nothing => Ok(()),
                        Write::Data(data) => {
                            outgoing.write_with(|out| traffic.encrypt(data, out), encrypt_size)
                        }
                        Write::CloseNotify => {
                            outgoing.write_with(|out| traffic.queue_close_notify(out), encrypt_size)
                        }
                    };
                    match written {
                        Ok(()) => Ok(Some(Advance::Writable)),
                        Err(error) => Err(rustls::Error::General(error.to_string())),
                    }
                }
                Ok(ConnectionState::PeerClosed) => {
                    *read_done = true;
                    Ok(None)
                }
                Ok(ConnectionState::Closed) => Ok(Some(Advance::Closed)),
                // Early data is never enabled; later states are not known to this code.
                Ok(_) => Err(rustls::Error::General("unexpected TLS state".into())),
            };
            incoming.consume(discard);
            match step {
                Ok(Some(step)) => return Ok(step),
                Ok(None) => continue,
                Err(error) => {
                    *failed = true;
                    queue_alert(conn, incoming, outgoing);
                    return Err(tls_error(error));
                }
            }
        }
    }

    /// [`Self::advance`], and on an error, the alert it queued sent as far as the socket takes.
    fn advance_in(&mut self, cx: &mut Context<'_>, write: Write<'_>) -> io::Result<Advance> {
        self.advance(write).inspect_err(|_| {
            let _ = self.poll_send(cx);
        })
    }

    /// Sends `outgoing`.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outgoing.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, self.outgoing.bytes()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing.consume(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Encrypts `data` once what was queued before it is on the wire (up to [`CARRY`] bytes of
    /// it may wait and go first in the same send), and starts sending it.
    fn poll_encrypt(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<()>> {
        if self.write_done {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if self.outgoing.len() > CARRY {
            ready!(self.poll_send(cx))?;
        }
        self.tickets_wait = false;
        loop {
            match self.advance_in(cx, Write::Data(data))? {
                Advance::Writable => break,
                Advance::Plaintext => continue,
                Advance::NeedInput | Advance::Closed => {
                    return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
                }
            }
        }
        // What the socket does not take now goes with the next write or flush.
        if let Poll::Ready(Err(error)) = self.poll_send(cx) {
            return Poll::Ready(Err(error));
        }
        Poll::Ready(Ok(()))
    }
}

/// Encodes the alert rustls queued with an error, if it queued one. rustls hands a queued
/// record out before it looks at received bytes, so one more call yields the alert; it must
/// still be given the received bytes, in which it may hold positions. Without a queued record
/// that call, or a second one, would process them again.
fn queue_alert(
    conn: &mut UnbufferedServerConnection,
    incoming: &mut Pending,
    outgoing: &mut Pending,
) {
    if !conn.wants_write() {
        return;
    }
    let UnbufferedStatus { discard, state } = conn.process_tls_records(incoming.bytes_mut());
    if let Ok(ConnectionState::EncodeTlsData(mut data)) = state {
        let _ = outgoing.write_with(|out| data.encode(out), encode_size);
    }
    incoming.consume(discard);
}

impl<IO> AsyncRead for ServerStream<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.plaintext.is_empty() {
                let n = buf.remaining().min(this.plaintext.len());
                buf.put_slice(&this.plaintext.bytes()[..n]);
                this.plaintext.consume(n);
                return Poll::Ready(Ok(()));
            }
            if this.read_done {
                return Poll::Ready(Ok(()));
            }
            if this.truncated {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            match this.advance_in(cx, Write::Nothing)? {
                Advance::Plaintext => continue,
                Advance::Closed => {
                    this.read_done = true;
                    continue;
                }
                Advance::NeedInput | Advance::Writable if this.read_done => continue,
                Advance::NeedInput | Advance::Writable => {}
            }
            // Records rustls queued while reading (a refused renegotiation) wait for the next
            // write: sending here would take the writer's wake-up when another task writes.
            // (A key update's answer is sent with the next write by rustls itself.)
            match poll_fill(&mut this.io, &mut this.incoming, cx) {
                Poll::Ready(Ok(0)) => {
                    // The socket closed without close_notify: the data may be cut short, and
                    // every read says so.
                    this.truncated = true;
                    continue;
                }
                Poll::Ready(Ok(_)) => continue,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<IO> AsyncWrite for ServerStream<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = data.len().min(MAX_WRITE);
        ready!(self.get_mut().poll_encrypt(cx, &data[..n]))?;
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut slices = bufs.iter().filter(|buf| !buf.is_empty());
        let (first, second) = (slices.next(), slices.next());
        match (first, second) {
            (None, _) => Poll::Ready(Ok(0)),
            (Some(only), None) => self.poll_write(cx, only),
            _ => GATHER.with_borrow_mut(|gathered| {
                gathered.clear();
                for buf in bufs {
                    let take = buf.len().min(MAX_WRITE - gathered.len());
                    gathered.extend_from_slice(&buf[..take]);
                    if gathered.len() == MAX_WRITE {
                        break;
                    }
                }
                ready!(self.get_mut().poll_encrypt(cx, gathered))?;
                Poll::Ready(Ok(gathered.len()))
            }),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.tickets_wait {
            ready!(this.poll_send(cx))?;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_done && !this.failed {
            ready!(this.poll_send(cx))?;
            // Plaintext that arrives meanwhile is kept for the reader; the alert goes out next.
            while this.advance_in(cx, Write::CloseNotify)? == Advance::Plaintext {}
            this.write_done = true;
        }
        ready!(this.poll_send(cx))?;
        match ready!(Pin::new(&mut this.io).poll_shutdown(cx)) {
            Err(error) if error.kind() != io::ErrorKind::NotConnected => Poll::Ready(Err(error)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConfig, RootCertStore};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::TlsConnector;
    use tokio_rustls::client::TlsStream;

    /// A server config for `localhost` and a client config that trusts it, offering `versions`.
    fn configs(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
        let chain = vec![cert.cert.der().clone()];
        let mut server = ServerConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key)
            .unwrap();
        server.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(chain[0].clone()).unwrap();
        let client = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// A loopback connection: our server stream on one end, a tokio-rustls client on the other.
    async fn pair(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (ServerStream<TcpStream>, TlsStream<TcpStream>) {
        let (server_config, client_config) = configs(versions);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            TlsConnector::from(client_config)
                .connect(name, tcp)
                .await
                .unwrap()
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let hello = read_client_hello(tcp).await.unwrap();
        assert_eq!(hello.server_name(), Some("localhost"));
        let server = hello.handshake(server_config).await.unwrap();
        (server, client.await.unwrap())
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Echoes until the client closes, checking the buffers are given back between rounds.
    async fn echo(mut server: ServerStream<TcpStream>) -> io::Result<u64> {
        let mut buf = vec![0; 10_000];
        let mut total = 0;
        loop {
            let n = server.read(&mut buf).await?;
            if n == 0 {
                server.shutdown().await?;
                return Ok(total);
            }
            server.write_all(&buf[..n]).await?;
            total += n as u64;
        }
    }

    #[tokio::test]
    async fn carries_a_mebibyte_each_way_over_tls13_and_tls12() {
        for versions in [&[&rustls::version::TLS13][..], &[&rustls::version::TLS12]] {
            let (server, mut client) = pair(versions).await;
            let echoed = tokio::spawn(echo(server));
            let sent = pattern(1 << 20);
            let (mut read, mut write) = tokio::io::split(&mut client);
            let writing = async {
                write.write_all(&sent).await.unwrap();
                write.shutdown().await.unwrap();
            };
            let mut received = Vec::new();
            let reading = read.read_to_end(&mut received);
            let ((), got) = tokio::join!(writing, reading);
            // The server answered our close_notify with its own: a clean end of stream.
            got.unwrap();
            assert!(received == sent, "the echo differs from what was sent");
            assert_eq!(echoed.await.unwrap().unwrap(), 1 << 20);
        }
    }

    #[tokio::test]
    async fn a_quiet_connection_holds_no_buffer() {
        let (mut server, mut client) = pair(&[&rustls::version::TLS13]).await;
        // Session tickets went out with the handshake; nothing is left waiting.
        assert_eq!(server.held_bytes(), 0);
        for round in 0..3 {
            let request = pattern(20_000 + round);
            client.write_all(&request).await.unwrap();
            let mut got = vec![0; request.len()];
            server.read_exact(&mut got).await.unwrap();
            assert!(got == request);
            server.write_all(&request).await.unwrap();
            server.flush().await.unwrap();
            client.read_exact(&mut got).await.unwrap();
            assert!(got == request);
            assert_eq!(server.held_bytes(), 0, "round {round} kept a buffer");
        }
        // A read that finds nothing gives back what it borrowed to read into.
        let pending = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            server.read(&mut [0; 16]),
        )
        .await;
        assert!(pending.is_err());
        assert_eq!(server.held_bytes(), 0);
    }

    #[tokio::test]
    async fn answers_a_key_update_and_keeps_going() {
        let (mut server, mut client) = pair(&[&rustls::version::TLS13]).await;
        client.get_mut().1.refresh_traffic_keys().unwrap();
        client.write_all(b"after the update").await.unwrap();
        let mut got = [0; 16];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"after the update");
        server.write_all(b"and back").await.unwrap();
        server.flush().await.unwrap();
        let mut got = [0; 8];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"and back");
    }

    #[tokio::test]
    async fn a_close_without_close_notify_is_an_error_not_an_end() {
        let (mut server, mut client) = pair(&[&rustls::version::TLS13]).await;
        // End of stream on the socket, with no close_notify before it.
        client.get_mut().0.shutdown().await.unwrap();
        let error = server.read(&mut [0; 16]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
        // Asked again, it does not turn into a clean end.
        let error = server.read(&mut [0; 16]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_peer_that_sends_part_of_a_record_pins_only_that_part() {
        let (mut server, mut client) = pair(&[&rustls::version::TLS13]).await;
        // A record header and one byte of its body, then nothing.
        client
            .get_mut()
            .0
            .write_all(&[0x17, 0x03, 0x03, 0x00, 0x40, 0x01])
            .await
            .unwrap();
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            server.read(&mut [0; 16]),
        )
        .await;
        assert!(waiting.is_err(), "a partial record was taken for data");
        assert_eq!(server.held_bytes(), 6);
    }

    /// A client stream that writes at most 7 bytes at a time, so records arrive in pieces.
    struct Trickle(TcpStream);

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = data.len().min(7);
            Pin::new(&mut self.0).poll_write(cx, &data[..n])
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn records_that_arrive_in_pieces_read_whole() {
        let (server_config, client_config) = configs(&[&rustls::version::TLS13]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = pattern(50_000);
        let expected = sent.clone();
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            let mut tls = TlsConnector::from(client_config)
                .connect(name, Trickle(tcp))
                .await
                .unwrap();
            tls.write_all(&sent).await.unwrap();
            tls.shutdown().await.unwrap();
            let mut rest = Vec::new();
            tls.read_to_end(&mut rest).await.unwrap();
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let mut server = read_client_hello(tcp)
            .await
            .unwrap()
            .handshake(server_config)
            .await
            .unwrap();
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        assert!(
            received == expected,
            "records read in pieces came out different"
        );
        server.shutdown().await.unwrap();
        client.await.unwrap();
    }

    /// The server's socket: counts its sends, and holds reads after the first send (the
    /// server's flight) until `gate` opens, so the test decides what the client has sent by
    /// the time the server reads again.
    struct Gated {
        io: TcpStream,
        sends: Arc<std::sync::atomic::AtomicUsize>,
        gate: Option<tokio::sync::oneshot::Receiver<()>>,
    }

    impl AsyncRead for Gated {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.sends.load(std::sync::atomic::Ordering::SeqCst) > 0
                && let Some(gate) = self.gate.as_mut()
            {
                let _ = ready!(Pin::new(gate).poll(cx));
                self.gate = None;
            }
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Gated {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, data))?;
            self.sends.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// A TLS 1.3 handshake whose client sends `request` (if any) before the server reads its
    /// Finished; then a flush and one answer. Returns the server's sends after the handshake and after the
    /// answer, and whether a second connection resumed with a ticket from the first.
    async fn tickets_with_request(request: Option<&'static [u8]>) -> (usize, usize, bool) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (server_config, client_config) = configs(&[&rustls::version::TLS13]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, gate) = tokio::sync::oneshot::channel();
        let connector = TlsConnector::from(client_config);
        let first = connector.clone();
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            // As curl and browsers do: otherwise Nagle holds the request until the server's
            // ACK of the client's Finished.
            tcp.set_nodelay(true).unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            let mut client = first.connect(name, tcp).await.unwrap();
            if let Some(request) = request {
                client.write_all(request).await.unwrap();
                client.flush().await.unwrap();
            }
            open.send(()).unwrap();
            let mut answer = [0; 4];
            client.read_exact(&mut answer).await.unwrap();
            assert_eq!(&answer, b"pong");
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let sends = Arc::new(AtomicUsize::new(0));
        let io = Gated {
            io: tcp,
            sends: sends.clone(),
            gate: Some(gate),
        };
        let hello = read_client_hello(io).await.unwrap();
        let mut server = hello.handshake(server_config.clone()).await.unwrap();
        let after_handshake = sends.load(Ordering::SeqCst);
        if let Some(request) = request {
            let mut got = vec![0; request.len()];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, request);
            // hyper flushes before it has an answer to write; that alone sends nothing.
            server.flush().await.unwrap();
        }
        server.write_all(b"pong").await.unwrap();
        server.flush().await.unwrap();
        let after_answer = sends.load(Ordering::SeqCst);
        client.await.unwrap();

        // A second connection resumes only if the tickets reached the client.
        let second = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            let client = connector.connect(name, tcp).await.unwrap();
            client.get_ref().1.handshake_kind()
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let hello = read_client_hello(tcp).await.unwrap();
        let _server = hello.handshake(server_config).await.unwrap();
        let resumed = second.await.unwrap() == Some(rustls::HandshakeKind::Resumed);
        (after_handshake, after_answer, resumed)
    }

    #[tokio::test]
    async fn session_tickets_ride_with_the_answer_to_a_request_that_came_with_finished() {
        let (after_handshake, after_answer, resumed) = tickets_with_request(Some(b"ping")).await;
        assert_eq!(
            after_handshake, 1,
            "only the server's flight is sent in the handshake"
        );
        assert_eq!(after_answer, 2, "the tickets and the answer go in one send");
        assert!(resumed, "the tickets reached the client");
    }

    #[tokio::test]
    async fn session_tickets_go_at_once_when_the_client_has_not_asked_yet() {
        let (after_handshake, after_answer, resumed) = tickets_with_request(None).await;
        assert_eq!(after_handshake, 2, "the flight, then the tickets");
        assert_eq!(after_answer, 3);
        assert!(resumed);
    }

    #[tokio::test]
    async fn reading_and_writing_from_two_tasks_both_finish() {
        let (server, mut client) = pair(&[&rustls::version::TLS13]).await;
        let (mut read, mut write) = tokio::io::split(server);
        let total = 8 << 20;
        let writer = tokio::spawn(async move {
            write.write_all(&pattern(total)).await.unwrap();
            write.flush().await.unwrap();
        });
        let reader = tokio::spawn(async move {
            let mut got = [0; 5];
            read.read_exact(&mut got).await.unwrap();
            got
        });
        client.write_all(b"hello").await.unwrap();
        client.flush().await.unwrap();
        let mut received = vec![0; total];
        let drained = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            client.read_exact(&mut received),
        )
        .await;
        assert!(drained.is_ok(), "the writer stalled");
        assert_eq!(&reader.await.unwrap(), b"hello");
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_forged_record_ends_in_an_alert_and_an_error() {
        let (mut server, mut client) = pair(&[&rustls::version::TLS13]).await;
        // An application-data record that no key made.
        let mut forged = vec![0x17, 0x03, 0x03, 0x00, 0x40];
        forged.extend_from_slice(&[0x5a; 0x40]);
        client.get_mut().0.write_all(&forged).await.unwrap();
        let error = server.read(&mut [0; 16]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        // rustls is asked nothing more once it failed: a debug build of it would panic.
        assert!(server.read(&mut [0; 16]).await.is_err());
        let _ = server.shutdown().await;
        drop(server);
        // The client hears why before the close.
        let error = client.read(&mut [0; 16]).await.unwrap_err();
        assert!(
            error.to_string().contains("BadRecordMac"),
            "client saw: {error}"
        );
    }

    #[tokio::test]
    async fn garbage_instead_of_a_hello_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        client
            .write_all(&[
                0x16, 0x03, 0x01, 0x00, 0x08, 1, 0, 0, 4, 0xde, 0xad, 0xbe, 0xef,
            ])
            .await
            .unwrap();
        assert!(read_client_hello(tcp).await.is_err());
        // An alert came back before the close.
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer.first(), Some(&0x15), "no alert record: {answer:?}");
    }
}
