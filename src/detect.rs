//! Telling TLS from plaintext by the first bytes.
//!
//! A TLS connection starts with a handshake record: content type 22 (0x16). No plaintext
//! protocol ciphergate carries starts with that byte (HTTP starts with a method's letters), so
//! on terminate listeners one peeked byte decides where the connection goes, and nothing is
//! consumed. Bytes that look like TLS but are not end in a failed handshake; nothing else is
//! ever forwarded for them.
//!
//! A transparent listener also needs to tell HTTP/1.x from other plaintext ([`sniff`]): it
//! reads (the bytes are given back to what serves the connection) until a method and a space,
//! or anything else, has arrived.

use std::io;

use tokio::net::TcpStream;

/// The TLS record content type of a handshake message.
const HANDSHAKE_RECORD: u8 = 0x16;
/// The handshake message type of a ClientHello.
const CLIENT_HELLO: u8 = 0x01;

/// What the first bytes of a connection say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Tls,
    Plaintext,
    /// The peer closed before sending anything.
    Closed,
}

/// Waits for the first byte and classifies the connection. Consumes nothing.
pub async fn detect(stream: &TcpStream) -> io::Result<Detected> {
    let mut first = [0u8; 1];
    let n = stream.peek(&mut first).await?;
    Ok(classify(&first[..n]))
}

/// Classifies the connection by what has arrived so far, without waiting: `None` when nothing
/// has. `stream` must be non-blocking. Consumes nothing.
pub fn detect_now(stream: &std::net::TcpStream) -> io::Result<Option<Detected>> {
    let mut first = [0u8; 1];
    match stream.peek(&mut first) {
        Ok(n) => Ok(Some(classify(&first[..n]))),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

fn classify(first: &[u8]) -> Detected {
    match first.first() {
        None => Detected::Closed,
        Some(&HANDSHAKE_RECORD) => Detected::Tls,
        Some(_) => Detected::Plaintext,
    }
}

/// Whether `bytes` start a TLS ClientHello record: handshake content type, a 3.x record
/// version, and (when present) the ClientHello message type.
pub fn is_client_hello(bytes: &[u8]) -> bool {
    match bytes {
        [HANDSHAKE_RECORD, 0x03, minor, _, _, msg, ..] => *minor <= 0x04 && *msg == CLIENT_HELLO,
        _ => false,
    }
}

/// Whether `bytes` could still be the start of a ClientHello: false as soon as one byte
/// rules it out, so a reader can stop waiting for more.
pub fn may_become_client_hello(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, b)| match i {
        0 => *b == HANDSHAKE_RECORD,
        1 => *b == 0x03,
        2 => *b <= 0x04,
        5 => *b == CLIENT_HELLO,
        _ => true,
    })
}

/// What the first bytes of a connection from the local app are, for a transparent listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniffed {
    /// Too few bytes yet to tell.
    NeedMore,
    /// A TLS handshake record.
    Tls,
    /// An HTTP/1.x request line: a method token and a space.
    Http,
    /// Anything else.
    Other,
}

/// The longest method an HTTP/1.x request line is recognised by.
const MAX_METHOD: usize = 20;

/// Tells TLS, HTTP/1.x and other plaintext apart by the first bytes. HTTP/2's prior-knowledge
/// preface (`PRI * HTTP/2.0`) is not HTTP/1.x.
pub fn sniff(bytes: &[u8]) -> Sniffed {
    match bytes.first() {
        None => return Sniffed::NeedMore,
        Some(&HANDSHAKE_RECORD) => return Sniffed::Tls,
        Some(_) => {}
    }
    let method_len = bytes
        .iter()
        .take(MAX_METHOD + 1)
        .position(|b| !(b.is_ascii_uppercase() || *b == b'-'));
    match method_len {
        Some(0) => Sniffed::Other,
        Some(n) if bytes[n] == b' ' && &bytes[..n] != b"PRI" => Sniffed::Http,
        Some(_) => Sniffed::Other,
        None if bytes.len() <= MAX_METHOD => Sniffed::NeedMore,
        None => Sniffed::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_are_sniffed() {
        assert_eq!(sniff(b""), Sniffed::NeedMore);
        assert_eq!(sniff(b"GE"), Sniffed::NeedMore);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniffed::Http);
        assert_eq!(sniff(b"M-SEARCH * HTTP/1.1"), Sniffed::Http);
        assert_eq!(sniff(&[0x16, 0x03, 0x01]), Sniffed::Tls);
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n"), Sniffed::Other);
        assert_eq!(sniff(b"*1\r\n$4\r\nPING\r\n"), Sniffed::Other);
        assert_eq!(sniff(b"get / HTTP/1.1"), Sniffed::Other);
        assert_eq!(sniff(b"GET\t/"), Sniffed::Other);
        assert_eq!(sniff(&[b'A'; 30]), Sniffed::Other);
        assert_eq!(sniff(b"\0\0\0\x08\x04\xd2\x16\x2f"), Sniffed::Other);
    }

    #[test]
    fn client_hello_prefixes() {
        assert!(is_client_hello(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00]));
        assert!(!is_client_hello(b"GET / HTTP/1.1\r\n"));
        assert!(!is_client_hello(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x02]));
        assert!(!is_client_hello(&[0x16, 0x03]));
        assert!(!is_client_hello(&[0x17, 0x03, 0x03, 0x00, 0x10, 0x01]));
    }

    #[test]
    fn a_prefix_is_ruled_out_early() {
        assert!(may_become_client_hello(&[]));
        assert!(may_become_client_hello(&[0x16, 0x03]));
        assert!(!may_become_client_hello(b"p"));
        assert!(!may_become_client_hello(&[0x16, 0x02]));
        assert!(!may_become_client_hello(&[
            0x16, 0x03, 0x01, 0x00, 0x10, 0x02
        ]));
    }
}
