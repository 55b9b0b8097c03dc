//! cuttle: a stateless realtime edge proxy.
//!
//! Clients speak the NoLag MessagePack protocol over WebSocket; cuttle authenticates each one
//! as an actor, authorizes every publish and delivery against the policy, isolates tenants by
//! injecting their access scope into upstream MQTT topics, and multiplexes everyone onto a
//! small pool of broker connections. See `docs/ARCHITECTURE.md` for the data flow.
//!
//! Layers, bottom up:
//! - [`topic`]: client topic syntax, filters, and the upstream topic layout (pure functions);
//! - [`policy`]: the policy model, its validation, and authorization decisions;
//! - [`auth`]: credentials (device tokens, server keys, user JWTs, session tokens) → actors;
//! - [`config`]: `proxy.yaml`, its defaults and validation;
//! - [`presence`]: room presence and lobbies, replicated through the broker;
//! - [`webhook`]: signed event delivery to each project's backend, bounded and never blocking;
//! - [`reload`]: the live policy snapshot (and TLS certificate) and hot reload;
//! - [`tls`]: the client listener's certificate and key, checked, as a rustls config;
//! - [`metrics`]: the Prometheus series and the `/metrics` exposition;
//! - [`secret`]: the wrapper that keeps passwords, keys and tokens out of logs;
//! - [`cli`]: the `cuttle` command line.

pub mod auth;
#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod cli;
pub mod config;
pub mod diagnostics;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod presence;
pub mod reload;
pub mod router;
pub mod secret;
pub mod server;
#[cfg(test)]
mod test_rng;
pub mod tls;
pub mod topic;
pub mod upstream;
pub mod webhook;
pub mod wire;
