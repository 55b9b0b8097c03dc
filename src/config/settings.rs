//! Every setting except the policy: YAML shape (`*Spec`, with defaults), validated form, and
//! the validation between them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::auth::AuthCacheSettings;
use crate::diagnostics::{Diagnostics, quoted};
use crate::policy::CompileContext;
use crate::policy::spec::PolicySpec;
use crate::secret::Secret;
use crate::topic::upstream::TopicLayout;
use crate::upstream::{Endpoint, Protocol};

// ---------------------------------------------------------------------------------------
// YAML shape of the whole file. Every field but the policy has a default, so a file holding
// only `policy:` is complete.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct SettingsSpec {
    pub listen: String,
    pub admin: String,
    pub tls: Option<TlsSpec>,
    pub upstream: UpstreamSpec,
    pub limits: LimitsSpec,
    pub auth_cache: AuthCacheSpec,
    pub reload: ReloadSpec,
    pub log: LogSpec,
    pub shutdown: ShutdownSpec,
    pub presence: PresenceSpec,
    pub api: ApiSpec,
    pub webhooks: WebhooksSpec,
    /// Inline policy…
    pub policy: Option<PolicySpec>,
    /// …or a path to a file holding it (relative to the config file).
    pub policy_file: Option<PathBuf>,
}

impl Default for SettingsSpec {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            admin: "127.0.0.1:9090".into(),
            tls: None,
            upstream: UpstreamSpec::default(),
            limits: LimitsSpec::default(),
            auth_cache: AuthCacheSpec::default(),
            reload: ReloadSpec::default(),
            log: LogSpec::default(),
            shutdown: ShutdownSpec::default(),
            presence: PresenceSpec::default(),
            api: ApiSpec::default(),
            webhooks: WebhooksSpec::default(),
            policy: None,
            policy_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct TlsSpec {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct UpstreamSpec {
    pub broker: Option<String>,
    pub brokers: Vec<String>,
    pub protocol: String,
    pub ca_file: Option<PathBuf>,
    pub pool: u64,
    pub username: Option<String>,
    pub password_env: Option<String>,
    pub topic_prefix: String,
    pub client_id_prefix: String,
    pub keep_alive_s: u64,
    pub connect_timeout_ms: u64,
    pub max_filters: u64,
    pub unsubscribe_delay_ms: u64,
    pub embedded_port: u64,
}

impl Default for UpstreamSpec {
    fn default() -> Self {
        Self {
            broker: None,
            brokers: Vec::new(),
            protocol: "auto".into(),
            ca_file: None,
            pool: 4,
            username: None,
            password_env: None,
            topic_prefix: String::new(),
            client_id_prefix: "cuttle".into(),
            keep_alive_s: 30,
            connect_timeout_ms: 5000,
            max_filters: 250_000,
            unsubscribe_delay_ms: 2000,
            embedded_port: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct LimitsSpec {
    pub max_message_bytes: u64,
    pub max_frame_bytes: u64,
    pub publish_per_second: u64,
    pub connections_per_actor: u64,
    pub max_connections: u64,
    pub subscriptions_per_connection: u64,
    pub auth_timeout_ms: u64,
    pub handshake_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub send_queue: u64,
    pub send_queue_bytes: u64,
    pub filters_per_connection: u64,
    pub control_per_second: u64,
    pub filters_per_second: u64,
    pub restore_bytes: u64,
}

impl Default for LimitsSpec {
    fn default() -> Self {
        Self {
            max_message_bytes: 921_600,
            max_frame_bytes: 1_048_576,
            publish_per_second: 50,
            connections_per_actor: 32,
            max_connections: 10_000,
            subscriptions_per_connection: 256,
            auth_timeout_ms: 10_000,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            send_queue: 1024,
            send_queue_bytes: 4 << 20,
            filters_per_connection: 1024,
            control_per_second: 20,
            filters_per_second: 200,
            restore_bytes: 64 << 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct AuthCacheSpec {
    pub capacity: u64,
    pub ttl_s: u64,
}

impl Default for AuthCacheSpec {
    fn default() -> Self {
        let d = AuthCacheSettings::default();
        Self {
            capacity: d.capacity,
            ttl_s: d.ttl.as_secs(),
        }
    }
}

/// `api:` — the `/v1` HTTP API for server actors.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct ApiSpec {
    pub max_body_bytes: u64,
    pub max_batch: u64,
    pub requests_per_second: u64,
    pub messages_per_second: u64,
    pub ack_timeout_ms: u64,
    pub idempotency_ttl_s: u64,
    pub idempotency_bytes: u64,
}

impl Default for ApiSpec {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 << 20,
            max_batch: 100,
            requests_per_second: 100,
            messages_per_second: 1000,
            ack_timeout_ms: 5000,
            idempotency_ttl_s: 600,
            idempotency_bytes: 16 << 20,
        }
    }
}

/// `webhooks:` — delivery bounds shared by every endpoint of every project (the endpoints
/// themselves are in the policy, per project).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct WebhooksSpec {
    pub queue_events: u64,
    pub queue_bytes: u64,
    pub max_in_flight: u64,
    pub timeout_ms: u64,
    pub max_attempts: u64,
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub max_batch: u64,
    pub max_request_bytes: u64,
    pub max_data_bytes: u64,
}

impl Default for WebhooksSpec {
    fn default() -> Self {
        Self {
            queue_events: 10_000,
            queue_bytes: 8 << 20,
            max_in_flight: 4,
            timeout_ms: 5_000,
            max_attempts: 8,
            backoff_ms: 500,
            max_backoff_ms: 60_000,
            max_batch: 100,
            max_request_bytes: 1 << 20,
            max_data_bytes: 64 << 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct ReloadSpec {
    pub debounce_ms: u64,
}

impl Default for ReloadSpec {
    fn default() -> Self {
        Self { debounce_ms: 250 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct LogSpec {
    pub format: String,
    pub level: String,
}

impl Default for LogSpec {
    fn default() -> Self {
        Self {
            format: "pretty".into(),
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct ShutdownSpec {
    pub grace_s: u64,
}

impl Default for ShutdownSpec {
    fn default() -> Self {
        Self { grace_s: 20 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct PresenceSpec {
    pub replica_id: Option<String>,
    pub grace_ms: u64,
    pub heartbeat_ms: u64,
    pub replica_timeout_ms: u64,
    pub max_room_members: u64,
    pub max_state_bytes: u64,
    pub max_data_bytes: u64,
    pub frames_per_second: u64,
    pub lobbies_per_connection: u64,
}

impl Default for PresenceSpec {
    fn default() -> Self {
        Self {
            replica_id: None,
            grace_ms: 5000,
            heartbeat_ms: 1000,
            replica_timeout_ms: 5000,
            max_room_members: 10_000,
            max_state_bytes: 64 << 20,
            max_data_bytes: 4096,
            frames_per_second: 10,
            lobbies_per_connection: 8,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Validated settings.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broker {
    /// rumqttd in-process on a loopback port.
    Embedded,
    /// One broker, or the nodes of a cluster (`upstream.brokers`), in the order given.
    Remote(Vec<Endpoint>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSettings {
    pub broker: Broker,
    /// `upstream.protocol`: MQTT 5, 3.1.1, or MQTT 5 falling back to 3.1.1.
    pub protocol: Protocol,
    /// Extra trust anchors for `mqtts://` brokers (`upstream.ca_file`), besides the system's.
    pub ca_certs: CaCerts,
    pub pool: usize,
    pub username: Option<String>,
    /// Resolved from `password_env` at load time; printed as `<redacted>`.
    pub password: Option<Secret<String>>,
    pub layout: TopicLayout,
    pub client_id_prefix: String,
    pub keep_alive: Duration,
    pub connect_timeout: Duration,
    /// Distinct upstream filters this replica holds at most (every session together).
    pub max_filters: usize,
    /// How long an upstream subscription outlives its last local subscriber, so that a
    /// leave-and-rejoin (a page reload) finds it live instead of churning the broker.
    pub unsubscribe_delay: Duration,
    /// The embedded broker's loopback port (0: any free one). A fixed port lets other
    /// processes on the host (replicas in development, tests) share this broker.
    pub embedded_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_frame_bytes: usize,
    pub publish_per_second: u32,
    pub connections_per_actor: u32,
    pub max_connections: u32,
    pub subscriptions_per_connection: u32,
    pub auth_timeout: Duration,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub send_queue: usize,
    /// Bytes of frames one connection's outbound queue holds at most (besides `send_queue`
    /// frames): a consumer slower than that is closed.
    pub send_queue_bytes: usize,
    /// Distinct upstream filters one connection holds at most.
    pub filters_per_connection: u32,
    /// `subscribe`, `unsubscribe` and `setFilters` frames per second per connection.
    pub control_per_second: u32,
    /// Upstream filters a connection may join per second (bursts of `filters_per_connection`):
    /// what a subscription change costs the broker, whatever the number of frames.
    pub filters_per_second: u32,
    /// Bytes of an actor's stored subscription set (reconnect restore) at most.
    pub restore_bytes: usize,
}

/// The `/v1` API's bounds (`api:`), per replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiSettings {
    /// Largest request body; larger ones get 413 before they are read whole.
    pub max_body_bytes: usize,
    /// Messages in one batch publish.
    pub max_batch: usize,
    /// Requests per second per API key (a token bucket of that burst).
    pub requests_per_second: u32,
    /// Messages per second per API key, over single and batch publishes.
    pub messages_per_second: u32,
    /// How long a publish waits for the broker's acknowledgement before answering 504.
    pub ack_timeout: Duration,
    /// How long an `idempotency_key`'s answer is remembered.
    pub idempotency_ttl: Duration,
    /// Bytes of remembered answers, over all keys (the oldest are forgotten first).
    pub idempotency_bytes: usize,
}

/// Webhook delivery bounds (`webhooks:`), per endpoint and replica (DESIGN §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebhookSettings {
    /// Events waiting per endpoint, at most…
    pub queue_events: usize,
    /// …and bytes of their JSON, at most. What does not fit is dropped and announced.
    pub queue_bytes: usize,
    /// Requests in flight per endpoint (each holds one batch, retries included).
    pub max_in_flight: usize,
    /// One attempt: connect, send, and the receiver's answer.
    pub timeout: Duration,
    /// Attempts per batch before its events are dropped (and announced).
    pub max_attempts: u32,
    /// First retry delay; doubled per attempt, drawn from the upper half of that (jitter), up to `max_backoff`.
    pub backoff: Duration,
    /// Longest wait between attempts, `Retry-After` included.
    pub max_backoff: Duration,
    /// Events per request when an endpoint batches (`batch_window_ms` > 0).
    pub max_batch: usize,
    /// Bytes of one request body at most (a batch is cut to fit).
    pub max_request_bytes: usize,
    /// A publish event carries the message's data up to this size; larger data is left out
    /// (`data_truncated: true`).
    pub max_data_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive; `RUST_LOG` overrides it.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReloadSettings {
    pub debounce: Duration,
}

/// `presence:` (DESIGN §9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceSettings {
    /// This replica's identity among the replicas sharing the broker: stable across
    /// restarts (a restart's new incarnation then replaces the old one's members at once).
    /// `None`: [`PresenceSettings::replica_id_for`] derives one when the proxy starts.
    pub replica_id: Option<String>,
    /// How long a connection closed abnormally stays present (absorbs a reconnect).
    pub grace: Duration,
    /// How often a replica tells the others it is alive.
    pub heartbeat: Duration,
    /// A replica silent this long is dead: its members are reported as left.
    pub replica_timeout: Duration,
    /// Actors present in one room at most.
    pub max_room_members: usize,
    /// Bytes of presence state (every replica's members) one replica holds at most.
    pub max_state_bytes: usize,
    /// Bytes of one `presence` frame's `data` at most.
    pub max_data_bytes: usize,
    /// `presence`, `getPresence` and lobby frames per second per connection.
    pub frames_per_second: u32,
    /// Lobbies one connection follows at most.
    pub lobbies_per_connection: usize,
}

impl PresenceSettings {
    /// The replica id: the configured one, or the host name (a pod's name) and the listen
    /// port, so that two processes on one host differ and a restarted container keeps its
    /// id. Derived at start-up, never compared across reloads.
    pub fn replica_id_for(&self, listen: SocketAddr) -> String {
        if let Some(id) = &self.replica_id {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| {
                !h.is_empty()
                    && h.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            })
            .unwrap_or_else(|| "cuttle".into());
        match listen.port() {
            0 => {
                // An ephemeral port: nothing stable to name; a random id (a restart is a new
                // replica, whose predecessor times out).
                let mut b = [0u8; 4];
                let _ = getrandom::fill(&mut b);
                format!("{host}-{}", hex::encode(b))
            }
            port => format!("{host}-{port}"),
        }
    }
}

/// Everything but the policy, validated. Fixed for the life of the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub tls: Option<TlsSettings>,
    pub upstream: UpstreamSettings,
    pub limits: Limits,
    pub auth_cache: AuthCacheSettings,
    pub reload: ReloadSettings,
    pub log: LogSettings,
    pub shutdown_grace: Duration,
    pub presence: PresenceSettings,
    pub api: ApiSettings,
    pub webhooks: WebhookSettings,
}

impl Settings {
    /// Names of the top-level sections that differ from `other`: what a reload cannot apply.
    pub fn restart_needed(&self, other: &Settings) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let mut check = |name, differs: bool| {
            if differs {
                changed.push(name)
            }
        };
        check("listen", self.listen != other.listen);
        check("admin", self.admin != other.admin);
        check("tls", self.tls != other.tls);
        check("upstream", self.upstream != other.upstream);
        check("limits", self.limits != other.limits);
        check("auth_cache", self.auth_cache != other.auth_cache);
        check("reload", self.reload != other.reload);
        check("log", self.log != other.log);
        check("shutdown", self.shutdown_grace != other.shutdown_grace);
        check("presence", self.presence != other.presence);
        check("api", self.api != other.api);
        check("webhooks", self.webhooks != other.webhooks);
        changed
    }
}

fn socket_addr(value: &str, path: &str, diags: &mut Diagnostics) -> Option<SocketAddr> {
    match value.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            diags.error(
                path,
                format!(
                    "invalid address {}: expected ip:port, e.g. 127.0.0.1:8080 or [::]:8080",
                    quoted(value)
                ),
            );
            None
        }
    }
}

/// Checks `lo <= value <= hi`, reporting at `path`.
fn in_range(value: u64, lo: u64, hi: u64, path: &str, diags: &mut Diagnostics) -> u64 {
    if value < lo || value > hi {
        diags.error(path, format!("{value} is out of range ({lo}..={hi})"));
    }
    value.clamp(lo, hi)
}

/// PEM certificates from `upstream.ca_file`. `Debug` prints only their number.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CaCerts(pub Vec<rustls::pki_types::CertificateDer<'static>>);

impl std::fmt::Debug for CaCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CaCerts({} certificates)", self.0.len())
    }
}

fn parse_protocol(value: &str, diags: &mut Diagnostics) -> Option<Protocol> {
    match value {
        "auto" => Some(Protocol::Auto),
        "v5" | "5" => Some(Protocol::V5),
        "v3" | "v3.1.1" | "3.1.1" | "4" => Some(Protocol::V3),
        other => {
            diags.error(
                "upstream.protocol",
                format!(
                    "unknown protocol {}: expected auto, v5 or v3",
                    quoted(other)
                ),
            );
            None
        }
    }
}

/// `upstream.broker` and `upstream.brokers` together: embedded (neither, or `embedded`), or
/// the remote brokers.
fn parse_brokers(u: &UpstreamSpec, diags: &mut Diagnostics) -> Option<Broker> {
    match (&u.broker, u.brokers.as_slice()) {
        (None, []) => Some(Broker::Embedded),
        (Some(b), []) => parse_broker(b, "upstream.broker", diags),
        (Some(_), [_, ..]) => {
            diags.error(
                "upstream.brokers",
                "set either upstream.broker (one broker) or upstream.brokers (a list), not both",
            );
            None
        }
        (None, list) => {
            let mut endpoints = Vec::new();
            for (i, b) in list.iter().enumerate() {
                let path = format!("upstream.brokers[{i}]");
                match parse_broker(b, &path, diags)? {
                    Broker::Remote(e) => endpoints.extend(e),
                    Broker::Embedded => {
                        diags.error(&path, "`embedded` cannot be one of several brokers");
                        return None;
                    }
                }
            }
            Some(Broker::Remote(endpoints))
        }
    }
}

fn parse_broker(value: &str, path: &str, diags: &mut Diagnostics) -> Option<Broker> {
    if value == "embedded" {
        return Some(Broker::Embedded);
    }
    let bad = |diags: &mut Diagnostics, why: &str| {
        diags.error(
            path,
            format!(
                "invalid broker {}: {why} (expected `embedded`, mqtt://host[:port] or mqtts://host[:port])",
                quoted(&without_userinfo(value))
            ),
        );
        None
    };
    let (tls, rest) = if let Some(r) = value.strip_prefix("mqtt://") {
        (false, r)
    } else if let Some(r) = value.strip_prefix("mqtts://") {
        (true, r)
    } else {
        return bad(diags, "unknown scheme");
    };
    let default_port = if tls { 8883 } else { 1883 };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '@', '?', '#']) {
        return bad(
            diags,
            "only host and port are allowed (credentials go in username/password_env)",
        );
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        match v6.split_once(']') {
            Some((h, "")) => (h, None),
            Some((h, p)) => match p.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None => return bad(diags, "malformed IPv6 address"),
            },
            None => return bad(diags, "malformed IPv6 address"),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return bad(diags, "missing host");
    }
    let host_ok = if rest.starts_with('[') {
        host.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        host.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    };
    if !host_ok {
        return bad(diags, "invalid host");
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => return bad(diags, "invalid port"),
        },
    };
    Some(Broker::Remote(vec![Endpoint {
        host: host.to_string(),
        port,
        tls,
    }]))
}

/// `value` with the `user:password@` part of a URL replaced: a broker URL carrying credentials
/// is refused, and the message saying so must not repeat the password.
fn without_userinfo(value: &str) -> String {
    let Some((scheme, rest)) = value.split_once("://") else {
        return value.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://<redacted>{}", &rest[at..]),
        None => value.to_string(),
    }
}

/// Validates settings, reporting every problem. `None` when any error was reported.
pub(crate) fn validate(
    spec: &SettingsSpec,
    cx: &CompileContext<'_>,
    diags: &mut Diagnostics,
) -> Option<Settings> {
    let before = diags.errors().count();
    let listen = socket_addr(&spec.listen, "listen", diags);
    let admin = socket_addr(&spec.admin, "admin", diags);
    if let (Some(l), Some(a)) = (listen, admin)
        && l == a
        && l.port() != 0
    {
        diags.error("admin", "must differ from listen");
    }

    // The files themselves are read and checked by `crate::tls::load` (config::load).
    let tls = spec.tls.as_ref().map(|t| TlsSettings {
        cert: cx.resolve(&t.cert),
        key: cx.resolve(&t.key),
    });

    let u = &spec.upstream;
    let broker = parse_brokers(u, diags);
    let protocol = parse_protocol(&u.protocol, diags);
    let ca_certs = match &u.ca_file {
        None => Some(CaCerts::default()),
        Some(path) => {
            crate::tls::load_ca_file(&cx.resolve(path), "upstream.ca_file", diags).map(CaCerts)
        }
    };
    let pool = in_range(u.pool, 1, 64, "upstream.pool", diags) as usize;
    let layout = match TopicLayout::new(&u.topic_prefix) {
        Ok(l) => Some(l),
        Err(e) => {
            diags.error(
                "upstream.topic_prefix",
                format!("invalid prefix {}: {e}", quoted(&u.topic_prefix)),
            );
            None
        }
    };
    if u.client_id_prefix.is_empty()
        || u.client_id_prefix.len() > 32
        || !u
            .client_id_prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        diags.error(
            "upstream.client_id_prefix",
            format!(
                "invalid prefix {}: 1-32 characters of a-z, A-Z, 0-9, '-' and '_'",
                quoted(&u.client_id_prefix)
            ),
        );
    }
    let password = match &u.password_env {
        None => None,
        Some(var) => {
            let value = (cx.env)(var);
            if value.is_none() {
                diags.warn(
                    "upstream.password_env",
                    format!(
                        "environment variable {} is not set: connecting without a password",
                        quoted(var)
                    ),
                );
            }
            value.map(Secret::new)
        }
    };
    if password.is_some() && u.username.is_none() {
        diags.error("upstream.password_env", "a password needs a username");
    }
    if broker == Some(Broker::Embedded) && (u.username.is_some() || u.password_env.is_some()) {
        diags.warn(
            "upstream.username",
            "ignored with the embedded broker (it listens on loopback only)",
        );
    }
    let keep_alive_s = in_range(u.keep_alive_s, 5, 3600, "upstream.keep_alive_s", diags);
    let connect_ms = in_range(
        u.connect_timeout_ms,
        100,
        120_000,
        "upstream.connect_timeout_ms",
        diags,
    );

    let max_filters = in_range(
        u.max_filters,
        1,
        crate::upstream::MAX_SUBSCRIPTION_ID as u64 / 2,
        "upstream.max_filters",
        diags,
    ) as usize;
    let embedded_port = in_range(u.embedded_port, 0, 65535, "upstream.embedded_port", diags) as u16;
    let unsubscribe_delay_ms = in_range(
        u.unsubscribe_delay_ms,
        0,
        600_000,
        "upstream.unsubscribe_delay_ms",
        diags,
    );

    let l = &spec.limits;
    let max_frame = in_range(
        l.max_frame_bytes,
        1_048_576,
        64 << 20,
        "limits.max_frame_bytes",
        diags,
    );
    let max_message = in_range(
        l.max_message_bytes,
        1,
        max_frame,
        "limits.max_message_bytes",
        diags,
    );
    let limits = Limits {
        max_message_bytes: max_message as usize,
        max_frame_bytes: max_frame as usize,
        publish_per_second: in_range(
            l.publish_per_second,
            1,
            1_000_000,
            "limits.publish_per_second",
            diags,
        ) as u32,
        connections_per_actor: in_range(
            l.connections_per_actor,
            1,
            1_000_000,
            "limits.connections_per_actor",
            diags,
        ) as u32,
        max_connections: in_range(
            l.max_connections,
            1,
            10_000_000,
            "limits.max_connections",
            diags,
        ) as u32,
        subscriptions_per_connection: in_range(
            l.subscriptions_per_connection,
            1,
            100_000,
            "limits.subscriptions_per_connection",
            diags,
        ) as u32,
        auth_timeout: Duration::from_millis(in_range(
            l.auth_timeout_ms,
            100,
            60_000,
            "limits.auth_timeout_ms",
            diags,
        )),
        handshake_timeout: Duration::from_millis(in_range(
            l.handshake_timeout_ms,
            100,
            60_000,
            "limits.handshake_timeout_ms",
            diags,
        )),
        // PROTOCOL §3: never close an idle client sooner than 60 s.
        idle_timeout: Duration::from_millis(in_range(
            l.idle_timeout_ms,
            60_000,
            3_600_000,
            "limits.idle_timeout_ms",
            diags,
        )),
        send_queue: in_range(l.send_queue, 1, 1_000_000, "limits.send_queue", diags) as usize,
        // One message of the largest size (and its frame) must always fit.
        send_queue_bytes: in_range(
            l.send_queue_bytes,
            max_message + 64 * 1024,
            1 << 30,
            "limits.send_queue_bytes",
            diags,
        ) as usize,
        filters_per_connection: in_range(
            l.filters_per_connection,
            1,
            1_000_000,
            "limits.filters_per_connection",
            diags,
        ) as u32,
        control_per_second: in_range(
            l.control_per_second,
            1,
            1_000_000,
            "limits.control_per_second",
            diags,
        ) as u32,
        filters_per_second: in_range(
            l.filters_per_second,
            1,
            1_000_000,
            "limits.filters_per_second",
            diags,
        ) as u32,
        restore_bytes: in_range(
            l.restore_bytes,
            1024,
            16 << 20,
            "limits.restore_bytes",
            diags,
        ) as usize,
    };

    let auth_cache = AuthCacheSettings {
        capacity: in_range(
            spec.auth_cache.capacity,
            1,
            100_000_000,
            "auth_cache.capacity",
            diags,
        ),
        ttl: Duration::from_secs(in_range(
            spec.auth_cache.ttl_s,
            1,
            3600,
            "auth_cache.ttl_s",
            diags,
        )),
    };
    let reload = ReloadSettings {
        debounce: Duration::from_millis(in_range(
            spec.reload.debounce_ms,
            10,
            60_000,
            "reload.debounce_ms",
            diags,
        )),
    };
    let format = match spec.log.format.as_str() {
        "pretty" => Some(LogFormat::Pretty),
        "json" => Some(LogFormat::Json),
        other => {
            diags.error(
                "log.format",
                format!("unknown format {} (expected pretty or json)", quoted(other)),
            );
            None
        }
    };
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&spec.log.level) {
        diags.error(
            "log.level",
            format!("invalid filter {}: {e}", quoted(&spec.log.level)),
        );
    }
    let grace = in_range(spec.shutdown.grace_s, 0, 3600, "shutdown.grace_s", diags);
    let presence = validate_presence(&spec.presence, diags);
    let a = &spec.api;
    let api = ApiSettings {
        max_body_bytes: in_range(
            a.max_body_bytes,
            1024,
            64 << 20,
            "api.max_body_bytes",
            diags,
        ) as usize,
        max_batch: in_range(a.max_batch, 1, 10_000, "api.max_batch", diags) as usize,
        requests_per_second: in_range(
            a.requests_per_second,
            1,
            1_000_000,
            "api.requests_per_second",
            diags,
        ) as u32,
        messages_per_second: in_range(
            a.messages_per_second,
            1,
            10_000_000,
            "api.messages_per_second",
            diags,
        ) as u32,
        ack_timeout: Duration::from_millis(in_range(
            a.ack_timeout_ms,
            100,
            60_000,
            "api.ack_timeout_ms",
            diags,
        )),
        idempotency_ttl: Duration::from_secs(in_range(
            a.idempotency_ttl_s,
            1,
            86_400,
            "api.idempotency_ttl_s",
            diags,
        )),
        idempotency_bytes: in_range(
            a.idempotency_bytes,
            0,
            1 << 30,
            "api.idempotency_bytes",
            diags,
        ) as usize,
    };

    let webhooks = validate_webhooks(&spec.webhooks, diags);

    if diags.errors().count() > before {
        return None;
    }
    Some(Settings {
        listen: listen?,
        admin: admin?,
        tls,
        upstream: UpstreamSettings {
            broker: broker?,
            protocol: protocol?,
            ca_certs: ca_certs?,
            pool,
            username: u.username.clone(),
            password,
            layout: layout?,
            client_id_prefix: u.client_id_prefix.clone(),
            keep_alive: Duration::from_secs(keep_alive_s),
            connect_timeout: Duration::from_millis(connect_ms),
            max_filters,
            unsubscribe_delay: Duration::from_millis(unsubscribe_delay_ms),
            embedded_port,
        },
        limits,
        auth_cache,
        reload,
        log: LogSettings {
            format: format?,
            level: spec.log.level.clone(),
        },
        shutdown_grace: Duration::from_secs(grace),
        presence: presence?,
        api,
        webhooks,
    })
}

fn validate_webhooks(w: &WebhooksSpec, diags: &mut Diagnostics) -> WebhookSettings {
    let mut range = |v, lo, hi, name: &str| in_range(v, lo, hi, &format!("webhooks.{name}"), diags);
    let settings = WebhookSettings {
        queue_events: range(w.queue_events, 1, 10_000_000, "queue_events") as usize,
        queue_bytes: range(w.queue_bytes, 4096, 4 << 30, "queue_bytes") as usize,
        max_in_flight: range(w.max_in_flight, 1, 256, "max_in_flight") as usize,
        timeout: Duration::from_millis(range(w.timeout_ms, 100, 120_000, "timeout_ms")),
        max_attempts: range(w.max_attempts, 1, 100, "max_attempts") as u32,
        backoff: Duration::from_millis(range(w.backoff_ms, 1, 600_000, "backoff_ms")),
        max_backoff: Duration::from_millis(range(w.max_backoff_ms, 1, 3_600_000, "max_backoff_ms")),
        max_batch: range(w.max_batch, 1, 10_000, "max_batch") as usize,
        max_request_bytes: range(w.max_request_bytes, 1024, 64 << 20, "max_request_bytes") as usize,
        max_data_bytes: range(w.max_data_bytes, 0, 16 << 20, "max_data_bytes") as usize,
    };
    if settings.max_backoff < settings.backoff {
        diags.error(
            "webhooks.max_backoff_ms",
            "must be at least webhooks.backoff_ms",
        );
    }
    settings
}

fn validate_presence(p: &PresenceSpec, diags: &mut Diagnostics) -> Option<PresenceSettings> {
    let mut ok = true;
    let replica_id = match &p.replica_id {
        Some(id) => {
            if id.is_empty()
                || id.len() > 128
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                diags.error(
                    "presence.replica_id",
                    format!(
                        "invalid replica id {}: 1 to 128 of A-Z a-z 0-9 - _ .",
                        quoted(id)
                    ),
                );
                ok = false;
            }
            Some(id.clone())
        }
        None => None,
    };
    let heartbeat = in_range(p.heartbeat_ms, 100, 60_000, "presence.heartbeat_ms", diags);
    let timeout = in_range(
        p.replica_timeout_ms,
        500,
        600_000,
        "presence.replica_timeout_ms",
        diags,
    );
    if timeout < 2 * heartbeat {
        diags.error(
            "presence.replica_timeout_ms",
            format!(
                "{timeout} must be at least twice presence.heartbeat_ms ({heartbeat}), or one late heartbeat kills a live replica"
            ),
        );
        ok = false;
    }
    let settings = PresenceSettings {
        replica_id,
        grace: Duration::from_millis(in_range(p.grace_ms, 0, 600_000, "presence.grace_ms", diags)),
        heartbeat: Duration::from_millis(heartbeat),
        replica_timeout: Duration::from_millis(timeout),
        max_room_members: in_range(
            p.max_room_members,
            1,
            10_000_000,
            "presence.max_room_members",
            diags,
        ) as usize,
        max_state_bytes: in_range(
            p.max_state_bytes,
            64 << 10,
            16 << 30,
            "presence.max_state_bytes",
            diags,
        ) as usize,
        max_data_bytes: in_range(
            p.max_data_bytes,
            2,
            crate::presence::message::MAX_DATA_BYTES as u64,
            "presence.max_data_bytes",
            diags,
        ) as usize,
        frames_per_second: in_range(
            p.frames_per_second,
            1,
            10_000,
            "presence.frames_per_second",
            diags,
        ) as u32,
        lobbies_per_connection: in_range(
            p.lobbies_per_connection,
            1,
            1024,
            "presence.lobbies_per_connection",
            diags,
        ) as usize,
    };
    ok.then_some(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let mut d = Diagnostics::new();
        let cx = CompileContext::new(std::path::Path::new("."), &|_| None);
        let s = validate(&SettingsSpec::default(), &cx, &mut d).expect("defaults are valid");
        assert!(d.is_empty(), "{d}");
        assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.upstream.broker, Broker::Embedded);
        assert_eq!(s.upstream.pool, 4);
        assert_eq!(s.limits.max_message_bytes, 921_600);
        assert_eq!(s.limits.publish_per_second, 50);
        assert_eq!(s.limits.idle_timeout, Duration::from_secs(60));
    }

    #[test]
    fn brokers() {
        let mut d = Diagnostics::new();
        assert_eq!(
            parse_broker("mqtt://localhost", "upstream.broker", &mut d),
            Some(Broker::Remote(vec![Endpoint {
                host: "localhost".into(),
                port: 1883,
                tls: false
            }]))
        );
        assert_eq!(
            parse_broker("mqtts://[::1]:9883", "upstream.broker", &mut d),
            Some(Broker::Remote(vec![Endpoint {
                host: "::1".into(),
                port: 9883,
                tls: true
            }]))
        );
        assert!(d.is_empty());
        for bad in [
            "tcp://x:1",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:x",
            "mqtt://u:p@h",
            "mqtt://[::1",
            "mqtt://::1",
            "mqtt://ho st:1",
            "mqtt://[nothex]:1",
        ] {
            let mut d = Diagnostics::new();
            assert_eq!(parse_broker(bad, "upstream.broker", &mut d), None, "{bad}");
            assert!(d.to_string().contains("upstream.broker"), "{d}");
        }
    }

    #[test]
    fn credentials_in_a_broker_url_are_refused_without_being_repeated() {
        for url in [
            "mqtt://cuttle:hunter2-pw@broker:1883",
            "mqtts://hunter2-pw@broker",
            "mqtt://cuttle:hunter2-pw@broker/x?y",
        ] {
            let mut d = Diagnostics::new();
            assert_eq!(parse_broker(url, "upstream.broker", &mut d), None, "{url}");
            let message = d.to_string();
            assert!(message.contains("<redacted>@broker"), "{message}");
            assert!(!message.contains("hunter2"), "{message}");
        }
        assert_eq!(without_userinfo("mqtt://h:1/a@b"), "mqtt://h:1/a@b");
        assert_eq!(without_userinfo("embedded"), "embedded");
    }
}
