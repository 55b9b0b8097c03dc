//! Sub-topic filters and load-balance groups (PROTOCOL §10), validated and normalised.
//!
//! A filter becomes one extra upstream level after the topic (`…/topic/<filter>`), and a
//! load-balance group becomes part of an MQTT `$share/<group>/` name. Both come from the
//! client, so both are checked here: a `/` would add levels, `+`/`#` would turn a publish into
//! an invalid MQTT topic (and get the pool's broker connection dropped), and a NUL or a
//! leading `$` has no business on the broker.
//!
//! Normalisation follows the reference exactly (A5): plain subscribe filters keep their case;
//! AND groups and the publish `filters` array are lowercased, sorted and joined with `|`.

use std::borrow::Cow;

/// At most this many filters per subscription (the reference's limit).
pub const MAX_FILTERS: usize = 100;
/// Longest filter value or load-balance group accepted, in bytes.
pub const MAX_FILTER_BYTES: usize = 128;

/// One item of a subscribe `filters` array: a plain string or an AND group (`[x, y, …]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterItem {
    One(String),
    All(Vec<String>),
}

/// Why a filter set was rejected. The `Display` strings are the wire `error` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("too_many_filters (max 100)")]
    TooMany,
    #[error("invalid_filter_chars (/, #, +, | not allowed)")]
    InvalidChars,
    /// Filters select a sub-topic, so they need a topic level to hang under: `app/#` has none.
    #[error("filters_need_topic_level")]
    NeedsTopicLevel,
}

/// Why a load-balance group name was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid_load_balance_group (1-{MAX_FILTER_BYTES} bytes; /, #, +, NUL not allowed)")]
pub struct GroupError;

/// Checks one filter value. `allow_pipe` is true only for the publish `filter` string, which
/// may name an AND group (`a|b`) directly.
fn check_value(v: &str, allow_pipe: bool) -> Result<(), FilterError> {
    if v.is_empty() || v.len() > MAX_FILTER_BYTES || v.starts_with('$') {
        return Err(FilterError::InvalidChars);
    }
    let bad = |c: char| {
        matches!(c, '/' | '#' | '+') || (c == '|' && !allow_pipe) || super::is_mqtt_unsafe(c)
    };
    if v.chars().any(bad) {
        return Err(FilterError::InvalidChars);
    }
    Ok(())
}

/// Lowercases, sorts and `|`-joins a group of values (an AND group or the publish `filters`).
fn join_group<S: AsRef<str>>(values: &[S]) -> Result<String, FilterError> {
    let mut lowered = Vec::with_capacity(values.len());
    for v in values {
        check_value(v.as_ref(), false)?;
        lowered.push(v.as_ref().to_lowercase());
    }
    lowered.sort_unstable();
    Ok(lowered.join("|"))
}

/// Turns a subscribe `filters` array into the list of upstream sub-topic levels, one per
/// item. An empty result means "no filters": subscribe to the topic and all its sub-topics.
pub fn subscription_filters(items: &[FilterItem]) -> Result<Vec<String>, FilterError> {
    if items.len() > MAX_FILTERS {
        return Err(FilterError::TooMany);
    }
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let level = match item {
            FilterItem::One(v) => {
                check_value(v, false)?;
                v.clone()
            }
            FilterItem::All(group) if group.len() >= 2 => join_group(group)?,
            FilterItem::All(_) => return Err(FilterError::InvalidChars),
        };
        if !out.contains(&level) {
            out.push(level);
        }
    }
    Ok(out)
}

/// The sub-topic level a publish goes to: `filter` as-is when non-empty (it wins), else the
/// `filters` array normalised, else none.
pub fn publish_filter<'a>(
    filter: Option<&'a str>,
    filters: &[String],
) -> Result<Option<Cow<'a, str>>, FilterError> {
    match filter {
        Some(f) if !f.is_empty() => {
            check_value(f, true)?;
            Ok(Some(Cow::Borrowed(f)))
        }
        _ if filters.is_empty() => Ok(None),
        _ if filters.len() > MAX_FILTERS => Err(FilterError::TooMany),
        _ => Ok(Some(Cow::Owned(join_group(filters)?))),
    }
}

/// Validates a client-chosen `loadBalanceGroup`.
pub fn check_group(group: &str) -> Result<(), GroupError> {
    let ok = !group.is_empty()
        && group.len() <= MAX_FILTER_BYTES
        && !group.starts_with('$')
        && !group
            .chars()
            .any(|c| matches!(c, '/' | '#' | '+') || super::is_mqtt_unsafe(c));
    if ok { Ok(()) } else { Err(GroupError) }
}

/// Makes an arbitrary identifier (the default group is the actor id, which a JWT `sub` can
/// fill with anything) safe as a group name by percent-encoding what MQTT reserves or a
/// broker may refuse (as UTF-8 bytes), plus `%` itself so that the encoding stays injective.
pub fn encode_group(raw: &str) -> Cow<'_, str> {
    let reserved = |c: char| matches!(c, '/' | '#' | '+' | '%' | '$') || super::is_mqtt_unsafe(c);
    if !raw.chars().any(reserved) && !raw.is_empty() {
        return Cow::Borrowed(raw);
    }
    let mut out = String::with_capacity(raw.len() + 8);
    if raw.is_empty() {
        out.push_str("%00");
    }
    for c in raw.chars() {
        if reserved(c) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> FilterItem {
        FilterItem::One(s.into())
    }

    #[test]
    fn plain_filters_keep_case_and_groups_are_normalised() {
        let items = [
            one("Alice"),
            FilterItem::All(vec!["Zed".into(), "amy".into()]),
        ];
        assert_eq!(
            subscription_filters(&items).unwrap(),
            vec!["Alice".to_string(), "amy|zed".to_string()]
        );
    }

    #[test]
    fn subscription_filter_limits() {
        let many: Vec<_> = (0..101).map(|i| one(&i.to_string())).collect();
        assert_eq!(subscription_filters(&many), Err(FilterError::TooMany));
        for bad in [
            "a/b", "a#", "+", "a|b", "", "$x", "a\0", "x\u{1}", "\u{7f}", "\u{85}", "\u{fffe}",
        ] {
            assert_eq!(
                subscription_filters(&[one(bad)]),
                Err(FilterError::InvalidChars),
                "{bad:?}"
            );
        }
        assert_eq!(
            subscription_filters(&[FilterItem::All(vec!["solo".into()])]),
            Err(FilterError::InvalidChars)
        );
        assert_eq!(
            FilterError::TooMany.to_string(),
            "too_many_filters (max 100)"
        );
    }

    #[test]
    fn publish_filter_precedence() {
        let filters = vec!["B".to_string(), "a".to_string()];
        assert_eq!(
            publish_filter(Some("X|y"), &filters).unwrap().as_deref(),
            Some("X|y")
        );
        assert_eq!(
            publish_filter(Some(""), &filters).unwrap().as_deref(),
            Some("a|b")
        );
        assert_eq!(publish_filter(None, &[]).unwrap(), None);
        assert_eq!(
            publish_filter(Some("a/b"), &[]),
            Err(FilterError::InvalidChars)
        );
        assert_eq!(
            publish_filter(None, &["a|b".to_string()]),
            Err(FilterError::InvalidChars)
        );
    }

    #[test]
    fn groups() {
        assert!(check_group("workers").is_ok());
        for bad in ["", "a/b", "a+", "#", "$share", "a\0", "g\u{85}", "\u{fdd0}"] {
            assert!(check_group(bad).is_err(), "{bad:?}");
        }
        assert_eq!(encode_group("alice"), "alice");
        assert_eq!(encode_group("a/b+c#%"), "a%2Fb%2Bc%23%25");
        assert_eq!(encode_group(""), "%00");
        assert!(check_group(&encode_group("x/$y#")).is_ok());
        assert_eq!(encode_group("a\u{1}\u{85}"), "a%01%C2%85");
        assert!(check_group(&encode_group("\u{fdd0}\u{7f}")).is_ok());
    }
}
