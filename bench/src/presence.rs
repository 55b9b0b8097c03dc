//! Presence across replicas (issue 9): how long two cuttle replicas sharing one broker take
//! to agree on who is in a room after a join storm and after everyone left, what that costs
//! on the broker, and what the storm does to an unrelated message stream.
//!
//! Two replicas, `a` (the target as started, [`Profile::Presence`]) and `b`
//! ([`Running::start_replica`]), share the target's broker and the topic prefix
//! [`PRESENCE_PREFIX`], so they exchange presence on `bench/_/presence/v1/<replica>`. For
//! cuttle-embedded, `b` connects to `a`'s in-process broker (its loopback port is read from
//! `/proc`), so that broker's work counts in `a`'s CPU. Members are distinct device actors
//! (presence is per actor), alternately on `a` and `b`, so every room has members on both.
//!
//! Each storm (a mode of the records):
//! - **big-room**: N members connect, then all send `presence {roomId: general}` at once, as
//!   fast as the clients go. One observer connection per replica (not a member) polls
//!   `getPresence {roomId: general}` every 100 ms (the default `presence.frames_per_second`
//!   is 10): the figure is the time from the first `presence` frame until *both* replicas
//!   list all N. Then every member closes (a clean close frame) at once, and the same
//!   observers time until both lists are empty.
//! - **small-rooms**: the same with many rooms of a few members (1,000 × 10). Polling 1,000
//!   rooms at 10 requests/s would take 100 s a round, so the observers use lobbies (the
//!   policy groups the rooms into lobbies of 250): one observer connection per lobby and
//!   replica polls `getLobbyPresence`, whose one reply lists every member of 250 rooms.
//! - **big-room-default-limits**: the big room again on a second pair of replicas (`c`, `d`,
//!   another prefix) with the default `limits.send_queue` (1,024 frames), to show whether the
//!   storm disconnects members as slow consumers there. The first pair runs with a send
//!   queue of 4 N + 1,024 frames so that it does not: a member that joins k-th receives the
//!   `join` and `update` of everyone after it, N² event frames in all for a storm of N
//!   (inherent in PROTOCOL §11), and a member's queue holds what its client has not read yet.
//!   (Not in `--smoke`: the same code as the big room, on another pair.)
//!
//! Besides the convergence times, per storm: the presence messages and bytes on the broker
//! (a plain MQTT 5 client subscribed to `bench/_/presence/v1/#` counts topic + payload bytes
//! of every message by kind, decoded with cuttle's own [`Message::decode`]) and, apart, the
//! reconnect-restore records the joins rewrote (`bench/_/restore/v2/#`: the room a member
//! is in is remembered for its reconnect), the event frames the members received and when
//! the last one arrived, the slowest observer round trip (a `getPresence` waits for the
//! presence lock), closes and error frames the members (and the bystander's publishers) got,
//! and both replicas' CPU.
//!
//! The **bystander** is a fan-out stream like the noisy-neighbour victim: publishers (one
//! per replica) at a fixed rate to subscribers on both replicas, its latency measured alone
//! (members connected and idle) and during each join and leave storm; the report gives the
//! ratio. The members run on their own runtime at nice 10 (as the noisy-neighbour attacker
//! does): on this 2-core machine they share the CPU with both replicas and the measuring
//! clients, and at a lower priority they cannot starve the bystander's and the observers'
//! clients in the tool's own scheduler.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use cuttle::presence::message::{Body, Message};
use cuttle::wire::msgpack::Reader;
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::scenario::{self, CpuMeter, Plan, Record, Shared, print_record};
use crate::sys;
use crate::targets::{PRESENCE_PREFIX, PresenceLayout, Profile, Running, presence_lobbies};
use crate::wire::{BoxIo, Client, Endpoint, STEP_TIMEOUT};

/// Record modes.
pub const ALONE: &str = "alone";
pub const BIG_ROOM: &str = "big-room";
pub const SMALL_ROOMS: &str = "small-rooms";
pub const BIG_ROOM_DEFAULTS: &str = "big-room-default-limits";

/// The big room's slug.
const GENERAL: &str = "general";
/// Topic prefix of the default-limits pair (its own presence, apart from `a` and `b`).
const DEFAULTS_PREFIX: &str = "benchd";
/// An observer polls at most this often: the default `presence.frames_per_second` is 10.
const POLL: Duration = Duration::from_millis(100);
/// After the lists converged, no member event for this long: the storm's fan-out is over.
const QUIET: Duration = Duration::from_millis(300);

type Ws = WebSocketStream<BoxIo>;

/// How big the storms are.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Members of the big room.
    pub big_room: usize,
    /// Small rooms and members in each.
    pub rooms: usize,
    pub room_size: usize,
    /// Rooms per lobby (at most 256, the policy's limit).
    pub lobby_rooms: usize,
    pub bystanders: usize,
    pub bystander_rate: f64,
    pub bystander_payload: usize,
    /// The bystander's phase alone.
    pub alone: Duration,
    /// Longest a storm's join or leave may take before its figures count as missing.
    pub storm_timeout: Duration,
    /// Run the big room once more with the default `limits.send_queue`.
    pub default_limits: bool,
}

impl Shape {
    pub fn full(duration: Duration) -> Self {
        Shape {
            big_room: 5000,
            rooms: 1000,
            room_size: 10,
            lobby_rooms: 250,
            bystanders: 50,
            bystander_rate: 200.0,
            bystander_payload: 1024,
            alone: duration,
            storm_timeout: Duration::from_secs(120),
            default_limits: true,
        }
    }

    /// Seconds in all: CI keeps it compiling and working, nothing more.
    pub fn smoke() -> Self {
        Shape {
            big_room: 100,
            rooms: 20,
            room_size: 5,
            bystanders: 10,
            bystander_rate: 100.0,
            alone: Duration::from_millis(500),
            storm_timeout: Duration::from_secs(20),
            // The same code as the big room on another pair: not worth its seconds in CI.
            default_limits: false,
            ..Shape::full(Duration::from_secs(1))
        }
    }

    /// Members of the largest storm: actors `p0`… are members, those after them observers
    /// and bystanders.
    fn members(&self) -> usize {
        self.big_room.max(self.rooms * self.room_size)
    }

    fn lobbies(&self) -> usize {
        self.rooms.div_ceil(self.lobby_rooms.max(1))
    }

    /// The first replica pair's send queue: a member's whole share of a storm fits.
    pub fn send_queue(&self) -> usize {
        4 * self.big_room.max(self.room_size) + 1024
    }

    /// The policy the replicas are started with.
    pub fn layout(&self) -> PresenceLayout {
        let observers = 2 * self.lobbies().max(1);
        PresenceLayout {
            actors: self.members() + observers + self.bystanders + 2,
            rooms: self.rooms,
            lobby_rooms: self.lobby_rooms,
            send_queue: Some(self.send_queue()),
        }
    }

    fn observer_actor(&self, j: usize) -> usize {
        self.members() + j
    }

    fn bystander_actor(&self, j: usize) -> usize {
        self.members() + 2 * self.lobbies().max(1) + j
    }
}

/// Presence messages on the broker in a window, by kind (topic + payload bytes).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Traffic {
    pub deltas: u64,
    pub delta_bytes: u64,
    pub snapshots: u64,
    pub snapshot_bytes: u64,
    pub heartbeats: u64,
    pub heartbeat_bytes: u64,
    /// Sync requests (hello), goodbyes, wills, and anything undecodable.
    pub other: u64,
    pub other_bytes: u64,
    /// Reconnect-restore records (not presence: what the joins also cost the broker).
    #[serde(default)]
    pub restores: u64,
    #[serde(default)]
    pub restore_bytes: u64,
}

/// One half of a storm (everyone joins, or everyone closes).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Storm {
    /// Per replica: ms from the first frame sent until its observers listed every member
    /// (join) or none (leave); None: not within the storm timeout.
    pub listed_ms: Vec<Option<f64>>,
    /// The later of the replicas: both agree.
    pub both_ms: Option<f64>,
    /// Members each replica's observers listed at their last poll.
    pub last_listed: Vec<usize>,
    pub polls: u64,
    /// Slowest observer round trip (request → list), ms.
    pub poll_max_ms: Option<f64>,
    /// Presence event frames (`join`, `update`, `leave`) the members received.
    pub events: u64,
    /// ms from the first frame until the last event any member received.
    pub last_event_ms: Option<f64>,
    /// The replicas' presence messages (None: no monitor).
    pub traffic: Option<Traffic>,
    pub bystander_p50_us: Option<f64>,
    pub bystander_p99_us: Option<f64>,
    pub bystander_published_per_s: Option<f64>,
    /// Bystander deliveries lost, and its clients disconnected.
    pub bystander_lost: Option<u64>,
    /// Closes the proxy sent members before they closed, by code (0: the socket ended); in
    /// a leave, close replies other than 1000.
    pub closed: BTreeMap<u16, u64>,
    /// Error frames members and observers got, by `error`.
    pub errors: BTreeMap<String, u64>,
    /// Both replicas' CPU over the storm (1.0 = one core busy).
    pub replica_cores: Option<f64>,
    /// Each replica's peak RSS during the storm, MiB (sampled every 100 ms; for
    /// cuttle-embedded, `a` holds the broker too).
    #[serde(default)]
    pub replica_rss_mib: Vec<f64>,
}

/// The peak RSS of some processes while it runs.
struct RssPeak {
    peaks: Arc<Vec<AtomicU64>>,
    task: tokio::task::JoinHandle<()>,
}

impl RssPeak {
    fn start(pids: &[u32]) -> RssPeak {
        let peaks: Arc<Vec<AtomicU64>> = Arc::new(pids.iter().map(|_| AtomicU64::new(0)).collect());
        let (p, pids) = (Arc::clone(&peaks), pids.to_vec());
        let task = tokio::spawn(async move {
            loop {
                for (peak, pid) in p.iter().zip(&pids) {
                    if let Ok(rss) = sys::rss_bytes(*pid) {
                        peak.fetch_max(rss, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        RssPeak { peaks, task }
    }

    fn finish(self) -> Vec<f64> {
        self.task.abort();
        self.peaks
            .iter()
            .map(|p| p.load(Ordering::Relaxed) as f64 / (1 << 20) as f64)
            .collect()
    }
}

/// What one storm measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Figures {
    pub replicas: usize,
    pub members: usize,
    pub rooms: usize,
    pub room_size: usize,
    /// `limits.send_queue` of the replicas (None: the default, 1,024).
    pub send_queue: Option<usize>,
    pub connect_failures: u64,
    pub join: Storm,
    pub leave: Storm,
}

impl Figures {
    /// Everything that went wrong: failed connects, closes, error frames, a missing figure.
    fn problems(&self) -> u64 {
        let mut n = self.connect_failures;
        for s in [&self.join, &self.leave] {
            n += s.closed.values().sum::<u64>() + s.errors.values().sum::<u64>();
            n += u64::from(s.both_ms.is_none());
        }
        n
    }
}

// ---- frames ------------------------------------------------------------------------------

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail.
    let _ = rmp::encode::write_str(out, s);
}

/// `{type: presence, roomId, data: {n}}`.
fn presence_frame(room: &str, n: usize) -> Bytes {
    let mut f = Vec::with_capacity(48 + room.len());
    let _ = rmp::encode::write_map_len(&mut f, 3);
    put_str(&mut f, "type");
    put_str(&mut f, "presence");
    put_str(&mut f, "roomId");
    put_str(&mut f, room);
    put_str(&mut f, "data");
    let _ = rmp::encode::write_map_len(&mut f, 1);
    put_str(&mut f, "n");
    let _ = rmp::encode::write_uint(&mut f, n as u64);
    f.into()
}

/// `{type: kind, key: value}`: `getPresence {roomId}`, `getLobbyPresence {lobbyId}`.
fn request(kind: &str, key: &str, value: &str) -> Bytes {
    let mut f = Vec::with_capacity(48 + value.len());
    let _ = rmp::encode::write_map_len(&mut f, 2);
    put_str(&mut f, "type");
    put_str(&mut f, kind);
    put_str(&mut f, key);
    put_str(&mut f, value);
    f.into()
}

/// What the tool reads in a server frame.
#[derive(Debug, PartialEq, Eq)]
enum Reply<'a> {
    /// A room event, with its `event`.
    Event(&'a str),
    /// `presenceList` (`roomId`, entries of `data`) or `lobbyPresenceList` (`lobbyId`,
    /// members of all its rooms).
    List {
        id: &'a str,
        count: usize,
    },
    Error(&'a str),
    Other,
}

/// Reads a server frame; None if it is not a MessagePack map the tool understands.
fn classify(frame: &[u8]) -> Option<Reply<'_>> {
    let mut r = Reader::new(frame);
    let n = r.map_len().ok()?;
    let (mut kind, mut event, mut error, mut id, mut count) = ("", None, None, None, None);
    for _ in 0..n {
        let key = r.str().ok()?;
        match key {
            "type" => kind = r.str().ok()?,
            "event" => event = Some(r.str().ok()?),
            "error" => error = Some(r.str().ok()?),
            "roomId" | "lobbyId" => id = Some(r.str().ok()?),
            // A list's `data` is an array of members; a lobby list's `presence` is
            // {room: {actor: member}}. Other frames' values of these keys are skipped.
            "data" | "presence" => {
                // Each probe reads a copy: a failed header read still consumes its marker.
                let (mut as_array, mut probe) = (r, r);
                if let Ok(len) = as_array.array_len() {
                    count = Some(len);
                } else if key == "presence"
                    && let Ok(rooms) = probe.map_len()
                {
                    let mut total = 0;
                    for _ in 0..rooms {
                        probe.skip(0).ok()?;
                        let members = probe.map_len().ok()?;
                        total += members;
                        for _ in 0..2 * members {
                            probe.skip(0).ok()?;
                        }
                    }
                    count = Some(total);
                }
                r.skip(0).ok()?;
            }
            _ => r.skip(0).ok()?,
        }
    }
    Some(match kind {
        "presence" => Reply::Event(event.unwrap_or("")),
        "presenceList" | "lobbyPresenceList" => Reply::List {
            id: id.unwrap_or(""),
            count: count.unwrap_or(0),
        },
        "error" => Reply::Error(error.unwrap_or("")),
        _ => Reply::Other,
    })
}

// ---- the broker monitor ------------------------------------------------------------------

struct Seen {
    at: Instant,
    kind: Kind,
    bytes: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Delta,
    Snapshot,
    Heartbeat,
    Other,
    Restore,
}

/// A plain MQTT 5 client on the broker, subscribed to every replica's presence topic and to
/// the restore records.
struct Monitor {
    log: Arc<Mutex<Vec<Seen>>>,
    /// Replica ids heard from.
    heard: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
    client: AsyncClient,
}

impl Monitor {
    async fn start(port: u16, prefix: &str) -> Result<Monitor> {
        let mut opts = MqttOptions::new(
            format!("cuttle-bench-presence-{}-{prefix}", std::process::id()),
            "127.0.0.1",
            port,
        );
        opts.set_keep_alive(Duration::from_secs(30))
            .set_clean_start(true)
            .set_max_packet_size(Some(64 << 20));
        let (client, mut events) = AsyncClient::new(opts, 64);
        let log = Arc::new(Mutex::new(Vec::new()));
        let heard = Arc::new(Mutex::new(Vec::new()));
        let (subscribed_tx, mut subscribed) = watch::channel(0u32);
        let task = {
            let (log, heard) = (Arc::clone(&log), Arc::clone(&heard));
            tokio::spawn(async move {
                loop {
                    match events.poll().await {
                        // Retained records arrive at the subscription: older than any storm.
                        Ok(Event::Incoming(Packet::Publish(p))) if !p.retain => {
                            let at = Instant::now();
                            let restore = p.topic.windows(11).any(|w| w == b"/_/restore/");
                            let kind = match Message::decode(&p.payload).map(|m| m.body) {
                                _ if restore => Kind::Restore,
                                Ok(Body::Delta { .. }) => Kind::Delta,
                                Ok(Body::Snapshot { .. }) => Kind::Snapshot,
                                Ok(Body::Heartbeat) => Kind::Heartbeat,
                                _ => Kind::Other,
                            };
                            let bytes = (p.topic.len() + p.payload.len()) as u64;
                            log.lock().push(Seen { at, kind, bytes });
                            if restore {
                                continue;
                            }
                            let replica = String::from_utf8_lossy(
                                p.topic.rsplit(|b| *b == b'/').next().unwrap_or_default(),
                            )
                            .into_owned();
                            let mut h = heard.lock();
                            if !h.contains(&replica) {
                                h.push(replica);
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            subscribed_tx.send_modify(|n| *n += 1);
                        }
                        Ok(_) => {}
                        // rumqttc reconnects on the next poll.
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
        };
        for filter in ["presence/v1", "restore/v2"] {
            client
                .subscribe(format!("{prefix}/_/{filter}/#"), QoS::AtMostOnce)
                .await
                .context("presence monitor subscribe")?;
        }
        let monitor = Monitor {
            log,
            heard,
            task,
            client,
        };
        if tokio::time::timeout(STEP_TIMEOUT, subscribed.wait_for(|n| *n >= 2))
            .await
            .is_err()
        {
            bail!("the presence monitor got no SUBACK from the broker on port {port}");
        }
        Ok(monitor)
    }

    /// Waits until every replica of `ids` has published (a heartbeat at least): they are up
    /// and hear each other before a storm starts.
    async fn wait_for(&self, ids: &[&str]) -> Result<()> {
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            if ids
                .iter()
                .all(|id| self.heard.lock().iter().any(|h| h == id))
            {
                return Ok(());
            }
            if Instant::now() > give_up {
                bail!(
                    "replicas {ids:?} not all heard on the broker within 10 s (heard {:?})",
                    self.heard.lock()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn window(&self, from: Instant, to: Instant) -> Traffic {
        let mut t = Traffic::default();
        for s in self.log.lock().iter().filter(|s| s.at >= from && s.at < to) {
            let (count, bytes) = match s.kind {
                Kind::Delta => (&mut t.deltas, &mut t.delta_bytes),
                Kind::Snapshot => (&mut t.snapshots, &mut t.snapshot_bytes),
                Kind::Heartbeat => (&mut t.heartbeats, &mut t.heartbeat_bytes),
                Kind::Other => (&mut t.other, &mut t.other_bytes),
                Kind::Restore => (&mut t.restores, &mut t.restore_bytes),
            };
            *count += 1;
            *bytes += s.bytes;
        }
        t
    }

    async fn stop(self) {
        let _ = self.client.disconnect().await;
        self.task.abort();
    }
}

// ---- members -----------------------------------------------------------------------------

/// What the members are told to do; the join carries the storm's start.
#[derive(Debug, Clone, Copy)]
enum Cmd {
    Wait,
    Join(Instant),
    Leave,
}

/// What the members of one storm saw.
#[derive(Debug, Default)]
struct Tally {
    /// `join` and `update` events the members received.
    join_events: AtomicU64,
    leave_events: AtomicU64,
    /// ns after the storm's start of the latest `join`/`update`, and `leave`, any member
    /// received.
    last_join_ns: AtomicU64,
    last_leave_ns: AtomicU64,
    closed_join: Mutex<BTreeMap<u16, u64>>,
    closed_leave: Mutex<BTreeMap<u16, u64>>,
    errors_join: Mutex<BTreeMap<String, u64>>,
    errors_leave: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn frame(&self, frame: &[u8], t0: Instant, leaving: bool) {
        match classify(frame) {
            Some(Reply::Event(event)) => {
                let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
                let (count, last) = if event == "leave" {
                    (&self.leave_events, &self.last_leave_ns)
                } else {
                    (&self.join_events, &self.last_join_ns)
                };
                count.fetch_add(1, Ordering::Relaxed);
                last.fetch_max(ns, Ordering::Relaxed);
            }
            Some(Reply::Error(e)) => {
                let errors = if leaving {
                    &self.errors_leave
                } else {
                    &self.errors_join
                };
                *errors.lock().entry(e.to_string()).or_default() += 1;
            }
            _ => {}
        }
    }

    fn closed(&self, code: u16, leaving: bool) {
        let closed = if leaving {
            &self.closed_leave
        } else {
            &self.closed_join
        };
        *closed.lock().entry(code).or_default() += 1;
    }
}

/// One member: waits for the join, enters its room (`frame`), reads (and counts) everything
/// until told to leave, then closes cleanly and reads until the proxy's close.
async fn member(mut ws: Ws, frame: Bytes, tally: Arc<Tally>, mut cmd: watch::Receiver<Cmd>) {
    let t0 = loop {
        if let Cmd::Join(t) = *cmd.borrow_and_update() {
            break t;
        }
        if cmd.changed().await.is_err() {
            return;
        }
    };
    if ws.send(WsMessage::Binary(frame)).await.is_err() {
        tally.closed(0, false);
        return;
    }
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(WsMessage::Binary(b))) => tally.frame(&b, t0, false),
                Some(Ok(WsMessage::Close(c))) => {
                    tally.closed(c.map_or(0, |c| u16::from(c.code)), false);
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    tally.closed(0, false);
                    return;
                }
            },
            changed = cmd.changed() => {
                if changed.is_err() || matches!(*cmd.borrow(), Cmd::Leave) {
                    break;
                }
            }
        }
    }
    // The member asked to close: however the socket ends now is no disconnect, but a close
    // code other than 1000 means the proxy had closed it first (a slow consumer, 1013).
    if ws.close(None).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(STEP_TIMEOUT, async {
        while let Some(Ok(msg)) = ws.next().await {
            match msg {
                WsMessage::Binary(b) => tally.frame(&b, t0, true),
                WsMessage::Close(Some(c)) if u16::from(c.code) != 1000 => {
                    tally.closed(u16::from(c.code), true);
                    return;
                }
                WsMessage::Close(_) => return,
                _ => {}
            }
        }
    })
    .await;
}

/// (actor, replica, room) of each member of a storm.
type MemberSpec = (usize, usize, Arc<str>);

/// Connects the members, `concurrency` at a time; returns them with their presence frame.
async fn connect_members(
    eps: Arc<Vec<Endpoint>>,
    members: Vec<MemberSpec>,
    concurrency: usize,
) -> (Vec<(Ws, Bytes)>, u64) {
    let results: Vec<Result<(Ws, Bytes)>> = futures_util::stream::iter(members)
        .map(|(actor, replica, room)| {
            let eps = Arc::clone(&eps);
            async move {
                let ep = eps
                    .get(replica)
                    .ok_or_else(|| anyhow!("no replica {replica}"))?;
                let client = tokio::time::timeout(STEP_TIMEOUT, Client::connect(ep, actor))
                    .await
                    .context("timed out")??;
                Ok((client.into_ws()?, presence_frame(&room, actor)))
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut ok = Vec::with_capacity(results.len());
    let mut failed = 0;
    let mut first_error = None;
    for r in results {
        match r {
            Ok(m) => ok.push(m),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("    {failed} members failed to connect; first error: {e:#}");
    }
    (ok, failed)
}

/// The members' runtime: two worker threads at nice 10 (see the module doc). Shut down in
/// the background when dropped (a runtime cannot be dropped inside another one).
struct MemberRuntime(Option<tokio::runtime::Runtime>);

impl MemberRuntime {
    fn new() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("presence-members")
            .on_thread_start(|| sys::nice_this_thread(10))
            .enable_all()
            .build()?;
        Ok(MemberRuntime(Some(rt)))
    }

    fn handle(&self) -> Result<&tokio::runtime::Handle> {
        self.0
            .as_ref()
            .map(|rt| rt.handle())
            .ok_or_else(|| anyhow!("member runtime gone"))
    }
}

impl Drop for MemberRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

// ---- observers ---------------------------------------------------------------------------

/// A connection of one replica polling one list: `getPresence` of a room or
/// `getLobbyPresence` of a lobby.
struct Observer {
    replica: usize,
    ws: Ws,
    request: Bytes,
    /// The `roomId` / `lobbyId` its replies carry.
    id: String,
    /// Members it lists once everyone joined.
    all: usize,
}

/// One observer's polling until its list held `want` members.
#[derive(Default)]
struct Polled {
    at: Option<Duration>,
    last: usize,
    polls: u64,
    max_rtt: Duration,
    errors: BTreeMap<String, u64>,
}

impl Observer {
    async fn poll_until(&mut self, want: usize, t0: Instant, deadline: Instant) -> Polled {
        let mut p = Polled::default();
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while Instant::now() < deadline {
            tick.tick().await;
            let sent = Instant::now();
            if self
                .ws
                .send(WsMessage::Binary(self.request.clone()))
                .await
                .is_err()
            {
                *p.errors.entry("observer closed".into()).or_default() += 1;
                return p;
            }
            p.polls += 1;
            let (ws, want_id) = (&mut self.ws, self.id.as_str());
            let reply = tokio::time::timeout(STEP_TIMEOUT, async {
                while let Some(msg) = ws.next().await {
                    let b = match msg {
                        Ok(WsMessage::Binary(b)) => b,
                        Ok(_) => continue,
                        Err(_) => return Err(anyhow!("observer socket failed")),
                    };
                    match classify(&b) {
                        Some(Reply::List { id, count }) if id == want_id => return Ok(Ok(count)),
                        Some(Reply::Error(e)) => return Ok(Err(e.to_string())),
                        _ => {}
                    }
                }
                Err(anyhow!("observer closed"))
            })
            .await;
            p.max_rtt = p.max_rtt.max(sent.elapsed());
            match reply {
                Ok(Ok(Ok(count))) => {
                    p.last = count;
                    if count == want {
                        p.at = Some(t0.elapsed());
                        return p;
                    }
                }
                Ok(Ok(Err(e))) => *p.errors.entry(format!("observer: {e}")).or_default() += 1,
                Ok(Err(e)) => {
                    *p.errors.entry(format!("{e}")).or_default() += 1;
                    return p;
                }
                Err(_) => *p.errors.entry("observer: no reply".into()).or_default() += 1,
            }
        }
        p
    }
}

/// Polls every observer until its list holds `want(observer)`; per replica, the time the
/// last of its observers got there.
async fn converge(
    observers: &mut [Observer],
    replicas: usize,
    want: impl Fn(&Observer) -> usize,
    t0: Instant,
    deadline: Instant,
    storm: &mut Storm,
) {
    let polls = futures_util::future::join_all(observers.iter_mut().map(|o| {
        let w = want(o);
        async move { (o.replica, o.poll_until(w, t0, deadline).await) }
    }))
    .await;
    let mut at: Vec<Option<Duration>> = vec![Some(Duration::ZERO); replicas];
    let mut last = vec![0usize; replicas];
    let mut max_rtt = Duration::ZERO;
    for (replica, p) in polls {
        at[replica] = match (at[replica], p.at) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
        last[replica] += p.last;
        storm.polls += p.polls;
        max_rtt = max_rtt.max(p.max_rtt);
        for (e, n) in p.errors {
            *storm.errors.entry(e).or_default() += n;
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    storm.listed_ms = at.iter().map(|a| a.map(ms)).collect();
    storm.both_ms = at
        .iter()
        .try_fold(Duration::ZERO, |m, a| a.map(|a| m.max(a)))
        .map(ms);
    storm.last_listed = last;
    storm.poll_max_ms = (storm.polls > 0).then(|| ms(max_rtt));
}

// ---- the bystander -----------------------------------------------------------------------

/// The fan-out stream that has nothing to do with presence.
struct Bystander {
    shared: Arc<Shared>,
    publishers: Vec<Client>,
    subscribers: usize,
    tasks: JoinSet<()>,
    rate: f64,
    payload: usize,
}

impl Bystander {
    /// Subscribers alternately on each replica, one publisher per replica.
    async fn start(eps: &[Endpoint], shape: &Shape) -> Result<Bystander> {
        let shared = Shared::new()?;
        let mut tasks = JoinSet::new();
        let mut subscribers = 0;
        for j in 0..shape.bystanders {
            let ep = &eps[j % eps.len()];
            let mut c = Client::connect(ep, shape.bystander_actor(j))
                .await
                .context("bystander subscriber")?;
            c.subscribe(false).await?;
            tasks.spawn(scenario::subscriber_loop(j, c, Arc::clone(&shared)));
            subscribers += 1;
        }
        let mut publishers = Vec::new();
        for (k, ep) in eps.iter().enumerate() {
            let actor = shape.bystander_actor(shape.bystanders + k);
            publishers.push(
                Client::connect(ep, actor)
                    .await
                    .context("bystander publisher")?,
            );
        }
        Ok(Bystander {
            shared,
            publishers,
            subscribers,
            tasks,
            rate: shape.bystander_rate,
            payload: shape.bystander_payload,
        })
    }

    /// The stream at its fixed rate until `end` completes; its figures, `end`'s output, and
    /// the error frames its publishers got (`broker_unavailable`: the pool refused one).
    async fn during<T>(
        &mut self,
        end: impl Future<Output = T>,
    ) -> Result<(Record, T, BTreeMap<String, u64>)> {
        let publishers = std::mem::take(&mut self.publishers);
        let disconnected = self.shared.disconnected.load(Ordering::Relaxed);
        let run = scenario::fixed_rate_phase(
            publishers,
            &self.shared,
            self.subscribers,
            self.rate,
            self.payload,
            end,
        )
        .await?;
        self.publishers = run.publishers;
        let mut errors = BTreeMap::new();
        for p in &mut self.publishers {
            for e in p.pending_errors(Duration::from_millis(20)).await {
                *errors
                    .entry(format!("bystander publisher: {e}"))
                    .or_default() += 1;
            }
        }
        let mut rec = run.record;
        rec.errors += self.shared.disconnected.load(Ordering::Relaxed) - disconnected;
        Ok((rec, run.ended, errors))
    }

    async fn close(mut self) {
        self.tasks.abort_all();
        for p in self.publishers {
            p.close().await;
        }
    }
}

fn bystander_figures(storm: &mut Storm, rec: &Record) {
    storm.bystander_p50_us = rec.p50_us;
    storm.bystander_p99_us = rec.p99_us;
    storm.bystander_published_per_s = rec.published_per_s;
    storm.bystander_lost = rec.lost.map(|l| l + rec.errors);
}

// ---- one storm ---------------------------------------------------------------------------

/// A pair of replicas and what watches them.
struct Group<'a> {
    eps: Arc<Vec<Endpoint>>,
    pids: Vec<u32>,
    monitor: Option<&'a Monitor>,
    send_queue: Option<usize>,
}

/// What one storm is.
struct StormSpec {
    mode: &'static str,
    rooms: usize,
    room_size: usize,
    members: Vec<MemberSpec>,
    /// (replica, request kind, id key, id, members listed once all joined).
    lists: Vec<(usize, &'static str, &'static str, String, usize)>,
}

/// The big room: `n` members of `general`, alternately on each replica.
fn big_room(shape: &Shape, mode: &'static str) -> StormSpec {
    let room: Arc<str> = GENERAL.into();
    StormSpec {
        mode,
        rooms: 1,
        room_size: shape.big_room,
        members: (0..shape.big_room)
            .map(|i| (i, i % 2, Arc::clone(&room)))
            .collect(),
        lists: (0..2)
            .map(|r| (r, "getPresence", "roomId", GENERAL.into(), shape.big_room))
            .collect(),
    }
}

/// The small rooms: member k of room r is actor r·size + k, on replica (r·size + k) mod 2.
fn small_rooms(shape: &Shape) -> StormSpec {
    let size = shape.room_size;
    let mut members = Vec::with_capacity(shape.rooms * size);
    for r in 0..shape.rooms {
        let room: Arc<str> = format!("s{r}").into();
        for k in 0..size {
            let actor = r * size + k;
            members.push((actor, actor % 2, Arc::clone(&room)));
        }
    }
    let layout = shape.layout();
    let mut lists = Vec::new();
    for replica in 0..2 {
        for (slug, rooms) in presence_lobbies(&layout) {
            let all = rooms.len() * size;
            lists.push((replica, "getLobbyPresence", "lobbyId", slug, all));
        }
    }
    StormSpec {
        mode: SMALL_ROOMS,
        rooms: shape.rooms,
        room_size: size,
        members,
        lists,
    }
}

/// What every storm of one target shares.
struct Ctx<'a> {
    shape: &'a Shape,
    plan: &'a Plan,
    running: &'a Running,
    members_rt: MemberRuntime,
}

impl Ctx<'_> {
    fn record(&self, mode: &str) -> Record {
        Record {
            target: self.running.target.name().into(),
            scenario: "presence".into(),
            mode: mode.into(),
            ..Record::default()
        }
    }
}

fn ns_to_ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Connects the storm's members and observers; measures the bystander alone if asked
/// (`alone`); runs the join and the leave; pushes the records.
async fn storm(
    cx: &Ctx<'_>,
    spec: StormSpec,
    group: &Group<'_>,
    mut bystander: Option<&mut Bystander>,
    alone: Option<Duration>,
    out: &mut Vec<Record>,
) -> Result<()> {
    let (shape, plan) = (cx.shape, cx.plan);
    let n = spec.members.len();
    let handle = cx.members_rt.handle()?;
    let (connected, connect_failures) = handle
        .spawn(connect_members(
            Arc::clone(&group.eps),
            spec.members,
            plan.ramp_concurrency,
        ))
        .await?;
    let mut observers = Vec::with_capacity(spec.lists.len());
    for (j, (replica, kind, key, id, all)) in spec.lists.into_iter().enumerate() {
        let client = Client::connect(&group.eps[replica], shape.observer_actor(j))
            .await
            .context("observer")?;
        observers.push(Observer {
            replica,
            ws: client.into_ws()?,
            request: request(kind, key, &id),
            id,
            all,
        });
    }
    let tally = Arc::new(Tally::default());
    let (cmd, cmd_rx) = watch::channel(Cmd::Wait);
    let tasks: Vec<_> = connected
        .into_iter()
        .map(|(ws, frame)| handle.spawn(member(ws, frame, Arc::clone(&tally), cmd_rx.clone())))
        .collect();
    eprintln!(
        "  presence {}: {} members in {} room(s) on {} replicas, {} observers",
        spec.mode,
        tasks.len(),
        spec.rooms,
        group.eps.len(),
        observers.len()
    );
    tokio::time::sleep(plan.settle).await;
    if let (Some(b), Some(d)) = (bystander.as_deref_mut(), alone) {
        let (mut rec, (), errors) = b.during(tokio::time::sleep(d)).await?;
        rec.errors += errors.values().sum::<u64>();
        let label = cx.record(ALONE);
        rec.target = label.target;
        rec.scenario = label.scenario;
        rec.mode = label.mode;
        rec.n = b.subscribers;
        rec.payload = b.payload;
        print_record(&rec);
        out.push(rec);
    }
    let replicas = group.eps.len();
    let meters = || {
        group
            .pids
            .iter()
            .map(|p| CpuMeter::start(*p))
            .collect::<Vec<_>>()
    };
    let cores = |m: &[CpuMeter]| m.iter().map(CpuMeter::cores).sum::<Option<f64>>();

    // Join: everyone at once.
    let mut join = Storm::default();
    let cpu = meters();
    let rss = RssPeak::start(&group.pids);
    let t0 = Instant::now();
    let _ = cmd.send(Cmd::Join(t0));
    let joined = async {
        let deadline = t0 + shape.storm_timeout;
        converge(&mut observers, replicas, |o| o.all, t0, deadline, &mut join).await;
        // The lists agree; the members may still be reading their events.
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let last = Duration::from_nanos(tally.last_join_ns.load(Ordering::Relaxed));
            if t0.elapsed().saturating_sub(last) >= QUIET || Instant::now() > deadline {
                break;
            }
        }
    };
    let join_rec = match bystander.as_deref_mut() {
        Some(b) => {
            let (rec, (), errors) = b.during(joined).await?;
            join.errors.extend(errors);
            Some(rec)
        }
        None => {
            joined.await;
            None
        }
    };
    join.replica_cores = cores(&cpu);
    join.replica_rss_mib = rss.finish();
    join.events = tally.join_events.load(Ordering::Relaxed);
    join.last_event_ms =
        (join.events > 0).then(|| ns_to_ms(tally.last_join_ns.load(Ordering::Relaxed)));
    if let Some(r) = &join_rec {
        bystander_figures(&mut join, r);
    }

    // Leave: everyone closes at once.
    let mut leave = Storm::default();
    let cpu = meters();
    let rss = RssPeak::start(&group.pids);
    let t1 = Instant::now();
    let _ = cmd.send(Cmd::Leave);
    let left = async {
        let deadline = t1 + shape.storm_timeout;
        converge(&mut observers, replicas, |_| 0, t1, deadline, &mut leave).await;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(remaining, futures_util::future::join_all(tasks)).await;
    };
    let leave_rec = match bystander {
        Some(b) => {
            let (rec, (), errors) = b.during(left).await?;
            leave.errors.extend(errors);
            Some(rec)
        }
        None => {
            left.await;
            None
        }
    };
    leave.replica_cores = cores(&cpu);
    leave.replica_rss_mib = rss.finish();
    // Late deltas arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t2 = Instant::now();
    leave.events = tally.leave_events.load(Ordering::Relaxed);
    let since_join = u64::try_from((t1 - t0).as_nanos()).unwrap_or(u64::MAX);
    leave.last_event_ms = (leave.events > 0).then(|| {
        ns_to_ms(
            tally
                .last_leave_ns
                .load(Ordering::Relaxed)
                .saturating_sub(since_join),
        )
    });
    if let Some(r) = &leave_rec {
        bystander_figures(&mut leave, r);
    }
    if let Some(m) = group.monitor {
        join.traffic = Some(m.window(t0, t1));
        leave.traffic = Some(m.window(t1, t2));
    }
    join.closed = tally.closed_join.lock().clone();
    leave.closed = tally.closed_leave.lock().clone();
    for (errors, storm) in [
        (&tally.errors_join, &mut join),
        (&tally.errors_leave, &mut leave),
    ] {
        for (e, k) in errors.lock().iter() {
            *storm.errors.entry(e.clone()).or_default() += k;
        }
    }
    for o in observers {
        let mut ws = o.ws;
        let _ = ws.close(None).await;
    }

    let figures = Figures {
        replicas,
        members: n,
        rooms: spec.rooms,
        room_size: spec.room_size,
        send_queue: group.send_queue,
        connect_failures,
        join,
        leave,
    };
    let label = cx.record(spec.mode);
    let mut rec = join_rec.unwrap_or_default();
    rec.target = label.target;
    rec.scenario = label.scenario;
    rec.mode = label.mode;
    rec.n = n;
    rec.payload = if rec.p99_us.is_some() {
        shape.bystander_payload
    } else {
        0
    };
    rec.server_cores = figures.join.replica_cores;
    rec.errors += figures.problems()
        + leave_rec
            .as_ref()
            .map_or(0, |r| r.errors + r.lost.unwrap_or(0));
    print_record(&rec);
    eprintln!("      {}", describe(&figures));
    rec.presence = Some(figures);
    out.push(rec);
    tokio::time::sleep(plan.settle).await;
    Ok(())
}

/// One line of a storm's figures, for the log.
fn describe(f: &Figures) -> String {
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0} ms"));
    let listed = |s: &Storm| {
        s.listed_ms
            .iter()
            .map(|v| ms(*v))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let per = |t: &Option<Traffic>| {
        t.as_ref().map_or("-".into(), |t| {
            let ops = f.members.max(1) as f64;
            format!(
                "{:.1} B/member in {:.3} msgs/member (+{} snapshots, {} heartbeats, {} other), restore records {} ({:.0} B/member)",
                (t.delta_bytes + t.snapshot_bytes) as f64 / ops,
                (t.deltas + t.snapshots) as f64 / ops,
                t.snapshots,
                t.heartbeats,
                t.other,
                t.restores,
                t.restore_bytes as f64 / ops,
            )
        })
    };
    let side = |name: &str, s: &Storm| {
        format!(
            "{name}: listed {} (both {}), last event {} ({} events), poll max {}, {}, bystander p99 {}, cores {:?}, peak RSS {:?} MiB, closed {:?}, errors {:?}",
            listed(s),
            ms(s.both_ms),
            ms(s.last_event_ms),
            s.events,
            ms(s.poll_max_ms),
            per(&s.traffic),
            s.bystander_p99_us
                .map_or("-".into(), |v| format!("{:.1} ms", v / 1000.0)),
            s.replica_cores,
            s.replica_rss_mib
                .iter()
                .map(|v| v.round())
                .collect::<Vec<_>>(),
            s.closed,
            s.errors,
        )
    };
    format!("{}; {}", side("join", &f.join), side("leave", &f.leave))
}

/// The presence scenario against one (presence-profile) cuttle target.
pub async fn run(running: &Running, plan: &Plan, out: &mut Vec<Record>) -> Result<()> {
    let shape = &plan.presence;
    if !matches!(running.profile, Profile::Presence(_)) {
        bail!("the presence scenario needs a target started with the presence profile");
    }
    let broker_port = running
        .broker_port
        .ok_or_else(|| anyhow!("{}: the broker's port is unknown", running.target))?;
    let cx = Ctx {
        shape,
        plan,
        running,
        members_rt: MemberRuntime::new()?,
    };
    {
        let b = running
            .start_replica("b", PRESENCE_PREFIX, Some(shape.send_queue()))
            .await?;
        let monitor = Monitor::start(broker_port, PRESENCE_PREFIX).await?;
        monitor.wait_for(&["a", "b"]).await?;
        let eps = Arc::new(vec![running.endpoint.clone(), b.endpoint.clone()]);
        let mut bystander = Bystander::start(&eps, shape).await?;
        let group = Group {
            eps,
            pids: vec![running.server_pid, b.pid],
            monitor: Some(&monitor),
            send_queue: Some(shape.send_queue()),
        };
        let result = async {
            let big = big_room(shape, BIG_ROOM);
            storm(
                &cx,
                big,
                &group,
                Some(&mut bystander),
                Some(shape.alone),
                out,
            )
            .await?;
            storm(
                &cx,
                small_rooms(shape),
                &group,
                Some(&mut bystander),
                None,
                out,
            )
            .await
        }
        .await;
        bystander.close().await;
        monitor.stop().await;
        result?;
    }
    if shape.default_limits {
        // A pair of its own (another prefix: `a` takes no part) with the default send queue;
        // `a` stays up, idle, holding the embedded broker for cuttle-embedded.
        let c = running.start_replica("c", DEFAULTS_PREFIX, None).await?;
        let d = running.start_replica("d", DEFAULTS_PREFIX, None).await?;
        let monitor = Monitor::start(broker_port, DEFAULTS_PREFIX).await?;
        monitor.wait_for(&["c", "d"]).await?;
        let group = Group {
            eps: Arc::new(vec![c.endpoint.clone(), d.endpoint.clone()]),
            pids: vec![c.pid, d.pid],
            monitor: Some(&monitor),
            send_queue: None,
        };
        let big = big_room(shape, BIG_ROOM_DEFAULTS);
        let result = storm(&cx, big, &group, None, None, out).await;
        monitor.stop().await;
        result?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_events_lists_and_errors() {
        let event = cuttle::presence::frames::event(
            cuttle::presence::core::EventKind::Join,
            "p1",
            Some(&cuttle::presence::core::Member {
                data: Bytes::from_static(&[0x80]),
                joined_at: 1,
                updated: 1,
            }),
        );
        assert_eq!(classify(&event), Some(Reply::Event("join")));
        let m = cuttle::presence::core::Member {
            data: Bytes::from_static(&[0x80]),
            joined_at: 1,
            updated: 1,
        };
        let list = cuttle::presence::frames::list(
            Some("general"),
            &[("p1".into(), m.clone()), ("p2".into(), m.clone())],
        );
        assert_eq!(
            classify(&list),
            Some(Reply::List {
                id: "general",
                count: 2
            })
        );
        let error = {
            let mut f = Vec::new();
            let _ = rmp::encode::write_map_len(&mut f, 2);
            put_str(&mut f, "type");
            put_str(&mut f, "error");
            put_str(&mut f, "error");
            put_str(&mut f, "rate_limit_exceeded");
            f
        };
        assert_eq!(classify(&error), Some(Reply::Error("rate_limit_exceeded")));
        let members: cuttle::presence::core::Members =
            Arc::new(vec![("p1".into(), m.clone()), ("p2".into(), m.clone())]);
        let lobby = cuttle::presence::frames::lobby_map(
            "lobbyPresenceList",
            "l0",
            &vec![("s0".into(), Arc::clone(&members)), ("s1".into(), members)],
        );
        assert_eq!(classify(&lobby), Some(Reply::List { id: "l0", count: 4 }));
        assert_eq!(classify(b"\xc1"), None);
    }
}
