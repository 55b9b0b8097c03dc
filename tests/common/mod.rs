//! Shared fixtures for the integration tests: a policy covering every actor type and key
//! family, secrets supplied without touching the process environment, and token minting.
#![allow(dead_code)] // each test binary uses a different subset

pub mod server;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cuttle::auth::{AuthCacheSettings, Authenticator};
use cuttle::diagnostics::Diagnostics;
use cuttle::policy::spec::PolicySpec;
use cuttle::policy::{CompileContext, Policy, compile};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

pub const JWT_SECRET: &str = "test-jwt-secret-0123456789abcdef-0123456789";
pub const SESSION_SECRET: &str = "test-session-secret-0123456789abcdef-01234";
/// A Standard Webhooks secret (`whsec_` + base64 of 32 bytes), in `WEBHOOK_SECRET`.
pub const WEBHOOK_SECRET: &str = "whsec_dGVzdC13ZWJob29rLXNlY3JldC0wMTIzNDU2Nzg5YWI=";
pub const OTHER_SECRET: &str = "another-secret-entirely-0123456789abcdef-xyz";

pub const SENSOR1_TOKEN: &str = "tok-sensor-1";
pub const SENSOR2_TOKEN: &str = "tok-sensor-2";
/// An unscoped device.
pub const SENSOR0_TOKEN: &str = "tok-sensor-0";
pub const BILLING_KEY: &str = "key-billing";
pub const OPS_KEY: &str = "key-ops";
/// A server actor granted every scope (`scopes: "*"`).
pub const HUB_KEY: &str = "key-hub";
/// A server actor in scope acme, with no grants.
pub const ACME_BOT_KEY: &str = "key-acme-bot";

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(name)).expect("fixture exists")
}

/// Copies the public-key fixtures the test policy names into `dir` (next to a config file).
pub fn copy_key_fixtures(dir: &Path) {
    for f in [
        "rsa_public.pem",
        "rsa2_public.pem",
        "ec_public.pem",
        "ed_public.pem",
    ] {
        std::fs::copy(fixtures().join(f), dir.join(f)).expect("fixture copies");
    }
}

pub fn sha(token: &str) -> String {
    hex::encode(cuttle::auth::sha256(token))
}

/// The test policy (the content under `policy:`).
pub fn policy_yaml() -> String {
    format!(
        r#"
projects:
  - id: demo
    jwt: {{ issuer: https://id.example.com, audience: cuttle, algorithms: [HS256, HS384], secret_env: JWT_SECRET }}
    session: {{ secret_env: SESSION_SECRET, max_ttl_s: 3600 }}
    scopes: [ {{ slug: acme, name: Acme }}, {{ slug: globex }} ]
    roles:
      moderator: {{ analytics: read }}
      auditor: {{ chat/orders: read }}
    apps:
      - slug: chat
        topics:
          messages:  {{ device: read-write, user: read-write, session: read }}
          orders:    {{ device: read, server: read-write }}
          analytics: {{ user: none, server: write }}
          telemetry: {{ device: write, server: read }}
        rooms:
          - slug: general
          - slug: lobby
          - slug: vip
            actors: [alice, billing]
        lobbies:
          - {{ slug: hall, rooms: [general, lobby, vip] }}
    actors:
      - {{ id: alice, type: user, scope: acme }}
      - {{ id: bob, type: user }}
      - {{ id: sensor-1, type: device, token_sha256: "{s1}", scope: acme }}
      - {{ id: sensor-2, type: device, token_sha256: "{s2}", scope: globex }}
      - {{ id: sensor-0, type: device, token_sha256: "{s0}" }}
      - {{ id: billing, type: server, api_key_sha256: "{billing}", scopes: [acme] }}
      - {{ id: hub, type: server, api_key_sha256: "{hub}", scopes: "*" }}
      - {{ id: acme-bot, type: server, api_key_sha256: "{acme_bot}", scope: acme }}
  - id: rsa
    jwt:
      issuer: https://rsa.example.com
      audience: cuttle
      algorithms: [RS256]
      keys:
        - {{ kid: k1, public_key_file: rsa_public.pem }}
        - {{ kid: k2, public_key_file: rsa2_public.pem }}
    apps:
      - slug: ops
        topics: {{ jobs: {{ user: read }} }}
        rooms: [ {{ slug: main }} ]
    actors:
      - {{ id: ops-bot, type: server, api_key_sha256: "{ops}" }}
  - id: ec
    jwt: {{ issuer: https://ec.example.com, audience: cuttle, algorithms: [ES256], public_key_file: ec_public.pem }}
  - id: ed
    jwt: {{ issuer: https://ed.example.com, audience: cuttle, algorithms: [EdDSA], public_key_file: ed_public.pem, scope_claim: tenant, roles_claim: groups }}
"#,
        s1 = sha(SENSOR1_TOKEN),
        s2 = sha(SENSOR2_TOKEN),
        s0 = sha(SENSOR0_TOKEN),
        billing = sha(BILLING_KEY),
        hub = sha(HUB_KEY),
        acme_bot = sha(ACME_BOT_KEY),
        ops = sha(OPS_KEY),
    )
}

/// The test policy with `webhooks` (YAML list items, each on one line) in project `demo`.
pub fn policy_yaml_with_webhooks(webhooks: &[String]) -> String {
    let mut block = String::from("    webhooks:\n");
    for w in webhooks {
        block.push_str(&format!("      - {w}\n"));
    }
    let policy = policy_yaml();
    let at = policy
        .find("  - id: rsa")
        .expect("the test policy has project rsa");
    format!("{}{block}{}", &policy[..at], &policy[at..])
}

/// A loopback port free right now (for a process that must be told its port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn test_env(var: &str) -> Option<String> {
    let vars: HashMap<&str, &str> = [
        ("JWT_SECRET", JWT_SECRET),
        ("SESSION_SECRET", SESSION_SECRET),
        ("WEBHOOK_SECRET", WEBHOOK_SECRET),
    ]
    .into();
    vars.get(var).map(|v| v.to_string())
}

/// Compiles policy YAML (the content under `policy:`) with the test secrets.
pub fn try_compile(yaml: &str) -> Result<Policy, Diagnostics> {
    try_compile_with_env(yaml, &test_env)
}

pub fn try_compile_with_env(
    yaml: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Policy, Diagnostics> {
    let mut diags = Diagnostics::new();
    let spec: PolicySpec =
        cuttle::config::parse_yaml(yaml, "policy", &mut diags).ok_or_else(|| diags.clone())?;
    let dir = fixtures();
    let cx = CompileContext::new(&dir, env);
    compile(&spec, "policy", &cx, &mut diags).ok_or(diags)
}

pub fn policy() -> Arc<Policy> {
    Arc::new(try_compile(&policy_yaml()).unwrap_or_else(|d| panic!("test policy invalid:\n{d}")))
}

pub fn authenticator() -> Authenticator {
    Authenticator::new(policy(), AuthCacheSettings::default())
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Standard valid claims for the demo project, to be modified by each test.
pub fn user_claims(sub: &str) -> Value {
    json!({
        "iss": "https://id.example.com",
        "aud": "cuttle",
        "sub": sub,
        "iat": now(),
        "exp": now() + 600,
    })
}

pub fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).expect("encode")
}

pub fn hs256(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
        claims,
    )
}

pub fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&fixture("rsa_private.pem")).expect("rsa key")
}

pub fn rsa2_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&fixture("rsa2_private.pem")).expect("rsa key")
}

/// Builds an unsigned token from raw header and payload JSON (for `alg: none` and friends).
pub fn raw_token(header: &Value, payload: &Value, signature: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.{}",
        b64.encode(header.to_string()),
        b64.encode(payload.to_string()),
        signature
    )
}

/// splitmix64: a small, seeded, portable generator for the model-based tests (each test
/// reads its seed from its own variable and prints it on failure).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}
