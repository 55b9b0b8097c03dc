//! Server → client presence frames (PROTOCOL §11–§12). Events use the snake_case keys the
//! reference sends (`actor_token_id`, `joined_at`), lists the camelCase ones the SDK reads.

use bytes::Bytes;

use super::core::{EventKind, Member};
use crate::wire::encode::MapWriter;

/// Room events: `{type:"presence", event, data:{actor_token_id, presence, joined_at}}`
/// (`data:{actor_token_id}` for a leave).
pub fn event(kind: EventKind, actor: &str, member: Option<&Member>) -> Bytes {
    let data = match member {
        Some(m) => {
            let mut d = MapWriter::with_capacity(3, 48 + actor.len() + m.data.len());
            d.str("actor_token_id", actor);
            d.raw("presence", &m.data);
            d.uint("joined_at", m.joined_at);
            d
        }
        None => {
            let mut d = MapWriter::new(1);
            d.str("actor_token_id", actor);
            d
        }
    };
    let data = data.finish();
    let mut w = MapWriter::with_capacity(3, 32 + data.len());
    w.str("type", "presence");
    w.str("event", kind.as_str());
    w.raw("data", &data);
    w.finish()
}

/// One member as lists carry it: `{actorTokenId, presence, joinedAt[, status]}`.
fn write_member(out: &mut Vec<u8>, actor: &str, m: &Member, status: bool) {
    let mut w = MapWriter::with_capacity(3 + u32::from(status), 48 + actor.len() + m.data.len());
    w.str("actorTokenId", actor);
    w.raw("presence", &m.data);
    w.uint("joinedAt", m.joined_at);
    if status {
        w.str("status", "online");
    }
    out.extend_from_slice(&w.finish());
}

/// `{type:"presenceList", roomId?, data:[member…]}`.
pub fn list(room_id: Option<&str>, members: &[(std::sync::Arc<str>, Member)]) -> Bytes {
    let mut data = Vec::new();
    let _ = rmp::encode::write_array_len(&mut data, members.len() as u32);
    for (actor, m) in members {
        write_member(&mut data, actor, m, true);
    }
    let mut w = MapWriter::with_capacity(2 + u32::from(room_id.is_some()), 32 + data.len());
    w.str("type", "presenceList");
    if let Some(r) = room_id {
        w.str("roomId", r);
    }
    w.raw("data", &data);
    w.finish()
}

/// The members of a lobby's rooms, per room slug then actor.
pub type LobbyView = Vec<(std::sync::Arc<str>, super::core::Members)>;

/// `lobbySubscribed` / `lobbyPresenceList`: `{type, lobbyId, presence:{room:{actor:member}}}`.
pub fn lobby_map(kind: &str, lobby: &str, rooms: &LobbyView) -> Bytes {
    let mut p = Vec::new();
    let _ = rmp::encode::write_map_len(&mut p, rooms.len() as u32);
    for (room, members) in rooms {
        let _ = rmp::encode::write_str(&mut p, room);
        let _ = rmp::encode::write_map_len(&mut p, members.len() as u32);
        for (actor, m) in members.iter() {
            let _ = rmp::encode::write_str(&mut p, actor);
            write_member(&mut p, actor, m, false);
        }
    }
    let mut w = MapWriter::with_capacity(3, 48 + p.len());
    w.str("type", kind);
    w.str("lobbyId", lobby);
    w.raw("presence", &p);
    w.finish()
}

/// `{type:"lobbyUnsubscribed", lobbyId}`.
pub fn lobby_unsubscribed(lobby: &str) -> Bytes {
    let mut w = MapWriter::new(2);
    w.str("type", "lobbyUnsubscribed");
    w.str("lobbyId", lobby);
    w.finish()
}

/// `{type:"lobbyPresence", event, lobbyId:<slug>, roomId:<room slug>, actorId, data}`
/// (`data: {}` on a leave; the slug, not an internal id, PROTOCOL A3).
pub fn lobby_event(
    kind: EventKind,
    lobby: &str,
    room: &str,
    actor: &str,
    member: Option<&Member>,
) -> Bytes {
    let data: &[u8] = member.map_or(&[0x80], |m| &m.data);
    let mut w = MapWriter::with_capacity(6, 64 + data.len());
    w.str("type", "lobbyPresence");
    w.str("event", kind.as_str());
    w.str("lobbyId", lobby);
    w.str("roomId", room);
    w.str("actorId", actor);
    w.raw("data", data);
    w.finish()
}
