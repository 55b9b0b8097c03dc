//! The policy as written in YAML (DESIGN §3, §5): plain serde structs, no meaning yet.
//!
//! Enum-like values (actor types, permissions, algorithms) and identifiers are kept as strings
//! here on purpose: a serde enum would abort the whole parse at the first unknown value, while
//! `compile` reports every bad value with its path in one pass.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// `policy:` (inline) or the whole content of `policy_file`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PolicySpec {
    #[serde(default)]
    pub projects: Vec<ProjectSpec>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ProjectSpec {
    pub id: String,
    #[serde(default)]
    pub jwt: Option<JwtSpec>,
    #[serde(default)]
    pub session: Option<SessionSpec>,
    #[serde(default)]
    pub scopes: Vec<ScopeSpec>,
    /// role name → (`topic` or `app/topic`) → permission.
    #[serde(default)]
    pub roles: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    pub apps: Vec<AppSpec>,
    #[serde(default)]
    pub actors: Vec<ActorSpec>,
    #[serde(default)]
    pub webhooks: Vec<WebhookSpec>,
}

/// One webhook endpoint of a project (DESIGN §10).
#[derive(Debug, Clone, Deserialize)]
pub struct WebhookSpec {
    pub url: String,
    /// The variable holding the signing secret (`whsec_` + base64, Standard Webhooks).
    pub secret_env: String,
    /// Event types sent: `connect`, `disconnect`, `subscribe`, `unsubscribe`, `publish`,
    /// `presence`.
    #[serde(default)]
    pub events: Vec<String>,
    /// Publish events only for topics matching one of these `app/room/topic` filters.
    #[serde(default)]
    pub topics: Option<Vec<String>>,
    /// Private, loopback and link-local targets are refused unless this is set.
    #[serde(default)]
    pub allow_private: bool,
    /// Collect events this long and send them as one JSON array (0: one event per request).
    #[serde(default)]
    pub batch_window_ms: u64,
}

/// User JWT verification for one project.
#[derive(Debug, Clone, Deserialize)]
pub struct JwtSpec {
    /// The `iss` this project's tokens carry; it selects the project.
    pub issuer: String,
    /// Required `aud` value.
    pub audience: String,
    /// Accepted `alg` values, all of one family (HMAC, RSA, EC or EdDSA).
    pub algorithms: Vec<String>,
    /// Shorthand for a single key without `kid`: an HMAC secret from this variable…
    #[serde(default)]
    pub secret_env: Option<String>,
    /// …or a PEM public key file (RSA, EC or Ed25519).
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    /// Additional keys, selected by the token's `kid` (key rotation).
    #[serde(default)]
    pub keys: Vec<JwtKeySpec>,
    /// Claim holding the access-scope slug (default `scope`).
    #[serde(default)]
    pub scope_claim: Option<String>,
    /// Claim holding the role names, an array or a space-separated string (default `roles`).
    #[serde(default)]
    pub roles_claim: Option<String>,
    /// Clock skew tolerated on `exp`/`nbf`, in seconds (default 30, at most 300).
    #[serde(default)]
    pub leeway_s: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct JwtKeySpec {
    #[serde(default)]
    pub kid: Option<String>,
    #[serde(default)]
    pub secret_env: Option<String>,
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
}

/// Guest session tokens for one project.
#[derive(Debug, Clone, Deserialize)]
pub struct SessionSpec {
    pub secret_env: String,
    #[serde(default = "default_max_ttl_s")]
    pub max_ttl_s: u64,
}

fn default_max_ttl_s() -> u64 {
    3600
}

#[derive(Debug, Clone, Deserialize)]
pub struct ScopeSpec {
    pub slug: String,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AppSpec {
    pub slug: String,
    /// topic name → actor type → permission.
    #[serde(default)]
    pub topics: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    pub rooms: Vec<RoomSpec>,
    #[serde(default)]
    pub lobbies: Vec<LobbySpec>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RoomSpec {
    pub slug: String,
    /// Actor ids; non-empty makes the room private.
    #[serde(default)]
    pub actors: Vec<String>,
}

/// A lobby: the presence of several rooms of one app, seen together (DESIGN §9).
#[derive(Debug, Clone, Deserialize)]
pub struct LobbySpec {
    pub slug: String,
    /// Room slugs of the same app. Defaulted so that a lobby without `rooms` gets the
    /// compile diagnostic (with every other problem) instead of aborting the parse.
    #[serde(default)]
    pub rooms: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ActorSpec {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub token_sha256: Option<String>,
    #[serde(default)]
    pub api_key_sha256: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
    /// Server actors only: the scopes the HTTP API may address for it (DESIGN §3, "Reaching
    /// tenants from the backend"): a list of slugs, or `"*"` for every scope of the project.
    #[serde(default)]
    pub scopes: Option<ScopeGrantSpec>,
}

/// `scopes:` of a server actor: `"*"` or `[slug, …]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ScopeGrantSpec {
    All(String),
    List(Vec<String>),
}
