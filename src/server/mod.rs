//! The network edge: the client listener (WebSocket at `/ws`), the admin listener
//! (`/healthz`, `/readyz`), and the per-connection session.
//!
//! [`Proxy::start`] wires the process together — embedded broker (if configured), upstream
//! pool, router — and [`Proxy::serve`] runs the listeners on already-bound sockets, so tests
//! bind port 0 and run the real server in-process.

mod api;
pub mod control;
pub use api::ROUTES as API_ROUTES;
mod http;
pub mod restore;
mod session;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Broker, Loaded, Settings};
use crate::metrics::Metrics;
use crate::reload::PolicyStore;
use crate::router::Router;
use crate::upstream::{Endpoint, Pool};

pub use session::CloseReason;

/// Bytes of MQTT packet allowed beyond the payload limit (topic, envelope, properties).
const PACKET_OVERHEAD: usize = 64 * 1024;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[cfg(feature = "embedded-broker")]
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    #[cfg(not(feature = "embedded-broker"))]
    #[error("upstream.broker is `embedded`, but this build has no embedded broker")]
    NoEmbeddedBroker,
    #[error("cannot bind {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

/// Live connections per actor: their count, for `limits.connections_per_actor`, and the
/// channel a disconnect request reaches them on (`control`).
/// (project, actor id).
type ActorKey = (Arc<str>, Arc<str>);

/// What a session of an actor watches for a disconnect request.
pub(crate) type KickWatch = watch::Receiver<Option<Arc<control::Disconnect>>>;

#[derive(Debug, Default)]
pub(crate) struct ActorConnections(Mutex<HashMap<ActorKey, (u32, control::Kicks)>>);

impl ActorConnections {
    /// Takes a slot for (project, actor) if fewer than `max` are in use; the session watches
    /// the returned receiver for disconnect requests.
    pub(crate) fn acquire(
        &self,
        project: &Arc<str>,
        actor: &Arc<str>,
        max: u32,
    ) -> Option<KickWatch> {
        let mut m = self.0.lock();
        let (n, kicks) = m
            .entry((project.clone(), actor.clone()))
            .or_insert_with(|| (0, watch::channel(None).0));
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(kicks.subscribe())
    }

    pub(crate) fn release(&self, project: &Arc<str>, actor: &Arc<str>) {
        let mut m = self.0.lock();
        let key = (project.clone(), actor.clone());
        if let Some((n, _)) = m.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&key);
            }
        }
    }

    /// Sends `d` to the sessions of its actor here; how many sessions were told.
    fn kick(&self, d: &control::Disconnect) -> usize {
        let m = self.0.lock();
        let key: ActorKey = (d.project.as_str().into(), d.actor.as_str().into());
        match m.get(&key) {
            Some((n, kicks)) => {
                kicks.send_replace(Some(Arc::new(d.clone())));
                *n as usize
            }
            None => 0,
        }
    }
}

/// Everything a connection needs, shared by all of them.
pub struct Proxy {
    pub store: Arc<PolicyStore>,
    pub router: Arc<Router>,
    pub pool: Arc<Pool>,
    /// Writes reconnect-restore records, coalesced per actor.
    pub restore: Arc<restore::RestoreWriter>,
    /// Room presence and lobbies, shared with the other replicas through the broker.
    pub presence: Arc<crate::presence::Presence>,
    /// Where the embedded broker listens (loopback), when `upstream.broker` is `embedded`.
    pub embedded_broker: Option<SocketAddr>,
    /// Every `cuttle_*` series (served at `/metrics`).
    pub metrics: Arc<Metrics>,
    /// Events of this replica's connections, to each project's backend.
    pub webhooks: Arc<crate::webhook::Webhooks>,
    /// Each session's queued outbox bytes, summed at scrape time (`cuttle_outbox_bytes`).
    outboxes: OutboxBytes,
    /// The `/v1` API's rate buckets and idempotency cache.
    api: api::Api,
    pub settings: Settings,
    /// `limits.max_connections`, shared by handshakes and sessions.
    connections: Arc<http::Slots>,
    admin_slots: Arc<http::Slots>,
    pub(crate) actors: ActorConnections,
    next_session: AtomicU64,
    /// WebSocket sessions currently running.
    sessions: AtomicUsize,
    /// Random per process: socket ids (echo suppression) must be unique across replicas.
    instance: String,
    shutdown: watch::Sender<bool>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Starts the embedded broker (if configured), the upstream pool and the router. Must be
    /// called inside a Tokio runtime.
    pub fn start(loaded: Loaded) -> Result<Arc<Self>, StartError> {
        let settings = loaded.settings.clone();
        let (endpoints, embedded) = match &settings.upstream.broker {
            #[cfg(feature = "embedded-broker")]
            Broker::Embedded => {
                let b = crate::broker::start(
                    settings.limits.max_frame_bytes + PACKET_OVERHEAD,
                    settings.upstream.pool * 4 + 64,
                    settings.upstream.embedded_port,
                    settings.upstream.protocol == crate::upstream::Protocol::V3,
                )?;
                let endpoint = Endpoint {
                    host: b.addr.ip().to_string(),
                    port: b.addr.port(),
                    tls: false,
                };
                (vec![endpoint], Some(b.addr))
            }
            #[cfg(not(feature = "embedded-broker"))]
            Broker::Embedded => return Err(StartError::NoEmbeddedBroker),
            Broker::Remote(endpoints) => (endpoints.clone(), None),
        };
        let mut instance = [0u8; 4];
        let _ = getrandom::fill(&mut instance);
        Ok(Self::assemble(
            loaded,
            endpoints,
            hex::encode(instance),
            true,
            embedded,
        ))
    }

    /// The proxy's parts on a pool to `endpoint`; `attach`: the router waits for the broker's
    /// SUBACKs and unsubscribes through the pool (always, but in unit tests).
    fn assemble(
        loaded: Loaded,
        endpoints: Vec<Endpoint>,
        instance: String,
        attach: bool,
        embedded_broker: Option<SocketAddr>,
    ) -> Arc<Self> {
        let settings = loaded.settings.clone();
        let max_packet = settings.limits.max_frame_bytes + PACKET_OVERHEAD;
        let store = PolicyStore::new(loaded);
        let metrics = Metrics::new();
        let router = Router::with_metrics(store.clone(), metrics.router.clone());
        let presence = crate::presence::Presence::new(
            &settings.presence,
            &settings.presence.replica_id_for(settings.listen),
            &settings.upstream.layout,
            max_packet / 2,
        );
        router.attach_presence(&presence);
        let will = (presence.topic().to_string(), presence.will());
        let pool = Pool::start_with_will(
            &settings.upstream,
            endpoints,
            max_packet,
            router.clone(),
            Some(will),
            metrics.upstream.clone(),
        );
        if attach {
            router.attach(pool.clone());
        }
        presence.attach(pool.clone());
        if attach {
            let filter: Arc<str> = settings.upstream.layout.control_filter().into();
            pool.subscribe(&filter, control::SUBSCRIPTION_ID);
        }
        let restore = restore::RestoreWriter::start(pool.clone());
        let webhooks = crate::webhook::Webhooks::new(
            store.clone(),
            settings.webhooks,
            presence.replica_id(),
            presence.incarnation(),
            metrics.webhooks.clone(),
        );
        presence.attach_webhooks(webhooks.clone());
        let (shutdown, _) = watch::channel(false);
        let proxy = Arc::new(Self {
            store,
            router,
            pool,
            restore,
            presence,
            embedded_broker,
            metrics,
            webhooks,
            outboxes: OutboxBytes::default(),
            api: api::Api::new(&settings.api),
            connections: http::Slots::new(settings.limits.max_connections as usize),
            admin_slots: http::Slots::new(http::ADMIN_MAX_CONNECTIONS),
            actors: ActorConnections::default(),
            next_session: AtomicU64::new(1),
            sessions: AtomicUsize::new(0),
            instance,
            settings,
            shutdown,
        });
        proxy
            .router
            .attach_control(Box::new(control::Sink(Arc::downgrade(&proxy))));
        proxy
    }

    /// A proxy for unit tests of the session machinery, with no broker and no listener.
    ///
    /// The router has no pool attached, so every new upstream filter is live at once (nothing
    /// would answer a SUBSCRIBE) and an emptied entry is dropped at once (no linger). The pool
    /// exists because publishes and the restore writer need one; it points at a loopback port
    /// nothing listens on, so it never connects: publishes are accepted into its queue and
    /// never acknowledged. Must be called inside a Tokio runtime.
    #[cfg(test)]
    pub(crate) fn without_broker(loaded: Loaded) -> Arc<Self> {
        let endpoint = Endpoint {
            host: "127.0.0.1".into(),
            port: 1,
            tls: false,
        };
        Self::assemble(loaded, vec![endpoint], "test".into(), false, None)
    }

    /// Ready: policy loaded (always, once constructed), upstream connected, not draining.
    pub fn is_ready(&self) -> bool {
        self.pool.is_ready() && !self.is_draining()
    }

    /// The drain (SIGTERM) has begun.
    pub fn is_draining(&self) -> bool {
        *self.shutdown.borrow()
    }

    pub(crate) fn new_session_id(&self) -> (u64, Arc<str>) {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        (id, format!("{}-{id}", self.instance).into())
    }

    /// Tells every session to close and the listeners to stop accepting.
    pub fn begin_shutdown(&self) {
        // Every member of this replica leaves now, here and (one goodbye) on the others.
        if !self.shutdown.send_replace(true) {
            self.presence.goodbye();
        }
    }

    pub(crate) fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Serves clients on `listener` until shutdown, and the admin endpoints on `admin` until
    /// the returned future is dropped (it does not complete on its own).
    pub async fn serve(self: &Arc<Self>, listener: TcpListener, admin: TcpListener) {
        let clients = tokio::spawn(http::accept_loop(
            self.clone(),
            listener,
            self.connections.clone(),
            http::Role::Client,
        ));
        let mut admin = AbortOnDrop(tokio::spawn(http::accept_loop(
            self.clone(),
            admin,
            self.admin_slots.clone(),
            http::Role::Admin,
        )));
        let _ = clients.await;
        // Draining: the admin port answers on (/readyz 503, /metrics) until this task is
        // aborted at exit.
        let _ = (&mut admin.0).await;
    }

    /// WebSocket sessions currently open.
    pub fn open_connections(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Client-port connections holding a `limits.max_connections` slot: those still in their
    /// handshake or HTTP exchange, and WebSocket sessions.
    pub fn connection_slots_in_use(&self) -> usize {
        self.connections.held()
    }

    /// Admin-port connections open.
    pub fn admin_slots_in_use(&self) -> usize {
        self.admin_slots.held()
    }

    /// The state half of the metrics, read now from the components that own it.
    pub fn metrics_state(&self) -> crate::metrics::State {
        let snapshot = self.store.load();
        let loaded_unix = snapshot
            .loaded_at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let stats = &self.store.stats;
        crate::metrics::State {
            policy_generation: snapshot.generation,
            policy_loaded_unix: loaded_unix,
            reloads_ok: stats.succeeded.load(Ordering::Relaxed),
            reloads_failed: stats.failed.load(Ordering::Relaxed),
            reloads_unchanged: stats.unchanged.load(Ordering::Relaxed),
            tls_rotations: stats.tls_rotated.load(Ordering::Relaxed),
            upstream_pool: self.pool.size(),
            upstream_up: self.pool.connected(),
            upstream_filters: self.router.filter_count(),
            upstream_orphans: self.router.orphans.load(Ordering::Relaxed) as u64,
            local_subscriptions: self.router.subscription_count(),
            outbox_bytes: self.outboxes.total(),
            connection_slots_in_use: self.connections.held(),
            max_connections: self.settings.limits.max_connections as usize,
            auth_verifications: snapshot.auth.verifications(),
            presence: self.presence.metrics(),
            webhooks: self.webhooks.state(),
        }
    }

    /// Counts `bytes` (a session's queued outbox bytes) in `cuttle_outbox_bytes` until the
    /// returned guard is dropped.
    pub(crate) fn track_outbox(
        self: &Arc<Self>,
        session: u64,
        bytes: Arc<AtomicUsize>,
    ) -> OutboxTracked {
        self.outboxes.0.lock().insert(session, bytes);
        OutboxTracked(self.clone(), session)
    }

    /// Closes this replica's sessions of `d`'s actor in `d`'s namespaces (4001
    /// `disconnected_by_server`); how many of the actor's sessions were told.
    pub(crate) fn kick(&self, d: &control::Disconnect) -> usize {
        self.actors.kick(d)
    }

    pub(crate) fn session_started(&self) {
        self.sessions.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn session_ended(&self) {
        self.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The queued-bytes counters of the open sessions' outboxes, by session id. Touched once
/// when a session starts and once when it ends; summed only when Prometheus scrapes, so the
/// delivery path pays nothing for `cuttle_outbox_bytes`.
#[derive(Debug, Default)]
struct OutboxBytes(Mutex<HashMap<u64, Arc<AtomicUsize>>>);

impl OutboxBytes {
    fn total(&self) -> usize {
        // One relaxed load per session under the lock (≈ 0.1 ms for 100,000 sessions).
        self.0
            .lock()
            .values()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }
}

/// A session's outbox, counted in `cuttle_outbox_bytes` until dropped.
pub(crate) struct OutboxTracked(Arc<Proxy>, u64);

impl Drop for OutboxTracked {
    fn drop(&mut self) {
        self.0.outboxes.0.lock().remove(&self.1);
    }
}

/// Aborts a task when dropped: the admin listener goes with the task serving it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Completes when `rx` reports shutdown (or its sender is gone).
pub(crate) async fn shutting_down(rx: &mut watch::Receiver<bool>) {
    // The `Ref` guard is dropped here, never held across another await.
    let _ = rx.wait_for(|s| *s).await;
}

/// Binds the client and admin listeners of `settings`.
pub async fn bind(settings: &Settings) -> Result<(TcpListener, TcpListener), StartError> {
    let l = TcpListener::bind(settings.listen)
        .await
        .map_err(|e| StartError::Bind(settings.listen, e))?;
    let a = TcpListener::bind(settings.admin)
        .await
        .map_err(|e| StartError::Bind(settings.admin, e))?;
    Ok((l, a))
}
