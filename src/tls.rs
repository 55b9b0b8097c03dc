//! TLS for the client listener: the certificate chain and private key of `tls.cert` /
//! `tls.key`, checked and turned into a rustls [`ServerConfig`] (aws-lc-rs, TLS 1.2 and 1.3,
//! ALPN `http/1.1`, stateless session resumption).
//!
//! The files are loaded with the rest of `proxy.yaml` — at start-up, by `cuttle check`, and on
//! every hot reload — so a missing file, a PEM without a certificate, an unsupported key or a
//! key that does not belong to the certificate is a config error naming `tls.cert` or
//! `tls.key`. A rotated certificate (cert-manager rewrites the files in place, or swaps a
//! Secret's `..data` symlink) is picked up by the same watcher as the policy; the live config
//! sits behind an `ArcSwap` in [`crate::reload::PolicyStore`], and each accepted connection
//! loads it once, so a rotation affects new connections only.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::diagnostics::Diagnostics;

/// Largest certificate or key file read. A chain of a few certificates is a few KiB.
pub const MAX_PEM_BYTES: u64 = 1 << 20;

/// The ALPN protocol offered: WebSocket upgrades (and the HTTP API) are HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// A loaded and checked certificate + key, ready to serve.
#[derive(Clone)]
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    /// SHA-256 over the bytes of both files: equal digests mean nothing changed on disk.
    pub digest: [u8; 32],
    /// SHA-256 (hex) of the leaf certificate, for logs: the digest that
    /// `openssl x509 -noout -fingerprint -sha256` prints (there in upper case, with colons).
    pub fingerprint: String,
    /// Certificates in the chain, leaf included.
    pub chain_len: usize,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("fingerprint", &self.fingerprint)
            .field("chain_len", &self.chain_len)
            .finish_non_exhaustive()
    }
}

/// Reads and checks `cert` and `key`, reporting problems under `tls.cert` / `tls.key`.
pub fn load(cert: &Path, key: &Path, diags: &mut Diagnostics) -> Option<ServerTls> {
    let cert_pem = read_pem(cert, "tls.cert", diags);
    let key_pem = read_pem(key, "tls.key", diags);
    from_pem(&cert_pem?, &key_pem?, cert, key, diags)
}

/// Builds the server config from PEM bytes; `cert` and `key` only name the files in messages.
pub fn from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert: &Path,
    key: &Path,
    diags: &mut Diagnostics,
) -> Option<ServerTls> {
    let chain = parse_chain(cert_pem, cert, diags);
    let private_key = parse_key(key_pem, key, diags);
    let (chain, private_key) = (chain?, private_key?);
    let leaf = Sha256::digest(chain.first()?.as_ref());
    let chain_len = chain.len();

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = match ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    {
        Ok(b) => b,
        Err(e) => {
            diags.error("tls", format!("cannot configure TLS: {e}"));
            return None;
        }
    };
    // rustls checks that the key loads and that its public key is the certificate's.
    let mut config = match builder
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
    {
        Ok(c) => c,
        Err(e) => {
            report_config_error(e, cert, key, diags);
            return None;
        }
    };
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    // Stateless resumption tickets (AES-256 + HMAC, keys random per process and rotated every
    // 6 h): reconnecting clients skip the full handshake without the proxy keeping per-client
    // state. A restart or a certificate rotation starts with new keys.
    match rustls::crypto::aws_lc_rs::Ticketer::new() {
        Ok(t) => config.ticketer = t,
        Err(e) => {
            diags.error("tls", format!("cannot create session ticket keys: {e}"));
            return None;
        }
    }

    let mut digest = Sha256::new();
    digest.update(Sha256::digest(cert_pem));
    digest.update(Sha256::digest(key_pem));
    Some(ServerTls {
        config: Arc::new(config),
        digest: digest.finalize().into(),
        fingerprint: hex::encode(leaf),
        chain_len,
    })
}

fn read_pem(path: &Path, field: &str, diags: &mut Diagnostics) -> Option<Vec<u8>> {
    let display = path.display();
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => {
            diags.error(field, format!("{display} is not a file"));
            return None;
        }
        Ok(m) if m.len() > MAX_PEM_BYTES => {
            diags.error(
                field,
                format!("{display} is larger than {MAX_PEM_BYTES} bytes"),
            );
            return None;
        }
        Ok(_) => {}
        Err(e) => {
            diags.error(field, format!("cannot read {display}: {e}"));
            return None;
        }
    }
    match std::fs::read(path) {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            diags.error(field, format!("cannot read {display}: {e}"));
            None
        }
    }
}

fn parse_chain(
    pem: &[u8],
    path: &Path,
    diags: &mut Diagnostics,
) -> Option<Vec<CertificateDer<'static>>> {
    let mut chain = Vec::new();
    for item in CertificateDer::pem_slice_iter(pem) {
        match item {
            Ok(c) => chain.push(c),
            Err(e) => {
                diags.error(
                    "tls.cert",
                    format!("{}: malformed PEM: {}", path.display(), pem_error(&e)),
                );
                return None;
            }
        }
    }
    if chain.is_empty() {
        diags.error(
            "tls.cert",
            format!(
                "{}: no certificate found (expected PEM `BEGIN CERTIFICATE` blocks, leaf first)",
                path.display()
            ),
        );
        return None;
    }
    Some(chain)
}

fn parse_key(pem: &[u8], path: &Path, diags: &mut Diagnostics) -> Option<PrivateKeyDer<'static>> {
    let display = path.display();
    match PrivateKeyDer::from_pem_slice(pem) {
        Ok(k) => Some(k),
        Err(pem::Error::NoItemsFound) if contains(pem, b"ENCRYPTED") => {
            diags.error(
                "tls.key",
                format!("{display}: encrypted private keys are not supported; store it unencrypted with restricted file permissions"),
            );
            None
        }
        Err(pem::Error::NoItemsFound) => {
            diags.error(
                "tls.key",
                format!("{display}: no private key found (expected PEM `BEGIN PRIVATE KEY` (PKCS#8), `BEGIN RSA PRIVATE KEY` (PKCS#1) or `BEGIN EC PRIVATE KEY` (SEC1))"),
            );
            None
        }
        Err(e) => {
            diags.error(
                "tls.key",
                format!("{display}: malformed PEM: {}", pem_error(&e)),
            );
            None
        }
    }
}

fn report_config_error(e: rustls::Error, cert: &Path, key: &Path, diags: &mut Diagnostics) {
    use rustls::{Error, InconsistentKeys};
    match e {
        Error::InconsistentKeys(InconsistentKeys::KeyMismatch) => diags.error(
            "tls.key",
            format!(
                "{} does not belong to the certificate in {} (their public keys differ)",
                key.display(),
                cert.display()
            ),
        ),
        Error::InvalidCertificate(e) => diags.error(
            "tls.cert",
            format!(
                "{}: the first certificate is not a valid X.509 certificate ({e:?})",
                cert.display()
            ),
        ),
        // The provider could not load the key: malformed DER, or an algorithm it does not
        // sign with (RSA, ECDSA P-256/P-384/P-521 and Ed25519 are supported).
        Error::General(_) => diags.error(
            "tls.key",
            format!(
                "{}: unsupported or malformed private key (RSA, ECDSA P-256/P-384/P-521 or Ed25519 expected)",
                key.display()
            ),
        ),
        e => diags.error("tls", format!("cannot use this certificate and key: {e}")),
    }
}

/// Describes a PEM error without echoing file content (a key file's lines are secret).
fn pem_error(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a section has no END line".into(),
        pem::Error::IllegalSectionStart { .. } => "a BEGIN line is malformed".into(),
        pem::Error::Base64Decode(_) => "a section is not valid base64".into(),
        pem::Error::SectionTooLarge => "a section is too large".into(),
        pem::Error::NoItemsFound => "nothing found".into(),
        e => format!("{e}"),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Reads the PEM certificates of `path` (trust anchors), reporting problems under `field`.
pub fn load_ca_file(
    path: &Path,
    field: &str,
    diags: &mut Diagnostics,
) -> Option<Vec<CertificateDer<'static>>> {
    let pem = read_pem(path, field, diags)?;
    let mut certs = Vec::new();
    for item in CertificateDer::pem_slice_iter(&pem) {
        match item {
            Ok(c) => certs.push(c),
            Err(e) => {
                diags.error(
                    field,
                    format!("{}: malformed PEM: {}", path.display(), pem_error(&e)),
                );
                return None;
            }
        }
    }
    if certs.is_empty() {
        diags.error(
            field,
            format!(
                "{}: no certificate found (expected PEM `BEGIN CERTIFICATE` blocks)",
                path.display()
            ),
        );
        return None;
    }
    Some(certs)
}

/// The TLS client configuration for `mqtts://` brokers: the system's trust store (Mozilla's
/// roots, compiled in, when the system has none — a distroless image), plus `extra` (from
/// `upstream.ca_file`, for a broker behind a private CA).
pub fn upstream_client_config(
    extra: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!(error = %e, "reading the system's trust store");
    }
    let (added, _) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    for cert in extra {
        if let Err(e) = roots.add(cert.clone()) {
            tracing::warn!(error = %e, "a certificate of upstream.ca_file is not a usable trust anchor");
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(cert: &[u8], key: &[u8]) -> String {
        let mut d = Diagnostics::new();
        let r = from_pem(cert, key, Path::new("c.pem"), Path::new("k.pem"), &mut d);
        assert!(r.is_none());
        d.to_string()
    }

    #[test]
    fn garbage_and_empty_files_name_their_field() {
        let e = errors(b"hello", b"");
        assert!(
            e.contains("error: tls.cert: c.pem: no certificate found"),
            "{e}"
        );
        assert!(
            e.contains("error: tls.key: k.pem: no private key found"),
            "{e}"
        );
        let e = errors(
            b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n",
        );
        assert!(e.contains("tls.cert: c.pem: malformed PEM: "), "{e}");
        assert!(e.contains("tls.key: k.pem: malformed PEM: "), "{e}");
    }

    #[test]
    fn encrypted_keys_are_explained() {
        let e = errors(
            b"",
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        );
        assert!(e.contains("tls.key: k.pem: encrypted private keys"), "{e}");
    }

    #[test]
    fn a_certificate_that_is_not_x509_is_a_cert_error() {
        // Valid PEM and a valid key, but the "certificate" is a few arbitrary bytes.
        let key = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ec_private.pem"),
        )
        .unwrap();
        let e = errors(
            b"-----BEGIN CERTIFICATE-----\nAQIDBA==\n-----END CERTIFICATE-----\n",
            &key,
        );
        assert!(
            e.contains("error: tls.cert: c.pem: the first certificate is not"),
            "{e}"
        );
    }
}
