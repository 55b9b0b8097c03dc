//! MQTT framing and the packets the pool writes, over rumqttc's codecs (`mqttbytes`) for
//! MQTT 5 and 3.1.1. PUBLISH — the one packet on the hot path — is encoded here directly into
//! the connection's write buffer: one copy of the payload, no intermediate packet value.

use bytes::{BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5;

/// The protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V5,
    V311,
}

impl Version {
    pub fn name(self) -> &'static str {
        match self {
            Version::V5 => "MQTT 5",
            Version::V311 => "MQTT 3.1.1",
        }
    }
}

/// A packet from the broker, in the terms the connection needs (both versions).
#[derive(Debug)]
pub enum Incoming {
    ConnAck(ConnAck),
    Publish {
        topic: Bytes,
        qos: QoS,
        pkid: u16,
        payload: Bytes,
        subscription_ids: Vec<usize>,
    },
    PubAck(u16),
    PubRec(u16),
    PubComp(u16),
    PubRel(u16),
    SubAck {
        pkid: u16,
        granted: bool,
    },
    UnsubAck(u16),
    PingResp,
    /// The broker's DISCONNECT (MQTT 5), with its reason.
    Disconnect(String),
    /// Anything a client never expects (CONNECT, SUBSCRIBE, …): ignored.
    Other,
}

/// What the broker's CONNACK said.
#[derive(Debug, Clone)]
pub struct ConnAck {
    /// `None`: accepted; else the refusal's reason.
    pub refused: Option<String>,
    /// The broker speaks MQTT 3.1.1 only (it answered an MQTT 5 CONNECT with a 3.1.1 refusal).
    pub wants_v311: bool,
    pub max_packet: Option<u32>,
    pub receive_max: Option<u16>,
    /// MQTT 5: the broker tags messages with subscription identifiers (absent means yes).
    pub subscription_ids: bool,
    pub server_keep_alive: Option<u16>,
}

/// Why the byte stream cannot be read on.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("malformed remaining length")]
    Length,
    #[error("malformed packet: {0}")]
    Packet(String),
}

/// The length of the frame at the start of `buf` (fixed header included), or `None` until
/// its fixed header is complete.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let mut len: usize = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some(2 + i + len));
        }
    }
    Err(FrameError::Length)
}

/// Decodes one whole frame (exactly `frame_len` bytes).
pub fn decode(version: Version, mut frame: BytesMut) -> Result<Incoming, FrameError> {
    let bad = |e: &dyn std::fmt::Display| FrameError::Packet(e.to_string());
    // A 3.1.1 CONNACK (remaining length 2) cannot be an MQTT 5 one (which has a properties
    // length): a 3.1.1-only broker answering an MQTT 5 CONNECT.
    if version == Version::V5 && frame.first() == Some(&0x20) && frame.get(1) == Some(&2) {
        return Ok(Incoming::ConnAck(ConnAck {
            refused: Some(format!(
                "MQTT 3.1.1 CONNACK, code {}",
                frame.get(3).copied().unwrap_or(0)
            )),
            wants_v311: true,
            max_packet: None,
            receive_max: None,
            subscription_ids: false,
            server_keep_alive: None,
        }));
    }
    Ok(match version {
        Version::V5 => match v5::Packet::read(&mut frame, None).map_err(|e| bad(&e))? {
            v5::Packet::ConnAck(a) => {
                let p = a.properties.as_ref();
                let refused = match a.code {
                    v5::ConnectReturnCode::Success => None,
                    code => Some(format!("{code:?}")),
                };
                Incoming::ConnAck(ConnAck {
                    wants_v311: matches!(
                        a.code,
                        v5::ConnectReturnCode::UnsupportedProtocolVersion
                            | v5::ConnectReturnCode::RefusedProtocolVersion
                    ),
                    refused,
                    max_packet: p.and_then(|p| p.max_packet_size),
                    receive_max: p.and_then(|p| p.receive_max),
                    subscription_ids: p
                        .and_then(|p| p.subscription_identifiers_available)
                        .is_none_or(|v| v != 0),
                    server_keep_alive: p.and_then(|p| p.server_keep_alive),
                })
            }
            v5::Packet::Publish(p) => Incoming::Publish {
                subscription_ids: p
                    .properties
                    .map(|props| props.subscription_identifiers)
                    .unwrap_or_default(),
                topic: p.topic,
                qos: p.qos,
                pkid: p.pkid,
                payload: p.payload,
            },
            v5::Packet::PubAck(a) => Incoming::PubAck(a.pkid),
            v5::Packet::PubRec(a) => Incoming::PubRec(a.pkid),
            v5::Packet::PubComp(a) => Incoming::PubComp(a.pkid),
            v5::Packet::PubRel(a) => Incoming::PubRel(a.pkid),
            v5::Packet::SubAck(a) => Incoming::SubAck {
                pkid: a.pkid,
                granted: a
                    .return_codes
                    .first()
                    .is_some_and(|c| matches!(c, v5::SubscribeReasonCode::Success(_))),
            },
            v5::Packet::UnsubAck(a) => Incoming::UnsubAck(a.pkid),
            v5::Packet::PingResp(_) => Incoming::PingResp,
            v5::Packet::Disconnect(d) => Incoming::Disconnect(format!("{:?}", d.reason_code)),
            _ => Incoming::Other,
        },
        Version::V311 => {
            let max = frame.len();
            match v4::Packet::read(&mut frame, max).map_err(|e| bad(&e))? {
                v4::Packet::ConnAck(a) => Incoming::ConnAck(ConnAck {
                    refused: match a.code {
                        v4::ConnectReturnCode::Success => None,
                        code => Some(format!("{code:?}")),
                    },
                    wants_v311: false,
                    max_packet: None,
                    receive_max: None,
                    subscription_ids: false,
                    server_keep_alive: None,
                }),
                v4::Packet::Publish(p) => Incoming::Publish {
                    topic: Bytes::from(p.topic),
                    qos: match p.qos {
                        rumqttc::QoS::AtMostOnce => QoS::AtMostOnce,
                        rumqttc::QoS::AtLeastOnce => QoS::AtLeastOnce,
                        rumqttc::QoS::ExactlyOnce => QoS::ExactlyOnce,
                    },
                    pkid: p.pkid,
                    payload: p.payload,
                    subscription_ids: Vec::new(),
                },
                v4::Packet::PubAck(a) => Incoming::PubAck(a.pkid),
                v4::Packet::PubRec(a) => Incoming::PubRec(a.pkid),
                v4::Packet::PubComp(a) => Incoming::PubComp(a.pkid),
                v4::Packet::PubRel(a) => Incoming::PubRel(a.pkid),
                v4::Packet::SubAck(a) => Incoming::SubAck {
                    pkid: a.pkid,
                    granted: a
                        .return_codes
                        .first()
                        .is_some_and(|c| matches!(c, v4::SubscribeReasonCode::Success(_))),
                },
                v4::Packet::UnsubAck(a) => Incoming::UnsubAck(a.pkid),
                v4::Packet::PingResp => Incoming::PingResp,
                v4::Packet::Disconnect => Incoming::Disconnect("DISCONNECT".into()),
                _ => Incoming::Other,
            }
        }
    })
}

/// What goes into a CONNECT.
pub struct ConnectOptions<'a> {
    pub client_id: &'a str,
    pub keep_alive_s: u16,
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
    /// (topic, payload), published QoS 1 by the broker if the connection dies uncleanly.
    pub will: Option<(&'a str, &'a Bytes)>,
    /// The largest packet this client accepts (MQTT 5 only).
    pub max_packet: u32,
}

/// Encodes a clean-start CONNECT.
pub fn connect(version: Version, o: &ConnectOptions<'_>, out: &mut BytesMut) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    match version {
        Version::V5 => {
            let connect = v5::Connect {
                keep_alive: o.keep_alive_s,
                client_id: o.client_id.to_string(),
                clean_start: true,
                properties: Some(v5::ConnectProperties {
                    max_packet_size: Some(o.max_packet),
                    ..v5::ConnectProperties::new()
                }),
            };
            let will = o.will.map(|(topic, payload)| {
                v5::LastWill::new(topic, payload.clone(), QoS::AtLeastOnce, false, None)
            });
            let login = o
                .username
                .map(|u| v5::Login::new(u, o.password.unwrap_or_default()));
            v5::Packet::Connect(connect, will, login)
                .write(out, None)
                .map_err(|e| err(&e))?;
        }
        Version::V311 => {
            let mut connect = v4::Connect::new(o.client_id);
            connect.keep_alive = o.keep_alive_s;
            connect.clean_session = true;
            connect.last_will = o.will.map(|(topic, payload)| v4::LastWill {
                topic: topic.to_string(),
                message: payload.clone(),
                qos: rumqttc::QoS::AtLeastOnce,
                retain: false,
            });
            connect.login = o
                .username
                .map(|u| v4::Login::new(u, o.password.unwrap_or_default()));
            v4::Packet::Connect(connect)
                .write(out, usize::MAX)
                .map_err(|e| err(&e))?;
        }
    }
    Ok(())
}

/// Bytes of a PUBLISH beyond topic and payload, at most: fixed header (1 + up to 4 length
/// bytes), topic length (2), packet id (2), properties length (1, MQTT 5).
pub const PUBLISH_OVERHEAD: usize = 10;

/// Encodes a PUBLISH (`pkid` 0 for QoS 0).
pub fn publish(
    version: Version,
    topic: &[u8],
    qos: QoS,
    retain: bool,
    pkid: u16,
    payload: &[u8],
    out: &mut BytesMut,
) {
    let qos_bits = match qos {
        QoS::AtMostOnce => 0u8,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    };
    let props = usize::from(version == Version::V5);
    let id = if qos_bits > 0 { 2 } else { 0 };
    let remaining = 2 + topic.len() + id + props + payload.len();
    out.reserve(5 + remaining);
    out.put_u8(0x30 | (qos_bits << 1) | u8::from(retain));
    put_remaining_length(remaining, out);
    // Topics are checked against the broker's maximum packet size before they get here, and
    // publish topics are far shorter than 64 KiB (limits.max_topic_bytes).
    out.put_u16(u16::try_from(topic.len()).unwrap_or(u16::MAX));
    out.put_slice(topic);
    if qos_bits > 0 {
        out.put_u16(pkid);
    }
    if props == 1 {
        out.put_u8(0);
    }
    out.put_slice(payload);
}

fn put_remaining_length(mut len: usize, out: &mut BytesMut) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if len == 0 {
            return;
        }
    }
}

/// Encodes a SUBSCRIBE of one filter; with `id` (MQTT 5) the broker tags every message it
/// delivers through it.
pub fn subscribe(
    version: Version,
    pkid: u16,
    filter: &str,
    qos: QoS,
    id: Option<usize>,
    out: &mut BytesMut,
) {
    match version {
        Version::V5 => {
            let mut s = v5::Subscribe::new(
                v5::Filter::new(filter, qos),
                id.map(|id| v5::SubscribeProperties {
                    id: Some(id),
                    user_properties: Vec::new(),
                }),
            );
            s.pkid = pkid;
            let _ = v5::Packet::Subscribe(s).write(out, None);
        }
        Version::V311 => {
            let qos = match qos {
                QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
                _ => rumqttc::QoS::AtLeastOnce,
            };
            let mut s = v4::Subscribe::new(filter, qos);
            s.pkid = pkid;
            let _ = v4::Packet::Subscribe(s).write(out, usize::MAX);
        }
    }
}

pub fn unsubscribe(version: Version, pkid: u16, filter: &str, out: &mut BytesMut) {
    match version {
        Version::V5 => {
            let mut u = v5::Unsubscribe::new(filter, None);
            u.pkid = pkid;
            let _ = v5::Packet::Unsubscribe(u).write(out, None);
        }
        Version::V311 => {
            let mut u = v4::Unsubscribe::new(filter);
            u.pkid = pkid;
            let _ = v4::Packet::Unsubscribe(u).write(out, usize::MAX);
        }
    }
}

/// PUBACK (both versions: MQTT 5 allows omitting the reason code on success).
pub fn puback(pkid: u16, out: &mut BytesMut) {
    out.put_slice(&[0x40, 2]);
    out.put_u16(pkid);
}

/// PUBREC for an incoming QoS 2 message (both versions, success).
pub fn pubrec(pkid: u16, out: &mut BytesMut) {
    out.put_slice(&[0x50, 2]);
    out.put_u16(pkid);
}

/// PUBCOMP answering a PUBREL (both versions, success).
pub fn pubcomp(pkid: u16, out: &mut BytesMut) {
    out.put_slice(&[0x70, 2]);
    out.put_u16(pkid);
}

pub fn pingreq(out: &mut BytesMut) {
    out.put_slice(&[0xc0, 0]);
}

/// DISCONNECT, normal (both versions: MQTT 5 reads a missing reason code as "normal").
pub fn disconnect(out: &mut BytesMut) {
    out.put_slice(&[0xe0, 0]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-encoded PUBLISH decodes with rumqttc's codec to what was put in.
    #[test]
    fn publish_round_trips_through_rumqttc() {
        for version in [Version::V5, Version::V311] {
            for (qos, pkid) in [(QoS::AtMostOnce, 0), (QoS::AtLeastOnce, 7)] {
                for size in [0usize, 1, 127, 128, 16_383, 16_384, 300_000] {
                    let payload = vec![0xa5u8; size];
                    let mut out = BytesMut::new();
                    publish(version, b"a/b/c", qos, true, pkid, &payload, &mut out);
                    assert_eq!(frame_len(&out).unwrap(), Some(out.len()));
                    assert!(out.len() <= 5 + 2 + 5 + 2 + 1 + size);
                    match decode(version, out).unwrap() {
                        Incoming::Publish {
                            topic,
                            qos: q,
                            pkid: id,
                            payload: p,
                            ..
                        } => {
                            assert_eq!(&topic[..], b"a/b/c");
                            assert_eq!(q, qos);
                            assert_eq!(id, pkid);
                            assert_eq!(p.len(), size);
                        }
                        other => panic!("{other:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn frame_length_needs_the_whole_fixed_header() {
        assert_eq!(frame_len(&[0x30]).unwrap(), None);
        assert_eq!(frame_len(&[0x30, 0x80]).unwrap(), None);
        assert_eq!(frame_len(&[0x30, 0x80, 0x01]).unwrap(), Some(3 + 128));
        assert!(frame_len(&[0x30, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn a_311_connack_to_an_mqtt5_connect_asks_for_311() {
        let frame = BytesMut::from(&[0x20u8, 2, 0, 1][..]);
        match decode(Version::V5, frame).unwrap() {
            Incoming::ConnAck(a) => assert!(a.wants_v311 && a.refused.is_some()),
            other => panic!("{other:?}"),
        }
    }
}
