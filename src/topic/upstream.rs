//! The upstream topic layout: where a client topic lives on the broker, and back.
//!
//! ```text
//! [topic_prefix/] app / scope / room / topic [/ filter]
//! ```
//!
//! `scope` is the actor's access-scope slug, or [`UNSCOPED`] (`_`, which no slug can be). The
//! depth is fixed so that the first `prefix + 2` levels of every filter the proxy subscribes to
//! are literals naming exactly one namespace (app, scope): MQTT matches level by level, so a
//! filter of one namespace can never match a topic of another. That is the isolation
//! invariant of DESIGN §4, and `tests/isolation.rs` checks it with property tests.
//!
//! Clients never name their scope: it is an argument here, taken from the authenticated actor.

use super::filters::FilterError;
use super::{ClientFilter, ClientTopic, Level, TopicLevel};

/// The scope segment of unscoped actors. Slug validation rejects `_`, so no tenant can own it.
pub const UNSCOPED: &str = "_";

/// Longest `topic_prefix` accepted, in bytes.
pub const MAX_PREFIX_BYTES: usize = 128;

/// Why a configured `topic_prefix` is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "topic prefix must be at most 128 bytes of '/'-separated non-empty levels of printable ASCII without '+', '#' or a leading '$'"
)]
pub struct PrefixError;

/// The layout for one deployment: just the optional prefix, which is fixed at start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicLayout {
    /// Empty, or the prefix with a trailing `/` so that formatting is a plain push.
    prefix: String,
}

/// An upstream topic taken apart: what the proxy needs to route a broker message back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamTopic<'a> {
    pub app: &'a str,
    /// `None` for the unscoped namespace.
    pub scope: Option<&'a str>,
    pub room: &'a str,
    pub topic: &'a str,
    /// Everything after the topic level: the sub-topic filter of a filtered publish.
    pub filter: Option<&'a str>,
}

impl<'a> UpstreamTopic<'a> {
    pub fn client_topic(&self) -> ClientTopic<'a> {
        ClientTopic {
            app: self.app,
            room: self.room,
            topic: self.topic,
        }
    }
}

/// The scope segment for an actor's scope.
pub fn scope_segment(scope: Option<&str>) -> &str {
    scope.unwrap_or(UNSCOPED)
}

impl TopicLayout {
    pub fn new(prefix: &str) -> Result<Self, PrefixError> {
        if prefix.is_empty() {
            return Ok(Self::default());
        }
        // Topics are limited to 65,535 bytes by MQTT; the prefix is repeated in every one.
        if prefix.len() > MAX_PREFIX_BYTES {
            return Err(PrefixError);
        }
        for level in prefix.split('/') {
            super::check_literal_level(level).map_err(|_| PrefixError)?;
            // Printable ASCII only: rumqttd (the embedded broker) and rumqttc slice
            // `topic[..1]` when matching, which panics on a multi-byte first character. App
            // slugs are ASCII by validation, so with an ASCII prefix no upstream topic the
            // proxy produces can start with one.
            if !level.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(PrefixError);
            }
        }
        Ok(Self {
            prefix: format!("{prefix}/"),
        })
    }

    /// The configured prefix without its trailing `/` (empty when none).
    pub fn prefix(&self) -> &str {
        self.prefix.strip_suffix('/').unwrap_or("")
    }

    /// Levels of every filter that name its namespace: the prefix's, app and scope.
    pub fn namespace_depth(&self) -> usize {
        self.prefix.matches('/').count() + 2
    }

    fn namespace_into(&self, out: &mut String, app: &str, scope: Option<&str>) {
        out.push_str(&self.prefix);
        out.push_str(app);
        out.push('/');
        out.push_str(scope_segment(scope));
        out.push('/');
    }

    /// The upstream topic a publish goes to. `filter` must come from
    /// [`super::filters::publish_filter`], which has validated it.
    pub fn publish_topic(
        &self,
        scope: Option<&str>,
        topic: ClientTopic<'_>,
        filter: Option<&str>,
    ) -> String {
        let len = self.prefix.len()
            + topic.app.len()
            + scope_segment(scope).len()
            + topic.room.len()
            + topic.topic.len()
            + filter.map_or(0, |f| f.len() + 1)
            + 4;
        let mut out = String::with_capacity(len);
        self.namespace_into(&mut out, topic.app, scope);
        out.push_str(topic.room);
        out.push('/');
        out.push_str(topic.topic);
        if let Some(f) = filter {
            out.push('/');
            out.push_str(f);
        }
        out
    }

    /// The upstream MQTT filters for one client subscription: one per sub-topic filter, or one
    /// covering the topic and all its sub-topics when `subfilters` is empty (the reference's
    /// `base/#`, A4). `subfilters` must come from [`super::filters::subscription_filters`].
    /// With a load-balance `group` (valid per [`super::filters::check_group`]), each filter is
    /// wrapped as `$share/<name>/<filter>` with the name from [`TopicLayout::share_name`].
    pub fn subscription_filters(
        &self,
        scope: Option<&str>,
        filter: &ClientFilter<'_>,
        subfilters: &[String],
        group: Option<&str>,
    ) -> Result<Vec<String>, FilterError> {
        let plain = self.plain_filters(scope, filter, subfilters)?;
        Ok(match group {
            None => plain,
            Some(group) => plain
                .into_iter()
                .map(|f| {
                    let name = Self::share_name(filter.app, scope, group, &f);
                    format!("$share/{name}/{f}")
                })
                .collect(),
        })
    }

    fn plain_filters(
        &self,
        scope: Option<&str>,
        filter: &ClientFilter<'_>,
        subfilters: &[String],
    ) -> Result<Vec<String>, FilterError> {
        let mut base = String::with_capacity(64);
        self.namespace_into(&mut base, filter.app, scope);
        match filter.topic {
            TopicLevel::All => {
                if !subfilters.is_empty() {
                    return Err(FilterError::NeedsTopicLevel);
                }
                if let Level::Exact(room) = filter.room {
                    base.push_str(room);
                    base.push('/');
                }
                base.push('#');
                return Ok(vec![base]);
            }
            TopicLevel::Exact(_) | TopicLevel::Any => {
                base.push_str(filter.room.exact().unwrap_or("+"));
                base.push('/');
                base.push_str(filter.topic.exact().unwrap_or("+"));
                base.push('/');
            }
        }
        if subfilters.is_empty() {
            base.push('#');
            return Ok(vec![base]);
        }
        Ok(subfilters
            .iter()
            .map(|f| {
                let mut s = String::with_capacity(base.len() + f.len());
                s.push_str(&base);
                s.push_str(f);
                s
            })
            .collect())
    }

    /// The `$share` name for one load-balanced upstream filter: a digest of (app, scope,
    /// group, filter), length-prefixed so that no two different tuples collide.
    ///
    /// Per *filter*, not just per group, because brokers differ: MQTT 5 identifies a shared
    /// subscription by (name, filter), but rumqttd keys share groups by name alone, so one name
    /// on two filters starves one of them. Deterministic, so every replica joins the same
    /// group; opaque, but the filter beside it in `$share/<name>/<filter>` stays readable.
    pub fn share_name(app: &str, scope: Option<&str>, group: &str, filter: &str) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for part in [app, scope_segment(scope), group, filter] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        let digest = h.finalize();
        format!("c{}", hex::encode(&digest[..16]))
    }

    /// Where an actor's subscription set is kept (PROTOCOL §13), as a retained message:
    /// `[prefix/]_/restore/v2/<project>/<scope or _>/<actor>`. Keyed by scope as well as
    /// actor: a user id is only unique within a namespace (an unlisted JWT `sub` may exist in
    /// two scopes). The app level `_` can never be an app slug, so no client topic or filter
    /// can address it; `v2` keeps it apart from the unversioned records of older releases.
    pub fn restore_topic(&self, project: &str, scope: Option<&str>, actor: &str) -> String {
        format!(
            "{}{UNSCOPED}/restore/v2/{project}/{}/{}",
            self.prefix,
            scope.unwrap_or(UNSCOPED),
            super::filters::encode_group(actor)
        )
    }

    /// Where replica `replica` publishes its presence messages (DESIGN §9): under the
    /// reserved app level, which no client topic can name. The id is encoded like a
    /// load-balance group, so no id can add a level or a wildcard.
    pub fn presence_topic(&self, replica: &str) -> String {
        format!(
            "{}{UNSCOPED}/presence/v1/{}",
            self.prefix,
            super::filters::encode_group(replica)
        )
    }

    /// The topic of control requests of `kind` to every replica (`server::control`).
    pub fn control_topic(&self, kind: &str) -> String {
        format!("{}{UNSCOPED}/control/v1/{kind}", self.prefix)
    }

    /// The filter every replica subscribes to for control requests.
    pub fn control_filter(&self) -> String {
        format!("{}{UNSCOPED}/control/v1/+", self.prefix)
    }

    /// The filter every replica subscribes to: every replica's presence topic.
    pub fn presence_filter(&self) -> String {
        format!("{}{UNSCOPED}/presence/v1/+", self.prefix)
    }

    /// Takes an upstream topic apart. `None` for anything outside the layout (another
    /// publisher's topic on a shared broker, a `$` topic, a malformed string): such messages
    /// are not for any client.
    pub fn parse_upstream<'a>(&self, topic: &'a str) -> Option<UpstreamTopic<'a>> {
        let rest = topic.strip_prefix(self.prefix.as_str())?;
        let mut levels = rest.splitn(5, '/');
        let app = levels.next().filter(|s| !s.is_empty())?;
        let scope = levels.next().filter(|s| !s.is_empty())?;
        let room = levels.next().filter(|s| !s.is_empty())?;
        let topic = levels.next().filter(|s| !s.is_empty())?;
        let filter = levels.next();
        if app.starts_with('$') {
            return None;
        }
        Some(UpstreamTopic {
            app,
            scope: (scope != UNSCOPED).then_some(scope),
            room,
            topic,
            filter,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(s: &str) -> ClientTopic<'_> {
        ClientTopic::parse(s).unwrap()
    }

    fn subs(layout: &TopicLayout, scope: Option<&str>, f: &str, sub: &[&str]) -> Vec<String> {
        let sub: Vec<String> = sub.iter().map(|s| s.to_string()).collect();
        layout
            .subscription_filters(scope, &ClientFilter::parse(f).unwrap(), &sub, None)
            .unwrap()
    }

    #[test]
    fn publish_topics_inject_scope() {
        let l = TopicLayout::new("").unwrap();
        let t = topic("chat/general/messages");
        assert_eq!(
            l.publish_topic(Some("acme"), t, None),
            "chat/acme/general/messages"
        );
        assert_eq!(l.publish_topic(None, t, None), "chat/_/general/messages");
        assert_eq!(
            l.publish_topic(None, t, Some("a|b")),
            "chat/_/general/messages/a|b"
        );
        let p = TopicLayout::new("prod/eu").unwrap();
        assert_eq!(
            p.publish_topic(Some("acme"), t, None),
            "prod/eu/chat/acme/general/messages"
        );
        assert_eq!(p.prefix(), "prod/eu");
    }

    #[test]
    fn subscription_filters_cover_forms() {
        let l = TopicLayout::new("").unwrap();
        let s = Some("acme");
        assert_eq!(
            subs(&l, s, "chat/general/messages", &[]),
            ["chat/acme/general/messages/#"]
        );
        assert_eq!(
            subs(&l, s, "chat/+/messages", &[]),
            ["chat/acme/+/messages/#"]
        );
        assert_eq!(
            subs(&l, s, "chat/general/+", &[]),
            ["chat/acme/general/+/#"]
        );
        assert_eq!(subs(&l, s, "chat/#", &[]), ["chat/acme/#"]);
        assert_eq!(subs(&l, None, "chat/vip/#", &[]), ["chat/_/vip/#"]);
        assert_eq!(
            subs(&l, s, "chat/general/messages", &["Alice", "a|b"]),
            [
                "chat/acme/general/messages/Alice",
                "chat/acme/general/messages/a|b"
            ]
        );
        let err = l.subscription_filters(
            s,
            &ClientFilter::parse("chat/#").unwrap(),
            &["x".to_string()],
            None,
        );
        assert_eq!(err, Err(FilterError::NeedsTopicLevel));
    }

    #[test]
    fn shared_subscriptions() {
        let l = TopicLayout::new("").unwrap();
        let f = l
            .subscription_filters(
                Some("acme"),
                &ClientFilter::parse("chat/general/orders").unwrap(),
                &[],
                Some("workers"),
            )
            .unwrap();
        let name = TopicLayout::share_name(
            "chat",
            Some("acme"),
            "workers",
            "chat/acme/general/orders/#",
        );
        assert_eq!(f, [format!("$share/{name}/chat/acme/general/orders/#")]);
        assert!(name.starts_with('c') && name.len() == 33);
        // Names that a plain join would make equal stay apart.
        let a = TopicLayout::share_name("chat", Some("a_b"), "x", "f");
        let b = TopicLayout::share_name("chat", Some("a"), "b_x", "f");
        let c = TopicLayout::share_name("chat_a", Some("b"), "x", "f");
        assert!(a != b && b != c && a != c);
        // One group on two filters: two names.
        assert_ne!(
            TopicLayout::share_name("chat", None, "g", "f1"),
            TopicLayout::share_name("chat", None, "g", "f2")
        );
    }

    #[test]
    fn parse_upstream_round_trips() {
        for prefix in ["", "p", "a/b"] {
            let l = TopicLayout::new(prefix).unwrap();
            for scope in [None, Some("acme")] {
                for filter in [None, Some("x"), Some("a|b")] {
                    let t = topic("chat/general/messages");
                    let up = l.publish_topic(scope, t, filter);
                    let back = l.parse_upstream(&up).unwrap();
                    assert_eq!(back.client_topic(), t);
                    assert_eq!(back.scope, scope);
                    assert_eq!(back.filter, filter);
                }
            }
        }
    }

    #[test]
    fn parse_upstream_rejects_foreign_topics() {
        let l = TopicLayout::new("p").unwrap();
        for t in [
            "",
            "chat/_/general/messages",
            "p/chat/_/general",
            "p//_/g/m",
            "p/chat/_//m",
            "q/chat/_/g/m",
            "p/$SYS/_/g/m",
        ] {
            assert_eq!(l.parse_upstream(t), None, "{t:?}");
        }
    }

    #[test]
    fn bad_prefixes() {
        for p in [
            "/", "a/", "/a", "a//b", "a/+", "#", "$SYS", "a\0", "é", "a b",
        ] {
            assert!(TopicLayout::new(p).is_err(), "{p:?}");
        }
    }
}
