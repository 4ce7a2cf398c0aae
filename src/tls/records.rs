//! Watching the record framing of TLS that is relayed, not terminated (the app's own TLS on a
//! transparent listener), so that only TLS crosses: a ClientHello followed by plaintext, or a
//! server that settles on a version under the floor, ends the relay.
//!
//! Every record header is checked as its bytes pass (a content type of TLS 1.2/1.3, a 3.x
//! version, a length within what a ciphertext record may have); on the server's side the first
//! handshake message, the ServerHello, is also read for the version the server chose. Nothing
//! is decrypted, and a record's body is never kept, only counted past.

use crate::tls::hello::{Reader, TLS13};

/// The largest record a TLS 1.2 peer may send (RFC 5246 §6.2.3: 2^14 + 2048); TLS 1.3's limit
/// is lower.
pub const MAX_CIPHERTEXT: usize = (1 << 14) + 2048;
/// The most ServerHello bytes gathered to read its version.
const MAX_SERVER_HELLO: usize = 64 * 1024;

const CHANGE_CIPHER_SPEC: u8 = 20;
#[cfg(test)]
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
const SERVER_HELLO: u8 = 2;
const EXT_SUPPORTED_VERSIONS: u16 = 43;

/// Why a relayed stream stopped being TLS that may pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("bytes that are not a TLS record")]
    NotARecord,
    #[error("a TLS record longer than any peer may send")]
    Oversized,
    #[error("a ServerHello that does not parse")]
    BadServerHello,
    #[error("the server chose a TLS version under the listener's floor")]
    UnderFloor,
}

/// One direction of a relayed TLS connection.
pub struct RecordWatch {
    /// The record header read so far.
    header: [u8; 5],
    header_len: usize,
    /// The content type of the record whose body is passing, and how much of it is left.
    kind: u8,
    body_left: usize,
    /// The server's side only, until its version is checked: the lowest version that may be
    /// chosen, and the handshake bytes gathered so far.
    server_hello: Option<(u16, Vec<u8>)>,
}

impl RecordWatch {
    /// The client's side: record framing only (its hello was read before the relay began).
    pub fn client() -> Self {
        RecordWatch {
            header: [0; 5],
            header_len: 0,
            kind: 0,
            body_left: 0,
            server_hello: None,
        }
    }

    /// The server's side: record framing, and a ServerHello choosing at least `floor`.
    pub fn server(floor: u16) -> Self {
        RecordWatch {
            server_hello: Some((floor, Vec::new())),
            ..Self::client()
        }
    }

    /// Takes the next bytes of the stream; an error means none of them may be passed on.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), Violation> {
        while !bytes.is_empty() {
            if self.body_left == 0 {
                let byte = bytes[0];
                bytes = &bytes[1..];
                let ok = match self.header_len {
                    0 => (CHANGE_CIPHER_SPEC..=APPLICATION_DATA).contains(&byte),
                    1 => byte == 3,
                    2 => byte <= 4,
                    _ => true,
                };
                if !ok {
                    return Err(Violation::NotARecord);
                }
                self.header[self.header_len] = byte;
                self.header_len += 1;
                if self.header_len == 5 {
                    self.header_len = 0;
                    self.kind = self.header[0];
                    self.body_left =
                        usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                    if self.body_left > MAX_CIPHERTEXT {
                        return Err(Violation::Oversized);
                    }
                    if self.server_hello.is_some() && self.kind == APPLICATION_DATA {
                        // Encrypted data before the server said what it chose.
                        return Err(Violation::BadServerHello);
                    }
                }
                continue;
            }
            let n = self.body_left.min(bytes.len());
            let (body, rest) = bytes.split_at(n);
            bytes = rest;
            self.body_left -= n;
            if self.kind == HANDSHAKE
                && let Some((floor, gathered)) = &mut self.server_hello
            {
                gathered.extend_from_slice(body);
                if let Some(chosen) = server_hello_version(gathered)? {
                    if chosen < *floor {
                        return Err(Violation::UnderFloor);
                    }
                    self.server_hello = None;
                } else if gathered.len() > MAX_SERVER_HELLO {
                    return Err(Violation::BadServerHello);
                }
            }
        }
        Ok(())
    }
}

/// The version a ServerHello chose, once `gathered` holds all of it.
fn server_hello_version(gathered: &[u8]) -> Result<Option<u16>, Violation> {
    let &[kind, a, b, c, ref body @ ..] = gathered else {
        return Ok(None);
    };
    let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
    if kind != SERVER_HELLO || len > MAX_SERVER_HELLO {
        return Err(Violation::BadServerHello);
    }
    let Some(body) = body.get(..len) else {
        return Ok(None);
    };
    let parse = || {
        let mut r = Reader(body);
        let legacy = r.u16()?;
        r.take(32)?; // random
        r.vec8()?; // session id
        r.u16()?; // cipher suite
        r.u8()?; // compression
        if r.is_empty() {
            return Some(legacy);
        }
        let mut extensions = r.vec16()?;
        while !extensions.is_empty() {
            let kind = extensions.u16()?;
            let mut data = extensions.vec16()?;
            if kind == EXT_SUPPORTED_VERSIONS {
                let chosen = data.u16()?;
                // Only TLS 1.3 is negotiated this way; anything else is a broken hello.
                return (chosen == TLS13 && data.is_empty()).then_some(chosen);
            }
        }
        Some(legacy)
    };
    parse().map(Some).ok_or(Violation::BadServerHello)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::hello::TLS12;

    fn record(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut r = vec![kind, 3, 3];
        r.extend_from_slice(&(body.len() as u16).to_be_bytes());
        r.extend_from_slice(body);
        r
    }

    fn server_hello(legacy: u16, supported: Option<u16>) -> Vec<u8> {
        let mut body = legacy.to_be_bytes().to_vec();
        body.extend_from_slice(&[9; 32]);
        body.push(0);
        body.extend_from_slice(&[0x13, 0x01, 0]);
        if let Some(v) = supported {
            body.extend_from_slice(&[0, 6, 0, 43, 0, 2]);
            body.extend_from_slice(&v.to_be_bytes());
        }
        let mut message = vec![SERVER_HELLO];
        message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend_from_slice(&body);
        message
    }

    #[test]
    fn tls_records_pass_byte_by_byte_and_whole() {
        let mut stream = record(HANDSHAKE, &[1, 0, 0, 0]);
        stream.extend(record(CHANGE_CIPHER_SPEC, &[1]));
        stream.extend(record(APPLICATION_DATA, &[0xab; 300]));
        stream.extend(record(ALERT, &[1, 0]));
        let mut whole = RecordWatch::client();
        assert_eq!(whole.feed(&stream), Ok(()));
        let mut bytewise = RecordWatch::client();
        for b in &stream {
            assert_eq!(bytewise.feed(std::slice::from_ref(b)), Ok(()));
        }
    }

    #[test]
    fn plaintext_after_a_record_is_refused() {
        let mut stream = record(HANDSHAKE, &[1, 0, 0, 0]);
        stream.extend_from_slice(b"PLAINTEXT customer-ssn=123");
        assert_eq!(
            RecordWatch::client().feed(&stream),
            Err(Violation::NotARecord)
        );
        let mut oversized = vec![APPLICATION_DATA, 3, 3];
        oversized.extend_from_slice(&((MAX_CIPHERTEXT + 1) as u16).to_be_bytes());
        assert_eq!(
            RecordWatch::client().feed(&oversized),
            Err(Violation::Oversized)
        );
    }

    #[test]
    fn the_server_must_choose_at_least_the_floor() {
        let tls13 = record(HANDSHAKE, &server_hello(TLS12, Some(TLS13)));
        assert_eq!(RecordWatch::server(TLS13).feed(&tls13), Ok(()));
        let tls12 = record(HANDSHAKE, &server_hello(TLS12, None));
        assert_eq!(RecordWatch::server(TLS12).feed(&tls12), Ok(()));
        assert_eq!(
            RecordWatch::server(TLS13).feed(&tls12),
            Err(Violation::UnderFloor)
        );
        let tls10 = record(HANDSHAKE, &server_hello(0x0301, None));
        assert_eq!(
            RecordWatch::server(TLS12).feed(&tls10),
            Err(Violation::UnderFloor)
        );
        // Split across records and reads.
        let hello = server_hello(0x0301, None);
        let mut split = record(HANDSHAKE, &hello[..10]);
        split.extend(record(HANDSHAKE, &hello[10..]));
        let mut watch = RecordWatch::server(TLS12);
        assert_eq!(watch.feed(&split[..7]), Ok(()));
        assert_eq!(watch.feed(&split[7..]), Err(Violation::UnderFloor));
        // Encrypted data before any ServerHello is not TLS a server sends.
        let early = record(APPLICATION_DATA, &[1; 10]);
        assert_eq!(
            RecordWatch::server(TLS12).feed(&early),
            Err(Violation::BadServerHello)
        );
        // An alert first (the server refusing) passes.
        assert_eq!(
            RecordWatch::server(TLS12).feed(&record(ALERT, &[2, 40])),
            Ok(())
        );
    }
}
