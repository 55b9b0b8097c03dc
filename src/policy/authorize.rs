//! Authorization decisions: may this actor read or write this topic?
//!
//! A decision combines, in order: the app (must belong to the actor's project), the room (must
//! be declared; a private room admits only its listed actors; a session's allow-list must name
//! it), and the topic (must be declared; the actor type's permission, plus role grants for
//! users). Scope plays no part here: it cannot be chosen by the client, and isolation comes from
//! injecting it into every upstream topic (`topic::upstream`).
//!
//! [`Policy::room_access`] is the room half alone, for presence and lobbies, which concern a
//! room and no topic.
//!
//! Exact subscriptions are decided once, at subscribe time (and again after a policy reload).
//! Wildcard subscriptions cover rooms and topics the actor may not read, so they are accepted
//! when at least one covered (room, topic) is readable, and every delivery is checked with
//! [`Policy::authorize_delivery`].

use super::model::{Access, ActorType, App, Policy, Room};
use crate::auth::Actor;
use crate::topic::{ClientFilter, ClientTopic};

/// `error` of a denial for protocol v1 (PROTOCOL §5).
pub const DENIAL_ERROR_V1: &str = "not_authorized";
/// `error` and `code` of a denial for protocol v2 (PROTOCOL §8).
pub const DENIAL_ERROR_V2: &str = "unknown_topic";
pub const DENIAL_CODE_V2: u32 = 42940;

/// Why an operation was denied. The message is the v2 `hint` and the log field; the client's
/// `error` string is [`DENIAL_ERROR_V1`] or [`DENIAL_ERROR_V2`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("the actor's project is no longer in the policy")]
    UnknownProject,
    #[error("no such app in this project")]
    UnknownApp,
    #[error("no such room in this app")]
    UnknownRoom,
    #[error("no such topic in this app")]
    UnknownTopic,
    #[error("the room is private and this actor is not a member")]
    PrivateRoom,
    #[error("the session token does not allow this room")]
    SessionRoom,
    #[error("{kind} actors may not {access} this topic")]
    Permission { kind: ActorType, access: AccessVerb },
    #[error("no room and topic under this wildcard is readable by this actor")]
    NothingReadable,
}

/// `Access` as a verb, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessVerb {
    Read,
    Write,
}

impl std::fmt::Display for AccessVerb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AccessVerb::Read => "read",
            AccessVerb::Write => "write",
        })
    }
}

impl From<Access> for AccessVerb {
    fn from(a: Access) -> Self {
        match a {
            Access::Read => AccessVerb::Read,
            Access::Write => AccessVerb::Write,
        }
    }
}

/// What an accepted subscription needs at delivery time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionGrant {
    /// An exact topic, fully decided now.
    Exact,
    /// A wildcard: check each delivery with [`Policy::authorize_delivery`].
    CheckEachDelivery,
}

impl Policy {
    fn app_of(&self, actor: &Actor, app: &str) -> Result<&App, Denial> {
        self.project(&actor.project)
            .ok_or(Denial::UnknownProject)?
            .apps
            .get(app)
            .ok_or(Denial::UnknownApp)
    }

    /// Decides an exact topic: publishes, exact subscriptions, and deliveries.
    pub fn authorize(
        &self,
        actor: &Actor,
        topic: ClientTopic<'_>,
        access: Access,
    ) -> Result<(), Denial> {
        let app = self.app_of(actor, topic.app)?;
        let room = app.rooms.get(topic.room).ok_or(Denial::UnknownRoom)?;
        self.room_access(actor, app, room)?;
        let acl = app.topics.get(topic.topic).ok_or(Denial::UnknownTopic)?;
        let permission = match actor.kind {
            ActorType::User if !actor.roles.is_empty() => acl.user_permission(&actor.roles),
            kind => acl.permission(kind),
        };
        if permission.allows(access) {
            Ok(())
        } else {
            Err(Denial::Permission {
                kind: actor.kind,
                access: access.into(),
            })
        }
    }

    /// Decides a subscription (exact or wildcard).
    pub fn authorize_subscription(
        &self,
        actor: &Actor,
        filter: &ClientFilter<'_>,
    ) -> Result<SubscriptionGrant, Denial> {
        if let Some(exact) = filter.as_exact() {
            return self
                .authorize(actor, exact, Access::Read)
                .map(|()| SubscriptionGrant::Exact);
        }
        let app = self.app_of(actor, filter.app)?;
        // Room access and topic permission are independent, so a wildcard is useful iff some
        // covered room is accessible and some covered topic is readable.
        let mut room_denial = Denial::UnknownRoom;
        let room_ok = match filter.room.exact() {
            Some(room) => {
                let room = app.rooms.get(room).ok_or(Denial::UnknownRoom)?;
                self.room_access(actor, app, room)?;
                true
            }
            None => app
                .rooms
                .values()
                .any(|r| match self.room_access(actor, app, r) {
                    Ok(()) => true,
                    Err(d) => {
                        room_denial = d;
                        false
                    }
                }),
        };
        if !room_ok {
            return Err(room_denial);
        }
        let topic_ok = match filter.topic.exact() {
            Some(topic) => {
                let acl = app.topics.get(topic).ok_or(Denial::UnknownTopic)?;
                readable(actor, acl)
            }
            None => app.topics.values().any(|acl| readable(actor, acl)),
        };
        if !topic_ok {
            return Err(Denial::NothingReadable);
        }
        Ok(SubscriptionGrant::CheckEachDelivery)
    }

    /// Whether a message on `topic` may be delivered to `actor` through a wildcard
    /// subscription.
    pub fn authorize_delivery(&self, actor: &Actor, topic: ClientTopic<'_>) -> bool {
        self.authorize(actor, topic, Access::Read).is_ok()
    }

    /// The rooms of `lobby` (of `app`) open to `actor`, in the lobby's order.
    pub fn lobby_rooms_open_to(
        &self,
        actor: &Actor,
        app: &App,
        lobby: &super::model::Lobby,
    ) -> Vec<std::sync::Arc<str>> {
        lobby
            .rooms
            .iter()
            .filter(|r| {
                app.rooms
                    .get(&***r)
                    .is_some_and(|room| self.room_access(actor, app, room).is_ok())
            })
            .cloned()
            .collect()
    }

    /// Whether `actor` may use `room` of `app` at all, whatever the topic: the room half of
    /// [`Self::authorize`], and all that presence and lobbies check (DESIGN §9). A private
    /// room admits only its listed actors (sessions never); a session token's allow-list must
    /// name the room.
    ///
    /// `app` and `room` must come from the actor's own project in this policy (for instance
    /// through [`Project::lobby`](super::Project::lobby) of `self.project(&actor.project)`):
    /// the project is not checked again here, since [`Self::authorize`] has just resolved
    /// `app` through it and runs for every wildcard delivery.
    pub fn room_access(&self, actor: &Actor, app: &App, room: &Room) -> Result<(), Denial> {
        if let Some(members) = &room.members {
            // Sessions have no identity and can never be members; listed ids are unique per
            // project and a user token cannot claim a non-user id (auth refuses it), so id
            // membership is membership.
            if actor.kind == ActorType::Session || !members.contains(&actor.id) {
                return Err(Denial::PrivateRoom);
            }
        }
        if !actor.room_allowed(&app.slug, &room.slug) {
            return Err(Denial::SessionRoom);
        }
        Ok(())
    }
}

fn readable(actor: &Actor, acl: &super::TopicAcl) -> bool {
    match actor.kind {
        ActorType::User => acl.user_permission(&actor.roles),
        kind => acl.permission(kind),
    }
    .allows(Access::Read)
}
