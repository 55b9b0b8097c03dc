//! The embedded MQTT broker: `rumqttd` in-process on a loopback port (DESIGN §1).
//!
//! The upstream pool connects to it over TCP exactly as it would to a remote broker, so the
//! data path is the same code with `upstream.broker: embedded` and with EMQX or Mosquitto.
//! Loopback TCP rather than rumqttd's in-process link API: the link API hands over rumqttd's
//! own packet types through its router channels, a second data path to keep exact (acks,
//! subscription ids, wills) for a gain the benchmarks do not show once the accepted sockets
//! have `TCP_NODELAY` (vendor/rumqttd/PATCHES.md, patch 5; BENCHMARKS.md has the figures).
//! It listens on 127.0.0.1 only and has no authentication: nothing but this process can reach
//! it, and the proxy enforces the policy before anything is published.
//!
//! rumqttd runs its own threads and offers no shutdown; it lives as long as the process.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};

use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Why the embedded broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot bind the embedded broker's loopback port (upstream.embedded_port): {0}")]
    Port(std::io::Error),
    #[error("cannot start the embedded broker thread: {0}")]
    Thread(std::io::Error),
}

/// A running embedded broker.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedBroker {
    pub addr: SocketAddr,
}

/// Starts rumqttd on loopback port `port` (0: a free one). `max_payload` bounds one MQTT
/// message (the proxy's own frame limit plus envelope overhead). `v311`: the listener speaks
/// MQTT 3.1.1 instead of 5 (`upstream.protocol: v3`, which routes by topic matching).
pub fn start(
    max_payload: usize,
    max_connections: usize,
    port: u16,
    v311: bool,
) -> Result<EmbeddedBroker, BrokerError> {
    // rumqttd cannot report the port it bound, so pick one first (and check a configured one
    // is free). Another process could take it in between; the pool would then fail to connect
    // and /readyz stays not-ready.
    let addr = TcpListener::bind(("127.0.0.1", port))
        .and_then(|l| l.local_addr())
        .map_err(BrokerError::Port)?;

    let connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: max_payload,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "cuttle-embedded".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections,
            max_outgoing_packet_count: 1000,
            // Commit-log segments per filter: enough to hold a burst of maximum-size messages,
            // small enough that many filters do not add up to gigabytes.
            max_segment_size: (4 * max_payload).max(1 << 20),
            max_segment_count: 4,
            ..RouterConfig::default()
        },
        // MQTT 5, so that routing uses subscription identifiers; 3.1.1 only when asked for.
        v4: v311.then(|| HashMap::from([("cuttle".to_string(), server.clone())])),
        v5: (!v311).then(|| HashMap::from([("cuttle".to_string(), server)])),
        ..Config::default()
    };

    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;

    // No readiness probe here: rumqttd logs a bare TCP probe as a failed MQTT connect. The
    // pool's connections retry with backoff until the listener is up, and /readyz reports
    // not-ready until they are.
    tracing::info!(%addr, "embedded MQTT broker listening");
    Ok(EmbeddedBroker { addr })
}
