//! `cuttle dev-jwt`: user JWTs for trying a project out, **for development only**.
//!
//! In production, user JWTs come from the identity provider named by the project's
//! `jwt.issuer`; the proxy only verifies them. To try the demo (or a new project) without one,
//! this signs a token with the project's own HMAC secret (`jwt.secret_env`), carrying exactly
//! what the verifier requires: `iss` and `aud` from the project's `jwt:` settings, `sub`, `iat`
//! and `exp` (plus the scope and roles claims, when asked). Projects verifying with public keys
//! (RSA, EC, EdDSA) are refused: only the holder of the private key can sign for them.

use jsonwebtoken::{Algorithm, AlgorithmFamily, EncodingKey, Header};
use serde_json::{Map, Value};

use crate::policy::{MIN_SECRET_BYTES, Policy, check_actor_id};

/// What to mint.
#[derive(Debug, Clone, Default)]
pub struct DevJwtRequest {
    pub project: String,
    /// The user's id (the `sub` claim).
    pub sub: String,
    pub ttl_s: u64,
    /// The scope claim (an unlisted user's access scope).
    pub scope: Option<String>,
    /// The roles claim.
    pub roles: Vec<String>,
}

/// A minted token and what it was signed with (for the CLI's note on stderr).
#[derive(Debug, Clone)]
pub struct DevJwt {
    pub token: String,
    pub algorithm: Algorithm,
    /// The variable whose secret signed it.
    pub secret_env: String,
    pub kid: Option<String>,
    pub exp: u64,
}

/// Why no token was minted; messages are for the developer at the command line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DevJwtError {
    #[error("unknown project '{0}'")]
    UnknownProject(String),
    #[error("project '{0}' has no `jwt:` settings, so it accepts no user JWTs")]
    NotConfigured(String),
    #[error(
        "project '{project}' verifies user JWTs with {algorithm:?}, a public-key algorithm: only the holder of the private key (your identity provider) can sign them. dev-jwt signs for HMAC projects only (HS256, HS384, HS512 with jwt.secret_env)"
    )]
    NotHmac {
        project: String,
        algorithm: Algorithm,
    },
    #[error(
        "project '{project}' has no JWT secret: set {} to the secret the proxy runs with (at least {MIN_SECRET_BYTES} bytes, e.g. from `openssl rand -hex 32`)",
        .variables.iter().map(|(field, var)| format!("{var} (project {project}'s {field})")).collect::<Vec<_>>().join(" or ")
    )]
    NoSecret {
        project: String,
        /// (field, variable) of every HMAC key of the project.
        variables: Vec<(String, String)>,
    },
    #[error("the secret in {variable} is {len} bytes; at least {MIN_SECRET_BYTES} are required")]
    ShortSecret { variable: String, len: usize },
    #[error("invalid sub '{sub}': {why}")]
    InvalidSub { sub: String, why: String },
    #[error("ttl must be at least 1 s")]
    Ttl,
    #[error("signing failed: {0}")]
    Sign(String),
}

/// Mints a user JWT for `req` at time `now` (unix seconds), with the secret read from `env`.
/// The first HMAC key of the project whose variable is set signs it (its `kid` goes in the
/// header), with the project's first algorithm.
pub fn mint(
    policy: &Policy,
    req: &DevJwtRequest,
    now: u64,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<DevJwt, DevJwtError> {
    let project = policy
        .project(&req.project)
        .ok_or_else(|| DevJwtError::UnknownProject(req.project.clone()))?;
    let verifier = project
        .jwt
        .as_ref()
        .ok_or_else(|| DevJwtError::NotConfigured(req.project.clone()))?;
    let &algorithm = verifier
        .algorithms()
        .first()
        .ok_or_else(|| DevJwtError::NotConfigured(req.project.clone()))?;
    if algorithm.family() != AlgorithmFamily::Hmac {
        return Err(DevJwtError::NotHmac {
            project: req.project.clone(),
            algorithm,
        });
    }
    if let Err(why) = check_actor_id(&req.sub) {
        return Err(DevJwtError::InvalidSub {
            sub: req.sub.escape_debug().to_string(),
            why,
        });
    }
    if req.ttl_s == 0 {
        return Err(DevJwtError::Ttl);
    }
    let hmac_keys = verifier
        .key_sources()
        .iter()
        .filter_map(|k| k.secret_env.as_ref().map(|var| (k, var)));
    let mut variables = Vec::new();
    let mut signing = None;
    for (key, var) in hmac_keys {
        match env(var) {
            Some(secret) => {
                signing = Some((key, var, secret));
                break;
            }
            None => variables.push((key.field.clone(), var.escape_debug().to_string())),
        }
    }
    let Some((key, var, secret)) = signing else {
        return Err(DevJwtError::NoSecret {
            project: req.project.clone(),
            variables,
        });
    };
    if secret.len() < MIN_SECRET_BYTES {
        return Err(DevJwtError::ShortSecret {
            variable: var.escape_debug().to_string(),
            len: secret.len(),
        });
    }

    let exp = now.saturating_add(req.ttl_s);
    let mut claims = Map::new();
    claims.insert("iss".into(), Value::from(&*verifier.issuer));
    claims.insert("aud".into(), Value::from(&*verifier.audience));
    claims.insert("sub".into(), Value::from(req.sub.as_str()));
    claims.insert("iat".into(), Value::from(now));
    claims.insert("exp".into(), Value::from(exp));
    if let Some(scope) = &req.scope {
        claims.insert(verifier.scope_claim.clone(), Value::from(scope.as_str()));
    }
    if !req.roles.is_empty() {
        claims.insert(verifier.roles_claim.clone(), Value::from(req.roles.clone()));
    }
    let mut header = Header::new(algorithm);
    header.kid = key.kid.clone();
    let token = jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| DevJwtError::Sign(e.to_string()))?;
    Ok(DevJwt {
        token,
        algorithm,
        secret_env: var.clone(),
        kid: key.kid.clone(),
        exp,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::auth::session_token::now_unix;
    use crate::auth::{AuthCacheSettings, AuthError, Authenticator};

    const SECRET: &str = "dev-jwt-test-secret-0123456789abcdef-0123";
    const ROTATED: &str = "dev-jwt-rotated-secret-0123456789abcdef-01";

    fn env(var: &str) -> Option<String> {
        match var {
            "DEMO_JWT_SECRET" => Some(SECRET.into()),
            "NEW_SECRET" => Some(ROTATED.into()),
            _ => None,
        }
    }

    const POLICY: &str = r#"
policy:
  projects:
    - id: demo
      jwt: { issuer: https://id.example.com, audience: cuttle, algorithms: [HS384, HS256], secret_env: DEMO_JWT_SECRET }
      scopes: [ { slug: acme }, { slug: globex } ]
      roles: { moderator: { messages: read } }
      apps: [ { slug: chat, topics: { messages: { user: read } } } ]
      actors:
        - { id: alice, type: user, scope: acme }
    - id: rotating
      jwt:
        issuer: https://rotating.example.com
        audience: rot
        algorithms: [HS512]
        keys:
          - { kid: old, secret_env: OLD_SECRET }
          - { kid: new, secret_env: NEW_SECRET }
    - id: unset
      jwt: { issuer: https://unset.example.com, audience: u, algorithms: [HS256], secret_env: UNSET_JWT_SECRET }
    - id: rsa
      jwt: { issuer: https://rsa.example.com, audience: r, algorithms: [RS256], public_key_file: tests/fixtures/rsa_public.pem }
    - id: nojwt
"#;

    fn policy() -> Arc<Policy> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.yaml");
        let loaded = crate::config::load_str(POLICY, &path, &env)
            .unwrap_or_else(|d| panic!("test policy:\n{d}"));
        Arc::new(loaded.policy)
    }

    fn req(project: &str, sub: &str) -> DevJwtRequest {
        DevJwtRequest {
            project: project.into(),
            sub: sub.into(),
            ttl_s: 3600,
            ..Default::default()
        }
    }

    #[test]
    fn the_proxy_accepts_what_it_mints() {
        let policy = policy();
        let auth = Authenticator::new(policy.clone(), AuthCacheSettings::default());
        let now = now_unix();
        let minted = mint(&policy, &req("demo", "alice"), now, &env).unwrap();
        assert_eq!(minted.algorithm, Algorithm::HS384, "the first configured");
        assert_eq!(minted.secret_env, "DEMO_JWT_SECRET");
        assert_eq!(minted.exp, now + 3600);
        let verifier = policy.project("demo").unwrap().jwt.as_ref().unwrap();
        let (claims, _) = verifier.verify(&minted.token).unwrap();
        assert_eq!((claims.sub.as_str(), claims.exp), ("alice", now + 3600));
        let actor = auth.verify_uncached(&minted.token, now).unwrap();
        assert_eq!(&*actor.id, "alice");
        assert_eq!(actor.scope(), Some("acme"), "a listed user's scope");

        // An unlisted user, with a scope and roles.
        let mut r = req("demo", "bob");
        r.scope = Some("globex".into());
        r.roles = vec!["moderator".into()];
        let minted = mint(&policy, &r, now, &env).unwrap();
        let actor = auth.verify_uncached(&minted.token, now).unwrap();
        assert_eq!(actor.scope(), Some("globex"));
        assert_eq!(actor.roles.len(), 1);

        // With rotated keys, the first key whose secret is set signs, under its kid.
        let minted = mint(&policy, &req("rotating", "carol"), now, &env).unwrap();
        assert_eq!(minted.kid.as_deref(), Some("new"));
        assert_eq!(minted.secret_env, "NEW_SECRET");
        assert_eq!(
            &*auth.verify_uncached(&minted.token, now).unwrap().id,
            "carol"
        );
    }

    #[test]
    fn an_expired_token_is_refused() {
        let policy = policy();
        let auth = Authenticator::new(policy.clone(), AuthCacheSettings::default());
        // Minted two hours ago for one hour: expired well beyond the leeway.
        let then = now_unix() - 7200;
        let minted = mint(&policy, &req("demo", "alice"), then, &env).unwrap();
        let verifier = policy.project("demo").unwrap().jwt.as_ref().unwrap();
        assert_eq!(
            verifier.verify(&minted.token).unwrap_err(),
            AuthError::Expired
        );
        assert_eq!(
            auth.verify_uncached(&minted.token, now_unix()).unwrap_err(),
            AuthError::Expired
        );
    }

    #[test]
    fn what_cannot_be_minted_says_why() {
        let policy = policy();
        let now = now_unix();
        let err = |project: &str, sub: &str| {
            mint(&policy, &req(project, sub), now, &env)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("rsa", "alice"),
            "project 'rsa' verifies user JWTs with RS256, a public-key algorithm: only the holder of the private key (your identity provider) can sign them. dev-jwt signs for HMAC projects only (HS256, HS384, HS512 with jwt.secret_env)"
        );
        assert_eq!(
            err("unset", "alice"),
            "project 'unset' has no JWT secret: set UNSET_JWT_SECRET (project unset's jwt.secret_env) to the secret the proxy runs with (at least 32 bytes, e.g. from `openssl rand -hex 32`)"
        );
        assert_eq!(
            err("nojwt", "alice"),
            "project 'nojwt' has no `jwt:` settings, so it accepts no user JWTs"
        );
        assert_eq!(err("nope", "alice"), "unknown project 'nope'");
        assert!(err("demo", "").starts_with("invalid sub '': "));
        let mut r = req("demo", "alice");
        r.ttl_s = 0;
        assert_eq!(mint(&policy, &r, now, &env).unwrap_err(), DevJwtError::Ttl);
        let short = |_: &str| Some("short".to_string());
        assert_eq!(
            mint(&policy, &req("demo", "alice"), now, &short)
                .unwrap_err()
                .to_string(),
            "the secret in DEMO_JWT_SECRET is 5 bytes; at least 32 are required"
        );
        // Every HMAC key's variable is named when none is set.
        let none = |_: &str| None;
        assert!(
            mint(&policy, &req("rotating", "carol"), now, &none)
                .unwrap_err()
                .to_string()
                .contains(
                    "set OLD_SECRET (project rotating's jwt.keys[0].secret_env) or NEW_SECRET (project rotating's jwt.keys[1].secret_env)"
                )
        );
    }
}
