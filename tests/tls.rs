//! TLS on the client listener: certificates made at test time with rcgen (a CA and server
//! certificates for `localhost`), the real proxy in-process, and a tokio-tungstenite client
//! over tokio-rustls that trusts only the test CA. Covers `wss://` pub/sub, a `ws://` client
//! on the TLS port, the plain admin port, the handshake deadline, certificate rotation through
//! the file watcher (and rejected rotations), `cuttle check` on bad certificates and keys,
//! and every key encoding.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::server::*;
use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData,
};
use rmpv::Value;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ProtocolVersion, RootCertStore, SupportedProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A test certificate authority.
struct Pki {
    ca: CertificateDer<'static>,
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A server certificate (chain: leaf, then the CA) and its key, as PEM.
struct ServerCert {
    leaf: CertificateDer<'static>,
    chain_pem: String,
    key_pem: String,
}

impl Pki {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "cuttle test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Self {
            ca: cert.der().clone(),
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `localhost` and 127.0.0.1 with a new ECDSA P-256 key.
    fn server_cert(&self, name: &str) -> ServerCert {
        let key = KeyPair::generate().unwrap();
        let mut cert = self.certify(name, &key);
        cert.key_pem = key.serialize_pem();
        cert
    }

    /// A certificate for `public` (the key stays with the caller: `key_pem` is empty).
    fn certify(&self, name: &str, public: &impl PublicKeyData) -> ServerCert {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(public, &self.issuer).unwrap();
        ServerCert {
            leaf: cert.der().clone(),
            chain_pem: format!("{}{}", cert.pem(), self.ca_pem),
            key_pem: String::new(),
        }
    }

    fn client_config(&self, versions: &[&'static SupportedProtocolVersion]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        let mut c = ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(c)
    }

    fn client(&self) -> Arc<ClientConfig> {
        self.client_config(rustls::ALL_VERSIONS)
    }
}

/// Writes `cert` to `tls.crt` / `tls.key` in `dir` in place (no rename), key first.
fn install(dir: &Path, cert: &ServerCert) -> (PathBuf, PathBuf) {
    let (c, k) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&k, &cert.key_pem).unwrap();
    std::fs::write(&c, &cert.chain_pem).unwrap();
    (c, k)
}

fn tls_yaml(cert: &Path, key: &Path) -> String {
    format!(
        "tls: {{ cert: \"{}\", key: \"{}\" }}\n",
        cert.display(),
        key.display()
    )
}

fn listen_addr(p: &TestProxy) -> SocketAddr {
    p.url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .parse()
        .unwrap()
}

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// The leaf certificate a new TLS connection is served with.
async fn served_leaf(addr: SocketAddr, config: Arc<ClientConfig>) -> CertificateDer<'static> {
    let tls = tls_connect(addr, config).await.expect("TLS handshake");
    tls.get_ref()
        .1
        .peer_certificates()
        .expect("server sent a certificate")[0]
        .clone()
        .into_owned()
}

/// A `wss://` client: TLS with `config`, then the WebSocket upgrade.
async fn wss_client(addr: SocketAddr, config: Arc<ClientConfig>) -> Client<TlsStream<TcpStream>> {
    let tls = tls_connect(addr, config).await.expect("TLS handshake");
    let url = format!("wss://localhost:{}/ws", addr.port());
    let (ws, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("websocket upgrade over TLS");
    Client::from_ws(ws)
}

async fn wss_login(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    token: &str,
) -> Client<TlsStream<TcpStream>> {
    let mut c = wss_client(addr, config).await;
    let reply = c.authenticate(token).await;
    assert_eq!(
        get(&reply, "success"),
        Some(&Value::Boolean(true)),
        "{reply}"
    );
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_serves_pub_sub_and_refuses_plain_ws() {
    let pki = Pki::new();
    let certs = tempfile::tempdir().unwrap();
    let server = pki.server_cert("cuttle one");
    let (cert, key) = install(certs.path(), &server);
    let p = start_proxy(TestBroker::Embedded, &tls_yaml(&cert, &key)).await;
    let addr = listen_addr(&p);

    // The handshake: TLS 1.3 by default, ALPN http/1.1, the configured chain.
    let tls = tls_connect(addr, pki.client())
        .await
        .expect("TLS handshake");
    let conn = tls.get_ref().1;
    assert_eq!(conn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    assert_eq!(conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    let chain = conn.peer_certificates().unwrap();
    assert_eq!(chain.len(), 2, "leaf and CA, as in the file");
    assert_eq!(chain[0], server.leaf);
    drop(tls);

    // Publish on one wss:// connection, receive on another.
    let client = pki.client();
    let mut sub = wss_login(addr, client.clone(), SENSOR1_TOKEN).await;
    let mut publisher = wss_login(addr, pki.client(), SENSOR1_TOKEN).await;
    let reply = sub.subscribe("chat/general/messages").await;
    assert_eq!(get_str(&reply, "type"), Some("subscribed"), "{reply}");
    publisher
        .publish("chat/general/messages", map(&[("text", "over tls".into())]))
        .await;
    let msg = sub.frame_of("message").await;
    assert_eq!(get_str(&msg, "topic"), Some("chat/general/messages"));
    assert_eq!(
        get_str(get(&msg, "data").unwrap(), "text"),
        Some("over tls")
    );

    // The client resumes its session (stateless tickets) on its next connection.
    let resumed = tls_connect(addr, client).await.expect("TLS handshake");
    assert_eq!(
        resumed.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    drop(resumed);

    // TLS 1.2 clients are served too.
    let tls12 = pki.client_config(&[&rustls::version::TLS12]);
    let tls = tls_connect(addr, tls12.clone())
        .await
        .expect("TLS 1.2 handshake");
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(ProtocolVersion::TLSv1_2)
    );
    drop(tls);
    let mut old = wss_login(addr, tls12, SENSOR2_TOKEN).await;
    old.send(map(&[
        ("type", "subscribe".into()),
        ("topic", "chat/general/messages".into()),
    ]))
    .await;
    assert_eq!(get_str(&old.frame().await, "type"), Some("subscribed"));

    // A ws:// client on the wss:// port gets an HTTP answer saying so, not a session.
    match tokio_tungstenite::connect_async(&p.url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 400);
            let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default());
            assert!(body.contains("speaks TLS"), "{body}");
        }
        Err(e) => panic!("expected an HTTP 400, got {e}"),
        Ok(_) => panic!("a plain ws:// client was served on the TLS port"),
    }

    // A client that does not trust the certificate fails its handshake…
    let other = Pki::new();
    assert!(tls_connect(addr, other.client()).await.is_err());
    // …and the admin port stays plain HTTP.
    let mut admin = TcpStream::connect(p.admin).await.unwrap();
    admin
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    admin.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The earlier sessions were not disturbed by any of it.
    publisher
        .publish(
            "chat/general/messages",
            map(&[("text", "still here".into())]),
        )
        .await;
    let msg = sub.frame_of("message").await;
    assert_eq!(
        get_str(get(&msg, "data").unwrap(), "text"),
        Some("still here")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_handshake_counts_against_the_handshake_timeout() {
    let pki = Pki::new();
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = install(certs.path(), &pki.server_cert("cuttle"));
    let extra = format!(
        "{}limits: {{ handshake_timeout_ms: 500 }}\n",
        tls_yaml(&cert, &key)
    );
    let p = start_proxy(TestBroker::Embedded, &extra).await;
    let addr = listen_addr(&p);

    // A client that connects and says nothing, and one that stops after a TLS record header.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();
    // Neither holds up anyone else.
    let mut c = wss_login(addr, pki.client(), SENSOR1_TOKEN).await;
    // Both are closed once the deadline passes.
    for s in [&mut silent, &mut stalled] {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .expect("closed by the handshake deadline");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
    // The authenticated session outlives the handshake deadline.
    tokio::time::sleep(Duration::from_millis(600)).await;
    c.send(map(&[
        ("type", "subscribe".into()),
        ("topic", "chat/general/messages".into()),
    ]))
    .await;
    assert_eq!(get_str(&c.frame().await, "type"), Some("subscribed"));
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_serve_new_connections_and_bad_ones_are_rejected() {
    let pki = Pki::new();
    let certs = tempfile::tempdir().unwrap();
    let first = pki.server_cert("first");
    let (cert, key) = install(certs.path(), &first);
    let extra = format!("{}reload: {{ debounce_ms: 50 }}\n", tls_yaml(&cert, &key));
    let p = start_proxy(TestBroker::Embedded, &extra).await;
    let store = p.proxy.store.clone();
    assert!(store.sources().tls_files.contains(&cert));
    let _watcher = cuttle::reload::watch(store.clone()).unwrap();
    let addr = listen_addr(&p);
    assert_eq!(served_leaf(addr, pki.client()).await, first.leaf);

    let mut sub = wss_login(addr, pki.client(), SENSOR1_TOKEN).await;
    sub.subscribe("chat/general/messages").await;

    // cert-manager rewrites both files in place.
    let second = pki.server_cert("second");
    install(certs.path(), &second);
    wait_for("the second certificate", async || {
        served_leaf(addr, pki.client()).await == second.leaf
    })
    .await;
    assert_eq!(store.stats.tls_rotated.load(Ordering::Relaxed), 1);
    assert_eq!(store.generation(), 1, "a certificate is not a new policy");
    assert_eq!(store.tls().unwrap().chain_len, 2);

    // The session from before the rotation is untouched: it still receives.
    let mut publisher = wss_login(addr, pki.client(), SENSOR1_TOKEN).await;
    publisher
        .publish("chat/general/messages", map(&[("n", 1.into())]))
        .await;
    assert_eq!(
        get(&sub.frame_of("message").await, "data"),
        Some(&map(&[("n", 1.into())]))
    );

    // A garbage certificate is rejected and counted; the second one keeps serving.
    let failed = store.stats.failed.load(Ordering::Relaxed);
    std::fs::write(&cert, "not a certificate\n").unwrap();
    wait_for("the rejection", async || {
        store.stats.failed.load(Ordering::Relaxed) > failed
    })
    .await;
    assert_eq!(served_leaf(addr, pki.client()).await, second.leaf);

    // So is a certificate whose key was not (yet) replaced.
    let third = pki.server_cert("third");
    let failed = store.stats.failed.load(Ordering::Relaxed);
    std::fs::write(&cert, &third.chain_pem).unwrap();
    wait_for("the rejection", async || {
        store.stats.failed.load(Ordering::Relaxed) > failed
    })
    .await;
    assert_eq!(served_leaf(addr, pki.client()).await, second.leaf);
    match store.reload_blocking(&test_env) {
        cuttle::reload::ReloadOutcome::Rejected(d) => {
            let d = d.to_string();
            assert!(d.contains("error: tls.key: "), "{d}");
            assert!(d.contains("does not belong to the certificate"), "{d}");
        }
        other => panic!("{other:?}"),
    }

    // The key arrives: the third certificate is served.
    std::fs::write(&key, &third.key_pem).unwrap();
    wait_for("the third certificate", async || {
        served_leaf(addr, pki.client()).await == third.leaf
    })
    .await;
    assert_eq!(store.stats.tls_rotated.load(Ordering::Relaxed), 2);
    assert_eq!(store.generation(), 1);
    publisher
        .publish("chat/general/messages", map(&[("n", 2.into())]))
        .await;
    assert_eq!(
        get(&sub.frame_of("message").await, "data"),
        Some(&map(&[("n", 2.into())]))
    );
}

#[test]
fn a_broken_policy_does_not_hold_back_a_rotated_certificate() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let first = pki.server_cert("first");
    let (cert, key) = install(dir.path(), &first);
    let config = dir.path().join("proxy.yaml");
    let policy = "policy:\n  projects:\n    - id: demo\n";
    std::fs::write(&config, format!("{}{policy}", tls_yaml(&cert, &key))).unwrap();
    let loaded = cuttle::config::load_with_env(&config, &test_env).unwrap();
    let store = cuttle::reload::PolicyStore::new(loaded);
    assert_eq!(store.tls().unwrap().fingerprint, fingerprint(&first.leaf));

    // Unchanged files: nothing happens.
    assert!(matches!(
        store.reload_blocking(&test_env),
        cuttle::reload::ReloadOutcome::Unchanged
    ));
    // Someone breaks the policy while the certificate rotates.
    let second = pki.server_cert("second");
    install(dir.path(), &second);
    std::fs::write(
        &config,
        format!(
            "{}policy:\n  projects:\n    - id: BAD\n",
            tls_yaml(&cert, &key)
        ),
    )
    .unwrap();
    assert!(matches!(
        store.reload_blocking(&test_env),
        cuttle::reload::ReloadOutcome::Rejected(_)
    ));
    assert_eq!(store.stats.tls_rotated.load(Ordering::Relaxed), 1);
    assert_eq!(store.tls().unwrap().fingerprint, fingerprint(&second.leaf));
    // A rotation alone is reported as such.
    std::fs::write(&config, format!("{}{policy}", tls_yaml(&cert, &key))).unwrap();
    let third = pki.server_cert("third");
    install(dir.path(), &third);
    assert!(matches!(
        store.reload_blocking(&test_env),
        cuttle::reload::ReloadOutcome::TlsRotated
    ));
}

fn check(dir: &Path, cert: &Path, key: &Path) -> (Option<i32>, String) {
    let config = dir.join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "{}policy:\n  projects:\n    - id: demo\n",
            tls_yaml(cert, key)
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cuttle"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cuttle_check_names_tls_cert_and_tls_key() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = pki.server_cert("a");
    let b = pki.server_cert("b");
    let (cert, key) = install(d, &a);
    assert_eq!(check(d, &cert, &key).0, Some(0));

    // A key that belongs to another certificate.
    let other_key = d.join("other.key");
    std::fs::write(&other_key, &b.key_pem).unwrap();
    let (code, stderr) = check(d, &cert, &other_key);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("error: tls.key: "), "{stderr}");
    assert!(
        stderr.contains("does not belong to the certificate"),
        "{stderr}"
    );

    // Garbage where the certificate and the key should be.
    let garbage = d.join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let (code, stderr) = check(d, &garbage, &key);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("error: tls.cert: "), "{stderr}");
    assert!(stderr.contains("garbage.pem: malformed PEM"), "{stderr}");
    let text = d.join("text.pem");
    std::fs::write(&text, "hello\n").unwrap();
    let (code, stderr) = check(d, &text, &text);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("error: tls.cert: ") && stderr.contains("no certificate found"),
        "{stderr}"
    );
    assert!(
        stderr.contains("error: tls.key: ") && stderr.contains("no private key found"),
        "{stderr}"
    );
    assert!(stderr.contains("2 error(s)"), "{stderr}");

    // The certificate file given as the key: a clear message, not a parse error.
    let (code, stderr) = check(d, &cert, &cert);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("error: tls.key: ") && stderr.contains("no private key found"),
        "{stderr}"
    );
    // A missing file.
    let (_, stderr) = check(d, &d.join("nope.crt"), &key);
    assert!(
        stderr.contains("error: tls.cert: cannot read ") && stderr.contains("nope.crt"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkcs8_pkcs1_sec1_and_ed25519_keys_serve() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let cases = [
        ("ecdsa p-256, pkcs#8", pki.server_cert("pkcs8")),
        ("rsa, pkcs#1", {
            let mut c = pki.certify("pkcs1", &public("rsa_private.pem"));
            c.key_pem = fixture_text("rsa_private_pkcs1.pem");
            c
        }),
        ("ecdsa p-256, sec1", {
            let mut c = pki.certify("sec1", &public("ec_private.pem"));
            c.key_pem = fixture_text("ec_private_sec1.pem");
            c
        }),
        ("ed25519, pkcs#8", {
            let mut c = pki.certify("ed25519", &ed);
            c.key_pem = ed.serialize_pem();
            c
        }),
    ];
    for (what, server) in cases {
        let (cert, key) = install(dir.path(), &server);
        let mut d = cuttle::diagnostics::Diagnostics::new();
        let tls = cuttle::tls::load(&cert, &key, &mut d).unwrap_or_else(|| panic!("{what}: {d}"));
        // A handshake proves the key signs for the certificate.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
        let server_side = tokio::spawn(async move {
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.unwrap();
                acceptor.accept(tcp).await?;
            }
            std::io::Result::Ok(())
        });
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let leaf = served_leaf(addr, pki.client_config(&[version])).await;
            assert_eq!(leaf, server.leaf, "{what} {version:?}");
        }
        server_side
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
}

fn fingerprint(der: &CertificateDer<'_>) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der.as_ref()))
}

fn fixture_text(name: &str) -> String {
    String::from_utf8(fixture(name)).unwrap()
}

/// The key pair of a PKCS#8 fixture, whose public half a certificate is issued for.
fn public(name: &str) -> KeyPair {
    KeyPair::from_pem(&fixture_text(name)).unwrap()
}

/// The upstream over TLS (`mqtts://`) to a broker behind a private CA (`upstream.ca_file`): a
/// TLS terminator in the test, in front of Mosquitto, with a certificate of the test CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_speaks_tls_to_a_broker_behind_a_private_ca() {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let pki = Pki::new();
    let cert = pki.server_cert("broker");
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert.chain_pem.as_bytes())
            .map(|c| c.unwrap())
            .collect();
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let broker = mosquitto_url().trim_start_matches("mqtt://").to_string();
    let handshakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = handshakes.clone();
    let terminator = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, broker, counted) = (acceptor.clone(), broker.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Ok(mut plain) = TcpStream::connect(&broker).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("broker-ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let p = start_proxy_with(
        &format!("mqtts://127.0.0.1:{port}"),
        &format!(", ca_file: {}", ca.display()),
        "",
        &test_env,
    )
    .await;
    assert_eq!(
        handshakes.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "both pool connections came through TLS"
    );
    let mut sub = Client::login(&p.url, SENSOR1_TOKEN).await;
    sub.subscribe("chat/general/messages").await;
    let mut publ = Client::login(&p.url, &hs256(&user_claims("alice"))).await;
    publ.publish("chat/general/messages", "over tls".into())
        .await;
    assert_eq!(
        get(&sub.frame_of("message").await, "data"),
        Some(&Value::from("over tls"))
    );
    terminator.abort();
}
