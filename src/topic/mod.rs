//! Client topics: parsing and validating the `app/room/topic` strings clients send.
//!
//! This module owns the *shape* of a client topic (DESIGN §4), never its meaning: whether an
//! actor may use a topic is `policy::authorize`, and where it lives on the broker is
//! [`upstream`]. Everything here is a pure function of its input and never panics, whatever
//! the client sends — parsing is the first thing untrusted topic strings meet.

pub mod filters;
pub mod upstream;

use std::fmt;

/// Longest client topic string accepted, in bytes. Slugs are short; anything near this is
/// abuse, and bounding it bounds every string derived from it (upstream topics, log fields).
pub const MAX_TOPIC_BYTES: usize = 512;

/// Why a client topic string was rejected before any policy lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is longer than {MAX_TOPIC_BYTES} bytes")]
    TooLong,
    #[error("topic must have three levels: app/room/topic")]
    WrongDepth,
    #[error("topic has an empty level")]
    EmptyLevel,
    #[error("topic contains a NUL character")]
    Nul,
    #[error("topic contains a control character or a Unicode noncharacter")]
    ControlCharacter,
    #[error("a topic level may not start with '$'")]
    Dollar,
    #[error("'+' and '#' must fill a whole level")]
    PartialWildcard,
    #[error("wildcards are not allowed in a publish topic")]
    WildcardInPublish,
    #[error("the app level cannot be a wildcard")]
    WildcardApp,
    #[error("'#' must be the last level")]
    HashNotLast,
}

/// An exact client topic: `app/room/topic`, as used by publishes and exact subscriptions.
/// Borrows from the client's string; nothing is copied to parse it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientTopic<'a> {
    pub app: &'a str,
    pub room: &'a str,
    pub topic: &'a str,
}

impl<'a> ClientTopic<'a> {
    /// Parses a publish topic: exactly three non-wildcard levels.
    pub fn parse(s: &'a str) -> Result<Self, TopicError> {
        match ClientFilter::parse(s)? {
            ClientFilter {
                app,
                room: Level::Exact(room),
                topic: TopicLevel::Exact(topic),
            } => Ok(ClientTopic { app, room, topic }),
            _ => Err(TopicError::WildcardInPublish),
        }
    }
}

impl fmt::Display for ClientTopic<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.app, self.room, self.topic)
    }
}

/// The room level of a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level<'a> {
    Exact(&'a str),
    /// `+`: every room of the app.
    Any,
}

impl<'a> Level<'a> {
    pub fn exact(self) -> Option<&'a str> {
        match self {
            Level::Exact(s) => Some(s),
            Level::Any => None,
        }
    }

    pub fn matches(self, value: &str) -> bool {
        match self {
            Level::Exact(s) => s == value,
            Level::Any => true,
        }
    }
}

/// The topic level of a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicLevel<'a> {
    Exact(&'a str),
    /// `+`: every topic, filtered or not.
    Any,
    /// `#` (as the room or topic level): every topic, filtered or not.
    All,
}

impl<'a> TopicLevel<'a> {
    pub fn exact(self) -> Option<&'a str> {
        match self {
            TopicLevel::Exact(s) => Some(s),
            TopicLevel::Any | TopicLevel::All => None,
        }
    }

    pub fn matches(self, value: &str) -> bool {
        match self {
            TopicLevel::Exact(s) => s == value,
            TopicLevel::Any | TopicLevel::All => true,
        }
    }
}

/// A subscription topic: `app/room/topic` where the room may be `+`, the topic `+`, and `#`
/// may replace the room level (`app/#`: everything in the app) or the topic level
/// (`app/room/#`). The app level is always literal (DESIGN §4).
///
/// Deeper topics (`app/room/topic/#`) are rejected rather than given a meaning: sub-topic
/// filters are expressed with the `filters` field (PROTOCOL §10), and a fourth client level
/// would collide with them upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientFilter<'a> {
    pub app: &'a str,
    pub room: Level<'a>,
    pub topic: TopicLevel<'a>,
}

impl<'a> ClientFilter<'a> {
    pub fn parse(s: &'a str) -> Result<Self, TopicError> {
        if s.is_empty() {
            return Err(TopicError::Empty);
        }
        if s.len() > MAX_TOPIC_BYTES {
            return Err(TopicError::TooLong);
        }
        let mut levels = s.split('/');
        let app = levels.next().unwrap_or_default();
        let room = levels.next();
        let topic = levels.next();
        let extra = levels.next();

        let app = match classify(app)? {
            Lvl::Exact(a) => a,
            Lvl::Plus | Lvl::Hash => return Err(TopicError::WildcardApp),
        };
        match (
            room.map(classify).transpose()?,
            topic.map(classify).transpose()?,
            extra,
        ) {
            (Some(Lvl::Hash), None, None) => Ok(ClientFilter {
                app,
                room: Level::Any,
                topic: TopicLevel::All,
            }),
            (Some(Lvl::Hash), Some(_), _) => Err(TopicError::HashNotLast),
            (Some(room), Some(topic), None) => {
                let room = match room {
                    Lvl::Exact(r) => Level::Exact(r),
                    Lvl::Plus => Level::Any,
                    Lvl::Hash => return Err(TopicError::HashNotLast),
                };
                let topic = match topic {
                    Lvl::Exact(t) => TopicLevel::Exact(t),
                    Lvl::Plus => TopicLevel::Any,
                    Lvl::Hash => TopicLevel::All,
                };
                Ok(ClientFilter { app, room, topic })
            }
            (Some(_), Some(Lvl::Hash), Some(_)) => Err(TopicError::HashNotLast),
            _ => Err(TopicError::WrongDepth),
        }
    }

    /// The exact topic, when the filter has no wildcard.
    pub fn as_exact(&self) -> Option<ClientTopic<'a>> {
        Some(ClientTopic {
            app: self.app,
            room: self.room.exact()?,
            topic: self.topic.exact()?,
        })
    }

    pub fn is_wildcard(&self) -> bool {
        self.as_exact().is_none()
    }

    /// Whether a concrete (room, topic) of this filter's app falls under it.
    pub fn matches(&self, room: &str, topic: &str) -> bool {
        self.room.matches(room) && self.topic.matches(topic)
    }
}

enum Lvl<'a> {
    Exact(&'a str),
    Plus,
    Hash,
}

fn classify(level: &str) -> Result<Lvl<'_>, TopicError> {
    match level {
        "" => Err(TopicError::EmptyLevel),
        "+" => Ok(Lvl::Plus),
        "#" => Ok(Lvl::Hash),
        _ => {
            check_literal_level(level)?;
            Ok(Lvl::Exact(level))
        }
    }
}

/// Characters a broker may refuse in a topic: control characters (C0, DEL, C1) and Unicode
/// noncharacters. MQTT says strings SHOULD NOT contain them, and Mosquitto drops the whole
/// connection on a packet that does — for the proxy, a pooled connection every tenant shares.
pub fn is_mqtt_unsafe(c: char) -> bool {
    let cp = c as u32;
    c.is_control() || (0xFDD0..=0xFDEF).contains(&cp) || (cp & 0xFFFE) == 0xFFFE
}

/// Validates one literal level a client sent (topic level, filter value, group name): no NUL
/// or other control character, no Unicode noncharacter, no wildcard characters, no leading
/// `$` (broker-reserved topics such as `$SYS`).
pub fn check_literal_level(level: &str) -> Result<(), TopicError> {
    if level.is_empty() {
        return Err(TopicError::EmptyLevel);
    }
    if level.starts_with('$') {
        return Err(TopicError::Dollar);
    }
    for c in level.chars() {
        match c {
            '\0' => return Err(TopicError::Nul),
            '+' | '#' => return Err(TopicError::PartialWildcard),
            c if is_mqtt_unsafe(c) => return Err(TopicError::ControlCharacter),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_topics_parse() {
        let t = ClientTopic::parse("chat/general/messages").unwrap();
        assert_eq!((t.app, t.room, t.topic), ("chat", "general", "messages"));
        assert_eq!(t.to_string(), "chat/general/messages");
    }

    #[test]
    fn publish_rejects_wildcards_and_bad_shapes() {
        use TopicError::*;
        for (s, e) in [
            ("", Empty),
            ("chat", WrongDepth),
            ("chat/general", WrongDepth),
            ("chat/general/messages/x", WrongDepth),
            ("chat//messages", EmptyLevel),
            ("chat/general/", EmptyLevel),
            ("/general/messages", EmptyLevel),
            ("chat/+/messages", WildcardInPublish),
            ("chat/general/+", WildcardInPublish),
            ("chat/#", WildcardInPublish),
            ("+/general/messages", WildcardApp),
            ("#", WildcardApp),
            ("chat/gen+/messages", PartialWildcard),
            ("chat/general/mess#", PartialWildcard),
            ("chat/\0/messages", Nul),
            ("chat/a\u{1}/messages", ControlCharacter),
            ("chat/general/m\u{7f}", ControlCharacter),
            ("chat/\u{85}/messages", ControlCharacter),
            ("chat/\u{fdd0}/messages", ControlCharacter),
            ("chat/\u{1fffe}/messages", ControlCharacter),
            ("$SYS/general/messages", Dollar),
            ("chat/$share/messages", Dollar),
        ] {
            assert_eq!(ClientTopic::parse(s), Err(e), "{s:?}");
        }
        assert_eq!(
            ClientTopic::parse(&"a/".repeat(300)),
            Err(TopicError::TooLong)
        );
    }

    #[test]
    fn subscription_wildcards() {
        let f = ClientFilter::parse("chat/+/messages").unwrap();
        assert_eq!(f.room, Level::Any);
        assert_eq!(f.topic, TopicLevel::Exact("messages"));
        assert!(f.matches("general", "messages"));
        assert!(!f.matches("general", "orders"));

        let f = ClientFilter::parse("chat/#").unwrap();
        assert_eq!((f.room, f.topic), (Level::Any, TopicLevel::All));
        assert!(f.matches("any", "thing"));

        let f = ClientFilter::parse("chat/vip/#").unwrap();
        assert_eq!((f.room, f.topic), (Level::Exact("vip"), TopicLevel::All));
        assert!(!f.matches("general", "messages"));

        let f = ClientFilter::parse("chat/general/messages").unwrap();
        assert!(!f.is_wildcard());
        assert_eq!(
            f.as_exact(),
            Some(ClientTopic {
                app: "chat",
                room: "general",
                topic: "messages"
            })
        );
    }

    #[test]
    fn subscription_rejects() {
        use TopicError::*;
        for (s, e) in [
            ("#", WildcardApp),
            ("+/#", WildcardApp),
            ("chat/#/messages", HashNotLast),
            ("chat/general/messages/#", WrongDepth),
            ("chat/+/messages/x", WrongDepth),
            ("chat/+", WrongDepth),
            ("chat/general/#/x", HashNotLast),
        ] {
            assert_eq!(ClientFilter::parse(s), Err(e), "{s:?}");
        }
    }
}
