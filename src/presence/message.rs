//! What replicas tell each other about presence, on `[prefix/]_/presence/v1/<replica>` (one
//! topic per writer, so the broker keeps each replica's messages in order): MessagePack maps
//!
//! ```text
//! {v: 1, k: "d"|"s"|"h"|"r"|"g", r: replica, i: incarnation, q: seq,
//!  o: [op…] (d, s), p: part, n: parts (s), t: target replica or nil (r)}
//! op: [0, project, app, scope|nil, room, actor, data, joined_at, updated]   (set)
//!     [1, project, app, scope|nil, room, actor]                             (remove)
//! ```
//!
//! `data` is the client's MessagePack value embedded as is. The broker is trusted no more
//! than a client: anything malformed, of another version or over the bounds is refused
//! whole, and nothing allocates in proportion to a declared length.

use std::sync::Arc;

use bytes::Bytes;

use super::core::{Member, RoomKey};
use crate::wire::msgpack::{MsgpackError, Reader};

/// The version this build writes and reads.
pub const VERSION: u64 = 1;
/// Longest id (project, app, scope, room, actor, replica) accepted from the broker.
pub const MAX_ID_BYTES: usize = 512;
/// Largest presence `data` accepted from the broker (a replica's own limit is lower).
pub const MAX_DATA_BYTES: usize = 64 << 10;
/// Most ops in one message.
pub const MAX_OPS: usize = 100_000;
/// Most parts of one snapshot (with messages of up to 256 KiB: 1 GiB, beyond any
/// `presence.max_state_bytes` a replica would announce).
pub const MAX_PARTS: u32 = 4096;

/// One change of what a replica announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Set {
        room: RoomKey,
        actor: Arc<str>,
        member: Member,
    },
    Remove {
        room: RoomKey,
        actor: Arc<str>,
    },
}

impl Op {
    /// Bytes of this op encoded (an upper bound, within a few header bytes).
    pub fn encoded_len(&self) -> usize {
        let (room, actor, extra) = match self {
            Op::Set {
                room,
                actor,
                member,
            } => (room, actor, member.data.len() + 18),
            Op::Remove { room, actor } => (room, actor, 0),
        };
        2 + room.project.len()
            + room.app.len()
            + room.scope.as_deref().map_or(0, str::len)
            + room.room.len()
            + actor.len()
            + 5 * 5
            + extra
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Ops in order, at `seq`.
    Delta { ops: Vec<Op> },
    /// Everything the replica announces at `seq`, in `parts` messages.
    Snapshot { part: u32, parts: u32, ops: Vec<Op> },
    /// Alive; `seq` is the last delta published.
    Heartbeat,
    /// "Send me your snapshot" (`target`), or, with no target, a hello to everyone.
    SyncRequest { target: Option<Arc<str>> },
    /// Goodbye, or the last will the broker publishes: every member of this incarnation left.
    Gone,
}

impl Body {
    /// The kind, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Delta { .. } => "delta",
            Body::Snapshot { .. } => "snapshot",
            Body::Heartbeat => "heartbeat",
            Body::SyncRequest { .. } => "sync request",
            Body::Gone => "gone",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub replica: Arc<str>,
    pub incarnation: u64,
    pub seq: u64,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("malformed presence message: {0}")]
    Malformed(#[from] MsgpackError),
    #[error("presence message of unknown version {0}")]
    UnknownVersion(u64),
    #[error("presence message: {0}")]
    Invalid(&'static str),
}

fn write_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            let _ = rmp::encode::write_str(out, s);
        }
        None => {
            let _ = rmp::encode::write_nil(out);
        }
    }
}

fn write_ops(out: &mut Vec<u8>, ops: &[Op]) {
    let _ = rmp::encode::write_str(out, "o");
    let _ = rmp::encode::write_array_len(out, ops.len() as u32);
    for op in ops {
        let (kind, room, actor, member) = match op {
            Op::Set {
                room,
                actor,
                member,
            } => (0, room, actor, Some(member)),
            Op::Remove { room, actor } => (1, room, actor, None),
        };
        let _ = rmp::encode::write_array_len(out, if member.is_some() { 9 } else { 6 });
        let _ = rmp::encode::write_uint(out, kind);
        let _ = rmp::encode::write_str(out, &room.project);
        let _ = rmp::encode::write_str(out, &room.app);
        write_opt_str(out, room.scope.as_deref());
        let _ = rmp::encode::write_str(out, &room.room);
        let _ = rmp::encode::write_str(out, actor);
        if let Some(m) = member {
            out.extend_from_slice(&m.data);
            let _ = rmp::encode::write_uint(out, m.joined_at);
            let _ = rmp::encode::write_uint(out, m.updated);
        }
    }
}

impl Message {
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(64);
        let extra = match &self.body {
            Body::Delta { .. } => 1,
            Body::Snapshot { .. } => 3,
            Body::SyncRequest { .. } => 1,
            Body::Heartbeat | Body::Gone => 0,
        };
        let _ = rmp::encode::write_map_len(&mut out, 5 + extra);
        let _ = rmp::encode::write_str(&mut out, "v");
        let _ = rmp::encode::write_uint(&mut out, VERSION);
        let _ = rmp::encode::write_str(&mut out, "k");
        let _ = rmp::encode::write_str(
            &mut out,
            match &self.body {
                Body::Delta { .. } => "d",
                Body::Snapshot { .. } => "s",
                Body::Heartbeat => "h",
                Body::SyncRequest { .. } => "r",
                Body::Gone => "g",
            },
        );
        let _ = rmp::encode::write_str(&mut out, "r");
        let _ = rmp::encode::write_str(&mut out, &self.replica);
        let _ = rmp::encode::write_str(&mut out, "i");
        let _ = rmp::encode::write_uint(&mut out, self.incarnation);
        let _ = rmp::encode::write_str(&mut out, "q");
        let _ = rmp::encode::write_uint(&mut out, self.seq);
        match &self.body {
            Body::Delta { ops } => write_ops(&mut out, ops),
            Body::Snapshot { part, parts, ops } => {
                let _ = rmp::encode::write_str(&mut out, "p");
                let _ = rmp::encode::write_uint(&mut out, u64::from(*part));
                let _ = rmp::encode::write_str(&mut out, "n");
                let _ = rmp::encode::write_uint(&mut out, u64::from(*parts));
                write_ops(&mut out, ops);
            }
            Body::SyncRequest { target } => {
                let _ = rmp::encode::write_str(&mut out, "t");
                write_opt_str(&mut out, target.as_deref());
            }
            Body::Heartbeat | Body::Gone => {}
        }
        out.into()
    }

    pub fn decode(buf: &[u8]) -> Result<Self, MessageError> {
        let mut r = Reader::new(buf);
        let fields = r.map_len()?;
        let (mut version, mut kind, mut replica, mut inc, mut seq) = (None, None, None, None, None);
        let (mut part, mut parts, mut target, mut ops_at) = (0u64, 0u64, None, None);
        for _ in 0..fields {
            match r.str()? {
                "v" => version = Some(r.uint()?),
                "k" => kind = Some(r.str()?),
                "r" => replica = Some(id(r.str()?)?),
                "i" => inc = Some(r.uint()?),
                "q" => seq = Some(r.uint()?),
                "p" => part = r.uint()?,
                "n" => parts = r.uint()?,
                "t" if r.next_is_nil() => r.skip(0)?,
                "t" => target = Some(id(r.str()?)?),
                "o" => ops_at = Some(r.value_bytes()?),
                _ => r.skip(0)?,
            }
        }
        if !r.is_empty() {
            return Err(MsgpackError::Type.into());
        }
        match version {
            Some(VERSION) => {}
            Some(v) => return Err(MessageError::UnknownVersion(v)),
            None => return Err(MessageError::Invalid("no version")),
        }
        let (Some(kind), Some(replica), Some(incarnation), Some(seq)) = (kind, replica, inc, seq)
        else {
            return Err(MessageError::Invalid("missing field"));
        };
        let ops = || -> Result<Vec<Op>, MessageError> {
            match ops_at {
                Some(b) => decode_ops(b),
                None => Ok(Vec::new()),
            }
        };
        let body = match kind {
            "d" => Body::Delta { ops: ops()? },
            "s" => {
                let (Ok(part), Ok(parts)) = (u32::try_from(part), u32::try_from(parts)) else {
                    return Err(MessageError::Invalid("snapshot part out of range"));
                };
                if parts == 0 || part >= parts || parts > MAX_PARTS {
                    return Err(MessageError::Invalid("snapshot part out of range"));
                }
                Body::Snapshot {
                    part,
                    parts,
                    ops: ops()?,
                }
            }
            "h" => Body::Heartbeat,
            "r" => Body::SyncRequest { target },
            "g" => Body::Gone,
            _ => return Err(MessageError::Invalid("unknown kind")),
        };
        Ok(Message {
            replica,
            incarnation,
            seq,
            body,
        })
    }
}

fn id(s: &str) -> Result<Arc<str>, MessageError> {
    if s.is_empty() || s.len() > MAX_ID_BYTES {
        return Err(MessageError::Invalid("id empty or too long"));
    }
    Ok(s.into())
}

fn decode_ops(buf: &[u8]) -> Result<Vec<Op>, MessageError> {
    let mut r = Reader::new(buf);
    let n = r.array_len()?;
    if n > MAX_OPS {
        return Err(MessageError::Invalid("too many ops"));
    }
    let mut out = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        let len = r.array_len()?;
        let kind = r.uint()?;
        let project = id(r.str()?)?;
        let app = id(r.str()?)?;
        let scope = if r.next_is_nil() {
            r.skip(0)?;
            None
        } else {
            Some(id(r.str()?)?)
        };
        let room = RoomKey {
            project,
            app,
            scope,
            room: id(r.str()?)?,
        };
        let actor = id(r.str()?)?;
        match (kind, len) {
            (0, 9) => {
                let data = r.value_bytes()?;
                if data.len() > MAX_DATA_BYTES {
                    return Err(MessageError::Invalid("presence data too large"));
                }
                let member = Member {
                    data: Bytes::copy_from_slice(data),
                    joined_at: r.uint()?,
                    updated: r.uint()?,
                };
                out.push(Op::Set {
                    room,
                    actor,
                    member,
                });
            }
            (1, 6) => out.push(Op::Remove { room, actor }),
            _ => return Err(MessageError::Invalid("unknown op")),
        }
    }
    if !r.is_empty() {
        return Err(MsgpackError::Type.into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(scope: Option<&str>) -> RoomKey {
        RoomKey {
            project: "demo".into(),
            app: "chat".into(),
            scope: scope.map(Into::into),
            room: "general".into(),
        }
    }

    #[test]
    fn every_kind_round_trips() {
        let set = Op::Set {
            room: room(Some("acme")),
            actor: "alice".into(),
            member: Member {
                data: Bytes::from_static(&[0x81, 0xa1, b'x', 0x01]),
                joined_at: 1_700_000_000,
                updated: 1_700_000_000_123,
            },
        };
        let remove = Op::Remove {
            room: room(None),
            actor: "bob".into(),
        };
        for body in [
            Body::Delta {
                ops: vec![set.clone(), remove.clone()],
            },
            Body::Snapshot {
                part: 1,
                parts: 3,
                ops: vec![set.clone()],
            },
            Body::Heartbeat,
            Body::SyncRequest { target: None },
            Body::SyncRequest {
                target: Some("b".into()),
            },
            Body::Gone,
        ] {
            let m = Message {
                replica: "host-8080".into(),
                incarnation: u64::MAX - 7,
                seq: 42,
                body,
            };
            let bytes = m.encode();
            assert_eq!(Message::decode(&bytes), Ok(m.clone()));
            for op in match &m.body {
                Body::Delta { ops } | Body::Snapshot { ops, .. } => ops.clone(),
                _ => vec![],
            } {
                let mut one = Vec::new();
                write_ops(&mut one, std::slice::from_ref(&op));
                assert!(
                    op.encoded_len() + 4 >= one.len(),
                    "encoded_len under-counts"
                );
            }
        }
    }

    #[test]
    fn malformed_messages_are_refused() {
        let good = Message {
            replica: "a".into(),
            incarnation: 1,
            seq: 1,
            body: Body::Gone,
        }
        .encode();
        for cut in 0..good.len() {
            assert!(
                Message::decode(&good[..cut]).is_err(),
                "prefix {cut} accepted"
            );
        }
        let mut v2 = Vec::new();
        rmp::encode::write_map_len(&mut v2, 1).unwrap();
        rmp::encode::write_str(&mut v2, "v").unwrap();
        rmp::encode::write_uint(&mut v2, 2).unwrap();
        assert_eq!(Message::decode(&v2), Err(MessageError::UnknownVersion(2)));
        // A declared array of four billion ops allocates nothing.
        let mut huge = good.to_vec();
        huge[0] += 1;
        rmp::encode::write_str(&mut huge, "o").unwrap();
        huge.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff]);
        assert!(Message::decode(&huge).is_err());
    }
}
