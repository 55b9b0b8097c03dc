//! No secret the process holds or is shown ever reaches a log line or `Debug` output.
//!
//! One scenario, at TRACE, with every kind of secret present: the upstream MQTT password
//! (a live Mosquitto connection with username and password), the JWT HMAC secret, the session
//! secret, device tokens, a server API key, user JWTs and session tokens as clients present
//! them, wrong tokens, and a TLS private key. Every actor type connects, a bad token is
//! refused, clients publish and subscribe, the policy is reloaded (applied and rejected), and
//! the loaded settings, policy snapshot, actors, errors, frames and the CLI are formatted with
//! `{:?}` into the same log. The captured text is then searched for each secret in raw, hex,
//! base64 and byte-list form.
//!
//! A global subscriber can be set once per process, so this file holds one test.

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use clap::Parser;
use common::server::*;
use common::*;
use jsonwebtoken::EncodingKey;
use rmpv::Value;

const UPSTREAM_USER: &str = "cuttle-secrets-test";
const UPSTREAM_PASSWORD: &str = "upstream-pw-5d1c7e9a0b3f-never-logged";
const PASSWORD_ENV: &str = "CUTTLE_SECRETS_TEST_UPSTREAM_PASSWORD";
/// Written into the broker URL of a config edit, which is then rejected.
const URL_PASSWORD: &str = "url-pw-2b7e151628aed2a6";
const WRONG_TOKEN: &str = "tok-wrong-guess-8c41f0d2";

/// Everything written by the subscriber.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    /// The text written, without ANSI colour codes (which could split a value).
    fn text(&self) -> String {
        let raw = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // CSI: ESC [ parameters final-byte
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }
}

/// The proxy's own subscriber (`cuttle::logging`), at TRACE for every target, into `capture`.
fn install(capture: &Capture) {
    let capture = capture.clone();
    cuttle::logging::try_init(
        cuttle::config::LogFormat::Pretty,
        tracing_subscriber::EnvFilter::new("trace"),
        move || capture.clone(),
        false,
    )
    .expect("the only subscriber of this test binary");
}

/// The forms in which a secret could show up: as text, hex, base64, or `Debug` of its bytes.
fn forms(secret: &[u8]) -> Vec<(&'static str, String)> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut forms = vec![
        ("hex", hex::encode(secret)),
        ("HEX", hex::encode_upper(secret)),
        ("base64", b64.encode(secret)),
        ("base64url", b64url.encode(secret)),
        ("bytes", format!("{secret:?}")),
    ];
    if let Ok(text) = std::str::from_utf8(secret) {
        forms.insert(0, ("raw", text.to_string()));
    }
    forms
}

#[test]
fn no_secret_reaches_logs_or_debug_output() {
    // SAFETY: this is the only test of this binary and no other thread has started yet (the
    // runtime is built below), so nothing reads the environment concurrently. The secrets go
    // through the process environment so that reloads by the watcher read them the way the
    // proxy does in production.
    unsafe {
        std::env::set_var("JWT_SECRET", JWT_SECRET);
        std::env::set_var("SESSION_SECRET", SESSION_SECRET);
        std::env::set_var(PASSWORD_ENV, UPSTREAM_PASSWORD);
    }
    let capture = Capture::default();
    install(&capture);
    let secrets = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(scenario());

    let text = capture.text();
    // The capture proves itself: an empty or truncated log would pass the leak search.
    let expected = [
        "authenticated",
        "sensor-1",
        "alice",
        "billing",
        "actor=sess_",
        "authentication failed",
        "policy reloaded",
        "config reload rejected",
        "unknown permission",
        "only host and port are allowed",
        UPSTREAM_USER,
        "password: Some(<redacted>)",
        "token: Some(<redacted>)",
        "https://id.example.com",
        "ServerTls",
        "TRACE",
        // `log` records (tungstenite) reach the capture too.
        "DEBUG tungstenite::",
        // The upstream connection, which sends the password in every CONNECT, logged.
        "cuttle::upstream::connection",
    ];
    let missing: Vec<_> = expected.iter().filter(|e| !text.contains(*e)).collect();
    let mut leaks = Vec::new();
    for (name, secret) in &secrets {
        for (form, value) in forms(secret) {
            // Where it was: the level, target and first words of each record holding it.
            let mut sites: Vec<String> = Vec::new();
            for (at, _) in text.match_indices(&value) {
                let record = text[..at].rfind("\n20").map_or(0, |i| i + 1);
                let line = text[record..].lines().next().unwrap_or("");
                let site: String = line
                    .split_once("Z ")
                    .map_or(line, |(_, rest)| rest)
                    .chars()
                    .take(70)
                    .collect();
                if !sites.contains(&site) {
                    sites.push(site);
                }
            }
            if !sites.is_empty() {
                leaks.push(format!("{name} ({form}):\n    {}", sites.join("\n    ")));
            }
        }
    }
    assert!(
        leaks.is_empty() && missing.is_empty(),
        "{} leak(s) in {} bytes of log:\n{}\nexpected but missing: {missing:?}",
        leaks.len(),
        text.len(),
        leaks.join("\n")
    );
}

/// Runs the scenario; returns every secret it used, by name.
async fn scenario() -> Vec<(String, Vec<u8>)> {
    let mut secrets: Vec<(String, Vec<u8>)> = vec![
        ("upstream password".into(), UPSTREAM_PASSWORD.into()),
        ("JWT secret".into(), JWT_SECRET.into()),
        ("session secret".into(), SESSION_SECRET.into()),
        ("device token sensor-1".into(), SENSOR1_TOKEN.into()),
        ("device token sensor-2".into(), SENSOR2_TOKEN.into()),
        ("server key billing".into(), BILLING_KEY.into()),
        ("wrong token".into(), WRONG_TOKEN.into()),
        ("password in a broker URL".into(), URL_PASSWORD.into()),
    ];
    let broker = mosquitto_url();
    let p = start_proxy_with(
        &broker,
        &format!(", username: {UPSTREAM_USER}, password_env: {PASSWORD_ENV}"),
        "reload: { debounce_ms: 50 }",
        &cuttle::policy::process_env,
    )
    .await;
    let path = p.dir.path().join("proxy.yaml");
    let watcher = cuttle::reload::watch(p.proxy.store.clone()).expect("watcher starts");

    // Every actor type.
    let alice = hs256(&user_claims("alice"));
    let session = cuttle::auth::session_token::mint(
        &p.proxy.store.load().policy,
        &cuttle::auth::session_token::MintRequest {
            project: "demo".into(),
            ttl_s: 600,
            scope: Some("acme".into()),
            ..Default::default()
        },
        now(),
    )
    .unwrap();
    let mut device = Client::login(&p.url, SENSOR1_TOKEN).await;
    let mut other_device = Client::login(&p.url, SENSOR2_TOKEN).await;
    let mut user = Client::login(&p.url, &alice).await;
    let mut server = Client::login(&p.url, BILLING_KEY).await;
    let mut guest = Client::login(&p.url, &session).await;

    // Refused credentials: an unknown token, a JWT and a session token signed with the wrong
    // secret.
    let forged_jwt = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &user_claims("alice"),
        &EncodingKey::from_secret(OTHER_SECRET.as_bytes()),
    )
    .unwrap();
    let forged_session = format!(
        "cuttle_st_{}",
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &serde_json::json!({"iss": "cuttle-session", "aud": "demo", "sub": "sess_x",
                "iat": now(), "exp": now() + 60}),
            &EncodingKey::from_secret(OTHER_SECRET.as_bytes()),
        )
        .unwrap()
    );
    for bad in [WRONG_TOKEN, &forged_jwt, &forged_session] {
        let (_c, reply) = Client::auth(&p.url, bad).await;
        assert_eq!(
            get(&reply, "success"),
            Some(&Value::Boolean(false)),
            "{reply}"
        );
    }
    for (name, token) in [
        ("user JWT", &alice),
        ("session token", &session),
        ("forged JWT", &forged_jwt),
        ("forged session token", &forged_session),
    ] {
        secrets.push((name.into(), token.clone().into()));
        // The signature alone is enough to replay the token.
        let signature = token.rsplit('.').next().unwrap();
        secrets.push((format!("{name} signature"), signature.into()));
    }
    secrets.push(("other secret".into(), OTHER_SECRET.into()));

    // Publish and subscribe.
    device.subscribe("chat/general/messages").await;
    device.subscribe("chat/general/orders").await;
    guest.subscribe("chat/general/messages").await;
    user.publish("chat/general/messages", "hello".into()).await;
    assert_eq!(
        get(&device.frame_of("message").await, "data"),
        Some(&Value::from("hello"))
    );
    guest.frame_of("message").await;
    // The server is unscoped: it hears its own publish (echo).
    server.subscribe("chat/general/orders").await;
    server
        .publish("chat/general/orders", "order-1".into())
        .await;
    server.frame_of("message").await;
    other_device
        .publish("chat/general/messages", "hi from globex".into())
        .await;

    // A policy reload that is applied (devices lose `orders`)…
    let text = std::fs::read_to_string(&path).unwrap();
    let revoked = text.replace(
        "orders:    { device: read, server: read-write }",
        "orders:    { device: none, server: read-write }",
    );
    assert_ne!(revoked, text);
    std::fs::write(&path, &revoked).unwrap();
    watcher.trigger();
    wait_until("the reload is applied", || p.proxy.store.generation() == 2).await;
    assert_eq!(
        get_str(&device.frame_of("error").await, "topic"),
        Some("chat/general/orders")
    );
    // …and one that is rejected: an unknown permission, and credentials in the broker URL.
    let broken = revoked
        .replace("{ device: read-write, user: read-write", "{ device: bogus")
        .replace(
            &broker,
            &broker.replacen("://", &format!("://{UPSTREAM_USER}:{URL_PASSWORD}@"), 1),
        );
    assert!(broken.contains(URL_PASSWORD) && broken.contains("bogus"));
    std::fs::write(&path, &broken).unwrap();
    watcher.trigger();
    let failed = || {
        p.proxy
            .store
            .stats
            .failed
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    wait_until("the reload is rejected", || failed() >= 1).await;
    std::fs::write(&path, &revoked).unwrap();

    // Everything that holds a secret, formatted into the log.
    let loaded = cuttle::config::load(&path).unwrap_or_else(|d| panic!("{d}"));
    assert_eq!(
        loaded.settings.upstream.username.as_deref(),
        Some(UPSTREAM_USER)
    );
    tracing::info!("loaded: {loaded:?}");
    tracing::info!("loaded, pretty: {loaded:#?}");
    tracing::info!(settings = ?p.proxy.settings, "settings");
    tracing::info!(upstream = ?p.proxy.settings.upstream, "upstream settings");
    let snapshot = p.proxy.store.snapshot();
    tracing::info!("snapshot: {snapshot:?}");
    tracing::info!("policy: {:#?}", snapshot.policy);
    tracing::info!("store: {:?}, proxy: {:?}", p.proxy.store, p.proxy);
    for project in snapshot.policy.projects() {
        tracing::info!(?project.jwt, ?project.session, "project {}", project.id);
    }
    for token in [SENSOR1_TOKEN, BILLING_KEY, &alice, &session] {
        let actor = snapshot.auth.authenticate(token);
        tracing::info!(?actor, "authenticate");
    }
    for token in [WRONG_TOKEN, &forged_jwt, &forged_session] {
        let e = snapshot.auth.authenticate(token).unwrap_err();
        tracing::info!(error = %e, debug = ?e, "refused");
    }
    for token in [SENSOR1_TOKEN, &alice, &session] {
        let bytes = encode(&map(&[("type", "auth".into()), ("token", token.into())]));
        tracing::info!(frame = ?cuttle::wire::decode(&bytes), "decoded");
    }
    let cli = cuttle::cli::Cli::try_parse_from(["cuttle", "hash-token", BILLING_KEY]);
    tracing::info!(?cli, "command line");

    // A TLS key, loaded with a config and formatted the same way.
    let key_pem = tls_config(p.dir.path(), &mut secrets);
    let tls =
        cuttle::config::load(&p.dir.path().join("tls.yaml")).unwrap_or_else(|d| panic!("{d}"));
    tracing::info!("tls: {tls:?}");
    let server_tls = tls.tls.as_ref().expect("tls is configured");
    tracing::info!(?server_tls, config = ?server_tls.config, "TLS");
    secrets.push(("TLS key PEM".into(), key_pem.into()));

    drop((device, other_device, user, server, guest));
    tokio::time::sleep(Duration::from_millis(200)).await;
    secrets
}

/// Writes a self-signed certificate, its key and `tls.yaml` (the test policy with `tls`) into
/// `dir`; records the key's forms in `secrets`. Returns the key PEM.
fn tls_config(dir: &Path, secrets: &mut Vec<(String, Vec<u8>)>) -> String {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let key_pem = certified.signing_key.serialize_pem();
    std::fs::write(dir.join("tls.crt"), certified.cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), &key_pem).unwrap();
    let indented: String = policy_yaml().lines().map(|l| format!("  {l}\n")).collect();
    std::fs::write(
        dir.join("tls.yaml"),
        format!("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ntls: {{ cert: tls.crt, key: tls.key }}\npolicy:\n{indented}"),
    )
    .unwrap();
    secrets.push(("TLS key DER".into(), certified.signing_key.serialize_der()));
    for (i, line) in key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .enumerate()
    {
        secrets.push((format!("TLS key PEM line {i}"), line.into()));
    }
    key_pem
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}
