//! Development certificates with rcgen: `ciphergate certs init`, the demo, and tests.
//!
//! A throwaway CA (ECDSA P-256), a server certificate for the given names, and a client
//! certificate for mTLS. These are for trying ciphergate out, not for production.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0} exists; pass --force to overwrite")]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A certificate and its private key, PEM-encoded.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A development certificate authority.
pub struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Authority {
    /// A new CA. Its name carries a unique suffix: two CAs with one subject confuse verifiers.
    pub fn new(label: &str) -> Result<Self, CertsError> {
        let mut params = CertificateParams::default();
        let unique = OffsetDateTime::now_utc().unix_timestamp_nanos() % 1_000_000_000_000;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{label} {unique:x}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(3650);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(Authority { issuer })
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A server certificate for `names` (DNS names or IP addresses), valid for a year.
    pub fn issue_server(&self, names: &[String]) -> Result<Issued, CertsError> {
        let now = OffsetDateTime::now_utc();
        self.issue_server_valid(names, now - Duration::days(1), now + Duration::days(365))
    }

    /// A server certificate valid from `not_before` to `not_after` (tests make expired and
    /// soon-expiring ones with it).
    pub fn issue_server_valid(
        &self,
        names: &[String],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, CertsError> {
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        let common_name = names.first().map_or("ciphergate", String::as_str);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        self.issue(params)
    }

    /// A client certificate for mTLS, valid for a year.
    pub fn issue_client(&self, name: &str) -> Result<Issued, CertsError> {
        let now = OffsetDateTime::now_utc();
        self.issue_client_valid(name, now - Duration::days(1), now + Duration::days(365))
    }

    /// A client certificate valid from `not_before` to `not_after`.
    pub fn issue_client_valid(
        &self,
        name: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, CertsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        self.issue(params)
    }

    fn issue(&self, mut params: CertificateParams) -> Result<Issued, CertsError> {
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The names a server certificate gets when none are given.
pub fn default_names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
}

/// Writes `ca.crt`, `ca.key`, `server.crt`, `server.key`, `client.crt` and `client.key` into
/// `dir`. Refuses to overwrite any of them unless `force`; checks all before writing any.
/// `days` is how long the server and client certificates are valid from now (the CA: ten
/// years).
pub fn init(
    dir: &Path,
    names: &[String],
    days: u32,
    force: bool,
) -> Result<Vec<PathBuf>, CertsError> {
    let files = [
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
        "client.crt",
        "client.key",
    ]
    .map(|f| dir.join(f));
    if !force && let Some(existing) = files.iter().find(|p| p.exists()) {
        return Err(CertsError::Exists(existing.clone()));
    }
    let ca = Authority::new("ciphergate development CA")?;
    let now = OffsetDateTime::now_utc();
    let (not_before, not_after) = (now - Duration::hours(1), now + Duration::days(days.into()));
    let server = ca.issue_server_valid(names, not_before, not_after)?;
    let client = ca.issue_client_valid("ciphergate development client", not_before, not_after)?;
    fs::create_dir_all(dir).map_err(|source| CertsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let contents = [
        (ca.cert_pem(), false),
        (ca.key_pem(), true),
        (server.cert_pem, false),
        (server.key_pem, true),
        (client.cert_pem, false),
        (client.key_pem, true),
    ];
    for (path, (pem, secret)) in files.iter().zip(contents) {
        write_file(path, pem.as_bytes(), secret).map_err(|source| CertsError::Write {
            path: path.clone(),
            source,
        })?;
    }
    Ok(files.to_vec())
}

/// Writes a file; private keys are created readable by the owner only.
pub fn write_file(path: &Path, contents: &[u8], secret: bool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if secret {
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)
}
