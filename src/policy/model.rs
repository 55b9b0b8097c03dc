//! The compiled policy: an immutable, indexed snapshot built once per (re)load by
//! [`super::compile`] and shared by every session through an `Arc`.
//!
//! Everything a decision needs is a hash lookup away; nothing here is mutated after
//! construction, so readers take no locks.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use crate::auth::jwt::JwtVerifier;
use crate::auth::session_token::SessionSecret;

/// The four kinds of actor (DESIGN §3), one credential kind each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ActorType {
    Device,
    User,
    Server,
    Session,
}

impl ActorType {
    pub const ALL: [ActorType; 4] = [Self::Device, Self::User, Self::Server, Self::Session];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::User => "user",
            Self::Server => "server",
            Self::Session => "session",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ActorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an operation needs from a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Subscribe / receive.
    Read,
    /// Publish.
    Write,
}

/// A topic permission: a set of [`Access`] kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Permission(u8);

impl Permission {
    pub const NONE: Self = Self(0);
    pub const READ: Self = Self(1);
    pub const WRITE: Self = Self(2);
    pub const READ_WRITE: Self = Self(3);

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(Self::NONE),
            "read" => Some(Self::READ),
            "write" => Some(Self::WRITE),
            "read-write" => Some(Self::READ_WRITE),
            _ => None,
        }
    }

    pub fn allows(self, access: Access) -> bool {
        let bit = match access {
            Access::Read => Self::READ.0,
            Access::Write => Self::WRITE.0,
        };
        self.0 & bit != 0
    }

    pub fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            0 => "none",
            1 => "read",
            2 => "write",
            _ => "read-write",
        })
    }
}

/// The ACL of one declared topic.
#[derive(Debug, Clone, Default)]
pub struct TopicAcl {
    by_type: [Permission; 4],
    /// Extra grants for users carrying a role, from the project's `roles:`.
    pub(crate) role_grants: Vec<(Arc<str>, Permission)>,
}

impl TopicAcl {
    pub(crate) fn new(by_type: [Permission; 4]) -> Self {
        Self {
            by_type,
            role_grants: Vec::new(),
        }
    }

    /// The base permission of an actor type (before role grants).
    pub fn permission(&self, kind: ActorType) -> Permission {
        self.by_type[kind.index()]
    }

    /// The permission of a user carrying `roles`.
    pub fn user_permission(&self, roles: &[Arc<str>]) -> Permission {
        let mut p = self.permission(ActorType::User);
        for (role, grant) in &self.role_grants {
            if roles.iter().any(|r| r == role) {
                p = p.union(*grant);
            }
        }
        p
    }
}

#[derive(Debug, Clone)]
pub struct Room {
    pub slug: Arc<str>,
    /// `None`: public. `Some`: private, and only these actor ids may use it.
    pub members: Option<HashSet<Arc<str>>>,
}

impl Room {
    pub fn is_private(&self) -> bool {
        self.members.is_some()
    }
}

/// Most rooms one lobby may aggregate. It bounds the work of one lobby subscription (a room's
/// members are gathered and its events forwarded for each room) and the size of the lists a
/// `lobbySubscribed` or `lobbyPresenceList` carries (DESIGN §9: everything is bounded).
pub const MAX_LOBBY_ROOMS: usize = 256;

/// A lobby: the presence of several rooms of one app, seen together (DESIGN §9, PROTOCOL §12).
/// It grants nothing by itself: each room keeps its own access rules.
#[derive(Debug, Clone)]
pub struct Lobby {
    pub slug: Arc<str>,
    /// Slugs of rooms of the same app (each a key of [`App::rooms`]), in YAML order, without
    /// duplicates, at most [`MAX_LOBBY_ROOMS`].
    pub rooms: Vec<Arc<str>>,
}

#[derive(Debug, Clone)]
pub struct App {
    pub slug: Arc<str>,
    pub topics: HashMap<Arc<str>, TopicAcl>,
    pub rooms: HashMap<Arc<str>, Room>,
    /// Lobby slug → lobby. Lobby and room slugs are separate namespaces.
    pub lobbies: HashMap<Arc<str>, Lobby>,
}

#[derive(Debug, Clone)]
pub struct Scope {
    pub slug: Arc<str>,
    pub name: Option<String>,
}

/// An actor the policy names explicitly (devices and servers always; users optionally).
#[derive(Debug, Clone)]
pub struct ListedActor {
    pub id: Arc<str>,
    pub kind: ActorType,
    pub scope: Option<Arc<str>>,
    /// Server actors: the scopes the HTTP API may address besides the actor's own namespace.
    /// Over WebSocket every actor stays in its own namespace whatever this says.
    pub grants: ScopeGrants,
}

/// Which scopes a server actor's HTTP requests may address (`scopes:` in the policy).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ScopeGrants {
    /// Only the actor's own namespace (its `scope`, or the unscoped one).
    #[default]
    Own,
    /// These scopes, and the own namespace.
    Some(Box<[Arc<str>]>),
    /// Every scope of the project (`"*"`), and the own namespace.
    All,
}

impl ScopeGrants {
    /// Whether `scope` (a slug of the project) may be addressed. `own` is the actor's scope.
    pub fn allows(&self, scope: Option<&str>, own: Option<&str>) -> bool {
        if scope == own {
            return true;
        }
        match (self, scope) {
            (ScopeGrants::All, Some(_)) => true,
            (ScopeGrants::Some(list), Some(s)) => list.iter().any(|g| &**g == s),
            _ => false,
        }
    }
}

/// Session-token settings of a project.
#[derive(Debug)]
pub struct SessionSettings {
    /// `None` when the configured environment variable is unset: session tokens are then
    /// refused for this project (fail closed) and `check` warns.
    pub secret: Option<SessionSecret>,
    /// The variable the secret is read from (`session.secret_env`), for messages that tell
    /// the operator what to set.
    pub secret_env: String,
    pub max_ttl_s: u64,
}

#[derive(Debug)]
pub struct Project {
    pub id: Arc<str>,
    pub scopes: HashMap<Arc<str>, Scope>,
    pub apps: HashMap<Arc<str>, App>,
    pub actors: HashMap<Arc<str>, ListedActor>,
    pub roles: HashSet<Arc<str>>,
    pub jwt: Option<JwtVerifier>,
    pub session: Option<SessionSettings>,
    /// The slugs of `apps` in YAML order (the policy order). `roomId` and `lobbyId` on the
    /// wire carry no app (PROTOCOL A12), so a bare slug resolves to the first app in this
    /// order that declares it, whatever the hash order of `apps`.
    pub(crate) app_order: Vec<Arc<str>>,
    /// Lobby slug → slug of the first app in policy order that declares it, so that
    /// [`Project::lobby`] is a hash lookup.
    pub(crate) lobby_apps: HashMap<Arc<str>, Arc<str>>,
    /// Where this project's events go (DESIGN §10), in policy order.
    pub webhooks: Vec<Arc<crate::webhook::EndpointConfig>>,
}

impl Project {
    /// The apps in policy (YAML) order.
    pub fn apps_in_order(&self) -> impl Iterator<Item = &App> {
        self.app_order.iter().filter_map(|slug| self.apps.get(slug))
    }

    /// The lobby a bare `lobbyId` names: the first app in policy order that declares `slug`,
    /// and its lobby (PROTOCOL A12).
    pub fn lobby(&self, slug: &str) -> Option<(&App, &Lobby)> {
        let app = self.apps.get(self.lobby_apps.get(slug)?)?;
        Some((app, app.lobbies.get(slug)?))
    }
}

/// A device token or server key, found by the SHA-256 of what the client presented.
#[derive(Debug, Clone)]
pub struct CredentialEntry {
    pub project: Arc<str>,
    pub actor: Arc<str>,
    pub kind: ActorType,
}

/// The whole compiled policy.
#[derive(Debug, Default)]
pub struct Policy {
    pub(crate) projects: HashMap<Arc<str>, Arc<Project>>,
    pub(crate) credentials: HashMap<[u8; 32], CredentialEntry>,
    /// JWT `iss` → project id.
    pub(crate) issuers: HashMap<Arc<str>, Arc<str>>,
}

impl Policy {
    pub fn project(&self, id: &str) -> Option<&Arc<Project>> {
        self.projects.get(id)
    }

    pub fn projects(&self) -> impl Iterator<Item = &Arc<Project>> {
        self.projects.values()
    }

    pub fn credential(&self, sha256: &[u8; 32]) -> Option<&CredentialEntry> {
        self.credentials.get(sha256)
    }

    pub fn project_for_issuer(&self, iss: &str) -> Option<&Arc<Project>> {
        self.issuers.get(iss).and_then(|id| self.projects.get(id))
    }

    /// A one-line summary for logs.
    pub fn summary(&self) -> String {
        let apps: usize = self.projects.values().map(|p| p.apps.len()).sum();
        let actors: usize = self.projects.values().map(|p| p.actors.len()).sum();
        format!(
            "{} projects, {} apps, {} listed actors",
            self.projects.len(),
            apps,
            actors
        )
    }
}
