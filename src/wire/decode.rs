//! Client → server frames (PROTOCOL §4, §6): one MessagePack map with a `type` key per binary
//! WebSocket message, decoded without copying.
//!
//! Rules from the protocol, applied here so that the session sees only meaning:
//! - an empty binary message is a heartbeat;
//! - unknown keys are ignored; a frame of unknown type, or lacking a required key, is
//!   [`ClientFrame::Ignored`] (the SDK relies on silence there);
//! - numeric fields accept any int width or float; `echo` is false only when literally
//!   `false`; `reconnect` is true only when literally `true`;
//! - `data` is kept as the exact bytes the client sent, whatever MessagePack type it is.
//!
//! What is not a frame at all (invalid MessagePack, not a map, trailing bytes, a required
//! field of the wrong type) is a [`FrameError`], answered with an error frame.

use super::msgpack::{MsgpackError, Reader};
use crate::secret::Secret;
use crate::topic::filters::FilterItem;

use crate::topic::filters::MAX_FILTERS;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid MessagePack: {0}")]
    Msgpack(#[from] MsgpackError),
    #[error("a frame must be a MessagePack map")]
    NotAMap,
    #[error("a frame must be exactly one MessagePack value")]
    TrailingBytes,
    #[error("frame keys must be strings")]
    KeyNotString,
    #[error("field '{0}' has the wrong type")]
    WrongType(&'static str),
    /// Checked while decoding so that a huge array is never materialised.
    #[error("too_many_filters (max 100)")]
    TooManyFilters,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuthFrame<'a> {
    /// `None` when the frame has no string `token` (PROTOCOL §4: treated as unauthenticated).
    /// A credential: printed as `<redacted>`.
    pub token: Option<Secret<&'a str>>,
    pub reconnect: bool,
    /// As sent; negotiation is the session's (missing, invalid or < 1 means 1).
    pub protocol_version: u32,
    pub project_id: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PublishFrame<'a> {
    pub topic: &'a str,
    /// The exact MessagePack bytes of `data`.
    pub data: &'a [u8],
    pub qos: u8,
    pub echo: bool,
    pub retain: bool,
    pub filter: Option<&'a str>,
    pub filters: Vec<String>,
    pub msg_ref: Option<&'a str>,
}

/// A `subscribe` frame. Its `qos` is accepted and not kept: every broker subscription is QoS 0
/// (`upstream::connection::SUBSCRIPTION_QOS`, README "Deviations").
#[derive(Debug, Clone, PartialEq)]
pub struct SubscribeFrame<'a> {
    pub topic: &'a str,
    pub load_balance: bool,
    pub load_balance_group: Option<&'a str>,
    pub filters: Vec<FilterItem>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame<'a> {
    Heartbeat,
    Auth(AuthFrame<'a>),
    Publish(PublishFrame<'a>),
    Subscribe(SubscribeFrame<'a>),
    Unsubscribe {
        topic: &'a str,
    },
    SetFilters {
        topic: &'a str,
        filters: Vec<FilterItem>,
    },
    Presence {
        room_id: Option<&'a str>,
        data: &'a [u8],
    },
    GetPresence {
        room_id: Option<&'a str>,
    },
    LobbySubscribe {
        lobby_id: &'a str,
    },
    LobbyUnsubscribe {
        lobby_id: &'a str,
    },
    GetLobbyPresence {
        lobby_id: &'a str,
    },
    Ack,
    BatchAck,
    /// Unknown type, or a required key missing: ignored silently (PROTOCOL §6).
    Ignored,
}

impl ClientFrame<'_> {
    /// The frame's `type`, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Heartbeat => "heartbeat",
            ClientFrame::Auth(_) => "auth",
            ClientFrame::Publish(_) => "publish",
            ClientFrame::Subscribe(_) => "subscribe",
            ClientFrame::Unsubscribe { .. } => "unsubscribe",
            ClientFrame::SetFilters { .. } => "setFilters",
            ClientFrame::Presence { .. } => "presence",
            ClientFrame::GetPresence { .. } => "getPresence",
            ClientFrame::LobbySubscribe { .. } => "lobbySubscribe",
            ClientFrame::LobbyUnsubscribe { .. } => "lobbyUnsubscribe",
            ClientFrame::GetLobbyPresence { .. } => "getLobbyPresence",
            ClientFrame::Ack => "ack",
            ClientFrame::BatchAck => "batchAck",
            ClientFrame::Ignored => "ignored",
        }
    }
}

/// The raw values of the keys the protocol knows, found in one pass over the map.
#[derive(Default)]
struct Fields<'a> {
    kind: Option<&'a [u8]>,
    token: Option<&'a [u8]>,
    reconnect: Option<&'a [u8]>,
    protocol_version: Option<&'a [u8]>,
    project_id: Option<&'a [u8]>,
    topic: Option<&'a [u8]>,
    data: Option<&'a [u8]>,
    qos: Option<&'a [u8]>,
    echo: Option<&'a [u8]>,
    retain: Option<&'a [u8]>,
    filter: Option<&'a [u8]>,
    filters: Option<&'a [u8]>,
    msg_ref: Option<&'a [u8]>,
    load_balance: Option<&'a [u8]>,
    load_balance_group: Option<&'a [u8]>,
    room_id: Option<&'a [u8]>,
    lobby_id: Option<&'a [u8]>,
    msg_id: Option<&'a [u8]>,
    msg_ids: Option<&'a [u8]>,
}

impl<'a> Fields<'a> {
    fn slot(&mut self, key: &str) -> Option<&mut Option<&'a [u8]>> {
        Some(match key {
            "type" => &mut self.kind,
            "token" => &mut self.token,
            "reconnect" => &mut self.reconnect,
            "protocolVersion" => &mut self.protocol_version,
            "projectId" => &mut self.project_id,
            "topic" => &mut self.topic,
            "data" => &mut self.data,
            "qos" => &mut self.qos,
            "echo" => &mut self.echo,
            "retain" => &mut self.retain,
            "filter" => &mut self.filter,
            "filters" => &mut self.filters,
            "msgRef" => &mut self.msg_ref,
            "loadBalance" => &mut self.load_balance,
            "loadBalanceGroup" => &mut self.load_balance_group,
            "roomId" => &mut self.room_id,
            "lobbyId" => &mut self.lobby_id,
            "msgId" => &mut self.msg_id,
            "msgIds" => &mut self.msg_ids,
            _ => return None,
        })
    }
}

fn as_str(raw: Option<&[u8]>) -> Option<&str> {
    Reader::new(raw?).str().ok()
}

/// A required string field: `Ok(None)` when absent (the frame is ignored), an error when
/// present with another type.
fn required_str<'a>(
    raw: Option<&'a [u8]>,
    name: &'static str,
) -> Result<Option<&'a str>, FrameError> {
    match raw {
        None => Ok(None),
        Some(raw) => Reader::new(raw)
            .str()
            .map(Some)
            .map_err(|_| FrameError::WrongType(name)),
    }
}

/// `qos`: 0, 1 or 2 in any numeric form; anything else means 1 (PROTOCOL §6).
fn qos(raw: Option<&[u8]>) -> u8 {
    let q = raw.and_then(|r| Reader::new(r).number().ok());
    if q == Some(0.0) {
        0
    } else if q == Some(2.0) {
        2
    } else {
        1
    }
}

fn literal_bool(raw: Option<&[u8]>) -> Option<bool> {
    Reader::new(raw?).bool().ok()
}

/// `filters` of a publish: an array of strings.
fn string_array(raw: &[u8], name: &'static str) -> Result<Vec<String>, FrameError> {
    let mut r = Reader::new(raw);
    let n = r.array_len().map_err(|_| FrameError::WrongType(name))?;
    if n > MAX_FILTERS {
        return Err(FrameError::TooManyFilters);
    }
    (0..n)
        .map(|_| {
            r.str()
                .map(str::to_owned)
                .map_err(|_| FrameError::WrongType(name))
        })
        .collect()
}

/// `filters` of a subscribe or setFilters: strings and arrays of strings.
pub(crate) fn filter_items(raw: &[u8]) -> Result<Vec<FilterItem>, FrameError> {
    let wrong = |_| FrameError::WrongType("filters");
    let mut r = Reader::new(raw);
    let n = r.array_len().map_err(wrong)?;
    if n > MAX_FILTERS {
        return Err(FrameError::TooManyFilters);
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        if matches!(r.peek_marker(), Ok(m) if is_array(m)) {
            let m = r.array_len().map_err(wrong)?;
            if m > MAX_FILTERS {
                return Err(FrameError::TooManyFilters);
            }
            let group = (0..m)
                .map(|_| r.str().map(str::to_owned).map_err(wrong))
                .collect::<Result<_, _>>()?;
            out.push(FilterItem::All(group));
        } else {
            out.push(FilterItem::One(r.str().map_err(wrong)?.to_owned()));
        }
    }
    Ok(out)
}

fn is_array(m: rmp::Marker) -> bool {
    matches!(
        m,
        rmp::Marker::FixArray(_) | rmp::Marker::Array16 | rmp::Marker::Array32
    )
}

/// Decodes one binary WebSocket message.
pub fn decode(buf: &[u8]) -> Result<ClientFrame<'_>, FrameError> {
    if buf.is_empty() {
        return Ok(ClientFrame::Heartbeat);
    }
    let mut r = Reader::new(buf);
    let n = match r.map_len() {
        Ok(n) => n,
        Err(MsgpackError::Type) => {
            // Valid MessagePack of another type is "not a map"; garbage is garbage.
            Reader::new(buf).value_bytes()?;
            return Err(FrameError::NotAMap);
        }
        Err(e) => return Err(e.into()),
    };
    let mut f = Fields::default();
    for _ in 0..n {
        let key = match r.str() {
            Ok(k) => k,
            Err(MsgpackError::Type) => return Err(FrameError::KeyNotString),
            Err(e) => return Err(e.into()),
        };
        let value = r.value_bytes()?;
        if let Some(slot) = f.slot(key) {
            *slot = Some(value);
        }
    }
    if !r.is_empty() {
        return Err(FrameError::TrailingBytes);
    }
    let Some(kind) = as_str(f.kind) else {
        return Ok(ClientFrame::Ignored);
    };
    Ok(match kind {
        "auth" => ClientFrame::Auth(AuthFrame {
            token: as_str(f.token).map(Secret::new),
            reconnect: literal_bool(f.reconnect) == Some(true),
            protocol_version: match f.protocol_version.map(|r| Reader::new(r).number()) {
                Some(Ok(v)) if v >= 1.0 && v.is_finite() => v.min(u32::MAX as f64) as u32,
                _ => 1,
            },
            project_id: as_str(f.project_id),
        }),
        "publish" => {
            let (Some(topic), Some(data)) = (required_str(f.topic, "topic")?, f.data) else {
                return Ok(ClientFrame::Ignored);
            };
            ClientFrame::Publish(PublishFrame {
                topic,
                data,
                qos: qos(f.qos),
                echo: literal_bool(f.echo) != Some(false),
                retain: literal_bool(f.retain) == Some(true),
                filter: as_str(f.filter),
                filters: match f.filters {
                    Some(raw) if !Reader::new(raw).next_is_nil() => string_array(raw, "filters")?,
                    _ => Vec::new(),
                },
                msg_ref: as_str(f.msg_ref).filter(|s| !s.is_empty()),
            })
        }
        "subscribe" => {
            let Some(topic) = required_str(f.topic, "topic")? else {
                return Ok(ClientFrame::Ignored);
            };
            ClientFrame::Subscribe(SubscribeFrame {
                topic,
                load_balance: literal_bool(f.load_balance) == Some(true),
                load_balance_group: as_str(f.load_balance_group),
                filters: match f.filters {
                    Some(raw) if !Reader::new(raw).next_is_nil() => filter_items(raw)?,
                    _ => Vec::new(),
                },
            })
        }
        "unsubscribe" => match required_str(f.topic, "topic")? {
            Some(topic) => ClientFrame::Unsubscribe { topic },
            None => ClientFrame::Ignored,
        },
        "setFilters" => match (required_str(f.topic, "topic")?, f.filters) {
            (Some(topic), Some(raw)) => ClientFrame::SetFilters {
                topic,
                filters: filter_items(raw)?,
            },
            _ => ClientFrame::Ignored,
        },
        "presence" => match f.data {
            Some(data) => ClientFrame::Presence {
                room_id: as_str(f.room_id),
                data,
            },
            None => ClientFrame::Ignored,
        },
        "getPresence" => ClientFrame::GetPresence {
            room_id: as_str(f.room_id),
        },
        "lobbySubscribe" | "lobbyUnsubscribe" | "getLobbyPresence" => {
            let Some(lobby_id) = required_str(f.lobby_id, "lobbyId")? else {
                return Ok(ClientFrame::Ignored);
            };
            match kind {
                "lobbySubscribe" => ClientFrame::LobbySubscribe { lobby_id },
                "lobbyUnsubscribe" => ClientFrame::LobbyUnsubscribe { lobby_id },
                _ => ClientFrame::GetLobbyPresence { lobby_id },
            }
        }
        "ack" if f.msg_id.is_some() => ClientFrame::Ack,
        "batchAck" if f.msg_ids.is_some() => ClientFrame::BatchAck,
        _ => ClientFrame::Ignored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::encode::MapWriter;

    type ValueWriter<'a> = &'a dyn Fn(&mut Vec<u8>);

    fn frame(pairs: &[(&str, ValueWriter<'_>)]) -> Vec<u8> {
        let mut out = Vec::new();
        rmp::encode::write_map_len(&mut out, pairs.len() as u32).unwrap();
        for (k, v) in pairs {
            rmp::encode::write_str(&mut out, k).unwrap();
            v(&mut out);
        }
        out
    }

    fn s(v: &'static str) -> impl Fn(&mut Vec<u8>) {
        move |o: &mut Vec<u8>| rmp::encode::write_str(o, v).unwrap()
    }

    #[test]
    fn heartbeat_and_auth() {
        assert_eq!(decode(&[]), Ok(ClientFrame::Heartbeat));
        let f = frame(&[("type", &s("auth")), ("token", &s("t"))]);
        assert_eq!(
            decode(&f),
            Ok(ClientFrame::Auth(AuthFrame {
                token: Some(Secret::new("t")),
                reconnect: false,
                protocol_version: 1,
                project_id: None
            }))
        );
        let f = frame(&[
            ("type", &s("auth")),
            ("token", &|o| {
                rmp::encode::write_uint(o, 5).map(|_| ()).unwrap()
            }),
            ("reconnect", &|o| rmp::encode::write_bool(o, true).unwrap()),
            ("protocolVersion", &|o| {
                rmp::encode::write_f64(o, 2.0).unwrap()
            }),
        ]);
        let ClientFrame::Auth(a) = decode(&f).unwrap() else {
            panic!()
        };
        assert_eq!((a.token, a.reconnect, a.protocol_version), (None, true, 2));
    }

    #[test]
    fn the_auth_token_is_never_printed() {
        let f = frame(&[("type", &s("auth")), ("token", &s("tok-do-not-log-me"))]);
        let decoded = decode(&f);
        let printed = format!("{decoded:?} {decoded:#?}");
        assert!(!printed.contains("tok-do-not-log-me"), "{printed}");
        let Ok(ClientFrame::Auth(a)) = decoded else {
            panic!("{printed}")
        };
        assert_eq!(a.token.map(|t| *t.expose()), Some("tok-do-not-log-me"));
    }

    #[test]
    fn publish_keeps_data_bytes_and_applies_defaults() {
        let mut bin = Vec::new();
        rmp::encode::write_bin(&mut bin, &[0, 159, 146, 150]).unwrap();
        let data = bin.clone();
        let f = frame(&[
            ("type", &s("publish")),
            ("topic", &s("chat/general/messages")),
            ("data", &move |o: &mut Vec<u8>| o.extend_from_slice(&data)),
            ("qos", &|o| rmp::encode::write_u16(o, 0).unwrap()),
            ("echo", &|o| rmp::encode::write_nil(o).unwrap()),
            ("unknownKey", &|o| {
                rmp::encode::write_array_len(o, 0).map(|_| ()).unwrap()
            }),
        ]);
        let ClientFrame::Publish(p) = decode(&f).unwrap() else {
            panic!()
        };
        assert_eq!(p.data, &bin[..]);
        assert_eq!((p.qos, p.echo, p.retain), (0, true, false));
        assert!(p.filters.is_empty() && p.filter.is_none() && p.msg_ref.is_none());
    }

    #[test]
    fn missing_required_keys_are_ignored_and_wrong_types_are_errors() {
        let f = frame(&[("type", &s("publish")), ("topic", &s("a/b/c"))]);
        assert_eq!(decode(&f), Ok(ClientFrame::Ignored));
        let f = frame(&[("type", &s("nope"))]);
        assert_eq!(decode(&f), Ok(ClientFrame::Ignored));
        let f = frame(&[("topic", &s("a/b/c"))]);
        assert_eq!(decode(&f), Ok(ClientFrame::Ignored));
        let f = frame(&[
            ("type", &s("subscribe")),
            ("topic", &|o| {
                rmp::encode::write_uint(o, 1).map(|_| ()).unwrap()
            }),
        ]);
        assert_eq!(decode(&f), Err(FrameError::WrongType("topic")));
        let f = frame(&[
            ("type", &s("subscribe")),
            ("topic", &s("a/b/c")),
            ("filters", &s("notalist")),
        ]);
        assert_eq!(decode(&f), Err(FrameError::WrongType("filters")));
    }

    #[test]
    fn subscribe_filters_and_groups() {
        let f = frame(&[
            ("type", &s("subscribe")),
            ("topic", &s("a/b/c")),
            ("loadBalance", &|o| {
                rmp::encode::write_bool(o, true).unwrap()
            }),
            ("loadBalanceGroup", &s("g")),
            ("filters", &|o| {
                rmp::encode::write_array_len(o, 2).unwrap();
                rmp::encode::write_str(o, "x").unwrap();
                rmp::encode::write_array_len(o, 2).unwrap();
                rmp::encode::write_str(o, "y").unwrap();
                rmp::encode::write_str(o, "z").unwrap();
            }),
        ]);
        let ClientFrame::Subscribe(sf) = decode(&f).unwrap() else {
            panic!()
        };
        assert!(sf.load_balance);
        assert_eq!(sf.load_balance_group, Some("g"));
        assert_eq!(
            sf.filters,
            vec![
                FilterItem::One("x".into()),
                FilterItem::All(vec!["y".into(), "z".into()])
            ]
        );
    }

    #[test]
    fn not_frames() {
        assert!(matches!(decode(&[0xc1]), Err(FrameError::Msgpack(_))));
        assert_eq!(decode(&[0x93, 1, 2, 3]), Err(FrameError::NotAMap));
        assert_eq!(decode(&[0x80, 0xc0]), Err(FrameError::TrailingBytes));
        assert_eq!(decode(&[0x81, 0x01, 0x01]), Err(FrameError::KeyNotString));
        assert!(decode(&[0x81]).is_err());
        // Our own encoder's output decodes.
        let mut w = MapWriter::new(2);
        w.str("type", "unsubscribe");
        w.str("topic", "a/b/c");
        assert_eq!(
            decode(&w.finish()),
            Ok(ClientFrame::Unsubscribe { topic: "a/b/c" })
        );
    }
}
