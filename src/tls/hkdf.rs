//! TLS 1.3's key schedule with each HMAC key prepared once.
//!
//! The aws-lc-rs provider's HKDF starts every expansion from the raw key: HMAC's inner and
//! outer hash states are computed again for each derived secret, and a secret made by
//! `extract` is re-extracted on every expansion from it. A full handshake derives about twenty
//! secrets that way. rustls's own [`HkdfUsingHmac`] builds the same HKDF from an HMAC whose key
//! is prepared once per secret; this module gives it aws-lc-rs's HMAC, and swaps it into the
//! provider's TLS 1.3 suites. The ciphers, hashes and bytes on the wire are unchanged.

use rustls::SupportedCipherSuite;
use rustls::crypto::CryptoProvider;
use rustls::crypto::hash::HashAlgorithm;
use rustls::crypto::hmac::{Hmac, Key, Tag};
use rustls::crypto::tls13::{Hkdf, HkdfUsingHmac};
use rustls::{CipherSuiteCommon, Tls13CipherSuite};

use aws_lc_rs::hmac;

/// aws-lc-rs's HMAC for one hash function.
struct AwsLcHmac(hmac::Algorithm);

/// A key whose inner and outer hash states aws-lc has computed once; each tag copies them.
struct PreparedKey(hmac::Key);

impl Hmac for AwsLcHmac {
    fn with_key(&self, key: &[u8]) -> Box<dyn Key> {
        Box::new(PreparedKey(hmac::Key::new(self.0, key)))
    }

    fn hash_output_len(&self) -> usize {
        self.0.digest_algorithm().output_len()
    }

    fn fips(&self) -> bool {
        aws_lc_rs::try_fips_mode().is_ok()
    }
}

impl Key for PreparedKey {
    fn sign_concat(&self, first: &[u8], middle: &[&[u8]], last: &[u8]) -> Tag {
        let mut context = hmac::Context::with_key(&self.0);
        context.update(first);
        for part in middle {
            context.update(part);
        }
        context.update(last);
        Tag::new(context.sign().as_ref())
    }

    fn tag_len(&self) -> usize {
        self.0.algorithm().digest_algorithm().output_len()
    }
}

static HMAC_SHA256: AwsLcHmac = AwsLcHmac(hmac::HMAC_SHA256);
static HMAC_SHA384: AwsLcHmac = AwsLcHmac(hmac::HMAC_SHA384);
static HKDF_SHA256: HkdfUsingHmac<'static> = HkdfUsingHmac(&HMAC_SHA256);
static HKDF_SHA384: HkdfUsingHmac<'static> = HkdfUsingHmac(&HMAC_SHA384);

/// The HKDF for a suite's hash, if this module has one.
fn hkdf_for(hash: HashAlgorithm) -> Option<&'static dyn Hkdf> {
    match hash {
        HashAlgorithm::SHA256 => Some(&HKDF_SHA256),
        HashAlgorithm::SHA384 => Some(&HKDF_SHA384),
        _ => None,
    }
}

/// `provider` with every TLS 1.3 suite's HKDF replaced; TLS 1.2 suites and the order are kept.
/// Called once per process (the suites are leaked: three small structs).
pub fn with_prepared_hmac(mut provider: CryptoProvider) -> CryptoProvider {
    for suite in &mut provider.cipher_suites {
        let SupportedCipherSuite::Tls13(tls13) = *suite else {
            continue;
        };
        let Some(hkdf) = hkdf_for(tls13.common.hash_provider.algorithm()) else {
            continue;
        };
        let replaced: &'static Tls13CipherSuite = Box::leak(Box::new(Tls13CipherSuite {
            common: CipherSuiteCommon {
                suite: tls13.common.suite,
                hash_provider: tls13.common.hash_provider,
                confidentiality_limit: tls13.common.confidentiality_limit,
            },
            hkdf_provider: hkdf,
            aead_alg: tls13.aead_alg,
            quic: tls13.quic,
        }));
        *suite = SupportedCipherSuite::Tls13(replaced);
    }
    provider
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::hkdf;

    /// The suite identifiers in `provider`, in order.
    fn suites(provider: &CryptoProvider) -> Vec<rustls::CipherSuite> {
        provider.cipher_suites.iter().map(|s| s.suite()).collect()
    }

    /// Expands `len` bytes of `info` from `secret` (extracted with `salt`) both ways.
    fn both_ways(
        ours: &dyn Hkdf,
        theirs: hkdf::Algorithm,
        salt: &[u8],
        secret: &[u8],
        info: &[u8],
        len: usize,
    ) -> (Vec<u8>, Vec<u8>) {
        let mut mine = vec![0; len];
        ours.extract_from_secret(Some(salt), secret)
            .expand_slice(&[info], &mut mine)
            .expect("length within HKDF's limit");

        struct Len(usize);
        impl hkdf::KeyType for Len {
            fn len(&self) -> usize {
                self.0
            }
        }
        let mut reference = vec![0; len];
        hkdf::Salt::new(theirs, salt)
            .extract(secret)
            .expand(&[info], Len(len))
            .and_then(|okm| okm.fill(&mut reference))
            .expect("length within HKDF's limit");
        (mine, reference)
    }

    #[test]
    fn rfc5869_case_1() {
        // RFC 5869, A.1: SHA-256, 22-byte IKM, 13-byte salt, 10-byte info, 42-byte OKM.
        let ikm = [0x0b; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let mut okm = [0; 42];
        HKDF_SHA256
            .extract_from_secret(Some(&salt), &ikm)
            .expand_slice(&[&info], &mut okm)
            .unwrap();
        let expected = "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf\
                        34007208d5b887185865";
        let hex: String = okm.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, expected);
    }

    #[test]
    fn same_bytes_as_aws_lc_hkdf_for_both_hashes_and_lengths() {
        for len in [1, 32, 48, 64, 100, 255] {
            let (ours, reference) = both_ways(
                &HKDF_SHA384,
                hkdf::HKDF_SHA384,
                b"salt",
                b"input key material",
                b"tls13 derived",
                len,
            );
            assert_eq!(ours, reference, "SHA-384, {len} bytes");
            let (ours, reference) = both_ways(
                &HKDF_SHA256,
                hkdf::HKDF_SHA256,
                b"",
                b"ikm",
                b"tls13 key",
                len,
            );
            assert_eq!(ours, reference, "SHA-256, {len} bytes");
        }
    }

    #[test]
    fn hmac_sign_matches_aws_lc() {
        let key = rustls::crypto::tls13::OkmBlock::new(&[7; 48]);
        let tag = HKDF_SHA384.hmac_sign(&key, b"finished");
        let reference = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA384, &[7; 48]), b"finished");
        assert_eq!(tag.as_ref(), reference.as_ref());
    }

    #[test]
    fn every_tls13_suite_is_replaced_and_the_order_kept() {
        let original = rustls::crypto::aws_lc_rs::default_provider();
        let before = suites(&original);
        let replaced = with_prepared_hmac(rustls::crypto::aws_lc_rs::default_provider());
        assert_eq!(suites(&replaced), before);
        let mut tls13 = 0;
        for (old, new) in original.cipher_suites.iter().zip(&replaced.cipher_suites) {
            match (old, new) {
                (SupportedCipherSuite::Tls13(old), SupportedCipherSuite::Tls13(new)) => {
                    tls13 += 1;
                    assert!(!std::ptr::addr_eq(old.hkdf_provider, new.hkdf_provider));
                    assert!(std::ptr::addr_eq(old.aead_alg, new.aead_alg));
                }
                (old, new) => assert!(old == new, "TLS 1.2 suites are kept as they are"),
            }
        }
        assert_eq!(tls13, 3);
    }
}
