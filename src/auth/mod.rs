//! Authentication: turning the token of an `auth` frame into an [`Actor`].
//!
//! One entry point, [`Authenticator::authenticate`], for all four credential kinds:
//! 1. the SHA-256 of the token is computed once; it is both the lookup key for device tokens
//!    and server keys (the policy stores only hashes) and the cache key;
//! 2. a hit in the device/server index resolves immediately;
//! 3. otherwise a cached JWT/session resolution is used if present and not expired;
//! 4. otherwise the token is verified: `cuttle_st_…` as a session token, anything shaped like
//!    a JWT as a user token of the project its `iss` names.
//!
//! The cache (moka, bounded, TTL) belongs to one [`Authenticator`], which belongs to one policy
//! snapshot: a reload builds a new one, so no resolution made under an old policy can survive
//! it — not even one racing with the swap.

pub mod actor;
pub mod dev_jwt;
pub mod jwt;
pub mod session_token;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use moka::sync::Cache;
use sha2::{Digest, Sha256};

pub use actor::{Actor, RoomRef, Verification};
use session_token::{SESSION_TOKEN_PREFIX, now_unix};

use crate::policy::{ActorType, Policy, Project};

/// Longest token accepted, in bytes. Real JWTs are well under 4 KiB; this bounds the hashing
/// and base64 work an unauthenticated peer can cause.
pub const MAX_TOKEN_BYTES: usize = 8192;

/// Why a credential was refused. The detail is for logs; clients get [`AuthError::wire_error`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token is empty or longer than {MAX_TOKEN_BYTES} bytes")]
    BadLength,
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("unknown credential")]
    UnknownCredential,
    #[error("no project accepts JWTs from this issuer")]
    UnknownIssuer,
    #[error("unknown project")]
    UnknownProject,
    #[error("{0} credentials are not configured (or their secret is unset) for this project")]
    Disabled(&'static str),
    #[error("algorithm {0} is not allowed")]
    AlgorithmNotAllowed(String),
    #[error("unknown key id {0:?}")]
    UnknownKeyId(String),
    #[error("token has no key id and the project has no key without one")]
    MissingKeyId,
    #[error("invalid signature")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("wrong audience")]
    WrongAudience,
    #[error("wrong issuer")]
    WrongIssuer,
    #[error("missing or invalid claim '{0}'")]
    InvalidClaim(String),
    #[error("lifetime exceeds the project's max_ttl_s")]
    TtlTooLong,
    #[error("scope {0:?} is not a scope of the project")]
    UnknownScope(String),
    #[error("the token's scope conflicts with the scope the policy gives this actor")]
    ScopeConflict,
    #[error("subject names a listed {0} actor, not a user")]
    NotAUser(ActorType),
    #[error("actor is no longer in the policy")]
    Revoked,
}

impl AuthError {
    /// The `error` string of the failed `auth` frame (PROTOCOL §4). Only an expired token is
    /// told apart, so that a client can refresh it; every other failure is `access_denied`,
    /// which tells a prober nothing.
    pub fn wire_error(&self) -> &'static str {
        match self {
            AuthError::Expired => "token_expired",
            _ => "access_denied",
        }
    }

    /// A short, fixed name for the kind of refusal: the `result` label of
    /// `cuttle_auth_attempts_total` (a closed set, unlike the message).
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::BadLength => "bad_length",
            AuthError::Malformed(_) => "malformed",
            AuthError::UnknownCredential => "unknown_credential",
            AuthError::UnknownIssuer => "unknown_issuer",
            AuthError::UnknownProject => "unknown_project",
            AuthError::Disabled(_) => "disabled",
            AuthError::AlgorithmNotAllowed(_) => "algorithm_not_allowed",
            AuthError::UnknownKeyId(_) | AuthError::MissingKeyId => "unknown_key",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::InvalidClaim(_) => "invalid_claim",
            AuthError::TtlTooLong => "ttl_too_long",
            AuthError::UnknownScope(_) | AuthError::ScopeConflict => "scope",
            AuthError::NotAUser(_) => "not_a_user",
            AuthError::Revoked => "revoked",
        }
    }
}

/// The actor type a credential claims by its form, before it is verified: `session` (the
/// session-token prefix), `user` (a JWT's three parts), or `unknown` (an opaque device token
/// or server API key, told apart only by the policy's lookup). For metrics labels.
pub fn claimed_type(token: &str) -> &'static str {
    if token.starts_with(SESSION_TOKEN_PREFIX) {
        "session"
    } else if token.bytes().filter(|&b| b == b'.').count() == 2 {
        "user"
    } else {
        "unknown"
    }
}

/// Size and lifetime of the resolution cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthCacheSettings {
    pub capacity: u64,
    pub ttl: Duration,
}

impl Default for AuthCacheSettings {
    fn default() -> Self {
        Self {
            capacity: 100_000,
            ttl: Duration::from_secs(30),
        }
    }
}

/// Resolves tokens to actors against one policy snapshot.
pub struct Authenticator {
    policy: Arc<Policy>,
    cache: Cache<[u8; 32], Arc<Actor>>,
    /// Signature verifications performed (cache misses that reached crypto).
    verifications: AtomicU64,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("cached", &self.cache.entry_count())
            .field("verifications", &self.verifications())
            .finish()
    }
}

/// SHA-256 of a credential, as the policy stores it.
pub fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Authenticator {
    pub fn new(policy: Arc<Policy>, cache: AuthCacheSettings) -> Self {
        Self {
            policy,
            cache: Cache::builder()
                .max_capacity(cache.capacity)
                .time_to_live(cache.ttl)
                .build(),
            verifications: AtomicU64::new(0),
        }
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// How many tokens went through signature verification (for tests, benches, metrics).
    pub fn verifications(&self) -> u64 {
        self.verifications.load(Ordering::Relaxed)
    }

    pub fn authenticate(&self, token: &str) -> Result<Arc<Actor>, AuthError> {
        self.authenticate_at(token, now_unix())
    }

    /// [`Self::authenticate`] at a given time (unix seconds): expiry decisions use `now`.
    pub fn authenticate_at(&self, token: &str, now: u64) -> Result<Arc<Actor>, AuthError> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::BadLength);
        }
        let digest = sha256(token);
        if let Some(entry) = self.policy.credential(&digest) {
            let project = self
                .policy
                .project(&entry.project)
                .ok_or(AuthError::UnknownProject)?;
            let listed = project
                .actors
                .get(&*entry.actor)
                .ok_or(AuthError::UnknownCredential)?;
            return Ok(Arc::new(Actor {
                project: project.id.clone(),
                id: listed.id.clone(),
                kind: listed.kind,
                scope: listed.scope.clone(),
                roles: Box::new([]),
                rooms: None,
                expires_at: None,
                credential_sha256: digest,
                verified_by: Verification::Listed,
            }));
        }
        if let Some(actor) = self.cache.get(&digest) {
            if !actor.is_expired_at(now) {
                return Ok(actor);
            }
            self.cache.invalidate(&digest);
        }
        let actor = Arc::new(self.verify(token, digest, now)?);
        self.cache.insert(digest, actor.clone());
        Ok(actor)
    }

    /// Verifies a JWT or session token without consulting or filling the cache: what a cache
    /// miss costs (benchmarks, diagnostics).
    pub fn verify_uncached(&self, token: &str, now: u64) -> Result<Actor, AuthError> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::BadLength);
        }
        self.verify(token, sha256(token), now)
    }

    fn verify(&self, token: &str, digest: [u8; 32], now: u64) -> Result<Actor, AuthError> {
        self.verifications.fetch_add(1, Ordering::Relaxed);
        if token.starts_with(SESSION_TOKEN_PREFIX) {
            self.verify_session(token, digest, now)
        } else if token.bytes().filter(|&b| b == b'.').count() == 2 {
            self.verify_user(token, digest, now)
        } else {
            Err(AuthError::UnknownCredential)
        }
    }

    fn verify_user(&self, token: &str, digest: [u8; 32], now: u64) -> Result<Actor, AuthError> {
        #[derive(serde::Deserialize)]
        struct Issuer {
            iss: Option<String>,
        }
        let iss = jsonwebtoken::dangerous::insecure_decode_claims::<Issuer>(token)
            .map_err(|_| AuthError::Malformed("JWT"))?
            .iss
            .ok_or_else(|| AuthError::InvalidClaim("iss".into()))?;
        let project = self
            .policy
            .project_for_issuer(&iss)
            .ok_or(AuthError::UnknownIssuer)?;
        let verifier = project.jwt.as_ref().ok_or(AuthError::Disabled("JWT"))?;
        let (claims, key) = verifier.verify(token)?;
        // The token is honoured until `exp` plus the configured leeway (clock skew between
        // the identity provider and this host), and not a second longer.
        let expires_at = claims.exp.saturating_add(verifier.leeway());
        if now >= expires_at {
            return Err(AuthError::Expired);
        }
        let scope = user_scope(project, &claims.sub, claims.scope.as_deref())?;
        let roles: Box<[Arc<str>]> = claims
            .roles
            .iter()
            .filter_map(|r| project.roles.get(r.as_str()).cloned())
            .take(jwt::MAX_ROLES)
            .collect();
        Ok(Actor {
            project: project.id.clone(),
            id: claims.sub.as_str().into(),
            kind: ActorType::User,
            scope,
            roles,
            rooms: None,
            expires_at: Some(expires_at),
            credential_sha256: digest,
            verified_by: Verification::Jwt {
                key,
                listed: project
                    .actors
                    .get(claims.sub.as_str())
                    .is_some_and(|a| a.kind == ActorType::User),
                scope_claim: claims.scope.as_deref().map(Arc::from),
            },
        })
    }

    fn verify_session(&self, token: &str, digest: [u8; 32], now: u64) -> Result<Actor, AuthError> {
        let (project, claims) = session_token::verify(&self.policy, token, now)?;
        let scope = match &claims.scope {
            None => None,
            Some(s) => Some(
                project
                    .scopes
                    .get(s.as_str())
                    .map(|sc| sc.slug.clone())
                    .ok_or_else(|| AuthError::UnknownScope(s.clone()))?,
            ),
        };
        // Entries that no longer name a room are dropped, not fatal: the token stays usable
        // for the rooms that still exist, and authorization denies the rest.
        let rooms = claims.rooms.as_ref().map(|entries| {
            entries
                .iter()
                .filter_map(|e| {
                    let (app, room) = session_token::split_room(e)?;
                    let app = project.apps.get(app)?;
                    let room = app.rooms.get(room)?;
                    Some(RoomRef {
                        app: app.slug.clone(),
                        room: room.slug.clone(),
                    })
                })
                .collect()
        });
        Ok(Actor {
            project: project.id.clone(),
            id: claims.sub.as_str().into(),
            kind: ActorType::Session,
            scope,
            roles: Box::new([]),
            rooms,
            expires_at: Some(claims.exp),
            credential_sha256: digest,
            verified_by: Verification::Session {
                key: settings_fingerprint(project),
                issued_at: claims.iat,
            },
        })
    }

    /// Re-checks an actor authenticated under an earlier policy against this one (after a hot
    /// reload). `Ok` carries the actor as this policy sees it (its scope may have changed);
    /// `Err` means the connection must be closed.
    ///
    /// Device and server actors are found again by the hash of their credential, so a rotated
    /// or removed token ends the connection. JWTs and session tokens are not kept, so they are
    /// re-checked by what verified them: the key (and issuer) must still be configured, a
    /// listed user must still be listed, and a session's lifetime must fit the current
    /// `max_ttl_s`.
    pub fn revalidate(&self, actor: &Actor, now: u64) -> Result<Arc<Actor>, AuthError> {
        if actor.is_expired_at(now) {
            return Err(AuthError::Expired);
        }
        let project = self
            .policy
            .project(&actor.project)
            .ok_or(AuthError::Revoked)?;
        let mut next = actor.clone();
        match actor.kind {
            ActorType::Device | ActorType::Server => {
                let entry = self
                    .policy
                    .credential(&actor.credential_sha256)
                    .ok_or(AuthError::Revoked)?;
                if *entry.project != *actor.project
                    || *entry.actor != *actor.id
                    || entry.kind != actor.kind
                {
                    return Err(AuthError::Revoked);
                }
                next.scope = project
                    .actors
                    .get(&*actor.id)
                    .ok_or(AuthError::Revoked)?
                    .scope
                    .clone();
            }
            ActorType::User => {
                let Verification::Jwt {
                    key,
                    listed,
                    scope_claim,
                } = &actor.verified_by
                else {
                    return Err(AuthError::Revoked);
                };
                // The key (and issuer) that verified the token must still be configured.
                if !project.jwt.as_ref().is_some_and(|j| j.has_key(key)) {
                    return Err(AuthError::Revoked);
                }
                // A listed user removed from the policy is a removed actor.
                if *listed && !project.actors.contains_key(&*actor.id) {
                    return Err(AuthError::Revoked);
                }
                next.scope = user_scope(project, &actor.id, scope_claim.as_deref())?;
                next.roles = actor
                    .roles
                    .iter()
                    .filter(|r| project.roles.contains(&***r))
                    .cloned()
                    .collect();
            }
            ActorType::Session => {
                let Verification::Session { key, issued_at } = &actor.verified_by else {
                    return Err(AuthError::Revoked);
                };
                let settings = project.session.as_ref().ok_or(AuthError::Revoked)?;
                // Signed with a secret that is no longer the project's: rotated out.
                if settings_fingerprint(project) != *key || settings.secret.is_none() {
                    return Err(AuthError::Revoked);
                }
                if actor
                    .expires_at
                    .is_some_and(|exp| exp.saturating_sub(*issued_at) > settings.max_ttl_s)
                {
                    return Err(AuthError::TtlTooLong);
                }
                if let Some(scope) = &actor.scope
                    && !project.scopes.contains_key(&**scope)
                {
                    return Err(AuthError::UnknownScope(scope.to_string()));
                }
            }
        }
        Ok(Arc::new(next))
    }
}

/// Fingerprint of a project's session secret (zeros when there is none).
fn settings_fingerprint(project: &Project) -> [u8; 32] {
    project
        .session
        .as_ref()
        .and_then(|s| s.secret.as_ref())
        .map_or([0; 32], |s| s.fingerprint())
}

/// The scope of a user: a listed user's scope is authoritative and the token must agree with
/// it (absent or equal); an unlisted user's scope is the claim, which must name a scope of the
/// project. A `sub` that names a listed non-user actor is refused outright, so a user token can
/// never borrow a device's or server's private-room membership.
fn user_scope(
    project: &Project,
    sub: &str,
    claim: Option<&str>,
) -> Result<Option<Arc<str>>, AuthError> {
    match project.actors.get(sub) {
        Some(listed) if listed.kind != ActorType::User => Err(AuthError::NotAUser(listed.kind)),
        Some(listed) => match (claim, &listed.scope) {
            (None, scope) => Ok(scope.clone()),
            (Some(c), Some(s)) if c == &**s => Ok(Some(s.clone())),
            _ => Err(AuthError::ScopeConflict),
        },
        None => match claim {
            None => Ok(None),
            Some(c) => project
                .scopes
                .get(c)
                .map(|s| Some(s.slug.clone()))
                .ok_or_else(|| AuthError::UnknownScope(c.chars().take(64).collect())),
        },
    }
}
