//! Guest session tokens: minted from a project's session secret, verified offline.
//!
//! Format: `cuttle_st_` followed by an HS256 JWT whose claims are
//! `{iss: "cuttle-session", aud: <project id>, sub: <random session id>, iat, exp,
//! scope?, rooms?: ["app/room", …]}`. The visible prefix lets the proxy route the token
//! without guessing and lets secret scanners recognise a leaked one. Verification needs only
//! the secret, so any replica accepts a token any other replica (or the CLI) minted.
//!
//! The lifetime is capped twice: at mint time by `max_ttl_s`, and at verify time by checking
//! `exp - iat` against the *current* `max_ttl_s`, so lowering the cap in config also shortens
//! tokens already handed out.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::AuthError;
use crate::policy::{Policy, Project};

/// Every session token starts with this.
pub const SESSION_TOKEN_PREFIX: &str = "cuttle_st_";
/// The `iss` of every session token.
pub const SESSION_ISSUER: &str = "cuttle-session";
/// Clock skew tolerated between the minting and the verifying host, in seconds.
pub const SESSION_LEEWAY_S: u64 = 5;
/// At most this many rooms in one token's allow-list.
pub const MAX_SESSION_ROOMS: usize = 64;

/// A project's session secret, as signing and verification keys. Never printed.
pub struct SessionSecret {
    encoding: EncodingKey,
    decoding: DecodingKey,
    fingerprint: [u8; 32],
}

impl SessionSecret {
    pub fn new(secret: &[u8]) -> Self {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"cuttle-session-secret\0");
        h.update(secret);
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            fingerprint: h.finalize().into(),
        }
    }

    /// A one-way fingerprint: tells secrets apart without keeping them comparable.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }
}

impl std::fmt::Debug for SessionSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionSecret(<redacted>)")
    }
}

/// The claims of a session token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionClaims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub iat: u64,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
}

/// What to mint.
#[derive(Debug, Clone, Default)]
pub struct MintRequest {
    pub project: String,
    pub ttl_s: u64,
    pub scope: Option<String>,
    /// `app/room` entries.
    pub rooms: Vec<String>,
}

/// Why a token could not be minted. Messages are for the operator running the CLI or the
/// server actor calling the HTTP API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    #[error("unknown project '{0}'")]
    UnknownProject(String),
    #[error("project '{0}' has no `session:` settings")]
    NotConfigured(String),
    #[error(
        "project '{project}' has no session secret: set {variable} (project {project}'s session.secret_env) to the secret the proxy runs with (at least {min} bytes, e.g. from `openssl rand -hex 32`)",
        min = crate::policy::MIN_SECRET_BYTES
    )]
    NoSecret { project: String, variable: String },
    #[error("ttl must be between 1 s and max_ttl_s ({max} s), got {got} s")]
    Ttl { got: u64, max: u64 },
    #[error("scope '{0}' is not a scope of the project")]
    UnknownScope(String),
    #[error("room '{0}' must be app/room and name a declared room of the project")]
    UnknownRoom(String),
    #[error(
        "room '{0}' is private: only its listed actors may use it, and a session has no identity"
    )]
    PrivateRoom(String),
    #[error("at most {MAX_SESSION_ROOMS} rooms per token")]
    TooManyRooms,
    #[error("no randomness available for the session id: {0}")]
    Entropy(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// Current unix time in seconds (0 if the clock is before 1970).
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Mints a token for `req` at time `now` (unix seconds).
pub fn mint(policy: &Policy, req: &MintRequest, now: u64) -> Result<String, MintError> {
    let project = policy
        .project(&req.project)
        .ok_or_else(|| MintError::UnknownProject(req.project.clone()))?;
    let settings = project
        .session
        .as_ref()
        .ok_or_else(|| MintError::NotConfigured(req.project.clone()))?;
    let secret = settings
        .secret
        .as_ref()
        .ok_or_else(|| MintError::NoSecret {
            project: req.project.clone(),
            variable: settings.secret_env.escape_debug().to_string(),
        })?;
    if req.ttl_s == 0 || req.ttl_s > settings.max_ttl_s {
        return Err(MintError::Ttl {
            got: req.ttl_s,
            max: settings.max_ttl_s,
        });
    }
    if let Some(scope) = &req.scope
        && !project.scopes.contains_key(scope.as_str())
    {
        return Err(MintError::UnknownScope(scope.clone()));
    }
    if req.rooms.len() > MAX_SESSION_ROOMS {
        return Err(MintError::TooManyRooms);
    }
    for entry in &req.rooms {
        let room = split_room(entry)
            .and_then(|(app, room)| project.apps.get(app)?.rooms.get(room))
            .ok_or_else(|| MintError::UnknownRoom(entry.clone()))?;
        if room.is_private() {
            return Err(MintError::PrivateRoom(entry.clone()));
        }
    }
    let claims = SessionClaims {
        iss: SESSION_ISSUER.into(),
        aud: project.id.to_string(),
        sub: new_session_id()?,
        iat: now,
        exp: now.saturating_add(req.ttl_s),
        scope: req.scope.clone(),
        rooms: (!req.rooms.is_empty()).then(|| req.rooms.clone()),
    };
    let jwt = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &secret.encoding)
        .map_err(|e| MintError::Sign(e.to_string()))?;
    Ok(format!("{SESSION_TOKEN_PREFIX}{jwt}"))
}

/// Splits `app/room`.
pub fn split_room(entry: &str) -> Option<(&str, &str)> {
    let (app, room) = entry.split_once('/')?;
    (!app.is_empty() && !room.is_empty() && !room.contains('/')).then_some((app, room))
}

fn new_session_id() -> Result<String, MintError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| MintError::Entropy(e.to_string()))?;
    Ok(format!("sess_{}", hex::encode(bytes)))
}

/// Verifies a session token (with its prefix). Returns the project and the claims; the caller
/// resolves scope and rooms against the policy.
pub fn verify<'p>(
    policy: &'p Policy,
    token: &str,
    now: u64,
) -> Result<(&'p Project, SessionClaims), AuthError> {
    let jwt = token
        .strip_prefix(SESSION_TOKEN_PREFIX)
        .ok_or(AuthError::Malformed("session token prefix"))?;
    #[derive(Deserialize)]
    struct Audience {
        aud: Option<String>,
    }
    let aud = jsonwebtoken::dangerous::insecure_decode_claims::<Audience>(jwt)
        .map_err(|_| AuthError::Malformed("session token"))?
        .aud
        .ok_or_else(|| AuthError::InvalidClaim("aud".into()))?;
    let project = policy.project(&aud).ok_or(AuthError::UnknownProject)?;
    let settings = project
        .session
        .as_ref()
        .ok_or(AuthError::Disabled("session"))?;
    let secret = settings
        .secret
        .as_ref()
        .ok_or(AuthError::Disabled("session"))?;

    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = SESSION_LEEWAY_S;
    validation.set_issuer(&[SESSION_ISSUER]);
    validation.set_audience(&[&*project.id]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let claims = jsonwebtoken::decode::<SessionClaims>(jwt, &secret.decoding, &validation)
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => AuthError::BadSignature,
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
            jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => {
                AuthError::AlgorithmNotAllowed("session tokens are HS256".into())
            }
            _ => AuthError::Malformed("session token"),
        })?
        .claims;
    // jsonwebtoken checked exp with the leeway against its own clock; `now` is the caller's
    // clock (tests pin it), so check again without leeway, as the expiry close will.
    if now >= claims.exp {
        return Err(AuthError::Expired);
    }
    if claims.iat > now + SESSION_LEEWAY_S {
        return Err(AuthError::NotYetValid);
    }
    if claims.exp.saturating_sub(claims.iat) > settings.max_ttl_s {
        return Err(AuthError::TtlTooLong);
    }
    if !claims.sub.starts_with("sess_") || claims.sub.len() > 64 {
        return Err(AuthError::InvalidClaim("sub".into()));
    }
    if claims
        .rooms
        .as_ref()
        .is_some_and(|r| r.len() > MAX_SESSION_ROOMS)
    {
        return Err(AuthError::InvalidClaim("rooms".into()));
    }
    Ok((project, claims))
}
