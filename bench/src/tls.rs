//! TLS for the connect scenario: a throwaway CA-less self-signed certificate for `localhost`
//! made at start (rcgen), the files cuttle's `tls:` section points at, and a client that
//! trusts exactly that certificate.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::wire::BoxIo;

/// The certificate and key files for the server.
#[derive(Debug, Clone)]
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A TLS client trusting the generated certificate.
#[derive(Clone)]
pub struct Client {
    connector: tokio_rustls::TlsConnector,
}

impl Client {
    pub async fn connect(&self, tcp: TcpStream) -> Result<BoxIo> {
        let name = ServerName::try_from("localhost")?;
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .context("TLS handshake")?;
        Ok(Box::new(tls))
    }
}

/// Server files plus the matching client.
pub struct Material {
    pub server: ServerFiles,
    pub client: Client,
    dir: PathBuf,
}

impl Drop for Material {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Generates an ECDSA P-256 certificate for `localhost` into a temporary directory.
pub fn generate() -> Result<Material> {
    let dir = std::env::temp_dir().join(format!("cuttle-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    std::fs::write(&cert, certified.cert.pem())?;
    std::fs::write(&key, certified.signing_key.serialize_pem())?;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone())?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every connect is a full handshake: the worst case, and what a fleet of devices that
    // each connect once costs (resumption would only help the same client reconnecting).
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Material {
        server: ServerFiles { cert, key },
        client: Client {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        },
        dir,
    })
}
