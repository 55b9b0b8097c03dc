//! The session's presence and lobby frames (PROTOCOL §11–§12): resolving a bare `roomId` or
//! `lobbyId` against the actor's project, access checks, the per-connection limits, and the
//! room remembered for a reconnect. The replica-wide state is `crate::presence`.
//!
//! - `roomId` and `lobbyId` are slugs only (A12): a room resolves to the first app, in policy
//!   order, that declares it *and* that this actor may use (private rooms, session
//!   allow-lists); a lobby to the first app declaring it, and it shows only the rooms of it
//!   this actor may use. An unknown or inaccessible room is ignored, as an unknown one is
//!   (A15); an unknown or wholly inaccessible lobby is `not_authorized` with `lobbyId`.
//! - `presence` without `roomId` updates the connection's room; on a fresh connection it
//!   re-enters the room remembered in the actor's restore record (the SDK sends exactly that
//!   after an automatic reconnect, A7); with neither, it is stored and nothing is broadcast.
//! - `getPresence` without `roomId` lists the connection's room (no `roomId` in the reply,
//!   as the SDK expects), or `[]`.

use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;

use super::Machine;
use crate::presence::core::{Refusal, RoomKey};
use crate::presence::frames;
use crate::wire::ClientFrame;
use crate::wire::encode::errors;

/// A lobby resolved for this actor.
struct LobbyTarget {
    /// The namespace of the lobby's app (`room` is unused).
    key: RoomKey,
    /// Its rooms this actor may use.
    rooms: Vec<Arc<str>>,
    slug: Arc<str>,
}

impl Machine {
    /// One presence-family frame (within the budget).
    pub(super) fn presence_frame(&mut self, frame: ClientFrame<'_>, out: &mut Vec<Bytes>) {
        match frame {
            ClientFrame::Presence { room_id, data } => self.presence(room_id, data, out),
            ClientFrame::GetPresence { room_id } => out.push(self.get_presence(room_id)),
            ClientFrame::LobbySubscribe { lobby_id } => out.push(self.lobby_subscribe(lobby_id)),
            ClientFrame::GetLobbyPresence { lobby_id } => out.push(self.lobby_presence(lobby_id)),
            ClientFrame::LobbyUnsubscribe { lobby_id } => {
                out.push(self.lobby_unsubscribe(lobby_id))
            }
            _ => {}
        }
    }

    fn room_key(&self, app: &Arc<str>, room: &Arc<str>) -> RoomKey {
        RoomKey {
            project: self.actor.project.clone(),
            app: app.clone(),
            scope: self.actor.scope.clone(),
            room: room.clone(),
        }
    }

    /// The room a bare slug names for this actor, if it may use it.
    fn resolve_room(&self, slug: &str) -> Option<RoomKey> {
        let snapshot = self.proxy.store.load();
        let policy = &snapshot.policy;
        let project = policy.project(&self.actor.project)?;
        project.apps_in_order().find_map(|app| {
            let room = app.rooms.get(slug)?;
            policy.room_access(&self.actor, app, room).ok()?;
            Some(self.room_key(&app.slug, &room.slug))
        })
    }

    /// `app/room` of a restore record, if this actor may still use it.
    fn resolve_remembered(&self, app_room: &str) -> Option<RoomKey> {
        let (app, room) = app_room.split_once('/')?;
        let snapshot = self.proxy.store.load();
        let policy = &snapshot.policy;
        let app = policy.project(&self.actor.project)?.apps.get(app)?;
        let room = app.rooms.get(room)?;
        policy.room_access(&self.actor, app, room).ok()?;
        Some(self.room_key(&app.slug, &room.slug))
    }

    /// Whether a presence-family frame is within `presence.frames_per_second`.
    pub(super) fn presence_budget(&mut self, now: Instant, out: &mut Vec<Bytes>) -> bool {
        if self.presence_rate.take(now) {
            return true;
        }
        out.push(errors::presence_rate_limited());
        false
    }

    /// `presence {roomId?, data}`.
    pub(super) fn presence(&mut self, room_id: Option<&str>, data: &[u8], out: &mut Vec<Bytes>) {
        let max = self.proxy.presence.settings().max_data_bytes;
        if data.len() > max {
            out.push(errors::presence_too_large(max));
            return;
        }
        let room = match room_id {
            // Unknown or not for this actor: ignored, like an unknown slug (A15).
            Some(slug) => match self.resolve_room(slug) {
                Some(r) => r,
                None => return,
            },
            None => {
                let current = self.proxy.presence.room_of(self.membership.session());
                match current.or_else(|| {
                    self.remembered_room
                        .as_deref()
                        .and_then(|r| self.resolve_remembered(r))
                }) {
                    Some(r) => r,
                    // No room known: nothing is broadcast (PROTOCOL §11; the data comes
                    // again with the next `presence` that names a room).
                    None => return,
                }
            }
        };
        match self.proxy.presence.set(
            self.membership.session(),
            &self.outbox,
            room.clone(),
            &self.actor.id,
            Bytes::copy_from_slice(data),
        ) {
            Ok(own) => {
                out.extend(own);
                let remembered = format!("{}/{}", room.app, room.room);
                if self.remembered_room.as_deref() != Some(&remembered) {
                    self.remembered_room = Some(remembered);
                    self.submit_restore();
                }
            }
            Err(Refusal::RoomFull(_)) => {
                out.push(errors::presence_refused("presence.max_room_members"))
            }
            Err(Refusal::StateFull) => {
                out.push(errors::presence_refused("presence.max_state_bytes"))
            }
            Err(Refusal::Draining) => out.push(errors::presence_refused("shutting down")),
        }
    }

    /// `getPresence {roomId?}` → `presenceList`.
    pub(super) fn get_presence(&self, room_id: Option<&str>) -> Bytes {
        match room_id {
            Some(slug) => {
                let members = self
                    .resolve_room(slug)
                    .map(|r| self.proxy.presence.members(&r))
                    .unwrap_or_default();
                frames::list(Some(slug), &members)
            }
            None => {
                let members = self
                    .proxy
                    .presence
                    .room_of(self.membership.session())
                    .map(|r| self.proxy.presence.members(&r))
                    .unwrap_or_default();
                frames::list(None, &members)
            }
        }
    }

    /// The lobby a slug names, as (namespace key of its app, rooms this actor may use), or
    /// the error frame.
    fn resolve_lobby(&self, slug: &str) -> Result<LobbyTarget, Bytes> {
        let snapshot = self.proxy.store.load();
        let policy = &snapshot.policy;
        let Some((app, lobby)) = policy
            .project(&self.actor.project)
            .and_then(|p| p.lobby(slug))
        else {
            return Err(errors::lobby_denied(slug, "no such lobby"));
        };
        let rooms = policy.lobby_rooms_open_to(&self.actor, app, lobby);
        if rooms.is_empty() {
            return Err(errors::lobby_denied(
                slug,
                "none of the lobby's rooms is open to this actor",
            ));
        }
        Ok(LobbyTarget {
            key: self.room_key(&app.slug, &app.slug),
            rooms,
            slug: lobby.slug.clone(),
        })
    }

    /// `lobbySubscribe {lobbyId}` → `lobbySubscribed` with the current members.
    pub(super) fn lobby_subscribe(&mut self, slug: &str) -> Bytes {
        let LobbyTarget { key, rooms, slug } = match self.resolve_lobby(slug) {
            Ok(l) => l,
            Err(frame) => return frame,
        };
        let limit = self.proxy.presence.settings().lobbies_per_connection;
        if !self.lobbies.contains(&slug) && self.lobbies.len() >= limit {
            return errors::lobby_denied(&slug, "presence.lobbies_per_connection");
        }
        let view = self.proxy.presence.lobby_subscribe(
            self.membership.session(),
            &self.outbox,
            &key,
            &slug,
            &rooms,
        );
        self.lobbies.insert(slug.clone());
        frames::lobby_map("lobbySubscribed", &slug, &view)
    }

    /// `getLobbyPresence {lobbyId}` → `lobbyPresenceList`.
    pub(super) fn lobby_presence(&self, slug: &str) -> Bytes {
        match self.resolve_lobby(slug) {
            Ok(LobbyTarget { key, rooms, slug }) => {
                let view = self.proxy.presence.lobby_view(&key, &rooms);
                frames::lobby_map("lobbyPresenceList", &slug, &view)
            }
            Err(frame) => frame,
        }
    }

    /// `lobbyUnsubscribe {lobbyId}` → `lobbyUnsubscribed` (always).
    pub(super) fn lobby_unsubscribe(&mut self, slug: &str) -> Bytes {
        if self.lobbies.remove(slug) {
            self.proxy
                .presence
                .lobby_unsubscribe(self.membership.session(), slug);
        }
        frames::lobby_unsubscribed(slug)
    }

    /// After a policy reload: leave a room this actor may no longer use, and re-resolve every
    /// lobby (dropping those no longer open to it).
    pub(super) fn reevaluate_presence(&mut self, out: &mut Vec<Bytes>) {
        let conn = self.membership.session();
        if let Some(room) = self.proxy.presence.room_of(conn) {
            let app_room = format!("{}/{}", room.app, room.room);
            if self.resolve_remembered(&app_room).is_none() {
                self.proxy.presence.leave(conn, false);
                self.remembered_room = None;
                self.submit_restore();
            }
        }
        let lobbies: Vec<Arc<str>> = self.lobbies.iter().cloned().collect();
        for slug in lobbies {
            match self.resolve_lobby(&slug) {
                Ok(LobbyTarget { key, rooms, slug }) => {
                    // Same subscription, the room set as the policy now has it.
                    self.proxy
                        .presence
                        .lobby_subscribe(conn, &self.outbox, &key, &slug, &rooms);
                }
                Err(frame) => {
                    self.proxy.presence.lobby_unsubscribe(conn, &slug);
                    self.lobbies.remove(&slug);
                    out.push(frame);
                }
            }
        }
    }
}
