//! User JWT verification for one project (DESIGN §3).
//!
//! The rules a production identity integration needs, in the order they are applied:
//! - the project is chosen by the (unverified) `iss`; nothing else in an unverified token is
//!   trusted;
//! - the token's `alg` must be one the project pins in config; the key decides the family, so
//!   an RS256 project never runs an HMAC check (algorithm confusion) and `alg: none` never
//!   parses;
//! - the key is chosen by `kid`; an unknown `kid` is refused rather than tried against every
//!   key;
//! - the signature, then `exp` (required), `nbf`, `iss`, `aud` and `sub` are checked, with a
//!   small leeway for clock skew.
//!
//! Cryptography is `jsonwebtoken` on aws-lc-rs, the same provider rustls uses.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::AuthError;
use crate::diagnostics::{Diagnostics, quoted};
use crate::policy::CompileContext;
use crate::policy::spec::{JwtKeySpec, JwtSpec};

/// Default clock-skew leeway on `exp`/`nbf`, in seconds.
pub const DEFAULT_LEEWAY_S: u64 = 30;
/// Largest leeway accepted from config.
pub const MAX_LEEWAY_S: u64 = 300;
/// At most this many roles are taken from a token.
pub const MAX_ROLES: usize = 32;

struct JwtKey {
    kid: Option<String>,
    key: DecodingKey,
    /// SHA-256 over (issuer, kid, key material): identifies this key across reloads.
    fingerprint: [u8; 32],
}

fn fingerprint(issuer: &str, kid: Option<&str>, material: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [issuer.as_bytes(), kid.unwrap_or("").as_bytes(), material] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// Where one configured key comes from: names only, never key material. `cuttle dev-jwt`
/// reads an HMAC key's variable again to sign with the same secret, and names the variable
/// when it is unset (a disabled key is not in [`JwtVerifier`]'s keys at all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySource {
    /// The key's field relative to the project: `jwt.secret_env`, `jwt.keys[1].secret_env`,
    /// `jwt.public_key_file`, …
    pub field: String,
    pub kid: Option<String>,
    /// The variable holding an HMAC secret; `None` for a public key file.
    pub secret_env: Option<String>,
}

/// The compiled JWT settings of one project.
pub struct JwtVerifier {
    pub issuer: Arc<str>,
    pub audience: Arc<str>,
    algorithms: Vec<Algorithm>,
    keys: Vec<JwtKey>,
    sources: Vec<KeySource>,
    validation: Validation,
    pub scope_claim: String,
    pub roles_claim: String,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuer", &self.issuer)
            .field("algorithms", &self.algorithms)
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

/// What a verified user token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserClaims {
    pub sub: String,
    pub exp: u64,
    pub scope: Option<String>,
    pub roles: Vec<String>,
}

impl JwtVerifier {
    /// Builds the verifier of `spec` (at YAML `path`), reporting every problem. Returns `None`
    /// when the settings are unusable (errors pushed). When every key is disabled because its
    /// secret variable is unset (a warning pushed), the verifier refuses all tokens.
    pub fn build(
        spec: &JwtSpec,
        path: &str,
        cx: &CompileContext<'_>,
        diags: &mut Diagnostics,
    ) -> Option<Self> {
        let errors_before = diags.errors().count();
        if spec.issuer.is_empty() {
            diags.error(format!("{path}.issuer"), "must not be empty");
        }
        if spec.issuer == crate::auth::session_token::SESSION_ISSUER {
            // Otherwise a session token stripped of its prefix could pass as a user JWT.
            diags.error(
                format!("{path}.issuer"),
                format!(
                    "{} is reserved for cuttle's session tokens",
                    quoted(&spec.issuer)
                ),
            );
        }
        if spec.audience.is_empty() {
            diags.error(format!("{path}.audience"), "must not be empty");
        }
        for (field, claim) in [
            ("scope_claim", &spec.scope_claim),
            ("roles_claim", &spec.roles_claim),
        ] {
            if let Some(c) = claim
                && (c.is_empty()
                    || ["iss", "aud", "sub", "exp", "nbf", "iat", "jti"].contains(&c.as_str()))
            {
                diags.error(
                    format!("{path}.{field}"),
                    format!(
                        "{} cannot be used: empty or a registered JWT claim",
                        quoted(c)
                    ),
                );
            }
        }
        let leeway = spec.leeway_s.unwrap_or(DEFAULT_LEEWAY_S);
        if leeway > MAX_LEEWAY_S {
            diags.error(
                format!("{path}.leeway_s"),
                format!("{leeway} is more than the maximum of {MAX_LEEWAY_S} seconds"),
            );
        }
        let mut algorithms = Vec::new();
        for (i, name) in spec.algorithms.iter().enumerate() {
            match name.parse::<Algorithm>() {
                Ok(alg) if !algorithms.contains(&alg) => algorithms.push(alg),
                Ok(_) => diags.error(
                    format!("{path}.algorithms[{i}]"),
                    format!("duplicate algorithm {}", quoted(name)),
                ),
                Err(_) => diags.error(
                    format!("{path}.algorithms[{i}]"),
                    format!(
                        "unknown algorithm {} (expected HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA)",
                        quoted(name)
                    ),
                ),
            }
        }
        if spec.algorithms.is_empty() {
            diags.error(
                format!("{path}.algorithms"),
                "at least one algorithm is required",
            );
        }
        let family = algorithms.first().map(|a| a.family());
        if let Some(family) = family
            && let Some(i) = algorithms.iter().position(|a| a.family() != family)
        {
            diags.error(
                format!("{path}.algorithms[{i}]"),
                "all algorithms must be of one family (HMAC, RSA, EC or EdDSA): mixing families invites algorithm confusion",
            );
        }

        // The shorthand single key plus the `keys:` list.
        let shorthand = JwtKeySpec {
            kid: None,
            secret_env: spec.secret_env.clone(),
            public_key_file: spec.public_key_file.clone(),
        };
        // (YAML path, the same relative to the project, key)
        let mut specs: Vec<(String, String, &JwtKeySpec)> = Vec::new();
        if shorthand.secret_env.is_some() || shorthand.public_key_file.is_some() {
            specs.push((path.to_string(), "jwt".into(), &shorthand));
        }
        for (i, k) in spec.keys.iter().enumerate() {
            specs.push((format!("{path}.keys[{i}]"), format!("jwt.keys[{i}]"), k));
        }
        let sources = specs
            .iter()
            .map(|(_, field, k)| KeySource {
                field: match k.secret_env {
                    Some(_) => format!("{field}.secret_env"),
                    None => format!("{field}.public_key_file"),
                },
                kid: k.kid.clone(),
                secret_env: k.secret_env.clone(),
            })
            .collect();
        if specs.is_empty() {
            diags.error(
                path.to_string(),
                "a key is required: secret_env, public_key_file or keys",
            );
        }
        let mut keys = Vec::new();
        let mut disabled = 0;
        for (key_path, _, k) in &specs {
            if let Some(kid) = &k.kid {
                if kid.is_empty() {
                    diags.error(format!("{key_path}.kid"), "must not be empty");
                } else if specs
                    .iter()
                    .filter(|(_, _, o)| o.kid.as_deref() == Some(kid.as_str()))
                    .count()
                    > 1
                {
                    diags.error(
                        format!("{key_path}.kid"),
                        format!("duplicate kid {}", quoted(kid)),
                    );
                }
            }
            match load_key(k, key_path, family, cx, diags) {
                KeyLoad::Loaded(key, material) => keys.push(JwtKey {
                    kid: k.kid.clone(),
                    key,
                    fingerprint: fingerprint(&spec.issuer, k.kid.as_deref(), &material),
                }),
                KeyLoad::Disabled => disabled += 1,
                KeyLoad::Failed => {}
            }
        }
        if specs.iter().filter(|(_, _, k)| k.kid.is_none()).count() > 1 {
            diags.error(
                path.to_string(),
                "at most one key may omit `kid` (it is the key for tokens without a kid)",
            );
        }
        if diags.errors().count() > errors_before {
            return None;
        }
        if keys.is_empty() && disabled > 0 {
            // Keep the (keyless) verifier so that the issuer still selects this project and
            // its tokens fail as "disabled" rather than "unknown issuer".
            diags.warn(
                path.to_string(),
                "no key is available (secret variables unset): user tokens are refused for this project",
            );
        }
        let &first = algorithms.first()?;
        let mut validation = Validation::new(first);
        validation.algorithms = algorithms.clone();
        validation.leeway = leeway;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[&spec.issuer]);
        validation.set_audience(&[&spec.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);

        Some(Self {
            issuer: spec.issuer.as_str().into(),
            audience: spec.audience.as_str().into(),
            algorithms,
            keys,
            sources,
            validation,
            scope_claim: spec.scope_claim.clone().unwrap_or_else(|| "scope".into()),
            roles_claim: spec.roles_claim.clone().unwrap_or_else(|| "roles".into()),
        })
    }

    /// Clock-skew leeway on `exp`/`nbf`, in seconds.
    pub fn leeway(&self) -> u64 {
        self.validation.leeway
    }

    /// The accepted algorithms, in configured order (all of one family).
    pub fn algorithms(&self) -> &[Algorithm] {
        &self.algorithms
    }

    /// Where each configured key comes from, in configured order (the shorthand key first,
    /// then `keys`), whether or not it is loaded.
    pub fn key_sources(&self) -> &[KeySource] {
        &self.sources
    }

    /// Whether any key is loaded (a secret variable may be unset).
    pub fn is_enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Whether the key with this fingerprint (see [`crate::auth::Verification`]) is configured.
    pub fn has_key(&self, fingerprint: &[u8; 32]) -> bool {
        self.keys.iter().any(|k| k.fingerprint == *fingerprint)
    }

    /// Verifies a user token whose `iss` selected this project. Returns its claims and the
    /// fingerprint of the key that verified it.
    pub fn verify(&self, token: &str) -> Result<(UserClaims, [u8; 32]), AuthError> {
        if !self.is_enabled() {
            return Err(AuthError::Disabled("JWT"));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed("JWT header"))?;
        if !self.algorithms.contains(&header.alg) {
            return Err(AuthError::AlgorithmNotAllowed(format!("{:?}", header.alg)));
        }
        let key = match &header.kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid.as_str()))
                .ok_or_else(|| AuthError::UnknownKeyId(truncate(kid)))?,
            None => self
                .keys
                .iter()
                .find(|k| k.kid.is_none())
                .ok_or(AuthError::MissingKeyId)?,
        };
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &self.validation)
            .map_err(map_jwt_error)?;
        let claims = data.claims;
        let sub = match claims.get("sub") {
            Some(Value::String(s)) if crate::policy::check_actor_id(s).is_ok() => s.clone(),
            _ => return Err(AuthError::InvalidClaim("sub".into())),
        };
        let exp = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or_else(|| AuthError::InvalidClaim("exp".into()))?;
        let scope = match claims.get(&self.scope_claim) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(AuthError::InvalidClaim(self.scope_claim.clone())),
        };
        let roles = match claims.get(&self.roles_claim) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            Some(_) => return Err(AuthError::InvalidClaim(self.roles_claim.clone())),
        };
        Ok((
            UserClaims {
                sub,
                exp,
                scope,
                roles,
            },
            key.fingerprint,
        ))
    }
}

enum KeyLoad {
    /// The key, and the bytes it came from (for its fingerprint).
    Loaded(DecodingKey, Vec<u8>),
    Disabled,
    Failed,
}

fn load_key(
    k: &JwtKeySpec,
    path: &str,
    family: Option<AlgorithmFamily>,
    cx: &CompileContext<'_>,
    diags: &mut Diagnostics,
) -> KeyLoad {
    match (&k.secret_env, &k.public_key_file) {
        (Some(_), Some(_)) => {
            diags.error(
                path.to_string(),
                "secret_env and public_key_file are mutually exclusive",
            );
            KeyLoad::Failed
        }
        (None, None) => {
            diags.error(
                path.to_string(),
                "secret_env or public_key_file is required",
            );
            KeyLoad::Failed
        }
        (Some(var), None) => {
            if family.is_some_and(|f| f != AlgorithmFamily::Hmac) {
                diags.error(
                    format!("{path}.secret_env"),
                    "an HMAC secret cannot verify the configured (asymmetric) algorithms; use public_key_file",
                );
                return KeyLoad::Failed;
            }
            match cx.secret(var, &format!("{path}.secret_env"), diags) {
                Some(secret) => {
                    let secret = secret.into_exposed();
                    KeyLoad::Loaded(DecodingKey::from_secret(secret.as_bytes()), secret.into())
                }
                None => KeyLoad::Disabled,
            }
        }
        (None, Some(file)) => {
            let field = format!("{path}.public_key_file");
            let Some(family) = family else {
                return KeyLoad::Failed; // algorithms already reported
            };
            if family == AlgorithmFamily::Hmac {
                diags.error(
                    field,
                    "HMAC algorithms need secret_env, not a public key (a public key used as an HMAC secret is the classic algorithm-confusion attack)",
                );
                return KeyLoad::Failed;
            }
            let resolved = cx.resolve(file);
            let pem = match cx.read_file(&resolved) {
                Ok(pem) => pem,
                Err(e) => {
                    diags.error(field, format!("cannot read {}: {e}", resolved.display()));
                    return KeyLoad::Failed;
                }
            };
            let key = match family {
                AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(&pem),
                AlgorithmFamily::Ec => DecodingKey::from_ec_pem(&pem),
                AlgorithmFamily::Ed => DecodingKey::from_ed_pem(&pem),
                AlgorithmFamily::Hmac => return KeyLoad::Failed, // reported above
            };
            match key {
                Ok(key) => KeyLoad::Loaded(key, pem),
                Err(e) => {
                    diags.error(
                        field,
                        format!(
                            "{} is not a {family:?} public key in PEM format: {e}",
                            resolved.display()
                        ),
                    );
                    KeyLoad::Failed
                }
            }
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

fn map_jwt_error(e: jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature => AuthError::BadSignature,
        K::ExpiredSignature => AuthError::Expired,
        K::ImmatureSignature => AuthError::NotYetValid,
        K::InvalidAudience => AuthError::WrongAudience,
        K::InvalidIssuer => AuthError::WrongIssuer,
        K::InvalidAlgorithm | K::InvalidAlgorithmName | K::MissingAlgorithm => {
            AuthError::AlgorithmNotAllowed("(mismatch)".into())
        }
        K::MissingRequiredClaim(c) => AuthError::InvalidClaim(c.clone()),
        K::InvalidSubject => AuthError::InvalidClaim("sub".into()),
        K::InvalidKeyFormat | K::InvalidEcdsaKey | K::InvalidRsaKey(_) => AuthError::BadSignature,
        _ => AuthError::Malformed("JWT"),
    }
}
