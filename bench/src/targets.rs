//! The systems under test: how each is started, reached, measured and stopped.
//!
//! Every server the tool starts is a child process in its own temporary directory, started
//! with `PR_SET_PDEATHSIG` so that it dies with the tool even if the tool is killed, and
//! killed and reaped when its [`Running`] is dropped: a run leaves no process behind.
//! RabbitMQ is the exception — it is the machine's service, set up by
//! `bench/setup-services.sh`, and only used.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::sys;
use crate::wire::{Endpoint, Protocol};

/// One system under test.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// cuttle on its embedded broker (the default deployment).
    CuttleEmbedded,
    /// cuttle in front of a private Mosquitto.
    CuttleMosquitto,
    /// cuttle on a private three-node NATS cluster (JetStream, MQTT listener on every node;
    /// the pool spread over the nodes by `upstream.brokers`).
    CuttleNats,
    /// cuttle on the machine's RabbitMQ MQTT plugin (MQTT 3.1.1, routing by topic matching).
    CuttleRabbitmq,
    /// RabbitMQ's Web-MQTT plugin, MQTT-over-WebSocket clients.
    RabbitmqWebMqtt,
    /// nats-server's WebSocket listener, NATS-protocol clients.
    NatsWs,
    /// Direct MQTT over TCP to a private Mosquitto (no WebSocket: the latency floor).
    MosquittoTcp,
    /// The tool's minimal WebSocket broadcast server (the machine's ceiling).
    WsBroadcast,
}

impl Target {
    pub const ALL: [Target; 8] = [
        Target::CuttleEmbedded,
        Target::CuttleMosquitto,
        Target::CuttleNats,
        Target::CuttleRabbitmq,
        Target::RabbitmqWebMqtt,
        Target::NatsWs,
        Target::MosquittoTcp,
        Target::WsBroadcast,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::CuttleEmbedded => "cuttle-embedded",
            Target::CuttleMosquitto => "cuttle-mosquitto",
            Target::CuttleNats => "cuttle-nats",
            Target::CuttleRabbitmq => "cuttle-rabbitmq",
            Target::RabbitmqWebMqtt => "rabbitmq-web-mqtt",
            Target::NatsWs => "nats-ws",
            Target::MosquittoTcp => "mosquitto-tcp",
            Target::WsBroadcast => "ws-broadcast",
        }
    }
}

impl Target {
    /// Whether `scenario` is measured on this target. cuttle on NATS and on RabbitMQ runs
    /// the scenarios whose figures depend on the broker (fan-out, fan-in, rooms, churn): idle
    /// memory, connect rate, the noisy neighbour, presence and webhooks measure the proxy
    /// process, which is the same on every broker. The broadcast server has no topics.
    pub fn runs(self, scenario: &str) -> bool {
        match self {
            Target::CuttleNats | Target::CuttleRabbitmq => {
                matches!(scenario, "fanout" | "fanin" | "rooms" | "churn")
            }
            Target::WsBroadcast => !matches!(scenario, "rooms" | "churn"),
            _ => true,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// RabbitMQ Web-MQTT's port, as `bench/setup-services.sh` configures it.
pub const RABBITMQ_WEB_MQTT_PORT: u16 = 15675;
/// RabbitMQ's MQTT (TCP) port, as `bench/setup-services.sh` configures it.
pub const RABBITMQ_MQTT_PORT: u16 = 1884;

/// Rooms `c0`… of the benchmark app (the rooms and churn scenarios).
pub const BENCH_ROOMS: usize = 1000;

/// Device actors in the cuttle benchmark policy: clients spread over them, so 20,000
/// connections stay under the default `connections_per_actor` of 32. All are in one scope:
/// the baselines have no tenants, and across scopes cuttle would (rightly) deliver nothing.
const CUTTLE_ACTORS: usize = 1000;

/// Which configuration a cuttle target is started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// The comparison runs: one scope, limits raised where the benchmark would trip them.
    Standard,
    /// The noisy-neighbour scenario: a victim scope and an attacker scope, default limits.
    Noisy,
    /// The presence scenario: replica `a` of a group sharing the broker and
    /// [`PRESENCE_PREFIX`] (the others are started with [`Running::start_replica`]).
    Presence(PresenceLayout),
    /// [`Profile::Standard`] plus a webhook endpoint taking every event type, at the slow
    /// receiver listening on this loopback port (`crate::webhook_sink`).
    Webhooks { sink: u16 },
}

/// The webhook secret of [`Profile::Webhooks`] (`whsec_` + base64 of 32 bytes), given to the
/// proxy in `BENCH_WEBHOOK_SECRET`.
pub const BENCH_WEBHOOK_SECRET: &str = "whsec_YmVuY2gtd2ViaG9vay1zZWNyZXQtMDEyMzQ1Njc4OWFi";

/// The presence scenario's policy and send queue: `actors` device actors (`p0`…, one per
/// member, observer and bystander), rooms `general` and `s0`… (`rooms` of them), lobbies
/// `l0`… of at most `lobby_rooms` of those rooms each, in app `bench` beside the fan-out's
/// room `r` and topics `t`, `u`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceLayout {
    pub actors: usize,
    pub rooms: usize,
    pub lobby_rooms: usize,
    /// `limits.send_queue` (None: the default, 1,024 frames).
    pub send_queue: Option<usize>,
}

/// `upstream.topic_prefix` of the presence scenario's replicas: their presence topics are
/// `bench/_/presence/v1/<replica id>`.
pub const PRESENCE_PREFIX: &str = "bench";

/// Tokens of the presence scenario's actors: client `i` is actor `p<i>`.
pub fn presence_tokens(actors: usize) -> Arc<Vec<String>> {
    Arc::new(
        (0..actors)
            .map(|i| format!("bench-presence-{i}-token"))
            .collect(),
    )
}

/// The lobby slugs of a presence layout, with their rooms.
pub fn presence_lobbies(layout: &PresenceLayout) -> Vec<(String, Vec<String>)> {
    let per = layout.lobby_rooms.max(1);
    (0..layout.rooms.div_ceil(per))
        .map(|l| {
            let rooms = (l * per..((l + 1) * per).min(layout.rooms))
                .map(|r| format!("s{r}"))
                .collect();
            (format!("l{l}"), rooms)
        })
        .collect()
}

/// Actors of each tenant in the noisy-neighbour policy.
pub const NOISY_VICTIM_ACTORS: usize = 50;
pub const NOISY_ATTACKER_ACTORS: usize = 200;
/// Rooms `a0`… of the noisy-neighbour app, so that an attacker connection can hold many
/// distinct subscriptions (`bench/a<k>/t`, `bench/a<k>/u`).
pub const NOISY_ROOMS: usize = 16;
/// `limits.max_connections` of the noisy-neighbour proxy: the keep-alive attacker opens at
/// least this many connections, so connections that held their slot would lock everyone out.
pub const NOISY_MAX_CONNECTIONS: usize = 1000;

/// Tokens of the victim tenant (scope `acme`) or of the attacker tenant (scope `evil`).
pub fn noisy_tokens(attacker: bool) -> Arc<Vec<String>> {
    let (who, n) = if attacker {
        ("attacker", NOISY_ATTACKER_ACTORS)
    } else {
        ("victim", NOISY_VICTIM_ACTORS)
    };
    Arc::new((0..n).map(|i| format!("noisy-{who}-{i}-token")).collect())
}

/// A started target.
pub struct Running {
    pub target: Target,
    pub endpoint: Endpoint,
    /// For cuttle: its `upstream.broker` value, so a TLS sibling can share the broker.
    cuttle_broker: Option<String>,
    /// The process that holds the client connections (whose RSS is measured).
    pub server_pid: u32,
    /// The port on which the broker accepts its connections, to count them; None for the
    /// broadcast server, which has no broker.
    pub broker_port: Option<u16>,
    pub profile: Profile,
    children: Vec<Child>,
    dir: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.start_kill();
        }
        for child in &mut self.children {
            // Reap so that nothing lingers as a zombie while the tool goes on.
            for _ in 0..50 {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Diagnosis: BENCH_KEEP_DIRS=1 keeps the servers' configs and logs.
        if std::env::var_os("BENCH_KEEP_DIRS").is_some() {
            eprintln!("{}: logs kept in {}", self.target, self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A second cuttle with TLS on, sharing the first one's broker, for the TLS connect scenario
/// only (started then and stopped after, so it never adds to another scenario's figures).
pub struct TlsSibling {
    pub endpoint: Endpoint,
    pub pid: u32,
    _child: Child,
}

/// Another cuttle replica on a running target's broker (the presence scenario).
pub struct Replica {
    pub endpoint: Endpoint,
    pub pid: u32,
    _child: Child,
}

impl Running {
    /// Starts one more cuttle on this target's broker with the presence policy of this
    /// target's [`Profile::Presence`], as replica `replica_id` under `prefix`, and waits until
    /// it is ready. For cuttle-embedded the broker is the first replica's in-process one, on
    /// the loopback port it picked (found in `/proc`, [`Running::broker_port`]).
    pub async fn start_replica(
        &self,
        replica_id: &str,
        prefix: &str,
        send_queue: Option<usize>,
    ) -> Result<Replica> {
        let Profile::Presence(mut layout) = self.profile else {
            bail!("{}: not started for the presence scenario", self.target);
        };
        layout.send_queue = send_queue;
        let broker = match (self.target, &self.cuttle_broker, self.broker_port) {
            (Target::CuttleEmbedded, _, Some(port)) => format!("mqtt://127.0.0.1:{port}"),
            (Target::CuttleEmbedded, _, None) => {
                bail!("the embedded broker's port was not found in /proc")
            }
            (_, Some(b), _) => b.clone(),
            (t, None, _) => bail!("{t} is not a cuttle target"),
        };
        let (listen, admin) = (sys::free_port()?, sys::free_port()?);
        let config = self.dir.join(format!("proxy-{replica_id}.yaml"));
        std::fs::write(
            &config,
            presence_config(listen, admin, &broker, &layout, replica_id, prefix),
        )?;
        let config_s = config.to_string_lossy().into_owned();
        let me = std::env::current_exe()?;
        let name = format!("cuttle-{replica_id}");
        let mut child = spawn(
            &self.dir,
            &name,
            &me,
            &["serve-proxy", "--config", &config_s],
        )?;
        wait_listening(admin, &mut child, &self.dir, &name).await?;
        wait_ready(admin, &name).await?;
        Ok(Replica {
            endpoint: Endpoint {
                protocol: Protocol::NoLag,
                addr: SocketAddr::from(([127, 0, 0, 1], listen)),
                path: "/ws",
                tokens: presence_tokens(layout.actors),
                source_addresses: 8,
            },
            pid: child_pid(&child)?,
            _child: child,
        })
    }

    pub async fn start_tls_sibling(
        &self,
        files: &crate::tls::ServerFiles,
    ) -> Result<Option<TlsSibling>> {
        let Some(broker) = &self.cuttle_broker else {
            return Ok(None);
        };
        let (listen, admin) = (sys::free_port()?, sys::free_port()?);
        let config = self.dir.join("proxy-tls.yaml");
        std::fs::write(&config, cuttle_config(listen, admin, broker, Some(files)))?;
        let config_s = config.to_string_lossy().into_owned();
        let me = std::env::current_exe()?;
        let mut child = spawn(
            &self.dir,
            "cuttle-tls",
            &me,
            &["serve-proxy", "--config", &config_s],
        )?;
        wait_listening(admin, &mut child, &self.dir, "cuttle-tls").await?;
        wait_listening(listen, &mut child, &self.dir, "cuttle-tls").await?;
        Ok(Some(TlsSibling {
            endpoint: Endpoint {
                protocol: Protocol::NoLag,
                addr: SocketAddr::from(([127, 0, 0, 1], listen)),
                path: "/ws",
                tokens: tokens(),
                source_addresses: 1,
            },
            pid: child_pid(&child)?,
            _child: child,
        }))
    }

    /// Whether the tool owns the server process (everything but the machine's RabbitMQ).
    pub fn restartable(&self) -> bool {
        !self.children.is_empty()
    }

    /// Connections the broker holds right now (None where there is no broker).
    pub fn broker_connections(&self) -> Option<usize> {
        self.broker_port.map(sys::accepted_on)
    }

    pub fn server_rss(&self) -> Result<u64> {
        sys::rss_bytes(self.server_pid)
    }
}

fn tokens() -> Arc<Vec<String>> {
    Arc::new(
        (0..CUTTLE_ACTORS)
            .map(|i| format!("bench-device-{i}-token"))
            .collect(),
    )
}

fn spawn(
    dir: &std::path::Path,
    name: &str,
    program: &std::path::Path,
    args: &[&str],
) -> Result<Child> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("BENCH_WEBHOOK_SECRET", BENCH_WEBHOOK_SECRET)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("cannot start {}", program.display()))
}

fn child_pid(child: &Child) -> Result<u32> {
    child.id().context("child exited at once")
}

/// Waits until something accepts TCP connections on `port`, or fails with the child's log.
async fn wait_listening(
    port: u16,
    child: &mut Child,
    dir: &std::path::Path,
    name: &str,
) -> Result<()> {
    for _ in 0..300 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
            bail!("{name} exited ({status}) before listening:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{name} did not listen on port {port} within 15 s")
}

/// Waits until cuttle's `/readyz` on `admin` answers 200 (its upstream pool is connected).
async fn wait_ready(admin: u16, name: &str) -> Result<()> {
    for _ in 0..200 {
        if http_ok(admin, "/readyz").await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{name} did not become ready (its upstream pool never connected)")
}

/// GET `path` on `port`; true on a 200.
async fn http_ok(port: u16, path: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    buf.starts_with(b"HTTP/1.1 200")
}

/// Starts a private three-node NATS cluster on loopback — routes between the nodes,
/// JetStream (NATS's MQTT needs it) and the MQTT listener with `stream_replicas: 3` on every
/// node, as README "Any MQTT broker" advises — and waits until every node is healthy.
/// Returns the nodes and their MQTT ports.
async fn start_nats_cluster(dir: &std::path::Path) -> Result<(Vec<Child>, Vec<u16>)> {
    const NODES: usize = 3;
    let ports = |_| sys::free_port();
    let client: Vec<u16> = (0..NODES).map(ports).collect::<Result<_>>()?;
    let route: Vec<u16> = (0..NODES).map(ports).collect::<Result<_>>()?;
    let mqtt: Vec<u16> = (0..NODES).map(ports).collect::<Result<_>>()?;
    let monitor: Vec<u16> = (0..NODES).map(ports).collect::<Result<_>>()?;
    let routes = route
        .iter()
        .map(|p| format!("\"nats://127.0.0.1:{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let program = which("nats-server")?;
    let mut nodes = Vec::with_capacity(NODES);
    for i in 0..NODES {
        let conf = dir.join(format!("nats-n{i}.conf"));
        let store = dir.join(format!("nats-js{i}"));
        std::fs::write(
            &conf,
            format!(
                "server_name: n{i}\nhost: 127.0.0.1\nport: {}\nhttp: 127.0.0.1:{}\n\
                 max_connections: 1000000\n\
                 jetstream {{ store_dir: \"{}\", max_memory_store: 256MB, max_file_store: 1GB }}\n\
                 cluster {{ name: cuttle-bench, host: 127.0.0.1, port: {}, routes: [{routes}] }}\n\
                 mqtt {{ host: 127.0.0.1, port: {}, stream_replicas: 3 }}\n",
                client[i],
                monitor[i],
                store.display(),
                route[i],
                mqtt[i]
            ),
        )?;
        let conf_s = conf.to_string_lossy().into_owned();
        nodes.push(spawn(
            dir,
            &format!("nats-n{i}"),
            &program,
            &["-c", &conf_s],
        )?);
    }
    for (i, port) in monitor.iter().enumerate() {
        let mut healthy = false;
        for _ in 0..600 {
            if http_ok(*port, "/healthz").await {
                healthy = true;
                break;
            }
            if let Some(node) = nodes.get_mut(i)
                && let Ok(Some(status)) = node.try_wait()
            {
                let log =
                    std::fs::read_to_string(dir.join(format!("nats-n{i}.log"))).unwrap_or_default();
                bail!("nats-server n{i} exited ({status}):\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !healthy {
            bail!("nats-server n{i} was not healthy within 30 s");
        }
    }
    Ok((nodes, mqtt))
}

/// Starts a private Mosquitto (TCP_NODELAY on, anonymous, no connection cap). Its queue of
/// QoS 1 messages per client is raised from 1,000 to 100,000: the scenarios' windows bound
/// the backlog, and with the default, direct MQTT's fan-in subscriber lost ~510 of 75,000
/// messages per QoS 1 phase ("Outgoing messages are being dropped") although no more than
/// 512 were outstanding by the tool's count — its PUBACKs wait behind the publishers' traffic.
async fn start_mosquitto(dir: &std::path::Path) -> Result<(Child, u16)> {
    let port = sys::free_port()?;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\n\
             set_tcp_nodelay true\npersistence false\nmax_queued_messages 100000\n{}\n",
            // Diagnosis: BENCH_MOSQUITTO_LOG=<file> logs every packet there.
            std::env::var("BENCH_MOSQUITTO_LOG").map_or("log_type error".to_string(), |f| {
                format!("log_type all\nlog_dest file {f}")
            })
        ),
    )?;
    let program = which("mosquitto")?;
    let conf_s = conf.to_string_lossy().into_owned();
    let mut child = spawn(dir, "mosquitto", &program, &["-c", &conf_s])?;
    wait_listening(port, &mut child, dir, "mosquitto").await?;
    Ok((child, port))
}

fn which(name: &str) -> Result<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"] {
        let p = PathBuf::from(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.exists() {
                return Ok(p);
            }
        }
    }
    bail!("`{name}` is not installed (bench/setup-services.sh checks the baselines' servers)")
}

/// The `upstream:` key naming the broker: `broker: <url>`, or `brokers: [..]` for a list
/// (written `[url, url, …]`).
fn upstream_broker(broker: &str) -> String {
    if broker.starts_with('[') {
        format!("brokers: {broker}")
    } else {
        format!("broker: {broker}")
    }
}

fn cuttle_config(
    listen: u16,
    admin: u16,
    broker: &str,
    tls: Option<&crate::tls::ServerFiles>,
) -> String {
    let mut actors = String::new();
    for (i, token) in tokens().iter().enumerate() {
        let hash = hex::encode(Sha256::digest(token.as_bytes()));
        actors.push_str(&format!(
            "        - {{ id: d{i}, type: device, token_sha256: \"{hash}\", scope: acme }}\n"
        ));
    }
    let tls = tls.map_or(String::new(), |f| {
        format!(
            "tls: {{ cert: \"{}\", key: \"{}\" }}\n",
            f.cert.display(),
            f.key.display()
        )
    });
    // Limits raised only where the benchmark itself would trip them: one publisher sends far
    // more than the default 50 msg/s, and the idle scenario holds connections for minutes
    // without heartbeats. Everything else (send queue, frame sizes, pool) is the default.
    format!(
        "listen: 127.0.0.1:{listen}\n\
         admin: 127.0.0.1:{admin}\n\
         {tls}\
         upstream:\n  {upstream}\n  pool: 4\n\
         limits:\n  publish_per_second: 1000000\n  max_connections: 100000\n  idle_timeout_ms: 3600000\n\
         log:\n  level: warn\n\
         policy:\n  projects:\n    - id: bench\n\
         \x20     scopes: [ {{ slug: acme }} ]\n\
         \x20     apps:\n        - slug: bench\n          topics:\n            t: {{ device: read-write }}\n            u: {{ device: read-write }}\n          rooms:\n            - slug: r\n{rooms}\
         \x20     actors:\n{actors}",
        upstream = upstream_broker(broker),
        rooms = (0..BENCH_ROOMS)
            .map(|k| format!("            - slug: c{k}\n"))
            .collect::<String>(),
    )
}

/// The noisy-neighbour proxy: two tenants of one project, every limit at its default except
/// `idle_timeout_ms` (the measuring clients send no heartbeats) and `max_connections` (see
/// [`NOISY_MAX_CONNECTIONS`]). Both tenants use the same app, rooms and topics: only the scope
/// the proxy injects keeps them apart.
fn noisy_config(listen: u16, admin: u16, broker: &str) -> String {
    let mut actors = String::new();
    for (tenant, scope, attacker) in [("v", "acme", false), ("e", "evil", true)] {
        for (i, token) in noisy_tokens(attacker).iter().enumerate() {
            let hash = hex::encode(Sha256::digest(token.as_bytes()));
            actors.push_str(&format!(
                "        - {{ id: {tenant}{i}, type: device, token_sha256: \"{hash}\", scope: {scope} }}\n"
            ));
        }
    }
    let mut rooms = String::from("            - slug: r\n");
    for k in 0..NOISY_ROOMS {
        rooms.push_str(&format!("            - slug: a{k}\n"));
    }
    format!(
        "listen: 127.0.0.1:{listen}\n\
         admin: 127.0.0.1:{admin}\n\
         upstream:\n  {upstream}\n  pool: 4\n\
         limits:\n  idle_timeout_ms: 3600000\n  max_connections: {NOISY_MAX_CONNECTIONS}\n\
         log:\n  level: warn\n\
         policy:\n  projects:\n    - id: bench\n\
         \x20     scopes: [ {{ slug: acme }}, {{ slug: evil }} ]\n\
         \x20     apps:\n        - slug: bench\n          topics:\n            t: {{ device: read-write }}\n            u: {{ device: read-write }}\n          rooms:\n{rooms}\
         \x20     actors:\n{actors}",
        upstream = upstream_broker(broker),
    )
}

/// A presence replica: one scope, `replica_id` under `prefix`. Limits at their defaults but
/// `publish_per_second` and `idle_timeout_ms` (as in the comparison runs: the bystander's
/// publishers and the silent measuring clients), `max_connections`, and `send_queue` when
/// the layout sets it (a join storm's events, see [`crate::presence`]). Presence settings
/// are all the defaults (heartbeat 1 s, 10 frames/s per connection, 10,000 members a room).
fn presence_config(
    listen: u16,
    admin: u16,
    broker: &str,
    layout: &PresenceLayout,
    replica_id: &str,
    prefix: &str,
) -> String {
    let mut actors = String::with_capacity(layout.actors * 120);
    for (i, token) in presence_tokens(layout.actors).iter().enumerate() {
        let hash = hex::encode(Sha256::digest(token.as_bytes()));
        actors.push_str(&format!(
            "        - {{ id: p{i}, type: device, token_sha256: \"{hash}\", scope: acme }}\n"
        ));
    }
    let mut rooms = String::from("            - slug: r\n            - slug: general\n");
    for r in 0..layout.rooms {
        rooms.push_str(&format!("            - slug: s{r}\n"));
    }
    let mut lobbies = String::new();
    let list = presence_lobbies(layout);
    if !list.is_empty() {
        lobbies.push_str("          lobbies:\n");
        for (slug, rooms) in list {
            lobbies.push_str(&format!(
                "            - {{ slug: {slug}, rooms: [{}] }}\n",
                rooms.join(", ")
            ));
        }
    }
    let send_queue = layout
        .send_queue
        .map_or(String::new(), |q| format!("  send_queue: {q}\n"));
    format!(
        "listen: 127.0.0.1:{listen}\n\
         admin: 127.0.0.1:{admin}\n\
         upstream:\n  {upstream}\n  pool: 4\n  topic_prefix: {prefix}\n\
         limits:\n  publish_per_second: 1000000\n  max_connections: 100000\n  idle_timeout_ms: 3600000\n{send_queue}\
         presence:\n  replica_id: {replica_id}\n\
         log:\n  level: warn\n\
         policy:\n  projects:\n    - id: bench\n\
         \x20     scopes: [ {{ slug: acme }} ]\n\
         \x20     apps:\n        - slug: bench\n          topics:\n            t: {{ device: read-write }}\n            u: {{ device: read-write }}\n          rooms:\n{rooms}{lobbies}\
         \x20     actors:\n{actors}",
        upstream = upstream_broker(broker),
    )
}

/// Starts `target` and waits until it serves.
pub async fn start(target: Target) -> Result<Running> {
    start_with(target, Profile::Standard).await
}

/// Starts `target` (a cuttle one, for [`Profile::Noisy`]) with `profile`'s configuration.
pub async fn start_with(target: Target, profile: Profile) -> Result<Running> {
    if profile != Profile::Standard
        && !matches!(target, Target::CuttleEmbedded | Target::CuttleMosquitto)
    {
        bail!(
            "{target} is not cuttle: the noisy-neighbour and presence scenarios need a cuttle target"
        );
    }
    let dir = std::env::temp_dir().join(format!(
        "cuttle-bench-{}-{}",
        std::process::id(),
        target.name()
    ));
    std::fs::create_dir_all(&dir)?;
    let localhost = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let mut children = Vec::new();
    let me = std::env::current_exe()?;

    let (endpoint, cuttle_broker, server_pid, broker_port) = match target {
        Target::CuttleEmbedded
        | Target::CuttleMosquitto
        | Target::CuttleNats
        | Target::CuttleRabbitmq => {
            let (broker, broker_url) = match target {
                Target::CuttleMosquitto => {
                    let (child, port) = start_mosquitto(&dir).await?;
                    children.push(child);
                    (Some(port), format!("mqtt://127.0.0.1:{port}"))
                }
                Target::CuttleNats => {
                    let (nodes, ports) = start_nats_cluster(&dir).await?;
                    children.extend(nodes);
                    let list = ports
                        .iter()
                        .map(|p| format!("mqtt://127.0.0.1:{p}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    (ports.first().copied(), format!("[{list}]"))
                }
                Target::CuttleRabbitmq => {
                    if TcpStream::connect(("127.0.0.1", RABBITMQ_MQTT_PORT))
                        .await
                        .is_err()
                    {
                        bail!(
                            "RabbitMQ MQTT is not listening on 127.0.0.1:{RABBITMQ_MQTT_PORT}; \
                             run bench/setup-services.sh"
                        );
                    }
                    (
                        Some(RABBITMQ_MQTT_PORT),
                        format!("mqtt://127.0.0.1:{RABBITMQ_MQTT_PORT}"),
                    )
                }
                _ => (None, "embedded".to_string()),
            };
            let (listen, admin) = (sys::free_port()?, sys::free_port()?);
            let config = dir.join("proxy.yaml");
            let text = match profile {
                Profile::Standard => cuttle_config(listen, admin, &broker_url, None),
                // The project's last key is `actors`: the endpoint list follows it.
                Profile::Webhooks { sink } => format!(
                    "{}      webhooks:\n        - {{ url: \"http://127.0.0.1:{sink}/hook\", secret_env: BENCH_WEBHOOK_SECRET, events: [connect, disconnect, subscribe, unsubscribe, publish, presence], allow_private: true }}\n",
                    cuttle_config(listen, admin, &broker_url, None)
                ),
                Profile::Noisy => noisy_config(listen, admin, &broker_url),
                Profile::Presence(layout) => {
                    presence_config(listen, admin, &broker_url, &layout, "a", PRESENCE_PREFIX)
                }
            };
            std::fs::write(&config, text)?;
            let config_s = config.to_string_lossy().into_owned();
            let mut child = spawn(&dir, "cuttle", &me, &["serve-proxy", "--config", &config_s])?;
            wait_listening(admin, &mut child, &dir, "cuttle").await?;
            wait_ready(admin, "cuttle").await?;
            let pid = child_pid(&child)?;
            let broker_port = match broker {
                Some(p) => Some(p),
                // The embedded broker listens inside the proxy process, on a port it picks.
                None => sys::listening_ports(pid)
                    .into_iter()
                    .find(|p| *p != listen && *p != admin),
            };
            children.push(child);
            (
                Endpoint {
                    protocol: Protocol::NoLag,
                    addr: localhost(listen),
                    path: "/ws",
                    tokens: match profile {
                        Profile::Standard | Profile::Webhooks { .. } => tokens(),
                        Profile::Noisy => noisy_tokens(false),
                        Profile::Presence(layout) => presence_tokens(layout.actors),
                    },
                    source_addresses: match profile {
                        // Up to 10,000 members and their replicas' sockets.
                        Profile::Presence(_) => 8,
                        _ => 1,
                    },
                },
                Some(broker_url),
                pid,
                broker_port,
            )
        }
        Target::MosquittoTcp => {
            let (child, port) = start_mosquitto(&dir).await?;
            let pid = child_pid(&child)?;
            children.push(child);
            (
                Endpoint {
                    protocol: Protocol::MqttTcp,
                    addr: localhost(port),
                    path: "",
                    tokens: Arc::new(Vec::new()),
                    source_addresses: 1,
                },
                None,
                pid,
                Some(port),
            )
        }
        Target::NatsWs => {
            let (client_port, ws_port) = (sys::free_port()?, sys::free_port()?);
            let conf = dir.join("nats.conf");
            std::fs::write(
                &conf,
                format!(
                    "listen: 127.0.0.1:{client_port}\nmax_connections: 1000000\n\
                     websocket {{\n  listen: \"127.0.0.1:{ws_port}\"\n  no_tls: true\n  compression: false\n}}\n"
                ),
            )?;
            let program = which("nats-server")?;
            let conf_s = conf.to_string_lossy().into_owned();
            let mut child = spawn(&dir, "nats", &program, &["-c", &conf_s])?;
            wait_listening(ws_port, &mut child, &dir, "nats").await?;
            let pid = child_pid(&child)?;
            children.push(child);
            (
                Endpoint {
                    protocol: Protocol::NatsWs,
                    addr: localhost(ws_port),
                    path: "/",
                    tokens: Arc::new(Vec::new()),
                    source_addresses: 1,
                },
                None,
                pid,
                Some(ws_port),
            )
        }
        Target::RabbitmqWebMqtt => {
            if TcpStream::connect(("127.0.0.1", RABBITMQ_WEB_MQTT_PORT))
                .await
                .is_err()
            {
                bail!(
                    "RabbitMQ Web-MQTT is not listening on 127.0.0.1:{RABBITMQ_WEB_MQTT_PORT}; \
                     run bench/setup-services.sh"
                );
            }
            let pid =
                sys::pid_by_name("beam.smp").context("RabbitMQ's beam.smp process not found")?;
            (
                Endpoint {
                    protocol: Protocol::MqttWs,
                    addr: localhost(RABBITMQ_WEB_MQTT_PORT),
                    path: "/ws",
                    tokens: Arc::new(Vec::new()),
                    source_addresses: 1,
                },
                None,
                pid,
                Some(RABBITMQ_WEB_MQTT_PORT),
            )
        }
        Target::WsBroadcast => {
            let port = sys::free_port()?;
            let listen = format!("127.0.0.1:{port}");
            let mut child = spawn(
                &dir,
                "broadcast",
                &me,
                &["serve-broadcast", "--listen", &listen],
            )?;
            wait_listening(port, &mut child, &dir, "broadcast").await?;
            let pid = child_pid(&child)?;
            children.push(child);
            (
                Endpoint {
                    protocol: Protocol::Broadcast,
                    addr: localhost(port),
                    path: "/",
                    tokens: Arc::new(Vec::new()),
                    source_addresses: 1,
                },
                None,
                pid,
                None,
            )
        }
    };
    Ok(Running {
        target,
        endpoint,
        cuttle_broker,
        server_pid,
        broker_port,
        profile,
        children,
        dir,
    })
}
