//! Requests every replica must act on, carried by the broker on a reserved topic:
//! `[prefix/]_/control/v1/disconnect` (the `_` app level is the proxy's own; no client topic
//! can name it), subscribed by every replica with the reserved subscription id
//! [`SUBSCRIPTION_ID`].
//!
//! So far one request: **disconnect** an actor (`POST /v1/actors/{id}/disconnect`). The
//! message names the project, the actor and the namespaces the requesting API key may reach;
//! each replica closes that actor's sessions in those namespaces with 4001
//! `disconnected_by_server`. The replica that took the request acts on it at once and again
//! when its own message comes back from the broker (a no-op then).
//!
//! A control message is untrusted input like any other broker payload (anyone with broker
//! access could publish one): it is parsed with bounds and a malformed one is dropped.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The reserved subscription id of the control filter: lane 62, sequence 0 — never a router
/// entry (their sequences start at 1), never a retained fetch (lane 63), not presence's 63.
pub const SUBSCRIPTION_ID: usize = crate::router::SHARDS - 1;

/// Largest control message accepted.
const MAX_MESSAGE_BYTES: usize = 16 * 1024;

/// Which of an actor's sessions a disconnect closes, by the session's scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Namespaces {
    /// Every scope of the project, and `own` (the key's own namespace; `None`: unscoped).
    AllScopes { own: Option<String> },
    /// Exactly these namespaces (`None`: the unscoped one).
    Only(Vec<Option<String>>),
}

impl Namespaces {
    pub fn contains(&self, scope: Option<&str>) -> bool {
        match self {
            Namespaces::AllScopes { own } => scope.is_some() || own.as_deref() == scope,
            Namespaces::Only(list) => list.iter().any(|n| n.as_deref() == scope),
        }
    }
}

/// A disconnect request, as published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disconnect {
    pub project: String,
    pub actor: String,
    pub namespaces: Namespaces,
}

impl Disconnect {
    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    pub fn decode(payload: &[u8]) -> Option<Self> {
        if payload.len() > MAX_MESSAGE_BYTES {
            return None;
        }
        serde_json::from_slice(payload).ok()
    }
}

/// Hands control messages to the proxy (the router holds this; the proxy is created after it).
pub(crate) struct Sink(pub(crate) std::sync::Weak<super::Proxy>);

impl Sink {
    pub(crate) fn deliver(&self, payload: &Bytes) {
        let Some(proxy) = self.0.upgrade() else {
            return;
        };
        match Disconnect::decode(payload) {
            Some(d) => {
                let closed = proxy.kick(&d);
                tracing::debug!(project = %d.project, actor = %d.actor, closed, "control: disconnect");
            }
            None => tracing::debug!(bytes = payload.len(), "control: malformed message dropped"),
        }
    }
}

/// What the router needs to reach a [`Sink`] without knowing the proxy.
pub trait ControlSink: Send + Sync {
    fn deliver(&self, payload: &Bytes);
}

impl ControlSink for Sink {
    fn deliver(&self, payload: &Bytes) {
        Sink::deliver(self, payload)
    }
}

/// An actor's sessions on this replica watch this; a disconnect request is sent on it.
pub(crate) type Kicks = tokio::sync::watch::Sender<Option<Arc<Disconnect>>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_select_the_sessions_a_key_may_reach() {
        let all = Namespaces::AllScopes { own: None };
        assert!(all.contains(Some("acme")) && all.contains(None));
        let all_scoped = Namespaces::AllScopes {
            own: Some("acme".into()),
        };
        assert!(all_scoped.contains(Some("globex")) && !all_scoped.contains(None));
        let only = Namespaces::Only(vec![None, Some("acme".into())]);
        assert!(
            only.contains(None) && only.contains(Some("acme")) && !only.contains(Some("globex"))
        );
    }

    #[test]
    fn messages_round_trip_and_garbage_is_dropped() {
        let d = Disconnect {
            project: "demo".into(),
            actor: "alice".into(),
            namespaces: Namespaces::Only(vec![Some("acme".into())]),
        };
        assert_eq!(Disconnect::decode(&d.encode()), Some(d));
        for bad in [&b"{"[..], b"[]", b"{\"project\":1}", &[0xff; 10]] {
            assert_eq!(Disconnect::decode(bad), None);
        }
        assert_eq!(Disconnect::decode(&vec![b' '; MAX_MESSAGE_BYTES + 1]), None);
    }
}
