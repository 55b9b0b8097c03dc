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
    // rumqttd cannot report the port it bound, so bind here and hand it the listener
    // (vendor/rumqttd/PATCHES.md, patch 6): a configured port that is taken fails now, with a
    // message, and a picked one cannot be taken between picking and serving.
    let listener = TcpListener::bind(("127.0.0.1", port)).map_err(BrokerError::Port)?;
    let addr = listener.local_addr().map_err(BrokerError::Port)?;

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
    broker.with_listener(listener).map_err(BrokerError::Port)?;
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;

    // The listener is bound already: the pool's first connections wait in its backlog until
    // rumqttd's server thread accepts them, and /readyz reports not-ready until they are up.
    tracing::info!(%addr, "embedded MQTT broker listening");
    Ok(EmbeddedBroker { addr })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Duration;

    use super::*;

    /// An MQTT 5 CONNECT: clean start, keep-alive 60 s, no properties, client id `t`.
    const CONNECT_V5: [u8; 16] = [
        0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 1, b't',
    ];

    #[test]
    fn the_port_is_listening_when_start_returns() {
        // Before the listener was handed over, rumqttd bound the port in its own thread a
        // moment later: a connection made at once was refused.
        let broker = start(1 << 20, 10, 0, false).expect("embedded broker");
        let mut conn = std::net::TcpStream::connect(broker.addr).expect("connects at once");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        conn.write_all(&CONNECT_V5).unwrap();
        let mut fixed = [0u8; 2];
        conn.read_exact(&mut fixed).expect("an answer");
        assert_eq!(fixed[0], 0x20, "CONNACK");
    }

    #[test]
    fn a_taken_port_fails_at_start_naming_the_setting() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = start(1 << 20, 10, port, false).expect_err("the port is taken");
        assert!(matches!(err, BrokerError::Port(_)), "{err}");
        assert!(err.to_string().contains("upstream.embedded_port"), "{err}");
    }
}
