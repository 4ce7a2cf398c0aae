//! Reading a ClientHello without terminating the TLS it starts: the server name it asks for
//! and the highest version it offers.
//!
//! A transparent listener relays the app's own TLS untouched, so it never hands these bytes to
//! rustls; it still has to know where the handshake is going (for `server_name` rules) and
//! whether it offers anything at or above the listener's `min_tls_version`. Only the fields
//! needed for that are read (RFC 8446 §4.1.2, §4.2.1; RFC 6066 §3); every length is checked
//! against what encloses it, and anything that does not add up is [`Parsed::Invalid`].

/// The most handshake bytes a ClientHello may take (peers accept about 60 KB: many key
/// shares, a long cipher list, a padding extension).
pub const MAX_HELLO: usize = 64 * 1024;
/// The largest TLS plaintext record (RFC 8446 §5.1).
const MAX_RECORD: usize = 1 << 14;

const HANDSHAKE: u8 = 0x16;
const CLIENT_HELLO: u8 = 0x01;
const EXT_SERVER_NAME: u16 = 0;
const EXT_SUPPORTED_VERSIONS: u16 = 43;

/// TLS 1.2's version number on the wire.
pub const TLS12: u16 = 0x0303;
/// TLS 1.3's version number on the wire.
pub const TLS13: u16 = 0x0304;

/// What a ClientHello says that a relay needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The SNI host name, lowercased and without a trailing dot; `None` when absent or not a
    /// plausible DNS name.
    pub server_name: Option<String>,
    /// The highest TLS version offered (`supported_versions` when present, else
    /// `legacy_version`); 0 when `supported_versions` offers no TLS version at all.
    pub max_version: u16,
}

/// The outcome of [`parse`] on the bytes received so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A ClientHello may still follow: more bytes are needed.
    Incomplete,
    Hello(Hello),
    /// Not a well-formed ClientHello.
    Invalid,
}

/// Parses the ClientHello at the start of `bytes`: one or more handshake records carrying it.
pub fn parse(bytes: &[u8]) -> Parsed {
    // Gather the handshake message from as many records as it spans.
    let mut message = Vec::new();
    let mut rest = bytes;
    loop {
        let [kind, major, _, hi, lo, ..] = *rest else {
            return Parsed::Incomplete;
        };
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if kind != HANDSHAKE || major != 3 || len == 0 || len > MAX_RECORD {
            return Parsed::Invalid;
        }
        let Some(fragment) = rest.get(5..5 + len) else {
            // Take what has come of this record, to rule out a bad start early.
            message.extend_from_slice(&rest[5..]);
            return match first_message_len(&message) {
                Some(Err(())) => Parsed::Invalid,
                _ => Parsed::Incomplete,
            };
        };
        message.extend_from_slice(fragment);
        rest = &rest[5 + len..];
        match first_message_len(&message) {
            None => continue,
            Some(Err(())) => return Parsed::Invalid,
            Some(Ok(body_len)) if message.len() >= 4 + body_len => {
                return match client_hello(&message[4..4 + body_len]) {
                    Some(hello) => Parsed::Hello(hello),
                    None => Parsed::Invalid,
                };
            }
            Some(Ok(_)) => continue,
        }
    }
}

/// The length of the handshake message at the start of `message` once its header is in:
/// an error when it is not a ClientHello or is too large.
fn first_message_len(message: &[u8]) -> Option<Result<usize, ()>> {
    let &[kind, a, b, c, ..] = message else {
        return match message.first() {
            Some(&kind) if kind != CLIENT_HELLO => Some(Err(())),
            _ => None,
        };
    };
    let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
    if kind != CLIENT_HELLO || len > MAX_HELLO {
        return Some(Err(()));
    }
    Some(Ok(len))
}

/// Reads big-endian fields off the front of a byte slice.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length.
    pub(crate) fn vec8(&mut self) -> Option<Reader<'a>> {
        let n = self.u8()?;
        self.take(n.into()).map(Reader)
    }

    /// A vector with a two-byte length.
    pub(crate) fn vec16(&mut self) -> Option<Reader<'a>> {
        let n = self.u16()?;
        self.take(n.into()).map(Reader)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The ClientHello body (after the handshake header).
fn client_hello(body: &[u8]) -> Option<Hello> {
    let mut r = Reader(body);
    let legacy_version = r.u16()?;
    r.take(32)?; // random
    let session_id = r.vec8()?;
    if session_id.0.len() > 32 {
        return None;
    }
    let suites = r.vec16()?;
    if suites.0.is_empty() || suites.0.len() % 2 != 0 {
        return None;
    }
    if r.vec8()?.is_empty() {
        // At least the null compression method.
        return None;
    }
    let mut hello = Hello {
        server_name: None,
        max_version: legacy_version,
    };
    if r.is_empty() {
        // A hello without extensions (TLS 1.2 and earlier allow it).
        return Some(hello);
    }
    let mut extensions = r.vec16()?;
    if !r.is_empty() {
        return None;
    }
    let mut seen = Vec::new();
    while !extensions.is_empty() {
        let kind = extensions.u16()?;
        let mut data = extensions.vec16()?;
        // The same extension twice is a decode error (RFC 8446 §4.2).
        if seen.contains(&kind) {
            return None;
        }
        seen.push(kind);
        match kind {
            EXT_SERVER_NAME => hello.server_name = server_name(&mut data)?,
            EXT_SUPPORTED_VERSIONS => {
                let mut versions = data.vec8()?;
                if versions.0.is_empty() || versions.0.len() % 2 != 0 || !data.is_empty() {
                    return None;
                }
                let mut max = 0;
                while let Some(v) = versions.u16() {
                    // TLS versions only: GREASE (0x?a?a) and others are skipped.
                    if v >> 8 == 3 && v > max {
                        max = v;
                    }
                }
                hello.max_version = max;
            }
            _ => {}
        }
    }
    Some(hello)
}

/// The host name of a `server_name` extension: `Some(None)` when it names none that is a
/// plausible DNS name, `None` when it is malformed.
fn server_name(data: &mut Reader<'_>) -> Option<Option<String>> {
    let mut list = data.vec16()?;
    if !data.is_empty() {
        return None;
    }
    let mut found = None;
    while !list.is_empty() {
        let kind = list.u8()?;
        let name = list.vec16()?;
        if kind == 0 && found.is_none() {
            let name = std::str::from_utf8(name.0)
                .ok()
                .map(|n| n.strip_suffix('.').unwrap_or(n).to_ascii_lowercase());
            found = name.filter(|n| crate::policy::is_dns_name(n));
        }
    }
    Some(found)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A ClientHello body with the given extensions (type, data).
    pub(crate) fn hello_body(legacy: u16, extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&legacy.to_be_bytes());
        b.extend_from_slice(&[7; 32]);
        b.push(0); // session id
        b.extend_from_slice(&[0, 4, 0x13, 0x01, 0xc0, 0x2b]);
        b.extend_from_slice(&[1, 0]); // null compression
        let mut ext = Vec::new();
        for (kind, data) in extensions {
            ext.extend_from_slice(&kind.to_be_bytes());
            ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
            ext.extend_from_slice(data);
        }
        b.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        b.extend_from_slice(&ext);
        b
    }

    /// `body` as a ClientHello handshake message in records of at most `record` bytes.
    pub(crate) fn records(body: &[u8], record: usize) -> Vec<u8> {
        let mut message = vec![CLIENT_HELLO];
        message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend_from_slice(body);
        let mut out = Vec::new();
        for chunk in message.chunks(record) {
            out.extend_from_slice(&[HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    pub(crate) fn sni(name: &str) -> (u16, Vec<u8>) {
        let mut entry = vec![0];
        entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
        entry.extend_from_slice(name.as_bytes());
        let mut data = (entry.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&entry);
        (EXT_SERVER_NAME, data)
    }

    pub(crate) fn versions(list: &[u16]) -> (u16, Vec<u8>) {
        let mut data = vec![(list.len() * 2) as u8];
        for v in list {
            data.extend_from_slice(&v.to_be_bytes());
        }
        (EXT_SUPPORTED_VERSIONS, data)
    }

    #[test]
    fn a_tls13_hello_names_its_server_and_version() {
        let body = hello_body(
            TLS12,
            &[sni("API.Example.com."), versions(&[0x1a1a, TLS13, TLS12])],
        );
        let wire = records(&body, MAX_RECORD);
        assert_eq!(
            parse(&wire),
            Parsed::Hello(Hello {
                server_name: Some("api.example.com".into()),
                max_version: TLS13,
            })
        );
        // Every proper prefix is incomplete, never invalid.
        for cut in 0..wire.len() {
            assert_eq!(parse(&wire[..cut]), Parsed::Incomplete, "cut at {cut}");
        }
    }

    #[test]
    fn a_hello_spread_over_records_is_gathered() {
        let padding = (21, vec![0; 40_000]);
        let body = hello_body(TLS12, &[sni("a.example"), versions(&[TLS13]), padding]);
        let wire = records(&body, MAX_RECORD);
        assert!(wire.len() > 2 * MAX_RECORD);
        let Parsed::Hello(hello) = parse(&wire) else {
            panic!("not parsed")
        };
        assert_eq!(hello.server_name.as_deref(), Some("a.example"));
        let wire = records(&body, 100);
        assert!(matches!(parse(&wire), Parsed::Hello(_)));
    }

    #[test]
    fn the_version_comes_from_supported_versions_else_legacy_version() {
        let old = records(&hello_body(0x0301, &[]), MAX_RECORD);
        assert!(matches!(
            parse(&old),
            Parsed::Hello(Hello {
                max_version: 0x0301,
                ..
            })
        ));
        let none = records(&hello_body(TLS12, &[versions(&[0x0a0a])]), MAX_RECORD);
        assert!(matches!(
            parse(&none),
            Parsed::Hello(Hello { max_version: 0, .. })
        ));
    }

    #[test]
    fn malformed_hellos_are_invalid() {
        let good = hello_body(TLS12, &[sni("a.example")]);
        // Not a handshake record, not a ClientHello, a record over 2^14.
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Parsed::Invalid);
        let mut not_hello = records(&good, MAX_RECORD);
        not_hello[5] = 2;
        assert_eq!(parse(&not_hello), Parsed::Invalid);
        assert_eq!(parse(&[HANDSHAKE, 3, 1, 0x40, 0x01, 1]), Parsed::Invalid);
        // A body whose inner lengths overrun it, or leave bytes over.
        let mut short = good.clone();
        short.truncate(good.len() - 3);
        assert_eq!(parse(&records(&short, MAX_RECORD)), Parsed::Invalid);
        let mut long = good.clone();
        long.push(0);
        assert_eq!(parse(&records(&long, MAX_RECORD)), Parsed::Invalid);
        // The same extension twice.
        let twice = hello_body(TLS12, &[sni("a.example"), sni("b.example")]);
        assert_eq!(parse(&records(&twice, MAX_RECORD)), Parsed::Invalid);
        // A message over MAX_HELLO.
        let mut huge = vec![HANDSHAKE, 3, 1, 0, 4, CLIENT_HELLO];
        huge.extend_from_slice(&((MAX_HELLO + 1) as u32).to_be_bytes()[1..]);
        assert_eq!(parse(&huge), Parsed::Invalid);
    }

    #[test]
    fn an_implausible_server_name_counts_as_none() {
        let body = hello_body(TLS12, &[sni("bad name!")]);
        let Parsed::Hello(hello) = parse(&records(&body, MAX_RECORD)) else {
            panic!("not parsed")
        };
        assert_eq!(hello.server_name, None);
    }
}
