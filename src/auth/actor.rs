//! [`Actor`]: who a connection is, once its credential has been verified.

use std::sync::Arc;

use crate::policy::ActorType;

/// A room named by a session token's allow-list.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoomRef {
    pub app: Arc<str>,
    pub room: Arc<str>,
}

/// An authenticated actor. Immutable and shared (`Arc<Actor>`) between the auth cache and the
/// session that uses it.
///
/// It refers to the policy by *names* (project id, scope slug, role names), not by pointers
/// into one snapshot: after a hot reload the same actor is authorized against the new policy,
/// and [`super::Authenticator::revalidate`] decides whether it still exists at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub project: Arc<str>,
    /// The actor id: the listed id (device, server), the JWT `sub` (user), or a random
    /// per-token id (session). Sent to clients as `actorTokenId`.
    pub id: Arc<str>,
    pub kind: ActorType,
    /// Access scope slug; `None` is the unscoped namespace.
    pub scope: Option<Arc<str>>,
    /// Project roles carried by a user's JWT (only roles the project declares).
    pub roles: Box<[Arc<str>]>,
    /// A session token's room allow-list; `None` means no restriction.
    pub rooms: Option<Box<[RoomRef]>>,
    /// Unix seconds after which the credential is no longer valid (JWT and session `exp`).
    pub expires_at: Option<u64>,
    /// SHA-256 of the presented credential: the cache key, and how a device or server actor is
    /// found again after a reload without keeping its secret.
    pub credential_sha256: [u8; 32],
    /// What verified the credential, for revalidation after a reload (the token itself is not
    /// kept).
    pub verified_by: Verification,
}

/// How an actor's credential was verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// Device token or server key: found by its hash in the policy.
    Listed,
    /// User JWT.
    Jwt {
        /// Fingerprint of (issuer, kid, key) that verified the signature: a reload that
        /// removes the key or changes the issuer ends the connection.
        key: [u8; 32],
        /// Whether `sub` named a listed user (whose scope the policy gives).
        listed: bool,
        /// The token's scope claim, as sent.
        scope_claim: Option<Arc<str>>,
    },
    /// Session token.
    Session {
        /// Fingerprint of the session secret that signed it.
        key: [u8; 32],
        issued_at: u64,
    },
}

impl Actor {
    /// Whether the credential has expired at `now` (unix seconds).
    pub fn is_expired_at(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|exp| now >= exp)
    }

    pub fn scope(&self) -> Option<&str> {
        self.scope.as_deref()
    }

    /// Whether a session allow-list (if any) admits `app/room`.
    pub fn room_allowed(&self, app: &str, room: &str) -> bool {
        match &self.rooms {
            None => true,
            Some(rooms) => rooms.iter().any(|r| &*r.app == app && &*r.room == room),
        }
    }
}
