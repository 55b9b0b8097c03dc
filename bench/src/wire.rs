//! The client side of every protocol under test, behind one [`Client`] type.
//!
//! Each system is driven the way its own browser-facing clients drive it:
//! - cuttle: NoLag MessagePack frames over WebSocket (`auth`, `subscribe`, `publish`);
//! - RabbitMQ Web-MQTT: MQTT 3.1.1 packets inside WebSocket binary frames (subprotocol `mqtt`);
//! - Mosquitto: MQTT 3.1.1 over plain TCP (the floor a proxy adds latency to);
//! - NATS: the NATS text protocol inside WebSocket binary frames;
//! - the built-in broadcast server: raw binary frames (see [`crate::broadcast`]).
//!
//! MQTT packets are encoded and parsed with rumqttc's `mqttbytes` (the codec rumqttc itself
//! uses); NoLag frames with `rmp`. A client publishes and subscribes at its [`Client::set_qos`]
//! level (0 by default): QoS 1 is acknowledged the way each protocol does it — MQTT
//! subscribers PUBACK every delivery and MQTT publishers read their PUBACKs; a NoLag `publish`
//! at QoS 1 gets no answer (the proxy acknowledges it upstream). NATS core and the broadcast
//! server have no QoS 1: the scenarios measure them at QoS 0 only ([`Protocol::has_qos1`]).
//!
//! A [`Payload`] carries the phase it belongs to and the publisher's send time, so a
//! subscriber can compute end-to-end latency (publisher and subscribers share one process and
//! one monotonic clock).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use rumqttc::mqttbytes::v4::{Connect, Packet, PubAck, Publish, Subscribe, Unsubscribe};
use rumqttc::mqttbytes::{Error as MqttError, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// The wire protocol a target speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// NoLag MessagePack over WebSocket (cuttle).
    NoLag,
    /// MQTT 3.1.1 over WebSocket (RabbitMQ Web-MQTT).
    MqttWs,
    /// MQTT 3.1.1 over TCP (Mosquitto).
    MqttTcp,
    /// The NATS protocol over WebSocket.
    NatsWs,
    /// Raw frames to the built-in broadcast server.
    Broadcast,
}

impl Protocol {
    fn uses_websocket(self) -> bool {
        !matches!(self, Protocol::MqttTcp)
    }

    /// Whether the protocol has an acknowledged (QoS 1) delivery.
    pub fn has_qos1(self) -> bool {
        matches!(self, Protocol::NoLag | Protocol::MqttWs | Protocol::MqttTcp)
    }

    /// Topic `leaf` (`t` or `u`) of room `room` (rooms and churn scenarios) in this
    /// protocol's syntax: `bench/c<room>/<leaf>` (cuttle: room `c<room>` of app `bench`).
    pub fn room_topic(self, room: usize, leaf: &str) -> String {
        match self {
            Protocol::NatsWs => format!("bench.c{room}.{leaf}"),
            _ => format!("bench/c{room}/{leaf}"),
        }
    }

    /// The two topics (or subjects) of the benchmark in this protocol's syntax: the first
    /// carries the traffic, the second is the idle scenario's second subscription.
    fn topics(self) -> [&'static str; 2] {
        match self {
            Protocol::NoLag => ["bench/r/t", "bench/r/u"],
            Protocol::MqttWs | Protocol::MqttTcp => ["bench/t", "bench/u"],
            Protocol::NatsWs => ["bench.t", "bench.u"],
            Protocol::Broadcast => ["", ""],
        }
    }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub protocol: Protocol,
    pub addr: SocketAddr,
    /// WebSocket path (`/ws` for cuttle and RabbitMQ, `/` for NATS).
    pub path: &'static str,
    /// Credentials the target accepts; client `i` uses `tokens[i % len]`.
    pub tokens: Arc<Vec<String>>,
    /// Spread client sockets over this many 127.0.0.x source addresses (1 = kernel's choice):
    /// 20,000 connections from one address can exhaust the ephemeral port range.
    pub source_addresses: u8,
}

/// Largest MQTT packet the clients accept.
const MAX_PACKET: usize = 1 << 20;

/// Client-side WebSocket buffers, kept small: the tool holds tens of thousands of clients.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(4 << 20))
        .max_frame_size(Some(4 << 20))
}

/// A message's header: phase (u32 LE), then send time in ns since [`epoch`] (u64 LE).
pub const PAYLOAD_HEADER: usize = 12;

/// The shared monotonic clock of publishers and subscribers.
pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

pub fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Builds and reads benchmark payloads.
pub struct Payload;

impl Payload {
    /// A payload of `size` bytes (at least the header) stamped with `phase` and now.
    pub fn stamp(buf: &mut Vec<u8>, size: usize, phase: u32) {
        buf.clear();
        buf.extend_from_slice(&phase.to_le_bytes());
        buf.extend_from_slice(&now_ns().to_le_bytes());
        buf.resize(size.max(PAYLOAD_HEADER), 0x2a);
    }

    /// (phase, send time) of a received payload, or None if it is not one of ours.
    pub fn read(data: &[u8]) -> Option<(u32, u64)> {
        let phase = u32::from_le_bytes(data.get(0..4)?.try_into().ok()?);
        let sent = u64::from_le_bytes(data.get(4..12)?.try_into().ok()?);
        Some((phase, sent))
    }
}

/// Object-safe alias for the byte stream under a client.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub type BoxIo = Box<dyn Io>;

enum Transport {
    Ws(Box<WebSocketStream<BoxIo>>),
    Tcp(BoxIo),
}

/// One connected, logged-in client of any protocol.
pub struct Client {
    protocol: Protocol,
    transport: Transport,
    /// Bytes received but not yet parsed (stream protocols: MQTT, NATS).
    rbuf: BytesMut,
    /// Scratch for encoding outgoing packets.
    wbuf: BytesMut,
    /// Where [`Client::publish`] publishes (the traffic topic, or a room's).
    topic: String,
    /// QoS of subscriptions and publishes (0 or 1).
    qos: u8,
    /// The next MQTT packet id of a QoS 1 publish.
    next_pkid: u16,
    /// Whether the client has subscribed: a publisher that has not reads (and drops) its
    /// PUBACKs itself after each publish; one that has leaves them to [`Client::next_payload`].
    subscribed: bool,
    /// Packet ids of QoS 1 MQTT deliveries not yet acknowledged ([`Client::flush_acks`]).
    pending_acks: Vec<u16>,
    /// A NATS server PING not yet answered ([`Client::flush_acks`]).
    pending_pong: bool,
}

/// Opens a TCP connection to `ep`, from source address number `index % source_addresses`.
pub async fn tcp_connect(ep: &Endpoint, index: usize) -> Result<TcpStream> {
    let stream = if ep.source_addresses > 1 {
        let last = 1 + (index % usize::from(ep.source_addresses)) as u8;
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)),
            0,
        ))?;
        socket.connect(ep.addr).await?
    } else {
        TcpStream::connect(ep.addr).await?
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

impl Client {
    /// Connects, upgrades to WebSocket where the protocol uses it, and logs in.
    pub async fn connect(ep: &Endpoint, index: usize) -> Result<Client> {
        let tcp = tcp_connect(ep, index).await?;
        Self::connect_over(ep, index, Box::new(tcp)).await
    }

    /// Like [`Client::connect`] over an already-open stream (plain or TLS).
    pub async fn connect_over(ep: &Endpoint, index: usize, io: BoxIo) -> Result<Client> {
        let transport = if ep.protocol.uses_websocket() {
            let mut request = format!("ws://{}{}", ep.addr, ep.path).into_client_request()?;
            if ep.protocol == Protocol::MqttWs {
                request
                    .headers_mut()
                    .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
            }
            let (ws, _) =
                tokio_tungstenite::client_async_with_config(request, io, Some(ws_config()))
                    .await
                    .context("WebSocket handshake")?;
            Transport::Ws(Box::new(ws))
        } else {
            Transport::Tcp(io)
        };
        let mut client = Client {
            protocol: ep.protocol,
            transport,
            rbuf: BytesMut::with_capacity(1024),
            wbuf: BytesMut::with_capacity(256),
            topic: ep.protocol.topics()[0].to_string(),
            qos: 0,
            next_pkid: 0,
            subscribed: false,
            pending_acks: Vec::new(),
            pending_pong: false,
        };
        client.login(ep, index).await?;
        Ok(client)
    }

    async fn login(&mut self, ep: &Endpoint, index: usize) -> Result<()> {
        match self.protocol {
            Protocol::NoLag => {
                let token = ep
                    .tokens
                    .get(index % ep.tokens.len().max(1))
                    .ok_or_else(|| anyhow!("no token for cuttle"))?;
                let mut frame = Vec::with_capacity(64);
                rmp::encode::write_map_len(&mut frame, 2)?;
                put_str(&mut frame, "type");
                put_str(&mut frame, "auth");
                put_str(&mut frame, "token");
                put_str(&mut frame, token);
                self.send_frame(frame.into()).await?;
                let reply = self.next_nolag_of("auth").await?;
                if !nolag_bool(&reply, "success") {
                    bail!("cuttle refused the token: {}", describe_frame(&reply));
                }
            }
            Protocol::MqttWs | Protocol::MqttTcp => {
                let mut connect = Connect::new(format!("bench-{}-{index}", std::process::id()));
                connect.keep_alive = 0;
                self.send_mqtt(Packet::Connect(connect)).await?;
                match self.next_mqtt().await? {
                    Packet::ConnAck(ack)
                        if ack.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success => {}
                    other => bail!("MQTT CONNECT refused: {other:?}"),
                }
            }
            Protocol::NatsWs => {
                let info = self.next_nats_line().await?;
                if !info.starts_with(b"INFO ") {
                    bail!("NATS server did not start with INFO");
                }
                self.send_frame(Bytes::from_static(
                    b"CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"headers\":false}\r\nPING\r\n",
                ))
                .await?;
                self.nats_await_pong().await?;
            }
            Protocol::Broadcast => {}
        }
        Ok(())
    }

    /// Subscribes to the traffic topic (`second: false`) or the idle topic, and waits for the
    /// server's acknowledgement so that nothing published afterwards is missed.
    pub async fn subscribe(&mut self, second: bool) -> Result<()> {
        let topic = self.protocol.topics()[usize::from(second)];
        if self.protocol == Protocol::Broadcast {
            // The server registers a subscriber on a first frame of "S" and answers "K".
            if !second {
                self.send_frame(Bytes::from_static(b"S")).await?;
                loop {
                    if let Some(frame) = self.next_ws_binary().await? {
                        if &frame[..] == b"K" {
                            break;
                        }
                    } else {
                        bail!("broadcast server closed during subscribe");
                    }
                }
            }
            self.subscribed = true;
            return Ok(());
        }
        self.subscribe_to(topic).await
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The QoS (0 or 1, capped at 1) of later subscribes and publishes.
    pub fn set_qos(&mut self, qos: u8) {
        self.qos = qos.min(1);
    }

    /// Makes room `room`'s traffic topic the one [`Client::publish`] publishes on.
    pub fn set_room(&mut self, room: usize) {
        self.topic = self.protocol.room_topic(room, "t");
    }

    /// Subscribes to `topic` (in the protocol's syntax) at the client's QoS and waits for the
    /// server's acknowledgement. Not for the broadcast server.
    pub async fn subscribe_to(&mut self, topic: &str) -> Result<()> {
        self.subscribed = true;
        match self.protocol {
            Protocol::NoLag => {
                let mut frame = Vec::with_capacity(64);
                rmp::encode::write_map_len(&mut frame, 3)?;
                put_str(&mut frame, "type");
                put_str(&mut frame, "subscribe");
                put_str(&mut frame, "topic");
                put_str(&mut frame, topic);
                put_str(&mut frame, "qos");
                rmp::encode::write_uint(&mut frame, u64::from(self.qos))?;
                self.send_frame(frame.into()).await?;
                self.next_nolag_of("subscribed").await?;
            }
            Protocol::MqttWs | Protocol::MqttTcp => {
                let mut sub = Subscribe::new(topic, mqtt_qos(self.qos));
                sub.pkid = self.take_pkid();
                self.send_mqtt(Packet::Subscribe(sub)).await?;
                self.await_mqtt_ack(|p| matches!(p, Packet::SubAck(_)), "SUBACK")
                    .await?;
            }
            Protocol::NatsWs => {
                // The subscription id is derived from the subject: unsubscribe needs nothing else.
                self.send_frame(Bytes::from(format!(
                    "SUB {topic} {}\r\nPING\r\n",
                    nats_sid(topic)
                )))
                .await?;
                self.nats_await_pong().await?;
            }
            Protocol::Broadcast => bail!("the broadcast server has no topics"),
        }
        Ok(())
    }

    /// Unsubscribes from `topic` and waits for the server's acknowledgement (deliveries that
    /// arrive meanwhile are dropped). Not for the broadcast server.
    pub async fn unsubscribe_from(&mut self, topic: &str) -> Result<()> {
        match self.protocol {
            Protocol::NoLag => {
                self.send_frame(nolag::unsubscribe(topic)).await?;
                self.next_nolag_of("unsubscribed").await?;
            }
            Protocol::MqttWs | Protocol::MqttTcp => {
                let unsub = Unsubscribe {
                    pkid: self.take_pkid(),
                    topics: vec![topic.to_string()],
                };
                self.send_mqtt(Packet::Unsubscribe(unsub)).await?;
                self.await_mqtt_ack(|p| matches!(p, Packet::UnsubAck(_)), "UNSUBACK")
                    .await?;
            }
            Protocol::NatsWs => {
                self.send_frame(Bytes::from(format!(
                    "UNSUB {}\r\nPING\r\n",
                    nats_sid(topic)
                )))
                .await?;
                self.nats_await_pong().await?;
            }
            Protocol::Broadcast => bail!("the broadcast server has no topics"),
        }
        Ok(())
    }

    /// Reads MQTT packets until one `is_ack`; deliveries meanwhile are acknowledged (QoS 1)
    /// and dropped.
    async fn await_mqtt_ack(&mut self, is_ack: fn(&Packet) -> bool, what: &str) -> Result<()> {
        loop {
            match self.next_mqtt().await? {
                p if is_ack(&p) => break,
                Packet::Publish(p) => {
                    if p.qos != QoS::AtMostOnce {
                        self.pending_acks.push(p.pkid);
                    }
                }
                Packet::PingResp | Packet::PubAck(_) => continue,
                other => bail!("expected {what}, got {other:?}"),
            }
        }
        self.flush_acks().await
    }

    /// A fresh MQTT packet id (never 0).
    fn take_pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        self.next_pkid
    }

    /// Sends the PUBACKs of the QoS 1 MQTT deliveries [`Client::next_payload`] returned, in
    /// one write, and the PONG of a NATS server's PING. Readers call it after each delivery
    /// (outside any `select!`: a cancelled write would corrupt the stream).
    pub async fn flush_acks(&mut self) -> Result<()> {
        if std::mem::take(&mut self.pending_pong) {
            self.send_frame(Bytes::from_static(b"PONG\r\n")).await?;
        }
        if self.pending_acks.is_empty() {
            return Ok(());
        }
        self.wbuf.clear();
        for pkid in std::mem::take(&mut self.pending_acks) {
            Packet::PubAck(PubAck::new(pkid))
                .write(&mut self.wbuf, MAX_PACKET)
                .map_err(|e| anyhow!("encode MQTT: {e:?}"))?;
        }
        let bytes = self.wbuf.split().freeze();
        self.send_frame(bytes).await
    }

    /// A publisher that never subscribed reads its QoS 1 PUBACKs here, without waiting:
    /// whatever has arrived is parsed and dropped, so the socket's receive side never fills.
    fn drain_publish_acks(&mut self) -> Result<()> {
        use futures_util::FutureExt;
        loop {
            match Packet::read(&mut self.rbuf, MAX_PACKET) {
                Ok(_) => continue,
                Err(MqttError::InsufficientBytes(_)) => {}
                Err(e) => bail!("bad MQTT packet: {e:?}"),
            }
            match self.fill().now_or_never() {
                Some(Ok(true)) => continue,
                Some(Ok(false)) => bail!("MQTT server closed the connection"),
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    }

    /// Publishes one message on the traffic topic at the client's QoS, no echo.
    pub async fn publish(&mut self, payload: &[u8]) -> Result<()> {
        self.publish_echo(payload, false).await
    }

    /// Publishes one message on the traffic topic at the client's QoS; `echo` asks cuttle to
    /// deliver it to the sender too (MQTT 3.1.1 and NATS always do).
    pub async fn publish_echo(&mut self, payload: &[u8], echo: bool) -> Result<()> {
        match self.protocol {
            Protocol::NoLag => {
                let mut frame = Vec::with_capacity(payload.len() + 64);
                rmp::encode::write_map_len(&mut frame, 5)?;
                put_str(&mut frame, "type");
                put_str(&mut frame, "publish");
                put_str(&mut frame, "topic");
                put_str(&mut frame, &self.topic);
                put_str(&mut frame, "data");
                rmp::encode::write_bin(&mut frame, payload)?;
                put_str(&mut frame, "qos");
                rmp::encode::write_uint(&mut frame, u64::from(self.qos))?;
                put_str(&mut frame, "echo");
                rmp::encode::write_bool(&mut frame, echo)?;
                self.send_frame(frame.into()).await
            }
            Protocol::MqttWs | Protocol::MqttTcp => {
                let mut publish = Publish::from_bytes(
                    &self.topic,
                    mqtt_qos(self.qos),
                    Bytes::copy_from_slice(payload),
                );
                if self.qos > 0 {
                    publish.pkid = self.take_pkid();
                }
                self.send_mqtt(Packet::Publish(publish)).await?;
                if self.qos > 0 && !self.subscribed {
                    self.drain_publish_acks()?;
                }
                Ok(())
            }
            Protocol::NatsWs => {
                let mut out = Vec::with_capacity(payload.len() + 32);
                out.extend_from_slice(
                    format!("PUB {} {}\r\n", self.topic, payload.len()).as_bytes(),
                );
                out.extend_from_slice(payload);
                out.extend_from_slice(b"\r\n");
                self.send_frame(out.into()).await
            }
            Protocol::Broadcast => self.send_frame(Bytes::copy_from_slice(payload)).await,
        }
    }

    /// The next application payload delivered to this client; protocol chatter (heartbeats,
    /// pings) is answered and skipped. `None` when the server closed the connection.
    pub async fn next_payload(&mut self) -> Result<Option<Bytes>> {
        loop {
            match self.protocol {
                Protocol::NoLag => {
                    let Some(frame) = self.next_ws_binary().await? else {
                        return Ok(None);
                    };
                    if frame.is_empty() {
                        continue; // heartbeat
                    }
                    let fields = NoLagFrame::parse(&frame)?;
                    match fields.kind {
                        "message" => {
                            let (start, end) = fields
                                .data
                                .ok_or_else(|| anyhow!("message frame without bin data"))?;
                            return Ok(Some(frame.slice(start..end)));
                        }
                        "error" => bail!("cuttle error frame: {}", describe_frame(&frame)),
                        _ => continue,
                    }
                }
                Protocol::MqttWs | Protocol::MqttTcp => match self.next_mqtt_or_eof().await? {
                    Some(Packet::Publish(p)) => {
                        if p.qos != QoS::AtMostOnce {
                            self.pending_acks.push(p.pkid);
                        }
                        return Ok(Some(p.payload));
                    }
                    Some(_) => continue,
                    None => return Ok(None),
                },
                Protocol::NatsWs => {
                    if let Some(payload) = self.next_nats_msg().await? {
                        return Ok(Some(payload));
                    }
                    return Ok(None);
                }
                Protocol::Broadcast => return self.next_ws_binary().await,
            }
        }
    }

    /// The `error` strings of the error frames already waiting on this connection (cuttle;
    /// a publisher only writes, so its refusals queue up unread): reads until nothing comes
    /// for `quiet`.
    pub async fn pending_errors(&mut self, quiet: Duration) -> Vec<String> {
        let mut errors = Vec::new();
        if self.protocol != Protocol::NoLag {
            return errors;
        }
        while let Ok(Ok(Some(frame))) = tokio::time::timeout(quiet, self.next_ws_binary()).await {
            if let Some((kind, error)) = frame_kind(&frame)
                && kind == "error"
            {
                errors.push(error.unwrap_or_default());
            }
        }
        errors
    }

    /// The WebSocket under a logged-in client, for callers that read and write it at once
    /// (split) or not at all (the slow consumer).
    pub fn into_ws(self) -> Result<WebSocketStream<BoxIo>> {
        match self.transport {
            Transport::Ws(ws) => Ok(*ws),
            Transport::Tcp(_) => bail!("not a WebSocket client"),
        }
    }

    /// Closes politely where the protocol has a goodbye, then drops the socket.
    pub async fn close(mut self) {
        if let Protocol::MqttTcp | Protocol::MqttWs = self.protocol {
            let _ = self.send_mqtt(Packet::Disconnect).await;
        }
        match &mut self.transport {
            Transport::Ws(ws) => {
                let _ = WebSocketStream::close(ws.as_mut(), None).await;
            }
            Transport::Tcp(io) => {
                let _ = io.shutdown().await;
            }
        }
    }

    // ---- transport -------------------------------------------------------------------

    /// One binary frame over WebSocket; the bytes as they are over TCP (MQTT, stream
    /// protocols over WebSocket alike).
    async fn send_frame(&mut self, frame: Bytes) -> Result<()> {
        match &mut self.transport {
            Transport::Ws(ws) => ws.send(Message::Binary(frame)).await?,
            Transport::Tcp(io) => io.write_all(&frame).await?,
        }
        Ok(())
    }

    async fn send_mqtt(&mut self, packet: Packet) -> Result<()> {
        self.wbuf.clear();
        packet
            .write(&mut self.wbuf, MAX_PACKET)
            .map_err(|e| anyhow!("encode MQTT: {e:?}"))?;
        let bytes = self.wbuf.split().freeze();
        self.send_frame(bytes).await
    }

    /// Next binary WebSocket message; pings are answered by tungstenite, text is an error.
    async fn next_ws_binary(&mut self) -> Result<Option<Bytes>> {
        let Transport::Ws(ws) = &mut self.transport else {
            bail!("not a WebSocket client");
        };
        loop {
            match ws.next().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Binary(b))) => return Ok(Some(b)),
                Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Ok(Message::Text(t))) => bail!("unexpected text frame: {}", short(&t)),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Appends more stream bytes to `rbuf`; false at end of stream.
    async fn fill(&mut self) -> Result<bool> {
        match &mut self.transport {
            Transport::Ws(_) => match self.next_ws_binary().await? {
                Some(b) => {
                    self.rbuf.extend_from_slice(&b);
                    Ok(true)
                }
                None => Ok(false),
            },
            Transport::Tcp(io) => {
                self.rbuf.reserve(16 * 1024);
                Ok(io.read_buf(&mut self.rbuf).await? > 0)
            }
        }
    }

    // ---- NoLag -----------------------------------------------------------------------

    /// Reads frames until one of `kind` arrives; an error frame fails.
    async fn next_nolag_of(&mut self, kind: &str) -> Result<Bytes> {
        loop {
            let Some(frame) = self.next_ws_binary().await? else {
                bail!("cuttle closed the connection while waiting for `{kind}`");
            };
            if frame.is_empty() {
                continue;
            }
            let fields = NoLagFrame::parse(&frame)?;
            if fields.kind == kind {
                return Ok(frame);
            }
            if fields.kind == "error" {
                bail!("cuttle error frame: {}", describe_frame(&frame));
            }
        }
    }

    // ---- MQTT ------------------------------------------------------------------------

    async fn next_mqtt(&mut self) -> Result<Packet> {
        self.next_mqtt_or_eof()
            .await?
            .ok_or_else(|| anyhow!("MQTT server closed the connection"))
    }

    async fn next_mqtt_or_eof(&mut self) -> Result<Option<Packet>> {
        loop {
            match Packet::read(&mut self.rbuf, MAX_PACKET) {
                Ok(p) => return Ok(Some(p)),
                Err(MqttError::InsufficientBytes(_)) => {
                    if !self.fill().await? {
                        return Ok(None);
                    }
                }
                Err(e) => bail!("bad MQTT packet: {e:?}"),
            }
        }
    }

    // ---- NATS ------------------------------------------------------------------------

    /// One protocol line (without CRLF).
    async fn next_nats_line(&mut self) -> Result<Bytes> {
        loop {
            if let Some(pos) = self.rbuf.windows(2).position(|w| w == b"\r\n") {
                let line = self.rbuf.split_to(pos).freeze();
                self.rbuf.advance(2);
                return Ok(line);
            }
            if self.rbuf.len() > MAX_PACKET {
                bail!("NATS line too long");
            }
            if !self.fill().await? {
                bail!("NATS server closed the connection");
            }
        }
    }

    async fn nats_await_pong(&mut self) -> Result<()> {
        loop {
            let line = self.next_nats_line().await?;
            match &line[..] {
                b"PONG" => return Ok(()),
                b"PING" => self.send_frame(Bytes::from_static(b"PONG\r\n")).await?,
                l if l.starts_with(b"-ERR") => bail!("NATS: {}", String::from_utf8_lossy(l)),
                _ => {}
            }
        }
    }

    /// The payload of the next MSG; None at end of stream. Cancel-safe (the rooms scenario
    /// reads in a `select!`): nothing is consumed from `rbuf` until a whole message is
    /// there, and a server PING is answered by the next [`Client::flush_acks`], not here.
    async fn next_nats_msg(&mut self) -> Result<Option<Bytes>> {
        loop {
            let Some(pos) = self.rbuf.windows(2).position(|w| w == b"\r\n") else {
                if self.rbuf.len() > MAX_PACKET {
                    bail!("NATS line too long");
                }
                if !self.fill().await? {
                    return Ok(None);
                }
                continue;
            };
            if self.rbuf.starts_with(b"MSG ") {
                // MSG <subject> <sid> [reply-to] <#bytes>
                let len: usize = std::str::from_utf8(&self.rbuf[..pos])
                    .ok()
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| anyhow!("bad NATS MSG line"))?;
                if len > MAX_PACKET {
                    bail!("NATS message too long");
                }
                if self.rbuf.len() < pos + 2 + len + 2 {
                    if !self.fill().await? {
                        return Ok(None);
                    }
                    continue;
                }
                self.rbuf.advance(pos + 2);
                let payload = self.rbuf.split_to(len).freeze();
                self.rbuf.advance(2);
                return Ok(Some(payload));
            }
            let line = self.rbuf.split_to(pos).freeze();
            self.rbuf.advance(2);
            match &line[..] {
                b"PING" => self.pending_pong = true,
                l if l.starts_with(b"-ERR") => bail!("NATS: {}", String::from_utf8_lossy(l)),
                _ => {}
            }
        }
    }
}

/// A NATS subscription id for `subject` (ids are single tokens; subjects hold dots).
fn nats_sid(subject: &str) -> String {
    subject.replace('.', "_")
}

fn mqtt_qos(level: u8) -> QoS {
    if level == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail.
    let _ = rmp::encode::write_str(out, s);
}

fn short(t: &Utf8Bytes) -> String {
    t.as_str().chars().take(120).collect()
}

/// The fields of a server frame the tool looks at: `type`, and `data` as a bin's byte range.
struct NoLagFrame<'a> {
    kind: &'a str,
    /// An `error` frame's `error` string.
    error: Option<&'a str>,
    data: Option<(usize, usize)>,
}

impl<'a> NoLagFrame<'a> {
    fn parse(frame: &'a [u8]) -> Result<Self> {
        let mut rd = frame;
        let len = rmp::decode::read_map_len(&mut rd).map_err(|e| anyhow!("frame: {e}"))?;
        let mut kind = "";
        let mut error = None;
        let mut data = None;
        for _ in 0..len {
            let (key, rest) =
                rmp::decode::read_str_from_slice(rd).map_err(|e| anyhow!("frame key: {e}"))?;
            rd = rest;
            let marker = rd
                .first()
                .copied()
                .ok_or_else(|| anyhow!("truncated frame"))?;
            match marker {
                0xc4..=0xc6 => {
                    let mut cur = rd;
                    let n = rmp::decode::read_bin_len(&mut cur).map_err(|e| anyhow!("bin: {e}"))?
                        as usize;
                    let start = frame.len() - cur.len();
                    let end = start + n;
                    if end > frame.len() {
                        bail!("truncated bin");
                    }
                    if key == "data" {
                        data = Some((start, end));
                    }
                    rd = &frame[end..];
                }
                0xa0..=0xbf | 0xd9..=0xdb => {
                    let (value, rest) =
                        rmp::decode::read_str_from_slice(rd).map_err(|e| anyhow!("str: {e}"))?;
                    match key {
                        "type" => kind = value,
                        "error" => error = Some(value),
                        _ => {}
                    }
                    rd = rest;
                }
                // Anything else (bool, ints, arrays) only appears after the fields we need in
                // the frames the tool reads; stop here.
                _ => break,
            }
        }
        Ok(NoLagFrame { kind, error, data })
    }
}

fn nolag_bool(frame: &[u8], key: &str) -> bool {
    // `{..., success: true, ...}`: find the key, then the marker after it.
    let needle = {
        let mut k = Vec::new();
        put_str(&mut k, key);
        k
    };
    frame
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .and_then(|p| frame.get(p + needle.len()))
        == Some(&0xc3)
}

fn describe_frame(frame: &[u8]) -> String {
    // Printable bytes only: enough to see `error` strings in a failure message.
    frame
        .iter()
        .map(|&b| if b.is_ascii_graphic() { b as char } else { ' ' })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// `type` and (for error frames) `error` of a cuttle frame; None for a heartbeat or a frame
/// the tool cannot read.
pub fn frame_kind(frame: &[u8]) -> Option<(String, Option<String>)> {
    let f = NoLagFrame::parse(frame).ok()?;
    (!f.kind.is_empty()).then(|| (f.kind.to_string(), f.error.map(str::to_string)))
}

/// Control frames of the NoLag protocol as raw bytes, for clients that drive a socket
/// themselves (the noisy-neighbour attackers): `subscribe` with sub-topic filters,
/// `setFilters`, `unsubscribe` (PROTOCOL §6).
pub mod nolag {
    use bytes::Bytes;

    use super::put_str;

    fn filters_field(frame: &mut Vec<u8>, filters: &[String]) {
        put_str(frame, "filters");
        let _ = rmp::encode::write_array_len(frame, filters.len() as u32);
        for f in filters {
            put_str(frame, f);
        }
    }

    pub fn subscribe(topic: &str, filters: &[String]) -> Bytes {
        let mut frame = Vec::with_capacity(64 + filters.len() * 16);
        let _ = rmp::encode::write_map_len(&mut frame, if filters.is_empty() { 3 } else { 4 });
        put_str(&mut frame, "type");
        put_str(&mut frame, "subscribe");
        put_str(&mut frame, "topic");
        put_str(&mut frame, topic);
        put_str(&mut frame, "qos");
        let _ = rmp::encode::write_uint(&mut frame, 0);
        if !filters.is_empty() {
            filters_field(&mut frame, filters);
        }
        frame.into()
    }

    pub fn set_filters(topic: &str, filters: &[String]) -> Bytes {
        let mut frame = Vec::with_capacity(64 + filters.len() * 16);
        let _ = rmp::encode::write_map_len(&mut frame, 3);
        put_str(&mut frame, "type");
        put_str(&mut frame, "setFilters");
        put_str(&mut frame, "topic");
        put_str(&mut frame, topic);
        filters_field(&mut frame, filters);
        frame.into()
    }

    pub fn unsubscribe(topic: &str) -> Bytes {
        let mut frame = Vec::with_capacity(64);
        let _ = rmp::encode::write_map_len(&mut frame, 2);
        put_str(&mut frame, "type");
        put_str(&mut frame, "unsubscribe");
        put_str(&mut frame, "topic");
        put_str(&mut frame, topic);
        frame.into()
    }
}

/// How long any single protocol step may take before the tool gives up on the client.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);
