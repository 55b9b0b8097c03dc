//! Server → client frames (PROTOCOL §4, §7, §8): str keys, str text, exactly one value per
//! binary message.
//!
//! Frames are built into `Bytes` once; a fan-out hands the same `Bytes` (a reference count,
//! not a copy) to every subscriber that receives an identical frame.

use bytes::Bytes;

/// Builds one MessagePack map. The entry count is declared up front (MessagePack needs it),
/// and checked in debug builds.
pub struct MapWriter {
    buf: Vec<u8>,
    declared: u32,
    written: u32,
}

impl MapWriter {
    pub fn new(entries: u32) -> Self {
        Self::with_capacity(entries, 64)
    }

    pub fn with_capacity(entries: u32, capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity);
        // Writing into a Vec cannot fail.
        let _ = rmp::encode::write_map_len(&mut buf, entries);
        Self {
            buf,
            declared: entries,
            written: 0,
        }
    }

    fn key(&mut self, key: &str) {
        self.written += 1;
        let _ = rmp::encode::write_str(&mut self.buf, key);
    }

    pub fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        let _ = rmp::encode::write_str(&mut self.buf, value);
    }

    pub fn uint(&mut self, key: &str, value: u64) {
        self.key(key);
        let _ = rmp::encode::write_uint(&mut self.buf, value);
    }

    pub fn bool(&mut self, key: &str, value: bool) {
        self.key(key);
        let _ = rmp::encode::write_bool(&mut self.buf, value);
    }

    pub fn nil(&mut self, key: &str) {
        self.key(key);
        let _ = rmp::encode::write_nil(&mut self.buf);
    }

    /// A value that is already MessagePack (a client's `data`, passed through byte-exact).
    pub fn raw(&mut self, key: &str, msgpack: &[u8]) {
        self.key(key);
        self.buf.extend_from_slice(msgpack);
    }

    /// An array of strings.
    pub fn str_array<S: AsRef<str>>(&mut self, key: &str, values: &[S]) {
        self.key(key);
        let _ = rmp::encode::write_array_len(&mut self.buf, values.len() as u32);
        for v in values {
            let _ = rmp::encode::write_str(&mut self.buf, v.as_ref());
        }
    }

    pub fn finish(self) -> Bytes {
        debug_assert_eq!(self.written, self.declared, "map entry count");
        Bytes::from(self.buf)
    }
}

/// Writes a `filters` array (strings and AND groups), as clients send it.
pub fn write_filter_items(out: &mut Vec<u8>, items: &[crate::topic::filters::FilterItem]) {
    use crate::topic::filters::FilterItem;
    let _ = rmp::encode::write_array_len(out, items.len() as u32);
    for item in items {
        match item {
            FilterItem::One(s) => {
                let _ = rmp::encode::write_str(out, s);
            }
            FilterItem::All(group) => {
                let _ = rmp::encode::write_array_len(out, group.len() as u32);
                for s in group {
                    let _ = rmp::encode::write_str(out, s);
                }
            }
        }
    }
}

/// The empty binary frame: a heartbeat reply.
pub fn heartbeat() -> Bytes {
    Bytes::new()
}

/// `{type:"auth", success:true, …}` (PROTOCOL §4). `restored` is a list of already encoded
/// MessagePack values.
pub fn auth_ok(
    actor_token_id: &str,
    project_id: &str,
    actor_type: &str,
    protocol_version: u32,
    restored: &[Bytes],
) -> Bytes {
    let mut w = MapWriter::with_capacity(7, 128 + restored.iter().map(Bytes::len).sum::<usize>());
    w.str("type", "auth");
    w.bool("success", true);
    w.str("actorTokenId", actor_token_id);
    w.str("projectId", project_id);
    w.str("actorType", actor_type);
    w.uint("protocolVersion", u64::from(protocol_version));
    w.key("restoredSubscriptions");
    let _ = rmp::encode::write_array_len(&mut w.buf, restored.len() as u32);
    for r in restored {
        w.buf.extend_from_slice(r);
    }
    w.finish()
}

/// `{type:"auth", success:false, error}`.
pub fn auth_failed(error: &str) -> Bytes {
    let mut w = MapWriter::new(3);
    w.str("type", "auth");
    w.bool("success", false);
    w.str("error", error);
    w.finish()
}

/// An `error` frame (PROTOCOL §8) with its optional fields.
#[derive(Debug, Default, Clone)]
pub struct ErrorFrame<'a> {
    pub error: &'a str,
    pub code: Option<u32>,
    pub topic: Option<&'a str>,
    pub hint: Option<&'a str>,
    pub msg_ref: Option<&'a str>,
    pub max_size_bytes: Option<u64>,
    pub lobby_id: Option<&'a str>,
}

impl ErrorFrame<'_> {
    pub fn encode(&self) -> Bytes {
        let n = 2
            + u32::from(self.code.is_some())
            + u32::from(self.topic.is_some())
            + u32::from(self.hint.is_some())
            + u32::from(self.msg_ref.is_some())
            + u32::from(self.max_size_bytes.is_some())
            + u32::from(self.lobby_id.is_some());
        let mut w = MapWriter::new(n);
        w.str("type", "error");
        w.str("error", self.error);
        if let Some(c) = self.code {
            w.uint("code", u64::from(c));
        }
        if let Some(t) = self.topic {
            w.str("topic", t);
        }
        if let Some(h) = self.hint {
            w.str("hint", h);
        }
        if let Some(m) = self.msg_ref {
            w.str("msgRef", m);
        }
        if let Some(m) = self.max_size_bytes {
            w.uint("maxSizeBytes", m);
        }
        if let Some(l) = self.lobby_id {
            w.str("lobbyId", l);
        }
        w.finish()
    }
}

/// The error frames the proxy sends (PROTOCOL §8), one constructor per condition, so the
/// strings and codes the SDK matches on live in one place.
pub mod errors {
    use bytes::Bytes;

    use super::ErrorFrame;

    /// A bare `{type:"error", error}`.
    pub fn plain(error: &str) -> Bytes {
        ErrorFrame {
            error,
            ..Default::default()
        }
        .encode()
    }

    pub fn not_authenticated() -> Bytes {
        plain("not_authenticated")
    }

    /// A frame that is not a MessagePack map of a known shape.
    pub fn invalid_frame(hint: &str) -> Bytes {
        ErrorFrame {
            error: "invalid_frame",
            hint: Some(hint),
            ..Default::default()
        }
        .encode()
    }

    /// 42910: a publish over the per-socket rate.
    pub fn rate_limited(topic: &str, msg_ref: Option<&str>) -> Bytes {
        ErrorFrame {
            error: "rate_limit_exceeded",
            code: Some(42910),
            topic: Some(topic),
            msg_ref,
            ..Default::default()
        }
        .encode()
    }

    /// A `subscribe`, `unsubscribe` or `setFilters` over `limits.control_per_second`. The
    /// SDK matches `/rate_limit/`; the hint names the limit.
    pub fn control_rate_limited(topic: &str) -> Bytes {
        ErrorFrame {
            error: "rate_limit_exceeded",
            code: Some(42910),
            topic: Some(topic),
            hint: Some("limits.control_per_second"),
            ..Default::default()
        }
        .encode()
    }

    /// A `presence`, `getPresence` or lobby frame over `presence.frames_per_second`.
    pub fn presence_rate_limited() -> Bytes {
        ErrorFrame {
            error: "rate_limit_exceeded",
            code: Some(42910),
            hint: Some("presence.frames_per_second"),
            ..Default::default()
        }
        .encode()
    }

    /// A `presence` frame whose `data` is over `presence.max_data_bytes`.
    pub fn presence_too_large(max: usize) -> Bytes {
        ErrorFrame {
            error: "message_too_large",
            code: Some(42930),
            hint: Some("presence.max_data_bytes"),
            max_size_bytes: Some(max as u64),
            ..Default::default()
        }
        .encode()
    }

    /// A `presence` frame the replica cannot take (the room is full, the state bound is
    /// reached); the hint says which.
    pub fn presence_refused(hint: &str) -> Bytes {
        ErrorFrame {
            error: "presence_unavailable",
            hint: Some(hint),
            ..Default::default()
        }
        .encode()
    }

    /// A lobby the actor may not follow (unknown, or none of its rooms accessible): the
    /// SDK's `lobby.subscribe()` then times out (PROTOCOL §12).
    pub fn lobby_denied(lobby: &str, hint: &str) -> Bytes {
        ErrorFrame {
            error: "not_authorized",
            hint: Some(hint),
            lobby_id: Some(lobby),
            ..Default::default()
        }
        .encode()
    }

    /// A `subscribe` or `setFilters` that would join more new upstream filters than
    /// `limits.filters_per_second` has left; the hint names the limit.
    pub fn filters_rate_limited(topic: &str) -> Bytes {
        ErrorFrame {
            error: "rate_limit_exceeded",
            code: Some(42910),
            topic: Some(topic),
            hint: Some("limits.filters_per_second"),
            ..Default::default()
        }
        .encode()
    }

    /// 42930: `data` over the limit (or over what the broker accepts).
    pub fn message_too_large(topic: &str, msg_ref: Option<&str>, max: usize) -> Bytes {
        ErrorFrame {
            error: "message_too_large",
            code: Some(42930),
            topic: Some(topic),
            msg_ref,
            max_size_bytes: Some(max as u64),
            ..Default::default()
        }
        .encode()
    }

    pub fn invalid_topic(topic: &str, hint: &str, msg_ref: Option<&str>) -> Bytes {
        ErrorFrame {
            error: "invalid_topic",
            topic: Some(topic),
            hint: Some(hint),
            msg_ref,
            ..Default::default()
        }
        .encode()
    }

    /// A filter or group error; `error` is the filter error's own text (PROTOCOL §8).
    pub fn filter_error(error: &str, topic: &str, msg_ref: Option<&str>) -> Bytes {
        ErrorFrame {
            error,
            topic: Some(topic),
            msg_ref,
            ..Default::default()
        }
        .encode()
    }

    /// A denied subscribe or publish: `not_authorized` for v1, 42940 with a hint for v2.
    pub fn denied(version: u32, topic: &str, hint: &str, msg_ref: Option<&str>) -> Bytes {
        use crate::policy::authorize::{DENIAL_CODE_V2, DENIAL_ERROR_V1, DENIAL_ERROR_V2};
        if version >= 2 {
            ErrorFrame {
                error: DENIAL_ERROR_V2,
                code: Some(DENIAL_CODE_V2),
                topic: Some(topic),
                hint: Some(hint),
                msg_ref,
                ..Default::default()
            }
            .encode()
        } else {
            ErrorFrame {
                error: DENIAL_ERROR_V1,
                topic: Some(topic),
                msg_ref,
                ..Default::default()
            }
            .encode()
        }
    }

    pub fn not_subscribed(topic: &str) -> Bytes {
        ErrorFrame {
            error: "not_subscribed",
            topic: Some(topic),
            ..Default::default()
        }
        .encode()
    }

    /// A subscription over one of the connection's or replica's subscription limits; the hint
    /// names the limit.
    pub fn too_many_subscriptions(topic: &str, limit: &str) -> Bytes {
        ErrorFrame {
            error: "too_many_subscriptions",
            topic: Some(topic),
            hint: Some(limit),
            ..Default::default()
        }
        .encode()
    }

    /// The upstream pool cannot take the publish now (down or saturated).
    pub fn broker_unavailable(topic: &str, msg_ref: Option<&str>) -> Bytes {
        ErrorFrame {
            error: "broker_unavailable",
            topic: Some(topic),
            msg_ref,
            ..Default::default()
        }
        .encode()
    }

    /// A `msgRef` publish the broker never acknowledged.
    pub fn publish_failed(topic: &str, msg_ref: &str) -> Bytes {
        ErrorFrame {
            error: "publish_failed",
            topic: Some(topic),
            msg_ref: Some(msg_ref),
            hint: Some("the broker did not acknowledge the publish"),
            ..Default::default()
        }
        .encode()
    }

    /// A subscription the broker refused (SUBACK failure).
    pub fn subscription_failed(topic: &str) -> Bytes {
        ErrorFrame {
            error: "subscription_failed",
            topic: Some(topic),
            hint: Some("the broker refused the subscription"),
            ..Default::default()
        }
        .encode()
    }
}

/// `{type:"message", topic, data[, filter]}`: `topic` is the subscriber's own subscription
/// string (the SDK routes on it byte for byte), `data` the publisher's exact bytes.
pub fn message(topic: &str, data: &[u8], filter: Option<&str>) -> Bytes {
    let mut w = MapWriter::with_capacity(
        3 + u32::from(filter.is_some()),
        32 + topic.len() + data.len() + filter.map_or(0, str::len),
    );
    w.str("type", "message");
    w.str("topic", topic);
    w.raw("data", data);
    if let Some(f) = filter {
        w.str("filter", f);
    }
    w.finish()
}

pub fn subscribed(topic: &str, load_balance: bool) -> Bytes {
    let mut w = MapWriter::new(3);
    w.str("type", "subscribed");
    w.str("topic", topic);
    w.bool("loadBalance", load_balance);
    w.finish()
}

pub fn unsubscribed(topic: &str) -> Bytes {
    let mut w = MapWriter::new(2);
    w.str("type", "unsubscribed");
    w.str("topic", topic);
    w.finish()
}

pub fn filters_updated(topic: &str, filters: Bytes) -> Bytes {
    let mut w = MapWriter::new(3);
    w.str("type", "filtersUpdated");
    w.str("topic", topic);
    w.raw("filters", &filters);
    w.finish()
}

pub fn published(topic: &str, msg_ref: &str) -> Bytes {
    let mut w = MapWriter::new(3);
    w.str("type", "published");
    w.str("topic", topic);
    w.str("msgRef", msg_ref);
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::msgpack::Reader;

    /// Decodes a frame into (key, raw value) pairs, checking it is one complete map.
    fn pairs(b: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut r = Reader::new(b);
        let n = r.map_len().unwrap();
        let out = (0..n)
            .map(|_| {
                (
                    r.str().unwrap().to_string(),
                    r.value_bytes().unwrap().to_vec(),
                )
            })
            .collect();
        assert!(r.is_empty(), "exactly one value");
        out
    }

    #[test]
    fn message_passes_data_through() {
        let mut data = Vec::new();
        rmp::encode::write_bin(&mut data, &[1, 2, 3]).unwrap();
        let f = message("chat/+/messages", &data, Some("a|b"));
        let p = pairs(&f);
        assert_eq!(p[0].0, "type");
        assert_eq!(p[2], ("data".to_string(), data));
        assert_eq!(p[3].0, "filter");
    }

    #[test]
    fn auth_ok_has_every_field() {
        let f = auth_ok("sensor-1", "demo", "device", 1, &[]);
        let keys: Vec<_> = pairs(&f).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "type",
                "success",
                "actorTokenId",
                "projectId",
                "actorType",
                "protocolVersion",
                "restoredSubscriptions"
            ]
        );
    }

    #[test]
    fn error_frames_carry_optional_fields() {
        let f = ErrorFrame {
            error: "message_too_large",
            code: Some(42930),
            topic: Some("a/b/c"),
            max_size_bytes: Some(921_600),
            ..Default::default()
        }
        .encode();
        assert_eq!(pairs(&f).len(), 5);
    }
}
